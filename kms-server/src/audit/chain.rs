//! The audit trail's cryptography: the in-memory keys derived from the HSM audit key, the
//! canonical encoding of a record, the chain hash and the checkpoint MAC input.
//!
//! - `identifier key` = HSM-HMAC(audit key, [`IDENTIFIER_KEY_LABEL`]); identifier and context
//!   values are stored as HMAC-SHA256(identifier key, value), in hex.
//! - `chain key` = HSM-HMAC(audit key, [`CHAIN_KEY_LABEL`]); record `n`'s hash is
//!   HMAC-SHA256(chain key, [`RECORD_TAG`] ‖ hash of record `n-1` ‖ encoding of record `n`), the
//!   first record's predecessor being 32 zero bytes. Keyed, so that someone who can write to
//!   the database but cannot use the HSM cannot recompute the chain after an edit.
//! - A checkpoint's MAC is computed *inside* the HSM with the audit key itself over
//!   [`CHECKPOINT_TAG`] ‖ seq ‖ record hash ‖ time.
//!
//! Both derived keys are deterministic (the same after every restart, in every replica) and
//! never stored. The encoding is length-prefixed and unambiguous (not JSON): every field in a
//! fixed order, strings and collections prefixed with their length, optional fields with a
//! presence byte.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::AuditRecord;

/// Derivation label of the identifier key.
pub(crate) const IDENTIFIER_KEY_LABEL: &[u8] = b"kms audit identifier key v1";
/// Derivation label of the chain key.
pub(crate) const CHAIN_KEY_LABEL: &[u8] = b"kms audit chain key v1";
/// Domain tag of a record hash.
const RECORD_TAG: &[u8] = b"kms-audit-record-v1\0";
/// Domain tag of a checkpoint MAC.
const CHECKPOINT_TAG: &[u8] = b"kms-audit-checkpoint-v1\0";

/// The hash before the first record.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// A 256-bit key held in memory only, wiped on drop, never printed.
pub(crate) struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    pub(crate) fn new(bytes: [u8; 32]) -> Self {
        SecretKey(Zeroizing::new(bytes))
    }

    /// HMAC-SHA256 of the concatenation of `parts`.
    pub(crate) fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        hmac_sha256(self.0.as_slice(), parts)
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// HMAC-SHA256 in software (RustCrypto `hmac`), checked against Wycheproof in the tests and
/// at start-up ([`software_self_test`]).
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // Invariant: HMAC accepts keys of every length, so `new_from_slice` never fails.
    #[allow(clippy::expect_used)]
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Known-answer test of [`hmac_sha256`] with the HSM self-test vector (Wycheproof tcId 23).
pub(crate) fn software_self_test() -> bool {
    let v = crate::hsm::hmac_self_test_vector();
    hmac_sha256(&v.key, &[v.msg]) == v.tag
}

/// A record's chain hash, given its predecessor's (its own `prev_hash` and `hash` fields are
/// not read).
pub(crate) fn record_hash(chain_key: &SecretKey, prev: &[u8; 32], r: &AuditRecord) -> [u8; 32] {
    chain_key.mac(&[RECORD_TAG, prev, &encode(r)])
}

/// The bytes a checkpoint MAC covers.
pub(crate) fn checkpoint_input(seq: u64, record_hash: &[u8; 32], time: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHECKPOINT_TAG.len() + 48);
    out.extend_from_slice(CHECKPOINT_TAG);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(record_hash);
    out.extend_from_slice(&time.to_be_bytes());
    out
}

/// The canonical encoding of a record, without its `prev_hash` and `hash`.
pub(crate) fn encode(b: &AuditRecord) -> Vec<u8> {
    let mut e = Encoder(Vec::with_capacity(256));
    e.u64(b.seq);
    e.u64(b.time as u64);
    e.str(&b.request_id);
    e.str(&b.principal);
    e.str(&b.role);
    e.str(&b.operation);
    e.opt_str(b.key_id.as_deref());
    match b.key_version {
        None => e.0.push(0),
        Some(v) => {
            e.0.push(1);
            e.u64(u64::from(v));
        }
    }
    e.str(b.outcome.as_str());
    e.opt_str(b.error_code.as_deref());
    e.pairs(b.context.iter());
    e.pairs(b.identifiers.iter().map(|(k, v)| (k, v)));
    e.opt_str(b.break_glass.as_deref());
    e.str(b.severity.as_str());
    e.pairs(b.detail.iter());
    e.0
}

struct Encoder(Vec<u8>);

impl Encoder {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.0.push(0),
            Some(s) => {
                self.0.push(1);
                self.str(s);
            }
        }
    }

    fn pairs<'a>(&mut self, pairs: impl ExactSizeIterator<Item = (&'a String, &'a String)>) {
        self.u64(pairs.len() as u64);
        for (k, v) in pairs {
            self.str(k);
            self.str(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    use crate::audit::{Outcome, Severity};

    fn body() -> AuditRecord {
        AuditRecord {
            seq: 1,
            time: 1_700_000_000,
            request_id: "r".into(),
            principal: "p".into(),
            role: "app".into(),
            operation: "Decrypt".into(),
            key_id: Some("k".into()),
            key_version: Some(1),
            outcome: Outcome::Ok,
            error_code: None,
            context: BTreeMap::new(),
            identifiers: Vec::new(),
            break_glass: None,
            severity: Severity::Info,
            detail: BTreeMap::new(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    /// Every valid 256-bit-key, 256-bit-tag Wycheproof case through the software HMAC.
    #[test]
    fn software_hmac_matches_wycheproof() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/vectors/wycheproof/hmac_sha256_test.json"
        ))
        .expect("vector file in ../shared");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mut checked = 0;
        for group in json["testGroups"].as_array().expect("groups") {
            if group["tagSize"] != 256 {
                continue;
            }
            for case in group["tests"].as_array().expect("tests") {
                let key = hex::decode(case["key"].as_str().expect("key")).expect("hex");
                let msg = hex::decode(case["msg"].as_str().expect("msg")).expect("hex");
                let tag = hex::decode(case["tag"].as_str().expect("tag")).expect("hex");
                let ok = hmac_sha256(&key, &[&msg]).as_slice() == tag.as_slice();
                assert_eq!(ok, case["result"] == "valid", "tcId {}", case["tcId"]);
                checked += 1;
            }
        }
        assert!(checked > 80, "only {checked} cases");
        assert!(software_self_test());
    }

    /// Splitting the input into parts does not change the MAC.
    #[test]
    fn mac_of_parts_is_mac_of_concatenation() {
        let key = SecretKey::new([7; 32]);
        assert_eq!(key.mac(&[b"ab", b"cd"]), key.mac(&[b"abcd"]));
    }

    /// Moving bytes between adjacent fields changes the encoding (length prefixes).
    #[test]
    fn encoding_separates_fields() {
        let mut a = body();
        a.principal = "ab".into();
        a.role = "c".into();
        let mut b = body();
        b.principal = "a".into();
        b.role = "bc".into();
        assert_ne!(encode(&a), encode(&b));
        let mut c = body();
        c.key_id = None;
        let mut d = body();
        d.key_id = Some(String::new());
        assert_ne!(encode(&c), encode(&d));
    }

    proptest! {
        /// The encoding is injective over the string fields and the maps.
        #[test]
        fn encoding_is_injective(
            a in proptest::collection::vec(".{0,4}", 6),
            b in proptest::collection::vec(".{0,4}", 6),
        ) {
            let make = |v: &[String]| {
                let mut x = body();
                x.request_id = v[0].clone();
                x.principal = v[1].clone();
                x.operation = v[2].clone();
                x.context.insert(v[3].clone(), v[4].clone());
                x.identifiers.push((v[5].clone(), String::new()));
                x
            };
            let (x, y) = (make(&a), make(&b));
            prop_assert_eq!(x == y, encode(&x) == encode(&y));
        }
    }
}
