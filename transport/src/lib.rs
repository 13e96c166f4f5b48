//! BitClone's node-to-node data plane: QUIC (quinn) endpoints with mutual
//! TLS, the chunk transfer protocol (which chunks do you lack, store these,
//! send me these) and a peer connection pool.
//!
//! Not built yet: a single node needs no transfer. The replication issue
//! fills this crate in.

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport layer is not part of this build yet.
    #[error("the QUIC transport is not built yet")]
    NotBuilt,
}
