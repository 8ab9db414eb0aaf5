//! What operators need around tcpkit's binaries, shared by the agent and the aggregator:
//! the Prometheus text exposition and its HTTP endpoint ([`prometheus`]), the accept loop
//! of small servers ([`listener`]), and the TOML config file that flags override
//! ([`config`]).

pub mod config;
pub mod listener;
pub mod prometheus;
