//! Getting a tenant ready to move: which tables are its, provisioning them on the target,
//! and where its copy stands (fresh, resumed, or reset after a failure).
//!
//! Invariants:
//! - The target's progress row is the truth about what it holds. A tenant with a RocksDB
//!   record for this move resumes from the target's row; one without (a new move, or one
//!   resumed after it failed and released the slot) starts over: rows switchyard wrote
//!   earlier are removed in the same transaction as their progress row.
//! - A fresh move never writes into target tables that already hold rows of the tenant.
//! - Only tables of the publication are moved, never the registry's or a target schema's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio_postgres::Client;

use super::error::{Error, ErrorClass, MoveError};
use super::moving::{Tenant, TenantRecord};
use crate::apply::progress::{
    ensure_progress_table, forget_progress, read_resume_progress, Progress,
};
use crate::backfill::chunk::ChunkTable;
use crate::backfill::table::{CopyState, TableMove};
use crate::checkpoint::SlotGap;
use crate::cluster::ClusterError;
use crate::config::Config;
use crate::layout::{layouts, placement, tenant_tables, warn_unordered};
use crate::lsn::Lsn;
use crate::provision::{self, Placement, TableDef};
use crate::registry::Move;
use crate::route::Destination;
use crate::sql::{quote_ident, QualifiedName};
use crate::tenant::TenantId;

/// What the pipeline remembers of a tenant from before a restart.
#[derive(Clone)]
pub(crate) struct Remembered {
    pub record: Option<TenantRecord>,
    pub applied: Lsn,
    /// Changes the move missed because the slot was moved under it (see
    /// `check_slot_position`).
    pub gap: Option<SlotGap>,
}

/// A setup's result, for the daemon's loop.
pub(crate) type SetupResult = (Move, Result<Tenant, Error>);

/// Sets up a move picked up from the registry (new, or resumed after a failure: it starts
/// over), in its own task; the result arrives on `results`. At most as many run at once as
/// `slots` has permits.
pub(crate) fn spawn(
    config: Config,
    mv: Move,
    excluded: BTreeSet<String>,
    slots: Arc<Semaphore>,
    results: mpsc::UnboundedSender<SetupResult>,
) {
    tokio::spawn(async move {
        // The move shows `provisioning` while it waits: the registry says what the operator
        // asked for is under way, and the wait is bounded by the setups ahead of it (a few
        // seconds each at most). The semaphore is never closed; if it were, the setup runs
        // unbounded rather than leaving the move stuck.
        let _permit = slots.acquire_owned().await.ok();
        let remembered = Remembered {
            record: None,
            applied: Lsn::INVALID,
            gap: None,
        };
        let r = prepare(&config, &mv, remembered, &excluded).await;
        let _ = results.send((mv, r));
    });
}

/// Prepares every tenant that was moving before a restart, a few at once; results come in
/// the order given. A transient failure is retried for up to a minute.
pub(crate) async fn resume_all(
    config: &Config,
    resuming: Vec<(Move, Remembered)>,
    excluded: &BTreeSet<String>,
) -> Vec<SetupResult> {
    use futures_util::StreamExt;
    // Each tenant's setup is a few round trips on connections of its own (~70 ms on a local
    // cluster): one after the other, fifty tenants kept the stream waiting for seconds
    // after every restart. Bounded, so that a restart does not open a burst of connections
    // on the source and the targets.
    futures_util::stream::iter(resuming)
        .map(|(mv, remembered)| async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let result = loop {
                match prepare(config, &mv, remembered.clone(), excluded).await {
                    Err(e)
                        if e.classify() == ErrorClass::Transient && Instant::now() < deadline =>
                    {
                        tracing::warn!(tenant = %mv.tenant, error = %e, "cannot resume yet; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    other => break other,
                }
            };
            (mv, result)
        })
        .buffered(config.moves.setup_concurrency)
        .collect()
        .await
}

/// Removes what an earlier attempt of this tenant's move wrote, with its progress row, in
/// one transaction.
async fn reset(
    target: &mut Client,
    schema: &str,
    tenant: &TenantId,
    tables: &[(QualifiedName, Option<String>)],
) -> Result<(), Error> {
    let tx = target
        .transaction()
        .await
        .map_err(ClusterError::sql("starting a reset"))?;
    let mut whole = Vec::new();
    for (t, tenant_col) in tables {
        match tenant_col {
            Some(col) => {
                tx.execute(
                    &format!(
                        "DELETE FROM {} WHERE {}::text = $1",
                        t.quoted(),
                        quote_ident(col)
                    ),
                    &[&tenant.as_str()],
                )
                .await
                .map_err(ClusterError::sql(format!("removing earlier rows from {t}")))?;
            }
            None => whole.push(t.quoted()),
        }
    }
    if !whole.is_empty() {
        // One statement: tables that reference each other can only be truncated together.
        let list = whole.join(", ");
        tx.batch_execute(&format!("TRUNCATE {list}"))
            .await
            .map_err(ClusterError::sql(format!("emptying {list}")))?;
    }
    forget_progress(&tx, schema, tenant).await?;
    tx.commit()
        .await
        .map_err(ClusterError::sql("committing a reset"))?;
    Ok(())
}

/// The source's half of a setup: the tenant's tables and how each is copied and routed.
async fn source_side(
    config: &Config,
    mv: &Move,
    excluded_schemas: &BTreeSet<String>,
) -> Result<(Client, Vec<TableDef>, Vec<ChunkTable>), Error> {
    let source = config.source.connect_sql().await?;
    let defs = tenant_tables(config, &source, &mv.tenant, excluded_schemas).await?;
    let chunks = layouts(config, &source, &defs).await?;
    Ok((source, defs, chunks))
}

/// The target's half of a setup that needs nothing from the source: the connection, the
/// progress tables, and what they say of the tenant.
async fn target_side(config: &Config, mv: &Move) -> Result<(Client, Option<Progress>), Error> {
    let endpoint = crate::layout::target_endpoint(config, &mv.target)?;
    let target = endpoint.connect_sql().await?;
    // The reset below deletes children and parents in table order, as apply does.
    crate::apply::writer::replica_role(&target).await?;
    ensure_progress_table(&target, &config.registry_schema).await?;
    let progress = read_resume_progress(&target, &config.registry_schema)
        .await?
        .remove(&mv.tenant);
    Ok((target, progress))
}

/// `work`'s output and how long it took.
async fn timed<T>(work: impl std::future::Future<Output = T>) -> (T, std::time::Duration) {
    let t0 = std::time::Instant::now();
    let out = work.await;
    (out, t0.elapsed())
}

/// Provisions the target and builds the tenant, resumed or fresh.
///
/// The source's catalog reads and the target's progress reads run at once, on a connection
/// each: a restart sets every moving tenant up before its changes apply, and these round
/// trips were its critical path. Reading the progress row before provisioning is safe:
/// only this tenant's applier writes it, and that starts after this returns.
pub(crate) async fn prepare(
    config: &Config,
    mv: &Move,
    remembered: Remembered,
    excluded_schemas: &BTreeSet<String>,
) -> Result<Tenant, Error> {
    // A resumed move that missed changes fails before it touches anything.
    if let (Some(record), Some(gap)) = (&remembered.record, remembered.gap) {
        if record.move_id == mv.id {
            return Err(MoveError::SlotAdvanced {
                from: gap.from,
                to: gap.to,
            }
            .into());
        }
    }
    let started = std::time::Instant::now();
    let ((source_half, source_took), (target_half, target_took)) = tokio::join!(
        timed(source_side(config, mv, excluded_schemas)),
        timed(target_side(config, mv))
    );
    let ((mut source, defs, chunks), (mut target, progress)) = (source_half?, target_half?);
    let placement = placement(config, mv, &defs);
    provision_target(config, mv, &defs, &placement, &mut target).await?;
    // Where a slow restart's time went (its tenants are set up before their changes apply).
    tracing::debug!(
        tenant = %mv.tenant,
        source_ms = source_took.as_millis() as u64,
        target_ms = target_took.as_millis() as u64,
        provisioned_ms = started.elapsed().as_millis() as u64,
        "tenant setup"
    );
    crate::failpoint::hit("setup.after_provision");

    let (tables, scoped) = table_moves(&defs, chunks, &placement);
    let ours = remembered
        .record
        .as_ref()
        .is_some_and(|r| r.move_id == mv.id);
    // The fence of the tenant's shared tables, gated for it now rather than in its first
    // cutover attempt: gating recreates a table's triggers, which waits for every open
    // writer of the table, and here that wait costs the cutover nothing. Only for a move
    // set up afresh: a resumed one was gated at its first setup (or its attempt gates it),
    // and a restart resuming many tenants would open a connection for each.
    let shared: Vec<(QualifiedName, String)> = tables
        .values()
        .filter_map(|t| {
            t.chunk
                .tenant
                .as_ref()
                .map(|(col, _)| (t.chunk.source.clone(), col.clone()))
        })
        .collect();
    if !ours && !shared.is_empty() {
        tokio::spawn(gate_early(config.clone(), mv.tenant.clone(), shared));
    }
    let mut tenant = Tenant::new(
        mv.tenant.clone(),
        mv.id,
        mv.state,
        Destination {
            target: mv.target.clone(),
            schema: mv.target_schema.clone(),
        },
        tables,
    );
    // A resumed move keeps the tables it recorded: one that appeared meanwhile was never
    // copied (its earlier changes were not followed).
    if let (true, Some(recorded)) = (ours, &mv.tables) {
        if let Some(new) = tenant
            .tables
            .keys()
            .find(|t| !recorded.contains(&t.quoted()))
        {
            return Err(MoveError::NewTable {
                table: new.quoted(),
            }
            .into());
        }
    }
    match (ours, progress) {
        // The daemon records a tenant's position only after its target reported the commit:
        // a target below that lost committed transactions, which the slot no longer has.
        (true, Some(p)) if p.lsn < remembered.applied => {
            return Err(MoveError::TargetBehind {
                target: mv.target.to_string(),
                found: p.lsn,
                recorded: remembered.applied,
            }
            .into());
        }
        (true, Some(p)) => resume(&mut tenant, mv, p)?,
        (true, None) if remembered.applied.is_valid() => {
            return Err(MoveError::LostProgress {
                target: mv.target.to_string(),
                recorded: remembered.applied,
            }
            .into());
        }
        (_, Some(_)) => {
            tracing::info!(tenant = %mv.tenant, "an earlier attempt left rows on the target; starting over");
            reset(&mut target, &config.registry_schema, &mv.tenant, &scoped).await?;
        }
        (_, None) => check_target_empty(&target, mv, &scoped).await?,
    }
    // A fresh copy reads nothing before the stream carries the tenant's changes.
    if !ours {
        super::filter::sync(config, &mut source, Some(&mv.tenant)).await?;
    }

    // A resumed tenant whose copy is done keeps the total it reported: counting a big
    // tenant's rows again would only delay the restart.
    if tenant.is_copied() && mv.rows_total.is_some() {
        tenant.rows_total = mv.rows_total;
        return Ok(tenant);
    }
    // Advice for the chunk reads still to come (a copied tenant has none).
    if !tenant.is_copied() {
        for t in tenant.tables.values() {
            warn_unordered(config, &source, &t.chunk, &mv.tenant).await;
        }
    }
    tenant.rows_total = Some(count_rows(&source, &tenant, mv).await?);
    Ok(tenant)
}

/// Gates the fence of `tables` for `tenant` (see [`crate::cutover::fence::install_gated`])
/// in the background, best effort: the cutover gates what is left.
async fn gate_early(config: Config, tenant: TenantId, tables: Vec<(QualifiedName, String)>) {
    let mut source = match config.source.connect_sql().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%tenant, error = %e, "early fence gate: no connection");
            return;
        }
    };
    for (table, column) in tables {
        let gated = crate::cutover::fence::gate(
            &mut source,
            &config.registry_schema,
            (&table, &column, &tenant),
            Duration::from_millis(200),
            Duration::from_secs(30),
        )
        .await;
        if let Err(e) = gated {
            tracing::debug!(%tenant, %table, error = %e, "early fence gate; the cutover gates it");
        }
    }
}

/// Creates at the target what it lacks of the tenant's tables, noting in the ledger what
/// it created (cancel removes only that).
async fn provision_target(
    config: &Config,
    mv: &Move,
    defs: &[TableDef],
    placement: &Placement,
    target: &mut Client,
) -> Result<(), Error> {
    let plan = provision::plan(defs, placement)?;
    for w in &plan.warnings {
        tracing::warn!(tenant = %mv.tenant, warning = %w, "provisioning");
    }
    let ledger = provision::Ledger {
        schema: &config.registry_schema,
        tenant: mv.tenant.as_str(),
    };
    let created = provision::apply(target, &plan, Some(&ledger)).await?;
    tracing::info!(tenant = %mv.tenant, target = %mv.target, created, "target provisioned");
    Ok(())
}

/// Each target table with the tenant column that scopes the tenant's rows in it (`None`:
/// the whole table is the tenant's).
type Scoped = Vec<(QualifiedName, Option<String>)>;

/// The tenant's tables as the move follows them (by source name), and where their rows go
/// at the target, for the reset and the emptiness check.
fn table_moves(
    defs: &[TableDef],
    chunks: Vec<ChunkTable>,
    placement: &Placement,
) -> (BTreeMap<QualifiedName, TableMove>, Scoped) {
    let mut tables = BTreeMap::new();
    let mut scoped = Vec::new();
    for (def, chunk) in defs.iter().zip(chunks) {
        let target_name = placement.tables[&def.name].clone();
        scoped.push((
            target_name.clone(),
            chunk.tenant.as_ref().map(|t| t.0.clone()),
        ));
        tables.insert(def.name.clone(), TableMove::new(chunk, target_name));
    }
    (tables, scoped)
}

/// A resumed move takes up where the target's progress row `p` says it stands.
fn resume(tenant: &mut Tenant, mv: &Move, p: Progress) -> Result<(), Error> {
    let state = match &p.state {
        Some(text) => Some(CopyState::parse(text).map_err(MoveError::BadState)?),
        None => None,
    };
    tenant.skip_before = p.lsn;
    tenant.applied = p.lsn;
    tenant.restore(state, p.lsn);
    tracing::info!(tenant = %mv.tenant, applied = %p.lsn, "resuming the move");
    Ok(())
}

/// A fresh move never writes into target tables that already hold rows of the tenant.
async fn check_target_empty(
    target: &Client,
    mv: &Move,
    scoped: &[(QualifiedName, Option<String>)],
) -> Result<(), Error> {
    for (t, tenant_col) in scoped {
        let sql = match tenant_col {
            Some(col) => format!(
                "SELECT EXISTS (SELECT 1 FROM {} WHERE {}::text = $1)",
                t.quoted(),
                quote_ident(col)
            ),
            None => format!(
                "SELECT EXISTS (SELECT 1 FROM {} WHERE $1::text IS NOT NULL)",
                t.quoted()
            ),
        };
        let busy: bool = target
            .query_one(&sql, &[&mv.tenant.as_str()])
            .await
            .map_err(ClusterError::sql(format!("checking that {t} is empty")))?
            .get(0);
        if busy {
            return Err(MoveError::TargetNotEmpty { table: t.quoted() }.into());
        }
    }
    Ok(())
}

/// The tenant's rows at the source, over all its tables: the total its progress is
/// reported against.
async fn count_rows(source: &Client, tenant: &Tenant, mv: &Move) -> Result<i64, Error> {
    let mut total = 0i64;
    for t in tenant.tables.values() {
        let (sql, params) = match &t.chunk.tenant {
            Some((col, ty)) => (
                format!(
                    "SELECT count(*) FROM {} WHERE {} = CAST($1::text AS {ty})",
                    t.chunk.source.quoted(),
                    quote_ident(col)
                ),
                vec![mv.tenant.as_str()],
            ),
            None => (
                format!("SELECT count(*) FROM {}", t.chunk.source.quoted()),
                Vec::new(),
            ),
        };
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let n: i64 = source
            .query_one(&sql, &refs)
            .await
            .map_err(ClusterError::sql(format!(
                "counting rows of {}",
                t.chunk.source
            )))?
            .get(0);
        total += n;
    }
    Ok(total)
}
