//! The two directions of one TCP connection, shared by every TCP protocol: which bytes the
//! protocol's parsers may read, and when, so that pairing follows stream positions and never
//! the order the capture delivered the packets in.
//!
//! Each direction is reassembled by sequence number (`flow`); every piece keeps its
//! position, its capture time and the acknowledgment number of the segment that carried it.
//! Two facts of TCP are the evidence:
//!
//! * a reply segment's ack says how much of the request stream the server had received
//!   when it sent the reply: the reply answers only requests that end at or before it;
//! * a request segment's ack says how much of the reply stream the client had received when
//!   it sent the request: replies before that position answer only earlier requests.
//!
//! From them:
//!
//! * **Capture order does not matter.** A reply piece whose ack is past the request bytes
//!   seen so far waits (copied, bounded by [`MAX_WAITING_BYTES`] and [`MAX_WAIT_US`] of
//!   capture time) until those requests have been read, and then pairs as if captured in
//!   order. One that waits past the bound answers requests the capture never had: counted
//!   ([`Unanswered::TooEarly`]), and pairing starts again as after a gap.
//! * **After a gap, pairing resumes only where both positions are certain.** A gap (in
//!   either direction), invalid bytes, or a stream captured without its SYN make the
//!   protocol give up what it had pending ([`Protocol::reset`], counted by reason) and the
//!   duplex resynchronises: the request parser restarts at a request piece whose start the
//!   server acknowledged (a boundary the server saw: it had every byte before it), and the
//!   reply parser at the position that piece's own ack names (the client had received every
//!   reply before it, so those answered earlier requests). The first reply there must
//!   acknowledge exactly that piece: sent when the server had it and nothing the client sent
//!   after it, so that it answers that piece (or nothing of the protocol's state before the
//!   gap, such as Redis' `CLIENT REPLY OFF`, is needed to tell). Otherwise the candidate is
//!   given up and the next one tried. Until then bytes are skipped (counted), never guessed
//!   at. This holds for clients that wait for their replies, one request or one batch at a
//!   time; a client that streams requests without waiting resumes only once it pauses.
//!
//! A request's time is the latest capture time among the pieces holding its bytes; a reply's
//! is the capture time of the piece holding its first byte (the protocols' [`ChunkClock`]).
//!
//! [`ChunkClock`]: super::ChunkClock

use std::collections::VecDeque;

use super::{Connection, ExchangeSink, MatchContext, Unanswered};
use crate::modes::PortModes;
use crate::steps::flow::{Direction, FlowKey, StreamEvent};
use crate::steps::reassembly::Piece;

/// Reply bytes held at most per connection while their requests are not yet read.
pub const MAX_WAITING_BYTES: usize = 256 * 1024;
/// Reply pieces held at most per connection.
const MAX_WAITING_PIECES: usize = 64;
/// Capture time a reply waits at most for the request bytes its ack names, µs.
pub const MAX_WAIT_US: u64 = 100_000;
/// Server acknowledgments remembered while looking for a request boundary.
const REMEMBERED_ACKS: usize = 4;

/// Bytes that are not the protocol: the stream is desynchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidBytes;

/// A TCP protocol's part of a connection: its two parsers and its pairing policy.
pub trait Protocol: Default {
    /// Chooses the protocol of a new connection, for an agent watching several; called with
    /// the server port before each delivery.
    fn prepare(&mut self, _server_port: u16, _modes: &PortModes) {}
    /// The next bytes of one direction, in stream order; after [`Default`] or
    /// [`Protocol::reset`] they start at a message boundary. `ts_us` is the capture time of
    /// the piece holding them.
    fn on_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> Result<(), InvalidBytes>;
    /// True when `bytes` (at least one) may start a message of `dir`: checked where the
    /// duplex restarts a parser after a gap, so that an acknowledged position inside a large
    /// value is not read as a message. `bytes` may be a message's first few bytes only.
    fn starts_message(&self, dir: Direction, bytes: &[u8]) -> bool;
    /// True when the parser of `dir` has read part of a message.
    fn in_message(&self, dir: Direction) -> bool;
    /// Positions were lost: every pending request is given up as `why`, and both parsers go
    /// back to a message boundary.
    fn reset<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        why: Unanswered,
        cx: &mut MatchContext<'_, S>,
    );
    /// The connection ended: pending requests will never be answered.
    fn on_close<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>);
    /// The connection is quiet: its buffers give back their spare memory.
    fn shrink(&mut self) {}
    /// True when nothing of its state matters to what comes next: nothing pending, both
    /// parsers at a message boundary, no mode a reply may depend on. A quiet connection at
    /// rest gives its whole state back, and its next bytes start from [`Default`].
    fn at_rest(&self) -> bool {
        false
    }
}

/// What a connection holds only while it is not at rest: the protocol's state and the
/// server's latest acknowledgments.
#[derive(Debug)]
struct Active<P> {
    proto: P,
    /// The latest server acknowledgments (request-stream positions), a ring.
    server_acks: [u64; REMEMBERED_ACKS],
    next_ack: usize,
}

impl<P: Protocol> Default for Active<P> {
    fn default() -> Self {
        Self {
            proto: P::default(),
            server_acks: [u64::MAX; REMEMBERED_ACKS],
            next_ack: 0,
        }
    }
}

/// A connection's [`Active`] part, in a heap block of its own, which a quiet connection at
/// rest ([`Protocol::at_rest`]) gives back: an idle connection then holds a pointer for it.
/// The acknowledgments go too: a gap found later is past every one of them.
#[derive(Debug)]
struct Held<P>(Option<Box<Active<P>>>);

impl<P: Protocol> Held<P> {
    /// The active part, made afresh when it was given back.
    #[inline(always)]
    fn get(&mut self) -> &mut Active<P> {
        self.0.get_or_insert_with(Box::default)
    }

    /// The protocol's state, unless it was given back.
    fn peek(&self) -> Option<&P> {
        self.0.as_deref().map(|a| &a.proto)
    }

    /// The protocol's state, unless it was given back.
    fn peek_mut(&mut self) -> Option<&mut P> {
        self.0.as_deref_mut().map(|a| &mut a.proto)
    }
}

/// Where pairing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Certainty {
    /// Both parsers read from known boundaries; replies pair in stream order.
    Certain,
    /// Looking for a place where both positions are certain again.
    Resync {
        /// Request bytes before this are lost or untrusted.
        req_from: u64,
        /// Reply bytes before this are lost or untrusted.
        rsp_from: u64,
        /// The request parser restarted; the reply parser restarts here.
        found: Option<Found>,
    },
}

/// A restart point of the reply parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Found {
    /// The reply-stream position the restart request's ack named.
    rsp_at: u64,
    /// Where the requests read from the restart first end at a message boundary, once
    /// known: the first reply must acknowledge exactly this much (the server had them, and
    /// nothing sent after them).
    request_end: Option<u64>,
}

/// A reply piece waiting for the request bytes its ack names.
#[derive(Debug)]
struct WaitingReply {
    bytes: Vec<u8>,
    pos: u64,
    ts_us: u64,
    ack_pos: Option<u64>,
}

/// The command name under which untimed replies with no known request are counted.
pub const UNKNOWN_COMMAND: &[u8] = b"?";

/// The command of exchanges whose request the server answered as unknown (Redis `-ERR
/// unknown command`, memcached `ERROR`): junk sent to a port gets one label, not one each,
/// and cannot crowd real commands out of the per-port cap.
pub const UNKNOWN_TO_SERVER: &[u8] = b"UNKNOWN";

/// One connection: a protocol `P` behind the shared two-direction logic.
#[derive(Debug)]
pub struct Duplex<P> {
    active: Held<P>,
    pairing: Certainty,
    req_started: bool,
    rsp_started: bool,
    /// End of the request bytes seen (read or skipped), or of a hole.
    req_seen: u64,
    /// End of the reply bytes seen.
    rsp_seen: u64,
    waiting: VecDeque<WaitingReply>,
    waiting_bytes: usize,
}

impl<P: Protocol> Default for Duplex<P> {
    fn default() -> Self {
        Self {
            active: Held(None),
            pairing: Certainty::Certain,
            req_started: false,
            rsp_started: false,
            req_seen: 0,
            rsp_seen: 0,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
        }
    }
}

impl<P: Protocol> Connection for Duplex<P> {
    fn prepare(&mut self, server_port: u16, modes: &PortModes) {
        self.active.get().proto.prepare(server_port, modes);
    }

    fn on_event<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        event: StreamEvent<'_>,
        cx: &mut MatchContext<'_, S>,
    ) {
        // The common case, in order and certain, first.
        if let (StreamEvent::Data { piece, ack_pos }, Certainty::Certain, true) =
            (event, self.pairing, self.waiting.is_empty())
        {
            match dir {
                Direction::Request if self.req_started => {
                    self.req_seen = self.req_seen.max(piece.end());
                    return self.read(key, dir, piece.ts_us, piece.bytes, cx);
                }
                Direction::Response
                    if self.rsp_started && ack_pos.is_none_or(|a| a <= self.req_seen) =>
                {
                    if let Some(ack_pos) = ack_pos {
                        self.note_server_ack(ack_pos);
                    }
                    self.rsp_seen = self.rsp_seen.max(piece.end());
                    return self.read(key, dir, piece.ts_us, piece.bytes, cx);
                }
                _ => {}
            }
        }
        self.on_event_slow(key, dir, ts_us, event, cx);
    }

    fn on_close<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>) {
        while !self.waiting.is_empty() {
            self.give_up_waiting(key, cx);
        }
        if let Some(proto) = self.active.peek_mut() {
            proto.on_close(key, cx);
        }
    }

    fn shrink(&mut self) {
        self.waiting.shrink_to_fit();
        let at_rest = self.pairing == Certainty::Certain
            && self.waiting.is_empty()
            && self.active.peek().is_some_and(P::at_rest);
        if at_rest {
            self.active.0 = None;
        } else if let Some(proto) = self.active.peek_mut() {
            proto.shrink();
        }
    }
}

impl<P: Protocol> Duplex<P> {
    /// Everything but the common case.
    #[inline(never)]
    fn on_event_slow<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        event: StreamEvent<'_>,
        cx: &mut MatchContext<'_, S>,
    ) {
        match (event, dir) {
            (StreamEvent::Start, Direction::Request) => self.req_started = true,
            (StreamEvent::Start, Direction::Response) => self.rsp_started = true,
            (StreamEvent::Ack { ack_pos }, Direction::Response) => self.note_server_ack(ack_pos),
            (StreamEvent::Ack { .. }, Direction::Request) => {}
            (StreamEvent::Gap { resume_pos }, Direction::Request) => {
                self.req_started = true;
                self.req_seen = self.req_seen.max(resume_pos);
                cx.sink
                    .unanswered(key.server(), UNKNOWN_COMMAND, Unanswered::RequestLost);
                self.desync(key, Unanswered::Uncertain, cx);
                self.flush_waiting(key, cx);
            }
            (StreamEvent::Gap { resume_pos }, Direction::Response) => {
                self.rsp_started = true;
                self.rsp_seen = self.rsp_seen.max(resume_pos);
                self.desync(key, Unanswered::ReplyLost, cx);
            }
            (StreamEvent::Data { piece, ack_pos }, Direction::Request) => {
                self.request_piece(key, piece, ack_pos, cx);
                self.flush_waiting(key, cx);
            }
            (StreamEvent::Data { piece, ack_pos }, Direction::Response) => {
                if let Some(ack_pos) = ack_pos {
                    self.note_server_ack(ack_pos);
                }
                if self.waiting.is_empty() && ack_pos.is_none_or(|a| a <= self.req_seen) {
                    self.reply_piece(key, piece.bytes, piece.pos, piece.ts_us, ack_pos, cx);
                } else {
                    self.wait(key, piece, ack_pos, cx);
                }
            }
        }
        self.expire_waiting(key, ts_us, cx);
    }

    /// Remembers a server acknowledgment: always, since the ack that marks a boundary comes
    /// before the gap is known.
    #[inline(always)]
    fn note_server_ack(&mut self, ack_pos: u64) {
        let active = self.active.get();
        active.server_acks[active.next_ack % REMEMBERED_ACKS] = ack_pos;
        active.next_ack = active.next_ack.wrapping_add(1);
    }

    /// Hands bytes to the protocol; invalid ones desynchronise the connection.
    #[inline(always)]
    fn read<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) {
        if self
            .active
            .get()
            .proto
            .on_bytes(key, dir, ts_us, bytes, cx)
            .is_err()
        {
            self.desync(key, Unanswered::Uncertain, cx);
        }
    }

    /// The protocol's state, unless the connection gave it back at rest.
    pub fn protocol(&self) -> Option<&P> {
        self.active.peek()
    }

    fn request_piece<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        piece: Piece<'_>,
        ack_pos: Option<u64>,
        cx: &mut MatchContext<'_, S>,
    ) {
        self.req_seen = self.req_seen.max(piece.end());
        if !self.req_started {
            // Captured without its SYN: nothing says where a request starts.
            self.req_started = true;
            self.desync_from(key, piece.pos, self.rsp_seen, Unanswered::Uncertain, cx);
        }
        let from = match self.pairing {
            Certainty::Certain | Certainty::Resync { found: Some(_), .. } => piece.pos,
            Certainty::Resync {
                req_from,
                rsp_from,
                found: None,
            } => {
                // A request boundary: a position the server acknowledged.
                let active: &Active<P> = self.active.get();
                let cut = active
                    .server_acks
                    .iter()
                    .copied()
                    .filter(|&a| a >= req_from && a >= piece.pos && a < piece.end())
                    .filter(|&a| {
                        let at = &piece.bytes[(a - piece.pos) as usize..];
                        active.proto.starts_message(Direction::Request, at)
                    })
                    .min();
                match (cut, ack_pos) {
                    (Some(at), Some(rsp_at)) if rsp_at >= rsp_from => {
                        self.pairing = Certainty::Resync {
                            req_from,
                            rsp_from,
                            found: Some(Found {
                                rsp_at,
                                request_end: None,
                            }),
                        };
                        at
                    }
                    _ => piece.end(),
                }
            }
        };
        cx.counters.resync_skipped_bytes += from - piece.pos;
        let bytes = &piece.bytes[(from - piece.pos) as usize..];
        if bytes.is_empty() {
            return;
        }
        self.read(key, Direction::Request, piece.ts_us, bytes, cx);
        // Invalid bytes have ended the restart already; a valid one learns where its first
        // requests end.
        if let Certainty::Resync {
            found: Some(found), ..
        } = &mut self.pairing
        {
            let in_message = self
                .active
                .peek()
                .is_some_and(|p| p.in_message(Direction::Request));
            if found.request_end.is_none() && !in_message {
                found.request_end = Some(piece.end());
            }
        }
    }

    fn reply_piece<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        bytes: &[u8],
        pos: u64,
        ts_us: u64,
        ack_pos: Option<u64>,
        cx: &mut MatchContext<'_, S>,
    ) {
        let end = pos + bytes.len() as u64;
        self.rsp_seen = self.rsp_seen.max(end);
        if !self.rsp_started {
            self.rsp_started = true;
            self.desync_from(key, self.req_seen, pos, Unanswered::Uncertain, cx);
        }
        let from = match self.pairing {
            Certainty::Certain => pos,
            Certainty::Resync { found: None, .. } => end,
            Certainty::Resync {
                found: Some(found), ..
            } => {
                if end <= found.rsp_at {
                    // Replies to requests before the restart: theirs were given up.
                    end
                } else if pos <= found.rsp_at
                    && found.request_end.is_some()
                    && ack_pos == found.request_end
                    && self.active.get().proto.starts_message(
                        Direction::Response,
                        &bytes[(found.rsp_at - pos) as usize..],
                    )
                {
                    self.pairing = Certainty::Certain;
                    found.rsp_at
                } else {
                    // The reply there was sent before the server had the restart request,
                    // or the bytes there were never captured: not certain after all.
                    self.desync_from(key, self.req_seen, end, Unanswered::Uncertain, cx);
                    end
                }
            }
        };
        cx.counters.resync_skipped_bytes += from - pos;
        let bytes = &bytes[(from - pos) as usize..];
        if !bytes.is_empty() {
            self.read(key, Direction::Response, ts_us, bytes, cx);
        }
    }

    /// Holds a reply piece until the requests it may answer have been read.
    fn wait<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        piece: Piece<'_>,
        ack_pos: Option<u64>,
        cx: &mut MatchContext<'_, S>,
    ) {
        while !self.waiting.is_empty()
            && (self.waiting.len() >= MAX_WAITING_PIECES
                || self.waiting_bytes + piece.bytes.len() > MAX_WAITING_BYTES)
        {
            self.give_up_waiting(key, cx);
        }
        if self.waiting.is_empty() && ack_pos.is_none_or(|a| a <= self.req_seen) {
            // Giving up moved the request stream past what this piece needs.
            return self.reply_piece(key, piece.bytes, piece.pos, piece.ts_us, ack_pos, cx);
        }
        self.waiting_bytes += piece.bytes.len();
        self.waiting.push_back(WaitingReply {
            bytes: piece.bytes.to_vec(),
            pos: piece.pos,
            ts_us: piece.ts_us,
            ack_pos,
        });
    }

    /// Pairs the waiting replies whose requests have now been read.
    fn flush_waiting<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>) {
        while self
            .waiting
            .front()
            .is_some_and(|w| w.ack_pos.is_none_or(|a| a <= self.req_seen))
        {
            if let Some(w) = self.waiting.pop_front() {
                self.waiting_bytes -= w.bytes.len();
                self.reply_piece(key, &w.bytes, w.pos, w.ts_us, w.ack_pos, cx);
            }
        }
    }

    /// Gives up the replies that waited longer than [`MAX_WAIT_US`] of capture time.
    fn expire_waiting<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        now_us: u64,
        cx: &mut MatchContext<'_, S>,
    ) {
        while self
            .waiting
            .front()
            .is_some_and(|w| w.ts_us.saturating_add(MAX_WAIT_US) < now_us)
        {
            self.give_up_waiting(key, cx);
        }
    }

    /// The oldest waiting reply answers request bytes that the capture never had: those are
    /// lost, and pairing starts again past them.
    fn give_up_waiting<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>) {
        let Some(front) = self.waiting.front() else {
            return;
        };
        let needed = front.ack_pos.unwrap_or(self.req_seen);
        cx.sink
            .unanswered(key.server(), UNKNOWN_COMMAND, Unanswered::TooEarly);
        self.req_seen = self.req_seen.max(needed);
        let rsp_from = front.pos;
        self.desync_from(key, self.req_seen, rsp_from, Unanswered::Uncertain, cx);
        self.flush_waiting(key, cx);
    }

    fn desync<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        why: Unanswered,
        cx: &mut MatchContext<'_, S>,
    ) {
        self.desync_from(key, self.req_seen, self.rsp_seen, why, cx);
    }

    /// Gives up what is pending and looks for certain positions at or after the given ones.
    fn desync_from<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        req_from: u64,
        rsp_from: u64,
        why: Unanswered,
        cx: &mut MatchContext<'_, S>,
    ) {
        cx.counters.desyncs += 1;
        if let Some(proto) = self.active.peek_mut() {
            proto.reset(key, why, cx);
        }
        self.pairing = Certainty::Resync {
            req_from,
            rsp_from,
            found: None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::redis::RedisPairing;
    use crate::matcher::Exchange;
    use std::net::SocketAddr;

    #[derive(Default)]
    struct Recorder {
        exchanges: Vec<(String, u64)>,
        untimed: Vec<(String, Unanswered)>,
    }

    impl ExchangeSink for Recorder {
        fn exchange(&mut self, e: &Exchange<'_>) {
            let summary = String::from_utf8_lossy(e.summary).into_owned();
            self.exchanges.push((summary, e.latency_us));
        }
        fn unanswered(&mut self, _: SocketAddr, command: &[u8], why: Unanswered) {
            let command = String::from_utf8_lossy(command).into_owned();
            self.untimed.push((command, why));
        }
    }

    type Harness = crate::matcher::harness::Harness<RedisPairing, Recorder>;
    use Direction::{Request as Req, Response as Rsp};

    /// `GET <key>` as RESP: 20 bytes for a one-letter key.
    fn get(key: &str) -> Vec<u8> {
        format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).into_bytes()
    }

    const NIL: &[u8] = b"$-1\r\n"; // 5 bytes

    fn exchanges(h: &Harness) -> Vec<(&str, u64)> {
        h.sink
            .exchanges
            .iter()
            .map(|(s, l)| (s.as_str(), *l))
            .collect()
    }

    #[test]
    fn a_reply_captured_before_its_request_waits_for_it() {
        let mut h = Harness::new("10.0.0.2:6379");
        // The reply acknowledges the 20 request bytes that the capture has not given yet.
        h.piece(Rsp, 150, 0, Some(20), NIL);
        assert!(h.sink.exchanges.is_empty());
        h.piece(Req, 100, 0, Some(0), &get("a"));
        h.piece(Req, 200, 20, Some(5), &get("b"));
        h.piece(Rsp, 260, 5, Some(40), NIL);
        assert_eq!(exchanges(&h), [("GET a", 50), ("GET b", 60)]);
        assert_eq!(h.counters.desyncs, 0);
    }

    #[test]
    fn a_reply_that_waits_past_the_bound_answers_a_request_never_captured() {
        let mut h = Harness::new("10.0.0.2:6379");
        h.piece(Rsp, 1_000, 0, Some(20), NIL);
        // Much later in capture time: the request bytes it acknowledged never came.
        h.piece(Req, 1_000 + MAX_WAIT_US + 1, 40, Some(5), &get("c"));
        assert!(h.sink.exchanges.is_empty());
        assert_eq!(h.sink.untimed[0], ("?".to_string(), Unanswered::TooEarly));
    }

    #[test]
    fn a_lost_request_whose_reply_comes_is_counted_not_paired() {
        let mut h = Harness::new("10.0.0.2:6379");
        h.req(0, &get("a"));
        h.rsp(10, NIL);
        // GET b (20..40) is lost; its reply (5..10) acknowledges it.
        h.piece(Rsp, 30, 5, Some(40), NIL);
        h.gap(Req, 30, 40);
        // GET c starts where the server acknowledged; its ack names the reply stream's end.
        h.piece(Req, 40, 40, Some(10), &get("c"));
        h.piece(Rsp, 45, 10, Some(60), NIL);
        assert_eq!(exchanges(&h), [("GET a", 10), ("GET c", 5)]);
        assert_eq!(h.sink.untimed, [("?".to_string(), Unanswered::RequestLost)]);
    }

    #[test]
    fn a_lost_reply_inside_a_pipelined_batch_drops_the_rest_of_the_batch() {
        let mut h = Harness::new("10.0.0.2:6379");
        let batch = [get("a"), get("b"), get("c")].concat();
        h.req(0, &batch);
        h.rsp(10, b"$1\r\n1\r\n"); // 7 bytes: GET a's reply
                                   // GET b's reply (7..14) is lost; GET c's arrives.
        h.gap(Rsp, 12, 14);
        h.piece(Rsp, 12, 14, Some(60), b"$1\r\n3\r\n");
        assert_eq!(exchanges(&h), [("GET a", 10)]);
        assert_eq!(
            h.sink.untimed,
            [
                ("GET".to_string(), Unanswered::ReplyLost),
                ("GET".to_string(), Unanswered::ReplyLost)
            ]
        );
        // The next batch was sent once every reply had come: pairing resumes with it.
        h.piece(Req, 20, 60, Some(21), &[get("d"), get("e")].concat());
        h.piece(Rsp, 25, 21, Some(100), &[NIL, NIL].concat());
        assert_eq!(exchanges(&h), [("GET a", 10), ("GET d", 5), ("GET e", 5)]);
    }

    #[test]
    fn an_ack_that_covers_more_than_the_restart_refutes_it() {
        let mut h = Harness::new("10.0.0.2:6379");
        h.req(0, &get("a"));
        h.gap(Rsp, 5, 5);
        // The server acknowledged 20: GET b may start a restart...
        h.event(Rsp, 5, StreamEvent::Ack { ack_pos: 20 });
        h.piece(Req, 6, 20, Some(5), &get("b"));
        h.piece(Req, 7, 40, Some(5), &get("c"));
        // ...but the reply at 5 was sent when the server had GET c too: it may answer GET a
        // (pipelined), so nothing is paired until a reply that proves its request.
        h.piece(Rsp, 8, 5, Some(60), NIL);
        assert!(h.sink.exchanges.is_empty());
        h.piece(Rsp, 9, 10, Some(60), NIL);
        h.piece(Req, 20, 60, Some(15), &get("d"));
        h.piece(Rsp, 30, 15, Some(80), NIL);
        assert_eq!(exchanges(&h), [("GET d", 10)]);
    }

    #[test]
    fn a_gap_in_each_direction_then_pairing_resumes() {
        for dir in [Req, Rsp] {
            let mut h = Harness::new("10.0.0.2:6379");
            h.req(0, &get("a"));
            h.rsp(1, NIL);
            match dir {
                // GET b lost, its reply captured.
                Req => {
                    h.gap(Req, 2, 40);
                    h.piece(Rsp, 3, 5, Some(40), NIL);
                }
                // GET b captured, its reply lost; a bare ACK of the server's came through.
                Rsp => {
                    h.req(2, &get("b"));
                    h.gap(Rsp, 3, 10);
                    h.event(Rsp, 3, StreamEvent::Ack { ack_pos: 40 });
                }
            }
            h.piece(Req, 4, 40, Some(10), &get("c"));
            h.piece(Rsp, 6, 10, Some(60), NIL);
            assert_eq!(exchanges(&h), [("GET a", 1), ("GET c", 2)], "{dir:?}");
        }
    }

    #[test]
    fn a_capture_without_the_syn_starts_at_a_proven_request() {
        let mut h = Harness::without_syn("10.0.0.2:6379");
        // The first request seen may not start a message; the server acknowledges its end.
        h.piece(Req, 0, 0, Some(0), &get("a"));
        h.piece(Rsp, 1, 0, Some(20), NIL);
        h.piece(Req, 2, 20, Some(5), &get("b"));
        h.piece(Rsp, 5, 5, Some(40), NIL);
        assert_eq!(exchanges(&h), [("GET b", 3)]);
    }

    #[test]
    fn a_restart_inside_a_value_is_refused() {
        let mut h = Harness::new("10.0.0.2:6379");
        h.req(0, &get("a"));
        h.gap(Rsp, 1, 5);
        // An acknowledged position inside a value that reads like an inline command.
        h.event(Rsp, 1, StreamEvent::Ack { ack_pos: 20 });
        h.piece(Req, 2, 20, Some(5), b"PING\r\n");
        h.piece(Rsp, 3, 5, Some(26), b"+PONG\r\n");
        assert!(h.sink.exchanges.is_empty());
    }
}
