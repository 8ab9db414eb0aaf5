//! Raw mode: one line per packet that carries a payload, in the C tool's format:
//!
//! ```text
//! 2018-11-22 10:00:00 127.0.0.1:53499=>127.0.0.1:6379 REQ <seq> <ack> <flags> <size> <payload>
//! 2018-11-22 10:00:00 127.0.0.1:53=>127.0.0.1:41000 RSP <size> <payload>      (UDP)
//! ```
//!
//! `flags` is the TCP flag byte in decimal, `size` the payload length, the payload escaped.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use crate::decode::{Packet, Transport};
use crate::escape::push_escaped;
use crate::flow::Direction;
use crate::timefmt::LocalClock;

/// Formats raw-mode lines.
#[derive(Debug, Default)]
pub struct RawFormatter {
    clock: LocalClock,
}

impl RawFormatter {
    /// Appends the line of one packet (with its newline) to `out`; nothing for an empty
    /// payload.
    pub fn format(&mut self, ts_sec: i64, p: &Packet<'_>, dir: Direction, out: &mut Vec<u8>) {
        if p.payload.is_empty() {
            return;
        }
        self.clock.format(ts_sec, None, out);
        out.push(b' ');
        push_endpoint(out, p.src, p.sport);
        out.extend_from_slice(b"=>");
        push_endpoint(out, p.dst, p.dport);
        out.extend_from_slice(match dir {
            Direction::Request => b" REQ ",
            Direction::Response => b" RSP ",
        });
        // Writing to a Vec cannot fail.
        if let Transport::Tcp { seq, ack, flags } = p.transport {
            let _ = write!(out, "{seq} {ack} {flags} ");
        }
        let _ = write!(out, "{} ", p.payload.len());
        push_escaped(out, p.payload);
        out.push(b'\n');
    }
}

/// Appends `addr:port`, IPv6 as `[addr]:port`.
pub fn push_endpoint(out: &mut Vec<u8>, ip: IpAddr, port: u16) {
    let _ = write!(out, "{}", SocketAddr::new(ip, port));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(p: &Packet<'_>, dir: Direction) -> String {
        let mut out = Vec::new();
        RawFormatter::default().format(1_542_880_800, p, dir, &mut out);
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
        assert_eq!(
            line(&tcp, Direction::Request),
            "127.0.0.1:53499=>127.0.0.1:6379 REQ 7 9 24 6 PING\\r\\n\n"
        );
        let udp = Packet {
            src: "::1".parse().unwrap(),
            dst: "::1".parse().unwrap(),
            sport: 53,
            dport: 41000,
            transport: Transport::Udp,
            payload: b"\x12\xfe",
        };
        assert_eq!(
            line(&udp, Direction::Response),
            "[::1]:53=>[::1]:41000 RSP 2 \\x12\\xfe\n"
        );
        let empty = Packet {
            payload: b"",
            ..tcp
        };
        let mut out = Vec::new();
        RawFormatter::default().format(0, &empty, Direction::Request, &mut out);
        assert!(out.is_empty());
    }
}
