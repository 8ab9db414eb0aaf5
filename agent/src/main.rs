//! `tcpkit`: parses the command line and runs the agent.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = tcpkit::cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(tcpkit_ops::colour_on_stderr())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TCPKIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match tcpkit::shell::run::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<tcpkit::shell::run::Unshipped>() => {
            eprintln!("tcpkit: {e:#}");
            ExitCode::from(tcpkit::shell::run::EXIT_UNSHIPPED)
        }
        Err(e) => {
            eprintln!("tcpkit: {e:#}");
            ExitCode::FAILURE
        }
    }
}
