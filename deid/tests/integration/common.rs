//! Shared set-up: data paths, the fixed test key, runs of the built-in profiles, an
//! independent CSV reader (the `csv` crate), date arithmetic and the leak scanner.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use deid::{Engine, Options, Policy, Report};
use tokenize::DomainKey;
use zeroize::Zeroizing;

pub const SYNTHEA_CSV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/synthea/csv");
pub const SYNTHEA_FHIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/data/synthea/fhir"
);
pub const CSV_PROFILE: &str = "hipaa-safe-harbor-synthea-csv";
pub const FHIR_PROFILE: &str = "hipaa-safe-harbor-fhir-r4";

/// The fixed test key, for the profiles' placeholder domain.
pub fn key() -> DomainKey {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    DomainKey::new("research", 1, Zeroizing::new(bytes))
}

pub fn engine(profile: &str) -> Engine {
    let policy = Policy::builtin(profile).expect("built-in profile");
    Engine::new(&policy, &key()).expect("engine")
}

pub fn run(
    engine: &Engine,
    input: &Path,
    out: &Path,
    options: &Options,
) -> Result<Report, deid::DeidError> {
    engine.run(input, out, options, &|_| {})
}

/// Every entry of a directory, hidden ones included, sorted.
pub fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// A CSV file read with the `csv` crate: header and rows.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn read(path: &Path) -> Table {
        let mut r =
            csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let header = r.headers().unwrap().iter().map(str::to_owned).collect();
        let rows = r
            .records()
            .map(|rec| rec.unwrap().iter().map(str::to_owned).collect())
            .collect();
        Table { header, rows }
    }

    pub fn col(&self, name: &str) -> Option<usize> {
        self.header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
    }

    pub fn values(&self, name: &str) -> Vec<&str> {
        match self.col(name) {
            Some(i) => self.rows.iter().map(|r| r[i].as_str()).collect(),
            None => Vec::new(),
        }
    }
}

/// Days since 1970-01-01 of `YYYY-MM-DD…` and the rest of the text (the time part).
pub fn days(value: &str) -> Option<(i64, &str)> {
    let y: i64 = value.get(0..4)?.parse().ok()?;
    if value.get(4..5)? != "-" || value.get(7..8)? != "-" {
        return None;
    }
    let m: i64 = value.get(5..7)?.parse().ok()?;
    let d: i64 = value.get(8..10)?.parse().ok()?;
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468, &value[10..]))
}

/// The run date of the standard runs, so that who is over 89 does not change with the clock.
pub fn run_date() -> deid::Date {
    deid::Date::new(2025, 6, 30).unwrap()
}

/// Options of the standard runs: the fixed run date.
pub fn dated_options() -> Options {
    Options {
        today: Some(run_date()),
        ..Options::default()
    }
}

/// Whether someone born on `birth` (`YYYY-MM-DD…`) is over 89 at `death` (if not empty) or
/// at the standard run date: completed years, counted by hand.
pub fn over_89(birth: &str, death: &str) -> bool {
    let ymd = |s: &str| -> (i32, u32, u32) {
        (
            s[0..4].parse().unwrap(),
            s[5..7].parse().unwrap(),
            s[8..10].parse().unwrap(),
        )
    };
    let b = ymd(birth);
    let e = if death.is_empty() {
        ymd(&run_date().to_string())
    } else {
        ymd(death)
    };
    let years = e.0 - b.0 - i32::from((e.1, e.2) < (b.1, b.2));
    years > 89
}

/// Lower case, white space and dashes removed: the form both sides of a leak check take.
pub fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '-' | '\u{2010}'..='\u{2015}'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The normalized text of every file under `dir` (recursively).
pub fn output_text(dir: &Path) -> HashMap<PathBuf, String> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for p in entries(&d) {
            if p.is_dir() {
                stack.push(p);
            } else {
                let text = String::from_utf8(std::fs::read(&p).unwrap()).unwrap();
                out.insert(p, normalize(&text));
            }
        }
    }
    out
}

/// Asserts that no secret (original identifying value) occurs in any output file; returns how
/// many distinct secrets were checked. Every 4- and 8-byte window of the output is indexed, so
/// that only candidates whose every window occurs are searched for in full.
pub fn assert_no_leaks(dir: &Path, secrets: &[(String, String)]) -> usize {
    let texts = output_text(dir);
    assert!(!texts.is_empty(), "no output to check");
    let mut w4: HashSet<u32> = HashSet::new();
    let mut w8: HashSet<u64> = HashSet::new();
    for text in texts.values() {
        for w in text.as_bytes().windows(8) {
            w8.insert(u64::from_le_bytes(w.try_into().unwrap()));
        }
        for w in text.as_bytes().windows(4) {
            w4.insert(u32::from_le_bytes(w.try_into().unwrap()));
        }
    }
    let mut checked = HashSet::new();
    for (kind, secret) in secrets {
        let needle = normalize(secret);
        // Placeholders made of one repeated character (Synthea's claim group `99999999999`)
        // identify nobody and turn up in float noise (`764.5899999999999`).
        let placeholder = needle.chars().all(|c| needle.starts_with(c));
        // Shorter values occur inside words once white space is gone (the city "Brea" in
        // "deep breathing"); the tests check that such fields are removed instead.
        if needle.len() < 5 || placeholder || !checked.insert(needle.clone()) {
            continue;
        }
        let b = needle.as_bytes();
        let candidate = if b.len() >= 8 {
            b.windows(8)
                .all(|w| w8.contains(&u64::from_le_bytes(w.try_into().unwrap())))
        } else {
            b.windows(4)
                .all(|w| w4.contains(&u32::from_le_bytes(w.try_into().unwrap())))
        };
        if !candidate {
            continue;
        }
        for (path, text) in &texts {
            assert!(
                !text.contains(&needle),
                "{kind} of the input appears in {}",
                path.display()
            );
        }
    }
    checked.len()
}

/// Copies every file of `from` into a new directory and returns it.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for p in entries(from) {
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}
