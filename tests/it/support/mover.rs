//! Running the `run` daemon against throwaway clusters: a config file, the daemon in-process
//! or as the real binary (for kill -9), a concurrent multi-tenant writer, and parity checks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use switchyard::config::Config;
use switchyard::registry::{CutoverMode, Registry};
use switchyard::tenant::{TargetId, TenantId};
use tokio_postgres::Client;

use super::pipeline::NoEnv;
use super::{wait_for, wait_for_row, PgCluster};

/// A config for `src` (and `dst` as target `shard2`; target `local` is the source itself).
pub fn write_config(
    dir: &Path,
    src: &PgCluster,
    dst: Option<&PgCluster>,
    extra: &str,
) -> Result<PathBuf> {
    let mut text = format!(
        "[source]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"switchyard\"\ndbname = \"postgres\"\n\
         sslmode = \"disable\"\n\
         [replication]\nslot = \"sy\"\npublication = \"sy_pub\"\nstatus_interval_ms = 200\n\
         [state]\ndir = {:?}\n\
         [targets.local]\nsame_as_source = true\n",
        src.port(),
        dir.join("state").display().to_string(),
    );
    if let Some(d) = dst {
        text.push_str(&format!(
            "[targets.shard2]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"switchyard\"\n\
             dbname = \"postgres\"\nsslmode = \"disable\"\n",
            d.port()
        ));
    }
    text.push_str(extra);
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

pub fn load_config(path: &Path) -> Result<Config> {
    Ok(Config::from_toml(
        &std::fs::read_to_string(path)?,
        path,
        &NoEnv,
    )?)
}

/// Grants the `switchyard` role what a target needs: create schemas, set the replica role,
/// and create user-defined types in the schema they have on the source (`public` here).
pub fn prepare_target(pg: &PgCluster) -> Result<()> {
    pg.psql(
        "GRANT SET ON PARAMETER session_replication_role TO switchyard;
         GRANT CREATE ON SCHEMA public TO switchyard;",
    )?;
    Ok(())
}

/// The daemon inside the test process.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), switchyard::daemon::Error>>,
}

/// Daemon logs into the test's captured output (shown when a test fails).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

impl InProcess {
    pub fn start(config: Config, create_slot: bool) -> InProcess {
        InProcess::start_with(config, create_slot, false)
    }

    /// With `standby`: waits for the slot's lease if another daemon holds it.
    pub fn start_with(config: Config, create_slot: bool, standby: bool) -> InProcess {
        init_logs();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(switchyard::daemon::run(
            config,
            switchyard::daemon::RunOptions {
                create_slot,
                standby,
            },
            async move {
                let _ = rx.await;
            },
        ));
        InProcess {
            stop: Some(tx),
            task,
        }
    }

    /// Fails if the daemon already stopped (it must run until told to stop).
    pub fn check_alive(&self) -> Result<()> {
        if self.task.is_finished() {
            bail!("the daemon stopped on its own");
        }
        Ok(())
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .context("the daemon did not stop")??
            .context("the daemon failed")?;
        Ok(())
    }
}

/// The real binary, for kill -9.
pub struct Process {
    child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn start(config: &Path, log: &Path, create_slot: bool) -> Result<Process> {
        Process::start_env(config, log, create_slot, &[])
    }

    /// Started with extra environment variables (failpoints, log filters).
    pub fn start_env(
        config: &Path,
        log: &Path,
        create_slot: bool,
        env: &[(&str, &str)],
    ) -> Result<Process> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.arg("--config").arg(config).arg("run");
        if create_slot {
            cmd.arg("--create-slot");
        }
        // Info by default, whatever the test runner's environment says; a repro asks for
        // more with SWITCHYARD_DAEMON_LOG (an EnvFilter, e.g. "info,switchyard::daemon=debug").
        let level = std::env::var("SWITCHYARD_DAEMON_LOG").unwrap_or_else(|_| "info".into());
        cmd.env("SWITCHYARD_LOG", level);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .context("starting switchyard run")?;
        Ok(Process {
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "switchyard exited ({status}); log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Waits for the process to end on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "switchyard still running after {timeout:?}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "switchyard exited with {status}; log:\n{}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill9();
        bail!("switchyard ignored SIGTERM for 60 s")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the source's switchyard role needs for cutovers: the owner's rights on the moved
/// tables (fence triggers that fire ALWAYS) and a view of every session's transaction.
pub fn fence_grants(src: &PgCluster) -> Result<()> {
    src.psql(&super::app_owned(&["public"]))?;
    src.psql("GRANT pg_read_all_stats TO switchyard;")?;
    Ok(())
}

/// The daemon running in-process on `src` (with `other` as target `shard2`), its config
/// (and the file it was read from) and a client of the source.
pub struct Running {
    pub config: Config,
    pub path: PathBuf,
    pub s: Client,
    pub daemon: InProcess,
    pub registry: Registry,
    pub _dir: tempfile::TempDir,
}

/// Writes a config for `src` (and `other`, with `extra` appended), starts the daemon on it
/// (creating the slot) and waits for the registry.
pub async fn start_daemon(
    src: &PgCluster,
    other: Option<&PgCluster>,
    extra: &str,
) -> Result<Running> {
    let dir = tempfile::tempdir()?;
    let path = write_config(dir.path(), src, other, extra)?;
    let config = load_config(&path)?;
    let s = src.client().await?;
    let daemon = InProcess::start(config.clone(), true);
    registry_ready(&s).await?;
    Ok(Running {
        config,
        path,
        s,
        daemon,
        registry: Registry::new("switchyard")?,
        _dir: dir,
    })
}

/// Waits until the daemon has installed the registry.
pub async fn registry_ready(client: &Client) -> Result<()> {
    wait_for_row(
        client,
        "the daemon to install the registry",
        Duration::from_secs(60),
        "SELECT 1 FROM pg_tables WHERE schemaname = 'switchyard' AND tablename = 'moves'",
        &[],
    )
    .await
}

pub async fn request(
    client: &Client,
    registry: &Registry,
    tenant: &str,
    target: &str,
    schema: &str,
) -> Result<i64> {
    Ok(registry
        .request_move(
            client,
            &TenantId::new(tenant)?,
            &TargetId::new(target)?,
            schema,
            CutoverMode::Manual,
        )
        .await?)
}

pub async fn state_of(client: &Client, id: i64) -> Result<(String, Option<String>, i64)> {
    let row = client
        .query_one(
            "SELECT state, last_error, rows_copied FROM switchyard.moves WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// Waits until move `id` is in `state`; a failed move ends the wait with its error.
pub async fn wait_state(client: &Client, id: i64, state: &str, timeout: Duration) -> Result<()> {
    let what = format!("move {id} to reach {state}");
    let r = wait_for(&what, timeout, || async {
        let (s, err, _) = state_of(client, id).await?;
        if s == state {
            return Ok(Some(()));
        }
        if s == "failed" || s == "paused" {
            bail!("move {id} is {s}: {}", err.unwrap_or_default());
        }
        Ok(None)
    })
    .await;
    if r.is_err() {
        if let Ok(row) = client
            .query_one(
                "SELECT state, rows_copied, rows_total, lag_bytes, last_error FROM switchyard.moves WHERE id = $1",
                &[&id],
            )
            .await
        {
            let (s, c, t, l, e): (String, i64, Option<i64>, Option<i64>, Option<String>) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            eprintln!("move {id}: state {s}, copied {c} of {t:?}, lag {l:?}, error {e:?}");
        }
    }
    r
}

/// Waits until the slot has confirmed everything written so far: every target then holds
/// every change made before this call.
pub async fn wait_drained(src: &Client, timeout: Duration) -> Result<()> {
    let lsn: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    // A transaction after it, so the stream has a commit to confirm past `lsn`.
    src.batch_execute("SELECT pg_logical_emit_message(true, 'test', 'drain')")
        .await?;
    let r = wait_for("the slot to confirm the writes", timeout, || async {
        let done: bool = src
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'sy'",
                &[&lsn],
            )
            .await?
            .get(0);
        Ok(done.then_some(()))
    })
    .await;
    if r.is_err() {
        dump_activity(src).await;
        if let Ok(row) = src
            .query_one("SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = 'sy'", &[])
            .await
        {
            let (c, l): (String, String) = (row.get(0), row.get(1));
            eprintln!("slot confirmed {c}, wal at {l}, waited for {lsn}");
        }
    }
    r
}

/// Prints what every session of a cluster is doing (for failed waits).
pub async fn dump_activity(client: &Client) {
    if let Ok(rows) = client
            .query(
                "SELECT coalesce(application_name, ''), coalesce(state, ''), coalesce(wait_event_type || ':' || wait_event, ''), left(query, 200) FROM pg_stat_activity WHERE backend_type = 'client backend' OR backend_type = 'walsender'",
                &[],
            )
            .await
        {
            for r in rows {
                let (a, s, w, q): (String, String, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
                eprintln!("activity: {a} | {s} | {w} | {q}");
            }
    }
}

/// Row count and an order-independent content hash of `sql`'s rows (one text column).
pub async fn digest(client: &Client, relation: &str, filter: &str) -> Result<(i64, String)> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '') \
                   FROM {relation} t {filter}"
            ),
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// A writer hitting several tenants of the shared `orders`/`items`/`events` schema in
/// multi-tenant transactions until stopped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub rounds: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<Result<i64>>,
}

impl Writer {
    pub fn start(client: Client, tenants: Vec<i32>, pause: Duration) -> Writer {
        Writer::start_with(client, tenants, pause, false)
    }

    /// With `follow_routes`, a transaction the old location refuses (SQLSTATE SY001: a
    /// tenant was cut over) is dropped, as are the tenants `switchyard.routes` now sends
    /// elsewhere; the writer goes on with the others.
    pub fn start_with(
        client: Client,
        tenants: Vec<i32>,
        pause: Duration,
        follow_routes: bool,
    ) -> Writer {
        Writer::spawn(client, tenants, pause, follow_routes, 0)
    }

    /// Goes on where an earlier writer stopped after `rounds` rounds (new keys stay new).
    pub fn resume(client: Client, tenants: Vec<i32>, pause: Duration, rounds: i64) -> Writer {
        Writer::spawn(client, tenants, pause, false, rounds)
    }

    fn spawn(
        client: Client,
        mut tenants: Vec<i32>,
        pause: Duration,
        follow_routes: bool,
        first: i64,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicI64::new(first));
        let (s, r) = (stop.clone(), rounds.clone());
        let task = tokio::spawn(async move {
            let mut i: i64 = first;
            while !s.load(Ordering::Relaxed) && !tenants.is_empty() {
                i += 1;
                let n = tenants.len() as i64;
                let a = tenants[(i % n) as usize];
                let b = tenants[((i + 1) % n) as usize];
                let sql = format!(
                    "BEGIN;
                     UPDATE public.orders SET note = 'upd {i}' WHERE tenant_id = {a} AND id = {upd};
                     INSERT INTO public.orders (tenant_id, id, note, amount) VALUES ({a}, {new}, 'new {i}', {i}.5), ({b}, {new}, 'new {i}', 1);
                     INSERT INTO public.items (tenant_id, id, order_id, qty) VALUES ({a}, {new}, {new}, {i});
                     DELETE FROM public.orders WHERE tenant_id = {b} AND id = {del};
                     UPDATE public.items SET qty = qty + 1 WHERE tenant_id = {b} AND id = {upd};
                     UPDATE public.events SET id = id || 'r' WHERE tenant_id = {a} AND id = 'e{rekey}';
                     UPDATE public.events SET tenant_id = {a}, id = 'moved{i}' WHERE tenant_id = {b} AND id = 'e{arrive}';
                     INSERT INTO public.events VALUES ({b}, 'n{i}', jsonb_build_object('i', {i}, 'big', repeat('x', {len})));
                     COMMIT;",
                    upd = (i * 7919) % 1500 + 1,
                    new = 100_000 + i,
                    del = (i * 104_729) % 1500 + 1,
                    rekey = (i * 6007) % 1500 + 1,
                    arrive = (i * 3001) % 1500 + 1,
                    len = if i % 10 == 0 { 5000 } else { 10 },
                );
                match client.batch_execute(&sql).await {
                    Ok(()) => {}
                    Err(e) if follow_routes && e.code().map(|c| c.code()) == Some("SY001") => {
                        client.batch_execute("ROLLBACK").await?;
                        let moved: Vec<i32> = client
                            .query("SELECT tenant::int FROM switchyard.routes", &[])
                            .await?
                            .iter()
                            .map(|row| row.get(0))
                            .collect();
                        tenants.retain(|t| !moved.contains(t));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                r.store(i, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
            }
            Ok(i)
        });
        Writer { stop, rounds, task }
    }

    pub async fn stop(self) -> Result<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// The shared schema: `orders` (with a TOAST-sized column), `items` referencing orders,
/// `events` with a text key, and a global table without a tenant column.
pub fn shared_schema(tenants: &[i32], rows: i32) -> String {
    let list = tenants
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "CREATE TABLE public.orders (
           tenant_id int NOT NULL, id bigint NOT NULL, note text, big text,
           amount numeric(12,2), created timestamptz NOT NULL DEFAULT '2026-01-01',
           PRIMARY KEY (tenant_id, id));
         ALTER TABLE public.orders ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE public.items (
           tenant_id int NOT NULL, id bigint NOT NULL, order_id bigint NOT NULL, qty int,
           PRIMARY KEY (tenant_id, id),
           FOREIGN KEY (tenant_id, order_id) REFERENCES public.orders ON DELETE CASCADE);
         -- A user-defined type: its table is copied in text, the others in binary.
         CREATE TYPE public.mood AS ENUM ('ok', 'it''s bad');
         CREATE TABLE public.events (tenant_id int NOT NULL, id text NOT NULL, payload jsonb,
           mood public.mood NOT NULL DEFAULT 'ok', PRIMARY KEY (tenant_id, id));
         CREATE TABLE public.countries (code text PRIMARY KEY, name text);
         INSERT INTO public.countries VALUES ('NZ', 'New Zealand'), ('FR', 'France');
         INSERT INTO public.orders (tenant_id, id, note, big, amount)
           SELECT t, g, 'initial ' || g,
                  CASE WHEN g % 50 = 0 THEN (SELECT string_agg(md5((g * 1000 + k)::text), '') FROM generate_series(1, 100) k) END,
                  g * 1.25
             FROM unnest(ARRAY[{list}]) t, generate_series(1, {rows}) g;
         INSERT INTO public.items SELECT tenant_id, id, id, 1 FROM public.orders;
         INSERT INTO public.events
           SELECT t, 'e' || g, jsonb_build_object('g', g),
                  CASE WHEN g % 3 = 0 THEN 'it''s bad' ELSE 'ok' END::public.mood
             FROM unnest(ARRAY[{list}]) t, generate_series(1, {rows}) g;
         CREATE PUBLICATION sy_pub FOR TABLE public.orders, public.items, public.events, public.countries;
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO switchyard;"
    )
}

async fn row_texts(c: &Client, sql: String) -> Result<std::collections::BTreeSet<String>> {
    let r = c.query(&sql, &[]).await?;
    Ok(r.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// Asserts that `target_schema` on `dst` holds exactly tenant `tenant`'s rows of every
/// shared table, and nothing of other tenants.
pub async fn assert_parity(
    src: &Client,
    dst: &Client,
    tenant: i32,
    target_schema: &str,
) -> Result<()> {
    for table in ["orders", "items", "events"] {
        let want = digest(
            src,
            &format!("public.{table}"),
            &format!("WHERE tenant_id = {tenant}"),
        )
        .await?;
        let got = digest(dst, &format!("\"{target_schema}\".{table}"), "").await?;
        if want != got {
            let a = row_texts(
                src,
                format!(
                    "SELECT left(t::text, 120) FROM public.{table} t WHERE tenant_id = {tenant}"
                ),
            )
            .await?;
            let b = row_texts(
                dst,
                format!("SELECT left(t::text, 120) FROM \"{target_schema}\".{table} t"),
            )
            .await?;
            let only_src: Vec<_> = a.difference(&b).take(5).collect();
            let only_dst: Vec<_> = b.difference(&a).take(5).collect();
            bail!(
                "tenant {tenant} table {table}: source {want:?} target {got:?}; only on source {only_src:?}; only on target {only_dst:?}"
            );
        }
        anyhow::ensure!(want.0 > 0, "tenant {tenant} table {table} is empty");
        let strangers: i64 = dst
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{target_schema}\".{table} WHERE tenant_id <> {tenant}"
                ),
                &[],
            )
            .await?
            .get(0);
        anyhow::ensure!(
            strangers == 0,
            "{strangers} rows of other tenants in {target_schema}.{table}"
        );
    }
    Ok(())
}
