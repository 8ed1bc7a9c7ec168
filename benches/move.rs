//! Moving one big tenant, side by side in one run on the same two throwaway clusters:
//! switchyard, native logical replication (row-filtered publication + subscription), and a
//! plain COPY pipe. Then backlog apply: the same burst of source transactions, applied by a
//! paused-then-resumed native subscription and by a stopped-then-restarted switchyard.
//!
//! Run: `cargo bench --bench move` (SWITCHYARD_BENCH_ROWS, default 1000000, sets the big
//! tenant's rows; SWITCHYARD_BENCH_TXNS, default 20000, the backlog's transactions;
//! SWITCHYARD_BENCH_ROUNDS, default 5, how often each measurement is repeated (medians are
//! reported; native's own backlog rounds spread over 1.5-2.7 s on one host, so fewer rounds
//! often decide a ratio by noise); SWITCHYARD_BENCH_CHUNK, default 20000, switchyard's `move.chunk_rows`;
//! SWITCHYARD_BENCH_LANES, default this host's cores up to 4 (the target's
//! free cores, as docs/configuration.md advises), its `move.apply_lanes`; SWITCHYARD_BENCH_BATCH,
//! default 5000 as in the product, its `move.batch_max_txns`; SWITCHYARD_BENCH_WORKERS, default 1 as in
//! `switchyard run`, the async runtime's worker threads, which the in-process daemon runs on;
//! 0: the current thread only); SWITCHYARD_BENCH_MARKS, unset by default, a directory where an
//! empty file is created as each backlog catch-up starts and ends (`r0-a-native-start`,
//! `r0-b-native-end`, `r0-c-sy-start`, `r0-d-sy-end`, ...), so that a profiler or sampler
//! run beside the bench can cut its record to one phase). Each backlog round prints both
//! catch-up times, the WAL each slot decoded again before reaching the backlog, and the
//! tables whose autovacuum/autoanalyze runs finished during each. Before each round both
//! slots' restart points are brought up to their confirmed positions (see
//! `settle_restart_points`), so that no round decodes the earlier rounds' backlogs again,
//! and before each catch-up both target databases are vacuumed and analyzed (see
//! `settle_target_maintenance`), so that no maintenance is due when it starts.
//! Prints a Markdown table; docs/benchmarks.md has the figures.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use support::mover::{load_config, prepare_target, request, wait_state, write_config, InProcess};
use support::report::{env_or, native_subscription};
use support::{wait_for, PgCluster};
use switchyard::config::MoveSettings;
use switchyard::registry::Registry;

/// CPU seconds (user + system) this process used so far: the daemon runs in-process, so a
/// difference is switchyard's own CPU for that phase. Linux only (`/proc/PID/stat`).
fn cpu_seconds() -> f64 {
    support::proc_cpu_ticks(std::process::id(), false) as f64 / 100.0
}

/// CPU seconds spent so far by the source cluster, the target cluster and this process
/// (which runs the COPY pipe and the in-process daemon).
fn cpu_now(src: &PgCluster, dst: &PgCluster) -> [f64; 3] {
    [src.cpu_seconds(), dst.cpu_seconds(), cpu_seconds()]
}

fn cpu_since(before: [f64; 3], src: &PgCluster, dst: &PgCluster) -> [f64; 3] {
    let now = cpu_now(src, dst);
    [now[0] - before[0], now[1] - before[1], now[2] - before[2]]
}

const TABLE: &str = "CREATE TABLE public.orders (
    tenant_id int NOT NULL, id bigint NOT NULL, customer text NOT NULL, status text NOT NULL,
    amount numeric(12,2) NOT NULL, created timestamptz NOT NULL, note text,
    PRIMARY KEY (tenant_id, id))";

/// Autovacuum and autoanalyze runs each table has had so far, on the source (`s`) and on
/// the target's two databases (`targets`), by table: a run that lands inside one pipeline's
/// catch-up takes a share of the two cores from it, so each round names the tables
/// maintained during each catch-up.
async fn maintenance_runs(
    s: &tokio_postgres::Client,
    targets: [&tokio_postgres::Client; 2],
) -> Result<std::collections::BTreeMap<String, i64>> {
    let mut out = std::collections::BTreeMap::new();
    for (side, c) in [
        ("source", s),
        ("target", targets[0]),
        ("target", targets[1]),
    ] {
        for row in c
            .query(
                "SELECT current_database() || '.' || schemaname || '.' || relname, \
                        (autovacuum_count + autoanalyze_count)::bigint \
                   FROM pg_stat_all_tables WHERE autovacuum_count + autoanalyze_count > 0",
                &[],
            )
            .await?
        {
            out.insert(format!("{side} {}", row.get::<_, String>(0)), row.get(1));
        }
    }
    Ok(out)
}

/// The tables maintained between two readings of [`maintenance_runs`], with their runs.
fn maintained(
    before: &std::collections::BTreeMap<String, i64>,
    after: &std::collections::BTreeMap<String, i64>,
) -> String {
    let runs: Vec<String> = after
        .iter()
        .filter_map(|(table, n)| {
            let new = n - before.get(table).copied().unwrap_or(0);
            (new > 0).then(|| format!("{table} x{new}"))
        })
        .collect();
    if runs.is_empty() {
        "none".into()
    } else {
        runs.join(", ")
    }
}

/// Vacuums and analyzes both target databases, so that no autovacuum or autoanalyze is
/// due when a catch-up starts. The backfill rounds leave million-row copies behind (the
/// earlier rounds' schemas, the pipe's and native's tables), and each catch-up leaves its
/// own table closer to its thresholds; the launcher then ran that work inside whichever
/// window came next. Without this, two 5-round runs had one or two target runs finishing
/// in 6 of switchyard's 10 windows and in 1 of native's (one named: an earlier round's
/// `big1.orders`, twice). Alternating rounds with and without it in one 8-round run gave
/// native 1.17-1.21 s against 1.13-1.22 s: it does not slow either pipeline down.
async fn settle_target_maintenance(targets: [&tokio_postgres::Client; 2]) -> Result<()> {
    for c in targets {
        c.batch_execute("VACUUM ANALYZE").await?;
    }
    Ok(())
}

async fn lsn(c: &tokio_postgres::Client) -> Result<String> {
    Ok(c.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

async fn slot_caught_up(c: &tokio_postgres::Client, slot: &str, lsn: &str) -> Result<bool> {
    Ok(c.query_one(
        "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot, &lsn],
    )
    .await?
    .get(0))
}

/// Bytes of WAL between the slot's restart point and its confirmed position: what its
/// walsender decodes again, and throws away, before the first new transaction when its
/// consumer reconnects.
async fn redecode_bytes(c: &tokio_postgres::Client, slot: &str) -> Result<i64> {
    Ok(c.query_one(
        "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await?
    .get(0))
}

/// Moves both slots' restart points up to their consumers' confirmed positions while both
/// consumers run and are caught up. A slot's restart point advances only at a running-xacts
/// record decoded while no transaction is in progress; PostgreSQL 15 logs one every 15 s
/// and at a checkpoint, and the bench's rounds write their backlogs through most of them,
/// so without this each round's walsenders decoded every earlier round's backlog again
/// (14, 28, 41, 55 MB in rounds 1-4 of one run), the same extra work for both pipelines that
/// pushed later rounds' ratios toward 1. A checkpoint logs the record (PostgreSQL 16 has
/// pg_log_standby_snapshot() for this alone).
async fn settle_restart_points(c: &tokio_postgres::Client, slots: &[&str]) -> Result<()> {
    c.batch_execute("CHECKPOINT").await?;
    let settled = wait_for(
        "the slots' restart points",
        Duration::from_secs(30),
        || async {
            for slot in slots {
                if redecode_bytes(c, slot).await? > 1 << 20 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await;
    if let Err(e) = settled {
        eprintln!("{e:#}: the next round decodes some WAL again");
    }
    Ok(())
}

/// The pid of the walsender serving the native subscription's slot, if one is attached.
async fn native_walsender(s: &tokio_postgres::Client) -> Result<Option<i32>> {
    Ok(s.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'native_sub'",
        &[],
    )
    .await?
    .get(0))
}

/// The pid of the native subscription's apply worker on the target, if one runs.
async fn native_apply_worker(dn: &tokio_postgres::Client) -> Result<Option<i32>> {
    Ok(dn
        .query_opt(
            "SELECT pid FROM pg_stat_subscription WHERE subname = 'native_sub' AND relid IS NULL AND pid IS NOT NULL",
            &[],
        )
        .await?
        .map(|r| r.get(0)))
}

/// Disables the native subscription and waits until its walsender (on the source) and its
/// apply worker (on the target) have exited and been reaped. A cluster's CPU is read from
/// the postmaster (with its reaped children) and then from its live children: a process
/// reaped between the two reads is counted in neither, and then in full at the window's
/// end. Native's apply worker exiting just as switchyard's catch-up started once put its
/// whole catch-up (~1.7 CPU-s) into switchyard's window (2.27 target CPU-s in a 0.95 s
/// catch-up on two cores); a process still exiting would also compete with it.
async fn disable_native(dn: &tokio_postgres::Client, s: &tokio_postgres::Client) -> Result<()> {
    let pids = [native_walsender(s).await?, native_apply_worker(dn).await?];
    dn.batch_execute("ALTER SUBSCRIPTION native_sub DISABLE")
        .await?;
    wait_for(
        "the native walsender and apply worker to exit",
        Duration::from_secs(60),
        || async {
            let attached =
                native_walsender(s).await?.is_some() || native_apply_worker(dn).await?.is_some();
            let running = pids
                .iter()
                .flatten()
                .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            Ok((!attached && !running).then_some(()))
        },
    )
    .await
}

/// From `start` until the slot confirms `target`.
async fn catch_up(
    c: &tokio_postgres::Client,
    slot: &str,
    target: &str,
    start: impl std::future::Future<Output = Result<()>>,
) -> Result<Duration> {
    let t0 = Instant::now();
    start.await?;
    loop {
        if slot_caught_up(c, slot, target).await? {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(3600),
            "{slot} never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Marks the start or end of a phase for a profiler outside (SWITCHYARD_BENCH_MARKS).
fn mark(name: &str) {
    if let Ok(dir) = std::env::var("SWITCHYARD_BENCH_MARKS") {
        if let Err(e) = std::fs::write(format!("{dir}/{name}"), b"") {
            eprintln!("cannot write the mark {dir}/{name}: {e}");
        }
    }
}

fn backlog_sql(txns: u64, rows: u64, round: u32) -> String {
    // Small OLTP transactions for the big tenant: one insert and two updates each.
    format!(
        "DO $$ BEGIN
           FOR i IN 1..{txns} LOOP
             INSERT INTO public.orders VALUES (1, 10000000 * {round} + i, 'c' || i, 'new', i, now(), NULL);
             UPDATE public.orders SET status = 'paid', amount = amount + 1 WHERE tenant_id = 1 AND id = (i::bigint * 7919) % {rows} + 1;
             UPDATE public.orders SET note = 'n{round}' WHERE tenant_id = 1 AND id = (i::bigint * 104729) % {rows} + 1;
             COMMIT;
           END LOOP;
         END $$;"
    )
}

fn main() -> Result<()> {
    // The in-process daemon shares this runtime: SWITCHYARD_BENCH_WORKERS sets its threads.
    let workers = env_or("SWITCHYARD_BENCH_WORKERS", 1);
    let mut runtime = match workers {
        0 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n as usize);
            b
        }
    };
    runtime.enable_all().build()?.block_on(bench(workers))
}

/// `workers`: the runtime's worker threads, as `main` built it (0: the current thread).
async fn bench(workers: u64) -> Result<()> {
    // `cargo test --all-targets` runs this too (without `--bench`): then a small smoke run
    // checks that the benchmark still works, and its figures mean nothing.
    let bench = std::env::args().any(|a| a == "--bench");
    let rows = env_or(
        "SWITCHYARD_BENCH_ROWS",
        if bench { 1_000_000 } else { 20_000 },
    );
    let txns = env_or("SWITCHYARD_BENCH_TXNS", if bench { 20_000 } else { 300 });
    let src = PgCluster::start_for_bench()?;
    let dst = PgCluster::start_for_bench()?;
    prepare_target(&dst)?;
    // The launcher restarts a subscription's worker at most once per
    // wal_retrieve_retry_interval (5 s by default): later rounds re-create and re-enable the
    // subscription within seconds, which must not count against native.
    dst.psql("ALTER SYSTEM SET wal_retrieve_retry_interval = '50ms'; SELECT pg_reload_conf();")?;
    src.psql(&format!(
        "{TABLE};
         INSERT INTO public.orders
           SELECT 1, g, 'customer ' || (g % 5000), 'open', (g % 1000) + 0.5, '2026-01-01'::timestamptz + g * interval '1 s', NULL
             FROM generate_series(1, {rows}) g;
         INSERT INTO public.orders
           SELECT t, g, 'customer ' || g, 'open', 1, '2026-01-01', NULL
             FROM generate_series(2, 5) t, generate_series(1, {other}) g;
         VACUUM ANALYZE public.orders;
         CREATE PUBLICATION sy_pub FOR TABLE public.orders;
         CREATE PUBLICATION native_pub FOR TABLE public.orders WHERE (tenant_id = 1);
         GRANT SELECT ON public.orders TO switchyard;",
        other = rows / 10
    ))?;
    dst.create_database("native")?;
    dst.psql_with(
        &format!(
            "host={} port={} user=postgres dbname=native",
            dst.socket_dir().display(),
            dst.port()
        ),
        TABLE,
    )?;
    dst.psql(&format!(
        "CREATE SCHEMA pipe; {}",
        TABLE.replace("public.orders", "pipe.orders")
    ))?;
    let s = src.client().await?;
    let d = dst.client().await?;
    let dn = dst.client_db("native").await?;

    let rounds = env_or("SWITCHYARD_BENCH_ROUNDS", if bench { 5 } else { 1 }) as usize;
    let mut pipe_t = Vec::new();
    let mut native_t = Vec::new();
    let mut sy_t = Vec::new();
    let mut sy_cpu = Vec::new();
    // Per pipeline and round: [source cluster, target cluster, this process] CPU seconds.
    let mut pipe_cpu3 = Vec::new();
    let mut native_cpu3 = Vec::new();
    let mut sy_cpu3 = Vec::new();
    let dir = tempfile::tempdir()?;
    let chunk_rows = env_or("SWITCHYARD_BENCH_CHUNK", 20_000);
    // Sized as docs/configuration.md advises: the target's free cores, which here are this
    // host's, shared with the source and the daemon (at most the product's default of 4).
    let product = MoveSettings::default();
    let most = product.apply_lanes as u64;
    let cores = std::thread::available_parallelism().map_or(most, |n| n.get() as u64);
    let lanes = env_or("SWITCHYARD_BENCH_LANES", cores.min(most));
    let batch = env_or("SWITCHYARD_BENCH_BATCH", product.batch_max_txns as u64);
    let path = write_config(
        dir.path(),
        &src,
        Some(&dst),
        &format!(
            "[move]\nchunk_rows = {chunk_rows}\napply_lanes = {lanes}\nbatch_max_txns = {batch}\n"
        ),
    )?;
    let registry = Registry::new("switchyard")?;
    let mut daemon: Option<InProcess> = None;
    let mut move_id: Option<i64> = None;
    for round in 0..rounds {
        // 1. COPY pipe: the floor for moving bytes.
        d.batch_execute("TRUNCATE pipe.orders").await?;
        let t0 = Instant::now();
        let c0 = cpu_now(&src, &dst);
        {
            let out = s
                .copy_out("COPY (SELECT * FROM public.orders WHERE tenant_id = 1) TO STDOUT")
                .await?;
            let sink = d.copy_in("COPY pipe.orders FROM STDIN").await?;
            futures_util::pin_mut!(out);
            futures_util::pin_mut!(sink);
            // COPY TO yields one message per row: forward them in 1 MiB writes, as `psql |
            // psql` pipes do, not one network write per row.
            let mut buf = bytes::BytesMut::with_capacity(1 << 20);
            while let Some(chunk) = out.next().await {
                buf.extend_from_slice(&chunk?);
                if buf.len() >= 1 << 20 {
                    sink.send(buf.split().freeze()).await?;
                }
            }
            if !buf.is_empty() {
                sink.send(buf.split().freeze()).await?;
            }
            sink.finish().await?;
        }
        pipe_t.push(t0.elapsed());
        pipe_cpu3.push(cpu_since(c0, &src, &dst));

        // 2. Native logical replication: initial sync of the row-filtered publication
        // (switchyard, if running, is idle: nothing is written meanwhile).
        if round > 0 {
            dn.batch_execute("DROP SUBSCRIPTION native_sub").await?;
            dn.batch_execute("TRUNCATE public.orders").await?;
        }
        let t0 = Instant::now();
        let c0 = cpu_now(&src, &dst);
        native_subscription(&dn, src.port(), "native_pub").await?;
        native_t.push(t0.elapsed());
        native_cpu3.push(cpu_since(c0, &src, &dst));

        // 3. switchyard: move request → in sync (backfill under the stream). Later rounds
        // cancel the previous move and move the tenant again, into a new schema.
        if daemon.is_none() {
            daemon = Some(InProcess::start(load_config(&path)?, true));
            wait_for("the registry", Duration::from_secs(60), || async {
                Ok(s.query_opt(
                    "SELECT 1 FROM pg_tables WHERE schemaname = 'switchyard' AND tablename = 'moves'",
                    &[],
                )
                .await?
                .map(|_| ()))
            })
            .await?;
        }
        if let Some(id) = move_id {
            s.execute(
                "UPDATE switchyard.moves SET state = 'cancelled' WHERE id = $1",
                &[&id],
            )
            .await?;
            wait_state(&s, id, "cancelled", Duration::from_secs(60)).await?;
            // The daemon lets go of a cancelled tenant within a registry poll.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let schema = format!("big{round}");
        let t0 = Instant::now();
        let cpu0 = cpu_seconds();
        let c0 = cpu_now(&src, &dst);
        let id = request(&s, &registry, "1", "shard2", &schema).await?;
        wait_state(&s, id, "streaming", Duration::from_secs(3600)).await?;
        sy_t.push(t0.elapsed());
        sy_cpu.push(cpu_seconds() - cpu0);
        sy_cpu3.push(cpu_since(c0, &src, &dst));
        move_id = Some(id);
        let n: i64 = d
            .query_one(&format!("SELECT count(*) FROM {schema}.orders"), &[])
            .await?
            .get(0);
        anyhow::ensure!(n as u64 == rows, "switchyard copied {n} rows of {rows}");
    }
    let schema = format!("big{}", rounds - 1);

    // 4. Backlog apply. Both consumers are stopped while one burst is written; then native
    // catches up alone (switchyard stopped), then switchyard alone (native disabled), each
    // timed from resume until its slot confirms the burst's end.
    let mut native_backlog_t = Vec::new();
    let mut sy_backlog_t = Vec::new();
    let mut sy_backlog_cpu = Vec::new();
    let mut native_backlog_cpu3 = Vec::new();
    let mut sy_backlog_cpu3 = Vec::new();
    for round in 0..rounds {
        settle_restart_points(&s, &["native_sub", "sy"]).await?;
        if let Some(d) = daemon.take() {
            d.stop().await?;
        }
        disable_native(&dn, &s).await?;
        s.batch_execute(&backlog_sql(txns, rows, round as u32 + 1))
            .await?;
        let target = lsn(&s).await?;
        s.batch_execute("SELECT pg_logical_emit_message(true, 'bench', 'end')")
            .await?;
        // The backlog leaves the source table due for autovacuum and autoanalyze (from the
        // second round on); run them now, so that neither pipeline's catch-up shares the two
        // cores with the source's own maintenance (a round with three such runs during
        // native's catch-up had switchyard's slowest time, 1.23 s against 0.82-0.97).
        s.batch_execute("VACUUM ANALYZE public.orders").await?;
        settle_target_maintenance([&d, &dn]).await?;
        let m0 = maintenance_runs(&s, [&d, &dn]).await?;
        let redecode_native = redecode_bytes(&s, "native_sub").await?;
        let redecode_sy = redecode_bytes(&s, "sy").await?;
        let c0 = cpu_now(&src, &dst);
        mark(&format!("r{round}-a-native-start"));
        let native_total = catch_up(&s, "native_sub", &target, async {
            dn.batch_execute("ALTER SUBSCRIPTION native_sub ENABLE")
                .await?;
            Ok(())
        })
        .await?;
        mark(&format!("r{round}-b-native-end"));
        native_backlog_t.push(native_total);
        native_backlog_cpu3.push(cpu_since(c0, &src, &dst));
        let m1 = maintenance_runs(&s, [&d, &dn]).await?;
        disable_native(&dn, &s).await?;
        settle_target_maintenance([&d, &dn]).await?;
        let m2 = maintenance_runs(&s, [&d, &dn]).await?;
        let cpu0 = cpu_seconds();
        let c0 = cpu_now(&src, &dst);
        mark(&format!("r{round}-c-sy-start"));
        let sy_total = catch_up(&s, "sy", &target, async {
            daemon = Some(InProcess::start(load_config(&path)?, false));
            Ok(())
        })
        .await?;
        mark(&format!("r{round}-d-sy-end"));
        let m3 = maintenance_runs(&s, [&d, &dn]).await?;
        eprintln!(
            "round {round}: native {:.2} s, switchyard {:.2} s; WAL decoded again before the backlog: native {} kB, switchyard {} kB; autovacuum/autoanalyze runs finished during native's catch-up: {}; during switchyard's: {}",
            native_total.as_secs_f64(),
            sy_total.as_secs_f64(),
            redecode_native / 1024,
            redecode_sy / 1024,
            maintained(&m0, &m1),
            maintained(&m2, &m3),
        );
        sy_backlog_t.push(sy_total);
        sy_backlog_cpu.push(cpu_seconds() - cpu0);
        sy_backlog_cpu3.push(cpu_since(c0, &src, &dst));
        dn.batch_execute("ALTER SUBSCRIPTION native_sub ENABLE")
            .await?;
    }
    if let Some(d) = daemon.take() {
        d.stop().await?;
    }
    // Both applied the same bursts: the big tenant is equal everywhere.
    let want = {
        let r = s
            .query_one(
                "SELECT count(*), sum(amount)::text FROM public.orders WHERE tenant_id = 1",
                &[],
            )
            .await?;
        (r.get::<_, i64>(0), r.get::<_, Option<String>>(1))
    };
    for (client, table) in [
        (&d, format!("{schema}.orders")),
        (&dn, "public.orders".into()),
    ] {
        let got = wait_for("the target to match", Duration::from_secs(120), || async {
            let r = client
                .query_one(
                    &format!("SELECT count(*), sum(amount)::text FROM {table}"),
                    &[],
                )
                .await?;
            let got = (r.get::<_, i64>(0), r.get::<_, Option<String>>(1));
            Ok((got == want).then_some(got))
        })
        .await;
        anyhow::ensure!(got.is_ok(), "{table} differs from the source: {want:?}");
    }

    let secs = |d: Duration| d.as_secs_f64();
    let median = |v: &[Duration]| {
        let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64()).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        s[s.len() / 2]
    };
    let list = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.2}", secs(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let total_changes = txns * 3;
    println!(
        "\n## Moving a {rows}-row tenant (same run, same machine, {rounds} rounds; switchyard: {lanes} apply lanes, {workers} pipeline threads; synchronous_commit = {})\n",
        support::bench_sync_commit()
    );
    println!("| pipeline | median s | rows/s | rounds (s) |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("COPY pipe (COPY TO → COPY FROM)", &pipe_t),
        ("native LR initial sync (row filter)", &native_t),
        ("switchyard backfill to in-sync", &sy_t),
    ] {
        println!(
            "| {name} | {:.2} | {:.0} | {} |",
            median(v),
            rows as f64 / median(v),
            list(v)
        );
    }
    let cpu = |v: &[f64]| {
        v.iter()
            .map(|c| format!("{c:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\nbackfill ratio (native median / switchyard median): {:.2}; switchyard's own CPU per round (s): {}",
        median(&native_t) / median(&sy_t),
        cpu(&sy_cpu)
    );
    println!("\n## Backlog apply: {txns} transactions, {total_changes} row changes per round\n");
    println!("| pipeline | median resume → caught up (s) | changes/s | rounds (s) |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("native LR (subscription re-enabled)", &native_backlog_t),
        ("switchyard (daemon restarted)", &sy_backlog_t),
    ] {
        println!(
            "| {name} | {:.2} | {:.0} | {} |",
            median(v),
            total_changes as f64 / median(v),
            list(v)
        );
    }
    println!(
        "\nbacklog ratio (native median / switchyard median): {:.2}; switchyard's own CPU per round (s): {}",
        median(&native_backlog_t) / median(&sy_backlog_t),
        cpu(&sy_backlog_cpu)
    );
    // CPU per pipeline (medians per column over the rounds): on one 2-core machine the
    // wall-clock ratios above are bounded by the cores all processes share; the CPU each
    // pipeline spent is what separate hosts would see.
    let median_cpu = |v: &[[f64; 3]], i: usize| {
        let mut c: Vec<f64> = v.iter().map(|r| r[i]).collect();
        c.sort_by(|a, b| a.total_cmp(b));
        c[c.len() / 2]
    };
    let cpu_json = |v: &[[f64; 3]]| {
        serde_json::json!({
            "source": median_cpu(v, 0),
            "target": median_cpu(v, 1),
            "process": median_cpu(v, 2),
        })
    };
    println!("\n## CPU seconds per pipeline (medians over the rounds)\n");
    println!("| phase | source cluster | target cluster | switchyard / pipe process | all |");
    println!("|---|---|---|---|---|");
    for (name, v) in [
        ("backfill: COPY pipe", &pipe_cpu3),
        ("backfill: native LR", &native_cpu3),
        ("backfill: switchyard", &sy_cpu3),
        ("backlog: native LR", &native_backlog_cpu3),
        ("backlog: switchyard", &sy_backlog_cpu3),
    ] {
        let (a, b, c) = (median_cpu(v, 0), median_cpu(v, 1), median_cpu(v, 2));
        println!("| {name} | {a:.2} | {b:.2} | {c:.2} | {:.2} |", a + b + c);
    }
    support::report::record(
        "move",
        serde_json::json!({
            "rows": rows,
            "synchronous_commit": support::bench_sync_commit(),
            "rounds": rounds,
            "chunk_rows": chunk_rows,
            "apply_lanes": lanes,
            "backfill_s": {
                "copy_pipe": median(&pipe_t),
                "native": median(&native_t),
                "switchyard": median(&sy_t),
            },
            "backfill_ratio_native_over_switchyard": median(&native_t) / median(&sy_t),
            "backfill_ratio_pipe_over_switchyard": median(&pipe_t) / median(&sy_t),
            "backlog_txns": txns,
            "backlog_changes": total_changes,
            "backlog_s": {
                "native": median(&native_backlog_t),
                "switchyard": median(&sy_backlog_t),
            },
            "backlog_ratio_native_over_switchyard": median(&native_backlog_t) / median(&sy_backlog_t),
            "switchyard_cpu_s": { "backfill": sy_cpu, "backlog": sy_backlog_cpu },
            "cpu_s_medians": {
                "backfill": {
                    "copy_pipe": cpu_json(&pipe_cpu3),
                    "native": cpu_json(&native_cpu3),
                    "switchyard": cpu_json(&sy_cpu3),
                },
                "backlog": {
                    "native": cpu_json(&native_backlog_cpu3),
                    "switchyard": cpu_json(&sy_backlog_cpu3),
                },
            },
        }),
    )?;
    let _ = dn
        .batch_execute("DROP SUBSCRIPTION native_sub")
        .await
        .context("cleanup");
    Ok(())
}
