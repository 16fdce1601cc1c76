//! `kms-server`: reads its configuration, loads the PKCS#11 module once, and serves.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use kms_server::config::{LogFormat, ServerParams};
use kms_server::server::{Parts, Ready};
use kms_server::service::SystemClock;

/// HSM-backed key management server.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; every setting can also come from a KMS_* variable.
    #[arg(long, short, env = "KMS_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let params = ServerParams::load(args.config.as_deref(), |k| std::env::var(k).ok())
        .context("configuration")?;
    init_logging(params.log_format);
    let module = params.module.clone();
    let pkcs11 = tokio::task::spawn_blocking(move || kms_server::hsm::load_module(&module))
        .await?
        .with_context(|| format!("PKCS#11 module {}", params.module.display()))?;
    let ready = Ready::open(Parts {
        pkcs11,
        hsm: params.hsm,
        store_url: params.store_url,
        store_max_connections: params.store_max_connections,
        clock: Arc::new(SystemClock),
        rotation: params.rotation,
        authz: params.authz,
        audit: params.audit,
        tls: params.tls,
        instance: params.instance,
    })
    .await
    .context("start-up")?;
    let listener = tokio::net::TcpListener::bind(params.listen)
        .await
        .with_context(|| format!("bind {}", params.listen))?;
    ready
        .serve(listener, shutdown_signal())
        .await
        .context("serve")?;
    tracing::info!("stopped");
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("KMS_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
