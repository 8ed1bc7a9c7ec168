//! Backend message framing for the replication connection.
//!
//! Invariants:
//! - A frame's declared length is checked against the configured cap *before* any buffer
//!   is grown for it, so a hostile or broken peer cannot make us allocate gigabytes.
//! - Parsing is total: a short or malformed message is a [`WireError`], never a panic.
//! - `try_frame` is cancellation safe: it only splits complete frames off the buffer.

use bytes::{Buf, Bytes, BytesMut};

/// Errors in the PostgreSQL wire protocol as the server speaks it to us.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("server sent a {tag:?} message of {len} bytes, above the {cap}-byte cap (replication.max_message_bytes)")]
    TooLarge { tag: char, len: usize, cap: usize },
    #[error("server sent a message with invalid length {len}")]
    BadLength { len: u32 },
    #[error("malformed {what} from server: {detail}")]
    Malformed { what: &'static str, detail: String },
}

fn malformed(what: &'static str, detail: impl Into<String>) -> WireError {
    WireError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// One backend message: its tag and body (without tag and length).
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// Splits one complete frame off `buf`, or returns `None` when more bytes are needed.
/// When a frame is incomplete, reserves room for it so the next read can fill it.
pub fn try_frame(buf: &mut BytesMut, cap: usize) -> Result<Option<Frame>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(WireError::BadLength { len });
    }
    let body_len = (len - 4) as usize;
    if body_len > cap {
        return Err(WireError::TooLarge {
            tag: char::from(tag),
            len: body_len,
            cap,
        });
    }
    let total = 5 + body_len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(5);
    Ok(Some(Frame {
        tag,
        body: frame.freeze(),
    }))
}

/// The fields of an ErrorResponse or NoticeResponse that we report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerNotice {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

pub fn parse_notice(body: &[u8]) -> Result<ServerNotice, WireError> {
    let mut n = ServerNotice::default();
    let mut rest = body;
    loop {
        let (&kind, tail) = rest
            .split_first()
            .ok_or_else(|| malformed("error response", "missing terminator"))?;
        if kind == 0 {
            break;
        }
        let (value, tail) = cstr(tail, "error response")?;
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'V' => n.severity = value,
            b'S' if n.severity.is_empty() => n.severity = value,
            b'C' => n.code = value,
            b'M' => n.message = value,
            b'D' => n.detail = Some(value),
            b'H' => n.hint = Some(value),
            _ => {}
        }
        rest = tail;
    }
    Ok(n)
}

fn cstr<'a>(buf: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| malformed(what, "unterminated string"))?;
    Ok((&buf[..end], &buf[end + 1..]))
}

/// Authentication request codes we handle.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5 { salt: [u8; 4] },
    Sasl { mechanisms: Vec<String> },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    Other(i32),
}

pub fn parse_auth(body: &Bytes) -> Result<AuthRequest, WireError> {
    if body.len() < 4 {
        return Err(malformed("authentication request", "shorter than 4 bytes"));
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = body.slice(4..);
    Ok(match code {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => {
            let salt: [u8; 4] = rest
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| malformed("md5 request", "missing salt"))?;
            AuthRequest::Md5 { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            let mut buf: &[u8] = &rest;
            loop {
                let (m, tail) = cstr(buf, "SASL mechanism list")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(String::from_utf8_lossy(m).into_owned());
                buf = tail;
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(rest),
        12 => AuthRequest::SaslFinal(rest),
        other => AuthRequest::Other(other),
    })
}

/// A DataRow's columns as text (replication commands answer in text).
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    let mut buf = body;
    if buf.remaining() < 2 {
        return Err(malformed("data row", "missing column count"));
    }
    let n = buf.get_i16();
    if n < 0 {
        return Err(malformed("data row", "negative column count"));
    }
    let mut cols = Vec::with_capacity((n as usize).min(buf.remaining() / 4));
    for _ in 0..n {
        if buf.remaining() < 4 {
            return Err(malformed("data row", "truncated column length"));
        }
        let len = buf.get_i32();
        if len < 0 {
            cols.push(None);
            continue;
        }
        let len = len as usize;
        if buf.remaining() < len {
            return Err(malformed("data row", "truncated column value"));
        }
        cols.push(Some(String::from_utf8_lossy(&buf[..len]).into_owned()));
        buf.advance(len);
    }
    Ok(cols)
}

/// Messages inside CopyBoth from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum CopyMessage {
    /// 'w': WAL data; for pgoutput, one logical message.
    XLogData {
        wal_start: u64,
        wal_end: u64,
        payload: Bytes,
    },
    /// 'k': keepalive; `reply` asks for an immediate status update.
    Keepalive { wal_end: u64, reply: bool },
}

pub fn parse_copy_data(body: Bytes) -> Result<CopyMessage, WireError> {
    let Some(&kind) = body.first() else {
        return Err(malformed("copy data", "empty"));
    };
    match kind {
        b'w' => {
            if body.len() < 25 {
                return Err(malformed("XLogData", "header shorter than 25 bytes"));
            }
            let mut h = &body[1..25];
            let wal_start = h.get_u64();
            let wal_end = h.get_u64();
            Ok(CopyMessage::XLogData {
                wal_start,
                wal_end,
                payload: body.slice(25..),
            })
        }
        b'k' => {
            if body.len() != 18 {
                return Err(malformed(
                    "keepalive",
                    format!("{} bytes instead of 18", body.len()),
                ));
            }
            let mut h = &body[1..];
            let wal_end = h.get_u64();
            let _server_time = h.get_i64();
            let reply = h.get_u8() != 0;
            Ok(CopyMessage::Keepalive { wal_end, reply })
        }
        other => Err(malformed(
            "copy data",
            format!("unknown kind byte {other:#04x}"),
        )),
    }
}

/// Standby status update ('r'): what we have received, and what is durable downstream.
pub fn standby_status(
    write: u64,
    flush: u64,
    apply: u64,
    now_pg_micros: i64,
    reply: bool,
) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.extend_from_slice(b"r");
    b.extend_from_slice(&write.to_be_bytes());
    b.extend_from_slice(&flush.to_be_bytes());
    b.extend_from_slice(&apply.to_be_bytes());
    b.extend_from_slice(&now_pg_micros.to_be_bytes());
    b.extend_from_slice(&[u8::from(reply)]);
    b.freeze()
}

/// Microseconds since 2000-01-01 UTC, the clock the replication protocol uses.
pub fn pg_now_micros() -> i64 {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let micros = now.as_micros() as i64;
    micros - (PG_EPOCH_UNIX_SECS as i64) * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_split_only_when_complete() {
        let bytes = frame(b'd', b"hello");
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            assert!(try_frame(&mut buf, 1024).unwrap().is_none(), "byte {i}");
            buf.extend_from_slice(&[*b]);
        }
        let f = try_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((f.tag, &f.body[..]), (b'd', &b"hello"[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frame_refused_before_allocation() {
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        let err = try_frame(&mut buf, 1 << 20).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
        assert!(buf.capacity() < 1 << 20);
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(matches!(
            try_frame(&mut buf, 1024),
            Err(WireError::BadLength { len: 3 })
        ));
    }

    #[test]
    fn notices_parse_and_reject_garbage() {
        let n = parse_notice(b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0")
            .unwrap();
        assert_eq!(n.code, "42704");
        assert!(n.to_string().contains("does not exist"));
        assert!(parse_notice(b"Mno terminator").is_err());
        assert!(parse_notice(b"").is_err());
    }

    #[test]
    fn copy_data_kinds() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&1u64.to_be_bytes());
        w.extend_from_slice(&2u64.to_be_bytes());
        w.extend_from_slice(&3i64.to_be_bytes());
        w.extend_from_slice(b"B...");
        match parse_copy_data(Bytes::from(w)).unwrap() {
            CopyMessage::XLogData {
                wal_start,
                wal_end,
                payload,
            } => assert_eq!((wal_start, wal_end, &payload[..]), (1, 2, &b"B..."[..])),
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&9u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k)).unwrap(),
            CopyMessage::Keepalive {
                wal_end: 9,
                reply: true
            }
        );
        for bad in [&b""[..], b"w123", b"k1", b"z"] {
            assert!(
                parse_copy_data(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn data_rows_and_auth() {
        let mut row = vec![0, 2];
        row.extend_from_slice(&3i32.to_be_bytes());
        row.extend_from_slice(b"abc");
        row.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            parse_data_row(&row).unwrap(),
            vec![Some("abc".to_string()), None]
        );
        assert!(parse_data_row(&[0, 1, 0, 0, 0, 9, b'x']).is_err());
        let sasl = Bytes::from_static(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(
            parse_auth(&sasl).unwrap(),
            AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            }
        );
        assert!(parse_auth(&Bytes::from_static(b"\0\0")).is_err());
    }

    #[test]
    fn status_update_layout() {
        let b = standby_status(1, 2, 3, 4, true);
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(&b[9..17], &2u64.to_be_bytes());
        assert_eq!(b[33], 1);
    }
}
