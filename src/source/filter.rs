//! Row filters on the publication: the walsender sends only the rows of tenants the
//! pipeline consumes, instead of every row of every shared table for the daemon to drop.
//! On a busy source most tenants do not move; sending, reading and decoding their rows cost
//! the source's CPU and the moving tenants' lag (docs/source.md).
//!
//! Invariants:
//! - A table is filtered only where PostgreSQL takes it without refusing the application's
//!   writes: a shared table whose tenant column is part of its replica identity (a filter on
//!   any other column fails every UPDATE and DELETE of the table), of a built-in type with an
//!   `=` operator (filters may use nothing user-defined). Any other table is published whole.
//! - The publication is changed only when `SET TABLE` can say all of it: a list of tables
//!   without column lists (no `FOR ALL TABLES`, no schemas). Otherwise it stays as it is and
//!   the reason is returned.
//! - Filters on tables with the tenant column are switchyard's: one set by someone else
//!   would hide a moving tenant's changes, so it is replaced, and one such a table can no
//!   longer have (its replica identity lost the column) is removed. Filters on tables
//!   without the column (global tables) are kept.
//! - A tenant joins the filter before its copy's first watermark, and the copy starts only
//!   after every transaction older than that change has ended ([`wait_older`]): a
//!   transaction decoded with the catalog as it began would not yet see the tenant, so it
//!   must be over (its rows in the chunks) before the first chunk is read.
//! - The tenants listed are a value of the registry read under the filter's lock (see the
//!   daemon's caller), so two changes of the filter never drop each other's tenants.

use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;

use super::SourceError;
use crate::cluster::ClusterError;
use crate::sql::{quote_ident, typed_array, QualifiedName};

/// Row filters exist from PostgreSQL 15 on.
const MIN_SERVER_VERSION: i32 = 150_000;
/// Types are user-defined from this OID on (FirstNormalObjectId).
const FIRST_USER_OID: u32 = 16_384;

/// One table of the publication, as the filter sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedTable {
    pub name: QualifiedName,
    /// The tenant column's type (`format_type`) when the table can be filtered on it.
    pub filterable: Option<String>,
    /// A filter set by someone else on a table without the tenant column (kept as it is).
    pub kept_filter: Option<String>,
    /// A table with the tenant column that has a filter now.
    pub tenant_filtered: bool,
}

/// What [`narrow`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Narrowed {
    /// The publication now sends only the listed tenants' rows of these many tables.
    Filtered { tables: usize, tenants: usize },
    /// Switchyard's filters were removed (`row_filter = false`).
    Cleared,
    /// Left as it was, and why (the stream carries every tenant's rows).
    Unchanged(String),
}

/// The `ALTER PUBLICATION` that filters `tables` to `tenants` (values already valid for each
/// table's column type: `values(type)` gives them). Empty lists filter to nothing.
pub fn set_table_sql(
    publication: &str,
    tables: &[PublishedTable],
    column_of: impl Fn(&QualifiedName) -> String,
    values: impl Fn(&str) -> Vec<String>,
) -> String {
    let items: Vec<String> = tables
        .iter()
        .map(|t| {
            let filter = match (&t.filterable, &t.kept_filter) {
                (Some(typ), _) => {
                    let vals = values(typ);
                    if vals.is_empty() {
                        " WHERE (false)".to_string()
                    } else {
                        format!(
                            " WHERE ({} = ANY ({}))",
                            quote_ident(&column_of(&t.name)),
                            typed_array(&vals, typ)
                        )
                    }
                }
                (None, Some(kept)) => format!(" WHERE ({kept})"),
                (None, None) => String::new(),
            };
            format!("ONLY {}{filter}", t.name.quoted())
        })
        .collect();
    format!(
        "ALTER PUBLICATION {} SET TABLE {}",
        quote_ident(publication),
        items.join(", ")
    )
}

/// Reads the publication's tables and which of them can be filtered; `Err(reason)` when
/// the publication cannot be changed by `SET TABLE` without losing something.
pub async fn published_tables(
    client: &impl GenericClient,
    publication: &str,
    column_of: impl Fn(&QualifiedName) -> String,
) -> Result<Result<Vec<PublishedTable>, String>, SourceError> {
    let sql =
        |what: &'static str| ClusterError::sql(format!("{what} of publication {publication:?}"));
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(sql("reading the server version"))?
        .get(0);
    if version < MIN_SERVER_VERSION {
        return Ok(Err("row filters need PostgreSQL 15 or later".into()));
    }
    let Some(row) = client
        .query_opt(
            "SELECT p.oid, p.puballtables, \
               EXISTS (SELECT 1 FROM pg_publication_namespace s WHERE s.pnpubid = p.oid), \
               EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prpubid = p.oid AND r.prattrs IS NOT NULL) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(sql("reading"))?
    else {
        return Ok(Err("the publication does not exist".into()));
    };
    let (oid, all, schemas, columns): (u32, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if all {
        return Ok(Err("it is FOR ALL TABLES".into()));
    }
    if schemas {
        return Ok(Err("it publishes schemas (TABLES IN SCHEMA)".into()));
    }
    if columns {
        return Ok(Err("a table of it has a column list".into()));
    }
    let rows = client
        .query(
            "SELECT r.prrelid, n.nspname, c.relname, pg_get_expr(r.prqual, r.prrelid) \
             FROM pg_publication_rel r JOIN pg_class c ON c.oid = r.prrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE r.prpubid = $1 ORDER BY n.nspname, c.relname",
            &[&oid],
        )
        .await
        .map_err(sql("reading the tables"))?;
    let mut oids = Vec::with_capacity(rows.len());
    let mut cols = Vec::with_capacity(rows.len());
    let mut tables = Vec::with_capacity(rows.len());
    for r in &rows {
        // Straight from the catalog: a name the parser would refuse is still a table to
        // keep in the list (leaving it out of SET TABLE would unpublish it).
        let name = QualifiedName {
            schema: r.get(1),
            name: r.get(2),
        };
        oids.push(r.get::<_, u32>(0));
        cols.push(column_of(&name));
        tables.push(PublishedTable {
            name,
            filterable: None,
            kept_filter: r.get(3),
            tenant_filtered: false,
        });
    }
    // The tenant column of each table: its type, and whether the replica identity has it
    // (the primary key for DEFAULT, the chosen index for USING INDEX, every column for FULL).
    let typed = client
        .query(
            "SELECT t.ord::int, a.atttypid, format_type(a.atttypid, NULL), \
               EXISTS (SELECT 1 FROM pg_operator o WHERE o.oprname = '=' \
                 AND o.oprleft = a.atttypid AND o.oprright = a.atttypid), \
               c.relreplident = 'f' OR EXISTS (SELECT 1 FROM pg_index i \
                 WHERE i.indrelid = c.oid AND a.attnum = ANY (i.indkey) \
                   AND CASE c.relreplident WHEN 'd' THEN i.indisprimary \
                                           WHEN 'i' THEN i.indisreplident ELSE false END) \
             FROM unnest($1::oid[], $2::text[]) WITH ORDINALITY AS t(oid, col, ord) \
             JOIN pg_class c ON c.oid = t.oid \
             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attname = t.col \
               AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oids, &cols],
        )
        .await
        .map_err(sql("reading the tenant columns"))?;
    for r in typed {
        let ord: i32 = r.get(0);
        let (typ, type_name, has_eq, in_identity): (u32, String, bool, bool) =
            (r.get(1), r.get(2), r.get(3), r.get(4));
        let Some(t) = usize::try_from(ord - 1)
            .ok()
            .and_then(|i| tables.get_mut(i))
        else {
            continue;
        };
        // A table with the tenant column keeps no filter it cannot have: one left from when
        // its replica identity still held the column would fail the application's UPDATEs.
        t.tenant_filtered = t.kept_filter.take().is_some();
        if typ < FIRST_USER_OID && has_eq && in_identity {
            t.filterable = Some(type_name);
        }
    }
    Ok(Ok(tables))
}

/// Filters `publication` to `tenants`, or with `None` removes switchyard's filters (inside
/// the caller's transaction, which holds the filter's lock and read `tenants` from the
/// registry). `gate_values` names the registry's function that keeps the values a type
/// accepts.
pub async fn narrow(
    tx: &impl GenericClient,
    publication: &str,
    column_of: impl Fn(&QualifiedName) -> String,
    tenants: Option<&[String]>,
    gate_values: &str,
) -> Result<Narrowed, SourceError> {
    let mut tables = match published_tables(tx, publication, &column_of).await? {
        Ok(t) => t,
        Err(reason) => return Ok(Narrowed::Unchanged(reason)),
    };
    let stale = tables.iter().any(|t| t.tenant_filtered);
    let Some(tenants) = tenants else {
        if !stale {
            return Ok(Narrowed::Unchanged("row_filter is off".into()));
        }
        for t in &mut tables {
            t.filterable = None;
        }
        let sql = set_table_sql(publication, &tables, &column_of, |_| Vec::new());
        execute(tx, publication, &sql).await?;
        return Ok(Narrowed::Cleared);
    };
    let filtered = tables.iter().filter(|t| t.filterable.is_some()).count();
    if filtered == 0 && !stale {
        return Ok(Narrowed::Unchanged(
            "no table has its tenant column in its replica identity".into(),
        ));
    }
    let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for typ in tables.iter().filter_map(|t| t.filterable.clone()) {
        if by_type.contains_key(&typ) {
            continue;
        }
        let vals: Vec<String> = tx
            .query_one(
                &format!("SELECT {gate_values}($1::text[], $2::text::regtype)"),
                &[&tenants, &typ],
            )
            .await
            .map_err(ClusterError::sql("keeping the tenant ids the column takes"))?
            .get(0);
        by_type.insert(typ, vals);
    }
    let sql = set_table_sql(publication, &tables, &column_of, |typ| {
        by_type.get(typ).cloned().unwrap_or_default()
    });
    execute(tx, publication, &sql).await?;
    Ok(Narrowed::Filtered {
        tables: filtered,
        tenants: tenants.len(),
    })
}

async fn execute(tx: &impl GenericClient, publication: &str, sql: &str) -> Result<(), SourceError> {
    tx.batch_execute(sql)
        .await
        .map_err(ClusterError::sql(format!(
            "setting the row filters of publication {publication:?}"
        )))?;
    Ok(())
}

/// Waits until every transaction that had an id when this was called has ended (see the
/// module's invariants), polling; a transaction that outlives `within` is an error that
/// says which sessions hold it.
pub async fn wait_older(client: &impl GenericClient, within: Duration) -> Result<(), SourceError> {
    let sql = |what: &'static str| ClusterError::sql(what);
    let horizon: String = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .map_err(sql("reading the transaction horizon"))?
        .get(0);
    let began = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let done: bool = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8",
                &[&horizon],
            )
            .await
            .map_err(sql("waiting for older transactions"))?
            .get(0);
        if done {
            return Ok(());
        }
        if began.elapsed() >= within {
            let holders: Vec<String> = client
                .query(
                    "(SELECT pid::text FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
                       ORDER BY age(backend_xid) DESC LIMIT 5) \
                     UNION ALL (SELECT 'prepared transaction ' || gid FROM pg_prepared_xacts LIMIT 5)",
                    &[],
                )
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default();
            return Err(SourceError::Timeout {
                what: format!(
                    "waiting for transactions older than the publication's new row filter to end (held by: {})",
                    if holders.is_empty() { "unknown".into() } else { holders.join(", ") }
                ),
                after: within,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QualifiedName {
        QualifiedName::parse(s).unwrap()
    }

    #[test]
    fn set_table_sql_filters_tenant_tables_and_keeps_the_rest() {
        let tables = [
            PublishedTable {
                name: q("public.orders"),
                filterable: Some("integer".into()),
                kept_filter: None,
                tenant_filtered: false,
            },
            PublishedTable {
                name: q("public.\"We\"\"ird\""),
                filterable: Some("text".into()),
                kept_filter: None,
                tenant_filtered: false,
            },
            PublishedTable {
                name: q("public.countries"),
                filterable: None,
                kept_filter: Some("(code <> 'xx'::text)".into()),
                tenant_filtered: false,
            },
            PublishedTable {
                name: q("public.plans"),
                filterable: None,
                kept_filter: None,
                tenant_filtered: false,
            },
        ];
        let sql = set_table_sql(
            "p\"ub",
            &tables,
            |t| {
                if t.name == "orders" {
                    "tenant_id".into()
                } else {
                    "o'rg".into()
                }
            },
            |typ| {
                if typ == "integer" {
                    vec!["1".into(), "42".into()]
                } else {
                    vec!["a'b".into()]
                }
            },
        );
        assert_eq!(
            sql,
            "ALTER PUBLICATION \"p\"\"ub\" SET TABLE \
             ONLY \"public\".\"orders\" WHERE (\"tenant_id\" = ANY (ARRAY['1', '42']::integer[])), \
             ONLY \"public\".\"We\"\"ird\" WHERE (\"o'rg\" = ANY (ARRAY['a''b']::text[])), \
             ONLY \"public\".\"countries\" WHERE ((code <> 'xx'::text)), \
             ONLY \"public\".\"plans\""
        );
        let none = set_table_sql("p", &tables[..1], |_| "tenant_id".into(), |_| Vec::new());
        assert_eq!(
            none,
            "ALTER PUBLICATION \"p\" SET TABLE ONLY \"public\".\"orders\" WHERE (false)"
        );
    }
}
