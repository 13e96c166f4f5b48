//! The chunk store interface and an in-memory implementation.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::manifest::{ChunkRef, Manifest};

/// Content-addressed storage of chunks and manifests, per tenant.
///
/// Keys carry the tenant so that chunk names can later be keyed per tenant
/// without a format change. Every read verifies the BLAKE3 name: a damaged
/// value is returned as [`Error::CorruptChunk`], never as data.
///
/// Methods block (RocksDB is synchronous); call them from a worker thread,
/// not from an async task.
pub trait ChunkStore: Send + Sync + 'static {
    /// Whether the chunk is stored.
    fn has_chunk(&self, tenant: &str, id: &ChunkId) -> Result<bool>;

    /// Stores `data` under `id` unless it is already present; returns `true`
    /// if it was new. The caller has computed `id` from `data`; receivers of
    /// untrusted bytes must check with [`ChunkId::verify`] first. Not durable
    /// until [`ChunkStore::sync`] (or a synced commit) returns.
    fn put_chunk(&self, tenant: &str, id: &ChunkId, data: &[u8]) -> Result<bool>;

    /// Reads and verifies a chunk.
    fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>>;

    /// Stores an encoded manifest under its id.
    fn put_manifest(&self, tenant: &str, id: &SnapshotId, bytes: &[u8]) -> Result<()>;

    /// Reads and verifies an encoded manifest.
    fn get_manifest(&self, tenant: &str, id: &SnapshotId) -> Result<Vec<u8>>;

    /// Makes everything written so far durable.
    fn sync(&self) -> Result<()>;
}

/// A [`ChunkStore`] in memory, for tests and tools.
#[derive(Default)]
pub struct MemStore {
    chunks: Mutex<HashMap<(String, ChunkId), Vec<u8>>>,
    manifests: Mutex<HashMap<(String, SnapshotId), Vec<u8>>>,
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

    fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>> {
        let data = lock(&self.chunks)
            .get(&(tenant.to_string(), *id))
            .cloned()
            .ok_or(Error::MissingChunk(*id))?;
        verified(id, data)
    }

    fn put_manifest(&self, tenant: &str, id: &SnapshotId, bytes: &[u8]) -> Result<()> {
        lock(&self.manifests).insert((tenant.to_string(), *id), bytes.to_vec());
        Ok(())
    }

    fn get_manifest(&self, tenant: &str, id: &SnapshotId) -> Result<Vec<u8>> {
        let data = lock(&self.manifests)
            .get(&(tenant.to_string(), *id))
            .cloned()
            .ok_or_else(|| Error::not_found("snapshot", id.to_hex()))?;
        verified(&ChunkId(id.0), data)
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

/// Loads and decodes a snapshot's manifest. Blocking.
pub fn load_manifest(store: &dyn ChunkStore, tenant: &str, id: &SnapshotId) -> Result<Manifest> {
    let bytes = store.get_manifest(tenant, id)?;
    let m = Manifest::decode(&bytes)?;
    if m.tenant != tenant {
        return Err(Error::not_found("snapshot", id.to_hex()));
    }
    Ok(m)
}
