//! `tcpkit-aggregator`: receives the agents' streams and stores them in SQLite or
//! ClickHouse; answers `tcpkit-query`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use std::sync::Arc;
use tcpkit_aggregator::auth::TlsFiles;
use tcpkit_aggregator::metrics::Telemetry;
use tcpkit_aggregator::server::{self, Config, Limits};
use tcpkit_aggregator::store;
use tcpkit_aggregator::units::{parse_duration, parse_size};
use tcpkit_ops::prometheus;
use tcpkit_proto::client::read_token_file;

/// Stores what tcpkit agents send (slow requests, latency histograms, their health) in a
/// SQLite file or in ClickHouse, merges histograms across servers and time, and answers
/// tcpkit-query. On ClickHouse, any number of aggregators share one store: agents and
/// tcpkit-query may use any of them.
#[derive(Debug, Parser)]
#[command(name = "tcpkit-aggregator", version)]
struct Args {
    /// Address to serve gRPC on (agents and tcpkit-query); port 0 picks a free one.
    #[arg(long, default_value = "0.0.0.0:50051", value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// The SQLite database file, created when missing (the same as --store sqlite:FILE)
    #[arg(long, default_value = "tcpkit.db", value_name = "FILE")]
    db: PathBuf,
    /// Where to store: sqlite:FILE, or clickhouse://[USER@]HOST:PORT[,HOST:PORT...]/DATABASE
    /// (ClickHouse's HTTP port; clickhouse+https:// for TLS). Several hosts are the nodes of
    /// --clickhouse-cluster: the schema is made on each, the first that answers is used
    #[arg(
        long,
        value_name = "URL",
        conflicts_with = "db",
        help_heading = "Store"
    )]
    store: Option<String>,
    /// The ClickHouse cluster (remote_servers) to shard over: local tables on every host
    /// of --store, and Distributed tables over them, sharded by agent
    #[arg(long, value_name = "NAME", help_heading = "Store")]
    clickhouse_cluster: Option<String>,
    /// File holding the ClickHouse user's password (never on the command line)
    #[arg(long, value_name = "FILE", help_heading = "Store")]
    store_password_file: Option<PathBuf>,
    /// The CA (PEM) that signed the ClickHouse servers' certificates (clickhouse+https://)
    #[arg(long, value_name = "FILE", help_heading = "Store")]
    store_ca: Option<PathBuf>,
    /// Delete data older than this, by capture time (e.g. 7d, 12h). Kept forever when unset.
    #[arg(long, value_parser = parse_duration, value_name = "AGE")]
    retention: Option<Duration>,
    /// Delete the oldest data while the database holds more than this (e.g. 10GB); on
    /// ClickHouse, by the parts' sizes on disk over every host, whole days at a time.
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
    /// Serve the web page (latency heatmap, histogram, slowest requests, agents) and its
    /// JSON API (/api/v1/hist, slow, series, top, agents) on this address, e.g.
    /// 127.0.0.1:8080; with the token and TLS (--tls-cert, --tls-client-ca) of gRPC
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<std::net::SocketAddr>,
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
    let store = store_of(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let config = Config {
            store,
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
            "tcpkit-aggregator listening on {}{}, store {}",
            listener.local_addr()?,
            if config.tls.is_some() { " (TLS)" } else { "" },
            config.store
        );
        let web = match args.http_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot serve the page on {addr} (--http-listen)"))?,
            ),
            None => None,
        };
        server::serve_with_web(listener, web, config, telemetry, shutdown).await
    })
}

/// The store the flags name.
fn store_of(args: &Args) -> anyhow::Result<store::Spec> {
    let spec = match &args.store {
        Some(url) => store::Spec::parse(url).map_err(|e| anyhow::anyhow!("--store {e}"))?,
        None => store::Spec::Sqlite(args.db.clone()),
    };
    match spec {
        store::Spec::Sqlite(path) => {
            if args.clickhouse_cluster.is_some()
                || args.store_password_file.is_some()
                || args.store_ca.is_some()
            {
                anyhow::bail!(
                    "--clickhouse-cluster, --store-password-file and --store-ca are for a ClickHouse --store"
                );
            }
            Ok(store::Spec::Sqlite(path))
        }
        store::Spec::ClickHouse(mut s) => {
            if let Some(path) = &args.store_password_file {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the password file {}", path.display()))?;
                s.password = Some(text.trim_end_matches(['\n', '\r']).to_string());
            }
            if args.store_ca.is_some() && !s.tls {
                anyhow::bail!("--store-ca needs a clickhouse+https:// store");
            }
            s.ca.clone_from(&args.store_ca);
            if let Some(c) = &args.clickhouse_cluster {
                if !c
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    || c.is_empty()
                {
                    anyhow::bail!("--clickhouse-cluster {c:?} is not a cluster name");
                }
            }
            s.cluster.clone_from(&args.clickhouse_cluster);
            if s.hosts.len() > 1 && s.cluster.is_none() {
                anyhow::bail!(
                    "--store names {} ClickHouse hosts: with --clickhouse-cluster they are one \
                     cluster's nodes; without it each would hold a part of the data",
                    s.hosts.len()
                );
            }
            Ok(store::Spec::ClickHouse(s))
        }
    }
}
