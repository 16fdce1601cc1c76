//! Deterministic encryption with AES-SIV (RFC 5297), AES-SIV-CMAC-256: a 64-byte key derived for
//! the field, and associated data binding the domain, the field and the key version, so a token
//! moved to another field or domain does not decrypt. Equal plaintexts give equal tokens
//! (joinable); the token is reversible with the key.
//!
//! Token: `v<key version>.` ‖ base64url(SIV tag ‖ ciphertext), no padding. Every decryption
//! failure is [`TokenizeError::DecryptFailed`].
//!
//! `seal_with!` and `open_with!` are the one AES-SIV code path: [`aes_siv_seal`] and
//! [`aes_siv_open`] (which the known-answer tests call with RFC 5297 and Wycheproof vectors) run
//! them on an instance made from the key; the transform runs them on an instance it keeps with
//! its key schedule done, and makes a fresh one only when another thread is using it.

use std::sync::Mutex;

use aes::{Aes128, Aes192, Aes256};
use aes_siv::siv::{Aes256Siv, CmacSiv};
use aes_siv::KeyInit;

/// Runs `$body` with `$siv` an AES-SIV instance of the size the key's length selects.
macro_rules! with_siv {
    ($key:expr, |$siv:ident| $body:expr) => {
        match $key.len() {
            32 => {
                let mut $siv =
                    CmacSiv::<Aes128>::new_from_slice($key).map_err(|_| invalid_key(32))?;
                $body
            }
            48 => {
                let mut $siv =
                    CmacSiv::<Aes192>::new_from_slice($key).map_err(|_| invalid_key(48))?;
                $body
            }
            64 => {
                let mut $siv =
                    CmacSiv::<Aes256>::new_from_slice($key).map_err(|_| invalid_key(64))?;
                $body
            }
            actual => Err(invalid_key(actual)),
        }
    };
}
/// Encrypts `$buf[TAG_BYTES..]` in place with the AES-SIV instance `$siv` and writes the SIV
/// tag into `$buf[..TAG_BYTES]`.
macro_rules! seal_with {
    ($siv:expr, $headers:expr, $buf:expr) => {{
        let (tag_out, body) = $buf.split_at_mut(TAG_BYTES);
        // The only error is more than 126 headers; we pass at most a handful.
        $siv.encrypt_in_place_detached($headers, body)
            .map(|tag| tag_out.copy_from_slice(&tag))
            .map_err(|_| TokenizeError::InvalidParameter {
                parameter: "headers",
                reason: "too many AES-SIV header components",
            })
    }};
}

/// Decrypts SIV tag ‖ ciphertext `$sealed` with `$siv` into a new buffer.
macro_rules! open_with {
    ($siv:expr, $headers:expr, $sealed:expr) => {{
        let sealed: &[u8] = $sealed;
        if sealed.len() < TAG_BYTES {
            Err(TokenizeError::DecryptFailed)
        } else {
            let (tag, ciphertext) = sealed.split_at(TAG_BYTES);
            let mut buf = ciphertext.to_vec();
            let tag = aes_siv::Tag::clone_from_slice(tag);
            $siv.decrypt_in_place_detached($headers, &mut buf, &tag)
                .map(|()| buf)
                .map_err(|_| TokenizeError::DecryptFailed)
        }
    }};
}

use zeroize::Zeroizing;

use crate::keys::{push_lp, DomainKey, Purpose};
use crate::normalize::Normalization;
use crate::token;
use crate::{Result, TokenizeError};

/// Length of the SIV tag that starts every ciphertext.
pub const TAG_BYTES: usize = 16;

/// Plaintexts up to this length are encrypted in a stack buffer (no allocation).
const STACK_BYTES: usize = 256;

/// The deterministic-encryption transform of one field.
pub struct SivCipher {
    key: Zeroizing<[u8; 64]>,
    /// An instance under `key` with its key schedule done, for whichever thread takes it.
    prepared: Mutex<Aes256Siv>,
    ad: Vec<u8>,
    version: u32,
    /// `v<version>.`
    prefix: String,
    normalization: Normalization,
}

impl SivCipher {
    /// Derives the field's AES-SIV key and builds its associated data.
    pub fn new(domain_key: &DomainKey, field: &str, normalization: Normalization) -> Self {
        let key = domain_key.derive::<64>(field, Purpose::DeterministicEncryption);
        let prepared = Mutex::new(Aes256Siv::new(key.as_ref().into()));
        Self {
            key,
            prepared,
            ad: associated_data(domain_key.domain(), field, domain_key.version()),
            version: domain_key.version(),
            prefix: token::prefix(domain_key.version()),
            normalization,
        }
    }

    /// Writes the token of `value` (normalized first) into `out`, cleared first.
    pub fn encrypt_into(&self, value: &str, out: &mut String) -> Result<()> {
        self.normalization.normalize_into(value, out)?;
        let len = TAG_BYTES + out.len();
        let mut stack = [0u8; STACK_BYTES];
        let mut heap = Vec::new();
        let buf: &mut [u8] = if len <= STACK_BYTES {
            &mut stack[..len]
        } else {
            heap.resize(len, 0);
            &mut heap
        };
        buf[TAG_BYTES..].copy_from_slice(out.as_bytes());
        self.with_prepared(|siv| seal_with!(siv, [&self.ad], buf))??;
        out.clear();
        out.push_str(&self.prefix);
        token::push_payload(out, buf);
        Ok(())
    }

    /// Writes the plaintext of `token` into `out`, cleared first.
    pub fn decrypt_into(&self, token: &str, out: &mut String) -> Result<()> {
        out.clear();
        let (version, payload) = token::split(token).ok_or(TokenizeError::DecryptFailed)?;
        if version != self.version {
            return Err(TokenizeError::DecryptFailed);
        }
        let plain = self.with_prepared(|siv| open_with!(siv, [&self.ad], &payload))??;
        let plain = Zeroizing::new(plain);
        let text = std::str::from_utf8(&plain).map_err(|_| TokenizeError::DecryptFailed)?;
        out.push_str(text);
        Ok(())
    }

    /// Runs `f` on the prepared instance, or on a fresh one if another thread holds it (or
    /// panicked holding it: that one is never used again).
    fn with_prepared<T>(&self, f: impl FnOnce(&mut Aes256Siv) -> T) -> Result<T> {
        if let Ok(mut siv) = self.prepared.try_lock() {
            return Ok(f(&mut siv));
        }
        let mut fresh =
            Aes256Siv::new_from_slice(self.key.as_slice()).map_err(|_| invalid_key(64))?;
        Ok(f(&mut fresh))
    }
}

impl std::fmt::Debug for SivCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SivCipher")
            .field("version", &self.version)
            .field("normalization", &self.normalization)
            .finish_non_exhaustive()
    }
}

/// The associated data of a field's tokens: length-prefixed label, domain and field, and the
/// key version.
pub fn associated_data(domain: &str, field: &str, version: u32) -> Vec<u8> {
    let mut ad = Vec::with_capacity(48 + domain.len() + field.len());
    push_lp(&mut ad, b"kms-tokenize/v1 aes-siv");
    push_lp(&mut ad, domain.as_bytes());
    push_lp(&mut ad, field.as_bytes());
    ad.extend_from_slice(&version.to_be_bytes());
    ad
}

/// AES-SIV encryption (RFC 5297 S2V over `headers`, then CTR): returns SIV tag ‖ ciphertext.
/// The key is K1 ‖ K2 of 32, 48 or 64 bytes (AES-128, -192 or -256).
pub fn aes_siv_seal(key: &[u8], headers: &[&[u8]], plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; TAG_BYTES + plaintext.len()];
    buf[TAG_BYTES..].copy_from_slice(plaintext);
    seal_in_place(key, headers, &mut buf)?;
    Ok(buf)
}

/// AES-SIV decryption of SIV tag ‖ ciphertext; [`TokenizeError::DecryptFailed`] if it is shorter
/// than a tag or does not authenticate.
pub fn aes_siv_open(key: &[u8], headers: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>> {
    with_siv!(key, |siv| open_with!(siv, headers, sealed))
}

fn invalid_key(actual: usize) -> TokenizeError {
    TokenizeError::InvalidKeyLength {
        algorithm: "AES-SIV",
        actual,
    }
}

/// Encrypts `buf[TAG_BYTES..]` in place and writes the SIV tag into `buf[..TAG_BYTES]`.
fn seal_in_place(key: &[u8], headers: &[&[u8]], buf: &mut [u8]) -> Result<()> {
    with_siv!(key, |siv| seal_with!(siv, headers, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> SivCipher {
        let domain = DomainKey::new("d", 1, Zeroizing::new([4u8; 32]));
        SivCipher::new(&domain, "mrn", Normalization::Exact)
    }

    #[test]
    fn a_busy_or_poisoned_prepared_instance_gives_the_same_tokens() {
        let siv = cipher();
        let mut token = String::new();
        siv.encrypt_into("MRN-00042", &mut token).unwrap();
        // Busy: another holder of the prepared instance.
        let mut busy = String::new();
        {
            let _held = siv.prepared.lock().unwrap();
            siv.encrypt_into("MRN-00042", &mut busy).unwrap();
            let mut plain = String::new();
            siv.decrypt_into(&token, &mut plain).unwrap();
            assert_eq!(plain, "MRN-00042");
        }
        assert_eq!(busy, token);
        // Poisoned: a thread panicked while holding it.
        let poisoned = std::thread::scope(|s| {
            s.spawn(|| {
                let _held = siv.prepared.lock().unwrap();
                panic!("poison the prepared instance");
            })
            .join()
        });
        assert!(poisoned.is_err() && siv.prepared.is_poisoned());
        let mut after = String::new();
        siv.encrypt_into("MRN-00042", &mut after).unwrap();
        assert_eq!(after, token);
    }
}
