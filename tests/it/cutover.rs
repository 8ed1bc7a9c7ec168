//! Cutover end to end on real clusters: verification, the fenced flip with writers of the
//! moving tenant and of other tenants running, refused stale writes, an attempt aborted by
//! a transaction that holds the tenant's fence, attempts aborted by locks at the target
//! and on the routes, sequences, and cleanup.

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use support::mover::{
    assert_parity, digest, fence_grants, prepare_target, request, shared_schema,
    start_daemon as start, state_of, wait_drained, wait_state, InProcess, Running,
};
use support::{wait_for, wait_for_row, PgCluster};
use switchyard::tenant::TenantId;
use tokio_postgres::Client;

const SYNC: Duration = Duration::from_secs(180);

/// Writes one tenant's rows in small transactions until stopped or, with
/// `stop_when_refused`, until the source refuses them. Keeps the longest transaction time.
struct TenantWriter {
    stop: Arc<AtomicBool>,
    max_micros: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<Result<(i64, Option<String>)>>,
}

impl TenantWriter {
    fn start(client: Client, tenant: i32, stop_when_refused: bool) -> TenantWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let max_micros = Arc::new(AtomicI64::new(0));
        let (s, m) = (stop.clone(), max_micros.clone());
        let task = tokio::spawn(async move {
            let mut i: i64 = 0;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let sql = format!(
                    "BEGIN;
                     INSERT INTO public.orders (tenant_id, id, note, amount) VALUES ({tenant}, {new}, 'w{i}', 1);
                     UPDATE public.orders SET note = 'u{i}' WHERE tenant_id = {tenant} AND id = {upd};
                     COMMIT;",
                    new = 500_000 + i,
                    upd = (i * 7919) % 1000 + 1,
                );
                let t = Instant::now();
                match client.batch_execute(&sql).await {
                    Ok(()) => {}
                    Err(e) => {
                        let code = e.code().map(|c| c.code().to_owned());
                        let _ = client.batch_execute("ROLLBACK").await;
                        if stop_when_refused {
                            let msg = e.as_db_error().map(|d| d.message().to_owned());
                            return Ok((
                                i - 1,
                                code.map(|c| format!("{c}: {}", msg.unwrap_or_default())),
                            ));
                        }
                        bail!("write of tenant {tenant} failed: {e:?}");
                    }
                }
                m.fetch_max(t.elapsed().as_micros() as i64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok((i, None))
        });
        TenantWriter {
            stop,
            max_micros,
            task,
        }
    }

    async fn stop(self) -> Result<(i64, Option<String>, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        let (n, refused) = self.task.await??;
        Ok((
            n,
            refused,
            Duration::from_micros(self.max_micros.load(Ordering::Relaxed) as u64),
        ))
    }

    fn finished(&self) -> bool {
        self.task.is_finished()
    }
}

async fn route(s: &Client, tenant: &str) -> Result<Option<(String, String, i64)>> {
    Ok(s.query_opt(
        "SELECT location, schema_name, version FROM switchyard.routes WHERE tenant = $1",
        &[&tenant],
    )
    .await?
    .map(|r| (r.get(0), r.get(1), r.get(2))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cuts_over_to_another_cluster_under_writes_and_its_old_rows_are_cleaned_up(
) -> Result<()> {
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2, 3], 1000))?;
    fence_grants(&src)?;
    // Cleanup deletes the tenant's old rows.
    src.psql("GRANT DELETE ON ALL TABLES IN SCHEMA public TO switchyard;")?;
    prepare_target(&dst)?;
    let Running {
        config,
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(
        &src,
        Some(&dst),
        "[move]\nchunk_rows = 300\n[cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\n\
         retention_hours = 0\nauto_cleanup = false\n",
    )
    .await?;
    let d = dst.client().await?;

    let moving = TenantWriter::start(src.client().await?, 1, true);
    let others = [
        TenantWriter::start(src.client().await?, 2, false),
        TenantWriter::start(src.client().await?, 3, false),
    ];
    let id = request(&s, &registry, "1", "shard2", "t1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;

    // Verification while the writers run converges (different chunks are looked at again
    // once the slot passed them).
    let tenant = TenantId::new("1")?;
    let report = switchyard::cutover::request::verify_tenant(&config, &tenant).await?;
    ensure!(report.ok, "verify before the cutover: {}", report.summary());
    ensure!(report.tables.len() == 3, "{:?}", report.tables);

    let attempts = cut_over(&config, &tenant).await?;
    let last = attempts.last().context("no attempt recorded")?;
    assert_eq!(last.result, "cut_over");
    let pause = last.pause_ms.context("no pause recorded")?;
    assert!(pause > 0.0 && pause <= 1500.0, "pause {pause} ms");

    // The moving tenant's writer was refused at the old location, with the documented error.
    wait_for(
        "the old location to refuse the tenant",
        Duration::from_secs(30),
        || async { Ok(moving.finished().then_some(())) },
    )
    .await?;
    let (written, refused, _) = moving.stop().await?;
    let refused = refused.context("the tenant's writer was never refused")?;
    assert!(
        refused.starts_with("SY001: tenant 1 has moved to shard2"),
        "{refused}"
    );
    assert!(
        written > 10,
        "the tenant was written during the move ({written})"
    );
    // Other tenants kept writing through the cutover.
    let mut slowest = Duration::ZERO;
    for w in others {
        let (n, refused, max) = w.stop().await?;
        assert!(refused.is_none() && n > 10, "{n} {refused:?}");
        slowest = slowest.max(max);
    }
    eprintln!("cutover pause {pause:.1} ms; slowest transaction of another tenant {slowest:?}");

    // Nothing lost: every write the source accepted for the tenant is at the target.
    wait_drained(&s, Duration::from_secs(60)).await?;
    assert_parity(&s, &d, 1, "t1").await?;
    assert_eq!(
        route(&s, "1").await?,
        Some(("shard2".into(), "t1".into(), 1))
    );
    let stale = s
        .batch_execute("DELETE FROM public.orders WHERE tenant_id = 1 AND id = 5")
        .await
        .expect_err("a stale delete must be refused");
    let db = stale.as_db_error().context("a server error")?;
    assert_eq!(db.code().code(), "SY001");
    assert!(db.hint().unwrap_or_default().contains("switchyard.routes"));
    s.batch_execute("INSERT INTO public.orders (tenant_id, id, note) VALUES (2, 9999999, 'x')")
        .await
        .context("other tenants still write")?;

    // Cleanup: exactly the tenant's rows leave the old location; the fence stays.
    let before_2 = digest(&s, "public.orders", "WHERE tenant_id = 2").await?;
    let cleaned = switchyard::cutover::request::cleanup_tenant(&config, &tenant).await?;
    assert!(cleaned.rows_deleted > 3000, "{cleaned:?}");
    for table in ["orders", "items", "events"] {
        let left: i64 = s
            .query_one(
                &format!("SELECT count(*) FROM public.{table} WHERE tenant_id = 1"),
                &[],
            )
            .await?
            .get(0);
        assert_eq!(left, 0, "{table}");
    }
    assert_eq!(
        digest(&s, "public.orders", "WHERE tenant_id = 2").await?,
        before_2
    );
    assert_eq!(state_of(&s, id).await?.0, "cleaned");
    let err = s
        .batch_execute("INSERT INTO public.orders (tenant_id, id) VALUES (1, 1)")
        .await
        .expect_err("the fence outlives the cleanup");
    assert_eq!(err.code().map(|c| c.code()), Some("SY001"));
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_that_cannot_take_the_fence_in_time_aborts_and_retries() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 500))?;
    fence_grants(&src)?;
    prepare_target(&src)?;
    let Running {
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(
        &src,
        None,
        "[cutover]\npause_budget_ms = 300\nretry_initial_ms = 300\nretry_max_ms = 600\n\
         old_transaction_wait_ms = 500\nrollback = false\n",
    )
    .await?;
    let id = request(&s, &registry, "2", "local", "two").await?;
    wait_state(&s, id, "streaming", SYNC).await?;

    // Arm the fence the way an attempt does, then hold it from a long transaction that
    // wrote the tenant (as an application transaction would).
    let tenant = TenantId::new("2")?;
    let mut c = src.client().await?;
    let table = switchyard::sql::QualifiedName::new("public", "orders")?;
    switchyard::cutover::fence::install(
        &mut c,
        "switchyard",
        &table,
        &switchyard::cutover::fence::TenantOf::Column("tenant_id".into()),
        Duration::from_secs(1),
        Duration::from_secs(10),
    )
    .await?;
    switchyard::cutover::fence::arm(&c, "switchyard", &tenant).await?;
    let long = src.client().await?;
    long.batch_execute(
        "BEGIN; UPDATE public.orders SET note = 'held' WHERE tenant_id = 2 AND id = 1",
    )
    .await?;

    s.execute(
        "UPDATE switchyard.moves SET cutover_requested = true WHERE id = $1",
        &[&id],
    )
    .await?;
    wait_for_row(
        &s,
        "an aborted attempt",
        Duration::from_secs(60),
        "SELECT 1 FROM switchyard.cutover_attempts WHERE move_id = $1 AND result = 'aborted' AND step = 'fence'",
        &[&id],
    )
    .await?;
    // Aborted: the tenant is writable again (another session writes it) and streaming.
    let w = src.client().await?;
    tokio::time::timeout(
        Duration::from_secs(5),
        w.batch_execute(
            "UPDATE public.orders SET note = 'meanwhile' WHERE tenant_id = 2 AND id = 2",
        ),
    )
    .await
    .context("the tenant stayed fenced after the abort")??;
    let (state, error, _) = state_of(&s, id).await?;
    ensure!(
        matches!(state.as_str(), "streaming" | "cutting_over"),
        "state {state} ({error:?})"
    );

    // Once the long transaction ends, a later attempt gets the fence and cuts over.
    long.batch_execute("COMMIT").await?;
    wait_state(&s, id, "cut_over", Duration::from_secs(60)).await?;
    // The attempt is recorded after the flip commits (the state says cut_over first).
    wait_for_row(
        &s,
        "the successful attempt's record",
        Duration::from_secs(10),
        "SELECT 1 FROM switchyard.cutover_attempts WHERE move_id = $1 AND result = 'cut_over'",
        &[&id],
    )
    .await?;
    let attempts = registry.attempts(&s, id).await?;
    assert!(attempts.len() >= 2, "{attempts:?}");
    assert_eq!(attempts.last().map(|a| a.result.as_str()), Some("cut_over"));
    wait_drained(&s, Duration::from_secs(60)).await?;
    // Both the held transaction's write and the one made meanwhile reached the target.
    assert_parity(&s, &s, 2, "two").await?;
    let notes: Vec<String> = s
        .query(
            "SELECT note FROM two.orders WHERE id IN (1, 2) ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(notes, ["held", "meanwhile"]);
    daemon.stop().await?;
    Ok(())
}

/// Locks held by other sessions at each step of a cutover: a target table locked while
/// the attempt verifies (the verification waits at most `old_transaction_wait`), the same
/// lock while the fenced attempt waits for the target to catch up, and the routes table
/// locked at the source when the flip is written. Each attempt aborts at its step (the
/// fenced ones within the pause budget), the tenant's writer goes on, and once the locks
/// go the cutover completes with every write at the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutovers_blocked_by_locks_abort_at_their_step_within_the_budget() -> Result<()> {
    const BUDGET_MS: f64 = 400.0;
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 500))?;
    fence_grants(&src)?;
    prepare_target(&dst)?;
    let Running {
        config,
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(
        &src,
        Some(&dst),
        // Attempts start however slowly the locked target applies, so that one meets the
        // lock inside its pause.
        "[cutover]\npause_budget_ms = 400\nretry_initial_ms = 300\nretry_max_ms = 600\n\
         old_transaction_wait_ms = 500\nrollback = false\nmax_apply_delay_ms = 600000\n",
    )
    .await?;
    let d = dst.client().await?;
    let id = request(&s, &registry, "2", "shard2", "two").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    let writer = TenantWriter::start(src.client().await?, 2, true);
    let ask = |on: bool| {
        let s = &s;
        async move {
            s.execute(
                "UPDATE switchyard.moves SET cutover_requested = $2 WHERE id = $1",
                &[&id, &on],
            )
            .await
        }
    };
    let aborted_at = |step: &'static str| {
        let (s, registry) = (&s, &registry);
        async move {
            wait_for(
                &format!("an attempt aborted at {step}"),
                Duration::from_secs(60),
                || async {
                    let attempts = registry.attempts(s, id).await?;
                    ensure!(
                        attempts.iter().all(|a| a.result != "cut_over"),
                        "cut over despite the lock: {attempts:?}"
                    );
                    Ok(attempts
                        .into_iter()
                        .find(|a| a.result == "aborted" && a.step.as_deref() == Some(step)))
                },
            )
            .await
        }
    };

    // 1. The target's table is locked: the verification cannot read it.
    let target_lock = dst.client().await?;
    let lock = "BEGIN; LOCK TABLE two.orders IN ACCESS EXCLUSIVE MODE";
    target_lock.batch_execute(lock).await?;
    ask(true).await?;
    let verify = aborted_at("verify").await?;
    assert!(
        verify
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("55P03"),
        "{verify:?}"
    );
    // Withdrawn while the lock goes; verified by hand, so later attempts skip it.
    ask(false).await?;
    wait_for("no attempt running", Duration::from_secs(30), || async {
        Ok((state_of(&s, id).await?.0 == "streaming").then_some(()))
    })
    .await?;
    target_lock.batch_execute("COMMIT").await?;
    let report = switchyard::cutover::request::verify_tenant(&config, &TenantId::new("2")?).await?;
    ensure!(report.ok, "verify: {}", report.summary());

    // 2. Locked again: the fenced attempt's catch-up cannot finish (the apply waits).
    target_lock.batch_execute(lock).await?;
    ask(true).await?;
    let catch_up = aborted_at("catch_up").await?;

    // 3. The routes are locked at the source: the catch-up works, the flip cannot.
    let routes_lock = src.client().await?;
    routes_lock
        .batch_execute("BEGIN; LOCK TABLE switchyard.routes IN SHARE MODE")
        .await?;
    target_lock.batch_execute("COMMIT").await?;
    let flip = aborted_at("flip").await?;
    for a in [&catch_up, &flip] {
        let pause = a.pause_ms.context("an aborted attempt records its pause")?;
        // Bounded by the budget (with room for a loaded machine), not by the lock.
        assert!(pause < 2.0 * BUDGET_MS, "{a:?}");
    }
    // The fence's lock_timeout or the attempt's statement_timeout, whichever ends first.
    let detail = flip.detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("flipping the route")
            && (detail.contains("55P03") || detail.contains("57014")),
        "{flip:?}"
    );
    assert!(
        !writer.finished(),
        "the writer was refused while attempts aborted"
    );

    routes_lock.batch_execute("COMMIT").await?;
    wait_state(&s, id, "cut_over", Duration::from_secs(60)).await?;
    wait_for(
        "the writer to be refused",
        Duration::from_secs(30),
        || async { Ok(writer.finished().then_some(())) },
    )
    .await?;
    let (writes, refused, _) = writer.stop().await?;
    assert!(writes > 20, "{writes} writes");
    assert_eq!(
        refused.as_deref().map(|r| &r[..5]),
        Some("SY001"),
        "the old location refuses the tenant after the cutover"
    );
    wait_drained(&s, SYNC).await?;
    daemon.stop().await?;
    assert_parity(&s, &d, 2, "two").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_per_tenant_cuts_over_with_its_sequences_and_its_schema_is_dropped() -> Result<()>
{
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    src.psql(
        "CREATE SCHEMA acme; CREATE SCHEMA globex;
         CREATE TABLE acme.orders (id bigserial PRIMARY KEY, note text);
         CREATE TABLE globex.orders (id bigserial PRIMARY KEY, note text);
         INSERT INTO acme.orders (note) SELECT 'n' || g FROM generate_series(1, 2000) g;
         INSERT INTO globex.orders (note) SELECT 'g' || g FROM generate_series(1, 10) g;
         CREATE PUBLICATION sy_pub FOR TABLE acme.orders, globex.orders;
         GRANT USAGE ON SCHEMA acme, globex TO switchyard;
         GRANT SELECT ON ALL TABLES IN SCHEMA acme, globex TO switchyard;
         GRANT SELECT ON ALL SEQUENCES IN SCHEMA acme, globex TO switchyard;
         GRANT TRIGGER ON ALL TABLES IN SCHEMA acme, globex TO switchyard;
         GRANT pg_read_all_stats TO switchyard;
         ALTER SCHEMA acme OWNER TO switchyard; ALTER TABLE acme.orders OWNER TO switchyard;",
    )?;
    prepare_target(&dst)?;
    let Running {
        config,
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(
        &src,
        Some(&dst),
        "[tenancy]\nmode = \"schema\"\n[cutover]\npause_budget_ms = 1500\nretention_hours = 1\n",
    )
    .await?;
    let d = dst.client().await?;
    let id = request(&s, &registry, "acme", "shard2", "acme").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    // More rows from the source's sequence while streaming.
    s.batch_execute("INSERT INTO acme.orders (note) SELECT 'late' FROM generate_series(1, 25)")
        .await?;
    let tenant = TenantId::new("acme")?;
    let (mv, attempts) =
        switchyard::cutover::request::cutover_tenant(&config, &tenant, Duration::from_secs(120))
            .await?;
    ensure!(mv.state.as_str() == "cut_over", "{mv:?} {attempts:?}");
    assert_eq!(
        digest(&s, "acme.orders", "").await?,
        digest(&d, "acme.orders", "").await?
    );
    // The application's next insert at the target gets an id past every source id.
    let next: i64 = d
        .query_one(
            "INSERT INTO acme.orders (note) VALUES ('after') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    assert!(next > 2025, "target sequence at {next}");
    let err = s
        .batch_execute("INSERT INTO acme.orders (note) VALUES ('stale')")
        .await
        .expect_err("stale write refused");
    assert_eq!(err.code().map(|c| c.code()), Some("SY001"));
    // Nothing is removed inside the retention window; an operator shortening it lets the
    // daemon clean up on its own, dropping the old schema.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(state_of(&s, mv.id).await?.0, "cut_over");
    s.execute(
        "UPDATE switchyard.moves SET cleanup_after = now() WHERE id = $1",
        &[&mv.id],
    )
    .await?;
    wait_state(&s, mv.id, "cleaned", Duration::from_secs(60)).await?;
    wait_for("the old schema to go", Duration::from_secs(30), || async {
        Ok(
            s.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'acme'", &[])
                .await?
                .is_none()
                .then_some(()),
        )
    })
    .await?;
    assert_eq!(digest(&s, "globex.orders", "").await?.0, 10);
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_move_removes_what_it_wrote_at_the_target_and_leaves_the_source() -> Result<()>
{
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 400))?;
    fence_grants(&src)?;
    prepare_target(&dst)?;
    let Running {
        config,
        path,
        s,
        daemon,
        registry,
        _dir,
    } = start(&src, Some(&dst), "").await?;
    let d = dst.client().await?;
    let id = request(&s, &registry, "1", "shard2", "one").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    let before = digest(&s, "public.orders", "").await?;

    // `switchyard status` shows the move in sync, as JSON for tools and as a table.
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let out = std::process::Command::new(bin)
        .args(["--config", &path.display().to_string(), "status", "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let row = &rows[0];
    assert_eq!(row["tenant"], "1");
    assert_eq!(row["state"], "streaming");
    assert_eq!(row["rows_copied"], row["rows_total"], "{row}");
    assert!(row["lag_bytes"].is_i64(), "{row}");
    let out = std::process::Command::new(bin)
        .args(["--config", &path.display().to_string(), "status"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("shard2.one") && text.contains("streaming"),
        "{text}"
    );

    let tenant = TenantId::new("1")?;
    let c = switchyard::cutover::request::cancel_tenant(&config, &tenant).await?;
    assert_eq!(c.tables_dropped.len(), 3, "{c:?}");
    assert_eq!(c.schema_dropped.as_deref(), Some("one"));
    assert_eq!(state_of(&s, id).await?.0, "cancelled");
    assert!(d
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'one'", &[])
        .await?
        .is_none());
    let progress: i64 = d
        .query_one(
            "SELECT count(*) FROM switchyard.applied WHERE tenant = '1'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(progress, 0);
    // The source is untouched and still writable for the tenant.
    assert_eq!(digest(&s, "public.orders", "").await?, before);
    s.batch_execute(
        "UPDATE public.orders SET note = 'after cancel' WHERE tenant_id = 1 AND id = 1",
    )
    .await?;
    // The tenant may move again.
    let again = request(&s, &registry, "1", "shard2", "one").await?;
    wait_state(&s, again, "streaming", SYNC).await?;
    wait_drained(&s, Duration::from_secs(60)).await?;
    assert_parity(&s, &d, 1, "one").await?;
    daemon.stop().await?;
    Ok(())
}

/// What the reverse apply needs at the source: it writes the tenant's rows back (as the
/// replica role, like an apply).
fn rollback_grants(src: &PgCluster) -> Result<()> {
    src.psql(
        "GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO switchyard;
         GRANT SET ON PARAMETER session_replication_role TO switchyard;",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_brings_writes_made_after_the_cutover_back_to_the_old_location() -> Result<()> {
    rollback_case(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_from_a_schema_of_the_same_cluster() -> Result<()> {
    rollback_case(true).await
}

/// Cut over tenants 1 and 2 (to another cluster, or to schemas of the source cluster), write
/// them at their new place, roll tenant 1 back, and check that the old place has every
/// write; the two share one reverse slot, which serves tenant 2 on after tenant 1's
/// rollback and goes with tenant 2's.
async fn rollback_case(same_cluster: bool) -> Result<()> {
    let src = PgCluster::start()?;
    let other = PgCluster::start()?;
    let dst = if same_cluster { &src } else { &other };
    src.psql(&shared_schema(&[1, 2], 500))?;
    fence_grants(&src)?;
    rollback_grants(&src)?;
    prepare_target(dst)?;
    let Running {
        config,
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(
        &src,
        Some(&other),
        "[cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\n",
    )
    .await?;
    let d = dst.client().await?;
    let target = if same_cluster { "local" } else { "shard2" };
    let reverse_slots = || async {
        let n: i64 = d
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'switchyard\\_rev\\_%'",
                &[],
            )
            .await?
            .get(0);
        anyhow::Ok(n)
    };
    let mut slots = Vec::new();
    for (tenant, schema) in [("1", "t1"), ("2", "t2")] {
        let id = request(&s, &registry, tenant, target, schema).await?;
        wait_state(&s, id, "streaming", SYNC).await?;
        let (mv, attempts) = switchyard::cutover::request::cutover_tenant(
            &config,
            &TenantId::new(tenant)?,
            Duration::from_secs(120),
        )
        .await?;
        ensure!(mv.state.as_str() == "cut_over", "{mv:?} {attempts:?}");
        slots.push(mv.reverse_slot.clone());
    }
    ensure!(slots[0].is_some() && slots[0] == slots[1], "{slots:?}");
    assert_eq!(reverse_slots().await?, 1, "one reverse slot for the target");

    // The application now writes both tenants at their new place.
    d.batch_execute(
        "INSERT INTO t1.orders (tenant_id, id, note) VALUES (1, 900001, 'after cutover');
         UPDATE t1.orders SET note = 'changed at the target' WHERE tenant_id = 1 AND id = 7;
         DELETE FROM t1.orders WHERE tenant_id = 1 AND id = 8;
         UPDATE t1.events SET payload = '{\"moved\": true}' WHERE tenant_id = 1 AND id = 'e3';
         BEGIN;
         UPDATE t2.orders SET note = 'two at the target' WHERE tenant_id = 2 AND id = 5;
         UPDATE t1.orders SET note = 'one in the same transaction' WHERE tenant_id = 1 AND id = 9;
         COMMIT;",
    )
    .await?;
    let tenant = TenantId::new("1")?;
    let (mv, attempts) =
        switchyard::cutover::request::rollback_tenant(&config, &tenant, Duration::from_secs(120))
            .await?;
    ensure!(mv.state.as_str() == "rolled_back", "{mv:?} {attempts:?}");
    // Every write made at the target after the cutover is at the old location.
    for table in ["orders", "items", "events"] {
        assert_eq!(
            digest(&s, &format!("public.{table}"), "WHERE tenant_id = 1").await?,
            digest(&d, &format!("t1.{table}"), "").await?,
            "{table}"
        );
    }
    let note: String = s
        .query_one(
            "SELECT note FROM public.orders WHERE tenant_id = 1 AND id = 7",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(note, "changed at the target");
    assert_eq!(
        route(&s, "1").await?,
        Some(("source".into(), "public".into(), 2))
    );
    // The source takes the tenant's writes again; the target refuses them.
    s.batch_execute("UPDATE public.orders SET note = 'home again' WHERE tenant_id = 1 AND id = 9")
        .await
        .context("the source must take the tenant's writes after the rollback")?;
    let err = d
        .batch_execute("UPDATE t1.orders SET note = 'stale' WHERE tenant_id = 1 AND id = 9")
        .await
        .expect_err("the target must refuse the tenant after the rollback");
    assert_eq!(err.code().map(|c| c.code()), Some("SY001"));
    // The refusal names the route version the application must re-read.
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("route version 2)")),
        "{message:?}"
    );

    // Tenant 2 is still at the target: its writes keep reaching the old location through
    // the same slot, which stays.
    d.batch_execute(
        "INSERT INTO t2.orders (tenant_id, id, note) VALUES (2, 900002, 'after the other rollback')",
    )
    .await?;
    wait_for(
        "tenant 2's write at the old location",
        Duration::from_secs(30),
        || async {
            let n: i64 = s
                .query_one(
                    "SELECT count(*) FROM public.orders WHERE tenant_id = 2 AND id = 900002",
                    &[],
                )
                .await?
                .get(0);
            Ok((n == 1).then_some(()))
        },
    )
    .await?;
    assert_eq!(reverse_slots().await?, 1, "the slot serves tenant 2 on");
    let (mv, attempts) = switchyard::cutover::request::rollback_tenant(
        &config,
        &TenantId::new("2")?,
        Duration::from_secs(120),
    )
    .await?;
    ensure!(mv.state.as_str() == "rolled_back", "{mv:?} {attempts:?}");
    for table in ["orders", "items", "events"] {
        assert_eq!(
            digest(&s, &format!("public.{table}"), "WHERE tenant_id = 2").await?,
            digest(&d, &format!("t2.{table}"), "").await?,
            "{table}"
        );
    }
    // The last tenant took the slot with it, so the target keeps no WAL for it.
    wait_for(
        "the reverse slot to go",
        Duration::from_secs(30),
        || async { Ok((reverse_slots().await? == 0).then_some(())) },
    )
    .await?;
    daemon.stop().await?;
    Ok(())
}

/// How many of switchyard's fence triggers `table` has.
async fn fence_triggers(c: &Client, table: &str) -> Result<i64> {
    Ok(c.query_one(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname LIKE 'switchyard%'",
        &[&table],
    )
    .await?
    .get(0))
}

/// Until a rollback the new location pays nothing for its fence (no trigger on the
/// tenant's tables there); the rollback installs it under an application writing the
/// tenant at the new location, in transactions that stay open across a gap, and every
/// write that committed there reaches the old location before the target refuses the
/// tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_under_writes_at_the_new_location_fences_it_and_loses_none() -> Result<()> {
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 300))?;
    fence_grants(&src)?;
    rollback_grants(&src)?;
    prepare_target(&dst)?;
    let Running {
        config,
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(
        &src,
        Some(&dst),
        "[cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\n",
    )
    .await?;
    let d = dst.client().await?;
    let id = request(&s, &registry, "1", "shard2", "t1").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    let tenant = TenantId::new("1")?;
    let (mv, attempts) =
        switchyard::cutover::request::cutover_tenant(&config, &tenant, Duration::from_secs(120))
            .await?;
    ensure!(mv.state.as_str() == "cut_over", "{mv:?} {attempts:?}");
    for table in ["t1.orders", "t1.items", "t1.events"] {
        assert_eq!(
            fence_triggers(&d, table).await?,
            0,
            "{table} before a rollback"
        );
    }

    // The application at the new location: each transaction inserts a row, waits with the
    // table locked for writes, updates another row and commits, until the target refuses.
    let w = dst.client().await?;
    let committed = Arc::new(AtomicI64::new(0));
    let n = committed.clone();
    let writer = tokio::spawn(async move {
        let mut i: i64 = 0;
        loop {
            i += 1;
            let first = format!(
                "BEGIN; INSERT INTO t1.orders (tenant_id, id, note, amount) VALUES (1, {}, 'r{i}', 1)",
                700_000 + i
            );
            let second = format!(
                "UPDATE t1.orders SET note = 'r{i}' WHERE tenant_id = 1 AND id = {}; COMMIT",
                i % 300 + 1
            );
            let wrote = match w.batch_execute(&first).await {
                Ok(()) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    w.batch_execute(&second).await
                }
                Err(e) => Err(e),
            };
            match wrote {
                Ok(()) => {
                    n.store(i, Ordering::SeqCst);
                }
                Err(e) => {
                    let _ = w.batch_execute("ROLLBACK").await;
                    return Ok::<_, anyhow::Error>((i - 1, e.code().map(|c| c.code().to_owned())));
                }
            }
        }
    });
    wait_for(
        "writes at the new location",
        Duration::from_secs(30),
        || async { Ok((committed.load(Ordering::SeqCst) >= 20).then_some(())) },
    )
    .await?;
    let (mv, attempts) =
        switchyard::cutover::request::rollback_tenant(&config, &tenant, Duration::from_secs(120))
            .await?;
    ensure!(mv.state.as_str() == "rolled_back", "{mv:?} {attempts:?}");
    let (written, refused) = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .context("the writer must be refused at the new location after the rollback")???;
    assert_eq!(refused.as_deref(), Some("SY001"), "refused, not failed");
    assert!(written >= 20, "{written} transactions");
    for table in ["t1.orders", "t1.items", "t1.events"] {
        assert!(
            fence_triggers(&d, table).await? > 0,
            "{table} after the rollback"
        );
    }
    // Every transaction that committed at the new location is at the old one, and no other.
    let back: i64 = s
        .query_one(
            "SELECT count(*) FROM public.orders WHERE tenant_id = 1 AND id > 700000",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(back, written);
    for table in ["orders", "items", "events"] {
        assert_eq!(
            digest(&s, &format!("public.{table}"), "WHERE tenant_id = 1").await?,
            digest(&d, &format!("t1.{table}"), "").await?,
            "{table}"
        );
    }
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_interrupted_by_a_crash_is_reset_and_the_cutover_completes() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 300))?;
    fence_grants(&src)?;
    prepare_target(&src)?;
    let Running {
        config,
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(&src, None, "[cutover]\nrollback = false\n").await?;
    let id = request(&s, &registry, "2", "local", "two").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    daemon.stop().await?;
    // What a daemon killed inside an attempt leaves: the move says cutting_over, its fence
    // transaction died with its connection.
    s.execute(
        "UPDATE switchyard.moves SET state = 'cutting_over' WHERE id = $1",
        &[&id],
    )
    .await?;
    s.batch_execute("UPDATE public.orders SET note = 'while down' WHERE tenant_id = 2 AND id = 3")
        .await?;
    let daemon = InProcess::start(config.clone(), false);
    wait_state(&s, id, "streaming", Duration::from_secs(60)).await?;
    let (_, error, _) = state_of(&s, id).await?;
    assert!(
        error.unwrap_or_default().contains("interrupted"),
        "the reset says why"
    );
    let (mv, attempts) = switchyard::cutover::request::cutover_tenant(
        &config,
        &TenantId::new("2")?,
        Duration::from_secs(120),
    )
    .await?;
    ensure!(mv.state.as_str() == "cut_over", "{mv:?} {attempts:?}");
    wait_drained(&s, Duration::from_secs(60)).await?;
    assert_parity(&s, &s, 2, "two").await?;
    daemon.stop().await?;
    Ok(())
}

/// One HTTP GET on loopback: (status line, body).
async fn http_get(addr: &str, path: &str) -> Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("an HTTP response")?;
    Ok((
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_per_tenant_lag_progress_state_and_cutover_pauses() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2], 300))?;
    fence_grants(&src)?;
    prepare_target(&src)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let Running {
        config,
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(
        &src,
        None,
        &format!("[cutover]\nrollback = false\n[metrics]\nlisten = \"{addr}\"\n"),
    )
    .await?;
    wait_for("the endpoint", Duration::from_secs(30), || async {
        Ok(http_get(&addr, "/readyz")
            .await
            .ok()
            .filter(|(status, _)| status.contains("200"))
            .map(|_| ()))
    })
    .await?;
    assert!(http_get(&addr, "/healthz").await?.0.contains("200"));
    assert!(http_get(&addr, "/nothing").await?.0.contains("404"));
    // The container health check: `switchyard health` against the daemon, and against an
    // address where nothing answers.
    let health = |addr: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["health", "--addr", &addr])
            .output()
    };
    let up = health(addr.clone())?;
    ensure!(
        up.status.success() && String::from_utf8_lossy(&up.stdout).contains("healthy"),
        "{up:?}"
    );
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let down = health(nobody.to_string())?;
    ensure!(
        !down.status.success() && String::from_utf8_lossy(&down.stdout).contains("unhealthy"),
        "{down:?}"
    );
    let id = request(&s, &registry, "2", "local", "two").await?;
    wait_state(&s, id, "streaming", SYNC).await?;
    // The per-tenant series are refreshed about once a second: see them while streaming.
    wait_for("the tenant's series", Duration::from_secs(30), || async {
        let (_, body) = http_get(&addr, "/metrics").await?;
        Ok(body
            .contains("switchyard_tenant_lag_bytes{tenant=\"2\"}")
            .then_some(()))
    })
    .await?;
    let (mv, _) = switchyard::cutover::request::cutover_tenant(
        &config,
        &TenantId::new("2")?,
        Duration::from_secs(120),
    )
    .await?;
    ensure!(mv.state.as_str() == "cut_over", "{mv:?}");
    // The report runs every second; the cut-over tenant's last figures stay. (Other tests
    // of this binary share the process's recorder, so counts are at least, not exactly.)
    let body = wait_for("the metrics", Duration::from_secs(30), || async {
        let (_, body) = http_get(&addr, "/metrics").await?;
        Ok(body
            .contains("switchyard_cutover_attempts_total{result=\"done\"}")
            .then_some(body))
    })
    .await?;
    for expected in [
        "switchyard_tenant_lag_bytes{tenant=\"2\"}",
        "switchyard_tenant_copied_rows{tenant=\"2\"}",
        "switchyard_tenant_state{tenant=\"2\",state=\"streaming\"}",
        "switchyard_cutover_pause_seconds_bucket",
        "switchyard_slot_confirmed_lsn",
        "switchyard_slot_retained_wal_bytes",
        "switchyard_apply_transactions_total{target=\"local\"}",
    ] {
        assert!(body.contains(expected), "{expected} missing from:\n{body}");
    }
    // Every sample line is `name{labels} value`, with a HELP/TYPE-free but parseable shape.
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(value.parse::<f64>().is_ok(), "unparseable sample: {line}");
        assert!(line.starts_with("switchyard_"), "foreign metric: {line}");
    }
    // Prometheus' own linter (scripts/install-deps installs promtool).
    let lint = promtool(&["check", "metrics"], Some(&body))?;
    ensure!(lint.status.success(), "promtool check metrics: {lint:?}");
    let rules = promtool(
        &[
            "check",
            "rules",
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/alerts.yml"),
        ],
        None,
    )?;
    ensure!(rules.status.success(), "promtool check rules: {rules:?}");
    daemon.stop().await?;
    Ok(())
}

/// Runs promtool (installed by scripts/install-deps) with `stdin` piped in.
fn promtool(args: &[&str], stdin: Option<&str>) -> Result<std::process::Output> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool is not installed: run scripts/install-deps")?;
    let mut input = child.stdin.take().context("promtool stdin")?;
    input.write_all(stdin.unwrap_or("").as_bytes())?;
    drop(input);
    Ok(child.wait_with_output()?)
}

/// The fence of a shared table is gated: only the tenants it lists reach its check, and
/// gating one tenant keeps every tenant gated before, fenced or not yet (an attempt sits
/// between its gate and its arming), so a listed tenant's writers wait for a cutover's
/// lock and an unlisted one's do not. A fenced tenant the column's type cannot hold is
/// left out instead of breaking the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_gate_keeps_every_tenant_gated_before() -> Result<()> {
    use switchyard::cutover::fence;
    let src = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2, 3], 10))?;
    let mut c = src.client().await?;
    switchyard::registry::Registry::new("switchyard")?
        .install(&mut c)
        .await?;
    // Fenced elsewhere: an id that is no integer.
    c.batch_execute("INSERT INTO switchyard.fences (tenant, state) VALUES ('acme', 'moved')")
        .await?;
    let orders = switchyard::sql::QualifiedName::new("public", "orders")?;
    for t in ["1", "2"] {
        let changed = fence::install_gated(
            &mut c,
            "switchyard",
            &orders,
            "tenant_id",
            &TenantId::new(t)?,
            Duration::from_secs(1),
            Duration::from_secs(10),
        )
        .await?;
        ensure!(changed, "gating tenant {t} recreates the triggers");
    }
    let listed: Vec<String> = c
        .query_one(
            "SELECT tenants FROM switchyard.fence_gates WHERE tbl = 'public.orders'::regclass",
            &[],
        )
        .await?
        .get(0);
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, ["1", "2"], "tenant 1 kept, 'acme' left out");
    // Gating a listed tenant again changes nothing.
    ensure!(
        !fence::install_gated(
            &mut c,
            "switchyard",
            &orders,
            "tenant_id",
            &TenantId::new("1")?,
            Duration::from_secs(1),
            Duration::from_secs(10),
        )
        .await?
    );
    for t in ["1", "2", "3"] {
        fence::arm(&c, "switchyard", &TenantId::new(t)?).await?;
    }
    // A cutover's lock on every tenant: listed tenants' writers wait for it.
    let cutover = src.client().await?;
    cutover
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({a}) FROM (VALUES ('1'), ('2'), ('3')) v(t)",
            a = fence::LOCK_ARGS.replace("$1", "v.t")
        ))
        .await?;
    let w = src.client().await?;
    w.batch_execute("SET statement_timeout = '500ms'").await?;
    for t in [1, 2] {
        let err = w
            .batch_execute(&format!(
                "UPDATE public.orders SET note = 'x' WHERE tenant_id = {t} AND id = 1"
            ))
            .await
            .expect_err("a listed tenant's writer waits for the cutover's lock");
        assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    }
    // Tenant 3 was armed without a gate: the gate does not see it (which is why every
    // attempt gates its tenant before arming it).
    w.batch_execute("UPDATE public.orders SET note = 'x' WHERE tenant_id = 3 AND id = 1")
        .await?;
    // A moved tenant is refused; changing a row's tenant to it too.
    cutover.batch_execute("ROLLBACK").await?;
    c.batch_execute(
        "UPDATE switchyard.fences SET state = 'moved' WHERE tenant = '2';
         INSERT INTO public.orders (tenant_id, id) VALUES (3, 999997);",
    )
    .await?;
    for sql in [
        "UPDATE public.orders SET note = 'y' WHERE tenant_id = 2 AND id = 2",
        "DELETE FROM public.items WHERE false",
        "INSERT INTO public.orders (tenant_id, id) VALUES (2, 999999)",
        "UPDATE public.orders SET tenant_id = 2 WHERE tenant_id = 3 AND id = 999997",
    ] {
        let r = w.batch_execute(sql).await;
        if sql.contains("items") {
            r?;
            continue;
        }
        let err = r.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("SY001"), "{sql}: {err}");
    }
    Ok(())
}

/// The publication's row filter for `table`, as the catalog deparses it (`None`: unfiltered).
async fn row_filter(s: &Client, table: &str) -> Result<Option<String>> {
    Ok(s.query_one(
        "SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'sy_pub' AND tablename = $1",
        &[&table],
    )
    .await?
    .get(0))
}

/// Asks for `tenant`'s cutover and waits for it (2 min at most); fails unless the move ends
/// `cut_over`. Returns its attempts.
async fn cut_over(
    config: &switchyard::config::Config,
    tenant: &TenantId,
) -> Result<Vec<switchyard::registry::Attempt>> {
    let (mv, attempts) =
        switchyard::cutover::request::cutover_tenant(config, tenant, Duration::from_secs(120))
            .await?;
    ensure!(
        mv.state.as_str() == "cut_over",
        "state {} ({:?}); attempts {attempts:?}",
        mv.state,
        mv.last_error
    );
    Ok(attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_carries_only_moving_tenants_and_a_copy_waits_for_older_transactions(
) -> Result<()> {
    let src = PgCluster::start()?;
    let dst = PgCluster::start()?;
    src.psql(&shared_schema(&[1, 2, 3], 300))?;
    // The role owns the publication and (as a member) the tables: it may set the filters.
    fence_grants(&src)?;
    prepare_target(&dst)?;
    let Running {
        config,
        s,
        daemon,
        registry,
        _dir,
        ..
    } = start(
        &src,
        Some(&dst),
        "[move]\nchunk_rows = 100\n[cutover]\npause_budget_ms = 1500\nretry_initial_ms = 200\n\
         auto_cleanup = false\n",
    )
    .await?;
    let d = dst.client().await?;

    // Nothing moves: the tenant tables send nothing, the global table everything.
    wait_for("the filter of no tenant", SYNC, || async {
        Ok((row_filter(&s, "orders").await?.as_deref() == Some("false")).then_some(()))
    })
    .await?;
    assert_eq!(row_filter(&s, "events").await?.as_deref(), Some("false"));
    assert_eq!(row_filter(&s, "countries").await?, None);

    // A transaction of tenant 2 older than its move: the copy must not start before it
    // ends (decoded with the catalog it began with, its rows would not pass the filter).
    let older = src.client().await?;
    older
        .batch_execute(
            "BEGIN;
             INSERT INTO public.orders (tenant_id, id, note) VALUES (2, 900001, 'older');",
        )
        .await?;
    let id = request(&s, &registry, "2", "shard2", "t2").await?;
    wait_for("tenant 2 in the filter", SYNC, || async {
        Ok(row_filter(&s, "orders")
            .await?
            .is_some_and(|f| f.contains("ARRAY[2]"))
            .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (state, _, copied) = state_of(&s, id).await?;
    ensure!(
        state == "provisioning" && copied == 0,
        "the copy started under an older open transaction: {state}, {copied} rows"
    );
    older
        .batch_execute(
            "UPDATE public.orders SET note = 'older too' WHERE tenant_id = 2 AND id = 900001;
             COMMIT;",
        )
        .await?;
    let writers = [
        TenantWriter::start(src.client().await?, 2, true),
        TenantWriter::start(src.client().await?, 3, false),
    ];
    wait_state(&s, id, "streaming", SYNC).await?;
    assert_eq!(row_filter(&s, "countries").await?, None);
    cut_over(&config, &TenantId::new("2")?).await?;
    for w in writers {
        let (n, _, _) = w.stop().await?;
        ensure!(n > 0, "a writer wrote nothing");
    }
    wait_drained(&s, Duration::from_secs(60)).await?;
    assert_parity(&s, &d, 2, "t2").await?;
    let note: String = d
        .query_one("SELECT note FROM t2.orders WHERE id = 900001", &[])
        .await?
        .get(0);
    assert_eq!(note, "older too");

    // Cut over, the tenant leaves the filter again.
    wait_for("tenant 2 to leave the filter", SYNC, || async {
        Ok((row_filter(&s, "orders").await?.as_deref() == Some("false")).then_some(()))
    })
    .await?;
    daemon.stop().await?;

    // Switched off, a start removes switchyard's filters and keeps the rest.
    s.batch_execute("ALTER PUBLICATION sy_pub SET TABLE public.orders WHERE (false), public.items WHERE (false), public.events WHERE (false), public.countries WHERE (code <> 'XX')")
        .await?;
    let mut off = config.clone();
    off.replication.row_filter = false;
    let daemon = InProcess::start(off, false);
    wait_for("the filters to go", SYNC, || async {
        Ok(row_filter(&s, "orders").await?.is_none().then_some(()))
    })
    .await?;
    assert_eq!(row_filter(&s, "items").await?, None);
    assert_eq!(
        row_filter(&s, "countries").await?.as_deref(),
        Some("(code <> 'XX'::text)")
    );
    daemon.stop().await?;
    Ok(())
}
