//! `tcpkit-aggregator`: receives the agents' streams and stores them in SQLite; answers
//! `tcpkit-query`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use std::sync::Arc;
use tcpkit_aggregator::auth::TlsFiles;
use tcpkit_aggregator::metrics::Telemetry;
use tcpkit_aggregator::server::{self, Config, Limits};
use tcpkit_aggregator::units::{parse_duration, parse_size};
use tcpkit_ops::prometheus;
use tcpkit_proto::client::read_token_file;

/// Stores what tcpkit agents send (slow requests, latency histograms, their health) in a
/// SQLite file, merges histograms across servers and time, and answers tcpkit-query.
#[derive(Debug, Parser)]
#[command(name = "tcpkit-aggregator", version)]
struct Args {
    /// Address to serve gRPC on (agents and tcpkit-query); port 0 picks a free one.
    #[arg(long, default_value = "0.0.0.0:50051", value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// The SQLite database file, created when missing.
    #[arg(long, default_value = "tcpkit.db", value_name = "FILE")]
    db: PathBuf,
    /// Delete data older than this, by capture time (e.g. 7d, 12h). Kept forever when unset.
    #[arg(long, value_parser = parse_duration, value_name = "AGE")]
    retention: Option<Duration>,
    /// Delete the oldest data while the database holds more than this (e.g. 10GB).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    max_db_size: Option<u64>,
    /// Largest message an agent may send.
    #[arg(long, value_parser = parse_size, default_value = "16MiB", value_name = "SIZE")]
    max_message_size: u64,
    /// File holding the shared token every agent and tcpkit-query must send; without it,
    /// anyone who reaches the port may call
    #[arg(long, value_name = "FILE", help_heading = "Security")]
    token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key, the port speaks TLS only
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        help_heading = "Security"
    )]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        help_heading = "Security"
    )]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        help_heading = "Security"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics (the fleet-merged histograms, every agent's counters) on
    /// this address, e.g. 127.0.0.1:33335
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Read settings from this TOML file (keys are the long flag names; flags override them)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(tcpkit_ops::colour_on_stderr())
        .init();
    let argv =
        match tcpkit_ops::config::with_config_file(&Args::command(), std::env::args_os().collect())
        {
            Ok(argv) => argv,
            Err(e) => {
                eprintln!("tcpkit-aggregator: {e:#}");
                return std::process::ExitCode::from(2);
            }
        };
    match run(Args::parse_from(argv)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpkit-aggregator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let token = match &args.token_file {
        Some(path) => Some(read_token_file(path)?),
        None => None,
    };
    let tls = args
        .tls_cert
        .clone()
        .zip(args.tls_key.clone())
        .map(|(cert, key)| TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca.clone(),
        });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let config = Config {
            db: args.db.clone(),
            retention: args.retention,
            max_db_bytes: args.max_db_size,
            limits: Limits {
                max_message_bytes: usize::try_from(args.max_message_size).unwrap_or(usize::MAX),
                ..Limits::default()
            },
            token,
            tls,
        };
        let telemetry = Arc::new(Telemetry::default());
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(addr) = args.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr} (--metrics-listen)"))?;
            let telemetry = Arc::clone(&telemetry);
            let render: prometheus::Render = Arc::new(move || telemetry.render());
            tokio::spawn(prometheus::serve(listener, render, async {
                let _ = metrics_stopped.await;
            }));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        // It logs to stderr only (the journal): SIGHUP, logrotate's signal, has nothing to
        // reopen and must not stop it.
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot handle SIGHUP")?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: nothing to reopen (the log is stderr)");
            }
        });
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping");
            let _ = stop_metrics.send(());
        };
        eprintln!(
            "tcpkit-aggregator listening on {}{}, database {}",
            listener.local_addr()?,
            if config.tls.is_some() { " (TLS)" } else { "" },
            args.db.display()
        );
        server::serve(listener, config, telemetry, shutdown).await
    })
}
