//! Ages over 89 (45 CFR 164.514(b)(2)(i)(C)): synthetic patients born 1920 (over 89 at the run
//! date), 1931 (died at 78) and 1980, as a Synthea CSV export and as FHIR bundles, through both
//! built-in profiles: the first's birth date is removed in both, the others' shifted.

use std::path::Path;

use deid::{Date, Engine, Options, Policy, Report};
use serde_json::{json, Value};

use crate::common::*;

const OLD: &str = "0b1e7a3c-1920-4c5d-8e9f-000000000001";
const DIED: &str = "0b1e7a3c-1931-4c5d-8e9f-000000000002";
const YOUNG: &str = "0b1e7a3c-1980-4c5d-8e9f-000000000003";

const PATIENTS: &str = "\
Id,BIRTHDATE,DEATHDATE,SSN,FIRST,LAST,GENDER,ZIP
0b1e7a3c-1920-4c5d-8e9f-000000000001,1920-03-04,,999-11-2233,Agatha921,Oldcastle117,F,02134
0b1e7a3c-1931-4c5d-8e9f-000000000002,1931-05-06,2010-01-02,999-44-5566,Bertram313,Diedrich448,M,01850
0b1e7a3c-1980-4c5d-8e9f-000000000003,1980-07-08,,999-77-8899,Cordelia808,Youngblood771,F,02445
";

const ENCOUNTERS: &str = "\
Id,START,STOP,PATIENT,ENCOUNTERCLASS
e0000000-0000-4000-8000-000000000001,2015-02-03T08:00:00Z,2015-02-03T09:00:00Z,0b1e7a3c-1920-4c5d-8e9f-000000000001,wellness
e0000000-0000-4000-8000-000000000002,2005-06-07T10:00:00Z,2005-06-07T11:00:00Z,0b1e7a3c-1931-4c5d-8e9f-000000000002,ambulatory
e0000000-0000-4000-8000-000000000003,2016-08-09T12:00:00Z,2016-08-09T13:00:00Z,0b1e7a3c-1980-4c5d-8e9f-000000000003,wellness
";

const QALY: &str = "http://synthetichealth.github.io/synthea/quality-adjusted-life-years";
const DALY: &str = "http://synthetichealth.github.io/synthea/disability-adjusted-life-years";
const RACE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race";

/// A Synthea-style bundle: the Patient and one Encounter.
fn bundle(id: &str, birth: &str, death: Option<&str>, visit: &str) -> Value {
    let mut patient = json!({
        "resourceType": "Patient",
        "id": id,
        "extension": [
            { "url": RACE, "extension": [{ "url": "text", "valueString": "White" }] },
            { "url": DALY, "valueDecimal": 0.5 },
            { "url": QALY, "valueDecimal": 94.6 },
        ],
        "name": [{ "use": "official", "family": "Oldcastle117", "given": ["Agatha921"] }],
        "gender": "female",
        "birthDate": birth,
    });
    if let Some(d) = death {
        patient["deceasedDateTime"] = json!(d);
    }
    json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            { "fullUrl": format!("urn:uuid:{id}"), "resource": patient },
            {
                "fullUrl": "urn:uuid:e1000000-0000-4000-8000-000000000001",
                "resource": {
                    "resourceType": "Encounter",
                    "id": "e1000000-0000-4000-8000-000000000001",
                    "status": "finished",
                    "subject": { "reference": format!("urn:uuid:{id}") },
                    "period": { "start": visit, "end": visit },
                },
            },
        ],
    })
}

/// The synthetic export as CSV and FHIR under `dir`.
fn write_inputs(dir: &Path) {
    std::fs::create_dir_all(dir.join("csv")).unwrap();
    std::fs::create_dir_all(dir.join("fhir")).unwrap();
    std::fs::write(dir.join("csv/patients.csv"), PATIENTS).unwrap();
    std::fs::write(dir.join("csv/encounters.csv"), ENCOUNTERS).unwrap();
    for (name, b) in [
        (
            "old.json",
            bundle(OLD, "1920-03-04", None, "2015-02-03T08:00:00Z"),
        ),
        (
            "died.json",
            bundle(
                DIED,
                "1931-05-06",
                Some("2010-01-02T00:00:00Z"),
                "2005-06-07T10:00:00Z",
            ),
        ),
        (
            "young.json",
            bundle(YOUNG, "1980-07-08", None, "2016-08-09T12:00:00Z"),
        ),
    ] {
        std::fs::write(dir.join("fhir").join(name), b.to_string()).unwrap();
    }
}

struct Outputs {
    input: tempfile::TempDir,
    out: tempfile::TempDir,
    csv: Report,
    fhir: Report,
}

fn run_both(csv: &Engine, fhir: &Engine, options: &Options) -> Outputs {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let out = tempfile::tempdir().unwrap();
    let csv = run(
        csv,
        &dir.path().join("csv"),
        &out.path().join("csv"),
        options,
    )
    .unwrap();
    let fhir = run(
        fhir,
        &dir.path().join("fhir"),
        &out.path().join("fhir"),
        options,
    )
    .unwrap();
    Outputs {
        input: dir,
        out,
        csv,
        fhir,
    }
}

/// The output Patient and Encounter of every bundle, by the patient's output id.
fn fhir_patients(out: &Path) -> Vec<(Value, Value)> {
    entries(&out.join("fhir"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("deid-report.json"))
        .map(|p| {
            let b: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            let e = b["entry"].as_array().unwrap();
            (e[0]["resource"].clone(), e[1]["resource"].clone())
        })
        .collect()
}

fn urls(patient: &Value) -> Vec<&str> {
    patient["extension"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["url"].as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn a_patient_over_89_loses_the_birth_date_in_csv_and_fhir_and_others_are_shifted() {
    let o = run_both(
        &engine(CSV_PROFILE),
        &engine(FHIR_PROFILE),
        &dated_options(),
    );
    let (pi, po) = (
        Table::read(&o.input.path().join("csv/patients.csv")),
        Table::read(&o.out.path().join("csv/patients.csv")),
    );
    let births = po.values("BIRTHDATE");
    assert_eq!(births[0], "", "born 1920: aggregated");
    for (i, born) in [(1, "1931-05-06"), (2, "1980-07-08")] {
        let (a, _) = days(born).unwrap();
        let (b, _) = days(births[i]).unwrap_or_else(|| panic!("row {i}: {:?}", births[i]));
        assert!(
            (a - b).abs() <= 365 && births[i] != born,
            "row {i}: not shifted"
        );
    }
    // The death date at 78 is shifted with the birth date: the age at death is kept.
    let (d0, _) = days("2010-01-02").unwrap();
    let (d1, _) = days(po.values("DEATHDATE")[1]).unwrap();
    let (b1, _) = days(births[1]).unwrap();
    assert_eq!(d1 - b1, d0 - days("1931-05-06").unwrap().0);
    let fr = o
        .csv
        .files
        .iter()
        .find(|f| f.file == "patients.csv")
        .unwrap();
    assert_eq!(fr.fields["BIRTHDATE"]["over_age_cap"], 1);
    assert_eq!(fr.fields["BIRTHDATE"]["date_shift"], 2);

    // The old patient's other dates are still shifted, by the same offset as in FHIR.
    let (ei, eo) = (
        Table::read(&o.input.path().join("csv/encounters.csv")),
        Table::read(&o.out.path().join("csv/encounters.csv")),
    );
    let csv_offset = |row: usize| {
        days(eo.values("START")[row]).unwrap().0 - days(ei.values("START")[row]).unwrap().0
    };

    let patients = fhir_patients(o.out.path());
    assert_eq!(patients.len(), 3);
    let ids = po.values("Id");
    let by_id = |id: &str| {
        patients
            .iter()
            .find(|(p, _)| p["id"] == id)
            .unwrap_or_else(|| panic!("no FHIR patient {id}"))
    };
    let (old, old_visit) = by_id(ids[0]);
    assert!(old.get("birthDate").is_none(), "{old}");
    assert_eq!(urls(old), [RACE], "QALY + DALY is the age");
    assert_eq!(old["gender"], "female");
    let fhir_offset = days(old_visit["period"]["start"].as_str().unwrap())
        .unwrap()
        .0
        - days("2015-02-03").unwrap().0;
    assert_eq!(fhir_offset, csv_offset(0));
    assert_ne!(eo.values("START")[0], ei.values("START")[0]);
    for (i, (id, visit)) in [(1, (ids[1], "2005-06-07")), (2, (ids[2], "2016-08-09"))] {
        let (p, e) = by_id(id);
        assert_eq!(
            p["birthDate"].as_str().unwrap(),
            births[i],
            "same shift as CSV"
        );
        assert_eq!(urls(p), [RACE, DALY, QALY]);
        let off = days(e["period"]["start"].as_str().unwrap()).unwrap().0 - days(visit).unwrap().0;
        assert_eq!(off, csv_offset(i));
    }
    assert_eq!(
        o.fhir.transforms["over_age_cap"], 3,
        "birthDate, QALY, DALY"
    );

    // No element of the aggregated birth date remains anywhere (its shifted form would fall
    // in 1919 to 1921; the other patients' dates do not), nor any other identifier.
    for dir in ["csv", "fhir"] {
        for path in entries(&o.out.path().join(dir)) {
            let text = std::fs::read_to_string(&path).unwrap();
            for year in ["1919-", "1920-", "1921-"] {
                assert!(!text.contains(year), "{}: a date in {year}", path.display());
            }
        }
    }
    let mut secrets = Vec::new();
    for (col, kind) in [
        ("BIRTHDATE", "birth date"),
        ("SSN", "ssn"),
        ("FIRST", "name"),
        ("LAST", "name"),
        ("Id", "id"),
    ] {
        for v in pi.values(col) {
            secrets.push((kind.to_owned(), v.to_owned()));
        }
    }
    assert!(assert_no_leaks(o.out.path(), &secrets) >= 12);
}

#[test]
fn the_reference_date_decides_who_is_over_89() {
    // At the policy's reference date of 2005 the patient born 1920 is 84: shifted.
    let dated = |name: &str| {
        let source = Policy::builtin_source(name).unwrap().replace(
            "age_cap = 89\n",
            "age_cap = 89\nreference_date = \"2005-01-01\"\n",
        );
        let policy = Policy::from_toml(&source, name).unwrap();
        assert_eq!(policy.age_cap(), Some(89));
        Engine::new(&policy, &key()).unwrap()
    };
    let o = run_both(&dated(CSV_PROFILE), &dated(FHIR_PROFILE), &dated_options());
    let births = Table::read(&o.out.path().join("csv/patients.csv"));
    assert!(births.values("BIRTHDATE").iter().all(|b| days(b).is_some()));
    assert!(fhir_patients(o.out.path())
        .iter()
        .all(|(p, _)| p["birthDate"].is_string() && urls(p).len() == 3));
    assert!(!o.csv.transforms.contains_key("over_age_cap"));

    // Without one, the run's date: in 2000 nobody here is over 89; in 2011 the 1920 one is.
    for (today, over) in [((2000, 1, 1), 0), ((2011, 1, 1), 1)] {
        let options = Options {
            today: Date::new(today.0, today.1, today.2),
            ..Options::default()
        };
        let o = run_both(&engine(CSV_PROFILE), &engine(FHIR_PROFILE), &options);
        let empty = Table::read(&o.out.path().join("csv/patients.csv"))
            .values("BIRTHDATE")
            .iter()
            .filter(|b| b.is_empty())
            .count();
        assert_eq!(empty, over, "{today:?}");
        let gone = fhir_patients(o.out.path())
            .iter()
            .filter(|(p, _)| p.get("birthDate").is_none())
            .count();
        assert_eq!(gone, over, "{today:?}");
    }
}

#[test]
fn the_age_transform_aggregates_above_the_cap() {
    let policy = |cap: u32| {
        let source = format!(
            "domain = \"research\"\nunknown_fields = \"error\"\n\
             [patient]\ntransform = \"id\"\nage_cap = {cap}\n\
             [transforms]\nid = {{ kind = \"pseudonym\", key = \"id\" }}\n\
             [[csv]]\nfiles = [\"*.csv\"]\npatient = \"ID\"\n[csv.columns]\nID = \"id\"\nAGE = \"age\"\n"
        );
        Engine::new(&Policy::from_toml(&source, "age.toml").unwrap(), &key()).unwrap()
    };
    for (cap, expected) in [
        (89, ["84", "86", "89", "90 or older", "90 or older"]),
        (
            85,
            [
                "84",
                "86 or older",
                "86 or older",
                "86 or older",
                "86 or older",
            ],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ages.csv"),
            "ID,AGE\na,84\nb,86\nc,89\nd,90\ne,104\n",
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        run(&policy(cap), dir.path(), out.path(), &Options::default()).unwrap();
        let t = Table::read(&out.path().join("ages.csv"));
        assert_eq!(t.values("AGE"), expected, "age_cap = {cap}");
    }
}

#[test]
fn age_cap_settings_are_checked() {
    let head = "domain = \"d\"\nunknown_fields = \"error\"\n[transforms]\nid = { kind = \"pseudonym\", key = \"id\" }\n";
    for (body, line, what) in [
        ("[patient]\ntransform = \"id\"\nage_cap = 90\n", 7, "from 1 to 89"),
        (
            "[patient]\ntransform = \"id\"\nreference_date = \"2020-01-01\"\n",
            7,
            "needs `age_cap`",
        ),
        (
            "[patient]\ntransform = \"id\"\nage_cap = 89\nreference_date = \"2020-02-30\"\n",
            8,
            "YYYY-MM-DD",
        ),
        (
            "[patient]\ntransform = \"id\"\n[[csv]]\nfiles = [\"p.csv\"]\nbirth_date = \"B\"\n[csv.columns]\nB = \"keep\"\n",
            9,
            "age_cap",
        ),
        (
            "[patient]\ntransform = \"id\"\nage_cap = 89\n[[csv]]\nfiles = [\"p.csv\"]\nbirth_date = \"B\"\n[csv.columns]\nA = \"keep\"\n",
            10,
            "must have a rule",
        ),
    ] {
        let e = Policy::from_toml(&format!("{head}{body}"), "p.toml").unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("p.toml:{line}:")) && shown.contains(what),
            "{shown}"
        );
    }
}
