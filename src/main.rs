//! The `switchyard` command: parses arguments, wires the pieces, reports errors.

use std::path::PathBuf;
use std::process::ExitCode;

mod demo;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use switchyard::config::Config;
use switchyard::lsn::Lsn;
use switchyard::registry::{CutoverMode, MoveState, Registry};
use switchyard::source::{self, ReplicationStream, StreamSettings};
use switchyard::tail::{Output, Renderer};
use switchyard::tenant::{TargetId, TenantId};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Moves SaaS tenants live between PostgreSQL locations with no lost writes"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "SWITCHYARD_CONFIG",
        default_value = "config/switchyard.toml"
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Show the whole product on this machine: two throwaway PostgreSQL clusters, a
    /// multi-tenant SaaS schema under a live write workload, two tenants moved (one to
    /// its own schema, one to the other cluster), progress, cutover, verification and a
    /// summary. Needs only PostgreSQL server binaries; removes everything on exit.
    Demo {
        /// Small data and a short run (a minute or less).
        #[arg(long)]
        short: bool,
        /// Tenants to seed (default 40; 12 with --short).
        #[arg(long)]
        tenants: Option<usize>,
        /// Orders to seed over all tenants (default 200000; 6000 with --short).
        #[arg(long)]
        orders: Option<u64>,
        /// Workload transactions per second.
        #[arg(long)]
        tps: Option<u32>,
    },
    /// Exit 0 when the running daemon answers /healthz on its metrics address (for
    /// container health checks); the address is `[metrics] listen` unless given.
    Health {
        /// host:port of the daemon's metrics listener.
        #[arg(long)]
        addr: Option<String>,
    },
    /// Check the source's prerequisites; each failure comes with its fix.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print every decoded change of the slot as one JSON object per line.
    Tail {
        /// Confirm printed positions to the source (advances the slot).
        #[arg(long)]
        ack: bool,
        /// Create the publication and slot if they do not exist.
        #[arg(long)]
        create_slot: bool,
        /// Start position (the server never goes before the slot's confirmed position).
        #[arg(long, value_parser = parse_lsn)]
        from: Option<Lsn>,
    },
    /// Run the daemon: consume the slot and move every tenant the registry asks for.
    Run {
        /// Create the publication and slot if they do not exist (first start only).
        #[arg(long)]
        create_slot: bool,
        /// If another daemon runs this slot, wait and take over when it stops.
        #[arg(long)]
        standby: bool,
        /// Threads that run the pipeline. One spends ~30 % less CPU than two on a small host
        /// that also runs PostgreSQL, with the same lag tail; more pay only where the daemon
        /// itself is the bottleneck on a host with idle cores (docs/configuration.md).
        #[arg(long, env = "SWITCHYARD_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
    },
    /// Request a tenant move: writes a row into the registry's moves table.
    Move {
        /// The tenant id (the tenant column's value, or the schema for schema-per-tenant).
        tenant: String,
        /// A target named in the configuration's [targets].
        #[arg(long)]
        to: String,
        /// Target schema (default: the tenant id).
        #[arg(long)]
        schema: Option<String>,
        /// Cut over automatically as soon as the tenant is in sync.
        #[arg(long)]
        auto: bool,
    },
    /// Compare the tenant's rows at the source and the target (count and content hash per
    /// chunk; other tenants' rows in the target). Exit status 1 when they differ.
    Verify {
        tenant: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the daemon to cut the tenant over (fence, catch up, flip the route) and wait.
    Cutover {
        tenant: String,
        /// How long to wait for the cutover, in seconds (it goes on in the daemon after).
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
    /// Remove a cut-over tenant from its old location (after the retention window).
    Cleanup { tenant: String },
    /// Roll a cutover back: a bounded cutover to the old location, which reverse
    /// replication kept current, so no write made since the cutover is lost.
    Rollback {
        tenant: String,
        /// How long to wait, in seconds (it goes on in the daemon after).
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
    /// Every move: state, rows copied, rate, lag, ETA, cutover pause, last error.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds until interrupted (rates from the samples).
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
    },
    /// Cancel a move before its cutover: the daemon stops it and what it wrote at the
    /// target is removed; the source is left as it is.
    Cancel { tenant: String },
}

/// Prints a move's attempts and where it stands; success when it reached `done`.
fn report<'a>(
    tenant: &TenantId,
    mv: &switchyard::registry::Move,
    attempts: impl Iterator<Item = &'a switchyard::registry::Attempt>,
    done: MoveState,
) -> ExitCode {
    for a in attempts {
        println!("{a}");
    }
    println!("move {} of tenant {tenant}: {}", mv.id, mv.state);
    if mv.state == done {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// GET /healthz on `addr`: success on an HTTP 200 within 5 s.
async fn health(addr: &str) -> ExitCode {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: switchyard\r\n\r\n")
            .await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        Ok::<bool, std::io::Error>(
            std::str::from_utf8(&head[..n])
                .unwrap_or("")
                .split_whitespace()
                .nth(1)
                == Some("200"),
        )
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), probe).await {
        Ok(Ok(true)) => {
            println!("healthy");
            ExitCode::SUCCESS
        }
        Ok(Ok(false)) => {
            println!("unhealthy: /healthz did not answer 200");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            println!("unhealthy: {addr}: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            println!("unhealthy: {addr} did not answer within 5 s");
            ExitCode::FAILURE
        }
    }
}

fn parse_lsn(s: &str) -> Result<Lsn, String> {
    s.parse()
        .map_err(|e: switchyard::lsn::ParseLsnError| e.to_string())
}

fn init_logs(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo draws progress on the terminal: the daemon inside it only says what is wrong.
    init_logs(
        cli.log_format,
        if matches!(cli.command, Command::Demo { .. }) {
            "warn"
        } else {
            "info"
        },
    );
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Run { threads, .. } = &cli.command {
        builder.worker_threads(usize::from(*threads));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Demo {
        short,
        tenants,
        orders,
        tps,
    } = cli.command
    {
        let mut options = demo::DemoOptions::new(short);
        options.tenants = tenants.unwrap_or(options.tenants).max(3);
        options.orders = orders.unwrap_or(options.orders).max(100);
        options.tps = tps.unwrap_or(options.tps).max(1);
        return demo::run(options).await;
    }
    if let Command::Health { addr: Some(addr) } = &cli.command {
        return Ok(health(addr).await);
    }
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Demo { .. } => unreachable!("handled above"),
        Command::Health { .. } => match &config.metrics.listen {
            Some(addr) => Ok(health(addr).await),
            None => anyhow::bail!("[metrics] listen is off: there is no health endpoint"),
        },
        Command::Check { json } => check(&config, json).await,
        Command::Move {
            tenant,
            to,
            schema,
            auto,
        } => request_move(&config, tenant, to, schema, auto).await,
        Command::Verify { tenant, json } => verify(&config, tenant, json).await,
        Command::Cutover { tenant, wait } => {
            let tenant = TenantId::new(tenant)?;
            let (mv, attempts) = switchyard::cutover::request::cutover_tenant(
                &config,
                &tenant,
                std::time::Duration::from_secs(wait),
            )
            .await?;
            Ok(report(&tenant, &mv, attempts.iter(), MoveState::CutOver))
        }
        Command::Cleanup { tenant } => cleanup(&config, tenant).await,
        Command::Status { json, watch } => status(&config, json, watch).await,
        Command::Rollback { tenant, wait } => {
            let tenant = TenantId::new(tenant)?;
            let (mv, attempts) = switchyard::cutover::request::rollback_tenant(
                &config,
                &tenant,
                std::time::Duration::from_secs(wait),
            )
            .await?;
            let rollbacks = attempts.iter().filter(|a| a.result.starts_with("roll"));
            Ok(report(&tenant, &mv, rollbacks, MoveState::RolledBack))
        }
        Command::Cancel { tenant } => cancel(&config, tenant).await,
        Command::Run {
            create_slot,
            standby,
            threads: _,
        } => run_daemon(config, create_slot, standby).await,
        Command::Tail {
            ack,
            create_slot,
            from,
        } => {
            tail(config, ack, create_slot, from.unwrap_or(Lsn::INVALID)).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `check`: the report's exit status tells a script whether the source is ready.
async fn check(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let report = source::check::run(config).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// `move`: the request is checked here first, so the operator gets the fix at once rather
/// than a failed move from the daemon later.
async fn request_move(
    config: &Config,
    tenant: String,
    to: String,
    schema: Option<String>,
    auto: bool,
) -> anyhow::Result<ExitCode> {
    let tenant = TenantId::new(tenant)?;
    let target = TargetId::new(to)?;
    if !config.targets.contains_key(&target) {
        let known: Vec<String> = config.targets.keys().map(|t| t.to_string()).collect();
        anyhow::bail!(
            "target {:?} is not configured; known targets: {}",
            target.as_str(),
            known.join(", ")
        );
    }
    // Refuse now, with the fix, what the daemon would refuse later.
    let tables = switchyard::layout::check_move(config, &tenant, &target).await?;
    let registry = Registry::new(config.registry_schema.clone())?;
    let mut client = config.source.connect_sql().await?;
    // Stored as the tenant column's type writes it (`7`, not `007`).
    let tenant = switchyard::layout::canonical_tenant(config, &client, &tenant).await?;
    let schema = schema.unwrap_or_else(|| tenant.as_str().to_owned());
    registry.install(&mut client).await?;
    let mode = if auto {
        CutoverMode::Auto
    } else {
        CutoverMode::Manual
    };
    let id = registry
        .request_move(&client, &tenant, &target, &schema, mode)
        .await?;
    println!(
        "move {id} requested: tenant {tenant} ({} tables) to {target} schema {schema} ({} cutover)",
        tables.len(),
        mode.as_str()
    );
    Ok(ExitCode::SUCCESS)
}

/// `verify`: a table per line for the operator, the whole report for a script; the exit
/// status says whether the copies are equal.
async fn verify(config: &Config, tenant: String, json: bool) -> anyhow::Result<ExitCode> {
    let tenant = TenantId::new(tenant)?;
    let report = switchyard::cutover::request::verify_tenant(config, &tenant).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for t in &report.tables {
            println!(
                "{:<40} {:>10} rows  {:>10} at target  {:>4} chunks  {}",
                t.table,
                t.source_rows,
                t.target_rows,
                t.chunks,
                if t.ok() { "equal" } else { "DIFFERENT" }
            );
        }
        println!("{} ({} ms)", report.summary(), report.millis);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `cleanup`: says what left the old location, so the operator knows what is gone.
async fn cleanup(config: &Config, tenant: String) -> anyhow::Result<ExitCode> {
    let tenant = TenantId::new(tenant)?;
    let cleaned = switchyard::cutover::request::cleanup_tenant(config, &tenant).await?;
    println!(
        "tenant {tenant} removed from its old location: {} rows deleted, {} tables dropped{}",
        cleaned.rows_deleted,
        cleaned.tables_dropped.len(),
        cleaned
            .schema_dropped
            .map(|s| format!(", schema {s} dropped"))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// `status`: once, or redrawn every `watch` seconds until interrupted (the rates need
/// more than one sample).
async fn status(config: &Config, json: bool, watch: Option<u64>) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    use switchyard::registry::status;
    let registry = Registry::new(config.registry_schema.clone())?;
    let mut client = config.source.connect_sql().await?;
    registry.install(&mut client).await?;
    let tty = std::io::stdout().is_terminal();
    let mut samples = status::Watch::default();
    loop {
        let redraw = tty && samples.has_sample();
        let rows = samples.sample(&registry, &client).await?;
        if json {
            println!("{}", serde_json::to_string(&rows)?);
        } else {
            if redraw {
                // Redraw in place on a terminal.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", status::render(rows, tty));
        }
        let Some(secs) = watch else {
            break;
        };
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(secs.max(1))) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cancel`: says what the move left behind at the target and what it kept there, so the
/// operator knows nothing of another tenant's went.
async fn cancel(config: &Config, tenant: String) -> anyhow::Result<ExitCode> {
    let tenant = TenantId::new(tenant)?;
    let c = switchyard::cutover::request::cancel_tenant(config, &tenant).await?;
    println!(
        "move of tenant {tenant} cancelled; at the target: {} tables dropped, {} rows deleted{}{}",
        c.tables_dropped.len(),
        c.rows_deleted,
        c.schema_dropped
            .map(|s| format!(", schema {s} dropped"))
            .unwrap_or_default(),
        if c.tables_kept.is_empty() {
            String::new()
        } else {
            format!(
                "; kept (there before the move): {}",
                c.tables_kept.join(", ")
            )
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `run`: the daemon, until a stop signal.
async fn run_daemon(config: Config, create_slot: bool, standby: bool) -> anyhow::Result<ExitCode> {
    // A stop is bounded in every state: the daemon may be waiting on a cluster that
    // went away (a reconnect loop, a query on a silent link) where it does not look
    // at the signal. Past `stop_timeout`, or at a second signal, it exits as a crash
    // would, which every move resumes from exactly.
    let stop_timeout = config.moves.stop_timeout;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(stop_on_signals(stop_tx, stop_timeout));
    let shutdown = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    switchyard::daemon::run(
        config,
        switchyard::daemon::RunOptions {
            create_slot,
            standby,
        },
        shutdown,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon's stop: the first SIGINT or SIGTERM asks for it on `stop`; a second one, or
/// `stop_timeout` without the daemon having stopped, exits the process (see `run_daemon`).
async fn stop_on_signals(
    stop: tokio::sync::watch::Sender<bool>,
    stop_timeout: std::time::Duration,
) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(
        timeout_ms = stop_timeout.as_millis() as u64,
        "stopping: finishing in-flight work"
    );
    let _ = stop.send(true);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("a second stop request: exiting now");
        }
        _ = term.recv() => {
            tracing::warn!("a second stop request: exiting now");
        }
        _ = tokio::time::sleep(stop_timeout) => {
            tracing::error!(timeout_ms = stop_timeout.as_millis() as u64, "the stop did not finish in time (a cluster does not answer?): exiting; the next start resumes from what is durable");
        }
    }
    std::process::exit(1);
}

async fn tail(config: Config, ack: bool, create: bool, from: Lsn) -> anyhow::Result<()> {
    let repl = &config.replication;
    let client = config.source.connect_sql().await?;
    if create {
        source::slot::ensure_publication(&client, &repl.publication, &repl.tables).await?;
    } else if source::slot::publication_tables(&client, &repl.publication)
        .await?
        .is_none()
    {
        anyhow::bail!(
            "publication {:?} does not exist; run with --create-slot or create it",
            repl.publication
        );
    }
    if ack {
        // Confirming on the daemon's slot while tenants move would hand their changes to
        // this terminal instead of their targets: refused while any move consumes it.
        let registry = Registry::new(config.registry_schema.clone())?;
        let exists: bool = client
            .query_one(
                "SELECT to_regclass($1::text) IS NOT NULL",
                &[&registry.table("moves")],
            )
            .await?
            .get(0);
        if exists {
            let moving: Vec<String> = registry
                .list(&client)
                .await?
                .into_iter()
                .filter(|m| m.state.consumes_stream())
                .map(|m| m.tenant.to_string())
                .collect();
            if !moving.is_empty() {
                anyhow::bail!(
                    "slot {:?} is switchyard's and tenants {} are moving through it: --ack would confirm changes their targets never received. Tail without --ack, or on a slot of its own (--create-slot with another replication.slot)",
                    repl.slot,
                    moving.join(", ")
                );
            }
        }
    }
    let slot = source::slot::ensure_slot(&client, &repl.slot, create).await?;
    drop(client);
    let start = from.max(slot.confirmed_flush.unwrap_or(Lsn::INVALID));
    let mut stream = ReplicationStream::start(StreamSettings {
        endpoint: config.source.clone(),
        replication: repl.clone(),
        ack,
        start,
        ceiling: None,
    })
    .await?;
    eprintln!(
        "tailing slot {:?} from {start} (protocol v{}, ack {})",
        repl.slot,
        stream.proto_version(),
        if ack { "on" } else { "off" }
    );
    let mut renderer = Renderer::new();
    let mut out = Output::new(std::io::stdout());
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let result = loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            ev = stream.recv() => ev,
        };
        match event {
            Ok(Some(ev)) => {
                let line = renderer.render(&ev);
                if let Err(e) = out.write(&line) {
                    // A closed stdout (e.g. `| head`) ends tail; nothing past it is confirmed.
                    break if e.kind() == std::io::ErrorKind::BrokenPipe {
                        Ok(())
                    } else {
                        Err(e.into())
                    };
                }
                if let Some(lsn) = line.durable_after {
                    stream.mark_applied(switchyard::lsn::CommitLsn::of(lsn));
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(anyhow::Error::from(e)),
        }
    };
    stream.shutdown().await;
    result
}
