//! `kms-cli deid`: de-identify a research data set (CSV files, FHIR R4 bundles, NDJSON) under a
//! policy, with the domain key fetched from the KMS once (a `domain-key` grant) and every
//! transform applied locally by the `deid` engine. A progress bar on the terminal (records,
//! MB/s, ETA); a final report (records, values per transform, rejects by file and line; never
//! values) written as JSON next to the output and printed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sdk::KmsClient;
use serde_json::json;

use crate::emit;

/// What `kms-cli deid` de-identifies, and how.
#[derive(Debug, Args)]
pub struct DeidArgs {
    /// A policy file (TOML) or a built-in profile: hipaa-safe-harbor-synthea-csv,
    /// hipaa-safe-harbor-fhir-r4.
    #[arg(long)]
    pub policy: String,
    /// The tokenization domain (default: the policy's).
    #[arg(long)]
    pub domain: Option<String>,
    /// Input file or folder (recursively).
    #[arg(long = "in")]
    pub in_path: PathBuf,
    /// Output folder (created).
    #[arg(long = "out")]
    pub out_path: PathBuf,
    /// Skip malformed records into files under this folder (outside --out) instead of
    /// stopping the run.
    #[arg(long)]
    pub reject_dir: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<std::num::NonZeroUsize>,
    /// Replace output files that already exist.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `kms-cli deid`.
pub async fn run(
    client: &KmsClient,
    out: &mut dyn std::io::Write,
    json: bool,
    args: DeidArgs,
) -> anyhow::Result<()> {
    let mut policy = deid::Policy::load(&args.policy)?;
    if let Some(domain) = &args.domain {
        policy = policy.with_domain(domain.clone());
    }
    let key = client
        .domain_key(policy.domain(), 0)
        .await
        .with_context(|| format!("the key of domain {}", policy.domain()))?;
    let engine = deid::Engine::new(&policy, &key)?;
    drop(key);
    let options = deid::Options {
        on_malformed: match args.reject_dir {
            Some(dir) => deid::OnMalformed::Reject { dir },
            None => deid::OnMalformed::Stop,
        },
        threads: args.threads,
        overwrite: args.force,
        ..deid::Options::default()
    };
    let report_file = args.out_path.join(&options.report_name);
    let bar = if args.quiet || json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
    ) {
        bar.set_style(style);
    }
    let started = Instant::now();
    let (in_path, out_path) = (args.in_path.clone(), args.out_path.clone());
    let progress_bar = bar.clone();
    let report = tokio::task::spawn_blocking(move || {
        engine.run(&in_path, &out_path, &options, &|p: deid::Progress| {
            progress_bar.set_length(p.total_bytes);
            progress_bar.set_position(p.bytes);
            progress_bar.set_message(format!("{} records", p.records));
        })
    })
    .await
    .context("the de-identification task failed")??;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let mb_per_s = report.bytes_in as f64 / seconds.max(1e-9) / 1e6;
    let doc = json!({"report": report, "seconds": seconds, "mb_per_s": mb_per_s,
        "report_file": report_file});
    emit(out, json, doc, || {
        let mut text = format!(
            "de-identified {} records ({} files, {:.1} MB in {:.2} s, {:.1} MB/s) into {} \
             with policy {} in domain {} (key version {})\n",
            report.records,
            report.files.len(),
            report.bytes_in as f64 / 1e6,
            seconds,
            mb_per_s,
            args.out_path.display(),
            report.policy,
            report.domain,
            report.key_version
        );
        for (transform, count) in &report.transforms {
            text.push_str(&format!("  {transform:<14} {count} values\n"));
        }
        text.push_str(&format!("  rejected       {} records\n", report.rejected));
        for reject in report.rejects.iter().take(20) {
            text.push_str(&format!(
                "    {}:{}: {}\n",
                reject.file, reject.line, reject.reason
            ));
        }
        for warning in &report.warnings {
            text.push_str(&format!(
                "  warning: unknown field {} in {} dropped ({} values)\n",
                warning.field, warning.file, warning.occurrences
            ));
        }
        text.push_str(&format!("report: {}", report_file.display()));
        text
    })
}
