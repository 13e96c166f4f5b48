//! The node: one place that builds the whole system (store, CPU pool,
//! cluster handle) and the job executor that runs clone jobs on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bitclone_raft::state::{Command, CommandError, Fence, Response, SnapshotEntry};
use bitclone_storage::ingest::{self, SnapshotBuilder};
use bitclone_storage::manifest::Stored;
use bitclone_storage::sink::objects::{self, ExportProgress};
use bitclone_storage::sink::{source, Destination, Sink, SinkWrite, Source, Written};
use bitclone_storage::{
    load_manifest, read_root, ChunkId, ChunkParams, ChunkStore, CpuPool, Entries,
    Error as StoreError, Manifest, RocksOptions, RocksStore, SnapshotId, SnapshotRecord,
};

use crate::config::NodeConfig;
use crate::link::JobLink;
use bitclone_raft::cluster::now_ms;
use bitclone_raft::job::{Checkpoint, Failure, Job};
use bitclone_raft::NodeId;

/// Bad manifest pages one load repairs from replicas before giving up.
const MAX_PAGE_REPAIRS: usize = 8;

pub struct Node {
    pub config: NodeConfig,
    /// Keeps the store's keyring equal to the state's tenant keys.
    pub key_sync: std::sync::Mutex<crate::keys::KeySync>,
    /// The cold tier's bucket, if `[cold]` names one.
    pub cold: Option<Arc<bitclone_storage::cold::ColdBucket>>,
    /// One cold tier pass at a time.
    pub cold_pass: tokio::sync::Mutex<()>,
    pub cold_stats: crate::cold::ColdStats,
    pub cluster: Arc<bitclone_raft::Cluster>,
    pub store: Arc<RocksStore>,
    pub pool: CpuPool,
    pub started: Instant,
    pub bytes_ingested: AtomicU64,
    pub bytes_stored: AtomicU64,
    /// File bytes read out of this node's store for clients' downloads.
    pub bytes_served: AtomicU64,
    /// Chunks found corrupt or missing on read and replaced from a replica.
    pub chunks_repaired: AtomicU64,
    /// Chunk bytes sent to replicas over QUIC.
    pub bytes_replicated: Arc<AtomicU64>,
    /// Manifest page bytes stored here for the first time.
    pub page_bytes_stored: AtomicU64,
    /// Manifest page bytes sent to replicas.
    pub page_bytes_replicated: Arc<AtomicU64>,
    /// The free-space reserve on the node's disks.
    pub space: crate::space::Space,
    /// Leases, attempts and sink writes, counted for `/metrics`.
    pub events: crate::metrics::Events,
    /// The QUIC chunk transport, attached once bound.
    pub transport: std::sync::OnceLock<Arc<bitclone_transport::Transport>>,
    /// Set on SIGTERM: job workers take no new job and running ones stop.
    shutting_down: AtomicBool,
    /// Drained: takes no new jobs, hands back the ones it runs.
    draining: AtomicBool,
    /// Lease requests this node's workers have in flight.
    pub leasing: std::sync::atomic::AtomicUsize,
    /// Wakes idle job workers (a job was submitted here, or shutdown).
    wake: tokio::sync::Notify,
    /// Opened sinks by declared name and what it resolved to (a catalog is
    /// a connection pool).
    sinks: tokio::sync::Mutex<std::collections::HashMap<(Option<String>, Destination), Sink>>,
    /// Garbage collection and retention, counted for `/metrics`.
    pub gc: crate::gc::GcStats,
    pub scrub: crate::gc::ScrubStats,
}

/// A dataset as listings show it.
pub struct DatasetSummary {
    pub name: String,
    pub head: SnapshotId,
    pub snapshots: u64,
}

impl Node {
    pub fn open(
        config: NodeConfig,
        cluster: Arc<bitclone_raft::Cluster>,
    ) -> anyhow::Result<Arc<Node>> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let store = Arc::new(
            RocksStore::open(&config.data_dir.join("db"), &RocksOptions::default())
                .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
        );
        // Nothing of any tenant is read or written until the tenants'
        // keys are loaded from the state (`keys::sync_now`).
        store.keyring().require_load();
        let cold = match &config.cold.url {
            Some(url) => {
                let tier = Arc::new(
                    bitclone_storage::cold::ColdBucket::open(
                        url,
                        &config.cold.s3,
                        tokio::runtime::Handle::current(),
                    )
                    .with_context(|| format!("opening the cold tier {url}"))?,
                );
                store.set_cold_reader(tier.clone());
                Some(tier)
            }
            None => None,
        };
        let pool = CpuPool::new(config.cpu_threads, "bitclone-cpu")?;
        let space = crate::space::Space::new(&config.data_dir, config.disk_reserve);
        Ok(Arc::new(Node {
            key_sync: Default::default(),
            cold,
            cold_pass: Default::default(),
            cold_stats: Default::default(),
            space,
            events: Default::default(),
            config,
            cluster,
            store,
            pool,
            started: Instant::now(),
            bytes_ingested: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            bytes_replicated: Arc::default(),
            page_bytes_stored: AtomicU64::new(0),
            page_bytes_replicated: Arc::default(),
            chunks_repaired: AtomicU64::new(0),
            transport: std::sync::OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            leasing: Default::default(),
            wake: tokio::sync::Notify::new(),
            sinks: Default::default(),
            gc: Default::default(),
            scrub: Default::default(),
        }))
    }

    pub fn chunk_store(&self) -> Arc<dyn ChunkStore> {
        self.store.clone()
    }

    /// Stops taking jobs; running attempts see it at their next check.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// From now on this node takes no new jobs and its running jobs stop
    /// and release their leases (as at shutdown), until it restarts.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.wake_workers();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stopping or drained: running jobs hand their leases back.
    pub fn is_leaving(&self) -> bool {
        self.is_shutting_down() || self.is_draining()
    }

    /// Wakes the idle job workers (a job may be claimable now).
    pub fn wake_workers(&self) {
        self.wake.notify_waiters();
    }

    /// Waits until woken or until `d` passes.
    pub async fn idle(&self, d: std::time::Duration) {
        let _ = tokio::time::timeout(d, self.wake.notified()).await;
    }

    /// Waits `d`, or less if the node shuts down: for background loops
    /// that job activity must not wake.
    pub async fn pause(&self, d: std::time::Duration) {
        let until = tokio::time::Instant::now() + d;
        while !self.is_shutting_down() {
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(std::time::Duration::from_millis(500))).await;
        }
    }

    /// Why this node has stopped taking writes, if it has: its store refused
    /// a write (poisoned until a restart) or its Raft stopped.
    pub fn fatal(&self) -> Option<String> {
        if let Some(why) = self.store.poisoned() {
            return Some(format!("the store refused a write: {why}"));
        }
        self.cluster
            .fatal()
            .map(|why| format!("Raft stopped: {why}"))
    }

    /// Refuses a write at once on a node that has stopped taking writes,
    /// instead of failing it somewhere inside as if it were transient.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        match self.fatal() {
            Some(why) => Err(StoreError::Poisoned(format!(
                "node {} has stopped taking writes ({why}); restart it",
                self.cluster.id
            ))),
            None => Ok(()),
        }
    }

    /// Refuses a write of data while the node's disk is below its reserve.
    pub fn check_space(&self) -> Result<(), StoreError> {
        self.space
            .check(self.cluster.id)
            .map_err(StoreError::NoSpace)
    }

    /// Runs a blocking storage call on the CPU pool.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RocksStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        self.pool.run(move || f(&store)).await
    }

    /// Runs `f` on the cluster state after every acknowledged write
    /// (linearizable).
    pub async fn read<T>(
        &self,
        f: impl FnOnce(&bitclone_raft::state::ClusterState) -> T,
    ) -> Result<T, StoreError> {
        self.cluster.read(f).await.map_err(raft_error)
    }

    /// The latest snapshot of a dataset.
    pub async fn head(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> Result<Option<SnapshotId>, StoreError> {
        let head = self
            .read(|s| {
                s.datasets
                    .get(tenant)
                    .and_then(|d| d.get(dataset))
                    .map(|h| h.snapshot.clone())
            })
            .await?;
        head.map(|h| h.parse()).transpose()
    }

    /// The snapshots of a dataset, oldest first.
    pub async fn snapshots(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.read(|s| {
            s.datasets
                .get(tenant)
                .and_then(|d| d.get(dataset))
                .map(|h| h.history.iter().map(|e| record_of(dataset, e)).collect())
                .unwrap_or_default()
        })
        .await
    }

    /// The datasets of a tenant, by name.
    pub async fn datasets(&self, tenant: &str) -> Result<Vec<DatasetSummary>, StoreError> {
        let heads = self
            .read(|s| {
                s.datasets
                    .get(tenant)
                    .map(|d| {
                        d.iter()
                            .map(|(name, h)| (name.clone(), h.snapshot.clone(), h.history.len()))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .await?;
        heads
            .into_iter()
            .map(|(name, head, n)| {
                Ok(DatasetSummary {
                    name,
                    head: head.parse()?,
                    snapshots: n as u64,
                })
            })
            .collect()
    }

    /// Writes a command through the cluster for a client; a refusal is an
    /// error of its kind, and a node that has stopped taking writes refuses
    /// at once. (A job's lease, checkpoints and outcome go to the cluster
    /// directly: a node unfit for writes must still release them.)
    pub async fn write(&self, cmd: Command) -> Result<Response, StoreError> {
        self.check_writable()?;
        let proposed = Instant::now();
        let r = self.cluster.write(cmd).await;
        self.events
            .proposal_seconds
            .observe(proposed.elapsed().as_secs_f64());
        match r.map_err(raft_error)? {
            Response::Err(e) => Err(refused(e)),
            r => Ok(r),
        }
    }

    /// Submits a clone job through the cluster.
    pub async fn submit_job(&self, job: Job) -> Result<Job, StoreError> {
        let job = match self
            .write(Command::SubmitJob { job: Box::new(job) })
            .await?
        {
            Response::Job(j) => j,
            other => {
                return Err(StoreError::Unavailable(format!(
                    "unexpected reply {other:?}"
                )))
            }
        };
        // A worker here may take it at once instead of at its next poll.
        self.wake_workers();
        Ok(job)
    }

    /// For a snapshot (`snapshot`, or the head when empty) this node does
    /// not hold: the public API addresses of the members that do, the writer
    /// first. Reads are streamed from the first that answers.
    pub async fn remote_holders(
        &self,
        tenant: &str,
        dataset: &str,
        snapshot: &str,
    ) -> Option<Vec<String>> {
        let c = &self.cluster;
        let me = c.id;
        // One linearizable read: the snapshot meant, who wrote it, and the
        // members that hold it (the writer first, then the shard's replicas).
        // This node may be the writer and still not hold it: its store was
        // lost and it rejoined empty; the replicas have it then.
        c.read(|s| {
            let head = s.datasets.get(tenant)?.get(dataset)?;
            let id = if snapshot.is_empty() {
                head.snapshot.as_str()
            } else {
                snapshot
            };
            let e = head.history.iter().find(|e| e.id == id)?;
            let mut nodes: Vec<u64> = (e.written_by != me)
                .then_some(e.written_by)
                .into_iter()
                .collect();
            nodes.extend(
                s.replicas_of(tenant, dataset)
                    .into_iter()
                    .filter(|n| *n != me && *n != e.written_by),
            );
            if nodes.is_empty() {
                return None;
            }
            let addrs = nodes
                .iter()
                .filter_map(|n| s.members.get(n).map(|m| m.api_addr.clone()))
                .collect::<Vec<_>>();
            Some(addrs)
        })
        .await
        .ok()
        .flatten()
    }

    /// Fetches a chunk from another replica of the dataset's shard (verified
    /// by the transport), repairs the local copy with it and returns its
    /// content.
    pub async fn repair_from_replicas(
        &self,
        tenant: &str,
        dataset: &str,
        id: &ChunkId,
    ) -> Result<Vec<u8>, StoreError> {
        let replicas = self.cluster.local(|s| s.replicas_of(tenant, dataset));
        let stored = self.repair_from(&replicas, tenant, id).await?;
        let (store, t, id) = (self.store.clone(), tenant.to_string(), *id);
        self.pool.run(move || store.open(&t, &id, stored)).await
    }

    /// Fetches a chunk from the first of `peers` (this node skipped) that
    /// has it (verified by the transport), repairs the local copy and
    /// returns its stored bytes.
    pub async fn repair_from(
        &self,
        peers: &[NodeId],
        tenant: &str,
        id: &ChunkId,
    ) -> Result<Vec<u8>, StoreError> {
        let c = &self.cluster;
        let Some(t) = self.transport.get() else {
            return Err(StoreError::Unavailable(
                "no replicas: the chunk transport is not up yet".into(),
            ));
        };
        let members = c.local(|s| s.members.clone());
        let mut errors = Vec::new();
        for peer in peers.iter().copied().filter(|p| *p != c.id) {
            let Some(addr) = peer_socket(&members, peer).await else {
                continue;
            };
            match t.get(peer, addr, tenant, &[id.0]).await {
                Ok(mut v) if v.len() == 1 => {
                    let data = v.remove(0);
                    let (store, tn, d, cid) =
                        (self.store.clone(), tenant.to_string(), data.clone(), *id);
                    self.pool
                        .run(move || store.repair_chunk(&tn, &cid, &d))
                        .await?;
                    self.chunks_repaired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(chunk = %id, from = peer, "chunk was bad here; repaired from a replica");
                    return Ok(data);
                }
                Ok(_) => errors.push(format!("node {peer}: short reply")),
                Err(e) => errors.push(format!("node {peer}: {e}")),
            }
        }
        Err(StoreError::Unavailable(format!(
            "no replica could supply chunk {id}: {}",
            errors.join("; ")
        )))
    }

    /// Whether an admin created `tenant`. A tenant this node has not heard
    /// of yet is looked up on the leader before the answer is no.
    pub async fn tenant_exists(&self, tenant: &str) -> Result<bool, StoreError> {
        if self.cluster.local(|s| s.tenants.contains_key(tenant)) {
            return Ok(true);
        }
        let t = tenant.to_string();
        self.read(move |s| s.tenants.contains_key(&t)).await
    }

    /// A job by id (linearizable).
    pub async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.read(|s| s.jobs.get(id).cloned()).await
    }

    /// Resolves `snapshot` (hex id, or empty for the latest) of a dataset
    /// and checks its manifest here ([`Node::check_manifest`]).
    pub async fn resolve_snapshot(
        &self,
        tenant: &str,
        dataset: &str,
        snapshot: &str,
    ) -> Result<(SnapshotId, Stored), StoreError> {
        let id = self.resolve_snapshot_id(tenant, dataset, snapshot).await?;
        match self.check_manifest(tenant, dataset, id).await {
            Ok(stored) => Ok((id, stored)),
            Err(StoreError::NotFound { .. }) => {
                // Committed in the cluster but stored on another node.
                let writer = self.cluster.local(|s| {
                    s.datasets
                        .get(tenant)
                        .and_then(|d| d.get(dataset))
                        .and_then(|h| h.history.iter().find(|e| e.id == id.to_hex()))
                        .map(|e| {
                            (
                                e.written_by,
                                s.members.get(&e.written_by).map(|m| m.api_addr.clone()),
                            )
                        })
                });
                // NotFound (here): an uploader then sends everything, which
                // is right, since this node has none of the parent's chunks.
                Err(StoreError::NotFound {
                    kind: "snapshot",
                    name: match writer {
                        Some((n, addr)) => format!(
                            "{id} on this node (it is stored on node {n} at {}; chunks move between nodes with the QUIC data plane)",
                            addr.unwrap_or_else(|| "an address no longer in the cluster".into())
                        ),
                        None => format!("{id} on this node"),
                    },
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Resolves `snapshot` (hex id, or empty for the latest) of a dataset to
    /// the id of a snapshot committed to it.
    pub async fn resolve_snapshot_id(
        &self,
        tenant: &str,
        dataset: &str,
        snapshot: &str,
    ) -> Result<SnapshotId, StoreError> {
        bitclone_storage::path::validate_name("tenant", tenant)?;
        bitclone_storage::path::validate_name("dataset", dataset)?;
        let id = if snapshot.is_empty() {
            self.head(tenant, dataset)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    kind: "dataset",
                    name: dataset.to_string(),
                })?
        } else {
            let id: SnapshotId = snapshot.parse()?;
            // The snapshot must belong to this dataset, not just exist.
            if !self
                .snapshots(tenant, dataset)
                .await?
                .iter()
                .any(|r| r.id == id.to_hex())
            {
                return Err(StoreError::NotFound {
                    kind: "snapshot",
                    name: format!("{snapshot} of dataset {dataset}"),
                });
            }
            id
        };
        Ok(id)
    }

    /// Durably commits a snapshot built by `builder` (fenced when a job makes
    /// the commit): its pages (stored as the builder filled them) and root
    /// here and on a majority of the shard's replicas, then the dataset
    /// pointer through Raft (compare-and-set on the parent). Counts its
    /// bytes in the node's stats.
    pub async fn commit(
        &self,
        builder: SnapshotBuilder,
        fenced_by: Option<(String, Fence)>,
    ) -> Result<(SnapshotRecord, ingest::IngestStats), StoreError> {
        let span = tracing::info_span!("commit", dataset = %builder.dataset());
        tracing::Instrument::instrument(self.commit_in_span(builder, fenced_by), span).await
    }

    async fn commit_in_span(
        &self,
        builder: SnapshotBuilder,
        fenced_by: Option<(String, Fence)>,
    ) -> Result<(SnapshotRecord, ingest::IngestStats), StoreError> {
        let c = &self.cluster;
        let (tenant, dataset) = (builder.tenant().to_string(), builder.dataset().to_string());
        let t = tenant.clone();
        let built = self
            .blocking(move |store| {
                let built = builder.finish(now_ms())?;
                store.store_manifest_durable(&t, &built.id, &built.root)?;
                Ok(built)
            })
            .await?;
        // Durable on a majority of the shard's replicas before the commit.
        if let Some(t) = self.transport.get() {
            crate::replica::replicate(
                t,
                c,
                &self.store,
                (&tenant, &dataset),
                (&built.id, &built.root),
                (&self.bytes_replicated, &self.page_bytes_replicated),
                &self.events.quic,
            )
            .await?;
        }
        let stats = built.stats;
        let entry = SnapshotEntry {
            id: built.id.to_hex(),
            parent: built.parent.map(|p| p.to_hex()).unwrap_or_default(),
            files: stats.files,
            bytes: stats.bytes,
            created_unix_ms: built.created_unix_ms,
            written_by: c.id,
        };
        let job = fenced_by
            .as_ref()
            .map(|(j, _)| j.clone())
            .unwrap_or_default();
        let proposed = Instant::now();
        let resp = c
            .write(Command::CommitSnapshot {
                tenant: tenant.clone(),
                dataset: dataset.clone(),
                snapshot: entry.clone(),
                parent: entry.parent.clone(),
                fenced_by,
                stored_bytes: stats.new_bytes + stats.new_page_bytes,
                sealed_by: built.sealed_by.clone(),
            })
            .await
            .map_err(raft_error)?;
        self.events
            .proposal_seconds
            .observe(proposed.elapsed().as_secs_f64());
        crate::link::fenced_error(&job, resp)?;
        tracing::info!(
            tenant = %tenant,
            dataset = %dataset,
            snapshot = %entry.id,
            files = stats.files,
            bytes = stats.bytes,
            new_bytes = stats.new_bytes,
            "snapshot committed"
        );
        self.page_bytes_stored
            .fetch_add(stats.new_page_bytes, Ordering::Relaxed);
        self.bytes_ingested
            .fetch_add(stats.bytes, Ordering::Relaxed);
        self.bytes_stored
            .fetch_add(stats.new_bytes, Ordering::Relaxed);
        Ok((record_of(&dataset, &entry), stats))
    }

    /// Reads a snapshot's root and checks every page of it here (one page
    /// at a time), repairing a damaged or missing page from another replica
    /// of the dataset's shard, so that reading its entries in order (as an
    /// incremental build does) finds them all.
    pub async fn check_manifest(
        &self,
        tenant: &str,
        dataset: &str,
        id: SnapshotId,
    ) -> Result<Stored, StoreError> {
        self.repairing_pages(tenant, dataset, id, move |chunks, t| {
            let stored = read_root(chunks.as_ref(), t, &id)?;
            for e in Entries::new(chunks, t, stored.clone()) {
                e?;
            }
            Ok(stored)
        })
        .await
    }

    /// Loads a snapshot's manifest from this node's store, repairing pages
    /// as [`Node::check_manifest`] does.
    pub async fn load_manifest(
        &self,
        tenant: &str,
        dataset: &str,
        id: SnapshotId,
    ) -> Result<Manifest, StoreError> {
        self.repairing_pages(tenant, dataset, id, move |chunks, t| {
            load_manifest(chunks.as_ref(), t, &id)
        })
        .await
    }

    /// Runs `read` on the CPU pool; a page it finds damaged or missing here
    /// is fetched from another replica of the dataset's shard (verified
    /// against its name) and repaired, then `read` is tried again.
    async fn repairing_pages<T: Send + 'static>(
        &self,
        tenant: &str,
        dataset: &str,
        id: SnapshotId,
        read: impl Fn(Arc<dyn ChunkStore>, &str) -> Result<T, StoreError> + Clone + Send + 'static,
    ) -> Result<T, StoreError> {
        let mut repaired = 0;
        loop {
            let (t, chunks, read) = (tenant.to_string(), self.chunk_store(), read.clone());
            match self.pool.run(move || read(chunks, &t)).await {
                Err(StoreError::CorruptChunk { chunk, .. } | StoreError::MissingChunk(chunk))
                    if repaired < MAX_PAGE_REPAIRS =>
                {
                    tracing::warn!(snapshot = %id, page = %chunk, "manifest page bad here; repairing from a replica");
                    self.repair_from_replicas(tenant, dataset, &chunk).await?;
                    repaired += 1;
                }
                r => return r,
            }
        }
    }

    /// A builder for the next snapshot of a dataset: incremental against the
    /// head if its manifest is here, and always compare-and-set on the head.
    pub async fn builder_for(
        &self,
        tenant: &str,
        dataset: &str,
        chunking: Option<ChunkParams>,
    ) -> Result<(SnapshotBuilder, Option<SnapshotId>), StoreError> {
        // Before the put's first lookup, until its commit (the builder and
        // then what it built keep it).
        let hold = self.store.hold();
        let head = self.head(tenant, dataset).await?;
        let parent = match head {
            Some(id) => match self.check_manifest(tenant, dataset, id).await {
                Ok(stored) => Some((id, stored)),
                // Held by another node: no diff base here.
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let chunking = chunking
            .or(parent.as_ref().map(|(_, stored)| stored.chunking()))
            .unwrap_or(self.config.chunking);
        let builder =
            SnapshotBuilder::new(self.chunk_store(), tenant, dataset, chunking)?.holding(hold);
        let builder = match parent {
            Some((id, stored)) => builder.with_parent(id, stored),
            None => builder.with_parent_id(head),
        };
        Ok((builder, head))
    }

    /// Runs one attempt of a clone job, resuming from its checkpoint.
    pub async fn run_job(
        self: &Arc<Self>,
        job: Job,
        stop: Arc<AtomicBool>,
        link: &JobLink,
    ) -> Result<(), StoreError> {
        let mut cp = job.checkpoint.clone();
        // A snapshot checkpointed by another node whose manifest is not here
        // (not a replica, or not repaired yet) is ingested again.
        let checkpointed = match &cp.snapshot {
            Some(s) => {
                let id = s.parse::<SnapshotId>()?;
                self.check_manifest(&job.tenant, &job.dataset, id)
                    .await
                    .ok()
                    .map(|m| (id, m))
            }
            None => None,
        };
        let (snapshot, manifest) = match checkpointed {
            Some(found) => found,
            None => {
                let id = self.ingest_source(&job, stop.clone(), link).await?;
                cp = Checkpoint {
                    snapshot: Some(id.to_hex()),
                    ..Checkpoint::default()
                };
                link.save(&job.id, cp.clone()).await?;
                (
                    id,
                    self.check_manifest(&job.tenant, &job.dataset, id).await?,
                )
            }
        };
        let (files_total, bytes_total) = (manifest.files(), manifest.bytes());
        let writer = link.writer(&job);
        if job.reconcile.is_some() {
            // Checking is idempotent, and every attempt must see each
            // destination for its verdict to stand.
            cp.destinations_done = 0;
        }
        let mut repairs = 0;
        // A reconcile job's findings it was not asked to repair.
        let mut drift = Vec::new();
        while cp.destinations_done < job.destinations.len() {
            let dest = &job.destinations[cp.destinations_done];
            injected_export_fault(dest)?;
            injected_export_delay(&stop).await?;
            // A stopped attempt (cancelled, lease lost) makes no further
            // sink effects: not the next destination, not a catalog commit.
            if stop.load(Ordering::Relaxed) {
                return Err(StoreError::Cancelled);
            }
            let sink = self.sink(&job.tenant, dest).await?;
            if let Some(r) = job.reconcile {
                if r.repair {
                    // Writing an older snapshot out again would undo a newer
                    // clone to the same sinks.
                    let head = self.head(&job.tenant, &job.dataset).await?;
                    if head != Some(snapshot) {
                        return Err(StoreError::InvalidArgument(format!(
                            "snapshot {snapshot} is not the head of dataset {} any more; a \
                             repair would write it over newer data: reconcile the head",
                            job.dataset
                        )));
                    }
                }
                link.report(|p| p.phase = format!("checking {}", dest.display()));
                self.scrub.reconciled.fetch_add(1, Ordering::Relaxed);
                let verdict = crate::reconcile::check(
                    self,
                    &job.tenant,
                    &job.dataset,
                    &sink,
                    &manifest,
                    &snapshot,
                    r,
                )
                .await?;
                match verdict {
                    crate::reconcile::Verdict::Clean => {
                        tracing::info!(job = job.id, sink = sink.name(), snapshot = %snapshot, "reconcile: the sink holds the snapshot");
                        cp.destinations_done += 1;
                        link.save(&job.id, cp.clone()).await?;
                        continue;
                    }
                    crate::reconcile::Verdict::Drift(why) if !r.repair => {
                        tracing::warn!(job = job.id, drift = %why, "reconcile: drift");
                        drift.push(why);
                        cp.destinations_done += 1;
                        link.save(&job.id, cp.clone()).await?;
                        continue;
                    }
                    crate::reconcile::Verdict::Drift(why) => {
                        // Cleared: the export below writes it again.
                        tracing::warn!(job = job.id, drift = %why, "reconcile: drift, repairing");
                        self.scrub.reconcile_repairs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // As the user named it (sink://NAME/path), not where it resolves.
            let phase = format!("writing {}", dest.display());
            // Progress lives in memory; the heartbeat publishes it. A retry
            // walks the destination again and skips what is already there.
            let mut on_progress = |p: ExportProgress| {
                injected_file_delay();
                link.report(|progress| {
                    progress.phase = phase.clone();
                    progress.files_done = p.files_done;
                    progress.files_total = files_total;
                    progress.bytes_done = p.bytes_done;
                    progress.bytes_total = bytes_total;
                });
            };
            let started = Instant::now();
            let span = tracing::info_span!("sink_write", sink = %dest.display());
            let result = tracing::Instrument::instrument(
                sink.write(SinkWrite {
                    pool: &self.pool,
                    store: self.chunk_store(),
                    manifest: &manifest,
                    snapshot: &snapshot,
                    writer: &writer,
                    stop: stop.clone(),
                    on_progress: &mut on_progress,
                }),
                span,
            )
            .await;
            self.count_sink_write(&sink, &result, started.elapsed().as_secs_f64());
            match result {
                Ok(w) => {
                    tracing::info!(
                        job = job.id,
                        sink = sink.name(),
                        snapshot = %snapshot,
                        token = writer.token,
                        written = w.files_written,
                        unchanged = w.files_unchanged,
                        bytes_written = w.bytes_written,
                        deleted = w.objects_deleted,
                        already_committed = w.already_committed,
                        "sink committed"
                    );
                }
                // A bad local chunk: replace it from a replica and walk this
                // destination again (written objects are found unchanged and
                // skipped).
                Err(
                    e @ (StoreError::CorruptChunk { chunk, .. } | StoreError::MissingChunk(chunk)),
                ) if repairs < MAX_REPAIRS_PER_ATTEMPT => {
                    repairs += 1;
                    if let Err(repair) = self
                        .repair_from_replicas(&job.tenant, &job.dataset, &chunk)
                        .await
                    {
                        // No replica had it (a node on its own has none):
                        // the damage stands, and retrying will not mend it.
                        tracing::error!(chunk = %chunk, error = %repair, "could not repair a bad chunk");
                        return Err(e);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            cp.destinations_done += 1;
            link.save(&job.id, cp.clone()).await?;
        }
        if !drift.is_empty() {
            // Found again on a retry: permanent.
            return Err(StoreError::InvalidArgument(format!(
                "the sinks drifted from snapshot {snapshot} (run with repair to write it out \
                 again): {}",
                drift.join(" | ")
            )));
        }
        Ok(())
    }

    /// A destination write for `/metrics`: how long, how it ended, bytes.
    fn count_sink_write(&self, sink: &Sink, r: &Result<Written, StoreError>, seconds: f64) {
        let kind = match sink {
            Sink::Catalog(_) => "catalog",
            Sink::Objects(t) if t.url.starts_with("file://") => "dir",
            Sink::Objects(_) => "s3",
        };
        let outcome = match r {
            Ok(_) => "ok",
            Err(StoreError::Fenced(_)) => {
                crate::metrics::Events::count(&self.events.fenced);
                "fenced"
            }
            Err(StoreError::Cancelled) => "cancelled",
            Err(_) => "error",
        };
        let labels = crate::metrics::SinkLabels { kind, outcome };
        self.events
            .sink_seconds
            .get_or_create(&labels)
            .observe(seconds);
        if let Ok(w) = r {
            self.events
                .sink_bytes
                .get_or_create(&labels)
                .inc_by(w.bytes_written);
        }
    }

    /// An opened sink, kept per place: a catalog's pool is connected (and
    /// migrated) once, not once per job.
    async fn sink(&self, tenant: &str, dest: &Destination) -> Result<Sink, StoreError> {
        // Checked again whenever a job writes it, opened before or not:
        // links may have changed since the job was submitted.
        self.config
            .files
            .check_destination(tenant, dest)
            .map_err(|r| StoreError::InvalidArgument(r.0))?;
        // Resolved for every job, opened before or not: a tenant the sink
        // is not declared for, or a URL a client chose (a job stored by an
        // earlier release), is refused here and nothing is written.
        let r = self
            .config
            .sinks
            .destination(tenant, dest)
            .map_err(|r| StoreError::InvalidArgument(r.0))?;
        // By what it resolved to: a per-tenant sink's one name is a place
        // per tenant, and a shared catalog is one pool for all.
        let key = (r.sink.clone(), r.destination.clone());
        if let Some(s) = self.sinks.lock().await.get(&key) {
            return Ok(s.clone());
        }
        let s = Sink::open(&r.destination, &r.s3, r.pg_password.as_deref()).await?;
        self.sinks.lock().await.insert(key, s.clone());
        Ok(s)
    }

    /// Turns the job's source into a committed snapshot of its dataset.
    async fn ingest_source(
        &self,
        job: &Job,
        stop: Arc<AtomicBool>,
        link: &JobLink,
    ) -> Result<SnapshotId, StoreError> {
        self.check_space()?;
        // Checked again as the ingest goes (with its progress): below the
        // reserve it stops, and the attempt ends as NoSpace, to retry.
        let full: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let watch_space = {
            let (space, node, full, stop) = (
                self.space.clone(),
                self.cluster.id,
                full.clone(),
                stop.clone(),
            );
            move || {
                if let Err(why) = space.check(node) {
                    *full.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                    stop.store(true, Ordering::Relaxed);
                }
            }
        };
        let no_space = |e: StoreError| match full.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(why) => StoreError::NoSpace(why),
            None => e,
        };
        match &job.source {
            Source::Dir { path: root } => {
                self.config
                    .files
                    .check(&job.tenant, root, "source")
                    .map_err(|r| StoreError::InvalidArgument(r.0))?;
                let root = root.clone();
                let (mut builder, _) = self.builder_for(&job.tenant, &job.dataset, None).await?;
                let link2 = link.clone();
                let watch_space = watch_space.clone();
                let builder = self
                    .pool
                    .run(move || {
                        let entries = ingest::walk_dir(&root)?;
                        let files_total = entries
                            .iter()
                            .filter(|e| e.kind == Some(bitclone_storage::EntryKind::File))
                            .count() as u64;
                        let bytes_total: u64 = entries.iter().map(|e| e.size).sum();
                        let mut last = Instant::now();
                        ingest::ingest_dir(
                            &mut builder,
                            &root,
                            &entries,
                            &stop,
                            &mut |files, bytes| {
                                if last.elapsed().as_millis() >= 100 {
                                    last = Instant::now();
                                    watch_space();
                                    link2.report(|p| {
                                        *p = bitclone_raft::job::Progress {
                                            phase: "ingesting source".into(),
                                            files_done: files,
                                            files_total,
                                            bytes_done: bytes,
                                            bytes_total,
                                        };
                                    });
                                }
                            },
                        )?;
                        Ok(builder)
                    })
                    .await
                    .map_err(no_space)?;
                let (record, _) = self.commit(builder, link.fenced_by(&job.id)).await?;
                record.id.parse()
            }
            Source::Objects { .. } | Source::Declared { .. } => {
                let (location, s3) = self
                    .config
                    .sinks
                    .source(&job.tenant, &job.source)
                    .map_err(|r| StoreError::InvalidArgument(r.0))?
                    .ok_or_else(|| StoreError::InvalidArgument("not an object source".into()))?;
                let target = objects::open_location(&location, false, &s3)?;
                let (builder, _) = self.builder_for(&job.tenant, &job.dataset, None).await?;
                let link2 = link.clone();
                let phase = format!("reading {}", job.source.display());
                let mut last = Instant::now();
                let builder =
                    source::ingest_objects(&target, builder, stop, &mut |files, bytes| {
                        if last.elapsed().as_millis() >= 100 {
                            last = Instant::now();
                            watch_space();
                            link2.report(|p| {
                                p.phase = phase.clone();
                                p.files_done = files;
                                p.bytes_done = bytes;
                            });
                        }
                    })
                    .await
                    .map_err(no_space)?;
                let (record, _) = self.commit(builder, link.fenced_by(&job.id)).await?;
                record.id.parse()
            }
            Source::Snapshot { dataset, snapshot } => {
                // Before the source is resolved: garbage collection frees
                // nothing the new snapshot takes over until it is committed.
                let hold = self.store.hold();
                let snapshot = snapshot.map(|s| s.to_hex()).unwrap_or_default();
                let id = self
                    .resolve_snapshot_id(&job.tenant, dataset, &snapshot)
                    .await?;
                if *dataset == job.dataset {
                    return Ok(id);
                }
                // Cloning a snapshot into another dataset is a metadata
                // operation: the same entries and chunks, a new manifest.
                // Committed in the cluster but not (yet) here: a replica
                // still repairing, or a writer that lost its store. The
                // attempt is retried (here once repaired, or elsewhere).
                let stored = self
                    .check_manifest(&job.tenant, dataset, id)
                    .await
                    .map_err(|e| match e {
                        StoreError::NotFound { .. } => StoreError::Unavailable(format!(
                            "snapshot {id} of {dataset} is committed but not on this node yet; \
                             the attempt is retried"
                        )),
                        e => e,
                    })?;
                let head = self.head(&job.tenant, &job.dataset).await?;
                let (store, t, d) = (self.chunk_store(), job.tenant.clone(), job.dataset.clone());
                let builder = self
                    .pool
                    .run(move || {
                        let mut b = SnapshotBuilder::new(store.clone(), &t, &d, stored.chunking())?
                            .with_parent_id(head)
                            .holding(hold);
                        for e in Entries::new(store, &t, stored) {
                            b.add_taken(e?)?;
                        }
                        Ok(b)
                    })
                    .await?;
                let (record, _) = self.commit(builder, link.fenced_by(&job.id)).await?;
                record.id.parse()
            }
        }
    }
}

/// Fault injection for process-level tests, inert unless the variable is
/// set: `BITCLONE_FAULT_EXPORT_FAILURES=N` makes the first N destination
/// writes of this process fail with a transient error, so that retries,
/// backoff and cancellation run against the real binary.
fn injected_export_fault(dest: &Destination) -> Result<(), StoreError> {
    use std::sync::atomic::AtomicI64;
    use std::sync::OnceLock;
    static LEFT: OnceLock<AtomicI64> = OnceLock::new();
    let left = LEFT.get_or_init(|| {
        AtomicI64::new(
            std::env::var("BITCLONE_FAULT_EXPORT_FAILURES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    });
    if left.fetch_sub(1, Ordering::Relaxed) > 0 {
        return Err(StoreError::Io {
            op: "write (injected fault, BITCLONE_FAULT_EXPORT_FAILURES)",
            path: dest.display().into(),
            source: std::io::Error::other("injected transient failure"),
        });
    }
    Ok(())
}

/// A cluster error as the storage layer's kinds, which the API edge maps to
/// status codes: a stopped Raft makes the node unfit for writes (as a
/// poisoned store does); refusals keep their kind; the rest can go away.
pub fn raft_error(e: bitclone_raft::Error) -> StoreError {
    use bitclone_raft::Error as E;
    match e {
        E::Fatal(why) => StoreError::Poisoned(format!("Raft stopped: {why}")),
        E::Command(c) => refused(c),
        E::Refused(m) => StoreError::InvalidArgument(m),
        e => StoreError::Unavailable(e.to_string()),
    }
}

/// A command the state machine refused, as the storage layer's kinds.
pub fn refused(e: CommandError) -> StoreError {
    match e {
        CommandError::Conflict(m) => StoreError::Conflict(m),
        e @ CommandError::Fenced { .. } => StoreError::Conflict(e.to_string()),
        CommandError::NotFound(what) => StoreError::NotFound {
            kind: "record",
            name: what,
        },
        CommandError::Quota(m) => StoreError::QuotaExceeded(m),
        e => StoreError::InvalidArgument(e.to_string()),
    }
}

fn record_of(dataset: &str, e: &SnapshotEntry) -> SnapshotRecord {
    SnapshotRecord {
        id: e.id.clone(),
        dataset: dataset.to_string(),
        parent: e.parent.clone(),
        files: e.files,
        bytes: e.bytes,
        created_unix_ms: e.created_unix_ms,
    }
}

/// Test hook, inert unless set: `BITCLONE_FAULT_EXPORT_DELAY_MS=N` holds
/// every destination write back N ms (stoppable), so that process-level
/// tests can act on a job that is certainly running.
async fn injected_export_delay(stop: &AtomicBool) -> Result<(), StoreError> {
    let ms: u64 = std::env::var("BITCLONE_FAULT_EXPORT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let until = Instant::now() + std::time::Duration::from_millis(ms);
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return Err(StoreError::Cancelled);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Test hook, inert unless set: `BITCLONE_FAULT_EXPORT_FILE_DELAY_MS=N`
/// slows an object-store export down by N ms per file, so that a test can
/// kill the holder in the middle of an upload.
fn injected_file_delay() {
    use std::sync::OnceLock;
    static MS: OnceLock<u64> = OnceLock::new();
    let ms = *MS.get_or_init(|| {
        std::env::var("BITCLONE_FAULT_EXPORT_FILE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    if ms > 0 {
        // Blocking on purpose: it stalls the whole export, as a slow link would.
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Chunks one export attempt may repair from replicas before giving up.
const MAX_REPAIRS_PER_ATTEMPT: usize = 64;

/// Whether retrying can help.
pub fn classify(e: &StoreError) -> Failure {
    match e {
        StoreError::InvalidArgument(_)
        | StoreError::QuotaExceeded(_)
        | StoreError::InvalidPath { .. }
        | StoreError::NotFound { .. }
        | StoreError::Decode { .. }
        | StoreError::CorruptChunk { .. }
        | StoreError::MissingChunk(_)
        | StoreError::Fenced(_)
        | StoreError::Sink {
            permanent: true, ..
        } => Failure::Permanent,
        StoreError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::NotADirectory
                    | std::io::ErrorKind::IsADirectory
                    | std::io::ErrorKind::InvalidInput
            ) =>
        {
            Failure::Permanent
        }
        _ => Failure::Transient,
    }
}

/// A member's peer address as a socket address: parsed, or looked up when
/// it is a DNS name. A StatefulSet pod keeps its name but not its IP
/// address across a reschedule, so a name is looked up at each use.
pub async fn peer_socket(
    members: &std::collections::BTreeMap<u64, bitclone_raft::state::NodeInfo>,
    id: u64,
) -> Option<std::net::SocketAddr> {
    let addr = &members.get(&id)?.peer_addr;
    if let Ok(a) = addr.parse() {
        return Some(a);
    }
    // Bounded: a slow resolver must not hold a put's replication.
    let lookup = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::lookup_host(addr.as_str()),
    );
    match lookup.await {
        // IPv4 first: the QUIC socket binds an IPv4 wildcard by default.
        Ok(Ok(found)) => {
            let all: Vec<std::net::SocketAddr> = found.collect();
            all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
        }
        Ok(Err(e)) => {
            tracing::warn!(node = id, addr, error = %e, "cannot resolve a member's peer address");
            None
        }
        Err(_) => {
            tracing::warn!(
                node = id,
                addr,
                "resolving a member's peer address timed out"
            );
            None
        }
    }
}
