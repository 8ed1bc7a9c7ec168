//! Apply: routed changes → target transactions.
//!
//! Invariants (of what is built so far):
//! - [`statement`] turns one routed row operation into one parameterized statement; values are
//!   bound as text and cast to the target column type, never formatted into SQL.
//! - [`execute`] runs a statement and enforces its expected row count, so a target that
//!   diverged from the source for a key is reported, not silently repaired.
//! - [`durable::DurableTracker`] decides what may be confirmed to the source: the minimum
//!   over targets of what they have durably committed.

pub mod applier;
pub mod compaction;
pub mod copy;
pub mod durable;
pub mod lanes;
pub mod progress;
pub mod spill;
pub mod statement;
pub mod writer;

use crate::cluster::ClusterError;
pub use crate::sql::CopyFormat;
pub use copy::{CopyRows, RowBuffer};
pub use progress::Progress;
pub use statement::{build, Statement, StatementError, TargetColumn, TargetTable};
pub use writer::{SourceTxn, TargetCatalog, TargetWriter, Work, WriterStats};

/// Errors while applying to a target.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Statement(#[from] StatementError),
    #[error("target state is inconsistent: {0}")]
    Corrupt(String),
    #[error(
        "target diverged from the source: `{sql}` affected {actual} rows, expected {expected}"
    )]
    Divergence {
        sql: String,
        expected: u64,
        actual: u64,
    },
    /// The apply task lost a share of work it cannot redo, or an error outside any one
    /// tenant's rows stopped every tenant of a segment.
    #[error("target {target}: {detail}")]
    Target { target: String, detail: String },
}

impl ApplyError {
    /// Worth retrying on a new connection (the one test the apply task makes; the daemon's
    /// `classify()` agrees: these and only these are transient there).
    pub fn is_transient(&self) -> bool {
        matches!(self, ApplyError::Cluster(e) if e.is_transient())
    }
}

/// Runs `st` on `client` (typically inside the batch's transaction) and checks its row count.
pub async fn execute(
    client: &impl tokio_postgres::GenericClient,
    st: &Statement,
) -> Result<u64, ApplyError> {
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = st
        .params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let types = vec![tokio_postgres::types::Type::TEXT; st.params.len()];
    let prepared = client
        .prepare_typed(&st.sql, &types)
        .await
        .map_err(ClusterError::sql(format!("preparing `{}`", st.sql)))?;
    let n = client
        .execute(&prepared, &params)
        .await
        .map_err(ClusterError::sql(format!("running `{}`", st.sql)))?;
    check_count(st, n)
}

/// The strict row count: a statement that must hit one row and hit none (or two) means the
/// target diverged from the source for that key.
pub(crate) fn check_count(st: &Statement, n: u64) -> Result<u64, ApplyError> {
    match st.expect_rows {
        Some(expected) if n != expected => Err(ApplyError::Divergence {
            sql: st.sql.clone(),
            expected,
            actual: n,
        }),
        _ => Ok(n),
    }
}
