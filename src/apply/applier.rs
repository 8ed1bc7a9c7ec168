//! One apply task per target: batches consecutive source transactions into one target
//! transaction and reports what became durable.
//!
//! Invariants:
//! - Transactions are committed in the order received (source commit order); a batch is
//!   a prefix of the queue, never a reordering.
//! - A report `Applied { up_to }` is sent only after the target transaction committed,
//!   so the pipeline confirms nothing to the source that the target does not hold.
//! - A tenant-fatal failure inside one tenant's work quarantines that tenant: the batch is
//!   retried without it, so other tenants on the same target go on. Transient failures
//!   (connection lost, serialization failure, target restarting) are retried with backoff
//!   on a new connection; the writer re-reads the target's applied positions, so a batch
//!   that did commit before the connection dropped is not applied twice.
//! - A batch ends at the transaction a cutover's catch-up waits for ([`Applier::hurry_through`])
//!   instead of taking all that is queued: the tenant's writers are paused until that
//!   transaction is reported applied, and a report follows only a whole batch.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::lanes::{self, Segment};
use super::writer::RowChange;
use super::{ApplyError, SourceTxn, TargetWriter};
use crate::cluster::Endpoint;
use crate::lsn::{CommitLsn, Lsn};
use crate::sql::QualifiedName;
use crate::tenant::{TargetId, TenantId};

/// Tenants whose work must be dropped (they failed), shared by the pipeline and every
/// applier. A lock poisoned by a panicking holder still holds a valid set.
#[derive(Clone, Debug, Default)]
pub struct Quarantine(Arc<Mutex<HashSet<TenantId>>>);

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

    pub fn contains(&self, tenant: &TenantId) -> bool {
        self.set().contains(tenant)
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
pub enum ApplyEvent {
    /// Every transaction up to `up_to` given to this target is durable there; `tenants`
    /// holds the positions recorded per tenant in that commit.
    Applied {
        target: TargetId,
        up_to: CommitLsn,
        tenants: Vec<(TenantId, Lsn)>,
    },
    /// `tenant`'s work cannot be applied; it has been quarantined.
    TenantFailed { tenant: TenantId, error: ApplyError },
    /// A problem being retried (a transient one, or a target that cannot be reached yet).
    Retrying { target: TargetId, error: ApplyError },
}

pub struct Applier {
    pub tx: mpsc::UnboundedSender<SourceTxn>,
    pub task: tokio::task::JoinHandle<()>,
    /// The end of the transaction a cutover's catch-up waits for (0: none).
    hurry: Arc<AtomicU64>,
}

impl Applier {
    /// Ends the batch that reaches `end` (a transaction already handed over) there. A
    /// position the batches already passed has no effect.
    pub fn hurry_through(&self, end: Lsn) {
        self.hurry.store(end.0, Ordering::Relaxed);
    }
}

/// Whether a batch from `first` to `last` (ends of its first and last transactions)
/// reached `hurry` (0: none) and must end: a position before the batch is an earlier
/// wait's, already answered.
fn hurried(first: Lsn, last: Lsn, hurry: u64) -> bool {
    hurry != 0 && first.0 <= hurry && last.0 >= hurry
}

pub struct ApplierConfig {
    pub target: TargetId,
    pub endpoint: Endpoint,
    pub progress_schema: String,
    pub max_txns: usize,
    pub max_bytes: usize,
    /// Apply lanes wanted (see [`crate::apply::lanes`]).
    pub lanes: usize,
}

pub fn spawn(
    cfg: ApplierConfig,
    quarantine: Quarantine,
    events: mpsc::UnboundedSender<ApplyEvent>,
) -> Applier {
    let (tx, rx) = mpsc::unbounded_channel();
    let hurry = Arc::new(AtomicU64::new(0));
    let span = tracing::info_span!("apply", target = %cfg.target);
    let task = tokio::spawn(tracing::Instrument::instrument(
        run(cfg, rx, quarantine, events, Arc::clone(&hurry)),
        span,
    ));
    Applier { tx, task, hurry }
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
            tenants.insert(t.clone(), txn.end.lsn());
        }
    }
    tenants
}

async fn sleep_backoff(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
}

/// A writer on a new connection for `lane`, applying like a replication worker where
/// allowed; returns whether that is allowed (the replica role).
async fn connect(cfg: &ApplierConfig, lane: usize) -> Result<(TargetWriter, bool), ApplyError> {
    let mut w = TargetWriter::connect_lane(
        cfg.target.clone(),
        &cfg.endpoint,
        &cfg.progress_schema,
        lane,
    )
    .await?;
    let replica = match w.use_replica_role().await {
        Ok(true) => true,
        Ok(false) => {
            if lane == 0 {
                tracing::warn!(
                    target = %cfg.target,
                    "the target role may not set session_replication_role: foreign keys and triggers fire during apply, and apply runs on one lane (GRANT SET ON PARAMETER session_replication_role TO it)"
                );
            }
            false
        }
        Err(e) => {
            tracing::warn!(target = %cfg.target, error = %e, "session_replication_role");
            false
        }
    };
    Ok((w, replica))
}

/// The lanes of one target: a writer (connection) per lane, and what was learnt about its
/// tables.
struct Lanes {
    writers: Vec<Option<TargetWriter>>,
    /// Settled on the first connection (see [`TargetWriter::settle_lanes`]).
    settled: bool,
    /// Tables whose rows go whole to one lane.
    whole: HashSet<QualifiedName>,
    /// Tables known to spread by key.
    spread: HashSet<QualifiedName>,
}

impl Lanes {
    /// Connects every lane not connected; settles the lane count first.
    async fn connect(&mut self, cfg: &ApplierConfig) -> Result<(), ApplyError> {
        if !self.settled {
            let (mut w, replica) = connect(cfg, 0).await?;
            // Lanes reorder changes across keys: only where no trigger or foreign key sees it.
            let wanted = if replica { cfg.lanes } else { 1 };
            let count = w.settle_lanes(wanted).await?;
            if count != wanted {
                tracing::warn!(target = %cfg.target, lanes = count, wanted, "the apply lanes stopped apart (a crash mid-batch); keeping their count until they agree, after the next batch; restart then to change it");
            }
            self.writers = (0..count).map(|_| None).collect();
            self.writers[0] = Some(w);
            self.settled = true;
        }
        // The missing lanes connect at once: each is a TCP (and TLS) handshake, an
        // authentication and a few session statements, and the first batch waits for all.
        let missing: Vec<usize> = (0..self.writers.len())
            .filter(|&lane| self.writers[lane].as_ref().is_none_or(|w| w.is_closed()))
            .collect();
        let connected =
            futures_util::future::join_all(missing.iter().map(|&lane| connect(cfg, lane))).await;
        let mut fresh = false;
        let mut failed = None;
        for (lane, result) in missing.into_iter().zip(connected) {
            match result {
                Ok((w, _)) => {
                    self.writers[lane] = Some(w);
                    fresh = true;
                }
                Err(e) => {
                    self.writers[lane] = None;
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            // The lanes that did connect stay; the next attempt connects the rest.
            return Err(e);
        }
        if fresh && self.writers.len() > 1 {
            let windows = lanes::replay_windows(
                self.writers
                    .iter()
                    .flatten()
                    .map(TargetWriter::applied_positions),
            );
            if !windows.is_empty() {
                tracing::info!(target = %cfg.target, tenants = windows.len(), "the apply lanes stopped apart; replaying the segment in between");
            }
            for w in self.writers.iter_mut().flatten() {
                w.set_replay_windows(windows.clone());
            }
        }
        Ok(())
    }

    fn count(&self) -> usize {
        self.writers.len().max(1)
    }

    /// Splits `segment` over the lanes, after learning how its new tables spread.
    async fn split(
        &mut self,
        segment: &mut Option<Segment>,
    ) -> Result<Vec<Vec<SourceTxn>>, ApplyError> {
        let Some(seg) = segment.as_ref() else {
            return Ok(Vec::new());
        };
        if !seg.barrier && self.count() > 1 {
            let known = |t: &QualifiedName| self.whole.contains(t) || self.spread.contains(t);
            let unknown: Vec<RowChange> = lanes::tables(seg, &known).into_iter().cloned().collect();
            for change in unknown {
                let w = self.writers[0]
                    .as_mut()
                    .expect("connected before splitting");
                let table = change.table().clone();
                if w.spreads_by_key(&change).await? {
                    self.spread.insert(table);
                } else {
                    self.whole.insert(table);
                }
            }
        }
        let seg = segment.take().expect("checked above");
        Ok(lanes::split(
            seg,
            self.count(),
            &self.whole,
            lanes::SPREAD_MIN,
        ))
    }
}

async fn run(
    cfg: ApplierConfig,
    mut rx: mpsc::UnboundedReceiver<SourceTxn>,
    quarantine: Quarantine,
    events: mpsc::UnboundedSender<ApplyEvent>,
    hurry: Arc<AtomicU64>,
) {
    let mut lanes = Lanes {
        writers: Vec::new(),
        settled: false,
        whole: HashSet::new(),
        spread: HashSet::new(),
    };
    let mut backoff = Duration::from_millis(100);
    // Connected before the first batch arrives, not when it does: after a restart the
    // first batch is a backlog's first thousands of transactions, and the lanes' handshakes
    // would otherwise be on its path. A failure here is only logged: the first batch
    // connects again, and reports it.
    if let Err(e) = lanes.connect(&cfg).await {
        tracing::debug!(target = %cfg.target, error = %e, "connecting the apply lanes ahead of the first batch");
    }
    while let Some(first) = rx.recv().await {
        let mut bytes = first.weight();
        let start = first.end.lsn();
        let mut batch = vec![first];
        while batch.len() < cfg.max_txns && bytes < cfg.max_bytes {
            let last = batch.last().map_or(start, |t| t.end.lsn());
            if hurried(start, last, hurry.load(Ordering::Relaxed)) {
                break;
            }
            match rx.try_recv() {
                Ok(t) => {
                    bytes += t.weight();
                    batch.push(t);
                }
                Err(_) => break,
            }
        }
        let up_to = batch.last().map(|t| t.end).unwrap_or(CommitLsn::NONE);
        let tenants = batch_tenants(&batch);
        for segment in lanes::segments(batch) {
            apply_segment(
                &cfg,
                &mut lanes,
                segment,
                &quarantine,
                &events,
                &mut backoff,
            )
            .await;
        }
        crate::failpoint::hit("applier.before_report");
        let sent = events.send(ApplyEvent::Applied {
            target: cfg.target.clone(),
            up_to,
            tenants: tenants
                .into_iter()
                .filter(|(t, _)| !quarantine.contains(t))
                .collect(),
        });
        if sent.is_err() {
            return;
        }
    }
}

/// Applies one segment on every lane at once, retrying until it is durable (or, for the
/// tenants that fail, quarantined).
async fn apply_segment(
    cfg: &ApplierConfig,
    lanes: &mut Lanes,
    segment: Segment,
    quarantine: &Quarantine,
    events: &mpsc::UnboundedSender<ApplyEvent>,
    backoff: &mut Duration,
) {
    let mut segment = Some(segment);
    let mut shares: Vec<Vec<SourceTxn>> = Vec::new();
    loop {
        if let Some(seg) = segment.as_mut() {
            quarantine.strip(&mut seg.txns);
        }
        for share in shares.iter_mut() {
            quarantine.strip(share);
        }
        // With nothing left for this target (its tenants failed) the segment is durable
        // by definition, even while the target is unreachable.
        let empty = segment
            .iter()
            .flat_map(|s| &s.txns)
            .chain(shares.iter().flatten())
            .all(|t| t.parts.is_empty() && t.states.is_empty());
        if empty {
            *backoff = Duration::from_millis(100);
            return;
        }
        let ready = match lanes.connect(cfg).await {
            Ok(()) if segment.is_some() => lanes.split(&mut segment).await.map(|s| shares = s),
            other => other,
        };
        if let Err(error) = ready {
            if !error.is_transient() {
                tracing::error!(target = %cfg.target, %error, "cannot reach the target; retrying");
            }
            let _ = events.send(ApplyEvent::Retrying {
                target: cfg.target.clone(),
                error,
            });
            sleep_backoff(backoff).await;
            continue;
        }
        let started = std::time::Instant::now();
        // Each lane on its own task: folding and encoding a lane's share is CPU work that
        // would otherwise run on one thread for all lanes.
        let lane_tenants: Vec<Vec<TenantId>> = shares
            .iter()
            .map(|s| batch_tenants(s).into_keys().collect())
            .collect();
        // One share: lane 0 holds the whole segment and records every lane's position.
        let covers = if shares.len() == 1 { lanes.count() } else { 1 };
        let mut tasks = Vec::with_capacity(shares.len());
        for (lane, share) in std::mem::take(&mut shares).into_iter().enumerate() {
            let mut w = lanes.writers[lane].take().expect("connected above");
            let span = tracing::info_span!("lane", lane);
            tasks.push(tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let t0 = std::time::Instant::now();
                    let r = match w.commit_covering(&share, covers).await {
                        Ok(_) => Ok(()),
                        Err(e) => Err((e, w.failed_tenant().cloned())),
                    };
                    tracing::trace!(
                        ms = t0.elapsed().as_micros() as u64 / 1000,
                        "lane committed"
                    );
                    (w, share, r)
                },
                span,
            )));
        }
        let mut results = Vec::with_capacity(tasks.len());
        for (lane, task) in tasks.into_iter().enumerate() {
            match task.await {
                Ok((w, share, r)) => {
                    lanes.writers[lane] = Some(w);
                    shares.push(share);
                    results.push(r);
                }
                Err(join) => {
                    // A bug, not input: the share is gone, so its tenants fail loudly
                    // rather than losing its changes silently.
                    fail_tenants(
                        cfg,
                        quarantine,
                        events,
                        lane_tenants[lane].iter().cloned(),
                        &format!("apply lane {lane} stopped: {join}"),
                    );
                    shares.push(Vec::new());
                    results.push(Ok(()));
                }
            }
        }
        tracing::debug!(target = %cfg.target, lanes = results.len(), txns = shares.first().map_or(0, Vec::len), ms = started.elapsed().as_millis() as u64, ok = results.iter().all(Result::is_ok), "segment");
        let mut retry_later = false;
        let mut failed = false;
        for (lane, result) in results.into_iter().enumerate() {
            let Err((e, failed_tenant)) = result else {
                continue;
            };
            failed = true;
            let error = e;
            match (error.is_transient(), failed_tenant) {
                (true, _) => {
                    tracing::warn!(target = %cfg.target, lane, %error, "apply failed; retrying");
                    // The connection may be fine (e.g. a serialization failure), but a
                    // new one re-reads the lane's applied positions, which is always right.
                    lanes.writers[lane] = None;
                    let _ = events.send(ApplyEvent::Retrying {
                        target: cfg.target.clone(),
                        error,
                    });
                    retry_later = true;
                }
                (_, Some(tenant)) => {
                    quarantine.insert(tenant.clone());
                    let _ = events.send(ApplyEvent::TenantFailed { tenant, error });
                }
                (_, None) => {
                    // Not inside one tenant's work (e.g. the progress table is
                    // unusable): every tenant of the segment stops.
                    fail_tenants(
                        cfg,
                        quarantine,
                        events,
                        lane_tenants[lane].iter().cloned(),
                        &error.to_string(),
                    );
                    lanes.writers[lane] = None;
                    retry_later = true;
                }
            }
        }
        if !failed {
            *backoff = Duration::from_millis(100);
            if covers > 1 {
                let held = batch_tenants(&shares[0]);
                for w in lanes.writers.iter_mut().skip(1).flatten() {
                    w.hold_through(held.iter().map(|(t, l)| (t.clone(), *l)));
                }
            }
            // Freeing a segment's changes is ~8 % of the daemon's CPU (perf); the lanes
            // need not wait for it before the next segment, so it runs beside them.
            tokio::spawn(async move { drop(shares) });
            return;
        }
        // The failing tenants are quarantined (or the target is retried): the next round
        // applies the rest; lanes that committed skip what they hold.
        if retry_later {
            sleep_backoff(backoff).await;
        }
    }
}

/// Quarantines `tenants` and reports each as failed at this target with `detail`.
fn fail_tenants(
    cfg: &ApplierConfig,
    quarantine: &Quarantine,
    events: &mpsc::UnboundedSender<ApplyEvent>,
    tenants: impl Iterator<Item = TenantId>,
    detail: &str,
) {
    for tenant in tenants {
        quarantine.insert(tenant.clone());
        let _ = events.send(ApplyEvent::TenantFailed {
            tenant,
            error: ApplyError::Target {
                target: cfg.target.to_string(),
                detail: detail.to_owned(),
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_ends_at_the_waited_transaction_and_ignores_a_passed_wait() {
        // No wait.
        assert!(!hurried(Lsn(100), Lsn(300), 0));
        // The waited transaction is not in the batch yet: go on taking more.
        assert!(!hurried(Lsn(100), Lsn(150), 200));
        // It is the last one taken: end here.
        assert!(hurried(Lsn(100), Lsn(200), 200));
        assert!(hurried(Lsn(200), Lsn(200), 200));
        // A wait before the batch's start was answered by an earlier batch.
        assert!(!hurried(Lsn(250), Lsn(400), 200));
    }
}
