//! What operators need around tcpkit's binaries, shared by the agent and the aggregator:
//! the Prometheus text exposition and its HTTP endpoint ([`prometheus`]), the accept loop
//! of small servers ([`listener`]), and the TOML config file that flags override
//! ([`config`]).

pub mod config;
pub mod listener;
pub mod prometheus;

/// True when stderr may carry colour codes: it is a terminal and `NO_COLOR` is unset or
/// empty (<https://no-color.org>), so journald and log files get plain text.
pub fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}
