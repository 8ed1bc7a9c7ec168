//! The replication task: reads the slot, decodes, hands messages to the consumer under a
//! byte budget, answers the server, and reconnects.
//!
//! Invariants:
//! - Memory held for undelivered messages is bounded by `max_buffered_bytes` (plus one
//!   message): when the budget is spent the task stops reading the socket.
//! - While waiting for budget it still sends status updates on schedule and on request,
//!   so the server's wal_sender_timeout never fires because the consumer is slow.
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
use crate::lsn::{Lsn, ProgressLsn};

/// How often the task checks whether a status update is due.
const FEEDBACK_TICK: Duration = Duration::from_millis(20);
/// A connection that lived this long resets the reconnect backoff.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(30);

/// What to stream and how.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    pub endpoint: Endpoint,
    pub replication: ReplicationConfig,
    /// Report durable positions to the server (advance the slot).
    pub ack: bool,
    /// Where to start; the server starts at max(this, slot's confirmed position).
    pub start: Lsn,
}

/// One decoded message handed to the consumer; dropping it returns its bytes to the budget.
#[derive(Debug)]
pub struct Received {
    pub wal_start: Lsn,
    pub wal_end: Lsn,
    pub message: Message,
    _budget: OwnedSemaphorePermit,
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
    Event(SourceEvent),
    Failed(SourceError),
}

/// The consumer's handle on the replication task.
pub struct ReplicationStream {
    items: mpsc::UnboundedReceiver<Item>,
    durable: Arc<ProgressLsn>,
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
        let durable = Arc::new(ProgressLsn::new(settings.start));
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
            durable: durable.clone(),
            tx,
            shutdown: shutdown_rx,
            decoder: Decoder::new(decoder_opts),
        };
        let span = tracing::info_span!("replication", slot = %settings_slot);
        let task = tokio::spawn(tracing::Instrument::instrument(task.run(conn), span));
        Ok(ReplicationStream {
            items,
            durable,
            shutdown,
            task,
            system,
            proto_version,
            server_version_num,
        })
    }

    /// The next event; `Ok(None)` after shutdown. A returned error is final.
    pub async fn recv(&mut self) -> Result<Option<SourceEvent>, SourceError> {
        match self.items.recv().await {
            Some(Item::Event(e)) => Ok(Some(e)),
            Some(Item::Failed(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// The next event if one is already queued (never waits); `None` when none is, or after
    /// shutdown (then [`Self::recv`] says so). A returned error is final.
    pub fn try_recv(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        match self.items.try_recv() {
            Ok(Item::Event(e)) => Some(Ok(e)),
            Ok(Item::Failed(e)) => Some(Err(e)),
            Err(_) => None,
        }
    }

    /// Declares everything up to `lsn` durable downstream; it may now be confirmed.
    /// The task reports it within one feedback tick (20 ms).
    pub fn mark_durable(&self, lsn: Lsn) {
        self.durable.advance(lsn);
    }

    pub fn durable(&self) -> Lsn {
        self.durable.get()
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

    /// Sends a last status update with the durable position and closes the connection.
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
    durable: Arc<ProgressLsn>,
    tx: mpsc::UnboundedSender<Item>,
    shutdown: watch::Receiver<bool>,
    decoder: Decoder,
}

enum PumpEnd {
    Shutdown,
    ConsumerGone,
}

type Acquire = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

struct Pending {
    wal_start: Lsn,
    wal_end: Lsn,
    message: Message,
    acquire: Acquire,
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
                // Not just `durable`: transactions already queued for the consumer will be
                // processed, so asking the server for them again would duplicate them.
                let resume = self
                    .durable
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
        let mut last_status = Instant::now();
        let mut last_heard = Instant::now();
        // A server that stops talking (partitioned, frozen) would otherwise leave us
        // blocked on a read forever: we ping it and give up after this much silence.
        let silence_limit = (status_interval * 10).max(Duration::from_secs(10));
        let mut last_flush = Lsn::INVALID;
        let mut pending: Option<Pending> = None;
        loop {
            // Handle what is already buffered, until a message has to wait for budget.
            while pending.is_none() {
                let Some(frame) = conn.buffered_frame()? else {
                    break;
                };
                let Some(msg) = conn.copy_message(frame)? else {
                    continue;
                };
                match msg {
                    CopyMessage::Keepalive { wal_end, reply } => {
                        self.feedback.on_keepalive(Lsn(wal_end));
                        if reply {
                            self.send_status(conn, &mut last_flush, false).await?;
                            last_status = Instant::now();
                        }
                    }
                    CopyMessage::XLogData {
                        wal_start,
                        wal_end,
                        payload,
                    } => {
                        let cost = budget_cost(
                            payload.len(),
                            self.settings.replication.max_buffered_bytes,
                        );
                        let message =
                            self.decoder
                                .decode(payload)
                                .map_err(|source| SourceError::Decode {
                                    lsn: Lsn(wal_start),
                                    source,
                                })?;
                        let (wal_start, wal_end) = (Lsn(wal_start), Lsn(wal_end));
                        match self.budget.clone().try_acquire_many_owned(cost) {
                            Ok(permit) => {
                                if !self.deliver(wal_start, wal_end, message, permit) {
                                    return Ok(PumpEnd::ConsumerGone);
                                }
                            }
                            Err(_) => {
                                let budget = self.budget.clone();
                                pending = Some(Pending {
                                    wal_start,
                                    wal_end,
                                    message,
                                    acquire: Box::pin(async move {
                                        budget.acquire_many_owned(cost).await.ok()
                                    }),
                                });
                            }
                        }
                    }
                }
            }

            let waiting = pending.is_some();
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => {
                    self.send_status(conn, &mut last_flush, false).await?;
                    return Ok(PumpEnd::Shutdown);
                }
                permit = async { pending.as_mut().expect("guarded by `waiting`").acquire.as_mut().await }, if waiting => {
                    let p = pending.take().expect("guarded by `waiting`");
                    // Time spent waiting on our consumer is not the server's silence.
                    last_heard = Instant::now();
                    let Some(permit) = permit else { return Ok(PumpEnd::ConsumerGone) };
                    if !self.deliver(p.wal_start, p.wal_end, p.message, permit) {
                        return Ok(PumpEnd::ConsumerGone);
                    }
                }
                _ = ticker.tick() => {
                    let durable = self.durable.get();
                    let moved = self.feedback.peek(durable) != last_flush;
                    let due = last_status.elapsed() >= status_interval;
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
                            && (self.feedback.caught_up(durable)
                                || last_heard.elapsed() > status_interval * 3);
                        self.send_status(conn, &mut last_flush, ask).await?;
                        last_status = Instant::now();
                    }
                }
                r = conn.fill(), if !waiting => {
                    r?;
                    last_heard = Instant::now();
                }
            }
        }
    }

    fn deliver(
        &mut self,
        wal_start: Lsn,
        wal_end: Lsn,
        message: Message,
        permit: OwnedSemaphorePermit,
    ) -> bool {
        self.feedback.on_delivered(&message, wal_end);
        let received = Received {
            wal_start,
            wal_end,
            message,
            _budget: permit,
        };
        self.tx
            .send(Item::Event(SourceEvent::Message(received)))
            .is_ok()
    }

    async fn send_status(
        &mut self,
        conn: &mut ReplicationConnection,
        last_flush: &mut Lsn,
        reply: bool,
    ) -> Result<(), SourceError> {
        let flush = self.feedback.flush(self.durable.get());
        let write = self.feedback.received().max(flush);
        let payload = wire::standby_status(write.0, flush.0, flush.0, wire::pg_now_micros(), reply);
        let advanced = flush != *last_flush && flush.is_valid();
        if advanced {
            crate::failpoint::hit("feedback.before_send");
        }
        conn.send_copy_data(payload).await?;
        if advanced {
            crate::failpoint::hit("feedback.after_send");
            tracing::debug!(%flush, %write, "confirmed to source");
        }
        *last_flush = flush;
        Ok(())
    }
}

/// Budget permits for a message: its size, at least 1, and at most the whole budget so a
/// single huge message can still pass (alone).
fn budget_cost(len: usize, budget: usize) -> u32 {
    let cap = budget.min(u32::MAX as usize);
    len.clamp(1, cap) as u32
}
