//! The messy identifiers of `shared/data/messy` (an assembled file, see its README.md): the CSV
//! parses to exactly the expected JSON and writes back byte for byte; the rows that are one
//! person spelled differently (2/3 NFC vs NFD, 7/8 U+2019 vs ASCII apostrophe, case and ZIP+4,
//! 33/34 hyphen vs en dash and non-breaking hyphen, SSN with and without dashes) get one
//! pseudonym per field under the field's normalization; different people get different ones.

use std::collections::{BTreeMap, HashMap};

use tokenize::{
    Context, DomainKey, FieldTransformer, Normalization, TokenizeError, Transform, Transformed,
};
use zeroize::Zeroizing;

use crate::data::{load_json, path};

const CSV: &str = "messy/messy_identifiers.csv";
const EXPECTED: &str = "messy/messy_identifiers.expected.json";

/// One row: column name to value.
type Row = BTreeMap<String, String>;

/// The columns that identify a person, with the normalization a policy would give each.
const IDENTIFYING: [(&str, Normalization); 17] = [
    ("patient_id", Normalization::Exact),
    ("mrn", Normalization::Mrn),
    ("prefix", Normalization::Text),
    ("given_name", Normalization::Text),
    ("family_name", Normalization::Text),
    ("suffix", Normalization::Text),
    ("full_name", Normalization::Text),
    ("ssn", Normalization::Ssn),
    ("drivers_license", Normalization::Mrn),
    ("passport", Normalization::Mrn),
    ("phone", Normalization::Phone),
    ("email", Normalization::Text),
    ("address", Normalization::Text),
    ("city", Normalization::Text),
    ("state", Normalization::Text),
    ("postal_code", Normalization::Digits),
    ("country", Normalization::Text),
];

fn read_csv() -> (Vec<String>, Vec<Vec<String>>) {
    let mut reader = csv::Reader::from_path(path(CSV)).unwrap();
    let headers = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    let records = reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect();
    (headers, records)
}

fn rows() -> Vec<Row> {
    let (headers, records) = read_csv();
    records
        .into_iter()
        .map(|r| headers.iter().cloned().zip(r).collect())
        .collect()
}

/// The row with `row_id` `id`.
fn row(rows: &[Row], id: u32) -> &Row {
    let id = id.to_string();
    rows.iter().find(|r| r["row_id"] == id).unwrap()
}

fn domain() -> DomainKey {
    DomainKey::new("messy-test", 1, Zeroizing::new([0x5a; 32]))
}

/// A pseudonym transformer per identifying column.
fn pseudonymizers(domain: &DomainKey) -> HashMap<&'static str, FieldTransformer> {
    IDENTIFYING
        .iter()
        .map(|&(column, normalize)| {
            let t = FieldTransformer::new(domain, column, &Transform::Pseudonym { normalize });
            (column, t.unwrap())
        })
        .collect()
}

fn pseudonym(t: &FieldTransformer, value: &str) -> String {
    match t.apply(value, &Context::default()).unwrap() {
        Transformed::Value(v) => v,
        Transformed::Dropped => panic!("a pseudonym is never dropped"),
    }
}

#[test]
fn csv_parses_to_the_expected_json() {
    let (headers, records) = read_csv();
    assert_eq!(headers.len(), 23);
    assert_eq!(headers[0], "row_id");
    assert_eq!(headers[22], "note");
    let expected: Vec<Row> = load_json(EXPECTED);
    assert_eq!(expected.len(), 57);
    assert_eq!(records.len(), expected.len());
    for (record, want) in records.iter().zip(&expected) {
        assert_eq!(record.len(), headers.len());
        let got: Row = headers
            .iter()
            .cloned()
            .zip(record.iter().cloned())
            .collect();
        assert_eq!(&got, want, "row {}", want["row_id"]);
    }
    // The hard cases are really there: quotes, embedded LF and CRLF, a 1000+ character field.
    let rows = rows();
    assert_eq!(row(&rows, 37)["given_name"], "Robert \"Bob\"");
    assert_eq!(row(&rows, 39)["address"], "123 Example St\nApt 4B");
    assert_eq!(row(&rows, 40)["address"], "456 Example Ave\r\nUnit 7");
    assert_eq!(row(&rows, 40)["given_name"], "  Ava\t");
    assert!(row(&rows, 43)["address"].len() > 1000);
}

#[test]
fn csv_writes_back_byte_for_byte_and_rereads_equal() {
    let original = std::fs::read(path(CSV)).unwrap();
    let (headers, records) = read_csv();
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    writer.write_record(&headers).unwrap();
    for r in &records {
        writer.write_record(r).unwrap();
    }
    let written = writer.into_inner().unwrap();
    // Minimal quoting and CRLF records, as the file was written (RFC 4180).
    assert!(written == original, "rewritten CSV differs from the file");
    let mut reader = csv::Reader::from_reader(written.as_slice());
    let reread_headers: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    let reread: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect();
    assert_eq!(reread_headers, headers);
    assert_eq!(reread, records);
}

/// The same-person pairs of the README, with the identifying columns whose raw values differ
/// (so that each pair exercises the normalization, not only equal bytes).
const SAME_PERSON: [(u32, u32, &[&str]); 3] = [
    (2, 3, &["mrn", "given_name", "full_name", "ssn"]),
    (
        7,
        8,
        &["given_name", "family_name", "full_name", "postal_code"],
    ),
    (33, 34, &["given_name", "family_name", "full_name", "ssn"]),
];

#[test]
fn same_person_spelled_differently_gets_one_pseudonym_per_field() {
    let rows = rows();
    let domain = domain();
    let transformers = pseudonymizers(&domain);
    for (a, b, differing) in SAME_PERSON {
        let (ra, rb) = (row(&rows, a), row(&rows, b));
        for column in differing {
            assert_ne!(
                ra[*column], rb[*column],
                "rows {a}/{b} {column}: raw values equal"
            );
        }
        let mut compared = 0;
        for (column, _) in IDENTIFYING {
            let (va, vb) = (&ra[column], &rb[column]);
            // Both rows fill the same identifying columns.
            assert_eq!(va.is_empty(), vb.is_empty(), "rows {a}/{b} {column}");
            if va.is_empty() {
                continue;
            }
            let t = &transformers[column];
            assert_eq!(
                pseudonym(t, va),
                pseudonym(t, vb),
                "rows {a}/{b} {column}: {va:?} and {vb:?}"
            );
            compared += 1;
        }
        assert!(compared >= differing.len());
    }
}

#[test]
fn same_person_zip_generalizes_to_one_zip3() {
    let rows = rows();
    let zip3 = FieldTransformer::new(&domain(), "postal_code", &Transform::Zip3 {}).unwrap();
    for (a, b) in [(2, 3), (7, 8)] {
        let za = zip3.apply(&row(&rows, a)["postal_code"], &Context::default());
        let zb = zip3.apply(&row(&rows, b)["postal_code"], &Context::default());
        assert_eq!(za.unwrap(), zb.unwrap(), "rows {a}/{b}");
    }
}

/// Rows 33/34 write one birth date as `1970-01-01` and `01/01/1970`. The date transforms take
/// ISO 8601 only: the slash form is refused (so the row is reported), never shifted or
/// generalized to a different value. Reading `MM/DD/YYYY` vs `DD/MM/YYYY` is the data set's
/// declaration, not something to guess per value.
#[test]
fn same_person_birth_date_in_another_format_is_refused_not_shifted_differently() {
    let rows = rows();
    let domain = domain();
    let (iso, slashed) = (&row(&rows, 33)["birth_date"], &row(&rows, 34)["birth_date"]);
    assert_eq!(iso, "1970-01-01");
    let patient = "v1.some-patient";
    let ctx = Context {
        patient_pseudonym: Some(patient),
    };
    for transform in [Transform::DateShift { max_days: 365 }, Transform::Year {}] {
        let t = FieldTransformer::new(&domain, "birth_date", &transform).unwrap();
        assert!(t.apply(iso, &ctx).is_ok(), "{}", transform.kind());
        assert!(
            matches!(
                t.apply(slashed, &ctx),
                Err(TokenizeError::InvalidDate { .. })
            ),
            "{}",
            transform.kind()
        );
    }
}

#[test]
fn different_people_get_different_pseudonyms() {
    let rows = rows();
    let domain = domain();
    let transformers = pseudonymizers(&domain);
    // Every distinct patient id maps to a distinct pseudonym.
    let mut by_id: HashMap<&str, String> = HashMap::new();
    for r in &rows {
        let id = r["patient_id"].as_str();
        if !id.is_empty() {
            by_id.insert(id, pseudonym(&transformers["patient_id"], id));
        }
    }
    assert_eq!(by_id.len(), 20);
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for (id, p) in &by_id {
        if let Some(other) = seen.insert(p, id) {
            panic!("patient ids {id} and {other} share a pseudonym");
        }
    }
    // In every identifying column, distinct normalized values give distinct pseudonyms, and one
    // normalized value gives one pseudonym.
    for (column, normalization) in IDENTIFYING {
        let mut pseudonyms: HashMap<String, String> = HashMap::new();
        let mut normalized_of: HashMap<String, String> = HashMap::new();
        for r in &rows {
            let v = &r[column];
            if v.is_empty() {
                continue;
            }
            let Ok(normalized) = normalization.normalize(v) else {
                continue;
            };
            let p = pseudonym(&transformers[column], v);
            if let Some(previous) = pseudonyms.insert(normalized.clone(), p.clone()) {
                assert_eq!(previous, p, "{column}");
            }
            if let Some(other) = normalized_of.insert(p, normalized.clone()) {
                assert_eq!(other, normalized, "{column}: two values share a pseudonym");
            }
        }
    }
    // The same value in another field or domain gives an unrelated pseudonym.
    let ssn = "999-41-2363";
    let other_domain = DomainKey::new("messy-other", 1, Zeroizing::new([0x5a; 32]));
    let same_transform = Transform::Pseudonym {
        normalize: Normalization::Ssn,
    };
    let in_other_domain = FieldTransformer::new(&other_domain, "ssn", &same_transform).unwrap();
    let in_other_field = FieldTransformer::new(&domain, "mrn", &same_transform).unwrap();
    let here = pseudonym(&transformers["ssn"], ssn);
    assert_ne!(here, pseudonym(&in_other_domain, ssn));
    assert_ne!(here, pseudonym(&in_other_field, ssn));
}

#[test]
fn invisible_and_space_variants_of_the_data_normalize_away() {
    let rows = rows();
    let text = |s: &str| Normalization::Text.normalize(s).unwrap();
    // Row 40: leading spaces and a TAB; row 41: NBSP and a zero-width space; row 3: NFD.
    assert_eq!(text(&row(&rows, 40)["given_name"]), "ava");
    assert_eq!(text(&row(&rows, 41)["given_name"]), "mary ann");
    assert_eq!(text(&row(&rows, 41)["family_name"]), "smith");
    assert_eq!(text(&row(&rows, 3)["given_name"]), "josé emilio366");
    // Row 27: an RTL mark before the house number.
    assert!(text(&row(&rows, 27)["address"]).starts_with("12 "));
    // Row 20: SSN with surrounding white space; row 10: SSN with spaces.
    let ssn = |s: &str| Normalization::Ssn.normalize(s).unwrap();
    assert_eq!(ssn(&row(&rows, 20)["ssn"]), "999235101");
    assert_eq!(ssn(&row(&rows, 10)["ssn"]), "999542904");
    // Rows 24 and 27: full-width and Arabic-Indic digits in phones.
    let phone = |s: &str| Normalization::Phone.normalize(s).unwrap();
    assert_eq!(phone(&row(&rows, 24)["phone"]), "0355550123");
    assert_eq!(phone(&row(&rows, 27)["phone"]), "05550123");
    // Row 52: a full-width MRN is its ASCII digits, leading zeros removed.
    assert_eq!(
        Normalization::Mrn
            .normalize(&row(&rows, 52)["mrn"])
            .unwrap(),
        "123"
    );
}
