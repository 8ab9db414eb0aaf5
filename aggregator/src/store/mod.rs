//! The aggregator's store (DESIGN.md, "Aggregator storage"): agents and their sessions,
//! slow-request events, histogram snapshots, slot and key-template snapshots.
//!
//! One interface, [`Writer`] and [`Reader`], with two implementations: an embedded SQLite
//! file ([`sqlite`], the default) and a ClickHouse server or cluster ([`clickhouse`], for
//! fleets that outgrow one host). The services above see no difference: the same batches
//! give the same answers on both. A batch is stored whole or re-sent, and a batch already
//! stored (same agent session, sequence number not above the last stored) counts once.

pub mod clickhouse;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tcpkit_proto::v1;

use crate::merge::{Merged, SnapshotError};
use crate::slots::SlotSum;

/// An hour, µs.
pub const HOUR_US: u64 = 3_600_000_000;

/// Snapshots are rolled up per hour and per 10 minutes of their start time (coarsest
/// first): a range reads whole hours, then whole 10 minutes at its ends, then snapshots.
pub const ROLLUP_SPANS_US: [u64; 2] = [HOUR_US, HOUR_US / 6];

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// ClickHouse refused (or answered what this build cannot read).
    #[error("clickhouse: {0}")]
    ClickHouse(String),
    /// No ClickHouse host could be reached.
    #[error("clickhouse unreachable: {0}")]
    Unreachable(String),
    /// A stored histogram does not decode (the data was altered).
    #[error("stored histogram: {0}")]
    Histogram(#[from] SnapshotError),
    /// The store was written by a newer tcpkit.
    #[error("database schema version {found} is newer than this aggregator's {known}")]
    NewerSchema {
        /// The store's version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
}

/// A store's result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One agent's session, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKey {
    /// The agent's row (SQLite; 0 in ClickHouse, which keys by name).
    pub agent: i64,
    /// The agent's id.
    pub name: Arc<str>,
    /// The session the agent chose.
    pub session: u64,
}

/// A histogram snapshot checked to add up.
#[derive(Debug, Clone)]
pub struct CheckedSnapshot {
    /// Its start, µs.
    pub ts_us: u64,
    /// Its length, µs.
    pub interval_us: u64,
    /// Server address.
    pub server: String,
    /// Server port.
    pub port: u32,
    /// Protocol.
    pub proto: String,
    /// Command.
    pub command: String,
    /// Its figures.
    pub merged: Merged,
}

/// A batch checked to be storable.
#[derive(Debug, Clone, Default)]
pub struct CheckedBatch {
    /// Its sequence number in the session.
    pub seq: u64,
    /// Slow exchanges.
    pub events: Vec<v1::Event>,
    /// Histogram snapshots.
    pub histograms: Vec<CheckedSnapshot>,
    /// Redis Cluster slot snapshots.
    pub slots: Vec<crate::slots::CheckedSlot>,
    /// Key template snapshots (the template as the command).
    pub templates: Vec<CheckedSnapshot>,
    /// The agent's counters when it sent the batch.
    pub counters: Option<v1::Counters>,
}

/// Merged histograms per group, then per step start (µs).
pub type Series = BTreeMap<String, BTreeMap<u64, Merged>>;

/// What to group merged histograms by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// One group.
    None,
    /// Server address and port.
    Server,
    /// Agent id.
    Agent,
    /// Command.
    Command,
    /// Port.
    Port,
}

/// Between the protocol and the command in the keys of [`Group::Command`]: commands of
/// several protocols that share a name (redis `GET`, memcached `get` is another) stay apart.
pub const PROTO_COMMAND_SEPARATOR: char = '\u{1f}';

/// The protocol and the command of a [`Group::Command`] key.
pub fn split_command_key(key: &str) -> (&str, &str) {
    key.split_once(PROTO_COMMAND_SEPARATOR).unwrap_or(("", key))
}

/// An agent's ports as stored: `6379/redis,11211/memcached`.
fn ports_text(hello: &v1::Hello) -> String {
    hello
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.proto))
        .collect::<Vec<_>>()
        .join(",")
}

/// The ports of [`ports_text`].
fn ports_from_text(text: &str) -> Vec<v1::MonitoredPort> {
    text.split(',')
        .filter_map(|p| {
            let (port, proto) = p.split_once('/')?;
            Some(v1::MonitoredPort {
                port: port.parse().ok()?,
                proto: proto.to_string(),
            })
        })
        .collect()
}

/// The writing side of a store: one, owned by the aggregator's writer thread.
pub trait Writer: Send {
    /// Records an agent's hello; returns its session and the last sequence number stored for
    /// it (0 for a new session).
    fn hello(&mut self, hello: &v1::Hello, now_us: u64) -> Result<(SessionKey, u64)>;

    /// Stores batches; for each, true when stored, false when it was already (a re-sent
    /// batch). When this fails, none of them is acknowledged: the agents send them again.
    fn commit(&mut self, batches: &[(SessionKey, &CheckedBatch)], now_us: u64)
        -> Result<Vec<bool>>;

    /// Deletes what is older than `max_age` (by capture time, before `now_us`), then the
    /// oldest data while the store holds more than `max_bytes`. Returns what it deleted
    /// (rows, or partitions), for the log.
    fn enforce_retention(
        &mut self,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
        now_us: u64,
    ) -> Result<u64>;

    /// Brings the roll-ups up to date where they are not written with the snapshots
    /// (ClickHouse; SQLite rolls up as it stores). Returns the buckets rolled up.
    fn roll_up(&mut self, _now_us: u64) -> Result<u64> {
        Ok(0)
    }
}

/// The reading side: any number, each used by one query at a time.
pub trait Reader: Send {
    /// Slow events matching the request, newest (or slowest) first; ties in the agents'
    /// name order, then the newest stored first.
    fn slow(&self, req: &v1::SlowRequest) -> Result<Vec<v1::StoredEvent>>;

    /// The histograms matching `filter`, merged per group (one group with [`Group::None`]),
    /// in key order.
    fn merged(&self, filter: &v1::Filter, group: Group) -> Result<BTreeMap<String, Merged>>;

    /// The latency histograms matching `filter` (whose range must be closed) per time step
    /// and group: steps start at multiples of `step_us`, the first and last cut to the
    /// range; steps without snapshots are left out. Own times and depths are left out
    /// ([`Merged::latency_only`]): a series is a picture of latency, and they would double
    /// what it reads.
    fn series(&self, filter: &v1::Filter, group: Group, step_us: u64) -> Result<Series>;

    /// The key templates matching `filter`, merged per (protocol, template) over agents,
    /// servers and time, keyed as [`Group::Command`] is.
    fn templates(&self, filter: &v1::Filter) -> Result<BTreeMap<String, Merged>>;

    /// The Redis Cluster slots matching `filter`, summed per slot over agents, servers and
    /// time. Slots are Redis' and not per command: a filter on another protocol matches none.
    fn slots(&self, filter: &v1::Filter) -> Result<BTreeMap<u16, SlotSum>>;

    /// Every agent, with its sessions' counters summed, in name order. `connected` is left
    /// for the server to say, but for a shared store (see [`Spec::shared`]).
    fn agents(&self) -> Result<Vec<v1::AgentInfo>>;
}

/// Where the store is, as `--store` (or `--db`) names it.
#[derive(Debug, Clone)]
pub enum Spec {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A ClickHouse server or cluster.
    ClickHouse(clickhouse::Settings),
}

impl Spec {
    /// Reads `sqlite:PATH`, or `clickhouse://[USER@]HOST:PORT[,HOST:PORT…]/DATABASE`
    /// (`clickhouse+https://` for TLS).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err("sqlite: needs a file, e.g. sqlite:/var/lib/tcpkit/tcpkit.db".into());
            }
            return Ok(Spec::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("clickhouse") {
            return clickhouse::Settings::parse(s).map(Spec::ClickHouse);
        }
        Err(format!(
            "{s:?}: a store is sqlite:PATH or clickhouse://HOST:PORT/DATABASE"
        ))
    }

    /// Opens the writing side, creating or migrating the schema.
    pub fn writer(&self) -> Result<Box<dyn Writer>> {
        Ok(match self {
            Spec::Sqlite(path) => Box::new(sqlite::Store::open(path)?),
            Spec::ClickHouse(s) => Box::new(clickhouse::Store::open(s)?),
        })
    }

    /// Opens a reading side.
    pub fn reader(&self) -> Result<Box<dyn Reader>> {
        Ok(match self {
            Spec::Sqlite(path) => Box::new(sqlite::Reader::open(path)?),
            Spec::ClickHouse(s) => Box::new(clickhouse::Reader::new(s)?),
        })
    }

    /// Whether other aggregators may write to the same store: then no one of them knows
    /// which agents are connected, and an agent counts as connected while it was last
    /// seen within [`clickhouse::CONNECTED_WITHIN`].
    pub fn shared(&self) -> bool {
        matches!(self, Spec::ClickHouse(_))
    }
}

impl std::fmt::Display for Spec {
    /// The store for the log: never a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spec::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Spec::ClickHouse(s) => write!(f, "{s}"),
        }
    }
}
