//! Crash safety of the usage counter with a real `SIGKILL`: the `kms-server` binary runs as a
//! child process on the test run's SoftHSM2 token and a SQLite file, is killed mid-run, and is
//! started again. No key version may ever encrypt more than its limit, and the durable counter
//! may over-count but never under-count.
//!
//! This is the one test outside the `tests` crate: it needs this package's binary
//! (`CARGO_BIN_EXE_kms-server`), which cargo provides only to the package's own tests.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

async fn start(db_url: &str, port: u16, pki: &softhsm_test::TestPki) -> (Server, sdk::KmsClient) {
    let tls = pki.server_params();
    let child = Command::new(env!("CARGO_BIN_EXE_kms-server"))
        .env_clear()
        .env("SOFTHSM2_CONF", softhsm_test::softhsm_conf())
        .env("KMS_LISTEN", format!("127.0.0.1:{port}"))
        .env("KMS_HSM_MODULE", softhsm_test::module_path())
        .env("KMS_HSM_TOKEN_LABEL", &softhsm_test::token().label)
        .env("KMS_HSM_PIN", softhsm_test::USER_PIN)
        .env("KMS_STORE_URL", db_url)
        .env("KMS_ROTATION_BLOCK", "100")
        .env("KMS_TLS_CA_CERT", &tls.ca_cert)
        .env("KMS_TLS_CERT", &tls.cert)
        .env("KMS_TLS_KEY", &tls.key)
        .env("KMS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kms-server");
    let server = Server(child);
    let client_tls = pki.client_tls("app-1").expect("client TLS");
    for _ in 0..200 {
        if let Ok(client) =
            sdk::KmsClient::connect(&format!("https://127.0.0.1:{port}"), &client_tls).await
        {
            if client.ping().await.is_ok() {
                return (server, client);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("kms-server did not start");
}

async fn generate(
    client: &sdk::KmsClient,
    key: &str,
    n: usize,
    per_version: &mut BTreeMap<u32, u64>,
) {
    let ctx = BTreeMap::new();
    for _ in 0..n {
        let v = client
            .generate_data_key_without_plaintext(key, &ctx)
            .await
            .expect("data key")
            .key_version;
        *per_version.entry(v).or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_server_never_lets_a_version_pass_its_usage_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let db_url = format!("sqlite://{}", dir.path().join("kms.db").display());
    let pki = softhsm_test::TestPki::generate().expect("pki");
    let (server, client) = start(&db_url, free_port(), &pki).await;
    let key = client
        .create_key(sdk::NewKey::default())
        .await
        .expect("key");
    client
        .set_rotation_policy(&key.key_id, 0, 1000)
        .await
        .expect("limit 1000");
    let mut per_version = BTreeMap::new();
    generate(&client, &key.key_id, 650, &mut per_version).await;

    // SIGKILL: no shutdown, the in-memory reservation window is lost.
    let mut server = server;
    server.0.kill().expect("SIGKILL");
    server.0.wait().expect("reaped");
    drop(server);

    let (_server, client) = start(&db_url, free_port(), &pki).await;
    generate(&client, &key.key_id, 1_500, &mut per_version).await;
    let described = client.describe_key(&key.key_id).await.expect("describe");
    for (version, count) in &per_version {
        assert!(
            *count <= 1000,
            "version {version} encrypted {count} times, limit 1000"
        );
        let durable = described
            .versions
            .iter()
            .find(|v| v.version == *version)
            .expect("version")
            .usage;
        assert!(
            durable >= *count && durable <= 1000,
            "version {version}: durable {durable}, used {count}"
        );
    }
    assert_eq!(per_version.values().sum::<u64>(), 2_150);
    assert!(described.primary_version >= 3, "{per_version:?}");
}
