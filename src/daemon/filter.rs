//! The stream's row filter, kept to the tenants the registry is moving (see
//! `source::filter` for what can be filtered).
//!
//! Invariants:
//! - One change of the filter at a time per publication (a transaction-level advisory lock),
//!   and each lists every tenant whose move is requested or consumes the stream, read from
//!   the registry under that lock: a setup joining a tenant and a sync dropping finished
//!   ones cannot undo each other.
//! - A fresh move's tenant joins before its copy starts, and the setup waits for the
//!   transactions older than the change (`source::filter::wait_older`). A move resumed after
//!   a restart was joined at its first setup; the sync at start keeps it listed.
//! - A tenant leaves only once no move of it is requested or consumes the stream (cut over,
//!   cancelled, failed, paused: each starts over with a fresh setup if it moves again).
//! - `row_filter = false` removes switchyard's filters at start and changes nothing after.
//! - Without the privileges to change the publication (owner of it and of its tables) the
//!   stream stays unfiltered: slower, never wrong. The warning says what to grant.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_postgres::Client;

use super::error::Error;
use crate::cluster::ClusterError;
use crate::config::{Config, TenancyMode};
use crate::registry::MoveState;
use crate::source::filter::{self, Narrowed};
use crate::sql::{quote_ident, quote_literal};
use crate::tenant::TenantId;

/// Longest wait for transactions older than a tenant's joining the filter.
const OLDER_WAIT: Duration = Duration::from_secs(300);

/// States whose tenants the stream must carry.
pub(super) fn listed(state: MoveState) -> bool {
    state == MoveState::Requested || state.consumes_stream()
}

/// Brings the publication's row filter to the registry's moving tenants (and `joining`);
/// with `joining`, returns only once the stream carries every change of it that a copy
/// started now would not read.
pub(super) async fn sync(
    config: &Config,
    client: &mut Client,
    joining: Option<&TenantId>,
) -> Result<(), Error> {
    // Off, only the sync at start runs: it removes the filters an earlier run left.
    if config.tenancy.mode == TenancyMode::Schema
        || (!config.replication.row_filter && joining.is_some())
    {
        return Ok(());
    }
    let publication = &config.replication.publication;
    let registry = quote_ident(&config.registry_schema);
    let tx = client
        .transaction()
        .await
        .map_err(ClusterError::sql("starting a row filter change"))?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '30s'; \
         SELECT pg_advisory_xact_lock(hashtext('switchyard.filter'), hashtext({}))",
        quote_literal(publication)
    ))
    .await
    .map_err(ClusterError::sql("locking the publication's row filter"))?;
    let states: Vec<&str> = MoveState::ALL
        .iter()
        .filter(|s| listed(**s))
        .map(|s| s.as_str())
        .collect();
    let mut tenants: BTreeSet<String> = tx
        .query(
            &format!("SELECT DISTINCT tenant FROM {registry}.moves WHERE state = ANY ($1)"),
            &[&states],
        )
        .await
        .map_err(ClusterError::sql("listing the moving tenants"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(t) = joining {
        tenants.insert(t.to_string());
    }
    let tenants: Vec<String> = tenants.into_iter().collect();
    let narrowed = filter::narrow(
        &tx,
        publication,
        |t| config.tenancy.column_of(t).to_string(),
        config.replication.row_filter.then_some(&tenants[..]),
        &format!("{registry}.fence_gate_values"),
    )
    .await;
    match narrowed {
        Ok(Narrowed::Filtered { tables, tenants }) => {
            tx.commit()
                .await
                .map_err(ClusterError::sql("committing the row filter"))?;
            tracing::info!(%publication, tables, tenants, "row filter set: the stream carries the moving tenants' rows only");
        }
        Ok(Narrowed::Cleared) => {
            tx.commit()
                .await
                .map_err(ClusterError::sql("committing the row filter"))?;
            tracing::info!(%publication, "row filter removed (row_filter = false)");
            return Ok(());
        }
        Ok(Narrowed::Unchanged(reason)) => {
            tracing::info!(%publication, %reason, "row filter not set: the stream carries every tenant's rows");
            return Ok(());
        }
        Err(crate::source::SourceError::Cluster(ClusterError::Sql { source, .. }))
            if source.code().map(|c| c.code()) == Some("42501") =>
        {
            tracing::warn!(%publication, error = %source,
                "cannot set the publication's row filter: the stream carries every tenant's rows, which costs the source CPU. Fix: make switchyard's role own the publication and be a member of its tables' owner");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    if joining.is_some() {
        filter::wait_older(&*client, OLDER_WAIT).await?;
    }
    Ok(())
}

/// Runs [`sync`] on a connection of its own (the daemon's loop must not wait for it).
pub(super) async fn sync_detached(config: Config) {
    let result = async {
        let mut client = config.source.connect_sql().await?;
        sync(&config, &mut client, None).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot narrow the publication's row filter now; trying again at the next registry change");
    }
}
