//! tcpkit, the agent: request latency of Redis, Memcached and DNS servers, measured from the
//! wire.
//!
//! The folders follow the data flow. The [`steps`] of the packet path — capture, decode,
//! flow and reassembly — then the protocol parsers ([`l7`]) and the pairing of requests
//! with replies ([`matcher`]), then the [`sinks`] that completed exchanges go to (stats,
//! slow log, raw lines, Lua, shipping). [`pipeline`] is that path on one thread, pure; the
//! [`shell`] runs it (files, signals, threads, servers, the gRPC shipper). [`cli`] and
//! [`modes`] say what to run; [`text`] and [`timefmt`] format output.

pub mod cli;
pub use tcpkit_histogram as histogram;
pub mod l7;
pub mod matcher;
pub mod modes;
pub mod pipeline;
pub mod shell;
pub mod sinks;
pub mod steps;
pub mod text;
pub mod timefmt;
