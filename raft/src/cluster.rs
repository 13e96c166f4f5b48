//! The cluster handle the node uses: start Raft, bootstrap or join, write
//! commands (forwarded to the leader), linearizable reads, status; and the
//! peer gRPC service (mutual TLS) that carries Raft RPCs between nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bitclone_proto::internal::v1::peer_server::{Peer, PeerServer};
use bitclone_proto::internal::v1::PeerMessage;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status as GrpcStatus};

use crate::network::{PeerError, PeerRpc, Peers, MAX_PEER_MESSAGE};
use crate::state::{ClusterState, Command, NodeInfo, Request, Response};
use crate::store::{open_db, Applied, LogStore, StateMachine};
use crate::tls::{check_peer, PeerTls};
use crate::types::Raft;
use crate::NodeId;

/// The tenant clients use when they name none.
pub const DEFAULT_TENANT: &str = "default";

/// How a node takes part in the cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    pub id: NodeId,
    /// Directory of the Raft RocksDB (log, vote, snapshots).
    pub dir: PathBuf,
    pub info: NodeInfo,
    pub tls: PeerTls,
    pub heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
    pub rpc_timeout: Duration,
    /// Build a state-machine snapshot (and purge the log) every this many entries.
    pub snapshot_logs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("raft storage: {0}")]
    Storage(String),
    #[error("no leader is known right now; retry")]
    NoLeader,
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("refused: {0}")]
    Refused(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JoinRequest {
    id: NodeId,
    info: NodeInfo,
}

/// A snapshot of what this node knows about the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: NodeId,
    pub state: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// Last log index covered by this node's snapshot, and purged up to.
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    pub members: BTreeMap<NodeId, NodeInfo>,
    pub layout_version: u64,
    pub layout: BTreeMap<String, Vec<Vec<NodeId>>>,
    pub previous_layout_version: Option<u64>,
    pub ready: BTreeSet<NodeId>,
}

pub struct Cluster {
    pub id: NodeId,
    raft: Raft,
    applied: Arc<RwLock<Applied>>,
    peers: Peers,
    info: NodeInfo,
    tls: PeerTls,
    client: u64,
    seq: AtomicU64,
    rpc_timeout: Duration,
}

impl Cluster {
    pub async fn start(cfg: ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        let db = open_db(&cfg.dir).map_err(|e| ClusterError::Storage(e.to_string()))?;
        let log = LogStore::new(db.clone());
        let sm = StateMachine::open(db).map_err(|e| ClusterError::Storage(e.to_string()))?;
        let applied = sm.shared();
        let config = Config {
            cluster_name: "bitclone".into(),
            heartbeat_interval: cfg.heartbeat.as_millis() as u64,
            election_timeout_min: cfg.election_timeout.0.as_millis() as u64,
            election_timeout_max: cfg.election_timeout.1.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs.max(1)),
            max_in_snapshot_log_to_keep: cfg.snapshot_logs.max(1) / 5,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let peers = Peers::new(cfg.id, cfg.tls.clone());
        let raft = Raft::new(cfg.id, Arc::new(config), peers.clone(), log, sm)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        Ok(Arc::new(Cluster {
            id: cfg.id,
            raft,
            applied,
            peers,
            info: cfg.info,
            tls: cfg.tls,
            client: rand::random::<u64>() | 1,
            seq: AtomicU64::new(0),
            rpc_timeout: cfg.rpc_timeout,
        }))
    }

    /// The mutual-TLS gRPC service for the peer port.
    pub fn peer_service(self: &Arc<Self>) -> PeerServer<PeerService> {
        PeerServer::new(PeerService {
            cluster: self.clone(),
        })
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE)
    }

    /// The node's certificates, as loaded and checked at start.
    pub fn tls(&self) -> &PeerTls {
        &self.tls
    }

    fn applied(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads this node's copy of the state (may lag the leader).
    pub fn local<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.applied().state)
    }

    /// This node's own addresses.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id)
    }

    /// Waits (bounded) until a leader is known.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<NodeId, ClusterError> {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = rx.borrow_and_update().current_leader {
                return Ok(l);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(ClusterError::NoLeader);
            }
        }
    }

    /// Starts a new cluster with this node as its only voter (no-op if this
    /// node's Raft state is already initialized), and records its addresses.
    pub async fn bootstrap(&self) -> Result<(), ClusterError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        if !initialized {
            let members: BTreeMap<NodeId, NodeInfo> = [(self.id, self.info.clone())].into();
            self.raft
                .initialize(members)
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?;
        }
        self.wait_leader(Duration::from_secs(30)).await?;
        self.register_self().await?;
        // The default tenant exists from the start, so the layout is visible.
        let has_default = self.local(|s| s.tenants.contains_key(DEFAULT_TENANT));
        if !has_default {
            let shards = self.local(|s| s.settings.default_shards);
            self.write(Command::SetTenant {
                tenant: DEFAULT_TENANT.into(),
                shards,
            })
            .await?;
        }
        Ok(())
    }

    async fn register_self(&self) -> Result<(), ClusterError> {
        let known = self.local(|s| s.members.get(&self.id) == Some(&self.info));
        if !known {
            self.write(Command::UpsertMember {
                id: self.id,
                info: self.info.clone(),
            })
            .await?;
        }
        Ok(())
    }

    /// Joins the cluster through `leader` (id and peer address, found by the
    /// caller through any member's public API).
    pub async fn join(&self, leader: NodeId, leader_peer_addr: &str) -> Result<(), ClusterError> {
        let req = JoinRequest {
            id: self.id,
            info: self.info.clone(),
        };
        let r: Result<(), String> = self
            .peers
            .call(
                leader,
                leader_peer_addr,
                PeerRpc::Join,
                &req,
                Duration::from_secs(60),
            )
            .await?;
        r.map_err(ClusterError::Refused)
    }

    /// On the leader: learner first, then voter, then its addresses.
    async fn admit(&self, id: NodeId, info: NodeInfo) -> Result<(), ClusterError> {
        if !self.is_leader() {
            return Err(ClusterError::Refused(format!(
                "node {} is not the leader (leader: {:?})",
                self.id,
                self.leader()
            )));
        }
        self.raft
            .add_learner(id, info.clone(), true)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        self.write(Command::UpsertMember { id, info }).await?;
        tracing::info!(node = id, "node joined the cluster");
        Ok(())
    }

    /// Removes a node: out of the voters, then out of the layout.
    pub async fn remove(&self, id: NodeId) -> Result<(), ClusterError> {
        let leader = self.wait_leader(Duration::from_secs(10)).await?;
        if leader != self.id {
            return Err(ClusterError::Refused(format!(
                "remove through the leader (node {leader})"
            )));
        }
        self.raft
            .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        self.write(Command::RemoveMember { id }).await?;
        Ok(())
    }

    /// Proposes a command and returns the state machine's answer. On a
    /// follower the request goes to the leader, which stamps the time.
    pub async fn write(&self, cmd: Command) -> Result<Response, ClusterError> {
        let req = Request {
            client: self.client,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            now_ms: 0,
            cmd,
        };
        retrying(|_| true, || self.write_once(&req)).await
    }

    /// One attempt of [`Cluster::write`]: propose here if this node leads,
    /// else forward to the leader.
    async fn write_once(&self, req: &Request) -> Result<Response, ClusterError> {
        let leader = self
            .wait_leader(Duration::from_secs(5))
            .await
            .map_err(|_| ClusterError::NoLeader)?;
        if leader == self.id {
            return self.propose(req.clone()).await;
        }
        let addr = self.peer_addr(leader).ok_or(ClusterError::NoLeader)?;
        let r: Result<Result<Response, String>, PeerError> = self
            .peers
            .call(leader, &addr, PeerRpc::Forward, req, self.rpc_timeout)
            .await;
        r?.map_err(ClusterError::Raft)
    }

    fn peer_addr(&self, id: NodeId) -> Option<String> {
        let a = self.applied();
        a.membership
            .membership()
            .get_node(&id)
            .map(|n| n.peer_addr.clone())
            .or_else(|| a.state.members.get(&id).map(|n| n.peer_addr.clone()))
    }

    /// On the leader: stamp the time and append through Raft.
    async fn propose(&self, mut req: Request) -> Result<Response, ClusterError> {
        req.now_ms = now_ms();
        match self.raft.client_write(req).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                ClusterError::Refused(format!("not the leader; leader is {:?}", f.leader_id)),
            ),
            Err(e) => Err(ClusterError::Raft(e.to_string())),
        }
    }

    /// Runs `f` on state that includes every write acknowledged before the
    /// call (a linearizable read through the leader's read index).
    pub async fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> Result<T, ClusterError> {
        // Across a leader change: retry until a leader answers (bounded).
        retrying(
            |e| matches!(e, ClusterError::Peer(_) | ClusterError::NoLeader),
            || self.read_barrier(),
        )
        .await?;
        Ok(self.local(f))
    }

    /// Waits until this node has applied every write acknowledged before the
    /// call.
    async fn read_barrier(&self) -> Result<(), ClusterError> {
        let leader = self.wait_leader(Duration::from_secs(5)).await?;
        let index = if leader == self.id {
            self.read_index().await?
        } else {
            let addr = self.peer_addr(leader).ok_or(ClusterError::NoLeader)?;
            let r: Result<Option<u64>, String> = self
                .peers
                .call(leader, &addr, PeerRpc::ReadIndex, &(), self.rpc_timeout)
                .await?;
            r.map_err(ClusterError::Raft)?
        };
        if let Some(index) = index {
            let mut rx = self.raft.metrics();
            let deadline = tokio::time::Instant::now() + self.rpc_timeout;
            while rx.borrow_and_update().last_applied.map(|l| l.index) < Some(index) {
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    return Err(ClusterError::Raft(
                        "timed out catching up for a read".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn read_index(&self) -> Result<Option<u64>, ClusterError> {
        self.raft
            .ensure_linearizable()
            .await
            .map(|l| l.map(|l| l.index))
            .map_err(|e| ClusterError::Raft(e.to_string()))
    }

    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let a = self.applied();
        let membership = a.membership.membership();
        Status {
            id: self.id,
            state: format!("{:?}", m.state),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            members: a.state.members.clone(),
            layout_version: a.state.layout.version,
            layout: a.state.layout.shards.clone(),
            previous_layout_version: a.state.previous_layout.as_ref().map(|l| l.version),
            ready: a.state.ready.clone(),
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }

    fn knows(&self, id: NodeId) -> bool {
        let a = self.applied();
        let m = a.membership.membership();
        // A node not yet part of any membership accepts its first leader.
        m.get_node(&id).is_some() || m.nodes().next().is_none()
    }
}

/// Runs `f` until it succeeds, up to 20 attempts across leader changes
/// (backing off 50 ms more each time, 500 ms at most), while `retryable`
/// says the error is worth another try; then the last error.
async fn retrying<T, Fut>(
    retryable: impl Fn(&ClusterError) -> bool,
    mut f: impl FnMut() -> Fut,
) -> Result<T, ClusterError>
where
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    let mut last = ClusterError::NoLeader;
    for attempt in 0..20u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 * attempt.min(10))).await;
        }
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Server side of the peer RPCs.
pub struct PeerService {
    cluster: Arc<Cluster>,
}

fn decode<T: serde::de::DeserializeOwned>(m: &PeerMessage) -> Result<T, GrpcStatus> {
    serde_json::from_slice(&m.payload)
        .map_err(|e| GrpcStatus::invalid_argument(format!("bad payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<GrpcResponse<PeerMessage>, GrpcStatus> {
    let payload = serde_json::to_vec(v).map_err(|e| GrpcStatus::internal(e.to_string()))?;
    Ok(GrpcResponse::new(PeerMessage {
        from: 0,
        payload: payload.into(),
    }))
}

impl PeerService {
    /// The caller's certificate must name the node id it claims, and (but
    /// for `Join`) that node must be a member.
    fn authenticate(
        &self,
        req: &GrpcRequest<PeerMessage>,
        must_be_member: bool,
    ) -> Result<NodeId, GrpcStatus> {
        let from = req.get_ref().from;
        let certs = req
            .peer_certs()
            .ok_or_else(|| GrpcStatus::unauthenticated("a client certificate is required"))?;
        check_peer(&certs, from).map_err(|e| {
            tracing::warn!(claimed = from, error = %e, "peer refused");
            GrpcStatus::permission_denied(e.to_string())
        })?;
        if must_be_member && !self.cluster.knows(from) {
            tracing::warn!(node = from, "refused a peer that is not a member");
            return Err(GrpcStatus::permission_denied(format!(
                "node {from} is not a member of this cluster"
            )));
        }
        Ok(from)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        req: GrpcRequest<PeerMessage>,
    ) -> Result<GrpcResponse<PeerMessage>, GrpcStatus> {
        self.authenticate(&req, true)?;
        let r = self
            .cluster
            .raft
            .append_entries(decode(req.get_ref())?)
            .await;
        encode(&r)
    }

    async fn vote(
        &self,
        req: GrpcRequest<PeerMessage>,
    ) -> Result<GrpcResponse<PeerMessage>, GrpcStatus> {
        self.authenticate(&req, true)?;
        let r = self.cluster.raft.vote(decode(req.get_ref())?).await;
        encode(&r)
    }

    async fn install_snapshot(
        &self,
        req: GrpcRequest<PeerMessage>,
    ) -> Result<GrpcResponse<PeerMessage>, GrpcStatus> {
        self.authenticate(&req, true)?;
        let r = self
            .cluster
            .raft
            .install_snapshot(decode(req.get_ref())?)
            .await;
        encode(&r)
    }

    async fn forward(
        &self,
        req: GrpcRequest<PeerMessage>,
    ) -> Result<GrpcResponse<PeerMessage>, GrpcStatus> {
        self.authenticate(&req, true)?;
        let request: Request = decode(req.get_ref())?;
        let r = self
            .cluster
            .propose(request)
            .await
            .map_err(|e| e.to_string());
        encode(&r)
    }

    async fn read_index(
        &self,
        req: GrpcRequest<PeerMessage>,
    ) -> Result<GrpcResponse<PeerMessage>, GrpcStatus> {
        self.authenticate(&req, true)?;
        let r = self.cluster.read_index().await.map_err(|e| e.to_string());
        encode(&r)
    }

    async fn join(
        &self,
        req: GrpcRequest<PeerMessage>,
    ) -> Result<GrpcResponse<PeerMessage>, GrpcStatus> {
        let from = self.authenticate(&req, false)?;
        let j: JoinRequest = decode(req.get_ref())?;
        if j.id != from {
            return Err(GrpcStatus::permission_denied(format!(
                "certificate of node {from} cannot join as node {}",
                j.id
            )));
        }
        let r = self
            .cluster
            .admit(j.id, j.info)
            .await
            .map_err(|e| e.to_string());
        encode(&r)
    }
}
