//! The write fence at the old location: per-tenant, enforced by row triggers on each of the
//! tenant's source tables, decided by one row of `<registry>.fences`.
//!
//! ```text
//!   writer (any tenant)        gated table: tenant listed in the triggers' WHEN? no → go on
//!                              (an in-memory comparison); yes, or an ungated table:
//!                              trigger ─► fences row for that tenant?
//!                                            none   → go on
//!                                            armed  → advisory lock SHARED (tenant), re-read:
//!                                                     moved → refuse (SQLSTATE SY001)
//!   cutover                    advisory lock EXCLUSIVE (tenant), bounded by lock_timeout:
//!                              waits for the tenant's open writers, holds off new ones;
//!                              ... catch up, flip routes, fences row → moved, COMMIT
//! ```
//!
//! Invariants:
//! - A writer of a fenced tenant holds the tenant's shared advisory lock from its write (on
//!   a gated table: from the end of the writing statement) to its transaction's end, so the
//!   cutover's exclusive lock means: no transaction that wrote the tenant can commit before
//!   the cutover ends, and after a flip none can commit at all.
//! - After the cutover commits, every later write of the tenant reads the `moved` row and
//!   fails: read committed re-reads it after the lock (a new snapshot per statement);
//!   repeatable read and serializable lock the row `FOR SHARE`, which fails with a
//!   serialization error if the cutover changed it after their snapshot (the retry then
//!   sees `moved`). Transactions older than the fence row that hold a snapshot or wrote
//!   anything are waited out before an attempt ([`old_transactions`]): they took no lock.
//! - Other tenants are never locked. On a gated table (shared, triggers switchyard may own)
//!   their writes pay one comparison against the listed tenants; a tenant is listed before
//!   its fence is armed, and the list only grows, so an armed or moved tenant is never
//!   missing from it. Gated triggers run AFTER the row (a BEFORE trigger would lock every
//!   tenant's old row first): a writer takes the shared lock at its statement's end, still
//!   before its commit, so a cutover either waits for it or refuses it.
//! - Every name in generated SQL is quoted; function bodies are string literals, never
//!   dollar-quoted text that a hostile name could close.
//! - Trigger functions run as their owner (SECURITY DEFINER, fixed search_path), so
//!   applications need no rights on the registry and cannot redirect its names.
//! - No session but switchyard's own passes the fence. Inside `fence_check` (called from the
//!   SECURITY DEFINER trigger functions) `current_user` is the functions' owner, switchyard's
//!   role, so `session_user = current_user` means a session logged in as switchyard: only
//!   there do its apply (the replica role) and the bypass setting (one tenant) count. The
//!   triggers fire ALWAYS, so other sessions under `session_replication_role = replica`
//!   (subscriptions, pg_restore) are fenced too, and TRUNCATE is fenced by a statement
//!   trigger. An attempt whose triggers cannot be made ALWAYS (switchyard does not own the
//!   table) fails with the owner's fix.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::cluster::ClusterError;
use crate::sql::{quote_ident, quote_literal, typed_array, QualifiedName};
use crate::tenant::TenantId;

pub use crate::registry::fences::{ddl, BYPASS_SETTING, LOCK_ARGS, MOVED_SQLSTATE};

/// The name of the fence trigger on every fenced table.
pub const TRIGGER: &str = "switchyard_fence";

/// The name of the statement trigger that fences TRUNCATE on every fenced table.
pub const TRUNCATE_TRIGGER: &str = "switchyard_fence_truncate";

/// How a fenced table names its tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantOf {
    /// Shared table: the tenant column.
    Column(String),
    /// Schema-per-tenant: every row is this tenant's.
    Whole(TenantId),
}

/// The trigger function of a shared table (one per table: it reads the tenant column by
/// name, which a generic function could only do dynamically, per row).
pub fn column_function(registry_schema: &str, function: &str, column: &str) -> String {
    let schema = quote_ident(registry_schema);
    let col = quote_ident(column);
    let body = format!(
        "BEGIN
  IF TG_OP <> 'INSERT' THEN
    PERFORM {schema}.fence_check(OLD.{col}::text);
  END IF;
  IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.{col} IS DISTINCT FROM OLD.{col}) THEN
    PERFORM {schema}.fence_check(NEW.{col}::text);
  END IF;
  IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
  RETURN NEW;
END"
    );
    format!(
        "CREATE OR REPLACE FUNCTION {schema}.{}() RETURNS trigger LANGUAGE plpgsql \
         SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {}",
        quote_ident(function),
        quote_literal(&body)
    )
}

/// The row trigger on `table`.
pub fn trigger_sql(
    registry_schema: &str,
    table: &QualifiedName,
    function: &str,
    tenant: &TenantOf,
) -> String {
    let args = match tenant {
        TenantOf::Column(_) => String::new(),
        TenantOf::Whole(t) => quote_literal(t.as_str()),
    };
    format!(
        "CREATE TRIGGER {} BEFORE INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}.{}({args})",
        quote_ident(TRIGGER),
        table.quoted(),
        quote_ident(registry_schema),
        quote_ident(function),
    )
}

/// The TRUNCATE trigger on `table`.
pub fn truncate_trigger_sql(
    registry_schema: &str,
    table: &QualifiedName,
    tenant: &TenantOf,
) -> String {
    let args = match tenant {
        TenantOf::Column(c) => format!("'column', {}", quote_literal(c)),
        TenantOf::Whole(t) => format!("'whole', {}", quote_literal(t.as_str())),
    };
    format!(
        "CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.fence_truncate({args})",
        quote_ident(TRUNCATE_TRIGGER),
        table.quoted(),
        quote_ident(registry_schema),
    )
}

/// `ALTER TABLE` statements that make both fence triggers of `table` fire ALWAYS, for the
/// table's owner to run where switchyard does not own it.
pub fn always_sql(table: &QualifiedName) -> String {
    format!(
        "ALTER TABLE {t} ENABLE ALWAYS TRIGGER {}; ALTER TABLE {t} ENABLE ALWAYS TRIGGER {};",
        quote_ident(TRIGGER),
        quote_ident(TRUNCATE_TRIGGER),
        t = table.quoted()
    )
}

/// Installs the fence trigger on `table` unless it is there. Creating a trigger locks the
/// table against writes for a moment (it waits for open writers): the wait is bounded and
/// retried rather than queueing every writer of every tenant behind it.
pub async fn install(
    client: &mut Client,
    registry_schema: &str,
    table: &QualifiedName,
    tenant: &TenantOf,
    lock_wait: Duration,
    give_up_after: Duration,
) -> Result<bool, ClusterError> {
    let done = while_busy(
        client,
        registry_schema,
        table,
        Install::Ungated(tenant),
        lock_wait,
        give_up_after,
    )
    .await?;
    Ok(done.unwrap_or(false))
}

/// What one try of a fence install does.
#[derive(Clone, Copy)]
enum Install<'a> {
    /// [`try_install`].
    Ungated(&'a TenantOf),
    /// [`try_gate`].
    Gated {
        column: &'a str,
        tenant: &'a TenantId,
    },
}

/// Tries `install` again while the table is busy (55P03: its DDL lock waited `lock_wait`
/// in vain), until `give_up_after`.
async fn while_busy(
    client: &mut Client,
    registry_schema: &str,
    table: &QualifiedName,
    install: Install<'_>,
    lock_wait: Duration,
    give_up_after: Duration,
) -> Result<Option<bool>, ClusterError> {
    let started = Instant::now();
    loop {
        let tried = match install {
            Install::Ungated(tenant) => {
                try_install(client, registry_schema, table, tenant, lock_wait)
                    .await
                    .map(Some)
            }
            Install::Gated { column, tenant } => {
                try_gate(client, registry_schema, table, column, tenant, lock_wait).await
            }
        };
        match tried {
            Err(e)
                if e.sqlstate() == Some("55P03")
                    && started.elapsed() + lock_wait < give_up_after =>
            {
                tracing::debug!(%table, "fence: table busy; trying again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// A transaction that may change `table`'s fence triggers: its DDL waits at most
/// `lock_wait` for the table's writers (55P03 then), and one installer per table runs at
/// a time (two tenants of one shared table may be cut over at once).
async fn fence_ddl<'c>(
    client: &'c mut Client,
    table: &QualifiedName,
    lock_wait: Duration,
    ctx: &(dyn Fn(&str) -> String + Sync),
) -> Result<tokio_postgres::Transaction<'c>, ClusterError> {
    let tx = client
        .transaction()
        .await
        .map_err(ClusterError::sql(ctx("installing")))?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        lock_wait.as_millis().max(1)
    ))
    .await
    .map_err(ClusterError::sql(ctx("installing")))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('switchyard.fence_install'), hashtext($1))",
        &[&table.quoted()],
    )
    .await
    .map_err(ClusterError::sql(ctx("waiting to install")))?;
    Ok(tx)
}

async fn try_install(
    client: &mut Client,
    registry_schema: &str,
    table: &QualifiedName,
    tenant: &TenantOf,
    lock_wait: Duration,
) -> Result<bool, ClusterError> {
    let ctx = |what: &str| format!("{what} the fence trigger on {table}");
    let tx = fence_ddl(client, table, lock_wait, &ctx).await?;
    // Each trigger: whether it exists, and whether it fires ALWAYS ('A').
    let row = tx
        .query_one(
            "SELECT c.oid, \
                    (SELECT g.tgenabled::text FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgname = $3), \
                    (SELECT g.tgenabled::text FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgname = $4) \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name, &TRIGGER, &TRUNCATE_TRIGGER],
        )
        .await
        .map_err(ClusterError::sql(ctx("looking for")))?;
    let (oid, row_trigger, truncate_trigger): (u32, Option<String>, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    let always = |t: &Option<String>| t.as_deref() == Some("A");
    if always(&row_trigger) && always(&truncate_trigger) {
        return Ok(false);
    }
    if row_trigger.is_none() {
        let function = match tenant {
            TenantOf::Column(col) => {
                let f = format!("fence_{oid}");
                tx.batch_execute(&column_function(registry_schema, &f, col))
                    .await
                    .map_err(ClusterError::sql(ctx("creating the function of")))?;
                f
            }
            TenantOf::Whole(_) => "fence_whole".to_owned(),
        };
        tx.batch_execute(&trigger_sql(registry_schema, table, &function, tenant))
            .await
            .map_err(ClusterError::sql(ctx("creating")))?;
    }
    if truncate_trigger.is_none() {
        tx.batch_execute(&truncate_trigger_sql(registry_schema, table, tenant))
            .await
            .map_err(ClusterError::sql(ctx("creating the TRUNCATE part of")))?;
    }
    tx.commit()
        .await
        .map_err(ClusterError::sql(ctx("committing")))?;
    // A trigger that does not fire ALWAYS is skipped by every session under
    // `session_replication_role = replica`, and only the table's owner may change that. The
    // triggers are committed first: the owner's fix needs them to exist.
    let tx = client
        .transaction()
        .await
        .map_err(ClusterError::sql(ctx("enabling")))?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'; {}",
        lock_wait.as_millis().max(1),
        always_sql(table)
    ))
    .await
    .map_err(|e| {
        if e.code().map(|c| c.code()) == Some("42501") {
            ClusterError::sql(format!(
                "the fence on {table} must fire for every session, also under session_replication_role = replica, and only the table's owner can make it so. Fix: run `{}` as the owner, or GRANT the owner's role TO the switchyard role",
                always_sql(table)
            ))(e)
        } else {
            ClusterError::sql(ctx("enabling (ALWAYS)"))(e)
        }
    })?;
    tx.commit()
        .await
        .map_err(ClusterError::sql(ctx("committing")))?;
    Ok(true)
}

/// The gated row triggers of a shared table, one per event: a WHEN condition may not name
/// OLD in an INSERT trigger nor NEW in a DELETE one.
pub const GATED_TRIGGERS: [(&str, &str); 3] = [
    ("switchyard_fence_insert", "INSERT"),
    ("switchyard_fence_update", "UPDATE"),
    ("switchyard_fence_delete", "DELETE"),
];

/// The three gated triggers of a shared table whose tenant column is `column`, calling
/// `function` only for a row of a tenant in `gate` (an SQL array expression of the
/// column's type, or of text with `as_text`), or an update that changes the tenant column.
/// AFTER triggers: a BEFORE UPDATE or DELETE row trigger locks the old row before its WHEN
/// is even evaluated, which every other tenant's write would pay.
pub fn gated_triggers_sql(
    registry_schema: &str,
    table: &QualifiedName,
    function: &str,
    column: &str,
    gate: &str,
    as_text: bool,
) -> String {
    let col = |row: &str| {
        let c = format!("{row}.{}", quote_ident(column));
        if as_text {
            format!("{c}::text")
        } else {
            c
        }
    };
    let mut sql = String::new();
    for (name, event) in GATED_TRIGGERS {
        let when = match event {
            "INSERT" => format!("{} = ANY ({gate})", col("NEW")),
            "UPDATE" => format!(
                "{} = ANY ({gate}) OR NEW.{c} IS DISTINCT FROM OLD.{c}",
                col("OLD"),
                c = quote_ident(column)
            ),
            _ => format!("{} = ANY ({gate})", col("OLD")),
        };
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {name} ON {table};\n\
             CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW WHEN ({when}) \
             EXECUTE FUNCTION {}.{}();\n\
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name};\n",
            quote_ident(registry_schema),
            quote_ident(function),
            name = quote_ident(name),
            table = table.quoted(),
        ));
    }
    sql
}

/// Makes sure the fence of the shared `table` (tenant column `column`) covers `tenant`
/// before it is armed. Where switchyard may own the table's triggers, the row triggers are
/// gated: they list the fenced tenants (and `tenant`), so the writes of every other tenant
/// cost an in-memory comparison, not a function call; a tenant not yet listed has them
/// recreated (a short lock of the table, bounded and retried like [`install`]). Elsewhere
/// the ungated trigger of [`install`] is used, with the owner's fix.
pub async fn install_gated(
    client: &mut Client,
    registry_schema: &str,
    table: &QualifiedName,
    column: &str,
    tenant: &TenantId,
    lock_wait: Duration,
    give_up_after: Duration,
) -> Result<bool, ClusterError> {
    let gated = gate(
        client,
        registry_schema,
        (table, column, tenant),
        lock_wait,
        give_up_after,
    )
    .await?;
    match gated {
        Some(changed) => Ok(changed),
        None => {
            let of = TenantOf::Column(column.to_owned());
            install(
                client,
                registry_schema,
                table,
                &of,
                lock_wait,
                give_up_after,
            )
            .await
        }
    }
}

/// Gates the fence of `table` for `tenant` (see [`install_gated`]) where switchyard may
/// own the table's triggers, tried again while the table is busy: whether the triggers
/// were recreated, or `None` (nothing done) elsewhere, where an ungated trigger would tax
/// every tenant from then on rather than from the cutover.
pub async fn gate(
    client: &mut Client,
    registry_schema: &str,
    (table, column, tenant): (&QualifiedName, &str, &TenantId),
    lock_wait: Duration,
    give_up_after: Duration,
) -> Result<Option<bool>, ClusterError> {
    let install = Install::Gated { column, tenant };
    while_busy(
        client,
        registry_schema,
        table,
        install,
        lock_wait,
        give_up_after,
    )
    .await
}

/// One try of [`install_gated`]: `None` if switchyard cannot own the table's triggers.
async fn try_gate(
    client: &mut Client,
    registry_schema: &str,
    table: &QualifiedName,
    column: &str,
    tenant: &TenantId,
    lock_wait: Duration,
) -> Result<Option<bool>, ClusterError> {
    let ctx = |what: &str| format!("{what} the fence gate on {table}");
    let schema = quote_ident(registry_schema);
    let tx = fence_ddl(client, table, lock_wait, &ctx).await?;
    let row = tx
        .query_one(
            &format!(
                "SELECT c.oid, pg_has_role(c.relowner, 'MEMBER'), a.atttypid, \
                        format_type(a.atttypid, a.atttypmod), \
                        EXISTS (SELECT 1 FROM pg_operator o WHERE o.oprname = '=' \
                                 AND o.oprleft = a.atttypid AND o.oprright = a.atttypid), \
                        (SELECT g.tenants FROM {schema}.fence_gates g WHERE g.tbl = c.oid), \
                        (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid \
                           AND t.tgname = ANY ($4) AND t.tgenabled = 'A') \
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $3 \
                    AND NOT a.attisdropped \
                  WHERE n.nspname = $1 AND c.relname = $2"
            ),
            &[
                &table.schema,
                &table.name,
                &column,
                &GATED_TRIGGERS.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(ClusterError::sql(ctx("looking for")))?;
    let (oid, owner, typ, type_name, has_eq): (u32, bool, u32, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let (listed, enabled): (Option<Vec<String>>, i64) = (row.get(5), row.get(6));
    if !owner {
        return Ok(None);
    }
    if enabled == GATED_TRIGGERS.len() as i64
        && listed
            .as_ref()
            .is_some_and(|l| l.iter().any(|t| t == tenant.as_str()))
    {
        return Ok(Some(false));
    }
    // Every fenced tenant (armed or moved), every tenant listed before (one whose attempt
    // is between its gate and its arming, as this one is, has no fence row yet), and the
    // one about to be armed, as far as the column's type takes them: a tenant missing here
    // would pass the fence unchecked.
    let values: Vec<String> = tx
        .query_one(
            &format!(
                "SELECT {schema}.fence_gate_values(ARRAY(SELECT tenant FROM {schema}.fences \
                   UNION SELECT unnest($3::text[]) UNION SELECT $1::text), $2::oid::regtype)"
            ),
            &[&tenant.as_str(), &typ, &listed.clone().unwrap_or_default()],
        )
        .await
        .map_err(ClusterError::sql(ctx("listing the tenants of")))?
        .get(0);
    let element = if has_eq { type_name.as_str() } else { "text" };
    let gate = typed_array(&values, element);
    let function = format!("fence_{oid}");
    // The table's function, unless there (the ungated trigger used it too; its owner may
    // be another role of switchyard's, as the registry's own functions may).
    let has_function: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
              WHERE n.nspname = $1 AND p.proname = $2)",
            &[&registry_schema, &function],
        )
        .await
        .map_err(ClusterError::sql(ctx("looking for")))?
        .get(0);
    if !has_function {
        tx.batch_execute(&column_function(registry_schema, &function, column))
            .await
            .map_err(ClusterError::sql(ctx("creating the function of")))?;
    }
    tx.batch_execute(&format!(
        "{}DROP TRIGGER IF EXISTS {} ON {};",
        gated_triggers_sql(registry_schema, table, &function, column, &gate, !has_eq),
        quote_ident(TRIGGER),
        table.quoted(),
    ))
    .await
    .map_err(ClusterError::sql(ctx("creating")))?;
    let truncate: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2)",
            &[&oid, &TRUNCATE_TRIGGER],
        )
        .await
        .map_err(ClusterError::sql(ctx("looking for")))?
        .get(0);
    if !truncate {
        tx.batch_execute(&format!(
            "{};\nALTER TABLE {} ENABLE ALWAYS TRIGGER {};",
            truncate_trigger_sql(registry_schema, table, &TenantOf::Column(column.to_owned())),
            table.quoted(),
            quote_ident(TRUNCATE_TRIGGER)
        ))
        .await
        .map_err(ClusterError::sql(ctx("creating the TRUNCATE part of")))?;
    }
    tx.execute(
        &format!(
            "INSERT INTO {schema}.fence_gates (tbl, tenants) VALUES ($1, $2)              ON CONFLICT (tbl) DO UPDATE SET tenants = EXCLUDED.tenants"
        ),
        &[&oid, &values],
    )
    .await
    .map_err(ClusterError::sql(ctx("recording")))?;
    tx.commit()
        .await
        .map_err(ClusterError::sql(ctx("committing")))?;
    Ok(Some(true))
}

/// Takes `key`'s fence exclusively inside `tx`, waiting at most `wait` for the tenant's open
/// writers (new ones queue behind it). `Ok(false)`: the wait ran out and nothing is held.
pub async fn take(
    tx: &tokio_postgres::Transaction<'_>,
    key: &TenantId,
    wait: Duration,
) -> Result<bool, ClusterError> {
    let limit = format!("SET LOCAL lock_timeout = '{}ms'", wait.as_millis().max(1));
    // Sent together, the lock typed (a statement given as text is prepared first): the
    // server runs the setting before the lock, in one round trip on a busy server.
    let lock = format!("SELECT pg_advisory_xact_lock({LOCK_ARGS})");
    let (limited, locked) = futures_util::future::join(
        tx.batch_execute(&limit),
        tx.execute_typed(&lock, &[(&key.as_str(), tokio_postgres::types::Type::TEXT)]),
    )
    .await;
    limited.map_err(ClusterError::sql("setting the fence's lock timeout"))?;
    match locked {
        Ok(_) => Ok(true),
        Err(e) if e.code().map(|c| c.code()) == Some("55P03") => Ok(false),
        Err(e) => Err(ClusterError::sql("taking the write fence")(e)),
    }
}

/// Whether a fences row says the tenant has moved away already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    Armed,
    Moved,
}

/// Arms the fence for `tenant` (idempotent): from now on its writers take the shared lock.
pub async fn arm(
    client: &Client,
    registry_schema: &str,
    tenant: &TenantId,
) -> Result<Armed, ClusterError> {
    let fences = format!("{}.fences", quote_ident(registry_schema));
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO {fences} (tenant, state) VALUES ($1, 'armed') ON CONFLICT (tenant) DO NOTHING"
            ),
            &[&tenant.as_str()],
        )
        .await
        .map_err(ClusterError::sql("arming the write fence"))?;
    if inserted == 1 {
        // `armed_at` must be a time by which every new transaction sees the row: the
        // INSERT's own clock reading precedes its commit, and a transaction that began in
        // between took no lock and would not count as older than the fence. Read again
        // after the commit returned.
        client
            .execute(
                &format!(
                    "UPDATE {fences} SET armed_at = clock_timestamp() WHERE tenant = $1 AND state = 'armed'"
                ),
                &[&tenant.as_str()],
            )
            .await
            .map_err(ClusterError::sql("arming the write fence"))?;
    }
    let state: String = client
        .query_one(
            &format!("SELECT state FROM {fences} WHERE tenant = $1"),
            &[&tenant.as_str()],
        )
        .await
        .map_err(ClusterError::sql("reading the write fence"))?
        .get(0);
    Ok(if state == "moved" {
        Armed::Moved
    } else {
        Armed::Armed
    })
}

/// Removes an armed (not moved) fence, e.g. when a move is cancelled.
pub async fn disarm(
    client: &Client,
    registry_schema: &str,
    tenant: &TenantId,
) -> Result<(), ClusterError> {
    client
        .execute(
            &format!(
                "DELETE FROM {}.fences WHERE tenant = $1 AND state = 'armed'",
                quote_ident(registry_schema)
            ),
            &[&tenant.as_str()],
        )
        .await
        .map_err(ClusterError::sql("removing the write fence"))?;
    Ok(())
}

/// Transactions of this database that could have written the tenant without seeing its
/// fence row, described for the attempt's reason: backends in a transaction older than the
/// row that either hold a snapshot (repeatable read: it may not see the fence) or wrote
/// something (it may have written the tenant before the fence, and commit after the
/// cutover), and every prepared transaction (it has no backend to tell when it began, and
/// its COMMIT PREPARED may come after the cutover).
pub async fn old_transactions(
    client: &Client,
    registry_schema: &str,
    tenant: &TenantId,
) -> Result<Vec<String>, ClusterError> {
    let rows = client
        .query(
            &format!(
                "SELECT 'pid ' || a.pid FROM pg_stat_activity a, {}.fences f \
                  WHERE f.tenant = $1 AND a.datname = current_database() \
                    AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend' \
                    AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL) \
                    AND a.xact_start < f.armed_at \
                 UNION ALL \
                 SELECT 'prepared ' || quote_literal(p.gid) FROM pg_prepared_xacts p \
                  WHERE p.database = current_database()",
                quote_ident(registry_schema)
            ),
            &[&tenant.as_str()],
        )
        .await
        .map_err(ClusterError::sql(
            "looking for transactions older than the fence",
        ))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_literals_so_hostile_names_cannot_close_them() {
        let sql = column_function("reg$$", "fence_1", "t$x$'; DROP TABLE a; --\"");
        assert!(sql.starts_with("CREATE OR REPLACE FUNCTION \"reg$$\".\"fence_1\"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER"));
        assert!(sql.contains("SET search_path = pg_catalog, pg_temp AS '"));
        // A quoted identifier (its `"` doubled) inside a literal (its `'` doubled).
        assert!(
            sql.contains("OLD.\"t$x$''; DROP TABLE a; --\"\"\"::text"),
            "{sql}"
        );
        assert!(sql.ends_with("END'"));
        let ddl = ddl("ops\"reg");
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS \"ops\"\"reg\".fences"));
        assert!(ddl.contains(MOVED_SQLSTATE));
    }

    #[test]
    fn gated_triggers_quote_every_name_and_fire_on_a_change_of_tenant() {
        let table = QualifiedName::new("app\"s", "or ders").unwrap();
        let sql = gated_triggers_sql(
            "reg",
            &table,
            "fence_7",
            "te\"nant",
            "ARRAY['1', '2''x']::integer[]",
            false,
        );
        assert!(sql.contains(
            "CREATE TRIGGER \"switchyard_fence_insert\" AFTER INSERT ON \"app\"\"s\".\"or ders\" \
             FOR EACH ROW WHEN (NEW.\"te\"\"nant\" = ANY (ARRAY['1', '2''x']::integer[])) \
             EXECUTE FUNCTION \"reg\".\"fence_7\"();"
        ), "{sql}");
        assert!(
            sql.contains(
                "WHEN (OLD.\"te\"\"nant\" = ANY (ARRAY['1', '2''x']::integer[]) \
             OR NEW.\"te\"\"nant\" IS DISTINCT FROM OLD.\"te\"\"nant\")"
            ),
            "{sql}"
        );
        assert!(sql.contains("AFTER DELETE ON \"app\"\"s\".\"or ders\" FOR EACH ROW WHEN (OLD."));
        assert_eq!(sql.matches("ENABLE ALWAYS TRIGGER").count(), 3);
        // Without an equality operator of its own, the column is compared as text.
        let text = gated_triggers_sql("reg", &table, "fence_7", "c", "ARRAY['1']::text[]", true);
        assert!(
            text.contains("WHEN (NEW.\"c\"::text = ANY (ARRAY['1']::text[]))"),
            "{text}"
        );
    }

    #[test]
    fn schema_tenants_pass_their_id_as_a_literal_argument() {
        let t = TenantId::new("acme'); DROP SCHEMA x; --").unwrap();
        let table = QualifiedName::new("acme", "orders").unwrap();
        let sql = trigger_sql("switchyard", &table, "fence_whole", &TenantOf::Whole(t));
        assert_eq!(
            sql,
            "CREATE TRIGGER \"switchyard_fence\" BEFORE INSERT OR UPDATE OR DELETE ON \"acme\".\"orders\" \
             FOR EACH ROW EXECUTE FUNCTION \"switchyard\".\"fence_whole\"('acme''); DROP SCHEMA x; --')"
        );
        let shared = trigger_sql(
            "switchyard",
            &table,
            "fence_42",
            &TenantOf::Column("tenant_id".into()),
        );
        assert!(shared.ends_with("\"switchyard\".\"fence_42\"()"));
    }
}
