//! The pipeline's side of cutovers: starting attempts, answering their catch-up waits, and
//! letting go of a tenant once it is cut over.
//!
//! Invariants:
//! - At most one attempt per tenant runs; a move left `cutting_over` by a crash is put back
//!   to `streaming` (its fence transaction died with its connection) and retried.
//! - A catch-up wait is answered only after the marker was read from the stream and the
//!   tenant's target acknowledged every transaction handed to it before the marker.
//! - A cut-over tenant leaves the pipeline: nothing of it is applied any more (the old
//!   location refuses its writes) and it no longer holds the slot.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::Engine;
use crate::cutover::{self, policy, reverse, CutoverError, CutoverMsg, FencedTable, Job, Outcome};
use crate::lsn::Lsn;
use crate::registry::{CutoverMode, Move, MoveState};
use crate::tenant::TenantId;

/// A running attempt's catch-up wait.
pub(super) struct CatchUpWait {
    token: u64,
    tenant: TenantId,
    /// The end of the last transaction read before the marker, once it was read.
    through: Option<Lsn>,
    reply: oneshot::Sender<()>,
}

/// A running reverse stream (after a cutover, until rollback or cleanup).
struct Reversing {
    stop: Option<oneshot::Sender<()>>,
    waits: mpsc::UnboundedSender<reverse::MarkerWait>,
    task: tokio::task::JoinHandle<Result<(), CutoverError>>,
    tables: Vec<FencedTable>,
}

/// Cutover bookkeeping of the pipeline.
#[derive(Default)]
pub(super) struct Cutovers {
    running: HashMap<TenantId, Instant>,
    waits: Vec<CatchUpWait>,
    /// Aborted attempts per tenant in this run, and when the next may start.
    backoff: HashMap<TenantId, (u32, Instant)>,
    tokens: u64,
    /// Reverse streams by move id; when a failed one may start again.
    reversing: HashMap<i64, Reversing>,
    reverse_retry: HashMap<i64, Instant>,
    /// Rollback attempts running, by move id.
    rolling_back: HashMap<i64, Instant>,
    /// Automatic cleanups running or failed (not retried before the time given), by move id.
    cleaning: HashMap<i64, Instant>,
    /// Ended moves whose fences and reverse slot were released in this run, by the state
    /// they were released in.
    released: HashMap<i64, MoveState>,
}

impl Engine {
    /// Starts the attempts the registry asks for; resets attempts a crash interrupted.
    pub(super) async fn start_cutovers(&mut self, moves: &[Move]) {
        let by_id: HashMap<i64, &Move> = moves.iter().map(|m| (m.id, m)).collect();
        let ids: Vec<TenantId> = self.tenants.keys().cloned().collect();
        for id in ids {
            let Some(t) = self.tenants.get(&id) else {
                continue;
            };
            let Some(mv) = by_id.get(&t.move_id).copied() else {
                continue;
            };
            let running = self.cutovers.running.contains_key(&id);
            if mv.state == MoveState::CuttingOver && !running {
                tracing::warn!(tenant = %id, "a cutover attempt was interrupted; back to streaming");
                self.set_state(
                    mv.id,
                    &id,
                    MoveState::CuttingOver,
                    MoveState::Streaming,
                    Some("a cutover attempt was interrupted (daemon restart); it is retried"),
                )
                .await;
                if let Some(t) = self.tenants.get_mut(&id) {
                    t.state = MoveState::Streaming;
                }
                continue;
            }
            let ready = policy::Readiness {
                state: t.state,
                auto: mv.cutover_mode == CutoverMode::Auto,
                requested: mv.cutover_requested,
                lag_bytes: self.lag_bytes(&id),
                attempt_running: running,
                backoff_over: self
                    .cutovers
                    .backoff
                    .get(&id)
                    .is_none_or(|(_, at)| Instant::now() >= *at),
                rereads_pending: !t.is_copied(),
            };
            if policy::may_start(&ready, &self.config.cutover).is_err() {
                continue;
            }
            self.cutovers.tokens += 1;
            let job = Job {
                config: self.config.clone(),
                mv: mv.clone(),
                tables: t
                    .tables
                    .values()
                    .map(|tm| FencedTable {
                        chunk: tm.chunk.clone(),
                        target: tm.target.clone(),
                    })
                    .collect(),
                attempt: mv.cutover_attempts + 1,
                token: self.run_id.wrapping_add(self.cutovers.tokens),
            };
            tracing::info!(tenant = %id, attempt = job.attempt, "cutover attempt");
            self.cutovers.running.insert(id.clone(), Instant::now());
            if let Some(t) = self.tenants.get_mut(&id) {
                t.state = MoveState::CuttingOver;
            }
            let span = tracing::info_span!("cutover", tenant = %id, target = %job.mv.target);
            tokio::spawn(tracing::Instrument::instrument(
                cutover::run(job, self.cutover_tx.clone()),
                span,
            ));
        }
    }

    /// Keeps a reverse stream running for every cut-over move that has one, stops those of
    /// moves that are finished, and starts the rollbacks operators asked for.
    pub(super) async fn run_reverse(&mut self, moves: &[Move]) {
        let wanted: HashMap<i64, &Move> = moves
            .iter()
            .filter(|m| m.state == MoveState::CutOver && m.reverse_slot.is_some())
            .map(|m| (m.id, m))
            .collect();
        let gone: Vec<i64> = self
            .cutovers
            .reversing
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(mut r) = self.cutovers.reversing.remove(&id) {
                if let Some(stop) = r.stop.take() {
                    let _ = stop.send(());
                }
                tracing::info!(move_id = id, "reverse replication stopped");
            }
        }
        for (id, mv) in wanted {
            if let Some(r) = self.cutovers.reversing.get(&id) {
                if !r.task.is_finished() {
                    if mv.rollback_requested && !self.cutovers.rolling_back.contains_key(&id) {
                        self.start_rollback(mv);
                    }
                    continue;
                }
                let r = self
                    .cutovers
                    .reversing
                    .remove(&id)
                    .expect("looked up above");
                match r.task.await {
                    Ok(Err(e)) => {
                        tracing::warn!(move_id = id, error = %e, "reverse replication failed; restarting");
                        metrics::counter!(crate::telemetry::REVERSE_FAILURES).increment(1);
                        // The old location stops following the new one: operators must see
                        // it on the move, not only in the log.
                        if let Err(e) = self
                            .registry
                            .note_error(
                                &self.control,
                                id,
                                &format!("reverse replication (keeps the old location current for a rollback) failed; retrying: {e}"),
                            )
                            .await
                        {
                            tracing::warn!(move_id = id, error = %e, "recording the reverse stream's error");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(move_id = id, error = %e, "reverse replication task ended")
                    }
                    Ok(Ok(())) => {}
                }
                self.cutovers
                    .reverse_retry
                    .insert(id, Instant::now() + std::time::Duration::from_secs(2));
            }
            if self
                .cutovers
                .reverse_retry
                .get(&id)
                .is_some_and(|at| Instant::now() < *at)
            {
                continue;
            }
            let Some(from) = mv.reverse_from else {
                continue;
            };
            let tables = match crate::layout::tenant_layout(&self.config, &self.control, mv, moves)
                .await
            {
                Ok(t) => t
                    .into_iter()
                    .map(|(chunk, target)| FencedTable { chunk, target })
                    .collect::<Vec<_>>(),
                Err(e) => {
                    tracing::warn!(move_id = id, error = %e, "reverse replication: reading the tenant's tables");
                    self.cutovers
                        .reverse_retry
                        .insert(id, Instant::now() + std::time::Duration::from_secs(5));
                    continue;
                }
            };
            let (stop_tx, stop_rx) = oneshot::channel();
            let (waits_tx, waits_rx) = mpsc::unbounded_channel();
            let span = tracing::info_span!("reverse", tenant = %mv.tenant, target = %mv.target);
            let task = tokio::spawn(tracing::Instrument::instrument(
                reverse::run(
                    self.config.clone(),
                    reverse::Reverse {
                        move_id: id,
                        tenant: mv.tenant.clone(),
                        target: mv.target.clone(),
                        target_schema: mv.target_schema.clone(),
                        from,
                        tables: tables.clone(),
                    },
                    waits_rx,
                    stop_rx,
                ),
                span,
            ));
            self.cutovers.reversing.insert(
                id,
                Reversing {
                    stop: Some(stop_tx),
                    waits: waits_tx,
                    task,
                    tables,
                },
            );
        }
    }

    /// Lifts what cutover attempts left for moves that ended without a cutover (failed,
    /// paused, cancelled): armed fences and reverse slots. Once per move and state in this
    /// run (so once after every start, for moves that ended while the daemon was down).
    pub(super) fn release_ended(&mut self, moves: &[Move]) {
        let mut ended = Vec::new();
        for mv in moves.iter().filter(|m| {
            matches!(
                m.state,
                MoveState::Failed | MoveState::Paused | MoveState::Cancelled
            )
        }) {
            if self.cutovers.released.get(&mv.id) != Some(&mv.state) {
                self.cutovers.released.insert(mv.id, mv.state);
                ended.push(mv.clone());
            }
        }
        if ended.is_empty() {
            return;
        }
        // One after the other: after a start this is every such move in the registry, and a
        // connection burst on the source and the targets would serve no one.
        let config = self.config.clone();
        tokio::spawn(async move {
            for mv in ended {
                if let Err(e) = reverse::release_leftovers(&config, &mv).await {
                    tracing::warn!(tenant = %mv.tenant, move_id = mv.id, error = %e, "lifting the fence and reverse slot of an ended move");
                }
            }
        });
    }

    /// Cleans up verified cut-over moves whose retention window is over (unless an
    /// operator asked for a rollback).
    pub(super) fn auto_cleanup(&mut self, moves: &[Move]) {
        if !self.config.cutover.auto_cleanup {
            return;
        }
        for mv in moves.iter().filter(|m| {
            m.state == MoveState::CutOver && m.cleanup_due && m.verified && !m.rollback_requested
        }) {
            if self
                .cutovers
                .cleaning
                .get(&mv.id)
                .is_some_and(|at| Instant::now() < *at)
            {
                continue;
            }
            // One try per hour at most: a failed cleanup leaves its error in the registry.
            self.cutovers
                .cleaning
                .insert(mv.id, Instant::now() + std::time::Duration::from_secs(3600));
            let (config, tenant, id) = (self.config.clone(), mv.tenant.clone(), mv.id);
            tracing::info!(%tenant, move_id = id, "retention window over: cleaning up the old location");
            tokio::spawn(async move {
                match cutover::request::cleanup_tenant(&config, &tenant).await {
                    Ok(c) => {
                        tracing::info!(%tenant, move_id = id, rows = c.rows_deleted, tables = c.tables_dropped.len(), "cleaned up")
                    }
                    Err(e) => {
                        tracing::warn!(%tenant, move_id = id, error = %e, "cleanup failed");
                        if let (Ok(r), Ok(c)) = (
                            crate::registry::Registry::new(config.registry_schema.clone()),
                            config.source.connect_sql().await,
                        ) {
                            let _ = r.note_error(&c, id, &format!("cleanup: {e}")).await;
                        }
                    }
                }
            });
        }
    }

    fn start_rollback(&mut self, mv: &Move) {
        let Some(r) = self.cutovers.reversing.get(&mv.id) else {
            return;
        };
        if self
            .cutovers
            .backoff
            .get(&mv.tenant)
            .is_some_and(|(_, at)| Instant::now() < *at)
        {
            return;
        }
        self.cutovers.tokens += 1;
        let job = reverse::RollbackJob {
            config: self.config.clone(),
            mv: mv.clone(),
            tables: r.tables.clone(),
            token: self.run_id.wrapping_add(self.cutovers.tokens),
            reverse: r.waits.clone(),
        };
        self.cutovers.rolling_back.insert(mv.id, Instant::now());
        tracing::info!(tenant = %mv.tenant, move_id = mv.id, "rollback attempt");
        let tx = self.cutover_tx.clone();
        let attempt = mv.cutover_attempts + 1;
        tokio::spawn(async move {
            let outcome = reverse::rollback(&job).await;
            record_rollback(&job, attempt, &outcome).await;
            let _ = tx.send(CutoverMsg::RolledBack {
                tenant: job.mv.tenant.clone(),
                move_id: job.mv.id,
                outcome,
            });
        });
    }

    pub(super) fn on_cutover(&mut self, msg: CutoverMsg) {
        match msg {
            CutoverMsg::Wait {
                token,
                tenant,
                reply,
            } => self.cutovers.waits.push(CatchUpWait {
                token,
                tenant,
                through: None,
                reply,
            }),
            CutoverMsg::Finished {
                tenant,
                move_id,
                outcome,
            } => self.on_cutover_finished(tenant, move_id, outcome),
            CutoverMsg::RolledBack {
                tenant,
                move_id,
                outcome,
            } => {
                self.cutovers.rolling_back.remove(&move_id);
                count_attempt(&outcome, "rollback_");
                match outcome {
                    Ok(Outcome::CutOver { pause, .. }) => {
                        tracing::info!(%tenant, move_id, pause_ms = pause.as_secs_f64() * 1e3, "rolled back");
                        self.cutovers.backoff.remove(&tenant);
                        if let Some(mut r) = self.cutovers.reversing.remove(&move_id) {
                            if let Some(stop) = r.stop.take() {
                                let _ = stop.send(());
                            }
                        }
                    }
                    Ok(other) => {
                        let n = self.back_off(&tenant);
                        tracing::warn!(%tenant, outcome = ?other, attempt = n, "rollback attempt aborted");
                    }
                    Err(e) => {
                        let n = self.back_off(&tenant);
                        tracing::warn!(%tenant, error = %e, attempt = n, "rollback attempt failed");
                    }
                }
            }
        }
    }

    fn on_cutover_finished(
        &mut self,
        tenant: TenantId,
        move_id: i64,
        outcome: Result<Outcome, CutoverError>,
    ) {
        let started = self.cutovers.running.remove(&tenant);
        count_attempt(&outcome, "");
        self.cutovers.waits.retain(|w| w.tenant != tenant);
        let took = started.map(|s| s.elapsed().as_millis()).unwrap_or_default();
        match outcome {
            Ok(Outcome::CutOver {
                pause,
                lock_wait,
                catch_up,
                route_version,
            }) => {
                tracing::info!(
                    %tenant,
                    move_id,
                    pause_ms = pause.as_secs_f64() * 1e3,
                    lock_wait_ms = lock_wait.as_secs_f64() * 1e3,
                    catch_up_ms = catch_up.as_secs_f64() * 1e3,
                    route_version,
                    took_ms = took,
                    "cut over"
                );
                self.cutovers.backoff.remove(&tenant);
                if let Some(t) = self.release(&tenant) {
                    // Not a failure: nothing of the tenant may arrive any more.
                    self.quarantine.remove(&t.id);
                }
            }
            Ok(Outcome::Aborted {
                step,
                reason,
                pause,
            }) => {
                let n = self.back_off(&tenant);
                tracing::warn!(
                    %tenant,
                    step = step.as_str(),
                    %reason,
                    pause_ms = pause.map(|p| p.as_secs_f64() * 1e3),
                    retry_in_ms = policy::backoff(n, &self.config.cutover).as_millis() as u64,
                    "cutover attempt aborted"
                );
                if let Some(t) = self.tenants.get_mut(&tenant) {
                    t.state = MoveState::Streaming;
                }
            }
            Ok(Outcome::Different { summary }) => {
                tracing::error!(%tenant, %summary, "verification failed; the move failed");
                self.release(&tenant);
            }
            Err(e) => {
                let n = self.back_off(&tenant);
                tracing::warn!(%tenant, error = %e, retry_in_ms = policy::backoff(n, &self.config.cutover).as_millis() as u64, "cutover attempt failed");
                if let Some(t) = self.tenants.get_mut(&tenant) {
                    t.state = MoveState::Streaming;
                }
            }
        }
    }

    fn back_off(&mut self, tenant: &TenantId) -> u32 {
        let entry = self
            .cutovers
            .backoff
            .entry(tenant.clone())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now() + policy::backoff(entry.0, &self.config.cutover);
        entry.0
    }

    /// The cutover marker `token` was read: everything before it is what must be applied.
    pub(super) fn on_cutover_marker(&mut self, token: u64) {
        let through = self.last_end;
        for w in self.cutovers.waits.iter_mut().filter(|w| w.token == token) {
            w.through = Some(through);
        }
        self.answer_cutover_waits();
    }

    /// Answers the waits whose tenant's target holds everything before their marker.
    pub(super) fn answer_cutover_waits(&mut self) {
        if self.cutovers.waits.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.cutovers.waits.len() {
            let w = &self.cutovers.waits[i];
            if w.reply.is_closed() {
                self.cutovers.waits.swap_remove(i);
                continue;
            }
            // Rows waiting to be read again are not at the target yet: no answer (the
            // attempt aborts at its budget) until they are.
            let done = w.through.is_some_and(|through| {
                self.tenants.get(&w.tenant).is_some_and(|t| {
                    t.is_copied()
                        && self
                            .unacked
                            .get(&t.destination.target)
                            .and_then(|q| q.front())
                            .is_none_or(|(end, _)| *end > through)
                })
            });
            if done {
                let w = self.cutovers.waits.swap_remove(i);
                let _ = w.reply.send(());
            } else {
                i += 1;
            }
        }
    }

    /// How many bytes of WAL the tenant's target trails the stream by.
    pub(super) fn lag_bytes(&self, tenant: &TenantId) -> u64 {
        let Some(t) = self.tenants.get(tenant) else {
            return 0;
        };
        let caught = self
            .caught_up
            .get(&t.destination.target)
            .copied()
            .unwrap_or(Lsn::INVALID)
            .max(t.applied);
        if self.last_end.is_valid() {
            self.last_end.bytes_since(caught)
        } else {
            0
        }
    }
}

/// Records a rollback attempt in the registry; a successful one also drops the reverse slot.
async fn record_rollback(
    job: &reverse::RollbackJob,
    attempt: i32,
    outcome: &Result<Outcome, CutoverError>,
) {
    let Ok(registry) = crate::registry::Registry::new(job.config.registry_schema.clone()) else {
        return;
    };
    let Ok(source) = job.config.source.connect_sql().await else {
        return;
    };
    let (result, step, pause, detail) = match outcome {
        Ok(Outcome::CutOver { pause, .. }) => ("rolled_back", None, Some(*pause), None),
        Ok(Outcome::Aborted {
            step,
            reason,
            pause,
        }) => (
            "rollback_aborted",
            Some(step.as_str()),
            *pause,
            Some(reason.clone()),
        ),
        Ok(Outcome::Different { summary }) => {
            ("rollback_aborted", None, None, Some(summary.clone()))
        }
        Err(e) => ("rollback_failed", None, None, Some(e.to_string())),
    };
    let _ = registry
        .record_attempt(
            &source,
            job.mv.id,
            attempt,
            result,
            step,
            pause.map(|p| p.as_secs_f64() * 1e3),
            detail.as_deref(),
        )
        .await;
    if let Some(d) = &detail {
        let _ = registry
            .note_error(
                &source,
                job.mv.id,
                &format!("rollback attempt {attempt}: {d}"),
            )
            .await;
    }
    if matches!(outcome, Ok(Outcome::CutOver { .. })) {
        if let Some(endpoint) = job.config.targets.get(&job.mv.target) {
            if let Ok(target) = endpoint.connect_sql().await {
                if let Err(e) = reverse::drop_slot(&target, job.mv.id).await {
                    tracing::warn!(move_id = job.mv.id, error = %e, "dropping the reverse slot");
                }
            }
        }
    }
}

/// Counts an attempt by result and records a finished one's pause.
fn count_attempt(outcome: &Result<Outcome, CutoverError>, prefix: &str) {
    use crate::telemetry as m;
    let result = match outcome {
        Ok(Outcome::CutOver { pause, .. }) => {
            metrics::histogram!(m::CUTOVER_PAUSE).record(pause.as_secs_f64());
            "done"
        }
        Ok(Outcome::Aborted { .. }) => "aborted",
        Ok(Outcome::Different { .. }) => "different",
        Err(_) => "failed",
    };
    metrics::counter!(m::CUTOVER_ATTEMPTS, "result" => format!("{prefix}{result}")).increment(1);
}
