//! The policy file: TOML read once into raw structures (unknown keys refused, positions kept),
//! then validated into [`Policy`], which the engine takes. Every error names the line and
//! column of the policy text it is about.
//!
//! ```toml
//! name = "my-study"
//! domain = "study-42"            # the tokenization domain whose key the engine gets
//! unknown_fields = "error"       # or "warn": unknown fields are dropped and reported
//!
//! [patient]
//! transform = "patient_id"       # named pseudonym (with an explicit key) of the patient id
//! age_cap = 89                   # birth dates of patients older than this are removed
//! reference_date = "2024-12-31"  # ages are computed at this date (default: the run's date)
//!
//! [transforms]                   # named transforms; `key` shares derived keys between
//! patient_id = { kind = "pseudonym", normalize = "exact", key = "patient", format = "uuid" }
//! date = { kind = "date_shift", max_days = 365 }
//!
//! [[csv]]                        # CSV columns by header name (case-insensitive)
//! files = ["patients.csv"]
//! patient = "Id"                 # or a list of candidate columns
//! birth_date = "BIRTHDATE"       # with age_cap: the column checked (and removed) ...
//! death_date = "DEATHDATE"       # ... and the death date the age is taken at, if present
//! [csv.columns]
//! Id = "patient_id"
//! BIRTHDATE = "date"
//! ZIP = "zip3"                   # a transform kind without parameters
//! RACE = "keep"                  # the only pass-through
//! VALUE = { when = [{ column = "TYPE", in = ["numeric"], use = "keep" }], otherwise = "redact" }
//!
//! [[json]]                       # NDJSON / JSON records by JSON pointer (`*` = any segment)
//! files = ["*.jsonl"]
//! patient = "/patient"
//! [json.fields]
//! "/patient" = "patient_id"
//!
//! [fhir]                         # FHIR R4 bundles and NDJSON by resource type and path
//! ids = "patient_id"             # resource ids, fullUrls and references
//! file_names = "pseudonymize"    # output names (default "keep")
//! keep_names = ["*.ndjson"]      # except these
//! age_extensions = ["http://example.org/age"] # with age_cap: dropped from a Patient over it
//! [fhir.elements]
//! "Patient.birthDate" = "date"
//! "*.meta" = "keep"
//! [fhir.extensions]
//! "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName" = "drop"
//! ```
//!
//! A rule's value is `"keep"`, the name of a transform under `[transforms]`, a transform kind
//! that needs no parameters (`"drop"`, `"zip3"`, `"year"`, `"age"`, `"redact"`, `"pseudonym"`,
//! `"deterministic"`), or an inline table `{ kind = "…", … }`. A transform's keys are derived
//! for its `key` if it has one, otherwise for the field (the column name or path as written in
//! the policy), so two fields share pseudonyms only when the policy says so. Besides the
//! transform's own parameters a table may hold `key`, `format = "uuid"` (pseudonyms written as
//! UUIDs) and, for `zip3`, `zero_pad = 5` (`1850` is read as `01850`).
//!
//! `age_cap` (at most 89, Safe Harbor's limit) is described in [`crate::age`]: in FHIR the
//! birth and death dates are `Patient.birthDate` and `Patient.deceasedDateTime`; in CSV the
//! `[[csv]]` entry names them. With a cap below 89 the `age` transform aggregates above it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;
use tokenize::{DomainKey, FieldTransformer, Transform};
use toml::{Spanned, Value};
use zeroize::Zeroizing;

use crate::age::Date;
use crate::glob::Glob;
use crate::{DeidError, PolicyError};

/// What happens to a field (CSV column, JSON member, FHIR element) the policy does not mention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    /// The run stops with [`DeidError::UnknownField`].
    Error,
    /// The field is dropped and reported in the run's report. Never passed through.
    Warn,
}

/// How FHIR output files are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileNames {
    /// As the input file.
    #[default]
    Keep,
    /// A keyed pseudonym of the input name (Synthea names bundles after the patient).
    Pseudonymize,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) origin: String,
    pub(crate) name: String,
    pub(crate) domain: String,
    pub(crate) unknown_fields: UnknownFields,
    pub(crate) specs: Vec<Spec>,
    pub(crate) patient: Option<usize>,
    pub(crate) age_cap: Option<AgeLimit>,
    pub(crate) csv: Vec<CsvRule>,
    pub(crate) json: Vec<JsonRule>,
    pub(crate) fhir: Option<FhirPolicy>,
}

/// `[patient] age_cap` and `reference_date`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AgeLimit {
    pub(crate) cap: u32,
    /// `None`: the run's date.
    pub(crate) reference: Option<Date>,
}

/// One transform of the policy, named or inline.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) transform: Transform,
    /// Derivation name shared by every field using this transform (`None`: per field).
    pub(crate) key: Option<String>,
    /// Pseudonyms written as UUIDs (FHIR ids, Synthea ids) instead of `v<version>.<base64>`.
    pub(crate) uuid: bool,
    /// Digit strings shorter than this are left-padded with zeros first (ZIP codes that lost
    /// their leading zero in a spreadsheet or a numeric column: `1850` for `01850`).
    pub(crate) zero_pad: usize,
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Pass the value through.
    Keep,
    /// Apply `specs[i]`.
    Apply(usize),
}

/// A CSV column's rule.
#[derive(Debug, Clone)]
pub(crate) enum ColumnRule {
    /// One action for every row.
    Simple(Action),
    /// The first condition that holds for the row chooses; otherwise `otherwise`.
    When { conds: Vec<Cond>, otherwise: Action },
}

/// `{ column = "TYPE", in = ["numeric"], use = "keep" }`.
#[derive(Debug, Clone)]
pub(crate) struct Cond {
    pub(crate) column: String,
    pub(crate) values: Vec<String>,
    pub(crate) then: Action,
}

/// One `[[csv]]` entry.
#[derive(Debug, Clone)]
pub(crate) struct CsvRule {
    pub(crate) files: Vec<Glob>,
    /// Candidate patient columns, first present wins.
    pub(crate) patient: Vec<String>,
    /// (name as written, rule).
    pub(crate) columns: Vec<(String, ColumnRule)>,
    /// The birth-date and death-date columns `age_cap` reads.
    pub(crate) birth_date: Option<String>,
    pub(crate) death_date: Option<String>,
}

/// A JSON pointer segment; `*` matches any member or index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PointerSeg {
    Key(String),
    Any,
}

/// One `[[json]]` entry.
#[derive(Debug, Clone)]
pub(crate) struct JsonRule {
    pub(crate) files: Vec<Glob>,
    pub(crate) patient: Option<(String, Vec<String>)>,
    pub(crate) fields: Vec<(String, Vec<PointerSeg>, Action)>,
}

/// A FHIR path segment after the resource type: an element name, or a choice `value[x]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PathSeg {
    Name(String),
    Choice(String),
}

/// The `[fhir]` section.
#[derive(Debug, Clone)]
pub(crate) struct FhirPolicy {
    pub(crate) files: Vec<Glob>,
    pub(crate) ids: usize,
    pub(crate) patient_references: Vec<String>,
    pub(crate) file_names: FileNames,
    /// Names kept even when `file_names = "pseudonymize"` (bulk NDJSON is named by type).
    pub(crate) keep_names: Vec<Glob>,
    /// (path as written, resource type or `*`, segments, action).
    pub(crate) elements: Vec<(String, String, Vec<PathSeg>, Action)>,
    pub(crate) extensions: Vec<(String, Action)>,
    /// Extension URLs dropped from the Patient of a patient over `age_cap`.
    pub(crate) age_extensions: Vec<String>,
}

/// The built-in profiles, by name.
pub const BUILTIN_PROFILES: [&str; 2] =
    ["hipaa-safe-harbor-synthea-csv", "hipaa-safe-harbor-fhir-r4"];

fn builtin_source(name: &str) -> Option<&'static str> {
    match name {
        "hipaa-safe-harbor-synthea-csv" => Some(include_str!(
            "../profiles/hipaa-safe-harbor-synthea-csv.toml"
        )),
        "hipaa-safe-harbor-fhir-r4" => {
            Some(include_str!("../profiles/hipaa-safe-harbor-fhir-r4.toml"))
        }
        _ => None,
    }
}

impl Policy {
    /// Parses and validates a policy from TOML text; `origin` names it in errors.
    pub fn from_toml(source: &str, origin: &str) -> Result<Self, PolicyError> {
        let loc = Locator { source, origin };
        let raw: RawPolicy = toml::from_str(source).map_err(|e| loc.toml_error(&e))?;
        Validator::new(&loc).policy(raw)
    }

    /// Reads and validates a policy file.
    pub fn from_file(path: &Path) -> Result<Self, DeidError> {
        let source = std::fs::read_to_string(path).map_err(|source| DeidError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::from_toml(&source, &path.display().to_string())?)
    }

    /// A built-in profile by name (see [`BUILTIN_PROFILES`]).
    pub fn builtin(name: &str) -> Option<Self> {
        let source = builtin_source(name)?;
        // The built-in profiles are validated by this crate's tests; a failure is a bug.
        Self::from_toml(source, &format!("builtin:{name}")).ok()
    }

    /// The TOML text of a built-in profile, to start a custom policy from.
    pub fn builtin_source(name: &str) -> Option<&'static str> {
        builtin_source(name)
    }

    /// A built-in profile if `spec` names one, otherwise the policy file at `spec`.
    pub fn load(spec: &str) -> Result<Self, DeidError> {
        match Self::builtin(spec) {
            Some(policy) => Ok(policy),
            None => Self::from_file(Path::new(spec)),
        }
    }

    /// Where the policy came from: its path, or `builtin:<name>`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tokenization domain whose key the engine needs.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// What happens to fields the policy does not mention.
    pub fn unknown_fields(&self) -> UnknownFields {
        self.unknown_fields
    }

    /// Uses the policy for another domain (the built-in profiles name a placeholder domain).
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = domain.into();
        self
    }

    /// Overrides the policy's `unknown_fields` (e.g. a CLI `--strict`).
    pub fn with_unknown_fields(mut self, unknown_fields: UnknownFields) -> Self {
        self.unknown_fields = unknown_fields;
        self
    }

    /// The age over which birth dates are removed, if the policy sets `age_cap`.
    pub fn age_cap(&self) -> Option<u32> {
        self.age_cap.map(|a| a.cap)
    }

    /// The spec of the patient transform, if the policy declares a patient linkage.
    pub(crate) fn patient_spec(&self) -> Option<usize> {
        self.patient
    }
}

// ---------------------------------------------------------------------------------------------
// Raw TOML

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<String>,
    domain: Spanned<String>,
    unknown_fields: UnknownFields,
    patient: Option<RawPatient>,
    #[serde(default)]
    transforms: BTreeMap<String, Spanned<Value>>,
    #[serde(default)]
    csv: Vec<Spanned<RawCsv>>,
    #[serde(default)]
    json: Vec<Spanned<RawJson>>,
    fhir: Option<Spanned<RawFhir>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPatient {
    transform: Spanned<String>,
    age_cap: Option<Spanned<i64>>,
    reference_date: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCsv {
    files: Spanned<Vec<String>>,
    patient: Option<Spanned<OneOrMany>>,
    birth_date: Option<Spanned<String>>,
    death_date: Option<Spanned<String>>,
    #[serde(default)]
    columns: BTreeMap<String, Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJson {
    files: Spanned<Vec<String>>,
    patient: Option<Spanned<String>>,
    #[serde(default)]
    fields: BTreeMap<String, Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFhir {
    files: Option<Spanned<Vec<String>>>,
    ids: Spanned<String>,
    patient_references: Option<Vec<String>>,
    #[serde(default)]
    file_names: FileNames,
    keep_names: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    elements: BTreeMap<String, Spanned<Value>>,
    #[serde(default)]
    extensions: BTreeMap<String, Spanned<Value>>,
    age_extensions: Option<Spanned<Vec<String>>>,
}

// ---------------------------------------------------------------------------------------------
// Positions

struct Locator<'a> {
    source: &'a str,
    origin: &'a str,
}

impl Locator<'_> {
    fn at(&self, offset: usize, message: impl Into<String>) -> PolicyError {
        let offset = offset.min(self.source.len());
        let before = self.source.get(..offset).unwrap_or(self.source);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        PolicyError {
            origin: self.origin.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> PolicyError {
        match e.span() {
            Some(span) => self.at(span.start, e.message().trim_end()),
            None => PolicyError {
                origin: self.origin.to_owned(),
                line: 0,
                column: 0,
                message: e.message().trim_end().to_owned(),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

/// Transform kinds that take no required parameter, usable as a bare string.
const KINDS: [&str; 10] = [
    "pseudonym",
    "deterministic",
    "fpe",
    "date_shift",
    "zip3",
    "year",
    "age",
    "mask",
    "redact",
    "drop",
];

struct Validator<'a> {
    loc: &'a Locator<'a>,
    specs: Vec<Spec>,
    names: HashMap<String, usize>,
    /// The date_shift N of the domain and where it was first given.
    max_days: Option<(u32, usize)>,
    /// Offset of the first date_shift rule, for the "needs a patient" error.
    first_shift: Option<usize>,
    probe: DomainKey,
}

impl<'a> Validator<'a> {
    fn new(loc: &'a Locator<'a>) -> Self {
        Self {
            loc,
            specs: Vec::new(),
            names: HashMap::new(),
            max_days: None,
            first_shift: None,
            // Parameters are checked by preparing each transform once with a throw-away key:
            // FF1 domain rules and date-shift ranges do not depend on the key bytes.
            probe: DomainKey::new("policy-check", 0, Zeroizing::new([0u8; 32])),
        }
    }

    fn err(&self, offset: usize, message: impl Into<String>) -> PolicyError {
        self.loc.at(offset, message)
    }

    fn policy(mut self, raw: RawPolicy) -> Result<Policy, PolicyError> {
        if raw.domain.get_ref().trim().is_empty() {
            return Err(self.err(raw.domain.span().start, "domain must not be empty"));
        }
        for (name, value) in &raw.transforms {
            let at = value.span().start;
            if name == "keep" || KINDS.contains(&name.as_str()) {
                return Err(self.err(
                    at,
                    format!(
                        "transform name `{name}` is reserved (\"keep\" and the transform kinds)"
                    ),
                ));
            }
            let Value::Table(table) = value.get_ref() else {
                return Err(self.err(
                    at,
                    format!("transform `{name}` must be a table with `kind`"),
                ));
            };
            let id = self.spec(table, at)?;
            self.names.insert(name.clone(), id);
        }
        let patient = match &raw.patient {
            None => None,
            Some(p) => Some(self.patient(&p.transform)?),
        };
        let age_cap = match &raw.patient {
            None => None,
            Some(p) => self.age_limit(p)?,
        };
        let mut csv = Vec::new();
        for entry in &raw.csv {
            csv.push(self.csv(entry, patient, age_cap.is_some())?);
        }
        if let Some(entry) = raw.csv.iter().find(|e| e.get_ref().patient.is_none()) {
            let uses_shift = entry
                .get_ref()
                .columns
                .values()
                .any(|v| self.is_shift_value(v.get_ref()));
            let any_patient = raw.csv.iter().any(|e| e.get_ref().patient.is_some());
            if uses_shift && !any_patient {
                return Err(self.err(
                    entry.span().start,
                    "columns are date-shifted but no [[csv]] entry declares a `patient` column",
                ));
            }
        }
        let mut json = Vec::new();
        for entry in &raw.json {
            json.push(self.json(entry, patient)?);
        }
        let fhir = match &raw.fhir {
            None => None,
            Some(f) => Some(self.fhir(f, age_cap.is_some())?),
        };
        if let (Some(at), None) = (self.first_shift, patient) {
            return Err(self.err(
                at,
                "date_shift needs a patient linkage: add [patient] with the patient-id transform",
            ));
        }
        Ok(Policy {
            origin: self.loc.origin.to_owned(),
            name: raw.name.unwrap_or_else(|| self.loc.origin.to_owned()),
            domain: raw.domain.into_inner(),
            unknown_fields: raw.unknown_fields,
            specs: self.specs,
            patient,
            age_cap,
            csv,
            json,
            fhir,
        })
    }

    fn is_shift_value(&self, v: &Value) -> bool {
        match v {
            Value::String(s) => self
                .names
                .get(s)
                .is_some_and(|&id| matches!(self.specs[id].transform, Transform::DateShift { .. })),
            Value::Table(t) => {
                t.get("kind").and_then(Value::as_str) == Some("date_shift")
                    || ["otherwise"]
                        .iter()
                        .filter_map(|k| t.get(*k))
                        .any(|v| self.is_shift_value(v))
                    || t.get("when")
                        .and_then(Value::as_array)
                        .is_some_and(|conds| {
                            conds
                                .iter()
                                .filter_map(|c| c.get("use"))
                                .any(|v| self.is_shift_value(v))
                        })
            }
            _ => false,
        }
    }

    /// A transform table: `kind` and its parameters, plus `key` and `format`.
    fn spec(&mut self, table: &toml::Table, at: usize) -> Result<usize, PolicyError> {
        let mut rest = table.clone();
        let key = match rest.remove("key") {
            None => None,
            Some(Value::String(k)) if !k.trim().is_empty() => Some(k),
            Some(_) => return Err(self.err(at, "`key` must be a non-empty string")),
        };
        let uuid = match rest.remove("format") {
            None => false,
            Some(Value::String(f)) if f == "token" => false,
            Some(Value::String(f)) if f == "uuid" => true,
            Some(_) => return Err(self.err(at, "`format` must be \"token\" or \"uuid\"")),
        };
        let zero_pad = match rest.remove("zero_pad") {
            None => 0,
            Some(Value::Integer(n)) if (1..=16).contains(&n) => n as usize,
            Some(_) => return Err(self.err(at, "`zero_pad` must be a length from 1 to 16")),
        };
        if !rest.contains_key("kind") {
            return Err(self.err(at, "a transform table needs `kind`"));
        }
        let transform: Transform =
            Value::Table(rest)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    self.err(at, format!("invalid transform: {}", e.message().trim_end()))
                })?;
        if uuid && !matches!(transform, Transform::Pseudonym { .. }) {
            return Err(self.err(at, "`format = \"uuid\"` is only for pseudonyms"));
        }
        if zero_pad > 0 && !matches!(transform, Transform::Zip3 { .. }) {
            return Err(self.err(at, "`zero_pad` is only for zip3"));
        }
        FieldTransformer::new(&self.probe, "policy-check", &transform)
            .map_err(|e| self.err(at, format!("invalid {} parameters: {e}", transform.kind())))?;
        if let Transform::DateShift { max_days } = transform {
            match self.max_days {
                None => self.max_days = Some((max_days, at)),
                Some((n, _)) if n == max_days => {}
                Some((n, first)) => {
                    let line = self.loc.at(first, "").line;
                    return Err(self.err(
                        at,
                        format!(
                            "every date_shift of a domain must use one max_days ({n} on line {line}); offsets for different ranges are unrelated"
                        ),
                    ));
                }
            }
        }
        self.specs.push(Spec {
            transform,
            key,
            uuid,
            zero_pad,
        });
        Ok(self.specs.len() - 1)
    }

    /// A rule value: `"keep"`, a transform name, a bare kind, or an inline table.
    fn action(&mut self, value: &Value, at: usize) -> Result<Action, PolicyError> {
        let action = match value {
            Value::String(s) if s == "keep" => Action::Keep,
            Value::String(s) => match self.names.get(s) {
                Some(&id) => Action::Apply(id),
                None if KINDS.contains(&s.as_str()) => {
                    let mut t = toml::Table::new();
                    t.insert("kind".to_owned(), Value::String(s.clone()));
                    Action::Apply(self.spec(&t, at)?)
                }
                None => {
                    return Err(self.err(
                        at,
                        format!("unknown transform `{s}`: not \"keep\", a transform kind, or a name under [transforms]"),
                    ))
                }
            },
            Value::Table(t) => Action::Apply(self.spec(t, at)?),
            _ => {
                return Err(self.err(
                    at,
                    "a rule is \"keep\", a transform name or kind, or a table with `kind`",
                ))
            }
        };
        if let Action::Apply(id) = action {
            if matches!(self.specs[id].transform, Transform::DateShift { .. }) {
                self.first_shift.get_or_insert(at);
            }
        }
        Ok(action)
    }

    fn patient(&mut self, name: &Spanned<String>) -> Result<usize, PolicyError> {
        let at = name.span().start;
        let Some(&id) = self.names.get(name.get_ref()) else {
            return Err(self.err(
                at,
                format!(
                    "[patient] transform `{}` is not defined under [transforms]",
                    name.get_ref()
                ),
            ));
        };
        let spec = &self.specs[id];
        if !matches!(spec.transform, Transform::Pseudonym { .. }) {
            return Err(self.err(at, "the [patient] transform must be a pseudonym"));
        }
        if spec.key.is_none() {
            return Err(self.err(
                at,
                "the [patient] transform needs an explicit `key`, so every file derives the same pseudonym",
            ));
        }
        Ok(id)
    }

    /// `age_cap` and `reference_date` of `[patient]`.
    fn age_limit(&self, p: &RawPatient) -> Result<Option<AgeLimit>, PolicyError> {
        let Some(cap) = &p.age_cap else {
            if let Some(r) = &p.reference_date {
                return Err(self.err(r.span().start, "`reference_date` needs `age_cap`"));
            }
            return Ok(None);
        };
        let at = cap.span().start;
        let cap = match u32::try_from(*cap.get_ref()) {
            Ok(n) if (1..=89).contains(&n) => n,
            _ => {
                return Err(self.err(
                    at,
                    "`age_cap` must be from 1 to 89 (Safe Harbor aggregates ages over 89)",
                ))
            }
        };
        let reference = match &p.reference_date {
            None => None,
            Some(r) => Some(Date::parse(r.get_ref()).ok_or_else(|| {
                self.err(
                    r.span().start,
                    "`reference_date` must be a date, YYYY-MM-DD",
                )
            })?),
        };
        Ok(Some(AgeLimit { cap, reference }))
    }

    /// A `birth_date` / `death_date` column: needs `age_cap` and a rule in the entry.
    fn age_column(
        &self,
        column: &Option<Spanned<String>>,
        columns: &[(String, ColumnRule)],
        age_cap: bool,
    ) -> Result<Option<String>, PolicyError> {
        let Some(c) = column else { return Ok(None) };
        let at = c.span().start;
        if !age_cap {
            return Err(self.err(
                at,
                "birth and death columns are read for [patient] age_cap, which is not set",
            ));
        }
        if !columns
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(c.get_ref()))
        {
            return Err(self.err(
                at,
                format!(
                    "column `{}` must have a rule in this entry's [csv.columns]",
                    c.get_ref()
                ),
            ));
        }
        Ok(Some(c.get_ref().clone()))
    }

    fn globs(&self, files: &Spanned<Vec<String>>) -> Result<Vec<Glob>, PolicyError> {
        if files.get_ref().is_empty() {
            return Err(self.err(files.span().start, "`files` must list at least one pattern"));
        }
        files
            .get_ref()
            .iter()
            .map(|p| {
                Glob::new(p).ok_or_else(|| {
                    self.err(
                        files.span().start,
                        format!("file pattern `{p}` must be a non-empty file name"),
                    )
                })
            })
            .collect()
    }

    fn csv(
        &mut self,
        entry: &Spanned<RawCsv>,
        patient: Option<usize>,
        age_cap: bool,
    ) -> Result<CsvRule, PolicyError> {
        let raw = entry.get_ref();
        let files = self.globs(&raw.files)?;
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut columns = Vec::new();
        for (name, value) in &raw.columns {
            let at = value.span().start;
            if let Some(prev) = seen.insert(name.to_lowercase(), at) {
                let line = self.loc.at(prev, "").line;
                return Err(self.err(at, format!("column `{name}` is listed twice (headers match case-insensitively; first on line {line})")));
            }
            let rule = match value.get_ref() {
                Value::Table(t) if t.contains_key("when") || t.contains_key("otherwise") => {
                    self.conditional(t, at)?
                }
                v => ColumnRule::Simple(self.action(v, at)?),
            };
            columns.push((name.clone(), rule));
        }
        let patient_cols = match &raw.patient {
            None => Vec::new(),
            Some(p) => {
                let at = p.span().start;
                let cols = match p.get_ref() {
                    OneOrMany::One(s) => vec![s.clone()],
                    OneOrMany::Many(v) => v.clone(),
                };
                if cols.is_empty() || cols.iter().any(|c| c.is_empty()) {
                    return Err(self.err(at, "`patient` names one column or a list of columns"));
                }
                let Some(pid) = patient else {
                    return Err(self.err(at, "a `patient` column needs a [patient] section"));
                };
                for col in &cols {
                    let own = columns.iter().find(|(n, _)| n.eq_ignore_ascii_case(col));
                    if let Some((_, rule)) = own {
                        if !matches!(rule, ColumnRule::Simple(Action::Apply(id)) if *id == pid) {
                            return Err(self.err(
                                at,
                                format!("patient column `{col}` must use the [patient] transform"),
                            ));
                        }
                    }
                }
                cols
            }
        };
        let birth_date = self.age_column(&raw.birth_date, &columns, age_cap)?;
        let death_date = self.age_column(&raw.death_date, &columns, age_cap)?;
        if let (None, Some(d)) = (&birth_date, &raw.death_date) {
            return Err(self.err(d.span().start, "`death_date` needs `birth_date`"));
        }
        Ok(CsvRule {
            files,
            patient: patient_cols,
            columns,
            birth_date,
            death_date,
        })
    }

    fn conditional(&mut self, t: &toml::Table, at: usize) -> Result<ColumnRule, PolicyError> {
        if let Some(k) = t.keys().find(|k| *k != "when" && *k != "otherwise") {
            return Err(self.err(
                at,
                format!("unknown key `{k}` in a conditional rule (`when`, `otherwise`)"),
            ));
        }
        let Some(otherwise) = t.get("otherwise") else {
            return Err(self.err(at, "a conditional rule needs `otherwise`"));
        };
        let otherwise = self.no_drop(otherwise, at)?;
        let mut conds = Vec::new();
        let Some(Value::Array(items)) = t.get("when") else {
            return Err(self.err(at, "`when` must be an array of { column, in, use } tables"));
        };
        for item in items {
            let Value::Table(c) = item else {
                return Err(self.err(at, "`when` must be an array of { column, in, use } tables"));
            };
            if let Some(k) = c
                .keys()
                .find(|k| !["column", "in", "use"].contains(&k.as_str()))
            {
                return Err(self.err(
                    at,
                    format!("unknown key `{k}` in a condition (`column`, `in`, `use`)"),
                ));
            }
            let column = c
                .get("column")
                .and_then(Value::as_str)
                .ok_or_else(|| self.err(at, "a condition needs `column`"))?;
            let values = c
                .get("in")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .map(|v| v.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| self.err(at, "a condition needs `in`, a list of strings"))?;
            let then = c
                .get("use")
                .ok_or_else(|| self.err(at, "a condition needs `use`"))?;
            let then = self.no_drop(then, at)?;
            conds.push(Cond {
                column: column.to_owned(),
                values,
                then,
            });
        }
        Ok(ColumnRule::When { conds, otherwise })
    }

    /// A conditional branch: dropping would change the row's shape, so it is refused.
    fn no_drop(&mut self, value: &Value, at: usize) -> Result<Action, PolicyError> {
        let action = self.action(value, at)?;
        if let Action::Apply(id) = action {
            if matches!(self.specs[id].transform, Transform::Drop { .. }) {
                return Err(self.err(at, "a conditional rule cannot drop (the column would vanish from some rows); use redact"));
            }
        }
        Ok(action)
    }

    fn json(
        &mut self,
        entry: &Spanned<RawJson>,
        patient: Option<usize>,
    ) -> Result<JsonRule, PolicyError> {
        let raw = entry.get_ref();
        let files = self.globs(&raw.files)?;
        let mut fields = Vec::new();
        for (pointer, value) in &raw.fields {
            let at = value.span().start;
            let segs = parse_pointer(pointer).ok_or_else(|| {
                self.err(at, format!("`{pointer}` is not a JSON pointer (\"/a/b\", `~0` `~1` escapes, `*` for any segment)"))
            })?;
            let action = self.action(value.get_ref(), at)?;
            fields.push((pointer.clone(), segs, action));
        }
        let patient_ptr = match &raw.patient {
            None => None,
            Some(p) => {
                let at = p.span().start;
                let Some(pid) = patient else {
                    return Err(self.err(at, "a `patient` pointer needs a [patient] section"));
                };
                let segs = parse_pointer(p.get_ref())
                    .filter(|s| !s.is_empty() && !s.contains(&PointerSeg::Any))
                    .ok_or_else(|| self.err(at, "`patient` must be a JSON pointer without `*`"))?;
                let keys = segs
                    .into_iter()
                    .map(|s| match s {
                        PointerSeg::Key(k) => k,
                        PointerSeg::Any => String::new(),
                    })
                    .collect();
                match fields.iter().find(|(ptr, _, _)| ptr == p.get_ref()) {
                    Some((_, _, Action::Apply(id))) if *id == pid => {}
                    _ => {
                        return Err(self.err(at, format!("the patient field `{}` must be listed in [json.fields] with the [patient] transform", p.get_ref())))
                    }
                }
                Some((p.get_ref().clone(), keys))
            }
        };
        let shifts = fields
            .iter()
            .any(|(_, _, a)| matches!(a, Action::Apply(id) if matches!(self.specs[*id].transform, Transform::DateShift { .. })));
        if shifts && patient_ptr.is_none() {
            return Err(self.err(
                entry.span().start,
                "fields are date-shifted but the entry declares no `patient` pointer",
            ));
        }
        Ok(JsonRule {
            files,
            patient: patient_ptr,
            fields,
        })
    }

    fn fhir(&mut self, raw: &Spanned<RawFhir>, age_cap: bool) -> Result<FhirPolicy, PolicyError> {
        let raw = raw.get_ref();
        let files = match &raw.files {
            Some(f) => self.globs(f)?,
            None => ["*.json", "*.ndjson"]
                .iter()
                .filter_map(|p| Glob::new(p))
                .collect(),
        };
        let at = raw.ids.span().start;
        let ids = match self.names.get(raw.ids.get_ref()) {
            Some(&id) => id,
            None => {
                return Err(self.err(
                    at,
                    format!(
                        "`ids` transform `{}` is not defined under [transforms]",
                        raw.ids.get_ref()
                    ),
                ))
            }
        };
        if !matches!(self.specs[ids].transform, Transform::Pseudonym { .. })
            || !self.specs[ids].uuid
        {
            return Err(self.err(at, "the `ids` transform must be a pseudonym with format = \"uuid\" (FHIR ids allow [A-Za-z0-9-.] only)"));
        }
        if self.specs[ids].key.is_none() {
            return Err(self.err(
                at,
                "the `ids` transform needs an explicit `key`: ids and references must map alike",
            ));
        }
        let patient_references = raw.patient_references.clone().unwrap_or_else(|| {
            ["subject", "patient", "beneficiary"]
                .map(str::to_owned)
                .to_vec()
        });
        let mut elements = Vec::new();
        for (path, value) in &raw.elements {
            let at = value.span().start;
            let (rtype, segs) = parse_path(path)
                .map_err(|why| self.err(at, format!("element path `{path}`: {why}")))?;
            let action = self.action(value.get_ref(), at)?;
            elements.push((path.clone(), rtype, segs, action));
        }
        let mut extensions = Vec::new();
        for (url, value) in &raw.extensions {
            let at = value.span().start;
            if url.is_empty() {
                return Err(self.err(at, "an extension rule needs its URL"));
            }
            extensions.push((url.clone(), self.action(value.get_ref(), at)?));
        }
        let keep_names = match &raw.keep_names {
            Some(k) => self.globs(k)?,
            None => Vec::new(),
        };
        let age_extensions = match &raw.age_extensions {
            None => Vec::new(),
            Some(urls) if !age_cap => {
                return Err(self.err(
                    urls.span().start,
                    "`age_extensions` are dropped for [patient] age_cap, which is not set",
                ))
            }
            Some(urls) => urls.get_ref().clone(),
        };
        Ok(FhirPolicy {
            age_extensions,
            files,
            ids,
            patient_references,
            file_names: raw.file_names,
            keep_names,
            elements,
            extensions,
        })
    }
}

/// `/a/b~1c/*` → segments; `""` (the whole document) → no segments.
pub(crate) fn parse_pointer(pointer: &str) -> Option<Vec<PointerSeg>> {
    if pointer.is_empty() {
        return Some(Vec::new());
    }
    let rest = pointer.strip_prefix('/')?;
    rest.split('/')
        .map(|seg| {
            if seg == "*" {
                return Some(PointerSeg::Any);
            }
            let mut out = String::with_capacity(seg.len());
            let mut chars = seg.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return None,
                    }
                } else {
                    out.push(c);
                }
            }
            Some(PointerSeg::Key(out))
        })
        .collect()
}

/// `Patient.name.given`, `*.meta`, `Observation.value[x]` → (type, segments).
pub(crate) fn parse_path(path: &str) -> Result<(String, Vec<PathSeg>), &'static str> {
    let mut parts = path.split('.');
    let rtype = parts.next().unwrap_or_default();
    let type_ok = rtype == "*"
        || (rtype.starts_with(|c: char| c.is_ascii_uppercase())
            && rtype.chars().all(|c| c.is_ascii_alphanumeric()));
    if !type_ok {
        return Err("must start with a resource type (`Patient`) or `*`");
    }
    let mut segs = Vec::new();
    for part in parts {
        let (name, choice) = match part.strip_suffix("[x]") {
            Some(n) => (n, true),
            None => (part, false),
        };
        let ok = name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(
                "segments are element names (letters, digits, `_`), optionally ending in `[x]`",
            );
        }
        segs.push(if choice {
            PathSeg::Choice(name.to_owned())
        } else {
            PathSeg::Name(name.to_owned())
        });
    }
    match segs.as_slice() {
        [] => Err("names no element"),
        [PathSeg::Name(n)] if n == "id" || n == "resourceType" => {
            Err("resource ids and types are handled by the engine (see `ids`)")
        }
        [PathSeg::Name(n), ..] if rtype == "Bundle" && n == "entry" => {
            Err("bundle entries are handled by the engine")
        }
        [.., PathSeg::Name(n)] if n == "reference" || n == "extension" || n == "modifierExtension" => {
            Err("references are rewritten by the engine and extensions matched by URL ([fhir.extensions])")
        }
        _ => Ok((rtype.to_owned(), segs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> PolicyError {
        Policy::from_toml(src, "test.toml").unwrap_err()
    }

    const HEAD: &str = "domain = \"d\"\nunknown_fields = \"error\"\n";

    #[test]
    fn syntax_errors_name_line_and_column() {
        let e = err("domain = \"d\"\nunknown_fields = \"error\"\n[[csv]\n");
        assert_eq!(e.line, 3, "{e}");
        let e = err("domain = \"d\"\nunknown_fields = \"sometimes\"\n");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("unknown variant"), "{e}");
        let e = err(&format!("{HEAD}colour = 1\n"));
        assert_eq!(e.line, 3, "{e}");
        assert!(e.to_string().starts_with("test.toml:3:"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_rule() {
        let e = err(&format!(
            "{HEAD}[[csv]]\nfiles = [\"*\"]\n[csv.columns]\nA = \"keep\"\nB = \"shred\"\n"
        ));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("unknown transform `shred`"), "{e}");
        let e = err(&format!("{HEAD}[[csv]]\nfiles = [\"*\"]\n[csv.columns]\nB = {{ kind = \"fpe\", alphabet = \"digits\", max_len = 4 }}\n"));
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("fpe"), "{e}");
        let e = err(&format!("{HEAD}[[csv]]\nfiles = [\"*\"]\n[csv.columns]\nD = {{ kind = \"date_shift\", max_days = 30 }}\n"));
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("patient"), "{e}");
        let e = err(&format!(
            "{HEAD}[[csv]]\nfiles = [\"*\"]\n[csv.columns]\nA = \"keep\"\na = \"drop\"\n"
        ));
        assert_eq!(e.line, 7, "{e}");
        let e = err(&format!(
            "{HEAD}[transforms]\nx = {{ kind = \"tokenise\" }}\n"
        ));
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("unknown variant `tokenise`"), "{e}");
    }

    #[test]
    fn date_shift_in_fhir_needs_a_patient() {
        let e = err(&format!(
            "{HEAD}[transforms]\nid = {{ kind = \"pseudonym\", key = \"id\", format = \"uuid\" }}\n[fhir]\nids = \"id\"\n[fhir.elements]\n\"Patient.birthDate\" = {{ kind = \"date_shift\", max_days = 10 }}\n"
        ));
        assert_eq!(e.line, 8, "{e}");
    }

    #[test]
    fn paths_and_pointers() {
        assert!(parse_path("Patient.name.given").is_ok());
        assert!(parse_path("*.meta").is_ok());
        assert_eq!(
            parse_path("Observation.value[x]").unwrap().1,
            vec![PathSeg::Choice("value".into())]
        );
        assert!(parse_path("patient.name").is_err());
        assert!(parse_path("Patient").is_err());
        assert!(parse_path("Patient.id").is_err());
        assert!(parse_path("Encounter.subject.reference").is_err());
        assert_eq!(
            parse_pointer("/a~1b/*/c~0").unwrap(),
            vec![
                PointerSeg::Key("a/b".into()),
                PointerSeg::Any,
                PointerSeg::Key("c~".into())
            ]
        );
        assert!(parse_pointer("a/b").is_none());
        assert!(parse_pointer("/a~2").is_none());
    }

    #[test]
    fn builtin_profiles_are_valid() {
        for name in BUILTIN_PROFILES {
            let source = builtin_source(name).unwrap();
            if let Err(e) = Policy::from_toml(source, name) {
                panic!("{e}");
            }
        }
    }
}
