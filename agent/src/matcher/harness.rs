//! A test harness for the matchers: one connection behind the [`Duplex`], fed the pieces a
//! flow would hand it. [`Harness::send`] plays a capture in order (each piece acknowledges
//! everything the other direction sent before it); the other calls give full control of
//! positions, acks and gaps.

use super::duplex::{Duplex, Protocol};
use super::{Connection, ExchangeSink, MatchContext, MatchCounters, MatchLimits};
use crate::steps::flow::{Direction, FlowKey, StreamEvent};
use crate::steps::reassembly::Piece;

/// One connection, its caps, counters and a recording sink.
pub struct Harness<P: Protocol, R: ExchangeSink + Default> {
    /// The connection.
    pub conn: Duplex<P>,
    /// Its addresses.
    pub key: FlowKey,
    /// The caps.
    pub limits: MatchLimits,
    /// The counters.
    pub counters: MatchCounters,
    /// What the matcher produced.
    pub sink: R,
    /// Next position of each direction, for [`Harness::send`].
    next: [u64; 2],
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::Request => 0,
        Direction::Response => 1,
    }
}

impl<P: Protocol, R: ExchangeSink + Default> Harness<P, R> {
    /// A connection to `server` whose two SYNs were seen.
    pub fn new(server: &str) -> Self {
        let mut h = Self::without_syn(server);
        h.event(Direction::Request, 0, StreamEvent::Start);
        h.event(Direction::Response, 0, StreamEvent::Start);
        h
    }

    /// A connection to `server` captured after it began.
    pub fn without_syn(server: &str) -> Self {
        Self {
            conn: Duplex::default(),
            key: FlowKey::new("10.0.0.1:40000".parse().unwrap(), server.parse().unwrap()),
            limits: MatchLimits::default(),
            counters: MatchCounters::default(),
            sink: R::default(),
            next: [0, 0],
        }
    }

    /// Hands the connection one event.
    pub fn event(&mut self, dir: Direction, ts_us: u64, event: StreamEvent<'_>) {
        let mut cx = MatchContext {
            limits: &self.limits,
            counters: &mut self.counters,
            sink: &mut self.sink,
        };
        self.conn.on_event(&self.key, dir, ts_us, event, &mut cx);
    }

    /// The next bytes of `dir`, captured in order: they acknowledge all the other direction
    /// sent so far.
    pub fn send(&mut self, dir: Direction, ts_us: u64, bytes: &[u8]) {
        let pos = self.next[index(dir)];
        let ack = self.next[1 - index(dir)];
        self.piece(dir, ts_us, pos, Some(ack), bytes);
    }

    /// A piece at an explicit position with an explicit ack (a position of the other
    /// direction); the ack is also given as the segment's own ack event.
    pub fn piece(&mut self, dir: Direction, ts_us: u64, pos: u64, ack: Option<u64>, bytes: &[u8]) {
        if let Some(ack_pos) = ack {
            self.event(dir, ts_us, StreamEvent::Ack { ack_pos });
        }
        let piece = Piece {
            bytes,
            pos,
            ts_us,
            ack: None,
        };
        self.event(
            dir,
            ts_us,
            StreamEvent::Data {
                piece,
                ack_pos: ack,
            },
        );
        let next = &mut self.next[index(dir)];
        *next = (*next).max(piece.end());
    }

    /// Bytes of `dir` lost up to `resume_pos`.
    pub fn gap(&mut self, dir: Direction, ts_us: u64, resume_pos: u64) {
        self.event(dir, ts_us, StreamEvent::Gap { resume_pos });
        let next = &mut self.next[index(dir)];
        *next = (*next).max(resume_pos);
    }

    /// A request, captured in order.
    pub fn req(&mut self, ts_us: u64, bytes: &[u8]) {
        self.send(Direction::Request, ts_us, bytes);
    }

    /// A reply, captured in order.
    pub fn rsp(&mut self, ts_us: u64, bytes: &[u8]) {
        self.send(Direction::Response, ts_us, bytes);
    }

    /// The connection ends.
    pub fn close(&mut self) {
        let mut cx = MatchContext {
            limits: &self.limits,
            counters: &mut self.counters,
            sink: &mut self.sink,
        };
        self.conn.on_close(&self.key, &mut cx);
    }
}
