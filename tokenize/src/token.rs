//! The text form of tokens: `v<key version>.<base64url payload, no padding>`.
//!
//! The version prefix makes a key rotation visible in the data and keeps old tokens
//! attributable to the key version that made them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// `v<version>.`, made once per transform so that the hot path only copies it.
pub(crate) fn prefix(version: u32) -> String {
    let mut out = String::with_capacity(12);
    push_prefix(&mut out, version);
    out
}

/// Appends `v<version>.` to `out`.
pub(crate) fn push_prefix(out: &mut String, version: u32) {
    use std::fmt::Write;
    out.push('v');
    // Writing to a String cannot fail.
    let _ = write!(out, "{version}");
    out.push('.');
}

/// Appends `bytes` in base64url without padding.
pub(crate) fn push_payload(out: &mut String, bytes: &[u8]) {
    URL_SAFE_NO_PAD.encode_string(bytes, out);
}

/// Splits a token into its key version and decoded payload; `None` if it is malformed.
pub(crate) fn split(token: &str) -> Option<(u32, Vec<u8>)> {
    let rest = token.strip_prefix('v')?;
    let (version, payload) = rest.split_once('.')?;
    let version = parse_version(version)?;
    let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
    Some((version, payload))
}

fn parse_version(digits: &str) -> Option<u32> {
    // Canonical decimal only: no sign, no leading zeros, so one version has one prefix.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

/// The key version a pseudonym or deterministic-encryption token was made with, read from its
/// `v<version>.` prefix; `None` if the text does not start with a canonical prefix. Lets a
/// caller pick the domain key version before it decrypts.
pub fn token_key_version(token: &str) -> Option<u32> {
    let rest = token.strip_prefix('v')?;
    let (version, _) = rest.split_once('.')?;
    parse_version(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trip_and_canonical_versions() {
        let mut s = String::new();
        push_prefix(&mut s, 42);
        push_payload(&mut s, b"\xff\x00");
        assert_eq!(s, "v42./wA".replace('/', "_"));
        assert_eq!(split(&s), Some((42, vec![0xff, 0])));
        assert_eq!(token_key_version(&s), Some(42));
        assert_eq!(token_key_version("v042.AA"), None);
        assert_eq!(token_key_version("v+1.AA"), None);
        assert_eq!(token_key_version("1.AA"), None);
        assert_eq!(split("v1.***"), None);
    }
}
