//! `kms-cli` end to end against a real server: every command, human and JSON output, folder
//! encryption of the Synthea sample, and failures that must exit non-zero.

use clap::{CommandFactory, Parser};
use kms_cli::Cli;

use crate::support::*;

/// Runs `kms-cli` as officer-1, the key manager.
async fn cli(server: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    cli_as(server, "officer-1", args).await
}

/// Runs `kms-cli --identity DIR/<name>`.
async fn cli_as(server: &TestServer, name: &str, args: &[&str]) -> anyhow::Result<String> {
    let endpoint = server.endpoint();
    let identity = server.identity(name);
    let mut argv = vec![
        "kms-cli",
        "--endpoint",
        endpoint.as_str(),
        "--identity",
        identity.as_str(),
    ];
    argv.extend_from_slice(args);
    let parsed = Cli::try_parse_from(argv)?;
    let mut out = Vec::new();
    kms_cli::run(parsed, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

async fn cli_json(server: &TestServer, args: &[&str]) -> serde_json::Value {
    cli_json_as(server, "officer-1", args).await
}

async fn cli_json_as(server: &TestServer, name: &str, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["--output", "json"];
    argv.extend_from_slice(args);
    let text = cli_as(server, name, &argv)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {text}"))
}

#[test]
fn command_line_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[tokio::test]
async fn key_commands_in_both_output_formats() {
    let (_db, server) = sqlite_server().await;
    let created = cli_json(
        &server,
        &[
            "key",
            "create",
            "--alias",
            "cli-key",
            "--tag",
            "team=ehr",
            "--description",
            "EHR back end",
        ],
    )
    .await;
    let key_id = created["key_id"].as_str().expect("key id").to_string();
    assert_eq!(created["alias"], "cli-key");
    assert_eq!(created["tags"]["team"], "ehr");
    let described = cli_json(&server, &["key", "describe", "cli-key"]).await;
    assert_eq!(described, created);
    let human = cli(&server, &["key", "describe", &key_id])
        .await
        .expect("describe");
    assert!(
        human.contains("alias           cli-key") && human.contains("AES_256_GCM"),
        "{human}"
    );
    let listed = cli_json(&server, &["key", "list", "--page-size", "1"]).await;
    assert!(listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .any(|k| k["key_id"] == key_id.as_str()));
    assert!(cli(&server, &["key", "list"])
        .await
        .expect("list")
        .contains("key(s)"));
    assert_eq!(cli(&server, &["ping"]).await.expect("ping").trim(), "ok");

    // Data keys are the app's: officer-1 proposes a grant, officer-2 approves it.
    let app = server.principal("app-1");
    let proposed = cli_json(
        &server,
        &[
            "grants",
            "propose",
            "--principal",
            &app,
            "--key",
            "cli-key",
            "--operation",
            "generate-data-key",
        ],
    )
    .await;
    assert_eq!(proposed["state"], "pending", "{proposed}");
    let approved = cli_json_as(
        &server,
        "officer-2",
        &[
            "approvals",
            "approve",
            proposed["approval_id"].as_str().expect("approval id"),
        ],
    )
    .await;
    assert_eq!(approved["state"], "executed", "{approved}");
    let dk = cli_json_as(
        &server,
        "app-1",
        &["datakey", "--key", "cli-key", "--context", "a=b"],
    )
    .await;
    assert_eq!(dk["plaintext_hex"].as_str().expect("plaintext").len(), 64);
    let wrapped_only = cli_json_as(
        &server,
        "app-1",
        &["datakey", "--key", "cli-key", "--no-plaintext"],
    )
    .await;
    assert!(wrapped_only.get("plaintext_hex").is_none());
    // The officer manages the key but never uses it.
    assert!(cli(&server, &["datakey", "--key", "cli-key"])
        .await
        .is_err());

    let rotated = cli_json(&server, &["key", "rotate", "cli-key"]).await;
    assert_eq!(rotated["primary_version"], 2);
    assert_eq!(rotated["versions"][1]["state"], "primary");
    let policy = cli_json(
        &server,
        &[
            "key",
            "rotation-policy",
            "cli-key",
            "--period-seconds",
            "7200",
            "--usage-limit",
            "5000",
        ],
    )
    .await;
    assert_eq!(
        (
            policy["rotation_period_seconds"].as_u64(),
            policy["usage_limit"].as_u64()
        ),
        (Some(7200), Some(5000))
    );
    let report = cli_json(&server, &["key", "rotation-report"]).await;
    let row = report["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["alias"] == "cli-key")
        .expect("row")
        .clone();
    assert_eq!(
        row["older_versions_still_decrypting"],
        serde_json::json!([1])
    );
    assert_eq!(row["overdue"], false);
    assert!(row["next_rotation_due_at"].as_i64().is_some());
    assert!(cli(&server, &["key", "rotation-report"])
        .await
        .expect("human report")
        .contains("key(s)"));
    let retired = cli_json(&server, &["key", "set-min-version", "cli-key", "2"]).await;
    assert_eq!(retired["versions"][0]["state"], "retired");
    assert_eq!(
        cli_json(&server, &["key", "disable", "cli-key"]).await["state"],
        "disabled"
    );
    assert_eq!(
        cli_json(&server, &["key", "enable", "cli-key"]).await["state"],
        "enabled"
    );
    let human = cli(&server, &["key", "describe", "cli-key"])
        .await
        .expect("describe");
    assert!(human.contains("version 1       retired"), "{human}");

    // Scheduling a deletion prints an approval request; officer-2 approves it.
    let human = cli(
        &server,
        &["key", "schedule-deletion", "cli-key", "--days", "7"],
    )
    .await
    .expect("propose deletion");
    let approval_id = human
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("approval request "))
        .unwrap_or_else(|| panic!("no approval request printed: {human}"))
        .trim()
        .to_string();
    assert!(
        human.contains("key-deletion") && human.contains("pending"),
        "{human}"
    );
    assert_eq!(
        cli_json(&server, &["key", "describe", "cli-key"]).await["state"],
        "enabled",
        "nothing happens before the approval"
    );
    let approved = cli_json_as(
        &server,
        "officer-2",
        &["approvals", "approve", &approval_id],
    )
    .await;
    assert_eq!(approved["state"], "executed", "{approved}");
    assert_eq!(approved["kind"], "key-deletion", "{approved}");
    assert_eq!(
        cli_json(&server, &["key", "describe", "cli-key"]).await["state"],
        "pending_deletion"
    );
    assert_eq!(
        cli_json(&server, &["key", "cancel-deletion", "cli-key"]).await["state"],
        "disabled"
    );
    let proposed = cli_json(&server, &["key", "schedule-deletion", "cli-key"]).await;
    assert_eq!(
        (&proposed["kind"], &proposed["state"]),
        (
            &serde_json::json!("key-deletion"),
            &serde_json::json!("pending")
        ),
        "{proposed}"
    );
    // The proposer cannot approve its own request.
    assert!(cli(
        &server,
        &[
            "approvals",
            "approve",
            proposed["approval_id"].as_str().expect("id")
        ]
    )
    .await
    .is_err());
    let human = cli_as(
        &server,
        "officer-2",
        &[
            "approvals",
            "approve",
            proposed["approval_id"].as_str().expect("id"),
        ],
    )
    .await
    .expect("approve");
    assert!(human.contains("executed"), "{human}");
    assert_eq!(
        cli_json(&server, &["key", "describe", "cli-key"]).await["state"],
        "pending_deletion"
    );

    let err = cli(&server, &["key", "describe", "missing-key"])
        .await
        .expect_err("unknown key");
    assert!(format!("{err:#}").contains("key not found"), "{err:#}");
    assert!(Cli::try_parse_from([
        "kms-cli",
        "encrypt",
        "--key",
        "k",
        "--context",
        "novalue",
        "--in",
        "a",
        "--out",
        "b"
    ])
    .is_err());
}

#[tokio::test]
async fn folder_encryption_of_the_synthea_sample_round_trips() {
    let (_db, server) = sqlite_server().await;
    cli(&server, &["key", "create", "--alias", "synthea"])
        .await
        .expect("key");
    server.grant_app("synthea").await.expect("grant");
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthea");
    let work = tempfile::tempdir().expect("dir");
    let enc = work.path().join("enc");
    let dec = work.path().join("dec");
    let s = |p: &std::path::Path| p.to_string_lossy().to_string();
    let summary = cli_json_as(
        &server,
        "app-1",
        &[
            "encrypt",
            "--key",
            "synthea",
            "--context",
            "dataset=sample",
            "--in",
            &s(&sample),
            "--out",
            &s(&enc),
            "--frame-size",
            "4096",
        ],
    )
    .await;
    assert!(summary["files"].as_u64().expect("files") >= 17);
    assert_eq!(summary["kms_calls"], 1, "one data key for the whole folder");
    let back = cli_json_as(
        &server,
        "app-1",
        &[
            "decrypt",
            "--context",
            "dataset=sample",
            "--in",
            &s(&enc),
            "--out",
            &s(&dec),
        ],
    )
    .await;
    assert_eq!(back["files"], summary["files"]);
    assert_eq!(back["bytes"], summary["bytes"]);
    for entry in std::fs::read_dir(sample.join("fhir")).expect("fhir") {
        let path = entry.expect("entry").path();
        let restored = dec.join("fhir").join(path.file_name().expect("name"));
        assert_eq!(
            std::fs::read(&path).expect("orig"),
            std::fs::read(&restored).expect("restored"),
            "{}",
            path.display()
        );
    }
    let patients = std::fs::read(enc.join("csv/patients.csv.kms")).expect("encrypted patients");
    assert!(
        !patients.windows(9).any(|w| w == b"BIRTHDATE"),
        "plaintext leaked into the ciphertext"
    );

    // Existing outputs are not overwritten without --force, and nothing is spent on the KMS.
    let again = [
        "encrypt",
        "--key",
        "synthea",
        "--context",
        "dataset=sample",
        "--in",
        &s(&sample),
        "--out",
        &s(&enc),
    ];
    let err = cli_as(&server, "app-1", &again)
        .await
        .expect_err("outputs exist");
    assert!(format!("{err:#}").contains("pass --force"), "{err:#}");
    let mut forced = again.to_vec();
    forced.push("--force");
    cli_as(&server, "app-1", &forced)
        .await
        .expect("--force overwrites");

    // Wrong context: the command fails and writes nothing.
    let single = work.path().join("patients.csv");
    let err = cli_as(
        &server,
        "app-1",
        &[
            "decrypt",
            "--context",
            "dataset=other",
            "--in",
            &s(&enc.join("csv/patients.csv.kms")),
            "--out",
            &s(&single),
        ],
    )
    .await
    .expect_err("wrong context");
    assert!(format!("{err:#}").contains("invalid ciphertext"), "{err:#}");
    assert!(!single.exists());
}

/// A FIFO made by `mkfifo` in a test folder (never a real device).
#[cfg(unix)]
fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[cfg(unix)]
fn is_fifo(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// The names in a folder, sorted: a temporary file left behind shows here.
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `decrypt --out /dev/null --force` used to replace /dev/null with a regular file holding the
/// plaintext (a temporary file renamed over it). Outputs that are not regular files — here a
/// FIFO, a folder and a symbolic link — are refused, with or without --force, before anything
/// is written, by encrypt, decrypt (file and folder) and deid.
#[cfg(unix)]
#[tokio::test]
async fn outputs_that_are_not_regular_files_are_refused_even_with_force() {
    let (_db, server) = sqlite_server().await;
    cli(&server, &["key", "create", "--alias", "pipes"])
        .await
        .expect("key");
    server.grant_app("pipes").await.expect("grant");
    let work = tempfile::tempdir().expect("dir");
    let s = |p: &std::path::Path| p.to_string_lossy().to_string();
    let plain = work.path().join("notes.txt");
    std::fs::write(&plain, "patient notes").expect("write");
    let sealed = work.path().join("notes.txt.kms");
    let encrypt = |out: &std::path::Path| {
        vec![
            "encrypt".to_string(),
            "--key".into(),
            "pipes".into(),
            "--in".into(),
            s(&plain),
            "--out".into(),
            s(out),
        ]
    };
    let decrypt = |input: &std::path::Path, out: &std::path::Path| {
        vec![
            "decrypt".to_string(),
            "--in".into(),
            s(input),
            "--out".into(),
            s(out),
        ]
    };
    let run = |mut args: Vec<String>, force: bool| {
        if force {
            args.push("--force".into());
        }
        let server = &server;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli_as(server, "app-1", &args).await
        }
    };
    run(encrypt(&sealed), false).await.expect("encrypt");

    let out = work.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let fifo = out.join("fifo");
    mkfifo(&fifo);
    let target = out.join("target.txt");
    std::fs::write(&target, "keep").expect("write");
    let link = out.join("link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let folder = out.join("folder");
    std::fs::create_dir(&folder).expect("mkdir");
    for (dst, what) in [
        (&fifo, "is a FIFO"),
        (&link, "is a symbolic link"),
        (&folder, "is a folder"),
    ] {
        for force in [false, true] {
            for args in [encrypt(dst), decrypt(&sealed, dst)] {
                let err = run(args.clone(), force)
                    .await
                    .expect_err("not a regular file");
                let message = format!("{err:#}");
                assert!(
                    message.contains(&dst.display().to_string()) && message.contains(what),
                    "{args:?} --force={force}: {message}"
                );
            }
        }
    }
    assert!(is_fifo(&fifo), "the FIFO is left alone");
    assert!(std::fs::symlink_metadata(&link)
        .expect("link")
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).expect("target"), "keep");
    assert!(folder.is_dir() && names(&folder).is_empty());
    assert_eq!(
        names(&out),
        ["fifo", "folder", "link", "target.txt"],
        "no temporary file left behind"
    );

    // A folder run checks every destination before the first file is written.
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).expect("mkdir");
    std::fs::write(tree.join("a.txt"), "a").expect("write");
    std::fs::write(tree.join("b.txt"), "b").expect("write");
    let enc = work.path().join("enc");
    let encrypt_tree = vec![
        "encrypt".to_string(),
        "--key".into(),
        "pipes".into(),
        "--in".into(),
        s(&tree),
        "--out".into(),
        s(&enc),
    ];
    run(encrypt_tree, false).await.expect("encrypt folder");
    let dec = work.path().join("dec");
    std::fs::create_dir(&dec).expect("mkdir");
    mkfifo(&dec.join("b.txt"));
    let err = run(decrypt(&enc, &dec), true)
        .await
        .expect_err("a FIFO among the outputs");
    assert!(
        format!("{err:#}").contains(&dec.join("b.txt").display().to_string()),
        "{err:#}"
    );
    assert_eq!(names(&dec), ["b.txt"], "a.txt was not written");
    assert!(is_fifo(&dec.join("b.txt")));

    // deid: a FIFO in the output folder is refused before the domain key is asked for (app-1
    // holds no domain-key grant: the key would be refused with PermissionDenied).
    let deid_out = work.path().join("deid");
    std::fs::create_dir(&deid_out).expect("mkdir");
    mkfifo(&deid_out.join("patients.csv"));
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthea/csv");
    for force in [false, true] {
        let deid = vec![
            "deid".to_string(),
            "--policy".into(),
            "hipaa-safe-harbor-synthea-csv".into(),
            "--domain".into(),
            "study-1".into(),
            "--in".into(),
            s(&sample),
            "--out".into(),
            s(&deid_out),
            "--quiet".into(),
        ];
        let err = run(deid, force).await.expect_err("a FIFO in the output");
        let message = format!("{err:#}");
        assert!(
            message.contains(&deid_out.join("patients.csv").display().to_string())
                && message.contains("is a FIFO")
                && !message.contains("PermissionDenied"),
            "--force={force}: {message}"
        );
    }
    assert_eq!(names(&deid_out), ["patients.csv"]);
    assert!(is_fifo(&deid_out.join("patients.csv")));
}
