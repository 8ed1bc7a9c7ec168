//! What an operator asks for from the command line: verify a tenant, cut it over, clean up
//! its old location. Each reads the tenant's move from the registry and records its result
//! there, so `switchyard` commands and a running daemon see the same state.
//!
//! Invariants:
//! - `cutover` only asks (a registry flag); the daemon, which holds the stream, runs the
//!   attempts. The command waits and reports what the registry says.
//! - `cleanup` checks the move's state, its verification and its retention window first.
//! - `cancel` only before the cutover, and it never touches the source: it stops the move,
//!   lifts an armed fence, and removes what the move wrote at the target (tables that hold
//!   only the tenant's rows are dropped, others lose the tenant's rows; the target schema
//!   goes if it is left empty).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::cleanup::{self, Cleaned};
use super::CutoverError as Error;
use super::FencedTable;
use crate::cluster::ClusterError;
use crate::config::Config;
use crate::registry::{Attempt, Move, MoveState, Registry, RegistryError};
use crate::sql::{quote_ident, QualifiedName};
use crate::tenant::TenantId;
use crate::verify::{self, VerifyOptions, VerifyReport};

async fn tenant_move(
    config: &Config,
    tenant: &TenantId,
) -> Result<(Registry, tokio_postgres::Client, Move), Error> {
    let registry = Registry::new(config.registry_schema.clone())?;
    let mut client = config.source.connect_sql().await?;
    registry.install(&mut client).await?;
    let mv = registry.active(&client, tenant).await?;
    Ok((registry, client, mv))
}

async fn tables(
    config: &Config,
    registry: &Registry,
    client: &tokio_postgres::Client,
    mv: &Move,
) -> Result<Vec<FencedTable>, Error> {
    let moves = registry.list(client).await?;
    Ok(crate::layout::tenant_layout(config, client, mv, &moves)
        .await?
        .into_iter()
        .map(|(chunk, target)| FencedTable { chunk, target })
        .collect())
}

/// Compares the tenant's rows on the source and its target and records the result.
pub async fn verify_tenant(config: &Config, tenant: &TenantId) -> Result<VerifyReport, Error> {
    let (registry, source, mv) = tenant_move(config, tenant).await?;
    let endpoint = crate::layout::target_endpoint(config, &mv.target)?;
    let target = endpoint.connect_sql().await?;
    let tables = tables(config, &registry, &source, &mv).await?;
    // Before the cutover the daemon keeps the target current: its confirmed position says
    // when a different chunk is worth a second look.
    let streaming = matches!(
        mv.state,
        MoveState::Copying | MoveState::Streaming | MoveState::CuttingOver
    );
    let opts = VerifyOptions {
        slot: streaming.then(|| config.replication.slot.clone()),
        rechecks: if streaming { 5 } else { 0 },
        ..VerifyOptions::default()
    };
    let report = verify::verify(&source, &target, tenant.as_str(), &tables, &opts).await?;
    registry
        .record_verification(&source, mv.id, report.ok, &report.summary())
        .await?;
    Ok(report)
}

/// Asks the daemon to cut the tenant over and waits up to `wait` for the move to be cut
/// over (or to fail). Returns the move as it stands and its attempts so far.
pub async fn cutover_tenant(
    config: &Config,
    tenant: &TenantId,
    wait: Duration,
) -> Result<(Move, Vec<Attempt>), Error> {
    let (registry, client, _) = tenant_move(config, tenant).await?;
    let mv = registry.request_cutover(&client, tenant).await?;
    let deadline = Instant::now() + wait;
    let mut mv = mv;
    while Instant::now() < deadline
        && !matches!(
            mv.state,
            MoveState::CutOver | MoveState::Failed | MoveState::Paused
        )
        && !mv.state.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        mv = registry.get(&client, mv.id).await?;
    }
    let attempts = settled_attempts(&registry, &client, &mv).await?;
    Ok((mv, attempts))
}

/// Asks the daemon to roll the tenant's cutover back (reverse replication has kept the old
/// location current) and waits up to `wait` for it. Returns the move and its attempts.
pub async fn rollback_tenant(
    config: &Config,
    tenant: &TenantId,
    wait: Duration,
) -> Result<(Move, Vec<Attempt>), Error> {
    let (registry, client, _) = tenant_move(config, tenant).await?;
    let mut mv = registry.request_rollback(&client, tenant).await?;
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline && mv.state == MoveState::CutOver {
        tokio::time::sleep(Duration::from_millis(100)).await;
        mv = registry.get(&client, mv.id).await?;
    }
    let attempts = settled_attempts(&registry, &client, &mv).await?;
    Ok((mv, attempts))
}

/// The move's attempts, including the one that settled its state: the attempt's task
/// records it just after the commit that changed the state, so a reader that saw the state
/// first waits a moment for it (at most `ATTEMPT_RECORD_GRACE`; a record that failed is
/// only logged by the daemon).
async fn settled_attempts(
    registry: &Registry,
    client: &tokio_postgres::Client,
    mv: &Move,
) -> Result<Vec<Attempt>, Error> {
    let settled_by = match mv.state {
        MoveState::CutOver => Some("cut_over"),
        MoveState::RolledBack => Some("rolled_back"),
        _ => None,
    };
    let deadline = Instant::now() + ATTEMPT_RECORD_GRACE;
    loop {
        let attempts = registry.attempts(client, mv.id).await?;
        let recorded = settled_by.is_none_or(|r| attempts.iter().any(|a| a.result == r));
        if recorded || Instant::now() >= deadline {
            return Ok(attempts);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a reader waits for the attempt record behind a state it already sees.
const ATTEMPT_RECORD_GRACE: Duration = Duration::from_secs(5);

/// What `cancel` removed at the target.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Cancelled {
    pub tables_dropped: Vec<String>,
    /// Target tables that were there before the move: kept (only rows the move wrote left).
    pub tables_kept: Vec<String>,
    pub rows_deleted: i64,
    pub schema_dropped: Option<String>,
}

/// Cancels the tenant's move (before its cutover) and removes what it wrote at the target.
pub async fn cancel_tenant(config: &Config, tenant: &TenantId) -> Result<Cancelled, Error> {
    let (registry, client, mv) = tenant_move(config, tenant).await?;
    let tables = tables(config, &registry, &client, &mv).await?;
    registry
        .transition(
            &client,
            mv.id,
            mv.state,
            MoveState::Cancelled,
            Some("cancelled by an operator"),
        )
        .await?;
    super::fence::disarm(&client, &config.registry_schema, tenant).await?;
    let endpoint = crate::layout::target_endpoint(config, &mv.target)?;
    let mut target = endpoint.connect_sql().await?;
    // An aborted cutover attempt may have prepared reverse replication: its slot would
    // keep WAL at the target for nothing.
    super::reverse::release(
        &target,
        &super::reverse::slot_name(config, &mv.target),
        &mv.target_schema,
    )
    .await?;
    // The daemon stops applying the tenant within a registry poll; an apply batch still
    // running holds its tables, so the removal waits for it (bounded, retried).
    let deadline = Instant::now() + Duration::from_secs(30) + config.moves.registry_poll * 4;
    loop {
        match remove_target(&mut target, config, tenant, &mv, &tables).await {
            Err(Error::Cluster(e))
                if e.sqlstate() == Some("55P03") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// One attempt at removing what the move wrote at the target: the tables and rows in one
/// transaction (under a short lock_timeout, so the caller can retry while an apply batch
/// still holds them), then the target schema if that left it empty.
async fn remove_target(
    target: &mut tokio_postgres::Client,
    config: &Config,
    tenant: &TenantId,
    mv: &Move,
    tables: &[FencedTable],
) -> Result<Cancelled, Error> {
    let mut out = Cancelled::default();
    let tx = target
        .transaction()
        .await
        .map_err(ClusterError::sql("starting the removal"))?;
    tx.batch_execute("SET LOCAL lock_timeout = '2s'")
        .await
        .map_err(ClusterError::sql("starting the removal"))?;
    // Only what the move created is dropped; a table that was there before loses only rows
    // the move wrote (the tenant's rows of a shared table, once the move wrote anything).
    let ledger = crate::provision::Ledger::table(&config.registry_schema);
    let written = Written::read(&tx, config, tenant, &ledger).await?;
    let mut drop = Vec::new();
    for t in tables {
        if let Some(t) = remove_table(&tx, tenant, t, &written, &mut out).await? {
            drop.push(t);
        }
    }
    if !drop.is_empty() {
        let list: Vec<String> = drop.iter().map(|t| t.quoted()).collect();
        // One statement: tables that reference each other go together.
        tx.batch_execute(&format!("DROP TABLE {}", list.join(", ")))
            .await
            .map_err(ClusterError::sql("dropping the target tables"))?;
        out.tables_dropped = drop.iter().map(|t| t.to_string()).collect();
    }
    crate::apply::progress::forget_progress(&tx, &config.registry_schema, tenant).await?;
    if !written.created.is_empty() {
        tx.execute(
            &format!("DELETE FROM {ledger} WHERE tenant = $1"),
            &[&tenant.as_str()],
        )
        .await
        .map_err(ClusterError::sql("forgetting the created tables"))?;
    }
    tx.commit()
        .await
        .map_err(ClusterError::sql("committing the removal"))?;
    let schema = &mv.target_schema;
    if schema != "public" && schema != &config.registry_schema {
        // RESTRICT: a schema that holds anything else stays.
        if target
            .batch_execute(&format!("DROP SCHEMA {}", quote_ident(schema)))
            .await
            .is_ok()
        {
            out.schema_dropped = Some(schema.clone());
        }
    }
    Ok(out)
}

/// What the move left at the target, as the target's own records say: which tables it
/// created (the provisioning ledger) and whether it wrote rows at all (its progress row).
struct Written {
    /// Quoted names of the target tables the move created.
    created: BTreeSet<String>,
    wrote: bool,
}

impl Written {
    /// Reads both records inside the removal's transaction; a target where switchyard
    /// never created them has neither.
    async fn read(
        tx: &tokio_postgres::Transaction<'_>,
        config: &Config,
        tenant: &TenantId,
        ledger: &str,
    ) -> Result<Written, ClusterError> {
        let progress = crate::apply::progress::progress_table(&config.registry_schema);
        let mut created = BTreeSet::new();
        if switchyard_table_exists(tx, ledger.to_owned()).await? {
            created = tx
                .query(
                    &format!("SELECT relation FROM {ledger} WHERE tenant = $1"),
                    &[&tenant.as_str()],
                )
                .await
                .map_err(ClusterError::sql("reading which tables the move created"))?
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect();
        }
        let wrote = switchyard_table_exists(tx, progress.clone()).await?
            && tx
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM {progress} WHERE tenant = $1)"),
                    &[&tenant.as_str()],
                )
                .await
                .map_err(ClusterError::sql(
                    "reading whether the move wrote at the target",
                ))?
                .get::<_, bool>(0);
        Ok(Written { created, wrote })
    }
}

/// Whether one of switchyard's own tables (`name`, quoted) exists at the target.
async fn switchyard_table_exists(
    tx: &tokio_postgres::Transaction<'_>,
    name: String,
) -> Result<bool, ClusterError> {
    tx.query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&name])
        .await
        .map(|r| r.get::<_, bool>(0))
        .map_err(ClusterError::sql(
            "looking for switchyard's tables at the target",
        ))
}

/// Removes what the move wrote into one target table, noting it in `out`. Returns the
/// table when it is to be dropped whole (all at once, by the caller).
async fn remove_table(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &TenantId,
    t: &FencedTable,
    written: &Written,
    out: &mut Cancelled,
) -> Result<Option<QualifiedName>, ClusterError> {
    let exists: bool = tx
        .query_one(
            "SELECT to_regclass($1::text) IS NOT NULL",
            &[&t.target.quoted()],
        )
        .await
        .map_err(ClusterError::sql("looking for a target table"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let shared_with_others = match &t.chunk.tenant {
        Some((col, ty)) => tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS DISTINCT FROM CAST($1::text AS {ty}))",
                    t.target.quoted(),
                    quote_ident(col)
                ),
                &[&tenant.as_str()],
            )
            .await
            .map_err(ClusterError::sql("looking for other tenants' rows"))?
            .get(0),
        None => false,
    };
    let ours = written.created.contains(&t.target.quoted());
    let wrote = written.wrote;
    match &t.chunk.tenant {
        // Created by the move and holding only the tenant's rows: it goes.
        _ if ours && !shared_with_others => return Ok(Some(t.target.clone())),
        // A shared table (created by the move and since shared, or there before): only
        // the tenant's rows go, and only if the move wrote any.
        Some((col, ty)) if ours || wrote => {
            out.rows_deleted += tx
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE {} = CAST($1::text AS {ty})",
                        t.target.quoted(),
                        quote_ident(col)
                    ),
                    &[&tenant.as_str()],
                )
                .await
                .map_err(ClusterError::sql(format!(
                    "removing the tenant's rows from {}",
                    t.target
                )))? as i64;
        }
        // A whole table that was there before, empty (the move refuses a table that
        // holds rows) and then written by the move: its rows go, the table stays.
        None if wrote => {
            out.rows_deleted += tx
                .execute(&format!("DELETE FROM {}", t.target.quoted()), &[])
                .await
                .map_err(ClusterError::sql(format!(
                    "removing the tenant's rows from {}",
                    t.target
                )))? as i64;
            out.tables_kept.push(t.target.to_string());
        }
        // There before the move, and nothing of it the move's to remove (a whole table
        // of another tenant, or a shared table the move never wrote to).
        _ => out.tables_kept.push(t.target.to_string()),
    }
    Ok(None)
}

/// Removes the tenant from its old location (see [`cleanup`]) and marks the move cleaned.
pub async fn cleanup_tenant(config: &Config, tenant: &TenantId) -> Result<Cleaned, Error> {
    let (registry, mut client, mv) = tenant_move(config, tenant).await?;
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce(extract(epoch FROM cleanup_after - now())::float8, 0), \
                        coalesce(cleanup_after::text, '') FROM {} WHERE id = $1",
                registry.table("moves")
            ),
            &[&mv.id],
        )
        .await
        .map_err(crate::cluster::ClusterError::sql(
            "reading the retention window",
        ))?;
    let (left, until): (f64, String) = (row.get(0), row.get(1));
    cleanup::may_clean(&mv, left, &until).map_err(|e| RegistryError::NotYet(e.to_string()))?;
    let tables = tables(config, &registry, &client, &mv).await?;
    let mut cleaned = cleanup::drop_tables(&client, &tables).await?;
    cleaned.rows_deleted =
        cleanup::delete_rows(&mut client, tenant.as_str(), &tables, 5_000).await?;
    registry
        .transition(&client, mv.id, MoveState::CutOver, MoveState::Cleaned, None)
        .await?;
    if let Some(slot) = &mv.reverse_slot {
        // The tenant's changes at the target no longer go back; the slot goes with the
        // target's last cut-over move (its stream stops once the daemon sees `cleaned`).
        if let Some(endpoint) = config.targets.get(&mv.target) {
            let target = endpoint.connect_sql().await?;
            super::reverse::release(&target, slot, &mv.target_schema).await?;
        }
    }
    Ok(cleaned)
}
