//! Pairs requests with responses, per connection: the only modules that know about pending
//! requests. The two directions of a TCP connection — positions, capture times, gaps and the
//! evidence of acknowledgment numbers — are handled once, by the [`duplex`]; each protocol
//! ([`redis`], [`memcached`], [`memcached_binary`], [`dns`]) keeps only its parsers and its
//! pairing policy. What they produce, and the caps and counters they share, are here.

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::modes::PortModes;
use crate::steps::flow::{Direction, FlowKey, StreamEvent};

pub mod dns;
pub mod duplex;
#[cfg(test)]
pub(crate) mod harness;
pub mod memcached;
pub mod memcached_binary;
pub mod multi;
pub mod redis;

pub use memcached::MemcachedPairing;
pub use redis::RedisPairing;

/// One request paired with its response.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    /// The connection (or the query's client and server): [`Exchange::client`],
    /// [`Exchange::server`].
    pub flow: FlowKey,
    /// Capture time of the segment holding the request's first byte, µs.
    pub req_start_us: u64,
    /// The request's time: the latest capture time among the segments holding its bytes
    /// (when the server could first have had it whole), µs.
    pub req_done_us: u64,
    /// Capture time of the segment holding the response's first byte, µs.
    pub rsp_start_us: u64,
    /// `rsp_start_us - req_done_us`; 0 when negative (two CPUs' capture clocks: counted as
    /// clock skew).
    pub latency_us: u64,
    /// The part of the latency the server spent on this request: its reply's time minus the
    /// later of its request's time and the previous reply's on the connection. The rest,
    /// `latency_us - own_us`, it waited behind earlier requests of the connection. Equal to
    /// the latency when nothing was outstanding (and for DNS, whose server answers each
    /// query on its own).
    pub own_us: u64,
    /// Requests outstanding on the connection when this one was sent, itself included: 1
    /// unpipelined.
    pub depth: u32,
    /// The command name, upper case (`GET`).
    pub command: &'a [u8],
    /// The command and its arguments as sent, cut at [`SUMMARY_BYTES`].
    pub summary: &'a [u8],
    /// True when the summary was cut.
    pub truncated: bool,
    /// Bytes of the request.
    pub req_bytes: u64,
    /// Bytes of the response.
    pub rsp_bytes: u64,
    /// The response is an error.
    pub error: bool,
    /// Keys found, for a retrieval (memcached).
    pub hits: u32,
    /// Keys not found, for a retrieval (memcached).
    pub misses: u32,
    /// The response code (DNS).
    pub rcode: Option<u8>,
    /// The Redis Cluster hash slot of the request's first key (Redis).
    pub slot: Option<u16>,
    /// The reply redirects the client to another node (Redis Cluster `-MOVED`, `-ASK`): not
    /// an error.
    pub redirect: Option<crate::l7::cluster::Redirect>,
    /// The template of the request's first key (`user:{id}:cart`), when templates are on.
    pub template: Option<&'a [u8]>,
    /// The keys the request names (its fan-out: `MGET k1 k2 k3` names 3); 0 without a key,
    /// or when templates are off.
    pub keys: u32,
}

impl<'a> Exchange<'a> {
    /// The exchange with its first key's template, and the keys its request names. By
    /// value, so that the exchange is filled in where it lies rather than copied.
    pub fn with_template(self, template: &'a [u8], keys: u32) -> Self {
        Self {
            template: Some(template),
            keys,
            ..self
        }
    }

    /// The client's address and port.
    pub fn client(&self) -> SocketAddr {
        self.flow.client()
    }

    /// The server's address and port.
    pub fn server(&self) -> SocketAddr {
        self.flow.server()
    }
}

/// Why an exchange was not timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// Its connection ended, went idle, or the queue overflowed before a reply came.
    Timeout,
    /// Its reply was not captured whole (a hole in the reply stream).
    ReplyLost,
    /// Request bytes were not captured (a hole in the request stream); the command is not
    /// known.
    RequestLost,
    /// Its position could not be proven after a gap or invalid bytes.
    Uncertain,
    /// A reply waited longer than the bound for request bytes the capture never had; the
    /// command is not known.
    TooEarly,
}

impl Unanswered {
    /// The reasons an exchange was not timed although it may have been answered, with their
    /// names in the stats JSON and the metrics.
    pub const UNTIMED: [(Unanswered, &'static str); 4] = [
        (Unanswered::RequestLost, "request_lost"),
        (Unanswered::ReplyLost, "reply_lost"),
        (Unanswered::Uncertain, "uncertain"),
        (Unanswered::TooEarly, "reply_before_request"),
    ];
}

/// The per-connection state of a protocol mode, fed by the flow table.
pub trait Connection: Default {
    /// Chooses the protocol of a new connection, for an agent watching several; called with
    /// the server port before each event.
    fn prepare(&mut self, _server_port: u16, _modes: &PortModes) {}
    /// One direction of the connection said something.
    fn on_event<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        event: StreamEvent<'_>,
        cx: &mut MatchContext<'_, S>,
    );
    /// The connection ended.
    fn on_close<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>);
    /// The connection is quiet: it gives back the spare memory of its buffers.
    fn shrink(&mut self) {}
}

/// Raw mode: nothing parsed.
impl Connection for () {
    fn on_event<S: ExchangeSink>(
        &mut self,
        _: &FlowKey,
        _: Direction,
        _: u64,
        _: StreamEvent<'_>,
        _: &mut MatchContext<'_, S>,
    ) {
    }
    fn on_close<S: ExchangeSink>(&mut self, _: &FlowKey, _: &mut MatchContext<'_, S>) {}
}

/// Receives what the matcher pairs, and what it gives up on.
pub trait ExchangeSink {
    /// A completed exchange.
    fn exchange(&mut self, e: &Exchange<'_>);
    /// A request that will never be paired.
    fn unanswered(&mut self, server: SocketAddr, command: &[u8], why: Unanswered);
    /// A request that went unanswered past its timeout (DNS); `e` has no response fields.
    fn expired(&mut self, e: &Exchange<'_>) {
        self.unanswered(e.server(), e.command, Unanswered::Timeout);
    }
}

/// Caps on pending requests, and what matching works out beside the pairs.
#[derive(Debug, Clone, Copy)]
pub struct MatchLimits {
    /// Pending requests per connection; past it the oldest is given up as a timeout.
    pub max_pending_per_connection: usize,
    /// Pending requests over all connections; past it new requests are not tracked.
    pub max_pending_total: usize,
    /// How long a DNS query waits for its response, µs.
    pub dns_timeout_us: u64,
    /// Redis requests get the hash slot of their first key (the agent: with `--slots`).
    pub hash_slots: bool,
    /// Keys are folded into templates by these rules (the agent: unless `--no-templates`).
    pub key_rules: Option<&'static crate::l7::templates::KeyRules>,
}

impl Default for MatchLimits {
    fn default() -> Self {
        Self {
            max_pending_per_connection: 4096,
            max_pending_total: 1 << 20,
            dns_timeout_us: 5_000_000,
            hash_slots: false,
            key_rules: None,
        }
    }
}

/// What the matcher saw, over all connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MatchCounters {
    /// Requests that expect no reply (not waited for).
    pub noreply: u64,
    /// Server messages that answer no request (pushes, pub/sub messages, MONITOR output).
    pub unsolicited: u64,
    /// Replies with no pending request to pair with.
    pub unmatched: u64,
    /// Streams desynchronised by a gap or invalid bytes.
    pub desyncs: u64,
    /// Bytes skipped while resynchronising.
    pub resync_skipped_bytes: u64,
    /// Requests pending now, over all connections.
    pub pending: u64,
}

impl MatchCounters {
    /// Adds another matcher's counters (of separate connections).
    pub fn merge(&mut self, other: &MatchCounters) {
        self.noreply += other.noreply;
        self.unsolicited += other.unsolicited;
        self.unmatched += other.unmatched;
        self.desyncs += other.desyncs;
        self.resync_skipped_bytes += other.resync_skipped_bytes;
        self.pending += other.pending;
    }
}

/// Everything a connection's matching reports to.
pub struct MatchContext<'a, S: ExchangeSink> {
    /// The caps.
    pub limits: &'a MatchLimits,
    /// The counters.
    pub counters: &'a mut MatchCounters,
    /// Where exchanges go.
    pub sink: &'a mut S,
}

/// When each message of a stream began and when it was whole: a message carried over from
/// earlier pieces began at the remembered time and is whole at the latest capture time of its
/// pieces; the others lie in the piece that completes them.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkClock {
    partial_start_us: u64,
    partial_latest_us: u64,
}

/// The times of the messages of one piece, in order.
#[derive(Debug)]
pub struct ChunkTimer {
    ts_us: u64,
    carried: bool,
    carried_start_us: u64,
    carried_latest_us: u64,
    first: bool,
}

impl ChunkTimer {
    /// The capture time of the first byte of the next message completed in this piece.
    pub fn next_start(&mut self) -> u64 {
        self.next_times().0
    }

    /// The next message completed in this piece: the capture time of its first byte, and
    /// the latest capture time among the pieces holding its bytes.
    pub fn next_times(&mut self) -> (u64, u64) {
        let times = if self.first && self.carried {
            (
                self.carried_start_us,
                self.carried_latest_us.max(self.ts_us),
            )
        } else {
            (self.ts_us, self.ts_us)
        };
        self.first = false;
        times
    }
}

impl ChunkClock {
    /// Starts a piece captured at `ts_us`; `carried` when a message was partly read before it.
    pub fn begin(&self, ts_us: u64, carried: bool) -> ChunkTimer {
        ChunkTimer {
            ts_us,
            carried,
            carried_start_us: self.partial_start_us,
            carried_latest_us: self.partial_latest_us,
            first: true,
        }
    }

    /// Ends a piece; `in_message` when a message is left partly read.
    pub fn end(&mut self, timer: &ChunkTimer, in_message: bool) {
        if !in_message {
            return;
        }
        if timer.first && timer.carried {
            // The carried message goes on through this whole piece.
            self.partial_latest_us = self.partial_latest_us.max(timer.ts_us);
        } else {
            self.partial_start_us = timer.ts_us;
            self.partial_latest_us = timer.ts_us;
        }
    }
}

/// The time inside a pipeline of one connection: when its previous reply came, for the own
/// time of the next exchange ([`Exchange::own_us`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct PipelineClock {
    last_reply_us: u64,
}

impl PipelineClock {
    /// The own time of an exchange paired now (replies pair in stream order), and remembers
    /// its reply.
    #[inline(always)]
    pub fn own_time(&mut self, req_done_us: u64, rsp_start_us: u64) -> u64 {
        let from = req_done_us.max(self.last_reply_us);
        self.last_reply_us = self.last_reply_us.max(rsp_start_us);
        rsp_start_us.saturating_sub(from)
    }

    /// Positions were lost: what was outstanding is unknown, and the duplex resumes only at
    /// a request sent once every earlier reply had come.
    pub fn reset(&mut self) {
        self.last_reply_us = 0;
    }
}

/// Queues a pending request. A queue starts with room for one: most connections have one
/// request out at a time (a `VecDeque` would take room for four per connection), and it
/// grows from there when they pipeline.
#[inline(always)]
pub(crate) fn queue_pending<T>(queue: &mut VecDeque<T>, request: T) {
    if queue.len() == queue.capacity() {
        make_room_for_one(queue);
    }
    queue.push_back(request);
}

/// Room for one more in a full queue: exactly one in an empty one, double otherwise.
#[cold]
#[inline(never)]
fn make_room_for_one<T>(queue: &mut VecDeque<T>) {
    if queue.capacity() == 0 {
        queue.reserve_exact(1);
    } else {
        queue.reserve(1);
    }
}

/// The pending requests of a connection whose depth counted `answered` requests just
/// answered by a reply at `rsp_start_us` (the reply's own request, and quiet ones before it
/// that its coming proves answered): those sent at or after that reply (the capture
/// delivered them before it) had not these requests outstanding. `depth_of` gives a pending
/// request's time and its depth; requests are in sending order, so only the latest ones
/// need looking at.
#[inline(always)]
pub(crate) fn settle_depths<T>(
    pending: &mut VecDeque<T>,
    rsp_start_us: u64,
    answered: u32,
    mut depth_of: impl FnMut(&mut T) -> (u64, &mut u32),
) {
    // In capture order the latest request was sent before the reply: the common case.
    let Some(last) = pending.back_mut() else {
        return;
    };
    if depth_of(last).0 < rsp_start_us {
        return;
    }
    for p in pending.iter_mut().rev() {
        let (req_done_us, depth) = depth_of(p);
        if req_done_us < rsp_start_us {
            break;
        }
        *depth = depth.saturating_sub(answered).max(1);
    }
}

/// Gives up every pending request of a connection (it ended, or its stream desynchronised),
/// each counted by the sink under `why`.
pub(crate) fn give_up_all<T, S: ExchangeSink>(
    pending: &mut VecDeque<T>,
    server: SocketAddr,
    command_of: impl Fn(&T) -> &[u8],
    why: Unanswered,
    cx: &mut MatchContext<'_, S>,
) {
    cx.counters.pending -= pending.len() as u64;
    for p in pending.drain(..) {
        cx.sink.unanswered(server, command_of(&p), why);
    }
}

/// Makes room for one more pending request under the caps. Returns false when the total over
/// all connections is at its cap: the caller gives the new request up as a timeout. When this
/// connection's own queue is full, its oldest request is given up as a timeout.
pub(crate) fn make_room<T, S: ExchangeSink>(
    pending: &mut VecDeque<T>,
    server: SocketAddr,
    command_of: impl Fn(&T) -> &[u8],
    cx: &mut MatchContext<'_, S>,
) -> bool {
    if cx.counters.pending >= cx.limits.max_pending_total as u64 {
        return false;
    }
    if pending.len() >= cx.limits.max_pending_per_connection {
        if let Some(oldest) = pending.pop_front() {
            cx.counters.pending -= 1;
            cx.sink
                .unanswered(server, command_of(&oldest), Unanswered::Timeout);
        }
    }
    true
}
