//! Which chunk reads run: at most `workers` windows open over all moving tenants, started in
//! a rotating order of tenants so that a big tenant does not starve the rest.
//!
//! Invariants:
//! - A table has at most one window in flight (its [`TableCopy`](super::TableCopy) hands out
//!   the next chunk only when none is); a range chunk gets a following reader that goes on
//!   with the range, one chunk ahead at most.
//! - Chunks carry this run's id: watermarks of an earlier run are ignored.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::reader::{self, ChunkEvent, ChunkJob, Pool};
use super::table::TableMove;
use super::ChunkSpec;
use crate::sql::QualifiedName;
use crate::tenant::TenantId;

/// A moving tenant's tables, as the scheduler sees them.
pub(crate) struct Reading<'a> {
    pub tenant: &'a TenantId,
    /// Whether its tables may start reads now (copying, or in sync up to its flip: a row
    /// that arrived without its TOAST values is read again until then).
    pub may_read: bool,
    pub tables: &'a mut BTreeMap<QualifiedName, TableMove>,
}

/// Starts chunk reads for the moving tenants.
pub(crate) struct Scheduler {
    pool: Arc<Pool>,
    events: mpsc::UnboundedSender<ChunkEvent>,
    run: u64,
    workers: usize,
    chunk_rows: usize,
    rotation: usize,
}

impl Scheduler {
    /// Reads go through `pool` and report on `events`; at most `workers` windows are open
    /// at once, of at most `chunk_rows` rows each.
    pub fn new(
        pool: Arc<Pool>,
        events: mpsc::UnboundedSender<ChunkEvent>,
        run: u64,
        workers: usize,
        chunk_rows: usize,
    ) -> Scheduler {
        Scheduler {
            pool,
            events,
            run,
            workers,
            chunk_rows,
            rotation: 0,
        }
    }

    /// Starts reads while fewer than `workers` windows are open, beginning one tenant
    /// further along at each call.
    pub fn schedule(&mut self, mut tenants: Vec<Reading<'_>>) {
        let mut open: usize = tenants
            .iter()
            .flat_map(|t| t.tables.values())
            .filter(|tm| tm.copy.in_flight().is_some())
            .count();
        if open >= self.workers || tenants.is_empty() {
            return;
        }
        let n = tenants.len();
        self.rotation = (self.rotation + 1) % n;
        for k in 0..n {
            let t = &mut tenants[(self.rotation + k) % n];
            if !t.may_read {
                continue;
            }
            for (name, tm) in t.tables.iter_mut() {
                if open >= self.workers {
                    return;
                }
                if tm.copy.in_flight().is_some() {
                    continue;
                }
                if let Some((chunk, spec)) = tm.copy.next_chunk(self.chunk_rows) {
                    open += 1;
                    let follow = match spec {
                        ChunkSpec::Range { .. } => {
                            let (tx, rx) = tokio::sync::watch::channel(0);
                            tm.follow = Some(tx);
                            Some(rx)
                        }
                        ChunkSpec::Keys(_) => None,
                    };
                    let job = ChunkJob {
                        run: self.run,
                        tenant: t.tenant.clone(),
                        table: name.clone(),
                        chunk,
                        spec,
                        layout: tm.chunk.clone(),
                        follow,
                    };
                    reader::spawn(job, self.pool.clone(), self.events.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::chunk::ChunkTable;
    use crate::backfill::KeyKind;
    use crate::config::{Config, ProcessEnv};

    fn tables(n: usize) -> BTreeMap<QualifiedName, TableMove> {
        (0..n)
            .map(|i| {
                let source = QualifiedName::parse(&format!("public.t{i}")).unwrap();
                let tm = TableMove::new(
                    ChunkTable {
                        source: source.clone(),
                        columns: vec!["tenant_id".into(), "id".into()],
                        key: vec![(0, KeyKind::Int), (1, KeyKind::Int)],
                        tenant: Some(("tenant_id".into(), "integer".into())),
                    },
                    QualifiedName::parse(&format!("acme.t{i}")).unwrap(),
                );
                (source, tm)
            })
            .collect()
    }

    fn in_flight(t: &BTreeMap<QualifiedName, TableMove>) -> usize {
        t.values()
            .filter(|tm| tm.copy.in_flight().is_some())
            .count()
    }

    /// The reads themselves fail (nothing listens on the port); only which windows open is
    /// looked at.
    #[tokio::test]
    async fn windows_stay_under_the_worker_cap_and_the_start_rotates_over_tenants() {
        let text = "[source]\nuser = \"u\"\ndbname = \"app\"\nport = 1\n";
        let config = Config::from_toml(text, std::path::Path::new("t.toml"), &ProcessEnv).unwrap();
        let (events, _rx) = mpsc::unbounded_channel();
        let pool = Pool::new(config.source.clone(), 0);
        let mut s = Scheduler::new(pool, events, 1, 3, 100);
        let ids: Vec<TenantId> = ["a", "b", "c"]
            .iter()
            .map(|t| TenantId::new(t.to_string()).unwrap())
            .collect();
        let mut tenants: Vec<BTreeMap<QualifiedName, TableMove>> =
            (0..3).map(|_| tables(2)).collect();
        let reading = reading_of;
        s.schedule(reading(&mut tenants, &ids));
        let open: Vec<usize> = tenants.iter().map(in_flight).collect();
        assert_eq!(open.iter().sum::<usize>(), 3, "{open:?}");
        assert_eq!(open[2], 0, "a tenant that may not read starts nothing");
        // At the cap: nothing more starts.
        s.schedule(reading(&mut tenants, &ids));
        assert_eq!(tenants.iter().map(in_flight).sum::<usize>(), 3);
        // Every window closes: the next round starts one tenant further along, so the
        // tenant that got one window before now gets both of its tables first.
        let first: Vec<usize> = open.clone();
        for t in tenants.iter_mut() {
            for tm in t.values_mut() {
                if let Some(c) = tm.copy.in_flight() {
                    tm.abandon(c);
                }
            }
        }
        s.schedule(reading(&mut tenants, &ids));
        let second: Vec<usize> = tenants.iter().map(in_flight).collect();
        assert_eq!(second.iter().sum::<usize>(), 3, "{second:?}");
        assert_eq!(second[2], 0);
        assert_ne!(
            first, second,
            "the start rotated: {first:?} then {second:?}"
        );
    }

    fn reading_of<'a>(
        tenants: &'a mut [BTreeMap<QualifiedName, TableMove>],
        ids: &'a [TenantId],
    ) -> Vec<Reading<'a>> {
        tenants
            .iter_mut()
            .zip(ids)
            .map(|(tables, tenant)| Reading {
                tenant,
                // Tenant c is not reading (say, paused).
                may_read: tenant.as_str() != "c",
                tables,
            })
            .collect()
    }
}
