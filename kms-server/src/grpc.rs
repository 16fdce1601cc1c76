//! The transport layer: the tonic service, the only place that touches protobuf types, and
//! [`to_status`], the only place that turns domain errors into gRPC status codes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proto::v1::key_management_server::KeyManagement;
use proto::v1::*;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::error::KmsError;
use crate::service::{Context, KeyService, NewKey};
use crate::store::{KeyRecord, KeyState as StoredState};

/// Maps every domain error to a status. Messages are fixed strings: no internals, no key
/// bytes, no context values.
pub fn to_status(e: &KmsError) -> Status {
    match e {
        KmsError::KeyNotFound => Status::not_found("key not found"),
        KmsError::KeyDestroyed => Status::not_found("key destroyed"),
        KmsError::AliasExists => Status::already_exists("alias already exists"),
        KmsError::InvalidArgument { field, reason } => {
            Status::invalid_argument(format!("invalid {field}: {reason}"))
        }
        KmsError::TooLarge { field, max } => {
            Status::invalid_argument(format!("{field} exceeds {max} bytes"))
        }
        KmsError::KeyNotUsable { state } => Status::failed_precondition(format!("key is {state}")),
        KmsError::KeyVersionRetired => Status::failed_precondition("key version retired"),
        KmsError::InvalidCiphertext => Status::invalid_argument("invalid ciphertext"),
        KmsError::HsmUnavailable => Status::unavailable("HSM unavailable"),
        KmsError::StoreUnavailable => Status::unavailable("store unavailable"),
        KmsError::Internal { .. } => Status::internal("internal error"),
    }
}

/// The `kms.v1.KeyManagement` service over a [`KeyService`].
pub struct GrpcService {
    service: Arc<KeyService>,
}

impl GrpcService {
    /// Wraps the domain service.
    pub fn new(service: Arc<KeyService>) -> Self {
        GrpcService { service }
    }

    async fn decrypt_one(&self, r: DecryptRequest) -> Result<DecryptResponse, KmsError> {
        let opened = self
            .service
            .decrypt(
                &r.ciphertext_blob,
                &context(r.encryption_context),
                Some(&r.key),
            )
            .await?;
        Ok(DecryptResponse {
            key_id: opened.key_id.to_string(),
            key_version: opened.key_version,
            plaintext: opened.plaintext.to_vec(),
        })
    }

    async fn re_encrypt_one(&self, r: ReEncryptRequest) -> Result<ReEncryptResponse, KmsError> {
        let out = self
            .service
            .re_encrypt(
                &r.ciphertext_blob,
                &context(r.source_encryption_context),
                Some(&r.source_key),
                &r.destination_key,
                &context(r.destination_encryption_context),
            )
            .await?;
        Ok(ReEncryptResponse {
            source_key_id: out.source.key_id.to_string(),
            source_key_version: out.source.version,
            key_id: out.destination.key_id.to_string(),
            key_version: out.destination.version,
            ciphertext_blob: out.blob,
        })
    }

    fn metadata(&self, record: KeyRecord) -> KeyMetadata {
        let limit = self.service.usage_limit_of(&record);
        metadata(record, limit)
    }
}

fn fail(rpc: &'static str, e: KmsError) -> Status {
    match &e {
        KmsError::Internal { what } => tracing::error!(rpc, what, "request failed"),
        _ => tracing::debug!(rpc, error = %e, "request refused"),
    }
    to_status(&e)
}

/// Most items in one batch call.
pub const MAX_BATCH: usize = 100;

fn batch_items<T>(items: Vec<T>) -> Result<Vec<T>, KmsError> {
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(KmsError::InvalidArgument {
            field: "items",
            reason: "1 to 100 items per batch",
        });
    }
    Ok(items)
}

fn ok_status() -> ItemStatus {
    ItemStatus {
        code: tonic::Code::Ok as i32,
        message: String::new(),
    }
}

/// A failed item's status, mapped by [`to_status`] like any single call.
fn item_status(rpc: &'static str, e: KmsError) -> ItemStatus {
    let status = fail(rpc, e);
    ItemStatus {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}

fn context(map: HashMap<String, String>) -> Context {
    map.into_iter().collect::<BTreeMap<_, _>>()
}

fn metadata(record: KeyRecord, usage_limit: u64) -> KeyMetadata {
    KeyMetadata {
        key_id: record.key_id.to_string(),
        alias: record.alias.unwrap_or_default(),
        description: record.description,
        tags: record.tags.into_iter().collect(),
        state: match record.state {
            StoredState::Enabled => KeyState::Enabled,
            StoredState::Disabled => KeyState::Disabled,
            StoredState::PendingDeletion => KeyState::PendingDeletion,
            StoredState::Destroyed => KeyState::Destroyed,
        } as i32,
        created_at: record.created_at,
        primary_version: record.primary_version,
        algorithm: "AES_256_GCM".to_string(),
        min_decryption_version: record.min_decryption_version,
        rotation_period_seconds: record.rotation_period_secs,
        deletion_due_at: record.deletion_due_at.unwrap_or_default(),
        usage_limit,
        versions: record
            .versions
            .iter()
            .map(|v| KeyVersion {
                version: v.version,
                created_at: v.created_at,
                usage: v.usage_reserved,
                state: if record.state == StoredState::Destroyed {
                    "destroyed"
                } else if v.version == record.primary_version {
                    "primary"
                } else if v.version < record.min_decryption_version {
                    "retired"
                } else {
                    "enabled"
                }
                .to_string(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl KeyManagement for GrpcService {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let r = request.into_inner();
        let new = NewKey {
            alias: Some(r.alias).filter(|a| !a.is_empty()),
            description: r.description,
            tags: r.tags.into_iter().collect(),
        };
        let record = self
            .service
            .create_key(new)
            .await
            .map_err(|e| fail("CreateKey", e))?;
        Ok(Response::new(self.metadata(record)))
    }

    async fn describe_key(
        &self,
        request: Request<DescribeKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let record = self
            .service
            .describe_key(&request.into_inner().key)
            .await
            .map_err(|e| fail("DescribeKey", e))?;
        Ok(Response::new(self.metadata(record)))
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let r = request.into_inner();
        let (keys, next_page_token) = self
            .service
            .list_keys(r.page_size, &r.page_token)
            .await
            .map_err(|e| fail("ListKeys", e))?;
        Ok(Response::new(ListKeysResponse {
            keys: keys.into_iter().map(|k| self.metadata(k)).collect(),
            next_page_token,
        }))
    }

    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        let r = request.into_inner();
        let dk = self
            .service
            .generate_data_key(&r.key, &context(r.encryption_context))
            .await
            .map_err(|e| fail("GenerateDataKey", e))?;
        Ok(Response::new(GenerateDataKeyResponse {
            key_id: dk.key_id.to_string(),
            key_version: dk.key_version,
            plaintext: dk.plaintext.to_vec(),
            ciphertext_blob: dk.blob,
        }))
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let r = request.into_inner();
        let dk = self
            .service
            .generate_data_key(&r.key, &context(r.encryption_context))
            .await
            .map_err(|e| fail("GenerateDataKeyWithoutPlaintext", e))?;
        Ok(Response::new(GenerateDataKeyWithoutPlaintextResponse {
            key_id: dk.key_id.to_string(),
            key_version: dk.key_version,
            ciphertext_blob: dk.blob,
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let r = request.into_inner();
        let sealed = self
            .service
            .encrypt(
                &r.key,
                Zeroizing::new(r.plaintext),
                &context(r.encryption_context),
            )
            .await
            .map_err(|e| fail("Encrypt", e))?;
        Ok(Response::new(EncryptResponse {
            key_id: sealed.key_id.to_string(),
            key_version: sealed.key_version,
            ciphertext_blob: sealed.blob,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let response = self
            .decrypt_one(request.into_inner())
            .await
            .map_err(|e| fail("Decrypt", e))?;
        Ok(Response::new(response))
    }

    async fn re_encrypt(
        &self,
        request: Request<ReEncryptRequest>,
    ) -> Result<Response<ReEncryptResponse>, Status> {
        let response = self
            .re_encrypt_one(request.into_inner())
            .await
            .map_err(|e| fail("ReEncrypt", e))?;
        Ok(Response::new(response))
    }

    async fn batch_decrypt(
        &self,
        request: Request<BatchDecryptRequest>,
    ) -> Result<Response<BatchDecryptResponse>, Status> {
        let items = batch_items(request.into_inner().items).map_err(|e| fail("BatchDecrypt", e))?;
        let outcomes =
            futures::future::join_all(items.into_iter().map(|item| self.decrypt_one(item))).await;
        let results = outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Ok(response) => DecryptResult {
                    status: Some(ok_status()),
                    response: Some(response),
                },
                Err(e) => DecryptResult {
                    status: Some(item_status("BatchDecrypt", e)),
                    response: None,
                },
            })
            .collect();
        Ok(Response::new(BatchDecryptResponse { results }))
    }

    async fn batch_re_encrypt(
        &self,
        request: Request<BatchReEncryptRequest>,
    ) -> Result<Response<BatchReEncryptResponse>, Status> {
        let items =
            batch_items(request.into_inner().items).map_err(|e| fail("BatchReEncrypt", e))?;
        let outcomes =
            futures::future::join_all(items.into_iter().map(|item| self.re_encrypt_one(item)))
                .await;
        let results = outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Ok(response) => ReEncryptResult {
                    status: Some(ok_status()),
                    response: Some(response),
                },
                Err(e) => ReEncryptResult {
                    status: Some(item_status("BatchReEncrypt", e)),
                    response: None,
                },
            })
            .collect();
        Ok(Response::new(BatchReEncryptResponse { results }))
    }

    async fn ping(&self, _request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {}))
    }

    async fn enable_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let record = self
            .service
            .set_state(&request.into_inner().key, StoredState::Enabled)
            .await
            .map_err(|e| fail("EnableKey", e))?;
        Ok(Response::new(self.metadata(record)))
    }

    async fn disable_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let record = self
            .service
            .set_state(&request.into_inner().key, StoredState::Disabled)
            .await
            .map_err(|e| fail("DisableKey", e))?;
        Ok(Response::new(self.metadata(record)))
    }

    async fn rotate_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let record = self
            .service
            .rotate_key(&request.into_inner().key)
            .await
            .map_err(|e| fail("RotateKey", e))?;
        Ok(Response::new(self.metadata(record)))
    }

    async fn schedule_key_deletion(
        &self,
        request: Request<ScheduleKeyDeletionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let r = request.into_inner();
        let record = self
            .service
            .schedule_key_deletion(&r.key, r.pending_window_days)
            .await
            .map_err(|e| fail("ScheduleKeyDeletion", e))?;
        Ok(Response::new(self.metadata(record)))
    }

    async fn cancel_key_deletion(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let record = self
            .service
            .cancel_key_deletion(&request.into_inner().key)
            .await
            .map_err(|e| fail("CancelKeyDeletion", e))?;
        Ok(Response::new(self.metadata(record)))
    }

    async fn set_rotation_policy(
        &self,
        request: Request<SetRotationPolicyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let r = request.into_inner();
        let record = self
            .service
            .set_rotation_policy(&r.key, r.rotation_period_seconds, r.usage_limit)
            .await
            .map_err(|e| fail("SetRotationPolicy", e))?;
        Ok(Response::new(self.metadata(record)))
    }

    async fn set_min_decryption_version(
        &self,
        request: Request<SetMinDecryptionVersionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let r = request.into_inner();
        let record = self
            .service
            .set_min_decryption_version(&r.key, r.min_decryption_version)
            .await
            .map_err(|e| fail("SetMinDecryptionVersion", e))?;
        Ok(Response::new(self.metadata(record)))
    }
}
