//! The protocols the agent speaks, and which port speaks which.

use clap::ValueEnum;

/// What the agent parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One line per packet with payload (or a Lua script's `process(packet)` with -S).
    Raw,
    /// Redis (RESP2/RESP3) request latency.
    Redis,
    /// Memcached (text, meta, binary) request latency.
    Memcached,
    /// DNS query latency (UDP with -u, TCP otherwise).
    Dns,
}

impl Mode {
    /// The protocol's name, as the aggregator and scripts know it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Raw => "raw",
            Mode::Redis => "redis",
            Mode::Memcached => "memcached",
            Mode::Dns => "dns",
        }
    }
}

/// The protocol of each monitored port.
#[derive(Debug, Clone, Default)]
pub struct PortModes(Vec<(u16, Mode)>);

impl PortModes {
    /// The ports and their protocols.
    pub fn new(modes: Vec<(u16, Mode)>) -> Self {
        Self(modes)
    }

    /// The protocol of a monitored port (raw for any other).
    pub fn of(&self, port: u16) -> Mode {
        self.0
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(Mode::Raw, |(_, m)| *m)
    }

    /// True when every port speaks raw.
    pub fn all_raw(&self) -> bool {
        self.0.iter().all(|(_, m)| *m == Mode::Raw)
    }
}
