//! The public gRPC API (`bitclone.v1.BitClone`). Storage errors become gRPC
//! status codes here and nowhere else.

use std::io::Read;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bitclone_proto::v1 as pb;
use bitclone_proto::v1::bit_clone_server::BitClone;
use bitclone_proto::{BATCH_BYTES, BATCH_ENTRIES, DATA_FRAME_BYTES, SMALL_FILE_BYTES};
use bitclone_storage::ingest::{self, SnapshotBuilder};
use bitclone_storage::manifest::{decode_root, Page, Stored};
use bitclone_storage::path::{validate_name, validate_path};
use bitclone_storage::{
    ChunkId, ChunkParams, ChunkStore, Entries, Entry, EntryKind, Error as StoreError, SnapshotId,
    SnapshotRecord,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::{Audit, Event};
use crate::auth::{bearer, Denied, Principal, Scope, Verifier};
use crate::node::Node;
use bitclone_raft::cluster::now_ms;
use bitclone_raft::job::{Job, JobState};
use bitclone_raft::state::{Command, Response as RaftResponse};
use bitclone_storage::sink::{Destination, Source};

pub struct Api {
    pub node: Arc<Node>,
    pub auth: Arc<Verifier>,
    pub audit: Arc<Audit>,
}

/// One call's verified caller, for authorization and the audit log.
struct Call {
    who: Principal,
    request_id: String,
    /// The caller's `authorization` header, passed on when this node streams
    /// a read from another (which authorizes it again).
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

fn denied(d: Denied) -> Status {
    match d {
        Denied::NotFound(m) => Status::not_found(m),
        Denied::Permission(m) => Status::permission_denied(m),
    }
}

/// The request id a client sent (`x-request-id`, if short and plain), or a
/// new one.
fn request_id<T>(r: &Request<T>) -> String {
    r.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .and_then(bitclone_raft::context::accepted)
        .map(str::to_string)
        .unwrap_or_else(bitclone_raft::context::fresh)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Maps a storage error to the gRPC status a client can act on.
pub fn status(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NotFound { .. } => Status::not_found(msg),
        StoreError::InvalidPath { .. } | StoreError::InvalidArgument(_) => {
            Status::invalid_argument(msg)
        }
        StoreError::Conflict(_) | StoreError::Fenced(_) => Status::aborted(msg),
        StoreError::Sink { .. } => Status::failed_precondition(msg),
        StoreError::Cancelled => Status::cancelled(msg),
        StoreError::CorruptChunk { .. }
        | StoreError::MissingChunk(_)
        | StoreError::Decode { .. } => Status::data_loss(msg),
        StoreError::QuotaExceeded(_) | StoreError::NoSpace(_) => Status::resource_exhausted(msg),
        StoreError::PoolClosed | StoreError::Poisoned(_) | StoreError::Unavailable(_) => {
            Status::unavailable(msg)
        }
        StoreError::Io { .. }
        | StoreError::Rocks(_)
        | StoreError::ObjectStore(_)
        | StoreError::Panicked => Status::internal(msg),
    }
}

fn retention_of(p: pb::RetentionPolicy) -> bitclone_raft::retention::Retention {
    bitclone_raft::retention::Retention {
        keep_last: p.keep_last,
        keep_daily: p.keep_daily,
        keep_weekly: p.keep_weekly,
        keep_monthly: p.keep_monthly,
        keep_within_ms: i64::try_from(p.keep_within_seconds.saturating_mul(1000))
            .unwrap_or(i64::MAX),
    }
}

fn names(tenant: &str, dataset: &str) -> Result<(), Status> {
    validate_name("tenant", tenant).map_err(status)?;
    validate_name("dataset", dataset).map_err(status)
}

fn entry_meta(e: &Entry) -> pb::EntryMeta {
    pb::EntryMeta {
        path: e.path.clone(),
        kind: match e.kind {
            EntryKind::File => pb::EntryKind::File as i32,
            EntryKind::Dir => pb::EntryKind::Dir as i32,
            EntryKind::Symlink => pb::EntryKind::Symlink as i32,
        },
        size: e.size,
        mode: e.mode,
        mtime_ns: e.mtime_ns,
        blake3: blake3::Hash::from(e.blake3).to_hex().to_string(),
        chunks: e.chunks.len() as u32,
        target: e.target.clone().unwrap_or_default(),
    }
}

/// Destinations one clone job may write.
const MAX_DESTINATIONS: usize = 16;
/// Longest source or destination URL.
const MAX_URL_BYTES: usize = 2048;

fn too_many(n: usize) -> Status {
    Status::invalid_argument(format!(
        "{n} entries in one upload message; at most {BATCH_ENTRIES}"
    ))
}

/// Entries answered inline by an unpaged `GetManifest`: beyond this the
/// answer could outgrow a message, and the client must ask for pages.
const MAX_INLINE_ENTRIES: usize = 10_000;

fn page_refs(items: &[(ChunkId, u64)]) -> Vec<pb::PageRef> {
    items
        .iter()
        .map(|(id, entries)| pb::PageRef {
            id: id.to_hex(),
            entries: *entries,
        })
        .collect()
}

fn snapshot_info_of(id: &SnapshotId, stored: &Stored) -> pb::SnapshotInfo {
    let (dataset, parent, files, bytes, created_unix_ms) = match stored {
        Stored::V1(m) => (
            &m.dataset,
            m.parent,
            m.file_count(),
            m.total_bytes(),
            m.created_unix_ms,
        ),
        Stored::V2(r) => (&r.dataset, r.parent, r.files, r.bytes, r.created_unix_ms),
    };
    pb::SnapshotInfo {
        id: id.to_hex(),
        dataset: dataset.clone(),
        parent: parent.map(|p| p.to_hex()).unwrap_or_default(),
        files,
        bytes,
        created_unix_ms,
    }
}

fn snapshot_info(r: &SnapshotRecord) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        id: r.id.clone(),
        dataset: r.dataset.clone(),
        parent: r.parent.clone(),
        files: r.files,
        bytes: r.bytes,
        created_unix_ms: r.created_unix_ms,
    }
}

pub fn job_pb(j: &Job) -> pb::Job {
    pb::Job {
        id: j.id.clone(),
        tenant: j.tenant.clone(),
        dataset: j.dataset.clone(),
        source: j.source.display(),
        destinations: j.destinations.iter().map(Destination::display).collect(),
        state: match j.state {
            JobState::Pending => pb::JobState::Pending,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        attempts: j.attempts,
        max_attempts: j.max_attempts,
        last_error: j.last_error.clone(),
        snapshot: j.checkpoint.snapshot.clone().unwrap_or_default(),
        progress: Some(pb::JobProgress {
            phase: j.progress.phase.clone(),
            files_done: j.progress.files_done,
            files_total: j.progress.files_total,
            bytes_done: j.progress.bytes_done,
            bytes_total: j.progress.bytes_total,
        }),
        created_unix_ms: j.created_unix_ms,
        updated_unix_ms: j.updated_unix_ms,
        next_attempt_unix_ms: j.next_attempt_unix_ms,
        lease_holder: j.lease.map(|l| l.holder).unwrap_or(0),
        fencing_token: j.fencing_token,
    }
}

/// A blocking `Read` over byte frames arriving from an async task.
struct FrameReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for FrameReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// Batches of whole files an upload has on the CPU pool at once: enough to
/// keep every worker busy while the next batch arrives.
const UPLOAD_BATCHES_IN_FLIGHT: usize = 4;

/// What one upload message adds to the snapshot, in the order sent.
enum Added {
    /// Entries sent without data (directories, links, unchanged files).
    Entries(Vec<pb::EntryMeta>),
    /// Small files, just ingested.
    Files(Vec<pb::FileData>, Vec<ingest::Ingested>),
    /// A large file, just ingested.
    File(pb::EntryMeta, ingest::Ingested),
}

type BatchResult = Result<Added, StoreError>;

impl Api {
    fn record(
        &self,
        call: (&str, &str),
        tenant: &str,
        action: &str,
        target: &str,
        outcome: Result<(), &Status>,
    ) {
        let (request_id, subject) = call;
        let code;
        let (result, detail) = match outcome {
            Ok(()) => ("ok", ""),
            Err(st) => {
                code = format!("{:?}", st.code());
                (code.as_str(), st.message())
            }
        };
        self.audit.record(&Event {
            time_unix_ms: now_ms() as u64,
            request_id,
            subject,
            tenant,
            action,
            target,
            result,
            detail,
        });
    }

    /// Verifies the call's bearer token; a refusal is audited.
    fn authenticate<T>(&self, r: &Request<T>, action: &str) -> Result<Call, Status> {
        let request_id = request_id(r);
        let header = r.metadata().get("authorization");
        let verified = match header.map(|v| v.to_str()) {
            None => bearer(None),
            Some(Ok(v)) => bearer(Some(v)),
            Some(Err(_)) => Err(crate::auth::AuthError::Malformed),
        }
        .and_then(|token| self.auth.verify(token));
        match verified {
            Ok(who) => Ok(Call {
                who,
                request_id,
                bearer: header.cloned(),
            }),
            Err(e) => {
                let st = Status::unauthenticated(e.to_string());
                self.record((&request_id, ""), "", action, "", Err(&st));
                Err(st)
            }
        }
    }

    /// May the caller act with `scope` on `tenant`? A tenant the token does
    /// not grant and one that does not exist get the same NotFound. A
    /// refusal is audited.
    async fn allow(
        &self,
        call: &Call,
        action: &str,
        scope: Scope,
        tenant: &str,
        target: &str,
    ) -> Result<(), Status> {
        let refused = |st: Status| {
            self.record(
                (&call.request_id, &call.who.subject),
                tenant,
                action,
                target,
                Err(&st),
            );
            st
        };
        validate_name("tenant", tenant).map_err(|e| refused(status(e)))?;
        call.who
            .may(scope, tenant)
            .map_err(|d| refused(denied(d)))?;
        if !self.node.tenant_exists(tenant).await.map_err(status)? {
            return Err(refused(Status::not_found(format!(
                "tenant {tenant} not found"
            ))));
        }
        Ok(())
    }

    /// May the caller administer the cluster? A refusal is audited.
    fn allow_admin(&self, call: &Call, action: &str, target: &str) -> Result<(), Status> {
        call.who.may_admin(action).map_err(|d| {
            let st = denied(d);
            self.record(
                (&call.request_id, &call.who.subject),
                "",
                action,
                target,
                Err(&st),
            );
            st
        })
    }

    /// Records a mutating call's outcome.
    /// Proposes a deletion and answers what it deleted.
    async fn deleted(&self, cmd: Command) -> Result<Response<pb::DeleteResponse>, Status> {
        match self.node.write(cmd).await.map_err(status)? {
            RaftResponse::Deleted { snapshots, head } => Ok(Response::new(pb::DeleteResponse {
                deleted: snapshots,
                head,
            })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// A dataset's policy and what it would delete now.
    async fn retention(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> Result<Response<pb::RetentionResponse>, Status> {
        let now = now_ms();
        let (policy, would) = self
            .node
            .read(|s| {
                let policy = s
                    .retention
                    .get(tenant)
                    .and_then(|p| p.get(dataset))
                    .cloned()
                    .unwrap_or_default();
                (policy, s.expired(tenant, dataset, now))
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RetentionResponse {
            policy: Some(pb::RetentionPolicy {
                keep_last: policy.keep_last,
                keep_daily: policy.keep_daily,
                keep_weekly: policy.keep_weekly,
                keep_monthly: policy.keep_monthly,
                keep_within_seconds: (policy.keep_within_ms / 1000) as u64,
            }),
            would_delete: would,
        }))
    }

    fn audited<T>(
        &self,
        call: &Call,
        action: &str,
        tenant: &str,
        target: &str,
        result: &Result<T, Status>,
    ) {
        self.record(
            (&call.request_id, &call.who.subject),
            tenant,
            action,
            target,
            result.as_ref().map(|_| ()),
        );
    }

    /// A put, once the caller may write the tenant: entries in path order
    /// after `begin`, committed when the stream ends cleanly.
    async fn put(
        &self,
        mut stream: Streaming<pb::UploadRequest>,
        begin: pb::upload_request::Begin,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        if !begin.in_path_order {
            return Err(Status::failed_precondition(
                "this node builds a snapshot as its entries arrive and needs them in path order; \
                 this client sends them in another order: upgrade it (bitclone CLI or SDK)",
            ));
        }
        self.node.check_writable().map_err(status)?;
        self.node.check_space().map_err(status)?;
        let chunking = begin.chunking.as_ref().map(|c| ChunkParams {
            min_size: c.min_size,
            avg_size: c.avg_size,
            max_size: c.max_size,
        });
        let (mut builder, head) = self
            .node
            .builder_for(&begin.tenant, &begin.dataset, chunking)
            .await
            .map_err(status)?;
        let head = head.map(|h| h.to_hex()).unwrap_or_default();
        if !begin.parent.is_empty() && begin.parent != head {
            return Err(Status::aborted(format!(
                "dataset {} is at {} now, not at the parent {} the upload was built on; retry",
                begin.dataset,
                if head.is_empty() { "nothing" } else { &head },
                begin.parent
            )));
        }
        let chunking = builder.chunking();
        // Entries reach the builder in the order sent (path order): batches
        // of small files are ingested several at a time, and whatever comes
        // after one waits in this queue behind it.
        let mut batches: futures::stream::FuturesOrdered<BoxFuture<'static, BatchResult>> =
            futures::stream::FuturesOrdered::new();
        while let Some(msg) = self.next_message(&mut stream).await? {
            let msg = msg
                .msg
                .ok_or_else(|| Status::invalid_argument("empty upload message"))?;
            use pb::upload_request::Msg;
            let entry = |mut meta: pb::EntryMeta, kind: pb::EntryKind| {
                meta.kind = kind as i32;
                futures::future::ready(Ok(Added::Entries(vec![meta]))).boxed()
            };
            let queued = match msg {
                // Paths are checked as the ingested files are added.
                Msg::Files(batch) if batch.files.len() > BATCH_ENTRIES => {
                    return Err(too_many(batch.files.len()))
                }
                Msg::Entries(batch) if batch.entries.len() > BATCH_ENTRIES => {
                    return Err(too_many(batch.entries.len()))
                }
                Msg::Files(batch) => self
                    .ingest_batch(&begin.tenant, chunking, batch.files)
                    .boxed(),
                Msg::Entries(batch) => {
                    futures::future::ready(Ok(Added::Entries(batch.entries))).boxed()
                }
                Msg::Unchanged(meta) => entry(meta, pb::EntryKind::File),
                Msg::Dir(meta) => entry(meta, pb::EntryKind::Dir),
                Msg::Symlink(meta) => entry(meta, pb::EntryKind::Symlink),
                // The file streams in while the batches before it finish.
                Msg::FileStart(meta) => {
                    validate_path(&meta.path).map_err(status)?;
                    let data = self
                        .upload_file(&mut stream, &begin.tenant, chunking, &meta.path)
                        .await?;
                    futures::future::ready(Ok(Added::File(meta, data))).boxed()
                }
                Msg::Data(_) | Msg::FileEnd(_) => {
                    return Err(Status::invalid_argument("file data outside a file"))
                }
                Msg::Begin(_) => return Err(Status::invalid_argument("begin may only come first")),
            };
            if batches.len() >= UPLOAD_BATCHES_IN_FLIGHT {
                if let Some(done) = batches.next().await {
                    builder = self.add_on_pool(builder, done).await?;
                }
            }
            batches.push_back(queued);
        }
        while let Some(done) = batches.next().await {
            builder = self.add_on_pool(builder, done).await?;
        }
        // Node::commit logs it.
        let (record, stats) = self.node.commit(builder, None).await.map_err(status)?;
        Ok(Response::new(pb::UploadResponse {
            snapshot: record.id,
            files: stats.files,
            bytes: stats.bytes,
            new_chunks: stats.new_chunks,
            new_bytes: stats.new_bytes,
            chunks: stats.chunks,
            unchanged_files: stats.unchanged_files,
            symlinks: stats.symlinks,
            new_pages: stats.new_pages,
            new_page_bytes: stats.new_page_bytes,
        }))
    }

    async fn manifest(
        &self,
        r: pb::GetManifestRequest,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        validate_name("dataset", &r.dataset).map_err(status)?;
        // Not proxied: an upload through this node diffs only against a
        // manifest whose chunks are here (NotFound → a full upload).
        let id = self
            .node
            .resolve_snapshot_id(&r.tenant, &r.dataset, &r.snapshot)
            .await
            .map_err(status)?;
        let t = r.tenant.clone();
        let stored = self
            .node
            .blocking(move |store| decode_root(&store.get_manifest(&t, &id)?))
            .await
            .map_err(status)?;
        let count = match &stored {
            Stored::V1(m) => m.entries.len() as u64,
            Stored::V2(root) => root.entries,
        };
        if !r.paged && count > MAX_INLINE_ENTRIES as u64 {
            return Err(Status::out_of_range(format!(
                "snapshot {id} has {count} entries, more than one answer holds ({MAX_INLINE_ENTRIES}); ask for it paged"
            )));
        }
        let info = snapshot_info_of(&id, &stored);
        let m = match stored {
            Stored::V2(root) if r.paged => {
                return Ok(Response::new(pb::GetManifestResponse {
                    snapshot: Some(info),
                    entries: Vec::new(),
                    pages: page_refs(&root.pages),
                    level: u32::from(root.height - 1),
                    entry_count: root.entries,
                }));
            }
            // A v1 manifest has no pages: every entry inline.
            Stored::V1(m) => m,
            Stored::V2(_) => self
                .node
                .load_manifest(&r.tenant, &r.dataset, id)
                .await
                .map_err(status)?,
        };
        Ok(Response::new(pb::GetManifestResponse {
            snapshot: Some(info),
            entry_count: count,
            entries: m.entries.iter().map(entry_meta).collect(),
            ..Default::default()
        }))
    }

    async fn submit(&self, r: pb::SubmitCloneRequest) -> Result<Response<pb::Job>, Status> {
        names(&r.tenant, &r.dataset)?;
        if r.destinations.len() > MAX_DESTINATIONS {
            return Err(Status::invalid_argument(format!(
                "{} destinations; a job writes at most {MAX_DESTINATIONS}",
                r.destinations.len()
            )));
        }
        // Not quoted: a URL may hold a password.
        if let Some(u) = std::iter::once(&r.source)
            .chain(&r.destinations)
            .find(|u| u.len() > MAX_URL_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "a URL of {} bytes (at most {MAX_URL_BYTES})",
                u.len(),
            )));
        }
        let sinks = &self.node.config.sinks;
        // Before any parsing, whose errors quote the URL: one that may hold
        // a password (percent-encoded past any redaction) is refused
        // without being quoted.
        if let Some(refusal) = std::iter::once(&r.source)
            .chain(&r.destinations)
            .find_map(|u| sinks.unquotable_url_refusal(&r.tenant, u))
        {
            return Err(Status::permission_denied(refusal.0));
        }
        // Parsed once, here: the job keeps the typed values.
        let source = Source::parse(&r.source).map_err(status)?;
        let destinations = r
            .destinations
            .iter()
            .map(|d| Destination::parse(d).map(|d| sinks.placed(&r.tenant, d)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(status)?;
        let config = &self.node.config;
        config
            .files
            .check_job(&r.tenant, &source, &destinations)
            .map_err(|r| Status::permission_denied(r.0))?;
        check_job_spec(&r.tenant, &source, &destinations, &config.sinks)?;
        let max_attempts = if r.max_attempts == 0 {
            self.node.config.max_attempts
        } else {
            r.max_attempts.min(100)
        };
        let mut job = Job::new(
            format!("{:016x}", rand::random::<u64>()),
            r.tenant,
            r.dataset,
            source,
            destinations,
            max_attempts,
            now_ms(),
        );
        job.request_id = bitclone_raft::context::current().unwrap_or_default();
        job.traceparent = bitclone_raft::context::traceparent().unwrap_or_default();
        if let Some(o) = r.reconcile {
            let own =
                matches!(&job.source, Source::Snapshot { dataset, .. } if *dataset == job.dataset);
            if !own {
                return Err(Status::invalid_argument(format!(
                    "a reconcile job compares sinks with a snapshot of its dataset: give \
                     snapshot://{}[@ID] as its source",
                    job.dataset
                )));
            }
            job.reconcile = Some(bitclone_raft::job::Reconcile {
                deep: o.deep,
                repair: o.repair,
            });
        }
        let job = self.node.submit_job(job).await.map_err(status)?;
        tracing::info!(job = job.id, source = %job.source.display(), "clone job submitted");
        Ok(Response::new(job_pb(&job)))
    }

    /// Drains this node (it must be node `r.id`: a drain that a load
    /// balancer sent to another node would drain the wrong one): no new
    /// jobs, running ones hand their leases back, leadership to another
    /// voter; waits for both up to the timeout.
    async fn drain(
        &self,
        r: pb::DrainNodeRequest,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let node = &self.node;
        let c = &node.cluster;
        if r.id != c.id {
            return Err(Status::failed_precondition(format!(
                "this is node {}, not node {}: drain a node through its own address",
                c.id, r.id
            )));
        }
        let timeout = match r.timeout_ms {
            0 => std::time::Duration::from_secs(20),
            ms => std::time::Duration::from_millis(ms.into()),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let held = |c: &bitclone_raft::cluster::Cluster| -> Vec<String> {
            c.local(|s| {
                s.jobs
                    .values()
                    .filter(|j| {
                        j.state == JobState::Running
                            && j.lease.as_ref().is_some_and(|l| l.holder == c.id)
                    })
                    .map(|j| j.id.clone())
                    .collect()
            })
        };
        // Draining first, then waiting out the lease requests in flight: one
        // may still grant a lease, whose job then stops here too.
        node.start_draining();
        tracing::info!("draining: handing back jobs and leadership");
        // The jobs first: releasing their leases is a write, which needs a
        // leader, and the step-down makes this node refuse writes for a
        // moment.
        let mut seen = std::collections::BTreeSet::new();
        let still = loop {
            let now = held(c);
            seen.extend(now.iter().cloned());
            let settled = now.is_empty() && node.leasing.load(Ordering::Acquire) == 0;
            if settled || tokio::time::Instant::now() >= deadline {
                break now.len() as u32;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let handed_off = (seen.len() as u32).saturating_sub(still);
        let was_leader = c.is_leader();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let moved = c
            .step_down(left.max(std::time::Duration::from_secs(1)))
            .await
            .map_err(|e| status(crate::node::raft_error(e)))?;
        let leader_id = c.leader().unwrap_or(0);
        tracing::info!(
            jobs_handed_off = handed_off,
            jobs_still_running = still,
            was_leader,
            leadership_moved = moved,
            leader = leader_id,
            "drained"
        );
        Ok(Response::new(pb::DrainNodeResponse {
            jobs_handed_off: handed_off,
            jobs_still_running: still,
            was_leader,
            leadership_moved: was_leader && moved,
            leader_id,
        }))
    }

    async fn remove(&self, id: u64) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let c = &self.node.cluster;

        if !c.local(|s| s.members.contains_key(&id)) {
            return Err(Status::not_found(format!("node {id} is not a member")));
        }
        c.remove(id).await.map_err(|e| match e {
            // Not through the leader, or a membership change refused.
            bitclone_raft::Error::Refused(_) | bitclone_raft::Error::Command(_) => {
                Status::failed_precondition(e.to_string())
            }
            other => status(crate::node::raft_error(other)),
        })?;
        tracing::info!(node = id, "node removed from the cluster");
        Ok(Response::new(cluster_status_pb(&self.node)))
    }

    async fn set_shards(
        &self,
        r: pb::SetTenantRequest,
    ) -> Result<Response<pb::SetTenantResponse>, Status> {
        validate_name("tenant", &r.tenant).map_err(status)?;
        // 0: create with the cluster's default, or keep the count it has.
        let shards = match r.shards {
            0 => self.node.cluster.local(|s| {
                s.tenants
                    .get(&r.tenant)
                    .copied()
                    .unwrap_or(s.settings.default_shards)
            }),
            n => n,
        };
        match self
            .node
            .write(Command::SetTenant {
                tenant: r.tenant,
                shards,
            })
            .await
            .map_err(status)?
        {
            RaftResponse::Layout { version } => Ok(Response::new(pb::SetTenantResponse {
                layout_version: version,
            })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Each member's readiness: this node's own, the others' asked of them
    /// (their Stats, with the caller's token, all at once, 2 s at most).
    async fn member_readiness(&self, call: &Call, members: &mut [pb::ClusterMember]) {
        let me = self.node.cluster.id;
        let asks = members.iter().map(|m| {
            let addr = self
                .node
                .cluster
                .local(|s| s.members.get(&m.id).map(|i| i.api_addr.clone()))
                .unwrap_or_default();
            let (id, config, call) = (m.id, &self.node.config, call);
            async move {
                if id == me {
                    let r = crate::metrics::readiness_of(&self.node);
                    return Some((r.ready(), r.reasons));
                }
                let ask = async {
                    let mut c = holder_client(config, &addr).await.ok()?;
                    let mut req = Request::new(pb::StatsRequest {});
                    if let Some(b) = &call.bearer {
                        req.metadata_mut().insert("authorization", b.clone());
                    }
                    let s = c.stats(req).await.ok()?.into_inner();
                    Some((s.ready, s.not_ready))
                };
                tokio::time::timeout(std::time::Duration::from_secs(2), ask)
                    .await
                    .ok()
                    .flatten()
            }
        });
        let answers = futures::future::join_all(asks).await;
        for (m, a) in members.iter_mut().zip(answers) {
            if let Some((ready, why)) = a {
                m.reachable = true;
                m.ready = ready;
                m.not_ready = reasons_for(&call.who, why);
            }
        }
    }

    /// A job the caller may act on with `scope`. Another tenant's job is
    /// NotFound, as a missing one is; a refusal is audited.
    async fn job_for(
        &self,
        call: &Call,
        action: &str,
        scope: Scope,
        id: &str,
    ) -> Result<Job, Status> {
        let refused = |st: Status, tenant: &str| {
            self.record(
                (&call.request_id, &call.who.subject),
                tenant,
                action,
                id,
                Err(&st),
            );
            st
        };
        match self.node.job(id).await.map_err(status)? {
            Some(j) if call.who.sees(&j.tenant) => {
                call.who
                    .may(scope, &j.tenant)
                    .map_err(|d| refused(denied(d), &j.tenant))?;
                Ok(j)
            }
            _ => Err(refused(
                Status::not_found(format!("job {id} not found")),
                "",
            )),
        }
    }

    /// The next message of an upload; an upload that sends nothing for the
    /// idle timeout is ended with an error (and commits nothing).
    async fn next_message(
        &self,
        stream: &mut Streaming<pb::UploadRequest>,
    ) -> Result<Option<pb::UploadRequest>, Status> {
        // Every message may bring data to store: none below the reserve.
        self.node.check_space().map_err(status)?;
        let idle = self.node.config.upload_idle_timeout;
        match tokio::time::timeout(idle, stream.message()).await {
            Ok(message) => message,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "upload sent nothing for {}; ended, nothing committed",
                humantime::format_duration(idle)
            ))),
        }
    }

    /// Receives one file's data frames and ingests them on a blocking
    /// thread of its own: a client that stalls mid-file holds that thread,
    /// never a CPU-pool worker other requests need.
    async fn upload_file(
        &self,
        stream: &mut Streaming<pb::UploadRequest>,
        tenant: &str,
        chunking: ChunkParams,
        path: &str,
    ) -> Result<ingest::Ingested, Status> {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let abort = Arc::new(AtomicBool::new(false));
        let store = self.node.chunk_store();
        let (t, p, a) = (tenant.to_string(), path.to_string(), abort.clone());
        let work = tokio::task::spawn_blocking(move || {
            let reader = FrameReader {
                rx,
                current: Bytes::new(),
            };
            ingest::ingest_stream(
                store.as_ref(),
                &t,
                chunking,
                reader,
                Path::new(&p),
                &a,
                &mut |_| {},
            )
        });
        let feed = async {
            loop {
                let msg = self.next_message(stream).await?;
                match msg.and_then(|m| m.msg) {
                    Some(pb::upload_request::Msg::Data(d)) => {
                        if tx.send(d).await.is_err() {
                            // The ingest ended early (an error); report it below.
                            return Ok(());
                        }
                    }
                    Some(pb::upload_request::Msg::FileEnd(_)) => return Ok(()),
                    None => {
                        return Err(Status::invalid_argument(format!(
                            "upload ended in the middle of {path:?}"
                        )))
                    }
                    Some(_) => {
                        return Err(Status::invalid_argument(format!(
                            "expected data or file_end for {path:?}"
                        )))
                    }
                }
            }
        };
        let fed: Result<(), Status> = feed.await;
        if fed.is_err() {
            // Without this the reader would see a clean end of file.
            abort.store(true, Ordering::Release);
        }
        drop(tx);
        let result = work
            .await
            .map_err(|e| Status::internal(format!("ingesting {path:?}: {e}")))?;
        fed?;
        result.map_err(status)
    }

    /// [`add_batch`] on the CPU pool: adding stores the manifest pages that
    /// fill and reads the parent's, blocking RocksDB calls that do not
    /// belong on the async threads.
    async fn add_on_pool(
        &self,
        builder: SnapshotBuilder,
        done: BatchResult,
    ) -> Result<SnapshotBuilder, Status> {
        // Ahead of queued batches: this upload's next batches wait on it.
        let (builder, added) = self
            .node
            .pool
            .run_first(move || {
                let mut builder = builder;
                let added = add_batch(&mut builder, done);
                Ok((builder, added))
            })
            .await
            .map_err(status)?;
        added.map(|()| builder)
    }

    /// Cuts and stores a batch of whole files on the CPU pool.
    fn ingest_batch(
        &self,
        tenant: &str,
        chunking: ChunkParams,
        files: Vec<pb::FileData>,
    ) -> impl std::future::Future<Output = BatchResult> + Send + 'static {
        let (store, t) = (self.node.chunk_store(), tenant.to_string());
        self.node.pool.run(move || {
            let datas: Vec<&[u8]> = files.iter().map(|f| f.data.as_ref()).collect();
            let ingested = ingest::ingest_whole(store.as_ref(), &t, chunking, &datas)?;
            Ok(Added::Files(files, ingested))
        })
    }
}

/// Adds an entry sent without data: a directory, a link, or a file
/// unchanged since the parent (`kind` File).
fn add_entry(
    builder: &mut SnapshotBuilder,
    kind: pb::EntryKind,
    meta: &pb::EntryMeta,
) -> Result<(), Status> {
    let mode = meta.mode & 0o7777;
    match kind {
        pb::EntryKind::Dir => builder.add_dir(&meta.path, mode, meta.mtime_ns),
        pb::EntryKind::Symlink => {
            builder.add_symlink(&meta.path, &meta.target, mode, meta.mtime_ns)
        }
        pb::EntryKind::File => builder.add_unchanged(&meta.path, meta.size, meta.mtime_ns, mode),
    }
    .map_err(status)
}

/// Adds what one message brought, once every message before it was added.
fn add_batch(builder: &mut SnapshotBuilder, done: BatchResult) -> Result<(), Status> {
    match done.map_err(status)? {
        Added::Entries(entries) => {
            for meta in &entries {
                let kind = pb::EntryKind::try_from(meta.kind).map_err(|_| {
                    Status::invalid_argument(format!(
                        "{:?}: unknown entry kind {}",
                        meta.path, meta.kind
                    ))
                })?;
                add_entry(builder, kind, meta)?;
            }
        }
        Added::File(meta, data) => builder
            .add_file(&meta.path, meta.mode & 0o7777, meta.mtime_ns, data)
            .map_err(status)?,
        Added::Files(files, ingested) => {
            for (f, data) in files.iter().zip(ingested) {
                let meta = f
                    .meta
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("a file without its entry"))?;
                builder
                    .add_file(&meta.path, meta.mode & 0o7777, meta.mtime_ns, data)
                    .map_err(status)?;
            }
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl BitClone for Api {
    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let call = self.authenticate(&request, "put")?;
        let mut stream = request.into_inner();
        let begin = match stream.message().await?.and_then(|m| m.msg) {
            Some(pb::upload_request::Msg::Begin(b)) => b,
            _ => {
                return Err(Status::invalid_argument(
                    "an upload must start with a begin message",
                ))
            }
        };
        let (tenant, dataset) = (begin.tenant.clone(), begin.dataset.clone());
        self.allow(&call, "put", Scope::Write, &tenant, &dataset)
            .await?;
        validate_name("dataset", &dataset).map_err(status)?;
        // A tenant at its quota is refused before anything is sent.
        let full = self.node.cluster.local(|s| {
            let used = s.stored_bytes.get(&tenant).copied().unwrap_or(0);
            let max = s.quotas.get(&tenant).and_then(|q| q.max_stored_bytes);
            max.filter(|m| used >= *m).map(|m| (used, m))
        });
        if let Some((used, max)) = full {
            let st = Status::resource_exhausted(format!(
                "quota exceeded: tenant {tenant} stores {used} bytes, its quota is {max}"
            ));
            self.audited(&call, "put", &tenant, &dataset, &Err::<(), _>(st.clone()));
            return Err(st);
        }
        let result = self.put(stream, begin).await;
        self.audited(&call, "put", &tenant, &dataset, &result);
        result
    }

    async fn get_manifest(
        &self,
        request: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        let call = self.authenticate(&request, "get-manifest")?;
        let r = request.into_inner();
        self.allow(&call, "get-manifest", Scope::Read, &r.tenant, &r.dataset)
            .await?;
        self.manifest(r).await
    }
    async fn get_manifest_page(
        &self,
        request: Request<pb::GetManifestPageRequest>,
    ) -> Result<Response<pb::ManifestPage>, Status> {
        let call = self.authenticate(&request, "get-manifest-page")?;
        let r = request.into_inner();
        self.allow(&call, "get-manifest-page", Scope::Read, &r.tenant, &r.page)
            .await?;
        let id: ChunkId = r.page.parse().map_err(status)?;
        let level = u8::try_from(r.level)
            .map_err(|_| Status::invalid_argument(format!("no page level {}", r.level)))?;
        let t = r.tenant.clone();
        // A tenant reads only its own pages (they are its chunks); a page
        // that does not decode at the level asked for is refused.
        let page = self
            .node
            .blocking(move |store| Page::decode(&id, level, &store.get_chunk(&t, &id)?))
            .await
            .map_err(|e| match e {
                StoreError::MissingChunk(_) => Status::not_found(format!("manifest page {id}")),
                e => status(e),
            })?;
        let (pages, entries) = match page {
            Page::Index(items) => (page_refs(&items), Vec::new()),
            Page::Leaf(entries) => (Vec::new(), entries.iter().map(entry_meta).collect()),
        };
        Ok(Response::new(pb::ManifestPage {
            id: id.to_hex(),
            level: r.level,
            pages,
            entries,
        }))
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let call = self.authenticate(&request, "list-datasets")?;
        let tenant = request.into_inner().tenant;
        self.allow(&call, "list-datasets", Scope::Read, &tenant, "")
            .await?;
        let list = self.node.datasets(&tenant).await.map_err(status)?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: list
                .into_iter()
                .map(|d| pb::DatasetInfo {
                    name: d.name,
                    latest_snapshot: d.head.to_hex(),
                    snapshots: d.snapshots,
                })
                .collect(),
        }))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let call = self.authenticate(&request, "list-snapshots")?;
        let r = request.into_inner();
        self.allow(&call, "list-snapshots", Scope::Read, &r.tenant, &r.dataset)
            .await?;
        names(&r.tenant, &r.dataset)?;
        let list = self
            .node
            .snapshots(&r.tenant, &r.dataset)
            .await
            .map_err(status)?;
        if list.is_empty() {
            return Err(Status::not_found(format!(
                "dataset {} not found",
                r.dataset
            )));
        }
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: list.iter().map(snapshot_info).collect(),
        }))
    }

    type DownloadStream = BoxStream<pb::DownloadResponse>;

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let call = self.authenticate(&request, "get")?;
        let r = request.into_inner();
        self.allow(&call, "get", Scope::Read, &r.tenant, &r.dataset)
            .await?;
        names(&r.tenant, &r.dataset)?;
        let (id, stored) = match self
            .node
            .resolve_snapshot(&r.tenant, &r.dataset, &r.snapshot)
            .await
        {
            Ok(found) => found,
            // Not here: stream it from the first member
            // holding it that answers.
            Err(e @ StoreError::NotFound { .. }) => {
                let Some(holders) = self
                    .node
                    .remote_holders(&r.tenant, &r.dataset, &r.snapshot)
                    .await
                else {
                    return Err(status(e));
                };
                let mut last = Status::unavailable("no member holding this snapshot is known");
                for addr in holders {
                    let attempt = async {
                        let mut c = holder_client(&self.node.config, &addr).await?;
                        let mut forwarded = Request::new(r.clone());
                        if let Some(b) = &call.bearer {
                            forwarded.metadata_mut().insert("authorization", b.clone());
                        }
                        forwarded.metadata_mut().insert(
                            "x-request-id",
                            call.request_id
                                .parse()
                                .map_err(|_| Status::internal("request id"))?,
                        );
                        c.download(forwarded).await
                    };
                    match attempt.await {
                        Ok(resp) => return Ok(Response::new(Box::pin(resp.into_inner()))),
                        Err(e) => last = e,
                    }
                }
                return Err(last);
            }
            Err(e) => return Err(status(e)),
        };
        let (tx, rx) = mpsc::channel::<Result<pb::DownloadResponse, Status>>(8);
        let store = self.node.chunk_store();
        let info = snapshot_info_of(&id, &stored);
        // Read a page at a time as the stream goes: no manifest held whole.
        let entries = Entries::new(store.clone(), &r.tenant, stored);
        // A long-lived producer: a blocking thread of its own rather than a
        // CPU pool worker, so slow readers cannot starve ingest.
        let (node, handle) = (self.node.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || {
            use pb::download_response::Msg;
            let send = |m: Msg| {
                tx.blocking_send(Ok(pb::DownloadResponse { msg: Some(m) }))
                    .is_ok()
            };
            // A chunk, verified; a bad or missing one is never served: it
            // is fetched from a replica and repaired here. `None`: the
            // error went to the client.
            let served = |d: Vec<u8>| {
                node.bytes_served
                    .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Some(Bytes::from(d))
            };
            let chunk = |e: &Entry, id: &ChunkId| -> Option<Bytes> {
                let err = match store.get_chunk(&r.tenant, id) {
                    Ok(d) => return served(d),
                    Err(err) => err,
                };
                let detail = match &err {
                    StoreError::CorruptChunk { .. } | StoreError::MissingChunk(_) => {
                        tracing::error!(chunk = %id, error = %err, "bad chunk on read");
                        match handle.block_on(node.repair_from_replicas(&r.tenant, &r.dataset, id))
                        {
                            Ok(d) => return served(d),
                            Err(repair) => format!("{err}; {repair}"),
                        }
                    }
                    _ => {
                        tracing::error!(path = e.path, error = %err, "download failed");
                        err.to_string()
                    }
                };
                let _ = tx.blocking_send(Err(Status::data_loss(format!(
                    "reading {:?}: {detail}",
                    e.path
                ))));
                None
            };
            if !send(Msg::Snapshot(info)) {
                return;
            }
            // Small files go whole, many to a message.
            let mut batch: Vec<pb::FileData> = Vec::new();
            let mut batch_bytes = 0usize;
            for e in entries {
                let e = match e {
                    Ok(e) => e,
                    Err(err) => {
                        tracing::error!(error = %err, "download failed: a manifest page");
                        let _ = tx.blocking_send(Err(Status::data_loss(format!(
                            "reading the manifest: {err}"
                        ))));
                        return;
                    }
                };
                let e = &e;
                let meta = entry_meta(e);
                let sent = match e.kind {
                    EntryKind::Dir => send(Msg::Dir(meta)),
                    EntryKind::Symlink => send(Msg::Symlink(meta)),
                    EntryKind::File if e.size <= SMALL_FILE_BYTES => {
                        // Most small files are one chunk: sent as read.
                        let data = if let [only] = e.chunks.as_slice() {
                            let Some(d) = chunk(e, &only.id) else { return };
                            d
                        } else {
                            let mut data = Vec::with_capacity(e.size as usize);
                            for c in &e.chunks {
                                let Some(d) = chunk(e, &c.id) else { return };
                                data.extend_from_slice(&d);
                            }
                            Bytes::from(data)
                        };
                        batch_bytes += data.len();
                        batch.push(pb::FileData {
                            meta: Some(meta),
                            data,
                        });
                        if batch_bytes < BATCH_BYTES && batch.len() < BATCH_ENTRIES {
                            continue;
                        }
                        batch_bytes = 0;
                        send(Msg::Files(pb::FileBatch {
                            files: std::mem::take(&mut batch),
                        }))
                    }
                    EntryKind::File => {
                        if !send(Msg::FileStart(meta.clone())) {
                            return;
                        }
                        for c in &e.chunks {
                            let Some(mut rest) = chunk(e, &c.id) else {
                                return;
                            };
                            while !rest.is_empty() {
                                let frame = rest.split_to(rest.len().min(DATA_FRAME_BYTES));
                                if !send(Msg::Data(frame)) {
                                    return;
                                }
                            }
                        }
                        send(Msg::FileEnd(meta))
                    }
                };
                if !sent {
                    return;
                }
            }
            if !batch.is_empty() {
                send(Msg::Files(pb::FileBatch { files: batch }));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit_clone(
        &self,
        request: Request<pb::SubmitCloneRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let call = self.authenticate(&request, "clone")?;
        let r = request.into_inner();
        let (tenant, dataset) = (r.tenant.clone(), r.dataset.clone());
        self.allow(&call, "clone", Scope::Write, &tenant, &dataset)
            .await?;
        let result = self.submit(r).await;
        self.audited(&call, "clone", &tenant, &dataset, &result);
        result
    }
    async fn get_job(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let call = self.authenticate(&request, "get-job")?;
        let id = request.into_inner().id;
        let j = self.job_for(&call, "get-job", Scope::Read, &id).await?;
        Ok(Response::new(job_pb(&j)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let call = self.authenticate(&request, "list-jobs")?;
        let tenant = request.into_inner().tenant;
        self.allow(&call, "list-jobs", Scope::Read, &tenant, "")
            .await?;
        let jobs = self
            .node
            .read(|s| {
                let mut v: Vec<Job> = s
                    .jobs
                    .values()
                    .filter(|j| j.tenant == tenant)
                    .cloned()
                    .collect();
                v.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
                v
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(job_pb).collect(),
        }))
    }

    type WatchJobStream = BoxStream<pb::Job>;

    async fn watch_job(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let call = self.authenticate(&request, "watch-job")?;
        let id = request.into_inner().id;
        let first = self.job_for(&call, "watch-job", Scope::Read, &id).await?;
        let c = self.node.cluster.clone();
        // The replicated job changes by Raft entries; follow this node's
        // copy of it (it is at least as new as the read above).
        let stream = async_stream(
            move |tx: mpsc::Sender<Result<pb::Job, Status>>| async move {
                let mut last = first;
                if tx.send(Ok(job_pb(&last))).await.is_err() {
                    return;
                }
                while !last.state.is_final() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    let Some(j) = c.local(|s| s.jobs.get(&id).cloned()) else {
                        return;
                    };
                    if j != last {
                        if tx.send(Ok(job_pb(&j))).await.is_err() {
                            return;
                        }
                        last = j;
                    }
                }
            },
        );
        Ok(Response::new(stream))
    }

    async fn cancel_job(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let call = self.authenticate(&request, "cancel")?;
        let id = request.into_inner().id;
        let j = self.job_for(&call, "cancel", Scope::Write, &id).await?;
        let result = match self
            .node
            .write(Command::CancelJob { job: id.clone() })
            .await
        {
            Ok(RaftResponse::Job(j)) => Ok(Response::new(job_pb(&j))),
            Err(StoreError::NotFound { .. }) => {
                Err(Status::not_found(format!("job {id} not found")))
            }
            Err(e) => Err(status(e)),
            Ok(other) => Err(Status::internal(format!("unexpected reply {other:?}"))),
        };
        self.audited(&call, "cancel", &j.tenant, &id, &result);
        result
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let call = self.authenticate(&request, "cluster-status")?;
        let mut st = cluster_status_for(&self.node, &call.who);
        self.member_readiness(&call, &mut st.members).await;
        Ok(Response::new(st))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let call = self.authenticate(&request, "remove-node")?;
        let id = request.into_inner().id;
        self.allow_admin(&call, "remove-node", &id.to_string())?;
        let result = self.remove(id).await;
        self.audited(&call, "remove-node", "", &id.to_string(), &result);
        result
    }
    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let call = self.authenticate(&request, "drain-node")?;
        let r = request.into_inner();
        let target = r.id.to_string();
        self.allow_admin(&call, "drain-node", &target)?;
        let result = self.drain(r).await;
        self.audited(&call, "drain-node", "", &target, &result);
        result
    }
    async fn set_quota(
        &self,
        request: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::SetQuotaResponse>, Status> {
        let call = self.authenticate(&request, "set-quota")?;
        let r = request.into_inner();
        let tenant = r.tenant.clone();
        self.allow_admin(&call, "set-quota", &tenant)?;
        let quota = bitclone_raft::state::Quota {
            max_stored_bytes: (r.max_stored_bytes > 0).then_some(r.max_stored_bytes),
            max_jobs_in_flight: (r.max_jobs_in_flight > 0).then_some(r.max_jobs_in_flight),
        };
        let result = async {
            validate_name("tenant", &tenant).map_err(status)?;
            self.node
                .write(Command::SetQuota {
                    tenant: tenant.clone(),
                    quota,
                })
                .await
                .map_err(status)?;
            let stored_bytes = self
                .node
                .cluster
                .local(|s| s.stored_bytes.get(&tenant).copied().unwrap_or(0));
            Ok(Response::new(pb::SetQuotaResponse { stored_bytes }))
        }
        .await;
        self.audited(&call, "set-quota", &tenant, &tenant, &result);
        result
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let call = self.authenticate(&request, "delete-snapshot")?;
        let r = request.into_inner();
        let target = format!("{}@{}", r.dataset, r.snapshot);
        self.allow(&call, "delete-snapshot", Scope::Write, &r.tenant, &target)
            .await?;
        let result = async {
            names(&r.tenant, &r.dataset)?;
            // Whole ids only: a prefix could name another snapshot than the
            // caller looked at.
            let id: SnapshotId = r.snapshot.parse().map_err(status)?;
            self.deleted(Command::DeleteSnapshot {
                tenant: r.tenant.clone(),
                dataset: r.dataset.clone(),
                snapshot: id.to_hex(),
            })
            .await
        }
        .await;
        self.audited(&call, "delete-snapshot", &r.tenant, &target, &result);
        result
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let call = self.authenticate(&request, "delete-dataset")?;
        let r = request.into_inner();
        self.allow(&call, "delete-dataset", Scope::Write, &r.tenant, &r.dataset)
            .await?;
        let result = async {
            names(&r.tenant, &r.dataset)?;
            self.deleted(Command::DeleteDataset {
                tenant: r.tenant.clone(),
                dataset: r.dataset.clone(),
            })
            .await
        }
        .await;
        self.audited(&call, "delete-dataset", &r.tenant, &r.dataset, &result);
        result
    }

    async fn set_retention(
        &self,
        request: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::RetentionResponse>, Status> {
        let call = self.authenticate(&request, "set-retention")?;
        let r = request.into_inner();
        self.allow(&call, "set-retention", Scope::Write, &r.tenant, &r.dataset)
            .await?;
        let result = async {
            names(&r.tenant, &r.dataset)?;
            let policy = retention_of(r.policy.unwrap_or_default());
            self.node
                .write(Command::SetRetention {
                    tenant: r.tenant.clone(),
                    dataset: r.dataset.clone(),
                    policy,
                })
                .await
                .map_err(status)?;
            self.retention(&r.tenant, &r.dataset).await
        }
        .await;
        self.audited(&call, "set-retention", &r.tenant, &r.dataset, &result);
        result
    }

    async fn get_retention(
        &self,
        request: Request<pb::GetRetentionRequest>,
    ) -> Result<Response<pb::RetentionResponse>, Status> {
        let call = self.authenticate(&request, "get-retention")?;
        let r = request.into_inner();
        self.allow(&call, "get-retention", Scope::Read, &r.tenant, &r.dataset)
            .await?;
        names(&r.tenant, &r.dataset)?;
        self.retention(&r.tenant, &r.dataset).await
    }

    async fn collect_garbage(
        &self,
        request: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let call = self.authenticate(&request, "gc")?;
        let dry_run = request.into_inner().dry_run;
        self.allow_admin(&call, "gc", "")?;
        let result = async {
            let before = self.node.store.stats().map_err(status)?.chunk_bytes;
            let r = crate::gc::collect(&self.node, dry_run)
                .await
                .map_err(status)?;
            let after = self.node.store.stats().map_err(status)?.chunk_bytes;
            Ok(Response::new(pb::CollectGarbageResponse {
                node: self.node.cluster.id,
                roots: r.roots,
                roots_absent: r.roots_absent,
                examined: r.examined,
                live: r.live,
                waiting: r.waiting,
                waiting_bytes: r.waiting_bytes,
                freed: r.freed,
                freed_bytes: r.freed_bytes,
                roots_freed: r.roots_freed,
                marked: r.marked,
                pages_read: r.pages_read,
                seconds: (r.mark_time + r.sweep_time).as_secs_f64(),
                dry_run,
                store_bytes_before: before,
                store_bytes_after: after,
            }))
        }
        .await;
        self.audited(
            &call,
            "gc",
            "",
            if dry_run { "dry-run" } else { "" },
            &result,
        );
        result
    }

    async fn scrub(
        &self,
        request: Request<pb::ScrubRequest>,
    ) -> Result<Response<pb::ScrubResponse>, Status> {
        let call = self.authenticate(&request, "scrub")?;
        self.allow_admin(&call, "scrub", "")?;
        let result = async {
            let s = crate::gc::scrub(&self.node).await.map_err(status)?;
            let r = &s.report;
            Ok(Response::new(pb::ScrubResponse {
                node: self.node.cluster.id,
                chunks: r.chunks,
                bytes: r.bytes,
                roots: r.roots,
                bad: (r.bad.len() + r.bad_roots.len()) as u64,
                repaired: s.repaired,
                unrepaired: s
                    .unrepaired
                    .into_iter()
                    .map(|(tenant, id, error)| pb::ScrubProblem { tenant, id, error })
                    .collect(),
                seconds: r.seconds,
            }))
        }
        .await;
        self.audited(&call, "scrub", "", "", &result);
        result
    }

    async fn tier(
        &self,
        request: Request<pb::TierRequest>,
    ) -> Result<Response<pb::TierResponse>, Status> {
        let call = self.authenticate(&request, "tier")?;
        self.allow_admin(&call, "tier", "")?;
        let result = async {
            let r = crate::cold::tier_once(&self.node).await.map_err(status)?;
            Ok(Response::new(pb::TierResponse {
                node: self.node.cluster.id,
                packs: r.packs,
                chunks: r.chunks,
                bytes: r.bytes,
                evicted: r.evicted,
                seconds: r.seconds,
            }))
        }
        .await;
        self.audited(&call, "tier", "", "", &result);
        result
    }

    async fn tenant_keys(
        &self,
        request: Request<pb::TenantKeysRequest>,
    ) -> Result<Response<pb::TenantKeysResponse>, Status> {
        use pb::tenant_keys_request::Action;
        let call = self.authenticate(&request, "tenant-keys")?;
        let r = request.into_inner();
        let action = Action::try_from(r.action)
            .map_err(|_| Status::invalid_argument(format!("unknown action {}", r.action)))?;
        let verb = match action {
            Action::List => "tenant-keys",
            Action::Encrypt => "encrypt-tenant",
            Action::Rewrap => "rewrap-keys",
        };
        self.allow_admin(&call, verb, &r.tenant)?;
        let result = async {
            let tenant = (!r.tenant.is_empty()).then_some(r.tenant.as_str());
            if let Some(t) = tenant {
                validate_name("tenant", t).map_err(status)?;
            }
            let keys = match action {
                Action::List => crate::keys::list(&self.node, tenant),
                Action::Encrypt => {
                    let t = tenant
                        .ok_or_else(|| Status::invalid_argument("give the tenant to encrypt"))?;
                    vec![crate::keys::encrypt(&self.node, t).await.map_err(status)?]
                }
                Action::Rewrap => crate::keys::rewrap(&self.node, tenant)
                    .await
                    .map_err(status)?,
            };
            Ok(Response::new(pb::TenantKeysResponse {
                keys: keys
                    .into_iter()
                    .map(|k| pb::TenantKeyInfo {
                        tenant: k.tenant,
                        key_id: k.key.id,
                        kek: k.key.kek,
                        since_unix_ms: k.key.since_unix_ms,
                        open_here: k.open_here,
                        previous_kek: k.previous_kek.unwrap_or_default(),
                    })
                    .collect(),
            }))
        }
        .await;
        self.audited(&call, verb, &r.tenant, "", &result);
        result
    }

    async fn erase_tenant(
        &self,
        request: Request<pb::EraseTenantRequest>,
    ) -> Result<Response<pb::EraseTenantResponse>, Status> {
        let call = self.authenticate(&request, "erase-tenant")?;
        let tenant = request.into_inner().tenant;
        self.allow_admin(&call, "erase-tenant", &tenant)?;
        let result = async {
            validate_name("tenant", &tenant).map_err(status)?;
            let r = crate::erase::erase_tenant(&self.node, &tenant)
                .await
                .map_err(status)?;
            Ok(Response::new(pb::EraseTenantResponse {
                tenant: tenant.clone(),
                datasets: r.datasets,
                snapshots: r.snapshots,
                jobs: r.jobs,
                sinks: r
                    .sinks
                    .into_iter()
                    .map(|s| pb::SinkErased {
                        sink: s.name,
                        unit: s.unit.to_string(),
                        removed: s.removed,
                    })
                    .collect(),
                nodes: r
                    .nodes
                    .into_iter()
                    .map(|(node, p)| pb::NodePurged {
                        node,
                        done: p.is_some(),
                        chunks: p.as_ref().map_or(0, |p| p.chunks),
                        bytes: p.as_ref().map_or(0, |p| p.bytes),
                        snapshots: p.as_ref().map_or(0, |p| p.snapshots),
                    })
                    .collect(),
            }))
        }
        .await;
        self.audited(&call, "erase-tenant", &tenant, &tenant, &result);
        result
    }

    async fn allow_rejoin(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let call = self.authenticate(&request, "allow-rejoin")?;
        let id = request.into_inner().id;
        self.allow_admin(&call, "allow-rejoin", &id.to_string())?;
        let result = match self.node.cluster.allow_rejoin(id).await {
            Ok(()) => {
                tracing::info!(node = id, "a removed node may join again");
                Ok(Response::new(cluster_status_pb(&self.node)))
            }
            Err(bitclone_raft::Error::Command(bitclone_raft::state::CommandError::NotFound(_))) => {
                Err(Status::not_found(format!("node {id} was not removed")))
            }
            Err(e) => Err(status(crate::node::raft_error(e))),
        };
        self.audited(&call, "allow-rejoin", "", &id.to_string(), &result);
        result
    }

    async fn set_tenant(
        &self,
        request: Request<pb::SetTenantRequest>,
    ) -> Result<Response<pb::SetTenantResponse>, Status> {
        let call = self.authenticate(&request, "set-tenant")?;
        let r = request.into_inner();
        let tenant = r.tenant.clone();
        self.allow_admin(&call, "set-tenant", &tenant)?;
        let result = self.set_shards(r).await;
        self.audited(&call, "set-tenant", &tenant, &tenant, &result);
        result
    }
    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let call = self.authenticate(&request, "stats")?;
        let s = self.node.blocking(|s| s.stats()).await.map_err(status)?;
        let readiness = crate::metrics::readiness_of(&self.node);
        // Datasets, snapshots and jobs are the cluster's, as this node has
        // applied them, of the tenants the caller's token names.
        let who = &call.who;
        let (datasets, snapshots, pending, running) = self.node.cluster.local(|st| {
            let heads = st
                .datasets
                .iter()
                .filter(|(t, _)| who.sees(t))
                .flat_map(|(_, d)| d.values());
            let (d, n) = heads.fold((0, 0), |(d, n), h| (d + 1, n + h.history.len() as u64));
            let count = |state| {
                st.jobs
                    .values()
                    .filter(|j| j.state == state && who.sees(&j.tenant))
                    .count() as u64
            };
            (d, n, count(JobState::Pending), count(JobState::Running))
        });
        Ok(Response::new(pb::StatsResponse {
            node_id: self.node.cluster.id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            chunks: s.chunks,
            chunk_bytes: s.chunk_bytes,
            datasets,
            snapshots,
            jobs_pending: pending,
            jobs_running: running,
            bytes_ingested: self.node.bytes_ingested.load(Ordering::Relaxed),
            bytes_stored: self.node.bytes_stored.load(Ordering::Relaxed),
            uptime_seconds: self.node.started.elapsed().as_secs(),
            bytes_replicated: self.node.bytes_replicated.load(Ordering::Relaxed),
            page_bytes_stored: self.node.page_bytes_stored.load(Ordering::Relaxed),
            page_bytes_replicated: self.node.page_bytes_replicated.load(Ordering::Relaxed),
            chunks_repaired: self.node.chunks_repaired.load(Ordering::Relaxed),
            fatal: self.node.fatal().unwrap_or_default(),
            ready: readiness.ready(),
            not_ready: reasons_for(who, readiness.reasons),
        }))
    }
}

/// Why a node is not ready, as `who` may see it: the reasons name the
/// node's disk figures and store errors, for operators (admins) only.
fn reasons_for(who: &Principal, reasons: Vec<String>) -> Vec<String> {
    if who.has(Scope::Admin) || reasons.is_empty() {
        reasons
    } else {
        vec!["not ready (an admin token shows why)".to_string()]
    }
}

/// The cluster's status as `who` may see it: peer addresses for admins
/// only, and the shards of the tenants the token names.
fn cluster_status_for(node: &Node, who: &Principal) -> pb::ClusterStatusResponse {
    let mut st = cluster_status_pb(node);
    if !who.has(Scope::Admin) {
        for m in &mut st.members {
            m.peer_addr.clear();
        }
    }
    st.shards.retain(|s| who.sees(&s.tenant));
    st
}

fn cluster_status_pb(node: &Node) -> pb::ClusterStatusResponse {
    let st = node.cluster.status();
    pb::ClusterStatusResponse {
        node_id: st.id,
        clustered: true,
        leader_id: st.leader.unwrap_or(0),
        term: st.term,
        applied_index: st.last_applied.unwrap_or(0),
        last_log_index: st.last_log_index.unwrap_or(0),
        raft_state: st.state,
        members: st
            .members
            .iter()
            .map(|(id, info)| pb::ClusterMember {
                id: *id,
                api_addr: info.api_addr.clone(),
                peer_addr: info.peer_addr.clone(),
                voter: st.voters.contains(id),
                ..Default::default()
            })
            .collect(),
        layout_version: st.layout_version,
        shards: st
            .layout
            .iter()
            .flat_map(|(tenant, sets)| {
                sets.iter()
                    .enumerate()
                    .map(move |(i, set)| pb::ShardReplicas {
                        tenant: tenant.clone(),
                        shard: i as u32,
                        replicas: set.clone(),
                    })
            })
            .collect(),
        previous_layout_version: st.previous_layout_version.unwrap_or(0),
        snapshot_index: st.snapshot_index.unwrap_or(0),
        purged_index: st.purged_index.unwrap_or(0),
        ready_nodes: st.ready.iter().copied().collect(),
    }
}

/// A client of the member that holds a snapshot's chunks, over TLS when
/// this node's API is (the other node's certificate checked against
/// `api.ca`).
async fn holder_client(
    config: &crate::config::NodeConfig,
    addr: &str,
) -> Result<bitclone_proto::v1::bit_clone_client::BitCloneClient<tonic::transport::Channel>, Status>
{
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let unreachable = |e: String| {
        Status::unavailable(format!(
            "the node holding this snapshot ({addr}) is unreachable: {e}"
        ))
    };
    let endpoint = match &config.api.tls {
        // The caller's token goes along: in plain text only on loopback.
        None if addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback()) =>
        {
            Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| unreachable(e.to_string()))?
        }
        None => {
            return Err(Status::failed_precondition(format!(
                "this snapshot is on {addr}, which this node (serving plain text) will not send a token to"
            )))
        }
        Some(_) => {
            let ca = std::fs::read(&config.api.ca).map_err(|e| {
                Status::internal(format!("reading api.ca {}: {e}", config.api.ca.display()))
            })?;
            Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|e| {
                    e.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                })
                .map_err(|e| unreachable(e.to_string()))?
        }
    };
    let channel = endpoint
        .local_address(config.cluster.source_ip())
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(
        bitclone_proto::v1::bit_clone_client::BitCloneClient::new(channel)
            .max_decoding_message_size(config.max_message_size)
            .max_encoding_message_size(config.max_message_size),
    )
}

/// A stream fed by a spawned task through a small channel.
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(ReceiverStream::new(rx))
}

/// Checks a job's source and destinations against the sinks this node
/// declares, before it is accepted (the URLs were parsed into them
/// already): a place the client chose is refused (PermissionDenied), and an
/// S3 location must be one the node can open.
fn check_job_spec(
    tenant: &str,
    source: &Source,
    destinations: &[Destination],
    sinks: &crate::sinks::DeclaredSinks,
) -> Result<(), Status> {
    let denied = |r: crate::roots::Refused| Status::permission_denied(r.0);
    for d in destinations {
        let r = sinks.destination(tenant, d).map_err(denied)?;
        if let Destination::Objects { location, .. } = &r.destination {
            bitclone_storage::sink::objects::check_location(location, &r.s3).map_err(status)?;
        }
    }
    if let Some((location, s3)) = sinks.source(tenant, source).map_err(denied)? {
        bitclone_storage::sink::objects::check_location(&location, &s3).map_err(status)?;
    }
    Ok(())
}
