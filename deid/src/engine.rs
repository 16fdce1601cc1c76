//! The engine: a policy prepared with a domain key, and a run over an input file or directory.
//!
//! A run finds the input files (recursively, hidden names skipped, sorted), chooses each one's
//! rules by name and extension (`.csv` → `[[csv]]`; `.json` / `.ndjson` / `.jsonl` → `[[json]]`
//! if one matches, else `[fhir]`), checks every output name before any work, then
//! - streams each CSV and NDJSON file through the pipeline ([`crate::pipeline`]), using every
//!   worker thread on one file at a time;
//! - processes whole-document JSON files (FHIR bundles) in parallel, one file per worker, each
//!   read whole up to `max_document_bytes`;
//! - commits all outputs together ([`crate::output`]) and writes the report next to them.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokenize::DomainKey;

use crate::age::{AgeCap, Date};
use crate::csvfmt::{Chunk, CsvReader, LineReader, CHUNK_RECORDS};
use crate::error::RejectReason;
use crate::fhir::{FhirRules, Node};
use crate::glob::Glob;
use crate::json::{self, Fail, Json, PointerNode, RecordCx};
use crate::ops::{Applier, OpKind, Ops, PatientState};
use crate::output::{StagedFile, Staging};
use crate::pipeline::{self, ChunkOut, Processor};
use crate::policy::{AgeLimit, ColumnRule, FileNames, Policy};
use crate::report::{schema_name, FieldStats, FileReport, Progress, Reject, Report, Warning};
use crate::table::{self, CsvEntry, CsvProcessor, PreparedRule};
use crate::{DeidError, UnknownFields};

/// What to do with a malformed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnMalformed {
    /// Stop the run with [`DeidError::Malformed`]; nothing is written.
    Stop,
    /// Skip the record: its original bytes go to a file of the same relative name under `dir`
    /// (which must lie outside the output directory: rejects are not de-identified), and the
    /// report lists it by file, line and reason.
    Reject {
        /// Where reject files are written.
        dir: PathBuf,
    },
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Malformed records: stop or reject.
    pub on_malformed: OnMalformed,
    /// Worker threads (default: the available parallelism).
    pub threads: Option<NonZeroUsize>,
    /// Largest whole-document JSON file (a FHIR bundle), in bytes.
    pub max_document_bytes: u64,
    /// Longest CSV record or NDJSON line, in bytes.
    pub max_record_bytes: usize,
    /// Replace existing output files.
    pub overwrite: bool,
    /// The report's file name in the output directory.
    pub report_name: String,
    /// The run's date, at which ages are computed for `[patient] age_cap` when the policy
    /// gives no `reference_date` (default: today in UTC, by the system clock).
    pub today: Option<Date>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            on_malformed: OnMalformed::Stop,
            threads: None,
            max_document_bytes: 256 << 20,
            max_record_bytes: 16 << 20,
            overwrite: false,
            report_name: "deid-report.json".to_owned(),
            today: None,
        }
    }
}

#[derive(Debug)]
struct JsonEntry {
    files: Vec<Glob>,
    patient: Option<Vec<String>>,
    root: PointerNode,
}

#[derive(Debug)]
struct FhirEntry {
    files: Vec<Glob>,
    rules: FhirRules,
    file_namer: Option<Arc<Applier>>,
    keep_names: Vec<Glob>,
}

/// A policy prepared with its domain key: every field key derived once.
#[derive(Debug)]
pub struct Engine {
    policy: String,
    domain: String,
    key_version: u32,
    unknown_fields: UnknownFields,
    age_cap: Option<AgeLimit>,
    ops: Ops,
    csv: Vec<CsvEntry>,
    json: Vec<JsonEntry>,
    fhir: Option<FhirEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Csv,
    JsonLines(usize),
    JsonDocument(usize),
    FhirLines,
    FhirDocument,
}

impl Kind {
    fn format(self) -> &'static str {
        match self {
            Kind::Csv => "csv",
            Kind::JsonLines(_) => "ndjson",
            Kind::JsonDocument(_) => "json",
            Kind::FhirLines => "fhir-ndjson",
            Kind::FhirDocument => "fhir-bundle",
        }
    }

    fn is_document(self) -> bool {
        matches!(self, Kind::JsonDocument(_) | Kind::FhirDocument)
    }
}

#[derive(Debug)]
struct Job {
    input: PathBuf,
    out_rel: PathBuf,
    kind: Kind,
}

/// What one file produced.
#[derive(Debug)]
struct FileResult {
    report: FileReport,
    rejects: Vec<Reject>,
    warnings: Vec<Warning>,
    bytes_out: u64,
}

/// State shared by everything in one run.
struct Run<'a> {
    options: &'a Options,
    out_dir: &'a Path,
    staging: &'a Staging,
    threads: usize,
    progress: &'a (dyn Fn(Progress) + Sync),
    records: AtomicU64,
    bytes: AtomicU64,
    total: u64,
    age: Option<AgeCap>,
}

impl Run<'_> {
    fn advance(&self, records: u64, bytes: u64) {
        let r = self.records.fetch_add(records, Ordering::Relaxed) + records;
        let b = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        (self.progress)(Progress {
            records: r,
            bytes: b,
            total_bytes: self.total,
        });
    }

    fn reject_path(&self, job: &Job, input_root: &Path) -> Option<PathBuf> {
        let OnMalformed::Reject { dir } = &self.options.on_malformed else {
            return None;
        };
        let rel = job.input.strip_prefix(input_root).unwrap_or(&job.input);
        let rel = if rel.as_os_str().is_empty() {
            Path::new(job.input.file_name().unwrap_or_default())
        } else {
            rel
        };
        Some(dir.join(rel))
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DeidError + 'a {
    move |source| DeidError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

impl Engine {
    /// Prepares `policy` with the domain's key; fails if the key is for another domain or a
    /// transform cannot be prepared.
    pub fn new(policy: &Policy, key: &DomainKey) -> Result<Self, DeidError> {
        if key.domain() != policy.domain() {
            return Err(DeidError::DomainMismatch {
                policy: policy.domain().to_owned(),
                key: key.domain().to_owned(),
            });
        }
        let mut ops = Ops::new(policy, key)?;
        let mut csv = Vec::new();
        for entry in &policy.csv {
            let mut columns = Vec::new();
            for (name, rule) in &entry.columns {
                let prepared = match rule {
                    ColumnRule::Simple(a) => PreparedRule::Simple(ops.op(policy, key, *a, name)?),
                    ColumnRule::When { conds, otherwise } => {
                        let mut prepared = Vec::new();
                        for c in conds {
                            prepared.push((
                                c.column.to_lowercase(),
                                c.values.clone(),
                                ops.op(policy, key, c.then, name)?,
                            ));
                        }
                        PreparedRule::When {
                            conds: prepared,
                            otherwise: ops.op(policy, key, *otherwise, name)?,
                        }
                    }
                };
                columns.push((name.to_lowercase(), prepared));
            }
            csv.push(CsvEntry {
                files: entry.files.clone(),
                patient: entry.patient.iter().map(|p| p.to_lowercase()).collect(),
                columns,
                birth_date: entry.birth_date.as_ref().map(|c| c.to_lowercase()),
                death_date: entry.death_date.as_ref().map(|c| c.to_lowercase()),
            });
        }
        let mut json = Vec::new();
        for entry in &policy.json {
            let mut root = PointerNode::default();
            for (pointer, segs, action) in &entry.fields {
                root.insert(segs, ops.op(policy, key, *action, pointer)?);
            }
            json.push(JsonEntry {
                files: entry.files.clone(),
                patient: entry.patient.as_ref().map(|(_, keys)| keys.clone()),
                root,
            });
        }
        let fhir = match &policy.fhir {
            None => None,
            Some(f) => {
                let mut types: HashMap<String, Node> = HashMap::new();
                let mut star = Node::default();
                for (path, rtype, segs, action) in &f.elements {
                    let op = ops.op(policy, key, *action, path)?;
                    if rtype == "*" {
                        star.insert(segs, op);
                    } else {
                        types.entry(rtype.clone()).or_default().insert(segs, op);
                    }
                }
                let mut extensions = HashMap::new();
                for (url, action) in &f.extensions {
                    extensions.insert(url.clone(), ops.op(policy, key, *action, url)?);
                }
                let ids = match ops
                    .op(policy, key, crate::policy::Action::Apply(f.ids), "id")?
                    .kind
                {
                    OpKind::Apply(a) => a,
                    // Unreachable: the policy checks that `ids` names a pseudonym.
                    _ => {
                        return Err(DeidError::Transform {
                            field: "id".to_owned(),
                            source: tokenize::TokenizeError::InvalidParameter {
                                parameter: "ids",
                                reason: "must be a pseudonym",
                            },
                        })
                    }
                };
                let file_namer = match f.file_names {
                    FileNames::Keep => None,
                    FileNames::Pseudonymize => Some(ops.file_namer(key)?),
                };
                Some(FhirEntry {
                    files: f.files.clone(),
                    rules: FhirRules {
                        types,
                        star,
                        extensions,
                        ids,
                        patient_references: f.patient_references.clone(),
                        reference_label: Arc::from("reference"),
                        id_label: Arc::from("id"),
                        birth_date_label: Arc::from("Patient.birthDate"),
                        age_extensions: f
                            .age_extensions
                            .iter()
                            .map(|u| Arc::from(u.as_str()))
                            .collect(),
                    },
                    file_namer,
                    keep_names: f.keep_names.clone(),
                })
            }
        };
        Ok(Self {
            policy: policy.name().to_owned(),
            domain: policy.domain().to_owned(),
            key_version: key.version(),
            unknown_fields: policy.unknown_fields(),
            age_cap: policy.age_cap,
            ops,
            csv,
            json,
            fhir,
        })
    }

    /// De-identifies `input` (a file or a directory, recursively) into `out_dir` and writes
    /// the report there. `progress` is called from worker threads as records are processed.
    pub fn run(
        &self,
        input: &Path,
        out_dir: &Path,
        options: &Options,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Report, DeidError> {
        let meta = std::fs::metadata(input).map_err(io("read", input))?;
        let input_root = if meta.is_dir() {
            input.to_owned()
        } else {
            input.parent().unwrap_or(Path::new("")).to_owned()
        };
        let files = if meta.is_dir() {
            let mut files = Vec::new();
            discover(input, &mut files)?;
            files.sort();
            files
        } else {
            vec![input.to_owned()]
        };
        if files.is_empty() {
            return Err(DeidError::NoInputs {
                path: input.to_owned(),
            });
        }
        std::fs::create_dir_all(out_dir).map_err(io("create directory", out_dir))?;
        let out_canon = out_dir.canonicalize().map_err(io("read", out_dir))?;
        if meta.is_dir() {
            let in_canon = input.canonicalize().map_err(io("read", input))?;
            if out_canon.starts_with(&in_canon) {
                return Err(DeidError::Layout {
                    what: "the output directory must not be inside the input directory",
                });
            }
        }
        if let OnMalformed::Reject { dir } = &options.on_malformed {
            std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
            let rej = dir.canonicalize().map_err(io("read", dir))?;
            if rej.starts_with(&out_canon) || out_canon.starts_with(&rej) {
                return Err(DeidError::Layout { what: "the rejects directory must lie outside the output directory (rejects are not de-identified)" });
            }
            if meta.is_dir() && rej.starts_with(input.canonicalize().map_err(io("read", input))?) {
                return Err(DeidError::Layout {
                    what: "the rejects directory must not be inside the input directory",
                });
            }
        }

        // Classify every file and fix its output name before any work.
        let mut jobs = Vec::new();
        let mut skipped = Vec::new();
        let mut seen: HashMap<PathBuf, ()> = HashMap::new();
        seen.insert(PathBuf::from(&options.report_name), ());
        for file in files {
            let Some((kind, out_rel)) = self.classify(&file, &input_root)? else {
                match self.unknown_fields {
                    UnknownFields::Error => return Err(DeidError::UnmatchedFile { file }),
                    UnknownFields::Warn => {
                        skipped.push(file);
                        continue;
                    }
                }
            };
            if seen.insert(out_rel.clone(), ()).is_some() {
                return Err(DeidError::OutputConflict {
                    path: out_dir.join(out_rel),
                });
            }
            let dest = out_dir.join(&out_rel);
            if let (Ok(a), Ok(b)) = (dest.canonicalize(), file.canonicalize()) {
                if a == b {
                    return Err(DeidError::Layout {
                        what: "an output would replace its input file",
                    });
                }
            }
            if !options.overwrite && dest.exists() {
                return Err(DeidError::OutputExists { path: dest });
            }
            jobs.push(Job {
                input: file,
                out_rel,
                kind,
            });
        }
        let report_path = out_dir.join(&options.report_name);
        if !options.overwrite && report_path.exists() {
            return Err(DeidError::OutputExists { path: report_path });
        }
        let total = jobs
            .iter()
            .filter_map(|j| std::fs::metadata(&j.input).ok())
            .map(|m| m.len())
            .sum();

        let staging = Staging::default();
        let run = Run {
            options,
            out_dir,
            staging: &staging,
            threads: options
                .threads
                .or_else(|| std::thread::available_parallelism().ok())
                .map_or(1, NonZeroUsize::get),
            progress,
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            total,
            // The policy's reference date, else the run's: one date for the whole run.
            age: self.age_cap.map(|a| AgeCap {
                cap: a.cap,
                at: a.reference.or(options.today).unwrap_or_else(Date::today),
            }),
        };
        let mut results: Vec<Option<FileResult>> = (0..jobs.len()).map(|_| None).collect();
        for (i, job) in jobs.iter().enumerate() {
            if !job.kind.is_document() {
                results[i] = Some(self.stream_file(job, &input_root, &run)?);
            }
        }
        let documents: Vec<usize> = (0..jobs.len())
            .filter(|&i| jobs[i].kind.is_document())
            .collect();
        for (i, r) in self.documents(&jobs, &documents, &input_root, &run)? {
            results[i] = Some(r);
        }

        let mut report = Report {
            policy: self.policy.clone(),
            domain: self.domain.clone(),
            key_version: self.key_version,
            records: 0,
            rejected: 0,
            bytes_in: 0,
            bytes_out: 0,
            transforms: Default::default(),
            files: Vec::new(),
            rejects: Vec::new(),
            warnings: Vec::new(),
            skipped_files: skipped.len() as u64,
            skipped,
        };
        for r in results.into_iter().flatten() {
            report.records += r.report.records;
            report.rejected += r.report.rejected;
            report.bytes_in += r.report.bytes_in;
            report.bytes_out += r.bytes_out;
            for (kind, n) in r.report.fields.values().flatten() {
                *report.transforms.entry(kind.clone()).or_insert(0) += n;
            }
            report.files.push(r.report);
            report.rejects.extend(r.rejects);
            report.warnings.extend(r.warnings);
        }
        let mut staged = staging.create(&report_path)?;
        let mut text = serde_json::to_vec_pretty(&report).map_err(|e| DeidError::Io {
            op: "write",
            path: report_path.clone(),
            source: e.into(),
        })?;
        text.push(b'\n');
        staged.write_all(&text)?;
        staged.finish()?;
        staging.commit()?;
        Ok(report)
    }

    /// The kind and output name of a file, or `None` if no rule matches it.
    fn classify(&self, file: &Path, root: &Path) -> Result<Option<(Kind, PathBuf)>, DeidError> {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lower = name.to_lowercase();
        let rel = file.strip_prefix(root).unwrap_or(file);
        let rel = if rel.as_os_str().is_empty() {
            Path::new(&name)
        } else {
            rel
        };
        let matches = |globs: &[Glob]| globs.iter().any(|g| g.matches(&name));
        let lines = lower.ends_with(".ndjson") || lower.ends_with(".jsonl");
        let kind = if lower.ends_with(".csv") {
            self.csv
                .iter()
                .any(|e| matches(&e.files))
                .then_some(Kind::Csv)
        } else if lines || lower.ends_with(".json") {
            match self.json.iter().position(|e| matches(&e.files)) {
                Some(i) if lines => Some(Kind::JsonLines(i)),
                Some(i) => Some(Kind::JsonDocument(i)),
                None => match &self.fhir {
                    Some(f) if matches(&f.files) => Some(if lines {
                        Kind::FhirLines
                    } else {
                        Kind::FhirDocument
                    }),
                    _ => None,
                },
            }
        } else {
            None
        };
        let Some(kind) = kind else { return Ok(None) };
        let mut out_rel = rel.to_owned();
        if let (Kind::FhirLines | Kind::FhirDocument, Some(f)) = (kind, &self.fhir) {
            let kept = f.keep_names.iter().any(|g| g.matches(&name));
            if let (Some(namer), false) = (&f.file_namer, kept) {
                let ext = Path::new(&name)
                    .extension()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut pseudonym = String::new();
                namer
                    .apply(&name, &mut pseudonym)
                    .map_err(|source| DeidError::Transform {
                        field: "file name".to_owned(),
                        source,
                    })?;
                out_rel.set_file_name(format!("{pseudonym}.{ext}"));
            }
        }
        Ok(Some((kind, out_rel)))
    }

    /// A CSV or NDJSON file through the pipeline.
    fn stream_file(
        &self,
        job: &Job,
        input_root: &Path,
        run: &Run<'_>,
    ) -> Result<FileResult, DeidError> {
        let file = File::open(&job.input).map_err(io("read", &job.input))?;
        let bytes_in = file.metadata().map(|m| m.len()).unwrap_or(0);
        let out_name = job.out_rel.to_string_lossy().into_owned();
        let mut result = FileResult {
            report: FileReport {
                file: out_name.clone(),
                input: job.input.clone(),
                format: job.kind.format(),
                records: 0,
                rejected: 0,
                bytes_in,
                fields: Default::default(),
            },
            rejects: Vec::new(),
            warnings: Vec::new(),
            bytes_out: 0,
        };
        let dest = run.out_dir.join(&job.out_rel);
        let mut rejects = RejectSink::new(run.staging, run.reject_path(job, input_root));
        let mut stats = FieldStats::default();
        let mut unknown: HashMap<String, u64> = HashMap::new();
        let max = run.options.max_record_bytes;
        let out = match job.kind {
            Kind::Csv => {
                let mut reader = CsvReader::new(file, max);
                let header = reader.next_chunk(1).map_err(io("read", &job.input))?;
                let Some(record) = header.records.first() else {
                    // An empty file stays empty.
                    result.bytes_out = run.staging.create(&dest)?.finish()?;
                    return Ok(result);
                };
                run.advance(0, header.data.len() as u64);
                let names = match table::header_names(&header, record) {
                    Ok(names) => names,
                    // A broken header makes the whole file unreadable.
                    Err(reason) => {
                        return self.malformed_document(job, input_root, run, result, reason)
                    }
                };
                let plan = table::plan(
                    &self.csv,
                    &self.ops,
                    self.unknown_fields,
                    &job.input,
                    &names,
                )?;
                for (i, col) in plan.cols.iter().enumerate() {
                    if col.unknown {
                        unknown.insert(names[i].clone(), 0);
                    }
                }
                let mut out = run.staging.create(&dest)?;
                out.write_all(&plan.out_header)?;
                rejects.header = Some(header.data[record.raw.clone()].to_vec());
                let processor = CsvProcessor {
                    ops: &self.ops,
                    plan: &plan,
                    age: run.age,
                };
                let read = || -> Result<Chunk, DeidError> {
                    let chunk = reader
                        .next_chunk(CHUNK_RECORDS)
                        .map_err(io("read", &job.input))?;
                    run.advance(chunk.records.len() as u64, chunk.data.len() as u64);
                    Ok(chunk)
                };
                pipeline::run(run.threads, &processor, read, |chunk, o: ChunkOut| {
                    self.write_chunk(
                        job,
                        chunk,
                        o,
                        &mut out,
                        &mut rejects,
                        &mut stats,
                        &mut unknown,
                        &mut result,
                    )
                })?;
                out
            }
            _ => {
                let mut reader = LineReader::new(file, max);
                let mut out = run.staging.create(&dest)?;
                let processor = LineProcessor {
                    engine: self,
                    kind: job.kind,
                    age: run.age,
                };
                let read = || -> Result<Chunk, DeidError> {
                    let chunk = reader
                        .next_chunk(CHUNK_RECORDS)
                        .map_err(io("read", &job.input))?;
                    run.advance(chunk.records.len() as u64, chunk.data.len() as u64);
                    Ok(chunk)
                };
                pipeline::run(run.threads, &processor, read, |chunk, o: ChunkOut| {
                    self.write_chunk(
                        job,
                        chunk,
                        o,
                        &mut out,
                        &mut rejects,
                        &mut stats,
                        &mut unknown,
                        &mut result,
                    )
                })?;
                out
            }
        };
        result.bytes_out = out.finish()?;
        rejects.finish()?;
        result.report.fields = stats.into_fields();
        result.warnings = warnings(&out_name, unknown);
        Ok(result)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_chunk(
        &self,
        job: &Job,
        chunk: &Chunk,
        o: ChunkOut,
        out: &mut StagedFile,
        rejects: &mut RejectSink<'_>,
        stats: &mut FieldStats,
        unknown: &mut HashMap<String, u64>,
        result: &mut FileResult,
    ) -> Result<(), DeidError> {
        let first_reject = o.rejects.first().map(|r| r.0);
        if let Some((line, field)) = o.fatal {
            if first_reject.is_none_or(|r| line < r) || rejects.path.is_some() {
                return Err(DeidError::UnknownField {
                    file: job.input.clone(),
                    line,
                    field: schema_name(&field),
                });
            }
        }
        for (line, reason, raw) in o.rejects {
            if rejects.path.is_none() {
                return Err(DeidError::Malformed {
                    file: job.input.clone(),
                    line,
                    reason,
                });
            }
            rejects.write(&chunk.data[raw])?;
            result.report.rejected += 1;
            result.rejects.push(Reject {
                file: result.report.file.clone(),
                input: job.input.clone(),
                line,
                reason: reason.to_string(),
            });
        }
        out.write_all(&o.bytes)?;
        result.report.records += o.records;
        stats.merge(o.stats);
        for (k, n) in o.unknown {
            *unknown.entry(k).or_insert(0) += n;
        }
        Ok(())
    }

    /// In reject mode, a file whose header (or whole document) is malformed is rejected whole.
    fn reject_whole_file(
        &self,
        job: &Job,
        input_root: &Path,
        run: &Run<'_>,
        mut result: FileResult,
        reason: RejectReason,
    ) -> Result<FileResult, DeidError> {
        let Some(path) = run.reject_path(job, input_root) else {
            return Err(DeidError::Malformed {
                file: job.input.clone(),
                line: 1,
                reason,
            });
        };
        let mut bytes = Vec::new();
        File::open(&job.input)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io("read", &job.input))?;
        let mut staged = run.staging.create_private(&path)?;
        staged.write_all(&bytes)?;
        staged.finish()?;
        let line = match &reason {
            RejectReason::InvalidJson { line, .. } => *line,
            _ => 1,
        };
        result.report.rejected = 1;
        result.rejects.push(Reject {
            file: result.report.file.clone(),
            input: job.input.clone(),
            line,
            reason: reason.to_string(),
        });
        Ok(result)
    }

    /// Whole-document files in parallel, one per worker.
    fn documents(
        &self,
        jobs: &[Job],
        which: &[usize],
        input_root: &Path,
        run: &Run<'_>,
    ) -> Result<Vec<(usize, FileResult)>, DeidError> {
        if which.is_empty() {
            return Ok(Vec::new());
        }
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<(usize, Result<FileResult, DeidError>)>> = Mutex::new(Vec::new());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let panicked = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..run.threads.min(which.len()))
                .map(|_| {
                    scope.spawn(|| loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= which.len() || failed.load(Ordering::Relaxed) {
                            return;
                        }
                        let i = which[n];
                        let r = self.document(&jobs[i], input_root, run);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        if let Ok(mut all) = results.lock() {
                            all.push((i, r));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().is_err())
                .fold(false, |a, b| a | b)
        });
        if panicked {
            return Err(DeidError::WorkerPanicked);
        }
        let mut all = results
            .into_inner()
            .map_err(|_| DeidError::WorkerPanicked)?;
        // Report the first failing file in input order.
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(i, r)| r.map(|r| (i, r))).collect()
    }

    fn document(
        &self,
        job: &Job,
        input_root: &Path,
        run: &Run<'_>,
    ) -> Result<FileResult, DeidError> {
        let limit = run.options.max_document_bytes;
        let file = File::open(&job.input).map_err(io("read", &job.input))?;
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io("read", &job.input))?;
        let out_name = job.out_rel.to_string_lossy().into_owned();
        let mut result = FileResult {
            report: FileReport {
                file: out_name.clone(),
                input: job.input.clone(),
                format: job.kind.format(),
                records: 0,
                rejected: 0,
                bytes_in: bytes.len() as u64,
                fields: Default::default(),
            },
            rejects: Vec::new(),
            warnings: Vec::new(),
            bytes_out: 0,
        };
        if bytes.len() as u64 > limit {
            if run.reject_path(job, input_root).is_none() {
                return Err(DeidError::TooLarge {
                    file: job.input.clone(),
                    limit,
                });
            }
            return self.reject_whole_file(
                job,
                input_root,
                run,
                result,
                RejectReason::RecordTooLong {
                    limit: usize::try_from(limit).unwrap_or(usize::MAX),
                },
            );
        }
        run.advance(1, bytes.len() as u64);
        let mut value = match json::parse(&bytes) {
            Ok(v) => v,
            Err(reason) => return self.malformed_document(job, input_root, run, result, reason),
        };
        let mut stats = FieldStats::default();
        let mut unknown = HashMap::new();
        let outcome = {
            let mut cx = RecordCx {
                ops: &self.ops,
                patient: PatientState::default(),
                stats: &mut stats,
                unknown: &mut unknown,
                mode: self.unknown_fields,
                entry: None,
                scratch: String::new(),
                age: run.age,
            };
            self.record(job.kind, &mut value, &mut cx)
        };
        match outcome {
            Ok(()) => {}
            Err(Fail::Unknown(field)) => {
                return Err(DeidError::UnknownField {
                    file: job.input.clone(),
                    line: 1,
                    field: schema_name(&field),
                })
            }
            Err(Fail::Reject(reason)) => {
                return self.malformed_document(job, input_root, run, result, reason)
            }
        }
        let mut text = Vec::with_capacity(bytes.len());
        json::write(&mut text, &value);
        text.push(b'\n');
        let mut out = run.staging.create(&run.out_dir.join(&job.out_rel))?;
        out.write_all(&text)?;
        result.bytes_out = out.finish()?;
        result.report.records = 1;
        result.report.fields = stats.into_fields();
        result.warnings = warnings(&out_name, unknown);
        Ok(result)
    }

    fn malformed_document(
        &self,
        job: &Job,
        input_root: &Path,
        run: &Run<'_>,
        result: FileResult,
        reason: RejectReason,
    ) -> Result<FileResult, DeidError> {
        if run.reject_path(job, input_root).is_none() {
            let line = match &reason {
                RejectReason::InvalidJson { line, .. } => *line,
                _ => 1,
            };
            return Err(DeidError::Malformed {
                file: job.input.clone(),
                line,
                reason,
            });
        }
        self.reject_whole_file(job, input_root, run, result, reason)
    }

    /// One JSON record (an NDJSON line or a whole document) under its rules.
    fn record(&self, kind: Kind, value: &mut Json, cx: &mut RecordCx<'_>) -> Result<(), Fail> {
        match kind {
            Kind::FhirLines | Kind::FhirDocument => {
                let Some(f) = &self.fhir else { return Ok(()) };
                if kind == Kind::FhirLines {
                    f.rules.line(value, cx)
                } else {
                    f.rules.document(value, cx)
                }
            }
            Kind::JsonLines(i) | Kind::JsonDocument(i) => {
                let entry = &self.json[i];
                let token = match (&entry.patient, self.ops.patient()) {
                    (Some(keys), Some(p)) => json::lookup(value, keys)
                        .and_then(Json::scalar_text)
                        .filter(|t| !t.is_empty())
                        .and_then(|id| {
                            let mut t = String::new();
                            p.token(&id, &mut t).ok().map(|()| t)
                        }),
                    _ => None,
                };
                cx.patient = PatientState::new(token);
                let root = &entry.root;
                json::walk_pointer(value, Some(root), root.op(), "", cx).map(|_| ())
            }
            Kind::Csv => Ok(()),
        }
    }
}

fn warnings(file: &str, unknown: HashMap<String, u64>) -> Vec<Warning> {
    let mut merged: HashMap<String, u64> = HashMap::new();
    for (field, n) in unknown {
        *merged.entry(schema_name(&field)).or_insert(0) += n;
    }
    let mut w: Vec<Warning> = merged
        .into_iter()
        .map(|(field, occurrences)| Warning {
            file: file.to_owned(),
            field,
            occurrences,
        })
        .collect();
    w.sort_by(|a, b| a.field.cmp(&b.field));
    w
}

fn discover(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DeidError> {
    for entry in std::fs::read_dir(dir).map_err(io("read", dir))? {
        let entry = entry.map_err(io("read", dir))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(io("read", &path))?;
        if kind.is_dir() {
            discover(&path, out)?;
        } else if kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Reject records of one file, written lazily (no file when nothing is rejected); a CSV
/// reject file starts with the original header.
struct RejectSink<'a> {
    staging: &'a Staging,
    path: Option<PathBuf>,
    header: Option<Vec<u8>>,
    file: Option<StagedFile>,
}

impl<'a> RejectSink<'a> {
    fn new(staging: &'a Staging, path: Option<PathBuf>) -> Self {
        Self {
            staging,
            path,
            header: None,
            file: None,
        }
    }

    fn write(&mut self, raw: &[u8]) -> Result<(), DeidError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let mut f = self.staging.create_private(path)?;
                if let Some(header) = &self.header {
                    f.write_all(header)?;
                }
                self.file.insert(f)
            }
        };
        file.write_all(raw)?;
        if !raw.ends_with(b"\n") {
            file.write_all(b"\n")?;
        }
        Ok(())
    }

    fn finish(self) -> Result<(), DeidError> {
        if let Some(f) = self.file {
            f.finish()?;
        }
        Ok(())
    }
}

struct LineProcessor<'a> {
    engine: &'a Engine,
    kind: Kind,
    age: Option<AgeCap>,
}

impl Processor for LineProcessor<'_> {
    type State = ();
    type Output = ChunkOut;

    fn state(&self) {}

    fn process(&self, chunk: &Chunk, _: &mut ()) -> ChunkOut {
        let mut out = ChunkOut::new(chunk.data.len() + chunk.data.len() / 4);
        for rec in &chunk.records {
            if let Some(fault) = &rec.fault {
                out.rejects.push((rec.line, fault.clone(), rec.raw.clone()));
                continue;
            }
            let mut value = match json::parse(&chunk.data[rec.raw.clone()]) {
                Ok(v) => v,
                Err(reason) => {
                    out.rejects.push((rec.line, reason, rec.raw.clone()));
                    continue;
                }
            };
            let mut cx = RecordCx {
                ops: &self.engine.ops,
                patient: PatientState::default(),
                stats: &mut out.stats,
                unknown: &mut out.unknown,
                mode: self.engine.unknown_fields,
                entry: None,
                scratch: String::new(),
                age: self.age,
            };
            match self.engine.record(self.kind, &mut value, &mut cx) {
                Ok(()) => {
                    json::write(&mut out.bytes, &value);
                    out.bytes.push(b'\n');
                    out.records += 1;
                }
                Err(Fail::Reject(reason)) => out.rejects.push((rec.line, reason, rec.raw.clone())),
                Err(Fail::Unknown(field)) => {
                    out.fatal = Some((rec.line, field));
                    break;
                }
            }
        }
        out
    }
}
