//! Deterministic encryption with AES-SIV (RFC 5297), AES-SIV-CMAC-256: a 64-byte key derived for
//! the field, and associated data binding the domain, the field and the key version, so a token
//! moved to another field or domain does not decrypt. Equal plaintexts give equal tokens
//! (joinable); the token is reversible with the key.
//!
//! Token: `v<key version>.` ‖ base64url(SIV tag ‖ ciphertext), no padding. Every decryption
//! failure is [`TokenizeError::DecryptFailed`].
//!
//! [`aes_siv_seal`] and [`aes_siv_open`] are the one AES-SIV code path; the transform calls
//! them with its 64-byte key, and the known-answer tests call them with RFC 5297 and Wycheproof
//! vectors.

use aes::{Aes128, Aes192, Aes256};
use aes_siv::siv::CmacSiv;
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
    ad: Vec<u8>,
    version: u32,
    normalization: Normalization,
}

impl SivCipher {
    /// Derives the field's AES-SIV key and builds its associated data.
    pub fn new(domain_key: &DomainKey, field: &str, normalization: Normalization) -> Self {
        let key = domain_key.derive::<64>(field, Purpose::DeterministicEncryption);
        Self {
            key,
            ad: associated_data(domain_key.domain(), field, domain_key.version()),
            version: domain_key.version(),
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
        seal_in_place(self.key.as_slice(), &[&self.ad], buf)?;
        out.clear();
        token::push_prefix(out, self.version);
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
        let plain = Zeroizing::new(aes_siv_open(self.key.as_slice(), &[&self.ad], &payload)?);
        let text = std::str::from_utf8(&plain).map_err(|_| TokenizeError::DecryptFailed)?;
        out.push_str(text);
        Ok(())
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
    if sealed.len() < TAG_BYTES {
        return Err(TokenizeError::DecryptFailed);
    }
    let (tag, ciphertext) = sealed.split_at(TAG_BYTES);
    let mut buf = ciphertext.to_vec();
    let tag = aes_siv::Tag::clone_from_slice(tag);
    with_siv!(key, |siv| siv
        .decrypt_in_place_detached(headers, &mut buf, &tag)
        .map_err(|_| TokenizeError::DecryptFailed))?;
    Ok(buf)
}

fn invalid_key(actual: usize) -> TokenizeError {
    TokenizeError::InvalidKeyLength {
        algorithm: "AES-SIV",
        actual,
    }
}

/// Encrypts `buf[TAG_BYTES..]` in place and writes the SIV tag into `buf[..TAG_BYTES]`.
fn seal_in_place(key: &[u8], headers: &[&[u8]], buf: &mut [u8]) -> Result<()> {
    let (tag_out, body) = buf.split_at_mut(TAG_BYTES);
    // The only error is more than 126 headers; we pass at most a handful.
    let tag = with_siv!(key, |siv| siv
        .encrypt_in_place_detached(headers, body)
        .map_err(|_| TokenizeError::InvalidParameter {
            parameter: "headers",
            reason: "too many AES-SIV header components",
        }))?;
    tag_out.copy_from_slice(&tag);
    Ok(())
}
