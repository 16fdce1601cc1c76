//! The key service: the domain logic between the gRPC layer and the two ports.
//!
//! It validates requests, resolves key ids and aliases (cached: no database round trip on the
//! hot path), checks that a key is usable, builds the authenticated data of every blob, and
//! asks the HSM to do the cryptography. It speaks its own types; protobuf stays in `grpc`.
//!
//! **Several replicas on one store.** Each replica caches key records; a change made through
//! another replica reaches this cache in two ways: a notification (PostgreSQL `NOTIFY`, handed
//! to [`KeyService::invalidate`] by the server's listener, milliseconds after the commit), and
//! [`KeyService::sync`], run every [`KEY_SYNC_INTERVAL`], which compares one digest of every
//! key's revision with the last one seen and, when it moved, evicts every cached record whose
//! revision is behind (the only mechanism on SQLite, the fallback on PostgreSQL). A replica
//! whose last successful check started more than [`KEY_CACHE_MAX_AGE`] ago stops trusting its
//! cache and reads every key from the store (failing with `UNAVAILABLE` if it cannot): so a
//! change committed through any replica is honoured by every replica within that bound, by
//! requests that resolve the key after it (a request already past its checks may finish).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;
use zeroize::Zeroizing;

use crate::blob::{Blob, NewBlob};
use crate::error::KmsError;
use crate::hsm::{Hsm, HsmError, KeyRef};
use crate::store::{KeyRecord, KeyState, Store, VersionRecord};

/// Largest payload `Encrypt` accepts, in bytes.
pub const MAX_PLAINTEXT: usize = 4096;
/// Largest `ListKeys` page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// `ListKeys` page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// How often every replica checks that its cached key records are current
/// ([`KeyService::sync`]).
pub const KEY_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// The longest a replica serves key records from its cache after the start of its last
/// successful check; after that it reads every key from the store until a check succeeds
/// again. This is the documented bound on how stale another replica's view of a key can be.
pub const KEY_CACHE_MAX_AGE: Duration = Duration::from_secs(3);

/// How long past its due time a pending deletion waits before the scheduler destroys the key:
/// the clock skew between replicas this tolerates. A deletion can be cancelled only before its
/// due time, so no cancellation races the destruction of the HSM objects.
pub const DELETION_SKEW_SECS: i64 = 60;

/// Longest rotation period accepted: 100 years, in seconds.
pub const MAX_ROTATION_PERIOD_SECS: u64 = 100 * 365 * 86_400;

/// An encryption context: a string map bound to a blob as authenticated data.
pub type Context = BTreeMap<String, String>;

/// The source of "now". Injected so that tests can move time.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> i64;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// What a caller wants to do with a key, as checked against its grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyOp {
    /// `GenerateDataKey*`.
    GenerateDataKey,
    /// `Encrypt`.
    Encrypt,
    /// `Decrypt` and batch decrypt.
    Decrypt,
    /// `ReEncrypt`, on both the source and the destination key.
    ReEncrypt,
    /// `DescribeKey`.
    Describe,
    /// `Tokenize` in a tokenization domain sealed under the key (the server applies the
    /// transforms; the caller never holds the domain key).
    Tokenize,
    /// `GetDomainKey`: hold a domain's key and tokenize locally (whoever holds it can also
    /// reverse deterministic and FF1 tokens offline, unrecorded: grant it only to pipelines
    /// trusted like a re-identifier).
    DomainKey,
    /// `Detokenize` in a domain sealed under the key: each call a recorded disclosure.
    Reidentify,
}

impl KeyOp {
    /// The spelling used in grants.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOp::GenerateDataKey => "generate-data-key",
            KeyOp::Encrypt => "encrypt",
            KeyOp::Decrypt => "decrypt",
            KeyOp::ReEncrypt => "re-encrypt",
            KeyOp::Describe => "describe",
            KeyOp::Tokenize => "tokenize",
            KeyOp::DomainKey => "domain-key",
            KeyOp::Reidentify => "reidentify",
        }
    }
}

/// Decides whether the caller of a request may use a key. The service asks it once the key is
/// known (for `Decrypt`, after reading the blob's header) and before the HSM is touched.
pub trait KeyAccess: Send + Sync {
    /// `Ok` when `op` on `key_id` under `context` is allowed.
    fn check(&self, op: KeyOp, key_id: Uuid, context: &Context) -> Result<(), KmsError>;

    /// Whether a key that does not exist should look to this caller like one it may not use
    /// (key users), rather than `NOT_FOUND` (key managers): a caller learns nothing about
    /// keys outside its grants, not even whether they exist.
    fn hides_unknown_keys(&self) -> bool {
        false
    }
}

/// What a key user is told about a key it may not use, whether or not the key exists.
pub const NOT_GRANTED: KmsError = KmsError::PermissionDenied {
    reason: "no grant for this key and operation",
};

/// Allows everything: for the server's own jobs and for tests of the domain logic alone.
pub struct Unrestricted;

impl KeyAccess for Unrestricted {
    fn check(&self, _op: KeyOp, _key_id: Uuid, _context: &Context) -> Result<(), KmsError> {
        Ok(())
    }
}

/// What `CreateKey` asks for.
#[derive(Debug, Default, Clone)]
pub struct NewKey {
    /// Optional unique alias.
    pub alias: Option<String>,
    /// Free text.
    pub description: String,
    /// Labels.
    pub tags: BTreeMap<String, String>,
}

/// A data key: plaintext (zeroized on drop) and its blob.
pub struct DataKey {
    /// The master key.
    pub key_id: Uuid,
    /// Its version.
    pub key_version: u32,
    /// The plaintext data key.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The wrapped data key.
    pub blob: Vec<u8>,
}

/// A blob and the key version that made it.
pub struct Sealed {
    /// The master key.
    pub key_id: Uuid,
    /// Its version.
    pub key_version: u32,
    /// The blob.
    pub blob: Vec<u8>,
}

/// A decrypted blob.
pub struct Opened {
    /// The master key.
    pub key_id: Uuid,
    /// Its version.
    pub key_version: u32,
    /// The plaintext, zeroized on drop.
    pub plaintext: Zeroizing<Vec<u8>>,
}

/// The outcome of a re-encryption.
pub struct Resealed {
    /// Where the blob came from.
    pub source: KeyRef,
    /// The new blob's key version.
    pub destination: KeyRef,
    /// The new blob.
    pub blob: Vec<u8>,
}

/// Limits on AES-GCM encryptions per key version (random 96-bit nonces are safe for at most
/// 2^32 messages per key, NIST SP 800-38D §8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsagePolicy {
    /// The most any version may encrypt; a key's own limit can only be lower.
    pub max_per_version: u64,
    /// Encryptions reserved in the store per write. The usable count of a version is its limit
    /// rounded down to whole blocks.
    pub block: u64,
}

impl Default for UsagePolicy {
    fn default() -> Self {
        UsagePolicy {
            max_per_version: 4_000_000_000,
            block: 1000,
        }
    }
}

/// The in-memory window of reserved encryptions of one version: `next .. end`.
#[derive(Debug, Clone, Copy)]
struct Window {
    next: u64,
    end: u64,
}

/// The key service. Cheap to share behind an `Arc`.
pub struct KeyService {
    hsm: Hsm,
    store: Store,
    clock: Arc<dyn Clock>,
    usage_policy: UsagePolicy,
    windows: std::sync::Mutex<HashMap<KeyRef, Window>>,
    /// Serializes reservations and limit rotations, so concurrent requests that find a window
    /// empty reserve one block between them, not one each.
    reserving: tokio::sync::Mutex<()>,
    cache: RwLock<KeyCache>,
    by_alias: RwLock<HashMap<String, Uuid>>,
    /// When this service was made: the origin of `validated_ms`.
    epoch: Instant,
    /// Milliseconds after `epoch` at which the last successful [`KeyService::sync`] started.
    validated_ms: AtomicU64,
}

/// Cached key records, and what is known about newer ones.
#[derive(Default)]
struct KeyCache {
    by_id: HashMap<Uuid, Arc<KeyRecord>>,
    /// The newest revision each key is known to have (from a notification or a check): a
    /// record read from the store before a change is never cached after hearing of it.
    floor: HashMap<Uuid, i64>,
    /// The store's [`Store::key_digest`] at the last full comparison.
    digest: Option<(i64, i64)>,
}

/// What one [`KeyService::sync`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Whether the digest had moved (so every revision was compared).
    pub compared: bool,
    /// Cached records found behind the store and evicted.
    pub evicted: usize,
}

impl KeyService {
    /// Builds the service over its two ports.
    pub fn new(hsm: Hsm, store: Store, clock: Arc<dyn Clock>) -> Self {
        KeyService {
            hsm,
            store,
            clock,
            usage_policy: UsagePolicy::default(),
            windows: std::sync::Mutex::default(),
            reserving: tokio::sync::Mutex::new(()),
            cache: RwLock::default(),
            by_alias: RwLock::default(),
            // An empty cache is trivially current.
            epoch: Instant::now(),
            validated_ms: AtomicU64::new(0),
        }
    }

    /// Compares the cache with the store: one digest query and, when the digest moved since
    /// the last comparison, every key's revision; evicts each cached record that is behind.
    /// On success the cache counts as current as of this call's start (see
    /// [`KEY_CACHE_MAX_AGE`]).
    pub async fn sync(&self) -> Result<SyncOutcome, KmsError> {
        let started = self.epoch.elapsed();
        let digest = self.store.key_digest().await?;
        let seen = self.cache.read().unwrap_or_else(|p| p.into_inner()).digest;
        let mut outcome = SyncOutcome::default();
        if seen != Some(digest) {
            outcome.compared = true;
            for (key_id, revision) in self.store.key_revisions().await? {
                if self.invalidate(key_id, revision) {
                    outcome.evicted += 1;
                }
            }
            self.cache.write().unwrap_or_else(|p| p.into_inner()).digest = Some(digest);
        }
        let started_ms = u64::try_from(started.as_millis()).unwrap_or(u64::MAX);
        self.validated_ms.fetch_max(started_ms, Ordering::SeqCst);
        Ok(outcome)
    }

    /// Learns that `key_id` has reached `revision` in the store (from a notification or a
    /// check): a cached record behind it is evicted, and no older record is cached from now
    /// on. Returns whether a record was evicted.
    pub fn invalidate(&self, key_id: Uuid, revision: i64) -> bool {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        let floor = cache.floor.entry(key_id).or_insert(revision);
        *floor = (*floor).max(revision);
        let behind = cache
            .by_id
            .get(&key_id)
            .is_some_and(|cached| cached.revision < revision);
        if behind {
            cache.by_id.remove(&key_id);
            tracing::debug!(%key_id, revision, "cached key record was stale: evicted");
        }
        behind
    }

    /// Whether the cache was confirmed current less than [`KEY_CACHE_MAX_AGE`] ago.
    fn cache_is_current(&self) -> bool {
        let validated = Duration::from_millis(self.validated_ms.load(Ordering::SeqCst));
        self.epoch.elapsed().saturating_sub(validated) <= KEY_CACHE_MAX_AGE
    }

    /// Uses `policy` instead of the default usage limits.
    pub fn with_usage_policy(mut self, policy: UsagePolicy) -> Self {
        self.usage_policy = UsagePolicy {
            max_per_version: policy.max_per_version.max(1),
            block: policy.block.max(1),
        };
        self
    }

    /// Creates a master key: first its version 1 inside the HSM, then its metadata. If the
    /// metadata cannot be stored (a taken alias, a store failure) the HSM object is destroyed
    /// again, so no orphan key is left behind.
    pub async fn create_key(&self, new: NewKey) -> Result<KeyRecord, KmsError> {
        if let Some(alias) = &new.alias {
            validate_alias(alias)?;
        }
        validate_metadata(&new.description, &new.tags)?;
        let key_id = Uuid::new_v4();
        let created_at = self.clock.now_unix();
        let first = KeyRef {
            key_id,
            version: 1,
            tag: random_tag(),
        };
        let record = KeyRecord {
            key_id,
            alias: new.alias,
            description: new.description,
            tags: new.tags,
            state: KeyState::Enabled,
            created_at,
            primary_version: 1,
            min_decryption_version: 1,
            rotation_period_secs: 0,
            usage_limit: 0,
            deletion_due_at: None,
            versions: vec![VersionRecord {
                version: 1,
                created_at,
                hsm_tag: first.tag,
                usage_reserved: 0,
            }],
            revision: 0,
        };
        let handle = self
            .hsm
            .generate_master_key(first)
            .await
            .map_err(hsm_error)?;
        if let Err(e) = self.store.insert_key(&record).await {
            // A taken alias certainly stored nothing; any other failure may be a commit that
            // landed although its answer was lost (the store restarting): ask before
            // destroying, and keep the object if the store cannot say (an orphan is harmless,
            // a destroyed key that the store names is not).
            let stored = match e {
                KmsError::AliasExists => Some(false),
                _ => match self.store.key_by_id(key_id).await {
                    Ok(found) => Some(found.is_some()),
                    Err(_) => None,
                },
            };
            match stored {
                Some(true) => {
                    tracing::warn!(%key_id, "key stored although the store reported an error");
                }
                Some(false) => {
                    if let Err(undo) = self.hsm.destroy_master_key(first, handle).await {
                        tracing::error!(%key_id, error = %undo, "could not destroy the HSM object of a key whose metadata was not stored");
                    }
                    return Err(e);
                }
                None => {
                    tracing::warn!(%key_id, "key creation unconfirmed: its HSM object is kept as an orphan");
                    return Err(e);
                }
            }
        }
        tracing::info!(key_id = %record.key_id, "key created");
        self.remember(Arc::new(record.clone()));
        Ok(record)
    }

    /// The metadata of a key, by id or alias.
    /// Reads the store (not the cache), so usage counters and versions are current.
    pub async fn describe_key(
        &self,
        access: &dyn KeyAccess,
        key: &str,
    ) -> Result<KeyRecord, KmsError> {
        let record = self.resolve_for(access, key).await?;
        access.check(KeyOp::Describe, record.key_id, &Context::new())?;
        self.reload(record.key_id).await
    }

    /// One page of keys. `page_token` is empty or the token of the previous page.
    pub async fn list_keys(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<KeyRecord>, String), KmsError> {
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            _ => {
                return Err(KmsError::InvalidArgument {
                    field: "page_size",
                    reason: "at most 1000",
                })
            }
        };
        let after = parse_page_token(page_token)?;
        let page = self.store.list_keys(after, limit).await?;
        Ok((
            page.keys,
            page.next.map(format_page_token).unwrap_or_default(),
        ))
    }

    /// A fresh data key under the key's primary version.
    pub async fn generate_data_key(
        &self,
        access: &dyn KeyAccess,
        key: &str,
        context: &Context,
    ) -> Result<DataKey, KmsError> {
        let canonical_context = canonical(context)?;
        let record = self
            .usable_for(access, KeyOp::GenerateDataKey, key, context)
            .await?;
        let target = self.spend(record).await?;
        let new = NewBlob::new(target.key_id, target.version, &canonical_context);
        let (plaintext, nonce, sealed) = self
            .hsm
            .generate_data_key(target, new.aad.clone())
            .await
            .map_err(hsm_error)?;
        Ok(DataKey {
            key_id: target.key_id,
            key_version: target.version,
            plaintext,
            blob: new.finish(&nonce, &sealed),
        })
    }

    /// Encrypts at most [`MAX_PLAINTEXT`] bytes directly under the key's primary version.
    pub async fn encrypt(
        &self,
        access: &dyn KeyAccess,
        key: &str,
        plaintext: Zeroizing<Vec<u8>>,
        context: &Context,
    ) -> Result<Sealed, KmsError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(KmsError::TooLarge {
                field: "plaintext",
                max: MAX_PLAINTEXT,
            });
        }
        let canonical_context = canonical(context)?;
        let record = self
            .usable_for(access, KeyOp::Encrypt, key, context)
            .await?;
        let target = self.spend(record).await?;
        let new = NewBlob::new(target.key_id, target.version, &canonical_context);
        let (nonce, sealed) = self
            .hsm
            .seal(target, new.aad.clone(), plaintext)
            .await
            .map_err(hsm_error)?;
        Ok(Sealed {
            key_id: target.key_id,
            key_version: target.version,
            blob: new.finish(&nonce, &sealed),
        })
    }

    /// Decrypts a blob. `expected_key`, when given, must name the blob's key.
    pub async fn decrypt(
        &self,
        access: &dyn KeyAccess,
        blob: &[u8],
        context: &Context,
        expected_key: Option<&str>,
    ) -> Result<Opened, KmsError> {
        let canonical_context = canonical(context)?;
        let (parsed, source) = self
            .source_of(access, KeyOp::Decrypt, context, blob, expected_key)
            .await?;
        let plaintext = self
            .hsm
            .unseal(
                source,
                parsed.nonce,
                parsed.aad(&canonical_context),
                parsed.sealed.to_vec(),
            )
            .await
            .map_err(hsm_error)?;
        Ok(Opened {
            key_id: source.key_id,
            key_version: source.version,
            plaintext,
        })
    }

    /// Moves a blob to another key (or the same key's primary version) and context. The
    /// plaintext is opened and resealed in one HSM job and never leaves it.
    pub async fn re_encrypt(
        &self,
        access: &dyn KeyAccess,
        blob: &[u8],
        source_context: &Context,
        source_key: Option<&str>,
        destination_key: &str,
        destination_context: &Context,
    ) -> Result<Resealed, KmsError> {
        let source_canonical = canonical(source_context)?;
        let destination_canonical = canonical(destination_context)?;
        let (parsed, source) = self
            .source_of(access, KeyOp::ReEncrypt, source_context, blob, source_key)
            .await?;
        let destination = self
            .usable_for(
                access,
                KeyOp::ReEncrypt,
                destination_key,
                destination_context,
            )
            .await?;
        let destination = self.spend(destination).await?;
        let new = NewBlob::new(
            destination.key_id,
            destination.version,
            &destination_canonical,
        );
        let (nonce, sealed) = self
            .hsm
            .reseal(
                source,
                parsed.nonce,
                parsed.aad(&source_canonical),
                parsed.sealed.to_vec(),
                destination,
                new.aad.clone(),
            )
            .await
            .map_err(hsm_error)?;
        Ok(Resealed {
            source,
            destination,
            blob: new.finish(&nonce, &sealed),
        })
    }

    /// Parses a blob and checks that its key exists, is the expected one, and is usable.
    /// A blob naming an unknown key or version is an invalid ciphertext, like any other
    /// damaged blob.
    /// The caller's right to `op` on the blob's key is checked before the key's state, so a
    /// caller without a grant learns nothing about the key.
    async fn source_of<'b>(
        &self,
        access: &dyn KeyAccess,
        op: KeyOp,
        context: &Context,
        blob: &'b [u8],
        expected_key: Option<&str>,
    ) -> Result<(Blob<'b>, KeyRef), KmsError> {
        let parsed = Blob::parse(blob)?;
        let mut record = match self.resolve_id(parsed.key_id).await {
            Ok(record) => record,
            Err(KmsError::KeyNotFound) => return Err(KmsError::InvalidCiphertext),
            Err(other) => return Err(other),
        };
        if parsed.key_version > record.primary_version {
            // A version newer than the cached record knows: another replica may have rotated
            // the key a moment ago (and a client already holds a blob of the new version).
            // The store decides; a version it does not know either is an invalid blob.
            record = Arc::new(self.reload(record.key_id).await?);
        }
        access.check(op, record.key_id, context)?;
        if let Some(expected) = expected_key.filter(|k| !k.is_empty()) {
            match self.resolve(expected).await {
                Ok(named) if named.key_id == record.key_id => {}
                Ok(_) | Err(KmsError::KeyNotFound) => return Err(KmsError::InvalidCiphertext),
                Err(other) => return Err(other),
            }
        }
        ensure_usable(&record)?;
        let source = record
            .key_ref(parsed.key_version)
            .ok_or(KmsError::InvalidCiphertext)?;
        if parsed.key_version < record.min_decryption_version {
            return Err(KmsError::KeyVersionRetired);
        }
        Ok((parsed, source))
    }

    /// Enables or disables a key.
    pub async fn set_state(&self, key: &str, state: KeyState) -> Result<KeyRecord, KmsError> {
        let record = self.resolve(key).await?;
        if !self.store.set_state(record.key_id, state).await? {
            return Err(state_refusal(&self.reload(record.key_id).await?));
        }
        tracing::info!(key_id = %record.key_id, state = state.as_str(), "key state changed");
        self.reload(record.key_id).await
    }

    /// Creates version `primary + 1` inside the HSM and makes it primary. Of two concurrent
    /// rotations of one key exactly one takes effect (a conditional update in the store); the
    /// other's freshly generated HSM object is destroyed again and it returns the key as the
    /// winner left it.
    pub async fn rotate_key(&self, key: &str) -> Result<KeyRecord, KmsError> {
        let record = self.usable(key).await?;
        Ok(self.rotate_from(&record, record.primary_version).await?.0)
    }

    /// Rotates `record` if its primary is still `from`. Returns the key as it is afterwards
    /// and whether this call made the rotation.
    async fn rotate_from(
        &self,
        record: &KeyRecord,
        from: u32,
    ) -> Result<(KeyRecord, bool), KmsError> {
        let version = from.checked_add(1).ok_or(KmsError::InvalidArgument {
            field: "key",
            reason: "no more versions",
        })?;
        let new = VersionRecord {
            version,
            created_at: self.clock.now_unix(),
            hsm_tag: random_tag(),
            usage_reserved: 0,
        };
        let target = KeyRef {
            key_id: record.key_id,
            version,
            tag: new.hsm_tag,
        };
        let handle = self
            .hsm
            .generate_master_key(target)
            .await
            .map_err(hsm_error)?;
        let rotated = match self.store.rotate(record.key_id, from, &new).await {
            Ok(true) => true,
            Ok(false) => {
                // Lost the race: another rotation made this version.
                self.abandon(target, handle).await;
                false
            }
            // The commit may have landed although its answer was lost (the store restarting):
            // the object is destroyed only if the store names another one for this version,
            // and kept as an orphan if the store cannot say.
            Err(e) => match self.store.key_by_id(record.key_id).await {
                Ok(Some(now))
                    if now
                        .versions
                        .iter()
                        .any(|v| v.version == version && v.hsm_tag == new.hsm_tag) =>
                {
                    tracing::warn!(key_id = %record.key_id, version, "rotation stored although the store reported an error");
                    true
                }
                Ok(_) => {
                    self.abandon(target, handle).await;
                    return Err(e);
                }
                Err(_) => {
                    tracing::warn!(key_id = %record.key_id, version, "rotation unconfirmed: its HSM object is kept as an orphan");
                    return Err(e);
                }
            },
        };
        let after = self.reload(record.key_id).await?;
        if rotated {
            tracing::info!(key_id = %record.key_id, version, "key rotated");
        } else {
            // Disabled or scheduled for deletion since it was read: not rotated.
            ensure_usable(&after)?;
        }
        Ok((after, rotated))
    }

    /// Destroys the HSM object of a rotation that did not happen.
    async fn abandon(&self, target: KeyRef, handle: cryptoki::object::ObjectHandle) {
        if let Err(undo) = self.hsm.destroy_master_key(target, handle).await {
            tracing::error!(key_id = %target.key_id, error = %undo, "could not destroy the HSM object of an abandoned rotation");
        }
    }

    /// Rotates every enabled key whose primary version is older than its rotation period.
    /// Safe in several processes at once: each due key is rotated exactly once (the store's
    /// conditional update decides). Returns the keys this call rotated, with their new version.
    pub async fn rotate_due(&self) -> Result<Vec<(Uuid, u32)>, KmsError> {
        let now = self.clock.now_unix();
        let mut rotated = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.list_keys(after, MAX_PAGE_SIZE).await?;
            for key in &page.keys {
                if key.state != KeyState::Enabled || key.rotation_period_secs == 0 {
                    continue;
                }
                let primary_created = key
                    .versions
                    .iter()
                    .find(|v| v.version == key.primary_version)
                    .map(|v| v.created_at);
                let period = i64::try_from(key.rotation_period_secs).unwrap_or(i64::MAX);
                if primary_created.is_some_and(|created| now >= created.saturating_add(period)) {
                    match self.rotate_from(key, key.primary_version).await {
                        Ok((after_rotation, true)) => {
                            rotated.push((key.key_id, after_rotation.primary_version));
                        }
                        Ok((_, false)) => {}
                        // Its state changed since the listing: nothing is due any more.
                        Err(KmsError::KeyNotUsable { .. } | KmsError::KeyDestroyed) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            match page.next {
                Some(next) => after = next,
                None => return Ok(rotated),
            }
        }
    }

    /// When a deletion approved now with a waiting period of `days` (0: 30; else 7 ..= 365)
    /// falls due, on the service's clock. Until then the key behaves as disabled; the
    /// approval that decides it changes the key's state in its own transaction.
    pub fn deletion_due_at(&self, days: u32) -> Result<i64, KmsError> {
        let days = match days {
            0 => 30,
            7..=365 => days,
            _ => {
                return Err(KmsError::InvalidArgument {
                    field: "pending_window_days",
                    reason: "0 (30 days) or 7-365",
                })
            }
        };
        Ok(self
            .clock
            .now_unix()
            .saturating_add(i64::from(days) * 86_400))
    }

    /// Cancels a pending deletion; the key becomes disabled.
    pub async fn cancel_key_deletion(&self, key: &str) -> Result<KeyRecord, KmsError> {
        let record = self.resolve(key).await?;
        if !self
            .store
            .cancel_deletion(record.key_id, self.clock.now_unix())
            .await?
        {
            let current = self.reload(record.key_id).await?;
            return Err(match current.state {
                KeyState::Destroyed => KmsError::KeyDestroyed,
                KeyState::PendingDeletion => KmsError::Conflict {
                    reason: "deletion is due: it can no longer be cancelled",
                },
                _ => KmsError::InvalidArgument {
                    field: "key",
                    reason: "not pending deletion",
                },
            });
        }
        tracing::warn!(key_id = %record.key_id, "key deletion cancelled");
        self.reload(record.key_id).await
    }

    /// Destroys every key whose pending deletion has been due for [`DELETION_SKEW_SECS`] on the
    /// service's clock: all its HSM objects are destroyed and looked for again, then the key
    /// becomes a tombstone. Safe in several processes at once (destruction is idempotent; the
    /// state change is conditional). Cancellation is refused from the due time on, and this
    /// waits the margin past it, so a replica whose clock runs ahead by less than the margin
    /// never destroys the objects of a key another replica has just brought back.
    /// Returns the keys this call marked destroyed.
    pub async fn destroy_due(&self) -> Result<Vec<Uuid>, KmsError> {
        let now = self.clock.now_unix().saturating_sub(DELETION_SKEW_SECS);
        let mut destroyed = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.list_keys(after, MAX_PAGE_SIZE).await?;
            for key in &page.keys {
                if key.state != KeyState::PendingDeletion
                    || key.deletion_due_at.is_none_or(|due| due > now)
                {
                    continue;
                }
                let refs: Vec<KeyRef> = key
                    .versions
                    .iter()
                    .filter_map(|v| key.key_ref(v.version))
                    .collect();
                self.hsm
                    .destroy_key(refs, key.primary_version.saturating_add(1))
                    .await
                    .map_err(hsm_error)?;
                if self.store.mark_destroyed(key.key_id, now).await? {
                    tracing::warn!(key_id = %key.key_id, "key destroyed");
                    destroyed.push(key.key_id);
                }
                self.reload(key.key_id).await?;
            }
            match page.next {
                Some(next) => after = next,
                None => return Ok(destroyed),
            }
        }
    }

    /// Sets a key's rotation period (0, or at least one hour) and usage limit per version
    /// (0 for the server's maximum, else 1 ..= that maximum).
    pub async fn set_rotation_policy(
        &self,
        key: &str,
        period_secs: u64,
        usage_limit: u64,
    ) -> Result<KeyRecord, KmsError> {
        if period_secs != 0 && period_secs < 3600 {
            return Err(KmsError::InvalidArgument {
                field: "rotation_period_seconds",
                reason: "0 or at least 3600",
            });
        }
        if period_secs > MAX_ROTATION_PERIOD_SECS {
            return Err(KmsError::InvalidArgument {
                field: "rotation_period_seconds",
                reason: "at most 100 years",
            });
        }
        if usage_limit > self.usage_policy.max_per_version {
            return Err(KmsError::InvalidArgument {
                field: "usage_limit",
                reason: "above the server's maximum per version",
            });
        }
        let record = self.resolve(key).await?;
        if record.state == KeyState::Destroyed {
            return Err(KmsError::KeyDestroyed);
        }
        if !self
            .store
            .set_rotation_policy(record.key_id, period_secs, usage_limit)
            .await?
        {
            return Err(KmsError::KeyNotFound);
        }
        tracing::info!(key_id = %record.key_id, period_secs, usage_limit, "rotation policy set");
        self.reload(record.key_id).await
    }

    /// The usage limit in force for a key's versions.
    pub fn usage_limit_of(&self, record: &KeyRecord) -> u64 {
        match record.usage_limit {
            0 => self.usage_policy.max_per_version,
            n => n.min(self.usage_policy.max_per_version),
        }
    }

    /// Counts one encryption under the key's primary version and returns that version. When
    /// the version has no budget left, the key is rotated first (inline), so no version ever
    /// encrypts more than its limit.
    async fn spend(&self, mut record: Arc<KeyRecord>) -> Result<KeyRef, KmsError> {
        if let Some(target) = self.take_from_window(primary_of(&record)?) {
            return Ok(target);
        }
        let _reserving = self.reserving.lock().await;
        for _ in 0..8 {
            // Another request may have refilled the window or rotated while we waited.
            record = self.resolve_id(record.key_id).await?;
            let target = primary_of(&record)?;
            if let Some(target) = self.take_from_window(target) {
                return Ok(target);
            }
            let limit = self.usage_limit_of(&record);
            let block = self.usage_policy.block.min(limit);
            match self
                .store
                .reserve_usage(target.key_id, target.version, block, limit)
                .await?
            {
                Some(end) => {
                    let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
                    let w = windows.entry(target).or_insert(Window { next: end, end });
                    if w.next >= w.end {
                        *w = Window {
                            next: end - block,
                            end,
                        };
                    }
                }
                None => {
                    tracing::info!(key_id = %record.key_id, version = target.version, limit, "usage limit reached; rotating");
                    record = Arc::new(self.rotate_from(&record, target.version).await?.0);
                }
            }
        }
        Err(KmsError::Internal {
            what: "could not reserve key usage",
        })
    }

    /// Takes one encryption from the version's reserved window, if any is left.
    fn take_from_window(&self, target: KeyRef) -> Option<KeyRef> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = windows.get_mut(&target)?;
        if w.next < w.end {
            w.next += 1;
            Some(target)
        } else {
            None
        }
    }

    /// Sets the oldest version that still decrypts (1 ..= primary).
    pub async fn set_min_decryption_version(
        &self,
        key: &str,
        version: u32,
    ) -> Result<KeyRecord, KmsError> {
        let record = self.resolve(key).await?;
        if record.state == KeyState::Destroyed {
            return Err(KmsError::KeyDestroyed);
        }
        let out_of_range = KmsError::InvalidArgument {
            field: "min_decryption_version",
            reason: "must be 1 ..= the primary version",
        };
        if version == 0
            || !self
                .store
                .set_min_decryption_version(record.key_id, version)
                .await?
        {
            return Err(out_of_range);
        }
        tracing::info!(key_id = %record.key_id, version, "min_decryption_version set");
        self.reload(record.key_id).await
    }

    /// Reads a key from the store again and refreshes the cache (also after a change made in
    /// an approval's transaction).
    pub(crate) async fn reload(&self, key_id: Uuid) -> Result<KeyRecord, KmsError> {
        let record = self
            .store
            .key_by_id(key_id)
            .await?
            .ok_or(KmsError::KeyNotFound)?;
        self.remember(Arc::new(record.clone()));
        Ok(record)
    }

    /// The id of a key named by id or alias (it may be in any state).
    pub async fn key_id_of(&self, key: &str) -> Result<Uuid, KmsError> {
        Ok(self.resolve(key).await?.key_id)
    }

    async fn usable(&self, key: &str) -> Result<Arc<KeyRecord>, KmsError> {
        let record = self.resolve(key).await?;
        ensure_usable(&record)?;
        Ok(record)
    }

    /// Resolves `key` and checks the caller's right to `op` on it before its state, so that
    /// a caller without a grant cannot tell a missing, disabled or destroyed key from one it
    /// simply may not use.
    async fn usable_for(
        &self,
        access: &dyn KeyAccess,
        op: KeyOp,
        key: &str,
        context: &Context,
    ) -> Result<Arc<KeyRecord>, KmsError> {
        let record = self.resolve_for(access, key).await?;
        access.check(op, record.key_id, context)?;
        ensure_usable(&record)?;
        Ok(record)
    }

    async fn resolve_for(
        &self,
        access: &dyn KeyAccess,
        key: &str,
    ) -> Result<Arc<KeyRecord>, KmsError> {
        match self.resolve(key).await {
            Err(KmsError::KeyNotFound) if access.hides_unknown_keys() => Err(NOT_GRANTED),
            other => other,
        }
    }

    /// Resolves an id or alias, from the cache when possible.
    async fn resolve(&self, key: &str) -> Result<Arc<KeyRecord>, KmsError> {
        if key.is_empty() {
            return Err(KmsError::InvalidArgument {
                field: "key",
                reason: "a key id or alias is required",
            });
        }
        if let Ok(id) = Uuid::parse_str(key) {
            return self.resolve_id(id).await;
        }
        validate_alias(key)?;
        let cached = self
            .by_alias
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied();
        if let Some(id) = cached {
            return self.resolve_id(id).await;
        }
        let record = Arc::new(
            self.store
                .key_by_alias(key)
                .await?
                .ok_or(KmsError::KeyNotFound)?,
        );
        self.remember(Arc::clone(&record));
        Ok(record)
    }

    async fn resolve_id(&self, id: Uuid) -> Result<Arc<KeyRecord>, KmsError> {
        if self.cache_is_current() {
            if let Some(record) = self
                .cache
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .by_id
                .get(&id)
            {
                return Ok(Arc::clone(record));
            }
        }
        let record = Arc::new(
            self.store
                .key_by_id(id)
                .await?
                .ok_or(KmsError::KeyNotFound)?,
        );
        self.remember(Arc::clone(&record));
        Ok(record)
    }

    /// Caches `record` unless the cache already holds or knows of a newer revision (a record
    /// read just before a change must not replace what a notification or a check taught us).
    fn remember(&self, record: Arc<KeyRecord>) {
        if let Some(alias) = &record.alias {
            self.by_alias
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(alias.clone(), record.key_id);
        }
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        let floor = cache.floor.get(&record.key_id).copied();
        let cached = cache.by_id.get(&record.key_id).map(|c| c.revision);
        if floor.is_some_and(|f| record.revision < f) || cached.is_some_and(|c| record.revision < c)
        {
            return;
        }
        cache.by_id.insert(record.key_id, record);
    }
}

/// Why a state change was refused, given the key's current state.
fn state_refusal(current: &KeyRecord) -> KmsError {
    match current.state {
        KeyState::Destroyed => KmsError::KeyDestroyed,
        KeyState::PendingDeletion => KmsError::KeyNotUsable {
            state: "pending deletion",
        },
        _ => KmsError::Internal {
            what: "state change refused",
        },
    }
}

/// The HSM object of the key's primary version.
fn primary_of(record: &KeyRecord) -> Result<KeyRef, KmsError> {
    record
        .key_ref(record.primary_version)
        .ok_or(KmsError::Internal {
            what: "primary version missing from the store",
        })
}

/// A random, non-zero tag for a new HSM object.
fn random_tag() -> u64 {
    Uuid::new_v4().as_u64_pair().0 | 1
}

fn ensure_usable(record: &KeyRecord) -> Result<(), KmsError> {
    match record.state {
        KeyState::Enabled => Ok(()),
        KeyState::Disabled => Err(KmsError::KeyNotUsable { state: "disabled" }),
        KeyState::PendingDeletion => Err(KmsError::KeyNotUsable {
            state: "pending deletion",
        }),
        KeyState::Destroyed => Err(KmsError::KeyDestroyed),
    }
}

/// Validates and canonically encodes a context.
fn canonical(context: &Context) -> Result<Vec<u8>, KmsError> {
    proto::context::validate(context).map_err(|e| {
        let reason = match e {
            proto::context::ContextError::TooManyEntries => "at most 64 entries",
            proto::context::ContextError::BadKey => "keys must be 1-256 bytes",
            proto::context::ContextError::BadValue => "values must be at most 1024 bytes",
            proto::context::ContextError::Malformed => "malformed",
        };
        KmsError::InvalidArgument {
            field: "encryption_context",
            reason,
        }
    })?;
    Ok(proto::context::encode(context))
}

/// An alias is 1-64 characters of `[A-Za-z0-9_/-]` and does not parse as a UUID.
fn validate_alias(alias: &str) -> Result<(), KmsError> {
    let ok_chars = alias
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'/'));
    if alias.is_empty() || alias.len() > 64 || !ok_chars || Uuid::parse_str(alias).is_ok() {
        return Err(KmsError::InvalidArgument {
            field: "alias",
            reason: "1-64 characters of A-Z a-z 0-9 _ / -, not a UUID",
        });
    }
    Ok(())
}

fn validate_metadata(description: &str, tags: &BTreeMap<String, String>) -> Result<(), KmsError> {
    if description.chars().count() > 256 {
        return Err(KmsError::InvalidArgument {
            field: "description",
            reason: "at most 256 characters",
        });
    }
    if tags.len() > 32 {
        return Err(KmsError::InvalidArgument {
            field: "tags",
            reason: "at most 32 tags",
        });
    }
    if tags
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 128)
    {
        return Err(KmsError::InvalidArgument {
            field: "tags",
            reason: "keys 1-128 bytes, values at most 128 bytes",
        });
    }
    Ok(())
}

fn parse_page_token(token: &str) -> Result<i64, KmsError> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .strip_prefix('p')
        .and_then(|digits| digits.parse::<i64>().ok())
        .filter(|n| *n > 0)
        .ok_or(KmsError::InvalidArgument {
            field: "page_token",
            reason: "not a token from a previous page",
        })
}

fn format_page_token(position: i64) -> String {
    format!("p{position}")
}

/// Maps HSM failures into the domain: a failed tag check is an invalid ciphertext; a token
/// that keeps failing is unavailable; anything else is internal (details go to the log only).
pub(crate) fn hsm_error(e: HsmError) -> KmsError {
    match e {
        HsmError::NoSoPin => KmsError::Conflict {
            reason: "the HSM security officer PIN is not configured (hsm.so_pin_file)",
        },
        HsmError::AuthFailed => KmsError::InvalidCiphertext,
        HsmError::Unavailable(_)
        | HsmError::LoginRefused
        | HsmError::Module
        | HsmError::TokenNotFound(_) => {
            tracing::error!(error = %e, "HSM unavailable");
            KmsError::HsmUnavailable
        }
        HsmError::KeyMissing => {
            tracing::error!("a key version in the store has no object in the HSM");
            KmsError::Internal {
                what: "key object missing from the HSM",
            }
        }
        HsmError::SelfTest(_) | HsmError::Other(_) => {
            tracing::error!(error = %e, "HSM error");
            KmsError::Internal { what: "HSM error" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases() {
        assert!(validate_alias("patients/ehr-prod_1").is_ok());
        for bad in [
            "",
            "has space",
            "ü",
            &"a".repeat(65),
            "123e4567-e89b-12d3-a456-426614174000",
        ] {
            assert!(validate_alias(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn page_tokens() {
        assert_eq!(parse_page_token("").ok(), Some(0));
        assert_eq!(parse_page_token(&format_page_token(42)).ok(), Some(42));
        for bad in ["42", "p", "p-1", "p0", "px", "p99999999999999999999"] {
            assert!(parse_page_token(bad).is_err(), "{bad:?} accepted");
        }
    }
}
