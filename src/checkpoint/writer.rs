//! The checkpoint writer: one thread that owns every write to the [`Store`], so the
//! pipeline never waits on the disk to route the next change.
//!
//! Invariants:
//! - Jobs are written in the order they were sent, each [`Batch`] atomically. A job that
//!   waits for its reply ([`Writer::commit`], [`Writer::forget_tenant`]) therefore also
//!   finds every earlier job written.
//! - A position is reported durable ([`Written::Durable`]) only after the synced write that holds it
//!   returned: the slot is confirmed from these reports, never from what was merely sent.
//! - Group commit: the jobs queued while one fsync runs are written together, all but the
//!   last without sync and the last with it. RocksDB's synced write syncs the WAL up to and
//!   including it, so one fsync makes the whole group durable; nothing of the group is
//!   reported before it returns.
//! - After a failed write the writer writes nothing more: later jobs may build on the lost
//!   one. Every later job is answered with the same error, and the pipeline stops on the
//!   first report.
//! - The thread is the only committer of LSN raises, which is what makes the
//!   read-compare-write of [`Store::commit`] safe.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc as async_mpsc, oneshot};

use super::{Batch, CheckpointError, Store};
use crate::lsn::Lsn;
use crate::tenant::TenantId;

/// What the writer reports back to the pipeline.
#[derive(Debug)]
pub enum Written {
    /// Everything up to this source position is durable in RocksDB together with the
    /// applied positions that made it so: it may be confirmed to the source.
    Durable(Lsn),
    /// A write failed; nothing after it was written.
    Failed(CheckpointError),
}

/// How far the slot may be confirmed: never past what RocksDB holds as confirmed
/// (`s:confirmed`), so that at a start a slot confirmed further was moved by someone else.
/// What the stream would confirm beyond it is recorded first, in a batch of its own at
/// most once per interval (apply checkpoints record it as they go), and passes once the
/// writer reports that batch on disk.
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotGate {
    /// On disk: the slot may be confirmed up to here.
    written: Lsn,
    /// Handed to the writer: on disk soon.
    queued: Lsn,
    last_queued: Option<std::time::Instant>,
}

impl SlotGate {
    /// A gate whose state directory holds `recorded` as confirmed.
    pub fn new(recorded: Lsn) -> Self {
        SlotGate {
            written: recorded,
            queued: recorded,
            last_queued: None,
        }
    }

    /// A checkpoint that records `lsn` as confirmed was handed to the writer.
    pub fn queued(&mut self, lsn: Lsn, now: std::time::Instant) {
        if lsn > self.queued {
            self.queued = lsn;
            self.last_queued = Some(now);
        }
    }

    /// The writer reported `lsn` on disk.
    pub fn written(&mut self, lsn: Lsn) {
        self.written = self.written.max(lsn);
    }

    /// How far the slot may be confirmed now.
    pub fn ceiling(&self) -> Lsn {
        self.written
    }

    /// The position to record now so that `wanted` can be confirmed: `None` when it is
    /// queued already, or when the last record was queued less than `every` ago.
    pub fn to_record(
        &mut self,
        wanted: Lsn,
        now: std::time::Instant,
        every: std::time::Duration,
    ) -> Option<Lsn> {
        if wanted <= self.queued
            || self
                .last_queued
                .is_some_and(|at| now.saturating_duration_since(at) < every)
        {
            return None;
        }
        self.queued(wanted, now);
        Some(wanted)
    }
}

enum Job {
    Commit {
        batch: Batch,
        /// The slot position this batch makes durable, reported once it is on disk.
        durable: Option<Lsn>,
        reply: Option<oneshot::Sender<Result<(), CheckpointError>>>,
    },
    Forget {
        tenant: TenantId,
        reply: Option<oneshot::Sender<Result<(), CheckpointError>>>,
    },
}

/// Handle to the writer thread. [`Writer::close`] lets the thread finish the queued jobs and
/// waits for it off the runtime's threads; dropping the handle does the same in place, so
/// the store (and RocksDB's lock on the state directory) is released when the daemon
/// returns, whichever way it returns.
pub struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread. Reports go to `reports`, which the pipeline reads.
    pub fn start(
        store: Arc<Store>,
        reports: async_mpsc::UnboundedSender<Written>,
    ) -> Result<Writer, CheckpointError> {
        let (jobs, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || run(&store, &rx, &reports))
            .map_err(CheckpointError::Spawn)?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job) -> Result<(), CheckpointError> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or(CheckpointError::WriterGone)
    }

    /// Queues a batch and returns at once; `durable`, if any, is reported as
    /// [`Written::Durable`] when the batch is on disk.
    pub fn commit_later(&self, batch: Batch, durable: Option<Lsn>) -> Result<(), CheckpointError> {
        self.send(Job::Commit {
            batch,
            durable,
            reply: None,
        })
    }

    /// Queues a batch and waits until it (and everything queued before it) is on disk.
    pub async fn commit(&self, batch: Batch) -> Result<(), CheckpointError> {
        let (reply, done) = oneshot::channel();
        self.send(Job::Commit {
            batch,
            durable: None,
            reply: Some(reply),
        })?;
        done.await.map_err(|_| CheckpointError::WriterGone)?
    }

    /// Removes everything recorded for `tenant`, after every job queued before.
    pub async fn forget_tenant(&self, tenant: &TenantId) -> Result<(), CheckpointError> {
        let (reply, done) = oneshot::channel();
        self.send(Job::Forget {
            tenant: tenant.clone(),
            reply: Some(reply),
        })?;
        done.await.map_err(|_| CheckpointError::WriterGone)?
    }

    /// Queues the removal of everything recorded for `tenant` and returns at once.
    pub fn forget_tenant_later(&self, tenant: &TenantId) -> Result<(), CheckpointError> {
        self.send(Job::Forget {
            tenant: tenant.clone(),
            reply: None,
        })
    }

    /// Lets the thread write what is queued, then waits for it to exit. The pipeline reads
    /// the last reports after this returns.
    pub async fn close(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            // Joining waits for at most the queued fsyncs; off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            // At most the queued writes remain; the thread needs nothing from the runtime
            // (its reports go to an unbounded channel), so waiting here cannot deadlock.
            let _ = t.join();
        }
    }
}

fn run(store: &Store, rx: &mpsc::Receiver<Job>, reports: &async_mpsc::UnboundedSender<Written>) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        if let Some(error) = &failed {
            for job in group {
                answer(reply_of(job), Err(CheckpointError::Stopped(error.clone())));
            }
            continue;
        }
        let last = group.len() - 1;
        let mut durable = Lsn::INVALID;
        let mut replies = Vec::with_capacity(group.len());
        let mut error = None;
        let mut jobs = group.into_iter().enumerate();
        for (i, job) in jobs.by_ref() {
            let sync = i == last;
            let (result, reply) = match job {
                Job::Commit {
                    batch,
                    durable: d,
                    reply,
                } => {
                    if let Some(d) = d {
                        crate::failpoint::hit("checkpoint.before_commit");
                        durable = durable.max(d);
                    }
                    (store.commit(batch, sync), reply)
                }
                Job::Forget { tenant, reply } => (store.forget_tenant(&tenant, sync), reply),
            };
            replies.push(reply);
            if let Err(e) = result {
                error = Some(e.to_string());
                let _ = reports.send(Written::Failed(e));
                break;
            }
        }
        replies.extend(jobs.map(|(_, job)| reply_of(job)));
        match error {
            None => {
                if durable.is_valid() {
                    crate::failpoint::hit("checkpoint.after_commit");
                    let _ = reports.send(Written::Durable(durable));
                }
                for reply in replies {
                    answer(reply, Ok(()));
                }
            }
            Some(e) => {
                // Nothing of this group is known to be durable: its last, synced write
                // failed or never ran.
                for reply in replies {
                    answer(reply, Err(CheckpointError::Stopped(e.clone())));
                }
                failed = Some(e);
            }
        }
    }
}

type Reply = Option<oneshot::Sender<Result<(), CheckpointError>>>;

fn reply_of(job: Job) -> Reply {
    match job {
        Job::Commit { reply, .. } => reply,
        Job::Forget { reply, .. } => reply,
    }
}

fn answer(reply: Reply, result: Result<(), CheckpointError>) {
    if let Some(r) = reply {
        let _ = r.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn lsn(n: u64) -> Lsn {
        Lsn(n)
    }

    fn applied(tenant: &TenantId, at: u64) -> Batch {
        let mut b = Batch::new();
        b.applied(tenant, lsn(at));
        b
    }

    fn start() -> (
        tempfile::TempDir,
        Arc<Store>,
        Writer,
        async_mpsc::UnboundedReceiver<Written>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (tx, rx) = async_mpsc::unbounded_channel();
        let writer = Writer::start(store.clone(), tx).unwrap();
        (dir, store, writer, rx)
    }

    #[tokio::test]
    async fn queued_batches_land_in_order_and_the_highest_position_is_reported_durable() {
        let (_dir, store, mut writer, mut reports) = start();
        let a = t("acme");
        for at in [10, 20, 30] {
            let mut b = applied(&a, at);
            b.confirmed(lsn(at));
            writer.commit_later(b, Some(lsn(at))).unwrap();
        }
        // A waited-for job returns only after every job queued before it is written.
        writer.commit(applied(&t("other"), 5)).await.unwrap();
        assert_eq!(store.applied(&a).unwrap(), lsn(30));
        assert_eq!(store.confirmed().unwrap(), lsn(30));
        writer.close().await;
        let mut seen = Vec::new();
        while let Ok(w) = reports.try_recv() {
            match w {
                Written::Durable(l) => seen.push(l),
                Written::Failed(e) => panic!("unexpected failure: {e}"),
            }
        }
        // One report per group; however the jobs were grouped, the last one names 30 and
        // the reports only go forward.
        assert_eq!(seen.last(), Some(&lsn(30)));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    #[tokio::test]
    async fn a_forget_queued_after_a_commit_removes_what_the_commit_wrote() {
        let (_dir, store, mut writer, _reports) = start();
        let a = t("acme");
        writer.commit_later(applied(&a, 10), None).unwrap();
        writer.forget_tenant_later(&a).unwrap();
        writer.commit(applied(&t("other"), 7)).await.unwrap();
        assert_eq!(store.applied(&a).unwrap(), Lsn::INVALID);
        writer.commit_later(applied(&a, 12), None).unwrap();
        writer.forget_tenant(&a).await.unwrap();
        assert_eq!(store.applied(&a).unwrap(), Lsn::INVALID);
        assert_eq!(store.applied(&t("other")).unwrap(), lsn(7));
        writer.close().await;
    }

    #[tokio::test]
    async fn after_a_failed_write_nothing_more_is_written_or_reported_durable() {
        let (_dir, store, mut writer, mut reports) = start();
        let a = t("acme");
        // A stored position that cannot be read makes the raise of it fail.
        store
            .db
            .put(tenant_key_for_test(&a), b"not an lsn")
            .unwrap();
        writer.commit_later(applied(&a, 10), Some(lsn(10))).unwrap();
        let later = writer.commit(applied(&t("other"), 20)).await;
        assert!(
            matches!(later, Err(CheckpointError::Stopped(_))),
            "{later:?}"
        );
        assert_eq!(store.applied(&t("other")).unwrap(), Lsn::INVALID);
        let again = writer.forget_tenant(&t("other")).await;
        assert!(
            matches!(again, Err(CheckpointError::Stopped(_))),
            "{again:?}"
        );
        writer.close().await;
        let mut failed = 0;
        while let Ok(w) = reports.try_recv() {
            match w {
                Written::Durable(l) => panic!("{l} reported durable after a failure"),
                Written::Failed(e) => {
                    assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
                    failed += 1;
                }
            }
        }
        assert_eq!(failed, 1);
    }

    #[test]
    fn the_slot_is_confirmed_only_as_far_as_recorded() {
        use std::time::{Duration, Instant};
        let every = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut gate = SlotGate::new(lsn(5));
        assert_eq!(gate.ceiling(), lsn(5), "what the directory held at start");
        assert_eq!(gate.to_record(lsn(4), t0, every), None, "recorded already");
        assert_eq!(gate.to_record(lsn(12), t0, every), Some(lsn(12)));
        assert_eq!(gate.ceiling(), lsn(5), "queued is not on disk");
        assert_eq!(
            gate.to_record(lsn(20), t0, every),
            None,
            "one record per interval"
        );
        gate.written(lsn(12));
        assert_eq!(gate.ceiling(), lsn(12));
        // An apply checkpoint records its position too, and counts as a record.
        let t1 = t0 + every;
        gate.queued(lsn(25), t1);
        assert_eq!(gate.to_record(lsn(25), t1 + every, every), None);
        assert_eq!(gate.to_record(lsn(30), t1 + every / 2, every), None);
        assert_eq!(gate.to_record(lsn(30), t1 + every, every), Some(lsn(30)));
        gate.written(lsn(30));
        gate.written(lsn(25));
        assert_eq!(gate.ceiling(), lsn(30), "positions only go forward");
    }

    #[tokio::test]
    async fn dropping_the_writer_writes_what_was_queued_and_releases_the_state_directory() {
        let (dir, store, writer, _reports) = start();
        writer.commit_later(applied(&t("acme"), 10), None).unwrap();
        drop(writer);
        drop(store);
        let reopened = Store::open(dir.path()).expect("the lock is free once the writer is gone");
        assert_eq!(reopened.applied(&t("acme")).unwrap(), lsn(10));
    }

    #[tokio::test]
    async fn a_closed_writer_refuses_new_jobs() {
        let (_dir, _store, mut writer, _reports) = start();
        writer.close().await;
        assert!(matches!(
            writer.commit_later(Batch::new(), None),
            Err(CheckpointError::WriterGone)
        ));
        assert!(matches!(
            writer.commit(Batch::new()).await,
            Err(CheckpointError::WriterGone)
        ));
    }

    fn tenant_key_for_test(tenant: &TenantId) -> Vec<u8> {
        super::super::tenant_key(tenant, "applied")
    }
}
