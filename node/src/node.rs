//! The node: one place that builds the whole system (store, CPU pool, jobs)
//! and the job executor that runs clone jobs on it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bitclone_raft::state::{Command, CommandError, Fence, Response, SnapshotEntry};
use bitclone_storage::export::{self, ExportProgress};
use bitclone_storage::ingest::{self, SnapshotBuilder};
use bitclone_storage::rocks::DatasetSummary;
use bitclone_storage::{catalog, restore};
use bitclone_storage::{
    ChunkParams, ChunkStore, CpuPool, Error as StoreError, Manifest, RocksOptions, RocksStore,
    SnapshotId, SnapshotRecord,
};

use crate::config::NodeConfig;
use crate::jobs::{now_ms, Jobs};
use crate::link::JobLink;
use bitclone_raft::job::{is_catalog_url, Backoff, Checkpoint, Failure, Job};

pub struct Node {
    pub config: NodeConfig,
    /// Set in cluster mode.
    pub cluster: Option<Arc<bitclone_raft::Cluster>>,
    pub node_id: String,
    pub store: Arc<RocksStore>,
    pub pool: CpuPool,
    pub jobs: Arc<Jobs>,
    pub started: Instant,
    pub bytes_ingested: AtomicU64,
    pub bytes_stored: AtomicU64,
    /// Chunks found corrupt or missing on read and replaced from a replica.
    pub chunks_repaired: AtomicU64,
    /// Chunk bytes sent to replicas over QUIC.
    pub bytes_replicated: Arc<AtomicU64>,
    /// The QUIC chunk transport (cluster mode), attached once bound.
    pub transport: std::sync::OnceLock<Arc<bitclone_transport::Transport>>,
    /// Postgres catalogs by URL, each a connection pool.
    catalogs: tokio::sync::Mutex<std::collections::HashMap<String, catalog::Catalog>>,
}

impl Node {
    pub fn open(
        config: NodeConfig,
        cluster: Option<Arc<bitclone_raft::Cluster>>,
    ) -> anyhow::Result<Arc<Node>> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let node_id = match &cluster {
            Some(c) => c.id.to_string(),
            None => load_or_create_id(&config.data_dir.join("node.id"))?,
        };
        let store = Arc::new(
            RocksStore::open(&config.data_dir.join("db"), &RocksOptions::default())
                .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
        );
        let pool = CpuPool::new(config.cpu_threads, "bitclone-cpu")?;
        let jobs = Arc::new(Jobs::load(
            store.clone(),
            pool.clone(),
            Backoff {
                base: config.backoff_base,
                max: config.backoff_max,
            },
            config.max_attempts,
        )?);
        Ok(Arc::new(Node {
            config,
            cluster,
            node_id,
            store,
            pool,
            jobs,
            started: Instant::now(),
            bytes_ingested: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            bytes_replicated: Arc::default(),
            chunks_repaired: AtomicU64::new(0),
            transport: std::sync::OnceLock::new(),
            catalogs: Default::default(),
        }))
    }

    pub fn chunk_store(&self) -> Arc<dyn ChunkStore> {
        self.store.clone()
    }

    /// Runs a blocking storage call on the CPU pool.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RocksStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        self.pool.run(move || f(&store)).await
    }

    /// The latest snapshot of a dataset (through Raft in a cluster).
    pub async fn head(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> Result<Option<SnapshotId>, StoreError> {
        match &self.cluster {
            Some(c) => {
                let head = c
                    .read(|s| {
                        s.datasets
                            .get(tenant)
                            .and_then(|d| d.get(dataset))
                            .map(|h| h.snapshot.clone())
                    })
                    .await
                    .map_err(unavailable)?;
                head.map(|h| h.parse()).transpose()
            }
            None => {
                let (t, d) = (tenant.to_string(), dataset.to_string());
                self.blocking(move |s| s.head(&t, &d)).await
            }
        }
    }

    /// The snapshots of a dataset, oldest first.
    pub async fn snapshots(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        match &self.cluster {
            Some(c) => c
                .read(|s| {
                    s.datasets
                        .get(tenant)
                        .and_then(|d| d.get(dataset))
                        .map(|h| h.history.iter().map(|e| record_of(dataset, e)).collect())
                        .unwrap_or_default()
                })
                .await
                .map_err(unavailable),
            None => {
                let (t, d) = (tenant.to_string(), dataset.to_string());
                self.blocking(move |s| s.list_snapshots(&t, &d)).await
            }
        }
    }

    /// The datasets of a tenant.
    pub async fn datasets(&self, tenant: &str) -> Result<Vec<DatasetSummary>, StoreError> {
        match &self.cluster {
            Some(c) => {
                let heads = c
                    .read(|s| {
                        s.datasets
                            .get(tenant)
                            .map(|d| {
                                d.iter()
                                    .map(|(name, h)| {
                                        (name.clone(), h.snapshot.clone(), h.history.len())
                                    })
                                    .collect::<Vec<_>>()
                            })
                            .unwrap_or_default()
                    })
                    .await
                    .map_err(unavailable)?;
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
            None => {
                let t = tenant.to_string();
                self.blocking(move |s| s.list_datasets(&t)).await
            }
        }
    }

    /// In a cluster, for a snapshot (`snapshot`, or the head when empty) this
    /// node does not hold: the public API addresses of the members that do,
    /// the writer first. Reads are streamed from the first that answers.
    pub async fn remote_holders(
        &self,
        tenant: &str,
        dataset: &str,
        snapshot: &str,
    ) -> Option<Vec<String>> {
        let c = self.cluster.as_ref()?;
        let me = c.id;
        // One linearizable read: the snapshot meant, who wrote it, and the
        // members that hold it (the writer first, then the shard's replicas).
        c.read(|s| {
            let head = s.datasets.get(tenant)?.get(dataset)?;
            let id = if snapshot.is_empty() {
                head.snapshot.as_str()
            } else {
                snapshot
            };
            let e = head.history.iter().find(|e| e.id == id)?;
            if e.written_by == me {
                return None;
            }
            let mut nodes = vec![e.written_by];
            nodes.extend(
                s.replicas_of(tenant, dataset)
                    .into_iter()
                    .filter(|n| *n != me && *n != e.written_by),
            );
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
    /// by the transport) and repairs the local copy with it.
    pub async fn repair_from_replicas(
        &self,
        tenant: &str,
        dataset: &str,
        id: &SnapshotId,
    ) -> Result<Vec<u8>, StoreError> {
        let (Some(c), Some(t)) = (&self.cluster, self.transport.get()) else {
            return Err(StoreError::Unavailable(
                "no replicas: not in a cluster".into(),
            ));
        };
        let (replicas, members) = c.local(|s| (s.replicas_of(tenant, dataset), s.members.clone()));
        let mut errors = Vec::new();
        for peer in replicas.into_iter().filter(|p| *p != c.id) {
            let Some(addr) = members.get(&peer).and_then(|m| m.peer_addr.parse().ok()) else {
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

    /// A job by id (linearizable in a cluster).
    pub async fn job(&self, id: &str) -> Result<Option<Job>, tonic::Status> {
        match &self.cluster {
            Some(c) => c
                .read(|s| s.jobs.get(id).cloned())
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string())),
            None => Ok(self.jobs.get(id)),
        }
    }

    /// Resolves `snapshot` (hex id, or empty for the latest) of a dataset.
    pub async fn resolve_snapshot(
        &self,
        tenant: &str,
        dataset: &str,
        snapshot: &str,
    ) -> Result<(SnapshotId, Manifest), StoreError> {
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
        let t = tenant.to_string();
        let m = self
            .blocking(move |store| export::load_manifest(store, &t, &id))
            .await;
        match (m, &self.cluster) {
            (Ok(m), _) => Ok((id, m)),
            (Err(StoreError::NotFound { .. }), Some(c)) => {
                // Committed in the cluster but stored on another node.
                let writer = c.local(|s| {
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
            (Err(e), _) => Err(e),
        }
    }

    /// Encodes and durably commits a manifest: locally, or in a cluster the
    /// manifest locally and the dataset pointer through Raft (compare-and-set
    /// on the parent, fenced when a job makes the commit).
    pub async fn commit_manifest(
        &self,
        manifest: Manifest,
        fenced_by: Option<(String, Fence)>,
    ) -> Result<SnapshotRecord, StoreError> {
        let Some(c) = &self.cluster else {
            return self
                .blocking(move |store| {
                    let (id, bytes) = manifest.encode_with_id()?;
                    store.commit_snapshot(&manifest, &id, &bytes)
                })
                .await;
        };
        let (id, bytes) = manifest.encode_with_id()?;
        let tenant = manifest.tenant.clone();
        let b = bytes.clone();
        self.blocking(move |store| store.store_manifest_durable(&tenant, &id, &b))
            .await?;
        // Durable on a majority of the shard's replicas before the commit.
        if let Some(t) = self.transport.get() {
            crate::replica::replicate(
                t,
                c,
                &self.store,
                &manifest,
                &id,
                &bytes,
                &self.bytes_replicated,
            )
            .await?;
        }
        let entry = SnapshotEntry {
            id: id.to_hex(),
            parent: manifest.parent.map(|p| p.to_hex()).unwrap_or_default(),
            files: manifest.file_count(),
            bytes: manifest.total_bytes(),
            created_unix_ms: manifest.created_unix_ms,
            written_by: c.id,
        };
        let resp = c
            .write(Command::CommitSnapshot {
                tenant: manifest.tenant.clone(),
                dataset: manifest.dataset.clone(),
                snapshot: entry.clone(),
                parent: entry.parent.clone(),
                fenced_by,
            })
            .await
            .map_err(unavailable)?;
        match resp {
            Response::Err(CommandError::Conflict(m)) => Err(StoreError::Conflict(m)),
            Response::Err(e @ CommandError::Fenced { .. }) => {
                tracing::warn!(error = %e, "a fenced commit was refused");
                Err(StoreError::Conflict(e.to_string()))
            }
            Response::Err(e) => Err(StoreError::InvalidArgument(e.to_string())),
            _ => Ok(record_of(&manifest.dataset, &entry)),
        }
    }

    /// Encodes and durably commits a snapshot built by `builder` (fenced when
    /// a job makes the commit) and counts its bytes in the node's stats.
    pub async fn commit(
        &self,
        builder: SnapshotBuilder,
        fenced_by: Option<(String, Fence)>,
    ) -> Result<(SnapshotRecord, ingest::IngestStats), StoreError> {
        let (manifest, stats) = builder.finish(now_ms())?;
        let record = self.commit_manifest(manifest, fenced_by).await?;
        self.bytes_ingested
            .fetch_add(stats.bytes, Ordering::Relaxed);
        self.bytes_stored
            .fetch_add(stats.new_bytes, Ordering::Relaxed);
        Ok((record, stats))
    }

    /// A builder for the next snapshot of a dataset: incremental against the
    /// head if its manifest is here, and always compare-and-set on the head.
    pub async fn builder_for(
        &self,
        tenant: &str,
        dataset: &str,
        chunking: Option<ChunkParams>,
    ) -> Result<(SnapshotBuilder, Option<SnapshotId>), StoreError> {
        let head = self.head(tenant, dataset).await?;
        let manifest = match head {
            Some(id) => {
                let t = tenant.to_string();
                match self
                    .blocking(move |store| export::load_manifest(store, &t, &id))
                    .await
                {
                    Ok(m) => Some(m),
                    // Held by another node (cluster): no diff base here.
                    Err(StoreError::NotFound { .. }) if self.cluster.is_some() => None,
                    Err(e) => return Err(e),
                }
            }
            None => None,
        };
        let chunking = chunking
            .or(manifest.as_ref().map(|m| m.chunking))
            .unwrap_or(self.config.chunking);
        let builder = SnapshotBuilder::new(tenant, dataset, head.zip(manifest), chunking)?
            .with_parent_id(head);
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
                let (t, id) = (job.tenant.clone(), s.parse::<SnapshotId>()?);
                self.blocking(move |store| Ok(export::load_manifest(store, &t, &id).ok()))
                    .await?
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
                self.resolve_snapshot(&job.tenant, &job.dataset, &id.to_hex())
                    .await?
            }
        };
        let (files_total, bytes_total) = (manifest.file_count(), manifest.total_bytes());
        let writer = link.writer(&job);
        let mut repairs = 0;
        while cp.destinations_done < job.destinations.len() {
            let url = &job.destinations[cp.destinations_done];
            injected_export_fault(url)?;
            injected_export_delay(&stop).await?;
            // A stopped attempt (cancelled, lease lost) makes no further
            // sink effects: not the next destination, not a catalog commit.
            if stop.load(Ordering::Relaxed) {
                return Err(StoreError::Cancelled);
            }
            match parse_destination(url, &self.config.s3)? {
                Destination::Catalog(url) => {
                    self.write_catalog(&url, &manifest, &snapshot, &writer)
                        .await?;
                }
                Destination::Objects(target) => {
                    export::check_create_only(&target).await?;
                    let id = job.id.clone();
                    let phase = format!("writing {}", target.url);
                    // Progress lives in memory; the link publishes it later
                    // (at the end of the attempt, or with the heartbeat in a
                    // cluster). A retry walks the destination again and
                    // skips the objects already written.
                    let mut on_progress = |p: ExportProgress| {
                        injected_file_delay();
                        link.report(&id, |progress| {
                            progress.phase = phase.clone();
                            progress.files_done = p.files_done;
                            progress.files_total = files_total;
                            progress.bytes_done = p.bytes_done;
                            progress.bytes_total = bytes_total;
                        });
                    };
                    let result = export::export_snapshot(
                        &self.pool,
                        self.chunk_store(),
                        &manifest,
                        &snapshot,
                        &target,
                        &writer,
                        stop.clone(),
                        &mut on_progress,
                    )
                    .await;
                    match result {
                        Ok(stats) => {
                            tracing::info!(
                                job = job.id,
                                sink = target.url,
                                snapshot = %snapshot,
                                token = writer.token,
                                written = stats.files_written,
                                unchanged = stats.files_unchanged,
                                bytes_written = stats.bytes_written,
                                deleted = stats.objects_deleted,
                                already_committed = stats.already_committed,
                                "sink committed"
                            );
                        }
                        // A bad local chunk: replace it from a replica and
                        // walk this destination again (written objects are
                        // found unchanged and skipped).
                        Err(
                            StoreError::CorruptChunk { chunk, .. }
                            | StoreError::MissingChunk(chunk),
                        ) if self.cluster.is_some() && repairs < MAX_REPAIRS_PER_ATTEMPT => {
                            repairs += 1;
                            self.repair_from_replicas(&job.tenant, &job.dataset, &chunk)
                                .await?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            cp.destinations_done += 1;
            link.save(&job.id, cp.clone()).await?;
        }
        Ok(())
    }

    /// Records a snapshot in a Postgres catalog, fenced by the writer's token.
    async fn write_catalog(
        &self,
        url: &str,
        manifest: &Manifest,
        snapshot: &SnapshotId,
        writer: &export::Writer,
    ) -> Result<(), StoreError> {
        let catalog = self.catalog(url).await?;
        let outcome = catalog
            .commit(&catalog::CatalogCommit {
                manifest,
                snapshot,
                job: &writer.job,
                fencing_token: writer.token,
            })
            .await?;
        tracing::info!(
            sink = catalog.redacted_url(),
            snapshot = %snapshot,
            token = writer.token,
            ?outcome,
            "catalog committed"
        );
        Ok(())
    }

    /// A pooled connection to a catalog, opened (and migrated) once per URL.
    async fn catalog(&self, url: &str) -> Result<catalog::Catalog, StoreError> {
        if let Some(c) = self.catalogs.lock().await.get(url) {
            return Ok(c.clone());
        }
        let c = catalog::Catalog::connect(url).await?;
        self.catalogs
            .lock()
            .await
            .insert(url.to_string(), c.clone());
        Ok(c)
    }

    /// Turns the job's source into a committed snapshot of its dataset.
    async fn ingest_source(
        &self,
        job: &Job,
        stop: Arc<AtomicBool>,
        link: &JobLink,
    ) -> Result<SnapshotId, StoreError> {
        match parse_source(&job.source, &self.config.s3)? {
            Source::Dir(root) => {
                let (mut builder, _) = self.builder_for(&job.tenant, &job.dataset, None).await?;
                let store = self.chunk_store();
                let (link2, id) = (link.clone(), job.id.clone());
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
                            store.as_ref(),
                            &mut builder,
                            &root,
                            &entries,
                            &stop,
                            &mut |files, bytes| {
                                if last.elapsed().as_millis() >= 100 {
                                    last = Instant::now();
                                    link2.report(&id, |p| {
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
                    .await?;
                let (record, _) = self.commit(builder, link.fenced_by(&job.id)).await?;
                record.id.parse()
            }
            Source::Objects(target) => {
                let (builder, _) = self.builder_for(&job.tenant, &job.dataset, None).await?;
                let (link2, id) = (link.clone(), job.id.clone());
                let phase = format!("reading {}", target.url);
                let mut last = Instant::now();
                let builder = restore::ingest_objects(
                    &target,
                    self.chunk_store(),
                    builder,
                    stop,
                    &mut |files, bytes| {
                        if last.elapsed().as_millis() >= 100 {
                            last = Instant::now();
                            link2.report(&id, |p| {
                                p.phase = phase.clone();
                                p.files_done = files;
                                p.bytes_done = bytes;
                            });
                        }
                    },
                )
                .await?;
                let (record, _) = self.commit(builder, link.fenced_by(&job.id)).await?;
                record.id.parse()
            }
            Source::Snapshot { dataset, snapshot } => {
                let (id, manifest) = self
                    .resolve_snapshot(&job.tenant, &dataset, snapshot.as_deref().unwrap_or(""))
                    .await?;
                if dataset == job.dataset {
                    return Ok(id);
                }
                // Cloning a snapshot into another dataset is a metadata
                // operation: the same entries and chunks, a new manifest.
                let m = Manifest {
                    dataset: job.dataset.clone(),
                    parent: self.head(&job.tenant, &job.dataset).await?,
                    created_unix_ms: now_ms(),
                    ..manifest
                };
                let record = self.commit_manifest(m, link.fenced_by(&job.id)).await?;
                record.id.parse()
            }
        }
    }
}

enum Source {
    Dir(PathBuf),
    Objects(export::Target),
    Snapshot {
        dataset: String,
        snapshot: Option<String>,
    },
}

/// Parses a clone source: `file:///abs/path`, `s3://bucket/prefix` or
/// `snapshot://NAME[@ID]`.
fn parse_source(source: &str, s3: &export::S3Options) -> Result<Source, StoreError> {
    if let Some(rest) = source.strip_prefix("snapshot://") {
        let (dataset, snapshot) = match rest.split_once('@') {
            Some((d, s)) => (d.to_string(), Some(s.to_string())),
            None => (rest.to_string(), None),
        };
        bitclone_storage::path::validate_name("dataset", &dataset)?;
        if let Some(s) = &snapshot {
            s.parse::<SnapshotId>()?;
        }
        return Ok(Source::Snapshot { dataset, snapshot });
    }
    if source.starts_with("s3://") {
        return Ok(Source::Objects(export::open_target(source, s3)?));
    }
    let url = url::Url::parse(source)
        .map_err(|e| StoreError::InvalidArgument(format!("source {source:?}: {e}")))?;
    if url.scheme() != "file" {
        return Err(StoreError::InvalidArgument(format!(
            "source {source:?}: supported sources are file:///abs/path, s3://bucket/prefix and snapshot://NAME[@ID]"
        )));
    }
    let path = url.to_file_path().map_err(|_| {
        StoreError::InvalidArgument(format!("source {source:?} is not an absolute file:// path"))
    })?;
    Ok(Source::Dir(path))
}

/// A destination as shown to users: catalog passwords are never echoed.
pub fn display_destination(url: &str) -> String {
    if is_catalog_url(url) {
        catalog::redact_url(url)
    } else {
        url.to_string()
    }
}

enum Destination {
    Objects(export::Target),
    Catalog(String),
}

/// Parses a destination: an object store (`s3://…`, `file://…`) or a
/// Postgres catalog (`postgres://…`).
fn parse_destination(url: &str, s3: &export::S3Options) -> Result<Destination, StoreError> {
    if is_catalog_url(url) {
        catalog::check_url(url)?;
        return Ok(Destination::Catalog(url.to_string()));
    }
    Ok(Destination::Objects(export::open_target(url, s3)?))
}

/// Checks a job's source and destinations before it is accepted.
pub fn validate_job_urls(
    source: &str,
    destinations: &[String],
    s3: &export::S3Options,
) -> Result<(), StoreError> {
    parse_source(source, s3)?;
    for d in destinations {
        if is_catalog_url(d) {
            catalog::check_url(d)?;
        } else {
            export::check_target(d, s3)?;
        }
    }
    Ok(())
}

/// Fault injection for process-level tests, inert unless the variable is
/// set: `BITCLONE_FAULT_EXPORT_FAILURES=N` makes the first N destination
/// writes of this process fail with a transient error, so that retries,
/// backoff and cancellation run against the real binary.
fn injected_export_fault(url: &str) -> Result<(), StoreError> {
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
            path: url.into(),
            source: std::io::Error::other("injected transient failure"),
        });
    }
    Ok(())
}

fn unavailable(e: bitclone_raft::ClusterError) -> StoreError {
    StoreError::Unavailable(e.to_string())
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

fn load_or_create_id(path: &std::path::Path) -> anyhow::Result<String> {
    if let Ok(id) = std::fs::read_to_string(path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("{:016x}", rand::random::<u64>());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &id).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}
