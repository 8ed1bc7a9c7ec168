//! The crash matrix: the real daemon aborted at each failpoint (src/failpoint.rs) while a
//! writer keeps hitting every tenant, then restarted until every move is done.
//!
//! Each case, on its own pair of throwaway clusters:
//! 1. tenant 3 moves to a local schema and is streaming (no failpoint armed);
//! 2. the daemon restarts with one failpoint armed at its n-th hit; tenant 1 moves to the
//!    other cluster with an automatic cutover, tenant 2 to a local schema; the process must
//!    abort at that point (SIGABRT, its line in the log);
//! 3. with the daemon dead: the slot's confirmed position is not ahead of what tenant 3's
//!    target durably holds (every transaction of tenant 3 since it was in sync and at or
//!    before the confirmed position is at or before its recorded progress, read from a
//!    separate test_decoding slot);
//! 4. restarted without failpoints: tenant 1 is cut over, 2 and 3 are streaming; after the
//!    writer stops and the slot drains, every tenant's target equals its source rows
//!    (content hash per table, so nothing lost and nothing twice) and holds no other
//!    tenant's rows.
//!
//! `cargo test --release --features failpoints --test it crash::` runs every point once at a hit
//! number chosen to land under load (the CI slice). `SWITCHYARD_CRASH_HITS=full` runs every
//! point at Fibonacci-spaced hits up to the most one run reaches (the full matrix,
//! docs/proof.md).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use support::mover::{
    assert_parity, prepare_target, registry_ready, request, shared_schema, wait_drained,
    wait_state, write_config, Process, Writer,
};
use support::PgCluster;
use switchyard::checkpoint::Store;
use switchyard::lsn::Lsn;
use switchyard::registry::{CutoverMode, Registry};
use switchyard::tenant::{TargetId, TenantId};
use tokio_postgres::Client;

const SYNC: Duration = Duration::from_secs(180);
const FIRE: Duration = Duration::from_secs(120);

/// Every `failpoint::hit("…")` in src/ is listed in POINTS and the reverse: the matrix
/// below runs the list, so a point missing from it would go untested.
#[test]
fn every_failpoint_in_the_source_is_listed() -> Result<()> {
    fn walk(dir: &std::path::Path, out: &mut BTreeSet<String>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path)?;
                for part in text.split("failpoint::hit(\"").skip(1) {
                    if let Some((name, _)) = part.split_once('"') {
                        out.insert(name.to_string());
                    }
                }
            }
        }
        Ok(())
    }
    let mut used = BTreeSet::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut used,
    )?;
    let listed: BTreeSet<String> = switchyard::failpoint::POINTS
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(used, listed, "failpoints in src/ vs failpoint::POINTS");
    assert!(listed.len() >= 20, "{} points", listed.len());
    Ok(())
}

/// The matrix names every point: a test per point, so a new point needs a case here.
#[test]
fn every_failpoint_has_a_case() {
    let cases: BTreeSet<&str> = CASES.iter().map(|(p, _, _)| *p).collect();
    let listed: BTreeSet<&str> = switchyard::failpoint::POINTS.iter().copied().collect();
    assert_eq!(cases, listed);
}

/// Each point with the hit number of the CI slice (late enough that moves and the writer
/// are in full swing, early enough that every run reaches it) and the most hits one run
/// of the scenario reaches (the full matrix stays under it: three tenants set up, two
/// syncs, one cutover, a few dozen chunks, hundreds of target commits).
const CASES: &[(&str, u64, u64)] = &[
    ("source.after_slot_created", 1, 1),
    ("setup.after_provision", 1, 3),
    ("setup.after_state", 2, 3),
    ("backfill.after_low_watermark", 4, 30),
    ("backfill.after_chunk_read", 4, 30),
    ("backfill.after_high_watermark", 4, 30),
    ("apply.after_copy", 3, 20),
    ("apply.before_progress", 8, 150),
    ("apply.before_commit", 8, 150),
    ("apply.after_commit", 8, 150),
    ("applier.before_report", 8, 150),
    ("checkpoint.before_commit", 8, 150),
    ("checkpoint.after_commit", 8, 150),
    ("feedback.before_send", 4, 20),
    ("feedback.after_send", 4, 20),
    ("daemon.after_synced", 1, 2),
    ("cutover.after_cutting_over", 1, 1),
    ("cutover.after_arm", 1, 1),
    ("cutover.after_lock", 1, 1),
    ("cutover.after_catch_up", 1, 1),
    ("cutover.before_commit", 1, 1),
    ("cutover.after_commit", 1, 1),
];

/// The hits to abort at: the CI slice's one, or with `SWITCHYARD_CRASH_HITS=full` a
/// Fibonacci-spaced run up to the point's most (`=1,5,20` picks hits by hand, capped the
/// same way).
fn hits_for(point: &str) -> Vec<u64> {
    let Some(&(_, ci, most)) = CASES.iter().find(|(p, _, _)| *p == point) else {
        return Vec::new();
    };
    let wanted: Vec<u64> = match std::env::var("SWITCHYARD_CRASH_HITS").as_deref() {
        Ok("full") => vec![1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144],
        Ok(list) => list
            .split(',')
            .filter_map(|h| h.trim().parse().ok())
            .filter(|h| *h >= 1)
            .collect(),
        Err(_) => vec![ci],
    };
    let mut hits: Vec<u64> = wanted.into_iter().filter(|h| *h <= most).collect();
    hits.dedup();
    if hits.is_empty() {
        hits.push(ci);
    }
    hits
}

macro_rules! crash_cases {
    ($($name:ident => $point:literal,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> Result<()> {
                for at in hits_for($point) {
                    crash_at($point, at)
                        .await
                        .with_context(|| format!("failpoint {} at hit {at}", $point))?;
                }
                Ok(())
            }
        )*
    };
}

crash_cases! {
    source_after_slot_created => "source.after_slot_created",
    setup_after_provision => "setup.after_provision",
    setup_after_state => "setup.after_state",
    backfill_after_low_watermark => "backfill.after_low_watermark",
    backfill_after_chunk_read => "backfill.after_chunk_read",
    backfill_after_high_watermark => "backfill.after_high_watermark",
    apply_after_copy => "apply.after_copy",
    apply_before_progress => "apply.before_progress",
    apply_before_commit => "apply.before_commit",
    apply_after_commit => "apply.after_commit",
    applier_before_report => "applier.before_report",
    checkpoint_before_commit => "checkpoint.before_commit",
    checkpoint_after_commit => "checkpoint.after_commit",
    feedback_before_send => "feedback.before_send",
    feedback_after_send => "feedback.after_send",
    daemon_after_synced => "daemon.after_synced",
    cutover_after_cutting_over => "cutover.after_cutting_over",
    cutover_after_arm => "cutover.after_arm",
    cutover_after_lock => "cutover.after_lock",
    cutover_after_catch_up => "cutover.after_catch_up",
    cutover_before_commit => "cutover.before_commit",
    cutover_after_commit => "cutover.after_commit",
}

/// Waits for the armed daemon to abort at `point`.
fn expect_abort(daemon: &mut Process, point: &str) -> Result<()> {
    let status = daemon.wait_exit(FIRE)?;
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    if status.signal() != Some(SIGABRT) {
        bail!("switchyard ended with {status}, not at failpoint {point}; log:\n{log}");
    }
    let line = format!("failpoint {point} fired");
    if !log.contains(&line) {
        bail!("switchyard aborted but not at {point}; log:\n{log}");
    }
    Ok(())
}

/// SIGABRT on Linux: what `std::process::abort` ends the process with.
const SIGABRT: i32 = 6;

async fn lsn_of(c: &Client, sql: &str) -> Result<Lsn> {
    let text: String = c.query_one(sql, &[]).await?.get(0);
    text.parse::<Lsn>()
        .map_err(|e| anyhow::anyhow!("{text:?}: {e}"))
}

/// Transactions of the audit slot (test_decoding) up to `upto`: commit end position and
/// the tenants whose rows they touched.
async fn audited(c: &Client, upto: Lsn) -> Result<Vec<(Lsn, BTreeSet<i32>, String)>> {
    let rows = c
        .query(
            "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes('audit', NULL, NULL, 'include-xids', '1')",
            &[],
        )
        .await?;
    let mut open: BTreeMap<String, (BTreeSet<i32>, String)> = BTreeMap::new();
    let mut out = Vec::new();
    for r in rows {
        let (lsn, xid, data): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        if data.starts_with("COMMIT") {
            let end: Lsn = lsn.parse().map_err(|e| anyhow::anyhow!("{lsn:?}: {e}"))?;
            let (tenants, text) = open.remove(&xid).unwrap_or_default();
            if end <= upto {
                out.push((end, tenants, text));
            }
        } else if data.starts_with("table public.") {
            // Source tables only: local targets live in the same cluster.
            let (touched, text) = open.entry(xid).or_default();
            text.push_str(&data);
            text.push('\n');
            for part in data.split("tenant_id[integer]:").skip(1) {
                let digits: String = part.chars().take_while(|c| c.is_ascii_digit()).collect();
                if let Ok(t) = digits.parse() {
                    touched.insert(t);
                }
            }
        }
    }
    Ok(out)
}

/// With the daemon stopped: the slot's confirmed position is not ahead of what `tenant`'s
/// target durably holds.
/// - every transaction of the tenant after `since` (when it was already in sync) and at or
///   before the slot's confirmed position is at or before the tenant's durable position in
///   the checkpoint (raised only once every apply lane committed it);
/// - that position is one the target recorded (some lane's progress row is at or past it).
///
/// Returns the slot's confirmed position and how many transactions were checked.
async fn confirmed_not_ahead(
    src: &Client,
    target: &Client,
    state: &std::path::Path,
    tenant: i32,
    since: Lsn,
) -> Result<(Lsn, usize)> {
    let confirmed = lsn_of(
        src,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'sy'",
    )
    .await?;
    let id = TenantId::new(tenant.to_string())?;
    let durable = Store::open(state)?.applied(&id)?;
    let recorded: Option<String> = target
        .query_one(
            "SELECT max(lsn)::text FROM (SELECT lsn FROM switchyard.applied WHERE tenant = $1 \
               UNION ALL SELECT lsn FROM switchyard.applied_lanes WHERE tenant = $1) p",
            &[&id.as_str()],
        )
        .await?
        .get(0);
    let recorded: Lsn = match recorded {
        Some(t) => t.parse().map_err(|e| anyhow::anyhow!("{t:?}: {e}"))?,
        None => Lsn::INVALID,
    };
    anyhow::ensure!(
        durable <= recorded,
        "the checkpoint says tenant {tenant} is durable up to {durable}, its target recorded {recorded}"
    );
    let mut checked = 0;
    for (end, tenants, text) in audited(src, confirmed).await? {
        if end <= since || !tenants.contains(&tenant) {
            continue;
        }
        checked += 1;
        if end > durable {
            bail!(
                "the slot confirmed {confirmed}, but tenant {tenant}'s transaction ending at {end} \
                 is past its durable position {durable}: it would be lost; its changes:\n{text}"
            );
        }
    }
    Ok((confirmed, checked))
}

async fn crash_at(point: &str, at: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let result = scenario(dir.path(), point, at).await;
    if result.is_err() {
        // The daemon's log and state stay for a look.
        let kept = dir.keep();
        eprintln!(
            "{point}@{at} failed; daemon log and state kept in {}",
            kept.display()
        );
    }
    result
}

async fn scenario(dir: &std::path::Path, point: &str, at: u64) -> Result<()> {
    let started = Instant::now();
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2, 3], 600))?;
    src.psql(
        "SELECT pg_create_logical_replication_slot('audit', 'test_decoding');
         GRANT TRIGGER ON ALL TABLES IN SCHEMA public TO switchyard;
         GRANT pg_read_all_stats TO switchyard;",
    )?;
    src.psql(&support::app_owned(&["public"]))?;
    prepare_target(&src)?;
    prepare_target(&dst)?;
    let path = write_config(
        dir,
        &src,
        Some(&dst),
        "[move]\nchunk_rows = 100\nbackfill_workers = 1\n",
    )?;
    let log = dir.join("daemon.log");
    let s = src.client().await?;
    let d = dst.client().await?;
    let registry = Registry::new("switchyard")?;
    let armed = format!("{point}=abort@{at}");
    let env = [("SWITCHYARD_FAILPOINTS", armed.as_str())];

    // 1. Tenant 3 in sync, no failpoint (except the one at slot creation, which only a
    // first start reaches).
    let mut daemon = if point == "source.after_slot_created" {
        let mut first = Process::start_env(&path, &log, true, &env)?;
        expect_abort(&mut first, point)?;
        Process::start(&path, &log, true)?
    } else {
        Process::start(&path, &log, true)?
    };
    registry_ready(&s).await?;
    let writer = Writer::start_with(
        src.client().await?,
        vec![1, 2, 3],
        Duration::from_millis(3),
        true,
    );
    let three = request(&s, &registry, "3", "local", "t3").await?;
    wait_state(&s, three, "streaming", SYNC).await?;
    let in_sync = lsn_of(&s, "SELECT pg_current_wal_lsn()::text").await?;

    // 2. Armed: two more moves, one with an automatic cutover; the daemon must abort.
    daemon.terminate().context("stopping the unarmed daemon")?;
    let mut armed_daemon = Process::start_env(&path, &log, false, &env)?;
    let one = registry
        .request_move(
            &s,
            &TenantId::new("1")?,
            &TargetId::new("shard2")?,
            "t1",
            CutoverMode::Auto,
        )
        .await?;
    let two = request(&s, &registry, "2", "local", "t2").await?;
    if point == "source.after_slot_created" {
        // Already fired; this start runs unarmed past it (the slot is recorded).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        armed_daemon.kill9();
    } else {
        expect_abort(&mut armed_daemon, point)?;
    }
    drop(armed_daemon);

    // 3. Dead daemon: nothing confirmed that tenant 3's target does not hold.
    let state = dir.join("state");
    let (confirmed, checked) = confirmed_not_ahead(&s, &s, &state, 3, in_sync).await?;

    // 4. Restart, finish, compare.
    let mut daemon = Process::start(&path, &log, false)?;
    wait_state(&s, one, "cut_over", SYNC).await?;
    wait_state(&s, two, "streaming", SYNC).await?;
    wait_state(&s, three, "streaming", SYNC).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.check_alive()?;
    let rounds = writer.stop().await?;
    wait_drained(&s, Duration::from_secs(120)).await?;
    daemon.terminate().context("clean stop")?;
    let (_, checked_after) = confirmed_not_ahead(&s, &s, &state, 3, in_sync).await?;
    // For a failed case's post-mortem: every source transaction with its tenants.
    let audit: Vec<String> = audited(&s, Lsn(u64::MAX))
        .await?
        .into_iter()
        .map(|(end, tenants, text)| format!("{end} {tenants:?}\n{text}"))
        .collect();
    std::fs::write(dir.join("audit.txt"), audit.join(""))?;
    assert_parity(&s, &d, 1, "t1").await?;
    assert_parity(&s, &s, 2, "t2").await?;
    assert_parity(&s, &s, 3, "t3").await?;
    let route: String = s
        .query_one(
            "SELECT location FROM switchyard.routes WHERE tenant = '1'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(route, "shard2");
    assert!(rounds > 50, "the writer ran {rounds} rounds");
    assert!(
        checked_after > checked,
        "the confirmed-position check saw no new transactions of tenant 3"
    );
    eprintln!(
        "{point}@{at}: aborted, confirmed {confirmed} checked against {checked} transactions of tenant 3, \
         parity after restart; {rounds} writer rounds, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
