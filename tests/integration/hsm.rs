//! The HSM port on a real SoftHSM2 token: key attributes, session-fault recovery, a token that
//! refuses login, and start-up checks.

use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use crate::support::*;

fn label_of(key_id: &str) -> Vec<u8> {
    format!("kms:{key_id}:v1").into_bytes()
}

/// Master key versions are generated in the token, sensitive, never readable, and cannot be
/// wrapped out under an ordinary (untrusted) key.
#[tokio::test]
async fn master_keys_are_sensitive_and_never_readable() {
    let (_db, server) = sqlite_server().await;
    let key = server.create_key_for_app("").await.expect("key");

    let session = softhsm_test::user_session().expect("session");
    let found = session
        .find_objects(&[Attribute::Label(label_of(&key.key_id))])
        .expect("find");
    assert_eq!(found.len(), 1, "one object per key version");
    let handle = found[0];

    let info = session
        .get_attribute_info(handle, &[AttributeType::Value])
        .expect("attribute info");
    assert!(
        matches!(info[0], AttributeInfo::Sensitive),
        "CKA_VALUE must not be readable: {:?}",
        info[0]
    );
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::WrapWithTrusted,
                AttributeType::Token,
            ],
        )
        .expect("attributes");
    for expected in [
        Attribute::Sensitive(true),
        Attribute::AlwaysSensitive(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Token(true),
    ] {
        assert!(
            attrs.contains(&expected),
            "missing {expected:?} in {attrs:?}"
        );
    }
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "value returned"
    );

    // An ordinary AES key cannot wrap it out: only a trusted key could.
    let wrapping = session
        .generate_key(
            &cryptoki::mechanism::Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
            ],
        )
        .expect("wrapping key");
    let err = session
        .wrap_key(
            &cryptoki::mechanism::Mechanism::AesKeyWrapPad,
            wrapping,
            handle,
        )
        .expect_err("wrap under an untrusted key must fail");
    assert!(
        matches!(
            err,
            cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::KeyNotWrappable, _)
        ),
        "{err:?}"
    );
}

/// Logging the token out under the server's feet (every session loses its login) is a
/// session fault: the pool reopens, logs in again and the request succeeds.
#[tokio::test]
async fn a_lost_login_is_recovered_by_reopening_sessions() {
    let (_db, server, token) = private_token_server("recover").await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let sealed = client
        .encrypt(&key.key_id, b"before", &ctx(&[]))
        .await
        .expect("encrypt");
    for _ in 0..3 {
        token.logout_everyone();
        let opened = client
            .decrypt(&sealed.blob, &ctx(&[]), None)
            .await
            .expect("recovered after logout");
        assert_eq!(opened.plaintext.as_slice(), b"before");
        client
            .generate_data_key(&key.key_id, &ctx(&[]))
            .await
            .expect("recovered generate");
    }
}

/// Regression: with no handle cached yet (a fresh server), a logged-out session finds no
/// private objects at all. That must be recovered as a lost login, not reported as a key
/// missing from the HSM (which was an INTERNAL error).
#[tokio::test]
async fn a_lost_login_before_the_first_lookup_is_recovered() {
    let (db, server, token) = private_token_server("uncached").await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let sealed = client
        .encrypt(&key.key_id, b"cold", &ctx(&[]))
        .await
        .expect("encrypt");
    server.stop().await.expect("stop");
    let server = serve_on(&db, &token).await;
    let client = server.client().await.expect("client");
    token.logout_everyone();
    let opened = client
        .decrypt(&sealed.blob, &ctx(&[]), None)
        .await
        .expect("recovered on first lookup");
    assert_eq!(opened.plaintext.as_slice(), b"cold");
}

/// When the token refuses login, crypto calls fail with UNAVAILABLE (not a crash, not a
/// generic error), the server keeps answering, and it recovers once the token is back.
#[tokio::test]
async fn a_token_refusing_login_is_unavailable_and_recovers() {
    let (_db, server, token) = private_token_server("refuse").await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    token.set_user_pin(softhsm_test::USER_PIN, "another-pin-0000");
    token.logout_everyone();
    let err = client
        .generate_data_key(&key.key_id, &ctx(&[]))
        .await
        .expect_err("HSM refuses");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
    assert!(!err.to_string().contains("pin"), "{err}");
    client.ping().await.expect("server still serving");
    // Readiness follows: NOT_SERVING while the HSM refuses, SERVING once it answers again.
    use tonic_health::pb::health_check_response::ServingStatus;
    let bound = kms_server::server::READINESS_INTERVAL * 2 + kms_server::server::READINESS_TIMEOUT;
    wait_for_health(&server, ServingStatus::NotServing, bound).await;
    token.set_user_pin("another-pin-0000", softhsm_test::USER_PIN);
    client
        .generate_data_key(&key.key_id, &ctx(&[]))
        .await
        .expect("recovered");
    wait_for_health(&server, ServingStatus::Serving, bound).await;
}

#[tokio::test]
async fn start_up_fails_on_unknown_token_or_wrong_pin() {
    let db = TestDb::new(StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let pki = softhsm_test::TestPki::generate().expect("pki");
    let open = |label: String, pin: &str| {
        kms_server::server::Ready::open(kms_server::server::Parts {
            hsm: kms_server::hsm::HsmParams {
                token_label: label,
                pin: AuthPin::from(pin),
                so_pin: None,
                pool_size: 1,
            },
            store_max_connections: 1,
            ..softhsm_test::parts(
                &db,
                1,
                std::sync::Arc::new(kms_server::service::SystemClock),
                Default::default(),
                &pki,
            )
        })
    };
    let err = open("no-such-token".into(), softhsm_test::USER_PIN)
        .await
        .err()
        .expect("unknown label");
    let err = format!("{:#}", anyhow::Error::from(err));
    assert!(err.contains("no token labelled"), "{err}");
    let (_private, _) = private_token("wrong-pin");
    let err = open(_private.clone(), "wrong-pin-9999")
        .await
        .err()
        .expect("wrong pin");
    let err = format!("{:#}", anyhow::Error::from(err));
    assert!(err.contains("login refused"), "{err}");
    assert!(!err.contains("wrong-pin-9999"), "{err}");
}

/// A token of this test's own (so faults injected into it cannot disturb other tests).
struct PrivateToken {
    slot: cryptoki::slot::Slot,
    label: String,
}

impl PrivateToken {
    fn so_session(&self) -> cryptoki::session::Session {
        let session = softhsm_test::pkcs11()
            .open_rw_session(self.slot)
            .expect("session");
        let _ = session.logout();
        session
            .login(UserType::So, Some(&AuthPin::from(softhsm_test::SO_PIN)))
            .expect("SO login");
        session
    }

    /// Logs the token out: in PKCS#11 the login state is shared by all of a process's
    /// sessions on a token, so the server's pooled sessions all lose it.
    fn logout_everyone(&self) {
        let session = softhsm_test::pkcs11()
            .open_ro_session(self.slot)
            .expect("session");
        let _ = session.logout();
    }

    fn set_user_pin(&self, _old: &str, new: &str) {
        let session = self.so_session();
        session.init_pin(&AuthPin::from(new)).expect("init pin");
        session.logout().expect("logout");
    }
}

fn private_token(name: &str) -> (String, PrivateToken) {
    let pkcs11 = softhsm_test::pkcs11();
    let label = format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    softhsm_test::init_token(&pkcs11, &label).expect("init token");
    let slot = kms_server::hsm::find_token(&pkcs11, &label).expect("token");
    (label.clone(), PrivateToken { slot, label })
}

async fn private_token_server(name: &str) -> (TestDb, TestServer, PrivateToken) {
    let (_, token) = private_token(name);
    let db = TestDb::new(StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let server = serve_on(&db, &token).await;
    (db, server, token)
}

async fn serve_on(db: &TestDb, token: &PrivateToken) -> TestServer {
    let pki = softhsm_test::TestPki::generate().expect("pki");
    let ready = kms_server::server::Ready::open(kms_server::server::Parts {
        hsm: kms_server::hsm::HsmParams {
            token_label: token.label.clone(),
            pin: AuthPin::from(softhsm_test::USER_PIN),
            so_pin: None,
            pool_size: 2,
        },
        store_max_connections: 2,
        ..softhsm_test::parts(
            db,
            2,
            std::sync::Arc::new(kms_server::service::SystemClock),
            Default::default(),
            &pki,
        )
    })
    .await
    .expect("ready");
    TestServer::serve(ready, pki).await.expect("serve")
}
