//! The SQL side of a backfill chunk: the keyset SELECT and the watermark messages.
//!
//! Invariants:
//! - Chunk queries order and compare keys exactly as [`super::KeyValue`] does: integers
//!   numerically, text with `COLLATE "C"`; a key type outside that set is refused up front.
//! - Every value is a bound text parameter cast to the column's type; names are quoted.
//! - A chunk row of the parameterised query is its key columns as text (to order and
//!   compare keys) followed by every column, in its own type when the rows travel as binary
//!   COPY, as text otherwise (see `apply::copy`); the COPY form has every column
//!   in its own type only (keys are decoded from their binary values).
//! - Watermarks are transactional logical messages with prefix [`WATERMARK_PREFIX`]: their
//!   place in the stream is their commit's place, which is what brackets the SELECT.

use serde::{Deserialize, Serialize};

use super::{ChunkSpec, Cursor, Key, KeyKind, KeyValue};
use crate::sql::CopyFormat;
use crate::sql::{quote_ident, QualifiedName};

pub const WATERMARK_PREFIX: &str = "switchyard.watermark";

/// What a chunk query needs to know about a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTable {
    pub source: QualifiedName,
    /// Writable columns in source order (what pgoutput sends).
    pub columns: Vec<String>,
    /// Primary key: (index into `columns`, kind), in key order.
    pub key: Vec<(usize, KeyKind)>,
    /// Shared tables: the tenant column and its SQL type; `None` for schema-per-tenant.
    pub tenant: Option<(String, String)>,
}

/// Which watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mark {
    Low,
    High,
}

/// The content of a watermark message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// The daemon run that wrote it: watermarks of an earlier run (replayed after a
    /// restart) belong to windows that no longer exist and are ignored.
    #[serde(default)]
    pub run: u64,
    pub tenant: String,
    pub table: String,
    pub chunk: u64,
    pub mark: Mark,
}

impl Watermark {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a watermark is plain data")
    }

    /// `None` for other prefixes or content that is not ours.
    pub fn parse(prefix: &str, content: &[u8]) -> Option<Watermark> {
        if prefix != WATERMARK_PREFIX {
            return None;
        }
        serde_json::from_slice(content).ok()
    }
}

/// The SQL that writes a watermark into the WAL (run in its own short transaction).
pub const EMIT_SQL: &str = "SELECT pg_logical_emit_message(true, 'switchyard.watermark', $1::text)";

impl ChunkTable {
    pub(crate) fn key_expr(&self, i: usize) -> String {
        let (col, kind) = self.key[i];
        // Qualified: a bare name in ORDER BY would pick the `col::text` output column and
        // sort numbers as text.
        let name = format!("src.{}", quote_ident(&self.columns[col]));
        match kind {
            KeyKind::Int | KeyKind::Uuid => name,
            KeyKind::Text => format!("{name} COLLATE \"C\""),
        }
    }

    pub(crate) fn key_param(kind: KeyKind, p: &str) -> String {
        match kind {
            KeyKind::Int => format!("CAST({p} AS bigint)"),
            KeyKind::Text => format!("({p}::text COLLATE \"C\")"),
            KeyKind::Uuid => format!("CAST({p} AS uuid)"),
        }
    }

    /// `key <op> k` for a comparison operator, over the key columns other than the
    /// tenant column, which the query pins by equality. Comparing it too would keep the
    /// index from starting at `k`: with an equality and a row comparison on one leading
    /// column, btree starts at the equality and filters every key before `k`, a quadratic
    /// backfill. Leaving out a column equal on both sides keeps the lexicographic order.
    /// `k` is a key of this tenant's rows (its tenant value is the tenant's).
    pub(crate) fn key_compare(
        &self,
        op: &str,
        k: &[KeyValue],
        bind: &mut impl FnMut(String) -> String,
    ) -> String {
        let tenant_col = self.tenant.as_ref().map(|(c, _)| c.as_str());
        let mut exprs = Vec::new();
        let mut ps = Vec::new();
        for (i, v) in k.iter().enumerate() {
            let Some(&(col, kind)) = self.key.get(i) else {
                continue;
            };
            if Some(self.columns[col].as_str()) == tenant_col {
                continue;
            }
            let p = bind(Self::key_text(v));
            exprs.push(self.key_expr(i));
            ps.push(Self::key_param(kind, &p));
        }
        match exprs.len() {
            // The key is the tenant column alone: one row per tenant, equal to `k`.
            0 if op.contains('=') => "true".into(),
            0 => "false".into(),
            1 => format!("{} {op} {}", exprs[0], ps[0]),
            _ => format!("({}) {op} ({})", exprs.join(", "), ps.join(", ")),
        }
    }

    /// The index that gives chunk queries their key order: the key columns in key order,
    /// text ones `COLLATE "C"` (chunk keys compare bytewise), the tenant column as it is
    /// (it is pinned by an equality in the column's own collation). A primary key in another
    /// collation cannot serve `ORDER BY … COLLATE "C"`: every chunk would sort all the
    /// tenant's rows after its cursor.
    pub fn key_order_index_sql(&self) -> String {
        let tenant_col = self.tenant.as_ref().map(|(c, _)| c.as_str());
        let cols = self
            .key
            .iter()
            .map(|&(i, kind)| {
                let name = &self.columns[i];
                match kind {
                    KeyKind::Text if Some(name.as_str()) != tenant_col => {
                        format!("{} COLLATE \"C\"", quote_ident(name))
                    }
                    _ => quote_ident(name),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "CREATE INDEX CONCURRENTLY ON {} ({cols});",
            self.source.quoted()
        )
    }

    /// A range chunk query from the start of the tenant's keys (to ask the planner how it
    /// would read chunks), with its text parameters.
    pub fn first_chunk_query(&self, tenant: &str, limit: usize) -> (String, Vec<Option<String>>) {
        let lowest = self
            .key
            .iter()
            .map(|(_, kind)| match kind {
                KeyKind::Int => KeyValue::Int(i64::MIN),
                KeyKind::Text => KeyValue::Text(String::new()),
                KeyKind::Uuid => KeyValue::Text("00000000-0000-0000-0000-000000000000".into()),
            })
            .collect();
        self.query(
            tenant,
            &ChunkSpec::Range {
                after: Cursor::After(lowest),
                limit,
            },
            CopyFormat::Binary,
        )
    }

    pub(crate) fn key_text(v: &KeyValue) -> String {
        match v {
            KeyValue::Int(i) => i.to_string(),
            KeyValue::Text(s) => s.clone(),
        }
    }

    /// The chunk SELECT for `tenant` and `spec`, with its text parameters: the key columns
    /// as text, then every column (as text for `CopyFormat::Text`).
    pub fn query(
        &self,
        tenant: &str,
        spec: &ChunkSpec,
        format: CopyFormat,
    ) -> (String, Vec<Option<String>>) {
        self.build(tenant, spec, format, false)
    }

    /// The same SELECT in binary, wrapped in `COPY (…) TO STDOUT (FORMAT binary)`, so the rows
    /// arrive as binary COPY rows, without the key columns as text in front: the reader
    /// decodes keys from the binary values ([`super::KeyKind::decode_binary`]), which spares
    /// the source an output function per key column and row (~30 % of a chunk's COPY).
    /// COPY takes no parameters: values are inlined as string literals with quotes doubled,
    /// which is exact under `standard_conforming_strings = on` (the reader's sessions set it).
    pub fn copy_query(&self, tenant: &str, spec: &ChunkSpec) -> String {
        let (select, _) = self.build(tenant, spec, CopyFormat::Binary, true);
        format!("COPY ({select}) TO STDOUT (FORMAT binary)")
    }

    fn build(
        &self,
        tenant: &str,
        spec: &ChunkSpec,
        format: CopyFormat,
        inline: bool,
    ) -> (String, Vec<Option<String>>) {
        let mut params: Vec<Option<String>> = Vec::new();
        let mut bind = |v: String| -> String {
            if inline {
                format!("'{}'", v.replace('\'', "''"))
            } else {
                params.push(Some(v));
                format!("${}", params.len())
            }
        };
        let cast = match format {
            CopyFormat::Text => "::text",
            CopyFormat::Binary => "",
        };
        let key_texts = if inline { 0 } else { self.key.len() };
        let cols = self
            .key
            .iter()
            .take(key_texts)
            .map(|(i, _)| format!("src.{}::text", quote_ident(&self.columns[*i])))
            .chain(
                self.columns
                    .iter()
                    .map(|c| format!("src.{}{cast}", quote_ident(c))),
            )
            .collect::<Vec<_>>()
            .join(", ");
        let mut conds = Vec::new();
        if let Some((col, ty)) = &self.tenant {
            let p = bind(tenant.to_owned());
            conds.push(format!("src.{} = CAST({p} AS {ty})", quote_ident(col)));
        }
        let key_row = format!(
            "({})",
            (0..self.key.len())
                .map(|i| self.key_expr(i))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut limit = None;
        match spec {
            ChunkSpec::Range { after, limit: l } => {
                limit = Some(*l);
                if let Cursor::After(k) = after {
                    conds.push(self.key_compare(">", k, &mut bind));
                }
            }
            ChunkSpec::Keys(keys) => {
                let mut tuples = Vec::new();
                for k in keys {
                    let mut ps = Vec::new();
                    for (i, v) in k.iter().enumerate() {
                        let p = bind(Self::key_text(v));
                        ps.push(Self::key_param(self.key[i].1, &p));
                    }
                    tuples.push(format!("({})", ps.join(", ")));
                }
                if tuples.is_empty() {
                    conds.push("false".into());
                } else {
                    conds.push(format!("{key_row} IN ({})", tuples.join(", ")));
                }
            }
        }
        let order = (0..self.key.len())
            .map(|i| self.key_expr(i))
            .collect::<Vec<_>>()
            .join(", ");
        let mut sql = format!("SELECT {cols} FROM {} AS src", self.source.quoted());
        if !conds.is_empty() {
            sql.push_str(&format!(" WHERE {}", conds.join(" AND ")));
        }
        sql.push_str(&format!(" ORDER BY {order}"));
        if let Some(l) = limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        (sql, params)
    }

    /// The key from its columns' text, in key order; `None` if a value is NULL or does not
    /// parse as its kind.
    pub fn key_from(&self, values: &[Option<&str>]) -> Option<Key> {
        if values.len() != self.key.len() {
            return None;
        }
        self.key
            .iter()
            .zip(values)
            .map(|((_, kind), v)| v.and_then(|t| kind.parse(t)))
            .collect()
    }

    /// The key of a row (text values in `columns` order); `None` if a key value is NULL or
    /// does not parse as its kind.
    pub fn key_of(&self, values: &[Option<&str>]) -> Option<Key> {
        self.key
            .iter()
            .map(|(i, kind)| {
                values
                    .get(*i)
                    .copied()
                    .flatten()
                    .and_then(|t| kind.parse(t))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ChunkTable {
        ChunkTable {
            source: QualifiedName::parse("public.orders").unwrap(),
            columns: vec![
                "tenant_id".into(),
                "id".into(),
                "code".into(),
                "note".into(),
            ],
            key: vec![(0, KeyKind::Int), (1, KeyKind::Int), (2, KeyKind::Text)],
            tenant: Some(("tenant_id".into(), "integer".into())),
        }
    }

    #[test]
    fn range_queries_use_row_comparison_in_key_order() {
        let (sql, params) = table().query(
            "7",
            &ChunkSpec::Range {
                after: Cursor::Start,
                limit: 100,
            },
            CopyFormat::Binary,
        );
        assert_eq!(
            sql,
            "SELECT src.\"tenant_id\"::text, src.\"id\"::text, src.\"code\"::text, \
             src.\"tenant_id\", src.\"id\", src.\"code\", src.\"note\" \
             FROM \"public\".\"orders\" AS src \
             WHERE src.\"tenant_id\" = CAST($1 AS integer) \
             ORDER BY src.\"tenant_id\", src.\"id\", src.\"code\" COLLATE \"C\" LIMIT 100"
        );
        assert_eq!(params, vec![Some("7".into())]);
        let after = Cursor::After(vec![
            KeyValue::Int(7),
            KeyValue::Int(5),
            KeyValue::Text("o'k".into()),
        ]);
        let (sql, params) = table().query(
            "7",
            &ChunkSpec::Range { after, limit: 10 },
            CopyFormat::Text,
        );
        assert!(
            sql.contains("src.\"code\"::text, src.\"note\"::text FROM"),
            "{sql}"
        );
        assert!(sql.contains(
            "WHERE src.\"tenant_id\" = CAST($1 AS integer) AND (src.\"id\", src.\"code\" COLLATE \"C\") > (CAST($2 AS bigint), ($3::text COLLATE \"C\"))"
        ), "{sql}");
        assert_eq!(
            params[2],
            Some("o'k".into()),
            "values are bound, never inlined"
        );
    }

    #[test]
    fn key_comparisons_leave_out_the_pinned_tenant_column() {
        let mut n = 0;
        let mut bind = |_v: String| {
            n += 1;
            format!("${n}")
        };
        let k = vec![
            KeyValue::Int(7),
            KeyValue::Int(5),
            KeyValue::Text("x".into()),
        ];
        // Shared table: the tenant column goes, the rest stays a row comparison.
        assert_eq!(
            table().key_compare(">", &k, &mut bind),
            "(src.\"id\", src.\"code\" COLLATE \"C\") > (CAST($1 AS bigint), ($2::text COLLATE \"C\"))"
        );
        // Schema-per-tenant: no tenant column, every key column compares.
        let whole = ChunkTable {
            tenant: None,
            ..table()
        };
        assert!(whole
            .key_compare("<=", &k, &mut bind)
            .starts_with("(src.\"tenant_id\", src.\"id\", src.\"code\" COLLATE \"C\") <= ("));
        // One column left: a plain comparison; none left: the tenant's single row.
        let two = ChunkTable {
            key: vec![(0, KeyKind::Int), (1, KeyKind::Int)],
            ..table()
        };
        assert_eq!(
            two.key_compare(">", &k[..2], &mut bind),
            "src.\"id\" > CAST($6 AS bigint)"
        );
        let only = ChunkTable {
            key: vec![(0, KeyKind::Int)],
            ..table()
        };
        assert_eq!(only.key_compare(">", &k[..1], &mut bind), "false");
        assert_eq!(only.key_compare("<=", &k[..1], &mut bind), "true");
    }

    #[test]
    fn the_key_order_index_collates_text_keys_bytewise() {
        assert_eq!(
            table().key_order_index_sql(),
            "CREATE INDEX CONCURRENTLY ON \"public\".\"orders\" (\"tenant_id\", \"id\", \"code\" COLLATE \"C\");"
        );
        let text_tenant = ChunkTable {
            columns: vec!["org".into(), "e\"mail".into()],
            key: vec![(0, KeyKind::Text), (1, KeyKind::Text)],
            tenant: Some(("org".into(), "text".into())),
            ..table()
        };
        assert!(text_tenant
            .key_order_index_sql()
            .ends_with("(\"org\", \"e\"\"mail\" COLLATE \"C\");"));
        let (sql, params) = table().first_chunk_query("7", 100);
        assert!(sql.ends_with("LIMIT 100"), "{sql}");
        assert_eq!(
            params,
            vec![
                Some("7".into()),
                Some(i64::MIN.to_string()),
                Some(String::new())
            ]
        );
    }

    #[test]
    fn copy_queries_inline_values_as_quoted_literals() {
        let after = Cursor::After(vec![
            KeyValue::Int(7),
            KeyValue::Int(5),
            KeyValue::Text("o'k'); DROP TABLE x; --".into()),
        ]);
        let sql = table().copy_query("7'", &ChunkSpec::Range { after, limit: 10 });
        assert!(
            sql.starts_with(
                "COPY (SELECT src.\"tenant_id\", src.\"id\", src.\"code\", src.\"note\" FROM"
            ),
            "{sql}"
        );
        assert!(
            sql.ends_with("LIMIT 10) TO STDOUT (FORMAT binary)"),
            "{sql}"
        );
        assert!(
            sql.contains("src.\"tenant_id\" = CAST('7''' AS integer)"),
            "{sql}"
        );
        assert!(
            sql.contains("('o''k''); DROP TABLE x; --'::text COLLATE \"C\")"),
            "{sql}"
        );
        assert!(!sql.contains('$'), "{sql}");
    }

    #[test]
    fn key_lists_and_empty_lists() {
        let keys = [vec![
            KeyValue::Int(7),
            KeyValue::Int(1),
            KeyValue::Text("a".into()),
        ]]
        .into();
        let (sql, params) = table().query("7", &ChunkSpec::Keys(keys), CopyFormat::Binary);
        assert!(
            sql.contains(
                ") IN ((CAST($2 AS bigint), CAST($3 AS bigint), ($4::text COLLATE \"C\")))"
            ),
            "{sql}"
        );
        assert!(!sql.contains("LIMIT"));
        assert_eq!(params.len(), 4);
        let (sql, _) = table().query(
            "7",
            &ChunkSpec::Keys(Default::default()),
            CopyFormat::Binary,
        );
        assert!(sql.contains("AND false"));
    }

    #[test]
    fn keys_parse_from_text_rows() {
        let t = table();
        assert_eq!(
            t.key_of(&[Some("7"), Some("12"), Some("x"), None]),
            Some(vec![
                KeyValue::Int(7),
                KeyValue::Int(12),
                KeyValue::Text("x".into())
            ])
        );
        assert_eq!(t.key_of(&[Some("7"), None, Some("x"), None]), None);
        assert_eq!(t.key_of(&[Some("7"), Some("1.5"), Some("x"), None]), None);
        assert_eq!(
            t.key_from(&[Some("7"), Some("12"), Some("x")]),
            t.key_of(&[Some("7"), Some("12"), Some("x"), None])
        );
        assert_eq!(t.key_from(&[Some("7"), Some("12")]), None);
    }

    #[test]
    fn watermarks_round_trip_and_ignore_strangers() {
        let w = Watermark {
            run: 42,
            tenant: "ac\"me".into(),
            table: "public.orders".into(),
            chunk: 3,
            mark: Mark::High,
        };
        assert_eq!(
            Watermark::parse(WATERMARK_PREFIX, w.to_json().as_bytes()),
            Some(w.clone())
        );
        assert_eq!(Watermark::parse("other", w.to_json().as_bytes()), None);
        assert_eq!(Watermark::parse(WATERMARK_PREFIX, b"{not json"), None);
    }
}
