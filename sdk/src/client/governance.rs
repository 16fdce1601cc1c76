//! Identity, role bindings, grants, quorums, dual-control approvals, break-glass and the audit
//! trail: the calls officers, approvers and auditors make. The messages are the API's own
//! (plain data, re-exported from [`crate::governance`]).

use proto::v1 as pb;

use super::{key_request, to_map, Context, KmsClient};
use crate::error::Error;

/// What a grant allows; see [`KmsClient::propose_grant`].
#[derive(Debug, Clone, Default)]
pub struct GrantSpec {
    /// The principal (an app) that may use the key.
    pub principal: String,
    /// The key, by id or alias.
    pub key: String,
    /// Any of `generate-data-key`, `encrypt`, `decrypt`, `re-encrypt`.
    pub operations: Vec<String>,
    /// Context keys every call must carry.
    pub required_context_keys: Vec<String>,
    /// Context entries every call must carry with exactly these values.
    pub context_equals: Context,
    /// Seconds since the Unix epoch; `None`: no expiry.
    pub expires_at: Option<i64>,
}

impl KmsClient {
    /// The caller's principal and roles.
    pub async fn who_am_i(&self) -> Result<pb::WhoAmIResponse, Error> {
        Ok(self
            .rpc()
            .who_am_i(pb::WhoAmIRequest {})
            .await?
            .into_inner())
    }

    /// Every role binding.
    pub async fn list_role_bindings(&self) -> Result<Vec<pb::RoleBinding>, Error> {
        Ok(self
            .rpc()
            .list_role_bindings(pb::ListRoleBindingsRequest {})
            .await?
            .into_inner()
            .bindings)
    }

    /// Proposes binding (or, with `remove`, unbinding) `role` to `principal`.
    pub async fn propose_role_binding(
        &self,
        principal: &str,
        role: &str,
        remove: bool,
    ) -> Result<pb::Approval, Error> {
        let request = pb::ProposeRoleBindingRequest {
            principal: principal.to_string(),
            role: role.to_string(),
            remove,
        };
        Ok(self.rpc().propose_role_binding(request).await?.into_inner())
    }

    /// Proposes a grant; it takes effect when approved.
    pub async fn propose_grant(&self, spec: GrantSpec) -> Result<pb::Approval, Error> {
        let request = pb::ProposeGrantRequest {
            principal: spec.principal,
            key: spec.key,
            operations: spec.operations,
            required_context_keys: spec.required_context_keys,
            context_equals: to_map(&spec.context_equals),
            expires_at: spec.expires_at.unwrap_or(0),
        };
        Ok(self.rpc().propose_grant(request).await?.into_inner())
    }

    /// Revokes a grant at once.
    pub async fn revoke_grant(&self, grant_id: &str) -> Result<pb::Grant, Error> {
        let request = pb::RevokeGrantRequest {
            grant_id: grant_id.to_string(),
        };
        Ok(self.rpc().revoke_grant(request).await?.into_inner())
    }

    /// Grants, optionally one principal's and/or one key's.
    pub async fn list_grants(
        &self,
        principal: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<pb::Grant>, Error> {
        let request = pb::ListGrantsRequest {
            principal: principal.unwrap_or_default().to_string(),
            key: key.unwrap_or_default().to_string(),
        };
        Ok(self.rpc().list_grants(request).await?.into_inner().grants)
    }

    /// Proposes a new quorum for one kind of request.
    pub async fn propose_quorum(
        &self,
        kind: &str,
        required: u32,
        approver_role: &str,
    ) -> Result<pb::Approval, Error> {
        let request = pb::ProposeQuorumRequest {
            quorum: Some(pb::Quorum {
                kind: kind.to_string(),
                required,
                approver_role: approver_role.to_string(),
            }),
        };
        Ok(self.rpc().propose_quorum(request).await?.into_inner())
    }

    /// The quorum of every kind of request.
    pub async fn list_quorums(&self) -> Result<Vec<pb::Quorum>, Error> {
        Ok(self
            .rpc()
            .list_quorums(pb::ListQuorumsRequest {})
            .await?
            .into_inner()
            .quorums)
    }

    /// Approval requests, newest first.
    pub async fn list_approvals(&self, pending_only: bool) -> Result<Vec<pb::Approval>, Error> {
        Ok(self
            .rpc()
            .list_approvals(pb::ListApprovalsRequest { pending_only })
            .await?
            .into_inner()
            .approvals)
    }

    /// One approval request.
    pub async fn approval(&self, approval_id: &str) -> Result<pb::Approval, Error> {
        Ok(self
            .rpc()
            .get_approval(approval_id_of(approval_id))
            .await?
            .into_inner())
    }

    /// Approves a request; the last required approval runs it.
    pub async fn approve(&self, approval_id: &str) -> Result<pb::Approval, Error> {
        Ok(self
            .rpc()
            .approve(approval_id_of(approval_id))
            .await?
            .into_inner())
    }

    /// Rejects (or, as its proposer, withdraws) a request.
    pub async fn reject(&self, approval_id: &str) -> Result<pb::Approval, Error> {
        Ok(self
            .rpc()
            .reject(approval_id_of(approval_id))
            .await?
            .into_inner())
    }

    /// Proposes scheduling a key's destruction after `days` (0: 30; else 7-365); it happens
    /// when approved.
    pub async fn schedule_key_deletion(&self, key: &str, days: u32) -> Result<pb::Approval, Error> {
        let request = pb::ScheduleKeyDeletionRequest {
            key: key_request(key).key,
            pending_window_days: days,
        };
        Ok(self
            .rpc()
            .schedule_key_deletion(request)
            .await?
            .into_inner())
    }

    /// Asks for a break-glass window on `keys` for `duration_seconds` (0: the server's
    /// maximum). Opens at once or waits for approval, as the server's policy says.
    pub async fn open_break_glass(
        &self,
        keys: &[String],
        justification: &str,
        duration_seconds: u64,
    ) -> Result<pb::OpenBreakGlassResponse, Error> {
        let request = pb::OpenBreakGlassRequest {
            keys: keys.to_vec(),
            justification: justification.to_string(),
            duration_seconds,
        };
        Ok(self.rpc().open_break_glass(request).await?.into_inner())
    }

    /// Every break-glass window.
    pub async fn list_break_glass_windows(&self) -> Result<Vec<pb::BreakGlassWindow>, Error> {
        Ok(self
            .rpc()
            .list_break_glass_windows(pb::ListBreakGlassWindowsRequest {})
            .await?
            .into_inner()
            .windows)
    }

    /// Verifies the whole audit trail inside the server (chain and HSM-MACed checkpoints).
    pub async fn verify_audit(&self) -> Result<pb::VerifyAuditResponse, Error> {
        Ok(self
            .rpc()
            .verify_audit(pb::VerifyAuditRequest {})
            .await?
            .into_inner())
    }

    /// One page of audit records after `after_seq`, as JSON lines.
    pub async fn list_audit_records(
        &self,
        request: pb::ListAuditRecordsRequest,
    ) -> Result<pb::ListAuditRecordsResponse, Error> {
        Ok(self.rpc().list_audit_records(request).await?.into_inner())
    }

    /// The keyed hash under which audit records store `value`.
    pub async fn hash_identifier(&self, value: &str) -> Result<String, Error> {
        let request = pb::HashIdentifierRequest {
            value: value.to_string(),
        };
        Ok(self.rpc().hash_identifier(request).await?.into_inner().hash)
    }
}

fn approval_id_of(approval_id: &str) -> pb::ApprovalId {
    pb::ApprovalId {
        approval_id: approval_id.to_string(),
    }
}
