//! Recovery of the master keys by M of N key custodians.
//!
//! - **Ceremony** ([`Recovery::init`], run by an approved request): a random 256-bit recovery
//!   key is split into N Shamir shares over GF(256) ([`shamir`]); each share is sealed to its
//!   custodian's age X25519 recipient inside an envelope naming the ceremony, M, N, the index,
//!   the custodian, the key-check value and the share's commitment
//!   ([`proto::share::ShareEnvelope`]). The recovery key enters the HSM as the trusted wrapping
//!   key (plus a MAC key derived from it) and is zeroized. Custodians confirm their share;
//!   closing the ceremony deletes the sealed shares from the store.
//! - **Backup** ([`Recovery::backup`], approved): see [`backup`].
//! - **Share sessions**: a restore (on an empty store and token) or a re-share opens one
//!   session, held in this process's memory only; custodians submit opened shares; when M
//!   valid ones are in, the key is rebuilt, checked against the key-check value before any
//!   use, used, and zeroized. A cancel forgets the shares and changes the nonce.
//!   **Pinned to one replica**: the store's `recovery_sessions` row (at most one) names the
//!   replica holding the session; the others refuse status, submissions and cancels with
//!   [`KmsError::SessionElsewhere`] naming it, and refuse to open a second session. The holder
//!   renews the row every [`SESSION_HEARTBEAT`]; a row not renewed for [`SESSION_LEASE_SECS`]
//!   belongs to a dead replica (its session died with it) and no longer blocks a new one. The
//!   M-th share runs the session only after deleting the row it still holds, so a session
//!   whose claim was taken over can never run as well as its successor.
//!
//! Secrets (the recovery key, shares) live in zeroizing buffers and reach neither the store
//! nor a log line: the store holds sealed shares, commitments and the key-check value.

pub mod backup;
pub mod shamir;

use std::sync::Arc;

use hkdf::Hkdf;
use proto::share::{commitment, ShareEnvelope};
use rand::RngCore;
use sha2::Sha256;
use sqlx::any::AnyRow;
use sqlx::Row;
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;
use uuid::Uuid;
use zeroize::Zeroizing;

use self::backup::{Backup, Body, KeyEntry, Manifest, ShareEntry, VersionEntry};
use crate::error::KmsError;
use crate::hsm::{Hsm, KeyRef, RecoveryKeys};
use crate::service::{hsm_error, Clock};
use crate::store::{db_error, Store};

/// Most custodians of one ceremony.
pub const MAX_CUSTODIANS: usize = shamir::MAX_SHARES;
/// Length of the recovery key.
const KEY_LEN: usize = 32;
/// Largest sealed share or recipient accepted.
const MAX_RECIPIENT_LEN: usize = 256;
/// A share session's claim in the store that its holder has not renewed for this long
/// belongs to a dead replica: its session died with it, and a new one may be opened.
pub const SESSION_LEASE_SECS: i64 = 30;
/// How often the holder of a share session renews its claim ([`Recovery::heartbeat`]).
pub const SESSION_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// A ceremony's shape: M and the N custodians, in share order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CeremonySpec {
    /// M.
    pub threshold: u32,
    /// The N custodians; share i goes to the i-th.
    pub custodians: Vec<String>,
}

/// A custodian's registered public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustodianKey {
    /// The custodian.
    pub principal: String,
    /// Their age X25519 recipient (`age1...`).
    pub recipient: String,
    /// Seconds since the Unix epoch.
    pub registered_at: i64,
}

/// A custodian's share, sealed to their key (only they can open it).
#[derive(Debug, Clone)]
pub struct SealedShare {
    /// The ceremony that made it.
    pub ceremony_id: String,
    /// Its index (1..=N).
    pub index: u32,
    /// An ASCII-armored age file.
    pub sealed: String,
}

/// What checking a backup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupCheck {
    /// The backup's id.
    pub backup_id: String,
    /// The ceremony whose recovery key wraps it.
    pub ceremony_id: String,
    /// Keys it describes.
    pub keys: u32,
    /// Key versions it holds wrapped (each one re-wrapped in the HSM and compared).
    pub key_versions: u32,
}

/// One share of a ceremony or a session: its index, its custodian and when it was confirmed
/// (0: not yet; always 0 in a session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareStatus {
    /// 1..=N.
    pub index: u32,
    /// The custodian.
    pub custodian: String,
    /// Seconds since the Unix epoch, 0 until confirmed.
    pub confirmed_at: i64,
}

/// A refused share submission, attributed to whoever submitted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The submitting principal.
    pub principal: String,
    /// The index they submitted.
    pub index: u32,
    /// Why it was refused (a fixed text, never share bytes).
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: i64,
}

/// The open share session.
#[derive(Debug, Clone)]
pub struct SessionStatus {
    /// Its id.
    pub session_id: String,
    /// `restore` or `reshare`.
    pub purpose: &'static str,
    /// Changes on every cancel; submissions must name the current one.
    pub nonce: String,
    /// The ceremony whose shares it takes.
    pub ceremony_id: String,
    /// M.
    pub threshold: u32,
    /// Shares accepted so far, and from whom.
    pub accepted: Vec<ShareStatus>,
    /// Refused submissions.
    pub rejected: Vec<Rejection>,
    /// Seconds since the Unix epoch.
    pub opened_at: i64,
}

/// The recovery domain and its open session.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The active ceremony; empty when there is none.
    pub ceremony_id: String,
    /// M.
    pub threshold: u32,
    /// N.
    pub share_count: u32,
    /// Key-check value of the recovery key (hex).
    pub kcv: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// 0 while the ceremony is open.
    pub closed_at: i64,
    /// Every share and its confirmation.
    pub shares: Vec<ShareStatus>,
    /// The open share session, if any.
    pub session: Option<SessionStatus>,
    /// Set by the submission that completed a session: what it did.
    pub completed: String,
}

/// An opened share submitted to the open session.
pub struct Submission {
    /// The session.
    pub session_id: String,
    /// The session's current nonce.
    pub nonce: String,
    /// The share's ceremony.
    pub ceremony_id: String,
    /// The share's index.
    pub index: u32,
    /// The custodian the share names.
    pub custodian: String,
    /// The share bytes. Secret.
    pub share: Zeroizing<Vec<u8>>,
}

/// What a share session is for.
enum Purpose {
    /// Rebuild the token and store from a backup.
    Restore(Box<Backup>),
    /// Hand the recovery key to new custodians.
    Reshare {
        spec: CeremonySpec,
        approval_id: String,
    },
}

impl Purpose {
    fn name(&self) -> &'static str {
        match self {
            Purpose::Restore(_) => "restore",
            Purpose::Reshare { .. } => "reshare",
        }
    }
}

struct Accepted {
    index: u32,
    custodian: String,
    value: Zeroizing<Vec<u8>>,
}

/// The one open share session.
struct Session {
    id: String,
    nonce: String,
    purpose: Purpose,
    manifest: Manifest,
    opened_at: i64,
    accepted: Vec<Accepted>,
    rejected: Vec<Rejection>,
}

/// The recovery domain of one deployment.
pub struct Recovery {
    hsm: Hsm,
    store: Store,
    clock: Arc<dyn Clock>,
    session: Mutex<Option<Session>>,
    /// This replica's instance name, recorded with the sessions it opens.
    replica: String,
    /// Random per process start: tells this process's claims from those of an earlier run of
    /// the same replica.
    holder: String,
}

/// The store's claim on the one share session.
struct Claim {
    replica: String,
    holder: String,
    heartbeat_at: i64,
}

/// HKDF-SHA256 of the recovery key for one purpose.
fn derive(recovery_key: &[u8], purpose: &str) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(None, recovery_key);
    let mut out = Zeroizing::new([0u8; 32]);
    let info = format!("kms-recovery-v1/{purpose}");
    // 32 bytes is far below HKDF-SHA256's limit of 8160.
    if hk.expand(info.as_bytes(), out.as_mut()).is_err() {
        unreachable!("HKDF output length is fixed and valid");
    }
    out
}

/// The key-check value of a recovery key: 16 bytes of a dedicated HKDF output, hex.
pub fn key_check_value(recovery_key: &[u8]) -> String {
    hex::encode(&derive(recovery_key, "kcv")[..16])
}

/// The key the backup MAC is computed with.
fn mac_key(recovery_key: &[u8]) -> Zeroizing<[u8; 32]> {
    derive(recovery_key, "backup-mac")
}

/// The HSM objects of a recovery key are named by its key-check value, which a re-share
/// keeps.
fn object_id(kcv: &str) -> Result<Vec<u8>, KmsError> {
    hex::decode(kcv).map_err(|_| KmsError::Internal {
        what: "stored key-check value is not hex",
    })
}

fn ct_eq_str(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn conflict(reason: &'static str) -> KmsError {
    KmsError::Conflict { reason }
}

fn fresh_nonce() -> String {
    let mut nonce = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    hex::encode(nonce)
}

fn shamir_error(e: shamir::ShamirError) -> KmsError {
    use shamir::ShamirError::*;
    let reason = match e {
        ThresholdTooLow => "threshold must be at least 2",
        ThresholdAboveShares => "threshold must not exceed the number of custodians",
        TooManyShares => "at most 255 custodians",
        EmptySecret => "empty secret",
        TooFewShares | DuplicateIndex | ZeroIndex | LengthMismatch | Library => {
            return KmsError::Internal {
                what: "secret sharing failed",
            }
        }
    };
    KmsError::InvalidArgument {
        field: "threshold",
        reason,
    }
}

/// Seals `plaintext` to an age X25519 recipient, ASCII-armored.
fn seal(recipient: &str, plaintext: &[u8]) -> Result<String, KmsError> {
    use std::io::Write;
    let recipient: age::x25519::Recipient = recipient.parse().map_err(|_| KmsError::Internal {
        what: "stored custodian recipient does not parse",
    })?;
    let sealing_failed = |_| KmsError::Internal {
        what: "sealing a share failed",
    };
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as _)).map_err(|_| {
            KmsError::Internal {
                what: "sealing a share failed",
            }
        })?;
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(sealing_failed)?;
    let mut writer = encryptor.wrap_output(armor).map_err(sealing_failed)?;
    writer.write_all(plaintext).map_err(sealing_failed)?;
    writer
        .finish()
        .and_then(|armor| armor.finish())
        .map_err(sealing_failed)?;
    String::from_utf8(out).map_err(|_| KmsError::Internal {
        what: "armored share is not text",
    })
}

impl Recovery {
    /// The recovery domain over this HSM and store; `replica` is this server's instance name
    /// (unique among the replicas sharing the store).
    pub fn new(hsm: Hsm, store: Store, clock: Arc<dyn Clock>, replica: String) -> Self {
        Recovery {
            hsm,
            store,
            clock,
            session: Mutex::new(None),
            replica,
            holder: Uuid::new_v4().to_string(),
        }
    }

    /// The claim on the share session, if a row exists.
    async fn claim(&self) -> Result<Option<Claim>, KmsError> {
        let row = sqlx::query(
            "SELECT replica, holder, heartbeat_at FROM recovery_sessions WHERE slot = 1",
        )
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_error)?;
        row.map(|row| {
            Ok(Claim {
                replica: row.try_get("replica").map_err(db_error)?,
                holder: row.try_get("holder").map_err(db_error)?,
                heartbeat_at: row.try_get("heartbeat_at").map_err(db_error)?,
            })
        })
        .transpose()
    }

    /// Whether `claim` is held by another live process: renewed within the lease, and not an
    /// earlier run of this replica (whose session died when it restarted).
    fn held_elsewhere(&self, claim: &Claim) -> bool {
        let earlier_run_of_this_replica = claim.replica == self.replica;
        claim.holder != self.holder
            && !earlier_run_of_this_replica
            && claim.heartbeat_at >= self.clock.now_unix() - SESSION_LEASE_SECS
    }

    /// Refuses with [`KmsError::SessionElsewhere`] when another replica holds the session.
    async fn refuse_if_elsewhere(&self) -> Result<(), KmsError> {
        match self.claim().await? {
            Some(claim) if self.held_elsewhere(&claim) => Err(KmsError::SessionElsewhere {
                replica: claim.replica,
            }),
            _ => Ok(()),
        }
    }

    /// Records in the store that this replica holds session `session_id`. Claims of dead
    /// holders (lease expired), of an earlier run of this replica and of this process (left by
    /// a completion whose release failed: the caller holds the session lock and has no
    /// session) are cleared first; a live claim of another replica refuses.
    async fn take_claim(&self, session_id: &str, purpose: &str) -> Result<(), KmsError> {
        let now = self.clock.now_unix();
        let mut tx = self.store.pool().begin().await.map_err(db_error)?;
        let cleared = sqlx::query(
            "DELETE FROM recovery_sessions WHERE heartbeat_at < $1 OR replica = $2 OR holder = $3",
        )
        .bind(now - SESSION_LEASE_SECS)
        .bind(self.replica.as_str())
        .bind(self.holder.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if cleared.rows_affected() > 0 {
            tracing::warn!("recovery: cleared the claim of a share session whose holder is gone");
        }
        let inserted = sqlx::query(
            "INSERT INTO recovery_sessions (slot, session_id, purpose, replica, holder, opened_at, \
             heartbeat_at) VALUES (1, $1, $2, $3, $4, $5, $6) ON CONFLICT (slot) DO NOTHING",
        )
        .bind(session_id)
        .bind(purpose)
        .bind(self.replica.as_str())
        .bind(self.holder.as_str())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if inserted.rows_affected() != 1 {
            drop(tx);
            return Err(match self.claim().await? {
                Some(claim) => KmsError::SessionElsewhere {
                    replica: claim.replica,
                },
                None => conflict("another replica opened a recovery session at the same time"),
            });
        }
        tx.commit().await.map_err(db_error)
    }

    /// Deletes this process's claim on `session_id`. `false` when it no longer holds it (its
    /// claim expired and was cleared, so a session elsewhere may have replaced this one).
    async fn release_claim(&self, session_id: &str) -> Result<bool, KmsError> {
        let deleted =
            sqlx::query("DELETE FROM recovery_sessions WHERE holder = $1 AND session_id = $2")
                .bind(self.holder.as_str())
                .bind(session_id)
                .execute(self.store.pool())
                .await
                .map_err(db_error)?;
        Ok(deleted.rows_affected() == 1)
    }

    /// At shutdown: forgets the open share session (it dies with this process anyway) and
    /// deletes its claim, so that no other replica has to wait for the lease to expire.
    pub async fn shutdown(&self) {
        let mut guard = self.session.lock().await;
        if let Some(session) = guard.take() {
            tracing::warn!(session_id = %session.id, "recovery share session ends with this server");
            if let Err(e) = self.release_claim(&session.id).await {
                tracing::warn!(error = %e, "recovery session claim not released; it expires by itself");
            }
        }
    }

    /// Renews this process's claim on its open share session, if it has one (the server calls
    /// this every [`SESSION_HEARTBEAT`]). A session whose claim is gone (it expired while the
    /// store was unreachable and another replica may have opened a session since) is dropped:
    /// two sessions never run.
    pub async fn heartbeat(&self) -> Result<(), KmsError> {
        let mut guard = self.session.lock().await;
        let Some(session) = guard.as_ref() else {
            return Ok(());
        };
        let renewed = sqlx::query(
            "UPDATE recovery_sessions SET heartbeat_at = $1 WHERE holder = $2 AND session_id = $3",
        )
        .bind(self.clock.now_unix())
        .bind(self.holder.as_str())
        .bind(session.id.as_str())
        .execute(self.store.pool())
        .await
        .map_err(db_error)?;
        if renewed.rows_affected() != 1 {
            tracing::error!(
                session_id = %session.id,
                "recovery: this replica's claim on its share session is gone; session dropped"
            );
            *guard = None;
        }
        Ok(())
    }

    /// Registers (or replaces) `principal`'s custodian key.
    pub async fn register_custodian_key(
        &self,
        principal: &str,
        recipient: &str,
    ) -> Result<CustodianKey, KmsError> {
        let recipient = recipient.trim();
        if recipient.len() > MAX_RECIPIENT_LEN
            || recipient.parse::<age::x25519::Recipient>().is_err()
        {
            return Err(KmsError::InvalidArgument {
                field: "recipient",
                reason: "not an age X25519 recipient (age1...)",
            });
        }
        let now = self.clock.now_unix();
        let mut tx = self.store.pool().begin().await.map_err(db_error)?;
        sqlx::query("DELETE FROM custodian_keys WHERE principal = $1")
            .bind(principal)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query(
            "INSERT INTO custodian_keys (principal, recipient, registered_at) VALUES ($1, $2, $3)",
        )
        .bind(principal)
        .bind(recipient)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(CustodianKey {
            principal: principal.to_owned(),
            recipient: recipient.to_owned(),
            registered_at: now,
        })
    }

    /// Every registered custodian key.
    pub async fn custodian_keys(&self) -> Result<Vec<CustodianKey>, KmsError> {
        sqlx::query(
            "SELECT principal, recipient, registered_at FROM custodian_keys ORDER BY principal",
        )
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?
        .iter()
        .map(|row| {
            Ok(CustodianKey {
                principal: row.try_get("principal").map_err(db_error)?,
                recipient: row.try_get("recipient").map_err(db_error)?,
                registered_at: row.try_get("registered_at").map_err(db_error)?,
            })
        })
        .collect()
    }

    /// Checks a ceremony's shape and custodians: 2 <= M <= N <= 255, distinct custodians, each
    /// holding the custodian role with a registered key. Returns their recipients in order.
    async fn check_spec(&self, spec: &CeremonySpec) -> Result<Vec<String>, KmsError> {
        let n = spec.custodians.len();
        if spec.threshold < 2 {
            return Err(shamir_error(shamir::ShamirError::ThresholdTooLow));
        }
        if n > MAX_CUSTODIANS {
            return Err(shamir_error(shamir::ShamirError::TooManyShares));
        }
        if spec.threshold as usize > n {
            return Err(shamir_error(shamir::ShamirError::ThresholdAboveShares));
        }
        let mut seen = std::collections::HashSet::new();
        let mut recipients = Vec::with_capacity(n);
        for custodian in &spec.custodians {
            if !seen.insert(custodian.as_str()) {
                return Err(KmsError::InvalidArgument {
                    field: "custodians",
                    reason: "a custodian is named twice",
                });
            }
            let bound = sqlx::query(
                "SELECT COUNT(*) AS n FROM role_bindings WHERE principal = $1 AND role = $2",
            )
            .bind(custodian.as_str())
            .bind(crate::authz::Role::Custodian.as_str())
            .fetch_one(self.store.pool())
            .await
            .map_err(db_error)?
            .try_get::<i64, _>("n")
            .map_err(db_error)?;
            if bound == 0 {
                return Err(KmsError::InvalidArgument {
                    field: "custodians",
                    reason: "every custodian must hold the custodian role",
                });
            }
            let recipient: Option<String> =
                sqlx::query("SELECT recipient FROM custodian_keys WHERE principal = $1")
                    .bind(custodian.as_str())
                    .fetch_optional(self.store.pool())
                    .await
                    .map_err(db_error)?
                    .map(|row| row.try_get("recipient"))
                    .transpose()
                    .map_err(db_error)?;
            recipients.push(recipient.ok_or(KmsError::InvalidArgument {
                field: "custodians",
                reason: "every custodian must have registered a custodian key",
            })?);
        }
        Ok(recipients)
    }

    /// Validates a proposed init (`rekey`: replace the current domain) before it is stored.
    pub async fn validate_init(&self, spec: &CeremonySpec, rekey: bool) -> Result<(), KmsError> {
        self.check_spec(spec).await?;
        if !self.hsm.has_so_pin() {
            return Err(hsm_error(crate::hsm::HsmError::NoSoPin));
        }
        match (self.active().await?, rekey) {
            (Some(_), false) => Err(conflict(
                "a recovery domain exists: propose a rekey or a re-share instead",
            )),
            (None, true) => Err(conflict("no recovery domain to rekey: propose an init")),
            _ => Ok(()),
        }
    }

    /// Validates a proposed re-share.
    pub async fn validate_reshare(&self, spec: &CeremonySpec) -> Result<(), KmsError> {
        self.check_spec(spec).await?;
        self.active()
            .await?
            .map(|_| ())
            .ok_or(conflict("no recovery domain to re-share"))
    }

    /// The active ceremony's manifest.
    async fn active(&self) -> Result<Option<ActiveCeremony>, KmsError> {
        let Some(row) = sqlx::query(
            "SELECT ceremony_id, threshold, share_count, kcv, created_at, closed_at \
             FROM recovery_ceremonies WHERE state = 'active'",
        )
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_error)?
        else {
            return Ok(None);
        };
        let ceremony_id: String = row.try_get("ceremony_id").map_err(db_error)?;
        let shares = sqlx::query(
            "SELECT share_index, custodian, commitment, confirmed_at, sealed IS NOT NULL AS sealed \
             FROM recovery_shares WHERE ceremony_id = $1 ORDER BY share_index",
        )
        .bind(ceremony_id.as_str())
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?;
        let shares = shares
            .iter()
            .map(|s| {
                Ok(ShareRow {
                    index: u32::try_from(s.try_get::<i64, _>("share_index").map_err(db_error)?)
                        .unwrap_or(0),
                    custodian: s.try_get("custodian").map_err(db_error)?,
                    commitment: s.try_get("commitment").map_err(db_error)?,
                    confirmed_at: s.try_get("confirmed_at").map_err(db_error)?,
                })
            })
            .collect::<Result<Vec<_>, KmsError>>()?;
        let int = |name: &str| -> Result<i64, KmsError> { row.try_get(name).map_err(db_error) };
        Ok(Some(ActiveCeremony {
            manifest: Manifest {
                ceremony_id,
                threshold: u32::try_from(int("threshold")?).unwrap_or(0),
                shares: u32::try_from(int("share_count")?).unwrap_or(0),
                kcv: row.try_get("kcv").map_err(db_error)?,
                custodians: shares
                    .iter()
                    .map(|s| ShareEntry {
                        index: s.index,
                        custodian: s.custodian.clone(),
                        commitment: s.commitment.clone(),
                    })
                    .collect(),
            },
            created_at: int("created_at")?,
            closed_at: int("closed_at")?,
            shares,
        }))
    }

    /// Runs an approved init or rekey: makes the recovery key, splits and seals it, installs
    /// it in the HSM, records the ceremony. Returns the ceremony id.
    pub async fn init(&self, spec: &CeremonySpec, approval_id: &str) -> Result<String, KmsError> {
        let recipients = self.check_spec(spec).await?;
        // The token's RNG and the operating system's, combined: neither alone decides the key.
        let mut key = self.hsm.random_key().await.map_err(hsm_error)?;
        let mut os = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(os.as_mut());
        for (k, o) in key.iter_mut().zip(os.iter()) {
            *k ^= o;
        }
        drop(os);
        let kcv = key_check_value(key.as_ref());
        let ceremony_id = Uuid::new_v4().to_string();
        let sealed = self.split_and_seal(&key, &ceremony_id, &kcv, spec, &recipients)?;
        self.hsm
            .install_recovery_key(RecoveryKeys {
                object_id: object_id(&kcv)?,
                wrap_key: key.clone(),
                mac_key: mac_key(key.as_ref()),
            })
            .await
            .map_err(hsm_error)?;
        drop(key);
        self.record_ceremony(&ceremony_id, spec, &kcv, &sealed, approval_id, true)
            .await?;
        self.hsm
            .retire_recovery_keys(object_id(&kcv)?)
            .await
            .map_err(hsm_error)?;
        tracing::warn!(%ceremony_id, threshold = spec.threshold, shares = spec.custodians.len(), "recovery ceremony created");
        Ok(ceremony_id)
    }

    /// Splits `key` for `spec` and seals each share. Returns (index, custodian, commitment,
    /// sealed) per share.
    fn split_and_seal(
        &self,
        key: &[u8; KEY_LEN],
        ceremony_id: &str,
        kcv: &str,
        spec: &CeremonySpec,
        recipients: &[String],
    ) -> Result<Vec<(u32, String, String, String)>, KmsError> {
        let shares = shamir::split(key, spec.threshold as usize, spec.custodians.len())
            .map_err(shamir_error)?;
        shares
            .iter()
            .zip(spec.custodians.iter().zip(recipients))
            .map(|(share, (custodian, recipient))| {
                let index = u32::from(share.index);
                let commit = hex::encode(commitment(ceremony_id, index, custodian, &share.value));
                let envelope = ShareEnvelope {
                    format: proto::share::FORMAT.to_owned(),
                    ceremony_id: ceremony_id.to_owned(),
                    threshold: spec.threshold,
                    shares: spec.custodians.len() as u32,
                    index,
                    custodian: custodian.clone(),
                    kcv: kcv.to_owned(),
                    commitment: commit.clone(),
                    share: Zeroizing::new(hex::encode(share.value.as_slice())),
                };
                let json = Zeroizing::new(serde_json::to_vec(&envelope).map_err(|_| {
                    KmsError::Internal {
                        what: "share envelope does not serialize",
                    }
                })?);
                Ok((index, custodian.clone(), commit, seal(recipient, &json)?))
            })
            .collect()
    }

    /// Stores a new active ceremony (superseding the old one) with its shares.
    async fn record_ceremony(
        &self,
        ceremony_id: &str,
        spec: &CeremonySpec,
        kcv: &str,
        shares: &[(u32, String, String, String)],
        approval_id: &str,
        keep_sealed: bool,
    ) -> Result<(), KmsError> {
        let mut tx = self.store.pool().begin().await.map_err(db_error)?;
        self.record_ceremony_in(
            &mut tx,
            ceremony_id,
            spec,
            kcv,
            shares,
            approval_id,
            keep_sealed,
        )
        .await?;
        tx.commit().await.map_err(db_error)
    }

    /// [`Recovery::record_ceremony`] inside the caller's transaction.
    #[allow(clippy::too_many_arguments)]
    async fn record_ceremony_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        ceremony_id: &str,
        spec: &CeremonySpec,
        kcv: &str,
        shares: &[(u32, String, String, String)],
        approval_id: &str,
        keep_sealed: bool,
    ) -> Result<(), KmsError> {
        let now = self.clock.now_unix();
        sqlx::query("UPDATE recovery_ceremonies SET state = 'superseded' WHERE state = 'active'")
            .execute(&mut **tx)
            .await
            .map_err(db_error)?;
        sqlx::query(
            "INSERT INTO recovery_ceremonies \
             (ceremony_id, threshold, share_count, kcv, state, created_at, closed_at, approval_id) \
             VALUES ($1, $2, $3, $4, 'active', $5, $6, $7)",
        )
        .bind(ceremony_id)
        .bind(i64::from(spec.threshold))
        .bind(spec.custodians.len() as i64)
        .bind(kcv)
        .bind(now)
        .bind(if keep_sealed { 0 } else { now })
        .bind(approval_id)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
        for (index, custodian, commit, sealed) in shares {
            sqlx::query(
                "INSERT INTO recovery_shares \
                 (ceremony_id, share_index, custodian, commitment, sealed, confirmed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(ceremony_id)
            .bind(i64::from(*index))
            .bind(custodian.as_str())
            .bind(commit.as_str())
            .bind(keep_sealed.then_some(sealed.as_str()))
            .bind(if keep_sealed { 0 } else { now })
            .execute(&mut **tx)
            .await
            .map_err(db_error)?;
        }
        Ok(())
    }

    /// The status of the recovery domain and of the open session.
    pub async fn status(&self) -> Result<Status, KmsError> {
        let mut status = Status::default();
        if let Some(active) = self.active().await? {
            status.ceremony_id = active.manifest.ceremony_id.clone();
            status.threshold = active.manifest.threshold;
            status.share_count = active.manifest.shares;
            status.kcv = active.manifest.kcv.clone();
            status.created_at = active.created_at;
            status.closed_at = active.closed_at;
            status.shares = active
                .shares
                .iter()
                .map(|s| ShareStatus {
                    index: s.index,
                    custodian: s.custodian.clone(),
                    confirmed_at: s.confirmed_at,
                })
                .collect();
        }
        let guard = self.session.lock().await;
        status.session = guard.as_ref().map(session_status);
        if status.session.is_none() {
            self.refuse_if_elsewhere().await?;
        }
        Ok(status)
    }

    /// `principal`'s sealed share of the active ceremony.
    pub async fn sealed_share(&self, principal: &str) -> Result<SealedShare, KmsError> {
        let row = sqlx::query(
            "SELECT s.ceremony_id, s.share_index, s.sealed FROM recovery_shares s \
             JOIN recovery_ceremonies c ON c.ceremony_id = s.ceremony_id \
             WHERE c.state = 'active' AND s.custodian = $1 AND s.sealed IS NOT NULL",
        )
        .bind(principal)
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_error)?
        .ok_or(KmsError::NotFound {
            what: "sealed share for this custodian (none, or the ceremony is closed)",
        })?;
        Ok(SealedShare {
            ceremony_id: row.try_get("ceremony_id").map_err(db_error)?,
            index: u32::try_from(row.try_get::<i64, _>("share_index").map_err(db_error)?)
                .unwrap_or(0),
            sealed: row.try_get("sealed").map_err(db_error)?,
        })
    }

    /// Records that `principal` opened share `index` and found `commitment` in it.
    pub async fn confirm_share(
        &self,
        principal: &str,
        ceremony_id: &str,
        index: u32,
        commitment_hex: &str,
    ) -> Result<Status, KmsError> {
        let active = self.active().await?.ok_or(conflict("no recovery domain"))?;
        if active.manifest.ceremony_id != ceremony_id {
            return Err(KmsError::InvalidArgument {
                field: "ceremony_id",
                reason: "share of another ceremony",
            });
        }
        let share =
            active
                .shares
                .iter()
                .find(|s| s.index == index)
                .ok_or(KmsError::InvalidArgument {
                    field: "index",
                    reason: "no such share in the ceremony",
                })?;
        if share.custodian != principal {
            return Err(KmsError::PermissionDenied {
                reason: "the share belongs to another custodian",
            });
        }
        if !ct_eq_str(&share.commitment, commitment_hex) {
            return Err(KmsError::InvalidArgument {
                field: "commitment",
                reason: "does not match the ceremony's commitment for this share",
            });
        }
        sqlx::query(
            "UPDATE recovery_shares SET confirmed_at = $1 \
             WHERE ceremony_id = $2 AND share_index = $3 AND confirmed_at = 0",
        )
        .bind(self.clock.now_unix())
        .bind(ceremony_id)
        .bind(i64::from(index))
        .execute(self.store.pool())
        .await
        .map_err(db_error)?;
        self.status().await
    }

    /// Closes the active ceremony once every share is confirmed: the sealed shares are
    /// deleted from the store.
    pub async fn close(&self, ceremony_id: &str) -> Result<Status, KmsError> {
        let active = self.active().await?.ok_or(conflict("no recovery domain"))?;
        if active.manifest.ceremony_id != ceremony_id {
            return Err(conflict("not the active ceremony"));
        }
        if active.closed_at != 0 {
            return Err(conflict("the ceremony is already closed"));
        }
        if active.shares.iter().any(|s| s.confirmed_at == 0) {
            return Err(conflict(
                "not every custodian has confirmed their share yet",
            ));
        }
        let mut tx = self.store.pool().begin().await.map_err(db_error)?;
        sqlx::query("UPDATE recovery_shares SET sealed = NULL WHERE ceremony_id = $1")
            .bind(ceremony_id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query("UPDATE recovery_ceremonies SET closed_at = $1 WHERE ceremony_id = $2")
            .bind(self.clock.now_unix())
            .bind(ceremony_id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        self.status().await
    }

    /// Runs an approved backup: wraps every master key version under the recovery key, adds
    /// the metadata and the manifest, MACs it all inside the HSM, stores the file. Returns the
    /// backup id.
    pub async fn backup(&self, approval_id: &str) -> Result<String, KmsError> {
        let active = self
            .active()
            .await?
            .ok_or(conflict("no recovery domain: run a recovery init first"))?;
        let mut keys = self.key_entries().await?;
        let refs: Vec<KeyRef> = keys
            .iter()
            .filter(|k| k.state != "destroyed")
            .flat_map(|k| k.versions.iter().map(move |v| key_ref(k, v)))
            .collect::<Result<_, _>>()?;
        let id = object_id(&active.manifest.kcv)?;
        let wrapped = self
            .hsm
            .wrap_for_backup(id.clone(), refs.clone())
            .await
            .map_err(hsm_error)?;
        let mut by_ref: std::collections::HashMap<KeyRef, Vec<u8>> =
            refs.into_iter().zip(wrapped).collect();
        for key in keys.iter_mut() {
            let key_id = key.key_id.clone();
            for version in key.versions.iter_mut() {
                let r = key_ref_of(&key_id, version)?;
                version.wrapped = by_ref.remove(&r).map(hex::encode);
            }
        }
        let backup_id = Uuid::new_v4().to_string();
        let body = Body {
            format: backup::FORMAT.to_owned(),
            backup_id: backup_id.clone(),
            created_at: self.clock.now_unix(),
            ceremony: active.manifest.clone(),
            keys,
        };
        let body_bytes = body.to_bytes()?;
        let mac = self
            .hsm
            .backup_mac(id, backup::mac_input(&body_bytes))
            .await
            .map_err(hsm_error)?;
        let file = backup::encode(&body_bytes, &mac);
        let content = String::from_utf8(file).map_err(|_| KmsError::Internal {
            what: "backup is not text",
        })?;
        sqlx::query(
            "INSERT INTO recovery_backups (backup_id, ceremony_id, created_at, approval_id, content) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(backup_id.as_str())
        .bind(active.manifest.ceremony_id.as_str())
        .bind(body.created_at)
        .bind(approval_id)
        .bind(content)
        .execute(self.store.pool())
        .await
        .map_err(db_error)?;
        // Success only for a backup that reads back intact and opens with this HSM's keys:
        // re-read from the store, MAC checked, every wrapped version compared.
        let checked = match self.backup_file(&backup_id).await {
            Ok(stored) => self.verify_backup(&stored).await,
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            tracing::error!(%backup_id, error = %e, "a backup just made does not verify; discarded");
            let _ = sqlx::query("DELETE FROM recovery_backups WHERE backup_id = $1")
                .bind(backup_id.as_str())
                .execute(self.store.pool())
                .await;
            return Err(KmsError::Internal {
                what: "a backup just made does not verify",
            });
        }
        tracing::warn!(%backup_id, versions = body.wrapped_versions(), "recovery backup made and verified");
        Ok(backup_id)
    }

    /// A stored backup file.
    pub async fn backup_file(&self, backup_id: &str) -> Result<Vec<u8>, KmsError> {
        let row = sqlx::query("SELECT content FROM recovery_backups WHERE backup_id = $1")
            .bind(backup_id)
            .fetch_optional(self.store.pool())
            .await
            .map_err(db_error)?
            .ok_or(KmsError::NotFound { what: "backup" })?;
        let content: String = row.try_get("content").map_err(db_error)?;
        Ok(content.into_bytes())
    }

    /// Checks a backup file against this deployment: its MAC under the current recovery key
    /// (inside the HSM), and one wrapped version re-wrapped inside the HSM and compared.
    pub async fn verify_backup(&self, file: &[u8]) -> Result<BackupCheck, KmsError> {
        let parsed = backup::decode(file)?;
        let active = self.active().await?.ok_or(conflict("no recovery domain"))?;
        if !ct_eq_str(&parsed.body.ceremony.kcv, &active.manifest.kcv) {
            return Err(KmsError::InvalidArgument {
                field: "backup",
                reason: "made under another recovery key",
            });
        }
        let id = object_id(&active.manifest.kcv)?;
        let authentic = self
            .hsm
            .verify_backup_mac(
                id.clone(),
                backup::mac_input(&parsed.body_bytes),
                parsed.mac,
            )
            .await
            .map_err(hsm_error)?;
        if !authentic {
            return Err(KmsError::InvalidArgument {
                field: "backup",
                reason: "fails authentication: the file was altered",
            });
        }
        // Every wrapped version, re-wrapped inside the HSM and compared: RFC 5649 wrapping is
        // deterministic, so equal bytes prove that each one unwraps, under this recovery key,
        // to the very key version this token holds (the wrapping key is wrap-only, so a trial
        // unwrap is not possible here; restore unwraps with the rebuilt key).
        let mut refs = Vec::new();
        let mut wrapped = Vec::new();
        for k in &parsed.body.keys {
            for v in &k.versions {
                if let Some(w) = &v.wrapped {
                    refs.push(key_ref(k, v)?);
                    wrapped.push(hex::decode(w).map_err(|_| KmsError::InvalidArgument {
                        field: "backup",
                        reason: "a wrapped key is not hex",
                    })?);
                }
            }
        }
        let same = match self.hsm.matches_wrapped(id, refs, wrapped).await {
            Ok(same) => same,
            Err(crate::hsm::HsmError::KeyMissing) => {
                return Err(KmsError::InvalidArgument {
                    field: "backup",
                    reason: "names a key version this HSM does not hold",
                })
            }
            Err(e) => return Err(hsm_error(e)),
        };
        if !same {
            return Err(KmsError::InvalidArgument {
                field: "backup",
                reason: "a wrapped key does not match the HSM's key",
            });
        }
        Ok(BackupCheck {
            backup_id: parsed.body.backup_id.clone(),
            ceremony_id: parsed.body.ceremony.ceremony_id.clone(),
            keys: parsed.body.keys.len() as u32,
            key_versions: parsed.body.wrapped_versions() as u32,
        })
    }

    /// Opens a restore session for `file` on an empty store and token.
    pub async fn begin_restore(&self, file: &[u8]) -> Result<Status, KmsError> {
        let parsed = backup::decode(file)?;
        if !self.hsm.has_so_pin() {
            return Err(hsm_error(crate::hsm::HsmError::NoSoPin));
        }
        self.ensure_empty().await?;
        let mut session = self.session.lock().await;
        if session.is_some() {
            return Err(conflict(
                "a recovery session is already open: finish or cancel it",
            ));
        }
        let id = Uuid::new_v4().to_string();
        self.take_claim(&id, "restore").await?;
        *session = Some(Session {
            id,
            nonce: fresh_nonce(),
            manifest: parsed.body.ceremony.clone(),
            purpose: Purpose::Restore(Box::new(parsed)),
            opened_at: self.clock.now_unix(),
            accepted: Vec::new(),
            rejected: Vec::new(),
        });
        drop(session);
        self.status().await
    }

    /// Opens the share session of an approved re-share. Returns its id.
    pub async fn open_reshare(
        &self,
        spec: &CeremonySpec,
        approval_id: &str,
    ) -> Result<String, KmsError> {
        self.check_spec(spec).await?;
        let active = self
            .active()
            .await?
            .ok_or(conflict("no recovery domain to re-share"))?;
        let mut session = self.session.lock().await;
        if session.is_some() {
            return Err(conflict(
                "a recovery session is already open: finish or cancel it",
            ));
        }
        let id = Uuid::new_v4().to_string();
        self.take_claim(&id, "reshare").await?;
        *session = Some(Session {
            id: id.clone(),
            nonce: fresh_nonce(),
            manifest: active.manifest,
            purpose: Purpose::Reshare {
                spec: spec.clone(),
                approval_id: approval_id.to_owned(),
            },
            opened_at: self.clock.now_unix(),
            accepted: Vec::new(),
            rejected: Vec::new(),
        });
        Ok(id)
    }

    /// Forgets the shares submitted to the session and gives it a new nonce.
    pub async fn cancel(&self, session_id: &str) -> Result<Status, KmsError> {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_none_or(|s| s.id != session_id) {
            self.refuse_if_elsewhere().await?;
        }
        let session = guard
            .as_mut()
            .filter(|s| s.id == session_id)
            .ok_or(KmsError::NotFound {
                what: "recovery session",
            })?;
        session.accepted.clear();
        session.nonce = fresh_nonce();
        tracing::warn!(
            session_id,
            "recovery session cancelled: submitted shares forgotten"
        );
        drop(guard);
        self.status().await
    }

    /// Takes one opened share from `principal`. Refusals are recorded in the session and
    /// attributed to the submitter. The M-th valid share completes the session.
    pub async fn submit_share(
        &self,
        principal: &str,
        request: &Submission,
    ) -> Result<Status, KmsError> {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_none_or(|s| s.id != request.session_id) {
            self.refuse_if_elsewhere().await?;
        }
        let session = guard
            .as_mut()
            .filter(|s| s.id == request.session_id)
            .ok_or(KmsError::NotFound {
                what: "recovery session",
            })?;
        if !ct_eq_str(&session.nonce, &request.nonce) {
            return Err(conflict(
                "the session's nonce changed (it was cancelled): read its status again",
            ));
        }
        if let Err(refusal) = check_share(session, principal, request) {
            tracing::warn!(
                principal,
                index = request.index,
                reason = %refusal,
                "recovery share refused"
            );
            session.rejected.push(Rejection {
                principal: principal.to_owned(),
                index: request.index,
                reason: refusal.to_string(),
                at: self.clock.now_unix(),
            });
            return Err(refusal);
        }
        session.accepted.push(Accepted {
            index: request.index,
            custodian: principal.to_owned(),
            value: request.share.clone(),
        });
        tracing::warn!(principal, index = request.index, "recovery share accepted");
        if session.accepted.len() < session.manifest.threshold as usize {
            let status = session_status(session);
            drop(guard);
            let mut full = self.status().await?;
            full.session = Some(status);
            return Ok(full);
        }
        // Consuming the claim is what lets this session run: if it expired (this replica
        // could not renew it) another session may exist, and this one must not run too. If
        // the store cannot be asked, the last share is handed back (it may be sent again).
        let session_id = session.id.clone();
        match self.release_claim(&session_id).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(%session_id, "recovery: share session's claim lost; not run");
                *guard = None;
                return Err(conflict(
                    "this replica's claim on the recovery session expired: open a new session",
                ));
            }
            Err(e) => {
                session.accepted.pop();
                return Err(e);
            }
        }
        // Complete: the session ends whatever the outcome; its shares are zeroized on drop.
        let Some(done) = guard.take() else {
            return Err(KmsError::Internal {
                what: "recovery session vanished",
            });
        };
        drop(guard);
        let completed = self.complete(done).await?;
        let mut status = self.status().await?;
        status.completed = completed;
        Ok(status)
    }

    async fn complete(&self, session: Session) -> Result<String, KmsError> {
        let shares: Vec<shamir::Share> = session
            .accepted
            .iter()
            .map(|a| shamir::Share {
                index: u8::try_from(a.index).unwrap_or(0),
                value: a.value.clone(),
            })
            .collect();
        let secret = shamir::combine(&shares).map_err(|_| KmsError::InvalidArgument {
            field: "share",
            reason: "the shares do not combine",
        })?;
        let key: Zeroizing<[u8; KEY_LEN]> =
            Zeroizing::new(secret.as_slice().try_into().map_err(|_| {
                KmsError::InvalidArgument {
                    field: "share",
                    reason: "the shares rebuild a key of the wrong length",
                }
            })?);
        drop(secret);
        // Checked before any use of the key.
        if !ct_eq_str(&key_check_value(key.as_ref()), &session.manifest.kcv) {
            tracing::error!(session_id = %session.id, "rebuilt recovery key fails its key-check value");
            return Err(KmsError::InvalidArgument {
                field: "share",
                reason: "the rebuilt key does not match the ceremony's key-check value",
            });
        }
        match session.purpose {
            Purpose::Restore(parsed) => self.restore(&key, &parsed, &session.id).await,
            Purpose::Reshare { spec, approval_id } => {
                let recipients = self.check_spec(&spec).await?;
                let ceremony_id = Uuid::new_v4().to_string();
                let sealed = self.split_and_seal(
                    &key,
                    &ceremony_id,
                    &session.manifest.kcv,
                    &spec,
                    &recipients,
                )?;
                self.record_ceremony(
                    &ceremony_id,
                    &spec,
                    &session.manifest.kcv,
                    &sealed,
                    &approval_id,
                    true,
                )
                .await?;
                tracing::warn!(%ceremony_id, old = %session.manifest.ceremony_id, "recovery key re-shared");
                Ok(format!(
                    "re-shared: ceremony {ceremony_id} ({} of {}) replaces {}; make a new backup",
                    spec.threshold,
                    spec.custodians.len(),
                    session.manifest.ceremony_id
                ))
            }
        }
    }

    /// Authenticates the backup with the rebuilt key, then puts the recovery key and every
    /// master key version into the (empty) token and the metadata into the (empty) store.
    async fn restore(
        &self,
        key: &Zeroizing<[u8; KEY_LEN]>,
        parsed: &Backup,
        session_id: &str,
    ) -> Result<String, KmsError> {
        let expected = {
            use hmac::{Hmac, Mac};
            let mac_key = mac_key(key.as_ref());
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(mac_key.as_ref()).map_err(|_| {
                    KmsError::Internal {
                        what: "HMAC key of wrong length",
                    }
                })?;
            mac.update(&backup::mac_input(&parsed.body_bytes));
            mac.verify_slice(&parsed.mac).is_ok()
        };
        if !expected {
            return Err(KmsError::InvalidArgument {
                field: "backup",
                reason: "fails authentication: the file was altered",
            });
        }
        self.ensure_empty().await?;
        let body = &parsed.body;
        let mut items = Vec::new();
        for k in &body.keys {
            for v in &k.versions {
                if let Some(w) = &v.wrapped {
                    let wrapped = hex::decode(w).map_err(|_| KmsError::InvalidArgument {
                        field: "backup",
                        reason: "a wrapped key is not hex",
                    })?;
                    items.push((key_ref(k, v)?, wrapped));
                }
            }
        }
        let kcv = &body.ceremony.kcv;
        self.hsm
            .install_recovery_key(RecoveryKeys {
                object_id: object_id(kcv)?,
                wrap_key: key.clone(),
                mac_key: mac_key(key.as_ref()),
            })
            .await
            .map_err(hsm_error)?;
        let refs: Vec<KeyRef> = items.iter().map(|(r, _)| *r).collect();
        self.hsm
            .unwrap_master_keys(key.clone(), items)
            .await
            .map_err(hsm_error)?;
        if let Err(e) = self.insert_metadata(body, session_id).await {
            // The commit may have landed although its answer was lost (the store restarting).
            // The transaction also inserts the ceremony, and the store was empty: the ceremony
            // row says whether it landed. Only a store that answers "not there" lets the
            // restored objects be destroyed; one that cannot say keeps them.
            match self.ceremony_count().await {
                Ok(0) => {
                    tracing::error!(error = %e, "restored keys could not be recorded; removing them from the token");
                    let _ = self.hsm.destroy_key(refs, 0).await;
                    return Err(e);
                }
                Ok(_) => {
                    tracing::warn!(error = %e, "restore recorded although the store reported an error");
                }
                Err(_) => {
                    tracing::error!(error = %e, "restore unconfirmed: the restored objects are kept in the token; list the keys once the store answers (none: empty the token and restore again)");
                    return Err(e);
                }
            }
        }
        tracing::warn!(backup_id = %body.backup_id, keys = body.keys.len(), "restore complete");
        Ok(format!(
            "restored {} keys ({} versions) from backup {}",
            body.keys.len(),
            body.wrapped_versions(),
            body.backup_id
        ))
    }

    async fn insert_metadata(&self, body: &Body, session_id: &str) -> Result<(), KmsError> {
        let mut tx = self.store.pool().begin().await.map_err(db_error)?;
        for k in &body.keys {
            sqlx::query(
                "INSERT INTO kms_keys (key_id, alias, description, tags, state, created_at, \
                 primary_version, min_decryption_version, rotation_period_secs, usage_limit, \
                 deletion_due_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(k.key_id.as_str())
            .bind(k.alias.clone())
            .bind(k.description.as_str())
            .bind(k.tags.as_str())
            .bind(k.state.as_str())
            .bind(k.created_at)
            .bind(k.primary_version)
            .bind(k.min_decryption_version)
            .bind(k.rotation_period_secs)
            .bind(k.usage_limit)
            .bind(k.deletion_due_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            for v in &k.versions {
                sqlx::query(
                    "INSERT INTO kms_key_versions (key_id, version, state, created_at, hsm_tag, \
                     usage_reserved) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(k.key_id.as_str())
                .bind(v.version)
                .bind(v.state.as_str())
                .bind(v.created_at)
                .bind(v.hsm_tag)
                .bind(v.usage_reserved)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
        }
        let m = &body.ceremony;
        let spec = CeremonySpec {
            threshold: m.threshold,
            custodians: m.custodians.iter().map(|c| c.custodian.clone()).collect(),
        };
        let shares: Vec<(u32, String, String, String)> = m
            .custodians
            .iter()
            .map(|c| {
                (
                    c.index,
                    c.custodian.clone(),
                    c.commitment.clone(),
                    String::new(),
                )
            })
            .collect();
        self.record_ceremony_in(
            &mut tx,
            &m.ceremony_id,
            &spec,
            &m.kcv,
            &shares,
            &format!("restore:{session_id}"),
            false,
        )
        .await?;
        tx.commit().await.map_err(db_error)
    }

    /// Refuses unless the store holds no key and no ceremony and the token no AES key.
    async fn ceremony_count(&self) -> Result<i64, KmsError> {
        sqlx::query("SELECT COUNT(*) AS n FROM recovery_ceremonies")
            .fetch_one(self.store.pool())
            .await
            .map_err(db_error)?
            .try_get::<i64, _>("n")
            .map_err(db_error)
    }

    async fn ensure_empty(&self) -> Result<(), KmsError> {
        let count = |sql: &'static str| async move {
            sqlx::query(sql)
                .fetch_one(self.store.pool())
                .await
                .map_err(db_error)?
                .try_get::<i64, _>("n")
                .map_err(db_error)
        };
        if count("SELECT COUNT(*) AS n FROM kms_keys").await? != 0
            || self.ceremony_count().await? != 0
        {
            return Err(conflict(
                "restore needs an empty store: this one holds keys or a recovery domain",
            ));
        }
        if self.hsm.holds_aes_keys().await.map_err(hsm_error)? {
            return Err(conflict(
                "restore needs an empty token: this one holds AES keys",
            ));
        }
        Ok(())
    }

    /// Every key's metadata and versions, from the store (wrapped material not yet added).
    async fn key_entries(&self) -> Result<Vec<KeyEntry>, KmsError> {
        let keys = sqlx::query(
            "SELECT key_id, alias, description, tags, state, created_at, primary_version, \
             min_decryption_version, rotation_period_secs, usage_limit, deletion_due_at \
             FROM kms_keys ORDER BY seq",
        )
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?;
        let versions = sqlx::query(
            "SELECT key_id, version, state, created_at, hsm_tag, usage_reserved \
             FROM kms_key_versions ORDER BY key_id, version",
        )
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?;
        let mut by_key: std::collections::HashMap<String, Vec<VersionEntry>> =
            std::collections::HashMap::new();
        for row in &versions {
            by_key
                .entry(row.try_get("key_id").map_err(db_error)?)
                .or_default()
                .push(version_entry(row)?);
        }
        keys.iter()
            .map(|row| {
                let key_id: String = row.try_get("key_id").map_err(db_error)?;
                Ok(KeyEntry {
                    versions: by_key.remove(&key_id).unwrap_or_default(),
                    key_id,
                    alias: row.try_get("alias").map_err(db_error)?,
                    description: row.try_get("description").map_err(db_error)?,
                    tags: row.try_get("tags").map_err(db_error)?,
                    state: row.try_get("state").map_err(db_error)?,
                    created_at: row.try_get("created_at").map_err(db_error)?,
                    primary_version: row.try_get("primary_version").map_err(db_error)?,
                    min_decryption_version: row
                        .try_get("min_decryption_version")
                        .map_err(db_error)?,
                    rotation_period_secs: row.try_get("rotation_period_secs").map_err(db_error)?,
                    usage_limit: row.try_get("usage_limit").map_err(db_error)?,
                    deletion_due_at: row.try_get("deletion_due_at").map_err(db_error)?,
                })
            })
            .collect()
    }
}

fn version_entry(row: &AnyRow) -> Result<VersionEntry, KmsError> {
    Ok(VersionEntry {
        version: row.try_get("version").map_err(db_error)?,
        state: row.try_get("state").map_err(db_error)?,
        created_at: row.try_get("created_at").map_err(db_error)?,
        hsm_tag: row.try_get("hsm_tag").map_err(db_error)?,
        usage_reserved: row.try_get("usage_reserved").map_err(db_error)?,
        wrapped: None,
    })
}

fn key_ref_of(key_id: &str, v: &VersionEntry) -> Result<KeyRef, KmsError> {
    let bad = || KmsError::InvalidArgument {
        field: "backup",
        reason: "a key id or version is malformed",
    };
    Ok(KeyRef {
        key_id: Uuid::parse_str(key_id).map_err(|_| bad())?,
        version: u32::try_from(v.version).map_err(|_| bad())?,
        // Stored as the same 64 bits, reinterpreted as signed for the database.
        tag: v.hsm_tag as u64,
    })
}

fn key_ref(k: &KeyEntry, v: &VersionEntry) -> Result<KeyRef, KmsError> {
    key_ref_of(&k.key_id, v)
}

struct ShareRow {
    index: u32,
    custodian: String,
    commitment: String,
    confirmed_at: i64,
}

struct ActiveCeremony {
    manifest: Manifest,
    created_at: i64,
    closed_at: i64,
    shares: Vec<ShareRow>,
}

/// Why a submitted share is refused, if it is.
fn check_share(session: &Session, principal: &str, request: &Submission) -> Result<(), KmsError> {
    let m = &session.manifest;
    if request.ceremony_id != m.ceremony_id {
        return Err(KmsError::InvalidArgument {
            field: "ceremony_id",
            reason: "share of another ceremony",
        });
    }
    let entry = m
        .custodians
        .iter()
        .find(|c| c.index == request.index)
        .ok_or(KmsError::InvalidArgument {
            field: "index",
            reason: "no such share in the ceremony",
        })?;
    if entry.custodian != principal || request.custodian != principal {
        return Err(KmsError::PermissionDenied {
            reason: "the share belongs to another custodian",
        });
    }
    if session.accepted.iter().any(|a| a.index == request.index) {
        return Err(conflict("this share index was already submitted"));
    }
    let commit = hex::encode(commitment(
        &m.ceremony_id,
        request.index,
        &entry.custodian,
        &request.share,
    ));
    if !ct_eq_str(&commit, &entry.commitment) {
        return Err(KmsError::InvalidArgument {
            field: "share",
            reason: "fails authentication against the ceremony's commitment",
        });
    }
    Ok(())
}

fn session_status(s: &Session) -> SessionStatus {
    SessionStatus {
        session_id: s.id.clone(),
        purpose: s.purpose.name(),
        nonce: s.nonce.clone(),
        ceremony_id: s.manifest.ceremony_id.clone(),
        threshold: s.manifest.threshold,
        accepted: s
            .accepted
            .iter()
            .map(|a| ShareStatus {
                index: a.index,
                custodian: a.custodian.clone(),
                confirmed_at: 0,
            })
            .collect(),
        rejected: s.rejected.clone(),
        opened_at: s.opened_at,
    }
}
