//! The replication connection, spoken directly on `postgres-protocol` frames.
//!
//! ```text
//!  connect ─► [SSLRequest ─► TLS] ─► StartupMessage(replication=database)
//!          ─► auth (trust | cleartext | md5 | SCRAM-SHA-256[-PLUS]) ─► ReadyForQuery
//!          ─► simple queries (IDENTIFY_SYSTEM …) ─► START_REPLICATION ─► CopyBoth
//! ```
//!
//! Invariants:
//! - Every read goes through `fill`, which only appends to the buffer: dropping a pending
//!   read (e.g. in `select!`) loses no bytes, so the caller may race it against timers.
//! - Frames are size-capped before any allocation (see [`super::wire`]).
//! - The password is used only to answer the server's challenge; it is never logged.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::{self, AuthRequest, CopyMessage, Frame};
use super::SourceError;
use crate::cluster::{tls, Endpoint, SslMode};
use crate::lsn::Lsn;
use crate::sql::{quote_ident, quote_literal};

const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What IDENTIFY_SYSTEM reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub dbname: Option<String>,
}

/// Options for START_REPLICATION … LOGICAL with pgoutput.
#[derive(Clone, Debug)]
pub struct StartOptions {
    pub slot: String,
    pub publications: Vec<String>,
    pub start: Lsn,
    pub proto_version: u32,
    pub streaming: bool,
    pub messages: bool,
}

impl StartOptions {
    /// The START_REPLICATION command text. Slot and publication names are quoted as
    /// identifiers; the publication list is additionally a string literal because
    /// pgoutput re-parses it as a comma-separated identifier list.
    pub fn command(&self) -> String {
        let pubs = self
            .publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let mut opts = vec![
            format!("proto_version '{}'", self.proto_version),
            format!("publication_names {}", quote_literal(&pubs)),
        ];
        if self.messages {
            opts.push("messages 'true'".into());
        }
        if self.streaming && self.proto_version >= 2 {
            opts.push("streaming 'on'".into());
        }
        format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(&self.slot),
            self.start,
            opts.join(", ")
        )
    }
}

/// One physical connection in replication mode.
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    buf: BytesMut,
    max_message_bytes: usize,
    server_version_num: u32,
    tls: bool,
}

impl ReplicationConnection {
    /// Connects, negotiates TLS per `sslmode`, starts up in `replication=database` mode and
    /// authenticates. Waits until the server is ready for queries.
    pub async fn connect(
        endpoint: &Endpoint,
        max_message_bytes: usize,
    ) -> Result<Self, SourceError> {
        tokio::time::timeout(
            endpoint.connect_timeout,
            Self::connect_inner(endpoint, max_message_bytes),
        )
        .await
        .map_err(|_| SourceError::Timeout {
            what: format!("connecting to {}", endpoint.describe()),
            after: endpoint.connect_timeout,
        })?
    }

    async fn connect_inner(
        endpoint: &Endpoint,
        max_message_bytes: usize,
    ) -> Result<Self, SourceError> {
        let io_err = |context: &str| {
            let context = format!("{context} {}", endpoint.describe());
            move |source| SourceError::Io { context, source }
        };
        let (io, tls_cert): (Box<dyn Io>, Option<Vec<u8>>) = if endpoint.is_unix_socket() {
            let path = format!("{}/.s.PGSQL.{}", endpoint.host, endpoint.port);
            let s = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(io_err("connecting to"))?;
            (Box::new(s), None)
        } else {
            let mut s = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
                .await
                .map_err(io_err("connecting to"))?;
            let _ = s.set_nodelay(true);
            match tls::client_config(endpoint.sslmode, endpoint.sslrootcert.as_deref())
                .map_err(|e| SourceError::Tls(e.to_string()))?
            {
                None => (Box::new(s), None),
                Some(config) => {
                    let mut req = BytesMut::new();
                    frontend::ssl_request(&mut req);
                    s.write_all(&req)
                        .await
                        .map_err(io_err("sending SSLRequest to"))?;
                    let mut answer = [0u8; 1];
                    s.read_exact(&mut answer)
                        .await
                        .map_err(io_err("reading SSLRequest answer from"))?;
                    match answer[0] {
                        b'S' => {
                            let name =
                                rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                                    .map_err(|e| {
                                        SourceError::Tls(format!(
                                            "bad host name {:?}: {e}",
                                            endpoint.host
                                        ))
                                    })?;
                            let connector =
                                tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
                            let tls = connector.connect(name, s).await.map_err(|e| {
                                SourceError::Tls(format!(
                                    "handshake with {} failed: {e}",
                                    endpoint.describe()
                                ))
                            })?;
                            let cert = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| c.as_ref().to_vec());
                            (Box::new(tls), cert)
                        }
                        b'N' if endpoint.sslmode == SslMode::Prefer => (Box::new(s), None),
                        b'N' => {
                            return Err(SourceError::Tls(format!(
                                "server {} does not support TLS but sslmode is {:?}",
                                endpoint.describe(),
                                endpoint.sslmode
                            )))
                        }
                        other => {
                            return Err(SourceError::Protocol(format!(
                                "unexpected answer {other:#04x} to SSLRequest"
                            )))
                        }
                    }
                }
            }
        };
        let mut conn = ReplicationConnection {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            max_message_bytes,
            server_version_num: 0,
            tls: tls_cert.is_some(),
        };
        conn.startup(endpoint, tls_cert.as_deref()).await?;
        Ok(conn)
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `server_version_num` as reported at startup (e.g. 150020).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// The highest pgoutput protocol version this server speaks.
    pub fn max_proto_version(&self) -> u32 {
        match self.server_version_num / 10000 {
            v if v >= 16 => 4,
            15 => 3,
            14 => 2,
            _ => 1,
        }
    }

    async fn startup(
        &mut self,
        endpoint: &Endpoint,
        tls_cert: Option<&[u8]>,
    ) -> Result<(), SourceError> {
        let mut out = BytesMut::new();
        let params = [
            ("user", endpoint.user.as_str()),
            ("database", endpoint.dbname.as_str()),
            ("replication", "database"),
            ("application_name", endpoint.application_name.as_str()),
            ("client_encoding", "UTF8"),
            // pgoutput renders values with the walsender's settings: pin them so text is
            // unambiguous and re-parseable anywhere (no local time zones, exact floats).
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO, YMD"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
        ];
        frontend::startup_message(params.iter().copied(), &mut out)
            .map_err(|e| SourceError::Protocol(format!("cannot encode startup message: {e}")))?;
        self.send(&out).await?;
        let password = || {
            endpoint.password.as_ref().ok_or_else(|| {
                SourceError::Auth(format!(
                    "server {} asks for a password but none is configured (source.password_env or password_file)",
                    endpoint.describe()
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        let mut scram_verified = false;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'R' => match wire::parse_auth(&frame.body)? {
                    // A server that started SCRAM must prove it knows the password (its
                    // signature) before it may say the client is in: a man in the middle
                    // would otherwise just answer Ok.
                    AuthRequest::Ok if scram.is_some() && !scram_verified => {
                        return Err(SourceError::Auth(format!(
                            "server {} ended the SCRAM exchange without its signature; refusing the connection",
                            endpoint.describe()
                        )));
                    }
                    AuthRequest::Ok => {}
                    AuthRequest::Cleartext
                        if !self.tls && !endpoint.is_unix_socket() && !endpoint.allow_cleartext_password =>
                    {
                        return Err(SourceError::Auth(format!(
                            "server {} asks for the password in clear text over a connection without TLS; refused (use sslmode require or stronger, scram-sha-256 in pg_hba.conf, or set allow_cleartext_password = true)",
                            endpoint.describe()
                        )));
                    }
                    AuthRequest::Cleartext => {
                        let mut out = BytesMut::new();
                        frontend::password_message(password()?.expose().as_bytes(), &mut out)
                            .map_err(|e| SourceError::Auth(e.to_string()))?;
                        self.send(&out).await?;
                    }
                    AuthRequest::Md5 { salt } => {
                        let hashed = postgres_protocol::authentication::md5_hash(
                            endpoint.user.as_bytes(),
                            password()?.expose().as_bytes(),
                            salt,
                        );
                        let mut out = BytesMut::new();
                        frontend::password_message(hashed.as_bytes(), &mut out)
                            .map_err(|e| SourceError::Auth(e.to_string()))?;
                        self.send(&out).await?;
                    }
                    AuthRequest::Sasl { mechanisms } => {
                        let pw = password()?.expose().as_bytes().to_vec();
                        let plus = mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                        let (mechanism, binding) = match (plus, tls_cert) {
                            (true, Some(cert)) => (
                                SCRAM_SHA_256_PLUS,
                                ChannelBinding::tls_server_end_point(tls::server_end_point(cert)),
                            ),
                            // Over TLS without PLUS on offer, 'y' tells the server we could
                            // have bound the channel, so a stripped PLUS is detected.
                            (false, Some(_)) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                            _ => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        };
                        if !mechanisms.iter().any(|m| m == mechanism) {
                            return Err(SourceError::Auth(format!(
                                "server offers SASL mechanisms {mechanisms:?}; switchyard supports SCRAM-SHA-256[-PLUS]"
                            )));
                        }
                        let s = ScramSha256::new(&pw, binding);
                        let mut out = BytesMut::new();
                        frontend::sasl_initial_response(mechanism, s.message(), &mut out)
                            .map_err(|e| SourceError::Auth(e.to_string()))?;
                        self.send(&out).await?;
                        scram = Some(s);
                    }
                    AuthRequest::SaslContinue(data) => {
                        let s = scram.as_mut().ok_or_else(|| {
                            SourceError::Protocol("SASL continue without SASL start".into())
                        })?;
                        s.update(&data)
                            .map_err(|e| SourceError::Auth(format!("SCRAM exchange failed: {e}")))?;
                        let mut out = BytesMut::new();
                        frontend::sasl_response(s.message(), &mut out)
                            .map_err(|e| SourceError::Auth(e.to_string()))?;
                        self.send(&out).await?;
                    }
                    AuthRequest::SaslFinal(data) => {
                        let s = scram.as_mut().ok_or_else(|| {
                            SourceError::Protocol("SASL final without SASL start".into())
                        })?;
                        // Verifying the server signature proves the server knows the
                        // password too; without it a man in the middle could fake success.
                        s.finish(&data).map_err(|e| {
                            SourceError::Auth(format!("server SCRAM signature invalid: {e}"))
                        })?;
                        scram_verified = true;
                    }
                    AuthRequest::Other(code) => {
                        return Err(SourceError::Auth(format!(
                            "server requests authentication method {code}, which switchyard does not support (use scram-sha-256, md5 or password)"
                        )))
                    }
                },
                b'S' => self.parameter_status(&frame.body),
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(self.server_error("authenticating", &frame.body)),
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        char::from(other)
                    )))
                }
            }
        }
    }

    fn parameter_status(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        if let (Some(name), Some(value)) = (parts.next(), parts.next()) {
            if name == b"server_version" {
                self.server_version_num = parse_server_version(&String::from_utf8_lossy(value));
            }
        }
    }

    fn server_error(&self, context: &str, body: &[u8]) -> SourceError {
        match wire::parse_notice(body) {
            Ok(notice) => SourceError::Server {
                context: context.to_owned(),
                notice: Box::new(notice),
            },
            Err(e) => e.into(),
        }
    }

    /// Runs a replication command or simple query; returns its data rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)
            .map_err(|e| SourceError::Protocol(format!("cannot encode query: {e}")))?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'D' => rows.push(wire::parse_data_row(&frame.body)?),
                b'E' => error = Some(self.server_error(sql_head(sql), &frame.body)),
                b'Z' => break,
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected message {:?} answering a query",
                        char::from(other)
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, SourceError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 4)
            .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten();
        let system_id = field(0).ok_or_else(|| SourceError::Protocol("no systemid".into()))?;
        let timeline = field(1)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| SourceError::Protocol("bad timeline in IDENTIFY_SYSTEM".into()))?;
        let xlog_pos = field(2)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| SourceError::Protocol("bad xlogpos in IDENTIFY_SYSTEM".into()))?;
        Ok(SystemInfo {
            system_id,
            timeline,
            xlog_pos,
            dbname: field(3),
        })
    }

    /// Sends START_REPLICATION and waits for CopyBoth.
    pub async fn start_replication(&mut self, opts: &StartOptions) -> Result<(), SourceError> {
        let mut out = BytesMut::new();
        frontend::query(&opts.command(), &mut out)
            .map_err(|e| SourceError::Protocol(format!("cannot encode START_REPLICATION: {e}")))?;
        self.send(&out).await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let err = self.server_error("START_REPLICATION", &frame.body);
                    return Err(err.for_slot(&opts.slot));
                }
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected message {:?} answering START_REPLICATION",
                        char::from(other)
                    )))
                }
            }
        }
    }

    /// Reads more bytes into the buffer. Cancellation safe: bytes are only appended.
    pub async fn fill(&mut self) -> Result<(), SourceError> {
        if self.buf.capacity() - self.buf.len() < 8192 {
            self.buf.reserve(64 * 1024);
        }
        let n = self
            .io
            .read_buf(&mut self.buf)
            .await
            .map_err(|source| SourceError::Io {
                context: "reading from the replication connection".into(),
                source,
            })?;
        if n == 0 {
            return Err(SourceError::Closed);
        }
        Ok(())
    }

    /// A complete frame already in the buffer, if any.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        Ok(wire::try_frame(&mut self.buf, self.max_message_bytes)?)
    }

    async fn read_frame(&mut self) -> Result<Frame, SourceError> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Interprets a frame received in CopyBoth mode.
    pub fn copy_message(&self, frame: Frame) -> Result<Option<CopyMessage>, SourceError> {
        match frame.tag {
            b'd' => Ok(Some(wire::parse_copy_data(frame.body)?)),
            b'N' => {
                if let Ok(n) = wire::parse_notice(&frame.body) {
                    tracing::info!(notice = %n, "server notice on replication connection");
                }
                Ok(None)
            }
            b'E' => Err(self.server_error("replication stream", &frame.body)),
            // The server ended the stream: CopyDone, or (seen at a fast shutdown of the
            // source) CommandComplete / ReadyForQuery with no CopyDone read first. Either way
            // nothing more comes on this connection; reconnecting resumes where we are.
            b'c' | b'C' | b'Z' => Err(SourceError::Closed),
            other => Err(SourceError::Protocol(format!(
                "unexpected message {:?} in replication stream",
                char::from(other)
            ))),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SourceError> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|source| SourceError::Io {
                context: "writing to the replication connection".into(),
                source,
            })?;
        self.io.flush().await.map_err(|source| SourceError::Io {
            context: "flushing the replication connection".into(),
            source,
        })
    }

    /// Sends a CopyData message (e.g. a standby status update).
    pub async fn send_copy_data(&mut self, payload: Bytes) -> Result<(), SourceError> {
        let mut out = BytesMut::with_capacity(payload.len() + 5);
        frontend::CopyData::new(payload)
            .map_err(|e| SourceError::Protocol(format!("cannot encode CopyData: {e}")))?
            .write(&mut out);
        self.send(&out).await
    }

    /// Best-effort polite goodbye: CopyDone then Terminate, with a short time bound.
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::copy_done(&mut out);
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.send(&out)).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }
}

fn sql_head(sql: &str) -> &str {
    let end = sql.find([' ', '\n']).unwrap_or(sql.len());
    &sql[..end]
}

/// "15.4 (Debian 15.4-1)" → 150004; "9.6.2" → 90602. Unknown → 0 (treated as oldest).
fn parse_server_version(text: &str) -> u32 {
    let num = text
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap_or("");
    let mut parts = num.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10000 + minor
    } else {
        major * 10000 + minor * 100 + parts.next().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.20 (Debian 15.20-0+deb12u1)"),
            150020
        );
        assert_eq!(parse_server_version("16beta1"), 160000);
        assert_eq!(parse_server_version("9.6.2"), 90602);
        assert_eq!(parse_server_version("garbage"), 0);
    }

    #[test]
    fn start_command_quotes_names() {
        let opts = StartOptions {
            slot: "s1".into(),
            publications: vec!["pub".into(), "we'ird\"pub".into()],
            start: Lsn(0x1_0000_0010),
            proto_version: 3,
            streaming: true,
            messages: true,
        };
        assert_eq!(
            opts.command(),
            "START_REPLICATION SLOT \"s1\" LOGICAL 1/10 (proto_version '3', \
             publication_names '\"pub\",\"we''ird\"\"pub\"', messages 'true', streaming 'on')"
        );
        let v1 = StartOptions {
            proto_version: 1,
            ..opts
        };
        assert!(!v1.command().contains("streaming"));
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn endpoint(port: u16) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
            user: "u".into(),
            dbname: "d".into(),
            password: Some(crate::cluster::Secret::new("pw")),
            sslmode: SslMode::Disable,
            sslrootcert: None,
            application_name: "switchyard".into(),
            connect_timeout: std::time::Duration::from_secs(5),
            allow_cleartext_password: false,
        }
    }

    /// An authentication request frame: 'R', length, code, payload.
    fn auth(code: i32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b'R'];
        f.extend_from_slice(&((8 + payload.len()) as i32).to_be_bytes());
        f.extend_from_slice(&code.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Reads one frontend message after the startup packet: (tag, body).
    async fn read_message(s: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
        let tag = s.read_u8().await.ok()?;
        let len = s.read_i32().await.ok()? as usize;
        let mut body = vec![0; len.saturating_sub(4)];
        s.read_exact(&mut body).await.ok()?;
        Some((tag, body))
    }

    async fn skip_startup(s: &mut tokio::net::TcpStream) {
        let len = s.read_i32().await.unwrap() as usize;
        let mut rest = vec![0; len - 4];
        s.read_exact(&mut rest).await.unwrap();
    }

    /// A hostile server (a man in the middle) that begins SCRAM, then says "authenticated"
    /// without ever proving it knows the password: refused.
    #[tokio::test]
    async fn a_scram_exchange_without_the_servers_signature_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            skip_startup(&mut s).await;
            s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await.unwrap();
            let (_, body) = read_message(&mut s).await.unwrap();
            // client-first-message: "n,,n=,r=<nonce>" after the mechanism and a length.
            let text = String::from_utf8_lossy(&body).to_string();
            let nonce = text
                .split("r=")
                .nth(1)
                .unwrap()
                .trim_end_matches('\0')
                .to_owned();
            let first = format!("r={nonce}evil,s=c2FsdHNhbHQ=,i=4096");
            s.write_all(&auth(11, first.as_bytes())).await.unwrap();
            let _ = read_message(&mut s).await;
            // No SASLFinal: straight to AuthenticationOk, then ready.
            s.write_all(&auth(0, b"")).await.unwrap();
            s.write_all(&[b'Z', 0, 0, 0, 5, b'I']).await.unwrap();
            let _ = read_message(&mut s).await;
        });
        let err = ReplicationConnection::connect(&endpoint(port), 1 << 20)
            .await
            .err()
            .expect("the connection must be refused");
        assert!(err.to_string().contains("without its signature"), "{err}");
        server.abort();
    }

    /// A server that asks for the password in clear text over a connection without TLS
    /// gets no password (unless allowed explicitly).
    #[tokio::test]
    async fn a_cleartext_password_request_without_tls_gets_no_password() {
        for allowed in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                skip_startup(&mut s).await;
                s.write_all(&auth(3, b"")).await.unwrap();
                let got = read_message(&mut s).await;
                if got.is_some() {
                    s.write_all(&[b'E', 0, 0, 0, 4]).await.ok();
                }
                got.map(|(tag, _)| tag)
            });
            let ep = Endpoint {
                allow_cleartext_password: allowed,
                ..endpoint(port)
            };
            let err = ReplicationConnection::connect(&ep, 1 << 20)
                .await
                .err()
                .expect("fails either way (the server is not real)");
            let sent = server.await.unwrap();
            if allowed {
                assert_eq!(sent, Some(b'p'), "allowed: the password goes");
            } else {
                assert_eq!(sent, None, "the password was sent: {err}");
                assert!(err.to_string().contains("clear text"), "{err}");
            }
        }
    }
}
