//! The cutover: an in-sync tenant becomes a finished move with a bounded write pause.
//!
//! ```text
//!  prepare (no pause):  streaming → cutting_over, verify (once per move), arm the fence,
//!                       wait out transactions older than the fence
//!  attempt (pause):     BEGIN on the source
//!                       advisory lock EXCLUSIVE on the tenant   lock_timeout = budget / 2
//!                       marker = pg_logical_emit_message(true, 'switchyard.cutover', token),
//!                                committed by a second session (the lock stays held)
//!                       wait: the pipeline saw the marker and the target holds everything
//!                             of the tenant before it          until 9/10 of the budget
//!                       sequences: target set past the source values
//!                       fences → moved, routes flipped (version + 1), move → cut_over
//!                       COMMIT (only inside the budget)         pause = commit − lock request
//!  abort:               ROLLBACK (the writers go on at the old location), cutting_over →
//!                       streaming with the reason, retry after a backoff
//! ```
//!
//! Invariants:
//! - The route flip, the fence turning to `moved` and the move becoming `cut_over` are one
//!   source transaction: applications never see a route to the target while the old location
//!   still takes the tenant's writes, nor the reverse.
//! - Nothing is flipped before the target durably holds every change the tenant committed
//!   at the source (the marker follows them in the WAL, and the pipeline answers only when
//!   its target acknowledged every transaction before it).
//! - Every attempt, aborted or not, is recorded with its step, reason and measured pause.
//! - An attempt that cannot finish within the pause budget leaves everything as it was.

pub mod cleanup;
pub mod fence;
pub mod policy;
pub mod request;
pub mod reverse;

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::cluster::ClusterError;
use crate::config::Config;
use crate::registry::{Move, MoveState, Registry};
use crate::sql::{quote_ident, QualifiedName};
use crate::tenant::TenantId;
use crate::verify::{self, Unsettled, VerifyOptions};

pub use policy::Step;

/// What cutover functions fail with.
type Error = CutoverError;

/// The prefix of the cutover marker (a transactional logical message, committed while the
/// fence is held).
pub const MARKER_PREFIX: &str = "switchyard.cutover";

/// Errors that stop an attempt, a rollback or an operator's request without a verdict:
/// the cutover's own, and those of the layers it calls, kept whole so that they are
/// classified as they would be anywhere else.
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Route(#[from] crate::route::RouteError),
    #[error(transparent)]
    Apply(#[from] crate::apply::ApplyError),
    #[error(transparent)]
    Provision(#[from] crate::provision::ProvisionError),
    #[error("the move changed while cutting over: {0}")]
    Conflict(String),
    #[error("the tenant was moved away already (its fence says moved)")]
    AlreadyMoved,
    #[error("the source role cannot see other sessions' transactions, so it cannot tell whether one could write past the fence. Fix: GRANT pg_read_all_stats TO <the switchyard role>")]
    CannotSeeSessions,
    #[error("target schema {schema:?} cannot name the reverse stream's tenant: {reason}")]
    BadTargetSchema { schema: String, reason: String },
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Outcome {
    CutOver {
        pause: Duration,
        lock_wait: Duration,
        catch_up: Duration,
        route_version: i64,
    },
    Aborted {
        step: Step,
        reason: String,
        /// How long the tenant's writers waited in this attempt (none if no fence was taken).
        pause: Option<Duration>,
    },
    /// Verification found rows that differ and stay different: the move failed.
    Different { summary: String },
}

/// What the pipeline and an attempt tell each other.
#[derive(Debug)]
pub(crate) enum CutoverMsg {
    /// Answer on `reply` once the marker `token` was read and `tenant`'s target holds every
    /// transaction before it.
    Wait {
        token: u64,
        tenant: TenantId,
        reply: oneshot::Sender<()>,
    },
    Finished {
        tenant: TenantId,
        move_id: i64,
        outcome: Result<Outcome, Error>,
    },
    /// A rollback attempt ended (`Outcome::CutOver` means: rolled back).
    RolledBack {
        tenant: TenantId,
        move_id: i64,
        outcome: Result<Outcome, Error>,
    },
}

/// One of the tenant's tables and where its rows went: the same pair verification
/// compares, so one type serves both.
pub use crate::verify::VerifyTable as FencedTable;

/// Everything an attempt needs.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub config: Config,
    pub mv: Move,
    pub tables: Vec<FencedTable>,
    pub attempt: i32,
    pub token: u64,
}

/// Runs one attempt as a task and reports it to the pipeline.
pub(crate) async fn run(job: Job, pipeline: mpsc::UnboundedSender<CutoverMsg>) {
    let tenant = job.mv.tenant.clone();
    let move_id = job.mv.id;
    let outcome = attempt(&job, &pipeline).await;
    let _ = pipeline.send(CutoverMsg::Finished {
        tenant,
        move_id,
        outcome,
    });
}

async fn attempt(
    job: &Job,
    pipeline: &mpsc::UnboundedSender<CutoverMsg>,
) -> Result<Outcome, Error> {
    let cfg = &job.config;
    let registry = Registry::new(cfg.registry_schema.clone())?;
    let mut source = cfg.source.connect_sql().await?;
    let endpoint = crate::layout::target_endpoint(cfg, &job.mv.target)?;
    let mut target = endpoint.connect_sql().await?;
    registry
        .transition(
            &source,
            job.mv.id,
            MoveState::Streaming,
            MoveState::CuttingOver,
            None,
        )
        .await?;
    crate::failpoint::hit("cutover.after_cutting_over");
    let outcome = match prepare(job, &mut source, &mut target, &registry).await {
        Ok(Prepared::Ready { unsettled }) => {
            fenced(job, &mut source, &target, &registry, pipeline, unsettled).await
        }
        Ok(Prepared::Ended(o)) => Ok(o),
        Err(e) => Err(e),
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            // The attempt could not finish: the move goes back to streaming and retries.
            let _ = registry
                .transition(
                    &source,
                    job.mv.id,
                    MoveState::CuttingOver,
                    MoveState::Streaming,
                    Some(&format!("cutover attempt {}: {e}", job.attempt)),
                )
                .await;
            return Err(e);
        }
    };
    record(job, &source, &registry, &outcome).await;
    Ok(outcome)
}

/// Rows that kept changing under verification, at most, that an attempt compares again
/// inside its pause; with more, the verification's difference is the verdict.
const UNSETTLED_ROWS: usize = 1_000;

/// What the steps before the fence leave to the fenced part.
enum Prepared {
    /// Fenced part next; with rows to compare there once the target caught up.
    Ready { unsettled: Option<Unsettled> },
    /// The attempt ended before the fence.
    Ended(Outcome),
}

/// The steps before the fence.
async fn prepare(
    job: &Job,
    source: &mut Client,
    target: &mut Client,
    registry: &Registry,
) -> Result<Prepared, Error> {
    match arm(job, source, target, registry).await? {
        Arming::Ended(o) => Ok(Prepared::Ended(o)),
        Arming::Done(unsettled) => wait_old_transactions(job, source).await.map(|o| match o {
            Some(o) => Prepared::Ended(o),
            None => Prepared::Ready { unsettled },
        }),
    }
}

/// Verification and the fences' arming, before any pause.
enum Arming {
    Done(Option<Unsettled>),
    Ended(Outcome),
}

async fn arm(
    job: &Job,
    source: &mut Client,
    target: &mut Client,
    registry: &Registry,
) -> Result<Arming, Error> {
    let cfg = &job.config;
    let tenant = &job.mv.tenant;
    // Nothing is fenced yet, but a lock someone holds (a migration on a target table, say)
    // must not stall the attempt for ever: it aborts at its step and is retried.
    let wait = format!(
        "SET lock_timeout = '{}ms'",
        cfg.cutover.old_transaction_wait.as_millis().max(1)
    );
    for (client, at) in [(&*source, "source"), (&*target, "target")] {
        client
            .batch_execute(&wait)
            .await
            .map_err(ClusterError::sql(format!(
                "bounding lock waits at the {at}"
            )))?;
    }
    let locked = |step: Step, e: &ClusterError| Outcome::Aborted {
        step,
        reason: format!("waited on a lock held by another session: {e}"),
        pause: None,
    };
    let mut unsettled = None;
    if cfg.cutover.verify && !job.mv.verified {
        let opts = VerifyOptions {
            slot: Some(cfg.replication.slot.clone()),
            ..VerifyOptions::default()
        };
        let report = match verify::verify(source, target, tenant.as_str(), &job.tables, &opts).await
        {
            Ok(r) => r,
            Err(verify::VerifyError::Cluster(e)) if over_budget(&e) => {
                return Ok(Arming::Ended(locked(Step::Verify, &e)));
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(%tenant, ok = report.ok, millis = report.millis, summary = %report.summary(), "verified");
        // Rows written all the time (a balance, a counter) differ at every re-check while
        // the target trails by milliseconds: they are compared again inside the pause,
        // where the tenant's writes wait and the target holds all of them.
        unsettled = report.unsettled(UNSETTLED_ROWS);
        if let Some(rows) = &unsettled {
            let n: usize = rows.iter().map(|(_, keys)| keys.len()).sum();
            tracing::info!(%tenant, rows = n, "rows kept changing under verification; compared again inside the pause");
        } else {
            registry
                .record_verification(&*source, job.mv.id, report.ok, &report.summary())
                .await?;
            if !report.ok {
                return Ok(Arming::Ended(Outcome::Different {
                    summary: report.summary(),
                }));
            }
        }
    }
    // Every table of the tenant must be moved and fenced before a flip: one that appeared
    // after the move started is neither (the daemon pauses the move for it).
    let moves = registry.list(source).await?;
    let now = crate::layout::current_tenant_tables(cfg, source, &job.mv, &moves).await?;
    if let Some(new) = now
        .iter()
        .find(|n| !job.tables.iter().any(|t| &t.chunk.source == *n))
    {
        return Ok(Arming::Ended(Outcome::Aborted {
            step: Step::Arm,
            reason: format!(
                "table {} appeared after the move started: it is not copied, so nothing is flipped",
                new.quoted()
            ),
            pause: None,
        }));
    }
    for t in &job.tables {
        let (wait, give_up) = (Duration::from_millis(500), Duration::from_secs(30));
        let installed = match &t.chunk.tenant {
            Some((col, _)) => {
                fence::install_gated(
                    source,
                    &cfg.registry_schema,
                    &t.chunk.source,
                    col,
                    tenant,
                    wait,
                    give_up,
                )
                .await
            }
            None => {
                fence::install(
                    source,
                    &cfg.registry_schema,
                    &t.chunk.source,
                    &fence::TenantOf::Whole(tenant.clone()),
                    wait,
                    give_up,
                )
                .await
            }
        };
        if let Err(e) = installed {
            return if over_budget(&e) {
                Ok(Arming::Ended(locked(Step::Arm, &e)))
            } else {
                Err(e.into())
            };
        }
    }
    if cfg.cutover.rollback {
        if let Err(e) = reverse::prepare(
            target,
            &cfg.registry_schema,
            tenant,
            &job.mv.target_schema,
            &reverse::slot_name(cfg, &job.mv.target),
            &job.tables,
            cfg.cutover.old_transaction_wait,
        )
        .await
        {
            return if over_budget(&e) {
                Ok(Arming::Ended(locked(Step::Arm, &e)))
            } else {
                Err(e.into())
            };
        }
    }
    if fence::arm(source, &cfg.registry_schema, tenant).await? == fence::Armed::Moved {
        return Err(CutoverError::AlreadyMoved);
    }
    if !crate::cluster::sees_all_sessions(source).await? {
        return Err(CutoverError::CannotSeeSessions);
    }
    crate::failpoint::hit("cutover.after_arm");
    Ok(Arming::Done(unsettled))
}

/// Waits out transactions older than the fence (they could write without seeing it);
/// `Some` ends the attempt.
async fn wait_old_transactions(job: &Job, source: &Client) -> Result<Option<Outcome>, Error> {
    let cfg = &job.config;
    let tenant = &job.mv.tenant;
    let deadline = Instant::now() + cfg.cutover.old_transaction_wait;
    loop {
        let old = fence::old_transactions(source, &cfg.registry_schema, tenant).await?;
        if old.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Ok(Some(Outcome::Aborted {
                step: Step::OldTransactions,
                reason: format!(
                    "transactions older than the fence are still open ({}); they could write without seeing it",
                    old.join(", ")
                ),
                pause: None,
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(None)
}

/// The tenant's sequences: (source, target) pairs that exist on both sides.
pub(crate) async fn sequences(
    tables: &[FencedTable],
    source: &Client,
    target: &Client,
) -> Result<Vec<(QualifiedName, QualifiedName)>, ClusterError> {
    let mut pairs = Vec::new();
    for t in tables {
        let rows = source
            .query(
                "SELECT sn.nspname::text, s.relname::text FROM pg_depend d \
                   JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
                   JOIN pg_namespace sn ON sn.oid = s.relnamespace \
                  WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
                    AND d.refobjid = CAST($1::text AS regclass) AND d.deptype IN ('a', 'i')",
                &[&t.chunk.source.quoted()],
            )
            .await
            .map_err(ClusterError::sql(format!(
                "reading the sequences of {}",
                t.chunk.source
            )))?;
        for r in rows {
            let src = QualifiedName {
                schema: r.get(0),
                name: r.get(1),
            };
            let dst = QualifiedName {
                schema: t.target.schema.clone(),
                name: src.name.clone(),
            };
            let exists: bool = target
                .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&dst.quoted()])
                .await
                .map_err(ClusterError::sql("looking for a target sequence"))?
                .get(0);
            if exists {
                pairs.push((src, dst));
            }
        }
    }
    Ok(pairs)
}

/// Sets sequence `to` (on `to_client`) past the value sequence `from` has handed out, unless
/// it is past it already, so the new location never hands out a value the old one did.
pub(crate) async fn carry_sequence(
    from_client: &impl tokio_postgres::GenericClient,
    from: &QualifiedName,
    to_client: &Client,
    to: &QualifiedName,
) -> Result<(), ClusterError> {
    let row = from_client
        .query_one(
            &format!("SELECT last_value, is_called FROM {}", from.quoted()),
            &[],
        )
        .await
        .map_err(ClusterError::sql(format!("reading sequence {from}")))?;
    let (last, called): (i64, bool) = (row.get(0), row.get(1));
    if called {
        to_client
            .execute(
                &format!(
                    "SELECT setval(CAST($1::text AS regclass), $2) FROM {} AS s WHERE s.last_value < $2 OR NOT s.is_called",
                    to.quoted()
                ),
                &[&to.quoted(), &last],
            )
            .await
            .map_err(ClusterError::sql(format!("setting sequence {to}")))?;
    }
    Ok(())
}

/// A statement cut short by the attempt's statement_timeout (57014) or a lock_timeout
/// (55P03): the budget ran out, which is an abort at that step, not a failure.
pub(crate) fn over_budget(e: &ClusterError) -> bool {
    matches!(e.sqlstate(), Some("57014" | "55P03"))
}

/// How long a session that holds a fence may sit idle inside its transaction before the
/// server ends it: a few times the pause budget, at least one second.
pub(crate) fn fence_idle_limit(budget: Duration) -> Duration {
    (budget * 4).max(Duration::from_secs(1))
}

/// Makes the server itself end `session` (and so release the fence it is about to hold) if
/// the daemon stops talking to it: the daemon's host may die or be cut off mid-cutover, and
/// nothing on the daemon's side can then bound the tenant's pause. An idle transaction
/// ends after [`fence_idle_limit`]; a vanished peer is noticed by TCP keepalives within
/// about as long. Session settings: the attempt's connection is its own.
pub(crate) async fn bound_by_server(
    session: &Client,
    budget: Duration,
) -> Result<(), ClusterError> {
    let idle = fence_idle_limit(budget);
    let probe = (idle.as_secs() / 2).max(1);
    session
        .batch_execute(&format!(
            "SET idle_in_transaction_session_timeout = '{}ms'; \
             SET tcp_keepalives_idle = {probe}; SET tcp_keepalives_interval = {probe}; \
             SET tcp_keepalives_count = 2",
            idle.as_millis()
        ))
        .await
        .map_err(ClusterError::sql(
            "bounding the fence's session at the server",
        ))
}

/// Writes the marker `token` into the WAL while the fence is held, from `flusher`, a
/// session of the fence's cluster other than the fence's own. Its own transaction, so its
/// commit flushes it (a walsender sends only flushed WAL, and nothing flushes a
/// non-transactional record on a partly filled page of an idle server; switchyard's
/// sessions commit durably), in one round trip. It is still after everything the tenant
/// committed: the fence's lock was granted only once every writer that held the tenant's
/// shared lock had committed, and no writer of the tenant can commit while it is held.
async fn mark(flusher: &Client, token: u64) -> Result<(), ClusterError> {
    // Typed: one round trip, where a statement given as text is prepared first (two).
    flusher
        .execute_typed(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
            &[
                (&MARKER_PREFIX, Type::TEXT),
                (&token.to_string(), Type::TEXT),
            ],
        )
        .await
        .map_err(ClusterError::sql("writing the cutover marker"))?;
    Ok(())
}

/// The tenant's write pause, measured from the fence lock request: every abort inside it
/// reports how long the tenant's writers waited.
struct Pause {
    t0: Instant,
}

impl Pause {
    /// The pause begins with the lock request: from here on the tenant's writers may wait.
    fn start() -> Pause {
        Pause { t0: Instant::now() }
    }

    fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    /// The attempt ends at `step` without a cutover; the writers waited until now.
    fn aborted(&self, step: Step, reason: String) -> Outcome {
        Outcome::Aborted {
            step,
            reason,
            pause: Some(self.t0.elapsed()),
        }
    }

    /// A statement cut short by the budget is an abort at `step`; any other failure is an
    /// error of the attempt.
    fn over(&self, step: Step, e: ClusterError) -> Result<Outcome, Error> {
        if over_budget(&e) {
            Ok(self.aborted(
                step,
                format!("a statement did not finish within the pause budget: {e}"),
            ))
        } else {
            Err(e.into())
        }
    }
}

/// The flip as one statement: the route names the target with its version raised, the
/// fence turns to `moved` with that version (from the commit on, writers at the source are
/// refused and told where the tenant went), and the move becomes `cut_over` only if it is
/// still cutting over, with the verification's verdict when one is given ($10). Returns the
/// route's version and the moves updated (1, or 0 when the move changed meanwhile).
fn flip_sql(registry: &Registry, registry_schema: &str) -> String {
    format!(
        "WITH r AS ( \
           INSERT INTO {routes} AS r (tenant, location, schema_name) VALUES ($1, $2, $3) \
           ON CONFLICT (tenant) DO UPDATE SET location = EXCLUDED.location, \
              schema_name = EXCLUDED.schema_name, version = r.version + 1, updated_at = now() \
           RETURNING version), \
         f AS ( \
           UPDATE {fences} SET state = 'moved', location = $2, schema_name = $3, \
                  version = (SELECT version FROM r), moved_at = now() \
            WHERE tenant = $1), \
         m AS ( \
           UPDATE {moves} SET state = 'cut_over', last_error = NULL, pause_ms = $5, \
                  cutover_attempts = $6, cut_over_at = now(), \
                  cleanup_after = now() + make_interval(secs => $7), updated_at = now(), \
                  reverse_slot = $8, reverse_from = $9, \
                  verify_ok = CASE WHEN $10::text IS NULL THEN verify_ok ELSE true END, \
                  verify_result = COALESCE($10::text, verify_result), \
                  verified_at = CASE WHEN $10::text IS NULL THEN verified_at ELSE now() END \
            WHERE id = $4 AND state = 'cutting_over' \
           RETURNING 1) \
         SELECT (SELECT version FROM r), (SELECT count(*) FROM m)",
        routes = registry.table("routes"),
        fences = format_args!("{}.fences", quote_ident(registry_schema)),
        moves = registry.table("moves"),
    )
}

/// The fenced part: everything from the lock request to the commit.
async fn fenced(
    job: &Job,
    source: &mut Client,
    target: &Client,
    registry: &Registry,
    pipeline: &mpsc::UnboundedSender<CutoverMsg>,
    unsettled: Option<Unsettled>,
) -> Result<Outcome, Error> {
    let cfg = &job.config;
    let tenant = &job.mv.tenant;
    let seqs = sequences(&job.tables, source, target).await?;
    let flusher = cfg.source.connect_sql().await?;
    if unsettled.is_some() {
        // It reads the source's side of the comparison inside the pause.
        flusher
            .batch_execute(verify::SESSION_SQL)
            .await
            .map_err(ClusterError::sql("preparing a verification session"))?;
    }
    let clock = policy::Clock {
        budget: cfg.cutover.pause_budget,
    };
    let sql = |ctx: &'static str| ClusterError::sql(ctx);
    bound_by_server(source, clock.budget).await?;
    let tx = source
        .transaction()
        .await
        .map_err(sql("starting the cutover"))?;
    let pause = Pause::start();
    if !fence::take(&tx, tenant, clock.lock_wait()).await? {
        return Ok(pause.aborted(
            Step::Fence,
            format!(
                "the tenant's open transactions did not end within {} ms",
                clock.lock_wait().as_millis()
            ),
        ));
    }
    let lock_wait = pause.elapsed();
    crate::failpoint::hit("cutover.after_lock");

    if let Some(aborted) = catch_up(job, &flusher, pipeline, &clock, &pause).await? {
        return Ok(aborted);
    }
    let catch_up = pause.elapsed() - lock_wait;
    crate::failpoint::hit("cutover.after_catch_up");
    let Some(left) = clock.left(pause.elapsed()) else {
        return Ok(pause.aborted(
            Step::Sequences,
            "the pause budget ran out after the catch-up".into(),
        ));
    };
    // What is left runs under a statement_timeout of the remaining budget on both sides: a
    // lock held by someone else (on the routes, a fence row, a target sequence) aborts the
    // attempt at its step instead of stretching the pause. The setting goes out first; the
    // statements queue behind it on the session without waiting for its answer.
    let bound = format!("statement_timeout = '{}ms'", left.as_millis().max(1));
    let at_target = cfg.cutover.rollback || !seqs.is_empty();
    let source_bound = format!("SET LOCAL {bound}");
    // Rows that kept changing under verification are compared while the flip goes out in
    // the same (uncommitted) transaction, which carries the verdict "equal": a difference
    // rolls the flip back before anything commits, and the tenant waits one round trip
    // less.
    let verified = unsettled
        .as_ref()
        .map(|rows| equal_summary(count_rows(rows)));
    let rest = Rest {
        job,
        tx: &tx,
        target,
        target_bound: at_target.then_some(bound.as_str()),
        seqs: &seqs,
        registry,
        clock: &clock,
        pause: &pause,
        verified: verified.as_deref(),
    };
    let compare = async {
        match &unsettled {
            Some(rows) => Some(compare_paused(job, &flusher, target, rows, &clock, &pause).await),
            None => None,
        }
    };
    let ((bounded, flipped), compared) = futures_util::future::join(
        futures_util::future::join(tx.batch_execute(&source_bound), rest.flip()),
        compare,
    )
    .await;
    if let Some(compared) = compared {
        if let Compared::Ended(outcome) = compared? {
            // The attempt's transaction, the flip with it, ends here: the writers go on.
            drop(tx);
            if let Outcome::Different { summary } = &outcome {
                registry
                    .record_verification(&*source, job.mv.id, false, summary)
                    .await?;
            }
            return Ok(outcome);
        }
    }
    bounded.map_err(sql("bounding the cutover's statements"))?;
    let route_version = match flipped? {
        Ok(version) => version,
        Err(aborted) => return Ok(aborted),
    };
    if clock.left(pause.elapsed()).is_none() {
        return Ok(pause.aborted(
            Step::Flip,
            "the pause budget ran out before the commit".into(),
        ));
    }
    crate::failpoint::hit("cutover.before_commit");
    if let Err(e) = tx.commit().await {
        return pause.over(Step::Flip, sql("committing the cutover")(e));
    }
    crate::failpoint::hit("cutover.after_commit");
    Ok(Outcome::CutOver {
        pause: pause.elapsed(),
        lock_wait,
        catch_up,
        route_version,
    })
}

/// What an attempt does after its catch-up, inside the pause.
struct Rest<'a> {
    job: &'a Job,
    tx: &'a tokio_postgres::Transaction<'a>,
    target: &'a Client,
    /// The statement_timeout the target's statements run under, if any run there.
    target_bound: Option<&'a str>,
    seqs: &'a [(QualifiedName, QualifiedName)],
    registry: &'a Registry,
    clock: &'a policy::Clock,
    pause: &'a Pause,
    /// The verification's summary, when it was settled inside this pause.
    verified: Option<&'a str>,
}

impl Rest<'_> {
    /// The target's position for the reverse stream, the sequences, then the flip. `Ok(Err)`
    /// ends the attempt (aborted); `Ok(Ok)` is the route's new version.
    async fn flip(self) -> Result<Result<i64, Outcome>, Error> {
        let cfg = &self.job.config;
        let sql = |ctx: &'static str| ClusterError::sql(ctx);
        let mut reverse_from: Option<String> = None;
        if let Some(bound) = self.target_bound {
            // From here on every change of the tenant's tables at the target is an
            // application's (the move applied all of its own): the reverse stream starts
            // after this position. The insert position, not `pg_current_wal_lsn()` (the
            // write position): every commit of the move returned, so its record is
            // inserted, but under `synchronous_commit = off` it may not be written yet, and
            // a write position before it would hand the move's own last transactions to the
            // reverse stream as the application's.
            let set = format!("SET {bound}");
            let position = async {
                if cfg.cutover.rollback {
                    let sql = "SELECT pg_current_wal_insert_lsn()::text";
                    Some(self.target.query_typed_one(sql, &[]).await)
                } else {
                    None
                }
            };
            let (set, position) =
                futures_util::future::join(self.target.batch_execute(&set), position).await;
            set.map_err(sql("bounding the cutover's statements at the target"))?;
            match position {
                None => {}
                Some(Ok(row)) => reverse_from = Some(row.get(0)),
                Some(Err(e)) => {
                    return self
                        .pause
                        .over(Step::Sequences, sql("reading the target's position")(e))
                        .map(Err)
                }
            }
        }
        for (src, dst) in self.seqs {
            if let Err(e) = carry_sequence(self.tx, src, self.target, dst).await {
                return self.pause.over(Step::Sequences, e).map(Err);
            }
        }
        if self.clock.left(self.pause.elapsed()).is_none() {
            return Ok(Err(self.pause.aborted(
                Step::Sequences,
                "the pause budget ran out while setting sequences".into(),
            )));
        }
        let mv = &self.job.mv;
        let pause_ms = self.pause.elapsed().as_secs_f64() * 1e3;
        let reverse_slot = cfg
            .cutover
            .rollback
            .then(|| reverse::slot_name(cfg, &mv.target));
        let retention = cfg.cutover.retention.as_secs_f64();
        // Typed: the statement goes out whole in one round trip; a prepared one would
        // lock the registry's tables outside the pause, where a lock someone holds is no
        // abort at the flip's step.
        let flipped = self
            .tx
            .query_typed_one(
                &flip_sql(self.registry, &cfg.registry_schema),
                &[
                    (&mv.tenant.as_str(), Type::TEXT),
                    (&mv.target.as_str(), Type::TEXT),
                    (&mv.target_schema, Type::TEXT),
                    (&mv.id, Type::INT8),
                    (&pause_ms, Type::FLOAT8),
                    (&self.job.attempt, Type::INT4),
                    (&retention, Type::FLOAT8),
                    (&reverse_slot, Type::TEXT),
                    (&reverse_from, Type::TEXT),
                    (&self.verified, Type::TEXT),
                ],
            )
            .await;
        let row = match flipped {
            Ok(row) => row,
            Err(e) => {
                return self
                    .pause
                    .over(Step::Flip, sql("flipping the route")(e))
                    .map(Err)
            }
        };
        let (version, moved): (i64, i64) = (row.get(0), row.get(1));
        if moved != 1 {
            return Err(CutoverError::Conflict(
                "the move is no longer cutting_over".into(),
            ));
        }
        Ok(Ok(version))
    }
}

/// The verification's summary when the rows compared inside the pause are equal.
fn equal_summary(n: usize) -> String {
    format!(
        "ok: equal; {n} rows that kept changing under verification equal with the tenant's writes paused"
    )
}

fn count_rows(rows: &Unsettled) -> usize {
    rows.iter().map(|(_, keys)| keys.len()).sum()
}

/// What the comparison inside the pause found.
enum Compared {
    /// The rows are equal.
    Equal,
    /// Different for good, or the budget ran out (an abort).
    Ended(Outcome),
}

/// Inside the pause, once the target holds every change of the tenant before the marker:
/// compares the rows that kept changing under verification. Writes of the tenant wait on
/// the fence, so both sides hold the same rows now; a difference here is for good.
async fn compare_paused(
    job: &Job,
    source: &Client,
    target: &Client,
    rows: &Unsettled,
    clock: &policy::Clock,
    pause: &Pause,
) -> Result<Compared, Error> {
    let n = count_rows(rows);
    let Some(left) = clock.left(pause.elapsed()) else {
        return Ok(Compared::Ended(pause.aborted(
            Step::Verify,
            format!("no pause budget left after the catch-up to compare the {n} rows that kept changing under verification"),
        )));
    };
    let tenant = job.mv.tenant.as_str();
    // Every table at once: each round trip here is the tenant's wait.
    let tables = rows.iter().filter_map(|(i, keys)| {
        let t = job.tables.get(*i)?;
        Some(async move {
            let still = verify::key_diff(source, target, t, tenant, keys).await?;
            Ok::<_, verify::VerifyError>(still.first().map(|first| {
                format!(
                    "{} ({} rows differ with the tenant's writes paused, first key {})",
                    t.chunk.source,
                    still.len(),
                    first
                        .iter()
                        .map(crate::backfill::chunk::ChunkTable::key_text)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }))
        })
    });
    let compare = async {
        let found = futures_util::future::try_join_all(tables).await?;
        Ok::<_, verify::VerifyError>(found.into_iter().flatten().collect::<Vec<_>>())
    };
    match tokio::time::timeout(left, compare).await {
        Ok(Ok(different)) if different.is_empty() => Ok(Compared::Equal),
        Ok(Ok(different)) => Ok(Compared::Ended(Outcome::Different {
            summary: format!("different: {}", different.join("; ")),
        })),
        Ok(Err(verify::VerifyError::Cluster(e))) => Ok(Compared::Ended(pause.over(Step::Verify, e)?)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Ok(Compared::Ended(pause.aborted(
            Step::Verify,
            format!(
                "comparing the {n} rows that kept changing under verification did not fit the pause budget ({} ms)",
                clock.budget.as_millis()
            ),
        ))),
    }
}

/// Inside the pause: waits until the pipeline read the marker written after the fence and
/// the target holds every change of the tenant before it. `Some` ends the attempt.
async fn catch_up(
    job: &Job,
    flusher: &Client,
    pipeline: &mpsc::UnboundedSender<CutoverMsg>,
    clock: &policy::Clock,
    pause: &Pause,
) -> Result<Option<Outcome>, Error> {
    let cfg = &job.config;
    // Everything the tenant committed is now before this point in the WAL.
    let (reply_tx, reply_rx) = oneshot::channel();
    if pipeline
        .send(CutoverMsg::Wait {
            token: job.token,
            tenant: job.mv.tenant.clone(),
            reply: reply_tx,
        })
        .is_err()
    {
        return Ok(Some(
            pause.aborted(Step::CatchUp, "the pipeline is stopping".into()),
        ));
    }
    let wait = match mark_in_budget(flusher, job.token, clock, pause).await? {
        Ok(wait) => wait,
        Err(aborted) => return Ok(Some(aborted)),
    };
    match tokio::time::timeout(wait, reply_rx).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return Ok(Some(
                pause.aborted(Step::CatchUp, "the pipeline dropped the wait".into()),
            ))
        }
        Err(_) => {
            return Ok(Some(pause.aborted(
                Step::CatchUp,
                format!(
                    "the target did not catch up within the pause budget ({} ms)",
                    cfg.cutover.pause_budget.as_millis()
                ),
            )))
        }
    }
    Ok(None)
}

/// Writes the marker `token` while the fence is held ([`mark`]), within the pause budget,
/// and returns how long the catch-up may then wait for it to be answered (`Err`: the attempt's
/// end, aborted). Bounded: a source that stops answering must not hold the attempt (the
/// server ends the fence's session by itself, see `bound_by_server`).
async fn mark_in_budget(
    flusher: &Client,
    token: u64,
    clock: &policy::Clock,
    pause: &Pause,
) -> Result<Result<Duration, Outcome>, Error> {
    match tokio::time::timeout(clock.budget, mark(flusher, token)).await {
        Ok(r) => r?,
        Err(_) => {
            return Ok(Err(pause.aborted(
                Step::CatchUp,
                "the marker could not be written within the pause budget".into(),
            )))
        }
    }
    match clock.catch_up(pause.elapsed()) {
        Some(wait) => Ok(Ok(wait)),
        None => Ok(Err(
            pause.aborted(Step::CatchUp, "no time left to catch up".into())
        )),
    }
}

/// Writes the attempt into the registry; an aborted attempt returns the move to streaming.
async fn record(job: &Job, source: &Client, registry: &Registry, outcome: &Outcome) {
    let ms = |d: &Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let (result, step, reason, pause) = match outcome {
        Outcome::CutOver { pause, .. } => ("cut_over", None, None, Some(*pause)),
        Outcome::Aborted {
            step,
            reason,
            pause,
        } => ("aborted", Some(step.as_str()), Some(reason.clone()), *pause),
        Outcome::Different { summary } => (
            "different",
            Some(Step::Verify.as_str()),
            Some(summary.clone()),
            None,
        ),
    };
    if let Err(e) = registry
        .record_attempt(
            source,
            job.mv.id,
            job.attempt,
            result,
            step,
            ms(&pause),
            reason.as_deref(),
        )
        .await
    {
        tracing::warn!(tenant = %job.mv.tenant, error = %e, "recording the cutover attempt");
    }
    let back = match outcome {
        Outcome::CutOver { .. } => return,
        Outcome::Aborted { step, reason, .. } => Some((
            MoveState::Streaming,
            format!(
                "cutover attempt {} aborted at {}: {reason}; retrying",
                job.attempt,
                step.as_str()
            ),
        )),
        Outcome::Different { summary } => Some((
            MoveState::Failed,
            format!("verification before the cutover: {summary}"),
        )),
    };
    if let Some((to, why)) = back {
        if let Err(e) = registry
            .transition(source, job.mv.id, MoveState::CuttingOver, to, Some(&why))
            .await
        {
            tracing::warn!(tenant = %job.mv.tenant, error = %e, "recording the aborted cutover");
        }
    }
}
