//! Data-key caching: one data key encrypts (or decrypts) many messages within limits, so that
//! encrypting many small records does not cost one KMS call per record.
//!
//! Reusing a data key across messages is safe in this format: every message derives its own
//! frame key from the data key and a random 256-bit message id. The limits bound how much data
//! one compromised data key would expose and how long a revoked grant keeps working.
//!
//! | limit          | default   |
//! |----------------|-----------|
//! | `max_age`      | 5 minutes |
//! | `max_messages` | 10,000    |
//! | `max_bytes`    | 1 GiB     |
//! | `capacity`     | 128 entries per direction |
//!
//! An entry is used only while all limits hold after counting the new message; otherwise it is
//! dropped (its key zeroized) and a fresh data key is fetched. [`CachePolicy::disabled`] turns
//! caching off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::client::DataKey;

/// Limits on the reuse of one data key.
///
/// | limit          | default   |
/// |----------------|-----------|
/// | `max_age`      | 5 minutes |
/// | `max_messages` | 10,000    |
/// | `max_bytes`    | 1 GiB     |
/// | `capacity`     | 128 entries per direction |
///
/// A cached key is used only while every limit still holds after counting the new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// Longest time a data key is reused.
    pub max_age: Duration,
    /// Most messages per data key.
    pub max_messages: u64,
    /// Most plaintext bytes per data key.
    pub max_bytes: u64,
    /// Most cached data keys per direction (encrypt, decrypt).
    pub capacity: usize,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            max_age: Duration::from_secs(300),
            max_messages: 10_000,
            max_bytes: 1 << 30,
            capacity: 128,
        }
    }
}

impl CachePolicy {
    /// No caching: one KMS call per message.
    pub fn disabled() -> Self {
        CachePolicy {
            max_age: Duration::ZERO,
            max_messages: 0,
            max_bytes: 0,
            capacity: 0,
        }
    }
}

struct Entry<K> {
    key: Arc<K>,
    created: Instant,
    messages: u64,
    bytes: u64,
}

/// A plaintext data key recovered for decryption.
pub(crate) type PlainKey = Zeroizing<[u8; 32]>;

/// (master key as given by the caller, canonical context).
type EncryptId = (String, Vec<u8>);
/// (wrapped data key, canonical context).
type DecryptId = (Vec<u8>, Vec<u8>);

/// Two caches: data keys for encryption, keyed by (master key, canonical context); and
/// unwrapped data keys for decryption, keyed by (wrapped blob, canonical context).
pub struct DataKeyCache {
    policy: CachePolicy,
    encrypt: Mutex<HashMap<EncryptId, Entry<DataKey>>>,
    decrypt: Mutex<HashMap<DecryptId, Entry<PlainKey>>>,
}

impl DataKeyCache {
    /// An empty cache with these limits.
    pub fn new(policy: CachePolicy) -> Self {
        DataKeyCache {
            policy,
            encrypt: Mutex::default(),
            decrypt: Mutex::default(),
        }
    }

    /// The limits in force.
    pub fn policy(&self) -> CachePolicy {
        self.policy
    }

    pub(crate) fn take_encrypt(
        &self,
        key: &str,
        context: &[u8],
        bytes: u64,
    ) -> Option<Arc<DataKey>> {
        let mut map = self.encrypt.lock().unwrap_or_else(|p| p.into_inner());
        self.take(&mut map, &(key.to_string(), context.to_vec()), bytes)
    }

    pub(crate) fn put_encrypt(
        &self,
        key: &str,
        context: &[u8],
        data_key: Arc<DataKey>,
        bytes: u64,
    ) {
        let mut map = self.encrypt.lock().unwrap_or_else(|p| p.into_inner());
        self.put(
            &mut map,
            (key.to_string(), context.to_vec()),
            data_key,
            bytes,
        );
    }

    pub(crate) fn take_decrypt(
        &self,
        blob: &[u8],
        context: &[u8],
        bytes: u64,
    ) -> Option<Arc<PlainKey>> {
        let mut map = self.decrypt.lock().unwrap_or_else(|p| p.into_inner());
        self.take(&mut map, &(blob.to_vec(), context.to_vec()), bytes)
    }

    pub(crate) fn put_decrypt(&self, blob: &[u8], context: &[u8], key: Arc<PlainKey>, bytes: u64) {
        let mut map = self.decrypt.lock().unwrap_or_else(|p| p.into_inner());
        self.put(&mut map, (blob.to_vec(), context.to_vec()), key, bytes);
    }

    fn take<Q: std::hash::Hash + Eq, K>(
        &self,
        map: &mut HashMap<Q, Entry<K>>,
        id: &Q,
        bytes: u64,
    ) -> Option<Arc<K>> {
        let entry = map.get_mut(id)?;
        if self.within_limits(entry, bytes) {
            entry.messages += 1;
            entry.bytes += bytes;
            return Some(Arc::clone(&entry.key));
        }
        map.remove(id);
        None
    }

    fn put<Q: std::hash::Hash + Eq + Clone, K>(
        &self,
        map: &mut HashMap<Q, Entry<K>>,
        id: Q,
        key: Arc<K>,
        bytes: u64,
    ) {
        let p = self.policy;
        if p.capacity == 0 || p.max_messages == 0 || p.max_age.is_zero() || bytes > p.max_bytes {
            return;
        }
        map.retain(|_, e| e.created.elapsed() < p.max_age);
        while map.len() >= p.capacity {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(
            id,
            Entry {
                key,
                created: Instant::now(),
                messages: 1,
                bytes,
            },
        );
    }

    fn within_limits<K>(&self, entry: &Entry<K>, bytes: u64) -> bool {
        entry.created.elapsed() < self.policy.max_age
            && entry.messages < self.policy.max_messages
            && entry.bytes.saturating_add(bytes) <= self.policy.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<PlainKey> {
        Arc::new(Zeroizing::new([1; 32]))
    }

    #[test]
    fn message_and_byte_limits_retire_an_entry() {
        let cache = DataKeyCache::new(CachePolicy {
            max_messages: 3,
            max_bytes: 100,
            ..CachePolicy::default()
        });
        cache.put_decrypt(b"blob", b"ctx", key(), 10);
        assert!(cache.take_decrypt(b"blob", b"ctx", 10).is_some());
        assert!(cache.take_decrypt(b"blob", b"other ctx", 10).is_none());
        assert!(cache.take_decrypt(b"blob", b"ctx", 10).is_some());
        assert!(
            cache.take_decrypt(b"blob", b"ctx", 10).is_none(),
            "fourth message must not reuse the key"
        );
        cache.put_decrypt(b"blob", b"ctx", key(), 60);
        assert!(
            cache.take_decrypt(b"blob", b"ctx", 41).is_none(),
            "101 bytes exceed the limit"
        );
    }

    #[test]
    fn age_limit_and_disabled_policy() {
        let cache = DataKeyCache::new(CachePolicy {
            max_age: Duration::from_millis(20),
            ..CachePolicy::default()
        });
        cache.put_decrypt(b"blob", b"", key(), 1);
        assert!(cache.take_decrypt(b"blob", b"", 1).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(cache.take_decrypt(b"blob", b"", 1).is_none());
        let off = DataKeyCache::new(CachePolicy::disabled());
        off.put_decrypt(b"blob", b"", key(), 1);
        assert!(off.take_decrypt(b"blob", b"", 1).is_none());
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let cache = DataKeyCache::new(CachePolicy {
            capacity: 2,
            ..CachePolicy::default()
        });
        cache.put_decrypt(b"a", b"", key(), 1);
        std::thread::sleep(Duration::from_millis(2));
        cache.put_decrypt(b"b", b"", key(), 1);
        std::thread::sleep(Duration::from_millis(2));
        cache.put_decrypt(b"c", b"", key(), 1);
        assert!(cache.take_decrypt(b"a", b"", 1).is_none());
        assert!(cache.take_decrypt(b"b", b"", 1).is_some());
        assert!(cache.take_decrypt(b"c", b"", 1).is_some());
    }
}
