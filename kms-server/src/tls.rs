//! TEMPORARY shim until the tls branch is merged.
use std::net::SocketAddr;
/// Peer.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// Principal.
    pub principal: String,
    /// Addr.
    pub remote_addr: Option<SocketAddr>,
}
