//! RESP requests and replies, fed whole and split at a point the input chooses, then the same
//! bytes as a conversation through the duplex and the Redis matcher, with acks that lag or
//! lead and gaps: no panic, no unbounded state.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tcpkit::l7::redis::{RespParser, Role};
use tcpkit::matcher::duplex::Duplex;
use tcpkit::matcher::{
    Connection, Exchange, ExchangeSink, MatchContext, MatchCounters, MatchLimits, RedisPairing,
    Unanswered,
};
use tcpkit::steps::flow::{Direction, FlowKey, StreamEvent};
use tcpkit::steps::reassembly::Piece;

struct Count(u64);

impl ExchangeSink for Count {
    fn exchange(&mut self, e: &Exchange<'_>) {
        assert!(e.rsp_start_us >= e.req_done_us || e.latency_us == 0);
        self.0 += 1;
    }
    fn unanswered(&mut self, _: SocketAddr, _: &[u8], _: Unanswered) {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(split) % (rest.len() + 1);
    for role in [Role::Request, Role::Reply] {
        let mut parser = RespParser::new(role);
        let mut messages = 0u64;
        for piece in [&rest[..cut], &rest[cut..]] {
            if parser
                .feed(piece, &mut |m| {
                    assert!(m.bytes as usize <= rest.len());
                    messages += 1;
                })
                .is_err()
            {
                parser.reset();
            }
        }
        assert!(messages as usize <= rest.len());
    }
    // The bytes before the cut are requests, the rest replies, in chunks of 7 alternating,
    // through the duplex; the split byte also chooses acks that lag or lead, reply pieces
    // that arrive before their requests, and gaps.
    let key = FlowKey::new(
        SocketAddr::from(([10, 0, 0, 1], 40000)),
        SocketAddr::from(([10, 0, 0, 2], 6379)),
    );
    let limits = MatchLimits {
        max_pending_per_connection: 64,
        max_pending_total: 128,
        ..MatchLimits::default()
    };
    let mut counters = MatchCounters::default();
    let mut sink = Count(0);
    let mut conn = Duplex::<RedisPairing>::default();
    let (requests, replies) = rest.split_at(cut);
    let (mut q, mut r) = (requests.chunks(7), replies.chunks(7));
    let (mut req_pos, mut rsp_pos) = (0u64, 0u64);
    let mut cx = MatchContext {
        limits: &limits,
        counters: &mut counters,
        sink: &mut sink,
    };
    if split & 1 == 0 {
        conn.on_event(&key, Direction::Request, 0, StreamEvent::Start, &mut cx);
        conn.on_event(&key, Direction::Response, 0, StreamEvent::Start, &mut cx);
    }
    for ts in 0u64.. {
        let (a, b) = (q.next(), r.next());
        if a.is_none() && b.is_none() {
            break;
        }
        let lead = u64::from(split >> 4);
        if let Some(a) = a {
            if a[0] % 13 == 0 {
                req_pos += u64::from(a[0] % 5) + 1;
                let gap = StreamEvent::Gap {
                    resume_pos: req_pos,
                };
                conn.on_event(&key, Direction::Request, ts, gap, &mut cx);
            }
            let piece = Piece {
                bytes: a,
                pos: req_pos,
                ts_us: ts * 1000,
                ack: None,
            };
            let ack_pos = Some(rsp_pos.saturating_sub(u64::from(a[0] % 3)));
            conn.on_event(
                &key,
                Direction::Request,
                ts,
                StreamEvent::Data { piece, ack_pos },
                &mut cx,
            );
            req_pos += a.len() as u64;
        }
        if let Some(b) = b {
            let ack_pos = req_pos + lead * u64::from(b[0] & 1);
            conn.on_event(
                &key,
                Direction::Response,
                ts,
                StreamEvent::Ack { ack_pos },
                &mut cx,
            );
            let piece = Piece {
                bytes: b,
                pos: rsp_pos,
                ts_us: ts * 1000 + 5,
                ack: None,
            };
            let event = StreamEvent::Data {
                piece,
                ack_pos: Some(ack_pos),
            };
            conn.on_event(&key, Direction::Response, ts * 1000, event, &mut cx);
            rsp_pos += b.len() as u64;
        }
        assert!(cx.counters.pending <= 64);
    }
    conn.on_close(&key, &mut cx);
    assert_eq!(counters.pending, 0);
});
