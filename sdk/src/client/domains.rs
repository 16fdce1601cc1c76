//! Tokenization domains: officers create and rotate them; tokenizers tokenize remotely
//! ([`KmsClient::tokenize`]) or fetch the domain key and tokenize locally
//! ([`DomainKeys`], with the `tokenize` crate's transforms, the same code the server runs);
//! re-identifiers detokenize, each call a recorded disclosure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tokenize::DomainKey;
use zeroize::Zeroizing;

use super::KmsClient;
use crate::error::Error;

/// What a `Detokenize` call discloses, and why.
#[derive(Debug, Clone)]
pub struct Disclosure {
    /// The domain.
    pub domain: String,
    /// The field the tokens came from (as tokenized).
    pub field: String,
    /// The transform as JSON, as tokenized.
    pub transform_json: String,
    /// The purpose of use (recorded in clear: never PHI).
    pub purpose: String,
    /// The pseudonym of the patient concerned.
    pub patient_token: String,
    /// Domain key version; 0: from the token, else the current one.
    pub key_version: u32,
}

impl KmsClient {
    /// Creates a tokenization domain whose keys are sealed under `key` (officers).
    pub async fn create_domain(&self, domain: &str, key: &str) -> Result<pb::Domain, Error> {
        let request = pb::CreateDomainRequest {
            domain: domain.to_string(),
            key: key.to_string(),
        };
        Ok(self.rpc().create_domain(request).await?.into_inner())
    }

    /// Every domain.
    pub async fn list_domains(&self) -> Result<Vec<pb::Domain>, Error> {
        Ok(self
            .rpc()
            .list_domains(pb::ListDomainsRequest {})
            .await?
            .into_inner()
            .domains)
    }

    /// Proposes the domain's next key version; it takes effect when approved.
    pub async fn propose_domain_rotation(&self, domain: &str) -> Result<pb::Approval, Error> {
        let request = pb::ProposeDomainRotationRequest {
            domain: domain.to_string(),
        };
        Ok(self
            .rpc()
            .propose_domain_rotation(request)
            .await?
            .into_inner())
    }

    /// The domain key `version` (0: current), for local tokenization (grant operation
    /// `domain-key`). Prefer [`DomainKeys`], which caches it.
    pub async fn domain_key(&self, domain: &str, version: u32) -> Result<DomainKey, Error> {
        let request = pb::GetDomainKeyRequest {
            domain: domain.to_string(),
            version,
        };
        let response = self.rpc().get_domain_key(request).await?.into_inner();
        let key = Zeroizing::new(response.key);
        let bytes: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| Error::Protocol("domain key is not 32 bytes"))?;
        Ok(DomainKey::new(
            response.domain,
            response.version,
            Zeroizing::new(bytes),
        ))
    }

    /// Applies one transform (JSON, as in a policy) to `values` on the server (grant operation
    /// `tokenize`). `patients`: empty, or the patient pseudonym of each value (date shifts).
    pub async fn tokenize(
        &self,
        domain: &str,
        field: &str,
        transform_json: &str,
        values: Vec<String>,
        patients: Vec<String>,
    ) -> Result<pb::TokenizeResponse, Error> {
        let request = pb::TokenizeRequest {
            domain: domain.to_string(),
            field: field.to_string(),
            transform_json: transform_json.to_string(),
            values,
            patient_pseudonyms: patients,
        };
        Ok(self.rpc().tokenize(request).await?.into_inner())
    }

    /// Reverses deterministic or FF1 tokens (re-identifiers; a recorded disclosure).
    pub async fn detokenize(
        &self,
        disclosure: &Disclosure,
        tokens: Vec<String>,
    ) -> Result<Vec<pb::TokenResult>, Error> {
        let request = pb::DetokenizeRequest {
            domain: disclosure.domain.clone(),
            field: disclosure.field.clone(),
            transform_json: disclosure.transform_json.clone(),
            tokens,
            purpose: disclosure.purpose.clone(),
            patient_token: disclosure.patient_token.clone(),
            key_version: disclosure.key_version,
        };
        Ok(self.rpc().detokenize(request).await?.into_inner().results)
    }
}

/// Domain keys fetched once and kept for `ttl` (wiped when dropped or expired), for local
/// tokenization at full speed. A key revoked or rotated on the server is noticed when the
/// cached copy expires.
pub struct DomainKeys {
    client: KmsClient,
    ttl: Duration,
    keys: Mutex<HashMap<(String, u32), Cached>>,
}

/// When a key was fetched, and the key.
type Cached = (Instant, Arc<DomainKey>);

impl DomainKeys {
    /// A cache over `client`; keys live at most `ttl`.
    pub fn new(client: KmsClient, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// The domain's key `version` (0: current), from the cache or the server.
    pub async fn get(&self, domain: &str, version: u32) -> Result<Arc<DomainKey>, Error> {
        let slot = (domain.to_string(), version);
        {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.retain(|_, (fetched, _)| fetched.elapsed() < self.ttl);
            if let Some((_, key)) = keys.get(&slot) {
                return Ok(Arc::clone(key));
            }
        }
        let key = Arc::new(self.client.domain_key(domain, version).await?);
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot, (Instant::now(), Arc::clone(&key)));
        Ok(key)
    }

    /// Forgets every cached key.
    pub fn clear(&self) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
