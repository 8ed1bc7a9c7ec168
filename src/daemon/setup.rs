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

use tokio_postgres::Client;

use super::moving::{CopyState, TableMove, Tenant, TenantRecord};
use super::MoveError;
use crate::apply::writer::{
    ensure_progress_table, forget_progress, read_resume_progress, Progress,
};
use crate::backfill::chunk::ChunkTable;
use crate::backfill::KeyKind;
use crate::cluster::{query_text_params, ClusterError};
use crate::config::{Config, TenancyMode};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::provision::{self, Placement, TableDef};
use crate::registry::Move;
use crate::route::Destination;
use crate::source::{self, SourceError};
use crate::sql::{quote_ident, QualifiedName};
use crate::tenant::TenantId;

/// What the pipeline remembers of a tenant from before a restart.
#[derive(Clone)]
pub(crate) struct Remembered {
    pub record: Option<TenantRecord>,
    pub applied: Lsn,
}

/// Whether tables in `schema` can be a tenant's own: not switchyard's (the registry, the
/// reverse apply's progress) and not a move's target in the source database
/// (`target_schemas`, whose tables are copies).
pub(super) fn may_hold_tenants(
    config: &Config,
    schema: &str,
    target_schemas: &BTreeSet<String>,
) -> bool {
    !target_schemas.contains(schema)
        && schema != config.registry_schema
        && schema != crate::cutover::reverse::progress_schema(&config.registry_schema)
}

/// The tenant's tables in the publication.
async fn tenant_tables(
    config: &Config,
    source: &Client,
    tenant: &TenantId,
    excluded_schemas: &BTreeSet<String>,
) -> Result<Vec<TableDef>, Error> {
    let publication = &config.replication.publication;
    let tables = source::slot::publication_tables(source, publication)
        .await?
        .ok_or_else(|| {
            SourceError::Protocol(format!("publication {publication:?} does not exist"))
        })?;
    let candidates: Vec<QualifiedName> = tables
        .into_iter()
        .filter(|t| may_hold_tenants(config, &t.schema, excluded_schemas))
        .filter(|t| match config.tenancy.mode {
            TenancyMode::Schema => t.schema == tenant.as_str(),
            TenancyMode::Shared => true,
        })
        .collect();
    let defs = provision::read_tables(source, &candidates).await?;
    let defs: Vec<TableDef> = match config.tenancy.mode {
        TenancyMode::Schema => defs,
        // Shared mode: tables without the tenant column are global (lookup tables): they
        // are not any tenant's and stay where they are.
        TenancyMode::Shared => defs
            .into_iter()
            .filter(|d| {
                let col = config.tenancy.column_of(&d.name);
                d.columns.iter().any(|c| c.name == col)
            })
            .collect(),
    };
    if defs.is_empty() {
        return Err(MoveError::NoTables {
            tenant: tenant.to_string(),
            publication: publication.clone(),
        }
        .into());
    }
    Ok(defs)
}

/// The tenant id as the tenant column's type writes it (`7` for `007` in an integer
/// column, lower case for a UUID): the router and the fence compare the text pgoutput sends,
/// which is this form, while the backfill compares typed values, so an id in any other form
/// would copy the rows and then never see a change. Schema-per-tenant ids are schema names
/// and stay as they are. An id the column type does not accept is refused with the reason.
pub async fn canonical_tenant(
    config: &Config,
    source: &Client,
    tenant: &TenantId,
) -> Result<TenantId, Error> {
    if config.tenancy.mode == TenancyMode::Schema {
        return Ok(tenant.clone());
    }
    let defs = tenant_tables(config, source, tenant, &BTreeSet::new()).await?;
    let mut types: Vec<String> = defs
        .iter()
        .filter_map(|d| {
            let col = config.tenancy.column_of(&d.name);
            d.columns
                .iter()
                .find(|c| c.name == col)
                .map(|c| c.type_sql.clone())
        })
        .collect();
    types.sort();
    types.dedup();
    let mut canonical: Option<(String, String)> = None;
    for ty in types {
        // `ty` is the catalog's own rendering of the column type (format_type).
        let text: String = source
            .query_one(
                &format!("SELECT CAST($1::text AS {ty})::text"),
                &[&tenant.as_str()],
            )
            .await
            .map_err(|e| -> Error {
                // Class 22: the value does not fit the type. Anything else is the session's.
                if e.code().is_some_and(|c| c.code().starts_with("22")) {
                    MoveError::BadTenantId {
                        tenant: tenant.to_string(),
                        detail: format!(
                            "not a value of the tenant column's type {ty}: {}",
                            crate::cluster::describe(&e)
                        ),
                    }
                    .into()
                } else {
                    ClusterError::sql("reading the tenant id's canonical form")(e).into()
                }
            })?
            .get(0);
        match &canonical {
            Some((other_ty, other)) if *other != text => {
                return Err(MoveError::BadTenantId {
                    tenant: tenant.to_string(),
                    detail: format!(
                        "the tenant columns disagree on how to write it: {text:?} as {ty}, {other:?} as {other_ty}"
                    ),
                }
                .into())
            }
            _ => canonical = Some((ty, text)),
        }
    }
    match canonical {
        Some((_, text)) => Ok(TenantId::new(text).map_err(|e| MoveError::BadTenantId {
            tenant: tenant.to_string(),
            detail: e.to_string(),
        })?),
        None => Ok(tenant.clone()),
    }
}

/// Primary key column names in key order.
async fn primary_key(source: &Client, table: &QualifiedName) -> Result<Vec<String>, Error> {
    let rows = source
        .query(
            "SELECT a.attname::text FROM pg_index i \
               JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
              WHERE i.indisprimary AND n.nspname = $1 AND c.relname = $2 ORDER BY k.ord",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(ClusterError::sql(format!(
            "reading the primary key of {table}"
        )))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn layout(config: &Config, source: &Client, def: &TableDef) -> Result<ChunkTable, Error> {
    let table = def.name.to_string();
    // pgoutput sends every column except generated ones, in attribute order.
    let columns: Vec<&provision::ColumnDef> = def
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .collect();
    let pk = primary_key(source, &def.name).await?;
    if pk.is_empty() {
        return Err(MoveError::NoKey {
            table: def.name.quoted(),
        }
        .into());
    }
    let mut key = Vec::new();
    for name in &pk {
        let idx = columns
            .iter()
            .position(|c| &c.name == name)
            .ok_or_else(|| MoveError::NoKey {
                table: def.name.quoted(),
            })?;
        let kind =
            KeyKind::for_type_name(&columns[idx].type_sql).ok_or_else(|| MoveError::KeyType {
                table: table.clone(),
                column: name.clone(),
                type_sql: columns[idx].type_sql.clone(),
            })?;
        key.push((idx, kind));
    }
    let tenant = match config.tenancy.mode {
        TenancyMode::Schema => None,
        TenancyMode::Shared => {
            let col = config.tenancy.column_of(&def.name);
            let c = columns
                .iter()
                .find(|c| c.name == col)
                .ok_or_else(|| MoveError::NoTables {
                    tenant: String::new(),
                    publication: config.replication.publication.clone(),
                })?;
            if !identity_has(source, &def.name, col, &pk).await? {
                return Err(MoveError::TenantNotInIdentity {
                    table: def.name.quoted(),
                    column: col.to_owned(),
                }
                .into());
            }
            Some((col.to_owned(), c.type_sql.clone()))
        }
    };
    Ok(ChunkTable {
        source: def.name.clone(),
        columns: columns.iter().map(|c| c.name.clone()).collect(),
        key,
        tenant,
    })
}

/// [`layout`] of every table, the catalog queries of all tables sent at once on the one
/// connection (tokio-postgres pipelines them): a round trip per query is what a setup costs
/// against a cluster across a network, times two queries a table.
async fn layouts(
    config: &Config,
    source: &Client,
    defs: &[TableDef],
) -> Result<Vec<ChunkTable>, Error> {
    futures_util::future::try_join_all(defs.iter().map(|d| layout(config, source, d))).await
}

/// For a table whose key has a text column and more rows than one chunk: the index to
/// create when no index gives chunk queries their key order (the planner would sort for
/// every chunk; see [`ChunkTable::key_order_index_sql`]). `None` when reads are in order.
/// Advice only: the copy is correct either way.
pub async fn unordered_chunk_reads(
    source: &Client,
    chunk: &ChunkTable,
    tenant: &str,
    chunk_rows: usize,
) -> Result<Option<String>, Error> {
    if !chunk.key.iter().any(|(_, k)| *k == KeyKind::Text) {
        return Ok(None);
    }
    let rows: f32 = source
        .query_one(
            "SELECT coalesce((SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)), 0)",
            &[&chunk.source.quoted()],
        )
        .await
        .map_err(ClusterError::sql(format!(
            "reading the size of {}",
            chunk.source
        )))?
        .get(0);
    if (rows as f64) < chunk_rows as f64 {
        return Ok(None);
    }
    let (sql, params) = chunk.first_chunk_query(tenant, chunk_rows);
    let plan = query_text_params(source, &format!("EXPLAIN {sql}"), &params)
        .await
        .map_err(ClusterError::sql(format!(
            "planning a chunk read of {}",
            chunk.source
        )))?;
    let sorts = plan.iter().any(|r| {
        let line: &str = r.get(0);
        let node = line.trim_start().trim_start_matches("->").trim_start();
        node.starts_with("Sort ") || node.starts_with("Incremental Sort ")
    });
    Ok(sorts.then(|| chunk.key_order_index_sql()))
}

/// Logs [`unordered_chunk_reads`]'s advice (a failure to ask is logged too, not fatal).
async fn warn_unordered(config: &Config, source: &Client, chunk: &ChunkTable, tenant: &TenantId) {
    match unordered_chunk_reads(source, chunk, tenant.as_str(), config.moves.chunk_rows).await {
        Ok(None) => {}
        Ok(Some(fix)) => tracing::warn!(
            table = %chunk.source,
            %fix,
            "no index gives this table's keys in byte order (a text key in another collation): every backfill chunk sorts the tenant's remaining rows; create the index to read chunks in order"
        ),
        Err(e) => tracing::debug!(table = %chunk.source, error = %e, "could not plan a chunk read"),
    }
}

/// Whether `column` is part of the table's replica identity (so a DELETE says whose row
/// it removes).
async fn identity_has(
    source: &Client,
    table: &QualifiedName,
    column: &str,
    primary_key: &[String],
) -> Result<bool, Error> {
    let row = source
        .query_one(
            "SELECT c.relreplident::text, \
                    coalesce((SELECT array_agg(a.attname::text) FROM pg_index i \
                               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                              WHERE i.indrelid = c.oid AND i.indisreplident), '{}') \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(ClusterError::sql(format!("reading the replica identity of {table}")))?;
    let (kind, index): (String, Vec<String>) = (row.get(0), row.get(1));
    Ok(match kind.as_str() {
        "f" => true,
        "i" => index.iter().any(|c| c == column),
        "d" => primary_key.iter().any(|c| c == column),
        _ => false,
    })
}

/// Where a move puts the tenant's tables.
fn placement(config: &Config, mv: &Move, defs: &[TableDef]) -> Placement {
    let names: Vec<QualifiedName> = defs.iter().map(|d| d.name.clone()).collect();
    let same = config
        .targets
        .get(&mv.target)
        .is_some_and(|t| config.source.same_database(t));
    match config.tenancy.mode {
        TenancyMode::Shared => Placement::into_schema(&names, &mv.target_schema, same),
        TenancyMode::Schema => {
            Placement::schema_to_schema(&names, mv.tenant.as_str(), &mv.target_schema, same)
        }
    }
}

/// A tenant's tables as `mv` places them, read from the source catalog: the source layout
/// and the target table of each (what `verify` and `cleanup` work on). `moves` are all
/// registry rows: schemas other moves created on the source cluster are not the tenant's.
pub async fn tenant_layout(
    config: &Config,
    source: &Client,
    mv: &Move,
    moves: &[Move],
) -> Result<Vec<(ChunkTable, QualifiedName)>, Error> {
    let excluded = target_schemas_in_source(config, moves);
    let mut defs = tenant_tables(config, source, &mv.tenant, &excluded).await?;
    // Only what the move copied: a table that appeared later was never part of it.
    if let Some(recorded) = &mv.tables {
        defs.retain(|d| recorded.contains(&d.name.quoted()));
    }
    let placement = placement(config, mv, &defs);
    let chunks = layouts(config, source, &defs).await?;
    let mut out = Vec::new();
    for (def, chunk) in defs.iter().zip(chunks) {
        let target = placement
            .tables
            .get(&def.name)
            .cloned()
            .ok_or_else(|| super::unknown_target(config, &mv.target))?;
        out.push((chunk, target));
    }
    Ok(out)
}

/// Schemas of the source database that are some move's target: their tables are copies,
/// never a tenant's own.
fn target_schemas_in_source(config: &Config, moves: &[Move]) -> BTreeSet<String> {
    moves
        .iter()
        .filter(|m| {
            config
                .targets
                .get(&m.target)
                .is_some_and(|t| config.source.same_database(t))
        })
        .map(|m| m.target_schema.clone())
        .collect()
}

/// The tenant's tables in the publication now, whatever the move recorded (the cutover
/// compares them with what it fences).
pub async fn current_tenant_tables(
    config: &Config,
    source: &Client,
    mv: &Move,
    moves: &[Move],
) -> Result<Vec<QualifiedName>, Error> {
    let excluded = target_schemas_in_source(config, moves);
    Ok(tenant_tables(config, source, &mv.tenant, &excluded)
        .await?
        .into_iter()
        .map(|d| d.name)
        .collect())
}

/// Checks a move request before it is written (what `switchyard move` runs): the target
/// is configured, the tenant has tables, and each can be copied and routed. Returns the
/// tenant's tables.
pub async fn check_move(
    config: &Config,
    tenant: &TenantId,
    target: &crate::tenant::TargetId,
) -> Result<Vec<QualifiedName>, Error> {
    if !config.targets.contains_key(target) {
        return Err(super::unknown_target(config, target).into());
    }
    let source = config.source.connect_sql().await?;
    let defs = tenant_tables(config, &source, tenant, &BTreeSet::new()).await?;
    for chunk in layouts(config, &source, &defs).await? {
        warn_unordered(config, &source, &chunk, tenant).await;
    }
    Ok(defs.into_iter().map(|d| d.name).collect())
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
    let endpoint = crate::daemon::endpoint(config, &mv.target)?;
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
    let started = std::time::Instant::now();
    let ((source_half, source_took), (target_half, target_took)) = tokio::join!(
        timed(source_side(config, mv, excluded_schemas)),
        timed(target_side(config, mv))
    );
    let ((source, defs, chunks), (mut target, progress)) = (source_half?, target_half?);
    let placement = placement(config, mv, &defs);
    let plan = provision::plan(&defs, &placement)?;
    for w in &plan.warnings {
        tracing::warn!(tenant = %mv.tenant, warning = %w, "provisioning");
    }
    let ledger = provision::Ledger {
        schema: &config.registry_schema,
        tenant: mv.tenant.as_str(),
    };
    let created = provision::apply(&mut target, &plan, Some(&ledger)).await?;
    tracing::info!(tenant = %mv.tenant, target = %mv.target, created, "target provisioned");
    // Where a slow restart's time went (its tenants are set up before their changes apply).
    tracing::debug!(
        tenant = %mv.tenant,
        source_ms = source_took.as_millis() as u64,
        target_ms = target_took.as_millis() as u64,
        provisioned_ms = started.elapsed().as_millis() as u64,
        "tenant setup"
    );
    crate::failpoint::hit("setup.after_provision");

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

    let ours = remembered
        .record
        .as_ref()
        .is_some_and(|r| r.move_id == mv.id);
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
        (true, Some(p)) => {
            let state = match &p.state {
                Some(text) => CopyState::parse(text).map_err(MoveError::BadState)?,
                None => CopyState::default(),
            };
            tenant.restore(&state);
            tenant.sent_state = p.state.unwrap_or_default();
            tenant.skip_before = p.lsn;
            tenant.applied = p.lsn;
            if tenant.is_copied() {
                tenant.copied_at = Some(p.lsn);
            }
            tracing::info!(tenant = %mv.tenant, applied = %p.lsn, "resuming the move");
        }
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
        (_, None) => {
            for (t, tenant_col) in &scoped {
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
        }
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
    tenant.rows_total = Some(total);
    Ok(tenant)
}
