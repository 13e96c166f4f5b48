//! Reading out of an object-store sink: restoring a committed snapshot into a
//! directory without the cluster. (Objects as a clone source are in
//! [`super::source`].)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use tokio::io::AsyncWriteExt;

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::manifest::{EntryKind, Manifest};
use crate::path::{validate_path, validate_symlink};
use crate::sink::now_ms;
use crate::sink::objects::layout::join;
use crate::sink::objects::s3::sink_error;
use crate::sink::objects::{self, Target, META_DIR};

/// Picks the snapshot to restore: `wanted` if a commit record names it, else
/// the committed one with the highest fencing token. Uncommitted manifests
/// are never trusted.
pub async fn committed_snapshot(
    target: &Target,
    wanted: Option<&SnapshotId>,
) -> Result<(objects::CommitRecord, Manifest)> {
    let commits = objects::list_commits(target).await?;
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
/// [`objects::list_commits`]) and the manifest it vouches for.
pub async fn read_committed(
    target: &Target,
    token: u64,
    snapshot: &str,
) -> Result<(objects::CommitRecord, Manifest)> {
    let record = objects::read_commit(target, token, snapshot).await?;
    let manifest = objects::read_manifest(target, &record.snapshot_id()?).await?;
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
            EntryKind::File | EntryKind::Symlink => match Path::new(&e.path).parent() {
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
    // Links after every file, so that no file is ever written through one
    // (a link where a directory of the snapshot is fails to be created).
    for e in manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Symlink)
    {
        let target = e.target.as_deref().unwrap_or_default();
        validate_symlink(&e.path, target)?;
        let path = dir.join(&e.path);
        std::os::unix::fs::symlink(target, &path)
            .map_err(|err| Error::io("symlink", &path, err))?;
    }
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
        now_ms()
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
