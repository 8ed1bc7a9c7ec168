//! The daemon's own CPU per change, without PostgreSQL: the path a backlog takes through
//! switchyard between the replication socket and the target's sockets.
//!
//! ```text
//!   pgoutput bytes ─► decode ─► route ─► RowChange (shared shape) ─► SourceTxn
//!     ─► batch of 2,000 ─► lanes (4) ─► fold per lane ─► set statements ─► binary arrays
//! ```
//!
//! The stream is the move bench's backlog: transactions of one INSERT and two UPDATEs on the
//! 7-column `public.orders` of one moving tenant (the UPDATEs at spread keys, so nothing
//! folds away). Each iteration pushes `TXNS` transactions through every stage; the
//! throughput is in row changes. Missing from it, and measured only end to end by the move
//! bench: the engine's bookkeeping per transaction (backfill verdicts, held bytes,
//! checkpoints), tokio, and the socket reads and writes.
//!
//! The end-to-end bench cannot resolve a 10 % change in the daemon on a noisy 2-core host;
//! this one can, so per-change work is judged here first.
//!
//! Run: cargo bench --bench pipeline -- --warm-up-time 1 --measurement-time 3

use std::collections::HashSet;
use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use switchyard::apply::compaction::TableChanges;
use switchyard::apply::lanes;
use switchyard::apply::statement::{TargetColumn, TargetTable};
use switchyard::apply::writer::{OwnedRowOp, RowChange, RowShape, SourceTxn, Work};
use switchyard::config::Tenancy;
use switchyard::decode::encode::encode_into;
use switchyard::decode::{
    Begin, Column, Commit, Datum, Decoder, DecoderOptions, Insert, Message, Relation,
    RelationCache, RelationId, ReplicaIdentity, Tuple, Update,
};
use switchyard::lsn::Lsn;
use switchyard::route::{Destination, Router};
use switchyard::sql::QualifiedName;
use switchyard::tenant::{TargetId, TenantId};
use tokio_postgres::types::{ToSql, Type};

const ORDERS: RelationId = RelationId(16_421);
const TXNS: u64 = 2_000;
const ROWS: u64 = 1_000_000;

fn text(s: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn relation() -> Relation {
    let col = |name: &str, type_oid: u32, key: bool| Column {
        flags: u8::from(key),
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    Relation {
        xid: None,
        id: ORDERS,
        namespace: "public".into(),
        name: "orders".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("tenant_id", 23, true),
            col("id", 20, true),
            col("customer", 25, false),
            col("status", 25, false),
            col("amount", 1700, false),
            col("created", 1184, false),
            col("note", 25, false),
        ],
    }
}

fn target() -> TargetTable {
    let col = |name: &str, ty: &str, pk: bool| TargetColumn {
        name: name.into(),
        type_sql: ty.into(),
        primary_key: pk,
        identity: pk,
    };
    TargetTable {
        name: QualifiedName::parse("big.orders").unwrap(),
        columns: vec![
            col("tenant_id", "integer", true),
            col("id", "bigint", true),
            col("customer", "text", false),
            col("status", "text", false),
            col("amount", "numeric(12,2)", false),
            col("created", "timestamp with time zone", false),
            col("note", "text", false),
        ],
        tenant_column: Some("tenant_id".into()),
    }
}

fn row(id: u64, status: &str, note: Option<&str>) -> Tuple {
    Tuple(vec![
        text("1"),
        text(&id.to_string()),
        text(&format!("c{id}")),
        text(status),
        text(&format!("{}.50", id % 1000)),
        text("2026-11-28 01:40:00.123456+00"),
        note.map_or(Datum::Null, text),
    ])
}

/// The backlog's wire messages (Relation first), as slices of one buffer, the way they are
/// cut out of received CopyData frames.
fn backlog() -> Vec<Bytes> {
    let mut msgs = vec![Message::Relation(relation())];
    for i in 1..=TXNS {
        let lsn = Lsn(0x1_0000_0000 + i * 4096);
        msgs.push(Message::Begin(Begin {
            final_lsn: lsn,
            commit_time: 0,
            xid: i as u32,
        }));
        msgs.push(Message::Insert(Insert {
            xid: None,
            relation: ORDERS,
            new: row(10_000_000 + i, "new", None),
        }));
        for (step, status, note) in [(7919, "paid", None), (104_729, "open", Some("n1"))] {
            msgs.push(Message::Update(Update {
                xid: None,
                relation: ORDERS,
                old: None,
                new: row(i * step % ROWS + 1, status, note),
            }));
        }
        msgs.push(Message::Commit(Commit {
            flags: 0,
            commit_lsn: lsn,
            end_lsn: Lsn(lsn.0 + 64),
            commit_time: 0,
        }));
    }
    let opts = DecoderOptions::default();
    let mut buf = BytesMut::new();
    let mut bounds = Vec::with_capacity(msgs.len());
    for m in &msgs {
        let start = buf.len();
        encode_into(m, opts, &mut buf);
        bounds.push(start..buf.len());
    }
    let buf = buf.freeze();
    bounds.into_iter().map(|r| buf.slice(r)).collect()
}

/// Every stage once over `input`; returns the bytes of parameters encoded (so nothing is
/// optimised away, and a run that lost changes shows in the count).
fn run(input: &[Bytes], layout: &std::sync::Arc<TargetTable>) -> (u64, usize) {
    let mut decoder = Decoder::new(DecoderOptions::default());
    let mut relations = RelationCache::new();
    let mut router = Router::new(Tenancy::default());
    let tenant = TenantId::new("1").expect("valid tenant");
    router.start(
        tenant.clone(),
        Destination {
            target: TargetId::new("shard2").expect("valid target"),
            schema: "big".into(),
        },
    );
    let mut shape = None;
    let mut batch: Vec<SourceTxn> = Vec::with_capacity(TXNS as usize);
    let mut open: Vec<Work> = Vec::new();
    let mut changes = 0u64;
    for m in input {
        match decoder.decode(m.clone()).expect("valid stream") {
            Message::Relation(rel) => {
                relations.apply(rel);
            }
            Message::Begin(_) => open.clear(),
            Message::Commit(c) => batch.push(SourceTxn {
                end: c.end(),
                parts: vec![(tenant.clone(), std::mem::take(&mut open))],
                states: Vec::new(),
            }),
            msg => {
                for (rel, routed) in router.message(&relations, &msg).expect("routable") {
                    let shape = shape.get_or_insert_with(|| {
                        std::sync::Arc::new(RowShape {
                            table: QualifiedName::parse("big.orders").unwrap(),
                            identity: rel.columns.iter().map(Column::is_key).collect(),
                            tenant_column: Some("tenant_id".into()),
                        })
                    });
                    for r in routed {
                        changes += 1;
                        open.push(Work::Row(RowChange {
                            shape: std::sync::Arc::clone(shape),
                            op: OwnedRowOp::from_op(&r.op),
                        }));
                    }
                }
            }
        }
    }
    let mut encoded = 0;
    let mut out = BytesMut::new();
    for segment in lanes::segments(batch) {
        for share in lanes::split(segment, 4, &HashSet::new(), lanes::SPREAD_MIN) {
            let mut fold = TableChanges::new(std::sync::Arc::clone(layout)).expect("foldable");
            for txn in &share {
                for (_, works) in &txn.parts {
                    for w in works {
                        let Work::Row(r) = w else { continue };
                        fold.add(&r.op.as_op()).expect("folds");
                    }
                }
            }
            for st in fold.take_statements().expect("statements") {
                for array in &st.columns {
                    out.clear();
                    array.to_sql(&Type::TEXT_ARRAY, &mut out).expect("encodes");
                    encoded += out.len();
                }
            }
        }
    }
    (changes, encoded)
}

fn bench_pipeline(c: &mut Criterion) {
    let input = backlog();
    let layout = std::sync::Arc::new(target());
    let (changes, encoded) = run(&input, &layout);
    assert_eq!(changes, TXNS * 3, "every change of the backlog is routed");
    eprintln!(
        "backlog: {TXNS} transactions, {changes} changes, {encoded} bytes of array parameters"
    );
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(changes));
    group.bench_function("backlog_decode_route_lanes_fold_encode", |b| {
        b.iter(|| black_box(run(&input, &layout)))
    });
    group.finish();
}

criterion_group!(benches, bench_pipeline);
criterion_main!(benches);
