//! The hot path on one thread: frame → decode → direction → flow/reassembly → sinks.
//!
//! Pure: it does no I/O. Output lines are appended to a buffer that the caller drains.

use crate::capture::Frame;
use crate::decode::{decode, LinkType, Transport};
use crate::flow::{
    CloseReason, Direction, DirectionRule, FlowKey, FlowLimits, FlowTable, StreamHandler,
};
use crate::raw::RawFormatter;
use crate::stats::{DecodeCounters, PortStats, Summary};

/// What the pipeline produces per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One line per packet with payload.
    RawLines,
    /// Counting only.
    Quiet,
}

/// The stream consumer of raw mode: it prints per packet, so streams are only tracked for
/// their health counters.
struct NoStreamConsumer;

impl StreamHandler<()> for NoStreamConsumer {
    fn on_data(&mut self, _: &FlowKey, _: &mut (), _: Direction, _: u64, _: &[u8]) {}
    fn on_gap(&mut self, _: &FlowKey, _: &mut (), _: Direction, _: u64) {}
    fn on_close(&mut self, _: &FlowKey, _: (), _: CloseReason, _: u64) {}
}

/// The per-packet state of the agent.
pub struct Pipeline {
    link: LinkType,
    rule: DirectionRule,
    flows: FlowTable<()>,
    ports: PortStats,
    decode_counters: DecodeCounters,
    captured: u64,
    output: Output,
    raw: RawFormatter,
    out: Vec<u8>,
    last_ts_us: u64,
}

impl Pipeline {
    /// A pipeline for frames of `link`, monitoring `ports`.
    pub fn new(
        link: LinkType,
        rule: DirectionRule,
        ports: &[u16],
        limits: FlowLimits,
        output: Output,
    ) -> Self {
        Self {
            link,
            rule,
            flows: FlowTable::new(limits),
            ports: PortStats::new(ports),
            decode_counters: DecodeCounters::default(),
            captured: 0,
            output,
            raw: RawFormatter::default(),
            out: Vec::with_capacity(1 << 16),
            last_ts_us: 0,
        }
    }

    /// Takes one captured frame.
    pub fn on_frame(&mut self, frame: &Frame<'_>) {
        self.captured += 1;
        let packet = match decode(self.link, frame.data) {
            Ok(p) => p,
            Err(e) => return self.decode_counters.count(e),
        };
        let Some(dir) = self.rule.classify(&packet) else {
            self.decode_counters.unmonitored += 1;
            return;
        };
        let ts_us = frame.ts_us();
        self.last_ts_us = self.last_ts_us.max(ts_us);
        let server_port = match dir {
            Direction::Request => packet.dport,
            Direction::Response => packet.sport,
        };
        self.ports
            .count_packet(server_port, dir, packet.payload.len());
        if self.output == Output::RawLines {
            self.raw.format(frame.ts_sec, &packet, dir, &mut self.out);
        }
        if let Transport::Tcp { seq, ack, flags } = packet.transport {
            let key = FlowKey::of(&packet, dir);
            self.flows.tcp_segment(
                key,
                dir,
                ts_us,
                seq,
                ack,
                flags,
                packet.payload,
                &mut NoStreamConsumer,
            );
        }
    }

    /// Output produced since the last call, to be written out; the caller clears it.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Ends every flow, at the end of the capture.
    pub fn finish(&mut self) {
        self.flows.close_all(self.last_ts_us, &mut NoStreamConsumer);
    }

    /// The stats JSON document.
    pub fn stats_json(&self) -> serde_json::Value {
        self.ports.to_json()
    }

    /// Frames taken so far.
    pub fn captured(&self) -> u64 {
        self.captured
    }

    /// The figures of the exit summary (the caller adds libpcap's counters).
    pub fn summary(&self) -> Summary<'_> {
        Summary {
            captured: self.captured,
            kernel: None,
            decode: &self.decode_counters,
            flows: self.flows.counters(),
            ports: &self.ports,
        }
    }
}
