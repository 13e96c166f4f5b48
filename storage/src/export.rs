//! The object-store sink: S3 (or a local directory through object_store's
//! filesystem backend) as a mirror of a snapshot, committed with a fenced,
//! create-only commit record.
//!
//! Layout under the destination prefix:
//!
//! ```text
//! prefix/<path>                                   one object per file, metadata blake3=<hex>
//! prefix/.bitclone/manifests/<snapshot>           the snapshot's manifest
//! prefix/.bitclone/commits/<token:020>-<snapshot> the commit record (JSON), written last
//! ```
//!
//! A reader trusts only snapshots named by a commit record, and of those the
//! one with the highest fencing token. A writer whose token is lower than the
//! highest committed one is refused before it writes anything and again just
//! before it commits ([`Error::Fenced`]).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, ObjectStore, ObjectStoreExt, PutMode,
    PutMultipartOptions, PutOptions, PutPayload,
};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::manifest::{ChunkRef, Entry, EntryKind, Manifest};
use crate::pool::CpuPool;
use crate::store::ChunkStore;

/// Files at least this large are sent as multipart uploads.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Target size of one multipart part (S3 needs at least 5 MiB but the last).
pub const PART_BYTES: u64 = 8 << 20;
/// The object metadata key holding a file's BLAKE3 (hex).
pub const BLAKE3_METADATA: &str = "blake3";
/// Where the sink keeps its own records, under the prefix.
pub const META_DIR: &str = ".bitclone";

/// Reads `chunks` (verified) and concatenates them. Blocking.
pub fn read_chunks(store: &dyn ChunkStore, tenant: &str, chunks: &[ChunkRef]) -> Result<Vec<u8>> {
    let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
    let mut out = Vec::with_capacity(total as usize);
    for c in chunks {
        let data = store.get_chunk(tenant, &c.id)?;
        if data.len() != c.len as usize {
            return Err(Error::CorruptChunk {
                chunk: c.id,
                detail: format!("length {} where the manifest says {}", data.len(), c.len),
            });
        }
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// Loads and decodes a snapshot's manifest. Blocking.
pub fn load_manifest(store: &dyn ChunkStore, tenant: &str, id: &SnapshotId) -> Result<Manifest> {
    let bytes = store.get_manifest(tenant, id)?;
    let m = Manifest::decode(&bytes)?;
    if m.tenant != tenant {
        return Err(Error::not_found("snapshot", id.to_hex()));
    }
    Ok(m)
}

/// How to reach S3: from the node's config, with the standard `AWS_*`
/// variables filling what the config leaves unset ([`S3Options::or_env`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    /// Endpoint URL (`https://…`, or `http://…` for a server on a trusted
    /// network; plain HTTP is allowed only when the endpoint says so).
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token for temporary credentials.
    pub session_token: Option<String>,
    /// Virtual-hosted-style addressing (`bucket.endpoint`); path style otherwise.
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// PEM bundle of extra CA certificates to trust.
    pub ca_file: Option<PathBuf>,
    /// Files uploaded (or checked) at once.
    pub concurrency: Option<usize>,
}

impl S3Options {
    /// Fills unset fields from `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`/
    /// `AWS_ENDPOINT`, `AWS_REGION`/
    /// `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN` and `AWS_CA_BUNDLE`.
    pub fn or_env(self) -> Self {
        self.or_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn or_vars(mut self, var: impl Fn(&str) -> Option<String>) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|k| var(k));
        self.endpoint = self
            .endpoint
            .or_else(|| first(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]));
        self.region = self
            .region
            .or_else(|| first(&["AWS_REGION", "AWS_DEFAULT_REGION"]));
        self.access_key_id = self.access_key_id.or_else(|| var("AWS_ACCESS_KEY_ID"));
        self.secret_access_key = self
            .secret_access_key
            .or_else(|| var("AWS_SECRET_ACCESS_KEY"));
        self.session_token = self.session_token.or_else(|| var("AWS_SESSION_TOKEN"));
        self.ca_file = self
            .ca_file
            .or_else(|| var("AWS_CA_BUNDLE").map(PathBuf::from));
        self
    }
}

/// An opened object-store location: a destination or a source.
#[derive(Debug, Clone)]
pub struct Target {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside it (empty for the root).
    pub prefix: ObjectPath,
    /// The URL without its query, for messages.
    pub url: String,
    /// Delete objects the snapshot does not have (`?mirror=true`).
    pub mirror: bool,
    /// Files uploaded (or checked) at once.
    pub concurrency: usize,
    /// The directory of a `file://` target (its objects are plain files,
    /// without object metadata).
    local_root: Option<PathBuf>,
}

/// Opens `file:///abs/dir[?mirror=true]` (object_store's local filesystem
/// backend; the directory is created) or `s3://bucket[/prefix][?mirror=true]`.
pub fn open_target(url: &str, s3: &S3Options) -> Result<Target> {
    open(url, s3, true)?.ok_or_else(|| Error::InvalidArgument(format!("sink {url:?}: not opened")))
}

/// Checks a sink URL as [`open_target`] would, without touching anything
/// (a `file://` directory is not created): for validating a job at submit.
pub fn check_target(url: &str, s3: &S3Options) -> Result<()> {
    open(url, s3, false).map(|_| ())
}

fn open(url: &str, s3: &S3Options, create: bool) -> Result<Option<Target>> {
    let parsed =
        url::Url::parse(url).map_err(|e| Error::InvalidArgument(format!("sink {url:?}: {e}")))?;
    let mut mirror = false;
    for (k, v) in parsed.query_pairs() {
        match (k.as_ref(), v.as_ref()) {
            ("mirror", "true" | "1" | "yes") => mirror = true,
            ("mirror", "false" | "0" | "no") => mirror = false,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "sink {url:?}: unknown option {k}={v} (known: mirror=true|false)"
                )))
            }
        }
    }
    let mut bare = parsed.clone();
    bare.set_query(None);
    let display = bare.to_string();
    let concurrency = s3.concurrency.unwrap_or(8).clamp(1, 64);
    match parsed.scheme() {
        "file" => {
            let path = parsed.to_file_path().map_err(|_| {
                Error::InvalidArgument(format!("sink {url:?} is not an absolute file:// path"))
            })?;
            if !create {
                return Ok(None);
            }
            std::fs::create_dir_all(&path).map_err(|e| Error::io("create sink", &path, e))?;
            // Synced like a durable sink should be: the commit record must
            // never reach the disk before the files it vouches for.
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&path)?.with_fsync(true);
            Ok(Some(Target {
                store: Arc::new(fs),
                prefix: ObjectPath::default(),
                url: display,
                mirror,
                concurrency,
                local_root: Some(path),
            }))
        }
        "s3" => {
            let bucket = parsed.host_str().unwrap_or_default();
            if bucket.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "sink {url:?}: no bucket (expected s3://bucket/prefix)"
                )));
            }
            let prefix = ObjectPath::parse(parsed.path().trim_matches('/'))
                .map_err(|e| Error::InvalidArgument(format!("sink {url:?}: bad prefix: {e}")))?;
            Ok(Some(Target {
                store: Arc::new(build_s3(bucket, s3, url)?),
                prefix,
                url: display,
                mirror,
                concurrency,
                local_root: None,
            }))
        }
        other => Err(Error::InvalidArgument(format!(
            "sink {url:?}: scheme {other}:// is not a sink (supported: s3://, file://, postgres://)"
        ))),
    }
}

fn build_s3(bucket: &str, o: &S3Options, url: &str) -> Result<object_store::aws::AmazonS3> {
    use object_store::aws::AmazonS3Builder;
    use object_store::{BackoffConfig, ClientOptions, RetryConfig};
    let mut client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(300));
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(o.region.as_deref().unwrap_or("us-east-1"))
        .with_virtual_hosted_style_request(o.virtual_hosted_style)
        // Bounded retries: an unreachable endpoint or a dead bucket must turn
        // into a job error in seconds, not minutes; the job retries later.
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        });
    if let Some(e) = &o.endpoint {
        let allow_http = e.starts_with("http://");
        if !allow_http && !e.starts_with("https://") {
            return Err(Error::InvalidArgument(format!(
                "sink {url:?}: endpoint {e:?} must start with https:// (or http://)"
            )));
        }
        client = client.with_allow_http(allow_http);
        b = b.with_endpoint(e.trim_end_matches('/'));
    }
    if let Some(ca) = &o.ca_file {
        let pem = std::fs::read(ca).map_err(|e| Error::io("read CA bundle", ca, e))?;
        for cert in object_store::Certificate::from_pem_bundle(&pem)? {
            client = client.with_root_certificate(cert);
        }
    }
    match (&o.access_key_id, &o.secret_access_key) {
        (Some(k), Some(s)) => {
            b = b.with_access_key_id(k).with_secret_access_key(s);
            if let Some(t) = &o.session_token {
                b = b.with_token(t);
            }
        }
        (None, None) => {}
        _ => {
            return Err(Error::InvalidArgument(format!(
                "sink {url:?}: an access key id needs its secret access key and the other way round"
            )))
        }
    }
    Ok(b.with_client_options(client).build()?)
}

/// A commit record: the sink's statement that a snapshot is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The committed snapshot (hex).
    pub snapshot: String,
    /// Owner of the snapshot.
    pub tenant: String,
    /// Dataset of the snapshot.
    pub dataset: String,
    /// The job that wrote it.
    pub job: String,
    /// The fencing token of the lease the job held.
    pub fencing_token: u64,
    /// Number of regular files.
    pub files: u64,
    /// Total file bytes.
    pub bytes: u64,
    /// When the record was written (milliseconds since the Unix epoch).
    pub committed_unix_ms: i64,
}

impl CommitRecord {
    /// The snapshot id.
    pub fn snapshot_id(&self) -> Result<SnapshotId> {
        self.snapshot.parse()
    }
}

fn commit_name(token: u64, snapshot: &str) -> String {
    format!("{token:020}-{snapshot}")
}

fn commit_loc(target: &Target, token: u64, snapshot: &str) -> Result<ObjectPath> {
    join(
        &target.prefix,
        &format!("{META_DIR}/commits/{}", commit_name(token, snapshot)),
    )
}

fn manifest_loc(target: &Target, id: &SnapshotId) -> Result<ObjectPath> {
    join(
        &target.prefix,
        &format!("{META_DIR}/manifests/{}", id.to_hex()),
    )
}

/// Whether a relative path lies in the sink's own records.
fn is_meta(rel: &str) -> bool {
    rel.split('/').next() == Some(META_DIR)
}

/// Lists the commit records' names under `target`: (token, snapshot hex),
/// highest token last.
pub async fn list_commits(target: &Target) -> Result<Vec<(u64, String)>> {
    let dir = join(&target.prefix, &format!("{META_DIR}/commits"))?;
    let metas: Vec<_> = target
        .store
        .list(Some(&dir))
        .try_collect()
        .await
        .map_err(|e| sink_error(target, "listing commit records", e))?;
    let mut out: Vec<(u64, String)> = metas
        .iter()
        .filter_map(|m| m.location.filename())
        .filter_map(|name| {
            let (t, s) = name.split_once('-')?;
            Some((t.parse().ok()?, s.to_string()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Reads one commit record.
pub async fn read_commit(target: &Target, token: u64, snapshot: &str) -> Result<CommitRecord> {
    let loc = commit_loc(target, token, snapshot)?;
    let bytes = target
        .store
        .get(&loc)
        .await
        .map_err(|e| sink_error(target, "reading a commit record", e))?
        .bytes()
        .await?;
    let rec: CommitRecord = serde_json::from_slice(&bytes)
        .map_err(|e| Error::decode("commit record", format!("{loc}: {e}")))?;
    if rec.fencing_token != token || rec.snapshot != snapshot {
        return Err(Error::decode(
            "commit record",
            format!("{loc} does not match its name"),
        ));
    }
    Ok(rec)
}

/// The commit record with the highest fencing token, if any.
pub async fn latest_commit(target: &Target) -> Result<Option<CommitRecord>> {
    match list_commits(target).await?.pop() {
        Some((t, s)) => Ok(Some(read_commit(target, t, &s).await?)),
        None => Ok(None),
    }
}

/// Reads and checks the manifest of a committed snapshot from the sink.
pub async fn read_manifest(target: &Target, id: &SnapshotId) -> Result<Manifest> {
    let loc = manifest_loc(target, id)?;
    let bytes = target
        .store
        .get(&loc)
        .await
        .map_err(|e| sink_error(target, "reading a manifest", e))?
        .bytes()
        .await?;
    if SnapshotId::of(&bytes) != *id {
        return Err(Error::decode(
            "manifest",
            format!("{loc} does not hash to its name"),
        ));
    }
    Manifest::decode(&bytes)
}

/// Refuses a writer whose token is lower than the highest committed one.
/// Returns the latest record.
async fn check_fence(target: &Target, token: u64) -> Result<Option<(u64, String)>> {
    let latest = list_commits(target).await?.pop();
    if let Some((t, s)) = &latest {
        if *t > token {
            return Err(Error::Fenced(format!(
                "{}: snapshot {s} is committed with fencing token {t}, higher than this writer's \
                 {token} (a newer attempt or job wrote it; tokens from another cluster or a \
                 rebuilt node do not compare: give those a fresh prefix)",
                target.url
            )));
        }
    }
    Ok(latest)
}

/// Where an export stands, for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportProgress {
    /// Files done so far (written or found unchanged).
    pub files_done: u64,
    /// Bytes done so far.
    pub bytes_done: u64,
}

/// Who is writing: the job and the fencing token of its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    /// Job id.
    pub job: String,
    /// Fencing token.
    pub token: u64,
}

/// What one export did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Files uploaded.
    pub files_written: u64,
    /// Files whose object already held the same BLAKE3.
    pub files_unchanged: u64,
    /// Bytes uploaded.
    pub bytes_written: u64,
    /// Objects deleted because the snapshot no longer has them (mirror).
    pub objects_deleted: u64,
    /// The same snapshot was already committed with this token (a re-run).
    pub already_committed: bool,
}

/// An upload waiting for its commit: what [`upload_snapshot`] wrote or found,
/// which [`commit_snapshot`] checks again before the commit point.
#[derive(Debug, Default)]
pub struct Upload {
    /// What was done so far.
    pub stats: ExportStats,
    /// Every file's object as this writer left it: path → e_tag (its size
    /// is the manifest's).
    objects: HashMap<String, Option<String>>,
    /// The objects found under the prefix before the upload: the only ones
    /// a mirror commit may delete (a concurrent writer's new objects are
    /// not this writer's to remove).
    listed: HashMap<String, Listed>,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    size: u64,
    e_tag: Option<String>,
}

/// Writes every file of `manifest` as the object `prefix/path` (skipping
/// objects whose stored BLAKE3 matches), then the manifest and, last, the
/// commit record. With `mirror`, objects the snapshot lacks are deleted
/// after the commit. An export always walks the whole manifest: a retry
/// finds the files an earlier attempt wrote unchanged and skips them.
///
/// Reports progress through `on_progress`. Chunk reads run on `pool`; large
/// files stream as multipart uploads, so memory stays within a few parts per
/// upload. `cancel` stops it between files and before the commit; uploads in
/// flight are aborted, never left half-done.
#[allow(clippy::too_many_arguments)]
pub async fn export_snapshot(
    pool: &CpuPool,
    store: Arc<dyn ChunkStore>,
    manifest: &Manifest,
    id: &SnapshotId,
    target: &Target,
    writer: &Writer,
    cancel: Arc<AtomicBool>,
    on_progress: &mut (dyn FnMut(ExportProgress) + Send),
) -> Result<ExportStats> {
    let mut upload = upload_snapshot(
        pool,
        store,
        manifest,
        id,
        target,
        writer,
        cancel.clone(),
        on_progress,
    )
    .await?;
    if !upload.stats.already_committed {
        commit_snapshot(target, manifest, id, writer, &mut upload, &cancel).await?;
    }
    Ok(upload.stats)
}

/// The first half of [`export_snapshot`]: the objects and the manifest,
/// nothing a reader trusts yet. `already_committed` in the result means
/// the writer's record for this snapshot exists and nothing was done.
#[allow(clippy::too_many_arguments)]
pub async fn upload_snapshot(
    pool: &CpuPool,
    store: Arc<dyn ChunkStore>,
    manifest: &Manifest,
    id: &SnapshotId,
    target: &Target,
    writer: &Writer,
    cancel: Arc<AtomicBool>,
    on_progress: &mut (dyn FnMut(ExportProgress) + Send),
) -> Result<Upload> {
    let mut upload = Upload::default();
    if let Some(e) = manifest.entries.iter().find(|e| is_meta(&e.path)) {
        return Err(Error::InvalidPath {
            path: e.path.clone(),
            reason: "collides with the sink's own records under .bitclone/",
        });
    }
    if let Some((t, s)) = check_fence(target, writer.token).await? {
        if t == writer.token && s == id.to_hex() {
            upload.stats.already_committed = true;
            return Ok(upload);
        }
    }
    upload.listed = list_objects(target).await?;
    let listed = &upload.listed;
    let abort = AtomicBool::new(false);
    let ctx = Ctx {
        pool,
        store: &store,
        tenant: &manifest.tenant,
        target,
        cancel: &cancel,
        abort: &abort,
    };
    // Which objects already hold their file's bytes: checked up front, with
    // more requests in flight than uploads (a check is one small request).
    let unchanged: HashSet<usize> =
        futures::stream::iter(manifest.entries.iter().enumerate().filter(|(_, e)| {
            e.kind == EntryKind::File && listed.get(&e.path).map(|l| l.size) == Some(e.size)
        }))
        .map(|(i, e)| {
            let ctx = &ctx;
            async move { Ok::<_, Error>(ctx.holds(e).await?.then_some(i)) }
        })
        .buffer_unordered((target.concurrency * 4).min(64))
        .try_filter_map(|i| async move { Ok(i) })
        .boxed()
        .try_collect()
        .await?;
    let mut at = ExportProgress::default();
    // `buffered` keeps results in order, while up to `concurrency` run at once.
    let mut results = futures::stream::iter(manifest.entries.iter().enumerate().map(|(i, e)| {
        let ctx = &ctx;
        let skip = unchanged.contains(&i);
        async move { ctx.write_entry(e, skip).await.map(|w| (e, w)) }
    }))
    .buffered(target.concurrency)
    // Boxing pins down the lifetimes, so that callers' futures stay Send.
    .boxed();
    let mut failed = None;
    while let Some(r) = results.next().await {
        let (e, written) = match r {
            Ok(v) => v,
            Err(err) => {
                // Let the uploads in flight see the flag and abort cleanly
                // rather than dropping them half-done; keep the first error.
                abort.store(true, Ordering::Relaxed);
                failed.get_or_insert(err);
                continue;
            }
        };
        if failed.is_some() || e.kind != EntryKind::File {
            continue;
        }
        let e_tag = match written {
            Some(tag) => {
                upload.stats.files_written += 1;
                upload.stats.bytes_written += e.size;
                tag
            }
            None => {
                upload.stats.files_unchanged += 1;
                listed.get(&e.path).and_then(|l| l.e_tag.clone())
            }
        };
        upload.objects.insert(e.path.clone(), e_tag);
        at.files_done += 1;
        at.bytes_done += e.size;
        on_progress(at);
    }
    drop(results);
    if let Some(err) = failed {
        return Err(err);
    }
    let bytes = manifest.encode()?;
    target
        .store
        .put(&manifest_loc(target, id)?, PutPayload::from(bytes))
        .await
        .map_err(|e| sink_error(target, "writing the manifest", e))?;
    Ok(upload)
}

/// The second half of [`export_snapshot`]: checks that every object is still
/// as the upload left it, writes the commit record (create-only, refused
/// when a higher token has committed), then, with `mirror`, deletes the
/// objects the snapshot does not have.
pub async fn commit_snapshot(
    target: &Target,
    manifest: &Manifest,
    id: &SnapshotId,
    writer: &Writer,
    upload: &mut Upload,
    cancel: &AtomicBool,
) -> Result<()> {
    // Fenced again right before the commit point: a newer holder may have
    // committed while this one was uploading.
    check_fence(target, writer.token).await?;
    // Another writer on the same prefix may have replaced or removed an
    // object since: then this snapshot is not what the bucket holds.
    let now = list_objects(target).await?;
    for e in manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
    {
        let tag = upload.objects.get(&e.path).cloned().flatten();
        let same = now.get(&e.path).is_some_and(|l| {
            l.size == e.size && (tag.is_none() || l.e_tag.is_none() || l.e_tag == tag)
        });
        if !same {
            return Err(Error::Conflict(format!(
                "{}: object {} changed while job {} was writing it (another writer on this prefix?); not committed",
                target.url, e.path, writer.job
            )));
        }
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let record = CommitRecord {
        snapshot: id.to_hex(),
        tenant: manifest.tenant.clone(),
        dataset: manifest.dataset.clone(),
        job: writer.job.clone(),
        fencing_token: writer.token,
        files: manifest.file_count(),
        bytes: manifest.total_bytes(),
        committed_unix_ms: now_ms(),
    };
    let loc = commit_loc(target, writer.token, &record.snapshot)?;
    let body = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::InvalidArgument(format!("encoding commit record: {e}")))?;
    let put = target
        .store
        .put_opts(
            &loc,
            PutPayload::from(body),
            PutOptions::from(PutMode::Create),
        )
        .await;
    match put {
        Ok(_) => {}
        // The same record from an earlier attempt of this job: done already.
        Err(object_store::Error::AlreadyExists { .. }) => {
            let prev = read_commit(target, writer.token, &record.snapshot).await?;
            if prev.job != writer.job {
                return Err(Error::Fenced(format!(
                    "{}: token {} was already used by job {}",
                    target.url, writer.token, prev.job
                )));
            }
            upload.stats.already_committed = true;
        }
        Err(e) => return Err(sink_error(target, "writing the commit record", e)),
    }
    // Only the newest commit prunes, and only what it listed before its
    // upload: an older writer must not delete a newer snapshot's objects.
    let commits = list_commits(target).await?;
    let newest = commits.last().is_some_and(|(t, _)| *t <= writer.token);
    if newest && !cancel.load(Ordering::Relaxed) {
        if target.mirror {
            upload.stats.objects_deleted = delete_extra(target, manifest, &upload.listed).await?;
        }
        prune_commits(target, &commits).await?;
    }
    Ok(())
}

/// Commit records kept per prefix: readers need only the newest, and every
/// export lists them all.
pub const KEEP_COMMITS: usize = 64;

/// Deletes all but the newest [`KEEP_COMMITS`] commit records (their small
/// manifests stay). Only the newest writer prunes.
async fn prune_commits(target: &Target, commits: &[(u64, String)]) -> Result<()> {
    let old = commits.len().saturating_sub(KEEP_COMMITS);
    for (token, snapshot) in &commits[..old] {
        let loc = commit_loc(target, *token, snapshot)?;
        match target.store.delete(&loc).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(sink_error(target, "pruning old commit records", e)),
        }
    }
    Ok(())
}

struct Ctx<'a> {
    pool: &'a CpuPool,
    store: &'a Arc<dyn ChunkStore>,
    tenant: &'a str,
    target: &'a Target,
    cancel: &'a AtomicBool,
    /// Set when another upload of this export failed.
    abort: &'a AtomicBool,
}

impl Ctx<'_> {
    fn stopped(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.abort.load(Ordering::Relaxed)
    }

    /// Writes one entry's object unless it already holds the same bytes.
    /// Returns `Some(e_tag)` when it wrote, `None` when it did not.
    async fn write_entry(&self, e: &Entry, unchanged: bool) -> Result<Option<Option<String>>> {
        if self.stopped() {
            return Err(Error::Cancelled);
        }
        if e.kind != EntryKind::File || unchanged {
            return Ok(None);
        }
        let location = join(&self.target.prefix, &e.path)?;
        let mut attributes = Attributes::new();
        if self.target.local_root.is_none() {
            attributes.insert(
                Attribute::Metadata(BLAKE3_METADATA.into()),
                AttributeValue::from(ChunkId(e.blake3).to_hex()),
            );
        }
        if e.size < MULTIPART_THRESHOLD {
            let (s, t, c) = (
                self.store.clone(),
                self.tenant.to_string(),
                e.chunks.clone(),
            );
            let data = self
                .pool
                .run(move || read_chunks(s.as_ref(), &t, &c))
                .await?;
            let done = self
                .target
                .store
                .put_opts(
                    &location,
                    PutPayload::from(data),
                    PutOptions::from(attributes),
                )
                .await
                .map_err(|err| sink_error(self.target, "uploading", err))?;
            Ok(Some(done.e_tag))
        } else {
            self.put_multipart(&e.chunks, &location, attributes)
                .await
                .map(Some)
        }
    }

    /// Whether the object for `e` already holds the file's bytes.
    async fn holds(&self, e: &Entry) -> Result<bool> {
        let location = join(&self.target.prefix, &e.path)?;
        Ok(self.stored_blake3(&location).await? == Some(e.blake3))
    }

    /// The BLAKE3 the object at `location` holds: from its metadata on S3, by
    /// hashing the file on a local target.
    async fn stored_blake3(&self, location: &ObjectPath) -> Result<Option<[u8; 32]>> {
        if let Some(root) = &self.target.local_root {
            let path = root.join(location.as_ref());
            return self
                .pool
                .run(move || match std::fs::File::open(&path) {
                    Ok(mut f) => {
                        let mut h = blake3::Hasher::new();
                        std::io::copy(&mut f, &mut h)
                            .map_err(|e| Error::io("read", path.clone(), e))?;
                        Ok(Some(*h.finalize().as_bytes()))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io("open", path, e)),
                })
                .await;
        }
        let head = self
            .target
            .store
            .get_opts(
                location,
                GetOptions {
                    head: true,
                    ..GetOptions::default()
                },
            )
            .await;
        match head {
            Ok(r) => Ok(r
                .attributes
                .get(&Attribute::Metadata(BLAKE3_METADATA.into()))
                .and_then(|v| v.as_ref().parse::<ChunkId>().ok())
                .map(|c| c.0)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(sink_error(self.target, "reading object metadata", e)),
        }
    }

    async fn put_multipart(
        &self,
        chunks: &[ChunkRef],
        location: &ObjectPath,
        attributes: Attributes,
    ) -> Result<Option<String>> {
        let mut upload = self
            .target
            .store
            .put_multipart_opts(location, PutMultipartOptions::from(attributes))
            .await
            .map_err(|e| sink_error(self.target, "starting a multipart upload", e))?;
        let result = async {
            let mut start = 0;
            while start < chunks.len() {
                if self.stopped() {
                    return Err(Error::Cancelled);
                }
                let mut end = start;
                let mut bytes = 0u64;
                while end < chunks.len() && bytes < PART_BYTES {
                    bytes += u64::from(chunks[end].len);
                    end += 1;
                }
                let (s, t, c) = (
                    self.store.clone(),
                    self.tenant.to_string(),
                    chunks[start..end].to_vec(),
                );
                let data = self
                    .pool
                    .run(move || read_chunks(s.as_ref(), &t, &c))
                    .await?;
                upload
                    .put_part(PutPayload::from(data))
                    .await
                    .map_err(|e| sink_error(self.target, "uploading a part", e))?;
                start = end;
            }
            let done = upload
                .complete()
                .await
                .map_err(|e| sink_error(self.target, "completing a multipart upload", e))?;
            Ok(done.e_tag)
        }
        .await;
        if result.is_err() {
            // Leave no half-written object behind; the original error matters more.
            let _ = upload.abort().await;
        }
        result
    }
}

/// The objects under the prefix, outside `.bitclone/`, with their paths
/// relative to it.
pub(crate) async fn list_under(
    target: &Target,
    doing: &str,
) -> Result<Vec<(String, object_store::ObjectMeta)>> {
    let prefix = (!target.prefix.as_ref().is_empty()).then_some(&target.prefix);
    let mut out = Vec::new();
    let mut s = target.store.list(prefix);
    while let Some(m) = s.next().await {
        let m = m.map_err(|e| sink_error(target, doing, e))?;
        let Some(rel) = relative(&target.prefix, &m.location) else {
            continue;
        };
        if is_meta(&rel) {
            continue;
        }
        out.push((rel, m));
    }
    Ok(out)
}

/// [`list_under`] as path → size and e_tag.
async fn list_objects(target: &Target) -> Result<HashMap<String, Listed>> {
    Ok(list_under(target, "listing objects")
        .await?
        .into_iter()
        .map(|(rel, m)| {
            let l = Listed {
                size: m.size,
                e_tag: m.e_tag,
            };
            (rel, l)
        })
        .collect())
}

/// `location` relative to `prefix`, if it is under it.
fn relative(prefix: &ObjectPath, location: &ObjectPath) -> Option<String> {
    let parts: Vec<_> = location.prefix_match(prefix)?.collect();
    if parts.is_empty() {
        return None;
    }
    Some(
        parts
            .iter()
            .map(|p| p.as_ref())
            .collect::<Vec<_>>()
            .join("/"),
    )
}

async fn delete_extra(
    target: &Target,
    manifest: &Manifest,
    existing: &HashMap<String, Listed>,
) -> Result<u64> {
    let keep: std::collections::HashSet<&str> = manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| e.path.as_str())
        .collect();
    let mut doomed: Vec<&String> = existing
        .keys()
        .filter(|k| !keep.contains(k.as_str()))
        .collect();
    doomed.sort();
    let n = doomed.len() as u64;
    futures::stream::iter(doomed)
        .map(|rel| async move {
            let loc = join(&target.prefix, rel)?;
            match target.store.delete(&loc).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(sink_error(target, "deleting an object", e)),
            }
        })
        .buffer_unordered(target.concurrency)
        .boxed()
        .try_collect::<Vec<()>>()
        .await?;
    Ok(n)
}

/// Checks that the target refuses a second create of the same key (the
/// commit records rely on it; some S3 servers ignore `If-None-Match`).
/// Returns false, and logs once per target, when it does not.
pub async fn check_create_only(target: &Target) -> Result<bool> {
    static SEEN: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(v) = seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&target.url)
    {
        return Ok(*v);
    }
    let loc = join(
        &target.prefix,
        &format!("{META_DIR}/probe/{}-{}", std::process::id(), now_ms()),
    )?;
    let create = || {
        target.store.put_opts(
            &loc,
            PutPayload::from_static(b"probe"),
            PutOptions::from(PutMode::Create),
        )
    };
    create()
        .await
        .map_err(|e| sink_error(target, "probing conditional create", e))?;
    let refused = matches!(
        create().await,
        Err(object_store::Error::AlreadyExists { .. })
    );
    let _ = target.store.delete(&loc).await;
    if !refused {
        tracing::warn!(
            sink = target.url,
            "the sink does not refuse a second create of the same key; commit records still \
             order by fencing token, but two writers with the same token would not be told apart"
        );
    }
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(target.url.clone(), refused);
    Ok(refused)
}

/// Adds what was being done and where to an object-store error.
pub(crate) fn sink_error(target: &Target, doing: &str, e: object_store::Error) -> Error {
    let denied = matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    );
    let known = denied || matches!(e, object_store::Error::NotFound { .. });
    let text = condense(&crate::error::with_causes(&e));
    // A missing bucket shows up as NotFound on list; say it plainly.
    let hint = if text.contains("NoSuchBucket") {
        " (the bucket does not exist)"
    } else if text.contains("certificate") {
        " (the endpoint's certificate is not trusted: see ca_file / AWS_CA_BUNDLE)"
    } else if denied
        || text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AccessDenied")
    {
        " (check the credentials and the bucket's permissions)"
    } else {
        ""
    };
    Error::Sink {
        sink: target.url.clone(),
        detail: format!("{doing}: {text}{hint}"),
        permanent: known || !hint.is_empty(),
    }
}

/// S3 errors carry the server's XML body: keep its code and message only.
fn condense(text: &str) -> String {
    let Some(at) = text.find("<?xml") else {
        return text.to_string();
    };
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find('<')? + start;
        Some(text[start..end].to_string())
    };
    let head = text[..at].trim_end_matches([' ', ':']);
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{head}: {c}: {m}"),
        (Some(c), None) => format!("{head}: {c}"),
        _ => head.to_string(),
    }
}

/// Joins a validated relative path onto a prefix.
pub(crate) fn join(prefix: &ObjectPath, rel: &str) -> Result<ObjectPath> {
    let mut p = prefix.clone();
    for part in rel.split('/') {
        let part = object_store::path::PathPart::parse(part).map_err(|_| Error::InvalidPath {
            path: rel.to_string(),
            reason: "not a valid object name",
        })?;
        p = p.join(part);
    }
    Ok(p)
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::ChunkParams;
    use crate::ingest::{ingest_dir, walk_dir, SnapshotBuilder};
    use crate::store::MemStore;

    #[test]
    fn s3_options_take_unset_fields_from_the_environment() {
        let vars: HashMap<&str, &str> = [
            ("AWS_ENDPOINT", "http://127.0.0.1:1"),
            ("AWS_REGION", "garage"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ]
        .into();
        let o = S3Options {
            region: Some("eu".into()),
            ..S3Options::default()
        }
        .or_vars(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(o.region.as_deref(), Some("eu"), "config wins over env");
        assert_eq!(o.access_key_id.as_deref(), Some("k"));
        assert_eq!(o.ca_file, None);
    }

    #[test]
    fn only_the_newest_commit_records_are_kept() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let pool = CpuPool::new(1, "t").unwrap();
        let out = tempfile::tempdir().unwrap();
        let target = open_target(
            &format!("file://{}", out.path().display()),
            &S3Options::default(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let n = KEEP_COMMITS as u64 + 3;
        for token in 1..=n {
            let mut b = SnapshotBuilder::new("t", "d", None, ChunkParams::default()).unwrap();
            b.add_dir("d", 0o755, token as i64).unwrap();
            let (m, _) = b.finish(0).unwrap();
            let (id, _) = m.encode_with_id().unwrap();
            let writer = Writer {
                job: format!("j{token}"),
                token,
            };
            rt.block_on(export_snapshot(
                &pool,
                store.clone(),
                &m,
                &id,
                &target,
                &writer,
                Arc::new(AtomicBool::new(false)),
                &mut |_| {},
            ))
            .unwrap();
        }
        let commits = rt.block_on(list_commits(&target)).unwrap();
        assert_eq!(commits.len(), KEEP_COMMITS);
        assert_eq!(commits.first().unwrap().0, n - KEEP_COMMITS as u64 + 1);
        assert_eq!(commits.last().unwrap().0, n);
    }

    #[test]
    fn s3_error_bodies_are_condensed() {
        let t = "Error performing PUT http://h/b/k - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>Bucket not found: b</Message></Error>";
        assert_eq!(
            condense(t),
            "Error performing PUT http://h/b/k - Server returned non-2xx status code: 404 Not Found: NoSuchBucket: Bucket not found: b"
        );
        assert_eq!(condense("plain"), "plain");
    }

    #[test]
    fn targets_parse_and_refuse_bad_urls() {
        let s3 = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            ..S3Options::default()
        };
        let t = open_target("s3://bucket/a/b?mirror=true", &s3).unwrap();
        assert_eq!(t.prefix.as_ref(), "a/b");
        assert!(t.mirror);
        assert_eq!(t.url, "s3://bucket/a/b");
        assert!(open_target("s3://bucket/x?bogus=1", &s3).is_err());
        assert!(open_target("s3:///x", &s3).is_err());
        assert!(open_target("file://relative", &s3).is_err());
        assert!(open_target("ftp://h/x", &s3).is_err());
        // Checking a job's sink at submit time creates nothing.
        let dir = tempfile::tempdir().unwrap();
        let later = dir.path().join("later");
        check_target(&format!("file://{}?mirror=1", later.display()), &s3).unwrap();
        assert!(!later.exists());
        assert!(check_target("file:///x?bogus=1", &s3).is_err());
        let bad = S3Options {
            endpoint: Some("127.0.0.1:9".into()),
            ..S3Options::default()
        };
        assert!(open_target("s3://bucket/x", &bad).is_err());
        let half = S3Options {
            access_key_id: Some("k".into()),
            ..S3Options::default()
        };
        assert!(open_target("s3://bucket/x", &half).is_err());
    }

    #[test]
    fn export_to_local_object_store_is_byte_identical_and_incremental() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/small"), b"small file").unwrap();
        let big: Vec<u8> = (0..(20u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(src.path().join("big"), &big).unwrap();
        std::fs::write(src.path().join("empty"), b"").unwrap();

        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let snapshot = |root: &std::path::Path| {
            let mut b = SnapshotBuilder::new("t", "d", None, ChunkParams::default()).unwrap();
            let entries = walk_dir(root).unwrap();
            ingest_dir(
                store.as_ref(),
                &mut b,
                root,
                &entries,
                &AtomicBool::new(false),
                &mut |_, _| {},
            )
            .unwrap();
            let (m, _) = b.finish(0).unwrap();
            let (id, _) = m.encode_with_id().unwrap();
            (m, id)
        };
        let (m, id) = snapshot(src.path());

        let out = tempfile::tempdir().unwrap();
        let url = format!("file://{}/export?mirror=true", out.path().display());
        let target = open_target(&url, &S3Options::default()).unwrap();
        let pool = CpuPool::new(2, "t").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let export = |m: &Manifest, id: &SnapshotId, token: u64| {
            let mut last = ExportProgress::default();
            let r = rt.block_on(export_snapshot(
                &pool,
                store.clone(),
                m,
                id,
                &target,
                &Writer {
                    job: format!("j{token}"),
                    token,
                },
                Arc::new(AtomicBool::new(false)),
                &mut |p| last = p,
            ));
            (r, last)
        };
        let (stats, last) = export(&m, &id, 1);
        let stats = stats.unwrap();
        assert_eq!(last.files_done, 3);
        assert_eq!(stats.files_written, 3);
        let root = out.path().join("export");
        assert_eq!(std::fs::read(root.join("big")).unwrap(), big);
        assert_eq!(
            std::fs::read(root.join("a/b/small")).unwrap(),
            b"small file"
        );
        assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
        let latest = rt.block_on(latest_commit(&target)).unwrap().unwrap();
        assert_eq!(latest.snapshot, id.to_hex());
        assert_eq!(latest.fencing_token, 1);
        assert_eq!(rt.block_on(read_manifest(&target, &id)).unwrap(), m);

        // The same job again: nothing written, nothing committed twice.
        let again = export(&m, &id, 1).0.unwrap();
        assert!(again.already_committed);
        assert_eq!(rt.block_on(list_commits(&target)).unwrap().len(), 1);

        // An edit and a removal: only the edited file is written, the removed
        // one deleted (mirror).
        std::fs::write(src.path().join("a/b/small"), b"changed").unwrap();
        std::fs::remove_file(src.path().join("empty")).unwrap();
        let (m2, id2) = snapshot(src.path());
        let s2 = export(&m2, &id2, 2).0.unwrap();
        assert_eq!((s2.files_written, s2.files_unchanged), (1, 1));
        assert_eq!(s2.objects_deleted, 1);
        assert!(!root.join("empty").exists());
        assert_eq!(std::fs::read(root.join("a/b/small")).unwrap(), b"changed");

        // A writer with a lower token is refused before it writes anything.
        let (m3, id3) = {
            std::fs::write(src.path().join("a/b/small"), b"zombie").unwrap();
            snapshot(src.path())
        };
        let err = export(&m3, &id3, 1).0.unwrap_err();
        assert!(matches!(err, Error::Fenced(_)), "{err}");
        assert_eq!(std::fs::read(root.join("a/b/small")).unwrap(), b"changed");
        let latest = rt.block_on(latest_commit(&target)).unwrap().unwrap();
        assert_eq!(latest.snapshot, id2.to_hex());
        assert!(rt.block_on(check_create_only(&target)).unwrap());
    }
}
