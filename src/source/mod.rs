//! The replication source: one logical slot read over our own replication connection.
//!
//! ```text
//!   ReplicationConnection ──frames──► stream task ──decode──► byte-budgeted channel ──► consumer
//!          ▲                              │  ▲                                            │
//!          └──── standby status ◄─ Feedback ─┘ ◄──────── mark_applied(end_lsn) ◄───────────┘
//! ```
//!
//! Positions, in one vocabulary: *received* (the furthest the server sent), *applied* (commit
//! ends, [`crate::lsn::CommitLsn`], the consumer marked as held downstream) and *confirmed*
//! (the flush position reported to the server, which moves the slot).
//!
//! Invariants:
//! - The flush position sent to the server is only ever what the consumer marked applied,
//!   or a keepalive position that provably covers nothing undelivered (see [`feedback`]);
//!   it never moves backward, and without `ack` it is never sent at all.
//! - Feedback keeps flowing while the consumer applies back-pressure: the task stops reading
//!   the socket, not answering it.
//! - A missing or invalidated slot is fatal and is never recreated here.
//! - Reconnects resume after the last transaction handed to the consumer (it is queued or
//!   processed, never lost: the channel survives the connection); the consumer is told
//!   with [`SourceEvent::Restarted`] so it can drop a partially received transaction,
//!   which the server sends again from its start.

pub mod check;
pub mod connection;
pub mod feedback;
pub mod filter;
pub mod slot;
mod stream;
pub mod wire;

use std::time::Duration;

pub use connection::{ReplicationConnection, StartOptions, SystemInfo};
pub use stream::{Received, ReplicationStream, SourceEvent, StreamSettings};
pub use wire::ServerNotice;

use crate::decode::DecodeError;

/// Errors of the replication source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server closed the replication connection")]
    Closed,
    #[error("timed out {what} after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("{context}: {notice}")]
    Server {
        context: String,
        notice: Box<ServerNotice>,
    },
    #[error("replication slot {slot:?} does not exist; it was dropped or never created. switchyard never recreates a slot on its own, because changes made while it was missing would be silently lost. Fix: re-create it deliberately (`switchyard tail --create-slot`, or start the moves again)")]
    SlotMissing { slot: String },
    #[error("replication slot {slot:?} has been invalidated ({reason}); the WAL it needed is gone, so changes since its confirmed position are lost. Fix: raise max_slot_wal_keep_size, drop the slot and restart the moves from a fresh copy")]
    SlotInvalidated { slot: String, reason: String },
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("undecodable pgoutput message at {lsn}: {source}")]
    Decode {
        lsn: crate::lsn::Lsn,
        #[source]
        source: DecodeError,
    },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl SourceError {
    /// True when reconnecting may succeed: network trouble, a restarting server, a
    /// terminated walsender, or a slot still held by a dying previous session.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Io { .. } | SourceError::Closed | SourceError::Timeout { .. } => true,
            SourceError::Server { notice, .. } => is_transient_sqlstate(&notice.code),
            SourceError::Cluster(e) => e.is_transient(),
            _ => false,
        }
    }

    /// Turns server errors about the slot into their specific, loud variants.
    pub fn for_slot(self, slot: &str) -> SourceError {
        match &self {
            SourceError::Server { notice, .. } => {
                let msg = notice.message.as_str();
                if notice.code == "42704" && msg.contains("replication slot") {
                    SourceError::SlotMissing {
                        slot: slot.to_owned(),
                    }
                } else if msg.contains("invalidated")
                    || notice
                        .detail
                        .as_deref()
                        .is_some_and(|d| d.contains("invalidated"))
                    || msg.contains("cannot read from logical replication slot")
                {
                    SourceError::SlotInvalidated {
                        slot: slot.to_owned(),
                        reason: notice
                            .detail
                            .clone()
                            .unwrap_or_else(|| notice.message.clone()),
                    }
                } else {
                    self
                }
            }
            _ => self,
        }
    }
}

/// SQLSTATEs worth a reconnect: the shared transient set, plus "object in use" (55006: the
/// slot is still active for a walsender that has not noticed its client is gone).
fn is_transient_sqlstate(code: &str) -> bool {
    crate::cluster::is_transient_sqlstate(code) || code == "55006"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, msg: &str, detail: Option<&str>) -> SourceError {
        SourceError::Server {
            context: "START_REPLICATION".into(),
            notice: Box::new(ServerNotice {
                severity: "ERROR".into(),
                code: code.into(),
                message: msg.into(),
                detail: detail.map(str::to_owned),
                hint: None,
            }),
        }
    }

    #[test]
    fn slot_errors_become_specific_and_fatal() {
        let e = server("42704", "replication slot \"s\" does not exist", None).for_slot("s");
        assert!(matches!(e, SourceError::SlotMissing { .. }));
        assert!(!e.is_transient());
        let e = server(
            "55000",
            "can no longer get changes from replication slot \"s\"",
            Some("This slot has been invalidated because it exceeded the maximum reserved size."),
        )
        .for_slot("s");
        assert!(matches!(e, SourceError::SlotInvalidated { .. }), "{e}");
        assert!(!e.is_transient());
    }

    #[test]
    fn transient_classification() {
        assert!(server(
            "57P01",
            "terminating connection due to administrator command",
            None
        )
        .is_transient());
        assert!(
            server("55006", "replication slot \"s\" is active for PID 1", None)
                .for_slot("s")
                .is_transient()
        );
        assert!(!server("28P01", "password authentication failed", None).is_transient());
        assert!(SourceError::Closed.is_transient());
        assert!(!SourceError::Auth("x".into()).is_transient());
    }
}
