//! `tcpkit-aggregator`: receives the agents' streams and stores them in SQLite; answers
//! `tcpkit-query`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tcpkit_aggregator::server::{self, Config, Limits};
use tcpkit_aggregator::units::{parse_duration, parse_size};

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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpkit-aggregator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
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
        };
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping");
        };
        eprintln!(
            "tcpkit-aggregator listening on {}, database {}",
            listener.local_addr()?,
            args.db.display()
        );
        server::serve(listener, config, shutdown).await
    })
}
