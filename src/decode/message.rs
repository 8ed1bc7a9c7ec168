//! Typed pgoutput messages, field for field as the PostgreSQL protocol documents them
//! ("Logical Replication Message Formats", protocol versions 1–4).
//!
//! Invariants:
//! - Values borrow from the received buffer (`Bytes` slices): decoding copies no row data.
//! - `xid` fields that exist only inside a streamed block are `Option`s, `None` outside one.
//! - Nothing here interprets a column value; that needs the relation cache and type OIDs.

use bytes::Bytes;

use crate::lsn::{CommitLsn, Lsn};

/// OID of a source relation as pgoutput names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct RelationId(pub u32);

impl std::fmt::Display for RelationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Transaction id (32-bit, as pgoutput sends it).
pub type Xid = u32;

/// Microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL's epoch).
pub type PgTimestamp = i64;

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(Prepare),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record: where this transaction ends.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: Xid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

impl Commit {
    /// The commit's end, as the position the pipeline counts in.
    pub fn end(&self) -> CommitLsn {
        CommitLsn::of(self.end_lsn)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// Replica identity setting of a relation (`pg_class.relreplident`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ReplicaIdentity {
    /// 'd': primary key columns.
    Default,
    /// 'n': nothing; UPDATE/DELETE carry no old key.
    Nothing,
    /// 'f': all columns.
    Full,
    /// 'i': a chosen unique index.
    Index,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Bit 0 set: column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl Column {
    pub fn is_key(&self) -> bool {
        self.flags & 1 == 1
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub xid: Option<Xid>,
    pub id: RelationId,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    pub xid: Option<Xid>,
    pub type_oid: u32,
    pub namespace: String,
    pub name: String,
}

/// One column of a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value: the real value is not in the stream and must not be
    /// overwritten on the target.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

impl Datum {
    /// Bytes it takes as a parameter or a COPY field, about: its value and a length word.
    pub fn weight(&self) -> usize {
        match self {
            Datum::Text(b) | Datum::Binary(b) => b.len() + 4,
            Datum::Null | Datum::UnchangedToast => 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuple(pub Vec<Datum>);

impl Tuple {
    /// Whether some column's value is not in the stream (an unchanged TOASTed value).
    pub fn has_unchanged_toast(&self) -> bool {
        self.0.iter().any(|d| matches!(d, Datum::UnchangedToast))
    }
}

/// Which old tuple an UPDATE or DELETE carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity key columns are set (others are null).
    Key(Tuple),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }

    pub fn into_tuple(self) -> Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    pub xid: Option<Xid>,
    pub relation: RelationId,
    pub new: Tuple,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub xid: Option<Xid>,
    pub relation: RelationId,
    /// Present when the key changed (`K`) or the identity is FULL (`O`).
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    pub xid: Option<Xid>,
    pub relation: RelationId,
    pub old: OldTuple,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<Xid>,
    /// Bit 0: CASCADE, bit 1: RESTART IDENTITY.
    pub options: u8,
    pub relations: Vec<RelationId>,
}

impl Truncate {
    pub fn cascade(&self) -> bool {
        self.options & 1 != 0
    }
    pub fn restart_identity(&self) -> bool {
        self.options & 2 != 0
    }
}

/// A message written with `pg_logical_emit_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    pub xid: Option<Xid>,
    /// Bit 0: transactional.
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

impl LogicalMessage {
    pub fn transactional(&self) -> bool {
        self.flags & 1 != 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: Xid,
    /// True on the first block of this transaction.
    pub first_segment: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: Xid,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: Xid,
    /// Equal to `xid` when the whole transaction aborted, else the aborted subtransaction.
    pub subxid: Xid,
    /// Present with protocol v4 and `streaming = parallel`.
    pub abort: Option<(Lsn, PgTimestamp)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

/// Prepare ('P') and Stream Prepare ('p') share this layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitPrepared {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackPrepared {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub rollback_time: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}
