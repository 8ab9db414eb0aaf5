//! The agent's shell around the pipeline: opens the capture, the log and the stats port,
//! runs the capture loop until the end of the file or a signal, prints the summary.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cli::{Args, Mode, SummaryFormat};
use crate::l7::templates::KeyRules;
use crate::matcher::dns::DnsTcpPairing;
use crate::matcher::duplex::Duplex;
use crate::matcher::multi::MultiPairing;
use crate::matcher::{Connection, MatchLimits, MemcachedPairing, RedisPairing};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::shell::logfile::LogFile;
use crate::shell::privileges;
use crate::shell::shard;
use crate::shell::shipper::{ShipSink, Shipper, ShipperConfig};
use crate::shell::stats_server::{self, StatsSnapshot};
use crate::sinks::script::Script;
use crate::steps::capture::{self, Capture, CaptureConfig, Next, Source};
use crate::steps::decode::LinkType;
use crate::steps::flow::{DirectionRule, FlowLimits};
use crate::steps::prefilter::PortPrefilter;
use crate::steps::reassembly::ReassemblyLimits;
use tcpkit_ops::prometheus;
use tcpkit_proto::client::Connector;

/// How often the stats document is republished, the log flushed and progress shown.
const TICK: Duration = Duration::from_secs(1);
/// How long a live capture keeps reading after a stop signal: longer than the ring's block
/// timeout (100 ms), so that the packets before the signal are all taken.
const STOP_DRAIN: Duration = Duration::from_millis(250);
/// Output is written out once this much is buffered.
const OUTPUT_CHUNK: usize = 1 << 16;

/// Runs the agent as the arguments say.
pub fn run(args: Args) -> Result<()> {
    let modes = args.port_modes();
    // The script loads (and its init() runs) before capture starts: a bad one stops here.
    let all_raw = modes.iter().all(|(_, m)| *m == Mode::Raw);
    if all_raw && args.threshold_ms.is_some() && args.script.is_none() {
        eprintln!(
            "tcpkit: -t has no effect in raw mode, which prints every packet (it is the slow-log \
             threshold of -m redis, memcached or dns, and of a script's tcpkit.record)"
        );
    }
    let script = match &args.script {
        Some(path) => Some(Script::load(path, all_raw, args.script_limits())?),
        None => None,
    };
    // Read before privileges are dropped (the token file may be root's alone), and before
    // capture starts, so that a bad address, token or certificate stops here.
    let connector = match &args.aggregator {
        Some(url) => Some(Connector::new(url, &args.client, Duration::from_secs(3))?),
        None => None,
    };
    // Looked up before anything starts, so that a wrong name stops here.
    let account = match &args.user {
        Some(name) => Some((name, privileges::lookup(name)?)),
        None => None,
    };
    let source = match &args.read {
        Some(path) => Source::File(path.clone()),
        None => Source::Live {
            interface: args.interface.clone(),
            buffer_kib: args.buffer_kib,
        },
    };
    let filter = capture::build_filter(
        &args.port_transports(),
        &args.servers,
        &args.filter.join(" "),
    );
    let prefilter = PortPrefilter::for_filter(
        &args.port_transports(),
        &args.servers,
        &args.filter.join(" "),
    );
    let mut capture = Capture::open(&CaptureConfig {
        source,
        filter,
        prefilter,
        write_to: args.write.clone(),
        max_frames: args.count,
        max_duration: args.duration_secs.map(Duration::from_secs),
    })?;

    let stats_listener = match args.effective_stats_port() {
        Some(port) => Some(
            std::net::TcpListener::bind((args.stats_bind, port)).with_context(|| {
                format!("cannot serve stats on {}:{port} (-P)", args.stats_bind)
            })?,
        ),
        None => None,
    };
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr} (--metrics-listen)"))?,
        ),
        None => None,
    };
    // SIGHUP reopens the -o log (logrotate), and never stops the agent.
    let reopen_log = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reopen_log))
        .context("cannot handle signals")?;
    let mut log = open_log(&args, reopen_log)?;
    // Before the pid file exists, so that a signal sent as soon as it does stops cleanly.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("cannot handle signals")?;
    }
    if args.daemonize {
        // SAFETY: no thread has been started yet; daemon(3) forks and detaches.
        if unsafe { libc::daemon(1, 0) } != 0 {
            bail!("cannot daemonize: {}", io::Error::last_os_error());
        }
    }
    if let Some(path) = &args.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write pid file {}", path.display()))?;
    }
    // Everything that needs root is open: the capture, the listeners, the files.
    if let Some((name, account)) = account {
        if let Some(dir) = &args.spool_dir {
            privileges::give_directory(dir, account)?;
        }
        privileges::become_user(name, account)?;
    }

    let documents = Documents {
        stats: StatsSnapshot::default(),
        metrics: metrics_listener.is_some().then(StatsSnapshot::default),
    };
    let servers = spawn_servers(
        stats_listener.map(|l| (l, documents.stats.clone())),
        metrics_listener.zip(documents.metrics.clone()),
    );
    let shipper = match connector {
        Some(connector) => Some(Shipper::start(ShipperConfig {
            connector,
            hello: hello(&args),
            buffer_bytes: args.ship_buffer_bytes,
            spool: args.spool_dir.clone().map(|dir| (dir, args.spool_bytes)),
        })?),
        None => None,
    };

    let config = pipeline_config(&args, capture.link());
    // One monomorphic loop per protocol; ports of different protocols share the loop of
    // MultiPairing.
    let single = modes
        .iter()
        .all(|(_, m)| *m == modes[0].1)
        .then(|| modes[0].1);
    // A file in a protocol mode, with nothing that needs one pipeline, goes over the cores.
    let shards = if args.read.is_some()
        && !all_raw
        && script.is_none()
        && shipper.is_none()
        && args.effective_stats_port().is_none()
        && args.metrics_listen.is_none()
    {
        args.threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            |n| n as usize,
        )
    } else {
        1
    };
    macro_rules! run_with {
        ($connection:ty) => {{
            if shards > 1 {
                drive_sharded::<$connection>(
                    &config,
                    shards,
                    &args,
                    &mut capture,
                    &mut log,
                    &stop,
                    &documents,
                )
            } else {
                let pipeline = Pipeline::<$connection>::new(config.clone());
                let pipeline = match script {
                    Some(script) => pipeline.with_script(script),
                    None => pipeline,
                };
                let pipeline = match &shipper {
                    Some(s) => pipeline.with_shipping(ShipSink::new(
                        s.tap(),
                        args.ship_interval_secs.saturating_mul(1_000_000),
                    )),
                    None => pipeline,
                };
                drive(pipeline, &args, &mut capture, &mut log, &stop, &documents)
            }
        }};
    }
    let result = match single {
        Some(Mode::Redis) => run_with!(Duplex<RedisPairing>),
        Some(Mode::Memcached) => run_with!(Duplex<MemcachedPairing>),
        // DNS over UDP rides on datagrams, which every pipeline hands to its DNS matcher.
        Some(Mode::Dns) if args.udp => run_with!(()),
        Some(Mode::Dns) => run_with!(Duplex<DnsTcpPairing>),
        Some(Mode::Raw) => run_with!(()),
        None => run_with!(Duplex<MultiPairing>),
    };
    let mut unshipped = None;
    if let Some(shipper) = shipper {
        let report = shipper.finish(Duration::from_secs_f64(args.ship_timeout_secs.max(0.0)));
        eprintln!("tcpkit: {report}");
        if report.unacked.0 > 0 || report.dropped.events > 0 || report.dropped.histograms > 0 {
            unshipped = Some(Unshipped(report));
        }
    }
    if let Some((thread, shutdown)) = servers {
        let _ = shutdown.send(true);
        let _ = thread.join();
    }
    match (result, unshipped) {
        (Ok(()), Some(unshipped)) => Err(unshipped.into()),
        (result, _) => result,
    }
}

/// The exit status of an agent that ran to its end but did not get everything it should
/// have shipped acknowledged (aggregator down, a wrong token, data dropped to stay within
/// `--ship-buffer`), so that a backfill script can tell.
pub const EXIT_UNSHIPPED: u8 = 3;

/// What [`EXIT_UNSHIPPED`] stands for.
#[derive(Debug, thiserror::Error)]
#[error("not everything was acknowledged by the aggregator ({0}); exit status 3")]
pub struct Unshipped(pub crate::shell::shipper::ShipReport);

/// Who this agent is, for the aggregator.
fn hello(args: &Args) -> tcpkit_proto::v1::Hello {
    let hostname = host_name();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    tcpkit_proto::v1::Hello {
        agent_id: args.agent_id.clone().unwrap_or_else(|| hostname.clone()),
        hostname,
        version: env!("CARGO_PKG_VERSION").to_string(),
        // Distinct per start: the clock in ns, and the process id in the high bits.
        session: (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 40),
        ports: args
            .port_modes()
            .into_iter()
            .map(|(port, mode)| tcpkit_proto::v1::MonitoredPort {
                port: u32::from(port),
                proto: mode.name().to_string(),
            })
            .collect(),
    }
}

/// The host's name (`localhost` when it has none).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The log: `-o FILE` (appended, reopened when `reopen` is set), or standard output.
fn open_log(args: &Args, reopen: Arc<AtomicBool>) -> Result<Box<dyn Write>> {
    Ok(match &args.log {
        Some(path) => Box::new(
            LogFile::open(path.clone(), reopen)
                .with_context(|| format!("cannot open log file {}", path.display()))?,
        ),
        None => Box::new(io::BufWriter::with_capacity(1 << 16, io::stdout())),
    })
}

/// The pipeline's settings from the command line.
fn pipeline_config(args: &Args, link: LinkType) -> PipelineConfig {
    let local = capture::local_addresses();
    PipelineConfig {
        link,
        rule: DirectionRule::new(&args.port_numbers(), &args.servers, &local),
        ports: args.port_modes(),
        flow_limits: FlowLimits {
            max_flows: args.max_flows.max(1),
            idle_timeout_us: args.flow_idle_timeout_secs.saturating_mul(1_000_000),
            reassembly: ReassemblyLimits {
                max_held_bytes: args.max_held_bytes,
                ..ReassemblyLimits::default()
            },
        },
        match_limits: MatchLimits {
            max_pending_per_connection: args.max_pending.max(1),
            dns_timeout_us: u64::from(args.dns_timeout_ms.max(1)) * 1000,
            hash_slots: args.slots,
            key_rules: key_rules(args),
            ..MatchLimits::default()
        },
        threshold_ms: args.threshold_ms,
    }
}

/// The key template rules of the command line, when templates are on: made once, and kept
/// for the life of the process (every pipeline reads them).
fn key_rules(args: &Args) -> Option<&'static KeyRules> {
    static RULES: std::sync::OnceLock<Option<KeyRules>> = std::sync::OnceLock::new();
    RULES
        .get_or_init(|| {
            let on = args.templates || !args.key_templates.is_empty() || !args.dns_zones.is_empty();
            on.then(|| {
                let mut rules = KeyRules::new(&args.key_templates).with_zones(&args.dns_zones);
                rules.max_templates = args.max_key_templates as usize;
                rules
            })
        })
        .as_ref()
}

/// Runs the capture loop through `pipeline`, then prints the summary.
fn drive<C: Connection>(
    mut pipeline: Pipeline<C>,
    args: &Args,
    capture: &mut Capture,
    log: &mut Box<dyn Write>,
    stop: &AtomicBool,
    documents: &Documents,
) -> Result<()> {
    documents.publish(&pipeline, capture);

    let show_progress = !capture.is_live() && io::stderr().is_terminal();
    let loop_result = capture_loop(capture, &mut pipeline, log, stop, documents, show_progress);
    if show_progress {
        eprint!("\r\x1b[K");
    }

    pipeline.tick(capture.kernel_stats(), None);
    pipeline.finish();
    end_run(pipeline, args, capture, log, documents, loop_result)
}

/// Runs a capture file through `shards` pipelines (see [`shard`]), then prints the summary.
fn drive_sharded<C: Connection>(
    config: &PipelineConfig,
    shards: usize,
    args: &Args,
    capture: &mut Capture,
    log: &mut Box<dyn Write>,
    stop: &AtomicBool,
    documents: &Documents,
) -> Result<()> {
    let show_progress = io::stderr().is_terminal();
    let run = shard::run::<C>(config, shards, capture, log.as_mut(), stop, show_progress);
    if show_progress {
        eprint!("\r\x1b[K");
    }
    let loop_result = match (run.capture, run.written) {
        (Err(e), _) => Err(e.into()),
        (Ok(()), Err(e)) => closed_output(e),
        (Ok(()), Ok(())) => Ok(()),
    };
    end_run(run.merged, args, capture, log, documents, loop_result)
}

/// The end of a run: the summary, the last of the log, the `-w` file, then how it went.
fn end_run<C: Connection>(
    mut pipeline: Pipeline<C>,
    args: &Args,
    capture: &mut Capture,
    log: &mut Box<dyn Write>,
    documents: &Documents,
    loop_result: Result<()>,
) -> Result<()> {
    let mut summary = pipeline.summary();
    summary.kernel = capture.kernel_stats();
    let summary_text = match args.summary {
        SummaryFormat::Text => summary.to_text(),
        SummaryFormat::Json => format!("{}\n", pipeline.stats_json()),
        SummaryFormat::None => String::new(),
    };
    documents.publish(&pipeline, capture);
    let written = write_out(log, pipeline.output())
        .and_then(|_| log.write_all(summary_text.as_bytes()))
        .and_then(|_| log.flush());
    capture.flush()?;
    loop_result?;
    match written {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).context("cannot write the log"),
        _ => Ok(()),
    }
}

/// Feeds frames to the pipeline until the end of the file, a stop signal, or a closed output.
fn capture_loop<C: Connection>(
    capture: &mut Capture,
    pipeline: &mut Pipeline<C>,
    log: &mut dyn Write,
    stop: &AtomicBool,
    documents: &Documents,
    show_progress: bool,
) -> Result<()> {
    let mut next_tick = Instant::now() + TICK;
    // After a stop signal, a live capture still takes what the kernel holds: packets wait in
    // a ring block until it fills or its timeout retires it.
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_none() && stop.load(Ordering::Relaxed) {
            if !capture.is_live() {
                return Ok(());
            }
            drain_until = Some(Instant::now() + STOP_DRAIN);
        }
        let idle = match capture.next_frame()? {
            Next::Frame(frame) => {
                pipeline.on_frame(&frame);
                // Under endless traffic the ring never runs dry: stop anyway, a bit later.
                if drain_until.is_some_and(|until| Instant::now() >= until + 3 * STOP_DRAIN) {
                    return Ok(());
                }
                false
            }
            Next::Idle => {
                if drain_until.is_some_and(|until| Instant::now() >= until) {
                    return Ok(());
                }
                true
            }
            Next::End => return Ok(()),
        };
        if pipeline.output().len() >= OUTPUT_CHUNK {
            if let Err(e) = write_out(log, pipeline.output()) {
                return closed_output(e);
            }
        }
        if (idle || pipeline.captured() % 4096 == 0) && Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            let wall_us = capture.is_live().then(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64)
            });
            pipeline.tick(capture.kernel_stats(), wall_us);
            documents.publish(pipeline, capture);
            if let Err(e) = write_out(log, pipeline.output()).and_then(|_| log.flush()) {
                return closed_output(e);
            }
            if show_progress {
                let pct = capture.progress().unwrap_or(0.0) * 100.0;
                eprint!("\r{} packets, {pct:.0}% of the file", pipeline.captured());
            }
        }
    }
}

/// A reader that went away (`tcpkit … | head`) ends the run quietly; other errors do not.
fn closed_output(e: io::Error) -> Result<()> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e).context("cannot write the log")
    }
}

fn write_out(log: &mut dyn Write, out: &mut Vec<u8>) -> io::Result<()> {
    let result = log.write_all(out);
    out.clear();
    result
}

/// The documents the agent serves, republished every tick.
struct Documents {
    /// The stats JSON (the stats port).
    stats: StatsSnapshot,
    /// The Prometheus page, with `--metrics-listen`.
    metrics: Option<StatsSnapshot>,
}

impl Documents {
    fn publish<C: Connection>(&self, pipeline: &Pipeline<C>, capture: &mut Capture) {
        self.stats.publish(pipeline.stats_json().to_string());
        if let Some(metrics) = &self.metrics {
            metrics.publish(pipeline.metrics(capture.kernel_stats()));
        }
    }
}

type ServerThread = (
    std::thread::JoinHandle<()>,
    tokio::sync::watch::Sender<bool>,
);

/// Runs the stats server and the metrics endpoint (those asked for) on a thread of their own
/// with a single-threaded tokio runtime.
fn spawn_servers(
    stats: Option<(std::net::TcpListener, StatsSnapshot)>,
    metrics: Option<(std::net::TcpListener, StatsSnapshot)>,
) -> Option<ServerThread> {
    if stats.is_none() && metrics.is_none() {
        return None;
    }
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let thread = std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("stats server: cannot start its runtime: {e}");
                return;
            }
        };
        runtime.block_on(async move {
            let stats = async {
                if let Some((listener, snapshot)) = stats {
                    match tokio_listener(listener) {
                        Ok(l) => stats_server::serve(l, snapshot, stopped()).await,
                        Err(e) => tracing::error!("stats server: {e}"),
                    }
                }
            };
            let metrics = async {
                if let Some((listener, page)) = metrics {
                    match tokio_listener(listener) {
                        Ok(l) => {
                            let render: prometheus::Render =
                                Arc::new(move || page.current().as_str().to_owned());
                            prometheus::serve(l, render, stopped()).await
                        }
                        Err(e) => tracing::error!("metrics endpoint: {e}"),
                    }
                }
            };
            tokio::join!(stats, metrics);
        });
    });
    Some((thread, shutdown))
}

fn tokio_listener(listener: std::net::TcpListener) -> io::Result<tokio::net::TcpListener> {
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}
