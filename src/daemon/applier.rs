//! One apply task per target: batches consecutive source transactions into one target
//! transaction and reports what became durable.
//!
//! Invariants:
//! - Transactions are committed in the order received (source commit order); a batch is
//!   a prefix of the queue, never a reordering.
//! - A report `Committed { up_to }` is sent only after the target transaction committed,
//!   so the pipeline confirms nothing to the source that the target does not hold.
//! - A tenant-fatal failure inside one tenant's work quarantines that tenant: the batch is
//!   retried without it, so other tenants on the same target go on. Transient failures
//!   (connection lost, serialization failure, target restarting) are retried with backoff
//!   on a new connection; the writer re-reads the target's applied positions, so a batch
//!   that did commit before the connection dropped is not applied twice.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::apply::{SourceTxn, TargetWriter};
use crate::cluster::Endpoint;
use crate::error::{Error, ErrorClass};
use crate::lsn::Lsn;
use crate::tenant::{TargetId, TenantId};

/// Tenants whose work must be dropped (they failed), shared by the pipeline and every
/// applier. A lock poisoned by a panicking holder still holds a valid set.
#[derive(Clone, Debug, Default)]
pub(crate) struct Quarantine(Arc<Mutex<HashSet<TenantId>>>);

impl Quarantine {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<TenantId>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, tenant: TenantId) {
        self.set().insert(tenant);
    }

    pub fn remove(&self, tenant: &TenantId) {
        self.set().remove(tenant);
    }

    /// Drops the quarantined tenants' work from `batch`.
    fn strip(&self, batch: &mut [SourceTxn]) {
        let q = self.set();
        if q.is_empty() {
            return;
        }
        for txn in batch.iter_mut() {
            txn.parts.retain(|(t, _)| !q.contains(t));
            txn.states.retain(|(t, _)| !q.contains(t));
        }
    }
}

/// What an applier tells the pipeline.
#[derive(Debug)]
pub(crate) enum ApplyEvent {
    /// Every transaction up to `up_to` given to this target is durable there; `tenants`
    /// holds the positions recorded per tenant in that commit.
    Committed {
        target: TargetId,
        up_to: Lsn,
        tenants: Vec<(TenantId, Lsn)>,
    },
    /// `tenant`'s work cannot be applied; it has been quarantined.
    TenantFailed { tenant: TenantId, error: Error },
    /// A transient problem, being retried.
    Retrying { target: TargetId, error: Error },
}

pub(crate) struct Applier {
    pub tx: mpsc::UnboundedSender<SourceTxn>,
    pub task: tokio::task::JoinHandle<()>,
}

pub(crate) struct ApplierConfig {
    pub target: TargetId,
    pub endpoint: Endpoint,
    pub progress_schema: String,
    pub max_txns: usize,
    pub max_bytes: usize,
}

pub(crate) fn spawn(
    cfg: ApplierConfig,
    quarantine: Quarantine,
    events: mpsc::UnboundedSender<ApplyEvent>,
) -> Applier {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(cfg, rx, quarantine, events));
    Applier { tx, task }
}

/// Each tenant of `batch` with the end of its last transaction there.
fn batch_tenants(batch: &[SourceTxn]) -> BTreeMap<TenantId, Lsn> {
    let mut tenants = BTreeMap::new();
    for txn in batch {
        for t in txn
            .parts
            .iter()
            .map(|p| &p.0)
            .chain(txn.states.iter().map(|s| &s.0))
        {
            tenants.insert(t.clone(), txn.end_lsn);
        }
    }
    tenants
}

async fn sleep_backoff(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
}

/// A writer on a new connection, applying like a replication worker where allowed.
async fn connect(cfg: &ApplierConfig) -> Result<TargetWriter, Error> {
    let mut w =
        TargetWriter::connect(cfg.target.clone(), &cfg.endpoint, &cfg.progress_schema).await?;
    match w.use_replica_role().await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            target = %cfg.target,
            "the target role may not set session_replication_role: foreign keys and triggers fire during apply (GRANT SET ON PARAMETER session_replication_role TO it)"
        ),
        Err(e) => tracing::warn!(target = %cfg.target, error = %e, "session_replication_role"),
    }
    Ok(w)
}

async fn run(
    cfg: ApplierConfig,
    mut rx: mpsc::UnboundedReceiver<SourceTxn>,
    quarantine: Quarantine,
    events: mpsc::UnboundedSender<ApplyEvent>,
) {
    let mut writer: Option<TargetWriter> = None;
    let mut backoff = Duration::from_millis(100);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.weight();
        let mut batch = vec![first];
        while batch.len() < cfg.max_txns && bytes < cfg.max_bytes {
            match rx.try_recv() {
                Ok(t) => {
                    bytes += t.weight();
                    batch.push(t);
                }
                Err(_) => break,
            }
        }
        loop {
            quarantine.strip(&mut batch);
            // With nothing left for this target (its tenants failed) the batch is durable
            // by definition, even while the target is unreachable.
            let empty = batch
                .iter()
                .all(|t| t.parts.is_empty() && t.states.is_empty());
            if !empty {
                if writer.as_ref().is_none_or(|w| w.is_closed()) {
                    match connect(&cfg).await {
                        Ok(w) => writer = Some(w),
                        Err(error) => {
                            if error.classify() != ErrorClass::Transient {
                                tracing::error!(target = %cfg.target, %error, "cannot connect to the target; retrying");
                            }
                            let _ = events.send(ApplyEvent::Retrying {
                                target: cfg.target.clone(),
                                error,
                            });
                            sleep_backoff(&mut backoff).await;
                            continue;
                        }
                    }
                }
                let w = writer.as_mut().expect("connected above");
                let started = std::time::Instant::now();
                let result = w.commit(&batch).await;
                tracing::debug!(target = %cfg.target, txns = batch.len(), ms = started.elapsed().as_millis() as u64, ok = result.is_ok(), "batch");
                if let Err(e) = result {
                    let failed = w.failed_tenant().cloned();
                    let error = Error::Apply(e);
                    match (error.classify(), failed) {
                        (ErrorClass::Transient, _) => {
                            tracing::warn!(target = %cfg.target, %error, "apply failed; retrying");
                            // The connection may be fine (e.g. a serialization failure), but a
                            // new one re-reads the applied positions, which is always right.
                            writer = None;
                            let _ = events.send(ApplyEvent::Retrying {
                                target: cfg.target.clone(),
                                error,
                            });
                            sleep_backoff(&mut backoff).await;
                        }
                        (_, Some(tenant)) => {
                            quarantine.insert(tenant.clone());
                            let _ = events.send(ApplyEvent::TenantFailed { tenant, error });
                        }
                        (_, None) => {
                            // Not inside one tenant's work (e.g. the progress table is
                            // unusable): every tenant of the batch stops.
                            let message = error.to_string();
                            for tenant in batch_tenants(&batch).into_keys() {
                                quarantine.insert(tenant.clone());
                                let _ = events.send(ApplyEvent::TenantFailed {
                                    tenant,
                                    error: Error::Move(super::MoveError::Target {
                                        target: cfg.target.to_string(),
                                        detail: message.clone(),
                                    }),
                                });
                            }
                            writer = None;
                            sleep_backoff(&mut backoff).await;
                        }
                    }
                    continue;
                }
            }
            backoff = Duration::from_millis(100);
            let sent = events.send(ApplyEvent::Committed {
                target: cfg.target.clone(),
                up_to: batch.last().map(|t| t.end_lsn).unwrap_or(Lsn::INVALID),
                tenants: batch_tenants(&batch).into_iter().collect(),
            });
            if sent.is_err() {
                return;
            }
            break;
        }
    }
}
