//! A tenant's layout: which of the source's tables are its, how each is copied (key,
//! columns, tenant column) and routed, and where a move places it. Read from the source's
//! catalog; the daemon's setup, the cutover, `verify`, `cleanup` and `move`'s checks all
//! read it here, so they agree on what the tenant is.
//!
//! Invariants:
//! - Only tables of the publication are a tenant's, never the registry's, the reverse
//!   apply's, or a move's target schema in the source database (their tables are copies).
//! - In shared mode a table without the tenant column is global and belongs to no tenant.
//! - A tenant id is used in the form its column type writes it ([`canonical_tenant`]).
//! - A table is movable only with a primary key of an orderable type and the tenant column
//!   in its replica identity; anything else is refused with the fix.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::backfill::chunk::ChunkTable;
use crate::cluster::{query_text_params, ClusterError, Endpoint};
use crate::config::{Config, TenancyMode};
use crate::key::KeyKind;
use crate::provision::{self, Placement, ProvisionError, TableDef};
use crate::registry::Move;
use crate::source::{self, SourceError};
use crate::sql::QualifiedName;
use crate::tenant::{TargetId, TenantId};

/// Why a tenant's layout cannot be read or cannot be moved.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{table} has no primary key; backfill needs one. Fix: ALTER TABLE {table} ADD PRIMARY KEY (...)")]
    NoKey { table: String },
    #[error("{table}: primary key column {column:?} has type {type_sql}; backfill orders smallint, integer, bigint, text, varchar and uuid keys")]
    KeyType {
        table: String,
        column: String,
        type_sql: String,
    },
    #[error("{table}: tenant column {column:?} is not part of the replica identity, so a DELETE would not say whose row it removes. Fix: make the primary key include it, or ALTER TABLE {table} REPLICA IDENTITY FULL")]
    TenantNotInIdentity { table: String, column: String },
    #[error("tenant id {tenant:?}: {detail}")]
    BadTenantId { tenant: String, detail: String },
    #[error("target {target:?} is not configured in [targets] (known targets: {known})")]
    UnknownTarget { target: String, known: String },
    #[error("no table of publication {publication:?} belongs to tenant {tenant}")]
    NoTables { tenant: String, publication: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
}

/// The configured endpoint of `target`, or an error that lists the known ones.
pub fn target_endpoint<'a>(
    config: &'a Config,
    target: &TargetId,
) -> Result<&'a Endpoint, LayoutError> {
    config
        .targets
        .get(target)
        .ok_or_else(|| unknown_target(config, target))
}

fn unknown_target(config: &Config, target: &TargetId) -> LayoutError {
    LayoutError::UnknownTarget {
        target: target.to_string(),
        known: config
            .targets
            .keys()
            .map(|t| format!("{:?}", t.as_str()))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Whether tables in `schema` can be a tenant's own: not switchyard's (the registry, the
/// reverse apply's progress) and not a move's target in the source database
/// (`target_schemas`, whose tables are copies).
pub fn may_hold_tenants(config: &Config, schema: &str, target_schemas: &BTreeSet<String>) -> bool {
    !target_schemas.contains(schema)
        && schema != config.registry_schema
        && schema != crate::registry::reverse_progress_schema(&config.registry_schema)
}

/// The tenant's tables in the publication.
pub async fn tenant_tables(
    config: &Config,
    source: &Client,
    tenant: &TenantId,
    excluded_schemas: &BTreeSet<String>,
) -> Result<Vec<TableDef>, LayoutError> {
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
        return Err(LayoutError::NoTables {
            tenant: tenant.to_string(),
            publication: publication.clone(),
        });
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
) -> Result<TenantId, LayoutError> {
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
            .map_err(|e| -> LayoutError {
                // Class 22: the value does not fit the type. Anything else is the session's.
                if e.code().is_some_and(|c| c.code().starts_with("22")) {
                    LayoutError::BadTenantId {
                        tenant: tenant.to_string(),
                        detail: format!(
                            "not a value of the tenant column's type {ty}: {}",
                            crate::cluster::describe(&e)
                        ),
                    }
                } else {
                    ClusterError::sql("reading the tenant id's canonical form")(e).into()
                }
            })?
            .get(0);
        match &canonical {
            Some((other_ty, other)) if *other != text => {
                return Err(LayoutError::BadTenantId {
                    tenant: tenant.to_string(),
                    detail: format!(
                        "the tenant columns disagree on how to write it: {text:?} as {ty}, {other:?} as {other_ty}"
                    ),
                })
            }
            _ => canonical = Some((ty, text)),
        }
    }
    match canonical {
        Some((_, text)) => Ok(TenantId::new(text).map_err(|e| LayoutError::BadTenantId {
            tenant: tenant.to_string(),
            detail: e.to_string(),
        })?),
        None => Ok(tenant.clone()),
    }
}

/// Primary key column names in key order.
async fn primary_key(source: &Client, table: &QualifiedName) -> Result<Vec<String>, LayoutError> {
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

async fn layout(
    config: &Config,
    source: &Client,
    def: &TableDef,
) -> Result<ChunkTable, LayoutError> {
    let table = def.name.to_string();
    // pgoutput sends every column except generated ones, in attribute order.
    let columns: Vec<&provision::ColumnDef> = def
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .collect();
    let pk = primary_key(source, &def.name).await?;
    if pk.is_empty() {
        return Err(LayoutError::NoKey {
            table: def.name.quoted(),
        });
    }
    let mut key = Vec::new();
    for name in &pk {
        let idx = columns
            .iter()
            .position(|c| &c.name == name)
            .ok_or_else(|| LayoutError::NoKey {
                table: def.name.quoted(),
            })?;
        let kind =
            KeyKind::for_type_name(&columns[idx].type_sql).ok_or_else(|| LayoutError::KeyType {
                table: table.clone(),
                column: name.clone(),
                type_sql: columns[idx].type_sql.clone(),
            })?;
        key.push((idx, kind));
    }
    let tenant =
        match config.tenancy.mode {
            TenancyMode::Schema => None,
            TenancyMode::Shared => {
                let col = config.tenancy.column_of(&def.name);
                let c = columns.iter().find(|c| c.name == col).ok_or_else(|| {
                    LayoutError::NoTables {
                        tenant: String::new(),
                        publication: config.replication.publication.clone(),
                    }
                })?;
                if !identity_has(source, &def.name, col, &pk).await? {
                    return Err(LayoutError::TenantNotInIdentity {
                        table: def.name.quoted(),
                        column: col.to_owned(),
                    });
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
pub async fn layouts(
    config: &Config,
    source: &Client,
    defs: &[TableDef],
) -> Result<Vec<ChunkTable>, LayoutError> {
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
) -> Result<Option<String>, LayoutError> {
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
pub async fn warn_unordered(
    config: &Config,
    source: &Client,
    chunk: &ChunkTable,
    tenant: &TenantId,
) {
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
) -> Result<bool, LayoutError> {
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
pub fn placement(config: &Config, mv: &Move, defs: &[TableDef]) -> Placement {
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
) -> Result<Vec<(ChunkTable, QualifiedName)>, LayoutError> {
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
            .ok_or_else(|| unknown_target(config, &mv.target))?;
        out.push((chunk, target));
    }
    Ok(out)
}

/// Schemas of the source database that are some move's target: their tables are copies,
/// never a tenant's own.
pub fn target_schemas_in_source(config: &Config, moves: &[Move]) -> BTreeSet<String> {
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
) -> Result<Vec<QualifiedName>, LayoutError> {
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
) -> Result<Vec<QualifiedName>, LayoutError> {
    if !config.targets.contains_key(target) {
        return Err(unknown_target(config, target));
    }
    let source = config.source.connect_sql().await?;
    let defs = tenant_tables(config, &source, tenant, &BTreeSet::new()).await?;
    for chunk in layouts(config, &source, &defs).await? {
        warn_unordered(config, &source, &chunk, tenant).await;
    }
    Ok(defs.into_iter().map(|d| d.name).collect())
}

/// Published tables that appeared after the moves started: which moving tenants they
/// concern. A table found to be no moving tenant's (no tenant column, or another tenant's
/// schema) is remembered and not looked at again; a table's columns are read once.
#[derive(Debug, Default)]
pub struct TableWatch {
    global: BTreeSet<QualifiedName>,
}

impl TableWatch {
    /// The published tables that may hold rows of the `moving` tenants, are not among the
    /// `known` tables of their moves, and concern them: `(tenant, table)` pairs. One
    /// catalog query, plus the columns of tables not seen before.
    pub async fn appeared(
        &mut self,
        config: &Config,
        source: &Client,
        known: &BTreeSet<&QualifiedName>,
        moving: &[&TenantId],
        excluded: &BTreeSet<String>,
    ) -> Result<Vec<(TenantId, QualifiedName)>, LayoutError> {
        let Some(published) =
            source::slot::publication_tables(source, &config.replication.publication).await?
        else {
            return Ok(Vec::new());
        };
        let unknown: Vec<QualifiedName> = published
            .into_iter()
            .filter(|t| {
                may_hold_tenants(config, &t.schema, excluded)
                    && !known.contains(t)
                    && !self.global.contains(t)
            })
            .collect();
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let mut concerned = Vec::new();
        match config.tenancy.mode {
            TenancyMode::Schema => {
                for t in unknown {
                    match TenantId::new(t.schema.clone()) {
                        Ok(id) if moving.contains(&&id) => concerned.push((id, t)),
                        _ => {
                            self.global.insert(t);
                        }
                    }
                }
            }
            TenancyMode::Shared => {
                for d in provision::read_tables(source, &unknown).await? {
                    let col = config.tenancy.column_of(&d.name);
                    if d.columns.iter().any(|c| c.name == col) {
                        for id in moving {
                            concerned.push(((*id).clone(), d.name.clone()));
                        }
                    } else {
                        self.global.insert(d.name);
                    }
                }
            }
        }
        Ok(concerned)
    }
}
