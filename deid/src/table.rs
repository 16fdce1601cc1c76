//! CSV files under `[[csv]]` rules: the per-file plan (which rule each header column gets,
//! matched case-insensitively; which column names the patient) and the worker that turns a
//! chunk of records into output records.

use std::path::Path;
use std::sync::Arc;

use crate::age::AgeCap;
use crate::csvfmt::{self, Chunk};
use crate::error::RejectReason;
use crate::glob::Glob;
use crate::ops::{Op, OpKind, Ops, PatientState};
use crate::pipeline::{ChunkOut, Processor};
use crate::{DeidError, UnknownFields};

/// The report's transform kind for a birth date removed under `age_cap`.
pub(crate) const OVER_AGE_CAP: &str = "over_age_cap";

/// A prepared CSV column rule.
#[derive(Debug, Clone)]
pub(crate) enum PreparedRule {
    Simple(Op),
    When {
        conds: Vec<(String, Vec<String>, Op)>,
        otherwise: Op,
    },
}

impl PreparedRule {
    fn has_shift(&self) -> bool {
        let shift = |op: &Op| matches!(op.kind, OpKind::Shift);
        match self {
            PreparedRule::Simple(op) => shift(op),
            PreparedRule::When { conds, otherwise } => {
                shift(otherwise) || conds.iter().any(|(_, _, op)| shift(op))
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct CsvEntry {
    pub(crate) files: Vec<Glob>,
    pub(crate) patient: Vec<String>,
    /// (lower-case name, rule).
    pub(crate) columns: Vec<(String, PreparedRule)>,
    /// Lower-case birth-date and death-date columns (`age_cap`).
    pub(crate) birth_date: Option<String>,
    pub(crate) death_date: Option<String>,
}

/// The per-column plan of a CSV file from its header: each column's rule from the first
/// matching entry that names it (case-insensitively), the patient column, the output header.
pub(crate) fn plan(
    entries: &[CsvEntry],
    ops: &Ops,
    unknown_fields: UnknownFields,
    file: &Path,
    names: &[String],
) -> Result<CsvPlan, DeidError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let entries: Vec<&CsvEntry> = entries
        .iter()
        .filter(|e| e.files.iter().any(|g| g.matches(&name)))
        .collect();
    let lower: Vec<String> = names.iter().map(|n| n.to_lowercase()).collect();
    for (i, l) in lower.iter().enumerate() {
        if lower[..i].contains(l) {
            return Err(DeidError::DuplicateColumn {
                file: file.to_owned(),
                column: names[i].clone(),
            });
        }
    }
    let mut cols = Vec::with_capacity(names.len());
    let mut out_header = Vec::new();
    for (i, l) in lower.iter().enumerate() {
        let rule = entries
            .iter()
            .find_map(|e| e.columns.iter().find(|(n, _)| n == l).map(|(_, r)| r));
        let col = match rule {
            Some(prepared) => {
                let rule = match prepared {
                    PreparedRule::Simple(op) => ColRule::Simple(op.clone()),
                    PreparedRule::When { conds, otherwise } => ColRule::When {
                        conds: conds
                            .iter()
                            .map(|(c, values, op)| {
                                (
                                    lower.iter().position(|n| n == c),
                                    values.clone(),
                                    op.clone(),
                                )
                            })
                            .collect(),
                        otherwise: otherwise.clone(),
                    },
                };
                let dropped = matches!(&rule, ColRule::Simple(op) if op.is_drop());
                let label = match &rule {
                    ColRule::Simple(op) | ColRule::When { otherwise: op, .. } => {
                        Arc::clone(&op.label)
                    }
                };
                ColPlan {
                    rule,
                    label,
                    dropped,
                    unknown: false,
                    shift: prepared.has_shift(),
                }
            }
            None => {
                if unknown_fields == UnknownFields::Error {
                    return Err(DeidError::UnknownField {
                        file: file.to_owned(),
                        line: 1,
                        field: crate::report::schema_name(&names[i]),
                    });
                }
                let op = Op {
                    kind: OpKind::Drop,
                    label: Arc::from(names[i].as_str()),
                };
                ColPlan {
                    label: Arc::clone(&op.label),
                    rule: ColRule::Simple(op),
                    dropped: true,
                    unknown: true,
                    shift: false,
                }
            }
        };
        if !col.dropped {
            if !out_header.is_empty() {
                out_header.push(b',');
            }
            csvfmt::write_field(&mut out_header, &names[i]);
        }
        cols.push(col);
    }
    out_header.push(b'\n');
    let candidates: Vec<&String> = entries
        .iter()
        .find(|e| !e.patient.is_empty())
        .map(|e| e.patient.iter().collect())
        .unwrap_or_default();
    let patient = candidates
        .iter()
        .find_map(|c| lower.iter().position(|n| n == *c));
    let needs_patient = cols.iter().any(|c| c.shift);
    if needs_patient && patient.is_none() {
        return Err(DeidError::MissingPatientColumn {
            file: file.to_owned(),
            columns: if candidates.is_empty() {
                "(none declared)".to_owned()
            } else {
                candidates
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    }
    if let Some(pc) = patient {
        let is_patient_op = match (&cols[pc].rule, ops.patient()) {
            (ColRule::Simple(op), Some(p)) => match &op.kind {
                OpKind::Apply(a) => Arc::ptr_eq(a, p),
                _ => false,
            },
            _ => false,
        };
        if !is_patient_op {
            return Err(DeidError::PatientFieldMismatch {
                file: file.to_owned(),
                field: names[pc].clone(),
            });
        }
    }
    // The birth and death columns: the first entry that names a birth date decides.
    let ages = entries.iter().find(|e| e.birth_date.is_some());
    let position = |c: &Option<String>| c.as_ref().and_then(|c| lower.iter().position(|n| n == c));
    let birth = ages.and_then(|e| position(&e.birth_date));
    let death = ages.and_then(|e| position(&e.death_date));
    Ok(CsvPlan {
        cols,
        patient,
        birth,
        death,
        out_header,
    })
}

/// The header's column names (a UTF-8 BOM before the first is dropped).
pub(crate) fn header_names(
    chunk: &Chunk,
    record: &csvfmt::RawRecord,
) -> Result<Vec<String>, RejectReason> {
    if let Some(fault) = &record.fault {
        return Err(fault.clone());
    }
    let mut names = Vec::new();
    for (i, &span) in chunk.fields_of(record).iter().enumerate() {
        let mut scratch = String::new();
        let text = csvfmt::field_text(&chunk.data, span, &mut scratch)
            .ok_or(RejectReason::InvalidUtf8 { field: i + 1 })?;
        let text = if i == 0 {
            text.trim_start_matches('\u{feff}')
        } else {
            text
        };
        names.push(text.trim().to_owned());
    }
    Ok(names)
}

/// A CSV file's columns as the header names them.
pub(crate) struct CsvPlan {
    pub(crate) cols: Vec<ColPlan>,
    pub(crate) patient: Option<usize>,
    /// The birth-date column `age_cap` checks and removes, and the death-date column.
    pub(crate) birth: Option<usize>,
    pub(crate) death: Option<usize>,
    pub(crate) out_header: Vec<u8>,
}

pub(crate) struct ColPlan {
    rule: ColRule,
    /// The column's name as the policy writes it (or the header, for unknown columns).
    label: Arc<str>,
    dropped: bool,
    pub(crate) unknown: bool,
    shift: bool,
}

enum ColRule {
    Simple(Op),
    When {
        conds: Vec<(Option<usize>, Vec<String>, Op)>,
        otherwise: Op,
    },
}

pub(crate) struct CsvProcessor<'a> {
    pub(crate) ops: &'a Ops,
    pub(crate) plan: &'a CsvPlan,
    pub(crate) age: Option<AgeCap>,
}

/// A worker's scratch space: field texts, one-entry caches per column (consecutive rows
/// repeat patient and encounter ids), the previous row's patient with its date offset,
/// per-column counters (folded into the chunk's stats once per chunk).
#[derive(Default)]
pub(crate) struct CsvState {
    scratch: Vec<String>,
    last: Vec<Option<(String, String)>>,
    patient: Option<PatientCache>,
    counts: Vec<Vec<(&'static str, u64)>>,
    value: String,
}

/// The parts of [`CsvState`] one row writes while its texts borrow the scratch buffers.
struct Row<'a> {
    last: &'a mut Vec<Option<(String, String)>>,
    counts: &'a mut Vec<Vec<(&'static str, u64)>>,
    record: &'a mut Vec<u8>,
    value: &'a mut String,
}

/// The previous row's patient: raw id, pseudonym token, column output, date offset.
struct PatientCache {
    raw: String,
    token: String,
    shown: String,
    offset: Option<i64>,
}

impl Processor for CsvProcessor<'_> {
    type State = CsvState;
    type Output = ChunkOut;

    fn state(&self) -> CsvState {
        let n = self.plan.cols.len();
        CsvState {
            scratch: vec![String::new(); n],
            last: vec![None; n],
            counts: vec![Vec::new(); n],
            ..CsvState::default()
        }
    }

    fn process(&self, chunk: &Chunk, st: &mut CsvState) -> ChunkOut {
        let mut out = ChunkOut::new(chunk.data.len() + chunk.data.len() / 2);
        for rec in &chunk.records {
            if let Err(reason) = self.record(chunk, rec, st, &mut out) {
                out.rejects.push((rec.line, reason, rec.raw.clone()));
            }
        }
        for (col, counts) in self.plan.cols.iter().zip(st.counts.iter_mut()) {
            for (kind, n) in counts.drain(..) {
                if col.unknown {
                    *out.unknown.entry(col.label.to_string()).or_insert(0) += n;
                } else {
                    out.stats.add(&col.label, kind, n);
                }
            }
        }
        out
    }
}

impl CsvProcessor<'_> {
    /// One record into `out.bytes`, or why it is rejected.
    fn record(
        &self,
        chunk: &Chunk,
        rec: &csvfmt::RawRecord,
        st: &mut CsvState,
        out: &mut ChunkOut,
    ) -> Result<(), RejectReason> {
        if let Some(fault) = &rec.fault {
            return Err(fault.clone());
        }
        let spans = chunk.fields_of(rec);
        if spans.len() != self.plan.cols.len() {
            return Err(RejectReason::FieldCount {
                expected: self.plan.cols.len(),
                found: spans.len(),
            });
        }
        // One UTF-8 check per record; on failure, find the field for the report.
        let Ok(text) = std::str::from_utf8(&chunk.data[rec.raw.clone()]) else {
            let field = spans
                .iter()
                .position(|s| std::str::from_utf8(&chunk.data[s.start..s.end]).is_err())
                .map_or(1, |i| i + 1);
            return Err(RejectReason::InvalidUtf8 { field });
        };
        let CsvState {
            scratch,
            patient: patient_cache,
            ..
        } = st;
        let mut texts: Vec<&str> = Vec::with_capacity(spans.len());
        for (i, (span, scratch)) in spans.iter().zip(scratch.iter_mut()).enumerate() {
            let t = csvfmt::field_in(text, rec.raw.start, *span, scratch)
                .ok_or(RejectReason::InvalidUtf8 { field: i + 1 })?;
            texts.push(t);
        }
        let ops = self.ops;
        // The patient's pseudonym: the date-shift context and the patient column's value.
        let mut patient = PatientState::default();
        let mut cached = None;
        if let (Some(pc), Some(p)) = (self.plan.patient, ops.patient()) {
            let raw = texts[pc];
            if !raw.is_empty() {
                let mut c = match patient_cache.take() {
                    Some(c) if c.raw == raw => c,
                    _ => {
                        let (mut token, mut shown) = (String::new(), String::new());
                        p.token(raw, &mut token)
                            .and_then(|()| p.apply(raw, &mut shown))
                            .map_err(|error| RejectReason::Transform {
                                field: self.plan.cols[pc].label.to_string(),
                                entry: None,
                                error,
                            })?;
                        PatientCache {
                            raw: raw.to_owned(),
                            token,
                            shown,
                            offset: None,
                        }
                    }
                };
                patient = PatientState::with_offset(std::mem::take(&mut c.token), c.offset);
                cached = Some(c);
            }
        }
        // A patient over the age cap: the birth date is removed instead of shifted.
        let over_cap = match (self.age, self.plan.birth) {
            (Some(age), Some(b)) => age.exceeded(texts[b], self.plan.death.map(|d| texts[d])),
            _ => false,
        };
        let aggregated = self.plan.birth.filter(|_| over_cap);
        // The record is built in place at the end of the output; a reject truncates it away.
        let start = out.bytes.len();
        let mut row = Row {
            last: &mut st.last,
            counts: &mut st.counts,
            record: &mut out.bytes,
            value: &mut st.value,
        };
        let result = self.fields(&texts, &mut patient, cached.as_ref(), aggregated, &mut row);
        if let Some(mut c) = cached {
            let (token, offset) = patient.into_parts();
            c.token = token.unwrap_or_default();
            c.offset = offset;
            st.patient = Some(c);
        }
        if let Err(reason) = result {
            out.bytes.truncate(start);
            return Err(reason);
        }
        out.bytes.push(b'\n');
        out.records += 1;
        Ok(())
    }

    /// The output fields of one record into `st.record`.
    fn fields(
        &self,
        texts: &[&str],
        patient: &mut PatientState,
        cached: Option<&PatientCache>,
        aggregated: Option<usize>,
        st: &mut Row<'_>,
    ) -> Result<(), RejectReason> {
        let ops = self.ops;
        let mut first = true;
        for (i, col) in self.plan.cols.iter().enumerate() {
            let value = texts[i];
            let op = match &col.rule {
                ColRule::Simple(op) => op,
                ColRule::When { conds, otherwise } => conds
                    .iter()
                    .find(|(c, values, _)| c.is_some_and(|c| values.iter().any(|v| v == texts[c])))
                    .map_or(otherwise, |(_, _, op)| op),
            };
            let removed = Some(i) == aggregated;
            if !value.is_empty() {
                let kind = if removed {
                    OVER_AGE_CAP
                } else {
                    op.kind_name()
                };
                let counts = &mut st.counts[i];
                match counts.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((kind, 1)),
                }
            }
            if col.dropped {
                continue;
            }
            if !first {
                st.record.push(b',');
            }
            first = false;
            if removed {
                continue;
            }
            if Some(i) == self.plan.patient {
                csvfmt::write_field(st.record, cached.map_or("", |c| c.shown.as_str()));
                continue;
            }
            let cacheable = matches!(col.rule, ColRule::Simple(_));
            let result = match &op.kind {
                OpKind::Keep => {
                    csvfmt::write_field(st.record, value);
                    continue;
                }
                OpKind::Apply(a) => match &st.last[i] {
                    Some((input, output)) if cacheable && input == value => {
                        csvfmt::write_field(st.record, output);
                        continue;
                    }
                    _ => a.apply(value, st.value),
                },
                _ => ops.apply(op, value, patient, st.value).map(|_| ()),
            };
            result.map_err(|error| RejectReason::Transform {
                field: op.label.to_string(),
                entry: None,
                error,
            })?;
            csvfmt::write_field(st.record, st.value);
            if cacheable && matches!(op.kind, OpKind::Apply(_)) {
                match &mut st.last[i] {
                    Some((input, output)) => {
                        input.clear();
                        input.push_str(value);
                        output.clear();
                        output.push_str(st.value);
                    }
                    slot => *slot = Some((value.to_owned(), st.value.clone())),
                }
            }
        }
        Ok(())
    }
}
