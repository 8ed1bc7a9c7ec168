//! What may be confirmed to the source: the longest prefix of source transactions that is
//! durable everywhere it had to go. A pure state machine; the writers report flushes.
//!
//! Invariants:
//! - A source commit is durable when every target it touched has committed it (a commit
//!   that touched no moving tenant is durable at once, but only behind everything before it).
//! - [`DurableTracker::confirmable`] only moves forward and never passes a commit that some
//!   target still owes, however far other targets have got: the slot position is the minimum
//!   over targets, never a maximum.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::lsn::{CommitLsn, Lsn};
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

/// Per target, the source transactions handed over and not applied there yet (commit end
/// and commit time, oldest first), and how far the target is *caught up*: it holds every
/// transaction up to there that concerned it, and the rest did not. Lag is measured from
/// these; what may be confirmed is the tracker's business.
///
/// It also measures how long the target takes from hand-over to applied (the *apply
/// delay*): a cutover's catch-up waits about that long for the changes before its marker,
/// so an attempt that the delay says cannot fit its pause is not started.
#[derive(Debug, Default)]
pub struct Handover {
    targets: BTreeMap<TargetId, Handed>,
}

#[derive(Debug, Default)]
struct Handed {
    /// Commit end, commit time, and when it was handed over.
    queue: VecDeque<(Lsn, i64, Instant)>,
    caught_up: Lsn,
    /// Recent apply delays: when measured, and the delay of the oldest transaction an
    /// acknowledgement settled.
    delays: VecDeque<(Instant, Duration)>,
}

/// How long a measured apply delay counts.
pub const DELAY_WINDOW: Duration = Duration::from_secs(2);

impl Handover {
    /// Starts counting for `target` (if new): nothing before `at` was its to apply.
    pub fn add_target(&mut self, target: &TargetId, at: Lsn) {
        if !self.targets.contains_key(target) {
            let handed = Handed {
                caught_up: at,
                ..Handed::default()
            };
            self.targets.insert(target.clone(), handed);
        }
    }

    /// The transaction ending at `end`, committed at `time` (µs since 2000), was handed to
    /// `target` at `now`.
    pub fn handed(&mut self, target: TargetId, end: Lsn, time: i64, now: Instant) {
        self.targets
            .entry(target)
            .or_default()
            .queue
            .push_back((end, time, now));
    }

    /// The transaction ending at `end` was handed out: every target that owes nothing
    /// holds everything up to it.
    pub fn committed(&mut self, end: Lsn) {
        for h in self.targets.values_mut() {
            if h.queue.is_empty() {
                h.caught_up = end;
            }
        }
    }

    /// `target` applied everything it was handed up to `up_to`, acknowledged at `now`;
    /// returns how many handed transactions that settled.
    pub fn applied(&mut self, target: &TargetId, up_to: Lsn, now: Instant) -> usize {
        let h = match self.targets.get_mut(target) {
            Some(h) => h,
            None => self.targets.entry(target.clone()).or_default(),
        };
        let before = h.queue.len();
        let mut oldest = None;
        while h.queue.front().is_some_and(|(end, _, _)| *end <= up_to) {
            if let Some((_, _, at)) = h.queue.pop_front() {
                oldest.get_or_insert(at);
            }
        }
        if let Some(at) = oldest {
            h.delays.push_back((now, now.saturating_duration_since(at)));
        }
        while h
            .delays
            .front()
            .is_some_and(|(when, _)| now.saturating_duration_since(*when) > DELAY_WINDOW)
        {
            h.delays.pop_front();
        }
        h.caught_up = h.caught_up.max(up_to);
        before - h.queue.len()
    }

    /// How long `target` takes from hand-over to applied, as of `now`: the median of the
    /// delays measured within [`DELAY_WINDOW`] (what an attempt starting now most likely
    /// meets: a spike does not block every attempt of a busy target), or the age of what it
    /// owes if that is longer (a target that stopped acknowledging is as slow as its oldest
    /// debt).
    pub fn apply_delay(&self, target: &TargetId, now: Instant) -> Duration {
        let Some(h) = self.targets.get(target) else {
            return Duration::ZERO;
        };
        let mut recent: Vec<Duration> = h
            .delays
            .iter()
            .filter(|(when, _)| now.saturating_duration_since(*when) <= DELAY_WINDOW)
            .map(|(_, d)| *d)
            .collect();
        recent.sort_unstable();
        let measured = recent.get(recent.len() / 2).copied().unwrap_or_default();
        let owed = h
            .queue
            .front()
            .map(|(_, _, at)| now.saturating_duration_since(*at))
            .unwrap_or_default();
        measured.max(owed)
    }

    /// The oldest transaction `target` still owes: (commit end, commit time).
    pub fn oldest(&self, target: &TargetId) -> Option<(Lsn, i64)> {
        self.targets
            .get(target)
            .and_then(|h| h.queue.front().map(|(end, time, _)| (*end, *time)))
    }

    /// How many transactions `target` owes.
    pub fn owed(&self, target: &TargetId) -> usize {
        self.targets.get(target).map_or(0, |h| h.queue.len())
    }

    /// How far `target` is caught up (`Lsn::INVALID` for a target not counted).
    pub fn caught_up(&self, target: &TargetId) -> Lsn {
        self.targets
            .get(target)
            .map_or(Lsn::INVALID, |h| h.caught_up)
    }

    /// Per target: how many transactions it owes and the oldest one's end (for logs).
    pub fn summary(&self) -> Vec<(String, usize, Option<String>)> {
        self.targets
            .iter()
            .map(|(t, h)| {
                let oldest = h.queue.front().map(|(end, _, _)| end.to_string());
                (t.to_string(), h.queue.len(), oldest)
            })
            .collect()
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

    #[test]
    fn a_target_is_caught_up_when_it_owes_nothing_and_lag_counts_from_its_start() {
        let (a, b) = (TargetId::new("a").unwrap(), TargetId::new("b").unwrap());
        let mut h = Handover::default();
        let now = Instant::now();
        h.add_target(&a, Lsn(50));
        h.add_target(&a, Lsn(70));
        assert_eq!(h.caught_up(&a), Lsn(50), "counted from the first start");
        h.handed(a.clone(), Lsn(100), 1, now);
        h.committed(Lsn(100));
        assert_eq!(h.caught_up(&a), Lsn(50), "a owes 100");
        h.add_target(&b, Lsn(100));
        h.committed(Lsn(120));
        assert_eq!(h.caught_up(&b), Lsn(120), "b owes nothing");
        h.handed(a.clone(), Lsn(130), 2, now);
        assert_eq!(h.oldest(&a), Some((Lsn(100), 1)));
        assert_eq!(h.applied(&a, Lsn(110), now), 1);
        assert_eq!(h.caught_up(&a), Lsn(110));
        assert_eq!((h.owed(&a), h.oldest(&a)), (1, Some((Lsn(130), 2))));
        assert_eq!(h.applied(&a, Lsn(130), now), 1);
        h.committed(Lsn(140));
        assert_eq!(h.caught_up(&a), Lsn(140));
        assert_eq!(h.caught_up(&TargetId::new("c").unwrap()), Lsn::INVALID);
        assert_eq!(h.summary().len(), 2);
    }

    #[test]
    fn the_apply_delay_is_the_recent_median_or_the_age_of_the_debt() {
        let a = TargetId::new("a").unwrap();
        let ms = Duration::from_millis;
        let mut h = Handover::default();
        let t0 = Instant::now();
        h.add_target(&a, Lsn(0));
        assert_eq!(h.apply_delay(&a, t0), Duration::ZERO, "nothing measured");
        h.handed(a.clone(), Lsn(10), 1, t0);
        h.handed(a.clone(), Lsn(20), 2, t0 + ms(5));
        assert_eq!(h.apply_delay(&a, t0 + ms(30)), ms(30), "owed for 30 ms");
        // One acknowledgement settles both: the older one's delay counts.
        assert_eq!(h.applied(&a, Lsn(20), t0 + ms(40)), 2);
        assert_eq!(h.apply_delay(&a, t0 + ms(41)), ms(40));
        h.handed(a.clone(), Lsn(30), 3, t0 + ms(50));
        h.applied(&a, Lsn(30), t0 + ms(52));
        h.handed(a.clone(), Lsn(35), 3, t0 + ms(53));
        h.applied(&a, Lsn(35), t0 + ms(56));
        // 40, 2 and 3 ms: the median, not the spike.
        assert_eq!(
            h.apply_delay(&a, t0 + ms(60)),
            ms(3),
            "the median in the window"
        );
        let later = t0 + ms(52) + DELAY_WINDOW + ms(1);
        assert_eq!(h.apply_delay(&a, later), ms(3), "older measurements expire");
        h.handed(a.clone(), Lsn(40), 4, later);
        h.applied(&a, Lsn(40), later + ms(1));
        let much_later = later + DELAY_WINDOW * 2;
        assert_eq!(
            h.apply_delay(&a, much_later),
            Duration::ZERO,
            "an idle target that owes nothing is not slow"
        );
    }
}
