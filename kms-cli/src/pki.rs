//! A development PKI for mutual TLS: a private CA, a loopback server certificate and one
//! client certificate per role, all ECDSA P-256 (`rcgen`).
//!
//! **Development and tests only.** The CA's private key sits in a plain file next to the
//! certificates; a production CA keeps its key offline or in an HSM and issues certificates
//! through its own process.
//!
//! Client certificates name their principal twice: a URI SAN `spiffe://<trust domain>/<kind>/<name>`
//! (what the server reads) and the subject CN `<name>` (its fallback).

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use zeroize::Zeroizing;

/// The trust domain of `kms-cli pki init` unless `--trust-domain` says otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "hospital.test";

/// The identities `kms-cli pki init` issues: (name, kind). The kind is the role the principal
/// is meant to hold; binding roles to principals is the server's business, not the PKI's.
pub const DEV_IDENTITIES: &[(&str, &str)] = &[
    ("officer-1", "security-officer"),
    ("officer-2", "security-officer"),
    ("app-1", "app"),
    ("tokenizer-1", "tokenizer"),
    ("reidentifier-1", "reidentifier"),
    ("custodian-1", "custodian"),
    ("custodian-2", "custodian"),
    ("auditor-1", "auditor"),
    ("breakglass-1", "break-glass"),
];

/// Subject alternative names of the development server certificate.
pub const SERVER_SANS: &[&str] = &["127.0.0.1", "::1", "localhost"];

/// Validity of the development CA.
const CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Validity of issued certificates.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Issued certificates start a little in the past, so clocks a few minutes apart agree.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Written first into `ca.key`: PEM readers skip text outside the PEM section.
const CA_KEY_BANNER: &str = "DEVELOPMENT ONLY: private key of a throw-away CA made by `kms-cli pki init`.\n\
Anyone holding this file can mint client certificates this KMS accepts. Never use it in production.\n";

/// The SPIFFE-style principal of a development identity.
pub fn principal(trust_domain: &str, kind: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/{kind}/{name}")
}

/// A certificate and its private key, PEM encoded.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8), wiped on drop.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Issued {
    /// Writes `<dir>/<name>.pem` and `<dir>/<name>.key` (mode 0600), replacing existing files.
    pub fn write(&self, dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        write_file(&cert, self.cert_pem.as_bytes(), false)?;
        write_file(&key, self.key_pem.as_bytes(), true)?;
        Ok((cert, key))
    }
}

/// A development certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new self-signed CA named `common_name`, valid for five years.
    pub fn generate(common_name: &str) -> anyhow::Result<Self> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name_of(Some(common_name));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_VALIDITY).into();
        let cert = params.self_signed(&key).context("self-sign the CA")?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM, PKCS#8), wiped on drop.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// A server certificate for `sans` (IP addresses or DNS names), valid for a year; the CN
    /// is the first SAN.
    pub fn issue_server(&self, sans: &[&str]) -> anyhow::Result<Issued> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name_of(sans.first().copied());
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*s).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()
            .context("server SAN")?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, key, None)
    }

    /// A client certificate with an optional URI SAN and a subject CN (none when `cn` is
    /// empty), valid from `not_before` to `not_after`. Tests use odd values (no name at all,
    /// an expired period) on purpose.
    pub fn issue_client(
        &self,
        uri_san: Option<&str>,
        cn: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<Issued> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name_of((!cn.is_empty()).then_some(cn));
        if let Some(uri) = uri_san {
            params.subject_alt_names = vec![SanType::URI(uri.try_into().context("URI SAN")?)];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, key, Some((not_before, not_after)))
    }

    /// The client certificate of a development identity: URI SAN
    /// `spiffe://<trust_domain>/<kind>/<name>`, CN `<name>`, valid for a year.
    pub fn issue_identity(
        &self,
        trust_domain: &str,
        kind: &str,
        name: &str,
    ) -> anyhow::Result<Issued> {
        let now = SystemTime::now();
        self.issue_client(
            Some(&principal(trust_domain, kind, name)),
            name,
            now - BACKDATE,
            now + LEAF_VALIDITY,
        )
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        key: KeyPair,
        validity: Option<(SystemTime, SystemTime)>,
    ) -> anyhow::Result<Issued> {
        let now = SystemTime::now();
        let (not_before, not_after) = validity.unwrap_or((now - BACKDATE, now + LEAF_VALIDITY));
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("sign the certificate")?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// Writes `<dir>/ca.pem` and `<dir>/ca.key` (mode 0600, marked development-only).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_file(&dir.join("ca.pem"), self.cert_pem.as_bytes(), false)?;
        let key = Zeroizing::new(format!("{CA_KEY_BANNER}{}", self.key_pem().as_str()));
        write_file(&dir.join("ca.key"), key.as_bytes(), true)
    }
}

fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generate an ECDSA P-256 key")
}

fn name_of(common_name: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    if let Some(cn) = common_name {
        name.push(DnType::CommonName, cn);
    }
    name
}

/// Replaces `path` with `bytes`; secrets are created with mode 0600 from the start. Only a
/// regular file is replaced: a device, FIFO, socket, folder or symbolic link is refused
/// ([`crate::check_output_file`]).
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    if crate::check_output_file(path)? {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

/// What [`init`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The PKI folder.
    pub dir: PathBuf,
    /// The CA, kept in memory so callers (tests) can issue more certificates.
    pub ca: DevCa,
    /// Each client identity: (name, principal).
    pub identities: Vec<(String, String)>,
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
}

/// Creates a development PKI in `dir`: `ca.pem`, `ca.key`, `server.pem`, `server.key` and
/// `<name>.pem`/`<name>.key` for every [`DEV_IDENTITIES`] entry. Refuses a folder that already
/// holds files unless `force`.
pub fn init(dir: &Path, trust_domain: &str, force: bool) -> anyhow::Result<Written> {
    if trust_domain.is_empty()
        || !trust_domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        bail!("trust domain {trust_domain:?}: use lower-case letters, digits, '.', '-' and '_'");
    }
    if dir.exists() {
        let occupied = std::fs::read_dir(dir)
            .with_context(|| format!("read {}", dir.display()))?
            .next()
            .is_some();
        if occupied && !force {
            bail!(
                "{} is not empty: refusing to overwrite a PKI (pass --force to replace it)",
                dir.display()
            );
        }
    }
    // Every file name is checked before the first is written (--force replaces regular
    // files only).
    let mut names = vec!["ca".to_string(), "server".to_string()];
    names.extend(DEV_IDENTITIES.iter().map(|(name, _)| name.to_string()));
    for name in &names {
        for ext in ["pem", "key"] {
            crate::check_output_file(&dir.join(format!("{name}.{ext}")))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let ca = DevCa::generate(&format!("KMS development CA ({trust_domain})"))?;
    ca.write(dir)?;
    let mut files = vec![dir.join("ca.pem"), dir.join("ca.key")];
    let (cert, key) = ca.issue_server(SERVER_SANS)?.write(dir, "server")?;
    files.extend([cert, key]);
    let mut identities = Vec::new();
    for (name, kind) in DEV_IDENTITIES {
        let (cert, key) = ca
            .issue_identity(trust_domain, kind, name)?
            .write(dir, name)?;
        files.extend([cert, key]);
        identities.push((name.to_string(), principal(trust_domain, kind, name)));
    }
    Ok(Written {
        dir: dir.to_path_buf(),
        ca,
        identities,
        files,
    })
}

/// `kms-cli pki` commands.
#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create a development CA, a loopback server certificate and one client certificate per
    /// role (development and tests only: the CA key is a plain file).
    Init {
        /// Folder to write to (created; must be empty unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Trust domain of the principals: spiffe://TRUST_DOMAIN/KIND/NAME.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Replace the files of an existing PKI folder.
        #[arg(long)]
        force: bool,
    },
}

/// Runs a `kms-cli pki` command (no server involved).
pub fn run(command: PkiCommand, out: &mut dyn std::io::Write, json: bool) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init {
            out: dir,
            trust_domain,
            force,
        } => {
            let written = init(&dir, &trust_domain, force)?;
            let doc = serde_json::json!({
                "dir": written.dir,
                "development_only": true,
                "files": written.files,
                "identities": written.identities.iter().map(|(name, principal)| serde_json::json!({
                    "name": name,
                    "principal": principal,
                    "cert": written.dir.join(format!("{name}.pem")),
                    "key": written.dir.join(format!("{name}.key")),
                })).collect::<Vec<_>>(),
            });
            super::emit(out, json, doc, || {
                let mut text = format!(
                    "development PKI in {} (DEVELOPMENT ONLY: the CA key is a plain file)\n",
                    written.dir.display()
                );
                for file in &written.files {
                    text.push_str(&format!("  wrote {}\n", file.display()));
                }
                text.push_str("principals:\n");
                for (name, principal) in &written.identities {
                    text.push_str(&format!("  {name:<16} {principal}\n"));
                }
                text.push_str(&format!(
                    "server: [tls] ca_cert = \"{0}/ca.pem\", cert = \"{0}/server.pem\", key = \"{0}/server.key\"\n\
                     client: kms-cli --identity {0}/<name> ...",
                    written.dir.display()
                ));
                text
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_every_file_with_private_keys_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("dir");
        let pki = dir.path().join("pki");
        let written = init(&pki, DEFAULT_TRUST_DOMAIN, false).expect("init");
        assert_eq!(written.files.len(), 4 + 2 * DEV_IDENTITIES.len());
        assert!(written
            .identities
            .contains(&("app-1".into(), "spiffe://hospital.test/app/app-1".into())));
        for file in &written.files {
            let text = std::fs::read_to_string(file).expect("read");
            assert!(text.contains("-----BEGIN"), "{}", file.display());
            #[cfg(unix)]
            if file.extension().is_some_and(|e| e == "key") {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(file).expect("meta").permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", file.display());
            }
        }
        assert!(std::fs::read_to_string(pki.join("ca.key"))
            .expect("ca.key")
            .starts_with("DEVELOPMENT ONLY"));
        let err = init(&pki, DEFAULT_TRUST_DOMAIN, false).expect_err("occupied");
        assert!(err.to_string().contains("--force"), "{err}");
        init(&pki, "clinic.test", true).expect("forced");
        assert!(init(&dir.path().join("x"), "Bad Domain", false).is_err());
    }
}
