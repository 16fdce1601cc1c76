//! The Synthea FHIR R4 bundles (and the same resources as NDJSON) through the built-in Safe
//! Harbor profile: leaks, references, date intervals, pseudonym consistency.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use deid::{DeidError, Engine, Options, Policy, Report, UnknownFields};
use serde_json::Value;

use crate::common::*;

/// One run of the bundles, shared by the tests that only read it.
fn standard() -> &'static (PathBuf, Report) {
    static RUN: OnceLock<(PathBuf, Report)> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deid-synthea-fhir");
        let _ = std::fs::remove_dir_all(&out);
        let report = run(
            &engine(FHIR_PROFILE),
            Path::new(SYNTHEA_FHIR),
            &out,
            &dated_options(),
        )
        .expect("the Synthea bundles de-identify");
        (out, report)
    })
}

fn load(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// (input bundle, output bundle) for every file.
fn pairs() -> Vec<(Value, Value)> {
    let (out, report) = standard();
    report
        .files
        .iter()
        .map(|f| (load(&f.input), load(&out.join(&f.file))))
        .collect()
}

fn resources(bundle: &Value) -> impl Iterator<Item = &Value> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["resource"])
}

/// Every string in `v` with its JSON pointer.
fn strings<'v>(v: &'v Value, path: String, out: &mut Vec<(String, &'v str)>) {
    match v {
        Value::String(s) => out.push((path, s)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{path}/{i}"), out);
            }
        }
        Value::Object(m) => {
            for (k, item) in m {
                strings(item, format!("{path}/{k}"), out);
            }
        }
        _ => {}
    }
}

fn texts_at<'v>(v: &'v Value, path: &[&str]) -> Vec<&'v str> {
    let mut cur = vec![v];
    for key in path {
        let mut next = Vec::new();
        for c in cur {
            match &c[*key] {
                Value::Array(items) => next.extend(items.iter()),
                Value::Null => {}
                other => next.push(other),
            }
        }
        cur = next;
    }
    cur.into_iter().filter_map(Value::as_str).collect()
}

#[test]
fn every_bundle_is_written_under_a_pseudonymous_name() {
    let (out, report) = standard();
    assert_eq!(report.files.len(), 11);
    assert_eq!(report.rejected, 0);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let mut renamed = 0;
    for f in &report.files {
        assert_eq!(f.format, "fhir-bundle");
        assert!(out.join(&f.file).is_file());
        let input = f.input.file_name().unwrap().to_string_lossy();
        if input.starts_with("hospitalInformation") || input.starts_with("practitionerInformation")
        {
            assert_eq!(f.file, input);
            continue;
        }
        // The input names (Given_Family_uuid.json) say who the patient is.
        let stem = f.file.strip_suffix(".json").unwrap();
        assert_eq!(stem.len(), 36, "{}", f.file);
        for part in input.trim_end_matches(".json").split('_') {
            assert!(!f.file.contains(part), "{part}");
        }
        renamed += 1;
    }
    assert_eq!(renamed, 9);
    for kind in [
        "pseudonym",
        "date_shift",
        "reference",
        "zip3",
        "drop",
        "redact",
        "keep",
    ] {
        assert!(
            report.transforms.get(kind).copied().unwrap_or(0) > 0,
            "no {kind}"
        );
    }
}

#[test]
fn no_identifier_of_the_input_appears_in_the_output() {
    let (out, _) = standard();
    let mut secrets: Vec<(String, String)> = Vec::new();
    for (input, output) in pairs() {
        for r in resources(&input) {
            let mut add = |kind: &str, path: &[&str]| {
                for t in texts_at(r, path) {
                    secrets.push((kind.to_owned(), t.to_owned()));
                }
            };
            add("id", &["id"]);
            add("identifier", &["identifier", "value"]);
            add("family name", &["name", "family"]);
            add("given name", &["name", "given"]);
            add("phone or e-mail", &["telecom", "value"]);
            add("address", &["address", "line"]);
            add("city", &["address", "city"]);
            add("free-text answer", &["component", "valueString"]);
            if r["resourceType"] == "Organization" || r["resourceType"] == "Location" {
                add("organization name", &["name"]);
            }
            for ext in r["extension"].as_array().into_iter().flatten() {
                if let Some(v) = ext["valueString"].as_str() {
                    if ext["url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with("mothersMaidenName"))
                    {
                        secrets.push(("mother's maiden name".into(), v.to_owned()));
                    }
                }
                if let Some(city) = ext["valueAddress"]["city"].as_str() {
                    secrets.push(("birthplace".into(), city.to_owned()));
                }
            }
        }
        // Nothing that carries free text or attachments is left.
        let mut all = Vec::new();
        strings(&output, String::new(), &mut all);
        for (path, value) in &all {
            assert!(
                !path.ends_with("/data") && !path.ends_with("/div"),
                "{path} kept"
            );
            assert!(
                !path.contains("/display") || !value.contains("Dr."),
                "{path} kept a name"
            );
        }
        // Postal codes are cut to three digits; street lines, cities, phones and e-mails gone.
        for (path, _) in &all {
            for gone in ["/line/", "/city", "/telecom/", "/birthPlace"] {
                assert!(!path.contains(gone), "{path} kept");
            }
        }
        for r in resources(&output) {
            for z in texts_at(r, &["address", "postalCode"]) {
                assert!(z.len() == 3 && z.bytes().all(|b| b.is_ascii_digit()), "{z}");
            }
        }
    }
    let checked = assert_no_leaks(out, &secrets);
    assert!(checked > 1500, "only {checked} values checked");
}

#[test]
fn dates_of_birth_are_shifted() {
    let mut patients = 0;
    let mut unchanged = 0;
    for (input, output) in pairs() {
        for (a, b) in resources(&input).zip(resources(&output)) {
            if a["resourceType"] == "Patient" {
                let (x, y) = (
                    a["birthDate"].as_str().unwrap(),
                    b["birthDate"].as_str().unwrap(),
                );
                patients += 1;
                unchanged += usize::from(x == y);
            }
        }
    }
    assert_eq!(patients, 9);
    assert!(unchanged <= 1);
}

#[test]
fn every_reference_resolves() {
    let all: Vec<Value> = pairs().into_iter().map(|(_, o)| o).collect();
    // Identifiers of every resource of every output bundle, for conditional references.
    let mut identifiers: HashSet<(String, String, String)> = HashSet::new();
    for bundle in &all {
        for r in resources(bundle) {
            for id in r["identifier"].as_array().into_iter().flatten() {
                if let (Some(s), Some(v)) = (id["system"].as_str(), id["value"].as_str()) {
                    identifiers.insert((
                        r["resourceType"].as_str().unwrap().to_owned(),
                        s.to_owned(),
                        v.to_owned(),
                    ));
                }
            }
        }
    }
    let (mut urn, mut conditional, mut local) = (0, 0, 0);
    for bundle in &all {
        let entries = bundle["entry"].as_array().unwrap();
        let full_urls: HashSet<&str> = entries
            .iter()
            .filter_map(|e| e["fullUrl"].as_str())
            .collect();
        for e in entries {
            let r = &e["resource"];
            assert_eq!(
                e["fullUrl"].as_str().unwrap(),
                format!("urn:uuid:{}", r["id"].as_str().unwrap())
            );
            let contained: HashSet<&str> = r["contained"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["id"].as_str())
                .collect();
            let mut refs = Vec::new();
            strings(r, String::new(), &mut refs);
            for (path, reference) in refs.into_iter().filter(|(p, _)| p.ends_with("/reference")) {
                if reference.starts_with("urn:uuid:") {
                    assert!(
                        full_urls.contains(reference),
                        "{path}: {reference} does not resolve"
                    );
                    urn += 1;
                } else if let Some(id) = reference.strip_prefix('#') {
                    assert!(contained.contains(id), "{path}: #{id}");
                    local += 1;
                } else {
                    let (rtype, query) = reference
                        .split_once("?identifier=")
                        .unwrap_or_else(|| panic!("{path}: {reference}"));
                    let (system, value) = query.split_once('|').unwrap();
                    assert!(
                        identifiers.contains(&(
                            rtype.to_owned(),
                            system.to_owned(),
                            value.to_owned()
                        )),
                        "{path}: {reference} matches no identifier"
                    );
                    conditional += 1;
                }
            }
            if let Some(q) = e["request"]["ifNoneExist"].as_str() {
                let (system, value) = q
                    .strip_prefix("identifier=")
                    .unwrap()
                    .split_once('|')
                    .unwrap();
                let rtype = r["resourceType"].as_str().unwrap();
                assert!(identifiers.contains(&(
                    rtype.to_owned(),
                    system.to_owned(),
                    value.to_owned()
                )));
            }
        }
    }
    assert!(
        urn > 5000 && conditional > 1000 && local > 100,
        "{urn} {conditional} {local}"
    );
}

fn is_date(s: &str) -> bool {
    s.len() >= 10 && days(s).is_some()
}

#[test]
fn date_intervals_per_patient_are_kept_exactly() {
    let mut compared = 0;
    let mut total = 0;
    for (input, output) in pairs() {
        let mut offset: Option<i64> = None;
        let ins: Vec<&Value> = resources(&input).collect();
        let outs: Vec<&Value> = resources(&output).collect();
        assert_eq!(ins.len(), outs.len());
        for (a, b) in ins.iter().zip(&outs) {
            let mut dates = Vec::new();
            strings(a, String::new(), &mut dates);
            for (path, x) in dates
                .into_iter()
                .filter(|(p, s)| is_date(s) && !p.contains("/extension/"))
            {
                total += 1;
                let Some(y) = b.pointer(&path).and_then(Value::as_str) else {
                    continue;
                };
                let ((dx, tx), (dy, ty)) = (days(x).unwrap(), days(y).unwrap());
                assert_eq!(tx, ty, "{path}: time of day changed");
                let o = *offset.get_or_insert(dy - dx);
                assert_eq!(
                    o,
                    dy - dx,
                    "{path}: another offset in the same patient's bundle"
                );
                assert!(o.abs() <= 365);
                compared += 1;
            }
        }
    }
    assert!(compared > 5000, "{compared}");
    assert!(
        compared * 10 >= total * 9,
        "only {compared} of {total} dates found again"
    );
}

/// Writes the resources of some bundles as NDJSON, one file per type.
fn to_ndjson(bundles: &[PathBuf], dir: &Path, skip: &[&str]) -> usize {
    let mut files: HashMap<String, String> = HashMap::new();
    let mut n = 0;
    for b in bundles {
        for r in resources(&load(b)) {
            let t = r["resourceType"].as_str().unwrap();
            if skip.contains(&t) {
                continue;
            }
            let line = files.entry(t.to_owned()).or_default();
            line.push_str(&serde_json::to_string(r).unwrap());
            line.push('\n');
            n += 1;
        }
    }
    for (t, text) in files {
        std::fs::write(dir.join(format!("{t}.ndjson")), text).unwrap();
    }
    n
}

#[test]
fn ndjson_resources_come_out_as_in_the_bundle() {
    let (out, report) = standard();
    let bundles: Vec<PathBuf> = report
        .files
        .iter()
        .map(|f| f.input.clone())
        .filter(|p| p.to_string_lossy().contains("_"))
        .take(3)
        .collect();
    assert_eq!(bundles.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    // Provenance names no patient: in a bundle it belongs to the bundle's one Patient, alone on
    // an NDJSON line it has no patient to shift its date for.
    let n = to_ndjson(&bundles, dir.path(), &["Provenance"]);
    let nd_out = tempfile::tempdir().unwrap();
    let nd_report = run(
        &engine(FHIR_PROFILE),
        dir.path(),
        nd_out.path(),
        &Options::default(),
    )
    .unwrap();
    assert_eq!(nd_report.records as usize, n);
    assert!(nd_report.files.iter().all(|f| f.format == "fhir-ndjson"));
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for f in &report.files {
        for r in resources(&load(&out.join(&f.file))) {
            by_id.insert(r["id"].as_str().unwrap().to_owned(), r.clone());
        }
    }
    let mut same = 0;
    for f in &nd_report.files {
        for line in std::fs::read_to_string(nd_out.path().join(&f.file))
            .unwrap()
            .lines()
        {
            let r: Value = serde_json::from_str(line).unwrap();
            let id = r["id"].as_str().unwrap();
            assert_eq!(
                &r,
                by_id
                    .get(id)
                    .unwrap_or_else(|| panic!("{id} not in the bundle output"))
            );
            same += 1;
        }
    }
    assert_eq!(same, n);
}

#[test]
fn a_patient_keeps_its_pseudonym_and_offset_between_csv_and_fhir() {
    let csv_in = Table::read(&Path::new(SYNTHEA_CSV).join("patients.csv"));
    let (id, birth) = (csv_in.values("Id")[0], csv_in.values("BIRTHDATE")[0]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("csv")).unwrap();
    std::fs::create_dir(dir.path().join("fhir")).unwrap();
    std::fs::copy(
        Path::new(SYNTHEA_CSV).join("patients.csv"),
        dir.path().join("csv/patients.csv"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("fhir/Patient.ndjson"),
        format!("{{\"resourceType\":\"Patient\",\"id\":\"{id}\",\"birthDate\":\"{birth}\"}}\n"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    run(
        &engine(CSV_PROFILE),
        &dir.path().join("csv"),
        &out.path().join("csv"),
        &Options::default(),
    )
    .unwrap();
    run(
        &engine(FHIR_PROFILE),
        &dir.path().join("fhir"),
        &out.path().join("fhir"),
        &Options::default(),
    )
    .unwrap();
    let csv_out = Table::read(&out.path().join("csv/patients.csv"));
    let fhir_files: Vec<PathBuf> = entries(&out.path().join("fhir"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    let patient: Value =
        serde_json::from_str(std::fs::read_to_string(&fhir_files[0]).unwrap().trim()).unwrap();
    assert_eq!(patient["id"].as_str().unwrap(), csv_out.values("Id")[0]);
    assert_eq!(
        patient["birthDate"].as_str().unwrap(),
        csv_out.values("BIRTHDATE")[0]
    );
    assert_ne!(patient["id"].as_str().unwrap(), id);
}

#[test]
fn unknown_elements_and_extensions_are_dropped_and_reported_or_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Patient.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"p1\",\"gender\":\"female\"}\n\
         {\"resourceType\":\"Patient\",\"id\":\"p2\",\"nickname\":\"Bobbie77\",\"extension\":[{\"url\":\"http://example.org/favourite-nurse\",\"valueString\":\"Nurse Ratched12\"}]}\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = run(
        &engine(FHIR_PROFILE),
        dir.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap();
    let fields: Vec<&str> = report.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "Patient.extension(http://example.org/favourite-nurse)",
            "Patient.nickname"
        ]
    );
    let secrets = vec![
        ("nickname".into(), "Bobbie77".into()),
        ("extension".into(), "Nurse Ratched12".into()),
    ];
    assert_eq!(assert_no_leaks(out.path(), &secrets), 2);

    let strict = Policy::builtin(FHIR_PROFILE)
        .unwrap()
        .with_unknown_fields(UnknownFields::Error);
    let out = tempfile::tempdir().unwrap();
    let err = run(
        &Engine::new(&strict, &key()).unwrap(),
        dir.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap_err();
    match &err {
        DeidError::UnknownField { line, field, .. } => {
            assert_eq!(*line, 2);
            assert!(field.starts_with("Patient."), "{field}");
        }
        other => panic!("{other}"),
    }
    assert!(!err.to_string().contains("Bobbie77") && !err.to_string().contains("Ratched"));
    assert!(entries(out.path()).is_empty());
}

#[test]
fn relative_references_follow_the_pseudonym_of_their_target() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Patient.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"p-1\",\"birthDate\":\"1970-05-06\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("Encounter.ndjson"),
        "{\"resourceType\":\"Encounter\",\"id\":\"e-1\",\"status\":\"finished\",\"subject\":{\"reference\":\"Patient/p-1\"},\"period\":{\"start\":\"1990-05-06T10:00:00+02:00\"}}\n\
         {\"resourceType\":\"Encounter\",\"id\":\"e-2\",\"status\":\"finished\",\"subject\":{\"reference\":\"https://ehr.example.org/fhir/Patient/p-1/_history/3\"},\"period\":{\"start\":\"1991-01-01\"}}\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = run(
        &engine(FHIR_PROFILE),
        dir.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap();
    assert_eq!((report.records, report.rejected), (3, 0));
    let read = |name: &str| -> Vec<Value> {
        std::fs::read_to_string(out.path().join(name))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let patient = &read("Patient.ndjson")[0];
    let encounters = read("Encounter.ndjson");
    let pid = patient["id"].as_str().unwrap();
    assert_ne!(pid, "p-1");
    assert_eq!(
        encounters[0]["subject"]["reference"],
        format!("Patient/{pid}")
    );
    // An absolute reference loses the server's base, keeps the version.
    assert_eq!(
        encounters[1]["subject"]["reference"],
        format!("Patient/{pid}/_history/3")
    );
    // Both encounters are the patient's: the birth-to-visit intervals are kept.
    let (birth, _) = days(patient["birthDate"].as_str().unwrap()).unwrap();
    let (visit, time) = days(encounters[0]["period"]["start"].as_str().unwrap()).unwrap();
    assert_eq!(
        visit - birth,
        days("1990-05-06").unwrap().0 - days("1970-05-06").unwrap().0
    );
    assert_eq!(time, "T10:00:00+02:00");
    let (visit2, _) = days(encounters[1]["period"]["start"].as_str().unwrap()).unwrap();
    assert_eq!(
        visit2 - birth,
        days("1991-01-01").unwrap().0 - days("1970-05-06").unwrap().0
    );
}

#[test]
fn a_bundle_over_the_size_limit_is_refused_unread() {
    let (_, report) = standard();
    let big = report.files.iter().map(|f| f.bytes_in).max().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in report.files.iter().take(2) {
        std::fs::copy(&f.input, dir.path().join(f.input.file_name().unwrap())).unwrap();
    }
    let options = Options {
        max_document_bytes: 1000,
        ..Options::default()
    };
    let out = tempfile::tempdir().unwrap();
    let err = run(&engine(FHIR_PROFILE), dir.path(), out.path(), &options).unwrap_err();
    assert!(
        matches!(err, DeidError::TooLarge { limit: 1000, .. }),
        "{err}"
    );
    assert!(entries(out.path()).is_empty());
    let options = Options {
        max_document_bytes: big,
        ..Options::default()
    };
    let report = run(&engine(FHIR_PROFILE), dir.path(), out.path(), &options).unwrap();
    assert_eq!(report.records, 2);
}
