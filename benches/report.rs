//! Assembles the benchmark report from the JSON lines the other benches append to
//! `SWITCHYARD_BENCH_JSON` (see `scripts/bench-report`, the one command that runs them all):
//! writes `bench-report.md` and `bench-report.json` into the directory given, with the date,
//! the machine and the commit. Ratios come first; absolute times only say what was measured.
//!
//! `cargo bench --bench report -- FILE.jsonl DIR`. Without arguments (as under
//! `cargo test --all-targets`) it renders a built-in sample into a temporary directory and
//! checks the result, so the renderer cannot rot unnoticed.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64().unwrap_or(f64::NAN)
}

fn command(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gb = meminfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(f64::NAN);
    let pg = std::env::var("SWITCHYARD_PG_BINDIR")
        .map(|d| format!("{d}/postgres"))
        .unwrap_or_else(|_| "postgres".into());
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gb": (mem_gb * 10.0).round() / 10.0,
        "postgres": command(&pg, &["--version"]),
        "kernel": command("uname", &["-r"]),
        "rustc": command("rustc", &["--version"]),
        "commit": command("git", &["rev-parse", "--short", "HEAD"]),
        "date": command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    })
}

/// The load a lag or cutover run was measured under: the offered rate (0: the host's full
/// rate), the clusters' `synchronous_commit`, and the workload or rollback setting where
/// they are not the default.
fn load(r: &Value) -> String {
    let rate = match r["offered_tps"].as_u64() {
        Some(0) | None => "the host's full rate".to_string(),
        Some(t) => format!("{t} tps offered"),
    };
    let sync = r["synchronous_commit"].as_str().unwrap_or("on");
    let mut label = format!("{rate}, synchronous_commit = {sync}");
    // Each bench's own schema is its default workload: only another one is named.
    if let Some(w) = r["workload"]
        .as_str()
        .filter(|w| !matches!(*w, "accounts" | "orders"))
    {
        label.push_str(&format!(", {w} workload"));
    }
    if r["rollback"].as_bool() == Some(false) {
        label.push_str(", rollback = false");
    }
    label
}

fn render(results: &[Value], machine: &Value) -> Result<String> {
    let mut md = String::new();
    let by = |name: &str| results.iter().rev().find(|r| r["bench"] == name);
    // The lag and cutover benches run at several loads and commit settings: each run is
    // shown, named by both.
    let every = |name: &str| {
        results
            .iter()
            .filter(|r| r["bench"] == name)
            .collect::<Vec<_>>()
    };
    writeln!(md, "# Benchmark report\n")?;
    writeln!(
        md,
        "Written by `scripts/bench-report` on {} at commit {}: {} ({} cores, {} GB), {}, \
         Linux {}, {}. Every pipeline ran on this machine in the same run against the same \
         throwaway clusters; ratios are what carries over to other machines.\n",
        machine["date"].as_str().unwrap_or("?"),
        machine["commit"].as_str().unwrap_or("?"),
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["memory_gb"],
        machine["postgres"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["rustc"].as_str().unwrap_or("?"),
    )?;
    writeln!(md, "## Summary\n")?;
    writeln!(md, "| measure | result |")?;
    writeln!(md, "|---|---|")?;
    if let Some(m) = by("move") {
        writeln!(
            md,
            "| backfill of a {}-row tenant, native LR sync time / switchyard time | **{:.2}×** (COPY pipe / switchyard: {:.2}×) |",
            m["rows"],
            f(m, &["backfill_ratio_native_over_switchyard"]),
            f(m, &["backfill_ratio_pipe_over_switchyard"]),
        )?;
        writeln!(
            md,
            "| backlog apply of {} transactions, native LR time / switchyard time | **{:.2}×** |",
            m["backlog_txns"],
            f(m, &["backlog_ratio_native_over_switchyard"]),
        )?;
    }
    for l in every("lag") {
        writeln!(
            md,
            "| tenant lag under pgbench at {}, p50 / p99: switchyard vs native LR | {:.1} / {:.1} ms vs {:.1} / {:.1} ms |",
            load(l),
            f(l, &["switchyard", "lag_ms", "p50"]),
            f(l, &["switchyard", "lag_ms", "p99"]),
            f(l, &["native", "lag_ms", "p50"]),
            f(l, &["native", "lag_ms", "p99"]),
        )?;
    }
    for c in every("cutover") {
        writeln!(
            md,
            "| cutover write pause of the tenant at {}, p50 / p99 (budget {} ms, {} cutovers) | {:.1} / {:.1} ms |",
            load(c),
            c["budget_ms"],
            c["cutovers"],
            f(c, &["pause_ms", "p50"]),
            f(c, &["pause_ms", "p99"]),
        )?;
        writeln!(
            md,
            "| other tenants' writes during a fenced window vs outside, p50 / p99 | {:.1} / {:.1} ms vs {:.1} / {:.1} ms |",
            f(c, &["others_in_window_ms", "p50"]),
            f(c, &["others_in_window_ms", "p99"]),
            f(c, &["others_outside_ms", "p50"]),
            f(c, &["others_outside_ms", "p99"]),
        )?;
    }
    if let Some(m) = by("memory") {
        writeln!(
            md,
            "| daemon peak RSS during one {} MB source transaction: moving tenant / other tenant / idle | {:.0} / {:.0} / {:.0} MB |",
            m["txn_mb"],
            f(m, &["moving", "peak_rss_mb"]),
            f(m, &["bystander", "peak_rss_mb"]),
            f(m, &["idle_peak_rss_mb"]),
        )?;
    }
    if let Some(m) = by("move") {
        writeln!(
            md,
            "\n## Backfill and backlog (`cargo bench --bench move`)\n"
        )?;
        writeln!(md, "| pipeline | backfill median s | backlog median s |")?;
        writeln!(md, "|---|---|---|")?;
        writeln!(
            md,
            "| COPY pipe | {:.2} | |",
            f(m, &["backfill_s", "copy_pipe"])
        )?;
        writeln!(
            md,
            "| native LR | {:.2} | {:.2} |",
            f(m, &["backfill_s", "native"]),
            f(m, &["backlog_s", "native"])
        )?;
        writeln!(
            md,
            "| switchyard | {:.2} | {:.2} |",
            f(m, &["backfill_s", "switchyard"]),
            f(m, &["backlog_s", "switchyard"])
        )?;
        writeln!(
            md,
            "\n{} rounds, medians; {} row changes per backlog; chunk_rows {}, apply_lanes {}.",
            m["rounds"], m["backlog_changes"], m["chunk_rows"], m["apply_lanes"]
        )?;
        if m["cpu_s_medians"].is_object() {
            writeln!(
                md,
                "\nCPU seconds each pipeline spent (medians over the rounds; every process of each \
                 cluster, and the bench process, which runs the COPY pipe and the daemon). On \
                 one 2-core machine the wall-clock ratios above are bounded by the cores all \
                 of them share.\n"
            )?;
            writeln!(
                md,
                "| phase | source cluster | target cluster | switchyard / pipe process | all |"
            )?;
            writeln!(md, "|---|---|---|---|---|")?;
            for (name, path) in [
                ("backfill: COPY pipe", ["backfill", "copy_pipe"]),
                ("backfill: native LR", ["backfill", "native"]),
                ("backfill: switchyard", ["backfill", "switchyard"]),
                ("backlog: native LR", ["backlog", "native"]),
                ("backlog: switchyard", ["backlog", "switchyard"]),
            ] {
                let c = &m["cpu_s_medians"][path[0]][path[1]];
                let (a, b, p) = (f(c, &["source"]), f(c, &["target"]), f(c, &["process"]));
                writeln!(
                    md,
                    "| {name} | {a:.2} | {b:.2} | {p:.2} | {:.2} |",
                    a + b + p
                )?;
            }
        }
    }
    for l in every("lag") {
        writeln!(
            md,
            "\n## Lag under load at {} (`cargo bench --bench lag`)\n",
            load(l)
        )?;
        writeln!(
            md,
            "| pipeline | reached tps | p50 ms | p99 ms | max ms | beats |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        for (name, key) in [("native LR", "native"), ("switchyard", "switchyard")] {
            writeln!(
                md,
                "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
                f(l, &[key, "tps"]),
                f(l, &[key, "lag_ms", "p50"]),
                f(l, &[key, "lag_ms", "p99"]),
                f(l, &[key, "lag_ms", "max"]),
                l[key]["lag_ms"]["n"]
            )?;
        }
        writeln!(
            md,
            "\n{} clients, {} tenants, {} s per pipeline; lag = heartbeat commit at the source → value visible at the target.",
            l["clients"], l["tenants"], l["secs"]
        )?;
    }
    for c in every("cutover") {
        writeln!(
            md,
            "\n## Cutover pauses at {} (`cargo bench --bench cutover`)\n",
            load(c)
        )?;
        writeln!(md, "| measure | p50 ms | p99 ms | max ms | n |")?;
        writeln!(md, "|---|---|---|---|---|")?;
        for (name, key) in [
            ("tenant write pause (lock request → commit)", "pause_ms"),
            (
                "moving tenant's slowest write (client)",
                "moving_tenant_slowest_write_ms",
            ),
            (
                "other tenants, writes overlapping a fenced window",
                "others_in_window_ms",
            ),
            (
                "other tenants, writes outside the windows",
                "others_outside_ms",
            ),
            (
                "each cutover, request to cut_over (verification and aborts included)",
                "request_to_cut_over_ms",
            ),
            ("all writes before fence triggers", "before_triggers_ms"),
            ("all writes with fence triggers", "after_triggers_ms"),
        ] {
            // Records of builds before a measure existed lack it.
            if c[key].is_null() {
                continue;
            }
            writeln!(
                md,
                "| {name} | {:.1} | {:.1} | {:.1} | {} |",
                f(c, &[key, "p50"]),
                f(c, &[key, "p99"]),
                f(c, &[key, "max"]),
                c[key]["n"]
            )?;
        }
        writeln!(
            md,
            "\n{} attempts for {} cutovers (aborted by step: {}); {} tps offered over {} clients.",
            c["attempts"], c["cutovers"], c["aborted"], c["offered_tps"], c["clients"]
        )?;
        if c["tps_before"].is_number() {
            writeln!(
                md,
                "Throughput before {:.0} tps, during the moves and cutovers {:.0} tps, after {:.0} tps ({}).",
                f(c, &["tps_before"]),
                f(c, &["tps_during"]),
                f(c, &["tps_after"]),
                match c["rollback"].as_bool() {
                    Some(false) => "rollback = false",
                    _ => "rollback on: cut-over tenants' writes also go back to the old table",
                }
            )?;
        }
    }
    if let Some(m) = by("memory") {
        writeln!(md, "\n## Memory (`cargo bench --bench memory`)\n")?;
        writeln!(md, "| case | peak RSS MB | txn → confirmed s |")?;
        writeln!(md, "|---|---|---|")?;
        writeln!(
            md,
            "| idle, one tenant in sync | {:.0} | |",
            f(m, &["idle_peak_rss_mb"])
        )?;
        writeln!(
            md,
            "| {} MB transaction of a tenant not moving | {:.0} | {:.1} |",
            m["txn_mb"],
            f(m, &["bystander", "peak_rss_mb"]),
            f(m, &["bystander", "seconds"])
        )?;
        writeln!(
            md,
            "| {} MB transaction of the moving tenant | {:.0} | {:.1} |",
            m["txn_mb"],
            f(m, &["moving", "peak_rss_mb"]),
            f(m, &["moving", "seconds"])
        )?;
    }
    Ok(md)
}

fn write(results: &[Value], dir: &Path) -> Result<()> {
    let machine = machine();
    let md = render(results, &machine)?;
    std::fs::write(dir.join("bench-report.md"), md)?;
    let json = serde_json::json!({ "machine": machine, "results": results });
    std::fs::write(
        dir.join("bench-report.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if let [jsonl, dir] = args.as_slice() {
        let text = std::fs::read_to_string(jsonl).with_context(|| format!("reading {jsonl}"))?;
        let results = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<Value>, _>>()
            .with_context(|| format!("parsing {jsonl}"))?;
        anyhow::ensure!(!results.is_empty(), "{jsonl} holds no results");
        write(&results, Path::new(dir))?;
        println!("wrote {dir}/bench-report.md and {dir}/bench-report.json");
        return Ok(());
    }
    // The smoke check: a sample of each bench's record renders into every section.
    let sample: Vec<Value> = vec![
        serde_json::json!({"bench": "move", "rows": 1000, "rounds": 1, "chunk_rows": 100, "apply_lanes": 4,
            "backfill_s": {"copy_pipe": 1.0, "native": 2.0, "switchyard": 1.5},
            "backfill_ratio_native_over_switchyard": 1.33, "backfill_ratio_pipe_over_switchyard": 0.67,
            "backlog_txns": 10, "backlog_changes": 30, "backlog_s": {"native": 3.0, "switchyard": 2.0},
            "backlog_ratio_native_over_switchyard": 1.5,
            "cpu_s_medians": {
                "backfill": {
                    "copy_pipe": {"source": 0.1, "target": 0.2, "process": 0.3},
                    "native": {"source": 0.1, "target": 0.2, "process": 0.0},
                    "switchyard": {"source": 0.2, "target": 0.2, "process": 0.25}},
                "backlog": {
                    "native": {"source": 0.1, "target": 0.9, "process": 0.0},
                    "switchyard": {"source": 0.125, "target": 0.5, "process": 0.25}}}}),
        serde_json::json!({"bench": "lag", "offered_tps": 50, "clients": 2, "secs": 1, "tenants": 50,
            "native": {"tps": 50.0, "lag_ms": {"p50": 3.0, "p99": 9.0, "max": 10.0, "n": 40}},
            "switchyard": {"tps": 50.0, "lag_ms": {"p50": 4.0, "p99": 12.0, "max": 15.0, "n": 40}}}),
        serde_json::json!({"bench": "lag", "offered_tps": 0, "synchronous_commit": "off",
            "clients": 2, "secs": 1, "tenants": 50,
            "native": {"tps": 900.0, "lag_ms": {"p50": 3.0, "p99": 9.0, "max": 10.0, "n": 40}},
            "switchyard": {"tps": 800.0, "lag_ms": {"p50": 5.0, "p99": 77.0, "max": 90.0, "n": 40}}}),
        serde_json::json!({"bench": "cutover", "cutovers": 2, "offered_tps": 100, "clients": 2, "budget_ms": 100,
            "attempts": 2, "aborted": [], "pause_ms": {"p50": 10.0, "p99": 20.0, "max": 20.0, "n": 2},
            "moving_tenant_slowest_write_ms": {"p50": 30.0, "p99": 40.0, "max": 40.0, "n": 2},
            "others_in_window_ms": {"p50": 1.0, "p99": 2.0, "max": 2.0, "n": 5},
            "others_outside_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0, "n": 50},
            "request_to_cut_over_ms": {"p50": 8500.0, "p99": 10400.0, "max": 10400.0, "n": 2},
            "before_triggers_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0, "n": 50},
            "after_triggers_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0, "n": 50}}),
        serde_json::json!({"bench": "memory", "txn_mb": 8, "idle_peak_rss_mb": 40.0,
            "bystander": {"peak_rss_mb": 50.0, "seconds": 2.0},
            "moving": {"peak_rss_mb": 60.0, "base_rss_mb": 40.0, "seconds": 3.0}}),
    ];
    let dir = tempfile::tempdir()?;
    write(&sample, dir.path())?;
    let md = std::fs::read_to_string(dir.path().join("bench-report.md"))?;
    for needle in [
        "**1.33×**",
        "**1.50×**",
        "at 50 tps offered, synchronous_commit = on, p50 / p99: switchyard vs native LR | 4.0 / 12.0 ms vs 3.0 / 9.0 ms",
        "at the host's full rate, synchronous_commit = off, p50 / p99: switchyard vs native LR | 5.0 / 77.0 ms",
        "## Lag under load at the host's full rate, synchronous_commit = off",
        "10.0 / 20.0 ms",
        "| each cutover, request to cut_over (verification and aborts included) | 8500.0 | 10400.0 | 10400.0 | 2 |",
        "60 / 50 / 40 MB",
        "| backlog: switchyard | 0.12 | 0.50 | 0.25 | 0.88 |",
        "## Memory",
    ] {
        anyhow::ensure!(md.contains(needle), "the report lacks {needle:?}:\n{md}");
    }
    let json: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("bench-report.json"),
    )?)?;
    anyhow::ensure!(json["results"].as_array().map(Vec::len) == Some(5));
    println!("report renderer: sample ok");
    Ok(())
}
