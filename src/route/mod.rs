//! Routing: which moving tenant a decoded change belongs to, and where it goes.
//!
//! ```text
//!   Relation + Insert/Update/Delete/Truncate ──► tenant (column value | schema) ──► Destination
//! ```
//!
//! Invariants:
//! - Pure: no I/O. The caller keeps the relation cache and the set of moving tenants.
//! - Shared tables: the tenant column must be part of the replica identity, otherwise a
//!   DELETE (or an UPDATE that moves a row to another tenant) would not say whose row it was.
//!   Such a table is refused with [`RouteError::TenantNotInIdentity`], never guessed.
//! - An UPDATE that changes the tenant column becomes a delete for the old tenant and an
//!   insert for the new one, each routed on its own.
//! - A NULL tenant value means "no tenant's row": an insert or delete of it goes nowhere, and
//!   an UPDATE that sets a moving tenant's row to NULL is that row leaving the tenant (a
//!   delete at its target). A value that is not a valid id (not UTF-8, empty) is an error.

use std::collections::BTreeMap;

use crate::config::{Tenancy, TenancyMode};
use crate::decode::{
    Datum, Message, OldTuple, Relation, RelationCache, RelationError, ReplicaIdentity, Tuple,
};
use crate::sql::QualifiedName;
use crate::tenant::{TargetId, TenantId};

/// Why a change cannot be routed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("{table} has no tenant column {column:?}; set tenancy.columns.\"{table}\" to its tenant column")]
    NoTenantColumn { table: String, column: String },
    #[error("{table}: tenant column {column:?} is not part of the replica identity, so deletes do not say whose row they remove. Fix: make the primary key include it, or ALTER TABLE {table} REPLICA IDENTITY FULL")]
    TenantNotInIdentity { table: String, column: String },
    #[error("{table}: a row has a NULL or unreadable tenant value in {column:?}")]
    BadTenantValue { table: String, column: String },
    #[error(transparent)]
    Relation(#[from] RelationError),
    #[error("{table}: tuple has {actual} columns, relation has {expected}")]
    Shape {
        table: String,
        expected: usize,
        actual: usize,
    },
}

/// Where a moving tenant's rows go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub target: TargetId,
    pub schema: String,
}

/// One routed row operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowOp<'a> {
    /// Insert or, for an UPDATE, the new row (columns with unchanged TOAST are `UnchangedToast`).
    Upsert { new: &'a Tuple, update: bool },
    /// Delete the row with this old key or full old row.
    Delete { old: &'a Tuple },
    /// UPDATE that changed the primary key: delete `old`, then write `new`.
    Rekey { old: &'a Tuple, new: &'a Tuple },
    /// TRUNCATE of the table: for a shared table, delete only this tenant's rows.
    Truncate,
}

/// A change for one moving tenant, with its place at the target (borrowed from the router
/// and the relation; the tenant id is the router's, shared: routing allocates nothing per
/// change).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed<'a> {
    pub tenant: TenantId,
    pub destination: &'a Destination,
    /// The source table's name; the target table has it in the destination schema.
    pub name: &'a str,
    pub op: RowOp<'a>,
}

impl Routed<'_> {
    /// The table at the target.
    pub fn table(&self) -> QualifiedName {
        QualifiedName {
            schema: self.destination.schema.clone(),
            name: self.name.to_owned(),
        }
    }
}

/// Routes changes of the moving tenants; everything else is filtered out.
#[derive(Clone, Debug)]
pub struct Router {
    tenancy: Tenancy,
    moving: BTreeMap<TenantId, Destination>,
}

enum TenantKey<'r> {
    /// The schema's name, checked to be a valid tenant id.
    Schema(&'r str),
    Column(usize),
}

impl Router {
    pub fn new(tenancy: Tenancy) -> Self {
        Router {
            tenancy,
            moving: BTreeMap::new(),
        }
    }

    pub fn start(&mut self, tenant: TenantId, destination: Destination) {
        self.moving.insert(tenant, destination);
    }

    pub fn stop(&mut self, tenant: &TenantId) {
        self.moving.remove(tenant);
    }

    pub fn is_moving(&self, tenant: &TenantId) -> bool {
        self.moving.contains_key(tenant)
    }

    fn name(rel: &Relation) -> QualifiedName {
        QualifiedName {
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
        }
    }

    fn key<'r>(&self, rel: &'r Relation) -> Result<TenantKey<'r>, RouteError> {
        if self.tenancy.mode == TenancyMode::Schema {
            TenantId::check(&rel.namespace).map_err(|_| RouteError::BadTenantValue {
                table: Self::name(rel).to_string(),
                column: "(schema)".into(),
            })?;
            return Ok(TenantKey::Schema(&rel.namespace));
        }
        let column = self.tenancy.column_in(&rel.namespace, &rel.name);
        let idx = rel
            .columns
            .iter()
            .position(|c| c.name == column)
            .ok_or_else(|| RouteError::NoTenantColumn {
                table: Self::name(rel).to_string(),
                column: column.to_owned(),
            })?;
        let in_identity = match rel.replica_identity {
            ReplicaIdentity::Full => true,
            ReplicaIdentity::Nothing => false,
            ReplicaIdentity::Default | ReplicaIdentity::Index => rel.columns[idx].is_key(),
        };
        if !in_identity {
            return Err(RouteError::TenantNotInIdentity {
                table: Self::name(rel).quoted(),
                column: column.to_owned(),
            });
        }
        Ok(TenantKey::Column(idx))
    }

    /// Checks a relation once when it (re)appears, so a bad table is reported before any
    /// of its rows is routed.
    pub fn validate(&self, rel: &Relation) -> Result<(), RouteError> {
        self.key(rel).map(|_| ())
    }

    /// The tenant value of `tuple`, checked to be a valid tenant id (not necessarily a
    /// moving one).
    fn tenant_in<'r>(
        &self,
        rel: &Relation,
        key: &TenantKey<'r>,
        tuple: &'r Tuple,
    ) -> Result<Option<&'r str>, RouteError> {
        match key {
            TenantKey::Schema(id) => Ok(Some(id)),
            TenantKey::Column(idx) => {
                if tuple.0.len() != rel.columns.len() {
                    return Err(RouteError::Shape {
                        table: Self::name(rel).to_string(),
                        expected: rel.columns.len(),
                        actual: tuple.0.len(),
                    });
                }
                let bad = || RouteError::BadTenantValue {
                    table: Self::name(rel).to_string(),
                    column: rel.columns[*idx].name.clone(),
                };
                match &tuple.0[*idx] {
                    Datum::Text(b) => std::str::from_utf8(b)
                        .ok()
                        .filter(|s| TenantId::check(s).is_ok())
                        .map(Some)
                        .ok_or_else(bad),
                    Datum::Null => Ok(None),
                    _ => Err(bad()),
                }
            }
        }
    }

    /// `op` for `tenant` if that tenant is moving (the id is the router's, shared).
    fn routed<'a>(
        &'a self,
        rel: &'a Relation,
        tenant: Option<&str>,
        op: RowOp<'a>,
    ) -> Option<Routed<'a>> {
        let (tenant, destination) = self.moving.get_key_value(tenant?)?;
        Some(Routed {
            tenant: tenant.clone(),
            destination,
            name: &rel.name,
            op,
        })
    }

    pub fn insert<'a>(
        &'a self,
        rel: &'a Relation,
        new: &'a Tuple,
    ) -> Result<Vec<Routed<'a>>, RouteError> {
        let key = self.key(rel)?;
        let tenant = self.tenant_in(rel, &key, new)?;
        Ok(self
            .routed(rel, tenant, RowOp::Upsert { new, update: false })
            .into_iter()
            .collect())
    }

    pub fn update<'a>(
        &'a self,
        rel: &'a Relation,
        old: Option<&'a OldTuple>,
        new: &'a Tuple,
    ) -> Result<Vec<Routed<'a>>, RouteError> {
        let key = self.key(rel)?;
        let new_tenant = self.tenant_in(rel, &key, new)?;
        let Some(old) = old else {
            // Key unchanged: same row, same tenant.
            return Ok(self
                .routed(rel, new_tenant, RowOp::Upsert { new, update: true })
                .into_iter()
                .collect());
        };
        let old_tuple = old.tuple();
        let old_tenant = self.tenant_in(rel, &key, old_tuple)?;
        if old_tenant == new_tenant {
            let op = match old {
                // FULL identity sends the old row on every update; the key may be unchanged.
                OldTuple::Full(_) if !key_changed(rel, old_tuple, new) => {
                    RowOp::Upsert { new, update: true }
                }
                _ => RowOp::Rekey {
                    old: old_tuple,
                    new,
                },
            };
            return Ok(self.routed(rel, new_tenant, op).into_iter().collect());
        }
        // The row moved between tenants: it leaves one and arrives at the other.
        let mut out = Vec::new();
        out.extend(self.routed(rel, old_tenant, RowOp::Delete { old: old_tuple }));
        out.extend(self.routed(rel, new_tenant, RowOp::Upsert { new, update: false }));
        Ok(out)
    }

    pub fn delete<'a>(
        &'a self,
        rel: &'a Relation,
        old: &'a OldTuple,
    ) -> Result<Vec<Routed<'a>>, RouteError> {
        let key = self.key(rel)?;
        let tenant = self.tenant_in(rel, &key, old.tuple())?;
        Ok(self
            .routed(rel, tenant, RowOp::Delete { old: old.tuple() })
            .into_iter()
            .collect())
    }

    /// A TRUNCATE reaches every moving tenant of a shared table, and the one tenant of a
    /// schema-per-tenant table.
    pub fn truncate<'a>(&'a self, rel: &'a Relation) -> Result<Vec<Routed<'a>>, RouteError> {
        match self.key(rel)? {
            TenantKey::Schema(id) => Ok(self
                .routed(rel, Some(id), RowOp::Truncate)
                .into_iter()
                .collect()),
            TenantKey::Column(_) => Ok(self
                .moving
                .keys()
                .filter_map(|t| self.routed(rel, Some(t.as_str()), RowOp::Truncate))
                .collect()),
        }
    }
}

impl Router {
    /// Routes one decoded row message (INSERT, UPDATE, DELETE or TRUNCATE) using the
    /// relation cache; other messages route nowhere. Each entry pairs the relation with the
    /// operations it yields (a TRUNCATE of several tables yields one entry per table).
    pub fn message<'a>(
        &'a self,
        relations: &'a RelationCache,
        message: &'a Message,
    ) -> Result<Vec<(&'a Relation, Vec<Routed<'a>>)>, RouteError> {
        Ok(match message {
            Message::Insert(i) => {
                let rel = relations.resolve(i.relation)?;
                vec![(rel, self.insert(rel, &i.new)?)]
            }
            Message::Update(u) => {
                let rel = relations.resolve(u.relation)?;
                vec![(rel, self.update(rel, u.old.as_ref(), &u.new)?)]
            }
            Message::Delete(d) => {
                let rel = relations.resolve(d.relation)?;
                vec![(rel, self.delete(rel, &d.old)?)]
            }
            Message::Truncate(t) => t
                .relations
                .iter()
                .map(|id| {
                    let rel = relations.resolve(*id)?;
                    Ok((rel, self.truncate(rel)?))
                })
                .collect::<Result<_, RouteError>>()?,
            _ => Vec::new(),
        })
    }
}

/// Whether any replica identity column differs between the old full row and the new row.
/// Unchanged TOAST in the new row means "same as old", so it never counts as a change.
fn key_changed(rel: &Relation, old: &Tuple, new: &Tuple) -> bool {
    rel.columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_key())
        .any(|(i, _)| match (old.0.get(i), new.0.get(i)) {
            (_, Some(Datum::UnchangedToast)) => false,
            (a, b) => a != b,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Column, RelationId};
    use bytes::Bytes;

    fn rel(identity: ReplicaIdentity, cols: &[(&str, bool)]) -> Relation {
        Relation {
            xid: None,
            id: RelationId(1),
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: identity,
            columns: cols
                .iter()
                .map(|(n, k)| Column {
                    flags: u8::from(*k),
                    name: (*n).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn t(vals: &[Option<&str>]) -> Tuple {
        Tuple(
            vals.iter()
                .map(|v| match v {
                    Some(s) => Datum::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => Datum::Null,
                })
                .collect(),
        )
    }

    fn router() -> Router {
        let mut r = Router::new(Tenancy::default());
        r.start(
            TenantId::new("7").unwrap(),
            Destination {
                target: TargetId::new("local").unwrap(),
                schema: "acme".into(),
            },
        );
        r
    }

    // (tenant_id, id) primary key: the tenant is in the identity.
    fn keyed() -> Relation {
        rel(
            ReplicaIdentity::Default,
            &[("tenant_id", true), ("id", true), ("v", false)],
        )
    }

    #[test]
    fn only_moving_tenants_are_routed() {
        let r = router();
        let mine = t(&[Some("7"), Some("1"), Some("x")]);
        let other = t(&[Some("8"), Some("1"), Some("x")]);
        let keyed = keyed();
        let routed = r.insert(&keyed, &mine).unwrap();
        assert_eq!(routed.len(), 1);
        assert_eq!(
            routed[0].table(),
            QualifiedName::parse("acme.orders").unwrap()
        );
        assert!(r.insert(&keyed, &other).unwrap().is_empty());
    }

    #[test]
    fn tenant_must_be_in_the_identity() {
        let r = router();
        let no = rel(
            ReplicaIdentity::Default,
            &[("tenant_id", false), ("id", true)],
        );
        assert!(matches!(
            r.validate(&no),
            Err(RouteError::TenantNotInIdentity { .. })
        ));
        let full = rel(
            ReplicaIdentity::Full,
            &[("tenant_id", false), ("id", false)],
        );
        assert!(r.validate(&full).is_ok());
        let missing = rel(ReplicaIdentity::Default, &[("account", true)]);
        assert!(matches!(
            r.validate(&missing),
            Err(RouteError::NoTenantColumn { .. })
        ));
    }

    #[test]
    fn updates_moving_a_row_between_tenants_split_in_two() {
        let mut r = router();
        r.start(
            TenantId::new("8").unwrap(),
            Destination {
                target: TargetId::new("shard2").unwrap(),
                schema: "globex".into(),
            },
        );
        let old = OldTuple::Key(t(&[Some("7"), Some("1"), None]));
        let new = t(&[Some("8"), Some("1"), Some("x")]);
        let keyed = keyed();
        let routed = r.update(&keyed, Some(&old), &new).unwrap();
        assert_eq!(routed.len(), 2);
        assert_eq!(routed[0].tenant.as_str(), "7");
        assert!(matches!(routed[0].op, RowOp::Delete { .. }));
        assert_eq!(routed[1].tenant.as_str(), "8");
        assert!(matches!(routed[1].op, RowOp::Upsert { update: false, .. }));
        // Only the old tenant moving: just the delete.
        r.stop(&TenantId::new("8").unwrap());
        let routed = r.update(&keyed, Some(&old), &new).unwrap();
        assert_eq!(routed.len(), 1);
        assert!(matches!(routed[0].op, RowOp::Delete { .. }));
    }

    #[test]
    fn key_changes_within_a_tenant_rekey_and_full_identity_without_change_upserts() {
        let r = router();
        let old = OldTuple::Key(t(&[Some("7"), Some("1"), None]));
        let new = t(&[Some("7"), Some("2"), Some("x")]);
        let keyed = keyed();
        let routed = r.update(&keyed, Some(&old), &new).unwrap();
        assert!(matches!(routed[0].op, RowOp::Rekey { .. }));

        let full = rel(
            ReplicaIdentity::Full,
            &[("tenant_id", false), ("id", false), ("v", false)],
        );
        let old = OldTuple::Full(t(&[Some("7"), Some("1"), Some("a")]));
        let new = t(&[Some("7"), Some("1"), Some("b")]);
        let routed = r.update(&full, Some(&old), &new).unwrap();
        assert!(matches!(routed[0].op, RowOp::Upsert { update: true, .. }));
        assert!(r.update(&keyed, None, &new).is_ok());
    }

    #[test]
    fn deletes_and_truncates() {
        let r = router();
        let old = OldTuple::Key(t(&[Some("7"), Some("1"), None]));
        let keyed = keyed();
        let routed = r.delete(&keyed, &old).unwrap();
        assert!(matches!(routed[0].op, RowOp::Delete { .. }));
        let routed = r.truncate(&keyed).unwrap();
        assert_eq!(routed.len(), 1);
        assert_eq!(routed[0].op, RowOp::Truncate);
    }

    #[test]
    fn a_null_tenant_is_no_ones_row_and_setting_it_makes_the_row_leave() {
        let r = router();
        let rel = keyed();
        let null_tenant = t(&[None, Some("1"), Some("x")]);
        assert!(r.insert(&rel, &null_tenant).unwrap().is_empty());
        let old = OldTuple::Key(t(&[Some("7"), Some("1"), None]));
        let routed = r.update(&rel, Some(&old), &null_tenant).unwrap();
        assert_eq!(routed.len(), 1, "{routed:?}");
        assert_eq!(routed[0].tenant.as_str(), "7");
        assert!(matches!(routed[0].op, RowOp::Delete { .. }));
        let back = OldTuple::Key(null_tenant.clone());
        let row = t(&[Some("7"), Some("1"), Some("x")]);
        let arrive = r.update(&rel, Some(&back), &row).unwrap();
        assert_eq!(arrive.len(), 1, "{arrive:?}");
        assert!(matches!(arrive[0].op, RowOp::Upsert { update: false, .. }));
    }

    #[test]
    fn malformed_tenant_values_are_errors() {
        let r = router();
        let empty = t(&[Some(""), Some("1"), Some("x")]);
        assert!(matches!(
            r.insert(&keyed(), &empty),
            Err(RouteError::BadTenantValue { .. })
        ));
        let short = t(&[Some("7")]);
        assert!(matches!(
            r.insert(&keyed(), &short),
            Err(RouteError::Shape { .. })
        ));
    }

    #[test]
    fn messages_route_through_the_relation_cache() {
        use crate::decode::{Insert, Truncate};
        let r = router();
        let mut cache = RelationCache::new();
        let row = t(&[Some("7"), Some("1"), Some("x")]);
        let insert = Message::Insert(Insert {
            xid: None,
            relation: RelationId(1),
            new: row,
        });
        assert!(matches!(
            r.message(&cache, &insert),
            Err(RouteError::Relation(_))
        ));
        cache.apply(keyed());
        let routed = r.message(&cache, &insert).unwrap();
        assert_eq!(routed.len(), 1);
        assert_eq!(routed[0].1.len(), 1);
        let truncate = Message::Truncate(Truncate {
            xid: None,
            options: 0,
            relations: vec![RelationId(1), RelationId(1)],
        });
        assert_eq!(r.message(&cache, &truncate).unwrap().len(), 2);
        assert!(r.message(&cache, &Message::StreamStop).unwrap().is_empty());
    }

    #[test]
    fn schema_per_tenant_uses_the_namespace() {
        let mut r = Router::new(Tenancy {
            mode: TenancyMode::Schema,
            ..Tenancy::default()
        });
        r.start(
            TenantId::new("tenant_a").unwrap(),
            Destination {
                target: TargetId::new("shard2").unwrap(),
                schema: "tenant_a".into(),
            },
        );
        let mut relation = rel(ReplicaIdentity::Default, &[("id", true), ("v", false)]);
        relation.namespace = "tenant_a".into();
        let row = t(&[Some("1"), Some("x")]);
        assert_eq!(r.insert(&relation, &row).unwrap().len(), 1);
        relation.namespace = "tenant_b".into();
        assert!(r.insert(&relation, &row).unwrap().is_empty());
        relation.namespace = "tenant_a".into();
        assert_eq!(r.truncate(&relation).unwrap().len(), 1);
    }
}
