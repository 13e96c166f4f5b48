//! The SDK's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in a call of the SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// [`Client::connect`](crate::Client::connect) was given an empty list.
    #[error("no endpoint given")]
    NoEndpoints,

    /// An endpoint is not a valid URI.
    #[error("invalid endpoint {endpoint:?}: {source}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why tonic refused it.
        #[source]
        source: tonic::transport::Error,
    },

    /// A token would travel in plain text: the endpoint is `http://` and
    /// plain text was not allowed, or is not a loopback address.
    #[error(
        "refusing to send a token in plain text to {endpoint}: use https://, or allow plain text \
         (only to a loopback address)"
    )]
    InsecureToken {
        /// The endpoint as given.
        endpoint: String,
    },

    /// The CA certificate or the token given to
    /// [`Client::connect_with`](crate::Client::connect_with) is unusable.
    #[error("{0}")]
    Config(String),

    /// No endpoint could be reached: each one was tried once.
    #[error("no BitClone node reachable (tried {endpoints:?}): {message}")]
    Unavailable {
        /// The endpoints tried, in order.
        endpoints: Vec<String>,
        /// What went wrong with the last one (or with each one, at connect).
        message: String,
    },

    /// The node answered with an error status (`NotFound`, `InvalidArgument`, ...).
    #[error("node returned {:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),

    /// A local file or directory could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying IO error.
        #[source]
        source: std::io::Error,
    },

    /// A path is not acceptable: a local name that is not UTF-8, or a path
    /// from the server that is absolute, empty, has `.`/`..`/empty
    /// components or a NUL byte.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The offending path (lossily converted for display).
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A download would have written through a symbolic link inside the
    /// target directory.
    #[error("refusing to write through symbolic link {}", .path.display())]
    Symlink {
        /// The symbolic link found on the way.
        path: PathBuf,
    },

    /// A downloaded file does not match the BLAKE3 the server announced.
    /// The partial file is removed.
    #[error("integrity check failed for {path}: expected BLAKE3 {expected:?}, got {actual}")]
    Integrity {
        /// The file's path inside the snapshot.
        path: String,
        /// The hash sent by the server (hex).
        expected: String,
        /// The hash of the bytes received (hex).
        actual: String,
    },

    /// The server broke the protocol (e.g. data outside a file, a stream
    /// that ends in the middle of a file).
    #[error("protocol error: {message}")]
    Protocol {
        /// What was unexpected.
        message: String,
    },

    /// A bug or a panic inside the SDK (e.g. a background task died).
    #[error("internal error: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
}

impl Error {
    /// The gRPC status code when the node answered with an error status.
    pub fn status_code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(status) => Some(status.code()),
            _ => None,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid_path(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidPath {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::Protocol {
            message: message.into(),
        }
    }
}

/// Result of the SDK's calls.
pub type Result<T> = std::result::Result<T, Error>;
