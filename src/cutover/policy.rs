//! When to attempt a cutover and how long each step may take: pure functions of observed
//! facts, so the go/no-go decisions are tested without a database.
//!
//! Invariants:
//! - An attempt starts only from `streaming` (in sync), when asked for (auto mode or an
//!   operator's request), with the target's lag under the threshold, when the target's
//!   measured apply delay fits the catch-up's share of the pause (see
//!   [`crate::config::default_max_apply_delay`]),
//!   outside the backoff after an aborted attempt, and never twice at once for a tenant.
//! - The pause budget covers everything writers of the tenant can wait on, from the fence
//!   lock request to the commit: the lock wait gets at most half of it, the catch-up runs
//!   until nine tenths, the rest is the flip. A step that would end past its share aborts.

use std::time::Duration;

use crate::config::CutoverSettings;
use crate::registry::MoveState;

/// The steps of an attempt, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Verify,
    Arm,
    OldTransactions,
    Fence,
    CatchUp,
    Sequences,
    Flip,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Verify => "verify",
            Step::Arm => "arm",
            Step::OldTransactions => "old_transactions",
            Step::Fence => "fence",
            Step::CatchUp => "catch_up",
            Step::Sequences => "sequences",
            Step::Flip => "flip",
        }
    }
}

/// What the pipeline knows about a tenant when deciding whether to start an attempt.
#[derive(Clone, Copy, Debug)]
pub struct Readiness {
    pub state: MoveState,
    pub auto: bool,
    pub requested: bool,
    pub lag_bytes: u64,
    pub attempt_running: bool,
    /// The backoff after the last aborted attempt has passed.
    pub backoff_over: bool,
    /// Rows wait to be read again from the source (a row moved into the tenant arrived
    /// without its TOAST values): the target lacks them until then.
    pub rereads_pending: bool,
    /// How long the target recently took from hand-over to applied.
    pub apply_delay: Duration,
}

/// Why no attempt starts now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotNow {
    NotInSync,
    NotRequested,
    Lagging,
    Running,
    BackingOff,
    Rereading,
    /// The target applies too slowly now for the catch-up to fit the pause.
    Slow,
}

pub fn may_start(r: &Readiness, s: &CutoverSettings) -> Result<(), NotNow> {
    if r.attempt_running {
        return Err(NotNow::Running);
    }
    if r.state != MoveState::Streaming {
        return Err(NotNow::NotInSync);
    }
    if !(r.auto || r.requested) {
        return Err(NotNow::NotRequested);
    }
    if !r.backoff_over {
        return Err(NotNow::BackingOff);
    }
    if r.lag_bytes > s.max_lag_bytes {
        return Err(NotNow::Lagging);
    }
    if r.rereads_pending {
        return Err(NotNow::Rereading);
    }
    if r.apply_delay > s.max_apply_delay {
        return Err(NotNow::Slow);
    }
    Ok(())
}

/// The wait before attempt `n + 1` after `n` aborted ones (`n >= 1`).
pub fn backoff(aborted: u32, s: &CutoverSettings) -> Duration {
    let factor = 1u32 << aborted.saturating_sub(1).min(16);
    s.retry_initial.saturating_mul(factor).min(s.retry_max)
}

/// Deadlines inside one attempt, measured from the fence lock request.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub budget: Duration,
}

impl Clock {
    /// The fence's `lock_timeout`.
    pub fn lock_wait(&self) -> Duration {
        (self.budget / 2).max(Duration::from_millis(1))
    }

    /// How long the catch-up may still take after `elapsed`; `None`: abort.
    pub fn catch_up(&self, elapsed: Duration) -> Option<Duration> {
        (self.budget * 9 / 10)
            .checked_sub(elapsed)
            .filter(|d| !d.is_zero())
    }

    /// Time left for the remaining steps after `elapsed`; `None`: abort.
    pub fn left(&self, elapsed: Duration) -> Option<Duration> {
        self.budget.checked_sub(elapsed).filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Readiness {
        Readiness {
            state: MoveState::Streaming,
            auto: false,
            requested: true,
            lag_bytes: 0,
            attempt_running: false,
            backoff_over: true,
            rereads_pending: false,
            apply_delay: Duration::from_millis(3),
        }
    }

    #[test]
    fn starts_only_in_sync_when_asked_and_caught_up() {
        let s = CutoverSettings::default();
        assert_eq!(may_start(&ready(), &s), Ok(()));
        let auto = Readiness {
            auto: true,
            requested: false,
            ..ready()
        };
        assert_eq!(may_start(&auto, &s), Ok(()));
        for (r, why) in [
            (
                Readiness {
                    state: MoveState::Copying,
                    ..ready()
                },
                NotNow::NotInSync,
            ),
            (
                Readiness {
                    state: MoveState::CuttingOver,
                    ..ready()
                },
                NotNow::NotInSync,
            ),
            (
                Readiness {
                    requested: false,
                    ..ready()
                },
                NotNow::NotRequested,
            ),
            (
                Readiness {
                    lag_bytes: s.max_lag_bytes + 1,
                    ..ready()
                },
                NotNow::Lagging,
            ),
            (
                Readiness {
                    attempt_running: true,
                    ..ready()
                },
                NotNow::Running,
            ),
            (
                Readiness {
                    backoff_over: false,
                    ..ready()
                },
                NotNow::BackingOff,
            ),
            (
                Readiness {
                    rereads_pending: true,
                    ..ready()
                },
                NotNow::Rereading,
            ),
            (
                Readiness {
                    apply_delay: s.max_apply_delay + Duration::from_millis(1),
                    ..ready()
                },
                NotNow::Slow,
            ),
        ] {
            assert_eq!(may_start(&r, &s), Err(why), "{r:?}");
        }
    }

    #[test]
    fn by_default_an_attempt_starts_only_when_the_catch_up_fits_the_pause() {
        let ms = Duration::from_millis;
        use crate::config::default_max_apply_delay;
        assert_eq!(default_max_apply_delay(ms(100)), ms(40));
        assert_eq!(default_max_apply_delay(ms(1500)), ms(600));
        assert_eq!(
            CutoverSettings::default().max_apply_delay,
            default_max_apply_delay(CutoverSettings::default().pause_budget)
        );
        let s = CutoverSettings::default();
        let at = |d: u64| Readiness {
            apply_delay: ms(d),
            ..ready()
        };
        assert_eq!(may_start(&at(40), &s), Ok(()));
        assert_eq!(may_start(&at(41), &s), Err(NotNow::Slow));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = CutoverSettings {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            ..CutoverSettings::default()
        };
        let waits: Vec<u128> = (1..=6).map(|n| backoff(n, &s).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(u32::MAX, &s), s.retry_max);
    }

    #[test]
    fn each_step_gets_its_share_of_the_budget() {
        let c = Clock {
            budget: Duration::from_millis(100),
        };
        assert_eq!(c.lock_wait(), Duration::from_millis(50));
        assert_eq!(
            c.catch_up(Duration::from_millis(30)),
            Some(Duration::from_millis(60))
        );
        assert_eq!(c.catch_up(Duration::from_millis(90)), None);
        assert_eq!(c.catch_up(Duration::from_millis(95)), None);
        assert_eq!(
            c.left(Duration::from_millis(95)),
            Some(Duration::from_millis(5))
        );
        assert_eq!(c.left(Duration::from_millis(100)), None);
        assert_eq!(c.left(Duration::from_millis(250)), None);
    }
}
