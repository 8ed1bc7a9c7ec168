//! Pacing of backfill reads: at most `rows_per_sec` rows a second over all chunk readers,
//! so a move can be told how hard it may read the source (on top of the cap on workers).
//!
//! Invariants:
//! - Each read reserves the time its rows take at the rate, right after the reservations
//!   made before it; reads never start earlier than their reservation, so over any span the
//!   rows started are at most the rate × the span plus one chunk.
//! - Idle time is not banked: a reservation starts no earlier than now.
//! - A rate of 0 means unpaced (every reservation starts now).

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Pace {
    rows_per_sec: u64,
    next: Option<Instant>,
}

impl Pace {
    pub fn new(rows_per_sec: u64) -> Pace {
        Pace {
            rows_per_sec,
            next: None,
        }
    }

    /// When a read of `rows` may start, given it asks at `now`.
    pub fn reserve(&mut self, now: Instant, rows: u64) -> Instant {
        if self.rows_per_sec == 0 {
            return now;
        }
        let start = match self.next {
            Some(next) if next > now => next,
            _ => now,
        };
        let takes = Duration::from_secs_f64(rows as f64 / self.rows_per_sec as f64);
        self.next = Some(start + takes);
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_spaced_by_their_rows_at_the_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(10_000);
        assert_eq!(p.reserve(t0, 1_000), t0);
        // Two more asking at once: each after the one before, 0.1 s per 1,000 rows.
        assert_eq!(p.reserve(t0, 1_000), t0 + Duration::from_millis(100));
        assert_eq!(p.reserve(t0, 500), t0 + Duration::from_millis(200));
        // The next would start at 0.25 s; asking later starts then, nothing banked.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(p.reserve(later, 1_000), later);
        assert_eq!(p.reserve(later, 1_000), later + Duration::from_millis(100));
    }

    #[test]
    fn a_zero_rate_is_unpaced() {
        let t0 = Instant::now();
        let mut p = Pace::new(0);
        for _ in 0..3 {
            assert_eq!(p.reserve(t0, 1_000_000), t0);
        }
    }
}
