//! De-identification of research data sets: the engine behind `kms-cli deid`.
//!
//! A [`Policy`] (a TOML file, or a built-in HIPAA Safe Harbor profile, [`BUILTIN_PROFILES`])
//! says, per CSV column, JSON pointer or FHIR R4 element, which `tokenize` transform applies;
//! `keep` is the only pass-through, and a field the policy does not mention is an error or is
//! dropped and reported ([`UnknownFields`]) — never passed on. An [`Engine`] is a policy
//! prepared with the domain's [`tokenize::DomainKey`] (fetched from the KMS by the caller);
//! [`Engine::run`] streams an input file or directory into an output directory and returns a
//! [`Report`] (also written there as JSON).
//!
//! ```no_run
//! # fn main() -> Result<(), deid::DeidError> {
//! # let key = tokenize::DomainKey::new("research", 1, zeroize::Zeroizing::new([0u8; 32]));
//! let policy = deid::Policy::load("hipaa-safe-harbor-synthea-csv")?;
//! let engine = deid::Engine::new(&policy, &key)?;
//! let report = engine.run(
//!     "synthea/csv".as_ref(),
//!     "out".as_ref(),
//!     &deid::Options::default(),
//!     &|p: deid::Progress| eprint!("\r{} records", p.records),
//! )?;
//! println!("{} records, {} rejected", report.records, report.rejected);
//! # Ok(()) }
//! ```
//!
//! Guarantees: the same patient gets the same pseudonym in every file (the `[patient]`
//! transform has one key for all files) and every date of a patient moves by that patient's
//! offset, except the birth date of a patient over the policy's `age_cap`, which is removed
//! (HIPAA Safe Harbor's "90 or older"); ids that other records point to map alike everywhere,
//! so joins and FHIR references still resolve; errors and the report never hold a field
//! value; nothing is half-written.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod age;
mod csvfmt;
mod engine;
mod error;
mod fhir;
mod glob;
mod json;
mod ops;
mod output;
mod pipeline;
mod policy;
mod report;
mod table;

pub use age::Date;
pub use engine::{Engine, OnMalformed, Options};
pub use error::{DeidError, PolicyError, RejectReason};
pub use policy::{FileNames, Policy, UnknownFields, BUILTIN_PROFILES};
pub use report::{FileReport, Progress, Reject, Report, Warning};
