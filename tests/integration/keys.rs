//! Creating, describing and listing keys; aliases; errors for unknown keys and bad input.

use crate::support::*;

async fn create_describe_list(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    // Key management is the security officer's.
    let client = officer(&server).await;
    let tags = [("owner".to_string(), "radiology".to_string())].into();
    let created = client
        .create_key(sdk::NewKey {
            alias: Some("pacs/images".into()),
            description: "PACS gateway".into(),
            tags,
        })
        .await
        .expect("create");
    assert_eq!(created.state, "enabled");
    assert_eq!(created.algorithm, "AES_256_GCM");
    assert_eq!(created.primary_version, 1);
    let by_alias = client.describe_key("pacs/images").await.expect("by alias");
    let by_id = client.describe_key(&created.key_id).await.expect("by id");
    assert_eq!(by_alias, created);
    assert_eq!(by_id, created);
    assert_eq!(
        by_id.tags.get("owner").map(String::as_str),
        Some("radiology")
    );

    for _ in 0..6 {
        client
            .create_key(sdk::NewKey::default())
            .await
            .expect("more keys");
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client.list_keys(3, token.as_deref()).await.expect("page");
        assert!(page.keys.len() <= 3);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7, "every key listed exactly once");
    assert_eq!(seen[0], created.key_id, "creation order");
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 7);

    let bad = client
        .list_keys(3, Some("not-a-token"))
        .await
        .expect_err("bad token");
    assert_eq!(bad.code(), Some(tonic::Code::InvalidArgument));
    let big = client
        .list_keys(5000, None)
        .await
        .expect_err("page too big");
    assert_eq!(big.code(), Some(tonic::Code::InvalidArgument));
    server.stop().await.expect("stop");
}
on_both_stores!(create_describe_list_on, create_describe_list);

/// Two concurrent creations of one alias give exactly one key (a unique constraint decides,
/// not a check-then-insert); the loser's HSM object is destroyed again.
async fn concurrent_alias_yields_one_key(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let client = officer(&server).await;
    let attempts = (0..8).map(|_| {
        let c = client.clone();
        tokio::spawn(async move {
            c.create_key(sdk::NewKey {
                alias: Some("contended".into()),
                ..Default::default()
            })
            .await
        })
    });
    let mut ok = 0;
    let mut conflicts = 0;
    for attempt in attempts {
        match attempt.await.expect("join") {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => conflicts += 1,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 7));
    let all = client.list_keys(100, None).await.expect("list");
    assert_eq!(
        all.keys
            .iter()
            .filter(|k| k.alias.as_deref() == Some("contended"))
            .count(),
        1
    );
    server.stop().await.expect("stop");
}
on_both_stores!(concurrent_alias_on, concurrent_alias_yields_one_key);

#[tokio::test]
async fn unknown_keys_and_bad_arguments_have_their_codes() {
    let (_db, server) = sqlite_server().await;
    // The app uses keys, the officer manages them: each sees unknown keys as NOT_FOUND.
    let client = server.client().await.expect("client");
    let officer = officer(&server).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    // Key managers are told a key does not exist.
    for result in [
        officer.describe_key(&unknown).await.map(|_| ()),
        officer.describe_key("no-such-alias").await.map(|_| ()),
    ] {
        assert_eq!(
            result.expect_err("unknown key").code(),
            Some(tonic::Code::NotFound)
        );
    }
    // Key users learn nothing about keys outside their grants, not even whether they exist:
    // an unknown key looks exactly like an existing key they hold no grant for.
    let ungranted = officer
        .create_key(sdk::NewKey::default())
        .await
        .expect("key")
        .key_id;
    let denied = client
        .generate_data_key(&ungranted, &ctx(&[]))
        .await
        .expect_err("no grant");
    for result in [
        client.describe_key(&unknown).await.map(|_| ()),
        client
            .generate_data_key(&unknown, &ctx(&[]))
            .await
            .map(|_| ()),
        client
            .encrypt("no-such-alias", b"x", &ctx(&[]))
            .await
            .map(|_| ()),
    ] {
        let e = result.expect_err("unknown key");
        assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
        assert_eq!(e.to_string(), denied.to_string());
    }
    for bad_alias in ["has space", "ü", &"a".repeat(65)] {
        let err = officer
            .create_key(sdk::NewKey {
                alias: Some(bad_alias.to_string()),
                ..Default::default()
            })
            .await
            .expect_err("bad alias");
        assert_eq!(
            err.code(),
            Some(tonic::Code::InvalidArgument),
            "{bad_alias:?}"
        );
    }
    let err = client
        .generate_data_key("", &ctx(&[]))
        .await
        .expect_err("empty key");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    let err = client
        .generate_data_key("x", &ctx(&[("", "v")]))
        .await
        .expect_err("empty context key");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    // Messages never echo what the caller sent.
    let err = client
        .encrypt("no-such-alias", b"x", &ctx(&[("patient", "Jane Doe")]))
        .await
        .expect_err("unknown");
    assert!(
        !err.to_string().contains("no-such-alias") && !err.to_string().contains("Jane"),
        "{err}"
    );
}

/// The database disappears under a running server (PostgreSQL: the test database is dropped
/// with its connections): calls that need it fail with UNAVAILABLE — including every
/// encryption, which must be counted durably before it happens (fail closed) — while
/// decryption under cached keys keeps working for as long as the cache may be trusted
/// (`KEY_CACHE_MAX_AGE` after the last successful check of the store), then fails closed too;
/// the server keeps serving.
///
/// This half runs without the audit trail (the benchmark baseline), so that the usage
/// counter's own fail-closed behaviour is what is tested; with the trail on (production),
/// see [`a_lost_database_stops_every_audited_call`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_unavailable_and_the_server_keeps_serving() {
    let Some(db) = TestDb::new(StoreKind::Postgres).await.expect("db") else {
        return;
    };
    let server = TestServer::start_opts(
        &db,
        softhsm_test::ServerOptions {
            audit: false,
            ..Default::default()
        },
    )
    .await
    .expect("server");
    let officer = officer(&server).await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let dk = client
        .generate_data_key(&key.key_id, &ctx(&[]))
        .await
        .expect("data key");
    db.drop_now().await.expect("drop database");
    let dropped = std::time::Instant::now();
    let opened = client
        .decrypt(&dk.blob, &ctx(&[]), None)
        .await
        .expect("decryption under a cached key");
    assert_eq!(opened.plaintext.as_slice(), dk.plaintext.as_slice());
    for err in [
        officer
            .create_key(sdk::NewKey::default())
            .await
            .map(|_| ())
            .expect_err("store gone"),
        officer
            .list_keys(10, None)
            .await
            .map(|_| ())
            .expect_err("store gone"),
        officer
            .rotate_key(&key.key_id)
            .await
            .map(|_| ())
            .expect_err("store gone"),
    ] {
        assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
        assert!(
            !err.to_string().contains("kms_test_"),
            "driver details leaked: {err}"
        );
    }
    // The window of reserved encryptions may still cover a few calls; past it, encryption
    // fails closed.
    let mut refused = None;
    for _ in 0..2000 {
        if let Err(e) = client.generate_data_key(&key.key_id, &ctx(&[])).await {
            refused = Some(e);
            break;
        }
    }
    assert_eq!(
        refused
            .expect("encryption must stop once it cannot be counted")
            .code(),
        Some(tonic::Code::Unavailable)
    );
    client.ping().await.expect("still serving");
    // Past the bound, a key change made through another replica could be missed: the cache
    // is not used, and without the store nothing decrypts.
    let bound = kms_server::service::KEY_CACHE_MAX_AGE + kms_server::service::KEY_SYNC_INTERVAL;
    tokio::time::sleep(bound.saturating_sub(dropped.elapsed())).await;
    assert_eq!(
        client
            .decrypt(&dk.blob, &ctx(&[]), None)
            .await
            .expect_err("the cache is too old to trust")
            .code(),
        Some(tonic::Code::Unavailable)
    );
    client.ping().await.expect("still serving");
}

/// With the audit trail on (as in production), a lost database stops every call, decryption
/// and Ping included: nothing is served that cannot be recorded (fail closed). The server
/// still answers each call at once with UNAVAILABLE, without driver details, and keeps
/// answering health checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_stops_every_audited_call() {
    let Some(db) = TestDb::new(StoreKind::Postgres).await.expect("db") else {
        return;
    };
    let server = TestServer::start(&db).await.expect("server");
    let officer = officer(&server).await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let dk = client
        .generate_data_key(&key.key_id, &ctx(&[]))
        .await
        .expect("data key");
    client
        .decrypt(&dk.blob, &ctx(&[]), None)
        .await
        .expect("the key is cached");
    db.drop_now().await.expect("drop database");
    for (what, result) in [
        (
            "create",
            officer.create_key(sdk::NewKey::default()).await.map(drop),
        ),
        (
            "describe",
            officer.describe_key(&key.key_id).await.map(drop),
        ),
        (
            "data key",
            client
                .generate_data_key(&key.key_id, &ctx(&[]))
                .await
                .map(drop),
        ),
        (
            "decrypt",
            client.decrypt(&dk.blob, &ctx(&[]), None).await.map(drop),
        ),
        ("ping", client.ping().await),
    ] {
        let err = result.expect_err(what);
        assert_eq!(
            err.code(),
            Some(tonic::Code::Unavailable),
            "{what}: {err:?}"
        );
        assert!(
            !err.to_string().contains("kms_test_"),
            "{what}: driver details leaked: {err}"
        );
    }
    // Health still answers, and reports NOT_SERVING (readiness) within its bound.
    let bound = kms_server::server::READINESS_INTERVAL * 2 + kms_server::server::READINESS_TIMEOUT;
    wait_for_health(
        &server,
        tonic_health::pb::health_check_response::ServingStatus::NotServing,
        bound,
    )
    .await;
}
