//! Domain keys and the derivation of per-field, per-transform keys.
//!
//! A *domain* is a set of data sets whose pseudonyms must be joinable (one research project, one
//! data recipient). Each domain has a 32-byte key with a version; every key a transform uses is
//! derived from it with HKDF-SHA256 (RFC 5869):
//!
//! ```text
//! PRK  = HKDF-Extract(salt = "kms-tokenize/v1", IKM = domain key)
//! key  = HKDF-Expand(PRK, info, L)
//! info = lp("kms-tokenize/v1") ‖ lp(domain) ‖ u32be(version) ‖ lp(field) ‖ lp(purpose)
//! lp(x) = u32be(len(x)) ‖ x
//! ```
//!
//! Every component is length-prefixed, so no two different (domain, field, purpose) triples
//! share an info string (`("ab", "c")` and `("a", "bc")` differ). The purpose names the
//! algorithm ([`Purpose`]), so an HMAC key is never an AES-SIV or FF1 key. Two domains give
//! unrelated keys even for equal domain key bytes, since the domain name is in the info.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// HKDF salt and first info component: names this derivation scheme.
const SCHEME: &[u8] = b"kms-tokenize/v1";

/// A domain's key: 32 secret bytes with the domain's name and the key's version.
///
/// Not `Clone`, not `Serialize`; its `Debug` prints the domain and version only. The bytes are
/// wiped on drop.
pub struct DomainKey {
    domain: String,
    version: u32,
    key: Zeroizing<[u8; 32]>,
}

/// What a derived key is for. Part of the HKDF info, so keys of different purposes are unrelated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// HMAC-SHA256 keyed pseudonyms (32 bytes).
    Pseudonym,
    /// AES-SIV-CMAC-256 deterministic encryption (64 bytes).
    DeterministicEncryption,
    /// FF1 over AES-256 (32 bytes).
    Ff1,
    /// HMAC-SHA256 key of the per-patient date offset (32 bytes; domain-wide, field "").
    DateShift,
    /// HMAC-SHA256 key of the token vault's lookup hashes (32 bytes).
    VaultLookup,
    /// AES-SIV-CMAC-256 key sealing the token vault's values (64 bytes).
    VaultValue,
}

impl Purpose {
    /// The label written into the HKDF info.
    pub fn label(self) -> &'static str {
        match self {
            Purpose::Pseudonym => "pseudonym/hmac-sha256",
            Purpose::DeterministicEncryption => "deterministic/aes-siv-cmac-256",
            Purpose::Ff1 => "fpe/ff1-aes-256",
            Purpose::DateShift => "date-shift/hmac-sha256",
            Purpose::VaultLookup => "vault-lookup/hmac-sha256",
            Purpose::VaultValue => "vault-value/aes-siv-cmac-256",
        }
    }
}

impl DomainKey {
    /// A domain key from its name, version and 32 key bytes (which come from the KMS).
    pub fn new(domain: impl Into<String>, version: u32, key: Zeroizing<[u8; 32]>) -> Self {
        Self {
            domain: domain.into(),
            version,
            key,
        }
    }

    /// The domain's name.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The key's version (carried by the tokens it makes).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The key bytes themselves: only to hand a domain key from the KMS to a caller granted
    /// local tokenization. Everything else derives from it instead.
    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.key
    }

    /// Derives the `N`-byte key for `field` and `purpose` (see the module documentation).
    pub fn derive<const N: usize>(&self, field: &str, purpose: Purpose) -> Zeroizing<[u8; N]> {
        let hk = Hkdf::<Sha256>::new(Some(SCHEME), self.key.as_slice());
        let info = derivation_info(&self.domain, self.version, field, purpose);
        let mut out = Zeroizing::new([0u8; N]);
        // HKDF-SHA256 can expand to 255 * 32 bytes; every N used here is at most 64.
        #[allow(clippy::expect_used)]
        hk.expand(&info, out.as_mut_slice())
            .expect("HKDF output length within 255 * 32 bytes");
        out
    }
}

impl std::fmt::Debug for DomainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainKey")
            .field("domain", &self.domain)
            .field("version", &self.version)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The HKDF info for a derived key: length-prefixed scheme, domain, field and purpose, and the
/// key version.
pub fn derivation_info(domain: &str, version: u32, field: &str, purpose: Purpose) -> Vec<u8> {
    let mut info = Vec::with_capacity(64 + domain.len() + field.len());
    push_lp(&mut info, SCHEME);
    push_lp(&mut info, domain.as_bytes());
    info.extend_from_slice(&version.to_be_bytes());
    push_lp(&mut info, field.as_bytes());
    push_lp(&mut info, purpose.label().as_bytes());
    info
}

/// Appends `u32be(len(bytes)) ‖ bytes`.
pub(crate) fn push_lp(out: &mut Vec<u8>, bytes: &[u8]) {
    // Domain and field names are configuration strings, far below 4 GiB.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(domain: &str) -> DomainKey {
        DomainKey::new(domain, 1, Zeroizing::new([7u8; 32]))
    }

    #[test]
    fn info_is_unambiguous() {
        let a = derivation_info("ab", 1, "c", Purpose::Pseudonym);
        let b = derivation_info("a", 1, "bc", Purpose::Pseudonym);
        assert_ne!(a, b);
    }

    #[test]
    fn purposes_fields_domains_and_versions_give_different_keys() {
        let k = key("d1");
        let hmac = k.derive::<32>("ssn", Purpose::Pseudonym);
        let siv = k.derive::<64>("ssn", Purpose::DeterministicEncryption);
        let ff1 = k.derive::<32>("ssn", Purpose::Ff1);
        let shift = k.derive::<32>("ssn", Purpose::DateShift);
        assert_ne!(hmac[..], siv[..32]);
        assert_ne!(hmac[..], siv[32..]);
        assert_ne!(hmac[..], ff1[..]);
        assert_ne!(ff1[..], siv[..32]);
        assert_ne!(ff1[..], siv[32..]);
        assert_ne!(shift[..], hmac[..]);
        assert_ne!(k.derive::<32>("mrn", Purpose::Pseudonym)[..], hmac[..]);
        assert_ne!(
            key("d2").derive::<32>("ssn", Purpose::Pseudonym)[..],
            hmac[..]
        );
        let v2 = DomainKey::new("d1", 2, Zeroizing::new([7u8; 32]));
        assert_ne!(v2.derive::<32>("ssn", Purpose::Pseudonym)[..], hmac[..]);
    }

    #[test]
    fn debug_hides_the_key() {
        let printed = format!("{:?}", key("d1"));
        assert!(printed.contains("redacted"));
        assert!(!printed.contains('7'));
    }
}
