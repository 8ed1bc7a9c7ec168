//! Provisioning: read the moved tables from the source catalog and create them at the target.
//!
//! ```text
//!   source catalog ──read_tables──► TableDef* ──plan(placement)──► DDL ──apply──► target (one txn)
//! ```
//!
//! Invariants:
//! - Catalog text is read with `search_path = ''`, so every name PostgreSQL renders is
//!   schema-qualified and nothing depends on the reader's path.
//! - SQL is built from catalog facts, never by editing rendered SQL: keys, foreign keys,
//!   sequences and defaults that use them are re-emitted with quoted target names. Rendered
//!   text is used only for self-contained pieces (types, CHECK bodies, index method tails);
//!   if such a piece names a moved schema, provisioning stops with an error rather than
//!   guess at a rewrite.
//! - Idempotent and atomic: the plan runs in one target transaction, every object is created
//!   only if missing, and an existing table whose columns differ is an error, never altered.
//! - Foreign keys between moved tables point at the moved copies; foreign keys to tables that
//!   stay behind are kept on the same cluster and dropped (with a warning) across clusters.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use crate::cluster::ClusterError;
use crate::sql::{quote_ident, quote_literal, QualifiedName};

/// Errors while provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("table {0} does not exist on the source")]
    MissingTable(QualifiedName),
    #[error("{table} is {kind}; only plain tables can be moved (partitioned tables: move the partitions)")]
    UnsupportedKind { table: QualifiedName, kind: String },
    #[error("{table} has no primary key; add one (ALTER TABLE {} ADD PRIMARY KEY (...)) before moving it", .table.quoted())]
    NoPrimaryKey { table: QualifiedName },
    #[error("{table}: {what} refers to schema {schema:?}, which is being moved; create it on the target by hand")]
    SchemaReference {
        table: QualifiedName,
        what: String,
        schema: String,
    },
    #[error(
        "target table {target} exists with different columns ({detail}); refusing to touch it"
    )]
    Mismatch {
        target: QualifiedName,
        detail: String,
    },
    #[error("{table}: column type {type_name} is a domain or composite from schema {schema:?}; create it on the target first")]
    UnsupportedType {
        table: QualifiedName,
        type_name: String,
        schema: String,
    },
    #[error("invalid placement: {0}")]
    Placement(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    /// `format_type` output, schema-qualified where needed.
    pub type_sql: String,
    pub not_null: bool,
    /// Default expression, unless it is the owned sequence's `nextval` (re-made per target).
    pub default: Option<String>,
    /// 'a' ALWAYS, 'd' BY DEFAULT.
    pub identity: Option<char>,
    /// Expression of a STORED generated column.
    pub generated: Option<String>,
    /// Sequence owned by this column (serial), if any.
    pub owned_sequence: Option<SequenceDef>,
    /// Set when the type is an enum: its schema, name and labels.
    pub enum_type: Option<EnumDef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnumDef {
    pub name: QualifiedName,
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceDef {
    pub name: QualifiedName,
    pub data_type: String,
    pub start: i64,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    pub cache: i64,
    pub cycle: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConstraintKind {
    PrimaryKey,
    Unique,
    Check,
    Exclude,
    ForeignKey(ForeignKeyDef),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignKeyDef {
    pub columns: Vec<String>,
    pub references: QualifiedName,
    pub ref_columns: Vec<String>,
    pub on_update: char,
    pub on_delete: char,
    pub match_full: bool,
    pub deferrable: bool,
    pub deferred: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConstraintDef {
    pub name: String,
    pub kind: ConstraintKind,
    /// `pg_get_constraintdef` text (used for PK, UNIQUE, CHECK, EXCLUDE).
    pub definition: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexDef {
    pub name: String,
    pub unique: bool,
    /// Everything from ` USING ` on: method, key expressions, INCLUDE, WHERE.
    pub tail: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableDef {
    pub name: QualifiedName,
    pub columns: Vec<ColumnDef>,
    pub constraints: Vec<ConstraintDef>,
    pub indexes: Vec<IndexDef>,
}

impl TableDef {
    pub fn primary_key(&self) -> Option<&ConstraintDef> {
        self.constraints
            .iter()
            .find(|c| c.kind == ConstraintKind::PrimaryKey)
    }
}

/// Where each moved table goes, and whether the target is the source cluster itself.
#[derive(Clone, Debug)]
pub struct Placement {
    pub same_cluster: bool,
    pub tables: BTreeMap<QualifiedName, QualifiedName>,
    /// Source schemas that move wholesale (schema-per-tenant), with their new names: types
    /// in them follow the tables. Shared schemas such as `public` stay where they are.
    pub schema_renames: BTreeMap<String, String>,
}

impl Placement {
    /// Shared tables into one target schema, keeping table names; shared schemas stay.
    pub fn into_schema(tables: &[QualifiedName], schema: &str, same_cluster: bool) -> Self {
        Placement {
            same_cluster,
            tables: tables
                .iter()
                .map(|t| {
                    (
                        t.clone(),
                        QualifiedName {
                            schema: schema.to_owned(),
                            name: t.name.clone(),
                        },
                    )
                })
                .collect(),
            schema_renames: BTreeMap::new(),
        }
    }

    /// A tenant's own schema, wholesale, into `to` (schema-per-tenant sources).
    pub fn schema_to_schema(
        tables: &[QualifiedName],
        from: &str,
        to: &str,
        same_cluster: bool,
    ) -> Self {
        let mut p = Placement::into_schema(tables, to, same_cluster);
        p.schema_renames.insert(from.to_owned(), to.to_owned());
        p
    }

    fn validate(&self) -> Result<(), ProvisionError> {
        let mut seen = BTreeSet::new();
        for (src, dst) in &self.tables {
            if self.same_cluster && src == dst {
                return Err(ProvisionError::Placement(format!(
                    "{src} would be moved onto itself"
                )));
            }
            if !seen.insert(dst) {
                return Err(ProvisionError::Placement(format!(
                    "two tables would be placed at {dst}"
                )));
            }
        }
        Ok(())
    }

    fn target_schemas(&self) -> BTreeSet<&str> {
        self.tables.values().map(|t| t.schema.as_str()).collect()
    }
}

async fn path_free(client: &Client) -> Result<(), ClusterError> {
    client
        .batch_execute("SET search_path = ''")
        .await
        .map_err(ClusterError::sql("setting an empty search_path"))
}

/// Reads the definitions of `tables` from the source catalog.
pub async fn read_tables(
    client: &Client,
    tables: &[QualifiedName],
) -> Result<Vec<TableDef>, ProvisionError> {
    path_free(client).await?;
    // All tables' queries at once on the one connection (pipelined, answered in order): a
    // tenant of many tables on a cluster across a network waits one round trip per query
    // of a table, not per query of every table.
    futures_util::future::try_join_all(tables.iter().map(|t| read_table(client, t))).await
}

/// One table's definition, read from the source catalog: the relation, then its columns,
/// constraints and indexes.
async fn read_table(client: &Client, table: &QualifiedName) -> Result<TableDef, ProvisionError> {
    let oid = read_relation(client, table).await?;
    let columns = read_columns(client, table, oid).await?;
    let constraints = read_constraints(client, table, oid).await?;
    let indexes = read_indexes(client, table, oid).await?;
    let def = TableDef {
        name: table.clone(),
        columns,
        constraints,
        indexes,
    };
    if def.primary_key().is_none() {
        return Err(ProvisionError::NoPrimaryKey {
            table: table.clone(),
        });
    }
    Ok(def)
}

/// The error of a catalog read of `table`, saying what was being read.
fn reading(
    what: &str,
    table: &QualifiedName,
) -> impl FnOnce(tokio_postgres::Error) -> ClusterError {
    ClusterError::sql(format!("reading {what} of {table}"))
}

/// The table's oid, once it is known to be a plain table (the only kind a move copies).
async fn read_relation(client: &Client, table: &QualifiedName) -> Result<u32, ProvisionError> {
    let rel = client
        .query_opt(
            "SELECT c.oid, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(reading("the relation", table))?
        .ok_or_else(|| ProvisionError::MissingTable(table.clone()))?;
    let oid: u32 = rel.get(0);
    let kind: String = rel.get(1);
    if kind != "r" {
        let kind = match kind.as_str() {
            "p" => "a partitioned table",
            "v" => "a view",
            "m" => "a materialized view",
            "f" => "a foreign table",
            _ => "not a table",
        };
        return Err(ProvisionError::UnsupportedKind {
            table: table.clone(),
            kind: kind.into(),
        });
    }
    Ok(oid)
}

/// The columns in order, with what the target must re-make for them: owned sequences,
/// enum types, and which default or generation expression carries over.
async fn read_columns(
    client: &Client,
    table: &QualifiedName,
    oid: u32,
) -> Result<Vec<ColumnDef>, ProvisionError> {
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text, \
                    t.typtype::text, tn.nspname::text, t.typname::text, a.attnum, \
                    (SELECT s.oid FROM pg_depend dep JOIN pg_class s ON s.oid = dep.objid \
                      WHERE dep.refobjid = a.attrelid AND dep.refobjsubid = a.attnum \
                        AND dep.classid = 'pg_class'::regclass AND s.relkind = 'S' \
                        AND dep.deptype = 'a' LIMIT 1) \
               FROM pg_attribute a \
               JOIN pg_type t ON t.oid = a.atttypid \
               JOIN pg_namespace tn ON tn.oid = t.typnamespace \
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
              ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(reading("columns", table))?;
    let mut columns = Vec::with_capacity(cols.len());
    for r in &cols {
        let identity: String = r.get(4);
        let generated: String = r.get(5);
        let typtype: String = r.get(6);
        let expr: Option<String> = r.get(3);
        let seq_oid: Option<u32> = r.get(10);
        let owned_sequence = match seq_oid {
            Some(s) => Some(read_sequence(client, s).await?),
            None => None,
        };
        let enum_type = if typtype == "e" {
            let labels = client
                .query(
                    "SELECT enumlabel::text FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid \
                       JOIN pg_namespace n ON n.oid = t.typnamespace \
                      WHERE n.nspname = $1 AND t.typname = $2 ORDER BY e.enumsortorder",
                    &[&r.get::<_, String>(7), &r.get::<_, String>(8)],
                )
                .await
                .map_err(reading("enum labels", table))?;
            Some(EnumDef {
                name: QualifiedName {
                    schema: r.get(7),
                    name: r.get(8),
                },
                labels: labels.iter().map(|l| l.get(0)).collect(),
            })
        } else {
            None
        };
        let (default, generated) = if generated == "s" {
            (None, expr)
        } else if owned_sequence.is_some()
            && expr.as_deref().is_some_and(|e| e.starts_with("nextval("))
        {
            // Re-made against the target's own sequence.
            (None, None)
        } else {
            (expr, None)
        };
        columns.push(ColumnDef {
            name: r.get(0),
            type_sql: r.get(1),
            not_null: r.get(2),
            default,
            identity: identity.chars().next(),
            generated,
            owned_sequence,
            enum_type,
        });
    }
    Ok(columns)
}

/// Keys, unique, check and exclusion constraints, and foreign keys (last) with what they
/// reference, so the plan can point them at the moved copies.
async fn read_constraints(
    client: &Client,
    table: &QualifiedName,
    oid: u32,
) -> Result<Vec<ConstraintDef>, ProvisionError> {
    let cons = client
        .query(
            "SELECT c.conname::text, c.contype::text, pg_get_constraintdef(c.oid), \
                    rn.nspname::text, rc.relname::text, \
                    ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i) \
                            JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i), \
                    ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i) \
                            JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i), \
                    c.confupdtype::text, c.confdeltype::text, c.confmatchtype::text, \
                    c.condeferrable, c.condeferred \
               FROM pg_constraint c \
               LEFT JOIN pg_class rc ON rc.oid = c.confrelid \
               LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace \
              WHERE c.conrelid = $1 AND c.contype IN ('p', 'u', 'c', 'x', 'f') \
              ORDER BY c.contype = 'f', c.conname",
            &[&oid],
        )
        .await
        .map_err(reading("constraints", table))?;
    let mut constraints = Vec::with_capacity(cons.len());
    for r in &cons {
        let contype: String = r.get(1);
        let kind = match contype.as_str() {
            "p" => ConstraintKind::PrimaryKey,
            "u" => ConstraintKind::Unique,
            "c" => ConstraintKind::Check,
            "x" => ConstraintKind::Exclude,
            _ => {
                let code = |s: String| s.chars().next().unwrap_or('a');
                ConstraintKind::ForeignKey(ForeignKeyDef {
                    columns: r.get(5),
                    references: QualifiedName {
                        schema: r.get::<_, Option<String>>(3).unwrap_or_default(),
                        name: r.get::<_, Option<String>>(4).unwrap_or_default(),
                    },
                    ref_columns: r.get(6),
                    on_update: code(r.get(7)),
                    on_delete: code(r.get(8)),
                    match_full: r.get::<_, String>(9) == "f",
                    deferrable: r.get(10),
                    deferred: r.get(11),
                })
            }
        };
        constraints.push(ConstraintDef {
            name: r.get(0),
            kind,
            definition: r.get(2),
        });
    }
    Ok(constraints)
}

/// Indexes that no constraint owns (those come with their constraint), each as its
/// method tail to re-emit on the target table.
async fn read_indexes(
    client: &Client,
    table: &QualifiedName,
    oid: u32,
) -> Result<Vec<IndexDef>, ProvisionError> {
    let idx = client
        .query(
            "SELECT ic.relname::text, i.indisunique, pg_get_indexdef(i.indexrelid) \
               FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
              WHERE i.indrelid = $1 \
                AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid \
                                  AND c.conrelid = i.indrelid) \
              ORDER BY 1",
            &[&oid],
        )
        .await
        .map_err(reading("indexes", table))?;
    let mut indexes = Vec::with_capacity(idx.len());
    for r in &idx {
        let def: String = r.get(2);
        let tail = def
            .find(" USING ")
            .map(|i| def[i..].to_owned())
            .ok_or_else(|| {
                ProvisionError::Placement(format!("unexpected index definition {def:?}"))
            })?;
        indexes.push(IndexDef {
            name: r.get(0),
            unique: r.get(1),
            tail,
        });
    }
    Ok(indexes)
}

async fn read_sequence(client: &Client, oid: u32) -> Result<SequenceDef, ProvisionError> {
    let r = client
        .query_one(
            "SELECT n.nspname::text, c.relname::text, format_type(s.seqtypid, NULL), s.seqstart, \
                    s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle \
               FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE s.seqrelid = $1",
            &[&oid],
        )
        .await
        .map_err(ClusterError::sql("reading a sequence"))?;
    Ok(SequenceDef {
        name: QualifiedName {
            schema: r.get(0),
            name: r.get(1),
        },
        data_type: r.get(2),
        start: r.get(3),
        increment: r.get(4),
        min: r.get(5),
        max: r.get(6),
        cache: r.get(7),
        cycle: r.get(8),
    })
}

/// One DDL step of a plan, with the object it creates (for existence checks and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Schema(String),
    Enum(EnumDef),
    Sequence(SequenceDef),
    Table {
        name: QualifiedName,
        sql: String,
        columns: Vec<(String, String)>,
    },
    SequenceOwner {
        sequence: QualifiedName,
        table: QualifiedName,
        column: String,
    },
    Constraint {
        table: QualifiedName,
        name: String,
        sql: String,
    },
    Index {
        index: QualifiedName,
        sql: String,
    },
}

/// The ordered DDL that creates `tables` at their placement, plus warnings for what is
/// deliberately left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub warnings: Vec<String>,
}

fn mentions_schema(text: &str, schema: &str) -> bool {
    // Rendered with search_path = '', references are `schema.` or `"schema".`.
    text.contains(&format!("{schema}.")) || text.contains(&format!("{}.", quote_ident(schema)))
}

/// Builds the plan. Pure: unit-tested without a database.
pub fn plan(tables: &[TableDef], placement: &Placement) -> Result<Plan, ProvisionError> {
    placement.validate()?;
    let mut planner = Planner {
        placement,
        p: Plan::default(),
        enums: BTreeMap::new(),
    };
    for s in placement.target_schemas() {
        planner.p.steps.push(Step::Schema(s.to_owned()));
    }
    // Types first: enums in a renamed schema follow it; others keep their name.
    for t in tables {
        planner.enum_types(t);
    }
    for t in tables {
        planner.table(t)?;
    }
    // Constraints after all tables, foreign keys last, so references resolve.
    for t in tables {
        planner.constraints(t)?;
        planner.indexes(t)?;
    }
    Ok(planner.finish())
}

/// A plan being built, table after table, for one placement.
struct Planner<'a> {
    placement: &'a Placement,
    p: Plan,
    /// Each source enum type and where the target has it.
    enums: BTreeMap<QualifiedName, QualifiedName>,
}

impl Planner<'_> {
    /// A renamed schema's name must not leak into rendered text on another cluster (it will
    /// not exist there); on the same cluster it still exists, so such references still work.
    fn guard(&self, table: &QualifiedName, what: &str, text: &str) -> Result<(), ProvisionError> {
        let placement = self.placement;
        for (from, to) in &placement.schema_renames {
            if !placement.same_cluster && from != to && mentions_schema(text, from) {
                return Err(ProvisionError::SchemaReference {
                    table: table.clone(),
                    what: what.to_owned(),
                    schema: from.clone(),
                });
            }
        }
        Ok(())
    }

    /// The enum types of `t`'s columns, created (with their schema) where the target lacks
    /// them; each is created once however many columns use it.
    fn enum_types(&mut self, t: &TableDef) {
        let placement = self.placement;
        for c in &t.columns {
            if let Some(e) = &c.enum_type {
                let dst = match placement.schema_renames.get(&e.name.schema) {
                    Some(to) => QualifiedName {
                        schema: to.clone(),
                        name: e.name.name.clone(),
                    },
                    None => e.name.clone(),
                };
                let needs_create = !placement.same_cluster || dst != e.name;
                if needs_create && !self.enums.contains_key(&e.name) {
                    if !placement.target_schemas().contains(dst.schema.as_str()) {
                        self.p.steps.push(Step::Schema(dst.schema.clone()));
                    }
                    self.p.steps.push(Step::Enum(EnumDef {
                        name: dst.clone(),
                        labels: e.labels.clone(),
                    }));
                }
                self.enums.insert(e.name.clone(), dst);
            }
        }
    }

    /// `t` at its placement: its sequences, the table, then the sequences' owner steps.
    fn table(&mut self, t: &TableDef) -> Result<(), ProvisionError> {
        let target = self
            .placement
            .tables
            .get(&t.name)
            .ok_or_else(|| ProvisionError::Placement(format!("no placement for {}", t.name)))?;
        let mut col_sql = Vec::new();
        let mut shape = Vec::new();
        for c in &t.columns {
            let (sql, type_sql) = self.column(t, c, target)?;
            shape.push((c.name.clone(), type_sql));
            col_sql.push(sql);
        }
        // Sequences must exist before the table whose default uses them.
        let table_sql = format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            target.quoted(),
            col_sql.join(", ")
        );
        let step = Step::Table {
            name: target.clone(),
            sql: table_sql,
            columns: shape,
        };
        // Keep sequence steps ahead of the table and owner steps after it.
        let owners: Vec<Step> = self
            .p
            .steps
            .iter()
            .filter(|s| matches!(s, Step::SequenceOwner { table, .. } if table == target))
            .cloned()
            .collect();
        self.p
            .steps
            .retain(|s| !matches!(s, Step::SequenceOwner { table, .. } if table == target));
        self.p.steps.push(step);
        self.p.steps.extend(owners);
        Ok(())
    }

    /// Column `c` of `t` as the target table's DDL writes it, and its type as the target
    /// names it (for the existence check). Its owned sequence gets steps of its own.
    fn column(
        &mut self,
        t: &TableDef,
        c: &ColumnDef,
        target: &QualifiedName,
    ) -> Result<(String, String), ProvisionError> {
        let type_sql = match &c.enum_type {
            Some(e) => self.enums[&e.name].quoted(),
            None => {
                self.guard(
                    &t.name,
                    &format!("the type of column {}", c.name),
                    &c.type_sql,
                )?;
                c.type_sql.clone()
            }
        };
        let mut sql = format!("{} {}", quote_ident(&c.name), type_sql);
        if let Some(seq) = &c.owned_sequence {
            let dst = QualifiedName {
                schema: target.schema.clone(),
                name: seq.name.name.clone(),
            };
            self.p.steps.push(Step::Sequence(SequenceDef {
                name: dst.clone(),
                ..seq.clone()
            }));
            sql.push_str(&format!(
                " DEFAULT nextval({}::regclass)",
                quote_literal(&dst.quoted())
            ));
            self.p.steps.push(Step::SequenceOwner {
                sequence: dst,
                table: target.clone(),
                column: c.name.clone(),
            });
        }
        if let Some(d) = &c.default {
            self.guard(&t.name, &format!("the default of column {}", c.name), d)?;
            sql.push_str(&format!(" DEFAULT {d}"));
        }
        match c.identity {
            Some('a') => sql.push_str(" GENERATED ALWAYS AS IDENTITY"),
            Some('d') => sql.push_str(" GENERATED BY DEFAULT AS IDENTITY"),
            _ => {}
        }
        if let Some(g) = &c.generated {
            self.guard(&t.name, &format!("generated column {}", c.name), g)?;
            sql.push_str(&format!(" GENERATED ALWAYS AS ({g}) STORED"));
        }
        if c.not_null {
            sql.push_str(" NOT NULL");
        }
        Ok((sql, type_sql))
    }

    /// `t`'s constraints on its moved copy. A foreign key points at the moved copy of what
    /// it references; to a table that stays behind it is kept on the same cluster and left
    /// out (with a warning) across clusters.
    fn constraints(&mut self, t: &TableDef) -> Result<(), ProvisionError> {
        let placement = self.placement;
        let target = &placement.tables[&t.name];
        for c in &t.constraints {
            let body = match &c.kind {
                ConstraintKind::ForeignKey(fk) => {
                    let referenced = match placement.tables.get(&fk.references) {
                        Some(moved) => moved.clone(),
                        None if placement.same_cluster => fk.references.clone(),
                        None => {
                            self.p.warnings.push(format!(
                                "{}: foreign key {} to {} is not created on the target: {} stays on the source cluster",
                                t.name, c.name, fk.references, fk.references
                            ));
                            continue;
                        }
                    };
                    fk_sql(fk, &referenced)
                }
                _ => {
                    self.guard(&t.name, &format!("constraint {}", c.name), &c.definition)?;
                    c.definition.clone()
                }
            };
            let sql = format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {}",
                target.quoted(),
                quote_ident(&c.name),
                body
            );
            let step = Step::Constraint {
                table: target.clone(),
                name: c.name.clone(),
                sql,
            };
            self.p.steps.push(step);
        }
        Ok(())
    }

    /// `t`'s own indexes on its moved copy, under their own names in its target schema.
    fn indexes(&mut self, t: &TableDef) -> Result<(), ProvisionError> {
        let target = &self.placement.tables[&t.name];
        for i in &t.indexes {
            self.guard(&t.name, &format!("index {}", i.name), &i.tail)?;
            self.p.steps.push(Step::Index {
                index: QualifiedName {
                    schema: target.schema.clone(),
                    name: i.name.clone(),
                },
                sql: format!(
                    "CREATE {}INDEX IF NOT EXISTS {} ON {}{}",
                    if i.unique { "UNIQUE " } else { "" },
                    quote_ident(&i.name),
                    target.quoted(),
                    i.tail
                ),
            });
        }
        Ok(())
    }

    /// The finished plan: foreign keys after every other constraint, each schema once.
    fn finish(self) -> Plan {
        let mut p = self.p;
        // Foreign keys after every other constraint.
        let (fks, rest): (Vec<Step>, Vec<Step>) = p.steps.into_iter().partition(
            |s| matches!(s, Step::Constraint { sql, .. } if sql.contains(" FOREIGN KEY ")),
        );
        p.steps = rest;
        p.steps.extend(fks);
        dedup_schemas(&mut p.steps);
        p
    }
}

async fn relation_exists(
    tx: &tokio_postgres::Transaction<'_>,
    name: &QualifiedName,
) -> Result<bool, ProvisionError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(ClusterError::sql("checking for a relation"))?
        .is_some())
}

fn dedup_schemas(steps: &mut Vec<Step>) {
    let mut seen = BTreeSet::new();
    steps.retain(|s| match s {
        Step::Schema(name) => seen.insert(name.clone()),
        _ => true,
    });
}

fn fk_action(code: char) -> &'static str {
    match code {
        'r' => "RESTRICT",
        'c' => "CASCADE",
        'n' => "SET NULL",
        'd' => "SET DEFAULT",
        _ => "NO ACTION",
    }
}

fn idents(cols: &[String]) -> String {
    cols.iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fk_sql(fk: &ForeignKeyDef, referenced: &QualifiedName) -> String {
    let mut sql = format!(
        "FOREIGN KEY ({}) REFERENCES {} ({})",
        idents(&fk.columns),
        referenced.quoted(),
        idents(&fk.ref_columns)
    );
    if fk.match_full {
        sql.push_str(" MATCH FULL");
    }
    sql.push_str(&format!(
        " ON UPDATE {} ON DELETE {}",
        fk_action(fk.on_update),
        fk_action(fk.on_delete)
    ));
    if fk.deferrable {
        sql.push_str(" DEFERRABLE");
        if fk.deferred {
            sql.push_str(" INITIALLY DEFERRED");
        }
    }
    sql
}

/// Where the target records the tables a tenant's move created (`<schema>.created` on the
/// target, written in the provisioning transaction itself): cancel drops only those, and
/// never a table that was there before (one of another tenant, say).
#[derive(Clone, Debug)]
pub struct Ledger<'a> {
    pub schema: &'a str,
    pub tenant: &'a str,
}

impl Ledger<'_> {
    /// The quoted name of the ledger table in `schema`.
    pub fn table(schema: &str) -> String {
        format!("{}.{}", quote_ident(schema), quote_ident("created"))
    }
}

/// Runs `plan` on the target in one transaction, creating only what is missing, and notes
/// every table it created in `ledger`.
/// Returns how many objects were created (0 when everything already existed).
pub async fn apply(
    client: &mut Client,
    plan: &Plan,
    ledger: Option<&Ledger<'_>>,
) -> Result<usize, ProvisionError> {
    let tx = client
        .transaction()
        .await
        .map_err(ClusterError::sql("starting the provisioning transaction"))?;
    tx.batch_execute("SET LOCAL search_path = ''")
        .await
        .map_err(ClusterError::sql("setting an empty search_path"))?;
    // Tenants provisioned at once on one database share objects (a source's enum types):
    // one provisioning at a time, so "check, then create" cannot race.
    tx.batch_execute("SELECT pg_advisory_xact_lock(hashtext('switchyard.provision'))")
        .await
        .map_err(ClusterError::sql(
            "waiting for other provisioning on the target",
        ))?;
    if let Some(l) = ledger {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} (\
               tenant text NOT NULL, relation text NOT NULL, \
               created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tenant, relation))",
            quote_ident(l.schema),
            Ledger::table(l.schema)
        ))
        .await
        .map_err(ClusterError::sql("creating the table of created tables"))?;
    }
    let mut created = 0;
    for step in &plan.steps {
        let (sql, exists) = step_sql(&tx, step).await?;
        if exists {
            continue;
        }
        tx.batch_execute(&sql)
            .await
            .map_err(ClusterError::sql(format!("provisioning: {sql}")))?;
        created += 1;
        if let (Some(l), Step::Table { name, .. }) = (ledger, step) {
            tx.execute(
                &format!(
                    "INSERT INTO {} (tenant, relation) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    Ledger::table(l.schema)
                ),
                &[&l.tenant, &name.quoted()],
            )
            .await
            .map_err(ClusterError::sql("noting a created table"))?;
        }
    }
    tx.commit()
        .await
        .map_err(ClusterError::sql("committing the provisioning transaction"))?;
    Ok(created)
}

/// The SQL of `step`, and whether its object exists at the target already (then nothing
/// is run for it).
async fn step_sql(
    tx: &tokio_postgres::Transaction<'_>,
    step: &Step,
) -> Result<(String, bool), ProvisionError> {
    Ok(match step {
        Step::Schema(s) => {
            let exists = tx
                .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[s])
                .await
                .map_err(ClusterError::sql("checking for a schema"))?
                .is_some();
            (format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(s)), exists)
        }
        Step::Enum(e) => {
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
                      WHERE n.nspname = $1 AND t.typname = $2",
                    &[&e.name.schema, &e.name.name],
                )
                .await
                .map_err(ClusterError::sql("checking for an enum type"))?
                .is_some();
            let labels = e.labels.iter().map(|l| quote_literal(l)).collect::<Vec<_>>().join(", ");
            (format!("CREATE TYPE {} AS ENUM ({labels})", e.name.quoted()), exists)
        }
        Step::Sequence(s) => (
            format!(
                "CREATE SEQUENCE IF NOT EXISTS {} AS {} INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} CACHE {}{}",
                s.name.quoted(),
                s.data_type,
                s.increment,
                s.min,
                s.max,
                s.start,
                s.cache,
                if s.cycle { " CYCLE" } else { " NO CYCLE" }
            ),
            relation_exists(tx, &s.name).await?,
        ),
        Step::Table { name, sql, columns } => (sql.clone(), table_exists(tx, name, columns).await?),
        Step::SequenceOwner {
            sequence,
            table,
            column,
        } => {
            let owned = tx
                .query_opt(
                    "SELECT 1 FROM pg_depend d \
                       JOIN pg_class s ON s.oid = d.objid JOIN pg_namespace sn ON sn.oid = s.relnamespace \
                       JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace \
                       JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid \
                      WHERE d.classid = 'pg_class'::regclass AND d.deptype = 'a' \
                        AND sn.nspname = $1 AND s.relname = $2 \
                        AND tn.nspname = $3 AND t.relname = $4 AND a.attname = $5",
                    &[&sequence.schema, &sequence.name, &table.schema, &table.name, column],
                )
                .await
                .map_err(ClusterError::sql("checking a sequence owner"))?
                .is_some();
            (
                format!(
                    "ALTER SEQUENCE {} OWNED BY {}.{}",
                    sequence.quoted(),
                    table.quoted(),
                    quote_ident(column)
                ),
                owned,
            )
        }
        Step::Constraint { table, name, sql } => {
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid \
                       JOIN pg_namespace n ON n.oid = r.relnamespace \
                      WHERE n.nspname = $1 AND r.relname = $2 AND c.conname = $3",
                    &[&table.schema, &table.name, name],
                )
                .await
                .map_err(ClusterError::sql("checking for a constraint"))?
                .is_some();
            (sql.clone(), exists)
        }
        Step::Index { index, sql } => (sql.clone(), relation_exists(tx, index).await?),
    })
}

/// Whether target table `name` exists; one that exists must have the source's `columns`
/// (names and types, in order), or provisioning stops rather than touch it.
async fn table_exists(
    tx: &tokio_postgres::Transaction<'_>,
    name: &QualifiedName,
    columns: &[(String, String)],
) -> Result<bool, ProvisionError> {
    let existing = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 \
                AND NOT a.attisdropped ORDER BY a.attnum",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(ClusterError::sql("checking for an existing table"))?;
    if !existing.is_empty() {
        let have: Vec<(String, String)> = existing.iter().map(|r| (r.get(0), r.get(1))).collect();
        let want: Vec<(String, String)> = columns
            .iter()
            .map(|(n, t)| (n.clone(), t.replace('"', "")))
            .collect();
        let have_cmp: Vec<(String, String)> = have
            .iter()
            .map(|(n, t)| (n.clone(), t.replace('"', "")))
            .collect();
        if have_cmp != want {
            return Err(ProvisionError::Mismatch {
                target: name.clone(),
                detail: format!("has {have:?}, source has {columns:?}"),
            });
        }
    }
    Ok(!existing.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QualifiedName {
        QualifiedName::parse(s).unwrap()
    }

    fn col(name: &str, ty: &str) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            type_sql: ty.into(),
            not_null: false,
            default: None,
            identity: None,
            generated: None,
            owned_sequence: None,
            enum_type: None,
        }
    }

    fn pk(cols: &str) -> ConstraintDef {
        ConstraintDef {
            name: "pk".into(),
            kind: ConstraintKind::PrimaryKey,
            definition: format!("PRIMARY KEY ({cols})"),
        }
    }

    fn orders() -> TableDef {
        let mut id = col("id", "bigint");
        id.not_null = true;
        id.owned_sequence = Some(SequenceDef {
            name: q("public.orders_id_seq"),
            data_type: "bigint".into(),
            start: 1,
            increment: 1,
            min: 1,
            max: i64::MAX,
            cache: 1,
            cycle: false,
        });
        let mut amount = col("amount", "numeric(12,2)");
        amount.default = Some("0".into());
        TableDef {
            name: q("public.orders"),
            columns: vec![
                id,
                col("tenant_id", "integer"),
                col("user_id", "integer"),
                amount,
            ],
            constraints: vec![
                pk("id"),
                ConstraintDef {
                    name: "orders_user_fk".into(),
                    kind: ConstraintKind::ForeignKey(ForeignKeyDef {
                        columns: vec!["user_id".into()],
                        references: q("public.users"),
                        ref_columns: vec!["id".into()],
                        on_update: 'a',
                        on_delete: 'c',
                        match_full: false,
                        deferrable: false,
                        deferred: false,
                    }),
                    definition: String::new(),
                },
                ConstraintDef {
                    name: "orders_plan_fk".into(),
                    kind: ConstraintKind::ForeignKey(ForeignKeyDef {
                        columns: vec!["tenant_id".into()],
                        references: q("public.plans"),
                        ref_columns: vec!["id".into()],
                        on_update: 'a',
                        on_delete: 'a',
                        match_full: false,
                        deferrable: true,
                        deferred: true,
                    }),
                    definition: String::new(),
                },
            ],
            indexes: vec![IndexDef {
                name: "orders_user_idx".into(),
                unique: false,
                tail: " USING btree (user_id)".into(),
            }],
        }
    }

    fn users() -> TableDef {
        TableDef {
            name: q("public.users"),
            columns: vec![col("id", "integer"), col("tenant_id", "integer")],
            constraints: vec![pk("id")],
            indexes: vec![],
        }
    }

    fn sql_of(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .map(|s| match s {
                Step::Schema(s) => format!("schema {s}"),
                Step::Enum(e) => format!("enum {}", e.name),
                Step::Sequence(s) => format!("sequence {}", s.name),
                Step::Table { sql, .. }
                | Step::Constraint { sql, .. }
                | Step::Index { sql, .. } => sql.clone(),
                Step::SequenceOwner { sequence, .. } => format!("owner {sequence}"),
            })
            .collect()
    }

    #[test]
    fn foreign_keys_follow_moved_tables_and_keep_or_drop_others() {
        let tables = [orders(), users()];
        let names: Vec<_> = tables.iter().map(|t| t.name.clone()).collect();
        let same = plan(&tables, &Placement::into_schema(&names, "acme", true)).unwrap();
        let sql = sql_of(&same);
        assert_eq!(sql[0], "schema acme");
        assert!(sql.iter().any(|s| s.contains(
            "REFERENCES \"acme\".\"users\" (\"id\") ON UPDATE NO ACTION ON DELETE CASCADE"
        )));
        assert!(sql.iter().any(|s| s.contains(
            "REFERENCES \"public\".\"plans\" (\"id\") ON UPDATE NO ACTION ON DELETE NO ACTION DEFERRABLE INITIALLY DEFERRED"
        )));
        assert!(same.warnings.is_empty());
        // Foreign keys come after every table and other constraint.
        let first_fk = sql.iter().position(|s| s.contains("FOREIGN KEY")).unwrap();
        let last_table = sql
            .iter()
            .rposition(|s| s.starts_with("CREATE TABLE"))
            .unwrap();
        let last_pk = sql.iter().rposition(|s| s.contains("PRIMARY KEY")).unwrap();
        assert!(first_fk > last_table && first_fk > last_pk, "{sql:#?}");

        let other = plan(&tables, &Placement::into_schema(&names, "acme", false)).unwrap();
        assert!(!sql_of(&other).iter().any(|s| s.contains("plans")));
        assert_eq!(other.warnings.len(), 1);
        assert!(other.warnings[0].contains("public.plans"));
    }

    #[test]
    fn owned_sequences_are_recreated_in_the_target_schema() {
        let p = plan(
            &[orders()],
            &Placement::into_schema(&[q("public.orders")], "acme", true),
        )
        .unwrap();
        let sql = sql_of(&p);
        let seq = sql
            .iter()
            .position(|s| s == "sequence acme.orders_id_seq")
            .unwrap();
        let table = sql
            .iter()
            .position(|s| s.starts_with("CREATE TABLE"))
            .unwrap();
        let owner = sql
            .iter()
            .position(|s| s == "owner acme.orders_id_seq")
            .unwrap();
        assert!(seq < table && table < owner, "{sql:#?}");
        assert!(sql[table].contains(
            "\"id\" bigint DEFAULT nextval('\"acme\".\"orders_id_seq\"'::regclass) NOT NULL"
        ));
        assert!(sql[table].contains("\"amount\" numeric(12,2) DEFAULT 0"));
        assert!(sql.iter().any(|s| s
            == "CREATE INDEX IF NOT EXISTS \"orders_user_idx\" ON \"acme\".\"orders\" USING btree (user_id)"));
    }

    #[test]
    fn hostile_names_stay_quoted() {
        let mut t = users();
        t.name = q("public.\"users\"\"; DROP TABLE x; --\"");
        t.columns[0].name = "id\"); DROP TABLE y; --".into();
        let placement = Placement::into_schema(&[t.name.clone()], "evil\"schema", true);
        let p = plan(&[t], &placement).unwrap();
        let table = sql_of(&p)
            .into_iter()
            .find(|s| s.starts_with("CREATE TABLE"))
            .unwrap();
        assert!(table.starts_with(
            "CREATE TABLE IF NOT EXISTS \"evil\"\"schema\".\"users\"\"; DROP TABLE x; --\" (\"id\"\"); DROP TABLE y; --\" integer"
        ), "{table}");
    }

    #[test]
    fn references_to_a_renamed_schema_across_clusters_are_refused() {
        let mut t = users();
        t.name = q("tenant_a.users");
        t.columns[1].default = Some("tenant_a.next_tenant()".into());
        let placement =
            Placement::schema_to_schema(&[q("tenant_a.users")], "tenant_a", "acme", false);
        let err = plan(std::slice::from_ref(&t), &placement).unwrap_err();
        assert!(
            matches!(err, ProvisionError::SchemaReference { .. }),
            "{err}"
        );
        // Keeping the schema name makes the same text valid on the target.
        let keep =
            Placement::schema_to_schema(&[q("tenant_a.users")], "tenant_a", "tenant_a", false);
        assert!(plan(&[t], &keep).is_ok());
    }

    #[test]
    fn bad_placements_are_refused() {
        let t = users();
        let onto_itself = Placement::into_schema(std::slice::from_ref(&t.name), "public", true);
        assert!(matches!(
            plan(std::slice::from_ref(&t), &onto_itself),
            Err(ProvisionError::Placement(_))
        ));
        let clash = Placement {
            same_cluster: false,
            tables: [(q("a.t"), q("x.t")), (q("b.t"), q("x.t"))].into(),
            schema_renames: BTreeMap::new(),
        };
        assert!(matches!(
            plan(&[], &clash),
            Err(ProvisionError::Placement(_))
        ));
    }

    #[test]
    fn enums_follow_a_moved_schema_or_keep_their_name() {
        let mut t = users();
        t.name = q("tenant_a.users");
        let mut mood = col("mood", "tenant_a.mood");
        mood.enum_type = Some(EnumDef {
            name: q("tenant_a.mood"),
            labels: vec!["ok".into(), "it's fine".into()],
        });
        let mut global = col("tier", "public.tier");
        global.enum_type = Some(EnumDef {
            name: q("public.tier"),
            labels: vec!["free".into()],
        });
        t.columns.push(mood);
        t.columns.push(global);
        let placement =
            Placement::schema_to_schema(&[q("tenant_a.users")], "tenant_a", "acme", false);
        let p = plan(&[t], &placement).unwrap();
        let sql = sql_of(&p);
        assert!(sql.contains(&"enum acme.mood".to_string()), "{sql:#?}");
        assert!(sql.contains(&"enum public.tier".to_string()), "{sql:#?}");
        assert!(sql.contains(&"schema public".to_string()), "{sql:#?}");
        let table = sql.iter().find(|s| s.starts_with("CREATE TABLE")).unwrap();
        assert!(table.contains("\"mood\" \"acme\".\"mood\""), "{table}");
        assert!(table.contains("\"tier\" \"public\".\"tier\""), "{table}");
    }
}
