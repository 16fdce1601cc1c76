//! Pure de-identification transforms for ePHI: no I/O, no network, used by the server and the SDK.
//!
//! - [`DomainKey`]: a versioned 32-byte domain key; per-field, per-transform keys are derived from
//!   it with HKDF-SHA256 ([`keys`]), so pseudonyms of two domains cannot be linked and no key
//!   serves two algorithms.
//! - [`Transform`]: the description of one transform with its parameters (deserialized from the
//!   later policy file), and [`FieldTransformer`]: the transform prepared for one field, with its
//!   keys derived once, so that the hot path does no HKDF.
//! - The transforms themselves: keyed pseudonyms ([`pseudonym`], HMAC-SHA256 over a normalized
//!   value, [`normalize`]), deterministic encryption ([`siv`], AES-SIV), format-preserving
//!   encryption ([`ff1`], NIST SP 800-38G FF1), per-patient date shifting ([`date_shift`]), HIPAA
//!   Safe Harbor generalization ([`generalize`]) and masking / redaction ([`mask`]).
//!
//! Errors never carry input values or key material.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod date_shift;
mod error;
pub mod ff1;
pub mod generalize;
pub mod keys;
pub mod mask;
pub mod normalize;
pub mod pseudonym;
pub mod siv;
mod token;
mod transform;
pub mod vault;

pub use error::TokenizeError;
pub use keys::DomainKey;
pub use normalize::Normalization;
pub use token::token_key_version;
pub use transform::{Alphabet, Context, FieldTransformer, Outcome, Transform, Transformed};

/// Result type of this crate.
pub type Result<T, E = TokenizeError> = std::result::Result<T, E>;
