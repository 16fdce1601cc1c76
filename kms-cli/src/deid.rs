//! `kms-cli deid`: de-identify a research data set (CSV files, FHIR R4 bundles, NDJSON) under a
//! policy, with the domain key fetched from the KMS once (a `domain-key` grant) and every
//! transform applied locally by the `deid` engine. A progress bar on the terminal (records,
//! MB/s, ETA); a final report (records, values per transform, rejects by file and line; never
//! values) written as JSON next to the output and printed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sdk::KmsClient;
use serde_json::json;

use crate::{check_output_file, emit, file_kind};

/// Refuses an output (or rejects) folder that is not a folder, or that holds anything but
/// regular files and folders. The run renames its temporary files over the output names, and
/// those names are only known to the engine (FHIR files get pseudonyms), so a device, FIFO,
/// socket or symbolic link anywhere in the folder is refused, with or without `--force`,
/// before anything is written; see [`check_output_file`]. Symbolic links to folders (the
/// folder itself or one inside it) are followed. A missing folder is fine (it is created).
fn check_output_folder(dir: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot check {}", dir.display())),
    };
    let is_dir = meta.is_dir()
        || (meta.file_type().is_symlink() && std::fs::metadata(dir).is_ok_and(|m| m.is_dir()));
    if !is_dir {
        anyhow::bail!(
            "{} is {}, not a folder: refusing to write the outputs there",
            dir.display(),
            file_kind(meta.file_type())
        );
    }
    let mut seen = HashSet::new();
    walk_output_folder(dir, &mut seen)
        .with_context(|| format!("{} must hold only regular files and folders", dir.display()))
}

fn walk_output_folder(dir: &Path, seen: &mut HashSet<PathBuf>) -> anyhow::Result<()> {
    // Each folder once, whatever links lead to it (and no loop through a link).
    let canonical = dir
        .canonicalize()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot check {}", path.display()))?;
        if kind.is_dir()
            || (kind.is_symlink() && std::fs::metadata(&path).is_ok_and(|m| m.is_dir()))
        {
            walk_output_folder(&path, seen)?;
        } else {
            check_output_file(&path)?;
        }
    }
    Ok(())
}

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
    // Before the key is fetched and anything is written.
    check_output_folder(&args.out_path)?;
    if let Some(dir) = &args.reject_dir {
        check_output_folder(dir)?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use crate::tests::mkfifo;

    #[cfg(unix)]
    #[test]
    fn output_folders_must_hold_only_regular_files_and_folders() {
        let dir = tempfile::tempdir().expect("dir");
        let out = dir.path().join("out");
        check_output_folder(&out).expect("a missing folder is made by the run");
        std::fs::create_dir_all(out.join("csv")).expect("mkdir");
        std::fs::write(out.join("csv/patients.csv"), "old").expect("write");
        std::fs::write(out.join("deid-report.json"), "{}").expect("write");
        // A link to a folder is followed, loops included.
        std::os::unix::fs::symlink(&out, out.join("csv/loop")).expect("symlink");
        check_output_folder(&out).expect("regular files and folders");

        let fifo = out.join("csv/encounters.csv");
        mkfifo(&fifo);
        let err = check_output_folder(&out).expect_err("a FIFO inside");
        let message = format!("{err:#}");
        assert!(
            message.contains(&fifo.display().to_string()) && message.contains("is a FIFO"),
            "{message}"
        );
        std::fs::remove_file(&fifo).expect("rm");
        std::os::unix::fs::symlink(out.join("deid-report.json"), out.join("x.csv"))
            .expect("symlink");
        let err = check_output_folder(&out).expect_err("a link to a file");
        assert!(format!("{err:#}").contains("is a symbolic link"), "{err:#}");

        let not_a_folder = dir.path().join("pipe");
        mkfifo(&not_a_folder);
        let err = check_output_folder(&not_a_folder).expect_err("a FIFO as --out");
        assert!(err.to_string().contains("not a folder"), "{err}");
    }
}
