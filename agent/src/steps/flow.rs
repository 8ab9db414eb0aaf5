//! Connections: which side is the server, and a bounded table of TCP flows, each with a
//! reassembler per direction and the state its consumer keeps (parser, pending requests).
//!
//! The table owns the flows' lifetimes: a flow ends on RST, once both directions saw their
//! FIN, when it stays idle too long, or when the table is full and it is among the oldest.
//! Each ending is handed to the consumer ([`StreamHandler::on_close`]) with its reason, so
//! that nothing it held disappears without being counted.

use std::net::{IpAddr, SocketAddr};

use std::collections::hash_map::Entry;

use rustc_hash::FxHashMap;

use crate::steps::decode::{tcp_flags, Packet};
use crate::steps::reassembly::{
    Chunk, Piece, Reassembler, ReassemblyCounters, ReassemblyLimits, SegmentMeta,
};

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → server.
    Request,
    /// Server → client.
    Response,
}

/// Tells requests from responses, as DESIGN.md defines it: a packet is a request when its
/// destination port is monitored and, when both ports are equal, its destination address is
/// one of the servers (`-s`) or a local address.
#[derive(Debug, Clone)]
pub struct DirectionRule {
    ports: Box<[u64; 1024]>,
    servers: Vec<IpAddr>,
    local: Vec<IpAddr>,
}

impl DirectionRule {
    /// A rule for the monitored `ports`, server addresses, and this host's addresses.
    pub fn new(ports: &[u16], servers: &[IpAddr], local: &[IpAddr]) -> Self {
        let mut bits = Box::new([0u64; 1024]);
        for &p in ports {
            bits[usize::from(p) / 64] |= 1 << (p % 64);
        }
        Self {
            ports: bits,
            servers: servers.to_vec(),
            local: local.to_vec(),
        }
    }

    /// True when `port` is monitored.
    pub fn is_monitored(&self, port: u16) -> bool {
        self.ports[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    fn is_server_address(&self, addr: &IpAddr) -> bool {
        if self.servers.is_empty() {
            self.local.contains(addr)
        } else {
            self.servers.contains(addr)
        }
    }

    /// The direction of a packet, or `None` when neither port is monitored.
    pub fn classify(&self, p: &Packet<'_>) -> Option<Direction> {
        let (to_server, from_server) = (self.is_monitored(p.dport), self.is_monitored(p.sport));
        match (to_server, from_server) {
            (true, false) => Some(Direction::Request),
            (false, true) => Some(Direction::Response),
            (false, false) => None,
            (true, true) => {
                if self.is_server_address(&p.dst) || !self.is_server_address(&p.src) {
                    Some(Direction::Request)
                } else {
                    Some(Direction::Response)
                }
            }
        }
    }
}

/// A connection, named from the client's side: its addresses and ports as the packets
/// carry them (38 bytes, not two `SocketAddr`'s 64: built, hashed and compared per packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    // The client's port first: connections to one server differ there, so a comparison
    // of two keys mostly ends at it.
    client_port: u16,
    server_port: u16,
    client_ip: IpAddr,
    server_ip: IpAddr,
}

impl FlowKey {
    /// The key of the connection from `client` to `server`.
    pub fn new(client: SocketAddr, server: SocketAddr) -> Self {
        Self {
            client_port: client.port(),
            server_port: server.port(),
            client_ip: client.ip(),
            server_ip: server.ip(),
        }
    }

    /// The key of the connection a packet belongs to.
    #[inline]
    pub fn of(p: &Packet<'_>, direction: Direction) -> Self {
        match direction {
            Direction::Request => Self {
                client_port: p.sport,
                server_port: p.dport,
                client_ip: p.src,
                server_ip: p.dst,
            },
            Direction::Response => Self {
                client_port: p.dport,
                server_port: p.sport,
                client_ip: p.dst,
                server_ip: p.src,
            },
        }
    }

    /// The client's address and port.
    #[inline]
    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(self.client_ip, self.client_port)
    }

    /// The server's address and port.
    #[inline]
    pub fn server(&self) -> SocketAddr {
        SocketAddr::new(self.server_ip, self.server_port)
    }

    /// The server's port.
    pub fn server_port(&self) -> u16 {
        self.server_port
    }

    /// The client's port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The server's address.
    pub fn server_ip(&self) -> IpAddr {
        self.server_ip
    }

    /// The client's address.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }
}

/// Why a flow left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions sent FIN.
    Fin,
    /// A RST was seen.
    Reset,
    /// A SYN started a new connection on the same addresses and ports.
    Reused,
    /// No packet for longer than the idle timeout.
    Idle,
    /// The table was full and the flow was among the least recently seen.
    Evicted,
    /// The capture ended.
    Shutdown,
}

/// What one direction of a flow says to its consumer, in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent<'a> {
    /// A SYN: the direction's stream begins at position 0, at a message boundary.
    Start,
    /// A segment of this direction acknowledged the other direction's stream up to
    /// `ack_pos`: given for a segment without bytes, or before the other direction's held
    /// bytes that the ack releases; a segment's bytes carry its ack in [`StreamEvent::Data`].
    Ack {
        /// A position in the other direction's stream.
        ack_pos: u64,
    },
    /// The next bytes, in order.
    Data {
        /// The bytes, their position and capture time.
        piece: Piece<'a>,
        /// The segment's acknowledgment as a position in the other direction's stream.
        ack_pos: Option<u64>,
    },
    /// Bytes are missing up to `resume_pos`: whatever was being parsed there is lost.
    Gap {
        /// The position of the first byte after the hole.
        resume_pos: u64,
    },
}

/// Receives the reassembled streams of the flows in a [`FlowTable`], with the per-flow
/// state `S` that it keeps.
pub trait StreamHandler<S> {
    /// One direction of a flow said something; `ts_us` is the capture time of the segment
    /// being processed.
    fn on_event(
        &mut self,
        key: &FlowKey,
        state: &mut S,
        dir: Direction,
        ts_us: u64,
        event: StreamEvent<'_>,
    );
    /// The flow ended; `state` is dropped after this.
    fn on_close(&mut self, key: &FlowKey, state: S, reason: CloseReason, ts_us: u64);
    /// The flow has been quiet for [`QUIET_US`]: its state may give back the spare memory
    /// its buffers hold (an idle connection then costs its fixed size alone).
    fn on_quiet(&mut self, _key: &FlowKey, _state: &mut S) {}
}

/// The event of a reassembled chunk; a piece's ack becomes a position of `peer`, the other
/// direction.
fn event_of<'a>(chunk: Chunk<'a>, peer: &Reassembler) -> StreamEvent<'a> {
    match chunk {
        Chunk::Start => StreamEvent::Start,
        Chunk::Data(piece) => StreamEvent::Data {
            piece,
            ack_pos: piece.ack.and_then(|a| peer.position_of(a)),
        },
        Chunk::Gap { resume_pos } => StreamEvent::Gap { resume_pos },
    }
}

/// Caps and timeouts of the flow table.
#[derive(Debug, Clone, Copy)]
pub struct FlowLimits {
    /// Flows tracked at most; past it the least recently seen are evicted.
    pub max_flows: usize,
    /// A flow with no packet for this long is evicted.
    pub idle_timeout_us: u64,
    /// Caps on out-of-order data, per direction.
    pub reassembly: ReassemblyLimits,
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self {
            max_flows: 65_536,
            idle_timeout_us: 120_000_000,
            reassembly: ReassemblyLimits::default(),
        }
    }
}

/// Counters of the flow table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowCounters {
    /// Flows created.
    pub flows_created: u64,
    /// Flows ended by FIN, RST or reuse.
    pub flows_closed: u64,
    /// Flows ended by the idle timeout.
    pub flows_idle_evicted: u64,
    /// Flows evicted because the table was full.
    pub flows_cap_evicted: u64,
    /// What reassembly saw.
    pub reassembly: ReassemblyCounters,
}

impl FlowCounters {
    /// Adds another table's counters (tables of separate flows: the sums are exact).
    pub fn merge(&mut self, other: &FlowCounters) {
        self.flows_created += other.flows_created;
        self.flows_closed += other.flows_closed;
        self.flows_idle_evicted += other.flows_idle_evicted;
        self.flows_cap_evicted += other.flows_cap_evicted;
        self.reassembly.merge(&other.reassembly);
    }
}

struct Flow<S> {
    last_seen_us: u64,
    request: Reassembler,
    response: Reassembler,
    state: S,
}

/// How often, in capture time, idle flows are looked for.
const SWEEP_INTERVAL_US: u64 = 1_000_000;
/// A flow without a packet for this long (capture time) gives back its spare memory, once.
pub const QUIET_US: u64 = 1_000_000;

/// The TCP flows being tracked, bounded by [`FlowLimits`].
///
/// Each flow is a heap block of its own, and the table holds its key and a pointer: the
/// table's spare capacity (a power of two, and twice that while it grows) costs 48 bytes a
/// slot rather than a whole flow's state.
pub struct FlowTable<S> {
    flows: FxHashMap<FlowKey, Box<Flow<S>>>,
    limits: FlowLimits,
    counters: FlowCounters,
    next_sweep_us: u64,
    /// Flows last seen before this were made quiet ([`StreamHandler::on_quiet`]) already.
    quiet_before_us: u64,
}

impl<S: Default> FlowTable<S> {
    /// An empty table.
    pub fn new(limits: FlowLimits) -> Self {
        Self {
            flows: FxHashMap::default(),
            limits,
            counters: FlowCounters::default(),
            next_sweep_us: 0,
            quiet_before_us: 0,
        }
    }

    /// The counters so far.
    pub fn counters(&self) -> &FlowCounters {
        &self.counters
    }

    /// Adds the counters of another table (a shard's) to this one's.
    pub fn add_counters(&mut self, other: &FlowCounters) {
        self.counters.merge(other);
    }

    /// Flows currently tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Takes one TCP segment of a monitored connection.
    #[allow(clippy::too_many_arguments)]
    pub fn tcp_segment<H: StreamHandler<S>>(
        &mut self,
        key: FlowKey,
        dir: Direction,
        ts_us: u64,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
        handler: &mut H,
    ) {
        self.sweep_if_due(ts_us, handler);
        let new_connection = dir == Direction::Request
            && flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
        // A SYN starts a new connection unless it repeats this one's, or this one's was not
        // captured yet (its SYN-ACK came first).
        let reused = new_connection
            && self
                .flows
                .get(&key)
                .is_some_and(|f| f.request.is_reused_by(seq));
        if reused {
            if let Some(old) = self.flows.remove(&key) {
                self.counters.flows_closed += 1;
                handler.on_close(&key, old.state, CloseReason::Reused, ts_us);
            }
        }
        // A bare ACK, FIN or RST of a connection not tracked (or just closed) starts nothing.
        let may_start = !payload.is_empty() || flags & tcp_flags::SYN != 0;
        if may_start && self.flows.len() >= self.limits.max_flows && !self.flows.contains_key(&key)
        {
            self.evict_oldest(ts_us, handler);
        }
        let flow = match self.flows.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if !may_start => return,
            Entry::Vacant(e) => {
                self.counters.flows_created += 1;
                e.insert(Box::new(Flow {
                    last_seen_us: ts_us,
                    request: Reassembler::default(),
                    response: Reassembler::default(),
                    state: S::default(),
                }))
            }
        };
        flow.last_seen_us = ts_us;
        let limits = &self.limits.reassembly;
        let counters = &mut self.counters.reassembly;
        let (this, other) = match dir {
            Direction::Request => (&mut flow.request, &mut flow.response),
            Direction::Response => (&mut flow.response, &mut flow.request),
        };
        let state = &mut flow.state;
        let other_dir = match dir {
            Direction::Request => Direction::Response,
            Direction::Response => Direction::Request,
        };
        let mut emit = |dir: Direction, event: StreamEvent<'_>| {
            handler.on_event(&key, state, dir, ts_us, event);
        };
        let ack = (flags & tcp_flags::ACK != 0).then_some(ack);
        if let Some(ack) = ack {
            // A segment with bytes carries its ack with them; on its own the ack is said when
            // the segment has none, or when it may release the other direction's held bytes
            // (which it may then be the evidence for).
            if payload.is_empty() || other.held_bytes() > 0 {
                if let Some(ack_pos) = other.position_of(ack) {
                    emit(dir, StreamEvent::Ack { ack_pos });
                }
            }
            other.peer_ack(ack, counters, &mut |c| emit(other_dir, event_of(c, this)));
        }
        let meta = SegmentMeta {
            seq,
            flags,
            ack,
            ts_us,
        };
        this.segment(meta, payload, limits, counters, &mut |c| {
            emit(dir, event_of(c, other))
        });

        let reason = if flags & tcp_flags::RST != 0 {
            Some(CloseReason::Reset)
        } else if flow.request.finished() && flow.response.finished() {
            Some(CloseReason::Fin)
        } else {
            None
        };
        if let Some(reason) = reason {
            if let Some(flow) = self.flows.remove(&key) {
                self.counters.flows_closed += 1;
                handler.on_close(&key, flow.state, reason, ts_us);
            }
        }
    }

    /// [`FlowTable::sweep_idle`], when the last was [`SWEEP_INTERVAL_US`] ago or more: on each
    /// segment, and on the live capture's clock when no segment comes.
    pub fn sweep_if_due<H: StreamHandler<S>>(&mut self, now_us: u64, handler: &mut H) {
        if now_us >= self.next_sweep_us {
            self.sweep_idle(now_us, handler);
            self.next_sweep_us = now_us + SWEEP_INTERVAL_US;
        }
    }

    /// Ends the flows idle for longer than the timeout at capture time `now_us`, and makes
    /// the flows that became quiet since the last sweep give back their spare memory.
    pub fn sweep_idle<H: StreamHandler<S>>(&mut self, now_us: u64, handler: &mut H) {
        let cutoff = now_us.saturating_sub(self.limits.idle_timeout_us);
        let quiet = self.quiet_before_us..now_us.saturating_sub(QUIET_US);
        let mut idle = Vec::new();
        for (key, flow) in self.flows.iter_mut() {
            if flow.last_seen_us < cutoff {
                idle.push(*key);
            } else if quiet.contains(&flow.last_seen_us) {
                flow.request.shrink();
                flow.response.shrink();
                handler.on_quiet(key, &mut flow.state);
            }
        }
        self.quiet_before_us = self.quiet_before_us.max(quiet.end);
        for key in idle {
            if let Some(flow) = self.flows.remove(&key) {
                self.counters.flows_idle_evicted += 1;
                handler.on_close(&key, flow.state, CloseReason::Idle, now_us);
            }
        }
    }

    /// Ends every flow, at the end of the capture.
    pub fn close_all<H: StreamHandler<S>>(&mut self, now_us: u64, handler: &mut H) {
        for (key, flow) in self.flows.drain() {
            handler.on_close(&key, flow.state, CloseReason::Shutdown, now_us);
        }
    }

    /// Makes room by evicting the least recently seen sixteenth of the table (at least one
    /// flow): one scan pays for many insertions.
    fn evict_oldest<H: StreamHandler<S>>(&mut self, now_us: u64, handler: &mut H) {
        let mut ages: Vec<(u64, FlowKey)> = self
            .flows
            .iter()
            .map(|(k, f)| (f.last_seen_us, *k))
            .collect();
        let count = (ages.len() / 16).max(1).min(ages.len());
        if count == 0 {
            return;
        }
        ages.select_nth_unstable_by_key(count - 1, |(seen, _)| *seen);
        for (_, key) in ages.into_iter().take(count) {
            if let Some(flow) = self.flows.remove(&key) {
                self.counters.flows_cap_evicted += 1;
                handler.on_close(&key, flow.state, CloseReason::Evicted, now_us);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::decode::{tcp_flags::*, Transport};

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn packet(src: &str, sport: u16, dst: &str, dport: u16) -> Packet<'static> {
        Packet {
            src: addr(src),
            dst: addr(dst),
            sport,
            dport,
            transport: Transport::Udp,
            payload: b"",
        }
    }

    #[test]
    fn direction_by_port() {
        let rule = DirectionRule::new(&[6379], &[], &[]);
        let req = packet("10.0.0.1", 40000, "10.0.0.2", 6379);
        let rsp = packet("10.0.0.2", 6379, "10.0.0.1", 40000);
        assert_eq!(rule.classify(&req), Some(Direction::Request));
        assert_eq!(rule.classify(&rsp), Some(Direction::Response));
        assert_eq!(rule.classify(&packet("10.0.0.1", 1, "10.0.0.2", 2)), None);
        assert_eq!(
            FlowKey::of(&req, Direction::Request),
            FlowKey::of(&rsp, Direction::Response)
        );
    }

    #[test]
    fn equal_ports_use_server_then_local_addresses() {
        let a_to_b = packet("10.0.0.1", 6379, "10.0.0.2", 6379);
        let b_to_a = packet("10.0.0.2", 6379, "10.0.0.1", 6379);
        let by_server = DirectionRule::new(&[6379], &[addr("10.0.0.2")], &[addr("10.0.0.1")]);
        assert_eq!(by_server.classify(&a_to_b), Some(Direction::Request));
        assert_eq!(by_server.classify(&b_to_a), Some(Direction::Response));
        let by_local = DirectionRule::new(&[6379], &[], &[addr("10.0.0.1")]);
        assert_eq!(by_local.classify(&b_to_a), Some(Direction::Request));
        assert_eq!(by_local.classify(&a_to_b), Some(Direction::Response));
    }

    /// Records what the table hands out.
    #[derive(Default)]
    struct Recorder {
        data: Vec<(Direction, Vec<u8>)>,
        gaps: usize,
        starts: usize,
        acks: Vec<(Direction, u64)>,
        data_acks: Vec<Option<u64>>,
        closes: Vec<(CloseReason, u32)>,
        quiet: Vec<u16>,
    }

    impl StreamHandler<u32> for Recorder {
        fn on_event(
            &mut self,
            _: &FlowKey,
            state: &mut u32,
            dir: Direction,
            _: u64,
            event: StreamEvent<'_>,
        ) {
            match event {
                StreamEvent::Data { piece, ack_pos } => {
                    *state += 1;
                    self.data.push((dir, piece.bytes.to_vec()));
                    self.data_acks.push(ack_pos);
                }
                StreamEvent::Gap { .. } => self.gaps += 1,
                StreamEvent::Start => self.starts += 1,
                StreamEvent::Ack { ack_pos } => self.acks.push((dir, ack_pos)),
            }
        }
        fn on_close(&mut self, _: &FlowKey, state: u32, reason: CloseReason, _: u64) {
            self.closes.push((reason, state));
        }
        fn on_quiet(&mut self, key: &FlowKey, _: &mut u32) {
            self.quiet.push(key.client_port());
        }
    }

    #[test]
    fn a_flow_quiet_for_a_second_gives_back_its_memory_once_per_quiet_spell() {
        let mut table = FlowTable::<u32>::new(FlowLimits::default());
        let mut h = Recorder::default();
        use Direction::*;
        let (a, b) = (key(40000), key(40001));
        let second = 1_000_000;
        table.tcp_segment(a, Request, 10, 1, 0, ACK, b"x", &mut h);
        table.tcp_segment(b, Request, 10, 1, 0, ACK, b"x", &mut h);
        // b keeps talking every half second; a goes quiet.
        for (i, ts) in (1..=8).map(|i| (i, 10 + i * second / 2)) {
            table.tcp_segment(b, Request, ts, 1 + i as u32, 0, ACK, b"x", &mut h);
        }
        assert_eq!(h.quiet, [40000], "a once, b never");
        // b goes quiet too; a speaks again, then goes quiet again.
        table.tcp_segment(a, Request, 10 + 5 * second, 2, 0, ACK, b"x", &mut h);
        table.sweep_idle(10 + 8 * second, &mut h);
        h.quiet[1..].sort_unstable();
        assert_eq!(h.quiet, [40000, 40000, 40001]);
        table.sweep_idle(10 + 9 * second, &mut h);
        assert_eq!(h.quiet.len(), 3, "nothing new was quiet");
        assert_eq!(table.len(), 2);
    }

    fn key(client_port: u16) -> FlowKey {
        FlowKey::new(
            SocketAddr::new(addr("10.0.0.1"), client_port),
            SocketAddr::new(addr("10.0.0.2"), 6379),
        )
    }

    #[test]
    fn a_connection_from_syn_to_fin() {
        let mut table = FlowTable::<u32>::new(FlowLimits::default());
        let mut h = Recorder::default();
        let k = key(40000);
        use Direction::*;
        table.tcp_segment(k, Request, 1, 100, 0, SYN, b"", &mut h);
        table.tcp_segment(k, Response, 2, 500, 101, SYN | ACK, b"", &mut h);
        table.tcp_segment(k, Request, 3, 101, 501, ACK | PSH, b"PING\r\n", &mut h);
        table.tcp_segment(k, Response, 4, 501, 107, ACK | PSH, b"+PONG\r\n", &mut h);
        table.tcp_segment(k, Request, 5, 107, 508, ACK | FIN, b"", &mut h);
        assert_eq!(table.len(), 1);
        table.tcp_segment(k, Response, 6, 508, 108, ACK | FIN, b"", &mut h);
        assert_eq!(
            h.data,
            vec![
                (Request, b"PING\r\n".to_vec()),
                (Response, b"+PONG\r\n".to_vec())
            ]
        );
        assert_eq!(h.closes, vec![(CloseReason::Fin, 2)]);
        assert!(table.is_empty());
        assert_eq!(h.starts, 2);
        // Acks are positions of the other direction: the SYN-ACK acks the request stream's
        // start, the FINs map to the streams' ends; segments with bytes carry theirs with
        // the bytes.
        assert_eq!(h.acks, vec![(Response, 0), (Request, 7), (Response, 6)]);
        assert_eq!(h.data_acks, vec![Some(0), Some(6)]);
    }

    #[test]
    fn reset_and_reuse_end_a_flow() {
        let mut table = FlowTable::<u32>::new(FlowLimits::default());
        let mut h = Recorder::default();
        use Direction::*;
        table.tcp_segment(key(1), Request, 1, 100, 0, SYN, b"", &mut h);
        // The same SYN again is a retransmission, another one a new connection.
        table.tcp_segment(key(1), Request, 2, 100, 0, SYN, b"", &mut h);
        assert!(h.closes.is_empty());
        table.tcp_segment(key(1), Request, 2, 700, 0, SYN, b"", &mut h);
        table.tcp_segment(key(1), Response, 3, 9, 0, RST, b"", &mut h);
        table.tcp_segment(key(1), Response, 4, 9, 0, RST, b"", &mut h);
        assert_eq!(
            h.closes,
            vec![(CloseReason::Reused, 0), (CloseReason::Reset, 0)]
        );
        assert!(table.is_empty());
    }

    #[test]
    fn a_hole_acked_by_the_peer_is_a_gap() {
        let mut table = FlowTable::<u32>::new(FlowLimits::default());
        let mut h = Recorder::default();
        use Direction::*;
        let k = key(2);
        table.tcp_segment(k, Request, 1, 100, 0, SYN, b"", &mut h);
        table.tcp_segment(k, Request, 2, 101, 0, ACK, b"ab", &mut h);
        table.tcp_segment(k, Request, 3, 105, 0, ACK, b"ef", &mut h); // "cd" lost
        table.tcp_segment(k, Response, 4, 900, 107, ACK, b"", &mut h);
        assert_eq!(h.gaps, 1);
        assert_eq!(h.data.last().unwrap().1, b"ef");
        assert_eq!(table.counters().reassembly.gaps, 1);
    }

    #[test]
    fn idle_flows_are_swept_in_capture_time() {
        let limits = FlowLimits {
            idle_timeout_us: 10_000_000,
            ..FlowLimits::default()
        };
        let mut table = FlowTable::<u32>::new(limits);
        let mut h = Recorder::default();
        table.tcp_segment(key(1), Direction::Request, 0, 1, 0, ACK, b"x", &mut h);
        table.tcp_segment(
            key(2),
            Direction::Request,
            5_000_000,
            1,
            0,
            ACK,
            b"x",
            &mut h,
        );
        table.tcp_segment(
            key(2),
            Direction::Request,
            12_000_000,
            2,
            0,
            ACK,
            b"y",
            &mut h,
        );
        assert_eq!(h.closes, vec![(CloseReason::Idle, 1)]);
        assert_eq!(table.counters().flows_idle_evicted, 1);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn the_table_never_exceeds_its_cap() {
        let limits = FlowLimits {
            max_flows: 64,
            ..FlowLimits::default()
        };
        let mut table = FlowTable::<u32>::new(limits);
        let mut h = Recorder::default();
        for port in 1..=1000u16 {
            let ts = u64::from(port);
            table.tcp_segment(key(port), Direction::Request, ts, 1, 0, ACK, b"x", &mut h);
            assert!(table.len() <= 64);
        }
        let c = table.counters();
        assert_eq!(c.flows_created, 1000);
        assert_eq!(c.flows_cap_evicted as usize + table.len(), 1000);
        assert!(h.closes.iter().all(|(r, _)| *r == CloseReason::Evicted));
        let remaining = table.len();
        let mut rest = Recorder::default();
        table.close_all(2000, &mut rest);
        assert_eq!(rest.closes.len(), remaining);
        assert!(table.is_empty());
    }
}
