//! BitClone's Raft layer (openraft): the cluster state machine (members,
//! tenants, shard layout, dataset pointers, job leases with fencing tokens),
//! its RocksDB log store and the Raft network over gRPC.
//!
//! Not built yet: the single-node engine keeps dataset pointers and jobs in
//! its local store (`bitclone-storage`, `bitclone` node). The cluster issue
//! moves them here behind a pure `apply(command, state)`.

/// Errors of the Raft layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster layer is not part of this build yet.
    #[error("the Raft cluster layer is not built yet")]
    NotBuilt,
}
