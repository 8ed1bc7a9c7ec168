//! The pgoutput decoder: one XLogData payload in, one [`Message`] out.
//!
//! Invariants:
//! - Never panics on input. Every read goes through `Reader`, which checks bounds before it
//!   touches a byte; there is no indexing, no `unwrap` on input and no unchecked arithmetic
//!   on wire values.
//! - No allocation sized by the sender alone: a count read from the wire is checked against
//!   the bytes left in the message (each element needs at least a known number of bytes)
//!   before any `Vec` is reserved, so a forged count of 32767 columns in a 10-byte message is
//!   a [`DecodeError::Truncated`], not a large allocation.
//! - Canonical: a message is accepted only if it is consumed exactly, and every field that
//!   has a closed set of values (kind bytes, replica identity, booleans) is checked. Hence
//!   whatever decodes re-encodes byte for byte with [`super::encode::encode`].
//! - Zero-copy for row data: column values and logical message contents are `Bytes::slice`s
//!   of the input. Names (relations, types, columns, prefixes, GIDs) are copied into
//!   `String`s because they must be validated as UTF-8, and they are rare (Relation and Type
//!   messages are sent once per relation per connection, not per row). Column *values* are
//!   not validated: their encoding is the consumer's business and checking them would cost a
//!   pass over every byte of every row.
//! - The only state is the streamed-block flag (with the xid from Stream Start). It changes
//!   only when a Stream Start or Stream Stop decodes completely; any error leaves the decoder
//!   exactly as it was before the call.

use bytes::Bytes;

use super::message::*;
use crate::lsn::Lsn;

/// What was negotiated in `START_REPLICATION`; it decides which fields exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderOptions {
    /// pgoutput `proto_version` requested (1–4). Streaming messages need 2, two-phase
    /// messages need 3; receiving one the version cannot produce is an error, because it
    /// means the options handed to the decoder are not the ones the server is using.
    pub proto_version: u32,
    /// `streaming = parallel` was requested. With `proto_version >= 4` this adds the abort
    /// LSN and timestamp to Stream Abort.
    pub streaming_parallel: bool,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        DecoderOptions {
            proto_version: 1,
            streaming_parallel: false,
        }
    }
}

impl DecoderOptions {
    /// Whether Stream Abort carries abort LSN and timestamp: pgoutput writes them only when
    /// both conditions hold (protocol v4 alone is not enough).
    pub(crate) fn stream_abort_info(self) -> bool {
        self.proto_version >= 4 && self.streaming_parallel
    }
}

/// Why a message was refused. Each variant names the message kind ("Insert", "Stream
/// Abort", ...) and, where it applies, the byte offset inside the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,

    #[error(
        "unknown pgoutput message tag {tag:#04x}: corrupted stream or a protocol version \
         newer than this decoder"
    )]
    UnknownTag { tag: u8 },

    #[error(
        "{kind} message needs pgoutput protocol version {required}, but the decoder is set \
         up for version {configured}"
    )]
    ProtocolVersion {
        kind: &'static str,
        required: u32,
        configured: u32,
    },

    #[error(
        "{kind} message truncated: {field} at offset {offset} needs at least {needed} bytes, \
         {available} left"
    )]
    Truncated {
        kind: &'static str,
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },

    #[error("{kind} message: invalid {field} at offset {offset}: {detail}")]
    InvalidField {
        kind: &'static str,
        field: &'static str,
        offset: usize,
        detail: String,
    },

    #[error("{kind} message: {field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        kind: &'static str,
        field: &'static str,
        offset: usize,
    },

    #[error("{kind} message has {remaining} unexpected trailing bytes at offset {offset}")]
    TrailingBytes {
        kind: &'static str,
        offset: usize,
        remaining: usize,
    },

    #[error("{kind} message out of place: {detail}")]
    StreamState {
        kind: &'static str,
        detail: &'static str,
    },
}

/// Decodes pgoutput messages of one replication connection, in order.
///
/// Inside a streamed block (Stream Start .. Stream Stop) pgoutput prefixes Relation, Type,
/// Insert, Update, Delete, Truncate and Message with the xid of the (sub)transaction, and
/// nothing in those messages says whether the prefix is there. So messages must be fed in
/// stream order, and a decoder must not outlive its connection: call [`Decoder::reset`]
/// after reconnecting.
///
/// After an error the decoder is unchanged (see the module invariants), but the stream it
/// was following is not trustworthy any more: the only sound continuation is to reconnect
/// from the last confirmed position and `reset`.
#[derive(Clone, Debug)]
pub struct Decoder {
    opts: DecoderOptions,
    /// Xid from the Stream Start of the block we are in, `None` outside a block.
    stream: Option<Xid>,
}

impl Decoder {
    pub fn new(opts: DecoderOptions) -> Self {
        Decoder { opts, stream: None }
    }

    pub fn options(&self) -> DecoderOptions {
        self.opts
    }

    /// Whether the last Stream Start has not been closed by a Stream Stop yet.
    pub fn in_stream(&self) -> bool {
        self.stream.is_some()
    }

    /// Top-level xid of the streamed block we are in. Row messages inside it may carry a
    /// subtransaction's xid instead, so this is not necessarily their `xid`.
    pub fn stream_xid(&self) -> Option<Xid> {
        self.stream
    }

    /// Forgets the streamed-block flag. A new walsender never resumes in the middle of a
    /// block, so this is what a reconnect must do.
    pub fn reset(&mut self) {
        self.stream = None;
    }

    /// Decodes one complete pgoutput message (one XLogData payload).
    pub fn decode(&mut self, data: Bytes) -> Result<Message, DecodeError> {
        let tag = *data.first().ok_or(DecodeError::Empty)?;
        let kind = Kind::of(tag).ok_or(DecodeError::UnknownTag { tag })?;
        self.check_allowed(kind)?;

        let mut r = Reader {
            buf: &data,
            pos: 1,
            kind: kind.name(),
        };
        // Only row-level messages get the xid prefix, and only inside a block.
        let in_stream = self.stream.is_some();
        let msg = match kind {
            Kind::Begin => Message::Begin(Begin {
                final_lsn: r.lsn("final LSN")?,
                commit_time: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
            }),
            Kind::Commit => Message::Commit(Commit {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time: r.i64("commit timestamp")?,
            }),
            Kind::Origin => Message::Origin(Origin {
                commit_lsn: r.lsn("origin commit LSN")?,
                name: r.string("origin name")?,
            }),
            Kind::Relation => Message::Relation(r.relation(in_stream)?),
            Kind::Type => Message::Type(TypeInfo {
                xid: r.stream_xid(in_stream)?,
                type_oid: r.u32("type OID")?,
                namespace: r.string("type namespace")?,
                name: r.string("type name")?,
            }),
            Kind::Insert => {
                let xid = r.stream_xid(in_stream)?;
                let relation = RelationId(r.u32("relation OID")?);
                r.expect_marker(b'N', "new tuple marker")?;
                Message::Insert(Insert {
                    xid,
                    relation,
                    new: r.tuple()?,
                })
            }
            Kind::Update => Message::Update(r.update(in_stream)?),
            Kind::Delete => {
                let xid = r.stream_xid(in_stream)?;
                let relation = RelationId(r.u32("relation OID")?);
                let old = r.old_tuple()?;
                Message::Delete(Delete { xid, relation, old })
            }
            Kind::Truncate => Message::Truncate(r.truncate(in_stream)?),
            Kind::Message => Message::Message(r.logical_message(in_stream)?),
            Kind::StreamStart => Message::StreamStart(StreamStart {
                xid: r.u32("xid")?,
                first_segment: r.bool("first segment flag")?,
            }),
            Kind::StreamStop => Message::StreamStop,
            Kind::StreamCommit => Message::StreamCommit(StreamCommit {
                xid: r.u32("xid")?,
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time: r.i64("commit timestamp")?,
            }),
            Kind::StreamAbort => Message::StreamAbort(StreamAbort {
                xid: r.u32("xid")?,
                subxid: r.u32("subtransaction xid")?,
                abort: if self.opts.stream_abort_info() {
                    Some((r.lsn("abort LSN")?, r.i64("abort timestamp")?))
                } else {
                    None
                },
            }),
            Kind::BeginPrepare => Message::BeginPrepare(BeginPrepare {
                prepare_lsn: r.lsn("prepare LSN")?,
                end_lsn: r.lsn("end LSN")?,
                prepare_time: r.i64("prepare timestamp")?,
                xid: r.u32("xid")?,
                gid: r.string("GID")?,
            }),
            Kind::Prepare => Message::Prepare(r.prepare()?),
            Kind::CommitPrepared => Message::CommitPrepared(CommitPrepared {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
                gid: r.string("GID")?,
            }),
            Kind::RollbackPrepared => Message::RollbackPrepared(RollbackPrepared {
                flags: r.u8("flags")?,
                prepare_end_lsn: r.lsn("prepare end LSN")?,
                rollback_end_lsn: r.lsn("rollback end LSN")?,
                prepare_time: r.i64("prepare timestamp")?,
                rollback_time: r.i64("rollback timestamp")?,
                xid: r.u32("xid")?,
                gid: r.string("GID")?,
            }),
            Kind::StreamPrepare => Message::StreamPrepare(r.prepare()?),
        };
        r.finish()?;

        // State moves only now that the whole message is known to be good.
        match &msg {
            Message::StreamStart(s) => self.stream = Some(s.xid),
            Message::StreamStop => self.stream = None,
            _ => {}
        }
        Ok(msg)
    }

    /// Refuses a message the negotiated protocol cannot produce, or one that cannot occur at
    /// this point of the stream. Checked before parsing so that the verdict does not depend
    /// on whether the body happens to be well formed.
    fn check_allowed(&self, kind: Kind) -> Result<(), DecodeError> {
        let required = kind.min_proto_version();
        if self.opts.proto_version < required {
            return Err(DecodeError::ProtocolVersion {
                kind: kind.name(),
                required,
                configured: self.opts.proto_version,
            });
        }
        let detail = match (kind, self.stream.is_some()) {
            (Kind::StreamStart, true) => "Stream Start inside a streamed block (no Stream Stop)",
            (Kind::StreamStop, false) => "Stream Stop outside a streamed block",
            // pgoutput ends a block before it sends any transaction boundary, streamed or
            // not: seeing one inside means we lost track of the block (or the server broke
            // the protocol), and the xid prefixes we would apply are guesses.
            (
                Kind::Begin
                | Kind::Commit
                | Kind::StreamCommit
                | Kind::StreamAbort
                | Kind::BeginPrepare
                | Kind::Prepare
                | Kind::CommitPrepared
                | Kind::RollbackPrepared
                | Kind::StreamPrepare,
                true,
            ) => "transaction boundary inside a streamed block (no Stream Stop)",
            _ => return Ok(()),
        };
        Err(DecodeError::StreamState {
            kind: kind.name(),
            detail,
        })
    }
}

/// Top-level message kinds, one per tag byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Begin,
    Commit,
    Origin,
    Relation,
    Type,
    Insert,
    Update,
    Delete,
    Truncate,
    Message,
    StreamStart,
    StreamStop,
    StreamCommit,
    StreamAbort,
    BeginPrepare,
    Prepare,
    CommitPrepared,
    RollbackPrepared,
    StreamPrepare,
}

impl Kind {
    fn of(tag: u8) -> Option<Kind> {
        Some(match tag {
            b'B' => Kind::Begin,
            b'C' => Kind::Commit,
            b'O' => Kind::Origin,
            b'R' => Kind::Relation,
            b'Y' => Kind::Type,
            b'I' => Kind::Insert,
            b'U' => Kind::Update,
            b'D' => Kind::Delete,
            b'T' => Kind::Truncate,
            b'M' => Kind::Message,
            b'S' => Kind::StreamStart,
            b'E' => Kind::StreamStop,
            b'c' => Kind::StreamCommit,
            b'A' => Kind::StreamAbort,
            b'b' => Kind::BeginPrepare,
            b'P' => Kind::Prepare,
            b'K' => Kind::CommitPrepared,
            b'r' => Kind::RollbackPrepared,
            b'p' => Kind::StreamPrepare,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Begin => "Begin",
            Kind::Commit => "Commit",
            Kind::Origin => "Origin",
            Kind::Relation => "Relation",
            Kind::Type => "Type",
            Kind::Insert => "Insert",
            Kind::Update => "Update",
            Kind::Delete => "Delete",
            Kind::Truncate => "Truncate",
            Kind::Message => "Message",
            Kind::StreamStart => "Stream Start",
            Kind::StreamStop => "Stream Stop",
            Kind::StreamCommit => "Stream Commit",
            Kind::StreamAbort => "Stream Abort",
            Kind::BeginPrepare => "Begin Prepare",
            Kind::Prepare => "Prepare",
            Kind::CommitPrepared => "Commit Prepared",
            Kind::RollbackPrepared => "Rollback Prepared",
            Kind::StreamPrepare => "Stream Prepare",
        }
    }

    fn min_proto_version(self) -> u32 {
        match self {
            Kind::StreamStart | Kind::StreamStop | Kind::StreamCommit | Kind::StreamAbort => 2,
            Kind::BeginPrepare
            | Kind::Prepare
            | Kind::CommitPrepared
            | Kind::RollbackPrepared
            | Kind::StreamPrepare => 3,
            _ => 1,
        }
    }
}

/// Smallest encoding of one TupleData column: its kind byte ('n' or 'u').
const MIN_DATUM_LEN: usize = 1;
/// Smallest encoding of one Relation column: flags, empty name (just the NUL), type OID,
/// type modifier.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;
/// One relation OID in a Truncate message.
const RELATION_OID_LEN: usize = 4;

/// Bounds-checked cursor over one message.
///
/// `pos <= buf.len()` always holds: `pos` only advances by lengths that were checked
/// against what is left.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    kind: &'static str,
}

impl Reader<'_> {
    #[inline]
    fn rest(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    #[inline]
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    #[cold]
    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            kind: self.kind,
            field,
            offset: self.pos,
            needed,
            available: self.remaining(),
        }
    }

    #[cold]
    fn invalid(&self, offset: usize, field: &'static str, detail: String) -> DecodeError {
        DecodeError::InvalidField {
            kind: self.kind,
            field,
            offset,
            detail,
        }
    }

    #[inline]
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest().first_chunk::<N>() {
            Some(bytes) => {
                let bytes = *bytes;
                self.pos += N;
                Ok(bytes)
            }
            None => Err(self.truncated(field, N)),
        }
    }

    #[inline]
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    #[inline]
    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        self.array(field).map(i16::from_be_bytes)
    }

    #[inline]
    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    #[inline]
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    #[inline]
    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    #[inline]
    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// pgoutput sends booleans as one byte, 0 or 1; anything else is corruption, and
    /// accepting it would break the re-encoding guarantee.
    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let at = self.pos;
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.invalid(at, field, format!("{other} is neither 0 nor 1"))),
        }
    }

    /// A NUL-terminated string. A missing terminator is reported as truncation: the
    /// message ended before the string did.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let at = self.pos;
        let rest = self.rest();
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(self.truncated(field, rest.len().saturating_add(1)));
        };
        let text = rest.get(..len).unwrap_or_default();
        let text = std::str::from_utf8(text).map_err(|_| DecodeError::InvalidUtf8 {
            kind: self.kind,
            field,
            offset: at,
        })?;
        let text = text.to_owned();
        self.pos += len + 1;
        Ok(text)
    }

    /// Int32 length followed by that many bytes, returned as a slice of the input.
    #[inline]
    fn sized(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let at = self.pos;
        let len = self.i32(field)?;
        let Ok(len) = usize::try_from(len) else {
            return Err(self.invalid(at, field, format!("negative length {len}")));
        };
        if len > self.remaining() {
            return Err(self.truncated(field, len));
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.buf.slice(start..self.pos))
    }

    /// A count of elements that each take at least `min_len` bytes; refused before anything
    /// is allocated if the message cannot possibly hold that many.
    fn count(
        &mut self,
        value: i64,
        at: usize,
        field: &'static str,
        min_len: usize,
    ) -> Result<usize, DecodeError> {
        let Ok(n) = usize::try_from(value) else {
            return Err(self.invalid(at, field, format!("negative count {value}")));
        };
        let needed = n.saturating_mul(min_len);
        if needed > self.remaining() {
            return Err(self.truncated(field, needed));
        }
        Ok(n)
    }

    fn expect_marker(&mut self, want: u8, field: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        let got = self.u8(field)?;
        if got == want {
            Ok(())
        } else {
            Err(self.invalid(
                at,
                field,
                format!("expected {}, found {}", show(want), show(got)),
            ))
        }
    }

    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<Xid>, DecodeError> {
        if in_stream {
            self.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            remaining => Err(DecodeError::TrailingBytes {
                kind: self.kind,
                offset: self.pos,
                remaining,
            }),
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let at = self.pos;
        let n = self.i16("tuple column count")?;
        let n = self.count(n.into(), at, "tuple column count", MIN_DATUM_LEN)?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.pos;
            let datum = match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => Datum::Text(self.sized("column value")?),
                b'b' => Datum::Binary(self.sized("column value")?),
                other => {
                    return Err(self.invalid(
                        at,
                        "column kind",
                        format!("{} is not one of 'n', 'u', 't', 'b'", show(other)),
                    ))
                }
            };
            columns.push(datum);
        }
        Ok(Tuple(columns))
    }

    fn old_tuple(&mut self) -> Result<OldTuple, DecodeError> {
        let at = self.pos;
        match self.u8("old tuple marker")? {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            other => Err(self.invalid(
                at,
                "old tuple marker",
                format!("expected 'K' or 'O', found {}", show(other)),
            )),
        }
    }

    fn update(&mut self, in_stream: bool) -> Result<Update, DecodeError> {
        let xid = self.stream_xid(in_stream)?;
        let relation = RelationId(self.u32("relation OID")?);
        let at = self.pos;
        let old = match self.u8("tuple marker")? {
            b'N' => None,
            b'K' => {
                let old = OldTuple::Key(self.tuple()?);
                self.expect_marker(b'N', "new tuple marker")?;
                Some(old)
            }
            b'O' => {
                let old = OldTuple::Full(self.tuple()?);
                self.expect_marker(b'N', "new tuple marker")?;
                Some(old)
            }
            other => {
                return Err(self.invalid(
                    at,
                    "tuple marker",
                    format!("expected 'K', 'O' or 'N', found {}", show(other)),
                ))
            }
        };
        Ok(Update {
            xid,
            relation,
            old,
            new: self.tuple()?,
        })
    }

    fn relation(&mut self, in_stream: bool) -> Result<Relation, DecodeError> {
        let xid = self.stream_xid(in_stream)?;
        let id = RelationId(self.u32("relation OID")?);
        let namespace = self.string("namespace")?;
        let name = self.string("relation name")?;
        let at = self.pos;
        let replica_identity = match self.u8("replica identity")? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => {
                return Err(self.invalid(
                    at,
                    "replica identity",
                    format!("{} is not one of 'd', 'n', 'f', 'i'", show(other)),
                ))
            }
        };
        let at = self.pos;
        let n = self.i16("column count")?;
        let n = self.count(n.into(), at, "column count", MIN_COLUMN_LEN)?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            columns.push(Column {
                flags: self.u8("column flags")?,
                name: self.string("column name")?,
                type_oid: self.u32("column type OID")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            xid,
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn truncate(&mut self, in_stream: bool) -> Result<Truncate, DecodeError> {
        let xid = self.stream_xid(in_stream)?;
        let at = self.pos;
        let n = self.i32("relation count")?;
        let options = self.u8("options")?;
        let n = self.count(n.into(), at, "relation count", RELATION_OID_LEN)?;
        let mut relations = Vec::with_capacity(n);
        for _ in 0..n {
            relations.push(RelationId(self.u32("relation OID")?));
        }
        Ok(Truncate {
            xid,
            options,
            relations,
        })
    }

    fn logical_message(&mut self, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
        Ok(LogicalMessage {
            xid: self.stream_xid(in_stream)?,
            flags: self.u8("flags")?,
            lsn: self.lsn("message LSN")?,
            prefix: self.string("prefix")?,
            content: self.sized("content")?,
        })
    }

    fn prepare(&mut self) -> Result<Prepare, DecodeError> {
        Ok(Prepare {
            flags: self.u8("flags")?,
            prepare_lsn: self.lsn("prepare LSN")?,
            end_lsn: self.lsn("end LSN")?,
            prepare_time: self.i64("prepare timestamp")?,
            xid: self.u32("xid")?,
            gid: self.string("GID")?,
        })
    }
}

/// A wire byte for an error message: the character when printable, else hex.
fn show(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", char::from(b))
    } else {
        format!("{b:#04x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::encode::encode;
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;

    const V1: DecoderOptions = DecoderOptions {
        proto_version: 1,
        streaming_parallel: false,
    };
    const V2: DecoderOptions = DecoderOptions {
        proto_version: 2,
        streaming_parallel: false,
    };
    const V3: DecoderOptions = DecoderOptions {
        proto_version: 3,
        streaming_parallel: false,
    };
    const V4_PARALLEL: DecoderOptions = DecoderOptions {
        proto_version: 4,
        streaming_parallel: true,
    };

    fn decode_with(opts: DecoderOptions, bytes: &[u8]) -> Result<Message, DecodeError> {
        Decoder::new(opts).decode(Bytes::copy_from_slice(bytes))
    }

    /// A decoder that is inside a streamed block of `xid`.
    fn streaming(opts: DecoderOptions, xid: Xid) -> Decoder {
        let mut d = Decoder::new(opts);
        let start = Message::StreamStart(StreamStart {
            xid,
            first_segment: true,
        });
        d.decode(encode(&start, opts).freeze()).unwrap();
        assert!(d.in_stream());
        d
    }

    fn insert_bytes(values: &[&[u8]]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(16384);
        b.put_u8(b'N');
        b.put_i16(values.len() as i16);
        for v in values {
            b.put_u8(b't');
            b.put_i32(v.len() as i32);
            b.put_slice(v);
        }
        b.to_vec()
    }

    // ---- hand-written bytes, independent of encode() ----

    #[test]
    fn decodes_documented_insert_layout() {
        let bytes = insert_bytes(&[b"42", b"hello"]);
        let msg = decode_with(V1, &bytes).unwrap();
        let Message::Insert(ins) = msg else {
            panic!("not an insert: {msg:?}")
        };
        assert_eq!(ins.xid, None);
        assert_eq!(ins.relation, RelationId(16384));
        assert_eq!(
            ins.new,
            Tuple(vec![
                Datum::Text(Bytes::from_static(b"42")),
                Datum::Text(Bytes::from_static(b"hello")),
            ])
        );
    }

    #[test]
    fn values_are_slices_of_the_input() {
        let input = Bytes::from(insert_bytes(&[b"abcdef"]));
        let range = input.as_ptr_range();
        let Message::Insert(ins) = Decoder::new(V1).decode(input.clone()).unwrap() else {
            panic!("not an insert")
        };
        let Datum::Text(v) = &ins.new.0[0] else {
            panic!("not text")
        };
        assert!(range.contains(&v.as_ptr()), "value was copied, not sliced");
    }

    #[test]
    fn decodes_documented_relation_layout() {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16390);
        b.put_slice(b"public\0orders\0");
        b.put_u8(b'f');
        b.put_i16(2);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(23);
        b.put_i32(-1);
        b.put_u8(0);
        b.put_slice(b"note\0");
        b.put_u32(1043);
        b.put_i32(68);
        let Message::Relation(rel) = decode_with(V1, &b).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.id, RelationId(16390));
        assert_eq!(
            (rel.namespace.as_str(), rel.name.as_str()),
            ("public", "orders")
        );
        assert_eq!(rel.replica_identity, ReplicaIdentity::Full);
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].is_key());
        assert_eq!(rel.columns[1].name, "note");
        assert_eq!(rel.columns[1].type_oid, 1043);
        assert_eq!(rel.columns[1].type_modifier, 68);
    }

    #[test]
    fn stream_abort_layout_depends_on_v4_parallel() {
        let mut short = BytesMut::new();
        short.put_u8(b'A');
        short.put_u32(700);
        short.put_u32(701);
        let mut long = short.clone();
        long.put_u64(0x1_0000_0010);
        long.put_i64(12345);

        let Message::StreamAbort(a) = decode_with(V2, &short).unwrap() else {
            panic!("not a stream abort")
        };
        assert_eq!((a.xid, a.subxid, a.abort), (700, 701, None));

        let Message::StreamAbort(a) = decode_with(V4_PARALLEL, &long).unwrap() else {
            panic!("not a stream abort")
        };
        assert_eq!(a.abort, Some((Lsn(0x1_0000_0010), 12345)));

        // v4 without parallel streaming keeps the short layout.
        let v4 = DecoderOptions {
            proto_version: 4,
            streaming_parallel: false,
        };
        assert!(decode_with(v4, &short).is_ok());
        assert!(matches!(
            decode_with(v4, &long),
            Err(DecodeError::TrailingBytes { remaining: 16, .. })
        ));
        assert!(matches!(
            decode_with(V4_PARALLEL, &short),
            Err(DecodeError::Truncated {
                field: "abort LSN",
                ..
            })
        ));
    }

    // ---- malformed input ----

    #[test]
    fn empty_message() {
        assert_eq!(decode_with(V4_PARALLEL, b""), Err(DecodeError::Empty));
    }

    #[test]
    fn unknown_tag() {
        for tag in [b'Z', b'x', 0u8, 0xff, b'N', b'k'] {
            assert_eq!(
                decode_with(V4_PARALLEL, &[tag, 0, 0, 0, 0]),
                Err(DecodeError::UnknownTag { tag })
            );
        }
    }

    #[test]
    fn negative_value_length() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(-1);
        let err = decode_with(V1, &b).unwrap_err();
        assert!(
            matches!(
                &err,
                DecodeError::InvalidField { kind: "Insert", field: "column value", offset: 9, detail }
                    if detail.contains("-1")
            ),
            "{err:?}"
        );
    }

    #[test]
    fn value_length_past_end() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b'b');
        b.put_i32(10);
        b.put_slice(b"abc");
        assert_eq!(
            decode_with(V1, &b),
            Err(DecodeError::Truncated {
                kind: "Insert",
                field: "column value",
                offset: 13,
                needed: 10,
                available: 3,
            })
        );
    }

    #[test]
    fn value_length_i32_max_does_not_overflow() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(i32::MAX);
        assert!(matches!(
            decode_with(V1, &b),
            Err(DecodeError::Truncated { needed, .. }) if needed == i32::MAX as usize
        ));
    }

    #[test]
    fn negative_column_count() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(-3);
        assert!(matches!(
            decode_with(V1, &b),
            Err(DecodeError::InvalidField {
                field: "tuple column count",
                offset: 6,
                ..
            })
        ));
    }

    #[test]
    fn huge_counts_with_tiny_buffer_are_refused_before_allocating() {
        let mut ins = BytesMut::new();
        ins.put_u8(b'I');
        ins.put_u32(1);
        ins.put_u8(b'N');
        ins.put_i16(i16::MAX);
        ins.put_slice(b"nnn");
        assert_eq!(
            decode_with(V1, &ins),
            Err(DecodeError::Truncated {
                kind: "Insert",
                field: "tuple column count",
                offset: 8,
                needed: i16::MAX as usize,
                available: 3,
            })
        );

        let mut rel = BytesMut::new();
        rel.put_u8(b'R');
        rel.put_u32(1);
        rel.put_slice(b"s\0t\0d");
        rel.put_i16(i16::MAX);
        rel.put_slice(&[0; 20]);
        assert!(matches!(
            decode_with(V1, &rel),
            Err(DecodeError::Truncated { field: "column count", needed, available: 20, .. })
                if needed == i16::MAX as usize * MIN_COLUMN_LEN
        ));

        let mut tr = BytesMut::new();
        tr.put_u8(b'T');
        tr.put_i32(i32::MAX);
        tr.put_u8(0);
        tr.put_u32(1);
        assert!(matches!(
            decode_with(V1, &tr),
            Err(DecodeError::Truncated {
                field: "relation count",
                available: 4,
                ..
            })
        ));

        let mut neg = BytesMut::new();
        neg.put_u8(b'T');
        neg.put_i32(-1);
        neg.put_u8(0);
        assert!(matches!(
            decode_with(V1, &neg),
            Err(DecodeError::InvalidField {
                field: "relation count",
                ..
            })
        ));
    }

    #[test]
    fn bad_replica_identity() {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(1);
        b.put_slice(b"public\0t\0");
        b.put_u8(b'x');
        b.put_i16(0);
        assert!(matches!(
            decode_with(V1, &b),
            Err(DecodeError::InvalidField {
                kind: "Relation",
                field: "replica identity",
                offset: 14,
                ..
            })
        ));
    }

    #[test]
    fn invalid_utf8_in_name() {
        let mut b = BytesMut::new();
        b.put_u8(b'Y');
        b.put_u32(1);
        b.put_slice(b"public\0");
        b.put_slice(b"bad\xff\xfe\0");
        assert_eq!(
            decode_with(V1, &b),
            Err(DecodeError::InvalidUtf8 {
                kind: "Type",
                field: "type name",
                offset: 12,
            })
        );
    }

    #[test]
    fn unterminated_string_is_truncation() {
        let mut b = BytesMut::new();
        b.put_u8(b'O');
        b.put_u64(1);
        b.put_slice(b"no-terminator");
        assert!(matches!(
            decode_with(V1, &b),
            Err(DecodeError::Truncated {
                kind: "Origin",
                field: "origin name",
                offset: 9,
                ..
            })
        ));
    }

    #[test]
    fn trailing_bytes() {
        let mut b = BytesMut::from(&insert_bytes(&[b"1"])[..]);
        b.put_slice(b"xy");
        let len = b.len();
        assert_eq!(
            decode_with(V1, &b),
            Err(DecodeError::TrailingBytes {
                kind: "Insert",
                offset: len - 2,
                remaining: 2,
            })
        );
        assert!(matches!(
            decode_with(V2, b"E\0"),
            Err(DecodeError::StreamState { .. })
        ));
    }

    #[test]
    fn bad_markers_and_datum_kinds() {
        // Insert with 'K' instead of 'N'.
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'K');
        b.put_i16(0);
        assert!(matches!(
            decode_with(V1, &b),
            Err(DecodeError::InvalidField {
                field: "new tuple marker",
                offset: 5,
                ..
            })
        ));

        // Delete must carry an old tuple.
        let mut d = BytesMut::new();
        d.put_u8(b'D');
        d.put_u32(1);
        d.put_u8(b'N');
        d.put_i16(0);
        assert!(matches!(
            decode_with(V1, &d),
            Err(DecodeError::InvalidField {
                field: "old tuple marker",
                ..
            })
        ));

        // Update: 'K' tuple followed by something other than 'N'.
        let mut u = BytesMut::new();
        u.put_u8(b'U');
        u.put_u32(1);
        u.put_u8(b'K');
        u.put_i16(1);
        u.put_u8(b'n');
        u.put_u8(b'O');
        u.put_i16(0);
        assert!(matches!(
            decode_with(V1, &u),
            Err(DecodeError::InvalidField {
                field: "new tuple marker",
                offset: 9,
                ..
            })
        ));

        // Unknown datum kind.
        let mut k = BytesMut::new();
        k.put_u8(b'I');
        k.put_u32(1);
        k.put_u8(b'N');
        k.put_i16(1);
        k.put_u8(b'x');
        let err = decode_with(V1, &k).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::InvalidField {
                field: "column kind",
                offset: 8,
                ..
            }
        ));
        assert!(err.to_string().contains("'x'"), "{err}");

        // Stream Start first-segment flag must be 0 or 1.
        assert!(matches!(
            decode_with(V2, &[b'S', 0, 0, 0, 1, 2]),
            Err(DecodeError::InvalidField {
                field: "first segment flag",
                ..
            })
        ));
    }

    #[test]
    fn nested_stream_start_is_refused_and_keeps_state() {
        let mut d = streaming(V2, 10);
        let again = encode(
            &Message::StreamStart(StreamStart {
                xid: 11,
                first_segment: false,
            }),
            V2,
        );
        assert!(matches!(
            d.decode(again.freeze()),
            Err(DecodeError::StreamState {
                kind: "Stream Start",
                ..
            })
        ));
        assert!(d.in_stream());
        assert_eq!(d.stream_xid(), Some(10));
    }

    #[test]
    fn stream_stop_without_start() {
        let mut d = Decoder::new(V2);
        assert!(matches!(
            d.decode(Bytes::from_static(b"E")),
            Err(DecodeError::StreamState {
                kind: "Stream Stop",
                ..
            })
        ));
        assert!(!d.in_stream());
    }

    #[test]
    fn transaction_boundaries_inside_a_block_are_refused() {
        let begin = Message::Begin(Begin {
            final_lsn: Lsn(1),
            commit_time: 0,
            xid: 1,
        });
        let commit = Message::StreamCommit(StreamCommit {
            xid: 10,
            flags: 0,
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time: 0,
        });
        for msg in [begin, commit] {
            let mut d = streaming(V3, 10);
            assert!(matches!(
                d.decode(encode(&msg, V3).freeze()),
                Err(DecodeError::StreamState { .. })
            ));
            assert!(d.in_stream());
        }
    }

    #[test]
    fn messages_beyond_the_negotiated_version_are_refused() {
        assert_eq!(
            decode_with(V1, &[b'S', 0, 0, 0, 1, 1]),
            Err(DecodeError::ProtocolVersion {
                kind: "Stream Start",
                required: 2,
                configured: 1,
            })
        );
        let prepare = encode(
            &Message::Prepare(Prepare {
                flags: 0,
                prepare_lsn: Lsn(1),
                end_lsn: Lsn(2),
                prepare_time: 3,
                xid: 4,
                gid: "g".into(),
            }),
            V3,
        );
        assert!(matches!(
            decode_with(V2, &prepare),
            Err(DecodeError::ProtocolVersion { required: 3, .. })
        ));
        assert!(decode_with(V3, &prepare).is_ok());
    }

    #[test]
    fn errors_leave_stream_state_untouched() {
        // A truncated Stream Start must not enter a block...
        let mut d = Decoder::new(V2);
        assert!(d.decode(Bytes::from_static(&[b'S', 0, 0])).is_err());
        assert!(!d.in_stream());
        // ...and a Stream Stop with trailing garbage must not leave one.
        let mut d = streaming(V2, 5);
        assert!(matches!(
            d.decode(Bytes::from_static(b"E!")),
            Err(DecodeError::TrailingBytes { .. })
        ));
        assert!(d.in_stream());
        d.reset();
        assert!(!d.in_stream());
    }

    #[test]
    fn xid_prefix_only_inside_a_block() {
        let outside = Message::Insert(Insert {
            xid: None,
            relation: RelationId(7),
            new: Tuple(vec![Datum::Null]),
        });
        let inside = Message::Insert(Insert {
            xid: Some(99),
            relation: RelationId(7),
            new: Tuple(vec![Datum::Null]),
        });
        let mut d = streaming(V2, 99);
        assert_eq!(d.decode(encode(&inside, V2).freeze()).unwrap(), inside);
        // The same bytes without the prefix would be misread inside a block.
        assert!(d.decode(encode(&outside, V2).freeze()).is_err());
        d.decode(Bytes::from_static(b"E")).unwrap();
        assert_eq!(d.decode(encode(&outside, V2).freeze()).unwrap(), outside);
    }

    #[test]
    fn error_messages_name_the_kind() {
        let err = decode_with(V1, &[b'B', 0, 0]).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("Begin message truncated"), "{text}");
        assert!(text.contains("final LSN"), "{text}");
        let err = decode_with(V1, b"E").unwrap_err().to_string();
        assert!(
            err.contains("Stream Stop") && err.contains("version 2"),
            "{err}"
        );
    }

    // ---- property tests ----

    pub(crate) mod strategies {
        use super::*;

        pub fn opts() -> impl Strategy<Value = DecoderOptions> {
            (1u32..=4, any::<bool>()).prop_map(|(proto_version, streaming_parallel)| {
                DecoderOptions {
                    proto_version,
                    streaming_parallel,
                }
            })
        }

        fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
            prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
        }

        /// Names never contain NUL: the wire format cannot carry one.
        fn name() -> impl Strategy<Value = String> {
            "[^\u{0}]{0,12}"
        }

        fn lsn() -> impl Strategy<Value = Lsn> {
            any::<u64>().prop_map(Lsn)
        }

        pub fn datum() -> impl Strategy<Value = Datum> {
            prop_oneof![
                Just(Datum::Null),
                Just(Datum::UnchangedToast),
                bytes(40).prop_map(Datum::Text),
                bytes(40).prop_map(Datum::Binary),
            ]
        }

        pub fn tuple() -> impl Strategy<Value = Tuple> {
            prop::collection::vec(datum(), 0..10).prop_map(Tuple)
        }

        fn old_tuple() -> impl Strategy<Value = OldTuple> {
            prop_oneof![
                tuple().prop_map(OldTuple::Key),
                tuple().prop_map(OldTuple::Full)
            ]
        }

        fn identity() -> impl Strategy<Value = ReplicaIdentity> {
            prop_oneof![
                Just(ReplicaIdentity::Default),
                Just(ReplicaIdentity::Nothing),
                Just(ReplicaIdentity::Full),
                Just(ReplicaIdentity::Index),
            ]
        }

        fn column() -> impl Strategy<Value = Column> {
            (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
                |(flags, name, type_oid, type_modifier)| Column {
                    flags,
                    name,
                    type_oid,
                    type_modifier,
                },
            )
        }

        /// Messages that carry the xid prefix inside a streamed block: `xid` is `Some`
        /// exactly when they are generated for one.
        pub fn row_message(in_stream: bool) -> BoxedStrategy<Message> {
            let xid = move || {
                if in_stream {
                    any::<u32>().prop_map(Some).boxed()
                } else {
                    Just(None).boxed()
                }
            };
            prop_oneof![
                (
                    xid(),
                    any::<u32>(),
                    name(),
                    name(),
                    identity(),
                    prop::collection::vec(column(), 0..6)
                )
                    .prop_map(
                        |(xid, id, namespace, name, replica_identity, columns)| {
                            Message::Relation(Relation {
                                xid,
                                id: RelationId(id),
                                namespace,
                                name,
                                replica_identity,
                                columns,
                            })
                        }
                    ),
                (xid(), any::<u32>(), name(), name()).prop_map(
                    |(xid, type_oid, namespace, name)| Message::Type(TypeInfo {
                        xid,
                        type_oid,
                        namespace,
                        name,
                    })
                ),
                (xid(), any::<u32>(), tuple()).prop_map(|(xid, id, new)| {
                    Message::Insert(Insert {
                        xid,
                        relation: RelationId(id),
                        new,
                    })
                }),
                (xid(), any::<u32>(), prop::option::of(old_tuple()), tuple()).prop_map(
                    |(xid, id, old, new)| Message::Update(Update {
                        xid,
                        relation: RelationId(id),
                        old,
                        new,
                    })
                ),
                (xid(), any::<u32>(), old_tuple()).prop_map(|(xid, id, old)| {
                    Message::Delete(Delete {
                        xid,
                        relation: RelationId(id),
                        old,
                    })
                }),
                (
                    xid(),
                    any::<u8>(),
                    prop::collection::vec(any::<u32>(), 0..6)
                )
                    .prop_map(|(xid, options, ids)| Message::Truncate(Truncate {
                        xid,
                        options,
                        relations: ids.into_iter().map(RelationId).collect(),
                    })),
                (xid(), any::<u8>(), lsn(), name(), bytes(64)).prop_map(
                    |(xid, flags, lsn, prefix, content)| Message::Message(LogicalMessage {
                        xid,
                        flags,
                        lsn,
                        prefix,
                        content,
                    })
                ),
            ]
            .boxed()
        }

        fn origin() -> impl Strategy<Value = Message> {
            (lsn(), name())
                .prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name }))
        }

        fn prepare() -> impl Strategy<Value = Prepare> {
            (
                any::<u8>(),
                lsn(),
                lsn(),
                any::<i64>(),
                any::<u32>(),
                name(),
            )
                .prop_map(|(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                    Prepare {
                        flags,
                        prepare_lsn,
                        end_lsn,
                        prepare_time,
                        xid,
                        gid,
                    }
                })
        }

        /// Messages that only occur outside a streamed block and that `opts` can produce.
        pub fn boundary_message(opts: DecoderOptions) -> BoxedStrategy<Message> {
            let mut choices: Vec<BoxedStrategy<Message>> = vec![
                (lsn(), any::<i64>(), any::<u32>())
                    .prop_map(|(final_lsn, commit_time, xid)| {
                        Message::Begin(Begin {
                            final_lsn,
                            commit_time,
                            xid,
                        })
                    })
                    .boxed(),
                (any::<u8>(), lsn(), lsn(), any::<i64>())
                    .prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
                        Message::Commit(Commit {
                            flags,
                            commit_lsn,
                            end_lsn,
                            commit_time,
                        })
                    })
                    .boxed(),
                origin().boxed(),
            ];
            if opts.proto_version >= 2 {
                let abort_info = opts.stream_abort_info();
                choices.push(
                    (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>())
                        .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_time)| {
                            Message::StreamCommit(StreamCommit {
                                xid,
                                flags,
                                commit_lsn,
                                end_lsn,
                                commit_time,
                            })
                        })
                        .boxed(),
                );
                choices.push(
                    (any::<u32>(), any::<u32>(), lsn(), any::<i64>())
                        .prop_map(move |(xid, subxid, lsn, ts)| {
                            Message::StreamAbort(StreamAbort {
                                xid,
                                subxid,
                                abort: abort_info.then_some((lsn, ts)),
                            })
                        })
                        .boxed(),
                );
            }
            if opts.proto_version >= 3 {
                choices.push(
                    (lsn(), lsn(), any::<i64>(), any::<u32>(), name())
                        .prop_map(|(prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                            Message::BeginPrepare(BeginPrepare {
                                prepare_lsn,
                                end_lsn,
                                prepare_time,
                                xid,
                                gid,
                            })
                        })
                        .boxed(),
                );
                choices.push(prepare().prop_map(Message::Prepare).boxed());
                choices.push(prepare().prop_map(Message::StreamPrepare).boxed());
                choices.push(
                    (
                        any::<u8>(),
                        lsn(),
                        lsn(),
                        any::<i64>(),
                        any::<u32>(),
                        name(),
                    )
                        .prop_map(|(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
                            Message::CommitPrepared(CommitPrepared {
                                flags,
                                commit_lsn,
                                end_lsn,
                                commit_time,
                                xid,
                                gid,
                            })
                        })
                        .boxed(),
                );
                choices.push(
                    (
                        any::<u8>(),
                        lsn(),
                        lsn(),
                        any::<i64>(),
                        any::<i64>(),
                        any::<u32>(),
                        name(),
                    )
                        .prop_map(|(flags, pe, re, pt, rt, xid, gid)| {
                            Message::RollbackPrepared(RollbackPrepared {
                                flags,
                                prepare_end_lsn: pe,
                                rollback_end_lsn: re,
                                prepare_time: pt,
                                rollback_time: rt,
                                xid,
                                gid,
                            })
                        })
                        .boxed(),
                );
            }
            prop::strategy::Union::new(choices).boxed()
        }

        /// A piece of a session: one message outside a block, or a whole streamed block.
        fn segment(opts: DecoderOptions) -> BoxedStrategy<Vec<Message>> {
            let plain = prop_oneof![row_message(false), boundary_message(opts)]
                .prop_map(|m| vec![m])
                .boxed();
            if opts.proto_version < 2 {
                return plain;
            }
            let block = (
                any::<u32>(),
                any::<bool>(),
                prop::collection::vec(prop_oneof![9 => row_message(true), 1 => origin()], 0..6),
            )
                .prop_map(|(xid, first_segment, body)| {
                    let mut msgs = vec![Message::StreamStart(StreamStart { xid, first_segment })];
                    msgs.extend(body);
                    msgs.push(Message::StreamStop);
                    msgs
                });
            prop_oneof![2 => plain, 1 => block].boxed()
        }

        /// Options plus a message sequence that a server using them could send, in order.
        pub fn session() -> impl Strategy<Value = (DecoderOptions, Vec<Message>)> {
            opts().prop_flat_map(|opts| {
                (
                    Just(opts),
                    prop::collection::vec(segment(opts), 1..8)
                        .prop_map(|segs| segs.into_iter().flatten().collect::<Vec<_>>()),
                )
            })
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn encode_decode_round_trip((opts, msgs) in strategies::session()) {
            let mut d = Decoder::new(opts);
            for msg in &msgs {
                let bytes = encode(msg, opts).freeze();
                let decoded = d.decode(bytes.clone());
                prop_assert_eq!(decoded.as_ref(), Ok(msg), "bytes {:02x?}", &bytes[..]);
                let expect_in_stream = match msg {
                    Message::StreamStart(_) => Some(true),
                    Message::StreamStop => Some(false),
                    _ => None,
                };
                if let Some(expected) = expect_in_stream {
                    prop_assert_eq!(d.in_stream(), expected);
                }
            }
        }

        /// Every strict prefix of a valid message is refused as truncated (or empty), and
        /// the refusal leaves the stream state alone.
        #[test]
        fn every_prefix_is_truncated((opts, msgs) in strategies::session()) {
            let mut d = Decoder::new(opts);
            for msg in &msgs {
                let bytes = encode(msg, opts).freeze();
                for cut in 0..bytes.len() {
                    let mut probe = d.clone();
                    let err = probe.decode(bytes.slice(..cut)).unwrap_err();
                    if cut == 0 {
                        prop_assert_eq!(err, DecodeError::Empty);
                    } else {
                        prop_assert!(
                            matches!(err, DecodeError::Truncated { .. }),
                            "cut {} of {:?}: {:?}", cut, msg, err
                        );
                    }
                    prop_assert_eq!(probe.in_stream(), d.in_stream());
                }
                d.decode(bytes).unwrap();
            }
        }

        /// Arbitrary bytes never panic, and whatever is accepted re-encodes to exactly the
        /// bytes it came from (the accepted format is canonical).
        #[test]
        fn arbitrary_bytes_never_panic(
            opts in strategies::opts(),
            in_stream in any::<bool>(),
            tag in prop::sample::select(b"BCORYIUDTMSEcAbPKrpxN".to_vec()),
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut d = Decoder::new(opts);
            if in_stream && opts.proto_version >= 2 {
                d.decode(Bytes::from_static(&[b'S', 0, 0, 0, 1, 1])).unwrap();
            }
            let mut input = vec![tag];
            input.extend_from_slice(&body);
            let before = d.in_stream();
            match d.decode(Bytes::from(input.clone())) {
                Ok(msg) => prop_assert_eq!(&encode(&msg, opts)[..], &input[..]),
                Err(_) => prop_assert_eq!(d.in_stream(), before),
            }
        }

        /// Corrupting one byte of a valid message: never a panic, and if the result is still
        /// accepted, it is canonical.
        #[test]
        fn mutated_messages_never_panic(
            (opts, msgs) in strategies::session(),
            pos in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let mut d = Decoder::new(opts);
            for msg in &msgs {
                let bytes = encode(msg, opts);
                let mut mutated = bytes.clone();
                let i = pos.index(mutated.len());
                mutated[i] ^= xor;
                let mutated = mutated.freeze();
                if let Ok(m) = d.clone().decode(mutated.clone()) {
                    prop_assert_eq!(&encode(&m, opts)[..], &mutated[..]);
                }
                d.decode(bytes.freeze()).unwrap();
            }
        }
    }
}
