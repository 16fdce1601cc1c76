//! Three `kms-server` processes on one private PostgreSQL database and one SoftHSM2 token,
//! a bounded mixed load through all three, one replica killed with `SIGKILL` and restarted,
//! PostgreSQL stopped and started under load — then every ciphertext decrypts through every
//! replica, version histories agree, the audit trail verifies and holds every acknowledged
//! request. The scenario and its checks are `softhsm_test::scaleout` (also run by
//! `scripts/scaleout-demo.sh`).
//!
//! Outside the `tests` crate for the same reason as `kill.rs`: it needs this package's binary
//! (`CARGO_BIN_EXE_kms-server`). Skipped (with a notice) when no PostgreSQL server binaries are
//! installed, unless `KMS_TEST_REQUIRE_POSTGRES=1` (CI), which makes that a failure.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use softhsm_test::scaleout::{run, Options};

/// The whole scenario may not take longer than this (it takes about a minute).
const LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_survive_a_sigkill_and_a_postgres_restart() {
    let options = Options {
        server_bin: env!("CARGO_BIN_EXE_kms-server").into(),
        duration: Duration::from_secs(24),
        workers: 8,
        max_ops: 8_000,
        progress: true,
    };
    match tokio::time::timeout(LIMIT, run(&options)).await {
        Err(_) => panic!("the scale-out scenario did not finish within {LIMIT:?}"),
        Ok(Err(e)) => panic!("scale-out scenario failed: {e:#}"),
        Ok(Ok(None)) => {
            eprintln!("SKIPPED: the scale-out scenario needs PostgreSQL server binaries")
        }
        Ok(Ok(Some(report))) => println!("{}", report.markdown()),
    }
}
