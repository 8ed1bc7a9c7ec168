//! Before the loop runs: the daemon's lease on its slot, the metrics endpoint's lifetime,
//! and the slot as found at start, checked against the state directory.
//!
//! Invariants:
//! - One daemon per slot: the lease is a session advisory lock on the registry connection,
//!   so it ends with that connection and a dead daemon's lease is free at once.
//! - A slot confirmed past what the state directory recorded was moved by something else;
//!   every tenant with a record gets a durable gap before anything else runs.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::error::{Error, MoveError};
use crate::checkpoint::{Batch, SlotGap, SlotRecord, Store, Writer};
use crate::cluster::ClusterError;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::source::{self, SourceError};

/// How `run` starts.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Create the publication and slot if they are missing (first start only: a state
    /// directory that recorded a slot never gets a new one).
    pub create_slot: bool,
    /// If another daemon holds this slot's lease, wait and take over when it stops
    /// (instead of refusing to start).
    pub standby: bool,
}

/// Takes the daemon lease of `slot` on the registry connection (a session advisory lock:
/// it ends with the connection, so a dead daemon's lease is free at once).
pub(super) async fn take_lease(control: &Client, slot: &str) -> Result<bool, Error> {
    Ok(control
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('switchyard daemon'), hashtext($1::text))",
            &[&slot],
        )
        .await
        .map_err(ClusterError::sql("taking the daemon lease"))?
        .get(0))
}

/// Stops the metrics endpoint with the daemon, whichever way `run` returns.
pub(super) struct Endpoint(pub(super) Option<tokio::task::JoinHandle<()>>);

impl Drop for Endpoint {
    fn drop(&mut self) {
        crate::telemetry::set_ready(false);
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// How long a daemon that is not a standby waits for a lease held by another session.
const LEASE_GRACE: Duration = Duration::from_secs(10);

/// Compares the slot's confirmed position with the furthest one this state directory
/// recorded, and returns where the stream's confirmations may start.
///
/// This daemon confirms nothing it has not recorded first, so a slot confirmed past the
/// record was moved by something else while the daemon was down: dropped and created
/// again under its name, `pg_replication_slot_advance`, another consumer that
/// acknowledged. The changes in between never reached the moving tenants: each one with a
/// record here gets a [`SlotGap`], durably, before anything else runs, and fails at its
/// resume ([`MoveError::SlotAdvanced`]). A directory of an earlier version (which confirmed
/// past its record) is taken as it is, once.
async fn check_slot_position(
    store: &Store,
    checkpoints: &Writer,
    recorded: Option<&SlotRecord>,
    slot: &source::slot::SlotInfo,
) -> Result<Lsn, Error> {
    let kept = store.confirmed()?;
    let found = slot.confirmed_flush.unwrap_or(Lsn::INVALID);
    let ceiling = kept.max(found);
    if recorded.is_none() {
        return Ok(ceiling);
    }
    let mut batch = Batch::new();
    if !store.ceiling_kept()? {
        tracing::info!(recorded = %kept, slot = %found, "state directory of an earlier version: from now on every confirmation is recorded first");
        batch.ceiling_kept();
    } else if found > kept {
        let gap = SlotGap {
            from: kept,
            to: found,
        };
        let tenants = store.tenants::<serde_json::Value>()?;
        tracing::error!(
            recorded = %kept,
            slot = %found,
            tenants = tenants.len(),
            "the slot was confirmed past what this daemon recorded (dropped and created again, advanced, or acknowledged by another consumer); the moving tenants missed the changes in between and must be copied again"
        );
        for (tenant, _) in &tenants {
            batch.slot_gap(tenant, &gap);
        }
    } else {
        return Ok(ceiling);
    }
    batch.confirmed(found);
    checkpoints.commit(batch).await?;
    Ok(ceiling)
}

/// Takes the slot's lease on the registry connection, waiting for it with `standby` (or
/// briefly, for a predecessor's session to go); false if a stop came first.
pub(super) async fn wait_for_lease(
    control: &Client,
    slot: &str,
    standby: bool,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<bool, Error> {
    if take_lease(control, slot).await? {
        return Ok(true);
    }
    // A daemon restarted right after a crash may find its predecessor's session not
    // yet gone: a short wait tells that apart from a second daemon.
    let give_up = (!standby).then(|| Instant::now() + LEASE_GRACE);
    tracing::info!(%slot, standby, "another daemon holds this slot's lease; waiting");
    loop {
        if give_up.is_some_and(|t| Instant::now() >= t) {
            return Err(MoveError::Leased {
                slot: slot.to_owned(),
            }
            .into());
        }
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(false),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if take_lease(control, slot).await? {
            tracing::info!(%slot, "took the slot's lease");
            return Ok(true);
        }
    }
}

/// The slot as the daemon found it at start.
pub(super) struct OpenedSlot {
    pub slot: source::slot::SlotInfo,
    /// What the state directory recorded of it (`None` on a first start).
    pub recorded: Option<SlotRecord>,
    /// How far the stream may confirm (see [`check_slot_position`]).
    pub ceiling: Lsn,
}

/// Checks the publication, finds (or on a first start with `create_slot`, creates) the
/// slot, and compares its position with the state directory's.
pub(super) async fn open_slot(
    control: &Client,
    store: &Store,
    checkpoints: &Writer,
    config: &Config,
    options: &RunOptions,
) -> Result<OpenedSlot, Error> {
    let repl = &config.replication;
    if options.create_slot {
        source::slot::ensure_publication(control, &repl.publication, &repl.tables).await?;
    } else if source::slot::publication_tables(control, &repl.publication)
        .await?
        .is_none()
    {
        return Err(SourceError::Protocol(format!(
            "publication {:?} does not exist; create it (switchyard check prints the SQL) or start with --create-slot",
            repl.publication
        ))
        .into());
    }
    let recorded = store.slot()?;
    let slot = source::slot::ensure_slot(
        control,
        &repl.slot,
        recorded.is_none() && options.create_slot,
    )
    .await
    .map_err(|e| e.for_slot(&repl.slot))?;
    let ceiling = check_slot_position(store, checkpoints, recorded.as_ref(), &slot).await?;
    Ok(OpenedSlot {
        slot,
        recorded,
        ceiling,
    })
}
