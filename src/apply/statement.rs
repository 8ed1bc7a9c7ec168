//! One routed row operation → one parameterized SQL statement for the target.
//!
//! Invariants:
//! - Values travel as text parameters, cast with `CAST($n AS <target column type>)`: the text
//!   pgoutput sends is the type's own output form, so the type's input function reads it back
//!   exactly, whatever the type (numeric, arrays, ranges, json, enums).
//! - Identifiers are quoted; no value is ever formatted into the SQL text.
//! - Unchanged-TOAST columns are never written: an UPDATE leaves them as they are.
//! - Strict by design: INSERT does not upsert, UPDATE and DELETE must hit exactly one row.
//!   Anything else means the target diverged from the source for that key, which the caller
//!   reports as a tenant-fatal error rather than papering over.

use crate::decode::{Datum, Tuple};
use crate::route::RowOp;
use crate::sql::{quote_ident, QualifiedName};

/// A target column as the statement builder needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetColumn {
    pub name: String,
    /// `format_type` of the target column, e.g. `numeric(12,2)` or `"acme"."mood"`.
    pub type_sql: String,
    /// Part of the target's primary key.
    pub primary_key: bool,
    /// Part of the source's replica identity (from the Relation message's key flags).
    pub identity: bool,
}

/// The target table: columns in source column order (pgoutput tuples use that order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetTable {
    pub name: QualifiedName,
    pub columns: Vec<TargetColumn>,
    /// For a shared table moved out: the tenant column, scoping TRUNCATE to the tenant.
    pub tenant_column: Option<String>,
}

/// A statement ready to run, and how many rows it must affect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Option<String>>,
    /// `Some(1)` for row operations; `None` where any count is fine (TRUNCATE).
    pub expect_rows: Option<u64>,
}

impl Statement {
    /// Bytes of its parameters.
    pub fn param_bytes(&self) -> usize {
        self.params.iter().flatten().map(String::len).sum()
    }
}

/// Why an operation cannot be turned into SQL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatementError {
    #[error("{table}: tuple has {actual} columns, target has {expected}")]
    Shape {
        table: String,
        expected: usize,
        actual: usize,
    },
    #[error("{table}: column {column:?} is not valid UTF-8 text")]
    NotText { table: String, column: String },
    #[error("{table}: column {column:?} arrived in binary form; switchyard streams text")]
    Binary { table: String, column: String },
    #[error("{table}: a row to insert lacks the unchanged TOAST value of {column:?}; it must be re-read from the source")]
    ToastInInsert { table: String, column: String },
    #[error("{table}: no key value to find the row by ({detail})")]
    NoKey { table: String, detail: String },
}

struct Params {
    values: Vec<Option<String>>,
}

impl Params {
    fn push(&mut self, value: Option<String>, type_sql: &str) -> String {
        self.values.push(value);
        format!("CAST(${} AS {})", self.values.len(), type_sql)
    }
}

pub(crate) fn text(
    table: &TargetTable,
    i: usize,
    d: &Datum,
) -> Result<Option<String>, StatementError> {
    let column = || table.columns[i].name.clone();
    match d {
        Datum::Null => Ok(None),
        Datum::Text(b) => std::str::from_utf8(b)
            .map(|s| Some(s.to_owned()))
            .map_err(|_| StatementError::NotText {
                table: table.name.to_string(),
                column: column(),
            }),
        Datum::Binary(_) => Err(StatementError::Binary {
            table: table.name.to_string(),
            column: column(),
        }),
        Datum::UnchangedToast => unreachable!("callers skip unchanged TOAST columns"),
    }
}

fn check_shape(table: &TargetTable, t: &Tuple) -> Result<(), StatementError> {
    if t.0.len() != table.columns.len() {
        return Err(StatementError::Shape {
            table: table.name.to_string(),
            expected: table.columns.len(),
            actual: t.0.len(),
        });
    }
    Ok(())
}

/// WHERE clause locating the row: by the target primary key when `source` has all its
/// values, else by the replica identity columns. NULL-safe without `IS NOT DISTINCT FROM`,
/// which no index can serve: a NULL value becomes `IS NULL`, anything else `=`.
fn locate(table: &TargetTable, source: &Tuple, p: &mut Params) -> Result<String, StatementError> {
    let usable = |i: usize| matches!(source.0.get(i), Some(Datum::Text(_)));
    let pk: Vec<usize> = (0..table.columns.len())
        .filter(|&i| table.columns[i].primary_key)
        .collect();
    let cols: Vec<usize> = if !pk.is_empty() && pk.iter().all(|&i| usable(i)) {
        pk
    } else {
        (0..table.columns.len())
            .filter(|&i| table.columns[i].identity)
            .filter(|&i| !matches!(source.0.get(i), Some(Datum::UnchangedToast)))
            .collect()
    };
    if cols.iter().all(|&i| !usable(i)) {
        return Err(StatementError::NoKey {
            table: table.name.to_string(),
            detail: "neither primary key nor replica identity values are present".into(),
        });
    }
    let mut conds = Vec::with_capacity(cols.len());
    for i in cols {
        let c = &table.columns[i];
        match text(table, i, &source.0[i])? {
            None => conds.push(format!("{} IS NULL", quote_ident(&c.name))),
            v => {
                let cast = p.push(v, &c.type_sql);
                conds.push(format!("{} = {cast}", quote_ident(&c.name)));
            }
        }
    }
    Ok(conds.join(" AND "))
}

fn set_list(table: &TargetTable, new: &Tuple, p: &mut Params) -> Result<String, StatementError> {
    let mut sets = Vec::new();
    for (i, d) in new.0.iter().enumerate() {
        if matches!(d, Datum::UnchangedToast) {
            continue;
        }
        let c = &table.columns[i];
        let v = text(table, i, d)?;
        let cast = p.push(v, &c.type_sql);
        sets.push(format!("{} = {cast}", quote_ident(&c.name)));
    }
    Ok(sets.join(", "))
}

/// Builds the statement for `op` on `table`; `tenant` scopes a TRUNCATE of a shared table.
pub fn build(
    table: &TargetTable,
    op: &RowOp<'_>,
    tenant: &str,
) -> Result<Statement, StatementError> {
    let mut p = Params { values: Vec::new() };
    let target = table.name.quoted();
    let sql = match op {
        RowOp::Upsert { new, update: false } => {
            check_shape(table, new)?;
            let mut cols = Vec::new();
            let mut vals = Vec::new();
            for (i, d) in new.0.iter().enumerate() {
                // An UPDATE that moved a row to this tenant can arrive with unchanged TOAST;
                // inserting without that value would silently lose it. The caller must have
                // re-queued such a row for a re-read instead.
                if matches!(d, Datum::UnchangedToast) {
                    return Err(StatementError::ToastInInsert {
                        table: table.name.to_string(),
                        column: table.columns[i].name.clone(),
                    });
                }
                let c = &table.columns[i];
                cols.push(quote_ident(&c.name));
                let v = text(table, i, d)?;
                vals.push(p.push(v, &c.type_sql));
            }
            format!(
                "INSERT INTO {target} ({}) VALUES ({})",
                cols.join(", "),
                vals.join(", ")
            )
        }
        RowOp::Upsert { new, update: true } => {
            check_shape(table, new)?;
            let sets = set_list(table, new, &mut p)?;
            let cond = locate(table, new, &mut p)?;
            format!("UPDATE {target} SET {sets} WHERE {cond}")
        }
        RowOp::Rekey { old, new } => {
            check_shape(table, old)?;
            check_shape(table, new)?;
            let sets = set_list(table, new, &mut p)?;
            let cond = locate(table, old, &mut p)?;
            format!("UPDATE {target} SET {sets} WHERE {cond}")
        }
        RowOp::Delete { old } => {
            check_shape(table, old)?;
            let cond = locate(table, old, &mut p)?;
            format!("DELETE FROM {target} WHERE {cond}")
        }
        RowOp::Truncate => {
            let sql = match &table.tenant_column {
                Some(col) => {
                    let ty = table
                        .columns
                        .iter()
                        .find(|c| &c.name == col)
                        .map(|c| c.type_sql.clone())
                        .unwrap_or_else(|| "text".into());
                    let cast = p.push(Some(tenant.to_owned()), &ty);
                    format!("DELETE FROM {target} WHERE {} = {cast}", quote_ident(col))
                }
                None => format!("DELETE FROM {target}"),
            };
            return Ok(Statement {
                sql,
                params: p.values,
                expect_rows: None,
            });
        }
    };
    Ok(Statement {
        sql,
        params: p.values,
        expect_rows: Some(1),
    })
}

/// The statement of `op` for a change that a crash may already have applied (see
/// `TargetWriter::set_replay_windows`): an INSERT that finds its key present overwrites the
/// row with its own values, and an UPDATE or DELETE that finds no row is fine. Replaying a
/// key's changes in order this way ends where applying them once ends, whether the key held
/// none, some or all of them before.
pub fn build_replay(
    table: &TargetTable,
    op: &RowOp<'_>,
    tenant: &str,
) -> Result<Statement, StatementError> {
    let mut st = build(table, op, tenant)?;
    st.expect_rows = None;
    if let RowOp::Upsert { update: false, .. } = op {
        let key: Vec<String> = table
            .columns
            .iter()
            .filter(|c| c.primary_key)
            .map(|c| quote_ident(&c.name))
            .collect();
        if key.is_empty() {
            // Provisioning gives every target table the source's primary key; without one
            // a present row cannot be told from a new one, so the insert stays strict.
            st.expect_rows = Some(1);
            return Ok(st);
        }
        let sets: Vec<String> = table
            .columns
            .iter()
            .filter(|c| !c.primary_key)
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
            .collect();
        st.sql = if sets.is_empty() {
            format!("{} ON CONFLICT ({}) DO NOTHING", st.sql, key.join(", "))
        } else {
            format!(
                "{} ON CONFLICT ({}) DO UPDATE SET {}",
                st.sql,
                key.join(", "),
                sets.join(", ")
            )
        };
    }
    Ok(st)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;

    /// `acme.orders (tenant_id, id, note, big)`, keyed by `(tenant_id, id)` (also used by
    /// the compaction tests).
    pub(crate) fn table() -> TargetTable {
        let col = |name: &str, ty: &str, pk: bool| TargetColumn {
            name: name.into(),
            type_sql: ty.into(),
            primary_key: pk,
            identity: pk,
        };
        TargetTable {
            name: QualifiedName::parse("acme.orders").unwrap(),
            columns: vec![
                col("tenant_id", "integer", true),
                col("id", "bigint", true),
                col("note", "text", false),
                col("big", "text", false),
            ],
            tenant_column: Some("tenant_id".into()),
        }
    }

    fn t(vals: &[Datum]) -> Tuple {
        Tuple(vals.to_vec())
    }
    pub(crate) fn s(v: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(v.as_bytes()))
    }

    #[test]
    fn insert_binds_every_value_with_a_cast() {
        let new = t(&[s("7"), s("1"), s("it's"), Datum::Null]);
        let st = build(
            &table(),
            &RowOp::Upsert {
                new: &new,
                update: false,
            },
            "7",
        )
        .unwrap();
        assert_eq!(
            st.sql,
            "INSERT INTO \"acme\".\"orders\" (\"tenant_id\", \"id\", \"note\", \"big\") VALUES \
             (CAST($1 AS integer), CAST($2 AS bigint), CAST($3 AS text), CAST($4 AS text))"
        );
        assert_eq!(
            st.params,
            vec![
                Some("7".into()),
                Some("1".into()),
                Some("it's".into()),
                None
            ]
        );
        assert_eq!(st.expect_rows, Some(1));
    }

    #[test]
    fn replayed_changes_overwrite_a_present_key_and_accept_a_missing_one() {
        let new = t(&[s("7"), s("1"), s("n"), Datum::Null]);
        let ins = RowOp::Upsert {
            new: &new,
            update: false,
        };
        let st = build_replay(&table(), &ins, "7").unwrap();
        assert!(
            st.sql.ends_with(
                "ON CONFLICT (\"tenant_id\", \"id\") DO UPDATE SET \"note\" = EXCLUDED.\"note\", \"big\" = EXCLUDED.\"big\""
            ),
            "{}",
            st.sql
        );
        assert_eq!(st.params, build(&table(), &ins, "7").unwrap().params);
        assert_eq!(st.expect_rows, None);
        let old = t(&[s("7"), s("1"), Datum::Null, Datum::Null]);
        for op in [
            RowOp::Delete { old: &old },
            RowOp::Upsert {
                new: &new,
                update: true,
            },
        ] {
            let st = build_replay(&table(), &op, "7").unwrap();
            assert_eq!(st.sql, build(&table(), &op, "7").unwrap().sql);
            assert_eq!(st.expect_rows, None);
        }
    }

    #[test]
    fn update_leaves_unchanged_toast_alone_and_finds_the_row_by_key() {
        let new = t(&[s("7"), s("1"), s("n2"), Datum::UnchangedToast]);
        let st = build(
            &table(),
            &RowOp::Upsert {
                new: &new,
                update: true,
            },
            "7",
        )
        .unwrap();
        assert!(!st.sql.contains("\"big\""), "{}", st.sql);
        assert!(
            st.sql.ends_with(
                "WHERE \"tenant_id\" = CAST($4 AS integer) AND \"id\" = CAST($5 AS bigint)"
            ),
            "{}",
            st.sql
        );
    }

    #[test]
    fn a_table_without_key_values_is_located_null_safely_by_its_full_identity() {
        // REPLICA IDENTITY FULL on a table whose primary key the tuple lacks: every
        // identity column locates the row; a NULL must match NULL, and stay indexable.
        let mut tab = table();
        for c in tab.columns.iter_mut() {
            c.primary_key = false;
            c.identity = true;
        }
        let old = t(&[s("7"), s("1"), Datum::Null, s("b")]);
        let st = build(&tab, &RowOp::Delete { old: &old }, "7").unwrap();
        assert_eq!(
            st.sql,
            "DELETE FROM \"acme\".\"orders\" WHERE \"tenant_id\" = CAST($1 AS integer) AND \
             \"id\" = CAST($2 AS bigint) AND \"note\" IS NULL AND \"big\" = CAST($3 AS text)"
        );
        assert_eq!(st.params.len(), 3);
    }

    #[test]
    fn rekey_and_delete_use_the_old_key() {
        let old = t(&[s("7"), s("1"), Datum::Null, Datum::Null]);
        let new = t(&[s("7"), s("2"), s("x"), Datum::UnchangedToast]);
        let st = build(
            &table(),
            &RowOp::Rekey {
                old: &old,
                new: &new,
            },
            "7",
        )
        .unwrap();
        assert_eq!(st.params[1], Some("2".into()));
        assert_eq!(st.params[4], Some("1".into()), "WHERE uses the old id");
        let st = build(&table(), &RowOp::Delete { old: &old }, "7").unwrap();
        assert!(st.sql.starts_with("DELETE FROM \"acme\".\"orders\" WHERE"));
        assert_eq!(st.params, vec![Some("7".into()), Some("1".into())]);
    }

    #[test]
    fn truncate_of_a_shared_table_is_scoped_to_the_tenant() {
        let st = build(&table(), &RowOp::Truncate, "7").unwrap();
        assert_eq!(
            st.sql,
            "DELETE FROM \"acme\".\"orders\" WHERE \"tenant_id\" = CAST($1 AS integer)"
        );
        assert_eq!(st.expect_rows, None);
        let mut own = table();
        own.tenant_column = None;
        assert_eq!(
            build(&own, &RowOp::Truncate, "7").unwrap().sql,
            "DELETE FROM \"acme\".\"orders\""
        );
    }

    #[test]
    fn bad_tuples_are_errors() {
        let short = t(&[s("7")]);
        assert!(matches!(
            build(&table(), &RowOp::Delete { old: &short }, "7"),
            Err(StatementError::Shape { .. })
        ));
        let bin = t(&[
            s("7"),
            Datum::Binary(Bytes::from_static(b"\x01")),
            s("x"),
            Datum::Null,
        ]);
        assert!(matches!(
            build(
                &table(),
                &RowOp::Upsert {
                    new: &bin,
                    update: false
                },
                "7"
            ),
            Err(StatementError::Binary { .. })
        ));
        let bad_utf8 = t(&[
            s("7"),
            s("1"),
            Datum::Text(Bytes::from_static(b"\xff")),
            Datum::Null,
        ]);
        assert!(matches!(
            build(
                &table(),
                &RowOp::Upsert {
                    new: &bad_utf8,
                    update: false
                },
                "7"
            ),
            Err(StatementError::NotText { .. })
        ));
        let toast = t(&[s("7"), s("1"), s("x"), Datum::UnchangedToast]);
        assert!(matches!(
            build(
                &table(),
                &RowOp::Upsert {
                    new: &toast,
                    update: false
                },
                "7"
            ),
            Err(StatementError::ToastInInsert { .. })
        ));
        let no_key = t(&[Datum::Null, Datum::Null, s("x"), Datum::Null]);
        assert!(matches!(
            build(&table(), &RowOp::Delete { old: &no_key }, "7"),
            Err(StatementError::NoKey { .. })
        ));
    }
}
