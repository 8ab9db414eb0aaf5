//! What the agent ships to an aggregator, pure: the per-interval histograms of each (server,
//! port, command) ([`IntervalHistograms`]), slow exchanges as events ([`event_of`]), and the
//! bounded buffer of batches waiting for their acknowledgement ([`ShipBuffer`]).
//!
//! The shell around them (a thread, the gRPC stream, reconnects) is [`crate::shell::shipper`].

use std::collections::VecDeque;
use std::net::IpAddr;

use prost::Message;
use rustc_hash::FxHashMap;
use tcpkit_proto::v1;

use crate::matcher::{Exchange, Unanswered};
use crate::sinks::stats::{LatencyStats, PortLatency};
use crate::text::push_escaped;

/// The figures of one interval, per server address and port (with its protocol), per
/// command.
#[derive(Debug)]
pub struct IntervalHistograms {
    series: FxHashMap<(IpAddr, u16), (&'static str, PortLatency)>,
    template_cap: usize,
}

impl Default for IntervalHistograms {
    fn default() -> Self {
        Self {
            series: FxHashMap::default(),
            template_cap: crate::sinks::stats::DEFAULT_TEMPLATES,
        }
    }
}

impl IntervalHistograms {
    /// Keeps at most `cap` key templates per (server, port).
    pub fn set_template_cap(&mut self, cap: usize) {
        self.template_cap = cap;
    }

    fn stats(
        &mut self,
        server: IpAddr,
        port: u16,
        proto: &'static str,
        command: &[u8],
    ) -> &mut LatencyStats {
        let cap = self.template_cap;
        let (_, commands) = self
            .series
            .entry((server, port))
            .or_insert_with(|| (proto, PortLatency::with_templates(cap)));
        commands.command(command)
    }

    /// Counts one exchange.
    pub fn record(&mut self, e: &Exchange<'_>, slow: bool, proto: &'static str) {
        let cap = self.template_cap;
        let (_, port) = self
            .series
            .entry((e.flow.server_ip(), e.flow.server_port()))
            .or_insert_with(|| (proto, PortLatency::with_templates(cap)));
        port.record(e, slow);
    }

    /// Counts one request that will never be answered.
    pub fn give_up(
        &mut self,
        server: std::net::SocketAddr,
        proto: &'static str,
        command: &[u8],
        why: Unanswered,
    ) {
        self.stats(server.ip(), server.port(), proto, command)
            .give_up(why);
    }

    /// The snapshots of the interval `[start_us, start_us + interval_us)`, emptying it.
    pub fn take(&mut self, start_us: u64, interval_us: u64) -> IntervalSnapshots {
        let mut out = Vec::new();
        let mut slots = Vec::new();
        let mut templates = Vec::new();
        for ((server, port), (proto, latency)) in self.series.drain() {
            let snapshot = |name: &[u8], s: &LatencyStats| {
                let mut h = snapshot_of(name, s);
                h.ts_us = start_us;
                h.interval_us = interval_us;
                h.server = server.to_string();
                h.port = u32::from(port);
                h.proto = proto.to_string();
                h
            };
            for (name, s) in latency.templates.iter().flat_map(|t| t.commands.iter()) {
                templates.push(snapshot(name, s));
            }
            for (slot, s) in latency.slots.iter() {
                slots.push(v1::SlotSnapshot {
                    ts_us: start_us,
                    interval_us,
                    server: server.to_string(),
                    port: u32::from(port),
                    slot: u32::from(slot),
                    count: s.reqs,
                    sum_us: s.sum_us,
                    moved: s.moved,
                    ask: s.ask,
                    buckets: s.latencies.iter().map(|&n| u64::from(n)).collect(),
                });
            }
            for (command, s) in &latency.commands {
                out.push(snapshot(command, s));
            }
        }
        IntervalSnapshots {
            histograms: out,
            slots,
            templates,
        }
    }
}

/// The snapshot of a set of exchanges named `name` (a command, a key template); the caller
/// fills in the interval and the series.
fn snapshot_of(name: &[u8], s: &LatencyStats) -> v1::HistogramSnapshot {
    let (fine_index, fine_count) = s.fine.nonzero().unzip();
    let (own_fine_index, own_fine_count) = s.own.nonzero().unzip();
    let (depth_index, depth_count) = s.depths().nonzero().unzip();
    v1::HistogramSnapshot {
        command: String::from_utf8_lossy(name).into_owned(),
        count: s.total_reqs,
        sum_us: s.total_costs,
        max_us: s.fine.max_us(),
        slow: s.slow_reqs,
        errors: s.errors,
        timeouts: s.timeouts + s.dropped,
        seed: s.latencies.to_vec(),
        fine_index,
        fine_count,
        own_sum_us: s.own_costs,
        own_max_us: s.own.max_us(),
        own_fine_index,
        own_fine_count,
        depth_index,
        depth_count,
        moved: s.moved,
        ask: s.ask,
        keys: s.keys,
        multi_key: s.multi_key,
        req_bytes: s.req_bytes,
        rsp_bytes: s.rsp_bytes,
        ..v1::HistogramSnapshot::default()
    }
}

/// What an interval ships: its histogram snapshots, its Redis Cluster slots, its key
/// templates.
#[derive(Debug, Default)]
pub struct IntervalSnapshots {
    /// Per (server, port, command).
    pub histograms: Vec<v1::HistogramSnapshot>,
    /// Per (server, port, slot).
    pub slots: Vec<v1::SlotSnapshot>,
    /// Per (server, port, key template).
    pub templates: Vec<v1::HistogramSnapshot>,
}

impl IntervalSnapshots {
    /// Snapshots of both kinds (the shipper counts them alike when it must drop them).
    pub fn len(&self) -> usize {
        self.histograms.len() + self.slots.len() + self.templates.len()
    }

    /// True when there is nothing to ship.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A slow exchange as the aggregator stores it; `timeout` for a request that expired.
pub fn event_of(e: &Exchange<'_>, proto: &str, timeout: bool) -> v1::Event {
    let mut summary = Vec::with_capacity(e.summary.len() + 3);
    push_escaped(&mut summary, e.summary);
    if e.truncated {
        summary.extend_from_slice(b"...");
    }
    let status = if timeout {
        v1::Status::Timeout
    } else if e.error {
        v1::Status::Error
    } else {
        v1::Status::Ok
    };
    let client = match e.client() {
        std::net::SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        a => a.to_string(),
    };
    v1::Event {
        ts_us: e.req_start_us,
        req_done_us: e.req_done_us,
        client,
        server: e.flow.server_ip().to_string(),
        port: u32::from(e.flow.server_port()),
        proto: proto.to_string(),
        command: String::from_utf8_lossy(e.command).into_owned(),
        // Escaped: ASCII only.
        summary: String::from_utf8_lossy(&summary).into_owned(),
        latency_us: if timeout { 0 } else { e.latency_us },
        req_bytes: e.req_bytes,
        rsp_bytes: e.rsp_bytes,
        status: status as i32,
        own_us: if timeout { 0 } else { e.own_us },
        depth: e.depth,
    }
}

/// The snapshots a batch holds: histograms and slots (counted alike when dropped).
fn snapshots_of(batch: &v1::Batch) -> u64 {
    (batch.histograms.len() + batch.slots.len() + batch.templates.len()) as u64
}

/// Events per batch at most.
pub const MAX_BATCH_EVENTS: usize = 4096;

/// What was given up to stay within the buffer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Slow-request events.
    pub events: u64,
    /// Histogram snapshots.
    pub histograms: u64,
}

/// Adds the pipeline's counters of `b` to `a` (the shipper's own are stamped afterwards).
fn add_counters(a: &mut v1::Counters, b: &v1::Counters) {
    let v1::Counters {
        kernel_drops,
        interface_drops,
        decode_errors,
        gaps,
        desyncs,
        timeouts,
        flows_evicted,
        shipper_dropped_events: _,
        shipper_dropped_histograms: _,
        shipper_buffered: _,
        request_lost,
        reply_lost,
        uncertain,
        reply_before_request,
        clock_skew,
    } = b;
    a.kernel_drops += kernel_drops;
    a.interface_drops += interface_drops;
    a.decode_errors += decode_errors;
    a.gaps += gaps;
    a.desyncs += desyncs;
    a.timeouts += timeouts;
    a.flows_evicted += flows_evicted;
    a.request_lost += request_lost;
    a.reply_lost += reply_lost;
    a.uncertain += uncertain;
    a.reply_before_request += reply_before_request;
    a.clock_skew += clock_skew;
}

/// Batches waiting for their acknowledgement, bounded in bytes; the batch being filled.
///
/// Sequence numbers count from 1. Over the bound, the oldest batch holding events loses them
/// first; only when no batch holds events does the oldest batch go whole. What is dropped is
/// counted, and the counters ride on every batch (the last counters the pipeline sent, plus
/// the drops), so the aggregator learns of them with the next batch that arrives.
#[derive(Debug)]
pub struct ShipBuffer {
    pending: VecDeque<(v1::Batch, usize)>,
    bytes: usize,
    cap_bytes: usize,
    /// Batches at the front already sent on the current stream.
    sent: usize,
    open: v1::Batch,
    next_seq: u64,
    /// The last counters of each pipeline that ships (several capture live with
    /// `--threads`): every batch carries their sum.
    counters: Vec<v1::Counters>,
    dropped: Dropped,
    acked_batches: u64,
    acked_events: u64,
}

impl ShipBuffer {
    /// An empty buffer holding at most `cap_bytes` of encoded batches.
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            bytes: 0,
            cap_bytes,
            sent: 0,
            open: v1::Batch::default(),
            next_seq: 1,
            counters: Vec::new(),
            dropped: Dropped::default(),
            acked_batches: 0,
            acked_events: 0,
        }
    }

    /// Adds slow-request events to the open batch, closing it when full.
    pub fn add_events(&mut self, events: Vec<v1::Event>) {
        for e in events {
            self.open.events.push(e);
            if self.open.events.len() >= MAX_BATCH_EVENTS {
                self.close(false);
            }
        }
    }

    /// Adds an interval's snapshots and the counters of the pipeline numbered `source`, and
    /// closes the batch.
    pub fn add_interval(
        &mut self,
        source: usize,
        snapshots: IntervalSnapshots,
        counters: v1::Counters,
    ) {
        if self.counters.len() <= source {
            self.counters.resize(source + 1, v1::Counters::default());
        }
        self.counters[source] = counters;
        self.open.histograms.extend(snapshots.histograms);
        self.open.slots.extend(snapshots.slots);
        self.open.templates.extend(snapshots.templates);
        self.close(true);
    }

    /// Counts what could not even reach the buffer (the pipeline's channel was full).
    pub fn count_dropped(&mut self, dropped: Dropped) {
        self.dropped.events += dropped.events;
        self.dropped.histograms += dropped.histograms;
    }

    /// True when the open batch holds anything.
    pub fn has_open(&self) -> bool {
        !self.open.events.is_empty()
            || !self.open.histograms.is_empty()
            || !self.open.slots.is_empty()
            || !self.open.templates.is_empty()
    }

    /// Closes the open batch: it gets the next sequence number and the counters and joins
    /// the pending batches. An empty batch is closed only when `always` (it carries the
    /// counters).
    pub fn close(&mut self, always: bool) {
        if !always && !self.has_open() {
            return;
        }
        let mut batch = std::mem::take(&mut self.open);
        batch.seq = self.next_seq;
        self.next_seq += 1;
        batch.counters = Some(self.stamped_counters());
        let size = batch.encoded_len();
        self.bytes += size;
        self.pending.push_back((batch, size));
        self.enforce_cap();
    }

    fn stamped_counters(&self) -> v1::Counters {
        let mut sum = v1::Counters::default();
        for c in &self.counters {
            add_counters(&mut sum, c);
        }
        v1::Counters {
            shipper_dropped_events: self.dropped.events,
            shipper_dropped_histograms: self.dropped.histograms,
            shipper_buffered: self.bytes as u64,
            ..sum
        }
    }

    fn enforce_cap(&mut self) {
        while self.bytes > self.cap_bytes && !self.pending.is_empty() {
            if let Some((batch, size)) = self.pending.iter_mut().find(|(b, _)| !b.events.is_empty())
            {
                self.dropped.events += batch.events.len() as u64;
                batch.events = Vec::new();
                let new_size = batch.encoded_len();
                self.bytes -= *size - new_size;
                *size = new_size;
            } else if let Some((batch, size)) = self.pending.pop_front() {
                self.dropped.histograms += snapshots_of(&batch);
                self.bytes -= size;
                self.sent = self.sent.saturating_sub(1);
            }
        }
    }

    /// The acknowledgement of every batch up to `seq`.
    pub fn ack(&mut self, seq: u64) {
        while let Some((batch, size)) = self.pending.front() {
            if batch.seq > seq {
                break;
            }
            self.acked_batches += 1;
            self.acked_events += batch.events.len() as u64;
            self.bytes -= size;
            self.pending.pop_front();
            self.sent = self.sent.saturating_sub(1);
        }
    }

    /// The aggregator refused the oldest pending batch as invalid (it never will take it):
    /// it goes, its events and snapshots counted as dropped. Its sequence number, events and
    /// snapshots, when there was one.
    pub fn refuse_oldest(&mut self) -> Option<(u64, usize, usize)> {
        let (batch, size) = self.pending.pop_front()?;
        self.bytes -= size;
        self.sent = self.sent.saturating_sub(1);
        self.dropped.events += batch.events.len() as u64;
        self.dropped.histograms += snapshots_of(&batch);
        Some((batch.seq, batch.events.len(), snapshots_of(&batch) as usize))
    }

    /// A new stream: every pending batch is to be sent again.
    pub fn rewind(&mut self) {
        self.sent = 0;
    }

    /// The pending batches not yet sent on this stream, now counted as sent.
    pub fn unsent(&mut self) -> Vec<v1::Batch> {
        let out = self
            .pending
            .iter()
            .skip(self.sent)
            .map(|(b, _)| b.clone())
            .collect();
        self.sent = self.pending.len();
        out
    }

    /// True when nothing waits for an acknowledgement and nothing is open.
    pub fn is_drained(&self) -> bool {
        self.pending.is_empty() && !self.has_open()
    }

    /// Batches and events waiting for their acknowledgement.
    pub fn unacked(&self) -> (usize, usize) {
        (
            self.pending.len(),
            self.pending.iter().map(|(b, _)| b.events.len()).sum(),
        )
    }

    /// The batches waiting for their acknowledgement, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &v1::Batch> {
        self.pending.iter().map(|(b, _)| b)
    }

    /// Bytes of the batches kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Batches and events acknowledged so far.
    pub fn acked(&self) -> (u64, u64) {
        (self.acked_batches, self.acked_events)
    }

    /// What was dropped so far.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> v1::Event {
        v1::Event {
            ts_us: n,
            summary: "x".repeat(100),
            ..Default::default()
        }
    }

    fn histograms(histograms: Vec<v1::HistogramSnapshot>) -> IntervalSnapshots {
        IntervalSnapshots {
            histograms,
            ..IntervalSnapshots::default()
        }
    }

    fn snapshot() -> v1::HistogramSnapshot {
        v1::HistogramSnapshot {
            count: 1,
            seed: vec![1; 18],
            ..Default::default()
        }
    }

    #[test]
    fn batches_carry_the_sum_of_every_pipelines_last_counters() {
        let mut b = ShipBuffer::new(1 << 20);
        let counters = |drops, gaps| v1::Counters {
            kernel_drops: drops,
            gaps,
            ..Default::default()
        };
        b.add_interval(1, histograms(vec![snapshot()]), counters(1, 10));
        b.add_interval(0, histograms(vec![snapshot()]), counters(2, 20));
        // Pipeline 1 again: its newer counters replace its older ones.
        b.add_interval(1, histograms(vec![snapshot()]), counters(5, 11));
        let sent = b.unsent();
        let shipped: Vec<_> = sent
            .iter()
            .map(|b| b.counters.map(|c| (c.kernel_drops, c.gaps)).unwrap())
            .collect();
        assert_eq!(shipped, [(1, 10), (3, 30), (7, 31)]);
    }

    #[test]
    fn a_refused_batch_goes_and_is_counted() {
        let mut b = ShipBuffer::new(1 << 20);
        b.add_events(vec![event(1), event(2)]);
        b.add_interval(0, histograms(vec![snapshot()]), v1::Counters::default());
        b.add_events(vec![event(3)]);
        b.close(false);
        assert_eq!(b.refuse_oldest(), Some((1, 2, 1)));
        assert_eq!(
            b.dropped(),
            Dropped {
                events: 2,
                histograms: 1
            }
        );
        assert_eq!(b.unacked(), (1, 1));
        assert_eq!(b.unsent().iter().map(|b| b.seq).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn batches_are_numbered_acked_and_resent() {
        let mut b = ShipBuffer::new(1 << 20);
        b.add_events((0..10).map(event).collect());
        b.close(false);
        b.close(false); // nothing open: no batch
        b.add_interval(0, histograms(vec![snapshot()]), v1::Counters::default());
        let sent = b.unsent();
        assert_eq!(sent.iter().map(|b| b.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(sent[0].events.len(), 10);
        assert!(b.unsent().is_empty());
        b.ack(1);
        assert_eq!(b.unacked(), (1, 0));
        b.rewind();
        assert_eq!(b.unsent().iter().map(|b| b.seq).collect::<Vec<_>>(), [2]);
        b.ack(2);
        assert!(b.is_drained());
        assert_eq!(b.acked(), (2, 10));
    }

    #[test]
    fn full_batches_close_themselves() {
        let mut b = ShipBuffer::new(usize::MAX);
        b.add_events((0..MAX_BATCH_EVENTS as u64 * 2 + 1).map(event).collect());
        assert_eq!(b.unacked(), (2, 2 * MAX_BATCH_EVENTS));
        assert!(b.has_open());
    }

    #[test]
    fn over_the_cap_events_go_before_histograms_and_are_counted() {
        let mut b = ShipBuffer::new(4000);
        for _ in 0..5 {
            b.add_events((0..10).map(event).collect());
            b.add_interval(0, histograms(vec![snapshot()]), v1::Counters::default());
        }
        // 50 events of ~110 bytes cannot fit in 4000 bytes; every histogram can.
        let d = b.dropped();
        assert!(d.events > 0 && d.histograms == 0, "{d:?}");
        let kept: usize = b.unsent().iter().map(|b| b.events.len()).sum();
        assert_eq!(kept as u64 + d.events, 50);
        assert!(b.bytes <= 4000);
        // The drops ride on the next batch.
        b.close(true);
        let last = b.unsent().pop().unwrap();
        assert_eq!(last.counters.unwrap().shipper_dropped_events, d.events);

        let mut tiny = ShipBuffer::new(10);
        tiny.add_interval(0, histograms(vec![snapshot(); 3]), v1::Counters::default());
        assert_eq!(tiny.dropped().histograms, 3);
        assert!(tiny.unsent().is_empty());
    }
}
