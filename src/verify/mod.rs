//! Verification: does the target hold exactly the tenant's rows of the source?
//!
//! ```text
//!   per table, keyset chunks of the source (boundaries read from the source):
//!     source:  count(*), sum(hash(row))  WHERE tenant AND after < key <= upto  ─┐ equal? next chunk
//!     target:  the same statement on the target table                        ─┘ else: wait until the
//!              slot confirmed the source's position, re-check (bounded), report what stays different
//!   isolation: rows in the target tables that belong to another tenant
//! ```
//!
//! Invariants:
//! - Never a long transaction: every statement runs on its own (autocommit) and reads one
//!   chunk, so verification can run next to production writes for as long as it takes.
//! - The comparison is order-independent (count and a sum of 64-bit row hashes per chunk)
//!   and both sessions render values with the same settings (time zone, date and float
//!   formats), so equal rows hash equally on two clusters.
//! - A chunk is reported as different only after it stayed different once the target had
//!   applied everything the source showed (the slot's confirmed position passed the source
//!   position read after the source statement). A chunk that still differs is compared row
//!   by row, then only its differing rows are compared again, `rechecks` times, each after
//!   the target caught up: a chunk under constant writes never matches as a whole, but a
//!   row that is not rewritten all the time does, so live writes make rows differ for a
//!   moment, never for good.
//! - Names are quoted and values bound as parameters, as everywhere.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::backfill::chunk::ChunkTable;
use crate::backfill::{Key, KeyValue};
use crate::cluster::{query_text_params, ClusterError};
use crate::lsn::Lsn;
use crate::sql::{quote_ident, QualifiedName};

/// Settings both sessions use, so that values render identically as text.
pub const SESSION_SQL: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 1; SET bytea_output = 'hex'; \
     SET standard_conforming_strings = on";

/// Errors of verification itself (a difference is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{table}: a key value read back from the source does not parse")]
    Key { table: String },
}

/// One table to compare: the source layout and where its rows went.
#[derive(Clone, Debug)]
pub struct VerifyTable {
    pub chunk: ChunkTable,
    pub target: QualifiedName,
}

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Rows per compared chunk.
    pub chunk_rows: usize,
    /// How often a different chunk is compared again before it is reported.
    pub rechecks: u32,
    /// The slot whose confirmed position tells that the target caught up; without it a
    /// different chunk is re-checked after `settle` instead.
    pub slot: Option<String>,
    /// How long to wait for the slot to pass a position (or to settle without a slot).
    pub settle: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            chunk_rows: 50_000,
            rechecks: 5,
            slot: None,
            settle: Duration::from_secs(10),
        }
    }
}

/// A chunk that stayed different.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ChunkDiff {
    /// Keys after this one (none: from the start) ...
    pub after: Option<Vec<String>>,
    /// ... up to and including this one (none: to the end).
    pub upto: Option<Vec<String>>,
    pub source_rows: i64,
    pub target_rows: i64,
    /// Keys of rows that stayed different (the first ten).
    pub keys: Vec<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    pub target: String,
    pub source_rows: i64,
    pub target_rows: i64,
    pub chunks: u64,
    /// Chunks compared more than once before they matched (or were reported).
    pub rechecked: u64,
    pub different: Vec<ChunkDiff>,
    /// Rows in the target table that belong to another tenant (shared layouts only).
    pub foreign_rows: i64,
    /// Every key of the different chunks' rows that stayed different (all of them, where
    /// `different` shows ten per chunk): what a comparison at a consistent point settles.
    #[serde(skip)]
    pub unsettled: Vec<Key>,
}

impl TableReport {
    pub fn ok(&self) -> bool {
        self.different.is_empty() && self.foreign_rows == 0
    }

    /// Whether the difference is only rows that kept changing under the re-checks (a
    /// different count alone, or foreign rows, are differences for good).
    fn only_unsettled_rows(&self) -> bool {
        self.foreign_rows == 0 && self.different.iter().all(|c| !c.keys.is_empty())
    }
}

/// Rows that stayed different under live writes, per table (by index into the verified
/// tables): to be compared again where the tenant's writes are paused and the target holds
/// all of them.
pub type Unsettled = Vec<(usize, Vec<Key>)>;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VerifyReport {
    pub tenant: String,
    pub ok: bool,
    pub tables: Vec<TableReport>,
    pub millis: u64,
}

impl VerifyReport {
    /// One line for logs and the registry.
    pub fn summary(&self) -> String {
        let rows: i64 = self.tables.iter().map(|t| t.source_rows).sum();
        if self.ok {
            return format!(
                "ok: {} tables, {rows} rows equal, no foreign rows",
                self.tables.len()
            );
        }
        let bad: Vec<String> = self
            .tables
            .iter()
            .filter(|t| !t.ok())
            .map(|t| {
                format!(
                    "{} ({} different chunks, source {} rows, target {} rows, {} rows of other tenants)",
                    t.table,
                    t.different.len(),
                    t.source_rows,
                    t.target_rows,
                    t.foreign_rows
                )
            })
            .collect();
        format!("different: {}", bad.join("; "))
    }

    /// The rows to compare again at a consistent point, if every difference is of rows
    /// that kept changing and there are at most `cap` of them; `None` if the report is a
    /// verdict as it stands (equal, or different for good).
    pub fn unsettled(&self, cap: usize) -> Option<Unsettled> {
        if self.ok || !self.tables.iter().all(TableReport::only_unsettled_rows) {
            return None;
        }
        let rows: usize = self.tables.iter().map(|t| t.unsettled.len()).sum();
        if rows == 0 || rows > cap {
            return None;
        }
        Some(
            self.tables
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.unsettled.is_empty())
                .map(|(i, t)| (i, t.unsettled.clone()))
                .collect(),
        )
    }
}

/// A statement with its text parameters.
type Query = (String, Vec<Option<String>>);

fn bind(params: &mut Vec<Option<String>>, v: String) -> String {
    params.push(Some(v));
    format!("${}", params.len())
}

fn key_row(chunk: &ChunkTable) -> String {
    format!(
        "({})",
        (0..chunk.key.len())
            .map(|i| chunk.key_expr(i))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn key_literal(chunk: &ChunkTable, params: &mut Vec<Option<String>>, key: &Key) -> String {
    let parts: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let p = bind(params, ChunkTable::key_text(v));
            ChunkTable::key_param(chunk.key[i].1, &p)
        })
        .collect();
    format!("({})", parts.join(", "))
}

/// `WHERE` conditions selecting the tenant's rows with keys in `(after, upto]`.
fn range_conditions(
    chunk: &ChunkTable,
    tenant: &str,
    after: Option<&Key>,
    upto: Option<&Key>,
    params: &mut Vec<Option<String>>,
) -> Vec<String> {
    let mut conds = Vec::new();
    if let Some((col, ty)) = &chunk.tenant {
        let p = bind(params, tenant.to_owned());
        conds.push(format!("src.{} = CAST({p} AS {ty})", quote_ident(col)));
    }
    let mut bind = |v: String| bind(params, v);
    if let Some(k) = after {
        conds.push(chunk.key_compare(">", k, &mut bind));
    }
    if let Some(k) = upto {
        conds.push(chunk.key_compare("<=", k, &mut bind));
    }
    conds
}

/// The key columns as text, in key order.
fn key_texts_sql(chunk: &ChunkTable) -> String {
    chunk
        .key
        .iter()
        .map(|(i, _)| format!("src.{}::text", quote_ident(&chunk.columns[*i])))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every moved column, for `ROW(…)`: the source's columns, so a target with extra columns
/// compares only what was moved.
fn row_sql(chunk: &ChunkTable) -> String {
    chunk
        .columns
        .iter()
        .map(|c| format!("src.{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn where_clause(conds: &[String]) -> String {
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

/// The last key of the chunk of `rows` keys after `after` (none: fewer rows remain).
pub fn boundary_query(chunk: &ChunkTable, tenant: &str, after: Option<&Key>, rows: usize) -> Query {
    let mut params = Vec::new();
    let conds = range_conditions(chunk, tenant, after, None, &mut params);
    let keys = key_texts_sql(chunk);
    let order = (0..chunk.key.len())
        .map(|i| chunk.key_expr(i))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {keys} FROM {} AS src{} ORDER BY {order} LIMIT 1 OFFSET {}",
        chunk.source.quoted(),
        where_clause(&conds),
        rows.saturating_sub(1)
    );
    (sql, params)
}

/// Count and hash sum (as text: a numeric) of the tenant's rows of `table` with keys in
/// `(after, upto]`. `table` is the source table or its target; the columns are the
/// source's, so a target with extra columns compares only what was moved.
pub fn hash_query(
    chunk: &ChunkTable,
    table: &QualifiedName,
    tenant: &str,
    after: Option<&Key>,
    upto: Option<&Key>,
) -> Query {
    let mut params = Vec::new();
    let conds = range_conditions(chunk, tenant, after, upto, &mut params);
    let row = row_sql(chunk);
    let sql = format!(
        "SELECT count(*), coalesce(sum(hashtextextended(ROW({row})::text, 0)), 0)::text FROM {} AS src{}",
        table.quoted(),
        where_clause(&conds)
    );
    (sql, params)
}

/// Rows of other tenants in a target table (`None` for schema-per-tenant layouts, where
/// the table is the tenant's as a whole).
pub fn foreign_query(chunk: &ChunkTable, target: &QualifiedName, tenant: &str) -> Option<Query> {
    let (col, ty) = chunk.tenant.as_ref()?;
    Some((
        format!(
            "SELECT count(*) FROM {} AS src WHERE src.{} IS DISTINCT FROM CAST($1 AS {ty})",
            target.quoted(),
            quote_ident(col)
        ),
        vec![Some(tenant.to_owned())],
    ))
}

/// Runs a query whose parameters are all text (the SQL casts them to the column types).
async fn rows(
    client: &Client,
    (sql, params): &Query,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    query_text_params(client, sql, params).await
}

async fn hash(client: &Client, query: &Query, what: &str) -> Result<(i64, String), ClusterError> {
    let r = rows(client, query)
        .await
        .map_err(ClusterError::sql(format!("hashing {what}")))?;
    // An aggregate without GROUP BY returns exactly one row.
    Ok(r.first()
        .map(|row| (row.get(0), row.get(1)))
        .unwrap_or((0, "0".to_owned())))
}

/// The insert position: it covers every commit the statements before saw, also under
/// `synchronous_commit = off`, where the write position may still trail them.
pub(crate) async fn current_lsn(client: &Client) -> Result<Lsn, ClusterError> {
    let text: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(ClusterError::sql("reading the source position"))?
        .get(0);
    Ok(text.parse().unwrap_or(Lsn::INVALID))
}

/// Waits until `slot` confirmed `lsn` (or `settle` passed); false if it did not.
async fn wait_confirmed(client: &Client, slot: &str, lsn: Lsn, settle: Duration) -> bool {
    let deadline = Instant::now() + settle;
    loop {
        let confirmed = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|t| t.parse::<Lsn>().ok());
        if confirmed.is_some_and(|c| c >= lsn) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the target holds what the source had at `at` (or a while, without a slot).
async fn settle(source: &Client, opts: &VerifyOptions, at: Lsn) {
    match &opts.slot {
        Some(slot) => {
            wait_confirmed(source, slot, at, opts.settle).await;
        }
        None => tokio::time::sleep(opts.settle.min(Duration::from_secs(1))).await,
    }
}

/// Each row's key and hash, for the tenant's rows of `table` in `(after, upto]` or with
/// one of `keys`.
pub fn row_hash_query(
    chunk: &ChunkTable,
    table: &QualifiedName,
    tenant: &str,
    range: Option<(Option<&Key>, Option<&Key>)>,
    keys: &[Key],
) -> Query {
    let mut params = Vec::new();
    let (after, upto) = range.unwrap_or((None, None));
    let mut conds = range_conditions(chunk, tenant, after, upto, &mut params);
    if range.is_none() {
        let list: Vec<String> = keys
            .iter()
            .map(|k| key_literal(chunk, &mut params, k))
            .collect();
        conds.push(if list.is_empty() {
            "false".to_owned()
        } else {
            format!("{} IN ({})", key_row(chunk), list.join(", "))
        });
    }
    let key_cols = key_texts_sql(chunk);
    let row = row_sql(chunk);
    (
        format!(
            "SELECT {key_cols}, hashtextextended(ROW({row})::text, 0) FROM {} AS src{}",
            table.quoted(),
            where_clause(&conds)
        ),
        params,
    )
}

async fn row_hashes(
    client: &Client,
    t: &VerifyTable,
    query: &Query,
) -> Result<std::collections::HashMap<Key, i64>, VerifyError> {
    let name = t.chunk.source.to_string();
    let n = t.chunk.key.len();
    let mut out = std::collections::HashMap::new();
    for row in rows(client, query)
        .await
        .map_err(ClusterError::sql(format!("hashing rows of {name}")))?
    {
        let texts: Vec<Option<&str>> = (0..n).map(|i| row.get(i)).collect();
        let key = t.chunk.key_from(&texts).ok_or_else(|| VerifyError::Key {
            table: name.clone(),
        })?;
        out.insert(key, row.get(n));
    }
    Ok(out)
}

/// Keys whose rows differ (or exist on one side only) between the two hash maps, sorted.
pub fn differing(
    a: &std::collections::HashMap<Key, i64>,
    b: &std::collections::HashMap<Key, i64>,
) -> Vec<Key> {
    let mut keys: Vec<Key> = a
        .iter()
        .filter(|(k, h)| b.get(*k) != Some(*h))
        .map(|(k, _)| k.clone())
        .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
        .collect();
    keys.sort();
    keys
}

async fn row_diff(
    source: &Client,
    target: &Client,
    t: &VerifyTable,
    tenant: &str,
    after: Option<&Key>,
    upto: Option<&Key>,
) -> Result<Vec<Key>, VerifyError> {
    let range = Some((after, upto));
    let a = row_hashes(
        source,
        t,
        &row_hash_query(&t.chunk, &t.chunk.source, tenant, range, &[]),
    )
    .await?;
    let b = row_hashes(
        target,
        t,
        &row_hash_query(&t.chunk, &t.target, tenant, range, &[]),
    )
    .await?;
    Ok(differing(&a, &b))
}

/// The keys among `keys` whose rows differ between `source` and `target` (sessions
/// prepared with [`SESSION_SQL`]).
pub async fn key_diff(
    source: &Client,
    target: &Client,
    t: &VerifyTable,
    tenant: &str,
    keys: &[Key],
) -> Result<Vec<Key>, VerifyError> {
    // Every part on both sides at once: inside a cutover's pause each round trip is the
    // tenant's wait, and the sessions pipeline what they are sent.
    let parts = keys.chunks(1000).map(|part| async move {
        let (a, b) = futures_util::future::try_join(
            row_hashes(
                source,
                t,
                &row_hash_query(&t.chunk, &t.chunk.source, tenant, None, part),
            ),
            row_hashes(
                target,
                t,
                &row_hash_query(&t.chunk, &t.target, tenant, None, part),
            ),
        )
        .await?;
        Ok::<_, VerifyError>(differing(&a, &b))
    });
    let mut still: Vec<Key> = futures_util::future::try_join_all(parts)
        .await?
        .into_iter()
        .flatten()
        .collect();
    still.sort();
    Ok(still)
}

fn key_texts(key: Option<&Key>) -> Option<Vec<String>> {
    key.map(|k| k.iter().map(ChunkTable::key_text).collect())
}

/// Compares the tenant's rows of every table on `source` and `target`.
pub async fn verify(
    source: &Client,
    target: &Client,
    tenant: &str,
    tables: &[VerifyTable],
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    for c in [source, target] {
        c.batch_execute(SESSION_SQL)
            .await
            .map_err(ClusterError::sql("preparing a verification session"))?;
    }
    let mut reports = Vec::new();
    for t in tables {
        reports.push(verify_table(source, target, tenant, t, opts).await?);
    }
    Ok(VerifyReport {
        tenant: tenant.to_owned(),
        ok: reports.iter().all(TableReport::ok),
        tables: reports,
        millis: started.elapsed().as_millis() as u64,
    })
}

async fn verify_table(
    source: &Client,
    target: &Client,
    tenant: &str,
    t: &VerifyTable,
    opts: &VerifyOptions,
) -> Result<TableReport, VerifyError> {
    let name = t.chunk.source.to_string();
    let mut report = TableReport {
        table: name.clone(),
        target: t.target.to_string(),
        source_rows: 0,
        target_rows: 0,
        chunks: 0,
        rechecked: 0,
        different: Vec::new(),
        foreign_rows: 0,
        unsettled: Vec::new(),
    };
    let mut after: Option<Key> = None;
    loop {
        let bounds = boundary_query(&t.chunk, tenant, after.as_ref(), opts.chunk_rows);
        let upto: Option<Key> = match rows(source, &bounds)
            .await
            .map_err(ClusterError::sql(format!("reading chunk bounds of {name}")))?
            .into_iter()
            .next()
        {
            Some(row) => {
                let texts: Vec<Option<&str>> = (0..t.chunk.key.len()).map(|i| row.get(i)).collect();
                Some(t.chunk.key_from(&texts).ok_or_else(|| VerifyError::Key {
                    table: name.clone(),
                })?)
            }
            None => None,
        };
        let src_q = hash_query(
            &t.chunk,
            &t.chunk.source,
            tenant,
            after.as_ref(),
            upto.as_ref(),
        );
        let dst_q = hash_query(&t.chunk, &t.target, tenant, after.as_ref(), upto.as_ref());
        let src = hash(source, &src_q, &name).await?;
        let at = current_lsn(source).await?;
        let mut dst = hash(target, &dst_q, &name).await?;
        if src != dst && opts.rechecks > 0 {
            // The target may still be applying what the source statement saw: once the
            // slot confirmed `at`, it holds at least that.
            report.rechecked += 1;
            settle(source, opts, at).await;
            dst = hash(target, &dst_q, &name).await?;
        }
        let mut keys = Vec::new();
        if src != dst && opts.rechecks > 0 {
            // A chunk that keeps being written never matches as a whole: compare its rows,
            // then only the rows that differ, each time after the target caught up.
            keys = row_diff(source, target, t, tenant, after.as_ref(), upto.as_ref()).await?;
            let mut attempt = 1;
            while !keys.is_empty() && attempt < opts.rechecks {
                attempt += 1;
                report.rechecked += 1;
                let at = current_lsn(source).await?;
                settle(source, opts, at).await;
                keys = key_diff(source, target, t, tenant, &keys).await?;
            }
        }
        report.chunks += 1;
        report.source_rows += src.0;
        report.target_rows += dst.0;
        if src != dst && (opts.rechecks == 0 || !keys.is_empty()) {
            report.different.push(ChunkDiff {
                after: key_texts(after.as_ref()),
                upto: key_texts(upto.as_ref()),
                source_rows: src.0,
                target_rows: dst.0,
                keys: keys
                    .iter()
                    .take(10)
                    .map(|k| k.iter().map(ChunkTable::key_text).collect())
                    .collect(),
            });
            report.unsettled.extend(keys);
        }
        match upto {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    if let Some(q) = foreign_query(&t.chunk, &t.target, tenant) {
        let what = format!("counting other tenants' rows in {}", t.target);
        report.foreign_rows = rows(target, &q)
            .await
            .map_err(ClusterError::sql(what))?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
    }
    Ok(report)
}

/// A key value as the chunk query reads it back (for callers holding text keys).
pub fn key_value(v: &KeyValue) -> String {
    ChunkTable::key_text(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::KeyKind;

    fn table() -> ChunkTable {
        ChunkTable {
            source: QualifiedName::new("public", "or\"ders").unwrap(),
            columns: vec!["tenant_id".into(), "id".into(), "note".into()],
            key: vec![(0, KeyKind::Int), (1, KeyKind::Int)],
            tenant: Some(("tenant_id".into(), "bigint".into())),
        }
    }

    #[test]
    fn hash_query_binds_values_and_quotes_names() {
        let t = table();
        let after = vec![KeyValue::Int(7), KeyValue::Int(10)];
        let upto = vec![KeyValue::Int(7), KeyValue::Int(99)];
        let target = QualifiedName::new("acme'; DROP", "or\"ders").unwrap();
        let (sql, params) = hash_query(&t, &target, "7", Some(&after), Some(&upto));
        assert!(
            sql.contains("FROM \"acme'; DROP\".\"or\"\"ders\" AS src"),
            "{sql}"
        );
        assert!(sql.contains(
            "hashtextextended(ROW(src.\"tenant_id\", src.\"id\", src.\"note\")::text, 0)"
        ));
        assert!(sql.contains("src.\"tenant_id\" = CAST($1 AS bigint)"));
        // The tenant column is pinned by its equality and left out of the key ranges, so
        // that the index starts at the range (see `ChunkTable::key_compare`).
        assert!(
            sql.contains("src.\"id\" > CAST($2 AS bigint) AND src.\"id\" <= CAST($3 AS bigint)"),
            "{sql}"
        );
        let expect: Vec<Option<String>> = ["7", "10", "99"]
            .iter()
            .map(|s| Some(s.to_string()))
            .collect();
        assert_eq!(params, expect);
    }

    #[test]
    fn boundaries_and_open_ranges() {
        let t = table();
        let (sql, params) = boundary_query(&t, "7", None, 1000);
        assert!(
            sql.ends_with("ORDER BY src.\"tenant_id\", src.\"id\" LIMIT 1 OFFSET 999"),
            "{sql}"
        );
        assert_eq!(params.len(), 1);
        let (sql, _) = hash_query(&t, &t.source, "7", None, None);
        assert!(!sql.contains('>') && !sql.contains("<="), "{sql}");
        let schema_mode = ChunkTable { tenant: None, ..t };
        let (sql, params) = hash_query(&schema_mode, &schema_mode.source, "7", None, None);
        assert!(!sql.contains("WHERE"), "{sql}");
        assert!(params.is_empty());
        assert!(foreign_query(&schema_mode, &schema_mode.source, "7").is_none());
    }

    #[test]
    fn text_keys_compare_bytewise() {
        let t = ChunkTable {
            source: QualifiedName::new("public", "users").unwrap(),
            columns: vec!["org".into(), "email".into()],
            key: vec![(0, KeyKind::Text), (1, KeyKind::Text)],
            tenant: Some(("org".into(), "text".into())),
        };
        let k = vec![KeyValue::Text("acme".into()), KeyValue::Text("a'b".into())];
        let (sql, params) = hash_query(&t, &t.source, "acme", Some(&k), None);
        assert!(sql.contains("src.\"email\" COLLATE \"C\""), "{sql}");
        assert!(params.contains(&Some("a'b".to_string())));
    }

    #[test]
    fn rows_differ_by_hash_or_by_presence() {
        let k = |i| vec![KeyValue::Int(i)];
        let a: std::collections::HashMap<Key, i64> = [(k(1), 10), (k(2), 20), (k(3), 30)].into();
        let b: std::collections::HashMap<Key, i64> = [(k(1), 10), (k(2), 21), (k(4), 40)].into();
        assert_eq!(differing(&a, &b), vec![k(2), k(3), k(4)]);
        assert!(differing(&a, &a).is_empty());
        let t = ChunkTable {
            source: QualifiedName::new("public", "orders").unwrap(),
            columns: vec!["tenant_id".into(), "id".into()],
            key: vec![(0, KeyKind::Int), (1, KeyKind::Int)],
            tenant: Some(("tenant_id".into(), "int".into())),
        };
        let keys = vec![
            vec![KeyValue::Int(7), KeyValue::Int(1)],
            vec![KeyValue::Int(7), KeyValue::Int(2)],
        ];
        let (sql, params) = row_hash_query(&t, &t.source, "7", None, &keys);
        assert!(sql.contains("IN ((CAST($2 AS bigint), CAST($3 AS bigint)), (CAST($4 AS bigint), CAST($5 AS bigint)))"), "{sql}");
        assert_eq!(params.len(), 5);
        let (sql, _) = row_hash_query(&t, &t.source, "7", None, &[]);
        assert!(sql.contains("AND false"), "{sql}");
    }

    #[test]
    fn the_summary_names_what_differs() {
        let mut t = TableReport {
            table: "public.orders".into(),
            target: "acme.orders".into(),
            source_rows: 10,
            target_rows: 9,
            chunks: 1,
            rechecked: 5,
            different: vec![ChunkDiff {
                after: None,
                upto: None,
                source_rows: 10,
                target_rows: 9,
                keys: vec![vec!["7".into(), "3".into()]],
            }],
            foreign_rows: 0,
            unsettled: vec![vec![KeyValue::Int(7), KeyValue::Int(3)]],
        };
        let r = VerifyReport {
            tenant: "acme".into(),
            ok: false,
            tables: vec![t.clone()],
            millis: 3,
        };
        assert!(r
            .summary()
            .contains("public.orders (1 different chunks, source 10 rows, target 9 rows"));
        t.different.clear();
        assert!(t.ok());
        t.foreign_rows = 1;
        assert!(!t.ok(), "a row of another tenant fails the isolation check");
    }

    #[test]
    fn only_rows_that_kept_changing_are_left_for_a_consistent_point() {
        let diff = |keys: Vec<Vec<String>>| ChunkDiff {
            after: None,
            upto: None,
            source_rows: 1,
            target_rows: 1,
            keys,
        };
        let table = |different: Vec<ChunkDiff>, unsettled: Vec<Key>, foreign_rows| TableReport {
            table: "public.pgbench_branches".into(),
            target: "b7.pgbench_branches".into(),
            source_rows: 1,
            target_rows: 1,
            chunks: 1,
            rechecked: 5,
            different,
            foreign_rows,
            unsettled,
        };
        let report = |tables: Vec<TableReport>| VerifyReport {
            tenant: "7".into(),
            ok: tables.iter().all(TableReport::ok),
            tables,
            millis: 1,
        };
        let hot = vec![KeyValue::Int(7)];
        let equal = table(vec![], vec![], 0);
        let changing = table(vec![diff(vec![vec!["7".into()]])], vec![hot.clone()], 0);
        assert_eq!(
            report(vec![equal.clone()]).unsettled(10),
            None,
            "equal: a verdict"
        );
        assert_eq!(
            report(vec![equal.clone(), changing.clone()]).unsettled(10),
            Some(vec![(1, vec![hot.clone()])])
        );
        assert_eq!(
            report(vec![changing.clone()]).unsettled(0),
            None,
            "more rows than the cap: a verdict as it stands"
        );
        let counted = table(vec![diff(vec![])], vec![], 0);
        assert_eq!(
            report(vec![changing.clone(), counted]).unsettled(10),
            None,
            "a chunk different without differing rows is different for good"
        );
        let foreign = table(vec![diff(vec![vec!["7".into()]])], vec![hot], 1);
        assert_eq!(report(vec![foreign]).unsettled(10), None);
    }
}
