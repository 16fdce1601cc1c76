//! Policy files: errors name the line, semantic checks, built-in profiles by name, custom
//! `[[json]]` rules by JSON pointer, and the leak checker itself.

use std::path::Path;

use deid::{DeidError, Engine, Options, Policy};
use tokenize::DomainKey;
use zeroize::Zeroizing;

use crate::common::*;

fn policy_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load_err(text: &str) -> (String, usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = policy_file(dir.path(), text);
    match Policy::from_file(&path) {
        Err(DeidError::Policy(e)) => {
            assert_eq!(e.origin, path.display().to_string());
            (e.to_string(), e.line)
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("accepted:\n{text}"),
    }
}

const HEAD: &str = "domain = \"study\"\nunknown_fields = \"error\"\n";

#[test]
fn syntax_and_semantic_errors_name_the_line() {
    let cases: [(&str, usize, &str); 8] = [
        ("[[csv]\nfiles = []\n", 3, ""),
        ("[[csv]]\nfiles = [\"*\"]\ncolumns = { A = \"keep\" \n", 5, ""),
        ("[[csv]]\nfiles = [\"*\"]\nfils = 1\n", 5, "unknown field `fils`"),
        ("[[csv]]\nfiles = [\"*\"]\n[csv.columns]\nSSN = { kind = \"hash\" }\n", 6, "unknown variant `hash`"),
        ("[[csv]]\nfiles = [\"*\"]\n[csv.columns]\nSSN = { kind = \"fpe\", alphabet = \"digits\", max_len = 3 }\n", 6, "fpe"),
        ("[[csv]]\nfiles = [\"*\"]\n[csv.columns]\nDOB = { kind = \"date_shift\", max_days = 10 }\n", 3, "patient"),
        ("[transforms]\nd1 = { kind = \"date_shift\", max_days = 10 }\nd2 = { kind = \"date_shift\", max_days = 20 }\n", 5, "max_days"),
        ("[transforms]\nid = { kind = \"pseudonym\" }\n[patient]\ntransform = \"id\"\n", 6, "explicit `key`"),
    ];
    for (body, line, needle) in cases {
        let (shown, got) = load_err(&format!("{HEAD}{body}"));
        assert_eq!(got, line, "{shown}");
        assert!(shown.contains(&format!(":{line}:")), "{shown}");
        assert!(shown.contains(needle), "{shown}");
    }
}

#[test]
fn a_minimal_policy_needs_its_choices() {
    // Safe Harbor policies must say what happens to unknown fields.
    let (shown, line) = load_err("domain = \"study\"\n");
    assert!(shown.contains("unknown_fields"), "{shown}");
    assert_eq!(line, 1);
    let (shown, _) = load_err("domain = \"\"\nunknown_fields = \"warn\"\n");
    assert!(shown.contains("domain"), "{shown}");
}

#[test]
fn builtin_profiles_load_by_name_and_a_key_of_another_domain_is_refused() {
    for name in deid::BUILTIN_PROFILES {
        let p = Policy::load(name).unwrap();
        assert_eq!(p.name(), name);
        assert!(Policy::builtin_source(name)
            .unwrap()
            .contains("unknown_fields"));
    }
    let p = Policy::load(CSV_PROFILE).unwrap().with_domain("study-42");
    let err = Engine::new(&p, &key()).unwrap_err();
    assert!(matches!(err, DeidError::DomainMismatch { .. }), "{err}");
    let other = DomainKey::new("study-42", 3, Zeroizing::new([9u8; 32]));
    let engine = Engine::new(&p, &other).unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = run(
        &engine,
        &Path::new(SYNTHEA_CSV).join("patients.csv"),
        out.path(),
        &Options::default(),
    )
    .unwrap();
    assert_eq!(
        (report.domain.as_str(), report.key_version),
        ("study-42", 3)
    );
    // Another domain's pseudonyms are unrelated to the test domain's.
    let theirs = Table::read(&out.path().join("patients.csv"));
    let out2 = tempfile::tempdir().unwrap();
    run(
        &engine_for(CSV_PROFILE),
        &Path::new(SYNTHEA_CSV).join("patients.csv"),
        out2.path(),
        &Options::default(),
    )
    .unwrap();
    let ours = Table::read(&out2.path().join("patients.csv"));
    assert!(theirs
        .values("Id")
        .iter()
        .zip(ours.values("Id"))
        .all(|(a, b)| *a != b));
    assert!(Policy::load("/no/such/policy.toml").is_err());
}

fn engine_for(profile: &str) -> Engine {
    engine(profile)
}

const JSON_POLICY: &str = r#"
name = "visits"
domain = "research"
unknown_fields = "warn"

[patient]
transform = "mrn"

[transforms]
mrn = { kind = "pseudonym", normalize = "mrn", key = "patient" }
date = { kind = "date_shift", max_days = 30 }

[[json]]
files = ["*.jsonl"]
patient = "/patient/mrn"
[json.fields]
"/patient/mrn" = "mrn"
"/patient/name" = "drop"
"/patient/zip" = "zip3"
"/visits/*/date" = "date"
"/visits/*/code" = "keep"
"/note" = "redact"
"#;

#[test]
fn json_records_follow_pointer_rules() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("visits.jsonl"),
        "{\"patient\":{\"mrn\":\"000123456\",\"name\":\"Ann Smith77\",\"zip\":\"02138\"},\"visits\":[{\"date\":\"2020-01-01\",\"code\":\"A1\"},{\"date\":\"2020-01-31T08:00:00Z\",\"code\":\"B2\"}],\"note\":\"called Ann Smith77\",\"colour\":\"blue\"}\n\
         {\"patient\":{\"mrn\":\"0000123456\",\"zip\":\"90210\"},\"visits\":[{\"date\":\"2021-06-30\",\"code\":\"C3\"}]}\n",
    )
    .unwrap();
    let policy = Policy::from_toml(JSON_POLICY, "visits.toml").unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = run(
        &Engine::new(&policy, &key()).unwrap(),
        dir.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.warnings.len(), 1);
    assert_eq!(report.warnings[0].field, "/colour");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.path().join("visits.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (a, b) = (&lines[0], &lines[1]);
    // MRN normalization: `000123456` and `0000123456` are one patient, one pseudonym.
    assert_eq!(a["patient"]["mrn"], b["patient"]["mrn"]);
    assert!(a["patient"]["mrn"].as_str().unwrap().starts_with("v1."));
    assert!(a["patient"].get("name").is_none() && a.get("colour").is_none());
    assert_eq!(a["patient"]["zip"], "021");
    assert_eq!(a["note"], "[REDACTED]");
    assert_eq!(a["visits"][1]["code"], "B2");
    // One offset per patient: both records' dates move alike, the interval is kept.
    fn d(v: &serde_json::Value) -> (i64, &str) {
        days(v.as_str().unwrap()).unwrap()
    }
    let off_a = d(&a["visits"][0]["date"]).0 - days("2020-01-01").unwrap().0;
    let off_b = d(&b["visits"][0]["date"]).0 - days("2021-06-30").unwrap().0;
    assert_eq!(off_a, off_b);
    assert!(off_a.abs() <= 30);
    assert_eq!(
        d(&a["visits"][1]["date"]).0 - d(&a["visits"][0]["date"]).0,
        30
    );
    assert_eq!(d(&a["visits"][1]["date"]).1, "T08:00:00Z");
    let secrets = vec![
        ("name".into(), "Ann Smith77".into()),
        ("mrn".into(), "000123456".into()),
    ];
    assert_eq!(assert_no_leaks(out.path(), &secrets), 2);
}

#[test]
fn the_leak_check_finds_a_value_in_another_case_and_spacing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("out.csv"),
        "x,y\n1,\"MARCELINA 712\"\n2,999 41 2363\n",
    )
    .unwrap();
    for secret in ["Marcelina712", "999-41-2363"] {
        let secrets = vec![("value".to_owned(), secret.to_owned())];
        let caught = std::panic::catch_unwind(|| assert_no_leaks(dir.path(), &secrets));
        assert!(caught.is_err(), "{secret} not found");
    }
    let clean = vec![("value".to_owned(), "Heathcote539".to_owned())];
    assert_eq!(assert_no_leaks(dir.path(), &clean), 1);
}
