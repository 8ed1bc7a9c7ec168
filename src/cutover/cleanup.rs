//! Cleanup: removing a moved tenant from its old location, after the retention window.
//!
//! Invariants:
//! - Only a `cut_over` move whose verification was clean, and only once its
//!   `cleanup_after` has passed; anything else is refused with the reason.
//! - Shared tables lose exactly the tenant's rows, in small batches (short transactions,
//!   no long locks); a batch refused by a foreign key is retried after the other tables,
//!   so children go before parents without reading the schema's graph.
//! - A schema-per-tenant source loses the tenant's tables, then its schema if nothing
//!   else is left in it.
//! - The fence stays: a stale writer's INSERT at the old location is still refused.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::fence::BYPASS_SETTING;
use super::FencedTable;
use crate::cluster::ClusterError;
use crate::registry::{Move, MoveState};
use crate::sql::{quote_ident, QualifiedName};

/// Why a cleanup may not run (yet).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NotYet {
    #[error("move {id} is {state}; only a cut_over move is cleaned up")]
    State { id: i64, state: MoveState },
    #[error("move {id} has no clean verification; run `switchyard verify` first")]
    NotVerified { id: i64 },
    #[error("move {id} keeps its old location until {until} (cutover.retention_hours)")]
    Retained { id: i64, until: String },
}

/// The pure decision: `retained_for` is how long the window still runs (≤ 0: over).
pub fn may_clean(mv: &Move, retained_for_secs: f64, until: &str) -> Result<(), NotYet> {
    if mv.state != MoveState::CutOver {
        return Err(NotYet::State {
            id: mv.id,
            state: mv.state,
        });
    }
    if !mv.verified {
        return Err(NotYet::NotVerified { id: mv.id });
    }
    if retained_for_secs > 0.0 {
        return Err(NotYet::Retained {
            id: mv.id,
            until: until.to_owned(),
        });
    }
    Ok(())
}

/// What a cleanup removed.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Cleaned {
    pub rows_deleted: i64,
    pub tables_dropped: Vec<String>,
    /// The source schema, when it was dropped too.
    pub schema_dropped: Option<String>,
}

fn delete_batch_sql(table: &QualifiedName, column: &str, ty: &str, batch: usize) -> String {
    let t = table.quoted();
    format!(
        "DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE {} = CAST($1 AS {ty}) LIMIT {batch}))",
        quote_ident(column)
    )
}

/// Deletes the tenant's rows of shared tables in batches of `batch` rows.
pub async fn delete_rows(
    client: &mut Client,
    tenant: &str,
    tables: &[FencedTable],
    batch: usize,
) -> Result<i64, ClusterError> {
    let mut pending: Vec<&FencedTable> =
        tables.iter().filter(|t| t.chunk.tenant.is_some()).collect();
    let mut deleted = 0i64;
    while !pending.is_empty() {
        let mut progress = false;
        let mut blocked = Vec::new();
        let mut refused = None;
        for t in pending {
            let (col, ty) = t.chunk.tenant.as_ref().expect("filtered above");
            let sql = delete_batch_sql(&t.chunk.source, col, ty, batch);
            loop {
                let tx = client
                    .transaction()
                    .await
                    .map_err(ClusterError::sql("starting a cleanup batch"))?;
                tx.execute(
                    "SELECT set_config($1, $2, true)",
                    &[&BYPASS_SETTING, &tenant],
                )
                .await
                .map_err(ClusterError::sql("marking the cleanup session"))?;
                let params: [&(dyn ToSql + Sync); 1] = [&tenant];
                let statement = tx
                    .prepare_typed(&sql, &[Type::TEXT])
                    .await
                    .map_err(ClusterError::sql("preparing a cleanup batch"))?;
                match tx.execute(&statement, &params).await {
                    Ok(0) => break,
                    Ok(n) => {
                        tx.commit()
                            .await
                            .map_err(ClusterError::sql("committing a cleanup batch"))?;
                        deleted += n as i64;
                        progress = true;
                    }
                    // Rows of another table still reference these: that table first.
                    Err(e) if e.code().map(|c| c.code()) == Some("23503") => {
                        blocked.push(t);
                        refused.get_or_insert((t.chunk.source.clone(), e));
                        break;
                    }
                    Err(e) => {
                        return Err(ClusterError::sql(format!(
                            "deleting the tenant's rows from {}",
                            t.chunk.source
                        ))(e))
                    }
                }
            }
        }
        if let (false, Some((table, e))) = (progress, refused) {
            // Referenced by rows that are not the tenant's: nothing more can go.
            return Err(ClusterError::sql(format!(
                "deleting the tenant's rows from {table} (still referenced by rows that are not the tenant's)"
            ))(e));
        }
        pending = blocked;
    }
    Ok(deleted)
}

/// Drops a schema-per-tenant source's tables, then the schema if it is empty.
pub async fn drop_tables(client: &Client, tables: &[FencedTable]) -> Result<Cleaned, ClusterError> {
    let mut cleaned = Cleaned::default();
    let whole: Vec<&FencedTable> = tables.iter().filter(|t| t.chunk.tenant.is_none()).collect();
    if whole.is_empty() {
        return Ok(cleaned);
    }
    let list: Vec<String> = whole.iter().map(|t| t.chunk.source.quoted()).collect();
    client
        .batch_execute(&format!("DROP TABLE {}", list.join(", ")))
        .await
        .map_err(ClusterError::sql("dropping the tenant's old tables"))?;
    cleaned.tables_dropped = whole.iter().map(|t| t.chunk.source.to_string()).collect();
    let schema = &whole[0].chunk.source.schema;
    match client
        .batch_execute(&format!("DROP SCHEMA {}", quote_ident(schema)))
        .await
    {
        Ok(()) => cleaned.schema_dropped = Some(schema.clone()),
        Err(e) => {
            tracing::info!(%schema, error = %crate::cluster::describe(&e), "the old schema holds other objects; kept");
        }
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(state: MoveState, verified: bool) -> Move {
        Move {
            cutover_requested: true,
            cutover_attempts: 1,
            verified,
            cleanup_due: true,
            ..Move::sample(3, "acme", state)
        }
    }

    #[test]
    fn only_verified_cut_over_moves_after_the_window() {
        assert_eq!(may_clean(&mv(MoveState::CutOver, true), 0.0, "x"), Ok(()));
        assert_eq!(
            may_clean(&mv(MoveState::Streaming, true), 0.0, "x"),
            Err(NotYet::State {
                id: 3,
                state: MoveState::Streaming
            })
        );
        assert_eq!(
            may_clean(&mv(MoveState::CutOver, false), 0.0, "x"),
            Err(NotYet::NotVerified { id: 3 })
        );
        assert!(matches!(
            may_clean(&mv(MoveState::CutOver, true), 10.0, "tomorrow"),
            Err(NotYet::Retained { .. })
        ));
    }

    #[test]
    fn batches_are_scoped_to_the_tenant_and_quoted() {
        let t = QualifiedName::new("public", "or\"ders").unwrap();
        let sql = delete_batch_sql(&t, "tenant id", "bigint", 500);
        assert_eq!(
            sql,
            "DELETE FROM \"public\".\"or\"\"ders\" WHERE ctid = ANY (ARRAY(SELECT ctid FROM \"public\".\"or\"\"ders\" \
             WHERE \"tenant id\" = CAST($1 AS bigint) LIMIT 500))"
        );
    }
}
