//! The pipeline's side of cutovers: starting attempts, answering their catch-up waits,
//! reverse streams, rollbacks and cleanups, and telling the pipeline when a tenant is cut
//! over ([`Settled`]). It knows the pipeline only through what its callers pass in: it does
//! not import the daemon's loop.
//!
//! Invariants:
//! - At most one attempt per tenant runs; a move left `cutting_over` by a crash is put back
//!   to `streaming` (its fence transaction died with its connection) and retried.
//! - A catch-up wait is answered only after the marker was read from the stream and the
//!   tenant's target acknowledged every transaction handed to it before the marker.
//! - A cut-over tenant leaves the pipeline: nothing of it is applied any more (the old
//!   location refuses its writes) and it no longer holds the slot.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use tokio_postgres::Client;

use crate::config::Config;
use crate::cutover::policy::NotNow;
use crate::cutover::{self, policy, reverse, CutoverError, CutoverMsg, FencedTable, Job, Outcome};
use crate::lsn::Lsn;
use crate::registry::{CutoverMode, Move, MoveState, Registry};
use crate::tenant::{TargetId, TenantId};

/// A running attempt's catch-up wait.
struct CatchUpWait {
    token: u64,
    tenant: TenantId,
    /// The end of the last transaction read before the marker, once it was read.
    through: Option<Lsn>,
    reply: oneshot::Sender<()>,
    /// When the attempt asked, just before it wrote the marker: how long the marker took
    /// to come back through the stream tells a late stream from a slow apply.
    asked: Instant,
}

/// A running reverse stream: one per target slot, while a move cut over onto it has not
/// been rolled back or cleaned up.
struct Reversing {
    stop: Option<oneshot::Sender<()>>,
    waits: mpsc::UnboundedSender<reverse::MarkerWait>,
    task: tokio::task::JoinHandle<Result<(), CutoverError>>,
}

/// A running cutover attempt.
struct Attempt {
    since: Instant,
    target: TargetId,
    schema: String,
}

/// What the pipeline does with a tenant after a cutover attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Settled {
    /// Cut over: the tenant leaves the pipeline (nothing of it may arrive any more).
    CutOver(TenantId),
    /// Aborted or failed, to be retried: the tenant streams on.
    Streaming(TenantId),
    /// The verification found differences: the move failed.
    Different(TenantId),
}

/// A moving tenant as a cutover attempt's start sees it.
pub(super) struct Candidate<'a> {
    pub tenant: &'a TenantId,
    pub state: MoveState,
    pub lag_bytes: u64,
    /// Every key copied (none waiting for a re-read).
    pub copied: bool,
    /// How long its target recently took from hand-over to applied.
    pub apply_delay: Duration,
}

/// Cutover bookkeeping of the pipeline.
pub(super) struct Cutovers {
    config: Config,
    run_id: u64,
    tx: mpsc::UnboundedSender<CutoverMsg>,
    running: HashMap<TenantId, Attempt>,
    /// The same attempts, as the reverse streams must know them.
    attempts: reverse::SharedAttempts,
    waits: Vec<CatchUpWait>,
    /// Aborted attempts per tenant in this run, and when the next may start.
    backoff: HashMap<TenantId, (u32, Instant)>,
    tokens: u64,
    /// Reverse streams by slot; when a failed one may start again.
    reversing: HashMap<String, Reversing>,
    reverse_retry: HashMap<String, Instant>,
    /// The tables of each cut-over move with a reverse stream (what its rollback fences).
    reverse_tables: HashMap<i64, Vec<FencedTable>>,
    /// Rollback attempts running, by move id.
    rolling_back: HashMap<i64, Instant>,
    /// Automatic cleanups running or failed (not retried before the time given), by move id.
    cleaning: HashMap<i64, Instant>,
    /// Ended moves whose fences and reverse slot were released in this run, by the state
    /// they were released in.
    released: HashMap<i64, MoveState>,
    /// When each requested cutover that cannot start was last logged as waiting.
    waiting_logged: HashMap<TenantId, Instant>,
}

impl Cutovers {
    pub fn new(config: Config, run_id: u64, tx: mpsc::UnboundedSender<CutoverMsg>) -> Cutovers {
        Cutovers {
            config,
            run_id,
            tx,
            running: HashMap::new(),
            attempts: Default::default(),
            waits: Vec::new(),
            backoff: HashMap::new(),
            tokens: 0,
            reversing: HashMap::new(),
            reverse_retry: HashMap::new(),
            reverse_tables: HashMap::new(),
            rolling_back: HashMap::new(),
            cleaning: HashMap::new(),
            released: HashMap::new(),
            waiting_logged: HashMap::new(),
        }
    }

    pub fn is_running(&self, tenant: &TenantId) -> bool {
        self.running.contains_key(tenant)
    }

    /// Starts an attempt for `mv` if the policy allows it now; returns whether it started
    /// (the tenant is then `cutting_over`).
    pub fn try_start(
        &mut self,
        mv: &Move,
        c: Candidate<'_>,
        tables: impl FnOnce() -> Vec<FencedTable>,
    ) -> bool {
        let ready = policy::Readiness {
            state: c.state,
            auto: mv.cutover_mode == CutoverMode::Auto,
            requested: mv.cutover_requested,
            lag_bytes: c.lag_bytes,
            attempt_running: self.is_running(c.tenant),
            backoff_over: self
                .backoff
                .get(c.tenant)
                .is_none_or(|(_, at)| Instant::now() >= *at),
            rereads_pending: !c.copied,
            apply_delay: c.apply_delay,
        };
        if let Err(why) = policy::may_start(&ready, &self.config.cutover) {
            if matches!(why, NotNow::Lagging | NotNow::Slow) {
                self.log_waiting(c.tenant, why, &ready);
            }
            return false;
        }
        self.waiting_logged.remove(c.tenant);
        self.tokens += 1;
        let job = Job {
            config: self.config.clone(),
            mv: mv.clone(),
            tables: tables(),
            attempt: mv.cutover_attempts + 1,
            token: self.run_id.wrapping_add(self.tokens),
        };
        tracing::info!(tenant = %c.tenant, attempt = job.attempt, "cutover attempt");
        // Before anything of the attempt runs: a reverse stream must not take the target
        // schema for no member's while its flip may come.
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .started(&mv.target, &mv.target_schema);
        self.running.insert(
            c.tenant.clone(),
            Attempt {
                since: Instant::now(),
                target: mv.target.clone(),
                schema: mv.target_schema.clone(),
            },
        );
        let span = tracing::info_span!("cutover", tenant = %c.tenant, target = %job.mv.target);
        tokio::spawn(tracing::Instrument::instrument(
            cutover::run(job, self.tx.clone()),
            span,
        ));
        true
    }

    /// Says why a cutover that was asked for does not start, every 10 s at most per tenant.
    fn log_waiting(&mut self, tenant: &TenantId, why: NotNow, ready: &policy::Readiness) {
        if !(ready.auto || ready.requested) {
            return;
        }
        let now = Instant::now();
        if self
            .waiting_logged
            .get(tenant)
            .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(10))
        {
            return;
        }
        self.waiting_logged.insert(tenant.clone(), now);
        let limit = self.config.cutover.max_apply_delay;
        match why {
            NotNow::Slow => tracing::info!(
                %tenant,
                apply_delay_ms = ready.apply_delay.as_millis() as u64,
                max_apply_delay_ms = limit.as_millis() as u64,
                "cutover waits: the target's apply delay would not fit the catch-up's share of the pause (max_apply_delay_ms)"
            ),
            _ => tracing::info!(
                %tenant,
                lag_bytes = ready.lag_bytes,
                max_lag_bytes = self.config.cutover.max_lag_bytes,
                "cutover waits: the target trails the stream by more than max_lag_mb"
            ),
        }
    }

    /// Keeps one reverse stream running for every slot that cut-over moves share (their
    /// target's), stops those no such move is left on, and starts the rollbacks operators
    /// asked for.
    pub async fn run_reverse(&mut self, registry: &Registry, control: &Client, moves: &[Move]) {
        let wanted: Vec<&Move> = moves
            .iter()
            .filter(|m| m.state == MoveState::CutOver && m.reverse_slot.is_some())
            .collect();
        let mut slots: HashMap<&str, &Move> = HashMap::new();
        for mv in &wanted {
            if let Some(slot) = mv.reverse_slot.as_deref() {
                slots.entry(slot).or_insert(mv);
            }
        }
        let gone: Vec<String> = self
            .reversing
            .keys()
            .filter(|slot| !slots.contains_key(slot.as_str()))
            .cloned()
            .collect();
        for slot in gone {
            if let Some(mut r) = self.reversing.remove(&slot) {
                if let Some(stop) = r.stop.take() {
                    let _ = stop.send(());
                }
                tracing::info!(%slot, "reverse replication stopped");
            }
        }
        self.reverse_tables
            .retain(|id, _| wanted.iter().any(|m| m.id == *id));
        for mv in &wanted {
            if self.reverse_tables.contains_key(&mv.id) {
                continue;
            }
            match crate::layout::tenant_layout(&self.config, control, mv, moves).await {
                Ok(t) => {
                    let tables = t
                        .into_iter()
                        .map(|(chunk, target)| FencedTable { chunk, target })
                        .collect();
                    self.reverse_tables.insert(mv.id, tables);
                }
                Err(e) => {
                    tracing::warn!(move_id = mv.id, error = %e, "reverse replication: reading the tenant's tables")
                }
            }
        }
        for (slot, first) in slots {
            self.keep_reverse(registry, control, slot, first, &wanted)
                .await;
        }
        for mv in wanted {
            let running = mv
                .reverse_slot
                .as_ref()
                .and_then(|slot| self.reversing.get(slot))
                .is_some_and(|r| !r.task.is_finished());
            if running && mv.rollback_requested && !self.rolling_back.contains_key(&mv.id) {
                self.start_rollback(mv);
            }
        }
    }

    /// Keeps the reverse stream of `slot` running: a failed one is recorded on its
    /// members' moves and started again after a while.
    async fn keep_reverse(
        &mut self,
        registry: &Registry,
        control: &Client,
        slot: &str,
        first: &Move,
        wanted: &[&Move],
    ) {
        if let Some(r) = self.reversing.get(slot) {
            if !r.task.is_finished() {
                return;
            }
            let r = self.reversing.remove(slot).expect("looked up above");
            match r.task.await {
                Ok(Err(e)) => {
                    tracing::warn!(%slot, error = %e, "reverse replication failed; restarting");
                    metrics::counter!(crate::telemetry::REVERSE_FAILURES).increment(1);
                    // The old location stops following the new one: operators must see it
                    // on the moves, not only in the log.
                    for mv in wanted
                        .iter()
                        .filter(|m| m.reverse_slot.as_deref() == Some(slot))
                    {
                        if let Err(e) = registry
                            .note_error(
                                control,
                                mv.id,
                                &format!("reverse replication (keeps the old location current for a rollback) failed; retrying: {e}"),
                            )
                            .await
                        {
                            tracing::warn!(move_id = mv.id, error = %e, "recording the reverse stream's error");
                        }
                    }
                }
                Err(e) => tracing::warn!(%slot, error = %e, "reverse replication task ended"),
                Ok(Ok(())) => {}
            }
            self.reverse_retry
                .insert(slot.to_owned(), Instant::now() + Duration::from_secs(2));
        }
        if self
            .reverse_retry
            .get(slot)
            .is_some_and(|at| Instant::now() < *at)
        {
            return;
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let (waits_tx, waits_rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!("reverse", %slot, target = %first.target);
        let task = tokio::spawn(tracing::Instrument::instrument(
            reverse::run(
                self.config.clone(),
                reverse::Reverse {
                    slot: slot.to_owned(),
                    target: first.target.clone(),
                },
                self.attempts.clone(),
                waits_rx,
                stop_rx,
            ),
            span,
        ));
        self.reversing.insert(
            slot.to_owned(),
            Reversing {
                stop: Some(stop_tx),
                waits: waits_tx,
                task,
            },
        );
    }

    /// Lifts what cutover attempts left for moves that ended without a cutover (failed,
    /// paused, cancelled): armed fences and reverse slots. Once per move and state in this
    /// run (so once after every start, for moves that ended while the daemon was down).
    pub fn release_ended(&mut self, moves: &[Move]) {
        let mut ended = Vec::new();
        for mv in moves.iter().filter(|m| {
            matches!(
                m.state,
                MoveState::Failed | MoveState::Paused | MoveState::Cancelled
            )
        }) {
            if self.released.get(&mv.id) != Some(&mv.state) {
                self.released.insert(mv.id, mv.state);
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
    pub fn auto_cleanup(&mut self, moves: &[Move]) {
        if !self.config.cutover.auto_cleanup {
            return;
        }
        for mv in moves.iter().filter(|m| {
            m.state == MoveState::CutOver && m.cleanup_due && m.verified && !m.rollback_requested
        }) {
            if self
                .cleaning
                .get(&mv.id)
                .is_some_and(|at| Instant::now() < *at)
            {
                continue;
            }
            // One try per hour at most: a failed cleanup leaves its error in the registry.
            self.cleaning
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
        let Some(r) = mv
            .reverse_slot
            .as_ref()
            .and_then(|slot| self.reversing.get(slot))
        else {
            return;
        };
        let Some(tables) = self.reverse_tables.get(&mv.id) else {
            return;
        };
        if self
            .backoff
            .get(&mv.tenant)
            .is_some_and(|(_, at)| Instant::now() < *at)
        {
            return;
        }
        self.tokens += 1;
        let job = reverse::RollbackJob {
            config: self.config.clone(),
            mv: mv.clone(),
            tables: tables.clone(),
            token: self.run_id.wrapping_add(self.tokens),
            reverse: r.waits.clone(),
        };
        self.rolling_back.insert(mv.id, Instant::now());
        tracing::info!(tenant = %mv.tenant, move_id = mv.id, "rollback attempt");
        let tx = self.tx.clone();
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

    /// A message of a running attempt; a finished cutover attempt says what becomes of its
    /// tenant.
    pub fn on_message(&mut self, msg: CutoverMsg) -> Option<Settled> {
        match msg {
            CutoverMsg::Wait {
                token,
                tenant,
                reply,
            } => {
                self.waits.push(CatchUpWait {
                    token,
                    tenant,
                    through: None,
                    reply,
                    asked: Instant::now(),
                });
                None
            }
            CutoverMsg::Finished {
                tenant,
                move_id,
                outcome,
            } => Some(self.on_finished(tenant, move_id, outcome)),
            CutoverMsg::RolledBack {
                tenant,
                move_id,
                outcome,
            } => {
                self.rolling_back.remove(&move_id);
                count_attempt(&outcome, "rollback_");
                match outcome {
                    Ok(Outcome::CutOver { pause, .. }) => {
                        tracing::info!(%tenant, move_id, pause_ms = pause.as_secs_f64() * 1e3, "rolled back");
                        // Its stream goes on for the target's other cut-over moves, and stops
                        // once the registry shows none is left.
                        self.backoff.remove(&tenant);
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
                None
            }
        }
    }

    fn on_finished(
        &mut self,
        tenant: TenantId,
        move_id: i64,
        outcome: Result<Outcome, CutoverError>,
    ) -> Settled {
        let started = self.running.remove(&tenant);
        if let Some(a) = &started {
            self.attempts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ended(&a.target, &a.schema);
        }
        count_attempt(&outcome, "");
        self.waits.retain(|w| w.tenant != tenant);
        let took = started
            .map(|s| s.since.elapsed().as_millis())
            .unwrap_or_default();
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
                self.backoff.remove(&tenant);
                Settled::CutOver(tenant)
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
                Settled::Streaming(tenant)
            }
            Ok(Outcome::Different { summary }) => {
                tracing::error!(%tenant, %summary, "verification failed; the move failed");
                Settled::Different(tenant)
            }
            Err(e) => {
                let n = self.back_off(&tenant);
                tracing::warn!(%tenant, error = %e, retry_in_ms = policy::backoff(n, &self.config.cutover).as_millis() as u64, "cutover attempt failed");
                Settled::Streaming(tenant)
            }
        }
    }

    fn back_off(&mut self, tenant: &TenantId) -> u32 {
        let entry = self
            .backoff
            .entry(tenant.clone())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now() + policy::backoff(entry.0, &self.config.cutover);
        entry.0
    }

    /// The cutover marker `token` was read: `through(tenant)` is the end of the waiting
    /// tenant's last transaction before it, which its target must hold.
    /// Returns each waiting tenant with the position it now waits for.
    pub fn on_marker(
        &mut self,
        token: u64,
        through: impl Fn(&TenantId) -> Lsn,
    ) -> Vec<(TenantId, Lsn)> {
        let mut set = Vec::new();
        for w in self.waits.iter_mut().filter(|w| w.token == token) {
            let at = through(&w.tenant);
            w.through = Some(at);
            tracing::info!(tenant = %w.tenant, marker_ms = w.asked.elapsed().as_secs_f64() * 1e3, "cutover marker read");
            set.push((w.tenant.clone(), at));
        }
        set
    }

    /// Answers the waits whose marker was read and whose tenant's target `holds` everything
    /// up to it; drops the waits nobody listens to any more.
    pub fn answer_waits(&mut self, holds: impl Fn(&TenantId, Lsn) -> bool) {
        let mut i = 0;
        while i < self.waits.len() {
            let w = &self.waits[i];
            if w.reply.is_closed() {
                self.waits.swap_remove(i);
                continue;
            }
            if w.through.is_some_and(|through| holds(&w.tenant, through)) {
                let w = self.waits.swap_remove(i);
                let _ = w.reply.send(());
            } else {
                i += 1;
            }
        }
    }
}

/// Records a rollback attempt in the registry; a successful one also takes the tenant out
/// of its target's reverse slot (dropped with the last tenant).
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
    if let (Ok(Outcome::CutOver { .. }), Some(slot)) = (outcome, &job.mv.reverse_slot) {
        if let Some(endpoint) = job.config.targets.get(&job.mv.target) {
            if let Ok(target) = endpoint.connect_sql().await {
                if let Err(e) = reverse::release(&target, slot, &job.mv.target_schema).await {
                    tracing::warn!(move_id = job.mv.id, error = %e, "taking the tenant out of the reverse slot");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProcessEnv;
    use crate::cutover::policy::Step;
    use std::time::Duration;

    fn cutovers() -> Cutovers {
        let text = "[source]\nuser = \"u\"\ndbname = \"app\"\n";
        let config = Config::from_toml(text, std::path::Path::new("t.toml"), &ProcessEnv).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        Cutovers::new(config, 1, tx)
    }

    fn tenant(s: &str) -> TenantId {
        TenantId::new(s.to_string()).unwrap()
    }

    #[test]
    fn a_wait_is_answered_only_after_its_marker_once_the_target_holds_it() {
        let mut c = cutovers();
        let (reply, mut answered) = oneshot::channel();
        let wait = CutoverMsg::Wait {
            token: 7,
            tenant: tenant("a"),
            reply,
        };
        assert_eq!(c.on_message(wait), None);
        // No marker read yet: nothing to compare with.
        c.answer_waits(|_, _| true);
        assert!(answered.try_recv().is_err());
        // Another attempt's marker does not count.
        assert!(c.on_marker(8, |_| Lsn(500)).is_empty());
        c.answer_waits(|_, _| true);
        assert!(answered.try_recv().is_err());
        let waiting = c.on_marker(7, |t| {
            if *t == tenant("a") {
                Lsn(500)
            } else {
                Lsn(900)
            }
        });
        assert_eq!(waiting, vec![(tenant("a"), Lsn(500))]);
        c.answer_waits(|t, through| *t == tenant("a") && through < Lsn(500));
        assert!(
            answered.try_recv().is_err(),
            "the target does not hold 0/1F4 yet"
        );
        c.answer_waits(|t, through| *t == tenant("a") && through == Lsn(500));
        assert!(answered.try_recv().is_ok());
        assert!(c.waits.is_empty());
        // A wait whose attempt gave up is dropped unanswered.
        let (reply, gone) = oneshot::channel();
        c.on_message(CutoverMsg::Wait {
            token: 9,
            tenant: tenant("b"),
            reply,
        });
        drop(gone);
        c.answer_waits(|_, _| false);
        assert!(c.waits.is_empty());
    }

    #[test]
    fn a_finished_attempt_settles_its_tenant_and_an_aborted_one_backs_off() {
        let mut c = cutovers();
        let finished = |t: &str, outcome| CutoverMsg::Finished {
            tenant: tenant(t),
            move_id: 1,
            outcome,
        };
        let aborted = Outcome::Aborted {
            step: Step::CatchUp,
            reason: "over budget".into(),
            pause: Some(Duration::from_millis(100)),
        };
        assert_eq!(
            c.on_message(finished("a", Ok(aborted))),
            Some(Settled::Streaming(tenant("a")))
        );
        let (n, at) = c.backoff[&tenant("a")];
        assert!(n == 1 && at > Instant::now(), "the next attempt waits");
        let done = Outcome::CutOver {
            pause: Duration::from_millis(5),
            lock_wait: Duration::ZERO,
            catch_up: Duration::from_millis(2),
            route_version: 3,
        };
        assert_eq!(
            c.on_message(finished("a", Ok(done))),
            Some(Settled::CutOver(tenant("a")))
        );
        assert!(!c.backoff.contains_key(&tenant("a")));
        let different = Outcome::Different {
            summary: "1 chunk".into(),
        };
        assert_eq!(
            c.on_message(finished("b", Ok(different))),
            Some(Settled::Different(tenant("b")))
        );
        assert_eq!(
            c.on_message(finished("c", Err(CutoverError::AlreadyMoved))),
            Some(Settled::Streaming(tenant("c")))
        );
    }
}
