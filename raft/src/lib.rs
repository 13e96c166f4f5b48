//! BitClone's Raft layer: the cluster state machine (members, tenants, shard
//! layout, dataset pointers, jobs with leases and fencing tokens) as plain
//! data with a pure `apply`, the placement planner, and (next) the openraft
//! wiring: RocksDB log store and the Raft network over gRPC with mTLS.

pub mod job;
pub mod placement;
pub mod state;

/// Node ids are small integers, stable for a node's lifetime.
pub type NodeId = u64;

/// Errors of the Raft layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command was refused by the state machine.
    #[error(transparent)]
    Command(#[from] state::CommandError),
}
