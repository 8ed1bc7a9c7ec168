//! Decoder throughput on a realistic change stream.
//!
//! The stream is one large transaction on an orders-like table (9 text columns: ids, a
//! status, a numeric total, a currency, two timestamps, a SKU and a ~100-byte note):
//! Begin, a mix of Insert / Update (some with a changed key) / Delete, Commit. Messages are
//! slices of one shared buffer, as they are when cut out of received CopyData frames, so
//! every value slice costs what it costs in production (a reference-count increment).
//!
//! Target: at least 3M change messages per second per core.
//!
//! Run: cargo bench --bench decode -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use switchyard::decode::encode::encode_into;
use switchyard::decode::{
    Begin, Commit, Datum, Decoder, DecoderOptions, Delete, Insert, Message, OldTuple, RelationId,
    Tuple, Update,
};
use switchyard::lsn::Lsn;

const ORDERS: RelationId = RelationId(16_421);
const CHANGES: u64 = 10_000;

fn text(s: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn order_row(id: u64) -> Tuple {
    let note = format!(
        "Leave at the side door if nobody answers; call {:010} first. Fragile: glassware, order {id:08}",
        id * 7919 % 10_000_000_000
    );
    Tuple(vec![
        text(&id.to_string()),
        text(&(id % 9_973 + 100_000).to_string()),
        text(["pending", "paid", "shipped", "delivered"][(id % 4) as usize]),
        text(&format!("{}.{:02}", id % 100_000, id % 100)),
        text("EUR"),
        text("2024-05-01 12:34:56.123456+00"),
        text("2024-05-02 08:00:01.5+00"),
        text(&format!("SKU-{:06}-XL", id % 1_000_000)),
        text(&note),
    ])
}

fn key(id: u64) -> Tuple {
    let mut t = vec![Datum::Null; 9];
    t[0] = text(&id.to_string());
    Tuple(t)
}

/// Begin, `CHANGES` row messages, Commit: 60% inserts, 30% updates (1 in 10 of them
/// changes the key and so carries 'K'), 10% deletes ('K').
fn orders_stream(insert_only: bool) -> Vec<Message> {
    let mut msgs = vec![Message::Begin(Begin {
        final_lsn: Lsn(0x16_B374_D848),
        commit_time: 768_000_000_000_000,
        xid: 90_210,
    })];
    for i in 0..CHANGES {
        let id = 1_000_000 + i;
        let msg = match if insert_only { 0 } else { i % 10 } {
            0..=5 => Message::Insert(Insert {
                xid: None,
                relation: ORDERS,
                new: order_row(id),
            }),
            6..=8 => Message::Update(Update {
                xid: None,
                relation: ORDERS,
                old: (i % 30 == 6).then(|| OldTuple::Key(key(id - 1))),
                new: order_row(id),
            }),
            _ => Message::Delete(Delete {
                xid: None,
                relation: ORDERS,
                old: OldTuple::Key(key(id)),
            }),
        };
        msgs.push(msg);
    }
    msgs.push(Message::Commit(Commit {
        flags: 0,
        commit_lsn: Lsn(0x16_B374_D848),
        end_lsn: Lsn(0x16_B374_D878),
        commit_time: 768_000_000_000_000,
    }));
    msgs
}

/// Encodes into one buffer and hands out slices of it.
fn wire(msgs: &[Message], opts: DecoderOptions) -> Vec<Bytes> {
    let mut buf = BytesMut::new();
    let mut bounds = Vec::with_capacity(msgs.len());
    for m in msgs {
        let start = buf.len();
        encode_into(m, opts, &mut buf);
        bounds.push(start..buf.len());
    }
    let buf = buf.freeze();
    bounds.into_iter().map(|r| buf.slice(r)).collect()
}

fn bench_decode(c: &mut Criterion) {
    let opts = DecoderOptions::default();
    let mut group = c.benchmark_group("decode");
    for (name, insert_only) in [("orders_mixed", false), ("orders_insert_only", true)] {
        let input = wire(&orders_stream(insert_only), opts);
        let bytes: usize = input.iter().map(Bytes::len).sum();
        eprintln!(
            "{name}: {} messages, {} bytes, {:.0} bytes/message",
            input.len(),
            bytes,
            bytes as f64 / input.len() as f64
        );
        group.throughput(Throughput::Elements(input.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut decoder = Decoder::new(opts);
                for m in &input {
                    let msg = decoder.decode(m.clone()).expect("valid stream");
                    black_box(msg);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
