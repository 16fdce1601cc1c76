//! The custodian and officer commands of `kms-cli recovery` end to end, as the README's
//! procedure runs them: key pairs, registration, a 2-of-2 ceremony, share files verified and
//! confirmed, the ceremony closed, a backup proposed, approved, downloaded and verified; then
//! on a new, empty token and store: restore, shares submitted from the share files, and the
//! key back. Also the custodians' usual mistakes: a wrong passphrase, someone else's share.

use clap::Parser;
use kms_cli::Cli;
use softhsm_test::remove_token_files;

use crate::recovery::own_server;
use crate::support::TestServer;

async fn cli_as(server: &TestServer, name: &str, args: &[&str]) -> anyhow::Result<String> {
    let endpoint = server.endpoint();
    let identity = server.identity(name);
    let mut argv = vec![
        "kms-cli",
        "--output",
        "json",
        "--endpoint",
        &endpoint,
        "--identity",
        &identity,
    ];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    kms_cli::run(Cli::try_parse_from(argv)?, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

async fn json_as(server: &TestServer, name: &str, args: &[&str]) -> serde_json::Value {
    let text = cli_as(server, name, args)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

async fn approve(server: &TestServer, proposal: &serde_json::Value) -> serde_json::Value {
    let id = proposal["approval_id"].as_str().expect("approval id");
    let done = json_as(server, "officer-2", &["approvals", "approve", id]).await;
    assert_eq!(done["state"], "executed", "{done}");
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremony_backup_and_restore_from_the_command_line() {
    let dir = tempfile::tempdir().expect("dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let passphrase = path("passphrase");
    std::fs::write(&passphrase, "a long custodian passphrase\n").expect("passphrase");
    let wrong = path("wrong");
    std::fs::write(&wrong, "not the right passphrase").expect("passphrase");
    let custodians = ["custodian-1", "custodian-2"];

    let (db, _keys, token, server) = own_server(true).await;
    for name in custodians {
        json_as(
            &server,
            name,
            &[
                "custodian",
                "keygen",
                "--out",
                &path("keys"),
                "--name",
                name,
                "--passphrase-file",
                &passphrase,
                "--work-factor",
                "10",
            ],
        )
        .await;
        let registered = json_as(
            &server,
            name,
            &[
                "custodian",
                "register",
                "--recipient",
                &path(&format!("keys/{name}.recipient")),
            ],
        )
        .await;
        assert_eq!(registered["principal"], server.principal(name));
    }
    json_as(&server, "officer-1", &["key", "create", "--alias", "pacs"]).await;

    // Ceremony: proposed by one officer, approved by the other.
    let p1 = server.principal("custodian-1");
    let p2 = server.principal("custodian-2");
    let proposal = json_as(
        &server,
        "officer-1",
        &[
            "recovery",
            "init",
            "--threshold",
            "2",
            "--custodian",
            &p1,
            "--custodian",
            &p2,
        ],
    )
    .await;
    assert_eq!(proposal["state"], "pending");
    let ceremony = approve(&server, &proposal).await["result"]
        .as_str()
        .expect("ceremony id")
        .to_string();

    // Each custodian saves and verifies their share; a wrong passphrase and someone else's
    // share are refused without confirming anything.
    for name in custodians {
        let share = path(&format!("{name}.share"));
        json_as(&server, name, &["recovery", "fetch-share", "--out", &share]).await;
    }
    let key1 = path("keys/custodian-1.identity.age");
    let key2 = path("keys/custodian-2.identity.age");
    let share1 = path("custodian-1.share");
    let share2 = path("custodian-2.share");
    let bad = cli_as(
        &server,
        "custodian-1",
        &[
            "recovery",
            "verify-share",
            "--key",
            &key1,
            "--share",
            &share1,
            "--passphrase-file",
            &wrong,
        ],
    )
    .await;
    assert!(
        format!("{:#}", bad.expect_err("wrong passphrase")).contains("passphrase"),
        "a wrong passphrase is named as such"
    );
    let foreign = cli_as(
        &server,
        "custodian-1",
        &[
            "recovery",
            "verify-share",
            "--key",
            &key1,
            "--share",
            &share2,
            "--passphrase-file",
            &passphrase,
        ],
    )
    .await;
    assert!(
        foreign.is_err(),
        "custodian-1 cannot open custodian-2's share"
    );
    let status = json_as(&server, "officer-1", &["recovery", "status"]).await;
    assert!(status["shares"]
        .as_array()
        .expect("shares")
        .iter()
        .all(|s| s["confirmed_at"] == 0));
    for (name, key, share) in [
        ("custodian-1", &key1, &share1),
        ("custodian-2", &key2, &share2),
    ] {
        json_as(
            &server,
            name,
            &[
                "recovery",
                "verify-share",
                "--key",
                key,
                "--share",
                share,
                "--passphrase-file",
                &passphrase,
            ],
        )
        .await;
    }
    let closed = json_as(
        &server,
        "officer-1",
        &["recovery", "close", "--ceremony", &ceremony],
    )
    .await;
    assert_ne!(closed["closed_at"], 0);

    // Backup: proposed, approved, downloaded and verified.
    let backup = path("kms.backup");
    let proposal = json_as(
        &server,
        "officer-1",
        &["recovery", "backup", "--out", &backup],
    )
    .await;
    let approval = proposal["approval_id"].as_str().expect("id").to_string();
    approve(&server, &proposal).await;
    let written = json_as(
        &server,
        "officer-1",
        &[
            "recovery",
            "backup",
            "--approval",
            &approval,
            "--out",
            &backup,
        ],
    )
    .await;
    assert_eq!(written["verified"], true, "{written}");
    let checked = json_as(
        &server,
        "auditor-1",
        &["recovery", "verify-backup", &backup],
    )
    .await;
    assert_eq!(checked["keys"], 1);
    server.stop().await.expect("stop");
    assert_eq!(remove_token_files(&token).expect("wipe"), 1);
    drop(db);

    // A new token and store: restore with both shares.
    let (_db, _keys, token, server) = own_server(true).await;
    let opened = json_as(
        &server,
        "officer-1",
        &["recovery", "restore", "--backup", &backup],
    )
    .await;
    assert_eq!(opened["session"]["threshold"], 2);
    let submitted = json_as(
        &server,
        "custodian-2",
        &[
            "recovery",
            "submit-share",
            "--key",
            &key2,
            "--share",
            &share2,
            "--passphrase-file",
            &passphrase,
        ],
    )
    .await;
    assert_eq!(
        (&submitted["index"], &submitted["accepted"]),
        (&2.into(), &1.into())
    );
    let done = json_as(
        &server,
        "custodian-1",
        &[
            "recovery",
            "submit-share",
            "--key",
            &key1,
            "--share",
            &share1,
            "--passphrase-file",
            &passphrase,
        ],
    )
    .await;
    assert!(
        done["completed"]
            .as_str()
            .expect("completed")
            .starts_with("restored 1 keys"),
        "{done}"
    );
    let keys = json_as(&server, "officer-1", &["key", "list"]).await;
    let text = keys.to_string();
    assert!(text.contains("\"pacs\""), "{text}");
    server.stop().await.expect("stop");
    let _ = remove_token_files(&token);
}
