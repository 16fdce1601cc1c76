//! Integration tests of the de-identification engine on the Synthea sample data (one binary,
//! a module per area).

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests state their expectations with expect()

mod age_cap;
mod common;
mod csv_export;
mod fhir_export;
mod malformed;
mod policy_files;
mod throughput;
