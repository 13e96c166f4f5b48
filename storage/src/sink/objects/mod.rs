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
//!
//! By concern: [`layout`] (where things live under the prefix, and reading
//! the records back), [`upload`] (the objects and the manifest), [`commit`]
//! (the fenced commit record, mirror deletes, pruning) and [`s3`] (reaching
//! S3, and object-store errors).

pub mod commit;
pub mod layout;
pub mod reconcile;
pub mod s3;
pub mod upload;

pub use self::commit::{check_create_only, commit_snapshot, KEEP_COMMITS};
pub use self::layout::{
    latest_commit, list_commits, read_commit, read_manifest, read_root, sink_entries, CommitRecord,
    META_DIR,
};
pub use self::s3::S3Options;
pub use self::upload::{upload_snapshot, Upload};
pub use crate::sink::{SinkWrite, Writer, Written};

use std::path::PathBuf;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

use self::s3::build_s3;
use super::catalog;
use super::spec::{Destination, Location};
use crate::error::{Error, Result};

/// Files at least this large are sent as multipart uploads.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Target size of one multipart part (S3 needs at least 5 MiB but the last).
pub const PART_BYTES: u64 = 8 << 20;
/// The object metadata key holding a file's BLAKE3 (hex).
pub const BLAKE3_METADATA: &str = "blake3";

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
/// backend; the directory is created) or `s3://bucket[/prefix][?mirror=true]`:
/// a URL a user typed (a job's destinations are parsed at submit, and open
/// with [`open_location`]).
pub fn open_target(url: &str, s3: &S3Options) -> Result<Target> {
    match Destination::parse(url)? {
        Destination::Objects { location, mirror } => open_location(&location, mirror, s3),
        Destination::Catalog { .. } => Err(Error::InvalidArgument(format!(
            "{} is a Postgres catalog, not an object store",
            catalog::redact_url(url)
        ))),
        Destination::Declared { .. } => Err(Error::InvalidArgument(format!(
            "{url}: a sink:// name is known only to the nodes that declare it; give the s3:// \
             or file:// location it stands for"
        ))),
    }
}

/// Opens an object-store location (a `file://` directory is created).
pub fn open_location(location: &Location, mirror: bool, s3: &S3Options) -> Result<Target> {
    open(location, mirror, s3, true)?
        .ok_or_else(|| Error::InvalidArgument(format!("sink {}: not opened", location.url())))
}

/// Checks that a location can be opened with these S3 settings, without
/// touching anything (a `file://` directory is not created): for
/// validating a job at submit.
pub fn check_location(location: &Location, s3: &S3Options) -> Result<()> {
    open(location, false, s3, false).map(|_| ())
}

fn open(location: &Location, mirror: bool, s3: &S3Options, create: bool) -> Result<Option<Target>> {
    let url = location.url();
    let concurrency = s3.concurrency.unwrap_or(8).clamp(1, 64);
    match location {
        Location::Dir { path } => {
            if !create {
                return Ok(None);
            }
            std::fs::create_dir_all(path).map_err(|e| Error::io("create sink", path, e))?;
            // Synced like a durable sink should be: the commit record must
            // never reach the disk before the files it vouches for.
            let fs = object_store::local::LocalFileSystem::new_with_prefix(path)?.with_fsync(true);
            Ok(Some(Target {
                store: crate::sink::requests::Observed::wrap(Arc::new(fs), "dir"),
                prefix: ObjectPath::default(),
                url,
                mirror,
                concurrency,
                local_root: Some(path.clone()),
            }))
        }
        Location::S3 { bucket, prefix } => {
            let prefix = ObjectPath::parse(prefix)
                .map_err(|e| Error::InvalidArgument(format!("sink {url:?}: bad prefix: {e}")))?;
            Ok(Some(Target {
                store: crate::sink::requests::Observed::wrap(
                    Arc::new(build_s3(bucket, s3, &url)?),
                    "s3",
                ),
                prefix,
                url,
                mirror,
                concurrency,
                local_root: None,
            }))
        }
    }
}

/// Where an export stands, for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportProgress {
    /// Files done so far (written or found unchanged).
    pub files_done: u64,
    /// Bytes done so far.
    pub bytes_done: u64,
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
/// Deletes every object under the target's prefix (a tenant's erasure);
/// returns how many. Safe to run again.
pub async fn erase_all(target: &Target) -> Result<u64> {
    use futures::{StreamExt, TryStreamExt};
    let prefix = (!target.prefix.as_ref().is_empty()).then_some(&target.prefix);
    let listing = target
        .store
        .list(prefix)
        .map_ok(|meta| meta.location)
        .boxed();
    let deleted = target
        .store
        .delete_stream(listing)
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await?;
    Ok(deleted)
}

pub async fn export_snapshot(target: &Target, mut w: SinkWrite<'_>) -> Result<Written> {
    let mut upload = upload_snapshot(target, &mut w).await?;
    if !upload.stats.already_committed {
        commit_snapshot(target, &mut w, &mut upload).await?;
    }
    Ok(upload.stats)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::chunk::SnapshotId;
    use crate::chunker::ChunkParams;
    use crate::ingest::{ingest_dir, walk_dir, SnapshotBuilder};
    use crate::manifest::Manifest;
    use crate::pool::CpuPool;
    use crate::store::ChunkStore;
    use crate::store::MemStore;

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
        let loc = Location::Dir {
            path: later.clone(),
        };
        check_location(&loc, &s3).unwrap();
        assert!(!later.exists());
        assert!(open_target("file:///x?bogus=1", &s3).is_err());
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
            let mut b =
                SnapshotBuilder::new(store.clone(), "t", "d", ChunkParams::default()).unwrap();
            let entries = walk_dir(root).unwrap();
            ingest_dir(
                &mut b,
                root,
                &entries,
                &AtomicBool::new(false),
                &mut |_, _| {},
            )
            .unwrap();
            let built = b.finish(0).unwrap();
            (built.store_and_load(store.as_ref(), "t").unwrap(), built.id)
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
        let export_as = |m: &Manifest, id: &SnapshotId, token: u64, job: &str| {
            let root = crate::store::read_root(store.as_ref(), &m.tenant, id).unwrap();
            let mut last = ExportProgress::default();
            let writer = Writer {
                job: job.to_string(),
                token,
            };
            let r = rt.block_on(export_snapshot(
                &target,
                SinkWrite {
                    pool: &pool,
                    store: store.clone(),
                    manifest: &root,
                    snapshot: id,
                    writer: &writer,
                    stop: Arc::new(AtomicBool::new(false)),
                    on_progress: &mut |p| last = p,
                },
            ));
            (r, last)
        };
        let export = |m: &Manifest, id: &SnapshotId, token: u64| {
            export_as(m, id, token, &format!("j{token}"))
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
        // A page damaged in the sink is refused when read back, not decoded.
        let page = std::fs::read_dir(root.join(".bitclone/pages"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let good = std::fs::read(&page).unwrap();
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(&page, &bad).unwrap();
        assert!(matches!(
            rt.block_on(read_manifest(&target, &id)),
            Err(Error::CorruptChunk { .. })
        ));
        std::fs::write(&page, &good).unwrap();

        // The same job again: nothing written, nothing committed twice.
        let again = export(&m, &id, 1).0.unwrap();
        assert!(again.already_committed);
        assert_eq!(rt.block_on(list_commits(&target)).unwrap().len(), 1);
        // The same job taken over with a newer lease after its first holder
        // committed (and lost the lease before recording it): the snapshot
        // is there, by this job; not committed a second time.
        let takeover = export_as(&m, &id, 2, "j1").0.unwrap();
        assert!(takeover.already_committed);
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
