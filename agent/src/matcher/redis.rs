//! Redis: a FIFO of pending requests, so that pipelined requests (hundreds in one segment,
//! replies coalesced) pair exactly. Requests that get no reply are not queued (`REPLCONF
//! ACK`, everything while `CLIENT REPLY OFF`, the command after `CLIENT REPLY SKIP`);
//! messages that answer no request (pub/sub messages, RESP3 pushes, `MONITOR` output) are
//! recognised and left out. A gap or garbage drops the connection's pending requests
//! (counted); where pairing resumes is the [`duplex`](super::duplex)'s to find. The queue is
//! bounded; what does not fit is counted, never silently dropped.

use std::collections::VecDeque;

use super::duplex::{InvalidBytes, Protocol, UNKNOWN_TO_SERVER};
use super::{
    queue_pending, settle_depths, ChunkClock, Exchange, ExchangeSink, MatchContext, PipelineClock,
    Unanswered,
};

use crate::l7::cluster::{keys_of, redirect_of};
use crate::l7::redis::{
    KeyWork, Message, ReplyParser, RespParser, Role, COMMAND_BYTES, SUMMARY_BYTES,
};
use crate::l7::templates::KeyRules;
use crate::steps::flow::{Direction, FlowKey};

/// A request waiting for its reply. Its command name and summary live in the queue's text
/// arena: no allocation per request.
#[derive(Debug, Clone)]
struct Pending {
    req_start_us: u64,
    req_done_us: u64,
    req_bytes: u64,
    /// Requests outstanding when it was sent, itself included.
    depth: u32,
    /// The hash slot of its first key.
    slot: Option<u16>,
    /// Its first key's template: where it starts in the text after `text_start`, and its
    /// length (0: none); and the keys the request names.
    template_at: u8,
    template_len: u8,
    keys: u32,
    /// Where its text starts in [`PendingQueue::text`]: the summary, then the command in
    /// upper case unless the summary starts with it so.
    text_start: usize,
    summary_len: u8,
    /// Where the upper-case command starts in the text: 0, or `summary_len`.
    command_at: u8,
    command_len: u8,
    truncated: bool,
    /// Subscribe-family commands: confirmations still to come (one per channel).
    confirmations_left: u32,
    /// The exchange was reported (at the first confirmation of a subscribe).
    answered: bool,
    /// The reply switches the connection's mode (MONITOR, RESET).
    effect: ReplyEffect,
}

/// Pending requests in order, with the text of each in one reused buffer.
#[derive(Debug, Default)]
struct PendingQueue {
    entries: VecDeque<Pending>,
    text: Vec<u8>,
}

/// The text arena is compacted when the live part starts this far in.
const TEXT_COMPACT_AT: usize = 1 << 16;

impl PendingQueue {
    /// Queues `p`; `summary` starts with the command name as sent, `command_len` bytes; the
    /// template of its first key is folded by `rules` when given.
    fn push(
        &mut self,
        mut p: Pending,
        command_len: usize,
        summary: &[u8],
        key: Option<(&[u8], bool, &KeyRules)>,
    ) {
        match self.entries.front() {
            None => self.text.clear(),
            Some(front) if front.text_start >= TEXT_COMPACT_AT => {
                let cut = front.text_start;
                self.text.drain(..cut);
                self.entries.iter_mut().for_each(|e| e.text_start -= cut);
            }
            Some(_) => {}
        }
        p.text_start = self.text.len();
        p.summary_len = summary.len() as u8;
        p.command_len = command_len as u8;
        self.text.extend_from_slice(summary);
        let command = &summary[..command_len];
        // Clients mostly send names in upper case: then the summary's start is the command.
        p.command_at = if command.iter().any(u8::is_ascii_lowercase) {
            self.text.extend_from_slice(command);
            self.text[p.text_start + summary.len()..].make_ascii_uppercase();
            p.summary_len
        } else {
            0
        };
        if let Some((key, cut, rules)) = key {
            let at = self.text.len();
            rules.fold(key, cut, &mut self.text);
            p.template_at = (at - p.text_start) as u8;
            p.template_len = (self.text.len() - at) as u8;
        }
        queue_pending(&mut self.entries, p);
    }

    fn template(&self, p: &Pending) -> Option<&[u8]> {
        let start = p.text_start + usize::from(p.template_at);
        (p.template_len > 0).then(|| &self.text[start..start + usize::from(p.template_len)])
    }

    fn command(&self, p: &Pending) -> &[u8] {
        let start = p.text_start + usize::from(p.command_at);
        &self.text[start..start + usize::from(p.command_len)]
    }

    fn summary(&self, p: &Pending) -> &[u8] {
        &self.text[p.text_start..p.text_start + usize::from(p.summary_len)]
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyEffect {
    None,
    Monitor,
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ReplyMode {
    #[default]
    On,
    Off,
    SkipNext,
}

/// The matching state of one Redis connection.
#[derive(Debug)]
pub struct RedisPairing {
    requests: RespParser,
    replies: ReplyParser,
    pending: PendingQueue,
    /// First-packet times of the requests and replies being read.
    req_clock: ChunkClock,
    rsp_clock: ChunkClock,
    pipeline: PipelineClock,
    reply_mode: ReplyMode,
    pubsub: bool,
    monitor: bool,
}

impl Default for RedisPairing {
    fn default() -> Self {
        Self {
            requests: RespParser::new(Role::Request),
            replies: ReplyParser::with_room(Role::Reply),
            pending: PendingQueue::default(),
            req_clock: ChunkClock::default(),
            rsp_clock: ChunkClock::default(),
            pipeline: PipelineClock::default(),
            reply_mode: ReplyMode::On,
            pubsub: false,
            monitor: false,
        }
    }
}

const SUBSCRIBE_FAMILY: [&[u8]; 6] = [
    b"subscribe",
    b"psubscribe",
    b"ssubscribe",
    b"unsubscribe",
    b"punsubscribe",
    b"sunsubscribe",
];
const PUBSUB_MESSAGES: [&[u8]; 3] = [b"message", b"pmessage", b"smessage"];

/// Commands whose replies the matcher must treat specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    None,
    ReplConf,
    Client,
    Subscribe,
    Monitor,
    Reset,
}

/// Classifies a command name (any case), comparing only names of a matching length.
fn special(name: &[u8]) -> Special {
    let is = |word: &[u8]| name.eq_ignore_ascii_case(word);
    match name.len() {
        5 if is(b"RESET") => Special::Reset,
        6 if is(b"CLIENT") => Special::Client,
        7 if is(b"MONITOR") => Special::Monitor,
        8 if is(b"REPLCONF") => Special::ReplConf,
        9..=12 if is_subscribe_command(name) => Special::Subscribe,
        _ => Special::None,
    }
}

fn is_subscribe_command(command: &[u8]) -> bool {
    SUBSCRIBE_FAMILY
        .iter()
        .any(|c| c.eq_ignore_ascii_case(command))
}

impl Protocol for RedisPairing {
    fn on_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> Result<(), InvalidBytes> {
        match dir {
            Direction::Request => self.on_request_bytes(key, ts_us, bytes, cx),
            Direction::Response => self.on_reply_bytes(key, ts_us, bytes, cx),
        }
    }

    fn starts_message(&self, dir: Direction, bytes: &[u8]) -> bool {
        match dir {
            // Clients send arrays of bulk strings (`*<n>\r\n$`); inline commands are typed by
            // people, and a restart never takes one.
            Direction::Request => looks_like_array_of_bulks(bytes),
            Direction::Response => bytes
                .first()
                .is_some_and(|b| b"+-:$*_#,(!=%~>|".contains(b)),
        }
    }

    fn in_message(&self, dir: Direction) -> bool {
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
        self.give_up_pending(key, why, cx);
        self.requests.reset();
        self.replies.reset();
        self.pipeline.reset();
    }

    fn on_close<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>) {
        self.give_up_pending(key, Unanswered::Timeout, cx);
    }

    fn shrink(&mut self) {
        self.requests.shrink();
        self.replies.shrink();
        if self.pending.entries.is_empty() {
            self.pending.text.clear();
        }
        self.pending.entries.shrink_to_fit();
        self.pending.text.shrink_to_fit();
    }

    fn at_rest(&self) -> bool {
        self.pending.entries.is_empty()
            && self.requests.at_boundary()
            && self.replies.at_boundary()
            && self.reply_mode == ReplyMode::On
            && !self.pubsub
            && !self.monitor
    }
}

impl RedisPairing {
    fn on_request_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> Result<(), InvalidBytes> {
        let mut timer = self.req_clock.begin(ts_us, self.requests.in_message());
        self.requests.key_work(KeyWork {
            slots: cx.limits.hash_slots,
            key: cx.limits.key_rules.is_some(),
        });
        let Self {
            requests,
            pending,
            reply_mode,
            pubsub,
            monitor,
            ..
        } = self;
        let result = requests.feed(bytes, &mut |m| {
            let (start, done) = timer.next_times();
            queue_request(
                key, m, start, done, pending, reply_mode, pubsub, *monitor, cx,
            );
        });
        self.req_clock.end(&timer, self.requests.in_message());
        result.map_err(|_| InvalidBytes)
    }

    fn on_reply_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> Result<(), InvalidBytes> {
        let mut timer = self.rsp_clock.begin(ts_us, self.replies.in_message());
        let Self {
            replies,
            pending,
            pipeline,
            reply_mode,
            pubsub,
            monitor,
            ..
        } = self;
        let result = replies.feed(bytes, &mut |m| {
            let start = timer.next_start();
            pair_reply(
                key, m, start, pending, pipeline, reply_mode, pubsub, monitor, cx,
            );
        });
        self.rsp_clock.end(&timer, self.replies.in_message());
        result.map_err(|_| InvalidBytes)
    }

    fn give_up_pending<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        why: Unanswered,
        cx: &mut MatchContext<'_, S>,
    ) {
        cx.counters.pending -= self.pending.len() as u64;
        for p in &self.pending.entries {
            cx.sink
                .unanswered(key.server(), self.pending.command(p), why);
        }
        self.pending.entries.clear();
    }
}

/// True when `bytes` start like `*<count>\r\n$`, as far as they go.
fn looks_like_array_of_bulks(bytes: &[u8]) -> bool {
    let Some((b'*', rest)) = bytes.split_first() else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let tail = &rest[digits..];
    let count_ok = if tail.is_empty() {
        digits <= 10
    } else {
        (1..=10).contains(&digits)
    };
    count_ok && tail.iter().zip(b"\r\n$").all(|(a, b)| a == b)
}

/// Decides whether a parsed request waits for a reply, and queues it when it does.
#[allow(clippy::too_many_arguments)]
fn queue_request<S: ExchangeSink>(
    key: &FlowKey,
    m: &Message<'_>,
    req_start_us: u64,
    req_done_us: u64,
    pending: &mut PendingQueue,
    reply_mode: &mut ReplyMode,
    pubsub: &mut bool,
    monitor: bool,
    cx: &mut MatchContext<'_, S>,
) {
    let name = &m.head[..m.head.len().min(COMMAND_BYTES)];
    let kind = special(name);
    // The first two arguments, for the commands that need them.
    let args = || {
        let mut words = m.summary.split(|b| *b == b' ').skip(1);
        (
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
        )
    };
    let expects_reply = if monitor {
        kind == Special::Reset
    } else if kind == Special::ReplConf && args().0.eq_ignore_ascii_case(b"ACK") {
        false
    } else if kind == Special::Client && args().0.eq_ignore_ascii_case(b"REPLY") {
        let mode = args().1;
        if mode.eq_ignore_ascii_case(b"ON") {
            *reply_mode = ReplyMode::On;
            true
        } else {
            *reply_mode = if mode.eq_ignore_ascii_case(b"OFF") {
                ReplyMode::Off
            } else {
                ReplyMode::SkipNext
            };
            false
        }
    } else {
        match *reply_mode {
            ReplyMode::On => true,
            ReplyMode::Off => false,
            ReplyMode::SkipNext => {
                *reply_mode = ReplyMode::On;
                false
            }
        }
    };
    if !expects_reply {
        cx.counters.noreply += 1;
        return;
    }
    let subscribe = kind == Special::Subscribe;
    *pubsub |= subscribe;
    if cx.counters.pending >= cx.limits.max_pending_total as u64 {
        // No room anywhere: the request is given up at once rather than held.
        let mut upper = [0u8; COMMAND_BYTES];
        upper[..name.len()].copy_from_slice(name);
        upper.make_ascii_uppercase();
        cx.sink
            .unanswered(key.server(), &upper[..name.len()], Unanswered::Timeout);
        return;
    }
    if pending.len() >= cx.limits.max_pending_per_connection {
        if let Some(oldest) = pending.entries.pop_front() {
            cx.counters.pending -= 1;
            cx.sink
                .unanswered(key.server(), pending.command(&oldest), Unanswered::Timeout);
        }
    }
    let entry = Pending {
        req_start_us,
        req_done_us,
        req_bytes: m.bytes,
        depth: pending.len() as u32 + 1,
        slot: m.slot,
        template_at: 0,
        template_len: 0,
        keys: if m.key.is_some() {
            keys_of(name, m.elements)
        } else {
            0
        },
        text_start: 0,
        summary_len: 0,
        command_at: 0,
        command_len: 0,
        truncated: m.truncated,
        confirmations_left: if subscribe {
            m.elements.saturating_sub(1).max(1) as u32
        } else {
            1
        },
        answered: false,
        effect: match kind {
            Special::Monitor => ReplyEffect::Monitor,
            Special::Reset => ReplyEffect::Reset,
            _ => ReplyEffect::None,
        },
    };
    let key = m
        .key
        .zip(cx.limits.key_rules)
        .map(|(key, rules)| (key, m.key_cut, rules));
    pending.push(
        entry,
        name.len(),
        &m.summary[..m.summary.len().min(SUMMARY_BYTES)],
        key,
    );
    cx.counters.pending += 1;
}

/// Pairs a parsed reply with the request it answers, or recognises it as unsolicited.
#[allow(clippy::too_many_arguments)]
fn pair_reply<S: ExchangeSink>(
    key: &FlowKey,
    m: &Message<'_>,
    rsp_start_us: u64,
    pending: &mut PendingQueue,
    pipeline: &mut PipelineClock,
    reply_mode: &mut ReplyMode,
    pubsub: &mut bool,
    monitor: &mut bool,
    cx: &mut MatchContext<'_, S>,
) {
    if *monitor {
        // MONITOR output answers nothing; only the reply to a RESET ends the mode.
        let reset_reply = m.kind == b'+' && m.head.eq_ignore_ascii_case(b"RESET");
        if !(reset_reply && front_effect(pending) == ReplyEffect::Reset) {
            cx.counters.unsolicited += 1;
            return;
        }
    }
    if m.kind == b'>' || (*pubsub && m.kind == b'*') {
        if is_subscribe_command(m.head) {
            let front_subscribes = pending.entries.front().is_some_and(|f| {
                f.confirmations_left > 0 && is_subscribe_command(pending.command(f))
            });
            match pending.entries.front() {
                Some(front) if front_subscribes => {
                    // Timed by the first confirmation; one more follows per channel.
                    if !front.answered {
                        complete(key, pending, front, m, rsp_start_us, pipeline, cx);
                    }
                    if let Some(front) = pending.entries.front_mut() {
                        front.answered = true;
                        front.confirmations_left = front.confirmations_left.saturating_sub(1);
                        if front.confirmations_left == 0 {
                            pending.entries.pop_front();
                            cx.counters.pending -= 1;
                        }
                    }
                }
                _ => cx.counters.unsolicited += 1,
            }
            return;
        }
        if m.kind == b'>'
            || PUBSUB_MESSAGES
                .iter()
                .any(|h| h.eq_ignore_ascii_case(m.head))
        {
            cx.counters.unsolicited += 1;
            return;
        }
    }
    let Some(request) = pending.entries.pop_front() else {
        cx.counters.unmatched += 1;
        return;
    };
    cx.counters.pending -= 1;
    match request.effect {
        ReplyEffect::Monitor if !m.error => *monitor = true,
        ReplyEffect::Reset if !m.error => {
            *monitor = false;
            *pubsub = false;
            *reply_mode = ReplyMode::On;
        }
        _ => {}
    }
    settle_depths(&mut pending.entries, rsp_start_us, 1, |p| {
        (p.req_done_us, &mut p.depth)
    });
    complete(key, pending, &request, m, rsp_start_us, pipeline, cx);
}

fn front_effect(pending: &PendingQueue) -> ReplyEffect {
    pending
        .entries
        .front()
        .map_or(ReplyEffect::None, |p| p.effect)
}

#[inline(always)]
fn complete<S: ExchangeSink>(
    key: &FlowKey,
    pending: &PendingQueue,
    request: &Pending,
    reply: &Message<'_>,
    rsp_start_us: u64,
    pipeline: &mut PipelineClock,
    cx: &mut MatchContext<'_, S>,
) {
    let redirect = if reply.error {
        redirect_of(reply.head).map(|(kind, _)| kind)
    } else {
        None
    };
    cx.sink.exchange(&Exchange {
        flow: *key,
        req_start_us: request.req_start_us,
        req_done_us: request.req_done_us,
        rsp_start_us,
        latency_us: rsp_start_us.saturating_sub(request.req_done_us),
        own_us: pipeline.own_time(request.req_done_us, rsp_start_us),
        depth: request.depth,
        command: if reply.error && redirect.is_none() {
            error_command(pending, request, reply)
        } else {
            pending.command(request)
        },
        summary: pending.summary(request),
        truncated: request.truncated,
        req_bytes: request.req_bytes,
        rsp_bytes: reply.bytes,
        error: reply.error && redirect.is_none(),
        hits: 0,
        misses: 0,
        rcode: None,
        slot: request.slot,
        redirect,
        template: pending.template(request),
        keys: request.keys,
    });
}

/// The command of an exchange answered by an error: a command the server does not know gets
/// no label of its own. Out of line: errors are rare, and the common path stays straight.
#[cold]
#[inline(never)]
fn error_command<'a>(
    pending: &'a PendingQueue,
    request: &Pending,
    reply: &Message<'_>,
) -> &'a [u8] {
    if reply.head.starts_with(b"ERR unknown comm") {
        UNKNOWN_TO_SERVER
    } else {
        pending.command(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[derive(Default)]
    struct Recorder {
        exchanges: Vec<(String, u64, bool)>,
        commands: Vec<String>,
        unanswered: Vec<(String, Unanswered)>,
        /// Latency, own time and depth of each exchange.
        pipeline: Vec<(u64, u64, u32)>,
    }

    impl ExchangeSink for Recorder {
        fn exchange(&mut self, e: &Exchange<'_>) {
            self.exchanges.push((
                String::from_utf8_lossy(e.summary).into_owned(),
                e.latency_us,
                e.error,
            ));
            self.commands
                .push(String::from_utf8_lossy(e.command).into_owned());
            self.pipeline.push((e.latency_us, e.own_us, e.depth));
        }
        fn unanswered(&mut self, _: SocketAddr, command: &[u8], why: Unanswered) {
            self.unanswered
                .push((String::from_utf8_lossy(command).into_owned(), why));
        }
    }

    type Harness = crate::matcher::harness::Harness<RedisPairing, Recorder>;

    impl Harness {
        fn redis() -> Self {
            Harness::new("10.0.0.2:6379")
        }
        fn summaries(&self) -> Vec<&str> {
            self.sink.exchanges.iter().map(|e| e.0.as_str()).collect()
        }
    }

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        out
    }

    #[test]
    fn latency_is_first_reply_packet_minus_last_request_packet() {
        let mut h = Harness::redis();
        let set = cmd(&["SET", "k", "v"]);
        h.req(100, &set[..5]);
        h.req(150, &set[5..]);
        h.rsp(1_150, b"+O");
        h.rsp(9_999, b"K\r\n");
        assert_eq!(
            h.sink.exchanges,
            vec![("SET k v".to_string(), 1_000, false)]
        );
    }

    /// A conversation with requests pending, a request and a reply cut mid-message, and
    /// optionally the connection made quiet ([`Connection::shrink`]) at every cut: the same
    /// exchanges either way.
    fn conversation(shrink: bool) -> Vec<(String, u64, bool)> {
        use crate::matcher::Connection;
        let mut h = Harness::redis();
        let quiet = |h: &mut Harness| {
            if shrink {
                h.conn.shrink();
            }
        };
        let mut batch = Vec::new();
        for i in 0..40 {
            batch.extend_from_slice(&cmd(&["SET", &format!("key:{i}"), "value"]));
        }
        let big = cmd(&["SET", "big", &"x".repeat(3000)]);
        batch.extend_from_slice(&big);
        batch.extend_from_slice(&cmd(&["GET", "big"]));
        let cut = batch.len() - big.len() / 2;
        h.req(10, &batch[..cut]);
        quiet(&mut h);
        let mut replies = b"+OK\r\n".repeat(20);
        h.rsp(20, &replies[..replies.len() - 2]);
        quiet(&mut h);
        h.rsp(30, b"\r\n");
        h.req(40, &batch[cut..]);
        quiet(&mut h);
        replies = b"+OK\r\n".repeat(21);
        replies.extend_from_slice(b"$3000\r\n");
        h.rsp(50, &replies);
        quiet(&mut h);
        h.rsp(60, format!("{}\r\n", "x".repeat(3000)).as_bytes());
        quiet(&mut h);
        h.close();
        h.sink.exchanges.clone()
    }

    #[test]
    fn a_connection_made_quiet_mid_message_pairs_the_same() {
        let plain = conversation(false);
        assert_eq!(plain.len(), 42);
        assert_eq!(conversation(true), plain);
    }

    #[test]
    fn a_quiet_connection_at_rest_gives_back_its_state_and_pairs_the_same() {
        use crate::matcher::Connection;
        let mut h = Harness::redis();
        h.req(10, &cmd(&["GET", "a"]));
        // A request pending: kept.
        h.conn.shrink();
        assert!(h.conn.protocol().is_some());
        h.rsp(15, b"$-1\r\n");
        // Nothing pending, both parsers between messages: given back.
        h.conn.shrink();
        assert!(h.conn.protocol().is_none());
        h.req(1_000_000, &cmd(&["GET", "b"]));
        h.rsp(1_000_007, b"$-1\r\n");
        assert_eq!(h.sink.pipeline, [(5, 5, 1), (7, 7, 1)]);
        // A mode the next replies depend on: kept (CLIENT REPLY OFF: no reply comes).
        h.req(2_000_000, &cmd(&["CLIENT", "REPLY", "OFF"]));
        h.conn.shrink();
        assert!(h.conn.protocol().is_some());
        h.req(2_000_010, &cmd(&["SET", "k", "v"]));
        assert_eq!(h.counters.noreply, 2);
        assert_eq!(h.counters.pending, 0);
        // A request cut mid-message: kept, and read whole.
        h.req(3_000_000, &cmd(&["CLIENT", "REPLY", "ON"])[..5]);
        h.conn.shrink();
        assert!(h.conn.protocol().is_some());
        h.req(3_000_001, &cmd(&["CLIENT", "REPLY", "ON"])[5..]);
        h.rsp(3_000_009, b"+OK\r\n");
        assert_eq!(h.sink.exchanges.last().unwrap().0, "CLIENT REPLY ON");
        assert_eq!(h.sink.pipeline.last(), Some(&(8, 8, 1)));
    }

    #[test]
    fn pipelined_requests_pair_in_order_with_coalesced_replies() {
        let mut h = Harness::redis();
        let mut batch = Vec::new();
        for i in 0..500 {
            batch.extend_from_slice(&cmd(&["INCR", &format!("c{i}")]));
        }
        h.req(10, &batch);
        let mut replies = Vec::new();
        for i in 0..500 {
            replies.extend_from_slice(format!(":{i}\r\n").as_bytes());
        }
        h.rsp(20, &replies[..1000]);
        h.rsp(30, &replies[1000..]);
        assert_eq!(h.sink.exchanges.len(), 500);
        assert_eq!(h.sink.exchanges[499].0, "INCR c499");
        assert_eq!(h.counters.pending, 0);
        // Replies that started in the first segment are timed by it, the rest by the second.
        assert!(h.sink.exchanges.iter().all(|e| e.1 == 10 || e.1 == 20));
    }

    #[test]
    fn requests_behind_a_slow_one_are_queued_not_slow_themselves() {
        let mut h = Harness::redis();
        let mut batch = cmd(&["DEBUG", "SLEEP", "1"]);
        for key in ["a", "b", "c"] {
            batch.extend_from_slice(&cmd(&["GET", key]));
        }
        h.req(10, &batch);
        h.rsp(1_010, b"+OK\r\n");
        h.rsp(1_012, b"$-1\r\n$-1\r\n$-1\r\n");
        // Each waited for the one before: depth 1 to 4; only the head took the server long.
        assert_eq!(
            h.sink.pipeline,
            [
                (1_000, 1_000, 1),
                (1_002, 2, 2),
                (1_002, 0, 3),
                (1_002, 0, 4)
            ]
        );
        // The next request was sent once every reply had come: nothing outstanding.
        h.req(2_000, &cmd(&["GET", "d"]));
        h.rsp(2_005, b"$-1\r\n");
        assert_eq!(h.sink.pipeline[4], (5, 5, 1));
    }

    #[test]
    fn a_request_captured_before_an_earlier_reply_did_not_wait_for_it() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["GET", "a"]));
        // GET b was sent at 20, after GET a's reply at 10, but the capture delivers it first.
        h.req(20, &cmd(&["GET", "b"]));
        h.rsp(10, b"$-1\r\n");
        h.rsp(30, b"$-1\r\n");
        assert_eq!(h.sink.pipeline, [(10, 10, 1), (10, 10, 1)]);
    }

    #[test]
    fn after_a_gap_nothing_is_taken_as_outstanding() {
        let mut h = Harness::redis();
        h.req(0, &[cmd(&["GET", "a"]), cmd(&["GET", "b"])].concat());
        // Both replies lost; a bare ACK of the server's says it had both requests.
        h.gap(Direction::Response, 5, 10);
        let ack = crate::steps::flow::StreamEvent::Ack { ack_pos: 40 };
        h.event(Direction::Response, 5, ack);
        h.req(100, &cmd(&["GET", "c"]));
        h.rsp(110, b"$-1\r\n");
        assert_eq!(h.sink.pipeline.last(), Some(&(10, 10, 1)));
    }

    #[test]
    fn error_replies_are_flagged() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["FOO"]));
        h.rsp(5, b"-ERR unknown command 'FOO'\r\n");
        assert_eq!(h.sink.exchanges, vec![("FOO".to_string(), 5, true)]);
    }

    #[test]
    fn client_reply_off_skip_and_replconf_ack_are_not_waited_for() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["CLIENT", "REPLY", "OFF"]));
        h.req(1, &cmd(&["SET", "a", "1"]));
        h.req(2, &cmd(&["CLIENT", "REPLY", "ON"]));
        h.rsp(3, b"+OK\r\n");
        h.req(4, &cmd(&["CLIENT", "REPLY", "SKIP"]));
        h.req(5, &cmd(&["SET", "b", "2"]));
        h.req(6, &cmd(&["GET", "b"]));
        h.rsp(7, b"$1\r\n2\r\n");
        h.req(8, &cmd(&["REPLCONF", "ACK", "1234"]));
        h.req(9, &cmd(&["PING"]));
        h.rsp(10, b"+PONG\r\n");
        assert_eq!(h.summaries(), ["CLIENT REPLY ON", "GET b", "PING"]);
        assert_eq!(h.counters.noreply, 5);
        assert_eq!(h.counters.unmatched, 0);
    }

    #[test]
    fn pubsub_messages_answer_nothing() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["SUBSCRIBE", "a", "b"]));
        h.rsp(
            1,
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n",
        );
        h.rsp(2, b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n");
        h.req(3, &cmd(&["PING"]));
        h.rsp(4, b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$2\r\nyo\r\n");
        h.rsp(6, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        h.req(7, &cmd(&["UNSUBSCRIBE"]));
        h.rsp(8, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n");
        assert_eq!(h.summaries(), ["SUBSCRIBE a b", "PING", "UNSUBSCRIBE"]);
        assert_eq!(h.sink.exchanges[1].1, 3);
        assert_eq!(
            h.counters.unsolicited, 3,
            "two messages and one extra confirmation"
        );
        assert_eq!(h.counters.pending, 0);
    }

    #[test]
    fn resp3_pushes_answer_nothing() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["GET", "k"]));
        h.rsp(
            1,
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n$1\r\nv\r\n",
        );
        assert_eq!(h.summaries(), ["GET k"]);
        assert_eq!(h.counters.unsolicited, 1);
    }

    #[test]
    fn multi_exec_pairs_naturally() {
        let mut h = Harness::redis();
        let mut batch = cmd(&["MULTI"]);
        batch.extend(cmd(&["INCR", "a"]));
        batch.extend(cmd(&["EXEC"]));
        h.req(0, &batch);
        h.rsp(1, b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n");
        assert_eq!(h.summaries(), ["MULTI", "INCR a", "EXEC"]);
    }

    #[test]
    fn monitor_output_answers_nothing_until_reset() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["MONITOR"]));
        h.rsp(1, b"+OK\r\n");
        h.rsp(
            2,
            b"+1339518083.107412 [0 127.0.0.1:60866] \"keys\" \"*\"\r\n",
        );
        h.req(3, &cmd(&["RESET"]));
        h.rsp(
            4,
            b"+1339518083.2 [0 127.0.0.1:60866] \"get\" \"x\"\r\n+RESET\r\n",
        );
        h.req(5, &cmd(&["PING"]));
        h.rsp(6, b"+PONG\r\n");
        assert_eq!(h.summaries(), ["MONITOR", "RESET", "PING"]);
        assert_eq!(h.counters.unsolicited, 2);
    }

    #[test]
    fn commands_are_counted_in_upper_case_and_summaries_kept_as_sent() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["get", "Key"]));
        h.req(1, &cmd(&["GET", "Key"]));
        h.req(2, b"hSet h f v\r\n");
        h.req(3, &cmd(&["lpush", "l", "x"]));
        h.rsp(4, b"$-1\r\n$-1\r\n:1\r\n");
        assert_eq!(h.summaries(), ["get Key", "GET Key", "hSet h f v"]);
        assert_eq!(h.sink.commands, ["GET", "GET", "HSET"]);
        h.close();
        assert_eq!(
            h.sink.unanswered,
            [("LPUSH".to_string(), Unanswered::Timeout)]
        );
    }

    #[test]
    fn a_gap_drops_pending_requests_and_resyncs() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["GET", "a"]));
        h.req(1, &cmd(&["GET", "b"]));
        // Reply bytes are lost: the two requests' replies may have been in the hole.
        h.gap(Direction::Response, 2, 20);
        assert_eq!(
            h.sink.unanswered,
            [
                ("GET".to_string(), Unanswered::ReplyLost),
                ("GET".to_string(), Unanswered::ReplyLost)
            ]
        );
        // The tail of an old reply is skipped, not misparsed; pairing resumes with the next
        // request the server acknowledged the start of, at the reply position its ack names.
        h.piece(Direction::Response, 2, 20, Some(40), b"lue\r\n");
        h.req(4, &cmd(&["GET", "d"]));
        h.rsp(5, b"$1\r\nD\r\n");
        assert_eq!(h.summaries(), ["GET d"]);
        assert_eq!(h.counters.desyncs, 1);
    }

    #[test]
    fn garbage_mid_stream_desyncs_then_recovers() {
        let mut h = Harness::redis();
        h.req(0, &cmd(&["GET", "a"]));
        h.rsp(1, b"@garbage\r\n");
        assert_eq!(h.counters.desyncs, 1);
        assert_eq!(
            h.sink.unanswered,
            [("GET".to_string(), Unanswered::Uncertain)]
        );
        h.req(2, &cmd(&["GET", "b"]));
        h.rsp(3, b"$-1\r\n");
        assert_eq!(h.summaries(), ["GET b"]);
    }

    #[test]
    fn pending_requests_are_bounded() {
        let mut h = Harness::redis();
        h.limits.max_pending_per_connection = 10;
        for i in 0..25 {
            h.req(i, &cmd(&["GET", "x"]));
        }
        assert_eq!(h.conn.protocol().expect("its state").pending.len(), 10);
        assert_eq!(h.sink.unanswered.len(), 15);
        assert!(h.sink.unanswered.iter().all(|u| u.1 == Unanswered::Timeout));
        h.close();
        assert_eq!(h.sink.unanswered.len(), 25);
        assert_eq!(h.counters.pending, 0);
    }
}
