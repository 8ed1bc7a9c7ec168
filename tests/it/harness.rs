//! Tests of the real-PostgreSQL test harness in `tests/it/support` itself.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use support::{wait_for, ClusterOptions, PgCluster};

async fn show(client: &tokio_postgres::Client, setting: &str) -> Result<String> {
    let row = client.query_one(&format!("SHOW {setting}"), &[]).await?;
    Ok(row.get(0))
}

/// A tokio-postgres config for the replication user over TCP.
fn tcp_config(pg: &PgCluster, password: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(pg.host_tcp())
        .port(pg.port())
        .user(pg.replication_user())
        .password(password)
        .dbname("postgres");
    config
}

/// rustls client config trusting only the cluster's CA.
fn tls_connector(pg: &PgCluster) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let pem = std::fs::read(pg.ca_cert_path())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The error of a connection attempt that must fail.
fn refused<T>(attempt: Result<T, tokio_postgres::Error>) -> tokio_postgres::Error {
    match attempt {
        Ok(_) => panic!("connection succeeded but should have been refused"),
        Err(err) => err,
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn two_clusters_run_at_once_with_logical_wal() -> Result<()> {
    let source = PgCluster::start()?;
    let target = PgCluster::start()?;
    assert_ne!(source.port(), target.port());
    assert_ne!(source.data_dir(), target.data_dir());
    assert_ne!(source.port(), 5432);

    for pg in [&source, &target] {
        let client = pg.client().await?;
        assert_eq!(show(&client, "wal_level").await?, "logical");
        assert_eq!(show(&client, "max_replication_slots").await?, "20");
        assert_eq!(show(&client, "fsync").await?, "off");
        assert_eq!(show(&client, "synchronous_commit").await?, "on");
        assert_eq!(show(&client, "port").await?, pg.port().to_string());
        assert!(pg.server_version_num() >= 100_000);
        assert_eq!(pg.psql("SELECT 1 + 1")?, "2");
    }

    // Writes to one cluster are invisible to the other.
    source.psql("CREATE TABLE only_here (id int)")?;
    let err = target.psql("SELECT * FROM only_here").unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn replication_role_exists_and_is_not_superuser() -> Result<()> {
    let pg = PgCluster::start()?;
    let row = pg.psql(
        "SELECT rolsuper, rolreplication, rolcanlogin FROM pg_roles WHERE rolname = 'switchyard'",
    )?;
    assert_eq!(row, "f|t|t");
    assert_eq!(
        pg.psql("SELECT has_database_privilege('switchyard', 'postgres', 'CREATE')")?,
        "t"
    );

    pg.create_database("tenant db")?;
    let client = pg.client_db("tenant db").await?;
    let row = client.query_one("SELECT current_database()", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "tenant db");

    // Trust auth on TCP: the replication user gets in, also with a wrong password.
    let (client, connection) = tcp_config(&pg, "not the password")
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    let row = client.query_one("SELECT current_user", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "switchyard");
    Ok(())
}

#[tokio::test]
async fn kill9_then_restart_preserves_committed_data() -> Result<()> {
    let mut pg = PgCluster::start()?;
    let port = pg.port();
    let client = pg.client().await?;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
        .await?;

    let pid = pg.postmaster_pid().context("no postmaster")?;
    pg.kill9();
    assert!(!pg.is_running());
    assert!(!process_exists(pid));
    assert!(
        client.query_one("SELECT 1", &[]).await.is_err(),
        "old connection must be dead"
    );

    pg.restart()?;
    assert!(pg.is_running());
    assert_eq!(pg.port(), port);
    assert!(std::fs::read_to_string(pg.log_path())?.contains("not properly shut down"));
    let client = pg.client().await?;
    // wait_for's probe may borrow from the test (here `client`).
    let count = wait_for(
        "both rows after recovery",
        Duration::from_secs(10),
        || async {
            let row = client.query_one("SELECT count(*) FROM t", &[]).await?;
            Ok(Some(row.get::<_, i64>(0)))
        },
    )
    .await?;
    assert_eq!(count, 2);
    Ok(())
}

#[tokio::test]
async fn stop_then_restart() -> Result<()> {
    let mut pg = PgCluster::start()?;
    pg.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (7)")?;
    pg.stop();
    assert!(!pg.is_running());
    assert!(pg.client().await.is_err());
    pg.stop(); // idempotent
    pg.restart()?;
    assert_eq!(pg.psql("SELECT id FROM t")?, "7");
    pg.restart()?; // also from a running server
    assert_eq!(pg.psql("SELECT id FROM t")?, "7");
    Ok(())
}

#[tokio::test]
async fn scram_cluster_checks_tcp_passwords() -> Result<()> {
    let pg = PgCluster::start_with(ClusterOptions {
        scram: true,
        ..Default::default()
    })?;

    let (client, connection) = tcp_config(&pg, pg.password())
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    let row = client.query_one("SELECT current_user", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "switchyard");

    let err = refused(
        tcp_config(&pg, "wrong")
            .connect(tokio_postgres::NoTls)
            .await,
    );
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{err}"
    );

    // Replication connections have their own pg_hba lines.
    let replication = format!("{} replication=database", pg.conninfo("postgres"));
    let system = pg.psql_with(&replication, "IDENTIFY_SYSTEM")?;
    assert!(!system.is_empty());
    let wrong = replication.replace(pg.password(), "wrong");
    let err = pg.psql_with(&wrong, "IDENTIFY_SYSTEM").unwrap_err();
    assert!(
        format!("{err:#}").contains("password authentication failed"),
        "{err:#}"
    );

    // The admin path (unix socket) stays trust.
    assert_eq!(pg.psql("SELECT current_user")?, "postgres");
    Ok(())
}

#[tokio::test]
async fn ssl_cluster_serves_tls_signed_by_its_ca() -> Result<()> {
    let pg = PgCluster::start_with(ClusterOptions {
        ssl: true,
        ..Default::default()
    })?;
    let mut config = tcp_config(&pg, pg.password());
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config.connect(tls_connector(&pg)?).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    assert!(row.get::<_, bool>(0));

    // Without require_ssl, plain TCP is still accepted.
    let (client, connection) = tcp_config(&pg, pg.password())
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    assert!(!row.get::<_, bool>(0));
    Ok(())
}

#[tokio::test]
async fn ssl_scram_require_ssl_rejects_plain_tcp() -> Result<()> {
    let pg = PgCluster::start_with(ClusterOptions {
        ssl: true,
        scram: true,
        require_ssl: true,
        ..Default::default()
    })?;

    let mut config = tcp_config(&pg, pg.password());
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config.connect(tls_connector(&pg)?).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    assert!(row.get::<_, bool>(0));

    let mut wrong = tcp_config(&pg, "wrong");
    wrong.ssl_mode(tokio_postgres::config::SslMode::Require);
    let err = refused(wrong.connect(tls_connector(&pg)?).await);
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{err}"
    );

    let err = refused(
        tcp_config(&pg, pg.password())
            .connect(tokio_postgres::NoTls)
            .await,
    );
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );

    let replication = format!(
        "{} replication=database sslmode=require",
        pg.conninfo("postgres")
    );
    assert!(!pg.psql_with(&replication, "IDENTIFY_SYSTEM")?.is_empty());
    Ok(())
}

#[tokio::test]
async fn options_reach_the_server_config() -> Result<()> {
    let pg = PgCluster::start_with(ClusterOptions {
        logical_decoding_work_mem_kb: Some(64),
        wal_sender_timeout: Some(Duration::from_secs(5)),
        extra_conf: vec![("application_name".into(), "it's quoted".into())],
        ..Default::default()
    })?;
    let client = pg.client().await?;
    assert_eq!(show(&client, "logical_decoding_work_mem").await?, "64kB");
    assert_eq!(show(&client, "wal_sender_timeout").await?, "5s");
    assert_eq!(show(&client, "max_prepared_transactions").await?, "10");
    assert_eq!(show(&client, "full_page_writes").await?, "off");
    // The harness sets application_name on its own connections; ask the file.
    let setting =
        pg.psql("SELECT setting FROM pg_file_settings WHERE name = 'application_name'")?;
    assert_eq!(setting, "it's quoted");
    Ok(())
}

#[tokio::test]
async fn drop_stops_the_server_and_removes_the_directory() -> Result<()> {
    let pg = PgCluster::start()?;
    let base = pg
        .data_dir()
        .parent()
        .context("data dir has a parent")?
        .to_path_buf();
    let pid = pg.postmaster_pid().context("no postmaster")?;
    let children: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(base.exists() && process_exists(pid));
    drop(pg);
    assert!(!base.exists(), "{} still exists", base.display());
    assert!(!process_exists(pid), "postmaster {pid} still runs");
    for child in children {
        wait_for(
            "server child to exit",
            Duration::from_secs(10),
            || async move { Ok((!process_exists(child)).then_some(())) },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn psql_errors_carry_stderr() -> Result<()> {
    let pg = PgCluster::start()?;
    let err = pg.psql("SELECT * FROM no_such_table").unwrap_err();
    assert!(format!("{err:#}").contains("no_such_table"), "{err:#}");
    // A script runs statement by statement, so CREATE DATABASE may follow others.
    assert_eq!(
        pg.psql("SELECT 1;\nCREATE DATABASE scripted;\nSELECT 2")?,
        "1\n2"
    );
    Ok(())
}

#[tokio::test]
async fn wait_for_returns_the_value_or_names_what_timed_out() -> Result<()> {
    let mut polls = 0;
    let value = wait_for("third poll", Duration::from_secs(5), || {
        polls += 1;
        let n = polls;
        async move { Ok((n >= 3).then_some(n)) }
    })
    .await?;
    assert_eq!(value, 3);

    let err = wait_for("the impossible", Duration::from_millis(200), || async {
        Ok(None::<()>)
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("the impossible"), "{err}");

    let err = wait_for("a failing probe", Duration::from_secs(5), || async {
        Err::<Option<()>, _>(anyhow::anyhow!("probe broke"))
    })
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("probe broke"), "{err:#}");
    Ok(())
}

/// The fault proxy forwards, delays, black-holes (a query hangs, then completes when the
/// hole closes) and cuts (the live session dies, a new one works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_delays_black_holes_and_cuts() -> Result<()> {
    let pg = PgCluster::start()?;
    let proxy = support::proxy::Proxy::start(pg.port())?;
    let port = proxy.port();
    let connect = move || async move {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(conn);
        anyhow::Ok(client)
    };
    let c = connect().await?;
    let one: i32 = c.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    assert_eq!((proxy.accepted(), proxy.live()), (1, 1));

    proxy.delay(Duration::from_millis(150));
    let t0 = std::time::Instant::now();
    c.query_one("SELECT 2", &[]).await?;
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    proxy.delay(Duration::ZERO);

    proxy.black_hole(true);
    let held = tokio::time::timeout(Duration::from_millis(500), c.query_one("SELECT 3", &[])).await;
    assert!(held.is_err(), "a query answered through a black hole");
    let pending = tokio::spawn(connect());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "a connection was set up through a black hole"
    );
    proxy.black_hole(false);
    let late = pending.await??;
    let four: i32 = late.query_one("SELECT 4", &[]).await?.get(0);
    assert_eq!(four, 4);

    let before = proxy.forwarded();
    proxy.cut();
    let err = c
        .query_one("SELECT 5", &[])
        .await
        .expect_err("a cut session still answered");
    assert!(err.is_closed() || err.as_db_error().is_none(), "{err}");
    assert!(late.query_one("SELECT 6", &[]).await.is_err());
    let again = connect().await?;
    let seven: i32 = again.query_one("SELECT 7", &[]).await?.get(0);
    assert_eq!(seven, 7);
    assert!(proxy.forwarded() > before);
    Ok(())
}
