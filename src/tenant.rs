//! Who moves where: tenant and target identifiers.
//!
//! Invariants:
//! - A [`TenantId`] is the tenant key's value as text (the tenant column's value in shared
//!   tables, or the schema name for schema-per-tenant sources); it is never empty and never
//!   contains NUL, so it can always be bound as a SQL parameter and used as a storage key.
//! - A [`TargetId`] names a configured target; it follows the same rules as a SQL name.
//! - Neither is ever formatted into SQL text: values are bound, names go through
//!   [`crate::sql::quote_ident`].
//! - Both are shared, not copied: every change, transaction and lane share carries its
//!   tenant, and every routed transaction its target, so a clone is a reference count, not
//!   an allocation.

use std::fmt;
use std::sync::Arc;

use crate::sql::{check_name, NameError};

/// Why a tenant id is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenantIdError {
    #[error("tenant id is empty")]
    Empty,
    #[error("tenant id {0:?} contains a NUL byte")]
    Nul(String),
    #[error("tenant id is {0} bytes long; at most 1024 are allowed")]
    TooLong(usize),
}

/// The value identifying one tenant.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(Arc<str>);

impl TenantId {
    pub fn new(value: impl Into<String>) -> Result<Self, TenantIdError> {
        let value = value.into();
        Self::check(&value)?;
        Ok(TenantId(value.into()))
    }

    /// Whether `value` is a valid tenant id, without building one (routing checks every
    /// change's tenant value and only keeps those of moving tenants).
    pub fn check(value: &str) -> Result<(), TenantIdError> {
        if value.is_empty() {
            return Err(TenantIdError::Empty);
        }
        if value.contains('\0') {
            return Err(TenantIdError::Nul(value.to_owned()));
        }
        if value.len() > 1024 {
            return Err(TenantIdError::TooLong(value.len()));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Maps keyed by tenant are searched with the text of a change's tenant value.
impl std::borrow::Borrow<str> for TenantId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = TenantIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        TenantId::new(value)
    }
}

impl From<TenantId> for String {
    fn from(id: TenantId) -> String {
        id.0.as_ref().to_owned()
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a configured target location.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TargetId(Arc<str>);

impl TargetId {
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        check_name(&value)?;
        Ok(TargetId(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TargetId {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        TargetId::new(value)
    }
}

impl From<TargetId> for String {
    fn from(id: TargetId) -> String {
        id.0.as_ref().to_owned()
    }
}

impl fmt::Display for TargetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_accept_any_text_but_empty_nul_or_huge() {
        assert!(TenantId::new("acme").is_ok());
        assert!(TenantId::new("42").is_ok());
        assert!(TenantId::new("robert'); DROP TABLE students;--").is_ok());
        assert_eq!(TenantId::new(""), Err(TenantIdError::Empty));
        assert!(matches!(TenantId::new("a\0b"), Err(TenantIdError::Nul(_))));
        assert!(matches!(
            TenantId::new("x".repeat(1025)),
            Err(TenantIdError::TooLong(1025))
        ));
    }

    #[test]
    fn ids_round_trip_through_serde_with_validation() {
        let t: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"acme\"");
        assert!(serde_json::from_str::<TenantId>("\"\"").is_err());
        assert!(serde_json::from_str::<TargetId>("\"shard2\"").is_ok());
        assert!(serde_json::from_str::<TargetId>(&format!("\"{}\"", "x".repeat(64))).is_err());
    }
}
