//! M-of-N recovery of the master keys: the full drill (keys, Synthea data encrypted, 3-of-5
//! ceremony, backup, token and database destroyed, restore into a new token with shares 1, 3
//! and 5, every ciphertext decrypts), the refusals along the way, re-share and rekey.
//!
//! Each test runs on tokens of its own: the ceremony logs the token's security officer in,
//! which logs the user out of every session of this process on that token.

use std::path::PathBuf;

use kms_cli::custodian::{self, Identity};
use proto::share::ShareEnvelope;
use sdk::recovery::SubmitShareRequest;
use sdk::{CachePolicy, Envelope, KmsClient};
use softhsm_test::{new_token, remove_token_files};

use crate::support::{on_both_stores, StoreKind, TestDb, TestServer};

const PASSPHRASE: &str = "correct horse battery staple";

/// A custodian: their client on the current server, principal and key pair.
pub(crate) struct Custodian {
    pub(crate) principal: String,
    pub(crate) identity: Identity,
    pub(crate) client: KmsClient,
}

/// Binds `count` new custodians on `server` and registers a key for each (or reuses the key
/// pairs in `dir` when they exist).
pub(crate) async fn custodians(
    server: &TestServer,
    dir: &std::path::Path,
    count: usize,
) -> Vec<Custodian> {
    let mut out = Vec::new();
    for i in 1..=count {
        let name = format!("keeper-{i}");
        let client = server
            .add_principal("custodian", &name)
            .await
            .expect("bind");
        let identity_path = dir.join(format!("{name}.identity.age"));
        if !identity_path.exists() {
            custodian::keygen(dir, &name, PASSPHRASE, Some(10)).expect("keygen");
        }
        let identity = custodian::load_identity(&identity_path, PASSPHRASE).expect("load");
        client
            .register_custodian_key(&identity.recipient())
            .await
            .expect("register");
        let principal = server.principal_of("custodian", &name);
        out.push(Custodian {
            principal,
            identity,
            client,
        });
    }
    out
}

/// A SQLite store, a folder for custodian key pairs, a token of its own and a server on them
/// (`so_pin`: whether the server knows the token's security officer PIN).
pub(crate) async fn own_server(so_pin: bool) -> (TestDb, tempfile::TempDir, String, TestServer) {
    let db = TestDb::new(StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let keys_dir = tempfile::tempdir().expect("dir");
    let token = new_token().expect("token");
    let server = TestServer::start_on_token_with(&db, &token, so_pin)
        .await
        .expect("server");
    (db, keys_dir, token, server)
}

pub(crate) fn principals(custodians: &[Custodian]) -> Vec<String> {
    custodians.iter().map(|c| c.principal.clone()).collect()
}

/// officer-1 proposes, officer-2 approves; returns the approval's result.
pub(crate) async fn approved(server: &TestServer, approval: sdk::governance::Approval) -> String {
    let done = server
        .client_as("officer-2")
        .await
        .expect("officer-2")
        .approve(&approval.approval_id)
        .await
        .expect("approve");
    assert_eq!(done.state, "executed", "{}: {}", done.kind, done.result);
    done.result
}

pub(crate) async fn init(server: &TestServer, threshold: u32, custodians: &[Custodian]) -> String {
    let officer = server.client_as("officer-1").await.expect("officer");
    let proposal = officer
        .propose_recovery_init(threshold, &principals(custodians), false)
        .await
        .expect("propose init");
    approved(server, proposal).await
}

/// Each custodian fetches, opens and confirms their share; returns the opened envelopes.
pub(crate) async fn confirm_all(custodians: &[Custodian]) -> Vec<ShareEnvelope> {
    let mut opened = Vec::new();
    for c in custodians {
        let sealed = c.client.get_recovery_share().await.expect("fetch share");
        let envelope = custodian::open_share(&c.identity, &sealed.sealed).expect("open share");
        assert_eq!(envelope.custodian, c.principal);
        assert_eq!(envelope.index, sealed.index);
        c.client
            .confirm_recovery_share(&envelope.ceremony_id, envelope.index, &envelope.commitment)
            .await
            .expect("confirm");
        opened.push(envelope);
    }
    opened
}

async fn backup(server: &TestServer) -> Vec<u8> {
    let officer = server.client_as("officer-1").await.expect("officer");
    let proposal = officer.propose_recovery_backup().await.expect("propose");
    let backup_id = approved(server, proposal).await;
    officer
        .get_recovery_backup(&backup_id)
        .await
        .expect("download backup")
}

pub(crate) fn submission(
    status: &sdk::recovery::RecoveryStatus,
    e: &ShareEnvelope,
) -> SubmitShareRequest {
    let session = status.session.as_ref().expect("open session");
    SubmitShareRequest {
        session_id: session.session_id.clone(),
        nonce: session.nonce.clone(),
        ceremony_id: e.ceremony_id.clone(),
        index: e.index,
        custodian: e.custodian.clone(),
        share: e.share_bytes().expect("share").to_vec(),
    }
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, sdk::Error>,
    code: tonic::Code,
    needle: &str,
) {
    match result {
        Err(sdk::Error::Rpc { code: c, message }) => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        other => panic!("expected {code:?} ({needle}), got {other:?}"),
    }
}

fn synthea_files() -> Vec<PathBuf> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/synthea/csv");
    let dir = if dir.exists() {
        dir
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthea/csv")
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("synthea sample")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no Synthea CSV files in {}",
        dir.display()
    );
    files
}

async fn drill(db: TestDb) {
    let kind = db.kind;
    let keys_dir = tempfile::tempdir().expect("dir");
    let token_a = new_token().expect("token");
    let server = TestServer::start_on_token(&db, &token_a)
        .await
        .expect("server");
    let five = custodians(&server, keys_dir.path(), 5).await;

    // Keys in use: two keys, one rotated, the Synthea sample encrypted under both.
    server.create_key_for_app("drill-a").await.expect("key a");
    server.create_key_for_app("drill-b").await.expect("key b");
    server
        .client_as("officer-1")
        .await
        .expect("officer")
        .rotate_key("drill-a")
        .await
        .expect("rotate");
    let app = Envelope::new(server.client().await.expect("app"), CachePolicy::disabled());
    let context = sdk::Context::from([("purpose".to_string(), "drill".to_string())]);
    let mut sealed_files = Vec::new();
    for (i, path) in synthea_files().into_iter().enumerate() {
        let plaintext = std::fs::read(&path).expect("read sample");
        let key = if i % 2 == 0 { "drill-a" } else { "drill-b" };
        let message = app
            .encrypt(key, &context, &plaintext)
            .await
            .expect("encrypt");
        sealed_files.push((path, plaintext, message));
    }

    // Ceremony: 3 of 5, every share confirmed, then closed.
    let ceremony_id = init(&server, 3, &five).await;
    let officer = server.client_as("officer-1").await.expect("officer");
    let status = officer.recovery_status().await.expect("status");
    assert_eq!(status.ceremony_id, ceremony_id);
    assert_eq!((status.threshold, status.share_count), (3, 5));
    assert!(status.shares.iter().all(|s| s.confirmed_at == 0));
    assert_refused(
        officer.close_recovery_ceremony(&ceremony_id).await,
        tonic::Code::FailedPrecondition,
        "confirmed",
    );
    let shares = confirm_all(&five).await;
    let status = officer.recovery_status().await.expect("status");
    assert!(status.shares.iter().all(|s| s.confirmed_at > 0));
    officer
        .close_recovery_ceremony(&ceremony_id)
        .await
        .expect("close");
    assert_refused(
        five[0].client.get_recovery_share().await,
        tonic::Code::NotFound,
        "sealed share",
    );

    // Backup: verified against the HSM; any edited byte is refused.
    let file = backup(&server).await;
    let verified = officer
        .verify_recovery_backup(file.clone())
        .await
        .expect("verify");
    assert_eq!(verified.ceremony_id, ceremony_id);
    assert_eq!((verified.keys, verified.key_versions), (2, 3));
    let text = String::from_utf8(file.clone()).expect("backup is text");
    assert!(!text.contains("\"share\""), "a backup carries no share");
    let wrapped_at = text.find("\"wrapped\": \"").expect("a wrapped key") + 15;
    for at in [30, 80, text.len() / 2, wrapped_at, file.len() - 3] {
        let mut edited = file.clone();
        edited[at] ^= 0x01;
        let refused = officer.verify_recovery_backup(edited).await;
        assert!(refused.is_err(), "edited byte {at} accepted");
    }

    // The HSM and the database are lost.
    server.stop().await.expect("stop");
    assert_eq!(remove_token_files(&token_a).expect("wipe"), 1);
    drop(db);

    // A new, empty token and store.
    let db = TestDb::new(kind).await.expect("db").expect("store");
    let token_b = new_token().expect("token");
    let server = TestServer::start_on_token(&db, &token_b)
        .await
        .expect("server");
    let five = custodians(&server, keys_dir.path(), 5).await;
    let officer = server.client_as("officer-1").await.expect("officer");
    assert_refused(
        officer.begin_restore(b"not a backup\n{}".to_vec()).await,
        tonic::Code::InvalidArgument,
        "backup",
    );
    let status = officer.begin_restore(file.clone()).await.expect("begin");
    let session = status.session.clone().expect("session");
    assert_eq!(session.purpose, "restore");
    assert_eq!(session.ceremony_id, ceremony_id);
    assert_refused(
        officer.begin_restore(file.clone()).await,
        tonic::Code::FailedPrecondition,
        "already open",
    );

    // Refusals, each attributed to its submitter.
    let mut flipped = submission(&status, &shares[0]);
    flipped.share[7] ^= 0x01;
    assert_refused(
        five[0].client.submit_share(flipped).await,
        tonic::Code::InvalidArgument,
        "authentication",
    );
    assert_refused(
        five[1]
            .client
            .submit_share(submission(&status, &shares[0]))
            .await,
        tonic::Code::PermissionDenied,
        "another custodian",
    );
    let mut other_ceremony = submission(&status, &shares[0]);
    other_ceremony.ceremony_id = uuid::Uuid::new_v4().to_string();
    assert_refused(
        five[0].client.submit_share(other_ceremony).await,
        tonic::Code::InvalidArgument,
        "another ceremony",
    );
    let progress = five[0]
        .client
        .submit_share(submission(&status, &shares[0]))
        .await
        .expect("share 1");
    assert_eq!(progress.session.as_ref().map(|s| s.accepted.len()), Some(1));
    assert_refused(
        five[0]
            .client
            .submit_share(submission(&status, &shares[0]))
            .await,
        tonic::Code::FailedPrecondition,
        "already submitted",
    );
    let rejected = officer
        .recovery_status()
        .await
        .expect("status")
        .session
        .expect("session")
        .rejected;
    let who: Vec<(&str, u32)> = rejected
        .iter()
        .map(|r| (r.principal.as_str(), r.index))
        .collect();
    assert_eq!(
        who,
        [
            (five[0].principal.as_str(), 1),
            (five[1].principal.as_str(), 1),
            (five[0].principal.as_str(), 1),
            (five[0].principal.as_str(), 1),
        ]
    );

    // Two shares are not enough; a cancel forgets them and changes the nonce.
    five[2]
        .client
        .submit_share(submission(&status, &shares[2]))
        .await
        .expect("share 3");
    let keys_now = officer.list_keys(100, None).await.expect("list keys");
    assert!(keys_now.keys.is_empty(), "nothing restored from two shares");
    let cancelled = officer
        .cancel_recovery_session(&session.session_id)
        .await
        .expect("cancel");
    let after = cancelled.session.clone().expect("session stays open");
    assert!(after.accepted.is_empty());
    assert_ne!(after.nonce, session.nonce);
    assert_refused(
        five[4]
            .client
            .submit_share(submission(&status, &shares[4]))
            .await,
        tonic::Code::FailedPrecondition,
        "nonce",
    );

    // Shares 1, 3 and 5 restore everything.
    for i in [0, 2] {
        five[i]
            .client
            .submit_share(submission(&cancelled, &shares[i]))
            .await
            .expect("share");
    }
    let done = five[4]
        .client
        .submit_share(submission(&cancelled, &shares[4]))
        .await
        .expect("third share completes");
    assert!(
        done.completed.contains("restored 2 keys (3 versions)"),
        "{}",
        done.completed
    );
    assert!(done.session.is_none());
    assert_eq!(done.ceremony_id, ceremony_id);

    // Grants are not part of a backup: the officers grant again, then every file decrypts.
    for key in ["drill-a", "drill-b"] {
        server.grant_app(key).await.expect("grant");
    }
    let app = Envelope::new(server.client().await.expect("app"), CachePolicy::disabled());
    for (path, plaintext, message) in &sealed_files {
        let opened = app
            .decrypt(&context, message)
            .await
            .unwrap_or_else(|e| panic!("{} does not decrypt: {e}", path.display()));
        assert_eq!(opened.as_slice(), plaintext.as_slice());
    }
    // The restored token can make the next backup.
    let again = backup(&server).await;
    officer
        .verify_recovery_backup(again)
        .await
        .expect("a backup of the restored token verifies");
    let trail = server
        .client_as("auditor-1")
        .await
        .expect("auditor")
        .verify_audit()
        .await
        .expect("verify audit");
    assert!(trail.intact, "{}", trail.problem);
    // Every share submission is on the record, refusals attributed to their submitter with
    // the reason, and no share bytes anywhere in the trail.
    let auditor = server.client_as("auditor-1").await.expect("auditor");
    let records = auditor
        .list_audit_records(proto::v1::ListAuditRecordsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("records")
        .records_json;
    let submissions: Vec<serde_json::Value> = records
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(r).expect("json"))
        .filter(|r| r["operation"] == "SubmitShare")
        .collect();
    assert_eq!(submissions.len(), 10, "every submission recorded");
    let refused: Vec<&serde_json::Value> = submissions
        .iter()
        .filter(|r| r["outcome"] != "ok")
        .collect();
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(refused
        .iter()
        .any(|r| r["principal"] == five[1].principal.as_str()
            && r["outcome"] == "denied"
            && r["detail"]["refused"]
                .as_str()
                .is_some_and(|why| why.contains("another custodian"))));
    assert!(submissions.iter().all(|r| r["severity"] == "high"));
    let of_this_ceremony = submissions
        .iter()
        .filter(|r| r["detail"]["ceremony_id"] == ceremony_id.as_str())
        .count();
    assert_eq!(
        of_this_ceremony, 9,
        "all but the foreign-ceremony share name it"
    );
    for envelope in &shares {
        let secret = envelope.share.as_str();
        assert!(
            !records.iter().any(|r| r.contains(secret)),
            "a share is in the audit trail"
        );
    }
    server.stop().await.expect("stop");
    let _ = remove_token_files(&token_b);
}

on_both_stores!(full_drill_restores_every_key_into_a_new_token, drill);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremonies_refuse_bad_shapes_and_roles() {
    let (_db, keys_dir, token, server) = own_server(true).await;
    let three = custodians(&server, keys_dir.path(), 3).await;
    let officer = server.client_as("officer-1").await.expect("officer");
    let names = principals(&three);
    for (m, custodians, needle) in [
        (1, names.clone(), "at least 2"),
        (0, names.clone(), "at least 2"),
        (4, names.clone(), "exceed"),
        (
            2,
            (0..256)
                .map(|i| format!("spiffe://hospital.test/custodian/c{i}"))
                .collect(),
            "255",
        ),
        (2, vec![names[0].clone(), names[0].clone()], "named twice"),
        (
            2,
            vec![names[0].clone(), server.principal("officer-2")],
            "custodian role",
        ),
    ] {
        assert_refused(
            officer.propose_recovery_init(m, &custodians, false).await,
            tonic::Code::InvalidArgument,
            needle,
        );
    }
    // A custodian who has not registered a key.
    server
        .add_principal("custodian", "no-key")
        .await
        .expect("bind");
    assert_refused(
        officer
            .propose_recovery_init(
                2,
                &[names[0].clone(), server.principal_of("custodian", "no-key")],
                false,
            )
            .await,
        tonic::Code::InvalidArgument,
        "registered",
    );
    // Roles: custodians and apps cannot propose; officers cannot submit shares.
    assert_refused(
        three[0]
            .client
            .propose_recovery_init(2, &names, false)
            .await,
        tonic::Code::PermissionDenied,
        "",
    );
    assert_refused(
        server.client().await.expect("app").recovery_status().await,
        tonic::Code::PermissionDenied,
        "",
    );
    assert_refused(
        officer.register_custodian_key("age1notarecipient").await,
        tonic::Code::PermissionDenied,
        "",
    );
    assert_refused(
        three[0]
            .client
            .register_custodian_key("age1notarecipient")
            .await,
        tonic::Code::InvalidArgument,
        "recipient",
    );
    // Nothing to back up or re-share before an init; a second init needs rekey.
    assert_refused(
        officer.propose_recovery_backup().await,
        tonic::Code::FailedPrecondition,
        "no recovery domain",
    );
    assert_refused(
        officer.propose_recovery_reshare(2, &names).await,
        tonic::Code::FailedPrecondition,
        "no recovery domain",
    );
    init(&server, 2, &three).await;
    assert_refused(
        officer.propose_recovery_init(2, &names, false).await,
        tonic::Code::FailedPrecondition,
        "rekey",
    );
    // Restore refuses a token and store that are in use.
    let file = backup(&server).await;
    assert_refused(
        officer.begin_restore(file).await,
        tonic::Code::FailedPrecondition,
        "empty",
    );
    // A custodian confirming someone else's share is denied.
    let sealed = three[0].client.get_recovery_share().await.expect("fetch");
    let envelope = custodian::open_share(&three[0].identity, &sealed.sealed).expect("open");
    assert_refused(
        three[1]
            .client
            .confirm_recovery_share(&envelope.ceremony_id, envelope.index, &envelope.commitment)
            .await,
        tonic::Code::PermissionDenied,
        "another custodian",
    );
    server.stop().await.expect("stop");
    let _ = remove_token_files(&token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshare_moves_the_key_to_new_custodians_and_old_shares_stop_working() {
    let (_db, keys_dir, token, server) = own_server(true).await;
    let all = custodians(&server, keys_dir.path(), 5).await;
    let (old, new) = all.split_at(3);
    let officer = server.client_as("officer-1").await.expect("officer");
    server.create_key_for_app("reshare").await.expect("key");
    let first = init(&server, 2, old).await;
    let old_shares = confirm_all(old).await;
    let kcv = officer.recovery_status().await.expect("status").kcv;

    // Re-share to the two new custodians, 2 of 2, with two current shares.
    let proposal = officer
        .propose_recovery_reshare(2, &principals(new))
        .await
        .expect("propose reshare");
    approved(&server, proposal).await;
    let status = officer.recovery_status().await.expect("status");
    assert_eq!(
        status.session.as_ref().map(|s| s.purpose.as_str()),
        Some("reshare")
    );
    old[0]
        .client
        .submit_share(submission(&status, &old_shares[0]))
        .await
        .expect("share 1");
    let done = old[1]
        .client
        .submit_share(submission(&status, &old_shares[1]))
        .await
        .expect("share 2 completes");
    assert!(done.completed.contains("re-shared"), "{}", done.completed);
    assert_ne!(done.ceremony_id, first);
    assert_eq!(done.kcv, kcv, "same recovery key");
    assert_eq!((done.threshold, done.share_count), (2, 2));
    let new_shares = confirm_all(new).await;
    assert!(old[2].client.get_recovery_share().await.is_err());

    // Old shares are refused by the next session, new ones work.
    let proposal = officer
        .propose_recovery_reshare(2, &principals(new))
        .await
        .expect("propose");
    approved(&server, proposal).await;
    let status = officer.recovery_status().await.expect("status");
    assert_refused(
        old[2]
            .client
            .submit_share(submission(&status, &old_shares[2]))
            .await,
        tonic::Code::InvalidArgument,
        "another ceremony",
    );
    new[0]
        .client
        .submit_share(submission(&status, &new_shares[0]))
        .await
        .expect("new share accepted");
    let session = status.session.expect("session").session_id;
    officer
        .cancel_recovery_session(&session)
        .await
        .expect("cancel");

    // A backup made before a rekey no longer verifies: the recovery key changed.
    let before = backup(&server).await;
    let proposal = officer
        .propose_recovery_init(2, &principals(old), true)
        .await
        .expect("propose rekey");
    assert_refused(
        officer
            .propose_recovery_init(2, &principals(old), false)
            .await,
        tonic::Code::FailedPrecondition,
        "rekey",
    );
    approved(&server, proposal).await;
    let rekeyed = officer.recovery_status().await.expect("status");
    assert_ne!(rekeyed.kcv, kcv);
    assert_refused(
        officer.verify_recovery_backup(before).await,
        tonic::Code::InvalidArgument,
        "another recovery key",
    );
    officer
        .verify_recovery_backup(backup(&server).await)
        .await
        .expect("a new backup verifies");
    server.stop().await.expect("stop");
    let _ = remove_token_files(&token);
}

/// A backup outgrows one request message (64 KiB) with a few hundred key versions: it travels
/// in chunks both ways, verifies, and restores. A rekey gives a new recovery key: the old
/// backup and the old shares stop working, the new ones restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_replaces_the_recovery_key_and_a_large_backup_restores() {
    let (db, keys_dir, token, server) = own_server(true).await;
    let two = custodians(&server, keys_dir.path(), 2).await;
    let officer = server.client_as("officer-1").await.expect("officer");
    const KEYS: usize = 40;
    const ROTATIONS: usize = 7;
    for i in 0..KEYS {
        let alias = format!("bulk-{i}");
        officer
            .create_key(sdk::NewKey {
                alias: Some(alias.clone()),
                ..sdk::NewKey::default()
            })
            .await
            .expect("create");
        for _ in 0..ROTATIONS {
            officer.rotate_key(&alias).await.expect("rotate");
        }
    }
    let first = init(&server, 2, &two).await;
    let old_shares = confirm_all(&two).await;
    let old_kcv = officer.recovery_status().await.expect("status").kcv;
    let old_backup = backup(&server).await;
    assert!(
        old_backup.len() > kms_server::server::MAX_REQUEST_BYTES,
        "the backup ({} bytes) should outgrow one request message",
        old_backup.len()
    );

    // Rekey: a new recovery key, new shares.
    let proposal = officer
        .propose_recovery_init(2, &principals(&two), true)
        .await
        .expect("propose rekey");
    let second = approved(&server, proposal).await;
    assert_ne!(second, first);
    let status = officer.recovery_status().await.expect("status");
    assert_ne!(status.kcv, old_kcv, "a rekey makes a new recovery key");
    assert_refused(
        officer.verify_recovery_backup(old_backup.clone()).await,
        tonic::Code::InvalidArgument,
        "another recovery key",
    );
    let new_shares = confirm_all(&two).await;
    officer
        .close_recovery_ceremony(&second)
        .await
        .expect("close");
    let new_backup = backup(&server).await;
    let checked = officer
        .verify_recovery_backup(new_backup.clone())
        .await
        .expect("verify");
    assert_eq!(checked.key_versions as usize, KEYS * (ROTATIONS + 1));

    // Lose everything; restore the large backup with the new shares (the old ones are refused).
    server.stop().await.expect("stop");
    assert_eq!(remove_token_files(&token).expect("wipe"), 1);
    drop(db);
    let db = TestDb::new(StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let token = new_token().expect("token");
    let server = TestServer::start_on_token(&db, &token)
        .await
        .expect("server");
    let two = custodians(&server, keys_dir.path(), 2).await;
    let officer = server.client_as("officer-1").await.expect("officer");
    // Edited backups: one flipped hex digit of the header's MAC (the file still parses, so the
    // shares rebuild the key and the MAC check refuses), and one flipped byte in the middle of
    // the body (refused when opened if it no longer parses, else by the MAC). Either way
    // nothing is written to the token or the store.
    let mut edited_mac = new_backup.clone();
    let mac_at = "KMS-RECOVERY-BACKUP v1 mac=".len();
    edited_mac[mac_at] = if edited_mac[mac_at] == b'0' {
        b'1'
    } else {
        b'0'
    };
    let mut edited_body = new_backup.clone();
    let body_at = edited_body.len() / 2;
    edited_body[body_at] ^= 0x01;
    for (edited, must_open) in [(edited_mac, true), (edited_body, false)] {
        let status = match officer.begin_restore(edited).await {
            Ok(status) => status,
            Err(e) if !must_open => {
                assert!(
                    matches!(
                        &e,
                        sdk::Error::Rpc {
                            code: tonic::Code::InvalidArgument,
                            ..
                        }
                    ),
                    "{e:?}"
                );
                continue;
            }
            Err(e) => panic!("begin: {e:?}"),
        };
        two[0]
            .client
            .submit_share(submission(&status, &new_shares[0]))
            .await
            .expect("share 1");
        assert_refused(
            two[1]
                .client
                .submit_share(submission(&status, &new_shares[1]))
                .await,
            tonic::Code::InvalidArgument,
            "altered",
        );
        let listed = officer.list_keys(1000, None).await.expect("list");
        assert!(
            listed.keys.is_empty(),
            "nothing restored from an edited backup"
        );
    }
    let status = officer.begin_restore(new_backup).await.expect("begin");
    assert_refused(
        two[0]
            .client
            .submit_share(submission(&status, &old_shares[0]))
            .await,
        tonic::Code::InvalidArgument,
        "another ceremony",
    );
    two[0]
        .client
        .submit_share(submission(&status, &new_shares[0]))
        .await
        .expect("share 1");
    let done = two[1]
        .client
        .submit_share(submission(&status, &new_shares[1]))
        .await
        .expect("share 2 completes");
    assert!(
        done.completed.contains(&format!(
            "restored {KEYS} keys ({} versions)",
            KEYS * (ROTATIONS + 1)
        )),
        "{}",
        done.completed
    );
    let listed = officer.list_keys(1000, None).await.expect("list");
    assert_eq!(listed.keys.len(), KEYS);
    let described = officer.describe_key("bulk-7").await.expect("describe");
    assert_eq!(described.primary_version as usize, ROTATIONS + 1);
    server.stop().await.expect("stop");
    let _ = remove_token_files(&token);
}

/// Without the token's security officer PIN the server cannot mark a recovery key trusted:
/// ceremonies are refused up front, with the setting to fix named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_officer_pin_ceremonies_are_refused() {
    let (_db, keys_dir, token, server) = own_server(false).await;
    let two = custodians(&server, keys_dir.path(), 2).await;
    let officer = server.client_as("officer-1").await.expect("officer");
    assert_refused(
        officer
            .propose_recovery_init(2, &principals(&two), false)
            .await,
        tonic::Code::FailedPrecondition,
        "hsm.so_pin_file",
    );
    server.stop().await.expect("stop");
    let _ = remove_token_files(&token);
}
