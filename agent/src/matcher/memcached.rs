//! Memcached (text and meta protocols) matching: a FIFO of pending requests. A retrieval is
//! answered by its `VALUE` blocks and `END` (hits counted from the blocks, misses are the
//! keys left), a `stats` by its `STAT` lines and `END`, everything else by one line or meta
//! reply. `noreply` requests and `quit` are not waited for. A quiet meta request (`q`) may
//! get no reply: a reply it would not send (`EN` after `mg … q`, `HD` after `ms|md|ma … q`),
//! a text reply, the `MN` of a later `mn` barrier, or an opaque (`O`) or key (`k`) that is not
//! its own tells that it succeeded silently. A gap or garbage drops the pending requests
//! (counted); where pairing resumes is the [`duplex`](super::duplex)'s to find.

use std::collections::VecDeque;

use super::duplex::{InvalidBytes, Protocol, UNKNOWN_TO_SERVER};
use super::memcached_binary::BinaryPairing;
use super::{
    give_up_all, make_room, queue_pending, settle_depths, ChunkClock, Exchange, ExchangeSink,
    MatchContext, PipelineClock, Unanswered,
};
use crate::l7::memcached::{Expect, McParser, Message, MetaReply, Role, Unit};
use crate::l7::templates::memcached_key;
use crate::steps::flow::{Direction, FlowKey};

/// Bytes of a request's summary kept while it waits.
const KEPT_SUMMARY: usize = 96;

#[derive(Debug, Clone)]
struct Pending {
    req_start_us: u64,
    req_done_us: u64,
    req_bytes: u64,
    /// Requests outstanding when it was sent, itself included.
    depth: u32,
    expect: Expect,
    keys: u32,
    meta: Option<(u8, bool)>,
    opaque: Option<u64>,
    key: Option<u64>,
    command_len: u8,
    summary: [u8; KEPT_SUMMARY],
    summary_len: u8,
    truncated: bool,
    /// Time of the first reply unit, bytes and hits so far (multi-unit replies).
    rsp_start_us: Option<u64>,
    rsp_bytes: u64,
    hits: u32,
}

impl Pending {
    fn command(&self) -> &[u8] {
        &self.summary[..usize::from(self.command_len)]
    }

    fn summary(&self) -> &[u8] {
        &self.summary[..usize::from(self.summary_len)]
    }
}

/// The matching state of one memcached connection.
#[derive(Debug)]
pub struct MemcachedPairing {
    requests: McParser,
    replies: McParser,
    pending: VecDeque<Pending>,
    req_clock: ChunkClock,
    rsp_clock: ChunkClock,
    pipeline: PipelineClock,
    /// Set when the connection speaks the binary protocol (its first request byte is 0x80).
    binary: Option<Box<BinaryPairing>>,
}

impl Default for MemcachedPairing {
    fn default() -> Self {
        Self {
            requests: McParser::new(Role::Request),
            replies: McParser::new(Role::Reply),
            pending: VecDeque::new(),
            req_clock: ChunkClock::default(),
            rsp_clock: ChunkClock::default(),
            pipeline: PipelineClock::default(),
            binary: None,
        }
    }
}

/// How text requests start.
const REQUEST_STARTS: [&[u8]; 24] = [
    b"mg ",
    b"ms ",
    b"md ",
    b"ma ",
    b"mn",
    b"me ",
    b"get ",
    b"gets ",
    b"gat ",
    b"gats ",
    b"set ",
    b"add ",
    b"replace ",
    b"append ",
    b"prepend ",
    b"cas ",
    b"delete ",
    b"incr ",
    b"decr ",
    b"touch ",
    b"stats",
    b"version",
    b"flush_all",
    b"verbosity ",
];

/// True when `bytes` start like one of `starts`, as far as they go.
fn starts_like(bytes: &[u8], starts: &[&[u8]]) -> bool {
    starts.iter().any(|s| {
        let n = s.len().min(bytes.len());
        bytes[..n] == s[..n]
    })
}

impl Protocol for MemcachedPairing {
    fn on_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> Result<(), InvalidBytes> {
        let starts_binary = dir == Direction::Request
            && bytes.first() == Some(&0x80)
            && self.pending.is_empty()
            && !self.requests.in_message();
        if self.binary.is_none() && starts_binary {
            self.binary = Some(Box::default());
        }
        if let Some(binary) = self.binary.as_mut() {
            return binary.on_bytes(key, dir, ts_us, bytes, cx);
        }
        let ok = match dir {
            Direction::Request => self.on_request_bytes(key, ts_us, bytes, cx),
            Direction::Response => self.on_reply_bytes(key, ts_us, bytes, cx),
        };
        ok.then_some(()).ok_or(InvalidBytes)
    }

    fn starts_message(&self, dir: Direction, bytes: &[u8]) -> bool {
        if let Some(binary) = self.binary.as_ref() {
            return binary.starts_message(dir, bytes);
        }
        match dir {
            Direction::Request => starts_like(bytes, &REQUEST_STARTS) || bytes[0] == 0x80,
            // Text replies are upper-case words (`VALUE`, `END`, `STORED`, `HD`, `EN`, …).
            Direction::Response => bytes.first().is_some_and(u8::is_ascii_uppercase),
        }
    }

    fn in_message(&self, dir: Direction) -> bool {
        if let Some(binary) = self.binary.as_ref() {
            return binary.in_message(dir);
        }
        match dir {
            Direction::Request => self.requests.in_message(),
            Direction::Response => self.replies.in_message(),
        }
    }

    fn reset<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        why: Unanswered,
        cx: &mut MatchContext<'_, S>,
    ) {
        if let Some(binary) = self.binary.as_mut() {
            return binary.reset(key, why, cx);
        }
        give_up_all(&mut self.pending, key.server(), Pending::command, why, cx);
        self.requests.reset();
        self.replies.reset();
        self.pipeline.reset();
    }

    fn on_close<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>) {
        if let Some(binary) = self.binary.as_mut() {
            return binary.on_close(key, cx);
        }
        give_up_all(
            &mut self.pending,
            key.server(),
            Pending::command,
            Unanswered::Timeout,
            cx,
        );
    }

    fn shrink(&mut self) {
        self.requests.shrink();
        self.replies.shrink();
        self.pending.shrink_to_fit();
    }

    fn at_rest(&self) -> bool {
        self.binary.is_none()
            && self.pending.is_empty()
            && self.requests.at_boundary()
            && self.replies.at_boundary()
    }
}

impl MemcachedPairing {
    fn on_request_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> bool {
        let mut timer = self.req_clock.begin(ts_us, self.requests.in_message());
        let Self {
            requests, pending, ..
        } = self;
        let result = requests.feed(bytes, &mut |m| {
            let (start, done) = timer.next_times();
            queue(key, m, start, done, pending, cx);
        });
        self.req_clock.end(&timer, self.requests.in_message());
        result.is_ok()
    }

    fn on_reply_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> bool {
        let mut timer = self.rsp_clock.begin(ts_us, self.replies.in_message());
        let Self {
            replies,
            pending,
            pipeline,
            ..
        } = self;
        let result = replies.feed(bytes, &mut |m| {
            let start = timer.next_start();
            pair(key, m, start, pending, pipeline, cx);
        });
        self.rsp_clock.end(&timer, self.replies.in_message());
        result.is_ok()
    }
}

fn queue<S: ExchangeSink>(
    key: &FlowKey,
    m: &Message<'_>,
    req_start_us: u64,
    req_done_us: u64,
    pending: &mut VecDeque<Pending>,
    cx: &mut MatchContext<'_, S>,
) {
    if m.expect == Expect::Nothing {
        cx.counters.noreply += 1;
        return;
    }
    if !make_room(pending, key.server(), Pending::command, cx) {
        cx.sink
            .unanswered(key.server(), m.command, Unanswered::Timeout);
        return;
    }
    let mut summary = [0u8; KEPT_SUMMARY];
    let kept = m.summary.len().min(KEPT_SUMMARY);
    summary[..kept].copy_from_slice(&m.summary[..kept]);
    queue_pending(
        pending,
        Pending {
            req_start_us,
            req_done_us,
            req_bytes: m.bytes,
            depth: pending.len() as u32 + 1,
            expect: m.expect,
            keys: m.keys,
            meta: m.meta,
            opaque: m.opaque,
            key: m.key,
            command_len: m.command.len().min(KEPT_SUMMARY) as u8,
            summary,
            summary_len: kept as u8,
            truncated: kept < m.summary.len(),
            rsp_start_us: None,
            rsp_bytes: 0,
            hits: 0,
        },
    );
    cx.counters.pending += 1;
}

/// True when `m` cannot be the reply of the quiet meta request `front`, which therefore
/// succeeded without one. Without an opaque or key to compare, a reply the request could send
/// is taken as its own: the protocol cannot tell more.
fn answered_by_silence(front: &Pending, m: &Message<'_>) -> bool {
    let Some((letter, true)) = front.meta else {
        return false;
    };
    // An opaque or key the reply echoes, and the request's differs: not its reply.
    let differs = |mine: Option<u64>, theirs: Option<u64>| theirs.is_some() && mine != theirs;
    if differs(front.opaque, m.opaque) || differs(front.key, m.key) {
        return true;
    }
    let unit = m.unit;
    use MetaReply::*;
    let could_answer = match (letter, unit) {
        (_, Unit::Error | Unit::UnknownCommand) => true,
        // mg: a hit (its miss, EN, is what q suppresses).
        (b'g', Unit::Meta(Va | Hd)) => true,
        // ms, md, ma: a failure (their success, HD, is what q suppresses); ma may return a value.
        (b's' | b'd' | b'a', Unit::Meta(Ns | Ex | Nf | En)) => true,
        (b'a', Unit::Meta(Va)) => true,
        _ => false,
    };
    !could_answer
}

fn pair<S: ExchangeSink>(
    key: &FlowKey,
    m: &Message<'_>,
    rsp_start_us: u64,
    pending: &mut VecDeque<Pending>,
    pipeline: &mut PipelineClock,
    cx: &mut MatchContext<'_, S>,
) {
    let mut silent = 0;
    while pending
        .front()
        .is_some_and(|front| answered_by_silence(front, m))
    {
        pending.pop_front();
        cx.counters.pending -= 1;
        cx.counters.noreply += 1;
        silent += 1;
    }
    if silent > 0 {
        // Answered, quietly, by the time this reply came.
        settle_depths(pending, rsp_start_us, silent, |p| {
            (p.req_done_us, &mut p.depth)
        });
    }
    let Some(front) = pending.front_mut() else {
        cx.counters.unmatched += 1;
        return;
    };
    let start = *front.rsp_start_us.get_or_insert(rsp_start_us);
    front.rsp_bytes += m.bytes;
    let done = match (front.expect, m.unit) {
        (_, Unit::Error | Unit::UnknownCommand) => true,
        (Expect::Values, Unit::Value) => {
            front.hits += 1;
            false
        }
        (Expect::Stats, Unit::Stat) => false,
        (Expect::Values | Expect::Stats, Unit::End) => true,
        (Expect::Line, Unit::Line | Unit::Meta(_)) => true,
        // A unit that cannot answer this request: the pairing is off.
        _ => {
            cx.counters.unmatched += 1;
            true
        }
    };
    if !done {
        return;
    }
    let Some(request) = pending.pop_front() else {
        return;
    };
    cx.counters.pending -= 1;
    settle_depths(pending, start, 1, |p| (p.req_done_us, &mut p.depth));
    let summary = request.summary();
    let (hits, misses) = match (request.expect, m.unit, request.meta) {
        (Expect::Values, unit, _) if !unit.is_error() => {
            (request.hits, request.keys.saturating_sub(request.hits))
        }
        (_, Unit::Meta(MetaReply::Va | MetaReply::Hd), Some((b'g', _))) => (1, 0),
        (_, Unit::Meta(MetaReply::En), Some((b'g', _))) => (0, 1),
        _ => (0, 0),
    };
    let exchange = Exchange {
        flow: *key,
        req_start_us: request.req_start_us,
        req_done_us: request.req_done_us,
        rsp_start_us: start,
        latency_us: start.saturating_sub(request.req_done_us),
        own_us: pipeline.own_time(request.req_done_us, start),
        depth: request.depth,
        // A command the server does not know gets no label of its own.
        command: if m.unit == Unit::UnknownCommand {
            UNKNOWN_TO_SERVER
        } else {
            &summary[..usize::from(request.command_len)]
        },
        summary,
        truncated: request.truncated,
        req_bytes: request.req_bytes,
        rsp_bytes: request.rsp_bytes,
        error: m.unit.is_error(),
        hits,
        misses,
        rcode: None,
        slot: None,
        redirect: None,
        template: None,
        keys: 0,
    };
    // With templates, the first key's (folded from the kept summary: keys hold no spaces).
    let rules = cx.limits.key_rules;
    match rules.and_then(|r| Some((r, memcached_key(summary, request.truncated)?))) {
        Some((rules, (first, cut))) => rules.with_template(first, cut, |template| {
            cx.sink
                .exchange(&exchange.with_template(template, request.keys))
        }),
        _ => cx.sink.exchange(&exchange),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[derive(Default)]
    struct Recorder {
        exchanges: Vec<(String, u64, bool, u32, u32)>,
        unanswered: usize,
    }

    impl ExchangeSink for Recorder {
        fn exchange(&mut self, e: &Exchange<'_>) {
            let summary = String::from_utf8_lossy(e.summary).into_owned();
            self.exchanges
                .push((summary, e.latency_us, e.error, e.hits, e.misses));
        }
        fn unanswered(&mut self, _: SocketAddr, _: &[u8], _: Unanswered) {
            self.unanswered += 1;
        }
    }

    type Harness = crate::matcher::harness::Harness<MemcachedPairing, Recorder>;

    impl Harness {
        fn memcached() -> Self {
            Harness::new("10.0.0.2:11211")
        }
    }

    #[test]
    fn pipelined_retrievals_count_hits_and_misses() {
        let mut h = Harness::memcached();
        h.send(
            Direction::Request,
            10,
            b"get a b c\r\nset k 0 0 1\r\nx\r\nget k\r\ndelete z noreply\r\n",
        );
        h.send(
            Direction::Response,
            25,
            b"VALUE a 0 1\r\n1\r\nVALUE c 0 1\r\n3\r\nEND\r\nSTORED\r\n",
        );
        h.send(Direction::Response, 40, b"VALUE k 0 1\r\nx\r\nEND\r\n");
        assert_eq!(
            h.sink.exchanges,
            vec![
                ("get a b c".to_string(), 15, false, 2, 1),
                ("set k".to_string(), 15, false, 0, 0),
                ("get k".to_string(), 30, false, 1, 0),
            ]
        );
        assert_eq!(h.counters.noreply, 1);
        assert_eq!(h.counters.pending, 0);
    }

    #[test]
    fn stats_and_errors_end_their_exchange() {
        let mut h = Harness::memcached();
        h.send(Direction::Request, 0, b"stats\r\nbogus\r\n");
        h.send(
            Direction::Response,
            1,
            b"STAT pid 1\r\nSTAT uptime 5\r\nEND\r\nERROR\r\n",
        );
        assert_eq!(h.sink.exchanges[1], ("bogus".to_string(), 1, true, 0, 0));
        // Binary garbage desyncs the request stream: recovered at the next command whose
        // start the server acknowledged (with its reply to the garbage, skipped).
        h.send(Direction::Request, 2, b"\x00\xff\r\n");
        assert_eq!(h.counters.desyncs, 1);
        h.send(Direction::Response, 2, b"ERROR\r\n");
        h.send(Direction::Request, 2, b"get a\r\n");
        h.send(Direction::Response, 3, b"SERVER_ERROR out of memory\r\n");
        assert_eq!(h.sink.exchanges[2], ("get a".to_string(), 1, true, 0, 0));
    }

    #[test]
    fn quiet_meta_requests_end_silently_at_the_barrier() {
        let mut h = Harness::memcached();
        h.send(
            Direction::Request,
            0,
            b"ms k 2 q\r\nhi\r\nmg a v q Oa\r\nmg k v q Ok\r\nmg b v\r\nmn\r\n",
        );
        h.send(Direction::Response, 5, b"VA 2 Ok\r\nhi\r\nEN\r\nMN\r\n");
        let got: Vec<(&str, u32, u32)> = h
            .sink
            .exchanges
            .iter()
            .map(|e| (e.0.as_str(), e.3, e.4))
            .collect();
        assert_eq!(got, [("mg k", 1, 0), ("mg b", 0, 1), ("mn", 0, 0)]);
        assert_eq!(
            h.counters.noreply, 2,
            "ms k q and mg a q succeeded silently"
        );
        assert_eq!(h.counters.pending, 0);
    }

    #[test]
    fn a_gap_drops_pending_and_resyncs() {
        let mut h = Harness::memcached();
        h.send(Direction::Request, 0, b"get a\r\nget b\r\n");
        h.gap(Direction::Response, 1, 30);
        assert_eq!(h.sink.unanswered, 2);
        // The tail of a reply is skipped; the next request whose start the server
        // acknowledged restarts pairing.
        h.piece(Direction::Response, 1, 30, Some(14), b"lue\r\nEND\r\n");
        h.send(Direction::Request, 3, b"get c\r\n");
        h.send(Direction::Response, 4, b"END\r\n");
        assert_eq!(
            h.sink.exchanges,
            vec![("get c".to_string(), 1, false, 0, 1)]
        );
    }
}
