//! The cryptography of the token vault (the storage is the server's): random tokens that no
//! key can derive, a keyed lookup hash so that one value keeps one token without the value
//! being stored in clear, and the value sealed with AES-SIV under a key of its own.
//!
//! - token: `vt.` ‖ base64url(16 random bytes), from the caller's CSPRNG;
//! - lookup: hex(HMAC-SHA256(K_lookup, value)), K_lookup derived for the field with
//!   [`Purpose::VaultLookup`];
//! - sealed value: AES-SIV-CMAC-256 under K_value ([`Purpose::VaultValue`]) with the same
//!   associated data as deterministic tokens (domain, field, key version), so a row moved to
//!   another field or domain does not open.

use crate::keys::{DomainKey, Purpose};
use crate::pseudonym::hmac_sha256;
use crate::siv::{aes_siv_open, aes_siv_seal, associated_data};
use crate::{Result, TokenizeError};

/// Random bytes in a vault token.
pub const TOKEN_BYTES: usize = 16;

/// The text of a vault token made from `random` bytes.
pub fn token(random: &[u8; TOKEN_BYTES]) -> String {
    let mut out = String::from("vt.");
    crate::token::push_payload(&mut out, random);
    out
}

/// Whether `text` has the shape of a vault token.
pub fn is_token(text: &str) -> bool {
    text.strip_prefix("vt.").is_some_and(|rest| {
        rest.len() == 22
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The lookup hash of `value` in `field` (hex).
pub fn lookup(key: &DomainKey, field: &str, value: &str) -> String {
    let k = key.derive::<32>(field, Purpose::VaultLookup);
    let mut hex = String::with_capacity(64);
    for b in hmac_sha256(&k[..], value.as_bytes()) {
        hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    hex
}

/// `value` sealed for `field` under the key's version.
pub fn seal(key: &DomainKey, field: &str, value: &str) -> Result<Vec<u8>> {
    let k = key.derive::<64>(field, Purpose::VaultValue);
    let ad = associated_data(key.domain(), field, key.version());
    aes_siv_seal(&k[..], &[&ad], value.as_bytes())
}

/// The value [`seal`] sealed; [`TokenizeError::DecryptFailed`] for anything else.
pub fn open(key: &DomainKey, field: &str, sealed: &[u8]) -> Result<String> {
    let k = key.derive::<64>(field, Purpose::VaultValue);
    let ad = associated_data(key.domain(), field, key.version());
    let plain = aes_siv_open(&k[..], &[&ad], sealed)?;
    String::from_utf8(plain).map_err(|_| TokenizeError::DecryptFailed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn key(domain: &str, version: u32) -> DomainKey {
        DomainKey::new(domain, version, Zeroizing::new([9u8; 32]))
    }

    #[test]
    fn tokens_have_their_shape() {
        let t = token(&[0xff; TOKEN_BYTES]);
        assert!(is_token(&t), "{t}");
        assert!(!is_token("vt.short"));
        assert!(!is_token("v1.AAAAAAAAAAAAAAAAAAAAAA"));
    }

    #[test]
    fn lookups_are_keyed_per_field_and_domain() {
        let a = lookup(&key("d", 1), "ssn", "999-41-2363");
        assert_eq!(a.len(), 64);
        assert_eq!(a, lookup(&key("d", 1), "ssn", "999-41-2363"));
        assert_ne!(a, lookup(&key("d", 1), "mrn", "999-41-2363"));
        assert_ne!(a, lookup(&key("e", 1), "ssn", "999-41-2363"));
        assert!(!a.contains("999"));
    }

    #[test]
    fn sealed_values_open_only_where_they_were_sealed() {
        let k = key("d", 1);
        let sealed = seal(&k, "ssn", "999-41-2363").expect("seal");
        assert_eq!(open(&k, "ssn", &sealed).expect("open"), "999-41-2363");
        assert_eq!(open(&k, "mrn", &sealed), Err(TokenizeError::DecryptFailed));
        assert_eq!(
            open(&key("d", 2), "ssn", &sealed),
            Err(TokenizeError::DecryptFailed)
        );
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(open(&k, "ssn", &flipped), Err(TokenizeError::DecryptFailed));
    }
}
