//! `switchyard check`: are the source's prerequisites met? Each failure carries the exact fix.
//!
//! Invariants:
//! - Read-only: checking never creates, alters or drops anything.
//! - Every failed item names the setting or object and the SQL (or config) that fixes it.

use serde::Serialize;
use tokio_postgres::Client;

use super::connection::ReplicationConnection;
use super::slot;
use crate::config::{Config, ReplicationConfig};
use crate::sql::{quote_ident, quote_literal, QualifiedName};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub check: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    fn push(
        &mut self,
        check: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        fix: Option<String>,
    ) {
        self.items.push(Item {
            check: check.into(),
            status,
            detail: detail.into(),
            fix,
        });
    }

    pub fn passed(&self) -> bool {
        self.items.iter().all(|i| i.status != Status::Fail)
    }

    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for i in &self.items {
            let tag = match i.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            out.push_str(&format!("{tag} {}: {}\n", i.check, i.detail));
            if let Some(fix) = &i.fix {
                out.push_str(&format!("     fix: {fix}\n"));
            }
        }
        let fails = self
            .items
            .iter()
            .filter(|i| i.status == Status::Fail)
            .count();
        out.push_str(&if fails == 0 {
            "all prerequisites met\n".to_string()
        } else {
            format!("{fails} prerequisite(s) not met\n")
        });
        out
    }
}

/// Runs every check against the configured source.
pub async fn run(config: &Config) -> Report {
    let mut report = Report::default();
    let ep = &config.source;
    let client = match ep.connect_sql().await {
        Ok(c) => {
            report.push(
                "connect",
                Status::Ok,
                format!("connected to {}", ep.describe()),
                None,
            );
            c
        }
        Err(e) => {
            report.push(
                "connect",
                Status::Fail,
                e.to_string(),
                Some("check source.host/port/user/dbname, the password variable or file, sslmode, and that pg_hba.conf admits this role".into()),
            );
            return report;
        }
    };
    if let Err(e) = checks(&client, config, &mut report).await {
        report.push("query", Status::Fail, e.to_string(), None);
    }
    transport("source", ep, &mut report);
    for (name, t) in &config.targets {
        if !t.same_database(ep) {
            transport(&format!("target {name}"), t, &mut report);
        }
    }
    replication_login(config, &mut report).await;
    // Enum types of the published tables: provisioning creates them on each target in the
    // schema they have on the source.
    let enums = if config.targets.is_empty() {
        Vec::new()
    } else {
        enum_types_of_publication(&client, config, &mut report).await
    };
    targets(config, &enums, &mut report).await;
    report
}

async fn enum_types_of_publication(
    client: &Client,
    config: &Config,
    report: &mut Report,
) -> Vec<(String, String)> {
    match client
        .query(
            "SELECT DISTINCT n.nspname::text, t.typname::text \
               FROM pg_publication_tables pt \
               JOIN pg_namespace tn ON tn.nspname = pt.schemaname \
               JOIN pg_class c ON c.relnamespace = tn.oid AND c.relname = pt.tablename \
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
               JOIN pg_type t ON (t.oid = a.atttypid OR t.typarray = a.atttypid) AND t.typtype = 'e' \
               JOIN pg_namespace n ON n.oid = t.typnamespace \
              WHERE pt.pubname = $1 ORDER BY 1, 2",
            &[&config.replication.publication],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        Err(e) => {
            report.push("enum types", Status::Fail, e.to_string(), None);
            Vec::new()
        }
    }
}

/// Each target: reachable, may create schemas, may apply like a replication worker, and
/// may create the source's enum types that it lacks.
async fn targets(config: &Config, enums: &[(String, String)], r: &mut Report) {
    for (name, ep) in &config.targets {
        let check = format!("target {name}");
        let client = match ep.connect_sql().await {
            Ok(c) => c,
            Err(e) => {
                r.push(
                    check,
                    Status::Fail,
                    e.to_string(),
                    Some(format!(
                        "check targets.{name} host/port/user/dbname, its password variable or file, sslmode, and pg_hba.conf on the target"
                    )),
                );
                continue;
            }
        };
        let row = client
            .query_one(
                "SELECT has_database_privilege(current_user, current_database(), 'CREATE'), \
                        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) \
                        OR has_parameter_privilege(current_user, 'session_replication_role', 'SET'), \
                        current_user::text, current_database()::text",
                &[],
            )
            .await;
        match row {
            Err(e) => r.push(check, Status::Fail, e.to_string(), None),
            Ok(row) => {
                let (create, replica, user, db): (bool, bool, String, String) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                if !create {
                    r.push(
                        check,
                        Status::Fail,
                        format!("{user} may not create schemas in {db}"),
                        Some(format!(
                            "GRANT CREATE ON DATABASE {} TO {};",
                            quote_ident(&db),
                            quote_ident(&user)
                        )),
                    );
                } else if !replica {
                    r.push(
                        check,
                        Status::Warn,
                        format!("{user} may not set session_replication_role: foreign keys and triggers would fire while applying"),
                        Some(format!(
                            "GRANT SET ON PARAMETER session_replication_role TO {};",
                            quote_ident(&user)
                        )),
                    );
                } else {
                    r.push(
                        check,
                        Status::Ok,
                        format!(
                            "{} reachable, {user} may create schemas and apply",
                            ep.describe()
                        ),
                        None,
                    );
                }
            }
        }
        if !enums.is_empty() {
            enum_types(&client, name.as_str(), enums, r).await;
        }
        if config.cutover.rollback {
            rollback_rights(&client, name.as_str(), r).await;
        }
    }
}

/// Reverse replication after a cutover needs a slot at the target (REPLICATION).
async fn rollback_rights(client: &Client, target: &str, r: &mut Report) {
    let check = format!("target {target} rollback");
    match client
        .query_one(
            "SELECT rolreplication OR rolsuper, rolname::text FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(row) if row.get::<_, bool>(0) => r.push(
            check,
            Status::Ok,
            "may create the slot that keeps the old location current after a cutover",
            None,
        ),
        Ok(row) => {
            let user: String = row.get(1);
            r.push(
                check,
                Status::Fail,
                format!("{user} lacks REPLICATION: cutovers cannot prepare the rollback (cutover.rollback = true)"),
                Some(format!(
                    "ALTER ROLE {} REPLICATION; or set cutover.rollback = false",
                    quote_ident(&user)
                )),
            );
        }
        Err(e) => r.push(check, Status::Warn, format!("cannot tell: {e}"), None),
    }
}

/// Enum types the target lacks must be creatable in their schema (a schema that does not
/// exist yet is created by switchyard, which the database privilege covers).
async fn enum_types(client: &Client, target: &str, enums: &[(String, String)], r: &mut Report) {
    let check = format!("target {target} types");
    let mut blocked: Vec<String> = Vec::new();
    let mut fixes: Vec<String> = Vec::new();
    for (schema, name) in enums {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
                                 WHERE n.nspname = $1 AND t.typname = $2), \
                        (SELECT has_schema_privilege(current_user, oid, 'CREATE') \
                           FROM pg_namespace WHERE nspname = $1), \
                        current_user::text",
                &[schema, name],
            )
            .await;
        match row {
            Err(e) => {
                r.push(check, Status::Fail, e.to_string(), None);
                return;
            }
            Ok(row) => {
                let (exists, may_create, user): (bool, Option<bool>, String) =
                    (row.get(0), row.get(1), row.get(2));
                if !exists && may_create == Some(false) {
                    blocked.push(format!("{}.{}", quote_ident(schema), quote_ident(name)));
                    let fix = format!(
                        "GRANT CREATE ON SCHEMA {} TO {};",
                        quote_ident(schema),
                        quote_ident(&user)
                    );
                    if !fixes.contains(&fix) {
                        fixes.push(fix);
                    }
                }
            }
        }
    }
    if blocked.is_empty() {
        r.push(
            check,
            Status::Ok,
            format!(
                "the source's enum types exist or can be created ({})",
                enums.len()
            ),
            None,
        );
    } else {
        r.push(
            check,
            Status::Fail,
            format!(
                "enum types {} are missing and may not be created in their schema",
                blocked.join(", ")
            ),
            Some(format!(
                "{} (or create the types yourself)",
                fixes.join(" ")
            )),
        );
    }
}

async fn setting(client: &Client, name: &str) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
        .await?
        .get(0))
}

/// What ends the source's checks early: a query that failed, reported as the `query` item.
type QueryError = Box<dyn std::error::Error + Send + Sync>;

/// The source's own prerequisites, in the order the report lists them.
async fn checks(client: &Client, config: &Config, r: &mut Report) -> Result<(), QueryError> {
    let repl = &config.replication;
    check_wal_level(client, r).await?;

    let slot = slot::slot_info(client, &repl.slot).await?;
    check_slot_room(client, slot.is_some(), r).await?;
    check_walsenders(client, r).await?;

    check_wal_retention(client, r).await?;
    check_sender_timeout(client, repl, r).await?;

    let role = check_role(client, r).await?;

    report_slot(repl, slot.as_ref(), r);

    check_publication(client, repl, &role, r).await?;
    check_row_filter(client, config, r).await;

    check_sessions(client, &role, r).await;
    for table in &repl.tables {
        let tenant_column = (config.tenancy.mode == crate::config::TenancyMode::Shared)
            .then(|| config.tenancy.column_of(table));
        check_table(client, table, tenant_column, r).await?;
        if config.tenancy.mode == crate::config::TenancyMode::Shared {
            check_tenant_column(client, table, config.tenancy.column_of(table), r).await?;
        }
    }
    Ok(())
}

/// Logical decoding needs `wal_level = logical`; nothing else works without it.
async fn check_wal_level(client: &Client, r: &mut Report) -> Result<(), QueryError> {
    let wal_level = setting(client, "wal_level").await?;
    if wal_level == "logical" {
        r.push("wal_level", Status::Ok, "logical", None);
    } else {
        r.push(
            "wal_level",
            Status::Fail,
            format!("is {wal_level}; logical decoding needs logical"),
            Some("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into()),
        );
    }
    Ok(())
}

/// The first start creates the slot: there must be room for it, unless it exists already
/// (`have_slot`).
async fn check_slot_room(
    client: &Client,
    have_slot: bool,
    r: &mut Report,
) -> Result<(), QueryError> {
    let max_slots: i64 = setting(client, "max_replication_slots")
        .await?
        .parse()
        .unwrap_or(0);
    let used_slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    if have_slot || used_slots < max_slots {
        r.push(
            "max_replication_slots",
            Status::Ok,
            format!("{used_slots} of {max_slots} in use"),
            None,
        );
    } else {
        r.push(
            "max_replication_slots",
            Status::Fail,
            format!("all {max_slots} slots are in use and none is ours"),
            Some(format!(
                "ALTER SYSTEM SET max_replication_slots = {}; then restart PostgreSQL",
                max_slots + 2
            )),
        );
    }
    Ok(())
}

/// The stream needs a walsender of its own.
async fn check_walsenders(client: &Client, r: &mut Report) -> Result<(), QueryError> {
    let max_senders: i64 = setting(client, "max_wal_senders")
        .await?
        .parse()
        .unwrap_or(0);
    let senders: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_replication", &[])
        .await?
        .get(0);
    if senders < max_senders {
        r.push(
            "max_wal_senders",
            Status::Ok,
            format!("{senders} of {max_senders} in use"),
            None,
        );
    } else {
        r.push(
            "max_wal_senders",
            Status::Fail,
            format!("{senders} of {max_senders} in use: no walsender left for switchyard"),
            Some(format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart PostgreSQL",
                max_senders + 2
            )),
        );
    }
    Ok(())
}

/// A slot that stalls keeps WAL: without a limit, until the source's disk is full.
async fn check_wal_retention(client: &Client, r: &mut Report) -> Result<(), QueryError> {
    let keep: i64 = setting(client, "max_slot_wal_keep_size")
        .await?
        .parse()
        .unwrap_or(-1);
    if keep < 0 {
        r.push(
            "max_slot_wal_keep_size",
            Status::Warn,
            "unlimited: a stalled slot can retain WAL until the disk is full",
            Some("ALTER SYSTEM SET max_slot_wal_keep_size = '<a few times your peak WAL per hour>'; SELECT pg_reload_conf();".into()),
        );
    } else {
        r.push(
            "max_slot_wal_keep_size",
            Status::Ok,
            format!("{keep} MB"),
            None,
        );
    }
    Ok(())
}

/// The source drops a stream that reports its position less often than its sender
/// timeout allows.
async fn check_sender_timeout(
    client: &Client,
    repl: &ReplicationConfig,
    r: &mut Report,
) -> Result<(), QueryError> {
    let sender_timeout_ms: i64 = setting(client, "wal_sender_timeout")
        .await?
        .parse()
        .unwrap_or(60_000);
    let status_ms = repl.status_interval.as_millis() as i64;
    if sender_timeout_ms > 0 && sender_timeout_ms < 3 * status_ms {
        r.push(
            "wal_sender_timeout",
            Status::Fail,
            format!("{sender_timeout_ms} ms is less than 3 × replication.status_interval_ms ({status_ms} ms)"),
            Some(format!("lower replication.status_interval_ms to at most {}", sender_timeout_ms / 3)),
        );
    } else {
        r.push(
            "wal_sender_timeout",
            Status::Ok,
            format!("{sender_timeout_ms} ms"),
            None,
        );
    }
    Ok(())
}

/// The connecting role, as the later checks' fixes name it.
struct Role {
    name: String,
    /// May create a publication (CREATE on the database).
    can_create: bool,
}

/// Streaming needs a role WITH REPLICATION; what else it may do decides later fixes.
async fn check_role(client: &Client, r: &mut Report) -> Result<Role, QueryError> {
    let role = client
        .query_one(
            "SELECT rolname::text, rolreplication, rolsuper, \
                    has_database_privilege(current_database(), 'CREATE') \
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (rolname, can_replicate, is_super, can_create): (String, bool, bool, bool) =
        (role.get(0), role.get(1), role.get(2), role.get(3));
    if can_replicate || is_super {
        let detail = if is_super {
            "superuser (works, but a role WITH REPLICATION is enough)"
        } else {
            "has REPLICATION"
        };
        r.push("role", Status::Ok, format!("{rolname} {detail}"), None);
    } else {
        r.push(
            "role",
            Status::Fail,
            format!("{rolname} lacks the REPLICATION attribute"),
            Some(format!(
                "ALTER ROLE {} WITH REPLICATION;",
                quote_ident(&rolname)
            )),
        );
    }
    Ok(Role {
        name: rolname,
        can_create,
    })
}

/// An existing slot must still hold its WAL and decode with pgoutput; a missing one is
/// created on first start.
fn report_slot(repl: &ReplicationConfig, slot: Option<&slot::SlotInfo>, r: &mut Report) {
    match slot {
        None => r.push(
            "slot",
            Status::Ok,
            format!("{:?} does not exist yet; it is created on first start", repl.slot),
            None,
        ),
        Some(s) if s.wal_status.as_deref() == Some("lost") => r.push(
            "slot",
            Status::Fail,
            format!("{:?} is invalidated (wal_status lost)", repl.slot),
            Some(format!(
                "SELECT pg_drop_replication_slot({}); and restart the moves (data since the slot's position is gone); raise max_slot_wal_keep_size",
                quote_literal(&repl.slot)
            )),
        ),
        Some(s) if s.plugin.as_deref() != Some("pgoutput") => r.push(
            "slot",
            Status::Fail,
            format!("{:?} uses plugin {:?}, not pgoutput", repl.slot, s.plugin),
            Some("choose another replication.slot name".into()),
        ),
        Some(s) => r.push(
            "slot",
            Status::Ok,
            format!(
                "{:?} exists (confirmed {}, wal_status {})",
                repl.slot,
                s.confirmed_flush.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                s.wal_status.as_deref().unwrap_or("-")
            ),
            None,
        ),
    }
}

/// The publication must contain every configured table, or be one the role may create on
/// first start.
async fn check_publication(
    client: &Client,
    repl: &ReplicationConfig,
    role: &Role,
    r: &mut Report,
) -> Result<(), QueryError> {
    let rolname = &role.name;
    let published = slot::publication_tables(client, &repl.publication).await?;
    match slot::publication_fix(&repl.publication, published.as_deref(), &repl.tables) {
        None => r.push(
            "publication",
            Status::Ok,
            format!("{:?} contains every configured table", repl.publication),
            None,
        ),
        Some(fix) if role.can_create && published.is_none() => r.push(
            "publication",
            Status::Ok,
            format!(
                "{:?} does not exist yet; it is created on first start",
                repl.publication
            ),
            Some(fix),
        ),
        Some(fix) => r.push(
            "publication",
            Status::Fail,
            match published {
                None => format!(
                    "{:?} does not exist and {rolname} cannot create it",
                    repl.publication
                ),
                Some(_) => format!("{:?} lacks configured tables", repl.publication),
            },
            Some(format!("{fix}; (run as the tables' owner)")),
        ),
    }
    Ok(())
}

/// Whether the daemon can keep the publication's row filter to the moving tenants
/// (docs/source.md): a warning, since an unfiltered stream is slower, never wrong.
async fn check_row_filter(client: &Client, config: &Config, r: &mut Report) {
    const CHECK: &str = "row filter";
    if !config.replication.row_filter || config.tenancy.mode != crate::config::TenancyMode::Shared {
        return;
    }
    let publication = &config.replication.publication;
    let tables = match super::filter::published_tables(client, publication, |t| {
        config.tenancy.column_of(t).to_string()
    })
    .await
    {
        Ok(Ok(tables)) => tables,
        Ok(Err(reason)) => {
            return r.push(
                CHECK,
                Status::Warn,
                format!("not kept ({reason}): the walsender sends every tenant's rows"),
                None,
            )
        }
        Err(e) => return r.push(CHECK, Status::Warn, format!("cannot tell: {e}"), None),
    };
    let filterable: Vec<String> = tables
        .iter()
        .filter(|t| t.filterable.is_some())
        .map(|t| t.name.quoted())
        .collect();
    if filterable.is_empty() {
        return r.push(
            CHECK,
            Status::Warn,
            "no published table has its tenant column in its replica identity",
            None,
        );
    }
    let owners = client
        .query(
            "SELECT DISTINCT pg_get_userbyid(o.owner), current_user::text FROM ( \
               SELECT pubowner AS owner FROM pg_publication WHERE pubname = $1 \
               UNION ALL SELECT c.relowner FROM pg_class c WHERE c.oid = ANY ($2::text[]::regclass[])) o \
             WHERE NOT pg_has_role(current_user, o.owner, 'MEMBER')",
            &[publication, &filterable],
        )
        .await;
    match owners {
        Ok(rows) if rows.is_empty() => r.push(
            CHECK,
            Status::Ok,
            format!(
                "kept on {} tables: the walsender sends the moving tenants' rows only",
                filterable.len()
            ),
            None,
        ),
        Ok(rows) => {
            let roles: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
            let me: String = rows[0].get(1);
            r.push(
                CHECK,
                Status::Warn,
                "switchyard's role does not own the publication and its tables: the walsender sends every tenant's rows",
                Some(
                    roles
                        .iter()
                        .map(|o| format!("GRANT {} TO {}", quote_ident(o), quote_ident(&me)))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            )
        }
        Err(e) => r.push(CHECK, Status::Warn, format!("cannot tell: {e}"), None),
    }
}

/// A cutover waits out transactions older than its fence: the role must see them all.
async fn check_sessions(client: &Client, role: &Role, r: &mut Report) {
    match crate::cluster::sees_all_sessions(client).await {
        Ok(true) => r.push(
            "sessions",
            Status::Ok,
            "the role sees every session's transaction (cutovers can wait out old ones)",
            None,
        ),
        Ok(false) => r.push(
            "sessions",
            Status::Warn,
            "the role cannot see other roles' transactions; cutovers refuse to start",
            Some(format!(
                "GRANT pg_read_all_stats TO {};",
                quote_ident(&role.name)
            )),
        ),
        Err(e) => r.push("sessions", Status::Warn, format!("cannot tell: {e}"), None),
    }
}

/// `tenant_column`: a shared table's tenant column, whose place in the replica identity
/// routing depends on (advice never takes it out).
async fn check_table(
    client: &Client,
    table: &QualifiedName,
    tenant_column: Option<&str>,
    r: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let name = format!("table {table}");
    let row = client
        .query_opt(
            "SELECT c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident), \
                    has_table_privilege(c.oid, 'SELECT'), c.relkind::text, \
                    has_table_privilege(c.oid, 'TRIGGER'), \
                    $3::text IS NULL OR EXISTS (SELECT 1 FROM pg_index i \
                        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey) \
                       WHERE i.indrelid = c.oid AND i.indisprimary AND a.attname = $3) \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name, &tenant_column],
        )
        .await?;
    let Some(row) = row else {
        r.push(
            name,
            Status::Fail,
            "does not exist",
            Some("fix replication.tables or create the table".into()),
        );
        return Ok(());
    };
    let (ident, has_pk, has_ident_index, can_select, kind): (String, bool, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let can_fence: bool = row.get(5);
    // With DEFAULT identity a delete carries the primary key only: it must hold the tenant
    // column for the delete to say whose row it removes.
    let pk_has_tenant: bool = row.get(6);
    if kind != "r" && kind != "p" {
        r.push(
            &name,
            Status::Fail,
            format!("is not a table (relkind {kind})"),
            None,
        );
        return Ok(());
    }
    if !can_select {
        r.push(
            &name,
            Status::Fail,
            "no SELECT privilege (needed to copy existing rows)",
            Some(format!(
                "GRANT SELECT ON {} TO <switchyard role>;",
                table.quoted()
            )),
        );
    }
    if !can_fence && (kind == "r" || kind == "p") {
        r.push(
            &name,
            Status::Warn,
            "no TRIGGER privilege: a cutover cannot install the write fence on it",
            Some(format!(
                "GRANT TRIGGER ON {} TO <switchyard role>;",
                table.quoted()
            )),
        );
    }
    let add_pk = format!(
        "ALTER TABLE {} ADD PRIMARY KEY (<key columns>); or, if no key exists, ALTER TABLE {} REPLICA IDENTITY FULL;",
        table.quoted(),
        table.quoted()
    );
    match (ident.as_str(), has_pk, has_ident_index) {
        ("d", true, _) => r.push(
            &name,
            Status::Ok,
            "replica identity DEFAULT with primary key",
            None,
        ),
        ("d", false, _) => r.push(
            &name,
            Status::Fail,
            "no primary key: UPDATE and DELETE would carry no row identity",
            Some(add_pk),
        ),
        ("i", _, true) => r.push(&name, Status::Ok, "replica identity USING INDEX", None),
        ("i", _, false) => r.push(
            &name,
            Status::Fail,
            "replica identity index is missing",
            Some(add_pk),
        ),
        ("f", _, _) if has_pk && !pk_has_tenant => r.push(
            &name,
            Status::Ok,
            "replica identity FULL: needed here (the primary key lacks the tenant column), every UPDATE/DELETE logs the whole old row",
            None,
        ),
        ("f", _, _) => r.push(
            &name,
            Status::Warn,
            "replica identity FULL: works, but every UPDATE/DELETE logs the whole old row",
            if has_pk {
                Some(format!(
                    "ALTER TABLE {} REPLICA IDENTITY DEFAULT;",
                    table.quoted()
                ))
            } else {
                None
            },
        ),
        _ => r.push(
            &name,
            Status::Fail,
            "replica identity NOTHING: UPDATE and DELETE cannot be replicated",
            Some(if has_pk {
                format!("ALTER TABLE {} REPLICA IDENTITY DEFAULT;", table.quoted())
            } else {
                add_pk
            }),
        ),
    }
    Ok(())
}

/// Shared tables: the tenant column must exist and be part of the replica identity, or
/// deletes would not say which tenant's row they remove.
async fn check_tenant_column(
    client: &Client,
    table: &QualifiedName,
    column: &str,
    r: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let name = format!("tenant column {table}.{column}");
    let row = client
        .query_opt(
            "SELECT c.relreplident::text, a.attnotnull, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
                              AND ((c.relreplident = 'd' AND i.indisprimary) \
                                OR (c.relreplident = 'i' AND i.indisreplident)) \
                              AND a.attnum = ANY (i.indkey)) \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $3 AND NOT a.attisdropped \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name, &column],
        )
        .await?;
    let Some(row) = row else {
        r.push(
            name,
            Status::Fail,
            "missing: the table has no such column",
            Some(format!(
                "set tenancy.columns.\"{table}\" to the table's tenant column, or leave the table out"
            )),
        );
        return Ok(());
    };
    let (ident, not_null, in_index): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if ident != "f" && !in_index {
        r.push(
            &name,
            Status::Fail,
            "not part of the replica identity: deletes would not say whose row they remove",
            Some(format!(
                "make the primary key include {col} (e.g. PRIMARY KEY ({col}, id)), or ALTER TABLE {} REPLICA IDENTITY FULL;",
                table.quoted(),
                col = crate::sql::quote_ident(column)
            )),
        );
    } else if !not_null {
        r.push(
            &name,
            Status::Warn,
            "nullable: a row whose tenant is NULL belongs to no tenant and is never moved",
            Some(format!(
                "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL;",
                table.quoted(),
                crate::sql::quote_ident(column)
            )),
        );
    } else {
        r.push(&name, Status::Ok, "in the replica identity, NOT NULL", None);
    }
    Ok(())
}

/// How well a connection is protected: below `verify-full` (over TCP) a man in the middle
/// can read or change what passes; the report says what each mode leaves open.
fn transport(what: &str, ep: &crate::cluster::Endpoint, r: &mut Report) {
    use crate::cluster::SslMode;
    let check = format!("{what} transport");
    if ep.is_unix_socket() {
        r.push(
            check,
            Status::Ok,
            "unix socket: no network in between",
            None,
        );
        return;
    }
    let (status, detail) = match ep.sslmode {
        SslMode::VerifyFull => (Status::Ok, "TLS, server certificate and host name verified"),
        SslMode::VerifyCa => (
            Status::Warn,
            "TLS with the certificate checked against the CA, but not the host name: any server holding a certificate of that CA can pose as this one",
        ),
        SslMode::Require => (
            Status::Warn,
            "TLS without checking who the server is: a man in the middle can read and change the traffic",
        ),
        SslMode::Prefer => (
            Status::Warn,
            "TLS only if the server offers it, unverified; without it, data travels in clear text",
        ),
        SslMode::Disable => (Status::Warn, "no TLS: data travels in clear text"),
    };
    let mut detail = detail.to_owned();
    if ep.allow_cleartext_password && ep.sslmode != SslMode::VerifyFull {
        detail.push_str(
            "; allow_cleartext_password = true lets the password itself travel in clear text",
        );
    }
    r.push(
        check,
        status,
        detail,
        (status != Status::Ok).then(|| {
            "sslmode = \"verify-full\" with sslrootcert (docs/configuration.md, TLS)".to_string()
        }),
    );
}

/// The replication login is separate from SQL: pg_hba.conf or a missing REPLICATION
/// attribute can refuse it even when SQL works.
async fn replication_login(config: &Config, r: &mut Report) {
    let result = async {
        let mut conn =
            ReplicationConnection::connect(&config.source, config.replication.max_message_bytes)
                .await?;
        let info = conn.identify_system().await?;
        let tls = conn.is_tls();
        conn.close().await;
        Ok::<_, super::SourceError>((info, tls))
    }
    .await;
    match result {
        Ok((info, tls)) => r.push(
            "replication connection",
            Status::Ok,
            format!(
                "IDENTIFY_SYSTEM: system {} timeline {} at {}{}",
                info.system_id,
                info.timeline,
                info.xlog_pos,
                if tls { " (TLS)" } else { "" }
            ),
            None,
        ),
        Err(e) => r.push(
            "replication connection",
            Status::Fail,
            e.to_string(),
            Some(
                "the role needs REPLICATION and pg_hba.conf must admit it to this database".into(),
            ),
        ),
    }
}
