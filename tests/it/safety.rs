//! Data safety under workloads this project did not write: pgbench's TPC-B with the branch as
//! the tenant (hot branch rows, transactions that touch several tenants), clusters with
//! `synchronous_commit = off`, several apply lanes. Each test here reproduced a defect on
//! real clusters before its fix (docs/proof.md, "Data safety").

use crate::support;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use support::mover::{
    fence_grants, load_config, prepare_target, registry_ready, request, shared_schema,
    start_daemon as start, wait_state, write_config, InProcess, Running,
};
use support::tpcb::{self, Load};
use support::{wait_for, ClusterOptions, PgCluster};
use switchyard::registry::Registry;
use switchyard::tenant::TenantId;
use tokio_postgres::Client;

const SYNC: Duration = Duration::from_secs(240);

/// A cluster as many run in production: commits return before their WAL is flushed.
fn async_commit_cluster() -> Result<PgCluster> {
    PgCluster::start_with(ClusterOptions {
        extra_conf: vec![("synchronous_commit".into(), "off".into())],
        ..ClusterOptions::default()
    })
}

/// The shared schema with `tenants`, set up so their moves can be fenced: the application
/// owns the tables and switchyard is a member of its role (ALWAYS triggers), and may see
/// every session; the cluster is also a target of its own.
fn fenceable(src: &PgCluster, tenants: &[i32], rows: i32) -> Result<()> {
    src.psql(&shared_schema(tenants, rows))?;
    fence_grants(src)?;
    prepare_target(src)
}

impl Running {
    /// Requests the move of `tenant` into `schema` at `target` and waits until it is in sync.
    async fn in_sync(&self, tenant: &str, target: &str, schema: &str) -> Result<i64> {
        let id = request(&self.s, &self.registry, tenant, target, schema).await?;
        wait_state(&self.s, id, "streaming", SYNC).await?;
        Ok(id)
    }

    /// Cuts `tenant` over (the CLI's way) and checks that it did.
    async fn cut_over(&self, tenant: &str) -> Result<()> {
        let (mv, attempts) = switchyard::cutover::request::cutover_tenant(
            &self.config,
            &TenantId::new(tenant)?,
            Duration::from_secs(120),
        )
        .await?;
        ensure!(mv.state.as_str() == "cut_over", "{mv:?} {attempts:?}");
        Ok(())
    }
}

/// `count(*)` and an order-independent hash of `relation`'s rows under `filter`.
async fn content(c: &Client, relation: &str, columns: &str, filter: &str) -> Result<(i64, String)> {
    let row = c
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(hashtextextended(({columns})::text, 0))::text, '0') \
                   FROM {relation} {filter}"
            ),
            &[],
        )
        .await
        .with_context(|| format!("reading {relation}"))?;
    Ok((row.get(0), row.get(1)))
}

/// The columns of a pgbench table, in the source's order (the target has the same).
fn columns(table: &str) -> &'static str {
    match table {
        "pgbench_accounts" => "aid, bid, abalance, filler",
        "pgbench_tellers" => "tid, bid, tbalance, filler",
        "pgbench_branches" => "bid, bbalance, filler",
        _ => "tid, bid, aid, delta, mtime, filler, hid",
    }
}

/// The tenant's rows at the source against the target's, table by table.
async fn differences(s: &Client, d: &Client, bid: i32, schema: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in tpcb::TABLES {
        let cols = columns(t);
        let a = content(
            s,
            &format!("public.{t}"),
            cols,
            &format!("WHERE bid = {bid}"),
        )
        .await?;
        let b = content(d, &format!("\"{schema}\".{t}"), cols, "").await?;
        if a != b {
            out.push(format!("{t}: source {a:?}, target {b:?}"));
        }
    }
    Ok(out)
}

/// After branch 1's cutover into `schema` at `d`: the application's first write there
/// reaches the old location (the reverse stream is not stuck on the move's own writes), and
/// the old location then holds exactly what the new one holds.
async fn old_location_follows(s: &Client, d: &Client, schema: &str) -> Result<()> {
    // The application now writes the tenant at its new place; its history row is the probe:
    // once it is at the source, the reverse stream has passed everything before it.
    d.batch_execute(&format!(
        "INSERT INTO \"{schema}\".pgbench_history (tid, bid, aid, delta, mtime, hid)
           VALUES (1, 1, 1, 424242, now(), 900000000)"
    ))
    .await?;
    wait_for(
        "the application's first write at the target to reach the old location",
        Duration::from_secs(60),
        || async {
            let n: i64 = s
                .query_one(
                    "SELECT count(*) FROM public.pgbench_history WHERE hid = 900000000",
                    &[],
                )
                .await?
                .get(0);
            Ok((n == 1).then_some(()))
        },
    )
    .await
    .context("the reverse stream is stuck (replaying the move's own writes?)")?;
    let diff = differences(s, d, 1, schema).await?;
    ensure!(
        diff.is_empty(),
        "the old location differs from the new one: {diff:?}"
    );
    Ok(())
}

/// After a cutover under TPC-B, the old location (which a rollback restores) holds exactly
/// the tenant's rows, and what the application writes at the new location reaches it: the
/// reverse stream never replays the move's own writes. The defect: the reverse stream began
/// at the target's WAL *write* position, which with `synchronous_commit = off` trails the
/// move's last commits, so those came back as the application's: a history insert failed
/// on its key in a loop, an update wrote an older balance over the source's. The daemon's own
/// verification is off here (the hot-row tests below cover it): this test compares both
/// locations itself once the tenant's writes have stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_cutover_under_tpcb_the_reverse_stream_replays_none_of_the_moves_own_writes(
) -> Result<()> {
    let (src, dst) = (async_commit_cluster()?, async_commit_cluster()?);
    // pgbench on both branches from the start: the move copies under it.
    let TpcbCutOver {
        s, d, id, daemon, ..
    } = tpcb_branch_one_cut_over(&src, &dst, false, 400).await?;
    old_location_follows(&s, &d, "b1").await?;
    let (state, last_error): (String, Option<String>) = s
        .query_one(
            "SELECT state, last_error FROM switchyard.moves WHERE id = $1",
            &[&id],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    ensure!(state == "cut_over", "{state}");
    ensure!(
        last_error.is_none(),
        "the move reports an error after the cutover: {last_error:?}"
    );
    daemon.stop().await?;
    Ok(())
}

/// pgbench TPC-B (scale 2) on `src` at `tps` (0: as fast as its clients go) from the start,
/// and branch 1 moved to `dst` (schema `b1`) until it is in sync under the load (with the
/// daemon's verification before a cutover if `verify`).
async fn tpcb_branch_one_streaming(
    src: &PgCluster,
    dst: &PgCluster,
    verify: bool,
    tps: u32,
) -> Result<TpcbStreaming> {
    tpcb::init(src, 2)?;
    prepare_target(dst)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        src,
        Some(dst),
        &format!(
            "[tenancy]\ntenant_column = \"bid\"\n\
             [move]\napply_lanes = 4\n\
             [cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\nverify = {verify}\n"
        ),
    )?;
    let config = load_config(&path)?;
    let s = src.client().await?;
    let d = dst.client().await?;
    let daemon = InProcess::start(config.clone(), true);
    registry_ready(&s).await?;
    let registry = Registry::new("switchyard")?;
    let load = Load::start(src.port(), tps, 4, 600)?;
    let id = request(&s, &registry, "1", "shard2", "b1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    Ok(TpcbStreaming {
        config,
        s,
        d,
        id,
        daemon,
        load,
        dir,
    })
}

/// Branch 1 in sync under TPC-B, pgbench still running.
struct TpcbStreaming {
    config: switchyard::config::Config,
    s: Client,
    d: Client,
    id: i64,
    daemon: InProcess,
    load: Load,
    dir: tempfile::TempDir,
}

/// [`tpcb_branch_one_streaming`], a few seconds in sync, then cut over while pgbench still
/// writes. pgbench's clients stop at their first refused write of branch 1: every error it
/// saw must be that refusal.
async fn tpcb_branch_one_cut_over(
    src: &PgCluster,
    dst: &PgCluster,
    verify: bool,
    tps: u32,
) -> Result<TpcbCutOver> {
    let TpcbStreaming {
        config,
        s,
        d,
        id,
        daemon,
        load,
        dir,
    } = tpcb_branch_one_streaming(src, dst, verify, tps).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tenant = TenantId::new("1")?;
    let (mv, attempts) =
        switchyard::cutover::request::cutover_tenant(&config, &tenant, Duration::from_secs(120))
            .await?;
    ensure!(mv.state.as_str() == "cut_over", "{mv:?} {attempts:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let errors = load.stop()?;
    let strange: Vec<&String> = errors
        .iter()
        .filter(|l| l.contains("ERROR") && !l.contains("has moved"))
        .collect();
    ensure!(
        strange.is_empty(),
        "pgbench errors other than SY001: {strange:?}"
    );
    Ok(TpcbCutOver {
        s,
        d,
        id,
        daemon,
        _dir: dir,
    })
}

/// Branch 1 cut over under TPC-B: source and target sessions, the move, the running daemon
/// and its directory.
struct TpcbCutOver {
    s: Client,
    d: Client,
    id: i64,
    daemon: InProcess,
    _dir: tempfile::TempDir,
}

/// A hot row does not fail the move: pgbench TPC-B as fast as its clients go updates the
/// moving branch's one `pgbench_branches` row in every transaction, so the verification's
/// re-checks never see it equal while the target trails by a few milliseconds. The
/// defect: the move failed as `different` (the data was right). Rows that keep changing
/// are now compared again inside the cutover's pause, where the tenant's writes wait and
/// the target holds all of them; the cutover must go through, verified, with
/// `synchronous_commit` on and off, and both locations must then hold the same rows.
async fn hot_rows_verify_and_cut_over(async_commit: bool) -> Result<()> {
    let cluster = || {
        if async_commit {
            async_commit_cluster()
        } else {
            PgCluster::start()
        }
    };
    let (src, dst) = (cluster()?, cluster()?);
    let TpcbCutOver {
        s, d, id, daemon, ..
    } = tpcb_branch_one_cut_over(&src, &dst, true, 0).await?;
    let (verified, result): (Option<bool>, Option<String>) = s
        .query_one(
            "SELECT verify_ok, verify_result FROM switchyard.moves WHERE id = $1",
            &[&id],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    ensure!(verified == Some(true), "{verified:?} {result:?}");
    old_location_follows(&s, &d, "b1").await?;
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_rows_under_tpcb_at_full_rate_verify_and_cut_over() -> Result<()> {
    hot_rows_verify_and_cut_over(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_rows_under_tpcb_at_full_rate_verify_and_cut_over_with_async_commit() -> Result<()> {
    hot_rows_verify_and_cut_over(true).await
}

/// A row different for good among hot rows fails the move inside the pause and flips
/// nothing. Under TPC-B at full rate the branch row is different at every re-check, so the
/// rows still different are compared inside the pause, while the flip goes out in the same
/// transaction; one history row changed at the target (history is insert-only, so nothing
/// heals it) is different there too: the flip must be rolled back (no route to the target,
/// no `moved` fence, pgbench never refused) and the move failed with the row named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_different_for_good_among_hot_rows_fails_the_move_and_flips_nothing() -> Result<()> {
    let (src, dst) = (PgCluster::start()?, PgCluster::start()?);
    let TpcbStreaming {
        config,
        s,
        d,
        id,
        daemon,
        load,
        dir: _dir,
    } = tpcb_branch_one_streaming(&src, &dst, true, 0).await?;
    let changed = d
        .execute(
            "UPDATE b1.pgbench_history SET delta = delta + 1 \
              WHERE hid = (SELECT min(hid) FROM b1.pgbench_history)",
            &[],
        )
        .await?;
    ensure!(changed == 1, "a history row of branch 1 at the target");
    let (mv, attempts) = switchyard::cutover::request::cutover_tenant(
        &config,
        &TenantId::new("1")?,
        Duration::from_secs(120),
    )
    .await?;
    let errors = load.stop()?;
    ensure!(mv.state.as_str() == "failed", "{mv:?} {attempts:?}");
    let reason = mv.last_error.clone().unwrap_or_default();
    ensure!(
        reason.contains("pgbench_history") && reason.contains("with the tenant's writes paused"),
        "the difference found inside the pause, named: {reason}"
    );
    let route: Option<String> = s
        .query_opt(
            "SELECT location FROM switchyard.routes WHERE tenant = '1'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    ensure!(route.as_deref() != Some("shard2"), "route {route:?}");
    let moved: i64 = s
        .query_one(
            "SELECT count(*) FROM switchyard.fences WHERE state = 'moved'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(moved, 0, "no fence turned to moved");
    let refused: Vec<&String> = errors.iter().filter(|l| l.contains("ERROR")).collect();
    ensure!(refused.is_empty(), "pgbench was refused: {refused:?}");
    let different: i64 = s
        .query_one(
            "SELECT count(*) FROM switchyard.cutover_attempts WHERE move_id = $1 AND result = 'different'",
            &[&id],
        )
        .await?
        .get(0);
    assert_eq!(different, 1, "the attempt is recorded as different");
    daemon.stop().await?;
    Ok(())
}

/// Tenant 1 of the shared schema moved to a schema of the same cluster and cut over, with
/// the daemon still running.
async fn cut_over_tenant_one(src: &PgCluster) -> Result<Running> {
    fenceable(src, &[1, 2], 200)?;
    let d = start(
        src,
        None,
        "[cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\n",
    )
    .await?;
    d.in_sync("1", "local", "t1").await?;
    d.cut_over("1").await?;
    Ok(d)
}

/// The SQLSTATE of `sql` run on `c`, or `None` if it succeeded.
async fn sqlstate(c: &Client, sql: &str) -> Option<String> {
    match c.batch_execute(sql).await {
        Ok(()) => None,
        Err(e) => {
            let _ = c.batch_execute("ROLLBACK").await;
            Some(
                e.code()
                    .map(|c| c.code().to_owned())
                    .unwrap_or_else(|| e.to_string()),
            )
        }
    }
}

/// After a cutover, no session but the daemon's own writes the moved tenant at the old
/// location: not one that sets the daemon's bypass setting, not one under the replica role
/// (as a subscription or pg_restore runs), not a TRUNCATE. The defect: each of these three
/// got past the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_but_the_daemons_own_gets_past_the_fence() -> Result<()> {
    let src = PgCluster::start()?;
    let Running { s, daemon, .. } = cut_over_tenant_one(&src).await?;
    // An application role with every right on the tables, but not switchyard's.
    src.psql(
        "CREATE ROLE app LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO app;
         GRANT SET ON PARAMETER session_replication_role TO app;",
    )?;
    let (app, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(src.port())
        .user("app")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    let write = "UPDATE public.orders SET note = 'stale' WHERE tenant_id = 1 AND id = 5";
    assert_eq!(
        sqlstate(&app, write).await.as_deref(),
        Some("SY001"),
        "plain write"
    );
    let bypass = format!("SET switchyard.bypass_tenant = '1'; {write}");
    assert_eq!(
        sqlstate(&app, &bypass).await.as_deref(),
        Some("SY001"),
        "a write with the daemon's bypass setting"
    );
    app.batch_execute("RESET switchyard.bypass_tenant").await?;
    let replica = format!("SET session_replication_role = replica; {write}");
    assert_eq!(
        sqlstate(&app, &replica).await.as_deref(),
        Some("SY001"),
        "a write under the replica role"
    );
    // The superuser's replica-role session too (a subscription's apply, pg_restore).
    assert_eq!(
        sqlstate(&s, &replica).await.as_deref(),
        Some("SY001"),
        "a superuser's write under the replica role"
    );
    s.batch_execute("RESET session_replication_role").await?;
    assert_eq!(
        sqlstate(&app, "TRUNCATE public.events").await.as_deref(),
        Some("SY001"),
        "a TRUNCATE of a table holding the moved tenant's rows"
    );
    assert_eq!(
        sqlstate(
            &app,
            "INSERT INTO public.orders (tenant_id, id) VALUES (1, 77777)"
        )
        .await
        .as_deref(),
        Some("SY001"),
        "an insert"
    );
    // Nothing of tenant 1 changed; tenant 2 is still written freely.
    let n: i64 = s
        .query_one(
            "SELECT count(*) FROM public.orders WHERE tenant_id = 1 AND (note = 'stale' OR id = 77777)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(n, 0);
    let events: i64 = s
        .query_one(
            "SELECT count(*) FROM public.events WHERE tenant_id = 1",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(events, 200, "the TRUNCATE removed the moved tenant's rows");
    app.batch_execute("UPDATE public.orders SET note = 'fine' WHERE tenant_id = 2 AND id = 5")
        .await
        .context("tenant 2 is not fenced")?;
    daemon.stop().await?;
    Ok(())
}

/// A registry row the daemon cannot read (here: an empty target name, a 2,000-byte tenant)
/// is marked failed with the reason, and every other move goes on, at start and while
/// running. The defect: one such row failed the whole registry read (at start, the daemon
/// exited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_registry_row_fails_alone() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2, 3], 100))?;
    prepare_target(&src)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(dir.path(), &src, None, "")?;
    let config = load_config(&path)?;
    let s = src.client().await?;
    // The registry exists before the daemon starts, with a bad row in it.
    let registry = Registry::new("switchyard")?;
    {
        let mut c = config.source.connect_sql().await?;
        registry.install(&mut c).await?;
    }
    let bad_at_start: i64 = s
        .query_one(
            "INSERT INTO switchyard.moves (tenant, target, target_schema) VALUES ('3', '', 't3') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let good = request(&s, &registry, "1", "local", "t1").await?;
    let daemon = InProcess::start(config.clone(), true);
    wait_state(&s, good, "streaming", SYNC).await?;
    daemon.check_alive()?;
    let bad_later: i64 = s
        .query_one(
            "INSERT INTO switchyard.moves (tenant, target, target_schema) \
             VALUES (repeat('x', 2000), 'local', 'tx') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    for (id, field) in [(bad_at_start, "target"), (bad_later, "tenant")] {
        let err = wait_for(
            "the bad row to be marked failed",
            Duration::from_secs(30),
            || async {
                let row = s
                    .query_one(
                        "SELECT state, last_error FROM switchyard.moves WHERE id = $1",
                        &[&id],
                    )
                    .await?;
                let (state, err): (String, Option<String>) = (row.get(0), row.get(1));
                Ok((state == "failed").then_some(err))
            },
        )
        .await?;
        let err = err.unwrap_or_default();
        ensure!(err.contains(&format!("invalid {field}")), "{err}");
    }
    // The good move still follows its tenant's writes.
    let good2 = request(&s, &registry, "2", "local", "t2").await?;
    wait_state(&s, good2, "streaming", SYNC).await?;
    daemon.check_alive()?;
    daemon.stop().await?;
    Ok(())
}

/// Copies the stopped cluster's data directory to `to` (or back: `from` → the data dir).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()?
        .success();
    ensure!(ok, "cp -a {} {}", from.display(), to.display());
    Ok(())
}

/// A target that comes back from an asynchronous failover (here: its data directory as it
/// was before the last applied changes) holds the tenant behind what the daemon applied and
/// confirmed. The slot no longer has those changes, so the move fails loudly with the fix
/// instead of resuming from the target's older record. The defect: the resume trusted the
/// target's record and the changes in between were silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_comes_back_behind_what_was_confirmed_fails_the_move_loudly() -> Result<()> {
    let src = PgCluster::start()?;
    let mut dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 100))?;
    prepare_target(&dst)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(dir.path(), &src, Some(&dst), "")?;
    let config = load_config(&path)?;
    let s = src.client().await?;
    let registry = Registry::new("switchyard")?;
    let daemon = InProcess::start(config.clone(), true);
    registry_ready(&s).await?;
    let id = request(&s, &registry, "1", "shard2", "t1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    support::mover::wait_drained(&s, SYNC).await?;
    daemon.stop().await?;
    // The standby that will be promoted: a copy of the target as it is now.
    dst.stop();
    let standby = dir.path().join("standby");
    copy_dir(dst.data_dir(), &standby)?;
    dst.restart()?;
    // More of tenant 1, applied at the target and confirmed to the source.
    let daemon = InProcess::start(config.clone(), false);
    s.batch_execute(
        "INSERT INTO public.orders (tenant_id, id, note) SELECT 1, g, 'after' FROM generate_series(10001, 10100) g",
    )
    .await?;
    support::mover::wait_drained(&s, SYNC).await?;
    daemon.stop().await?;
    // The failover: the target comes back without those changes.
    dst.stop();
    copy_dir(&standby, dst.data_dir())?;
    dst.restart()?;
    let daemon = InProcess::start(config.clone(), false);
    let err = wait_for("the move to fail", Duration::from_secs(60), || async {
        let row = s
            .query_one(
                "SELECT state, last_error FROM switchyard.moves WHERE id = $1",
                &[&id],
            )
            .await?;
        let (state, err): (String, Option<String>) = (row.get(0), row.get(1));
        ensure!(
            state != "streaming" || err.is_none(),
            "resumed with an error: {err:?}"
        );
        Ok((state == "failed").then_some(err.unwrap_or_default()))
    })
    .await
    .context("the move resumed from a target that lost confirmed changes")?;
    ensure!(err.contains("Copy the tenant again"), "{err}");
    daemon.stop().await?;
    Ok(())
}

/// The slot dropped and created again under its name while the daemon was down: the
/// changes written meanwhile are gone from it, and a resume would go on without them. The
/// daemon confirms nothing it has not recorded, so it tells a slot moved by someone else
/// from its own: the moving tenant fails with the fix, an ordinary restart does not, and
/// the fix (copy again) brings the missed change over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_created_again_while_the_daemon_was_down_fails_the_moving_tenant() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 100))?;
    prepare_target(&src)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(dir.path(), &src, None, "")?;
    let config = load_config(&path)?;
    let s = src.client().await?;
    let registry = Registry::new("switchyard")?;
    let daemon = InProcess::start(config.clone(), true);
    registry_ready(&s).await?;
    let id = request(&s, &registry, "1", "local", "t1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    // Traffic of no moving tenant, and idle time: the slot is confirmed past it as usual.
    s.batch_execute("UPDATE public.orders SET note = 'other' WHERE tenant_id = 2")
        .await?;
    support::mover::wait_drained(&s, SYNC).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.stop().await?;
    // An ordinary restart resumes.
    let daemon = InProcess::start(config.clone(), false);
    s.batch_execute("UPDATE public.orders SET note = 'restarted' WHERE tenant_id = 1 AND id = 1")
        .await?;
    support::wait_for_row(
        &s,
        "the change after a restart",
        SYNC,
        "SELECT 1 FROM t1.orders WHERE id = 1 AND note = 'restarted'",
        &[],
    )
    .await?;
    daemon.stop().await?;
    // Down: a change of the tenant, then the slot is replaced. The stopped daemon's
    // walsender may still hold the slot for a moment after the client left (seen under
    // load: "replication slot is active"), so the drop waits for it.
    s.batch_execute("UPDATE public.orders SET note = 'missed' WHERE tenant_id = 1 AND id = 2")
        .await?;
    support::wait_for_row(
        &s,
        "the slot to be released",
        SYNC,
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sy' AND NOT active",
        &[],
    )
    .await?;
    s.batch_execute(
        "SELECT pg_drop_replication_slot('sy');
         SELECT pg_create_logical_replication_slot('sy', 'pgoutput');",
    )
    .await?;
    let daemon = InProcess::start(config.clone(), false);
    let err = wait_for("the move to fail", Duration::from_secs(60), || async {
        let row = s
            .query_one(
                "SELECT state, last_error FROM switchyard.moves WHERE id = $1",
                &[&id],
            )
            .await?;
        let (state, err): (String, Option<String>) = (row.get(0), row.get(1));
        Ok((state == "failed").then_some(err.unwrap_or_default()))
    })
    .await
    .context("the move resumed on a slot that no longer holds its changes")?;
    ensure!(err.contains("slot was found confirmed"), "{err}");
    // The fix the error names: copy the tenant again. The missed change arrives with it.
    s.execute(
        "UPDATE switchyard.moves SET state = 'provisioning', last_error = NULL WHERE id = $1",
        &[&id],
    )
    .await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    support::wait_for_row(
        &s,
        "the missed change, copied again",
        SYNC,
        "SELECT 1 FROM t1.orders WHERE id = 2 AND note = 'missed'",
        &[],
    )
    .await?;
    daemon.stop().await?;
    Ok(())
}

/// An UPDATE that sets a moving tenant's row's tenant column to NULL is that row leaving
/// the tenant: it goes from the target. The defect: the change was skipped whole (a NULL
/// tenant is no one's), and the row stayed at the target with its old values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_tenant_is_set_to_null_leaves_the_target() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 50))?;
    // A nullable tenant column: the key lacks it, so the old row is logged whole.
    src.psql(
        "CREATE TABLE public.notes (id int PRIMARY KEY, tenant_id int, body text);
         ALTER TABLE public.notes REPLICA IDENTITY FULL;
         INSERT INTO public.notes SELECT g, 1 + g % 2, 'note ' || g FROM generate_series(1, 20) g;
         GRANT SELECT ON public.notes TO switchyard;
         ALTER PUBLICATION sy_pub ADD TABLE public.notes;",
    )?;
    prepare_target(&src)?;
    let d = start(&src, None, "").await?;
    d.in_sync("1", "local", "t1").await?;
    let s = &d.s;
    async fn at_target(s: &Client, id: i32) -> Result<i64> {
        Ok(
            s.query_one("SELECT count(*) FROM t1.notes WHERE id = $1", &[&id])
                .await?
                .get(0),
        )
    }
    ensure!(
        at_target(s, 4).await? == 1,
        "note 4 is tenant 1's and was copied"
    );
    // Under full replica identity every column is flagged as key: an update keeping the
    // primary key is an update of that row, and one changing it moves the row.
    s.batch_execute(
        "UPDATE public.notes SET tenant_id = NULL WHERE id = 4;
         UPDATE public.notes SET id = 100 WHERE id = 8;
         UPDATE public.notes SET body = 'after' WHERE id = 6;",
    )
    .await?;
    support::wait_for_row(
        s,
        "a later change of the tenant",
        SYNC,
        "SELECT 1 FROM t1.notes WHERE id = 6 AND body = 'after'",
        &[],
    )
    .await?;
    ensure!(
        at_target(s, 4).await? == 0,
        "the row that left the tenant stayed at its target"
    );
    ensure!(
        at_target(s, 8).await? == 0 && at_target(s, 100).await? == 1,
        "the row whose key changed is not at its new key only"
    );
    let rows: i64 = s
        .query_one(
            "SELECT count(*) FROM (SELECT id, tenant_id, body FROM public.notes WHERE tenant_id = 1
               EXCEPT SELECT id, tenant_id, body FROM t1.notes) d",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        rows == 0,
        "{rows} of the tenant's notes differ at the target"
    );
    d.daemon.stop().await?;
    Ok(())
}

/// A writer whose transaction begins while the fence is being armed (its row inserted, not
/// yet committed: widened here by a slow trigger on the fences table) takes no lock. The
/// cutover must wait it out, so its write reaches the target; the defect: `armed_at` was read
/// before the row's commit, the writer counted as newer than the fence, and its write landed
/// at the old location after the flip, lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_starts_while_the_fence_is_armed_is_waited_out() -> Result<()> {
    let src = PgCluster::start()?;
    fenceable(&src, &[1, 2], 100)?;
    let Running {
        config, s, daemon, ..
    } = start(
        &src,
        None,
        "[cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\nold_transaction_wait_ms = 20000\nrollback = false\n",
    )
    .await?;
    let id = request(&s, &Registry::new("switchyard")?, "1", "local", "t1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    // Arming now takes two seconds between the row's insert and its commit.
    s.batch_execute(
        "CREATE FUNCTION public.slow_arm() RETURNS trigger LANGUAGE plpgsql AS
           'BEGIN PERFORM pg_sleep(2); RETURN NULL; END';
         CREATE TRIGGER slow_arm AFTER INSERT ON switchyard.fences
           FOR EACH ROW EXECUTE FUNCTION public.slow_arm();",
    )
    .await?;
    let cfg = config.clone();
    let cutover = tokio::spawn(async move {
        switchyard::cutover::request::cutover_tenant(
            &cfg,
            &TenantId::new("1")?,
            Duration::from_secs(120),
        )
        .await
        .map_err(anyhow::Error::from)
    });
    wait_for(
        "the fence's insert to be in flight",
        Duration::from_secs(60),
        || async {
            let n: i64 = s
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                  WHERE query LIKE 'INSERT INTO %fences%' AND wait_event = 'PgSleep'",
                    &[],
                )
                .await?
                .get(0);
            Ok((n > 0).then_some(()))
        },
    )
    .await?;
    // The writer: begins inside the window, writes tenant 1 without seeing the fence, and
    // commits after the arm committed and the attempt looked for older transactions.
    let w = src.client().await?;
    w.batch_execute(
        "BEGIN; UPDATE public.orders SET note = 'racer' WHERE tenant_id = 1 AND id = 3",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    w.batch_execute("COMMIT").await?;
    // The moment its commit returned, the route must not have flipped yet: a write that
    // commits at the old location after the flip is one the new location's readers miss
    // (and, once the move stops following the old location, one that is lost).
    let fences: Vec<(String, String)> = w
        .query("SELECT tenant, state FROM switchyard.fences", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let fence = fences
        .iter()
        .find(|(t, _)| t == "1")
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    eprintln!("fences when the writer committed: {fences:?}");
    ensure!(
        fence != "moved",
        "the writer committed at the old location after the route flipped (fence {fence}): \
         the attempt did not wait for a transaction that began before the fence was visible"
    );
    let (mv, attempts) = cutover.await??;
    ensure!(mv.state.as_str() == "cut_over", "{mv:?} {attempts:?}");
    // Its write is at the new location: the cutover waited for it.
    let note: Option<String> = s
        .query_one(
            "SELECT note FROM t1.orders WHERE tenant_id = 1 AND id = 3",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        note.as_deref(),
        Some("racer"),
        "a write committed at the old location after the flip was lost"
    );
    daemon.stop().await?;
    Ok(())
}

/// A move that ends without a cutover, through SQL as much as through the daemon (paused,
/// failed, cancelled), keeps neither its armed fence (the tenant's writers would take its
/// lock for ever) nor the reverse slot an aborted attempt created at the target (it would
/// keep WAL for ever). The defect: only a rollback, the CLI cancel or a cleanup removed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_that_end_without_a_cutover_leave_no_armed_fence_and_no_reverse_slot() -> Result<()> {
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    fenceable(&src, &[1, 2, 3, 4], 100)?;
    prepare_target(&dst)?;
    let running = start(
        &src,
        Some(&dst),
        // One attempt each: it aborts on an old transaction, and no retry comes soon.
        "[cutover]\npause_budget_ms = 1500\nold_transaction_wait_ms = 300\n\
         retry_initial_ms = 600000\nretry_max_ms = 600000\n",
    )
    .await?;
    let mut ids = Vec::new();
    for t in ["1", "2", "3"] {
        ids.push((t, running.in_sync(t, "shard2", &format!("t{t}")).await?));
    }
    let Running {
        s,
        daemon,
        registry,
        ..
    } = running;
    let d = dst.client().await?;
    // A repeatable-read transaction older than every fence: each attempt arms, prepares the
    // reverse slot, then aborts waiting for it.
    let old = src.client().await?;
    old.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM public.orders")
        .await?;
    // One after the other: each attempt's own leftovers are what is looked at here.
    for (t, id) in &ids {
        registry.request_cutover(&s, &TenantId::new(*t)?).await?;
        wait_for("an aborted attempt", Duration::from_secs(60), || async {
            let n: i64 = s
                .query_one(
                    "SELECT count(*) FROM switchyard.cutover_attempts WHERE move_id = $1 AND result = 'aborted'",
                    &[id],
                )
                .await?
                .get(0);
            Ok((n > 0).then_some(()))
        })
        .await?;
    }
    // Every attempt left an armed fence and a reverse slot.
    let armed: i64 = s
        .query_one(
            "SELECT count(*) FROM switchyard.fences WHERE state = 'armed'",
            &[],
        )
        .await?
        .get(0);
    let slots: i64 = d
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'switchyard\\_rev\\_%'",
            &[],
        )
        .await?
        .get(0);
    // One reverse slot for the target, shared: each attempt added its tables to it.
    let published: i64 = d
        .query_one(
            "SELECT count(DISTINCT schemaname) FROM pg_publication_tables WHERE pubname LIKE 'switchyard\\_rev\\_%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        (armed, slots, published),
        (3, 1, 3),
        "what the aborted attempts left"
    );
    old.batch_execute("COMMIT").await?;
    for ((_, id), state) in ids.iter().zip(["paused", "failed", "cancelled"]) {
        s.execute(
            "UPDATE switchyard.moves SET state = $2 WHERE id = $1",
            &[id, &state],
        )
        .await?;
    }
    wait_for("the fences and reverse slots to go", Duration::from_secs(60), || async {
        let armed: i64 = s
            .query_one("SELECT count(*) FROM switchyard.fences WHERE state = 'armed'", &[])
            .await?
            .get(0);
        let slots: i64 = d
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'switchyard\\_rev\\_%'",
                &[],
            )
            .await?
            .get(0);
        let publications: i64 = d
            .query_one(
                "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'switchyard\\_rev\\_%'",
                &[],
            )
            .await?
            .get(0);
        Ok((armed == 0 && slots == 0 && publications == 0).then_some(()))
    })
    .await?;
    // Tenant 4 writes as before; tenant 1's writers take no lock any more.
    s.batch_execute("UPDATE public.orders SET note = 'free' WHERE tenant_id = 1 AND id = 1")
        .await?;
    daemon.stop().await?;
    Ok(())
}

/// When the daemon's host dies or is cut off while it holds a tenant's fence, the tenant's
/// writers wait a bounded time: the server ends the fence's session by itself (here: the
/// daemon's link to the source black-holed mid-pause, so no ROLLBACK and no reset arrive).
/// The defect: nothing bounded it, and the writers waited as long as the partition lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_held_by_a_cut_off_daemon_is_released_by_the_server() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 100))?;
    src.psql(&support::app_owned(&["public"]))?;
    src.psql("GRANT pg_read_all_stats TO switchyard;")?;
    // The target is another cluster: what stalls the catch-up there is no transaction of
    // the source's, which the attempt would wait out before it fences.
    let dst = PgCluster::start()?;
    prepare_target(&dst)?;
    let proxy = support::proxy::Proxy::start(src.port())?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        Some(&dst),
        "[cutover]\npause_budget_ms = 3000\nverify = false\nrollback = false\n\
         retry_initial_ms = 600000\nretry_max_ms = 600000\n",
    )?;
    // The daemon reaches the source only through the proxy.
    let text = std::fs::read_to_string(&path)?.replace(
        &format!("port = {}", src.port()),
        &format!("port = {}", proxy.port()),
    );
    std::fs::write(&path, text)?;
    let config = load_config(&path)?;
    let s = src.client().await?;
    let daemon = InProcess::start(config.clone(), true);
    registry_ready(&s).await?;
    let registry = Registry::new("switchyard")?;
    let id = request(&s, &registry, "1", "shard2", "t1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    // The target cannot take the tenant's next change, so the attempt sits in its pause,
    // holding the fence, waiting for the catch-up.
    let blocker = dst.client().await?;
    blocker
        .batch_execute("BEGIN; LOCK TABLE t1.orders IN EXCLUSIVE MODE")
        .await?;
    s.batch_execute("UPDATE public.orders SET note = 'pending' WHERE tenant_id = 1 AND id = 1")
        .await?;
    let cfg = config.clone();
    let _cutover = tokio::spawn(async move {
        switchyard::cutover::request::cutover_tenant(
            &cfg,
            &TenantId::new("1")?,
            Duration::from_secs(300),
        )
        .await
        .map_err(anyhow::Error::from)
    });
    // The fence holds when a write of the tenant waits on it: a probe that gives up after a
    // short lock wait tells, whatever lock the fence takes (the daemon's own lease is an
    // advisory lock too, so the lock table alone cannot).
    let probe = src.client().await?;
    probe.batch_execute("SET lock_timeout = '300ms'").await?;
    wait_for(
        "the fence to hold the tenant's writes",
        Duration::from_secs(60),
        || async {
            match probe
                .batch_execute(
                    "UPDATE public.orders SET note = 'probe' WHERE tenant_id = 1 AND id = 5",
                )
                .await
            {
                Ok(()) => Ok(None),
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    Ok(Some(()))
                }
                Err(e) => Err(e.into()),
            }
        },
    )
    .await?;
    proxy.black_hole(true);
    let writer = src.client().await?;
    let started = std::time::Instant::now();
    let write = tokio::time::timeout(
        Duration::from_secs(40),
        writer.batch_execute(
            "UPDATE public.orders SET note = 'waited' WHERE tenant_id = 1 AND id = 2",
        ),
    )
    .await;
    let waited = started.elapsed();
    proxy.black_hole(false);
    blocker.batch_execute("COMMIT").await?;
    ensure!(
        write.is_ok(),
        "the tenant's writer still waited after {waited:?}: the fence outlived its daemon"
    );
    write.expect("checked")?;
    // The server's bound: four times the pause budget of 3 s, with room for its timer.
    ensure!(
        waited < Duration::from_secs(20),
        "the writer waited {waited:?}"
    );
    daemon.stop().await?;
    Ok(())
}

/// A stop request is obeyed within `stop_timeout_ms` even while every cluster has gone
/// silent (the daemon's links black-holed: its queries and reconnects hang), and the move
/// resumes exactly from there. The defect: two SIGTERMs 40 s apart were ignored while the
/// daemon retried connections, and only SIGKILL ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_request_is_obeyed_while_the_clusters_are_unreachable() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 200))?;
    prepare_target(&src)?;
    let proxy = support::proxy::Proxy::start(src.port())?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        None,
        "[move]\nstop_timeout_ms = 3000\n[metrics]\nlisten = \"off\"\n",
    )?;
    let text = std::fs::read_to_string(&path)?.replace(
        &format!("port = {}", src.port()),
        &format!("port = {}", proxy.port()),
    );
    std::fs::write(&path, text)?;
    let s = src.client().await?;
    let log = dir.path().join("daemon.log");
    let mut daemon = support::mover::Process::start(&path, &log, true)?;
    registry_ready(&s).await?;
    let registry = Registry::new("switchyard")?;
    let id = request(&s, &registry, "1", "local", "t1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    proxy.black_hole(true);
    // Let the daemon get stuck on the silent link (its registry poll, its stream).
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.batch_execute("UPDATE public.orders SET note = 'while away' WHERE tenant_id = 1 AND id = 1")
        .await?;
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(daemon.pid().to_string())
        .status();
    let started = std::time::Instant::now();
    let status = daemon.wait_exit(Duration::from_secs(30))?;
    let took = started.elapsed();
    ensure!(took < Duration::from_secs(15), "the stop took {took:?}");
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        status.success() || text.contains("the stop did not finish in time"),
        "{status}: {text}"
    );
    // Back on line: the move resumes and has the change made while the daemon was away.
    proxy.black_hole(false);
    let _daemon = support::mover::Process::start(&path, &log, false)?;
    wait_for("the change made while away", SYNC, || async {
        let note: Option<String> = s
            .query_one(
                "SELECT note FROM t1.orders WHERE tenant_id = 1 AND id = 1",
                &[],
            )
            .await?
            .get(0);
        Ok((note.as_deref() == Some("while away")).then_some(()))
    })
    .await?;
    let (state, _, _) = support::mover::state_of(&s, id).await?;
    ensure!(state == "streaming", "{state}");
    Ok(())
}

/// A row moved into a tenant that is already in sync, whose TOAST value the source does not
/// resend (an UPDATE of the tenant column leaves a 10 kB value unchanged), reaches the
/// target whole: the daemon reads it again from the source. The defect: re-reads ran only
/// while the tenant was still copying, so the row never arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_unchanged_toast_moved_into_a_streaming_tenant_arrives_whole() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 100))?;
    prepare_target(&src)?;
    let Running { s, daemon, .. } = start(&src, None, "").await?;
    let id = request(&s, &Registry::new("switchyard")?, "1", "local", "t1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    s.batch_execute(
        "UPDATE public.orders SET big = (SELECT string_agg(md5(k::text), '') FROM generate_series(1, 320) k)
          WHERE tenant_id = 2 AND id = 7;
         DELETE FROM public.items WHERE tenant_id = 2 AND order_id = 7;",
    )
    .await?;
    // The tenant column changes; `big` (10,240 bytes, stored out of line) does not.
    s.batch_execute(
        "UPDATE public.orders SET tenant_id = 1, id = 800007 WHERE tenant_id = 2 AND id = 7",
    )
    .await?;
    support::mover::wait_drained(&s, SYNC).await?;
    wait_for("the moved row at the target", Duration::from_secs(60), || async {
        let row = s
            .query_opt(
                "SELECT length(big), big = (SELECT big FROM public.orders WHERE tenant_id = 1 AND id = 800007)
                   FROM t1.orders WHERE tenant_id = 1 AND id = 800007",
                &[],
            )
            .await?;
        Ok(row.map(|r| (r.get::<_, Option<i32>>(0), r.get::<_, Option<bool>>(1))))
    })
    .await
    .map(|(len, same)| {
        assert_eq!(len, Some(10_240));
        assert_eq!(same, Some(true));
    })?;
    let (state, err, _) = support::mover::state_of(&s, id).await?;
    ensure!(state == "streaming", "{state} {err:?}");
    daemon.stop().await?;
    Ok(())
}

/// A tenant id written in another form than its column's type writes it (`007` for an
/// integer column) is stored in that form when the move starts, so live changes are routed
/// and fenced; an id the type does not accept is refused with the reason. The defect: the
/// copy matched typed values, the stream and the fence compared text, and every live change
/// of `007` was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_ids_are_stored_as_their_column_type_writes_them() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[7, 8], 50))?;
    prepare_target(&src)?;
    let Running { s, daemon, .. } = start(&src, None, "").await?;
    let id: i64 = s
        .query_one(
            "INSERT INTO switchyard.moves (tenant, target, target_schema) VALUES ('007', 'local', 't7') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let bad: i64 = s
        .query_one(
            "INSERT INTO switchyard.moves (tenant, target, target_schema) VALUES ('seven', 'local', 'tx') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    wait_state(&s, id, "streaming", SYNC).await?;
    let tenant: String = s
        .query_one("SELECT tenant FROM switchyard.moves WHERE id = $1", &[&id])
        .await?
        .get(0);
    assert_eq!(tenant, "7");
    s.batch_execute("UPDATE public.orders SET note = 'live' WHERE tenant_id = 7 AND id = 3")
        .await?;
    wait_for(
        "the live change at the target",
        Duration::from_secs(60),
        || async {
            let note: Option<String> = s
                .query_one(
                    "SELECT note FROM t7.orders WHERE tenant_id = 7 AND id = 3",
                    &[],
                )
                .await?
                .get(0);
            Ok((note.as_deref() == Some("live")).then_some(()))
        },
    )
    .await?;
    let (state, err, _) = support::mover::state_of(&s, bad).await?;
    ensure!(state == "failed", "{state}");
    let err = err.unwrap_or_default();
    ensure!(
        err.contains("not a value of the tenant column's type integer"),
        "{err}"
    );
    daemon.stop().await?;
    Ok(())
}

/// `cancel` removes only what the move created or wrote. Here tenant acme is asked into
/// schema `globex` on the other cluster, where globex already lives: the move refuses the
/// non-empty table, and the cancel must leave globex's table and rows alone. The defect:
/// cancel dropped every table at the computed names, globex's included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_removes_only_what_the_move_created() -> Result<()> {
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    let ddl = "CREATE SCHEMA acme; CREATE SCHEMA globex;
         CREATE TABLE acme.orders (id bigserial PRIMARY KEY, note text);
         CREATE TABLE globex.orders (id bigserial PRIMARY KEY, note text);";
    src.psql(&format!(
        "{ddl}
         INSERT INTO acme.orders (note) SELECT 'n' || g FROM generate_series(1, 200) g;
         INSERT INTO globex.orders (note) SELECT 'g' || g FROM generate_series(1, 10) g;
         CREATE PUBLICATION sy_pub FOR TABLE acme.orders, globex.orders;
         GRANT USAGE ON SCHEMA acme, globex TO switchyard;
         GRANT SELECT ON ALL TABLES IN SCHEMA acme, globex TO switchyard;
         GRANT SELECT ON ALL SEQUENCES IN SCHEMA acme, globex TO switchyard;"
    ))?;
    prepare_target(&dst)?;
    // globex already lives on the other cluster, in a schema the switchyard role can write.
    dst.psql(&format!(
        "{ddl}
         INSERT INTO globex.orders (note) SELECT 'lives here ' || g FROM generate_series(1, 10) g;
         ALTER SCHEMA globex OWNER TO switchyard; ALTER TABLE globex.orders OWNER TO switchyard;"
    ))?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        Some(&dst),
        "[tenancy]\nmode = \"schema\"\n",
    )?;
    let config = load_config(&path)?;
    let s = src.client().await?;
    let d = dst.client().await?;
    let daemon = InProcess::start(config.clone(), true);
    registry_ready(&s).await?;
    let registry = Registry::new("switchyard")?;
    let id = request(&s, &registry, "acme", "shard2", "globex").await?;
    let err = wait_state(&s, id, "streaming", SYNC)
        .await
        .expect_err("the move must refuse a target that holds rows");
    ensure!(format!("{err:#}").contains("holds rows"), "{err:#}");
    let cancelled =
        switchyard::cutover::request::cancel_tenant(&config, &TenantId::new("acme")?).await?;
    ensure!(cancelled.tables_dropped.is_empty(), "{cancelled:?}");
    let rows: i64 = d
        .query_one(
            "SELECT count(*) FROM globex.orders WHERE note LIKE 'lives here %'",
            &[],
        )
        .await
        .context("globex's table is gone")?
        .get(0);
    assert_eq!(rows, 10, "globex's rows");
    // A move into a fresh schema, cancelled, leaves nothing behind.
    let id2 = request(&s, &registry, "globex", "shard2", "globex_new").await?;
    wait_state(&s, id2, "streaming", SYNC).await?;
    let cancelled =
        switchyard::cutover::request::cancel_tenant(&config, &TenantId::new("globex")?).await?;
    assert_eq!(
        cancelled.tables_dropped,
        vec!["globex_new.orders".to_string()]
    );
    let left: bool = d
        .query_one("SELECT to_regclass('globex_new.orders') IS NOT NULL", &[])
        .await?
        .get(0);
    ensure!(!left, "the created table stayed");
    daemon.stop().await?;
    Ok(())
}

/// A target that is down holds the slot's WAL for its tenants; past `wal_budget_mb` those
/// tenants fail with the reason and the slot moves on. The defect: the budget was measured
/// from the daemon's read position, which stops once `max_inflight_txns` transactions wait
/// for the target, so it never fired and the source kept WAL without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_fails_its_tenants_at_the_wal_budget() -> Result<()> {
    let src = PgCluster::start()?;
    let mut dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 100))?;
    prepare_target(&dst)?;
    let d = start(
        &src,
        Some(&dst),
        "[move]\nwal_budget_mb = 4\nmax_inflight_txns = 50\n",
    )
    .await?;
    let id = d.in_sync("1", "shard2", "t1").await?;
    let Running { s, daemon, .. } = d;
    dst.stop();
    // Tenant 1 goes on writing: ~12 MB of WAL in small transactions.
    for round in 0..300 {
        s.batch_execute(&format!(
            "INSERT INTO public.orders (tenant_id, id, note)
               SELECT 1, 1000000 + {round} * 100 + g, repeat('w', 400) FROM generate_series(1, 100) g"
        ))
        .await?;
    }
    let err = wait_for(
        "the move to fail on the WAL budget",
        Duration::from_secs(120),
        || async {
            let (state, err, _) = support::mover::state_of(&s, id).await?;
            Ok((state == "failed").then_some(err.unwrap_or_default()))
        },
    )
    .await?;
    ensure!(err.contains("wal_budget_mb"), "{err}");
    // Released: the slot confirms past everything written so far.
    support::mover::wait_drained(&s, Duration::from_secs(120)).await?;
    daemon.stop().await?;
    Ok(())
}

/// `max_txn_mb` bounds what one source transaction holds in the daemon, however many moving
/// tenants it touches: three tenants with ~0.5 MB each in one transaction, against a bound
/// of 1 MB, fail the tenant whose change crossed it. The defect: the bound was per tenant,
/// so a statement over N moving tenants held N times it (and an out-of-memory crash loops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transaction_bound_holds_across_the_tenants_of_a_transaction() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2, 3], 50))?;
    prepare_target(&src)?;
    let d = start(&src, None, "[move]\nmax_txn_mb = 1\n").await?;
    let mut ids = Vec::new();
    for t in ["1", "2", "3"] {
        ids.push(d.in_sync(t, "local", &format!("t{t}")).await?);
    }
    let Running { s, daemon, .. } = d;
    s.batch_execute(
        "INSERT INTO public.orders (tenant_id, id, note)
           SELECT t, 900000 + g, repeat(md5(g::text), 20) FROM generate_series(1, 3) t, generate_series(1, 800) g",
    )
    .await?;
    support::mover::wait_drained(&s, SYNC).await?;
    let mut failed = Vec::new();
    for id in &ids {
        let (state, err, _) = support::mover::state_of(&s, *id).await?;
        if state == "failed" {
            failed.push(err.unwrap_or_default());
        }
    }
    ensure!(
        !failed.is_empty(),
        "no tenant failed: the transaction was held whole"
    );
    ensure!(
        failed.iter().all(|e| e.contains("move.max_txn_mb")),
        "{failed:?}"
    );
    daemon.check_alive()?;
    daemon.stop().await?;
    Ok(())
}

/// The reverse-replication check under crashes: pgbench TPC-B on `synchronous_commit = off`
/// clusters while branch 1 moves to the other cluster with an automatic cutover, the real
/// daemon killed with SIGKILL at random moments (copy, sync, cutover) and restarted each
/// time. After the cutover the old location must follow the new one exactly (no replayed
/// move writes, nothing stale). `SWITCHYARD_SOAK_ITERATIONS` (default 2, the CI slice) sets
/// how many fresh runs; `SWITCHYARD_SOAK_SEED` replays one. As a soak command:
/// `SWITCHYARD_SOAK_ITERATIONS=50 scripts/test --test it safety::kill_loop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_loop_under_tpcb_keeps_both_locations_equal_after_the_cutover() -> Result<()> {
    let iterations: u64 = std::env::var("SWITCHYARD_SOAK_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("SWITCHYARD_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    for i in 0..iterations {
        let run_seed = seed.wrapping_add(i);
        eprintln!("kill loop {i}: SWITCHYARD_SOAK_SEED={run_seed}");
        kill_loop_once(run_seed)
            .await
            .with_context(|| format!("kill loop with SWITCHYARD_SOAK_SEED={run_seed}"))?;
    }
    Ok(())
}

/// A small deterministic generator (xorshift): the seed replays a run's kill times.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }
}

async fn kill_loop_once(seed: u64) -> Result<()> {
    let mut dice = Dice(seed);
    let src = async_commit_cluster()?;
    let dst = async_commit_cluster()?;
    tpcb::init(&src, 2)?;
    prepare_target(&dst)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(
        dir.path(),
        &src,
        Some(&dst),
        "[tenancy]\ntenant_column = \"bid\"\n\
         [move]\napply_lanes = 4\nchunk_rows = 2000\n\
         [cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\nretry_max_ms = 1000\nverify = false\n\
         [metrics]\nlisten = \"off\"\n",
    )?;
    let s = src.client().await?;
    let d = dst.client().await?;
    let log = dir.path().join("daemon.log");
    let mut daemon = support::mover::Process::start(&path, &log, true)?;
    registry_ready(&s).await?;
    let load = Load::start(src.port(), 300, 4, 900)?;
    let registry = Registry::new("switchyard")?;
    let id = registry
        .request_move(
            &s,
            &TenantId::new("1")?,
            &switchyard::tenant::TargetId::new("shard2")?,
            "b1",
            switchyard::registry::CutoverMode::Auto,
        )
        .await?;
    let kills = 3 + dice.below(3);
    for _ in 0..kills {
        let (state, _, _) = support::mover::state_of(&s, id).await?;
        if state == "cut_over" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300 + dice.below(4000))).await;
        daemon.kill9();
        daemon = support::mover::Process::start(&path, &log, false)?;
    }
    wait_state(&s, id, "cut_over", SYNC).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let errors = load.stop()?;
    let strange: Vec<&String> = errors
        .iter()
        .filter(|l| l.contains("ERROR") && !l.contains("has moved"))
        .collect();
    ensure!(
        strange.is_empty(),
        "pgbench errors other than SY001: {strange:?}"
    );
    old_location_follows(&s, &d, "b1").await?;
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        !text.contains("reverse replication failed"),
        "the reverse stream failed: {}",
        text.lines()
            .filter(|l| l.contains("reverse replication failed"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    daemon.terminate()?;
    Ok(())
}

/// A table of the tenant that appears after its move started (here a new shared table with
/// the tenant column, added to the publication) pauses the move within a registry poll, with
/// the table named; no cutover flips without it. Copied again, the move includes and fences
/// it. The defect: the table list was read once, the new table was neither copied nor fenced,
/// the cutover flipped anyway and the old location kept taking the tenant's writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_appears_mid_move_pauses_it_until_it_is_copied_too() -> Result<()> {
    let src = PgCluster::start()?;
    fenceable(&src, &[1, 2], 100)?;
    let d = start(
        &src,
        None,
        "[cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\n",
    )
    .await?;
    let id = d.in_sync("1", "local", "t1").await?;
    let s = &d.s;
    s.batch_execute(
        "CREATE TABLE public.notes (tenant_id int NOT NULL, id int NOT NULL, body text,
           PRIMARY KEY (tenant_id, id));
         INSERT INTO public.notes SELECT t, g, 'note' FROM generate_series(1, 2) t, generate_series(1, 20) g;
         ALTER TABLE public.notes OWNER TO app_owner;
         GRANT SELECT ON public.notes TO switchyard;
         ALTER PUBLICATION sy_pub ADD TABLE public.notes;",
    )
    .await?;
    let err = wait_for("the move to pause", Duration::from_secs(30), || async {
        let (state, err, _) = support::mover::state_of(s, id).await?;
        Ok((state == "paused").then_some(err.unwrap_or_default()))
    })
    .await?;
    ensure!(err.contains("\"public\".\"notes\""), "{err}");
    let route: Option<String> = s
        .query_opt(
            "SELECT location FROM switchyard.routes WHERE tenant = '1'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    ensure!(route.is_none(), "flipped without the new table: {route:?}");
    // The fix the error names: copy the tenant again, now with the table.
    s.execute(
        "UPDATE switchyard.moves SET state = 'provisioning' WHERE id = $1",
        &[&id],
    )
    .await?;
    wait_state(s, id, "streaming", SYNC).await?;
    let tables: Vec<String> = s
        .query_one("SELECT tables FROM switchyard.moves WHERE id = $1", &[&id])
        .await?
        .get(0);
    ensure!(
        tables.contains(&"\"public\".\"notes\"".to_string()),
        "{tables:?}"
    );
    d.cut_over("1").await?;
    let n: i64 = s
        .query_one("SELECT count(*) FROM t1.notes", &[])
        .await?
        .get(0);
    assert_eq!(n, 20);
    let refused = s
        .batch_execute("UPDATE public.notes SET body = 'stale' WHERE tenant_id = 1 AND id = 1")
        .await
        .expect_err("the new table is fenced too");
    assert_eq!(refused.code().map(|c| c.code()), Some("SY001"));
    d.daemon.stop().await?;
    Ok(())
}

/// A server that asks for the password in clear text (pg_hba `password`) over a connection
/// without TLS gets no password from any of switchyard's connections, SQL or replication,
/// unless `allow_cleartext_password` says so. The defect: `sslmode=prefer` (or `disable`)
/// fell back to plain text and sent the password as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_sends_a_cleartext_password_without_tls_unless_allowed() -> Result<()> {
    let src = PgCluster::start()?;
    let hba = src.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba)?;
    std::fs::write(
        &hba,
        format!(
            "host all switchyard 127.0.0.1/32 password\n\
             host replication switchyard 127.0.0.1/32 password\n{old}"
        ),
    )?;
    src.psql("SELECT pg_reload_conf()")?;
    let dir = tempfile::tempdir()?;
    for (mode, allowed) in [("disable", false), ("prefer", false), ("disable", true)] {
        let path = write_config(dir.path(), &src, None, "")?;
        // Refused by default: the setting is written only where it allows.
        let allow = if allowed {
            "\nallow_cleartext_password = true"
        } else {
            ""
        };
        let text = std::fs::read_to_string(&path)?.replace(
            "sslmode = \"disable\"",
            &format!("sslmode = \"{mode}\"{allow}"),
        );
        std::fs::write(&path, text)?;
        let mut config = load_config(&path)?;
        config.source.password = Some(switchyard::cluster::Secret::new(src.password()));
        let sql = config.source.connect_sql().await;
        let replication =
            switchyard::source::ReplicationConnection::connect(&config.source, 1 << 20).await;
        if allowed {
            sql.context("allowed explicitly: the SQL session connects")?;
            replication.map_err(|e| anyhow::anyhow!("{e}"))?;
        } else {
            let e = sql.err().context("the SQL session must be refused")?;
            ensure!(e.to_string().contains("clear text"), "{mode}: {e}");
            let e = replication
                .err()
                .context("the replication connection must be refused")?;
            ensure!(e.to_string().contains("clear text"), "{mode}: {e}");
        }
    }
    Ok(())
}

/// `tail --ack` on the daemon's slot while tenants move through it would confirm changes
/// their targets never received: refused with the reason. (Without `--ack` it only reads.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_does_not_confirm_on_the_slot_of_moving_tenants() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 50))?;
    prepare_target(&src)?;
    let d = start(&src, None, "[metrics]\nlisten = \"off\"\n").await?;
    d.in_sync("1", "local", "t1").await?;
    // Stopped, the daemon no longer holds the slot: this is when an operator reaches for
    // `tail --ack` on it. Changes written now are the moving tenant's to apply later.
    let Running {
        s,
        daemon,
        path,
        _dir,
        ..
    } = d;
    daemon.stop().await?;
    s.batch_execute("UPDATE public.orders SET note = 'while stopped' WHERE tenant_id = 1")
        .await?;
    let confirmed = || async {
        let lsn: String = s
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'sy'",
                &[],
            )
            .await?
            .get(0);
        anyhow::Ok(lsn)
    };
    let before = confirmed().await?;
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&path)
        .args(["tail", "--ack"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = tail.stderr.take().context("stderr")?;
    let ended = tokio::time::timeout(Duration::from_secs(30), tail.wait()).await;
    let mut text = String::new();
    if ended.is_err() {
        tail.kill().await?;
    }
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await?;
    let after = confirmed().await?;
    ensure!(
        ended.is_ok(),
        "tail --ack ran on the slot of a moving tenant (confirmed {before} -> {after}): {text}"
    );
    ensure!(!ended??.success(), "tail --ack succeeded: {text}");
    ensure!(text.contains("tenants 1 are moving"), "{text}");
    ensure!(
        after == before,
        "the slot was confirmed from {before} to {after} past the moving tenant's changes"
    );
    Ok(())
}
