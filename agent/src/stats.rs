//! Per-port statistics and the agent's counters: the stats JSON document (served on `-P`,
//! printed by `--summary json`) and the exit summary.
//!
//! The JSON is an array with one single-key object per monitored port, in the order the
//! ports were given: `[{"6379":{"req_packets":…,…}}, …]`.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::capture::KernelStats;
use crate::decode::DecodeError;
use crate::flow::{Direction, FlowCounters};

/// Packets and payload bytes seen on one port, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortTraffic {
    /// Client → server packets.
    pub req_packets: u64,
    /// Client → server payload bytes.
    pub req_bytes: u64,
    /// Server → client packets.
    pub rsp_packets: u64,
    /// Server → client payload bytes.
    pub rsp_bytes: u64,
}

/// Statistics of every monitored port.
#[derive(Debug, Clone)]
pub struct PortStats {
    ports: Vec<u16>,
    traffic: Vec<PortTraffic>,
}

impl PortStats {
    /// Empty statistics for these ports.
    pub fn new(ports: &[u16]) -> Self {
        Self {
            ports: ports.to_vec(),
            traffic: vec![PortTraffic::default(); ports.len()],
        }
    }

    /// Counts one packet to or from the server `port`.
    pub fn count_packet(&mut self, port: u16, dir: Direction, payload_len: usize) {
        let Some(i) = self.ports.iter().position(|&p| p == port) else {
            return;
        };
        let t = &mut self.traffic[i];
        match dir {
            Direction::Request => {
                t.req_packets += 1;
                t.req_bytes += payload_len as u64;
            }
            Direction::Response => {
                t.rsp_packets += 1;
                t.rsp_bytes += payload_len as u64;
            }
        }
    }

    /// The traffic of each port, in the order given.
    pub fn ports(&self) -> impl Iterator<Item = (u16, &PortTraffic)> {
        self.ports.iter().copied().zip(self.traffic.iter())
    }

    /// The stats JSON document.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.ports()
                .map(|(port, traffic)| {
                    let mut entry = Map::new();
                    entry.insert(
                        port.to_string(),
                        serde_json::to_value(traffic).unwrap_or_default(),
                    );
                    Value::Object(entry)
                })
                .collect(),
        )
    }
}

/// Frames that did not decode, by reason, and frames outside the monitored ports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCounters {
    /// Frames shorter than a header they announce.
    pub truncated: u64,
    /// Frames with an impossible header field.
    pub malformed: u64,
    /// Frames that are not IP.
    pub not_ip: u64,
    /// IP packets that are neither TCP nor UDP.
    pub not_tcp_or_udp: u64,
    /// IP fragments.
    pub fragments: u64,
    /// Packets whose ports are not monitored (let through by a wider user filter).
    pub unmonitored: u64,
}

impl DecodeCounters {
    /// Counts one frame that did not decode.
    pub fn count(&mut self, e: DecodeError) {
        match e {
            DecodeError::Truncated => self.truncated += 1,
            DecodeError::Malformed => self.malformed += 1,
            DecodeError::NotIp => self.not_ip += 1,
            DecodeError::NotTcpOrUdp => self.not_tcp_or_udp += 1,
            DecodeError::Fragment => self.fragments += 1,
        }
    }
}

/// Everything the exit summary reports.
#[derive(Debug, Clone)]
pub struct Summary<'a> {
    /// Frames the capture delivered.
    pub captured: u64,
    /// libpcap's counters (live only).
    pub kernel: Option<KernelStats>,
    /// Decode failures.
    pub decode: &'a DecodeCounters,
    /// Flow and reassembly counters.
    pub flows: &'a FlowCounters,
    /// Per-port statistics.
    pub ports: &'a PortStats,
}

impl Summary<'_> {
    /// The summary as text, in the C tool's and tcpdump's words where they have them.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!("{} packets captured", self.captured));
        if let Some(k) = self.kernel {
            line(format!("{} packets received by filter", k.received));
            line(format!("{} packets dropped by kernel", k.dropped));
            line(format!("{} packets dropped by interface", k.if_dropped));
        }
        let d = self.decode;
        line(format!(
            "decode: {} truncated, {} malformed, {} not IP, {} not TCP/UDP, {} fragments, {} unmonitored",
            d.truncated, d.malformed, d.not_ip, d.not_tcp_or_udp, d.fragments, d.unmonitored
        ));
        let f = self.flows;
        let r = &f.reassembly;
        line(format!(
            "flows: {} created, {} closed, {} idle-evicted, {} cap-evicted",
            f.flows_created, f.flows_closed, f.flows_idle_evicted, f.flows_cap_evicted
        ));
        line(format!(
            "reassembly: {} retransmitted, {} overlapping, {} out-of-order, {} gaps (desyncs), {} held-buffer overflows",
            r.retransmitted_segments,
            r.overlapping_segments,
            r.out_of_order_segments,
            r.gaps,
            r.held_overflows
        ));
        for (port, t) in self.ports.ports() {
            line(format!(
                "port {port}: {} request packets ({} bytes), {} response packets ({} bytes)",
                t.req_packets, t.req_bytes, t.rsp_packets, t.rsp_bytes
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_one_object_per_port_in_order() {
        let mut stats = PortStats::new(&[6380, 6379]);
        stats.count_packet(6379, Direction::Request, 10);
        stats.count_packet(6379, Direction::Response, 4);
        stats.count_packet(6379, Direction::Response, 0);
        stats.count_packet(1, Direction::Request, 99);
        assert_eq!(
            stats.to_json().to_string(),
            r#"[{"6380":{"req_bytes":0,"req_packets":0,"rsp_bytes":0,"rsp_packets":0}},{"6379":{"req_bytes":10,"req_packets":1,"rsp_bytes":4,"rsp_packets":2}}]"#
        );
    }
}
