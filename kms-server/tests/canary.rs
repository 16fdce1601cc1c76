//! The canary test: the real `kms-server` binary, debug logging on, serves every data-bearing
//! RPC with recognisable canary strings as context values, plaintexts, identifiers, and with a
//! known PIN and fresh data keys; then the server's log, the database files (SQLite main file,
//! WAL and shared memory) and the exported audit trail are searched for each secret in raw,
//! hex and base64 form. Expected: zero hits.
//!
//! Lives next to `kill.rs` because it needs this package's binary.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sdk::governance::ListAuditRecordsRequest;
use sdk::{GrantSpec, KmsClient, NewKey, ReEncryptItem};
use softhsm_test::TestPki;

const CTX: &str = "CANARY-ctx-7f3a9e21";
const PLAIN: &str = "CANARY-plain-51c2e0d4 allergy penicillin";
const IDENT: &str = "CANARY-mrn-99887766";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The forms a secret could leak in: raw, lower and upper hex, base64 (standard and without
/// padding, which is also the start of the URL-safe form for these inputs).
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let hex_lower: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = base64(secret);
    let mut forms = vec![
        hex_lower.as_bytes().to_vec(),
        hex_lower.to_uppercase().into_bytes(),
        b64.trim_end_matches('=').as_bytes().to_vec(),
    ];
    // Raw bytes of a random key may be short-lived coincidences only if very short; ours are
    // 32 bytes or recognisable strings.
    forms.push(secret.to_vec());
    forms
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    needle.len() <= haystack.len() && haystack.windows(needle.len()).any(|w| w == needle)
}

async fn connect(port: u16, pki: &TestPki, name: &str) -> KmsClient {
    let tls = pki.client_tls(name).expect("client TLS");
    KmsClient::connect(&format!("https://127.0.0.1:{port}"), &tls)
        .await
        .expect("connect")
}

async fn approve_as_officer_2(port: u16, pki: &TestPki, approval_id: &str) {
    let done = connect(port, pki, "officer-2")
        .await
        .approve(approval_id)
        .await
        .expect("approve");
    assert_eq!(done.state, "executed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_the_database_or_the_audit_trail() {
    let dir = tempfile::tempdir().expect("dir");
    let db_path = dir.path().join("kms.db");
    let log_path = dir.path().join("server.log");
    let pki = TestPki::generate().expect("pki");
    let tls = pki.server_params();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_kms-server"))
        .env_clear()
        .env("SOFTHSM2_CONF", softhsm_test::softhsm_conf())
        .env("KMS_LISTEN", format!("127.0.0.1:{port}"))
        .env("KMS_HSM_MODULE", softhsm_test::module_path())
        .env("KMS_HSM_TOKEN_LABEL", &softhsm_test::token().label)
        .env("KMS_HSM_PIN", softhsm_test::USER_PIN)
        .env("KMS_STORE_URL", format!("sqlite://{}", db_path.display()))
        .env("KMS_TLS_CA_CERT", &tls.ca_cert)
        .env("KMS_TLS_CERT", &tls.cert)
        .env("KMS_TLS_KEY", &tls.key)
        .env(
            "KMS_BOOTSTRAP_SECURITY_OFFICERS",
            format!(
                "{},{}",
                pki.principal("officer-1"),
                pki.principal("officer-2")
            ),
        )
        .env("KMS_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("spawn kms-server");
    let mut server = Server(child);
    let officer = {
        let mut ready = None;
        for _ in 0..200 {
            let tls = pki.client_tls("officer-1").expect("tls");
            if let Ok(client) = KmsClient::connect(&format!("https://127.0.0.1:{port}"), &tls).await
            {
                if client.ping().await.is_ok() {
                    ready = Some(client);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ready.expect("kms-server did not start")
    };
    for (name, role) in [("app-1", "app"), ("auditor-1", "auditor")] {
        let a = officer
            .propose_role_binding(&pki.principal(name), role, false)
            .await
            .expect("bind");
        approve_as_officer_2(port, &pki, &a.approval_id).await;
    }
    let app = connect(port, &pki, "app-1").await;
    let auditor = connect(port, &pki, "auditor-1").await;

    let key = officer.create_key(NewKey::default()).await.expect("key");
    let other = officer.create_key(NewKey::default()).await.expect("key");
    for k in [&key.key_id, &other.key_id] {
        let a = officer
            .propose_grant(GrantSpec {
                principal: pki.principal("app-1"),
                key: k.clone(),
                operations: ["generate-data-key", "encrypt", "decrypt", "re-encrypt"]
                    .map(String::from)
                    .to_vec(),
                ..GrantSpec::default()
            })
            .await
            .expect("grant");
        approve_as_officer_2(port, &pki, &a.approval_id).await;
    }

    let context: BTreeMap<String, String> = [
        ("patient".to_string(), CTX.to_string()),
        ("mrn".to_string(), IDENT.to_string()),
    ]
    .into();
    let mut data_keys: Vec<Vec<u8>> = Vec::new();
    for _ in 0..3 {
        let dk = app
            .generate_data_key(&key.key_id, &context)
            .await
            .expect("gdk");
        data_keys.push(dk.plaintext.to_vec());
        let opened = app
            .decrypt(&dk.blob, &context, None)
            .await
            .expect("decrypt");
        data_keys.push(opened.plaintext.to_vec());
    }
    app.generate_data_key_without_plaintext(&key.key_id, &context)
        .await
        .expect("gdk without plaintext");
    let sealed = app
        .encrypt(&key.key_id, PLAIN.as_bytes(), &context)
        .await
        .expect("encrypt");
    let opened = app
        .decrypt(&sealed.blob, &context, None)
        .await
        .expect("decrypt");
    assert_eq!(&opened.plaintext[..], PLAIN.as_bytes());
    let moved = app
        .re_encrypt(&sealed.blob, &context, &other.key_id, &context)
        .await
        .expect("re-encrypt");
    app.batch_decrypt(&[
        (moved.blob.clone(), context.clone()),
        (sealed.blob.clone(), context.clone()),
    ])
    .await
    .expect("batch decrypt");
    app.batch_re_encrypt(&[ReEncryptItem {
        blob: moved.blob.clone(),
        source_context: context.clone(),
        destination_key: key.key_id.clone(),
        destination_context: context.clone(),
    }])
    .await
    .expect("batch re-encrypt");
    // A denied call and a failed call carry the canaries too.
    assert!(officer.decrypt(&sealed.blob, &context, None).await.is_err());
    let mut tampered = sealed.blob.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(app.decrypt(&tampered, &context, None).await.is_err());
    let wrong: BTreeMap<String, String> = [("patient".to_string(), format!("{CTX}-x"))].into();
    assert!(app.decrypt(&sealed.blob, &wrong, None).await.is_err());
    // The auditor looks an identifier up by its keyed hash.
    let hash = auditor.hash_identifier(IDENT).await.expect("hash");
    let page = auditor
        .list_audit_records(ListAuditRecordsRequest {
            identifier_hash: hash.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("records");
    assert!(
        page.records_json.len() >= 10,
        "the identifier's records are found by hash: {}",
        page.records_json.len()
    );
    let all = auditor
        .list_audit_records(ListAuditRecordsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect("records");
    let verified = auditor.verify_audit().await.expect("verify");
    assert!(verified.intact, "{verified:?}");

    // Graceful stop (SIGTERM): the server flushes the audit trail and closes the store.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(server.0.id().to_string())
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    server.0.wait().expect("server exits");

    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&db_path)
            .expect("db")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "the database file is the server user's only");
    }
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    for name in ["kms.db", "kms.db-wal", "kms.db-shm", "server.log"] {
        let path = dir.path().join(name);
        if Path::new(&path).exists() {
            places.push((name.to_string(), std::fs::read(&path).expect("read")));
        }
    }
    places.push((
        "audit export".into(),
        all.records_json.join("\n").into_bytes(),
    ));
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(
        log.contains("DEBUG") || log.contains("TRACE"),
        "the server logged at debug level (else this test proves little)"
    );

    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("context value".into(), CTX.as_bytes().to_vec()),
        ("plaintext".into(), PLAIN.as_bytes().to_vec()),
        ("identifier".into(), IDENT.as_bytes().to_vec()),
        ("HSM PIN".into(), softhsm_test::USER_PIN.as_bytes().to_vec()),
    ];
    for (i, dk) in data_keys.iter().enumerate() {
        secrets.push((format!("data key {i}"), dk.clone()));
    }
    let mut hits = Vec::new();
    for (what, secret) in &secrets {
        for form in forms(secret) {
            for (place, bytes) in &places {
                if find(bytes, &form) {
                    hits.push(format!(
                        "{what} found in {place} as {:?}",
                        String::from_utf8_lossy(&form)
                    ));
                }
            }
        }
    }
    assert!(hits.is_empty(), "secrets leaked:\n{}", hits.join("\n"));
    // The trail is about these requests all the same: the canary identifier's hash is there.
    assert!(find(&places.last().expect("export").1, hash.as_bytes()));
}
