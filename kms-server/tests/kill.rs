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

/// The clients of one server process: officer-1 and officer-2 (the bootstrap security
/// officers) and app-1.
struct Clients {
    officer: sdk::KmsClient,
    approver: sdk::KmsClient,
    app: sdk::KmsClient,
}

/// Starts `kms-server` with officer-1 and officer-2 as its bootstrap security officers and
/// waits until officer-1 can ping it.
async fn start(db_url: &str, port: u16, pki: &softhsm_test::TestPki) -> (Server, Clients) {
    let tls = pki.server_params();
    let officers = format!(
        "{},{}",
        pki.principal("officer-1"),
        pki.principal("officer-2")
    );
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
        .env("KMS_BOOTSTRAP_SECURITY_OFFICERS", officers)
        .env("KMS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kms-server");
    let server = Server(child);
    let endpoint = format!("https://127.0.0.1:{port}");
    let connect = |name: &'static str| {
        let endpoint = endpoint.clone();
        async move {
            let tls = pki.client_tls(name).expect("client TLS");
            sdk::KmsClient::connect(&endpoint, &tls).await
        }
    };
    for _ in 0..200 {
        if let Ok(officer) = connect("officer-1").await {
            if officer.ping().await.is_ok() {
                let clients = Clients {
                    officer,
                    approver: connect("officer-2").await.expect("officer-2"),
                    app: connect("app-1").await.expect("app-1"),
                };
                return (server, clients);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("kms-server did not start");
}

/// Runs a proposal to completion: officer-2 approves what officer-1 proposed.
async fn approve(clients: &Clients, proposal: sdk::governance::Approval) {
    let done = clients
        .approver
        .approve(&proposal.approval_id)
        .await
        .expect("approve");
    assert_eq!(done.state, "executed", "{done:?}");
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
    let (server, clients) = start(&db_url, free_port(), &pki).await;
    // Separation of duties: officer-1 binds app-1 and manages the key (each change approved
    // by officer-2); app-1 uses the key through its grant.
    let app = pki.principal("app-1");
    approve(
        &clients,
        clients
            .officer
            .propose_role_binding(&app, "app", false)
            .await
            .expect("propose binding"),
    )
    .await;
    let key = clients
        .officer
        .create_key(sdk::NewKey::default())
        .await
        .expect("key");
    clients
        .officer
        .set_rotation_policy(&key.key_id, 0, 1000)
        .await
        .expect("limit 1000");
    approve(
        &clients,
        clients
            .officer
            .propose_grant(sdk::GrantSpec {
                principal: app,
                key: key.key_id.clone(),
                operations: vec!["generate-data-key".into()],
                ..sdk::GrantSpec::default()
            })
            .await
            .expect("propose grant"),
    )
    .await;
    let mut per_version = BTreeMap::new();
    generate(&clients.app, &key.key_id, 650, &mut per_version).await;

    // SIGKILL: no shutdown, the in-memory reservation window is lost.
    let mut server = server;
    server.0.kill().expect("SIGKILL");
    server.0.wait().expect("reaped");
    drop(server);

    // The binding and the grant are durable: app-1 goes on after the restart.
    let (_server, clients) = start(&db_url, free_port(), &pki).await;
    generate(&clients.app, &key.key_id, 1_500, &mut per_version).await;
    let described = clients
        .officer
        .describe_key(&key.key_id)
        .await
        .expect("describe");
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
