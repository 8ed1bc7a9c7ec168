//! Backfill chunk readers: low watermark, one keyset SELECT, high watermark, each in its
//! own short autocommit transaction on the source.
//!
//! Invariants:
//! - The chunk's rows are handed to the pipeline *before* the high watermark is written, so
//!   when the pipeline meets the high watermark in the stream the rows are already queued.
//! - No transaction stays open across the three steps: the source never holds a snapshot
//!   for the backfill longer than one chunk SELECT.
//! - A failed reader reports the chunk as failed; the pipeline abandons the window and
//!   reads the range again, so a partly written window never leaks rows.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::backfill::chunk::{ChunkTable, Mark, Watermark, EMIT_SQL};
use crate::backfill::{ChunkSpec, Key};
use crate::cluster::{ClusterError, Endpoint};
use crate::error::Error;
use crate::sql::QualifiedName;
use crate::tenant::TenantId;

/// One chunk to read.
pub(crate) struct ChunkJob {
    pub run: u64,
    pub tenant: TenantId,
    pub table: QualifiedName,
    pub chunk: u64,
    pub spec: ChunkSpec,
    pub layout: ChunkTable,
}

#[derive(Debug)]
pub(crate) enum ChunkEvent {
    Rows {
        tenant: TenantId,
        table: QualifiedName,
        chunk: u64,
        rows: Vec<Vec<Option<String>>>,
        keys: Vec<Key>,
        /// Transactions in progress in the chunk's snapshot (32-bit xids, as pgoutput
        /// sends them).
        in_progress: Vec<u32>,
    },
    Failed {
        tenant: TenantId,
        table: QualifiedName,
        chunk: u64,
        error: Error,
    },
}

/// Source connections for chunk readers, reused across chunks.
pub(crate) struct Pool {
    endpoint: Endpoint,
    idle: Mutex<Vec<Client>>,
}

impl Pool {
    pub fn new(endpoint: Endpoint) -> Arc<Pool> {
        Arc::new(Pool {
            endpoint,
            idle: Mutex::new(Vec::new()),
        })
    }

    async fn get(&self) -> Result<Client, ClusterError> {
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(c) if !c.is_closed() => Ok(c),
            _ => {
                let c = self.endpoint.connect_sql().await?;
                // A chunk SELECT is meant to be short; a stuck one must not pin the source.
                c.batch_execute("SET statement_timeout = '10min'; SET lock_timeout = '10s'")
                    .await
                    .map_err(ClusterError::sql("setting up a backfill connection"))?;
                Ok(c)
            }
        }
    }

    fn put(&self, c: Client) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    }
}

pub(crate) fn spawn(job: ChunkJob, pool: Arc<Pool>, events: mpsc::UnboundedSender<ChunkEvent>) {
    tokio::spawn(async move {
        let (tenant, table, chunk) = (job.tenant.clone(), job.table.clone(), job.chunk);
        if let Err(error) = read(&job, &pool, &events).await {
            let _ = events.send(ChunkEvent::Failed {
                tenant,
                table,
                chunk,
                error,
            });
        }
    });
}

async fn read(
    job: &ChunkJob,
    pool: &Pool,
    events: &mpsc::UnboundedSender<ChunkEvent>,
) -> Result<(), Error> {
    let mut client = pool.get().await?;
    let mark = |m| {
        Watermark {
            run: job.run,
            tenant: job.tenant.to_string(),
            table: job.table.to_string(),
            chunk: job.chunk,
            mark: m,
        }
        .to_json()
    };
    client
        .execute(EMIT_SQL, &[&mark(Mark::Low)])
        .await
        .map_err(ClusterError::sql("writing a low watermark"))?;
    let (sql, params) = job.layout.query(job.tenant.as_str(), &job.spec);
    let types = vec![Type::TEXT; params.len()];
    // One snapshot for the list of running transactions and the chunk: a transaction whose
    // commit record precedes the low watermark but which was not yet visible when the
    // snapshot was taken shows up in that list, and the pipeline reads the chunk again.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(ClusterError::sql("starting a chunk snapshot"))?;
    let in_progress: Vec<i64> = tx
        .query_one(
            "SELECT coalesce(array_agg((x::text::numeric % 4294967296)::bigint), '{}') \
               FROM pg_snapshot_xip(pg_current_snapshot()) AS x",
            &[],
        )
        .await
        .map_err(ClusterError::sql("reading the chunk snapshot"))?
        .get(0);
    let statement = tx
        .prepare_typed(&sql, &types)
        .await
        .map_err(ClusterError::sql(format!(
            "preparing the chunk query on {}",
            job.table
        )))?;
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    let found = tx
        .query(&statement, &refs)
        .await
        .map_err(ClusterError::sql(format!(
            "reading a chunk of {}",
            job.table
        )))?;
    tx.commit()
        .await
        .map_err(ClusterError::sql("ending a chunk snapshot"))?;
    let width = job.layout.columns.len();
    let mut rows = Vec::with_capacity(found.len());
    let mut keys = Vec::with_capacity(found.len());
    for r in &found {
        let row: Vec<Option<String>> = (0..width).map(|i| r.get(i)).collect();
        let texts: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
        let key = job.layout.key_of(&texts).ok_or_else(|| {
            Error::Move(super::MoveError::KeyValue {
                table: job.table.to_string(),
            })
        })?;
        keys.push(key);
        rows.push(row);
    }
    if events
        .send(ChunkEvent::Rows {
            tenant: job.tenant.clone(),
            table: job.table.clone(),
            chunk: job.chunk,
            rows,
            keys,
            in_progress: in_progress.into_iter().map(|x| x as u32).collect(),
        })
        .is_err()
    {
        return Ok(());
    }
    client
        .execute(EMIT_SQL, &[&mark(Mark::High)])
        .await
        .map_err(ClusterError::sql("writing a high watermark"))?;
    pool.put(client);
    Ok(())
}
