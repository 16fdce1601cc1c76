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
