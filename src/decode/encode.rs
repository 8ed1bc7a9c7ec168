//! pgoutput encoder: [`Message`] → the bytes PostgreSQL would send for it.
//!
//! Exists for tests, fuzz seeding, benchmarks and fault injection (test servers that speak
//! pgoutput); the daemon itself never encodes.
//!
//! Invariants:
//! - Mirrors the decoder exactly: for every message a server using `opts` could send,
//!   `Decoder::decode(encode(msg, opts)) == msg`, and for every accepted input `x`,
//!   `encode(decode(x)) == x` byte for byte.
//! - The layout follows the message, not `opts`: an optional field is written exactly when
//!   it is present (`xid: Some(_)` gets the streamed-block prefix, `StreamAbort::abort:
//!   Some(_)` gets the v4 parallel fields). That is what makes deliberately mismatched
//!   bytes possible for fault injection; keeping `xid`/`abort` consistent with the stream
//!   state and `opts` is the caller's job, as it is the server's.

use bytes::{BufMut, BytesMut};

use super::message::*;
use super::parse::DecoderOptions;

/// Encodes one message as a new buffer.
///
/// `opts` names the protocol the bytes are meant for; see the module invariants for why it
/// does not steer the layout.
///
/// # Panics
/// If the message cannot be expressed in pgoutput at all: more than `i16::MAX` columns in a
/// relation or tuple, more than `i32::MAX` truncated relations, or a value or message
/// content longer than `i32::MAX` bytes.
pub fn encode(msg: &Message, opts: DecoderOptions) -> BytesMut {
    let mut buf = BytesMut::with_capacity(size_hint(msg));
    encode_into(msg, opts, &mut buf);
    buf
}

/// Appends one message to `buf` (benchmarks and test servers reuse one buffer).
///
/// # Panics
/// As [`encode`].
pub fn encode_into(msg: &Message, opts: DecoderOptions, buf: &mut BytesMut) {
    let _ = opts;
    match msg {
        Message::Begin(m) => {
            buf.put_u8(b'B');
            buf.put_u64(m.final_lsn.0);
            buf.put_i64(m.commit_time);
            buf.put_u32(m.xid);
        }
        Message::Commit(m) => {
            buf.put_u8(b'C');
            buf.put_u8(m.flags);
            buf.put_u64(m.commit_lsn.0);
            buf.put_u64(m.end_lsn.0);
            buf.put_i64(m.commit_time);
        }
        Message::Origin(m) => {
            buf.put_u8(b'O');
            buf.put_u64(m.commit_lsn.0);
            put_string(buf, &m.name);
        }
        Message::Relation(m) => {
            buf.put_u8(b'R');
            put_xid(buf, m.xid);
            buf.put_u32(m.id.0);
            put_string(buf, &m.namespace);
            put_string(buf, &m.name);
            buf.put_u8(match m.replica_identity {
                ReplicaIdentity::Default => b'd',
                ReplicaIdentity::Nothing => b'n',
                ReplicaIdentity::Full => b'f',
                ReplicaIdentity::Index => b'i',
            });
            buf.put_i16(count16(m.columns.len(), "relation columns"));
            for c in &m.columns {
                buf.put_u8(c.flags);
                put_string(buf, &c.name);
                buf.put_u32(c.type_oid);
                buf.put_i32(c.type_modifier);
            }
        }
        Message::Type(m) => {
            buf.put_u8(b'Y');
            put_xid(buf, m.xid);
            buf.put_u32(m.type_oid);
            put_string(buf, &m.namespace);
            put_string(buf, &m.name);
        }
        Message::Insert(m) => {
            buf.put_u8(b'I');
            put_xid(buf, m.xid);
            buf.put_u32(m.relation.0);
            buf.put_u8(b'N');
            put_tuple(buf, &m.new);
        }
        Message::Update(m) => {
            buf.put_u8(b'U');
            put_xid(buf, m.xid);
            buf.put_u32(m.relation.0);
            if let Some(old) = &m.old {
                put_old_tuple(buf, old);
            }
            buf.put_u8(b'N');
            put_tuple(buf, &m.new);
        }
        Message::Delete(m) => {
            buf.put_u8(b'D');
            put_xid(buf, m.xid);
            buf.put_u32(m.relation.0);
            put_old_tuple(buf, &m.old);
        }
        Message::Truncate(m) => {
            buf.put_u8(b'T');
            put_xid(buf, m.xid);
            buf.put_i32(count32(m.relations.len(), "truncated relations"));
            buf.put_u8(m.options);
            for r in &m.relations {
                buf.put_u32(r.0);
            }
        }
        Message::Message(m) => {
            buf.put_u8(b'M');
            put_xid(buf, m.xid);
            buf.put_u8(m.flags);
            buf.put_u64(m.lsn.0);
            put_string(buf, &m.prefix);
            buf.put_i32(count32(m.content.len(), "message content length"));
            buf.put_slice(&m.content);
        }
        Message::StreamStart(m) => {
            buf.put_u8(b'S');
            buf.put_u32(m.xid);
            buf.put_u8(u8::from(m.first_segment));
        }
        Message::StreamStop => buf.put_u8(b'E'),
        Message::StreamCommit(m) => {
            buf.put_u8(b'c');
            buf.put_u32(m.xid);
            buf.put_u8(m.flags);
            buf.put_u64(m.commit_lsn.0);
            buf.put_u64(m.end_lsn.0);
            buf.put_i64(m.commit_time);
        }
        Message::StreamAbort(m) => {
            buf.put_u8(b'A');
            buf.put_u32(m.xid);
            buf.put_u32(m.subxid);
            if let Some((lsn, time)) = m.abort {
                buf.put_u64(lsn.0);
                buf.put_i64(time);
            }
        }
        Message::BeginPrepare(m) => {
            buf.put_u8(b'b');
            buf.put_u64(m.prepare_lsn.0);
            buf.put_u64(m.end_lsn.0);
            buf.put_i64(m.prepare_time);
            buf.put_u32(m.xid);
            put_string(buf, &m.gid);
        }
        Message::Prepare(m) => {
            buf.put_u8(b'P');
            put_prepare(buf, m);
        }
        Message::StreamPrepare(m) => {
            buf.put_u8(b'p');
            put_prepare(buf, m);
        }
        Message::CommitPrepared(m) => {
            buf.put_u8(b'K');
            buf.put_u8(m.flags);
            buf.put_u64(m.commit_lsn.0);
            buf.put_u64(m.end_lsn.0);
            buf.put_i64(m.commit_time);
            buf.put_u32(m.xid);
            put_string(buf, &m.gid);
        }
        Message::RollbackPrepared(m) => {
            buf.put_u8(b'r');
            buf.put_u8(m.flags);
            buf.put_u64(m.prepare_end_lsn.0);
            buf.put_u64(m.rollback_end_lsn.0);
            buf.put_i64(m.prepare_time);
            buf.put_i64(m.rollback_time);
            buf.put_u32(m.xid);
            put_string(buf, &m.gid);
        }
    }
}

fn put_xid(buf: &mut BytesMut, xid: Option<Xid>) {
    if let Some(xid) = xid {
        buf.put_u32(xid);
    }
}

/// Strings go out as-is plus a terminator; one containing NUL would not survive the trip,
/// but PostgreSQL names and GIDs cannot contain NUL either.
fn put_string(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

fn put_tuple(buf: &mut BytesMut, tuple: &Tuple) {
    buf.put_i16(count16(tuple.0.len(), "tuple columns"));
    for datum in &tuple.0 {
        match datum {
            Datum::Null => buf.put_u8(b'n'),
            Datum::UnchangedToast => buf.put_u8(b'u'),
            Datum::Text(v) | Datum::Binary(v) => {
                buf.put_u8(if matches!(datum, Datum::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                buf.put_i32(count32(v.len(), "column value length"));
                buf.put_slice(v);
            }
        }
    }
}

fn put_old_tuple(buf: &mut BytesMut, old: &OldTuple) {
    match old {
        OldTuple::Key(t) => {
            buf.put_u8(b'K');
            put_tuple(buf, t);
        }
        OldTuple::Full(t) => {
            buf.put_u8(b'O');
            put_tuple(buf, t);
        }
    }
}

fn put_prepare(buf: &mut BytesMut, m: &Prepare) {
    buf.put_u8(m.flags);
    buf.put_u64(m.prepare_lsn.0);
    buf.put_u64(m.end_lsn.0);
    buf.put_i64(m.prepare_time);
    buf.put_u32(m.xid);
    put_string(buf, &m.gid);
}

fn count16(n: usize, what: &str) -> i16 {
    i16::try_from(n).unwrap_or_else(|_| panic!("{what}: {n} does not fit pgoutput's Int16"))
}

fn count32(n: usize, what: &str) -> i32 {
    i32::try_from(n).unwrap_or_else(|_| panic!("{what}: {n} does not fit pgoutput's Int32"))
}

/// Close enough to avoid regrowing for row messages; exactness does not matter.
fn size_hint(msg: &Message) -> usize {
    fn tuple_len(t: &Tuple) -> usize {
        2 + t
            .0
            .iter()
            .map(|d| match d {
                Datum::Text(v) | Datum::Binary(v) => 5 + v.len(),
                Datum::Null | Datum::UnchangedToast => 1,
            })
            .sum::<usize>()
    }
    const HEADER: usize = 1 + 4 + 4 + 1;
    match msg {
        Message::Insert(m) => HEADER + tuple_len(&m.new),
        Message::Update(m) => {
            HEADER + 1 + tuple_len(&m.new) + m.old.as_ref().map_or(0, |o| tuple_len(o.tuple()))
        }
        Message::Delete(m) => HEADER + tuple_len(m.old.tuple()),
        Message::Message(m) => 32 + m.prefix.len() + m.content.len(),
        _ => 64,
    }
}

#[cfg(test)]
mod tests {
    //! Byte layouts written out by hand from the protocol documentation, so that encode is
    //! checked against the spec rather than only against the decoder (a mistake made the
    //! same way in both would otherwise round-trip happily). The real-server check is
    //! tests/it/decode_golden.rs, which re-encodes captured messages.

    use super::*;
    use crate::lsn::Lsn;
    use bytes::Bytes;

    const V2: DecoderOptions = DecoderOptions {
        proto_version: 2,
        streaming_parallel: false,
    };

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn begin_and_commit() {
        let b = encode(
            &Message::Begin(Begin {
                final_lsn: Lsn(0x0000_0001_0000_00ff),
                commit_time: 2,
                xid: 0x0a0b_0c0d,
            }),
            V2,
        );
        assert_eq!(
            hex(&b),
            concat!("42", "00000001000000ff", "0000000000000002", "0a0b0c0d")
        );
        let c = encode(
            &Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(1),
                end_lsn: Lsn(2),
                commit_time: -1,
            }),
            V2,
        );
        assert_eq!(
            hex(&c),
            concat!(
                "43",
                "00",
                "0000000000000001",
                "0000000000000002",
                "ffffffffffffffff"
            )
        );
    }

    #[test]
    fn update_with_key_and_streamed_xid() {
        let b = encode(
            &Message::Update(Update {
                xid: Some(7),
                relation: RelationId(16384),
                old: Some(OldTuple::Key(Tuple(vec![Datum::Text(Bytes::from_static(
                    b"1",
                ))]))),
                new: Tuple(vec![
                    Datum::Null,
                    Datum::UnchangedToast,
                    Datum::Binary(Bytes::from_static(&[0xde, 0xad])),
                ]),
            }),
            V2,
        );
        assert_eq!(
            hex(&b),
            concat!(
                "55",       // 'U'
                "00000007", // xid (streamed block)
                "00004000", // relation OID 16384
                "4b",       // 'K'
                "0001", "74", "00000001", "31", "4e", // 'N'
                "0003", "6e", "75", "62", "00000002", "dead"
            )
        );
    }

    #[test]
    fn truncate_message_and_relation() {
        let t = encode(
            &Message::Truncate(Truncate {
                xid: None,
                options: 3,
                relations: vec![RelationId(1), RelationId(2)],
            }),
            V2,
        );
        assert_eq!(
            hex(&t),
            concat!("54", "00000002", "03", "00000001", "00000002")
        );

        let m = encode(
            &Message::Message(LogicalMessage {
                xid: None,
                flags: 1,
                lsn: Lsn(0x10),
                prefix: "px".into(),
                content: Bytes::from_static(b"hi"),
            }),
            V2,
        );
        assert_eq!(
            hex(&m),
            concat!("4d", "01", "0000000000000010", "707800", "00000002", "6869")
        );

        let r = encode(
            &Message::Relation(Relation {
                xid: None,
                id: RelationId(5),
                namespace: String::new(),
                name: "t".into(),
                replica_identity: ReplicaIdentity::Index,
                columns: vec![Column {
                    flags: 1,
                    name: "a".into(),
                    type_oid: 23,
                    type_modifier: -1,
                }],
            }),
            V2,
        );
        assert_eq!(
            hex(&r),
            concat!(
                "52", "00000005", "00", "7400", "69", "0001", "01", "6100", "00000017", "ffffffff"
            )
        );
    }

    #[test]
    fn stream_and_two_phase_messages() {
        let s = encode(
            &Message::StreamStart(StreamStart {
                xid: 9,
                first_segment: true,
            }),
            V2,
        );
        assert_eq!(hex(&s), "530000000901");
        assert_eq!(hex(&encode(&Message::StreamStop, V2)), "45");

        let a = encode(
            &Message::StreamAbort(StreamAbort {
                xid: 9,
                subxid: 10,
                abort: Some((Lsn(3), 4)),
            }),
            V2,
        );
        assert_eq!(
            hex(&a),
            concat!(
                "41",
                "00000009",
                "0000000a",
                "0000000000000003",
                "0000000000000004"
            )
        );

        let r = encode(
            &Message::RollbackPrepared(RollbackPrepared {
                flags: 0,
                prepare_end_lsn: Lsn(1),
                rollback_end_lsn: Lsn(2),
                prepare_time: 3,
                rollback_time: 4,
                xid: 5,
                gid: "g".into(),
            }),
            V2,
        );
        assert_eq!(
            hex(&r),
            concat!(
                "72",
                "00",
                "0000000000000001",
                "0000000000000002",
                "0000000000000003",
                "0000000000000004",
                "00000005",
                "6700"
            )
        );

        let p = Prepare {
            flags: 0,
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time: 3,
            xid: 5,
            gid: "g".into(),
        };
        let plain = encode(&Message::Prepare(p.clone()), V2);
        let streamed = encode(&Message::StreamPrepare(p), V2);
        assert_eq!(plain[0], b'P');
        assert_eq!(streamed[0], b'p');
        assert_eq!(plain[1..], streamed[1..]);
    }

    #[test]
    fn encode_into_appends() {
        let mut buf = BytesMut::new();
        encode_into(&Message::StreamStop, V2, &mut buf);
        encode_into(&Message::StreamStop, V2, &mut buf);
        assert_eq!(&buf[..], b"EE");
    }
}
