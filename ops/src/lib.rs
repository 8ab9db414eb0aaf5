//! What operators need around tcpkit's binaries, shared by the agent and the aggregator:
//! the Prometheus text exposition and its HTTP endpoint ([`prometheus`]), and the TOML
//! config file that flags override ([`config`]).

pub mod config;
pub mod prometheus;
