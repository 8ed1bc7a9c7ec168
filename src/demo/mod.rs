//! `switchyard demo`: the whole product on one machine, with nothing but PostgreSQL server
//! binaries installed.
//!
//! ```text
//!   cluster "app" (source, wal_level=logical)          cluster "shard2"
//!     public.users/orders/line_items (dozens of tenants)   app.tenant_<big>
//!     tenant_<second>  ◄── move to the same cluster        ▲
//!              ▲                                            │ move to another cluster
//!              └──────── switchyard daemon (in process) ────┘
//!   a live workload writes to every tenant the whole time, following switchyard.routes
//! ```
//!
//! Invariants:
//! - Everything it starts is throwaway and removed on exit, error or Ctrl-C (clusters in a
//!   fresh temporary directory, free loopback ports; the machine's own server is never used).
//! - The demo drives the real daemon and the real operator paths (registry rows, cutover
//!   request, verification); it prints what they report, nothing it computes itself
//!   stands in for them.

mod cluster;
mod workload;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use switchyard::config::{Config, Env};
use switchyard::registry::{status, CutoverMode, MoveState, Registry};
use switchyard::tenant::{TargetId, TenantId};

use cluster::LocalCluster;

/// Demo knobs (from the command line).
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Small data and a short run (tests, CI).
    pub short: bool,
    pub tenants: usize,
    pub orders: u64,
    /// Workload transactions per second.
    pub tps: u32,
    /// Seconds the workload goes on after the cutovers (writes at the new locations).
    pub after_secs: u64,
}

impl DemoOptions {
    pub fn new(short: bool) -> DemoOptions {
        if short {
            DemoOptions {
                short,
                tenants: 12,
                orders: 6_000,
                tps: 50,
                after_secs: 2,
            }
        } else {
            DemoOptions {
                short,
                tenants: 40,
                orders: 200_000,
                tps: 100,
                after_secs: 5,
            }
        }
    }
}

/// The demo's working directory: removed when dropped (after the clusters in it stopped).
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<WorkDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "switchyard-demo-{}-{nanos:08x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the demo started; dropped in reverse order of creation (clusters before the dir).
struct Stage {
    source: LocalCluster,
    shard2: LocalCluster,
    dir: WorkDir,
}

fn say(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
    let _ = std::io::stdout().flush();
}

pub async fn run(options: DemoOptions) -> Result<ExitCode> {
    let bindir = cluster::find_bindir()?;
    let dir = WorkDir::new()?;
    say(format!(
        "switchyard demo: two throwaway PostgreSQL clusters under {} (server binaries: {})",
        dir.0.display(),
        bindir.display()
    ));
    let mut source = LocalCluster::start(&bindir, &dir.0, "app")?;
    let mut shard2 = LocalCluster::start(&bindir, &dir.0, "shard2")?;
    source.ready().await?;
    shard2.ready().await?;
    let stage = Stage {
        source,
        shard2,
        dir,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let interrupted = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let mut daemon: Option<Daemon> = None;
    let mut writer: Option<tokio::task::JoinHandle<Result<()>>> = None;
    let outcome = tokio::select! {
        r = show(&options, &stage, &mut daemon, &mut writer, stop_rx) => r,
        _ = interrupted => {
            say("\ninterrupted: stopping the daemon and removing the clusters");
            Ok(ExitCode::from(130))
        }
    };
    let _ = stop_tx.send(true);
    if let Some(w) = writer {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    if let Some(d) = daemon {
        d.stop().await;
    }
    drop(stage);
    say("demo clusters stopped and removed");
    outcome
}

/// The demo's configuration is its own: environment overrides meant for a real deployment
/// must not redirect it.
struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

/// The daemon running inside the demo process.
struct Daemon {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), switchyard::daemon::Error>>,
}

impl Daemon {
    fn start(config: Config) -> Daemon {
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(switchyard::daemon::run(
            config,
            switchyard::daemon::RunOptions {
                create_slot: true,
                standby: false,
            },
            async move {
                let _ = rx.await;
            },
        ));
        Daemon { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => say(format!("the daemon stopped with an error: {e}")),
            Ok(Err(e)) => say(format!("the daemon task failed: {e}")),
            Err(_) => say("the daemon did not stop within 30 s"),
        }
    }
}

fn write_config(dir: &Path, source: &LocalCluster, shard2: &LocalCluster) -> Result<Config> {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let tables: Vec<String> = workload::TABLES.iter().map(|t| format!("{t:?}")).collect();
    let text = format!(
        "[source]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\ndbname = \"app\"\nsslmode = \"disable\"\n\
         [replication]\nslot = \"switchyard\"\npublication = \"switchyard\"\ntables = [{}]\nstatus_interval_ms = 500\n\
         [state]\ndir = {:?}\n\
         [targets.local]\nsame_as_source = true\n\
         [targets.shard2]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\ndbname = \"app\"\nsslmode = \"disable\"\n\
         [tenancy]\nmode = \"shared\"\ntenant_column = \"tenant_id\"\n\
         [move]\nchunk_rows = 2000\nbackfill_workers = 2\nregistry_poll_ms = 200\n\
         [cutover]\nretry_initial_ms = 200\nretry_max_ms = 2000\nauto_cleanup = false\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        source.port,
        tables.join(", "),
        dir.join("state").display().to_string(),
        shard2.port,
    );
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, &text)?;
    Ok(Config::from_toml(&text, &path, &NoEnv)?)
}

/// One moving tenant, as the demo follows it.
struct Moving {
    tenant: TenantId,
    target: TargetId,
    schema: String,
    requested: Instant,
    in_sync: Option<Duration>,
}

/// The demo's story, step by step; what it starts is left in `daemon` and `writer` for
/// `run` to stop, however the story ends.
async fn show(
    options: &DemoOptions,
    stage: &Stage,
    daemon: &mut Option<Daemon>,
    writer: &mut Option<tokio::task::JoinHandle<Result<()>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<ExitCode> {
    let src = stage.source.connect("postgres").await?;
    src.batch_execute("CREATE DATABASE app").await?;
    let dst = stage.shard2.connect("postgres").await?;
    dst.batch_execute("CREATE DATABASE app").await?;
    let app = stage.source.connect("app").await?;
    let seeding = Instant::now();
    let seeded = workload::seed(&app, options.tenants, options.orders).await?;
    say(format!(
        "seeded {} tenants of uneven size: {} users, {} orders, {} line items ({} rows) in {:.1} s",
        options.tenants,
        seeded.users,
        seeded.orders,
        seeded.line_items,
        seeded.total(),
        seeding.elapsed().as_secs_f64()
    ));

    app.batch_execute(&format!(
        "CREATE PUBLICATION switchyard FOR TABLE {}",
        workload::TABLES.join(", ")
    ))
    .await
    .context("creating the publication")?;
    let dir = stage.dir.0.clone();
    let config = write_config(&dir, &stage.source, &stage.shard2)?;
    let metrics = config.metrics.listen.clone().unwrap_or_default();
    *daemon = Some(Daemon::start(config.clone()));
    say(format!(
        "daemon started (config {}); metrics at http://{metrics}/metrics",
        dir.join("switchyard.toml").display()
    ));

    let counters = start_workload(options, stage, &config, writer, stop).await?;

    let registry = Registry::new(config.registry_schema.clone())?;
    let mut control = config.source.connect_sql().await?;
    registry.install(&mut control).await?;
    let mut moving = request_moves(&config, &registry, &control).await?;

    // Progress until every move is in sync.
    follow_until_in_sync(options, daemon.as_ref(), &registry, &control, &mut moving).await?;
    for m in &moving {
        say(format!(
            "tenant {} in sync at {}.{} after {:.1} s: copied underneath the live stream",
            m.tenant,
            m.target,
            m.schema,
            m.in_sync.unwrap_or_default().as_secs_f64()
        ));
    }

    // Cut over, one tenant after the other, as an operator would.
    cut_over(options, &config, &moving).await?;
    say(format!(
        "both tenants cut over; the workload goes on for {} s at their new locations",
        options.after_secs
    ));
    tokio::time::sleep(Duration::from_secs(options.after_secs)).await;

    // Summary, from the registry.
    summary(&config, &registry, &control, &moving, &counters).await
}

/// The live writes every move happens under, left running in `writer` (it follows the
/// routes, so it goes on writing at the new locations after the cutovers).
async fn start_workload(
    options: &DemoOptions,
    stage: &Stage,
    config: &Config,
    writer: &mut Option<tokio::task::JoinHandle<Result<()>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Arc<workload::Counters>> {
    let counters = Arc::new(workload::Counters::default());
    let locations = workload::Locations {
        source: stage.source.connect("app").await?,
        targets: [
            ("local".to_owned(), stage.source.connect("app").await?),
            ("shard2".to_owned(), stage.shard2.connect("app").await?),
        ]
        .into_iter()
        .collect(),
    };
    *writer = Some(tokio::spawn(workload::run(
        locations,
        config.registry_schema.clone(),
        options.tenants,
        options.tps,
        counters.clone(),
        stop,
    )));
    say(format!(
        "workload: ~{} transactions/s over all {} tenants (new orders with line items, updates, deletes)",
        options.tps, options.tenants
    ));
    Ok(counters)
}

/// Asks for the two moves as an operator would (registry rows, checked first), one to
/// each kind of place.
async fn request_moves(
    config: &Config,
    registry: &Registry,
    control: &tokio_postgres::Client,
) -> Result<Vec<Moving>> {
    // Tenant 1 is the biggest: it gets a cluster of its own; tenant 2 its own schema.
    let mut moving = Vec::new();
    for (tenant, target, schema) in [("1", "shard2", "tenant_1"), ("2", "local", "tenant_2")] {
        let tenant = TenantId::new(tenant)?;
        let target = TargetId::new(target)?;
        switchyard::layout::check_move(config, &tenant, &target).await?;
        let id = registry
            .request_move(control, &tenant, &target, schema, CutoverMode::Manual)
            .await?;
        say(format!(
            "move {id}: tenant {tenant} → {target}.{schema} requested"
        ));
        moving.push(Moving {
            tenant,
            target,
            schema: schema.to_owned(),
            requested: Instant::now(),
            in_sync: None,
        });
    }
    Ok(moving)
}

/// Draws the registry's status until every move streams (in sync), noting when each got
/// there; a move or daemon that stops, or too long a wait, ends the demo.
async fn follow_until_in_sync(
    options: &DemoOptions,
    daemon: Option<&Daemon>,
    registry: &Registry,
    control: &tokio_postgres::Client,
    moving: &mut [Moving],
) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut samples = status::Watch::default();
    let mut drawn_lines = 0usize;
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let deadline = Instant::now() + Duration::from_secs(if options.short { 180 } else { 900 });
    loop {
        if daemon.is_some_and(|d| d.task.is_finished()) {
            bail!("the daemon stopped on its own; see the messages above");
        }
        let rows = samples.sample(registry, control).await?;
        for m in moving.iter_mut() {
            let row = rows.iter().find(|r| r.tenant == m.tenant.as_str());
            if m.in_sync.is_none() && row.is_some_and(|r| r.state == "streaming") {
                m.in_sync = Some(m.requested.elapsed());
            }
            if let Some(r) = row.filter(|r| r.state == "failed" || r.state == "paused") {
                bail!(
                    "the move of tenant {} stopped: {}",
                    r.tenant,
                    r.last_error.as_deref().unwrap_or(&r.state)
                );
            }
        }
        let done = moving.iter().all(|m| m.in_sync.is_some());
        let text = status::render(rows, tty);
        if tty {
            if drawn_lines > 0 {
                print!("\x1b[{drawn_lines}A\x1b[J");
            }
            print!("{text}");
            drawn_lines = text.lines().count();
            let _ = std::io::stdout().flush();
        } else if done || last_print.elapsed() >= Duration::from_secs(2) {
            print!("{text}");
            last_print = Instant::now();
        }
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("the moves did not reach streaming in time");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Cuts each tenant over through the operator's path (the request the daemon answers),
/// showing its attempts; a tenant that does not cut over ends the demo.
async fn cut_over(options: &DemoOptions, config: &Config, moving: &[Moving]) -> Result<()> {
    for m in moving {
        say(format!(
            "cutting tenant {} over (verify, fence writes, catch up, flip the route)…",
            m.tenant
        ));
        let (mv, attempts) = switchyard::cutover::request::cutover_tenant(
            config,
            &m.tenant,
            Duration::from_secs(if options.short { 120 } else { 300 }),
        )
        .await?;
        for a in &attempts {
            say(format!("  {a}"));
        }
        if mv.state != MoveState::CutOver {
            bail!(
                "tenant {} did not cut over: {} {}",
                m.tenant,
                mv.state,
                mv.last_error.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// What each move achieved, as the registry recorded it (the demo computes none of it);
/// success only when both are cut over and verified equal.
async fn summary(
    config: &Config,
    registry: &Registry,
    control: &tokio_postgres::Client,
    moving: &[Moving],
    counters: &workload::Counters,
) -> Result<ExitCode> {
    let rows = registry.status(control).await?;
    say("\nsummary");
    let mut ok = true;
    for m in moving {
        let Some(r) = rows.iter().find(|r| r.tenant == m.tenant.as_str()) else {
            bail!("the move of tenant {} vanished from the registry", m.tenant);
        };
        let secs = m.in_sync.unwrap_or_default().as_secs_f64().max(0.001);
        let route = registry
            .route(control, &m.tenant)
            .await?
            .map(|(l, s, v)| format!("{l}.{s} (route version {v})"))
            .unwrap_or_else(|| "none".into());
        let verified = control
            .query_one(
                &format!(
                    "SELECT verify_ok, verify_result FROM {}.moves WHERE id = $1",
                    switchyard::sql::quote_ident(&config.registry_schema)
                ),
                &[&r.id],
            )
            .await?;
        let verify_ok: Option<bool> = verified.get(0);
        let verify_result: Option<String> = verified.get(1);
        ok &= r.state == "cut_over" && verify_ok == Some(true);
        say(format!(
            "  tenant {:<3} → {:<20} {} rows in {:.1} s ({:.0} rows/s, under live writes); state {}\n\
             \x20            write pause at cutover {} ({} attempt(s)); verification: {}; now routed to {}",
            m.tenant,
            format!("{}.{}", m.target, m.schema),
            r.rows_copied,
            secs,
            r.rows_copied as f64 / secs,
            r.state,
            r.pause_ms
                .map(|p| format!("{p:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            r.cutover_attempts,
            verify_result.unwrap_or_else(|| "-".into()),
            route
        ));
    }
    say(format!(
        "  workload: {} transactions committed, {} writes refused at an old location (SQLSTATE SY001) and re-routed, {} retried",
        counters.committed.load(Ordering::Relaxed),
        counters.refused.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed)
    ));
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
