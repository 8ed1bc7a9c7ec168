//! The registry: operator-facing tables in a control database (default: the source database,
//! schema `switchyard`). Operators INSERT move requests and read progress; applications read
//! routes.
//!
//! ```text
//!   switchyard.moves   one row per move request: tenant, target, target schema, cutover mode,
//!                      state, progress, lag, last error     (INSERT → NOTIFY switchyard_moves)
//!   switchyard.routes  tenant → location (source or a target, and schema); changed only by a
//!                      cutover, with a version that increments on every flip
//! ```
//!
//! Invariants:
//! - The DDL is idempotent and runs in one transaction; `install` runs it only when the
//!   installed version (the md5 of the DDL, in the moves table's comment) differs, so a
//!   daemon start takes no lock on the registry's tables.
//! - At most one unfinished move per tenant, enforced by a partial unique index, so two
//!   operators cannot start competing moves.
//! - State changes go through [`MoveState::can_become`]; the UPDATE also checks the current
//!   state in its WHERE clause, so a concurrent change is detected, not overwritten.
//! - Tenant ids and names are always bound parameters; the schema name is a fixed identifier.

pub mod fences;
pub mod status;

use std::fmt;
use std::str::FromStr;

use tokio_postgres::Client;

use crate::cluster::ClusterError;
use crate::lsn::Lsn;
use crate::sql::{check_name, quote_ident, quote_literal, NameError};
use crate::tenant::{TargetId, TenantId};

/// The notification channel raised when a move row is inserted or changed by an operator.
pub const CHANNEL: &str = "switchyard_moves";

/// The moves table's comment, before the md5 of the DDL that installed it.
const INSTALLED_STAMP: &str = "switchyard registry; DDL md5 ";

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("tenant {tenant} already has an unfinished move (id {id}, state {state})")]
    AlreadyMoving {
        tenant: TenantId,
        id: i64,
        state: MoveState,
    },
    #[error("move {id} is {actual}, not {expected}: someone else changed it")]
    Conflict {
        id: i64,
        expected: MoveState,
        actual: MoveState,
    },
    #[error("move {id}: {from} cannot become {to}")]
    Transition {
        id: i64,
        from: MoveState,
        to: MoveState,
    },
    #[error("move {0} does not exist")]
    UnknownMove(i64),
    #[error("tenant {0} has no unfinished move")]
    NoMove(TenantId),
    #[error("{0}")]
    NotYet(String),
    #[error("registry row {id} holds an invalid {field}: {detail}")]
    BadRow {
        id: i64,
        field: &'static str,
        detail: String,
    },
    #[error("invalid registry schema name: {0}")]
    Name(#[from] NameError),
}

/// The life of a move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    Requested,
    Provisioning,
    Copying,
    /// In sync: backfill done, the stream keeps the target current.
    Streaming,
    CuttingOver,
    CutOver,
    Cleaned,
    /// Stopped by a tenant-fatal error; `last_error` says why. May be resumed.
    Failed,
    /// Paused by an operator or by DDL on a moved table; may be resumed.
    Paused,
    Cancelled,
    RolledBack,
}

impl MoveState {
    pub const ALL: [MoveState; 11] = [
        MoveState::Requested,
        MoveState::Provisioning,
        MoveState::Copying,
        MoveState::Streaming,
        MoveState::CuttingOver,
        MoveState::CutOver,
        MoveState::Cleaned,
        MoveState::Failed,
        MoveState::Paused,
        MoveState::Cancelled,
        MoveState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MoveState::Requested => "requested",
            MoveState::Provisioning => "provisioning",
            MoveState::Copying => "copying",
            MoveState::Streaming => "streaming",
            MoveState::CuttingOver => "cutting_over",
            MoveState::CutOver => "cut_over",
            MoveState::Cleaned => "cleaned",
            MoveState::Failed => "failed",
            MoveState::Paused => "paused",
            MoveState::Cancelled => "cancelled",
            MoveState::RolledBack => "rolled_back",
        }
    }

    /// Finished moves no longer hold the tenant: a new move may be requested.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MoveState::Cleaned | MoveState::Cancelled | MoveState::RolledBack
        )
    }

    /// Whether the pipeline needs changes of this tenant (and so holds the slot for it).
    pub fn consumes_stream(self) -> bool {
        matches!(
            self,
            MoveState::Provisioning
                | MoveState::Copying
                | MoveState::Streaming
                | MoveState::CuttingOver
        )
    }

    /// The allowed transitions. Everything else is a bug or a race, and is refused.
    pub fn can_become(self, to: MoveState) -> bool {
        use MoveState::*;
        match (self, to) {
            (Requested, Provisioning) => true,
            (Provisioning, Copying) => true,
            (Copying, Streaming) => true,
            (Streaming, CuttingOver) => true,
            // An aborted cutover attempt returns to streaming and retries later.
            (CuttingOver, Streaming | CutOver) => true,
            (CutOver, Cleaned | RolledBack) => true,
            // Failure or pause can strike any active state; resume restarts provisioning,
            // which is idempotent and continues from the recorded cursors.
            (Provisioning | Copying | Streaming | CuttingOver, Failed | Paused) => true,
            (Failed | Paused, Provisioning) => true,
            // Cancel only before the cutover: afterwards the tenant lives at the target.
            (Requested | Provisioning | Copying | Streaming | Failed | Paused, Cancelled) => true,
            _ => false,
        }
    }
}

impl fmt::Display for MoveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MoveState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MoveState::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown move state {s:?}"))
    }
}

/// Manual: an operator runs `switchyard cutover`. Auto: cut over as soon as in sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CutoverMode {
    Manual,
    Auto,
}

impl CutoverMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CutoverMode::Manual => "manual",
            CutoverMode::Auto => "auto",
        }
    }
}

/// A move request as stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Move {
    pub id: i64,
    pub tenant: TenantId,
    pub target: TargetId,
    pub target_schema: String,
    pub cutover_mode: CutoverMode,
    pub state: MoveState,
    pub rows_copied: i64,
    pub rows_total: Option<i64>,
    pub lag_bytes: Option<i64>,
    pub last_error: Option<String>,
    /// An operator asked for the cutover (`switchyard cutover`).
    pub cutover_requested: bool,
    /// Cutover attempts so far, aborted ones included.
    pub cutover_attempts: i32,
    /// The last verification of this move found source and target equal.
    pub verified: bool,
    /// After the cutover: the target's slot that keeps the old location current, and the
    /// target position from which its changes are the applications' (not the move's).
    pub reverse_slot: Option<String>,
    pub reverse_from: Option<Lsn>,
    /// An operator asked to roll the cutover back (`switchyard rollback`).
    pub rollback_requested: bool,
    /// The retention window after the cutover is over (`cleanup_after` passed).
    pub cleanup_due: bool,
    /// The source tables the move copies (quoted `schema.table`), recorded when it was set
    /// up: what the cutover fences and what cancel and cleanup may touch. A table that
    /// appears later is not part of it.
    pub tables: Option<Vec<String>>,
}

#[cfg(test)]
impl Move {
    /// A move of `tenant` to target `shard2`, schema named after the tenant, in `state`,
    /// with nothing else set (for unit tests).
    pub(crate) fn sample(id: i64, tenant: &str, state: MoveState) -> Move {
        Move {
            id,
            tenant: TenantId::new(tenant).expect("a valid tenant id"),
            target: TargetId::new("shard2").expect("a valid target id"),
            target_schema: tenant.into(),
            cutover_mode: CutoverMode::Manual,
            state,
            rows_copied: 0,
            rows_total: None,
            lag_bytes: None,
            last_error: None,
            cutover_requested: false,
            cutover_attempts: 0,
            verified: false,
            reverse_slot: None,
            reverse_from: None,
            rollback_requested: false,
            cleanup_due: false,
            tables: None,
        }
    }
}

/// One recorded cutover attempt.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Attempt {
    pub attempt: i32,
    /// `cut_over`, `aborted` or `different`.
    pub result: String,
    pub step: Option<String>,
    pub pause_ms: Option<f64>,
    pub detail: Option<String>,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attempt {}: {}", self.attempt, self.result)?;
        if let Some(s) = &self.step {
            write!(f, " at {s}")?;
        }
        if let Some(p) = self.pause_ms {
            write!(f, ", pause {p:.1} ms")?;
        }
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

/// Progress of one move as the daemon reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub rows_copied: i64,
    pub rows_total: Option<i64>,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    /// A transient error being retried (e.g. the target is out of disk); `None` clears an
    /// earlier one once it passed. Other errors in `last_error` are left alone.
    pub retrying: Option<String>,
}

/// Marks a `last_error` that only says what is being retried, so that it can be cleared.
pub const RETRYING: &str = "retrying: ";

/// The registry in one control database.
pub struct Registry {
    schema: String,
}

impl Registry {
    pub fn new(schema: impl Into<String>) -> Result<Self, RegistryError> {
        let schema = schema.into();
        check_name(&schema)?;
        Ok(Registry { schema })
    }

    /// A registry table's quoted, qualified name.
    pub fn table(&self, table: &str) -> String {
        self.t(table)
    }

    fn t(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    /// The DDL, as one idempotent script.
    pub fn ddl(&self) -> String {
        let schema = quote_ident(&self.schema);
        let moves = self.t("moves");
        let routes = self.t("routes");
        let states = MoveState::ALL
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let finished = MoveState::ALL
            .iter()
            .filter(|s| s.is_finished())
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let notify_fn = self.t("notify_moves");
        let attempts = self.t("cutover_attempts");
        let fences = fences::ddl(&self.schema);
        format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {moves} (
  id bigserial PRIMARY KEY,
  tenant text NOT NULL CHECK (tenant <> ''),
  target text NOT NULL,
  target_schema text NOT NULL CHECK (target_schema <> '' AND length(target_schema) < 64),
  cutover_mode text NOT NULL DEFAULT 'manual' CHECK (cutover_mode IN ('manual', 'auto')),
  state text NOT NULL DEFAULT 'requested' CHECK (state IN ({states})),
  rows_copied bigint NOT NULL DEFAULT 0,
  rows_total bigint,
  lag_bytes bigint,
  lag_seconds double precision,
  last_error text,
  requested_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz);
CREATE UNIQUE INDEX IF NOT EXISTS moves_one_unfinished_per_tenant
  ON {moves} (tenant) WHERE state NOT IN ({finished});
CREATE TABLE IF NOT EXISTS {routes} (
  tenant text PRIMARY KEY,
  location text NOT NULL,
  schema_name text NOT NULL,
  version bigint NOT NULL DEFAULT 1,
  updated_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE {moves}
  ADD COLUMN IF NOT EXISTS cutover_requested boolean NOT NULL DEFAULT false,
  ADD COLUMN IF NOT EXISTS cutover_attempts integer NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS pause_ms double precision,
  ADD COLUMN IF NOT EXISTS verify_ok boolean,
  ADD COLUMN IF NOT EXISTS verify_result text,
  ADD COLUMN IF NOT EXISTS verified_at timestamptz,
  ADD COLUMN IF NOT EXISTS cut_over_at timestamptz,
  ADD COLUMN IF NOT EXISTS cleanup_after timestamptz,
  ADD COLUMN IF NOT EXISTS reverse_slot text,
  ADD COLUMN IF NOT EXISTS reverse_from text,
  ADD COLUMN IF NOT EXISTS rollback_requested boolean NOT NULL DEFAULT false,
  ADD COLUMN IF NOT EXISTS tables text[];
CREATE TABLE IF NOT EXISTS {attempts} (
  move_id bigint NOT NULL,
  attempt integer NOT NULL,
  result text NOT NULL,
  step text,
  pause_ms double precision,
  detail text,
  at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (move_id, attempt));
{fences}
CREATE OR REPLACE FUNCTION {notify_fn}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', NEW.id::text);
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS moves_notify ON {moves};
CREATE TRIGGER moves_notify AFTER INSERT OR UPDATE OF state, cutover_requested, rollback_requested ON {moves}
  FOR EACH ROW EXECUTE FUNCTION {notify_fn}();"
        )
    }

    /// The stamp this version's DDL leaves in the moves table's comment (its md5 after
    /// [`INSTALLED_STAMP`]), and whether the comment holds it (see [`Self::install`]).
    async fn installed(
        &self,
        client: &impl tokio_postgres::GenericClient,
        ddl: &str,
    ) -> Result<(String, bool), RegistryError> {
        let row = client
            .query_one(
                "SELECT s, coalesce(obj_description(to_regclass($1), 'pg_class') = s, false)
                   FROM (SELECT $2 || md5($3) AS s) AS stamp",
                &[&self.t("moves"), &INSTALLED_STAMP, &ddl],
            )
            .await
            .map_err(ClusterError::sql("reading the registry version"))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Creates or updates the registry objects, in one transaction, unless this version's
    /// are there already. Running the DDL takes ACCESS EXCLUSIVE locks on the moves table
    /// (ALTER TABLE, the trigger's re-creation): at every daemon start it would queue behind
    /// any open transaction that read the registry and block every reader meanwhile. So
    /// once installed, the moves table's comment records the DDL's md5 and a start with the
    /// same DDL reads only the catalog.
    pub async fn install(&self, client: &mut Client) -> Result<(), RegistryError> {
        let ddl = self.ddl();
        if self.installed(&*client, &ddl).await?.1 {
            return Ok(());
        }
        let tx = client
            .transaction()
            .await
            .map_err(ClusterError::sql("starting the registry install"))?;
        // Serialize concurrent installers (two daemons starting at once).
        tx.batch_execute("SELECT pg_advisory_xact_lock(hashtext('switchyard registry'))")
            .await
            .map_err(ClusterError::sql("locking the registry install"))?;
        let (stamp, installed) = self.installed(&tx, &ddl).await?;
        if installed {
            // Another installer finished while this one waited for the lock.
            return Ok(());
        }
        tx.batch_execute(&ddl)
            .await
            .map_err(ClusterError::sql("installing the registry"))?;
        tx.batch_execute(&format!(
            "COMMENT ON TABLE {} IS {}",
            self.t("moves"),
            quote_literal(&stamp)
        ))
        .await
        .map_err(ClusterError::sql("stamping the registry version"))?;
        tx.commit()
            .await
            .map_err(ClusterError::sql("committing the registry install"))?;
        Ok(())
    }

    /// Records a move request (what `switchyard move` does; operators may INSERT directly).
    pub async fn request_move(
        &self,
        client: &Client,
        tenant: &TenantId,
        target: &TargetId,
        target_schema: &str,
        mode: CutoverMode,
    ) -> Result<i64, RegistryError> {
        check_name(target_schema)?;
        let sql = format!(
            "INSERT INTO {} (tenant, target, target_schema, cutover_mode) VALUES ($1, $2, $3, $4) RETURNING id",
            self.t("moves")
        );
        match client
            .query_one(
                &sql,
                &[
                    &tenant.as_str(),
                    &target.as_str(),
                    &target_schema,
                    &mode.as_str(),
                ],
            )
            .await
        {
            Ok(row) => Ok(row.get(0)),
            Err(e) if e.code().map(|c| c.code()) == Some("23505") => {
                let existing = self
                    .active_for(client, tenant)
                    .await?
                    .ok_or_else(|| ClusterError::sql("requesting a move")(e))?;
                Err(RegistryError::AlreadyMoving {
                    tenant: tenant.clone(),
                    id: existing.id,
                    state: existing.state,
                })
            }
            Err(e) => Err(ClusterError::sql("requesting a move")(e).into()),
        }
    }

    fn select(&self) -> String {
        format!(
            "SELECT id, tenant, target, target_schema, cutover_mode, state, rows_copied, rows_total, \
                    lag_bytes, last_error, cutover_requested, cutover_attempts, \
                    coalesce(verify_ok, false), reverse_slot, reverse_from, rollback_requested, \
                    coalesce(cleanup_after <= now(), false), tables FROM {}",
            self.t("moves")
        )
    }

    fn parse(row: &tokio_postgres::Row) -> Result<Move, RegistryError> {
        let id: i64 = row.get(0);
        let bad = |field: &'static str, detail: String| RegistryError::BadRow { id, field, detail };
        let mode: String = row.get(4);
        let state: String = row.get(5);
        Ok(Move {
            id,
            tenant: TenantId::new(row.get::<_, String>(1))
                .map_err(|e| bad("tenant", e.to_string()))?,
            target: TargetId::new(row.get::<_, String>(2))
                .map_err(|e| bad("target", e.to_string()))?,
            target_schema: row.get(3),
            cutover_mode: match mode.as_str() {
                "auto" => CutoverMode::Auto,
                "manual" => CutoverMode::Manual,
                other => return Err(bad("cutover_mode", other.to_owned())),
            },
            state: state.parse().map_err(|e: String| bad("state", e))?,
            rows_copied: row.get(6),
            rows_total: row.get(7),
            lag_bytes: row.get(8),
            last_error: row.get(9),
            cutover_requested: row.get(10),
            cutover_attempts: row.get(11),
            verified: row.get(12),
            reverse_slot: row.get(13),
            reverse_from: row
                .get::<_, Option<String>>(14)
                .map(|t| {
                    t.parse::<Lsn>()
                        .map_err(|e| bad("reverse_from", e.to_string()))
                })
                .transpose()?,
            rollback_requested: row.get(15),
            cleanup_due: row.get(16),
            tables: row.get(17),
        })
    }

    pub async fn get(&self, client: &Client, id: i64) -> Result<Move, RegistryError> {
        let row = client
            .query_opt(&format!("{} WHERE id = $1", self.select()), &[&id])
            .await
            .map_err(ClusterError::sql("reading a move"))?
            .ok_or(RegistryError::UnknownMove(id))?;
        Self::parse(&row)
    }

    pub async fn active_for(
        &self,
        client: &Client,
        tenant: &TenantId,
    ) -> Result<Option<Move>, RegistryError> {
        let finished: Vec<&str> = MoveState::ALL
            .iter()
            .filter(|s| s.is_finished())
            .map(|s| s.as_str())
            .collect();
        let row = client
            .query_opt(
                &format!("{} WHERE tenant = $1 AND state <> ALL($2)", self.select()),
                &[&tenant.as_str(), &finished],
            )
            .await
            .map_err(ClusterError::sql("reading a tenant's move"))?;
        row.map(|r| Self::parse(&r)).transpose()
    }

    /// The tenant's unfinished move, or [`RegistryError::NoMove`].
    pub async fn active(&self, client: &Client, tenant: &TenantId) -> Result<Move, RegistryError> {
        self.active_for(client, tenant)
            .await?
            .ok_or_else(|| RegistryError::NoMove(tenant.clone()))
    }

    /// Every move, newest first.
    /// Rows that do not parse are left out (and logged): one bad row must not hide the
    /// others; [`Registry::list_checked`] returns them.
    pub async fn list(&self, client: &Client) -> Result<Vec<Move>, RegistryError> {
        let (moves, bad) = self.list_checked(client).await?;
        for e in bad {
            tracing::warn!(error = %e, "a registry row is left out");
        }
        Ok(moves)
    }

    /// Every move that parses, newest first, and an error for each row that does not.
    pub async fn list_checked(
        &self,
        client: &Client,
    ) -> Result<(Vec<Move>, Vec<RegistryError>), RegistryError> {
        let rows = client
            .query(&format!("{} ORDER BY id DESC", self.select()), &[])
            .await
            .map_err(ClusterError::sql("listing moves"))?;
        let mut moves = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        for row in &rows {
            match Self::parse(row) {
                Ok(m) => moves.push(m),
                Err(e) => bad.push(e),
            }
        }
        Ok((moves, bad))
    }

    /// Records the source tables move `id` copies (see [`Move::tables`]).
    pub async fn record_tables(
        &self,
        client: &Client,
        id: i64,
        tables: &[String],
    ) -> Result<(), RegistryError> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET tables = $2, updated_at = now() WHERE id = $1",
                    self.t("moves")
                ),
                &[&id, &tables],
            )
            .await
            .map_err(ClusterError::sql("recording the move's tables"))?;
        Ok(())
    }

    /// Stores the tenant id of move `id` in its canonical form (see
    /// `layout::canonical_tenant`), before the move has started.
    pub async fn rename_tenant(
        &self,
        client: &Client,
        id: i64,
        tenant: &TenantId,
    ) -> Result<(), RegistryError> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET tenant = $2, updated_at = now() WHERE id = $1 AND state IN ('requested', 'provisioning')",
                    self.t("moves")
                ),
                &[&id, &tenant.as_str()],
            )
            .await
            .map_err(ClusterError::sql("storing the tenant id's canonical form"))?;
        Ok(())
    }

    /// Marks a row that does not parse `failed` with the reason (unless it is failed or
    /// finished already), so operators see it and every other move goes on.
    pub async fn fail_bad_row(
        &self,
        client: &Client,
        bad: &RegistryError,
    ) -> Result<bool, RegistryError> {
        let RegistryError::BadRow { id, .. } = bad else {
            return Ok(false);
        };
        let finished: Vec<&str> = MoveState::ALL
            .iter()
            .filter(|s| s.is_finished() || **s == MoveState::Failed)
            .map(|s| s.as_str())
            .collect();
        let n = client
            .execute(
                &format!(
                    "UPDATE {} SET state = 'failed', last_error = $2, updated_at = now() \
                      WHERE id = $1 AND state <> ALL($3)",
                    self.t("moves")
                ),
                &[
                    id,
                    &format!("{bad}; fix the row, then set its state to 'provisioning'"),
                    &finished,
                ],
            )
            .await
            .map_err(ClusterError::sql("recording a bad registry row"))?;
        Ok(n == 1)
    }

    /// Moves `id` from `from` to `to`, recording `error` (cleared when `None`).
    pub async fn transition(
        &self,
        client: &Client,
        id: i64,
        from: MoveState,
        to: MoveState,
        error: Option<&str>,
    ) -> Result<(), RegistryError> {
        if !from.can_become(to) {
            return Err(RegistryError::Transition { id, from, to });
        }
        let sql = format!(
            "UPDATE {} SET state = $3, last_error = $4, updated_at = now(), \
                    finished_at = CASE WHEN $5 THEN now() ELSE finished_at END \
              WHERE id = $1 AND state = $2",
            self.t("moves")
        );
        let n = client
            .execute(
                &sql,
                &[&id, &from.as_str(), &to.as_str(), &error, &to.is_finished()],
            )
            .await
            .map_err(ClusterError::sql("changing a move's state"))?;
        if n == 1 {
            return Ok(());
        }
        let actual = self.get(client, id).await?.state;
        Err(RegistryError::Conflict {
            id,
            expected: from,
            actual,
        })
    }

    /// Progress figures for a move (written by the daemon about once a second).
    pub async fn report(
        &self,
        client: &Client,
        id: i64,
        report: &Report,
    ) -> Result<(), RegistryError> {
        let sql = format!(
            "UPDATE {} SET rows_copied = $2, rows_total = $3, lag_bytes = $4, lag_seconds = $5, \
                    last_error = CASE WHEN state IN ('failed', 'paused') THEN last_error \
                                      WHEN $6::text IS NOT NULL THEN $6::text \
                                      WHEN starts_with(last_error, $7::text) THEN NULL \
                                      ELSE last_error END, \
                    updated_at = now() WHERE id = $1",
            self.t("moves")
        );
        let retrying = report.retrying.as_ref().map(|e| format!("{RETRYING}{e}"));
        client
            .execute(
                &sql,
                &[
                    &id,
                    &report.rows_copied,
                    &report.rows_total,
                    &report.lag_bytes,
                    &report.lag_seconds,
                    &retrying,
                    &RETRYING,
                ],
            )
            .await
            .map_err(ClusterError::sql("reporting a move's progress"))?;
        Ok(())
    }

    /// Records an error on a move without changing its state (e.g. a retried failure).
    pub async fn note_error(
        &self,
        client: &Client,
        id: i64,
        error: &str,
    ) -> Result<(), RegistryError> {
        let sql = format!(
            "UPDATE {} SET last_error = $2, updated_at = now() WHERE id = $1",
            self.t("moves")
        );
        client
            .execute(&sql, &[&id, &error])
            .await
            .map_err(ClusterError::sql("recording a move's error"))?;
        Ok(())
    }

    /// Asks for the cutover of the tenant's move (in sync or still copying: the daemon cuts
    /// over once it is in sync). Returns the move.
    pub async fn request_cutover(
        &self,
        client: &Client,
        tenant: &TenantId,
    ) -> Result<Move, RegistryError> {
        let mv = self.active(client, tenant).await?;
        if !matches!(
            mv.state,
            MoveState::Provisioning
                | MoveState::Copying
                | MoveState::Streaming
                | MoveState::CuttingOver
        ) {
            return Err(RegistryError::Transition {
                id: mv.id,
                from: mv.state,
                to: MoveState::CuttingOver,
            });
        }
        self.raise(client, mv.id, "cutover_requested").await
    }

    /// Sets one of the operator's request flags of move `id` (NOTIFY wakes the daemon) and
    /// returns the move.
    async fn raise(&self, client: &Client, id: i64, flag: &str) -> Result<Move, RegistryError> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET {} = true, updated_at = now() WHERE id = $1",
                    self.t("moves"),
                    quote_ident(flag)
                ),
                &[&id],
            )
            .await
            .map_err(ClusterError::sql(format!("setting {flag}")))?;
        self.get(client, id).await
    }

    /// Asks for the rollback of the tenant's cut-over move. Returns the move.
    pub async fn request_rollback(
        &self,
        client: &Client,
        tenant: &TenantId,
    ) -> Result<Move, RegistryError> {
        let mv = self.active(client, tenant).await?;
        if mv.state != MoveState::CutOver {
            return Err(RegistryError::NotYet(format!(
                "move {} is {}; only a cut_over move can be rolled back",
                mv.id, mv.state
            )));
        }
        if mv.reverse_slot.is_none() {
            return Err(RegistryError::NotYet(format!(
                "move {} was cut over without reverse replication (cutover.rollback = false): a rollback would lose the writes made since",
                mv.id
            )));
        }
        self.raise(client, mv.id, "rollback_requested").await
    }

    /// Records a verification result.
    pub async fn record_verification(
        &self,
        client: &impl tokio_postgres::GenericClient,
        id: i64,
        ok: bool,
        summary: &str,
    ) -> Result<(), RegistryError> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET verify_ok = $2, verify_result = $3, verified_at = now(), \
                            updated_at = now() WHERE id = $1",
                    self.t("moves")
                ),
                &[&id, &ok, &summary],
            )
            .await
            .map_err(ClusterError::sql("recording a verification"))?;
        Ok(())
    }

    /// Records one cutover attempt (and the count on the move).
    #[allow(clippy::too_many_arguments)]
    pub async fn record_attempt(
        &self,
        client: &Client,
        id: i64,
        attempt: i32,
        result: &str,
        step: Option<&str>,
        pause_ms: Option<f64>,
        detail: Option<&str>,
    ) -> Result<(), RegistryError> {
        client
            .execute(
                &format!(
                    "WITH a AS (INSERT INTO {} (move_id, attempt, result, step, pause_ms, detail) \
                                VALUES ($1, $2, $3, $4, $5, $6) \
                                ON CONFLICT (move_id, attempt) DO NOTHING) \
                     UPDATE {} SET cutover_attempts = greatest(cutover_attempts, $2), \
                            pause_ms = CASE WHEN $3 = 'cut_over' AND $5::float8 IS NOT NULL \
                                            THEN $5 ELSE pause_ms END \
                      WHERE id = $1",
                    self.t("cutover_attempts"),
                    self.t("moves")
                ),
                &[&id, &attempt, &result, &step, &pause_ms, &detail],
            )
            .await
            .map_err(ClusterError::sql("recording a cutover attempt"))?;
        Ok(())
    }

    /// The attempts of a move, oldest first: (attempt, result, step, pause in ms, detail).
    pub async fn attempts(&self, client: &Client, id: i64) -> Result<Vec<Attempt>, RegistryError> {
        let rows = client
            .query(
                &format!(
                    "SELECT attempt, result, step, pause_ms, detail FROM {} WHERE move_id = $1 ORDER BY attempt",
                    self.t("cutover_attempts")
                ),
                &[&id],
            )
            .await
            .map_err(ClusterError::sql("reading cutover attempts"))?;
        Ok(rows
            .iter()
            .map(|r| Attempt {
                attempt: r.get(0),
                result: r.get(1),
                step: r.get(2),
                pause_ms: r.get(3),
                detail: r.get(4),
            })
            .collect())
    }

    /// Where the tenant lives now, as applications should read it.
    pub async fn route(
        &self,
        client: &Client,
        tenant: &TenantId,
    ) -> Result<Option<(String, String, i64)>, RegistryError> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT location, schema_name, version FROM {} WHERE tenant = $1",
                    self.t("routes")
                ),
                &[&tenant.as_str()],
            )
            .await
            .map_err(ClusterError::sql("reading a route"))?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }
}

/// The schema of the reverse apply's progress table on the source: the registry's name
/// with `_rollback`; never a tenant's.
pub fn reverse_progress_schema(registry_schema: &str) -> String {
    format!("{registry_schema}_rollback")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_as_text() {
        for s in MoveState::ALL {
            assert_eq!(s.as_str().parse::<MoveState>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("moving".parse::<MoveState>().is_err());
    }

    #[test]
    fn the_happy_path_is_allowed_in_order_only() {
        use MoveState::*;
        let path = [
            Requested,
            Provisioning,
            Copying,
            Streaming,
            CuttingOver,
            CutOver,
            Cleaned,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{} -> {}", w[0], w[1]);
            // The one way back: an aborted cutover returns to streaming.
            let abort = (w[1], w[0]) == (CuttingOver, Streaming);
            assert_eq!(w[1].can_become(w[0]), abort, "{} -> {}", w[1], w[0]);
        }
        assert!(!Requested.can_become(Streaming), "no skipping the copy");
        assert!(!Copying.can_become(CutOver), "no cutover before sync");
    }

    #[test]
    fn cancel_only_before_cutover_and_finished_is_final() {
        use MoveState::*;
        for s in MoveState::ALL {
            let allowed = s.can_become(Cancelled);
            let before_cutover = matches!(
                s,
                Requested | Provisioning | Copying | Streaming | Failed | Paused
            );
            assert_eq!(allowed, before_cutover, "{s} -> cancelled");
            if s.is_finished() {
                for to in MoveState::ALL {
                    assert!(!s.can_become(to), "{s} is final but may become {to}");
                }
            }
        }
        assert!(
            CuttingOver.can_become(Streaming),
            "an aborted cutover retries"
        );
        assert!(Failed.can_become(Provisioning), "a failed move can resume");
    }

    #[test]
    fn ddl_quotes_the_schema_and_lists_every_state() {
        let r = Registry::new("ops\"registry").unwrap();
        let ddl = r.ddl();
        assert!(ddl.contains("CREATE SCHEMA IF NOT EXISTS \"ops\"\"registry\""));
        for s in MoveState::ALL {
            assert!(ddl.contains(&format!("'{}'", s.as_str())));
        }
        assert!(Registry::new("").is_err());
    }
}
