//! `switchyard status`: every move as the registry records it, with progress, rate, lag,
//! ETA and the last error, for people (a table, bars on a terminal) and for tools (JSON).
//!
//! Invariants:
//! - Read-only: status never changes the registry.
//! - Rendering is pure (a function of the rows and, for rates, the previous sample), so it is
//!   tested without a database; figures the registry cannot give (a rate before a second
//!   sample, an ETA without a rate) are absent, never invented.

use std::collections::HashMap;
use std::fmt::Write as _;

use tokio_postgres::Client;

use super::{MoveState, Registry, RegistryError};
use crate::cluster::ClusterError;

/// One move's status.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MoveStatus {
    pub id: i64,
    pub tenant: String,
    pub target: String,
    pub target_schema: String,
    pub state: String,
    pub rows_copied: i64,
    pub rows_total: Option<i64>,
    /// Rows copied per second since the previous sample (watch mode) or, for a first
    /// sample, on average since the move was requested while it is copying.
    pub rows_per_second: Option<f64>,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    /// Seconds until the copy is done at the current rate.
    pub eta_seconds: Option<f64>,
    pub cutover_attempts: i32,
    pub pause_ms: Option<f64>,
    pub last_error: Option<String>,
    /// Seconds since the move was requested.
    pub age_seconds: f64,
}

impl Registry {
    /// Every move, newest first, as `status` shows it (without rates).
    pub async fn status(&self, client: &Client) -> Result<Vec<MoveStatus>, RegistryError> {
        let rows = client
            .query(
                &format!(
                    "SELECT id, tenant, target, target_schema, state, rows_copied, rows_total, \
                            lag_bytes, lag_seconds, cutover_attempts, pause_ms, last_error, \
                            extract(epoch FROM now() - requested_at)::float8 \
                       FROM {} ORDER BY id DESC",
                    self.table("moves")
                ),
                &[],
            )
            .await
            .map_err(ClusterError::sql("reading the moves"))?;
        Ok(rows
            .iter()
            .map(|r| MoveStatus {
                id: r.get(0),
                tenant: r.get(1),
                target: r.get(2),
                target_schema: r.get(3),
                state: r.get(4),
                rows_copied: r.get(5),
                rows_total: r.get(6),
                rows_per_second: None,
                lag_bytes: r.get(7),
                lag_seconds: r.get(8),
                eta_seconds: None,
                cutover_attempts: r.get(9),
                pause_ms: r.get(10),
                last_error: r.get(11),
                age_seconds: r.get(12),
            })
            .collect())
    }
}

/// Successive status samples, each with rates against the one before (watch modes).
#[derive(Debug, Default)]
pub struct Watch {
    previous: Option<(Vec<MoveStatus>, std::time::Instant)>,
}

impl Watch {
    /// Reads every move and fills in rates and ETAs; remembers the sample for the next.
    pub async fn sample(
        &mut self,
        registry: &Registry,
        client: &Client,
    ) -> Result<&[MoveStatus], RegistryError> {
        let rows = registry.status(client).await?;
        let rows = with_rates(
            rows,
            self.previous
                .as_ref()
                .map(|(p, at)| (p.as_slice(), at.elapsed().as_secs_f64())),
        );
        let (rows, _) = self.previous.insert((rows, std::time::Instant::now()));
        Ok(rows)
    }

    /// Whether a sample was taken before.
    pub fn has_sample(&self) -> bool {
        self.previous.is_some()
    }
}

/// Fills in rates and ETAs: from the previous sample (`previous`, `elapsed` seconds ago)
/// when there is one, else the average since the request for moves still copying.
pub fn with_rates(
    mut moves: Vec<MoveStatus>,
    previous: Option<(&[MoveStatus], f64)>,
) -> Vec<MoveStatus> {
    let before: HashMap<i64, i64> = previous
        .map(|(p, _)| p.iter().map(|m| (m.id, m.rows_copied)).collect())
        .unwrap_or_default();
    for m in &mut moves {
        let copying = m.state == MoveState::Copying.as_str();
        m.rows_per_second = match (previous, before.get(&m.id)) {
            (Some((_, elapsed)), Some(was)) if elapsed > 0.0 => {
                Some(((m.rows_copied - was).max(0) as f64) / elapsed)
            }
            _ if copying && m.age_seconds > 0.0 => Some(m.rows_copied as f64 / m.age_seconds),
            _ => None,
        };
        m.eta_seconds = match (copying, m.rows_total, m.rows_per_second) {
            (true, Some(total), Some(rate)) if rate > 0.0 => {
                Some(((total - m.rows_copied).max(0) as f64) / rate)
            }
            _ => None,
        };
    }
    moves
}

fn bytes(b: i64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / 1024.0 / 1024.0 / 1024.0)
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn bar(done: i64, total: i64, width: usize) -> String {
    let frac = if total > 0 {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let full = (frac * width as f64).round() as usize;
    format!("[{}{}]", "#".repeat(full), ".".repeat(width - full))
}

/// The table people read; `bars` draws progress bars (only on a terminal).
pub fn render(moves: &[MoveStatus], bars: bool) -> String {
    let mut out = String::new();
    if moves.is_empty() {
        out.push_str("no moves (request one with `switchyard move TENANT --to TARGET`)\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:>4}  {:<16} {:<24} {:<12} {:>22}  {:>10}  {:>10}  {:>8}  {:>7}",
        "id", "tenant", "target.schema", "state", "rows", "rows/s", "lag", "lag s", "eta"
    );
    for m in moves {
        let rows = match m.rows_total {
            Some(t) => format!("{}/{}", m.rows_copied, t),
            None => m.rows_copied.to_string(),
        };
        let _ = writeln!(
            out,
            "{:>4}  {:<16} {:<24} {:<12} {:>22}  {:>10}  {:>10}  {:>8}  {:>7}",
            m.id,
            m.tenant,
            format!("{}.{}", m.target, m.target_schema),
            m.state,
            rows,
            m.rows_per_second
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
            m.lag_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            m.lag_seconds
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "-".into()),
            m.eta_seconds.map(duration).unwrap_or_else(|| "-".into()),
        );
        if bars && m.state == MoveState::Copying.as_str() {
            if let Some(total) = m.rows_total {
                let _ = writeln!(out, "      {}", bar(m.rows_copied, total, 40));
            }
        }
        if let Some(p) = m.pause_ms {
            let _ = writeln!(
                out,
                "      cut over: write pause {p:.1} ms ({} attempts)",
                m.cutover_attempts
            );
        }
        if let Some(e) = &m.last_error {
            let _ = writeln!(out, "      last error: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(id: i64, state: &str, copied: i64, total: Option<i64>, age: f64) -> MoveStatus {
        MoveStatus {
            id,
            tenant: format!("t{id}"),
            target: "shard2".into(),
            target_schema: "s".into(),
            state: state.into(),
            rows_copied: copied,
            rows_total: total,
            rows_per_second: None,
            lag_bytes: Some(3 << 20),
            lag_seconds: Some(0.25),
            eta_seconds: None,
            cutover_attempts: 0,
            pause_ms: None,
            last_error: None,
            age_seconds: age,
        }
    }

    #[test]
    fn rates_come_from_samples_or_the_average_while_copying() {
        let first = with_rates(
            vec![
                mv(1, "copying", 500, Some(1500), 10.0),
                mv(2, "streaming", 900, Some(900), 10.0),
            ],
            None,
        );
        assert_eq!(first[0].rows_per_second, Some(50.0));
        assert_eq!(first[0].eta_seconds, Some(20.0));
        assert_eq!(
            first[1].rows_per_second, None,
            "no invented rate when in sync"
        );
        assert_eq!(first[1].eta_seconds, None);
        let later = with_rates(
            vec![mv(1, "copying", 900, Some(1500), 12.0)],
            Some((&first, 2.0)),
        );
        assert_eq!(later[0].rows_per_second, Some(200.0));
        assert_eq!(later[0].eta_seconds, Some(3.0));
        let stalled = with_rates(
            vec![mv(1, "copying", 900, Some(1500), 14.0)],
            Some((&later, 2.0)),
        );
        assert_eq!(stalled[0].rows_per_second, Some(0.0));
        assert_eq!(stalled[0].eta_seconds, None, "no ETA without progress");
    }

    #[test]
    fn the_table_shows_progress_lag_pause_and_errors() {
        let mut m = with_rates(vec![mv(7, "copying", 250, Some(1000), 5.0)], None);
        m.push(MoveStatus {
            pause_ms: Some(3.4),
            cutover_attempts: 2,
            last_error: Some("cutover attempt 1 aborted at fence".into()),
            ..mv(8, "cut_over", 10, Some(10), 60.0)
        });
        let text = render(&m, true);
        assert!(text.contains("250/1000"), "{text}");
        assert!(text.contains("3.0 MiB"), "{text}");
        assert!(
            text.contains("[##########..............................]"),
            "{text}"
        );
        assert!(text.contains("write pause 3.4 ms (2 attempts)"), "{text}");
        assert!(text.contains("last error: cutover attempt 1 aborted at fence"));
        assert!(!render(&m, false).contains("[#"), "bars only when asked");
        assert!(render(&[], false).contains("no moves"));
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(duration(75.0), "1m15s");
    }
}
