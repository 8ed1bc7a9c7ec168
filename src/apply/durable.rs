//! What may be confirmed to the source: the longest prefix of source transactions that is
//! durable everywhere it had to go. A pure state machine; the writers report flushes.
//!
//! Invariants:
//! - A source commit is durable when every target it touched has committed it (a commit
//!   that touched no moving tenant is durable at once, but only behind everything before it).
//! - [`DurableTracker::confirmable`] only moves forward and never passes a commit that some
//!   target still owes, however far other targets have got: the slot position is the minimum
//!   over targets, never a maximum.

use std::collections::{BTreeSet, VecDeque};

use crate::lsn::CommitLsn;
use crate::tenant::TargetId;

#[derive(Debug)]
struct Pending {
    end: CommitLsn,
    waiting: BTreeSet<TargetId>,
}

#[derive(Debug, Default)]
pub struct DurableTracker {
    queue: VecDeque<Pending>,
    confirmable: CommitLsn,
}

impl DurableTracker {
    pub fn new(start: CommitLsn) -> Self {
        DurableTracker {
            queue: VecDeque::new(),
            confirmable: start,
        }
    }

    /// A source transaction ending at `end` was handed to these targets (maybe none).
    /// Commits must be reported in source order.
    pub fn on_commit(&mut self, end: CommitLsn, targets: BTreeSet<TargetId>) {
        debug_assert!(
            self.queue.back().is_none_or(|p| p.end <= end),
            "commits are reported in source order"
        );
        self.queue.push_back(Pending {
            end,
            waiting: targets,
        });
        self.advance();
    }

    /// `target` has applied (durably committed) every transaction it was given up to `up_to`.
    pub fn on_applied(&mut self, target: &TargetId, up_to: CommitLsn) {
        for p in self.queue.iter_mut() {
            if p.end > up_to {
                break;
            }
            p.waiting.remove(target);
        }
        self.advance();
    }

    fn advance(&mut self) {
        while let Some(front) = self.queue.front() {
            if !front.waiting.is_empty() {
                break;
            }
            self.confirmable = self.confirmable.max(front.end);
            self.queue.pop_front();
        }
    }

    /// Everything up to here is applied at every target it went to, and may be confirmed
    /// to the source.
    pub fn confirmable(&self) -> CommitLsn {
        self.confirmable
    }

    /// Transactions handed out and not yet durable everywhere.
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use proptest::prelude::*;

    fn c(n: u64) -> CommitLsn {
        CommitLsn::of(Lsn(n))
    }

    fn tg(names: &[&str]) -> BTreeSet<TargetId> {
        names.iter().map(|n| TargetId::new(*n).unwrap()).collect()
    }

    #[test]
    fn the_slowest_target_holds_the_position() {
        let mut d = DurableTracker::new(c(10));
        d.on_commit(c(100), tg(&["a"]));
        d.on_commit(c(200), tg(&["b"]));
        d.on_commit(c(300), tg(&[]));
        assert_eq!(d.confirmable(), c(10));
        d.on_applied(&TargetId::new("b").unwrap(), c(200));
        assert_eq!(d.confirmable(), c(10), "a still owes 100");
        d.on_applied(&TargetId::new("a").unwrap(), c(100));
        assert_eq!(
            d.confirmable(),
            c(300),
            "then everything, incl. the untouched commit"
        );
        assert_eq!(d.outstanding(), 0);
    }

    #[test]
    fn untouched_commits_are_durable_at_once_when_nothing_is_ahead() {
        let mut d = DurableTracker::new(c(1));
        d.on_commit(c(50), tg(&[]));
        assert_eq!(d.confirmable(), c(50));
    }

    #[test]
    fn a_commit_for_two_targets_waits_for_both() {
        let mut d = DurableTracker::new(c(1));
        d.on_commit(c(50), tg(&["a", "b"]));
        d.on_applied(&TargetId::new("a").unwrap(), c(50));
        assert_eq!(d.confirmable(), c(1));
        d.on_applied(&TargetId::new("b").unwrap(), c(60));
        assert_eq!(d.confirmable(), c(50));
    }

    proptest! {
        /// Against a brute-force model: durable is the end of the longest fully flushed prefix.
        #[test]
        fn matches_a_brute_force_model(
            commits in proptest::collection::vec(proptest::collection::btree_set(0u8..3, 0..3), 1..30),
            flushes in proptest::collection::vec((0u8..3, 0usize..30), 0..40),
        ) {
            let name = |i: u8| TargetId::new(format!("t{i}")).unwrap();
            let mut d = DurableTracker::new(c(0));
            let ends: Vec<CommitLsn> = (1..=commits.len() as u64).map(|i| c(i * 10)).collect();
            for (i, c) in commits.iter().enumerate() {
                d.on_commit(ends[i], c.iter().map(|t| name(*t)).collect());
            }
            let mut flushed = [c(0); 3];
            let mut last = d.confirmable();
            for (t, upto) in flushes {
                let up_to = c((upto as u64) * 10);
                flushed[t as usize] = flushed[t as usize].max(up_to);
                d.on_applied(&name(t), up_to);
                prop_assert!(d.confirmable() >= last, "durable moved backward");
                last = d.confirmable();
            }
            let mut model = c(0);
            for (i, c) in commits.iter().enumerate() {
                if c.iter().all(|t| flushed[*t as usize] >= ends[i]) {
                    model = ends[i];
                } else {
                    break;
                }
            }
            prop_assert_eq!(d.confirmable(), model);
        }
    }
}
