//! The replicated cluster state and its pure transition function.
//!
//! `apply(state, request)` is the whole state machine: no IO, no clock (the
//! leader stamps `now_ms` into every request), so it is tested without a
//! runtime and every replica computes the same result.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::job::{Backoff, Checkpoint, Failure, Job, JobState, Lease, Progress, Source};
use crate::placement::{plan, shard_of, Layout};
use crate::retention::{self, Retention};
use crate::NodeId;

/// Where a member can be reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Public gRPC API address (clients).
    pub api_addr: String,
    /// Internal address (Raft, forwarding), mutual TLS.
    pub peer_addr: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "api={} peer={}", self.api_addr, self.peer_addr)
    }
}

/// A dataset's pointer to its latest snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetHead {
    pub snapshot: String,
    pub updated_unix_ms: i64,
    /// Every snapshot of the dataset, oldest first.
    pub history: Vec<SnapshotEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub id: String,
    pub parent: String,
    pub files: u64,
    pub bytes: u64,
    pub created_unix_ms: i64,
    pub written_by: NodeId,
}

/// Everything the cluster agrees on. Small data only: chunks and manifests
/// never go through Raft.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub members: BTreeMap<NodeId, NodeInfo>,
    /// tenant → number of shards.
    pub tenants: BTreeMap<String, u32>,
    pub layout: Layout,
    /// The layout before the last change; valid until the new one is in effect.
    pub previous_layout: Option<Layout>,
    /// Nodes that hold all the data the current layout gives them (repair
    /// done); once every node of the layout is here, it takes effect.
    #[serde(default)]
    pub ready: std::collections::BTreeSet<NodeId>,
    /// (tenant, dataset) → head.
    pub datasets: BTreeMap<String, BTreeMap<String, DatasetHead>>,
    pub jobs: BTreeMap<String, Job>,
    /// client id → its recent requests' answers: a retried request is
    /// answered again instead of applied twice.
    pub sessions: BTreeMap<u64, Session>,
    pub settings: Settings,
    /// The last fencing token granted, over all jobs: tokens grow across jobs
    /// too, so a sink that two jobs write to can order their commits.
    #[serde(default)]
    pub fence_seq: u64,
    /// Nodes removed from the cluster: they cannot join again, with their
    /// old certificate or another, until an admin allows it.
    #[serde(default)]
    pub removed: std::collections::BTreeSet<NodeId>,
    /// tenant → its limits (none: unlimited).
    #[serde(default)]
    pub quotas: BTreeMap<String, Quota>,
    /// tenant → bytes its committed snapshots added to the store (chunks and
    /// pages new to the tenant when committed).
    #[serde(default)]
    pub stored_bytes: BTreeMap<String, u64>,
    /// tenant → dataset → its retention policy (the leader's expiry pass
    /// applies them with [`Command::ExpireSnapshots`]).
    #[serde(default)]
    pub retention: BTreeMap<String, BTreeMap<String, Retention>>,
    /// tenant → its erasure ([`Command::EraseTenant`]), kept once complete
    /// for its report until the name is used again.
    #[serde(default)]
    pub erasing: BTreeMap<String, Erasure>,
    /// tenant → its wrapped data key ([`Command::SetTenantKey`]): the
    /// tenant's chunks and manifests are sealed with it.
    #[serde(default)]
    pub tenant_keys: BTreeMap<String, TenantKey>,
    /// Packs of chunks in the cold tier's bucket (name → what it holds):
    /// every node indexes each one and drops its local copies of them.
    #[serde(default)]
    pub cold_packs: BTreeMap<String, ColdPack>,
}

/// A pack of chunks written to the cold tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdPack {
    pub chunks: u64,
    pub bytes: u64,
    /// The node that wrote it.
    pub by: NodeId,
    pub unix_ms: i64,
}

/// An encrypted tenant's data key, wrapped by a key-encryption key that
/// only the nodes (or their key-management service) hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantKey {
    /// The data key's public fingerprint (it never changes: re-wrapping
    /// keeps the key, and so every chunk sealed with it).
    pub id: String,
    /// The key-encryption key that wraps it (a key file's key id, or what
    /// the key-management hook named).
    pub kek: String,
    /// The wrapped key, hex.
    pub wrapped: String,
    pub since_unix_ms: i64,
}

/// A tenant's erasure: its jobs stopped, then everything of it forgotten
/// by the state, then purged from every node's store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    pub started_unix_ms: i64,
    /// Datasets, snapshots and jobs it had when the erasure began.
    pub datasets: u64,
    pub snapshots: u64,
    pub jobs: u64,
    /// Its datasets, jobs, policies and limits are gone from the state.
    pub forgotten: bool,
    /// Nodes whose stores hold nothing of it any more, and what each
    /// removed.
    pub purged: BTreeMap<NodeId, Purged>,
}

/// What one node removed of an erased tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purged {
    pub chunks: u64,
    pub bytes: u64,
    pub snapshots: u64,
}

impl Erasure {
    /// Forgotten, and purged from every node in `members`.
    pub fn complete<'a>(&self, mut members: impl Iterator<Item = &'a NodeId>) -> bool {
        self.forgotten && members.all(|n| self.purged.contains_key(n))
    }
}

/// A tenant's limits; `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub max_stored_bytes: Option<u64>,
    /// Jobs not yet finished (pending or running).
    pub max_jobs_in_flight: Option<u32>,
}

/// Cluster-wide knobs: defaults at bootstrap, then what nodes' configs set
/// ([`Command::UpdateSettings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub default_shards: u32,
    pub lease_ms: i64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_shards: 8,
            lease_ms: 5_000,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
        }
    }
}

impl Settings {
    /// Whether the settings make sense together (the one place that says).
    pub fn validate(&self) -> Result<(), String> {
        if self.default_shards == 0 || self.default_shards > 4096 {
            return Err("default_shards must be 1..=4096".into());
        }
        if self.lease_ms < MIN_LEASE_MS {
            return Err(format!("the lease must be at least {MIN_LEASE_MS} ms"));
        }
        if self.backoff_base_ms > self.backoff_max_ms {
            return Err(format!(
                "backoff base {} ms is above backoff max {} ms",
                self.backoff_base_ms, self.backoff_max_ms
            ));
        }
        Ok(())
    }
}

/// A change to [`Settings`]: the fields a node's config sets; `None` keeps
/// the cluster's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsUpdate {
    pub default_shards: Option<u32>,
    pub lease_ms: Option<i64>,
    pub backoff_base_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
}

impl SettingsUpdate {
    /// `settings` with this update applied.
    pub fn applied_to(&self, settings: &Settings) -> Settings {
        Settings {
            default_shards: self.default_shards.unwrap_or(settings.default_shards),
            lease_ms: self.lease_ms.unwrap_or(settings.lease_ms),
            backoff_base_ms: self.backoff_base_ms.unwrap_or(settings.backoff_base_ms),
            backoff_max_ms: self.backoff_max_ms.unwrap_or(settings.backoff_max_ms),
        }
    }
}

/// The shortest lease: the holder renews every third of it, over Raft.
pub const MIN_LEASE_MS: i64 = 300;

/// A write to the cluster state, stamped by the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Who sent it (a node id or a client's random id) and its sequence
    /// number: together they make retries idempotent. `seq == 0` opts out.
    pub client: u64,
    pub seq: u64,
    /// Leader time when proposed.
    pub now_ms: i64,
    pub cmd: Command,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Adds or updates a member's addresses; replans the layout.
    UpsertMember {
        id: NodeId,
        info: NodeInfo,
    },
    /// Removes a member; replans the layout without it. With `bar`, the
    /// node may not join again until `AllowRejoin` (removals logged before
    /// the field existed read as without).
    RemoveMember {
        id: NodeId,
        #[serde(default)]
        bar: bool,
    },
    /// Lets a removed node join again.
    AllowRejoin {
        id: NodeId,
    },
    /// Bars a node from joining, before it is taken out of the voters, so
    /// that it cannot be admitted again while it is being removed.
    BarRejoin {
        id: NodeId,
    },
    /// Sets a tenant's limits.
    SetQuota {
        tenant: String,
        quota: Quota,
    },
    /// Creates a tenant (or changes its shard count; only growth is allowed).
    SetTenant {
        tenant: String,
        shards: u32,
    },
    /// The new layout's replicas hold their data: drop the previous layout.
    CompleteLayout {
        version: u64,
    },
    /// `node` holds every snapshot the layout `version` places on it.
    ReplicaReady {
        node: NodeId,
        version: u64,
    },
    /// Moves a dataset's head to `snapshot` if it is still at `parent`
    /// (compare-and-set). `fenced_by`: the job and lease this effect comes
    /// from, if a job made it; a stale token is refused.
    CommitSnapshot {
        tenant: String,
        dataset: String,
        snapshot: SnapshotEntry,
        parent: String,
        fenced_by: Option<(String, Fence)>,
        /// Bytes the snapshot added to the store (counted against the
        /// tenant's quota).
        #[serde(default)]
        stored_bytes: u64,
        /// The fingerprint of the data key the snapshot was sealed with
        /// (`None`: in clear); refused unless it is the tenant's key now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sealed_by: Option<String>,
    },
    SubmitJob {
        job: Box<Job>,
    },
    /// Grants `node` the lease of a due job (or of one whose lease lapsed).
    AcquireLease {
        job: String,
        node: NodeId,
    },
    RenewLease {
        job: String,
        fence: Fence,
    },
    /// Records where the holder got to (and its progress, for watchers).
    SaveCheckpoint {
        job: String,
        fence: Fence,
        checkpoint: Checkpoint,
        progress: Option<Progress>,
    },
    /// The holder stops without an outcome (node shutdown): the job goes
    /// back to Pending at once instead of waiting for the lease to lapse.
    ReleaseLease {
        job: String,
        fence: Fence,
    },
    /// Ends the current attempt. `jitter` in [0, 1) is drawn by the proposer.
    FinishAttempt {
        job: String,
        fence: Fence,
        outcome: Result<(), (String, Failure)>,
        jitter: f64,
    },
    CancelJob {
        job: String,
    },
    /// Changes cluster-wide settings (validated together).
    UpdateSettings {
        update: SettingsUpdate,
    },
    /// Removes a snapshot from its dataset's history. The head moves to the
    /// newest snapshot left (its parent, unless that was deleted before);
    /// with none left the dataset is gone. Refused while a job not finished
    /// reads the snapshot. Chunks are freed later, by garbage collection.
    DeleteSnapshot {
        tenant: String,
        dataset: String,
        snapshot: String,
    },
    /// Removes a dataset with all its snapshots and its retention policy.
    /// Refused while a job not finished reads or writes the dataset.
    DeleteDataset {
        tenant: String,
        dataset: String,
    },
    /// Sets a dataset's retention policy (one that keeps everything removes
    /// it). The dataset need not exist yet.
    SetRetention {
        tenant: String,
        dataset: String,
        policy: Retention,
    },
    /// Deletes the snapshots the dataset's retention policy no longer keeps
    /// at the leader's time (decided inside `apply`, so a snapshot committed
    /// or pinned since the proposal is judged as it is now).
    ExpireSnapshots {
        tenant: String,
        dataset: String,
    },
    /// Starts erasing a tenant (admin): no new snapshot, job, lease or
    /// setting of it is accepted from now on, and its jobs are cancelled.
    /// Again on a tenant being erased: nothing changes.
    EraseTenant {
        tenant: String,
    },
    /// Forgets everything of a tenant being erased: datasets, jobs,
    /// policies, limits, its shards. Refused while one of its jobs still
    /// holds a live lease.
    ForgetTenant {
        tenant: String,
    },
    /// Encrypts a tenant from now on (admin): refused once it has a
    /// snapshot or an unfinished job, since those are stored in clear. With
    /// `rewrap`, replaces the wrapping of its existing key instead (the
    /// same key, `key.id`, under another key-encryption key).
    SetTenantKey {
        tenant: String,
        key: TenantKey,
        #[serde(default)]
        rewrap: bool,
    },
    /// A pack is in the cold tier's bucket: every node indexes it.
    AddColdPack {
        pack: String,
        info: ColdPack,
    },
    /// `node` purged every key of an erased tenant from its store.
    TenantPurged {
        tenant: String,
        node: NodeId,
        purged: Purged,
    },
    /// Brings in what a standalone node of the previous release kept in its
    /// own store: dataset heads with their history, and jobs. What the state
    /// already has is left alone, so the import can run again after a crash.
    ImportLegacy {
        /// (tenant, dataset, head).
        datasets: Vec<(String, String, DatasetHead)>,
        jobs: Vec<Job>,
    },
}

impl Command {
    /// The oldest peer protocol version whose builds can apply this command:
    /// the leader proposes it only once every member speaks it (a node of an
    /// older release could not decode the log entry).
    pub fn needs_protocol(&self) -> u32 {
        match self {
            Command::DeleteSnapshot { .. }
            | Command::DeleteDataset { .. }
            | Command::SetRetention { .. }
            | Command::ExpireSnapshots { .. }
            | Command::EraseTenant { .. }
            | Command::ForgetTenant { .. }
            | Command::TenantPurged { .. }
            | Command::SetTenantKey { .. }
            | Command::AddColdPack { .. } => 3,
            Command::CommitSnapshot {
                sealed_by: Some(_), ..
            } => 3,
            Command::SubmitJob { job } if job.reconcile.is_some() => 3,
            _ => 1,
        }
    }
}

/// The holder and token an effect claims to come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub node: NodeId,
    pub token: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Job(Job),
    Lease {
        token: u64,
        job: Job,
    },
    Layout {
        version: u64,
    },
    /// Snapshots a delete or an expiry removed, and the dataset's head after
    /// it (empty: the dataset is gone).
    Deleted {
        snapshots: Vec<String>,
        head: String,
    },
    Err(CommandError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("fenced: token {given} of node {node} is stale, the job is at token {current}")]
    Fenced {
        node: NodeId,
        given: u64,
        current: u64,
    },
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("duplicate request {seq} from client {client} (already at {last})")]
    Duplicate { client: u64, seq: u64, last: u64 },
    #[error("{0}")]
    Quota(String),
}

impl ClusterState {
    /// Shards whose data is not yet where it should be: a replica set short
    /// of the replication factor or naming a node that is no longer a
    /// member, or, while a new layout waits to take effect, one with a
    /// replica that has not reported it holds its data (`ReplicaReady`).
    pub fn under_replicated_shards(&self) -> usize {
        let want = crate::placement::replication_factor(self.members.len());
        let moving = self.previous_layout.is_some();
        self.layout
            .shards
            .values()
            .flatten()
            .filter(|set| {
                set.len() < want
                    || set.iter().any(|n| !self.members.contains_key(n))
                    || (moving && set.iter().any(|n| !self.ready.contains(n)))
            })
            .count()
    }

    /// The replica set that owns a dataset's shard.
    pub fn replicas_of(&self, tenant: &str, dataset: &str) -> Vec<NodeId> {
        let shards = self
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or(self.settings.default_shards);
        self.layout
            .replicas(tenant, shard_of(dataset, shards))
            .map(|s| s.to_vec())
            // A tenant not placed yet: any member may act for it.
            .unwrap_or_else(|| self.members.keys().copied().collect())
    }

    /// Jobs `node` may take now: due, or running under a lapsed lease, and
    /// in a shard `node` replicates.
    pub fn claimable(&self, node: NodeId, now_ms: i64) -> Vec<&Job> {
        let writing = self.writing(now_ms);
        let mut v: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| can_acquire(j, now_ms))
            .filter(|j| self.replicas_of(&j.tenant, &j.dataset).contains(&node))
            .filter(|j| sink_busy(&writing, j).is_none())
            .collect();
        v.sort_by_key(|j| (j.next_attempt_unix_ms, j.created_unix_ms));
        v
    }

    /// Jobs running under a live lease: they hold their sinks.
    fn writing(&self, now_ms: i64) -> Vec<&Job> {
        self.jobs.values().filter(|o| o.is_held(now_ms)).collect()
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            base: std::time::Duration::from_millis(self.settings.backoff_base_ms),
            max: std::time::Duration::from_millis(self.settings.backoff_max_ms),
        }
    }

    fn replan(&mut self) {
        let members: BTreeSet<NodeId> = self.members.keys().copied().collect();
        let next = plan(&members, &self.tenants, &self.layout);
        if next.version != self.layout.version {
            // Every node must confirm again that it holds its new share.
            self.ready.clear();
            // Keep the oldest layout still in force: two quick changes must not
            // drop the one whose data is actually in place.
            if self.previous_layout.is_none() {
                self.previous_layout = Some(self.layout.clone());
            }
            self.layout = next;
        }
    }

    fn ensure_tenant(&mut self, tenant: &str) {
        if !self.tenants.contains_key(tenant) {
            self.tenants
                .insert(tenant.to_string(), self.settings.default_shards);
            self.replan();
        }
    }
}

fn dataset_head<'a>(
    state: &'a ClusterState,
    tenant: &str,
    dataset: &str,
) -> Result<&'a DatasetHead, CommandError> {
    state
        .datasets
        .get(tenant)
        .and_then(|d| d.get(dataset))
        .ok_or_else(|| CommandError::NotFound(format!("dataset {dataset} of tenant {tenant}")))
}

/// Takes `gone` out of a dataset's history; the head moves to the newest
/// snapshot left, and a dataset with none left is removed.
fn remove_snapshots(
    state: &mut ClusterState,
    tenant: &str,
    dataset: &str,
    gone: &BTreeSet<String>,
) -> Response {
    let Some(heads) = state.datasets.get_mut(tenant) else {
        return Response::Deleted {
            snapshots: Vec::new(),
            head: String::new(),
        };
    };
    let mut removed = Vec::new();
    let mut head = String::new();
    if let Some(h) = heads.get_mut(dataset) {
        h.history.retain(|s| {
            let keep = !gone.contains(&s.id);
            if !keep {
                removed.push(s.id.clone());
            }
            keep
        });
        // History is in commit order and every commit's parent is the head
        // before it, so the newest entry left is the deleted head's parent
        // unless that was deleted too.
        if gone.contains(&h.snapshot) {
            h.snapshot = h.history.last().map(|s| s.id.clone()).unwrap_or_default();
        }
        head = h.snapshot.clone();
        if h.history.is_empty() {
            heads.remove(dataset);
        }
    }
    Response::Deleted {
        snapshots: removed,
        head,
    }
}

impl ClusterState {
    /// A job not finished that reads `snapshot` of the dataset (or, with
    /// `None`, that reads or writes the dataset at all): its snapshot must
    /// not be deleted under it.
    pub fn job_pinning(&self, tenant: &str, dataset: &str, snapshot: Option<&str>) -> Option<&Job> {
        let head = self
            .datasets
            .get(tenant)
            .and_then(|d| d.get(dataset))
            .map(|h| h.snapshot.as_str());
        self.jobs.values().find(|j| {
            if j.tenant != tenant || j.state.is_final() {
                return false;
            }
            let from_here =
                matches!(&j.source, Source::Snapshot { dataset: d, .. } if d == dataset);
            let Some(snapshot) = snapshot else {
                return j.dataset == dataset || from_here;
            };
            let named = match &j.source {
                Source::Snapshot {
                    dataset: d,
                    snapshot: s,
                } if d == dataset => match s {
                    Some(id) => id.to_hex() == snapshot,
                    // The latest: whatever the head is when it runs.
                    None => head == Some(snapshot),
                },
                _ => false,
            };
            named || (j.dataset == dataset && j.checkpoint.snapshot.as_deref() == Some(snapshot))
        })
    }

    /// The snapshots of a dataset its retention policy no longer keeps at
    /// `now_ms` (none without a policy); the head and snapshots that jobs
    /// read are kept.
    pub fn expired(&self, tenant: &str, dataset: &str, now_ms: i64) -> Vec<String> {
        let Some(policy) = self.retention.get(tenant).and_then(|p| p.get(dataset)) else {
            return Vec::new();
        };
        let Some(head) = self.datasets.get(tenant).and_then(|d| d.get(dataset)) else {
            return Vec::new();
        };
        let pinned: BTreeSet<String> = head
            .history
            .iter()
            .filter(|s| self.job_pinning(tenant, dataset, Some(&s.id)).is_some())
            .map(|s| s.id.clone())
            .collect();
        retention::expired(&head.history, policy, &head.snapshot, &pinned, now_ms)
    }
}

/// A job of `writing` (other than `j`) that writes a sink `j` also writes:
/// `j` waits for it, so that two jobs never write one prefix at once.
fn sink_busy<'a>(writing: &[&'a Job], j: &Job) -> Option<&'a Job> {
    writing
        .iter()
        .find(|o| o.id != j.id && o.shares_a_sink(j))
        .copied()
}

fn can_acquire(j: &Job, now_ms: i64) -> bool {
    j.is_due(now_ms) || (j.state == JobState::Running && !j.is_held(now_ms))
}

fn check_fence(job: &Job, fence: Fence) -> Result<(), CommandError> {
    let holder_ok = job.lease.is_some_and(|l| l.holder == fence.node);
    if fence.token != job.fencing_token || !holder_ok || job.state != JobState::Running {
        return Err(CommandError::Fenced {
            node: fence.node,
            given: fence.token,
            current: job.fencing_token,
        });
    }
    Ok(())
}

/// What the state machine remembers of one client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Leader time of the client's last request (for dropping idle clients).
    pub last_ms: i64,
    /// sequence number → answer, the most recent `SESSION_WINDOW` (fewer
    /// when their bytes exceed `SESSION_BYTES`).
    pub recent: BTreeMap<u64, Response>,
    /// Bytes of `recent` (as JSON).
    #[serde(default)]
    pub bytes: u64,
    /// The highest sequence number whose answer was dropped: a request at
    /// or below it that is not in `recent` is refused as a possible retry.
    #[serde(default)]
    pub floor: u64,
}

impl Session {
    fn pop_oldest(&mut self) {
        if let Some((seq, resp)) = self.recent.pop_first() {
            self.bytes = self.bytes.saturating_sub(response_bytes(&resp));
            self.floor = self.floor.max(seq);
        }
    }
}

/// An answer's size in the session table.
fn response_bytes(r: &Response) -> u64 {
    serde_json::to_vec(r).map_or(0, |v| v.len() as u64)
}

/// Clients remembered; the longest idle is forgotten first (every node
/// restart is a new client).
pub const MAX_SESSIONS: usize = 256;

/// Answers kept per client for retries. A client has requests in flight
/// concurrently, so they may be applied out of order; only a request older
/// than everything remembered is refused (it cannot be told from a retry).
pub const SESSION_WINDOW: usize = 1024;

/// Bytes of answers kept per client, and for all clients together: a job's
/// answer carries its whole record, so counts alone do not bound memory.
pub const SESSION_BYTES: u64 = 2 << 20;
pub const ALL_SESSIONS_BYTES: u64 = 32 << 20;

/// Applies one request. Pure: the same state and request give the same result.
pub fn apply(state: &mut ClusterState, req: &Request) -> Response {
    if req.seq != 0 {
        if let Some(session) = state.sessions.get(&req.client) {
            let recent = &session.recent;
            if let Some(resp) = recent.get(&req.seq) {
                return resp.clone();
            }
            if req.seq <= session.floor {
                return Response::Err(CommandError::Duplicate {
                    client: req.client,
                    seq: req.seq,
                    last: session.floor,
                });
            }
            if let Some((&oldest, _)) = recent.first_key_value() {
                if recent.len() >= SESSION_WINDOW && req.seq < oldest {
                    return Response::Err(CommandError::Duplicate {
                        client: req.client,
                        seq: req.seq,
                        last: oldest,
                    });
                }
            }
        }
    }
    let resp = match apply_cmd(state, req.now_ms, &req.cmd) {
        Ok(r) => r,
        Err(e) => Response::Err(e),
    };
    if req.seq != 0 {
        let session = state.sessions.entry(req.client).or_default();
        session.last_ms = session.last_ms.max(req.now_ms);
        // Not there yet: a request already answered returned above.
        session.bytes += response_bytes(&resp);
        session.recent.insert(req.seq, resp.clone());
        while session.recent.len() > SESSION_WINDOW
            || (session.bytes > SESSION_BYTES && session.recent.len() > 1)
        {
            session.pop_oldest();
        }
        let total = |s: &ClusterState| s.sessions.values().map(|x| x.bytes).sum::<u64>();
        while state.sessions.len() > MAX_SESSIONS || total(state) > ALL_SESSIONS_BYTES {
            let idle = state
                .sessions
                .iter()
                .filter(|(c, _)| **c != req.client)
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(c, _)| *c);
            match idle {
                Some(c) => {
                    state.sessions.remove(&c);
                }
                None => break,
            }
        }
    }
    resp
}

/// Finished jobs (succeeded, failed, cancelled) kept for `job get`: at most
/// this many, none older than `FINISHED_JOB_TTL_MS` since it ended.
pub const FINISHED_JOBS_KEPT: usize = 1000;
pub const FINISHED_JOB_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// Forgets finished jobs beyond the bounds, the longest finished first.
/// Runs as a job is submitted, on the leader's time, so every replica
/// forgets the same ones.
fn prune_finished_jobs(state: &mut ClusterState, now: i64) {
    let mut finished: Vec<(i64, String)> = state
        .jobs
        .values()
        .filter(|j| j.state.is_final())
        .map(|j| (j.updated_unix_ms, j.id.clone()))
        .collect();
    finished.sort();
    let over = finished.len().saturating_sub(FINISHED_JOBS_KEPT);
    for (i, (ended, id)) in finished.into_iter().enumerate() {
        if i < over || now - ended > FINISHED_JOB_TTL_MS {
            state.jobs.remove(&id);
        }
    }
}

fn job_mut<'a>(state: &'a mut ClusterState, id: &str) -> Result<&'a mut Job, CommandError> {
    state
        .jobs
        .get_mut(id)
        .ok_or_else(|| CommandError::NotFound(format!("job {id}")))
}

/// A command that would add to a tenant being erased.
fn erasing_refusal(state: &ClusterState, cmd: &Command) -> Option<CommandError> {
    let tenant = match cmd {
        Command::CommitSnapshot { tenant, .. }
        | Command::SetRetention { tenant, .. }
        | Command::SetTenantKey { tenant, .. }
        | Command::SetQuota { tenant, .. } => tenant,
        Command::SubmitJob { job } => &job.tenant,
        Command::AcquireLease { job, .. } => &state.jobs.get(job)?.tenant,
        // Creating it again is allowed once the erasure is complete.
        Command::SetTenant { tenant, .. } => {
            let e = state.erasing.get(tenant)?;
            if e.complete(state.members.keys()) {
                return None;
            }
            tenant
        }
        _ => return None,
    };
    state.erasing.contains_key(tenant).then(|| {
        CommandError::Conflict(format!(
            "tenant {tenant} is being erased (or was: create it again first)"
        ))
    })
}

fn apply_cmd(state: &mut ClusterState, now: i64, cmd: &Command) -> Result<Response, CommandError> {
    if let Some(refusal) = erasing_refusal(state, cmd) {
        return Err(refusal);
    }
    match cmd {
        Command::UpsertMember { id, info } => {
            if state.removed.contains(id) {
                return Err(CommandError::Invalid(format!(
                    "node {id} was removed from the cluster; an admin must allow it back \
                     (bitclone cluster allow-rejoin {id})"
                )));
            }
            state.members.insert(*id, info.clone());
            state.replan();
            Ok(Response::Layout {
                version: state.layout.version,
            })
        }
        Command::RemoveMember { id, bar } => {
            if state.members.remove(id).is_none() {
                return Err(CommandError::NotFound(format!("member {id}")));
            }
            if *bar {
                state.removed.insert(*id);
            }
            state.replan();
            Ok(Response::Layout {
                version: state.layout.version,
            })
        }
        Command::BarRejoin { id } => {
            state.removed.insert(*id);
            Ok(Response::Ok)
        }
        Command::AllowRejoin { id } => {
            if !state.removed.remove(id) {
                return Err(CommandError::NotFound(format!("removed node {id}")));
            }
            Ok(Response::Ok)
        }
        Command::SetQuota { tenant, quota } => {
            if !state.tenants.contains_key(tenant) {
                return Err(CommandError::NotFound(format!("tenant {tenant}")));
            }
            state.quotas.insert(tenant.clone(), quota.clone());
            Ok(Response::Ok)
        }
        Command::SetTenant { tenant, shards } => {
            if *shards == 0 || *shards > 4096 {
                return Err(CommandError::Invalid("shards must be 1..=4096".into()));
            }
            // Datasets hash onto shards: shrinking would move them silently.
            if let Some(old) = state.tenants.get(tenant) {
                if shards < old {
                    return Err(CommandError::Invalid(format!(
                        "tenant {tenant} has {old} shards; the count can only grow"
                    )));
                }
            }
            state.tenants.insert(tenant.clone(), *shards);
            // A name used again after a complete erasure.
            state.erasing.remove(tenant);
            state.replan();
            Ok(Response::Layout {
                version: state.layout.version,
            })
        }
        Command::CompleteLayout { version } => {
            if *version == state.layout.version {
                state.previous_layout = None;
            }
            Ok(Response::Ok)
        }
        Command::ReplicaReady { node, version } => {
            // A report for an older layout says nothing about this one.
            if *version == state.layout.version && state.members.contains_key(node) {
                state.ready.insert(*node);
                if state.layout.load().keys().all(|n| state.ready.contains(n)) {
                    state.previous_layout = None;
                }
            }
            Ok(Response::Ok)
        }
        Command::CommitSnapshot {
            tenant,
            dataset,
            snapshot,
            parent,
            fenced_by,
            stored_bytes,
            sealed_by,
        } => {
            if let Some((job_id, fence)) = fenced_by {
                check_fence(job_mut(state, job_id)?, *fence)?;
            }
            let key = state.tenant_keys.get(tenant).map(|k| &k.id);
            if key != sealed_by.as_ref() {
                return Err(CommandError::Conflict(format!(
                    "snapshot of dataset {dataset} was stored {} but tenant {tenant} is {}; \
                     nothing was committed, retry",
                    sealed_by
                        .as_ref()
                        .map_or("in clear".to_string(), |k| format!("sealed with key {k}")),
                    key.map_or("not encrypted".to_string(), |k| format!(
                        "encrypted with key {k}"
                    ))
                )));
            }
            state.ensure_tenant(tenant);
            let heads = state.datasets.entry(tenant.clone()).or_default();
            let current = heads
                .get(dataset)
                .map(|h| h.snapshot.clone())
                .unwrap_or_default();
            if current == snapshot.id {
                return Ok(Response::Ok);
            }
            if &current != parent {
                return Err(CommandError::Conflict(format!(
                    "dataset {dataset} is at {} now, not at {}; retry",
                    if current.is_empty() {
                        "nothing"
                    } else {
                        &current
                    },
                    if parent.is_empty() { "nothing" } else { parent }
                )));
            }
            // After the parent check: a stale parent is a Conflict to retry,
            // not a quota refusal.
            let used = state.stored_bytes.get(tenant).copied().unwrap_or(0);
            let limit = state.quotas.get(tenant).and_then(|q| q.max_stored_bytes);
            if let Some(max) = limit {
                if used.saturating_add(*stored_bytes) > max {
                    return Err(CommandError::Quota(format!(
                        "tenant {tenant} stores {used} bytes and this snapshot adds \
                         {stored_bytes}, over its quota of {max}; nothing was committed"
                    )));
                }
            }
            let heads = state.datasets.entry(tenant.clone()).or_default();
            let head = heads.entry(dataset.clone()).or_insert_with(|| DatasetHead {
                snapshot: String::new(),
                updated_unix_ms: now,
                history: Vec::new(),
            });
            head.snapshot = snapshot.id.clone();
            head.updated_unix_ms = now;
            head.history.push(snapshot.clone());
            *state.stored_bytes.entry(tenant.clone()).or_default() += stored_bytes;
            Ok(Response::Ok)
        }
        Command::SubmitJob { job } => {
            if state.jobs.contains_key(&job.id) {
                return Err(CommandError::Conflict(format!("job {} exists", job.id)));
            }
            state.ensure_tenant(&job.tenant);
            prune_finished_jobs(state, now);
            let limit = state
                .quotas
                .get(&job.tenant)
                .and_then(|q| q.max_jobs_in_flight);
            if let Some(max) = limit {
                let in_flight = state
                    .jobs
                    .values()
                    .filter(|j| j.tenant == job.tenant && !j.state.is_final())
                    .count();
                if in_flight >= max as usize {
                    return Err(CommandError::Quota(format!(
                        "tenant {} has {in_flight} jobs not finished, its limit",
                        job.tenant
                    )));
                }
            }
            let mut job = Job::clone(job);
            job.created_unix_ms = now;
            job.updated_unix_ms = now;
            job.next_attempt_unix_ms = now;
            state.jobs.insert(job.id.clone(), job.clone());
            Ok(Response::Job(job))
        }
        Command::AcquireLease { job, node } => {
            let lease_ms = state.settings.lease_ms;
            let (eligible, busy) = {
                let j = state
                    .jobs
                    .get(job)
                    .ok_or_else(|| CommandError::NotFound(format!("job {job}")))?;
                let writing = state.writing(now);
                (
                    state.replicas_of(&j.tenant, &j.dataset).contains(node),
                    sink_busy(&writing, j).map(|o| o.id.clone()),
                )
            };
            if let Some(other) = busy {
                return Err(CommandError::Conflict(format!(
                    "job {job} waits: job {other} is writing one of its destinations"
                )));
            }
            let fence_seq = state.fence_seq;
            let j = job_mut(state, job)?;
            if !can_acquire(j, now) {
                return Err(CommandError::Conflict(format!(
                    "job {job} is not available ({:?}, lease {:?})",
                    j.state, j.lease
                )));
            }
            if !eligible {
                return Err(CommandError::Invalid(format!(
                    "node {node} is not in the replica set of job {job}'s shard"
                )));
            }
            if j.state == JobState::Running {
                // The holder's lease lapsed: its attempt was interrupted.
                j.interrupted(now);
            }
            j.start(now);
            let token = fence_seq.max(j.fencing_token) + 1;
            j.fencing_token = token;
            j.lease = Some(Lease {
                holder: *node,
                deadline_unix_ms: now + lease_ms,
            });
            let job = j.clone();
            state.fence_seq = token;
            Ok(Response::Lease { token, job })
        }
        Command::RenewLease { job, fence } => {
            let lease_ms = state.settings.lease_ms;
            let j = job_mut(state, job)?;
            check_fence(j, *fence)?;
            j.lease = Some(Lease {
                holder: fence.node,
                deadline_unix_ms: now + lease_ms,
            });
            Ok(Response::Job(j.clone()))
        }
        Command::SaveCheckpoint {
            job,
            fence,
            checkpoint,
            progress,
        } => {
            let j = job_mut(state, job)?;
            check_fence(j, *fence)?;
            j.checkpoint = checkpoint.clone();
            if let Some(p) = progress {
                j.progress = p.clone();
            }
            j.updated_unix_ms = now;
            Ok(Response::Job(j.clone()))
        }
        Command::ReleaseLease { job, fence } => {
            let j = job_mut(state, job)?;
            check_fence(j, *fence)?;
            j.interrupted(now);
            j.lease = None;
            Ok(Response::Job(j.clone()))
        }
        Command::FinishAttempt {
            job,
            fence,
            outcome,
            jitter,
        } => {
            let backoff = state.backoff();
            let j = job_mut(state, job)?;
            check_fence(j, *fence)?;
            match outcome {
                Ok(()) => j.succeed(now),
                Err(_) if j.cancel_requested => j.cancelled(now),
                Err((msg, kind)) => j.fail(msg.clone(), *kind, backoff, *jitter, now),
            }
            j.lease = None;
            Ok(Response::Job(j.clone()))
        }
        Command::CancelJob { job } => {
            let j = job_mut(state, job)?;
            if j.request_cancel(now) {
                j.lease = None;
            }
            Ok(Response::Job(j.clone()))
        }
        Command::UpdateSettings { update } => {
            let next = update.applied_to(&state.settings);
            next.validate().map_err(CommandError::Invalid)?;
            state.settings = next;
            Ok(Response::Ok)
        }
        Command::DeleteSnapshot {
            tenant,
            dataset,
            snapshot,
        } => {
            let head = dataset_head(state, tenant, dataset)?;
            if !head.history.iter().any(|s| &s.id == snapshot) {
                return Err(CommandError::NotFound(format!(
                    "snapshot {snapshot} of dataset {dataset}"
                )));
            }
            if let Some(j) = state.job_pinning(tenant, dataset, Some(snapshot)) {
                return Err(CommandError::Conflict(format!(
                    "job {} ({:?}) reads snapshot {snapshot}; cancel it or wait for it to end",
                    j.id, j.state
                )));
            }
            let gone = [snapshot.clone()].into();
            Ok(remove_snapshots(state, tenant, dataset, &gone))
        }
        Command::DeleteDataset { tenant, dataset } => {
            let head = dataset_head(state, tenant, dataset)?;
            let snapshots: Vec<String> = head.history.iter().map(|s| s.id.clone()).collect();
            if let Some(j) = state.job_pinning(tenant, dataset, None) {
                return Err(CommandError::Conflict(format!(
                    "job {} ({:?}) uses dataset {dataset}; cancel it or wait for it to end",
                    j.id, j.state
                )));
            }
            if let Some(heads) = state.datasets.get_mut(tenant) {
                heads.remove(dataset);
            }
            if let Some(policies) = state.retention.get_mut(tenant) {
                policies.remove(dataset);
            }
            Ok(Response::Deleted {
                snapshots,
                head: String::new(),
            })
        }
        Command::SetRetention {
            tenant,
            dataset,
            policy,
        } => {
            policy.validate().map_err(CommandError::Invalid)?;
            let policies = state.retention.entry(tenant.clone()).or_default();
            if policy.keeps_all() {
                policies.remove(dataset);
            } else {
                policies.insert(dataset.clone(), policy.clone());
            }
            Ok(Response::Ok)
        }
        Command::ExpireSnapshots { tenant, dataset } => {
            let gone: BTreeSet<String> = state.expired(tenant, dataset, now).into_iter().collect();
            if gone.is_empty() {
                let head = dataset_head(state, tenant, dataset)?.snapshot.clone();
                return Ok(Response::Deleted {
                    snapshots: Vec::new(),
                    head,
                });
            }
            Ok(remove_snapshots(state, tenant, dataset, &gone))
        }
        Command::EraseTenant { tenant } => {
            if state.erasing.contains_key(tenant) {
                return Ok(Response::Ok);
            }
            if !state.tenants.contains_key(tenant) {
                return Err(CommandError::NotFound(format!("tenant {tenant}")));
            }
            let heads = state.datasets.get(tenant);
            let mut erasure = Erasure {
                started_unix_ms: now,
                datasets: heads.map_or(0, |d| d.len() as u64),
                snapshots: heads.map_or(0, |d| d.values().map(|h| h.history.len() as u64).sum()),
                ..Default::default()
            };
            for j in state.jobs.values_mut().filter(|j| &j.tenant == tenant) {
                erasure.jobs += 1;
                j.request_cancel(now);
            }
            state.erasing.insert(tenant.clone(), erasure);
            Ok(Response::Ok)
        }
        Command::ForgetTenant { tenant } => {
            let Some(erasure) = state.erasing.get(tenant) else {
                return Err(CommandError::NotFound(format!(
                    "erasure of tenant {tenant}"
                )));
            };
            if erasure.forgotten {
                return Ok(Response::Ok);
            }
            if let Some(j) = state
                .jobs
                .values()
                .find(|j| &j.tenant == tenant && j.is_held(now))
            {
                return Err(CommandError::Conflict(format!(
                    "job {} of tenant {tenant} still runs on node {}; retry once it stopped",
                    j.id,
                    j.lease.map_or(0, |l| l.holder)
                )));
            }
            state.datasets.remove(tenant);
            state.jobs.retain(|_, j| &j.tenant != tenant);
            state.retention.remove(tenant);
            state.quotas.remove(tenant);
            state.stored_bytes.remove(tenant);
            // Without its wrapped key, whatever of the tenant is left
            // anywhere (a store not purged yet, a cold bucket) is unreadable.
            state.tenant_keys.remove(tenant);
            if state.tenants.remove(tenant).is_some() {
                state.replan();
            }
            if let Some(e) = state.erasing.get_mut(tenant) {
                e.forgotten = true;
            }
            Ok(Response::Ok)
        }
        Command::AddColdPack { pack, info } => {
            state
                .cold_packs
                .entry(pack.clone())
                .or_insert_with(|| ColdPack {
                    unix_ms: now,
                    ..info.clone()
                });
            Ok(Response::Ok)
        }
        Command::SetTenantKey {
            tenant,
            key,
            rewrap,
        } => {
            if !state.tenants.contains_key(tenant) {
                return Err(CommandError::NotFound(format!("tenant {tenant}")));
            }
            match (state.tenant_keys.get(tenant), rewrap) {
                (Some(k), false) if k.id == key.id => return Ok(Response::Ok),
                (Some(k), false) => {
                    return Err(CommandError::Conflict(format!(
                        "tenant {tenant} is already encrypted (key {})",
                        k.id
                    )))
                }
                (None, true) => {
                    return Err(CommandError::Invalid(format!(
                        "tenant {tenant} is not encrypted: nothing to re-wrap"
                    )))
                }
                (Some(k), true) if k.id != key.id => {
                    return Err(CommandError::Conflict(format!(
                        "tenant {tenant}'s key is {}, not {}: a re-wrap keeps the key",
                        k.id, key.id
                    )))
                }
                (Some(k), true) => {
                    let since = k.since_unix_ms;
                    state.tenant_keys.insert(
                        tenant.clone(),
                        TenantKey {
                            since_unix_ms: since,
                            ..key.clone()
                        },
                    );
                    return Ok(Response::Ok);
                }
                (None, false) => {}
            }
            let snapshots = state.datasets.get(tenant).map_or(0, |d| d.len());
            let jobs = state
                .jobs
                .values()
                .filter(|j| &j.tenant == tenant && !j.state.is_final())
                .count();
            if snapshots > 0 || jobs > 0 {
                return Err(CommandError::Conflict(format!(
                    "tenant {tenant} has {snapshots} datasets and {jobs} unfinished jobs stored \
                     in clear; only a tenant without data can be encrypted (see the docs on \
                     migrating a tenant)"
                )));
            }
            state.tenant_keys.insert(
                tenant.clone(),
                TenantKey {
                    since_unix_ms: now,
                    ..key.clone()
                },
            );
            Ok(Response::Ok)
        }
        Command::TenantPurged {
            tenant,
            node,
            purged,
        } => {
            let Some(e) = state.erasing.get_mut(tenant) else {
                return Err(CommandError::NotFound(format!(
                    "erasure of tenant {tenant}"
                )));
            };
            e.purged.insert(*node, purged.clone());
            Ok(Response::Ok)
        }
        Command::ImportLegacy { datasets, jobs } => {
            for (tenant, name, head) in datasets {
                state.ensure_tenant(tenant);
                let heads = state.datasets.entry(tenant.clone()).or_default();
                heads.entry(name.clone()).or_insert_with(|| head.clone());
            }
            for job in jobs {
                // Tokens of the old node's sinks stay below every new grant.
                state.fence_seq = state.fence_seq.max(job.fencing_token);
                if state.jobs.contains_key(&job.id) {
                    continue;
                }
                state.ensure_tenant(&job.tenant);
                let mut j = job.clone();
                if j.state == JobState::Running {
                    // It was running when the old node stopped.
                    j.interrupted(now);
                }
                j.lease = None;
                state.jobs.insert(j.id.clone(), j);
            }
            Ok(Response::Ok)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sm {
        state: ClusterState,
        seq: u64,
    }

    impl Sm {
        fn new(nodes: &[NodeId]) -> Sm {
            let mut sm = Sm {
                state: ClusterState::default(),
                seq: 0,
            };
            for n in nodes {
                sm.ok(
                    0,
                    Command::UpsertMember {
                        id: *n,
                        info: NodeInfo {
                            api_addr: format!("127.0.0.1:{}", 7000 + n),
                            peer_addr: format!("127.0.0.1:{}", 8000 + n),
                        },
                    },
                );
            }
            sm
        }

        fn run(&mut self, now: i64, cmd: Command) -> Response {
            self.seq += 1;
            apply(
                &mut self.state,
                &Request {
                    client: 1,
                    seq: self.seq,
                    now_ms: now,
                    cmd,
                },
            )
        }

        fn ok(&mut self, now: i64, cmd: Command) -> Response {
            let r = self.run(now, cmd);
            assert!(!matches!(r, Response::Err(_)), "{r:?}");
            r
        }

        fn submit(&mut self, id: &str, now: i64) {
            let job = Job::new(
                id.into(),
                "t".into(),
                "d".into(),
                src("file:///x"),
                vec![],
                3,
                now,
            );
            self.ok(now, Command::SubmitJob { job: Box::new(job) });
        }

        fn acquire(&mut self, id: &str, node: NodeId, now: i64) -> Result<u64, CommandError> {
            match self.run(
                now,
                Command::AcquireLease {
                    job: id.into(),
                    node,
                },
            ) {
                Response::Lease { token, .. } => Ok(token),
                Response::Err(e) => Err(e),
                other => panic!("{other:?}"),
            }
        }
    }

    fn src(url: &str) -> crate::job::Source {
        crate::job::Source::parse(url).unwrap()
    }

    fn dst(url: &str) -> crate::job::Destination {
        crate::job::Destination::parse(url).unwrap()
    }

    fn entry(id: &str) -> SnapshotEntry {
        SnapshotEntry {
            id: id.into(),
            parent: String::new(),
            files: 1,
            bytes: 1,
            created_unix_ms: 0,
            written_by: 1,
        }
    }

    fn commit(sm: &mut Sm, dataset: &str, id: &str, parent: &str, now: i64) -> Response {
        let mut snapshot = entry(id);
        snapshot.parent = parent.into();
        snapshot.created_unix_ms = now;
        sm.run(
            now,
            Command::CommitSnapshot {
                tenant: "t".into(),
                dataset: dataset.into(),
                snapshot,
                parent: parent.into(),
                fenced_by: None,
                stored_bytes: 0,
                sealed_by: None,
            },
        )
    }

    fn history(sm: &Sm, dataset: &str) -> (String, Vec<String>) {
        sm.state.datasets["t"]
            .get(dataset)
            .map(|h| {
                (
                    h.snapshot.clone(),
                    h.history.iter().map(|s| s.id.clone()).collect(),
                )
            })
            .unwrap_or_default()
    }

    #[test]
    fn deleting_the_head_moves_it_to_the_newest_snapshot_left() {
        let mut sm = Sm::new(&[1]);
        commit(&mut sm, "d", "a", "", 1);
        commit(&mut sm, "d", "b", "a", 2);
        commit(&mut sm, "d", "c", "b", 3);
        let del = |sm: &mut Sm, id: &str| {
            sm.run(
                4,
                Command::DeleteSnapshot {
                    tenant: "t".into(),
                    dataset: "d".into(),
                    snapshot: id.into(),
                },
            )
        };
        // A snapshot in the middle: the head stays.
        assert_eq!(
            del(&mut sm, "b"),
            Response::Deleted {
                snapshots: vec!["b".into()],
                head: "c".into()
            }
        );
        // The head: back to the newest left (its parent was deleted).
        assert!(matches!(del(&mut sm, "c"), Response::Deleted { head, .. } if head == "a"));
        assert_eq!(history(&sm, "d"), ("a".into(), vec!["a".into()]));
        // A put that built on the deleted head loses its compare-and-set.
        assert!(matches!(
            commit(&mut sm, "d", "e", "c", 5),
            Response::Err(CommandError::Conflict(_))
        ));
        assert!(matches!(
            del(&mut sm, "zz"),
            Response::Err(CommandError::NotFound(_))
        ));
        // The last one: the dataset is gone, and a put starts it again.
        assert!(matches!(del(&mut sm, "a"), Response::Deleted { head, .. } if head.is_empty()));
        assert!(!sm.state.datasets["t"].contains_key("d"));
        assert!(!matches!(
            commit(&mut sm, "d", "f", "", 6),
            Response::Err(_)
        ));
    }

    #[test]
    fn a_snapshot_or_dataset_that_a_job_reads_is_not_deleted() {
        let mut sm = Sm::new(&[1]);
        commit(&mut sm, "d", "a", "", 1);
        commit(&mut sm, "d", "b", "a", 2);
        // A clone of d's latest snapshot, not finished: the head is pinned.
        let job = Job::new(
            "j".into(),
            "t".into(),
            "copy".into(),
            src("snapshot://d"),
            vec![],
            3,
            3,
        );
        sm.ok(3, Command::SubmitJob { job: Box::new(job) });
        let del = |sm: &mut Sm, cmd| sm.run(4, cmd);
        let snap = |id: &str| Command::DeleteSnapshot {
            tenant: "t".into(),
            dataset: "d".into(),
            snapshot: id.into(),
        };
        let r = del(&mut sm, snap("b"));
        assert!(
            matches!(&r, Response::Err(CommandError::Conflict(m)) if m.contains("job j")),
            "{r:?}"
        );
        let dataset = Command::DeleteDataset {
            tenant: "t".into(),
            dataset: "d".into(),
        };
        assert!(matches!(
            del(&mut sm, dataset.clone()),
            Response::Err(CommandError::Conflict(_))
        ));
        // Another snapshot of it is free to go.
        assert!(matches!(del(&mut sm, snap("a")), Response::Deleted { .. }));
        sm.ok(5, Command::CancelJob { job: "j".into() });
        assert_eq!(
            del(&mut sm, dataset),
            Response::Deleted {
                snapshots: vec!["b".into()],
                head: String::new()
            }
        );
        assert!(sm.state.datasets["t"].is_empty());
    }

    #[test]
    fn expiry_applies_the_policy_at_the_leaders_time() {
        let mut sm = Sm::new(&[1]);
        let mut parent = String::new();
        for i in 0..5 {
            let id = format!("s{i}");
            commit(&mut sm, "d", &id, &parent, i * 1000);
            parent = id;
        }
        let expire = Command::ExpireSnapshots {
            tenant: "t".into(),
            dataset: "d".into(),
        };
        // No policy: nothing goes.
        assert!(
            matches!(sm.run(10_000, expire.clone()), Response::Deleted { snapshots, .. } if snapshots.is_empty())
        );
        sm.ok(
            10_000,
            Command::SetRetention {
                tenant: "t".into(),
                dataset: "d".into(),
                policy: Retention {
                    keep_last: 2,
                    ..Default::default()
                },
            },
        );
        assert_eq!(sm.state.expired("t", "d", 10_000), ["s0", "s1", "s2"]);
        assert_eq!(
            sm.run(10_000, expire.clone()),
            Response::Deleted {
                snapshots: vec!["s0".into(), "s1".into(), "s2".into()],
                head: "s4".into()
            }
        );
        assert!(sm.state.expired("t", "d", 10_000).is_empty());
        // A policy that keeps everything is removed; a bad one is refused.
        sm.ok(
            10_000,
            Command::SetRetention {
                tenant: "t".into(),
                dataset: "d".into(),
                policy: Retention::default(),
            },
        );
        assert!(sm.state.retention["t"].is_empty());
        let bad = sm.run(
            10_000,
            Command::SetRetention {
                tenant: "t".into(),
                dataset: "d".into(),
                policy: Retention {
                    keep_within_ms: -1,
                    ..Default::default()
                },
            },
        );
        assert!(matches!(bad, Response::Err(CommandError::Invalid(_))));
        // Only the commands of this release wait for every member to speak it.
        assert_eq!(expire.needs_protocol(), 3);
        assert_eq!(Command::CancelJob { job: "j".into() }.needs_protocol(), 1);
    }

    #[test]
    fn a_tenant_is_encrypted_before_its_first_snapshot_and_commits_must_match_its_key() {
        let mut sm = Sm::new(&[1]);
        let key = |id: &str, kek: &str| TenantKey {
            id: id.into(),
            kek: kek.into(),
            wrapped: format!("{id}-under-{kek}"),
            since_unix_ms: 0,
        };
        let set = |k: TenantKey, rewrap: bool| Command::SetTenantKey {
            tenant: "t".into(),
            key: k,
            rewrap,
        };
        assert!(matches!(
            sm.run(1, set(key("k", "a"), false)),
            Response::Err(CommandError::NotFound(_))
        ));
        sm.ok(
            1,
            Command::SetTenant {
                tenant: "t".into(),
                shards: 1,
            },
        );
        // A snapshot stored in clear (built before the key was set) is
        // refused once the tenant is encrypted, and one sealed with the key
        // goes in.
        sm.ok(2, set(key("k", "a"), false));
        sm.ok(2, set(key("k", "a"), false));
        assert_eq!(sm.state.tenant_keys["t"].since_unix_ms, 2);
        assert!(matches!(
            commit(&mut sm, "d", "s1", "", 3),
            Response::Err(CommandError::Conflict(m)) if m.contains("in clear")
        ));
        let sealed = |sm: &mut Sm, key: &str, id: &str, parent: &str| {
            let mut snapshot = entry(id);
            snapshot.parent = parent.into();
            sm.run(
                4,
                Command::CommitSnapshot {
                    tenant: "t".into(),
                    dataset: "d".into(),
                    snapshot,
                    parent: parent.into(),
                    fenced_by: None,
                    stored_bytes: 0,
                    sealed_by: Some(key.into()),
                },
            )
        };
        assert!(matches!(
            sealed(&mut sm, "other", "s1", ""),
            Response::Err(CommandError::Conflict(_))
        ));
        assert!(!matches!(sealed(&mut sm, "k", "s1", ""), Response::Err(_)));
        // Another key for it: refused; a re-wrap keeps the key and its
        // start, and must name the same key.
        assert!(matches!(
            sm.run(5, set(key("k2", "a"), false)),
            Response::Err(CommandError::Conflict(_))
        ));
        assert!(matches!(
            sm.run(5, set(key("k2", "b"), true)),
            Response::Err(CommandError::Conflict(m)) if m.contains("keeps the key")
        ));
        sm.ok(5, set(key("k", "b"), true));
        assert_eq!(sm.state.tenant_keys["t"].kek, "b");
        assert_eq!(sm.state.tenant_keys["t"].since_unix_ms, 2);
        // A tenant that has data cannot be encrypted (it is in clear).
        sm.ok(
            6,
            Command::SetTenant {
                tenant: "u".into(),
                shards: 1,
            },
        );
        let mut snapshot = entry("u1");
        snapshot.created_unix_ms = 6;
        sm.ok(
            6,
            Command::CommitSnapshot {
                tenant: "u".into(),
                dataset: "d".into(),
                snapshot,
                parent: String::new(),
                fenced_by: None,
                stored_bytes: 0,
                sealed_by: None,
            },
        );
        assert!(matches!(
            sm.run(
                7,
                Command::SetTenantKey {
                    tenant: "u".into(),
                    key: key("k3", "a"),
                    rewrap: false,
                }
            ),
            Response::Err(CommandError::Conflict(m)) if m.contains("without data")
        ));
        assert!(matches!(
            sm.run(
                7,
                Command::SetTenantKey {
                    tenant: "u".into(),
                    key: key("k3", "a"),
                    rewrap: true,
                }
            ),
            Response::Err(CommandError::Invalid(_))
        ));
        // Erasing the tenant forgets its wrapped key.
        sm.ok(8, Command::EraseTenant { tenant: "t".into() });
        assert!(matches!(
            sm.run(8, set(key("k", "b"), true)),
            Response::Err(CommandError::Conflict(m)) if m.contains("being erased")
        ));
        sm.ok(9, Command::ForgetTenant { tenant: "t".into() });
        assert!(!sm.state.tenant_keys.contains_key("t"));
    }

    #[test]
    fn an_erased_tenant_takes_nothing_new_and_is_forgotten_once_its_jobs_stopped() {
        let mut sm = Sm::new(&[1, 2]);
        sm.ok(
            0,
            Command::SetTenant {
                tenant: "t".into(),
                shards: 2,
            },
        );
        commit(&mut sm, "d", "a", "", 1);
        sm.submit("pending", 1);
        sm.submit("running", 1);
        let token = sm.acquire("running", 1, 1).unwrap();
        sm.ok(2, Command::EraseTenant { tenant: "t".into() });
        // Pending jobs end at once; the running one is asked to stop.
        assert_eq!(sm.state.jobs["pending"].state, JobState::Cancelled);
        assert!(sm.state.jobs["running"].cancel_requested);
        let e = &sm.state.erasing["t"];
        assert_eq!((e.datasets, e.snapshots, e.jobs), (1, 1, 2));
        // Nothing new for it: a commit, a job, a lease, a policy.
        assert!(matches!(
            commit(&mut sm, "d", "b", "a", 3),
            Response::Err(CommandError::Conflict(m)) if m.contains("being erased")
        ));
        let job = Job::new(
            "late".into(),
            "t".into(),
            "d".into(),
            src("file:///x"),
            vec![],
            3,
            3,
        );
        assert!(matches!(
            sm.run(3, Command::SubmitJob { job: Box::new(job) }),
            Response::Err(CommandError::Conflict(_))
        ));
        assert!(sm.acquire("pending", 2, 3).is_err());
        // Not forgotten while its job holds a live lease...
        let forget = Command::ForgetTenant { tenant: "t".into() };
        assert!(matches!(
            sm.run(4, forget.clone()),
            Response::Err(CommandError::Conflict(m)) if m.contains("job running")
        ));
        // ...once it stopped (here: its lease lapsed), everything goes.
        let _ = token;
        sm.ok(10_000, forget);
        assert!(!sm.state.tenants.contains_key("t"));
        assert!(!sm.state.datasets.contains_key("t"));
        assert!(sm.state.jobs.values().all(|j| j.tenant != "t"));
        assert!(!sm.state.layout.shards.contains_key("t"));
        // Not to be created again until every node purged its store.
        let again = Command::SetTenant {
            tenant: "t".into(),
            shards: 1,
        };
        assert!(matches!(sm.run(10_001, again.clone()), Response::Err(_)));
        for node in [1, 2] {
            sm.ok(
                10_002,
                Command::TenantPurged {
                    tenant: "t".into(),
                    node,
                    purged: Purged {
                        chunks: 3,
                        bytes: 30,
                        snapshots: 1,
                    },
                },
            );
        }
        assert!(sm.state.erasing["t"].complete(sm.state.members.keys()));
        sm.ok(10_003, again);
        assert!(!sm.state.erasing.contains_key("t"));
    }

    #[test]
    fn lease_lapses_and_another_replica_takes_over_with_a_higher_token() {
        let mut sm = Sm::new(&[1, 2, 3]);
        sm.submit("j", 1000);
        let t1 = sm.acquire("j", 1, 1000).unwrap();
        assert_eq!(t1, 1);
        // Held: nobody else gets it before the deadline (lease 5 s).
        assert!(matches!(
            sm.acquire("j", 2, 5999),
            Err(CommandError::Conflict(_))
        ));
        // Renewal moves the deadline.
        sm.ok(
            5000,
            Command::RenewLease {
                job: "j".into(),
                fence: Fence { node: 1, token: t1 },
            },
        );
        assert!(sm.acquire("j", 2, 9000).is_err());
        // Not renewed by 10 s: lapsed.
        assert_eq!(sm.state.claimable(2, 10_001).len(), 1);
        let t2 = sm.acquire("j", 2, 10_001).unwrap();
        assert_eq!(t2, 2);
        let j = &sm.state.jobs["j"];
        assert_eq!(j.lease.unwrap().holder, 2);
        assert_eq!(
            j.attempts, 1,
            "a takeover does not count as a failed attempt"
        );
    }

    #[test]
    fn a_stale_token_cannot_renew_checkpoint_finish_or_commit() {
        let mut sm = Sm::new(&[1, 2, 3]);
        sm.submit("j", 0);
        let old = sm.acquire("j", 1, 0).unwrap();
        let new = sm.acquire("j", 2, 10_000).unwrap();
        assert!(new > old);
        let stale = Fence {
            node: 1,
            token: old,
        };
        let fenced = |r: Response| matches!(r, Response::Err(CommandError::Fenced { .. }));
        assert!(fenced(sm.run(
            10_001,
            Command::RenewLease {
                job: "j".into(),
                fence: stale
            }
        )));
        assert!(fenced(sm.run(
            10_001,
            Command::SaveCheckpoint {
                job: "j".into(),
                fence: stale,
                checkpoint: Checkpoint::default(),
                progress: None,
            }
        )));
        assert!(fenced(sm.run(
            10_001,
            Command::ReleaseLease {
                job: "j".into(),
                fence: stale
            }
        )));
        assert!(fenced(sm.run(
            10_001,
            Command::FinishAttempt {
                job: "j".into(),
                fence: stale,
                outcome: Ok(()),
                jitter: 0.0,
            }
        )));
        assert!(fenced(sm.run(
            10_001,
            Command::CommitSnapshot {
                tenant: "t".into(),
                dataset: "d".into(),
                snapshot: entry("s1"),
                parent: String::new(),
                fenced_by: Some(("j".into(), stale)),
                stored_bytes: 0,
                sealed_by: None,
            }
        )));
        // A forged token above the current one is refused too.
        let forged = Fence {
            node: 2,
            token: new + 5,
        };
        assert!(fenced(sm.run(
            10_001,
            Command::RenewLease {
                job: "j".into(),
                fence: forged
            }
        )));
        assert!(sm.state.datasets.is_empty(), "nothing was committed");
        // The real holder commits.
        let cur = Fence {
            node: 2,
            token: new,
        };
        sm.ok(
            10_002,
            Command::CommitSnapshot {
                tenant: "t".into(),
                dataset: "d".into(),
                snapshot: entry("s1"),
                parent: String::new(),
                fenced_by: Some(("j".into(), cur)),
                stored_bytes: 0,
                sealed_by: None,
            },
        );
        sm.ok(
            10_003,
            Command::FinishAttempt {
                job: "j".into(),
                fence: cur,
                outcome: Ok(()),
                jitter: 0.0,
            },
        );
        assert_eq!(sm.state.jobs["j"].state, JobState::Succeeded);
        assert!(sm.state.jobs["j"].lease.is_none());
    }

    #[test]
    fn failures_back_off_then_fail_after_max_attempts() {
        let mut sm = Sm::new(&[1]);
        sm.submit("j", 0);
        let mut now = 0;
        for attempt in 1..=3 {
            let token = sm.acquire("j", 1, now).unwrap();
            let r = sm.ok(
                now,
                Command::FinishAttempt {
                    job: "j".into(),
                    fence: Fence { node: 1, token },
                    outcome: Err(("disk on fire".into(), Failure::Transient)),
                    jitter: 0.0,
                },
            );
            let Response::Job(j) = r else { panic!() };
            if attempt < 3 {
                assert_eq!(j.state, JobState::Pending);
                assert!(j.next_attempt_unix_ms > now);
                // Not before the backoff has passed.
                assert!(sm.acquire("j", 1, j.next_attempt_unix_ms - 1).is_err());
                now = j.next_attempt_unix_ms;
            } else {
                assert_eq!(j.state, JobState::Failed);
                assert_eq!(j.last_error, "disk on fire");
            }
        }
        assert!(sm.state.claimable(1, i64::MAX).is_empty());
    }

    #[test]
    fn dataset_pointer_moves_by_compare_and_set() {
        let mut sm = Sm::new(&[1]);
        let commit = |sm: &mut Sm, id: &str, parent: &str| {
            sm.run(
                0,
                Command::CommitSnapshot {
                    tenant: "t".into(),
                    dataset: "d".into(),
                    snapshot: entry(id),
                    parent: parent.into(),
                    fenced_by: None,
                    stored_bytes: 0,
                    sealed_by: None,
                },
            )
        };
        assert_eq!(commit(&mut sm, "s1", ""), Response::Ok);
        assert!(matches!(
            commit(&mut sm, "s2", ""),
            Response::Err(CommandError::Conflict(_))
        ));
        assert_eq!(commit(&mut sm, "s2", "s1"), Response::Ok);
        assert!(matches!(
            commit(&mut sm, "s3", "s1"),
            Response::Err(CommandError::Conflict(_))
        ));
        // Committing the current head again is a no-op, not a conflict.
        assert_eq!(commit(&mut sm, "s2", "s1"), Response::Ok);
        let head = &sm.state.datasets["t"]["d"];
        assert_eq!(head.snapshot, "s2");
        assert_eq!(head.history.len(), 2);
    }

    #[test]
    fn retried_requests_apply_once() {
        let mut st = ClusterState::default();
        let job = Job::new(
            "j".into(),
            "t".into(),
            "d".into(),
            src("snapshot://s"),
            vec![],
            3,
            0,
        );
        let req = Request {
            client: 9,
            seq: 1,
            now_ms: 0,
            cmd: Command::SubmitJob { job: Box::new(job) },
        };
        let first = apply(&mut st, &req);
        assert!(matches!(first, Response::Job(_)));
        assert_eq!(
            apply(&mut st, &req),
            first,
            "the retry gets the same answer"
        );
        assert_eq!(st.jobs.len(), 1);
        let older = Request {
            seq: 0,
            ..req.clone()
        };
        // seq 0 opts out of deduplication: the job exists now.
        assert!(matches!(
            apply(&mut st, &older),
            Response::Err(CommandError::Conflict(_))
        ));
    }

    #[test]
    fn quotas_refuse_what_would_exceed_them_and_commit_nothing() {
        let mut st = ClusterState::default();
        apply_cmd(
            &mut st,
            0,
            &Command::SetTenant {
                tenant: "t".into(),
                shards: 1,
            },
        )
        .unwrap();
        let quota = Quota {
            max_stored_bytes: Some(1000),
            max_jobs_in_flight: Some(1),
        };
        assert!(matches!(
            apply_cmd(
                &mut st,
                0,
                &Command::SetQuota {
                    tenant: "nope".into(),
                    quota: quota.clone()
                }
            ),
            Err(CommandError::NotFound(_))
        ));
        apply_cmd(
            &mut st,
            0,
            &Command::SetQuota {
                tenant: "t".into(),
                quota,
            },
        )
        .unwrap();
        let commit = |id: &str, parent: &str, bytes: u64| Command::CommitSnapshot {
            tenant: "t".into(),
            dataset: "d".into(),
            snapshot: SnapshotEntry {
                id: id.into(),
                parent: parent.into(),
                ..SnapshotEntry::default()
            },
            parent: parent.into(),
            fenced_by: None,
            stored_bytes: bytes,
            sealed_by: None,
        };
        apply_cmd(&mut st, 0, &commit("s1", "", 600)).unwrap();
        assert!(matches!(
            apply_cmd(&mut st, 0, &commit("s2", "s1", 500)),
            Err(CommandError::Quota(_))
        ));
        assert_eq!(st.datasets["t"]["d"].snapshot, "s1", "nothing committed");
        // Committing the head again counts nothing.
        apply_cmd(&mut st, 0, &commit("s1", "", 600)).unwrap();
        apply_cmd(&mut st, 0, &commit("s2", "s1", 400)).unwrap();
        assert_eq!(st.stored_bytes["t"], 1000);
        let job = |id: &str| Command::SubmitJob {
            job: Box::new(Job::new(
                id.into(),
                "t".into(),
                "d".into(),
                src("snapshot://s"),
                vec![],
                3,
                0,
            )),
        };
        apply_cmd(&mut st, 0, &job("a")).unwrap();
        assert!(matches!(
            apply_cmd(&mut st, 0, &job("b")),
            Err(CommandError::Quota(_))
        ));
        st.jobs.get_mut("a").unwrap().state = JobState::Succeeded;
        apply_cmd(&mut st, 0, &job("b")).unwrap();
    }

    #[test]
    fn finished_jobs_are_kept_for_a_bounded_time_and_count() {
        let mut st = ClusterState::default();
        let submit = |st: &mut ClusterState, id: String, now: i64| {
            let job = Job::new(
                id,
                "t".into(),
                "d".into(),
                src("snapshot://s"),
                vec![],
                3,
                0,
            );
            apply_cmd(st, now, &Command::SubmitJob { job: Box::new(job) }).unwrap();
        };
        for i in 0..(FINISHED_JOBS_KEPT + 5) {
            submit(&mut st, format!("done{i:05}"), i as i64);
            let j = st.jobs.get_mut(&format!("done{i:05}")).unwrap();
            j.state = JobState::Succeeded;
            j.updated_unix_ms = i as i64;
        }
        submit(&mut st, "pending".into(), 10_000);
        let finished = st.jobs.values().filter(|j| j.state.is_final()).count();
        assert_eq!(finished, FINISHED_JOBS_KEPT);
        assert!(!st.jobs.contains_key("done00000"), "the oldest went first");
        assert!(st.jobs.contains_key("pending"));
        // A week after they ended, the rest go; unfinished jobs stay.
        submit(&mut st, "later".into(), FINISHED_JOB_TTL_MS + 20_000);
        assert_eq!(st.jobs.len(), 2, "{:?}", st.jobs.keys().collect::<Vec<_>>());
    }

    #[test]
    fn sessions_are_bounded_in_bytes_and_never_apply_a_dropped_request_twice() {
        let mut st = ClusterState::default();
        let big = |client: u64, seq: u64| {
            let mut job = Job::new(
                format!("j{client}-{seq}"),
                "t".into(),
                "d".into(),
                src("snapshot://s"),
                vec![],
                3,
                0,
            );
            job.last_error = "x".repeat(64 << 10);
            Request {
                client,
                seq,
                now_ms: seq as i64,
                cmd: Command::SubmitJob { job: Box::new(job) },
            }
        };
        for seq in 1..=100 {
            assert!(matches!(apply(&mut st, &big(1, seq)), Response::Job(_)));
        }
        let s = &st.sessions[&1];
        assert!(s.bytes <= SESSION_BYTES, "{}", s.bytes);
        assert!(s.recent.len() < 100 && s.floor > 0);
        assert_eq!(
            s.bytes,
            s.recent.values().map(response_bytes).sum::<u64>(),
            "the count of bytes follows what is kept"
        );
        // A retry of a request whose answer was dropped is refused, not
        // applied again.
        assert!(matches!(
            apply(&mut st, &big(1, 1)),
            Response::Err(CommandError::Duplicate { .. })
        ));
        assert_eq!(st.jobs.len(), 100);
        // All clients together stay under their bound.
        for client in 2..40 {
            for seq in 1..=30 {
                apply(&mut st, &big(client, seq));
            }
        }
        let total: u64 = st.sessions.values().map(|s| s.bytes).sum();
        assert!(total <= ALL_SESSIONS_BYTES, "{total}");
    }

    #[test]
    fn sessions_are_bounded_per_client_and_in_number() {
        let mut st = ClusterState::default();
        for client in 0..(MAX_SESSIONS as u64 + 40) {
            for seq in 1..=3 {
                apply(
                    &mut st,
                    &Request {
                        client,
                        seq,
                        now_ms: client as i64,
                        cmd: Command::CompleteLayout { version: 99 },
                    },
                );
            }
        }
        assert_eq!(st.sessions.len(), MAX_SESSIONS);
        assert!(
            !st.sessions.contains_key(&0),
            "the longest idle client is forgotten"
        );
        let mut one = ClusterState::default();
        for seq in 1..=(SESSION_WINDOW as u64 + 10) {
            apply(
                &mut one,
                &Request {
                    client: 1,
                    seq,
                    now_ms: 0,
                    cmd: Command::CompleteLayout { version: 99 },
                },
            );
        }
        assert_eq!(one.sessions[&1].recent.len(), SESSION_WINDOW);
        // Older than everything remembered: refused rather than applied twice.
        let r = apply(
            &mut one,
            &Request {
                client: 1,
                seq: 1,
                now_ms: 0,
                cmd: Command::CompleteLayout { version: 99 },
            },
        );
        assert!(matches!(r, Response::Err(CommandError::Duplicate { .. })));
    }

    #[test]
    fn membership_changes_replan_and_keep_the_previous_layout() {
        let mut sm = Sm::new(&[1, 2, 3]);
        sm.submit("j", 0); // creates tenant t
        let v = sm.state.layout.version;
        assert!(sm.state.replicas_of("t", "d").len() == 3);
        sm.ok(
            0,
            Command::UpsertMember {
                id: 4,
                info: NodeInfo::default(),
            },
        );
        assert!(sm.state.layout.version > v);
        assert!(sm.state.previous_layout.is_some());
        assert!(sm.state.layout.load().get(&4).copied().unwrap_or(0) > 0);
        // Moving: shards with a new replica not ready yet are under-replicated.
        let moving = sm.state.under_replicated_shards();
        assert!(moving > 0);
        let v4 = sm.state.layout.version;
        sm.ok(0, Command::CompleteLayout { version: v4 });
        assert!(sm.state.previous_layout.is_none());
        assert_eq!(sm.state.under_replicated_shards(), 0);
        sm.ok(0, Command::RemoveMember { id: 2, bar: true });
        assert!(
            !sm.state.layout.load().contains_key(&2),
            "the removed node's shards moved away"
        );
        assert!(matches!(
            sm.run(0, Command::RemoveMember { id: 2, bar: true }),
            Response::Err(CommandError::NotFound(_))
        ));
        // A removed node stays out until an admin lets it back.
        let back = Command::UpsertMember {
            id: 2,
            info: NodeInfo::default(),
        };
        assert!(matches!(
            sm.run(0, back.clone()),
            Response::Err(CommandError::Invalid(_))
        ));
        assert!(!sm.state.members.contains_key(&2));
        sm.ok(0, Command::AllowRejoin { id: 2 });
        assert!(matches!(
            sm.run(0, Command::AllowRejoin { id: 2 }),
            Response::Err(CommandError::NotFound(_))
        ));
        sm.ok(0, back);
        assert!(sm.state.members.contains_key(&2));
        // Barred before the removal: it cannot come back in the meantime.
        sm.ok(0, Command::BarRejoin { id: 2 });
        assert!(matches!(
            sm.run(
                0,
                Command::UpsertMember {
                    id: 2,
                    info: NodeInfo::default()
                }
            ),
            Response::Err(CommandError::Invalid(_))
        ));
        sm.ok(0, Command::AllowRejoin { id: 2 });
        // A removal logged before `bar` existed keeps its old meaning.
        let old: Command = serde_json::from_str(r#"{"RemoveMember":{"id":2}}"#).unwrap();
        sm.ok(0, old);
        assert!(!sm.state.removed.contains(&2));
        assert!(matches!(
            sm.run(
                0,
                Command::SetTenant {
                    tenant: "t".into(),
                    shards: 2
                }
            ),
            Response::Err(CommandError::Invalid(_))
        ));
    }

    #[test]
    fn a_released_lease_makes_the_job_available_at_once() {
        let mut sm = Sm::new(&[1, 2]);
        sm.submit("j", 0);
        let token = sm.acquire("j", 1, 0).unwrap();
        sm.ok(
            10,
            Command::SaveCheckpoint {
                job: "j".into(),
                fence: Fence { node: 1, token },
                checkpoint: Checkpoint {
                    snapshot: Some("s".into()),
                    ..Default::default()
                },
                progress: None,
            },
        );
        sm.ok(
            20,
            Command::ReleaseLease {
                job: "j".into(),
                fence: Fence { node: 1, token },
            },
        );
        let j = &sm.state.jobs["j"];
        assert_eq!((j.state, j.attempts), (JobState::Pending, 0));
        assert_eq!(sm.acquire("j", 2, 21).unwrap(), token + 1);
        assert_eq!(sm.state.jobs["j"].checkpoint.snapshot.as_deref(), Some("s"));
    }

    #[test]
    fn a_new_layout_takes_effect_once_every_placed_node_is_ready() {
        let mut sm = Sm::new(&[1, 2, 3]);
        sm.submit("j", 0);
        sm.ok(
            0,
            Command::UpsertMember {
                id: 4,
                info: NodeInfo::default(),
            },
        );
        let v = sm.state.layout.version;
        assert!(sm.state.previous_layout.is_some());
        for n in [1, 2, 3] {
            sm.ok(
                0,
                Command::ReplicaReady {
                    node: n,
                    version: v,
                },
            );
            assert!(
                sm.state.previous_layout.is_some(),
                "node 4 has not caught up yet"
            );
        }
        // A stale report (older version) does not count.
        sm.ok(
            0,
            Command::ReplicaReady {
                node: 4,
                version: v - 1,
            },
        );
        assert!(sm.state.previous_layout.is_some());
        sm.ok(
            0,
            Command::ReplicaReady {
                node: 4,
                version: v,
            },
        );
        assert!(sm.state.previous_layout.is_none());
        // A further change needs fresh reports.
        sm.ok(0, Command::RemoveMember { id: 2, bar: true });
        assert!(sm.state.previous_layout.is_some());
        assert!(sm.state.ready.is_empty());
    }

    #[test]
    fn jobs_writing_one_prefix_take_turns() {
        let mut sm = Sm::new(&[1]);
        let job = |id: &str, dest: &str| {
            Job::new(
                id.into(),
                "t".into(),
                "d".into(),
                src("file:///x"),
                vec![dst(dest), dst("postgres://u@h/catalog")],
                3,
                0,
            )
        };
        for (id, dest) in [
            ("a", "s3://b/p?mirror=true"),
            ("b", "s3://b/p/"),
            ("c", "s3://b/p/inner"),
            ("d", "s3://b/other"),
        ] {
            sm.ok(
                0,
                Command::SubmitJob {
                    job: Box::new(job(id, dest)),
                },
            );
        }
        sm.acquire("a", 1, 0).unwrap();
        // Same prefix, or one inside it: wait, and are not offered.
        assert!(matches!(
            sm.acquire("b", 1, 0),
            Err(CommandError::Conflict(_))
        ));
        assert!(matches!(
            sm.acquire("c", 1, 0),
            Err(CommandError::Conflict(_))
        ));
        let offered: Vec<&str> = sm
            .state
            .claimable(1, 0)
            .iter()
            .map(|j| j.id.as_str())
            .collect();
        assert_eq!(offered, ["d"], "a shared catalog does not serialize");
        // Once a's lease lapses it no longer holds the prefix.
        let later = 1_000_000;
        assert!(sm.acquire("b", 1, later).is_ok());
    }

    #[test]
    fn fencing_tokens_grow_across_jobs() {
        let mut sm = Sm::new(&[1]);
        sm.submit("a", 0);
        sm.submit("b", 0);
        let a = sm.acquire("a", 1, 0).unwrap();
        let b = sm.acquire("b", 1, 0).unwrap();
        assert!(b > a, "a later grant on another job gets a higher token");
        // A takeover of `a` after its lease lapsed outranks both.
        let a2 = sm.acquire("a", 1, 1_000_000).unwrap();
        assert!(a2 > b);
        assert_eq!(sm.state.fence_seq, a2);
    }

    #[test]
    fn cancel_pending_and_running_jobs() {
        let mut sm = Sm::new(&[1]);
        sm.submit("a", 0);
        sm.ok(0, Command::CancelJob { job: "a".into() });
        assert_eq!(sm.state.jobs["a"].state, JobState::Cancelled);
        sm.submit("b", 0);
        let token = sm.acquire("b", 1, 0).unwrap();
        sm.ok(1, Command::CancelJob { job: "b".into() });
        assert!(sm.state.jobs["b"].cancel_requested);
        sm.ok(
            2,
            Command::FinishAttempt {
                job: "b".into(),
                fence: Fence { node: 1, token },
                outcome: Err(("cancelled".into(), Failure::Transient)),
                jitter: 0.0,
            },
        );
        assert_eq!(sm.state.jobs["b"].state, JobState::Cancelled);
    }

    #[test]
    fn a_node_outside_the_replica_set_cannot_take_the_job() {
        let mut sm = Sm::new(&[1, 2, 3, 4]);
        sm.submit("j", 0);
        let replicas = sm.state.replicas_of("t", "d");
        let outsider = [1, 2, 3, 4]
            .into_iter()
            .find(|n| !replicas.contains(n))
            .unwrap();
        assert!(matches!(
            sm.acquire("j", outsider, 0),
            Err(CommandError::Invalid(_))
        ));
        assert!(sm.state.claimable(outsider, 0).is_empty());
    }

    #[test]
    fn settings_update_validates_and_keeps_unset_fields() {
        let mut sm = Sm::new(&[1]);
        let update = SettingsUpdate {
            lease_ms: Some(2_000),
            backoff_base_ms: Some(50),
            ..Default::default()
        };
        sm.ok(0, Command::UpdateSettings { update });
        let s = &sm.state.settings;
        assert_eq!((s.lease_ms, s.backoff_base_ms), (2_000, 50));
        assert_eq!(s.backoff_max_ms, Settings::default().backoff_max_ms);
        for bad in [
            SettingsUpdate {
                lease_ms: Some(10),
                ..Default::default()
            },
            SettingsUpdate {
                backoff_base_ms: Some(120_000),
                ..Default::default()
            },
            SettingsUpdate {
                default_shards: Some(0),
                ..Default::default()
            },
        ] {
            let before = sm.state.settings.clone();
            let r = sm.run(1, Command::UpdateSettings { update: bad });
            assert!(
                matches!(r, Response::Err(CommandError::Invalid(_))),
                "{r:?}"
            );
            assert_eq!(sm.state.settings, before);
        }
        // Retries of a failed job use the new backoff.
        sm.submit("j", 0);
        let token = sm.acquire("j", 1, 0).unwrap();
        sm.ok(
            0,
            Command::FinishAttempt {
                job: "j".into(),
                fence: Fence { node: 1, token },
                outcome: Err(("boom".into(), Failure::Transient)),
                jitter: 0.0,
            },
        );
        assert_eq!(sm.state.jobs["j"].next_attempt_unix_ms, 25);
    }

    #[test]
    fn legacy_import_keeps_history_and_jobs_and_runs_once() {
        let mut sm = Sm::new(&[1]);
        let head = DatasetHead {
            snapshot: "b".into(),
            updated_unix_ms: 5,
            history: vec![entry("a"), entry("b")],
        };
        let mut waiting = Job::new(
            "w".into(),
            "acme".into(),
            "d".into(),
            src("snapshot://d"),
            vec![dst("file:///o")],
            5,
            1,
        );
        waiting.fencing_token = 7;
        waiting.attempts = 1;
        waiting.next_attempt_unix_ms = 1_000_000;
        let mut running = waiting.clone();
        running.id = "r".into();
        running.state = JobState::Running;
        running.fencing_token = 9;
        let import = Command::ImportLegacy {
            datasets: vec![("acme".into(), "d".into(), head.clone())],
            jobs: vec![waiting.clone(), running],
        };
        sm.ok(100, import.clone());
        assert_eq!(sm.state.datasets["acme"]["d"], head);
        assert!(sm.state.tenants.contains_key("acme"));
        assert_eq!(sm.state.jobs["w"], waiting);
        // The interrupted one goes back to Pending, as a restart did.
        assert_eq!(sm.state.jobs["r"].state, JobState::Pending);
        assert_eq!(sm.state.fence_seq, 9);
        // New grants go above every imported token.
        sm.ok(100, Command::CancelJob { job: "w".into() });
        assert!(sm.acquire("r", 1, 200).unwrap() > 9);
        // Importing again changes nothing already there.
        let before = sm.state.jobs.clone();
        sm.ok(300, import);
        assert_eq!(sm.state.jobs, before);
    }
}
