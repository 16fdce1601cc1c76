//! `kms-cli recovery`: M-of-N recovery of the HSM master keys. Officers propose ceremonies,
//! re-shares and backups (each runs when a second officer approves), close ceremonies, restore
//! a backup into an empty server and cancel share sessions. Custodians fetch their sealed
//! share, open and confirm it, and submit it to a restore or re-share session. Shares are
//! opened on the custodian's machine (see [`crate::custodian`]) and are never printed.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use proto::share::ShareEnvelope;
use sdk::governance::Approval;
use sdk::recovery::{
    RecoveryRejection, RecoverySession, RecoveryShareStatus, RecoveryStatus, SubmitShareRequest,
    VerifyRecoveryBackupResponse,
};
use sdk::KmsClient;
use serde_json::json;

use crate::custodian::{self, Identity};
use crate::emit;
use crate::governance::show_approval;

/// The approval kind of a backup request.
const BACKUP_KIND: &str = "recovery-backup";

/// Recovery of the master keys.
#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Propose a recovery domain: a new recovery key split into N shares, M needed (runs when
    /// a second officer approves; each share is sealed to its custodian's registered key).
    Init {
        /// M: shares needed to recover (2..=N).
        #[arg(long)]
        threshold: u32,
        /// A custodian principal; repeat once per share (share i goes to the i-th).
        #[arg(long = "custodian", value_name = "PRINCIPAL", required = true)]
        custodians: Vec<String>,
        /// Replace the existing recovery domain with a new recovery key (old backups and
        /// shares stop working).
        #[arg(long)]
        rekey: bool,
    },
    /// Propose handing the same recovery key to new custodians or a new threshold; once
    /// approved, M current custodians submit their shares (`submit-share`).
    Reshare {
        /// M of the new shares.
        #[arg(long)]
        threshold: u32,
        /// A new custodian principal; repeat once per share.
        #[arg(long = "custodian", value_name = "PRINCIPAL", required = true)]
        custodians: Vec<String>,
    },
    /// Show the recovery domain, its shares' confirmations and the open share session.
    Status,
    /// Custodian: save your sealed share (mode 0600) to keep offline; the server forgets it
    /// when the ceremony is closed.
    FetchShare {
        /// File to write (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Custodian: open your share locally, check it against the ceremony and confirm it.
    VerifyShare {
        /// Your identity file (NAME.identity.age).
        #[arg(long, value_name = "IDENTITY_FILE")]
        key: PathBuf,
        /// The sealed share file (from `fetch-share`); fetched from the server when omitted.
        #[arg(long, value_name = "FILE")]
        share: Option<PathBuf>,
        /// File holding the identity's passphrase (else KMS_CUSTODIAN_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Close a ceremony whose shares are all confirmed; the server forgets the sealed shares.
    Close {
        /// The ceremony id.
        #[arg(long)]
        ceremony: String,
    },
    /// Without --approval: propose a backup. With it: download the backup the approved request
    /// made, write it and verify the written file against the HSM.
    Backup {
        /// File to write (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The executed backup request.
        #[arg(long, value_name = "ID")]
        approval: Option<String>,
    },
    /// Check a backup file against this server's HSM.
    VerifyBackup {
        /// The backup file.
        file: PathBuf,
    },
    /// On an empty server and token: open a restore session for a backup file.
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        backup: PathBuf,
    },
    /// Custodian: open your share locally and submit it to the open session.
    SubmitShare {
        /// Your identity file (NAME.identity.age).
        #[arg(long, value_name = "IDENTITY_FILE")]
        key: PathBuf,
        /// Your sealed share file (from `fetch-share`).
        #[arg(long, value_name = "FILE")]
        share: PathBuf,
        /// File holding the identity's passphrase (else KMS_CUSTODIAN_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Forget the shares submitted to a session and change its nonce.
    Cancel {
        /// The session id.
        #[arg(long)]
        session: String,
    },
}

/// Runs a `recovery` command.
pub async fn run(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    command: RecoveryCommand,
) -> anyhow::Result<()> {
    match command {
        RecoveryCommand::Init {
            threshold,
            custodians,
            rekey,
        } => {
            let a = client
                .propose_recovery_init(threshold, &custodians, rekey)
                .await?;
            show_approval(out, json, &a)?;
            next_steps(
                out,
                json,
                &[
                    approve_step(&a),
                    "then each custodian saves and confirms their share:".to_string(),
                    "  kms-cli recovery fetch-share --out SHARE_FILE".to_string(),
                    "  kms-cli recovery verify-share --key NAME.identity.age --share SHARE_FILE"
                        .to_string(),
                    "then an officer closes the ceremony: kms-cli recovery close --ceremony ID \
                     (`kms-cli recovery status` shows the id and the confirmations)"
                        .to_string(),
                ],
            )
        }
        RecoveryCommand::Reshare {
            threshold,
            custodians,
        } => {
            let a = client
                .propose_recovery_reshare(threshold, &custodians)
                .await?;
            show_approval(out, json, &a)?;
            next_steps(
                out,
                json,
                &[
                    approve_step(&a),
                    "once approved a share session opens: M current custodians run".to_string(),
                    "  kms-cli recovery submit-share --key NAME.identity.age --share SHARE_FILE"
                        .to_string(),
                    "then the new custodians fetch-share and verify-share their new shares"
                        .to_string(),
                ],
            )
        }
        RecoveryCommand::Status => {
            let status = client.recovery_status().await?;
            emit(out, json, status_json(&status), || status_text(&status))
        }
        RecoveryCommand::FetchShare { out: path } => {
            let sealed = client.get_recovery_share().await?;
            custodian::write_new_file(&path, sealed.sealed.as_bytes(), true)?;
            let doc = json!({"ceremony_id": sealed.ceremony_id, "index": sealed.index,
                "path": path});
            emit(out, json, doc, || {
                format!(
                    "saved share {} of ceremony {} to {} (sealed to your key; keep it offline)\n\
                     next: kms-cli recovery verify-share --key NAME.identity.age --share {}",
                    sealed.index,
                    sealed.ceremony_id,
                    path.display(),
                    path.display()
                )
            })
        }
        RecoveryCommand::VerifyShare {
            key,
            share,
            passphrase_file,
        } => verify_share(client, out, json, &key, share.as_deref(), passphrase_file).await,
        RecoveryCommand::Close { ceremony } => {
            let status = client.close_recovery_ceremony(&ceremony).await?;
            emit(out, json, status_json(&status), || {
                format!(
                    "ceremony {ceremony} closed: the server no longer holds sealed shares; \
                     custodians keep theirs offline\n{}",
                    status_text(&status)
                )
            })
        }
        RecoveryCommand::Backup {
            out: path,
            approval: None,
        } => {
            custodian::refuse_existing(&path)?;
            let a = client.propose_recovery_backup().await?;
            if a.state == "executed" {
                return download_backup(client, out, json, &a, &path).await;
            }
            show_approval(out, json, &a)?;
            next_steps(
                out,
                json,
                &[
                    approve_step(&a),
                    format!(
                        "then: kms-cli recovery backup --approval {} --out {}",
                        a.approval_id,
                        path.display()
                    ),
                ],
            )
        }
        RecoveryCommand::Backup {
            out: path,
            approval: Some(approval_id),
        } => {
            custodian::refuse_existing(&path)?;
            let a = client.approval(&approval_id).await?;
            download_backup(client, out, json, &a, &path).await
        }
        RecoveryCommand::VerifyBackup { file } => {
            let content = read_file(&file)?;
            let v = client.verify_recovery_backup(content).await?;
            emit(out, json, verified_json(&v, &file), || {
                format!(
                    "{} verified against this server's HSM: backup {} of ceremony {}, {} keys \
                     ({} versions)",
                    file.display(),
                    v.backup_id,
                    v.ceremony_id,
                    v.keys,
                    v.key_versions
                )
            })
        }
        RecoveryCommand::Restore { backup } => {
            let content = read_file(&backup)?;
            let custodians = backup_custodians(&content);
            let status = client.begin_restore(content).await?;
            let Some(session) = status.session.as_ref() else {
                bail!("the server opened no restore session");
            };
            // The server's list when it has one, else the backup's own manifest.
            let custodians: Vec<(u32, String)> = if status.shares.is_empty() {
                custodians
            } else {
                status
                    .shares
                    .iter()
                    .map(|s| (s.index, s.custodian.clone()))
                    .collect()
            };
            let doc = json!({
                "session": session_json(session),
                "custodians": custodians.iter().map(|(index, principal)|
                    json!({"index": index, "custodian": principal})).collect::<Vec<_>>(),
            });
            emit(out, json, doc, || {
                let mut text = format!(
                    "restore session {} open\n  ceremony  {}\n  nonce     {}\n  needs     {} \
                     shares, from any of:",
                    session.session_id, session.ceremony_id, session.nonce, session.threshold
                );
                if custodians.is_empty() {
                    text.push_str(" the custodians of that ceremony");
                }
                for (index, principal) in &custodians {
                    text.push_str(&format!("\n    share {index:<3} {principal}"));
                }
                text.push_str(
                    "\nnext: each of them runs\n  kms-cli recovery submit-share --key \
                     NAME.identity.age --share SHARE_FILE\n(`kms-cli recovery status` shows \
                     the progress)",
                );
                text
            })
        }
        RecoveryCommand::SubmitShare {
            key,
            share,
            passphrase_file,
        } => submit_share(client, out, json, &key, &share, passphrase_file).await,
        RecoveryCommand::Cancel { session } => {
            let status = client.cancel_recovery_session(&session).await?;
            emit(out, json, status_json(&status), || {
                let nonce = status
                    .session
                    .as_ref()
                    .map(|s| s.nonce.as_str())
                    .unwrap_or("-");
                format!(
                    "session {session} cancelled: the shares submitted so far are forgotten; \
                     new nonce {nonce} (custodians submit again)"
                )
            })
        }
    }
}

/// `verify-share`: opens the share, checks it against the current ceremony, confirms it.
async fn verify_share(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    key: &Path,
    share: Option<&Path>,
    passphrase_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let identity = open_identity(key, passphrase_file.as_deref())?;
    let envelope = match share {
        Some(file) => open_share_file(&identity, file)?,
        None => {
            let sealed = client.get_recovery_share().await?;
            let envelope = custodian::open_share(&identity, &sealed.sealed)?;
            if (sealed.ceremony_id.as_str(), sealed.index)
                != (envelope.ceremony_id.as_str(), envelope.index)
            {
                bail!(
                    "the server sent share {} of ceremony {}, but it holds share {} of \
                     ceremony {}",
                    sealed.index,
                    sealed.ceremony_id,
                    envelope.index,
                    envelope.ceremony_id
                );
            }
            envelope
        }
    };
    let status = client.recovery_status().await?;
    check_against_ceremony(&envelope, &status)?;
    client
        .confirm_recovery_share(&envelope.ceremony_id, envelope.index, &envelope.commitment)
        .await?;
    let doc = json!({
        "ceremony_id": envelope.ceremony_id,
        "index": envelope.index,
        "threshold": envelope.threshold,
        "shares": envelope.shares,
        "custodian": envelope.custodian,
        "confirmed": true,
    });
    emit(out, json, doc, || {
        let mut text = format!(
            "share {} of ceremony {} verified and confirmed ({} of {} needed to recover)",
            envelope.index, envelope.ceremony_id, envelope.threshold, envelope.shares
        );
        if share.is_none() {
            text.push_str(
                "\nnot saved: keep a copy with `kms-cli recovery fetch-share --out FILE` before \
                 the ceremony is closed",
            );
        }
        text
    })
}

/// The share must belong to the current ceremony, at an index the ceremony gave its
/// custodian, with the ceremony's recovery key.
fn check_against_ceremony(envelope: &ShareEnvelope, status: &RecoveryStatus) -> anyhow::Result<()> {
    if status.ceremony_id.is_empty() {
        bail!(
            "the share belongs to ceremony {}, but the server has no recovery domain",
            envelope.ceremony_id
        );
    }
    if envelope.ceremony_id != status.ceremony_id {
        bail!(
            "the share belongs to ceremony {}, but the current ceremony is {}",
            envelope.ceremony_id,
            status.ceremony_id
        );
    }
    let Some(entry) = status.shares.iter().find(|s| s.index == envelope.index) else {
        bail!(
            "the share has index {}, but ceremony {} has shares 1..={}",
            envelope.index,
            status.ceremony_id,
            status.share_count
        );
    };
    if entry.custodian != envelope.custodian {
        bail!(
            "share {} was made for {}, but ceremony {} gave share {} to {}",
            envelope.index,
            envelope.custodian,
            status.ceremony_id,
            entry.index,
            entry.custodian
        );
    }
    if !status.kcv.is_empty() && envelope.kcv != status.kcv {
        bail!(
            "the share is of the recovery key with check value {}, but the server's is {}",
            envelope.kcv,
            status.kcv
        );
    }
    Ok(())
}

/// `submit-share`: opens the share and submits it to the open session.
async fn submit_share(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    key: &Path,
    share: &Path,
    passphrase_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let status = client.recovery_status().await?;
    let Some(session) = status.session else {
        bail!(
            "no share session is open: an officer opens one with `kms-cli recovery restore` or \
             an approved `kms-cli recovery reshare`"
        );
    };
    let identity = open_identity(key, passphrase_file.as_deref())?;
    let envelope = open_share_file(&identity, share)?;
    if envelope.ceremony_id != session.ceremony_id {
        bail!(
            "the share belongs to ceremony {}, but the {} session {} needs shares of ceremony {}",
            envelope.ceremony_id,
            session.purpose,
            session.session_id,
            session.ceremony_id
        );
    }
    let request = SubmitShareRequest {
        session_id: session.session_id.clone(),
        nonce: session.nonce.clone(),
        ceremony_id: envelope.ceremony_id.clone(),
        index: envelope.index,
        custodian: envelope.custodian.clone(),
        share: envelope
            .share_bytes()
            .map_err(|reason| anyhow::anyhow!("the opened share: {reason}"))?
            .to_vec(),
    };
    let after = client.submit_share(request).await?;
    let accepted = after
        .session
        .as_ref()
        .map(|s| s.accepted.len())
        .unwrap_or(0);
    let doc = json!({
        "session_id": session.session_id,
        "index": envelope.index,
        "accepted": accepted,
        "threshold": session.threshold,
        "completed": after.completed,
        "status": status_json(&after),
    });
    emit(out, json, doc, || {
        if after.completed.is_empty() {
            format!(
                "share {} accepted: {accepted} of {} in {} session {}",
                envelope.index, session.threshold, session.purpose, session.session_id
            )
        } else {
            format!(
                "share {} accepted; {} session {} completed: {}",
                envelope.index, session.purpose, session.session_id, after.completed
            )
        }
    })
}

/// `backup --approval`: the executed request's backup, written, re-read and verified.
async fn download_backup(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    a: &Approval,
    path: &Path,
) -> anyhow::Result<()> {
    if a.kind != BACKUP_KIND {
        bail!(
            "approval {} is a {} request, not a {BACKUP_KIND}",
            a.approval_id,
            a.kind
        );
    }
    match a.state.as_str() {
        "executed" => {}
        "pending" => bail!(
            "approval {} is pending ({}/{} approvals): the backup is made when it is executed; \
             a second officer runs `kms-cli approvals approve {}`",
            a.approval_id,
            a.approvers.len(),
            a.required,
            a.approval_id
        ),
        state => bail!(
            "approval {} is {state}{}: no backup was made",
            a.approval_id,
            if a.result.is_empty() {
                String::new()
            } else {
                format!(" ({})", a.result)
            }
        ),
    }
    let backup_id = a.result.as_str();
    let content = client
        .get_recovery_backup(backup_id)
        .await
        .with_context(|| format!("download backup {backup_id}"))?;
    custodian::write_new_file(path, &content, true)?;
    drop(content);
    // Verify what is on disk, not what was received.
    let verified = match std::fs::read(path) {
        Ok(written) => client
            .verify_recovery_backup(written)
            .await
            .map_err(anyhow::Error::from)
            .and_then(|v| {
                if v.backup_id == backup_id {
                    Ok(v)
                } else {
                    Err(anyhow::anyhow!(
                        "the file is backup {}, not {backup_id}",
                        v.backup_id
                    ))
                }
            }),
        Err(e) => Err(anyhow::Error::from(e)),
    };
    let verified = match verified {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(e.context(format!(
                "backup {backup_id} written to {} did not verify; the file was removed",
                path.display()
            )));
        }
    };
    emit(out, json, verified_json(&verified, path), || {
        format!(
            "backup {} of ceremony {} written to {} and verified against the HSM: {} keys \
             ({} versions)",
            verified.backup_id,
            verified.ceremony_id,
            path.display(),
            verified.keys,
            verified.key_versions
        )
    })
}

fn open_identity(key: &Path, passphrase_file: Option<&Path>) -> anyhow::Result<Identity> {
    let passphrase = custodian::read_passphrase(passphrase_file)?;
    custodian::load_identity(key, &passphrase)
}

fn open_share_file(identity: &Identity, file: &Path) -> anyhow::Result<ShareEnvelope> {
    let sealed = std::fs::read_to_string(file)
        .with_context(|| format!("read the share file {}", file.display()))?;
    custodian::open_share(identity, &sealed).with_context(|| file.display().to_string())
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// The custodians a backup's manifest names, as (index, principal). Best effort, for display
/// only: the server authenticates the file; an unreadable one gives an empty list.
fn backup_custodians(content: &[u8]) -> Vec<(u32, String)> {
    let body = content
        .iter()
        .position(|&b| b == b'\n')
        .map(|at| &content[at + 1..])
        .unwrap_or_default();
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    doc["ceremony"]["custodians"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| {
                    let index = u32::try_from(e["index"].as_u64()?).ok()?;
                    Some((index, e["custodian"].as_str()?.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Human mode only: what to do next.
fn next_steps(out: &mut dyn Write, json: bool, steps: &[String]) -> anyhow::Result<()> {
    if !json {
        writeln!(out, "next:")?;
        for step in steps {
            writeln!(out, "  {step}")?;
        }
    }
    Ok(())
}

fn approve_step(a: &Approval) -> String {
    match a.state.as_str() {
        "pending" => format!(
            "a second security officer approves it: kms-cli approvals approve {}",
            a.approval_id
        ),
        state => format!("the request is {state}"),
    }
}

fn verified_json(v: &VerifyRecoveryBackupResponse, path: &Path) -> serde_json::Value {
    json!({
        "path": path,
        "verified": true,
        "backup_id": v.backup_id,
        "ceremony_id": v.ceremony_id,
        "keys": v.keys,
        "key_versions": v.key_versions,
    })
}

fn status_json(s: &RecoveryStatus) -> serde_json::Value {
    json!({
        "ceremony_id": s.ceremony_id,
        "threshold": s.threshold,
        "share_count": s.share_count,
        "kcv": s.kcv,
        "created_at": s.created_at,
        "closed_at": s.closed_at,
        "shares": s.shares.iter().map(share_json).collect::<Vec<_>>(),
        "session": s.session.as_ref().map(session_json),
        "completed": s.completed,
    })
}

fn share_json(s: &RecoveryShareStatus) -> serde_json::Value {
    json!({"index": s.index, "custodian": s.custodian, "confirmed_at": s.confirmed_at})
}

fn rejection_json(r: &RecoveryRejection) -> serde_json::Value {
    json!({"principal": r.principal, "index": r.index, "reason": r.reason, "at": r.at})
}

fn session_json(s: &RecoverySession) -> serde_json::Value {
    json!({
        "session_id": s.session_id,
        "purpose": s.purpose,
        "nonce": s.nonce,
        "ceremony_id": s.ceremony_id,
        "threshold": s.threshold,
        "accepted": s.accepted.iter().map(share_json).collect::<Vec<_>>(),
        "rejected": s.rejected.iter().map(rejection_json).collect::<Vec<_>>(),
        "opened_at": s.opened_at,
    })
}

fn status_text(s: &RecoveryStatus) -> String {
    let mut text = if s.ceremony_id.is_empty() {
        "no recovery domain".to_string()
    } else {
        let mut text = format!(
            "ceremony  {}\n  shares    {} of {} needed\n  kcv       {}\n  created   {}\n  \
             state     {}",
            s.ceremony_id,
            s.threshold,
            s.share_count,
            s.kcv,
            s.created_at,
            match s.closed_at {
                0 =>
                    "open (custodians confirm their shares, then an officer closes it)".to_string(),
                at => format!("closed at {at}"),
            }
        );
        for share in &s.shares {
            text.push_str(&format!(
                "\n  share {:<3} {}  {}",
                share.index,
                share.custodian,
                match share.confirmed_at {
                    0 => "NOT CONFIRMED".to_string(),
                    at => format!("confirmed at {at}"),
                }
            ));
        }
        text
    };
    match &s.session {
        None => text.push_str("\nno open share session"),
        Some(session) => {
            text.push_str(&format!(
                "\nsession   {} {} (opened {})\n  ceremony  {}\n  nonce     {}\n  accepted  \
                 {} of {}",
                session.purpose,
                session.session_id,
                session.opened_at,
                session.ceremony_id,
                session.nonce,
                session.accepted.len(),
                session.threshold
            ));
            if !session.accepted.is_empty() {
                let who: Vec<String> = session
                    .accepted
                    .iter()
                    .map(|a| format!("{} ({})", a.index, a.custodian))
                    .collect();
                text.push_str(&format!(": {}", who.join(", ")));
            }
            for r in &session.rejected {
                text.push_str(&format!(
                    "\n  rejected  share {} from {}: {} (at {})",
                    r.index, r.principal, r.reason, r.at
                ));
            }
        }
    }
    if !s.completed.is_empty() {
        text.push_str(&format!("\ncompleted: {}", s.completed));
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;
    use crate::custodian::CustodianCommand;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["kms-cli"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| cli.command)
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn init_takes_repeated_custodians_and_rekey() {
        let command = parse(&[
            "recovery",
            "init",
            "--threshold",
            "2",
            "--custodian",
            "a",
            "--custodian",
            "b",
            "--custodian",
            "c",
            "--rekey",
        ])
        .expect("parse");
        match command {
            Command::Recovery(RecoveryCommand::Init {
                threshold,
                custodians,
                rekey,
            }) => {
                assert_eq!((threshold, rekey), (2, true));
                assert_eq!(custodians, ["a", "b", "c"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["recovery", "init", "--threshold", "2"]).is_err());
    }

    #[test]
    fn backup_is_a_proposal_without_approval_and_needs_out() {
        match parse(&["recovery", "backup", "--out", "b.kmsbak"]).expect("parse") {
            Command::Recovery(RecoveryCommand::Backup {
                approval: None,
                out,
            }) => {
                assert_eq!(out, Path::new("b.kmsbak"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["recovery", "backup", "--approval", "X", "--out", "f"]),
            Ok(Command::Recovery(RecoveryCommand::Backup {
                approval: Some(_),
                ..
            }))
        ));
        assert!(parse(&["recovery", "backup"]).is_err());
    }

    #[test]
    fn verify_share_file_is_optional_but_submit_share_needs_one() {
        assert!(matches!(
            parse(&["recovery", "verify-share", "--key", "k.identity.age"]),
            Ok(Command::Recovery(RecoveryCommand::VerifyShare {
                share: None,
                ..
            }))
        ));
        assert!(parse(&["recovery", "submit-share", "--key", "k.identity.age"]).is_err());
        assert!(parse(&[
            "recovery",
            "submit-share",
            "--key",
            "k",
            "--share",
            "s",
            "--passphrase-file",
            "p"
        ])
        .is_ok());
    }

    #[test]
    fn custodian_keygen_work_factor_is_bounded() {
        let keygen = |wf: &str| {
            parse(&[
                "custodian",
                "keygen",
                "--out",
                "d",
                "--name",
                "n",
                "--work-factor",
                wf,
            ])
        };
        assert!(matches!(
            keygen("10"),
            Ok(Command::Custodian(CustodianCommand::Keygen(_)))
        ));
        assert!(keygen("22").is_ok());
        assert!(keygen("9").is_err());
        assert!(keygen("23").is_err());
        assert!(matches!(
            parse(&["custodian", "register", "--recipient", "age1x"]),
            Ok(Command::Custodian(CustodianCommand::Register { .. }))
        ));
    }

    #[test]
    fn a_share_of_another_ceremony_or_custodian_is_named_with_both() {
        let custodian = "spiffe://h/custodian/a";
        let share = [3u8; 33];
        let commitment = hex::encode(proto::share::commitment("c1", 1, custodian, &share));
        let text = json!({"format": proto::share::FORMAT, "ceremony_id": "c1", "threshold": 2,
            "shares": 2, "index": 1, "custodian": custodian, "kcv": "ab",
            "commitment": commitment, "share": hex::encode(share)})
        .to_string();
        let envelope = ShareEnvelope::parse(text.as_bytes()).expect("envelope");
        let mut status = RecoveryStatus {
            ceremony_id: "c1".into(),
            threshold: 2,
            share_count: 2,
            kcv: "ab".into(),
            shares: vec![
                RecoveryShareStatus {
                    index: 1,
                    custodian: custodian.into(),
                    confirmed_at: 0,
                },
                RecoveryShareStatus {
                    index: 2,
                    custodian: "spiffe://h/custodian/b".into(),
                    confirmed_at: 0,
                },
            ],
            ..Default::default()
        };
        check_against_ceremony(&envelope, &status).expect("matches");
        status.ceremony_id = "c2".into();
        let err = check_against_ceremony(&envelope, &status)
            .unwrap_err()
            .to_string();
        assert!(err.contains("c1") && err.contains("c2"), "{err}");
        status.ceremony_id = "c1".into();
        status.shares[0].custodian = "spiffe://h/custodian/z".into();
        let err = check_against_ceremony(&envelope, &status)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(custodian) && err.contains("custodian/z"),
            "{err}"
        );
    }

    #[test]
    fn backup_custodians_are_read_from_the_manifest_or_left_empty() {
        let file = b"KMS-RECOVERY-BACKUP v1 mac=00\n{\"ceremony\":{\"custodians\":[\
            {\"index\":1,\"custodian\":\"p1\",\"commitment\":\"x\"},\
            {\"index\":3,\"custodian\":\"p3\",\"commitment\":\"y\"}]}}";
        assert_eq!(
            backup_custodians(file),
            [(1, "p1".to_string()), (3, "p3".to_string())]
        );
        assert!(backup_custodians(b"not a backup").is_empty());
    }
}
