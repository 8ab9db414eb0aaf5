//! The command line: the C tool's flags, same letters, same meaning, with long forms.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{ArgAction, Parser, ValueEnum};

pub use crate::modes::Mode;

/// How the exit summary is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SummaryFormat {
    /// Counters and per-port figures, for people.
    Text,
    /// The stats JSON document on one line, for scripts.
    Json,
    /// No summary.
    None,
}

/// tcpkit: how slow every Redis, Memcached and DNS request really is, from the wire.
///
/// Captures packets (live with libpcap, or from a pcap/pcapng file), reassembles TCP, pairs
/// every request with its response, prints the slow ones (-t) and reports latency per port
/// and command. Stats are served as JSON on TCP port 33333 while capturing live.
#[derive(Debug, Parser)]
#[command(
    name = "tcpkit",
    version,
    disable_version_flag = true,
    after_help = "EXAMPLES:\n  tcpkit -i eth0 -p 6379 -m redis -t 10        Redis requests of 10 ms or more, live\n  tcpkit -r capture.pcap -p 6379 -m redis --summary json\n  tcpkit -i lo -p 6379 -m raw                  every packet with payload\n  tcpkit -i eth0 -p 6379 -w copy.pcap 'not host 10.0.0.9'"
)]
pub struct Args {
    /// Server IPs to monitor, comma separated (needed client-side, or when client and server
    /// use the same port)
    #[arg(
        short = 's',
        long = "servers",
        value_delimiter = ',',
        value_name = "IP,..."
    )]
    pub servers: Vec<IpAddr>,

    /// Server ports to monitor, comma separated (1-65535); PORT:MODE gives a port its own
    /// protocol and PORT:MODE/udp its transport, e.g. 6379:redis,11211:memcached,53:dns/udp
    /// (ports without them use -m and -u)
    #[arg(
        short = 'p',
        long = "ports",
        value_delimiter = ',',
        required = true,
        value_name = "PORT[:MODE[/udp]],...",
        value_parser = parse_port_spec
    )]
    pub ports: Vec<PortSpec>,

    /// TCP port of the stats JSON server [default: 33333 when capturing live, off with -r;
    /// 0 turns it off]
    #[arg(short = 'P', long = "stats-port", value_name = "PORT")]
    pub stats_port: Option<u16>,

    /// Address the stats server listens on
    #[arg(long = "stats-bind", default_value = "127.0.0.1", value_name = "IP")]
    pub stats_bind: IpAddr,

    /// Interface to capture on
    #[arg(
        short = 'i',
        long = "interface",
        default_value = "any",
        value_name = "NAME"
    )]
    pub interface: String,

    /// Run in the background (use -o, stdout is closed)
    #[arg(short = 'd', long = "daemonize")]
    pub daemonize: bool,

    /// Write the agent's process id to this file (after -d, the daemon's)
    #[arg(long = "pid-file", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Read packets from a pcap/pcapng file instead of capturing live (- for standard input)
    #[arg(short = 'r', long = "read", value_name = "FILE")]
    pub read: Option<PathBuf>,

    /// Slow threshold in milliseconds; with no -t every request is printed
    #[arg(short = 't', long = "threshold", value_name = "MS")]
    pub threshold_ms: Option<f64>,

    /// Protocol mode
    #[arg(short = 'm', long = "mode", value_enum, default_value = "raw")]
    pub mode: Mode,

    /// Stop after this many packets (those the filter passes)
    #[arg(short = 'c', long = "count", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Stop after this many seconds (of wall time, live or reading a file)
    #[arg(long = "duration", value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub duration_secs: Option<u64>,

    /// Also write the captured packets to this pcap file
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub write: Option<PathBuf>,

    /// Lua script to run on packets
    #[arg(short = 'S', long = "script", value_name = "FILE")]
    pub script: Option<PathBuf>,

    /// Memory the script may hold, in MiB; past it the script is stopped (capture goes on)
    #[arg(long = "script-memory", default_value_t = 256, value_name = "MIB",
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub script_memory_mib: u32,

    /// Give the script the full Lua library: process control (os.execute, io.popen, os.exit),
    /// file-system changes (io.open for writing, os.remove, os.rename), C modules and binary
    /// chunks. Without it these are refused, as a script runs in a process that captured as root
    #[arg(long = "script-unsafe")]
    pub script_unsafe: bool,

    /// OS capture buffer size in KiB
    #[arg(
        short = 'B',
        long = "buffer",
        default_value_t = 16_384,
        value_name = "KIB"
    )]
    pub buffer_kib: u32,

    /// Write the log (packet lines, slow log, summary) to this file instead of stdout
    #[arg(short = 'o', long = "log", value_name = "FILE")]
    pub log: Option<PathBuf>,

    /// UDP instead of TCP
    #[arg(short = 'u', long = "udp")]
    pub udp: bool,

    /// Exit summary format
    #[arg(long = "summary", value_enum, default_value = "text")]
    pub summary: SummaryFormat,

    /// Pipelines, each on its own thread with its share of the connections. Reading a file
    /// (-r) in a protocol mode [default: the number of cores, at most 4; 1 with -S,
    /// --aggregator, -P or --metrics-listen]. Capturing live [default: 1]: N captures of the
    /// interface in one PACKET_FANOUT group (the kernel keeps each connection on one), merged
    /// in the stats, metrics, summary and what is shipped; 1 in raw mode, with -S or -c
    #[arg(long = "threads", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: Option<u32>,

    /// TCP connections tracked at most; past it the least recently seen are evicted
    #[arg(long = "max-flows", default_value_t = 65_536, value_name = "N")]
    pub max_flows: usize,

    /// Seconds without a packet after which a connection is forgotten
    #[arg(long = "flow-idle-timeout", default_value_t = 120, value_name = "SECS")]
    pub flow_idle_timeout_secs: u64,

    /// Out-of-order bytes held per stream direction while waiting for a missing segment
    #[arg(
        long = "max-held-bytes",
        default_value_t = 262_144,
        value_name = "BYTES"
    )]
    pub max_held_bytes: usize,

    /// Milliseconds a DNS query waits for its response before it counts as a timeout
    #[arg(long = "dns-timeout", default_value_t = 5000, value_name = "MS")]
    pub dns_timeout_ms: u32,

    /// Requests waiting for a reply per connection; past it the oldest counts as a timeout
    #[arg(long = "max-pending", default_value_t = 4096, value_name = "N")]
    pub max_pending: usize,

    /// Redis Cluster: the hash slot of every keyed request (CRC16 of its first key), and
    /// figures per slot in the stats JSON and what is shipped (for a cluster's nodes: off by
    /// default, as a single Redis has no slots). Redirects (-MOVED, -ASK) are counted without
    /// it
    #[arg(long = "slots")]
    pub slots: bool,

    /// Hot keys by template off (on by default: each request's first key folded,
    /// user:1234:cart -> user:{id}:cart, runs of digits, hex ids and UUIDs become {id}, with
    /// figures per template in the stats JSON and what is shipped; Redis, memcached, DNS)
    #[arg(long = "no-templates", conflicts_with_all = ["key_templates", "dns_zones"])]
    pub no_templates: bool,

    /// Key templates by your own rules, globs tried before the folding of ids, e.g.
    /// --key-templates 'session:*,cache:*'
    #[arg(long = "key-templates", value_delimiter = ',', value_name = "GLOB,...")]
    pub key_templates: Vec<String>,

    /// DNS zones: query names below one fold into the template *.ZONE, e.g.
    /// --dns-zones svc.cluster.local,example.com
    #[arg(long = "dns-zones", value_delimiter = ',', value_name = "ZONE,...")]
    pub dns_zones: Vec<String>,

    /// Key templates tracked per port; the rest count under {other}
    #[arg(long = "max-key-templates", default_value_t = 256, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_key_templates: u32,

    /// Serve Prometheus metrics (latency histograms, counters) on this address, e.g.
    /// 127.0.0.1:33334
    #[arg(long = "metrics-listen", value_name = "ADDR", value_parser = parse_listen_address)]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Switch to this user once the capture, listeners and files are open (needs root)
    #[arg(long = "user", value_name = "NAME")]
    pub user: Option<String>,

    /// Ship slow requests and latency histograms to this tcpkit-aggregator
    /// (http://host:50051); with none the agent works alone
    #[arg(long = "aggregator", value_name = "URL", help_heading = "Fleet")]
    pub aggregator: Option<String>,

    /// This agent's name at the aggregator [default: the host name]
    #[arg(long = "agent-id", value_name = "ID", help_heading = "Fleet", value_parser = parse_agent_id)]
    pub agent_id: Option<String>,

    /// Seconds of capture time per shipped histogram snapshot
    #[arg(long = "ship-interval", default_value_t = 10, value_name = "SECS", help_heading = "Fleet",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ship_interval_secs: u64,

    /// Bytes of unacknowledged batches kept for re-sending; past it slow-request events are
    /// dropped (counted) before histograms
    #[arg(long = "ship-buffer", default_value_t = 64 << 20, value_name = "BYTES", help_heading = "Fleet")]
    pub ship_buffer_bytes: usize,

    /// Also keep unacknowledged batches in this directory, so that they survive a restart
    /// (the next run sends them); must be writable after --user
    #[arg(long = "spool-dir", value_name = "DIR", help_heading = "Fleet")]
    pub spool_dir: Option<PathBuf>,

    /// Bytes the spool directory may hold; batches past it stay in memory only
    #[arg(long = "spool-size", default_value_t = 256 << 20, value_name = "BYTES", help_heading = "Fleet")]
    pub spool_bytes: u64,

    /// Seconds to wait at exit for the aggregator to acknowledge what was shipped
    #[arg(
        long = "ship-timeout",
        default_value_t = 5.0,
        value_name = "SECS",
        help_heading = "Fleet"
    )]
    pub ship_timeout_secs: f64,

    /// How to reach the aggregator securely
    #[command(flatten, next_help_heading = "Fleet")]
    pub client: tcpkit_proto::client::ClientFlags,

    /// Read settings from this TOML file (keys are the long flag names; flags override them)
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print version
    #[arg(short = 'v', long = "version", action = ArgAction::Version)]
    pub version: (),

    /// Extra BPF filter, as tcpdump takes it; ANDed with the filter built from -s/-p
    #[arg(value_name = "EXPRESSION", trailing_var_arg = true)]
    pub filter: Vec<String>,
}

/// A monitored port, with the protocol it speaks when given as PORT:MODE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The server port.
    pub port: u16,
    /// Its protocol, when given.
    pub mode: Option<Mode>,
    /// UDP, when given as `/udp`.
    pub udp: bool,
}

fn parse_port_spec(text: &str) -> Result<PortSpec, String> {
    let (text, udp) = match text.rsplit_once('/') {
        Some((rest, "udp")) => (rest, true),
        Some((rest, "tcp")) => (rest, false),
        Some((_, other)) => return Err(format!("unknown transport '{other}' (tcp or udp)")),
        None => (text, false),
    };
    let (port, mode) = match text.split_once(':') {
        Some((port, mode)) => {
            let mode = Mode::from_str(mode, true).map_err(|_| {
                format!("unknown mode '{mode}' (possible: raw, redis, memcached, dns)")
            })?;
            (port, Some(mode))
        }
        None => (text, None),
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(PortSpec { port: p, mode, udp }),
        _ => Err(format!("{port} is not a port in 1..=65535")),
    }
}

impl Args {
    /// The monitored port numbers, in the order given.
    /// A port that `-p` names more than once (each port is reported once, with one mode).
    pub fn repeated_port(&self) -> Option<u16> {
        let ports = self.port_numbers();
        ports
            .iter()
            .enumerate()
            .find(|(i, p)| ports[..*i].contains(p))
            .map(|(_, &p)| p)
    }

    pub fn port_numbers(&self) -> Vec<u16> {
        self.ports.iter().map(|p| p.port).collect()
    }

    /// Each port with its transport: true for UDP (`/udp`, or `-u` for all).
    pub fn port_transports(&self) -> Vec<(u16, bool)> {
        self.ports
            .iter()
            .map(|p| (p.port, p.udp || self.udp))
            .collect()
    }

    /// The limits of the `-S` script.
    pub fn script_limits(&self) -> crate::sinks::script::ScriptLimits {
        crate::sinks::script::ScriptLimits {
            memory_bytes: (self.script_memory_mib as usize) << 20,
            unsafe_library: self.script_unsafe,
        }
    }

    /// Each port with its protocol (`-m` where none was given).
    pub fn port_modes(&self) -> Vec<(u16, Mode)> {
        self.ports
            .iter()
            .map(|p| (p.port, p.mode.unwrap_or(self.mode)))
            .collect()
    }

    /// The stats port to serve on, if any.
    pub fn effective_stats_port(&self) -> Option<u16> {
        match (self.stats_port, &self.read) {
            (Some(0), _) => None,
            (Some(p), _) => Some(p),
            (None, None) => Some(33333),
            (None, Some(_)) => None,
        }
    }
}

/// Parses the command line, after the settings of `--config FILE` (flags override them).
/// Help and version are printed and exit 0; any other problem is one line on stderr and exit
/// code 2.
/// An address to listen on: `IP:PORT` (a name would need a lookup and could mean several).
fn parse_listen_address(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("'{s}' is not IP:PORT; give an address like 127.0.0.1:33334 or [::1]:33334")
    })
}

/// An agent id the aggregator takes: 1 to 256 bytes, no control characters.
fn parse_agent_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 256 {
        return Err(format!("an agent id has 1 to 256 bytes, not {}", s.len()));
    }
    if s.chars().any(char::is_control) {
        return Err("an agent id holds no control characters".into());
    }
    Ok(s.to_string())
}

pub fn parse() -> Args {
    use clap::CommandFactory;
    let argv =
        match tcpkit_ops::config::with_config_file(&Args::command(), std::env::args_os().collect())
        {
            Ok(argv) => argv,
            Err(e) => {
                eprintln!("tcpkit: {e:#}");
                std::process::exit(2);
            }
        };
    match Args::try_parse_from(argv) {
        Ok(args) => {
            if let Some(port) = args.repeated_port() {
                eprintln!("tcpkit: port {port} is given twice in -p (see tcpkit --help)");
                std::process::exit(2);
            }
            args
        }
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            let rendered = e.render().to_string();
            let message = rendered.split("Usage:").next().unwrap_or_default();
            let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
            let message = message.replace(" For more information, try '--help'.", "");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("tcpkit: {message} (see tcpkit --help)");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("tcpkit").chain(args.iter().copied()))
    }

    #[test]
    fn seed_flags() {
        let a = parse(&[
            "-s",
            "10.0.0.1,10.0.0.2",
            "-p",
            "6379,6380",
            "-P",
            "4000",
            "-i",
            "lo",
            "-t",
            "10",
            "-m",
            "raw",
            "-w",
            "x.pcap",
            "-B",
            "1024",
            "-o",
            "log",
            "-u",
            "port",
            "80",
        ])
        .unwrap();
        assert_eq!(a.servers.len(), 2);
        assert_eq!(a.port_numbers(), vec![6379, 6380]);
        assert_eq!(a.effective_stats_port(), Some(4000));
        assert_eq!(a.threshold_ms, Some(10.0));
        assert!(a.udp);
        assert_eq!(a.filter.join(" "), "port 80");
    }

    #[test]
    fn ports_with_their_own_mode() {
        let a = parse(&["-p", "6379:redis,11211:memcached,7000", "-m", "raw"]).unwrap();
        assert_eq!(
            a.port_modes(),
            vec![
                (6379, Mode::Redis),
                (11211, Mode::Memcached),
                (7000, Mode::Raw)
            ]
        );
        assert!(parse(&["-p", "6379:http"]).is_err());
        let a = parse(&["-p", "6379:redis,53:dns/udp"]).unwrap();
        assert_eq!(a.port_transports(), vec![(6379, false), (53, true)]);
        assert!(parse(&["-p", "53:dns/sctp"]).is_err());
        assert!(parse(&["-p", "0:redis"]).is_err());
    }

    #[test]
    fn stats_port_defaults() {
        assert_eq!(
            parse(&["-p", "1"]).unwrap().effective_stats_port(),
            Some(33333)
        );
        assert_eq!(
            parse(&["-p", "1", "-r", "f"])
                .unwrap()
                .effective_stats_port(),
            None
        );
        assert_eq!(
            parse(&["-p", "1", "-P", "0"])
                .unwrap()
                .effective_stats_port(),
            None
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["-p", "0"]).is_err());
        assert!(parse(&["-p", "65536"]).is_err());
        assert!(parse(&["-p", "1", "-m", "http"]).is_err());
        assert!(parse(&["-p", "1", "-s", "not-an-ip"]).is_err());
        let twice = parse(&["-p", "6379,11211", "-p", "6379:memcached"]).unwrap();
        assert_eq!(twice.repeated_port(), Some(6379));
        assert_eq!(parse(&["-p", "1,2"]).unwrap().repeated_port(), None);
        // Rules for templates with templates off say nothing: refused.
        assert!(parse(&["-p", "1", "--no-templates", "--key-templates", "a:*"]).is_err());
        assert!(parse(&["-p", "1", "--no-templates", "--dns-zones", "a.test"]).is_err());
        assert!(parse(&["-p", "1", "--no-templates"]).unwrap().no_templates);
    }
}
