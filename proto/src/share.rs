//! What a custodian's sealed share holds once opened, and the commitment that binds it to its
//! ceremony. Shared by the server (which seals shares and checks submitted ones) and the CLI
//! (which opens them on the custodian's machine and confirms them).
//!
//! The server seals the JSON of a [`ShareEnvelope`] to the custodian's age X25519 recipient.
//! age authenticates the ciphertext (any edit fails to open); the commitment authenticates
//! the content to the ceremony: it is stored with the ceremony and in every backup, so a
//! share whose index, custodian, ceremony or bytes were changed no longer matches it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The `format` of a share envelope.
pub const FORMAT: &str = "kms-recovery-share-v1";

/// An opened share. `share` is secret: hex of the share bytes.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareEnvelope {
    /// Always [`FORMAT`].
    pub format: String,
    /// The ceremony that produced the share.
    pub ceremony_id: String,
    /// M: shares needed.
    pub threshold: u32,
    /// N: shares made.
    pub shares: u32,
    /// This share's index (1..=N).
    pub index: u32,
    /// The principal the share was sealed to.
    pub custodian: String,
    /// Key-check value of the recovery key (hex).
    pub kcv: String,
    /// [`commitment`] of this share (hex).
    pub commitment: String,
    /// The share bytes (hex). Secret.
    pub share: Zeroizing<String>,
}

impl std::fmt::Debug for ShareEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareEnvelope")
            .field("ceremony_id", &self.ceremony_id)
            .field("threshold", &self.threshold)
            .field("shares", &self.shares)
            .field("index", &self.index)
            .field("custodian", &self.custodian)
            .field("share", &"<secret>")
            .finish()
    }
}

/// SHA-256 over a domain label and every field that names the share, each length-prefixed:
/// ceremony id, index, custodian, share bytes. A share has as much entropy as the secret, so
/// the commitment reveals nothing usable about it.
pub fn commitment(ceremony_id: &str, index: u32, custodian: &str, share: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        FORMAT.as_bytes(),
        ceremony_id.as_bytes(),
        &index.to_be_bytes(),
        custodian.as_bytes(),
        share,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

impl ShareEnvelope {
    /// Parses an opened envelope and checks that it is self-consistent: the format, the index
    /// range, and the commitment over its own fields.
    pub fn parse(json: &[u8]) -> Result<ShareEnvelope, &'static str> {
        let envelope: ShareEnvelope =
            serde_json::from_slice(json).map_err(|_| "not a share envelope")?;
        if envelope.format != FORMAT {
            return Err("unknown share format");
        }
        if envelope.index == 0 || envelope.index > envelope.shares || envelope.shares > 255 {
            return Err("share index out of range");
        }
        let bytes = envelope.share_bytes()?;
        let expected = hex::encode(commitment(
            &envelope.ceremony_id,
            envelope.index,
            &envelope.custodian,
            &bytes,
        ));
        if expected != envelope.commitment {
            return Err("share does not match its commitment");
        }
        Ok(envelope)
    }

    /// The share bytes.
    pub fn share_bytes(&self) -> Result<Zeroizing<Vec<u8>>, &'static str> {
        hex::decode(self.share.as_str())
            .map(Zeroizing::new)
            .map_err(|_| "share is not hex")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(share: &[u8]) -> String {
        let c = hex::encode(commitment("c1", 2, "spiffe://h/custodian/a", share));
        format!(
            r#"{{"format":"{FORMAT}","ceremony_id":"c1","threshold":2,"shares":3,"index":2,
            "custodian":"spiffe://h/custodian/a","kcv":"00","commitment":"{c}","share":"{}"}}"#,
            hex::encode(share)
        )
    }

    #[test]
    fn a_consistent_envelope_parses_and_an_edited_one_does_not() {
        let good = envelope(&[7; 32]);
        assert!(ShareEnvelope::parse(good.as_bytes()).is_ok());
        let other_index = good.replace(r#""index":2"#, r#""index":3"#);
        assert_eq!(
            ShareEnvelope::parse(other_index.as_bytes()).err(),
            Some("share does not match its commitment")
        );
        let other_share = good.replace(&hex::encode([7u8; 32]), &hex::encode([8u8; 32]));
        assert!(ShareEnvelope::parse(other_share.as_bytes()).is_err());
        let out_of_range = good.replace(r#""index":2"#, r#""index":4"#);
        assert_eq!(
            ShareEnvelope::parse(out_of_range.as_bytes()).err(),
            Some("share index out of range")
        );
    }

    #[test]
    fn commitment_fields_do_not_run_into_each_other() {
        assert_ne!(
            commitment("ab", 1, "c", b"x"),
            commitment("a", 1, "bc", b"x")
        );
    }
}
