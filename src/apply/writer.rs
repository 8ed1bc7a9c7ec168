//! One target's writer: batches of source transactions in one target transaction, with the
//! applied source position recorded in the same transaction.
//!
//! ```text
//!   [txn end=100: acme ops] [txn end=120: acme, globex ops] ... ──► BEGIN
//!        skip parts with end <= applied[tenant]                      statements…
//!                                                                    upsert switchyard.applied
//!                                                                      + COMMIT ──► applied[tenant] = max end
//! ```
//!
//! Invariants:
//! - Rows and the applied position commit together or not at all, so after any crash the
//!   target itself says exactly which source transactions it holds: replaying from an earlier
//!   position skips them (exactly once), whatever RocksDB or the slot say.
//! - Source order is kept per table: batches are applied in the order given, and a table's
//!   changes (single statements, folded sets, copies) in the order of their source
//!   transactions. Across tables the order may differ only under the replica role (folding
//!   and merging consecutive copies of a table are used only then), where no trigger or
//!   foreign key observes it.
//! - A failed batch rolls back entirely and leaves the in-memory positions untouched, and
//!   the connection outside any transaction (no lane idles holding row locks).
//! - The target answers a batch in two round trips however many tenants it holds: BEGIN
//!   travels with the statements, every tenant's position is one statement sent with the
//!   COMMIT. Neither changes the rule above: a failed statement or record turns the COMMIT
//!   into a rollback, and rows found wrong (a count check) are refused before it is sent.
//! - A folded statement's cost follows its changes, not the table: its connection runs
//!   without hash, merge and memoize joins, so each key is one index probe
//!   ([`FOLDING_SESSION`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use tokio_postgres::Client;

use std::borrow::Cow;
use tokio_postgres::types::{ToSql, Type};

use super::compaction::{SetStatement, TableChanges, TextArray};
use super::copy::{copy, CopyRows};
use super::progress::{
    ensure_progress_table, lanes_table, read_lane, read_progress, record_sql, Progress,
};
use super::statement::{build, build_replay, Statement, TargetColumn, TargetTable};
use super::{check_count, ApplyError};
use crate::cluster::{ClusterError, Endpoint};
use crate::decode::Tuple;
use crate::lsn::{CommitLsn, Lsn};
use crate::route::RowOp;
use crate::sql::QualifiedName;
use crate::tenant::{TargetId, TenantId};

/// One unit of work inside a target transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    Statement(Statement),
    /// A routed row change; the writer turns it into a statement with the target table's
    /// layout (read from the target's catalog, so the pipeline itself does no target I/O).
    Row(RowChange),
    /// Rows inserted with COPY (backfill chunks): values as text, NULL as `None`.
    Copy(CopyRows),
}

/// A row operation that owns its tuples (values are reference-counted slices of the
/// received message, so this is cheap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedRowOp {
    Upsert { new: Tuple, update: bool },
    Delete { old: Tuple },
    Rekey { old: Tuple, new: Tuple },
    Truncate,
}

impl OwnedRowOp {
    pub fn from_op(op: &RowOp<'_>) -> OwnedRowOp {
        match op {
            RowOp::Upsert { new, update } => OwnedRowOp::Upsert {
                new: (*new).clone(),
                update: *update,
            },
            RowOp::Delete { old } => OwnedRowOp::Delete {
                old: (*old).clone(),
            },
            RowOp::Rekey { old, new } => OwnedRowOp::Rekey {
                old: (*old).clone(),
                new: (*new).clone(),
            },
            RowOp::Truncate => OwnedRowOp::Truncate,
        }
    }

    pub fn as_op(&self) -> RowOp<'_> {
        match self {
            OwnedRowOp::Upsert { new, update } => RowOp::Upsert {
                new,
                update: *update,
            },
            OwnedRowOp::Delete { old } => RowOp::Delete { old },
            OwnedRowOp::Rekey { old, new } => RowOp::Rekey { old, new },
            OwnedRowOp::Truncate => RowOp::Truncate,
        }
    }
}

/// What every change of one target table has in common. The pipeline builds it once per
/// table and relation layout and shares it: a change then carries a reference count, not
/// three allocations, and the writer recognises a repeated table by pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowShape {
    pub table: QualifiedName,
    /// The source relation's replica identity flags, per column.
    pub identity: Vec<bool>,
    /// Shared tables: the tenant column (scopes TRUNCATE).
    pub tenant_column: Option<String>,
}

/// A row change for one target table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChange {
    pub shape: Arc<RowShape>,
    pub op: OwnedRowOp,
}

impl From<Statement> for Work {
    fn from(st: Statement) -> Work {
        Work::Statement(st)
    }
}

/// One source transaction's work for this target, split by tenant.
#[derive(Clone, Debug, Default)]
pub struct SourceTxn {
    pub end: CommitLsn,
    pub parts: Vec<(TenantId, Vec<Work>)>,
    /// Tenants whose backfill state changed in this transaction, with the new state
    /// (opaque text). It is stored next to the applied position, in the same target
    /// transaction, so the copy resumes exactly where the target's rows say it stood.
    pub states: Vec<(TenantId, String)>,
}

impl RowChange {
    /// A change with a shape of its own (tests, and paths where sharing does not pay).
    pub fn new(
        table: QualifiedName,
        identity: Vec<bool>,
        tenant_column: Option<String>,
        op: OwnedRowOp,
    ) -> RowChange {
        RowChange {
            shape: Arc::new(RowShape {
                table,
                identity,
                tenant_column,
            }),
            op,
        }
    }

    pub fn table(&self) -> &QualifiedName {
        &self.shape.table
    }
}

impl SourceTxn {
    /// Work of this transaction, in bytes of values (for batching limits).
    pub fn weight(&self) -> usize {
        self.parts
            .iter()
            .flat_map(|(_, w)| w)
            .map(Work::weight)
            .sum()
    }
}

impl Work {
    /// Bytes of values this work carries, about (for batching and memory limits).
    pub fn weight(&self) -> usize {
        match self {
            Work::Statement(st) => st.sql.len() + st.param_bytes(),
            Work::Row(r) => {
                64 + match &r.op {
                    OwnedRowOp::Upsert { new, .. } => tuple_weight(new),
                    OwnedRowOp::Delete { old } => tuple_weight(old),
                    OwnedRowOp::Rekey { old, new } => tuple_weight(old) + tuple_weight(new),
                    OwnedRowOp::Truncate => 0,
                }
            }
            Work::Copy(c) => c.data.len(),
        }
    }
}

fn tuple_weight(t: &Tuple) -> usize {
    t.0.iter().map(crate::decode::Datum::weight).sum()
}

/// Column layouts of target tables, read from the target catalog and cached.
pub struct TargetCatalog {
    tables: HashMap<QualifiedName, Arc<TargetTable>>,
}

impl Default for TargetCatalog {
    fn default() -> Self {
        Self::new()
    }
}

impl TargetCatalog {
    pub fn new() -> Self {
        TargetCatalog {
            tables: HashMap::new(),
        }
    }

    /// The target table's columns (in the order the target defines them, which
    /// provisioning made equal to the source's), with the source's replica identity flags.
    pub async fn table(
        &mut self,
        client: &impl tokio_postgres::GenericClient,
        name: &QualifiedName,
        identity: &[bool],
        tenant_column: Option<&str>,
    ) -> Result<Arc<TargetTable>, ApplyError> {
        let fresh = match self.tables.get(name) {
            Some(t) => {
                t.columns
                    .iter()
                    .map(|c| c.identity)
                    .eq(identity.iter().copied())
                    && t.tenant_column.as_deref() == tenant_column
            }
            None => false,
        };
        if !fresh {
            let table = read_table(client, name, identity, tenant_column).await?;
            self.tables.insert(name.clone(), Arc::new(table));
        }
        Ok(Arc::clone(
            self.tables
                .get(name)
                .expect("inserted above when missing or stale"),
        ))
    }
}

async fn read_table(
    client: &impl tokio_postgres::GenericClient,
    name: &QualifiedName,
    identity: &[bool],
    tenant_column: Option<&str>,
) -> Result<TargetTable, ApplyError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    COALESCE(a.attnum = ANY (i.indkey), false) \
               FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid \
               JOIN pg_namespace n ON n.oid = r.relnamespace \
               LEFT JOIN pg_index i ON i.indrelid = r.oid AND i.indisprimary \
              WHERE n.nspname = $1 AND r.relname = $2 AND a.attnum > 0 \
                AND NOT a.attisdropped AND a.attgenerated = '' \
              ORDER BY a.attnum",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(ClusterError::sql(format!("reading target table {name}")))?;
    if rows.len() != identity.len() {
        return Err(ApplyError::Corrupt(format!(
            "target table {name} has {} writable columns, the source relation {}",
            rows.len(),
            identity.len()
        )));
    }
    Ok(TargetTable {
        name: name.clone(),
        columns: rows
            .iter()
            .zip(identity)
            .map(|(r, id)| TargetColumn {
                name: r.get(0),
                type_sql: r.get(1),
                primary_key: r.get(2),
                identity: *id,
            })
            .collect(),
        tenant_column: tenant_column.map(str::to_owned),
    })
}

pub struct TargetWriter {
    id: TargetId,
    client: Client,
    progress_table: String,
    /// This writer's apply lane (see [`super::lanes`]): lane 0 records in `applied`, with
    /// the backfill states; lane k > 0 records its own positions in `applied_lanes`.
    lane: usize,
    lanes_table: String,
    applied: HashMap<TenantId, Lsn>,
    /// Tables whose row changes may be spread over lanes by key (see
    /// [`TargetWriter::spreads_by_key`]).
    spreadable: HashMap<QualifiedName, bool>,
    catalog: TargetCatalog,
    failed_tenant: Option<TenantId>,
    /// Prepared statements of this connection, by SQL text (row statements repeat).
    prepared: HashMap<String, tokio_postgres::Statement>,
    /// A transaction is open on the connection (BEGIN sent, no COMMIT or ROLLBACK yet).
    open: bool,
    /// The statement recording this lane's positions (see [`super::progress`]), once prepared.
    record: Option<tokio_postgres::Statement>,
    /// Fold row changes into set-based statements (only under the replica role, where no
    /// foreign-key trigger sees the order between keys).
    compact: bool,
    /// Per tenant, the source positions (after, up to] that the apply lanes may hold in
    /// part after a crash (see [`TargetWriter::set_replay_windows`]).
    replay: HashMap<TenantId, (Lsn, Lsn)>,
    stats: WriterStats,
}

/// How batches were applied so far (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Batches committed with row changes folded into set-based statements.
    pub compacted: u64,
    /// Compacted attempts that failed and were replayed change by change.
    pub replayed: u64,
    /// COPY statements run (consecutive chunks of a table share one).
    pub copies: u64,
}

/// Statements sent ahead before their results are read.
const PIPELINE_DEPTH: usize = 512;

/// Bytes of parameters in flight at most in one pipelined window (one larger statement
/// goes alone).
const PIPELINE_BYTES: usize = 16 << 20;

/// A statement waiting in the pipeline: one row change, or a compacted set of them.
enum Pending<'a> {
    One(Cow<'a, Statement>),
    Set(SetStatement<'a>),
}

impl Pending<'_> {
    fn sql(&self) -> &str {
        match self {
            Pending::One(st) => &st.sql,
            Pending::Set(st) => &st.sql,
        }
    }

    fn types(&self) -> Vec<Type> {
        match self {
            Pending::One(st) => vec![Type::TEXT; st.params.len()],
            Pending::Set(st) => vec![Type::TEXT_ARRAY; st.columns.len()],
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        match self {
            Pending::One(st) => st.params.iter().map(|p| p as _).collect(),
            Pending::Set(st) => st.columns.iter().map(|p| p as _).collect(),
        }
    }

    /// Bytes of parameters it sends, about.
    fn weight(&self) -> usize {
        match self {
            Pending::One(st) => st.param_bytes(),
            Pending::Set(st) => st.columns.iter().map(TextArray::weight).sum(),
        }
    }

    fn check(&self, n: u64) -> Result<u64, ApplyError> {
        match self {
            Pending::One(st) => check_count(st, n),
            Pending::Set(st) if n != st.expect_rows => Err(ApplyError::Divergence {
                sql: st.sql.clone(),
                expected: st.expect_rows,
                actual: n,
            }),
            Pending::Set(_) => Ok(n),
        }
    }
}

/// Runs `pending` in order, pipelined: statements are sent before the first result is read,
/// which saves a round trip per row, in windows of at most [`PIPELINE_BYTES`] of parameters
/// (each statement is encoded when sent: a window bounds that copy of a large transaction).
/// The server still runs them one after the other; the first failure (in order) is the one
/// reported, with its tenant.
async fn pipeline<'a>(
    tx: &Client,
    prepared: &mut HashMap<String, tokio_postgres::Statement>,
    pending: &mut Vec<(&'a TenantId, Pending<'a>)>,
    failed_tenant: &mut Option<TenantId>,
) -> Result<(), ApplyError> {
    if pending.is_empty() {
        return Ok(());
    }
    for (tenant, st) in pending.iter() {
        if !prepared.contains_key(st.sql()) {
            match tx.prepare_typed(st.sql(), &st.types()).await {
                Ok(p) => {
                    prepared.insert(st.sql().to_owned(), p);
                }
                Err(e) => {
                    *failed_tenant = Some((*tenant).clone());
                    return Err(ClusterError::sql(format!("preparing `{}`", st.sql()))(e).into());
                }
            }
        }
    }
    let mut start = 0;
    while start < pending.len() {
        let (mut end, mut bytes) = (start, 0);
        while end < pending.len() {
            let w = pending[end].1.weight();
            if end > start && bytes + w > PIPELINE_BYTES {
                break;
            }
            bytes += w;
            end += 1;
        }
        let window = &pending[start..end];
        let runs = window.iter().map(|(_, st)| {
            let statement = prepared[st.sql()].clone();
            async move { tx.execute(&statement, &st.params()).await }
        });
        let results = futures_util::future::join_all(runs).await;
        for ((tenant, st), r) in window.iter().zip(results) {
            let checked = r
                .map_err(|e| ClusterError::sql(format!("running `{}`", st.sql()))(e).into())
                .and_then(|n| st.check(n));
            if let Err(e) = checked {
                *failed_tenant = Some((*tenant).clone());
                pending.clear();
                return Err(e);
            }
        }
        start = end;
    }
    pending.clear();
    Ok(())
}

/// Row changes `tenant` has in `batch`, at most [`FOLD_RESERVE`]: the room a new fold of
/// one of its tables makes at once (an upper bound for that table, capped so that a tenant
/// with many tables or one huge transaction reserves at most that many keys a fold).
fn tenant_rows(batch: &[SourceTxn], tenant: &TenantId) -> usize {
    batch
        .iter()
        .flat_map(|txn| &txn.parts)
        .filter(|(t, _)| t == tenant)
        .map(|(_, work)| work.len())
        .sum::<usize>()
        .min(FOLD_RESERVE)
}

/// Keys a new fold makes room for at most.
const FOLD_RESERVE: usize = 8192;

/// Moves the statements of every folded table (or of those of `table` only) into `pending`.
fn flush_folds<'a>(
    folds: &mut [(&'a TenantId, TableChanges<'a>)],
    table: Option<&QualifiedName>,
    pending: &mut Vec<(&'a TenantId, Pending<'a>)>,
    failed_tenant: &mut Option<TenantId>,
) -> Result<(), ApplyError> {
    for (tenant, fold) in folds.iter_mut() {
        if fold.is_empty() || table.is_some_and(|t| *t != fold.table().name) {
            continue;
        }
        match fold.take_statements() {
            Ok(sts) => pending.extend(sts.into_iter().map(|st| (*tenant, Pending::Set(st)))),
            Err(e) => {
                *failed_tenant = Some((*tenant).clone());
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// Raises `applied` to `positions` where they are further; a position never moves back.
fn raise(
    applied: &mut HashMap<TenantId, Lsn>,
    positions: impl IntoIterator<Item = (TenantId, Lsn)>,
) {
    for (tenant, lsn) in positions {
        let held = applied.entry(tenant).or_insert(lsn);
        *held = (*held).max(lsn);
    }
}

/// What a batch advances: per tenant, the end of its last transaction in the batch and
/// the backfill state to record with it.
type Advanced<'a> = BTreeMap<TenantId, (Lsn, Option<&'a str>)>;

/// Queues every change of `batch` that this lane does not hold yet (`applied`), replaying
/// those inside a tenant's replay window; returns what the batch advances.
async fn queue_batch<'a>(
    out: &mut Outgoing<'a, '_>,
    batch: &'a [SourceTxn],
    compact: bool,
    applied: &HashMap<TenantId, Lsn>,
    replay_windows: &HashMap<TenantId, (Lsn, Lsn)>,
) -> Result<Advanced<'a>, ApplyError> {
    let mut advanced: Advanced<'a> = BTreeMap::new();
    for txn in batch {
        for (tenant, work) in &txn.parts {
            let held = applied.get(tenant).copied().unwrap_or(Lsn::INVALID);
            let replay = replay_windows
                .get(tenant)
                .is_some_and(|(lo, hi)| txn.end.lsn() > *lo && txn.end.lsn() <= *hi);
            if txn.end.lsn() <= held && !replay {
                continue;
            }
            for w in work {
                if txn.end.lsn() <= held && !matches!(w, Work::Row(_)) {
                    // Lane 0 ran it (COPY chunks and statements never leave lane 0).
                    continue;
                }
                out.queue(tenant, w, batch, compact, replay).await?;
            }
            let entry = advanced
                .entry(tenant.clone())
                .or_insert((txn.end.lsn(), None));
            entry.0 = txn.end.lsn();
        }
        for (tenant, state) in &txn.states {
            let held = applied.get(tenant).copied().unwrap_or(Lsn::INVALID);
            if txn.end.lsn() <= held {
                continue;
            }
            let entry = advanced
                .entry(tenant.clone())
                .or_insert((txn.end.lsn(), None));
            *entry = (txn.end.lsn(), Some(state.as_str()));
        }
    }
    Ok(advanced)
}

/// The statement recording this lane's positions, prepared once per connection.
async fn record_statement(
    client: &Client,
    record: &mut Option<tokio_postgres::Statement>,
    lane: usize,
    progress_table: &str,
    lanes_table: &str,
) -> Result<tokio_postgres::Statement, ApplyError> {
    if let Some(st) = record {
        return Ok(st.clone());
    }
    let (sql, types) = record_sql(lane, progress_table, lanes_table);
    let st = client
        .prepare_typed(&sql, types)
        .await
        .map_err(ClusterError::sql("preparing the applied-position record"))?;
    *record = Some(st.clone());
    Ok(st)
}

/// One target transaction's statements on their way: the writer's parts it needs,
/// borrowed apart from the writer (what is in flight borrows the connection), and what is
/// queued but not sent. Statements go out in the order their changes came: a pending COPY
/// first, then the pipelined statements; a table's folded changes before anything else
/// touches that table.
struct Outgoing<'a, 'w> {
    client: &'w Client,
    prepared: &'w mut HashMap<String, tokio_postgres::Statement>,
    catalog: &'w mut TargetCatalog,
    /// Set to the tenant whose change failed, so the applier retries without it.
    failed_tenant: &'w mut Option<TenantId>,
    copies: &'w mut u64,
    pending: Vec<(&'a TenantId, Pending<'a>)>,
    /// Row changes folded into set-based statements, per tenant and table.
    folds: Vec<(&'a TenantId, TableChanges<'a>)>,
    copying: Option<(&'a TenantId, Vec<&'a CopyRows>)>,
    /// The layout of the last shape seen: consecutive changes mostly share one, and a
    /// pointer comparison then replaces a catalog lookup per change.
    last_layout: Option<(&'a Arc<RowShape>, Arc<TargetTable>)>,
}

impl<'a> Outgoing<'a, '_> {
    /// Queues one piece of a tenant's work, sending ahead when the pipeline is full.
    async fn queue(
        &mut self,
        tenant: &'a TenantId,
        work: &'a Work,
        batch: &'a [SourceTxn],
        compact: bool,
        replay: bool,
    ) -> Result<(), ApplyError> {
        let statement = match work {
            Work::Copy(c) => return self.queue_copy(tenant, c, compact).await,
            Work::Statement(st) => {
                self.finish_copy().await?;
                flush_folds(&mut self.folds, None, &mut self.pending, self.failed_tenant)?;
                Cow::Borrowed(st)
            }
            Work::Row(r) => match self.row(tenant, r, batch, compact, replay).await? {
                Some(st) => Cow::Owned(st),
                None => return Ok(()),
            },
        };
        self.pending.push((tenant, Pending::One(statement)));
        if self.pending.len() >= PIPELINE_DEPTH {
            self.send_queued().await?;
        }
        Ok(())
    }

    /// A chunk's rows: joined to the pending COPY when it continues it, else sent after
    /// everything queued before it (COPY is not pipelined).
    async fn queue_copy(
        &mut self,
        tenant: &'a TenantId,
        c: &'a CopyRows,
        compact: bool,
    ) -> Result<(), ApplyError> {
        // Consecutive copies into one table with nothing else done to it in between
        // become one COPY statement.
        if let (true, Some((t, parts))) = (compact, self.copying.as_mut()) {
            if *t == tenant
                && parts[0].table == c.table
                && parts[0].columns == c.columns
                && parts[0].format == c.format
            {
                parts.push(c);
                return Ok(());
            }
        }
        flush_folds(
            &mut self.folds,
            Some(&c.table),
            &mut self.pending,
            self.failed_tenant,
        )?;
        self.send_queued().await?;
        self.copying = Some((tenant, vec![c]));
        Ok(())
    }

    /// A row change: folded into its table's set-based statements where it can be
    /// (`None`), else the statement that applies it alone.
    async fn row(
        &mut self,
        tenant: &'a TenantId,
        r: &'a RowChange,
        batch: &'a [SourceTxn],
        compact: bool,
        replay: bool,
    ) -> Result<Option<Statement>, ApplyError> {
        if self
            .copying
            .as_ref()
            .is_some_and(|(_, parts)| parts[0].table == r.shape.table)
        {
            self.finish_copy().await?;
        }
        let layout = self.layout_of(tenant, &r.shape).await?;
        let op = r.op.as_op();
        if compact && !replay && self.fold(tenant, &r.shape.table, &layout, &op, batch)? {
            return Ok(None);
        }
        let built = if replay {
            build_replay(&layout, &op, tenant.as_str())
        } else {
            build(&layout, &op, tenant.as_str())
        };
        match built {
            Ok(st) => Ok(Some(st)),
            Err(e) => {
                *self.failed_tenant = Some(tenant.clone());
                Err(e.into())
            }
        }
    }

    /// The target table's layout for `shape`, from the last one or the catalog.
    async fn layout_of(
        &mut self,
        tenant: &TenantId,
        shape: &'a Arc<RowShape>,
    ) -> Result<Arc<TargetTable>, ApplyError> {
        if let Some((last, layout)) = &self.last_layout {
            if Arc::ptr_eq(last, shape) {
                return Ok(Arc::clone(layout));
            }
        }
        let found = self
            .catalog
            .table(
                self.client,
                &shape.table,
                &shape.identity,
                shape.tenant_column.as_deref(),
            )
            .await;
        match found {
            Ok(layout) => {
                self.last_layout = Some((shape, Arc::clone(&layout)));
                Ok(layout)
            }
            Err(e) => {
                *self.failed_tenant = Some(tenant.clone());
                Err(e)
            }
        }
    }

    /// Adds `op` to the fold of its table; false when it has to run as a statement of its
    /// own (then what the batch did to the table so far is queued ahead of it).
    fn fold(
        &mut self,
        tenant: &'a TenantId,
        table: &QualifiedName,
        layout: &Arc<TargetTable>,
        op: &RowOp<'a>,
        batch: &[SourceTxn],
    ) -> Result<bool, ApplyError> {
        let at = match self
            .folds
            .iter()
            .position(|(t, f)| *t == tenant && f.table().name == *table)
        {
            Some(at) if self.folds[at].1.is_for(layout) => Some(at),
            Some(at) => {
                // The layout changed under the fold: finish it first.
                self.flush_fold(at)?;
                self.folds.remove(at);
                None
            }
            None => None,
        };
        let at = match at {
            Some(at) => at,
            None => match TableChanges::new(Arc::clone(layout)) {
                Some(mut f) => {
                    f.reserve(tenant_rows(batch, tenant));
                    self.folds.push((tenant, f));
                    self.folds.len() - 1
                }
                None => return Ok(false),
            },
        };
        if self.folds[at].1.add(op).is_ok() {
            return Ok(true);
        }
        // Runs alone, after what the batch did to the table so far.
        self.flush_fold(at)?;
        Ok(false)
    }

    fn flush_fold(&mut self, at: usize) -> Result<(), ApplyError> {
        flush_folds(
            &mut self.folds[at..=at],
            None,
            &mut self.pending,
            self.failed_tenant,
        )
    }

    /// Runs the pending COPY, if any (one statement for all its parts).
    async fn finish_copy(&mut self) -> Result<(), ApplyError> {
        if let Some((tenant, parts)) = self.copying.take() {
            *self.copies += 1;
            if let Err(e) = copy(self.client, &parts).await {
                *self.failed_tenant = Some(tenant.clone());
                return Err(e);
            }
            crate::failpoint::hit("apply.after_copy");
        }
        Ok(())
    }

    /// Sends what is queued: the pending COPY first, then the pipelined statements, which
    /// were all queued after that COPY began. Every send goes through here, so that order
    /// holds.
    async fn send_queued(&mut self) -> Result<(), ApplyError> {
        self.finish_copy().await?;
        pipeline(
            self.client,
            self.prepared,
            &mut self.pending,
            self.failed_tenant,
        )
        .await
    }

    /// Sends everything still queued, folds included.
    async fn send_all(&mut self) -> Result<(), ApplyError> {
        flush_folds(&mut self.folds, None, &mut self.pending, self.failed_tenant)?;
        self.send_queued().await
    }
}

impl TargetWriter {
    /// Connects and makes sure the progress table exists (`<schema>.applied`).
    pub async fn connect(
        id: TargetId,
        endpoint: &Endpoint,
        schema: &str,
    ) -> Result<Self, ApplyError> {
        let client = endpoint.connect_sql().await?;
        Self::with_client(id, client, schema).await
    }

    /// A writer for apply lane `lane` of a target (see [`super::lanes`]).
    pub async fn connect_lane(
        id: TargetId,
        endpoint: &Endpoint,
        schema: &str,
        lane: usize,
    ) -> Result<Self, ApplyError> {
        let client = endpoint.connect_sql().await?;
        Self::with_client_lane(id, client, schema, lane).await
    }

    pub async fn with_client(
        id: TargetId,
        client: Client,
        schema: &str,
    ) -> Result<Self, ApplyError> {
        Self::with_client_lane(id, client, schema, 0).await
    }

    pub async fn with_client_lane(
        id: TargetId,
        client: Client,
        schema: &str,
        lane: usize,
    ) -> Result<Self, ApplyError> {
        let progress_table = ensure_progress_table(&client, schema).await?;
        let mut w = TargetWriter {
            id,
            client,
            progress_table,
            lane,
            lanes_table: lanes_table(schema),
            applied: HashMap::new(),
            spreadable: HashMap::new(),
            catalog: TargetCatalog::new(),
            failed_tenant: None,
            prepared: HashMap::new(),
            open: false,
            record: None,
            compact: false,
            replay: HashMap::new(),
            stats: WriterStats::default(),
        };
        w.load_applied().await?;
        Ok(w)
    }

    pub fn id(&self) -> &TargetId {
        &self.id
    }

    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// This lane's applied position per tenant.
    pub fn applied_positions(&self) -> &HashMap<TenantId, Lsn> {
        &self.applied
    }

    /// Raises this lane's positions to `positions` where they are further: what this lane
    /// committed, or what lane 0 recorded for it (see [`Self::commit_covering`]), so that
    /// what it holds in memory is what the target says. A position never moves back.
    pub fn hold_through(&mut self, positions: impl IntoIterator<Item = (TenantId, Lsn)>) {
        raise(&mut self.applied, positions);
    }

    /// Tells the writer where the lanes stopped apart. A crash between the lanes' commits of
    /// one segment leaves, for each tenant of it, some lanes at the segment's end (`hi`) and
    /// the rest before it (`lo`). Replayed, the segment's transactions can be cut into lanes
    /// differently (whether a transaction is a barrier depends on the backfill state, which
    /// resumes from lane 0's record), so a lane's own position cannot say whether a given
    /// row change in (lo, hi] was applied: every such change is applied again, by whichever
    /// lane it now reaches, in its replayable form (see [`super::statement::build_replay`]).
    /// Each key's changes are in one lane per segment, in order, so the key holds a prefix
    /// of them and replaying them all ends where applying them once does. COPY chunks and
    /// backfill states only ever run on lane 0 and keep its position's rule.
    pub fn set_replay_windows(&mut self, windows: HashMap<TenantId, (Lsn, Lsn)>) {
        self.replay = windows;
    }

    /// Re-reads the applied positions from the target (the truth after a crash).
    pub async fn load_applied(&mut self) -> Result<BTreeMap<TenantId, Lsn>, ApplyError> {
        let progress = self.load_progress().await?;
        Ok(progress.into_iter().map(|(t, p)| (t, p.lsn)).collect())
    }

    /// Re-reads positions and backfill states from the target.
    pub async fn load_progress(&mut self) -> Result<BTreeMap<TenantId, Progress>, ApplyError> {
        let out = if self.lane == 0 {
            read_progress(&self.client, &self.progress_table).await?
        } else {
            read_lane(&self.client, &self.lanes_table, self.lane).await?
        };
        self.applied = out.iter().map(|(t, p)| (t.clone(), p.lsn)).collect();
        Ok(out)
    }

    /// The tenant whose part made the last failed [`TargetWriter::commit`] fail, if the
    /// failure happened inside one tenant's work.
    pub fn failed_tenant(&self) -> Option<&TenantId> {
        self.failed_tenant.as_ref()
    }

    /// Applies like a replication apply worker: triggers, including foreign-key actions,
    /// do not fire, so rows may arrive in chunk order and cascades are not applied twice
    /// (the source's cascaded changes are in the stream). Needs superuser or
    /// `GRANT SET ON PARAMETER session_replication_role`; returns false when refused.
    /// Also enables folding row changes into set-based statements (see [`Self::commit`]).
    pub async fn use_replica_role(&mut self) -> Result<bool, ApplyError> {
        self.compact = set_role(
            &self.client,
            FOLDING_SESSION,
            "setting up the folding session",
        )
        .await?;
        Ok(self.compact)
    }

    /// Sets a setting for the rest of the session (outside any transaction of the writer).
    pub async fn set_session(&mut self, setting: &str, value: &str) -> Result<(), ApplyError> {
        self.end_open().await?;
        self.client
            .execute("SELECT set_config($1, $2, false)", &[&setting, &value])
            .await
            .map_err(ClusterError::sql("changing a session setting"))?;
        Ok(())
    }

    /// Whether the connection is gone (a new writer must be connected).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub fn applied(&self, tenant: &TenantId) -> Lsn {
        self.applied.get(tenant).copied().unwrap_or(Lsn::INVALID)
    }

    /// The target table's layout (see [`TargetCatalog::table`]).
    pub async fn table(
        &mut self,
        name: &QualifiedName,
        identity: &[bool],
        tenant_column: Option<&str>,
    ) -> Result<Arc<TargetTable>, ApplyError> {
        self.catalog
            .table(&self.client, name, identity, tenant_column)
            .await
    }

    /// Applies `batch` in one target transaction. Parts a tenant already holds (end <=
    /// applied) are skipped. Returns the highest end LSN the target now covers.
    ///
    /// Under `session_replication_role = replica` the row changes of each table are first
    /// folded into set-based statements ([`TableChanges`]); if that transaction fails for
    /// any reason but a lost connection, the batch is replayed change by change, which is
    /// the reference behaviour and names the exact change and tenant that fail.
    pub async fn commit(&mut self, batch: &[SourceTxn]) -> Result<CommitLsn, ApplyError> {
        self.commit_covering(batch, 1).await
    }

    /// [`Self::commit`] on lane 0 for all of `lanes` lanes: the commit also records the
    /// batch's positions as lanes 1..`lanes`' (see [`super::lanes`]: only true when every
    /// lane committed everything before `batch` and `batch` holds all of its changes).
    pub async fn commit_covering(
        &mut self,
        batch: &[SourceTxn],
        lanes: usize,
    ) -> Result<CommitLsn, ApplyError> {
        if lanes > 1 && self.lane != 0 {
            return Err(ApplyError::Corrupt(format!(
                "apply lane {} was asked to record other lanes' positions",
                self.lane
            )));
        }
        if self.compact {
            match self.apply(batch, true, lanes).await {
                Ok(lsn) => {
                    self.stats.compacted += 1;
                    return Ok(lsn);
                }
                Err(e) if self.client.is_closed() => return Err(e),
                Err(e) => {
                    self.stats.replayed += 1;
                    tracing::debug!(target = %self.id, error = %e, "compacted batch failed; replaying it change by change");
                }
            }
        }
        self.apply(batch, false, lanes).await
    }

    /// Applies `batch` in one target transaction, recording its positions for `lanes`
    /// lanes; a failure leaves no transaction open.
    async fn apply(
        &mut self,
        batch: &[SourceTxn],
        compact: bool,
        lanes: usize,
    ) -> Result<CommitLsn, ApplyError> {
        self.end_open().await?;
        let applied = self.apply_in_transaction(batch, compact, lanes).await;
        if applied.is_err() {
            // The error is what the caller needs; a failed ROLLBACK means a lost
            // connection, which the caller learns from `is_closed`.
            let _ = self.end_open().await;
        }
        applied
    }

    /// Rolls back the transaction an apply left open (it failed or was cancelled), so no
    /// lane idles in a transaction holding row locks, and every query runs outside one.
    async fn end_open(&mut self) -> Result<(), ApplyError> {
        if self.open {
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(ClusterError::sql("rolling back a target transaction"))?;
            self.open = false;
        }
        Ok(())
    }

    async fn apply_in_transaction(
        &mut self,
        batch: &[SourceTxn],
        compact: bool,
        lanes: usize,
    ) -> Result<CommitLsn, ApplyError> {
        let Some(last) = batch.last() else {
            return Ok(CommitLsn::NONE);
        };
        // BEGIN is sent now and its answer read just before COMMIT, so it travels with the
        // first statements instead of costing a round trip of its own (a commit of a small
        // in-sync batch is then two round trips: the statements, and record + COMMIT).
        // BEGIN fails only with the connection, which fails everything sent after it.
        let tx = &self.client;
        let mut begin = std::pin::pin!(tx.batch_execute("BEGIN"));
        let begun = match std::future::poll_fn(|cx| Poll::Ready(begin.as_mut().poll(cx))).await {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        };
        self.open = true;
        self.failed_tenant = None;
        let mut out = Outgoing {
            client: tx,
            prepared: &mut self.prepared,
            catalog: &mut self.catalog,
            failed_tenant: &mut self.failed_tenant,
            copies: &mut self.stats.copies,
            pending: Vec::new(),
            folds: Vec::new(),
            copying: None,
            last_layout: None,
        };
        let advanced = queue_batch(&mut out, batch, compact, &self.applied, &self.replay).await?;
        out.send_all().await?;
        drop(out);
        crate::failpoint::hit("apply.before_progress");
        if self.lane != 0 {
            if let Some((tenant, _)) = advanced.iter().find(|(_, (_, s))| s.is_some()) {
                // Lanes split batches so that states only reach lane 0 (see lanes::split).
                return Err(ApplyError::Corrupt(format!(
                    "a backfill state of {tenant} reached apply lane {}",
                    self.lane
                )));
            }
        }
        let record = record_statement(
            tx,
            &mut self.record,
            self.lane,
            &self.progress_table,
            &self.lanes_table,
        )
        .await?;
        let tenants: Vec<&str> = advanced.keys().map(TenantId::as_str).collect();
        let lsns: Vec<String> = advanced.values().map(|(l, _)| l.to_string()).collect();
        let states: Vec<Option<&str>> = advanced.values().map(|(_, s)| *s).collect();
        let lane = self.lane as i32;
        let covered = lanes.max(1) as i32;
        let params: &[&(dyn ToSql + Sync)] = if self.lane == 0 {
            &[&tenants, &lsns, &states, &covered]
        } else {
            &[&tenants, &lsns, &lane]
        };
        let begun = match begun {
            Some(r) => r,
            None => begin.as_mut().await,
        };
        begun.map_err(ClusterError::sql("starting a target transaction"))?;
        crate::failpoint::hit("apply.before_commit");
        let (recorded, committed) = if advanced.is_empty() {
            (Ok(0), tx.batch_execute("COMMIT").await)
        } else {
            // `join` polls in order, and a first poll sends: the record goes out first,
            // then the COMMIT, on the one connection, and the server runs them in order.
            futures_util::future::join(tx.execute(&record, params), tx.batch_execute("COMMIT"))
                .await
        };
        // Answered or not, a COMMIT ends the transaction (a failed record or a failed
        // commit turns it into a rollback; a lost connection ends it too).
        self.open = false;
        committed.map_err(ClusterError::sql("committing a target transaction"))?;
        recorded.map_err(ClusterError::sql("recording the applied position"))?;
        crate::failpoint::hit("apply.after_commit");
        // A replayed window can end below what this lane held already.
        raise(
            &mut self.applied,
            advanced.into_iter().map(|(tenant, (lsn, _))| (tenant, lsn)),
        );
        Ok(last.end)
    }

    /// Tenants with a recorded position.
    pub fn tenants(&self) -> BTreeSet<TenantId> {
        self.applied.keys().cloned().collect()
    }

    /// Whether `change`'s table may have its rows spread over lanes by key: its only
    /// unique index is the primary key, made of exactly the replica-identity columns.
    /// Otherwise two keys could conflict (a unique value moving from one row to another)
    /// and the table goes whole to one lane, which keeps its order.
    pub async fn spreads_by_key(&mut self, change: &RowChange) -> Result<bool, ApplyError> {
        let shape = &change.shape;
        if let Some(known) = self.spreadable.get(&shape.table) {
            return Ok(*known);
        }
        let layout = self
            .catalog
            .table(
                &self.client,
                &shape.table,
                &shape.identity,
                shape.tenant_column.as_deref(),
            )
            .await?;
        let key_is_pk = layout.columns.iter().all(|c| c.primary_key == c.identity)
            && layout.columns.iter().any(|c| c.primary_key);
        let others: bool = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i \
                  WHERE i.indrelid = to_regclass($1::text) \
                    AND (i.indisunique OR i.indisexclusion) AND NOT i.indisprimary)",
                &[&shape.table.quoted()],
            )
            .await
            .map_err(ClusterError::sql(format!(
                "reading the unique indexes of {}",
                shape.table
            )))?
            .get(0);
        let spreads = key_is_pk && !others;
        self.spreadable.insert(shape.table.clone(), spreads);
        Ok(spreads)
    }

    /// Settles the number of apply lanes (on lane 0's connection, before anything is
    /// applied): `wanted` if every lane recorded the same positions (a switch is then
    /// safe, and the new lanes start from lane 0's positions), else the count the lanes'
    /// records were written with, because a change half-applied by some lanes must be
    /// replayed to the same lanes.
    pub async fn settle_lanes(&mut self, wanted: usize) -> Result<usize, ApplyError> {
        let wanted = wanted.max(1);
        let tx = self
            .client
            .transaction()
            .await
            .map_err(ClusterError::sql("starting to settle the apply lanes"))?;
        tx.batch_execute(&format!(
            "LOCK TABLE {}, {} IN EXCLUSIVE MODE",
            self.progress_table, self.lanes_table
        ))
        .await
        .map_err(ClusterError::sql("locking the progress tables"))?;
        let recorded: i32 = tx
            .query_one(
                &format!(
                    "SELECT COALESCE(max(lane) + 1, 1) FROM {}",
                    self.lanes_table
                ),
                &[],
            )
            .await
            .map_err(ClusterError::sql("reading the apply lanes"))?
            .get(0);
        let recorded = recorded.max(1) as usize;
        if recorded == wanted {
            return Ok(wanted);
        }
        // Apart: some (tenant, lane) of the recorded lanes is missing or differs from lane 0.
        let apart: bool = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {p} a CROSS JOIN generate_series(1, $1 - 1) g(lane) \
                       LEFT JOIN {l} x ON x.tenant = a.tenant AND x.lane = g.lane \
                      WHERE x.lsn IS DISTINCT FROM a.lsn) \
                     OR EXISTS (SELECT 1 FROM {l} x WHERE NOT EXISTS \
                       (SELECT 1 FROM {p} a WHERE a.tenant = x.tenant))",
                    p = self.progress_table,
                    l = self.lanes_table
                ),
                &[&(recorded as i32)],
            )
            .await
            .map_err(ClusterError::sql("comparing the apply lanes"))?
            .get(0);
        if apart {
            return Ok(recorded);
        }
        tx.execute(
            &format!("DELETE FROM {} WHERE lane >= $1", self.lanes_table),
            &[&(wanted as i32)],
        )
        .await
        .map_err(ClusterError::sql("removing apply lanes"))?;
        tx.execute(
            &format!(
                "INSERT INTO {l} (tenant, lane, lsn) \
                 SELECT a.tenant, g.lane, a.lsn FROM {p} a CROSS JOIN generate_series(1, $1 - 1) g(lane) \
                 ON CONFLICT (tenant, lane) DO UPDATE SET lsn = EXCLUDED.lsn",
                p = self.progress_table,
                l = self.lanes_table
            ),
            &[&(wanted as i32)],
        )
        .await
        .map_err(ClusterError::sql("adding apply lanes"))?;
        tx.commit()
            .await
            .map_err(ClusterError::sql("committing the apply lanes"))?;
        Ok(wanted)
    }
}

/// `SET session_replication_role = replica` on `client`; false when not permitted.
pub async fn replica_role(client: &Client) -> Result<bool, ApplyError> {
    set_role(
        client,
        "SET session_replication_role = replica",
        "setting session_replication_role",
    )
    .await
}

/// The replica role, and the plan shape every folded statement is meant to have: one index
/// probe per key of its `unnest`ed arrays (a nested loop). Keys are unique in a statement,
/// so its cost is proportional to the changes it carries. Left to its cost model, the
/// planner (random_page_cost 4, as if the table were not cached) switches to a hash or merge
/// join that reads the whole table once a statement carries ~1 % of its keys: an UPDATE of
/// 20,000 keys of a 1,000,000-row table took 0.49–0.67 s that way against 0.12–0.18 s
/// probing (PostgreSQL 15). Memoize only adds a cache lookup per key when no key repeats.
/// The planner still joins some other way if no index fits. `set_config` over `pg_settings`
/// sets only the settings this server has (no `enable_memoize` before PostgreSQL 14). In one
/// simple query: if the role is refused, nothing after it runs.
const FOLDING_SESSION: &str = "SET session_replication_role = replica; \
     SELECT set_config(name, 'off', false) FROM pg_settings \
      WHERE name IN ('enable_hashjoin', 'enable_mergejoin', 'enable_memoize')";

/// Runs `sql`, which sets the replica role first; false when the role is refused.
async fn set_role(client: &Client, sql: &str, what: &str) -> Result<bool, ApplyError> {
    match client.batch_execute(sql).await {
        Ok(()) => Ok(true),
        Err(e) if e.code().map(|c| c.code()) == Some("42501") => Ok(false),
        Err(e) => Err(ClusterError::sql(what)(e).into()),
    }
}
