//! Which registry rows the daemon acts on at a poll: the tenants it moves follow their own
//! move row, and requested moves are admitted to setup one per tenant, when they may start.
//!
//! Invariants:
//! - A tenant being moved follows its own move row, whatever other rows of the tenant say:
//!   paused, finished (cancelled, rolled back, cleaned) or deleted, it stops.
//! - At most one setup per tenant runs, and only for the first unfinished row of a tenant
//!   (in registry order) that asks for one (`requested`, or `provisioning` left by a crash).
//! - A setup that failed transiently is not tried again before its retry time.
//! - A tenant stopped here starts again only once every transaction handed over before its
//!   stop is applied or dropped: its old queued work can never land after its new start.
//!
//! Pure: no I/O, no clock of its own; the daemon passes the time and the tracker's state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::lsn::Lsn;
use crate::registry::{Move, MoveState};
use crate::tenant::TenantId;

/// How long after a transient setup failure the move is tried again.
pub(super) const SETUP_RETRY: Duration = Duration::from_secs(5);

/// What becomes of a tenant being moved, by its own move row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Follow {
    /// The row still asks for the stream, in this state.
    Moving(MoveState),
    /// The row stopped asking (its state, or `deleted`).
    Stop(String),
}

/// Each moving tenant `(tenant, move id)` against the registry's rows.
pub(super) fn follow<'a>(
    moving: impl IntoIterator<Item = (&'a TenantId, i64)>,
    moves: &[Move],
) -> Vec<(TenantId, Follow)> {
    let by_id: HashMap<i64, &Move> = moves.iter().map(|m| (m.id, m)).collect();
    moving
        .into_iter()
        .map(|(tenant, id)| {
            let follow = match by_id.get(&id) {
                Some(mv) if mv.state.consumes_stream() => Follow::Moving(mv.state),
                Some(mv) => Follow::Stop(mv.state.to_string()),
                None => Follow::Stop("deleted".to_string()),
            };
            (tenant.clone(), follow)
        })
        .collect()
}

/// Setups under way, retry times, and tenants whose queued work may still be in flight.
#[derive(Debug, Default)]
pub(super) struct Admission {
    setting_up: HashSet<TenantId>,
    retry_after: BTreeMap<TenantId, Instant>,
    /// Stopped tenants, with the stream position at their stop.
    released: BTreeMap<TenantId, Lsn>,
}

impl Admission {
    /// The moves whose setup may start now, in registry order. `moving` says whether a
    /// tenant is being moved already; `drained(at)` whether everything handed over up to
    /// `at` is applied or dropped.
    pub fn due(
        &mut self,
        moves: &[Move],
        moving: impl Fn(&TenantId) -> bool,
        mut drained: impl FnMut(Lsn) -> bool,
        now: Instant,
    ) -> Vec<Move> {
        let mut seen = BTreeSet::new();
        let mut due = Vec::new();
        for mv in moves {
            if mv.state.is_finished() || !seen.insert(&mv.tenant) {
                continue;
            }
            let wants = matches!(mv.state, MoveState::Requested | MoveState::Provisioning);
            if !wants || moving(&mv.tenant) || self.setting_up.contains(&mv.tenant) {
                continue;
            }
            if self.retry_after.get(&mv.tenant).is_some_and(|t| now < *t) {
                continue;
            }
            if let Some(at) = self.released.get(&mv.tenant) {
                if !drained(*at) {
                    continue;
                }
                self.released.remove(&mv.tenant);
            }
            due.push(mv.clone());
        }
        due
    }

    /// Whether a setup of `tenant` is under way.
    pub fn setting_up(&self, tenant: &TenantId) -> bool {
        self.setting_up.contains(tenant)
    }

    /// A setup of `tenant` starts.
    pub fn begin(&mut self, tenant: &TenantId) {
        self.setting_up.insert(tenant.clone());
    }

    /// The setup of `tenant` ended; `retry` says whether it failed transiently.
    pub fn ended(&mut self, tenant: &TenantId, retry: bool, now: Instant) {
        self.setting_up.remove(tenant);
        if retry {
            self.retry_after.insert(tenant.clone(), now + SETUP_RETRY);
        } else {
            self.retry_after.remove(tenant);
        }
    }

    /// `tenant` stopped here with the stream at `at`.
    pub fn released(&mut self, tenant: &TenantId, at: Lsn) {
        self.released.insert(tenant.clone(), at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(id: i64, tenant: &str, state: MoveState) -> Move {
        Move::sample(id, tenant, state)
    }

    fn ids(moves: &[Move]) -> Vec<i64> {
        moves.iter().map(|m| m.id).collect()
    }

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn a_moving_tenant_follows_its_own_row_only() {
        let moves = vec![
            mv(1, "a", MoveState::Cancelled),
            mv(2, "a", MoveState::Streaming),
            mv(3, "b", MoveState::Paused),
        ];
        let (a, b, c) = (t("a"), t("b"), t("c"));
        let got = follow([(&a, 2), (&b, 3), (&c, 9)], &moves);
        assert_eq!(
            got,
            vec![
                (a, Follow::Moving(MoveState::Streaming)),
                (b, Follow::Stop("paused".into())),
                (c, Follow::Stop("deleted".into())),
            ]
        );
    }

    #[test]
    fn one_setup_per_tenant_from_its_first_unfinished_row() {
        let moves = vec![
            mv(1, "a", MoveState::Cleaned),
            mv(2, "a", MoveState::Requested),
            mv(3, "a", MoveState::Requested),
            mv(4, "b", MoveState::Paused),
            mv(5, "b", MoveState::Requested),
            mv(6, "c", MoveState::Provisioning),
            mv(7, "d", MoveState::Requested),
        ];
        let now = Instant::now();
        let mut adm = Admission::default();
        // b's first unfinished row is paused: its later request waits for it.
        let due = adm.due(&moves, |x| x == &t("d"), |_| true, now);
        assert_eq!(ids(&due), vec![2, 6]);
        adm.begin(&t("a"));
        assert!(adm.setting_up(&t("a")));
        assert_eq!(ids(&adm.due(&moves, |_| false, |_| true, now)), vec![6, 7]);
    }

    #[test]
    fn a_transient_failure_waits_for_its_retry_time() {
        let moves = vec![mv(1, "a", MoveState::Provisioning)];
        let now = Instant::now();
        let mut adm = Admission::default();
        adm.begin(&t("a"));
        adm.ended(&t("a"), true, now);
        assert!(adm.due(&moves, |_| false, |_| true, now).is_empty());
        let later = now + SETUP_RETRY;
        assert_eq!(ids(&adm.due(&moves, |_| false, |_| true, later)), vec![1]);
        // A success clears the retry time.
        adm.ended(&t("a"), false, now);
        assert_eq!(ids(&adm.due(&moves, |_| false, |_| true, now)), vec![1]);
    }

    #[test]
    fn a_stopped_tenant_waits_until_its_queued_work_is_gone() {
        let moves = vec![mv(1, "a", MoveState::Requested)];
        let now = Instant::now();
        let mut adm = Admission::default();
        adm.released(&t("a"), Lsn(500));
        let mut asked = Vec::new();
        let due = adm.due(
            &moves,
            |_| false,
            |at| {
                asked.push(at);
                false
            },
            now,
        );
        assert!(due.is_empty());
        assert_eq!(asked, vec![Lsn(500)]);
        assert_eq!(ids(&adm.due(&moves, |_| false, |_| true, now)), vec![1]);
        // Once drained, the stop is forgotten.
        assert_eq!(ids(&adm.due(&moves, |_| false, |_| false, now)), vec![1]);
    }
}
