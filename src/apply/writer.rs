//! One target's writer: batches of source transactions in one target transaction, with the
//! applied source position recorded in the same transaction.
//!
//! ```text
//!   [txn end=100: acme ops] [txn end=120: acme, globex ops] ... ──► BEGIN
//!        skip parts with end <= applied[tenant]                      statements…
//!                                                                    upsert switchyard.applied
//!                                                                    COMMIT ──► applied[tenant] = max end
//! ```
//!
//! Invariants:
//! - Rows and the applied position commit together or not at all, so after any crash the
//!   target itself says exactly which source transactions it holds: replaying from an earlier
//!   position skips them (exactly once), whatever RocksDB or the slot say.
//! - Source order is kept: batches are applied in the order given, statements in the order of
//!   their source transaction.
//! - A failed batch rolls back entirely and leaves the in-memory positions untouched.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::Client;

use super::statement::{Statement, TargetColumn, TargetTable};
use super::{execute, ApplyError};
use crate::cluster::{ClusterError, Endpoint};
use crate::lsn::Lsn;
use crate::sql::{quote_ident, QualifiedName};
use crate::tenant::{TargetId, TenantId};

/// One unit of work inside a target transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    Statement(Statement),
    /// Rows inserted with COPY (backfill chunks): values as text, NULL as `None`.
    Copy(CopyRows),
}

impl From<Statement> for Work {
    fn from(st: Statement) -> Work {
        Work::Statement(st)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyRows {
    pub table: QualifiedName,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl CopyRows {
    /// COPY text format: tab-separated, `\N` for NULL, backslash escapes for the
    /// separators, so any value (tabs, newlines, backslashes included) round-trips.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows.len() * 64);
        for row in &self.rows {
            for (i, v) in row.iter().enumerate() {
                if i > 0 {
                    out.push(b'\t');
                }
                match v {
                    None => out.extend_from_slice(b"\\N"),
                    Some(text) => {
                        for &b in text.as_bytes() {
                            match b {
                                b'\\' => out.extend_from_slice(b"\\\\"),
                                b'\t' => out.extend_from_slice(b"\\t"),
                                b'\n' => out.extend_from_slice(b"\\n"),
                                b'\r' => out.extend_from_slice(b"\\r"),
                                b => out.push(b),
                            }
                        }
                    }
                }
            }
            out.push(b'\n');
        }
        out
    }
}

/// One source transaction's work for this target, split by tenant.
#[derive(Clone, Debug, Default)]
pub struct SourceTxn {
    pub end_lsn: Lsn,
    pub parts: Vec<(TenantId, Vec<Work>)>,
}

pub struct TargetWriter {
    id: TargetId,
    client: Client,
    progress_table: String,
    applied: HashMap<TenantId, Lsn>,
    tables: HashMap<QualifiedName, TargetTable>,
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

    pub async fn with_client(
        id: TargetId,
        client: Client,
        schema: &str,
    ) -> Result<Self, ApplyError> {
        let progress_table = format!("{}.{}", quote_ident(schema), quote_ident("applied"));
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {progress_table} (
                   tenant text PRIMARY KEY,
                   lsn pg_lsn NOT NULL,
                   updated_at timestamptz NOT NULL DEFAULT now())",
                schema = quote_ident(schema)
            ))
            .await
            .map_err(ClusterError::sql("creating the progress table"))?;
        let mut w = TargetWriter {
            id,
            client,
            progress_table,
            applied: HashMap::new(),
            tables: HashMap::new(),
        };
        w.load_applied().await?;
        Ok(w)
    }

    pub fn id(&self) -> &TargetId {
        &self.id
    }

    /// Re-reads the applied positions from the target (the truth after a crash).
    pub async fn load_applied(&mut self) -> Result<BTreeMap<TenantId, Lsn>, ApplyError> {
        let rows = self
            .client
            .query(
                &format!("SELECT tenant, lsn::text FROM {}", self.progress_table),
                &[],
            )
            .await
            .map_err(ClusterError::sql("reading applied positions"))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let (tenant, lsn): (String, String) = (r.get(0), r.get(1));
            let (Ok(t), Ok(l)) = (TenantId::new(tenant.clone()), lsn.parse::<Lsn>()) else {
                return Err(ApplyError::Corrupt(format!(
                    "{} row for {tenant:?} holds {lsn:?}",
                    self.progress_table
                )));
            };
            out.insert(t, l);
        }
        self.applied = out.clone().into_iter().collect();
        Ok(out)
    }

    pub fn applied(&self, tenant: &TenantId) -> Lsn {
        self.applied.get(tenant).copied().unwrap_or(Lsn::INVALID)
    }

    /// The target table's columns (in the order the target defines them, which provisioning
    /// made equal to the source's), with the source's replica identity flags.
    pub async fn table(
        &mut self,
        name: &QualifiedName,
        identity: &[bool],
        tenant_column: Option<&str>,
    ) -> Result<&TargetTable, ApplyError> {
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
            let rows = self
                .client
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
            let table = TargetTable {
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
            };
            self.tables.insert(name.clone(), table);
        }
        Ok(self
            .tables
            .get(name)
            .expect("inserted above when missing or stale"))
    }

    /// Forgets cached table shapes (after DDL on the source).
    pub fn forget_tables(&mut self) {
        self.tables.clear();
    }

    /// Applies `batch` in one target transaction. Parts a tenant already holds (end <=
    /// applied) are skipped. Returns the highest end LSN the target now covers.
    pub async fn commit(&mut self, batch: &[SourceTxn]) -> Result<Lsn, ApplyError> {
        let Some(last) = batch.last() else {
            return Ok(Lsn::INVALID);
        };
        let tx = self
            .client
            .transaction()
            .await
            .map_err(ClusterError::sql("starting a target transaction"))?;
        let mut advanced: BTreeMap<TenantId, Lsn> = BTreeMap::new();
        for txn in batch {
            for (tenant, work) in &txn.parts {
                let held = self.applied.get(tenant).copied().unwrap_or(Lsn::INVALID);
                if txn.end_lsn <= held {
                    continue;
                }
                for w in work {
                    match w {
                        Work::Statement(st) => {
                            execute(&tx, st).await?;
                        }
                        Work::Copy(c) => copy(&tx, c).await?,
                    }
                }
                advanced.insert(tenant.clone(), txn.end_lsn);
            }
        }
        let upsert = format!(
            "INSERT INTO {} (tenant, lsn) VALUES ($1, $2::text::pg_lsn) \
             ON CONFLICT (tenant) DO UPDATE SET lsn = GREATEST({0}.lsn, EXCLUDED.lsn), updated_at = now()",
            self.progress_table
        );
        for (tenant, lsn) in &advanced {
            tx.execute(&upsert, &[&tenant.as_str(), &lsn.to_string()])
                .await
                .map_err(ClusterError::sql("recording the applied position"))?;
        }
        tx.commit()
            .await
            .map_err(ClusterError::sql("committing a target transaction"))?;
        for (tenant, lsn) in advanced {
            self.applied.insert(tenant, lsn);
        }
        Ok(last.end_lsn)
    }

    /// Tenants with a recorded position.
    pub fn tenants(&self) -> BTreeSet<TenantId> {
        self.applied.keys().cloned().collect()
    }
}

async fn copy(tx: &tokio_postgres::Transaction<'_>, rows: &CopyRows) -> Result<(), ApplyError> {
    use futures_util::SinkExt;
    if rows.rows.is_empty() {
        return Ok(());
    }
    let cols = rows
        .columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("COPY {} ({cols}) FROM STDIN", rows.table.quoted());
    let sink = tx
        .copy_in::<_, bytes::Bytes>(&sql)
        .await
        .map_err(ClusterError::sql(format!("starting {sql}")))?;
    futures_util::pin_mut!(sink);
    let data = rows.encode();
    for chunk in data.chunks(256 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .map_err(ClusterError::sql(format!("sending rows for {sql}")))?;
    }
    let n = sink
        .finish()
        .await
        .map_err(ClusterError::sql(format!("finishing {sql}")))?;
    if n != rows.rows.len() as u64 {
        return Err(ApplyError::Divergence {
            sql,
            expected: rows.rows.len() as u64,
            actual: n,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_every_separator() {
        let rows = CopyRows {
            table: QualifiedName::parse("a.b").unwrap(),
            columns: vec!["x".into(), "y".into()],
            rows: vec![
                vec![Some("plain".into()), None],
                vec![Some("tab\there\nnew\\back\rcr".into()), Some("\\N".into())],
            ],
        };
        assert_eq!(
            String::from_utf8(rows.encode()).unwrap(),
            "plain\t\\N\ntab\\there\\nnew\\\\back\\rcr\t\\\\N\n"
        );
    }
}
