//! The source → decode → route → apply pieces together against real clusters: a moving
//! tenant's changes land in its provisioned target schema on another cluster, other tenants'
//! changes do not, and a diverged target is reported. (No backfill here: the slot exists
//! before the first row, so the stream alone carries everything.)

use crate::support;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use support::pipeline::TwoClusters;
use support::{wait_for, wait_for_row};
use switchyard::apply::writer::{OwnedRowOp, RowChange};
use switchyard::apply::{self, ApplyError, SourceTxn, Statement, TargetTable, TargetWriter, Work};
use switchyard::config::Tenancy;
use switchyard::decode::{Datum, Message, RelationCache, Tuple};
use switchyard::lsn::{CommitLsn, Lsn};
use switchyard::route::{Destination, Router, RowOp};
use switchyard::source::{ReplicationStream, SourceEvent};
use switchyard::sql::QualifiedName;
use switchyard::tenant::{TargetId, TenantId};

const SCHEMA: &str = "
CREATE TABLE public.orders (
  tenant_id int NOT NULL, id int NOT NULL, note text, big text, amount numeric(12,2),
  tags text[], PRIMARY KEY (tenant_id, id));
ALTER TABLE public.orders ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE PUBLICATION sy_pub FOR TABLE public.orders;
GRANT SELECT ON public.orders TO switchyard;
SELECT pg_create_logical_replication_slot('sy', 'pgoutput');
";

/// Streams and applies one target transaction per source transaction until the marker
/// message arrives. Returns the first apply error, if any.
async fn pump(
    stream: &mut ReplicationStream,
    target: &mut tokio_postgres::Client,
    meta: &mut TargetWriter,
    router: &Router,
    relations: &mut RelationCache,
    marker: &str,
) -> Result<Result<(), ApplyError>> {
    let mut tx_ops: Vec<Message> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if Instant::now() > deadline {
            bail!("no marker {marker:?} within a minute");
        }
        let ev = tokio::time::timeout(Duration::from_secs(60), stream.recv())
            .await
            .context("stream went quiet")??
            .context("stream ended")?;
        let SourceEvent::Message(r) = ev else {
            bail!("unexpected reconnect in this test")
        };
        match &r.message {
            Message::Relation(rel) => {
                router.validate(rel)?;
                relations.apply(rel.clone());
            }
            Message::Begin(_) => tx_ops.clear(),
            Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_) => {
                tx_ops.push(r.message.clone());
            }
            Message::Commit(c) => {
                let txn = target.transaction().await?;
                for m in tx_ops.drain(..) {
                    for (rel, routed) in router.message(relations, &m)? {
                        let identity: Vec<bool> = rel.columns.iter().map(|c| c.is_key()).collect();
                        for op in routed {
                            let table = meta
                                .table(&op.table(), &identity, Some("tenant_id"))
                                .await?;
                            let st = apply::build(&table, &op.op, op.tenant.as_str())?;
                            if let Err(e) = apply::execute(&txn, &st).await {
                                return Ok(Err(e));
                            }
                        }
                    }
                }
                txn.commit().await?;
                stream.mark_applied(c.end());
            }
            Message::Message(m) if m.prefix == "sy" && &m.content[..] == marker.as_bytes() => {
                return Ok(Ok(()));
            }
            _ => {}
        }
    }
}

async fn rows(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>> {
    Ok(c.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect())
}

const ROW_TEXT: &str =
    "SELECT concat_ws('|', tenant_id, id, note, md5(big), amount, tags::text) FROM";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_tenants_changes_reach_its_target_and_nothing_else_does() -> Result<()> {
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let s = two.src.client().await?;
    let mut d = two.dst.client().await?;
    let mut meta = TargetWriter::with_client(
        TargetId::new("shard2")?,
        two.dst.client().await?,
        "switchyard",
    )
    .await?;
    let src = &two.src;
    let mut stream = two.stream(true).await?;
    // Relation messages come once per connection: the cache outlives each pump call.
    let mut relations = RelationCache::new();
    let mut router = Router::new(Tenancy::default());
    router.start(
        TenantId::new("7")?,
        Destination {
            target: TargetId::new("shard2")?,
            schema: "acme".into(),
        },
    );

    src.psql(
        "INSERT INTO orders SELECT t, g, 'n' || g, NULL, g * 1.5, ARRAY['a', 'b c']
           FROM generate_series(7, 8) t, generate_series(1, 50) g;
         UPDATE orders SET big = (SELECT string_agg(md5(k::text), '') FROM generate_series(1, 200) k)
          WHERE id <= 5;
         UPDATE orders SET note = 'toast kept' WHERE id = 1;          -- big arrives unchanged
         UPDATE orders SET id = id + 1000 WHERE id = 2;               -- key change
         DELETE FROM orders WHERE id BETWEEN 10 AND 14;
         UPDATE orders SET tenant_id = 8, id = 2020 WHERE tenant_id = 7 AND id = 20; -- leaves 7
         UPDATE orders SET tenant_id = 7, id = 2121 WHERE tenant_id = 8 AND id = 21; -- joins 7
         BEGIN; UPDATE orders SET amount = amount + 1 WHERE tenant_id = 7 AND id = 30;
                DELETE FROM orders WHERE tenant_id = 8 AND id = 30; COMMIT;
         SELECT pg_logical_emit_message(false, 'sy', 'phase1');",
    )?;
    pump(
        &mut stream,
        &mut d,
        &mut meta,
        &router,
        &mut relations,
        "phase1",
    )
    .await??;
    let want = rows(
        &s,
        &format!("{ROW_TEXT} public.orders WHERE tenant_id = 7 ORDER BY 1"),
    )
    .await?;
    let got = rows(&d, &format!("{ROW_TEXT} acme.orders ORDER BY 1")).await?;
    assert_eq!(got.len(), 45);
    assert_eq!(got, want, "target differs from the tenant's source rows");
    let others: i64 = d
        .query_one("SELECT count(*) FROM acme.orders WHERE tenant_id <> 7", &[])
        .await?
        .get(0);
    assert_eq!(others, 0, "another tenant's row reached the target");

    // TRUNCATE of the shared table removes only the tenant's rows at the target.
    src.psql("TRUNCATE orders; SELECT pg_logical_emit_message(false, 'sy', 'phase2');")?;
    d.batch_execute("INSERT INTO acme.orders (tenant_id, id) VALUES (99, 1)")
        .await?;
    pump(
        &mut stream,
        &mut d,
        &mut meta,
        &router,
        &mut relations,
        "phase2",
    )
    .await??;
    assert_eq!(
        rows(&d, "SELECT tenant_id::text FROM acme.orders").await?,
        ["99"]
    );

    // A target that lost a row is a divergence, reported, not repaired.
    src.psql(
        "INSERT INTO orders (tenant_id, id, note) VALUES (7, 1, 'x');
         SELECT pg_logical_emit_message(false, 'sy', 'phase3');",
    )?;
    pump(
        &mut stream,
        &mut d,
        &mut meta,
        &router,
        &mut relations,
        "phase3",
    )
    .await??;
    d.batch_execute("DELETE FROM acme.orders WHERE tenant_id = 7")
        .await?;
    src.psql(
        "UPDATE orders SET note = 'y' WHERE tenant_id = 7 AND id = 1;
         SELECT pg_logical_emit_message(false, 'sy', 'phase4');",
    )?;
    let err = pump(
        &mut stream,
        &mut d,
        &mut meta,
        &router,
        &mut relations,
        "phase4",
    )
    .await?
    .expect_err("the update found no row");
    assert!(
        matches!(err, ApplyError::Divergence { actual: 0, .. }),
        "{err}"
    );

    // The failed transaction was never marked durable, so the slot must not have been
    // confirmed past it: a new stream from the slot delivers it again. (The confirmed
    // position may pass the last durable commit: idle keepalives cover skipped WAL.)
    stream.shutdown().await;
    wait_for_row(
        &s,
        "the slot to be released",
        Duration::from_secs(30),
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sy' AND NOT active",
        &[],
    )
    .await?;
    let mut again = two.stream(false).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the failed transaction was not re-sent"
        );
        let ev = tokio::time::timeout(Duration::from_secs(60), again.recv())
            .await??
            .context("stream ended")?;
        if let SourceEvent::Message(r) = ev {
            if let Message::Update(u) = &r.message {
                if u.new.0.get(2) == Some(&Datum::Text(Bytes::from_static(b"y"))) {
                    break;
                }
            }
        }
    }
    again.shutdown().await;
    Ok(())
}

fn row_insert(table: &TargetTable, tenant: &str, id: i32, note: &str) -> Result<Statement> {
    let new = Tuple(vec![
        Datum::Text(Bytes::copy_from_slice(tenant.as_bytes())),
        Datum::Text(Bytes::copy_from_slice(id.to_string().as_bytes())),
        Datum::Text(Bytes::copy_from_slice(note.as_bytes())),
        Datum::Null,
        Datum::Null,
        Datum::Null,
    ]);
    Ok(apply::build(
        table,
        &RowOp::Upsert {
            new: &new,
            update: false,
        },
        tenant,
    )?)
}

async fn count_rows(c: &tokio_postgres::Client, table: &str) -> Result<i64> {
    Ok(c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_applies_each_source_transaction_exactly_once_across_restarts() -> Result<()> {
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let (dst, d) = (&two.dst, two.dst.client().await?);
    let target = TargetId::new("shard2")?;
    let acme = TenantId::new("7")?;
    let globex = TenantId::new("8")?;
    let name = QualifiedName::parse("acme.orders")?;
    let identity = [true, true, false, false, false, false];

    let mut w =
        TargetWriter::with_client(target.clone(), dst.client().await?, "switchyard").await?;
    let table = w.table(&name, &identity, Some("tenant_id")).await?.clone();
    let txn = |end: u64, parts: Vec<(TenantId, Vec<Statement>)>| SourceTxn {
        end: CommitLsn::of(Lsn(end)),
        parts: parts
            .into_iter()
            .map(|(t, sts)| (t, sts.into_iter().map(Work::from).collect()))
            .collect(),
        states: Vec::new(),
    };
    let batch1 = vec![
        txn(
            100,
            vec![(acme.clone(), vec![row_insert(&table, "7", 1, "a")?])],
        ),
        txn(
            200,
            vec![
                (acme.clone(), vec![row_insert(&table, "7", 2, "b")?]),
                (globex.clone(), vec![row_insert(&table, "8", 1, "c")?]),
            ],
        ),
    ];
    assert_eq!(w.commit(&batch1).await?, CommitLsn::of(Lsn(200)));
    assert_eq!(w.applied(&acme), Lsn(200));

    // "Crash": a new writer learns the positions from the target itself, and a replay of
    // batch 1 plus new work applies only the new work (plain INSERTs would fail otherwise).
    drop(w);
    let mut w =
        TargetWriter::with_client(target.clone(), dst.client().await?, "switchyard").await?;
    assert_eq!(w.applied(&acme), Lsn(200));
    assert_eq!(w.applied(&globex), Lsn(200));
    let mut replay = batch1.clone();
    replay.push(txn(
        300,
        vec![(acme.clone(), vec![row_insert(&table, "7", 3, "d")?])],
    ));
    assert_eq!(w.commit(&replay).await?, CommitLsn::of(Lsn(300)));
    let count = count_rows(&d, "acme.orders").await?;
    assert_eq!(count, 4);
    assert_eq!(w.applied(&acme), Lsn(300));
    assert_eq!(w.applied(&globex), Lsn(200), "globex had nothing after 200");

    // A failing batch rolls back whole: no rows, no position.
    let bad = vec![
        txn(
            400,
            vec![(acme.clone(), vec![row_insert(&table, "7", 4, "e")?])],
        ),
        txn(
            500,
            vec![(acme.clone(), vec![row_insert(&table, "7", 1, "dup")?])],
        ),
    ];
    let err = w.commit(&bad).await.unwrap_err();
    assert!(err.to_string().contains("orders_pkey"), "{err}");
    let count = count_rows(&d, "acme.orders").await?;
    assert_eq!(count, 4, "a failed batch left rows behind");
    assert_eq!(w.applied(&acme), Lsn(300));
    let stored = w.load_applied().await?;
    assert_eq!(stored.get(&acme), Some(&Lsn(300)));

    // The positions are recorded in one statement sent together with the COMMIT. When that
    // record fails, the server turns the COMMIT into a rollback: the batch is gone whole,
    // and the connection is left outside any transaction for the next batch.
    d.batch_execute("ALTER TABLE switchyard.applied ADD CONSTRAINT refuse_9 CHECK (tenant <> '9')")
        .await?;
    let initech = TenantId::new("9")?;
    let refused = vec![txn(
        600,
        vec![
            (acme.clone(), vec![row_insert(&table, "7", 5, "f")?]),
            (initech.clone(), vec![row_insert(&table, "9", 1, "g")?]),
        ],
    )];
    let err = w.commit(&refused).await.unwrap_err();
    assert!(err.to_string().contains("refuse_9"), "{err}");
    let count = count_rows(&d, "acme.orders").await?;
    assert_eq!(
        count, 4,
        "a batch whose position was refused left rows behind"
    );
    assert_eq!(w.applied(&acme), Lsn(300));
    d.batch_execute("ALTER TABLE switchyard.applied DROP CONSTRAINT refuse_9")
        .await?;
    assert_eq!(w.commit(&refused).await?, CommitLsn::of(Lsn(600)));
    let count = count_rows(&d, "acme.orders").await?;
    assert_eq!(count, 6);
    let stored = w.load_applied().await?;
    assert_eq!(stored.get(&acme), Some(&Lsn(600)));
    assert_eq!(stored.get(&initech), Some(&Lsn(600)));
    assert_eq!(stored.get(&globex), Some(&Lsn(200)));
    Ok(())
}

fn text(v: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(v.as_bytes()))
}

/// A row of acme.orders: (tenant 7, id, note, big); `None` for big = unchanged TOAST.
fn order(id: i32, note: &str, big: Option<&str>) -> Tuple {
    Tuple(vec![
        text("7"),
        text(&id.to_string()),
        text(note),
        big.map(text).unwrap_or(Datum::UnchangedToast),
        Datum::Null,
        Datum::Null,
    ])
}

fn key(id: i32) -> Tuple {
    Tuple(vec![
        text("7"),
        text(&id.to_string()),
        Datum::Null,
        Datum::Null,
        Datum::Null,
        Datum::Null,
    ])
}

fn change(op: OwnedRowOp) -> Work {
    Work::Row(RowChange::new(
        QualifiedName::parse("acme.orders").unwrap(),
        vec![true, true, false, false, false, false],
        Some("tenant_id".into()),
        op,
    ))
}

fn ins(t: Tuple) -> Work {
    change(OwnedRowOp::Upsert {
        new: t,
        update: false,
    })
}
fn upd(t: Tuple) -> Work {
    change(OwnedRowOp::Upsert {
        new: t,
        update: true,
    })
}
fn del(id: i32) -> Work {
    change(OwnedRowOp::Delete { old: key(id) })
}

/// One source transaction per work item, all for tenant 7.
fn txns(from: u64, works: Vec<Work>) -> Vec<SourceTxn> {
    works
        .into_iter()
        .enumerate()
        .map(|(i, w)| SourceTxn {
            end: CommitLsn::of(Lsn(from + i as u64)),
            parts: vec![(TenantId::new("7").unwrap(), vec![w])],
            states: Vec::new(),
        })
        .collect()
}

/// A writer for shard2 applying under the replica role (so it folds and merges copies).
async fn replica_writer(two: &TwoClusters) -> Result<TargetWriter> {
    let mut w = TargetWriter::with_client(
        TargetId::new("shard2")?,
        two.dst.client().await?,
        "switchyard",
    )
    .await?;
    assert!(w.use_replica_role().await?, "the test role is a superuser");
    Ok(w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_batches_end_where_change_by_change_replay_ends() -> Result<()> {
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let d = two.dst.client().await?;
    let mut w = replica_writer(&two).await?;
    let state = || async {
        rows(
            &d,
            "SELECT concat_ws('|', id, note, big) FROM acme.orders ORDER BY id",
        )
        .await
    };

    // Keys 3 and 4 exist before the batch.
    w.commit(&txns(
        10,
        vec![
            ins(order(3, "c", Some("big3"))),
            ins(order(4, "d", Some("big4"))),
        ],
    ))
    .await?;
    // Every way a key's changes fold, plus a key change that cannot fold, in one batch.
    let batch = txns(
        100,
        vec![
            ins(order(1, "a", Some("big1"))),
            upd(order(1, "a2", None)), // big stays big1
            ins(order(2, "b", Some("big2"))),
            del(2),
            ins(order(2, "b2", Some("big2b"))), // inserted, deleted, inserted: one INSERT
            upd(order(3, "c2", None)),          // big stays big3
            del(4),
            ins(order(4, "d2", Some("big4b"))), // deleted and re-inserted: one full UPDATE
            ins(order(6, "f", Some("big6"))),
            del(6), // never on the target: checked absent
            change(OwnedRowOp::Rekey {
                old: key(1),
                new: order(10, "a3", Some("big1")),
            }),
            upd(order(10, "a4", None)),
        ],
    );
    assert_eq!(w.commit(&batch).await?, CommitLsn::of(Lsn(111)));
    assert_eq!(
        state().await?,
        ["2|b2|big2b", "3|c2|big3", "4|d2|big4b", "10|a4|big1"]
    );
    assert_eq!(w.stats().compacted, 2);
    assert_eq!(w.stats().replayed, 0);

    // A unique constraint the fold's order would violate (two notes swapped through a
    // temporary value): the compacted attempt fails, the change-by-change replay succeeds.
    d.batch_execute("CREATE UNIQUE INDEX orders_note ON acme.orders (note)")
        .await?;
    w.commit(&txns(
        200,
        vec![
            upd(order(2, "tmp", Some("big2b"))),
            upd(order(3, "b2", None)),
            upd(order(2, "c2", Some("big2b"))),
        ],
    ))
    .await?;
    assert_eq!(
        state().await?,
        ["2|c2|big2b", "3|b2|big3", "4|d2|big4b", "10|a4|big1"]
    );
    assert_eq!(w.stats().replayed, 1);

    // A divergence is still found, and reported as the one change that hit no row.
    d.batch_execute("DELETE FROM acme.orders WHERE id = 4")
        .await?;
    let err = w
        .commit(&txns(
            300,
            vec![upd(order(3, "c3", None)), upd(order(4, "d3", None))],
        ))
        .await
        .unwrap_err();
    match &err {
        ApplyError::Divergence { sql, actual: 0, .. } => {
            assert!(
                sql.starts_with("UPDATE") && !sql.contains("unnest"),
                "{sql}"
            )
        }
        other => panic!("expected a divergence, got {other}"),
    }
    assert_eq!(w.failed_tenant().map(|t| t.as_str()), Some("7"));
    assert_eq!(w.stats().replayed, 2);
    assert_eq!(w.applied(&TenantId::new("7")?), Lsn(202));
    assert_eq!(
        state().await?[1],
        "3|b2|big3",
        "the failed batch left no trace"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_chunk_copies_share_one_copy_and_keep_their_place() -> Result<()> {
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let d = two.dst.client().await?;
    let mut w = replica_writer(&two).await?;
    let table = QualifiedName::parse("acme.orders")?;
    let columns: Vec<String> = ["tenant_id", "id", "note", "big", "amount", "tags"]
        .map(String::from)
        .to_vec();
    let chunk = |ids: std::ops::RangeInclusive<i32>| {
        let rows: Vec<Vec<Option<String>>> = ids
            .map(|i| {
                vec![
                    Some("7".into()),
                    Some(i.to_string()),
                    Some(format!("c{i}")),
                    None,
                    None,
                    Some("{a,\"b c\"}".into()),
                ]
            })
            .collect();
        Work::Copy(apply::CopyRows::from_text(
            table.clone(),
            columns.clone(),
            &rows,
        ))
    };
    // Three chunks in a row: one COPY. Then a chunk, a change to a row it copied, and the
    // next chunk: the change must land after the first COPY and is not overtaken.
    let before = w.stats().copies;
    w.commit(&txns(
        10,
        vec![chunk(1..=10), chunk(11..=20), chunk(21..=30)],
    ))
    .await?;
    assert_eq!(w.stats().copies - before, 1);
    w.commit(&txns(
        20,
        vec![
            chunk(31..=40),
            upd(order(35, "changed", Some("b"))),
            chunk(41..=50),
        ],
    ))
    .await?;
    assert_eq!(w.stats().copies - before, 3);
    let rows = rows(
        &d,
        "SELECT concat_ws('|', count(*), sum(id), max(note) FILTER (WHERE id = 35), max(tags::text)) FROM acme.orders",
    )
    .await?;
    assert_eq!(rows, ["50|1275|changed|{a,\"b c\"}"]);
    Ok(())
}

/// Three lane writers on a fresh target (nothing recorded yet, so three lanes may be
/// taken), with keys 1..=40 inserted at 100.. and spread over the lanes by key.
async fn three_lanes_with_forty_keys(two: &TwoClusters) -> Result<Vec<TargetWriter>> {
    let mut lanes = Vec::new();
    for lane in 0..3 {
        lanes.push(lane_writer(two, lane).await?);
    }
    assert_eq!(lanes[0].settle_lanes(3).await?, 3);
    let inserts: Vec<Work> = (1..=40).map(|i| ins(order(i, "a", Some("big")))).collect();
    commit_lanes(&mut lanes, txns(100, inserts), &[0, 1, 2]).await?;
    Ok(lanes)
}

/// Keys 1..=40 (inserted before): every fourth deleted, the others updated twice.
fn lane_updates() -> Vec<Work> {
    (1..=40)
        .flat_map(|i| {
            if i % 4 == 0 {
                vec![del(i)]
            } else {
                vec![upd(order(i, "b", None)), upd(order(i, "c", None))]
            }
        })
        .collect()
}

/// A writer for `lane` of shard2, under the replica role.
async fn lane_writer(two: &TwoClusters, lane: usize) -> Result<TargetWriter> {
    let mut w = TargetWriter::with_client_lane(
        TargetId::new("shard2")?,
        two.dst.client().await?,
        "switchyard",
        lane,
    )
    .await?;
    assert!(w.use_replica_role().await?, "the test role is a superuser");
    Ok(w)
}

/// Commits `segment` split over `lanes`, but only on the lanes in `only` (a crash in the
/// middle of a segment leaves the others behind).
async fn commit_lanes(
    lanes: &mut [TargetWriter],
    segment: Vec<SourceTxn>,
    only: &[usize],
) -> Result<()> {
    use switchyard::apply::lanes::{split, Segment};
    let shares = split(
        Segment {
            barrier: false,
            txns: segment,
        },
        lanes.len(),
        &Default::default(),
        0,
    );
    for (lane, (w, share)) in lanes.iter_mut().zip(shares).enumerate() {
        if only.contains(&lane) {
            w.commit(&share).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_apply_each_change_once_across_a_crash_between_lanes() -> Result<()> {
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let d = two.dst.client().await?;
    let seven = TenantId::new("7")?;
    let mut lanes = three_lanes_with_forty_keys(&two).await?;
    let per_lane = d
        .query_one("SELECT count(*) FROM switchyard.applied_lanes", &[])
        .await?
        .get::<_, i64>(0);
    assert_eq!(per_lane, 2, "lanes 1 and 2 recorded the tenant");

    // The next segment commits on lanes 0 and 1 only, as if the daemon died in between.
    commit_lanes(&mut lanes, txns(1000, lane_updates()), &[0, 1]).await?;
    let progress = switchyard::apply::progress::read_resume_progress(&d, "switchyard").await?;
    let resume = progress[&seven].lsn;
    assert!(
        resume < Lsn(1000),
        "a tenant resumes from its lowest lane: {resume}"
    );
    // The lanes are apart: the lane count cannot change now.
    assert_eq!(lanes[0].settle_lanes(2).await?, 3);

    // The restarted daemon replays the segment to the same lanes: lanes 0 and 1 skip what
    // they hold, lane 2 applies its share; a double apply would fail (a second DELETE finds
    // no row) or show in the notes.
    let mut again = Vec::new();
    for lane in 0..3 {
        again.push(lane_writer(&two, lane).await?);
    }
    commit_lanes(&mut again, txns(1000, lane_updates()), &[0, 1, 2]).await?;
    let notes = rows(
        &d,
        "SELECT note || ':' || count(*) FROM acme.orders GROUP BY note ORDER BY note",
    )
    .await?;
    assert_eq!(notes, ["c:30"]);
    let progress = switchyard::apply::progress::read_resume_progress(&d, "switchyard").await?;
    assert_eq!(
        progress[&seven].lsn,
        Lsn(1000 + lane_updates().len() as u64 - 1)
    );

    // The lanes agree again: a new count takes effect, starting from lane 0's positions.
    assert_eq!(again[0].settle_lanes(2).await?, 2);
    let lanes_left = rows(
        &d,
        "SELECT lane || ':' || lsn FROM switchyard.applied_lanes ORDER BY lane",
    )
    .await?;
    assert_eq!(lanes_left.len(), 1, "{lanes_left:?}");
    let mut two_lanes = Vec::new();
    for lane in 0..2 {
        two_lanes.push(lane_writer(&two, lane).await?);
    }
    let more: Vec<Work> = (1..=40)
        .filter(|i| i % 4 != 0)
        .map(|i| upd(order(i, "d", None)))
        .collect();
    commit_lanes(&mut two_lanes, txns(5000, more), &[0, 1]).await?;
    let notes = rows(
        &d,
        "SELECT note || ':' || count(*) FROM acme.orders GROUP BY note ORDER BY note",
    )
    .await?;
    assert_eq!(notes, ["d:30"]);
    Ok(())
}

/// A small segment runs on lane 0 alone, which records it for every lane in its one
/// commit. A replay after a crash in a spread segment may cut the same transactions
/// differently (here: all on lane 0), and the replay window still applies what the lane
/// that died held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_on_lane_zero_records_every_lane_and_a_replay_may_cut_it_differently(
) -> Result<()> {
    use switchyard::apply::lanes::{replay_windows, split, Segment, SPREAD_MIN};
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let d = two.dst.client().await?;
    let seven = TenantId::new("7")?;
    let mut lanes = three_lanes_with_forty_keys(&two).await?;

    // Five one-row transactions: below SPREAD_MIN, so one share, committed by lane 0 for
    // all three lanes.
    let small: Vec<Work> = (1..=5).map(|i| upd(order(i, "s", None))).collect();
    let shares = split(
        Segment {
            barrier: false,
            txns: txns(500, small),
        },
        3,
        &Default::default(),
        SPREAD_MIN,
    );
    assert_eq!(shares.len(), 1);
    lanes[0].commit_covering(&shares[0], 3).await?;
    let recorded = rows(
        &d,
        "SELECT lane || ':' || lsn FROM switchyard.applied_lanes ORDER BY lane",
    )
    .await?;
    assert_eq!(
        recorded,
        ["1:0/1F8", "2:0/1F8"],
        "lane 0 recorded 504 for lanes 1 and 2"
    );
    let progress = switchyard::apply::progress::read_resume_progress(&d, "switchyard").await?;
    assert_eq!(progress[&seven].lsn, Lsn(504));
    // Only lane 0 may record other lanes' positions.
    let refused = lanes[1]
        .commit_covering(&txns(600, vec![upd(order(1, "x", None))]), 3)
        .await;
    assert!(refused.is_err(), "lane 1 recorded for others");

    // A spread segment commits on lanes 0 and 1 only: the daemon died in between.
    commit_lanes(&mut lanes, txns(1000, lane_updates()), &[0, 1]).await?;

    // The replay batches the same transactions into one segment that does not spread:
    // lane 0 alone, which holds its own share already. The window makes it apply lane 2's.
    let mut again = Vec::new();
    for lane in 0..3 {
        again.push(lane_writer(&two, lane).await?);
    }
    assert_eq!(again[0].settle_lanes(3).await?, 3, "the lanes are apart");
    let windows = replay_windows(again.iter().map(TargetWriter::applied_positions));
    assert_eq!(windows.len(), 1, "{windows:?}");
    for w in again.iter_mut() {
        w.set_replay_windows(windows.clone());
    }
    let replayed = split(
        Segment {
            barrier: false,
            txns: txns(1000, lane_updates()),
        },
        3,
        &Default::default(),
        usize::MAX,
    );
    assert_eq!(replayed.len(), 1);
    again[0].commit_covering(&replayed[0], 3).await?;
    let notes = rows(
        &d,
        "SELECT note || ':' || count(*) FROM acme.orders GROUP BY note ORDER BY note",
    )
    .await?;
    assert_eq!(notes, ["c:30"]);
    let end = Lsn(1000 + lane_updates().len() as u64 - 1);
    let progress = switchyard::apply::progress::read_resume_progress(&d, "switchyard").await?;
    assert_eq!(
        progress[&seven].lsn, end,
        "every lane holds the replayed segment"
    );
    assert_eq!(again[0].settle_lanes(2).await?, 2, "the lanes agree again");
    Ok(())
}

/// A batch far larger than one set statement (8 MiB of values) or one pipelined window
/// (16 MiB) goes as several statements, in order, in one target transaction: the state is
/// exactly the batch's, and it was applied folded, not replayed change by change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_a_statement_goes_in_bounded_statements() -> Result<()> {
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let d = two.dst.client().await?;
    let mut w = replica_writer(&two).await?;
    let big = |id: i32, round: &str| format!("{round}{id}:{}", "x".repeat(1 << 20));
    // 40 inserts of 1 MiB values, then 40 updates of them, then deletes of every fifth.
    let inserts: Vec<Work> = (1..=40)
        .map(|id| ins(order(id, "new", Some(&big(id, "a")))))
        .collect();
    w.commit(&txns(10, inserts)).await?;
    let mut works: Vec<Work> = (1..=40)
        .map(|id| upd(order(id, "updated", Some(&big(id, "b")))))
        .collect();
    works.extend((5..=40).step_by(5).map(del));
    let stats = w.stats();
    assert_eq!(w.commit(&txns(100, works)).await?, CommitLsn::of(Lsn(147)));
    let after = w.stats();
    assert_eq!(after.compacted, stats.compacted + 1, "applied folded");
    assert_eq!(after.replayed, stats.replayed, "not replayed");
    let got = rows(
        &d,
        "SELECT concat_ws('|', id, note, left(big, 4), length(big)) FROM acme.orders ORDER BY id",
    )
    .await?;
    let want: Vec<String> = (1..=40)
        .filter(|id| id % 5 != 0)
        .map(|id| {
            let b = big(id, "b");
            format!("{id}|updated|{}|{}", &b[..4], b.len())
        })
        .collect();
    assert_eq!(got, want);
    Ok(())
}

/// A folded statement probes the key index once per key, however many keys it carries:
/// left to its cost model the planner reads the whole table instead once a statement holds
/// ~1 % of its keys (on 100,000 rows, 1,000 keys already took a hash join over all of them),
/// which would make a batch's cost grow with the table instead of with its changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folded_statements_probe_keys_instead_of_reading_the_whole_table() -> Result<()> {
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let d = two.dst.client().await?;
    d.batch_execute(
        "INSERT INTO acme.orders SELECT 7, g, 'old', 'b', 1, NULL FROM generate_series(1, 100000) g;
         ANALYZE acme.orders;",
    )
    .await?;
    let scans = || async {
        let r = d
            .query_one(
                "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables
                  WHERE schemaname = 'acme' AND relname = 'orders'",
                &[],
            )
            .await?;
        Ok::<_, anyhow::Error>((r.get::<_, i64>(0), r.get::<_, i64>(1)))
    };
    let (seq_before, idx_before) = scans().await?;
    let mut w = replica_writer(&two).await?;
    // 2,000 updates and 2,000 deletes of scattered keys: each kind one set statement.
    let mut works: Vec<Work> = (0..2000)
        .map(|i| upd(order(i * 37 % 50_000 + 1, "new", Some("b"))))
        .collect();
    works.extend((0..2000).map(|i| del(50_000 + i * 23 % 50_000 + 1)));
    assert_eq!(w.commit(&txns(10, works)).await?, CommitLsn::of(Lsn(4009)));
    assert_eq!(w.stats().compacted, 1, "applied folded");
    // A backend reports its table statistics when it exits.
    drop(w);
    let seq_after = wait_for(
        &format!("one index probe per key (idx_scan {idx_before} + 4000)"),
        Duration::from_secs(30),
        || async {
            let (seq, idx) = scans().await?;
            Ok((idx >= idx_before + 4000).then_some(seq))
        },
    )
    .await?;
    assert_eq!(seq_after, seq_before, "no statement read the whole table");
    let counts = rows(
        &d,
        "SELECT concat_ws('|', count(*), count(*) FILTER (WHERE note = 'new')) FROM acme.orders",
    )
    .await?;
    assert_eq!(counts, ["98000|2000"]);
    Ok(())
}
