//! Cutover pauses under a pgbench-style load: many small tenants of one shared table are
//! moved into their own schemas and cut over automatically while client connections keep
//! writing every tenant at a fixed rate. An application-like router sends each tenant's
//! writes where `switchyard.routes` says, and re-reads it on SQLSTATE SY001.
//!
//! Reports, over all cutovers: the tenant's write pause as switchyard measured it (lock
//! request to commit), the slowest write of the moving tenant around its cutover as the
//! clients saw it, other tenants' write latency during the fenced windows against the
//! latency outside them, attempts and aborts, and the fence trigger's cost for other
//! tenants (write latency with the triggers installed against before).
//!
//! Run: `cargo bench --bench cutover` (SWITCHYARD_BENCH_CUTOVERS, default 24, tenants cut
//! over; SWITCHYARD_BENCH_TPS, default 400, the offered load; SWITCHYARD_BENCH_BUDGET_MS,
//! default 100, the pause budget). Prints Markdown; docs/benchmarks.md has the figures.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use support::mover::{load_config, prepare_target, write_config, InProcess};
use support::{wait_for, PgCluster};
use switchyard::registry::{CutoverMode, Registry};
use switchyard::tenant::{TargetId, TenantId};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64
}

/// One client transaction: whose, when it started (unix µs), how long it took (µs).
#[derive(Clone, Copy)]
struct Sample {
    tenant: i32,
    start: i64,
    micros: i64,
}

/// Where each tenant's writes go, as an application would cache `switchyard.routes`.
type Routes = Arc<Mutex<HashMap<i32, String>>>;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Client connections writing random tenants at `tps` in total until `stop`.
async fn load(
    src: &PgCluster,
    tenants: i32,
    tps: u64,
    clients: usize,
    routes: Routes,
    stop: Arc<AtomicBool>,
    phase: i64,
) -> Result<Vec<tokio::task::JoinHandle<Result<Vec<Sample>>>>> {
    let mut tasks = Vec::new();
    let per_client = Duration::from_secs_f64(clients as f64 / tps as f64);
    for c in 0..clients {
        let client = src.client().await?;
        let (routes, stop) = (routes.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            // Inserted ids: unique per phase and client.
            let mut i: i64 = (phase * 100 + c as i64) * 1_000_000_000;
            let mut next = Instant::now();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ c as u64;
            while !stop.load(Ordering::Relaxed) {
                next += per_client;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
                // xorshift: a different tenant each time, no extra dependency.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let tenant = (x % tenants as u64) as i32 + 1;
                i += 1;
                let start = now_micros();
                let t0 = Instant::now();
                loop {
                    let schema = routes
                        .lock()
                        .map(|r| r.get(&tenant).cloned().unwrap_or_else(|| "public".into()))
                        .unwrap_or_else(|p| p.into_inner().get(&tenant).cloned().unwrap_or_default());
                    let sql = format!(
                        "BEGIN;
                         UPDATE \"{schema}\".orders SET amount = amount + 1 WHERE tenant_id = {tenant} AND id = {k};
                         INSERT INTO \"{schema}\".orders VALUES ({tenant}, {i}, 'w', 1);
                         COMMIT;",
                        k = x % 2000 + 1,
                    );
                    match client.batch_execute(&sql).await {
                        Ok(()) => break,
                        Err(e) if e.code().map(|c| c.code()) == Some("SY001") => {
                            let _ = client.batch_execute("ROLLBACK").await;
                            let row = client
                                .query_one(
                                    "SELECT schema_name FROM switchyard.routes WHERE tenant = $1",
                                    &[&tenant.to_string()],
                                )
                                .await?;
                            routes
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(tenant, row.get(0));
                        }
                        Err(e) => {
                            let _ = client.batch_execute("ROLLBACK").await;
                            return Err(e).context(format!("a write of tenant {tenant}"));
                        }
                    }
                }
                samples.push(Sample {
                    tenant,
                    start,
                    micros: t0.elapsed().as_micros() as i64,
                });
            }
            Ok(samples)
        }));
    }
    Ok(tasks)
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Result<Vec<Sample>>>>) -> Result<Vec<Sample>> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let cutovers = env_or("SWITCHYARD_BENCH_CUTOVERS", if bench { 24 } else { 3 }) as i32;
    let tps = env_or("SWITCHYARD_BENCH_TPS", if bench { 400 } else { 100 });
    let budget = env_or("SWITCHYARD_BENCH_BUDGET_MS", 100);
    let tenants = cutovers + 8;
    let phase = Duration::from_secs(if bench { 10 } else { 2 });
    let src = PgCluster::start()?;
    prepare_target(&src)?;
    src.psql(&format!(
        "CREATE TABLE public.orders (tenant_id int NOT NULL, id bigint NOT NULL, note text,
           amount numeric(12,2), PRIMARY KEY (tenant_id, id));
         INSERT INTO public.orders SELECT t, g, 'n', 1 FROM generate_series(1, {tenants}) t, generate_series(1, 2000) g;
         VACUUM ANALYZE public.orders;
         CREATE PUBLICATION sy_pub FOR TABLE public.orders;
         GRANT SELECT, TRIGGER ON public.orders TO switchyard;
         GRANT pg_read_all_stats TO switchyard;"
    ))?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        None,
        &format!(
            "[cutover]\npause_budget_ms = {budget}\nretry_initial_ms = 200\nretry_max_ms = 2000\n"
        ),
    )?;
    let s = src.client().await?;
    let daemon = InProcess::start(load_config(&path)?, true);
    wait_for("the registry", Duration::from_secs(60), || async {
        Ok(s.query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = 'switchyard' AND tablename = 'routes'",
            &[],
        )
        .await?
        .map(|_| ()))
    })
    .await?;
    let routes: Routes = Arc::new(Mutex::new(HashMap::new()));

    // 1. Baseline: the load alone, no fence trigger on the table yet.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&src, tenants, tps, 4, routes.clone(), stop.clone(), 1).await?;
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    let before = collect(tasks).await?;

    // 2. Move and cut over `cutovers` tenants (auto mode) under the same load.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&src, tenants, tps, 4, routes.clone(), stop.clone(), 2).await?;
    let registry = Registry::new("switchyard")?;
    let target = TargetId::new("local")?;
    let mut ids = Vec::new();
    for t in 1..=cutovers {
        ids.push(
            registry
                .request_move(
                    &s,
                    &TenantId::new(t.to_string())?,
                    &target,
                    &format!("t{t}"),
                    CutoverMode::Auto,
                )
                .await?,
        );
    }
    let t0 = Instant::now();
    wait_for("every cutover", Duration::from_secs(600), || async {
        let n: i64 = s
            .query_one(
                "SELECT count(*) FROM switchyard.moves WHERE state = 'cut_over'",
                &[],
            )
            .await?
            .get(0);
        let failed: Option<String> = s
            .query_opt(
                "SELECT tenant || ': ' || coalesce(last_error, '') FROM switchyard.moves WHERE state IN ('failed', 'paused') LIMIT 1",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        if let Some(f) = failed {
            anyhow::bail!("a move failed: {f}");
        }
        Ok((n == cutovers as i64).then_some(()))
    })
    .await?;
    let moving_took = t0.elapsed();
    // Let the load run on with every moved tenant at its new place.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let during = collect(tasks).await?;

    // 3. After: the same load with the fence triggers installed (moved tenants write at
    // their new schemas; the rest still pass the trigger at the old table).
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&src, tenants, tps, 4, routes.clone(), stop.clone(), 3).await?;
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    let after = collect(tasks).await?;
    daemon.stop().await?;

    // Fenced windows: [cut_over_at, + pause] per tenant, from the registry (same clock).
    let rows = s
        .query(
            "SELECT tenant::int, (extract(epoch FROM cut_over_at) * 1e6)::int8, pause_ms, cutover_attempts \
               FROM switchyard.moves WHERE state = 'cut_over'",
            &[],
        )
        .await?;
    let attempts: i64 = s
        .query_one("SELECT count(*) FROM switchyard.cutover_attempts", &[])
        .await?
        .get(0);
    let aborted: Vec<(String, i64)> = s
        .query(
            "SELECT coalesce(step, '?'), count(*) FROM switchyard.cutover_attempts WHERE result = 'aborted' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut pauses = Vec::new();
    let mut windows = Vec::new();
    for r in &rows {
        let (tenant, at, pause): (i32, i64, f64) = (r.get(0), r.get(1), r.get(2));
        pauses.push(pause);
        windows.push((tenant, at, at + (pause * 1000.0) as i64));
    }
    // The moving tenant: its slowest write that overlapped its window.
    let mut tenant_seen = Vec::new();
    for (tenant, from, to) in &windows {
        let worst = during
            .iter()
            .filter(|x| x.tenant == *tenant && x.start <= *to && x.start + x.micros >= *from)
            .map(|x| x.micros as f64 / 1e3)
            .fold(0.0, f64::max);
        tenant_seen.push(worst);
    }
    let overlaps = |x: &Sample| {
        windows
            .iter()
            .any(|(t, from, to)| *t != x.tenant && x.start <= *to && x.start + x.micros >= *from)
    };
    let mut others_in: Vec<f64> = during
        .iter()
        .filter(|x| overlaps(x))
        .map(|x| x.micros as f64 / 1e3)
        .collect();
    let mut others_out: Vec<f64> = during
        .iter()
        .filter(|x| !overlaps(x))
        .map(|x| x.micros as f64 / 1e3)
        .collect();
    let lat = |v: &[Sample]| -> Vec<f64> { v.iter().map(|x| x.micros as f64 / 1e3).collect() };
    let (mut b, mut a) = (lat(&before), lat(&after));

    println!("## Cutover pauses ({cutovers} tenants cut over under {tps} tps offered, 4 clients, budget {budget} ms)\n");
    println!("| measure | p50 ms | p99 ms | max ms | n |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, v: &mut Vec<f64>| {
        let n = v.len();
        let max = v.iter().copied().fold(f64::NAN, f64::max);
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {n} |",
            percentile(v, 0.5),
            percentile(v, 0.99),
            max
        );
    };
    row(
        "tenant write pause (switchyard: lock request → commit)",
        &mut pauses,
    );
    row(
        "moving tenant's slowest write around its cutover (client)",
        &mut tenant_seen,
    );
    row(
        "other tenants' writes overlapping a fenced window (client)",
        &mut others_in,
    );
    row(
        "other tenants' writes outside the windows (client)",
        &mut others_out,
    );
    row("all writes, before any fence trigger (client)", &mut b);
    row(
        "all writes, fence triggers installed, after (client)",
        &mut a,
    );
    println!(
        "\n{attempts} attempts for {} cutovers; aborted by step: {aborted:?}; moving and cutting over took {:.1} s",
        rows.len(),
        moving_took.as_secs_f64()
    );
    println!(
        "throughput before {:.0} tps, after {:.0} tps (offered {tps})",
        before.len() as f64 / phase.as_secs_f64(),
        after.len() as f64 / phase.as_secs_f64()
    );
    anyhow::ensure!(
        rows.len() == cutovers as usize,
        "not every tenant was cut over"
    );
    Ok(())
}
