//! The hot path on one thread: frame → decode → direction → flow/reassembly → protocol
//! parser and matcher → sinks (raw lines or slow log, stats).
//!
//! Pure: it does no I/O. Output lines are appended to a buffer that the caller drains. The
//! protocol is a type parameter ([`Connection`]), so each mode is its own monomorphic loop.

use crate::matcher::dns::DnsMatcher;
use crate::matcher::{
    Connection, Exchange, ExchangeSink, MatchContext, MatchCounters, MatchLimits, Unanswered,
};
use crate::modes::{Mode, PortModes};
use crate::shell::shipper::{ShipSink, ShipStatusNow};
use crate::sinks::raw::RawFormatter;
use crate::sinks::script::{Script, ScriptOutput};
use crate::sinks::slowlog::SlowLog;
use crate::sinks::stats::{DecodeCounters, PortStats, Summary};
use crate::steps::capture::{Frame, KernelStats};
use crate::steps::decode::{decode, LinkType, Transport};
use crate::steps::flow::{
    CloseReason, Direction, DirectionRule, FlowCounters, FlowKey, FlowLimits, FlowTable,
    StreamEvent, StreamHandler,
};

/// How far behind the clock a live capture's packets may come (they wait in a ring block
/// until it fills or times out, and in the pipeline's queue): what the clock ends at a tick
/// is older than this, so that no packet still on its way could have changed it.
const CAPTURE_LAG_US: u64 = 1_000_000;

/// Where exchanges go: the per-port stats, the slow log, and a Lua script's `on_exchange`.
pub struct Sinks {
    ports: PortStats,
    modes: PortModes,
    script: Option<Script>,
    slowlog: SlowLog,
    out: Vec<u8>,
    ship: Option<ShipSink>,
}

impl Sinks {
    /// Counts an exchange and logs it when slow.
    #[inline(always)]
    fn record(&mut self, e: &Exchange<'_>) {
        let slow = self.slowlog.is_slow(e.latency_us);
        self.ports.record_exchange(e, slow);
        if slow {
            self.slowlog.format(e, &mut self.out);
        }
        if let Some(ship) = self.ship.as_mut() {
            ship.exchange(e, slow, self.modes.of(e.flow.server_port()).name());
        }
    }

    /// Applies what the script recorded and logged since the last call. Checked inline,
    /// once per packet: without a script it costs a test, not a call.
    #[inline(always)]
    fn apply_script_outputs(&mut self) {
        if self.script.is_some() {
            self.apply_outputs_of_script();
        }
    }

    /// [`Sinks::apply_script_outputs`] with a script.
    #[inline(never)]
    fn apply_outputs_of_script(&mut self) {
        let Some(script) = self.script.as_mut() else {
            return;
        };
        for output in script.take_outputs() {
            match output {
                ScriptOutput::Log(line) => {
                    self.out.extend_from_slice(line.as_bytes());
                    self.out.push(b'\n');
                }
                ScriptOutput::Record(r) => {
                    let unspecified = std::net::IpAddr::from([0, 0, 0, 0]);
                    let server = r.server.map_or(unspecified, |s| s.ip());
                    self.record(&Exchange {
                        flow: FlowKey::new(
                            r.client
                                .unwrap_or(std::net::SocketAddr::new(unspecified, 0)),
                            std::net::SocketAddr::new(server, r.port),
                        ),
                        req_start_us: r.ts_us,
                        req_done_us: r.ts_us,
                        rsp_start_us: r.ts_us + r.latency_us,
                        latency_us: r.latency_us,
                        own_us: r.latency_us,
                        depth: 1,
                        command: r.command.as_bytes(),
                        summary: r.summary.as_bytes(),
                        truncated: false,
                        req_bytes: 0,
                        rsp_bytes: 0,
                        error: r.error,
                        hits: 0,
                        misses: 0,
                        rcode: None,
                        slot: None,
                        redirect: None,
                        template: None,
                        keys: 0,
                    });
                }
            }
        }
    }
}

impl ExchangeSink for Sinks {
    fn exchange(&mut self, e: &Exchange<'_>) {
        self.record(e);
        if let Some(script) = self.script.as_mut() {
            script.exchange(e, self.modes.of(e.flow.server_port()).name());
        }
    }

    fn unanswered(&mut self, server: std::net::SocketAddr, command: &[u8], why: Unanswered) {
        self.ports.record_unanswered(server.port(), command, why);
        if let Some(ship) = self.ship.as_mut() {
            ship.unanswered(server, self.modes.of(server.port()).name(), command, why);
        }
    }

    fn expired(&mut self, e: &Exchange<'_>) {
        self.ports
            .record_unanswered(e.flow.server_port(), e.command, Unanswered::Timeout);
        self.slowlog.format_timeout(e, &mut self.out);
        if let Some(ship) = self.ship.as_mut() {
            ship.expired(e, self.modes.of(e.flow.server_port()).name());
        }
    }
}

/// Hands the flow table's streams to the connections.
struct Streams<'a> {
    modes: &'a PortModes,
    limits: &'a MatchLimits,
    counters: &'a mut MatchCounters,
    sinks: &'a mut Sinks,
}

impl<C: Connection> StreamHandler<C> for Streams<'_> {
    fn on_event(
        &mut self,
        key: &FlowKey,
        conn: &mut C,
        dir: Direction,
        ts_us: u64,
        event: StreamEvent<'_>,
    ) {
        conn.prepare(key.server_port(), self.modes);
        let mut cx = MatchContext {
            limits: self.limits,
            counters: self.counters,
            sink: self.sinks,
        };
        conn.on_event(key, dir, ts_us, event, &mut cx);
    }
    fn on_quiet(&mut self, _: &FlowKey, conn: &mut C) {
        conn.shrink();
    }
    fn on_close(&mut self, key: &FlowKey, mut conn: C, _: CloseReason, _: u64) {
        let mut cx = MatchContext {
            limits: self.limits,
            counters: self.counters,
            sink: self.sinks,
        };
        conn.on_close(key, &mut cx);
    }
}

/// The settings of a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The link type of the frames.
    pub link: LinkType,
    /// Which side is the server.
    pub rule: DirectionRule,
    /// Monitored ports and their protocols, in the order given.
    pub ports: Vec<(u16, Mode)>,
    /// Caps of the flow table.
    pub flow_limits: FlowLimits,
    /// Caps of pending requests.
    pub match_limits: MatchLimits,
    /// Slow threshold in ms; every exchange is slow when `None`.
    pub threshold_ms: Option<f64>,
}

/// What a pipeline counted: everything its summary and stats JSON report, without the
/// per-connection state, to be added to another pipeline's ([`Pipeline::absorb`]).
#[derive(Debug, Clone)]
pub struct Totals {
    captured: u64,
    last_ts_us: u64,
    decode: DecodeCounters,
    flows: FlowCounters,
    matching: MatchCounters,
    ports: PortStats,
}

/// The per-packet state of the agent.
pub struct Pipeline<C: Connection> {
    link: LinkType,
    modes: PortModes,
    dns: DnsMatcher,
    rule: DirectionRule,
    flows: FlowTable<C>,
    match_limits: MatchLimits,
    match_counters: MatchCounters,
    sinks: Sinks,
    decode_counters: DecodeCounters,
    captured: u64,
    raw: RawFormatter,
    last_ts_us: u64,
    kernel: Option<KernelStats>,
}

impl<C: Connection> Pipeline<C> {
    /// A pipeline for frames of `config.link`.
    pub fn new(config: PipelineConfig) -> Self {
        let numbers: Vec<u16> = config.ports.iter().map(|(p, _)| *p).collect();
        let modes = PortModes::new(config.ports);
        let mut ports = PortStats::new(&numbers, !modes.all_raw());
        if let Some(rules) = config.match_limits.key_rules {
            ports.set_template_cap(rules.max_templates);
        }
        Self {
            link: config.link,
            rule: config.rule,
            flows: FlowTable::new(config.flow_limits),
            match_limits: config.match_limits,
            match_counters: MatchCounters::default(),
            sinks: Sinks {
                ports,
                modes: modes.clone(),
                script: None,
                slowlog: SlowLog::new(config.threshold_ms),
                out: Vec::with_capacity(1 << 16),
                ship: None,
            },
            decode_counters: DecodeCounters::default(),
            captured: 0,
            raw: RawFormatter::default(),
            last_ts_us: 0,
            kernel: None,
            modes,
            dns: DnsMatcher::default(),
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
        if self.sinks.ship.is_some() {
            self.ship_interval(false);
        }
        let server_port = match dir {
            Direction::Request => packet.dport,
            Direction::Response => packet.sport,
        };
        self.sinks
            .ports
            .count_packet(server_port, dir, packet.payload.len());
        let mode = self.modes.of(server_port);
        if let Some(script) = self.sinks.script.as_mut() {
            script.packet(frame.ts_sec, frame.ts_usec, &packet, dir);
        } else if mode == Mode::Raw {
            self.raw
                .format(frame.ts_sec, &packet, dir, &mut self.sinks.out);
        }
        if packet.transport == Transport::Udp && mode == Mode::Dns {
            let mut cx = MatchContext {
                limits: &self.match_limits,
                counters: &mut self.match_counters,
                sink: &mut self.sinks,
            };
            self.dns.on_datagram(
                FlowKey::of(&packet, dir),
                dir == Direction::Request,
                ts_us,
                packet.payload,
                &mut cx,
            );
        }
        if let Transport::Tcp { seq, ack, flags } = packet.transport {
            let key = FlowKey::of(&packet, dir);
            let mut streams = Streams {
                modes: &self.modes,
                limits: &self.match_limits,
                counters: &mut self.match_counters,
                sinks: &mut self.sinks,
            };
            self.flows.tcp_segment(
                key,
                dir,
                ts_us,
                seq,
                ack,
                flags,
                packet.payload,
                &mut streams,
            );
        }
        self.sinks.apply_script_outputs();
    }

    /// Hands every packet to a Lua script instead of printing raw lines, and every exchange
    /// to its `on_exchange`; what it records counts in the stats, so those keep latency.
    pub fn with_script(mut self, script: Script) -> Self {
        self.sinks.ports.enable_latency();
        self.sinks.script = Some(script);
        self
    }

    /// Output produced since the last call, to be written out; the caller clears it.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.sinks.out
    }

    /// Ends every flow, at the end of the capture: pending requests become timeouts.
    pub fn finish(&mut self) {
        let mut streams = Streams {
            modes: &self.modes,
            limits: &self.match_limits,
            counters: &mut self.match_counters,
            sinks: &mut self.sinks,
        };
        self.flows.close_all(self.last_ts_us, &mut streams);
        let mut cx = MatchContext {
            limits: &self.match_limits,
            counters: &mut self.match_counters,
            sink: &mut self.sinks,
        };
        self.dns.finish(&mut cx);
        if let Some(script) = self.sinks.script.as_mut() {
            script.finish();
        }
        self.sinks.apply_script_outputs();
        self.ship_interval(true);
    }

    /// Ships exchanges to an aggregator too: slow ones as events, all of them in histogram
    /// snapshots of `interval_us` of capture time.
    pub fn with_shipping(mut self, mut ship: ShipSink) -> Self {
        if let Some(rules) = self.match_limits.key_rules {
            ship.set_template_cap(rules.max_templates);
        }
        self.sinks.ship = Some(ship);
        self
    }

    /// The shell's periodic call: libpcap's counters, the wall clock when capturing live (an
    /// idle capture still ends its intervals), and slow events shipped without waiting for
    /// a full batch.
    pub fn tick(&mut self, kernel: Option<KernelStats>, wall_us: Option<u64>) {
        self.kernel = kernel;
        if let Some(wall) = wall_us {
            self.last_ts_us = self.last_ts_us.max(wall);
            self.expire_by_clock(wall.saturating_sub(CAPTURE_LAG_US));
        }
        if self.sinks.ship.is_some() {
            self.ship_interval(false);
        }
        if let Some(ship) = self.sinks.ship.as_mut() {
            ship.send_events();
        }
    }

    /// Live, with no packet coming: the DNS queries past their timeout and the connections
    /// idle past theirs end at `now_us` all the same, as a packet at that time would end
    /// them.
    fn expire_by_clock(&mut self, now_us: u64) {
        let mut cx = MatchContext {
            limits: &self.match_limits,
            counters: &mut self.match_counters,
            sink: &mut self.sinks,
        };
        self.dns.expire(now_us, &mut cx);
        let mut streams = Streams {
            modes: &self.modes,
            limits: &self.match_limits,
            counters: &mut self.match_counters,
            sinks: &mut self.sinks,
        };
        self.flows.sweep_if_due(now_us, &mut streams);
    }

    /// Ends the shipping interval when capture time has passed it (or `now`).
    fn ship_interval(&mut self, now: bool) {
        let at = self.last_ts_us;
        let due = self
            .sinks
            .ship
            .as_mut()
            .is_some_and(|s| s.interval_due(at) || now);
        if due {
            let counters = self.counters();
            if let Some(ship) = self.sinks.ship.as_mut() {
                ship.end_interval(at, counters);
            }
        }
    }

    /// Its counts, to add to another pipeline's.
    pub fn totals(&self) -> Totals {
        Totals {
            captured: self.captured,
            last_ts_us: self.last_ts_us,
            decode: self.decode_counters,
            flows: *self.flows.counters(),
            matching: self.match_counters,
            ports: self.sinks.ports.clone(),
        }
    }

    /// Adds the counts of a pipeline that saw other connections (a shard).
    pub fn absorb(&mut self, totals: &Totals) {
        self.captured += totals.captured;
        self.last_ts_us = self.last_ts_us.max(totals.last_ts_us);
        self.decode_counters.merge(&totals.decode);
        self.flows.add_counters(&totals.flows);
        self.match_counters.merge(&totals.matching);
        self.sinks.ports.merge(&totals.ports);
    }

    /// The Prometheus page, with libpcap's counters and the shipper's state (this
    /// pipeline's [`Pipeline::ship_status`], or that of the pipelines it merges).
    pub fn metrics(&self, kernel: Option<KernelStats>, ship: Option<ShipStatusNow>) -> String {
        let mut summary = self.summary();
        summary.kernel = kernel;
        crate::shell::metrics::render(&summary, &self.modes, ship)
    }

    /// The shipper's state, when shipping.
    pub fn ship_status(&self) -> Option<ShipStatusNow> {
        self.sinks.ship.as_ref().map(ShipSink::status)
    }

    /// The data-quality counters the aggregator keeps.
    pub fn counters(&self) -> tcpkit_proto::v1::Counters {
        let f = self.flows.counters();
        let mut all = crate::sinks::stats::LatencyStats::default();
        for (_, port) in self.sinks.ports.latency() {
            all.merge(&port.all());
        }
        tcpkit_proto::v1::Counters {
            kernel_drops: self.kernel.map_or(0, |k| k.dropped),
            interface_drops: self.kernel.map_or(0, |k| k.if_dropped),
            decode_errors: self.decode_counters.truncated + self.decode_counters.malformed,
            gaps: f.reassembly.gaps,
            desyncs: self.match_counters.desyncs,
            timeouts: all.timeouts,
            flows_evicted: f.flows_idle_evicted + f.flows_cap_evicted,
            request_lost: all.untimed_for(Unanswered::RequestLost),
            reply_lost: all.untimed_for(Unanswered::ReplyLost),
            uncertain: all.untimed_for(Unanswered::Uncertain),
            reply_before_request: all.untimed_for(Unanswered::TooEarly),
            clock_skew: all.clock_skew,
            ..Default::default()
        }
    }

    /// The stats JSON document.
    pub fn stats_json(&self) -> serde_json::Value {
        self.sinks.ports.to_json()
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
            ports: &self.sinks.ports,
            matching: (!self.modes.all_raw()).then_some(&self.match_counters),
            threshold_us: self.sinks.slowlog.threshold_us(),
            script_errors: self.sinks.script.as_ref().map(Script::errors),
            peak_rss_kib: crate::sinks::stats::peak_rss_kib(),
        }
    }
}
