//! openraft type configuration. openraft types stay inside this crate.

use std::io::Cursor;

use crate::state::{NodeInfo, Request, Response};

openraft::declare_raft_types!(
    /// BitClone's Raft types: requests and responses of the cluster state machine.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<u64>;
