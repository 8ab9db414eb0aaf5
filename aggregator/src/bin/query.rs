//! `tcpkit-query`: asks a tcpkit-aggregator about the whole fleet.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use tcpkit_aggregator::report;
use tcpkit_aggregator::server::now_us;
use tcpkit_aggregator::units::{parse_duration, parse_time};
use tcpkit_proto::client::{describe_status, error_chain, with_hint, ClientFlags, Connector};
use tcpkit_proto::v1;

/// Fleet-wide slow-request search, merged latency histograms and percentiles, and the
/// health of every agent, from a tcpkit-aggregator.
#[derive(Debug, Parser)]
#[command(
    name = "tcpkit-query",
    version,
    after_help = "EXAMPLES:\n  tcpkit-query slow --since 1h --min-ms 10 --command GET\n  tcpkit-query slow --grep 'user:*' --slowest --limit 20\n  tcpkit-query hist --since 24h --port 6379 --by server\n  tcpkit-query top --of server --by p99\n  tcpkit-query hist --own --port 6379\n  tcpkit-query heatmap --since 6h --command GET\n  tcpkit-query agents --json"
)]
struct Cli {
    /// The aggregator
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    aggregator: String,
    /// JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    client: ClientFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Slow requests over the fleet, newest first (slow-log lines after the agent)
    Slow {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only requests whose summary matches this glob, anywhere (e.g. 'user:*')
        #[arg(long, value_name = "GLOB")]
        grep: Option<String>,
        /// Only requests at least this slow (0 to a year's worth)
        #[arg(long, value_name = "MS", value_parser = parse_min_ms)]
        min_ms: Option<f64>,
        /// At most this many
        #[arg(long, default_value_t = 100, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        limit: u32,
        /// Slowest first instead of newest first
        #[arg(long)]
        slowest: bool,
        /// One JSON object per line (for jq and log shippers)
        #[arg(long, conflicts_with = "json")]
        json_lines: bool,
    },
    /// The latency histogram merged over every matching server and the time range
    Hist {
        #[command(flatten)]
        filter: FilterArgs,
        /// One row per group, side by side
        #[arg(long, value_enum)]
        by: Option<GroupArg>,
        /// Own times instead of latencies: the time the server spent on each request, less
        /// what it waited behind earlier requests of its connection (pipelining)
        #[arg(long)]
        own: bool,
        /// Bars in proportion to the counts (by default on a log scale, so that a few slow
        /// requests stay visible beside thousands of fast ones)
        #[arg(long)]
        linear: bool,
    },
    /// Commands, servers, agents, ports or Redis Cluster slots ranked by slow count, p99,
    /// own-time p99, total time, requests or redirects
    Top {
        #[command(flatten)]
        filter: FilterArgs,
        /// What to rank (slot: Redis Cluster hash slots, by requests unless --by says)
        #[arg(long, value_enum, default_value = "command")]
        of: TopOfArg,
        /// How to rank
        #[arg(long, value_enum, default_value = "slow")]
        by: RankArg,
        /// At most this many
        #[arg(long, default_value_t = 10, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
    },
    /// The hottest key templates of the fleet (user:{id}:cart): requests, bytes, latency
    Keys {
        #[command(flatten)]
        filter: FilterArgs,
        /// How to rank
        #[arg(long, value_enum, default_value = "requests")]
        by: KeysRankArg,
        /// At most this many
        #[arg(long, default_value_t = 20, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
    },
    /// Latency over time as a heatmap: time across, latency up (log scale), the shade of a
    /// cell its requests; 5 and 9 mark each column's p50 and p99 (the last hour by default)
    Heatmap {
        #[command(flatten)]
        filter: FilterArgs,
        /// One map per group
        #[arg(long, value_enum)]
        by: Option<GroupArg>,
        /// The time a column covers (30s, 10m, 1h); by default about 120 columns
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        step: Option<Duration>,
    },
    /// Every agent: last seen, version, ports and its data-quality counters
    Agents,
}

/// How `keys` ranks templates.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeysRankArg {
    /// Requests
    Requests,
    /// Request and reply bytes
    Bytes,
    /// Latency p99
    P99,
    /// Own-time p99 (latency less the time queued in a pipeline)
    OwnP99,
}

/// What every query can select; with no --since/--from it covers everything stored.
#[derive(Debug, ClapArgs)]
struct FilterArgs {
    /// The last DURATION (90s, 15m, 1h, 7d)
    #[arg(long, value_parser = parse_duration, conflicts_with = "from", value_name = "DURATION")]
    since: Option<Duration>,
    /// From this time (Unix seconds, RFC 3339, or local YYYY-MM-DD[ HH:MM[:SS]])
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    from: Option<u64>,
    /// Up to this time (excluded)
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    to: Option<u64>,
    /// Server address
    #[arg(long, value_name = "IP")]
    server: Option<String>,
    /// Server port
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// Protocol (redis, memcached, dns)
    #[arg(long, value_name = "PROTO")]
    proto: Option<String>,
    /// Agent id
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
    /// Command (GET, SET, …; any case)
    #[arg(long, value_name = "NAME")]
    command: Option<String>,
}

/// `--min-ms`: a finite number of milliseconds from 0 to a year.
fn parse_min_ms(s: &str) -> Result<f64, String> {
    const YEAR_MS: f64 = 365.0 * 86_400_000.0;
    match s.trim().parse::<f64>() {
        Ok(ms) if (0.0..=YEAR_MS).contains(&ms) => Ok(ms),
        Ok(_) => Err(format!("{s} ms is not between 0 and a year ({YEAR_MS} ms)")),
        Err(_) => Err(format!("'{s}' is not a number of milliseconds")),
    }
}

/// Said on stderr when a query matches nothing (the exit status stays 0).
const NO_DATA: &str = "tcpkit-query: no data for these filters";

impl FilterArgs {
    fn to_proto(&self) -> Result<v1::Filter> {
        let from_us = match (self.since, self.from) {
            (Some(d), _) => now_us().saturating_sub(d.as_micros() as u64),
            (None, Some(t)) => t,
            (None, None) => 0,
        };
        let to_us = self.to.unwrap_or(0);
        if to_us != 0 && to_us <= from_us {
            bail!("--to must be after the start of the range");
        }
        Ok(v1::Filter {
            from_us,
            to_us,
            server: self.server.clone().unwrap_or_default(),
            port: self.port.map_or(0, u32::from),
            proto: self.proto.clone().unwrap_or_default(),
            agent: self.agent.clone().unwrap_or_default(),
            command: self.command.clone().unwrap_or_default(),
        })
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GroupArg {
    Server,
    Agent,
    Command,
    Port,
}

impl From<GroupArg> for v1::GroupBy {
    fn from(g: GroupArg) -> Self {
        match g {
            GroupArg::Server => v1::GroupBy::Server,
            GroupArg::Agent => v1::GroupBy::Agent,
            GroupArg::Command => v1::GroupBy::Command,
            GroupArg::Port => v1::GroupBy::Port,
        }
    }
}

/// What `top` ranks: the groups of `hist --by`, or Redis Cluster slots.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum TopOfArg {
    Command,
    Server,
    Agent,
    Port,
    /// Redis Cluster hash slots
    Slot,
}

impl From<TopOfArg> for v1::GroupBy {
    fn from(g: TopOfArg) -> Self {
        match g {
            TopOfArg::Server => v1::GroupBy::Server,
            TopOfArg::Agent => v1::GroupBy::Agent,
            TopOfArg::Command => v1::GroupBy::Command,
            TopOfArg::Port => v1::GroupBy::Port,
            TopOfArg::Slot => v1::GroupBy::Slot,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RankArg {
    Slow,
    P99,
    /// The p99 of the own times (latency less the time queued in a pipeline)
    OwnP99,
    Total,
    /// Exchanges
    Requests,
    /// Redis Cluster redirects (-MOVED and -ASK)
    Redirects,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpkit-query: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let output = runtime.block_on(query(&cli))?;
    print!("{}", output.text);
    if output.empty {
        eprintln!("{NO_DATA}");
    }
    Ok(())
}

/// What a query prints, and whether it matched nothing.
struct Output {
    text: String,
    empty: bool,
}

async fn query(cli: &Cli) -> Result<Output> {
    let connector = Connector::new(&cli.aggregator, &cli.client, Duration::from_secs(5))?;
    let mut client = connector
        .query()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the aggregator at {}: {}",
                cli.aggregator,
                with_hint(error_chain(&e), false)
            )
        })?
        .max_decoding_message_size(256 << 20);
    let json = |v: serde_json::Value| format!("{v:#}\n");
    // Ranked rows (top, keys): JSON objects, or the table `text` lays out.
    let ranked = |rows: &[v1::Histogram], text: fn(&[v1::Histogram]) -> String| Output {
        text: if cli.json {
            json(serde_json::Value::Array(
                rows.iter()
                    .map(|r| report::histogram_json(r, true))
                    .collect(),
            ))
        } else {
            text(rows)
        },
        empty: rows.is_empty(),
    };
    Ok(match &cli.command {
        Command::Slow {
            filter,
            grep,
            min_ms,
            limit,
            slowest,
            json_lines,
        } => {
            let reply = client
                .slow(v1::SlowRequest {
                    filter: Some(filter.to_proto()?),
                    grep: grep.clone().unwrap_or_default(),
                    min_latency_us: min_ms.map_or(0, |ms| (ms.max(0.0) * 1000.0).round() as u64),
                    limit: *limit,
                    slowest_first: *slowest,
                })
                .await
                .map_err(|e| anyhow::anyhow!("slow: {}", describe_status(&e)))?
                .into_inner();
            let text = if cli.json {
                json(report::slow_json(&reply.events))
            } else if *json_lines {
                report::slow_json_lines(&reply.events)
            } else {
                reply
                    .events
                    .iter()
                    .map(|e| report::slow_line(e) + "\n")
                    .collect()
            };
            Output {
                text,
                empty: reply.events.is_empty(),
            }
        }
        Command::Hist {
            filter,
            by,
            own,
            linear,
        } => {
            let reply = client
                .hist(v1::HistRequest {
                    filter: Some(filter.to_proto()?),
                    by: by.map_or(v1::GroupBy::None, v1::GroupBy::from) as i32,
                })
                .await
                .map_err(|e| anyhow::anyhow!("hist: {}", describe_status(&e)))?
                .into_inner();
            let text = if cli.json {
                json(report::hist_json(&reply, by.is_some()))
            } else {
                let scale = if *linear {
                    report::Scale::Linear
                } else {
                    report::Scale::Log
                };
                report::hist_text(&reply, by.is_some(), *own, scale)
            };
            Output {
                text,
                empty: reply.all.is_none_or(|h| h.count == 0 && h.timeouts == 0),
            }
        }
        Command::Top {
            filter,
            of,
            by,
            limit,
        } => {
            let rank = match by {
                RankArg::Slow => v1::TopBy::Slow,
                RankArg::P99 => v1::TopBy::P99,
                RankArg::OwnP99 => v1::TopBy::OwnP99,
                RankArg::Requests => v1::TopBy::Requests,
                RankArg::Redirects => v1::TopBy::Redirects,
                RankArg::Total => v1::TopBy::Total,
            };
            let reply = client
                .top(v1::TopRequest {
                    filter: Some(filter.to_proto()?),
                    of: v1::GroupBy::from(*of) as i32,
                    by: rank as i32,
                    limit: *limit,
                })
                .await
                .map_err(|e| anyhow::anyhow!("top: {}", describe_status(&e)))?
                .into_inner();
            if *of == TopOfArg::Slot {
                ranked(&reply.rows, report::top_slots_text)
            } else {
                ranked(&reply.rows, report::top_text)
            }
        }
        Command::Keys { filter, by, limit } => {
            let rank = match by {
                KeysRankArg::Requests => v1::TopBy::Requests,
                KeysRankArg::Bytes => v1::TopBy::Bytes,
                KeysRankArg::P99 => v1::TopBy::P99,
                KeysRankArg::OwnP99 => v1::TopBy::OwnP99,
            };
            let reply = client
                .top(v1::TopRequest {
                    filter: Some(filter.to_proto()?),
                    of: v1::GroupBy::Template as i32,
                    by: rank as i32,
                    limit: *limit,
                })
                .await
                .map_err(|e| anyhow::anyhow!("keys: {}", describe_status(&e)))?
                .into_inner();
            ranked(&reply.rows, report::keys_text)
        }
        Command::Heatmap { filter, by, step } => {
            let mut filter = filter.to_proto()?;
            if filter.from_us == 0 {
                filter.from_us = now_us().saturating_sub(3_600_000_000);
            }
            let reply = client
                .series(v1::SeriesRequest {
                    filter: Some(filter),
                    by: by.map_or(v1::GroupBy::None, v1::GroupBy::from) as i32,
                    step_us: step.map_or(0, |d| d.as_micros() as u64),
                })
                .await
                .map_err(|e| anyhow::anyhow!("heatmap: {}", describe_status(&e)))?
                .into_inner();
            let text = if cli.json {
                json(report::series_json(&reply))
            } else {
                use std::io::IsTerminal;
                let color =
                    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
                report::heatmap_text(&reply, by.is_some(), color)
            };
            Output {
                text,
                empty: reply.series.is_empty(),
            }
        }
        Command::Agents => {
            let reply = client
                .agents(v1::AgentsRequest {})
                .await
                .map_err(|e| anyhow::anyhow!("agents: {}", describe_status(&e)))?
                .into_inner();
            let text = if cli.json {
                json(report::agents_json(&reply.agents))
            } else {
                report::agents_text(&reply.agents, now_us())
            };
            Output {
                text,
                empty: reply.agents.is_empty(),
            }
        }
    })
}
