//! Tokenization domains over real gRPC, a real SoftHSM2 token and a real store: remote and
//! local tokenization agree, grants scope a domain and an operation, re-identification needs
//! the re-identifier role and a purpose and is listed as a disclosure per patient, a rotation
//! is approved and leaves old tokens reversible, a disabled master key stops tokenization.

use sdk::tokenize::{Context, DomainKey, FieldTransformer, Transform, Transformed};
use sdk::{Code, Disclosure, DomainKeys, GrantSpec, KmsClient};
use std::time::Duration;

use crate::support::{ctx, on_both_stores, sqlite_server, TestDb, TestServer};

const SSN: &str = r#"{"kind":"fpe","alphabet":"digits","separators":"-","max_len":9}"#;
const NAME: &str = r#"{"kind":"pseudonym","normalize":"text"}"#;
const MRN: &str = r#"{"kind":"deterministic"}"#;
const BIRTH: &str = r#"{"kind":"date_shift","max_days":180}"#;
const ZIP: &str = r#"{"kind":"zip3"}"#;

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T, sdk::Error>, want: Code, what: &str) {
    match result {
        Err(sdk::Error::Rpc { code, .. }) if code == want => {}
        other => panic!("{what}: expected {want:?}, got {other:?}"),
    }
}

/// officer-1 proposes a grant of `operations` on `key` to `principal`, limited to `domain`
/// when given; officer-2 approves; returns the approval's final state.
async fn grant(
    server: &TestServer,
    principal: &str,
    key: &str,
    operations: &[&str],
    domain: Option<&str>,
) -> String {
    let officer = server.client_as("officer-1").await.expect("officer");
    let proposal = officer
        .propose_grant(GrantSpec {
            principal: principal.to_string(),
            key: key.to_string(),
            operations: strings(operations),
            context_equals: domain
                .map(|d| ctx(&[("kms:domain", d)]))
                .unwrap_or_default(),
            ..GrantSpec::default()
        })
        .await
        .expect("grant proposed");
    server
        .client_as("officer-2")
        .await
        .expect("approver")
        .approve(&proposal.approval_id)
        .await
        .expect("approve")
        .state
}

/// Creates the master key `research` and the domains `names` under it (as officer-1); returns
/// officer-1's client.
async fn research_domains(server: &TestServer, names: &[&str]) -> KmsClient {
    let officer = server.client_as("officer-1").await.expect("officer");
    officer
        .create_key(sdk::NewKey {
            alias: Some("research".into()),
            ..sdk::NewKey::default()
        })
        .await
        .expect("key");
    for name in names {
        officer
            .create_domain(name, "research")
            .await
            .expect("domain");
    }
    officer
}

async fn values_of(
    client: &KmsClient,
    domain: &str,
    field: &str,
    transform: &str,
    values: &[&str],
    patients: &[String],
) -> (u32, Vec<String>) {
    let response = client
        .tokenize(domain, field, transform, strings(values), patients.to_vec())
        .await
        .expect("tokenize");
    let out = response
        .results
        .into_iter()
        .map(|r| {
            let status = r.status.expect("status");
            assert_eq!(status.code, 0, "{}", status.message);
            r.value
        })
        .collect();
    (response.key_version, out)
}

fn local(
    key: &DomainKey,
    field: &str,
    transform: &str,
    values: &[&str],
    patients: &[String],
) -> Vec<String> {
    let transform: Transform = serde_json::from_str(transform).expect("transform");
    let prepared = FieldTransformer::new(key, field, &transform).expect("prepared");
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ctx = Context {
                patient_pseudonym: patients.get(i).map(String::as_str),
            };
            match prepared.apply(v, &ctx).expect("apply") {
                Transformed::Value(v) => v,
                Transformed::Dropped => panic!("dropped"),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_tokenize_detokenize_and_account_for_disclosures() {
    let (_db, server) = sqlite_server().await;
    let officer = server.client_as("officer-1").await.expect("officer");
    let key = officer
        .create_key(sdk::NewKey {
            alias: Some("research".into()),
            ..sdk::NewKey::default()
        })
        .await
        .expect("key");
    let created = officer
        .create_domain("study-1", "research")
        .await
        .expect("domain");
    assert_eq!(created.current_version, 1);
    assert_eq!(created.key_id, key.key_id);
    officer
        .create_domain("study-2", "research")
        .await
        .expect("second domain");
    assert_code(
        officer.create_domain("study-1", "research").await,
        Code::FailedPrecondition,
        "duplicate domain",
    );
    assert_code(
        officer.create_domain("Study 1", "research").await,
        Code::InvalidArgument,
        "bad name",
    );
    assert_code(
        officer.create_domain("study-3", "no-such-key").await,
        Code::NotFound,
        "unknown key",
    );

    let tokenizer_id = server.principal("tokenizer-1");
    let reidentifier_id = server.principal("reidentifier-1");
    let app_id = server.principal("app-1");
    assert_eq!(
        grant(
            &server,
            &tokenizer_id,
            "research",
            &["tokenize", "domain-key"],
            Some("study-1")
        )
        .await,
        "executed"
    );
    assert_eq!(
        grant(
            &server,
            &reidentifier_id,
            "research",
            &["reidentify"],
            Some("study-1")
        )
        .await,
        "executed"
    );
    // Separation of duties inside key use: an app cannot be granted tokenization, a tokenizer
    // cannot be granted re-identification.
    assert_eq!(
        grant(&server, &app_id, "research", &["tokenize"], None).await,
        "failed"
    );
    assert_eq!(
        grant(&server, &tokenizer_id, "research", &["reidentify"], None).await,
        "failed"
    );

    let tokenizer = server.client_as("tokenizer-1").await.expect("tokenizer");
    let reidentifier = server
        .client_as("reidentifier-1")
        .await
        .expect("reidentifier");

    // Remote and local modes give the same output for the same input.
    let ssns = ["999-41-2363", "999-52-8812", "999-41-2363"];
    let names = ["Jörg  O\u{2019}Brien", "jörg o'brien", "Ana Núñez"];
    let mrns = ["MRN-0001", "MRN-0002"];
    let keys = DomainKeys::new(tokenizer.clone(), Duration::from_secs(60));
    let key_v1 = keys.get("study-1", 0).await.expect("domain key");
    assert_eq!(key_v1.version(), 1);

    let (version, ssn_tokens) = values_of(&tokenizer, "study-1", "ssn", SSN, &ssns, &[]).await;
    assert_eq!(version, 1);
    assert_eq!(ssn_tokens, local(&key_v1, "ssn", SSN, &ssns, &[]));
    assert_eq!(ssn_tokens[0], ssn_tokens[2], "deterministic");
    assert_ne!(ssn_tokens[0], ssns[0]);
    assert!(ssn_tokens
        .iter()
        .all(|t| t.len() == 11 && &t[3..4] == "-" && &t[6..7] == "-"));

    let (_, name_tokens) = values_of(&tokenizer, "study-1", "name", NAME, &names, &[]).await;
    assert_eq!(name_tokens, local(&key_v1, "name", NAME, &names, &[]));
    assert_eq!(name_tokens[0], name_tokens[1], "one person, two spellings");
    assert_ne!(name_tokens[0], name_tokens[2]);

    let (_, mrn_tokens) = values_of(&tokenizer, "study-1", "mrn", MRN, &mrns, &[]).await;
    assert_eq!(mrn_tokens, local(&key_v1, "mrn", MRN, &mrns, &[]));
    assert!(mrn_tokens[0].starts_with("v1."), "{}", mrn_tokens[0]);

    let patients = vec![name_tokens[0].clone(), name_tokens[0].clone()];
    let dates = ["1961-03-14", "1961-04-13"];
    let (_, shifted) =
        values_of(&tokenizer, "study-1", "birthdate", BIRTH, &dates, &patients).await;
    assert_eq!(
        shifted,
        local(&key_v1, "birthdate", BIRTH, &dates, &patients)
    );
    assert_ne!(shifted[0], dates[0]);
    let (_, zips) = values_of(&tokenizer, "study-1", "zip", ZIP, &["02139", "03690"], &[]).await;
    assert_eq!(zips, ["021", "000"]);

    // Scope: the grant names study-1 only; unknown domains look the same as ungranted ones.
    for domain in ["study-2", "no-such-domain"] {
        assert_code(
            tokenizer
                .tokenize(domain, "ssn", SSN, strings(&ssns), vec![])
                .await,
            Code::PermissionDenied,
            domain,
        );
        assert_code(keys.get(domain, 0).await, Code::PermissionDenied, domain);
    }
    // Bad requests: transform, FF1 domain rule, batch size, patient list.
    for (transform, what) in [
        (r#"{"kind":"rot13"}"#, "unknown transform"),
        (r#"{"kind":"zip3","digits":5}"#, "unknown parameter"),
        (
            r#"{"kind":"fpe","alphabet":"digits","min_len":5,"max_len":9}"#,
            "radix 10 length 5",
        ),
    ] {
        assert_code(
            tokenizer
                .tokenize("study-1", "f", transform, strings(&["123456"]), vec![])
                .await,
            Code::InvalidArgument,
            what,
        );
    }
    let too_many = vec!["1".to_string(); 10_001];
    assert_code(
        tokenizer
            .tokenize("study-1", "f", NAME, too_many, vec![])
            .await,
        Code::InvalidArgument,
        "10001 values",
    );
    assert_code(
        tokenizer
            .tokenize("study-1", "f", BIRTH, strings(&dates), vec!["p".into()])
            .await,
        Code::InvalidArgument,
        "patients do not match values",
    );
    // A bad value fails alone.
    let mixed = tokenizer
        .tokenize(
            "study-1",
            "ssn",
            SSN,
            strings(&["999-41-2363", "99X-41-2363"]),
            vec![],
        )
        .await
        .expect("mixed batch");
    assert_eq!(mixed.results[0].status.as_ref().expect("status").code, 0);
    let bad = mixed.results[1].status.as_ref().expect("status");
    assert_eq!(bad.code, Code::InvalidArgument as i32);
    assert!(!bad.message.contains("99X"), "{}", bad.message);

    // Re-identification: only the re-identifier, only with a purpose and a patient.
    let patient = name_tokens[0].clone();
    let disclosure = |field: &str, transform: &str, purpose: &str| Disclosure {
        domain: "study-1".into(),
        field: field.into(),
        transform_json: transform.into(),
        purpose: purpose.into(),
        patient_token: patient.clone(),
        key_version: 0,
    };
    assert_code(
        tokenizer
            .detokenize(&disclosure("ssn", SSN, "curiosity"), ssn_tokens.clone())
            .await,
        Code::PermissionDenied,
        "tokenizer detokenizes",
    );
    assert_code(
        reidentifier
            .detokenize(&disclosure("ssn", SSN, " "), ssn_tokens.clone())
            .await,
        Code::InvalidArgument,
        "no purpose",
    );
    let back = reidentifier
        .detokenize(
            &disclosure("ssn", SSN, "safety-signal-follow-up"),
            ssn_tokens.clone(),
        )
        .await
        .expect("detokenize SSNs");
    assert_eq!(
        back.iter().map(|r| r.value.as_str()).collect::<Vec<_>>(),
        ssns
    );
    let back = reidentifier
        .detokenize(&disclosure("mrn", MRN, "treatment"), mrn_tokens.clone())
        .await
        .expect("detokenize MRNs");
    assert_eq!(
        back.iter().map(|r| r.value.as_str()).collect::<Vec<_>>(),
        mrns
    );
    // A pseudonym is not reversible; a tampered token fails alone.
    let refused = reidentifier
        .detokenize(&disclosure("name", NAME, "treatment"), name_tokens.clone())
        .await
        .expect("answered");
    assert!(refused
        .iter()
        .all(|r| r.status.as_ref().expect("status").code != 0));
    let mut tampered = mrn_tokens[0].clone();
    tampered.pop();
    tampered.push(if mrn_tokens[0].ends_with('A') {
        'B'
    } else {
        'A'
    });
    let results = reidentifier
        .detokenize(
            &disclosure("mrn", MRN, "treatment"),
            vec![tampered, mrn_tokens[1].clone()],
        )
        .await
        .expect("answered");
    assert_ne!(results[0].status.as_ref().expect("status").code, 0);
    assert_eq!(results[1].value, mrns[1]);
    // Another patient's disclosure, which must not be listed for this one.
    let mut other = disclosure("mrn", MRN, "treatment");
    other.patient_token = name_tokens[2].clone();
    reidentifier
        .detokenize(&other, vec![mrn_tokens[1].clone()])
        .await
        .expect("other patient");

    // The accounting of disclosures for this patient: every Detokenize call naming them (the
    // refused tokenizer's attempt included, as denied), none for the other patient.
    let auditor = server.client_as("auditor-1").await.expect("auditor");
    let records = disclosures(&auditor, &patient).await;
    let granted: Vec<_> = records.iter().filter(|r| r["outcome"] == "ok").collect();
    assert_eq!(granted.len(), 4, "{records:#?}");
    assert!(granted
        .iter()
        .all(|r| r["principal"] == reidentifier_id.as_str()));
    let purposes: Vec<_> = granted
        .iter()
        .map(|r| r["detail"]["purpose"].as_str().unwrap_or(""))
        .collect();
    assert!(purposes.contains(&"safety-signal-follow-up") && purposes.contains(&"treatment"));
    assert!(records
        .iter()
        .any(|r| r["outcome"] == "denied" && r["principal"] == tokenizer_id.as_str()));
    let text = serde_json::to_string(&records).expect("json");
    for secret in ssns.iter().chain(mrns.iter()) {
        assert!(!text.contains(secret), "a value in the audit trail");
    }
    assert!(
        !text.contains(patient.as_str()),
        "the patient token in clear"
    );
    assert_eq!(disclosures(&auditor, &name_tokens[2]).await.len(), 1);

    // Rotation is an approved act; new tokens carry version 2, old ones still reverse.
    let proposal = officer
        .propose_domain_rotation("study-1")
        .await
        .expect("rotation proposed");
    assert_eq!(proposal.kind, "domain-rotation");
    let (_, still_v1) = values_of(&tokenizer, "study-1", "mrn", MRN, &mrns, &[]).await;
    assert_eq!(still_v1, mrn_tokens, "nothing changes before approval");
    let done = server
        .client_as("officer-2")
        .await
        .expect("approver")
        .approve(&proposal.approval_id)
        .await
        .expect("approve");
    assert_eq!(done.state, "executed", "{done:?}");
    let (version, v2) = values_of(&tokenizer, "study-1", "mrn", MRN, &mrns, &[]).await;
    assert_eq!(version, 2);
    assert!(v2[0].starts_with("v2.") && v2[0] != mrn_tokens[0]);
    keys.clear();
    let key_v2 = keys.get("study-1", 0).await.expect("v2 key");
    assert_eq!(key_v2.version(), 2);
    assert_eq!(local(&key_v2, "mrn", MRN, &mrns, &[]), v2);
    let old = reidentifier
        .detokenize(&disclosure("mrn", MRN, "treatment"), mrn_tokens.clone())
        .await
        .expect("old tokens");
    assert_eq!(old[0].value, mrns[0]);
    let new = reidentifier
        .detokenize(&disclosure("mrn", MRN, "treatment"), v2.clone())
        .await
        .expect("new tokens");
    assert_eq!(new[1].value, mrns[1]);
    let listed = officer.list_domains().await.expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].current_version, 2);

    // A disabled master key stops tokenization at once (domain keys are not cached).
    officer.disable_key("research").await.expect("disable");
    assert_code(
        tokenizer
            .tokenize("study-1", "mrn", MRN, strings(&mrns), vec![])
            .await,
        Code::FailedPrecondition,
        "disabled master key",
    );
}

/// The audit records of `Detokenize` calls about `patient`, as the auditor lists them.
async fn disclosures(auditor: &KmsClient, patient: &str) -> Vec<serde_json::Value> {
    let hash = auditor.hash_identifier(patient).await.expect("hash");
    let page = auditor
        .list_audit_records(sdk::governance::ListAuditRecordsRequest {
            identifier_hash: hash,
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect("records");
    page.records_json
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("record"))
        .filter(|r| r["operation"] == "Detokenize")
        .collect()
}

/// The Python example (stubs generated from `proto/` with grpcio-tools) tokenizes exactly as
/// the SDK does locally. Needs `KMS_PYTHON`, a Python with `examples/python/requirements.txt`
/// installed (`scripts/test.sh` makes one); skipped without it unless
/// `KMS_TEST_REQUIRE_PYTHON=1` (CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_tokenizes_like_the_sdk() {
    let python = match std::env::var("KMS_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ if std::env::var("KMS_TEST_REQUIRE_PYTHON").as_deref() == Ok("1") => {
            panic!("KMS_TEST_REQUIRE_PYTHON=1 but KMS_PYTHON is not set")
        }
        _ => {
            eprintln!("SKIPPED: the Python example (KMS_PYTHON is not set)");
            return;
        }
    };
    let (_db, server) = sqlite_server().await;
    research_domains(&server, &["study-py"]).await;
    let tokenizer_id = server.principal("tokenizer-1");
    assert_eq!(
        grant(
            &server,
            &tokenizer_id,
            "research",
            &["tokenize", "domain-key"],
            None
        )
        .await,
        "executed"
    );
    let key = server
        .client_as("tokenizer-1")
        .await
        .expect("tokenizer")
        .domain_key("study-py", 0)
        .await
        .expect("domain key");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/tokenize_example.py"
    );
    let identity = server.identity("tokenizer-1");
    let ca = server.pki_dir().join("ca.pem");
    let endpoint = server.endpoint().trim_start_matches("https://").to_string();
    let run = |extra: Vec<String>| {
        let mut command = std::process::Command::new(&python);
        command
            .arg(script)
            .args(["--endpoint", &endpoint, "--ca"])
            .arg(&ca)
            .args([
                "--cert",
                &format!("{identity}.pem"),
                "--key",
                &format!("{identity}.key"),
            ])
            .args(extra);
        // The server answers on this runtime's other worker while Python waits.
        tokio::task::spawn_blocking(move || command.output().expect("python runs"))
    };
    for (field, transform, values) in [
        ("ssn", SSN, vec!["999-41-2363", "999-52-8812"]),
        ("name", NAME, vec!["Ana Núñez", "ANA NUÑEZ "]),
        ("mrn", MRN, vec!["MRN-0001"]),
    ] {
        let mut extra = strings(&[
            "--domain",
            "study-py",
            "--field",
            field,
            "--transform",
            transform,
        ]);
        extra.extend(strings(&values));
        let output = run(extra).await.expect("joined");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{field}: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let doc: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        assert_eq!(doc["key_version"], 1);
        let from_python: Vec<String> = doc["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v.as_str().expect("value").to_string())
            .collect();
        assert_eq!(
            from_python,
            local(&key, field, transform, &values, &[]),
            "{field}"
        );
    }
    // The example reports a refusal as a gRPC error, not a traceback.
    let output = run(strings(&[
        "--domain",
        "no-such-domain",
        "--field",
        "f",
        "--transform",
        NAME,
        "x",
    ]))
    .await
    .expect("joined");
    assert!(!output.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&output.stdout).expect("an error document");
    assert_eq!(doc["error"], "PERMISSION_DENIED", "{doc}");
}

/// Vault tokens: random, one per value, reversible only through the vault by a granted
/// re-identifier; the store holds no value in clear.
async fn vault_tokens(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    research_domains(&server, &["study-v", "study-w"]).await;
    let tokenizer_id = server.principal("tokenizer-1");
    let reidentifier_id = server.principal("reidentifier-1");
    assert_eq!(
        grant(&server, &tokenizer_id, "research", &["tokenize"], None).await,
        "executed"
    );
    assert_eq!(
        grant(
            &server,
            &reidentifier_id,
            "research",
            &["reidentify"],
            Some("study-v")
        )
        .await,
        "executed"
    );
    let tokenizer = server.client_as("tokenizer-1").await.expect("tokenizer");
    let reidentifier = server
        .client_as("reidentifier-1")
        .await
        .expect("reidentifier");
    const VAULT: &str = r#"{"kind":"vault"}"#;
    let passports = ["X12345678", "X87654321", "X12345678", ""];
    let (_, tokens) = values_of(&tokenizer, "study-v", "passport", VAULT, &passports, &[]).await;
    assert!(
        tokens[..3]
            .iter()
            .all(|t| t.starts_with("vt.") && t.len() == 25),
        "{tokens:?}"
    );
    assert_eq!(tokens[0], tokens[2], "one value, one token");
    assert_ne!(tokens[0], tokens[1]);
    assert_eq!(tokens[3], "", "empty stays empty");
    // Another field or domain: another token for the same value.
    let (_, other_field) = values_of(
        &tokenizer,
        "study-v",
        "licence",
        VAULT,
        &passports[..1],
        &[],
    )
    .await;
    let (_, other_domain) = values_of(
        &tokenizer,
        "study-w",
        "passport",
        VAULT,
        &passports[..1],
        &[],
    )
    .await;
    assert_ne!(other_field[0], tokens[0]);
    assert_ne!(other_domain[0], tokens[0]);

    let disclosure = Disclosure {
        domain: "study-v".into(),
        field: "passport".into(),
        transform_json: VAULT.into(),
        purpose: "treatment".into(),
        patient_token: "patient-pseudonym".into(),
        key_version: 0,
    };
    let mut asked = tokens[..2].to_vec();
    asked.push("vt.AAAAAAAAAAAAAAAAAAAAAA".into());
    asked.push(other_field[0].clone());
    let back = reidentifier
        .detokenize(&disclosure, asked)
        .await
        .expect("detokenize");
    assert_eq!(back[0].value, passports[0]);
    assert_eq!(back[1].value, passports[1]);
    assert_ne!(
        back[2].status.as_ref().expect("status").code,
        0,
        "unknown token"
    );
    assert_ne!(
        back[3].status.as_ref().expect("status").code,
        0,
        "token of another field"
    );
    // No grant on study-w: refused before any lookup, whether or not the token exists.
    let mut elsewhere = disclosure.clone();
    elsewhere.domain = "study-w".into();
    for token in [
        other_domain[0].clone(),
        "vt.AAAAAAAAAAAAAAAAAAAAAA".to_string(),
    ] {
        assert_code(
            reidentifier.detokenize(&elsewhere, vec![token]).await,
            Code::PermissionDenied,
            "ungranted domain",
        );
    }

    // Nothing in the store in clear: every text column of every vault row.
    let store = kms_server::store::Store::connect(&db.url, 1)
        .await
        .expect("store");
    let rows = sqlx::query("SELECT * FROM token_vault")
        .fetch_all(store.pool())
        .await
        .expect("rows");
    assert_eq!(
        rows.len(),
        4,
        "three values in study-v (two fields), one in study-w"
    );
    let mut seen_tokens = 0;
    for row in &rows {
        use sqlx::Row;
        for i in 0..row.len() {
            if let Ok(text) = row.try_get::<String, _>(i) {
                for value in &passports[..2] {
                    assert!(
                        !text.contains(value),
                        "a vaulted value in clear in the store"
                    );
                }
                seen_tokens += usize::from(tokens.contains(&text));
            }
        }
    }
    assert_eq!(seen_tokens, 2, "the check reads the rows it should");
}
on_both_stores!(vault_on, vault_tokens);

async fn cli(server: &TestServer, name: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    use clap::Parser;
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
    kms_cli::run(kms_cli::Cli::try_parse_from(argv)?, &mut out).await?;
    Ok(serde_json::from_slice(&out)?)
}

/// The README's commands: domain create, grants, tokenize, detokenize, audit disclosures,
/// domain rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_domain_commands_of_the_readme() {
    let (_db, server) = sqlite_server().await;
    cli(
        &server,
        "officer-1",
        &["key", "create", "--alias", "research"],
    )
    .await
    .expect("key");
    let domain = cli(
        &server,
        "officer-1",
        &["domain", "create", "study-1", "--key", "research"],
    )
    .await
    .expect("domain");
    assert_eq!(domain["current_version"], 1);
    for (who, ops) in [
        ("tokenizer-1", "tokenize,domain-key"),
        ("reidentifier-1", "reidentify"),
    ] {
        let principal = server.principal(who);
        let proposal = cli(
            &server,
            "officer-1",
            &[
                "grants",
                "propose",
                "--principal",
                &principal,
                "--key",
                "research",
                "--operation",
                ops,
                "--context-equals",
                "kms:domain=study-1",
            ],
        )
        .await
        .expect("proposed");
        let id = proposal["approval_id"].as_str().expect("id");
        let done = cli(&server, "officer-2", &["approvals", "approve", id])
            .await
            .expect("approved");
        assert_eq!(done["state"], "executed", "{done}");
    }
    let tokenized = cli(
        &server,
        "tokenizer-1",
        &[
            "tokenize",
            "--domain",
            "study-1",
            "--field",
            "ssn",
            "--transform",
            SSN,
            "999-41-2363",
            "999-52-8812",
        ],
    )
    .await
    .expect("tokenize");
    let tokens: Vec<String> = tokenized["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["value"].as_str().expect("value").to_string())
        .collect();
    assert_eq!(tokens.len(), 2);
    let patient = cli(
        &server,
        "tokenizer-1",
        &[
            "tokenize",
            "--domain",
            "study-1",
            "--field",
            "patient",
            "--transform",
            NAME,
            "Ana Núñez",
        ],
    )
    .await
    .expect("patient pseudonym")["results"][0]["value"]
        .as_str()
        .expect("pseudonym")
        .to_string();
    let mut args = vec![
        "detokenize",
        "--domain",
        "study-1",
        "--field",
        "ssn",
        "--transform",
        SSN,
        "--purpose",
        "safety-signal-follow-up",
        "--patient-token",
        &patient,
    ];
    args.extend(tokens.iter().map(String::as_str));
    let back = cli(&server, "reidentifier-1", &args)
        .await
        .expect("detokenize");
    assert_eq!(back["results"][0]["value"], "999-41-2363");
    assert_eq!(back["results"][1]["value"], "999-52-8812");
    // Without a purpose, clap refuses before any call; the tokenizer is refused by the server.
    assert!(cli(
        &server,
        "reidentifier-1",
        &[
            "detokenize",
            "--domain",
            "study-1",
            "--field",
            "ssn",
            "--transform",
            SSN,
            "--patient-token",
            &patient,
            &tokens[0]
        ]
    )
    .await
    .is_err());
    let mut as_tokenizer = args.clone();
    as_tokenizer[8] = "curiosity";
    assert!(cli(&server, "tokenizer-1", &as_tokenizer).await.is_err());
    // A failed item makes the command fail after printing.
    assert!(cli(
        &server,
        "tokenizer-1",
        &[
            "tokenize",
            "--domain",
            "study-1",
            "--field",
            "ssn",
            "--transform",
            SSN,
            "99X-41-2363"
        ]
    )
    .await
    .is_err());

    let listed = cli(
        &server,
        "auditor-1",
        &["audit", "disclosures", "--patient-token", &patient],
    )
    .await
    .expect("disclosures");
    let listed = listed.as_array().expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["outcome"], "ok");
    assert_eq!(listed[0]["purpose"], "safety-signal-follow-up");
    assert_eq!(listed[0]["tokens"], "2");
    assert_eq!(listed[1]["outcome"], "denied");
    assert_eq!(listed[1]["purpose"], "curiosity");

    let rotation = cli(&server, "officer-1", &["domain", "rotate", "study-1"])
        .await
        .expect("rotate");
    assert_eq!(rotation["kind"], "domain-rotation");
    let id = rotation["approval_id"].as_str().expect("id");
    cli(&server, "officer-2", &["approvals", "approve", id])
        .await
        .expect("approve");
    let domains = cli(&server, "officer-1", &["domain", "list"])
        .await
        .expect("list");
    assert_eq!(domains[0]["current_version"], 2);
}

/// `kms-cli deid` on the Synthea CSV export and FHIR bundles: the domain key comes from the
/// KMS (a `domain-key` grant; `tokenize` alone is refused), the report is written next to the
/// output and holds no value, and no SSN or name of the input is in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_cli_deid_on_the_synthea_export() {
    let (_db, server) = sqlite_server().await;
    cli(
        &server,
        "officer-1",
        &["key", "create", "--alias", "research"],
    )
    .await
    .expect("key");
    cli(
        &server,
        "officer-1",
        &["domain", "create", "study-1", "--key", "research"],
    )
    .await
    .expect("domain");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/synthea");
    let out = tempfile::tempdir().expect("out");
    let csv_out = out.path().join("csv");
    let csv_out = csv_out.to_str().expect("utf-8");
    let deid_csv = [
        "deid",
        "--policy",
        "hipaa-safe-harbor-synthea-csv",
        "--domain",
        "study-1",
        "--in",
        &format!("{data}/csv"),
        "--out",
        csv_out,
        "--quiet",
    ];
    // Only `tokenize`: the key is refused, nothing is written.
    assert_eq!(
        grant(
            &server,
            &server.principal("tokenizer-1"),
            "research",
            &["tokenize"],
            None
        )
        .await,
        "executed"
    );
    let refused = cli(&server, "tokenizer-1", &deid_csv)
        .await
        .expect_err("no domain-key grant");
    assert!(
        format!("{refused:#}").contains("PermissionDenied"),
        "{refused:#}"
    );
    assert!(!std::path::Path::new(csv_out).join("patients.csv").exists());
    assert_eq!(
        grant(
            &server,
            &server.principal("tokenizer-1"),
            "research",
            &["domain-key"],
            Some("study-1")
        )
        .await,
        "executed"
    );
    let done = cli(&server, "tokenizer-1", &deid_csv)
        .await
        .expect("deid csv");
    let report = &done["report"];
    assert_eq!(report["domain"], "study-1");
    assert_eq!(report["key_version"], 1);
    assert_eq!(report["rejected"], 0);
    assert!(
        report["records"].as_u64().expect("records") > 40_000,
        "{report}"
    );
    let written: serde_json::Value = serde_json::from_slice(
        &std::fs::read(done["report_file"].as_str().expect("report file")).expect("report"),
    )
    .expect("report json");
    assert_eq!(written["records"], report["records"]);

    // Leak check on the values that identify a patient most directly.
    let patients = std::fs::read_to_string(format!("{data}/csv/patients.csv")).expect("input");
    let mut reader = csv::Reader::from_reader(patients.as_bytes());
    let headers = reader.headers().expect("headers").clone();
    let column = |name: &str| headers.iter().position(|h| h == name).expect(name);
    let (ssn, first, last, id) = (column("SSN"), column("FIRST"), column("LAST"), column("Id"));
    let mut secrets = Vec::new();
    for row in reader.records() {
        let row = row.expect("row");
        secrets.extend([&row[ssn], &row[first], &row[last], &row[id]].map(|v| v.to_lowercase()));
    }
    assert!(secrets.len() > 40);
    let mut output = String::new();
    for entry in std::fs::read_dir(csv_out).expect("out dir") {
        output.push_str(
            &std::fs::read_to_string(entry.expect("entry").path())
                .expect("file")
                .to_lowercase(),
        );
    }
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(
            !output.contains(secret.as_str()),
            "an input identifier in the output"
        );
    }

    // FHIR bundles with the FHIR profile, into their own folder.
    let fhir_out = out.path().join("fhir");
    let fhir = cli(
        &server,
        "tokenizer-1",
        &[
            "deid",
            "--policy",
            "hipaa-safe-harbor-fhir-r4",
            "--domain",
            "study-1",
            "--in",
            &format!("{data}/fhir"),
            "--out",
            fhir_out.to_str().expect("utf-8"),
            "--quiet",
        ],
    )
    .await
    .expect("deid fhir");
    assert!(
        fhir["report"]["records"].as_u64().expect("records") >= 9,
        "{fhir}"
    );
    // Running again without --force refuses to replace the output.
    assert!(cli(&server, "tokenizer-1", &deid_csv).await.is_err());
}
