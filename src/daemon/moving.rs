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
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::apply::writer::RowShape;
use crate::backfill::chunk::ChunkTable;
use crate::backfill::{Cursor, Key, TableCopy};
use crate::decode::{Datum, Relation, Tuple};
use crate::lsn::Lsn;
use crate::registry::MoveState;
use crate::route::Destination;
use crate::sql::QualifiedName;
use crate::tenant::TenantId;

/// One table of a moving tenant.
pub(crate) struct TableMove {
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
        let current = self.shape.as_ref().is_some_and(|s| {
            s.table == self.target
                && s.identity
                    .iter()
                    .copied()
                    .eq(rel.columns.iter().map(|c| c.is_key()))
        });
        if !current {
            self.shape = Some(Arc::new(RowShape {
                table: self.target.clone(),
                identity: rel.columns.iter().map(|c| c.is_key()).collect(),
                tenant_column: self.chunk.tenant.as_ref().map(|c| c.0.clone()),
            }));
        }
        Arc::clone(self.shape.as_ref().expect("set above"))
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
pub(crate) struct ChunkRows {
    pub chunk: u64,
    pub rows: crate::apply::RowBuffer,
    pub keys: Vec<Key>,
    /// Transactions running in the chunk's snapshot.
    pub in_progress: Vec<u32>,
}

/// The persisted backfill state of one tenant: per table, the cursor and the keys waiting
/// for a re-read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CopyState {
    pub tables: BTreeMap<String, TableState>,
    /// Rows copied so far (progress reporting survives restarts).
    #[serde(default)]
    pub rows_copied: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TableState {
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

/// What the daemon keeps in RocksDB per tenant, next to the applied position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TenantRecord {
    pub move_id: i64,
    pub state: MoveState,
    pub target: String,
    pub schema: String,
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
    /// Durable on the target (acknowledged by its applier).
    pub applied: Lsn,
    /// The state last handed to the applier (to send it again only when it changes).
    pub sent_state: String,
    /// The source transaction that completed the copy, once it did.
    pub copied_at: Option<Lsn>,
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
            sent_state: String::new(),
            copied_at: None,
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

    /// Restores each table's copy from a persisted state; tables the state does not know
    /// (added to the move since) start from the beginning.
    pub fn restore(&mut self, state: &CopyState) {
        self.rows_copied = state.rows_copied;
        for (name, t) in self.tables.iter_mut() {
            if let Some(s) = state.tables.get(&name.to_string()) {
                let requeued: BTreeSet<Key> = s.requeued.iter().cloned().collect();
                t.copy = TableCopy::resume(s.cursor.clone(), requeued);
            }
        }
    }

    pub fn is_copied(&self) -> bool {
        self.tables.values().all(|t| t.copy.is_done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::{KeyKind, KeyValue};
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

    #[test]
    fn copy_state_round_trips_through_the_target_text() {
        let mut t = tenant();
        let name = QualifiedName::parse("public.orders").unwrap();
        let state = CopyState {
            tables: [(
                name.to_string(),
                TableState {
                    cursor: Cursor::After(vec![KeyValue::Int(7), KeyValue::Int(500)]),
                    requeued: vec![vec![KeyValue::Int(7), KeyValue::Int(3)]],
                },
            )]
            .into(),
            rows_copied: 12,
        };
        let text = state.to_json();
        t.restore(&CopyState::parse(&text).unwrap());
        assert_eq!(t.copy_state(), state);
        assert!(!t.is_copied());
        assert!(CopyState::parse("{\"tables\": 3}").is_err());
    }

    #[test]
    fn changes_share_one_shape_until_the_relation_layout_changes() {
        use crate::decode::{Column, RelationId, ReplicaIdentity};
        let mut t = tenant();
        let table = t
            .tables
            .get_mut(&QualifiedName::parse("public.orders").unwrap())
            .unwrap();
        let rel = |keys: [u8; 3]| Relation {
            xid: None,
            id: RelationId(16400),
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Default,
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
        };
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
    fn stream_keys_come_from_text_columns_only() {
        let t = tenant();
        let table = t.tables.values().next().unwrap();
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
}
