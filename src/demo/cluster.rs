//! Throwaway local PostgreSQL clusters for the demo.
//!
//! Invariants:
//! - A cluster lives in its own fresh temporary directory (data, socket, log) on a free
//!   loopback port; nothing else on the machine is touched (the machine's own server on
//!   5432 is never used).
//! - Dropping a cluster stops its server (fast shutdown, then SIGKILL) and removes the
//!   directory, on every exit path the process survives (errors, Ctrl-C).
//! - Under root, `initdb` and `postgres` run as the OS user `postgres` (they refuse root),
//!   which then owns the directory.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `SWITCHYARD_PG_BINDIR`, then
/// `PATH`, then `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("SWITCHYARD_PG_BINDIR") {
        let d = PathBuf::from(d);
        if has_server(&d) {
            return Ok(d);
        }
        bail!(
            "SWITCHYARD_PG_BINDIR={} holds no initdb/postgres",
            d.display()
        );
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_server(&d) {
                return Ok(d);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&d) {
            return Ok(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, d)) => Ok(d),
        None => bail!(
            "no PostgreSQL server binaries found (initdb, postgres): install them \
             (Debian/Ubuntu: apt-get install postgresql) or set SWITCHYARD_PG_BINDIR"
        ),
    }
}

/// uid and gid of the OS user `postgres`, read from /etc/passwd.
fn postgres_user() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                return Ok((uid, gid));
            }
        }
    }
    bail!("running as root, and there is no OS user `postgres` to run the server as (PostgreSQL refuses root)")
}

fn is_root() -> bool {
    // The effective uid of this process, without libc: /proc/self/status "Uid: real eff …".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    for _ in 0..20 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if port != 5432 {
            return Ok(port);
        }
    }
    bail!("no free loopback port")
}

pub struct LocalCluster {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    user: Option<(u32, u32)>,
    server: Option<Child>,
}

impl LocalCluster {
    /// initdb + start, `wal_level = logical`, trust auth on loopback and the socket.
    pub fn start(bindir: &Path, parent: &Path, name: &str) -> Result<LocalCluster> {
        let user = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some((uid, gid)) = user {
            let st = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(parent)
                .status()
                .context("chown of the demo directory")?;
            if !st.success() {
                bail!("chown of {} to postgres failed", parent.display());
            }
        }
        let mut c = LocalCluster {
            name: name.to_owned(),
            port: free_port()?,
            dir,
            bindir: bindir.to_owned(),
            user,
            server: None,
        };
        let out = c
            .command("initdb")
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C", "-D"])
            .arg(c.dir.join("data"))
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb for {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let log = std::fs::File::create(c.dir.join("postgres.log"))?;
        let server = c
            .command("postgres")
            .arg("-D")
            .arg(c.dir.join("data"))
            .args(["-c", "wal_level=logical", "-c", "fsync=off"])
            .args(["-c", "max_wal_senders=10", "-c", "max_replication_slots=10"])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("port={}", c.port))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", c.dir.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        c.server = Some(server);
        Ok(c)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    /// Waits until the server accepts connections.
    pub async fn ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(server) = self.server.as_mut() {
                if let Some(status) = server.try_wait()? {
                    bail!(
                        "postgres for {} exited ({status}); log: {}",
                        self.name,
                        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
                    );
                }
            }
            if self.connect("postgres").await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres for {} did not start within 30 s", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A superuser connection over loopback.
    pub async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .application_name("switchyard-demo")
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    fn stop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        let stopped = self
            .command("pg_ctl")
            .args(["-m", "fast", "-w", "-t", "15", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = server.kill();
        }
        let _ = server.wait();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
