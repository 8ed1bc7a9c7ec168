//! The target's progress store: what each target durably holds of each tenant, written in
//! the same transaction as the rows it accounts for. Lane 0 records the position and the
//! backfill state in `<schema>.applied`; lanes 1.. record their positions in
//! `<schema>.applied_lanes`, and so does lane 0 for them when it committed a segment alone
//! (see [`super::lanes`]).
//!
//! Invariants:
//! - A recorded position never moves back (`GREATEST` in the record statement).
//! - A tenant resumes from the lowest position of its lanes: a lane without a row for a
//!   tenant lane 0 has may have lost an uncommitted share, and resumes it from the slot.
//! - Creating the tables is idempotent and safe when every lane does it at once.

use std::collections::BTreeMap;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::ApplyError;
use crate::cluster::ClusterError;
use crate::lsn::Lsn;
use crate::sql::quote_ident;
use crate::tenant::TenantId;

/// What a target records for one tenant: the applied position and the backfill state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub lsn: Lsn,
    pub state: Option<String>,
}

/// One lane's positions (`<schema>.applied_lanes`).
pub(super) async fn read_lane(
    client: &Client,
    lanes_table: &str,
    lane: usize,
) -> Result<BTreeMap<TenantId, Progress>, ApplyError> {
    read_rows(
        client,
        &format!("SELECT tenant, lsn::text, NULL::text FROM {lanes_table} WHERE lane = $1"),
        &[&(lane as i32)],
        lanes_table,
    )
    .await
}

/// Where each tenant resumes on this target: lane 0's record (with the backfill state),
/// its position lowered to the lowest of the lanes. A lane without a row for a tenant that
/// lane 0 has may have lost an uncommitted share: the tenant resumes from the slot's
/// position then (each lane still skips what it holds).
pub async fn read_resume_progress(
    client: &Client,
    schema: &str,
) -> Result<BTreeMap<TenantId, Progress>, ApplyError> {
    let mut out = read_progress(client, &progress_table(schema)).await?;
    let table = lanes_table(schema);
    let lanes: i32 = client
        .query_one(
            &format!("SELECT COALESCE(max(lane) + 1, 1) FROM {table}"),
            &[],
        )
        .await
        .map_err(ClusterError::sql("reading the apply lanes"))?
        .get(0);
    for lane in 1..lanes.max(1) as usize {
        let positions = read_lane(client, &table, lane).await?;
        for (tenant, p) in out.iter_mut() {
            p.lsn = match positions.get(tenant) {
                Some(l) => p.lsn.min(l.lsn),
                None => Lsn::INVALID,
            };
        }
    }
    Ok(out)
}

/// Removes a tenant's progress rows (all lanes) inside `tx`; the tables may be missing.
pub async fn forget_progress(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    tenant: &TenantId,
) -> Result<(), ApplyError> {
    for table in [progress_table(schema), lanes_table(schema)] {
        let exists: bool = tx
            .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&table])
            .await
            .map_err(ClusterError::sql("looking for the progress table"))?
            .get(0);
        if exists {
            tx.execute(
                &format!("DELETE FROM {table} WHERE tenant = $1"),
                &[&tenant.as_str()],
            )
            .await
            .map_err(ClusterError::sql("removing the progress rows"))?;
        }
    }
    Ok(())
}

/// The progress rows of a target (`<schema>.applied`).
pub async fn read_progress(
    client: &Client,
    progress_table: &str,
) -> Result<BTreeMap<TenantId, Progress>, ApplyError> {
    read_rows(
        client,
        &format!("SELECT tenant, lsn::text, state FROM {progress_table}"),
        &[],
        progress_table,
    )
    .await
}

/// Rows of (tenant, lsn as text, state) from `sql` over `table`.
async fn read_rows(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    table: &str,
) -> Result<BTreeMap<TenantId, Progress>, ApplyError> {
    let rows = client
        .query(sql, params)
        .await
        .map_err(ClusterError::sql(format!(
            "reading the positions in {table}"
        )))?;
    let mut out = BTreeMap::new();
    for r in rows {
        let (tenant, lsn): (String, String) = (r.get(0), r.get(1));
        let (Ok(t), Ok(l)) = (TenantId::new(tenant.clone()), lsn.parse::<Lsn>()) else {
            return Err(ApplyError::Corrupt(format!(
                "{table} row for {tenant:?} holds {lsn:?}"
            )));
        };
        out.insert(
            t,
            Progress {
                lsn: l,
                state: r.get(2),
            },
        );
    }
    Ok(out)
}

/// Creates the progress table in `schema` if missing; returns its quoted name.
pub async fn ensure_progress_table(client: &Client, schema: &str) -> Result<String, ApplyError> {
    let table = progress_table(schema);
    let lanes = lanes_table(schema);
    // Both tables with every column: nothing to do. The DDL's ALTER TABLE takes an ACCESS
    // EXCLUSIVE lock even when the column exists, and every lane connects at once.
    let ready: bool = client
        .query_one(
            "SELECT to_regclass($2) IS NOT NULL AND EXISTS (
               SELECT 1 FROM pg_attribute
                WHERE attrelid = to_regclass($1) AND attname = 'state' AND NOT attisdropped)",
            &[&table, &lanes],
        )
        .await
        .map_err(ClusterError::sql("reading the progress table's columns"))?
        .get(0);
    if ready {
        return Ok(table);
    }
    let sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {table} (
           tenant text PRIMARY KEY,
           lsn pg_lsn NOT NULL,
           updated_at timestamptz NOT NULL DEFAULT now());
         ALTER TABLE {table} ADD COLUMN IF NOT EXISTS state text;
         CREATE TABLE IF NOT EXISTS {lanes} (
           tenant text NOT NULL,
           lane int NOT NULL CHECK (lane > 0),
           lsn pg_lsn NOT NULL,
           PRIMARY KEY (tenant, lane))",
        schema = quote_ident(schema),
    );
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.batch_execute(&sql).await {
            Ok(()) => return Ok(table),
            // Two sessions creating it at once: IF NOT EXISTS is not atomic, the loser
            // fails with a duplicate (of the schema, the table, its row type or a column);
            // the next attempt sees the winner's objects.
            Err(e)
                if attempt < 5
                    && matches!(
                        e.code().map(|c| c.code()),
                        Some("23505" | "42P06" | "42P07" | "42701" | "42710")
                    ) => {}
            Err(e) => return Err(ClusterError::sql("creating the progress table")(e).into()),
        }
    }
}

/// The statement that records every tenant's position of a batch for `lane`, and its
/// parameter types: lane 0 upserts (tenant, lsn, state) into `progress_table`, and (tenant,
/// k, lsn) into `lanes_table` for each lane k in 1..$4 (none when $4 is 1: a commit that
/// covers only its own lane); lane k > 0 upserts (tenant, k, lsn) into `lanes_table`. A
/// position never moves back.
pub(super) fn record_sql(
    lane: usize,
    progress_table: &str,
    lanes_table: &str,
) -> (String, &'static [Type]) {
    if lane == 0 {
        (
            format!(
                "WITH others AS (INSERT INTO {lanes_table} AS l (tenant, lane, lsn) \
                   SELECT u.tenant, g.lane, u.lsn::pg_lsn \
                     FROM unnest($1::text[], $2::text[]) AS u(tenant, lsn) \
                    CROSS JOIN generate_series(1, $4::int - 1) AS g(lane) \
                   ON CONFLICT (tenant, lane) DO UPDATE SET lsn = GREATEST(l.lsn, EXCLUDED.lsn)) \
                 INSERT INTO {progress_table} AS p (tenant, lsn, state) \
                 SELECT u.tenant, u.lsn::pg_lsn, u.state \
                   FROM unnest($1::text[], $2::text[], $3::text[]) AS u(tenant, lsn, state) \
                 ON CONFLICT (tenant) DO UPDATE SET lsn = GREATEST(p.lsn, EXCLUDED.lsn), \
                   state = COALESCE(EXCLUDED.state, p.state), updated_at = now()"
            ),
            &[
                Type::TEXT_ARRAY,
                Type::TEXT_ARRAY,
                Type::TEXT_ARRAY,
                Type::INT4,
            ],
        )
    } else {
        (
            format!(
                "INSERT INTO {lanes_table} AS p (tenant, lane, lsn) \
                 SELECT u.tenant, $3::int, u.lsn::pg_lsn \
                   FROM unnest($1::text[], $2::text[]) AS u(tenant, lsn) \
                 ON CONFLICT (tenant, lane) DO UPDATE SET lsn = GREATEST(p.lsn, EXCLUDED.lsn)"
            ),
            &[Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT4],
        )
    }
}

/// The quoted name of the progress table in `schema`.
pub fn progress_table(schema: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident("applied"))
}

/// The quoted name of the table of apply lanes 1.. in `schema` (lane 0 is `applied`).
pub fn lanes_table(schema: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident("applied_lanes"))
}
