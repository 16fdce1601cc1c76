//! The key management server: AES-256 master keys held in a PKCS#11 HSM, data keys wrapped
//! under them, metadata in SQLite or PostgreSQL, served over gRPC.
//!
//! Layers, outermost first: [`tls`] (mutual TLS, the caller's principal) → [`server`]
//! (listening, health, reflection) → [`grpc`] (the only
//! module that touches protobuf types; maps errors to status codes) → [`service`] (the domain
//! logic) → two ports, [`hsm`] and [`store`]. See `ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod blob;
pub mod config;
pub mod domains;
pub mod error;
pub mod grpc;
pub mod hsm;
pub mod recovery;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;

pub use error::KmsError;
