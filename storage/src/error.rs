use std::path::PathBuf;

use crate::chunk::ChunkId;

/// Everything that can go wrong in the storage layer.
///
/// Variants that describe a bad request (`InvalidPath`, `InvalidArgument`,
/// `NotFound`, `Conflict`) leave the store unchanged; `Poisoned` means a write
/// may not have reached disk and the store refuses further writes until the
/// process restarts and RocksDB recovers from its WAL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stored chunk does not hash to its name (or RocksDB found it damaged).
    #[error("chunk {chunk} is corrupt: {detail}")]
    CorruptChunk {
        /// The chunk that failed verification.
        chunk: ChunkId,
        /// What the check found.
        detail: String,
    },
    /// A chunk a manifest refers to is not in the store.
    #[error("chunk {0} is missing from the store")]
    MissingChunk(ChunkId),
    /// A named object (dataset, snapshot, job…) does not exist.
    #[error("{kind} {name} not found")]
    NotFound {
        /// What kind of object was looked up.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A path in a manifest or a request is not a safe relative path.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The offending path, as given.
        path: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A request argument is malformed (names, chunking parameters, URLs…).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A persisted structure could not be decoded.
    #[error("corrupt or unsupported {what}: {detail}")]
    Decode {
        /// Which structure.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// A compare-and-set lost (e.g. the dataset moved on since the parent).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Something the operation depends on (the cluster's leader, a peer)
    /// cannot be reached right now; retrying later may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// A tenant's quota would be exceeded; nothing was committed.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The node's disk is below its free-space reserve; nothing was written.
    /// Space may come back: retrying later can succeed.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The operation was cancelled by its caller.
    #[error("cancelled")]
    Cancelled,
    /// Reading or writing a local file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// The object store (sink) reported an error.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// A sink refused or failed an operation; `permanent` when retrying
    /// cannot help (a missing bucket, bad credentials).
    #[error("sink {sink}: {detail}")]
    Sink {
        /// The sink's URL (without credentials or query).
        sink: String,
        /// What failed, with the server's words.
        detail: String,
        /// Whether a retry could succeed.
        permanent: bool,
    },
    /// A writer holding a lower fencing token than one the sink already
    /// committed was refused: its lease was superseded.
    #[error("fenced: {0}")]
    Fenced(String),
    /// An earlier write failed; the store refuses writes from now on.
    #[error("store is poisoned by an earlier failed write: {0}")]
    Poisoned(String),
    /// A task on the worker pool panicked (a bug; the pool keeps running).
    #[error("internal error: a storage worker task panicked")]
    Panicked,
    /// A worker thread went away (the process is shutting down).
    #[error("worker pool is shut down")]
    PoolClosed,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn not_found(kind: &'static str, name: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            name: name.into(),
        }
    }

    pub(crate) fn decode(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Decode {
            what,
            detail: detail.into(),
        }
    }
}

/// Result alias of the storage crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `e` and its causes: client libraries (tokio-postgres, object_store) keep
/// the reason (a refused certificate, a refused connection) in the source
/// chain, not in the message.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
