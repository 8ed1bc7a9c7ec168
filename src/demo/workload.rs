//! The demo's SaaS schema, its seed data and a live write workload that follows the routes.
//!
//! Invariants:
//! - Every write names its tenant; a tenant's writes go where `switchyard.routes` says it
//!   lives, re-read when the old location refuses a write (SQLSTATE SY001, the cutover's
//!   fence) — the way an application is expected to follow a move.
//! - Values are bound parameters; the only names put into SQL are schemas read from the
//!   routes table, quoted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_postgres::Client;

use switchyard::sql::quote_ident;

pub const SCHEMA: &str = "
CREATE TABLE public.tenants (
  id int PRIMARY KEY, name text NOT NULL, plan text NOT NULL);
CREATE TABLE public.users (
  tenant_id int NOT NULL, id bigserial, email text NOT NULL, name text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, id), UNIQUE (tenant_id, email));
CREATE TABLE public.orders (
  tenant_id int NOT NULL, id bigserial, user_id bigint NOT NULL,
  status text NOT NULL, total numeric(12,2) NOT NULL DEFAULT 0, note text,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, id),
  FOREIGN KEY (tenant_id, user_id) REFERENCES public.users (tenant_id, id));
CREATE TABLE public.line_items (
  tenant_id int NOT NULL, order_id bigint NOT NULL, n int NOT NULL,
  sku text NOT NULL, qty int NOT NULL, price numeric(10,2) NOT NULL,
  PRIMARY KEY (tenant_id, order_id, n),
  FOREIGN KEY (tenant_id, order_id) REFERENCES public.orders (tenant_id, id) ON DELETE CASCADE);
";

/// The tables a move carries (`tenants` is global: no tenant column).
pub const TABLES: [&str; 3] = ["public.users", "public.orders", "public.line_items"];

/// Row counts of the seed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seeded {
    pub users: i64,
    pub orders: i64,
    pub line_items: i64,
}

impl Seeded {
    pub fn total(&self) -> i64 {
        self.users + self.orders + self.line_items
    }
}

/// Orders of tenant `rank` (0 = biggest): a long tail, the way SaaS tenants are sized.
pub fn orders_for(rank: usize, tenants: usize, total_orders: u64) -> u64 {
    let weight = |r: usize| 1.0 / (r as f64 + 1.0);
    let sum: f64 = (0..tenants).map(weight).sum();
    ((total_orders as f64 * weight(rank) / sum).round() as u64).max(5)
}

/// Creates the schema and `tenants` tenants of uneven size (tenant ids 1..=tenants, 1 the
/// biggest), about `total_orders` orders with 1–3 line items each.
pub async fn seed(client: &Client, tenants: usize, total_orders: u64) -> Result<Seeded> {
    client
        .batch_execute(SCHEMA)
        .await
        .context("creating the demo schema")?;
    for rank in 0..tenants {
        let id = rank as i32 + 1;
        let orders = orders_for(rank, tenants, total_orders) as i64;
        let users = (orders / 6).max(3);
        let plan = match rank {
            0..=2 => "enterprise",
            3..=9 => "business",
            _ => "starter",
        };
        client
            .execute(
                "INSERT INTO public.tenants VALUES ($1::int, 'Tenant ' || $1::int, $2::text)",
                &[&id, &plan],
            )
            .await?;
        client
            .execute(
                "INSERT INTO public.users (tenant_id, email, name) \
                 SELECT $1::int, 'user' || g || '@tenant' || $1::int || '.example', 'User ' || g \
                   FROM generate_series(1, $2::bigint) g",
                &[&id, &users],
            )
            .await?;
        client
            .execute(
                "INSERT INTO public.orders (tenant_id, user_id, status, total, note, created_at) \
                 SELECT $1::int, u.first + g % $2::bigint, \
                        (ARRAY['new','paid','shipped','delivered'])[1 + g % 4], \
                        round((random() * 500)::numeric, 2), \
                        CASE WHEN g % 7 = 0 THEN repeat('gift wrap, leave at the door; ', 8) END, \
                        now() - make_interval(mins => g::int) \
                   FROM generate_series(1, $3::bigint) g, \
                        (SELECT min(id) AS first FROM public.users WHERE tenant_id = $1::int) u",
                &[&id, &users, &orders],
            )
            .await?;
        client
            .execute(
                "INSERT INTO public.line_items \
                 SELECT o.tenant_id, o.id, n, 'SKU-' || (o.id * 7 + n) % 10000, 1 + n, \
                        round((random() * 100)::numeric, 2) \
                   FROM public.orders o, generate_series(1, 1 + (o.id % 3)::int) n \
                  WHERE o.tenant_id = $1",
                &[&id],
            )
            .await?;
    }
    client.batch_execute("ANALYZE").await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM public.users), (SELECT count(*) FROM public.orders), \
                    (SELECT count(*) FROM public.line_items)",
            &[],
        )
        .await?;
    Ok(Seeded {
        users: row.get(0),
        orders: row.get(1),
        line_items: row.get(2),
    })
}

/// What the workload did.
#[derive(Debug, Default)]
pub struct Counters {
    pub committed: AtomicU64,
    /// Writes the old location refused after a cutover (SY001), each followed by a
    /// re-read of the route.
    pub refused: AtomicU64,
    /// Transactions that failed otherwise (e.g. a lock timeout while fenced), retried.
    pub failed: AtomicU64,
}

/// Where the workload writes: the source database, plus one connection per target.
pub struct Locations {
    pub source: Client,
    /// Target id → connection (the `local` target is the source database).
    pub targets: HashMap<String, Client>,
}

impl Locations {
    fn client(&self, location: &str) -> &Client {
        if location == "source" {
            &self.source
        } else {
            self.targets.get(location).unwrap_or(&self.source)
        }
    }
}

/// A small deterministic generator (the demo needs variety, not cryptography).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes until `stop` resolves: about `tps` transactions per second over every tenant
/// (new orders with line items, status updates, deletes), following routes.
pub async fn run(
    locations: Locations,
    registry_schema: String,
    tenants: usize,
    tps: u32,
    counters: Arc<Counters>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut routes: HashMap<i32, (String, String)> = HashMap::new();
    let interval = Duration::from_secs_f64(1.0 / f64::from(tps.max(1)));
    let mut next = Instant::now();
    let routes_sql = format!(
        "SELECT location, schema_name FROM {}.routes WHERE tenant = $1",
        quote_ident(&registry_schema)
    );
    while !*stop.borrow() {
        let tenant = (rng.next() % tenants as u64) as i32 + 1;
        let (location, schema) = routes
            .entry(tenant)
            .or_insert_with(|| ("source".into(), "public".into()))
            .clone();
        let client = locations.client(&location);
        match write_once(client, &schema, tenant, &mut rng).await {
            Ok(()) => {
                counters.committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let moved =
                    e.code().map(|c| c.code()) == Some(switchyard::cutover::fence::MOVED_SQLSTATE);
                if moved {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
                // Either way, read where the tenant lives now.
                if let Ok(Some(row)) = locations
                    .source
                    .query_opt(&routes_sql, &[&tenant.to_string()])
                    .await
                {
                    routes.insert(tenant, (row.get(0), row.get(1)));
                }
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            tokio::select! {
                _ = tokio::time::sleep(next - now) => {}
                _ = stop.changed() => {}
            }
        } else {
            next = now;
        }
    }
    Ok(())
}

async fn write_once(
    client: &Client,
    schema: &str,
    tenant: i32,
    rng: &mut XorShift,
) -> Result<(), tokio_postgres::Error> {
    let s = quote_ident(schema);
    let pick = rng.next();
    let total = (pick % 50_000) as f64 / 100.0;
    let sql = format!(
        "WITH u AS (SELECT id FROM {s}.users WHERE tenant_id = $1 ORDER BY id LIMIT 1), \
              o AS (INSERT INTO {s}.orders (tenant_id, user_id, status, total) \
                    SELECT $1, u.id, 'new', $2::float8::numeric(12,2) FROM u RETURNING id) \
         INSERT INTO {s}.line_items (tenant_id, order_id, n, sku, qty, price) \
         SELECT $1, o.id, n, 'SKU-' || n, n, 9.99 FROM o, generate_series(1, 2) n"
    );
    let update = format!(
        "UPDATE {s}.orders SET status = 'paid', total = total + 1 \
          WHERE tenant_id = $1 AND id = (SELECT id FROM {s}.orders WHERE tenant_id = $1 \
                                          ORDER BY id DESC OFFSET $2 LIMIT 1)"
    );
    let delete = format!(
        "DELETE FROM {s}.orders WHERE tenant_id = $1 AND id = (SELECT id FROM {s}.orders \
          WHERE tenant_id = $1 ORDER BY id DESC OFFSET 20 LIMIT 1)"
    );
    client.batch_execute("BEGIN").await?;
    let result = async {
        client.execute(&sql, &[&tenant, &total]).await?;
        let offset = (pick % 10) as i64;
        client.execute(&update, &[&tenant, &offset]).await?;
        if pick % 5 == 0 {
            client.execute(&delete, &[&tenant]).await?;
        }
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}
