//! The audit trail as the RPCs use it: one record per request written before the answer
//! (allowed, denied and failed alike), and fail-closed behaviour when the trail cannot be
//! written — on SQLite and PostgreSQL, through real mTLS calls.

use sdk::Code;
use softhsm_test::TestServer;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};

use crate::support::{ctx, on_both_stores, StoreKind, TestDb};

async fn pool(db: &TestDb) -> AnyPool {
    sqlx::any::install_default_drivers();
    AnyPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .expect("store")
}

async fn records(pool: &AnyPool) -> i64 {
    sqlx::query("SELECT COUNT(*) AS n FROM audit_records")
        .fetch_one(pool)
        .await
        .expect("count")
        .try_get("n")
        .expect("n")
}

async fn last_record(pool: &AnyPool) -> (String, String, String) {
    let row = sqlx::query(
        "SELECT operation, outcome, COALESCE(error_code, '') AS code FROM audit_records \
         ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .expect("last");
    (
        row.try_get("operation").expect("operation"),
        row.try_get("outcome").expect("outcome"),
        row.try_get("code").expect("code"),
    )
}

async fn one_record_per_request(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let pool = pool(&db).await;
    let officer = server.client_as("officer-1").await.expect("officer");
    let app = server.client().await.expect("app");
    server.create_key_for_app("k").await.expect("key");
    let c = ctx(&[("purpose", "treatment")]);

    let before = records(&pool).await;
    let dk = app.generate_data_key("k", &c).await.expect("allowed");
    assert_eq!(records(&pool).await, before + 1, "an allowed call");
    assert_eq!(
        last_record(&pool).await,
        ("GenerateDataKey".into(), "ok".into(), String::new())
    );
    assert!(officer.decrypt(&dk.blob, &c, None).await.is_err());
    assert_eq!(records(&pool).await, before + 2, "a denied call");
    assert_eq!(
        last_record(&pool).await,
        ("Decrypt".into(), "denied".into(), "PermissionDenied".into())
    );
    assert!(app.decrypt(&dk.blob[..10], &c, None).await.is_err());
    assert_eq!(records(&pool).await, before + 3, "a failed call");
    assert_eq!(
        last_record(&pool).await,
        ("Decrypt".into(), "failed".into(), "InvalidArgument".into())
    );
    server.stop().await.expect("stop");
}
on_both_stores!(
    every_request_leaves_one_record_before_its_answer,
    one_record_per_request
);

async fn block_audit_writes(pool: &AnyPool, kind: StoreKind) {
    let statements: &[&str] = match kind {
        StoreKind::Sqlite => &["CREATE TRIGGER audit_block BEFORE INSERT ON audit_records \
             BEGIN SELECT RAISE(ABORT, 'audit store read-only'); END"],
        StoreKind::Postgres => &[
            "CREATE FUNCTION audit_block() RETURNS trigger AS $$ BEGIN \
             RAISE EXCEPTION 'audit store read-only'; END; $$ LANGUAGE plpgsql",
            "CREATE TRIGGER audit_block BEFORE INSERT ON audit_records \
             FOR EACH ROW EXECUTE FUNCTION audit_block()",
        ],
    };
    for statement in statements {
        sqlx::query(statement).execute(pool).await.expect("block");
    }
}

async fn unblock_audit_writes(pool: &AnyPool, kind: StoreKind) {
    let statement = match kind {
        StoreKind::Sqlite => "DROP TRIGGER audit_block",
        StoreKind::Postgres => "DROP TRIGGER audit_block ON audit_records",
    };
    sqlx::query(statement).execute(pool).await.expect("unblock");
}

async fn fail_closed(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let pool = pool(&db).await;
    let app = server.client().await.expect("app");
    let auditor = server.client_as("auditor-1").await.expect("auditor");
    server.create_key_for_app("k").await.expect("key");
    let c = ctx(&[("purpose", "treatment")]);
    let dk = app.generate_data_key("k", &c).await.expect("before");

    block_audit_writes(&pool, db.kind).await;
    let before = records(&pool).await;
    for round in 0..5 {
        for result in [
            app.generate_data_key("k", &c).await.map(|_| ()),
            app.decrypt(&dk.blob, &c, None).await.map(|_| ()),
            app.ping().await,
        ] {
            match result {
                Err(sdk::Error::Rpc {
                    code: Code::Unavailable,
                    message,
                }) => assert_eq!(message, "audit trail unavailable", "round {round}"),
                other => panic!("round {round}: answered without an audit record: {other:?}"),
            }
        }
    }
    assert_eq!(records(&pool).await, before, "nothing half-written");

    unblock_audit_writes(&pool, db.kind).await;
    let dk2 = app.generate_data_key("k", &c).await.expect("recovered");
    let opened = app.decrypt(&dk2.blob, &c, None).await.expect("recovered");
    assert_eq!(opened.plaintext[..], dk2.plaintext[..]);
    assert_eq!(records(&pool).await, before + 2);
    let verified = auditor.verify_audit().await.expect("verify");
    assert!(verified.intact, "{verified:?}");
    server.stop().await.expect("stop");
}
on_both_stores!(
    audit_failure_fails_requests_closed_and_recovers,
    fail_closed
);
