//! DNS over UDP matching: a query is paired with the response that has the same client,
//! server and id. A retransmitted query (same client, server and id while the first is
//! pending) is not counted again, and the query is then not timed (counted as uncertain):
//! the response may answer either copy. A query with no response within the timeout is reported
//! as expired: a timeout in the stats and, in the slow log, a line with `timeout`. A
//! response captured before its query (capture order: two CPUs, several interfaces) waits up
//! to [`EARLY_WAIT_US`] of capture time for a query with the same client, server, id and
//! question, and pairs with it.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use super::duplex::{InvalidBytes, Protocol};
use super::{Exchange, ExchangeSink, MatchContext, Unanswered};
use crate::l7::dns::{header, question_into, rcode_name, type_name, DnsTcpFramer};
use crate::steps::flow::{Direction, FlowKey};

/// A query's connection (client and server) and its id.
type QueryKey = (FlowKey, u16);

#[derive(Debug)]
struct Query {
    ts_us: u64,
    bytes: u64,
    /// `A example.com.`
    summary: String,
    type_len: usize,
    /// A copy was sent while it was pending: a response may answer either.
    resent: bool,
}

/// Pending DNS queries of all clients, bounded, expiring in capture time (after
/// [`MatchLimits::dns_timeout_us`](super::MatchLimits)).
#[derive(Debug, Default)]
pub struct DnsMatcher {
    pending: FxHashMap<QueryKey, Query>,
    /// Reused for the summary of each response.
    scratch: String,
    /// Reused for the name of each question read.
    name: String,
    /// Summaries of queries done with, for the next ones (no allocation per query).
    spare: Vec<String>,
    /// Queries in arrival order, for expiry (entries already answered are skipped).
    order: VecDeque<(u64, QueryKey)>,
    /// Responses captured before any query they could answer, oldest first.
    early: VecDeque<EarlyResponse>,
}

/// A response waiting for its query.
#[derive(Debug)]
struct EarlyResponse {
    key: QueryKey,
    ts_us: u64,
    bytes: u64,
    rcode: u8,
    /// Its question, `A example.com.`.
    question: String,
}

/// Capture time a response waits at most for a query captured after it, µs.
pub const EARLY_WAIT_US: u64 = 100_000;
/// Responses waiting for their query at most.
const MAX_EARLY: usize = 1024;
/// Summaries kept for reuse at most.
const MAX_SPARE: usize = 1024;

impl DnsMatcher {
    /// Takes one datagram of `flow`: a query when it goes to the server, else a response.
    pub fn on_datagram<S: ExchangeSink>(
        &mut self,
        flow: FlowKey,
        to_server: bool,
        ts_us: u64,
        payload: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) {
        self.expire(ts_us, cx);
        let Ok(msg) = header(payload) else {
            cx.counters.desyncs += 1; // an invalid datagram: counted, nothing else lost
            return;
        };
        let key = (flow, msg.id);
        if to_server && !msg.response {
            if let Some(first) = self.pending.get_mut(&key) {
                // A retransmission: counted once. The same datagram captured twice (same
                // capture time) is no copy the server could answer.
                cx.counters.noreply += 1;
                first.resent |= first.ts_us != ts_us;
                return;
            }
            if self.pending.len() >= cx.limits.max_pending_total {
                cx.sink
                    .unanswered(flow.server(), b"QUERY", Unanswered::Timeout);
                return;
            }
            let Some((summary, type_len)) = self.question(payload) else {
                cx.counters.desyncs += 1;
                return;
            };
            let query = Query {
                ts_us,
                bytes: payload.len() as u64,
                summary,
                type_len,
                resent: false,
            };
            if !self.early.is_empty() {
                // A response captured before its query, but not answering before it was sent.
                let early = self.early.iter().position(|r| {
                    r.key == key && r.question == query.summary && r.ts_us >= query.ts_us
                });
                if let Some(early) = early.and_then(|i| self.early.remove(i)) {
                    self.answer(&key, &query, early.ts_us, early.bytes, early.rcode, cx);
                    self.recycle(query.summary);
                    self.recycle(early.question);
                    return;
                }
            }
            self.pending.insert(key, query);
            self.order.push_back((ts_us, key));
            cx.counters.pending += 1;
        } else if !to_server && msg.response {
            let Some(query) = self.pending.remove(&key) else {
                self.wait_for_query(key, ts_us, payload, msg.rcode, cx);
                return;
            };
            cx.counters.pending -= 1;
            if query.resent {
                let command = &query.summary.as_bytes()[..query.type_len];
                cx.sink
                    .unanswered(flow.server(), command, Unanswered::Uncertain);
            } else {
                self.answer(&key, &query, ts_us, payload.len() as u64, msg.rcode, cx);
            }
            self.recycle(query.summary);
        } else {
            cx.counters.unsolicited += 1;
        }
    }

    /// Pairs `query` with its response.
    #[inline(always)]
    fn answer<S: ExchangeSink>(
        &mut self,
        key: &QueryKey,
        query: &Query,
        rsp_us: u64,
        rsp_bytes: u64,
        rcode: u8,
        cx: &mut MatchContext<'_, S>,
    ) {
        let summary = &mut self.scratch;
        summary.clear();
        summary.push_str(&query.summary);
        summary.push(' ');
        summary.push_str(rcode_name(rcode));
        let exchange = Exchange {
            rsp_start_us: rsp_us,
            latency_us: rsp_us.saturating_sub(query.ts_us),
            // A DNS server answers each query on its own: no time queued behind others.
            own_us: rsp_us.saturating_sub(query.ts_us),
            summary: summary.as_bytes(),
            rsp_bytes,
            error: !matches!(rcode, 0 | 3),
            rcode: Some(rcode),
            ..query.unanswered(key)
        };
        // With templates, the name's: folded below the zones the user names.
        match cx.limits.key_rules {
            Some(rules) => {
                let name =
                    &query.summary.as_bytes()[(query.type_len + 1).min(query.summary.len())..];
                rules.with_name_template(name, |template| {
                    cx.sink.exchange(&exchange.with_template(template, 1))
                })
            }
            None => cx.sink.exchange(&exchange),
        }
    }

    /// Keeps a response that no pending query is waiting for, in case its query was captured
    /// after it; responses that waited too long answer nothing.
    fn wait_for_query<S: ExchangeSink>(
        &mut self,
        key: QueryKey,
        ts_us: u64,
        payload: &[u8],
        rcode: u8,
        cx: &mut MatchContext<'_, S>,
    ) {
        let Some((question, _)) = self.question(payload) else {
            cx.counters.unmatched += 1;
            return;
        };
        if self.early.len() >= MAX_EARLY {
            if let Some(oldest) = self.early.pop_front() {
                self.recycle(oldest.question);
            }
            cx.counters.unmatched += 1;
        }
        self.early.push_back(EarlyResponse {
            key,
            ts_us,
            bytes: payload.len() as u64,
            rcode,
            question,
        });
    }

    /// Keeps a summary done with for a later query's.
    fn recycle(&mut self, summary: String) {
        if self.spare.len() < MAX_SPARE {
            self.spare.push(summary);
        }
    }

    /// The first question of a message as a summary, `A example.com.`, and the length of
    /// its type: `? ?` for a message without one, `None` for one that cannot be read.
    fn question(&mut self, payload: &[u8]) -> Option<(String, usize)> {
        self.name.clear();
        let (qtype, name) = match question_into(payload, &mut self.name).ok()? {
            Some(qtype) => (qtype, self.name.as_str()),
            None => (0, "?"),
        };
        let qtype = type_name(qtype);
        let text = question_text(&mut self.spare, &qtype, name);
        Some((text, qtype.len()))
    }

    /// Reports the queries older than the timeout at capture time `now_us` as expired.
    #[inline(always)]
    pub fn expire<S: ExchangeSink>(&mut self, now_us: u64, cx: &mut MatchContext<'_, S>) {
        while self
            .early
            .front()
            .is_some_and(|r| r.ts_us.saturating_add(EARLY_WAIT_US) < now_us)
        {
            if let Some(oldest) = self.early.pop_front() {
                self.recycle(oldest.question);
            }
            cx.counters.unmatched += 1;
        }
        while let Some(&(ts, key)) = self.order.front() {
            if now_us.saturating_sub(ts) < cx.limits.dns_timeout_us {
                break;
            }
            self.order.pop_front();
            // A newer query with the same key has its own entry further on.
            if self.pending.get(&key).is_some_and(|q| q.ts_us == ts) {
                if let Some(query) = self.pending.remove(&key) {
                    cx.counters.pending -= 1;
                    expired(&key, &query, cx);
                    self.recycle(query.summary);
                }
            }
        }
    }

    /// Drops every pending query (a desynchronised stream), counting them under `why`.
    pub fn drop_all<S: ExchangeSink>(&mut self, why: Unanswered, cx: &mut MatchContext<'_, S>) {
        self.order.clear();
        cx.counters.unmatched += self.early.len() as u64;
        self.early.clear();
        for (key, query) in self.pending.drain() {
            cx.counters.pending -= 1;
            let command = &query.summary.as_bytes()[..query.type_len];
            cx.sink.unanswered(key.0.server(), command, why);
        }
    }

    /// Reports every pending query as expired, at the end of the capture.
    pub fn finish<S: ExchangeSink>(&mut self, cx: &mut MatchContext<'_, S>) {
        self.order.clear();
        cx.counters.unmatched += self.early.len() as u64;
        self.early.clear();
        for (key, query) in self.pending.drain() {
            cx.counters.pending -= 1;
            expired(&key, &query, cx);
        }
    }
}

/// `A example.com.`: the query type and the name, without the formatting machinery, in a
/// spare summary when there is one.
fn question_text(spare: &mut Vec<String>, qtype: &str, name: &str) -> String {
    let mut text = spare.pop().unwrap_or_default();
    text.clear();
    text.push_str(qtype);
    text.push(' ');
    text.push_str(name);
    text
}

fn expired<S: ExchangeSink>(key: &QueryKey, query: &Query, cx: &mut MatchContext<'_, S>) {
    cx.sink.expired(&query.unanswered(key));
}

impl Query {
    /// The query as an exchange with no response yet (the fields a response fills are empty).
    fn unanswered(&self, key: &QueryKey) -> Exchange<'_> {
        Exchange {
            flow: key.0,
            req_start_us: self.ts_us,
            req_done_us: self.ts_us,
            rsp_start_us: self.ts_us,
            latency_us: 0,
            own_us: 0,
            depth: 1,
            command: &self.summary.as_bytes()[..self.type_len],
            summary: self.summary.as_bytes(),
            truncated: false,
            req_bytes: self.bytes,
            rsp_bytes: 0,
            error: false,
            hits: 0,
            misses: 0,
            rcode: None,
            slot: None,
            redirect: None,
            template: None,
            keys: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::dns::tests::message;
    use crate::matcher::{MatchCounters, MatchLimits, Unanswered};

    #[derive(Default)]
    struct Recorder(Vec<(String, u64, Option<u8>)>, Vec<String>);

    impl ExchangeSink for Recorder {
        fn exchange(&mut self, e: &Exchange<'_>) {
            self.0.push((
                String::from_utf8_lossy(e.summary).into_owned(),
                e.latency_us,
                e.rcode,
            ));
        }
        fn unanswered(&mut self, _: std::net::SocketAddr, _: &[u8], _: Unanswered) {}
        fn expired(&mut self, e: &Exchange<'_>) {
            self.1.push(String::from_utf8_lossy(e.summary).into_owned());
        }
    }

    #[test]
    fn pairs_by_id_ignores_retransmissions_and_expires() {
        let flow = FlowKey::new(
            "10.0.0.1:5000".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap(),
        );
        let limits = MatchLimits::default();
        let mut counters = MatchCounters::default();
        let mut sink = Recorder::default();
        let mut dns = DnsMatcher::default();
        let mut cx = MatchContext {
            limits: &limits,
            counters: &mut counters,
            sink: &mut sink,
        };
        let q1 = message(1, 0x0100, "a.test", 1);
        let q2 = message(2, 0x0100, "nope.test", 28);
        let q3 = message(3, 0x0100, "lost.test", 1);
        dns.on_datagram(flow, true, 0, &q1, &mut cx);
        dns.on_datagram(flow, true, 10, &q2, &mut cx);
        dns.on_datagram(flow, true, 20, &q2, &mut cx); // retransmitted
        dns.on_datagram(flow, true, 30, &q3, &mut cx);
        dns.on_datagram(
            flow,
            false,
            1_000,
            &message(2, 0x8183, "nope.test", 28),
            &mut cx,
        );
        dns.on_datagram(
            flow,
            false,
            2_000,
            &message(1, 0x8180, "a.test", 1),
            &mut cx,
        );
        dns.on_datagram(
            flow,
            true,
            6_000_000,
            &message(4, 0x0100, "b.test", 1),
            &mut cx,
        );
        dns.finish(&mut cx);
        // The response to the query sent twice may answer either copy: not timed.
        assert_eq!(
            sink.0,
            vec![("A a.test. NOERROR".to_string(), 2_000, Some(0))]
        );
        assert_eq!(sink.1, ["A lost.test.", "A b.test."]);
        assert_eq!((counters.noreply, counters.pending), (1, 0));
    }
}

/// The state of one DNS-over-TCP connection: a framer per direction and the matcher of its
/// queries (several may be pending: DNS over TCP pipelines by id).
#[derive(Debug, Default)]
pub struct DnsTcpPairing {
    queries: DnsTcpFramer,
    responses: DnsTcpFramer,
    req_clock: super::ChunkClock,
    rsp_clock: super::ChunkClock,
    matcher: DnsMatcher,
}

impl Protocol for DnsTcpPairing {
    fn on_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> Result<(), InvalidBytes> {
        let Self {
            queries,
            responses,
            req_clock,
            rsp_clock,
            matcher,
        } = self;
        match dir {
            Direction::Request => {
                let mut timer = req_clock.begin(ts_us, queries.in_message());
                queries.feed(bytes, &mut |msg| {
                    let (_, done) = timer.next_times();
                    matcher.on_datagram(*key, true, done, msg, cx);
                });
                req_clock.end(&timer, queries.in_message());
            }
            Direction::Response => {
                let mut timer = rsp_clock.begin(ts_us, responses.in_message());
                responses.feed(bytes, &mut |msg| {
                    let start = timer.next_start();
                    matcher.on_datagram(*key, false, start, msg, cx);
                });
                rsp_clock.end(&timer, responses.in_message());
            }
        }
        Ok(())
    }

    fn starts_message(&self, _: Direction, bytes: &[u8]) -> bool {
        // A length prefix: a message has at least its 12-byte header.
        bytes.len() < 2 || u16::from_be_bytes([bytes[0], bytes[1]]) >= 12
    }

    fn in_message(&self, dir: Direction) -> bool {
        match dir {
            Direction::Request => self.queries.in_message(),
            Direction::Response => self.responses.in_message(),
        }
    }

    fn reset<S: ExchangeSink>(
        &mut self,
        _key: &FlowKey,
        why: Unanswered,
        cx: &mut MatchContext<'_, S>,
    ) {
        self.matcher.drop_all(why, cx);
        self.queries.reset();
        self.responses.reset();
    }

    fn on_close<S: ExchangeSink>(&mut self, _key: &FlowKey, cx: &mut MatchContext<'_, S>) {
        self.matcher.finish(cx);
    }
}
