//! Infrastructure faults under a live move: the target cluster crashes (kill -9) mid-backfill
//! and restarts, restarts again mid-stream, and the source restarts mid-stream. The move
//! completes with exactly the tenant's rows, and nothing fails.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use support::mover::{
    assert_parity, load_config, prepare_target, registry_ready, request, shared_schema, state_of,
    wait_drained, wait_state, write_config, InProcess, Writer,
};
use support::PgCluster;
use switchyard::registry::Registry;

const SYNC: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crash_and_restarts_and_a_source_restart_lose_nothing() -> Result<()> {
    let mut src = PgCluster::start()?;
    let mut dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 4000))?;
    prepare_target(&src)?;
    prepare_target(&dst)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        Some(&dst),
        "[move]\nchunk_rows = 100\nbackfill_workers = 1\n",
    )?;
    let s = src.client().await?;
    let daemon = InProcess::start(load_config(&path)?, true);
    registry_ready(&s).await?;
    let registry = Registry::new("switchyard")?;
    let writer = Writer::start(src.client().await?, vec![1, 2], Duration::from_millis(3));
    let one = request(&s, &registry, "1", "shard2", "t1").await?;
    let two = request(&s, &registry, "2", "local", "t2").await?;

    // Mid-backfill: the target dies without a shutdown, comes back after a while.
    let deadline = Instant::now() + SYNC;
    loop {
        let (state, error, copied) = state_of(&s, one).await?;
        anyhow::ensure!(state != "failed", "move failed: {error:?}");
        if copied >= 1500 {
            anyhow::ensure!(state == "copying", "the backfill ended before the crash");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no backfill progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dst.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.check_alive()?;
    dst.restart()?;
    wait_state(&s, one, "streaming", SYNC).await?;
    wait_state(&s, two, "streaming", SYNC).await?;

    // Mid-stream: a clean target restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    dst.restart()?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Mid-stream: the source restarts (walsender, registry and reader connections drop).
    // The writer's connection drops with it; a new writer takes over.
    let before = writer.stop().await?;
    drop(s);
    src.restart()?;
    let s = src.client().await?;
    let writer = Writer::resume(
        src.client().await?,
        vec![1, 2],
        Duration::from_millis(3),
        before,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = writer.stop().await?;
    if daemon.check_alive().is_err() {
        return daemon
            .stop()
            .await
            .context("the daemon stopped after the source restart");
    }
    wait_drained(&s, SYNC).await.context("after the faults")?;
    daemon.check_alive()?;
    for id in [one, two] {
        let (state, error, _) = state_of(&s, id).await?;
        assert_eq!(state, "streaming", "move {id}: {error:?}");
    }
    daemon.stop().await?;
    let d = dst.client().await?;
    assert_parity(&s, &d, 1, "t1").await?;
    assert_parity(&s, &s, 2, "t2").await?;
    assert!(
        before > 50 && after > before + 20,
        "writer rounds {before} / {after}"
    );
    Ok(())
}
