//! Malformed inputs (bad CSV quoting, an invalid NDJSON line, a bundle that is not a Bundle,
//! values a transform refuses): reported with file and line, skipped into a reject file or
//! stopping the run; a failed run leaves no file in the output directory; errors carry no
//! values.

use std::path::Path;

use deid::{DeidError, OnMalformed, Options, RejectReason};

use crate::common::*;

fn reject_into(dir: &Path) -> Options {
    Options {
        on_malformed: OnMalformed::Reject {
            dir: dir.to_owned(),
        },
        ..Options::default()
    }
}

/// patients.csv with line 5 broken by `broken`.
fn patients_with(dir: &Path, broken: impl Fn(&str) -> String) -> (String, usize) {
    let text = std::fs::read_to_string(Path::new(SYNTHEA_CSV).join("patients.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let original = lines[4].clone();
    lines[4] = broken(&original);
    std::fs::write(dir.join("patients.csv"), lines.join("\n") + "\n").unwrap();
    (lines[4].clone(), lines.len() - 1)
}

#[test]
fn bad_csv_quoting_stops_the_run_with_file_and_line() {
    let input = tempfile::tempdir().unwrap();
    // A quote inside an unquoted field: `Marcelina712` → `Marce"lina712`.
    let (bad, _) = patients_with(input.path(), |l| l.replacen(",999-", ",9\"99-", 1));
    let out = tempfile::tempdir().unwrap();
    let err = run(
        &engine(CSV_PROFILE),
        input.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap_err();
    match &err {
        DeidError::Malformed { file, line, reason } => {
            assert!(file.ends_with("patients.csv"));
            assert_eq!(*line, 5);
            assert_eq!(*reason, RejectReason::QuoteInUnquotedField);
        }
        other => panic!("{other}"),
    }
    let shown = err.to_string();
    assert!(shown.contains("patients.csv:5:"), "{shown}");
    let ssn = bad.split(',').nth(3).unwrap();
    assert!(!shown.contains(ssn), "{shown}");
    assert!(entries(out.path()).is_empty(), "{:?}", entries(out.path()));
}

#[test]
fn bad_csv_quoting_is_rejected_into_the_reject_file() {
    let input = tempfile::tempdir().unwrap();
    let (bad, rows) = patients_with(input.path(), |l| format!("\"{l}\"x"));
    let out = tempfile::tempdir().unwrap();
    let rejects = tempfile::tempdir().unwrap();
    let report = run(
        &engine(CSV_PROFILE),
        input.path(),
        out.path(),
        &reject_into(rejects.path()),
    )
    .unwrap();
    assert_eq!(report.rejected, 1);
    assert_eq!(report.records as usize, rows - 1);
    let r = &report.rejects[0];
    assert_eq!((r.file.as_str(), r.line), ("patients.csv", 5));
    assert_eq!(r.reason, RejectReason::TextAfterClosingQuote.to_string());
    // The reject file holds the header and the original record; the output has the rest.
    let rejected = std::fs::read_to_string(rejects.path().join("patients.csv")).unwrap();
    assert!(rejected.starts_with("Id,BIRTHDATE,"));
    assert_eq!(rejected.lines().nth(1).unwrap(), bad);
    assert_eq!(
        Table::read(&out.path().join("patients.csv")).rows.len(),
        rows - 1
    );
    // The report (in the output directory) names the reason, never the record.
    let text = std::fs::read_to_string(out.path().join("deid-report.json")).unwrap();
    assert!(text.contains("\"line\": 5"));
    let ssn = bad.split(',').nth(3).unwrap();
    assert!(!text.contains(ssn));
    // The reject file holds the original record: its owner alone may read it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(rejects.path().join("patients.csv"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn an_unterminated_quote_is_one_reject_and_the_rest_stays_aligned() {
    let input = tempfile::tempdir().unwrap();
    std::fs::write(
        input.path().join("conditions.csv"),
        "START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\n\
         2020-01-01,,p1,e1,1,\"Fever\n\
         2020-01-02,,p1,e1,2,Cough\n\
         2020-01-03,,p1,e1,3,\"Sore, throat\"\n\
         2020-01-04,,p1,e1,4,Rash\n",
    )
    .unwrap();
    let (out, rejects) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let report = run(
        &engine(CSV_PROFILE),
        input.path(),
        out.path(),
        &reject_into(rejects.path()),
    )
    .unwrap();
    // The open quote swallows lines 2-4 up to the next quote, then text follows it: one
    // record rejected from line 2; line 5 is read as it was written.
    assert_eq!(report.rejects.len(), 1, "{:?}", report.rejects);
    assert_eq!(report.rejects[0].line, 2);
    let o = Table::read(&out.path().join("conditions.csv"));
    assert_eq!(o.values("DESCRIPTION"), vec!["Rash"]);
}

#[test]
fn an_invalid_ndjson_line_is_reported_with_its_line() {
    let input = tempfile::tempdir().unwrap();
    std::fs::write(
        input.path().join("Patient.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"a\",\"birthDate\":\"1990-01-01\"}\n\
         {\"resourceType\":\"Patient\",\"id\":\"b\",\"birthDate\":\"1991-02-02\"}\n\
         {\"resourceType\":\"Patient\",\"id\":\"c\",\"name\":[{\"family\":\"Leaky123\"}]\n\
         {\"resourceType\":\"Patient\",\"id\":\"d\",\"birthDate\":\"1993-04-04\"}\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(
        &engine(FHIR_PROFILE),
        input.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap_err();
    match &err {
        DeidError::Malformed {
            line,
            reason: RejectReason::InvalidJson { category, .. },
            ..
        } => {
            assert_eq!((*line, *category), (3, "eof"));
        }
        other => panic!("{other}"),
    }
    assert!(!err.to_string().contains("Leaky123"));
    assert!(entries(out.path()).is_empty());

    let rejects = tempfile::tempdir().unwrap();
    let report = run(
        &engine(FHIR_PROFILE),
        input.path(),
        out.path(),
        &reject_into(rejects.path()),
    )
    .unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(
        (report.rejects[0].file.as_str(), report.rejects[0].line),
        ("Patient.ndjson", 3)
    );
    let rejected = std::fs::read_to_string(rejects.path().join("Patient.ndjson")).unwrap();
    assert!(rejected.contains("Leaky123") && rejected.lines().count() == 1);
}

#[test]
fn a_bundle_that_is_not_a_bundle_is_reported() {
    let input = tempfile::tempdir().unwrap();
    std::fs::write(
        input.path().join("a.json"),
        "{\"resourceType\":\"Patient\",\"id\":\"x\"}",
    )
    .unwrap();
    std::fs::write(
        input.path().join("b.json"),
        "{\"resourceType\":\"Bundle\",\"entry\":[{\"fullUrl\":\"urn:uuid:1\"}]}",
    )
    .unwrap();
    std::fs::write(
        input.path().join("c.json"),
        "{\"resourceType\":\"Bundle\",\n\"entry\": [,]}",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(
        &engine(FHIR_PROFILE),
        input.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap_err();
    match &err {
        DeidError::Malformed { file, line, reason } => {
            assert!(file.ends_with("a.json"));
            assert_eq!(*line, 1);
            assert_eq!(reason.to_string(), "not a FHIR Bundle");
        }
        other => panic!("{other}"),
    }
    assert!(entries(out.path()).is_empty());
    let rejects = tempfile::tempdir().unwrap();
    let report = run(
        &engine(FHIR_PROFILE),
        input.path(),
        out.path(),
        &reject_into(rejects.path()),
    )
    .unwrap();
    let got: Vec<(u64, &str)> = report
        .rejects
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "not a FHIR Bundle"),
            (1, "entry 0: entry has no resource"),
            (2, "invalid JSON (syntax error at 2:11)")
        ]
    );
    assert_eq!(entries(rejects.path()).len(), 3);
    // Only the report: no output file for a rejected document.
    let names: Vec<String> = entries(out.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["deid-report.json"]);
}

#[test]
fn a_value_the_transform_refuses_is_a_reject_without_the_value() {
    let input = tempfile::tempdir().unwrap();
    patients_with(input.path(), |l| {
        let mut f: Vec<String> = l.split(',').map(str::to_owned).collect();
        f[1] = "31/12/1999".to_owned();
        f.join(",")
    });
    let out = tempfile::tempdir().unwrap();
    let err = run(
        &engine(CSV_PROFILE),
        input.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.contains("patients.csv:5:") && shown.contains("BIRTHDATE"),
        "{shown}"
    );
    assert!(
        !shown.contains("31/12/1999") && !shown.contains("1999"),
        "{shown}"
    );
}

#[test]
fn a_failed_run_leaves_no_file_in_the_output_directory() {
    // Many good files first, the broken one last: the good ones were fully written to
    // temporary files before the failure and must be gone too.
    let input = tempfile::tempdir().unwrap();
    copy_dir(Path::new(SYNTHEA_CSV), input.path());
    std::fs::write(
        input.path().join("zz_broken.csv"),
        "PATIENT,DATE\np1,\"2020-01-01\"x\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("unrelated.txt"), "kept").unwrap();
    let err = run(
        &engine(CSV_PROFILE),
        input.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DeidError::Malformed { line: 2, .. }), "{err}");
    let left: Vec<_> = entries(out.path());
    assert_eq!(
        left,
        vec![out.path().join("unrelated.txt")],
        "partial files left"
    );
}

#[test]
fn existing_outputs_are_not_replaced_unless_asked() {
    let input = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(SYNTHEA_CSV).join("payers.csv"),
        input.path().join("payers.csv"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("payers.csv"), "old").unwrap();
    let err = run(
        &engine(CSV_PROFILE),
        input.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DeidError::OutputExists { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("payers.csv")).unwrap(),
        "old"
    );
    let options = Options {
        overwrite: true,
        ..Options::default()
    };
    run(&engine(CSV_PROFILE), input.path(), out.path(), &options).unwrap();
    assert!(std::fs::read_to_string(out.path().join("payers.csv"))
        .unwrap()
        .starts_with("Id,NAME,"));
}

#[test]
fn rejects_may_not_go_into_the_output_and_output_not_into_the_input() {
    let input = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(SYNTHEA_CSV).join("payers.csv"),
        input.path().join("payers.csv"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(
        &engine(CSV_PROFILE),
        input.path(),
        out.path(),
        &reject_into(&out.path().join("rejects")),
    )
    .unwrap_err();
    assert!(matches!(err, DeidError::Layout { .. }), "{err}");
    let err = run(
        &engine(CSV_PROFILE),
        input.path(),
        &input.path().join("out"),
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DeidError::Layout { .. }), "{err}");
}

#[test]
fn files_no_rule_matches_are_refused_or_skipped_never_copied() {
    let input = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(SYNTHEA_CSV).join("payers.csv"),
        input.path().join("payers.csv"),
    )
    .unwrap();
    std::fs::write(input.path().join("notes.txt"), "Patient Jane Doe99 called").unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = run(
        &engine(CSV_PROFILE),
        input.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap();
    assert_eq!(report.skipped_files, 1);
    assert!(!out.path().join("notes.txt").exists());
    let text = std::fs::read_to_string(out.path().join("deid-report.json")).unwrap();
    assert!(!text.contains("notes.txt"));
    let strict = deid::Policy::builtin(CSV_PROFILE)
        .unwrap()
        .with_unknown_fields(deid::UnknownFields::Error);
    let out = tempfile::tempdir().unwrap();
    let err = run(
        &deid::Engine::new(&strict, &key()).unwrap(),
        input.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DeidError::UnmatchedFile { .. }), "{err}");
}

#[test]
fn progress_is_reported_up_to_the_total() {
    let seen = std::sync::Mutex::new(Vec::new());
    let out = tempfile::tempdir().unwrap();
    let report = engine(CSV_PROFILE)
        .run(
            Path::new(SYNTHEA_CSV),
            out.path(),
            &Options::default(),
            &|p| seen.lock().unwrap().push(p),
        )
        .unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() > 14);
    let last = seen.iter().max_by_key(|p| p.bytes).unwrap();
    assert_eq!(last.bytes, last.total_bytes);
    assert_eq!(last.bytes, report.bytes_in);
    assert_eq!(
        seen.iter().map(|p| p.records).max().unwrap(),
        report.records
    );
}
