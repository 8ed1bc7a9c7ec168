//! One table of a moving tenant under backfill: its copy (the [`TableCopy`] state machine),
//! the chunk in flight with its rows, the chunk read ahead, and the verdict on every stream
//! change of the table.
//!
//! Invariants:
//! - A chunk's rows are inserted only at its own high watermark, and only when its low
//!   watermark committed in this run after every transaction still running in the chunk's
//!   snapshot; otherwise the range is read again ([`High::Raced`]).
//! - A window in flight is never persisted ([`CopyState`] holds cursors and re-read keys
//!   only): after a restart its watermarks (of an earlier run) are ignored and the range is
//!   read again.
//! - A stream change is applied only to a key already copied ([`TableMove::decide`]); the
//!   chunk that copies a key later reads its state then.
//! - Pure: the reader tasks do the I/O and report here.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::chunk::ChunkTable;
use super::{BackfillError, Cursor, Key, RekeyPlan, TableCopy, Verdict};
use crate::apply::writer::RowShape;
use crate::apply::CopyRows;
use crate::decode::{Datum, Relation, ReplicaIdentity, Tuple};
use crate::lsn::Lsn;
use crate::route::RowOp;
use crate::sql::QualifiedName;

/// One table of a moving tenant.
pub struct TableMove {
    pub chunk: ChunkTable,
    /// Where the rows go on the target.
    pub target: QualifiedName,
    pub copy: TableCopy,
    /// The chunk in flight, once its SELECT returned.
    pub rows: Option<ChunkRows>,
    /// Where the low watermark of the chunk in flight committed: (chunk, end LSN).
    pub low_at: Option<(u64, Lsn)>,
    /// While a reader goes on with the range scan on its own: tells it which chunk's high
    /// watermark the pipeline has handled (it stays at most one chunk ahead); dropping it
    /// stops the reader.
    pub follow: Option<tokio::sync::watch::Sender<u64>>,
    /// Rows of the chunk after the one in flight, read ahead by the following reader.
    pub ahead: Option<ChunkRows>,
    /// What its stream changes share, for the relation layout last seen.
    shape: Option<Arc<RowShape>>,
}

impl TableMove {
    pub fn new(chunk: ChunkTable, target: QualifiedName) -> TableMove {
        TableMove {
            chunk,
            target,
            copy: TableCopy::new(),
            rows: None,
            low_at: None,
            follow: None,
            ahead: None,
            shape: None,
        }
    }

    /// The shape of this table's changes under `rel`'s replica identity: shared by every
    /// change until the relation's layout changes.
    pub fn shape(&mut self, rel: &Relation) -> Arc<RowShape> {
        // Called for every change: compared in place, collected only when it changed.
        let full = self.full_with_key(rel);
        let current = self.shape.as_ref().is_some_and(|s| {
            s.table == self.target && s.identity.iter().copied().eq(self.identity(rel, full))
        });
        if !current {
            self.shape = Some(Arc::new(RowShape {
                table: self.target.clone(),
                identity: self.identity(rel, full).collect(),
                tenant_column: self.chunk.tenant.as_ref().map(|c| c.0.clone()),
            }));
        }
        Arc::clone(self.shape.as_ref().expect("set above"))
    }

    /// Whether `rel` is this table under REPLICA IDENTITY FULL with the primary key the
    /// backfill reads by, at the columns the backfill knows.
    fn full_with_key(&self, rel: &Relation) -> bool {
        rel.replica_identity == ReplicaIdentity::Full
            && !self.chunk.key.is_empty()
            && rel.columns.len() == self.chunk.columns.len()
            && self
                .chunk
                .key
                .iter()
                .all(|&(i, _)| rel.columns[i].name == self.chunk.columns[i])
    }

    /// The columns that name a row of this table in the stream. pgoutput flags every column
    /// as key under REPLICA IDENTITY FULL, so where the table has a primary key (which the
    /// target shares) that key names the row: lanes then spread its rows by key, and a
    /// change of any other column is not a key change. `full` is [`Self::full_with_key`].
    fn identity<'r>(&'r self, rel: &'r Relation, full: bool) -> impl Iterator<Item = bool> + 'r {
        rel.columns.iter().enumerate().map(move |(i, c)| {
            if full {
                self.chunk.key.iter().any(|&(k, _)| k == i)
            } else {
                c.is_key()
            }
        })
    }

    /// A routed operation as this table's key sees it. Under REPLICA IDENTITY FULL every
    /// update sends the old row, and judged by pgoutput's flags (every column) almost every
    /// update changes the key; one that keeps the primary key is an update of that row,
    /// which the apply folds and spreads, where a key change runs alone.
    pub fn settle<'a>(&self, rel: &Relation, op: RowOp<'a>) -> RowOp<'a> {
        match op {
            RowOp::Rekey { old, new } if self.full_with_key(rel) => {
                match (self.key_of(old), self.key_of(new)) {
                    (Some(o), Some(n)) if o == n => RowOp::Upsert { new, update: true },
                    _ => RowOp::Rekey { old, new },
                }
            }
            op => op,
        }
    }

    /// Gives up on the chunk in flight: its rows are dropped and its range is read again.
    pub fn abandon(&mut self, chunk: u64) {
        self.copy.abandon(chunk);
        self.rows = None;
        self.low_at = None;
        self.stop_following(chunk + 1);
    }

    /// Stops the reader that goes on with the range; it may still be reading up to chunk
    /// `last`, whose number is never reused.
    pub fn stop_following(&mut self, last: u64) {
        if self.follow.take().is_some() {
            self.copy.retire_through(last);
        }
        self.ahead = None;
    }

    /// The key of a stream tuple, in the chunk's key order; `None` when a key column is
    /// NULL, not text, or an unchanged TOAST value.
    pub fn key_of(&self, tuple: &Tuple) -> Option<Key> {
        let texts: Vec<Option<&str>> = tuple
            .0
            .iter()
            .map(|d| match d {
                Datum::Text(b) => std::str::from_utf8(b).ok(),
                _ => None,
            })
            .collect();
        self.chunk.key_of(&texts)
    }
}

/// A chunk's SELECT result, waiting for its high watermark.
pub struct ChunkRows {
    pub chunk: u64,
    pub rows: crate::apply::RowBuffer,
    pub keys: Vec<Key>,
    /// Transactions running in the chunk's snapshot.
    pub in_progress: Vec<u32>,
}

/// The persisted backfill state of one tenant: per table, the cursor and the keys waiting
/// for a re-read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyState {
    pub tables: BTreeMap<String, TableState>,
    /// Rows copied so far (progress reporting survives restarts).
    #[serde(default)]
    pub rows_copied: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableState {
    pub cursor: Cursor,
    #[serde(default)]
    pub requeued: Vec<Key>,
}

impl CopyState {
    pub fn parse(text: &str) -> Result<CopyState, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("copy state is plain data")
    }
}

/// What a chunk's high watermark did.
#[derive(Debug)]
pub enum High {
    /// A transaction that committed just before the low watermark was still running in the
    /// chunk's snapshot (or the low watermark was not seen in this run): its changes are
    /// neither in the rows nor inside the window, so the range is read again.
    Raced,
    /// The chunk is done: `copied` rows, and the ones no change inside the window touched,
    /// to insert at this point of the stream (`None` when there are none).
    Done { copied: u64, rows: Option<CopyRows> },
}

impl TableMove {
    /// What to apply for one routed operation of this table, given its backfill state (at
    /// most one operation: a key change may become the delete of its old key).
    pub fn decide<'a>(&mut self, op: RowOp<'a>) -> Result<Option<RowOp<'a>>, BackfillError> {
        if self.copy.is_done() {
            // Every key is copied and no chunk window records changes: each verdict would be
            // Apply, so the key is not worth building. A row arriving without its TOAST values
            // still needs the keyed path (it is re-read).
            match op {
                RowOp::Upsert { new, update: false } if new.has_unchanged_toast() => {}
                RowOp::Truncate => {}
                _ => return Ok(Some(op)),
            }
        }
        let table = &self.chunk.source;
        let key = |t| {
            self.key_of(t).ok_or_else(|| BackfillError::KeyValue {
                table: table.to_string(),
            })
        };
        Ok(match op {
            RowOp::Upsert { new, update } => {
                let k = key(new)?;
                let copied = self.copy.change(&k) == Verdict::Apply;
                let toast = new.has_unchanged_toast();
                if copied && !update && toast {
                    // A row arriving (e.g. from another tenant) without its TOAST value: only
                    // a re-read can supply it.
                    self.copy.requeue(&k);
                    None
                } else if copied {
                    Some(op)
                } else {
                    None
                }
            }
            RowOp::Delete { old } => {
                let k = key(old)?;
                (self.copy.change(&k) == Verdict::Apply).then_some(op)
            }
            RowOp::Rekey { old, new } => {
                let (o, n) = (key(old)?, key(new)?);
                match self.copy.rekey(&o, &n) {
                    RekeyPlan::Update => Some(op),
                    RekeyPlan::DeleteOld => Some(RowOp::Delete { old }),
                    RekeyPlan::Skip => None,
                }
            }
            RowOp::Truncate => {
                self.copy.truncate();
                if let Some(chunk) = self.copy.in_flight() {
                    // Rows read before the TRUNCATE must not come back: read the range again.
                    self.abandon(chunk);
                }
                Some(op)
            }
        })
    }

    /// A chunk's rows, as its reader sent them: kept for the chunk in flight, or for the
    /// next one when the following reader read ahead; anything else is stale and dropped.
    pub fn on_rows(&mut self, rows: ChunkRows) {
        let chunk = rows.chunk;
        match self.copy.in_flight() {
            Some(c) if c == chunk => self.take_rows(rows),
            // Read ahead by the following reader: its window opens at the high watermark of
            // the chunk in flight.
            Some(c) if self.follow.is_some() && c + 1 == chunk => self.ahead = Some(rows),
            _ => {}
        }
    }

    /// A chunk's read failed: the chunk in flight is read again; a read ahead stops the
    /// following reader (the chunk in flight completes, the range then goes on through the
    /// scheduler). Returns whether the chunk was this table's current one at all.
    pub fn on_read_failed(&mut self, chunk: u64) -> bool {
        if self.copy.in_flight() == Some(chunk) {
            self.abandon(chunk);
        } else if self.copy.in_flight().map(|c| c + 1) == Some(chunk) {
            self.stop_following(chunk);
        } else {
            return false;
        }
        true
    }

    /// The low watermark of the chunk in flight committed at `end`.
    pub fn on_low(&mut self, chunk: u64, end: Lsn) {
        if let Err(e) = self.copy.low(chunk) {
            tracing::debug!(table = %self.chunk.source, error = %e, "low watermark seen twice");
        }
        self.low_at = Some((chunk, end));
    }

    /// The high watermark of the chunk in flight committed. `committed_at` tells where a
    /// recently committed transaction ended (the snapshot check); the following reader, if
    /// any, opens its next window of at most `chunk_rows` rows.
    pub fn on_high(
        &mut self,
        chunk: u64,
        chunk_rows: usize,
        committed_at: impl Fn(u32) -> Option<Lsn>,
    ) -> Result<High, BackfillError> {
        let result = match self.rows.take() {
            Some(r) if r.chunk == chunk => r,
            _ => return Err(BackfillError::NoResult(chunk)),
        };
        let low = match self.low_at.take() {
            Some((c, at)) if c == chunk => at,
            _ => Lsn::INVALID,
        };
        // A transaction that committed before the low watermark but was still running in
        // the chunk's snapshot: its changes are neither in the rows nor inside the window.
        // Rare (it is the instant between a commit's WAL record and its visibility); the
        // range is simply read again.
        let raced = !low.is_valid()
            || result
                .in_progress
                .iter()
                .any(|x| committed_at(*x).is_some_and(|at| at < low));
        if raced {
            self.abandon(chunk);
            return Ok(High::Raced);
        }
        let picked = self.copy.high(chunk)?;
        if self.follow.is_some() {
            self.follow_on(chunk, chunk_rows);
        }
        let copied = picked.len() as u64;
        let rows = (!picked.is_empty()).then(|| CopyRows {
            table: self.target.clone(),
            columns: self.chunk.columns.clone(),
            format: result.rows.format(),
            data: result.rows.select(&picked),
            rows: copied,
        });
        Ok(High::Done { copied, rows })
    }

    /// The following reader goes on with the range: its next window opens now, before its
    /// low watermark (written after `done`'s high one) arrives.
    fn follow_on(&mut self, done: u64, chunk_rows: usize) {
        match self.copy.next_range(chunk_rows) {
            Some((next, _)) if next == done + 1 => {
                if let Some(ahead) = self.ahead.take().filter(|a| a.chunk == next) {
                    self.take_rows(ahead);
                }
                if let Some(follow) = &self.follow {
                    let _ = follow.send(done);
                }
            }
            other => {
                if let Some((next, _)) = other {
                    self.copy.abandon(next);
                }
                self.stop_following(done + 1);
            }
        }
    }

    /// Hands a chunk's rows to the copy (the chunk's window is the one in flight).
    fn take_rows(&mut self, mut rows: ChunkRows) {
        let chunk = rows.chunk;
        let keyed = std::mem::take(&mut rows.keys)
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, i))
            .collect();
        if let Err(e) = self.copy.rows(chunk, keyed) {
            tracing::error!(table = %self.chunk.source, error = %e, "chunk rejected; reading it again");
            self.abandon(chunk);
            return;
        }
        self.rows = Some(rows);
    }
}

/// Source transactions that committed recently: xid → where the commit ended, for the
/// snapshot check at a high watermark ([`TableMove::on_high`]). A transaction racing a low
/// watermark committed just before it, so a bounded memory (oldest forgotten first) is
/// enough; xids wrap around, and a reused one simply overwrites the old entry.
#[derive(Debug)]
pub struct RecentCommits {
    at: std::collections::HashMap<u32, Lsn>,
    order: std::collections::VecDeque<u32>,
    capacity: usize,
}

impl RecentCommits {
    pub fn new(capacity: usize) -> RecentCommits {
        RecentCommits {
            at: std::collections::HashMap::new(),
            order: std::collections::VecDeque::new(),
            capacity,
        }
    }

    pub fn insert(&mut self, xid: u32, end: Lsn) {
        self.at.insert(xid, end);
        self.order.push_back(xid);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.at.remove(&old);
            }
        }
    }

    /// Where `xid` committed, if it is remembered.
    pub fn get(&self, xid: u32) -> Option<Lsn> {
        self.at.get(&xid).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::KeyKind;
    use crate::backfill::KeyValue;
    use bytes::Bytes;
    use std::collections::BTreeSet;

    fn table(copy: TableCopy) -> TableMove {
        let source = QualifiedName::parse("public.orders").unwrap();
        let mut tm = TableMove::new(
            ChunkTable {
                source,
                columns: vec!["tenant_id".into(), "id".into(), "note".into()],
                key: vec![(0, KeyKind::Int), (1, KeyKind::Int)],
                tenant: Some(("tenant_id".into(), "integer".into())),
            },
            QualifiedName::parse("acme.orders").unwrap(),
        );
        tm.copy = copy;
        tm
    }

    fn row(id: i64, note: Datum) -> Tuple {
        Tuple(vec![
            Datum::Text(Bytes::from_static(b"7")),
            Datum::Text(Bytes::from(id.to_string())),
            note,
        ])
    }

    fn key(id: i64) -> Vec<KeyValue> {
        vec![KeyValue::Int(7), KeyValue::Int(id)]
    }

    #[test]
    fn a_finished_copy_applies_every_change_without_keys_and_still_requeues_toastless_arrivals() {
        let mut done = table(TableCopy::resume(Cursor::End, BTreeSet::new()));
        assert!(done.copy.is_done());
        let note = || Datum::Text(Bytes::from_static(b"n"));
        let (a, b) = (row(1, note()), row(2, note()));
        for op in [
            RowOp::Upsert {
                new: &a,
                update: false,
            },
            RowOp::Upsert {
                new: &a,
                update: true,
            },
            RowOp::Delete { old: &a },
            RowOp::Rekey { old: &a, new: &b },
            RowOp::Truncate,
        ] {
            assert_eq!(done.decide(op.clone()).unwrap(), Some(op));
        }
        // Unchanged TOAST in an UPDATE keeps the target's value: applied as is.
        let toast = row(3, Datum::UnchangedToast);
        let update = RowOp::Upsert {
            new: &toast,
            update: true,
        };
        assert_eq!(done.decide(update.clone()).unwrap(), Some(update));
        // A row arriving without its TOAST value cannot be written whole: it is re-read,
        // which makes the copy unfinished again.
        let arrival = RowOp::Upsert {
            new: &toast,
            update: false,
        };
        assert_eq!(done.decide(arrival).unwrap(), None);
        assert!(done.copy.requeued().contains(&key(3)));
        assert!(!done.copy.is_done());
        // A key that cannot be parsed is still refused once the copy is unfinished.
        let bad = Tuple(vec![
            Datum::Text(Bytes::from_static(b"7")),
            Datum::Text(Bytes::from_static(b"x")),
            note(),
        ]);
        let op = RowOp::Delete { old: &bad };
        assert!(done.decide(op).is_err());
    }

    #[test]
    fn during_the_copy_changes_past_the_cursor_are_left_to_the_chunks() {
        let mut copying = table(TableCopy::resume(Cursor::After(key(10)), BTreeSet::new()));
        let note = || Datum::Text(Bytes::from_static(b"n"));
        let (inside, outside) = (row(5, note()), row(50, note()));
        let upd = |t| RowOp::Upsert {
            new: t,
            update: true,
        };
        assert_eq!(copying.decide(upd(&inside)).unwrap(), Some(upd(&inside)));
        assert_eq!(copying.decide(upd(&outside)).unwrap(), None);
        // A key change out of the copied range deletes the old key only.
        let rekey = RowOp::Rekey {
            old: &inside,
            new: &outside,
        };
        assert_eq!(
            copying.decide(rekey).unwrap(),
            Some(RowOp::Delete { old: &inside })
        );
    }

    /// `public.orders` (tenant_id, id, note) with these key flags.
    fn relation(identity: crate::decode::ReplicaIdentity, keys: [u8; 3]) -> Relation {
        use crate::decode::{Column, RelationId};
        Relation {
            xid: None,
            id: RelationId(16400),
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: identity,
            columns: ["tenant_id", "id", "note"]
                .iter()
                .zip(keys)
                .map(|(name, flags)| Column {
                    flags,
                    name: (*name).into(),
                    type_oid: 23,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn changes_share_one_shape_until_the_relation_layout_changes() {
        use crate::decode::ReplicaIdentity;
        let mut table = table(TableCopy::new());
        let rel = |keys: [u8; 3]| relation(ReplicaIdentity::Default, keys);
        let first = table.shape(&rel([1, 1, 0]));
        assert_eq!(first.table, QualifiedName::parse("acme.orders").unwrap());
        assert_eq!(first.identity, vec![true, true, false]);
        assert_eq!(first.tenant_column.as_deref(), Some("tenant_id"));
        assert!(Arc::ptr_eq(&first, &table.shape(&rel([1, 1, 0]))));
        // REPLICA IDENTITY changed: a new shape, and the old one stays as it was for the
        // changes that already carry it.
        let full = table.shape(&rel([1, 1, 1]));
        assert!(!Arc::ptr_eq(&first, &full));
        assert_eq!(full.identity, vec![true, true, true]);
        assert_eq!(first.identity, vec![true, true, false]);
    }

    #[test]
    fn under_full_identity_the_primary_key_names_the_row() {
        use crate::decode::ReplicaIdentity;
        let mut table = table(TableCopy::new());
        // What pgoutput sends for REPLICA IDENTITY FULL: every column flagged as key.
        let rel = |identity| relation(identity, [1, 1, 1]);
        let full = rel(ReplicaIdentity::Full);
        assert_eq!(table.shape(&full).identity, vec![true, true, false]);
        let (old, new) = (
            row(1, Datum::Text("a".into())),
            row(1, Datum::Text("b".into())),
        );
        assert_eq!(
            table.settle(
                &full,
                RowOp::Rekey {
                    old: &old,
                    new: &new
                }
            ),
            RowOp::Upsert {
                new: &new,
                update: true
            }
        );
        // A real key change stays one, and so does a key the new row does not carry.
        let moved = row(2, Datum::Text("b".into()));
        let rekey = RowOp::Rekey {
            old: &old,
            new: &moved,
        };
        assert_eq!(table.settle(&full, rekey.clone()), rekey);
        let toast = Tuple(vec![
            Datum::Text("7".into()),
            Datum::UnchangedToast,
            Datum::Null,
        ]);
        let rekey = RowOp::Rekey {
            old: &old,
            new: &toast,
        };
        assert_eq!(table.settle(&full, rekey.clone()), rekey);
        // Other identities keep pgoutput's flags, and their key changes.
        let index = rel(ReplicaIdentity::Index);
        assert_eq!(table.shape(&index).identity, vec![true, true, true]);
        let rekey = RowOp::Rekey {
            old: &old,
            new: &new,
        };
        assert_eq!(table.settle(&index, rekey.clone()), rekey);
        // A layout the backfill does not know (a column added): the flags again.
        let mut wider = rel(ReplicaIdentity::Full);
        wider.columns.push(wider.columns[2].clone());
        assert_eq!(table.shape(&wider).identity, vec![true; 4]);
    }

    #[test]
    fn stream_keys_come_from_text_columns_only() {
        let table = table(TableCopy::new());
        let row = |id: Datum| {
            Tuple(vec![
                Datum::Text("7".into()),
                id,
                Datum::Text("note".into()),
            ])
        };
        assert_eq!(
            table.key_of(&row(Datum::Text("42".into()))),
            Some(vec![KeyValue::Int(7), KeyValue::Int(42)])
        );
        assert_eq!(table.key_of(&row(Datum::Null)), None);
        assert_eq!(table.key_of(&row(Datum::UnchangedToast)), None);
    }

    /// Rows of `ids` read for `chunk` (text COPY, tenant 7).
    fn chunk_rows(chunk: u64, ids: &[i64], in_progress: Vec<u32>) -> ChunkRows {
        let mut rows = crate::apply::RowBuffer::new(crate::apply::CopyFormat::Text);
        for id in ids {
            let id = id.to_string();
            rows.push([Some(&b"7"[..]), Some(id.as_bytes()), Some(&b"n"[..])].into_iter());
        }
        ChunkRows {
            chunk,
            rows,
            keys: ids.iter().map(|id| key(*id)).collect(),
            in_progress,
        }
    }

    #[test]
    fn a_chunk_is_inserted_at_its_high_watermark_without_the_keys_changed_inside_its_window() {
        let mut tm = table(TableCopy::new());
        let (chunk, _) = tm.copy.next_chunk(10).unwrap();
        tm.on_low(chunk, Lsn(100));
        tm.on_rows(chunk_rows(chunk, &[1, 2, 3], Vec::new()));
        // A change inside the window to key 2: skipped (not copied yet), and re-read later.
        let two = row(2, Datum::Text(Bytes::from_static(b"m")));
        let update = RowOp::Upsert {
            new: &two,
            update: true,
        };
        assert_eq!(tm.decide(update).unwrap(), None);
        let High::Done { copied, rows } = tm.on_high(chunk, 10, |_| None).unwrap() else {
            panic!("not raced");
        };
        assert_eq!(copied, 2);
        let rows = rows.expect("two rows");
        assert_eq!(
            (rows.rows, rows.table.to_string()),
            (2, "acme.orders".into())
        );
        assert_eq!(&rows.data[..], b"7\t1\tn\n7\t3\tn\n");
        assert!(tm.copy.requeued().contains(&key(2)));
        assert_eq!(tm.copy.in_flight(), None);
    }

    #[test]
    fn a_chunk_that_raced_a_committing_transaction_or_missed_its_low_watermark_is_read_again() {
        let mut tm = table(TableCopy::new());
        let (chunk, _) = tm.copy.next_chunk(10).unwrap();
        tm.on_low(chunk, Lsn(100));
        // Transaction 9 was running in the chunk's snapshot and committed before the low
        // watermark (at 90): its changes are in neither the rows nor the window.
        tm.on_rows(chunk_rows(chunk, &[1], vec![9]));
        let committed = |xid| (xid == 9).then_some(Lsn(90));
        assert!(matches!(tm.on_high(chunk, 10, committed), Ok(High::Raced)));
        assert_eq!(tm.copy.in_flight(), None);
        assert_eq!(tm.copy.cursor(), &Cursor::Start, "the range is read again");
        // Committed after the low watermark: its changes were inside the window.
        let (chunk, _) = tm.copy.next_chunk(10).unwrap();
        tm.on_low(chunk, Lsn(100));
        tm.on_rows(chunk_rows(chunk, &[1], vec![9]));
        let later = |xid| (xid == 9).then_some(Lsn(110));
        assert!(matches!(
            tm.on_high(chunk, 10, later),
            Ok(High::Done { copied: 1, .. })
        ));
        // No low watermark seen in this run (it was an earlier run's): read again.
        let mut tm = table(TableCopy::new());
        let (chunk, _) = tm.copy.next_chunk(10).unwrap();
        tm.copy.low(chunk).unwrap();
        tm.on_rows(chunk_rows(chunk, &[1], Vec::new()));
        assert!(matches!(tm.on_high(chunk, 10, |_| None), Ok(High::Raced)));
    }

    #[test]
    fn rows_of_another_chunk_are_dropped_and_a_high_watermark_without_rows_is_an_error() {
        let mut tm = table(TableCopy::new());
        let (chunk, _) = tm.copy.next_chunk(10).unwrap();
        tm.on_low(chunk, Lsn(100));
        tm.on_rows(chunk_rows(chunk + 5, &[1], Vec::new()));
        assert!(tm.rows.is_none());
        assert!(matches!(
            tm.on_high(chunk, 10, |_| None),
            Err(BackfillError::NoResult(c)) if c == chunk
        ));
        // A failed read of the chunk in flight: read again; of an unrelated chunk: ignored.
        assert_eq!(tm.copy.in_flight(), Some(chunk));
        assert!(!tm.on_read_failed(chunk + 7));
        assert!(tm.on_read_failed(chunk));
        assert_eq!(tm.copy.in_flight(), None);
    }

    #[test]
    fn recent_commits_forget_the_oldest_beyond_their_capacity() {
        let mut r = RecentCommits::new(2);
        r.insert(1, Lsn(10));
        r.insert(2, Lsn(20));
        assert_eq!((r.get(1), r.get(2)), (Some(Lsn(10)), Some(Lsn(20))));
        r.insert(3, Lsn(30));
        assert_eq!((r.get(1), r.get(3)), (None, Some(Lsn(30))));
        assert_eq!(r.get(4), None);
    }
}
