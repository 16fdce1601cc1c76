//! `kms-cli`: parses the command line and hands it to the library.
//!
//! Exit codes: 0 success, 1 the operation failed (the reason is printed on stderr), 2 the
//! command line was malformed.

#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = kms_cli::Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match kms_cli::run(cli, &mut stdout).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
