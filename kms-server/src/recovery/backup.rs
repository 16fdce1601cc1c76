//! The backup file: every master key version wrapped under the recovery key (RFC 5649), the
//! store's key metadata, and the ceremony's manifest (threshold, custodians, share
//! commitments, key-check value), authenticated by an HMAC-SHA256 under a key derived from
//! the recovery key.
//!
//! Layout: one header line `KMS-RECOVERY-BACKUP v1 mac=<64 hex>`, a newline, then the body
//! (JSON). The MAC covers a domain label and the body bytes exactly as written, so any edit of
//! the body or the MAC is detected; an edit of the header's fixed text makes it unreadable.

use serde::{Deserialize, Serialize};

use crate::error::KmsError;

/// The first bytes of every backup file.
const HEADER: &str = "KMS-RECOVERY-BACKUP v1 mac=";
/// The body's `format`.
pub const FORMAT: &str = "kms-recovery-backup-v1";
/// Largest backup file accepted.
pub const MAX_BACKUP_BYTES: usize = 64 << 20;

/// The ceremony a backup can be opened with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Ceremony id.
    pub ceremony_id: String,
    /// M.
    pub threshold: u32,
    /// N.
    pub shares: u32,
    /// Key-check value of the recovery key (hex).
    pub kcv: String,
    /// Each share: index, custodian, commitment.
    pub custodians: Vec<ShareEntry>,
}

/// One share of a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShareEntry {
    /// 1..=N.
    pub index: u32,
    /// The principal it was sealed to.
    pub custodian: String,
    /// `proto::share::commitment` (hex).
    pub commitment: String,
}

/// One key's metadata and versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The key id.
    pub key_id: String,
    /// Its alias, if any.
    pub alias: Option<String>,
    /// Free text.
    pub description: String,
    /// As stored (JSON).
    pub tags: String,
    /// State as stored.
    pub state: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Version new encryptions use.
    pub primary_version: i64,
    /// Lowest version that still decrypts.
    pub min_decryption_version: i64,
    /// Rotation period (0: none).
    pub rotation_period_secs: i64,
    /// Encryptions per version (0: server default).
    pub usage_limit: i64,
    /// When a pending deletion is due.
    pub deletion_due_at: Option<i64>,
    /// Every version.
    pub versions: Vec<VersionEntry>,
}

/// One key version.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionEntry {
    /// Version number.
    pub version: i64,
    /// State as stored.
    pub state: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Random tag in the HSM object id (same 64 bits, signed).
    pub hsm_tag: i64,
    /// Encryptions reserved so far.
    pub usage_reserved: i64,
    /// The version wrapped under the recovery key (hex); none for destroyed keys.
    pub wrapped: Option<String>,
}

/// The authenticated content of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// Always [`FORMAT`].
    pub format: String,
    /// Backup id.
    pub backup_id: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// The ceremony whose shares open it.
    pub ceremony: Manifest,
    /// Every key.
    pub keys: Vec<KeyEntry>,
}

/// A parsed backup file, not yet authenticated.
#[derive(Debug, Clone)]
pub struct Backup {
    /// The body as written (what the MAC covers).
    pub body_bytes: Vec<u8>,
    /// The body.
    pub body: Body,
    /// The MAC from the header.
    pub mac: [u8; 32],
}

fn malformed(reason: &'static str) -> KmsError {
    KmsError::InvalidArgument {
        field: "backup",
        reason,
    }
}

/// What the MAC is computed over.
pub fn mac_input(body: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(FORMAT.len() + 1 + body.len());
    data.extend_from_slice(FORMAT.as_bytes());
    data.push(b'\n');
    data.extend_from_slice(body);
    data
}

impl Body {
    /// The body's bytes as written into the file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, KmsError> {
        serde_json::to_vec_pretty(self).map_err(|_| KmsError::Internal {
            what: "backup body does not serialize",
        })
    }

    /// How many versions carry wrapped key material.
    pub fn wrapped_versions(&self) -> usize {
        self.keys
            .iter()
            .flat_map(|k| &k.versions)
            .filter(|v| v.wrapped.is_some())
            .count()
    }
}

/// The file's bytes for a body and its MAC.
pub fn encode(body_bytes: &[u8], mac: &[u8; 32]) -> Vec<u8> {
    let mut out = format!("{HEADER}{}\n", hex::encode(mac)).into_bytes();
    out.extend_from_slice(body_bytes);
    out
}

/// Parses a backup file. Authentication is the caller's: see [`mac_input`].
pub fn decode(file: &[u8]) -> Result<Backup, KmsError> {
    if file.len() > MAX_BACKUP_BYTES {
        return Err(KmsError::TooLarge {
            field: "backup",
            max: MAX_BACKUP_BYTES,
        });
    }
    let newline = file
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(malformed("not a backup file"))?;
    let header =
        std::str::from_utf8(&file[..newline]).map_err(|_| malformed("not a backup file"))?;
    let mac_hex = header
        .strip_prefix(HEADER)
        .ok_or(malformed("not a backup file"))?;
    let mac: [u8; 32] = hex::decode(mac_hex)
        .ok()
        .and_then(|m| m.try_into().ok())
        .ok_or(malformed("unreadable MAC"))?;
    let body_bytes = file[newline + 1..].to_vec();
    let body: Body =
        serde_json::from_slice(&body_bytes).map_err(|_| malformed("body is not a backup body"))?;
    if body.format != FORMAT {
        return Err(malformed("unknown backup format"));
    }
    let m = &body.ceremony;
    let indexes_ok = m.custodians.len() == m.shares as usize
        && m.custodians
            .iter()
            .enumerate()
            .all(|(i, c)| c.index as usize == i + 1);
    if m.threshold < 2 || m.threshold > m.shares || m.shares > 255 || !indexes_ok {
        return Err(malformed("manifest is inconsistent"));
    }
    Ok(Backup {
        body_bytes,
        body,
        mac,
    })
}
