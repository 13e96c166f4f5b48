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
use crate::manifest::{EntryKind, Stored};
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
) -> Result<(objects::CommitRecord, Stored)> {
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
/// [`objects::list_commits`]) and the stored root of the manifest it
/// vouches for (its entries: [`objects::sink_entries`]).
pub async fn read_committed(
    target: &Target,
    token: u64,
    snapshot: &str,
) -> Result<(objects::CommitRecord, Stored)> {
    let record = objects::read_commit(target, token, snapshot).await?;
    let root = objects::read_root(target, &record.manifest_id()?).await?;
    Ok((record, root))
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Rebuilds the snapshot `root` (from [`read_committed`]) under `dir`
/// (missing or empty) from the objects of `target`, checking every file's
/// size and BLAKE3 against the manifest.
///
/// The manifest is read from the sink a page at a time, in passes: every
/// path and link target is checked before anything is written (a bad path
/// or link leaves nothing behind), then directories and files, then links.
/// A file whose object does not match stops the restore with the verified
/// files before it in place.
/// Each file is written into a staging directory next to `dir` and renamed
/// into place once verified, so nothing unverified is left under a real name.
/// Set-user-id and set-group-id bits are not restored. Directory modes are
/// set last, from a list of the directories (the only thing held per entry).
pub async fn restore_into(
    target: &Target,
    root: &Stored,
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("read", dir, e)),
    }
    let mut entries = objects::sink_entries(target, root.clone()).into_stream();
    while let Some(e) = entries.try_next().await? {
        validate_path(&e.path)?;
        if e.kind == EntryKind::Symlink {
            validate_symlink(&e.path, e.target.as_deref().unwrap_or_default())?;
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    // Files are written into a private directory next to `dir` (same file
    // system, so a rename moves them in), never under a name a snapshot
    // file could also have; it goes away whatever happens.
    let staging = staging_dir(dir)?;
    let result = restore_files(target, root, dir, &staging, progress).await;
    let _ = std::fs::remove_dir_all(&staging);
    let (stats, dirs) = result?;
    // Links after every file, so that no file is ever written through one
    // (a link where a directory of the snapshot is fails to be created).
    let mut entries = objects::sink_entries(target, root.clone()).into_stream();
    while let Some(e) = entries.try_next().await? {
        if e.kind == EntryKind::Symlink {
            let path = dir.join(&e.path);
            std::os::unix::fs::symlink(e.target.as_deref().unwrap_or_default(), &path)
                .map_err(|err| Error::io("symlink", &path, err))?;
        }
    }
    // Directory modes last: a read-only directory must not block its files.
    for (rel, mode) in dirs {
        let path = dir.join(&rel);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(safe_mode(mode)))
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

/// Creates the directories and writes the files, as the manifest streams
/// by; returns what it wrote and the directories with their modes.
async fn restore_files(
    target: &Target,
    root: &Stored,
    dir: &Path,
    staging: &Path,
    progress: &(dyn Fn(RestoreStats) + Sync),
) -> Result<(RestoreStats, Vec<(String, u32)>)> {
    let mut dirs = Vec::new();
    // The parent made last: files of one directory come in a row.
    let mut made = PathBuf::new();
    let mut files = objects::sink_entries(target, root.clone())
        .into_stream()
        .enumerate()
        .map(|(i, e)| {
            let e = e?;
            let parent = match e.kind {
                EntryKind::Dir => {
                    dirs.push((e.path.clone(), e.mode));
                    dir.join(&e.path)
                }
                EntryKind::File | EntryKind::Symlink => match Path::new(&e.path).parent() {
                    Some(p) => dir.join(p),
                    None => dir.to_path_buf(),
                },
            };
            if parent != made {
                std::fs::create_dir_all(&parent)
                    .map_err(|err| Error::io("create", &parent, err))?;
                made = parent;
            }
            Ok::<_, Error>((e.kind == EntryKind::File).then_some((i, e)))
        })
        .try_filter_map(|f| futures::future::ready(Ok(f)))
        .map_ok(|(i, e)| async move {
            let path = dir.join(&e.path);
            let part = staging.join(i.to_string());
            restore_file(target, &e.path, &part, &path, e.size, &e.blake3).await?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(safe_mode(e.mode)))
                .map_err(|err| Error::io("chmod", &path, err))?;
            Ok::<_, Error>(e.size)
        })
        .try_buffer_unordered(target.concurrency)
        .boxed();
    let mut done = RestoreStats::default();
    while let Some(size) = files.try_next().await? {
        done.files += 1;
        done.bytes += size;
        progress(done);
    }
    drop(files);
    Ok((done, dirs))
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
