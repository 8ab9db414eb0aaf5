//! tcpkit, the agent: request latency of Redis, Memcached and DNS servers, measured from the
//! wire.
//!
//! The packet path, one module a step: [`capture`] (libpcap) → [`decode`] (link, IP,
//! transport) → [`flow`] (connections, direction, [`reassembly`]) → the protocol parsers and
//! the sinks ([`raw`] output, [`stats`]). [`pipeline`] wires the steps on one thread;
//! [`stats_server`] serves the stats JSON.

pub mod decode;
pub mod flow;
pub mod reassembly;
