//! Commands of officers, approvers and auditors: role bindings, grants, quorums, approvals,
//! break-glass and the audit trail.

use std::io::Write;

use anyhow::bail;
use clap::Subcommand;
use sdk::governance::{Approval, Grant, ListAuditRecordsRequest};
use sdk::{GrantSpec, KmsClient};
use serde_json::json;

use crate::{context_of, emit, parse_pair};

/// Audit records per request when exporting.
const PAGE: u32 = 1000;

/// Role bindings.
#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// List every binding.
    List,
    /// Propose binding a role to a principal (needs approval).
    Bind {
        /// The principal, as read from its certificate (URI SAN or CN).
        principal: String,
        /// security-officer, app, tokenizer, reidentifier, custodian, auditor or break-glass.
        role: String,
    },
    /// Propose removing a binding (needs approval).
    Unbind {
        /// The principal.
        principal: String,
        /// The role.
        role: String,
    },
}

/// Key grants.
#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Propose a grant (takes effect when approved).
    Propose {
        /// The grantee (an app, tokenizer or re-identifier principal).
        #[arg(long)]
        principal: String,
        /// Key id or alias.
        #[arg(long)]
        key: String,
        /// generate-data-key, encrypt, decrypt, re-encrypt (apps); tokenize, domain-key
        /// (tokenizers); reidentify (re-identifiers). Repeatable or comma-separated.
        #[arg(long = "operation", value_delimiter = ',', required = true)]
        operations: Vec<String>,
        /// Context key every call must carry; repeatable.
        #[arg(long = "require-context-key")]
        required_context_keys: Vec<String>,
        /// Context entry every call must carry, as key=value; repeatable.
        #[arg(long = "context-equals", value_parser = parse_pair)]
        context_equals: Vec<(String, String)>,
        /// Expiry, seconds since the Unix epoch.
        #[arg(long)]
        expires_at: Option<i64>,
    },
    /// List grants.
    List {
        /// Only this principal's.
        #[arg(long)]
        principal: Option<String>,
        /// Only this key's.
        #[arg(long)]
        key: Option<String>,
    },
    /// Revoke a grant at once.
    Revoke {
        /// The grant id.
        grant_id: String,
    },
}

/// Approval quorums.
#[derive(Debug, Subcommand)]
pub enum QuorumCommand {
    /// Show the quorum of every kind of request.
    List,
    /// Propose a new quorum (needs approval under the current quorum of `quorum`).
    Propose {
        /// grant, role-binding, quorum, key-deletion or break-glass.
        kind: String,
        /// Distinct approvers required besides the proposer.
        #[arg(long)]
        required: u32,
        /// The approvers' role.
        #[arg(long, default_value = "security-officer")]
        approver_role: String,
    },
}

/// Dual-control approval requests.
#[derive(Debug, Subcommand)]
pub enum ApprovalCommand {
    /// List requests, newest first.
    List {
        /// Pending ones only.
        #[arg(long)]
        pending: bool,
    },
    /// Show one request with its exact parameters.
    Show {
        /// Request id.
        approval_id: String,
    },
    /// Approve; the last required approval runs the request. Exits 1 when the request ran and
    /// failed (state `failed`; the request is still printed).
    Approve {
        /// Request id.
        approval_id: String,
    },
    /// Reject for good (or, as its proposer, withdraw).
    Reject {
        /// Request id.
        approval_id: String,
    },
}

/// Break-glass.
#[derive(Debug, Subcommand)]
pub enum BreakGlassCommand {
    /// Ask for an emergency window to use named keys.
    Open {
        /// Key id or alias; repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// Why (10-1000 characters, never PHI); reviewed afterwards.
        #[arg(long)]
        justification: String,
        /// Window length in seconds (0: the server's maximum).
        #[arg(long, default_value_t = 3600)]
        duration_seconds: u64,
    },
    /// List windows.
    List,
}

/// The audit trail.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the whole chain and its HSM-MACed checkpoints; exit 1 at the first bad record.
    Verify,
    /// Write every record (after --after-seq) as JSON lines, for a SIEM.
    Export {
        /// Start after this record.
        #[arg(long, default_value_t = 0)]
        after_seq: u64,
        /// Only records about this identifier (compared by keyed hash, never stored).
        #[arg(long)]
        identifier: Option<String>,
    },
    /// The keyed hash under which records store VALUE.
    Hash {
        /// An identifier or context value.
        value: String,
    },
    /// Every use under a break-glass window, with the windows' justifications.
    BreakGlassReport,
    /// The accounting of disclosures about one pseudonymized patient: every `Detokenize`
    /// call that named them (who, when, why, which domain and field, how many tokens).
    Disclosures {
        /// The patient's pseudonym, as in the de-identified data.
        #[arg(long)]
        patient_token: String,
    },
}

/// Runs a role command.
pub async fn roles(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    command: RoleCommand,
) -> anyhow::Result<()> {
    match command {
        RoleCommand::List => {
            let bindings = client.list_role_bindings().await?;
            let doc = json!(bindings
                .iter()
                .map(|b| json!({"principal": b.principal, "role": b.role,
                    "created_at": b.created_at, "approval_id": b.approval_id}))
                .collect::<Vec<_>>());
            emit(out, json, doc, || {
                bindings
                    .iter()
                    .map(|b| format!("{:<18} {}", b.role, b.principal))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        RoleCommand::Bind { principal, role } => {
            let a = client
                .propose_role_binding(&principal, &role, false)
                .await?;
            show_approval(out, json, &a)
        }
        RoleCommand::Unbind { principal, role } => {
            let a = client.propose_role_binding(&principal, &role, true).await?;
            show_approval(out, json, &a)
        }
    }
}

/// Runs a grant command.
pub async fn grants(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    command: GrantCommand,
) -> anyhow::Result<()> {
    match command {
        GrantCommand::Propose {
            principal,
            key,
            operations,
            required_context_keys,
            context_equals,
            expires_at,
        } => {
            let spec = GrantSpec {
                principal,
                key,
                operations,
                required_context_keys,
                context_equals: context_of(context_equals)?,
                expires_at,
            };
            let a = client.propose_grant(spec).await?;
            show_approval(out, json, &a)
        }
        GrantCommand::List { principal, key } => {
            let grants = client
                .list_grants(principal.as_deref(), key.as_deref())
                .await?;
            let doc = json!(grants.iter().map(grant_json).collect::<Vec<_>>());
            emit(out, json, doc, || {
                grants.iter().map(grant_text).collect::<Vec<_>>().join("\n")
            })
        }
        GrantCommand::Revoke { grant_id } => {
            let g = client.revoke_grant(&grant_id).await?;
            emit(out, json, grant_json(&g), || {
                format!("revoked {}", grant_text(&g))
            })
        }
    }
}

/// Runs a quorum command.
pub async fn quorums(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    command: QuorumCommand,
) -> anyhow::Result<()> {
    match command {
        QuorumCommand::List => {
            let quorums = client.list_quorums().await?;
            let doc = json!(quorums
                .iter()
                .map(|q| json!({"kind": q.kind, "required": q.required,
                    "approver_role": q.approver_role}))
                .collect::<Vec<_>>());
            emit(out, json, doc, || {
                quorums
                    .iter()
                    .map(|q| format!("{:<14} {} x {}", q.kind, q.required, q.approver_role))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        QuorumCommand::Propose {
            kind,
            required,
            approver_role,
        } => {
            let a = client
                .propose_quorum(&kind, required, &approver_role)
                .await?;
            show_approval(out, json, &a)
        }
    }
}

/// Runs an approval command.
pub async fn approvals(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    command: ApprovalCommand,
) -> anyhow::Result<()> {
    match command {
        ApprovalCommand::List { pending } => {
            let list = client.list_approvals(pending).await?;
            let doc = json!(list.iter().map(approval_json).collect::<Vec<_>>());
            emit(out, json, doc, || {
                if list.is_empty() {
                    return "no approval requests".to_string();
                }
                list.iter()
                    .map(|a| {
                        format!(
                            "{}  {:<12} {:<9} {}/{} {}  by {}",
                            a.approval_id,
                            a.kind,
                            a.state,
                            a.approvers.len(),
                            a.required,
                            a.approver_role,
                            a.proposer
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        ApprovalCommand::Show { approval_id } => {
            show_approval(out, json, &client.approval(&approval_id).await?)
        }
        ApprovalCommand::Approve { approval_id } => {
            let a = client.approve(&approval_id).await?;
            show_approval(out, json, &a)?;
            // The vote counted, but the request ran and failed: the command failed (exit 1),
            // its outcome shown above. `pending` (more approvals needed) and `executed` are 0.
            if a.state == "failed" {
                bail!(
                    "approval {} failed: {}",
                    a.approval_id,
                    if a.result.is_empty() {
                        "no reason given"
                    } else {
                        a.result.as_str()
                    }
                );
            }
            Ok(())
        }
        ApprovalCommand::Reject { approval_id } => {
            show_approval(out, json, &client.reject(&approval_id).await?)
        }
    }
}

/// Runs a break-glass command.
pub async fn break_glass(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    command: BreakGlassCommand,
) -> anyhow::Result<()> {
    match command {
        BreakGlassCommand::Open {
            keys,
            justification,
            duration_seconds,
        } => {
            let r = client
                .open_break_glass(&keys, &justification, duration_seconds)
                .await?;
            match (r.window, r.approval) {
                (Some(w), _) => emit(
                    out,
                    json,
                    json!({"window_id": w.window_id, "key_ids": w.key_ids,
                        "opened_at": w.opened_at, "closes_at": w.closes_at}),
                    || {
                        format!(
                            "break-glass window {} OPEN until {} (every use is audited)",
                            w.window_id, w.closes_at
                        )
                    },
                ),
                (None, Some(a)) => show_approval(out, json, &a),
                (None, None) => bail!("the server answered with neither a window nor a request"),
            }
        }
        BreakGlassCommand::List => {
            let windows = client.list_break_glass_windows().await?;
            let doc = json!(windows
                .iter()
                .map(
                    |w| json!({"window_id": w.window_id, "principal": w.principal,
                    "key_ids": w.key_ids, "justification": w.justification,
                    "opened_at": w.opened_at, "closes_at": w.closes_at,
                    "approval_id": w.approval_id})
                )
                .collect::<Vec<_>>());
            emit(out, json, doc, || {
                windows
                    .iter()
                    .map(|w| {
                        format!(
                            "{} {} {}..{} keys {} — {}",
                            w.window_id,
                            w.principal,
                            w.opened_at,
                            w.closes_at,
                            w.key_ids.join(","),
                            w.justification
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}

/// Runs an audit command.
pub async fn audit(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    command: AuditCommand,
) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify => {
            let r = client.verify_audit().await?;
            emit(
                out,
                json,
                json!({"intact": r.intact, "records_checked": r.records_checked,
                    "checkpoints_checked": r.checkpoints_checked,
                    "unsealed_records": r.unsealed_records,
                    "first_bad_seq": r.first_bad_seq, "problem": r.problem}),
                || {
                    if r.intact {
                        format!(
                            "audit trail intact: {} records, {} checkpoints verified{}",
                            r.records_checked,
                            r.checkpoints_checked,
                            match r.unsealed_records {
                                0 => String::new(),
                                n => format!(" ({n} newest records not yet under a checkpoint)"),
                            }
                        )
                    } else {
                        format!(
                            "AUDIT TRAIL DAMAGED at record {}: {}",
                            r.first_bad_seq, r.problem
                        )
                    }
                },
            )?;
            if !r.intact {
                bail!("audit trail damaged at record {}", r.first_bad_seq);
            }
            Ok(())
        }
        AuditCommand::Export {
            after_seq,
            identifier,
        } => {
            let identifier_hash = match identifier {
                Some(value) => client.hash_identifier(&value).await?,
                None => String::new(),
            };
            let mut after = after_seq;
            loop {
                let page = client
                    .list_audit_records(ListAuditRecordsRequest {
                        after_seq: after,
                        page_size: PAGE,
                        break_glass_only: false,
                        identifier_hash: identifier_hash.clone(),
                    })
                    .await?;
                for line in &page.records_json {
                    writeln!(out, "{line}")?;
                }
                // A short page is the end: every request (these included) adds a record, so
                // "until empty" would never end.
                if page.records_json.len() < PAGE as usize || page.last_seq <= after {
                    return Ok(());
                }
                after = page.last_seq;
            }
        }
        AuditCommand::Hash { value } => {
            let hash = client.hash_identifier(&value).await?;
            emit(out, json, json!({"hash": hash}), || hash.clone())
        }
        AuditCommand::BreakGlassReport => {
            let windows = client.list_break_glass_windows().await?;
            let uses = all_records(client, true, String::new()).await?;
            let doc = json!({
                "windows": windows.iter().map(|w| json!({"window_id": w.window_id,
                    "principal": w.principal, "key_ids": w.key_ids,
                    "justification": w.justification, "opened_at": w.opened_at,
                    "closes_at": w.closes_at, "approval_id": w.approval_id}))
                    .collect::<Vec<_>>(),
                "uses": uses,
            });
            emit(out, json, doc, || {
                let mut text = format!(
                    "{} break-glass windows, {} audited records under them\n",
                    windows.len(),
                    uses.len()
                );
                for w in &windows {
                    text.push_str(&format!(
                        "window {} by {} ({}..{}): {}\n",
                        w.window_id, w.principal, w.opened_at, w.closes_at, w.justification
                    ));
                    for u in uses
                        .iter()
                        .filter(|u| u["break_glass"] == w.window_id.as_str())
                    {
                        text.push_str(&format!(
                            "  #{} {} {} key {} -> {}\n",
                            u["seq"], u["time"], u["operation"], u["key_id"], u["outcome"]
                        ));
                    }
                }
                text.trim_end().to_string()
            })
        }
        AuditCommand::Disclosures { patient_token } => {
            let hash = client.hash_identifier(&patient_token).await?;
            let disclosures: Vec<serde_json::Value> = all_records(client, false, hash)
                .await?
                .into_iter()
                .filter(|r| r["operation"] == "Detokenize")
                .map(|r| {
                    let d = &r["detail"];
                    json!({"seq": r["seq"], "time": r["time"], "principal": r["principal"],
                        "outcome": r["outcome"], "purpose": d["purpose"], "domain": d["domain"],
                        "field": d["field"], "tokens": d["tokens"],
                        "request_id": r["request_id"]})
                })
                .collect();
            emit(out, json, json!(disclosures), || {
                let mut text = format!("{} disclosures\n", disclosures.len());
                for d in &disclosures {
                    text.push_str(&format!(
                        "#{} {} {} {} {}/{} {} tokens, purpose {}\n",
                        d["seq"],
                        d["time"],
                        d["principal"],
                        d["outcome"],
                        d["domain"],
                        d["field"],
                        d["tokens"],
                        d["purpose"]
                    ));
                }
                text.trim_end().to_string()
            })
        }
    }
}

/// Every audit record matching the filter, in order, as JSON values.
async fn all_records(
    client: &KmsClient,
    break_glass_only: bool,
    identifier_hash: String,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut records = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .list_audit_records(ListAuditRecordsRequest {
                after_seq: after,
                page_size: PAGE,
                break_glass_only,
                identifier_hash: identifier_hash.clone(),
            })
            .await?;
        let full = page.records_json.len() == PAGE as usize;
        for line in page.records_json {
            records.push(serde_json::from_str::<serde_json::Value>(&line)?);
        }
        // A short page is the end: every request (these included) adds a record.
        if !full || page.last_seq <= after {
            return Ok(records);
        }
        after = page.last_seq;
    }
}

pub(crate) fn show_approval(out: &mut dyn Write, json: bool, a: &Approval) -> anyhow::Result<()> {
    emit(out, json, approval_json(a), || {
        let parameters = serde_json::from_str::<serde_json::Value>(&a.parameters_json)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or_else(|_| a.parameters_json.clone());
        format!(
            "approval request {}\n  kind:      {}\n  state:     {}\n  proposer:  {}\n  \
             approvals: {}/{} ({}){}\n  expires:   {}\n  result:    {}\n  parameters:\n{}",
            a.approval_id,
            a.kind,
            a.state,
            a.proposer,
            a.approvers.len(),
            a.required,
            a.approver_role,
            if a.approvers.is_empty() {
                String::new()
            } else {
                format!(" by {}", a.approvers.join(", "))
            },
            a.expires_at,
            a.result,
            parameters
                .lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn approval_json(a: &Approval) -> serde_json::Value {
    json!({
        "approval_id": a.approval_id,
        "kind": a.kind,
        "state": a.state,
        "proposer": a.proposer,
        "parameters": serde_json::from_str::<serde_json::Value>(&a.parameters_json)
            .unwrap_or(serde_json::Value::Null),
        "required": a.required,
        "approver_role": a.approver_role,
        "approvers": a.approvers,
        "created_at": a.created_at,
        "expires_at": a.expires_at,
        "decided_at": a.decided_at,
        "result": a.result,
    })
}

fn grant_json(g: &Grant) -> serde_json::Value {
    json!({
        "grant_id": g.grant_id,
        "principal": g.principal,
        "key_id": g.key_id,
        "operations": g.operations,
        "required_context_keys": g.required_context_keys,
        "context_equals": g.context_equals,
        "expires_at": g.expires_at,
        "created_at": g.created_at,
        "approval_id": g.approval_id,
        "revoked_at": g.revoked_at,
    })
}

fn grant_text(g: &Grant) -> String {
    let mut text = format!(
        "{} {} on {}: {}",
        g.grant_id,
        g.principal,
        g.key_id,
        g.operations.join(",")
    );
    if !g.required_context_keys.is_empty() {
        text.push_str(&format!(
            " requires context keys [{}]",
            g.required_context_keys.join(",")
        ));
    }
    if !g.context_equals.is_empty() {
        let mut pairs: Vec<_> = g
            .context_equals
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        pairs.sort();
        text.push_str(&format!(" with {}", pairs.join(",")));
    }
    if g.expires_at != 0 {
        text.push_str(&format!(" until {}", g.expires_at));
    }
    if g.revoked_at != 0 {
        text.push_str(&format!(" (revoked at {})", g.revoked_at));
    }
    text
}
