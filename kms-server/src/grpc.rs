//! The transport layer: the tonic service, the only place that touches protobuf types, and
//! [`to_status`], the only place that turns domain errors into gRPC status codes.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use proto::v1::key_management_server::KeyManagement;
use proto::v1::*;
use tonic::{Request, Response, Status};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::audit::{Audit, AuditEvent, Outcome, Severity};
use crate::authz::{self, Access, Authz, BreakGlassOutcome, Caller, Kind, Proposal, Role};
use crate::domains::{self, Domains, ServerTransform};
use crate::error::KmsError;
use crate::recovery::{CeremonySpec, Recovery, Submission};
use crate::service::{Context, KeyOp, KeyService, NewKey};
use crate::store::{KeyRecord, KeyState as StoredState};
use crate::tls::PeerIdentity;

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
        KmsError::AuditUnavailable => Status::unavailable("audit trail unavailable"),
        KmsError::PermissionDenied { reason } => {
            Status::permission_denied(format!("permission denied: {reason}"))
        }
        KmsError::NotFound { what } => Status::not_found(format!("{what} not found")),
        KmsError::Conflict { reason } => Status::failed_precondition(*reason),
        // The one message with a variable part: the replica's configured instance name, so
        // that custodians and officers know where to send their recovery calls.
        KmsError::SessionElsewhere { replica } => Status::failed_precondition(format!(
            "the recovery session is held by another replica ({replica}): send recovery calls \
             to that replica"
        )),
        KmsError::Transform(e) => Status::invalid_argument(format!("transform: {e}")),
        KmsError::Internal { .. } => Status::internal("internal error"),
    }
}

/// The response header (and error trailer) that carries the request id of the audit record
/// written for the call.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The `kms.v1.KeyManagement` service over a [`KeyService`], behind authorization and audit.
pub struct GrpcService {
    service: Arc<KeyService>,
    authz: Arc<Authz>,
    audit: Audit,
    domains: Arc<Domains>,
}

/// What a request is about, for its audit record. Context values and identifiers are handed
/// to the audit trail, which stores only their keyed hashes.
#[derive(Default)]
struct Facts {
    key_id: Option<String>,
    key_version: Option<u32>,
    context: Context,
    identifiers: Vec<(String, String)>,
    break_glass: Option<String>,
    detail: BTreeMap<String, String>,
    high_severity: bool,
}

impl Facts {
    fn key(key: &str) -> Self {
        Facts {
            key_id: Some(key.to_string()).filter(|k| !k.is_empty()),
            ..Facts::default()
        }
    }

    fn key_and_context(key: &str, context: &HashMap<String, String>) -> Self {
        Facts {
            context: context
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Facts::key(key)
        }
    }

    fn detail(mut self, name: &str, value: impl Into<String>) -> Self {
        self.detail.insert(name.to_string(), value.into());
        self
    }

    fn resolved(&mut self, key_id: impl ToString, version: u32) {
        self.key_id = Some(key_id.to_string());
        self.key_version = Some(version);
    }

    fn used(&mut self, access: &Access) {
        if let Some(window) = access.used_window() {
            self.break_glass = Some(window);
            self.high_severity = true;
        }
    }
}

type Handled<T> = (Result<T, KmsError>, Facts);

impl GrpcService {
    /// Wraps the domain service with its authorization layer and audit trail.
    pub fn new(
        service: Arc<KeyService>,
        authz: Arc<Authz>,
        audit: Audit,
        domains: Arc<Domains>,
    ) -> Self {
        GrpcService {
            service,
            authz,
            audit,
            domains,
        }
    }

    /// Every RPC goes through here: identify the caller from its certificate, check the rule
    /// table, run the handler, write the audit record — and only then answer. A record that
    /// cannot be written fails the request with UNAVAILABLE, whatever the handler produced.
    async fn run<Q, T, F, Fut>(
        &self,
        rpc: &'static str,
        request: Request<Q>,
        facts: impl FnOnce(&Q) -> Facts,
        handler: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Caller, Q, Facts) -> Fut,
        Fut: Future<Output = Handled<T>>,
    {
        if !self.audit.available() {
            // The store is known to be down: no audit record can be written, so nothing can
            // be answered but UNAVAILABLE — at once, instead of after the pool's timeout.
            return Err(to_status(&KmsError::AuditUnavailable));
        }
        if !self.authz.is_current() && !self.authz.reload_if_stale().await {
            // Bindings and grants could not be re-read for too long (and cannot now): a
            // revocation made through another replica might be missed, so nothing is allowed.
            return Err(to_status(&KmsError::StoreUnavailable));
        }
        let request_id = Uuid::new_v4().to_string();
        let principal = request
            .extensions()
            .get::<PeerIdentity>()
            .map(|peer| peer.principal.clone());
        let request = request.into_inner();
        let initial = facts(&request);
        let Some(principal) = principal else {
            // Unreachable over the TLS listener, which refuses connections without a client
            // certificate; refused (and recorded) rather than assumed.
            let denied = KmsError::PermissionDenied {
                reason: "no client certificate",
            };
            return self
                .finish(rpc, request_id, None, Err(denied), initial)
                .await;
        };
        let caller = self.authz.caller(&principal);
        let (result, facts) = if caller.roles.is_empty() {
            let denied = KmsError::PermissionDenied {
                reason: "no role is bound to this principal",
            };
            (Err(denied), initial)
        } else if !authz::allowed(rpc, &caller.roles) {
            let denied = KmsError::PermissionDenied {
                reason: "the caller's role may not call this method",
            };
            (Err(denied), initial)
        } else {
            handler(caller.clone(), request, initial).await
        };
        self.finish(rpc, request_id, Some(&caller), result, facts)
            .await
    }

    async fn finish<T>(
        &self,
        rpc: &'static str,
        request_id: String,
        caller: Option<&Caller>,
        result: Result<T, KmsError>,
        facts: Facts,
    ) -> Result<Response<T>, Status> {
        let status = result.as_ref().err().map(|e| fail(rpc, e));
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(KmsError::PermissionDenied { .. }) => Outcome::Denied,
            Err(_) => Outcome::Failed,
        };
        // The audit record's request id goes back to the caller (success or refusal alike),
        // so a client can later find the record of any answer it received.
        let header = tonic::metadata::MetadataValue::try_from(request_id.as_str()).ok();
        let event = AuditEvent {
            request_id,
            principal: caller.map(|c| c.principal.clone()).unwrap_or_default(),
            role: caller.map(Caller::roles_text).unwrap_or_default(),
            operation: rpc.to_string(),
            key_id: facts.key_id,
            key_version: facts.key_version,
            outcome,
            error_code: status.as_ref().map(|s| format!("{:?}", s.code())),
            context: facts.context,
            identifiers: facts.identifiers,
            break_glass: facts.break_glass,
            severity: if facts.high_severity {
                Severity::High
            } else {
                Severity::Info
            },
            detail: facts.detail,
        };
        if self.audit.record(event).await.is_err() {
            tracing::error!(rpc, "audit record not written: request failed closed");
            return Err(to_status(&KmsError::AuditUnavailable));
        }
        match (result, status) {
            (Ok(value), _) => {
                let mut response = Response::new(value);
                if let Some(id) = header {
                    response.metadata_mut().insert(REQUEST_ID_HEADER, id);
                }
                Ok(response)
            }
            (Err(_), Some(mut status)) => {
                if let Some(id) = header {
                    status.metadata_mut().insert(REQUEST_ID_HEADER, id);
                }
                Err(status)
            }
            (Err(e), None) => Err(to_status(&e)),
        }
    }

    async fn decrypt_one(
        &self,
        access: &Access,
        r: DecryptRequest,
    ) -> Result<DecryptResponse, KmsError> {
        let opened = self
            .service
            .decrypt(
                access,
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

    async fn re_encrypt_one(
        &self,
        access: &Access,
        r: ReEncryptRequest,
    ) -> Result<ReEncryptResponse, KmsError> {
        let out = self
            .service
            .re_encrypt(
                access,
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

    /// Runs a key-management call that answers with the key's metadata.
    async fn manage<Q, F, Fut>(
        &self,
        rpc: &'static str,
        request: Request<Q>,
        key_of: fn(&Q) -> &str,
        call: F,
    ) -> Result<Response<KeyMetadata>, Status>
    where
        F: FnOnce(Arc<KeyService>, Q) -> Fut,
        Fut: Future<Output = Result<KeyRecord, KmsError>>,
    {
        self.run(
            rpc,
            request,
            |r| Facts::key(key_of(r)),
            |_caller, r, mut facts| async move {
                let result = call(Arc::clone(&self.service), r).await;
                if let Ok(record) = &result {
                    facts.resolved(record.key_id, record.primary_version);
                }
                (result.map(|record| self.metadata(record)), facts)
            },
        )
        .await
    }

    /// A recovery call: recorded as high severity, with what `facts` names of the request
    /// (ceremony, session, share index; never share bytes) and, when refused, why.
    async fn recover<Q, T, F, Fut>(
        &self,
        rpc: &'static str,
        request: Request<Q>,
        facts: impl FnOnce(&Q) -> Facts,
        call: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Caller, Q, Arc<Recovery>) -> Fut,
        Fut: Future<Output = Result<T, KmsError>>,
    {
        self.run(
            rpc,
            request,
            |r| Facts {
                high_severity: true,
                ..facts(r)
            },
            |caller, r, facts| async move {
                let recovery = Arc::clone(self.authz.recovery());
                let result = call(caller, r, recovery).await;
                let facts = match &result {
                    Err(e) => facts.detail("refused", e.to_string()),
                    Ok(_) => facts,
                };
                (result, facts)
            },
        )
        .await
    }

    async fn propose(
        &self,
        caller: &Caller,
        proposal: Proposal,
        facts: &mut Facts,
    ) -> Result<Approval, KmsError> {
        if let Some(key_id) = proposal.key_id() {
            facts.key_id = Some(key_id.to_string());
        }
        let approval = self.authz.propose(caller, proposal).await?;
        facts
            .detail
            .insert("approval_id".into(), approval.approval_id.clone());
        Ok(approval_message(approval))
    }
}

fn key_of_request(r: &KeyRequest) -> &str {
    &r.key
}

fn approval_message(a: authz::Approval) -> Approval {
    Approval {
        approval_id: a.approval_id,
        kind: a.proposal.kind().as_str().to_string(),
        proposer: a.proposer,
        parameters_json: a.parameters_json,
        required: a.required,
        approver_role: a.approver_role.as_str().to_string(),
        approvers: a.approvers,
        state: a.state.as_str().to_string(),
        created_at: a.created_at,
        expires_at: a.expires_at,
        decided_at: a.decided_at,
        result: a.result,
    }
}

fn grant_message(g: authz::Grant) -> Grant {
    Grant {
        grant_id: g.grant_id,
        principal: g.principal,
        key_id: g.key_id.to_string(),
        operations: g
            .operations
            .iter()
            .map(|o| o.as_str().to_string())
            .collect(),
        required_context_keys: g.required_context_keys,
        context_equals: g.context_equals.into_iter().collect(),
        expires_at: g.expires_at,
        created_at: g.created_at,
        approval_id: g.approval_id,
        revoked_at: g.revoked_at,
    }
}

fn window_message(w: authz::Window) -> BreakGlassWindow {
    BreakGlassWindow {
        window_id: w.window_id,
        principal: w.principal,
        key_ids: w.key_ids.iter().map(Uuid::to_string).collect(),
        justification: w.justification,
        opened_at: w.opened_at,
        closes_at: w.closes_at,
        approval_id: w.approval_id,
    }
}

fn audit_error(_: crate::audit::AuditError) -> KmsError {
    KmsError::AuditUnavailable
}

fn fail(rpc: &'static str, e: &KmsError) -> Status {
    match &e {
        KmsError::Internal { what } => tracing::error!(rpc, what, "request failed"),
        _ => tracing::debug!(rpc, error = %e, "request refused"),
    }
    to_status(e)
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

/// The status and response of every item of a batch, in order; each item's outcome (`describe`
/// of a success, the code of a failure) goes into the call's audit record as `item.N`.
fn batch_results<'f, T>(
    rpc: &'static str,
    outcomes: Vec<Result<T, KmsError>>,
    facts: &'f mut Facts,
    describe: impl Fn(&T) -> String + 'f,
) -> impl Iterator<Item = (ItemStatus, Option<T>)> + 'f
where
    T: 'f,
{
    outcomes
        .into_iter()
        .enumerate()
        .map(move |(i, outcome)| match outcome {
            Ok(response) => {
                facts
                    .detail
                    .insert(format!("item.{i}"), describe(&response));
                (ok_status(), Some(response))
            }
            Err(e) => {
                let status = item_status(rpc, e);
                facts
                    .detail
                    .insert(format!("item.{i}"), code_name(status.code));
                (status, None)
            }
        })
}

/// A failed item's status, mapped by [`to_status`] like any single call.
fn item_status(rpc: &'static str, e: KmsError) -> ItemStatus {
    let status = fail(rpc, &e);
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
        self.run(
            "CreateKey",
            request,
            |_| Facts::default(),
            |_caller, r, mut facts| async move {
                let new = NewKey {
                    alias: Some(r.alias).filter(|a| !a.is_empty()),
                    description: r.description,
                    tags: r.tags.into_iter().collect(),
                };
                let result = self.service.create_key(new).await;
                if let Ok(record) = &result {
                    facts.resolved(record.key_id, record.primary_version);
                }
                (result.map(|record| self.metadata(record)), facts)
            },
        )
        .await
    }

    async fn describe_key(
        &self,
        request: Request<DescribeKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.run(
            "DescribeKey",
            request,
            |r| Facts::key(&r.key),
            |caller, r, mut facts| async move {
                let access = self.authz.access(&caller);
                let result = self.service.describe_key(&access, &r.key).await;
                facts.used(&access);
                if let Ok(record) = &result {
                    facts.resolved(record.key_id, record.primary_version);
                }
                (result.map(|record| self.metadata(record)), facts)
            },
        )
        .await
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        self.run(
            "ListKeys",
            request,
            |_| Facts::default(),
            |_caller, r, facts| async move {
                let result = self
                    .service
                    .list_keys(r.page_size, &r.page_token)
                    .await
                    .map(|(keys, next_page_token)| ListKeysResponse {
                        keys: keys.into_iter().map(|k| self.metadata(k)).collect(),
                        next_page_token,
                    });
                (result, facts)
            },
        )
        .await
    }

    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        self.run(
            "GenerateDataKey",
            request,
            |r| Facts::key_and_context(&r.key, &r.encryption_context),
            |caller, r, mut facts| async move {
                let access = self.authz.access(&caller);
                let result = self
                    .service
                    .generate_data_key(&access, &r.key, &context(r.encryption_context))
                    .await;
                facts.used(&access);
                if let Ok(dk) = &result {
                    facts.resolved(dk.key_id, dk.key_version);
                }
                let response = result.map(|dk| GenerateDataKeyResponse {
                    key_id: dk.key_id.to_string(),
                    key_version: dk.key_version,
                    plaintext: dk.plaintext.to_vec(),
                    ciphertext_blob: dk.blob,
                });
                (response, facts)
            },
        )
        .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        self.run(
            "GenerateDataKeyWithoutPlaintext",
            request,
            |r| Facts::key_and_context(&r.key, &r.encryption_context),
            |caller, r, mut facts| async move {
                let access = self.authz.access(&caller);
                let result = self
                    .service
                    .generate_data_key(&access, &r.key, &context(r.encryption_context))
                    .await;
                facts.used(&access);
                if let Ok(dk) = &result {
                    facts.resolved(dk.key_id, dk.key_version);
                }
                let response = result.map(|dk| GenerateDataKeyWithoutPlaintextResponse {
                    key_id: dk.key_id.to_string(),
                    key_version: dk.key_version,
                    ciphertext_blob: dk.blob,
                });
                (response, facts)
            },
        )
        .await
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        self.run(
            "Encrypt",
            request,
            |r| Facts::key_and_context(&r.key, &r.encryption_context),
            |caller, r, mut facts| async move {
                let access = self.authz.access(&caller);
                let result = self
                    .service
                    .encrypt(
                        &access,
                        &r.key,
                        Zeroizing::new(r.plaintext),
                        &context(r.encryption_context),
                    )
                    .await;
                facts.used(&access);
                if let Ok(sealed) = &result {
                    facts.resolved(sealed.key_id, sealed.key_version);
                }
                let response = result.map(|sealed| EncryptResponse {
                    key_id: sealed.key_id.to_string(),
                    key_version: sealed.key_version,
                    ciphertext_blob: sealed.blob,
                });
                (response, facts)
            },
        )
        .await
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        self.run(
            "Decrypt",
            request,
            |r| Facts::key_and_context(&r.key, &r.encryption_context),
            |caller, r, mut facts| async move {
                let access = self.authz.access(&caller);
                let result = self.decrypt_one(&access, r).await;
                facts.used(&access);
                if let Ok(opened) = &result {
                    facts.resolved(&opened.key_id, opened.key_version);
                }
                (result, facts)
            },
        )
        .await
    }

    async fn re_encrypt(
        &self,
        request: Request<ReEncryptRequest>,
    ) -> Result<Response<ReEncryptResponse>, Status> {
        self.run(
            "ReEncrypt",
            request,
            |r| {
                Facts::key_and_context(&r.source_key, &r.source_encryption_context)
                    .detail("destination_key", r.destination_key.clone())
            },
            |caller, r, mut facts| async move {
                let access = self.authz.access(&caller);
                let result = self.re_encrypt_one(&access, r).await;
                facts.used(&access);
                if let Ok(out) = &result {
                    facts.resolved(&out.source_key_id, out.source_key_version);
                    facts.detail.insert(
                        "destination".into(),
                        format!("{} v{}", out.key_id, out.key_version),
                    );
                }
                (result, facts)
            },
        )
        .await
    }

    async fn batch_decrypt(
        &self,
        request: Request<BatchDecryptRequest>,
    ) -> Result<Response<BatchDecryptResponse>, Status> {
        self.run(
            "BatchDecrypt",
            request,
            |r| Facts::default().detail("items", r.items.len().to_string()),
            |caller, r, mut facts| async move {
                let items = match batch_items(r.items) {
                    Ok(items) => items,
                    Err(e) => return (Err(e), facts),
                };
                let access = self.authz.access(&caller);
                let outcomes = futures::future::join_all(
                    items
                        .into_iter()
                        .map(|item| self.decrypt_one(&access, item)),
                )
                .await;
                facts.used(&access);
                let results = batch_results("BatchDecrypt", outcomes, &mut facts, |r| {
                    format!("OK {} v{}", r.key_id, r.key_version)
                })
                .map(|(status, response)| DecryptResult {
                    status: Some(status),
                    response,
                })
                .collect();
                (Ok(BatchDecryptResponse { results }), facts)
            },
        )
        .await
    }

    async fn batch_re_encrypt(
        &self,
        request: Request<BatchReEncryptRequest>,
    ) -> Result<Response<BatchReEncryptResponse>, Status> {
        self.run(
            "BatchReEncrypt",
            request,
            |r| Facts::default().detail("items", r.items.len().to_string()),
            |caller, r, mut facts| async move {
                let items = match batch_items(r.items) {
                    Ok(items) => items,
                    Err(e) => return (Err(e), facts),
                };
                let access = self.authz.access(&caller);
                let outcomes = futures::future::join_all(
                    items
                        .into_iter()
                        .map(|item| self.re_encrypt_one(&access, item)),
                )
                .await;
                facts.used(&access);
                let results = batch_results("BatchReEncrypt", outcomes, &mut facts, |r| {
                    format!(
                        "OK {} v{} -> {} v{}",
                        r.source_key_id, r.source_key_version, r.key_id, r.key_version
                    )
                })
                .map(|(status, response)| ReEncryptResult {
                    status: Some(status),
                    response,
                })
                .collect();
                (Ok(BatchReEncryptResponse { results }), facts)
            },
        )
        .await
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        self.run(
            "Ping",
            request,
            |_| Facts::default(),
            |_caller, _r, facts| async move { (Ok(PingResponse {}), facts) },
        )
        .await
    }

    async fn enable_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.manage("EnableKey", request, key_of_request, |s, r| async move {
            s.set_state(&r.key, StoredState::Enabled).await
        })
        .await
    }

    async fn disable_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.manage("DisableKey", request, key_of_request, |s, r| async move {
            s.set_state(&r.key, StoredState::Disabled).await
        })
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.manage("RotateKey", request, key_of_request, |s, r| async move {
            s.rotate_key(&r.key).await
        })
        .await
    }

    async fn schedule_key_deletion(
        &self,
        request: Request<ScheduleKeyDeletionRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "ScheduleKeyDeletion",
            request,
            |r| Facts::key(&r.key),
            |caller, r, mut facts| async move {
                let result = async {
                    let key_id = self.service.key_id_of(&r.key).await?;
                    let proposal = Proposal::KeyDeletion {
                        key_id,
                        pending_window_days: r.pending_window_days,
                    };
                    self.propose(&caller, proposal, &mut facts).await
                }
                .await;
                (result, facts)
            },
        )
        .await
    }

    async fn cancel_key_deletion(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.manage(
            "CancelKeyDeletion",
            request,
            key_of_request,
            |s, r| async move { s.cancel_key_deletion(&r.key).await },
        )
        .await
    }

    async fn set_rotation_policy(
        &self,
        request: Request<SetRotationPolicyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.manage(
            "SetRotationPolicy",
            request,
            |r| &r.key,
            |s, r| async move {
                s.set_rotation_policy(&r.key, r.rotation_period_seconds, r.usage_limit)
                    .await
            },
        )
        .await
    }

    async fn set_min_decryption_version(
        &self,
        request: Request<SetMinDecryptionVersionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.manage(
            "SetMinDecryptionVersion",
            request,
            |r| &r.key,
            |s, r| async move {
                s.set_min_decryption_version(&r.key, r.min_decryption_version)
                    .await
            },
        )
        .await
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        self.run(
            "WhoAmI",
            request,
            |_| Facts::default(),
            |caller, _r, facts| async move {
                let response = WhoAmIResponse {
                    roles: caller
                        .roles
                        .iter()
                        .map(|r| r.as_str().to_string())
                        .collect(),
                    principal: caller.principal,
                };
                (Ok(response), facts)
            },
        )
        .await
    }

    async fn list_role_bindings(
        &self,
        request: Request<ListRoleBindingsRequest>,
    ) -> Result<Response<ListRoleBindingsResponse>, Status> {
        self.run(
            "ListRoleBindings",
            request,
            |_| Facts::default(),
            |_caller, _r, facts| async move {
                let result = self
                    .authz
                    .bindings()
                    .await
                    .map(|rows| ListRoleBindingsResponse {
                        bindings: rows
                            .into_iter()
                            .map(|(principal, role, created_at, approval_id)| RoleBinding {
                                principal,
                                role: role.as_str().to_string(),
                                created_at,
                                approval_id,
                            })
                            .collect(),
                    });
                (result, facts)
            },
        )
        .await
    }

    async fn propose_role_binding(
        &self,
        request: Request<ProposeRoleBindingRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "ProposeRoleBinding",
            request,
            |r| {
                Facts::default()
                    .detail("principal", r.principal.clone())
                    .detail("role", r.role.clone())
            },
            |caller, r, mut facts| async move {
                let result = async {
                    let proposal = Proposal::RoleBinding {
                        principal: r.principal,
                        role: Role::parse(&r.role)?,
                        remove: r.remove,
                    };
                    self.propose(&caller, proposal, &mut facts).await
                }
                .await;
                (result, facts)
            },
        )
        .await
    }

    async fn propose_grant(
        &self,
        request: Request<ProposeGrantRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "ProposeGrant",
            request,
            |r| {
                Facts::key(&r.key)
                    .detail("principal", r.principal.clone())
                    .detail("operations", r.operations.join(","))
            },
            |caller, r, mut facts| async move {
                let result = async {
                    let proposal = Proposal::Grant {
                        principal: r.principal,
                        key_id: self.service.key_id_of(&r.key).await?,
                        operations: r.operations,
                        required_context_keys: r.required_context_keys,
                        context_equals: r.context_equals.into_iter().collect(),
                        expires_at: r.expires_at,
                    };
                    self.propose(&caller, proposal, &mut facts).await
                }
                .await;
                (result, facts)
            },
        )
        .await
    }

    async fn revoke_grant(
        &self,
        request: Request<RevokeGrantRequest>,
    ) -> Result<Response<Grant>, Status> {
        self.run(
            "RevokeGrant",
            request,
            |r| Facts::default().detail("grant_id", r.grant_id.clone()),
            |_caller, r, mut facts| async move {
                let result = self.authz.revoke_grant(&r.grant_id).await;
                if let Ok(grant) = &result {
                    facts.key_id = Some(grant.key_id.to_string());
                }
                (result.map(grant_message), facts)
            },
        )
        .await
    }

    async fn list_grants(
        &self,
        request: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        self.run(
            "ListGrants",
            request,
            |r| Facts::key(&r.key),
            |_caller, r, facts| async move {
                let result = async {
                    let key_id = match r.key.as_str() {
                        "" => None,
                        key => Some(self.service.key_id_of(key).await?),
                    };
                    let principal = Some(r.principal.as_str()).filter(|p| !p.is_empty());
                    let grants = self.authz.grants(principal, key_id).await?;
                    Ok(ListGrantsResponse {
                        grants: grants.into_iter().map(grant_message).collect(),
                    })
                }
                .await;
                (result, facts)
            },
        )
        .await
    }

    async fn propose_quorum(
        &self,
        request: Request<ProposeQuorumRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "ProposeQuorum",
            request,
            |_| Facts::default(),
            |caller, r, mut facts| async move {
                let result = async {
                    let q = r.quorum.ok_or(KmsError::InvalidArgument {
                        field: "quorum",
                        reason: "required",
                    })?;
                    let quorum = authz::Quorum {
                        kind: Kind::parse(&q.kind)?,
                        required: q.required,
                        approver_role: Role::parse(&q.approver_role)?,
                    };
                    self.propose(&caller, Proposal::Quorum { quorum }, &mut facts)
                        .await
                }
                .await;
                (result, facts)
            },
        )
        .await
    }

    async fn list_quorums(
        &self,
        request: Request<ListQuorumsRequest>,
    ) -> Result<Response<ListQuorumsResponse>, Status> {
        self.run(
            "ListQuorums",
            request,
            |_| Facts::default(),
            |_caller, _r, facts| async move {
                let result = self
                    .authz
                    .quorums()
                    .await
                    .map(|quorums| ListQuorumsResponse {
                        quorums: quorums
                            .into_iter()
                            .map(|q| Quorum {
                                kind: q.kind.as_str().to_string(),
                                required: q.required,
                                approver_role: q.approver_role.as_str().to_string(),
                            })
                            .collect(),
                    });
                (result, facts)
            },
        )
        .await
    }

    async fn list_approvals(
        &self,
        request: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        self.run(
            "ListApprovals",
            request,
            |_| Facts::default(),
            |_caller, r, facts| async move {
                let result =
                    self.authz
                        .approvals(r.pending_only)
                        .await
                        .map(|list| ListApprovalsResponse {
                            approvals: list.into_iter().map(approval_message).collect(),
                        });
                (result, facts)
            },
        )
        .await
    }

    async fn get_approval(
        &self,
        request: Request<ApprovalId>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "GetApproval",
            request,
            |r| Facts::default().detail("approval_id", r.approval_id.clone()),
            |_caller, r, facts| async move {
                let result = self.authz.approval(&r.approval_id).await;
                (result.map(approval_message), facts)
            },
        )
        .await
    }

    async fn approve(&self, request: Request<ApprovalId>) -> Result<Response<Approval>, Status> {
        self.run(
            "Approve",
            request,
            |r| Facts::default().detail("approval_id", r.approval_id.clone()),
            |caller, r, mut facts| async move {
                let result = self.authz.approve(&caller, &r.approval_id).await;
                if let Ok(approval) = &result {
                    if let Some(key_id) = approval.proposal.key_id() {
                        facts.key_id = Some(key_id.to_string());
                    }
                    facts
                        .detail
                        .insert("state".into(), approval.state.as_str().to_string());
                    if approval.proposal.kind() == Kind::BreakGlass {
                        facts.high_severity = true;
                    }
                }
                (result.map(approval_message), facts)
            },
        )
        .await
    }

    async fn reject(&self, request: Request<ApprovalId>) -> Result<Response<Approval>, Status> {
        self.run(
            "Reject",
            request,
            |r| Facts::default().detail("approval_id", r.approval_id.clone()),
            |caller, r, facts| async move {
                let result = self.authz.reject(&caller, &r.approval_id).await;
                (result.map(approval_message), facts)
            },
        )
        .await
    }

    async fn open_break_glass(
        &self,
        request: Request<OpenBreakGlassRequest>,
    ) -> Result<Response<OpenBreakGlassResponse>, Status> {
        self.run(
            "OpenBreakGlass",
            request,
            |r| {
                let mut facts = Facts::default().detail("keys", r.keys.join(","));
                facts.high_severity = true;
                facts
            },
            |caller, r, mut facts| async move {
                let result = async {
                    let mut key_ids = Vec::with_capacity(r.keys.len());
                    for key in &r.keys {
                        key_ids.push(self.service.key_id_of(key).await?);
                    }
                    self.authz
                        .open_break_glass(&caller, key_ids, r.justification, r.duration_seconds)
                        .await
                }
                .await;
                let response = result.map(|outcome| match outcome {
                    BreakGlassOutcome::Open(window) => {
                        facts.break_glass = Some(window.window_id.clone());
                        OpenBreakGlassResponse {
                            window: Some(window_message(window)),
                            approval: None,
                        }
                    }
                    BreakGlassOutcome::Pending(approval) => {
                        facts
                            .detail
                            .insert("approval_id".into(), approval.approval_id.clone());
                        OpenBreakGlassResponse {
                            window: None,
                            approval: Some(approval_message(approval)),
                        }
                    }
                });
                (response, facts)
            },
        )
        .await
    }

    async fn list_break_glass_windows(
        &self,
        request: Request<ListBreakGlassWindowsRequest>,
    ) -> Result<Response<ListBreakGlassWindowsResponse>, Status> {
        self.run(
            "ListBreakGlassWindows",
            request,
            |_| Facts::default(),
            |_caller, _r, facts| async move {
                let result =
                    self.authz
                        .windows(None)
                        .await
                        .map(|windows| ListBreakGlassWindowsResponse {
                            windows: windows.into_iter().map(window_message).collect(),
                        });
                (result, facts)
            },
        )
        .await
    }

    async fn verify_audit(
        &self,
        request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        self.run(
            "VerifyAudit",
            request,
            |_| Facts::default(),
            |_caller, _r, facts| async move {
                if let Err(e) = self.audit.checkpoint_now().await {
                    tracing::warn!(error = %e, "audit: no checkpoint before verification");
                }
                let result = self
                    .audit
                    .verify()
                    .await
                    .map_err(audit_error)
                    .map(|report| {
                        let (first_bad_seq, problem) = match report.first_bad {
                            Some(bad) => (bad.seq, bad.problem.to_string()),
                            None => (0, String::new()),
                        };
                        VerifyAuditResponse {
                            records_checked: report.records,
                            checkpoints_checked: report.checkpoints,
                            unsealed_records: report.unsealed,
                            intact: first_bad_seq == 0,
                            first_bad_seq,
                            problem,
                        }
                    });
                (result, facts)
            },
        )
        .await
    }

    async fn list_audit_records(
        &self,
        request: Request<ListAuditRecordsRequest>,
    ) -> Result<Response<ListAuditRecordsResponse>, Status> {
        self.run(
            "ListAuditRecords",
            request,
            |_| Facts::default(),
            |_caller, r, facts| async move {
                let filter = crate::audit::RecordFilter {
                    break_glass_only: r.break_glass_only,
                    identifier_hash: Some(r.identifier_hash).filter(|h| !h.is_empty()),
                    ..Default::default()
                };
                let page_size = match r.page_size {
                    0 => 500,
                    n => n.min(5000),
                };
                let result = self
                    .audit
                    .records(r.after_seq, page_size, &filter)
                    .await
                    .map_err(audit_error)
                    .map(|records| ListAuditRecordsResponse {
                        last_seq: records.last().map(|r| r.seq).unwrap_or(r.after_seq),
                        records_json: records.iter().map(|r| r.to_json_line()).collect(),
                    });
                (result, facts)
            },
        )
        .await
    }

    async fn hash_identifier(
        &self,
        request: Request<HashIdentifierRequest>,
    ) -> Result<Response<HashIdentifierResponse>, Status> {
        self.run(
            "HashIdentifier",
            request,
            |r| Facts {
                identifiers: vec![("value".to_string(), r.value.clone())],
                ..Facts::default()
            },
            |_caller, r, facts| async move {
                let hash = self.audit.hash_identifier(&r.value);
                (Ok(HashIdentifierResponse { hash }), facts)
            },
        )
        .await
    }

    async fn register_custodian_key(
        &self,
        request: Request<RegisterCustodianKeyRequest>,
    ) -> Result<Response<CustodianKey>, Status> {
        self.recover(
            "RegisterCustodianKey",
            request,
            |_| Facts::default(),
            |caller, r, rec| async move {
                rec.register_custodian_key(&caller.principal, &r.recipient)
                    .await
                    .map(custodian_key)
            },
        )
        .await
    }

    async fn list_custodian_keys(
        &self,
        request: Request<ListCustodianKeysRequest>,
    ) -> Result<Response<ListCustodianKeysResponse>, Status> {
        self.recover(
            "ListCustodianKeys",
            request,
            |_| Facts::default(),
            |_, _, rec| async move {
                Ok(ListCustodianKeysResponse {
                    keys: rec
                        .custodian_keys()
                        .await?
                        .into_iter()
                        .map(custodian_key)
                        .collect(),
                })
            },
        )
        .await
    }

    async fn propose_recovery_init(
        &self,
        request: Request<ProposeRecoveryInitRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "ProposeRecoveryInit",
            request,
            |_| Facts {
                high_severity: true,
                ..Facts::default()
            },
            |caller, r, mut facts| async move {
                let proposal = Proposal::RecoveryInit {
                    spec: CeremonySpec {
                        threshold: r.threshold,
                        custodians: r.custodians,
                    },
                    rekey: r.rekey,
                };
                let result = self.propose(&caller, proposal, &mut facts).await;
                (result, facts)
            },
        )
        .await
    }

    async fn propose_recovery_reshare(
        &self,
        request: Request<ProposeRecoveryInitRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "ProposeRecoveryReshare",
            request,
            |_| Facts {
                high_severity: true,
                ..Facts::default()
            },
            |caller, r, mut facts| async move {
                let result = if r.rekey {
                    Err(KmsError::InvalidArgument {
                        field: "rekey",
                        reason: "a re-share keeps the recovery key; propose an init with rekey",
                    })
                } else {
                    let proposal = Proposal::RecoveryReshare {
                        spec: CeremonySpec {
                            threshold: r.threshold,
                            custodians: r.custodians,
                        },
                    };
                    self.propose(&caller, proposal, &mut facts).await
                };
                (result, facts)
            },
        )
        .await
    }

    async fn propose_recovery_backup(
        &self,
        request: Request<ProposeRecoveryBackupRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "ProposeRecoveryBackup",
            request,
            |_| Facts {
                high_severity: true,
                ..Facts::default()
            },
            |caller, _r, mut facts| async move {
                let result = self
                    .propose(&caller, Proposal::RecoveryBackup {}, &mut facts)
                    .await;
                (result, facts)
            },
        )
        .await
    }

    type GetRecoveryBackupStream = BackupStream;

    async fn get_recovery_backup(
        &self,
        request: Request<GetRecoveryBackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        self.recover(
            "GetRecoveryBackup",
            request,
            |r| Facts::default().detail("backup_id", r.backup_id.clone()),
            |_, r, rec| async move { Ok(chunked(rec.backup_file(&r.backup_id).await?)) },
        )
        .await
    }

    async fn verify_recovery_backup(
        &self,
        request: Request<tonic::Streaming<BackupChunk>>,
    ) -> Result<Response<VerifyRecoveryBackupResponse>, Status> {
        self.recover(
            "VerifyRecoveryBackup",
            request,
            |_| Facts::default(),
            |_, chunks, rec| async move {
                let file = collect_backup(chunks).await?;
                let checked = rec.verify_backup(&file).await?;
                Ok(VerifyRecoveryBackupResponse {
                    backup_id: checked.backup_id,
                    ceremony_id: checked.ceremony_id,
                    keys: checked.keys,
                    key_versions: checked.key_versions,
                })
            },
        )
        .await
    }

    async fn get_recovery_status(
        &self,
        request: Request<GetRecoveryStatusRequest>,
    ) -> Result<Response<RecoveryStatus>, Status> {
        self.recover(
            "GetRecoveryStatus",
            request,
            |_| Facts::default(),
            |_, _, rec| async move { rec.status().await.map(recovery_status) },
        )
        .await
    }

    async fn get_recovery_share(
        &self,
        request: Request<GetRecoveryShareRequest>,
    ) -> Result<Response<SealedShare>, Status> {
        self.recover(
            "GetRecoveryShare",
            request,
            |_| Facts::default(),
            |caller, _, rec| async move {
                let share = rec.sealed_share(&caller.principal).await?;
                Ok(SealedShare {
                    ceremony_id: share.ceremony_id,
                    index: share.index,
                    sealed: share.sealed,
                })
            },
        )
        .await
    }

    async fn confirm_recovery_share(
        &self,
        request: Request<ConfirmRecoveryShareRequest>,
    ) -> Result<Response<RecoveryStatus>, Status> {
        self.recover(
            "ConfirmRecoveryShare",
            request,
            |r| {
                Facts::default()
                    .detail("ceremony_id", r.ceremony_id.clone())
                    .detail("share_index", r.index.to_string())
            },
            |caller, r, rec| async move {
                rec.confirm_share(&caller.principal, &r.ceremony_id, r.index, &r.commitment)
                    .await
                    .map(recovery_status)
            },
        )
        .await
    }

    async fn close_recovery_ceremony(
        &self,
        request: Request<CloseRecoveryCeremonyRequest>,
    ) -> Result<Response<RecoveryStatus>, Status> {
        self.recover(
            "CloseRecoveryCeremony",
            request,
            |r| Facts::default().detail("ceremony_id", r.ceremony_id.clone()),
            |_, r, rec| async move { rec.close(&r.ceremony_id).await.map(recovery_status) },
        )
        .await
    }

    async fn begin_restore(
        &self,
        request: Request<tonic::Streaming<BackupChunk>>,
    ) -> Result<Response<RecoveryStatus>, Status> {
        self.recover(
            "BeginRestore",
            request,
            |_| Facts::default(),
            |_, chunks, rec| async move {
                let file = collect_backup(chunks).await?;
                rec.begin_restore(&file).await.map(recovery_status)
            },
        )
        .await
    }

    async fn submit_share(
        &self,
        request: Request<SubmitShareRequest>,
    ) -> Result<Response<RecoveryStatus>, Status> {
        self.recover(
            "SubmitShare",
            request,
            |r| {
                Facts::default()
                    .detail("session_id", r.session_id.clone())
                    .detail("ceremony_id", r.ceremony_id.clone())
                    .detail("share_index", r.index.to_string())
            },
            |caller, r, rec| async move {
                let submission = Submission {
                    session_id: r.session_id,
                    nonce: r.nonce,
                    ceremony_id: r.ceremony_id,
                    index: r.index,
                    custodian: r.custodian,
                    share: Zeroizing::new(r.share),
                };
                rec.submit_share(&caller.principal, &submission)
                    .await
                    .map(recovery_status)
            },
        )
        .await
    }

    async fn cancel_recovery_session(
        &self,
        request: Request<CancelRecoverySessionRequest>,
    ) -> Result<Response<RecoveryStatus>, Status> {
        self.recover(
            "CancelRecoverySession",
            request,
            |r| Facts::default().detail("session_id", r.session_id.clone()),
            |_, r, rec| async move { rec.cancel(&r.session_id).await.map(recovery_status) },
        )
        .await
    }

    async fn create_domain(
        &self,
        request: Request<CreateDomainRequest>,
    ) -> Result<Response<Domain>, Status> {
        self.run(
            "CreateDomain",
            request,
            |r| Facts::key(&r.key).detail("domain", r.domain.clone()),
            |caller, r, mut facts| async move {
                let result = self
                    .domains
                    .create(&r.domain, &r.key, &caller.principal)
                    .await;
                if let Ok(info) = &result {
                    facts.resolved(info.key_id, 0);
                }
                (result.map(domain_message), facts)
            },
        )
        .await
    }

    async fn list_domains(
        &self,
        request: Request<ListDomainsRequest>,
    ) -> Result<Response<ListDomainsResponse>, Status> {
        self.run(
            "ListDomains",
            request,
            |_| Facts::default(),
            |_caller, _r, facts| async move {
                let result = self
                    .domains
                    .list()
                    .await
                    .map(|domains| ListDomainsResponse {
                        domains: domains.into_iter().map(domain_message).collect(),
                    });
                (result, facts)
            },
        )
        .await
    }

    async fn propose_domain_rotation(
        &self,
        request: Request<ProposeDomainRotationRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.run(
            "ProposeDomainRotation",
            request,
            |r| Facts::default().detail("domain", r.domain.clone()),
            |caller, r, mut facts| async move {
                let result = async {
                    let (version, sealed_key) = self.domains.prepare_rotation(&r.domain).await?;
                    facts.detail.insert("version".into(), version.to_string());
                    let proposal = Proposal::DomainRotation {
                        domain: r.domain,
                        version,
                        sealed_key,
                    };
                    self.propose(&caller, proposal, &mut facts).await
                }
                .await;
                (result, facts)
            },
        )
        .await
    }

    async fn get_domain_key(
        &self,
        request: Request<GetDomainKeyRequest>,
    ) -> Result<Response<DomainKeyResponse>, Status> {
        self.run(
            "GetDomainKey",
            request,
            |r| Facts::default().detail("domain", r.domain.clone()),
            |caller, r, mut facts| async move {
                let access = self.authz.access(&caller);
                let result = self
                    .domains
                    .key(&access, KeyOp::DomainKey, &r.domain, r.version)
                    .await
                    .map(|(info, key)| {
                        facts.resolved(info.key_id, 0);
                        facts
                            .detail
                            .insert("domain_version".into(), key.version().to_string());
                        DomainKeyResponse {
                            domain: info.domain,
                            version: key.version(),
                            key: key.secret_bytes().to_vec(),
                        }
                    });
                (result, facts)
            },
        )
        .await
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        self.run(
            "Tokenize",
            request,
            |r| {
                Facts::default()
                    .detail("domain", r.domain.clone())
                    .detail("field", r.field.clone())
                    .detail("values", r.values.len().to_string())
            },
            |caller, r, mut facts| async move {
                let result = async {
                    domains::check_batch(&r.values, "values")?;
                    let transform = domains::parse_transform(&r.transform_json)?;
                    facts
                        .detail
                        .insert("transform".into(), transform.kind().to_string());
                    let access = self.authz.access(&caller);
                    let (info, key) = self
                        .domains
                        .key(&access, KeyOp::Tokenize, &r.domain, 0)
                        .await?;
                    facts.resolved(info.key_id, 0);
                    let version = key.version();
                    let items = match transform {
                        ServerTransform::Vault => {
                            self.domains
                                .vault_tokenize(&key, &r.field, &r.values)
                                .await?
                        }
                        ServerTransform::Local(transform) => {
                            run_cpu(move || {
                                domains::tokenize_all(
                                    &key,
                                    &r.field,
                                    &transform,
                                    &r.values,
                                    &r.patient_pseudonyms,
                                )
                            })
                            .await?
                        }
                    };
                    Ok(TokenizeResponse {
                        key_version: version,
                        results: token_results("Tokenize", items, &mut facts),
                    })
                }
                .await;
                (result, facts)
            },
        )
        .await
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        self.run(
            "Detokenize",
            request,
            |r| {
                Facts {
                    // Every call is a disclosure about this patient: the record carries the
                    // keyed hash of the patient's token, so disclosures can be listed per patient.
                    identifiers: vec![("patient_token".to_string(), r.patient_token.clone())],
                    high_severity: true,
                    ..Facts::default()
                }
                .detail("domain", r.domain.clone())
                .detail("field", r.field.clone())
                .detail("purpose", r.purpose.clone())
                .detail("tokens", r.tokens.len().to_string())
            },
            |caller, r, mut facts| async move {
                let result = async {
                    if r.purpose.trim().is_empty() || r.purpose.len() > domains::MAX_PURPOSE_BYTES {
                        return Err(KmsError::InvalidArgument {
                            field: "purpose",
                            reason: "a purpose of use is required (at most 256 bytes)",
                        });
                    }
                    if r.patient_token.is_empty()
                        || r.patient_token.len() > domains::MAX_VALUE_BYTES
                    {
                        return Err(KmsError::InvalidArgument {
                            field: "patient_token",
                            reason: "the pseudonym of the patient concerned is required",
                        });
                    }
                    domains::check_batch(&r.tokens, "tokens")?;
                    let transform = domains::parse_transform(&r.transform_json)?;
                    facts
                        .detail
                        .insert("transform".into(), transform.kind().to_string());
                    let access = self.authz.access(&caller);
                    let items = match transform {
                        ServerTransform::Vault => {
                            self.domains
                                .vault_detokenize(&access, &r.domain, &r.field, &r.tokens)
                                .await?
                        }
                        ServerTransform::Local(transform) => {
                            let version = match r.key_version {
                                0 => r
                                    .tokens
                                    .first()
                                    .and_then(|t| tokenize::token_key_version(t))
                                    .unwrap_or(0),
                                v => v,
                            };
                            let (info, key) = self
                                .domains
                                .key(&access, KeyOp::Reidentify, &r.domain, version)
                                .await?;
                            facts.resolved(info.key_id, 0);
                            facts
                                .detail
                                .insert("domain_version".into(), key.version().to_string());
                            run_cpu(move || {
                                domains::detokenize_all(&key, &r.field, &transform, &r.tokens)
                            })
                            .await?
                        }
                    };
                    Ok(DetokenizeResponse {
                        results: token_results("Detokenize", items, &mut facts),
                    })
                }
                .await;
                (result, facts)
            },
        )
        .await
    }
}

/// Runs CPU-bound work (a batch of transforms) off the async workers.
async fn run_cpu<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, KmsError> + Send + 'static,
) -> Result<T, KmsError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| KmsError::Internal {
            what: "transform task failed",
        })?
}

/// Per-value results; the audit record gets the counts (never values or tokens).
fn token_results(
    rpc: &'static str,
    items: Vec<Result<domains::Item, KmsError>>,
    facts: &mut Facts,
) -> Vec<TokenResult> {
    let failed = items.iter().filter(|i| i.is_err()).count();
    facts.detail.insert("failed".into(), failed.to_string());
    items
        .into_iter()
        .map(|item| match item {
            Ok(domains::Item::Value(value)) => TokenResult {
                value,
                dropped: false,
                status: Some(ok_status()),
            },
            Ok(domains::Item::Dropped) => TokenResult {
                value: String::new(),
                dropped: true,
                status: Some(ok_status()),
            },
            Err(e) => TokenResult {
                value: String::new(),
                dropped: false,
                status: Some(item_status(rpc, e)),
            },
        })
        .collect()
}

fn domain_message(d: domains::DomainInfo) -> Domain {
    Domain {
        domain: d.domain,
        key_id: d.key_id.to_string(),
        current_version: d.current_version,
        created_at: d.created_at,
        created_by: d.created_by,
    }
}

/// The response stream of a backup download.
type BackupStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<BackupChunk, Status>> + Send>>;

/// Largest chunk of a backup file in either direction.
const BACKUP_CHUNK: usize = 32 * 1024;

/// A backup file as a stream of chunks.
fn chunked(file: Vec<u8>) -> BackupStream {
    let chunks: Vec<Result<BackupChunk, Status>> = file
        .chunks(BACKUP_CHUNK)
        .map(|c| Ok(BackupChunk { data: c.to_vec() }))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// Reads an uploaded backup file, refusing chunks over [`BACKUP_CHUNK`] and files over
/// [`crate::recovery::backup::MAX_BACKUP_BYTES`].
async fn collect_backup(mut chunks: tonic::Streaming<BackupChunk>) -> Result<Vec<u8>, KmsError> {
    use crate::recovery::backup::MAX_BACKUP_BYTES;
    let mut file = Vec::new();
    loop {
        match chunks.message().await {
            Ok(Some(chunk)) => {
                if chunk.data.len() > BACKUP_CHUNK {
                    return Err(KmsError::TooLarge {
                        field: "backup chunk",
                        max: BACKUP_CHUNK,
                    });
                }
                if file.len() + chunk.data.len() > MAX_BACKUP_BYTES {
                    return Err(KmsError::TooLarge {
                        field: "backup",
                        max: MAX_BACKUP_BYTES,
                    });
                }
                file.extend_from_slice(&chunk.data);
            }
            Ok(None) => return Ok(file),
            Err(_) => {
                return Err(KmsError::InvalidArgument {
                    field: "backup",
                    reason: "the upload was interrupted",
                })
            }
        }
    }
}

fn custodian_key(k: crate::recovery::CustodianKey) -> CustodianKey {
    CustodianKey {
        principal: k.principal,
        recipient: k.recipient,
        registered_at: k.registered_at,
    }
}

fn share_status(s: crate::recovery::ShareStatus) -> RecoveryShareStatus {
    RecoveryShareStatus {
        index: s.index,
        custodian: s.custodian,
        confirmed_at: s.confirmed_at,
    }
}

fn recovery_status(s: crate::recovery::Status) -> RecoveryStatus {
    RecoveryStatus {
        ceremony_id: s.ceremony_id,
        threshold: s.threshold,
        share_count: s.share_count,
        kcv: s.kcv,
        created_at: s.created_at,
        closed_at: s.closed_at,
        shares: s.shares.into_iter().map(share_status).collect(),
        session: s.session.map(|session| RecoverySession {
            session_id: session.session_id,
            purpose: session.purpose.to_owned(),
            nonce: session.nonce,
            ceremony_id: session.ceremony_id,
            threshold: session.threshold,
            accepted: session.accepted.into_iter().map(share_status).collect(),
            rejected: session
                .rejected
                .into_iter()
                .map(|r| RecoveryRejection {
                    principal: r.principal,
                    index: r.index,
                    reason: r.reason,
                    at: r.at,
                })
                .collect(),
            opened_at: session.opened_at,
        }),
        completed: s.completed,
    }
}

fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}
