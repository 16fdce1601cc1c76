//! Keyed pseudonyms: HMAC-SHA256 over the normalized value, truncated to 128 bits and written
//! as `v<key version>.<22 base64url characters>`. Irreversible; equal normalized values in one
//! domain give equal pseudonyms (joinable across files), other domains give unrelated ones.
//!
//! 128 bits keep collisions negligible (birthday bound 2^64 values) at 25 characters a token.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::keys::{DomainKey, Purpose};
use crate::normalize::Normalization;
use crate::token;
use crate::Result;

/// Bytes of the HMAC output kept in a pseudonym.
pub const PSEUDONYM_BYTES: usize = 16;

/// HMAC-SHA256 with the key already absorbed (inner and outer pads hashed once).
type PreparedMac = Hmac<Sha256>;

/// The pseudonym transform of one field: derived key prepared once.
#[derive(Clone)]
pub struct Pseudonymizer {
    mac: PreparedMac,
    version: u32,
    /// `v<version>.`
    prefix: String,
    normalization: Normalization,
}

impl Pseudonymizer {
    /// Derives the field's HMAC key from the domain key.
    pub fn new(domain_key: &DomainKey, field: &str, normalization: Normalization) -> Self {
        let key = domain_key.derive::<32>(field, Purpose::Pseudonym);
        Self {
            mac: prepare(key.as_slice()),
            version: domain_key.version(),
            prefix: token::prefix(domain_key.version()),
            normalization,
        }
    }

    /// Writes the pseudonym of `value` into `out` (cleared first; used as scratch space for
    /// the normalized value, so a reused buffer means no allocation).
    pub fn pseudonymize_into(&self, value: &str, out: &mut String) -> Result<()> {
        self.normalization.normalize_into(value, out)?;
        let tag = mac(&self.mac, out.as_bytes());
        out.clear();
        out.push_str(&self.prefix);
        token::push_payload(out, &tag[..PSEUDONYM_BYTES]);
        Ok(())
    }

    /// The pseudonym of `value`.
    pub fn pseudonymize(&self, value: &str) -> Result<String> {
        let mut out = String::with_capacity(32);
        self.pseudonymize_into(value, &mut out)?;
        Ok(out)
    }
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonymizer")
            .field("version", &self.version)
            .field("normalization", &self.normalization)
            .finish_non_exhaustive()
    }
}

/// HMAC-SHA256 of `msg` under `key`: the code path of every pseudonym and date offset, exposed
/// for the known-answer tests.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    mac(&prepare(key), msg)
}

pub(crate) fn prepare(key: &[u8]) -> PreparedMac {
    // HMAC takes keys of any length (RFC 2104: longer keys are hashed first).
    #[allow(clippy::expect_used)]
    PreparedMac::new_from_slice(key).expect("HMAC accepts every key length")
}

pub(crate) fn mac(prepared: &PreparedMac, msg: &[u8]) -> [u8; 32] {
    let mut mac = prepared.clone();
    mac.update(msg);
    mac.finalize().into_bytes().into()
}
