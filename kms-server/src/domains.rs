//! Tokenization domains: a study or data-use agreement owns versioned 32-byte domain keys,
//! stored only as blobs sealed under a KMS master key and opened per request (never cached
//! here, so a disabled master key stops tokenization at once).
//!
//! Who may use a domain is a key grant on its master key: `tokenize` (server-side transforms),
//! `domain-key` (hold the key and tokenize locally) and `reidentify` (reverse tokens, each call
//! a disclosure), optionally limited to one domain with `context_equals {"kms:domain": NAME}`,
//! since every check passes the context `{"kms:domain": NAME}`. The transforms themselves are
//! the `tokenize` crate's, the same code the SDK runs locally, so both modes agree.

use std::sync::Arc;

use sqlx::Row;
use tokenize::{Context as TokenContext, DomainKey, FieldTransformer, Outcome, Transform};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::KmsError;
use crate::service::{Clock, Context, KeyAccess, KeyOp, KeyService, Unrestricted};
use crate::store::{db_error, Store};

/// Most values in one `Tokenize` or `Detokenize` call.
pub const MAX_VALUES: usize = 10_000;

/// Longest value or token, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Longest purpose of use, in bytes.
pub const MAX_PURPOSE_BYTES: usize = 256;

/// A domain as stored (no key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Its name.
    pub domain: String,
    /// The master key that seals its keys.
    pub key_id: Uuid,
    /// The version new tokens are made with.
    pub current_version: u32,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// The officer who created it.
    pub created_by: String,
}

/// One value's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The transformed (or restored) value.
    Value(String),
    /// The transform removes the field.
    Dropped,
}

/// The domain operations, over the key service that seals and opens domain keys.
pub struct Domains {
    service: Arc<KeyService>,
    store: Store,
    clock: Arc<dyn Clock>,
}

impl Domains {
    /// Domains stored in `store`, their keys sealed by `service`.
    pub fn new(service: Arc<KeyService>, store: Store, clock: Arc<dyn Clock>) -> Self {
        Self {
            service,
            store,
            clock,
        }
    }

    /// Creates `domain` with its first key version, sealed under `key`.
    pub async fn create(&self, domain: &str, key: &str, by: &str) -> Result<DomainInfo, KmsError> {
        check_name(domain)?;
        let key_id = self.service.key_id_of(key).await?;
        if self.find(domain).await?.is_some() {
            return Err(KmsError::Conflict {
                reason: "domain already exists",
            });
        }
        let sealed = self.seal_version(key_id, domain, 1).await?;
        let now = self.clock.now_unix();
        let mut tx = self.store.pool().begin().await.map_err(db_error)?;
        let inserted = sqlx::query(
            "INSERT INTO tokenization_domains (domain, key_id, created_at, created_by) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(domain)
        .bind(key_id.to_string())
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            // Two concurrent creations: the primary key lets one in. Any other failure is the
            // store's, and is reported as such.
            drop(tx);
            return Err(if self.find(domain).await?.is_some() {
                KmsError::Conflict {
                    reason: "domain already exists",
                }
            } else {
                db_error(e)
            });
        }
        insert_version(&mut tx, domain, 1, &sealed, now, "").await?;
        tx.commit().await.map_err(db_error)?;
        Ok(DomainInfo {
            domain: domain.to_string(),
            key_id,
            current_version: 1,
            created_at: now,
            created_by: by.to_string(),
        })
    }

    /// Every domain, by name.
    pub async fn list(&self) -> Result<Vec<DomainInfo>, KmsError> {
        let rows = sqlx::query(&format!("{SELECT_DOMAINS} GROUP BY d.domain, d.key_id, d.created_at, d.created_by ORDER BY d.domain"))
            .fetch_all(self.store.pool())
            .await
            .map_err(db_error)?;
        rows.iter().map(domain_from_row).collect()
    }

    /// The domain named `domain`, if it exists.
    pub async fn find(&self, domain: &str) -> Result<Option<DomainInfo>, KmsError> {
        let row = sqlx::query(&format!(
            "{SELECT_DOMAINS} WHERE d.domain = $1 GROUP BY d.domain, d.key_id, d.created_at, \
             d.created_by"
        ))
        .bind(domain)
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_error)?;
        row.as_ref().map(domain_from_row).transpose()
    }

    /// Seals a fresh key for the domain's next version, for a rotation proposal: the blob is
    /// stored only when the proposal is approved (see `authz`), and then only if no other
    /// version came first.
    pub async fn prepare_rotation(&self, domain: &str) -> Result<(u32, String), KmsError> {
        let info = self
            .find(domain)
            .await?
            .ok_or(KmsError::NotFound { what: "domain" })?;
        let version = info
            .current_version
            .checked_add(1)
            .ok_or(KmsError::Conflict {
                reason: "domain has too many versions",
            })?;
        let sealed = self.seal_version(info.key_id, domain, version).await?;
        Ok((version, sealed))
    }

    /// The domain key `version` (0: current) for a caller allowed `op` in the domain. A caller
    /// without the grant learns nothing, not even whether the domain exists.
    pub async fn key(
        &self,
        access: &dyn KeyAccess,
        op: KeyOp,
        domain: &str,
        version: u32,
    ) -> Result<(DomainInfo, DomainKey), KmsError> {
        let info = match self.find(domain).await? {
            Some(info) => info,
            None if access.hides_unknown_keys() => {
                return Err(KmsError::PermissionDenied {
                    reason: "no grant for this domain and operation",
                })
            }
            None => return Err(KmsError::NotFound { what: "domain" }),
        };
        access.check(op, info.key_id, &domain_context(domain, None))?;
        let version = if version == 0 {
            info.current_version
        } else {
            version
        };
        let row = sqlx::query(
            "SELECT sealed_key FROM domain_key_versions WHERE domain = $1 AND version = $2",
        )
        .bind(domain)
        .bind(i64::from(version))
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_error)?
        .ok_or(KmsError::NotFound {
            what: "domain key version",
        })?;
        let sealed: String = row.try_get("sealed_key").map_err(db_error)?;
        let blob = hex::decode(sealed).map_err(|_| KmsError::Internal {
            what: "stored domain key is not hex",
        })?;
        let key_id = info.key_id.to_string();
        let opened = self
            .service
            .decrypt(
                &Unrestricted,
                &blob,
                &domain_context(domain, Some(version)),
                Some(&key_id),
            )
            .await?;
        let bytes: [u8; 32] =
            opened
                .plaintext
                .as_slice()
                .try_into()
                .map_err(|_| KmsError::Internal {
                    what: "domain key is not 32 bytes",
                })?;
        let key = DomainKey::new(domain, version, Zeroizing::new(bytes));
        Ok((info, key))
    }

    /// The vault token of every value in `field` (a new random one for a value not seen
    /// before under this key version). Values are never stored in clear: rows hold a keyed
    /// lookup hash and the value sealed with AES-SIV.
    pub async fn vault_tokenize(
        &self,
        key: &DomainKey,
        field: &str,
        values: &[String],
    ) -> Result<Vec<Result<Item, KmsError>>, KmsError> {
        let mut items = Vec::with_capacity(values.len());
        for value in values {
            if value.is_empty() {
                items.push(Ok(Item::Value(String::new())));
                continue;
            }
            let lookup = tokenize::vault::lookup(key, field, value);
            if let Some(token) = self.vault_find(key, field, &lookup).await? {
                items.push(Ok(Item::Value(token)));
                continue;
            }
            let mut random = [0u8; tokenize::vault::TOKEN_BYTES];
            getrandom::fill(&mut random).map_err(|_| KmsError::Internal {
                what: "no randomness for a vault token",
            })?;
            let token = tokenize::vault::token(&random);
            let sealed = hex::encode(tokenize::vault::seal(key, field, value)?);
            // A concurrent call may have stored the same value first: then its token stands.
            sqlx::query(
                "INSERT INTO token_vault (domain, field, key_version, lookup, token, \
                 sealed_value, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(key.domain())
            .bind(field)
            .bind(i64::from(key.version()))
            .bind(lookup.as_str())
            .bind(token.as_str())
            .bind(sealed.as_str())
            .bind(self.clock.now_unix())
            .execute(self.store.pool())
            .await
            .map_err(db_error)?;
            let stored = self
                .vault_find(key, field, &lookup)
                .await?
                .ok_or(KmsError::Internal {
                    what: "vault row missing after insert",
                })?;
            items.push(Ok(Item::Value(stored)));
        }
        Ok(items)
    }

    async fn vault_find(
        &self,
        key: &DomainKey,
        field: &str,
        lookup: &str,
    ) -> Result<Option<String>, KmsError> {
        let row = sqlx::query(
            "SELECT token FROM token_vault WHERE domain = $1 AND field = $2 \
             AND key_version = $3 AND lookup = $4",
        )
        .bind(key.domain())
        .bind(field)
        .bind(i64::from(key.version()))
        .bind(lookup)
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_error)?;
        row.map(|r| r.try_get("token").map_err(db_error))
            .transpose()
    }

    /// The values of vault tokens, opened with the domain key version each was made under
    /// (fetched for a caller allowed `reidentify`, checked first, so that nobody else can
    /// even learn whether a token exists). An unknown token fails alone.
    pub async fn vault_detokenize(
        &self,
        access: &dyn KeyAccess,
        domain: &str,
        field: &str,
        tokens: &[String],
    ) -> Result<Vec<Result<Item, KmsError>>, KmsError> {
        let (_, current) = self.key(access, KeyOp::Reidentify, domain, 0).await?;
        let mut keys: Vec<DomainKey> = vec![current];
        let mut items = Vec::with_capacity(tokens.len());
        for token in tokens {
            if !tokenize::vault::is_token(token) {
                items.push(Err(KmsError::Transform(
                    tokenize::TokenizeError::DecryptFailed,
                )));
                continue;
            }
            let row = sqlx::query(
                "SELECT key_version, sealed_value FROM token_vault \
                 WHERE domain = $1 AND field = $2 AND token = $3",
            )
            .bind(domain)
            .bind(field)
            .bind(token.as_str())
            .fetch_optional(self.store.pool())
            .await
            .map_err(db_error)?;
            let Some(row) = row else {
                items.push(Err(KmsError::Transform(
                    tokenize::TokenizeError::DecryptFailed,
                )));
                continue;
            };
            let version: i64 = row.try_get("key_version").map_err(db_error)?;
            let version = u32::try_from(version).map_err(|_| KmsError::Internal {
                what: "vault key version out of range",
            })?;
            let sealed: String = row.try_get("sealed_value").map_err(db_error)?;
            let sealed = hex::decode(sealed).map_err(|_| KmsError::Internal {
                what: "stored vault value is not hex",
            })?;
            if !keys.iter().any(|k| k.version() == version) {
                let (_, key) = self.key(access, KeyOp::Reidentify, domain, version).await?;
                keys.push(key);
            }
            let key = keys
                .iter()
                .find(|k| k.version() == version)
                .ok_or(KmsError::Internal {
                    what: "vault key not loaded",
                })?;
            items.push(
                tokenize::vault::open(key, field, &sealed)
                    .map(Item::Value)
                    .map_err(KmsError::from),
            );
        }
        Ok(items)
    }

    async fn seal_version(
        &self,
        key_id: Uuid,
        domain: &str,
        version: u32,
    ) -> Result<String, KmsError> {
        let data_key = self
            .service
            .generate_data_key(
                &Unrestricted,
                &key_id.to_string(),
                &domain_context(domain, Some(version)),
            )
            .await?;
        if data_key.plaintext.len() != 32 {
            return Err(KmsError::Internal {
                what: "data key is not 32 bytes",
            });
        }
        Ok(hex::encode(&data_key.blob))
    }
}

/// Stores a sealed domain key version (in the caller's transaction).
pub(crate) async fn insert_version(
    conn: &mut sqlx::AnyConnection,
    domain: &str,
    version: u32,
    sealed: &str,
    now: i64,
    approval_id: &str,
) -> Result<(), KmsError> {
    sqlx::query(
        "INSERT INTO domain_key_versions (domain, version, sealed_key, created_at, approval_id) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(domain)
    .bind(i64::from(version))
    .bind(sealed)
    .bind(now)
    .bind(approval_id)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The domain's newest stored version (in the caller's transaction); 0 if it has none.
pub(crate) async fn newest_version(
    conn: &mut sqlx::AnyConnection,
    domain: &str,
) -> Result<u32, KmsError> {
    let row = sqlx::query(
        "SELECT COALESCE(MAX(version), 0) AS v FROM domain_key_versions WHERE domain = $1",
    )
    .bind(domain)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    let v: i64 = row.try_get("v").map_err(db_error)?;
    u32::try_from(v).map_err(|_| KmsError::Internal {
        what: "domain version out of range",
    })
}

const SELECT_DOMAINS: &str = "SELECT d.domain, d.key_id, d.created_at, d.created_by, \
     MAX(v.version) AS current_version FROM tokenization_domains d \
     JOIN domain_key_versions v ON v.domain = d.domain";

fn domain_from_row(row: &sqlx::any::AnyRow) -> Result<DomainInfo, KmsError> {
    let key_id: String = row.try_get("key_id").map_err(db_error)?;
    let current: i64 = row.try_get("current_version").map_err(db_error)?;
    Ok(DomainInfo {
        domain: row.try_get("domain").map_err(db_error)?,
        key_id: key_id.parse().map_err(|_| KmsError::Internal {
            what: "stored domain key id is not a UUID",
        })?,
        current_version: u32::try_from(current).map_err(|_| KmsError::Internal {
            what: "domain version out of range",
        })?,
        created_at: row.try_get("created_at").map_err(db_error)?,
        created_by: row.try_get("created_by").map_err(db_error)?,
    })
}

/// The context every domain check and every sealed domain key carries.
fn domain_context(domain: &str, version: Option<u32>) -> Context {
    let mut context = Context::new();
    context.insert("kms:domain".to_string(), domain.to_string());
    if let Some(version) = version {
        context.insert("kms:domain-version".to_string(), version.to_string());
    }
    context
}

/// Domain names: 1 to 64 of `a-z 0-9 . _ -` (they are part of every derived key).
pub fn check_name(domain: &str) -> Result<(), KmsError> {
    let ok = (1..=64).contains(&domain.len())
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(KmsError::InvalidArgument {
            field: "domain",
            reason: "1 to 64 of a-z 0-9 . _ -",
        })
    }
}

/// What a `Tokenize` or `Detokenize` call runs.
#[derive(Debug)]
pub enum ServerTransform {
    /// One of the `tokenize` crate's transforms (the SDK runs the same locally).
    Local(Transform),
    /// `{"kind":"vault"}`: random tokens kept in the server's token vault.
    Vault,
}

impl ServerTransform {
    /// The transform's kind, as in a policy.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerTransform::Local(t) => t.kind(),
            ServerTransform::Vault => "vault",
        }
    }
}

/// A transform as JSON (`{"kind":"pseudonym"}`, as in a policy; `{"kind":"vault"}` too).
pub fn parse_transform(json: &str) -> Result<ServerTransform, KmsError> {
    let invalid = || KmsError::InvalidArgument {
        field: "transform_json",
        reason: "not a transform (see the policy format in the README)",
    };
    let value: serde_json::Value = serde_json::from_str(json).map_err(|_| invalid())?;
    if value == serde_json::json!({"kind": "vault"}) {
        return Ok(ServerTransform::Vault);
    }
    serde_json::from_value(value)
        .map(ServerTransform::Local)
        .map_err(|_| invalid())
}

/// Checks the size of a batch and of each of its values.
pub fn check_batch(values: &[String], field: &'static str) -> Result<(), KmsError> {
    if values.is_empty() || values.len() > MAX_VALUES {
        return Err(KmsError::InvalidArgument {
            field,
            reason: "1 to 10000 per call",
        });
    }
    if values.iter().any(|v| v.len() > MAX_VALUE_BYTES) {
        return Err(KmsError::TooLarge {
            field,
            max: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// Applies `transform` for `field` to every value (with its patient pseudonym, when given).
pub fn tokenize_all(
    key: &DomainKey,
    field: &str,
    transform: &Transform,
    values: &[String],
    patients: &[String],
) -> Result<Vec<Result<Item, KmsError>>, KmsError> {
    if !patients.is_empty() && patients.len() != values.len() {
        return Err(KmsError::InvalidArgument {
            field: "patient_pseudonyms",
            reason: "empty, or one per value",
        });
    }
    let prepared = FieldTransformer::new(key, field, transform)?;
    let mut out = String::new();
    Ok(values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let ctx = TokenContext {
                patient_pseudonym: patients.get(i).map(String::as_str),
            };
            match prepared.apply_into(value, &ctx, &mut out)? {
                Outcome::Written => Ok(Item::Value(out.clone())),
                Outcome::Dropped => Ok(Item::Dropped),
            }
        })
        .collect())
}

/// Reverses every token of a reversible transform.
pub fn detokenize_all(
    key: &DomainKey,
    field: &str,
    transform: &Transform,
    tokens: &[String],
) -> Result<Vec<Result<Item, KmsError>>, KmsError> {
    let prepared = FieldTransformer::new(key, field, transform)?;
    Ok(tokens
        .iter()
        .map(|token| Ok(Item::Value(prepared.reverse(token)?)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names() {
        assert!(check_name("study-2026.a_1").is_ok());
        for bad in ["", "Study", "a b", "ü", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn transforms_parse_from_json() {
        assert!(parse_transform(r#"{"kind":"pseudonym"}"#).is_ok());
        assert!(matches!(
            parse_transform(r#"{"kind":"vault"}"#),
            Ok(ServerTransform::Vault)
        ));
        assert!(parse_transform(r#"{"kind":"vault","x":1}"#).is_err());
        assert!(parse_transform(r#"{"kind":"fpe","alphabet":"digits","max_len":9}"#).is_ok());
        assert!(parse_transform(r#"{"kind":"nope"}"#).is_err());
        assert!(parse_transform(r#"{"kind":"zip3","extra":1}"#).is_err());
    }
}
