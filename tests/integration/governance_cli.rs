//! The officer, approver and auditor commands of `kms-cli` end to end: grants through
//! `approvals`, roles, quorums, break-glass and the audit commands (verify, export, hash,
//! break-glass report), in JSON and human output.

use clap::Parser;
use kms_cli::Cli;

use crate::support::*;

async fn cli_as(server: &TestServer, name: &str, args: &[&str]) -> anyhow::Result<String> {
    let endpoint = server.endpoint();
    let identity = server.identity(name);
    let mut argv = vec!["kms-cli", "--endpoint", &endpoint, "--identity", &identity];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    kms_cli::run(Cli::try_parse_from(argv)?, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

async fn json_as(server: &TestServer, name: &str, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["--output", "json"];
    argv.extend_from_slice(args);
    let text = cli_as(server, name, &argv)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_approve_use_and_audit_from_the_command_line() {
    let (_db, server) = sqlite_server().await;
    let app = server.principal("app-1");
    json_as(&server, "officer-1", &["key", "create", "--alias", "lab"]).await;
    let proposed = json_as(
        &server,
        "officer-1",
        &[
            "grants",
            "propose",
            "--principal",
            &app,
            "--key",
            "lab",
            "--operation",
            "generate-data-key,decrypt",
            "--require-context-key",
            "purpose",
        ],
    )
    .await;
    assert_eq!(proposed["state"], "pending");
    assert_eq!(proposed["parameters"]["operations"][1], "decrypt");
    let id = proposed["approval_id"].as_str().expect("id").to_string();

    let pending = json_as(&server, "officer-2", &["approvals", "list", "--pending"]).await;
    assert!(pending
        .as_array()
        .expect("list")
        .iter()
        .any(|a| a["approval_id"] == id.as_str()));
    let shown = cli_as(&server, "officer-2", &["approvals", "show", &id])
        .await
        .expect("show");
    assert!(
        shown.contains("generate-data-key") && shown.contains("pending"),
        "{shown}"
    );
    // The proposer cannot approve; the second officer can.
    let own = cli_as(&server, "officer-1", &["approvals", "approve", &id]).await;
    assert!(format!("{:#}", own.expect_err("own request")).contains("own request"));
    let approved = json_as(&server, "officer-2", &["approvals", "approve", &id]).await;
    assert_eq!(approved["state"], "executed");
    let again = cli_as(&server, "officer-2", &["approvals", "approve", &id]).await;
    assert!(format!("{:#}", again.expect_err("twice")).contains("already executed"));

    let dk = json_as(
        &server,
        "app-1",
        &[
            "datakey",
            "--key",
            "lab",
            "--context",
            "purpose=research",
            "--no-plaintext",
        ],
    )
    .await;
    assert!(dk["key_id"].is_string(), "{dk}");
    let refused = cli_as(
        &server,
        "app-1",
        &["datakey", "--key", "lab", "--no-plaintext"],
    )
    .await;
    assert!(format!("{:#}", refused.expect_err("context")).contains("encryption context"));

    let grants = json_as(&server, "auditor-1", &["grants", "list", "--key", "lab"]).await;
    assert_eq!(grants.as_array().expect("grants").len(), 1);
    let roles = cli_as(&server, "auditor-1", &["roles", "list"])
        .await
        .expect("roles");
    assert!(
        roles.contains("security-officer") && roles.contains(&app),
        "{roles}"
    );
    let me = json_as(&server, "app-1", &["whoami"]).await;
    assert_eq!(me["principal"], app.as_str());
    assert_eq!(me["roles"][0], "app");

    let verified = json_as(&server, "auditor-1", &["audit", "verify"]).await;
    assert_eq!(verified["intact"], true, "{verified}");
    // Verification seals what was written first: everything is under a checkpoint.
    assert!(
        verified["checkpoints_checked"].as_u64() >= Some(1),
        "{verified}"
    );
    assert_eq!(verified["unsealed_records"], 0, "{verified}");
    let export = cli_as(&server, "auditor-1", &["audit", "export"])
        .await
        .expect("export");
    let lines: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let gdk = |r: &serde_json::Value, outcome: &str| {
        r["operation"] == "GenerateDataKeyWithoutPlaintext" && r["outcome"] == outcome
    };
    assert!(lines.iter().any(|r| gdk(r, "ok")), "{export}");
    assert!(lines.iter().any(|r| gdk(r, "denied")), "{export}");
    assert!(
        !export.contains("research"),
        "context values are hashed, never stored"
    );
    let hash = json_as(&server, "auditor-1", &["audit", "hash", "research"]).await;
    let hash = hash["hash"].as_str().expect("hash").to_string();
    assert!(
        export.contains(&hash),
        "records carry the keyed hash of the context value"
    );
    let about = cli_as(
        &server,
        "auditor-1",
        &["audit", "export", "--identifier", "research"],
    )
    .await
    .expect("export by identifier");
    assert!(about.lines().count() >= 1 && about.lines().all(|l| l.contains(&hash)));
    // Officers cannot read the trail; apps cannot approve.
    assert!(cli_as(&server, "officer-1", &["audit", "verify"])
        .await
        .is_err());
    assert!(cli_as(&server, "app-1", &["approvals", "list"])
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_quorums_break_glass_and_deletion_from_the_command_line() {
    let (_db, server) = sqlite_server().await;
    let auditor2 = "spiffe://hospital.test/auditor/auditor-2";
    let bind = json_as(
        &server,
        "officer-1",
        &["roles", "bind", auditor2, "auditor"],
    )
    .await;
    let id = bind["approval_id"].as_str().expect("id").to_string();
    let rejected = json_as(&server, "officer-2", &["approvals", "reject", &id]).await;
    assert_eq!(rejected["state"], "rejected");
    let mixed = cli_as(
        &server,
        "officer-1",
        &["roles", "bind", &server.principal("app-1"), "auditor"],
    )
    .await;
    assert!(format!("{:#}", mixed.expect_err("SoD")).contains("separation of duties"));

    let quorums = json_as(&server, "auditor-1", &["quorum", "list"]).await;
    assert_eq!(
        quorums.as_array().expect("quorums").len(),
        kms_server::authz::Kind::ALL.len(),
        "one quorum per kind of approval request"
    );
    let too_many = cli_as(
        &server,
        "officer-1",
        &["quorum", "propose", "grant", "--required", "5"],
    )
    .await;
    assert!(too_many.is_err(), "only two officers exist");

    json_as(&server, "officer-1", &["key", "create", "--alias", "ehr"]).await;
    let asked = json_as(
        &server,
        "breakglass-1",
        &[
            "break-glass",
            "open",
            "--key",
            "ehr",
            "--justification",
            "downtime: EHR unreachable",
            "--duration-seconds",
            "600",
        ],
    )
    .await;
    let id = asked["approval_id"]
        .as_str()
        .expect("needs approval")
        .to_string();
    json_as(&server, "officer-2", &["approvals", "approve", &id]).await;
    json_as(
        &server,
        "breakglass-1",
        &["datakey", "--key", "ehr", "--no-plaintext"],
    )
    .await;
    let report = json_as(&server, "auditor-1", &["audit", "break-glass-report"]).await;
    assert_eq!(report["windows"].as_array().expect("windows").len(), 1);
    assert_eq!(
        report["windows"][0]["justification"],
        "downtime: EHR unreachable"
    );
    assert!(report["uses"]
        .as_array()
        .expect("uses")
        .iter()
        .any(|u| u["operation"] == "GenerateDataKeyWithoutPlaintext"));
    let text = cli_as(&server, "auditor-1", &["audit", "break-glass-report"])
        .await
        .expect("report");
    assert!(
        text.contains("downtime: EHR unreachable") && text.contains("GenerateDataKey"),
        "{text}"
    );

    let deletion = json_as(
        &server,
        "officer-1",
        &["key", "schedule-deletion", "ehr", "--days", "7"],
    )
    .await;
    assert_eq!(deletion["kind"], "key-deletion");
    let described = json_as(&server, "officer-1", &["key", "describe", "ehr"]).await;
    assert_eq!(
        described["state"], "enabled",
        "nothing happens before approval"
    );
    let id = deletion["approval_id"].as_str().expect("id").to_string();
    json_as(&server, "officer-2", &["approvals", "approve", &id]).await;
    let described = json_as(&server, "officer-1", &["key", "describe", "ehr"]).await;
    assert_eq!(described["state"], "pending_deletion");
}

/// Runs `kms-cli` as the binary does: what it printed, and its outcome (`Err` is exit code 1).
async fn run_as(server: &TestServer, name: &str, args: &[&str]) -> (String, anyhow::Result<()>) {
    let endpoint = server.endpoint();
    let identity = server.identity(name);
    let mut argv = vec!["kms-cli", "--endpoint", &endpoint, "--identity", &identity];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    let outcome = kms_cli::run(Cli::try_parse_from(argv).expect("command line"), &mut out).await;
    (String::from_utf8(out).expect("utf-8"), outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_fails_when_the_request_ran_and_failed_and_succeeds_when_pending() {
    let (_db, server) = sqlite_server().await;
    json_as(
        &server,
        "officer-1",
        &["key", "create", "--alias", "doomed"],
    )
    .await;
    let first = json_as(
        &server,
        "officer-1",
        &["key", "schedule-deletion", "doomed", "--days", "7"],
    )
    .await;
    let second = json_as(
        &server,
        "officer-1",
        &["key", "schedule-deletion", "doomed", "--days", "30"],
    )
    .await;
    let third = json_as(
        &server,
        "officer-1",
        &["key", "schedule-deletion", "doomed", "--days", "8"],
    )
    .await;
    let id = |a: &serde_json::Value| a["approval_id"].as_str().expect("id").to_string();
    let (text, outcome) =
        run_as(&server, "officer-2", &["approvals", "approve", &id(&first)]).await;
    outcome.expect("executed: exit 0");
    assert!(text.contains("state:     executed"), "{text}");

    // The second deletion runs and fails (the key is already pending deletion): exit 1, and
    // the request is still printed, in JSON and in text.
    let (text, outcome) = run_as(
        &server,
        "officer-2",
        &["--output", "json", "approvals", "approve", &id(&second)],
    )
    .await;
    let err = outcome.expect_err("a failed request is a failed command");
    assert!(
        format!("{err:#}").contains("failed: key is pending deletion"),
        "{err:#}"
    );
    let shown: serde_json::Value = serde_json::from_str(&text).expect("JSON still emitted");
    assert_eq!(
        (&shown["state"], &shown["result"]),
        (
            &serde_json::json!("failed"),
            &serde_json::json!("key is pending deletion")
        ),
        "{shown}"
    );
    let (text, outcome) =
        run_as(&server, "officer-2", &["approvals", "approve", &id(&third)]).await;
    assert!(outcome.is_err(), "{text}");
    assert!(
        text.contains("state:     failed") && text.contains("key is pending deletion"),
        "{text}"
    );

    // A vote that leaves the request pending (a quorum of two) is a success.
    let officer3 = server
        .add_principal("security-officer", "officer-3")
        .await
        .expect("officer 3");
    let quorum = server
        .client_as("officer-1")
        .await
        .expect("officer 1")
        .propose_quorum("grant", 2, "security-officer")
        .await
        .expect("quorum proposed");
    let done = server
        .client_as("officer-2")
        .await
        .expect("officer 2")
        .approve(&quorum.approval_id)
        .await
        .expect("quorum approved");
    assert_eq!(done.state, "executed", "{done:?}");
    json_as(&server, "officer-1", &["key", "create", "--alias", "lab"]).await;
    let grant = json_as(
        &server,
        "officer-1",
        &[
            "grants",
            "propose",
            "--principal",
            &server.principal("app-1"),
            "--key",
            "lab",
            "--operation",
            "encrypt",
        ],
    )
    .await;
    let voted = json_as(&server, "officer-2", &["approvals", "approve", &id(&grant)]).await;
    assert_eq!(voted["state"], "pending", "{voted}");
    let executed = officer3.approve(&id(&grant)).await.expect("second vote");
    assert_eq!(executed.state, "executed", "{executed:?}");
}
