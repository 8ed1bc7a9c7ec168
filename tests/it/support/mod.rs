//! Real-PostgreSQL test harness shared by the integration tests (`mod support;`).
//!
//! Invariants:
//!
//! * Every [`PgCluster`] is throwaway: a fresh `initdb` in its own temporary
//!   directory (data dir, socket dir and server log all live inside it), on a
//!   free TCP port picked at start. Nothing is shared between clusters, so any
//!   number of them may run at once (a source and several targets, tests in
//!   parallel).
//! * The harness only ever talks to, signals or deletes the clusters it
//!   started itself. It never touches the machine's own server on port 5432
//!   (that port is never handed out) and never relies on `PATH` for the server
//!   binaries.
//! * Dropping a cluster stops its server (fast shutdown, then SIGKILL after a
//!   timeout) and removes its temporary directory, also while a test panics;
//!   if the test process dies without running `Drop` (SIGKILL, abort), a small
//!   watchdog process does the same cleanup.
//! * The superuser `postgres` connects over the unix socket with trust auth.
//!   The non-superuser role `switchyard` (LOGIN REPLICATION, CREATE on the
//!   `postgres` database) connects over TCP at `127.0.0.1`; TCP auth is trust,
//!   or scram-sha-256 with [`ClusterOptions::scram`].
//! * Tests wait for conditions with [`wait_for`], never with bare sleeps.
//!
//! Server binaries come from `SWITCHYARD_PG_BINDIR`, else `pg_config --bindir`
//! if it holds `initdb` and `postgres`, else the highest
//! `/usr/lib/postgresql/*/bin`. When running as root (sessions and CI do),
//! `initdb` and `postgres` run as the OS user `postgres`, which owns the
//! temporary directory. Set `SWITCHYARD_KEEP_PG=1` to keep the directories of
//! dropped clusters for debugging.

#![allow(dead_code)]

pub mod mover;
pub mod pipeline;
pub mod proxy;
pub mod report;
pub mod tpcb;

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::fs;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Name of the non-superuser role created in every cluster.
pub const REPLICATION_USER: &str = "switchyard";

/// How long a server gets to start (including crash recovery).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the server is SIGKILLed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How many fresh ports to try when another process grabs ours first.
const PORT_ATTEMPTS: usize = 5;
/// Poll interval of [`wait_for`].
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Unix socket paths must fit in `sun_path` (108 bytes, with the file name).
const MAX_SOCKET_DIR_LEN: usize = 90;

/// Knobs of a cluster; `ClusterOptions::default()` is a plain logical-replication
/// cluster with trust auth and no TLS.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// TCP connections (normal and replication) need scram-sha-256; the unix
    /// socket stays trust.
    pub scram: bool,
    /// Serve TLS with a freshly generated CA and a server certificate for
    /// `localhost` and `127.0.0.1` (see [`PgCluster::ca_cert_path`]).
    pub ssl: bool,
    /// With `ssl`: reject TCP connections that do not use TLS. Without it,
    /// TCP accepts both plain and TLS connections.
    pub require_ssl: bool,
    /// `logical_decoding_work_mem` in kB (server minimum is 64), to force
    /// large transactions to spill or stream.
    pub logical_decoding_work_mem_kb: Option<u32>,
    /// `wal_sender_timeout`; the server default (60 s) when `None`.
    pub wal_sender_timeout: Option<Duration>,
    /// More `postgresql.conf` settings, written last (so they win). Values are
    /// quoted by the harness: pass `("work_mem", "4MB")`, not `"'4MB'"`.
    pub extra_conf: Vec<(String, String)>,
}

/// A throwaway PostgreSQL server; see the module docs.
#[derive(Debug)]
pub struct PgCluster {
    /// `None` only once handed over to `SWITCHYARD_KEEP_PG` in `Drop`.
    root: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    bindir: PathBuf,
    port: u16,
    options: ClusterOptions,
    password: String,
    server_version_num: u32,
    postmaster: Option<Child>,
    watchdog: Option<Child>,
}

/// pgbench's rate limit for `tps` offered in all: none for 0 (as fast as its clients go, the
/// host's full rate).
pub fn pgbench_rate(tps: u64) -> Vec<String> {
    if tps == 0 {
        Vec::new()
    } else {
        vec!["-R".into(), tps.to_string()]
    }
}

/// The `synchronous_commit` a benchmark's clusters run with (`SWITCHYARD_BENCH_SYNC_COMMIT`,
/// `on` unless it says `off`), for its report.
pub fn bench_sync_commit() -> &'static str {
    match std::env::var("SWITCHYARD_BENCH_SYNC_COMMIT").as_deref() {
        Ok("off") => "off",
        _ => "on",
    }
}

impl PgCluster {
    /// Starts a cluster with [`ClusterOptions::default`].
    pub fn start() -> Result<Self> {
        Self::start_with(ClusterOptions::default())
    }

    /// A cluster for a benchmark: with `SWITCHYARD_BENCH_SYNC_COMMIT=off` in the environment,
    /// `synchronous_commit = off` in its postgresql.conf (as many production clusters run).
    pub fn start_for_bench() -> Result<Self> {
        let mut options = ClusterOptions::default();
        if bench_sync_commit() == "off" {
            options
                .extra_conf
                .push(("synchronous_commit".into(), "off".into()));
        }
        Self::start_with(options)
    }

    /// Runs `initdb` in a fresh temporary directory, configures and starts the
    /// server, and creates the `switchyard` role. Fails with the server log
    /// tail if the server does not come up.
    pub fn start_with(options: ClusterOptions) -> Result<Self> {
        let bindir = pg_bindir()?.to_path_buf();
        let root = tempfile::Builder::new()
            .prefix("switchyard-pg-")
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        let base = root.path().to_path_buf();
        let mut cluster = PgCluster {
            data_dir: base.join("data"),
            socket_dir: base.join("sock"),
            log_path: base.join("postgres.log"),
            root: Some(root),
            bindir,
            port: 0,
            options,
            password: generate_secret(),
            server_version_num: 0,
            postmaster: None,
            watchdog: None,
        };
        // From here on, an early return drops `cluster`, which cleans up.
        cluster.watchdog = Some(spawn_watchdog(&base)?);
        cluster.init()?;
        cluster.start_on_free_port()?;
        cluster.create_roles()?;
        let version = cluster.psql("SHOW server_version_num")?;
        cluster.server_version_num = version
            .parse()
            .with_context(|| format!("parsing server_version_num {version:?}"))?;
        Ok(cluster)
    }

    /// TCP port the server listens on at [`Self::host_tcp`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCP host of the server: always `127.0.0.1`.
    pub fn host_tcp(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Directory holding the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The cluster's data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory of the server binaries in use (`psql`, `pg_recvlogical`, ...).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Server log (stdout and stderr of every start, appended).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// The non-superuser replication role: `switchyard`.
    pub fn replication_user(&self) -> &'static str {
        REPLICATION_USER
    }

    /// Password of [`Self::replication_user`]. It is always set, but only
    /// checked on TCP when the cluster uses scram.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// CA certificate (PEM) that signed the server certificate, for clients
    /// to trust. Panics if the cluster was started without `ssl`.
    pub fn ca_cert_path(&self) -> PathBuf {
        assert!(
            self.options.ssl,
            "ca_cert_path: cluster started without ssl"
        );
        self.data_dir.join("ca.crt")
    }

    /// libpq-style connection string for the replication user over TCP, e.g.
    /// `host=127.0.0.1 port=54321 user=switchyard password=... dbname=postgres`.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={} password={} dbname={}",
            self.host_tcp(),
            self.port,
            REPLICATION_USER,
            self.password,
            dbname
        )
    }

    /// `server_version_num` of the running server, e.g. 150010.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Superuser `postgres` connected to database `postgres` over the unix
    /// socket. The connection task is spawned on the current tokio runtime.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        self.client_db("postgres").await
    }

    /// Superuser `postgres` connected to `db` over the unix socket.
    pub async fn client_db(&self, db: &str) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .application_name("switchyard-test-harness")
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to database {db:?} on port {}", self.port))?;
        tokio::spawn(async move {
            // Ends with an error when the server goes away, which crash tests
            // do on purpose: nothing to report then.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Runs a SQL script with this cluster's `psql` as superuser `postgres`
    /// over the unix socket (`-X -q -At -v ON_ERROR_STOP=1`), one statement
    /// at a time as psql does for files. Returns the trimmed query output
    /// (rows as `a|b`, no command tags); the error carries psql's stderr.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let socket = self.socket_dir.display();
        let conninfo = format!(
            "host={socket} port={} user=postgres dbname=postgres",
            self.port
        );
        self.psql_with(&conninfo, sql)
    }

    /// Like [`Self::psql`] with any libpq connection string, e.g.
    /// `format!("{} replication=database", pg.conninfo("postgres"))`.
    pub fn psql_with(&self, conninfo: &str, sql: &str) -> Result<String> {
        let mut child = self
            .command("psql")
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                conninfo,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning psql")?;
        let mut stdin = child.stdin.take().expect("psql stdin is piped");
        // A failed write shows up as a psql error below (it read no script).
        let _ = stdin.write_all(sql.as_bytes());
        drop(stdin);
        let output = child.wait_with_output().context("waiting for psql")?;
        if !output.status.success() {
            bail!(
                "psql failed ({}) running {sql:?}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Creates database `name` and grants the replication user CREATE on it
    /// (as on `postgres`).
    pub fn create_database(&self, name: &str) -> Result<()> {
        let ident = quote_ident(name);
        self.psql(&format!(
            "CREATE DATABASE {ident};\nGRANT CREATE ON DATABASE {ident} TO {REPLICATION_USER};"
        ))?;
        Ok(())
    }

    /// Whether the postmaster this harness started is still alive (a dead,
    /// not yet reaped postmaster is a zombie: not alive).
    pub fn is_running(&self) -> bool {
        self.postmaster
            .as_ref()
            .is_some_and(|child| process_alive(child.id()))
    }

    /// PID of the running postmaster.
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    /// CPU seconds (user + system) the whole cluster has used so far: the postmaster, its
    /// reaped children (backends that ended, counted by the kernel into the postmaster's
    /// `cutime`/`cstime`) and its live children. The difference over a phase is what the
    /// cluster's processes spent on it, whoever was waiting for whom.
    pub fn cpu_seconds(&self) -> f64 {
        let Some(pid) = self.postmaster_pid() else {
            return 0.0;
        };
        // A child reaped between reading the postmaster and listing its children would be
        // counted in neither, and in full at the next reading: read again until the
        // postmaster's figure held still around the listing.
        let mut ticks = 0;
        for _ in 0..5 {
            let own = proc_cpu_ticks(pid, true);
            let children: u64 = child_pids(pid)
                .into_iter()
                .map(|c| proc_cpu_ticks(c, false))
                .sum();
            ticks = own + children;
            if proc_cpu_ticks(pid, true) == own {
                break;
            }
        }
        // Clock ticks are 100 per second on Linux.
        ticks as f64 / 100.0
    }

    /// Simulates a crash: SIGKILLs every child of the postmaster and the
    /// postmaster itself, and waits until all of them are gone, so that
    /// [`Self::restart`] runs crash recovery. No-op when not running.
    pub fn kill9(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            return;
        };
        let pid = postmaster.id();
        if matches!(postmaster.try_wait(), Ok(Some(_))) {
            return;
        }
        // Freeze the postmaster so it cannot fork new children meanwhile.
        signal(pid, "STOP");
        let children = child_pids(pid);
        for child in &children {
            signal(*child, "KILL");
        }
        let _ = postmaster.kill();
        let _ = postmaster.wait();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while children.iter().any(|&c| process_alive(c)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Fast shutdown (SIGINT) and wait for the postmaster to exit; SIGKILL if
    /// it takes longer than 15 s. No-op when not running.
    pub fn stop(&mut self) {
        let Some(postmaster) = self.postmaster.as_mut() else {
            return;
        };
        if matches!(postmaster.try_wait(), Ok(None)) {
            signal(postmaster.id(), "INT");
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(postmaster.try_wait(), Ok(None)) {
                if Instant::now() >= deadline {
                    eprintln!("postgres on port {} ignored SIGINT, killing it", self.port);
                    self.kill9();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.postmaster = None;
    }

    /// Starts the server again on the same port and data dir (stopping it
    /// first if it runs) and waits until it accepts connections; after
    /// [`Self::kill9`] this includes crash recovery.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        // The port was ours a moment ago; give a racing process a few chances
        // to let go of it rather than fail at once.
        let mut attempt = 1;
        loop {
            match self.spawn_and_wait() {
                Err(StartError::PortInUse(_)) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                result => return result.map_err(StartError::into_anyhow),
            }
        }
    }

    /// Last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A command for one of the cluster's binaries, run in the temporary
    /// directory without inherited `PG*` variables (so a developer's
    /// `PGHOST`, `PGSSLMODE`, ... cannot leak into tests).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bindir.join(program));
        command.current_dir(self.base_dir());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command
    }

    /// Like [`Self::command`], as the OS user `postgres` when we are root.
    fn server_command(&self, program: &str) -> Result<Command> {
        let mut command = self.command(program);
        if let Some(owner) = server_owner()? {
            command.uid(owner.uid).gid(owner.gid);
            command.env("HOME", self.base_dir()).env("USER", "postgres");
        }
        Ok(command)
    }

    fn base_dir(&self) -> &Path {
        self.data_dir
            .parent()
            .expect("data dir is inside the temporary directory")
    }

    fn init(&self) -> Result<()> {
        let socket_len = self.socket_dir.as_os_str().len();
        if socket_len > MAX_SOCKET_DIR_LEN {
            bail!(
                "socket dir {} is too long for a unix socket path: set TMPDIR to a shorter directory",
                self.socket_dir.display()
            );
        }
        fs::create_dir(&self.socket_dir).context("creating the socket dir")?;
        chown_to_server(self.base_dir())?;
        chown_to_server(&self.socket_dir)?;

        let output = self
            .server_command("initdb")?
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "--auth-local=trust",
                "--auth-host=trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .context("spawning initdb")?;
        check_output("initdb", &output).with_context(|| {
            format!(
                "initdb into {} failed (the user running postgres must be able to reach TMPDIR)",
                self.data_dir.display()
            )
        })?;

        if self.options.ssl {
            self.write_certificates()?;
        }
        self.write_config()?;
        self.write_hba()
    }

    fn write_config(&self) -> Result<()> {
        let o = &self.options;
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), self.host_tcp().into()),
            (
                "unix_socket_directories".into(),
                self.socket_dir.display().to_string(),
            ),
            ("wal_level".into(), "logical".into()),
            ("max_replication_slots".into(), "20".into()),
            ("max_wal_senders".into(), "20".into()),
            ("max_prepared_transactions".into(), "10".into()),
            ("fsync".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
        ];
        if let Some(kb) = o.logical_decoding_work_mem_kb {
            settings.push(("logical_decoding_work_mem".into(), format!("{kb}kB")));
        }
        if let Some(timeout) = o.wal_sender_timeout {
            settings.push((
                "wal_sender_timeout".into(),
                format!("{}ms", timeout.as_millis()),
            ));
        }
        if o.scram {
            settings.push(("password_encryption".into(), "scram-sha-256".into()));
        }
        if o.ssl {
            settings.push(("ssl".into(), "on".into()));
            settings.push(("ssl_cert_file".into(), "server.crt".into()));
            settings.push(("ssl_key_file".into(), "server.key".into()));
        }
        settings.extend(o.extra_conf.iter().cloned());

        let mut conf = String::from("\n# Added by the switchyard test harness.\n");
        for (name, value) in &settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let path = self.data_dir.join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.write_all(conf.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Unix socket: trust, for the superuser. TCP at 127.0.0.1: trust or
    /// scram, TLS-only with `require_ssl`. `all` does not match replication
    /// connections, hence a `replication` line next to each `all` line.
    fn write_hba(&self) -> Result<()> {
        let o = &self.options;
        let method = if o.scram { "scram-sha-256" } else { "trust" };
        let tls_only = o.ssl && o.require_ssl;
        let tcp = if tls_only { "hostssl" } else { "host" };
        let mut hba = String::from("# Written by the switchyard test harness.\n");
        for database in ["all", "replication"] {
            hba.push_str(&format!(
                "local     {database:<12} all                 trust\n"
            ));
        }
        for database in ["all", "replication"] {
            hba.push_str(&format!(
                "{tcp:<9} {database:<12} all  127.0.0.1/32   {method}\n"
            ));
        }
        if tls_only {
            for database in ["all", "replication"] {
                hba.push_str(&format!(
                    "hostnossl {database:<12} all  0.0.0.0/0      reject\n"
                ));
            }
        }
        write_server_file(&self.data_dir.join("pg_hba.conf"), hba.as_bytes(), 0o600)
    }

    /// A CA and a server certificate it signed, for `localhost` and
    /// `127.0.0.1`, written into the data dir.
    fn write_certificates(&self) -> Result<()> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;

        let server_key = KeyPair::generate()?;
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &ca_cert, &ca_key)?;

        let dir = &self.data_dir;
        write_server_file(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), 0o644)?;
        write_server_file(&dir.join("server.crt"), server_cert.pem().as_bytes(), 0o600)?;
        write_server_file(
            &dir.join("server.key"),
            server_key.serialize_pem().as_bytes(),
            0o600,
        )
    }

    fn start_on_free_port(&mut self) -> Result<()> {
        let mut attempt = 1;
        loop {
            self.port = pick_free_port()?;
            match self.spawn_and_wait() {
                Err(StartError::PortInUse(_)) if attempt < PORT_ATTEMPTS => attempt += 1,
                result => return result.map_err(StartError::into_anyhow),
            }
        }
    }

    /// Spawns the postmaster on `self.port` and waits until it reports
    /// `ready` in postmaster.pid.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let mut command = self.server_command("postgres")?;
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let log_start = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        let child = command.spawn().context("spawning postgres")?;
        let pid = child.id();
        self.postmaster = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = match self.postmaster.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => None,
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                None => Some("vanished".to_string()),
            };
            if let Some(status) = exited {
                self.postmaster = None;
                let new_log = fs::read(&self.log_path).unwrap_or_default();
                let new_log =
                    String::from_utf8_lossy(new_log.get(log_start as usize..).unwrap_or_default());
                let message = format!(
                    "postgres on port {} exited during startup ({status}); log tail:\n{}",
                    self.port,
                    self.log_tail(30)
                );
                return Err(if new_log.contains("could not bind") {
                    StartError::PortInUse(message)
                } else {
                    StartError::Other(anyhow!(message))
                });
            }
            if self.postmaster_ready(pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(StartError::Other(anyhow!(
                    "postgres on port {} not ready after {START_TIMEOUT:?}; log tail:\n{}",
                    self.port,
                    self.log_tail(30)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether postmaster.pid names `pid` and says `ready` (what `pg_ctl -w`
    /// checks). A stale file left by a killed server names another PID.
    fn postmaster_ready(&self, pid: u32) -> bool {
        let Ok(contents) = fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = contents.lines().collect();
        lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str())
            && lines.get(7).map(|l| l.trim()) == Some("ready")
    }

    fn create_roles(&self) -> Result<()> {
        self.psql(&format!(
            "CREATE ROLE {REPLICATION_USER} LOGIN REPLICATION PASSWORD '{}';\n\
             GRANT CREATE ON DATABASE postgres TO {REPLICATION_USER};",
            self.password
        ))?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() && self.log_path.exists() {
            eprintln!(
                "--- server log tail of postgres on port {} ({}):\n{}\n---",
                self.port,
                self.log_path.display(),
                self.log_tail(40)
            );
        }
        self.stop();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if std::env::var_os("SWITCHYARD_KEEP_PG").is_some() {
            if let Some(root) = self.root.take() {
                eprintln!("SWITCHYARD_KEEP_PG: keeping {}", root.keep().display());
            }
        }
        // Dropping `root` removes the temporary directory.
    }
}

/// Why a server start failed: a lost race for the port (worth retrying on
/// another port) or anything else.
enum StartError {
    PortInUse(String),
    Other(anyhow::Error),
}

impl StartError {
    fn into_anyhow(self) -> anyhow::Error {
        match self {
            StartError::PortInUse(message) => anyhow!(message),
            StartError::Other(error) => error,
        }
    }
}

impl From<anyhow::Error> for StartError {
    fn from(error: anyhow::Error) -> Self {
        StartError::Other(error)
    }
}

/// SQL that hands every table of `schemas`, and every publication of tables, to a role
/// `app_owner` and makes `switchyard` a member of it: the application owns its tables, and
/// switchyard acts as the owner where a cutover needs it (fence triggers that fire ALWAYS)
/// and to keep the publication's row filters. Run after the tables exist.
pub fn app_owned(schemas: &[&str]) -> String {
    let list = schemas
        .iter()
        .map(|s| format!("'{}'", s.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "DO $do$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_owner') THEN
             CREATE ROLE app_owner NOLOGIN;
           END IF;
         END $do$;
         DO $do$ DECLARE r record; BEGIN
           FOR r IN SELECT c.oid::regclass AS t FROM pg_class c
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname IN ({list}) AND c.relkind IN ('r', 'p') LOOP
             EXECUTE format('ALTER TABLE %s OWNER TO app_owner', r.t);
           END LOOP;
         END $do$;
         GRANT app_owner TO switchyard;
         DO $do$ DECLARE p record; BEGIN
           EXECUTE format('GRANT CREATE ON DATABASE %I TO app_owner', current_database());
           FOR p IN SELECT pubname FROM pg_publication WHERE NOT puballtables LOOP
             EXECUTE format('ALTER PUBLICATION %I OWNER TO app_owner', p.pubname);
           END LOOP;
         END $do$;"
    )
}

/// Polls `condition` every 50 ms until it returns `Ok(Some(value))` and
/// returns that value. An `Err` from `condition` ends the wait at once with
/// that error; not being met within `timeout` is an error naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, condition()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => {}
            Ok(Err(error)) => return Err(error.context(format!("while waiting for {what}"))),
            Err(_) => break,
        }
        if tokio::time::Instant::now() + POLL_INTERVAL > deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Waits until `sql` (with `params`) returns at least one row on `client`.
pub async fn wait_for_row(
    client: &tokio_postgres::Client,
    what: &str,
    timeout: Duration,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<()> {
    wait_for(what, timeout, || async {
        Ok(client.query_opt(sql, params).await?.map(|_| ()))
    })
    .await
}

/// Directory of the PostgreSQL server binaries; see the module docs.
pub fn pg_bindir() -> Result<&'static Path> {
    static BINDIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINDIR
        .get_or_init(|| find_bindir().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow!("{e}"))
}

fn find_bindir() -> Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("SWITCHYARD_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if !has_server(&dir) {
            bail!(
                "SWITCHYARD_PG_BINDIR={} has no initdb and postgres",
                dir.display()
            );
        }
        return Ok(dir);
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!(
            "no PostgreSQL server binaries: install the postgresql package \
             or set SWITCHYARD_PG_BINDIR"
        )
    })
}

/// The OS user that owns and runs the servers when we are root.
#[derive(Debug, Clone, Copy)]
struct ServerOwner {
    uid: u32,
    gid: u32,
}

/// `Some(postgres user)` when running as root (initdb and postgres refuse to
/// run as root), `None` when the servers run as ourselves.
fn server_owner() -> Result<Option<ServerOwner>> {
    static OWNER: OnceLock<std::result::Result<Option<ServerOwner>, String>> = OnceLock::new();
    OWNER
        .get_or_init(|| {
            let lookup = || -> Result<Option<ServerOwner>> {
                if id(&["-u"])? != 0 {
                    return Ok(None);
                }
                let uid =
                    id(&["-u", "postgres"]).context("running as root needs an OS user postgres")?;
                let gid = id(&["-g", "postgres"])?;
                Ok(Some(ServerOwner { uid, gid }))
            };
            lookup().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!("{e}"))
}

fn id(args: &[&str]) -> Result<u32> {
    let output = Command::new("id")
        .args(args)
        .output()
        .context("running id")?;
    check_output("id", &output)?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("parsing `id {}` output {text:?}", args.join(" ")))
}

fn chown_to_server(path: &Path) -> Result<()> {
    if let Some(owner) = server_owner()? {
        std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
            .with_context(|| format!("chown postgres {}", path.display()))?;
    }
    Ok(())
}

/// Writes a file the server reads, owned by the server's user, with `mode`.
fn write_server_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    chown_to_server(path)
}

fn check_output(what: &str, output: &Output) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    )
}

/// A port that was free a moment ago and that no other cluster of this
/// process got. Never 5432. Another process may still grab it before the
/// server binds: callers retry on "could not bind".
fn pick_free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("binding 127.0.0.1:0 to find a free port")?
            .port();
        if port != 5432 && handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!("found no free TCP port")
}

/// A random hex string, good enough for test passwords (no `rand` needed:
/// `RandomState` is randomly seeded).
fn generate_secret() -> String {
    (0..2)
        .map(|_| format!("{:016x}", RandomState::new().build_hasher().finish()))
        .collect()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Sends `SIG<name>` to `pid` with kill(1); errors (already gone) are ignored.
fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// PIDs whose parent is `pid`, from /proc.
fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| proc_stat(candidate).is_some_and(|(_, ppid)| ppid == pid))
        .collect()
}

/// Whether `pid` exists and is not a zombie (a zombie holds no resources).
fn process_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// utime + stime of `pid` in clock ticks (100 a second on Linux), plus cutime + cstime (its
/// reaped children) when `reaped`; 0 for a process that is gone.
pub fn proc_cpu_ticks(pid: u32, reaped: bool) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(end) = stat.rfind(')') else {
        return 0;
    };
    // After "(comm)": state, ppid, …; utime, stime, cutime, cstime are the 12th–15th.
    let fields: Vec<u64> = stat[end + 1..]
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let take = if reaped { 4 } else { 2 };
    fields.iter().take(take).sum()
}

/// State and parent PID of `pid` from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (comm) STATE PPID ...": comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Cleans up after a test process that died without running `Drop`: once our
/// PID is gone, it shuts down the cluster's postmaster (immediate shutdown,
/// then SIGKILL) and removes the temporary directory. It runs in its own
/// process group so a Ctrl-C aimed at the tests does not kill it too. `Drop`
/// kills it after cleaning up itself.
fn spawn_watchdog(base: &Path) -> Result<Child> {
    const SCRIPT: &str = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        pid=$(head -n 1 "$2/data/postmaster.pid" 2>/dev/null)
        if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
            kill -QUIT "$pid"
            i=0
            while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
            kill -KILL "$pid" 2>/dev/null
        fi
        rm -rf "$2"
    "#;
    Command::new("sh")
        .args(["-c", SCRIPT, "switchyard-pg-watchdog"])
        .arg(std::process::id().to_string())
        .arg(base)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("spawning the cluster watchdog")
}
