//! A PostgreSQL cluster endpoint: where it is, how to authenticate, and SQL sessions to it.
//!
//! Invariants:
//! - The password lives in a [`Secret`] and is never formatted into logs, errors or metrics.
//! - TLS behaviour is the same for SQL sessions and the replication connection
//!   (see [`tls`]); `host` starting with `/` means a unix socket directory, as in libpq.
//! - Every SQL session commits durably: a cluster configured with `synchronous_commit = off`
//!   gets `on` for switchyard's sessions (a stronger setting is kept). An applied position,
//!   a route flip or a fence must survive a crash of the cluster once its commit returned,
//!   because the slot is confirmed and applications are redirected on that basis.

pub mod tls;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A secret value: prints as `***` in every `Debug`/`Display`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// libpq's sslmode values that switchyard supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Connection settings for one cluster (the source, or a named target).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// Send the password in clear text when the server asks for it over a connection
    /// without TLS (off: such a connection is refused before the password leaves).
    pub allow_cleartext_password: bool,
}

impl Endpoint {
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Whether both name the same database of the same server (as configured: a host
    /// name and its IP address count as different).
    pub fn same_database(&self, other: &Endpoint) -> bool {
        self.host == other.host && self.port == other.port && self.dbname == other.dbname
    }

    /// `user@host:port/dbname` for logs and errors: never includes the password.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    /// Opens a SQL session and drives its connection on the runtime.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, ClusterError> {
        self.connect(None).await
    }

    /// A SQL connection whose NOTIFY messages arrive on the returned channel (for LISTEN).
    pub async fn connect_listen(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        ),
        ClusterError,
    > {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Ok((self.connect(Some(tx)).await?, rx))
    }

    async fn connect(
        &self,
        notify: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> Result<tokio_postgres::Client, ClusterError> {
        self.refuse_cleartext().await?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout)
            // A peer that vanished without a reset (host down, partition) is noticed in
            // about a minute on an idle session instead of the kernel's two hours.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        if let Some(pw) = &self.password {
            cfg.password(pw.expose());
        }
        let describe = self.describe();
        let tls = if self.is_unix_socket() {
            None
        } else {
            tls::client_config(self.sslmode, self.sslrootcert.as_deref())?
        };
        let connect_err = |source| ClusterError::Connect {
            endpoint: describe.clone(),
            source,
        };
        let client = match tls {
            None => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, conn) = cfg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(connect_err)?;
                tokio::spawn(drive(conn, describe.clone(), notify));
                client
            }
            Some(config) => {
                cfg.ssl_mode(match self.sslmode {
                    SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                    _ => tokio_postgres::config::SslMode::Require,
                });
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new(config);
                let (client, conn) = cfg.connect(connector).await.map_err(connect_err)?;
                tokio::spawn(drive(conn, describe.clone(), notify));
                client
            }
        };
        durable_commits(&client).await?;
        Ok(client)
    }
}

impl Endpoint {
    /// The SQL driver answers a server's request for a clear-text password whatever the
    /// connection: where this one may run without TLS (`disable`, or `prefer` and a server
    /// without it) over TCP with a password, a probe connection first reads which method the
    /// server asks for (pg_hba.conf decides it by user, database and address, the same for
    /// the real connection) and refuses clear text before any password is sent.
    async fn refuse_cleartext(&self) -> Result<(), ClusterError> {
        if self.is_unix_socket()
            || self.password.is_none()
            || self.allow_cleartext_password
            || !matches!(self.sslmode, SslMode::Disable | SslMode::Prefer)
        {
            return Ok(());
        }
        let probe = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            let mut out = bytes::BytesMut::new();
            if self.sslmode == SslMode::Prefer {
                postgres_protocol::message::frontend::ssl_request(&mut out);
                s.write_all(&out).await?;
                let mut answer = [0u8; 1];
                s.read_exact(&mut answer).await?;
                if answer[0] == b'S' {
                    // TLS on offer: the real connection will use it.
                    return Ok(None);
                }
                out.clear();
            }
            let params = [
                ("user", self.user.as_str()),
                ("database", self.dbname.as_str()),
            ];
            postgres_protocol::message::frontend::startup_message(
                params.iter().copied(),
                &mut out,
            )?;
            s.write_all(&out).await?;
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await?;
            // 'R', length 8, code 3: AuthenticationCleartextPassword.
            Ok::<_, std::io::Error>(Some(head[0] == b'R' && head[5..9] == [0, 0, 0, 3]))
        };
        match tokio::time::timeout(self.connect_timeout, probe).await {
            Ok(Ok(Some(true))) => Err(ClusterError::Insecure(format!(
                "{} asks for the password in clear text over a connection without TLS; refused before sending it (use sslmode require or stronger, scram-sha-256 in pg_hba.conf, or set allow_cleartext_password = true)",
                self.describe()
            ))),
            // Anything else (another method, an error, no answer) is for the real
            // connection to meet and report.
            _ => Ok(()),
        }
    }
}

/// `synchronous_commit = on` for this session where the cluster's setting is `off`. With
/// `off` a commit returns before its WAL is flushed: a target that crashed then would come
/// back without transactions whose positions were already confirmed to the source, and the
/// target's WAL write position would trail the move's last commits (the reverse stream
/// begins after it). `local`, `remote_write` and `remote_apply` are kept: each flushes at
/// least locally.
async fn durable_commits(client: &tokio_postgres::Client) -> Result<(), ClusterError> {
    client
        .batch_execute(
            "SELECT set_config('synchronous_commit', 'on', false) \
              WHERE current_setting('synchronous_commit') = 'off'",
        )
        .await
        .map_err(ClusterError::sql("making the session's commits durable"))
}

async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    endpoint: String,
    notify: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if let Some(tx) = &notify {
                    // The listener may be gone; the connection still serves queries.
                    let _ = tx.send(n);
                }
            }
            Ok(tokio_postgres::AsyncMessage::Notice(n)) => {
                tracing::debug!(%endpoint, notice = %n.message(), "server notice");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%endpoint, %error, "sql connection closed");
                return;
            }
        }
    }
}

/// Errors talking SQL to a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to {endpoint}: {}", describe(.source))]
    Connect {
        endpoint: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The connection would expose the password (see [`Endpoint::allow_cleartext_password`]).
    #[error("{0}")]
    Insecure(String),
    #[error("{context}: {}", describe(.source))]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// SQLSTATEs that may succeed on retry: connection exceptions (08), operator intervention
/// (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now, 57P05 idle session
/// timeout), disk full (53100) and out of memory (53200), which an operator fixes without
/// touching switchyard (until the WAL budget fails the tenant), too many connections (53300),
/// serialization failure (40001), deadlock (40P01) and lock not available (55P03). The one
/// list both the source and the appliers use.
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01"
                | "57P02"
                | "57P03"
                | "57P05"
                | "53100"
                | "53200"
                | "53300"
                | "40001"
                | "40P01"
                | "55P03"
        )
}

/// Runs `sql` with parameters that are all text (the SQL casts them to the column types,
/// so their types are not inferred from the casts). Typed, so it is one round trip: a
/// prepared statement costs a second one, which inside a cutover's pause the tenant waits
/// for.
pub async fn query_text_params(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[Option<String>],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let typed: Vec<(
        &(dyn tokio_postgres::types::ToSql + Sync),
        tokio_postgres::types::Type,
    )> = params
        .iter()
        .map(|p| (p as _, tokio_postgres::types::Type::TEXT))
        .collect();
    client.query_typed(sql, &typed).await
}

/// tokio-postgres prints server errors as just "db error"; operators need the server's own
/// words: severity, SQLSTATE, message, detail and hint.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" (detail: {d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" (hint: {h})"));
            }
            s
        }
        None => {
            // Walk the chain: the I/O or TLS cause is what says what went wrong.
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(c) = cur {
                s.push_str(&format!(": {c}"));
                cur = c.source();
            }
            s
        }
    }
}

impl ClusterError {
    pub fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ClusterError {
        let context = context.into();
        move |source| ClusterError::Sql { context, source }
    }

    /// Worth retrying: no server answer at all (I/O), or a transient SQLSTATE.
    pub fn is_transient(&self) -> bool {
        match self {
            ClusterError::Tls(_) | ClusterError::Insecure(_) => false,
            _ => self.sqlstate().is_none_or(is_transient_sqlstate),
        }
    }

    /// The server's SQLSTATE, when the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ClusterError::Connect { source, .. } | ClusterError::Sql { source, .. } => {
                source.code().map(|c| c.code())
            }
            ClusterError::Tls(_) | ClusterError::Insecure(_) => None,
        }
    }
}

/// Whether this session may see every backend's transaction start and snapshot (superuser
/// or `pg_read_all_stats`); without that, the cutover's wait for transactions older than a fence would miss other roles'.
pub async fn sees_all_sessions(client: &tokio_postgres::Client) -> Result<bool, ClusterError> {
    Ok(client
        .query_one(
            "SELECT pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') \
                    OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(ClusterError::sql("checking the role's rights"))?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        let ep = Endpoint {
            host: "db".into(),
            port: 5432,
            user: "u".into(),
            dbname: "d".into(),
            password: Some(s),
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            application_name: "switchyard".into(),
            connect_timeout: Duration::from_secs(5),
            allow_cleartext_password: false,
        };
        let dbg = format!("{ep:?} {}", ep.describe());
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}
