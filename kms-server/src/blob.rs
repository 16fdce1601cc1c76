//! The wrapped-key blob: what `Encrypt` and `GenerateDataKey*` return and `Decrypt` accepts.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "KW"
//! 2       1     format version (1)
//! 3       16    key id (UUID bytes)
//! 19      4     key version, big-endian
//! 23      12    GCM nonce
//! 35      n     ciphertext
//! 35+n    16    GCM tag
//! ```
//!
//! The authenticated data of the GCM operation (done inside the HSM) is
//! `bytes 0..23 of the blob || algorithm id (1 = AES-256-GCM) || canonical context`, so the
//! format version, key id, key version, algorithm and encryption context are all bound. See
//! `docs/formats.md`.

use uuid::Uuid;

use crate::error::KmsError;

/// The two magic bytes that start every blob.
pub const MAGIC: [u8; 2] = *b"KW";
/// The only format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Algorithm id bound into the authenticated data: AES-256-GCM with a 96-bit nonce.
pub const ALG_AES_256_GCM: u8 = 1;
/// GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// Length of the fixed prefix before the ciphertext.
pub const HEADER_LEN: usize = 2 + 1 + 16 + 4 + NONCE_LEN;
/// The authenticated prefix (magic, version, key id, key version).
const BOUND_LEN: usize = 2 + 1 + 16 + 4;
/// Largest blob accepted: a 4 KiB payload plus framing.
pub const MAX_BLOB_LEN: usize = HEADER_LEN + 4096 + TAG_LEN;

/// A parsed blob. Borrowing: parsing copies nothing but the fixed fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob<'a> {
    /// The master key the blob was made under.
    pub key_id: Uuid,
    /// The version of that key.
    pub key_version: u32,
    /// The GCM nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the tag.
    pub sealed: &'a [u8],
    bound: [u8; BOUND_LEN],
}

impl<'a> Blob<'a> {
    /// Parses strictly. Every failure is [`KmsError::InvalidCiphertext`]; never panics.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, KmsError> {
        if bytes.len() < HEADER_LEN + TAG_LEN || bytes.len() > MAX_BLOB_LEN {
            return Err(KmsError::InvalidCiphertext);
        }
        let (head, sealed) = bytes.split_at(HEADER_LEN);
        if head[0..2] != MAGIC || head[2] != FORMAT_VERSION {
            return Err(KmsError::InvalidCiphertext);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&head[3..19]);
        let mut version = [0u8; 4];
        version.copy_from_slice(&head[19..23]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&head[23..35]);
        let mut bound = [0u8; BOUND_LEN];
        bound.copy_from_slice(&head[..BOUND_LEN]);
        Ok(Blob {
            key_id: Uuid::from_bytes(id),
            key_version: u32::from_be_bytes(version),
            nonce,
            sealed,
            bound,
        })
    }

    /// The authenticated data for this blob under `canonical_context`.
    pub fn aad(&self, canonical_context: &[u8]) -> Vec<u8> {
        aad_from(&self.bound, canonical_context)
    }
}

/// The fixed prefix of a new blob, its authenticated data, ready for the HSM to fill in.
pub struct NewBlob {
    bound: [u8; BOUND_LEN],
    /// The authenticated data to pass to the HSM.
    pub aad: Vec<u8>,
}

impl NewBlob {
    /// Prepares a blob for `key_id` version `key_version` under `canonical_context`.
    pub fn new(key_id: Uuid, key_version: u32, canonical_context: &[u8]) -> Self {
        let mut bound = [0u8; BOUND_LEN];
        bound[0..2].copy_from_slice(&MAGIC);
        bound[2] = FORMAT_VERSION;
        bound[3..19].copy_from_slice(key_id.as_bytes());
        bound[19..23].copy_from_slice(&key_version.to_be_bytes());
        let aad = aad_from(&bound, canonical_context);
        NewBlob { bound, aad }
    }

    /// Assembles the blob from the nonce and the HSM's `ciphertext || tag`.
    pub fn finish(self, nonce: &[u8; NONCE_LEN], sealed: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.extend_from_slice(&self.bound);
        out.extend_from_slice(nonce);
        out.extend_from_slice(sealed);
        out
    }
}

fn aad_from(bound: &[u8; BOUND_LEN], canonical_context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(BOUND_LEN + 1 + canonical_context.len());
    aad.extend_from_slice(bound);
    aad.push(ALG_AES_256_GCM);
    aad.extend_from_slice(canonical_context);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let id = Uuid::from_bytes([7; 16]);
        NewBlob::new(id, 3, b"").finish(&[9; NONCE_LEN], &[1; 48])
    }

    #[test]
    fn round_trip_of_fixed_fields() {
        let bytes = sample();
        let blob = Blob::parse(&bytes).expect("parses");
        assert_eq!(blob.key_id, Uuid::from_bytes([7; 16]));
        assert_eq!(blob.key_version, 3);
        assert_eq!(blob.nonce, [9; NONCE_LEN]);
        assert_eq!(blob.sealed, &[1; 48][..]);
        assert_eq!(blob.aad(b"ctx"), NewBlob::new(blob.key_id, 3, b"ctx").aad);
    }

    #[test]
    fn bad_magic_version_and_lengths_are_invalid_ciphertext() {
        let good = sample();
        for i in 0..3 {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert!(matches!(
                Blob::parse(&bad),
                Err(KmsError::InvalidCiphertext)
            ));
        }
        assert!(matches!(
            Blob::parse(&good[..HEADER_LEN + TAG_LEN - 1]),
            Err(KmsError::InvalidCiphertext)
        ));
        assert!(matches!(
            Blob::parse(&vec![0; MAX_BLOB_LEN + 1]),
            Err(KmsError::InvalidCiphertext)
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            match Blob::parse(&bytes) {
                Ok(_) | Err(KmsError::InvalidCiphertext) => {}
                Err(other) => prop_assert!(false, "unexpected error kind {other:?}"),
            }
        }

        #[test]
        fn mutated_blobs_never_panic(pos in 0usize..83, byte in any::<u8>(), cut in 0usize..83) {
            let mut bytes = sample();
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            bytes.truncate(cut.max(1));
            match Blob::parse(&bytes) {
                Ok(_) | Err(KmsError::InvalidCiphertext) => {}
                Err(other) => prop_assert!(false, "unexpected error kind {other:?}"),
            }
        }
    }
}
