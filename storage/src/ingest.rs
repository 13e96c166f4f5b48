//! Turning bytes into stored chunks and entries into snapshots.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::chunk::{ChunkId, SnapshotId};
use crate::chunker::{chunk_slice, ChunkParams, Chunker, ChunkerError};
use crate::error::{Error, Result};
use crate::manifest::{ChunkRef, Encoder, Entry, EntryKind, Manifest, Stored};
use crate::path::{validate_path, validate_symlink};
use crate::rocks::GcHold;
use crate::store::{load_manifest, ChunkStore, Entries};

/// One file's bytes after chunking and storing.
#[derive(Debug, Clone)]
pub struct Ingested {
    /// The chunks in order.
    pub chunks: Vec<ChunkRef>,
    /// BLAKE3 of the whole file.
    pub blake3: [u8; 32],
    /// Bytes read.
    pub size: u64,
    /// Chunks the store did not have yet.
    pub new_chunks: u64,
    /// Bytes of those chunks.
    pub new_bytes: u64,
}

/// Chunks `reader`, names every chunk by BLAKE3 and stores the new ones.
///
/// Blocking: run it on a [`crate::CpuPool`] worker. `source` names the stream
/// in errors; `cancel` is checked between chunks; `progress` gets byte counts.
pub fn ingest_stream<R: Read>(
    store: &dyn ChunkStore,
    tenant: &str,
    params: ChunkParams,
    reader: R,
    source: &Path,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<Ingested> {
    let codec = store.codec(tenant)?;
    let mut file_hash = blake3::Hasher::new();
    let mut out = Ingested {
        chunks: Vec::new(),
        blake3: [0; 32],
        size: 0,
        new_chunks: 0,
        new_bytes: 0,
    };
    let size = Chunker::new(reader, params)?
        .for_each_chunk(|data| {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            file_hash.update(data);
            let (id, stored) = codec.seal(data);
            if store.put_chunk(tenant, &id, &stored)? {
                out.new_chunks += 1;
                out.new_bytes += data.len() as u64;
            }
            out.chunks.push(ChunkRef {
                id,
                len: data.len() as u32,
            });
            progress(data.len() as u64);
            Ok(())
        })
        .map_err(|e| match e {
            ChunkerError::Read(e) => Error::io("read", source, e),
            ChunkerError::Sink(e) => e,
        })?;
    out.size = size;
    out.blake3 = *file_hash.finalize().as_bytes();
    Ok(out)
}

/// Cuts, names and stores files that arrived whole (small files, many at a
/// time), with one store write for all their new chunks. Blocking: run it
/// on a [`crate::CpuPool`] worker.
pub fn ingest_whole(
    store: &dyn ChunkStore,
    tenant: &str,
    params: ChunkParams,
    files: &[&[u8]],
) -> Result<Vec<Ingested>> {
    let codec = store.codec(tenant)?;
    let mut named: Vec<(ChunkId, std::borrow::Cow<[u8]>)> = Vec::new();
    let mut out = Vec::with_capacity(files.len());
    for data in files {
        let mut chunks = Vec::new();
        for c in chunk_slice(data, params) {
            let (id, stored) = codec.seal(c);
            chunks.push(ChunkRef {
                id,
                len: c.len() as u32,
            });
            named.push((id, stored));
        }
        // A one-chunk file's hash is its chunk's name, when chunks are
        // named by their content's plain hash.
        let blake3 = match chunks.as_slice() {
            [only] if codec.is_plain() => only.id.0,
            _ => *blake3::hash(data).as_bytes(),
        };
        out.push(Ingested {
            chunks,
            blake3,
            size: data.len() as u64,
            new_chunks: 0,
            new_bytes: 0,
        });
    }
    let named: Vec<(ChunkId, &[u8])> = named.iter().map(|(id, d)| (*id, &d[..])).collect();
    let mut new = store.put_chunks(tenant, &named)?.into_iter();
    for file in &mut out {
        for c in &file.chunks {
            if new.next() == Some(true) {
                file.new_chunks += 1;
                file.new_bytes += u64::from(c.len);
            }
        }
    }
    Ok(out)
}

/// Totals of one ingest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Regular files in the snapshot.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Chunks referenced by files that were read.
    pub chunks: u64,
    /// Chunks stored for the first time.
    pub new_chunks: u64,
    /// Bytes of those chunks.
    pub new_bytes: u64,
    /// Files taken over from the parent without being read.
    pub unchanged_files: u64,
    /// Symbolic links kept.
    pub symlinks: u64,
    /// Pages of the manifest stored for the first time (the others are
    /// shared with earlier snapshots).
    pub new_pages: u64,
    /// Bytes of those pages.
    pub new_page_bytes: u64,
    /// Source entries left out (sockets, devices, links leading out of the
    /// tree…), by path.
    pub skipped: Vec<String>,
}

/// Builds a new snapshot from its entries, given in path order, taking
/// unchanged files over from the parent snapshot.
///
/// Memory does not grow with the number of entries: the manifest's pages
/// are written to the store as they fill (each after the chunks it names),
/// and the parent's entries are read one page at a time alongside, so
/// lookups of unchanged files must come in path order too.
pub struct SnapshotBuilder {
    store: Arc<dyn ChunkStore>,
    tenant: String,
    dataset: String,
    parent_id: Option<SnapshotId>,
    /// The parent's entries not looked up yet, and the next of them.
    parent: Option<Entries>,
    next_parent: Option<Entry>,
    chunking: ChunkParams,
    encoder: Encoder,
    stats: IngestStats,
    hold: Option<Arc<GcHold>>,
    /// The tenant's data key fingerprint if it is encrypted.
    sealed_by: Option<String>,
}

/// A snapshot [`SnapshotBuilder::finish`] encoded: its pages are stored, its
/// root not yet (a node makes the pages durable first).
#[derive(Debug, Clone)]
pub struct Built {
    /// The snapshot id (BLAKE3 of the root).
    pub id: SnapshotId,
    /// The root's bytes.
    pub root: Vec<u8>,
    /// The snapshot it was taken against, if any.
    pub parent: Option<SnapshotId>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
    /// What the ingest did.
    pub stats: IngestStats,
    /// The builder's hold on garbage collection ([`SnapshotBuilder::holding`]):
    /// keep it until the snapshot is committed.
    pub hold: Option<Arc<GcHold>>,
    /// The fingerprint of the data key its pages and root were sealed
    /// with (`None`: stored in clear); a commit carries it, so that a
    /// snapshot built before its tenant was encrypted is refused.
    pub sealed_by: Option<String>,
}

impl Built {
    /// Stores the root (not synced) and reads the whole manifest back: for
    /// tools and tests, whose snapshots are small.
    pub fn store_and_load(&self, store: &dyn ChunkStore, tenant: &str) -> Result<Manifest> {
        store.put_manifest(tenant, &self.id, &self.root)?;
        load_manifest(store, tenant, &self.id)
    }
}

impl SnapshotBuilder {
    /// Starts a snapshot of `dataset` (with no parent: see
    /// [`SnapshotBuilder::with_parent`]) whose pages go to `store`.
    pub fn new(
        store: Arc<dyn ChunkStore>,
        tenant: &str,
        dataset: &str,
        chunking: ChunkParams,
    ) -> Result<Self> {
        chunking.validate()?;
        let codec = store.codec(tenant)?;
        Ok(SnapshotBuilder {
            store,
            tenant: tenant.to_string(),
            dataset: dataset.to_string(),
            parent_id: None,
            parent: None,
            next_parent: None,
            chunking,
            sealed_by: codec.key_id().map(str::to_string),
            encoder: Encoder::with_codec(codec),
            stats: IngestStats::default(),
            hold: None,
        })
    }

    /// Keeps `hold` (taken before the first lookup of the put) with the
    /// builder and then with what [`SnapshotBuilder::finish`] returns, so
    /// that garbage collection frees nothing the snapshot names before it
    /// is committed.
    pub fn holding(mut self, hold: GcHold) -> Self {
        self.hold = Some(Arc::new(hold));
        self
    }

    /// Makes the snapshot incremental against snapshot `id`, stored here as
    /// `stored` (from [`crate::store::read_root`]): files whose size, mtime and mode
    /// match its entries are taken over without being read.
    pub fn with_parent(mut self, id: SnapshotId, stored: Stored) -> Self {
        self.parent_id = Some(id);
        self.parent = Some(Entries::new(self.store.clone(), &self.tenant, stored));
        self.next_parent = None;
        self
    }

    /// Records `id` as the parent without its entries: used when the parent's
    /// manifest is not available here, so nothing can be skipped, but the
    /// lineage (and a compare-and-set on it) stays right.
    pub fn with_parent_id(mut self, id: Option<SnapshotId>) -> Self {
        self.parent_id = id;
        self
    }

    /// The parent snapshot, if any.
    pub fn parent_id(&self) -> Option<SnapshotId> {
        self.parent_id
    }

    /// The tenant the snapshot belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The dataset the snapshot is of.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    /// The chunking every file of this snapshot uses.
    pub fn chunking(&self) -> ChunkParams {
        self.chunking
    }

    /// The store the snapshot's chunks and pages go to.
    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// The parent's entry for `path`, reading the parent's pages forward
    /// to it; a path before one looked up earlier finds nothing.
    fn seek_parent(&mut self, path: &str) -> Result<Option<&Entry>> {
        while let Some(cursor) = &mut self.parent {
            if self
                .next_parent
                .as_ref()
                .is_some_and(|e| e.path.as_str() >= path)
            {
                break;
            }
            match cursor.next() {
                Some(e) => self.next_parent = Some(e?),
                None => {
                    self.parent = None;
                    self.next_parent = None;
                }
            }
        }
        Ok(self.next_parent.as_ref().filter(|e| e.path == path))
    }

    /// The parent's entry for `path` if it is a file with the same size,
    /// mtime and mode: such a file need not be read again. Lookups come in
    /// path order.
    pub fn unchanged(
        &mut self,
        path: &str,
        size: u64,
        mtime_ns: i64,
        mode: u32,
    ) -> Result<Option<Entry>> {
        Ok(self
            .seek_parent(path)?
            .filter(|e| {
                e.kind == EntryKind::File
                    && e.size == size
                    && e.mtime_ns == mtime_ns
                    && e.mode == mode
            })
            .cloned())
    }

    /// Takes a file over from the parent; fails if the parent has no matching entry.
    pub fn add_unchanged(&mut self, path: &str, size: u64, mtime_ns: i64, mode: u32) -> Result<()> {
        validate_path(path)?;
        // Out of order, the forward-only parent lookup would find nothing
        // and blame the parent.
        self.encoder.check_next(path)?;
        let entry = self.unchanged(path, size, mtime_ns, mode)?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{path:?} was sent as unchanged but the parent snapshot has no file with that size and mtime"
            ))
        })?;
        self.add_taken(entry)
    }

    /// Adds an entry as it is (an unchanged file found with
    /// [`SnapshotBuilder::unchanged`], or an entry of another snapshot).
    pub fn add_taken(&mut self, entry: Entry) -> Result<()> {
        if entry.kind == EntryKind::File {
            self.stats.unchanged_files += 1;
        }
        self.push(&entry)
    }

    /// Adds a file whose bytes were just ingested.
    pub fn add_file(&mut self, path: &str, mode: u32, mtime_ns: i64, data: Ingested) -> Result<()> {
        self.stats.chunks += data.chunks.len() as u64;
        self.stats.new_chunks += data.new_chunks;
        self.stats.new_bytes += data.new_bytes;
        self.push(&Entry {
            path: path.to_string(),
            kind: EntryKind::File,
            size: data.size,
            mode,
            mtime_ns,
            blake3: data.blake3,
            chunks: data.chunks,
            target: None,
        })
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, path: &str, mode: u32, mtime_ns: i64) -> Result<()> {
        self.push(&Entry::dir(path.to_string(), mode, mtime_ns))
    }

    /// Adds a symbolic link; a target leading outside the snapshot's root
    /// is refused.
    pub fn add_symlink(
        &mut self,
        path: &str,
        target: &str,
        mode: u32,
        mtime_ns: i64,
    ) -> Result<()> {
        self.push(&Entry::symlink(
            path.to_string(),
            target.to_string(),
            mode,
            mtime_ns,
        ))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    /// Records a source entry that was left out.
    pub fn skip(&mut self, path: String) {
        self.stats.skipped.push(path);
    }

    /// Hands the entry to the encoder (which checks it and its order) and
    /// stores the pages that fill.
    fn push(&mut self, entry: &Entry) -> Result<()> {
        let (store, tenant, stats) = (&self.store, &self.tenant, &mut self.stats);
        self.encoder.push(entry, &mut |id, page| {
            store_page(store.as_ref(), tenant, stats, id, page)
        })
    }

    /// Stores the last pages and returns the encoded snapshot; the caller
    /// stores its root. Blocking (writes pages).
    pub fn finish(mut self, created_unix_ms: i64) -> Result<Built> {
        // Counted from the entries as encoded: the root carries the same.
        self.stats.files = self.encoder.files();
        self.stats.bytes = self.encoder.bytes();
        let (store, tenant, stats) = (&self.store, &self.tenant, &mut self.stats);
        let (id, root) = self.encoder.finish(
            (tenant, &self.dataset),
            self.parent_id,
            created_unix_ms,
            self.chunking,
            &mut |id, page| store_page(store.as_ref(), tenant, stats, id, page),
        )?;
        Ok(Built {
            id,
            root,
            parent: self.parent_id,
            created_unix_ms,
            stats: self.stats,
            hold: self.hold,
            sealed_by: self.sealed_by,
        })
    }
}

/// Stores one manifest page as a chunk of `tenant`, counting it if new.
fn store_page(
    store: &dyn ChunkStore,
    tenant: &str,
    stats: &mut IngestStats,
    id: &ChunkId,
    page: &[u8],
) -> Result<()> {
    if store.put_chunk(tenant, id, page)? {
        stats.new_pages += 1;
        stats.new_page_bytes += page.len() as u64;
    }
    Ok(())
}

/// One entry found by [`walk_dir`].
#[derive(Debug, Clone)]
pub struct SourceEntry {
    /// Relative `/`-separated path.
    pub path: String,
    /// What it is; `None` for entries that cannot be cloned (sockets,
    /// devices, links leading out of the tree).
    pub kind: Option<EntryKind>,
    /// A symbolic link's target.
    pub target: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time in ns since the epoch.
    pub mtime_ns: i64,
}

/// Lists a directory tree, sorted by path, without following symlinks.
pub fn walk_dir(root: &Path) -> Result<Vec<SourceEntry>> {
    let meta = fs::metadata(root).map_err(|e| Error::io("read source directory", root, e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "source {} is not a directory",
            root.display()
        )));
    }
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))?;
        for item in rd {
            let item = item.map_err(|e| Error::io("read directory", &dir, e))?;
            let name = item
                .file_name()
                .into_string()
                .map_err(|n| Error::InvalidPath {
                    path: format!("{}/{}", dir.display(), n.to_string_lossy()),
                    reason: "not valid UTF-8",
                })?;
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let full = item.path();
            let md = fs::symlink_metadata(&full).map_err(|e| Error::io("stat", &full, e))?;
            let ft = md.file_type();
            let mut target = None;
            let kind = if ft.is_file() {
                Some(EntryKind::File)
            } else if ft.is_dir() {
                stack.push((full.clone(), path.clone()));
                Some(EntryKind::Dir)
            } else if ft.is_symlink() {
                let t = fs::read_link(&full).map_err(|e| Error::io("read link", &full, e))?;
                let t = t
                    .into_os_string()
                    .into_string()
                    .map_err(|t| Error::InvalidPath {
                        path: format!("{} -> {}", full.display(), t.to_string_lossy()),
                        reason: "link target is not valid UTF-8",
                    })?;
                // A link out of the tree cannot be restored inside it.
                let inside = validate_symlink(&path, &t).is_ok();
                target = Some(t);
                inside.then_some(EntryKind::Symlink)
            } else {
                None
            };
            out.push(SourceEntry {
                path,
                kind,
                target,
                size: if ft.is_file() { md.len() } else { 0 },
                mode: md.permissions().mode() & 0o7777,
                mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Ingests a local directory tree into `builder` (blocking). Files whose size,
/// mtime and mode match the parent are not read. `progress(files, bytes)` is
/// called as work completes; `cancel` stops between chunks.
pub fn ingest_dir(
    builder: &mut SnapshotBuilder,
    root: &Path,
    entries: &[SourceEntry],
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let (store, tenant) = (builder.store.clone(), builder.tenant.clone());
    let (mut files_done, mut bytes_done) = (0u64, 0u64);
    for e in entries {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        match e.kind {
            None => builder.skip(e.path.clone()),
            Some(EntryKind::Dir) => builder.add_dir(&e.path, e.mode, e.mtime_ns)?,
            Some(EntryKind::Symlink) => builder.add_symlink(
                &e.path,
                e.target.as_deref().unwrap_or_default(),
                e.mode,
                e.mtime_ns,
            )?,
            Some(EntryKind::File) => {
                if let Some(old) = builder.unchanged(&e.path, e.size, e.mtime_ns, e.mode)? {
                    builder.add_taken(old)?;
                    bytes_done += e.size;
                } else {
                    let full = root.join(&e.path);
                    let file =
                        fs::File::open(&full).map_err(|err| Error::io("open", &full, err))?;
                    let data = ingest_stream(
                        store.as_ref(),
                        &tenant,
                        builder.chunking,
                        file,
                        &full,
                        cancel,
                        &mut |n| {
                            bytes_done += n;
                            progress(files_done, bytes_done);
                        },
                    )?;
                    builder.add_file(&e.path, e.mode, e.mtime_ns, data)?;
                }
                files_done += 1;
                progress(files_done, bytes_done);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn incremental_dir_ingest_reads_only_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("sub/empty")).unwrap();
        fs::write(root.join("a.txt"), b"hello").unwrap();
        fs::write(root.join("sub/b.bin"), vec![7u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("sub/out")).unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let cancel = AtomicBool::new(false);
        let params = ChunkParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        };

        let mut b = SnapshotBuilder::new(store.clone(), "t", "d", params).unwrap();
        let entries = walk_dir(root).unwrap();
        ingest_dir(&mut b, root, &entries, &cancel, &mut |_, _| {}).unwrap();
        let built = b.finish(1).unwrap();
        let (m1, s1) = (
            built.store_and_load(store.as_ref(), "t").unwrap(),
            built.stats,
        );
        assert_eq!(s1.files, 2);
        assert_eq!(s1.bytes, 100_005);
        assert_eq!(s1.skipped, vec!["sub/out".to_string()]);
        assert_eq!(s1.symlinks, 1);
        assert_eq!(s1.new_pages, 1);
        let paths: Vec<_> = m1.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "link", "sub", "sub/b.bin", "sub/empty"]);
        assert_eq!(m1.entries[1].target.as_deref(), Some("a.txt"));
        let id1 = built.id;

        fs::write(root.join("a.txt"), b"hello, world").unwrap();
        let parent = crate::store::read_root(store.as_ref(), "t", &id1).unwrap();
        let mut b = SnapshotBuilder::new(store.clone(), "t", "d", params)
            .unwrap()
            .with_parent(id1, parent);
        let entries = walk_dir(root).unwrap();
        ingest_dir(&mut b, root, &entries, &cancel, &mut |_, _| {}).unwrap();
        let built = b.finish(2).unwrap();
        let (m2, s2) = (
            built.store_and_load(store.as_ref(), "t").unwrap(),
            built.stats,
        );
        assert_eq!(
            s2.unchanged_files, 1,
            "b.bin should be taken from the parent"
        );
        assert_eq!(s2.new_bytes, 12);
        assert_eq!(m2.parent, Some(id1));
        let a = m2.entries.iter().find(|e| e.path == "a.txt").unwrap();
        assert_eq!(a.blake3, *blake3::hash(b"hello, world").as_bytes());
    }

    /// A parent of many pages is read forward as the new snapshot's
    /// entries arrive: every unchanged file is found, none held twice.
    #[test]
    fn unchanged_files_are_found_across_the_parents_pages() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let data = ingest_whole(store.as_ref(), "t", ChunkParams::default(), &[b"x"]).unwrap();
        let mut b = SnapshotBuilder::new(store.clone(), "t", "d", ChunkParams::default()).unwrap();
        for i in 0..5000 {
            b.add_file(&format!("f{i:05}"), 0o644, 1, data[0].clone())
                .unwrap();
        }
        let first = b.finish(1).unwrap();
        assert!(first.stats.new_pages > 10, "{:?}", first.stats);
        store.put_manifest("t", &first.id, &first.root).unwrap();

        let parent = crate::store::read_root(store.as_ref(), "t", &first.id).unwrap();
        let mut b = SnapshotBuilder::new(store.clone(), "t", "d", ChunkParams::default())
            .unwrap()
            .with_parent(first.id, parent);
        for i in (0..5000).step_by(3) {
            let path = format!("f{i:05}");
            if i == 2001 {
                assert!(b.unchanged(&path, 1, 2, 0o644).unwrap().is_none());
                b.add_file(&path, 0o644, 2, data[0].clone()).unwrap();
            } else {
                b.add_unchanged(&path, 1, 1, 0o644).unwrap();
            }
        }
        b.add_dir("zz", 0o755, 0).unwrap();
        let second = b.finish(2).unwrap();
        assert_eq!(second.stats.unchanged_files, 1666);
        assert_eq!(second.stats.files, 1667);
        let m = second.store_and_load(store.as_ref(), "t").unwrap();
        assert_eq!(m.entries.len(), 1668);
    }

    #[test]
    fn entries_out_of_path_order_are_refused() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let mut b = SnapshotBuilder::new(store, "t", "d", ChunkParams::default()).unwrap();
        b.add_dir("b", 0o755, 0).unwrap();
        let err = b.add_dir("a", 0o755, 0).unwrap_err().to_string();
        assert!(err.contains("path order") && err.contains("\"a\""), "{err}");
        let err = b.add_dir("b", 0o755, 0).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
    }

    #[test]
    fn whole_files_match_streamed_ones_and_count_new_chunks_once() {
        let store = MemStore::new();
        let params = ChunkParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        };
        let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let files: Vec<&[u8]> = vec![b"", b"small", &big, b"small"];
        let got = ingest_whole(&store, "t", params, &files).unwrap();
        for (data, whole) in files.iter().zip(&got) {
            let streamed = ingest_stream(
                &MemStore::new(),
                "t",
                params,
                *data,
                Path::new("x"),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(whole.chunks, streamed.chunks);
            assert_eq!(whole.blake3, streamed.blake3);
            assert_eq!(whole.size, data.len() as u64);
        }
        assert!(got[2].chunks.len() > 1);
        // "small" twice: stored once.
        assert_eq!((got[1].new_chunks, got[3].new_chunks), (1, 0));
        assert_eq!(got.iter().map(|f| f.new_bytes).sum::<u64>(), 100_005);
    }

    #[test]
    fn duplicate_and_unsafe_paths_are_refused() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let mut b = SnapshotBuilder::new(store.clone(), "t", "d", ChunkParams::default()).unwrap();
        assert!(b.add_dir("../up", 0o755, 0).is_err());
        b.add_dir("x", 0o755, 0).unwrap();
        assert!(b.add_dir("x", 0o755, 0).is_err());
        let mut b = SnapshotBuilder::new(store, "t", "d", ChunkParams::default()).unwrap();
        assert!(b.add_unchanged("f", 1, 1, 0o644).is_err());
        assert!(b.add_symlink("l", "../outside", 0o777, 0).is_err());
        assert!(b.add_symlink("l", "/abs", 0o777, 0).is_err());
    }

    #[test]
    fn missing_source_is_a_clear_error() {
        let err = walk_dir(Path::new("/nonexistent/bitclone/src")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/bitclone/src"),
            "{err}"
        );
    }
}
