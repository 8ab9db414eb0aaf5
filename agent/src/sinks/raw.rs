//! Raw mode: one line per packet that carries a payload, in the C tool's format:
//!
//! ```text
//! 2018-11-22 10:00:00 127.0.0.1:53499=>127.0.0.1:6379 REQ <seq> <ack> <flags> <size> <payload>
//! 2018-11-22 10:00:00 127.0.0.1:53=>127.0.0.1:41000 RSP <size> <payload>      (UDP)
//! ```
//!
//! `flags` is the TCP flag byte in decimal, `size` the payload length, the payload escaped.

use std::net::IpAddr;

use crate::steps::decode::{Packet, Transport};
use crate::steps::flow::Direction;
use crate::text::{push_decimal, push_endpoint, push_escaped};
use crate::timefmt::LocalClock;

/// Slots of the cache of rendered `src:port=>dst:port` texts.
const ENDPOINT_SLOTS: usize = 4096;

type Endpoints = (IpAddr, u16, IpAddr, u16);

/// Formats raw-mode lines.
pub struct RawFormatter {
    clock: LocalClock,
    /// The second last formatted, and its text.
    second: Option<(i64, Vec<u8>)>,
    /// Rendered endpoints, direct-mapped by port: formatting addresses is the costly part.
    endpoints: Vec<Option<(Endpoints, Vec<u8>)>>,
}

impl Default for RawFormatter {
    fn default() -> Self {
        Self {
            clock: LocalClock::default(),
            second: None,
            endpoints: vec![None; ENDPOINT_SLOTS],
        }
    }
}

impl RawFormatter {
    /// Appends the line of one packet (with its newline) to `out`; nothing for an empty
    /// payload.
    pub fn format(&mut self, ts_sec: i64, p: &Packet<'_>, dir: Direction, out: &mut Vec<u8>) {
        if p.payload.is_empty() {
            return;
        }
        self.push_time(ts_sec, out);
        out.push(b' ');
        self.push_endpoints(p, out);
        out.extend_from_slice(match dir {
            Direction::Request => b" REQ ",
            Direction::Response => b" RSP ",
        });
        if let Transport::Tcp { seq, ack, flags } = p.transport {
            for n in [u64::from(seq), u64::from(ack), u64::from(flags)] {
                push_decimal(out, n);
                out.push(b' ');
            }
        }
        push_decimal(out, p.payload.len() as u64);
        out.push(b' ');
        push_escaped(out, p.payload);
        out.push(b'\n');
    }

    fn push_time(&mut self, ts_sec: i64, out: &mut Vec<u8>) {
        match &self.second {
            Some((sec, text)) if *sec == ts_sec => out.extend_from_slice(text),
            _ => {
                let mut text = Vec::with_capacity(19);
                self.clock.format(ts_sec, None, &mut text);
                out.extend_from_slice(&text);
                self.second = Some((ts_sec, text));
            }
        }
    }

    fn push_endpoints(&mut self, p: &Packet<'_>, out: &mut Vec<u8>) {
        let key = (p.src, p.sport, p.dst, p.dport);
        let ports = (u32::from(p.sport) << 16) | u32::from(p.dport);
        let slot = (ports.wrapping_mul(0x9e37_79b1) >> 20) as usize % ENDPOINT_SLOTS;
        match &self.endpoints[slot] {
            Some((k, text)) if *k == key => out.extend_from_slice(text),
            _ => {
                let mut text = Vec::with_capacity(48);
                push_endpoint(&mut text, p.src, p.sport);
                text.extend_from_slice(b"=>");
                push_endpoint(&mut text, p.dst, p.dport);
                out.extend_from_slice(&text);
                self.endpoints[slot] = Some((key, text));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(f: &mut RawFormatter, p: &Packet<'_>, dir: Direction) -> String {
        let mut out = Vec::new();
        f.format(1_542_880_800, p, dir, &mut out);
        let s = String::from_utf8(out).unwrap();
        // Drop the local time, which depends on the machine's time zone.
        s.split_once(' ')
            .unwrap()
            .1
            .split_once(' ')
            .unwrap()
            .1
            .to_string()
    }

    #[test]
    fn tcp_and_udp_lines() {
        let mut f = RawFormatter::default();
        let tcp = Packet {
            src: "127.0.0.1".parse().unwrap(),
            dst: "127.0.0.1".parse().unwrap(),
            sport: 53499,
            dport: 6379,
            transport: Transport::Tcp {
                seq: 7,
                ack: 9,
                flags: 24,
            },
            payload: b"PING\r\n",
        };
        let want = "127.0.0.1:53499=>127.0.0.1:6379 REQ 7 9 24 6 PING\\r\\n\n";
        assert_eq!(line(&mut f, &tcp, Direction::Request), want);
        assert_eq!(
            line(&mut f, &tcp, Direction::Request),
            want,
            "from the caches"
        );
        let other = Packet {
            src: "10.0.0.1".parse().unwrap(),
            ..tcp
        };
        assert!(line(&mut f, &other, Direction::Request).starts_with("10.0.0.1:53499=>"));
        let udp = Packet {
            src: "::1".parse().unwrap(),
            dst: "::1".parse().unwrap(),
            sport: 53,
            dport: 41000,
            transport: Transport::Udp,
            payload: b"\x12\xfe",
        };
        assert_eq!(
            line(&mut f, &udp, Direction::Response),
            "[::1]:53=>[::1]:41000 RSP 2 \\x12\\xfe\n"
        );
        let empty = Packet {
            payload: b"",
            ..tcp
        };
        let mut out = Vec::new();
        f.format(0, &empty, Direction::Request, &mut out);
        assert!(out.is_empty());
    }
}
