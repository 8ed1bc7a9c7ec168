//! Backfill under a live stream on real clusters: a tenant's existing rows are copied in
//! watermark-bracketed chunks while a writer keeps inserting, updating (also rows with
//! unchanged TOAST values) and deleting; at the end the target equals the source for that
//! tenant. The pieces are wired here by hand; the `run` daemon will do the same.

use crate::support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use support::pipeline::TwoClusters;
use switchyard::apply::{self, CopyFormat, CopyRows, SourceTxn, TargetWriter, Work};
use switchyard::backfill::chunk::{ChunkTable, Mark, Watermark, EMIT_SQL, WATERMARK_PREFIX};
use switchyard::backfill::{KeyKind, RekeyPlan, TableCopy, Verdict};
use switchyard::config::Tenancy;
use switchyard::decode::{Datum, Message, RelationCache, Tuple};
use switchyard::route::{Destination, Router, RowOp};
use switchyard::source::SourceEvent;
use switchyard::sql::QualifiedName;
use switchyard::tenant::{TargetId, TenantId};

const SCHEMA: &str = "
CREATE TABLE public.orders (
  tenant_id int NOT NULL, id int NOT NULL, note text, big text, PRIMARY KEY (tenant_id, id));
ALTER TABLE public.orders ALTER COLUMN big SET STORAGE EXTERNAL;
INSERT INTO public.orders
  SELECT t, g, 'initial ' || g,
         CASE WHEN g % 10 = 0 THEN (SELECT string_agg(md5((g * 1000 + k)::text), '') FROM generate_series(1, 100) k) END
    FROM generate_series(7, 8) t, generate_series(1, 1500) g;
CREATE PUBLICATION sy_pub FOR TABLE public.orders;
GRANT SELECT ON public.orders TO switchyard;
SELECT pg_create_logical_replication_slot('sy', 'pgoutput');
";

const ROWS: &str = "SELECT concat_ws('|', tenant_id, id, note, md5(big)) FROM";

fn key_of(table: &ChunkTable, t: &Tuple) -> Option<switchyard::backfill::Key> {
    let texts: Vec<Option<&str>> =
        t.0.iter()
            .map(|d| match d {
                Datum::Text(b) => std::str::from_utf8(b).ok(),
                _ => None,
            })
            .collect();
    table.key_of(&texts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_copied_under_live_writes_and_converges() -> Result<()> {
    let two = TwoClusters::start(SCHEMA, &["public.orders"], "acme").await?;
    let (src, s, d) = (&two.src, two.src.client().await?, two.dst.client().await?);
    let tables = [QualifiedName::parse("public.orders")?];
    let mut stream = two.stream(true).await?;

    let tenant = TenantId::new("7")?;
    let mut router = Router::new(Tenancy::default());
    router.start(
        tenant.clone(),
        Destination {
            target: TargetId::new("shard2")?,
            schema: "acme".into(),
        },
    );
    let mut writer = TargetWriter::with_client(
        TargetId::new("shard2")?,
        two.dst.client().await?,
        "switchyard",
    )
    .await?;
    let target_name = QualifiedName::parse("acme.orders")?;
    let chunk_table = ChunkTable {
        source: tables[0].clone(),
        columns: vec!["tenant_id".into(), "id".into(), "note".into(), "big".into()],
        key: vec![(0, KeyKind::Int), (1, KeyKind::Int)],
        tenant: Some(("tenant_id".into(), "integer".into())),
    };
    let mut copy = TableCopy::new();

    // A writer for both tenants, running until the copy is done: inserts past and inside the
    // copied range, updates of note only (big arrives as unchanged TOAST), deletes.
    let stop = Arc::new(AtomicBool::new(false));
    let w_client = src.client().await?;
    let w_stop = stop.clone();
    let rounds = Arc::new(AtomicI64::new(0));
    let w_rounds = rounds.clone();
    let mut load = tokio::spawn(async move {
        let mut i: i64 = 0;
        while !w_stop.load(Ordering::Relaxed) {
            i += 1;
            let id = (i * 7919) % 1500 + 1;
            let sql = format!(
                "BEGIN;
                 UPDATE orders SET note = 'upd {i}' WHERE id = {id};
                 INSERT INTO orders VALUES (7, {new}, 'new {i}', NULL), (8, {new}, 'new {i}', NULL);
                 DELETE FROM orders WHERE id = {del};
                 UPDATE orders SET id = id + 100000 WHERE tenant_id = 7 AND id = {rekey};
                 UPDATE orders SET tenant_id = 7, id = id + 200000
                  WHERE tenant_id = 8 AND id = {arrive};
                 COMMIT;",
                new = 2000 + i,
                del = (i * 104_729) % 1500 + 1,
                rekey = (i * 6007) % 1500 + 1,
                arrive = (i * 3001) % 1500 + 1,
            );
            w_client.batch_execute(&sql).await?;
            w_rounds.store(i, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        Ok::<i64, anyhow::Error>(i)
    });

    let mut relations = RelationCache::new();
    let mut pending: Vec<Work> = Vec::new();
    let mut chunk_rows: Vec<Vec<Option<String>>> = Vec::new();
    let mut in_flight: Option<u64> = None;
    let mut writes: Option<i64> = None;
    let mut marker_seen = false;
    let mut skipped = 0usize;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "backfill did not converge in time"
        );
        // Drive the copy: one chunk at a time, bracketed by watermarks in the source WAL.
        if in_flight.is_none() && writes.is_none() {
            // Pace the copy by the writer: every chunk overlaps at least two of its
            // transactions, however fast the copy runs on this machine.
            let wanted = rounds.load(Ordering::Relaxed) + 2;
            let pace = Instant::now() + Duration::from_secs(30);
            while rounds.load(Ordering::Relaxed) < wanted {
                anyhow::ensure!(Instant::now() < pace, "the writer stalled");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if in_flight.is_none() {
            match copy.next_chunk(100) {
                Some((chunk, spec)) => {
                    let mark = |m| Watermark {
                        run: 1,
                        tenant: tenant.to_string(),
                        table: "public.orders".into(),
                        chunk,
                        mark: m,
                    };
                    s.execute(EMIT_SQL, &[&mark(Mark::Low).to_json()]).await?;
                    let (sql, params) = chunk_table.query(tenant.as_str(), &spec, CopyFormat::Text);
                    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        params.iter().map(|p| p as _).collect();
                    let types = vec![tokio_postgres::types::Type::TEXT; params.len()];
                    let st = s.prepare_typed(&sql, &types).await?;
                    let rows = s.query(&st, &params).await?;
                    chunk_rows = rows
                        .iter()
                        .map(|r| {
                            // The key columns come first, then the row.
                            let nk = chunk_table.key.len();
                            (nk..nk + 4)
                                .map(|i| r.get::<_, Option<String>>(i))
                                .collect()
                        })
                        .collect();
                    let keyed = chunk_rows
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            let texts: Vec<Option<&str>> = r.iter().map(|v| v.as_deref()).collect();
                            (
                                chunk_table
                                    .key_of(&texts)
                                    .expect("key columns are NOT NULL"),
                                i,
                            )
                        })
                        .collect();
                    copy.rows(chunk, keyed)?;
                    s.execute(EMIT_SQL, &[&mark(Mark::High).to_json()]).await?;
                    in_flight = Some(chunk);
                }
                None if writes.is_none() => {
                    // Copy caught up: stop the writer, then mark the end of its writes. Its
                    // last changes may still re-queue keys, so the loop goes on until the
                    // marker has been seen and the copy is done.
                    stop.store(true, Ordering::Relaxed);
                    writes = Some((&mut load).await??);
                    s.batch_execute("SELECT pg_logical_emit_message(false, 'test', 'done')")
                        .await?;
                }
                None => {}
            }
        }

        let ev = tokio::time::timeout(Duration::from_secs(60), stream.recv())
            .await
            .context("stream went quiet")??
            .context("stream ended")?;
        let SourceEvent::Message(r) = ev else {
            bail!("unexpected reconnect")
        };
        match &r.message {
            Message::Relation(rel) => {
                router.validate(rel)?;
                relations.apply(rel.clone());
            }
            Message::Begin(_) => pending.clear(),
            Message::Insert(_) | Message::Update(_) | Message::Delete(_) => {
                let Some((rel, routed)) = router.message(&relations, &r.message)?.pop() else {
                    continue;
                };
                let identity: Vec<bool> = rel.columns.iter().map(|c| c.is_key()).collect();
                for op in routed {
                    let apply_it = match &op.op {
                        RowOp::Upsert { new, update } => {
                            let key = key_of(&chunk_table, new).context("row without a key")?;
                            let copied = copy.change(&key) == Verdict::Apply;
                            let toast = new.0.iter().any(|d| matches!(d, Datum::UnchangedToast));
                            if copied && !update && toast {
                                // A row arriving from another tenant without its TOAST value:
                                // only a re-read can supply it.
                                copy.requeue(&key);
                                false
                            } else {
                                copied
                            }
                        }
                        RowOp::Delete { old } => {
                            let key = key_of(&chunk_table, old).context("row without a key")?;
                            copy.change(&key) == Verdict::Apply
                        }
                        RowOp::Rekey { old, new } => {
                            let o = key_of(&chunk_table, old).context("old key")?;
                            let n = key_of(&chunk_table, new).context("new key")?;
                            match copy.rekey(&o, &n) {
                                RekeyPlan::Update => true,
                                RekeyPlan::DeleteOld => {
                                    let table = writer
                                        .table(&target_name, &identity, Some("tenant_id"))
                                        .await?;
                                    pending.push(
                                        apply::build(
                                            &table,
                                            &RowOp::Delete { old },
                                            tenant.as_str(),
                                        )?
                                        .into(),
                                    );
                                    false
                                }
                                RekeyPlan::Skip => false,
                            }
                        }
                        RowOp::Truncate => bail!("this workload has no truncate"),
                    };
                    if !apply_it {
                        skipped += 1;
                        continue;
                    }
                    let table = writer
                        .table(&target_name, &identity, Some("tenant_id"))
                        .await?;
                    pending.push(apply::build(&table, &op.op, tenant.as_str())?.into());
                }
            }
            Message::Message(m) if m.prefix == WATERMARK_PREFIX => {
                let w = Watermark::parse(&m.prefix, &m.content).context("bad watermark")?;
                match w.mark {
                    Mark::Low => copy.low(w.chunk)?,
                    Mark::High => {
                        // The chunk's surviving rows go in with one COPY, at this point of
                        // the stream, in the same target transaction as the watermark's.
                        let rows: Vec<Vec<Option<String>>> = copy
                            .high(w.chunk)?
                            .into_iter()
                            .map(|i| chunk_rows[i].clone())
                            .collect();
                        pending.push(Work::Copy(CopyRows::from_text(
                            target_name.clone(),
                            chunk_table.columns.clone(),
                            &rows,
                        )));
                        in_flight = None;
                    }
                }
            }
            Message::Message(m) if m.prefix == "test" => {
                marker_seen = true;
                if copy.is_done() && in_flight.is_none() && pending.is_empty() {
                    break;
                }
            }
            Message::Commit(c) => {
                if !pending.is_empty() {
                    writer
                        .commit(&[SourceTxn {
                            end: c.end(),
                            parts: vec![(tenant.clone(), std::mem::take(&mut pending))],
                            states: Vec::new(),
                        }])
                        .await?;
                }
                stream.mark_applied(c.end());
                // Done once the writer's last change has been seen and every re-read of
                // what it touched has been committed.
                if marker_seen && copy.is_done() && in_flight.is_none() {
                    break;
                }
            }
            _ => {}
        }
    }
    let writes = writes.context("the writer was stopped")?;
    assert!(copy.is_done());
    assert!(
        writes > 20,
        "the writer should have run during the copy ({writes} rounds)"
    );
    assert!(
        skipped > 0,
        "some changes should have hit keys not yet copied"
    );

    let want: Vec<String> = s
        .query(
            &format!("{ROWS} public.orders WHERE tenant_id = 7 ORDER BY 1"),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let got: Vec<String> = d
        .query(&format!("{ROWS} acme.orders ORDER BY 1"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(want.len() > 1400, "{}", want.len());
    let diff: BTreeMap<&String, (bool, bool)> = want
        .iter()
        .map(|r| (r, (true, false)))
        .chain(got.iter().map(|r| (r, (false, true))))
        .fold(BTreeMap::new(), |mut m, (r, (a, b))| {
            let e = m.entry(r).or_insert((false, false));
            e.0 |= a;
            e.1 |= b;
            m
        })
        .into_iter()
        .filter(|(_, (a, b))| a != b)
        .collect();
    assert!(
        diff.is_empty(),
        "source/target differ on {} rows: {:?}",
        diff.len(),
        diff.iter().take(5).collect::<Vec<_>>()
    );
    stream.shutdown().await;
    Ok(())
}

/// A chunk late in a big tenant reads about its own rows' pages, not the index entries of
/// every key of the tenant before the cursor: with the tenant column both pinned by
/// equality and part of the cursor's row comparison, btree started at the tenant's first
/// key and filtered its way to the cursor, so a backfill read O(n²) index pages in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_reads_start_at_the_cursor_in_the_index() -> Result<()> {
    use tokio_postgres::types::{ToSql, Type};
    let src = support::PgCluster::start()?;
    src.psql(
        "CREATE TABLE public.orders (tenant_id int NOT NULL, id bigint NOT NULL, note text,
           PRIMARY KEY (tenant_id, id));
         INSERT INTO public.orders SELECT t, g, 'n' || g
           FROM generate_series(1, 3) t, generate_series(1, 20000) g;
         VACUUM ANALYZE public.orders;",
    )?;
    let c = src.client().await?;
    let table = ChunkTable {
        source: QualifiedName::parse("public.orders")?,
        columns: vec!["tenant_id".into(), "id".into(), "note".into()],
        key: vec![(0, KeyKind::Int), (1, KeyKind::Int)],
        tenant: Some(("tenant_id".into(), "integer".into())),
    };
    let spec = switchyard::backfill::ChunkSpec::Range {
        after: switchyard::backfill::Cursor::After(vec![
            switchyard::backfill::KeyValue::Int(2),
            switchyard::backfill::KeyValue::Int(19_900),
        ]),
        limit: 1_000,
    };
    // Shared buffers the statement touched (hit + read), from its plan's top node.
    async fn pages(
        c: &tokio_postgres::Client,
        sql: &str,
        params: &[Option<String>],
    ) -> Result<u64> {
        let explain = format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}");
        let st = c
            .prepare_typed(&explain, &vec![Type::TEXT; params.len()])
            .await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let lines: Vec<String> = c
            .query(&st, &params)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let buffers = lines
            .iter()
            .find_map(|l| l.trim().strip_prefix("Buffers: shared "))
            .with_context(|| format!("no buffer counts in {lines:?}"))?;
        Ok(buffers
            .split_whitespace()
            .filter_map(|kv| kv.split_once('=')?.1.parse::<u64>().ok())
            .sum())
    }

    // The parameterised form: the rows, in order, and the pages read for them.
    let (sql, params) = table.query("2", &spec, CopyFormat::Text);
    let st = c
        .prepare_typed(&sql, &vec![Type::TEXT; params.len()])
        .await?;
    let bound: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    let ids: Vec<String> = c
        .query(&st, &bound)
        .await?
        .iter()
        .map(|r| r.get::<_, String>(1))
        .collect();
    let want: Vec<String> = (19_901..=20_000).map(|i| i.to_string()).collect();
    assert_eq!(
        ids, want,
        "the chunk is the 100 keys after the cursor, in order"
    );
    // 100 rows live on 1–2 heap pages and 1–2 index leaves (plus the root); the 19,900
    // keys before the cursor span ~60 leaf pages.
    let read = pages(&c, &sql, &params).await?;
    assert!(
        read < 20,
        "the chunk touched {read} pages for 100 rows: the scan did not start at the cursor"
    );

    // The binary COPY form the daemon reads chunks with (its SELECT, values inlined).
    let copy = table.copy_query("2", &spec);
    let select = copy
        .strip_prefix("COPY (")
        .and_then(|s| s.strip_suffix(") TO STDOUT (FORMAT binary)"))
        .context("the COPY wraps one SELECT")?;
    let read = pages(&c, select, &[]).await?;
    assert!(
        read < 20,
        "the COPY chunk touched {read} pages for 100 rows"
    );
    Ok(())
}

/// A text key in a collation other than "C" gets no ordered index scan for chunk reads
/// (they compare keys bytewise): the move is told the index that fixes it, and once that
/// index exists the chunk reads are in index order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_keys_without_a_byte_order_index_get_the_fix() -> Result<()> {
    let src = support::PgCluster::start()?;
    let c = src.client().await?;
    let collation: Option<String> = c
        .query_opt(
            "SELECT collname FROM pg_collation
              WHERE collname NOT IN ('default', 'C', 'POSIX', 'ucs_basic')
                AND (collprovider = 'i' OR collcollate NOT IN ('C', 'POSIX'))
                AND collencoding IN (-1, pg_char_to_encoding('UTF8'))
              ORDER BY collprovider = 'c' DESC, collname LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let collation = collation.context("this server has no collation other than C")?;
    src.psql(&format!(
        "CREATE TABLE public.users (org int NOT NULL, email text COLLATE \"{collation}\" NOT NULL,
           note text, PRIMARY KEY (org, email));
         INSERT INTO public.users SELECT 1, 'user' || g || '@example.com', 'n'
           FROM generate_series(1, 30000) g;
         ANALYZE public.users;"
    ))?;
    let chunk = ChunkTable {
        source: QualifiedName::parse("public.users")?,
        columns: vec!["org".into(), "email".into(), "note".into()],
        key: vec![(0, KeyKind::Int), (1, KeyKind::Text)],
        tenant: Some(("org".into(), "integer".into())),
    };
    let fix = switchyard::layout::unordered_chunk_reads(&c, &chunk, "1", 5_000)
        .await?
        .context("the primary key cannot give byte order: a fix is due")?;
    assert_eq!(
        fix,
        "CREATE INDEX CONCURRENTLY ON \"public\".\"users\" (\"org\", \"email\" COLLATE \"C\");"
    );
    c.batch_execute(&fix).await?;
    c.batch_execute("ANALYZE public.users").await?;
    assert_eq!(
        switchyard::layout::unordered_chunk_reads(&c, &chunk, "1", 5_000).await?,
        None,
        "with the index, chunks are read in order"
    );
    // Integer keys are in order by their primary key: nothing to ask.
    let ints = ChunkTable {
        key: vec![(0, KeyKind::Int)],
        ..chunk
    };
    assert_eq!(
        switchyard::layout::unordered_chunk_reads(&c, &ints, "1", 5_000).await?,
        None
    );
    Ok(())
}
