//! What flush position to report to the server: a pure state machine, no I/O.
//!
//! Invariants:
//! - The reported flush is `max(previous report, consumer-applied commit, safe idle position)`,
//!   so it never moves backward.
//! - A keepalive's `wal_end` is a *safe idle position* only if it arrived outside any
//!   transaction block and every transaction delivered before it is applied. Then the
//!   server has nothing before that position that we still owe an apply for:
//!   transactions still open on the server commit later and are re-sent after a restart.
//!   This is what lets an idle or fully filtered stream release WAL.
//! - Without `ack` nothing is reported (InvalidXLogRecPtr), so the slot does not move.
//! - With a ceiling, nothing past it is reported: the consumer raises the ceiling only to
//!   positions it has recorded durably itself, so a slot confirmed past its record was
//!   moved by someone else. [`Feedback::wanted`] is what would be reported without it.

use crate::decode::Message;
use crate::lsn::Lsn;

#[derive(Debug, Clone)]
pub struct Feedback {
    ack: bool,
    received: Lsn,
    in_block: bool,
    /// End LSN of the last commit handed to the consumer.
    delivered_end: Lsn,
    /// (keepalive wal_end, delivered_end when it arrived).
    idle: Option<(Lsn, Lsn)>,
    reported: Lsn,
    ceiling: Option<Lsn>,
}

impl Feedback {
    pub fn new(ack: bool, start: Lsn) -> Self {
        Feedback {
            ack,
            received: start,
            in_block: false,
            delivered_end: Lsn::INVALID,
            idle: None,
            reported: if ack { start } else { Lsn::INVALID },
            ceiling: None,
        }
    }

    /// Nothing past `lsn` is reported from now on (until a higher ceiling); it only rises.
    pub fn raise_ceiling(&mut self, lsn: Lsn) {
        self.ceiling = Some(self.ceiling.map_or(lsn, |c| c.max(lsn)));
    }

    /// A new connection starts outside any block; what was delivered stays delivered.
    pub fn on_reconnect(&mut self) {
        self.in_block = false;
        self.idle = None;
    }

    /// Call for every message *as it is handed to the consumer*.
    pub fn on_delivered(&mut self, message: &Message, wal_end: Lsn) {
        self.received = self.received.max(wal_end);
        match message {
            Message::Begin(_) | Message::BeginPrepare(_) | Message::StreamStart(_) => {
                self.in_block = true
            }
            Message::Commit(c) => {
                self.in_block = false;
                self.delivered_end = self.delivered_end.max(c.end_lsn);
            }
            Message::StreamCommit(c) => {
                self.in_block = false;
                self.delivered_end = self.delivered_end.max(c.end_lsn);
            }
            Message::CommitPrepared(c) => {
                self.in_block = false;
                self.delivered_end = self.delivered_end.max(c.end_lsn);
            }
            Message::Prepare(p) | Message::StreamPrepare(p) => {
                self.in_block = false;
                self.delivered_end = self.delivered_end.max(p.end_lsn);
            }
            Message::RollbackPrepared(r) => {
                self.in_block = false;
                self.delivered_end = self.delivered_end.max(r.rollback_end_lsn);
            }
            Message::StreamStop | Message::StreamAbort(_) => self.in_block = false,
            _ => {}
        }
    }

    pub fn on_keepalive(&mut self, wal_end: Lsn) {
        self.received = self.received.max(wal_end);
        if !self.in_block {
            self.idle = Some((wal_end, self.delivered_end));
        }
    }

    /// Outside any block with everything delivered applied: a fresh keepalive position
    /// could be confirmed right away.
    pub fn caught_up(&self, applied: Lsn) -> bool {
        self.ack && !self.in_block && applied >= self.delivered_end
    }

    /// End of the last transaction handed to the consumer. Everything before it is in
    /// the consumer's hands (queued or processed), so a reconnect resumes here: earlier
    /// would deliver those transactions twice, later would skip some.
    pub fn delivered(&self) -> Lsn {
        self.delivered_end
    }

    pub fn received(&self) -> Lsn {
        self.received
    }

    /// The flush position the next status update would carry, without recording it.
    pub fn peek(&self, applied: Lsn) -> Lsn {
        let wanted = self.wanted(applied);
        match self.ceiling {
            Some(ceiling) => wanted.min(ceiling).max(self.reported),
            None => wanted,
        }
    }

    /// What could be confirmed given what is applied now, ceiling aside: the position the
    /// consumer has to record before the ceiling lets it through.
    pub fn wanted(&self, applied: Lsn) -> Lsn {
        if !self.ack {
            return Lsn::INVALID;
        }
        let mut flush = self.reported.max(applied);
        if let Some((wal_end, needed)) = self.idle {
            if applied >= needed {
                flush = flush.max(wal_end);
            }
        }
        flush
    }

    /// The flush position to put in the next status update, given what is applied now.
    pub fn flush(&mut self, applied: Lsn) -> Lsn {
        let flush = self.peek(applied);
        if self.ack {
            self.reported = flush;
        }
        flush
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Begin, Commit};

    fn begin() -> Message {
        Message::Begin(Begin {
            final_lsn: Lsn(0),
            commit_time: 0,
            xid: 1,
        })
    }
    fn commit(end: u64) -> Message {
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(end - 8),
            end_lsn: Lsn(end),
            commit_time: 0,
        })
    }

    #[test]
    fn idle_stream_advances_to_keepalive() {
        let mut f = Feedback::new(true, Lsn(100));
        f.on_keepalive(Lsn(500));
        assert_eq!(f.flush(Lsn(100)), Lsn(500));
    }

    #[test]
    fn keepalive_inside_transaction_is_not_used() {
        let mut f = Feedback::new(true, Lsn(100));
        f.on_delivered(&begin(), Lsn(150));
        f.on_keepalive(Lsn(500));
        assert_eq!(f.flush(Lsn(100)), Lsn(100));
        f.on_delivered(&commit(200), Lsn(200));
        // The commit is delivered but not applied yet: stay put.
        assert_eq!(f.flush(Lsn(100)), Lsn(100));
        assert_eq!(f.flush(Lsn(200)), Lsn(200));
    }

    #[test]
    fn keepalive_waits_for_earlier_deliveries_to_be_durable() {
        let mut f = Feedback::new(true, Lsn(100));
        f.on_delivered(&begin(), Lsn(150));
        f.on_delivered(&commit(200), Lsn(200));
        f.on_keepalive(Lsn(900));
        assert_eq!(f.flush(Lsn(150)), Lsn(150));
        assert_eq!(f.flush(Lsn(200)), Lsn(900));
    }

    #[test]
    fn caught_up_only_outside_blocks_with_everything_durable() {
        let mut f = Feedback::new(true, Lsn(100));
        assert!(f.caught_up(Lsn(100)));
        f.on_delivered(&begin(), Lsn(150));
        assert!(!f.caught_up(Lsn(100)));
        f.on_delivered(&commit(200), Lsn(200));
        assert!(!f.caught_up(Lsn(150)));
        assert!(f.caught_up(Lsn(200)));
        assert!(!Feedback::new(false, Lsn(1)).caught_up(Lsn(1)));
    }

    #[test]
    fn never_moves_backward_and_no_ack_reports_nothing() {
        let mut f = Feedback::new(true, Lsn(100));
        assert_eq!(f.flush(Lsn(300)), Lsn(300));
        assert_eq!(f.flush(Lsn(200)), Lsn(300));
        let mut n = Feedback::new(false, Lsn(100));
        n.on_keepalive(Lsn(500));
        assert_eq!(n.flush(Lsn(400)), Lsn::INVALID);
    }

    #[test]
    fn reconnect_drops_idle_candidate_and_block_state() {
        let mut f = Feedback::new(true, Lsn(100));
        f.on_delivered(&begin(), Lsn(150));
        f.on_reconnect();
        f.on_keepalive(Lsn(400));
        assert_eq!(f.flush(Lsn(100)), Lsn(400));
    }

    #[test]
    fn streamed_blocks_count_as_open() {
        use crate::decode::StreamStart;
        let mut f = Feedback::new(true, Lsn(100));
        f.on_delivered(
            &Message::StreamStart(StreamStart {
                xid: 7,
                first_segment: true,
            }),
            Lsn(120),
        );
        f.on_keepalive(Lsn(300));
        assert_eq!(f.flush(Lsn(100)), Lsn(100));
        f.on_delivered(&Message::StreamStop, Lsn(130));
        f.on_keepalive(Lsn(310));
        assert_eq!(f.flush(Lsn(100)), Lsn(310));
    }

    #[test]
    fn nothing_past_the_ceiling_is_reported_and_wanted_says_what_waits() {
        let mut f = Feedback::new(true, Lsn::INVALID);
        f.raise_ceiling(Lsn(300));
        f.on_keepalive(Lsn(500));
        assert_eq!(f.wanted(Lsn(100)), Lsn(500));
        assert_eq!(f.flush(Lsn(100)), Lsn(300));
        // A lower ceiling never takes back what was reported, nor lowers the ceiling.
        f.raise_ceiling(Lsn(200));
        assert_eq!(f.flush(Lsn(100)), Lsn(300));
        f.raise_ceiling(Lsn(600));
        assert_eq!(f.flush(Lsn(100)), Lsn(500));
        // Without a ceiling (tail), positions pass as they are.
        let mut open = Feedback::new(true, Lsn::INVALID);
        open.on_keepalive(Lsn(500));
        assert_eq!(open.flush(Lsn(100)), Lsn(500));
    }
}
