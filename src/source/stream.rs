//! The replication task: reads the slot, decodes, hands messages to the consumer under a
//! byte budget, answers the server, and reconnects.
//!
//! Invariants:
//! - Memory held for undelivered messages is bounded by `max_buffered_bytes` plus one batch
//!   waiting for budget (at most 1 MiB, or the budget if smaller) plus one message: when
//!   the budget is spent the task stops reading the socket.
//! - Messages decoded from what one read brought are handed over as one batch: one budget
//!   permit and one channel send (one wake-up of the consumer) per batch instead of per
//!   message; a batch costs at most the whole budget, and its permit returns when the
//!   consumer has taken its last message.
//! - A keepalive is acted on only after every message read before it was handed over: its
//!   position may be confirmed as idle, which must not pass a transaction still queued here.
//! - While waiting for budget it still sends status updates on schedule and on request,
//!   so the server's wal_sender_timeout never fires because the consumer is slow.
//! - With a ceiling (the daemon's stream), no status update confirms past it, whatever is
//!   applied or idle: the consumer records a position before it raises the ceiling there.
//! - Every `select!` arm is cancellation safe: socket reads only append to a buffer and a
//!   waiting budget acquisition is kept across loop turns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::connection::{ReplicationConnection, StartOptions, SystemInfo};
use super::feedback::Feedback;
use super::wire::{self, CopyMessage};
use super::SourceError;
use crate::cluster::Endpoint;
use crate::config::ReplicationConfig;
use crate::decode::{Decoder, DecoderOptions, Message};
use crate::lsn::{CommitLsn, Lsn, ProgressLsn};

/// How often the task checks whether a status update is due.
const FEEDBACK_TICK: Duration = Duration::from_millis(20);
/// A connection that lived this long resets the reconnect backoff.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(30);

/// What to stream and how.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    pub endpoint: Endpoint,
    pub replication: ReplicationConfig,
    /// Report applied positions to the server (advance the slot).
    pub ack: bool,
    /// Where to start; the server starts at max(this, slot's confirmed position).
    pub start: Lsn,
    /// With `Some`, nothing past the ceiling is confirmed: the consumer raises it
    /// ([`ReplicationStream::raise_ceiling`]) to what it recorded, and learns what waits
    /// from [`ReplicationStream::wanted`]. `None` confirms what is applied as it is.
    pub ceiling: Option<Lsn>,
}

/// One decoded message handed to the consumer.
#[derive(Debug)]
pub struct Received {
    pub wal_start: Lsn,
    pub wal_end: Lsn,
    pub message: Message,
}

#[derive(Debug)]
pub enum SourceEvent {
    Message(Received),
    /// The connection was re-established, resuming at `resume_from`. Any transaction that
    /// was open before this event will be sent again from its start: drop it.
    Restarted {
        resume_from: Lsn,
        attempt: u32,
    },
}

enum Item {
    /// Messages in stream order, with the budget they hold until the consumer took them all.
    Batch(Vec<Received>, OwnedSemaphorePermit),
    Event(SourceEvent),
    Failed(SourceError),
}

/// Most messages in one batch: enough to amortise a hand-off, few enough that the consumer
/// starts on the first ones while the task decodes the next read.
const BATCH_MESSAGES: usize = 1024;
/// Most bytes in one batch (less when the budget is smaller).
const BATCH_BYTES: usize = 1 << 20;

/// The consumer's handle on the replication task.
pub struct ReplicationStream {
    items: mpsc::UnboundedReceiver<Item>,
    /// The rest of the batch being handed out, and its budget.
    batch: std::collections::VecDeque<Received>,
    held: Option<OwnedSemaphorePermit>,
    applied: Arc<ProgressLsn>,
    ceiling: Option<Arc<ProgressLsn>>,
    wanted: Arc<ProgressLsn>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    system: SystemInfo,
    proto_version: u32,
    server_version_num: u32,
}

impl ReplicationStream {
    /// Connects and starts streaming. Errors of the first connection (bad credentials, a
    /// missing slot) are returned here rather than retried.
    pub async fn start(settings: StreamSettings) -> Result<Self, SourceError> {
        let applied = Arc::new(ProgressLsn::new(settings.start));
        let ceiling = settings.ceiling.map(|c| Arc::new(ProgressLsn::new(c)));
        let wanted = Arc::new(ProgressLsn::new(settings.start));
        let settings_slot = settings.replication.slot.clone();
        let (conn, system, decoder_opts) = open(&settings, settings.start).await?;
        let (tx, items) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let proto_version = decoder_opts.proto_version;
        let server_version_num = conn.server_version_num();
        let task = Task {
            feedback: Feedback::new(settings.ack, settings.start),
            budget: Arc::new(Semaphore::new(settings.replication.max_buffered_bytes)),
            settings,
            applied: applied.clone(),
            ceiling: ceiling.clone(),
            wanted: wanted.clone(),
            tx,
            shutdown: shutdown_rx,
            decoder: Decoder::new(decoder_opts),
        };
        let span = tracing::info_span!("replication", slot = %settings_slot);
        let task = tokio::spawn(tracing::Instrument::instrument(task.run(conn), span));
        Ok(ReplicationStream {
            items,
            batch: std::collections::VecDeque::new(),
            held: None,
            applied,
            ceiling,
            wanted,
            shutdown,
            task,
            system,
            proto_version,
            server_version_num,
        })
    }

    /// The next event; `Ok(None)` after shutdown. A returned error is final.
    /// Cancellation safe: an item taken from the channel is kept in `batch` before any
    /// await point could drop it.
    pub async fn recv(&mut self) -> Result<Option<SourceEvent>, SourceError> {
        loop {
            if let Some(r) = self.next_queued() {
                return Ok(Some(SourceEvent::Message(r)));
            }
            match self.items.recv().await {
                Some(item) => {
                    if let Some(done) = self.take(item) {
                        return done.map(Some);
                    }
                }
                None => return Ok(None),
            }
        }
    }

    /// The next event if one is already queued (never waits); `None` when none is, or after
    /// shutdown (then [`Self::recv`] says so). A returned error is final.
    pub fn try_recv(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        loop {
            if let Some(r) = self.next_queued() {
                return Some(Ok(SourceEvent::Message(r)));
            }
            let item = self.items.try_recv().ok()?;
            if let Some(done) = self.take(item) {
                return Some(done);
            }
        }
    }

    /// The next message of the current batch; the batch's budget returns with its last one.
    fn next_queued(&mut self) -> Option<Received> {
        let r = self.batch.pop_front();
        if self.batch.is_empty() {
            self.held = None;
        }
        r
    }

    /// Takes one item off the channel: a batch is queued (`None`), anything else returned.
    fn take(&mut self, item: Item) -> Option<Result<SourceEvent, SourceError>> {
        match item {
            Item::Batch(messages, permit) => {
                self.batch.extend(messages);
                self.held = Some(permit);
                None
            }
            Item::Event(e) => Some(Ok(e)),
            Item::Failed(e) => Some(Err(e)),
        }
    }

    /// Declares every transaction up to the commit ending at `end` applied downstream; it
    /// may now be confirmed. The task reports it within one feedback tick (20 ms).
    pub fn mark_applied(&self, end: CommitLsn) {
        self.applied.advance(end.lsn());
    }

    pub fn applied(&self) -> Lsn {
        self.applied.get()
    }

    /// Lets confirmations pass up to `lsn` (see [`StreamSettings::ceiling`]); a stream
    /// without a ceiling ignores it.
    pub fn raise_ceiling(&self, lsn: Lsn) {
        if let Some(c) = &self.ceiling {
            c.advance(lsn);
        }
    }

    /// What the stream would confirm if the ceiling allowed: applied marks and safe idle
    /// positions, as of the task's last feedback tick.
    pub fn wanted(&self) -> Lsn {
        self.wanted.get()
    }

    pub fn system(&self) -> &SystemInfo {
        &self.system
    }

    pub fn proto_version(&self) -> u32 {
        self.proto_version
    }

    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Sends a last status update with the applied position and closes the connection.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

async fn open(
    settings: &StreamSettings,
    resume: Lsn,
) -> Result<(ReplicationConnection, SystemInfo, DecoderOptions), SourceError> {
    let repl = &settings.replication;
    let mut conn =
        ReplicationConnection::connect(&settings.endpoint, repl.max_message_bytes).await?;
    let system = conn.identify_system().await?;
    let max = conn.max_proto_version();
    let proto_version = match repl.proto_version {
        Some(v) if v > max => {
            return Err(SourceError::Protocol(format!(
            "replication.proto_version = {v} but this server (version {}) supports at most {max}",
            conn.server_version_num()
        )))
        }
        Some(v) => v,
        None => max,
    };
    let opts = StartOptions {
        slot: repl.slot.clone(),
        publications: vec![repl.publication.clone()],
        start: resume,
        proto_version,
        streaming: repl.streaming,
        // The `messages` option exists from PostgreSQL 14 on.
        messages: conn.server_version_num() >= 140000,
    };
    conn.start_replication(&opts).await?;
    tracing::info!(
        slot = %repl.slot,
        start = %resume,
        proto_version,
        tls = conn.is_tls(),
        "replication started"
    );
    Ok((
        conn,
        system,
        DecoderOptions {
            proto_version,
            streaming_parallel: false,
        },
    ))
}

struct Task {
    settings: StreamSettings,
    feedback: Feedback,
    budget: Arc<Semaphore>,
    applied: Arc<ProgressLsn>,
    ceiling: Option<Arc<ProgressLsn>>,
    wanted: Arc<ProgressLsn>,
    tx: mpsc::UnboundedSender<Item>,
    shutdown: watch::Receiver<bool>,
    decoder: Decoder,
}

enum PumpEnd {
    Shutdown,
    ConsumerGone,
}

type Acquire = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

/// A batch waiting for budget, and the keepalive that arrived right after it (acted on
/// once the batch is handed over).
struct Pending {
    batch: Vec<Received>,
    acquire: Acquire,
    keepalive: Option<(Lsn, bool)>,
}

/// Messages decoded but not yet handed over, with their budget cost.
#[derive(Default)]
struct Gathered {
    messages: Vec<Received>,
    cost: usize,
}

/// What became of a batch offered to the consumer (with the keepalive that followed it,
/// to be acted on now that it is handed over).
enum Offer {
    Delivered(Option<(Lsn, bool)>),
    Waiting(Pending),
    ConsumerGone,
}

impl Task {
    async fn run(mut self, first: ReplicationConnection) {
        let mut conn = first;
        let mut attempt = 0u32;
        let mut backoff = self.settings.replication.reconnect_initial_backoff;
        loop {
            let started = Instant::now();
            let result = self.pump(&mut conn).await;
            match result {
                Ok(PumpEnd::Shutdown) | Ok(PumpEnd::ConsumerGone) => {
                    conn.close().await;
                    return;
                }
                Err(err) if err.is_transient() => {
                    tracing::warn!(error = %err, "replication connection lost; reconnecting");
                    if started.elapsed() >= HEALTHY_CONNECTION {
                        backoff = self.settings.replication.reconnect_initial_backoff;
                    }
                }
                Err(err) => {
                    let _ = self
                        .tx
                        .send(Item::Failed(err.for_slot(&self.settings.replication.slot)));
                    return;
                }
            }
            // Reconnect loop: transient failures back off, fatal ones end the stream.
            loop {
                attempt += 1;
                if self.sleep_or_shutdown(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(self.settings.replication.reconnect_max_backoff);
                // Not just `applied`: transactions already queued for the consumer will be
                // processed, so asking the server for them again would duplicate them.
                let resume = self
                    .applied
                    .get()
                    .max(self.feedback.delivered())
                    .max(self.settings.start);
                match open(&self.settings, resume).await {
                    Ok((c, _, opts)) => {
                        conn = c;
                        self.decoder = Decoder::new(opts);
                        self.feedback.on_reconnect();
                        let restarted = SourceEvent::Restarted {
                            resume_from: resume,
                            attempt,
                        };
                        if self.tx.send(Item::Event(restarted)).is_err() {
                            conn.close().await;
                            return;
                        }
                        break;
                    }
                    Err(err) if err.is_transient() => {
                        tracing::warn!(error = %err, attempt, "reconnect failed; retrying");
                    }
                    Err(err) => {
                        let err = err.for_slot(&self.settings.replication.slot);
                        let _ = self.tx.send(Item::Failed(err));
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps, returning true if shutdown was requested meanwhile.
    async fn sleep_or_shutdown(&mut self, d: Duration) -> bool {
        if *self.shutdown.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.changed() => true,
        }
    }

    async fn pump(&mut self, conn: &mut ReplicationConnection) -> Result<PumpEnd, SourceError> {
        let status_interval = self.settings.replication.status_interval;
        let mut ticker = tokio::time::interval(FEEDBACK_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = Sent {
            flush: Lsn::INVALID,
            at: Instant::now(),
        };
        let mut last_heard = Instant::now();
        // A server that stops talking (partitioned, frozen) would otherwise leave us
        // blocked on a read forever: we ping it and give up after this much silence.
        let silence_limit = (status_interval * 10).max(Duration::from_secs(10));
        let mut pending: Option<Pending> = None;
        let batch_cap = BATCH_BYTES.min(self.settings.replication.max_buffered_bytes);
        loop {
            // Handle what is already buffered, batch by batch, until a batch has to wait
            // for budget. A message that would take a batch past the cap starts the next.
            let mut carry: Option<(Received, usize)> = None;
            while pending.is_none() {
                let mut gathered = Gathered::default();
                let mut keepalive = None;
                if let Some((r, cost)) = carry.take() {
                    gathered.messages.push(r);
                    gathered.cost = cost;
                }
                loop {
                    let Some(frame) = conn.buffered_frame()? else {
                        break;
                    };
                    let Some(msg) = conn.copy_message(frame)? else {
                        continue;
                    };
                    match msg {
                        CopyMessage::Keepalive { wal_end, reply } => {
                            let k = (Lsn(wal_end), reply);
                            if !gathered.messages.is_empty() {
                                keepalive = Some(k);
                                break;
                            }
                            self.on_keepalive(conn, k, &mut sent).await?;
                        }
                        CopyMessage::XLogData {
                            wal_start,
                            wal_end,
                            payload,
                        } => {
                            let cost = budget_cost(
                                payload.len(),
                                self.settings.replication.max_buffered_bytes,
                            ) as usize;
                            let message = self.decoder.decode(payload).map_err(|source| {
                                SourceError::Decode {
                                    lsn: Lsn(wal_start),
                                    source,
                                }
                            })?;
                            let r = Received {
                                wal_start: Lsn(wal_start),
                                wal_end: Lsn(wal_end),
                                message,
                            };
                            if !gathered.messages.is_empty() && gathered.cost + cost > batch_cap {
                                carry = Some((r, cost));
                                break;
                            }
                            gathered.messages.push(r);
                            gathered.cost += cost;
                            if gathered.messages.len() >= BATCH_MESSAGES {
                                break;
                            }
                        }
                    }
                }
                if gathered.messages.is_empty() {
                    break;
                }
                match self.offer(gathered, keepalive) {
                    Offer::Delivered(Some(k)) => {
                        self.on_keepalive(conn, k, &mut sent).await?;
                    }
                    Offer::Delivered(None) => {}
                    Offer::Waiting(p) => pending = Some(p),
                    Offer::ConsumerGone => return Ok(PumpEnd::ConsumerGone),
                }
            }
            if let (Some(p), Some((r, _))) = (pending.as_mut(), carry) {
                // Already out of the read buffer, so it cannot go back there: it waits
                // with the batch before it, in order.
                p.batch.push(r);
            }

            let waiting = pending.is_some();
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => {
                    self.send_status(conn, &mut sent, false).await?;
                    return Ok(PumpEnd::Shutdown);
                }
                permit = async { pending.as_mut().expect("guarded by `waiting`").acquire.as_mut().await }, if waiting => {
                    let p = pending.take().expect("guarded by `waiting`");
                    // Time spent waiting on our consumer is not the server's silence.
                    last_heard = Instant::now();
                    let Some(permit) = permit else { return Ok(PumpEnd::ConsumerGone) };
                    if !self.deliver(p.batch, permit) {
                        return Ok(PumpEnd::ConsumerGone);
                    }
                    if let Some(keepalive) = p.keepalive {
                        self.on_keepalive(conn, keepalive, &mut sent).await?;
                    }
                }
                _ = ticker.tick() => {
                    let applied = self.applied.get();
                    self.follow_ceiling(applied);
                    let moved = self.feedback.peek(applied) != sent.flush;
                    let due = sent.at.elapsed() >= status_interval;
                    if !waiting && last_heard.elapsed() > silence_limit {
                        return Err(SourceError::Timeout {
                            what: "waiting for the server on the replication connection".into(),
                            after: last_heard.elapsed(),
                        });
                    }
                    if moved || due {
                        // When caught up, ask the server for a keepalive: its wal_end lets
                        // an idle or fully filtered stream confirm past WAL it skipped,
                        // instead of waiting for wal_sender_timeout/2. Silence asks too.
                        let ask = due
                            && (self.feedback.caught_up(applied)
                                || last_heard.elapsed() > status_interval * 3);
                        self.send_status(conn, &mut sent, ask).await?;
                    }
                }
                r = conn.fill(), if !waiting => {
                    r?;
                    last_heard = Instant::now();
                }
            }
        }
    }

    /// Hands `gathered` over if the budget allows now; otherwise it waits as [`Pending`]
    /// (with `keepalive`, to be acted on after it).
    fn offer(&mut self, gathered: Gathered, keepalive: Option<(Lsn, bool)>) -> Offer {
        let budget = self.settings.replication.max_buffered_bytes;
        let cost = budget_cost(gathered.cost, budget);
        match self.budget.clone().try_acquire_many_owned(cost) {
            Ok(permit) => {
                if self.deliver(gathered.messages, permit) {
                    Offer::Delivered(keepalive)
                } else {
                    Offer::ConsumerGone
                }
            }
            Err(_) => {
                let budget = self.budget.clone();
                Offer::Waiting(Pending {
                    batch: gathered.messages,
                    acquire: Box::pin(async move { budget.acquire_many_owned(cost).await.ok() }),
                    keepalive,
                })
            }
        }
    }

    /// A keepalive, once everything read before it is handed over; answered if asked.
    async fn on_keepalive(
        &mut self,
        conn: &mut ReplicationConnection,
        (wal_end, reply): (Lsn, bool),
        sent: &mut Sent,
    ) -> Result<(), SourceError> {
        self.feedback.on_keepalive(wal_end);
        if reply {
            self.send_status(conn, sent, false).await?;
        }
        Ok(())
    }

    /// Takes the consumer's ceiling and tells it what waits behind it.
    fn follow_ceiling(&mut self, applied: Lsn) {
        if let Some(c) = &self.ceiling {
            self.feedback.raise_ceiling(c.get());
        }
        self.wanted.advance(self.feedback.wanted(applied));
    }

    fn deliver(&mut self, batch: Vec<Received>, permit: OwnedSemaphorePermit) -> bool {
        for r in &batch {
            self.feedback.on_delivered(&r.message, r.wal_end);
        }
        self.tx.send(Item::Batch(batch, permit)).is_ok()
    }

    async fn send_status(
        &mut self,
        conn: &mut ReplicationConnection,
        sent: &mut Sent,
        reply: bool,
    ) -> Result<(), SourceError> {
        let applied = self.applied.get();
        self.follow_ceiling(applied);
        let flush = self.feedback.flush(applied);
        let write = self.feedback.received().max(flush);
        let payload = wire::standby_status(write.0, flush.0, flush.0, wire::pg_now_micros(), reply);
        let advanced = flush != sent.flush && flush.is_valid();
        if advanced {
            crate::failpoint::hit("feedback.before_send");
        }
        conn.send_copy_data(payload).await?;
        if advanced {
            crate::failpoint::hit("feedback.after_send");
            tracing::debug!(%flush, %write, "confirmed to source");
        }
        *sent = Sent {
            flush,
            at: Instant::now(),
        };
        Ok(())
    }
}

/// The last standby status sent: what it confirmed, and when (the next one is due a status
/// interval later even when nothing moved, so the server never times us out).
struct Sent {
    flush: Lsn,
    at: Instant,
}

/// Budget permits for a message: its size, at least 1, and at most the whole budget so a
/// single huge message can still pass (alone).
fn budget_cost(len: usize, budget: usize) -> u32 {
    let cap = budget.min(u32::MAX as usize);
    len.clamp(1, cap) as u32
}
