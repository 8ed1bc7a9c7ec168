//! Telemetry: Prometheus metrics on `/metrics`, and `/healthz` and `/readyz`, on one port
//! (loopback by default).
//!
//! Invariants:
//! - Metric names are the constants below: prefix `switchyard_`, unit suffixes, `_total`
//!   only on counters. Labels are low-cardinality (target, state, result, class) except
//!   `tenant`, which `[metrics] tenant_label = false` turns off (per-tenant series are then
//!   not exported).
//! - Nothing secret is a label or a value: tenant ids, target names, states and error
//!   classes only.
//! - The HTTP endpoint never takes the daemon down: a port that cannot be bound, or a bad
//!   request, is logged and answered, nothing more.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of WAL the tenant's target trails the stream by.
pub const TENANT_LAG_BYTES: &str = "switchyard_tenant_lag_bytes";
/// Seconds since the oldest source commit the tenant's target does not hold yet.
pub const TENANT_LAG_SECONDS: &str = "switchyard_tenant_lag_seconds";
/// Rows copied so far by the tenant's backfill, and the rows it had when the copy began.
pub const TENANT_ROWS_COPIED: &str = "switchyard_tenant_copied_rows";
pub const TENANT_ROWS_TO_COPY: &str = "switchyard_tenant_source_rows";
/// 1 for the tenant's current move state (label `state`).
pub const TENANT_STATE: &str = "switchyard_tenant_state";
/// Source transactions committed on a target (label `target`).
pub const APPLIED_TRANSACTIONS: &str = "switchyard_apply_transactions_total";
/// Cutover and rollback attempts (label `result`).
pub const CUTOVER_ATTEMPTS: &str = "switchyard_cutover_attempts_total";
/// The tenant's write pause of each finished cutover.
pub const CUTOVER_PAUSE: &str = "switchyard_cutover_pause_seconds";
/// The position confirmed to the source, as a number, and the WAL the slot retains.
pub const SLOT_CONFIRMED_LSN: &str = "switchyard_slot_confirmed_lsn";
pub const SLOT_RETAINED_BYTES: &str = "switchyard_slot_retained_wal_bytes";
/// Pipeline step errors (label `class`: transient, tenant_fatal, fatal).
pub const PIPELINE_ERRORS: &str = "switchyard_pipeline_errors_total";
/// Reverse streams (after a cutover) that failed and were restarted.
pub const REVERSE_FAILURES: &str = "switchyard_reverse_failures_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static READY: AtomicBool = AtomicBool::new(false);

/// The process-wide recorder (installed once; `None` if another recorder was installed).
fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(CUTOVER_PAUSE.to_owned()),
                    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0],
                )
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// Installs the recorder (so metrics are kept from the start).
pub fn init() {
    if handle().is_some() {
        describe();
    }
}

/// HELP texts and units (promtool requires help text for every family).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        TENANT_LAG_BYTES,
        Unit::Bytes,
        "WAL bytes the tenant's target trails the stream by"
    );
    describe_gauge!(
        TENANT_LAG_SECONDS,
        Unit::Seconds,
        "Seconds since the oldest source commit the tenant's target does not hold yet"
    );
    describe_gauge!(
        TENANT_ROWS_COPIED,
        Unit::Count,
        "Rows copied so far by the tenant's backfill"
    );
    describe_gauge!(
        TENANT_ROWS_TO_COPY,
        Unit::Count,
        "Rows the tenant had at the source when its copy began"
    );
    describe_gauge!(
        TENANT_STATE,
        "1 for the tenant's current move state (label state)"
    );
    describe_counter!(
        APPLIED_TRANSACTIONS,
        Unit::Count,
        "Source transactions committed on a target"
    );
    describe_counter!(
        CUTOVER_ATTEMPTS,
        Unit::Count,
        "Cutover and rollback attempts by result"
    );
    describe_histogram!(
        CUTOVER_PAUSE,
        Unit::Seconds,
        "The tenant's write pause of each finished cutover"
    );
    describe_gauge!(
        SLOT_CONFIRMED_LSN,
        "The position confirmed to the source, as a number"
    );
    describe_gauge!(
        SLOT_RETAINED_BYTES,
        Unit::Bytes,
        "WAL the slot retains at the source"
    );
    describe_counter!(
        PIPELINE_ERRORS,
        Unit::Count,
        "Pipeline step errors by class (transient, tenant_fatal, fatal)"
    );
    describe_counter!(
        REVERSE_FAILURES,
        Unit::Count,
        "Reverse streams (old location kept current after a cutover) that failed and restarted"
    );
}

/// Whether the daemon is streaming (what `/readyz` says).
pub fn set_ready(ready: bool) {
    READY.store(ready, Ordering::Relaxed);
}

/// The Prometheus text of every metric.
pub fn render() -> String {
    match handle() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

/// The answer to one request line: status, content type, body.
pub fn respond(request_line: &str) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render()),
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" if READY.load(Ordering::Relaxed) => ("200 OK", "text/plain", "ready\n".into()),
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            "not streaming yet\n".into(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

async fn serve_one(mut socket: tokio::net::TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return;
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or("");
    let (status, content_type, body) = respond(line);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(body.as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until the task is dropped.
pub async fn serve(listen: String) {
    init();
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%listen, error = %e, "metrics endpoint not started");
            return;
        }
    };
    tracing::info!(%listen, "metrics on /metrics, health on /healthz and /readyz");
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                tokio::spawn(serve_one(socket));
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answer_with_the_right_status() {
        init();
        set_ready(false);
        assert_eq!(respond("GET /healthz HTTP/1.1").0, "200 OK");
        assert_eq!(respond("GET /readyz HTTP/1.1").0, "503 Service Unavailable");
        set_ready(true);
        assert_eq!(respond("GET /readyz HTTP/1.1").0, "200 OK");
        assert_eq!(respond("GET /nope HTTP/1.1").0, "404 Not Found");
        assert_eq!(
            respond("POST /metrics HTTP/1.1").0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("").0, "405 Method Not Allowed");
        metrics::gauge!(TENANT_LAG_BYTES, "tenant" => "t1").set(42.0);
        let (status, _, body) = respond("GET /metrics?x=1 HTTP/1.1");
        assert_eq!(status, "200 OK");
        assert!(
            body.contains("switchyard_tenant_lag_bytes{tenant=\"t1\"} 42"),
            "{body}"
        );
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for name in [
            TENANT_LAG_BYTES,
            TENANT_LAG_SECONDS,
            TENANT_ROWS_COPIED,
            TENANT_ROWS_TO_COPY,
            TENANT_STATE,
            APPLIED_TRANSACTIONS,
            CUTOVER_ATTEMPTS,
            CUTOVER_PAUSE,
            SLOT_CONFIRMED_LSN,
            SLOT_RETAINED_BYTES,
            PIPELINE_ERRORS,
            REVERSE_FAILURES,
        ] {
            assert!(name.starts_with("switchyard_"), "{name}");
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
            // `_total` is for counters, and counters end with it.
            let counter = [
                APPLIED_TRANSACTIONS,
                CUTOVER_ATTEMPTS,
                PIPELINE_ERRORS,
                REVERSE_FAILURES,
            ]
            .contains(&name);
            assert_eq!(name.ends_with("_total"), counter, "{name}");
        }
    }
}
