//! Backfill chunk readers: low watermark, one keyset read (a SELECT, or COPY of a SELECT for
//! binary rows), high watermark, each in its own short transaction on the source.
//!
//! Invariants:
//! - The chunk's rows are handed to the pipeline *before* the high watermark is written, so
//!   when the pipeline meets the high watermark in the stream the rows are already queued.
//! - No transaction stays open across the three steps: the source never holds a snapshot
//!   for the backfill longer than one chunk SELECT.
//! - A failed reader reports the chunk as failed; the pipeline abandons the window and
//!   reads the range again, so a partly written window never leaks rows.
//! - A range reader goes on with the next chunk right after a full chunk's high watermark
//!   (its low watermark therefore follows that high one in the stream, so windows never
//!   overlap), but starts chunk n + 2 only once the pipeline has handled chunk n: at most
//!   one chunk is read ahead per table. Dropping the pipeline's sender stops it.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use futures_util::StreamExt;

use super::chunk::{ChunkTable, Mark, Watermark, EMIT_SQL};
use super::pace::Pace;
use super::{ChunkSpec, Cursor, Key};
use crate::apply::copy::{BinaryRowSplitter, CopyDataError};
use crate::apply::{CopyFormat, RowBuffer};
use crate::cluster::{ClusterError, Endpoint};
use crate::sql::QualifiedName;
use crate::tenant::TenantId;

/// Why a chunk could not be read. The pipeline reads the chunk's range again in any case;
/// the class of the error decides whether it also stops the tenant.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{table}: a row has a NULL or unreadable primary key value")]
    KeyValue { table: String },
    #[error("{table}: the chunk data the source sent is malformed: {detail}")]
    ChunkData { table: String, detail: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

type Error = ReadError;

/// One chunk to read.
pub(crate) struct ChunkJob {
    pub run: u64,
    pub tenant: TenantId,
    pub table: QualifiedName,
    pub chunk: u64,
    pub spec: ChunkSpec,
    pub layout: ChunkTable,
    /// For a range chunk: go on with the range right after this chunk's high watermark,
    /// without waiting for the pipeline to schedule the next one. The value is the last
    /// chunk whose high watermark the pipeline has handled; the reader starts chunk n + 2
    /// only once chunk n is handled (one chunk ahead at most), and stops when the sender
    /// is dropped.
    pub follow: Option<watch::Receiver<u64>>,
}

#[derive(Debug)]
pub(crate) enum ChunkEvent {
    Rows {
        tenant: TenantId,
        table: QualifiedName,
        chunk: u64,
        rows: RowBuffer,
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

/// A column's bytes as PostgreSQL sent them, whatever its type.
struct Raw<'a>(&'a [u8]);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Source connections for chunk readers, reused across chunks, and the pace of their reads
/// (`move.backfill_rows_per_sec`, over all readers).
pub(crate) struct Pool {
    endpoint: Endpoint,
    idle: Mutex<Vec<Client>>,
    pace: Mutex<Pace>,
}

impl Pool {
    pub fn new(endpoint: Endpoint, rows_per_sec: u64) -> Arc<Pool> {
        Arc::new(Pool {
            endpoint,
            idle: Mutex::new(Vec::new()),
            pace: Mutex::new(Pace::new(rows_per_sec)),
        })
    }

    /// Waits until a read of `rows` may start.
    async fn paced(&self, rows: usize) {
        let start = self
            .pace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reserve(std::time::Instant::now(), rows as u64);
        tokio::time::sleep_until(tokio::time::Instant::from_std(start)).await;
    }

    async fn get(&self) -> Result<Client, ClusterError> {
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(c) if !c.is_closed() => Ok(c),
            _ => {
                let c = self.endpoint.connect_sql().await?;
                // A chunk SELECT is meant to be short; a stuck one must not pin the source.
                // Chunk COPY queries inline values as literals, exact only with standard
                // strings (backslashes are not escapes).
                c.batch_execute(
                    "SET statement_timeout = '10min'; SET lock_timeout = '10s'; \
                     SET standard_conforming_strings = on",
                )
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

pub(crate) fn spawn(mut job: ChunkJob, pool: Arc<Pool>, events: mpsc::UnboundedSender<ChunkEvent>) {
    let span = tracing::info_span!("backfill", tenant = %job.tenant, table = %job.table);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let first = job.chunk;
            let mut format = None;
            loop {
                let (tenant, table, chunk) = (job.tenant.clone(), job.table.clone(), job.chunk);
                let last = match read(&job, &pool, &events, &mut format).await {
                    Ok(last) => last,
                    Err(error) => {
                        let _ = events.send(ChunkEvent::Failed {
                            tenant,
                            table,
                            chunk,
                            error,
                        });
                        return;
                    }
                };
                // A full range chunk: the range goes on after its last key.
                let (Some(last), ChunkSpec::Range { limit, .. }, Some(follow)) =
                    (last, &job.spec, job.follow.as_mut())
                else {
                    return;
                };
                if chunk > first
                    && follow
                        .wait_for(|handled| *handled + 1 >= chunk)
                        .await
                        .is_err()
                {
                    return;
                }
                job.spec = ChunkSpec::Range {
                    after: Cursor::After(last),
                    limit: *limit,
                };
                job.chunk += 1;
            }
        },
        span,
    ));
}

/// Reads one chunk; `format` caches the reader's COPY format (and its key columns' type
/// OIDs) once known. Returns the last
/// key of a full range chunk (where the range goes on).
async fn read(
    job: &ChunkJob,
    pool: &Pool,
    events: &mpsc::UnboundedSender<ChunkEvent>,
    format: &mut Option<(CopyFormat, Vec<u32>)>,
) -> Result<Option<Key>, Error> {
    pool.paced(match &job.spec {
        ChunkSpec::Range { limit, .. } => *limit,
        ChunkSpec::Keys(keys) => keys.len(),
    })
    .await;
    let mut client = pool.get().await?;
    let mark = |m| {
        Watermark {
            run: job.run,
            tenant: job.tenant.to_string(),
            // Quoted: a table name may hold dots and quotes, and must parse back exactly.
            table: job.table.quoted(),
            chunk: job.chunk,
            mark: m,
        }
        .to_json()
    };
    client
        .execute(EMIT_SQL, &[&mark(Mark::Low)])
        .await
        .map_err(ClusterError::sql("writing a low watermark"))?;
    crate::failpoint::hit("backfill.after_low_watermark");
    let params = job
        .layout
        .query(job.tenant.as_str(), &job.spec, CopyFormat::Binary)
        .1;
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
    let nkeys = job.layout.key.len();
    let width = job.layout.columns.len();
    if nkeys == 0 || width == 0 {
        // Setup refuses tables without a primary key; this is a guard, not a path.
        return Err(Error::KeyValue {
            table: job.table.to_string(),
        });
    }
    let (format, key_oids) = match format {
        Some(f) => (f.0, f.1.clone()),
        None => {
            let f = copy_format(&tx, job, &types).await?;
            *format = Some(f.clone());
            f
        }
    };
    let (rows, keys) = if format == CopyFormat::Binary {
        read_binary(&tx, job, &key_oids).await?
    } else {
        read_text(&tx, job, &params, &types).await?
    };
    tx.commit()
        .await
        .map_err(ClusterError::sql("ending a chunk snapshot"))?;
    let full = match &job.spec {
        ChunkSpec::Range { limit, .. } => keys.len() == *limit,
        ChunkSpec::Keys(_) => false,
    };
    let last = if full { keys.last().cloned() } else { None };
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
        return Ok(None);
    }
    crate::failpoint::hit("backfill.after_chunk_read");
    client
        .execute(EMIT_SQL, &[&mark(Mark::High)])
        .await
        .map_err(ClusterError::sql("writing a high watermark"))?;
    crate::failpoint::hit("backfill.after_high_watermark");
    pool.put(client);
    Ok(last)
}

/// How the table's rows are read: binary rows go to the target untouched when every column
/// type is built in; the binary query's result types tell (user-defined types are read as
/// text). With the key columns' type OIDs, to decode their binary values. Decided once per
/// reader: a table's column types do not change under a move (DDL pauses it).
async fn copy_format(
    tx: &tokio_postgres::Transaction<'_>,
    job: &ChunkJob,
    types: &[Type],
) -> Result<(CopyFormat, Vec<u32>), Error> {
    let nkeys = job.layout.key.len();
    let st = prepare_chunk(tx, job, types, CopyFormat::Binary).await?;
    let values = &st.columns()[nkeys.min(st.columns().len())..];
    let f = CopyFormat::for_type_oids(values.iter().map(|c| c.type_().oid()));
    let key_oids: Vec<u32> = job
        .layout
        .key
        .iter()
        .map(|(i, _)| values.get(*i).map_or(0, |c| c.type_().oid()))
        .collect();
    Ok((f, key_oids))
}

/// The chunk's SELECT, with its values rendered in `format`, prepared with the key
/// parameters' `types`.
async fn prepare_chunk(
    tx: &tokio_postgres::Transaction<'_>,
    job: &ChunkJob,
    types: &[Type],
    format: CopyFormat,
) -> Result<tokio_postgres::Statement, Error> {
    let sql = job.layout.query(job.tenant.as_str(), &job.spec, format).0;
    let statement = tx
        .prepare_typed(&sql, types)
        .await
        .map_err(ClusterError::sql(format!(
            "preparing the chunk query on {}",
            job.table
        )))?;
    Ok(statement)
}

fn bad_key(job: &ChunkJob) -> Error {
    Error::KeyValue {
        table: job.table.to_string(),
    }
}

fn read_err(job: &ChunkJob) -> impl Fn(tokio_postgres::Error) -> ClusterError + '_ {
    move |e| ClusterError::sql(format!("reading a chunk of {}", job.table))(e)
}

/// The chunk as binary COPY data, passed on as it came: only the key columns' values are
/// decoded, the rest is moved without parsing.
async fn read_binary(
    tx: &tokio_postgres::Transaction<'_>,
    job: &ChunkJob,
    key_oids: &[u32],
) -> Result<(RowBuffer, Vec<Key>), Error> {
    let width = job.layout.columns.len();
    let mut rows = RowBuffer::new(CopyFormat::Binary);
    let mut keys = Vec::new();
    let stream = tx
        .copy_out(&job.layout.copy_query(job.tenant.as_str(), &job.spec))
        .await
        .map_err(read_err(job))?;
    futures_util::pin_mut!(stream);
    let mut split = BinaryRowSplitter::new();
    let mut fields = Vec::new();
    let bad_data = |e: CopyDataError| Error::ChunkData {
        table: job.table.to_string(),
        detail: e.to_string(),
    };
    while let Some(data) = stream.next().await {
        split.feed(&data.map_err(read_err(job))?);
        while let Some(row) = split.next_row(&mut fields).map_err(bad_data)? {
            if fields.len() != width {
                return Err(bad_data(CopyDataError(format!(
                    "a row has {} fields, the chunk query {}",
                    fields.len(),
                    width
                ))));
            }
            let key = job
                .layout
                .key
                .iter()
                .zip(key_oids)
                .map(|(&(i, kind), &oid)| {
                    let value = fields.get(i)?.as_ref()?;
                    kind.decode_binary(oid, row.get(value.clone())?)
                })
                .collect::<Option<Key>>()
                .ok_or_else(|| bad_key(job))?;
            keys.push(key);
            rows.push_binary_row(&row);
        }
    }
    split.finish().map_err(bad_data)?;
    Ok((rows, keys))
}

/// The chunk as text rows (a table with a user-defined column type): keys parsed from
/// their text, values kept as the server sent them.
async fn read_text(
    tx: &tokio_postgres::Transaction<'_>,
    job: &ChunkJob,
    params: &[Option<String>],
    types: &[Type],
) -> Result<(RowBuffer, Vec<Key>), Error> {
    let nkeys = job.layout.key.len();
    let width = job.layout.columns.len();
    let mut rows = RowBuffer::new(CopyFormat::Text);
    let mut keys = Vec::new();
    let statement = prepare_chunk(tx, job, types, CopyFormat::Text).await?;
    if statement.columns().len() != nkeys + width {
        return Err(bad_key(job));
    }
    let stream = tx
        .query_raw(&statement, params.iter().map(|p| p as &(dyn ToSql + Sync)))
        .await
        .map_err(read_err(job))?;
    futures_util::pin_mut!(stream);
    while let Some(r) = stream.next().await {
        let r = r.map_err(read_err(job))?;
        let texts = (0..nkeys)
            .map(|i| r.try_get::<_, Option<&str>>(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad_key(job))?;
        keys.push(job.layout.key_from(&texts).ok_or_else(|| bad_key(job))?);
        let values = (nkeys..nkeys + width)
            .map(|i| r.try_get::<_, Option<Raw<'_>>>(i).map(|v| v.map(|v| v.0)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad_key(job))?;
        rows.push(values.into_iter());
    }
    Ok((rows, keys))
}
