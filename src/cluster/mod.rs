//! A PostgreSQL cluster endpoint: where it is, how to authenticate, and SQL sessions to it.
//!
//! Invariants:
//! - The password lives in a [`Secret`] and is never formatted into logs, errors or metrics.
//! - TLS behaviour is the same for SQL sessions and the replication connection
//!   (see [`tls`]); `host` starting with `/` means a unix socket directory, as in libpq.

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
        Ok(client)
    }
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
/// so their types are not inferred from the casts).
pub async fn query_text_params(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[Option<String>],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let statement = client
        .prepare_typed(sql, &vec![tokio_postgres::types::Type::TEXT; params.len()])
        .await?;
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        params.iter().map(|p| p as _).collect();
    client.query(&statement, &refs).await
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
            ClusterError::Tls(_) => false,
            _ => self.sqlstate().is_none_or(is_transient_sqlstate),
        }
    }

    /// The server's SQLSTATE, when the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ClusterError::Connect { source, .. } | ClusterError::Sql { source, .. } => {
                source.code().map(|c| c.code())
            }
            ClusterError::Tls(_) => None,
        }
    }
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
        };
        let dbg = format!("{ep:?} {}", ep.describe());
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}
