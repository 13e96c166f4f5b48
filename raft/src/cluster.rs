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
use openraft::{ChangeMembers, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status as GrpcStatus};

use crate::error::Error;
use crate::job::Backoff;
use crate::network::{PeerRpc, Peers, MAX_PEER_MESSAGE};
use crate::protocol::PEER_PROTOCOL;
use crate::state::{ClusterState, Command, NodeInfo, Request, Response, SettingsUpdate};
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
    /// Where connections to peers leave from: the peer listen address when
    /// it names one, so that a peer (and a firewall rule) sees a node's
    /// traffic come from the address it knows the node by. `None`: the
    /// kernel picks.
    pub source_ip: Option<std::net::IpAddr>,
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
    /// The commit index this node knows (saved by its log store).
    pub commit_index: Option<u64>,
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
    /// The commit index plus one, from the log store.
    commit_index: Arc<AtomicU64>,
    /// Set while this leader goes quiet to hand its leadership away.
    stepping_down: std::sync::atomic::AtomicBool,
    election_max: Duration,
    rpc_timeout: Duration,
    /// Times this node saw a new leader (the first one included), counted
    /// by a task watching Raft's metrics.
    leader_changes: Arc<AtomicU64>,
}

impl Cluster {
    pub async fn start(cfg: ClusterConfig) -> Result<Arc<Cluster>, Error> {
        let db =
            open_db(&cfg.dir).map_err(|e| Error::Fatal(format!("opening the Raft store: {e}")))?;
        let log = LogStore::new(db.clone());
        let commit_index = log.commit_index();
        let sm = StateMachine::open(db)
            .map_err(|e| Error::Fatal(format!("loading the state machine: {e}")))?;
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
        .map_err(|e| Error::Config(e.to_string()))?;
        let peers = Peers::new(cfg.id, cfg.tls.clone(), cfg.source_ip);
        let raft = Raft::new(cfg.id, Arc::new(config), peers.clone(), log, sm).await?;
        let leader_changes = Arc::new(AtomicU64::new(0));
        let (mut watch, changes) = (raft.metrics(), leader_changes.clone());
        tokio::spawn(async move {
            // A change is a new leader seen: the leaderless moment of an
            // election (which the watch may or may not show) is not one.
            let mut leader = watch.borrow().current_leader;
            // Ends when Raft shuts down and drops the sender.
            while watch.changed().await.is_ok() {
                let now = watch.borrow().current_leader;
                if now.is_some() && now != leader {
                    changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    leader = now;
                }
            }
        });
        Ok(Arc::new(Cluster {
            id: cfg.id,
            raft,
            applied,
            peers,
            info: cfg.info,
            tls: cfg.tls,
            client: rand::random::<u64>() | 1,
            seq: AtomicU64::new(0),
            commit_index,
            stepping_down: Default::default(),
            election_max: cfg.election_timeout.1,
            rpc_timeout: cfg.rpc_timeout,
            leader_changes,
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

    /// Why this node's Raft has stopped (storage failed, or openraft hit a
    /// fatal error), if it has: the node then takes no more writes.
    pub fn fatal(&self) -> Option<String> {
        self.raft
            .metrics()
            .borrow()
            .running_state
            .as_ref()
            .err()
            .map(|f| f.to_string())
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id)
    }

    /// Waits (bounded) until a leader is known.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<NodeId, Error> {
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
                return Err(Error::NoLeader);
            }
        }
    }

    /// Whether this node's Raft state exists (it bootstrapped or joined
    /// before).
    pub async fn is_initialized(&self) -> Result<bool, Error> {
        Ok(self.raft.is_initialized().await?)
    }

    /// Starts a new cluster with this node as its only voter (unless this
    /// node's Raft state is already initialized), records its addresses,
    /// applies `settings` and creates the default tenant.
    pub async fn bootstrap(&self, settings: &SettingsUpdate) -> Result<(), Error> {
        if !self.is_initialized().await? {
            let members: BTreeMap<NodeId, NodeInfo> = [(self.id, self.info.clone())].into();
            self.raft.initialize(members).await?;
        }
        self.wait_leader(Duration::from_secs(30)).await?;
        // Settings before the default tenant, which takes the default shard
        // count.
        self.rejoin(settings).await?;
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

    /// On a restart: records this node's addresses (they may have changed)
    /// and applies `settings`, once a leader answers.
    pub async fn rejoin(&self, settings: &SettingsUpdate) -> Result<(), Error> {
        self.register_self().await?;
        self.update_settings(settings).await
    }

    /// Applies the settings this node's config gives, unless the cluster
    /// already has them.
    pub async fn update_settings(&self, update: &SettingsUpdate) -> Result<(), Error> {
        // Linearizable: a node that just joined or restarted may lag.
        let current = self.read(|s| s.settings.clone()).await?;
        if update.applied_to(&current) == current {
            return Ok(());
        }
        match self
            .write(Command::UpdateSettings {
                update: update.clone(),
            })
            .await?
        {
            Response::Err(e) => Err(Error::Command(e)),
            _ => Ok(()),
        }
    }

    async fn register_self(&self) -> Result<(), Error> {
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
    pub async fn join(&self, leader: NodeId, leader_peer_addr: &str) -> Result<(), Error> {
        let req = JoinRequest {
            id: self.id,
            info: self.info.clone(),
        };
        let r: Result<(), Error> = self
            .peers
            .call(
                leader,
                leader_peer_addr,
                PeerRpc::Join,
                &req,
                Duration::from_secs(60),
            )
            .await?;
        r
    }

    /// On the leader: learner first, then voter, then its addresses.
    async fn admit(&self, id: NodeId, info: NodeInfo) -> Result<(), Error> {
        if !self.is_leader() {
            return Err(Error::NotLeader {
                leader: self.leader(),
            });
        }
        // Its certificate is still valid: the cluster's word decides.
        if self.local(|s| s.removed.contains(&id)) {
            return Err(Error::Refused(format!(
                "node {id} was removed from the cluster; an admin must allow it back \
                 (bitclone cluster allow-rejoin {id}) before it joins again"
            )));
        }
        // A voter asking to join has lost its Raft state (a replaced
        // volume): it may have forgotten a vote it cast or entries it
        // acknowledged, so it must not count towards a majority as if it
        // remembered them.
        if self
            .applied()
            .membership
            .membership()
            .voter_ids()
            .any(|v| v == id)
        {
            return Err(Error::Refused(format!(
                "node {id} is a voter already and asks to join with no Raft state (a lost volume?): \
                 remove it (bitclone cluster remove {id}) and allow it back \
                 (bitclone cluster allow-rejoin {id}) before it joins again"
            )));
        }
        self.raft.add_learner(id, info.clone(), true).await?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
            .await?;
        if let Response::Err(e) = self.write(Command::UpsertMember { id, info }).await? {
            return Err(Error::Command(e));
        }
        tracing::info!(node = id, "node joined the cluster");
        Ok(())
    }

    /// Hands this node's leadership to another voter, waiting up to
    /// `within`; true when another node leads now. openraft 0.9 cannot
    /// transfer leadership, so the leader goes quiet instead: no heartbeats
    /// and no proposals (writes and reads get a retryable "not the leader"),
    /// and the followers, hearing nothing past the leader lease, elect one
    /// of themselves (0.6-0.8 s with the default timings). This node never
    /// campaigns again until it restarts (a drained node is on its way out).
    pub async fn step_down(&self, within: Duration) -> Result<bool, Error> {
        let voters = self.applied().membership.membership().voter_ids().count();
        if voters < 2 {
            return Ok(false);
        }
        self.raft.runtime_config().elect(false);
        if !self.is_leader() {
            return Ok(true);
        }
        // Quiet for a few election rounds at most: longer would outlast
        // the job leases (their renewals are writes) if no one takes over.
        let within = within.min(self.election_max * 6);
        let mut quiet = Quiet {
            cluster: self,
            moved: false,
        };
        self.stepping_down.store(true, Ordering::Release);
        self.raft.runtime_config().heartbeat(false);
        let deadline = tokio::time::Instant::now() + within;
        quiet.moved = loop {
            let leader = self.raft.metrics().borrow().current_leader;
            if leader.is_some_and(|l| l != self.id) {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(quiet.moved)
    }

    /// Removes a node: out of the voters, then out of the layout.
    pub async fn remove(&self, id: NodeId) -> Result<(), Error> {
        let leader = self.wait_leader(Duration::from_secs(10)).await?;
        if leader != self.id {
            return Err(Error::Refused(format!(
                "remove through the leader (node {leader})"
            )));
        }
        // Barred first: between leaving the voters and leaving the members
        // it must not be admitted again.
        self.write(Command::BarRejoin { id }).await?;
        if id == self.id {
            // The leader removing itself: out of the layout first, out of
            // the voters last. Once that change commits, the others refuse
            // its messages (it is no member) and elect a leader among
            // themselves; a proposal made here after it would wait for a
            // commit that never comes.
            self.write(Command::RemoveMember { id, bar: true }).await?;
            self.raft
                .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                .await?;
            return Ok(());
        }
        self.raft
            .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
            .await?;
        self.write(Command::RemoveMember { id, bar: true }).await?;
        Ok(())
    }

    /// Lets a removed node join again (an admin's decision).
    pub async fn allow_rejoin(&self, id: NodeId) -> Result<(), Error> {
        self.write(Command::AllowRejoin { id })
            .await
            .and_then(|r| match r {
                Response::Err(e) => Err(Error::Command(e)),
                _ => Ok(()),
            })
    }

    /// Proposes a command and returns the state machine's answer. On a
    /// follower the request goes to the leader, which stamps the time.
    pub async fn write(&self, cmd: Command) -> Result<Response, Error> {
        let req = Request {
            client: self.client,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            now_ms: 0,
            cmd,
        };
        retrying(|| self.write_once(&req)).await
    }

    /// One attempt of [`Cluster::write`]: propose here if this node leads,
    /// else forward to the leader.
    async fn write_once(&self, req: &Request) -> Result<Response, Error> {
        let leader = self.wait_leader(Duration::from_secs(5)).await?;
        if leader == self.id {
            return self.propose(req.clone()).await;
        }
        let addr = self.peer_addr(leader).ok_or(Error::NoLeader)?;
        let r: Result<Response, Error> = self
            .peers
            .call(leader, &addr, PeerRpc::Forward, req, self.rpc_timeout)
            .await?;
        r
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
    async fn propose(&self, mut req: Request) -> Result<Response, Error> {
        if self.stepping_down.load(Ordering::Acquire) {
            return Err(Error::NotLeader { leader: None });
        }
        self.check_versions(&req.cmd)?;
        req.now_ms = now_ms();
        Ok(self.raft.client_write(req).await?.data)
    }

    /// Refuses a command that a member's build could not apply: every
    /// member must have been heard speaking the protocol version the
    /// command came with (a rolling upgrade in progress, or a member not
    /// heard from since this node started).
    fn check_versions(&self, cmd: &Command) -> Result<(), Error> {
        let need = cmd.needs_protocol();
        if need <= 1 {
            return Ok(());
        }
        let heard: std::collections::HashMap<NodeId, u32> =
            self.peers.protocols().into_iter().collect();
        let a = self.applied();
        let behind: Vec<String> = a
            .membership
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.id)
            .filter(|id| heard.get(id).is_none_or(|v| *v < need))
            .map(|id| match heard.get(&id) {
                Some(v) => format!("node {id} (v{v})"),
                None => format!("node {id} (not heard from yet)"),
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        // Retried: a member not heard from right after an election soon
        // is; an upgrade in progress ends.
        Err(Error::Timeout(format!(
            "this needs every node on a release that speaks peer protocol v{need}; {} \
             does not yet: finish the upgrade first",
            behind.join(", ")
        )))
    }

    /// Runs `f` on state that includes every write acknowledged before the
    /// call (a linearizable read through the leader's read index).
    pub async fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> Result<T, Error> {
        // Across a leader change: retry until a leader answers (bounded).
        retrying(|| self.read_barrier()).await?;
        Ok(self.local(f))
    }

    /// Waits until this node has applied every write acknowledged before the
    /// call.
    async fn read_barrier(&self) -> Result<(), Error> {
        let leader = self.wait_leader(Duration::from_secs(5)).await?;
        let index = if leader == self.id {
            self.read_index().await?
        } else {
            let addr = self.peer_addr(leader).ok_or(Error::NoLeader)?;
            let r: Result<Option<u64>, Error> = self
                .peers
                .call(leader, &addr, PeerRpc::ReadIndex, &(), self.rpc_timeout)
                .await?;
            r?
        };
        if let Some(index) = index {
            let mut rx = self.raft.metrics();
            let deadline = tokio::time::Instant::now() + self.rpc_timeout;
            while rx.borrow_and_update().last_applied.map(|l| l.index) < Some(index) {
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    return Err(Error::Timeout("catching up for a read".into()));
                }
            }
        }
        Ok(())
    }

    async fn read_index(&self) -> Result<Option<u64>, Error> {
        // Confirming leadership would reach the followers and hold off
        // the election the step-down waits for.
        if self.stepping_down.load(Ordering::Acquire) {
            return Err(Error::NotLeader { leader: None });
        }
        Ok(self.raft.ensure_linearizable().await?.map(|l| l.index))
    }

    /// The peer protocol version spoken with each member heard from (the
    /// last one heard: a peer rolled back shows its new one once it
    /// answers or calls).
    pub fn peer_protocols(&self) -> Vec<(NodeId, u32)> {
        let mut v = self.peers.protocols();
        v.retain(|(p, _)| self.knows(*p));
        v
    }

    /// How many times the leader this node sees has changed since it
    /// started.
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes
            .load(std::sync::atomic::Ordering::Relaxed)
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
            commit_index: self
                .commit_index
                .load(std::sync::atomic::Ordering::Relaxed)
                .checked_sub(1),
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

/// Cluster writes and reads retry across leader changes with the one
/// backoff (equal jitter, capped).
const RETRY: Backoff = Backoff {
    base: Duration::from_millis(50),
    max: Duration::from_millis(500),
};

/// Runs `f` until it succeeds, up to 20 attempts, while the error is one
/// that can go away (no leader, a leader change, an unreachable peer); a
/// refusal is returned at once.
async fn retrying<T, Fut>(mut f: impl FnMut() -> Fut) -> Result<T, Error>
where
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut last = Error::NoLeader;
    for attempt in 0..20u32 {
        if attempt > 0 {
            tokio::time::sleep(RETRY.delay(attempt, rand::random())).await;
        }
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => last = e,
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

/// Ends a step-down however the wait ends (a drain call dropped halfway
/// included): heartbeats and proposals resume; a node still leading may
/// campaign again rather than leave the cluster without a leader.
struct Quiet<'a> {
    cluster: &'a Cluster,
    moved: bool,
}

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        let c = self.cluster;
        c.raft.runtime_config().heartbeat(true);
        c.stepping_down.store(false, Ordering::Release);
        if !self.moved {
            c.raft.runtime_config().elect(true);
        }
    }
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
        protocol_min: PEER_PROTOCOL.min,
        protocol_max: PEER_PROTOCOL.max,
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
        let m = req.get_ref();
        self.cluster
            .peers
            .heard(from, m.protocol_min, m.protocol_max)
            .map_err(|e| {
                tracing::warn!(peer = from, error = %e, "refused a peer of another release");
                GrpcStatus::failed_precondition(e)
            })?;
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
        let id = req
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::context::accepted)
            .unwrap_or_default()
            .to_string();
        let from = req.get_ref().from;
        // A span of the client call's trace, on this node.
        let span = tracing::info_span!("forwarded_command", from, request_id = %id);
        if let Some(tp) = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
        {
            crate::context::set_remote_parent(&span, tp);
        }
        let r = tracing::Instrument::instrument(self.cluster.propose(request), span).await;
        tracing::debug!(
            from,
            request_id = %id,
            ok = r.is_ok(),
            "applied a command a follower forwarded"
        );
        encode(&r)
    }

    async fn read_index(
        &self,
        req: GrpcRequest<PeerMessage>,
    ) -> Result<GrpcResponse<PeerMessage>, GrpcStatus> {
        self.authenticate(&req, true)?;
        let r = self.cluster.read_index().await;
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
        let r = self.cluster.admit(j.id, j.info).await;
        encode(&r)
    }
}
