//! Cutover pauses under a pgbench-style load: many small tenants of one shared table are
//! moved into their own schemas and, once all are in sync, cut over one after another while
//! client connections keep writing every tenant at a fixed rate. An application-like router
//! sends each tenant's writes where `switchyard.routes` says, and re-reads it on SQLSTATE
//! SY001.
//!
//! Reports, over all cutovers: the tenant's write pause as switchyard measured it (lock
//! request to commit), the slowest write of the moving tenant during its cutover as a client
//! writing it back to back saw it (a refused write counts until its re-routed retry
//! succeeded), each cutover's time from request to `cut_over`, other tenants' write latency
//! during the fenced windows against the latency outside them, attempts and aborts, and the
//! fence trigger's cost for other tenants (write latency with the triggers installed
//! against before).
//!
//! Run: `cargo bench --bench cutover` (SWITCHYARD_BENCH_CUTOVERS, default 24, tenants cut
//! over; SWITCHYARD_BENCH_TPS, default 1000, the offered load, over SWITCHYARD_BENCH_CLIENTS,
//! default 8, connections; SWITCHYARD_BENCH_BUDGET_MS, default 100, the pause budget;
//! SWITCHYARD_BENCH_ROLLBACK, default 1, 0 for `rollback = false`: no reverse replication;
//! SWITCHYARD_BENCH_WORKLOAD, `orders` by default, or `tpcb`: pgbench's TPC-B tables with the
//! branch `bid` as the tenant, one branch per tenant, and TPC-B's transaction kept inside one
//! branch (its account and teller are the branch's), since an application that routes a
//! tenant writes one tenant per transaction; the branch row is hot).
//! Prints Markdown; docs/benchmarks.md has the figures.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use support::mover::{prepare_target, write_config, Process};
use support::report::{env_or, percentile, summary};
use support::{wait_for, PgCluster};
use switchyard::registry::{CutoverMode, Registry};
use switchyard::tenant::{TargetId, TenantId};

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

/// Where the application's cache says `tenant` lives (its schema; `public` until moved).
fn route_of(routes: &Routes, tenant: i32) -> String {
    routes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&tenant)
        .cloned()
        .unwrap_or_else(|| "public".into())
}

/// What an application does on SY001: re-read the tenant's route.
async fn reroute(client: &tokio_postgres::Client, routes: &Routes, tenant: i32) -> Result<()> {
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
    Ok(())
}

/// What the clients write.
#[derive(Clone, Copy, PartialEq)]
enum Workload {
    /// The bench's own `orders` table (`tenant_id`): an UPDATE and an INSERT.
    Orders,
    /// pgbench's tables (`bid`): TPC-B's transaction inside one branch.
    Tpcb,
}

impl Workload {
    fn from_env() -> Result<Workload> {
        match std::env::var("SWITCHYARD_BENCH_WORKLOAD").as_deref() {
            Err(_) | Ok("") | Ok("orders") => Ok(Workload::Orders),
            Ok("tpcb") => Ok(Workload::Tpcb),
            Ok(other) => anyhow::bail!("SWITCHYARD_BENCH_WORKLOAD={other}: orders or tpcb"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Orders => "orders",
            Workload::Tpcb => "tpcb",
        }
    }

    /// One write transaction of `tenant` at `schema`, from the random draw `x` (`i` is an id
    /// no other transaction of the run inserts).
    fn txn(self, schema: &str, tenant: i32, x: u64, i: i64) -> String {
        match self {
            Workload::Orders => format!(
                "BEGIN;
                 UPDATE \"{schema}\".orders SET amount = amount + 1 WHERE tenant_id = {tenant} AND id = {k};
                 INSERT INTO \"{schema}\".orders VALUES ({tenant}, {i}, 'w', 1);
                 COMMIT;",
                k = x % 2000 + 1,
            ),
            Workload::Tpcb => {
                // pgbench's numbering: 100,000 accounts and 10 tellers per branch.
                let aid = (tenant as u64 - 1) * 100_000 + x % 100_000 + 1;
                let tid = (tenant as u64 - 1) * 10 + (x >> 20) % 10 + 1;
                let delta = (x >> 24) % 10_001;
                let delta = delta as i64 - 5_000;
                format!(
                    "BEGIN;
                     UPDATE \"{schema}\".pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};
                     SELECT abalance FROM \"{schema}\".pgbench_accounts WHERE aid = {aid};
                     UPDATE \"{schema}\".pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};
                     UPDATE \"{schema}\".pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {tenant};
                     INSERT INTO \"{schema}\".pgbench_history (tid, bid, aid, delta, mtime)
                       VALUES ({tid}, {tenant}, {aid}, {delta}, CURRENT_TIMESTAMP);
                     COMMIT;"
                )
            }
        }
    }

    /// The moving tenant's own writer's transaction (written back to back).
    fn hammer_txn(self, schema: &str, tenant: i32, x: u64, i: i64) -> String {
        match self {
            Workload::Orders => {
                format!("INSERT INTO \"{schema}\".orders VALUES ({tenant}, {i}, 'h', 1)")
            }
            Workload::Tpcb => self.txn(schema, tenant, x, i),
        }
    }
}

/// The next draw of a xorshift generator: a different tenant or row each time, no extra
/// dependency.
fn next_draw(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The clients' load: what they write, to how many tenants, how fast in total, over how
/// many connections, following which routes.
struct Load<'a> {
    src: &'a PgCluster,
    workload: Workload,
    tenants: i32,
    tps: u64,
    clients: usize,
    routes: Routes,
}

/// Client connections writing random tenants at `tps` in total until `stop`.
async fn load(
    l: &Load<'_>,
    stop: Arc<AtomicBool>,
    phase: i64,
) -> Result<Vec<tokio::task::JoinHandle<Result<Vec<Sample>>>>> {
    let Load {
        src,
        workload,
        tenants,
        tps,
        clients,
        ..
    } = *l;
    let routes = l.routes.clone();
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
                let tenant = (next_draw(&mut x) % tenants as u64) as i32 + 1;
                let row = next_draw(&mut x);
                i += 1;
                let start = now_micros();
                let t0 = Instant::now();
                loop {
                    let schema = route_of(&routes, tenant);
                    let sql = workload.txn(&schema, tenant, row, i);
                    match client.batch_execute(&sql).await {
                        Ok(()) => break,
                        Err(e) if e.code().map(|c| c.code()) == Some("SY001") => {
                            let _ = client.batch_execute("ROLLBACK").await;
                            reroute(&client, &routes, tenant).await?;
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

/// Writes `tenant` back to back until `stop`, following its route like the load does;
/// returns the slowest write in µs (a refused write counts until its retry succeeded).
async fn hammer(
    src: &PgCluster,
    workload: Workload,
    tenant: i32,
    routes: Routes,
    stop: Arc<AtomicBool>,
) -> Result<tokio::task::JoinHandle<Result<i64>>> {
    let client = src.client().await?;
    Ok(tokio::spawn(async move {
        let mut worst = 0i64;
        let mut i: i64 = 9_000_000_000 + tenant as i64 * 1_000_000;
        let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ tenant as u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let row = next_draw(&mut x);
            let t0 = Instant::now();
            loop {
                let schema = route_of(&routes, tenant);
                let sql = workload.hammer_txn(&schema, tenant, row, i);
                match client.batch_execute(&sql).await {
                    Ok(()) => break,
                    Err(e) if e.code().map(|c| c.code()) == Some("SY001") => {
                        // A refused transaction (not a single statement) is still open.
                        let _ = client.batch_execute("ROLLBACK").await;
                        reroute(&client, &routes, tenant).await?;
                    }
                    Err(e) => return Err(e).context(format!("a write of tenant {tenant}")),
                }
            }
            worst = worst.max(t0.elapsed().as_micros() as i64);
        }
        Ok(worst)
    }))
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
    let tps = env_or("SWITCHYARD_BENCH_TPS", if bench { 1000 } else { 100 });
    let clients = env_or("SWITCHYARD_BENCH_CLIENTS", 8) as usize;
    let budget = env_or("SWITCHYARD_BENCH_BUDGET_MS", 100);
    // Reverse replication (the product's default): every cut-over tenant's writes at its
    // new schema also go back to the old table, through the target's one reverse slot.
    let rollback = env_or("SWITCHYARD_BENCH_ROLLBACK", 1) != 0;
    let workload = Workload::from_env()?;
    let tenants = cutovers + 8;
    let phase = Duration::from_secs(if bench { 10 } else { 2 });
    let src = PgCluster::start_for_bench()?;
    prepare_target(&src)?;
    let tenancy = match workload {
        Workload::Orders => {
            src.psql(&format!(
                "CREATE TABLE public.orders (tenant_id int NOT NULL, id bigint NOT NULL, note text,
                   amount numeric(12,2), PRIMARY KEY (tenant_id, id));
                 INSERT INTO public.orders SELECT t, g, 'n', 1 FROM generate_series(1, {tenants}) t, generate_series(1, 2000) g;
                 VACUUM ANALYZE public.orders;
                 CREATE PUBLICATION sy_pub FOR TABLE public.orders;
                 GRANT SELECT, TRIGGER ON public.orders TO switchyard;
                 GRANT pg_read_all_stats TO switchyard;"
            ))?;
            src.psql(&support::app_owned(&["public"]))?;
            ""
        }
        Workload::Tpcb => {
            // One branch per tenant: pgbench's scale is the tenant count.
            support::tpcb::init(&src, tenants as u32)?;
            "[tenancy]\ntenant_column = \"bid\"\n"
        }
    };
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        None,
        &format!(
            "{tenancy}[cutover]\npause_budget_ms = {budget}\nretry_initial_ms = 200\nretry_max_ms = 2000\nrollback = {rollback}\n"
        ),
    )?;
    let s = src.client().await?;
    // The real binary with its default threads, so the bench's own load and probes do not
    // share the daemon's runtime.
    let mut daemon = Process::start(
        &path,
        &support::report::daemon_log(dir.path(), "daemon.log"),
        true,
    )?;
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
    let clients_load = Load {
        src: &src,
        workload,
        tenants,
        tps,
        clients,
        routes: routes.clone(),
    };

    // 1. Baseline: the load alone, no fence trigger on the table yet.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&clients_load, stop.clone(), 1).await?;
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    let before = collect(tasks).await?;

    // 2. Move and cut over `cutovers` tenants (auto mode) under the same load.
    let stop = Arc::new(AtomicBool::new(false));
    let during_from = Instant::now();
    let tasks = load(&clients_load, stop.clone(), 2).await?;
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
                    CutoverMode::Manual,
                )
                .await?,
        );
    }
    wait_for("every move in sync", Duration::from_secs(600), || async {
        let n: i64 = s
            .query_one(
                "SELECT count(*) FROM switchyard.moves WHERE state = 'streaming'",
                &[],
            )
            .await?
            .get(0);
        Ok((n == cutovers as i64).then_some(()))
    })
    .await?;
    // One cutover at a time, as an operator would run them, under the running load.
    let t0 = Instant::now();
    let mut tenant_seen = Vec::new();
    let mut request_to_cut_over = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        // The moving tenant's own writer, writing back to back through the cutover: its
        // slowest write (refusal and re-route included) is the pause the tenant saw.
        let hammer_stop = Arc::new(AtomicBool::new(false));
        let hammer = hammer(
            &src,
            workload,
            n as i32 + 1,
            routes.clone(),
            hammer_stop.clone(),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let requested = Instant::now();
        s.execute(
            "UPDATE switchyard.moves SET cutover_requested = true WHERE id = $1",
            &[id],
        )
        .await?;
        let waited = wait_for("the cutover", Duration::from_secs(120), || async {
            let (state, error): (String, Option<String>) = s
                .query_one(
                    "SELECT state, last_error FROM switchyard.moves WHERE id = $1",
                    &[id],
                )
                .await
                .map(|r| (r.get(0), r.get(1)))?;
            if state == "failed" || state == "paused" {
                anyhow::bail!("move {id} {state}: {error:?}");
            }
            Ok((state == "cut_over").then_some(()))
        })
        .await;
        if let Err(e) = waited {
            let row = s
                .query_one(
                    "SELECT state, last_error, cutover_attempts FROM switchyard.moves WHERE id = $1",
                    &[id],
                )
                .await?;
            let (state, error, attempts): (String, Option<String>, i32) =
                (row.get(0), row.get(1), row.get(2));
            return Err(e.context(format!(
                "move {id}: {state} after {attempts} attempts, last error {error:?}"
            )));
        }
        request_to_cut_over.push(requested.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(50)).await;
        hammer_stop.store(true, Ordering::Relaxed);
        tenant_seen.push(hammer.await?? as f64 / 1e3);
    }
    let moving_took = t0.elapsed();
    // Let the load run on with every moved tenant at its new place.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let during = collect(tasks).await?;
    let during_took = during_from.elapsed();

    // 3. After: the same load with the fence triggers installed (moved tenants write at
    // their new schemas; the rest still pass the trigger at the old table).
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&clients_load, stop.clone(), 3).await?;
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    let after = collect(tasks).await?;
    daemon.terminate()?;

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
    // Cutovers run one at a time, so a window holds one moving tenant: every other
    // tenant's write in it is a bystander's.
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

    println!("## Cutover pauses ({} workload, {cutovers} tenants cut over under {tps} tps offered, {clients} clients, budget {budget} ms, synchronous_commit = {}, rollback = {rollback})\n", workload.name(), support::bench_sync_commit());
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
        "moving tenant's slowest write during its cutover (client writing it back to back; refusal and re-route included)",
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
    row(
        "request to cut over, per tenant (verification and aborted attempts included)",
        &mut request_to_cut_over,
    );
    row("all writes, before any fence trigger (client)", &mut b);
    row(
        "all writes, fence triggers installed, after (client)",
        &mut a,
    );
    println!(
        "\n{attempts} attempts for {} cutovers; aborted by step: {aborted:?}; the cutovers, one after another, took {:.1} s",
        rows.len(),
        moving_took.as_secs_f64()
    );
    let tps_during = during.len() as f64 / during_took.as_secs_f64();
    println!(
        "throughput before {:.0} tps, during the moves and cutovers {tps_during:.0} tps, after {:.0} tps (offered {tps})",
        before.len() as f64 / phase.as_secs_f64(),
        after.len() as f64 / phase.as_secs_f64()
    );
    anyhow::ensure!(
        rows.len() == cutovers as usize,
        "not every tenant was cut over"
    );
    support::report::record(
        "cutover",
        serde_json::json!({
            "workload": workload.name(),
            "cutovers": cutovers,
            "offered_tps": tps,
            "synchronous_commit": support::bench_sync_commit(),
            "clients": clients,
            "budget_ms": budget,
            "attempts": attempts,
            "aborted": aborted,
            "pause_ms": summary(&mut pauses),
            "moving_tenant_slowest_write_ms": summary(&mut tenant_seen),
            "request_to_cut_over_ms": summary(&mut request_to_cut_over),
            "others_in_window_ms": summary(&mut others_in),
            "others_outside_ms": summary(&mut others_out),
            "before_triggers_ms": summary(&mut b),
            "after_triggers_ms": summary(&mut a),
            "tps_before": before.len() as f64 / phase.as_secs_f64(),
            "tps_during": tps_during,
            "tps_after": after.len() as f64 / phase.as_secs_f64(),
            "rollback": rollback,
        }),
    )?;
    Ok(())
}
