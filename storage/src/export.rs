//! Writing snapshots out: reading a file's chunks back, and the object-store sink.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::chunk::SnapshotId;
use crate::error::{Error, Result};
use crate::manifest::{ChunkRef, EntryKind, Manifest};
use crate::pool::CpuPool;
use crate::store::ChunkStore;

/// Files at least this large are sent as multipart uploads.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Target size of one multipart part (S3 needs at least 5 MiB but the last).
pub const PART_BYTES: u64 = 8 << 20;

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

/// Where an object-store export stands; saved as a job checkpoint so that a
/// retried export skips the files already written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportProgress {
    /// Index into the manifest's entries of the next entry to write.
    pub next_entry: usize,
    /// Files written so far.
    pub files_done: u64,
    /// Bytes written so far.
    pub bytes_done: u64,
}

/// Name of the commit record written last under the export prefix.
pub const COMMIT_RECORD: &str = ".bitclone/SNAPSHOT";

/// Writes every file of `manifest` as the object `prefix/path`, then the
/// manifest and the commit record (`prefix/.bitclone/SNAPSHOT`, last: a reader
/// trusts an export only once it names the snapshot).
///
/// Starts at `from` (a checkpoint of an earlier attempt) and reports each
/// finished file through `on_progress`. Chunk reads run on `pool`; large files
/// stream as multipart uploads so memory stays within a few parts.
///
/// Not cancel-safe in the middle of a multipart upload: use `cancel`, which
/// aborts the upload cleanly, instead of dropping the future.
#[allow(clippy::too_many_arguments)]
pub async fn export_snapshot(
    pool: &CpuPool,
    store: Arc<dyn ChunkStore>,
    manifest: &Manifest,
    id: &SnapshotId,
    dest: Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
    from: ExportProgress,
    cancel: Arc<AtomicBool>,
    on_progress: &mut (dyn FnMut(ExportProgress) + Send),
) -> Result<()> {
    let tenant = manifest.tenant.clone();
    let mut at = from;
    for (i, entry) in manifest.entries.iter().enumerate().skip(from.next_entry) {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        if entry.kind == EntryKind::File {
            let location = join(prefix, &entry.path)?;
            if entry.size < MULTIPART_THRESHOLD {
                let (s, t, c) = (store.clone(), tenant.clone(), entry.chunks.clone());
                let data = pool.run(move || read_chunks(s.as_ref(), &t, &c)).await?;
                dest.put(&location, PutPayload::from(data)).await?;
            } else {
                put_multipart(
                    pool,
                    &store,
                    &tenant,
                    &entry.chunks,
                    &dest,
                    &location,
                    &cancel,
                )
                .await?;
            }
            at.files_done += 1;
            at.bytes_done += entry.size;
        }
        at.next_entry = i + 1;
        on_progress(at);
    }
    let bytes = manifest.encode()?;
    dest.put(
        &join(prefix, &format!(".bitclone/manifests/{}", id.to_hex()))?,
        PutPayload::from(bytes),
    )
    .await?;
    dest.put(
        &join(prefix, COMMIT_RECORD)?,
        PutPayload::from(format!("{}\n", id.to_hex()).into_bytes()),
    )
    .await?;
    Ok(())
}

async fn put_multipart(
    pool: &CpuPool,
    store: &Arc<dyn ChunkStore>,
    tenant: &str,
    chunks: &[ChunkRef],
    dest: &Arc<dyn ObjectStore>,
    location: &ObjectPath,
    cancel: &AtomicBool,
) -> Result<()> {
    let mut upload = dest.put_multipart(location).await?;
    let result = async {
        let mut start = 0;
        while start < chunks.len() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let mut end = start;
            let mut bytes = 0u64;
            while end < chunks.len() && bytes < PART_BYTES {
                bytes += u64::from(chunks[end].len);
                end += 1;
            }
            let (s, t, c) = (
                store.clone(),
                tenant.to_string(),
                chunks[start..end].to_vec(),
            );
            let data = pool.run(move || read_chunks(s.as_ref(), &t, &c)).await?;
            upload.put_part(PutPayload::from(data)).await?;
            start = end;
        }
        upload.complete().await?;
        Ok(())
    }
    .await;
    if result.is_err() {
        // Leave no half-written object behind; the original error matters more.
        let _ = upload.abort().await;
    }
    result
}

fn join(prefix: &ObjectPath, rel: &str) -> Result<ObjectPath> {
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

/// Opens an object-store destination URL. Today: `file:///abs/dir` (object
/// store's local filesystem backend; the directory is created).
pub fn open_destination(url: &str) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
    let parsed = url::Url::parse(url)
        .map_err(|e| Error::InvalidArgument(format!("destination {url:?}: {e}")))?;
    match parsed.scheme() {
        "file" => {
            let path = parsed.to_file_path().map_err(|_| {
                Error::InvalidArgument(format!(
                    "destination {url:?} is not an absolute file:// path"
                ))
            })?;
            std::fs::create_dir_all(&path)
                .map_err(|e| Error::io("create destination", &path, e))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&path)?;
            Ok((Arc::new(fs), ObjectPath::default()))
        }
        other => Err(Error::InvalidArgument(format!(
            "destination scheme {other}:// is not supported by this build (supported: file://)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::ChunkParams;
    use crate::ingest::{ingest_dir, walk_dir, SnapshotBuilder};
    use crate::store::MemStore;

    #[test]
    fn export_to_local_object_store_is_byte_identical() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/small"), b"small file").unwrap();
        let big: Vec<u8> = (0..(20u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(src.path().join("big"), &big).unwrap();
        std::fs::write(src.path().join("empty"), b"").unwrap();

        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let mut b = SnapshotBuilder::new("t", "d", None, ChunkParams::default()).unwrap();
        let entries = walk_dir(src.path()).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        ingest_dir(
            store.as_ref(),
            &mut b,
            src.path(),
            &entries,
            &cancel,
            &mut |_, _| {},
        )
        .unwrap();
        let (m, _) = b.finish(0).unwrap();
        let (id, _) = m.encode_with_id().unwrap();

        let out = tempfile::tempdir().unwrap();
        let url = format!("file://{}/export", out.path().display());
        let (dest, prefix) = open_destination(&url).unwrap();
        let pool = CpuPool::new(2, "t").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut last = ExportProgress::default();
        rt.block_on(export_snapshot(
            &pool,
            store,
            &m,
            &id,
            dest,
            &prefix,
            ExportProgress::default(),
            cancel,
            &mut |p| last = p,
        ))
        .unwrap();
        assert_eq!(last.files_done, 3);
        let root = out.path().join("export");
        assert_eq!(std::fs::read(root.join("big")).unwrap(), big);
        assert_eq!(
            std::fs::read(root.join("a/b/small")).unwrap(),
            b"small file"
        );
        assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
        let commit = std::fs::read_to_string(root.join(COMMIT_RECORD)).unwrap();
        assert_eq!(commit.trim(), id.to_hex());
        assert!(open_destination("s3://bucket/x").is_err());
        assert!(open_destination("file://relative").is_err());
    }
}
