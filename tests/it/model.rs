//! Model-based test: proptest generates programs of multi-tenant source transactions
//! interleaved with move requests, cutovers, daemon crashes (kill -9) and checks. Each
//! program runs against real clusters (a source and a second cluster; the daemon as its own
//! process) and, step by step, against an in-memory model of what every location must hold:
//!
//! - a tenant at the source: its source rows are the model's;
//! - a moving tenant: the same, and once in sync its target schema holds exactly them (no
//!   row of another tenant);
//! - a cut-over tenant: the application writes at the target, which holds the model's
//!   rows; the source refuses its writes (SY001) and keeps the rows it had at the cutover.
//!
//! Moves of a moving tenant and cutovers of a tenant that is not moving must be refused.
//! Operations are sequential from the test's side while the daemon works concurrently (a
//! crash lands wherever its backfill and apply stand). `SWITCHYARD_MODEL_CASES` sets the
//! number of programs (CI runs a few); a failure prints the shrunk program, and proptest
//! keeps its seed in `tests/model.proptest-regressions` to replay first.

use crate::support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use proptest::prelude::*;
use support::mover::{
    load_config, prepare_target, registry_ready, wait_drained, wait_state, write_config, Process,
};
use support::PgCluster;
use switchyard::registry::{CutoverMode, Registry};
use switchyard::tenant::{TargetId, TenantId};
use tokio_postgres::Client;

const TENANTS: u8 = 4;
const SYNC: Duration = Duration::from_secs(120);

/// One write of a source transaction, for one tenant.
#[derive(Clone, Debug)]
enum Write {
    /// Insert, or overwrite if the key exists.
    Upsert {
        id: i32,
        v: i32,
    },
    Update {
        id: i32,
        v: i32,
    },
    Delete {
        id: i32,
    },
    /// A key change inside the tenant (skipped if the new key is taken).
    Rekey {
        id: i32,
        to: i32,
    },
    /// An out-of-line TOAST value; later updates of `v` leave it unchanged in the WAL.
    Pad {
        id: i32,
        len: i32,
    },
}

#[derive(Clone, Debug)]
enum Op {
    /// One application transaction (split per location once tenants live apart).
    Txn(Vec<(u8, Write)>),
    Move {
        tenant: u8,
        remote: bool,
    },
    Cutover {
        tenant: u8,
    },
    Crash,
    Check,
}

/// `id → (v, pad length)`.
type Rows = BTreeMap<i32, (i32, i32)>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    Source,
    Moving { remote: bool },
    CutOver { remote: bool },
}

/// What every location must hold.
struct Model {
    rows: BTreeMap<u8, Rows>,
    place: BTreeMap<u8, Place>,
    /// A cut-over tenant's rows at the source, as of its cutover.
    frozen: BTreeMap<u8, Rows>,
}

const SEED_ROWS: i32 = 20;

impl Model {
    fn new() -> Model {
        let mut rows = BTreeMap::new();
        let mut place = BTreeMap::new();
        for t in 1..=TENANTS {
            let r: Rows = (1..=SEED_ROWS)
                .map(|id| (id, (id, if id % 5 == 0 { 3000 } else { 0 })))
                .collect();
            rows.insert(t, r);
            place.insert(t, Place::Source);
        }
        Model {
            rows,
            place,
            frozen: BTreeMap::new(),
        }
    }

    fn apply(&mut self, tenant: u8, w: &Write) {
        let rows = self.rows.get_mut(&tenant).expect("every tenant has rows");
        match *w {
            Write::Upsert { id, v } => {
                rows.insert(id, (v, 0));
            }
            Write::Update { id, v } => {
                if let Some(r) = rows.get_mut(&id) {
                    r.0 = v;
                }
            }
            Write::Delete { id } => {
                rows.remove(&id);
            }
            Write::Rekey { id, to } => {
                if !rows.contains_key(&to) {
                    if let Some(r) = rows.remove(&id) {
                        rows.insert(to, r);
                    }
                }
            }
            Write::Pad { id, len } => {
                if let Some(r) = rows.get_mut(&id) {
                    r.1 = len;
                }
            }
        }
    }
}

/// The statement of `w` against `table` (tenant ids and keys are integers from the
/// generator; the table name is quoted by the caller).
fn statement(table: &str, tenant: u8, w: &Write) -> String {
    match *w {
        Write::Upsert { id, v } => format!(
            "INSERT INTO {table} (tenant_id, id, v, pad) VALUES ({tenant}, {id}, {v}, '') \
             ON CONFLICT (tenant_id, id) DO UPDATE SET v = EXCLUDED.v, pad = ''"
        ),
        Write::Update { id, v } => {
            format!("UPDATE {table} SET v = {v} WHERE tenant_id = {tenant} AND id = {id}")
        }
        Write::Delete { id } => {
            format!("DELETE FROM {table} WHERE tenant_id = {tenant} AND id = {id}")
        }
        Write::Rekey { id, to } => format!(
            "UPDATE {table} SET id = {to} WHERE tenant_id = {tenant} AND id = {id} \
             AND NOT EXISTS (SELECT 1 FROM {table} WHERE tenant_id = {tenant} AND id = {to})"
        ),
        Write::Pad { id, len } => format!(
            "UPDATE {table} SET pad = repeat('q', {len}) WHERE tenant_id = {tenant} AND id = {id}"
        ),
    }
}

fn write_strategy() -> impl Strategy<Value = Write> {
    let id = 1..=30i32;
    prop_oneof![
        3 => (id.clone(), any::<i16>()).prop_map(|(id, v)| Write::Upsert { id, v: v.into() }),
        3 => (id.clone(), any::<i16>()).prop_map(|(id, v)| Write::Update { id, v: v.into() }),
        2 => id.clone().prop_map(|id| Write::Delete { id }),
        1 => (id.clone(), id.clone()).prop_map(|(id, to)| Write::Rekey { id, to }),
        1 => (id, 2500..=9000i32).prop_map(|(id, len)| Write::Pad { id, len }),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let tenant = 1..=TENANTS;
    prop_oneof![
        8 => prop::collection::vec((tenant.clone(), write_strategy()), 1..5).prop_map(Op::Txn),
        3 => (tenant.clone(), any::<bool>()).prop_map(|(tenant, remote)| Op::Move { tenant, remote }),
        2 => tenant.prop_map(|tenant| Op::Cutover { tenant }),
        1 => Just(Op::Crash),
        1 => Just(Op::Check),
    ]
}

fn schema_of(tenant: u8) -> String {
    format!("t{tenant}")
}

/// The clusters, the daemon and the test's sessions of one program.
struct World {
    _src: PgCluster,
    _dst: PgCluster,
    s: Client,
    d: Client,
    registry: Registry,
    config: switchyard::config::Config,
    path: std::path::PathBuf,
    log: std::path::PathBuf,
    daemon: Process,
    ids: BTreeMap<u8, i64>,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start() -> Result<World> {
        let src = PgCluster::start()?;
        let dst = PgCluster::start()?;
        let mut seed = String::from(
            "CREATE TABLE public.kv (tenant_id int NOT NULL, id int NOT NULL, v int NOT NULL,
               pad text NOT NULL, PRIMARY KEY (tenant_id, id));
             ALTER TABLE public.kv ALTER COLUMN pad SET STORAGE EXTERNAL;
             CREATE PUBLICATION sy_pub FOR ALL TABLES;
             GRANT SELECT, TRIGGER ON ALL TABLES IN SCHEMA public TO switchyard;
             GRANT pg_read_all_stats TO switchyard;",
        );
        for (t, rows) in Model::new().rows {
            for (id, (v, pad)) in rows {
                seed.push_str(&format!(
                    "INSERT INTO public.kv VALUES ({t}, {id}, {v}, repeat('p', {pad}));"
                ));
            }
        }
        src.psql(&seed)?;
        src.psql(&support::app_owned(&["public"]))?;
        prepare_target(&src)?;
        prepare_target(&dst)?;
        let dir = tempfile::tempdir()?;
        let path = write_config(
            dir.path(),
            &src,
            Some(&dst),
            "[move]\nchunk_rows = 7\n[cutover]\npause_budget_ms = 3000\nauto_cleanup = false\n\
             rollback = false\n",
        )?;
        let log = dir.path().join("daemon.log");
        let daemon = Process::start(&path, &log, true)?;
        let s = src.client().await?;
        registry_ready(&s).await?;
        // A crash before the slot exists would leave nothing to restart from (the daemon
        // never re-creates a slot on its own, by design).
        support::wait_for_row(
            &s,
            "the daemon's slot",
            SYNC,
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sy'",
            &[],
        )
        .await?;
        let d = dst.client().await?;
        Ok(World {
            config: load_config(&path)?,
            _src: src,
            _dst: dst,
            s,
            d,
            registry: Registry::new("switchyard")?,
            path,
            log,
            daemon,
            ids: BTreeMap::new(),
            _dir: dir,
        })
    }

    /// The session and the table where `tenant`'s application writes now.
    fn home(&self, place: Place, tenant: u8) -> (&Client, String) {
        match place {
            Place::Source | Place::Moving { .. } => (&self.s, "public.kv".into()),
            Place::CutOver { remote } => (
                if remote { &self.d } else { &self.s },
                format!("{}.kv", schema_of(tenant)),
            ),
        }
    }

    async fn rows(
        client: &Client,
        table: &str,
        tenant: Option<u8>,
    ) -> Result<BTreeMap<(i32, i32), (i32, i32)>> {
        let filter = tenant.map_or(String::new(), |t| format!("WHERE tenant_id = {t}"));
        Ok(client
            .query(
                &format!("SELECT tenant_id, id, v, length(pad) FROM {table} {filter}"),
                &[],
            )
            .await
            .with_context(|| format!("reading {table}"))?
            .iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
            .collect())
    }

    async fn txn(&self, model: &mut Model, writes: &[(u8, Write)]) -> Result<()> {
        // One transaction per location (the source, or a cut-over tenant's schema), in
        // the order of their first write, as an application split across shards would.
        let mut groups: Vec<(Option<u8>, Place, Vec<String>)> = Vec::new();
        for (tenant, w) in writes {
            let place = model.place[tenant];
            let location = matches!(place, Place::CutOver { .. }).then_some(*tenant);
            let (_, table) = self.home(place, *tenant);
            let sql = statement(&table, *tenant, w);
            match groups.iter_mut().find(|g| g.0 == location) {
                Some(g) => g.2.push(sql),
                None => groups.push((location, place, vec![sql])),
            }
            model.apply(*tenant, w);
        }
        for (location, place, sqls) in groups {
            let (client, _) = self.home(place, location.unwrap_or(0));
            let body = sqls.join(";\n");
            client
                .batch_execute(&format!("BEGIN;\n{body};\nCOMMIT;"))
                .await
                .with_context(|| format!("a transaction at {place:?}:\n{body}"))?;
        }
        Ok(())
    }

    async fn request(&mut self, model: &mut Model, tenant: u8, remote: bool) -> Result<()> {
        // A cut-over tenant may move on from its new home; this model stops at one move.
        if let Place::CutOver { .. } = model.place[&tenant] {
            return Ok(());
        }
        let target = if remote { "shard2" } else { "local" };
        let r = self
            .registry
            .request_move(
                &self.s,
                &TenantId::new(tenant.to_string())?,
                &TargetId::new(target)?,
                &schema_of(tenant),
                CutoverMode::Manual,
            )
            .await;
        match (model.place[&tenant], r) {
            (Place::Source, Ok(id)) => {
                self.ids.insert(tenant, id);
                model.place.insert(tenant, Place::Moving { remote });
            }
            (Place::Source, Err(e)) => bail!("the move of tenant {tenant} was refused: {e}"),
            (Place::Moving { .. }, Ok(id)) => {
                bail!("a second move ({id}) of moving tenant {tenant} was accepted")
            }
            (Place::Moving { .. }, Err(_)) => {}
            (Place::CutOver { .. }, _) => unreachable!("not requested"),
        }
        Ok(())
    }

    async fn cutover(&mut self, model: &mut Model, tenant: u8) -> Result<()> {
        let id = TenantId::new(tenant.to_string())?;
        match model.place[&tenant] {
            Place::Moving { remote } => {
                wait_state(&self.s, self.ids[&tenant], "streaming", SYNC).await?;
                let (mv, attempts) =
                    switchyard::cutover::request::cutover_tenant(&self.config, &id, SYNC).await?;
                ensure!(
                    mv.state == switchyard::registry::MoveState::CutOver,
                    "tenant {tenant} did not cut over: {:?} {attempts:?}",
                    mv.state
                );
                model.place.insert(tenant, Place::CutOver { remote });
                model.frozen.insert(tenant, model.rows[&tenant].clone());
            }
            Place::Source => {
                let r = switchyard::cutover::request::cutover_tenant(&self.config, &id, SYNC).await;
                ensure!(
                    r.is_err(),
                    "a cutover of unmoved tenant {tenant} was accepted"
                );
            }
            Place::CutOver { .. } => {}
        }
        Ok(())
    }

    fn crash(&mut self) -> Result<()> {
        self.daemon.check_alive()?;
        self.daemon.kill9();
        self.daemon = Process::start(&self.path, &self.log, false)?;
        Ok(())
    }

    async fn check(&mut self, model: &Model) -> Result<()> {
        self.daemon.check_alive()?;
        for (tenant, place) in &model.place {
            if let Place::Moving { .. } = place {
                wait_state(&self.s, self.ids[tenant], "streaming", SYNC).await?;
            }
        }
        wait_drained(&self.s, SYNC).await?;
        let expect = |tenant: u8, rows: &Rows| -> BTreeMap<(i32, i32), (i32, i32)> {
            rows.iter()
                .map(|(id, r)| ((i32::from(tenant), *id), *r))
                .collect()
        };
        for (&tenant, place) in &model.place {
            let want = expect(tenant, &model.rows[&tenant]);
            let at_source = World::rows(&self.s, "public.kv", Some(tenant)).await?;
            match *place {
                Place::Source => ensure!(at_source == want, "tenant {tenant} at the source"),
                Place::Moving { remote } | Place::CutOver { remote } => {
                    let target = if remote { &self.d } else { &self.s };
                    let table = format!("{}.kv", schema_of(tenant));
                    let at_target = World::rows(target, &table, None).await?;
                    ensure!(
                        at_target == want,
                        "tenant {tenant} ({place:?}) at its target: {} rows, want {}; differences: {:?}",
                        at_target.len(),
                        want.len(),
                        differences(&at_target, &want)
                    );
                    let source_want = match place {
                        Place::CutOver { .. } => expect(tenant, &model.frozen[&tenant]),
                        _ => want,
                    };
                    ensure!(
                        at_source == source_want,
                        "tenant {tenant} ({place:?}) at the source"
                    );
                }
            }
            if let Place::CutOver { .. } = place {
                let refused = self
                    .s
                    .batch_execute(&format!(
                        "UPDATE public.kv SET v = v WHERE tenant_id = {tenant}"
                    ))
                    .await
                    .err()
                    .and_then(|e| e.code().map(|c| c.code().to_owned()));
                ensure!(
                    refused.as_deref() == Some("SY001"),
                    "the source took a write of cut-over tenant {tenant}: {refused:?}"
                );
            }
        }
        Ok(())
    }

    async fn run(&mut self, ops: &[Op]) -> Result<()> {
        let mut model = Model::new();
        for (n, op) in ops.iter().enumerate() {
            let r = match op {
                Op::Txn(w) => self.txn(&mut model, w).await,
                Op::Move { tenant, remote } => self.request(&mut model, *tenant, *remote).await,
                Op::Cutover { tenant } => self.cutover(&mut model, *tenant).await,
                Op::Crash => self.crash(),
                Op::Check => self.check(&model).await,
            };
            r.with_context(|| format!("step {n}: {op:?}"))?;
        }
        self.check(&model).await.context("the final check")?;
        let count = |f: fn(&Op) -> bool| ops.iter().filter(|o| f(o)).count();
        eprintln!(
            "program: {} steps ({} transactions, {} move requests, {} cutover requests, {} crashes, {} checks); ends with {:?}",
            ops.len(),
            count(|o| matches!(o, Op::Txn(_))),
            count(|o| matches!(o, Op::Move { .. })),
            count(|o| matches!(o, Op::Cutover { .. })),
            count(|o| matches!(o, Op::Crash)),
            count(|o| matches!(o, Op::Check)),
            model.place.values().collect::<Vec<_>>()
        );
        Ok(())
    }
}

/// Keys whose rows differ (first few), for a failure message.
fn differences(
    got: &BTreeMap<(i32, i32), (i32, i32)>,
    want: &BTreeMap<(i32, i32), (i32, i32)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for k in got.keys().chain(want.keys()) {
        if got.get(k) != want.get(k) {
            out.push(format!(
                "{k:?}: got {:?} want {:?}",
                got.get(k),
                want.get(k)
            ));
        }
    }
    out.sort();
    out.dedup();
    out.truncate(10);
    out
}

fn program(ops: Vec<Op>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut world = World::start().await?;
        let r = world.run(&ops).await;
        if r.is_err() {
            let log = std::fs::read_to_string(&world.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "daemon log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        r
    })
}

fn cases() -> u32 {
    std::env::var("SWITCHYARD_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Each case starts two clusters and a daemon: shrink a little, not for hours.
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    })]

    #[test]
    fn moves_crashes_and_cutovers_match_the_model(
        ops in prop::collection::vec(op_strategy(), 8..32)
    ) {
        program(ops).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    }
}
