//! The command line of the key management service. It reaches the server only through the
//! SDK. Output is human-readable by default and JSON with `--output json` (one JSON document
//! per command, for scripts).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sdk::{CachePolicy, ClientTls, Envelope, KeyInfo, KmsClient, NewKey};
use serde_json::json;

pub mod custodian;
pub mod deid;
pub mod domains;
pub mod governance;
pub mod pki;
pub mod recovery;

/// Set by the binary's signal handler (Ctrl-C, SIGTERM): file operations stop at their next
/// read and remove their temporary output, so an interrupted decryption leaves no plaintext.
pub static CANCELLED: AtomicBool = AtomicBool::new(false);

/// File name suffix of encrypted files when a whole folder is encrypted.
pub const ENCRYPTED_SUFFIX: &str = ".kms";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "kms-cli",
    version,
    about = "Key management service command line"
)]
pub struct Cli {
    /// Server endpoint.
    #[arg(
        long,
        global = true,
        env = "KMS_ENDPOINT",
        default_value = "https://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// A `kms-cli pki init` identity: DIR/NAME stands for --ca-cert DIR/ca.pem
    /// --client-cert DIR/NAME.pem --client-key DIR/NAME.key (each of which overrides it).
    #[arg(long, global = true, env = "KMS_IDENTITY", value_name = "DIR/NAME")]
    pub identity: Option<PathBuf>,
    /// PEM file of the CA the server's certificate must chain to.
    #[arg(long, global = true, env = "KMS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM file of this client's certificate (it names the caller's principal).
    #[arg(long, global = true, env = "KMS_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// PEM file of this client's private key.
    #[arg(long, global = true, env = "KMS_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Readable text.
    Human,
    /// One JSON document.
    Json,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage master keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Envelope-encrypt a file, or every file of a folder (recursively).
    Encrypt(EncryptArgs),
    /// Decrypt a file, or every `.kms` file of a folder (recursively).
    Decrypt(DecryptArgs),
    /// Move encrypted files (`.kms`, recursively in folders) to their key's primary version,
    /// rewriting only the header. Resumable: files already on the primary are skipped.
    Rewrap {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Generate a data key (prints the plaintext key unless --no-plaintext).
    Datakey(DatakeyArgs),
    /// Check that the server answers.
    Ping,
    /// Show the principal and roles the server sees for this client's certificate.
    Whoami,
    /// Role bindings (changes need approval).
    #[command(subcommand)]
    Roles(governance::RoleCommand),
    /// Key grants (creation needs approval; revocation is immediate).
    #[command(subcommand)]
    Grants(governance::GrantCommand),
    /// Approval quorums.
    #[command(subcommand)]
    Quorum(governance::QuorumCommand),
    /// Dual-control approval requests.
    #[command(subcommand)]
    Approvals(governance::ApprovalCommand),
    /// Break-glass emergency access.
    #[command(subcommand, name = "break-glass")]
    BreakGlass(governance::BreakGlassCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(governance::AuditCommand),
    /// Development PKI for mutual TLS.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// A key custodian's key pair (for M-of-N recovery shares).
    #[command(subcommand)]
    Custodian(custodian::CustodianCommand),
    /// M-of-N recovery of the master keys: ceremonies, backups, restore, re-share.
    #[command(subcommand)]
    Recovery(recovery::RecoveryCommand),
    /// Tokenization domains (officers).
    #[command(subcommand)]
    Domain(domains::DomainCommand),
    /// Transform values on the server (tokenizers); one result per line.
    Tokenize(domains::TokenizeArgs),
    /// Reverse deterministic or FF1 tokens (re-identifiers): a recorded disclosure.
    Detokenize(domains::DetokenizeArgs),
    /// De-identify CSV files, FHIR R4 bundles or NDJSON under a policy (tokenizers with a
    /// domain-key grant): transforms run locally; a JSON report is written next to the output.
    Deid(deid::DeidArgs),
}

/// Key management commands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an AES-256 master key in the HSM.
    Create {
        /// Unique alias (A-Z a-z 0-9 _ / -, at most 64).
        #[arg(long)]
        alias: Option<String>,
        /// Description (never PHI).
        #[arg(long, default_value = "")]
        description: String,
        /// Tag as key=value; repeatable.
        #[arg(long = "tag", value_parser = parse_pair)]
        tags: Vec<(String, String)>,
    },
    /// List keys (all pages).
    List {
        /// Keys per request.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Describe a key by id or alias.
    Describe {
        /// Key id or alias.
        key: String,
    },
    /// Enable a disabled key.
    Enable {
        /// Key id or alias.
        key: String,
    },
    /// Disable a key: it encrypts and decrypts nothing until enabled again.
    Disable {
        /// Key id or alias.
        key: String,
    },
    /// Create a new primary version inside the HSM; older versions still decrypt.
    Rotate {
        /// Key id or alias.
        key: String,
    },
    /// Set the rotation period and the usage limit per version.
    RotationPolicy {
        /// Key id or alias.
        key: String,
        /// Rotate when the primary version is this old (0: never; else at least 3600). Kept
        /// as it is when not given.
        #[arg(long)]
        period_seconds: Option<u64>,
        /// Encryptions per version before an automatic rotation (0: the server's maximum).
        /// Kept as it is when not given.
        #[arg(long)]
        usage_limit: Option<u64>,
    },
    /// Schedule a key for destruction after a waiting period; it behaves as disabled meanwhile.
    ScheduleDeletion {
        /// Key id or alias.
        key: String,
        /// Waiting period in days (7-365; default 30).
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a pending deletion; the key becomes disabled.
    CancelDeletion {
        /// Key id or alias.
        key: String,
    },
    /// Every key's rotation status: age of the primary version, period, next due date, usage
    /// against the limit, versions still decrypting.
    RotationReport,
    /// Retire every version below VERSION (their data no longer decrypts until lowered again).
    SetMinVersion {
        /// Key id or alias.
        key: String,
        /// Oldest version that still decrypts.
        version: u32,
    },
}

/// `encrypt` arguments.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Key id or alias.
    #[arg(long)]
    pub key: String,
    /// Encryption context entry as key=value; repeatable. Stored in clear: never PHI.
    #[arg(long = "context", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Input file or folder.
    #[arg(long = "in")]
    pub in_path: PathBuf,
    /// Output file, or folder (created) when the input is a folder.
    #[arg(long = "out")]
    pub out_path: PathBuf,
    /// Plaintext bytes per frame (1 byte to 16 MiB).
    #[arg(long, default_value_t = sdk::envelope::DEFAULT_FRAME_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(sdk::envelope::MAX_FRAME_SIZE)))]
    pub frame_size: u32,
    /// Overwrite output files that already exist.
    #[arg(long)]
    pub force: bool,
}

/// `decrypt` arguments.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// Expected encryption context entry as key=value; repeatable. Must match exactly.
    #[arg(long = "context", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Input file or folder.
    #[arg(long = "in")]
    pub in_path: PathBuf,
    /// Output file, or folder (created) when the input is a folder.
    #[arg(long = "out")]
    pub out_path: PathBuf,
    /// Overwrite output files that already exist.
    #[arg(long)]
    pub force: bool,
}

/// `datakey` arguments.
#[derive(Debug, Args)]
pub struct DatakeyArgs {
    /// Key id or alias.
    #[arg(long)]
    pub key: String,
    /// Encryption context entry as key=value; repeatable.
    #[arg(long = "context", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Return only the wrapped data key.
    #[arg(long)]
    pub no_plaintext: bool,
}

pub(crate) fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

pub(crate) fn context_of(pairs: Vec<(String, String)>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        if map.insert(k.clone(), v).is_some() {
            bail!("context key {k:?} given twice");
        }
    }
    Ok(map)
}

impl Cli {
    /// The client's TLS identity from `--identity` and the three file options.
    pub fn client_tls(&self) -> anyhow::Result<ClientTls> {
        let from_identity = |file: &dyn Fn(&str) -> String| {
            self.identity.as_ref().and_then(|id| {
                let name = id.file_name()?.to_str()?;
                Some(id.with_file_name(file(name)))
            })
        };
        let ca = self
            .ca_cert
            .clone()
            .or_else(|| from_identity(&|_| "ca.pem".into()));
        let cert = self
            .client_cert
            .clone()
            .or_else(|| from_identity(&|name| format!("{name}.pem")));
        let key = self
            .client_key
            .clone()
            .or_else(|| from_identity(&|name| format!("{name}.key")));
        let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
            bail!(
                "no client TLS identity: pass --identity DIR/NAME (a `kms-cli pki init` folder and \
                 identity) or --ca-cert, --client-cert and --client-key \
                 (KMS_IDENTITY, KMS_CA_CERT, KMS_CLIENT_CERT, KMS_CLIENT_KEY)"
            );
        };
        Ok(ClientTls::from_files(ca, cert, key)?)
    }
}

/// Runs one command, writing its result to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    let json = cli.output == Output::Json;
    if let Command::Pki(command) = cli.command {
        return pki::run(command, out, json);
    }
    if let Command::Custodian(custodian::CustodianCommand::Keygen(args)) = cli.command {
        return custodian::keygen_command(out, json, args);
    }
    let client = KmsClient::connect(&cli.endpoint, &cli.client_tls()?).await?;
    match cli.command {
        // Handled above, before connecting: the PKI is what a connection needs.
        Command::Pki(command) => pki::run(command, out, json),
        Command::Ping => {
            client.ping().await?;
            emit(out, json, json!({"ok": true}), || "ok".to_string())
        }
        Command::Key(KeyCommand::Create {
            alias,
            description,
            tags,
        }) => {
            let key = client
                .create_key(NewKey {
                    alias,
                    description,
                    tags: tags.into_iter().collect(),
                })
                .await?;
            emit(out, json, key_json(&key), || key_text(&key))
        }
        Command::Key(KeyCommand::Describe { key }) => {
            let key = client.describe_key(&key).await?;
            emit(out, json, key_json(&key), || key_text(&key))
        }
        Command::Key(KeyCommand::Enable { key }) => {
            let key = client.enable_key(&key).await?;
            emit(out, json, key_json(&key), || key_text(&key))
        }
        Command::Key(KeyCommand::Disable { key }) => {
            let key = client.disable_key(&key).await?;
            emit(out, json, key_json(&key), || key_text(&key))
        }
        Command::Key(KeyCommand::Rotate { key }) => {
            let key = client.rotate_key(&key).await?;
            emit(out, json, key_json(&key), || key_text(&key))
        }
        Command::Key(KeyCommand::RotationPolicy {
            key,
            period_seconds,
            usage_limit,
        }) => {
            if period_seconds.is_none() && usage_limit.is_none() {
                bail!("give --period-seconds, --usage-limit or both");
            }
            let current = client.describe_key(&key).await?;
            let key = client
                .set_rotation_policy(
                    &key,
                    period_seconds.unwrap_or(current.rotation_period_seconds),
                    usage_limit.unwrap_or(current.usage_limit),
                )
                .await?;
            emit(out, json, key_json(&key), || key_text(&key))
        }
        Command::Key(KeyCommand::RotationReport) => rotation_report(&client, out, json).await,
        Command::Rewrap { paths } => rewrap(&client, out, json, &paths).await,
        Command::Key(KeyCommand::ScheduleDeletion { key, days }) => {
            governance::show_approval(out, json, &client.schedule_key_deletion(&key, days).await?)
        }
        Command::Whoami => {
            let me = client.who_am_i().await?;
            emit(
                out,
                json,
                json!({"principal": me.principal, "roles": me.roles}),
                || format!("{} ({})", me.principal, me.roles.join(", ")),
            )
        }
        Command::Roles(c) => governance::roles(&client, out, json, c).await,
        Command::Grants(c) => governance::grants(&client, out, json, c).await,
        Command::Quorum(c) => governance::quorums(&client, out, json, c).await,
        Command::Approvals(c) => governance::approvals(&client, out, json, c).await,
        Command::BreakGlass(c) => governance::break_glass(&client, out, json, c).await,
        Command::Audit(c) => governance::audit(&client, out, json, c).await,
        Command::Custodian(c) => custodian::run(&client, out, json, c).await,
        Command::Recovery(c) => recovery::run(&client, out, json, c).await,
        Command::Domain(c) => domains::domain(&client, out, json, c).await,
        Command::Tokenize(a) => domains::tokenize(&client, out, json, a).await,
        Command::Detokenize(a) => domains::detokenize(&client, out, json, a).await,
        Command::Deid(a) => deid::run(&client, out, json, a).await,
        Command::Key(KeyCommand::CancelDeletion { key }) => {
            let key = client.cancel_key_deletion(&key).await?;
            emit(out, json, key_json(&key), || key_text(&key))
        }
        Command::Key(KeyCommand::SetMinVersion { key, version }) => {
            let key = client.set_min_decryption_version(&key, version).await?;
            emit(out, json, key_json(&key), || key_text(&key))
        }
        Command::Key(KeyCommand::List { page_size }) => {
            let mut keys = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = client.list_keys(page_size, token.as_deref()).await?;
                keys.extend(page.keys);
                match page.next_page_token {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
            emit(
                out,
                json,
                json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()}),
                || {
                    let mut text = format!(
                        "{:<36}  {:<8}  {:<24}  {}\n",
                        "KEY ID", "STATE", "ALIAS", "CREATED"
                    );
                    for k in &keys {
                        text.push_str(&format!(
                            "{:<36}  {:<8}  {:<24}  {}\n",
                            k.key_id,
                            k.state,
                            k.alias.as_deref().unwrap_or("-"),
                            k.created_at
                        ));
                    }
                    text.push_str(&format!("{} key(s)", keys.len()));
                    text
                },
            )
        }
        Command::Datakey(args) => {
            let context = context_of(args.context)?;
            if args.no_plaintext {
                let dk = client
                    .generate_data_key_without_plaintext(&args.key, &context)
                    .await?;
                let doc = json!({"key_id": dk.key_id, "key_version": dk.key_version, "ciphertext_blob_hex": hex::encode(&dk.blob)});
                emit(out, json, doc, || {
                    format!(
                        "key {} v{}\nwrapped   {}",
                        dk.key_id,
                        dk.key_version,
                        hex::encode(&dk.blob)
                    )
                })
            } else {
                let dk = client.generate_data_key(&args.key, &context).await?;
                let plaintext = hex::encode(dk.plaintext.as_slice());
                let doc = json!({"key_id": dk.key_id, "key_version": dk.key_version, "plaintext_hex": plaintext, "ciphertext_blob_hex": hex::encode(&dk.blob)});
                emit(out, json, doc, || {
                    format!(
                        "key {} v{}\nplaintext {}\nwrapped   {}",
                        dk.key_id,
                        dk.key_version,
                        plaintext,
                        hex::encode(&dk.blob)
                    )
                })
            }
        }
        Command::Encrypt(args) => {
            let context = context_of(args.context)?;
            let envelope = Envelope::new(client.clone(), CachePolicy::default())
                .with_frame_size(args.frame_size)?;
            let jobs = plan(
                &args.in_path,
                &args.out_path,
                Direction::Encrypt,
                args.force,
            )?;
            let summary = process(&jobs, json, |src, dst, bar| {
                let (envelope, key, context) =
                    (envelope.clone(), args.key.clone(), context.clone());
                async move { envelope.encrypt_file(&key, &context, &src, &dst, bar).await }
            })
            .await?;
            report(out, json, "encrypted", &summary, client.calls_made())
        }
        Command::Decrypt(args) => {
            let context = context_of(args.context)?;
            let envelope = Envelope::new(client.clone(), CachePolicy::default());
            let jobs = plan(
                &args.in_path,
                &args.out_path,
                Direction::Decrypt,
                args.force,
            )?;
            let summary = process(&jobs, json, |src, dst, bar| {
                let (envelope, context) = (envelope.clone(), context.clone());
                async move { envelope.decrypt_file(&context, &src, &dst, bar).await }
            })
            .await?;
            report(out, json, "decrypted", &summary, client.calls_made())
        }
    }
}

pub(crate) fn emit(
    out: &mut dyn Write,
    json: bool,
    doc: serde_json::Value,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        writeln!(out, "{}", text())?;
    }
    Ok(())
}

fn key_json(k: &KeyInfo) -> serde_json::Value {
    json!({
        "key_id": k.key_id,
        "alias": k.alias,
        "description": k.description,
        "tags": k.tags,
        "state": k.state,
        "created_at": k.created_at,
        "primary_version": k.primary_version,
        "min_decryption_version": k.min_decryption_version,
        "rotation_period_seconds": k.rotation_period_seconds,
        "usage_limit": k.usage_limit,
        "deletion_due_at": k.deletion_due_at,
        "algorithm": k.algorithm,
        "versions": k.versions.iter().map(|v| json!({"version": v.version, "created_at": v.created_at, "state": v.state, "usage": v.usage})).collect::<Vec<_>>(),
    })
}

fn key_text(k: &KeyInfo) -> String {
    let mut text = format!(
        "key id          {}\nalias           {}\nstate           {}\nalgorithm       {}\nprimary version {}\ncreated at      {}",
        k.key_id,
        k.alias.as_deref().unwrap_or("-"),
        k.state,
        k.algorithm,
        k.primary_version,
        k.created_at
    );
    text.push_str(&format!("\nusage limit     {} per version", k.usage_limit));
    if let Some(due) = k.deletion_due_at {
        text.push_str(&format!("\ndeletion due at {due}"));
    }
    if k.rotation_period_seconds > 0 {
        text.push_str(&format!(
            "\nrotation period {} s",
            k.rotation_period_seconds
        ));
    }
    if !k.description.is_empty() {
        text.push_str(&format!("\ndescription     {}", k.description));
    }
    for (tk, tv) in &k.tags {
        text.push_str(&format!("\ntag             {tk}={tv}"));
    }
    for v in &k.versions {
        text.push_str(&format!(
            "\nversion {:<7} {} (created {}, usage {})",
            v.version, v.state, v.created_at, v.usage
        ));
    }
    text
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// One file to process: source, destination, size.
struct Job {
    src: PathBuf,
    dst: PathBuf,
    len: u64,
}

/// Lists the files to process. A file maps to the given output; a folder maps, recursively,
/// to the same tree under the output folder (`.kms` added on encryption, removed on
/// decryption, where only `.kms` files are taken).
fn plan(
    input: &Path,
    output: &Path,
    direction: Direction,
    force: bool,
) -> anyhow::Result<Vec<Job>> {
    let meta =
        std::fs::metadata(input).with_context(|| format!("cannot read {}", input.display()))?;
    let mut jobs = Vec::new();
    if meta.is_file() {
        if output.is_dir() {
            bail!("--out {} is a folder; give a file name", output.display());
        }
        jobs.push(Job {
            src: input.to_path_buf(),
            dst: output.to_path_buf(),
            len: meta.len(),
        });
    } else if meta.is_dir() {
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        collect(input, &mut files, &mut skipped)?;
        if !skipped.is_empty() {
            eprintln!(
                "warning: skipped {} entr{} that are not regular files or folders (symlinks, devices, pipes), e.g. {}",
                skipped.len(),
                if skipped.len() == 1 { "y" } else { "ies" },
                skipped[0].display()
            );
        }
        files.sort();
        for src in files {
            let relative = src.strip_prefix(input).context("walk")?;
            let name = relative.to_string_lossy().to_string();
            let dst_name = match direction {
                Direction::Encrypt => format!("{name}{ENCRYPTED_SUFFIX}"),
                Direction::Decrypt => match name.strip_suffix(ENCRYPTED_SUFFIX) {
                    Some(stem) => stem.to_string(),
                    None => continue,
                },
            };
            let len = std::fs::metadata(&src)?.len();
            jobs.push(Job {
                src,
                dst: output.join(dst_name),
                len,
            });
        }
    } else {
        bail!("{} is neither a regular file nor a folder", input.display());
    }
    if jobs.is_empty() {
        bail!("no files to process in {}", input.display());
    }
    // Check every destination before any work (and any KMS call) is done, and before any
    // folder is made: a destination that is not a regular file is refused even with --force.
    for job in &jobs {
        if check_output_file(&job.dst)? && !force {
            bail!("{} exists; pass --force to overwrite", job.dst.display());
        }
    }
    for job in &jobs {
        let folder = job
            .dst
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if meta.is_dir() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
        } else if !folder.is_dir() {
            bail!("output folder {} does not exist", folder.display());
        }
    }
    Ok(jobs)
}

/// Checks a path an output file is about to be written to. Outputs are written to a temporary
/// file renamed over the path, which replaces whatever is there: so anything but a regular
/// file is refused — a device, a FIFO, a socket, a folder, and a symbolic link whatever it
/// points to (the rename would replace the link itself, not write through it; give the real
/// path instead). Returns whether a regular file is there (replaced only with `--force`).
/// Writes nothing. Folders above the path may be symbolic links.
pub(crate) fn check_output_file(path: &Path) -> anyhow::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot check the output {}", path.display()))
        }
    };
    if meta.file_type().is_file() {
        return Ok(true);
    }
    bail!(
        "{} is {}, not a regular file: refusing to write an output over it, with or without \
         --force (outputs are written to a temporary file renamed into place, which would \
         replace it); give the path of a regular file",
        path.display(),
        file_kind(meta.file_type())
    )
}

/// What a file system entry is, for messages ("a FIFO").
pub(crate) fn file_kind(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a folder"
    } else if kind.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>, skipped: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect(&entry.path(), files, skipped)?;
        } else if kind.is_file() {
            files.push(entry.path());
        } else {
            skipped.push(entry.path());
        }
    }
    Ok(())
}

struct Summary {
    files: usize,
    bytes: u64,
    seconds: f64,
}

/// Runs `work` on every job in order, with one progress bar over all bytes (on a terminal).
async fn process<F, Fut>(jobs: &[Job], quiet: bool, work: F) -> anyhow::Result<Summary>
where
    F: Fn(PathBuf, PathBuf, Box<dyn Fn(u64) -> ControlFlow<()> + Send + Sync>) -> Fut,
    Fut: std::future::Future<Output = Result<sdk::FileSummary, sdk::Error>>,
{
    let total: u64 = jobs.iter().map(|j| j.len).sum();
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
    {
        bar.set_style(style);
    }
    let started = Instant::now();
    let mut done_before = 0u64;
    let mut bytes = 0u64;
    for (index, job) in jobs.iter().enumerate() {
        if CANCELLED.load(Ordering::SeqCst) {
            bail!("interrupted after {index} of {} file(s)", jobs.len());
        }
        bar.set_message(
            job.src
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        );
        let progress_bar = bar.clone();
        let base = done_before;
        let result = work(
            job.src.clone(),
            job.dst.clone(),
            Box::new(move |n| {
                progress_bar.set_position(base + n);
                if CANCELLED.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }),
        )
        .await;
        let summary = result.with_context(|| match jobs.len() {
            1 => job.src.display().to_string(),
            n => format!(
                "{} (file {} of {n}; the files before it were written)",
                job.src.display(),
                index + 1
            ),
        })?;
        bytes += summary.plaintext_bytes;
        done_before += job.len;
        bar.set_position(done_before);
    }
    bar.finish_and_clear();
    Ok(Summary {
        files: jobs.len(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn report(
    out: &mut dyn Write,
    json: bool,
    verb: &str,
    s: &Summary,
    calls: u64,
) -> anyhow::Result<()> {
    let rate = if s.seconds > 0.0 {
        s.bytes as f64 / s.seconds / 1e6
    } else {
        0.0
    };
    let doc = json!({"files": s.files, "bytes": s.bytes, "seconds": s.seconds, "megabytes_per_second": rate, "kms_calls": calls});
    emit(out, json, doc, || {
        format!(
            "{verb} {} file(s), {} bytes in {:.3} s ({:.1} MB/s), {} KMS call(s)",
            s.files, s.bytes, s.seconds, rate, calls
        )
    })
}

async fn all_keys(client: &KmsClient) -> anyhow::Result<Vec<KeyInfo>> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client.list_keys(1000, token.as_deref()).await?;
        keys.extend(page.keys);
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return Ok(keys),
        }
    }
}

async fn rotation_report(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut rows = Vec::new();
    for key in all_keys(client).await? {
        let primary = key
            .versions
            .iter()
            .find(|v| v.version == key.primary_version);
        let primary_created = primary.map(|v| v.created_at).unwrap_or(key.created_at);
        let next_due = (key.rotation_period_seconds > 0)
            .then(|| primary_created + key.rotation_period_seconds as i64);
        let still_needed: Vec<u32> = key
            .versions
            .iter()
            .filter(|v| {
                key.state != "destroyed"
                    && v.version >= key.min_decryption_version
                    && v.version != key.primary_version
            })
            .map(|v| v.version)
            .collect();
        rows.push(json!({
            "key_id": key.key_id,
            "alias": key.alias,
            "state": key.state,
            "primary_version": key.primary_version,
            "primary_age_seconds": now - primary_created,
            "rotation_period_seconds": key.rotation_period_seconds,
            "next_rotation_due_at": next_due,
            "overdue": next_due.is_some_and(|due| due <= now),
            "primary_usage_reserved": primary.map(|v| v.usage).unwrap_or(0),
            "usage_limit": key.usage_limit,
            "older_versions_still_decrypting": still_needed,
        }));
    }
    let doc = json!({ "generated_at": now, "keys": rows });
    emit(out, json, doc.clone(), || {
        let mut text = format!(
            "{:<36}  {:<16}  {:>3}  {:>9}  {:>10}  {:>12}  {:>21}  {}\n",
            "KEY ID",
            "STATE",
            "VER",
            "AGE DAYS",
            "PERIOD D",
            "NEXT DUE",
            "RESERVED / LIMIT",
            "OLDER VERSIONS"
        );
        for r in &rows {
            let days = |s: i64| format!("{:.1}", s as f64 / 86_400.0);
            text.push_str(&format!(
                "{:<36}  {:<16}  {:>3}  {:>9}  {:>10}  {:>12}  {:>21}  {}\n",
                r["key_id"].as_str().unwrap_or_default(),
                r["state"].as_str().unwrap_or_default(),
                r["primary_version"],
                days(r["primary_age_seconds"].as_i64().unwrap_or(0)),
                match r["rotation_period_seconds"].as_u64() {
                    Some(0) | None => "-".to_string(),
                    Some(p) => days(p as i64),
                },
                match r["next_rotation_due_at"].as_i64() {
                    Some(due) if due <= now => "OVERDUE".to_string(),
                    Some(due) => format!("in {} d", days(due - now)),
                    None => "-".to_string(),
                },
                format!("{} / {}", r["primary_usage_reserved"], r["usage_limit"]),
                r["older_versions_still_decrypting"],
            ));
        }
        text.push_str(&format!("{} key(s)", rows.len()));
        text
    })
}

async fn rewrap(
    client: &KmsClient,
    out: &mut dyn Write,
    json: bool,
    paths: &[PathBuf],
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut files = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            let mut skipped = Vec::new();
            collect(path, &mut files, &mut skipped)?;
        } else {
            // Rewritten in place by a rename: a named file must be a regular file (folders
            // only yield regular files).
            if path.to_string_lossy().ends_with(ENCRYPTED_SUFFIX) {
                check_output_file(path)?;
            }
            files.push(path.clone());
        }
    }
    files.retain(|f| f.to_string_lossy().ends_with(ENCRYPTED_SUFFIX));
    files.sort();
    files.dedup();
    // Versions before, and the primary of every key involved.
    let read_version = |path: &Path| -> anyhow::Result<(String, Option<u32>)> {
        let header = sdk::envelope::Header::read_from(&mut std::io::BufReader::new(
            std::fs::File::open(path)?,
        ))
        .with_context(|| format!("{}", path.display()))?;
        Ok((header.key_id.clone(), header.wrapped_key_version()))
    };
    let mut before = BTreeMap::<String, u64>::new();
    // The primary version of every key involved, or why the key cannot be used.
    let mut primaries = BTreeMap::<String, Result<u32, String>>::new();
    let mut todo = Vec::new();
    let mut already = 0u64;
    let mut failures = Vec::new();
    for file in &files {
        match read_version(file) {
            Ok((key_id, version)) => {
                *before.entry(version_label(version)).or_default() += 1;
                if !primaries.contains_key(&key_id) {
                    let primary = match client.describe_key(&key_id).await {
                        Ok(key) => Ok(key.primary_version),
                        // The key id comes from the file: an unknown or malformed one means a
                        // damaged file, reported like any other.
                        Err(sdk::Error::Rpc {
                            code: sdk::Code::NotFound,
                            message,
                        }) if message == "key not found" => Err("invalid ciphertext".to_string()),
                        Err(sdk::Error::Rpc {
                            code: sdk::Code::InvalidArgument,
                            ..
                        }) => Err("invalid ciphertext".to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    primaries.insert(key_id.clone(), primary);
                }
                match primaries.get(&key_id) {
                    Some(Ok(primary)) if version == Some(*primary) => already += 1,
                    Some(Ok(_)) => todo.push(file.clone()),
                    Some(Err(reason)) => failures.push(format!("{}: {reason}", file.display())),
                    None => failures.push(format!("{}: key lookup missing", file.display())),
                }
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let envelope = Envelope::new(client.clone(), CachePolicy::disabled());
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(todo.len() as u64)
    };
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} files {per_sec}") {
        bar.set_style(style);
    }
    let mut rewrapped = 0u64;
    let mut interrupted = false;
    for chunk in todo.chunks(100) {
        if CANCELLED.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        for (path, outcome) in chunk.iter().zip(envelope.rewrap_files(chunk).await) {
            match outcome {
                Ok(_) => rewrapped += 1,
                Err(e) => failures.push(format!("{}: {e}", path.display())),
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let mut after = BTreeMap::<String, u64>::new();
    for file in &files {
        if let Ok((_, version)) = read_version(file) {
            *after.entry(version_label(version)).or_default() += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let doc = json!({
        "files": files.len(),
        "rewrapped": rewrapped,
        "already_on_primary": already,
        "failed": failures.len(),
        "failures": failures,
        "versions_before": before,
        "versions_after": after,
        "seconds": seconds,
        "kms_calls": client.calls_made(),
    });
    emit(out, json, doc, || {
        let mut text = format!(
            "{} file(s): {rewrapped} rewrapped, {} already on the primary version, {} failed, in {seconds:.3} s ({} KMS calls)\nversions before: {before:?}\nversions after:  {after:?}",
            files.len(),
            already,
            failures.len(),
            client.calls_made()
        );
        for f in failures.iter().take(10) {
            text.push_str(&format!("\nfailed: {f}"));
        }
        text
    })?;
    if interrupted {
        bail!("interrupted; run the same command again to resume");
    }
    if !failures.is_empty() {
        bail!("{} file(s) could not be rewrapped", failures.len());
    }
    Ok(())
}

fn version_label(version: Option<u32>) -> String {
    version
        .map(|v| format!("v{v}"))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A FIFO made by `mkfifo` (never a device: tests must not touch real ones).
    #[cfg(unix)]
    pub(crate) fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("run mkfifo");
        assert!(status.success(), "mkfifo {}", path.display());
    }

    #[cfg(unix)]
    fn is_fifo(path: &Path) -> bool {
        use std::os::unix::fs::FileTypeExt as _;
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn check_output_file_accepts_only_missing_paths_and_regular_files() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing");
        assert!(!check_output_file(&missing).expect("missing"));
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        assert!(check_output_file(&file).expect("regular file"));
        let folder = dir.path().join("folder");
        std::fs::create_dir(&folder).expect("mkdir");
        let err = check_output_file(&folder).expect_err("folder");
        assert!(
            err.to_string().contains("is a folder, not a regular file"),
            "{err}"
        );
        assert!(
            err.to_string().contains(&folder.display().to_string()),
            "{err}"
        );
        #[cfg(unix)]
        {
            let fifo = dir.path().join("fifo");
            mkfifo(&fifo);
            let err = check_output_file(&fifo).expect_err("fifo");
            assert!(err.to_string().contains("is a FIFO"), "{err}");
            assert!(
                err.to_string().contains(&fifo.display().to_string()),
                "{err}"
            );
            // A link is refused whatever it points to, even to a regular file or nothing.
            for (link, target) in [
                ("to-file", &file),
                ("to-fifo", &fifo),
                ("dangling", &missing),
            ] {
                let link = dir.path().join(link);
                std::os::unix::fs::symlink(target, &link).expect("symlink");
                let err = check_output_file(&link).expect_err("symlink");
                assert!(err.to_string().contains("is a symbolic link"), "{err}");
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn plan_refuses_a_fifo_or_folder_output_even_with_force_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let input = dir.path().join("in.txt");
        std::fs::write(&input, "plaintext").expect("write");
        let fifo = dir.path().join("out.fifo");
        mkfifo(&fifo);
        for force in [false, true] {
            let err = plan(&input, &fifo, Direction::Decrypt, force)
                .err()
                .expect("a FIFO output is refused");
            assert!(err.to_string().contains("is a FIFO"), "{err}");
            assert!(is_fifo(&fifo), "the FIFO is left alone");
        }
        // A regular file is replaced only with --force.
        let existing = dir.path().join("existing");
        std::fs::write(&existing, "old").expect("write");
        assert!(plan(&input, &existing, Direction::Encrypt, false).is_err());
        assert_eq!(
            plan(&input, &existing, Direction::Encrypt, true)
                .expect("forced")
                .len(),
            1
        );

        // A folder: every destination is checked before any output folder is made (here
        // out/a, for the job before the refused one).
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a")).expect("mkdir");
        std::fs::write(tree.join("a/x.txt"), "x").expect("write");
        std::fs::write(tree.join("b.txt"), "b").expect("write");
        let out = dir.path().join("out");
        std::fs::create_dir(&out).expect("mkdir");
        std::fs::create_dir(out.join("b.txt.kms")).expect("a folder where a file goes");
        let err = plan(&tree, &out, Direction::Encrypt, true)
            .err()
            .expect("a folder output is refused");
        assert!(
            err.to_string().contains("is a folder, not a regular file"),
            "{err}"
        );
        assert_eq!(
            names(&out),
            ["b.txt.kms"],
            "no folder made, nothing written"
        );
        std::fs::remove_dir(out.join("b.txt.kms")).expect("rmdir");
        mkfifo(&out.join("b.txt.kms"));
        assert!(plan(&tree, &out, Direction::Encrypt, true).is_err());
        assert!(is_fifo(&out.join("b.txt.kms")));
        assert_eq!(names(&out), ["b.txt.kms"]);
    }

    #[cfg(unix)]
    #[test]
    fn pki_init_with_force_refuses_a_fifo_among_its_files() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("server.key");
        mkfifo(&fifo);
        let err = pki::init(dir.path(), pki::DEFAULT_TRUST_DOMAIN, true).expect_err("fifo");
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        assert!(is_fifo(&fifo));
        assert_eq!(names(dir.path()), ["server.key"], "nothing written");
    }
}
