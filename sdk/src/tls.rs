//! The client side of mutual TLS: the CA that the server's certificate must chain to, and
//! the client's own certificate and private key, which name the caller's principal.
//!
//! Connections are TLS 1.3 only, through `rustls` with the `ring` provider passed explicitly,
//! ALPN `h2`, `TCP_NODELAY`. The server name checked against the server certificate is the
//! endpoint's host (an IP address or a DNS name).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use crate::error::Error;

/// The TLS identity of a client: trusted CA, client certificate chain and private key.
/// The key is wiped on drop and never printed.
pub struct ClientTls {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Zeroizing<PrivateKeyDer<'static>>,
}

/// Another name for [`ClientTls`]: who a client is, and whom it trusts.
pub type ClientIdentity = ClientTls;

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_certificates", &self.ca.len())
            .field("chain_certificates", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Clone for ClientTls {
    fn clone(&self) -> Self {
        ClientTls {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: Zeroizing::new(self.key.clone_key()),
        }
    }
}

fn tls_error(what: &'static str) -> Error {
    Error::Tls { what }
}

impl ClientTls {
    /// From PEM bytes: the CA certificate(s), the client certificate chain (leaf first) and
    /// the client private key (PKCS#8, SEC1 or PKCS#1). Checks that they make a usable
    /// configuration (e.g. that the key is of a supported kind).
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        let certs = |pem: &[u8], what| -> Result<Vec<CertificateDer<'static>>, Error> {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| tls_error(what))?;
            if certs.is_empty() {
                return Err(tls_error(what));
            }
            Ok(certs)
        };
        let tls = ClientTls {
            ca: certs(ca_pem, "no valid PEM certificate in the CA file")?,
            chain: certs(
                cert_pem,
                "no valid PEM certificate in the client certificate file",
            )?,
            key: Zeroizing::new(
                PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|_| tls_error("no valid PEM private key in the client key file"))?,
            ),
        };
        tls.config()?;
        Ok(tls)
    }

    /// From three PEM files: CA, client certificate, client key.
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map(Zeroizing::new)
                .map_err(|source| Error::File {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let ca = read(ca.as_ref())?;
        let cert = read(cert.as_ref())?;
        let key = read(key.as_ref())?;
        Self::from_pem(&ca, &cert, &key)
    }

    /// The rustls configuration: TLS 1.3 only, `ring`, this CA only, this client certificate,
    /// ALPN `h2`.
    fn config(&self) -> Result<Arc<ClientConfig>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|_| tls_error("the CA certificate is not usable as a trust anchor"))?;
        }
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|_| tls_error("TLS 1.3 is not available"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|_| tls_error("the client certificate and key do not make an identity"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A tonic channel to `endpoint` (`https://` only) over mutual TLS with this identity,
    /// for gRPC services other than the KMS's own (health, reflection). Connects at once.
    pub async fn channel(&self, endpoint: &str) -> Result<Channel, Error> {
        let connect_error = |reason: String| Error::Connect {
            endpoint: endpoint.to_string(),
            reason,
        };
        if !endpoint.starts_with("https://") {
            return Err(connect_error(
                "only https:// endpoints are supported (the server speaks only mutual TLS)".into(),
            ));
        }
        let connector = Connector {
            tls: tokio_rustls::TlsConnector::from(self.config()?),
        };
        Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| connect_error(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(connector)
            .await
            .map_err(|e| connect_error(error_chain(&e)))
    }
}

/// How long a connection (TCP and TLS handshake) may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `error` and its sources, so a TLS failure under a transport error is visible.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Opens TCP connections and runs the TLS handshake; tonic's channel calls it for every
/// (re)connection.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: tokio_rustls::TlsConnector,
}

type Connection = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Connection;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Connection>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
            let host = uri
                .host()
                .ok_or_else(|| invalid("endpoint without a host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let server_name = ServerName::try_from(host.clone())
                .map_err(|_| invalid("endpoint host is not a valid server name"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
