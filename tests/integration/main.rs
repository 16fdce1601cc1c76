//! The integration test binary: real SoftHSM2 token, real SQLite file and PostgreSQL database,
//! real gRPC over loopback. One module per area.

#![allow(missing_docs)]

mod support;

mod cli;
mod crypto;
mod hsm;
mod keys;
mod limits;
mod restart;
mod sdk_envelope;
mod wycheproof;
