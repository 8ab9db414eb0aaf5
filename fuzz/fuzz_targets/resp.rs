//! RESP requests and replies, fed whole and split at a point the input chooses, then the same
//! bytes as a conversation through the Redis matcher: no panic, no unbounded state.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tcpkit::flow::{Direction, FlowKey};
use tcpkit::l7::redis::{RespParser, Role};
use tcpkit::matcher::{
    Exchange, ExchangeSink, MatchContext, MatchCounters, MatchLimits, RedisConnection, Unanswered,
};

struct Count(u64);

impl ExchangeSink for Count {
    fn exchange(&mut self, e: &Exchange<'_>) {
        assert!(e.rsp_start_us >= e.req_done_us || e.latency_us == 0);
        self.0 += 1;
    }
    fn unanswered(&mut self, _: SocketAddr, _: &[u8], _: Unanswered) {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let cut = usize::from(split) % (rest.len() + 1);
    for role in [Role::Request, Role::Reply] {
        let mut parser = RespParser::new(role);
        let mut messages = 0u64;
        for piece in [&rest[..cut], &rest[cut..]] {
            if parser.feed(piece, &mut |m| {
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
    // The bytes before the cut are requests, the rest replies, in chunks of 7 alternating.
    let key = FlowKey {
        client: SocketAddr::from(([10, 0, 0, 1], 40000)),
        server: SocketAddr::from(([10, 0, 0, 2], 6379)),
    };
    let limits = MatchLimits {
        max_pending_per_connection: 64,
        max_pending_total: 128,
        ..MatchLimits::default()
    };
    let mut counters = MatchCounters::default();
    let mut sink = Count(0);
    let mut conn = RedisConnection::default();
    let (requests, replies) = rest.split_at(cut);
    let (mut q, mut r) = (requests.chunks(7), replies.chunks(7));
    for ts in 0u64.. {
        let (a, b) = (q.next(), r.next());
        if a.is_none() && b.is_none() {
            break;
        }
        let mut cx = MatchContext { limits: &limits, counters: &mut counters, sink: &mut sink };
        if let Some(a) = a {
            conn.on_data(&key, Direction::Request, ts, a, &mut cx);
        }
        if let Some(b) = b {
            conn.on_data(&key, Direction::Response, ts, b, &mut cx);
        }
        assert!(cx.counters.pending <= 64);
    }
    let mut cx = MatchContext { limits: &limits, counters: &mut counters, sink: &mut sink };
    conn.on_close(&key, &mut cx);
    assert_eq!(counters.pending, 0);
});
