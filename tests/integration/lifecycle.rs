//! Key versions, rotation, retirement by `min_decryption_version`, enable/disable — on both
//! stores, with the HSM objects checked in the token.

use cryptoki::object::Attribute;

use crate::support::*;

fn assert_code<T>(result: Result<T, sdk::Error>, code: tonic::Code, message: &str, what: &str) {
    match result {
        Ok(_) => panic!("{what}: accepted"),
        Err(sdk::Error::Rpc {
            code: c,
            message: m,
        }) if c == code && m == message => {}
        Err(other) => panic!("{what}: expected {code:?} {message:?}, got {other:?}"),
    }
}

/// How many objects in the test token carry the label of `key_id` version `version`.
fn objects_labelled(key_id: &str, version: u32) -> usize {
    let session = softhsm_test::user_session().expect("session");
    let label = format!("kms:{key_id}:v{version}").into_bytes();
    session
        .find_objects(&[Attribute::Label(label)])
        .expect("find")
        .len()
}

async fn rotation_and_retirement(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    // The officer manages the key; the app (with a grant) uses it.
    let officer = officer(&server).await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("rotating").await.expect("key");
    let context = ctx(&[("record", "lab")]);
    let mut blobs = vec![
        client
            .encrypt("rotating", b"v1 data", &context)
            .await
            .expect("v1")
            .blob,
    ];
    for expected in 2..=3u32 {
        let rotated = officer.rotate_key("rotating").await.expect("rotate");
        assert_eq!(rotated.primary_version, expected);
        assert_eq!(
            objects_labelled(&key.key_id, expected),
            1,
            "one HSM object for version {expected}"
        );
        let sealed = client
            .encrypt("rotating", format!("v{expected} data").as_bytes(), &context)
            .await
            .expect("encrypt");
        assert_eq!(
            sealed.key_version, expected,
            "new data uses the primary version"
        );
        blobs.push(sealed.blob);
    }
    let described = officer.describe_key("rotating").await.expect("describe");
    let states: Vec<_> = described
        .versions
        .iter()
        .map(|v| (v.version, v.state.as_str()))
        .collect();
    assert_eq!(states, [(1, "enabled"), (2, "enabled"), (3, "primary")]);
    for (i, blob) in blobs.iter().enumerate() {
        let opened = client
            .decrypt(blob, &context, None)
            .await
            .expect("every version decrypts");
        assert_eq!(
            opened.plaintext.as_slice(),
            format!("v{} data", i + 1).as_bytes()
        );
        assert_eq!(opened.key_version, i as u32 + 1);
    }

    // Rewrap version 1 onto the primary before retiring it.
    let moved = client
        .re_encrypt(&blobs[0], &context, "rotating", &context)
        .await
        .expect("rewrap");
    assert_eq!(moved.key_version, 3);

    let retired = officer
        .set_min_decryption_version("rotating", 3)
        .await
        .expect("retire 1 and 2");
    assert_eq!(retired.min_decryption_version, 3);
    assert_eq!(retired.versions[0].state, "retired");
    for blob in &blobs[..2] {
        assert_code(
            client.decrypt(blob, &context, None).await,
            tonic::Code::FailedPrecondition,
            "key version retired",
            "retired decrypt",
        );
        assert_code(
            client
                .re_encrypt(blob, &context, "rotating", &context)
                .await,
            tonic::Code::FailedPrecondition,
            "key version retired",
            "retired re-encrypt",
        );
    }
    assert_eq!(
        client
            .decrypt(&moved.blob, &context, None)
            .await
            .expect("rewrapped")
            .plaintext
            .as_slice(),
        b"v1 data"
    );
    // A tampered blob of a retired version is still the generic error: the tag is checked
    // only for live versions, and a flipped tag byte is never "retired".
    let mut tampered = blobs[2].clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_invalid_ciphertext(
        client.decrypt(&tampered, &context, None).await,
        "tampered primary blob",
    );

    for bad in [0, 4] {
        let err = officer
            .set_min_decryption_version("rotating", bad)
            .await
            .expect_err("out of range");
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{bad}");
    }
    officer
        .set_min_decryption_version("rotating", 1)
        .await
        .expect("lower again: versions still exist");
    assert!(client.decrypt(&blobs[0], &context, None).await.is_ok());
    server.stop().await.expect("stop");

    // Versions, the primary and the minimum (and the app's grant) survive a restart.
    let server = TestServer::start(&db).await.expect("restart");
    let client = server.client().await.expect("client");
    let again = crate::support::officer(&server)
        .await
        .describe_key(&key.key_id)
        .await
        .expect("describe");
    assert_eq!(
        (
            again.primary_version,
            again.min_decryption_version,
            again.versions.len()
        ),
        (3, 1, 3)
    );
    for blob in &blobs {
        client
            .decrypt(blob, &context, None)
            .await
            .expect("after restart");
    }
    server.stop().await.expect("stop");
}
on_both_stores!(rotation_and_retirement_on, rotation_and_retirement);

async fn disable_and_enable(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let officer = officer(&server).await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let other = server.create_key_for_app("").await.expect("other");
    let context = ctx(&[]);
    let blob = client
        .encrypt(&key.key_id, b"kept", &context)
        .await
        .expect("encrypt")
        .blob;
    let other_blob = client
        .encrypt(&other.key_id, b"other", &context)
        .await
        .expect("encrypt")
        .blob;

    let disabled = officer.disable_key(&key.key_id).await.expect("disable");
    assert_eq!(disabled.state, "disabled");
    let refused = (tonic::Code::FailedPrecondition, "key is disabled");
    assert_code(
        client.encrypt(&key.key_id, b"x", &context).await,
        refused.0,
        refused.1,
        "encrypt",
    );
    assert_code(
        client.generate_data_key(&key.key_id, &context).await,
        refused.0,
        refused.1,
        "data key",
    );
    assert_code(
        client.decrypt(&blob, &context, None).await,
        refused.0,
        refused.1,
        "decrypt",
    );
    assert_code(
        client
            .re_encrypt(&blob, &context, &other.key_id, &context)
            .await,
        refused.0,
        refused.1,
        "re-encrypt from",
    );
    assert_code(
        client
            .re_encrypt(&other_blob, &context, &key.key_id, &context)
            .await,
        refused.0,
        refused.1,
        "re-encrypt to",
    );
    assert_code(
        officer.rotate_key(&key.key_id).await,
        refused.0,
        refused.1,
        "rotate",
    );
    assert_eq!(
        officer
            .describe_key(&key.key_id)
            .await
            .expect("describable")
            .state,
        "disabled"
    );

    assert_eq!(
        officer.enable_key(&key.key_id).await.expect("enable").state,
        "enabled"
    );
    assert_eq!(
        client
            .decrypt(&blob, &context, None)
            .await
            .expect("decrypt again")
            .plaintext
            .as_slice(),
        b"kept"
    );
    let err = officer
        .disable_key(&uuid::Uuid::new_v4().to_string())
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    server.stop().await.expect("stop");
}
on_both_stores!(disable_and_enable_on, disable_and_enable);

/// Concurrent on-demand rotations never leave a gap, a duplicate version or a stray HSM object:
/// each conditional update lets exactly one rotation from a given version through, and the
/// losers destroy the objects they generated.
async fn concurrent_rotations_stay_consistent(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let officer = officer(&server).await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (c, id) = (officer.clone(), key.key_id.clone());
            tokio::spawn(async move { c.rotate_key(&id).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("rotate");
    }
    let described = officer.describe_key(&key.key_id).await.expect("describe");
    let versions: Vec<u32> = described.versions.iter().map(|v| v.version).collect();
    assert_eq!(
        versions,
        (1..=described.primary_version).collect::<Vec<_>>(),
        "contiguous versions"
    );
    assert!(described.primary_version >= 2);
    for v in 1..=described.primary_version {
        assert_eq!(
            objects_labelled(&key.key_id, v),
            1,
            "exactly one HSM object for version {v}"
        );
    }
    client
        .generate_data_key(&key.key_id, &ctx(&[]))
        .await
        .expect("usable");
    server.stop().await.expect("stop");
}
on_both_stores!(
    concurrent_rotations_on,
    concurrent_rotations_stay_consistent
);

/// A rotation whose version the store refuses (a database error, not a lost connection: the
/// store answers and certainly holds no such version) leaves no HSM object behind; once the
/// store accepts versions again the next rotation makes exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_store_refused_leaves_no_hsm_object() {
    use sqlx::Connection as _;
    let db = TestDb::new(StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let server = TestServer::start(&db).await.expect("server");
    let officer = officer(&server).await;
    let key = server.create_key_for_app("").await.expect("key");
    sqlx::any::install_default_drivers();
    let mut sql = sqlx::AnyConnection::connect(&db.url).await.expect("sql");
    sqlx::query(
        "CREATE TRIGGER refuse_versions BEFORE INSERT ON kms_key_versions \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(&mut sql)
    .await
    .expect("trigger");
    match officer.rotate_key(&key.key_id).await {
        Err(sdk::Error::Rpc {
            code: tonic::Code::Unavailable,
            ..
        }) => {}
        other => panic!("rotation into a refusing store: {other:?}"),
    }
    assert_eq!(
        objects_labelled(&key.key_id, 2),
        0,
        "abandoned version destroyed"
    );
    let described = officer.describe_key(&key.key_id).await.expect("describe");
    assert_eq!(described.primary_version, 1);
    sqlx::query("DROP TRIGGER refuse_versions")
        .execute(&mut sql)
        .await
        .expect("drop trigger");
    let rotated = officer.rotate_key(&key.key_id).await.expect("rotate");
    assert_eq!(rotated.primary_version, 2);
    assert_eq!(objects_labelled(&key.key_id, 2), 1);
    server.stop().await.expect("stop");
}

/// Scheduled deletion on a moved clock: refused crypto while pending, cancellable, and after
/// the waiting period every HSM object is destroyed (looked for again), the data becomes
/// unreadable, and the key stays describable as a tombstone.
async fn scheduled_deletion_destroys_the_key(db: TestDb) {
    let clock = softhsm_test::ManualClock::new(1_800_000_000);
    let (server, service) = TestServer::start_custom(
        &db,
        clock.clone(),
        kms_server::config::RotationParams::default(),
    )
    .await
    .expect("server");
    let officer = officer(&server).await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("doomed").await.expect("key");
    officer.rotate_key("doomed").await.expect("version 2");
    let context = ctx(&[]);
    let envelope = sdk::Envelope::new(client.clone(), sdk::CachePolicy::disabled());
    let message = envelope
        .encrypt("doomed", &context, b"file body")
        .await
        .expect("envelope");
    let blob = client
        .encrypt("doomed", b"soon gone", &context)
        .await
        .expect("encrypt")
        .blob;

    for days in [1, 6, 366] {
        let err = officer
            .schedule_key_deletion("doomed", days)
            .await
            .expect_err("window out of range");
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{days}");
    }
    // Scheduling is a proposal: until a second officer approves, the key stays in use.
    let proposal = officer
        .schedule_key_deletion("doomed", 7)
        .await
        .expect("propose");
    let duplicate = officer
        .schedule_key_deletion("doomed", 30)
        .await
        .expect("a second proposal");
    assert_eq!(
        (proposal.kind.as_str(), proposal.state.as_str()),
        ("key-deletion", "pending")
    );
    assert_eq!(
        officer
            .describe_key("doomed")
            .await
            .expect("describe")
            .state,
        "enabled"
    );
    assert!(client.decrypt(&blob, &context, None).await.is_ok());
    let approved = server
        .client_as("officer-2")
        .await
        .expect("approver")
        .approve(&proposal.approval_id)
        .await
        .expect("approve");
    assert_eq!(approved.state, "executed", "{approved:?}");
    assert_eq!(
        approved.result,
        format!("deletion due at {}", 1_800_000_000 + 7 * 86_400)
    );
    let pending = officer.describe_key("doomed").await.expect("describe");
    assert_eq!(pending.state, "pending_deletion");
    assert_eq!(pending.deletion_due_at, Some(1_800_000_000 + 7 * 86_400));
    // The second proposal can no longer run: it fails with the reason, the due date stays.
    let second = server
        .client_as("officer-2")
        .await
        .expect("approver")
        .approve(&duplicate.approval_id)
        .await
        .expect("approve the second");
    assert_eq!(
        (second.state.as_str(), second.result.as_str()),
        ("failed", "key is pending deletion"),
        "{second:?}"
    );
    assert_eq!(
        officer
            .describe_key("doomed")
            .await
            .expect("describe")
            .deletion_due_at,
        Some(1_800_000_000 + 7 * 86_400)
    );
    let refused = (tonic::Code::FailedPrecondition, "key is pending deletion");
    assert_code(
        client.decrypt(&blob, &context, None).await,
        refused.0,
        refused.1,
        "decrypt while pending",
    );
    assert_code(
        client.generate_data_key("doomed", &context).await,
        refused.0,
        refused.1,
        "data key while pending",
    );
    assert_code(
        officer.enable_key("doomed").await,
        refused.0,
        refused.1,
        "enable while pending",
    );

    assert_eq!(
        officer
            .cancel_key_deletion("doomed")
            .await
            .expect("cancel")
            .state,
        "disabled"
    );
    officer
        .enable_key("doomed")
        .await
        .expect("enable after cancel");
    assert!(client.decrypt(&blob, &context, None).await.is_ok());
    let again = schedule_deletion_approved(&server, "doomed", 7).await;
    assert_eq!(again.state, "pending_deletion");

    clock.advance(6 * 86_400);
    assert!(
        service.destroy_due().await.expect("check").is_empty(),
        "not due yet"
    );
    assert_eq!(
        objects_labelled(&key.key_id, 1) + objects_labelled(&key.key_id, 2),
        2
    );
    clock.advance(86_400);
    // Due: no longer cancellable (the scheduler of another replica may be destroying its HSM
    // objects), but not destroyed before the clock-skew margin has passed either.
    assert_code(
        officer.cancel_key_deletion("doomed").await,
        tonic::Code::FailedPrecondition,
        "deletion is due: it can no longer be cancelled",
        "cancel once due",
    );
    assert!(
        service.destroy_due().await.expect("check").is_empty(),
        "within the skew margin"
    );
    clock.advance(kms_server::service::DELETION_SKEW_SECS);
    assert_eq!(
        service.destroy_due().await.expect("check"),
        vec![uuid::Uuid::parse_str(&key.key_id).expect("uuid")]
    );
    assert!(
        service.destroy_due().await.expect("check again").is_empty(),
        "destroyed once"
    );
    for version in 1..=3 {
        assert_eq!(
            objects_labelled(&key.key_id, version),
            0,
            "HSM object of version {version} still present"
        );
    }

    let gone = (tonic::Code::NotFound, "key destroyed");
    assert_code(
        client.decrypt(&blob, &context, None).await,
        gone.0,
        gone.1,
        "decrypt after destruction",
    );
    assert_code(
        client.generate_data_key("doomed", &context).await,
        gone.0,
        gone.1,
        "data key after destruction",
    );
    assert_code(
        officer.enable_key("doomed").await,
        gone.0,
        gone.1,
        "enable after destruction",
    );
    assert_code(
        officer.cancel_key_deletion("doomed").await,
        gone.0,
        gone.1,
        "cancel after destruction",
    );
    // Regression: the SDK reported a destroyed key as a damaged message.
    match envelope.decrypt(&context, &message).await {
        Err(sdk::Error::Rpc {
            code: tonic::Code::NotFound,
            message,
        }) => assert_eq!(message, "key destroyed"),
        other => panic!(
            "expected NOT_FOUND key destroyed, got {:?}",
            other.map(|_| ())
        ),
    }
    let tombstone = officer
        .describe_key(&key.key_id)
        .await
        .expect("still describable");
    assert_eq!(tombstone.state, "destroyed");
    assert_eq!(tombstone.versions.len(), 2);
    assert!(
        tombstone.versions.iter().all(|v| v.state == "destroyed"),
        "{:?}",
        tombstone.versions
    );
    server.stop().await.expect("stop");
}
on_both_stores!(scheduled_deletion_on, scheduled_deletion_destroys_the_key);
