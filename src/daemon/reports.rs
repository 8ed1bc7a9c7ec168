//! Moves' progress written to the registry off the daemon's loop, on a connection of its own.
//!
//! Invariants:
//! - The loop never waits on the registry for a progress report: on a saturated source a
//!   report's round trips and its commit held the loop, and with it every moving tenant's
//!   changes, for 50–65 ms once a second (the lag bench's tail).
//! - Each round is a snapshot of every moving tenant; a round not yet written when a newer
//!   one comes is skipped (the newer one carries newer values), and a round that fails is
//!   dropped, never written after a newer one. One transaction per round.
//! - The source's WAL position that the loop's WAL budget check reads is at most one round
//!   old (read by this task before it writes the round), or invalid before the first.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_postgres::Client;

use super::error::Error;
use crate::cluster::{ClusterError, Endpoint};
use crate::lsn::{Lsn, ProgressLsn};
use crate::registry::{Registry, Report};

/// One round: each move's report.
pub(super) type Round = Vec<(i64, Report)>;

/// The loop's handle on the report writer.
pub(super) struct Reports {
    rounds: watch::Sender<Round>,
    source_at: Arc<ProgressLsn>,
}

impl Reports {
    /// Starts the writer; it stops when this handle is dropped.
    pub fn spawn(source: Endpoint, registry: Registry, slot: String) -> Reports {
        let (rounds, rx) = watch::channel(Vec::new());
        let source_at = Arc::new(ProgressLsn::new(Lsn::INVALID));
        tokio::spawn(write_rounds(source, registry, slot, rx, source_at.clone()));
        Reports { rounds, source_at }
    }

    /// Hands a round over without waiting for it.
    pub fn send(&self, round: Round) {
        self.rounds.send_replace(round);
    }

    /// The source's WAL insert position as last read (invalid before the first read).
    pub fn source_at(&self) -> Lsn {
        self.source_at.get()
    }
}

async fn write_rounds(
    source: Endpoint,
    registry: Registry,
    slot: String,
    mut rounds: watch::Receiver<Round>,
    source_at: Arc<ProgressLsn>,
) {
    let mut client: Option<Client> = None;
    while rounds.changed().await.is_ok() {
        let round = rounds.borrow_and_update().clone();
        if client.as_ref().is_none_or(Client::is_closed) {
            match source.connect_sql().await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the registry to report progress");
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        if let Err(e) = write_round(c, &registry, &slot, &round, &source_at).await {
            tracing::warn!(error = %e, "reporting the moves' progress");
            // A failed transaction leaves the session aborted; the next round starts clean.
            let _ = c.batch_execute("ROLLBACK").await;
        }
    }
}

async fn write_round(
    c: &Client,
    registry: &Registry,
    slot: &str,
    round: &Round,
    source_at: &ProgressLsn,
) -> Result<(), Error> {
    source_at.advance(crate::verify::current_lsn(c).await?);
    if !round.is_empty() {
        c.batch_execute("BEGIN")
            .await
            .map_err(ClusterError::sql("reporting progress"))?;
        for (id, r) in round {
            registry.report(c, *id, r).await?;
        }
        c.batch_execute("COMMIT")
            .await
            .map_err(ClusterError::sql("reporting progress"))?;
    }
    if let Ok(row) = c
        .query_one(
            "SELECT coalesce((pg_current_wal_lsn() - restart_lsn)::float8, 0) \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
    {
        metrics::gauge!(crate::telemetry::SLOT_RETAINED_BYTES).set(row.get::<_, f64>(0));
    }
    Ok(())
}
