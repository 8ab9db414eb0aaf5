//! Per-port statistics and the agent's counters: the stats JSON document (served on `-P`,
//! printed by `--summary json`) and the exit summary.
//!
//! The JSON is an array with one single-key object per monitored port, in the order the
//! ports were given: `[{"6379":{"req_packets":…,…}}, …]`. In a protocol mode each port
//! object also has the seed's latency keys (`total_reqs`, `total_costs`, `slow_reqs`,
//! `latencies`), percentiles, error, timeout and byte counts, and a `commands` object with
//! the same figures per command.

use rustc_hash::FxHashMap;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::histogram::{
    fine_index, fine_lower, prom_bucket, prom_quantile_bound_us, seed_bucket, FineHistogram,
    PROM_BUCKETS, SEED_BUCKETS, SEED_LABELS,
};
use crate::l7::cluster::Redirect;
use crate::matcher::{Exchange, MatchCounters, Unanswered};
use crate::steps::capture::KernelStats;
use crate::steps::decode::DecodeError;
use crate::steps::flow::{Direction, FlowCounters};
use crate::text::push_millis;

/// Latency figures of a set of exchanges (a port, or one command on a port).
#[derive(Debug, Default, Clone)]
pub struct LatencyStats {
    /// Exchanges paired.
    pub total_reqs: u64,
    /// Sum of their latencies, µs.
    pub total_costs: u64,
    /// Exchanges at or above the slow threshold.
    pub slow_reqs: u64,
    /// The 18 seed buckets.
    pub latencies: [u64; SEED_BUCKETS],
    /// The fine, mergeable histogram (percentiles).
    pub fine: FineHistogram,
    /// Sum of the exchanges' own times ([`Exchange::own_us`]), µs: `total_costs - own_costs`
    /// is the time they spent queued behind earlier requests of their connections.
    pub own_costs: u64,
    /// The own times, in the fine form.
    pub own: FineHistogram,
    /// The pipeline depths above 1 ([`Exchange::depth`]), in the fine form (exact below
    /// 128); those of 1 are the rest of `total_reqs` ([`LatencyStats::depths`]), so that
    /// unpipelined traffic pays nothing for them.
    pub pipelined_depths: FineHistogram,
    /// Error replies.
    pub errors: u64,
    /// Redis Cluster redirects: `-MOVED` replies (the slot lives on another node).
    pub moved: u64,
    /// `-ASK` replies (the slot is migrating).
    pub ask: u64,
    /// Requests never answered (connection ended, idle, or queue overflow).
    pub timeouts: u64,
    /// Requests dropped when their stream desynchronised (reply lost, or position
    /// uncertain).
    pub dropped: u64,
    /// Exchanges not timed, by reason, in the order of [`Unanswered::UNTIMED`].
    pub untimed: [u64; 4],
    /// Exchanges whose reply was captured before the request was whole (two CPUs' clocks):
    /// timed as 0.
    pub clock_skew: u64,
    /// Request bytes of the exchanges.
    pub req_bytes: u64,
    /// Response bytes of the exchanges.
    pub rsp_bytes: u64,
    /// Keys found by retrievals (memcached).
    pub hits: u64,
    /// Keys not found by retrievals (memcached).
    pub misses: u64,
    /// Responses per response code (DNS).
    pub rcodes: [u64; 16],
    /// Keys the requests named (a key template's: `MGET k1 k2` names 2).
    pub keys: u64,
    /// Requests that named more than one key.
    pub multi_key: u64,
}

/// Where an exchange falls in the histograms of a [`LatencyStats`].
struct Buckets {
    /// Its latency's seed bucket.
    seed: usize,
    /// Its latency's fine bucket.
    latency: usize,
    /// Its own time's fine bucket.
    own: usize,
}

impl Buckets {
    #[inline(always)]
    fn of(e: &Exchange<'_>) -> Self {
        Self {
            seed: seed_bucket(e.latency_us),
            latency: fine_index(e.latency_us),
            own: fine_index(e.own_us),
        }
    }
}

impl LatencyStats {
    /// Adds another set's figures to this one (exact: counts add up).
    pub fn merge(&mut self, other: &LatencyStats) {
        self.total_reqs += other.total_reqs;
        self.total_costs += other.total_costs;
        self.slow_reqs += other.slow_reqs;
        for (mine, theirs) in self.latencies.iter_mut().zip(other.latencies) {
            *mine += theirs;
        }
        self.fine.merge(&other.fine);
        self.own_costs += other.own_costs;
        self.own.merge(&other.own);
        self.pipelined_depths.merge(&other.pipelined_depths);
        self.errors += other.errors;
        self.moved += other.moved;
        self.ask += other.ask;
        self.timeouts += other.timeouts;
        self.dropped += other.dropped;
        for (mine, theirs) in self.untimed.iter_mut().zip(other.untimed) {
            *mine += theirs;
        }
        self.clock_skew += other.clock_skew;
        self.req_bytes += other.req_bytes;
        self.rsp_bytes += other.rsp_bytes;
        self.hits += other.hits;
        self.misses += other.misses;
        for (mine, theirs) in self.rcodes.iter_mut().zip(other.rcodes) {
            *mine += theirs;
        }
        self.keys += other.keys;
        self.multi_key += other.multi_key;
    }

    /// Counts one exchange (the tests' way in: [`PortLatency::record`] is the pipeline's).
    #[cfg(test)]
    pub(crate) fn record(&mut self, e: &Exchange<'_>, slow: bool) {
        self.record_in(e, slow, &Buckets::of(e));
    }

    /// [`LatencyStats::record`] with the exchange's buckets found once, for an exchange
    /// counted in two sets (its command's and its key template's).
    #[inline(always)]
    fn record_in(&mut self, e: &Exchange<'_>, slow: bool, buckets: &Buckets) {
        self.total_reqs += 1;
        self.total_costs += e.latency_us;
        self.slow_reqs += u64::from(slow);
        self.latencies[buckets.seed] += 1;
        self.fine.record_at(buckets.latency, e.latency_us);
        self.own_costs += e.own_us;
        self.own.record_at(buckets.own, e.own_us);
        if e.depth > 1 {
            self.pipelined_depths.record(u64::from(e.depth));
        }
        self.errors += u64::from(e.error);
        if let Some(redirect) = e.redirect {
            self.redirected(redirect);
        }
        self.clock_skew += u64::from(e.rsp_start_us < e.req_done_us);
        self.req_bytes += e.req_bytes;
        self.rsp_bytes += e.rsp_bytes;
        self.hits += u64::from(e.hits);
        self.misses += u64::from(e.misses);
        if let Some(rcode) = e.rcode {
            self.rcodes[usize::from(rcode & 15)] += 1;
        }
    }

    #[cold]
    fn redirected(&mut self, redirect: Redirect) {
        match redirect {
            Redirect::Moved => self.moved += 1,
            Redirect::Ask => self.ask += 1,
        }
    }

    pub(crate) fn give_up(&mut self, why: Unanswered) {
        match why {
            Unanswered::Timeout => self.timeouts += 1,
            Unanswered::ReplyLost | Unanswered::Uncertain => self.dropped += 1,
            Unanswered::RequestLost | Unanswered::TooEarly => {}
        }
        if let Some(i) = Unanswered::UNTIMED.iter().position(|(u, _)| *u == why) {
            self.untimed[i] += 1;
        }
    }

    /// Exchanges sent while an earlier request of their connection was outstanding.
    pub fn pipelined(&self) -> u64 {
        self.pipelined_depths.total()
    }

    /// The depths of every exchange, in the fine form (exact below 128).
    pub fn depths(&self) -> FineHistogram {
        let mut all = self.pipelined_depths.clone();
        all.record_n(1, self.total_reqs.saturating_sub(all.total()));
        all
    }

    /// Requests counted here: exchanges, and those never answered or not timed (the
    /// dropped ones are among the latter).
    pub fn seen(&self) -> u64 {
        self.total_reqs + self.timeouts + self.untimed.iter().sum::<u64>()
    }

    /// The exchanges not timed for one of the [`Unanswered::UNTIMED`] reasons (0 for any
    /// other).
    pub fn untimed_for(&self, why: Unanswered) -> u64 {
        Unanswered::UNTIMED
            .iter()
            .position(|(u, _)| *u == why)
            .map_or(0, |i| self.untimed[i])
    }

    /// The exchanges not timed, by reason name.
    pub fn untimed(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Unanswered::UNTIMED
            .iter()
            .zip(self.untimed)
            .map(|((_, name), n)| (*name, n))
    }

    fn to_json(&self) -> Map<String, Value> {
        let f = &self.fine;
        let depths = self.depths();
        let mut m = Map::new();
        for (k, v) in [
            ("total_reqs", self.total_reqs),
            ("total_costs", self.total_costs),
            ("slow_reqs", self.slow_reqs),
            ("p50_us", f.quantile(0.5)),
            ("p90_us", f.quantile(0.9)),
            ("p99_us", f.quantile(0.99)),
            ("p999_us", f.quantile(0.999)),
            ("max_us", f.max_us()),
            ("own_costs", self.own_costs),
            ("own_p50_us", self.own.quantile(0.5)),
            ("own_p90_us", self.own.quantile(0.9)),
            ("own_p99_us", self.own.quantile(0.99)),
            ("own_p999_us", self.own.quantile(0.999)),
            ("own_max_us", self.own.max_us()),
            ("pipelined_reqs", self.pipelined()),
            ("depth_p50", depths.quantile(0.5)),
            ("depth_p99", depths.quantile(0.99)),
            ("depth_max", depths.max_us()),
            ("errors", self.errors),
            ("moved", self.moved),
            ("ask", self.ask),
            ("timeouts", self.timeouts),
            ("dropped", self.dropped),
            ("clock_skew", self.clock_skew),
            ("req_bytes", self.req_bytes),
            ("rsp_bytes", self.rsp_bytes),
            ("hits", self.hits),
            ("misses", self.misses),
        ] {
            m.insert(k.to_string(), json!(v));
        }
        m.insert("latencies".to_string(), json!(self.latencies));
        let depths: Map<String, Value> = depths
            .nonzero()
            .map(|(i, n)| (fine_lower(i as usize).to_string(), json!(n)))
            .collect();
        m.insert("depths".to_string(), Value::Object(depths));
        let untimed: Map<String, Value> = self
            .untimed()
            .map(|(k, n)| (k.to_string(), json!(n)))
            .collect();
        m.insert("untimed".to_string(), Value::Object(untimed));
        let rcodes: Map<String, Value> = (0u8..16)
            .filter(|&r| self.rcodes[usize::from(r)] > 0)
            .map(|r| {
                (
                    crate::l7::dns::rcode_name(r).to_string(),
                    json!(self.rcodes[usize::from(r)]),
                )
            })
            .collect();
        if !rcodes.is_empty() {
            m.insert("rcodes".to_string(), Value::Object(rcodes));
        }
        m
    }
}

/// The figures of one Redis Cluster hash slot on a port: requests, redirects, and their
/// latencies in the Prometheus buckets (10 µs doubling: exact, and small enough for every
/// one of the 16384 slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotStats {
    /// Exchanges whose first key is in the slot.
    pub reqs: u64,
    /// Sum of their latencies, µs.
    pub sum_us: u64,
    /// Of them, answered `-MOVED`.
    pub moved: u64,
    /// Of them, answered `-ASK`.
    pub ask: u64,
    /// Their latencies per [`PROM_BOUNDS_US`] bucket.
    pub latencies: [u32; PROM_BUCKETS],
}

impl Default for SlotStats {
    fn default() -> Self {
        Self {
            reqs: 0,
            sum_us: 0,
            moved: 0,
            ask: 0,
            latencies: [0; PROM_BUCKETS],
        }
    }
}

impl SlotStats {
    fn record(&mut self, e: &Exchange<'_>) {
        self.reqs += 1;
        self.sum_us += e.latency_us;
        match e.redirect {
            Some(Redirect::Moved) => self.moved += 1,
            Some(Redirect::Ask) => self.ask += 1,
            None => {}
        }
        let bucket = &mut self.latencies[prom_bucket(e.latency_us)];
        *bucket = bucket.saturating_add(1);
    }

    fn merge(&mut self, other: &SlotStats) {
        self.reqs += other.reqs;
        self.sum_us += other.sum_us;
        self.moved += other.moved;
        self.ask += other.ask;
        for (mine, theirs) in self.latencies.iter_mut().zip(other.latencies) {
            *mine = mine.saturating_add(theirs);
        }
    }

    /// The bound of the bucket holding the `q` quantile, µs: an upper bound of it within a
    /// factor of two (0 when empty; the last bound for the bucket past them).
    pub fn quantile_bound_us(&self, q: f64) -> u64 {
        prom_quantile_bound_us(self.latencies.iter().map(|&n| u64::from(n)), q)
    }
}

/// Slots per chunk of a [`SlotTable`].
const SLOT_CHUNK: usize = 128;

/// The figures of every hash slot seen on a port: 128 chunks of 128 slots, each allocated
/// when one of its slots is first seen (16 KB), so that a lookup is two indexes and a port
/// that sees every slot holds 2 MB.
#[derive(Debug, Clone, Default)]
pub struct SlotTable {
    chunks: Vec<Option<Box<[SlotStats; SLOT_CHUNK]>>>,
    seen: usize,
}

impl SlotTable {
    #[inline(always)]
    fn get_mut(&mut self, slot: u16) -> &mut SlotStats {
        let (chunk, at) = (
            usize::from(slot) / SLOT_CHUNK,
            usize::from(slot) % SLOT_CHUNK,
        );
        if chunk >= self.chunks.len() {
            self.chunks.resize(chunk + 1, None);
        }
        let stats = &mut self.chunks[chunk]
            .get_or_insert_with(|| Box::new([SlotStats::default(); SLOT_CHUNK]))[at];
        if stats.reqs == 0 {
            self.seen += 1;
        }
        stats
    }

    /// Counts one exchange under its slot.
    #[inline(always)]
    pub fn record(&mut self, slot: u16, e: &Exchange<'_>) {
        self.get_mut(slot).record(e);
    }

    /// Adds another table's figures.
    pub fn merge(&mut self, other: &SlotTable) {
        for (slot, stats) in other.iter() {
            self.get_mut(slot).merge(stats);
        }
    }

    /// The slots with requests, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &SlotStats)> + '_ {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk.iter().flat_map(move |chunk| {
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.reqs > 0)
                    .map(move |(i, s)| ((c * SLOT_CHUNK + i) as u16, s))
            })
        })
    }

    /// Slots with requests.
    pub fn len(&self) -> usize {
        self.seen
    }

    /// True when no slot was seen.
    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }
}

/// Slots shown in the stats JSON: the busiest, and every slot redirected.
const SHOWN_SLOTS: usize = 32;

/// Distinct commands tracked per port; others are counted under `OTHER`.
const MAX_COMMANDS: usize = 256;
/// Names past the cap whose sightings are counted, to promote the frequent ones.
const MAX_CANDIDATES: usize = 64;
/// Where the commands past the cap are counted.
const OTHER: &[u8] = b"OTHER";
/// Where the key templates past their cap are counted.
pub const OTHER_TEMPLATE: &[u8] = b"{other}";
/// Key templates tracked per port by default (`--key-templates N`).
pub const DEFAULT_TEMPLATES: usize = 256;

/// Latency figures of one port, overall and per command.
///
/// At most [`MAX_COMMANDS`] names have their own figures; past that an exchange counts under
/// `OTHER`, and its name as a candidate (at most [`MAX_CANDIDATES`], the least seen dropped
/// first). A candidate seen more often than the least seen named command takes that one's
/// place: the evicted figures join `OTHER`, the newcomer's start from there (its earlier
/// exchanges stay in `OTHER`). So the cap keeps the commands seen most, not the first seen.
///
/// The same table, of another cap and another name for the rest, holds a port's key
/// templates ([`PortLatency::templates`]).
#[derive(Debug, Clone)]
pub struct PortLatency {
    /// Per command name. The port's own figures are their sum ([`PortLatency::all`]): each
    /// exchange is recorded once.
    pub commands: Vec<(Box<[u8]>, LatencyStats)>,
    index: FxHashMap<Box<[u8]>, usize>,
    /// The command looked up last: consecutive exchanges are often of the same command.
    last: usize,
    /// The one looked up before it: or of two alternating (a set then a get).
    previous: usize,
    /// Names counted under `OTHER`, and how often each was seen since it became one.
    candidates: FxHashMap<Box<[u8]>, u64>,
    /// A lower bound of the sightings of the least seen named command (counts only grow).
    weakest_seen: u64,
    /// Sightings of promoted candidates before their promotion (counted under `OTHER`), so
    /// that a newcomer is not evicted at once by the next candidate.
    credit: FxHashMap<Box<[u8]>, u64>,
    /// Per Redis Cluster hash slot (with `--slots`).
    pub slots: SlotTable,
    /// Per key template, once an exchange has one (`{other}` past `template_cap`).
    pub templates: Option<Box<PortLatency>>,
    template_cap: usize,
    /// Names with figures of their own at most, and where the rest are counted.
    cap: usize,
    other: &'static [u8],
}

impl Default for PortLatency {
    fn default() -> Self {
        Self::with_cap(MAX_COMMANDS, OTHER)
    }
}

impl PortLatency {
    /// An empty table of at most `cap` names, the rest under `other`.
    fn with_cap(cap: usize, other: &'static [u8]) -> Self {
        Self {
            commands: Vec::new(),
            index: FxHashMap::default(),
            last: 0,
            previous: 0,
            candidates: FxHashMap::default(),
            weakest_seen: 0,
            credit: FxHashMap::default(),
            slots: SlotTable::default(),
            templates: None,
            template_cap: DEFAULT_TEMPLATES,
            cap: cap.max(1),
            other,
        }
    }

    /// A port's figures, with at most `template_cap` key templates.
    pub fn with_templates(template_cap: usize) -> Self {
        Self {
            template_cap,
            ..Self::default()
        }
    }
    /// The figures of every exchange of the port.
    pub fn all(&self) -> LatencyStats {
        let mut all = LatencyStats::default();
        self.commands.iter().for_each(|(_, stats)| all.merge(stats));
        all
    }

    /// Adds another port's figures, command by command.
    pub fn merge(&mut self, other: &PortLatency) {
        for (name, stats) in &other.commands {
            self.command(name).merge(stats);
        }
        self.slots.merge(&other.slots);
        if let Some(theirs) = &other.templates {
            self.template_table().merge(theirs);
        }
    }

    #[inline]
    fn template_table(&mut self) -> &mut PortLatency {
        let cap = self.template_cap;
        self.templates
            .get_or_insert_with(|| Box::new(PortLatency::with_cap(cap, OTHER_TEMPLATE)))
    }

    /// Counts one exchange.
    #[inline(always)]
    pub(crate) fn record(&mut self, e: &Exchange<'_>, slow: bool) {
        let buckets = Buckets::of(e);
        self.command(e.command).record_in(e, slow, &buckets);
        if let Some(slot) = e.slot {
            self.slots.record(slot, e);
        }
        if let Some(template) = e.template {
            let stats = self.template_table().command(template);
            stats.record_in(e, slow, &buckets);
            stats.keys += u64::from(e.keys);
            stats.multi_key += u64::from(e.keys > 1);
        }
    }

    /// The slots the stats JSON shows: the [`SHOWN_SLOTS`] with the most requests, and every
    /// one redirected; busiest first.
    pub fn shown_slots(&self) -> Vec<(u16, SlotStats)> {
        let mut all: Vec<(u16, SlotStats)> = self.slots.iter().map(|(k, &v)| (k, v)).collect();
        all.sort_by_key(|(slot, s)| (std::cmp::Reverse(s.reqs), *slot));
        let mut shown = 0;
        all.retain(|(_, s)| {
            shown += 1;
            shown <= SHOWN_SLOTS || s.moved + s.ask > 0
        });
        all
    }

    /// The figures of one command (`OTHER` past [`MAX_COMMANDS`]). Consecutive exchanges are
    /// mostly of the same command, or of two alternating: those two are checked first,
    /// inline.
    #[inline(always)]
    pub(crate) fn command(&mut self, name: &[u8]) -> &mut LatencyStats {
        let is = |at: usize| {
            self.commands
                .get(at)
                .is_some_and(|(n, _)| same_bytes(n, name))
        };
        if !is(self.last) {
            let found = if is(self.previous) {
                self.previous
            } else {
                self.find_or_add(name)
            };
            self.previous = std::mem::replace(&mut self.last, found);
        }
        &mut self.commands[self.last].1
    }

    #[cold]
    #[inline(never)]
    fn find_or_add(&mut self, name: &[u8]) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        if self.commands.len() < self.cap || name == self.other {
            return self.add(name);
        }
        self.past_the_cap(name)
    }

    fn add(&mut self, name: &[u8]) -> usize {
        self.index.insert(name.into(), self.commands.len());
        self.commands.push((name.into(), LatencyStats::default()));
        self.commands.len() - 1
    }

    /// A name that has no figures of its own while the cap is reached: `OTHER`'s index, or
    /// the index it takes over from the least seen named command.
    fn past_the_cap(&mut self, name: &[u8]) -> usize {
        let other = match self.index.get(self.other) {
            Some(&i) => i,
            None => self.add(self.other),
        };
        let seen = {
            let seen = self.candidates.entry(name.into()).or_insert(0);
            *seen += 1;
            *seen
        };
        if self.candidates.len() > MAX_CANDIDATES {
            let least = self
                .candidates
                .iter()
                .min_by_key(|(_, n)| **n)
                .map(|(k, _)| k.clone());
            if let Some(least) = least {
                self.candidates.remove(&least);
            }
        }
        if seen <= self.weakest_seen {
            return other;
        }
        let Some((weakest, weakest_seen)) = self
            .commands
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| &**n != self.other)
            .map(|(i, (n, stats))| (i, stats.seen() + self.credit.get(n).copied().unwrap_or(0)))
            .min_by_key(|(_, seen)| *seen)
        else {
            return other;
        };
        self.weakest_seen = weakest_seen;
        if seen <= weakest_seen {
            return other;
        }
        // The newcomer takes the weakest one's place; the weakest's figures join OTHER.
        let evicted = std::mem::take(&mut self.commands[weakest].1);
        self.commands[other].1.merge(&evicted);
        let old_name = std::mem::replace(&mut self.commands[weakest].0, name.into());
        self.index.remove(&old_name);
        self.credit.remove(&old_name);
        self.index.insert(name.into(), weakest);
        self.candidates.remove(name);
        self.credit.insert(name.into(), seen);
        self.weakest_seen = 0;
        weakest
    }
}

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
    /// Latency figures, in a protocol mode.
    latency: Option<Vec<PortLatency>>,
}

impl PortStats {
    /// Empty statistics for these ports; `with_latency` in a protocol mode.
    pub fn new(ports: &[u16], with_latency: bool) -> Self {
        Self {
            ports: ports.to_vec(),
            traffic: vec![PortTraffic::default(); ports.len()],
            latency: with_latency.then(|| vec![PortLatency::default(); ports.len()]),
        }
    }

    /// Adds the statistics of the same ports seen elsewhere (another shard's connections).
    pub fn merge(&mut self, other: &PortStats) {
        for (i, port) in other.ports.iter().enumerate() {
            let Some(j) = self.ports.iter().position(|p| p == port) else {
                continue;
            };
            let (mine, theirs) = (&mut self.traffic[j], &other.traffic[i]);
            mine.req_packets += theirs.req_packets;
            mine.req_bytes += theirs.req_bytes;
            mine.rsp_packets += theirs.rsp_packets;
            mine.rsp_bytes += theirs.rsp_bytes;
            if let (Some(mine), Some(theirs)) = (self.latency.as_mut(), other.latency.as_ref()) {
                mine[j].merge(&theirs[i]);
            }
        }
    }

    /// Keeps at most `cap` key templates per port.
    pub fn set_template_cap(&mut self, cap: usize) {
        for port in self.latency.iter_mut().flatten() {
            *port = PortLatency::with_templates(cap);
        }
    }

    /// Keeps latency figures from now on (a script may record exchanges in raw mode).
    pub fn enable_latency(&mut self) {
        if self.latency.is_none() {
            self.latency = Some(vec![PortLatency::default(); self.ports.len()]);
        }
    }

    fn port_latency(&mut self, port: u16) -> Option<&mut PortLatency> {
        let i = self.ports.iter().position(|&p| p == port)?;
        self.latency.as_mut().map(|l| &mut l[i])
    }

    /// Counts one exchange on its server's port.
    #[inline(always)]
    pub fn record_exchange(&mut self, e: &Exchange<'_>, slow: bool) {
        if let Some(port) = self.port_latency(e.flow.server_port()) {
            port.record(e, slow);
        }
    }

    /// Counts one request that will never be answered.
    pub fn record_unanswered(&mut self, port: u16, command: &[u8], why: Unanswered) {
        if let Some(port) = self.port_latency(port) {
            port.command(command).give_up(why);
        }
    }

    /// The latency figures of each port, in a protocol mode.
    pub fn latency(&self) -> impl Iterator<Item = (u16, &PortLatency)> {
        self.ports
            .iter()
            .copied()
            .zip(self.latency.iter().flatten())
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
        let port_object = |i: usize| {
            let mut fields = match serde_json::to_value(self.traffic[i]) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            };
            if let Some(latency) = &self.latency {
                let l = &latency[i];
                let mut all = l.all().to_json();
                // Request and response bytes stay those on the wire.
                all.remove("req_bytes");
                all.remove("rsp_bytes");
                fields.extend(all);
                let commands: Map<String, Value> = l
                    .commands
                    .iter()
                    .map(|(name, stats)| {
                        (
                            String::from_utf8_lossy(name).into_owned(),
                            Value::Object(stats.to_json()),
                        )
                    })
                    .collect();
                fields.insert("commands".to_string(), Value::Object(commands));
                if let Some(templates) = &l.templates {
                    let templates: Map<String, Value> = templates
                        .commands
                        .iter()
                        .map(|(name, stats)| {
                            let mut figures = stats.to_json();
                            figures.insert("keys".to_string(), json!(stats.keys));
                            figures.insert("multi_key_reqs".to_string(), json!(stats.multi_key));
                            (
                                String::from_utf8_lossy(name).into_owned(),
                                Value::Object(figures),
                            )
                        })
                        .collect();
                    fields.insert("templates".to_string(), Value::Object(templates));
                }
                if !l.slots.is_empty() {
                    let slots: Map<String, Value> = l
                        .shown_slots()
                        .into_iter()
                        .map(|(slot, s)| {
                            let figures = json!({
                                "reqs": s.reqs,
                                "moved": s.moved,
                                "ask": s.ask,
                                "p50_le_us": s.quantile_bound_us(0.5),
                                "p99_le_us": s.quantile_bound_us(0.99),
                            });
                            (slot.to_string(), figures)
                        })
                        .collect();
                    fields.insert("slots_seen".to_string(), json!(l.slots.len()));
                    fields.insert("slots".to_string(), Value::Object(slots));
                }
            }
            Value::Object(fields)
        };
        Value::Array(
            (0..self.ports.len())
                .map(|i| {
                    let mut entry = Map::new();
                    entry.insert(self.ports[i].to_string(), port_object(i));
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
    /// Adds another set of counters.
    pub fn merge(&mut self, other: &DecodeCounters) {
        self.truncated += other.truncated;
        self.malformed += other.malformed;
        self.not_ip += other.not_ip;
        self.not_tcp_or_udp += other.not_tcp_or_udp;
        self.fragments += other.fragments;
        self.unmonitored += other.unmonitored;
    }

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
    /// Matcher counters, in a protocol mode.
    pub matching: Option<&'a MatchCounters>,
    /// The slow threshold, µs, in a protocol mode.
    pub threshold_us: u64,
    /// Lua callbacks that failed, by why (with `-S`).
    pub script_errors: Option<crate::sinks::script::ScriptErrors>,
    /// The process' peak resident memory, KiB (the caller adds it).
    pub peak_rss_kib: Option<u64>,
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
        if d.truncated > 0 {
            line(format!(
                "warning: {} frames were cut short by the capture (its snaplen): their bytes are \
                 lost and the exchanges in them are not timed; capture whole frames (tcpdump -s 0)",
                d.truncated
            ));
        }
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
        if let Some(e) = self.script_errors {
            line(format!(
                "script: {} callback errors ({} over the instruction budget){}",
                e.failed,
                e.over_budget,
                if e.over_memory > 0 {
                    "; stopped at its memory limit"
                } else {
                    ""
                }
            ));
        }
        if let Some(m) = self.matching {
            line(format!(
                "matching: {} desyncs ({} bytes skipped), {} no-reply requests, {} unsolicited, {} unmatched replies",
                m.desyncs, m.resync_skipped_bytes, m.noreply, m.unsolicited, m.unmatched
            ));
        }
        if let Some(kib) = self.peak_rss_kib {
            line(format!("memory: peak RSS {:.1} MiB", kib as f64 / 1024.0));
        }
        for (port, t) in self.ports.ports() {
            line(format!(
                "port {port}: {} request packets ({} bytes), {} response packets ({} bytes)",
                t.req_packets, t.req_bytes, t.rsp_packets, t.rsp_bytes
            ));
        }
        for (port, l) in self.ports.latency() {
            s.push_str(&latency_text(port, &l.all(), self.threshold_us));
        }
        s
    }
}

/// The C tool's per-port summary: totals, average, threshold, slow count, the non-empty
/// buckets, then percentiles and what went unanswered.
fn latency_text(port: u16, l: &LatencyStats, threshold_us: u64) -> String {
    let ms = |us: u64| {
        let mut out = Vec::new();
        push_millis(&mut out, us);
        String::from_utf8(out).unwrap_or_default()
    };
    let avg = l.total_costs.checked_div(l.total_reqs).unwrap_or(0);
    let mut s = format!(
        "port {port}: {} requests, avg {} ms, threshold {} ms, {} slow\n",
        l.total_reqs,
        ms(avg),
        ms(threshold_us),
        l.slow_reqs
    );
    for (label, count) in SEED_LABELS.iter().zip(l.latencies) {
        if count > 0 {
            s.push_str(&format!("  {label}: {count}\n"));
        }
    }
    let f = &l.fine;
    s.push_str(&format!(
        "  p50 {} ms, p90 {} ms, p99 {} ms, p999 {} ms, max {} ms\n  {} errors, {} timeouts, {} dropped by desyncs\n",
        ms(f.quantile(0.5)),
        ms(f.quantile(0.9)),
        ms(f.quantile(0.99)),
        ms(f.quantile(0.999)),
        ms(f.max_us()),
        l.errors,
        l.timeouts,
        l.dropped
    ));
    let pipelined = l.pipelined();
    if pipelined > 0 {
        let queued = l.total_costs.saturating_sub(l.own_costs);
        s.push_str(&format!(
            "  pipelined: {pipelined} requests, depth p50 {}, p99 {}, max {}; own time p50 {} ms, p99 {} ms; {} ms queued in all\n",
            l.depths().quantile(0.5),
            l.depths().quantile(0.99),
            l.depths().max_us(),
            ms(l.own.quantile(0.5)),
            ms(l.own.quantile(0.99)),
            ms(queued),
        ));
    }
    if l.moved + l.ask > 0 {
        s.push_str(&format!(
            "  redirects: {} moved, {} ask (Redis Cluster; not errors)\n",
            l.moved, l.ask
        ));
    }
    if l.hits + l.misses > 0 {
        s.push_str(&format!("  {} hits, {} misses\n", l.hits, l.misses));
    }
    let rcodes: Vec<String> = (0u8..16)
        .filter(|&r| l.rcodes[usize::from(r)] > 0)
        .map(|r| {
            format!(
                "{} {}",
                l.rcodes[usize::from(r)],
                crate::l7::dns::rcode_name(r)
            )
        })
        .collect();
    if !rcodes.is_empty() {
        s.push_str(&format!("  responses: {}\n", rcodes.join(", ")));
    }
    let untimed: Vec<String> = l.untimed().map(|(k, n)| format!("{n} {k}")).collect();
    s.push_str(&format!(
        "  not timed: {}; {} clock skew\n",
        untimed.join(", "),
        l.clock_skew
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_is_slice_equality_at_every_length() {
        for n in 0..40 {
            let a: Vec<u8> = (0..n as u8).collect();
            assert!(same_bytes(&a, &a.clone()), "{n}");
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same_bytes(&a, &b), "{n} {at}");
            }
            assert!(!same_bytes(&a, &a[..n.saturating_sub(1)]) || n == 0);
        }
    }

    #[test]
    fn json_has_one_object_per_port_in_order() {
        let mut stats = PortStats::new(&[6380, 6379], false);
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

#[cfg(test)]
mod latency_tests {
    use super::*;
    use crate::steps::flow::FlowKey;

    #[test]
    fn the_cap_keeps_the_commands_seen_most() {
        let mut port = PortLatency::default();
        let names: Vec<Vec<u8>> = (0..MAX_COMMANDS)
            .map(|i| format!("RARE{i}").into_bytes())
            .collect();
        let leaked: Vec<&'static [u8]> = names.into_iter().map(|n| &*n.leak()).collect();
        for name in &leaked {
            port.command(name).record(&exchange(name, 10, false), false);
        }
        // A burst of one-off names stays under OTHER; a frequent newcomer gets its own.
        for i in 0..100 {
            let junk: &'static [u8] = format!("ONCE{i}").into_bytes().leak();
            port.command(junk).record(&exchange(junk, 10, false), false);
        }
        for _ in 0..50 {
            port.command(b"HOT")
                .record(&exchange(b"HOT", 10, false), false);
        }
        let names: Vec<&[u8]> = port.commands.iter().map(|(n, _)| &**n).collect();
        assert!(names.contains(&&b"HOT"[..]));
        assert!(!names.iter().any(|n| n.starts_with(b"ONCE")));
        assert_eq!(port.commands.len(), MAX_COMMANDS + 1, "256 names and OTHER");
        // Nothing lost: every exchange is counted once, somewhere.
        assert_eq!(port.all().total_reqs, (MAX_COMMANDS + 100 + 50) as u64);
        let hot = &port
            .commands
            .iter()
            .find(|(n, _)| &**n == b"HOT")
            .unwrap()
            .1;
        assert!(hot.total_reqs >= 45, "{}", hot.total_reqs);
        // The newcomer is not evicted by the next one-off name.
        port.command(b"ONCE_MORE")
            .record(&exchange(b"ONCE_MORE", 10, false), false);
        assert!(port.commands.iter().any(|(n, _)| &**n == b"HOT"));
    }

    fn exchange(command: &'static [u8], latency_us: u64, error: bool) -> Exchange<'static> {
        Exchange {
            flow: FlowKey::new(
                "10.0.0.1:40000".parse().unwrap(),
                "10.0.0.2:6379".parse().unwrap(),
            ),
            req_start_us: 0,
            req_done_us: 0,
            rsp_start_us: latency_us,
            latency_us,
            own_us: latency_us,
            depth: 1,
            command,
            summary: command,
            truncated: false,
            req_bytes: 10,
            rsp_bytes: 5,
            error,
            hits: 0,
            misses: 0,
            rcode: None,
            slot: None,
            redirect: None,
            template: None,
            keys: 0,
        }
    }

    #[test]
    fn seed_keys_percentiles_and_commands() {
        let mut stats = PortStats::new(&[6379], true);
        for (cmd, us) in [(&b"GET"[..], 50), (b"GET", 150), (b"SET", 12_000)] {
            stats.record_exchange(&exchange(cmd, us, false), us >= 10_000);
        }
        stats.record_exchange(&exchange(b"SET", 99, true), false);
        stats.record_unanswered(6379, b"GET", Unanswered::Timeout);
        let json = stats.to_json();
        let port = &json[0]["6379"];
        assert_eq!(port["total_reqs"], 4);
        assert_eq!(port["total_costs"], 50 + 150 + 12_000 + 99);
        assert_eq!(port["slow_reqs"], 1);
        assert_eq!(
            port["latencies"],
            json!([2, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(port["max_us"], 12_000);
        assert_eq!(port["errors"], 1);
        assert_eq!(port["timeouts"], 1);
        assert_eq!(port["commands"]["GET"]["total_reqs"], 2);
        assert_eq!(port["commands"]["GET"]["timeouts"], 1);
        assert_eq!(port["commands"]["SET"]["p50_us"], 99);
    }
}

/// The process' peak resident memory so far, KiB.
pub fn peak_rss_kib() -> Option<u64> {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0;
    ok.then_some(usage.ru_maxrss as u64)
}

/// Equal slices, compared inline: command names and key templates are a few bytes, shorter
/// than a call to memcmp, and this runs once per exchange. From 8 bytes on, eight at once
/// (the last eight overlapping the others).
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n < 8 {
        return a.iter().zip(b).all(|(x, y)| x == y);
    }
    let word = |s: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_ne_bytes(w)
    };
    (0..n - 8)
        .step_by(8)
        .chain([n - 8])
        .all(|at| word(a, at) == word(b, at))
}
