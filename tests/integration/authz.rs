//! Authorization over real mutual TLS: the role × RPC matrix, grants and their context
//! constraints, expiry, separation of duties, dual approval, and break-glass windows.

use kms_server::authz::{Role, RULES};
use prost::Message;
use sdk::{Code, GrantSpec, NewKey};
use softhsm_test::{ManualClock, ServerOptions, TestPki, TestServer, DEV_ROLES};

use crate::support::{ctx, on_both_stores, TestDb};

/// Every method of `kms.v1.KeyManagement`, read from the compiled proto descriptors.
fn proto_methods() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).expect("set");
    set.file
        .iter()
        .flat_map(|f| f.service.iter())
        .filter(|s| s.name() == "KeyManagement")
        .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
        .collect()
}

#[test]
fn every_rpc_of_the_proto_has_exactly_one_rule() {
    let methods = proto_methods();
    assert!(methods.len() >= 30, "descriptor read: {methods:?}");
    for method in &methods {
        let rules = RULES.iter().filter(|(name, _)| name == method).count();
        assert_eq!(rules, 1, "{method} must have exactly one rule");
    }
    for (name, _) in RULES {
        assert!(
            methods.iter().any(|m| m == name),
            "rule for unknown RPC {name}"
        );
    }
}

/// An empty protobuf message: a valid (all-default) encoding of every request, and a decoder
/// that skips whatever a response holds.
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

async fn call_raw(channel: &tonic::transport::Channel, method: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let path = format!("/kms.v1.KeyManagement/{method}")
        .parse()
        .expect("path");
    let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
    match grpc.unary(tonic::Request::new(Empty {}), path, codec).await {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

const ROLE_DENIED: &str = "permission denied: the caller's role may not call this method";
const UNBOUND: &str = "permission denied: no role is bound to this principal";

async fn role_matrix(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let methods = proto_methods();
    for (identity, role) in DEV_ROLES {
        let channel = server.channel_as(identity).await.expect("channel");
        let role = Role::parse(role).expect("role");
        for method in &methods {
            let status = call_raw(&channel, method).await;
            let allowed = RULES
                .iter()
                .find(|(name, _)| name == method)
                .is_some_and(|(_, roles)| roles.contains(&role));
            let denied_by_role =
                status.code() == Code::PermissionDenied && status.message() == ROLE_DENIED;
            assert_eq!(
                !allowed, denied_by_role,
                "{identity} ({role:?}) calling {method}: {status:?}"
            );
        }
    }
    // A certificate from the right CA whose principal holds no role: denied everywhere.
    let nobody = server
        .channel_for_new_principal("app", "nobody-1")
        .await
        .expect("channel");
    for method in &methods {
        let status = call_raw(&nobody, method).await;
        assert_eq!(status.code(), Code::PermissionDenied, "{method}");
        assert_eq!(status.message(), UNBOUND, "{method}");
    }
    server.stop().await.expect("stop");
}
on_both_stores!(role_x_rpc_matrix_is_enforced_over_mtls, role_matrix);

#[track_caller]
fn assert_code<T: std::fmt::Debug>(
    result: Result<T, sdk::Error>,
    code: Code,
    what: &str,
) -> String {
    match result {
        Err(sdk::Error::Rpc { code: c, message }) if c == code => message,
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

async fn grants_with_context_constraints(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let officer = server.client_as("officer-1").await.expect("officer");
    let second = server.client_as("officer-2").await.expect("officer 2");
    let app = server.client().await.expect("app");
    let key = officer
        .create_key(NewKey {
            alias: Some("cardio".into()),
            ..NewKey::default()
        })
        .await
        .expect("create");
    let other = officer
        .create_key(NewKey::default())
        .await
        .expect("other key");

    // Before any grant: nothing.
    let good = ctx(&[("purpose", "treatment"), ("dept", "cardiology")]);
    assert_code(
        app.generate_data_key("cardio", &good).await,
        Code::PermissionDenied,
        "no grant yet",
    );

    let proposal = officer
        .propose_grant(GrantSpec {
            principal: server.principal("app-1"),
            key: "cardio".into(),
            operations: vec!["generate-data-key".into(), "decrypt".into()],
            required_context_keys: vec!["purpose".into()],
            context_equals: ctx(&[("dept", "cardiology")]),
            expires_at: None,
        })
        .await
        .expect("propose");
    assert_eq!(proposal.state, "pending");
    // Proposed is not granted.
    assert_code(
        app.generate_data_key("cardio", &good).await,
        Code::PermissionDenied,
        "pending grant",
    );
    let approved = second
        .approve(&proposal.approval_id)
        .await
        .expect("approve");
    assert_eq!(approved.state, "executed");

    let dk = app
        .generate_data_key("cardio", &good)
        .await
        .expect("allowed context");
    assert_eq!(dk.key_id, key.key_id);
    app.decrypt(&dk.blob, &good, None).await.expect("decrypt");
    for (bad, what) in [
        (ctx(&[("dept", "cardiology")]), "missing required key"),
        (
            ctx(&[("purpose", "treatment"), ("dept", "oncology")]),
            "wrong value",
        ),
        (ctx(&[("purpose", "treatment")]), "missing exact entry"),
    ] {
        let message = assert_code(
            app.generate_data_key("cardio", &bad).await,
            Code::PermissionDenied,
            what,
        );
        assert!(message.contains("encryption context"), "{what}: {message}");
    }
    // Not granted: another operation, another key.
    assert_code(
        app.encrypt("cardio", b"x", &good).await,
        Code::PermissionDenied,
        "encrypt not granted",
    );
    assert_code(
        app.generate_data_key(&other.key_id, &good).await,
        Code::PermissionDenied,
        "other key",
    );
    // Officers manage but never use keys.
    assert_code(
        officer.generate_data_key("cardio", &good).await,
        Code::PermissionDenied,
        "officer uses a key",
    );

    // Revocation takes effect at once.
    let grants = officer
        .list_grants(Some(&server.principal("app-1")), None)
        .await
        .expect("list");
    assert_eq!(grants.len(), 1);
    officer
        .revoke_grant(&grants[0].grant_id)
        .await
        .expect("revoke");
    assert_code(
        app.decrypt(&dk.blob, &good, None).await,
        Code::PermissionDenied,
        "revoked",
    );
    server.stop().await.expect("stop");
}
on_both_stores!(
    grants_enforce_operations_keys_and_context,
    grants_with_context_constraints
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_approvals_expire_on_the_clock() {
    let db = TestDb::new(softhsm_test::StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let clock = ManualClock::new(1_900_000_000);
    let server = TestServer::start_opts(
        &db,
        ServerOptions {
            clock: clock.clone(),
            ..ServerOptions::default()
        },
    )
    .await
    .expect("server");
    let officer = server.client_as("officer-1").await.expect("officer");
    let second = server.client_as("officer-2").await.expect("officer 2");
    let app = server.client().await.expect("app");
    officer
        .create_key(NewKey {
            alias: Some("short".into()),
            ..NewKey::default()
        })
        .await
        .expect("create");
    let spec = GrantSpec {
        principal: server.principal("app-1"),
        key: "short".into(),
        operations: vec!["encrypt".into()],
        expires_at: Some(1_900_000_100),
        ..GrantSpec::default()
    };
    let a = officer.propose_grant(spec.clone()).await.expect("propose");
    second.approve(&a.approval_id).await.expect("approve");
    app.encrypt("short", b"x", &ctx(&[]))
        .await
        .expect("in time");
    clock.advance(100);
    app.encrypt("short", b"x", &ctx(&[]))
        .await
        .expect("last second");
    clock.advance(1);
    let message = assert_code(
        app.encrypt("short", b"x", &ctx(&[])).await,
        Code::PermissionDenied,
        "expired grant",
    );
    assert!(message.contains("expired"), "{message}");

    // An approval request not approved within its lifetime (24 h by default) is dead.
    let late = officer
        .propose_grant(GrantSpec {
            expires_at: None,
            ..spec
        })
        .await
        .expect("propose");
    clock.advance(24 * 3600 + 1);
    let message = assert_code(
        second.approve(&late.approval_id).await,
        Code::FailedPrecondition,
        "expired request",
    );
    assert!(message.contains("expired"), "{message}");
    assert_eq!(
        officer
            .approval(&late.approval_id)
            .await
            .expect("get")
            .state,
        "expired"
    );
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separation_of_duties_invariants_hold() {
    let db = TestDb::new(softhsm_test::StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let server = TestServer::start(&db).await.expect("server");
    let officer = server.client_as("officer-1").await.expect("officer");
    let second = server.client_as("officer-2").await.expect("officer 2");

    // An app cannot also become an officer, nor an officer an app.
    for (who, role) in [
        ("app-1", "security-officer"),
        ("officer-2", "app"),
        ("auditor-1", "security-officer"),
    ] {
        let message = assert_code(
            officer
                .propose_role_binding(&server.principal(who), role, false)
                .await,
            Code::FailedPrecondition,
            "mixed roles",
        );
        assert!(message.contains("separation of duties"), "{message}");
    }

    officer
        .create_key(NewKey {
            alias: Some("k".into()),
            ..NewKey::default()
        })
        .await
        .expect("create");
    let a = officer
        .propose_grant(GrantSpec {
            principal: server.principal("app-1"),
            key: "k".into(),
            operations: vec!["decrypt".into()],
            ..GrantSpec::default()
        })
        .await
        .expect("propose");
    // Nobody approves their own request.
    let message = assert_code(
        officer.approve(&a.approval_id).await,
        Code::PermissionDenied,
        "own",
    );
    assert!(message.contains("own request"), "{message}");
    // An auditor may read requests but not approve them.
    let auditor = server.client_as("auditor-1").await.expect("auditor");
    auditor
        .approval(&a.approval_id)
        .await
        .expect("auditor reads");
    assert_code(
        auditor.approve(&a.approval_id).await,
        Code::PermissionDenied,
        "auditor approves",
    );

    // With a quorum of two, one principal cannot count twice.
    let officer3 = server
        .add_principal("security-officer", "officer-3")
        .await
        .expect("officer 3");
    let q = officer
        .propose_quorum("grant", 2, "security-officer")
        .await
        .expect("quorum");
    second
        .approve(&q.approval_id)
        .await
        .expect("quorum approved");
    let b = officer
        .propose_grant(GrantSpec {
            principal: server.principal("app-1"),
            key: "k".into(),
            operations: vec!["encrypt".into()],
            ..GrantSpec::default()
        })
        .await
        .expect("propose");
    assert_eq!(b.required, 2);
    assert_eq!(
        second.approve(&b.approval_id).await.expect("first").state,
        "pending"
    );
    let message = assert_code(
        second.approve(&b.approval_id).await,
        Code::FailedPrecondition,
        "twice",
    );
    assert!(message.contains("already approved"), "{message}");
    assert_eq!(
        officer3
            .approve(&b.approval_id)
            .await
            .expect("second")
            .state,
        "executed"
    );
    // Executed, rejected: never again.
    let message = assert_code(
        officer3.approve(&b.approval_id).await,
        Code::FailedPrecondition,
        "re-run",
    );
    assert!(message.contains("already executed"), "{message}");
    second.reject(&a.approval_id).await.expect("reject");
    let message = assert_code(
        officer3.approve(&a.approval_id).await,
        Code::FailedPrecondition,
        "rejected",
    );
    assert!(message.contains("rejected"), "{message}");
    // The last two officers cannot be removed.
    let binding_removal = officer
        .propose_role_binding(
            &kms_cli::pki::principal(TestPki::TRUST_DOMAIN, "security-officer", "officer-3"),
            "security-officer",
            true,
        )
        .await
        .expect("three officers: one may go");
    officer3
        .reject(&binding_removal.approval_id)
        .await
        .expect("reject");
    server.stop().await.expect("stop");
}

async fn concurrent_approvals(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let officer = server.client_as("officer-1").await.expect("officer");
    let mut approvers = vec![server.client_as("officer-2").await.expect("officer 2")];
    for name in ["officer-3", "officer-4", "officer-5"] {
        approvers.push(
            server
                .add_principal("security-officer", name)
                .await
                .expect("officer"),
        );
    }
    officer
        .create_key(NewKey {
            alias: Some("race".into()),
            ..NewKey::default()
        })
        .await
        .expect("create");
    for round in 0..5 {
        let a = officer
            .propose_grant(GrantSpec {
                principal: server.principal("app-1"),
                key: "race".into(),
                operations: vec!["encrypt".into()],
                ..GrantSpec::default()
            })
            .await
            .expect("propose");
        let outcomes =
            futures::future::join_all(approvers.iter().map(|c| c.approve(&a.approval_id))).await;
        let executed = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(a) if a.state == "executed"))
            .count();
        assert!(executed >= 1, "round {round}: {outcomes:?}");
        for outcome in &outcomes {
            if let Err(e) = outcome {
                assert_eq!(
                    e.code(),
                    Some(Code::FailedPrecondition),
                    "round {round}: {e}"
                );
            }
        }
        let grants = officer.list_grants(None, Some("race")).await.expect("list");
        assert_eq!(
            grants.len(),
            round + 1,
            "round {round}: exactly one grant per request"
        );
        let done = officer.approval(&a.approval_id).await.expect("get");
        assert_eq!(done.state, "executed");
    }
    server.stop().await.expect("stop");
}
on_both_stores!(
    approval_runs_exactly_once_under_concurrent_approvers,
    concurrent_approvals
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_window_needs_approval_and_closes_on_time() {
    let db = TestDb::new(softhsm_test::StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let clock = ManualClock::new(1_900_000_000);
    let server = TestServer::start_opts(
        &db,
        ServerOptions {
            clock: clock.clone(),
            ..ServerOptions::default()
        },
    )
    .await
    .expect("server");
    let officer = server.client_as("officer-1").await.expect("officer");
    let second = server.client_as("officer-2").await.expect("officer 2");
    let medic = server.client_as("breakglass-1").await.expect("break-glass");
    let app = server.client().await.expect("app");
    let key = server.create_key_for_app("ehr").await.expect("key");
    let blob = app
        .encrypt("ehr", b"allergy: penicillin", &ctx(&[("record", "r1")]))
        .await
        .expect("encrypt")
        .blob;

    assert_code(
        medic.decrypt(&blob, &ctx(&[("record", "r1")]), None).await,
        Code::PermissionDenied,
        "no window",
    );
    let short = assert_code(
        medic
            .open_break_glass(&["ehr".into()], "too short", 600)
            .await,
        Code::InvalidArgument,
        "justification",
    );
    assert!(short.contains("justification"), "{short}");
    assert_code(
        medic
            .open_break_glass(
                &["ehr".into()],
                "ER patient unconscious, EHR decrypt",
                5 * 3600,
            )
            .await,
        Code::InvalidArgument,
        "longer than the 4 h maximum",
    );
    let asked = medic
        .open_break_glass(&["ehr".into()], "ER patient unconscious, EHR decrypt", 600)
        .await
        .expect("open");
    let approval = asked.approval.expect("needs approval by default");
    assert!(asked.window.is_none());
    assert_code(
        medic.decrypt(&blob, &ctx(&[("record", "r1")]), None).await,
        Code::PermissionDenied,
        "pending",
    );
    // The break-glass principal cannot approve its own window; an officer can.
    assert_code(
        medic.approve(&approval.approval_id).await,
        Code::PermissionDenied,
        "self",
    );
    let done = officer
        .approve(&approval.approval_id)
        .await
        .expect("approve");
    assert_eq!(done.state, "executed");
    let windows = second.list_break_glass_windows().await.expect("windows");
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].key_ids, vec![key.key_id.clone()]);
    assert_eq!(windows[0].closes_at, 1_900_000_600);

    let opened = medic
        .decrypt(&blob, &ctx(&[("record", "r1")]), None)
        .await
        .expect("inside the window");
    assert_eq!(&opened.plaintext[..], b"allergy: penicillin");
    clock.advance(600);
    medic
        .decrypt(&blob, &ctx(&[("record", "r1")]), None)
        .await
        .expect("last second");
    clock.advance(1);
    let message = assert_code(
        medic.decrypt(&blob, &ctx(&[("record", "r1")]), None).await,
        Code::PermissionDenied,
        "one second after the window closed",
    );
    assert!(message.contains("break-glass"), "{message}");

    // Every use inside the window is marked; the report lists them.
    let auditor = server.client_as("auditor-1").await.expect("auditor");
    let page = auditor
        .list_audit_records(sdk::governance::ListAuditRecordsRequest {
            break_glass_only: true,
            ..Default::default()
        })
        .await
        .expect("records");
    let uses: Vec<serde_json::Value> = page
        .records_json
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let decrypts = uses
        .iter()
        .filter(|r| r["operation"] == "Decrypt" && r["outcome"] == "ok")
        .count();
    assert_eq!(decrypts, 2, "{uses:#?}");
    assert!(uses
        .iter()
        .all(|r| r["break_glass"] == windows[0].window_id.as_str()));
    assert!(uses.iter().all(|r| r["severity"] == "high"), "{uses:#?}");
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_without_approval_opens_at_once_and_is_loud() {
    let db = TestDb::new(softhsm_test::StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let server = TestServer::start_opts(
        &db,
        ServerOptions {
            break_glass_requires_approval: false,
            ..ServerOptions::default()
        },
    )
    .await
    .expect("server");
    let medic = server.client_as("breakglass-1").await.expect("break-glass");
    server.create_key_for_app("ehr").await.expect("key");
    let opened = medic
        .open_break_glass(
            &["ehr".into()],
            "mass casualty incident, downtime procedure",
            60,
        )
        .await
        .expect("open");
    let window = opened.window.expect("open at once");
    // One window at a time: back-to-back windows cannot stretch the maximum.
    let again = assert_code(
        medic
            .open_break_glass(&["ehr".into()], "mass casualty incident, second window", 60)
            .await,
        Code::FailedPrecondition,
        "second window",
    );
    assert!(again.contains("already open"), "{again}");
    // Justifications are one line of visible text.
    for bad in [
        "\u{200B}".repeat(12),
        "line one\nwindow_id: FAKE".to_string(),
        "colour \u{1b}[31mred\u{1b}[0m text here".to_string(),
    ] {
        assert_code(
            medic.open_break_glass(&["ehr".into()], &bad, 60).await,
            Code::InvalidArgument,
            "odd justification",
        );
    }
    medic
        .generate_data_key("ehr", &ctx(&[]))
        .await
        .expect("use");
    let auditor = server.client_as("auditor-1").await.expect("auditor");
    let page = auditor
        .list_audit_records(sdk::governance::ListAuditRecordsRequest {
            break_glass_only: true,
            ..Default::default()
        })
        .await
        .expect("records");
    let records: Vec<serde_json::Value> = page
        .records_json
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(records
        .iter()
        .any(|r| r["operation"] == "OpenBreakGlass" && r["severity"] == "high"));
    assert!(records
        .iter()
        .any(|r| r["operation"] == "GenerateDataKey"
            && r["break_glass"] == window.window_id.as_str()));
    // The break-glass principal holds no grant: outside its window's keys it has nothing.
    let other = server.create_key_for_app("other").await.expect("key");
    assert_code(
        medic.generate_data_key(&other.key_id, &ctx(&[])).await,
        Code::PermissionDenied,
        "other key",
    );
    server.stop().await.expect("stop");
}

fn officer_principal(name: &str) -> String {
    kms_cli::pki::principal(TestPki::TRUST_DOMAIN, "security-officer", name)
}

/// Regressions from a break test: the invariants of a privilege change are checked again,
/// against the store, when the request runs — not only when it was proposed.
async fn rechecked_at_execution(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let o1 = server.client_as("officer-1").await.expect("officer");
    let o2 = server.client_as("officer-2").await.expect("officer 2");
    let o3 = server
        .add_principal("security-officer", "officer-3")
        .await
        .expect("o3");
    let o4 = server
        .add_principal("security-officer", "officer-4")
        .await
        .expect("o4");
    o1.create_key(NewKey {
        alias: Some("k".into()),
        ..NewKey::default()
    })
    .await
    .expect("key");
    let grant = |ops: &str| GrantSpec {
        principal: server.principal("app-1"),
        key: "k".into(),
        operations: vec![ops.to_string()],
        ..GrantSpec::default()
    };

    // A quorum raised after a request was proposed applies to it.
    let early = o1.propose_grant(grant("encrypt")).await.expect("propose");
    assert_eq!(early.required, 1);
    let q = o1
        .propose_quorum("grant", 2, "security-officer")
        .await
        .expect("quorum");
    o2.approve(&q.approval_id).await.expect("quorum 2");
    assert_eq!(
        o2.approve(&early.approval_id).await.expect("1 of 2").state,
        "pending"
    );
    assert_eq!(
        o4.approve(&early.approval_id).await.expect("2 of 2").state,
        "executed"
    );

    // The vote of an approver who lost the role no longer counts.
    let late = o1.propose_grant(grant("decrypt")).await.expect("propose");
    o3.approve(&late.approval_id).await.expect("o3 votes");
    let unbind = o1
        .propose_role_binding(&officer_principal("officer-3"), "security-officer", true)
        .await
        .expect("unbind o3");
    assert_eq!(
        o2.approve(&unbind.approval_id)
            .await
            .expect("approve")
            .state,
        "executed"
    );
    assert_eq!(
        o4.approve(&late.approval_id).await.expect("o4").state,
        "pending"
    );
    assert_eq!(
        o2.approve(&late.approval_id).await.expect("o2").state,
        "executed"
    );

    // Removals proposed while enough officers existed cannot, run one after another, leave
    // fewer than two.
    let a = o1
        .propose_role_binding(&officer_principal("officer-4"), "security-officer", true)
        .await
        .expect("unbind o4");
    let b = o1
        .propose_role_binding(&server.principal("officer-2"), "security-officer", true)
        .await
        .expect("unbind o2 (3 officers now)");
    assert_eq!(
        o2.approve(&a.approval_id).await.expect("a").state,
        "executed"
    );
    let refused = o2.approve(&b.approval_id).await.expect("b");
    assert_eq!(refused.state, "failed", "{refused:?}");
    assert!(
        refused.result.contains("two security officers"),
        "{}",
        refused.result
    );
    let officers = o1
        .list_role_bindings()
        .await
        .expect("bindings")
        .into_iter()
        .filter(|b| b.role == "security-officer")
        .count();
    assert_eq!(officers, 2);

    // Conflicting bindings approved at the same time: never both.
    for i in 0..6 {
        let who = kms_cli::pki::principal(TestPki::TRUST_DOMAIN, "x", &format!("race-{i}"));
        let user = o1
            .propose_role_binding(&who, "app", false)
            .await
            .expect("app");
        let admin = o1
            .propose_role_binding(
                &who,
                if i % 2 == 0 {
                    "security-officer"
                } else {
                    "auditor"
                },
                false,
            )
            .await
            .expect("admin");
        let (x, y) = tokio::join!(
            o2.approve(&user.approval_id),
            o2.approve(&admin.approval_id)
        );
        let states = [x.expect("x").state, y.expect("y").state];
        assert!(
            states.contains(&"executed".to_string()) && states.contains(&"failed".to_string()),
            "round {i}: {states:?}"
        );
        let roles = o1
            .list_role_bindings()
            .await
            .expect("bindings")
            .into_iter()
            .filter(|b| b.principal == who)
            .count();
        assert_eq!(
            roles, 1,
            "round {i}: one principal, one side of the duty split"
        );
    }
    server.stop().await.expect("stop");
}
on_both_stores!(
    privilege_invariants_are_rechecked_when_a_request_runs,
    rechecked_at_execution
);
