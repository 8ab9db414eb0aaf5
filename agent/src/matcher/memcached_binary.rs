//! Memcached binary-protocol matching: requests are paired with responses by opaque, in
//! order. Quiet requests (`GETQ`, `SETQ`, …) get no response on success (on a miss, for the
//! gets): a response to a later request, whose opaque is further down the queue, tells that
//! the quiet ones before it succeeded silently; a non-quiet request skipped that way is
//! counted as unanswered. `NOOP` is the usual barrier.

use std::collections::VecDeque;

use super::duplex::{InvalidBytes, Protocol};
use super::{
    give_up_all, make_room, queue_pending, settle_depths, ChunkClock, Exchange, ExchangeSink,
    MatchContext, PipelineClock, Unanswered,
};
use crate::l7::memcached_binary::{
    is_quiet, is_retrieval, opcode_name, BinaryParser, Packet, KEY_BYTES,
};
use crate::l7::templates::KEY_BYTES as TEMPLATE_KEY_BYTES;
use crate::steps::flow::{Direction, FlowKey};

/// Status of a retrieval that found nothing.
const KEY_NOT_FOUND: u16 = 0x0001;
/// Statuses from here on are server errors (unknown command, out of memory, …).
const FIRST_ERROR_STATUS: u16 = 0x0081;
const SUMMARY: usize = 12 + KEY_BYTES;

impl Pending {
    fn command(&self) -> &[u8] {
        opcode_name(self.opcode).as_bytes()
    }
}

#[derive(Debug, Clone)]
struct Pending {
    req_start_us: u64,
    req_done_us: u64,
    req_bytes: u64,
    /// Requests outstanding when it was sent, itself included.
    depth: u32,
    opcode: u8,
    opaque: u32,
    summary: [u8; SUMMARY],
    summary_len: u8,
    /// The key was longer than the summary keeps of it.
    key_cut: bool,
}

/// The matching state of one binary-protocol memcached connection.
#[derive(Debug)]
pub struct BinaryPairing {
    requests: BinaryParser,
    responses: BinaryParser,
    pending: VecDeque<Pending>,
    req_clock: ChunkClock,
    rsp_clock: ChunkClock,
    pipeline: PipelineClock,
}

impl Default for BinaryPairing {
    fn default() -> Self {
        Self {
            requests: BinaryParser::new(true),
            responses: BinaryParser::new(false),
            pending: VecDeque::new(),
            req_clock: ChunkClock::default(),
            rsp_clock: ChunkClock::default(),
            pipeline: PipelineClock::default(),
        }
    }
}

impl Protocol for BinaryPairing {
    fn on_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> Result<(), InvalidBytes> {
        let result = match dir {
            Direction::Request => {
                let mut timer = self.req_clock.begin(ts_us, self.requests.in_message());
                let Self {
                    requests, pending, ..
                } = self;
                let result = requests.feed(bytes, &mut |p| {
                    let (start, done) = timer.next_times();
                    queue(key, p, start, done, pending, cx);
                });
                self.req_clock.end(&timer, self.requests.in_message());
                result
            }
            Direction::Response => {
                let mut timer = self.rsp_clock.begin(ts_us, self.responses.in_message());
                let Self {
                    responses,
                    pending,
                    pipeline,
                    ..
                } = self;
                let result = responses.feed(bytes, &mut |p| {
                    pair(key, p, timer.next_start(), pending, pipeline, cx);
                });
                self.rsp_clock.end(&timer, self.responses.in_message());
                result
            }
        };
        result.map_err(|_| InvalidBytes)
    }

    fn starts_message(&self, dir: Direction, bytes: &[u8]) -> bool {
        let magic = match dir {
            Direction::Request => 0x80,
            Direction::Response => 0x81,
        };
        bytes.first() == Some(&magic)
    }

    fn in_message(&self, dir: Direction) -> bool {
        match dir {
            Direction::Request => self.requests.in_message(),
            Direction::Response => self.responses.in_message(),
        }
    }

    fn reset<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        why: Unanswered,
        cx: &mut MatchContext<'_, S>,
    ) {
        give_up_all(&mut self.pending, key.server(), Pending::command, why, cx);
        self.requests.reset();
        self.responses.reset();
        self.pipeline.reset();
    }

    fn on_close<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>) {
        give_up_all(
            &mut self.pending,
            key.server(),
            Pending::command,
            Unanswered::Timeout,
            cx,
        );
    }
}

fn queue<S: ExchangeSink>(
    key: &FlowKey,
    p: &Packet<'_>,
    req_start_us: u64,
    req_done_us: u64,
    pending: &mut VecDeque<Pending>,
    cx: &mut MatchContext<'_, S>,
) {
    let name = opcode_name(p.opcode);
    if matches!(p.opcode, 0x07 | 0x17) {
        cx.counters.noreply += 1; // QUIT, QUITQ: the server closes
        return;
    }
    if !make_room(pending, key.server(), Pending::command, cx) {
        cx.sink
            .unanswered(key.server(), name.as_bytes(), Unanswered::Timeout);
        return;
    }
    let mut summary = [0u8; SUMMARY];
    let mut len = name.len();
    summary[..len].copy_from_slice(name.as_bytes());
    if !p.key.is_empty() {
        summary[len] = b' ';
        summary[len + 1..len + 1 + p.key.len()].copy_from_slice(p.key);
        len += 1 + p.key.len();
    }
    queue_pending(
        pending,
        Pending {
            req_start_us,
            req_done_us,
            req_bytes: p.bytes,
            depth: pending.len() as u32 + 1,
            opcode: p.opcode,
            opaque: p.opaque,
            summary,
            summary_len: len as u8,
            key_cut: p.key_cut,
        },
    );
    cx.counters.pending += 1;
}

fn pair<S: ExchangeSink>(
    key: &FlowKey,
    p: &Packet<'_>,
    rsp_start_us: u64,
    pending: &mut VecDeque<Pending>,
    pipeline: &mut PipelineClock,
    cx: &mut MatchContext<'_, S>,
) {
    let Some(at) = pending
        .iter()
        .position(|q| q.opaque == p.opaque && q.opcode == p.opcode)
    else {
        cx.counters.unmatched += 1;
        return;
    };
    // The requests before it got no response: quiet ones succeeded, others went unanswered.
    for skipped in pending.drain(..at) {
        cx.counters.pending -= 1;
        if is_quiet(skipped.opcode) {
            cx.counters.noreply += 1;
        } else {
            cx.sink
                .unanswered(key.server(), skipped.command(), Unanswered::Timeout);
        }
    }
    let Some(request) = pending.pop_front() else {
        return;
    };
    cx.counters.pending -= 1;
    // The requests before it were answered by now too (quietly, or never).
    settle_depths(pending, rsp_start_us, at as u32 + 1, |p| {
        (p.req_done_us, &mut p.depth)
    });
    let (hits, misses) = match (is_retrieval(request.opcode), p.status) {
        (true, 0) => (1, 0),
        (true, KEY_NOT_FOUND) => (0, 1),
        _ => (0, 0),
    };
    let summary = &request.summary[..usize::from(request.summary_len)];
    let name_len = opcode_name(request.opcode).len();
    let exchange = Exchange {
        flow: *key,
        req_start_us: request.req_start_us,
        req_done_us: request.req_done_us,
        rsp_start_us,
        latency_us: rsp_start_us.saturating_sub(request.req_done_us),
        own_us: pipeline.own_time(request.req_done_us, rsp_start_us),
        depth: request.depth,
        command: &summary[..name_len],
        summary,
        truncated: false,
        req_bytes: request.req_bytes,
        rsp_bytes: p.bytes,
        error: p.status >= FIRST_ERROR_STATUS,
        hits,
        misses,
        rcode: None,
        slot: None,
        redirect: None,
        template: None,
        keys: 0,
    };
    // With templates, the key's (one a request: a multi-get is a run of quiet gets), of
    // which the first bytes a template is made of.
    let first_key = summary.get(name_len + 1..).filter(|k| !k.is_empty());
    match cx.limits.key_rules.zip(first_key) {
        Some((rules, first)) => {
            let cut = request.key_cut || first.len() > TEMPLATE_KEY_BYTES;
            let first = &first[..first.len().min(TEMPLATE_KEY_BYTES)];
            rules.with_template(first, cut, |template| {
                cx.sink.exchange(&exchange.with_template(template, 1))
            })
        }
        None => cx.sink.exchange(&exchange),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::memcached_binary::tests::packet;
    use crate::l7::templates::KeyRules;
    use crate::matcher::{MatchCounters, MatchLimits};
    use std::net::SocketAddr;

    #[derive(Default)]
    struct Recorder(Vec<(String, u32, u32)>, usize);

    impl ExchangeSink for Recorder {
        fn exchange(&mut self, e: &Exchange<'_>) {
            self.0.push((
                String::from_utf8_lossy(e.summary).into_owned(),
                e.hits,
                e.misses,
            ));
        }
        fn unanswered(&mut self, _: SocketAddr, _: &[u8], _: Unanswered) {
            self.1 += 1;
        }
    }

    /// One connection's requests then responses, paired under `limits` into `sink`: the
    /// counters after.
    fn pair_all(
        limits: &MatchLimits,
        requests: &[u8],
        responses: &[u8],
        sink: &mut impl ExchangeSink,
    ) -> MatchCounters {
        let key = FlowKey::new(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:11211".parse().unwrap(),
        );
        let mut counters = MatchCounters::default();
        let mut conn = BinaryPairing::default();
        let mut cx = MatchContext {
            limits,
            counters: &mut counters,
            sink,
        };
        conn.on_bytes(&key, Direction::Request, 0, requests, &mut cx)
            .unwrap();
        conn.on_bytes(&key, Direction::Response, 5, responses, &mut cx)
            .unwrap();
        counters
    }

    #[test]
    fn quiet_gets_pair_by_opaque_behind_noop() {
        let mut sink = Recorder::default();
        let mut requests = packet(0x80, 0x09, 0, 1, &[], b"miss", b"");
        requests.extend(packet(0x80, 0x09, 0, 2, &[], b"hit", b""));
        requests.extend(packet(0x80, 0x00, 0, 3, &[], b"gone", b""));
        requests.extend(packet(0x80, 0x0a, 0, 4, &[], b"", b""));
        let mut responses = packet(0x81, 0x09, 0, 2, &[0; 4], b"", b"v");
        responses.extend(packet(0x81, 0x00, KEY_NOT_FOUND, 3, &[], b"", b"Not found"));
        responses.extend(packet(0x81, 0x0a, 0, 4, &[], b"", b""));
        let counters = pair_all(&MatchLimits::default(), &requests, &responses, &mut sink);
        assert_eq!(
            sink.0,
            vec![
                ("GETQ hit".to_string(), 1, 0),
                ("GET gone".to_string(), 0, 1),
                ("NOOP".to_string(), 0, 0)
            ]
        );
        assert_eq!((counters.noreply, counters.pending), (1, 0));
    }

    #[test]
    fn keys_get_their_templates_a_long_one_cut() {
        let rules: &'static KeyRules = Box::leak(Box::new(KeyRules::new(&[])));
        let limits = MatchLimits {
            key_rules: Some(rules),
            ..MatchLimits::default()
        };
        #[derive(Default)]
        struct Templates(Vec<(Option<String>, u32)>);
        impl ExchangeSink for Templates {
            fn exchange(&mut self, e: &Exchange<'_>) {
                let template = e.template.map(|t| String::from_utf8_lossy(t).into_owned());
                self.0.push((template, e.keys));
            }
            fn unanswered(&mut self, _: SocketAddr, _: &[u8], _: Unanswered) {}
        }
        let mut sink = Templates::default();
        let long = format!("blob:{}", "x".repeat(200));
        let mut requests = packet(0x80, 0x00, 0, 1, &[], b"user:1234:cart", b"");
        requests.extend(packet(0x80, 0x00, 0, 2, &[], long.as_bytes(), b""));
        requests.extend(packet(0x80, 0x0a, 0, 3, &[], b"", b""));
        let mut responses = packet(0x81, 0x00, 0, 1, &[0; 4], b"", b"v");
        responses.extend(packet(0x81, 0x00, KEY_NOT_FOUND, 2, &[], b"", b""));
        responses.extend(packet(0x81, 0x0a, 0, 3, &[], b"", b""));
        pair_all(&limits, &requests, &responses, &mut sink);
        let cut = format!("{}…", &long[..TEMPLATE_KEY_BYTES]);
        assert_eq!(
            sink.0,
            [
                (Some("user:{id}:cart".to_string()), 1),
                (Some(cut), 1),
                (None, 0)
            ]
        );
    }
}
