//! The registry on a real cluster: install, operator INSERTs with notification, the
//! one-unfinished-move rule, guarded state transitions, and `switchyard move`.

use crate::support;

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use support::PgCluster;
use switchyard::registry::{CutoverMode, MoveState, Registry, RegistryError, CHANNEL};
use switchyard::tenant::{TargetId, TenantId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_are_requested_notified_and_guarded() -> Result<()> {
    let pg = PgCluster::start()?;
    let mut c = pg.client().await?;
    let reg = Registry::new("switchyard")?;
    reg.install(&mut c).await?;
    reg.install(&mut c).await?; // idempotent

    // A listener sees an operator's plain INSERT.
    let (listener, mut conn) = tokio_postgres::Config::new()
        .host_path(pg.socket_dir())
        .port(pg.port())
        .user("postgres")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await?;
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    listener.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    let id: i64 = c
        .query_one(
            "INSERT INTO switchyard.moves (tenant, target, target_schema) \
             VALUES ('acme', 'local', 'acme') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let note = tokio::time::timeout(Duration::from_secs(10), notes.recv()).await?;
    assert_eq!(note, Some(id.to_string()));

    let acme = TenantId::new("acme")?;
    let local = TargetId::new("local")?;
    let m = reg.get(&c, id).await?;
    assert_eq!(m.state, MoveState::Requested);
    assert_eq!(m.cutover_mode, CutoverMode::Manual);

    // One unfinished move per tenant.
    let err = reg
        .request_move(&c, &acme, &local, "acme2", CutoverMode::Auto)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::AlreadyMoving { id: i, .. } if i == id),
        "{err}"
    );

    // Transitions: allowed ones go through, illegal and stale ones are refused.
    reg.transition(&c, id, MoveState::Requested, MoveState::Provisioning, None)
        .await?;
    let err = reg
        .transition(&c, id, MoveState::Provisioning, MoveState::CutOver, None)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Transition { .. }), "{err}");
    let err = reg
        .transition(&c, id, MoveState::Requested, MoveState::Provisioning, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Conflict {
                actual: MoveState::Provisioning,
                ..
            }
        ),
        "{err}"
    );
    reg.transition(
        &c,
        id,
        MoveState::Provisioning,
        MoveState::Failed,
        Some("target refused rows"),
    )
    .await?;
    assert_eq!(
        reg.get(&c, id).await?.last_error.as_deref(),
        Some("target refused rows")
    );
    reg.transition(&c, id, MoveState::Failed, MoveState::Cancelled, None)
        .await?;

    // Finished: the tenant may be moved again, by name with hostile text kept as data.
    let again = reg
        .request_move(&c, &acme, &local, "acme", CutoverMode::Auto)
        .await?;
    assert!(again > id);
    let odd = TenantId::new("x'); DROP TABLE switchyard.moves; --")?;
    reg.request_move(&c, &odd, &local, "odd", CutoverMode::Manual)
        .await?;
    let all = reg.list(&c).await?;
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].tenant, odd);

    // Bad rows written by hand are refused by the table itself.
    for bad in [
        "INSERT INTO switchyard.moves (tenant, target, target_schema) VALUES ('', 'local', 's')",
        "INSERT INTO switchyard.moves (tenant, target, target_schema, state) VALUES ('t', 'local', 's', 'bogus')",
        "INSERT INTO switchyard.moves (tenant, target, target_schema, cutover_mode) VALUES ('t', 'local', 's', 'yolo')",
    ] {
        let err = c.batch_execute(bad).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{bad}");
    }
    assert!(
        reg.route(&c, &acme).await?.is_none(),
        "only a cutover writes routes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_move_writes_the_row_and_refuses_unknown_targets() -> Result<()> {
    let pg = PgCluster::start()?;
    // `move` checks the tenant's tables before writing the row.
    pg.psql(
        "CREATE TABLE public.orders (tenant_id text NOT NULL, id int NOT NULL, PRIMARY KEY (tenant_id, id));
         CREATE PUBLICATION switchyard FOR TABLE public.orders;
         GRANT SELECT ON public.orders TO switchyard;",
    )?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"switchyard\"\ndbname = \"postgres\"\n\
             sslmode = \"disable\"\n[targets.local]\nsame_as_source = true\n",
            pg.port()
        ),
    )?;
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .expect("running switchyard")
    };
    let out = run(&["move", "acme", "--to", "local", "--auto"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("move 1 requested"));
    let c = pg.client().await?;
    let row = c
        .query_one(
            "SELECT tenant, target, target_schema, cutover_mode, state FROM switchyard.moves",
            &[],
        )
        .await?;
    let got: (String, String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        got,
        (
            "acme".into(),
            "local".into(),
            "acme".into(),
            "auto".into(),
            "requested".into()
        )
    );

    let out = run(&["move", "globex", "--to", "nowhere"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("target \"nowhere\" is not configured; known targets: local"),
        "{err}"
    );

    let out = run(&["move", "acme", "--to", "local"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has an unfinished move"));

    // A table the daemon could not move is refused with its fix, and no row is written.
    pg.psql(
        "CREATE TABLE public.notes (tenant_id text NOT NULL, body text);
         ALTER PUBLICATION switchyard ADD TABLE public.notes;
         GRANT SELECT ON public.notes TO switchyard;",
    )?;
    let out = run(&["move", "globex", "--to", "local"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("notes") && err.contains("ADD PRIMARY KEY"),
        "{err}"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM switchyard.moves", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);
    Ok(())
}

/// A daemon start installs nothing when the registry is current: it neither waits for nor
/// blocks a session that has the registry open (the DDL takes ACCESS EXCLUSIVE locks on the
/// moves table). An older registry (another DDL's stamp, a column missing) is brought up to
/// date. The same holds for a target's progress tables, which every apply lane checks when
/// it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_registry_is_not_reinstalled_and_takes_no_lock() -> Result<()> {
    let pg = PgCluster::start()?;
    let mut c = pg.client().await?;
    let reg = Registry::new("switchyard")?;
    reg.install(&mut c).await?;
    let mut reader = pg.client().await?;
    let open = reader.transaction().await?;
    open.query("SELECT * FROM switchyard.moves", &[]).await?;
    open.query("SELECT * FROM switchyard.routes", &[]).await?;
    // Without the version check this waits for `open` and fails at the lock timeout.
    c.batch_execute("SET lock_timeout = '2s'").await?;
    reg.install(&mut c).await?;
    open.rollback().await?;

    // An older registry: a column missing and another stamp. It is updated.
    c.batch_execute(
        "ALTER TABLE switchyard.moves DROP COLUMN verified_at;
         COMMENT ON TABLE switchyard.moves IS 'switchyard registry; DDL md5 0'",
    )
    .await?;
    reg.install(&mut c).await?;
    let has: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
              WHERE table_schema = 'switchyard' AND table_name = 'moves' AND column_name = 'verified_at')",
            &[],
        )
        .await?
        .get(0);
    assert!(has, "the missing column is back");

    // Progress tables on a target: a lane connecting while another lane's transaction
    // holds the table neither waits nor fails.
    switchyard::apply::progress::ensure_progress_table(&c, "sy progress").await?;
    let mut lane = pg.client().await?;
    let busy = lane.transaction().await?;
    busy.batch_execute(
        "INSERT INTO \"sy progress\".applied (tenant, lsn) VALUES ('t', '0/1');
         INSERT INTO \"sy progress\".applied_lanes (tenant, lane, lsn) VALUES ('t', 1, '0/1')",
    )
    .await?;
    switchyard::apply::progress::ensure_progress_table(&c, "sy progress").await?;
    busy.rollback().await?;
    Ok(())
}
