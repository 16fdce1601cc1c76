//! Configuration: a TOML file plus `KMS_*` environment overrides, parsed once at start-up into
//! the validated [`ServerParams`] that the rest of the server takes.
//!
//! | TOML key                  | environment              | default                              |
//! |---------------------------|--------------------------|--------------------------------------|
//! | `listen`                  | `KMS_LISTEN`             | `127.0.0.1:50051`                    |
//! | `instance_name`           | `KMS_INSTANCE_NAME`      | `<host name>:<listen port>` (unique per replica sharing a store) |
//! | `hsm.module`              | `KMS_HSM_MODULE`         | `/usr/lib/softhsm/libsofthsm2.so`    |
//! | `hsm.token_label`         | `KMS_HSM_TOKEN_LABEL`    | (required)                           |
//! | `hsm.pin_file`            | `KMS_HSM_PIN_FILE`       | — (or the PIN itself in `KMS_HSM_PIN`) |
//! | `hsm.so_pin_file`         | `KMS_HSM_SO_PIN_FILE`    | — (or `KMS_HSM_SO_PIN`; only recovery ceremonies need it) |
//! | `hsm.session_pool_size`   | `KMS_HSM_SESSION_POOL_SIZE` | `8`                               |
//! | `store.url`               | `KMS_STORE_URL`          | (required) `sqlite://…` or `postgres://…` |
//! | `store.max_connections`   | `KMS_STORE_MAX_CONNECTIONS` | `8` (plus one the audit writer keeps) |
//! | `log.format`              | `KMS_LOG_FORMAT`         | `text` (or `json`)                   |
//! | `rotation.max_usage_per_version` | `KMS_ROTATION_MAX_USAGE` | `4000000000` (below 2^32)    |
//! | `rotation.reservation_block` | `KMS_ROTATION_BLOCK`   | `1000`                               |
//! | `rotation.check_interval_secs` | `KMS_ROTATION_CHECK_INTERVAL_SECS` | `60`              |
//! | `bootstrap.security_officers` | `KMS_BOOTSTRAP_SECURITY_OFFICERS` (comma-separated) | (required, ≥ 2; used on first start only) |
//! | `approvals.ttl_secs`      | `KMS_APPROVAL_TTL_SECS`  | `86400`                              |
//! | `break_glass.max_window_secs` | `KMS_BREAK_GLASS_MAX_WINDOW_SECS` | `14400` (4 hours)     |
//! | `break_glass.require_approval` | `KMS_BREAK_GLASS_REQUIRE_APPROVAL` | `true`             |
//! | `audit.checkpoint_every`  | `KMS_AUDIT_CHECKPOINT_EVERY` | `1000` records                   |
//! | `audit.checkpoint_interval_secs` | `KMS_AUDIT_CHECKPOINT_INTERVAL_SECS` | `60`          |
//! | `audit.enabled`           | `KMS_AUDIT_ENABLED`      | `true` (`false` only for benchmark baselines) |
//! | `tls.ca_cert`             | `KMS_TLS_CA_CERT`        | (required) PEM of the CA client certificates chain to |
//! | `tls.cert`                | `KMS_TLS_CERT`           | (required) PEM of the server certificate chain |
//! | `tls.key`                 | `KMS_TLS_KEY`            | (required) PEM of the server private key |
//!
//! The server speaks only mutual TLS; `kms-cli pki init` creates a development PKI.
//! The PIN is never accepted in the TOML file itself, only from a file or the environment, and
//! is held in a zeroizing secret type from the moment it is read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::hsm::HsmParams;
use crate::tls::TlsParams;

/// Where the PKCS#11 module usually is on Debian and Ubuntu.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    listen: Option<String>,
    instance_name: Option<String>,
    #[serde(default)]
    hsm: RawHsm,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    rotation: RawRotation,
    #[serde(default)]
    bootstrap: RawBootstrap,
    #[serde(default)]
    approvals: RawApprovals,
    #[serde(default)]
    break_glass: RawBreakGlass,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    tls: RawTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootstrap {
    security_officers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovals {
    ttl_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreakGlass {
    max_window_secs: Option<u64>,
    require_approval: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    enabled: Option<bool>,
    checkpoint_every: Option<u64>,
    checkpoint_interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    max_usage_per_version: Option<u64>,
    reservation_block: Option<u64>,
    check_interval_secs: Option<u64>,
}

/// Rotation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationParams {
    /// Usage limits per key version.
    pub usage: crate::service::UsagePolicy,
    /// How often the scheduler looks for keys due for rotation.
    pub check_interval: std::time::Duration,
}

impl Default for RotationParams {
    fn default() -> Self {
        RotationParams {
            usage: crate::service::UsagePolicy::default(),
            check_interval: std::time::Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: Option<PathBuf>,
    token_label: Option<String>,
    pin_file: Option<PathBuf>,
    so_pin_file: Option<PathBuf>,
    session_pool_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
    max_connections: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (production).
    Json,
}

/// Validated parameters of one server.
#[derive(Debug)]
pub struct ServerParams {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// This replica's name among the replicas sharing the store.
    pub instance: String,
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Token and login.
    pub hsm: HsmParams,
    /// Database URL.
    pub store_url: String,
    /// Database pool size.
    pub store_max_connections: u32,
    /// Log format.
    pub log_format: LogFormat,
    /// Rotation settings.
    pub rotation: RotationParams,
    /// Bootstrap officers, approval and break-glass policy.
    pub authz: crate::authz::AuthzParams,
    /// Audit settings; `None` when the audit trail is turned off (benchmark baselines only).
    pub audit: Option<crate::audit::AuditParams>,
    /// Mutual TLS material.
    pub tls: TlsParams,
}

/// Configuration errors; each names the setting at fault, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys. Only the parser's message and the line
    /// are kept: the offending line itself may hold a secret (a PIN put in the wrong place, a
    /// database password).
    #[error("invalid configuration file{}: {message}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Parse {
        /// What the parser objected to.
        message: String,
        /// 1-based line, when known.
        line: Option<usize>,
    },
    /// A setting is missing or malformed.
    #[error("{setting}: {reason}")]
    Invalid {
        /// Which setting.
        setting: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

impl ServerParams {
    /// Reads the file (if any), applies environment overrides from `env`, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    message: e.message().to_string(),
                    line: e
                        .span()
                        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1),
                })?
            }
            None => RawConfig::default(),
        };
        Self::from_raw(raw, env)
    }

    fn from_raw(raw: RawConfig, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let listen_text = env("KMS_LISTEN")
            .or(raw.listen)
            .unwrap_or_else(|| "127.0.0.1:50051".into());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("listen", "not an IP:port address"))?;
        let instance = match env("KMS_INSTANCE_NAME").or(raw.instance_name) {
            Some(name) => name,
            None => format!("{}:{}", host_name(), listen.port()),
        };
        if !valid_instance_name(&instance) {
            return Err(invalid(
                "instance_name",
                "1-64 characters of A-Z a-z 0-9 . _ : -",
            ));
        }

        let module = env("KMS_HSM_MODULE")
            .map(PathBuf::from)
            .or(raw.hsm.module)
            .unwrap_or_else(|| DEFAULT_MODULE.into());
        let token_label = env("KMS_HSM_TOKEN_LABEL")
            .or(raw.hsm.token_label)
            .ok_or_else(|| invalid("hsm.token_label", "required"))?;
        if token_label.is_empty() || token_label.len() > 32 {
            return Err(invalid("hsm.token_label", "1-32 bytes"));
        }
        let pin = read_pin(&env, raw.hsm.pin_file)?;
        let so_pin = read_so_pin(&env, raw.hsm.so_pin_file)?;
        let pool_size = match env("KMS_HSM_SESSION_POOL_SIZE") {
            Some(v) => v
                .parse()
                .map_err(|_| invalid("hsm.session_pool_size", "not a number"))?,
            None => raw.hsm.session_pool_size.unwrap_or(8),
        };
        if !(1..=256).contains(&pool_size) {
            return Err(invalid("hsm.session_pool_size", "1-256"));
        }

        let store_url = env("KMS_STORE_URL")
            .or(raw.store.url)
            .ok_or_else(|| invalid("store.url", "required"))?;
        if crate::store::Backend::of_url(&store_url).is_none() {
            return Err(invalid("store.url", "must start with sqlite: or postgres:"));
        }
        let store_max_connections = match env("KMS_STORE_MAX_CONNECTIONS") {
            Some(v) => v
                .parse()
                .map_err(|_| invalid("store.max_connections", "not a number"))?,
            None => raw.store.max_connections.unwrap_or(8),
        };
        if !(1..=1000).contains(&store_max_connections) {
            return Err(invalid("store.max_connections", "1-1000"));
        }
        let log_format = match env("KMS_LOG_FORMAT").or(raw.log.format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(_) => return Err(invalid("log.format", "text or json")),
        };
        let number = |name: &str,
                      setting: &'static str,
                      file: Option<u64>,
                      default: u64|
         -> Result<u64, ConfigError> {
            match env(name) {
                Some(v) => v.parse().map_err(|_| invalid(setting, "not a number")),
                None => Ok(file.unwrap_or(default)),
            }
        };
        let defaults = RotationParams::default();
        let max_usage = number(
            "KMS_ROTATION_MAX_USAGE",
            "rotation.max_usage_per_version",
            raw.rotation.max_usage_per_version,
            defaults.usage.max_per_version,
        )?;
        if !(1..(1u64 << 32)).contains(&max_usage) {
            return Err(invalid(
                "rotation.max_usage_per_version",
                "1 ..= 2^32 - 1 (random GCM nonces)",
            ));
        }
        let block = number(
            "KMS_ROTATION_BLOCK",
            "rotation.reservation_block",
            raw.rotation.reservation_block,
            defaults.usage.block,
        )?;
        if !(1..=1_000_000).contains(&block) {
            return Err(invalid("rotation.reservation_block", "1 ..= 1000000"));
        }
        let interval = number(
            "KMS_ROTATION_CHECK_INTERVAL_SECS",
            "rotation.check_interval_secs",
            raw.rotation.check_interval_secs,
            defaults.check_interval.as_secs(),
        )?;
        if !(1..=86_400).contains(&interval) {
            return Err(invalid("rotation.check_interval_secs", "1 ..= 86400"));
        }
        let tls_path = |name: &str, setting: &'static str, file: Option<PathBuf>| {
            env(name).map(PathBuf::from).or(file).ok_or_else(|| {
                invalid(
                    setting,
                    format!(
                        "required: the server speaks only mutual TLS (set it in [tls] or {name}; \
                         `kms-cli pki init` creates a development PKI)"
                    ),
                )
            })
        };
        let tls = TlsParams {
            ca_cert: tls_path("KMS_TLS_CA_CERT", "tls.ca_cert", raw.tls.ca_cert)?,
            cert: tls_path("KMS_TLS_CERT", "tls.cert", raw.tls.cert)?,
            key: tls_path("KMS_TLS_KEY", "tls.key", raw.tls.key)?,
        };
        let rotation = RotationParams {
            usage: crate::service::UsagePolicy {
                max_per_version: max_usage,
                block,
            },
            check_interval: std::time::Duration::from_secs(interval),
        };
        let officers: Vec<String> = match env("KMS_BOOTSTRAP_SECURITY_OFFICERS") {
            Some(list) => list
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
            None => raw.bootstrap.security_officers.unwrap_or_default(),
        };
        let mut distinct = officers.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() < 2 {
            return Err(invalid(
                "bootstrap.security_officers",
                "at least two distinct principals (dual approval from the first day)",
            ));
        }
        let authz_defaults = crate::authz::AuthzParams::default();
        let ttl = number(
            "KMS_APPROVAL_TTL_SECS",
            "approvals.ttl_secs",
            raw.approvals.ttl_secs,
            authz_defaults.approval_ttl_secs.unsigned_abs(),
        )?;
        if !(60..=30 * 86_400).contains(&ttl) {
            return Err(invalid("approvals.ttl_secs", "60 ..= 2592000 (30 days)"));
        }
        let max_window = number(
            "KMS_BREAK_GLASS_MAX_WINDOW_SECS",
            "break_glass.max_window_secs",
            raw.break_glass.max_window_secs,
            authz_defaults.break_glass_max_secs,
        )?;
        if !(60..=86_400).contains(&max_window) {
            return Err(invalid("break_glass.max_window_secs", "60 ..= 86400"));
        }
        let flag =
            |name: &str, setting: &'static str, file: Option<bool>, default: bool| match env(name)
                .as_deref()
            {
                Some("true" | "1") => Ok(true),
                Some("false" | "0") => Ok(false),
                Some(_) => Err(invalid(setting, "true or false")),
                None => Ok(file.unwrap_or(default)),
            };
        let require_approval = flag(
            "KMS_BREAK_GLASS_REQUIRE_APPROVAL",
            "break_glass.require_approval",
            raw.break_glass.require_approval,
            authz_defaults.break_glass_requires_approval,
        )?;
        let authz = crate::authz::AuthzParams {
            bootstrap_officers: officers,
            approval_ttl_secs: i64::try_from(ttl).unwrap_or(i64::MAX),
            break_glass_max_secs: max_window,
            break_glass_requires_approval: require_approval,
        };
        let audit_defaults = crate::audit::AuditParams::default();
        let checkpoint_every = number(
            "KMS_AUDIT_CHECKPOINT_EVERY",
            "audit.checkpoint_every",
            raw.audit.checkpoint_every,
            u64::from(audit_defaults.checkpoint_every),
        )?;
        if !(1..=1_000_000).contains(&checkpoint_every) {
            return Err(invalid("audit.checkpoint_every", "1 ..= 1000000"));
        }
        let checkpoint_interval = number(
            "KMS_AUDIT_CHECKPOINT_INTERVAL_SECS",
            "audit.checkpoint_interval_secs",
            raw.audit.checkpoint_interval_secs,
            audit_defaults.checkpoint_interval.as_secs(),
        )?;
        if !(1..=86_400).contains(&checkpoint_interval) {
            return Err(invalid("audit.checkpoint_interval_secs", "1 ..= 86400"));
        }
        let audit_enabled = flag(
            "KMS_AUDIT_ENABLED",
            "audit.enabled",
            raw.audit.enabled,
            true,
        )?;
        let audit = audit_enabled.then(|| crate::audit::AuditParams {
            checkpoint_every: u32::try_from(checkpoint_every).unwrap_or(u32::MAX),
            checkpoint_interval: std::time::Duration::from_secs(checkpoint_interval),
            ..audit_defaults
        });
        Ok(ServerParams {
            authz,
            audit,
            rotation,
            listen,
            instance,
            module,
            hsm: HsmParams {
                token_label,
                pin,
                so_pin,
                pool_size,
            },
            store_url,
            store_max_connections,
            log_format,
            tls,
        })
    }
}

/// Whether `name` is a usable instance name: it is shown to callers, so plain characters only.
fn valid_instance_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The kernel's host name, reduced to the characters an instance name may hold.
fn host_name() -> String {
    let name: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(50)
        .collect();
    if name.is_empty() {
        "kms".to_string()
    } else {
        name
    }
}

fn read_pin(
    env: &impl Fn(&str) -> Option<String>,
    file_setting: Option<PathBuf>,
) -> Result<AuthPin, ConfigError> {
    if let Some(pin) = env("KMS_HSM_PIN") {
        let pin = Zeroizing::new(pin);
        return nonempty_pin(&pin);
    }
    let path = env("KMS_HSM_PIN_FILE")
        .map(PathBuf::from)
        .or(file_setting)
        .ok_or_else(|| invalid("hsm.pin_file", "required (or set KMS_HSM_PIN)"))?;
    let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
        invalid(
            "hsm.pin_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?);
    nonempty_pin(text.trim_end_matches(['\r', '\n']))
}

/// The security officer's PIN, needed only by recovery ceremonies (to create the trusted
/// recovery key). Optional: without it the server refuses recovery init, rekey and restore.
fn read_so_pin(
    env: &impl Fn(&str) -> Option<String>,
    file_setting: Option<PathBuf>,
) -> Result<Option<AuthPin>, ConfigError> {
    if let Some(pin) = env("KMS_HSM_SO_PIN") {
        let pin = Zeroizing::new(pin);
        return nonempty_pin(&pin).map(Some);
    }
    let Some(path) = env("KMS_HSM_SO_PIN_FILE")
        .map(PathBuf::from)
        .or(file_setting)
    else {
        return Ok(None);
    };
    let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
        invalid(
            "hsm.so_pin_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?);
    nonempty_pin(text.trim_end_matches(['\r', '\n'])).map(Some)
}

fn nonempty_pin(pin: &str) -> Result<AuthPin, ConfigError> {
    if pin.is_empty() {
        return Err(invalid("hsm.pin_file / KMS_HSM_PIN", "the PIN is empty"));
    }
    Ok(AuthPin::from(pin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Two distinct bootstrap officers, as `KMS_BOOTSTRAP_SECURITY_OFFICERS` takes them.
    const OFFICERS: &str = "spiffe://t/security-officer/o1, spiffe://t/security-officer/o2";

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn env_overrides_and_defaults() {
        let p = ServerParams::from_raw(
            toml::from_str("[hsm]\ntoken_label = \"file\"\n[store]\nurl = \"sqlite://x.db\"")
                .expect("toml"),
            env_of(&[
                ("KMS_HSM_TOKEN_LABEL", "env"),
                ("KMS_HSM_PIN", "1234"),
                ("KMS_TLS_CA_CERT", "/pki/ca.pem"),
                ("KMS_TLS_CERT", "/pki/server.pem"),
                ("KMS_TLS_KEY", "/pki/server.key"),
                ("KMS_BOOTSTRAP_SECURITY_OFFICERS", OFFICERS),
            ]),
        )
        .expect("valid");
        assert_eq!(p.hsm.token_label, "env");
        assert_eq!(
            p.authz.bootstrap_officers,
            [
                "spiffe://t/security-officer/o1",
                "spiffe://t/security-officer/o2"
            ]
        );
        assert_eq!(p.listen, "127.0.0.1:50051".parse().expect("addr"));
        assert_eq!(p.hsm.pool_size, 8);
        assert_eq!(p.tls.key, PathBuf::from("/pki/server.key"));
        assert!(
            !format!("{p:?}").contains("1234"),
            "the PIN must not appear in Debug output"
        );
    }

    #[test]
    fn any_listen_address_is_accepted() {
        // Every caller is authenticated (mutual TLS) and authorized (roles, grants): the
        // server may listen on a network address.
        let p = ServerParams::from_raw(
            RawConfig::default(),
            env_of(&[
                ("KMS_LISTEN", "0.0.0.0:50051"),
                ("KMS_HSM_TOKEN_LABEL", "t"),
                ("KMS_HSM_PIN", "1"),
                ("KMS_STORE_URL", "sqlite://x"),
                ("KMS_TLS_CA_CERT", "/pki/ca.pem"),
                ("KMS_TLS_CERT", "/pki/server.pem"),
                ("KMS_TLS_KEY", "/pki/server.key"),
                ("KMS_BOOTSTRAP_SECURITY_OFFICERS", OFFICERS),
            ]),
        )
        .expect("valid");
        assert_eq!(p.listen.to_string(), "0.0.0.0:50051");
    }

    #[test]
    fn instance_names_default_to_host_and_port_and_are_plain() {
        let base = [
            ("KMS_LISTEN", "127.0.0.1:50071"),
            ("KMS_HSM_TOKEN_LABEL", "t"),
            ("KMS_HSM_PIN", "1"),
            ("KMS_STORE_URL", "sqlite://x"),
            ("KMS_TLS_CA_CERT", "/pki/ca.pem"),
            ("KMS_TLS_CERT", "/pki/server.pem"),
            ("KMS_TLS_KEY", "/pki/server.key"),
            ("KMS_BOOTSTRAP_SECURITY_OFFICERS", OFFICERS),
        ];
        let p = ServerParams::from_raw(RawConfig::default(), env_of(&base)).expect("valid");
        assert!(p.instance.ends_with(":50071"), "{}", p.instance);
        assert!(valid_instance_name(&p.instance), "{}", p.instance);
        let named = |name: &str| {
            let mut pairs = base.to_vec();
            pairs.push(("KMS_INSTANCE_NAME", name));
            ServerParams::from_raw(RawConfig::default(), env_of(&pairs))
        };
        assert_eq!(named("kms-2.eu").expect("valid").instance, "kms-2.eu");
        for bad in ["", "two words", "a/b", "ü", &"a".repeat(65)] {
            assert!(named(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Regression: a PIN written into the TOML file by mistake must not be echoed back by the
    /// parse error (toml's default message quotes the offending line).
    #[test]
    fn parse_errors_never_quote_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("kms.toml");
        for text in [
            "[hsm]\npin = \"s3cret-pin-4711\"\n",
            "[store]\nurl = postgres://u:s3cret-pin-4711@h/db\n",
        ] {
            std::fs::write(&path, text).expect("write");
            let err = ServerParams::load(Some(&path), |_| None)
                .expect_err("refused")
                .to_string();
            assert!(!err.contains("s3cret-pin-4711"), "{err}");
            assert!(err.contains("line 2"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_and_missing_settings_are_errors() {
        assert!(toml::from_str::<RawConfig>("lisen = \"x\"").is_err());
        let err = ServerParams::from_raw(RawConfig::default(), env_of(&[("KMS_HSM_PIN", "1")]))
            .expect_err("no label");
        assert!(err.to_string().contains("token_label"));
        let err = ServerParams::from_raw(
            RawConfig::default(),
            env_of(&[
                ("KMS_HSM_TOKEN_LABEL", "t"),
                ("KMS_HSM_PIN", "1"),
                ("KMS_STORE_URL", "mysql://x"),
            ]),
        )
        .expect_err("bad url");
        assert!(err.to_string().contains("store.url"));
    }

    #[test]
    fn tls_is_required_and_read_from_its_section() {
        let base = [
            ("KMS_HSM_TOKEN_LABEL", "t"),
            ("KMS_HSM_PIN", "1"),
            ("KMS_STORE_URL", "sqlite://x"),
        ];
        let err = ServerParams::from_raw(RawConfig::default(), env_of(&base)).expect_err("no TLS");
        assert!(err.to_string().contains("tls.ca_cert"), "{err}");
        assert!(err.to_string().contains("kms-cli pki init"), "{err}");
        let raw: RawConfig =
            toml::from_str("[tls]\nca_cert = \"ca.pem\"\ncert = \"s.pem\"\nkey = \"s.key\"\n")
                .expect("toml");
        let p = ServerParams::from_raw(
            raw,
            env_of(
                &[
                    base.as_slice(),
                    &[
                        ("KMS_TLS_KEY", "env.key"),
                        ("KMS_BOOTSTRAP_SECURITY_OFFICERS", OFFICERS),
                    ],
                ]
                .concat(),
            ),
        )
        .expect("valid");
        assert_eq!(
            p.tls,
            TlsParams {
                ca_cert: "ca.pem".into(),
                cert: "s.pem".into(),
                key: "env.key".into(),
            }
        );
        assert!(toml::from_str::<RawConfig>("[tls]\nkey_file = \"x\"").is_err());
    }

    /// Dual approval needs two officers from the first start: none, one, or one principal
    /// named twice (in the file or in the environment) is refused; two distinct ones pass.
    #[test]
    fn fewer_than_two_distinct_bootstrap_officers_are_refused() {
        let base = [
            ("KMS_HSM_TOKEN_LABEL", "t"),
            ("KMS_HSM_PIN", "1"),
            ("KMS_STORE_URL", "sqlite://x"),
            ("KMS_TLS_CA_CERT", "ca.pem"),
            ("KMS_TLS_CERT", "s.pem"),
            ("KMS_TLS_KEY", "s.key"),
        ];
        let with = |officers: Option<&'static str>| {
            let mut pairs = base.to_vec();
            if let Some(list) = officers {
                pairs.push(("KMS_BOOTSTRAP_SECURITY_OFFICERS", list));
            }
            ServerParams::from_raw(RawConfig::default(), env_of(&pairs))
        };
        for officers in [
            None,
            Some(""),
            Some("spiffe://t/security-officer/o1"),
            Some("spiffe://t/security-officer/o1,spiffe://t/security-officer/o1"),
            Some(" spiffe://t/security-officer/o1 , , spiffe://t/security-officer/o1"),
        ] {
            let err = with(officers).expect_err("refused");
            assert!(
                err.to_string().contains("bootstrap.security_officers")
                    && err.to_string().contains("at least two distinct"),
                "{officers:?}: {err}"
            );
        }
        let file =
            |text: &str| ServerParams::from_raw(toml::from_str(text).expect("toml"), env_of(&base));
        let err = file("[bootstrap]\nsecurity_officers = [\"a\", \"a\"]\n")
            .expect_err("one principal twice in the file");
        assert!(
            err.to_string().contains("bootstrap.security_officers"),
            "{err}"
        );
        let p = file("[bootstrap]\nsecurity_officers = [\"a\", \"b\"]\n").expect("two");
        assert_eq!(p.authz.bootstrap_officers, ["a", "b"]);
        // The environment replaces the file's list.
        let mut pairs = base.to_vec();
        pairs.push(("KMS_BOOTSTRAP_SECURITY_OFFICERS", "c"));
        let err = ServerParams::from_raw(
            toml::from_str("[bootstrap]\nsecurity_officers = [\"a\", \"b\"]\n").expect("toml"),
            env_of(&pairs),
        )
        .expect_err("the environment names only one");
        assert!(
            err.to_string().contains("bootstrap.security_officers"),
            "{err}"
        );
    }
}
