//! The registry connection as the daemon holds it: the session that carries its lease,
//! reads the moves, and records their state changes and progress.
//!
//! Invariants:
//! - The lease lives on this session: a reconnect takes it again before anything else is
//!   read or written, or the daemon stops (another daemon took over meanwhile).
//! - A registry row that does not parse is marked failed with the reason and left out; the
//!   other moves go on.
//! - A state change that cannot be written is logged, never fatal: the registry is re-read
//!   at the next poll and the change is tried again from what it says.

use tokio_postgres::Client;

use super::error::{Error, MoveError};
use super::startup::take_lease;
use crate::cluster::Endpoint;
use crate::registry::{Move, MoveState, Registry, Report};
use crate::tenant::TenantId;

pub(super) struct Control {
    client: Client,
    registry: Registry,
    /// Where to reconnect to.
    source: Endpoint,
    slot: String,
}

impl Control {
    pub fn new(client: Client, registry: Registry, source: Endpoint, slot: String) -> Self {
        Control {
            client,
            registry,
            source,
            slot,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Reconnects if the session dropped (NOTIFY is then lost until the daemon restarts;
    /// polling still notices every change).
    pub async fn ensure(&mut self) -> Result<(), Error> {
        if self.client.is_closed() {
            let mut c = self.source.connect_sql().await?;
            self.registry.install(&mut c).await?;
            // The lease went with the old connection: take it again, or another daemon
            // has taken over and this one must stop.
            if !take_lease(&c, &self.slot).await? {
                return Err(MoveError::LeaseLost {
                    slot: self.slot.clone(),
                }
                .into());
            }
            self.client = c;
        }
        Ok(())
    }

    /// The registry's moves that parse (see the module's invariants).
    pub async fn list_moves(&mut self) -> Result<Vec<Move>, Error> {
        self.ensure().await?;
        let (moves, bad) = self.registry.list_checked(&self.client).await?;
        for e in &bad {
            match self.registry.fail_bad_row(&self.client, e).await {
                Ok(true) => tracing::error!(error = %e, "a registry row is invalid; marked failed"),
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(error = %err, bad = %e, "recording an invalid registry row")
                }
            }
        }
        Ok(moves)
    }

    /// Changes a move's state; a failure is logged (see the module's invariants).
    pub async fn set_state(
        &mut self,
        id: i64,
        tenant: &TenantId,
        from: MoveState,
        to: MoveState,
        error: Option<&str>,
    ) {
        if let Err(e) = self.ensure().await {
            tracing::warn!(%tenant, error = %e, "cannot reach the registry");
            return;
        }
        if let Err(e) = self
            .registry
            .transition(&self.client, id, from, to, error)
            .await
        {
            tracing::warn!(%tenant, error = %e, %from, %to, "registry state change failed");
        }
    }

    /// Writes a move's progress.
    pub async fn report(&mut self, id: i64, report: &Report) -> Result<(), Error> {
        self.ensure().await?;
        self.registry.report(&self.client, id, report).await?;
        Ok(())
    }
}
