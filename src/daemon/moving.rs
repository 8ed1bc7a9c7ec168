//! A tenant being moved: its tables, their backfill state, and what the target has applied.
//!
//! Invariants:
//! - The backfill state that is persisted ([`CopyState`]) is exactly the state after the
//!   last source transaction the target holds for this tenant: it travels in the same target
//!   transaction as that transaction's rows (see `apply::SourceTxn::states`).
//! - A chunk window in flight is never persisted: after a restart its watermarks (of an
//!   earlier run) are ignored and the range is read again.
//! - Source transactions that ended at or before `skip_before` are already on the target
//!   (the position recorded there at start); none of their changes may touch this tenant's
//!   state again.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::backfill::table::{CopyState, TableMove, TableState};
use crate::backfill::{Key, TableCopy};
use crate::lsn::Lsn;
use crate::registry::MoveState;
use crate::route::Destination;
use crate::sql::QualifiedName;
use crate::tenant::TenantId;

/// What the daemon keeps in RocksDB per tenant, next to the applied position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TenantRecord {
    pub move_id: i64,
    pub state: MoveState,
    pub target: String,
    pub schema: String,
}

/// Where a tenant's copy stands, with what the target was last handed of it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Backfill {
    /// Rows remain to be read; `sent` is the copy state last handed to the target (sent
    /// again only when it changes).
    Copying { sent: Option<CopyState> },
    /// Every key was copied by the source transaction ending at `at`: the tenant is in sync
    /// once the target holds `at`. A key queued for a re-read after that (a row arriving
    /// without its TOAST values) is read under the live stream like any other; `at` stands.
    Copied { at: Lsn, sent: Option<CopyState> },
}

impl Backfill {
    fn sent(&mut self) -> &mut Option<CopyState> {
        match self {
            Backfill::Copying { sent } | Backfill::Copied { sent, .. } => sent,
        }
    }
}

/// A tenant the pipeline is moving.
pub(crate) struct Tenant {
    pub id: TenantId,
    pub move_id: i64,
    pub state: MoveState,
    pub destination: Destination,
    /// Keyed by source table.
    pub tables: BTreeMap<QualifiedName, TableMove>,
    /// Transactions ending at or before this are on the target already.
    pub skip_before: Lsn,
    /// Durable on the target (acknowledged by its applier): the end of the last source
    /// transaction of this tenant the target holds.
    pub applied: Lsn,
    /// The end of the last source transaction with work of this tenant handed to its
    /// target (rows or copy state).
    pub last_handed: Lsn,
    backfill: Backfill,
    pub rows_copied: i64,
    pub rows_total: Option<i64>,
    /// The transient error its target is being retried for, until the target commits
    /// again (shown in the registry's `last_error` meanwhile).
    pub retrying: Option<String>,
}

impl Tenant {
    /// A tenant about to copy from the start, nothing applied yet.
    pub fn new(
        id: TenantId,
        move_id: i64,
        state: MoveState,
        destination: Destination,
        tables: BTreeMap<QualifiedName, TableMove>,
    ) -> Tenant {
        Tenant {
            id,
            move_id,
            state,
            destination,
            tables,
            skip_before: Lsn::INVALID,
            applied: Lsn::INVALID,
            last_handed: Lsn::INVALID,
            backfill: Backfill::Copying { sent: None },
            rows_copied: 0,
            rows_total: None,
            retrying: None,
        }
    }

    pub fn copy_state(&self) -> CopyState {
        CopyState {
            tables: self
                .tables
                .iter()
                .map(|(name, t)| {
                    (
                        name.to_string(),
                        TableState {
                            cursor: t.copy.cursor().clone(),
                            requeued: t.copy.requeued().iter().cloned().collect(),
                        },
                    )
                })
                .collect(),
            rows_copied: self.rows_copied,
        }
    }

    /// Restores each table's copy from the state the target holds as of `at` (`None`: it
    /// holds none); tables the state does not know (added to the move since) start from the
    /// beginning.
    pub fn restore(&mut self, state: Option<CopyState>, at: Lsn) {
        self.rows_copied = state.as_ref().map_or(0, |s| s.rows_copied);
        for (name, t) in self.tables.iter_mut() {
            let table = state.as_ref().and_then(|s| s.tables.get(&name.to_string()));
            if let Some(s) = table {
                let requeued: BTreeSet<Key> = s.requeued.iter().cloned().collect();
                t.copy = TableCopy::resume(s.cursor.clone(), requeued);
            }
        }
        self.backfill = if self.is_copied() {
            Backfill::Copied { at, sent: state }
        } else {
            Backfill::Copying { sent: state }
        };
    }

    /// After a source transaction ending at `end` that concerned this tenant: its copy
    /// state as text if it changed since last handed to the target (it then counts as
    /// handed), and whether the copy became complete in that transaction.
    pub fn after_commit(&mut self, end: Lsn) -> (Option<String>, bool) {
        let state = self.copy_state();
        let changed = self.backfill.sent().as_ref() != Some(&state);
        let text = changed.then(|| state.to_json());
        if changed {
            *self.backfill.sent() = Some(state);
        }
        let completed = matches!(self.backfill, Backfill::Copying { .. }) && self.is_copied();
        if completed {
            let sent = self.backfill.sent().take();
            self.backfill = Backfill::Copied { at: end, sent };
        }
        (text, completed)
    }

    /// The target holds the whole copy.
    pub fn is_synced(&self) -> bool {
        matches!(self.backfill, Backfill::Copied { at, .. } if self.applied >= at)
    }

    pub fn is_copied(&self) -> bool {
        self.tables.values().all(|t| t.copy.is_done())
    }
}

/// Bytes of WAL from `caught` to `last_end`, the end of the last transaction read (none
/// before one was read).
pub(crate) fn lag_behind(last_end: Lsn, caught: Lsn) -> u64 {
    if last_end.is_valid() {
        last_end.bytes_since(caught)
    } else {
        0
    }
}

/// Where a moving tenant stands, for its reports and the WAL budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Standing {
    /// WAL its target trails the stream by.
    pub lag_bytes: u64,
    /// WAL it holds back at the source: while its target owes transactions, everything the
    /// source wrote since the target's position (the slot cannot move past it), so a target
    /// that is down counts although reading paused; else its lag.
    pub held: u64,
    /// Age of the oldest transaction its target owes.
    pub lag_seconds: f64,
}

impl Standing {
    /// `caught`: how far its target holds the stream; `last_end`: the end of the last
    /// transaction read; `source_at`: the source's insert position (`INVALID`: unknown);
    /// `oldest`: the commit time of the oldest transaction its target owes, and `now`, both
    /// in microseconds since 2000-01-01.
    pub fn of(caught: Lsn, last_end: Lsn, source_at: Lsn, oldest: Option<i64>, now: i64) -> Self {
        let lag_bytes = lag_behind(last_end, caught);
        let held = match oldest {
            Some(_) if source_at.is_valid() => source_at.bytes_since(caught).max(lag_bytes),
            _ => lag_bytes,
        };
        let lag_seconds = oldest.map_or(0.0, |at| ((now - at) as f64 / 1e6).max(0.0));
        Standing {
            lag_bytes,
            held,
            lag_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::chunk::ChunkTable;
    use crate::backfill::{Cursor, KeyKind, KeyValue};
    use crate::tenant::TargetId;

    fn tenant() -> Tenant {
        let table = QualifiedName::parse("public.orders").unwrap();
        let mut tables = BTreeMap::new();
        tables.insert(
            table.clone(),
            TableMove::new(
                ChunkTable {
                    source: table,
                    columns: vec!["tenant_id".into(), "id".into(), "note".into()],
                    key: vec![(0, KeyKind::Int), (1, KeyKind::Int)],
                    tenant: Some(("tenant_id".into(), "integer".into())),
                },
                QualifiedName::parse("acme.orders").unwrap(),
            ),
        );
        Tenant::new(
            TenantId::new("7").unwrap(),
            1,
            MoveState::Copying,
            Destination {
                target: TargetId::new("t").unwrap(),
                schema: "acme".into(),
            },
            tables,
        )
    }

    /// The persisted state of a tenant whose one table (`public.orders`) stands at `cursor`.
    fn orders_state(cursor: Cursor, requeued: Vec<Key>, rows_copied: i64) -> CopyState {
        let table = TableState { cursor, requeued };
        CopyState {
            tables: [("public.orders".to_string(), table)].into(),
            rows_copied,
        }
    }

    #[test]
    fn copy_state_round_trips_through_the_target_text() {
        let mut t = tenant();
        let state = orders_state(
            Cursor::After(vec![KeyValue::Int(7), KeyValue::Int(500)]),
            vec![vec![KeyValue::Int(7), KeyValue::Int(3)]],
            12,
        );
        let text = state.to_json();
        t.restore(Some(CopyState::parse(&text).unwrap()), Lsn(100));
        assert_eq!(t.copy_state(), state);
        assert!(!t.is_copied());
        assert!(CopyState::parse("{\"tables\": 3}").is_err());
        // What the target holds is not handed to it again.
        assert_eq!(t.after_commit(Lsn(200)), (None, false));
    }

    #[test]
    fn the_copy_state_goes_to_the_target_when_it_changes_and_the_copy_completes_once() {
        let mut t = tenant();
        let name = QualifiedName::parse("public.orders").unwrap();
        let (first, completed) = t.after_commit(Lsn(100));
        assert_eq!(first.as_deref(), Some(t.copy_state().to_json().as_str()));
        assert!(!completed);
        assert_eq!(
            t.after_commit(Lsn(110)),
            (None, false),
            "unchanged: not sent"
        );
        let tm = t.tables.get_mut(&name).unwrap();
        tm.copy = TableCopy::resume(Cursor::End, BTreeSet::new());
        let (changed, completed) = t.after_commit(Lsn(120));
        assert!(changed.is_some() && completed);
        assert!(!t.is_synced(), "the target holds nothing yet");
        t.applied = Lsn(119);
        assert!(!t.is_synced());
        t.applied = Lsn(120);
        assert!(t.is_synced());
        // A key queued for a re-read later changes the state, but the copy completed once.
        let tm = t.tables.get_mut(&name).unwrap();
        tm.copy.requeue(&vec![KeyValue::Int(7), KeyValue::Int(3)]);
        let (changed, completed) = t.after_commit(Lsn(130));
        assert!(changed.is_some() && !completed);
        assert!(t.is_synced());
    }

    #[test]
    fn a_tenant_restored_with_its_copy_complete_is_synced_at_its_position() {
        let mut t = tenant();
        let state = orders_state(Cursor::End, Vec::new(), 5);
        t.applied = Lsn(300);
        t.restore(Some(state), Lsn(300));
        assert!(t.is_copied() && t.is_synced());
        let mut fresh = tenant();
        fresh.restore(None, Lsn(300));
        assert!(!fresh.is_synced());
        assert!(
            fresh.after_commit(Lsn(310)).0.is_some(),
            "nothing held: sent"
        );
    }

    #[test]
    fn a_target_that_owes_holds_everything_the_source_wrote_since_its_position() {
        let (caught, last_end, source_at) = (Lsn(1_000), Lsn(3_000), Lsn(50_000));
        let idle = Standing::of(caught, last_end, source_at, None, 9_000_000);
        assert_eq!(
            (idle.lag_bytes, idle.held, idle.lag_seconds),
            (2_000, 2_000, 0.0)
        );
        // Reading paused behind a target that stopped: the source's own position counts.
        let owing = Standing::of(caught, last_end, source_at, Some(6_000_000), 9_000_000);
        assert_eq!(
            (owing.lag_bytes, owing.held, owing.lag_seconds),
            (2_000, 49_000, 3.0)
        );
        let unknown = Standing::of(caught, last_end, Lsn::INVALID, Some(6_000_000), 9_000_000);
        assert_eq!(
            unknown.held, 2_000,
            "without the source's position, the lag"
        );
        let nothing_read = Standing::of(caught, Lsn::INVALID, Lsn::INVALID, None, 0);
        assert_eq!(nothing_read.lag_bytes, 0);
        let clock_skew = Standing::of(caught, last_end, source_at, Some(9_500_000), 9_000_000);
        assert_eq!(clock_skew.lag_seconds, 0.0, "never negative");
    }
}
