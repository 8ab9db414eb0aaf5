//! tcpkit's aggregator: stores what agents ship in SQLite or ClickHouse ([`store`]), merges histograms
//! across servers and time ([`merge`]), serves the Ingest and Query services ([`server`]),
//! checking what agents send first ([`check`]), and the `tcpkit-query` side ([`report`]
//! renders its answers).

pub mod auth;
pub mod check;
pub mod heatmap;
pub mod merge;
pub mod metrics;
pub mod report;
pub mod server;
pub mod slots;
pub mod steps;
pub mod store;
pub mod units;
pub mod web;
