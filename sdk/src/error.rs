//! The SDK's one error type.

/// Everything the SDK can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint could not be parsed or reached.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The TLS material is unusable (no certificate or key in a file, a key of an unsupported
    /// kind, a key that does not match its certificate). Never quotes the files.
    #[error("TLS: {what}")]
    Tls {
        /// What is wrong.
        what: &'static str,
    },
    /// A file (e.g. a certificate or key) could not be read.
    #[error("cannot read {}: {source}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server answered with an error status.
    #[error("{code:?}: {message}")]
    Rpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message (never carries secrets).
        message: String,
    },
    /// The server's answer broke the protocol (e.g. a data key of the wrong length).
    #[error("unexpected response: {0}")]
    Protocol(&'static str),
    /// An argument is out of range (e.g. a frame size).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// An encrypted message is malformed, truncated, reordered, tampered with, bound to another
    /// context, or was made under another key. One variant for all of these.
    #[error("invalid ciphertext")]
    InvalidCiphertext,
    /// The caller cancelled a file operation (its progress callback said stop); nothing was
    /// written.
    #[error("cancelled")]
    Cancelled,
    /// Reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

impl Error {
    /// The gRPC code, when the server answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}
