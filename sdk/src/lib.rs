//! Client SDK of the key management service.
//!
//! - [`KmsClient`]: a typed async client of the gRPC API, over mutual TLS only
//!   ([`ClientTls`]: the CA, the client certificate and its key).
//! - [`envelope`]: the message format: framed AES-256-GCM under a data key, with a header that
//!   carries the wrapped data key, the encryption context and a key commitment.
//! - [`Envelope`]: envelope encryption of byte slices, streams and files, with a
//!   [`DataKeyCache`] so that many small records do not cost one KMS call each.
//!
//! The encryption context is stored and logged in clear: never put PHI in it.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cache;
mod client;
pub mod envelope;
mod error;
mod files;
mod tls;

pub use cache::{CachePolicy, DataKeyCache};
pub use client::{
    Context, DataKey, Disclosure, DomainKeys, GrantSpec, KeyInfo, KeyPage, KmsClient, NewKey,
    Opened, ReEncryptItem, Sealed, VersionInfo,
};

/// The API's messages for identity, grants, approvals, break-glass and audit, as returned by
/// the governance calls of [`KmsClient`].
pub mod governance {
    pub use proto::v1::{
        Approval, BreakGlassWindow, Grant, ListAuditRecordsRequest, ListAuditRecordsResponse,
        OpenBreakGlassResponse, Quorum, RoleBinding, VerifyAuditResponse, WhoAmIResponse,
    };
}
/// The API's messages for tokenization domains.
pub mod domains {
    pub use proto::v1::{Domain, TokenResult, TokenizeResponse};
}
/// The de-identification transforms the SDK runs locally (the server runs the same ones).
pub use tokenize;
/// The API's messages for recovery ceremonies, backups and share sessions.
pub mod recovery {
    pub use proto::v1::{
        CustodianKey, RecoveryRejection, RecoverySession, RecoveryShareStatus, RecoveryStatus,
        SealedShare, SubmitShareRequest, VerifyRecoveryBackupResponse,
    };
}
pub use error::Error;
pub use files::{Envelope, FileSummary, Rewrapped};
pub use tls::{ClientIdentity, ClientTls};
/// gRPC status codes, as carried by [`Error::Rpc`].
pub use tonic::Code;
