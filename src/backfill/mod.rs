//! Backfill under the live stream (DBLog-style watermark windows): the pure state machine of
//! one tenant's table copy. No I/O: the caller runs the chunk SELECTs, emits the watermarks
//! and applies what this decides.
//!
//! ```text
//!  stream: ──low(c)──── changes … ────high(c)──►
//!  side:          SELECT chunk c (keys after the cursor, or a list of re-read keys)
//!  at high(c): chunk rows whose key changed inside the window are dropped and re-queued;
//!              the rest are inserted at this point of the stream; the cursor advances.
//! ```
//!
//! Invariants (checked against a brute-force model by a property test below):
//! - A key is *copied* when it is at or below the cursor and not re-queued. Stream changes to
//!   copied keys are applied strictly; changes to keys not yet copied are skipped, because the
//!   chunk that copies them reads their state later.
//! - A chunk row is inserted only if its key did not change between the watermarks; a key that
//!   did is re-read by a later window. So an UPDATE with unchanged-TOAST columns never has to
//!   stand in for a row the target lacks.
//! - Key order is PostgreSQL's: integers numerically, text in the "C" collation (byte order),
//!   which the chunk query requests explicitly.

pub mod chunk;
pub mod pace;
pub mod reader;
pub mod scheduler;
pub mod table;

use std::collections::BTreeSet;

pub use crate::key::{KeyKind, KeyValue};

/// A full primary key, compared column by column.
pub type Key = Vec<KeyValue>;

/// Where the copy of one table stands.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Cursor {
    /// Nothing copied yet.
    Start,
    /// Every key up to and including this one has been read.
    After(Key),
    /// The whole table has been read.
    End,
}

impl Cursor {
    fn covers(&self, key: &Key) -> bool {
        match self {
            Cursor::Start => false,
            Cursor::After(k) => key <= k,
            Cursor::End => true,
        }
    }
}

/// What a chunk reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ChunkSpec {
    /// Up to `limit` rows with keys after the cursor, in key order.
    Range { after: Cursor, limit: usize },
    /// These re-queued keys (rows that no longer exist simply do not come back).
    Keys(BTreeSet<Key>),
}

/// What to do with a stream change of one key of this table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The key is on the target: apply strictly.
    Apply,
    /// Not copied yet: a chunk will carry its state.
    Skip,
}

/// What to do with a key-changing UPDATE during a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RekeyPlan {
    /// Both keys are on the target's side of the cursor: apply the UPDATE.
    Update,
    /// The row leaves the copied range: delete the old key; a chunk will read the new one.
    DeleteOld,
    /// Nothing on the target to change (the new key, if copied, is re-queued for a re-read).
    Skip,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackfillError {
    #[error("watermark for chunk {got} while chunk {expected:?} is open")]
    Watermark { expected: Option<u64>, got: u64 },
    #[error("chunk {0} has no result: the high watermark may only be written after the SELECT")]
    NoResult(u64),
    #[error("chunk {0} rows are not in key order or outside the chunk")]
    BadRows(u64),
    #[error("{table}: a row has a NULL or unreadable primary key value")]
    KeyValue { table: String },
}

#[derive(Clone, Debug)]
struct Window {
    chunk: u64,
    spec: ChunkSpec,
    open: bool,
    changed: BTreeSet<Key>,
    rows: Option<Vec<(Key, RowRef)>>,
}

/// An opaque handle to a chunk row held by the caller (e.g. an index into its buffer).
pub type RowRef = usize;

/// The copy of one table for one tenant.
#[derive(Clone, Debug)]
pub struct TableCopy {
    cursor: Cursor,
    requeued: BTreeSet<Key>,
    window: Option<Window>,
    next_chunk: u64,
}

impl TableCopy {
    pub fn new() -> Self {
        Self::resume(Cursor::Start, BTreeSet::new())
    }

    /// Continues from a checkpoint.
    pub fn resume(cursor: Cursor, requeued: BTreeSet<Key>) -> Self {
        TableCopy {
            cursor,
            requeued,
            window: None,
            next_chunk: 1,
        }
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    pub fn requeued(&self) -> &BTreeSet<Key> {
        &self.requeued
    }

    /// The chunk whose window is open or about to open, if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.window.as_ref().map(|w| w.chunk)
    }

    /// Gives up on `chunk` (its reader failed): nothing it read is used and the cursor stays,
    /// so the range is simply read again by a later chunk. Changes seen inside the window
    /// were to keys not yet copied (skipped) or already handled, so nothing is lost.
    pub fn abandon(&mut self, chunk: u64) {
        if self.in_flight() == Some(chunk) {
            self.window = None;
        }
    }

    pub fn is_done(&self) -> bool {
        self.cursor == Cursor::End && self.requeued.is_empty() && self.window.is_none()
    }

    fn copied(&self, key: &Key) -> bool {
        self.cursor.covers(key) && !self.requeued.contains(key)
    }

    /// The next chunk to read, or `None` when done or a chunk is in flight. Re-reads come
    /// first so a hot key cannot be starved by the range scan.
    pub fn next_chunk(&mut self, limit: usize) -> Option<(u64, ChunkSpec)> {
        if self.window.is_some() {
            return None;
        }
        let spec = if !self.requeued.is_empty() {
            ChunkSpec::Keys(self.requeued.iter().take(limit).cloned().collect())
        } else if self.cursor != Cursor::End {
            ChunkSpec::Range {
                after: self.cursor.clone(),
                limit,
            }
        } else {
            return None;
        };
        Some(self.open(spec))
    }

    /// The next chunk of the range scan, even while keys wait for a re-read: a reader that
    /// goes on with the range right after its previous chunk reads exactly this (re-reads
    /// come when the range is done). `None` when a chunk is in flight or the range is done.
    pub fn next_range(&mut self, limit: usize) -> Option<(u64, ChunkSpec)> {
        if self.window.is_some() || self.cursor == Cursor::End {
            return None;
        }
        Some(self.open(ChunkSpec::Range {
            after: self.cursor.clone(),
            limit,
        }))
    }

    /// Chunk numbers up to `chunk` are never handed out again (a reader that was stopped
    /// may still write watermarks for them).
    pub fn retire_through(&mut self, chunk: u64) {
        self.next_chunk = self.next_chunk.max(chunk + 1);
    }

    fn open(&mut self, spec: ChunkSpec) -> (u64, ChunkSpec) {
        let chunk = self.next_chunk;
        self.next_chunk += 1;
        self.window = Some(Window {
            chunk,
            spec: spec.clone(),
            open: false,
            changed: BTreeSet::new(),
            rows: None,
        });
        (chunk, spec)
    }

    /// The low watermark of `chunk` arrived in the stream.
    pub fn low(&mut self, chunk: u64) -> Result<(), BackfillError> {
        match &mut self.window {
            Some(w) if w.chunk == chunk && !w.open => {
                w.open = true;
                Ok(())
            }
            w => Err(BackfillError::Watermark {
                expected: w.as_ref().map(|w| w.chunk),
                got: chunk,
            }),
        }
    }

    /// The chunk SELECT returned (between the watermarks), in key order.
    pub fn rows(&mut self, chunk: u64, rows: Vec<(Key, RowRef)>) -> Result<(), BackfillError> {
        match &mut self.window {
            Some(w) if w.chunk == chunk => {
                let ordered = rows.windows(2).all(|p| p[0].0 < p[1].0);
                let inside = rows.iter().all(|(k, _)| match &w.spec {
                    ChunkSpec::Range { after, .. } => !after.covers(k),
                    ChunkSpec::Keys(keys) => keys.contains(k),
                });
                if !ordered || !inside {
                    return Err(BackfillError::BadRows(chunk));
                }
                w.rows = Some(rows);
                Ok(())
            }
            w => Err(BackfillError::Watermark {
                expected: w.as_ref().map(|w| w.chunk),
                got: chunk,
            }),
        }
    }

    /// A stream change of `key`. Call for every INSERT/UPDATE/DELETE of the tenant's table
    /// (for a key change, for the old and the new key).
    pub fn change(&mut self, key: &Key) -> Verdict {
        if let Some(w) = &mut self.window {
            if w.open {
                w.changed.insert(key.clone());
            }
        }
        if self.copied(key) {
            Verdict::Apply
        } else {
            Verdict::Skip
        }
    }

    /// Marks a copied key as needing a re-read: its row is not on the target and the stream
    /// could not supply it whole (a key change into the copied range, or a row arriving from
    /// another tenant with unchanged TOAST values). Changes to it are skipped until re-read.
    pub fn requeue(&mut self, key: &Key) {
        if self.cursor.covers(key) {
            self.requeued.insert(key.clone());
        }
    }

    /// How to apply an UPDATE that changed the key from `old` to `new`.
    pub fn rekey(&mut self, old: &Key, new: &Key) -> RekeyPlan {
        let old_copied = self.change(old) == Verdict::Apply;
        let new_copied = self.change(new) == Verdict::Apply;
        match (old_copied, new_copied) {
            (true, true) => RekeyPlan::Update,
            (true, false) => RekeyPlan::DeleteOld,
            (false, true) => {
                self.requeue(new);
                RekeyPlan::Skip
            }
            (false, false) => RekeyPlan::Skip,
        }
    }

    /// A TRUNCATE of the table: everything copied so far is gone on the source too (the
    /// caller applies it); keys in flight are dropped the same way.
    pub fn truncate(&mut self) {
        self.requeued.clear();
        if let Some(w) = &mut self.window {
            if let Some(rows) = &mut w.rows {
                rows.clear();
            }
        }
    }

    /// The high watermark of `chunk` arrived: returns the chunk rows to insert now.
    pub fn high(&mut self, chunk: u64) -> Result<Vec<RowRef>, BackfillError> {
        let w = match self.window.take() {
            Some(w) if w.chunk == chunk && w.open => w,
            other => {
                let expected = other.as_ref().map(|w| w.chunk);
                self.window = other;
                return Err(BackfillError::Watermark {
                    expected,
                    got: chunk,
                });
            }
        };
        let Some(rows) = w.rows else {
            self.window = Some(Window { rows: None, ..w });
            return Err(BackfillError::NoResult(chunk));
        };
        let mut insert = Vec::with_capacity(rows.len());
        match &w.spec {
            ChunkSpec::Range { after, limit } => {
                let before = after.clone();
                let new_cursor = if rows.len() < *limit {
                    Cursor::End
                } else {
                    match rows.last() {
                        Some((k, _)) => Cursor::After(k.clone()),
                        None => Cursor::End,
                    }
                };
                for (k, r) in &rows {
                    if !w.changed.contains(k) {
                        insert.push(*r);
                    }
                }
                // Keys that changed inside the newly covered range are re-read later, whether
                // the chunk saw them or not (an insert may have come after the SELECT).
                for k in &w.changed {
                    if !before.covers(k) && new_cursor.covers(k) {
                        self.requeued.insert(k.clone());
                    }
                }
                self.cursor = new_cursor;
            }
            ChunkSpec::Keys(keys) => {
                for (k, r) in &rows {
                    if !w.changed.contains(k) {
                        insert.push(*r);
                    }
                }
                for k in keys {
                    if !w.changed.contains(k) {
                        self.requeued.remove(k);
                    }
                }
            }
        }
        Ok(insert)
    }
}

impl Default for TableCopy {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn k(i: i64) -> Key {
        vec![KeyValue::Int(i)]
    }

    #[test]
    fn binary_key_values_decode_to_what_their_text_parses_to() {
        let int = |oid, raw: &[u8], text: &str| {
            assert_eq!(
                KeyKind::Int.decode_binary(oid, raw),
                KeyKind::Int.parse(text),
                "{text}"
            );
        };
        int(21, &(-7i16).to_be_bytes(), "-7");
        int(23, &i32::MIN.to_be_bytes(), &i32::MIN.to_string());
        int(20, &i64::MAX.to_be_bytes(), &i64::MAX.to_string());
        int(20, &1_000_000i64.to_be_bytes(), "1000000");
        assert_eq!(
            KeyKind::Text.decode_binary(25, "ünï'code".as_bytes()),
            KeyKind::Text.parse("ünï'code")
        );
        assert_eq!(
            KeyKind::Text.decode_binary(1043, b"v"),
            Some(KeyValue::Text("v".into()))
        );
        let uuid = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(
            KeyKind::Uuid.decode_binary(2950, &uuid),
            KeyKind::Uuid.parse("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11")
        );
        // Wrong widths, types outside the kind and bytes that are no value: none.
        assert_eq!(KeyKind::Int.decode_binary(23, &[0, 1]), None);
        assert_eq!(KeyKind::Int.decode_binary(25, b"1"), None);
        assert_eq!(KeyKind::Text.decode_binary(25, &[0xff, 0xfe]), None);
        assert_eq!(KeyKind::Uuid.decode_binary(2950, &uuid[..15]), None);
        assert_eq!(KeyKind::Text.decode_binary(0, b"x"), None);
    }

    #[test]
    fn a_continued_range_skips_requeued_keys_and_retired_numbers_are_not_reused() {
        let mut c = TableCopy::new();
        let (first, _) = c.next_chunk(2).unwrap();
        c.low(first).unwrap();
        c.rows(first, vec![(k(1), 0), (k(2), 1)]).unwrap();
        assert_eq!(
            c.change(&k(2)),
            Verdict::Skip,
            "not copied before its window closes"
        );
        assert_eq!(
            c.high(first).unwrap(),
            vec![0],
            "key 2 changed in the window"
        );
        assert!(c.requeued().contains(&k(2)));
        // The plain scheduler would re-read key 2 first; the continuation goes on with the
        // range, exactly as a reader that did not wait would.
        let (next, spec) = c.next_range(2).unwrap();
        assert_eq!(next, first + 1);
        assert_eq!(
            spec,
            ChunkSpec::Range {
                after: Cursor::After(k(2)),
                limit: 2
            }
        );
        assert_eq!(c.next_range(2), None, "one window at a time");
        c.abandon(next);
        c.retire_through(next + 1);
        let (again, spec) = c.next_chunk(2).unwrap();
        assert_eq!(again, next + 2, "a stopped reader's numbers are not reused");
        assert_eq!(spec, ChunkSpec::Keys([k(2)].into()));
    }

    #[test]
    fn key_order_matches_postgres_for_ints_and_c_collated_text() {
        assert!(KeyValue::Int(9) < KeyValue::Int(10));
        assert!(KeyValue::Text("Z".into()) < KeyValue::Text("a".into()));
        assert!(KeyValue::Text("é".into()) > KeyValue::Text("z".into()));
        assert!(
            vec![KeyValue::Int(1), KeyValue::Int(9)] < vec![KeyValue::Int(2), KeyValue::Int(0)]
        );
        assert_eq!(KeyKind::for_type_oid(23), Some(KeyKind::Int));
        assert_eq!(
            KeyKind::for_type_oid(1700),
            None,
            "numeric keys are refused for now"
        );
        assert_eq!(KeyKind::Int.parse("-5"), Some(KeyValue::Int(-5)));
        assert_eq!(KeyKind::Int.parse("x"), None);
    }

    #[test]
    fn a_key_changed_in_the_window_is_requeued_not_copied() {
        let mut t = TableCopy::new();
        let (c, spec) = t.next_chunk(3).unwrap();
        assert_eq!(
            spec,
            ChunkSpec::Range {
                after: Cursor::Start,
                limit: 3
            }
        );
        t.low(c).unwrap();
        assert_eq!(t.change(&k(2)), Verdict::Skip);
        t.rows(c, vec![(k(1), 0), (k(2), 1), (k(3), 2)]).unwrap();
        assert_eq!(t.high(c).unwrap(), vec![0, 2]);
        assert_eq!(t.cursor(), &Cursor::After(k(3)));
        assert!(t.requeued().contains(&k(2)));
        assert_eq!(t.change(&k(1)), Verdict::Apply);
        assert_eq!(
            t.change(&k(2)),
            Verdict::Skip,
            "re-queued keys wait for their re-read"
        );
        assert_eq!(t.change(&k(4)), Verdict::Skip);
        // The re-read comes next.
        let (c, spec) = t.next_chunk(3).unwrap();
        assert_eq!(spec, ChunkSpec::Keys([k(2)].into()));
        t.low(c).unwrap();
        t.rows(c, vec![(k(2), 7)]).unwrap();
        assert_eq!(t.high(c).unwrap(), vec![7]);
        assert!(t.requeued().is_empty());
        assert_eq!(t.change(&k(2)), Verdict::Apply);
    }

    #[test]
    fn key_changes_across_the_cursor() {
        let mut t = TableCopy::resume(Cursor::After(k(10)), BTreeSet::new());
        assert_eq!(t.rekey(&k(1), &k(2)), RekeyPlan::Update);
        assert_eq!(t.rekey(&k(3), &k(20)), RekeyPlan::DeleteOld);
        assert_eq!(t.rekey(&k(30), &k(4)), RekeyPlan::Skip);
        assert!(
            t.requeued().contains(&k(4)),
            "moved into the copied range: re-read it"
        );
        assert_eq!(t.change(&k(4)), Verdict::Skip);
        assert_eq!(t.rekey(&k(30), &k(40)), RekeyPlan::Skip);
        t.requeue(&k(50));
        assert!(
            !t.requeued().contains(&k(50)),
            "not copied yet: nothing to re-read"
        );
    }

    #[test]
    fn watermarks_out_of_order_are_errors() {
        let mut t = TableCopy::new();
        assert!(t.low(1).is_err(), "no chunk in flight");
        let (c, _) = t.next_chunk(10).unwrap();
        assert!(t.next_chunk(10).is_none(), "one chunk at a time");
        assert!(t.high(c).is_err(), "high before low");
        t.low(c).unwrap();
        assert_eq!(t.high(c), Err(BackfillError::NoResult(c)));
        assert!(
            t.rows(c, vec![(k(2), 0), (k(1), 1)]).is_err(),
            "unordered rows"
        );
        t.rows(c, vec![]).unwrap();
        assert_eq!(t.high(c).unwrap(), Vec::<RowRef>::new());
        assert!(t.is_done());
    }

    /// One step of a simulated workload on a single table of integer keys.
    #[derive(Clone, Debug)]
    enum Step {
        Upsert(i64, u32),
        Delete(i64),
        /// UPDATE of the key: the row moves from the first key to the second.
        Rekey(i64, i64),
        /// The chunk SELECT runs now (if a window is open and has not read yet).
        Read,
        /// The stream reaches the next watermark (low if none open, else high after a read).
        Watermark,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0i64..40, any::<u32>()).prop_map(|(k, v)| Step::Upsert(k, v)),
            2 => (0i64..40).prop_map(Step::Delete),
            2 => (0i64..40, 0i64..40).prop_map(|(a, b)| Step::Rekey(a, b)),
            2 => Just(Step::Read),
            2 => Just(Step::Watermark),
        ]
    }

    /// Source, stream and target of one table simulated exactly: the stream is applied in
    /// order and at once (its order is what matters), strictly for copied keys.
    #[derive(Clone, Debug)]
    struct Sim {
        source: BTreeMap<i64, u32>,
        target: BTreeMap<i64, u32>,
        copy: TableCopy,
        buffer: Vec<(i64, u32)>,
        in_flight: Option<u64>,
        read_done: bool,
        limit: usize,
    }

    impl Sim {
        fn new(initial: BTreeMap<i64, u32>, limit: usize) -> Sim {
            Sim {
                source: initial,
                target: BTreeMap::new(),
                copy: TableCopy::new(),
                buffer: Vec::new(),
                in_flight: None,
                read_done: false,
                limit,
            }
        }

        fn apply(&mut self, key: i64, val: Option<u32>) -> Result<(), String> {
            if self.copy.change(&k(key)) == Verdict::Apply {
                match val {
                    Some(v) => {
                        self.target.insert(key, v);
                    }
                    None if self.target.remove(&key).is_none() => {
                        return Err(format!("strict delete of {key} found no row"));
                    }
                    None => {}
                }
            }
            Ok(())
        }

        /// Runs `s`; `Ok(false)` when it can do nothing now.
        fn step(&mut self, s: &Step) -> Result<bool, String> {
            match *s {
                Step::Upsert(key, v) => {
                    self.source.insert(key, v);
                    self.apply(key, Some(v))?;
                }
                Step::Delete(key) => {
                    if self.source.remove(&key).is_some() {
                        self.apply(key, None)?;
                    }
                }
                Step::Rekey(from, to) => {
                    if from != to
                        && self.source.contains_key(&from)
                        && !self.source.contains_key(&to)
                    {
                        let v = self.source.remove(&from).expect("checked");
                        self.source.insert(to, v);
                        match self.copy.rekey(&k(from), &k(to)) {
                            RekeyPlan::Update => {
                                if self.target.remove(&from).is_none() {
                                    return Err(format!("strict rekey of {from} found no row"));
                                }
                                if self.target.insert(to, v).is_some() {
                                    return Err(format!("rekey onto existing {to}"));
                                }
                            }
                            RekeyPlan::DeleteOld => {
                                if self.target.remove(&from).is_none() {
                                    return Err(format!("strict delete of {from} found no row"));
                                }
                            }
                            RekeyPlan::Skip => {}
                        }
                    }
                }
                Step::Read => {
                    let (Some(c), false) = (self.in_flight, self.read_done) else {
                        return Ok(false);
                    };
                    let spec = self
                        .copy
                        .window
                        .as_ref()
                        .map(|w| w.spec.clone())
                        .expect("in flight");
                    let rows: Vec<(i64, u32)> = match spec {
                        ChunkSpec::Range { after, limit } => self
                            .source
                            .iter()
                            .filter(|(key, _)| !after.covers(&k(**key)))
                            .take(limit)
                            .map(|(a, b)| (*a, *b))
                            .collect(),
                        ChunkSpec::Keys(keys) => self
                            .source
                            .iter()
                            .filter(|(key, _)| keys.contains(&k(**key)))
                            .map(|(a, b)| (*a, *b))
                            .collect(),
                    };
                    self.copy
                        .rows(
                            c,
                            rows.iter()
                                .enumerate()
                                .map(|(i, (key, _))| (k(*key), i))
                                .collect(),
                        )
                        .map_err(|e| e.to_string())?;
                    self.buffer = rows;
                    self.read_done = true;
                }
                Step::Watermark => match self.in_flight {
                    None => match self.copy.next_chunk(self.limit) {
                        Some((c, _)) => {
                            self.copy.low(c).map_err(|e| e.to_string())?;
                            self.in_flight = Some(c);
                            self.read_done = false;
                        }
                        None => return Ok(false),
                    },
                    Some(c) if self.read_done => {
                        for r in self.copy.high(c).map_err(|e| e.to_string())? {
                            let (key, v) = self.buffer[r];
                            if self.target.insert(key, v).is_some() {
                                return Err(format!("chunk row {key} already on target"));
                            }
                        }
                        self.in_flight = None;
                    }
                    Some(_) => return Ok(false),
                },
            }
            Ok(true)
        }

        /// The daemon dies: the open window and its rows are lost; the copy resumes from
        /// the cursor and re-read set it recorded with the target's rows.
        fn crash(&mut self) {
            self.copy = TableCopy::resume(self.copy.cursor().clone(), self.copy.requeued().clone());
            self.buffer.clear();
            self.in_flight = None;
            self.read_done = false;
        }

        /// Writes stopped: the copy runs to its end; then the target must equal the source.
        fn finish(&mut self) -> Result<(), String> {
            for _ in 0..10_000 {
                if !self.step(&Step::Read)? && !self.step(&Step::Watermark)? {
                    if !self.copy.is_done() {
                        return Err("stuck before the copy was done".into());
                    }
                    if self.target != self.source {
                        return Err(format!(
                            "target {:?} != source {:?}",
                            self.target, self.source
                        ));
                    }
                    return Ok(());
                }
            }
            Err("no convergence".into())
        }
    }

    proptest! {
        /// Whatever the interleaving of writes, chunk reads and watermarks, once the copy is
        /// done and the stream has caught up the target equals the source, and no strict
        /// apply ever misses or duplicates a row.
        #[test]
        fn copy_under_a_live_stream_converges_to_the_source(
            initial in proptest::collection::btree_map(0i64..40, any::<u32>(), 0..30),
            steps in proptest::collection::vec(step(), 0..120),
            limit in 1usize..8,
        ) {
            let mut sim = Sim::new(initial, limit);
            for s in &steps {
                sim.step(s).map_err(TestCaseError::fail)?;
            }
            sim.finish().map_err(TestCaseError::fail)?;
        }
    }

    /// A bounded model check of the copy, not a sample: for every workload of up to three
    /// writes over three keys (upserts, deletes, key changes), every chunk size of 1 and 2,
    /// explores *every* interleaving of those writes with chunk reads, watermarks and one
    /// crash of the daemon at any point, and checks each reachable end state (the copy run
    /// to completion) for strict applies that miss, duplicates, and target ≠ source.
    /// States are deduplicated, so the search is exhaustive within the bounds.
    #[test]
    fn every_interleaving_of_small_workloads_with_a_crash_converges() {
        let mut alphabet = Vec::new();
        for a in 0..3i64 {
            alphabet.push(Step::Upsert(a, 7));
            alphabet.push(Step::Delete(a));
            for b in 0..3i64 {
                if a != b {
                    alphabet.push(Step::Rekey(a, b));
                }
            }
        }
        let mut workloads: Vec<Vec<Step>> = vec![Vec::new()];
        for _ in 0..3 {
            let longer: Vec<Vec<Step>> = workloads
                .iter()
                .filter(|w| w.len() == workloads.iter().map(Vec::len).max().unwrap_or(0))
                .flat_map(|w| {
                    alphabet
                        .iter()
                        .map(move |s| [w.clone(), vec![s.clone()]].concat())
                })
                .collect();
            workloads.extend(longer);
        }
        let initial: BTreeMap<i64, u32> = [(0, 1), (1, 2)].into();
        let (mut states, mut ends) = (0usize, 0usize);
        for workload in &workloads {
            for limit in [1, 2] {
                let mut seen = std::collections::HashSet::new();
                let mut todo = vec![(0usize, 1u8, Sim::new(initial.clone(), limit))];
                while let Some((i, crashes, sim)) = todo.pop() {
                    if !seen.insert(format!("{i}|{crashes}|{sim:?}")) {
                        continue;
                    }
                    states += 1;
                    let ok = |r: Result<bool, String>| -> bool {
                        r.unwrap_or_else(|e| panic!("{workload:?}, chunk {limit}: {e}"))
                    };
                    if i == workload.len() {
                        let mut end = sim.clone();
                        ok(end.finish().map(|()| true));
                        ends += 1;
                    }
                    if i < workload.len() {
                        let mut next = sim.clone();
                        ok(next.step(&workload[i]));
                        todo.push((i + 1, crashes, next));
                    }
                    for s in [Step::Read, Step::Watermark] {
                        let mut next = sim.clone();
                        if ok(next.step(&s)) {
                            todo.push((i, crashes, next));
                        }
                    }
                    if crashes > 0 && sim.in_flight.is_some() {
                        let mut next = sim.clone();
                        next.crash();
                        todo.push((i, crashes - 1, next));
                    }
                }
            }
        }
        // Guards against a search that silently explores nothing.
        assert_eq!(workloads.len(), 1 + 12 + 144 + 1728);
        assert!(
            states > 100_000 && ends > 10_000,
            "{states} states, {ends} end states"
        );
        eprintln!(
            "model check: {} workloads, {states} states, {ends} end states",
            workloads.len()
        );
    }
}
