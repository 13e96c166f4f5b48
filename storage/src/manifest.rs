//! Manifests: the entries of one snapshot, in a versioned binary encoding.
//!
//! Format v2 (written by this build) stores a manifest as a tree of
//! content-addressed pages under a small root; format v1 (one blob holding
//! every entry) is still read. All integers are little-endian.
//!
//! ```text
//! root v2: magic "BCMF" | u16 version=2 | str tenant | str dataset
//!          | u8 has_parent [32 parent] | i64 created_unix_ms | u32 min | u32 avg | u32 max
//!          | u64 entries | u64 files | u64 bytes | u8 height | u32 n | (32 page id, u64 entries)*n
//! page:    magic "BCMP" | u8 level | u32 n | item*n
//!          level 0 items are entries; level L > 0 items are (32 page id, u64 entries)
//!          naming pages of level L - 1
//! entry:   u8 kind | str path | u64 size | u32 mode | i64 mtime_ns | [32 blake3]
//!          | u32 chunk_count | (32 id, u32 len)* | kind 2 (link) only: str target
//! str:     u32 byte_len | UTF-8 bytes
//! v1:      magic "BCMF" | u16 version=1 | the root's fields up to u32 max
//!          | u64 entry_count | entry*   (kinds 0 and 1 only)
//! ```
//!
//! A snapshot is named by the BLAKE3 of its root, a page by the BLAKE3 of its
//! bytes, so encoding is canonical: entries are sorted by path and unique
//! (decoding checks that too, across pages), and where pages end depends
//! only on the entries. A leaf page ends after an entry whose path hashes
//! below a threshold (one path in [`LEAF_FANOUT`]) or once it holds
//! [`PAGE_SOFT_BYTES`]; an index page ends after a child whose id does. An
//! edit therefore changes the page holding the entry and the pages above it,
//! and adding or removing a path at most its neighbours too: an incremental
//! snapshot shares all other pages with its parent, and stores, sends and
//! exports only the new ones. Pages are stored as chunks of the tenant, each
//! written after everything it names, so a store holding a page holds the
//! whole subtree below it (which lets replication and repair skip subtrees
//! the other side already has).

use crate::chunk::{ChunkId, SnapshotId};
use crate::chunker::ChunkParams;
use crate::crypt::Codec;
use crate::error::{Error, Result};
use crate::path::{validate_path, validate_symlink};

const MAGIC: &[u8; 4] = b"BCMF";
const PAGE_MAGIC: &[u8; 4] = b"BCMP";
/// The manifest format version this build writes.
pub const FORMAT_VERSION: u16 = 2;
/// A leaf page ends after one in this many paths, on average.
pub const LEAF_FANOUT: u32 = 64;
/// An index page ends after one in this many children, on average.
pub const INDEX_FANOUT: u32 = 64;
/// A page ends once it holds at least this many bytes.
pub const PAGE_SOFT_BYTES: usize = 256 << 10;
/// The largest page, well inside one peer frame or API message (4 MiB). A
/// single entry larger than this (a file of more than about 87,000 chunks,
/// some 85 GiB at the default chunk size) is refused.
pub const MAX_PAGE_BYTES: usize = 3 << 20;
/// The root names at most this many pages; more get another index level.
pub const ROOT_MAX_PAGES: usize = 256;
/// Deepest page tree accepted when decoding.
const MAX_HEIGHT: u8 = 8;
/// Smallest encoded entry (kind, empty path, fixed fields, no chunks).
const MIN_ENTRY_BYTES: usize = 61;
/// Encoded size of an index item (page id, entry count).
const INDEX_ITEM_BYTES: usize = 40;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with content.
    File,
    /// A directory (kept so that empty directories survive a round trip).
    Dir,
    /// A symbolic link; its target is in [`Entry::target`].
    Symlink,
}

/// One chunk of a file: its name and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk bytes.
    pub id: ChunkId,
    /// Length in bytes.
    pub len: u32,
}

/// One file, directory or symbolic link of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative `/`-separated path, validated by [`validate_path`].
    pub path: String,
    /// File, directory or symbolic link.
    pub kind: EntryKind,
    /// Length in bytes (0 for directories and links).
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// BLAKE3 of the whole file (of nothing for directories and links).
    pub blake3: [u8; 32],
    /// The file's chunks in order.
    pub chunks: Vec<ChunkRef>,
    /// Where a symbolic link points (validated by [`validate_symlink`]);
    /// `None` for files and directories.
    pub target: Option<String>,
}

impl Entry {
    /// A directory entry.
    pub fn dir(path: String, mode: u32, mtime_ns: i64) -> Entry {
        Entry {
            path,
            kind: EntryKind::Dir,
            size: 0,
            mode,
            mtime_ns,
            blake3: *blake3::hash(b"").as_bytes(),
            chunks: Vec::new(),
            target: None,
        }
    }

    /// A symbolic link entry.
    pub fn symlink(path: String, target: String, mode: u32, mtime_ns: i64) -> Entry {
        Entry {
            target: Some(target),
            kind: EntryKind::Symlink,
            ..Entry::dir(path, mode, mtime_ns)
        }
    }

    fn check(&self) -> Result<()> {
        validate_path(&self.path)?;
        let sum: u64 = self.chunks.iter().map(|c| u64::from(c.len)).sum();
        if sum != self.size {
            return Err(Error::decode(
                "manifest",
                format!(
                    "{:?}: chunks add up to {sum}, size is {}",
                    self.path, self.size
                ),
            ));
        }
        match (self.kind, &self.target) {
            (EntryKind::Symlink, Some(t)) if self.size == 0 => validate_symlink(&self.path, t),
            (EntryKind::File, None) => Ok(()),
            (EntryKind::Dir, None) if self.size == 0 => Ok(()),
            _ => Err(Error::decode(
                "manifest",
                format!(
                    "{:?}: a link target only on links; directories and links are empty",
                    self.path
                ),
            )),
        }
    }
}

/// The immutable description of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Owner of the dataset.
    pub tenant: String,
    /// Dataset the snapshot belongs to.
    pub dataset: String,
    /// The snapshot this one was taken incrementally against.
    pub parent: Option<SnapshotId>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
    /// Chunking used for this snapshot's files.
    pub chunking: ChunkParams,
    /// Entries sorted by path, unique.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Number of regular files.
    pub fn file_count(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .count() as u64
    }

    /// Encodes into format v2 after checking the entries (sorted, unique,
    /// safe paths and link targets, chunk lengths adding up to sizes).
    /// `emit(id, bytes)` receives every page, each after the pages it names;
    /// returns the snapshot id and the root's bytes.
    pub fn encode_pages(
        &self,
        emit: &mut dyn FnMut(&ChunkId, &[u8]) -> Result<()>,
    ) -> Result<(SnapshotId, Vec<u8>)> {
        let mut encoder = Encoder::new();
        for e in &self.entries {
            encoder.push(e, emit)?;
        }
        encoder.finish(
            (&self.tenant, &self.dataset),
            self.parent,
            self.created_unix_ms,
            self.chunking,
            emit,
        )
    }

    /// The snapshot id this manifest gets (its pages are not kept).
    pub fn id(&self) -> Result<SnapshotId> {
        Ok(self.encode_pages(&mut |_, _| Ok(()))?.0)
    }

    /// Decodes a format v1 manifest (one blob with every entry), validating
    /// everything. Use [`decode_root`] for stored bytes of either version.
    pub fn decode_v1(bytes: &[u8]) -> Result<Manifest> {
        match decode_root(bytes)? {
            Stored::V1(m) => Ok(m),
            Stored::V2(_) => Err(Error::decode(
                "manifest",
                "a v2 root, not a whole v1 manifest",
            )),
        }
    }

    fn check(&self) -> Result<()> {
        for (i, e) in self.entries.iter().enumerate() {
            e.check()?;
            if i > 0 && self.entries[i - 1].path >= e.path {
                return Err(Error::decode(
                    "manifest",
                    format!("entries not sorted/unique at {:?}", e.path),
                ));
            }
        }
        Ok(())
    }
}

/// Writes the fields a root (v2) and a whole manifest (v1) start with.
fn put_header(
    out: &mut Vec<u8>,
    version: u16,
    (tenant, dataset): (&str, &str),
    parent: Option<SnapshotId>,
    created_unix_ms: i64,
    chunking: ChunkParams,
) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    put_str(out, tenant);
    put_str(out, dataset);
    match &parent {
        Some(p) => {
            out.push(1);
            out.extend_from_slice(p.as_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&created_unix_ms.to_le_bytes());
    for v in [chunking.min_size, chunking.avg_size, chunking.max_size] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The error for an entry that does not come after `before` in path order.
fn order_error(before: &str, path: &str) -> Error {
    if before == path {
        Error::InvalidArgument(format!("path {path:?} appears twice"))
    } else {
        Error::InvalidArgument(format!(
            "entries must come in path order: {path:?} came after {before:?}"
        ))
    }
}

/// The last path and the totals of entries seen in order (by the encoder
/// and the walk alike: the root carries the totals).
#[derive(Default)]
struct Tally {
    last: Option<String>,
    entries: u64,
    files: u64,
    bytes: u64,
}

impl Tally {
    /// The last path, if `path` does not come after it.
    fn out_of_order(&self, path: &str) -> Option<&str> {
        self.last.as_deref().filter(|last| *last >= path)
    }

    fn count(&mut self, e: &Entry) {
        let last = self.last.get_or_insert_with(String::new);
        last.clear();
        last.push_str(&e.path);
        self.entries += 1;
        if e.kind == EntryKind::File {
            self.files += 1;
            self.bytes += e.size;
        }
    }
}

/// Encodes a manifest in format v2 from its entries, given one at a time in
/// path order. Leaf pages go to `emit` as they fill, so memory holds one
/// leaf page and the leaves' ids (40 bytes per ~64 entries), never the
/// entries: this is how a snapshot of millions of files is built.
pub struct Encoder {
    leaves: PageWriter,
    tally: Tally,
    scratch: Vec<u8>,
    codec: Codec,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// Starts an empty manifest, stored as it is.
    pub fn new() -> Encoder {
        Encoder::with_codec(Codec::Plain)
    }

    /// Starts an empty manifest whose pages and root are stored (and
    /// named) by `codec`: `emit` and [`Encoder::finish`] give stored forms.
    pub fn with_codec(codec: Codec) -> Encoder {
        Encoder {
            leaves: PageWriter::new(0),
            tally: Tally::default(),
            scratch: Vec::new(),
            codec,
        }
    }

    /// Adds the next entry after checking it (after the previous one in
    /// path order, safe path and link target, chunk lengths adding up to
    /// its size); `emit(id, bytes)` receives each page that fills.
    pub fn push(
        &mut self,
        e: &Entry,
        emit: &mut dyn FnMut(&ChunkId, &[u8]) -> Result<()>,
    ) -> Result<()> {
        e.check()?;
        self.check_next(&e.path)?;
        self.scratch.clear();
        put_entry(&mut self.scratch, e);
        if self.scratch.len() + 9 > MAX_PAGE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "{:?} has {} chunks, more than one manifest page holds; use a larger chunk size for it",
                e.path,
                e.chunks.len()
            )));
        }
        self.leaves
            .add(&self.codec, &self.scratch, 1, leaf_boundary(&e.path), emit)?;
        self.tally.count(e);
        Ok(())
    }

    /// Whether an entry at `path` may come next (after every path pushed).
    pub fn check_next(&self, path: &str) -> Result<()> {
        match self.tally.out_of_order(path) {
            Some(last) => Err(order_error(last, path)),
            None => Ok(()),
        }
    }

    /// Regular files added so far.
    pub fn files(&self) -> u64 {
        self.tally.files
    }

    /// Their total size.
    pub fn bytes(&self) -> u64 {
        self.tally.bytes
    }

    /// Emits the last leaf and the index pages and returns the snapshot id
    /// and the root's bytes, which start with the fields given here.
    pub fn finish(
        mut self,
        (tenant, dataset): (&str, &str),
        parent: Option<SnapshotId>,
        created_unix_ms: i64,
        chunking: ChunkParams,
        emit: &mut dyn FnMut(&ChunkId, &[u8]) -> Result<()>,
    ) -> Result<(SnapshotId, Vec<u8>)> {
        let codec = &self.codec;
        let mut level = self.leaves.finish(codec, emit)?;
        let mut height = 1u8;
        while level.len() > ROOT_MAX_PAGES {
            let mut index = PageWriter::new(height);
            for (id, entries) in &level {
                self.scratch.clear();
                self.scratch.extend_from_slice(id.as_bytes());
                self.scratch.extend_from_slice(&entries.to_le_bytes());
                index.add(codec, &self.scratch, *entries, index_boundary(id), emit)?;
            }
            level = index.finish(codec, emit)?;
            height += 1;
        }

        let mut root = Vec::with_capacity(128 + level.len() * INDEX_ITEM_BYTES);
        put_header(
            &mut root,
            FORMAT_VERSION,
            (tenant, dataset),
            parent,
            created_unix_ms,
            chunking,
        );
        for v in [self.tally.entries, self.tally.files, self.tally.bytes] {
            root.extend_from_slice(&v.to_le_bytes());
        }
        root.push(height);
        root.extend_from_slice(&(level.len() as u32).to_le_bytes());
        for (id, entries) in &level {
            root.extend_from_slice(id.as_bytes());
            root.extend_from_slice(&entries.to_le_bytes());
        }
        let (id, stored) = codec.seal(&root);
        Ok((SnapshotId(id.0), stored.into_owned()))
    }
}

/// Whether a leaf page ends after the entry at `path` (content-defined:
/// depends on the path alone, so edits do not move other pages' ends).
fn leaf_boundary(path: &str) -> bool {
    let h = blake3::hash(path.as_bytes());
    u32::from_le_bytes([
        h.as_bytes()[0],
        h.as_bytes()[1],
        h.as_bytes()[2],
        h.as_bytes()[3],
    ]) < u32::MAX / LEAF_FANOUT
}

/// Whether an index page ends after the child `id` (already a hash).
fn index_boundary(id: &ChunkId) -> bool {
    let b = id.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) < u32::MAX / INDEX_FANOUT
}

/// Collects the items of one level into pages.
struct PageWriter {
    level: u8,
    items: Vec<u8>,
    count: u32,
    entries: u64,
    done: Vec<(ChunkId, u64)>,
}

impl PageWriter {
    fn new(level: u8) -> Self {
        PageWriter {
            level,
            items: Vec::new(),
            count: 0,
            entries: 0,
            done: Vec::new(),
        }
    }

    fn add(
        &mut self,
        codec: &Codec,
        item: &[u8],
        entries: u64,
        boundary: bool,
        emit: &mut dyn FnMut(&ChunkId, &[u8]) -> Result<()>,
    ) -> Result<()> {
        if self.count > 0 && self.items.len() + item.len() + 9 > MAX_PAGE_BYTES {
            self.flush(codec, emit)?;
        }
        self.items.extend_from_slice(item);
        self.count += 1;
        self.entries += entries;
        if boundary || self.items.len() >= PAGE_SOFT_BYTES {
            self.flush(codec, emit)?;
        }
        Ok(())
    }

    fn flush(
        &mut self,
        codec: &Codec,
        emit: &mut dyn FnMut(&ChunkId, &[u8]) -> Result<()>,
    ) -> Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let mut page = Vec::with_capacity(9 + self.items.len());
        page.extend_from_slice(PAGE_MAGIC);
        page.push(self.level);
        page.extend_from_slice(&self.count.to_le_bytes());
        page.extend_from_slice(&self.items);
        let (id, stored) = codec.seal(&page);
        emit(&id, &stored)?;
        self.done.push((id, self.entries));
        self.items.clear();
        self.count = 0;
        self.entries = 0;
        Ok(())
    }

    fn finish(
        mut self,
        codec: &Codec,
        emit: &mut dyn FnMut(&ChunkId, &[u8]) -> Result<()>,
    ) -> Result<Vec<(ChunkId, u64)>> {
        self.flush(codec, emit)?;
        Ok(self.done)
    }
}

/// The stored form of a snapshot, as [`decode_root`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Format v1: the whole manifest in one blob.
    V1(Manifest),
    /// Format v2: a root naming pages.
    V2(Root),
}

/// The root of a v2 manifest: everything but the entries, which are in the
/// pages it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// Owner of the dataset.
    pub tenant: String,
    /// Dataset the snapshot belongs to.
    pub dataset: String,
    /// The snapshot this one was taken incrementally against.
    pub parent: Option<SnapshotId>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
    /// Chunking used for this snapshot's files.
    pub chunking: ChunkParams,
    /// Number of entries.
    pub entries: u64,
    /// Number of regular files.
    pub files: u64,
    /// Total bytes of the files.
    pub bytes: u64,
    /// Levels of pages (1: the root names leaf pages).
    pub height: u8,
    /// The top level's pages and the entries below each.
    pub pages: Vec<(ChunkId, u64)>,
}

impl Root {
    /// The whole manifest, given the entries of its pages (as [`Walk`]
    /// returned them).
    pub fn with_entries(self, entries: Vec<Entry>) -> Manifest {
        Manifest {
            tenant: self.tenant,
            dataset: self.dataset,
            parent: self.parent,
            created_unix_ms: self.created_unix_ms,
            chunking: self.chunking,
            entries,
        }
    }
}

impl Stored {
    /// The chunking the snapshot's files were cut with.
    pub fn chunking(&self) -> ChunkParams {
        match self {
            Stored::V1(m) => m.chunking,
            Stored::V2(r) => r.chunking,
        }
    }

    /// The owner of the dataset.
    pub fn tenant(&self) -> &str {
        match self {
            Stored::V1(m) => &m.tenant,
            Stored::V2(r) => &r.tenant,
        }
    }

    /// The dataset the snapshot belongs to.
    pub fn dataset(&self) -> &str {
        match self {
            Stored::V1(m) => &m.dataset,
            Stored::V2(r) => &r.dataset,
        }
    }

    /// The snapshot this one was taken incrementally against.
    pub fn parent(&self) -> Option<SnapshotId> {
        match self {
            Stored::V1(m) => m.parent,
            Stored::V2(r) => r.parent,
        }
    }

    /// Creation time, milliseconds since the Unix epoch.
    pub fn created_unix_ms(&self) -> i64 {
        match self {
            Stored::V1(m) => m.created_unix_ms,
            Stored::V2(r) => r.created_unix_ms,
        }
    }

    /// Number of entries.
    pub fn entry_count(&self) -> u64 {
        match self {
            Stored::V1(m) => m.entries.len() as u64,
            Stored::V2(r) => r.entries,
        }
    }

    /// Number of regular files.
    pub fn files(&self) -> u64 {
        match self {
            Stored::V1(m) => m.file_count(),
            Stored::V2(r) => r.files,
        }
    }

    /// Total bytes of the files.
    pub fn bytes(&self) -> u64 {
        match self {
            Stored::V1(m) => m.total_bytes(),
            Stored::V2(r) => r.bytes,
        }
    }
}

/// Decodes a stored root (v2) or whole manifest (v1).
pub fn decode_root(bytes: &[u8]) -> Result<Stored> {
    let mut r = Reader { buf: bytes };
    if r.take(4)? != MAGIC {
        return Err(Error::decode("manifest", "bad magic"));
    }
    let version = r.u16()?;
    if version != 1 && version != 2 {
        return Err(Error::decode(
            "manifest",
            format!("format version {version} is newer than this build understands (2)"),
        ));
    }
    let tenant = r.str()?;
    let dataset = r.str()?;
    let parent = match r.u8()? {
        0 => None,
        1 => Some(SnapshotId::from_slice(r.take(32)?)?),
        x => return Err(Error::decode("manifest", format!("bad parent flag {x}"))),
    };
    let created_unix_ms = r.i64()?;
    let chunking = ChunkParams {
        min_size: r.u32()?,
        avg_size: r.u32()?,
        max_size: r.u32()?,
    };
    if version == 1 {
        let count = r.u64()?;
        // Refuse counts the input cannot hold before allocating for them.
        if count > (r.buf.len() / MIN_ENTRY_BYTES) as u64 {
            return Err(Error::decode("manifest", "entry count exceeds input"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            entries.push(r.entry(false)?);
        }
        r.end()?;
        let m = Manifest {
            tenant,
            dataset,
            parent,
            created_unix_ms,
            chunking,
            entries,
        };
        m.check()?;
        return Ok(Stored::V1(m));
    }
    let (entries, files, bytes) = (r.u64()?, r.u64()?, r.u64()?);
    let height = r.u8()?;
    if height == 0 || height > MAX_HEIGHT {
        return Err(Error::decode(
            "manifest",
            format!("page tree of height {height}"),
        ));
    }
    let pages = r.index_items()?;
    r.end()?;
    if pages.is_empty() != (entries == 0)
        || pages.iter().map(|(_, n)| *n).sum::<u64>() != entries
        || files > entries
    {
        return Err(Error::decode(
            "manifest",
            format!(
                "root counts disagree: {entries} entries, {files} files, {} pages",
                pages.len()
            ),
        ));
    }
    Ok(Stored::V2(Root {
        tenant,
        dataset,
        parent,
        created_unix_ms,
        chunking,
        entries,
        files,
        bytes,
        height,
        pages,
    }))
}

/// One decoded page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    /// Level > 0: pages of the level below and the entries under each.
    Index(Vec<(ChunkId, u64)>),
    /// Level 0: entries.
    Leaf(Vec<Entry>),
}

impl Page {
    /// Checks `stored` bytes (from a replica or a sink) against the name
    /// `id`, opens them with the tenant's `codec` and decodes the page.
    pub fn open(codec: &Codec, id: &ChunkId, level: u8, stored: Vec<u8>) -> Result<Page> {
        Page::decode(id, level, &codec.open(id, stored)?)
    }

    /// Decodes the content of the page named `id` at `level` (read with
    /// [`crate::ChunkStore::get_chunk`], which checked it against its name),
    /// refusing bytes damaged in any way.
    pub fn decode(id: &ChunkId, level: u8, bytes: &[u8]) -> Result<Page> {
        let mut r = Reader { buf: bytes };
        if r.take(4)? != PAGE_MAGIC {
            return Err(Error::decode("manifest page", "bad magic"));
        }
        let found = r.u8()?;
        if found != level {
            return Err(Error::decode(
                "manifest page",
                format!("{id} is a level {found} page where level {level} belongs"),
            ));
        }
        let page = if level == 0 {
            let count = r.u32()? as usize;
            if count == 0 || count > r.buf.len() / MIN_ENTRY_BYTES {
                return Err(Error::decode(
                    "manifest page",
                    "entry count does not fit the page",
                ));
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                entries.push(r.entry(true)?);
            }
            Page::Leaf(entries)
        } else {
            let items = r.index_items()?;
            if items.is_empty() {
                return Err(Error::decode("manifest page", "empty index page"));
            }
            Page::Index(items)
        };
        r.end()?;
        Ok(page)
    }

    /// What the page names: child pages, or the distinct chunks of its files.
    pub fn children(&self) -> Vec<ChunkId> {
        match self {
            Page::Index(items) => items.iter().map(|(id, _)| *id).collect(),
            Page::Leaf(entries) => chunk_ids(entries),
        }
    }
}

/// The distinct chunks `entries` name, sorted.
pub fn chunk_ids(entries: &[Entry]) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = entries
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Reads a v2 manifest's entries page by page in path order, with no IO
/// of its own: `while let Some((id, level)) = w.next_page() { for e in
/// w.feed(&fetch(id)?)? {…} }`, then [`Walk::finish`] checks the root's
/// totals. It holds one page per level, never the whole manifest, and the
/// same code serves the chunk store, peers and object-store sinks.
pub struct Walk {
    root: Root,
    /// Per level being walked: the pages still to read and their entry counts.
    stack: Vec<(u8, std::vec::IntoIter<(ChunkId, u64)>)>,
    pending: Option<(ChunkId, u8, u64)>,
    tally: Tally,
}

impl Walk {
    /// Starts at `root`.
    pub fn new(root: Root) -> Walk {
        Walk {
            stack: vec![(root.height - 1, root.pages.clone().into_iter())],
            root,
            pending: None,
            tally: Tally::default(),
        }
    }

    /// The root being walked.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The next page to read (depth first, in path order) and its level.
    pub fn next_page(&mut self) -> Option<(ChunkId, u8)> {
        while let Some((level, items)) = self.stack.last_mut() {
            if let Some((id, n)) = items.next() {
                self.pending = Some((id, *level, n));
                return Some((id, *level));
            }
            self.stack.pop();
        }
        None
    }

    /// The pages that [`Walk::next_page`] returns after the one it returned
    /// last, as far as they are known without reading further (the rest of
    /// the current page's level): what a reader may fetch ahead.
    pub fn upcoming(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.stack
            .last()
            .into_iter()
            .flat_map(|(_, items)| items.as_slice().iter().map(|(id, _)| *id))
    }

    /// Takes the bytes of the page [`Walk::next_page`] asked for and
    /// returns its entries (none for an index page), each checked, and in
    /// order after every entry returned before.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Entry>> {
        let (id, level, expected) = self
            .pending
            .take()
            .ok_or_else(|| Error::decode("manifest page", "no page was asked for"))?;
        let page = Page::decode(&id, level, bytes)?;
        let found = match &page {
            Page::Index(items) => items.iter().map(|(_, n)| *n).sum::<u64>(),
            Page::Leaf(entries) => entries.len() as u64,
        };
        if found != expected {
            return Err(Error::decode(
                "manifest page",
                format!("{id} holds {found} entries where its parent says {expected}"),
            ));
        }
        match page {
            Page::Index(items) => {
                self.stack.push((level - 1, items.into_iter()));
                Ok(Vec::new())
            }
            Page::Leaf(entries) => {
                for e in &entries {
                    e.check()?;
                    if self.tally.out_of_order(&e.path).is_some() {
                        return Err(Error::decode(
                            "manifest",
                            format!("entries not sorted/unique at {:?}", e.path),
                        ));
                    }
                    self.tally.count(e);
                }
                Ok(entries)
            }
        }
    }

    /// Checks, once every page was fed, that they hold what the root says.
    pub fn finish(self) -> Result<Root> {
        if self.pending.is_some() || !self.stack.is_empty() {
            return Err(Error::decode("manifest", "pages left unread"));
        }
        let r = &self.root;
        let t = &self.tally;
        if (t.entries, t.files, t.bytes) != (r.entries, r.files, r.bytes) {
            return Err(Error::decode(
                "manifest",
                "pages disagree with the root's totals",
            ));
        }
        Ok(self.root)
    }
}

/// Decodes stored manifest bytes of either version, reading a v2 root's
/// pages through `fetch` (blocking). This holds every entry: for tools,
/// tests and small manifests; [`Walk`] reads one page at a time.
pub fn assemble(
    bytes: &[u8],
    fetch: &mut dyn FnMut(&ChunkId) -> Result<Vec<u8>>,
) -> Result<Manifest> {
    match decode_root(bytes)? {
        Stored::V1(m) => Ok(m),
        Stored::V2(root) => {
            let mut walk = Walk::new(root);
            let mut entries = Vec::new();
            while let Some((id, _)) = walk.next_page() {
                let page = fetch(&id)?;
                entries.append(&mut walk.feed(&page)?);
            }
            Ok(walk.finish()?.with_entries(entries))
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_entry(out: &mut Vec<u8>, e: &Entry) {
    out.push(match e.kind {
        EntryKind::File => 0,
        EntryKind::Dir => 1,
        EntryKind::Symlink => 2,
    });
    put_str(out, &e.path);
    out.extend_from_slice(&e.size.to_le_bytes());
    out.extend_from_slice(&e.mode.to_le_bytes());
    out.extend_from_slice(&e.mtime_ns.to_le_bytes());
    out.extend_from_slice(&e.blake3);
    out.extend_from_slice(&(e.chunks.len() as u32).to_le_bytes());
    for c in &e.chunks {
        out.extend_from_slice(c.id.as_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
    }
    if let Some(t) = &e.target {
        put_str(out, t);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::decode("manifest", "truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::decode("manifest", "trailing bytes"))
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::decode("manifest", "non-UTF-8 string"))
    }

    fn index_items(&mut self) -> Result<Vec<(ChunkId, u64)>> {
        let n = self.u32()? as usize;
        if n > self.buf.len() / INDEX_ITEM_BYTES {
            return Err(Error::decode("manifest", "page count exceeds input"));
        }
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            let id = ChunkId::from_slice(self.take(32)?)?;
            items.push((id, self.u64()?));
        }
        Ok(items)
    }

    fn entry(&mut self, symlinks: bool) -> Result<Entry> {
        let kind = match self.u8()? {
            0 => EntryKind::File,
            1 => EntryKind::Dir,
            2 if symlinks => EntryKind::Symlink,
            x => return Err(Error::decode("manifest", format!("unknown entry kind {x}"))),
        };
        let path = self.str()?;
        let size = self.u64()?;
        let mode = self.u32()?;
        let mtime_ns = self.i64()?;
        let blake3 = self.array::<32>()?;
        let n = self.u32()? as usize;
        if n > self.buf.len() / 36 {
            return Err(Error::decode("manifest", "chunk count exceeds input"));
        }
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            let id = ChunkId::from_slice(self.take(32)?)?;
            let len = self.u32()?;
            chunks.push(ChunkRef { id, len });
        }
        let target = match kind {
            EntryKind::Symlink => Some(self.str()?),
            _ => None,
        };
        Ok(Entry {
            path,
            kind,
            size,
            mode,
            mtime_ns,
            blake3,
            chunks,
            target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Format v1, as the previous release wrote it (for the stored fixture).
    fn encode_v1(m: &Manifest) -> Vec<u8> {
        let mut out = Vec::new();
        put_header(
            &mut out,
            1,
            (&m.tenant, &m.dataset),
            m.parent,
            m.created_unix_ms,
            m.chunking,
        );
        out.extend_from_slice(&(m.entries.len() as u64).to_le_bytes());
        for e in &m.entries {
            put_entry(&mut out, e);
        }
        out
    }

    fn file(path: &str, content: &[u8]) -> Entry {
        let id = ChunkId::of(content);
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            size: content.len() as u64,
            mode: 0o644,
            mtime_ns: 1_700_000_000_000_000_000,
            blake3: *blake3::hash(content).as_bytes(),
            chunks: if content.is_empty() {
                vec![]
            } else {
                vec![ChunkRef {
                    id,
                    len: content.len() as u32,
                }]
            },
            target: None,
        }
    }

    /// The manifest stored in `tests/fixtures/manifest-v1.bin`.
    pub(crate) fn fixture_manifest() -> Manifest {
        let c1 = ChunkId::of(b"chunk one");
        let c2 = ChunkId::of(b"chunk two");
        Manifest {
            tenant: "acme".into(),
            dataset: "training-set".into(),
            parent: Some(SnapshotId::of(b"parent")),
            created_unix_ms: 1_764_000_000_000,
            chunking: ChunkParams::default(),
            entries: vec![
                Entry::dir("data".into(), 0o755, 1_700_000_000_000_000_000),
                Entry {
                    path: "data/a.bin".into(),
                    kind: EntryKind::File,
                    size: 9 + 9,
                    mode: 0o644,
                    mtime_ns: 1_700_000_000_123_456_789,
                    blake3: *blake3::hash(b"chunk onechunk two").as_bytes(),
                    chunks: vec![ChunkRef { id: c1, len: 9 }, ChunkRef { id: c2, len: 9 }],
                    target: None,
                },
                Entry {
                    mode: 0o600,
                    mtime_ns: -5,
                    ..file("empty", b"")
                },
            ],
        }
    }

    /// A manifest of `n` small files in 100 directories, plus links.
    fn big(n: usize) -> Manifest {
        let mut entries = Vec::new();
        for d in 0..100 {
            entries.push(Entry::dir(format!("class{d:03}"), 0o755, 1));
        }
        for i in 0..n {
            let body = format!("file body {i}");
            entries.push(file(
                &format!("class{:03}/img{i:07}.jpg", i % 100),
                body.as_bytes(),
            ));
        }
        entries.push(Entry::symlink(
            "class000/latest".into(),
            "img0000000.jpg".into(),
            0o777,
            1,
        ));
        entries.push(Entry::symlink("top".into(), "class001".into(), 0o777, 1));
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Manifest {
            tenant: "t".into(),
            dataset: "d".into(),
            parent: None,
            created_unix_ms: 7,
            chunking: ChunkParams::default(),
            entries,
        }
    }

    /// Encodes into a map of pages; returns the id, the root and the pages.
    fn paged(m: &Manifest) -> (SnapshotId, Vec<u8>, HashMap<ChunkId, Vec<u8>>) {
        let mut pages = HashMap::new();
        let (id, root) = m
            .encode_pages(&mut |id, bytes| {
                assert!(bytes.len() <= MAX_PAGE_BYTES);
                pages.insert(*id, bytes.to_vec());
                Ok(())
            })
            .unwrap();
        (id, root, pages)
    }

    /// Reads pages as a store does: checked against their names.
    fn load(root: &[u8], pages: &HashMap<ChunkId, Vec<u8>>) -> Result<Manifest> {
        assemble(root, &mut |id| {
            let stored = pages.get(id).cloned().ok_or(Error::MissingChunk(*id))?;
            Codec::Plain.open(id, stored)
        })
    }

    const V1_FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/manifest-v1.bin"
    );
    const V2_FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/manifest-v2.bin"
    );

    #[test]
    fn reads_the_stored_v1_fixture() {
        if std::env::var_os("BITCLONE_WRITE_FIXTURES").is_some() {
            std::fs::write(V1_FIXTURE, encode_v1(&fixture_manifest())).unwrap();
        }
        let stored = std::fs::read(V1_FIXTURE).unwrap();
        assert_eq!(Manifest::decode_v1(&stored).unwrap(), fixture_manifest());
        assert_eq!(load(&stored, &HashMap::new()).unwrap(), fixture_manifest());
        // The id of a stored snapshot must never change across builds.
        assert_eq!(
            ChunkId::of(&stored).to_hex(),
            include_str!("../tests/fixtures/manifest-v1.id").trim()
        );
    }

    /// The v2 fixture: the root, then every page, each as u32 length + bytes.
    #[test]
    fn reads_the_stored_v2_fixture() {
        let m = big(500);
        if std::env::var_os("BITCLONE_WRITE_FIXTURES").is_some() {
            let (_, root, pages) = paged(&m);
            let mut ids: Vec<_> = pages.keys().copied().collect();
            ids.sort();
            let mut out = Vec::new();
            for bytes in std::iter::once(&root).chain(ids.iter().map(|i| &pages[i])) {
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(bytes);
            }
            std::fs::write(V2_FIXTURE, out).unwrap();
        }
        let stored = std::fs::read(V2_FIXTURE).unwrap();
        let mut parts = Vec::new();
        let mut rest = stored.as_slice();
        while !rest.is_empty() {
            let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            parts.push(rest[4..4 + n].to_vec());
            rest = &rest[4 + n..];
        }
        let root = parts.remove(0);
        assert!(parts.len() > 3, "the fixture spans several pages");
        let pages: HashMap<ChunkId, Vec<u8>> =
            parts.into_iter().map(|p| (ChunkId::of(&p), p)).collect();
        assert_eq!(load(&root, &pages).unwrap(), m);
        assert_eq!(
            SnapshotId::of(&root).to_hex(),
            include_str!("../tests/fixtures/manifest-v2.id").trim()
        );
        // This build writes exactly the stored bytes.
        assert_eq!(paged(&m).1, root);
    }

    #[test]
    fn large_manifests_round_trip_through_pages_of_bounded_size() {
        let m = big(40_000);
        let (id, root, pages) = paged(&m);
        assert_eq!(id, m.id().unwrap());
        let Stored::V2(r) = decode_root(&root).unwrap() else {
            panic!("v2 expected")
        };
        assert!(r.height >= 2, "40,000 entries need an index level");
        assert!(r.pages.len() <= ROOT_MAX_PAGES);
        assert!(root.len() < 16 << 10, "root of {} bytes", root.len());
        assert!(pages.len() > ROOT_MAX_PAGES);
        assert_eq!(load(&root, &pages).unwrap(), m);
        assert_eq!((r.entries, r.files), (40_102, 40_000));
    }

    /// Pages of `m` that `parent` does not have.
    fn new_pages(parent: &Manifest, m: &Manifest) -> usize {
        let old = paged(parent).2;
        paged(m).2.keys().filter(|id| !old.contains_key(id)).count()
    }

    #[test]
    fn an_edit_changes_only_a_few_pages() {
        let m = big(40_000);
        let height = match decode_root(&paged(&m).1).unwrap() {
            Stored::V2(r) => r.height as usize,
            Stored::V1(_) => unreachable!(),
        };
        // One file's content: its leaf and the index pages above it.
        let mut edited = m.clone();
        let i = edited.entries.len() / 2;
        edited.entries[i] = file(&edited.entries[i].path.clone(), b"new content");
        assert!(
            new_pages(&m, &edited) <= height,
            "{}",
            new_pages(&m, &edited)
        );
        // A path added and one removed: their neighbours at most.
        let mut moved = m.clone();
        moved.entries.remove(1234);
        moved.entries.push(file("class050/zzz-new.jpg", b"new"));
        moved.entries.sort_by(|a, b| a.path.cmp(&b.path));
        assert!(
            new_pages(&m, &moved) <= 2 * (height + 1),
            "{}",
            new_pages(&m, &moved)
        );
        // 0.1% of the files edited: a small part of all pages.
        let mut many = m.clone();
        for k in 0..40 {
            let j = 100 + k * 997;
            many.entries[j] = file(&many.entries[j].path.clone(), b"edited");
        }
        let total = paged(&many).2.len();
        let changed = new_pages(&m, &many);
        assert!(changed * 10 < total, "{changed} of {total} pages changed");
    }

    #[test]
    fn damaged_pages_and_roots_are_refused() {
        let m = big(3_000);
        let (_, root, pages) = paged(&m);
        let victim = *pages.keys().next().unwrap();
        // Bytes that do not match the page's name.
        let mut bad = pages.clone();
        bad.get_mut(&victim).unwrap()[20] ^= 1;
        assert!(
            matches!(load(&root, &bad), Err(Error::CorruptChunk { chunk, .. }) if chunk == victim)
        );
        // A truncated page (its name recomputed, so only the decoder can tell).
        for cut in [0, 5, 9, 100] {
            let short = pages[&victim][..cut].to_vec();
            assert!(
                Page::decode(&ChunkId::of(&short), 0, &short).is_err(),
                "cut at {cut}"
            );
        }
        // A missing page.
        let mut gone = pages.clone();
        gone.remove(&victim);
        assert!(matches!(load(&root, &gone), Err(Error::MissingChunk(_))));
        // Damaged roots.
        for cut in [0, 3, 10, root.len() - 1] {
            assert!(decode_root(&root[..cut]).is_err(), "cut at {cut}");
        }
        let mut future = root.clone();
        future[4] = 9;
        assert!(decode_root(&future).is_err());
        let mut trailing = root.clone();
        trailing.push(0);
        assert!(decode_root(&trailing).is_err());
    }

    #[test]
    fn v1_damage_is_refused() {
        let bytes = encode_v1(&fixture_manifest());
        for cut in [0, 3, 10, bytes.len() - 1] {
            assert!(Manifest::decode_v1(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn refuses_traversal_unsorted_entries_and_escaping_links() {
        let mut m = fixture_manifest();
        m.entries[1].path = "../escape".into();
        assert!(matches!(m.id(), Err(Error::InvalidPath { .. })));
        let mut m = fixture_manifest();
        m.entries.swap(1, 2);
        assert!(m.id().is_err());
        let mut m = fixture_manifest();
        m.entries[1].size += 1;
        assert!(m.id().is_err());
        let mut m = fixture_manifest();
        m.entries.push(Entry::symlink(
            "zz".into(),
            "../../etc/passwd".into(),
            0o777,
            0,
        ));
        assert!(matches!(m.id(), Err(Error::InvalidPath { .. })));
        let mut m = fixture_manifest();
        m.entries[1].target = Some("x".into());
        assert!(m.id().is_err());
    }

    #[test]
    fn a_file_too_large_for_one_page_is_a_clear_error() {
        let mut m = fixture_manifest();
        let chunk = ChunkRef {
            id: ChunkId::of(b"c"),
            len: 1,
        };
        m.entries[1].chunks = vec![chunk; 100_000];
        m.entries[1].size = 100_000;
        let err = m.id().unwrap_err().to_string();
        assert!(
            err.contains("data/a.bin") && err.contains("100000 chunks"),
            "{err}"
        );
    }

    #[test]
    fn empty_manifest() {
        let mut m = fixture_manifest();
        m.entries.clear();
        let (_, root, pages) = paged(&m);
        assert!(pages.is_empty());
        assert_eq!(load(&root, &pages).unwrap(), m);
    }
}
