//! The canonical byte encoding of an encryption context, shared by the server (which binds it
//! into the authenticated data of every wrapped blob) and the SDK (which stores it in message
//! headers).
//!
//! Layout: `u32 count`, then for each entry in ascending byte order of its key:
//! `u32 key length, key bytes, u32 value length, value bytes` (all integers big-endian).
//! The encoding is injective: two different maps never share an encoding, and [`decode`]
//! accepts only what [`encode`] produces (sorted, no duplicate keys, no trailing bytes).

use std::collections::BTreeMap;

/// Most entries a context may hold.
pub const MAX_ENTRIES: usize = 64;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// Why a context was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextError {
    /// More than [`MAX_ENTRIES`] entries.
    TooManyEntries,
    /// An empty key, or one longer than [`MAX_KEY_LEN`].
    BadKey,
    /// A value longer than [`MAX_VALUE_LEN`].
    BadValue,
    /// The bytes are not a canonical encoding.
    Malformed,
}

/// Checks the limits on a context.
pub fn validate(context: &BTreeMap<String, String>) -> Result<(), ContextError> {
    if context.len() > MAX_ENTRIES {
        return Err(ContextError::TooManyEntries);
    }
    for (k, v) in context {
        if k.is_empty() || k.len() > MAX_KEY_LEN {
            return Err(ContextError::BadKey);
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(ContextError::BadValue);
        }
    }
    Ok(())
}

/// Encodes a context canonically. Callers validate first; the encoding itself cannot fail.
pub fn encode(context: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        4 + context
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(&len_u32(context.len()).to_be_bytes());
    // BTreeMap<String, _> iterates in byte order of the keys: that is the canonical order.
    for (k, v) in context {
        out.extend_from_slice(&len_u32(k.len()).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&len_u32(v.len()).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// Decodes a canonical encoding, refusing anything [`encode`] would not produce.
pub fn decode(mut bytes: &[u8]) -> Result<BTreeMap<String, String>, ContextError> {
    let count = take_u32(&mut bytes)? as usize;
    if count > MAX_ENTRIES {
        return Err(ContextError::Malformed);
    }
    let mut map = BTreeMap::new();
    let mut previous: Option<String> = None;
    for _ in 0..count {
        let key = take_str(&mut bytes, MAX_KEY_LEN)?;
        let value = take_str(&mut bytes, MAX_VALUE_LEN)?;
        if key.is_empty()
            || previous
                .as_deref()
                .is_some_and(|p| p.as_bytes() >= key.as_bytes())
        {
            return Err(ContextError::Malformed);
        }
        previous = Some(key.clone());
        map.insert(key, value);
    }
    if !bytes.is_empty() {
        return Err(ContextError::Malformed);
    }
    Ok(map)
}

fn len_u32(n: usize) -> u32 {
    // Lengths are bounded by `validate` far below u32::MAX; saturate rather than wrap.
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn take_u32(bytes: &mut &[u8]) -> Result<u32, ContextError> {
    let (head, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or(ContextError::Malformed)?;
    *bytes = rest;
    Ok(u32::from_be_bytes(*head))
}

fn take_str(bytes: &mut &[u8], max: usize) -> Result<String, ContextError> {
    let len = take_u32(bytes)? as usize;
    if len > max || len > bytes.len() {
        return Err(ContextError::Malformed);
    }
    let (head, rest) = bytes.split_at(len);
    *bytes = rest;
    String::from_utf8(head.to_vec()).map_err(|_| ContextError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_sorted_and_round_trips() {
        let ctx: BTreeMap<String, String> = [
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string()),
        ]
        .into();
        let bytes = encode(&ctx);
        assert_eq!(
            bytes,
            [
                &[0, 0, 0, 2][..],
                &[0, 0, 0, 1],
                b"a",
                &[0, 0, 0, 1],
                b"1",
                &[0, 0, 0, 1],
                b"b",
                &[0, 0, 0, 1],
                b"2"
            ]
            .concat()
        );
        assert_eq!(decode(&bytes), Ok(ctx));
        assert_eq!(decode(&encode(&BTreeMap::new())), Ok(BTreeMap::new()));
    }

    #[test]
    fn decode_refuses_unsorted_duplicate_and_trailing() {
        let unsorted = [
            &[0, 0, 0, 2][..],
            &[0, 0, 0, 1],
            b"b",
            &[0, 0, 0, 0],
            &[0, 0, 0, 1],
            b"a",
            &[0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(decode(&unsorted), Err(ContextError::Malformed));
        let duplicate = [
            &[0, 0, 0, 2][..],
            &[0, 0, 0, 1],
            b"a",
            &[0, 0, 0, 0],
            &[0, 0, 0, 1],
            b"a",
            &[0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(decode(&duplicate), Err(ContextError::Malformed));
        let mut trailing = encode(&BTreeMap::new());
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(ContextError::Malformed));
        assert_eq!(decode(&[0, 0]), Err(ContextError::Malformed));
    }

    #[test]
    fn limits_are_enforced() {
        let empty_key: BTreeMap<String, String> = [(String::new(), "x".to_string())].into();
        assert_eq!(validate(&empty_key), Err(ContextError::BadKey));
        let long_value: BTreeMap<String, String> =
            [("k".to_string(), "v".repeat(MAX_VALUE_LEN + 1))].into();
        assert_eq!(validate(&long_value), Err(ContextError::BadValue));
        let many: BTreeMap<String, String> = (0..=MAX_ENTRIES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert_eq!(validate(&many), Err(ContextError::TooManyEntries));
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(map in proptest::collection::btree_map(".{1,8}", ".{0,8}", 0..6)) {
            prop_assert_eq!(decode(&encode(&map)), Ok(map));
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(map) = decode(&bytes) {
                prop_assert_eq!(encode(&map), bytes, "only canonical encodings are accepted");
            }
        }
    }
}
