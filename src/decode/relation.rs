//! Relation descriptions received on one replication connection, by OID.
//!
//! Row messages carry only a relation OID; the column names, types and replica identity
//! arrive earlier in a Relation message. pgoutput sends one before the first change to a
//! relation on each connection and again after anything invalidated its cached description
//! (which includes, but is not limited to, DDL on that relation).
//!
//! Invariants:
//! - A change for an OID no Relation message described is an error, never a guess: it means
//!   the cache was cleared at the wrong moment or the stream is not what we think it is.
//! - The cache holds the latest description per OID. A repeated description is reported as
//!   [`RelationChange::Unchanged`] only if everything but the message's `xid` is equal, so
//!   any DDL that pgoutput can show us (added, dropped, renamed or retyped columns, a new
//!   key, a new replica identity, a rename) surfaces as [`RelationChange::Changed`].
//! - One cache per connection: [`RelationCache::clear`] on reconnect, since a new walsender
//!   describes everything again and what we held may predate DDL we never saw.
//! - Relation messages inside a streamed block belong to that in-progress transaction,
//!   which may still abort. Apply them when that transaction's changes are applied (at
//!   Stream Commit / Stream Prepare), not on receipt; this cache does not know about blocks.

use std::collections::hash_map::{Entry, HashMap};

use super::message::{Column, Datum, Relation, RelationId, Tuple};
use crate::sql::QualifiedName;

/// Why a row could not be interpreted with the cached relations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelationError {
    #[error(
        "change for relation {id}, which no Relation message has described on this connection"
    )]
    Unknown { id: RelationId },

    #[error(
        "tuple for relation {id} ({relation}) has {actual} columns, but its Relation message \
         described {expected}"
    )]
    ColumnCountMismatch {
        id: RelationId,
        /// `namespace.name`, for the operator reading the error.
        relation: String,
        expected: usize,
        actual: usize,
    },
}

/// What [`RelationCache::apply`] found when it stored a description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelationChange {
    /// First description of this OID since the cache was created or cleared.
    New,
    /// Same definition as the one held (pgoutput re-sends after unrelated invalidations).
    Unchanged,
    /// The definition differs from the one held: DDL happened mid-stream.
    Changed(RelationDiff),
}

impl RelationChange {
    pub fn is_new(&self) -> bool {
        matches!(self, RelationChange::New)
    }

    pub fn is_changed(&self) -> bool {
        matches!(self, RelationChange::Changed(_))
    }

    pub fn diff(&self) -> Option<&RelationDiff> {
        match self {
            RelationChange::Changed(d) => Some(d),
            _ => None,
        }
    }
}

/// How a relation's new description differs from the one it replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationDiff {
    /// The description that was replaced.
    pub previous: Relation,
    /// Namespace or relation name differs.
    pub renamed: bool,
    pub replica_identity_changed: bool,
    /// Any column added, dropped, renamed, retyped, reordered, or its key flag changed.
    pub columns_changed: bool,
}

/// Column descriptions paired with the values of one tuple, in column order.
pub type ColumnValues<'a> =
    std::iter::Zip<std::slice::Iter<'a, Column>, std::slice::Iter<'a, Datum>>;

#[derive(Clone, Debug, Default)]
pub struct RelationCache {
    /// Each description with its `schema.table` name, built once per Relation message so
    /// that routing a row looks the name up with the description and cannot miss it.
    relations: HashMap<RelationId, (Relation, QualifiedName)>,
}

fn name_of(rel: &Relation) -> QualifiedName {
    QualifiedName {
        schema: rel.namespace.clone(),
        name: rel.name.clone(),
    }
}

impl RelationCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `rel` as the current description of its OID and reports how it compares with
    /// the one it replaces.
    pub fn apply(&mut self, rel: Relation) -> RelationChange {
        let mut held = match self.relations.entry(rel.id) {
            Entry::Vacant(slot) => {
                let name = name_of(&rel);
                slot.insert((rel, name));
                return RelationChange::New;
            }
            Entry::Occupied(held) => held,
        };
        let previous = &held.get().0;
        let renamed = previous.namespace != rel.namespace || previous.name != rel.name;
        let replica_identity_changed = previous.replica_identity != rel.replica_identity;
        let columns_changed = previous.columns != rel.columns;
        let name = name_of(&rel);
        let (previous, _) = held.insert((rel, name));
        if renamed || replica_identity_changed || columns_changed {
            RelationChange::Changed(RelationDiff {
                previous,
                renamed,
                replica_identity_changed,
                columns_changed,
            })
        } else {
            RelationChange::Unchanged
        }
    }

    pub fn get(&self, id: RelationId) -> Option<&Relation> {
        self.relations.get(&id).map(|(rel, _)| rel)
    }

    /// The description a row message's OID refers to; unknown is an error (see module docs).
    pub fn resolve(&self, id: RelationId) -> Result<&Relation, RelationError> {
        self.resolve_named(id).map(|(rel, _)| rel)
    }

    /// As [`RelationCache::resolve`], with the relation's `schema.table` name.
    pub fn resolve_named(
        &self,
        id: RelationId,
    ) -> Result<(&Relation, &QualifiedName), RelationError> {
        self.relations
            .get(&id)
            .map(|(rel, name)| (rel, name))
            .ok_or(RelationError::Unknown { id })
    }

    /// Pairs each value of `tuple` with its column in relation `id`.
    ///
    /// pgoutput sends every non-dropped column in every tuple (unset key-tuple columns as
    /// NULL, unchanged TOAST as [`Datum::UnchangedToast`]), so a count mismatch means the
    /// cached description is not the one the row was written with: DDL we missed.
    pub fn columns<'a>(
        &'a self,
        id: RelationId,
        tuple: &'a Tuple,
    ) -> Result<ColumnValues<'a>, RelationError> {
        Self::pair(self.resolve(id)?, tuple)
    }

    /// As [`RelationCache::columns`], with a relation already at hand.
    pub fn pair<'a>(
        rel: &'a Relation,
        tuple: &'a Tuple,
    ) -> Result<ColumnValues<'a>, RelationError> {
        if rel.columns.len() != tuple.0.len() {
            return Err(RelationError::ColumnCountMismatch {
                id: rel.id,
                relation: format!("{}.{}", rel.namespace, rel.name),
                expected: rel.columns.len(),
                actual: tuple.0.len(),
            });
        }
        Ok(rel.columns.iter().zip(tuple.0.iter()))
    }

    /// Forgets everything; for a new connection.
    pub fn clear(&mut self) {
        self.relations.clear();
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::message::ReplicaIdentity;
    use bytes::Bytes;

    fn col(name: &str, type_oid: u32, key: bool) -> Column {
        Column {
            flags: u8::from(key),
            name: name.into(),
            type_oid,
            type_modifier: -1,
        }
    }

    fn orders() -> Relation {
        Relation {
            xid: None,
            id: RelationId(16384),
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", 20, true), col("note", 25, false)],
        }
    }

    #[test]
    fn new_then_unchanged() {
        let mut cache = RelationCache::new();
        assert!(cache.is_empty());
        assert_eq!(cache.apply(orders()), RelationChange::New);
        assert_eq!(cache.apply(orders()), RelationChange::Unchanged);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(RelationId(16384)).unwrap().name, "orders");
    }

    #[test]
    fn the_name_is_looked_up_with_the_description_and_follows_a_rename() {
        let mut cache = RelationCache::new();
        assert!(matches!(
            cache.resolve_named(RelationId(16384)),
            Err(RelationError::Unknown { .. })
        ));
        cache.apply(orders());
        let (rel, name) = cache.resolve_named(RelationId(16384)).unwrap();
        assert_eq!(rel.columns.len(), 2);
        assert_eq!(name, &QualifiedName::new("public", "orders").unwrap());
        let renamed = Relation {
            namespace: "sales".into(),
            name: "orders_2026".into(),
            ..orders()
        };
        assert!(cache.apply(renamed).diff().is_some_and(|d| d.renamed));
        let (_, name) = cache.resolve_named(RelationId(16384)).unwrap();
        assert_eq!(name, &QualifiedName::new("sales", "orders_2026").unwrap());
    }

    #[test]
    fn xid_alone_is_not_a_change() {
        let mut cache = RelationCache::new();
        cache.apply(orders());
        let streamed = Relation {
            xid: Some(812),
            ..orders()
        };
        assert_eq!(cache.apply(streamed), RelationChange::Unchanged);
    }

    #[test]
    fn added_column_is_a_change_and_replaces_the_description() {
        let mut cache = RelationCache::new();
        cache.apply(orders());
        let mut altered = orders();
        altered.columns.push(col("total", 1700, false));
        let change = cache.apply(altered);
        let diff = change.diff().expect("a change");
        assert!(diff.columns_changed);
        assert!(!diff.renamed && !diff.replica_identity_changed);
        assert_eq!(diff.previous.columns.len(), 2);
        assert_eq!(cache.resolve(RelationId(16384)).unwrap().columns.len(), 3);
    }

    #[test]
    fn key_flag_retype_identity_and_rename_are_changes() {
        let mut key_moved = orders();
        key_moved.columns[0].flags = 0;
        key_moved.columns[1].flags = 1;

        let mut retyped = orders();
        retyped.columns[1].type_oid = 1043;

        let identity = Relation {
            replica_identity: ReplicaIdentity::Full,
            ..orders()
        };
        let renamed = Relation {
            name: "orders_v2".into(),
            ..orders()
        };
        let moved = Relation {
            namespace: "archive".into(),
            ..orders()
        };

        for (altered, want_cols, want_ident, want_name) in [
            (key_moved, true, false, false),
            (retyped, true, false, false),
            (identity, false, true, false),
            (renamed, false, false, true),
            (moved, false, false, true),
        ] {
            let mut cache = RelationCache::new();
            cache.apply(orders());
            let change = cache.apply(altered.clone());
            assert!(change.is_changed(), "{altered:?}");
            let d = change.diff().unwrap();
            assert_eq!(
                (d.columns_changed, d.replica_identity_changed, d.renamed),
                (want_cols, want_ident, want_name),
                "{altered:?}"
            );
        }
    }

    #[test]
    fn unknown_relation_is_an_error() {
        let cache = RelationCache::new();
        assert_eq!(
            cache.resolve(RelationId(1)).unwrap_err(),
            RelationError::Unknown { id: RelationId(1) }
        );
        let t = Tuple(vec![]);
        assert!(matches!(
            cache.columns(RelationId(1), &t),
            Err(RelationError::Unknown { .. })
        ));
    }

    #[test]
    fn clear_forgets_everything() {
        let mut cache = RelationCache::new();
        cache.apply(orders());
        cache.clear();
        assert!(cache.get(RelationId(16384)).is_none());
        assert_eq!(cache.apply(orders()), RelationChange::New);
    }

    #[test]
    fn pairs_values_with_column_names() {
        let mut cache = RelationCache::new();
        cache.apply(orders());
        let tuple = Tuple(vec![Datum::Text(Bytes::from_static(b"7")), Datum::Null]);
        let pairs: Vec<(&str, &Datum)> = cache
            .columns(RelationId(16384), &tuple)
            .unwrap()
            .map(|(c, d)| (c.name.as_str(), d))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("id", &Datum::Text(Bytes::from_static(b"7"))),
                ("note", &Datum::Null)
            ]
        );
    }

    #[test]
    fn column_count_mismatch() {
        let mut cache = RelationCache::new();
        cache.apply(orders());
        let short = Tuple(vec![Datum::Null]);
        let err = cache.columns(RelationId(16384), &short).unwrap_err();
        assert_eq!(
            err,
            RelationError::ColumnCountMismatch {
                id: RelationId(16384),
                relation: "public.orders".into(),
                expected: 2,
                actual: 1,
            }
        );
        assert!(err.to_string().contains("public.orders"), "{err}");
        let long = Tuple(vec![Datum::Null; 3]);
        assert!(RelationCache::pair(&orders(), &long).is_err());
    }
}
