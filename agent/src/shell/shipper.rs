//! The shipper: a thread of its own that streams the agent's batches to an aggregator, and
//! the [`ShipTap`] through which the capture thread hands them over without ever blocking.
//!
//! One gRPC stream at a time: a hello, every pending batch, then new batches as they close;
//! the aggregator acknowledges batches once durable and the buffer forgets them. A broken
//! stream is re-opened with backoff (0.1 s doubling to 5 s) and every unacknowledged batch
//! is sent again (the aggregator skips those it already stored).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tcpkit_proto::client::{describe_status, error_chain, Connector};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use tcpkit_proto::v1::{self, agent_message::Body};

use crate::matcher::{Exchange, Unanswered};
use crate::shell::spool::{LeftSession, Spool};
use crate::sinks::ship::{event_of, Dropped, IntervalHistograms, IntervalSnapshots, ShipBuffer};

/// Commands queued from the capture thread at most; past it what is sent is dropped
/// (counted).
const QUEUE: usize = 1024;
/// An open batch is closed after this long, so that slow requests reach the aggregator soon.
const BATCH_AGE: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the shipper needs to know.
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// The aggregator, its TLS settings and token.
    pub connector: Connector,
    /// Who this agent is.
    pub hello: v1::Hello,
    /// Bytes of unacknowledged batches kept.
    pub buffer_bytes: usize,
    /// The on-disk spool's directory and its size cap, if any.
    pub spool: Option<(std::path::PathBuf, u64)>,
}

enum Command {
    Events(Vec<v1::Event>),
    /// The snapshots and counters of the pipeline numbered so.
    Interval(usize, IntervalSnapshots, v1::Counters),
    Finish(Duration),
}

/// The capture thread's end: hands events and intervals to the shipper, never blocking.
#[derive(Debug, Clone)]
pub struct ShipTap {
    /// The pipeline it serves, numbered from 0.
    source: usize,
    commands: mpsc::Sender<Command>,
    dropped_events: Arc<AtomicU64>,
    dropped_histograms: Arc<AtomicU64>,
    status: Arc<ShipStatus>,
}

/// The shipper's state as the capture thread may read it (metrics): updated by the shipper
/// thread after everything it does.
#[derive(Debug, Default)]
pub struct ShipStatus {
    /// Bytes of batches kept for (re-)sending.
    pub buffered_bytes: AtomicU64,
    /// Batches the aggregator acknowledged.
    pub acked_batches: AtomicU64,
    /// Events dropped (buffer over its cap, or the hand-over queue full).
    pub dropped_events: AtomicU64,
    /// Histogram snapshots dropped.
    pub dropped_histograms: AtomicU64,
    /// 1 while a stream to the aggregator is open.
    pub connected: AtomicU64,
}

impl ShipStatus {
    fn update(&self, buffer: &ShipBuffer, connected: bool) {
        let dropped = buffer.dropped();
        self.buffered_bytes
            .store(buffer.bytes() as u64, Ordering::Relaxed);
        self.acked_batches
            .store(buffer.acked().0, Ordering::Relaxed);
        self.dropped_events.store(dropped.events, Ordering::Relaxed);
        self.dropped_histograms
            .store(dropped.histograms, Ordering::Relaxed);
        self.connected
            .store(u64::from(connected), Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Events(_) => "Events",
            Command::Interval(..) => "Interval",
            Command::Finish(_) => "Finish",
        })
    }
}

impl ShipTap {
    /// The shipper's state; drops still in the hand-over queue's counters are added.
    pub fn status(&self) -> ShipStatusNow {
        let s = &self.status;
        ShipStatusNow {
            buffered_bytes: s.buffered_bytes.load(Ordering::Relaxed),
            acked_batches: s.acked_batches.load(Ordering::Relaxed),
            dropped_events: s.dropped_events.load(Ordering::Relaxed)
                + self.dropped_events.load(Ordering::Relaxed),
            dropped_histograms: s.dropped_histograms.load(Ordering::Relaxed)
                + self.dropped_histograms.load(Ordering::Relaxed),
            connected: s.connected.load(Ordering::Relaxed) == 1,
        }
    }

    /// Queues slow-request events; counted as dropped when the queue is full.
    pub fn events(&self, events: Vec<v1::Event>) {
        let n = events.len() as u64;
        if self.commands.try_send(Command::Events(events)).is_err() {
            self.dropped_events.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Queues an interval's snapshots with the pipeline's counters.
    pub fn interval(&self, histograms: IntervalSnapshots, counters: v1::Counters) {
        let n = histograms.len() as u64;
        if self
            .commands
            .try_send(Command::Interval(self.source, histograms, counters))
            .is_err()
        {
            self.dropped_histograms.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// The shipper's state at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShipStatusNow {
    /// Bytes of batches kept for (re-)sending.
    pub buffered_bytes: u64,
    /// Batches the aggregator acknowledged.
    pub acked_batches: u64,
    /// Events dropped.
    pub dropped_events: u64,
    /// Histogram snapshots dropped.
    pub dropped_histograms: u64,
    /// A stream to the aggregator is open.
    pub connected: bool,
}

/// How the shipping went, at exit.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShipReport {
    /// Batches and events the aggregator acknowledged.
    pub acked: (u64, u64),
    /// Batches and events of earlier runs, found in the spool and acknowledged.
    pub recovered: (u64, u64),
    /// Batches kept in memory only because the spool was full or would not take them.
    pub not_spooled: u64,
    /// Batches and events left unacknowledged.
    pub unacked: (usize, usize),
    /// What was dropped to stay within the buffer.
    pub dropped: Dropped,
}

impl std::fmt::Display for ShipReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shipped {} batches ({} events) acknowledged, {} batches ({} events) unacknowledged, {} events and {} histograms dropped",
            self.acked.0,
            self.acked.1,
            self.unacked.0,
            self.unacked.1,
            self.dropped.events,
            self.dropped.histograms
        )?;
        if self.recovered.0 > 0 {
            write!(
                f,
                "; {} batches ({} events) of earlier runs recovered from the spool",
                self.recovered.0, self.recovered.1
            )?;
        }
        if self.not_spooled > 0 {
            write!(f, "; {} batches did not fit the spool", self.not_spooled)?;
        }
        Ok(())
    }
}

/// The running shipper thread.
pub struct Shipper {
    tap: ShipTap,
    thread: std::thread::JoinHandle<ShipReport>,
}

impl Shipper {
    /// Starts the shipper thread; it connects in the background.
    pub fn start(config: ShipperConfig) -> Result<Self> {
        let (commands, queue) = mpsc::channel(QUEUE);
        let tap = ShipTap {
            source: 0,
            commands,
            dropped_events: Arc::new(AtomicU64::new(0)),
            dropped_histograms: Arc::new(AtomicU64::new(0)),
            status: Arc::new(ShipStatus::default()),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the shipper's runtime")?;
        let drops = (
            Arc::clone(&tap.dropped_events),
            Arc::clone(&tap.dropped_histograms),
        );
        let status = Arc::clone(&tap.status);
        let spool = match &config.spool {
            Some((dir, cap)) => Some(Spool::open(dir, *cap, &config.hello)?),
            None => None,
        };
        let thread = std::thread::Builder::new()
            .name("shipper".into())
            .spawn(move || runtime.block_on(ship(config, queue, drops, &status, spool)))
            .context("cannot start the shipper thread")?;
        Ok(Self { tap, thread })
    }

    /// The capture thread's end.
    pub fn tap(&self) -> ShipTap {
        self.tap.clone()
    }

    /// The end for pipeline `source` of several that capture live (`--threads`): the
    /// shipped counters are the sum of every pipeline's last.
    pub fn tap_for(&self, source: usize) -> ShipTap {
        ShipTap {
            source,
            ..self.tap.clone()
        }
    }

    /// Ships what is left and waits up to `timeout` for its acknowledgement.
    pub fn finish(self, timeout: Duration) -> ShipReport {
        let _ = self.tap.commands.blocking_send(Command::Finish(timeout));
        drop(self.tap);
        self.thread.join().unwrap_or_default()
    }
}

type Drops = (Arc<AtomicU64>, Arc<AtomicU64>);

/// Waits between connection attempts: 0.1 s, doubling up to 5 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(BACKOFF_MIN)
    }
}

impl Backoff {
    /// When to try again, and a longer wait for the time after.
    fn next_attempt(&mut self) -> Instant {
        let at = Instant::now() + self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        at
    }
}

/// The open stream: where batches go, where acknowledgements come from.
struct Stream {
    out: mpsc::UnboundedSender<v1::AgentMessage>,
    acks: tonic::Streaming<v1::Ack>,
}

async fn open_stream(connector: &Connector, hello: &v1::Hello) -> Result<Stream, tonic::Status> {
    let mut client = connector
        .ingest()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect: {}", error_chain(&e))))?;
    let (out, outbound) = mpsc::unbounded_channel();
    let _ = out.send(v1::AgentMessage {
        body: Some(Body::Hello(hello.clone())),
    });
    let acks = client
        .stream(UnboundedReceiverStream::new(outbound))
        .await?
        .into_inner();
    Ok(Stream { out, acks })
}

async fn ship(
    config: ShipperConfig,
    mut queue: mpsc::Receiver<Command>,
    drops: Drops,
    status: &ShipStatus,
    spool: Option<(Spool, Vec<LeftSession>)>,
) -> ShipReport {
    let (mut spool, left) = spool.unzip();
    let recovered = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let recovery = left.filter(|l| !l.is_empty()).map(|left| {
        tokio::spawn(recover(
            config.connector.clone(),
            left,
            Arc::clone(&recovered),
        ))
    });
    let mut buffer = ShipBuffer::new(config.buffer_bytes);
    let mut stream: Option<Stream> = None;
    let mut backoff = Backoff::default();
    let mut connect_at = Instant::now();
    let mut deadline: Option<Instant> = None;
    let mut batch_deadline = Instant::now() + BATCH_AGE;
    let mut warned = false;
    let take_drops = |buffer: &mut ShipBuffer| {
        buffer.count_dropped(Dropped {
            events: drops.0.swap(0, Ordering::Relaxed),
            histograms: drops.1.swap(0, Ordering::Relaxed),
        });
    };
    loop {
        status.update(&buffer, stream.is_some());
        if let Some(spool) = spool.as_mut() {
            spool.sync(buffer.pending());
        }
        let now = Instant::now();
        if let Some(d) = deadline {
            if buffer.is_drained() || now >= d {
                break;
            }
        }
        if stream.is_none() && now >= connect_at {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                open_stream(&config.connector, &config.hello),
            );
            match attempt.await {
                Ok(Ok(s)) => {
                    if warned {
                        tracing::warn!("connected to the aggregator {}", config.connector.uri());
                    }
                    stream = Some(s);
                    buffer.rewind();
                    // The backoff starts over with the first acknowledgement, not here: a
                    // stream that opens and is refused at once is not retried ten times a
                    // second.
                    warned = false;
                }
                Ok(Err(e)) => {
                    if !warned {
                        tracing::warn!(
                            "aggregator {}: {}; retrying",
                            config.connector.uri(),
                            describe_status(&e)
                        );
                        warned = true;
                    }
                    connect_at = backoff.next_attempt();
                }
                Err(_) => {
                    connect_at = backoff.next_attempt();
                }
            }
        }
        if let Some(s) = &stream {
            for batch in buffer.unsent() {
                let _ = s.out.send(v1::AgentMessage {
                    body: Some(Body::Batch(batch)),
                });
            }
        }
        let waiting_for_queue = deadline.is_none();
        let until = deadline.unwrap_or(batch_deadline).min(if stream.is_none() {
            connect_at
        } else {
            batch_deadline
        });
        tokio::select! {
            command = queue.recv(), if waiting_for_queue => {
                take_drops(&mut buffer);
                match command {
                    Some(Command::Events(events)) => buffer.add_events(events),
                    Some(Command::Interval(source, histograms, counters)) => {
                        buffer.add_interval(source, histograms, counters)
                    }
                    Some(Command::Finish(timeout)) => {
                        buffer.close(true);
                        deadline = Some(Instant::now() + timeout);
                    }
                    None => {
                        buffer.close(true);
                        deadline = Some(Instant::now());
                    }
                }
            }
            ack = async { stream.as_mut().expect("checked by the guard").acks.message().await }, if stream.is_some() => {
                match ack {
                    Ok(Some(ack)) if ack.session == config.hello.session => {
                        buffer.ack(ack.seq);
                        backoff = Backoff::default();
                    }
                    Ok(Some(ack)) => tracing::warn!("acknowledgement for another session {}", ack.session),
                    Err(e) if is_refused_batch(&e) => {
                        // Every batch before it was acknowledged: the oldest pending one is
                        // what the aggregator will never take. It goes, counted.
                        if let Some((seq, events, snapshots)) = buffer.refuse_oldest() {
                            tracing::warn!(
                                "aggregator {} refused batch {seq} ({events} events, {snapshots} snapshots): {}; dropped, counted",
                                config.connector.uri(),
                                describe_status(&e)
                            );
                        }
                        stream = None;
                        connect_at = backoff.next_attempt();
                    }
                    Ok(None) | Err(_) => {
                        if let Err(e) = &ack {
                            tracing::warn!("aggregator {}: {}; reconnecting", config.connector.uri(), describe_status(e));
                            warned = true;
                        }
                        stream = None;
                        connect_at = backoff.next_attempt();
                    }
                }
            }
            _ = tokio::time::sleep_until(until) => {
                if Instant::now() >= batch_deadline {
                    take_drops(&mut buffer);
                    buffer.close(false);
                    batch_deadline = Instant::now() + BATCH_AGE;
                }
            }
        }
    }
    // End the stream cleanly: no more batches, then the aggregator closes its side.
    if let Some(Stream { out, mut acks }) = stream {
        drop(out);
        let closing = async {
            while let Ok(Some(ack)) = acks.message().await {
                buffer.ack(ack.seq)
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
    }
    if let Some(task) = recovery {
        // What is not recovered by now stays in the spool for the next run.
        let left = deadline.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let mut task = task;
        if tokio::time::timeout(left, &mut task).await.is_err() {
            task.abort();
        }
    }
    let mut not_spooled = 0;
    if let Some(mut spool) = spool {
        spool.sync(buffer.pending());
        not_spooled = spool.skipped;
        spool.close();
    }
    ShipReport {
        recovered: (
            recovered.0.load(Ordering::Relaxed),
            recovered.1.load(Ordering::Relaxed),
        ),
        not_spooled,
        acked: buffer.acked(),
        unacked: buffer.unacked(),
        dropped: buffer.dropped(),
    }
}

/// The aggregator's answer to a batch it will never store (it does not add up, or holds what
/// cannot be true): `InvalidArgument`, "bad batch: …".
fn is_refused_batch(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::InvalidArgument && status.message().starts_with("bad batch")
}

/// Delivers the sessions earlier runs left in the spool, each under its own hello, retrying
/// until the aggregator has acknowledged all of them; files go as their batches are acknowledged.
async fn recover(
    connector: Connector,
    left: Vec<LeftSession>,
    recovered: Arc<(AtomicU64, AtomicU64)>,
) {
    let mut backoff = Backoff::default();
    for mut session in left {
        let (batches, _) = session.load();
        let last = batches.last().map_or(0, |b| b.seq);
        let events: BTreeMap<u64, u64> = batches
            .iter()
            .map(|b| (b.seq, b.events.len() as u64))
            .collect();
        let mut acked = 0;
        let mut refused = Vec::new();
        while acked < last {
            match deliver(&connector, &session.hello, &batches, acked, last).await {
                Ok(seq) => acked = seq,
                Err((durable, e)) if is_refused_batch(&e) => {
                    // The first batch past what is durable will never be taken: skip it.
                    let seq = batches
                        .iter()
                        .map(|b| b.seq)
                        .find(|&s| s > durable)
                        .unwrap_or(last);
                    tracing::warn!(
                        "spool: session {}: batch {seq} refused: {}; dropped",
                        session.hello.session,
                        describe_status(&e)
                    );
                    refused.push(seq);
                    acked = seq;
                }
                Err((durable, e)) => {
                    acked = acked.max(durable);
                    tracing::warn!(
                        "spool: session {}: {}; retrying",
                        session.hello.session,
                        describe_status(&e)
                    );
                    tokio::time::sleep_until(backoff.next_attempt()).await;
                }
            }
        }
        let delivered = events.iter().filter(|(seq, _)| !refused.contains(seq));
        let (delivered_batches, delivered_events) =
            delivered.fold((0u64, 0u64), |(b, e), (_, n)| (b + 1, e + n));
        recovered.0.fetch_add(delivered_batches, Ordering::Relaxed);
        recovered.1.fetch_add(delivered_events, Ordering::Relaxed);
        session.forget(last, true);
        tracing::info!(
            "spool: session {} recovered ({} batches)",
            session.hello.session,
            batches.len()
        );
    }
}

/// One attempt to deliver a left session: the batches after the aggregator's last durable one
/// (and after `acked`); returns the highest acknowledged sequence number, or why it stopped
/// with the highest acknowledged by then.
async fn deliver(
    connector: &Connector,
    hello: &v1::Hello,
    batches: &[v1::Batch],
    acked: u64,
    last: u64,
) -> Result<u64, (u64, tonic::Status)> {
    let mut stream = open_stream(connector, hello)
        .await
        .map_err(|e| (acked, e))?;
    let mut durable = acked;
    // The first acknowledgement tells what the aggregator already holds.
    if let Some(ack) = stream.acks.message().await.map_err(|e| (durable, e))? {
        durable = durable.max(ack.seq);
    }
    for batch in batches.iter().filter(|b| b.seq > durable) {
        let _ = stream.out.send(v1::AgentMessage {
            body: Some(Body::Batch(batch.clone())),
        });
    }
    while durable < last {
        match stream.acks.message().await.map_err(|e| (durable, e))? {
            Some(ack) => durable = durable.max(ack.seq),
            None => {
                return Err((
                    durable,
                    tonic::Status::unavailable("the aggregator closed the stream"),
                ))
            }
        }
    }
    Ok(durable)
}

/// The pipeline's shipping sink: accumulates the interval's histograms and slow events and
/// hands them to the [`ShipTap`].
#[derive(Debug)]
pub struct ShipSink {
    tap: ShipTap,
    interval_us: u64,
    /// Start of the current interval (aligned to a multiple of its length), once a packet
    /// came.
    start_us: Option<u64>,
    histograms: IntervalHistograms,
    events: Vec<v1::Event>,
}

/// Events handed to the shipper together.
const EVENT_CHUNK: usize = 512;

impl ShipSink {
    /// The shipper's state now.
    pub fn status(&self) -> ShipStatusNow {
        self.tap.status()
    }

    /// Keeps at most `cap` key templates per (server, port) and interval.
    pub fn set_template_cap(&mut self, cap: usize) {
        self.histograms.set_template_cap(cap);
    }

    /// A sink shipping through `tap`, with intervals of `interval_us`.
    pub fn new(tap: ShipTap, interval_us: u64) -> Self {
        Self {
            tap,
            interval_us: interval_us.max(1),
            start_us: None,
            histograms: IntervalHistograms::default(),
            events: Vec::new(),
        }
    }

    fn aligned(&self, ts_us: u64) -> u64 {
        ts_us - ts_us % self.interval_us
    }

    /// True when capture time `ts_us` is past the current interval (the first call starts
    /// the first interval).
    pub fn interval_due(&mut self, ts_us: u64) -> bool {
        let start = *self
            .start_us
            .get_or_insert(ts_us - ts_us % self.interval_us);
        ts_us >= start + self.interval_us
    }

    /// Counts an exchange; a slow one becomes an event too.
    pub fn exchange(&mut self, e: &Exchange<'_>, slow: bool, proto: &'static str) {
        self.histograms.record(e, slow, proto);
        if slow {
            self.push_event(event_of(e, proto, false));
        }
    }

    /// Counts a request that will never be answered.
    pub fn unanswered(
        &mut self,
        server: std::net::SocketAddr,
        proto: &'static str,
        command: &[u8],
        why: Unanswered,
    ) {
        self.histograms.give_up(server, proto, command, why);
    }

    /// Counts a request that expired, and ships it as a timeout event.
    pub fn expired(&mut self, e: &Exchange<'_>, proto: &'static str) {
        self.histograms
            .give_up(e.server(), proto, e.command, Unanswered::Timeout);
        self.push_event(event_of(e, proto, true));
    }

    fn push_event(&mut self, event: v1::Event) {
        self.events.push(event);
        if self.events.len() >= EVENT_CHUNK {
            self.send_events();
        }
    }

    /// Hands the events gathered so far to the shipper.
    pub fn send_events(&mut self) {
        if !self.events.is_empty() {
            self.tap.events(std::mem::take(&mut self.events));
        }
    }

    /// Ends the current interval at capture time `ts_us`: its snapshots go with `counters`.
    pub fn end_interval(&mut self, ts_us: u64, counters: v1::Counters) {
        self.send_events();
        let start = self.start_us.unwrap_or_else(|| self.aligned(ts_us));
        let snapshots = self.histograms.take(start, self.interval_us);
        self.tap.interval(snapshots, counters);
        self.start_us = Some(self.aligned(ts_us));
    }
}
