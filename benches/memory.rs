//! The daemon's peak memory (RSS high-water mark of its process) while one large source
//! transaction passes: first a transaction of a tenant that is not moving (decoded and
//! dropped), then one of the moving tenant (applied to its target), each on a freshly
//! started daemon so the high-water marks are separate. A daemon idle in sync is the base.
//! (`move.max_txn_mb` is raised for the run: at its default a 1 GB transaction fails the
//! moving tenant, which `tests/it/faults.rs` checks.)
//!
//! Run: `cargo bench --bench memory` (SWITCHYARD_BENCH_TXN_MB, default 1024, the size of
//! each transaction's row data). Prints Markdown.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use support::mover::{prepare_target, request, wait_drained, wait_state, write_config, Process};
use support::report::env_or;
use support::PgCluster;
use switchyard::registry::Registry;

/// A `/proc/<pid>/status` figure in MB (`VmRSS`, `VmHWM`).
fn status_mb(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// One transaction of `mb` MB of incompressible rows for `tenant`.
fn big_txn(tenant: i32, mb: u64, first_id: u64) -> String {
    format!(
        "INSERT INTO public.docs SELECT {tenant}, g, (SELECT string_agg(md5((g * 100 + k)::text), '') \
           FROM generate_series(1, 32) k) FROM generate_series({first_id}, {last}) g;",
        last = first_id + mb * 1024 - 1
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let mb = env_or("SWITCHYARD_BENCH_TXN_MB", if bench { 1024 } else { 8 });
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    prepare_target(&dst)?;
    src.psql(
        "CREATE TABLE public.docs (tenant_id int NOT NULL, id bigint NOT NULL, body text NOT NULL,
           PRIMARY KEY (tenant_id, id));
         INSERT INTO public.docs SELECT t, g, 'seed' FROM generate_series(1, 2) t, generate_series(1, 100) g;
         CREATE PUBLICATION sy_pub FOR TABLE public.docs;
         GRANT SELECT ON public.docs TO switchyard;",
    )?;
    let dir = tempfile::tempdir()?;
    // Raised so that the moving tenant's transaction is held and applied, not refused.
    let path = write_config(
        dir.path(),
        &src,
        Some(&dst),
        &format!("[move]\nmax_txn_mb = {}\n", mb * 2 + 16),
    )?;
    let log = dir.path().join("daemon.log");
    let s = src.client().await?;
    let mut daemon = Process::start(&path, &log, true)?;
    support::mover::registry_ready(&s).await?;
    let id = request(&s, &Registry::new("switchyard")?, "1", "shard2", "t1").await?;
    wait_state(&s, id, "streaming", Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = status_mb(daemon.pid(), "VmHWM")?;

    let phase = |tenant: i32, first_id: u64| {
        let sql = big_txn(tenant, mb, first_id);
        let src = &src;
        let s = &s;
        async move {
            let t0 = Instant::now();
            src.psql(&sql)?;
            wait_drained(s, Duration::from_secs(3600)).await?;
            anyhow::Ok(t0.elapsed())
        }
    };
    let bystander_t = phase(2, 1_000).await?;
    daemon.check_alive()?;
    let bystander = status_mb(daemon.pid(), "VmHWM")?;
    daemon.terminate()?;
    daemon = Process::start(&path, &log, false)?;
    support::wait_for_row(
        &s,
        "the restarted daemon streaming",
        Duration::from_secs(120),
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sy' AND active",
        &[],
    )
    .await?;
    wait_drained(&s, Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = status_mb(daemon.pid(), "VmHWM")?;
    let moving_t = phase(1, 1_000).await?;
    daemon.check_alive()?;
    let moving = status_mb(daemon.pid(), "VmHWM")?;
    daemon.terminate()?;
    let d = dst.client().await?;
    let n: i64 = d
        .query_one("SELECT count(*) FROM t1.docs", &[])
        .await?
        .get(0);
    anyhow::ensure!(n as u64 == 100 + mb * 1024, "the target has {n} rows");

    println!("\n## Daemon memory during one {mb} MB source transaction\n");
    println!("| case | peak RSS MB | RSS before MB | txn to confirmed s |");
    println!("|---|---|---|---|");
    println!("| idle, one tenant in sync | {idle:.0} | | |");
    println!(
        "| transaction of a tenant not moving | {bystander:.0} | {idle:.0} | {:.1} |",
        bystander_t.as_secs_f64()
    );
    println!(
        "| transaction of the moving tenant | {moving:.0} | {base:.0} | {:.1} |",
        moving_t.as_secs_f64()
    );
    support::report::record(
        "memory",
        serde_json::json!({
            "txn_mb": mb,
            "idle_peak_rss_mb": idle,
            "bystander": { "peak_rss_mb": bystander, "seconds": bystander_t.as_secs_f64() },
            "moving": { "peak_rss_mb": moving, "base_rss_mb": base, "seconds": moving_t.as_secs_f64() },
        }),
    )?;
    Ok(())
}
