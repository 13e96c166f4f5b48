//! BitClone's Raft layer: the cluster state machine (members, tenants, shard
//! layout, dataset pointers, jobs with leases and fencing tokens) as plain
//! data with a pure `apply`, the placement planner, the openraft wiring
//! (RocksDB log store, in-memory state machine with snapshots) and the Raft
//! network over gRPC with mutual TLS. openraft types stay inside this crate.

pub mod cluster;
pub mod context;
mod error;
pub mod job;
mod network;
pub mod placement;
pub mod retention;
pub mod state;
mod store;
pub mod tls;
mod types;

/// The peer protocol's versions (kept in `proto`, beside the fields).
pub use bitclone_proto::peer_protocol as protocol;
pub use cluster::{Cluster, ClusterConfig, Status};
pub use error::Error;

/// Node ids are small integers, stable for a node's lifetime.
pub type NodeId = u64;
