//! Configuration: a TOML file (see `config/switchyard.toml`), then environment overrides
//! (`SWITCHYARD_SOURCE_*` for the source, `SWITCHYARD_TARGET_<NAME>_*` for a target).
//!
//! Invariants:
//! - Unknown keys are errors: a typo must not silently fall back to a default.
//! - Passwords come only from an environment variable or a file, never from the TOML
//!   itself, and are held as [`Secret`] from the moment they are read.
//! - Every name that will reach SQL is validated here (see [`crate::sql`]), so a bad name is
//!   a config error at start-up, not a SQL error mid-move.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cluster::{Endpoint, Secret, SslMode};
use crate::sql::{check_name, NameError, QualifiedName};
use crate::tenant::TargetId;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("config {field}: {source}")]
    Name {
        field: String,
        #[source]
        source: NameError,
    },
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    source: FileEndpoint,
    #[serde(default)]
    replication: FileReplication,
    #[serde(default)]
    state: FileState,
    #[serde(default)]
    targets: BTreeMap<String, FileTarget>,
    #[serde(default)]
    tenancy: FileTenancy,
    #[serde(default)]
    registry: FileRegistry,
    #[serde(default, rename = "move")]
    moves: FileMoves,
    #[serde(default)]
    cutover: FileCutover,
    #[serde(default)]
    metrics: FileMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: Option<String>,
    tenant_label: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCutover {
    pause_budget_ms: Option<u64>,
    max_lag_mb: Option<u64>,
    max_apply_delay_ms: Option<u64>,
    retry_initial_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    verify: Option<bool>,
    retention_hours: Option<u64>,
    old_transaction_wait_ms: Option<u64>,
    rollback: Option<bool>,
    auto_cleanup: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMoves {
    chunk_rows: Option<usize>,
    backfill_workers: Option<usize>,
    backfill_rows_per_sec: Option<u64>,
    batch_max_txns: Option<usize>,
    batch_max_bytes: Option<usize>,
    apply_lanes: Option<usize>,
    max_inflight_txns: Option<usize>,
    setup_concurrency: Option<usize>,
    wal_budget_mb: Option<u64>,
    max_txn_mb: Option<u64>,
    registry_poll_ms: Option<u64>,
    stop_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegistry {
    schema: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTarget {
    /// The target is the source cluster itself (moves into another schema of it).
    #[serde(default)]
    same_as_source: bool,
    #[serde(flatten)]
    endpoint: FileEndpoint,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTenancy {
    mode: Option<TenancyMode>,
    tenant_column: Option<String>,
    #[serde(default)]
    columns: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    dbname: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    sslmode: Option<SslMode>,
    sslrootcert: Option<PathBuf>,
    application_name: Option<String>,
    connect_timeout_ms: Option<u64>,
    allow_cleartext_password: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReplication {
    slot: Option<String>,
    publication: Option<String>,
    #[serde(default)]
    tables: Vec<String>,
    proto_version: Option<u32>,
    streaming: Option<bool>,
    row_filter: Option<bool>,
    status_interval_ms: Option<u64>,
    max_message_bytes: Option<usize>,
    max_buffered_bytes: Option<usize>,
    reconnect_initial_backoff_ms: Option<u64>,
    reconnect_max_backoff_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileState {
    dir: Option<PathBuf>,
}

/// Replication settings for the one slot switchyard consumes.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    pub slot: String,
    pub publication: String,
    /// Tables the publication must contain; empty means "use the publication as it is".
    pub tables: Vec<QualifiedName>,
    /// `None`: the highest version the server supports.
    pub proto_version: Option<u32>,
    pub streaming: bool,
    /// Keep the publication's row filters to the moving tenants (`source::filter`).
    pub row_filter: bool,
    pub status_interval: Duration,
    pub max_message_bytes: usize,
    pub max_buffered_bytes: usize,
    pub reconnect_initial_backoff: Duration,
    pub reconnect_max_backoff: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            slot: "switchyard".into(),
            publication: "switchyard".into(),
            tables: Vec::new(),
            proto_version: None,
            streaming: true,
            row_filter: true,
            status_interval: Duration::from_secs(1),
            max_message_bytes: 256 << 20,
            max_buffered_bytes: 64 << 20,
            reconnect_initial_backoff: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_secs(10),
        }
    }
}

/// How tenants are laid out in the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TenancyMode {
    /// Shared tables with a tenant column.
    #[default]
    Shared,
    /// One schema per tenant: the schema name is the tenant id.
    Schema,
}

/// Where the tenant key lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenancy {
    pub mode: TenancyMode,
    /// The tenant column of shared tables, unless overridden per table.
    pub tenant_column: String,
    /// Per-table tenant columns (e.g. `public.tenants` keyed by `id`).
    pub columns: BTreeMap<QualifiedName, String>,
}

impl Default for Tenancy {
    fn default() -> Self {
        Tenancy {
            mode: TenancyMode::Shared,
            tenant_column: "tenant_id".into(),
            columns: BTreeMap::new(),
        }
    }
}

impl Tenancy {
    /// The tenant column of a shared table.
    pub fn column_of(&self, table: &QualifiedName) -> &str {
        self.column_in(&table.schema, &table.name)
    }

    /// [`Self::column_of`] without building a name (the router asks once per change).
    pub fn column_in(&self, schema: &str, name: &str) -> &str {
        self.columns
            .iter()
            .find(|(t, _)| t.schema == schema && t.name == name)
            .map_or(&self.tenant_column, |(_, c)| c.as_str())
    }
}

/// Limits of the move engine, chosen to protect the source (seed 000: cap workers, keep
/// transactions short) and to bound memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveSettings {
    /// Rows per backfill chunk (one short SELECT each).
    pub chunk_rows: usize,
    /// Backfill chunks in flight at once, over all tenants (one source connection each).
    pub backfill_workers: usize,
    /// Rows a second the backfill reads from the source at most, over all tenants; 0 for
    /// no limit.
    pub backfill_rows_per_sec: u64,
    /// Source transactions batched into one target transaction, at most.
    pub batch_max_txns: usize,
    /// Bytes of values batched into one target transaction, about.
    pub batch_max_bytes: usize,
    /// Connections per target applying row changes in parallel, spread by key (one where
    /// the target role may not use the replica role). See `apply::lanes`.
    pub apply_lanes: usize,
    /// Source transactions handed to appliers and not yet durable; reading the slot pauses
    /// above this.
    pub max_inflight_txns: usize,
    /// Moves being set up at once (provisioned, or resumed after a restart), each on two
    /// connections of its own (source and target): fifty moves requested together then open
    /// no burst of a hundred connections.
    pub setup_concurrency: usize,
    /// A tenant whose applied position trails the stream by more WAL than this is failed
    /// and stops holding the slot back.
    pub wal_budget_bytes: u64,
    /// A source transaction is held whole until its commit: one that brings a moving
    /// tenant more change data than this fails that tenant (instead of exhausting the
    /// daemon's memory, and every other tenant's move with it).
    pub max_txn_bytes: u64,
    /// How often the registry is read (NOTIFY wakes the daemon earlier).
    pub registry_poll: Duration,
    /// How long a stop request (SIGTERM, Ctrl-C) may take: past it the daemon exits anyway,
    /// as a crash would (every move resumes exactly from what is durable).
    pub stop_timeout: Duration,
}

impl Default for MoveSettings {
    fn default() -> Self {
        MoveSettings {
            chunk_rows: 5_000,
            backfill_workers: 4,
            backfill_rows_per_sec: 0,
            batch_max_txns: 5_000,
            batch_max_bytes: 32 << 20,
            apply_lanes: 4,
            max_inflight_txns: 20_000,
            setup_concurrency: 8,
            wal_budget_bytes: 16 << 30,
            max_txn_bytes: 1 << 30,
            registry_poll: Duration::from_millis(500),
            stop_timeout: Duration::from_secs(45),
        }
    }
}

fn moves(f: FileMoves) -> Result<MoveSettings, ConfigError> {
    let d = MoveSettings::default();
    let positive = |field: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(ConfigError::Invalid {
            field: format!("move.{field}"),
            reason: "must be at least 1".into(),
        }),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    // Sizes are given in MB and kept in bytes.
    let megabytes = |field: &str, v: Option<u64>, default: u64| {
        positive(field, v.map(|mb| mb as usize), 1)
            .map(|mb| v.map_or(default, |_| (mb as u64).saturating_mul(1 << 20)))
    };
    let m = MoveSettings {
        chunk_rows: positive("chunk_rows", f.chunk_rows, d.chunk_rows)?,
        backfill_workers: positive("backfill_workers", f.backfill_workers, d.backfill_workers)?,
        backfill_rows_per_sec: f.backfill_rows_per_sec.unwrap_or(d.backfill_rows_per_sec),
        batch_max_txns: positive("batch_max_txns", f.batch_max_txns, d.batch_max_txns)?,
        batch_max_bytes: positive("batch_max_bytes", f.batch_max_bytes, d.batch_max_bytes)?,
        apply_lanes: positive("apply_lanes", f.apply_lanes, d.apply_lanes)?,
        max_inflight_txns: positive(
            "max_inflight_txns",
            f.max_inflight_txns,
            d.max_inflight_txns,
        )?,
        setup_concurrency: positive(
            "setup_concurrency",
            f.setup_concurrency,
            d.setup_concurrency,
        )?,
        wal_budget_bytes: megabytes("wal_budget_mb", f.wal_budget_mb, d.wal_budget_bytes)?,
        max_txn_bytes: megabytes("max_txn_mb", f.max_txn_mb, d.max_txn_bytes)?,
        registry_poll: Duration::from_millis(positive(
            "registry_poll_ms",
            f.registry_poll_ms.map(|v| v as usize),
            d.registry_poll.as_millis() as usize,
        )? as u64),
        stop_timeout: Duration::from_millis(positive(
            "stop_timeout_ms",
            f.stop_timeout_ms.map(|v| v as usize),
            d.stop_timeout.as_millis() as usize,
        )? as u64),
    };
    if m.chunk_rows > 1_000_000 {
        return Err(ConfigError::Invalid {
            field: "move.chunk_rows".into(),
            reason: "at most 1000000 (a chunk is one SELECT held in memory)".into(),
        });
    }
    Ok(m)
}

/// How cutovers are run (seed 003: a write pause under 100 ms that users do not notice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutoverSettings {
    /// The longest a tenant's writes may wait, lock wait included; an attempt that would
    /// take longer is aborted (and retried later).
    pub pause_budget: Duration,
    /// Attempts start only while the target trails the stream by less than this.
    pub max_lag_bytes: u64,
    /// Attempts start only while the target's measured apply delay is at most this (the
    /// catch-up inside the pause waits about that long); by default two fifths of the
    /// pause budget (see [`default_max_apply_delay`]).
    pub max_apply_delay: Duration,
    /// Backoff between aborted attempts: doubles from the first up to the second.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Verify (count and content hash per chunk) before fencing; a difference that does
    /// not converge stops the cutover.
    pub verify: bool,
    /// How long the old location is kept after a cutover before `cleanup` may remove it.
    pub retention: Duration,
    /// How long to wait for transactions older than the fence to end before an attempt.
    pub old_transaction_wait: Duration,
    /// Keep the old location current from the new one after the cutover (a slot at the
    /// target), so `rollback` loses nothing; until the cleanup.
    pub rollback: bool,
    /// The daemon cleans up a verified, cut-over move when its retention window ends.
    pub auto_cleanup: bool,
}

/// The longest apply delay at which an attempt starts by default, for a pause of `budget`.
/// Inside the pause the catch-up waits for the marker to be read and for the target to
/// apply the tenant's last changes before it: about one apply delay. It may start only
/// after the fence lock (up to half the budget) and must end by nine tenths, so an attempt
/// whose delay alone takes more than two fifths would abort: it is not started, and the
/// tenant's writers are not paused for nothing.
pub fn default_max_apply_delay(budget: Duration) -> Duration {
    budget * 2 / 5
}

impl Default for CutoverSettings {
    fn default() -> Self {
        CutoverSettings {
            pause_budget: Duration::from_millis(100),
            max_lag_bytes: 16 << 20,
            max_apply_delay: default_max_apply_delay(Duration::from_millis(100)),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            verify: true,
            retention: Duration::from_secs(24 * 3600),
            old_transaction_wait: Duration::from_secs(30),
            rollback: true,
            auto_cleanup: true,
        }
    }
}

fn cutover(f: FileCutover) -> Result<CutoverSettings, ConfigError> {
    let d = CutoverSettings::default();
    let ms = |field: &str, v: Option<u64>, default: Duration, min: u64| match v {
        Some(v) if v < min => Err(invalid(
            &format!("cutover.{field}"),
            format!("must be at least {min}"),
        )),
        Some(v) => Ok(Duration::from_millis(v)),
        None => Ok(default),
    };
    let pause_budget = ms("pause_budget_ms", f.pause_budget_ms, d.pause_budget, 10)?;
    let c = CutoverSettings {
        pause_budget,
        max_apply_delay: ms(
            "max_apply_delay_ms",
            f.max_apply_delay_ms,
            default_max_apply_delay(pause_budget),
            0,
        )?,
        max_lag_bytes: f
            .max_lag_mb
            .map(|mb| mb.saturating_mul(1 << 20))
            .unwrap_or(d.max_lag_bytes),
        retry_initial: ms("retry_initial_ms", f.retry_initial_ms, d.retry_initial, 1)?,
        retry_max: ms("retry_max_ms", f.retry_max_ms, d.retry_max, 1)?,
        verify: f.verify.unwrap_or(d.verify),
        retention: f
            .retention_hours
            .map(|h| Duration::from_secs(h.saturating_mul(3600)))
            .unwrap_or(d.retention),
        old_transaction_wait: ms(
            "old_transaction_wait_ms",
            f.old_transaction_wait_ms,
            d.old_transaction_wait,
            0,
        )?,
        rollback: f.rollback.unwrap_or(d.rollback),
        auto_cleanup: f.auto_cleanup.unwrap_or(d.auto_cleanup),
    };
    if c.retry_max < c.retry_initial {
        return Err(invalid(
            "cutover.retry_max_ms",
            "must not be below cutover.retry_initial_ms",
        ));
    }
    Ok(c)
}

/// The metrics and health endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSettings {
    /// `host:port` of `/metrics`, `/healthz` and `/readyz`; `None` (`listen = "off"`): none.
    pub listen: Option<String>,
    /// Export per-tenant series (the one high-cardinality label).
    pub tenant_label: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: Some("127.0.0.1:9187".into()),
            tenant_label: true,
        }
    }
}

fn metrics_settings(f: FileMetrics) -> Result<MetricsSettings, ConfigError> {
    let d = MetricsSettings::default();
    let listen = match f.listen {
        None => d.listen,
        Some(l) if l == "off" => None,
        Some(l) => {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "metrics.listen",
                    format!("{l:?} is not an address:port (or \"off\")"),
                ));
            }
            Some(l)
        }
    };
    Ok(MetricsSettings {
        listen,
        tenant_label: f.tenant_label.unwrap_or(d.tenant_label),
    })
}

/// The whole validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: Endpoint,
    pub replication: ReplicationConfig,
    pub state_dir: PathBuf,
    /// Named target locations; a target may be the source cluster itself.
    pub targets: BTreeMap<TargetId, Endpoint>,
    pub tenancy: Tenancy,
    /// Schema of the registry tables in the control database (the source database).
    pub registry_schema: String,
    pub moves: MoveSettings,
    pub cutover: CutoverSettings,
    pub metrics: MetricsSettings,
}

/// Where environment overrides come from; a function so tests need not touch the process env.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path, &ProcessEnv)
    }

    /// Parses `text` (read from `path`, used for messages and relative paths) and applies
    /// `SWITCHYARD_SOURCE_*` overrides from `env`.
    pub fn from_toml(text: &str, path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let source = endpoint(file.source, "SOURCE", "source", env)?;
        let replication = replication(file.replication)?;
        let state_dir = file.state.dir.unwrap_or_else(|| PathBuf::from("state"));
        let mut targets = BTreeMap::new();
        for (name, t) in file.targets {
            let field = format!("targets.{name}");
            let id = TargetId::new(name.clone()).map_err(|source| ConfigError::Name {
                field: field.clone(),
                source,
            })?;
            let env_key = format!("TARGET_{}", name.to_ascii_uppercase().replace('-', "_"));
            let ep = if t.same_as_source {
                let mut ep = source.clone();
                if let Some(db) = t.endpoint.dbname {
                    ep.dbname = db;
                }
                ep
            } else {
                endpoint(t.endpoint, &env_key, &field, env)?
            };
            targets.insert(id, ep);
        }
        let tenancy = tenancy(file.tenancy)?;
        let registry_schema = file.registry.schema.unwrap_or_else(|| "switchyard".into());
        check_name(&registry_schema).map_err(|source| ConfigError::Name {
            field: "registry.schema".into(),
            source,
        })?;
        Ok(Config {
            source,
            replication,
            state_dir,
            targets,
            tenancy,
            registry_schema,
            moves: moves(file.moves)?,
            cutover: cutover(file.cutover)?,
            metrics: metrics_settings(file.metrics)?,
        })
    }
}

fn tenancy(f: FileTenancy) -> Result<Tenancy, ConfigError> {
    let d = Tenancy::default();
    let tenant_column = f.tenant_column.unwrap_or(d.tenant_column);
    check_name(&tenant_column).map_err(|source| ConfigError::Name {
        field: "tenancy.tenant_column".into(),
        source,
    })?;
    let mut columns = BTreeMap::new();
    for (table, column) in f.columns {
        let q = QualifiedName::parse(&table).map_err(|source| ConfigError::Name {
            field: "tenancy.columns".into(),
            source,
        })?;
        check_name(&column).map_err(|source| ConfigError::Name {
            field: format!("tenancy.columns.{table}"),
            source,
        })?;
        columns.insert(q, column);
    }
    Ok(Tenancy {
        mode: f.mode.unwrap_or_default(),
        tenant_column,
        columns,
    })
}

/// Reads one endpoint; `env_key` names its override variables (`SWITCHYARD_<KEY>_HOST`…)
/// and `field` its place in the file for messages.
fn endpoint(
    f: FileEndpoint,
    env_key: &str,
    field: &str,
    env: &dyn Env,
) -> Result<Endpoint, ConfigError> {
    let over = |key: &str| env.var(&format!("SWITCHYARD_{env_key}_{key}"));
    let host = over("HOST")
        .or(f.host)
        .unwrap_or_else(|| "localhost".into());
    let port = match over("PORT") {
        Some(p) => p.parse().map_err(|_| {
            invalid(
                &format!("SWITCHYARD_{env_key}_PORT"),
                format!("{p:?} is not a port"),
            )
        })?,
        None => f.port.unwrap_or(5432),
    };
    let user = over("USER")
        .or(f.user)
        .ok_or_else(|| invalid(&format!("{field}.user"), "missing"))?;
    let dbname = over("DBNAME")
        .or(f.dbname)
        .ok_or_else(|| invalid(&format!("{field}.dbname"), "missing"))?;
    let sslmode = match over("SSLMODE") {
        Some(m) => parse_sslmode(&m)?,
        None => f.sslmode.unwrap_or_default(),
    };
    let sslrootcert = over("SSLROOTCERT").map(PathBuf::from).or(f.sslrootcert);
    if matches!(sslmode, SslMode::VerifyCa) && sslrootcert.is_none() {
        return Err(invalid(
            &format!("{field}.sslrootcert"),
            "sslmode verify-ca needs sslrootcert (the CA that signed the server certificate)",
        ));
    }
    let password = password(
        f.password_env.as_deref(),
        f.password_file.as_deref(),
        env_key,
        field,
        env,
    )?;
    Ok(Endpoint {
        host,
        port,
        user,
        dbname,
        password,
        sslmode,
        sslrootcert,
        application_name: f.application_name.unwrap_or_else(|| "switchyard".into()),
        connect_timeout: Duration::from_millis(f.connect_timeout_ms.unwrap_or(10_000)),
        allow_cleartext_password: f.allow_cleartext_password.unwrap_or(false),
    })
}

fn parse_sslmode(text: &str) -> Result<SslMode, ConfigError> {
    Ok(match text {
        "disable" => SslMode::Disable,
        "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        other => {
            return Err(invalid(
                "sslmode",
                format!("{other:?}: expected disable, prefer, require, verify-ca or verify-full"),
            ))
        }
    })
}

fn password(
    var: Option<&str>,
    file: Option<&Path>,
    env_key: &str,
    field: &str,
    env: &dyn Env,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(pw) = env.var(&format!("SWITCHYARD_{env_key}_PASSWORD")) {
        return Ok(Some(Secret::new(pw)));
    }
    match (var, file) {
        (Some(_), Some(_)) => Err(invalid(
            &format!("{field}.password_env"),
            "set either password_env or password_file, not both",
        )),
        (Some(var), None) => env.var(var).map(|v| Some(Secret::new(v))).ok_or_else(|| {
            invalid(
                &format!("{field}.password_env"),
                format!("variable {var} is not set"),
            )
        }),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    &format!("{field}.password_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            // A trailing newline is what every editor and `echo` leave behind.
            Ok(Some(Secret::new(text.trim_end_matches(['\n', '\r']))))
        }
        (None, None) => Ok(None),
    }
}

fn replication(f: FileReplication) -> Result<ReplicationConfig, ConfigError> {
    let d = ReplicationConfig::default();
    let named = |field: &str, v: Option<String>, default: String| {
        let v = v.unwrap_or(default);
        check_name(&v).map_err(|source| ConfigError::Name {
            field: field.to_owned(),
            source,
        })?;
        Ok::<_, ConfigError>(v)
    };
    let slot = named("replication.slot", f.slot, d.slot)?;
    // Slot names are restricted by the server to [a-z0-9_]; say so before it does.
    if !slot
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            "replication.slot",
            format!("{slot:?}: slot names may contain only lower-case letters, digits and _"),
        ));
    }
    let publication = named("replication.publication", f.publication, d.publication)?;
    let tables = f
        .tables
        .iter()
        .map(|t| {
            QualifiedName::parse(t).map_err(|source| ConfigError::Name {
                field: "replication.tables".into(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(v) = f.proto_version {
        if !(1..=4).contains(&v) {
            return Err(invalid(
                "replication.proto_version",
                format!("{v}: pgoutput protocol versions are 1 to 4"),
            ));
        }
    }
    let ms = |v: Option<u64>, d: Duration| v.map(Duration::from_millis).unwrap_or(d);
    let cfg = ReplicationConfig {
        slot,
        publication,
        tables,
        proto_version: f.proto_version,
        streaming: f.streaming.unwrap_or(d.streaming),
        row_filter: f.row_filter.unwrap_or(d.row_filter),
        status_interval: ms(f.status_interval_ms, d.status_interval),
        max_message_bytes: f.max_message_bytes.unwrap_or(d.max_message_bytes),
        max_buffered_bytes: f.max_buffered_bytes.unwrap_or(d.max_buffered_bytes),
        reconnect_initial_backoff: ms(f.reconnect_initial_backoff_ms, d.reconnect_initial_backoff),
        reconnect_max_backoff: ms(f.reconnect_max_backoff_ms, d.reconnect_max_backoff),
    };
    if cfg.status_interval.is_zero() || cfg.status_interval > Duration::from_secs(30) {
        return Err(invalid(
            "replication.status_interval_ms",
            "must be between 1 and 30000 (below the server's wal_sender_timeout)",
        ));
    }
    if cfg.max_message_bytes < 1024 {
        return Err(invalid(
            "replication.max_message_bytes",
            "must be at least 1024",
        ));
    }
    if cfg.max_buffered_bytes < 1024 || cfg.max_buffered_bytes > u32::MAX as usize {
        return Err(invalid(
            "replication.max_buffered_bytes",
            "must be between 1024 and 4294967295",
        ));
    }
    if cfg.reconnect_initial_backoff.is_zero()
        || cfg.reconnect_max_backoff < cfg.reconnect_initial_backoff
    {
        return Err(invalid(
            "replication.reconnect_max_backoff_ms",
            "backoffs must be positive and max >= initial",
        ));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<String, String>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }
    fn env(pairs: &[(&str, &str)]) -> MapEnv {
        MapEnv(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
    fn load(text: &str, e: &MapEnv) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), e)
    }

    const MINIMAL: &str = "[source]\nuser = \"u\"\ndbname = \"app\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load(MINIMAL, &env(&[])).unwrap();
        assert_eq!(c.source.host, "localhost");
        assert_eq!(c.source.port, 5432);
        assert_eq!(c.replication.slot, "switchyard");
        assert!(c.replication.streaming);
        assert!(c.source.password.is_none());
    }

    #[test]
    fn move_limits_have_defaults_and_reject_zero() {
        let c = load(MINIMAL, &env(&[])).unwrap();
        assert_eq!(c.moves, MoveSettings::default());
        let text =
            format!("{MINIMAL}[move]\nchunk_rows = 100\nwal_budget_mb = 2\nmax_txn_mb = 3\nsetup_concurrency = 2\n");
        let c = load(&text, &env(&[])).unwrap();
        assert_eq!(c.moves.chunk_rows, 100);
        assert_eq!(c.moves.setup_concurrency, 2);
        assert_eq!(c.moves.wal_budget_bytes, 2 << 20);
        assert_eq!(c.moves.max_txn_bytes, 3 << 20);
        for bad in [
            "chunk_rows = 0",
            "backfill_workers = 0",
            "chunk_rows = 2000000",
            "wal_budget_mb = 0",
            "max_txn_mb = 0",
            "setup_concurrency = 0",
        ] {
            let err = load(&format!("{MINIMAL}[move]\n{bad}\n"), &env(&[])).unwrap_err();
            assert!(err.to_string().contains("move."), "{bad}: {err}");
        }
        let err = load(&format!("{MINIMAL}[move]\nchunk = 1\n"), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("chunk"), "{err}");
    }

    #[test]
    fn example_config_in_repo_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/switchyard.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let e = env(&[
            ("SWITCHYARD_SOURCE_PASSWORD", "pw"),
            ("SWITCHYARD_SHARD2_PASSWORD", "pw2"),
        ]);
        let c = load(&text, &e).unwrap();
        assert_eq!(c.targets.len(), 2);
        assert!(!c.replication.tables.is_empty());
        assert_eq!(c.cutover, CutoverSettings::default());
        assert_eq!(c.metrics, MetricsSettings::default());
    }

    #[test]
    fn metrics_listen_is_an_address_or_off() {
        let c = load(
            &format!("{MINIMAL}[metrics]\nlisten = \"off\"\n"),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.metrics.listen, None);
        let c = load(
            &format!("{MINIMAL}[metrics]\nlisten = \"0.0.0.0:9000\"\ntenant_label = false\n"),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.metrics.listen.as_deref(), Some("0.0.0.0:9000"));
        assert!(!c.metrics.tenant_label);
        let err = load(
            &format!("{MINIMAL}[metrics]\nlisten = \"localhost\"\n"),
            &env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("metrics.listen"), "{err}");
    }

    #[test]
    fn cutover_settings_are_validated() {
        let c = load(
            &format!(
                "{MINIMAL}[cutover]\npause_budget_ms = 250\nretention_hours = 0\nverify = false\n"
            ),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.cutover.pause_budget, Duration::from_millis(250));
        assert_eq!(c.cutover.retention, Duration::ZERO);
        assert!(!c.cutover.verify);
        for bad in [
            "pause_budget_ms = 5",
            "retry_initial_ms = 0",
            "retry_initial_ms = 500\nretry_max_ms = 100",
            "pause = 3",
        ] {
            let err = load(&format!("{MINIMAL}[cutover]\n{bad}\n"), &env(&[])).unwrap_err();
            assert!(
                err.to_string().contains("cutover") || err.to_string().contains("pause"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn env_overrides_file() {
        let e = env(&[
            ("SWITCHYARD_SOURCE_HOST", "/tmp/sock"),
            ("SWITCHYARD_SOURCE_PORT", "6543"),
            ("SWITCHYARD_SOURCE_PASSWORD", "s3cret"),
        ]);
        let c = load(MINIMAL, &e).unwrap();
        assert_eq!(c.source.host, "/tmp/sock");
        assert_eq!(c.source.port, 6543);
        assert_eq!(c.source.password.as_ref().unwrap().expose(), "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn password_from_named_variable_and_file() {
        let text = format!("{MINIMAL}password_env = \"PGPW\"\n");
        let c = load(&text, &env(&[("PGPW", "abc")])).unwrap();
        assert_eq!(c.source.password.unwrap().expose(), "abc");
        let err = load(&text, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("PGPW is not set"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "filepw\n").unwrap();
        let text = format!("{MINIMAL}password_file = {:?}\n", f.display().to_string());
        let c = load(&text, &env(&[])).unwrap();
        assert_eq!(c.source.password.unwrap().expose(), "filepw");
    }

    #[test]
    fn targets_and_tenancy() {
        let text = format!(
            "{MINIMAL}\n[targets.local]\nsame_as_source = true\n\
             [targets.shard-2]\nhost = \"10.0.0.2\"\nuser = \"mover\"\ndbname = \"shard\"\n\
             password_env = \"SHARD_PW\"\n\
             [tenancy]\ntenant_column = \"account_id\"\n[tenancy.columns]\n\"public.accounts\" = \"id\"\n"
        );
        let e = env(&[
            ("SHARD_PW", "x"),
            ("SWITCHYARD_TARGET_SHARD_2_PORT", "6000"),
        ]);
        let c = load(&text, &e).unwrap();
        let local = &c.targets[&TargetId::new("local").unwrap()];
        assert_eq!(local.dbname, "app");
        let shard = &c.targets[&TargetId::new("shard-2").unwrap()];
        assert_eq!((shard.host.as_str(), shard.port), ("10.0.0.2", 6000));
        assert_eq!(shard.password.as_ref().unwrap().expose(), "x");
        assert_eq!(c.tenancy.mode, TenancyMode::Shared);
        let accounts = QualifiedName::parse("public.accounts").unwrap();
        let orders = QualifiedName::parse("public.orders").unwrap();
        assert_eq!(c.tenancy.column_of(&accounts), "id");
        assert_eq!(c.tenancy.column_of(&orders), "account_id");

        let bad = format!("{MINIMAL}[targets.t]\nhost = \"h\"\n");
        let err = load(&bad, &env(&[])).unwrap_err().to_string();
        assert!(err.contains("targets.t.user"), "{err}");
        let bad = format!("{MINIMAL}[targets.t]\nuser = \"u\"\ndbname = \"d\"\nbogus = 1\n");
        let err = load(&bad, &env(&[])).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let bad = format!("{MINIMAL}[tenancy]\nmode = \"rows\"\n");
        assert!(load(&bad, &env(&[])).is_err());
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let cases: &[(&str, &str)] = &[
            ("[source]\nuser='u'\n", "source.dbname"),
            ("[source]\nuser='u'\ndbname='d'\nbogus=1\n", "unknown field"),
            (
                "[source]\nuser='u'\ndbname='d'\npassword='x'\n",
                "unknown field",
            ),
            (
                "[source]\nuser='u'\ndbname='d'\nsslmode='sometimes'\n",
                "sslmode",
            ),
            (
                "[source]\nuser='u'\ndbname='d'\n[replication]\nslot='Bad-Slot'\n",
                "slot",
            ),
            (
                "[source]\nuser='u'\ndbname='d'\n[replication]\ntables=['orders']\n",
                "schema.table",
            ),
            (
                "[source]\nuser='u'\ndbname='d'\n[replication]\nproto_version=9\n",
                "1 to 4",
            ),
            (
                "[source]\nuser='u'\ndbname='d'\n[replication]\npublication=\"a\\u0000b\"\n",
                "NUL",
            ),
            (
                "[source]\nuser='u'\ndbname='d'\n[replication]\nstatus_interval_ms=0\n",
                "status_interval",
            ),
            (
                "[source]\nuser='u'\ndbname='d'\nsslmode='verify-ca'\n",
                "sslrootcert",
            ),
            ("not toml at all [", "test.toml"),
        ];
        for (text, needle) in cases {
            let err = load(text, &env(&[])).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
