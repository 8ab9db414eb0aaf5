//! The agent's shell around the pipeline: opens the capture, the log and the stats port,
//! runs the capture loop until the end of the file or a signal, prints the summary.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cli::{Args, Mode, SummaryFormat};
use crate::l7::templates::KeyRules;
use crate::matcher::dns::DnsTcpPairing;
use crate::matcher::duplex::Duplex;
use crate::matcher::multi::MultiPairing;
use crate::matcher::{Connection, MatchLimits, MemcachedPairing, RedisPairing};
use crate::pipeline::{Pipeline, PipelineConfig, Totals};
use crate::shell::logfile::LogFile;
use crate::shell::privileges;
use crate::shell::shard;
use crate::shell::shipper::{ShipSink, ShipStatusNow, Shipper, ShipperConfig};
use crate::shell::stats_server::{self, StatsSnapshot};
use crate::sinks::script::Script;
use crate::steps::capture::{self, Batch, Capture, CaptureConfig, KernelStats, Source};
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
/// A capture hands the pipeline at most this many frames between the loop's checks (output
/// to write, a stop, the clock).
const FRAMES_PER_BATCH: usize = 256;

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
    let capture_config = CaptureConfig {
        source,
        filter,
        prefilter,
        write_to: args.write.clone(),
        max_frames: args.count,
        max_duration: args.duration_secs.map(Duration::from_secs),
    };
    let live_pipelines = live_pipelines(&args, all_raw, script.is_some());
    let mut captures = if live_pipelines > 1 {
        Capture::open_fanout(&capture_config, live_pipelines)?
    } else {
        vec![Capture::open(&capture_config)?]
    };

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

    let config = pipeline_config(&args, captures[0].link());
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
            if live_pipelines > 1 {
                drive_live::<$connection>(
                    &config,
                    std::mem::take(&mut captures),
                    &args,
                    shipper.as_ref(),
                    &mut log,
                    &stop,
                    &documents,
                )
            } else if shards > 1 {
                drive_sharded::<$connection>(
                    &config,
                    shards,
                    &args,
                    &mut captures[0],
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
                drive(
                    pipeline,
                    &args,
                    &mut captures[0],
                    &mut log,
                    &stop,
                    &documents,
                )
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

/// How many pipelines share a live capture: `--threads`, 1 when not given. One pipeline
/// captures in raw mode (its lines are in capture order), with a script (one Lua state) and
/// with `-c` (the count of one capture).
fn live_pipelines(args: &Args, all_raw: bool, script: bool) -> usize {
    let asked = args.threads.map_or(1, |n| n as usize);
    if args.read.is_some() || asked == 1 {
        return 1;
    }
    let why = if all_raw {
        Some("raw mode prints the packets in capture order")
    } else if script {
        Some("a script (-S) runs in one Lua state")
    } else if args.count.is_some() {
        Some("-c counts the packets of one capture")
    } else {
        None
    };
    match why {
        Some(why) => {
            eprintln!("tcpkit: --threads {asked} ignored: one pipeline captures, as {why}");
            1
        }
        None => asked,
    }
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

/// The key template rules of the command line, unless `--no-templates`: made once, and kept
/// for the life of the process (every pipeline reads them).
fn key_rules(args: &Args) -> Option<&'static KeyRules> {
    static RULES: std::sync::OnceLock<Option<KeyRules>> = std::sync::OnceLock::new();
    RULES
        .get_or_init(|| {
            (!args.no_templates).then(|| {
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
    documents.publish(&pipeline, capture.kernel_stats(), pipeline.ship_status());

    let show_progress = !capture.is_live() && io::stderr().is_terminal();
    let mut publish = |p: &Pipeline<C>, kernel: Option<KernelStats>| {
        documents.publish(p, kernel, p.ship_status())
    };
    let loop_result = capture_loop(
        capture,
        &mut pipeline,
        log,
        stop,
        &mut publish,
        show_progress,
    );
    if show_progress {
        eprint!("\r\x1b[K");
    }

    let kernel = capture.kernel_stats();
    pipeline.tick(kernel, None);
    pipeline.finish();
    let ship = pipeline.ship_status();
    let ended = Ended { kernel, ship };
    end_run(
        pipeline,
        args,
        ended,
        Some(capture),
        log,
        documents,
        loop_result,
    )
}

/// What one pipeline of a shared live capture last told: for the merged documents.
struct Report {
    totals: Totals,
    kernel: Option<KernelStats>,
    ship: Option<ShipStatusNow>,
}

/// The merge of what the pipelines last told: one pipeline's worth of counts, libpcap's
/// counters summed over the captures, and the shipper's state (which they share).
fn merge_reports<'a, C: Connection>(
    config: &PipelineConfig,
    reports: impl IntoIterator<Item = &'a Report>,
) -> (Pipeline<C>, Ended) {
    let mut merged = Pipeline::<C>::new(config.clone());
    let mut ended = Ended {
        kernel: None,
        ship: None,
    };
    for report in reports {
        merged.absorb(&report.totals);
        ended.kernel = match (ended.kernel, report.kernel) {
            (Some(a), Some(b)) => Some(a.plus(&b)),
            (a, b) => a.or(b),
        };
        ended.ship = ended.ship.or(report.ship);
    }
    (merged, ended)
}

/// What a pipeline of a shared live capture tells the thread that writes and publishes.
enum Told {
    /// Output: whole lines.
    Output(Vec<u8>),
    /// Pipeline `.0`'s counts at its tick.
    Report(usize, Box<Report>),
}

/// Sends what it is given, whole, to the thread that writes the log: a pipeline's output is
/// whole lines, so lines from several pipelines never mix.
struct ToWriter(SyncSender<Told>);

impl Write for ToWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            self.0
                .send(Told::Output(buf.to_vec()))
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs `captures` (one fanout group, [`Capture::open_fanout`]) through a pipeline each, on a
/// thread each; this thread writes their output and publishes their merged documents, then
/// prints the merged summary. Each pipeline's flow table holds `--max-flows / N` connections.
fn drive_live<C: Connection>(
    config: &PipelineConfig,
    captures: Vec<Capture>,
    args: &Args,
    shipper: Option<&Shipper>,
    log: &mut Box<dyn Write>,
    stop: &AtomicBool,
    documents: &Documents,
) -> Result<()> {
    let n = captures.len();
    let mut each = config.clone();
    each.flow_limits.max_flows = (config.flow_limits.max_flows / n).max(1);
    let ship_interval_us = args.ship_interval_secs.saturating_mul(1_000_000);
    let (to_writer, told) = sync_channel::<Told>(64);
    std::thread::scope(|scope| {
        let workers: Vec<_> = captures
            .into_iter()
            .enumerate()
            .map(|(i, mut capture)| {
                let (each, to_writer) = (each.clone(), to_writer.clone());
                let tap = shipper.map(|s| s.tap_for(i));
                let work = move || {
                    let _stop_all = StopOnPanic(stop);
                    let mut pipeline = Pipeline::<C>::new(each);
                    if let Some(tap) = tap {
                        pipeline = pipeline.with_shipping(ShipSink::new(tap, ship_interval_us));
                    }
                    let reports = to_writer.clone();
                    let mut report = |p: &Pipeline<C>, kernel: Option<KernelStats>| {
                        let report = Report {
                            totals: p.totals(),
                            kernel,
                            ship: p.ship_status(),
                        };
                        let _ = reports.send(Told::Report(i, Box::new(report)));
                    };
                    let mut out = ToWriter(to_writer);
                    let result = capture_loop(
                        &mut capture,
                        &mut pipeline,
                        &mut out,
                        stop,
                        &mut report,
                        false,
                    );
                    let kernel = capture.kernel_stats();
                    pipeline.tick(kernel, None);
                    pipeline.finish();
                    let _ = write_out(&mut out, pipeline.output());
                    let report = Report {
                        totals: pipeline.totals(),
                        kernel,
                        ship: pipeline.ship_status(),
                    };
                    (report, result, capture)
                };
                std::thread::Builder::new()
                    .name(format!("pipeline-{i}"))
                    .spawn_scoped(scope, work)
                    .expect("start a pipeline thread")
            })
            .collect();
        drop(to_writer);
        let publish = |reports: &[Option<Box<Report>>]| {
            let reports = reports.iter().flatten().map(|r| &**r);
            let (merged, now) = merge_reports::<C>(config, reports);
            documents.publish(&merged, now.kernel, now.ship);
        };
        let written = write_and_publish(&told, n, log.as_mut(), stop, publish);
        let mut ends = Vec::with_capacity(n);
        let mut captures = Vec::with_capacity(n);
        let mut loop_result = Ok(());
        let mut panicked = Vec::new();
        for (i, worker) in workers.into_iter().enumerate() {
            match worker.join() {
                Ok((report, result, capture)) => {
                    ends.push(report);
                    captures.push(capture);
                    if loop_result.is_ok() {
                        loop_result = result;
                    }
                }
                Err(panic) => panicked.push(format!("pipeline {i}: {}", panic_message(&*panic))),
            }
        }
        let loop_result = if panicked.is_empty() {
            match (loop_result, written) {
                (Err(e), _) => Err(e),
                (Ok(()), Err(e)) => closed_output(e),
                (Ok(()), Ok(())) => Ok(()),
            }
        } else {
            Err(anyhow::anyhow!(
                "{} of {n} pipelines failed, the summary counts the others' connections only ({})",
                panicked.len(),
                panicked.join("; ")
            ))
        };
        let (merged, ended) = merge_reports::<C>(config, &ends);
        end_run(
            merged,
            args,
            ended,
            captures.first_mut(),
            log,
            documents,
            loop_result,
        )
    })
}

/// Stops the capture of every pipeline when the thread it lives on unwinds: a pipeline that
/// panics ends the run (its share of the traffic would go uncounted), it does not leave the
/// others running.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic")
}

/// Writes what `n` pipelines output as it comes, and publishes their last reports once each
/// has reported since the last time (at their ticks, so as fresh as one pipeline's), or a
/// tick after that at the latest; until every pipeline has ended. After a write error it
/// stops the capture and writes nothing more.
fn write_and_publish(
    told: &Receiver<Told>,
    n: usize,
    log: &mut dyn Write,
    stop: &AtomicBool,
    publish: impl Fn(&[Option<Box<Report>>]),
) -> io::Result<()> {
    let mut result = Ok(());
    let mut reports: Vec<Option<Box<Report>>> = (0..n).map(|_| None).collect();
    let mut fresh = vec![false; n];
    let mut deadline = Instant::now() + 2 * TICK;
    // The documents exist from the start, as one pipeline's do.
    publish(&reports);
    loop {
        match told.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Told::Output(bytes)) if result.is_ok() => result = log.write_all(&bytes),
            Ok(Told::Output(_)) | Err(RecvTimeoutError::Timeout) => {}
            Ok(Told::Report(i, report)) => {
                reports[i] = Some(report);
                fresh[i] = true;
            }
            Err(RecvTimeoutError::Disconnected) => return result.and_then(|()| log.flush()),
        }
        if fresh.iter().all(|f| *f) || Instant::now() >= deadline {
            publish(&reports);
            fresh.fill(false);
            deadline = Instant::now() + 2 * TICK;
            if result.is_ok() {
                result = log.flush();
            }
        }
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
    }
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
    let ended = Ended {
        kernel: None,
        ship: None,
    };
    end_run(
        run.merged,
        args,
        ended,
        Some(capture),
        log,
        documents,
        loop_result,
    )
}

/// What a run ended with besides its counts: libpcap's counters and the shipper's state.
struct Ended {
    kernel: Option<KernelStats>,
    ship: Option<ShipStatusNow>,
}

/// The end of a run: the summary, the last of the log, the `-w` file (`capture`'s), then how
/// it went.
fn end_run<C: Connection>(
    mut pipeline: Pipeline<C>,
    args: &Args,
    ended: Ended,
    capture: Option<&mut Capture>,
    log: &mut Box<dyn Write>,
    documents: &Documents,
    loop_result: Result<()>,
) -> Result<()> {
    let mut summary = pipeline.summary();
    summary.kernel = ended.kernel;
    let summary_text = match args.summary {
        SummaryFormat::Text => summary.to_text(),
        SummaryFormat::Json => format!("{}\n", pipeline.stats_json()),
        SummaryFormat::None => String::new(),
    };
    documents.publish(&pipeline, ended.kernel, ended.ship);
    let written = write_out(log, pipeline.output())
        .and_then(|_| log.write_all(summary_text.as_bytes()))
        .and_then(|_| log.flush());
    if let Some(capture) = capture {
        capture.flush()?;
    }
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
    publish: &mut dyn FnMut(&Pipeline<C>, Option<KernelStats>),
    show_progress: bool,
) -> Result<()> {
    let mut next_tick = Instant::now() + TICK;
    // Frames since the clock was last read.
    let mut unclocked = 0;
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
        let idle = match capture.next_frames(FRAMES_PER_BATCH, |frame| pipeline.on_frame(frame))? {
            Batch::Frames(n) => {
                unclocked += n;
                // Under endless traffic the ring never runs dry: stop anyway, a bit later.
                if drain_until.is_some_and(|until| Instant::now() >= until + 3 * STOP_DRAIN) {
                    return Ok(());
                }
                false
            }
            Batch::Idle => {
                if drain_until.is_some_and(|until| Instant::now() >= until) {
                    return Ok(());
                }
                true
            }
            Batch::End => return Ok(()),
        };
        if pipeline.output().len() >= OUTPUT_CHUNK {
            if let Err(e) = write_out(log, pipeline.output()) {
                return closed_output(e);
            }
        }
        if !idle && unclocked < 4096 {
            continue;
        }
        unclocked = 0;
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            let wall_us = capture.is_live().then(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64)
            });
            let kernel = capture.kernel_stats();
            pipeline.tick(kernel, wall_us);
            publish(pipeline, kernel);
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
    fn publish<C: Connection>(
        &self,
        pipeline: &Pipeline<C>,
        kernel: Option<KernelStats>,
        ship: Option<ShipStatusNow>,
    ) {
        self.stats.publish(pipeline.stats_json().to_string());
        if let Some(metrics) = &self.metrics {
            metrics.publish(pipeline.metrics(kernel, ship));
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
                        // As the stats port: a scrape before the first page waits for it.
                        Ok(l) => tokio::select! {
                            () = stopped() => {}
                            () = page.first_published() => {
                                let render: prometheus::Render =
                                    Arc::new(move || page.current().as_str().to_owned());
                                prometheus::serve(l, render, stopped()).await
                            }
                        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::duplex::Duplex;
    use crate::steps::capture::Frame;
    use etherparse::PacketBuilder;

    /// A pipeline thread that panics stops the capture of the others, and says why; one that
    /// ends does not.
    #[test]
    fn a_panicking_pipeline_stops_the_others() {
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let ends = scope.spawn(|| {
                let _stop_all = StopOnPanic(&stop);
            });
            assert!(ends.join().is_ok());
            assert!(!stop.load(Ordering::Relaxed));
            let panics = scope.spawn(|| {
                let _stop_all = StopOnPanic(&stop);
                panic!("pipeline bug {}", 7);
            });
            let panic = panics.join().unwrap_err();
            assert_eq!(panic_message(&*panic), "pipeline bug 7");
        });
        assert!(stop.load(Ordering::Relaxed));
        let literal: Box<dyn std::any::Any + Send> = Box::new("a literal");
        assert_eq!(panic_message(&*literal), "a literal");
    }

    /// A scrape that comes before the first page waits for it rather than getting an empty
    /// page; the servers stop without one as well.
    #[test]
    fn a_scrape_before_the_first_metrics_page_waits_for_it() {
        use std::io::{Read, Write};
        let page = StatsSnapshot::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (thread, shutdown) = spawn_servers(None, Some((listener, page.clone()))).unwrap();
        let scrape = std::thread::spawn(move || {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            client
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).unwrap();
            answer
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        page.publish("tcpkit_up 1\n".into());
        let answer = scrape.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("tcpkit_up 1\n"), "{answer}");
        shutdown.send(true).unwrap();
        thread.join().unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (thread, shutdown) =
            spawn_servers(None, Some((listener, StatsSnapshot::default()))).unwrap();
        shutdown.send(true).unwrap();
        thread.join().unwrap();
    }

    fn config() -> PipelineConfig {
        PipelineConfig {
            link: LinkType::Raw,
            rule: DirectionRule::new(&[6379], &[], &[]),
            ports: vec![(6379, Mode::Redis)],
            flow_limits: FlowLimits::default(),
            match_limits: MatchLimits::default(),
            threshold_ms: None,
        }
    }

    /// Connection `i`'s frames: a PING and its PONG, then a GET and its reply, 100 µs apart
    /// and `i` µs later than connection 0's.
    fn connection(i: u16) -> Vec<(u64, Vec<u8>)> {
        let (client, server) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let tcp = |from_client: bool, seq: u32| {
            if from_client {
                PacketBuilder::ipv4(client, server, 64).tcp(40_000 + i, 6379, seq, 1000)
            } else {
                PacketBuilder::ipv4(server, client, 64).tcp(6379, 40_000 + i, seq, 1000)
            }
        };
        let segment = |from_client: bool, seq: u32, payload: &[u8]| {
            let mut ip = Vec::new();
            tcp(from_client, seq)
                .ack(1)
                .write(&mut ip, payload)
                .unwrap();
            ip
        };
        let syn = |from_client: bool| {
            let mut ip = Vec::new();
            tcp(from_client, 0).syn().write(&mut ip, &[]).unwrap();
            ip
        };
        let get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        let t = 1_000_000 + u64::from(i);
        vec![
            (t - 20, syn(true)),
            (t - 10, syn(false)),
            (t, segment(true, 1, b"*1\r\n$4\r\nPING\r\n")),
            (t + 100, segment(false, 1, b"+PONG\r\n")),
            (t + 200, segment(true, 15, get)),
            (t + 500 + 10 * u64::from(i), segment(false, 8, b"$-1\r\n")),
        ]
    }

    fn feed(pipeline: &mut Pipeline<Duplex<RedisPairing>>, frames: &[(u64, Vec<u8>)]) {
        for (ts, data) in frames {
            pipeline.on_frame(&Frame {
                ts_sec: (ts / 1_000_000) as i64,
                ts_usec: (ts % 1_000_000) as u32,
                data,
            });
        }
    }

    fn report(pipeline: &Pipeline<Duplex<RedisPairing>>, dropped: u64) -> Report {
        Report {
            totals: pipeline.totals(),
            kernel: Some(KernelStats {
                received: 100,
                dropped,
                if_dropped: 0,
            }),
            ship: None,
        }
    }

    /// Live, with no packet coming, a request without its reply still ends as a timeout once
    /// its connection has been idle past the timeout on the clock (a second of lag allowed),
    /// and a DNS query without its response once past its own timeout; not earlier.
    #[test]
    fn a_quiet_capture_still_ends_what_timed_out() {
        let mut redis = config();
        redis.flow_limits.idle_timeout_us = 5_000_000;
        let mut pipeline = Pipeline::<Duplex<RedisPairing>>::new(redis);
        let mut frames = connection(0);
        frames.pop(); // the GET's reply never comes
        feed(&mut pipeline, &frames);
        let timeouts =
            |p: &Pipeline<Duplex<RedisPairing>>| p.stats_json()[0]["6379"]["timeouts"].clone();
        let get_at = frames.last().unwrap().0;
        pipeline.tick(None, Some(get_at + 5_500_000));
        assert_eq!(timeouts(&pipeline), 0);
        // Swept once a second at most: the next sweep is a second after the last.
        pipeline.tick(None, Some(get_at + 7_600_000));
        assert_eq!(timeouts(&pipeline), 1, "{}", pipeline.stats_json());
        assert_eq!(pipeline.counters().flows_evicted, 1);

        let mut dns = config();
        dns.ports = vec![(53, Mode::Dns)];
        dns.rule = DirectionRule::new(&[53], &[], &[]);
        dns.match_limits.dns_timeout_us = 2_000_000;
        let mut pipeline = Pipeline::<Duplex<RedisPairing>>::new(dns);
        let mut query = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(40_000, 53)
            .write(
                &mut query,
                b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03foo\x04test\x00\x00\x01\x00\x01",
            )
            .unwrap();
        feed(&mut pipeline, &[(1_000_000, query)]);
        let timeouts =
            |p: &Pipeline<Duplex<RedisPairing>>| p.stats_json()[0]["53"]["timeouts"].clone();
        pipeline.tick(None, Some(3_900_000));
        assert_eq!(timeouts(&pipeline), 0);
        pipeline.tick(None, Some(4_100_000));
        assert_eq!(timeouts(&pipeline), 1);
    }

    #[test]
    fn the_merge_of_pipelines_is_one_pipeline_over_all_their_connections() {
        let connections: Vec<_> = (0..6).map(connection).collect();
        let mut one = Pipeline::<Duplex<RedisPairing>>::new(config());
        let mut shares = [
            Pipeline::<Duplex<RedisPairing>>::new(config()),
            Pipeline::<Duplex<RedisPairing>>::new(config()),
        ];
        for (i, frames) in connections.iter().enumerate() {
            feed(&mut one, frames);
            feed(&mut shares[i % 2], frames);
        }
        let reports = [report(&shares[0], 1), report(&shares[1], 2)];
        let (merged, ended) = merge_reports::<Duplex<RedisPairing>>(&config(), &reports);
        assert_eq!(merged.stats_json(), one.stats_json());
        assert_eq!(merged.captured(), 36);
        assert_eq!(
            merged.stats_json()[0]["6379"]["commands"]["GET"]["total_reqs"],
            6
        );
        let kernel = ended.kernel.unwrap();
        assert_eq!((kernel.received, kernel.dropped), (200, 3));
        assert_eq!(merged.summary().to_text(), one.summary().to_text());
    }
}
