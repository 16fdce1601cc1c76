//! The crate's errors. None carries a field value: file names, line numbers, column and element
//! names, policy positions and fixed reasons only.

use std::fmt;
use std::path::PathBuf;

use tokenize::TokenizeError;

/// A policy file that cannot be read as a policy: TOML syntax, an unknown key, a bad transform,
/// or a rule that contradicts another. Names the place in the policy text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}:{column}: {message}")]
pub struct PolicyError {
    /// Where the policy came from (its path, or `builtin:<name>`).
    pub origin: String,
    /// 1-based line of the offending text (0 when the error has no position).
    pub line: usize,
    /// 1-based column (in characters) of the offending text.
    pub column: usize,
    /// What is wrong. Policy text only, never data.
    pub message: String,
}

/// Everything a de-identification run can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeidError {
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A file could not be read, written, synced or renamed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`, `create`, `rename`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed record, with `on_malformed = stop`.
    #[error("{}:{line}: malformed record: {reason}", file.display())]
    Malformed {
        /// The input file.
        file: PathBuf,
        /// 1-based line where the record starts (for a bundle, where the error is, if known).
        line: u64,
        /// Why.
        reason: RejectReason,
    },
    /// A field the policy does not mention, with `unknown_fields = "error"`.
    #[error("{}:{line}: field `{field}` is not covered by the policy (unknown_fields = \"error\")", file.display())]
    UnknownField {
        /// The input file.
        file: PathBuf,
        /// 1-based line (the header for CSV).
        line: u64,
        /// The column name or element path (never its value).
        field: String,
    },
    /// An input file that no rule of the policy matches, with `unknown_fields = "error"`.
    #[error("{}: no rule of the policy matches this file (unknown_fields = \"error\")", file.display())]
    UnmatchedFile {
        /// The input file.
        file: PathBuf,
    },
    /// A CSV file with dates to shift but without the column that names the patient.
    #[error("{}: the file has columns to date-shift but none of the patient columns {columns}", file.display())]
    MissingPatientColumn {
        /// The input file.
        file: PathBuf,
        /// The patient columns the policy declares for it.
        columns: String,
    },
    /// A CSV header that names one column twice (compared case-insensitively).
    #[error("{}: column `{column}` appears twice in the header", file.display())]
    DuplicateColumn {
        /// The input file.
        file: PathBuf,
        /// The column.
        column: String,
    },
    /// The patient column of a CSV file, or the patient pointer of a JSON rule, is transformed
    /// with something other than the policy's patient transform, so pseudonyms would not join.
    #[error("{}: patient field `{field}` must use the [patient] transform", file.display())]
    PatientFieldMismatch {
        /// The input file.
        file: PathBuf,
        /// The column or pointer.
        field: String,
    },
    /// A whole-document JSON file (a FHIR bundle) larger than the configured limit.
    #[error("{}: larger than the limit of {limit} bytes for one JSON document", file.display())]
    TooLarge {
        /// The input file.
        file: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// The domain key is not the policy's domain.
    #[error("the domain key is for domain `{key}`, the policy for `{policy}`")]
    DomainMismatch {
        /// The policy's domain.
        policy: String,
        /// The key's domain.
        key: String,
    },
    /// A transform could not be prepared with the domain key.
    #[error("transform for `{field}`: {source}")]
    Transform {
        /// The field it was prepared for.
        field: String,
        /// Why.
        #[source]
        source: TokenizeError,
    },
    /// An output file exists already and overwriting was not asked for.
    #[error("{} exists already (pass overwrite to replace it)", path.display())]
    OutputExists {
        /// The output file.
        path: PathBuf,
    },
    /// Two inputs would be written to one output file.
    #[error("two input files map to the output {}", path.display())]
    OutputConflict {
        /// The output file.
        path: PathBuf,
    },
    /// The output directory lies inside the input directory (a second run would read its own
    /// output), or the rejects directory lies inside the output directory (rejects hold the
    /// original, identifying records).
    #[error("{what}")]
    Layout {
        /// Which rule is broken.
        what: &'static str,
    },
    /// The input holds no file to process.
    #[error("{}: no input files", path.display())]
    NoInputs {
        /// The input path.
        path: PathBuf,
    },
    /// A worker thread panicked (a bug); nothing was committed.
    #[error("a worker thread panicked; nothing was written")]
    WorkerPanicked,
}

/// Why a record was rejected. Never includes a value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// A quote inside a field that does not start with one.
    QuoteInUnquotedField,
    /// Text after the closing quote of a quoted field.
    TextAfterClosingQuote,
    /// A quoted field that is never closed.
    UnterminatedQuote,
    /// A carriage return that does not end a line.
    BareCarriageReturn,
    /// A record with another number of fields than the header.
    FieldCount {
        /// Fields in the header.
        expected: usize,
        /// Fields in the record.
        found: usize,
    },
    /// A field that is not UTF-8.
    InvalidUtf8 {
        /// 1-based position of the field in the record.
        field: usize,
    },
    /// A record longer than the limit.
    RecordTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// Text that is not JSON.
    InvalidJson {
        /// `syntax`, `eof`, `io` or `data` (serde_json's categories).
        category: &'static str,
        /// 1-based line within the record.
        line: u64,
        /// 1-based column within that line.
        column: u64,
    },
    /// JSON that does not have the shape the policy expects (not a Bundle, an entry without a
    /// resource, …).
    Shape {
        /// What is wrong.
        what: &'static str,
        /// The 0-based bundle entry, when it is about one.
        entry: Option<usize>,
    },
    /// A value the transform cannot take (an invalid date, a ZIP code that is not one, a
    /// symbol outside an FF1 alphabet, a date without a patient to shift it for, …).
    Transform {
        /// The column or element path.
        field: String,
        /// The bundle entry, when it is about one.
        entry: Option<usize>,
        /// The transform's error (which carries no value).
        error: TokenizeError,
    },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::QuoteInUnquotedField => f.write_str("quote inside an unquoted field"),
            RejectReason::TextAfterClosingQuote => {
                f.write_str("text after the closing quote of a field")
            }
            RejectReason::UnterminatedQuote => f.write_str("quoted field is never closed"),
            RejectReason::BareCarriageReturn => {
                f.write_str("carriage return that does not end a line")
            }
            RejectReason::FieldCount { expected, found } => {
                write!(f, "record has {found} fields, the header {expected}")
            }
            RejectReason::InvalidUtf8 { field } => write!(f, "field {field} is not UTF-8"),
            RejectReason::RecordTooLong { limit } => {
                write!(f, "record is longer than {limit} bytes")
            }
            RejectReason::InvalidJson {
                category,
                line,
                column,
            } => write!(f, "invalid JSON ({category} error at {line}:{column})"),
            RejectReason::Shape { what, entry } => match entry {
                Some(entry) => write!(f, "entry {entry}: {what}"),
                None => f.write_str(what),
            },
            RejectReason::Transform {
                field,
                entry,
                error,
            } => match entry {
                Some(entry) => write!(f, "entry {entry}: {field}: {error}"),
                None => write!(f, "{field}: {error}"),
            },
        }
    }
}
