//! `switchyard demo --short` end to end, as a user runs it: the real binary starts its two
//! clusters, moves two tenants under a live workload, cuts them over, verifies, prints a
//! summary and removes everything.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn demo_dir(first_line: &str) -> Option<std::path::PathBuf> {
    let start = first_line.find(" under ")? + " under ".len();
    let rest = &first_line[start..];
    let end = rest.find(" (server binaries")?;
    Some(rest[..end].into())
}

/// Waits for `child` to exit; kills it and fails after `limit`.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the demo did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_short_demo_moves_two_tenants_cuts_over_and_cleans_up() -> Result<()> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--short"])
        .env_remove("SWITCHYARD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting switchyard demo")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let status = wait_exit(&mut child, Duration::from_secs(300))?;
    let lines = reader.join().map_err(|_| anyhow::anyhow!("reader"))?;
    let mut err = String::new();
    stderr.read_to_string(&mut err)?;
    let out = lines.join("\n");
    assert!(status.success(), "demo failed ({status}):\n{out}\n{err}");

    // Seeded, moved both ways, cut over with a measured pause, verified, re-routed.
    assert!(out.contains("seeded 12 tenants of uneven size"), "{out}");
    for needle in [
        "tenant 1 in sync at shard2.tenant_1",
        "tenant 2 in sync at local.tenant_2",
        "now routed to shard2.tenant_1",
        "now routed to local.tenant_2",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let summary = out
        .split("\nsummary")
        .nth(1)
        .with_context(|| format!("no summary in:\n{out}"))?;
    assert_eq!(
        summary.matches("state cut_over").count(),
        2,
        "both moves cut over:\n{summary}"
    );
    assert_eq!(
        summary.matches("write pause at cutover ").count(),
        2,
        "{summary}"
    );
    assert!(
        !summary.contains("write pause at cutover -"),
        "every cutover measured its pause:\n{summary}"
    );
    let committed: u64 = summary
        .split("workload: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no workload line in:\n{summary}"))?;
    assert!(committed > 0, "the workload wrote nothing:\n{summary}");
    assert!(out.contains("demo clusters stopped and removed"), "{out}");

    // Nothing is left behind.
    let dir = demo_dir(&lines[0]).with_context(|| format!("no directory in {:?}", lines[0]))?;
    assert!(!dir.exists(), "{} is still there", dir.display());
    Ok(())
}

#[test]
fn ctrl_c_mid_demo_stops_everything_and_removes_the_clusters() -> Result<()> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--short"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting switchyard demo")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(60))?;
    let dir = demo_dir(&first).with_context(|| format!("no directory in {first:?}"))?;
    // Interrupt once the daemon and the workload run (mid-move or just after).
    loop {
        let line = rx.recv_timeout(Duration::from_secs(120))?;
        if line.starts_with("workload:") {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let status = wait_exit(&mut child, Duration::from_secs(60))?;
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("demo clusters stopped and removed")),
        "{rest:?}"
    );
    assert!(!dir.exists(), "{} is still there", dir.display());
    // No server of the demo survives it.
    let ps = Command::new("ps").args(["-eo", "args"]).output()?;
    let servers = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .count();
    assert_eq!(servers, 0, "processes still use {}", dir.display());
    Ok(())
}
