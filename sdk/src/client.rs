//! A typed async client of `kms.v1.KeyManagement`. It counts the calls it makes, so that
//! callers (and the demo) can show how many KMS round trips a job cost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proto::v1 as pb;
use proto::v1::key_management_client::KeyManagementClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::error::Error;
use crate::tls::ClientTls;

mod domains;
mod governance;
mod recovery;

pub use domains::{Disclosure, DomainKeys};
pub use governance::GrantSpec;

/// An encryption context. Stored and logged in clear: never PHI.
pub type Context = BTreeMap<String, String>;

/// Options of a new key.
#[derive(Debug, Default, Clone)]
pub struct NewKey {
    /// Optional unique alias.
    pub alias: Option<String>,
    /// Optional description.
    pub description: String,
    /// Optional tags.
    pub tags: BTreeMap<String, String>,
}

/// A key's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key id.
    pub key_id: String,
    /// The alias, if any.
    pub alias: Option<String>,
    /// The description.
    pub description: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// `enabled` or `disabled`.
    pub state: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// The version used for new encryption.
    pub primary_version: u32,
    /// The algorithm.
    pub algorithm: String,
    /// Versions below this one no longer decrypt.
    pub min_decryption_version: u32,
    /// Every version, oldest first.
    pub versions: Vec<VersionInfo>,
    /// Rotation period in seconds (0: none).
    pub rotation_period_seconds: u64,
    /// Encryptions allowed per version.
    pub usage_limit: u64,
    /// When a pending deletion falls due (seconds since the Unix epoch).
    pub deletion_due_at: Option<i64>,
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// The version number.
    pub version: u32,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// `primary`, `enabled` or `retired`.
    pub state: String,
    /// Encryptions reserved under this version (an upper bound of those performed).
    pub usage: u64,
}

/// A page of keys.
#[derive(Debug, Clone)]
pub struct KeyPage {
    /// The keys.
    pub keys: Vec<KeyInfo>,
    /// Pass to the next call; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// A data key. The plaintext is zeroized on drop; the type is neither `Clone` nor printable.
pub struct DataKey {
    /// The master key.
    pub key_id: String,
    /// Its version.
    pub key_version: u32,
    /// The 32-byte plaintext data key.
    pub plaintext: Zeroizing<[u8; 32]>,
    /// The wrapped data key blob.
    pub blob: Vec<u8>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .field("plaintext", &"<redacted>")
            .finish()
    }
}

/// A blob made by the server.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The master key.
    pub key_id: String,
    /// Its version.
    pub key_version: u32,
    /// The blob.
    pub blob: Vec<u8>,
}

/// A decrypted blob; the plaintext is zeroized on drop.
pub struct Opened {
    /// The master key.
    pub key_id: String,
    /// Its version.
    pub key_version: u32,
    /// The plaintext.
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .field("plaintext", &"<redacted>")
            .finish()
    }
}

/// One item of [`KmsClient::batch_re_encrypt`].
#[derive(Debug, Clone)]
pub struct ReEncryptItem {
    /// The blob to move.
    pub blob: Vec<u8>,
    /// The context it is bound to.
    pub source_context: Context,
    /// The key to move it to (id or alias).
    pub destination_key: String,
    /// The context to bind it to.
    pub destination_context: Context,
}

/// The client. Cloning is cheap and shares the connection and the call counter.
#[derive(Clone)]
pub struct KmsClient {
    inner: KeyManagementClient<Channel>,
    calls: Arc<AtomicU64>,
}

impl KmsClient {
    /// Connects to `endpoint`, e.g. `https://127.0.0.1:50051`, over mutual TLS 1.3 with the
    /// identity `tls`. Only `https://` endpoints are accepted: there is no cleartext mode.
    pub async fn connect(endpoint: &str, tls: &ClientTls) -> Result<Self, Error> {
        Ok(Self::from_channel(tls.channel(endpoint).await?))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        KmsClient {
            inner: KeyManagementClient::new(channel),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many RPCs this client (and its clones) made.
    pub fn calls_made(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn rpc(&self) -> KeyManagementClient<Channel> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.clone()
    }

    /// Creates an AES-256 master key.
    pub async fn create_key(&self, new: NewKey) -> Result<KeyInfo, Error> {
        let request = pb::CreateKeyRequest {
            alias: new.alias.unwrap_or_default(),
            description: new.description,
            tags: new.tags.into_iter().collect(),
        };
        Ok(key_info(self.rpc().create_key(request).await?.into_inner()))
    }

    /// Describes a key by id or alias.
    pub async fn describe_key(&self, key: &str) -> Result<KeyInfo, Error> {
        let request = pb::DescribeKeyRequest {
            key: key.to_string(),
        };
        Ok(key_info(
            self.rpc().describe_key(request).await?.into_inner(),
        ))
    }

    /// One page of keys; `page_size` 0 means the server's default.
    pub async fn list_keys(
        &self,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<KeyPage, Error> {
        let request = pb::ListKeysRequest {
            page_size,
            page_token: page_token.unwrap_or_default().to_string(),
        };
        let r = self.rpc().list_keys(request).await?.into_inner();
        Ok(KeyPage {
            keys: r.keys.into_iter().map(key_info).collect(),
            next_page_token: Some(r.next_page_token).filter(|t| !t.is_empty()),
        })
    }

    /// A fresh data key, plaintext and wrapped.
    pub async fn generate_data_key(&self, key: &str, context: &Context) -> Result<DataKey, Error> {
        let request = pb::GenerateDataKeyRequest {
            key: key.to_string(),
            encryption_context: to_map(context),
        };
        let r = self.rpc().generate_data_key(request).await?.into_inner();
        let plaintext = Zeroizing::new(r.plaintext);
        let mut key_bytes = Zeroizing::new([0u8; 32]);
        if plaintext.len() != 32 {
            return Err(Error::Protocol("data key is not 32 bytes"));
        }
        key_bytes.copy_from_slice(&plaintext);
        Ok(DataKey {
            key_id: r.key_id,
            key_version: r.key_version,
            plaintext: key_bytes,
            blob: r.ciphertext_blob,
        })
    }

    /// A fresh data key, wrapped only.
    pub async fn generate_data_key_without_plaintext(
        &self,
        key: &str,
        context: &Context,
    ) -> Result<Sealed, Error> {
        let request = pb::GenerateDataKeyRequest {
            key: key.to_string(),
            encryption_context: to_map(context),
        };
        let r = self
            .rpc()
            .generate_data_key_without_plaintext(request)
            .await?
            .into_inner();
        Ok(Sealed {
            key_id: r.key_id,
            key_version: r.key_version,
            blob: r.ciphertext_blob,
        })
    }

    /// Encrypts at most 4 KiB directly under the master key.
    pub async fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        context: &Context,
    ) -> Result<Sealed, Error> {
        let request = pb::EncryptRequest {
            key: key.to_string(),
            plaintext: plaintext.to_vec(),
            encryption_context: to_map(context),
        };
        let r = self.rpc().encrypt(request).await?.into_inner();
        Ok(Sealed {
            key_id: r.key_id,
            key_version: r.key_version,
            blob: r.ciphertext_blob,
        })
    }

    /// Decrypts a blob; `key`, when given, must be the blob's key.
    pub async fn decrypt(
        &self,
        blob: &[u8],
        context: &Context,
        key: Option<&str>,
    ) -> Result<Opened, Error> {
        let request = pb::DecryptRequest {
            ciphertext_blob: blob.to_vec(),
            encryption_context: to_map(context),
            key: key.unwrap_or_default().to_string(),
        };
        let r = self.rpc().decrypt(request).await?.into_inner();
        Ok(Opened {
            key_id: r.key_id,
            key_version: r.key_version,
            plaintext: Zeroizing::new(r.plaintext),
        })
    }

    /// Moves a blob to another key and context without the plaintext leaving the server.
    pub async fn re_encrypt(
        &self,
        blob: &[u8],
        source_context: &Context,
        destination_key: &str,
        destination_context: &Context,
    ) -> Result<Sealed, Error> {
        let request = pb::ReEncryptRequest {
            ciphertext_blob: blob.to_vec(),
            source_encryption_context: to_map(source_context),
            source_key: String::new(),
            destination_key: destination_key.to_string(),
            destination_encryption_context: to_map(destination_context),
        };
        let r = self.rpc().re_encrypt(request).await?.into_inner();
        Ok(Sealed {
            key_id: r.key_id,
            key_version: r.key_version,
            blob: r.ciphertext_blob,
        })
    }

    /// Enables a key.
    pub async fn enable_key(&self, key: &str) -> Result<KeyInfo, Error> {
        Ok(key_info(
            self.rpc().enable_key(key_request(key)).await?.into_inner(),
        ))
    }

    /// Disables a key: it encrypts and decrypts nothing until enabled again.
    pub async fn disable_key(&self, key: &str) -> Result<KeyInfo, Error> {
        Ok(key_info(
            self.rpc().disable_key(key_request(key)).await?.into_inner(),
        ))
    }

    /// Creates a new primary version of a key.
    pub async fn rotate_key(&self, key: &str) -> Result<KeyInfo, Error> {
        Ok(key_info(
            self.rpc().rotate_key(key_request(key)).await?.into_inner(),
        ))
    }

    /// Retires every version below `version`.
    pub async fn set_min_decryption_version(
        &self,
        key: &str,
        version: u32,
    ) -> Result<KeyInfo, Error> {
        let request = pb::SetMinDecryptionVersionRequest {
            key: key.to_string(),
            min_decryption_version: version,
        };
        Ok(key_info(
            self.rpc()
                .set_min_decryption_version(request)
                .await?
                .into_inner(),
        ))
    }

    /// Sets the rotation period (0, or at least 3600 s) and the usage limit per version
    /// (0: the server's maximum).
    pub async fn set_rotation_policy(
        &self,
        key: &str,
        period_seconds: u64,
        usage_limit: u64,
    ) -> Result<KeyInfo, Error> {
        let request = pb::SetRotationPolicyRequest {
            key: key.to_string(),
            rotation_period_seconds: period_seconds,
            usage_limit,
        };
        Ok(key_info(
            self.rpc().set_rotation_policy(request).await?.into_inner(),
        ))
    }

    /// Cancels a pending deletion; the key becomes disabled.
    pub async fn cancel_key_deletion(&self, key: &str) -> Result<KeyInfo, Error> {
        Ok(key_info(
            self.rpc()
                .cancel_key_deletion(key_request(key))
                .await?
                .into_inner(),
        ))
    }

    /// Decrypts up to 100 blobs in one call; one result per item, in order.
    pub async fn batch_decrypt(
        &self,
        items: &[(Vec<u8>, Context)],
    ) -> Result<Vec<Result<Opened, Error>>, Error> {
        let request = pb::BatchDecryptRequest {
            items: items
                .iter()
                .map(|(blob, context)| pb::DecryptRequest {
                    ciphertext_blob: blob.clone(),
                    encryption_context: to_map(context),
                    key: String::new(),
                })
                .collect(),
        };
        let results = self
            .rpc()
            .batch_decrypt(request)
            .await?
            .into_inner()
            .results;
        if results.len() != items.len() {
            return Err(Error::Protocol(
                "batch answered a different number of items",
            ));
        }
        Ok(results
            .into_iter()
            .map(|r| match (item_error(r.status), r.response) {
                (None, Some(d)) => Ok(Opened {
                    key_id: d.key_id,
                    key_version: d.key_version,
                    plaintext: Zeroizing::new(d.plaintext),
                }),
                (Some(e), _) => Err(e),
                (None, None) => Err(Error::Protocol("batch item without status or response")),
            })
            .collect())
    }

    /// Re-encrypts up to 100 blobs in one call; one result per item, in order.
    pub async fn batch_re_encrypt(
        &self,
        items: &[ReEncryptItem],
    ) -> Result<Vec<Result<Sealed, Error>>, Error> {
        let request = pb::BatchReEncryptRequest {
            items: items
                .iter()
                .map(|i| pb::ReEncryptRequest {
                    ciphertext_blob: i.blob.clone(),
                    source_encryption_context: to_map(&i.source_context),
                    source_key: String::new(),
                    destination_key: i.destination_key.clone(),
                    destination_encryption_context: to_map(&i.destination_context),
                })
                .collect(),
        };
        let results = self
            .rpc()
            .batch_re_encrypt(request)
            .await?
            .into_inner()
            .results;
        if results.len() != items.len() {
            return Err(Error::Protocol(
                "batch answered a different number of items",
            ));
        }
        Ok(results
            .into_iter()
            .map(|r| match (item_error(r.status), r.response) {
                (None, Some(s)) => Ok(Sealed {
                    key_id: s.key_id,
                    key_version: s.key_version,
                    blob: s.ciphertext_blob,
                }),
                (Some(e), _) => Err(e),
                (None, None) => Err(Error::Protocol("batch item without status or response")),
            })
            .collect())
    }

    /// A no-op round trip.
    pub async fn ping(&self) -> Result<(), Error> {
        self.rpc().ping(pb::PingRequest {}).await?;
        Ok(())
    }
}

/// The error of a batch item, or `None` when it succeeded.
fn item_error(status: Option<pb::ItemStatus>) -> Option<Error> {
    let status = status?;
    if status.code == 0 {
        return None;
    }
    Some(Error::Rpc {
        code: tonic::Code::from_i32(status.code),
        message: status.message,
    })
}

fn key_request(key: &str) -> pb::KeyRequest {
    pb::KeyRequest {
        key: key.to_string(),
    }
}

fn to_map(context: &Context) -> std::collections::HashMap<String, String> {
    context
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn key_info(m: pb::KeyMetadata) -> KeyInfo {
    let state = match pb::KeyState::try_from(m.state) {
        Ok(pb::KeyState::Enabled) => "enabled",
        Ok(pb::KeyState::Disabled) => "disabled",
        Ok(pb::KeyState::PendingDeletion) => "pending_deletion",
        Ok(pb::KeyState::Destroyed) => "destroyed",
        _ => "unknown",
    };
    KeyInfo {
        key_id: m.key_id,
        alias: Some(m.alias).filter(|a| !a.is_empty()),
        description: m.description,
        tags: m.tags.into_iter().collect(),
        state: state.to_string(),
        created_at: m.created_at,
        primary_version: m.primary_version,
        algorithm: m.algorithm,
        min_decryption_version: m.min_decryption_version,
        versions: m
            .versions
            .into_iter()
            .map(|v| VersionInfo {
                version: v.version,
                created_at: v.created_at,
                state: v.state,
                usage: v.usage,
            })
            .collect(),
        rotation_period_seconds: m.rotation_period_seconds,
        usage_limit: m.usage_limit,
        deletion_due_at: Some(m.deletion_due_at).filter(|t| *t != 0),
    }
}
