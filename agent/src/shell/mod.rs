//! The shell around the pure pipeline: [`run`] (files, signals, the capture loop; the `-o`
//! [`logfile`] reopened on SIGHUP), [`shard`]
//! (capture files over several cores), the [`stats_server`] and the Prometheus [`metrics`],
//! the [`shipper`] (the gRPC stream to an aggregator) and its disk [`spool`], and
//! [`privileges`] (dropping root).

pub mod logfile;
pub mod metrics;
pub mod privileges;
pub mod run;
pub mod shard;
pub mod shipper;
pub mod spool;
pub mod stats_server;
