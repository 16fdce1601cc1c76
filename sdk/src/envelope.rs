//! The SDK message format: a header, then a framed AES-256-GCM body under a per-message key.
//!
//! ```text
//! header  = "KMSE" | version u8 (1) | suite u8 (1)
//!         | u16 key id length | key id (UTF-8)
//!         | u16 wrapped data key length | wrapped data key (the server's blob)
//!         | u32 context length | canonical encryption context
//!         | u32 frame size | message id [32] | key commitment [32]
//! frame   = final u8 (0 or 1) | u32 plaintext length | ciphertext | tag [16]
//! message = header frame* final-frame
//! ```
//!
//! Suite 1: from the 32-byte data key (DEK) and the random message id, HKDF-SHA256
//! (salt = message id) derives the frame key (info `kms-envelope/v1/frame-key`) and the key
//! commitment (info `kms-envelope/v1/commitment`). The commitment is checked, in constant
//! time, before any frame is opened, so one ciphertext cannot decrypt under two data keys.
//! Frame `i` (from 0) uses nonce `0u32 || i as u64` (big-endian) and authenticated data
//! `H || i as u64 || final flag || plaintext length as u32`, where `H` is SHA-256 over the
//! header without its key id and wrapped data key fields. Those two are left out so that a
//! file can be re-wrapped (moved to a new master key version) by rewriting the header only;
//! they are still authenticated, because a wrapped key that yields another data key fails the
//! key commitment, and the server checks the blob against the key id. Editing the
//! header, reordering, dropping or duplicating frames, cutting the message after a frame, or
//! appending bytes after the final frame are all detected. Regular frames hold exactly
//! `frame size` bytes; the final frame holds 0..=`frame size` bytes and is always present.
//! Because every message has its own id and so its own frame key, one data key may safely
//! encrypt many messages (see [`crate::DataKeyCache`]).
//!
//! Parsing is strict and total: every malformed input yields [`Error::InvalidCiphertext`].
//! Frames are released as they are authenticated; a stream is complete only when
//! [`open_stream`] returns `Ok` (the file functions write to a temporary file and rename it
//! only then).

use std::io::{Read, Write};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::client::Context;
use crate::error::Error;

/// Magic bytes of a message.
pub const MAGIC: [u8; 4] = *b"KMSE";
/// The format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Suite 1: AES-256-GCM frames, HKDF-SHA256 key derivation, key commitment.
pub const SUITE: u8 = 1;
/// Default frame size: 64 KiB.
pub const DEFAULT_FRAME_SIZE: u32 = 64 * 1024;
/// Largest frame size accepted: 16 MiB.
pub const MAX_FRAME_SIZE: u32 = 16 * 1024 * 1024;
/// Longest key id accepted in a header.
const MAX_KEY_ID_LEN: usize = 256;
/// Longest wrapped data key accepted in a header.
const MAX_WRAPPED_LEN: usize = 1024;
/// Longest canonical context accepted in a header.
const MAX_CONTEXT_LEN: usize = 128 * 1024;
const TAG_LEN: usize = 16;

/// A message header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The master key the data key is wrapped under.
    pub key_id: String,
    /// The wrapped data key, as the server returned it.
    pub wrapped_dek: Vec<u8>,
    /// The encryption context (also bound into the wrapped data key).
    pub context: Context,
    /// Plaintext bytes per regular frame.
    pub frame_size: u32,
    message_id: [u8; 32],
    commitment: [u8; 32],
    encoded: Vec<u8>,
    bound_hash: [u8; 32],
}

impl Header {
    /// A header for a new message under `dek`, with a fresh random message id.
    pub fn new(
        key_id: &str,
        wrapped_dek: &[u8],
        context: &Context,
        frame_size: u32,
        dek: &[u8; 32],
    ) -> Result<Self, Error> {
        if frame_size == 0 || frame_size > MAX_FRAME_SIZE {
            return Err(Error::InvalidArgument(
                "frame size must be 1 byte to 16 MiB",
            ));
        }
        if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN || wrapped_dek.len() > MAX_WRAPPED_LEN
        {
            return Err(Error::InvalidArgument(
                "key id or wrapped data key too long",
            ));
        }
        proto::context::validate(context)
            .map_err(|_| Error::InvalidArgument("encryption context out of limits"))?;
        let mut message_id = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut message_id);
        let (_, commitment) = derive(dek, &message_id);
        let canonical = proto::context::encode(context);
        let mut encoded = Vec::with_capacity(
            6 + 2 + key_id.len() + 2 + wrapped_dek.len() + 4 + canonical.len() + 68,
        );
        encoded.extend_from_slice(&MAGIC);
        encoded.push(VERSION);
        encoded.push(SUITE);
        put_len16(&mut encoded, key_id.as_bytes());
        put_len16(&mut encoded, wrapped_dek);
        encoded.extend_from_slice(&(canonical.len() as u32).to_be_bytes());
        encoded.extend_from_slice(&canonical);
        encoded.extend_from_slice(&frame_size.to_be_bytes());
        encoded.extend_from_slice(&message_id);
        encoded.extend_from_slice(&commitment);
        let bound_hash = bound_hash(&canonical, frame_size, &message_id, &commitment);
        Ok(Header {
            key_id: key_id.to_string(),
            wrapped_dek: wrapped_dek.to_vec(),
            context: context.clone(),
            frame_size,
            message_id,
            commitment,
            encoded,
            bound_hash,
        })
    }

    /// Reads and strictly parses a header, leaving `reader` at the first frame.
    pub fn read_from(reader: &mut impl Read) -> Result<Self, Error> {
        let mut encoded = Vec::new();
        let fixed: [u8; 6] = read_array(reader, &mut encoded)?;
        if fixed[..4] != MAGIC || fixed[4] != VERSION || fixed[5] != SUITE {
            return Err(Error::InvalidCiphertext);
        }
        let key_id_len = u16::from_be_bytes(read_array(reader, &mut encoded)?) as usize;
        if key_id_len == 0 || key_id_len > MAX_KEY_ID_LEN {
            return Err(Error::InvalidCiphertext);
        }
        let key_id = String::from_utf8(read_vec(reader, key_id_len, &mut encoded)?)
            .map_err(|_| Error::InvalidCiphertext)?;
        let wrapped_len = u16::from_be_bytes(read_array(reader, &mut encoded)?) as usize;
        if wrapped_len > MAX_WRAPPED_LEN {
            return Err(Error::InvalidCiphertext);
        }
        let wrapped_dek = read_vec(reader, wrapped_len, &mut encoded)?;
        // The header names the key the server's blob names: a header whose key id was edited
        // is damaged, and is refused here rather than sent to the server under a wrong key.
        if wrapped_key_id(&wrapped_dek).is_some_and(|id| id != key_id) {
            return Err(Error::InvalidCiphertext);
        }
        let context_len = u32::from_be_bytes(read_array(reader, &mut encoded)?) as usize;
        if context_len > MAX_CONTEXT_LEN {
            return Err(Error::InvalidCiphertext);
        }
        let canonical = read_vec(reader, context_len, &mut encoded)?;
        let context = proto::context::decode(&canonical).map_err(|_| Error::InvalidCiphertext)?;
        let frame_size = u32::from_be_bytes(read_array(reader, &mut encoded)?);
        if frame_size == 0 || frame_size > MAX_FRAME_SIZE {
            return Err(Error::InvalidCiphertext);
        }
        let message_id = read_array(reader, &mut encoded)?;
        let commitment = read_array(reader, &mut encoded)?;
        let bound_hash = bound_hash(&canonical, frame_size, &message_id, &commitment);
        Ok(Header {
            key_id,
            wrapped_dek,
            context,
            frame_size,
            message_id,
            commitment,
            encoded,
            bound_hash,
        })
    }

    /// The master key version of the wrapped data key, read from the server's blob format
    /// (`docs/formats.md`: bytes 19..23 of a version-1 blob), if it is one.
    pub fn wrapped_key_version(&self) -> Option<u32> {
        let b = &self.wrapped_dek;
        (b.len() >= 23 && b[..3] == *b"KW\x01")
            .then(|| u32::from_be_bytes([b[19], b[20], b[21], b[22]]))
    }

    /// The master key id of the wrapped data key, read from the server's blob format, if
    /// it is one.
    pub fn wrapped_key_id(&self) -> Option<String> {
        wrapped_key_id(&self.wrapped_dek)
    }

    /// The header's bytes as written.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The same header with another wrapped data key (same DEK, message id and commitment):
    /// what re-wrapping a file under a new master key version changes.
    pub fn with_wrapped_dek(&self, key_id: &str, wrapped_dek: &[u8]) -> Result<Self, Error> {
        let mut rewritten = Header::new(
            key_id,
            wrapped_dek,
            &self.context,
            self.frame_size,
            &[0; 32],
        )?;
        rewritten.message_id = self.message_id;
        rewritten.commitment = self.commitment;
        rewritten.bound_hash = self.bound_hash;
        let tail = rewritten.encoded.len() - 64;
        rewritten.encoded.truncate(tail);
        rewritten.encoded.extend_from_slice(&self.message_id);
        rewritten.encoded.extend_from_slice(&self.commitment);
        Ok(rewritten)
    }

    /// The frame key for `dek`, after checking the key commitment in constant time.
    fn frame_key(&self, dek: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, Error> {
        let (frame_key, commitment) = derive(dek, &self.message_id);
        if bool::from(commitment.ct_eq(&self.commitment)) {
            Ok(frame_key)
        } else {
            Err(Error::InvalidCiphertext)
        }
    }
}

/// Encrypts everything `reader` yields: writes the header, then the frames. Returns the number
/// of plaintext bytes.
pub fn seal_stream(
    dek: &[u8; 32],
    header: &Header,
    mut reader: impl Read,
    mut writer: impl Write,
) -> Result<u64, Error> {
    let frame_key = header
        .frame_key(dek)
        .map_err(|_| Error::InvalidArgument("header was made for another data key"))?;
    let header_hash = header.bound_hash;
    writer.write_all(header.encoded())?;
    let size = header.frame_size as usize;
    let mut buf = Zeroizing::new(vec![0u8; size]);
    let mut index: u64 = 0;
    let mut total: u64 = 0;
    let mut filled = read_full(&mut reader, &mut buf)?;
    loop {
        // A full buffer is a regular frame only if at least one more byte follows.
        let mut peek = [0u8; 1];
        let is_final = filled < size || read_full(&mut reader, &mut peek)? == 0;
        let sealed = aead::seal(
            &frame_key,
            &frame_nonce(index),
            &frame_aad(&header_hash, index, is_final, filled),
            &buf[..filled],
        )?;
        writer.write_all(&[u8::from(is_final)])?;
        writer.write_all(&(filled as u32).to_be_bytes())?;
        writer.write_all(&sealed)?;
        total += filled as u64;
        if is_final {
            writer.flush()?;
            return Ok(total);
        }
        index += 1;
        buf[0] = peek[0];
        filled = 1 + read_full(&mut reader, &mut buf[1..])?;
    }
}

/// Decrypts the frames that follow `header` in `reader` and writes the plaintext. Returns the
/// number of plaintext bytes. Output written before an error must be discarded.
pub fn open_stream(
    dek: &[u8; 32],
    header: &Header,
    mut reader: impl Read,
    mut writer: impl Write,
) -> Result<u64, Error> {
    let frame_key = header.frame_key(dek)?;
    let header_hash = header.bound_hash;
    let size = header.frame_size as usize;
    let mut sealed = vec![0u8; size + TAG_LEN];
    let mut index: u64 = 0;
    let mut total: u64 = 0;
    loop {
        let mut prefix = [0u8; 5];
        if read_full(&mut reader, &mut prefix)? != prefix.len() {
            return Err(Error::InvalidCiphertext);
        }
        let is_final = match prefix[0] {
            0 => false,
            1 => true,
            _ => return Err(Error::InvalidCiphertext),
        };
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if (!is_final && len != size) || len > size {
            return Err(Error::InvalidCiphertext);
        }
        let frame = &mut sealed[..len + TAG_LEN];
        if read_full(&mut reader, frame)? != frame.len() {
            return Err(Error::InvalidCiphertext);
        }
        let plaintext = Zeroizing::new(aead::open(
            &frame_key,
            &frame_nonce(index),
            &frame_aad(&header_hash, index, is_final, len),
            frame,
        )?);
        writer.write_all(&plaintext)?;
        total += len as u64;
        if is_final {
            let mut trailing = [0u8; 1];
            if read_full(&mut reader, &mut trailing)? != 0 {
                return Err(Error::InvalidCiphertext);
            }
            writer.flush()?;
            return Ok(total);
        }
        index = index.checked_add(1).ok_or(Error::InvalidCiphertext)?;
    }
}

/// Encrypts a byte slice into a complete message.
pub fn seal(dek: &[u8; 32], header: &Header, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let frames = plaintext.len() / header.frame_size as usize + 1;
    let mut out =
        Vec::with_capacity(header.encoded().len() + plaintext.len() + frames * (5 + TAG_LEN));
    seal_stream(dek, header, plaintext, &mut out)?;
    Ok(out)
}

/// Decrypts the body of a complete message whose header was already read from `body`'s front.
pub fn open(dek: &[u8; 32], header: &Header, body: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
    let mut out = Zeroizing::new(Vec::with_capacity(body.len()));
    open_stream(dek, header, body, &mut *out)?;
    Ok(out)
}

fn derive(dek: &[u8; 32], message_id: &[u8; 32]) -> (Zeroizing<[u8; 32]>, [u8; 32]) {
    let hk = Hkdf::<Sha256>::new(Some(message_id), dek);
    let mut frame_key = Zeroizing::new([0u8; 32]);
    let mut commitment = [0u8; 32];
    // 32-byte outputs are far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
    let _ = hk.expand(b"kms-envelope/v1/frame-key", &mut *frame_key);
    let _ = hk.expand(b"kms-envelope/v1/commitment", &mut commitment);
    (frame_key, commitment)
}

/// SHA-256 over every header field except the key id and the wrapped data key.
fn bound_hash(
    canonical_context: &[u8],
    frame_size: u32,
    message_id: &[u8; 32],
    commitment: &[u8; 32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(MAGIC);
    h.update([VERSION, SUITE]);
    h.update((canonical_context.len() as u32).to_be_bytes());
    h.update(canonical_context);
    h.update(frame_size.to_be_bytes());
    h.update(message_id);
    h.update(commitment);
    h.finalize().into()
}

fn frame_nonce(index: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&index.to_be_bytes());
    nonce
}

fn frame_aad(header_hash: &[u8; 32], index: u64, is_final: bool, len: usize) -> [u8; 45] {
    let mut aad = [0u8; 45];
    aad[..32].copy_from_slice(header_hash);
    aad[32..40].copy_from_slice(&index.to_be_bytes());
    aad[40] = u8::from(is_final);
    aad[41..].copy_from_slice(&(len as u32).to_be_bytes());
    aad
}

fn put_len16(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads until `buf` is full or the reader ends; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, Error> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

/// The key id (canonical UUID text) of a version-1 server blob (`docs/formats.md`: bytes
/// 3..19), if `blob` is one.
fn wrapped_key_id(blob: &[u8]) -> Option<String> {
    if blob.len() < 23 || blob[..3] != *b"KW\x01" {
        return None;
    }
    let hex: String = blob[3..19].iter().map(|b| format!("{b:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

fn read_array<const N: usize>(
    reader: &mut impl Read,
    encoded: &mut Vec<u8>,
) -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    if read_full(reader, &mut out)? != N {
        return Err(Error::InvalidCiphertext);
    }
    encoded.extend_from_slice(&out);
    Ok(out)
}

fn read_vec(reader: &mut impl Read, len: usize, encoded: &mut Vec<u8>) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; len];
    if read_full(reader, &mut out)? != len {
        return Err(Error::InvalidCiphertext);
    }
    encoded.extend_from_slice(&out);
    Ok(out)
}

/// The AEAD primitive every frame goes through: AES-256-GCM, 96-bit nonce, 128-bit tag.
pub mod aead {
    use super::*;

    /// Returns `ciphertext || tag`.
    pub fn seal(
        key: &[u8; 32],
        nonce: &[u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        Aes256Gcm::new(key.into())
            .encrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| Error::InvalidArgument("plaintext too long for one frame"))
    }

    /// Opens `ciphertext || tag`; any failure is [`Error::InvalidCiphertext`].
    pub fn open(
        key: &[u8; 32],
        nonce: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, Error> {
        Aes256Gcm::new(key.into())
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
            .map_err(|_| Error::InvalidCiphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEK: [u8; 32] = [0x42; 32];

    fn header(frame_size: u32) -> Header {
        let ctx: Context = [("purpose".to_string(), "test".to_string())].into();
        Header::new("key-1", &[7; 83], &ctx, frame_size, &DEK).expect("header")
    }

    fn round_trip(len: usize, frame_size: u32) {
        let h = header(frame_size);
        let plaintext: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let message = seal(&DEK, &h, &plaintext).expect("seal");
        let mut cursor = &message[..];
        let parsed = Header::read_from(&mut cursor).expect("header parses");
        assert_eq!(parsed, h);
        assert_eq!(
            open(&DEK, &parsed, cursor).expect("open").as_slice(),
            plaintext.as_slice(),
            "len {len}"
        );
    }

    /// Header bytes that the frames do not authenticate (see the module documentation).
    fn unbound(i: usize) -> bool {
        (8..13).contains(&i) || (15..98).contains(&i)
    }

    fn open_message(message: &[u8], dek: &[u8; 32]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let mut cursor = message;
        let h = Header::read_from(&mut cursor)?;
        open(dek, &h, cursor)
    }

    #[test]
    fn sizes_around_the_frame_boundary_round_trip() {
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5] {
            round_trip(len, 4096);
        }
        round_trip(10 * 1024 * 1024 + 3, DEFAULT_FRAME_SIZE);
    }

    #[test]
    fn dropped_swapped_and_edited_are_detected() {
        let h = header(16);
        let message = seal(&DEK, &h, &[9u8; 40]).expect("seal");
        let hl = h.encoded().len();
        let frame = 5 + 16 + TAG_LEN;
        // frames: two regular (16 bytes each), one final (8 bytes)
        assert_eq!(message.len(), hl + 2 * frame + 5 + 8 + TAG_LEN);
        let dropped_last = &message[..hl + 2 * frame];
        assert!(matches!(
            open_message(dropped_last, &DEK),
            Err(Error::InvalidCiphertext)
        ));
        let mut swapped = message[..hl].to_vec();
        swapped.extend_from_slice(&message[hl + frame..hl + 2 * frame]);
        swapped.extend_from_slice(&message[hl..hl + frame]);
        swapped.extend_from_slice(&message[hl + 2 * frame..]);
        assert!(matches!(
            open_message(&swapped, &DEK),
            Err(Error::InvalidCiphertext)
        ));
        let mut trailing = message.clone();
        trailing.push(0);
        assert!(matches!(
            open_message(&trailing, &DEK),
            Err(Error::InvalidCiphertext)
        ));
        assert!(matches!(
            open_message(&message, &[0x43; 32]),
            Err(Error::InvalidCiphertext)
        ));
        // The key id ("key-1", bytes 8..13) and wrapped data key (bytes 15..98) are checked by
        // the server and the key commitment, not by the frames: the integration tests cover them.
        for i in (0..message.len()).filter(|i| !unbound(*i)) {
            let mut edited = message.clone();
            edited[i] ^= 0x01;
            assert!(
                matches!(open_message(&edited, &DEK), Err(Error::InvalidCiphertext)),
                "byte {i} flip undetected"
            );
        }
        for cut in 0..message.len() {
            assert!(
                matches!(
                    open_message(&message[..cut], &DEK),
                    Err(Error::InvalidCiphertext)
                ),
                "cut at {cut} undetected"
            );
        }
    }

    #[test]
    fn rewrapped_header_keeps_the_body_valid() {
        let h = header(64);
        let message = seal(&DEK, &h, b"body stays").expect("seal");
        let body = &message[h.encoded().len()..];
        let moved = h.with_wrapped_dek("key-2", &[8; 83]).expect("rewrap");
        assert_eq!(moved.key_id, "key-2");
        let mut reparsed = moved.encoded();
        let parsed = Header::read_from(&mut reparsed).expect("parses");
        assert_eq!(
            open(&DEK, &parsed, body)
                .expect("body still opens")
                .as_slice(),
            b"body stays"
        );
    }

    /// HKDF-SHA256 known answer: RFC 5869, Appendix A.1 (test case 1).
    #[test]
    fn hkdf_sha256_rfc5869_test_case_1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let (prk, hk) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
        assert_eq!(
            hex::encode(prk),
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
        );
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).expect("42 bytes");
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    /// SHA-256 known answer: FIPS 180-2, Appendix B.1 ("abc").
    #[test]
    fn sha256_fips180_abc() {
        assert_eq!(
            hex::encode(Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// The suite-1 derivation is pinned, so a change to it cannot slip through unnoticed
    /// (messages already written would no longer open).
    #[test]
    fn suite_one_derivation_is_stable() {
        let (frame_key, commitment) = derive(&[0x42; 32], &[0x01; 32]);
        let (again, _) = derive(&[0x42; 32], &[0x01; 32]);
        assert_eq!(*frame_key, *again);
        assert_ne!(
            *frame_key, commitment,
            "frame key and commitment must differ"
        );
        assert_eq!(hex::encode(commitment), PINNED_COMMITMENT);
    }

    /// Computed independently with Python's `hmac` module (HKDF by hand, RFC 5869).
    const PINNED_COMMITMENT: &str =
        "1433991451c3b26ea741c83fbe803b28b85454a91d2cebf9faa8df5bf1245061";

    proptest! {
        #[test]
        fn random_bytes_are_one_error_kind(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            match open_message(&bytes, &DEK) {
                Ok(_) => prop_assert!(false, "random bytes decrypted"),
                Err(Error::InvalidCiphertext) => {}
                Err(other) => prop_assert!(false, "unexpected error kind {other:?}"),
            }
        }

        #[test]
        fn mutated_messages_are_one_error_kind(pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let message = seal(&DEK, &header(8), b"some plaintext spanning frames").expect("seal");
            let mut bytes = message.clone();
            let i = pos.index(bytes.len());
            // Key id and wrapped key are authenticated by the server and the commitment.
            if unbound(i) { return Ok(()); }
            bytes[i] = byte;
            bytes.truncate(cut.index(bytes.len() + 1));
            match open_message(&bytes, &DEK) {
                Ok(p) => prop_assert!(bytes == message && p.as_slice() == b"some plaintext spanning frames"),
                Err(Error::InvalidCiphertext) => {}
                Err(other) => prop_assert!(false, "unexpected error kind {other:?}"),
            }
        }
    }
}
