//! `kms-cli domain`, `kms-cli tokenize` and `kms-cli detokenize`: tokenization domains
//! (officers), server-side tokenization (tokenizers) and re-identification (re-identifiers,
//! with a purpose of use; each call is a recorded disclosure about one patient).
//!
//! Values and tokens come as arguments or, with `-`, one per line on standard input, and go
//! out one per line in the same order (JSON with `--output json`), so that shell pipelines and
//! scripts can use them.

use std::io::{BufRead, Write};

use anyhow::bail;
use clap::{Args, Subcommand};
use sdk::domains::{Domain, TokenResult};
use sdk::{Disclosure, KmsClient};
use serde_json::json;

use crate::emit;
use crate::governance::show_approval;

/// Tokenization domains.
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Create a domain whose keys are sealed under a master key.
    Create {
        /// 1 to 64 of a-z 0-9 . _ -
        domain: String,
        /// The master key (id or alias).
        #[arg(long)]
        key: String,
    },
    /// Every domain.
    List,
    /// Propose the domain's next key version (runs when a second officer approves; new
    /// pseudonyms then no longer join with older ones).
    Rotate {
        /// The domain.
        domain: String,
    },
}

/// What `kms-cli tokenize` transforms.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The domain.
    #[arg(long)]
    pub domain: String,
    /// The field name (part of every derived key).
    #[arg(long)]
    pub field: String,
    /// The transform as JSON, e.g. '{"kind":"pseudonym"}'.
    #[arg(long)]
    pub transform: String,
    /// For date shifts: the patient pseudonym of every value.
    #[arg(long)]
    pub patient: Option<String>,
    /// Values, or `-` to read one per line from standard input.
    #[arg(required = true)]
    pub values: Vec<String>,
}

/// What `kms-cli detokenize` reverses, and why.
#[derive(Debug, Args)]
pub struct DetokenizeArgs {
    /// The domain.
    #[arg(long)]
    pub domain: String,
    /// The field the tokens came from.
    #[arg(long)]
    pub field: String,
    /// The transform the tokens were made with, as JSON.
    #[arg(long)]
    pub transform: String,
    /// The purpose of use (recorded in clear: never PHI), e.g. `treatment`.
    #[arg(long)]
    pub purpose: String,
    /// The pseudonym of the patient the tokens belong to (the disclosure is listed under it).
    #[arg(long)]
    pub patient_token: String,
    /// Domain key version; default: read from the tokens, else the current one.
    #[arg(long, default_value_t = 0)]
    pub key_version: u32,
    /// Tokens, or `-` to read one per line from standard input.
    #[arg(required = true)]
    pub tokens: Vec<String>,
}

/// Runs a domain command.
pub async fn domain(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    command: DomainCommand,
) -> anyhow::Result<()> {
    match command {
        DomainCommand::Create { domain, key } => {
            let d = client.create_domain(&domain, &key).await?;
            emit(out, json, domain_json(&d), || domain_text(&d))
        }
        DomainCommand::List => {
            let domains = client.list_domains().await?;
            let doc = json!(domains.iter().map(domain_json).collect::<Vec<_>>());
            emit(out, json, doc, || {
                domains
                    .iter()
                    .map(domain_text)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        DomainCommand::Rotate { domain } => {
            let approval = client.propose_domain_rotation(&domain).await?;
            show_approval(out, json, &approval)
        }
    }
}

/// Runs `kms-cli tokenize`.
pub async fn tokenize(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    args: TokenizeArgs,
) -> anyhow::Result<()> {
    let values = arguments_or_stdin(args.values)?;
    let patients = match &args.patient {
        Some(p) => vec![p.clone(); values.len()],
        None => Vec::new(),
    };
    let response = client
        .tokenize(&args.domain, &args.field, &args.transform, values, patients)
        .await?;
    print_results(out, json, &response.results, Some(response.key_version))
}

/// Runs `kms-cli detokenize`.
pub async fn detokenize(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    args: DetokenizeArgs,
) -> anyhow::Result<()> {
    let tokens = arguments_or_stdin(args.tokens)?;
    let disclosure = Disclosure {
        domain: args.domain,
        field: args.field,
        transform_json: args.transform,
        purpose: args.purpose,
        patient_token: args.patient_token,
        key_version: args.key_version,
    };
    let results = client.detokenize(&disclosure, tokens).await?;
    print_results(out, json, &results, None)
}

/// One result per line (an item that failed prints as `!CODE message` in text mode); exits
/// with an error after printing if any item failed.
fn print_results(
    out: &mut dyn Write,
    json: bool,
    results: &[TokenResult],
    key_version: Option<u32>,
) -> anyhow::Result<()> {
    let failed = results
        .iter()
        .filter(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
        .count();
    let doc = json!({
        "key_version": key_version,
        "results": results.iter().map(|r| {
            let status = r.status.clone().unwrap_or_default();
            json!({"value": r.value, "dropped": r.dropped, "code": status.code,
                "message": status.message})
        }).collect::<Vec<_>>(),
    });
    emit(out, json, doc, || {
        results
            .iter()
            .map(|r| match &r.status {
                Some(s) if s.code != 0 => format!("!{} {}", s.code, s.message),
                _ if r.dropped => String::new(),
                _ => r.value.clone(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    if failed > 0 {
        bail!("{failed} of {} items failed", results.len());
    }
    Ok(())
}

/// `["-"]` reads standard input, one value per line (without the line end); anything else
/// is taken as given.
fn arguments_or_stdin(values: Vec<String>) -> anyhow::Result<Vec<String>> {
    if values != ["-"] {
        return Ok(values);
    }
    let mut read = Vec::new();
    for line in std::io::stdin().lock().lines() {
        read.push(line?);
    }
    Ok(read)
}

fn domain_json(d: &Domain) -> serde_json::Value {
    json!({"domain": d.domain, "key_id": d.key_id, "current_version": d.current_version,
        "created_at": d.created_at, "created_by": d.created_by})
}

fn domain_text(d: &Domain) -> String {
    format!(
        "{:<24} v{} key {} (created by {})",
        d.domain, d.current_version, d.key_id, d.created_by
    )
}
