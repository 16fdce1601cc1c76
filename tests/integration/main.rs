//! The integration test binary: real SoftHSM2 token, real SQLite file and PostgreSQL database,
//! real gRPC over loopback. One module per area.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests state their expectations with expect()

mod support;

mod audit;
mod audited;
mod authz;
mod cli;
mod crypto;
mod governance_cli;
mod hsm;
mod keys;
mod keywrap;
mod lifecycle;
mod limits;
mod recovery;
mod recovery_cli;
mod replicas;
mod restart;
mod rewrap;
mod rotation;
mod sdk_envelope;
mod tls;
mod tokenization;
mod wycheproof;
