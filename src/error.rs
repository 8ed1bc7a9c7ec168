//! The crate error and the one place errors are classified for retry decisions.
//!
//! Invariants:
//! - Every layer has its own error enum; this type only wraps them, keeping `#[source]`
//!   chains intact for logs (`error = %err`).
//! - [`Error::classify`] is the single policy: transient (retry the connection or step),
//!   tenant-fatal (quarantine one tenant, keep the pipeline), fatal (stop, confirm nothing
//!   further). Callers never match on error text.

use crate::apply::ApplyError;
use crate::checkpoint::CheckpointError;
use crate::cluster::ClusterError;
use crate::config::ConfigError;
use crate::cutover::CutoverError;
use crate::daemon::MoveError;
use crate::decode::{DecodeError, RelationError};
use crate::provision::ProvisionError;
use crate::registry::RegistryError;
use crate::route::RouteError;
use crate::source::SourceError;
use crate::verify::VerifyError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Relation(#[from] RelationError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Move(#[from] MoveError),
    #[error(transparent)]
    Cutover(#[from] CutoverError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the pipeline reacts to an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff: network, restarts, lock timeouts.
    Transient,
    /// Only the affected tenant stops (e.g. its target rejects its rows); others go on.
    TenantFatal,
    /// The whole pipeline stops: data could be lost or corrupted by going on.
    Fatal,
}

impl ErrorClass {
    /// What an operator should do, for logs and the registry.
    pub fn hint(self) -> &'static str {
        match self {
            ErrorClass::Transient => "retrying automatically",
            ErrorClass::TenantFatal => "the tenant is paused; fix the cause and resume it",
            ErrorClass::Fatal => "switchyard stopped; fix the cause and restart it",
        }
    }
}

/// SQL errors: transient ones are retried (see [`crate::cluster::is_transient_sqlstate`]);
/// authentication is fatal; anything else concerns the rows at hand.
fn classify_cluster(e: &ClusterError) -> ErrorClass {
    match e {
        ClusterError::Tls(_) | ClusterError::Insecure(_) => ErrorClass::Fatal,
        _ if e.is_transient() => ErrorClass::Transient,
        _ if e.sqlstate().is_some_and(|c| c.starts_with("28")) => ErrorClass::Fatal,
        _ => ErrorClass::TenantFatal,
    }
}

impl Error {
    pub fn classify(&self) -> ErrorClass {
        match self {
            Error::Config(_) => ErrorClass::Fatal,
            Error::Checkpoint(_) => ErrorClass::Fatal,
            Error::Registry(RegistryError::Cluster(e)) => classify_cluster(e),
            // Someone changed the row meanwhile: re-read and decide again.
            Error::Registry(RegistryError::Conflict { .. }) => ErrorClass::Transient,
            Error::Registry(RegistryError::AlreadyMoving { .. } | RegistryError::BadRow { .. }) => {
                ErrorClass::TenantFatal
            }
            Error::Registry(_) => ErrorClass::Fatal,
            Error::Provision(ProvisionError::Cluster(e)) => match classify_cluster(e) {
                ErrorClass::Transient => ErrorClass::Transient,
                _ => ErrorClass::TenantFatal,
            },
            Error::Provision(_) | Error::Route(_) => ErrorClass::TenantFatal,
            Error::Apply(ApplyError::Cluster(e)) => classify_cluster(e),
            Error::Apply(_) => ErrorClass::TenantFatal,
            Error::Source(e) if e.is_transient() => ErrorClass::Transient,
            Error::Source(_) => ErrorClass::Fatal,
            Error::Cluster(e) => classify_cluster(e),
            // A message we cannot read might be any tenant's change: never skip it.
            Error::Decode(_) | Error::Relation(_) => ErrorClass::Fatal,
            Error::Io { .. } => ErrorClass::Fatal,
            Error::Move(e) => e.class(),
            Error::Cutover(CutoverError::Cluster(e)) | Error::Verify(VerifyError::Cluster(e)) => {
                classify_cluster(e)
            }
            // Re-read the registry and decide again.
            Error::Cutover(CutoverError::Conflict(_)) => ErrorClass::Transient,
            Error::Cutover(CutoverError::AlreadyMoved | CutoverError::CannotSeeSessions)
            | Error::Verify(_) => ErrorClass::TenantFatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ServerNotice;

    #[test]
    fn classification_covers_each_layer() {
        let transient = Error::Source(SourceError::Closed);
        assert_eq!(transient.classify(), ErrorClass::Transient);
        let missing = Error::Source(SourceError::SlotMissing { slot: "s".into() });
        assert_eq!(missing.classify(), ErrorClass::Fatal);
        let auth = Error::Source(SourceError::Server {
            context: "auth".into(),
            notice: Box::new(ServerNotice {
                code: "28P01".into(),
                ..Default::default()
            }),
        });
        assert_eq!(auth.classify(), ErrorClass::Fatal);
        let cfg = Error::Config(ConfigError::Invalid {
            field: "x".into(),
            reason: "y".into(),
        });
        assert_eq!(cfg.classify(), ErrorClass::Fatal);
        assert_eq!(
            Error::Cluster(ClusterError::Tls("x".into())).classify(),
            ErrorClass::Fatal
        );
        assert!(!ErrorClass::TenantFatal.hint().is_empty());
        let divergence = Error::Apply(ApplyError::Divergence {
            sql: "UPDATE".into(),
            expected: 1,
            actual: 0,
        });
        assert_eq!(divergence.classify(), ErrorClass::TenantFatal);
        let route = Error::Route(RouteError::BadTenantValue {
            table: "t".into(),
            column: "c".into(),
        });
        assert_eq!(route.classify(), ErrorClass::TenantFatal);
        let corrupt = Error::Checkpoint(CheckpointError::Corrupt {
            key: "k".into(),
            detail: "d".into(),
        });
        assert_eq!(corrupt.classify(), ErrorClass::Fatal);
    }
}
