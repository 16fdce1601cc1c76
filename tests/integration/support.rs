//! Shared helpers: a macro that runs one async test body against SQLite and PostgreSQL.

use std::collections::BTreeMap;

pub use softhsm_test::{StoreKind, TestDb, TestServer};

/// Declares `mod $name { sqlite(), postgres() }`, each running `$body(db)` on a fresh
/// database of that kind. The PostgreSQL half reports a skip when no server is configured.
macro_rules! on_both_stores {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = $crate::support::TestDb::new($crate::support::StoreKind::Sqlite)
                    .await
                    .expect("db")
                    .expect("sqlite");
                super::$body(db).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) = $crate::support::TestDb::new($crate::support::StoreKind::Postgres)
                    .await
                    .expect("db")
                {
                    super::$body(db).await;
                }
            }
        }
    };
}
pub(crate) use on_both_stores;

/// A context from pairs.
pub fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A server on a fresh SQLite database, for tests that are not about the store.
pub async fn sqlite_server() -> (TestDb, TestServer) {
    let db = TestDb::new(StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let server = TestServer::start(&db).await.expect("server starts");
    (db, server)
}

/// Asserts that `result` failed with INVALID_ARGUMENT "invalid ciphertext".
#[track_caller]
pub fn assert_invalid_ciphertext<T>(result: Result<T, sdk::Error>, what: &str) {
    match result {
        Ok(_) => panic!("{what}: accepted"),
        Err(sdk::Error::Rpc {
            code: tonic::Code::InvalidArgument,
            message,
        }) if message == "invalid ciphertext" => {}
        Err(other) => panic!("{what}: wrong error {other:?}"),
    }
}

/// The key-management client of a test server: officer-1 (creates, rotates, disables keys).
pub async fn officer(server: &TestServer) -> sdk::KmsClient {
    server.client_as("officer-1").await.expect("officer client")
}

/// Schedules the deletion of `key` after `days`, as dual control requires: officer-1
/// proposes, officer-2 approves; asserts the approval executed and returns the key as
/// officer-1 then describes it.
pub async fn schedule_deletion_approved(server: &TestServer, key: &str, days: u32) -> sdk::KeyInfo {
    let officer = officer(server).await;
    let proposal = officer
        .schedule_key_deletion(key, days)
        .await
        .expect("deletion proposed");
    assert_eq!(proposal.kind, "key-deletion", "{proposal:?}");
    assert_eq!(proposal.state, "pending", "{proposal:?}");
    let done = server
        .client_as("officer-2")
        .await
        .expect("approver client")
        .approve(&proposal.approval_id)
        .await
        .expect("deletion approved");
    assert_eq!(done.state, "executed", "{done:?}");
    officer.describe_key(key).await.expect("describe")
}

/// Binds principal `principal` (any text, e.g. a certificate's bare CN) to `role`: proposed
/// by officer-1, approved by officer-2.
pub async fn bind_role(server: &TestServer, principal: &str, role: &str) {
    let request = officer(server)
        .await
        .propose_role_binding(principal, role, false)
        .await
        .expect("binding proposed");
    let done = server
        .client_as("officer-2")
        .await
        .expect("approver client")
        .approve(&request.approval_id)
        .await
        .expect("binding approved");
    assert_eq!(done.state, "executed", "{done:?}");
}

/// Polls `grpc.health.v1` for `kms.v1.KeyManagement` until it reports `want`; returns how long
/// that took. Panics after `within`.
pub async fn wait_for_health(
    server: &TestServer,
    want: tonic_health::pb::health_check_response::ServingStatus,
    within: std::time::Duration,
) -> std::time::Duration {
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        crate::tls::channel(server, "app-1").await,
    );
    let start = std::time::Instant::now();
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "kms.v1.KeyManagement".into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        if status == want as i32 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "health still {status} after {within:?}, want {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
