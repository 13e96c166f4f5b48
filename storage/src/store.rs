//! The chunk store interface and an in-memory implementation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesOrdered};
use futures::{FutureExt, StreamExt, TryStreamExt};

use crate::chunk::{ChunkId, SnapshotId};
use crate::crypt::{Codec, Keyring};
use crate::error::{Error, Result};
use crate::manifest::{assemble, decode_root, ChunkRef, Entry, Manifest, Page, Root, Stored, Walk};
use crate::pool::CpuPool;

/// Content-addressed storage of chunks and manifests, per tenant.
///
/// Keys carry the tenant, and each tenant has a [`Codec`]: its content is
/// stored as it is, or sealed with its data key (see [`crate::crypt`]).
/// Chunks and manifests go in and out in two forms: *stored* bytes (what
/// `put_*` takes, what replication and repair move, named by their BLAKE3)
/// and *content* ([`ChunkStore::get_chunk`], [`ChunkStore::get_manifest`]).
/// Every read checks the stored bytes against their name: a damaged value
/// is returned as [`Error::CorruptChunk`], never as data.
///
/// Methods block (RocksDB is synchronous); call them from a worker thread,
/// not from an async task.
pub trait ChunkStore: Send + Sync + 'static {
    /// Whether the chunk is stored.
    fn has_chunk(&self, tenant: &str, id: &ChunkId) -> Result<bool>;

    /// Whether the chunk is stored and, if it is a manifest page, its whole
    /// subtree with it: false for one garbage collection had found
    /// unreachable (its children may be gone), which a sender or a repair
    /// then treats as missing and descends below.
    fn has_settled_chunk(&self, tenant: &str, id: &ChunkId) -> Result<bool> {
        self.has_chunk(tenant, id)
    }

    /// Stores `data`, a chunk's stored form, under `id` unless it is
    /// already present; returns `true` if it was new. The caller has made
    /// both with [`Codec::seal`] (the tenant's codec: [`ChunkStore::codec`]);
    /// receivers of untrusted bytes must check them with
    /// [`ChunkId::verify`] first. Not durable until [`ChunkStore::sync`]
    /// (or a synced commit) returns.
    fn put_chunk(&self, tenant: &str, id: &ChunkId, data: &[u8]) -> Result<bool>;

    /// Stores many chunks (each unless already present, a chunk repeated in
    /// the batch once); returns which were new. One write for the batch
    /// where the store can; the same durability as [`ChunkStore::put_chunk`].
    fn put_chunks(&self, tenant: &str, chunks: &[(ChunkId, &[u8])]) -> Result<Vec<bool>> {
        chunks
            .iter()
            .map(|(id, data)| self.put_chunk(tenant, id, data))
            .collect()
    }

    /// A chunk's stored bytes as they are on disk, not checked yet
    /// ([`Error::MissingChunk`] if absent): read through
    /// [`ChunkStore::get_stored_chunk`] or [`ChunkStore::get_chunk`].
    fn load_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>>;

    /// A chunk's stored bytes, checked against its name: what a replica or
    /// a repair is sent.
    fn get_stored_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>> {
        verified(id, self.load_chunk(tenant, id)?)
    }

    /// A chunk's content: its stored bytes checked and opened with the
    /// tenant's codec.
    fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>> {
        let codec = self.codec(tenant)?;
        codec.open(id, self.load_chunk(tenant, id)?)
    }

    /// Stores a manifest root's stored form under its id.
    fn put_manifest(&self, tenant: &str, id: &SnapshotId, bytes: &[u8]) -> Result<()>;

    /// A manifest root's stored bytes, not checked yet ([`Error::NotFound`]
    /// if absent).
    fn load_manifest(&self, tenant: &str, id: &SnapshotId) -> Result<Vec<u8>>;

    /// A manifest root's stored bytes, checked against its id.
    fn get_stored_manifest(&self, tenant: &str, id: &SnapshotId) -> Result<Vec<u8>> {
        verified(&ChunkId(id.0), self.load_manifest(tenant, id)?)
    }

    /// A manifest root's content, checked and opened.
    fn get_manifest(&self, tenant: &str, id: &SnapshotId) -> Result<Vec<u8>> {
        let codec = self.codec(tenant)?;
        codec.open(&ChunkId(id.0), self.load_manifest(tenant, id)?)
    }

    /// The codecs of this store's encrypted tenants.
    fn keyring(&self) -> &Keyring;

    /// How `tenant`'s content is stored ([`Error::Unavailable`] if it is
    /// encrypted and its key is not open here).
    fn codec(&self, tenant: &str) -> Result<Codec> {
        self.keyring().codec(tenant)
    }

    /// The content of `stored` bytes of `tenant` (from a replica or a
    /// sink) named `id`: checked and opened.
    fn open(&self, tenant: &str, id: &ChunkId, stored: Vec<u8>) -> Result<Vec<u8>> {
        self.codec(tenant)?.open(id, stored)
    }

    /// Makes everything written so far durable.
    fn sync(&self) -> Result<()>;
}

/// A [`ChunkStore`] in memory, for tests and tools.
#[derive(Default)]
pub struct MemStore {
    chunks: Mutex<HashMap<(String, ChunkId), Vec<u8>>>,
    manifests: Mutex<HashMap<(String, SnapshotId), Vec<u8>>>,
    keyring: Keyring,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a HashMap half-updated in a
    // way that matters here; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ChunkStore for MemStore {
    fn has_chunk(&self, tenant: &str, id: &ChunkId) -> Result<bool> {
        Ok(lock(&self.chunks).contains_key(&(tenant.to_string(), *id)))
    }

    fn put_chunk(&self, tenant: &str, id: &ChunkId, data: &[u8]) -> Result<bool> {
        let mut map = lock(&self.chunks);
        let key = (tenant.to_string(), *id);
        if map.contains_key(&key) {
            return Ok(false);
        }
        map.insert(key, data.to_vec());
        Ok(true)
    }

    fn load_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>> {
        lock(&self.chunks)
            .get(&(tenant.to_string(), *id))
            .cloned()
            .ok_or(Error::MissingChunk(*id))
    }

    fn put_manifest(&self, tenant: &str, id: &SnapshotId, bytes: &[u8]) -> Result<()> {
        lock(&self.manifests).insert((tenant.to_string(), *id), bytes.to_vec());
        Ok(())
    }

    fn load_manifest(&self, tenant: &str, id: &SnapshotId) -> Result<Vec<u8>> {
        lock(&self.manifests)
            .get(&(tenant.to_string(), *id))
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", id.to_hex()))
    }

    fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

/// Returns `data` if it hashes to `id`, else a corruption error naming `id`.
pub(crate) fn verified(id: &ChunkId, data: Vec<u8>) -> Result<Vec<u8>> {
    if id.verify(&data) {
        Ok(data)
    } else {
        Err(Error::CorruptChunk {
            chunk: *id,
            detail: format!(
                "{} stored bytes do not hash to the chunk's name",
                data.len()
            ),
        })
    }
}

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

/// Loads and decodes a snapshot's manifest (either format version, a v2
/// root's pages read from the chunks of `tenant`), every entry in memory:
/// [`Entries`] reads one page at a time. Blocking.
pub fn load_manifest(store: &dyn ChunkStore, tenant: &str, id: &SnapshotId) -> Result<Manifest> {
    let bytes = store.get_manifest(tenant, id)?;
    let m = assemble(&bytes, &mut |page| store.get_chunk(tenant, page))?;
    if m.tenant != tenant {
        return Err(Error::not_found("snapshot", id.to_hex()));
    }
    Ok(m)
}

/// Reads and decodes a snapshot's stored root (v2) or whole manifest (v1).
/// Blocking.
pub fn read_root(store: &dyn ChunkStore, tenant: &str, id: &SnapshotId) -> Result<Stored> {
    let stored = decode_root(&store.get_manifest(tenant, id)?)?;
    if stored.tenant() != tenant {
        return Err(Error::not_found("snapshot", id.to_hex()));
    }
    Ok(stored)
}

/// A stored snapshot's entries in path order, read from the chunks of its
/// tenant one page at a time, each page checked against its name (a v1
/// manifest is held whole: it was small). Blocking.
pub struct Entries {
    store: Arc<dyn ChunkStore>,
    tenant: String,
    walk: Option<Walk>,
    page: std::vec::IntoIter<Entry>,
}

impl Entries {
    /// The entries of `stored` (from [`read_root`]), a snapshot of `tenant`.
    pub fn new(store: Arc<dyn ChunkStore>, tenant: &str, stored: Stored) -> Entries {
        let (walk, page) = match stored {
            Stored::V1(m) => (None, m.entries),
            Stored::V2(root) => (Some(Walk::new(root)), Vec::new()),
        };
        Entries {
            store,
            tenant: tenant.to_string(),
            walk,
            page: page.into_iter(),
        }
    }
}

impl Iterator for Entries {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            if let Some(e) = self.page.next() {
                return Some(Ok(e));
            }
            let walk = self.walk.as_mut()?;
            let read = match walk.next_page() {
                Some((id, _)) => self
                    .store
                    .get_chunk(&self.tenant, &id)
                    .and_then(|bytes| walk.feed(&bytes)),
                None => {
                    let done = self.walk.take()?.finish();
                    return done.err().map(Err);
                }
            };
            match read {
                Ok(entries) => self.page = entries.into_iter(),
                Err(e) => {
                    // The walk cannot go on past a page it could not read.
                    self.walk = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Reads one manifest page's bytes by id: from the chunk store, or from an
/// object-store sink. [`EntryPages`] checks them against the id.
pub type FetchPage<'a> = Box<dyn FnMut(ChunkId) -> BoxFuture<'a, Result<Bytes>> + Send + 'a>;

/// A snapshot's entries in path order, one page at a time, from wherever
/// its pages are: the async counterpart of [`Entries`], for readers that
/// must not block a thread per page (sink exports and restores). It holds
/// one page per level of the tree plus the leaves it fetched ahead (at most
/// [`PAGES_AHEAD`]), never the whole manifest.
pub struct EntryPages<'a> {
    walk: Option<Walk>,
    v1: Option<Vec<Entry>>,
    fetch: FetchPage<'a>,
    /// Pages fetched ahead, in the order the walk will ask for them (a
    /// sink's GETs overlap rather than waiting on each other).
    ahead: FuturesOrdered<BoxFuture<'a, (ChunkId, Result<Bytes>)>>,
    ahead_ids: VecDeque<ChunkId>,
}

/// Pages [`EntryPages`] fetches ahead of the one it reads.
const PAGES_AHEAD: usize = 8;

impl<'a> EntryPages<'a> {
    /// The entries of `stored`, its pages read through `fetch`.
    pub fn new(stored: Stored, fetch: FetchPage<'a>) -> EntryPages<'a> {
        let (walk, v1) = match stored {
            Stored::V1(m) => (None, Some(m.entries)),
            Stored::V2(root) => (Some(Walk::new(root)), None),
        };
        EntryPages {
            walk,
            v1,
            fetch,
            ahead: FuturesOrdered::new(),
            ahead_ids: VecDeque::new(),
        }
    }

    /// The entries of `stored` in the chunk store, a snapshot of `tenant`,
    /// each page read on `pool`.
    pub fn from_store(
        pool: &CpuPool,
        store: Arc<dyn ChunkStore>,
        tenant: &str,
        stored: Stored,
    ) -> EntryPages<'static> {
        let (pool, tenant) = (pool.clone(), tenant.to_string());
        EntryPages::new(
            stored,
            Box::new(move |id| {
                let (store, tenant) = (store.clone(), tenant.clone());
                pool.run(move || store.get_chunk(&tenant, &id).map(Bytes::from))
                    .boxed()
            }),
        )
    }

    /// The next page's entries, `None` once every page was read and the
    /// root's totals checked. After an error it returns `None`.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Entry>>> {
        if let Some(entries) = self.v1.take() {
            return Ok(Some(entries));
        }
        let Some(walk) = self.walk.as_mut() else {
            return Ok(None);
        };
        let (fetch, ahead, ahead_ids) = (&mut self.fetch, &mut self.ahead, &mut self.ahead_ids);
        let read = async {
            while let Some((id, level)) = walk.next_page() {
                let bytes = if ahead_ids.front() == Some(&id) {
                    ahead_ids.pop_front();
                    match ahead.next().await {
                        Some((got, bytes)) if got == id => bytes?,
                        _ => return Err(Error::decode("manifest", "pages fetched out of order")),
                    }
                } else {
                    // Leaves are fetched ahead, and read in order: only the
                    // first leaf under an index page, or an index page once
                    // the leaves before it were read, comes here.
                    ahead_ids.clear();
                    *ahead = FuturesOrdered::new();
                    fetch(id).await?
                };
                let leaves = if level == 0 { PAGES_AHEAD } else { 0 };
                for next in walk.upcoming().skip(ahead_ids.len()) {
                    if ahead_ids.len() >= leaves {
                        break;
                    }
                    let page = fetch(next);
                    ahead.push_back(async move { (next, page.await) }.boxed());
                    ahead_ids.push_back(next);
                }
                let entries = walk.feed(&bytes)?;
                // An index page names pages; only leaves hold entries.
                if !entries.is_empty() {
                    return Ok(Some(entries));
                }
            }
            Ok(None)
        }
        .await;
        match read {
            Ok(Some(entries)) => Ok(Some(entries)),
            Ok(None) => self.walk.take().map(Walk::finish).transpose().map(|_| None),
            Err(e) => {
                // The walk cannot go on past a page it could not read.
                self.walk = None;
                Err(e)
            }
        }
    }

    /// The entries one at a time.
    pub fn into_stream(self) -> BoxStream<'a, Result<Entry>> {
        futures::stream::try_unfold(self, |mut pages| async move {
            let page = pages.next_page().await?;
            Ok::<_, Error>(page.map(|page| (page, pages)))
        })
        .map_ok(|page| futures::stream::iter(page.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }
}

/// Every page of a v2 manifest's tree, read from the chunks of `tenant`
/// (each checked against its name). Blocking.
pub fn page_ids(store: &dyn ChunkStore, tenant: &str, root: &Root) -> Result<Vec<ChunkId>> {
    let mut out = Vec::new();
    let mut level: Vec<ChunkId> = root.pages.iter().map(|(id, _)| *id).collect();
    for depth in (0..root.height).rev() {
        let mut below = Vec::new();
        for id in &level {
            if depth > 0 {
                let bytes = store.get_chunk(tenant, id)?;
                below.extend(Page::decode(id, depth, &bytes)?.children());
            }
        }
        out.append(&mut level);
        level = below;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::chunker::ChunkParams;
    use crate::ingest::SnapshotBuilder;

    /// Over a tree with an index level, `EntryPages` returns every entry in
    /// order and fetches each page exactly once, leaves ahead included.
    #[test]
    fn entry_pages_read_every_page_once_in_order() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let mut b = SnapshotBuilder::new(store.clone(), "t", "d", ChunkParams::default()).unwrap();
        for i in 0..40_000 {
            b.add_dir(&format!("d{i:06}"), 0o755, 0).unwrap();
        }
        let built = b.finish(0).unwrap();
        let want = built.store_and_load(store.as_ref(), "t").unwrap();
        let stored = read_root(store.as_ref(), "t", &built.id).unwrap();
        let Stored::V2(root) = &stored else {
            panic!("v2 expected")
        };
        assert!(root.height >= 2, "40,000 entries need an index level");
        let pages = page_ids(store.as_ref(), "t", root).unwrap().len();

        let fetched = Arc::new(AtomicUsize::new(0));
        let (s, n) = (store.clone(), fetched.clone());
        let reader = EntryPages::new(
            stored,
            Box::new(move |id| {
                n.fetch_add(1, Ordering::Relaxed);
                let bytes = s.get_chunk("t", &id).map(Bytes::from);
                async move { bytes }.boxed()
            }),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got: Vec<Entry> = rt.block_on(reader.into_stream().try_collect()).unwrap();
        assert_eq!(got, want.entries);
        assert_eq!(fetched.load(Ordering::Relaxed), pages);
    }
}
