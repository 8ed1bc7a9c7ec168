//! Failpoints: named places at the durability boundaries where a test stops the daemon
//! dead, as `kill -9` would, but at an exact step instead of wherever a signal lands.
//!
//! ```text
//!   SWITCHYARD_FAILPOINTS="apply.before_commit=abort@3,cutover.after_lock=abort"
//!       └─ the third time a target transaction is about to commit, and the first time a
//!          cutover holds the tenant's lock, the process aborts (SIGABRT, no unwinding,
//!          no destructors, no flushes: what a crash leaves is what is durable)
//! ```
//!
//! Invariants:
//! - Without the `failpoints` cargo feature `hit` is an empty inline function: a release
//!   build carries no failpoint code and reads no environment for it.
//! - With it, a point fires only when `SWITCHYARD_FAILPOINTS` names it; the variable is read
//!   once, at the first hit of any point. A malformed setting aborts at that first hit with
//!   the reason, so a test never runs believing a point is armed when it is not.
//! - Every point in the code is listed in [`POINTS`] (tests/it/crash.rs checks the source
//!   against the list and runs each one).

/// Every failpoint, in pipeline order. The crash matrix runs each of them.
pub const POINTS: &[&str] = &[
    // The slot was created, its record is not yet in RocksDB.
    "source.after_slot_created",
    // A moving tenant's target tables exist; the registry does not say copying yet.
    "setup.after_provision",
    // The tenant is set up (state recorded), nothing copied yet.
    "setup.after_state",
    // A chunk's low watermark is in the WAL; its rows are not read yet.
    "backfill.after_low_watermark",
    // A chunk's rows are read and queued; its high watermark is not written.
    "backfill.after_chunk_read",
    // A chunk's high watermark is committed on the source.
    "backfill.after_high_watermark",
    // A COPY of chunk rows went into an open target transaction.
    "apply.after_copy",
    // A batch's changes are sent to the target; its progress rows are not.
    "apply.before_progress",
    // Changes and progress rows are in the target transaction; COMMIT is next.
    "apply.before_commit",
    // The target transaction committed; the applier has not reported it.
    "apply.after_commit",
    // Every lane committed its share; the pipeline has not heard.
    "applier.before_report",
    // The pipeline knows what is durable; RocksDB does not have it yet.
    "checkpoint.before_commit",
    // RocksDB has the positions; the source has not been told.
    "checkpoint.after_commit",
    // A standby status update with a new flush position is about to be sent.
    "feedback.before_send",
    // The source has been told the new flush position.
    "feedback.after_send",
    // A tenant is in sync in RocksDB; the registry does not say streaming yet.
    "daemon.after_synced",
    // Cutover prepare: the move says cutting_over, fences not installed.
    "cutover.after_cutting_over",
    // Fences installed and armed; the pause has not started.
    "cutover.after_arm",
    // The tenant's writes are fenced (lock held inside the cutover transaction).
    "cutover.after_lock",
    // The marker is in the WAL, the target holds everything before it.
    "cutover.after_catch_up",
    // Route flip, fence `moved` and move `cut_over` written; not committed.
    "cutover.before_commit",
    // The flip committed; the attempt is not recorded yet.
    "cutover.after_commit",
];

/// Marks a failpoint. Aborts the process when the point is armed and due.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_point: &'static str) {}

/// Marks a failpoint. Aborts the process when the point is armed and due.
#[cfg(feature = "failpoints")]
pub fn hit(point: &'static str) {
    armed::hit(point)
}

/// One armed point: abort at its `at`-th hit (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arming {
    pub point: String,
    pub at: u64,
}

/// Parses `point=abort[@N],point=abort[@N]`.
pub fn parse(spec: &str) -> Result<Vec<Arming>, String> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (point, action) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected point=abort or point=abort@N"))?;
        if !POINTS.contains(&point) {
            return Err(format!(
                "{point:?} is not a failpoint (see failpoint::POINTS)"
            ));
        }
        let at = match action.split_once('@') {
            None if action == "abort" => 1,
            Some(("abort", n)) => match n.parse::<u64>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(format!("{item:?}: the hit number must be 1 or more")),
            },
            _ => return Err(format!("{item:?}: the only action is abort or abort@N")),
        };
        out.push(Arming {
            point: point.to_string(),
            at,
        });
    }
    Ok(out)
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static ARMED: OnceLock<HashMap<String, (u64, AtomicU64)>> = OnceLock::new();

    fn load() -> HashMap<String, (u64, AtomicU64)> {
        let spec = std::env::var("SWITCHYARD_FAILPOINTS").unwrap_or_default();
        match super::parse(&spec) {
            Ok(points) => points
                .into_iter()
                .map(|a| (a.point, (a.at, AtomicU64::new(0))))
                .collect(),
            Err(e) => {
                eprintln!("switchyard: SWITCHYARD_FAILPOINTS: {e}");
                std::process::abort();
            }
        }
    }

    pub(super) fn hit(point: &'static str) {
        let armed = ARMED.get_or_init(load);
        if let Some((at, seen)) = armed.get(point) {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            if n == *at {
                // stderr is unbuffered: the line is out before the abort.
                eprintln!("switchyard: failpoint {point} fired (hit {n}); aborting");
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_hit_numbers() {
        assert_eq!(
            parse("apply.before_commit=abort@3, cutover.after_lock=abort").unwrap(),
            vec![
                Arming {
                    point: "apply.before_commit".into(),
                    at: 3
                },
                Arming {
                    point: "cutover.after_lock".into(),
                    at: 1
                },
            ]
        );
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        for (spec, says) in [
            ("apply.before_commit", "expected point=abort"),
            ("apply.nowhere=abort", "is not a failpoint"),
            ("apply.before_commit=panic", "the only action"),
            ("apply.before_commit=abort@0", "1 or more"),
            ("apply.before_commit=abort@x", "1 or more"),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn points_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for p in POINTS {
            assert!(seen.insert(p), "{p} listed twice");
        }
        assert!(POINTS.len() >= 20);
    }
}
