//! What an agent may send: the checks every hello and batch pass before anything is stored.
//!
//! Values from the wire are refused when they cannot be true, so that nothing stored can
//! wrap a sum or print as nonsense: sizes within [`Limits`]; times between
//! [`EARLIEST_US`] (2000-01-01) and a day after the aggregator's clock; intervals and
//! latencies under a year; every count and counter below [`MAX_COUNT`] (2^48: a million
//! requests a second for nine years), so that sums of any fleet's snapshots stay far from
//! 2^64; histograms whose buckets add up; names without control characters (they reach
//! terminals: `tcpkit-query` also escapes whatever it prints).

use tcpkit_proto::v1;

use crate::merge::Merged;
use crate::slots::{CheckedSlot, SlotSum};
use crate::store::{CheckedBatch, CheckedSnapshot};

/// Limits on what an agent may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest gRPC message, bytes.
    pub max_message_bytes: usize,
    /// Events per batch.
    pub max_events: usize,
    /// Histogram snapshots per batch.
    pub max_histograms: usize,
    /// Longest text field (summary), bytes.
    pub max_text: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            max_events: 100_000,
            max_histograms: 100_000,
            max_text: 4096,
        }
    }
}

/// The earliest capture time taken: 2000-01-01T00:00:00Z, µs.
pub const EARLIEST_US: u64 = 946_684_800_000_000;
/// How far ahead of the aggregator's clock a capture time may be (clocks differ).
pub const AHEAD_US: u64 = 86_400_000_000;
/// The longest interval or latency taken: a year, µs.
pub const LONGEST_US: u64 = 365 * 86_400_000_000;
/// The largest count or counter taken.
pub const MAX_COUNT: u64 = 1 << 48;
/// The deepest pipeline an event may name: more requests than an agent holds pending.
pub const MAX_DEPTH: u64 = 1 << 24;
/// The longest agent id.
pub const MAX_ID_BYTES: usize = 256;

/// Checks a hello: an id of 1 to [`MAX_ID_BYTES`] bytes, and an id, host name and version
/// without control characters.
pub fn check_hello(hello: &v1::Hello) -> Result<(), String> {
    if hello.agent_id.is_empty() || hello.agent_id.len() > MAX_ID_BYTES {
        return Err(format!(
            "the agent id must have 1 to {MAX_ID_BYTES} bytes, not {}",
            hello.agent_id.len()
        ));
    }
    for (what, text) in [
        ("agent id", &hello.agent_id),
        ("host name", &hello.hostname),
        ("version", &hello.version),
    ] {
        if text.len() > MAX_ID_BYTES {
            return Err(format!(
                "{what} of {} bytes, at most {MAX_ID_BYTES}",
                text.len()
            ));
        }
        plain(what, text)?;
    }
    for p in &hello.ports {
        port(p.port)?;
        plain("port protocol", &p.proto)?;
    }
    Ok(())
}

/// Checks that a batch is storable: bounded sizes, times and counts that can be true,
/// histograms that add up. `now_us` is the aggregator's clock.
pub fn check_batch(batch: v1::Batch, limits: &Limits, now_us: u64) -> Result<CheckedBatch, String> {
    if batch.seq == 0 {
        return Err("sequence numbers start at 1".into());
    }
    if batch.events.len() > limits.max_events {
        return Err(format!(
            "{} events, at most {}",
            batch.events.len(),
            limits.max_events
        ));
    }
    if batch.histograms.len() > limits.max_histograms {
        return Err(format!(
            "{} histograms, at most {}",
            batch.histograms.len(),
            limits.max_histograms
        ));
    }
    let too_long = |what: &str, s: &str| -> Result<(), String> {
        if s.len() > limits.max_text {
            Err(format!(
                "{what} of {} bytes, at most {}",
                s.len(),
                limits.max_text
            ))
        } else {
            Ok(())
        }
    };
    let latest = now_us.saturating_add(AHEAD_US);
    let time = |what: &str, ts_us: u64| -> Result<(), String> {
        if (EARLIEST_US..=latest).contains(&ts_us) {
            Ok(())
        } else {
            Err(format!(
                "{what} {ts_us} µs since 1970 is before 2000 or more than a day ahead of this \
                 aggregator's clock ({now_us})"
            ))
        }
    };
    for e in &batch.events {
        for (what, text) in [
            ("client", &e.client),
            ("server", &e.server),
            ("proto", &e.proto),
            ("command", &e.command),
            ("summary", &e.summary),
        ] {
            too_long(what, text)?;
        }
        for (what, text) in [
            ("client", &e.client),
            ("server", &e.server),
            ("proto", &e.proto),
            ("command", &e.command),
        ] {
            plain(what, text)?;
        }
        port(e.port)?;
        time("event time", e.ts_us)?;
        if e.req_done_us != 0 {
            time("request end", e.req_done_us)?;
        }
        bounded("latency", e.latency_us, LONGEST_US)?;
        // The own time is a part of the latency.
        bounded("own time", e.own_us, e.latency_us)?;
        bounded("pipeline depth", u64::from(e.depth), MAX_DEPTH)?;
        bounded("request bytes", e.req_bytes, MAX_COUNT)?;
        bounded("reply bytes", e.rsp_bytes, MAX_COUNT)?;
    }
    let snapshot = |h: v1::HistogramSnapshot| {
        for (what, text) in [
            ("server", &h.server),
            ("proto", &h.proto),
            ("command", &h.command),
        ] {
            too_long(what, text)?;
            plain(what, text)?;
        }
        port(h.port)?;
        time("snapshot time", h.ts_us)?;
        bounded("interval", h.interval_us, LONGEST_US)?;
        for (what, n) in [
            ("count", h.count),
            ("slow", h.slow),
            ("errors", h.errors),
            ("timeouts", h.timeouts),
        ] {
            bounded(what, n, MAX_COUNT)?;
        }
        bounded("latency sum", h.sum_us, MAX_COUNT.saturating_mul(1 << 14))?;
        bounded("largest latency", h.max_us, LONGEST_US)?;
        bounded("own time sum", h.own_sum_us, h.sum_us)?;
        bounded("largest own time", h.own_max_us, h.max_us)?;
        bounded("redirects", h.moved.saturating_add(h.ask), h.count)?;
        bounded("multi-key requests", h.multi_key, h.count)?;
        for (what, n) in [
            ("keys", h.keys),
            ("request bytes", h.req_bytes),
            ("reply bytes", h.rsp_bytes),
        ] {
            bounded(what, n, MAX_COUNT.saturating_mul(1 << 14))?;
        }
        for &n in h.seed.iter().chain(&h.fine_count).chain(&h.own_fine_count) {
            bounded("bucket count", n, MAX_COUNT)?;
        }
        let merged = Merged::from_snapshot(&h).map_err(|e| e.to_string())?;
        Ok(CheckedSnapshot {
            ts_us: h.ts_us,
            interval_us: h.interval_us,
            server: h.server,
            port: h.port,
            proto: h.proto,
            command: h.command,
            merged,
        })
    };
    let histograms = batch
        .histograms
        .into_iter()
        .map(snapshot)
        .collect::<Result<_, String>>()?;
    let templates = batch
        .templates
        .into_iter()
        .map(snapshot)
        .collect::<Result<_, String>>()?;
    let slots = batch
        .slots
        .into_iter()
        .map(|s| {
            too_long("server", &s.server)?;
            plain("server", &s.server)?;
            port(s.port)?;
            time("slot snapshot time", s.ts_us)?;
            bounded("interval", s.interval_us, LONGEST_US)?;
            for n in [s.count, s.moved, s.ask].iter().chain(&s.buckets) {
                bounded("slot count", *n, MAX_COUNT)?;
            }
            bounded("latency sum", s.sum_us, MAX_COUNT.saturating_mul(1 << 14))?;
            let sum = SlotSum::from_snapshot(&s)?;
            Ok(CheckedSlot {
                ts_us: s.ts_us,
                interval_us: s.interval_us,
                server: s.server,
                port: s.port,
                slot: s.slot as u16,
                sum,
            })
        })
        .collect::<Result<_, String>>()?;
    if let Some(c) = &batch.counters {
        counters(c)?;
    }
    Ok(CheckedBatch {
        seq: batch.seq,
        events: batch.events,
        histograms,
        slots,
        templates,
        counters: batch.counters,
    })
}

/// Checks a query's filter: times that SQLite's signed integers hold.
pub fn check_filter(f: &v1::Filter) -> Result<(), String> {
    for (what, us) in [("from", f.from_us), ("to", f.to_us)] {
        if i64::try_from(us).is_err() {
            return Err(format!(
                "the range's {what} ({us} µs) is past the year 292277"
            ));
        }
    }
    port(f.port)
}

fn counters(c: &v1::Counters) -> Result<(), String> {
    let v1::Counters {
        kernel_drops,
        interface_drops,
        decode_errors,
        gaps,
        desyncs,
        timeouts,
        flows_evicted,
        shipper_dropped_events,
        shipper_dropped_histograms,
        shipper_buffered,
        request_lost,
        reply_lost,
        uncertain,
        reply_before_request,
        clock_skew,
    } = *c;
    for n in [
        kernel_drops,
        interface_drops,
        decode_errors,
        gaps,
        desyncs,
        timeouts,
        flows_evicted,
        shipper_dropped_events,
        shipper_dropped_histograms,
        shipper_buffered,
        request_lost,
        reply_lost,
        uncertain,
        reply_before_request,
        clock_skew,
    ] {
        bounded("counter", n, MAX_COUNT)?;
    }
    Ok(())
}

fn bounded(what: &str, n: u64, max: u64) -> Result<(), String> {
    if n <= max {
        Ok(())
    } else {
        Err(format!("{what} {n} cannot be true (at most {max})"))
    }
}

fn port(port: u32) -> Result<(), String> {
    if port > u32::from(u16::MAX) {
        return Err(format!("port {port}"));
    }
    Ok(())
}

/// Refuses control characters (C0, DEL, C1) and the bidirectional overrides that reorder
/// what a terminal shows.
fn plain(what: &str, text: &str) -> Result<(), String> {
    match text.chars().find(|&c| crate::report::needs_escape(c)) {
        Some(c) => Err(format!("{what} holds the control character {:?}", c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_US: u64 = 1_780_000_000_000_000;

    fn event() -> v1::Event {
        v1::Event {
            ts_us: NOW_US - 1_000_000,
            req_done_us: NOW_US - 999_000,
            client: "10.0.0.1:40000".into(),
            server: "10.0.0.2".into(),
            port: 6379,
            latency_us: 120,
            ..Default::default()
        }
    }

    fn snapshot() -> v1::HistogramSnapshot {
        let mut seed = vec![0; 18];
        seed[0] = 1;
        v1::HistogramSnapshot {
            ts_us: NOW_US - 10_000_000,
            interval_us: 10_000_000,
            count: 1,
            sum_us: 50,
            max_us: 50,
            seed,
            fine_index: vec![tcpkit_histogram::fine_index(50) as u32],
            fine_count: vec![1],
            ..Default::default()
        }
    }

    #[test]
    fn malformed_batches_are_refused_with_a_reason() {
        let limits = Limits {
            max_events: 2,
            max_text: 16,
            ..Limits::default()
        };
        let ok = v1::Batch {
            seq: 1,
            events: vec![event()],
            histograms: vec![snapshot()],
            templates: vec![v1::HistogramSnapshot {
                command: "user:{id}:cart".into(),
                keys: 1,
                ..snapshot()
            }],
            counters: Some(v1::Counters::default()),
            slots: vec![v1::SlotSnapshot {
                ts_us: NOW_US,
                server: "10.0.0.2".into(),
                port: 6379,
                slot: 12182,
                count: 1,
                buckets: vec![1; 1].into_iter().chain([0; 22]).collect(),
                ..Default::default()
            }],
        };
        if let Err(e) = check_batch(ok.clone(), &limits, NOW_US) {
            panic!("{e}");
        }
        let with_event = |e: v1::Event| v1::Batch {
            events: vec![e],
            ..ok.clone()
        };
        let with_snapshot = |h: v1::HistogramSnapshot| v1::Batch {
            histograms: vec![h],
            ..ok.clone()
        };
        let with_slot = |f: fn(&mut v1::SlotSnapshot)| {
            let mut b = ok.clone();
            f(&mut b.slots[0]);
            b
        };
        let cases = [
            (
                v1::Batch {
                    seq: 0,
                    ..ok.clone()
                },
                "start at 1",
            ),
            (
                with_slot(|s| s.count = 2),
                "slot count 2 but its buckets hold 1",
            ),
            (
                with_slot(|s| s.slot = 16384),
                "slot 16384 is not in 0..16384",
            ),
            (with_slot(|s| s.moved = 2), "2 redirects among 1 exchanges"),
            (
                with_slot(|s| s.server = "\u{1b}x".into()),
                "server holds the control",
            ),
            (
                v1::Batch {
                    events: vec![event(); 3],
                    ..ok.clone()
                },
                "3 events",
            ),
            (
                with_event(v1::Event {
                    summary: "x".repeat(17),
                    ..event()
                }),
                "summary of 17 bytes",
            ),
            (
                with_snapshot(v1::HistogramSnapshot {
                    fine_count: vec![2],
                    ..snapshot()
                }),
                "count 1",
            ),
            (
                with_event(v1::Event {
                    ts_us: u64::MAX,
                    ..event()
                }),
                "event time 18446744073709551615",
            ),
            (
                with_event(v1::Event {
                    ts_us: 0,
                    ..event()
                }),
                "before 2000",
            ),
            (
                with_event(v1::Event {
                    ts_us: NOW_US + AHEAD_US + 1,
                    ..event()
                }),
                "a day ahead",
            ),
            (
                with_event(v1::Event {
                    latency_us: u64::MAX,
                    ..event()
                }),
                "latency",
            ),
            (
                with_event(v1::Event {
                    client: "\u{1b}]0;owned\u{7}".into(),
                    ..event()
                }),
                "client holds the control character",
            ),
            (
                with_snapshot(v1::HistogramSnapshot {
                    ts_us: u64::MAX,
                    ..snapshot()
                }),
                "snapshot time",
            ),
            (
                with_snapshot(v1::HistogramSnapshot {
                    count: u64::MAX - 1,
                    seed: {
                        let mut s = vec![0; 18];
                        s[0] = u64::MAX - 1;
                        s
                    },
                    fine_count: vec![u64::MAX - 1],
                    ..snapshot()
                }),
                "count 18446744073709551614 cannot be true",
            ),
            (
                with_snapshot(v1::HistogramSnapshot {
                    seed: {
                        let mut s = vec![u64::MAX / 2; 18];
                        s[0] = 1;
                        s
                    },
                    ..snapshot()
                }),
                "bucket count",
            ),
            (
                v1::Batch {
                    counters: Some(v1::Counters {
                        gaps: u64::MAX,
                        ..Default::default()
                    }),
                    ..ok.clone()
                },
                "counter",
            ),
        ];
        for (batch, why) in cases {
            let err = check_batch(batch, &limits, NOW_US).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn hellos_with_control_characters_are_refused() {
        let ok = v1::Hello {
            agent_id: "web-1.example".into(),
            hostname: "web-1".into(),
            version: "0.1.0".into(),
            session: 7,
            ports: vec![],
        };
        assert!(check_hello(&ok).is_ok());
        for (hello, why) in [
            (
                v1::Hello {
                    agent_id: String::new(),
                    ..ok.clone()
                },
                "1 to 256 bytes",
            ),
            (
                v1::Hello {
                    agent_id: "evil\u{1b}[2J".into(),
                    ..ok.clone()
                },
                "agent id holds",
            ),
            (
                v1::Hello {
                    hostname: "a\nb".into(),
                    ..ok.clone()
                },
                "host name holds",
            ),
            (
                v1::Hello {
                    version: "1\u{202e}0".into(),
                    ..ok.clone()
                },
                "version holds",
            ),
        ] {
            let err = check_hello(&hello).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
