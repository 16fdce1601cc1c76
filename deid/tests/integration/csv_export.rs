//! The whole Synthea CSV export through the built-in Safe Harbor profile: leaks, joins, date
//! intervals, pseudonym consistency, other layouts.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use deid::{DeidError, Engine, Options, Policy, Report, UnknownFields};

use crate::common::*;

/// One run of the standard export, shared by the tests that only read it.
fn standard() -> &'static (PathBuf, Report) {
    static RUN: OnceLock<(PathBuf, Report)> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deid-synthea-csv");
        let _ = std::fs::remove_dir_all(&out);
        let report = run(
            &engine(CSV_PROFILE),
            Path::new(SYNTHEA_CSV),
            &out,
            &dated_options(),
        )
        .expect("the Synthea export de-identifies");
        (out, report)
    })
}

fn input(file: &str) -> Table {
    Table::read(&Path::new(SYNTHEA_CSV).join(file))
}

fn output(file: &str) -> Table {
    Table::read(&standard().0.join(file))
}

const FILES: [&str; 14] = [
    "allergies.csv",
    "careplans.csv",
    "conditions.csv",
    "encounters.csv",
    "imaging_studies.csv",
    "immunizations.csv",
    "medications.csv",
    "observations.csv",
    "organizations.csv",
    "patients.csv",
    "payer_transitions.csv",
    "payers.csv",
    "procedures.csv",
    "providers.csv",
];

#[test]
fn every_file_and_record_is_written_and_reported() {
    let (out, report) = standard();
    assert_eq!(report.files.len(), FILES.len());
    assert_eq!(report.rejected, 0);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let mut total = 0;
    for file in FILES {
        let (i, o) = (input(file), output(file));
        assert!(!i.rows.is_empty(), "{file} is empty");
        assert_eq!(i.rows.len(), o.rows.len(), "{file}");
        let fr = report.files.iter().find(|f| f.file == file).unwrap();
        assert_eq!(fr.records as usize, o.rows.len(), "{file}");
        total += o.rows.len();
    }
    assert_eq!(report.records as usize, total);
    for kind in ["pseudonym", "date_shift", "zip3", "drop", "keep"] {
        assert!(
            report.transforms.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} in {:?}",
            report.transforms
        );
    }
    // The report is written next to the output and holds the same.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("deid-report.json")).unwrap()).unwrap();
    assert_eq!(written["records"].as_u64(), Some(report.records));
}

#[test]
fn no_identifier_of_the_input_appears_in_the_output() {
    let (out, _) = standard();
    let mut secrets: Vec<(String, String)> = Vec::new();
    let mut add = |kind: &str, values: Vec<&str>| {
        for v in values.into_iter().filter(|v| !v.is_empty()) {
            secrets.push((kind.to_owned(), v.to_owned()));
        }
    };
    let p = input("patients.csv");
    for col in [
        "SSN", "DRIVERS", "PASSPORT", "FIRST", "LAST", "MAIDEN", "ADDRESS", "CITY", "COUNTY",
        "LAT", "LON", "Id",
    ] {
        add(col, p.values(col));
    }
    add(
        "birthplace",
        p.values("BIRTHPLACE")
            .iter()
            .map(|b| b.split("  ").next().unwrap_or(""))
            .collect(),
    );
    let o = input("organizations.csv");
    for col in ["NAME", "ADDRESS", "PHONE", "LAT", "LON", "Id"] {
        add(col, o.values(col));
    }
    let pr = input("providers.csv");
    for col in ["ADDRESS", "LAT", "LON", "Id"] {
        add(col, pr.values(col));
    }
    // Provider names are "Given123 Family456".
    add(
        "provider name",
        pr.values("NAME")
            .iter()
            .flat_map(|n| n.split(' '))
            .collect(),
    );
    let pay = input("payers.csv");
    add("payer address", pay.values("ADDRESS"));
    add("payer phone", pay.values("PHONE"));
    for file in ["encounters.csv", "careplans.csv", "imaging_studies.csv"] {
        add("record id", input(file).values("Id"));
    }
    let checked = assert_no_leaks(out, &secrets);
    assert!(checked > 5000, "only {checked} values checked");
    // ZIP codes are cut to three digits.
    for file in [
        "patients.csv",
        "organizations.csv",
        "providers.csv",
        "payers.csv",
    ] {
        let zips = output(file);
        let zips = zips.values("ZIP");
        assert!(zips.iter().any(|z| !z.is_empty()), "{file}");
        assert!(
            zips.iter()
                .all(|z| z.is_empty() || (z.len() == 3 && z.bytes().all(|b| b.is_ascii_digit()))),
            "{file}: {zips:?}"
        );
    }
    // Columns that must be gone.
    let header = output("patients.csv").header;
    for gone in [
        "ADDRESS",
        "CITY",
        "COUNTY",
        "BIRTHPLACE",
        "LAT",
        "LON",
        "PREFIX",
        "SUFFIX",
    ] {
        assert!(
            !header.iter().any(|h| h == gone),
            "{gone} still in {header:?}"
        );
    }
}

#[test]
fn dates_of_birth_are_shifted_or_removed_over_89() {
    let (i, o) = (input("patients.csv"), output("patients.csv"));
    let (bi, bo) = (i.values("BIRTHDATE"), o.values("BIRTHDATE"));
    let deaths = i.values("DEATHDATE");
    let report = &standard().1;
    let fr = report
        .files
        .iter()
        .find(|f| f.file == "patients.csv")
        .unwrap();
    let over: usize = bi
        .iter()
        .zip(&deaths)
        .filter(|(b, d)| over_89(b, d))
        .count();
    // The sample holds two patients (born 1929, 1935) alive at the run date and one who died
    // at 94; two more born then died at 78 and 88.
    assert_eq!(over, 3);
    let counts = &fr.fields["BIRTHDATE"];
    assert_eq!(counts["over_age_cap"] as usize, over);
    assert_eq!(counts["date_shift"] as usize, bi.len() - over);
    assert_eq!(
        fr.fields["SSN"]["pseudonym"] as usize,
        i.values("SSN").len()
    );
    let mut unchanged = 0;
    for ((a, b), death) in bi.iter().zip(&bo).zip(&deaths) {
        if over_89(a, death) {
            assert_eq!(*b, "", "a birth date over 89 is written");
            continue;
        }
        let (da, _) = days(a).unwrap();
        let (db, _) = days(b).unwrap();
        assert!((da - db).abs() <= 365, "shift beyond max_days");
        unchanged += usize::from(da == db);
    }
    assert_eq!(bi.len(), bo.len());
    assert!(bi.len() > 100);
    // A zero offset is as likely as any other (1 in 731); more than a few would be a bug.
    assert!(
        unchanged <= 2,
        "{unchanged} of {} birth dates unchanged",
        bi.len()
    );
}

/// (file, column, referenced file, referenced column).
const FOREIGN_KEYS: [(&str, &str, &str, &str); 24] = [
    ("allergies.csv", "PATIENT", "patients.csv", "Id"),
    ("allergies.csv", "ENCOUNTER", "encounters.csv", "Id"),
    ("careplans.csv", "PATIENT", "patients.csv", "Id"),
    ("careplans.csv", "ENCOUNTER", "encounters.csv", "Id"),
    ("conditions.csv", "PATIENT", "patients.csv", "Id"),
    ("conditions.csv", "ENCOUNTER", "encounters.csv", "Id"),
    ("encounters.csv", "PATIENT", "patients.csv", "Id"),
    // Synthea 2.x (this export) names the provider organization here; 3.x added ORGANIZATION
    // and points PROVIDER at providers.csv. Both are pseudonymized with the one id key.
    ("encounters.csv", "PROVIDER", "organizations.csv", "Id"),
    ("encounters.csv", "PAYER", "payers.csv", "Id"),
    ("imaging_studies.csv", "PATIENT", "patients.csv", "Id"),
    ("imaging_studies.csv", "ENCOUNTER", "encounters.csv", "Id"),
    ("immunizations.csv", "PATIENT", "patients.csv", "Id"),
    ("immunizations.csv", "ENCOUNTER", "encounters.csv", "Id"),
    ("medications.csv", "PATIENT", "patients.csv", "Id"),
    ("medications.csv", "ENCOUNTER", "encounters.csv", "Id"),
    ("medications.csv", "PAYER", "payers.csv", "Id"),
    ("observations.csv", "PATIENT", "patients.csv", "Id"),
    ("observations.csv", "ENCOUNTER", "encounters.csv", "Id"),
    ("payer_transitions.csv", "PATIENT", "patients.csv", "Id"),
    ("payer_transitions.csv", "PAYER", "payers.csv", "Id"),
    ("procedures.csv", "PATIENT", "patients.csv", "Id"),
    ("procedures.csv", "ENCOUNTER", "encounters.csv", "Id"),
    ("providers.csv", "ORGANIZATION", "organizations.csv", "Id"),
    ("encounters.csv", "ORGANIZATION", "organizations.csv", "Id"),
];

/// (resolved, dangling) foreign keys of one relation.
fn resolve(table: &Table, column: &str, target: &Table, target_column: &str) -> (usize, usize) {
    let keys: HashSet<&str> = target.values(target_column).into_iter().collect();
    let mut r = (0, 0);
    for v in table.values(column).into_iter().filter(|v| !v.is_empty()) {
        if keys.contains(v) {
            r.0 += 1;
        } else {
            r.1 += 1;
        }
    }
    r
}

#[test]
fn every_foreign_key_resolves() {
    let mut checked = 0;
    for (file, col, target, target_col) in FOREIGN_KEYS {
        let (ti, to) = (input(file), output(file));
        if ti.col(col).is_none() {
            // encounters.csv of this export has no ORGANIZATION column.
            assert!(to.col(col).is_none());
            continue;
        }
        let before = resolve(&ti, col, &input(target), target_col);
        let after = resolve(&to, col, &output(target), target_col);
        assert_eq!(before.1, 0, "{file}.{col} dangles in the input");
        assert_eq!(after, before, "{file}.{col} → {target}.{target_col}");
        checked += after.0;
    }
    assert!(checked > 40_000, "only {checked} keys");
}

#[test]
fn a_patient_has_one_pseudonym_in_every_file() {
    let (pi, po) = (input("patients.csv"), output("patients.csv"));
    let map: HashMap<&str, &str> = pi.values("Id").into_iter().zip(po.values("Id")).collect();
    assert_eq!(map.len(), pi.rows.len());
    let distinct: HashSet<&&str> = map.values().collect();
    assert_eq!(distinct.len(), map.len(), "two patients share a pseudonym");
    let mut checked = 0;
    for file in FILES {
        let (i, o) = (input(file), output(file));
        for (a, b) in i.values("PATIENT").iter().zip(o.values("PATIENT")) {
            assert_eq!(map[a], b, "{file}");
            checked += 1;
        }
    }
    assert!(checked > 30_000);
}

/// The patient of each row and its date values, for every file with dates.
fn patient_dates(table: &Table, patient_col: &str) -> Vec<(String, Vec<String>)> {
    let pc = table.col(patient_col).unwrap();
    let date_cols: Vec<usize> = ["START", "STOP", "DATE", "BIRTHDATE", "DEATHDATE"]
        .iter()
        .filter_map(|c| table.col(c))
        .collect();
    table
        .rows
        .iter()
        .map(|r| {
            (
                r[pc].clone(),
                date_cols.iter().map(|&c| r[c].clone()).collect(),
            )
        })
        .collect()
}

#[test]
fn date_intervals_per_patient_are_kept_exactly() {
    let (pi, po) = (input("patients.csv"), output("patients.csv"));
    let birth_in: HashMap<String, String> = pi
        .values("Id")
        .iter()
        .zip(pi.values("BIRTHDATE"))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let birth_out: Vec<&str> = po.values("BIRTHDATE");
    let ids: Vec<&str> = pi.values("Id");
    let birth_out: HashMap<&str, &str> = ids.iter().copied().zip(birth_out).collect();
    let mut offsets: HashMap<String, i64> = HashMap::new();
    let mut pairs = 0;
    for file in FILES {
        let (i, o) = (input(file), output(file));
        let patient_col = if file == "patients.csv" {
            "Id"
        } else {
            "PATIENT"
        };
        if i.col(patient_col).is_none() {
            continue;
        }
        let (di, dout) = (
            patient_dates(&i, patient_col),
            patient_dates(&o, patient_col),
        );
        for ((patient, before), (_, after)) in di.iter().zip(&dout) {
            let (b0, _) = days(&birth_in[patient]).unwrap();
            // A patient over 89 has no birth date in the output (checked above).
            let b1 = days(birth_out[patient.as_str()]).map(|(d, _)| d);
            for (x, y) in before.iter().zip(after) {
                if x.is_empty() {
                    assert!(y.is_empty());
                    continue;
                }
                if y.is_empty() && b1.is_none() && x == &birth_in[patient] {
                    continue;
                }
                let (dx, tx) = days(x).unwrap_or_else(|| panic!("{file}: not a date"));
                let (dy, ty) = days(y).unwrap_or_else(|| panic!("{file}: not a date"));
                assert_eq!(tx, ty, "{file}: the time of day changed");
                // The interval to the patient's birth, before and after.
                if let Some(b1) = b1 {
                    assert_eq!(dx - b0, dy - b1, "{file}: interval to birth changed");
                }
                let offset = offsets.entry(patient.clone()).or_insert(dy - dx);
                assert_eq!(*offset, dy - dx, "{file}: two offsets for one patient");
                pairs += 1;
            }
        }
    }
    assert!(pairs > 40_000, "only {pairs} dates compared");
    let distinct: HashSet<i64> = offsets.values().copied().collect();
    assert!(distinct.len() > 50, "offsets are not spread: {distinct:?}");
}

/// Writes `table` with the header renamed and columns reordered by `order` (indices).
fn write_layout(path: &Path, table: &Table, header: &[String], order: &[usize]) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(header).unwrap();
    for row in &table.rows {
        w.write_record(order.iter().map(|&i| row.get(i).map_or("", String::as_str)))
            .unwrap();
    }
    w.flush().unwrap();
}

#[test]
fn another_synthea_layout_matches_by_header_name() {
    // Synthea 3.x: MIDDLE, FIPS and INCOME; columns in another order; lower-case names.
    let dir = tempfile::tempdir().unwrap();
    let src = input("patients.csv");
    let mut table = Table {
        header: src.header.clone(),
        rows: src.rows.clone(),
    };
    for (name, value) in [
        ("MIDDLE", "Quentin123"),
        ("FIPS", "25017"),
        ("INCOME", "51234"),
    ] {
        table.header.push(name.to_owned());
        for row in &mut table.rows {
            row.push(value.to_owned());
        }
    }
    let order: Vec<usize> = (0..table.header.len()).rev().collect();
    let header: Vec<String> = order
        .iter()
        .map(|&i| table.header[i].to_lowercase())
        .collect();
    write_layout(&dir.path().join("patients.csv"), &table, &header, &order);
    let out = tempfile::tempdir().unwrap();
    let report = run(
        &engine(CSV_PROFILE),
        dir.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let o = Table::read(&out.path().join("patients.csv"));
    let std = output("patients.csv");
    // Same pseudonyms and dates as the standard layout, row by row.
    for col in ["Id", "FIRST", "LAST", "SSN", "BIRTHDATE", "ZIP"] {
        assert_eq!(o.values(col), std.values(col), "{col}");
    }
    assert!(o.col("fips").is_none());
    let middle = o.values("middle");
    assert!(middle.iter().all(|m| m.starts_with("v1.")));
    assert!(o.values("income").iter().all(|v| *v == "51234"));
}

#[test]
fn an_unknown_column_is_dropped_and_reported_or_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let src = input("patients.csv");
    let mut table = Table {
        header: src.header.clone(),
        rows: src.rows.clone(),
    };
    table.header.push("NICKNAME".to_owned());
    for (i, row) in table.rows.iter_mut().enumerate() {
        row.push(format!("Nick{i}zz"));
    }
    let order: Vec<usize> = (0..table.header.len()).collect();
    write_layout(
        &dir.path().join("patients.csv"),
        &table,
        &table.header.clone(),
        &order,
    );

    let out = tempfile::tempdir().unwrap();
    let report = run(
        &engine(CSV_PROFILE),
        dir.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap();
    assert_eq!(report.warnings.len(), 1);
    let w = &report.warnings[0];
    assert_eq!(
        (w.file.as_str(), w.field.as_str()),
        ("patients.csv", "NICKNAME")
    );
    assert_eq!(w.occurrences as usize, table.rows.len());
    let o = Table::read(&out.path().join("patients.csv"));
    assert!(o.col("NICKNAME").is_none());
    assert_eq!(o.rows.len(), table.rows.len());
    let nicks: Vec<(String, String)> = table
        .rows
        .iter()
        .map(|r| ("nickname".into(), r.last().unwrap().clone()))
        .collect();
    assert!(assert_no_leaks(out.path(), &nicks) > 100);

    let strict = Policy::builtin(CSV_PROFILE)
        .unwrap()
        .with_unknown_fields(UnknownFields::Error);
    let engine = Engine::new(&strict, &key()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(&engine, dir.path(), out.path(), &Options::default()).unwrap_err();
    match &err {
        DeidError::UnknownField { field, line, .. } => {
            assert_eq!((field.as_str(), *line), ("NICKNAME", 1))
        }
        other => panic!("{other}"),
    }
    assert!(!err.to_string().contains("Nick0zz"));
    assert!(entries(out.path()).is_empty(), "{:?}", entries(out.path()));
}

#[test]
fn free_text_answers_are_redacted_coded_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("observations.csv"),
        "DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE\n\
         2020-01-02,p1,e1,survey,56799-0,What address do you live at?,745 Buckridge Path,,text\n\
         2020-01-02,p1,e1,survey,72166-2,Tobacco smoking status,Never smoker,,text\n\
         2020-01-02,p1,e1,vital-signs,8302-2,Body Height,50.7,cm,numeric\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    run(
        &engine(CSV_PROFILE),
        dir.path(),
        out.path(),
        &Options::default(),
    )
    .unwrap();
    let o = Table::read(&out.path().join("observations.csv"));
    assert_eq!(
        o.values("VALUE"),
        vec!["[REDACTED]", "Never smoker", "50.7"]
    );
}
