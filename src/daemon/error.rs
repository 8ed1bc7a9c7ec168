//! The crate error, the move engine's own errors ([`MoveError`]), and the one place errors
//! are classified for retry decisions. It lives in the daemon, the top layer: the only one
//! that decides across layers whether to retry, stop a tenant or stop.
//!
//! Invariants:
//! - Every layer has its own error enum; this type only wraps them, keeping `#[source]`
//!   chains intact for logs (`error = %err`).
//! - [`Error::classify`] is the single policy: transient (retry the connection or step),
//!   tenant-fatal (quarantine one tenant, keep the pipeline), fatal (stop, confirm nothing
//!   further). Callers never match on error text.

use crate::apply::ApplyError;
use crate::assembly::AssemblyError;
use crate::backfill::reader::ReadError;
use crate::backfill::BackfillError;
use crate::checkpoint::CheckpointError;
use crate::cluster::ClusterError;
use crate::config::ConfigError;
use crate::cutover::CutoverError;
use crate::decode::{DecodeError, RelationError};
use crate::layout::LayoutError;
use crate::lsn::Lsn;
use crate::provision::ProvisionError;
use crate::registry::RegistryError;
use crate::route::RouteError;
use crate::source::SourceError;
use crate::verify::VerifyError;

/// Move-level errors: each stops one tenant (tenant-fatal), except a wrong cluster.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("source table {table} changed ({detail}); the move is paused so nothing is applied with the old shape. Apply the same change to the target, then resume the move (set its state to 'provisioning'); it is copied again")]
    Ddl { table: String, detail: String },
    #[error("{table}: a row has a NULL or unreadable primary key value")]
    KeyValue { table: String },
    #[error("{table}: the chunk data the source sent is malformed: {detail}")]
    ChunkData { table: String, detail: String },
    #[error("target table {table} already holds rows of this tenant that switchyard did not write; empty it or choose another target schema")]
    TargetNotEmpty { table: String },
    #[error("target {target} has no progress record for this tenant although {recorded} was applied there (restored from a backup?); resume the move to copy it again")]
    LostProgress { target: String, recorded: Lsn },
    #[error("table {table} of this tenant appeared after the move started: it is neither copied nor fenced, so the move cannot cut over. Fix: set the move's state to 'provisioning' to copy the tenant again with it (or take the table out of the publication)")]
    NewTable { table: String },
    #[error("target {target} holds this tenant only up to {found}, but {recorded} was applied there and confirmed to the source (the target came back from a crash with asynchronous commits, an asynchronous failover or a restore): the changes in between are gone from the slot. Copy the tenant again: set the move's state to 'provisioning'")]
    TargetBehind {
        target: String,
        found: Lsn,
        recorded: Lsn,
    },
    #[error("the source slot was found confirmed to {to} while this daemon had confirmed only {from} (the slot was dropped and created again, advanced with pg_replication_slot_advance, or acknowledged by another consumer): the changes in between never reached the target. Copy the tenant again: set the move's state to 'provisioning'")]
    SlotAdvanced { from: Lsn, to: Lsn },
    #[error("the tenant's target lags {held} bytes of WAL behind the stream, over the budget of {budget} (move.wal_budget_mb); it was failed so the slot does not keep WAL for it")]
    WalBudget { held: u64, budget: u64 },
    #[error("a source transaction (xid {xid}) brings the moving tenants more than {limit} bytes of changes (move.max_txn_mb), this tenant's change crossing it; the daemon holds a transaction whole until its commit, so the tenant was failed rather than the daemon's memory exhausted. Raise move.max_txn_mb (the daemon needs about twice it in memory) and resume the move")]
    TransactionTooLarge { xid: u32, limit: u64 },
    #[error("the backfill state stored on the target is unreadable: {0}")]
    BadState(String),
    #[error("target {target}: {detail}")]
    Target { target: String, detail: String },
    #[error(transparent)]
    Backfill(#[from] BackfillError),
    #[error("the state directory belongs to slot {recorded_slot:?} on cluster {recorded}, but the source is cluster {actual} (slot {slot:?}); use another state directory")]
    WrongCluster {
        recorded_slot: String,
        recorded: String,
        slot: String,
        actual: String,
    },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("another switchyard daemon runs slot {slot:?} (it holds the daemon lease); start this one with --standby to take over when that one stops")]
    Leased { slot: String },
    #[error("the registry connection that held the daemon lease for slot {slot:?} was lost and another daemon holds it now; stopping")]
    LeaseLost { slot: String },
}

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
    Assembly(#[from] AssemblyError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
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

/// A chunk read's error, as the move engine states it: its connection's errors stay
/// cluster errors (a transient one is read again), its data errors stop the tenant.
impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Cluster(e) => Error::Cluster(e),
            ReadError::KeyValue { table } => Error::Move(MoveError::KeyValue { table }),
            ReadError::ChunkData { table, detail } => {
                Error::Move(MoveError::ChunkData { table, detail })
            }
        }
    }
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
            Error::Registry(e) => registry(e),
            Error::Provision(e) => provision(e),
            Error::Route(_) => ErrorClass::TenantFatal,
            Error::Apply(e) => apply(e),
            Error::Source(e) => source(e),
            Error::Cluster(e) => classify_cluster(e),
            // A message we cannot read might be any tenant's change: never skip it.
            Error::Decode(_) | Error::Relation(_) | Error::Assembly(_) => ErrorClass::Fatal,
            Error::Io { .. } => ErrorClass::Fatal,
            Error::Move(e) => moving(e),
            Error::Layout(e) => layout(e),
            Error::Cutover(e) => cutover(e),
            Error::Verify(e) => verify(e),
        }
    }
}

fn registry(e: &RegistryError) -> ErrorClass {
    match e {
        RegistryError::Cluster(e) => classify_cluster(e),
        // Someone changed the row meanwhile: re-read and decide again.
        RegistryError::Conflict { .. } => ErrorClass::Transient,
        RegistryError::AlreadyMoving { .. } | RegistryError::BadRow { .. } => {
            ErrorClass::TenantFatal
        }
        _ => ErrorClass::Fatal,
    }
}

fn provision(e: &ProvisionError) -> ErrorClass {
    match e {
        ProvisionError::Cluster(e) if classify_cluster(e) == ErrorClass::Transient => {
            ErrorClass::Transient
        }
        _ => ErrorClass::TenantFatal,
    }
}

fn apply(e: &ApplyError) -> ErrorClass {
    match e {
        ApplyError::Cluster(e) => classify_cluster(e),
        _ => ErrorClass::TenantFatal,
    }
}

fn source(e: &SourceError) -> ErrorClass {
    if e.is_transient() {
        ErrorClass::Transient
    } else {
        ErrorClass::Fatal
    }
}

fn verify(e: &VerifyError) -> ErrorClass {
    match e {
        VerifyError::Cluster(e) => classify_cluster(e),
        _ => ErrorClass::TenantFatal,
    }
}

fn moving(e: &MoveError) -> ErrorClass {
    match e {
        // The source is not the one the state belongs to, or another daemon runs it:
        // going on could confirm what this state never applied.
        MoveError::WrongCluster { .. }
        | MoveError::Protocol(_)
        | MoveError::Leased { .. }
        | MoveError::LeaseLost { .. } => ErrorClass::Fatal,
        _ => ErrorClass::TenantFatal,
    }
}

fn layout(e: &LayoutError) -> ErrorClass {
    match e {
        LayoutError::Cluster(e) => classify_cluster(e),
        LayoutError::Source(e) => source(e),
        LayoutError::Provision(e) => provision(e),
        // A tenant whose tables cannot be read or moved stops alone.
        _ => ErrorClass::TenantFatal,
    }
}

/// The cutover's own errors; what it met in another layer is classified as there.
fn cutover(e: &CutoverError) -> ErrorClass {
    match e {
        CutoverError::Cluster(e) => classify_cluster(e),
        CutoverError::Registry(e) => registry(e),
        CutoverError::Layout(e) => layout(e),
        CutoverError::Verify(e) => verify(e),
        CutoverError::Source(e) => source(e),
        CutoverError::Route(_) => ErrorClass::TenantFatal,
        CutoverError::Apply(e) => apply(e),
        CutoverError::Provision(e) => provision(e),
        // Re-read the registry and decide again.
        CutoverError::Conflict(_) => ErrorClass::Transient,
        CutoverError::AlreadyMoved
        | CutoverError::CannotSeeSessions
        | CutoverError::BadTargetSchema { .. } => ErrorClass::TenantFatal,
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

    #[test]
    fn the_apply_task_retries_exactly_what_classify_calls_transient() {
        let errors = [
            ApplyError::Cluster(ClusterError::Tls("handshake".into())),
            ApplyError::Corrupt("x".into()),
            ApplyError::Target {
                target: "t".into(),
                detail: "lane stopped".into(),
            },
            ApplyError::Divergence {
                sql: "DELETE".into(),
                expected: 1,
                actual: 0,
            },
        ];
        for e in errors {
            let retried = e.is_transient();
            let class = Error::Apply(e).classify();
            assert_eq!(retried, class == ErrorClass::Transient, "{class:?}");
            assert_ne!(class, ErrorClass::Transient);
        }
    }

    #[test]
    fn what_the_cutover_met_in_another_layer_is_classified_as_there() {
        let conflict = || RegistryError::Conflict {
            id: 1,
            expected: crate::registry::MoveState::Streaming,
            actual: crate::registry::MoveState::Paused,
        };
        assert_eq!(
            Error::Registry(conflict()).classify(),
            ErrorClass::Transient
        );
        assert_eq!(
            Error::Cutover(CutoverError::Registry(conflict())).classify(),
            ErrorClass::Transient
        );
        let missing = || SourceError::SlotMissing { slot: "s".into() };
        assert_eq!(
            Error::Cutover(CutoverError::Source(missing())).classify(),
            Error::Source(missing()).classify()
        );
        assert_eq!(
            Error::Cutover(CutoverError::AlreadyMoved).classify(),
            ErrorClass::TenantFatal
        );
    }
}
