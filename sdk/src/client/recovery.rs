//! Recovery of the master keys: custodian keys, the M-of-N ceremony, backups, restore and
//! re-share. Shares are opened on the custodian's machine (see `kms-cli recovery`); these calls
//! only move sealed shares, commitments and opened shares over mutual TLS.

use proto::v1 as pb;

use super::KmsClient;
use crate::error::Error;

/// Largest chunk of a backup file on the wire (the server refuses bigger ones).
const BACKUP_CHUNK: usize = 32 * 1024;
/// Largest backup file the server takes or the client downloads.
const MAX_BACKUP_BYTES: usize = 64 << 20;

/// A backup file as the request stream of an upload.
fn upload(file: Vec<u8>) -> impl futures::Stream<Item = pb::BackupChunk> + Send + 'static {
    let chunks: Vec<pb::BackupChunk> = file
        .chunks(BACKUP_CHUNK)
        .map(|c| pb::BackupChunk { data: c.to_vec() })
        .collect();
    futures::stream::iter(chunks)
}

impl KmsClient {
    /// Registers the caller's age X25519 recipient as their custodian key.
    pub async fn register_custodian_key(&self, recipient: &str) -> Result<pb::CustodianKey, Error> {
        let request = pb::RegisterCustodianKeyRequest {
            recipient: recipient.to_owned(),
        };
        Ok(self
            .rpc()
            .register_custodian_key(request)
            .await?
            .into_inner())
    }

    /// Every registered custodian key.
    pub async fn list_custodian_keys(&self) -> Result<Vec<pb::CustodianKey>, Error> {
        Ok(self
            .rpc()
            .list_custodian_keys(pb::ListCustodianKeysRequest {})
            .await?
            .into_inner()
            .keys)
    }

    /// Proposes a recovery domain of `threshold`-of-`custodians` (a new recovery key when
    /// `rekey`); it runs when approved.
    pub async fn propose_recovery_init(
        &self,
        threshold: u32,
        custodians: &[String],
        rekey: bool,
    ) -> Result<pb::Approval, Error> {
        let request = pb::ProposeRecoveryInitRequest {
            threshold,
            custodians: custodians.to_vec(),
            rekey,
        };
        Ok(self
            .rpc()
            .propose_recovery_init(request)
            .await?
            .into_inner())
    }

    /// Proposes handing the same recovery key to `custodians` with `threshold`.
    pub async fn propose_recovery_reshare(
        &self,
        threshold: u32,
        custodians: &[String],
    ) -> Result<pb::Approval, Error> {
        let request = pb::ProposeRecoveryInitRequest {
            threshold,
            custodians: custodians.to_vec(),
            rekey: false,
        };
        Ok(self
            .rpc()
            .propose_recovery_reshare(request)
            .await?
            .into_inner())
    }

    /// Proposes a backup; once approved, the approval's result names the backup.
    pub async fn propose_recovery_backup(&self) -> Result<pb::Approval, Error> {
        Ok(self
            .rpc()
            .propose_recovery_backup(pb::ProposeRecoveryBackupRequest {})
            .await?
            .into_inner())
    }

    /// The bytes of a backup made by an approved request (downloaded in chunks).
    pub async fn get_recovery_backup(&self, backup_id: &str) -> Result<Vec<u8>, Error> {
        let request = pb::GetRecoveryBackupRequest {
            backup_id: backup_id.to_owned(),
        };
        let mut chunks = self.rpc().get_recovery_backup(request).await?.into_inner();
        let mut file = Vec::new();
        while let Some(chunk) = chunks.message().await? {
            if file.len() + chunk.data.len() > MAX_BACKUP_BYTES {
                return Err(Error::Protocol("the backup exceeds 64 MiB"));
            }
            file.extend_from_slice(&chunk.data);
        }
        Ok(file)
    }

    /// Checks a backup file against the server's HSM (uploaded in chunks).
    pub async fn verify_recovery_backup(
        &self,
        content: Vec<u8>,
    ) -> Result<pb::VerifyRecoveryBackupResponse, Error> {
        Ok(self
            .rpc()
            .verify_recovery_backup(upload(content))
            .await?
            .into_inner())
    }

    /// The recovery domain, its shares' confirmations and the open session.
    pub async fn recovery_status(&self) -> Result<pb::RecoveryStatus, Error> {
        Ok(self
            .rpc()
            .get_recovery_status(pb::GetRecoveryStatusRequest {})
            .await?
            .into_inner())
    }

    /// The caller's sealed share of the current ceremony.
    pub async fn get_recovery_share(&self) -> Result<pb::SealedShare, Error> {
        Ok(self
            .rpc()
            .get_recovery_share(pb::GetRecoveryShareRequest {})
            .await?
            .into_inner())
    }

    /// Confirms receipt of share `index` by its commitment.
    pub async fn confirm_recovery_share(
        &self,
        ceremony_id: &str,
        index: u32,
        commitment: &str,
    ) -> Result<pb::RecoveryStatus, Error> {
        let request = pb::ConfirmRecoveryShareRequest {
            ceremony_id: ceremony_id.to_owned(),
            index,
            commitment: commitment.to_owned(),
        };
        Ok(self
            .rpc()
            .confirm_recovery_share(request)
            .await?
            .into_inner())
    }

    /// Closes the ceremony (every share confirmed).
    pub async fn close_recovery_ceremony(
        &self,
        ceremony_id: &str,
    ) -> Result<pb::RecoveryStatus, Error> {
        let request = pb::CloseRecoveryCeremonyRequest {
            ceremony_id: ceremony_id.to_owned(),
        };
        Ok(self
            .rpc()
            .close_recovery_ceremony(request)
            .await?
            .into_inner())
    }

    /// Opens a restore session for `backup` on an empty server.
    pub async fn begin_restore(&self, backup: Vec<u8>) -> Result<pb::RecoveryStatus, Error> {
        Ok(self.rpc().begin_restore(upload(backup)).await?.into_inner())
    }

    /// Submits an opened share to the open session.
    pub async fn submit_share(
        &self,
        request: pb::SubmitShareRequest,
    ) -> Result<pb::RecoveryStatus, Error> {
        Ok(self.rpc().submit_share(request).await?.into_inner())
    }

    /// Forgets the shares submitted to a session and changes its nonce.
    pub async fn cancel_recovery_session(
        &self,
        session_id: &str,
    ) -> Result<pb::RecoveryStatus, Error> {
        let request = pb::CancelRecoverySessionRequest {
            session_id: session_id.to_owned(),
        };
        Ok(self
            .rpc()
            .cancel_recovery_session(request)
            .await?
            .into_inner())
    }
}
