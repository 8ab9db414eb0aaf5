//! The agent's Prometheus page (`--metrics-listen`): latency histograms per port, protocol
//! and command, their error and timeout counters, and every data-quality counter of the exit
//! summary (kernel drops, decode failures, evictions, gaps, desyncs, the shipper's buffer),
//! the build and the process figures.

use tcpkit_ops::prometheus::{BucketHistogram, Exposition, Labels};

use crate::modes::PortModes;
use crate::shell::shipper::ShipStatusNow;
use crate::sinks::stats::{LatencyStats, Summary};

/// One latency series: its labels and figures.
struct Series<'a> {
    port: String,
    proto: &'static str,
    command: String,
    stats: &'a LatencyStats,
    /// The Prometheus buckets, read off the fine histogram.
    prometheus: [u64; crate::histogram::PROM_BUCKETS],
    /// The same of the own times.
    own: [u64; crate::histogram::PROM_BUCKETS],
    /// The pipeline depths, in [`DEPTH_BOUNDS`].
    depth: Vec<u64>,
}

/// Bounds of the pipeline-depth buckets: exact, since the fine form keeps depths below 128
/// one by one.
const DEPTH_BOUNDS: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The sum of the depths of a set of exchanges, from their fine histogram (exact up to 127).
fn depth_sum(stats: &LatencyStats) -> u64 {
    stats
        .depths()
        .nonzero()
        .map(|(i, n)| crate::histogram::fine_value(i as usize) * n)
        .sum()
}

/// Renders the page from the summary figures, the ports' protocols and the shipper's state.
pub fn render(summary: &Summary<'_>, modes: &PortModes, ship: Option<ShipStatusNow>) -> String {
    let series: Vec<Series<'_>> = summary
        .ports
        .latency()
        .flat_map(|(port, latency)| {
            latency.commands.iter().map(move |(command, stats)| Series {
                port: port.to_string(),
                proto: modes.of(port).name(),
                command: String::from_utf8_lossy(command).into_owned(),
                stats,
                prometheus: stats.fine.prometheus_buckets(),
                own: stats.own.prometheus_buckets(),
                depth: stats.depths().counts_at_most(&DEPTH_BOUNDS),
            })
        })
        .collect();
    let labels: Vec<[(&str, &str); 3]> = series
        .iter()
        .map(|s| {
            [
                ("port", s.port.as_str()),
                ("proto", s.proto),
                ("command", s.command.as_str()),
            ]
        })
        .collect();
    let per_command = |value: fn(&LatencyStats) -> u64| {
        labels
            .iter()
            .zip(&series)
            .map(move |(l, s)| (&l[..], value(s.stats)))
    };
    // One histogram family's series: its bounds, and each series' counts and sum.
    let histograms = |bounds_us: &'static [u64],
                      of: for<'s> fn(&'s Series<'_>) -> (&'s [u64], u64)| {
        labels.iter().zip(&series).map(move |(l, s)| {
            let (counts, sum_us) = of(s);
            (
                &l[..],
                BucketHistogram {
                    bounds_us,
                    counts,
                    sum_us,
                },
            )
        })
    };
    let latency_bounds = &crate::histogram::PROM_BOUNDS_US;
    let mut page = Exposition::default();
    page.latency_histogram(
        "tcpkit_request_duration_seconds",
        "Request latency: first response packet minus the packet that completed the request.",
        histograms(latency_bounds, |s| (&s.prometheus, s.stats.total_costs)),
    );
    page.latency_histogram(
        "tcpkit_request_own_duration_seconds",
        "Request own time: its latency less the time it waited behind earlier requests of its connection (pipelining).",
        histograms(latency_bounds, |s| (&s.own, s.stats.own_costs)),
    );
    page.count_histogram(
        "tcpkit_request_pipeline_depth",
        "Requests outstanding on the connection when a request was sent, itself included.",
        histograms(&DEPTH_BOUNDS, |s| (&s.depth, depth_sum(s.stats))),
    );
    page.counter(
        "tcpkit_request_errors_total",
        "Error replies.",
        per_command(|s| s.errors),
    );
    page.counter(
        "tcpkit_request_moved_total",
        "Redis Cluster -MOVED replies: the key's slot lives on another node (not errors).",
        per_command(|s| s.moved),
    );
    page.counter(
        "tcpkit_request_ask_total",
        "Redis Cluster -ASK replies: the key's slot is migrating (not errors).",
        per_command(|s| s.ask),
    );
    page.counter(
        "tcpkit_request_timeouts_total",
        "Requests never answered (connection ended or idle, or evicted from a full queue).",
        per_command(|s| s.timeouts),
    );
    page.counter(
        "tcpkit_requests_dropped_total",
        "Pending requests dropped when their stream desynchronised.",
        per_command(|s| s.dropped),
    );
    let untimed_labels: Vec<([(&str, &str); 4], u64)> = series
        .iter()
        .flat_map(|s| {
            s.stats.untimed().map(|(reason, n)| {
                let labels = [
                    ("port", s.port.as_str()),
                    ("proto", s.proto),
                    ("command", s.command.as_str()),
                    ("reason", reason),
                ];
                (labels, n)
            })
        })
        .collect();
    page.counter(
        "tcpkit_requests_untimed_total",
        "Exchanges not timed because the capture could not prove their latency, by reason \
         (request_lost and reply_before_request under command \"?\").",
        untimed_labels.iter().map(|(l, n)| (&l[..], *n)),
    );
    // Memcached's hits and misses, DNS's response codes: only the series that counted any.
    let lookups: Vec<([(&str, &str); 4], u64)> = series
        .iter()
        .flat_map(|s| {
            [("hit", s.stats.hits), ("miss", s.stats.misses)]
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(result, n)| {
                    let labels = [
                        ("port", s.port.as_str()),
                        ("proto", s.proto),
                        ("command", s.command.as_str()),
                        ("result", result),
                    ];
                    (labels, n)
                })
        })
        .collect();
    page.counter(
        "tcpkit_cache_lookups_total",
        "Keys looked up by retrievals (memcached), by result: hit or miss.",
        lookups.iter().map(|(l, n)| (&l[..], *n)),
    );
    let rcodes: Vec<([(&str, &str); 4], u64)> = series
        .iter()
        .flat_map(|s| {
            (0u8..16)
                .filter(|&r| s.stats.rcodes[usize::from(r)] > 0)
                .map(|r| {
                    let labels = [
                        ("port", s.port.as_str()),
                        ("proto", s.proto),
                        ("command", s.command.as_str()),
                        ("rcode", crate::l7::dns::rcode_name(r)),
                    ];
                    (labels, s.stats.rcodes[usize::from(r)])
                })
        })
        .collect();
    page.counter(
        "tcpkit_dns_responses_total",
        "DNS responses by response code (NOERROR, NXDOMAIN, SERVFAIL, …).",
        rcodes.iter().map(|(l, n)| (&l[..], *n)),
    );
    page.counter(
        "tcpkit_clock_skew_total",
        "Exchanges whose reply was captured before their request was whole (timed as 0).",
        per_command(|s| s.clock_skew),
    );
    page.counter(
        "tcpkit_request_bytes_total",
        "Request bytes of paired exchanges.",
        per_command(|s| s.req_bytes),
    );
    page.counter(
        "tcpkit_response_bytes_total",
        "Response bytes of paired exchanges.",
        per_command(|s| s.rsp_bytes),
    );

    let none: Labels<'_> = &[];
    page.counter(
        "tcpkit_packets_captured_total",
        "Frames the capture delivered.",
        [(none, summary.captured)],
    );
    let kernel = summary.kernel.unwrap_or_default();
    page.counter(
        "tcpkit_kernel_dropped_packets_total",
        "Packets the kernel dropped for lack of buffer space (libpcap ps_drop).",
        [(none, kernel.dropped)],
    );
    page.counter(
        "tcpkit_interface_dropped_packets_total",
        "Packets the interface or driver dropped (libpcap ps_ifdrop).",
        [(none, kernel.if_dropped)],
    );
    let d = summary.decode;
    page.counter(
        "tcpkit_decode_failures_total",
        "Frames that did not decode, by reason.",
        [
            (&[("reason", "truncated")][..], d.truncated),
            (&[("reason", "malformed")][..], d.malformed),
            (&[("reason", "not_ip")][..], d.not_ip),
            (&[("reason", "not_tcp_or_udp")][..], d.not_tcp_or_udp),
            (&[("reason", "fragment")][..], d.fragments),
            (&[("reason", "unmonitored")][..], d.unmonitored),
        ],
    );
    let f = summary.flows;
    page.counter(
        "tcpkit_flows_created_total",
        "TCP connections tracked.",
        [(none, f.flows_created)],
    );
    page.counter(
        "tcpkit_flows_ended_total",
        "TCP connections no longer tracked, by reason.",
        [
            (&[("reason", "closed")][..], f.flows_closed),
            (&[("reason", "idle")][..], f.flows_idle_evicted),
            (&[("reason", "table_full")][..], f.flows_cap_evicted),
        ],
    );
    let r = &f.reassembly;
    page.counter(
        "tcpkit_tcp_segments_total",
        "TCP segments reassembly had to handle specially, by kind.",
        [
            (&[("kind", "retransmitted")][..], r.retransmitted_segments),
            (&[("kind", "overlapping")][..], r.overlapping_segments),
            (&[("kind", "out_of_order")][..], r.out_of_order_segments),
        ],
    );
    page.counter(
        "tcpkit_tcp_gaps_total",
        "Holes in a TCP stream that never filled.",
        [(none, r.gaps)],
    );
    page.counter(
        "tcpkit_tcp_held_overflows_total",
        "Gaps forced because the out-of-order buffer reached its cap.",
        [(none, r.held_overflows)],
    );
    if let Some(m) = summary.matching {
        page.counter(
            "tcpkit_desyncs_total",
            "Streams desynchronised by a gap or invalid bytes.",
            [(none, m.desyncs)],
        );
        page.counter(
            "tcpkit_resync_skipped_bytes_total",
            "Bytes skipped while resynchronising.",
            [(none, m.resync_skipped_bytes)],
        );
        page.counter(
            "tcpkit_unmatched_replies_total",
            "Replies with no pending request.",
            [(none, m.unmatched)],
        );
        page.counter(
            "tcpkit_unsolicited_messages_total",
            "Server messages that answer no request (pushes, pub/sub, MONITOR).",
            [(none, m.unsolicited)],
        );
        page.counter(
            "tcpkit_noreply_requests_total",
            "Requests that expect no reply.",
            [(none, m.noreply)],
        );
        page.gauge(
            "tcpkit_pending_requests",
            "Requests waiting for their reply now.",
            [(none, m.pending as f64)],
        );
    }
    if let Some(e) = summary.script_errors {
        page.counter(
            "tcpkit_script_errors_total",
            "Lua callbacks that failed: kind=error counts all, budget and memory those stopped by a limit.",
            [
                (&[("kind", "error")][..], e.failed),
                (&[("kind", "budget")][..], e.over_budget),
                (&[("kind", "memory")][..], e.over_memory),
            ],
        );
    }
    if let Some(kib) = summary.peak_rss_kib {
        page.gauge(
            "tcpkit_peak_resident_memory_bytes",
            "The agent's peak resident memory.",
            [(none, (kib * 1024) as f64)],
        );
    }
    if let Some(s) = ship {
        page.gauge(
            "tcpkit_shipper_connected",
            "1 while a stream to the aggregator is open.",
            [(none, f64::from(u8::from(s.connected)))],
        );
        page.gauge(
            "tcpkit_shipper_buffered_bytes",
            "Bytes of batches kept until the aggregator acknowledges them.",
            [(none, s.buffered_bytes as f64)],
        );
        page.counter(
            "tcpkit_shipper_acked_batches_total",
            "Batches the aggregator acknowledged.",
            [(none, s.acked_batches)],
        );
        page.counter(
            "tcpkit_shipper_dropped_total",
            "What the shipper dropped to stay within its buffer, by kind.",
            [
                (&[("kind", "events")][..], s.dropped_events),
                (&[("kind", "histograms")][..], s.dropped_histograms),
            ],
        );
    }
    page.build_and_process("tcpkit", env!("CARGO_PKG_VERSION"));
    page.finish()
}
