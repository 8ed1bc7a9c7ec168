//! Benchmark results as JSON lines, for `scripts/bench-report` to assemble: each bench run
//! appends one object `{"bench": name, ...figures}` to the file named by
//! `SWITCHYARD_BENCH_JSON`, when it is set. Figures are the same the bench prints.

#![allow(dead_code)]

use std::io::Write;

use anyhow::{Context, Result};

/// A bench setting from the environment, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Subscribes `client`'s database to `publication` on the cluster at 127.0.0.1:`source_port`
/// (as `native_sub`) and waits for the initial sync of every table.
pub async fn native_subscription(
    client: &tokio_postgres::Client,
    source_port: u16,
    publication: &str,
) -> Result<()> {
    client
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION native_sub CONNECTION 'host=127.0.0.1 port={source_port} user=postgres dbname=postgres' PUBLICATION {publication}"
        ))
        .await?;
    super::wait_for(
        "native initial sync",
        std::time::Duration::from_secs(3600),
        || async {
            let pending: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
                    &[],
                )
                .await?
                .get(0);
            Ok((pending == 0).then_some(()))
        },
    )
    .await
}

/// Appends `figures` (an object) under `bench` when `SWITCHYARD_BENCH_JSON` is set.
pub fn record(bench: &str, figures: serde_json::Value) -> Result<()> {
    let Ok(path) = std::env::var("SWITCHYARD_BENCH_JSON") else {
        return Ok(());
    };
    let mut object = serde_json::Map::new();
    object.insert("bench".into(), bench.into());
    if let serde_json::Value::Object(f) = figures {
        object.extend(f);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {path}"))?;
    writeln!(file, "{}", serde_json::Value::Object(object))
        .with_context(|| format!("writing {path}"))?;
    Ok(())
}

/// The `p` quantile (0.0..=1.0) of `v`, by the nearest rank; NaN for an empty slice.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// `{"p50", "p99", "max", "n"}` of `v` (milliseconds, or whatever unit `v` is in).
pub fn summary(v: &mut [f64]) -> serde_json::Value {
    let max = v.iter().copied().fold(f64::NAN, f64::max);
    serde_json::json!({
        "p50": percentile(v, 0.5),
        "p99": percentile(v, 0.99),
        "max": max,
        "n": v.len(),
    })
}

/// Where a bench's daemon writes its log: `name` in `SWITCHYARD_BENCH_LOG_DIR` if set (kept
/// after the run, for a look at what the daemon did), else in the bench's temporary `dir`.
pub fn daemon_log(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    match std::env::var_os("SWITCHYARD_BENCH_LOG_DIR") {
        Some(d) => {
            let d = std::path::PathBuf::from(d);
            let _ = std::fs::create_dir_all(&d);
            d.join(name)
        }
        None => dir.join(name),
    }
}
