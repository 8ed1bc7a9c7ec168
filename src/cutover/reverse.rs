//! Reverse replication and rollback: after a cutover, the old location is kept current from
//! the new one, so a rollback loses no write made after the cutover.
//!
//! ```text
//!  at the cutover (before the pause): target gets the fence row (armed; its triggers
//!      come with a rollback), the tenant's target tables join the target's reverse
//!      publication, and the target's one reverse slot is created if this is the first
//!      cutover onto it; in the pause, the target's WAL position P is recorded with the flip
//!  after: one stream per target slot ─► decode ─► by target schema: the member (cut-over
//!      move) ─► (target table → source table) ─► source, exactly once (a progress row per
//!      move on the source); a member's transactions ending at or before its P skipped
//!      (they are the forward apply's own writes)
//!  rollback (a cutover back, bounded the same way):
//!      target: fence triggers installed (before the pause) → advisory lock EXCLUSIVE
//!      (tenant) → marker → the reverse stream applied everything before it → source
//!      sequences past the target's → target fence → moved, COMMIT (the target refuses the
//!      tenant) → source: route back, fence removed, move → rolled_back, COMMIT → its
//!      tables leave the publication (the slot goes with the last)
//! ```
//!
//! Invariants:
//! - One slot and one walsender per target, however many tenants were cut over onto it:
//!   the target's WAL is decoded once, not once per tenant.
//! - A change is applied back only for a member, and members come from the registry: a
//!   change in a schema that is no member's is skipped only on a registry read made after
//!   the change was read (a flip commits before any application write at the target), or
//!   on an earlier such read while no cutover attempt into that schema ran or started
//!   since ([`Attempts`]).
//! - The reverse apply passes the source's fence as the replica role, or else with the
//!   bypass setting naming one tenant at a time, and records each move's position in the
//!   same source transaction as its rows.
//! - A rollback flips the route only after the source holds every change the tenant
//!   committed at the target, and the target refuses the tenant before the route says
//!   "source": at no moment do both places take its writes. If the second commit fails the
//!   tenant is refused at both places (unavailable, never split) until the rollback is
//!   retried.
//! - Until a rollback, writes at the new location pay nothing for its fence: the fence row
//!   is armed at the cutover (before any application writes there, so every later
//!   snapshot sees it) and the triggers come with the rollback, before its pause. Creating
//!   a trigger waits for the table's open writers, so once all are in place every open
//!   transaction that wrote the tenant there holds its shared lock, and the rollback's
//!   exclusive lock waits for it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

use super::fence::{self, TenantOf};
use super::CutoverError as Error;
use super::{policy, FencedTable, Outcome, Pause, Step, MARKER_PREFIX};
use crate::apply::writer::{OwnedRowOp, RowChange, SourceTxn, TargetWriter, Work};
use crate::cluster::ClusterError;
use crate::config::{Config, TenancyMode};
use crate::decode::{Message, RelationCache, RelationId};
use crate::lsn::{CommitLsn, Lsn};
use crate::registry::{Move, MoveState, Registry};
use crate::route::Router;
use crate::source::{ReplicationStream, SourceEvent, StreamSettings};
use crate::sql::{quote_ident, QualifiedName};
use crate::tenant::{TargetId, TenantId};

/// The reverse slot (and publication, of the same name) that every cut-over move onto
/// `target` shares: one walsender decodes the target's WAL however many tenants were moved
/// there. The target's name made fit for a slot name, and a hash of the source database,
/// the registry schema and the target, so two daemons moving into one cluster do not meet.
pub fn slot_name(config: &Config, target: &TargetId) -> String {
    let readable: String = target
        .as_str()
        .chars()
        .take(24)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let key = format!(
        "{}\0{}\0{}",
        config.source.dbname, config.registry_schema, target
    );
    // FNV-1a: stable across builds, unlike the standard library's hasher.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("switchyard_rev_{readable}_{:08x}", hash as u32)
}

/// The slot of one move, as earlier versions named it (moves cut over by them keep it).
fn legacy_slot_name(move_id: i64) -> String {
    format!("switchyard_rev_{move_id}")
}

/// The key under which the source records how far a move's reverse apply got: one per
/// move, since a tenant moved to several places in turn has one position at each, and
/// positions of different clusters do not compare.
fn progress_key(mv: &Move) -> TenantId {
    if mv.reverse_slot.as_deref() == Some(legacy_slot_name(mv.id).as_str()) {
        // Recorded under the tenant before the slots were shared.
        return mv.tenant.clone();
    }
    TenantId::new(format!("move {}", mv.id)).unwrap_or_else(|_| mv.tenant.clone())
}

/// The fence key of the tenant's new location: its own, so that a target in the source's
/// own database (whose fences table is the source's) fences the two places apart.
pub fn target_key(tenant: &TenantId, target_schema: &str) -> TenantId {
    TenantId::new(format!("{tenant}@{target_schema}")).unwrap_or_else(|_| tenant.clone())
}

/// Prepares reverse replication at the target (outside the pause; idempotent): the fence
/// row (armed, before any application writes there, so every later snapshot sees it), the
/// tenant's target tables in the target's reverse publication, and the shared slot,
/// created if this is the first. The fence's triggers are not installed here: until a
/// rollback every write at the new location would pay a function call and a lock for
/// nothing; [`rollback`] installs them first ([`install_target_fence`]).
pub async fn prepare(
    target: &mut Client,
    registry_schema: &str,
    tenant: &TenantId,
    target_schema: &str,
    slot: &str,
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
    fence::arm(target, registry_schema, &key).await?;
    let names: Vec<QualifiedName> = tables.iter().map(|t| t.target.clone()).collect();
    with_slot_lock(target, slot, slot_wait, |c| {
        publish(c, slot, &names, slot_wait)
    })
    .await
}

/// Runs `work` holding the slot's lock at the target: publication and slot change one
/// holder at a time (attempts of several tenants, and a release that may drop the slot).
/// A session lock, since creating a slot needs a transaction of its own.
async fn with_slot_lock<'c, F, Fut>(
    target: &'c Client,
    slot: &str,
    wait: Duration,
    work: F,
) -> Result<(), ClusterError>
where
    F: FnOnce(&'c Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), ClusterError>>,
{
    const LOCK: &str = "hashtext('switchyard.reverse'), hashtext($1)";
    // Bounded by lock_timeout (55P03 when it runs out), the session's own value restored.
    let before: String = target
        .query_one(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', $1, false)",
            &[&format!(
                "{}ms",
                (wait + Duration::from_secs(5)).as_millis()
            )],
        )
        .await
        .map_err(ClusterError::sql("locking the reverse slot"))?
        .get(0);
    let locked = target
        .execute(&format!("SELECT pg_advisory_lock({LOCK})"), &[&slot])
        .await
        .map_err(ClusterError::sql(
            "locking the reverse slot (another session is changing it)",
        ));
    let restored = target
        .execute("SELECT set_config('lock_timeout', $1, false)", &[&before])
        .await
        .map_err(ClusterError::sql("locking the reverse slot"));
    locked?;
    restored?;
    let result = work(target).await;
    let unlocked = target
        .execute(&format!("SELECT pg_advisory_unlock({LOCK})"), &[&slot])
        .await
        .map_err(ClusterError::sql("unlocking the reverse slot"));
    result.and(unlocked.map(|_| ()))
}

/// Adds `tables` to the publication `slot` (creating it), then creates the slot if it is
/// not there. The publication comes first: a slot decoding from before its publication
/// existed would fail.
async fn publish(
    target: &Client,
    slot: &str,
    tables: &[QualifiedName],
    slot_wait: Duration,
) -> Result<(), ClusterError> {
    let sql = ClusterError::sql;
    // Never empty: an empty list would make the publication one of every table.
    if !tables.is_empty() {
        crate::source::slot::ensure_publication(target, slot, tables).await?;
    }
    let has_slot: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(sql("looking for the reverse slot"))?
        .get(0);
    if has_slot {
        return Ok(());
    }
    // A new slot waits for the transactions running at the target to end: bounded, so a
    // long transaction there delays the cutover instead of hanging it.
    target
        .batch_execute(&format!(
            "BEGIN; SET LOCAL statement_timeout = '{}ms'",
            slot_wait.as_millis().max(1)
        ))
        .await
        .map_err(sql("creating the reverse slot"))?;
    let created = target
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await;
    let end = if created.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = target.batch_execute(end).await;
    created.map_err(sql(
        "creating the reverse slot (it waits for the target's open transactions)",
    ))?;
    ended.map_err(sql("creating the reverse slot"))?;
    Ok(())
}

/// Takes the tables of `schema` out of the reverse publication `slot` (its move was rolled
/// back, cleaned up, or ended without a cutover); the slot and the publication go with the
/// last tables, so a target with no cut-over move keeps no WAL for one. The slot may still
/// be in use by a reverse stream that is stopping: retried for a while.
pub async fn release(target: &Client, slot: &str, schema: &str) -> Result<(), ClusterError> {
    with_slot_lock(target, slot, Duration::from_secs(30), |c| {
        unpublish(c, slot, schema)
    })
    .await
}

async fn unpublish(target: &Client, slot: &str, schema: &str) -> Result<(), ClusterError> {
    let sql = ClusterError::sql;
    let mine: Vec<String> = target
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables \
              WHERE pubname = $1 AND schemaname = $2",
            &[&slot, &schema],
        )
        .await
        .map_err(sql("reading the reverse publication"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !mine.is_empty() {
        target
            .batch_execute(&format!(
                "ALTER PUBLICATION {} DROP TABLE {}",
                quote_ident(slot),
                mine.join(", ")
            ))
            .await
            .map_err(sql(
                "taking the tenant's tables out of the reverse publication",
            ))?;
    }
    let left: i64 = target
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1",
            &[&slot],
        )
        .await
        .map_err(sql("reading the reverse publication"))?
        .get(0);
    if left > 0 {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match crate::source::slot::drop_slot(target, slot).await {
            Ok(_) => break,
            Err(e) if e.sqlstate() == Some("55006") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
    target
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(slot)))
        .await
        .map_err(sql("dropping the reverse publication"))?;
    Ok(())
}

/// What an attempt left for a move that ended without a cutover (failed, paused or
/// cancelled, by the daemon or through SQL): the source's armed fence (its writers would
/// take the tenant's lock for ever), and at the target its tables in the reverse
/// publication (the slot too, if they were the last) and the target's armed fence. A fence
/// or the tables are released only while no other move of the tenant is under way (a newer
/// move may have armed it, or be cut over into the same schema).
pub async fn release_leftovers(config: &Config, mv: &Move) -> Result<(), Error> {
    let registry = Registry::new(config.registry_schema.clone())?;
    let source = config.source.connect_sql().await?;
    let active = registry.active_for(&source, &mv.tenant).await?;
    let busy = active.is_some_and(|a| a.id != mv.id || a.state.consumes_stream());
    if busy {
        return Ok(());
    }
    fence::disarm(&source, &config.registry_schema, &mv.tenant).await?;
    // A target no longer configured cannot be reached; nothing to do there.
    let Ok(endpoint) = crate::layout::target_endpoint(config, &mv.target) else {
        return Ok(());
    };
    let target = endpoint.connect_sql().await?;
    release(&target, &slot_name(config, &mv.target), &mv.target_schema).await?;
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
    Ok(())
}

/// What a rollback asks the reverse stream.
#[derive(Debug)]
pub(crate) struct MarkerWait {
    pub token: u64,
    pub reply: oneshot::Sender<()>,
}

/// The cutover attempts under way, as reverse streams need them: "this schema holds no
/// cut-over tenant", read from the registry, lasts only while no attempt into it runs and
/// none started since (its flip may make it one). Shared between the daemon, which starts
/// and ends attempts, and the streams.
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    running: HashSet<(TargetId, String)>,
    generation: u64,
}

pub(crate) type SharedAttempts = Arc<Mutex<Attempts>>;

impl Attempts {
    /// An attempt into `schema` of `target` starts (before anything of it runs).
    pub fn started(&mut self, target: &TargetId, schema: &str) {
        self.generation += 1;
        self.running.insert((target.clone(), schema.to_owned()));
    }

    /// The attempt ended (its outcome is known).
    pub fn ended(&mut self, target: &TargetId, schema: &str) {
        self.running.remove(&(target.clone(), schema.to_owned()));
    }

    /// A stamp under which a "not a cut-over tenant's" verdict on `schema` holds, or none
    /// while an attempt into it runs.
    fn stamp(&self, target: &TargetId, schema: &str) -> Option<u64> {
        (!self.running.contains(&(target.clone(), schema.to_owned()))).then_some(self.generation)
    }
}

fn stamp(attempts: &SharedAttempts, target: &TargetId, schema: &str) -> Option<u64> {
    attempts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stamp(target, schema)
}

/// The reverse stream of one target's shared slot: every move cut over onto the target
/// with this slot is a member.
pub(crate) struct Reverse {
    pub slot: String,
    pub target: TargetId,
}

/// A cut-over move on a reverse stream: its target schema's changes go back to the source.
struct Member {
    move_id: i64,
    tenant: TenantId,
    progress: TenantId,
    /// Transactions ending at or before it are the move's own writes.
    from: Lsn,
    /// Target table → source table.
    tables: Vec<FencedTable>,
}

/// Applies the target's changes of the member tenants to the source until `stop`
/// resolves or the stream fails (the caller restarts it; the progress rows make that
/// exact).
pub(crate) async fn run(
    config: Config,
    rev: Reverse,
    attempts: SharedAttempts,
    mut waits: mpsc::UnboundedReceiver<MarkerWait>,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), Error> {
    let endpoint = crate::layout::target_endpoint(&config, &rev.target)?.clone();
    let (writer, replica) = source_writer(&config).await?;
    let registry_client = config.source.connect_sql().await?;
    let mut stream = reverse_stream(&config, &rev, endpoint).await?;
    let mut apply = ReverseApply {
        config: &config,
        rev: &rev,
        attempts,
        registry: Registry::new(config.registry_schema.clone())?,
        registry_client,
        members: HashMap::new(),
        router: schema_router(&config),
        not_members: HashMap::new(),
        writer,
        replica,
        bypass: None,
        relations: RelationCache::new(),
        works: Vec::new(),
        pending: Vec::new(),
    };
    apply.refresh().await?;
    tracing::info!(slot = %rev.slot, members = apply.members.len(), "reverse replication running");
    let result = loop {
        let ev = tokio::select! {
            biased;
            _ = &mut stop => break Ok(()),
            Some(w) = waits.recv() => { apply.pending.push(w); continue; }
            ev = stream.recv() => ev,
        };
        let message = match ev {
            Ok(Some(SourceEvent::Message(r))) => r.message,
            Ok(Some(SourceEvent::Restarted { .. })) => {
                apply.works.clear();
                continue;
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(Error::from(e)),
        };
        if let Err(e) = apply.message(&message, &stream).await {
            break Err(e);
        }
    };
    stream.shutdown().await;
    result
}

/// The source's end of the reverse apply: a session whose writes of member tenants pass
/// the source's fence (as the replica role, else the bypass setting naming one tenant at a
/// time), and whether it got the replica role.
async fn source_writer(config: &Config) -> Result<(TargetWriter, bool), Error> {
    let source = config.source.connect_sql().await?;
    let mut writer = TargetWriter::with_client(
        TargetId::new("source").expect("\"source\" is a valid target name"),
        source,
        &crate::registry::reverse_progress_schema(&config.registry_schema),
    )
    .await?;
    let replica = writer.use_replica_role().await.unwrap_or(false);
    Ok((writer, replica))
}

/// The target's changes from the shared reverse slot and publication (prepared at the
/// cutovers), confirmed as the source commits them.
async fn reverse_stream(
    config: &Config,
    rev: &Reverse,
    endpoint: crate::cluster::Endpoint,
) -> Result<ReplicationStream, Error> {
    let mut replication = config.replication.clone();
    replication.slot = rev.slot.clone();
    replication.publication = rev.slot.clone();
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

/// Routes by schema: every table at the target is one tenant's.
fn schema_router(config: &Config) -> Router {
    Router::new(crate::config::Tenancy {
        mode: TenancyMode::Schema,
        ..config.tenancy.clone()
    })
}

/// The reverse apply between two messages of the stream: the members, the target
/// transaction being gathered, and the rollbacks waiting for their marker.
struct ReverseApply<'a> {
    config: &'a Config,
    rev: &'a Reverse,
    attempts: SharedAttempts,
    registry: Registry,
    registry_client: Client,
    /// By target schema.
    members: HashMap<String, Member>,
    /// Routes the members' schemas (every table at the target is one tenant's).
    router: Router,
    /// Schemas found to hold no member, with the attempts' stamp it holds under.
    not_members: HashMap<String, u64>,
    writer: TargetWriter,
    replica: bool,
    /// The tenant the session's bypass setting names (without the replica role).
    bypass: Option<TenantId>,
    relations: RelationCache,
    /// The transaction being gathered: (target schema, work).
    works: Vec<(String, Work)>,
    pending: Vec<MarkerWait>,
}

impl ReverseApply<'_> {
    /// Reads the members from the registry: the moves cut over onto this slot's target
    /// with this slot. Known members keep their tables.
    async fn refresh(&mut self) -> Result<(), Error> {
        let moves = self.registry.list(&self.registry_client).await?;
        let mut members = HashMap::new();
        for mv in moves.iter().filter(|m| {
            m.state == MoveState::CutOver
                && m.target == self.rev.target
                && m.reverse_slot.as_deref() == Some(self.rev.slot.as_str())
        }) {
            let Some(from) = mv.reverse_from else {
                continue;
            };
            let known = self
                .members
                .remove(&mv.target_schema)
                .filter(|m| m.move_id == mv.id);
            let tables = match known {
                Some(m) => m.tables,
                None => {
                    crate::layout::tenant_layout(self.config, &self.registry_client, mv, &moves)
                        .await?
                        .into_iter()
                        .map(|(chunk, target)| FencedTable { chunk, target })
                        .collect()
                }
            };
            members.insert(
                mv.target_schema.clone(),
                Member {
                    move_id: mv.id,
                    tenant: mv.tenant.clone(),
                    progress: progress_key(mv),
                    from,
                    tables,
                },
            );
        }
        let mut router = schema_router(self.config);
        for schema in members.keys() {
            let id = TenantId::new(schema.clone()).map_err(|e| Error::BadTargetSchema {
                schema: schema.clone(),
                reason: e.to_string(),
            })?;
            router.start(
                id,
                crate::route::Destination {
                    target: self.rev.target.clone(),
                    schema: schema.clone(),
                },
            );
        }
        self.members = members;
        self.router = router;
        Ok(())
    }

    /// Whether `schema` is a member's, reading the registry again unless a verdict that
    /// it is not still holds. A cut-over's flip commits before any application write at
    /// the target, and a change is read only after its commit: a registry read made now
    /// sees the flip of any change that is an application's.
    async fn is_member(&mut self, schema: &str) -> Result<bool, Error> {
        if self.members.contains_key(schema) {
            return Ok(true);
        }
        if let Some(at) = self.not_members.get(schema) {
            if stamp(&self.attempts, &self.rev.target, schema) == Some(*at) {
                return Ok(false);
            }
        }
        let before = stamp(&self.attempts, &self.rev.target, schema);
        // One narrow question first: the full read (and the tables' layout) only when the
        // answer is yes.
        let cut_over: bool = self
            .registry_client
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE target = $1 AND target_schema = $2 \
                       AND state = 'cut_over' AND reverse_slot = $3)",
                    self.registry.table("moves")
                ),
                &[&self.rev.target.as_str(), &schema, &self.rev.slot],
            )
            .await
            .map_err(ClusterError::sql("looking for a cut-over move"))?
            .get(0);
        if cut_over {
            self.refresh().await?;
        }
        if self.members.contains_key(schema) {
            self.not_members.remove(schema);
            return Ok(true);
        }
        match (before, stamp(&self.attempts, &self.rev.target, schema)) {
            (Some(b), Some(a)) if a == b => {
                self.not_members.insert(schema.to_owned(), b);
            }
            _ => {
                self.not_members.remove(schema);
            }
        }
        Ok(false)
    }

    /// One decoded message: rows are gathered per transaction and written to the source
    /// at its commit; a marker between transactions answers the rollback waiting for it.
    async fn message(
        &mut self,
        message: &Message,
        stream: &ReplicationStream,
    ) -> Result<(), Error> {
        match message {
            Message::Begin(_) => {
                self.works.clear();
            }
            Message::Relation(rel) => {
                self.relations.apply(rel.clone());
            }
            Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_) => {
                self.rows(message).await?;
            }
            Message::Commit(c) => {
                let end = c.end();
                let works = std::mem::take(&mut self.works);
                self.commit(end, works).await?;
                stream.mark_applied(end);
            }
            Message::Message(m) if m.prefix == MARKER_PREFIX => {
                // Everything before the marker's transaction is applied (commits are
                // applied in order, before the next message is read).
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
    /// moved from (schemas of no member, and tables a member does not know, are skipped).
    async fn rows(&mut self, message: &Message) -> Result<(), Error> {
        let ids: Vec<RelationId> = match message {
            Message::Insert(i) => vec![i.relation],
            Message::Update(u) => vec![u.relation],
            Message::Delete(d) => vec![d.relation],
            Message::Truncate(t) => t.relations.clone(),
            _ => Vec::new(),
        };
        for id in ids {
            let schema = self
                .relations
                .resolve(id)
                .map_err(crate::route::RouteError::from)?
                .namespace
                .clone();
            if !self.is_member(&schema).await? {
                return Ok(());
            }
        }
        let routed = self.router.message(&self.relations, message)?;
        for (rel, ops) in routed {
            let Some(member) = self.members.get(&rel.namespace) else {
                continue;
            };
            let Some(t) = member
                .tables
                .iter()
                .find(|t| t.target.schema == rel.namespace && t.target.name == rel.name)
            else {
                continue;
            };
            let identity: Vec<bool> = rel.columns.iter().map(|c| c.is_key()).collect();
            for op in ops {
                self.works.push((
                    rel.namespace.clone(),
                    Work::Row(RowChange::new(
                        t.chunk.source.clone(),
                        identity.clone(),
                        t.chunk.tenant.as_ref().map(|c| c.0.clone()),
                        OwnedRowOp::from_op(&op.op),
                    )),
                ));
            }
        }
        Ok(())
    }

    /// Writes a target transaction's changes to the source: each member's part unless it
    /// is the move's own write (ending at or before its `from`); under the replica role in
    /// one source transaction, else one per tenant with the bypass naming it.
    async fn commit(&mut self, end: CommitLsn, works: Vec<(String, Work)>) -> Result<(), Error> {
        let mut parts: Vec<(TenantId, TenantId, Vec<Work>)> = Vec::new();
        for (schema, work) in works {
            let Some(m) = self.members.get(&schema) else {
                continue;
            };
            if end.lsn() <= m.from {
                continue;
            }
            match parts.iter_mut().find(|p| p.0 == m.progress) {
                Some(p) => p.2.push(work),
                None => parts.push((m.progress.clone(), m.tenant.clone(), vec![work])),
            }
        }
        if parts.is_empty() {
            return Ok(());
        }
        if self.replica {
            let txn = SourceTxn {
                end,
                parts: parts.into_iter().map(|(p, _, w)| (p, w)).collect(),
                states: Vec::new(),
            };
            self.writer
                .commit(std::slice::from_ref(&txn))
                .await
                .map_err(Error::Apply)?;
            return Ok(());
        }
        for (progress, tenant, work) in parts {
            if self.bypass.as_ref() != Some(&tenant) {
                self.writer
                    .set_session(fence::BYPASS_SETTING, tenant.as_str())
                    .await
                    .map_err(Error::Apply)?;
                self.bypass = Some(tenant);
            }
            let txn = SourceTxn {
                end,
                parts: vec![(progress, work)],
                states: Vec::new(),
            };
            self.writer
                .commit(std::slice::from_ref(&txn))
                .await
                .map_err(Error::Apply)?;
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
    if let Err(e) = install_target_fence(&mut target, cfg, &key, &job.tables).await {
        return if super::over_budget(&e) {
            Ok(Outcome::Aborted {
                step: Step::Arm,
                reason: format!("waited on a lock held by another session: {e}"),
                pause: None,
            })
        } else {
            Err(e.into())
        };
    }
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
    if let Some(aborted) = catch_up(job, &flusher, &clock, &pause).await? {
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

/// Installs the fence's triggers on the tenant's target tables (before the pause;
/// idempotent). Its row was armed at the cutover, before any application wrote there, so
/// every snapshot that writes now sees it. Creating a trigger waits for the table's open
/// writers: once every table has it, each open transaction that wrote the tenant at the
/// target did so through the trigger and holds the tenant's shared lock, which the
/// rollback's exclusive lock then waits for.
async fn install_target_fence(
    target: &mut Client,
    cfg: &Config,
    key: &TenantId,
    tables: &[FencedTable],
) -> Result<(), ClusterError> {
    for t in tables {
        fence::install(
            target,
            &cfg.registry_schema,
            &t.target,
            &TenantOf::Whole(key.clone()),
            Duration::from_millis(500),
            Duration::from_secs(30),
        )
        .await?;
    }
    Ok(())
}

/// Inside the pause: waits until the reverse stream applied, at the source, everything
/// the tenant committed at the target before the marker. `Some` ends the attempt.
async fn catch_up(
    job: &RollbackJob,
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
    let wait = match super::mark_in_budget(flusher, job.token, clock, pause).await? {
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

    fn config() -> Config {
        let text = "[source]\nuser = \"u\"\ndbname = \"app\"\n";
        Config::from_toml(
            text,
            std::path::Path::new("t.toml"),
            &crate::config::ProcessEnv,
        )
        .unwrap()
    }

    #[test]
    fn one_slot_name_per_target_fit_for_a_slot() {
        let config = config();
        let a = slot_name(&config, &TargetId::new("shard2").unwrap());
        assert!(a.starts_with("switchyard_rev_shard2_"), "{a}");
        assert_eq!(a, slot_name(&config, &TargetId::new("shard2").unwrap()));
        assert_ne!(a, slot_name(&config, &TargetId::new("shard3").unwrap()));
        // Any target name gives a valid slot name: lower case, digits, underscores, ≤ 63.
        let long = TargetId::new("Shard-With-A-Very-Long-Name-Beyond-Limits").unwrap();
        for name in [a, slot_name(&config, &long)] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
        }
        // Another source database or registry: another slot at the same target.
        let mut other = config.clone();
        other.registry_schema = "switchyard_b".into();
        assert_ne!(
            slot_name(&config, &TargetId::new("shard2").unwrap()),
            slot_name(&other, &TargetId::new("shard2").unwrap())
        );
    }

    #[test]
    fn progress_is_kept_per_move_but_where_a_move_had_its_own_slot() {
        let mut mv = Move::sample(7, "acme", MoveState::CutOver);
        mv.reverse_slot = Some("switchyard_rev_shard2_0000abcd".into());
        assert_eq!(progress_key(&mv).as_str(), "move 7");
        mv.reverse_slot = Some(legacy_slot_name(7));
        assert_eq!(progress_key(&mv).as_str(), "acme");
        let t = TenantId::new("acme").unwrap();
        assert_eq!(target_key(&t, "shard_acme").as_str(), "acme@shard_acme");
        assert_eq!(
            crate::registry::reverse_progress_schema("switchyard"),
            "switchyard_rollback"
        );
    }

    #[test]
    fn a_verdict_of_no_member_holds_only_while_no_attempt_into_the_schema_started() {
        let shard = TargetId::new("shard2").unwrap();
        let mut a = Attempts::default();
        let before = a.stamp(&shard, "t1");
        assert!(before.is_some());
        // Another schema's attempt also ends the verdict (one generation for all): safe.
        a.started(&shard, "t1");
        assert_eq!(a.stamp(&shard, "t1"), None, "while it runs: no verdict");
        assert!(a.stamp(&shard, "t2").is_some());
        a.ended(&shard, "t1");
        let after = a.stamp(&shard, "t1");
        assert!(after.is_some());
        assert_ne!(before, after, "a verdict taken before the attempt is stale");
        // The same schema at another target is another place.
        a.started(&TargetId::new("shard3").unwrap(), "t1");
        assert!(a.stamp(&shard, "t1").is_some());
    }
}
