//! Reverse replication and rollback: after a cutover, the old location is kept current from
//! the new one, so a rollback loses no write made after the cutover.
//!
//! ```text
//!  at the cutover (before the pause): target gets the fence (armed), a publication of the
//!      tenant's target tables and a slot; in the pause, the target's WAL position P is
//!      recorded with the flip
//!  after: target slot ─► decode ─► (target table → source table) ─► source, exactly once
//!      (progress row on the source), transactions ending at or before P skipped (they
//!      are the forward apply's own writes)
//!  rollback (a cutover back, bounded the same way):
//!      target: advisory lock EXCLUSIVE (tenant) → marker → the reverse stream applied
//!      everything before it → source sequences past the target's → target fence → moved,
//!      COMMIT (the target refuses the tenant) → source: route back, fence removed, move →
//!      rolled_back, COMMIT
//! ```
//!
//! Invariants:
//! - The reverse apply bypasses the source's fence for this tenant only (a session
//!   setting), and records its position in the same source transaction as the rows.
//! - A rollback flips the route only after the source holds every change the tenant
//!   committed at the target, and the target refuses the tenant before the route says
//!   "source": at no moment do both places take its writes. If the second commit fails the
//!   tenant is refused at both places (unavailable, never split) until the rollback is
//!   retried.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

use super::fence::{self, TenantOf};
use super::CutoverError as Error;
use super::{policy, FencedTable, Outcome, Pause, Step, MARKER_PREFIX};
use crate::apply::writer::{OwnedRowOp, RowChange, SourceTxn, TargetWriter, Work};
use crate::cluster::ClusterError;
use crate::config::{Config, TenancyMode};
use crate::decode::{Message, RelationCache};
use crate::lsn::Lsn;
use crate::registry::{Move, Registry};
use crate::route::Router;
use crate::source::{ReplicationStream, SourceEvent, StreamSettings};
use crate::sql::{quote_ident, QualifiedName};
use crate::tenant::{TargetId, TenantId};

/// The reverse slot's and publication's name for a move.
pub fn slot_name(move_id: i64) -> String {
    format!("switchyard_rev_{move_id}")
}

/// The fence key of the tenant's new location: its own, so that a target in the source's
/// own database (whose fences table is the source's) fences the two places apart.
pub fn target_key(tenant: &TenantId, target_schema: &str) -> TenantId {
    TenantId::new(format!("{tenant}@{target_schema}")).unwrap_or_else(|_| tenant.clone())
}

/// Prepares reverse replication at the target (outside the pause; idempotent): the fence
/// (armed, so a rollback can take it), a publication of the tenant's target tables and a
/// logical slot that keeps every later change.
pub async fn prepare(
    target: &mut Client,
    registry_schema: &str,
    tenant: &TenantId,
    target_schema: &str,
    move_id: i64,
    tables: &[FencedTable],
    slot_wait: Duration,
) -> Result<(), ClusterError> {
    let key = target_key(tenant, target_schema);
    // Attempts of several tenants onto one target run at once, and CREATE ... IF NOT EXISTS
    // is no guard against a concurrent creator: one at a time.
    target
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('switchyard.fence_ddl'));\n\
             CREATE SCHEMA IF NOT EXISTS {};\n{}\nCOMMIT;",
            quote_ident(registry_schema),
            fence::ddl(registry_schema)
        ))
        .await
        .map_err(ClusterError::sql("installing the fence at the target"))?;
    for t in tables {
        // Every row of the tenant's target tables is the tenant's.
        fence::install(
            target,
            registry_schema,
            &t.target,
            &TenantOf::Whole(key.clone()),
            Duration::from_millis(500),
            Duration::from_secs(30),
        )
        .await?;
    }
    fence::arm(target, registry_schema, &key).await?;
    let name = slot_name(move_id);
    let has_publication: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&name],
        )
        .await
        .map_err(ClusterError::sql("looking for the reverse publication"))?
        .get(0);
    if !has_publication {
        let list: Vec<String> = tables.iter().map(|t| t.target.quoted()).collect();
        target
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(&name),
                list.join(", ")
            ))
            .await
            .map_err(ClusterError::sql("creating the reverse publication"))?;
    }
    let has_slot: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&name],
        )
        .await
        .map_err(ClusterError::sql("looking for the reverse slot"))?
        .get(0);
    if !has_slot {
        // A new slot waits for the transactions running at the target to end: bounded,
        // so a long transaction there delays the cutover instead of hanging it.
        let tx = target
            .transaction()
            .await
            .map_err(ClusterError::sql("creating the reverse slot"))?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = '{}ms'",
            slot_wait.as_millis().max(1)
        ))
        .await
        .map_err(ClusterError::sql("creating the reverse slot"))?;
        tx.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await
        .map_err(ClusterError::sql(
            "creating the reverse slot (it waits for the target's open transactions)",
        ))?;
        tx.commit()
            .await
            .map_err(ClusterError::sql("creating the reverse slot"))?;
    }
    Ok(())
}

/// Drops the reverse slot and publication (after a rollback or a cleanup). The slot may
/// still be in use by a reverse stream that is stopping: retried for a while.
pub async fn drop_slot(target: &Client, move_id: i64) -> Result<(), ClusterError> {
    let name = slot_name(move_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = target
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await;
        match r {
            Ok(_) => break,
            Err(e) if e.code().map(|c| c.code()) == Some("55006") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(ClusterError::sql("dropping the reverse slot")(e)),
        }
    }
    target
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            quote_ident(&name)
        ))
        .await
        .map_err(ClusterError::sql("dropping the reverse publication"))?;
    Ok(())
}

/// What an attempt left for a move that ended without a cutover (failed, paused or
/// cancelled, by the daemon or through SQL): the source's armed fence (its writers would
/// take the tenant's lock for ever), and at the target the reverse slot (it would keep WAL
/// for ever), its publication and the target's armed fence. A fence is lifted only while no
/// other move of the tenant is under way (a newer move may have armed it).
pub async fn release_leftovers(config: &Config, mv: &Move) -> Result<(), Error> {
    let registry = Registry::new(config.registry_schema.clone())?;
    let source = config.source.connect_sql().await?;
    let active = registry.active_for(&source, &mv.tenant).await?;
    let busy = active.is_some_and(|a| a.id != mv.id || a.state.consumes_stream());
    if !busy {
        fence::disarm(&source, &config.registry_schema, &mv.tenant).await?;
    }
    // A target no longer configured cannot be reached; nothing to do there.
    let Ok(endpoint) = crate::layout::target_endpoint(config, &mv.target) else {
        return Ok(());
    };
    let target = endpoint.connect_sql().await?;
    drop_slot(&target, mv.id).await?;
    if !busy {
        let has_fences: bool = target
            .query_one(
                "SELECT to_regclass($1::text) IS NOT NULL",
                &[&format!("{}.fences", quote_ident(&config.registry_schema))],
            )
            .await
            .map_err(ClusterError::sql("looking for the target's fences"))?
            .get(0);
        if has_fences {
            fence::disarm(
                &target,
                &config.registry_schema,
                &target_key(&mv.tenant, &mv.target_schema),
            )
            .await?;
        }
    }
    Ok(())
}

/// What a rollback asks the reverse stream.
#[derive(Debug)]
pub(crate) struct MarkerWait {
    pub token: u64,
    pub reply: oneshot::Sender<()>,
}

/// A reverse stream for one cut-over move.
pub(crate) struct Reverse {
    pub move_id: i64,
    pub tenant: TenantId,
    pub target: TargetId,
    pub target_schema: String,
    pub from: Lsn,
    /// Target table → source table.
    pub tables: Vec<FencedTable>,
}

/// Applies the target's changes of the tenant to the source until `stop` resolves or the
/// stream fails (the caller restarts it; the progress row makes that exact).
pub(crate) async fn run(
    config: Config,
    rev: Reverse,
    mut waits: mpsc::UnboundedReceiver<MarkerWait>,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), Error> {
    let endpoint = crate::layout::target_endpoint(&config, &rev.target)?.clone();
    let (mut writer, skip_through) = source_writer(&config, &rev).await?;
    let mut stream = reverse_stream(&config, &rev, endpoint).await?;
    let router = schema_router(&config, &rev)?;
    let mut apply = ReverseApply {
        rev: &rev,
        skip_through,
        router,
        relations: RelationCache::new(),
        works: Vec::new(),
        in_txn: false,
        pending: Vec::new(),
    };
    tracing::info!(tenant = %rev.tenant, from = %skip_through, "reverse replication running");
    let result = loop {
        let ev = tokio::select! {
            _ = &mut stop => break Ok(()),
            Some(w) = waits.recv() => { apply.pending.push(w); continue; }
            ev = stream.recv() => ev,
        };
        let message = match ev {
            Ok(Some(SourceEvent::Message(r))) => r.message,
            Ok(Some(SourceEvent::Restarted { .. })) => {
                apply.works.clear();
                apply.in_txn = false;
                continue;
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(Error::from(e)),
        };
        if let Err(e) = apply.message(&message, &mut writer, &stream).await {
            break Err(e);
        }
    };
    stream.shutdown().await;
    result
}

/// The source's end of the reverse apply: a session whose writes of this tenant pass the
/// source's fence, and the position through which the target's changes are at the source
/// already (applied before a restart, or the move's own writes before the cutover).
async fn source_writer(config: &Config, rev: &Reverse) -> Result<(TargetWriter, Lsn), Error> {
    let source = config.source.connect_sql().await?;
    // Only this tenant's writes pass the source's fence, and only on this session.
    source
        .execute(
            "SELECT set_config($1, $2, false)",
            &[&fence::BYPASS_SETTING, &rev.tenant.as_str()],
        )
        .await
        .map_err(ClusterError::sql("preparing the reverse apply session"))?;
    let mut writer = TargetWriter::with_client(
        TargetId::new("source").expect("\"source\" is a valid target name"),
        source,
        &crate::registry::reverse_progress_schema(&config.registry_schema),
    )
    .await?;
    let _ = writer.use_replica_role().await;
    let applied = writer
        .load_applied()
        .await?
        .get(&rev.tenant)
        .copied()
        .unwrap_or(Lsn::INVALID);
    Ok((writer, applied.max(rev.from)))
}

/// The target's changes from the move's reverse slot and publication (prepared at the
/// cutover), confirmed as the source commits them.
async fn reverse_stream(
    config: &Config,
    rev: &Reverse,
    endpoint: crate::cluster::Endpoint,
) -> Result<ReplicationStream, Error> {
    let name = slot_name(rev.move_id);
    let mut replication = config.replication.clone();
    replication.slot = name.clone();
    replication.publication = name;
    replication.tables = Vec::new();
    replication.streaming = false;
    Ok(ReplicationStream::start(StreamSettings {
        endpoint,
        replication,
        ack: true,
        start: Lsn::INVALID,
        ceiling: None,
    })
    .await?)
}

/// Every table at the target is the tenant's: route by the target schema.
fn schema_router(config: &Config, rev: &Reverse) -> Result<Router, Error> {
    let mut router = Router::new(crate::config::Tenancy {
        mode: TenancyMode::Schema,
        ..config.tenancy.clone()
    });
    let schema_id = TenantId::new(rev.target_schema.clone()).map_err(|e| {
        super::CutoverError::BadTargetSchema {
            schema: rev.target_schema.clone(),
            reason: e.to_string(),
        }
    })?;
    router.start(
        schema_id,
        crate::route::Destination {
            target: rev.target.clone(),
            schema: rev.target_schema.clone(),
        },
    );
    Ok(router)
}

/// The reverse apply between two messages of the stream: the target transaction being
/// gathered, and the rollbacks waiting for their marker.
struct ReverseApply<'a> {
    rev: &'a Reverse,
    /// Transactions ending at or before it are at the source already.
    skip_through: Lsn,
    router: Router,
    relations: RelationCache,
    works: Vec<Work>,
    in_txn: bool,
    pending: Vec<MarkerWait>,
}

impl ReverseApply<'_> {
    /// One decoded message: rows are gathered per transaction and written to the source
    /// at its commit; a marker between transactions answers the rollback waiting for it.
    async fn message(
        &mut self,
        message: &Message,
        writer: &mut TargetWriter,
        stream: &ReplicationStream,
    ) -> Result<(), Error> {
        match message {
            Message::Begin(_) => {
                self.works.clear();
                self.in_txn = true;
            }
            Message::Relation(rel) => {
                self.relations.apply(rel.clone());
            }
            Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_) => {
                self.rows(message)?;
            }
            Message::Commit(c) => {
                self.in_txn = false;
                let end = c.end();
                if end.lsn() > self.skip_through && !self.works.is_empty() {
                    let txn = SourceTxn {
                        end,
                        parts: vec![(self.rev.tenant.clone(), std::mem::take(&mut self.works))],
                        states: Vec::new(),
                    };
                    if let Err(e) = writer.commit(std::slice::from_ref(&txn)).await {
                        return Err(Error::Apply(e));
                    }
                }
                self.works.clear();
                stream.mark_applied(end);
            }
            Message::Message(m) if m.prefix == MARKER_PREFIX && !self.in_txn => {
                // Everything before the marker is applied (commits are applied in order,
                // before the next message is read).
                let token: Option<u64> = std::str::from_utf8(&m.content)
                    .ok()
                    .and_then(|t| t.parse().ok());
                let mut i = 0;
                while i < self.pending.len() {
                    if Some(self.pending[i].token) == token {
                        let w = self.pending.swap_remove(i);
                        let _ = w.reply.send(());
                    } else {
                        i += 1;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A row change at the target becomes the same change of the source table it was
    /// moved from (tables the move does not know are skipped).
    fn rows(&mut self, message: &Message) -> Result<(), Error> {
        let routed = match self.router.message(&self.relations, message) {
            Ok(r) => r,
            Err(e) => return Err(Error::Route(e)),
        };
        for (rel, ops) in routed {
            let from = QualifiedName {
                schema: rel.namespace.clone(),
                name: rel.name.clone(),
            };
            let Some(t) = self.rev.tables.iter().find(|t| t.target == from) else {
                continue;
            };
            let identity: Vec<bool> = rel.columns.iter().map(|c| c.is_key()).collect();
            for op in ops {
                self.works.push(Work::Row(RowChange::new(
                    t.chunk.source.clone(),
                    identity.clone(),
                    t.chunk.tenant.as_ref().map(|c| c.0.clone()),
                    OwnedRowOp::from_op(&op.op),
                )));
            }
        }
        Ok(())
    }
}

/// Everything a rollback attempt needs.
pub(crate) struct RollbackJob {
    pub config: Config,
    pub mv: Move,
    pub tables: Vec<FencedTable>,
    pub token: u64,
    pub reverse: mpsc::UnboundedSender<MarkerWait>,
}

/// One rollback attempt: a cutover back to the source, bounded by the same pause budget.
pub(crate) async fn rollback(job: &RollbackJob) -> Result<Outcome, Error> {
    let cfg = &job.config;
    let tenant = &job.mv.tenant;
    let key = target_key(tenant, &job.mv.target_schema);
    let registry = Registry::new(cfg.registry_schema.clone())?;
    let endpoint = crate::layout::target_endpoint(cfg, &job.mv.target)?;
    let mut target = endpoint.connect_sql().await?;
    let flusher = endpoint.connect_sql().await?;
    let mut source = cfg.source.connect_sql().await?;
    let seqs = super::sequences(&job.tables, &source, &target).await?;
    let home = job
        .tables
        .first()
        .map(|t| t.chunk.source.schema.clone())
        .unwrap_or_default();
    let clock = policy::Clock {
        budget: cfg.cutover.pause_budget,
    };
    let sql = |ctx: &'static str| ClusterError::sql(ctx);
    super::bound_by_server(&target, clock.budget).await?;
    let tx = target
        .transaction()
        .await
        .map_err(sql("starting the rollback"))?;
    let pause = Pause::start();
    if !fence::take(&tx, &key, clock.lock_wait()).await? {
        return Ok(pause.aborted(
            Step::Fence,
            "the tenant's open transactions at the target did not end in time".into(),
        ));
    }
    let lock_wait = pause.elapsed();
    if let Some(aborted) = catch_up(job, &tx, &flusher, &clock, &pause).await? {
        return Ok(aborted);
    }
    let catch_up = pause.elapsed() - lock_wait;
    for (src, dst) in &seqs {
        super::carry_sequence(&tx, dst, &source, src).await?;
    }
    close_target_fence(&tx, &source, &registry, job, &key, &home).await?;
    if clock.left(pause.elapsed()).is_none() {
        return Ok(pause.aborted(
            Step::Flip,
            "the pause budget ran out before the commit".into(),
        ));
    }
    tx.commit()
        .await
        .map_err(sql("committing the target's fence"))?;
    // From here the target refuses the tenant: the route must come back to the source.
    let route_version = flip_back(&mut source, &registry, job, &home).await?;
    Ok(Outcome::CutOver {
        pause: pause.elapsed(),
        lock_wait,
        catch_up,
        route_version,
    })
}

/// Inside the pause: waits until the reverse stream applied, at the source, everything
/// the tenant committed at the target before the marker. `Some` ends the attempt.
async fn catch_up(
    job: &RollbackJob,
    tx: &tokio_postgres::Transaction<'_>,
    flusher: &Client,
    clock: &policy::Clock,
    pause: &Pause,
) -> Result<Option<Outcome>, Error> {
    let (reply, answered) = oneshot::channel();
    if job
        .reverse
        .send(MarkerWait {
            token: job.token,
            reply,
        })
        .is_err()
    {
        return Ok(Some(pause.aborted(
            Step::CatchUp,
            "reverse replication is not running".into(),
        )));
    }
    let wait = match super::mark_in_budget(tx, flusher, job.token, clock, pause).await? {
        Ok(wait) => wait,
        Err(aborted) => return Ok(Some(aborted)),
    };
    match tokio::time::timeout(wait, answered).await {
        Ok(Ok(())) => {}
        _ => {
            return Ok(Some(pause.aborted(
                Step::CatchUp,
                "the source did not catch up with the target within the pause budget".into(),
            )))
        }
    }
    Ok(None)
}

/// The target's fence (`key`) turns to `moved`, pointing home, in the fence's transaction:
/// from its commit on the target refuses the tenant, before the route says "source".
async fn close_target_fence(
    tx: &tokio_postgres::Transaction<'_>,
    source: &Client,
    registry: &Registry,
    job: &RollbackJob,
    key: &TenantId,
    home: &str,
) -> Result<(), ClusterError> {
    let sql = |ctx: &'static str| ClusterError::sql(ctx);
    // The version the route flip below will give the route, for the refusal's message.
    let next_version: i64 = source
        .query_one(
            &format!(
                "SELECT coalesce(max(version), 0) + 1 FROM {} WHERE tenant = $1",
                registry.table("routes")
            ),
            &[&job.mv.tenant.as_str()],
        )
        .await
        .map_err(sql("reading the route's version"))?
        .get(0);
    tx.execute(
        &format!(
            "UPDATE {}.fences SET state = 'moved', location = 'source', schema_name = $2, \
                    version = $3, moved_at = now() WHERE tenant = $1",
            quote_ident(&job.config.registry_schema)
        ),
        &[&key.as_str(), &home, &next_version],
    )
    .await
    .map_err(sql("closing the fence at the target"))?;
    Ok(())
}

/// The source's half, in one transaction: the route back home, the source's fence lifted,
/// the move `rolled_back`. Returns the route's new version.
async fn flip_back(
    source: &mut Client,
    registry: &Registry,
    job: &RollbackJob,
    home: &str,
) -> Result<i64, ClusterError> {
    let sql = |ctx: &'static str| ClusterError::sql(ctx);
    let tenant = &job.mv.tenant;
    let stx = source
        .transaction()
        .await
        .map_err(sql("starting the route flip back"))?;
    let route_version: i64 = stx
        .query_one(
            &format!(
                "UPDATE {} SET location = 'source', schema_name = $2, version = version + 1, \
                        updated_at = now() WHERE tenant = $1 RETURNING version",
                registry.table("routes")
            ),
            &[&tenant.as_str(), &home],
        )
        .await
        .map_err(sql("flipping the route back"))?
        .get(0);
    stx.execute(
        &format!(
            "DELETE FROM {}.fences WHERE tenant = $1",
            quote_ident(&job.config.registry_schema)
        ),
        &[&tenant.as_str()],
    )
    .await
    .map_err(sql("lifting the source's fence"))?;
    stx.execute(
        &format!(
            "UPDATE {} SET state = 'rolled_back', last_error = NULL, finished_at = now(), \
                    updated_at = now() WHERE id = $1 AND state = 'cut_over'",
            registry.table("moves")
        ),
        &[&job.mv.id],
    )
    .await
    .map_err(sql("recording the rollback"))?;
    stx.commit()
        .await
        .map_err(sql("committing the route flip back"))?;
    Ok(route_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_move() {
        assert_eq!(slot_name(42), "switchyard_rev_42");
        let t = TenantId::new("acme").unwrap();
        assert_eq!(target_key(&t, "shard_acme").as_str(), "acme@shard_acme");
        assert_eq!(
            crate::registry::reverse_progress_schema("switchyard"),
            "switchyard_rollback"
        );
    }
}
