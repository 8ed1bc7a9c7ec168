//! Hostile and bad input end to end: names that are SQL, a registry row written by hand
//! that points nowhere. Each is data or a clear error, and nothing else is touched.
//! (The rest of the hostile suite lives next to the code it attacks; docs/proof.md maps
//! every item to its test.)

use crate::support;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use support::mover::{
    digest, load_config, prepare_target, registry_ready, state_of, wait_drained, wait_state,
    write_config, InProcess,
};
use support::{wait_for, PgCluster};

const SYNC: Duration = Duration::from_secs(120);

/// A tenant id, a target name, a target schema, a table and a column, each of them an
/// injection attempt: the move goes through with every name kept as data, the source's
/// tables survive, and the target holds exactly the tenant's rows under those names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_sql_stay_names() -> Result<()> {
    const TENANT: &str = "x'); DROP TABLE public.accounts; --";
    const TARGET: &str = "sh\"ard'; DROP TABLE public.accounts; --";
    const SCHEMA: &str = "s\"; DROP SCHEMA public CASCADE; --";
    let src = PgCluster::start()?;
    src.psql(
        "CREATE TABLE public.accounts (tenant_id text NOT NULL, id int NOT NULL, note text,
           PRIMARY KEY (tenant_id, id));
         CREATE TABLE public.\"we\"\"ird; DROP TABLE public.accounts; --\" (
           tenant_id text NOT NULL, \"k'); DELETE FROM public.accounts; --\" int NOT NULL,
           \"v\"\"al\" text, PRIMARY KEY (tenant_id, \"k'); DELETE FROM public.accounts; --\"));
         INSERT INTO public.accounts
           SELECT t, g, 'note ' || g
             FROM unnest(ARRAY['x''); DROP TABLE public.accounts; --', 'plain']) t, generate_series(1, 500) g;
         INSERT INTO public.\"we\"\"ird; DROP TABLE public.accounts; --\"
           SELECT tenant_id, id, note FROM public.accounts;
         CREATE PUBLICATION sy_pub FOR ALL TABLES;
         GRANT SELECT, TRIGGER ON ALL TABLES IN SCHEMA public TO switchyard;
         GRANT pg_read_all_stats TO switchyard;",
    )?;
    src.psql(&support::app_owned(&["public"]))?;
    prepare_target(&src)?;
    let dir = tempfile::tempdir()?;
    let toml_target = TARGET.replace('\\', "\\\\").replace('"', "\\\"");
    let path = write_config(
        dir.path(),
        &src,
        None,
        &format!("[targets.\"{toml_target}\"]\nsame_as_source = true\n[move]\nchunk_rows = 100\n"),
    )?;
    let s = src.client().await?;
    let daemon = InProcess::start(load_config(&path)?, true);
    registry_ready(&s).await?;

    // Requested the way an operator would: the CLI, names as arguments.
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&path)
        .args(["move", TENANT, "--to", TARGET, "--schema", SCHEMA])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "switchyard move: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: i64 = s
        .query_one(
            "SELECT id FROM switchyard.moves WHERE tenant = $1 AND target = $2 AND target_schema = $3",
            &[&TENANT, &TARGET, &SCHEMA],
        )
        .await
        .context("the registry row holds the names as written")?
        .get(0);
    wait_state(&s, id, "streaming", SYNC).await?;
    s.execute(
        "UPDATE public.accounts SET note = 'changed' WHERE tenant_id = $1 AND id <= 10",
        &[&TENANT],
    )
    .await?;
    s.execute(
        "DELETE FROM public.\"we\"\"ird; DROP TABLE public.accounts; --\" WHERE tenant_id = $1 AND \"k'); DELETE FROM public.accounts; --\" > 490",
        &[&TENANT],
    )
    .await?;
    wait_drained(&s, SYNC).await?;
    // Cut over through the CLI too, after the changes: a move requested with --auto could
    // cut over before they were made and the fence would refuse them.
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&path)
        .args(["cutover", TENANT])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "switchyard cutover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_state(&s, id, "cut_over", SYNC).await?;
    daemon.check_alive()?;
    daemon.stop().await?;

    let quoted_schema = format!("\"{}\"", SCHEMA.replace('"', "\"\""));
    for table in ["accounts", "\"we\"\"ird; DROP TABLE public.accounts; --\""] {
        let want = digest(
            &s,
            &format!("public.{table}"),
            &format!("WHERE tenant_id = '{}'", TENANT.replace('\'', "''")),
        )
        .await?;
        let got = digest(&s, &format!("{quoted_schema}.{table}"), "").await?;
        assert_eq!(want, got, "{table}");
        assert!(want.0 >= 490, "{table}: {want:?}");
        let plain: i64 = s
            .query_one(
                &format!("SELECT count(*) FROM public.{table} WHERE tenant_id = 'plain'"),
                &[],
            )
            .await?
            .get(0);
        assert_eq!(plain, 500, "{table}: the other tenant is untouched");
    }
    let route: (String, String) = s
        .query_one(
            "SELECT location, schema_name FROM switchyard.routes WHERE tenant = $1",
            &[&TENANT],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    assert_eq!(route, (TARGET.to_string(), SCHEMA.to_string()));
    // The fence refuses the tenant's writes at the old location, by value.
    let refused = s
        .execute(
            "INSERT INTO public.accounts VALUES ($1, 9999, 'late')",
            &[&TENANT],
        )
        .await
        .expect_err("the old location refuses the moved tenant");
    assert_eq!(refused.code().map(|c| c.code()), Some("SY001"));
    s.execute(
        "INSERT INTO public.accounts VALUES ('plain', 9999, 'fine')",
        &[],
    )
    .await?;
    Ok(())
}

/// A moves row written by hand naming a target the configuration does not have: that move
/// fails with the known targets in its error; a neighbour's move goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_row_for_an_unknown_target_fails_only_that_move() -> Result<()> {
    let src = PgCluster::start()?;
    src.psql(&support::mover::shared_schema(&[1, 2], 200))?;
    prepare_target(&src)?;
    let dir = tempfile::tempdir()?;
    let path = write_config(dir.path(), &src, None, "")?;
    let s = src.client().await?;
    let daemon = InProcess::start(load_config(&path)?, true);
    registry_ready(&s).await?;
    let bad: i64 = s
        .query_one(
            "INSERT INTO switchyard.moves (tenant, target, target_schema) VALUES ('1', 'nowhere', 't1') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let good: i64 = s
        .query_one(
            "INSERT INTO switchyard.moves (tenant, target, target_schema) VALUES ('2', 'local', 't2') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let error = wait_for("the bad move to fail", SYNC, || async {
        let (state, error, _) = state_of(&s, bad).await?;
        Ok((state == "failed").then_some(error))
    })
    .await?
    .unwrap_or_default();
    assert!(
        error.contains("nowhere") && error.contains("local"),
        "the error names the target and the known ones: {error}"
    );
    wait_state(&s, good, "streaming", SYNC).await?;
    let strays: i64 = s
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 't1'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(strays, 0, "nothing was provisioned for the bad move");
    daemon.check_alive()?;
    daemon.stop().await?;
    Ok(())
}
