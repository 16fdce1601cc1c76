//! `kms-cli`: parses the command line and hands it to the library.
//!
//! Exit codes: 0 success, 1 the operation failed (the reason is printed on stderr), 2 the
//! command line was malformed, 130 interrupted (Ctrl-C or SIGTERM; temporary outputs removed).

#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::atomic::Ordering;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = kms_cli::Cli::parse();
    tokio::spawn(async {
        wait_for_signal().await;
        kms_cli::CANCELLED.store(true, Ordering::SeqCst);
    });
    let mut stdout = std::io::stdout().lock();
    let outcome = kms_cli::run(cli, &mut stdout).await;
    if kms_cli::CANCELLED.load(Ordering::SeqCst) {
        let _ = writeln!(std::io::stderr(), "interrupted: temporary outputs removed");
        return std::process::ExitCode::from(130);
    }
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // stderr may be a closed pipe: never panic while reporting.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
