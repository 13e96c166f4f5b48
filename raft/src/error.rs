//! The one error type of the Raft layer. It travels between nodes as it is
//! (a write forwarded to the leader comes back with its kind, not a string),
//! so callers retry only what can succeed later and tell a node that must
//! stop apart from a request that failed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::state::CommandError;
use crate::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// No leader is known right now (an election, or a partition); retry.
    #[error("no leader is known right now; retry")]
    NoLeader,
    /// The node asked is not the leader (any more); retry through the leader.
    #[error("not the leader (leader: {leader:?}); retry")]
    NotLeader { leader: Option<NodeId> },
    /// The leader could not reach a quorum to confirm it still leads.
    #[error("no quorum: {0}; retry")]
    NoQuorum(String),
    /// A peer could not be reached or did not answer in time.
    #[error("peer {peer} at {addr} is unreachable: {detail}")]
    Unreachable {
        peer: NodeId,
        addr: String,
        detail: String,
    },
    /// Waiting (to catch up for a read, say) took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The state machine refused the command; retrying changes nothing.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The cluster refused the request (membership, join, a peer's rights).
    #[error("refused: {0}")]
    Refused(String),
    /// A peer answered something this node cannot read.
    #[error("peer {peer} sent a reply this node cannot read: {detail}")]
    Protocol { peer: NodeId, detail: String },
    /// A certificate or key file could not be read or written.
    #[error("TLS file {}: {detail}", path.display())]
    TlsFile { path: PathBuf, detail: String },
    /// A certificate or key is malformed, inconsistent or could not be made.
    #[error("TLS certificate error: {0}")]
    Cert(String),
    /// A peer's certificate does not name the node it claims to be.
    #[error("peer certificate is not valid for {expected}: {detail}")]
    Identity { expected: String, detail: String },
    /// Bad settings for Raft.
    #[error("raft config: {0}")]
    Config(String),
    /// This node's Raft storage failed or Raft stopped: the node takes no
    /// more writes until it is restarted.
    #[error("this node's Raft has stopped: {0}")]
    Fatal(String),
}

impl Error {
    /// Whether the same request can succeed later (a leader change, a peer
    /// back): never for refusals.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NoLeader
                | Error::NotLeader { .. }
                | Error::NoQuorum(_)
                | Error::Unreachable { .. }
                | Error::Timeout(_)
        )
    }
}

impl<E> From<openraft::error::RaftError<NodeId, E>> for Error
where
    E: Into<Error>,
{
    fn from(e: openraft::error::RaftError<NodeId, E>) -> Self {
        match e {
            openraft::error::RaftError::APIError(e) => e.into(),
            openraft::error::RaftError::Fatal(f) => Error::Fatal(f.to_string()),
        }
    }
}

impl From<openraft::error::Fatal<NodeId>> for Error {
    fn from(f: openraft::error::Fatal<NodeId>) -> Self {
        Error::Fatal(f.to_string())
    }
}

impl From<openraft::error::ClientWriteError<NodeId, crate::state::NodeInfo>> for Error {
    fn from(e: openraft::error::ClientWriteError<NodeId, crate::state::NodeInfo>) -> Self {
        use openraft::error::ClientWriteError as W;
        match e {
            W::ForwardToLeader(f) => Error::NotLeader {
                leader: f.leader_id,
            },
            // Another membership change (a second pod joining at once)
            // is still committing: this one can go through once it has.
            // An existing retryable kind, so older nodes read it too.
            W::ChangeMembershipError(openraft::error::ChangeMembershipError::InProgress(p)) => {
                Error::Timeout(format!(
                    "another membership change is still in progress ({p}); retry"
                ))
            }
            W::ChangeMembershipError(c) => Error::Refused(c.to_string()),
        }
    }
}

impl From<openraft::error::CheckIsLeaderError<NodeId, crate::state::NodeInfo>> for Error {
    fn from(e: openraft::error::CheckIsLeaderError<NodeId, crate::state::NodeInfo>) -> Self {
        use openraft::error::CheckIsLeaderError as C;
        match e {
            C::ForwardToLeader(f) => Error::NotLeader {
                leader: f.leader_id,
            },
            C::QuorumNotEnough(q) => Error::NoQuorum(q.to_string()),
        }
    }
}

impl From<openraft::error::InitializeError<NodeId, crate::state::NodeInfo>> for Error {
    fn from(e: openraft::error::InitializeError<NodeId, crate::state::NodeInfo>) -> Self {
        Error::Refused(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_kind_on_the_wire() {
        let all = [
            Error::NoLeader,
            Error::NotLeader { leader: Some(1) },
            Error::Command(CommandError::Conflict("moved".into())),
            Error::Refused("not a member".into()),
            Error::Fatal("disk".into()),
        ];
        for e in all {
            let wire = serde_json::to_vec(&Err::<(), _>(e.clone())).unwrap();
            let back: Result<(), Error> = serde_json::from_slice(&wire).unwrap();
            assert_eq!(back, Err(e));
        }
    }

    #[test]
    fn only_transient_kinds_are_retried() {
        assert!(Error::NoLeader.is_retryable());
        assert!(Error::NotLeader { leader: None }.is_retryable());
        assert!(!Error::Command(CommandError::Invalid("x".into())).is_retryable());
        assert!(!Error::Refused("x".into()).is_retryable());
        assert!(!Error::Fatal("x".into()).is_retryable());
    }

    #[test]
    fn a_membership_change_racing_another_is_retried_and_a_missing_learner_is_not() {
        use openraft::error::{ChangeMembershipError as C, ClientWriteError as W};
        let busy: Error = W::ChangeMembershipError(C::InProgress(openraft::error::InProgress {
            committed: None,
            membership_log_id: None,
        }))
        .into();
        assert!(busy.is_retryable(), "{busy}");
        assert!(busy.to_string().contains("in progress"), "{busy}");
        let missing: Error =
            W::ChangeMembershipError(C::LearnerNotFound(openraft::error::LearnerNotFound {
                node_id: 4,
            }))
            .into();
        assert!(!missing.is_retryable(), "{missing}");
    }
}
