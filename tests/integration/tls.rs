//! Mutual TLS, with real handshakes over loopback against the real server: TLS 1.3 only, a
//! client certificate from the configured CA required, expired and foreign certificates
//! refused, and the principal read from the certificate (URI SAN, else CN, else refused) and
//! handed to request handlers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kms_cli::pki::{DevCa, Issued};
use kms_server::tls::{principal_of, PeerIdentity, PrincipalError, ServerTls, TlsIncoming};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use softhsm_test::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A tonic channel over mutual TLS as development identity `name` (health, reflection).
pub async fn channel(server: &TestServer, name: &str) -> tonic::transport::Channel {
    server
        .pki()
        .client_tls(name)
        .expect("identity")
        .channel(&server.endpoint())
        .await
        .expect("TLS channel")
}

/// A client certificate valid now, signed by `ca`.
fn client_cert(ca: &DevCa, uri: Option<&str>, cn: &str) -> Issued {
    let now = SystemTime::now();
    ca.issue_client(uri, cn, now - DAY, now + DAY)
        .expect("issue")
}

/// The SDK's view: connect with `cert` (trusting the server's CA) and call Ping.
async fn ping_with(server: &TestServer, cert: &Issued) -> Result<(), sdk::Error> {
    let ca = std::fs::read(server.pki_dir().join("ca.pem")).expect("ca.pem");
    let tls = sdk::ClientTls::from_pem(&ca, cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
        .expect("client TLS");
    sdk::KmsClient::connect(&server.endpoint(), &tls)
        .await?
        .ping()
        .await
}

/// A rustls client trusting the server's CA, offering `versions`, presenting `cert` if any.
fn rustls_client(
    pki: &TestPki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    cert: Option<(&str, &str)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.dir().join("ca.pem")).expect("ca.pem") {
        roots.add(ca.expect("ca")).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert"),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

fn identity_files(pki: &TestPki, name: &str) -> (String, String) {
    let read = |ext: &str| {
        std::fs::read_to_string(pki.dir().join(format!("{name}.{ext}"))).expect("identity file")
    };
    (read("pem"), read("key"))
}

/// A raw handshake, then the HTTP/2 preface: `Ok(protocol version)` if the server answers
/// with HTTP/2 frames (it accepted the client), `Err` if the handshake failed or the server
/// closed the connection (TLS 1.3 clients learn of a refused certificate only after their own
/// side of the handshake is done).
async fn probe(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> Result<rustls::ProtocolVersion, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let version = tls.get_ref().1.protocol_version().ok_or("no version")?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    tls.write_all(preface).await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(version),
        Ok(Ok(_)) => Err("closed by the server".into()),
        Ok(Err(e)) => Err(format!("refused: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test]
async fn a_good_client_certificate_pings_over_tls13() {
    let (_db, server) = sqlite_server().await;
    for name in ["app-1", "officer-1", "auditor-1", "breakglass-1"] {
        server
            .client_as(name)
            .await
            .expect("connect")
            .ping()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let (cert, key) = identity_files(server.pki(), "app-1");
    let config = rustls_client(
        server.pki(),
        &[&rustls::version::TLS13],
        Some((&cert, &key)),
    );
    assert_eq!(
        probe(server.addr, config).await,
        Ok(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[tokio::test]
async fn a_handshake_without_a_client_certificate_fails() {
    let (_db, server) = sqlite_server().await;
    let config = rustls_client(server.pki(), &[&rustls::version::TLS13], None);
    let outcome = probe(server.addr, config).await;
    assert!(outcome.is_err(), "{outcome:?}");
    server
        .client()
        .await
        .expect("connect")
        .ping()
        .await
        .expect("still serving");
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails() {
    let (_db, server) = sqlite_server().await;
    let other = DevCa::generate("another CA").expect("CA");
    let principal = server.principal("app-1");
    let foreign = client_cert(&other, Some(&principal), "app-1");
    assert!(
        ping_with(&server, &foreign).await.is_err(),
        "foreign CA accepted"
    );
    let config = rustls_client(
        server.pki(),
        &[&rustls::version::TLS13],
        Some((&foreign.cert_pem, &foreign.key_pem)),
    );
    assert!(probe(server.addr, config).await.is_err());
    // The same names from the right CA pass.
    let good = client_cert(server.pki().ca(), Some(&principal), "app-1");
    ping_with(&server, &good).await.expect("right CA");
}

#[tokio::test]
async fn an_expired_client_certificate_fails() {
    let (_db, server) = sqlite_server().await;
    let now = SystemTime::now();
    let principal = server.principal("app-1");
    let expired = server
        .pki()
        .ca()
        .issue_client(Some(&principal), "app-1", now - 3 * DAY, now - DAY)
        .expect("issue");
    assert!(
        ping_with(&server, &expired).await.is_err(),
        "expired accepted"
    );
    let not_yet = server
        .pki()
        .ca()
        .issue_client(Some(&principal), "app-1", now + DAY, now + 3 * DAY)
        .expect("issue");
    assert!(
        ping_with(&server, &not_yet).await.is_err(),
        "not yet valid accepted"
    );
    let config = rustls_client(
        server.pki(),
        &[&rustls::version::TLS13],
        Some((&expired.cert_pem, &expired.key_pem)),
    );
    assert!(probe(server.addr, config).await.is_err());
}

#[tokio::test]
async fn a_client_offering_only_tls12_fails() {
    let (_db, server) = sqlite_server().await;
    let (cert, key) = identity_files(server.pki(), "app-1");
    let tls12 = rustls_client(
        server.pki(),
        &[&rustls::version::TLS12],
        Some((&cert, &key)),
    );
    let outcome = probe(server.addr, tls12).await;
    assert!(
        outcome.as_ref().is_err_and(|e| e.starts_with("handshake")),
        "{outcome:?}"
    );
    // Offering both, the same client gets TLS 1.3.
    let both = rustls_client(
        server.pki(),
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some((&cert, &key)),
    );
    assert_eq!(
        probe(server.addr, both).await,
        Ok(rustls::ProtocolVersion::TLSv1_3)
    );
}

fn der(issued: &Issued) -> Vec<u8> {
    CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
        .expect("pem")
        .to_vec()
}

#[test]
fn the_principal_is_the_uri_san_else_the_cn_else_refused() {
    let ca = DevCa::generate("principal test CA").expect("CA");
    let uri = "spiffe://hospital.test/app/app-1";
    assert_eq!(
        principal_of(&der(&client_cert(&ca, Some(uri), "app-1"))),
        Ok(uri.into())
    );
    assert_eq!(
        principal_of(&der(&client_cert(&ca, Some(uri), ""))),
        Ok(uri.into())
    );
    assert_eq!(
        principal_of(&der(&client_cert(&ca, None, "legacy-app"))),
        Ok("legacy-app".into())
    );
    assert_eq!(
        principal_of(&der(&client_cert(&ca, None, ""))),
        Err(PrincipalError::Missing)
    );
    assert_eq!(
        principal_of(&der(&client_cert(&ca, None, "two words"))),
        Err(PrincipalError::Malformed)
    );
    assert_eq!(
        principal_of(b"not a certificate"),
        Err(PrincipalError::Unparsable)
    );
    // Regression (break test): a CN cannot pose as a URI principal, and invisible characters
    // (here a right-to-left override) cannot disguise one (URI SANs are ASCII by definition).
    assert_eq!(
        principal_of(&der(&client_cert(
            &ca,
            None,
            "spiffe://hospital.test/security-officer/officer-1"
        ))),
        Err(PrincipalError::Malformed)
    );
    assert_eq!(
        principal_of(&der(&client_cert(&ca, None, "app\u{202E}1-ppa"))),
        Err(PrincipalError::Malformed)
    );
    // Every development identity names its SPIFFE principal.
    let pki = TestPki::generate().expect("pki");
    for (name, kind) in kms_cli::pki::DEV_IDENTITIES {
        let cert =
            CertificateDer::from_pem_file(pki.dir().join(format!("{name}.pem"))).expect("cert");
        assert_eq!(
            principal_of(&cert).expect("principal"),
            format!("spiffe://hospital.test/{kind}/{name}")
        );
    }
}

#[tokio::test]
async fn a_certificate_naming_no_principal_is_refused() {
    let (_db, server) = sqlite_server().await;
    let nameless = client_cert(server.pki().ca(), None, "");
    assert!(
        ping_with(&server, &nameless).await.is_err(),
        "nameless accepted"
    );
    let config = rustls_client(
        server.pki(),
        &[&rustls::version::TLS13],
        Some((&nameless.cert_pem, &nameless.key_pem)),
    );
    assert!(probe(server.addr, config).await.is_err());
    // A CN alone is enough to name the principal: the handshake passes and the server asks
    // for that principal's roles (none yet: PERMISSION_DENIED, not a TLS failure)...
    let cn_only = client_cert(server.pki().ca(), None, "legacy-app");
    let err = ping_with(&server, &cn_only)
        .await
        .expect_err("no role bound yet");
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err:?}");
    // ... and once that CN is bound to a role, it is served.
    bind_role(&server, "legacy-app", "app").await;
    ping_with(&server, &cn_only).await.expect("CN fallback");
    let config = rustls_client(
        server.pki(),
        &[&rustls::version::TLS13],
        Some((&cn_only.cert_pem, &cn_only.key_pem)),
    );
    assert_eq!(
        probe(server.addr, config).await,
        Ok(rustls::ProtocolVersion::TLSv1_3)
    );
}

/// Handlers see the caller: tonic 0.14 copies `Connected::connect_info` of our connection type
/// into every request's extensions (`transport/server/service/io.rs`, `ConnectInfo::call`).
/// An interceptor sees the same `tonic::Request` a handler does.
#[tokio::test]
async fn requests_carry_the_peer_identity_and_silent_clients_time_out() {
    let pki = TestPki::generate().expect("pki");
    let tls = ServerTls::load(&pki.server_params()).expect("server TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<PeerIdentity>>> = Arc::default();
    let record = Arc::clone(&seen);
    let capture = move |request: tonic::Request<()>| {
        let identity = request
            .extensions()
            .get::<PeerIdentity>()
            .cloned()
            .ok_or_else(|| tonic::Status::unauthenticated("no peer identity"))?;
        record.lock().expect("lock").push(identity);
        Ok(request)
    };
    let (_, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = TlsIncoming::with_timeout(listener, tls, Duration::from_millis(300));
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(capture))
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );

    // A client that connects and says nothing must not hold up the others...
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let endpoint = format!("https://{addr}");
    for name in ["officer-1", "custodian-2"] {
        let channel = pki
            .client_tls(name)
            .expect("identity")
            .channel(&endpoint)
            .await
            .expect("channel");
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health check");
    }
    // ... and is dropped once its handshake time is up.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "silent client not dropped: {read:?}"
    );

    let seen = seen.lock().expect("lock").clone();
    let principals: Vec<_> = seen.iter().map(|p| p.principal.as_str()).collect();
    assert_eq!(
        principals,
        [pki.principal("officer-1"), pki.principal("custodian-2")]
    );
    assert!(seen
        .iter()
        .all(|p| p.remote_addr.is_some_and(|a| a.ip().is_loopback())));
    let _ = stop.send(());
    serving.await.expect("join").expect("serve");
}

#[tokio::test]
async fn kms_cli_pki_init_and_identities_on_the_command_line() {
    use clap::Parser;
    async fn run(args: &[&str]) -> anyhow::Result<String> {
        let mut out = Vec::new();
        kms_cli::run(kms_cli::Cli::try_parse_from(args)?, &mut out).await?;
        Ok(String::from_utf8(out)?)
    }
    let dir = tempfile::tempdir().expect("dir");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().expect("utf-8");
    let text = run(&["kms-cli", "--output", "json", "pki", "init", "--out", pki])
        .await
        .expect("pki init");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    let identities = doc["identities"].as_array().expect("identities");
    assert_eq!(identities.len(), kms_cli::pki::DEV_IDENTITIES.len());
    assert!(identities.iter().any(|i| i["name"] == "tokenizer-1"
        && i["principal"] == "spiffe://hospital.test/tokenizer/tokenizer-1"));
    let err = run(&["kms-cli", "pki", "init", "--out", pki])
        .await
        .expect_err("existing PKI");
    assert!(format!("{err:#}").contains("--force"), "{err:#}");
    let human = run(&[
        "kms-cli",
        "pki",
        "init",
        "--out",
        pki,
        "--trust-domain",
        "clinic.test",
        "--force",
    ])
    .await
    .expect("forced");
    assert!(
        human.contains("spiffe://clinic.test/custodian/custodian-2"),
        "{human}"
    );

    let (_db, server) = sqlite_server().await;
    let endpoint = server.endpoint();
    let own = server.identity("auditor-1");
    assert_eq!(
        run(&[
            "kms-cli",
            "--endpoint",
            &endpoint,
            "--identity",
            &own,
            "ping"
        ])
        .await
        .expect("ping")
        .trim(),
        "ok"
    );
    // Separate files override parts of --identity: here a key that does not match.
    let wrong_key = format!("{}/app-1.key", server.pki_dir().display());
    let err = run(&[
        "kms-cli",
        "--endpoint",
        &endpoint,
        "--identity",
        &own,
        "--client-key",
        &wrong_key,
        "ping",
    ])
    .await
    .expect_err("mismatched key");
    assert!(format!("{err:#}").contains("TLS"), "{err:#}");
    // The other PKI's identity is not trusted by this server (nor is its server certificate).
    let foreign = format!("{pki}/app-1");
    assert!(run(&[
        "kms-cli",
        "--endpoint",
        &endpoint,
        "--identity",
        &foreign,
        "ping"
    ])
    .await
    .is_err());
    if std::env::var_os("KMS_IDENTITY").is_none() && std::env::var_os("KMS_CA_CERT").is_none() {
        let err = run(&["kms-cli", "--endpoint", &endpoint, "ping"])
            .await
            .expect_err("no identity");
        assert!(format!("{err:#}").contains("--identity"), "{err:#}");
    }
    let err = run(&[
        "kms-cli",
        "--endpoint",
        &format!("http://{}", server.addr),
        "--identity",
        &own,
        "ping",
    ])
    .await
    .expect_err("http");
    assert!(format!("{err:#}").contains("https://"), "{err:#}");
}
