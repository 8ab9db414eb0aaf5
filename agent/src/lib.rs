//! tcpkit, the agent: request latency of Redis, Memcached and DNS servers, measured from the
//! wire.
//!
//! The packet path, one module a step: [`capture`] (libpcap) → [`decode`] (link, IP,
//! transport) → [`flow`] (connections, direction, [`reassembly`]) → the sinks ([`raw`]
//! lines, [`stats`]). [`pipeline`] is that path on one thread, pure; [`run`] is the shell
//! around it (files, signals, the [`stats_server`]).

pub mod capture;
pub mod cli;
pub mod decode;
pub use tcpkit_histogram as histogram;
pub mod flow;
pub mod l7;
pub mod matcher;
pub mod metrics;
pub mod modes;
pub mod pcapfile;
pub mod pipeline;
pub mod privileges;
pub mod raw;
pub mod reassembly;
pub mod run;
pub mod script;
pub mod shard;
pub mod ship;
pub mod shipper;
pub mod slowlog;
pub mod spool;
pub mod stats;
pub mod stats_server;
pub mod text;
pub mod timefmt;
