//! Parallel apply lanes: one target's batch split over several connections.
//!
//! ```text
//!   batch ─► segments:  [rows rows rows] [copy+state] [rows rows] …   (in source order)
//!   a row segment of SPREAD_MIN changes or more, per table:
//!       more than a lane's fair share of the segment ─► lane = hash(table, key) % lanes
//!       else (or a table that must stay whole)      ─► the whole table to one lane,
//!                                                      largest first to the least loaded
//!       (every lane commits its share at once)
//!   a barrier, or a smaller row segment
//!                ─► lane 0 alone, recording every lane's position in its one commit
//! ```
//!
//! Invariants:
//! - Inside a segment every change to one row (one key of one table) goes to the same lane,
//!   in source order, so each key's history is applied as the source wrote it. Segments run
//!   one after another (every lane commits a segment before any starts the next), so a key
//!   may change lanes between segments. Where a segment's changes went is a function of the
//!   segment alone (FNV-1a, not the process's random hasher, and ties broken by name).
//! - A table whose changes fit a lane's fair share goes whole to one lane: the fold then
//!   makes one statement per table and kind, where spreading a table's three rows over
//!   three lanes costs three statements (many tenants' small tables at once are the common
//!   case). A table with more spreads by key so that one hot table does not keep one lane
//!   busy while the others wait.
//! - Tables whose rows could conflict across keys (a unique or exclusion index besides the
//!   primary key) go whole to one lane, so no lane sees a unique value before another lane
//!   has removed it.
//! - Anything not a plain row change of a stable key (COPY chunks, backfill states,
//!   TRUNCATE, key changes, prepared statements) is a barrier: it runs on lane 0 after every
//!   lane committed what came before it, and before any lane goes on.
//! - A segment on lane 0 alone records its tenants' positions for every lane in lane 0's
//!   commit. That is true of every lane: segments run one after another, so every lane
//!   committed all before it, and lane 0 commits all of it. A small row segment is not
//!   worth a commit per lane: a trickle of one-transaction segments (a saturated source's
//!   steady stream) would cost each source transaction one durable commit per lane.
//! - A spread segment gives every lane's share every tenant of the segment at the tenant's
//!   last position in it, even with no work for it, so all lanes record the same positions
//!   after it commits everywhere. Only a crash in the middle of a spread segment leaves them
//!   apart, and the lowest one is where a tenant resumes. How a replay cuts and places the
//!   same transactions may differ (it depends on how the stream was batched): the replay
//!   window of [`super::TargetWriter::set_replay_windows`] covers that.
//!
//! Order across lanes is not kept, which is why lanes are used only under
//! `session_replication_role = replica`, where no trigger or foreign key observes it.

use std::collections::{HashMap, HashSet};

use super::writer::{OwnedRowOp, RowChange, SourceTxn, Work};
use crate::decode::Datum;
use crate::lsn::{CommitLsn, Lsn};
use crate::sql::QualifiedName;
use crate::tenant::TenantId;

/// Whether `txn` must run alone on lane 0.
pub fn is_barrier(txn: &SourceTxn) -> bool {
    !txn.states.is_empty()
        || txn.parts.iter().flat_map(|(_, w)| w).any(|w| match w {
            Work::Row(r) => matches!(r.op, OwnedRowOp::Rekey { .. } | OwnedRowOp::Truncate),
            Work::Statement(_) | Work::Copy(_) => true,
        })
}

/// A run of consecutive transactions of a batch.
#[derive(Debug)]
pub struct Segment {
    pub barrier: bool,
    pub txns: Vec<SourceTxn>,
}

/// Cuts `batch` into maximal runs of row-only transactions and of barrier transactions,
/// keeping the order.
pub fn segments(batch: Vec<SourceTxn>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for txn in batch {
        let barrier = is_barrier(&txn);
        match out.last_mut() {
            Some(s) if s.barrier == barrier => s.txns.push(txn),
            _ => out.push(Segment {
                barrier,
                txns: vec![txn],
            }),
        }
    }
    out
}

/// FNV-1a, 64 bit: stable across processes and versions (the lane of a key must not change
/// between a crash and the replay).
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// A field with its length first, so ("ab","c") and ("a","bc") differ.
    fn field(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u32).to_le_bytes());
        self.write(bytes);
    }
}

fn table_hash(table: &QualifiedName) -> Fnv {
    let mut h = Fnv::new();
    h.field(table.schema.as_bytes());
    h.field(table.name.as_bytes());
    h
}

/// Where a spread segment's changes go, per table: `Some(lane)` for a table that goes whole
/// to one lane, `None` for one spread by key (see the module's invariants).
fn placement(
    segment: &Segment,
    lanes: usize,
    whole_table: &HashSet<QualifiedName>,
) -> HashMap<QualifiedName, Option<usize>> {
    let mut counts: HashMap<&QualifiedName, usize> = HashMap::new();
    for w in segment
        .txns
        .iter()
        .flat_map(|t| &t.parts)
        .flat_map(|(_, w)| w)
    {
        if let Work::Row(r) = w {
            *counts.entry(r.table()).or_default() += 1;
        }
    }
    let fair = counts.values().sum::<usize>().div_ceil(lanes);
    let mut load = vec![0usize; lanes];
    let mut out = HashMap::with_capacity(counts.len());
    let mut whole: Vec<(&QualifiedName, usize)> = Vec::new();
    for (table, n) in counts {
        if n > fair && !whole_table.contains(table) {
            for l in load.iter_mut() {
                *l += n / lanes;
            }
            out.insert(table.clone(), None);
        } else {
            whole.push((table, n));
        }
    }
    whole.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    for (table, n) in whole {
        let lane = (0..lanes).min_by_key(|&l| (load[l], l)).unwrap_or(0);
        load[lane] += n;
        out.insert(table.clone(), Some(lane));
    }
    out
}

/// The lane of a row change, by its table and replica-identity key; `None` for operations
/// that are barriers.
pub fn row_lane(change: &RowChange, lanes: usize) -> Option<usize> {
    let tuple = match &change.op {
        OwnedRowOp::Upsert { new, .. } => new,
        OwnedRowOp::Delete { old } => old,
        OwnedRowOp::Rekey { .. } | OwnedRowOp::Truncate => return None,
    };
    let mut h = table_hash(&change.shape.table);
    for (datum, key) in tuple.0.iter().zip(&change.shape.identity) {
        if !key {
            continue;
        }
        match datum {
            Datum::Text(b) => h.field(b),
            Datum::Binary(b) => {
                h.write(b"b");
                h.field(b)
            }
            Datum::Null => h.write(b"n"),
            Datum::UnchangedToast => h.write(b"u"),
        }
    }
    Some((h.0 % lanes.max(1) as u64) as usize)
}

/// The fewest row changes a segment spreads over the lanes with. Below it lane 0 commits
/// the segment alone: one durable commit instead of one per lane, where the lanes would
/// each hold a handful of statements. A backlog's or a busy stream's batches are far above
/// it and spread.
pub const SPREAD_MIN: usize = 64;

/// Row changes in `segment`.
fn changes(segment: &Segment) -> usize {
    segment
        .txns
        .iter()
        .flat_map(|t| &t.parts)
        .map(|(_, w)| w.len())
        .sum()
}

/// Splits a segment over `lanes` lanes. A barrier segment, or one of fewer than
/// `spread_min` changes, goes whole to lane 0: the result is then that one share, and
/// lane 0's commit records every lane's position. In a row segment each change goes to its
/// table's lane, or its key's lane for a table spread by key (never one `whole_table`
/// names; see [`placement`]), inside a copy of
/// its transaction that holds only that lane's changes (a transaction with none for a lane
/// is left out of that lane's share). Every lane's share then ends with one empty
/// transaction per tenant of the segment, at that tenant's last position in it, so every
/// lane records every tenant's position.
pub fn split(
    segment: Segment,
    lanes: usize,
    whole_table: &HashSet<QualifiedName>,
    spread_min: usize,
) -> Vec<Vec<SourceTxn>> {
    let lanes = lanes.max(1);
    if segment.barrier || lanes == 1 || changes(&segment) < spread_min {
        return vec![segment.txns];
    }
    let place = placement(&segment, lanes, whole_table);
    let mut out: Vec<Vec<SourceTxn>> = (0..lanes)
        .map(|_| Vec::with_capacity(segment.txns.len() / lanes + 1))
        .collect();
    // Each tenant's last position in the segment, in the order tenants first appear.
    let mut last: Vec<(TenantId, CommitLsn)> = Vec::new();
    let mut seen: HashMap<TenantId, usize, foldhash::fast::RandomState> = HashMap::default();
    let mut shares: Vec<Option<SourceTxn>> = (0..lanes).map(|_| None).collect();
    for txn in segment.txns {
        for (tenant, works) in txn.parts {
            match seen.get(&tenant) {
                Some(&at) => last[at].1 = txn.end,
                None => {
                    seen.insert(tenant.clone(), last.len());
                    last.push((tenant.clone(), txn.end));
                }
            }
            for w in works {
                let lane = match &w {
                    Work::Row(r) => match place.get(r.table()) {
                        Some(Some(lane)) => *lane,
                        _ => row_lane(r, lanes).unwrap_or(0),
                    },
                    // Not in a row segment (see is_barrier); lane 0 keeps it safe anyway.
                    _ => 0,
                };
                let share = shares[lane].get_or_insert_with(|| SourceTxn {
                    end: txn.end,
                    parts: Vec::with_capacity(1),
                    states: Vec::new(),
                });
                match share.parts.last_mut() {
                    Some((t, ws)) if *t == tenant => ws.push(w),
                    _ => share.parts.push((tenant.clone(), vec![w])),
                }
            }
        }
        for (lane, share) in shares.iter_mut().enumerate() {
            if let Some(share) = share.take() {
                out[lane].push(share);
            }
        }
    }
    // Positions only: a tenant's entry comes after all of its changes on every lane, and
    // in increasing order, as the lanes' own transactions are.
    last.sort_by_key(|(_, end)| *end);
    for (tenant, end) in last {
        for share in out.iter_mut() {
            share.push(SourceTxn {
                end,
                parts: vec![(tenant.clone(), Vec::new())],
                states: Vec::new(),
            });
        }
    }
    out
}

/// Per tenant, (lowest, highest) position over the lanes where they differ; a lane without
/// a row for the tenant holds nothing of it.
pub fn replay_windows<'a>(
    lanes: impl Iterator<Item = &'a HashMap<TenantId, Lsn>>,
) -> HashMap<TenantId, (Lsn, Lsn)> {
    let lanes: Vec<&HashMap<TenantId, Lsn>> = lanes.collect();
    let tenants: HashSet<&TenantId> = lanes.iter().flat_map(|l| l.keys()).collect();
    tenants
        .into_iter()
        .filter_map(|t| {
            let at = |l: &&HashMap<TenantId, Lsn>| l.get(t).copied().unwrap_or(Lsn::INVALID);
            let lo = lanes.iter().map(at).min()?;
            let hi = lanes.iter().map(at).max()?;
            (lo < hi).then(|| (t.clone(), (lo, hi)))
        })
        .collect()
}

/// One row change per table of a segment (to learn which tables must go whole to one
/// lane), skipping tables already known.
pub fn tables<'a>(
    segment: &'a Segment,
    known: &dyn Fn(&QualifiedName) -> bool,
) -> Vec<&'a RowChange> {
    let mut seen = HashSet::new();
    segment
        .txns
        .iter()
        .flat_map(|t| &t.parts)
        .flat_map(|(_, w)| w)
        .filter_map(|w| match w {
            Work::Row(r) if !known(r.table()) && seen.insert(r.table()) => Some(r),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::copy::CopyRows;
    use crate::decode::Tuple;
    use crate::lsn::{CommitLsn, Lsn};
    use crate::tenant::TenantId;
    use bytes::Bytes;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn orders() -> QualifiedName {
        QualifiedName::new("acme", "orders").unwrap()
    }

    fn tuple(vals: &[&str]) -> Tuple {
        Tuple(
            vals.iter()
                .map(|v| Datum::Text(Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
        )
    }

    fn upsert(table: QualifiedName, id: &str, note: &str) -> Work {
        Work::Row(RowChange::new(
            table,
            vec![true, false],
            None,
            OwnedRowOp::Upsert {
                new: tuple(&[id, note]),
                update: true,
            },
        ))
    }

    fn delete(id: &str) -> Work {
        Work::Row(RowChange::new(
            orders(),
            vec![true, false],
            None,
            OwnedRowOp::Delete {
                old: Tuple(vec![
                    Datum::Text(Bytes::copy_from_slice(id.as_bytes())),
                    Datum::Null,
                ]),
            },
        ))
    }

    fn txn(end: u64, parts: Vec<(&str, Vec<Work>)>) -> SourceTxn {
        SourceTxn {
            end: CommitLsn::of(Lsn(end)),
            parts: parts.into_iter().map(|(t2, w)| (t(t2), w)).collect(),
            states: Vec::new(),
        }
    }

    fn copy() -> Work {
        Work::Copy(CopyRows::from_text(
            orders(),
            vec!["id".into()],
            &[vec![Some("1".into())]],
        ))
    }

    fn key_of(w: &Work) -> String {
        match w {
            Work::Row(r) => match &r.op {
                OwnedRowOp::Upsert { new: tup, .. } | OwnedRowOp::Delete { old: tup } => {
                    match &tup.0[0] {
                        Datum::Text(b) => String::from_utf8(b.to_vec()).unwrap(),
                        _ => unreachable!(),
                    }
                }
                _ => unreachable!(),
            },
            _ => "copy".into(),
        }
    }

    #[test]
    fn barriers_and_row_transactions_form_ordered_segments() {
        let mut with_state = txn(30, vec![("acme", vec![])]);
        with_state.states.push((t("acme"), "s".into()));
        let batch = vec![
            txn(10, vec![("acme", vec![upsert(orders(), "1", "a")])]),
            txn(20, vec![("acme", vec![upsert(orders(), "2", "a")])]),
            with_state,
            txn(40, vec![("acme", vec![copy()])]),
            txn(50, vec![("acme", vec![delete("1")])]),
        ];
        let segs = segments(batch);
        let shape: Vec<(bool, Vec<u64>)> = segs
            .iter()
            .map(|s| (s.barrier, s.txns.iter().map(|t| t.end.lsn().0).collect()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (false, vec![10, 20]),
                (true, vec![30, 40]),
                (false, vec![50])
            ]
        );
        let truncate = Work::Row(RowChange::new(
            orders(),
            vec![true],
            None,
            OwnedRowOp::Truncate,
        ));
        assert!(is_barrier(&txn(1, vec![("acme", vec![truncate])])));
        assert!(!is_barrier(&txn(1, vec![("acme", vec![delete("3")])])));
    }

    #[test]
    fn inside_a_segment_a_key_stays_on_one_lane_in_order() {
        let mut txns = Vec::new();
        for i in 0..200u64 {
            let id = (i % 37).to_string();
            let w = if i % 5 == 0 {
                delete(&id)
            } else {
                upsert(orders(), &id, &i.to_string())
            };
            txns.push(txn(i + 1, vec![("acme", vec![w])]));
        }
        let original: Vec<(u64, String)> = txns
            .iter()
            .map(|t| (t.end.lsn().0, key_of(&t.parts[0].1[0])))
            .collect();
        let lanes = split(
            Segment {
                barrier: false,
                txns,
            },
            4,
            &HashSet::new(),
            SPREAD_MIN,
        );
        assert_eq!(lanes.len(), 4);
        let mut seen_lane = std::collections::HashMap::new();
        let mut total = 0;
        let mut carried = 0;
        for (lane, share) in lanes.iter().enumerate() {
            // Every lane ends with the tenant's last position, so every lane records it.
            let (marker, changes) = share.split_last().expect("a position entry");
            assert_eq!(marker.end, CommitLsn::of(Lsn(200)));
            assert_eq!(marker.parts.len(), 1);
            assert!(marker.parts[0].1.is_empty());
            // A transaction reaches only the lanes that have some of its changes.
            assert!(changes
                .iter()
                .all(|t| t.parts.len() == 1 && !t.parts[0].1.is_empty()));
            carried += changes.len();
            let mut last_end = 0;
            for t2 in changes {
                assert!(t2.end.lsn().0 > last_end, "order kept inside a lane");
                last_end = t2.end.lsn().0;
                for w in &t2.parts[0].1 {
                    total += 1;
                    let prev = seen_lane.insert(key_of(w), lane);
                    assert!(prev.is_none_or(|p| p == lane), "key {} split", key_of(w));
                }
            }
        }
        assert_eq!(
            carried, 200,
            "each one-change transaction on exactly one lane"
        );
        assert_eq!(total, original.len(), "nothing lost or duplicated");
        // 37 keys over 4 lanes: more than one lane is used.
        let used: HashSet<usize> = seen_lane.values().copied().collect();
        assert!(used.len() > 1, "{used:?}");
    }

    #[test]
    fn lanes_are_stable_and_depend_on_table_and_key() {
        let r = |table: QualifiedName, id: &str| match upsert(table, id, "x") {
            Work::Row(r) => r,
            _ => unreachable!(),
        };
        let other = QualifiedName::new("acme", "items").unwrap();
        // The same lanes in every process: a replay batched as the first run was cuts and
        // places its changes as the first run did.
        let got: Vec<usize> = (0..8)
            .map(|i| row_lane(&r(orders(), &i.to_string()), 8).unwrap())
            .collect();
        let again: Vec<usize> = (0..8)
            .map(|i| row_lane(&r(orders(), &i.to_string()), 8).unwrap())
            .collect();
        assert_eq!(got, again);
        let elsewhere: Vec<usize> = (0..8)
            .map(|i| row_lane(&r(other.clone(), &i.to_string()), 8).unwrap())
            .collect();
        assert_ne!(got, elsewhere);
        // The non-key column does not matter.
        let a = row_lane(&r(orders(), "7"), 8);
        let b = match upsert(orders(), "7", "something else") {
            Work::Row(r) => row_lane(&r, 8),
            _ => unreachable!(),
        };
        assert_eq!(a, b);
        let mut h = Fnv::new();
        h.write(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c, "FNV-1a test vector");
    }

    #[test]
    fn every_lane_records_each_tenants_last_position_in_the_segment() {
        let batch = vec![
            txn(
                10,
                vec![
                    ("acme", vec![upsert(orders(), "1", "a")]),
                    ("globex", vec![upsert(orders(), "1", "a"), delete("2")]),
                ],
            ),
            txn(20, vec![("initech", vec![])]),
            txn(30, vec![("acme", vec![upsert(orders(), "3", "b")])]),
        ];
        let lanes = split(
            Segment {
                barrier: false,
                txns: batch,
            },
            3,
            &HashSet::new(),
            0,
        );
        let mut works = 0;
        for share in &lanes {
            let n = share.len();
            assert!(n >= 3);
            // Positions last, in increasing order: globex at 10, initech at 20, acme at 30.
            let marks: Vec<(u64, &str, usize)> = share[n - 3..]
                .iter()
                .map(|t2| (t2.end.lsn().0, t2.parts[0].0.as_str(), t2.parts[0].1.len()))
                .collect();
            assert_eq!(
                marks,
                vec![(10, "globex", 0), (20, "initech", 0), (30, "acme", 0)]
            );
            for t2 in &share[..n - 3] {
                assert!(t2.parts.iter().all(|(_, w)| !w.is_empty()));
                works += t2.parts.iter().map(|(_, w)| w.len()).sum::<usize>();
            }
        }
        assert_eq!(works, 4, "every change on exactly one lane");
    }

    #[test]
    fn whole_tables_stay_on_one_lane() {
        let mut txns = Vec::new();
        for i in 0..50u64 {
            txns.push(txn(
                i + 1,
                vec![("acme", vec![upsert(orders(), &i.to_string(), "x")])],
            ));
        }
        let whole: HashSet<QualifiedName> = [orders()].into_iter().collect();
        let lanes = split(
            Segment {
                barrier: false,
                txns,
            },
            3,
            &whole,
            0,
        );
        let busy: Vec<usize> = lanes
            .iter()
            .map(|s| s.iter().map(|t| t.parts[0].1.len()).sum())
            .collect();
        assert_eq!(busy, vec![50, 0, 0], "{busy:?}");
    }

    #[test]
    fn small_tables_go_whole_to_the_least_loaded_lane_and_a_big_one_spreads() {
        // 40 changes of orders, then 10 tables of 4 changes each (tenants' small tables).
        let mut txns = Vec::new();
        for i in 0..40u64 {
            txns.push(txn(
                i + 1,
                vec![("acme", vec![upsert(orders(), &i.to_string(), "x")])],
            ));
        }
        let small = |n: usize| QualifiedName::new(format!("t{n}"), "items").unwrap();
        for n in 0..10 {
            let works = (0..4)
                .map(|k| upsert(small(n), &k.to_string(), "y"))
                .collect();
            txns.push(txn(100 + n as u64, vec![("acme", works)]));
        }
        let lanes = split(
            Segment {
                barrier: false,
                txns,
            },
            4,
            &HashSet::new(),
            0,
        );
        let mut lanes_of: HashMap<QualifiedName, HashSet<usize>> = HashMap::new();
        let mut load = vec![0; 4];
        for (lane, share) in lanes.iter().enumerate() {
            for w in share.iter().flat_map(|t| &t.parts).flat_map(|(_, w)| w) {
                if let Work::Row(r) = w {
                    lanes_of.entry(r.table().clone()).or_default().insert(lane);
                    load[lane] += 1;
                }
            }
        }
        // 80 changes, a fair share of 20: orders (40) spreads by key over several lanes;
        // each small table goes whole to one lane, and the lanes end up about even.
        assert!(lanes_of[&orders()].len() > 1, "{lanes_of:?}");
        for n in 0..10 {
            assert_eq!(lanes_of[&small(n)].len(), 1, "t{n} split: {lanes_of:?}");
        }
        let (lo, hi) = (load.iter().min().unwrap(), load.iter().max().unwrap());
        assert!(hi - lo <= 8, "{load:?}");
        assert_eq!(load.iter().sum::<usize>(), 80);
    }

    #[test]
    fn barriers_and_small_segments_run_whole_on_lane_zero() {
        let mut b = txn(
            10,
            vec![("acme", vec![copy()]), ("globex", vec![delete("1")])],
        );
        b.states.push((t("initech"), "state".into()));
        let lanes = split(
            Segment {
                barrier: true,
                txns: vec![b],
            },
            3,
            &HashSet::new(),
            0,
        );
        assert_eq!(lanes.len(), 1, "lane 0 alone records every lane's position");
        assert_eq!(lanes[0][0].parts.len(), 2);
        assert_eq!(lanes[0][0].states.len(), 1);

        // A row segment spreads from `spread_min` changes on, and not below.
        let rows = |n: u64| Segment {
            barrier: false,
            txns: (0..n)
                .map(|i| {
                    txn(
                        i + 1,
                        vec![("acme", vec![upsert(orders(), &i.to_string(), "x")])],
                    )
                })
                .collect(),
        };
        let small = split(rows(9), 3, &HashSet::new(), 10);
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].len(), 9, "the transactions as they came");
        let spread = split(rows(10), 3, &HashSet::new(), 10);
        assert_eq!(spread.len(), 3);
    }

    #[test]
    fn windows_cover_only_tenants_whose_lanes_stopped_apart() {
        let lane = |pairs: &[(&str, u64)]| -> HashMap<TenantId, Lsn> {
            pairs.iter().map(|(k, v)| (t(k), Lsn(*v))).collect()
        };
        let lanes = [
            lane(&[("a", 200), ("b", 90), ("c", 50)]),
            lane(&[("a", 100), ("b", 90), ("c", 50)]),
            lane(&[("a", 200), ("b", 90)]),
        ];
        let w = replay_windows(lanes.iter());
        assert_eq!(w.get(&t("a")), Some(&(Lsn(100), Lsn(200))));
        assert_eq!(w.get(&t("b")), None, "agreeing lanes need no replay");
        // A lane without a row holds nothing of the tenant.
        assert_eq!(w.get(&t("c")), Some(&(Lsn::INVALID, Lsn(50))));
        assert_eq!(w.len(), 2);
        assert!(replay_windows(std::iter::empty()).is_empty());
    }
}
