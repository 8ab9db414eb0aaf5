//! The aggregator's Prometheus page (`--metrics-listen`): the fleet-merged latency
//! histograms (every agent's snapshots summed per port, protocol and command, since the
//! aggregator started), each agent's latest data-quality counters, and the aggregator's own
//! counters (stored, duplicate and refused batches, refused calls, store failures).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tcpkit_histogram::PROM_BOUNDS_US;
use tcpkit_ops::prometheus::{BucketHistogram, Exposition, Labels};
use tcpkit_proto::v1;

use crate::merge::Merged;
use crate::store::CheckedBatch;

/// Series of the fleet view kept at most; snapshots of further series are not exported.
const MAX_SERIES: usize = 10_000;

/// What the aggregator counts, shared by its tasks and read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Calls refused for a missing or wrong token.
    pub auth_refused: Arc<AtomicU64>,
    /// Agent streams open now.
    pub streams: AtomicI64,
    /// Batches refused as malformed.
    pub invalid_batches: AtomicU64,
    /// Batches received again and acknowledged without storing.
    pub duplicate_batches: AtomicU64,
    /// Hellos and commits the store refused (disk full, I/O error, ClickHouse down).
    pub store_failures: AtomicU64,
    fleet: Mutex<Fleet>,
    /// Agents with a stream open now, and how many streams each.
    connected: Mutex<BTreeMap<String, usize>>,
}

/// An agent's open stream: counted in [`Telemetry::is_connected`] until dropped.
pub struct Connection<'a> {
    telemetry: &'a Telemetry,
    agent: String,
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        if let Ok(mut connected) = self.telemetry.connected.lock() {
            if let Some(n) = connected.get_mut(&self.agent) {
                *n -= 1;
                if *n == 0 {
                    connected.remove(&self.agent);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct Fleet {
    stored_batches: u64,
    stored_events: u64,
    stored_snapshots: u64,
    /// Per (port, protocol, command).
    latency: BTreeMap<(u32, String, String), Merged>,
    /// Each agent's latest counters.
    agents: BTreeMap<String, v1::Counters>,
}

impl Telemetry {
    /// Counts a stream of `agent` as open until the returned guard is dropped.
    pub fn connected(&self, agent: &str) -> Connection<'_> {
        if let Ok(mut connected) = self.connected.lock() {
            *connected.entry(agent.to_string()).or_default() += 1;
        }
        Connection {
            telemetry: self,
            agent: agent.to_string(),
        }
    }

    /// True while a stream of `agent` is open here.
    pub fn is_connected(&self, agent: &str) -> bool {
        self.connected.lock().is_ok_and(|c| c.contains_key(agent))
    }

    /// Takes in a batch the store has just committed.
    pub fn stored(&self, agent: &str, batch: &CheckedBatch) {
        let Ok(mut fleet) = self.fleet.lock() else {
            return;
        };
        fleet.stored_batches += 1;
        fleet.stored_events += batch.events.len() as u64;
        fleet.stored_snapshots += batch.histograms.len() as u64;
        for s in &batch.histograms {
            let key = (s.port, s.proto.clone(), s.command.clone());
            if let Some(merged) = fleet.latency.get_mut(&key) {
                merged.merge(&s.merged);
            } else if fleet.latency.len() < MAX_SERIES {
                fleet.latency.insert(key, s.merged.clone());
            }
        }
        if let Some(counters) = &batch.counters {
            if fleet.agents.contains_key(agent) || fleet.agents.len() < MAX_SERIES {
                fleet.agents.insert(agent.to_owned(), *counters);
            }
        }
    }

    /// The page.
    pub fn render(&self) -> String {
        let mut page = Exposition::default();
        let none: Labels<'_> = &[];
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        page.counter(
            "tcpkit_aggregator_refused_calls_total",
            "Calls refused for a missing or wrong token.",
            [(none, load(&self.auth_refused))],
        );
        page.gauge(
            "tcpkit_aggregator_agent_streams",
            "Agent streams open now.",
            [(none, self.streams.load(Ordering::Relaxed) as f64)],
        );
        page.counter(
            "tcpkit_aggregator_batches_total",
            "Batches received, by outcome.",
            [
                (&[("outcome", "invalid")][..], load(&self.invalid_batches)),
                (
                    &[("outcome", "duplicate")][..],
                    load(&self.duplicate_batches),
                ),
            ],
        );
        page.counter(
            "tcpkit_aggregator_store_failures_total",
            "Hellos and commits the store refused (nothing was acknowledged; agents re-send).",
            [(none, load(&self.store_failures))],
        );
        page.build_and_process("tcpkit-aggregator", env!("CARGO_PKG_VERSION"));
        let Ok(fleet) = self.fleet.lock() else {
            return page.finish();
        };
        page.counter(
            "tcpkit_aggregator_stored_total",
            "What was committed, by kind.",
            [
                (&[("kind", "batches")][..], fleet.stored_batches),
                (&[("kind", "events")][..], fleet.stored_events),
                (&[("kind", "snapshots")][..], fleet.stored_snapshots),
            ],
        );
        let keys: Vec<(String, &str, &str, &Merged)> = fleet
            .latency
            .iter()
            .map(|((port, proto, command), m)| {
                (port.to_string(), proto.as_str(), command.as_str(), m)
            })
            .collect();
        let labels: Vec<[(&str, &str); 3]> = keys
            .iter()
            .map(|(port, proto, command, _)| {
                [
                    ("port", port.as_str()),
                    ("proto", *proto),
                    ("command", *command),
                ]
            })
            .collect();
        let buckets: Vec<_> = keys
            .iter()
            .map(|k| (k.3.fine.prometheus_buckets(), k))
            .collect();
        page.latency_histogram(
            "tcpkit_fleet_request_duration_seconds",
            "Request latency over every agent, since the aggregator started (the agents' \
             10 µs-doubling buckets, read off the merged fine histograms).",
            labels.iter().zip(&buckets).map(|(l, (counts, k))| {
                (
                    &l[..],
                    BucketHistogram {
                        bounds_us: &PROM_BOUNDS_US,
                        counts,
                        sum_us: k.3.sum_us,
                    },
                )
            }),
        );
        let per_key = |value: fn(&Merged) -> u64| {
            labels
                .iter()
                .zip(&keys)
                .map(move |(l, k)| (&l[..], value(k.3)))
        };
        page.counter(
            "tcpkit_fleet_request_errors_total",
            "Error replies over every agent.",
            per_key(|m| m.errors),
        );
        page.counter(
            "tcpkit_fleet_request_timeouts_total",
            "Requests never answered, over every agent.",
            per_key(|m| m.timeouts),
        );
        let agents: Vec<([(&str, &str); 1], &v1::Counters)> = fleet
            .agents
            .iter()
            .map(|(id, c)| ([("agent", id.as_str())], c))
            .collect();
        let per_agent =
            |value: fn(&v1::Counters) -> u64| agents.iter().map(move |(l, c)| (&l[..], value(c)));
        for (name, help, value) in [
            (
                "tcpkit_fleet_kernel_dropped_packets_total",
                "Packets the agent's kernel dropped.",
                (|c| c.kernel_drops) as fn(&v1::Counters) -> u64,
            ),
            (
                "tcpkit_fleet_interface_dropped_packets_total",
                "Packets the agent's interface dropped.",
                |c| c.interface_drops,
            ),
            (
                "tcpkit_fleet_decode_failures_total",
                "Frames the agent could not decode.",
                |c| c.decode_errors,
            ),
            (
                "tcpkit_fleet_tcp_gaps_total",
                "TCP holes that never filled.",
                |c| c.gaps,
            ),
            (
                "tcpkit_fleet_desyncs_total",
                "Streams desynchronised.",
                |c| c.desyncs,
            ),
            (
                "tcpkit_fleet_timeouts_total",
                "Requests never answered.",
                |c| c.timeouts,
            ),
            (
                "tcpkit_fleet_untimed_total",
                "Exchanges not timed because the capture could not prove their latency.",
                |c| {
                    [
                        c.request_lost,
                        c.reply_lost,
                        c.uncertain,
                        c.reply_before_request,
                    ]
                    .into_iter()
                    .fold(0, u64::saturating_add)
                },
            ),
            (
                "tcpkit_fleet_clock_skew_total",
                "Exchanges timed as 0: reply captured before the request was whole.",
                |c| c.clock_skew,
            ),
            (
                "tcpkit_fleet_flows_evicted_total",
                "Connections evicted (idle or table full).",
                |c| c.flows_evicted,
            ),
            (
                "tcpkit_fleet_shipper_dropped_events_total",
                "Events the agent's shipper dropped.",
                |c| c.shipper_dropped_events,
            ),
            (
                "tcpkit_fleet_shipper_dropped_histograms_total",
                "Snapshots the agent's shipper dropped.",
                |c| c.shipper_dropped_histograms,
            ),
        ] {
            page.counter(
                name,
                &format!("{help} Each agent's latest figure (per agent run)."),
                per_agent(value),
            );
        }
        page.gauge(
            "tcpkit_fleet_shipper_buffered_bytes",
            "Bytes each agent holds unacknowledged.",
            agents
                .iter()
                .map(|(l, c)| (&l[..], c.shipper_buffered as f64)),
        );
        page.finish()
    }
}
