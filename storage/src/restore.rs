//! Reading out of an object-store sink: restoring a committed snapshot into a
//! directory without the cluster, and objects as a clone source.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use tokio::io::AsyncWriteExt;

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::export::{self, join, sink_error, Target, META_DIR};
use crate::ingest::{ingest_stream, SnapshotBuilder};
use crate::manifest::{EntryKind, Manifest};
use crate::path::validate_path;
use crate::store::ChunkStore;

/// Picks the snapshot to restore: `wanted` if a commit record names it, else
/// the committed one with the highest fencing token. Uncommitted manifests
/// are never trusted.
pub async fn committed_snapshot(
    target: &Target,
    wanted: Option<&SnapshotId>,
) -> Result<(export::CommitRecord, Manifest)> {
    let commits = export::list_commits(target).await?;
    let (token, snapshot) = match wanted {
        Some(id) => {
            let hex = id.to_hex();
            commits
                .iter()
                .rev()
                .find(|(_, s)| *s == hex)
                .cloned()
                .ok_or_else(|| {
                    Error::not_found("committed snapshot", format!("{id} in {}", target.url))
                })?
        }
        None => commits.last().cloned().ok_or_else(|| {
            Error::not_found(
                "committed snapshot",
                format!(
                    "in {} (no commit records under {META_DIR}/commits)",
                    target.url
                ),
            )
        })?,
    };
    read_committed(target, token, &snapshot).await
}

/// The commit record `(token, snapshot)` (a name from
/// [`export::list_commits`]) and the manifest it vouches for.
pub async fn read_committed(
    target: &Target,
    token: u64,
    snapshot: &str,
) -> Result<(export::CommitRecord, Manifest)> {
    let record = export::read_commit(target, token, snapshot).await?;
    let manifest = export::read_manifest(target, &record.snapshot_id()?).await?;
    Ok((record, manifest))
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Rebuilds `manifest` under `dir` (missing or empty) from the objects of
/// `target`, checking every file's size and BLAKE3 against the manifest.
/// Each file is written into a staging directory next to `dir` and renamed
/// into place once verified, so nothing unverified is left under a real name.
/// Set-user-id and set-group-id bits are not restored.
pub async fn restore_into(
    target: &Target,
    manifest: &Manifest,
    dir: &Path,
    progress: &(dyn Fn(RestoreStats) + Sync),
) -> Result<RestoreStats> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "restore target {} is not empty",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        }
        Err(e) => return Err(Error::io("read", dir, e)),
    }
    for e in &manifest.entries {
        validate_path(&e.path)?;
        let parent = match e.kind {
            EntryKind::Dir => dir.join(&e.path),
            EntryKind::File => match Path::new(&e.path).parent() {
                Some(p) => dir.join(p),
                None => dir.to_path_buf(),
            },
        };
        std::fs::create_dir_all(&parent).map_err(|err| Error::io("create", &parent, err))?;
    }
    // Files are written into a private directory next to `dir` (same file
    // system, so a rename moves them in), never under a name a snapshot
    // file could also have; it goes away whatever happens.
    let staging = staging_dir(dir)?;
    let result = restore_files(target, manifest, dir, &staging, progress).await;
    let _ = std::fs::remove_dir_all(&staging);
    let stats = result?;
    // Directory modes last: a read-only directory must not block its files.
    for e in manifest.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        let path = dir.join(&e.path);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(safe_mode(e.mode)))
            .map_err(|err| Error::io("chmod", &path, err))?;
    }
    Ok(stats)
}

/// Permission bits to restore: set-user-id and set-group-id are dropped, so
/// a restore (often run as root) never creates privileged executables from
/// what a bucket says.
fn safe_mode(mode: u32) -> u32 {
    mode & 0o1777
}

fn staging_dir(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "restore".into());
    let parent = dir.parent().unwrap_or(Path::new("."));
    let staging = parent.join(format!(
        ".{name}.bitclone-restore-{}-{}",
        std::process::id(),
        export::now_ms()
    ));
    std::fs::create_dir(&staging).map_err(|e| Error::io("create", &staging, e))?;
    Ok(staging)
}

async fn restore_files(
    target: &Target,
    manifest: &Manifest,
    dir: &Path,
    staging: &Path,
    progress: &(dyn Fn(RestoreStats) + Sync),
) -> Result<RestoreStats> {
    let mut files = futures::stream::iter(
        manifest
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == EntryKind::File),
    )
    .map(|(i, e)| async move {
        let path = dir.join(&e.path);
        let part = staging.join(i.to_string());
        restore_file(target, &e.path, &part, &path, e.size, &e.blake3).await?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(safe_mode(e.mode)))
            .map_err(|err| Error::io("chmod", &path, err))?;
        Ok::<_, Error>(e.size)
    })
    .buffer_unordered(target.concurrency)
    .boxed();
    let mut done = RestoreStats::default();
    while let Some(size) = files.try_next().await? {
        done.files += 1;
        done.bytes += size;
        progress(done);
    }
    Ok(done)
}

async fn restore_file(
    target: &Target,
    rel: &str,
    part: &Path,
    path: &Path,
    size: u64,
    want: &[u8; 32],
) -> Result<()> {
    let loc = join(&target.prefix, rel)?;
    let result = async {
        let got = target
            .store
            .get(&loc)
            .await
            .map_err(|e| sink_error(target, &format!("reading {rel}"), e))?;
        let mut stream = got.into_stream();
        let mut file = tokio::fs::File::create(part)
            .await
            .map_err(|e| Error::io("create", part, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut n = 0u64;
        while let Some(buf) = stream.next().await {
            let buf = buf.map_err(|e| sink_error(target, &format!("reading {rel}"), e))?;
            hasher.update(&buf);
            n += buf.len() as u64;
            if n > size {
                break;
            }
            file.write_all(&buf)
                .await
                .map_err(|e| Error::io("write", part, e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| Error::io("sync", part, e))?;
        let got = *hasher.finalize().as_bytes();
        if n != size || got != *want {
            return Err(Error::Sink {
                sink: target.url.clone(),
                detail: format!(
                    "object {rel} does not match the snapshot: {n} bytes with BLAKE3 {}, the manifest says {size} bytes with BLAKE3 {} (changed since the commit?)",
                    ChunkId(got),
                    ChunkId(*want)
                ),
                permanent: true,
            });
        }
        tokio::fs::rename(part, path)
            .await
            .map_err(|e| Error::io("rename", path, e))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(part);
    }
    result
}

/// A blocking reader over an object's byte stream, fed by an async task:
/// lets the chunker (on a blocking thread) read an object as it downloads.
struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    buf: Bytes,
}

impl Read for StreamReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}

/// Ingests every object under `target` (outside `.bitclone/`) into
/// `builder`: objects stream through the chunker on blocking threads (up to
/// the target's concurrency, and no more than the cores, two at least); an object whose
/// size and modification time match the parent snapshot is taken over
/// without reading it. Keys that are not safe relative paths are skipped
/// (keys object_store cannot parse at all, such as `a//b`, fail the listing)
/// (and reported by the builder). `progress(files, bytes)` follows the work.
pub async fn ingest_objects(
    target: &Target,
    store: Arc<dyn ChunkStore>,
    mut builder: SnapshotBuilder,
    cancel: Arc<AtomicBool>,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<SnapshotBuilder> {
    let mut objects = export::list_under(target, "listing the source").await?;
    objects.sort_by(|a, b| a.0.cmp(&b.0));
    // Empty "folder" objects (`dir/`, as S3 consoles make them) name a
    // directory that other keys are under: they are not files.
    let dirs: HashSet<&str> = objects
        .iter()
        .flat_map(|(rel, _)| rel.match_indices('/').map(move |(i, _)| &rel[..i]))
        .collect();
    let folders: HashSet<String> = objects
        .iter()
        .filter(|(rel, m)| m.size == 0 && dirs.contains(rel.as_str()))
        .map(|(rel, _)| rel.clone())
        .collect();
    objects.retain(|(rel, _)| !folders.contains(rel));
    let tenant = builder.tenant().to_string();
    let params = builder.chunking();
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut todo = Vec::new();
    for (rel, meta) in objects {
        let mtime_ns = meta
            .last_modified
            .timestamp_nanos_opt()
            .unwrap_or_else(|| meta.last_modified.timestamp().saturating_mul(1_000_000_000));
        if validate_path(&rel).is_err() {
            builder.skip(rel);
        } else if builder
            .unchanged(&rel, meta.size, mtime_ns, 0o644)
            .is_some()
        {
            builder.add_unchanged(&rel, meta.size, mtime_ns, 0o644)?;
            files += 1;
            bytes += meta.size;
            progress(files, bytes);
        } else {
            todo.push((rel, meta, mtime_ns));
        }
    }
    let mut results = futures::stream::iter(todo.into_iter().map(|(rel, meta, mtime_ns)| {
        let (store, tenant, cancel) = (store.clone(), tenant.clone(), cancel.clone());
        async move {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let got = target
                .store
                .get(&meta.location)
                .await
                .map_err(|e| sink_error(target, &format!("reading {rel}"), e))?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut stream = got.into_stream();
            let feeder = tokio::spawn(async move {
                while let Some(b) = stream.next().await {
                    let b = b.map_err(|e| std::io::Error::other(e.to_string()));
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
            });
            let source = PathBuf::from(format!("{}/{rel}", target.url));
            // On a blocking thread, not the CPU pool: this reader waits on
            // the network, and the pool's few threads serve the whole node.
            let data = tokio::task::spawn_blocking(move || {
                let reader = StreamReader {
                    rx,
                    buf: Bytes::new(),
                };
                ingest_stream(
                    store.as_ref(),
                    &tenant,
                    params,
                    reader,
                    &source,
                    &cancel,
                    &mut |_| {},
                )
            })
            .await
            .map_err(|_| Error::Panicked)
            .and_then(|r| r);
            feeder.abort();
            Ok((rel, mtime_ns, data?))
        }
    }))
    .buffered(target.concurrency.min(cores()))
    .boxed();
    while let Some(r) = results.next().await {
        let (rel, mtime_ns, data) = r?;
        files += 1;
        bytes += data.size;
        builder.add_file(&rel, 0o644, mtime_ns, data)?;
        progress(files, bytes);
    }
    Ok(builder)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}
