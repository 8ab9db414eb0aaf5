//! Where completed exchanges and packets go: the per-port [`stats`], the [`slowlog`], the
//! [`raw`] packet lines, the Lua [`script`], and [`ship`] (what is shipped to an aggregator).

pub mod raw;
pub mod script;
pub mod ship;
pub mod slowlog;
pub mod stats;
