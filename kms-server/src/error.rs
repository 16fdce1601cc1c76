//! The one error type of the server's domain, and what each variant means to a caller.
//!
//! The mapping to gRPC status codes lives in exactly one place, [`crate::grpc::to_status`].
//! Variants carry no key bytes, no context values and no driver messages: whatever a variant
//! holds may reach a log line.

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// No key has this id or alias.
    #[error("key not found")]
    KeyNotFound,
    /// The alias is taken by another key.
    #[error("alias already exists")]
    AliasExists,
    /// A request field is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Which request field.
        field: &'static str,
        /// What is wrong with it (never the value itself).
        reason: &'static str,
    },
    /// A payload exceeds its size limit.
    #[error("{field} exceeds {max} bytes")]
    TooLarge {
        /// Which request field.
        field: &'static str,
        /// The limit, in bytes.
        max: usize,
    },
    /// The key was destroyed: its material is gone, only its metadata remains.
    #[error("key destroyed")]
    KeyDestroyed,
    /// The key exists but its state forbids the operation.
    #[error("key is {state}")]
    KeyNotUsable {
        /// The key's state, e.g. `disabled`.
        state: &'static str,
    },
    /// The blob was made under a key version below the key's `min_decryption_version`.
    /// Distinct from [`KmsError::InvalidCiphertext`] on purpose: the data is intact but its
    /// version was retired by policy (rewrap it, or lower the minimum again).
    #[error("key version retired")]
    KeyVersionRetired,
    /// The blob is malformed, truncated, tampered with, bound to another context, or belongs
    /// to another key. One variant for all of these, so that no caller can tell them apart.
    #[error("invalid ciphertext")]
    InvalidCiphertext,
    /// The HSM cannot be reached or keeps failing after retries.
    #[error("HSM unavailable")]
    HsmUnavailable,
    /// The database cannot be reached.
    #[error("store unavailable")]
    StoreUnavailable,
    /// The audit record of the request could not be written durably, so the request fails
    /// (fail closed: no record, no result).
    #[error("audit trail unavailable")]
    AuditUnavailable,
    /// The caller's identity, role, grant or break-glass window does not allow the request.
    #[error("permission denied: {reason}")]
    PermissionDenied {
        /// Which rule refused (never a secret).
        reason: &'static str,
    },
    /// An approval request, grant or binding does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: &'static str,
    },
    /// The request conflicts with the current state: an approval request that is no longer
    /// pending, a vote already cast, a separation-of-duties rule.
    #[error("{reason}")]
    Conflict {
        /// Why.
        reason: &'static str,
    },
    /// The recovery share session is held in the memory of another replica (share sessions
    /// are pinned to the replica that opened them): status, submissions and cancels must go
    /// to that replica, and no second session opens meanwhile.
    #[error("the recovery session is held by replica {replica}")]
    SessionElsewhere {
        /// The holder's instance name (configured by the operator; never a secret).
        replica: String,
    },
    /// A transform's parameters or a value do not suit the transform (FF1 domain rules, a
    /// character outside the alphabet, a malformed date). Positions and lengths, never values.
    #[error("{0}")]
    Transform(#[from] tokenize::TokenizeError),
    /// An invariant broke (for example metadata names an HSM object that is missing).
    #[error("internal error")]
    Internal {
        /// What broke, for the server log only.
        what: &'static str,
    },
}
