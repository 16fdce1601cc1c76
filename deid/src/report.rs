//! The report of a run: counts per file, field and transform, rejects with file, line and
//! reason, and dropped unknown fields. It never holds a value, and its serialized form names
//! files by their *output* names only (Synthea names FHIR bundles after the patient); the input
//! paths are kept in fields that are not serialized, for the caller's terminal.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::ops::Op;

/// A field name taken from the data (a CSV header, a JSON member name, an extension URL) as
/// the report may show it. Names are schema, not values, but a data set can misuse them: a
/// name with control or non-ASCII characters, a run of seven or more digits (an SSN, a phone
/// number, a date) or more than 128 characters is shown as a placeholder instead.
pub(crate) fn schema_name(name: &str) -> String {
    let mut run = 0;
    let mut longest = 0;
    for b in name.bytes() {
        run = if b.is_ascii_digit() { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let printable = name.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    if printable && longest < 7 && name.len() <= 128 {
        name.to_owned()
    } else {
        "(a field whose name is not shown)".to_owned()
    }
}

/// Counts of values per field label and transform, as gathered by one worker.
#[derive(Debug, Default, Clone)]
pub(crate) struct FieldStats {
    /// label → (transform kind, count); a label has one or two kinds (conditional rules).
    counts: HashMap<Arc<str>, Vec<(&'static str, u64)>>,
}

impl FieldStats {
    pub(crate) fn count(&mut self, op: &Op) {
        self.add(&op.label, op.kind_name(), 1);
    }

    pub(crate) fn add(&mut self, label: &Arc<str>, kind: &'static str, n: u64) {
        // Looked up by `&str`: no `Arc` clone per value.
        let kinds = match self.counts.get_mut(label.as_ref()) {
            Some(k) => k,
            None => self.counts.entry(Arc::clone(label)).or_default(),
        };
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, c)) => *c += n,
            None => kinds.push((kind, n)),
        }
    }

    pub(crate) fn merge(&mut self, other: FieldStats) {
        for (label, kinds) in other.counts {
            for (kind, n) in kinds {
                self.add(&label, kind, n);
            }
        }
    }

    /// field → transform → count.
    pub(crate) fn into_fields(self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.counts
            .into_iter()
            .map(|(label, kinds)| {
                let kinds = kinds.into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
                (label.to_string(), kinds)
            })
            .collect()
    }
}

/// The report of a whole run; written as JSON next to the output.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The policy's name.
    pub policy: String,
    /// The tokenization domain.
    pub domain: String,
    /// The domain key version the pseudonyms were made with.
    pub key_version: u32,
    /// Records written (all files).
    pub records: u64,
    /// Records rejected (all files).
    pub rejected: u64,
    /// Input bytes read.
    pub bytes_in: u64,
    /// Output bytes written.
    pub bytes_out: u64,
    /// Values per transform kind (all files).
    pub transforms: BTreeMap<String, u64>,
    /// One entry per processed file.
    pub files: Vec<FileReport>,
    /// Rejected records, in file and line order.
    pub rejects: Vec<Reject>,
    /// Unknown fields that were dropped (`unknown_fields = "warn"`).
    pub warnings: Vec<Warning>,
    /// Input files that no rule matched and that were skipped (`unknown_fields = "warn"`).
    pub skipped_files: u64,
    /// The skipped files' paths (not serialized: input names may identify patients).
    #[serde(skip)]
    pub skipped: Vec<PathBuf>,
}

/// One processed file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// The output file, relative to the output directory.
    pub file: String,
    /// The input file (not serialized).
    #[serde(skip)]
    pub input: PathBuf,
    /// `csv`, `ndjson`, `json`, `fhir-bundle` or `fhir-ndjson`.
    pub format: &'static str,
    /// Records written.
    pub records: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Input bytes.
    pub bytes_in: u64,
    /// Values per field (column name, JSON pointer or FHIR rule path) and transform kind
    /// (`keep`, `pseudonym`, `date_shift`, `drop`, `redact`, `zip3`, `reference`, …); empty
    /// values are not counted.
    pub fields: BTreeMap<String, BTreeMap<String, u64>>,
}

/// A rejected record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reject {
    /// The output file the record would have gone to.
    pub file: String,
    /// The input file (not serialized).
    #[serde(skip)]
    pub input: PathBuf,
    /// 1-based line where the record starts.
    pub line: u64,
    /// Why (never a value).
    pub reason: String,
}

/// An unknown field that was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// The output file.
    pub file: String,
    /// The column name or element path.
    pub field: String,
    /// How many values were dropped (for a CSV column: its rows).
    pub occurrences: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_looking_names_are_not_shown() {
        assert_eq!(
            schema_name("Patient.maritalStatus"),
            "Patient.maritalStatus"
        );
        assert_eq!(
            schema_name(
                "Patient.extension(http://hl7.org/fhir/us/core/StructureDefinition/us-core-race)"
            ),
            "Patient.extension(http://hl7.org/fhir/us/core/StructureDefinition/us-core-race)"
        );
        assert_eq!(schema_name("/visits/12/note"), "/visits/12/note");
        for bad in ["/999412363", "/Jos\u{e9}", "/a\nb", &"x".repeat(200)] {
            assert_eq!(
                schema_name(bad),
                "(a field whose name is not shown)",
                "{bad}"
            );
        }
    }
}

/// Progress of a run, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Records processed so far (all files).
    pub records: u64,
    /// Input bytes processed so far.
    pub bytes: u64,
    /// Input bytes in total.
    pub total_bytes: u64,
}
