//! Mutual TLS: the server's only transport.
//!
//! - TLS 1.3 only, through `rustls` with the `ring` provider passed explicitly (never the
//!   process default), ALPN `h2`.
//! - A client certificate is required and must chain to the configured private CA
//!   (`WebPkiClientVerifier`: signature, validity period, extended key usage `clientAuth`).
//! - The caller's principal is read from the verified leaf certificate: its URI SAN (e.g.
//!   `spiffe://hospital.test/app/app-1`), else its subject CN. A certificate with neither, or
//!   with more than one of the kind that decides, is refused (the connection is closed).
//! - [`TlsIncoming`] accepts TCP connections (with `TCP_NODELAY`), runs each handshake in its
//!   own task under a timeout, so a slow or silent client cannot stall the accept loop, and
//!   yields [`TlsConnection`]s whose [`PeerIdentity`] tonic puts into every request's
//!   extensions: handlers read it with `request.extensions().get::<PeerIdentity>()`.
//!
//! Certificate and key files are read here and never echoed in errors or logs; only the
//! principal of a connection is logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use zeroize::Zeroizing;

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Longest principal accepted (bytes).
pub const MAX_PRINCIPAL_LEN: usize = 255;

/// Where the server's TLS material is (validated configuration; see `config.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// PEM file of the private CA that client certificates must chain to.
    pub ca_cert: PathBuf,
    /// PEM file of the server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM file of the server's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Why the TLS configuration could not be built, or a certificate names no principal.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind. The file's content is never
    /// quoted (a key file put in the wrong place must not end up in a log).
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong, as a fixed text.
        what: &'static str,
    },
    /// rustls refused the certificates or the key (e.g. the key does not match).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client verifier could not be built from the CA certificate.
    #[error("CA certificate: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Why a verified client certificate names no principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrincipalError {
    /// The certificate is not valid DER X.509.
    #[error("certificate cannot be parsed")]
    Unparsable,
    /// Neither a URI SAN nor a subject common name.
    #[error("certificate has neither a URI SAN nor a subject CN")]
    Missing,
    /// More than one URI SAN, or (without a URI SAN) more than one CN: ambiguous.
    #[error("certificate names more than one principal")]
    Ambiguous,
    /// Empty, too long, or with control characters or spaces.
    #[error("principal is malformed")]
    Malformed,
}

/// Who is at the other end of a connection, as tonic hands it to every request of that
/// connection (`request.extensions().get::<PeerIdentity>()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The principal read from the client certificate: its URI SAN, else its subject CN.
    pub principal: String,
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
}

/// A built server-side TLS configuration (cheap to clone).
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the files of `params` and builds the configuration.
    pub fn load(params: &TlsParams) -> Result<Self, TlsError> {
        let ca = read(&params.ca_cert)?;
        let cert = read(&params.cert)?;
        let key = read(&params.key)?;
        let ca = certificates(&ca, &params.ca_cert)?;
        let chain = certificates(&cert, &params.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|_| TlsError::Pem {
            path: params.key.clone(),
            what: "no PEM private key found",
        })?;
        Self::new(ca, chain, key)
    }

    /// Builds the configuration: TLS 1.3 only, `ring`, client certificates required and
    /// verified against `ca`, ALPN `h2`.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Pem {
            path: path.into(),
            what: "not valid PEM",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "no PEM certificate found",
        });
    }
    Ok(certs)
}

/// The principal a (verified) DER certificate names: its URI SAN, else its subject CN.
pub fn principal_of(cert_der: &[u8]) -> Result<String, PrincipalError> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|_| PrincipalError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PrincipalError::Unparsable)?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let principal = match uris.as_slice() {
        [uri] => (*uri).to_string(),
        [] => {
            let mut cns = cert.subject().iter_common_name();
            let cn = cns.next().ok_or(PrincipalError::Missing)?;
            if cns.next().is_some() {
                return Err(PrincipalError::Ambiguous);
            }
            let cn = cn.as_str().map_err(|_| PrincipalError::Malformed)?;
            // A CN is a plain name: one that looks like a URI could pose as the URI SAN
            // principal of another identity (a CA that lets requesters choose the CN would
            // then issue officers).
            if cn.contains(':') || cn.contains('/') {
                return Err(PrincipalError::Malformed);
            }
            cn.to_string()
        }
        _ => return Err(PrincipalError::Ambiguous),
    };
    if principal.is_empty()
        || principal.len() > MAX_PRINCIPAL_LEN
        || principal
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || crate::authz::deceptive(c))
    {
        return Err(PrincipalError::Malformed);
    }
    Ok(principal)
}

/// An authenticated client connection: a TLS stream plus who is at the other end.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    identity: PeerIdentity,
}

impl TlsConnection {
    /// Who is at the other end.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }
}

impl std::fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnection")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.identity.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The stream of authenticated connections for tonic's `serve_with_incoming_shutdown`.
/// Failed handshakes are dropped (logged at `debug`), never yielded as errors: an error item
/// would stop tonic's accept loop. Dropping the stream stops accepting and closes the listener.
pub struct TlsIncoming {
    connections: mpsc::Receiver<TlsConnection>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TlsIncoming {
    /// Accepts on `listener`, handshaking with `tls` (timeout [`HANDSHAKE_TIMEOUT`]).
    pub fn new(listener: TcpListener, tls: ServerTls) -> Self {
        Self::with_timeout(listener, tls, HANDSHAKE_TIMEOUT)
    }

    /// As [`TlsIncoming::new`], with another handshake timeout.
    pub fn with_timeout(listener: TcpListener, tls: ServerTls, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let accept_loop = tokio::spawn(accept_loop(listener, tls, tx, timeout));
        TlsIncoming {
            connections: rx,
            accept_loop,
        }
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl futures::Stream for TlsIncoming {
    type Item = Result<TlsConnection, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections.poll_recv(cx).map(|c| c.map(Ok))
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<TlsConnection>,
    timeout: Duration,
) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (tcp, remote) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Per-connection failures (reset before accept) and resource limits
                    // (EMFILE): log, pause briefly so a persistent error cannot spin, go on.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Without TCP_NODELAY small responses can wait ~40 ms for a delayed acknowledgement
        // (measured with `kms-bench`).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = tls.acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match handshake(&acceptor, tcp, remote, timeout).await {
                Ok(connection) => {
                    tracing::debug!(%remote, principal = %connection.identity.principal, "mTLS connection");
                    // The receiver is gone only when the server stops: drop the connection.
                    let _ = tx.send(connection).await;
                }
                Err(reason) => tracing::info!(%remote, %reason, "TLS connection refused"),
            }
        });
    }
}

/// Why a connection was refused (for the debug log; never certificate contents).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("handshake timed out")]
    Timeout,
    #[error("handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("no client certificate")]
    NoCertificate,
    #[error(transparent)]
    Principal(PrincipalError),
}

async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
) -> Result<TlsConnection, Refused> {
    let stream = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| Refused::Timeout)?
        .map_err(Refused::Handshake)?;
    let (_, session) = stream.get_ref();
    // The verifier made a client certificate mandatory; this is defence in depth.
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Refused::NoCertificate)?;
    let principal = principal_of(leaf.as_ref()).map_err(Refused::Principal)?;
    Ok(TlsConnection {
        stream,
        identity: PeerIdentity {
            principal,
            remote_addr: Some(remote),
        },
    })
}
