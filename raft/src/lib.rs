//! BitClone's Raft layer: the cluster state machine (members, tenants, shard
//! layout, dataset pointers, jobs with leases and fencing tokens) as plain
//! data with a pure `apply`, the placement planner, the openraft wiring
//! (RocksDB log store, in-memory state machine with snapshots) and the Raft
//! network over gRPC with mutual TLS. openraft types stay inside this crate.

pub mod cluster;
pub mod job;
mod network;
pub mod placement;
pub mod state;
mod store;
pub mod tls;
mod types;

pub use cluster::{Cluster, ClusterConfig, ClusterError, Status};

/// Node ids are small integers, stable for a node's lifetime.
pub type NodeId = u64;

/// Errors of the Raft layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command was refused by the state machine.
    #[error(transparent)]
    Command(#[from] state::CommandError),
    /// The cluster could not carry out a request.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}
