//! The `run` daemon: one slot, every moving tenant, backfill under the live stream.
//!
//! ```text
//!  registry (poll + NOTIFY) ──► setup{tenant}: provision, resume or reset
//!                                     │
//!  slot ─► decode ─► txn assembly ─► route ─► per-tenant backfill verdicts ─► applier{target}
//!               ▲          ▲                                                     │
//!               │     readers: low wm ─► chunk SELECT ─► rows ─► high wm         │
//!               │                                                                ▼
//!      feedback ◄── RocksDB checkpoint ◄── durable tracker (min over targets) ◄── commits
//! ```
//!
//! Invariants:
//! - The position confirmed to the source is the tracker's: every transaction at or before
//!   it is durable on every target it touched. A position that a target commit made durable
//!   is written to RocksDB (with the tenants' applied positions) before the feedback;
//!   positions past transactions that touched no target are confirmed without a checkpoint
//!   (there is nothing of theirs to lose).
//! - A tenant's rows and its backfill state reach its target in one transaction together
//!   with the applied position; on restart every tenant resumes from its target's record,
//!   and changes of transactions at or before it are not looked at again for that tenant.
//! - Backfill watermarks take effect at their transaction's commit, so a transaction
//!   dropped half-way by a reconnect leaves no half-applied window.
//! - A tenant-fatal error stops that tenant only: it leaves the router, its queued work is
//!   dropped by the appliers, and it no longer holds the slot back. Resuming it copies it
//!   again from scratch (its earlier rows are removed first).
//! - DDL that changes a moved table pauses the tenants moving it; nothing is applied with a
//!   stale shape.

mod admission;
mod control;
mod cutting;
mod error;
mod filter;
mod moving;
mod reports;
mod setup;
mod startup;

pub use error::{Error, ErrorClass, MoveError};
pub use startup::RunOptions;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::apply::applier::{self, ApplierConfig, ApplyEvent, Quarantine};
use crate::apply::durable::{DurableTracker, Handover};
use crate::apply::writer::{RowChange, RowShape};
use crate::apply::Work;
use crate::assembly::images::{Images, Planned};
use crate::assembly::{Assembler, Transaction};
use crate::backfill::chunk::{Mark, Watermark, WATERMARK_PREFIX};
use crate::checkpoint::{Batch, SlotGate, SlotRecord, Store, Writer, Written};
use crate::cluster::ClusterError;
use crate::config::Config;
use crate::cutover::{CutoverMsg, FencedTable};
use crate::decode::{Message, Relation, RelationCache, RelationChange, RelationId};
use crate::layout::TableWatch;
use crate::lsn::{CommitLsn, Lsn};
use crate::registry::{self, Move, MoveState, Registry, Report};
use crate::route::{RouteError, Router};
use crate::source::{ReplicationStream, SourceEvent, StreamSettings};
use crate::sql::{quote_ident, QualifiedName};
use crate::tenant::{TargetId, TenantId};

use crate::backfill::reader::{self, ChunkEvent};
use crate::backfill::scheduler::{Reading, Scheduler};
use crate::backfill::table::{ChunkRows, High, RecentCommits};
use admission::{Admission, Follow};
use control::Control;
use cutting::{Candidate, Cutovers, Settled};
use moving::{Standing, Tenant, TenantRecord};
use setup::{Remembered, SetupResult};
use startup::{open_slot, wait_for_lease, Endpoint, OpenedSlot};

struct Engine {
    config: Config,
    /// Read directly; written only through `checkpoints`.
    store: Arc<Store>,
    checkpoints: Writer,
    /// Keeps the slot behind applied commits whose checkpoint is still being written.
    gate: SlotGate,
    control: Control,
    run_id: u64,
    relations: RelationCache,
    router: Router,
    tenants: BTreeMap<TenantId, Tenant>,
    /// Source tables some moving tenant copies: changes of other tables are not looked at.
    moved_tables: BTreeSet<QualifiedName>,
    /// Published tables that appeared after a move started.
    table_watch: TableWatch,
    appliers: BTreeMap<TargetId, applier::Applier>,
    apply_events: mpsc::UnboundedSender<ApplyEvent>,
    chunk_rx: mpsc::UnboundedReceiver<ChunkEvent>,
    setup_events: mpsc::UnboundedSender<SetupResult>,
    admission: Admission,
    /// Permits for setups running at once (`move.setup_concurrency`): a setup holds two
    /// connections, and fifty moves requested together must not open a hundred.
    setup_slots: Arc<tokio::sync::Semaphore>,
    quarantine: Quarantine,
    chunks: Scheduler,
    tracker: DurableTracker,
    assembler: Assembler,
    last_end: Lsn,
    /// Per target: what was handed over and not applied yet, and how far it is caught up.
    handover: Handover,
    /// Tenants stopped and not yet recorded in the registry: (move, tenant, from, to, why).
    stopped: Vec<(i64, TenantId, MoveState, MoveState, String)>,
    /// Recently committed source transactions (for the chunk snapshot check).
    recent: RecentCommits,
    cutovers: Cutovers,
    /// The tenants the row filter was last brought to (`None` until the first poll).
    filter_listed: Option<BTreeSet<TenantId>>,
    reports: reports::Reports,
}

/// Committed transactions remembered for the snapshot check; a transaction racing a low
/// watermark committed just before it, so a short memory is enough.
const RECENT_COMMITS: usize = 100_000;

/// A loop step that kept everything else waiting this long is logged (every change of
/// every tenant waits behind it).
const SLOW_STEP: Duration = Duration::from_millis(50);

/// How long the loop's steps held it, per kind of step: the slow ones are logged, at most
/// one line a second.
#[derive(Default)]
struct Held {
    slowest: Option<(&'static str, Duration)>,
    slow: u32,
    logged: Option<Instant>,
}

impl Held {
    fn note(&mut self, arm: &'static str, took: Duration) {
        if took < SLOW_STEP {
            return;
        }
        self.slow += 1;
        if self.slowest.is_none_or(|(_, d)| took > d) {
            self.slowest = Some((arm, took));
        }
        if self
            .logged
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        if let Some((arm, took)) = self.slowest.take() {
            tracing::info!(
                step = arm,
                ms = took.as_millis() as u64,
                slow_steps = self.slow,
                "the pipeline loop was held (the slowest step since the last such line)"
            );
        }
        self.slow = 0;
        self.logged = Some(Instant::now());
    }
}

/// Stream messages handled in one round of the main loop, at most (the other arms wait
/// at most this long).
const DRAIN_BURST: usize = 256;

/// How often at most a position is recorded in RocksDB only so that the slot may be
/// confirmed there (transactions that touched no target, idle keepalives): WAL is released
/// a little later, for one small synced write per interval at most.
const CONFIRM_RECORD_EVERY: Duration = Duration::from_millis(25);

fn pg_now() -> i64 {
    // PostgreSQL timestamps count microseconds from 2000-01-01.
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    unix - 946_684_800_000_000
}

/// The tenants the row filter lists for these registry rows.
fn listed_tenants(moves: &[Move]) -> BTreeSet<TenantId> {
    moves
        .iter()
        .filter(|m| filter::listed(m.state))
        .map(|m| m.tenant.clone())
        .collect()
}

/// Runs the daemon until `shutdown` resolves (then stops cleanly: appliers drain, the last
/// durable position is checkpointed and confirmed).
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    // Every line the daemon logs carries its slot; its tasks add tenant, target and lane.
    let span = tracing::info_span!("daemon", slot = %config.replication.slot);
    tracing::Instrument::instrument(run_daemon(config, options, shutdown), span).await
}

async fn run_daemon(
    config: Config,
    options: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let began = Instant::now();
    crate::telemetry::init();
    let _endpoint = Endpoint(
        config
            .metrics
            .listen
            .clone()
            .map(|listen| tokio::spawn(crate::telemetry::serve(listen))),
    );
    tokio::pin!(shutdown);
    let registry = Registry::new(config.registry_schema.clone())?;
    let (mut control, notifications) = config.source.connect_listen().await?;
    registry.install(&mut control).await?;
    if !wait_for_lease(
        &control,
        &config.replication.slot,
        options.standby,
        &mut shutdown,
    )
    .await?
    {
        return Ok(());
    }
    tracing::debug!(ms = began.elapsed().as_millis() as u64, "lease taken");
    let store = Arc::new(Store::open(&config.state_dir)?);
    let (written_tx, written) = mpsc::unbounded_channel();
    let checkpoints = Writer::start(store.clone(), written_tx)?;
    control
        .batch_execute(&format!("LISTEN {}", quote_ident(registry::CHANNEL)))
        .await
        .map_err(ClusterError::sql("listening for registry changes"))?;
    let opened = open_slot(&control, &store, &checkpoints, &config, &options).await?;
    // The filter as the registry stands (a stale one still lists every move resumed now:
    // each joined it at its first setup, and leaves only when it stops consuming).
    if let Err(e) = filter::sync(&config, &mut control, None).await {
        tracing::warn!(error = %e, "cannot bring the publication's row filter up to date at start; going on with it as it is");
    }

    let (apply_tx, apply) = mpsc::unbounded_channel();
    let (chunk_tx, chunk_rx) = mpsc::unbounded_channel();
    let (setup_tx, setup) = mpsc::unbounded_channel();
    let (cutover_tx, cutover) = mpsc::unbounded_channel();
    let mut inbox = Inbox {
        apply,
        written,
        setup,
        cutover,
        notifications,
    };
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let setup_slots = Arc::new(tokio::sync::Semaphore::new(config.moves.setup_concurrency));
    let assembler = Assembler::new(config.moves.max_txn_bytes);
    let cutovers = Cutovers::new(config.clone(), run_id, cutover_tx);
    let reports = reports::Reports::spawn(
        config.source.clone(),
        Registry::new(config.registry_schema.clone())?,
        config.replication.slot.clone(),
    );
    let control = Control::new(
        control,
        registry,
        config.source.clone(),
        config.replication.slot.clone(),
    );
    let mut engine = Engine {
        router: Router::new(config.tenancy.clone()),
        chunks: Scheduler::new(
            reader::Pool::new(config.source.clone(), config.moves.backfill_rows_per_sec),
            chunk_tx,
            run_id,
            config.moves.backfill_workers,
            config.moves.chunk_rows,
        ),
        config,
        store,
        checkpoints,
        gate: SlotGate::new(opened.ceiling),
        control,
        run_id,
        relations: RelationCache::new(),
        tenants: BTreeMap::new(),
        moved_tables: BTreeSet::new(),
        table_watch: TableWatch::default(),
        appliers: BTreeMap::new(),
        apply_events: apply_tx,
        chunk_rx,
        setup_events: setup_tx,
        admission: Admission::default(),
        setup_slots,
        quarantine: Quarantine::default(),
        tracker: DurableTracker::new(CommitLsn::NONE),
        assembler,
        last_end: Lsn::INVALID,
        handover: Handover::default(),
        stopped: Vec::new(),
        recent: RecentCommits::new(RECENT_COMMITS),
        cutovers,
        filter_listed: None,
        reports,
    };
    tracing::debug!(
        ms = began.elapsed().as_millis() as u64,
        "state open, slot ready"
    );
    let mut stream = engine.start_stream(&opened).await?;
    tracing::info!(
        slot = %engine.config.replication.slot,
        from = %opened.slot.confirmed_flush.unwrap_or(Lsn::INVALID),
        tenants = engine.tenants.len(),
        startup_ms = began.elapsed().as_millis() as u64,
        "switchyard running"
    );
    crate::telemetry::set_ready(true);
    let result = engine
        .run_loop(&mut stream, &mut inbox, &mut shutdown)
        .await;
    engine.finish(stream, &mut inbox).await;
    result
}

/// The receiving ends of the channels the daemon's loop waits on (besides the stream and
/// the chunk readers').
struct Inbox {
    apply: mpsc::UnboundedReceiver<ApplyEvent>,
    written: mpsc::UnboundedReceiver<Written>,
    setup: mpsc::UnboundedReceiver<SetupResult>,
    cutover: mpsc::UnboundedReceiver<CutoverMsg>,
    notifications: mpsc::UnboundedReceiver<tokio_postgres::Notification>,
}

impl Engine {
    /// Resumes every tenant that was moving and starts the stream; checks that the slot
    /// is on the cluster the state belongs to, and records it on a first start.
    async fn start_stream(&mut self, opened: &OpenedSlot) -> Result<ReplicationStream, Error> {
        // The daemon assembles whole transactions; the server spills large ones itself.
        let mut repl = self.config.replication.clone();
        repl.streaming = false;
        let settings = StreamSettings {
            endpoint: self.config.source.clone(),
            replication: repl.clone(),
            ack: true,
            start: Lsn::INVALID,
            ceiling: Some(opened.ceiling),
        };
        // Every tenant that was moving resumes before the first change is read, so none of
        // its changes can pass by unrouted. The stream starts meanwhile: the server's
        // decoding warms up (tens of milliseconds, more when the slot's restart point
        // trails) while the tenants' targets are checked, and what it sends waits in the
        // stream's buffer.
        let (restored, started) =
            tokio::join!(self.restore_tenants(), ReplicationStream::start(settings));
        let stream = match (restored, started) {
            (Ok(()), Ok(stream)) => stream,
            (Err(e), started) => {
                if let Ok(stream) = started {
                    stream.shutdown().await;
                }
                return Err(e);
            }
            (Ok(()), Err(e)) => return Err(e.for_slot(&repl.slot).into()),
        };
        let system = stream.system().clone();
        match &opened.recorded {
            Some(r) if r.system_id != system.system_id || r.slot != repl.slot => {
                stream.shutdown().await;
                return Err(MoveError::WrongCluster {
                    recorded_slot: r.slot.clone(),
                    recorded: r.system_id.clone(),
                    slot: repl.slot.clone(),
                    actual: system.system_id.clone(),
                }
                .into());
            }
            Some(_) => {}
            None => {
                crate::failpoint::hit("source.after_slot_created");
                let mut batch = Batch::new();
                batch
                    .slot(&SlotRecord {
                        slot: repl.slot.clone(),
                        system_id: system.system_id.clone(),
                        database: system.dbname.clone().unwrap_or_default(),
                        created_lsn: opened.slot.confirmed_flush.unwrap_or(Lsn::INVALID),
                    })
                    .ceiling_kept();
                self.checkpoints.commit(batch).await?;
            }
        }
        Ok(stream)
    }

    /// The daemon's loop: one event at a time from the stream, the appliers, the chunk
    /// readers, the checkpoint writer, setups, cutovers and the registry, until a stop or
    /// a fatal error. After each step: stops are recorded, catch-up waits answered, the
    /// slot confirmed as far as it may be, and chunks scheduled.
    async fn run_loop(
        &mut self,
        stream: &mut ReplicationStream,
        inbox: &mut Inbox,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<(), Error> {
        let slot = self.config.replication.slot.clone();
        let mut tick = tokio::time::interval(self.config.moves.registry_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What the stream could confirm past RocksDB's record (idle keepalives once the
        // stream is quiet) is recorded from the loop: when nothing else wakes it, this
        // does, so the slot follows within about this interval.
        let mut confirm_tick = tokio::time::interval(CONFIRM_RECORD_EVERY);
        confirm_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report_at = Instant::now();
        let mut held = Held::default();
        loop {
            let throttled = self.tracker.outstanding() >= self.config.moves.max_inflight_txns;
            // Each arm notes when its work began: the wait before it is not the loop's.
            let (arm, began, step): (&'static str, Instant, Result<(), Error>) = tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(()),
                Some(ev) = inbox.apply.recv() => {
                    let began = Instant::now();
                    let r = self.on_apply(ev);
                    self.mark_synced().await;
                    ("apply", began, r)
                }
                Some(w) = inbox.written.recv() => ("checkpoint", Instant::now(), self.on_written(w)),
                Some(ev) = self.chunk_rx.recv() => {
                    let began = Instant::now();
                    self.on_chunk(ev);
                    ("chunk", began, Ok(()))
                }
                Some(msg) = inbox.cutover.recv() => {
                    let began = Instant::now();
                    self.on_cutover(msg);
                    ("cutover", began, Ok(()))
                }
                Some((mv, res)) = inbox.setup.recv() => {
                    let began = Instant::now();
                    ("setup", began, self.on_setup(mv, res).await)
                }
                Some(_) = inbox.notifications.recv() => {
                    let began = Instant::now();
                    ("registry", began, self.poll_registry().await)
                }
                _ = tick.tick() => {
                    let began = Instant::now();
                    let mut r = self.poll_registry().await;
                    if r.is_ok() && report_at.elapsed() >= Duration::from_secs(1) {
                        report_at = Instant::now();
                        r = self.report().await;
                    }
                    ("registry", began, r)
                }
                _ = confirm_tick.tick() => ("confirm", Instant::now(), Ok(())),
                ev = stream.recv(), if !throttled => match ev {
                    Ok(Some(ev)) => {
                        let began = Instant::now();
                        match self.on_burst(stream, ev).await {
                            Ok(step) => ("stream", began, step),
                            Err(failed) => return Err(failed),
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.for_slot(&slot).into()),
                },
            };
            if let Err(e) = step {
                let class = match e.classify() {
                    ErrorClass::Transient => "transient",
                    ErrorClass::TenantFatal => "tenant_fatal",
                    ErrorClass::Fatal => "fatal",
                };
                metrics::counter!(crate::telemetry::PIPELINE_ERRORS, "class" => class).increment(1);
                match e.classify() {
                    ErrorClass::Fatal => return Err(e),
                    class => tracing::warn!(error = %e, ?class, "pipeline step failed; going on"),
                }
            }
            self.record_stops().await;
            self.answer_cutover_waits();
            // Transactions that touched no target are durable as soon as they are read; the
            // confirmed position must follow them too (an idle or filtered stream would
            // otherwise hold WAL until the next applied change).
            self.confirm(stream);
            self.schedule_chunks();
            held.note(arm, began.elapsed());
        }
    }

    /// A stream event, and what is already queued behind it: a backlog arrives much
    /// faster than one select round per message. Returns the step's result; the outer
    /// error is the stream's own, which ends the loop as it does from there.
    async fn on_burst(
        &mut self,
        stream: &mut ReplicationStream,
        ev: SourceEvent,
    ) -> Result<Result<(), Error>, Error> {
        let mut r = self.on_source(ev).await;
        let mut drained = 0;
        while r.is_ok()
            && drained < DRAIN_BURST
            && self.tracker.outstanding() < self.config.moves.max_inflight_txns
        {
            match stream.try_recv() {
                None => break,
                Some(Ok(ev)) => {
                    drained += 1;
                    r = self.on_source(ev).await;
                }
                Some(Err(e)) => return Err(e.for_slot(&self.config.replication.slot).into()),
            }
        }
        if drained == DRAIN_BURST {
            // More is queued. On one runtime thread the appliers run only when this task
            // yields, and it waits (so yields) only when the stream runs dry: after a
            // restart the targets sat idle while the first thousands of a backlog's
            // transactions were routed (~70 ms of a 0.73 s catch-up in the move bench).
            tokio::task::yield_now().await;
        }
        Ok(r)
    }

    /// Clean stop: the appliers finish what they were given, then the last durable
    /// position is checkpointed and confirmed.
    async fn finish(&mut self, stream: ReplicationStream, inbox: &mut Inbox) {
        let appliers = std::mem::take(&mut self.appliers);
        let mut tasks = Vec::new();
        for (_, a) in appliers {
            drop(a.tx);
            tasks.push(a.task);
        }
        let drain = async {
            for t in tasks.iter_mut() {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), drain)
            .await
            .is_err()
        {
            // Their open target transactions roll back with the connections; the work is
            // applied again after the restart (the targets' progress rows say what they hold).
            tracing::warn!("appliers did not finish within 30 s; stopping them");
            for t in &tasks {
                t.abort();
            }
        }
        while let Ok(ev) = inbox.apply.try_recv() {
            if let Err(e) = self.on_apply(ev) {
                tracing::warn!(error = %e, "while stopping");
            }
        }
        // The last checkpoints land before the last confirmation is sent.
        self.pass_applied(&stream);
        self.record_confirmable(&stream, Duration::ZERO);
        self.checkpoints.close().await;
        while let Ok(w) = inbox.written.try_recv() {
            if let Err(e) = self.on_written(w) {
                tracing::warn!(error = %e, "while stopping");
            }
        }
        self.pass_applied(&stream);
        let confirmed = stream.applied();
        stream.shutdown().await;
        tracing::info!(%confirmed, "switchyard stopped");
    }
}

impl Engine {
    fn same_cluster(&self, target: &TargetId) -> bool {
        self.config
            .targets
            .get(target)
            .is_some_and(|t| t.same_database(&self.config.source))
    }

    /// Tables of a moving tenant that appeared in the publication after its move started
    /// are neither copied nor fenced: each tenant concerned is paused with the table named
    /// and the fix, so no cutover flips without them. Checked at every registry poll.
    async fn notice_new_tables(&mut self, moves: &[Move]) -> Result<(), Error> {
        if self.tenants.is_empty() {
            return Ok(());
        }
        let excluded = self.excluded_schemas(moves);
        let known: BTreeSet<&QualifiedName> = self
            .tenants
            .values()
            .flat_map(|t| t.tables.keys())
            .collect();
        let moving: Vec<&TenantId> = self.tenants.keys().collect();
        let concerned = self
            .table_watch
            .appeared(
                &self.config,
                self.control.client(),
                &known,
                &moving,
                &excluded,
            )
            .await?;
        for (tenant, table) in concerned {
            if !self.tenants.contains_key(&tenant) {
                continue;
            }
            tracing::warn!(%tenant, %table, "a table of a moving tenant appeared; pausing the move");
            let e = Error::Move(MoveError::NewTable {
                table: table.quoted(),
            });
            self.fail(&tenant, &e, MoveState::Paused).await;
        }
        Ok(())
    }

    fn excluded_schemas(&self, moves: &[Move]) -> BTreeSet<String> {
        moves
            .iter()
            .filter(|m| !m.state.is_finished() && self.same_cluster(&m.target))
            .map(|m| m.target_schema.clone())
            .collect()
    }

    async fn restore_tenants(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        let moves = self.control.list_moves().await?;
        let excluded = self.excluded_schemas(&moves);
        // The filter was brought to these at start.
        self.filter_listed = Some(listed_tenants(&moves));
        let mut resuming = Vec::new();
        for mv in moves.into_iter().filter(|m| m.state.consumes_stream()) {
            let remembered = Remembered {
                record: self.store.tenant_state(&mv.tenant)?,
                applied: self.store.applied(&mv.tenant)?,
                gap: self.store.slot_gap(&mv.tenant)?,
            };
            resuming.push((mv, remembered));
        }
        let count = resuming.len();
        for (mv, result) in setup::resume_all(&self.config, resuming, &excluded).await {
            self.on_setup(mv, result).await?;
        }
        if count > 0 {
            tracing::info!(
                tenants = count,
                ms = started.elapsed().as_millis() as u64,
                "moves resumed"
            );
        }
        Ok(())
    }

    /// Reads the registry: starts requested moves, stops moves an operator paused or
    /// cancelled.
    async fn poll_registry(&mut self) -> Result<(), Error> {
        let moves = self.control.list_moves().await?;
        let excluded = self.excluded_schemas(&moves);
        // Tenants leave the row filter in the background once their moves stop consuming
        // the stream (setups add theirs before copying).
        let listed = listed_tenants(&moves);
        if self.config.replication.row_filter
            && self.filter_listed.as_ref().is_some_and(|l| *l != listed)
        {
            tokio::spawn(filter::sync_detached(self.config.clone()));
        }
        self.filter_listed = Some(listed);
        let moving = self.tenants.values().map(|t| (&t.id, t.move_id));
        for (tenant, follow) in admission::follow(moving, &moves) {
            match follow {
                Follow::Moving(state) => {
                    if let Some(t) = self.tenants.get_mut(&tenant) {
                        t.state = state;
                    }
                }
                Follow::Stop(state) => {
                    tracing::info!(%tenant, %state, "move stopped in the registry");
                    self.release(&tenant);
                }
            }
        }
        self.notice_new_tables(&moves).await?;
        self.start_cutovers(&moves).await;
        self.cutovers
            .run_reverse(self.control.registry(), self.control.client(), &moves)
            .await;
        self.cutovers.auto_cleanup(&moves);
        self.cutovers.release_ended(&moves);
        let tracker = &self.tracker;
        // Everything handed over before a stop is applied or dropped.
        let drained = |at: Lsn| tracker.confirmable().lsn() >= at || tracker.outstanding() == 0;
        let tenants = &self.tenants;
        let due = self
            .admission
            .due(&moves, |t| tenants.contains_key(t), drained, Instant::now());
        for mv in due {
            if let Some(mv) = self.claim(mv).await? {
                // A move picked up here starts over (new, or resumed after a failure).
                let _ = self.checkpoints.forget_tenant(&mv.tenant).await;
                self.admission.begin(&mv.tenant);
                setup::spawn(
                    self.config.clone(),
                    mv,
                    excluded.clone(),
                    self.setup_slots.clone(),
                    self.setup_events.clone(),
                );
            }
        }
        Ok(())
    }

    /// Takes a due move into `provisioning`, with its tenant id as the stream writes it;
    /// `None` if another writer changed the row first, the id is refused (the move is
    /// then failed), or the id written canonically names a tenant already moving.
    async fn claim(&mut self, mut mv: Move) -> Result<Option<Move>, Error> {
        if mv.state == MoveState::Requested {
            let r = self
                .control
                .registry()
                .transition(
                    self.control.client(),
                    mv.id,
                    MoveState::Requested,
                    MoveState::Provisioning,
                    None,
                )
                .await;
            match r {
                Ok(()) => {}
                Err(registry::RegistryError::Conflict { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        mv.state = MoveState::Provisioning;
        // The id in the form the stream will carry it, stored once (a row written by hand
        // may say `007` or an upper-case UUID).
        let canonical =
            crate::layout::canonical_tenant(&self.config, self.control.client(), &mv.tenant)
                .await
                .map_err(Error::from);
        match canonical {
            Ok(canonical) if canonical != mv.tenant => {
                tracing::info!(given = %mv.tenant, %canonical, move_id = mv.id, "tenant id written as its column's type writes it");
                let renamed = self
                    .control
                    .registry()
                    .rename_tenant(self.control.client(), mv.id, &canonical)
                    .await;
                if let Err(e) = renamed {
                    self.refuse(&mv, &format!("storing the tenant id as {canonical}: {e}"))
                        .await;
                    return Ok(None);
                }
                mv.tenant = canonical;
                if self.tenants.contains_key(&mv.tenant) || self.admission.setting_up(&mv.tenant) {
                    return Ok(None);
                }
                Ok(Some(mv))
            }
            Ok(_) => Ok(Some(mv)),
            Err(e) if e.classify() == ErrorClass::TenantFatal => {
                tracing::error!(tenant = %mv.tenant, error = %e, "move refused");
                self.refuse(&mv, &e.to_string()).await;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A claimed move that cannot start: `provisioning` → `failed`, with why.
    async fn refuse(&mut self, mv: &Move, why: &str) {
        self.control
            .set_state(
                mv.id,
                &mv.tenant,
                MoveState::Provisioning,
                MoveState::Failed,
                Some(why),
            )
            .await;
    }

    async fn on_setup(&mut self, mv: Move, result: Result<Tenant, Error>) -> Result<(), Error> {
        let transient = matches!(&result, Err(e) if e.classify() == ErrorClass::Transient);
        self.admission.ended(&mv.tenant, transient, Instant::now());
        let mut tenant = match result {
            Ok(t) => t,
            Err(e) if transient => {
                tracing::warn!(tenant = %mv.tenant, error = %e, "provisioning failed; retrying");
                let _ = self
                    .control
                    .registry()
                    .note_error(
                        self.control.client(),
                        mv.id,
                        &format!("{}provisioning: {e}", crate::registry::RETRYING),
                    )
                    .await;
                return Ok(());
            }
            Err(e) => {
                tracing::error!(tenant = %mv.tenant, error = %e, "move failed");
                if e.classify() == ErrorClass::Fatal {
                    return Err(e);
                }
                self.control
                    .set_state(
                        mv.id,
                        &mv.tenant,
                        mv.state,
                        MoveState::Failed,
                        Some(&e.to_string()),
                    )
                    .await;
                return Ok(());
            }
        };
        let target = tenant.destination.target.clone();
        // Lag is measured from here: nothing before this point was this target's to apply.
        self.handover.add_target(&target, self.last_end);
        if !self.appliers.contains_key(&target) {
            let endpoint = self.config.targets[&target].clone();
            let a = applier::spawn(
                ApplierConfig {
                    target: target.clone(),
                    endpoint,
                    progress_schema: self.config.registry_schema.clone(),
                    max_txns: self.config.moves.batch_max_txns,
                    max_bytes: self.config.moves.batch_max_bytes,
                    lanes: self.config.moves.apply_lanes,
                },
                self.quarantine.clone(),
                self.apply_events.clone(),
            );
            self.appliers.insert(target.clone(), a);
        }
        if tenant.state == MoveState::Provisioning {
            // What this move copies, and so what its cutover fences and its cancel and
            // cleanup may touch (a table that appears later is not part of it).
            let tables: Vec<String> = tenant.tables.keys().map(|t| t.quoted()).collect();
            if let Err(e) = self
                .control
                .registry()
                .record_tables(self.control.client(), tenant.move_id, &tables)
                .await
            {
                tracing::warn!(tenant = %tenant.id, error = %e, "recording the move's tables");
            }
            self.control
                .set_state(
                    tenant.move_id,
                    &tenant.id,
                    MoveState::Provisioning,
                    MoveState::Copying,
                    None,
                )
                .await;
            tenant.state = MoveState::Copying;
        }
        self.quarantine.remove(&tenant.id);
        self.router
            .start(tenant.id.clone(), tenant.destination.clone());
        let mut batch = Batch::new();
        batch.tenant_state(
            &tenant.id,
            &TenantRecord {
                move_id: tenant.move_id,
                state: tenant.state,
                target: target.to_string(),
                schema: tenant.destination.schema.clone(),
            },
        );
        if tenant.applied.is_valid() {
            batch.applied(&tenant.id, tenant.applied);
        }
        self.checkpoints.commit(batch).await?;
        crate::failpoint::hit("setup.after_state");
        tracing::info!(tenant = %tenant.id, state = %tenant.state, rows = ?tenant.rows_total, "tenant moving");
        self.tenants.insert(tenant.id.clone(), tenant);
        self.refresh_moved_tables();
        Ok(())
    }

    fn refresh_moved_tables(&mut self) {
        self.moved_tables = self
            .tenants
            .values()
            .flat_map(|t| t.tables.keys().cloned())
            .collect();
    }

    /// Stops moving `tenant` here: it leaves the router, its queued work is dropped and
    /// it no longer holds the slot back.
    fn release(&mut self, tenant: &TenantId) -> Option<Tenant> {
        self.router.stop(tenant);
        self.quarantine.insert(tenant.clone());
        self.assembler.forget(tenant);
        self.admission.released(tenant, self.last_end);
        // Queued behind the tenant's earlier checkpoints; a crash before it lands leaves
        // a record the registry's state (not consuming the stream) makes restore skip.
        let _ = self.checkpoints.forget_tenant_later(tenant);
        let t = self.tenants.remove(tenant);
        self.refresh_moved_tables();
        t
    }

    /// Stops `tenant` now (see [`Engine::release`]); the registry learns why from
    /// [`Engine::record_stops`], so callers that cannot wait on the registry can stop a
    /// tenant too.
    fn stop(&mut self, tenant: &TenantId, error: &Error, to: MoveState) {
        let Some(t) = self.release(tenant) else {
            return;
        };
        tracing::error!(%tenant, error = %error, state = %to, "tenant stopped");
        self.stopped
            .push((t.move_id, tenant.clone(), t.state, to, error.to_string()));
    }

    /// Writes the stops of [`Engine::stop`] into the registry.
    async fn record_stops(&mut self) {
        for (id, tenant, from, to, error) in std::mem::take(&mut self.stopped) {
            self.control
                .set_state(id, &tenant, from, to, Some(&error))
                .await;
        }
    }

    async fn fail(&mut self, tenant: &TenantId, error: &Error, to: MoveState) {
        self.stop(tenant, error, to);
        self.record_stops().await;
    }

    async fn on_source(&mut self, ev: SourceEvent) -> Result<(), Error> {
        match ev {
            SourceEvent::Restarted {
                resume_from,
                attempt,
            } => {
                tracing::warn!(%resume_from, attempt, "replication reconnected");
                // The open transaction is sent again from its start.
                self.assembler.reset();
                Ok(())
            }
            SourceEvent::Message(r) => self.on_message(r.message).await,
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Error> {
        match &message {
            Message::Begin(b) => {
                self.assembler.begin(b.final_lsn, b.xid);
                Ok(())
            }
            Message::Commit(c) => self.commit(c.end(), c.commit_time),
            Message::Relation(rel) => {
                self.on_relation(rel.clone()).await;
                Ok(())
            }
            Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_) => {
                self.on_rows(message).await
            }
            Message::Message(m) if m.prefix == WATERMARK_PREFIX => {
                if let Some(w) = Watermark::parse(&m.prefix, &m.content) {
                    if let Err(e) = self.assembler.watermark(w) {
                        tracing::warn!(error = %e, "watermark ignored");
                    }
                }
                Ok(())
            }
            Message::Message(m) if m.prefix == crate::cutover::MARKER_PREFIX => {
                match std::str::from_utf8(&m.content)
                    .ok()
                    .and_then(|t| t.parse().ok())
                {
                    Some(token) => self.on_cutover_marker(token),
                    None => tracing::warn!("a cutover marker that is not ours is ignored"),
                }
                Ok(())
            }
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => Err(MoveError::Protocol(
                "streamed transaction although streaming was not requested".into(),
            )
            .into()),
            _ => Ok(()),
        }
    }

    async fn on_relation(&mut self, rel: Relation) {
        let id = rel.id;
        let change = self.relations.apply(rel);
        // The cache builds the relation's name; the engine reads it from there.
        let Ok((rel, name)) = self.relations.resolve_named(id) else {
            return;
        };
        if !self.moved_tables.contains(name) {
            return;
        }
        let validated = self.router.validate(rel);
        let name = name.clone();
        let affected: Vec<TenantId> = self
            .tenants
            .values()
            .filter(|t| t.tables.contains_key(&name))
            .map(|t| t.id.clone())
            .collect();
        if let Err(e) = validated {
            let e = Error::Route(e);
            for t in &affected {
                self.fail(t, &e, MoveState::Failed).await;
            }
            return;
        }
        if let RelationChange::Changed(diff) = change {
            let error = Error::Move(MoveError::Ddl {
                table: name.to_string(),
                detail: [
                    (
                        diff.columns_changed,
                        "columns added, dropped, renamed or retyped",
                    ),
                    (diff.renamed, "renamed"),
                    (diff.replica_identity_changed, "replica identity changed"),
                ]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, what)| *what)
                .collect::<Vec<_>>()
                .join(", "),
            });
            for t in &affected {
                self.fail(t, &error, MoveState::Paused).await;
            }
        }
    }

    async fn on_rows(&mut self, message: Message) -> Result<(), Error> {
        let final_lsn = self.assembler.open()?.final_lsn();
        let one: [RelationId; 1];
        let relation_ids: &[RelationId] = match &message {
            Message::Insert(i) => {
                one = [i.relation];
                &one
            }
            Message::Update(u) => {
                one = [u.relation];
                &one
            }
            Message::Delete(d) => {
                one = [d.relation];
                &one
            }
            Message::Truncate(t) => &t.relations,
            _ => return Ok(()),
        };
        // Phase 1, on the borrowed message: route, and decide per tenant against its
        // backfill state. What to apply is noted by which row image it uses.
        let mut routed = Vec::new();
        for &id in relation_ids {
            let (rel, name) = self.relations.resolve_named(id)?;
            if !self.moved_tables.contains(name) {
                continue;
            }
            let ops = match &message {
                Message::Truncate(_) => self.router.truncate(rel),
                _ => self
                    .router
                    .message(&self.relations, &message)
                    .map(|mut v| v.pop().map(|(_, ops)| ops).unwrap_or_default()),
            };
            match ops {
                Ok(ops) => routed.push((rel, name, ops)),
                Err(RouteError::BadTenantValue { table, column }) => {
                    tracing::warn!(%table, %column, "a row without a tenant value belongs to no tenant; skipped");
                }
                Err(e) => {
                    let affected: Vec<TenantId> = self
                        .tenants
                        .values()
                        .filter(|t| t.tables.contains_key(name))
                        .map(|t| t.id.clone())
                        .collect();
                    let e = Error::Route(e);
                    for t in affected {
                        self.fail(&t, &e, MoveState::Failed).await;
                    }
                    return Ok(());
                }
            }
        }
        let mut failures: Vec<(TenantId, Error)> = Vec::new();
        let mut planned: Vec<(TenantId, Arc<RowShape>, Planned)> = Vec::new();
        let mut images = Images::default();
        for (rel, name, ops) in routed {
            for op in ops {
                if failures.iter().any(|(f, _)| f == &op.tenant) {
                    continue;
                }
                let Some(t) = self.tenants.get_mut(&op.tenant) else {
                    continue;
                };
                if final_lsn < t.skip_before {
                    continue;
                }
                let Some(table) = t.tables.get_mut(name) else {
                    continue;
                };
                self.assembler.open()?.touch(&op.tenant);
                let row = table.settle(rel, op.op);
                match table.decide(row).map_err(|e| Error::Move(e.into())) {
                    Ok(Some(d)) => {
                        let plan = images.plan(&message, &d);
                        planned.push((op.tenant, table.shape(rel), plan));
                    }
                    Ok(None) => {}
                    Err(e) => failures.push((op.tenant, e)),
                }
            }
        }
        // Phase 2: the row images move into the changes (copied only if one is wanted
        // twice), and the changes join the open transaction.
        images.fill(message);
        for (tenant, shape, plan) in planned {
            let Some(t) = self
                .tenants
                .get(&tenant)
                .filter(|_| !failures.iter().any(|(f, _)| f == &tenant))
            else {
                images.forgo(plan);
                continue;
            };
            let Some(op) = images.take(plan) else {
                let detail = "a routed change names a row image its message does not have";
                failures.push((tenant, MoveError::Protocol(detail.into()).into()));
                continue;
            };
            let work = Work::Row(RowChange { shape, op });
            let txn = self.assembler.open()?;
            if let Err(over) = txn.push_change(&t.destination.target, &tenant, work) {
                // Failing the tenant whose change crossed the bound stops routing the rest
                // of its changes.
                failures.push((
                    tenant,
                    Error::Move(MoveError::TransactionTooLarge {
                        xid: over.xid,
                        limit: over.limit,
                    }),
                ));
            }
        }
        for (tenant, e) in failures {
            self.fail(&tenant, &e, MoveState::Failed).await;
        }
        Ok(())
    }

    fn drain_chunks(&mut self) {
        while let Ok(ev) = self.chunk_rx.try_recv() {
            self.on_chunk(ev);
        }
    }

    fn on_chunk(&mut self, ev: ChunkEvent) {
        match ev {
            ChunkEvent::Rows {
                tenant,
                table,
                chunk,
                rows,
                keys,
                in_progress,
            } => {
                if let Some(tm) = self
                    .tenants
                    .get_mut(&tenant)
                    .and_then(|t| t.tables.get_mut(&table))
                {
                    tm.on_rows(ChunkRows {
                        chunk,
                        rows,
                        keys,
                        in_progress,
                    });
                }
            }
            ChunkEvent::Failed {
                tenant,
                table,
                chunk,
                error,
            } => {
                let concerned = self
                    .tenants
                    .get_mut(&tenant)
                    .and_then(|t| t.tables.get_mut(&table))
                    .is_some_and(|tm| tm.on_read_failed(chunk));
                if !concerned {
                    return;
                }
                let error = Error::from(error);
                if error.classify() == ErrorClass::Transient {
                    tracing::warn!(%tenant, %table, chunk, %error, "chunk read failed; reading it again");
                } else {
                    tracing::error!(%tenant, %table, chunk, %error, "chunk read failed");
                    self.stop(&tenant, &error, MoveState::Failed);
                }
            }
        }
    }

    fn commit(&mut self, commit: CommitLsn, commit_time: i64) -> Result<(), Error> {
        let end = commit.lsn();
        let mut txn = self.assembler.commit()?;
        let marks = txn.take_marks();
        if marks.iter().any(|w| w.mark == Mark::High) {
            // The rows of a chunk are queued before its high watermark is written.
            self.drain_chunks();
        }
        let mut failures = Vec::new();
        self.recent.insert(txn.xid(), end);
        for w in marks {
            if let Err(failed) = self.on_watermark(w, end, &mut txn) {
                failures.push(*failed);
            }
        }
        for (tenant, e) in failures {
            self.stop(&tenant, &e, MoveState::Failed);
        }
        let mut states: BTreeMap<TargetId, Vec<(TenantId, String)>> = BTreeMap::new();
        for id in txn.touched() {
            let Some(t) = self.tenants.get_mut(id) else {
                continue;
            };
            if matches!(t.state, MoveState::Streaming | MoveState::CuttingOver) {
                continue;
            }
            let (state, completed) = t.after_commit(end);
            if let Some(state) = state {
                states
                    .entry(t.destination.target.clone())
                    .or_default()
                    .push((id.clone(), state));
            }
            if completed {
                tracing::info!(tenant = %id, at = %end, "copy complete; waiting for the target to hold it");
            }
        }
        let handed = txn.into_targets(commit, states);
        let now = Instant::now();
        let targets: BTreeSet<TargetId> = handed.iter().map(|(t, _)| t.clone()).collect();
        for (target, source_txn) in handed {
            let Some(a) = self.appliers.get(&target) else {
                continue;
            };
            let tenants = source_txn.parts.iter().map(|p| &p.0);
            for id in tenants.chain(source_txn.states.iter().map(|s| &s.0)) {
                if let Some(t) = self.tenants.get_mut(id) {
                    t.last_handed = end;
                }
            }
            if a.tx.send(source_txn).is_err() {
                return Err(MoveError::Target {
                    target: target.to_string(),
                    detail: "its apply task stopped".into(),
                }
                .into());
            }
            self.handover.handed(target, end, commit_time, now);
        }
        self.handover.committed(end);
        self.tracker.on_commit(commit, targets);
        self.last_end = end;
        Ok(())
    }

    fn on_watermark(
        &mut self,
        w: Watermark,
        end: Lsn,
        txn: &mut Transaction,
    ) -> Result<(), Box<(TenantId, Error)>> {
        if w.run != self.run_id {
            return Ok(());
        }
        let Ok(tenant) = TenantId::new(w.tenant.clone()) else {
            return Ok(());
        };
        let Ok(table) = QualifiedName::parse(&w.table) else {
            // Our own run wrote it; a name that does not parse back would stall the chunk.
            tracing::warn!(table = %w.table, "a watermark of this run names no table");
            return Ok(());
        };
        let Some(t) = self.tenants.get_mut(&tenant) else {
            return Ok(());
        };
        let target = t.destination.target.clone();
        let chunk_rows = self.config.moves.chunk_rows;
        let Some(tm) = t.tables.get_mut(&table) else {
            return Ok(());
        };
        if tm.copy.in_flight() != Some(w.chunk) {
            return Ok(());
        }
        match w.mark {
            Mark::Low => tm.on_low(w.chunk, end),
            Mark::High => {
                let recent = &self.recent;
                let high = tm
                    .on_high(w.chunk, chunk_rows, |xid| recent.get(xid))
                    .map_err(|e| Box::new((tenant.clone(), Error::Move(e.into()))))?;
                match high {
                    High::Raced => {
                        tracing::info!(%tenant, %table, chunk = w.chunk, "chunk raced a committing transaction; reading it again");
                    }
                    High::Done { copied, rows } => {
                        t.rows_copied += copied as i64;
                        if let Some(rows) = rows {
                            txn.push_copy(&target, &tenant, Work::Copy(rows));
                        }
                        txn.touch(&tenant);
                    }
                }
            }
        }
        Ok(())
    }

    /// A report of the checkpoint writer.
    fn on_written(&mut self, written: Written) -> Result<(), Error> {
        match written {
            Written::Durable(lsn) => {
                self.gate.written(lsn);
                Ok(())
            }
            Written::Failed(e) => Err(e.into()),
        }
    }

    /// Hands the stream what may be confirmed now and records what waits for that (see
    /// [`Engine::pass_applied`], [`Engine::record_confirmable`]).
    fn confirm(&mut self, stream: &ReplicationStream) {
        self.pass_applied(stream);
        self.record_confirmable(stream, CONFIRM_RECORD_EVERY);
    }

    /// Marks what the tracker holds durable downstream, and lets the stream confirm as far
    /// as RocksDB records: an applied commit's checkpoint is on disk before the slot passes
    /// it, and a slot found past the record at a start was moved by someone else.
    fn pass_applied(&self, stream: &ReplicationStream) {
        let applied = self.tracker.confirmable();
        if applied.lsn() > stream.applied() {
            stream.mark_applied(applied);
        }
        stream.raise_ceiling(self.gate.ceiling());
    }

    /// Records what the stream would confirm beyond the ceiling (transactions that touched
    /// no target, idle keepalives), at most once per `every`.
    fn record_confirmable(&mut self, stream: &ReplicationStream, every: Duration) {
        let wanted = stream.wanted().max(self.tracker.confirmable().lsn());
        if let Some(lsn) = self.gate.to_record(wanted, Instant::now(), every) {
            let mut batch = Batch::new();
            batch.confirmed(lsn);
            if let Err(e) = self.checkpoints.commit_later(batch, Some(lsn)) {
                tracing::warn!(error = %e, "cannot record the slot's position");
            }
        }
    }

    fn on_apply(&mut self, ev: ApplyEvent) -> Result<(), Error> {
        match ev {
            ApplyEvent::Applied {
                target,
                up_to,
                tenants,
            } => {
                self.tracker.on_applied(&target, up_to);
                let up_to = up_to.lsn();
                let settled = self.handover.applied(&target, up_to, Instant::now());
                metrics::counter!(crate::telemetry::APPLIED_TRANSACTIONS, "target" => target.to_string())
                    .increment(settled as u64);
                self.set_retrying(&target, None);
                let mut batch = Batch::new();
                for (tenant, lsn) in tenants {
                    if let Some(t) = self.tenants.get_mut(&tenant) {
                        t.applied = t.applied.max(lsn);
                        batch.applied(&tenant, lsn);
                    }
                }
                let durable = self.tracker.confirmable().lsn();
                if durable.is_valid() {
                    batch.confirmed(durable);
                    self.gate.queued(durable, Instant::now());
                }
                // The slot follows when the writer reports the batch on disk (`on_written`);
                // routing goes on meanwhile.
                self.checkpoints
                    .commit_later(batch, durable.is_valid().then_some(durable))?;
                Ok(())
            }
            ApplyEvent::TenantFailed { tenant, error } => {
                self.stop(&tenant, &Error::Apply(error), MoveState::Failed);
                Ok(())
            }
            ApplyEvent::Retrying { target, error } => {
                tracing::warn!(%target, %error, "target unavailable; retrying");
                // Operators read the registry, not logs: the reason stays on each of the
                // target's moves until the target commits again.
                self.set_retrying(&target, Some(format!("target {target}: {error}")));
                Ok(())
            }
        }
    }

    /// What each of `target`'s moves is being retried for (`None`: nothing any more).
    fn set_retrying(&mut self, target: &TargetId, reason: Option<String>) {
        for t in self.tenants.values_mut() {
            if &t.destination.target == target {
                t.retrying = reason.clone();
            }
        }
    }

    /// Starts the cutover attempts the registry asks for; resets attempts a crash
    /// interrupted (their fence transaction died with its connection).
    async fn start_cutovers(&mut self, moves: &[Move]) {
        let by_id: HashMap<i64, &Move> = moves.iter().map(|m| (m.id, m)).collect();
        let ids: Vec<TenantId> = self.tenants.keys().cloned().collect();
        for id in ids {
            let Some(t) = self.tenants.get(&id) else {
                continue;
            };
            let Some(mv) = by_id.get(&t.move_id).copied() else {
                continue;
            };
            if mv.state == MoveState::CuttingOver && !self.cutovers.is_running(&id) {
                tracing::warn!(tenant = %id, "a cutover attempt was interrupted; back to streaming");
                self.control
                    .set_state(
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
            let candidate = Candidate {
                tenant: &id,
                state: t.state,
                lag_bytes: self.lag_bytes(&id),
                copied: t.is_copied(),
                apply_delay: self
                    .handover
                    .apply_delay(&t.destination.target, Instant::now()),
            };
            let tables = || {
                t.tables
                    .values()
                    .map(|tm| FencedTable {
                        chunk: tm.chunk.clone(),
                        target: tm.target.clone(),
                    })
                    .collect()
            };
            if self.cutovers.try_start(mv, candidate, tables) {
                if let Some(t) = self.tenants.get_mut(&id) {
                    t.state = MoveState::CuttingOver;
                }
            }
        }
    }

    /// A message of a cutover, rollback or its catch-up wait.
    fn on_cutover(&mut self, msg: CutoverMsg) {
        match self.cutovers.on_message(msg) {
            Some(Settled::CutOver(tenant)) => {
                if let Some(t) = self.release(&tenant) {
                    // Not a failure: nothing of the tenant may arrive any more.
                    self.quarantine.remove(&t.id);
                }
            }
            Some(Settled::Streaming(tenant)) => {
                if let Some(t) = self.tenants.get_mut(&tenant) {
                    t.state = MoveState::Streaming;
                }
            }
            Some(Settled::Different(tenant)) => {
                self.release(&tenant);
            }
            None => {}
        }
    }

    /// The cutover marker `token` was read: the waiting tenant's transactions handed over
    /// before it are what must be applied. Its writes wait on the fence, so every one of
    /// them committed before the marker and was read before it; the transactions of other
    /// tenants queued behind the last of them are not waited for.
    fn on_cutover_marker(&mut self, token: u64) {
        let tenants = &self.tenants;
        let waiting = self.cutovers.on_marker(token, |tenant| {
            tenants.get(tenant).map_or(Lsn::INVALID, |t| t.last_handed)
        });
        // The paused tenant's last transaction ends its target's next batch, so the answer
        // does not wait for all that was queued behind it.
        for (tenant, through) in waiting {
            let applier = tenants
                .get(&tenant)
                .and_then(|t| self.appliers.get(&t.destination.target));
            if let (Some(a), true) = (applier, through != Lsn::INVALID) {
                a.hurry_through(through);
            }
        }
        self.answer_cutover_waits();
    }

    /// Answers the catch-up waits whose tenant's target holds everything of the tenant
    /// before their marker.
    fn answer_cutover_waits(&mut self) {
        let (tenants, handover) = (&self.tenants, &self.handover);
        self.cutovers.answer_waits(|tenant, through| {
            // Rows waiting to be read again are not at the target yet: no answer (the
            // attempt aborts at its budget) until they are.
            tenants.get(tenant).is_some_and(|t| {
                t.is_copied()
                    && (t.applied >= through
                        || handover
                            .oldest(&t.destination.target)
                            .is_none_or(|(end, _)| end > through))
            })
        });
    }

    /// How many bytes of WAL the tenant's target trails the stream by.
    fn lag_bytes(&self, tenant: &TenantId) -> u64 {
        self.tenants
            .get(tenant)
            .map_or(0, |t| self.lag_behind(self.caught_up(t)))
    }

    /// How far `t` is known to hold the stream: its target's catch-up or its own applied
    /// position, whichever is further.
    fn caught_up(&self, t: &Tenant) -> Lsn {
        self.handover
            .caught_up(&t.destination.target)
            .max(t.applied)
    }

    /// Bytes of WAL from `caught` to the end of the last transaction read (none before one).
    fn lag_behind(&self, caught: Lsn) -> u64 {
        moving::lag_behind(self.last_end, caught)
    }

    /// Starts chunk reads while the number of open windows is under the worker cap,
    /// rotating over tenants so a big one does not starve the rest.
    fn schedule_chunks(&mut self) {
        if self.tracker.outstanding() >= self.config.moves.max_inflight_txns {
            return;
        }
        let tenants = self
            .tenants
            .iter_mut()
            .map(|(id, t)| Reading {
                tenant: id,
                may_read: matches!(
                    t.state,
                    MoveState::Copying | MoveState::Streaming | MoveState::CuttingOver
                ),
                tables: &mut t.tables,
            })
            .collect();
        self.chunks.schedule(tenants);
    }

    /// Tenants whose copy the target now holds entirely become in sync (`streaming`).
    async fn mark_synced(&mut self) {
        let synced: Vec<TenantId> = self
            .tenants
            .values()
            .filter(|t| t.state == MoveState::Copying && t.is_synced())
            .map(|t| t.id.clone())
            .collect();
        for tenant in synced {
            let Some(t) = self.tenants.get_mut(&tenant) else {
                continue;
            };
            t.state = MoveState::Streaming;
            let (id, record) = (
                t.move_id,
                TenantRecord {
                    move_id: t.move_id,
                    state: MoveState::Streaming,
                    target: t.destination.target.to_string(),
                    schema: t.destination.schema.clone(),
                },
            );
            let mut batch = Batch::new();
            batch.tenant_state(&tenant, &record);
            if let Err(e) = self.checkpoints.commit(batch).await {
                tracing::error!(%tenant, error = %e, "recording the state");
            }
            crate::failpoint::hit("daemon.after_synced");
            tracing::info!(%tenant, "in sync: backfill done, streaming");
            // The final progress goes with the state, not up to a second later.
            let (rows_copied, rows_total, retrying) =
                (t.rows_copied, t.rows_total, t.retrying.clone());
            let progress = Report {
                rows_copied,
                rows_total,
                lag_bytes: Some(self.lag_bytes(&tenant) as i64),
                lag_seconds: None,
                retrying,
            };
            self.control
                .set_state(id, &tenant, MoveState::Copying, MoveState::Streaming, None)
                .await;
            if let Err(e) = self.control.report(id, &progress).await {
                tracing::warn!(%tenant, error = %e, "reporting progress");
            }
        }
    }

    /// Progress and lag into the registry; the WAL budget.
    async fn report(&mut self) -> Result<(), Error> {
        self.mark_synced().await;
        tracing::debug!(
            last_end = %self.last_end,
            confirmable = %self.tracker.confirmable(),
            outstanding = self.tracker.outstanding(),
            owed = ?self.handover.summary(),
            "pipeline"
        );
        let now = pg_now();
        let budget = self.config.moves.wal_budget_bytes;
        // The source's own position: the daemon's read position stops where reading pauses
        // (max_inflight_txns), so a target that is down would never look further behind.
        // Read by the report writer, at most a round old.
        let source_at = self.reports.source_at();
        let mut over = Vec::new();
        let mut reports = Vec::new();
        for t in self.tenants.values() {
            let oldest = self
                .handover
                .oldest(&t.destination.target)
                .map(|(_, at)| at);
            let Standing {
                lag_bytes,
                held,
                lag_seconds,
            } = Standing::of(self.caught_up(t), self.last_end, source_at, oldest, now);
            if held > budget {
                over.push((t.id.clone(), held));
            }
            if self.config.metrics.tenant_label {
                use crate::telemetry as m;
                let tenant = t.id.to_string();
                metrics::gauge!(m::TENANT_LAG_BYTES, "tenant" => tenant.clone())
                    .set(lag_bytes as f64);
                metrics::gauge!(m::TENANT_LAG_SECONDS, "tenant" => tenant.clone()).set(lag_seconds);
                metrics::gauge!(m::TENANT_ROWS_COPIED, "tenant" => tenant.clone())
                    .set(t.rows_copied as f64);
                if let Some(total) = t.rows_total {
                    metrics::gauge!(m::TENANT_ROWS_TO_COPY, "tenant" => tenant.clone())
                        .set(total as f64);
                }
                for state in MoveState::ALL {
                    let on = if state == t.state { 1.0 } else { 0.0 };
                    metrics::gauge!(m::TENANT_STATE, "tenant" => tenant.clone(), "state" => state.as_str())
                        .set(on);
                }
            }
            // A move failed on the budget gets no report: its error is the failure's.
            if held > budget {
                continue;
            }
            reports.push((
                t.move_id,
                Report {
                    rows_copied: t.rows_copied,
                    rows_total: t.rows_total,
                    lag_bytes: Some(lag_bytes as i64),
                    lag_seconds: Some(lag_seconds),
                    retrying: t.retrying.clone(),
                },
            ));
        }
        for (tenant, held) in over {
            let e = Error::Move(MoveError::WalBudget { held, budget });
            self.fail(&tenant, &e, MoveState::Failed).await;
        }
        self.reports.send(reports);
        metrics::gauge!(crate::telemetry::SLOT_CONFIRMED_LSN)
            .set(self.tracker.confirmable().lsn().0 as f64);
        Ok(())
    }
}
