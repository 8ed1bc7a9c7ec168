//! Infrastructure faults under a live move, each with a writer running throughout:
//! - the target cluster crashes (kill -9) mid-backfill and restarts, restarts again
//!   mid-stream, and the source restarts mid-stream;
//! - the network (a TCP proxy on loopback in front of each cluster) delays every packet,
//!   resets every connection mid-backfill, black-holes both links for longer than the
//!   stream's silence limit and the source's wal_sender_timeout, and the walsender and the
//!   target's sessions are terminated by an administrator;
//! - the target runs out of disk mid-backfill (a tablespace on a small tmpfs), and loses
//!   the daemon's privileges mid-stream;
//! - a source transaction is bigger than the daemon may hold for a tenant.
//!
//! Each time the move completes with exactly the tenant's rows, or (permissions) that tenant
//! fails with the server's reason and completes once resumed; its neighbour never stops.

use crate::support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use support::mover::{
    assert_parity, load_config, prepare_target, registry_ready, request, shared_schema, state_of,
    wait_drained, wait_state, write_config, InProcess, Writer,
};
use support::proxy::Proxy;
use support::{wait_for, ClusterOptions, PgCluster};
use switchyard::registry::Registry;

const SYNC: Duration = Duration::from_secs(180);

/// Two tenants of the shared schema (`rows` orders each) on `src`; both clusters are
/// prepared as targets.
fn two_tenants(src: &PgCluster, dst: &PgCluster, rows: i32) -> Result<()> {
    src.psql(&shared_schema(&[1, 2], rows))?;
    prepare_target(src)?;
    prepare_target(dst)
}

/// The daemon on `path`, a writer on tenants 1 and 2 throughout, and their moves: tenant 1
/// to the other cluster (schema t1), tenant 2 to a schema of the source (t2).
struct Moves {
    s: tokio_postgres::Client,
    daemon: InProcess,
    writer: Writer,
    one: i64,
    two: i64,
}

async fn start_moves(src: &PgCluster, path: &std::path::Path) -> Result<Moves> {
    let s = src.client().await?;
    let daemon = InProcess::start(load_config(path)?, true);
    registry_ready(&s).await?;
    let registry = Registry::new("switchyard")?;
    let writer = Writer::start(src.client().await?, vec![1, 2], Duration::from_millis(3));
    let one = request(&s, &registry, "1", "shard2", "t1").await?;
    let two = request(&s, &registry, "2", "local", "t2").await?;
    Ok(Moves {
        s,
        daemon,
        writer,
        one,
        two,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crash_and_restarts_and_a_source_restart_lose_nothing() -> Result<()> {
    let mut src = PgCluster::start()?;
    let mut dst = PgCluster::start()?;
    two_tenants(&src, &dst, 4000)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        Some(&dst),
        // Paced, so that the faults land mid-backfill however fast this machine copies.
        "[move]\nchunk_rows = 100\nbackfill_workers = 1\nbackfill_rows_per_sec = 3000\n",
    )?;
    let Moves {
        s,
        daemon,
        writer,
        one,
        two,
    } = start_moves(&src, &path).await?;

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

/// The slot's walsender pid, once the daemon streams from it.
async fn walsender(s: &tokio_postgres::Client) -> Result<Option<i32>> {
    Ok(s.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'sy'",
        &[],
    )
    .await?
    .get(0))
}

/// Waits for move `id` to have copied at least `rows`, still copying.
async fn wait_copied(s: &tokio_postgres::Client, id: i64, rows: i64) -> Result<()> {
    let deadline = Instant::now() + SYNC;
    loop {
        let (state, error, copied) = state_of(s, id).await?;
        anyhow::ensure!(state != "failed", "move failed: {error:?}");
        if copied >= rows {
            anyhow::ensure!(state == "copying", "the backfill ended first ({state})");
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "no backfill progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_reset_and_black_holed_links_lose_nothing() -> Result<()> {
    // The server gives up on a silent walsender after 4 s, so the slot is free again soon
    // after the black hole; the daemon's own silence limit is 10 s.
    let src = PgCluster::start_with(ClusterOptions {
        wal_sender_timeout: Some(Duration::from_secs(4)),
        ..Default::default()
    })?;
    let dst = PgCluster::start()?;
    two_tenants(&src, &dst, 4000)?;
    let to_src = Proxy::start(src.port())?;
    let to_dst = Proxy::start(dst.port())?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        Some(&dst),
        // Paced, so that the faults land mid-backfill however fast this machine copies.
        "[move]\nchunk_rows = 100\nbackfill_workers = 1\nbackfill_rows_per_sec = 3000\n",
    )?;
    // Every connection of the daemon goes through the proxies; the test's own do not.
    let text = std::fs::read_to_string(&path)?
        .replace(
            &format!("port = {}\n", src.port()),
            &format!("port = {}\n", to_src.port()),
        )
        .replace(
            &format!("port = {}\n", dst.port()),
            &format!("port = {}\n", to_dst.port()),
        );
    std::fs::write(&path, text)?;
    let d = dst.client().await?;
    // Latency on every packet in both directions for the whole backfill.
    to_src.delay(Duration::from_millis(1));
    to_dst.delay(Duration::from_millis(2));
    let Moves {
        s,
        daemon,
        writer,
        one,
        two,
    } = start_moves(&src, &path).await?;

    // Mid-backfill: every connection of the daemon is reset at once.
    wait_copied(&s, one, 1500).await?;
    let accepted = (to_src.accepted(), to_dst.accepted());
    to_src.cut();
    to_dst.cut();
    wait_state(&s, one, "streaming", SYNC).await?;
    wait_state(&s, two, "streaming", SYNC).await?;
    to_src.delay(Duration::ZERO);
    to_dst.delay(Duration::ZERO);
    assert!(
        to_src.accepted() > accepted.0 && to_dst.accepted() > accepted.1,
        "the daemon reconnected after the cut"
    );

    // Mid-stream: an administrator terminates the walsender and the target's sessions.
    let pid = wait_for("the daemon's walsender", SYNC, || async {
        walsender(&s).await
    })
    .await?;
    s.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await?;
    let killed: i64 = d
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'switchyard'",
            &[],
        )
        .await?
        .get(0);
    assert!(killed > 0, "the daemon had sessions on the target");
    let pid = wait_for("a new walsender", SYNC, || async {
        Ok(walsender(&s).await?.filter(|p| *p != pid))
    })
    .await?;

    // Mid-stream: both links go silent, with no reset (a partition, a dead NAT entry),
    // for longer than the daemon's silence limit.
    to_src.black_hole(true);
    to_dst.black_hole(true);
    tokio::time::sleep(Duration::from_secs(13)).await;
    daemon.check_alive()?;
    to_src.black_hole(false);
    to_dst.black_hole(false);
    wait_for(
        "the stream to come back on a new walsender",
        SYNC,
        || async { Ok(walsender(&s).await?.filter(|p| *p != pid)) },
    )
    .await?;

    let rounds = writer.stop().await?;
    wait_drained(&s, SYNC).await.context("after the faults")?;
    daemon.check_alive()?;
    for id in [one, two] {
        let (state, error, _) = state_of(&s, id).await?;
        assert_eq!(state, "streaming", "move {id}: {error:?}");
        // What was retried shows in the registry until the next progress report after
        // the target committed again (about a second).
        wait_for(
            "the retried errors to clear",
            Duration::from_secs(10),
            || async { Ok(state_of(&s, id).await?.1.is_none().then_some(())) },
        )
        .await?;
    }
    daemon.stop().await?;
    assert_parity(&s, &d, 1, "t1").await?;
    assert_parity(&s, &s, 2, "t2").await?;
    assert!(rounds > 100, "writer rounds {rounds}");
    Ok(())
}

/// A tablespace of `mb` MB on its own tmpfs, unmounted (lazily) on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mb: u32) -> Result<SmallDisk> {
        let dir = tempfile::tempdir()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m,mode=0700")])
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .context("mount (the test runs as root, like CI)")?;
        anyhow::ensure!(status.success(), "mount -t tmpfs failed: {status}");
        let disk = SmallDisk { dir };
        let chown = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(disk.dir.path())
            .status()?;
        anyhow::ensure!(chown.success(), "chown failed");
        Ok(disk)
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_out_of_disk_waits_and_a_revoked_privilege_fails_only_its_tenant() -> Result<()> {
    // Declared before the clusters, so it is unmounted after they stopped.
    let disk = SmallDisk::mount(24)?;
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    two_tenants(&src, &dst, 3000)?;
    // Whatever the daemon creates on the target lands on the small disk; a filler table
    // takes all of it but the ~300 kB a dropped slack table gives back: room for the
    // provisioned tables, not for the tenant's rows.
    dst.psql(&format!(
        "CREATE TABLESPACE small LOCATION '{}';
         GRANT CREATE ON TABLESPACE small TO switchyard;
         ALTER ROLE switchyard SET default_tablespace = 'small';
         CREATE TABLE slack (b text) TABLESPACE small;
         ALTER TABLE slack ALTER b SET STORAGE PLAIN;
         INSERT INTO slack SELECT repeat('x', 1000) FROM generate_series(1, 300);
         CREATE TABLE filler (b text) TABLESPACE small;
         ALTER TABLE filler ALTER b SET STORAGE PLAIN;
         DO $$ BEGIN
           LOOP
             BEGIN
               INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 500);
             EXCEPTION WHEN disk_full THEN EXIT;
             END;
           END LOOP;
         END $$;
         DROP TABLE slack;",
        disk.path().display()
    ))?;
    let dir = tempfile::tempdir()?;
    let path = write_config(dir.path(), &src, Some(&dst), "[move]\nchunk_rows = 200\n")?;
    let d = dst.client().await?;
    let Moves {
        s,
        daemon,
        writer,
        one,
        two,
    } = start_moves(&src, &path).await?;

    // The target's disk fills up: the move waits, saying why, and its neighbour goes on.
    let reason = wait_for("the disk-full reason in the registry", SYNC, || async {
        let (state, error, _) = state_of(&s, one).await?;
        anyhow::ensure!(state != "failed", "move failed: {error:?}");
        Ok(error.filter(|e| e.starts_with("retrying: ") && e.contains("53100")))
    })
    .await?;
    assert!(reason.contains("target shard2"), "{reason}");
    wait_state(&s, two, "streaming", SYNC).await?;
    let (state, _, _) = state_of(&s, one).await?;
    assert_eq!(state, "copying", "the move waits while the disk is full");
    // Space comes back: the move resumes by itself and the reason goes away.
    dst.psql("DROP TABLE filler;")?;
    wait_state(&s, one, "streaming", SYNC).await?;
    wait_for("the reason to clear", SYNC, || async {
        let (_, error, _) = state_of(&s, one).await?;
        Ok(error.is_none().then_some(()))
    })
    .await?;

    // Mid-stream the daemon loses its privileges on one table of the target: that
    // tenant fails with the server's words, its neighbour streams on.
    dst.psql("REVOKE ALL ON t1.orders FROM switchyard;")?;
    let failed = wait_for("the tenant to fail on the privilege", SYNC, || async {
        let (state, error, _) = state_of(&s, one).await?;
        Ok((state == "failed").then_some(error))
    })
    .await?;
    let failed = failed.unwrap_or_default();
    assert!(
        failed.contains("42501") && failed.contains("permission denied"),
        "{failed}"
    );
    s.execute(
        "UPDATE public.orders SET note = 'after the failure' WHERE tenant_id = 2 AND id <= 5",
        &[],
    )
    .await?;
    // Fixed and resumed the documented way: it copies again and catches up.
    dst.psql("GRANT ALL ON t1.orders TO switchyard;")?;
    s.execute(
        "UPDATE switchyard.moves SET state = 'provisioning' WHERE id = $1",
        &[&one],
    )
    .await?;
    wait_state(&s, one, "streaming", SYNC).await?;
    let rounds = writer.stop().await?;
    wait_drained(&s, SYNC).await?;
    daemon.check_alive()?;
    let (state, _, _) = state_of(&s, two).await?;
    assert_eq!(state, "streaming", "the neighbour never stopped");
    daemon.stop().await?;
    assert_parity(&s, &d, 1, "t1").await?;
    assert_parity(&s, &s, 2, "t2").await?;
    assert!(rounds > 50, "writer rounds {rounds}");
    Ok(())
}

/// A source transaction bigger than `move.max_txn_mb` for a moving tenant: that tenant
/// fails with the limit and the fix in its error (instead of the daemon running out of
/// memory); the other tenant streams on with parity, and the daemon keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_the_memory_limit_fails_only_its_tenant() -> Result<()> {
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    two_tenants(&src, &dst, 500)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(dir.path(), &src, Some(&dst), "[move]\nmax_txn_mb = 1\n")?;
    let d = dst.client().await?;
    let Moves {
        s,
        daemon,
        writer,
        one,
        two,
    } = start_moves(&src, &path).await?;
    wait_state(&s, one, "streaming", SYNC).await?;
    wait_state(&s, two, "streaming", SYNC).await?;
    // About 3 MB of changes for tenant 1 in one transaction (and a little for tenant 2).
    src.psql(
        "INSERT INTO public.orders (tenant_id, id, note, amount)
           SELECT 1, 900000 + g, repeat(md5(g::text), 32), 1 FROM generate_series(1, 3000) g;
         UPDATE public.orders SET note = 'in the big one' WHERE tenant_id = 2 AND id <= 3;",
    )?;
    let error = wait_for("tenant 1 to fail on the limit", SYNC, || async {
        let (state, error, _) = state_of(&s, one).await?;
        Ok((state == "failed").then_some(error.unwrap_or_default()))
    })
    .await?;
    assert!(error.contains("move.max_txn_mb"), "{error}");
    let rounds = writer.stop().await?;
    wait_drained(&s, SYNC).await?;
    daemon.check_alive()?;
    assert_eq!(state_of(&s, two).await?.0, "streaming");
    daemon.stop().await?;
    assert_parity(&s, &s, 2, "t2").await?;
    let big: i64 = d
        .query_one("SELECT count(*) FROM t1.orders WHERE id > 900000", &[])
        .await?
        .get(0);
    assert_eq!(
        big, 0,
        "nothing of the oversized transaction reached tenant 1's target"
    );
    assert!(rounds > 10, "writer rounds {rounds}");
    Ok(())
}
