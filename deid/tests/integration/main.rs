//! Integration tests of the de-identification engine on the Synthea sample data (one binary,
//! a module per area).

mod common;
mod csv_export;
mod fhir_export;
mod malformed;
