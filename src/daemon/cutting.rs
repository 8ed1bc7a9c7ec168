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

use tokio::sync::oneshot;

use super::Engine;
use crate::cutover::{self, policy, CutoverMsg, FencedTable, Job, Outcome};
use crate::error::Error;
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

/// Cutover bookkeeping of the pipeline.
#[derive(Default)]
pub(super) struct Cutovers {
    running: HashMap<TenantId, Instant>,
    waits: Vec<CatchUpWait>,
    /// Aborted attempts per tenant in this run, and when the next may start.
    backoff: HashMap<TenantId, (u32, Instant)>,
    tokens: u64,
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
            tokio::spawn(cutover::run(job, self.cutover_tx.clone()));
        }
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
        }
    }

    fn on_cutover_finished(
        &mut self,
        tenant: TenantId,
        move_id: i64,
        outcome: Result<Outcome, Error>,
    ) {
        let started = self.cutovers.running.remove(&tenant);
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
            let done = w.through.is_some_and(|through| {
                self.tenants.get(&w.tenant).is_some_and(|t| {
                    self.unacked
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
