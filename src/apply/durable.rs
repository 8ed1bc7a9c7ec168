//! What may be confirmed to the source: the longest prefix of source transactions that is
//! durable everywhere it had to go. A pure state machine; the writers report flushes.
//!
//! Invariants:
//! - A source commit is durable when every target it touched has committed it (a commit
//!   that touched no moving tenant is durable at once, but only behind everything before it).
//! - [`DurableTracker::durable`] only moves forward and never passes a commit that some
//!   target still owes, however far other targets have got: the slot position is the minimum
//!   over targets, never a maximum.

use std::collections::{BTreeSet, VecDeque};

use crate::lsn::Lsn;
use crate::tenant::TargetId;

#[derive(Debug)]
struct Pending {
    end: Lsn,
    waiting: BTreeSet<TargetId>,
}

#[derive(Debug, Default)]
pub struct DurableTracker {
    queue: VecDeque<Pending>,
    durable: Lsn,
}

impl DurableTracker {
    pub fn new(start: Lsn) -> Self {
        DurableTracker {
            queue: VecDeque::new(),
            durable: start,
        }
    }

    /// A source transaction ending at `end` was handed to these targets (maybe none).
    /// Commits must be reported in source order.
    pub fn on_commit(&mut self, end: Lsn, targets: BTreeSet<TargetId>) {
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

    /// `target` has durably committed every transaction it was given up to `up_to`.
    pub fn on_flushed(&mut self, target: &TargetId, up_to: Lsn) {
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
            self.durable = self.durable.max(front.end);
            self.queue.pop_front();
        }
    }

    /// Everything up to here is durable downstream and may be confirmed to the source.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// Transactions handed out and not yet durable everywhere.
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tg(names: &[&str]) -> BTreeSet<TargetId> {
        names.iter().map(|n| TargetId::new(*n).unwrap()).collect()
    }

    #[test]
    fn the_slowest_target_holds_the_position() {
        let mut d = DurableTracker::new(Lsn(10));
        d.on_commit(Lsn(100), tg(&["a"]));
        d.on_commit(Lsn(200), tg(&["b"]));
        d.on_commit(Lsn(300), tg(&[]));
        assert_eq!(d.durable(), Lsn(10));
        d.on_flushed(&TargetId::new("b").unwrap(), Lsn(200));
        assert_eq!(d.durable(), Lsn(10), "a still owes 100");
        d.on_flushed(&TargetId::new("a").unwrap(), Lsn(100));
        assert_eq!(
            d.durable(),
            Lsn(300),
            "then everything, incl. the untouched commit"
        );
        assert_eq!(d.outstanding(), 0);
    }

    #[test]
    fn untouched_commits_are_durable_at_once_when_nothing_is_ahead() {
        let mut d = DurableTracker::new(Lsn(1));
        d.on_commit(Lsn(50), tg(&[]));
        assert_eq!(d.durable(), Lsn(50));
    }

    #[test]
    fn a_commit_for_two_targets_waits_for_both() {
        let mut d = DurableTracker::new(Lsn(1));
        d.on_commit(Lsn(50), tg(&["a", "b"]));
        d.on_flushed(&TargetId::new("a").unwrap(), Lsn(50));
        assert_eq!(d.durable(), Lsn(1));
        d.on_flushed(&TargetId::new("b").unwrap(), Lsn(60));
        assert_eq!(d.durable(), Lsn(50));
    }

    proptest! {
        /// Against a brute-force model: durable is the end of the longest fully flushed prefix.
        #[test]
        fn matches_a_brute_force_model(
            commits in proptest::collection::vec(proptest::collection::btree_set(0u8..3, 0..3), 1..30),
            flushes in proptest::collection::vec((0u8..3, 0usize..30), 0..40),
        ) {
            let name = |i: u8| TargetId::new(format!("t{i}")).unwrap();
            let mut d = DurableTracker::new(Lsn(0));
            let ends: Vec<Lsn> = (1..=commits.len() as u64).map(|i| Lsn(i * 10)).collect();
            for (i, c) in commits.iter().enumerate() {
                d.on_commit(ends[i], c.iter().map(|t| name(*t)).collect());
            }
            let mut flushed = [Lsn(0); 3];
            let mut last = d.durable();
            for (t, upto) in flushes {
                let up_to = Lsn((upto as u64) * 10);
                flushed[t as usize] = flushed[t as usize].max(up_to);
                d.on_flushed(&name(t), up_to);
                prop_assert!(d.durable() >= last, "durable moved backward");
                last = d.durable();
            }
            let mut model = Lsn(0);
            for (i, c) in commits.iter().enumerate() {
                if c.iter().all(|t| flushed[*t as usize] >= ends[i]) {
                    model = ends[i];
                } else {
                    break;
                }
            }
            prop_assert_eq!(d.durable(), model);
        }
    }
}
