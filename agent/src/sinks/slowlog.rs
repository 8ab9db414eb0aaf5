//! The slow log: one line per exchange at or above the threshold (`-t`), as DESIGN.md
//! defines it:
//!
//! ```text
//! 2018-11-16 18:38:36.873067 172.20.64.106:53499 => 192.168.1.2:6379 | 11.204 ms | set foo bar
//! ```
//!
//! Local time of the request's first packet with microseconds, client => server, latency in
//! ms with 3 decimals, the request summary (cut, `...` when it was, bytes escaped).

use crate::matcher::Exchange;
use crate::text::{push_endpoint, push_escaped, push_millis};
use crate::timefmt::LocalClock;

/// Formats slow-log lines and decides what is slow.
#[derive(Debug, Default)]
pub struct SlowLog {
    clock: LocalClock,
    threshold_us: u64,
}

impl SlowLog {
    /// A slow log for exchanges of at least `threshold_ms` (every exchange when `None`).
    pub fn new(threshold_ms: Option<f64>) -> Self {
        let threshold_us = threshold_ms.map_or(0, |ms| (ms.max(0.0) * 1000.0).round() as u64);
        Self {
            clock: LocalClock::default(),
            threshold_us,
        }
    }

    /// The threshold in µs.
    pub fn threshold_us(&self) -> u64 {
        self.threshold_us
    }

    /// True when an exchange this slow is logged.
    pub fn is_slow(&self, latency_us: u64) -> bool {
        latency_us >= self.threshold_us
    }

    /// Appends the line of one exchange (with its newline) to `out`.
    pub fn format(&mut self, e: &Exchange<'_>, out: &mut Vec<u8>) {
        self.line(e, None, out);
    }

    /// Appends the line of a request that got no response in time: `timeout` in place of
    /// the latency.
    pub fn format_timeout(&mut self, e: &Exchange<'_>, out: &mut Vec<u8>) {
        self.line(e, Some(b"timeout"), out);
    }

    fn line(&mut self, e: &Exchange<'_>, instead_of_latency: Option<&[u8]>, out: &mut Vec<u8>) {
        let ts = e.req_start_us;
        self.clock
            .format((ts / 1_000_000) as i64, Some((ts % 1_000_000) as u32), out);
        out.push(b' ');
        push_endpoint(out, e.flow.client_ip(), e.flow.client_port());
        out.extend_from_slice(b" => ");
        push_endpoint(out, e.flow.server_ip(), e.flow.server_port());
        out.extend_from_slice(b" | ");
        match instead_of_latency {
            Some(text) => out.extend_from_slice(text),
            None => {
                push_millis(out, e.latency_us);
                out.extend_from_slice(b" ms");
            }
        }
        out.extend_from_slice(b" | ");
        push_escaped(out, e.summary);
        if e.truncated {
            out.extend_from_slice(b"...");
        }
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::flow::FlowKey;

    #[test]
    fn line_format() {
        let e = Exchange {
            flow: FlowKey::new(
                "172.20.64.106:53499".parse().unwrap(),
                "[::1]:6379".parse().unwrap(),
            ),
            req_start_us: 1_542_393_516_873_067,
            req_done_us: 0,
            rsp_start_us: 0,
            latency_us: 11_204,
            own_us: 11_204,
            depth: 1,
            command: b"SET",
            summary: b"set foo b\x01r",
            truncated: true,
            req_bytes: 0,
            rsp_bytes: 0,
            error: false,
            hits: 0,
            misses: 0,
            rcode: None,
            slot: None,
            redirect: None,
            template: None,
            keys: 0,
        };
        let mut out = Vec::new();
        SlowLog::new(Some(10.0)).format(&e, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(line.ends_with(
            ".873067 172.20.64.106:53499 => [::1]:6379 | 11.204 ms | set foo b\\x01r...\n"
        ));
        let (date, _) = line.split_once(' ').unwrap();
        assert_eq!(date.len(), 10);
    }

    #[test]
    fn thresholds_and_millis() {
        assert!(SlowLog::new(None).is_slow(0));
        let log = SlowLog::new(Some(20.0));
        assert!(!log.is_slow(19_999) && log.is_slow(20_000));
        for (us, text) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_050, "1.050"),
            (123_456, "123.456"),
        ] {
            let mut out = Vec::new();
            push_millis(&mut out, us);
            assert_eq!(out, text.as_bytes());
        }
    }
}
