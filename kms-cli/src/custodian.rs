//! A key custodian's side of M-of-N recovery: their age X25519 key pair, kept in a
//! passphrase-protected identity file, and the opening of the shares the server seals to it.
//! Shares are opened only here, on the custodian's machine; the server never sees the
//! identity. Also the `kms-cli custodian` commands (make a key pair, register it, list keys).
//!
//! Secrets (the passphrase, the identity, an opened share) live in zeroizing types and are
//! never printed. Files are written beside their final name and renamed into place, so a
//! crash never leaves a half-written key or share, and an existing file is never replaced.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use age::secrecy::{ExposeSecret as _, SecretString};
use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};
use proto::share::ShareEnvelope;
use sdk::recovery::CustodianKey;
use sdk::KmsClient;
use serde_json::json;
use zeroize::Zeroizing;

use crate::emit;

/// The environment variable a passphrase is read from when no `--passphrase-file` is given.
pub const PASSPHRASE_ENV: &str = "KMS_CUSTODIAN_PASSPHRASE";

/// Lowest scrypt work factor (log2 N) accepted for an identity file. Values this low take
/// milliseconds to guess a passphrase against: for tests only.
pub const MIN_WORK_FACTOR: u8 = 10;

/// Highest scrypt work factor (log2 N) accepted, when writing and when opening an identity
/// file (2^22 needs 4 GiB of memory; it bounds the work a crafted file can demand).
pub const MAX_WORK_FACTOR: u8 = 22;

/// Shortest passphrase `keygen` accepts, in characters.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// Largest plaintext opened from an identity file or a share (both are well under 1 KiB).
const MAX_OPENED_BYTES: usize = 16 * 1024;

/// The message of every failure to open an identity file, whatever age found.
const NOT_AN_IDENTITY: &str = "wrong passphrase or not a custodian identity file";

/// The files a new key pair was written to.
#[derive(Debug)]
pub struct KeyPair {
    /// DIR/NAME.identity.age: the identity, encrypted with the passphrase (mode 0600).
    pub identity_path: PathBuf,
    /// DIR/NAME.recipient: the public recipient, to register with the server.
    pub recipient_path: PathBuf,
    /// The public recipient ("age1...").
    pub recipient: String,
}

/// Creates an age X25519 key pair: DIR/NAME.identity.age (the identity, encrypted with the
/// passphrase via age's scrypt recipient, file mode 0600, written to a temp file + rename,
/// refuses to overwrite) and DIR/NAME.recipient (the public "age1..." string + newline).
///
/// `work_factor` is age's scrypt log2 work factor, [`MIN_WORK_FACTOR`]..=[`MAX_WORK_FACTOR`];
/// `None` takes age's default (about one second on this machine). Values well below the
/// default make the passphrase cheap to guess: for tests only. The folder is created (mode
/// 0700) when missing. The passphrase needs at least [`MIN_PASSPHRASE_CHARS`] characters.
pub fn keygen(
    dir: &Path,
    name: &str,
    passphrase: &str,
    work_factor: Option<u8>,
) -> anyhow::Result<KeyPair> {
    check_name(name)?;
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        bail!("the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters");
    }
    if let Some(n) = work_factor {
        if !(MIN_WORK_FACTOR..=MAX_WORK_FACTOR).contains(&n) {
            bail!("work factor {n}: use {MIN_WORK_FACTOR}..={MAX_WORK_FACTOR}");
        }
    }
    let identity_path = dir.join(format!("{name}.identity.age"));
    let recipient_path = dir.join(format!("{name}.recipient"));
    for path in [&identity_path, &recipient_path] {
        refuse_existing(path)?;
    }
    create_private_dir(dir)?;

    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let plaintext = Zeroizing::new(format!(
        "# kms-cli custodian identity\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    ));
    let mut lock = age::scrypt::Recipient::new(SecretString::from(passphrase.to_owned()));
    if let Some(n) = work_factor {
        lock.set_work_factor(n);
    }
    let sealed = age::encrypt_and_armor(&lock, plaintext.as_bytes())
        .context("encrypt the identity with the passphrase")?;
    write_new_file(&identity_path, sealed.as_bytes(), true)?;
    if let Err(e) = write_new_file(&recipient_path, format!("{recipient}\n").as_bytes(), false) {
        // Leave no identity without its recipient file: the pair is made again as a whole.
        let _ = std::fs::remove_file(&identity_path);
        return Err(e);
    }
    Ok(KeyPair {
        identity_path,
        recipient_path,
        recipient,
    })
}

/// A custodian's opened identity: the X25519 secret key that opens their shares. Not `Clone`;
/// its `Debug` shows only the public recipient; the key is zeroized when dropped.
pub struct Identity(age::x25519::Identity);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("recipient", &self.recipient())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The public recipient ("age1...") shares are sealed to.
    pub fn recipient(&self) -> String {
        self.0.to_public().to_string()
    }
}

/// Opens a passphrase-protected identity file; wrong passphrase -> clear error "wrong
/// passphrase or not a custodian identity file".
pub fn load_identity(path: &Path, passphrase: &str) -> anyhow::Result<Identity> {
    let sealed = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let mut lock = age::scrypt::Identity::new(SecretString::from(passphrase.to_owned()));
    lock.set_max_work_factor(MAX_WORK_FACTOR);
    let plaintext = open(&lock, &sealed).map_err(|e| match e {
        age::DecryptError::ExcessiveWork { required, .. } => anyhow!(
            "{}: its scrypt work factor {required} is above the accepted {MAX_WORK_FACTOR}",
            path.display()
        ),
        _ => anyhow!("{}: {NOT_AN_IDENTITY}", path.display()),
    })?;
    let text = std::str::from_utf8(&plaintext)
        .map_err(|_| anyhow!("{}: {NOT_AN_IDENTITY}", path.display()))?;
    let mut keys = text
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("AGE-SECRET-KEY-1"));
    match (keys.next(), keys.next()) {
        (Some(key), None) => key
            .parse::<age::x25519::Identity>()
            .map(Identity)
            .map_err(|_| anyhow!("{}: {NOT_AN_IDENTITY}", path.display())),
        _ => bail!(
            "{}: {NOT_AN_IDENTITY} (it must hold exactly one X25519 identity)",
            path.display()
        ),
    }
}

/// Opens an armored sealed share with the identity and parses it (`ShareEnvelope::parse`,
/// which checks its commitment). Any edit of the sealed text fails here with a clear error.
pub fn open_share(identity: &Identity, sealed: &str) -> anyhow::Result<ShareEnvelope> {
    let plaintext = open(&identity.0, sealed.as_bytes()).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => anyhow!(
            "this share is not sealed to this identity ({}): another custodian's share or \
             another key pair",
            identity.recipient()
        ),
        other => anyhow::Error::new(other)
            .context("the sealed share is damaged or was altered: it does not open"),
    })?;
    ShareEnvelope::parse(&plaintext)
        .map_err(|reason| anyhow!("the share opened but is not valid: {reason}"))
}

/// Seals an envelope JSON to a recipient (armored age), used by tests to build shares; the
/// server has its own sealing.
pub fn seal_for_test(recipient: &str, plaintext: &[u8]) -> anyhow::Result<String> {
    let recipient = parse_recipient(recipient)?;
    age::encrypt_and_armor(&recipient, plaintext).context("seal to the recipient")
}

/// Reads the passphrase of an identity file from `file` (one trailing line ending removed)
/// or, without a file, from the environment variable [`PASSPHRASE_ENV`]. There is no
/// interactive prompt: without either it fails and says so.
pub fn read_passphrase(file: Option<&Path>) -> anyhow::Result<Zeroizing<String>> {
    let mut passphrase = match file {
        Some(path) => Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("read the passphrase file {}", path.display()))?,
        ),
        None => match std::env::var(PASSPHRASE_ENV) {
            Ok(value) => Zeroizing::new(value),
            Err(std::env::VarError::NotPresent) => bail!(
                "no passphrase: pass --passphrase-file FILE or set {PASSPHRASE_ENV} \
                 (kms-cli has no interactive prompt)"
            ),
            Err(std::env::VarError::NotUnicode(_)) => {
                bail!("{PASSPHRASE_ENV} is not valid UTF-8")
            }
        },
    };
    let end = passphrase
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .map(str::len);
    if let Some(end) = end {
        passphrase.truncate(end);
    }
    if passphrase.is_empty() {
        bail!("the passphrase is empty");
    }
    Ok(passphrase)
}

/// Checks that `text` is an age X25519 recipient ("age1...").
pub(crate) fn parse_recipient(text: &str) -> anyhow::Result<age::x25519::Recipient> {
    text.trim().parse().map_err(|_| {
        anyhow!("not an age X25519 recipient (\"age1...\", from `kms-cli custodian keygen`)")
    })
}

/// Decrypts an age file (armored or binary) with one identity, into zeroizing memory.
fn open(
    identity: &dyn age::Identity,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, age::DecryptError> {
    let decryptor = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(sealed))?;
    let reader = decryptor.decrypt(std::iter::once(identity))?;
    // Room for the whole plaintext up front: growing the buffer would leave copies behind.
    let mut plaintext = Zeroizing::new(Vec::with_capacity(MAX_OPENED_BYTES + 1));
    reader
        .take(MAX_OPENED_BYTES as u64 + 1)
        .read_to_end(&mut plaintext)?;
    if plaintext.len() > MAX_OPENED_BYTES {
        return Err(age::DecryptError::DecryptionFailed);
    }
    Ok(plaintext)
}

/// A key pair's name becomes a file name: letters, digits, '.', '_' and '-', not starting
/// with '.', at most 64 characters.
fn check_name(name: &str) -> anyhow::Result<()> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !fine {
        bail!("name {name:?}: use 1-64 letters, digits, '.', '_' and '-' (not starting with '.')");
    }
    Ok(())
}

/// Fails when `path` exists (a dangling symlink counts as existing).
pub(crate) fn refuse_existing(path: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        bail!("{} exists: refusing to overwrite it", path.display());
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))
}

/// Writes `bytes` to the new file `path`: a temporary file beside it (mode 0600 when
/// `secret`, else 0644, from creation on), synced, then renamed into place. Refuses to replace
/// an existing file; on any failure the temporary file is removed.
pub(crate) fn write_new_file(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    refuse_existing(path)?;
    let Some(file_name) = path.file_name() else {
        bail!("{} is not a file name", path.display());
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = TempFile::new(dir.join(format!(
        ".{}.{}-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(&temp.path)
        .with_context(|| format!("create {}", temp.path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", temp.path.display()))?;
    drop(file);
    // Checked again just before the rename, which would replace a file made meanwhile.
    refuse_existing(path)?;
    std::fs::rename(&temp.path, path).with_context(|| format!("rename into {}", path.display()))?;
    temp.renamed = true;
    // Make the rename itself durable. Best effort: some file systems cannot sync a folder,
    // and the file is complete either way.
    #[cfg(unix)]
    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    Ok(())
}

/// A temporary file, removed when dropped unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    renamed: bool,
}

impl TempFile {
    fn new(path: PathBuf) -> Self {
        TempFile {
            path,
            renamed: false,
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `kms-cli custodian` commands.
#[derive(Debug, Subcommand)]
pub enum CustodianCommand {
    /// Create an age X25519 key pair: DIR/NAME.identity.age (passphrase-protected, 0600) and
    /// DIR/NAME.recipient (public). No server call.
    Keygen(KeygenArgs),
    /// Register your public recipient: shares are sealed to it (custodian role).
    Register {
        /// A NAME.recipient file from `custodian keygen`, or the "age1..." string itself.
        #[arg(long, value_name = "FILE_OR_AGE1_STRING")]
        recipient: String,
    },
    /// List every registered custodian key.
    List,
}

/// `custodian keygen` arguments.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Folder to write the two files to (created, mode 0700, when missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// File name stem: NAME.identity.age and NAME.recipient.
    #[arg(long)]
    pub name: String,
    /// File holding the passphrase (else KMS_CUSTODIAN_PASSPHRASE); at least 12 characters.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// scrypt work factor, log2 N (default: age's, about one second). Low values make the
    /// passphrase cheap to guess: for tests only.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u8).range(i64::from(MIN_WORK_FACTOR)..=i64::from(MAX_WORK_FACTOR)))]
    pub work_factor: Option<u8>,
}

/// Runs `custodian keygen` (no server involved).
pub fn keygen_command(
    out: &mut dyn std::io::Write,
    json: bool,
    args: KeygenArgs,
) -> anyhow::Result<()> {
    let passphrase = read_passphrase(args.passphrase_file.as_deref())?;
    let pair = keygen(&args.out, &args.name, &passphrase, args.work_factor)?;
    let doc = json!({
        "identity_path": pair.identity_path,
        "recipient_path": pair.recipient_path,
        "recipient": pair.recipient,
    });
    emit(out, json, doc, || {
        format!(
            "identity  {} (passphrase-protected; keep it and the passphrase apart)\n\
             recipient {}\n          {}\n\
             next: kms-cli custodian register --recipient {}",
            pair.identity_path.display(),
            pair.recipient_path.display(),
            pair.recipient,
            pair.recipient_path.display()
        )
    })
}

/// Runs a `custodian` command.
pub async fn run(
    client: &KmsClient,
    out: &mut dyn std::io::Write,
    json: bool,
    command: CustodianCommand,
) -> anyhow::Result<()> {
    match command {
        CustodianCommand::Keygen(args) => keygen_command(out, json, args),
        CustodianCommand::Register { recipient } => {
            let path = Path::new(&recipient);
            let text = if path.is_file() {
                std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
            } else {
                recipient
            };
            let recipient = parse_recipient(&text)?.to_string();
            let key = client.register_custodian_key(&recipient).await?;
            emit(out, json, custodian_key_json(&key), || {
                format!(
                    "registered {} for {} (at {})",
                    key.recipient, key.principal, key.registered_at
                )
            })
        }
        CustodianCommand::List => {
            let keys = client.list_custodian_keys().await?;
            let doc = json!(keys.iter().map(custodian_key_json).collect::<Vec<_>>());
            emit(out, json, doc, || {
                if keys.is_empty() {
                    return "no custodian keys registered".to_string();
                }
                keys.iter()
                    .map(|k| format!("{}  {}  (at {})", k.principal, k.recipient, k.registered_at))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}

fn custodian_key_json(k: &CustodianKey) -> serde_json::Value {
    json!({
        "principal": k.principal,
        "recipient": k.recipient,
        "registered_at": k.registered_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSPHRASE: &str = "correct horse battery staple";

    fn pair(dir: &Path) -> KeyPair {
        keygen(dir, "keeper", PASSPHRASE, Some(MIN_WORK_FACTOR)).expect("keygen")
    }

    fn envelope_json(index: u32, custodian: &str, share: &[u8]) -> String {
        let commitment = hex::encode(proto::share::commitment("cer-1", index, custodian, share));
        json!({
            "format": proto::share::FORMAT,
            "ceremony_id": "cer-1",
            "threshold": 2,
            "shares": 3,
            "index": index,
            "custodian": custodian,
            "kcv": "a1b2c3",
            "commitment": commitment,
            "share": hex::encode(share),
        })
        .to_string()
    }

    #[test]
    fn keygen_then_load_gives_the_same_recipient() {
        let dir = tempfile::tempdir().expect("dir");
        let pair = pair(dir.path());
        assert!(pair.recipient.starts_with("age1"), "{}", pair.recipient);
        assert_eq!(pair.identity_path, dir.path().join("keeper.identity.age"));
        let on_disk = std::fs::read_to_string(&pair.recipient_path).expect("recipient");
        assert_eq!(on_disk, format!("{}\n", pair.recipient));
        let sealed = std::fs::read_to_string(&pair.identity_path).expect("identity");
        assert!(sealed.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        assert!(
            !sealed.contains("AGE-SECRET-KEY"),
            "the identity is stored encrypted"
        );
        let identity = load_identity(&pair.identity_path, PASSPHRASE).expect("load");
        assert_eq!(identity.recipient(), pair.recipient);
        assert!(!format!("{identity:?}").contains("AGE-SECRET-KEY"));
    }

    #[test]
    fn wrong_passphrase_fails_clearly() {
        let dir = tempfile::tempdir().expect("dir");
        let pair = pair(dir.path());
        let err = load_identity(&pair.identity_path, "not the passphrase at all").unwrap_err();
        assert!(err.to_string().contains(NOT_AN_IDENTITY), "{err:#}");
        let err = load_identity(&pair.recipient_path, PASSPHRASE).unwrap_err();
        assert!(err.to_string().contains(NOT_AN_IDENTITY), "{err:#}");
    }

    #[test]
    fn keygen_refuses_to_overwrite_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().expect("dir");
        let first = pair(dir.path());
        let before = std::fs::read(&first.identity_path).expect("identity");
        let err = keygen(dir.path(), "keeper", PASSPHRASE, Some(MIN_WORK_FACTOR)).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err:#}");
        assert_eq!(
            std::fs::read(&first.identity_path).expect("identity"),
            before
        );
        // Only the recipient file of another name exists: still refused, nothing written.
        std::fs::write(dir.path().join("other.recipient"), "age1x\n").expect("write");
        assert!(keygen(dir.path(), "other", PASSPHRASE, Some(MIN_WORK_FACTOR)).is_err());
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["keeper.identity.age", "keeper.recipient", "other.recipient"]
        );
    }

    #[test]
    fn keygen_refuses_bad_names_short_passphrases_and_work_factors() {
        let dir = tempfile::tempdir().expect("dir");
        for name in ["", "../x", "a/b", ".hidden"] {
            assert!(
                keygen(dir.path(), name, PASSPHRASE, Some(10)).is_err(),
                "{name:?}"
            );
        }
        assert!(keygen(dir.path(), "k", "short", Some(10)).is_err());
        assert!(keygen(dir.path(), "k", PASSPHRASE, Some(9)).is_err());
        assert!(keygen(dir.path(), "k", PASSPHRASE, Some(23)).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn identity_file_is_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("dir");
        let keys = dir.path().join("keys");
        let pair = pair(&keys);
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&pair.identity_path), 0o600);
        assert_eq!(mode(&keys), 0o700);
    }

    #[test]
    fn sealed_share_opens_with_its_identity_and_checks_its_commitment() {
        let dir = tempfile::tempdir().expect("dir");
        let pair = pair(dir.path());
        let identity = load_identity(&pair.identity_path, PASSPHRASE).expect("load");
        let custodian = "spiffe://hospital.test/custodian/keeper";
        let sealed = seal_for_test(
            &pair.recipient,
            envelope_json(2, custodian, &[9; 33]).as_bytes(),
        )
        .expect("seal");
        assert!(sealed.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        let envelope = open_share(&identity, &sealed).expect("open");
        assert_eq!(
            (
                envelope.ceremony_id.as_str(),
                envelope.index,
                envelope.custodian.as_str()
            ),
            ("cer-1", 2, custodian)
        );
        assert_eq!(envelope.share_bytes().expect("hex").as_slice(), &[9; 33]);

        // Sealed correctly, but the content does not match its commitment.
        let forged = envelope_json(2, custodian, &[9; 33]).replace("\"index\":2", "\"index\":3");
        let sealed = seal_for_test(&pair.recipient, forged.as_bytes()).expect("seal");
        let err = open_share(&identity, &sealed).unwrap_err();
        assert!(err.to_string().contains("commitment"), "{err:#}");

        // Another custodian's share.
        let other = keygen(dir.path(), "other", PASSPHRASE, Some(MIN_WORK_FACTOR)).expect("keygen");
        let sealed = seal_for_test(&other.recipient, envelope_json(1, "x", &[1; 33]).as_bytes())
            .expect("seal");
        let err = open_share(&identity, &sealed).unwrap_err();
        assert!(
            err.to_string().contains("not sealed to this identity"),
            "{err:#}"
        );
    }

    #[test]
    fn flipping_one_character_of_the_armored_body_fails_to_open() {
        let dir = tempfile::tempdir().expect("dir");
        let pair = pair(dir.path());
        let identity = load_identity(&pair.identity_path, PASSPHRASE).expect("load");
        let sealed = seal_for_test(&pair.recipient, envelope_json(1, "c", &[5; 33]).as_bytes())
            .expect("seal");
        let lines: Vec<&str> = sealed.lines().collect();
        let body_lines = lines.len() - 2;
        let mut flipped_any = 0;
        // Every body line (header stanzas, MAC, payload), at its first and middle character.
        for line in 1..=body_lines {
            for column in [0, lines[line].len() / 2] {
                let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                let mut chars: Vec<char> = edited[line].chars().collect();
                if column >= chars.len() || chars[column] == '=' {
                    continue;
                }
                chars[column] = if chars[column] == 'A' { 'B' } else { 'A' };
                edited[line] = chars.into_iter().collect();
                let text = edited.join("\n") + "\n";
                assert!(
                    open_share(&identity, &text).is_err(),
                    "edit of line {line} column {column} opened"
                );
                flipped_any += 1;
            }
        }
        assert!(flipped_any >= 4, "{flipped_any} edits tried");
        assert!(open_share(&identity, &sealed).is_ok());
    }

    #[test]
    fn passphrase_file_loses_one_line_ending_and_must_not_be_empty() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("pass");
        std::fs::write(&file, "two words  \r\n").expect("write");
        assert_eq!(
            read_passphrase(Some(&file)).expect("read").as_str(),
            "two words  "
        );
        std::fs::write(&file, "\n").expect("write");
        assert!(read_passphrase(Some(&file)).is_err());
        assert!(read_passphrase(Some(&dir.path().join("missing"))).is_err());
    }
}
