//! The RocksDB implementation of [`ChunkStore`], plus the node's small
//! metadata (dataset heads, snapshot records, opaque records such as jobs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, ErrorKind, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, SnapshotId};
use crate::cold::{decode_record, encode_record, PackEntry, SharedColdReader};
use crate::crypt::Keyring;
use crate::error::{Error, Result};
use crate::store::ChunkStore;

pub(crate) const CF_CHUNKS: &str = "chunks";
pub(crate) const CF_CHUNK_INDEX: &str = "chunk_index";
pub(crate) const CF_MANIFESTS: &str = "manifests";
const CF_META: &str = "meta";
/// Garbage collection's candidates live in the `meta` family, under
/// [`pending_key`]: a new column family would keep the previous release
/// from opening the store after a rollback (RocksDB refuses to open a
/// database without all its families), and that release reads `meta` only
/// under its own prefixes (`h\0`, `s\0`, `r`). `[b'g'][kind][tenant key]` →
/// object was first found unreachable (ms, 8 bytes BE) and its length (4
/// bytes LE). Kinds: [`PENDING_CHUNK`], [`PENDING_ROOT`].
pub(crate) const CF_GC_PENDING: &str = CF_META;
/// The first byte of every candidate record's key in `meta`.
pub(crate) const PENDING_PREFIX: u8 = b'g';
pub(crate) const PENDING_CHUNK: u8 = b'c';
pub(crate) const PENDING_ROOT: u8 = b'm';
/// A chunk in the cold tier, in `meta`: `[b'c'][chunk key]` → its pack,
/// offset and length ([`crate::cold`]).
pub(crate) const COLD_PREFIX: u8 = b'c';
/// A pack this store indexed, in `meta`: `[b'p'][pack name]`.
const PACK_PREFIX: u8 = b'p';

/// Tuning of the RocksDB store.
#[derive(Debug, Clone)]
pub struct RocksOptions {
    /// Values at least this large go to blob files (BlobDB) instead of SSTs.
    pub min_blob_size: u64,
    /// Target size of one blob file.
    pub blob_file_size: u64,
    /// Memtable size of the chunk family. BlobDB holds a blob's bytes in
    /// the memtable until a flush writes them out, and small files' chunks
    /// sit there too, so this bounds the node's memory during a put: 16 MiB
    /// put 1 GiB at the same speed as 64 MiB (4.0-4.3 s vs 4.5-5.0 s here)
    /// with a peak RSS of 136-142 MiB instead of 244-248 MiB; 8 MiB put
    /// 300,000 small files with a peak of 90 MiB instead of 100-120 MiB
    /// (memtables 17 MiB instead of 33 at their peak), and 1 GiB no slower
    /// than 16 MiB did on the same (slower) day: 8.9-9.3 s vs 9.7-11.2 s.
    pub write_buffer_size: usize,
    /// Block cache for SST blocks (index, small chunks, metadata). A restore
    /// reads each small chunk once: a larger cache mostly holds blocks that
    /// are not read again (a 60,000-file get peaked at 186 MiB RSS with
    /// 64 MiB, 130 MiB with 16 MiB).
    pub block_cache_bytes: usize,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            min_blob_size: 4096,
            blob_file_size: 256 << 20,
            write_buffer_size: 8 << 20,
            block_cache_bytes: 16 << 20,
        }
    }
}

/// One committed snapshot as listings show it (the manifest itself is stored
/// separately, content-addressed); also the previous release's snapshot
/// record in the metadata family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Snapshot id (hex BLAKE3 of the manifest).
    pub id: String,
    /// Dataset name.
    pub dataset: String,
    /// Parent snapshot id, empty if none.
    pub parent: String,
    /// Number of regular files.
    pub files: u64,
    /// Total bytes of the files.
    pub bytes: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: i64,
}

/// What the previous release kept in the metadata family of a standalone
/// node (see [`RocksStore::legacy_metadata`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyMetadata {
    /// Dataset heads.
    pub heads: Vec<LegacyHead>,
    /// (tenant, record) of every snapshot, oldest first within a dataset.
    pub snapshots: Vec<(String, SnapshotRecord)>,
    /// Opaque records by key (`job/<id>` → a job as JSON).
    pub records: Vec<(String, Vec<u8>)>,
}

/// A dataset head of the previous release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyHead {
    /// Tenant name.
    pub tenant: String,
    /// Dataset name.
    pub dataset: String,
    /// Its latest snapshot.
    pub head: SnapshotId,
}

impl LegacyMetadata {
    /// Whether there is nothing to migrate.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty() && self.snapshots.is_empty() && self.records.is_empty()
    }
}

/// Rough sizes for the stats endpoint.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Estimated number of distinct chunks.
    pub chunks: u64,
    /// Bytes on disk used by chunk data (blob files and SSTs).
    pub chunk_bytes: u64,
    /// Each column family's keys and bytes on disk.
    pub families: Vec<FamilyStats>,
}

/// One RocksDB column family's size (RocksDB's estimates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyStats {
    /// `chunks`, `chunk_index`, `manifests` or `meta`.
    pub name: &'static str,
    /// Estimated number of keys.
    pub keys: u64,
    /// Bytes of its live SST and blob files.
    pub bytes: u64,
}

/// [`ChunkStore`] on RocksDB: chunk bytes in a BlobDB column family, a small
/// index column family for existence checks that never touch blob files,
/// manifests and metadata in their own families.
pub struct RocksStore {
    db: Arc<DB>,
    path: PathBuf,
    /// The first failed write's error; set once, never cleared.
    poisoned: Arc<OnceLock<String>>,
    /// Dropping the sender stops the watcher; joined on drop, before the
    /// database closes.
    watcher: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    pub(crate) gc: GcState,
    keyring: Keyring,
    /// Reads evicted chunks back from the cold tier, once one is set.
    cold: OnceLock<SharedColdReader>,
}

/// What garbage collection shares with the readers and writers of the
/// store (see `gc.rs`).
#[derive(Default)]
pub(crate) struct GcState {
    /// Held by a sweep while it frees a batch, and by a lookup that finds
    /// a chunk it answers for among the candidates: one of the two wins.
    pub(crate) gate: Mutex<()>,
    /// Whether any candidate record may exist: lookups skip them otherwise.
    pub(crate) pending_any: AtomicBool,
    /// One collection (or tenant purge) at a time; the start and end of
    /// the passes run since the store opened, on `clock`.
    pub(crate) passes: Mutex<BTreeMap<u64, u64>>,
    /// Writers in progress ([`RocksStore::hold`]): id → start on `clock`.
    pub(crate) holds: Arc<Mutex<BTreeMap<u64, u64>>>,
    /// Orders passes and holds within this process (the wall clock may
    /// step back).
    pub(crate) clock: AtomicU64,
    /// This opening of the store: candidates recorded by another were
    /// found by passes that ended before any writer in progress now began.
    pub(crate) boot: u64,
}

impl GcState {
    /// The next instant on the store's clock.
    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    Absent,
    /// Here, and no candidate.
    Present,
    /// Here, but it was a candidate (taken off the list now): a page's
    /// children may be gone.
    Revived,
}

/// Keeps garbage collection from freeing anything found unreachable after
/// it was taken, until it is dropped: held by a writer (a put, a repair)
/// from before its first lookup until its commit is acknowledged, so that
/// nothing it found or wrote is freed before a snapshot names it.
#[derive(Debug)]
pub struct GcHold {
    holds: Arc<Mutex<BTreeMap<u64, u64>>>,
    id: u64,
}

impl Drop for GcHold {
    fn drop(&mut self) {
        self.holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Wall-clock time in ms since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.watcher.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// How often the watcher looks for a background error.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Watches for a failed background flush or compaction. When one fails for
/// want of space, RocksDB's auto-recovery stops writes until space appears,
/// and a write already waiting in its stall would wait for good: a put would
/// hang instead of failing. The watcher poisons the store and cancels the
/// background work, which ends every stalled write with an error.
fn watch(db: Arc<DB>, poisoned: Arc<OnceLock<String>>, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(WATCH_EVERY) {
        let errors = db
            .property_int_value("rocksdb.background-errors")
            .ok()
            .flatten()
            .unwrap_or(0);
        if errors > 0 {
            let _ = poisoned.set(format!(
                "a background flush or compaction failed ({errors} so far); is the disk full?"
            ));
            db.cancel_all_background_work(false);
            return;
        }
    }
}

impl RocksStore {
    /// Opens (creating if needed) the store under `dir`.
    pub fn open(dir: &Path, tuning: &RocksOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(8 << 20);
        db_opts.set_max_total_wal_size(512 << 20);
        // Chunk data skips the WAL (see `write_chunk`); flushing the chunk and
        // index families together keeps "indexed" and "stored" in step.
        db_opts.set_atomic_flush(true);

        let mut cache_opts = rocksdb::BlockBasedOptions::default();
        let cache = rocksdb::Cache::new_lru_cache(tuning.block_cache_bytes);
        cache_opts.set_block_cache(&cache);
        cache_opts.set_bloom_filter(10.0, false);
        // Index and filter blocks live in the block cache, partitioned into
        // small blocks with only their top level pinned: kept outside the
        // cache (the default) they grow with the number of keys, and the
        // node's memory with them (a 1,000,000-file put peaked at 134 MiB
        // with them outside, 127 MiB inside).
        cache_opts.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        cache_opts.set_partition_filters(true);
        cache_opts.set_metadata_block_size(4096);
        cache_opts.set_cache_index_and_filter_blocks(true);
        cache_opts.set_pin_top_level_index_and_filter(true);
        cache_opts.set_pin_l0_filter_and_index_blocks_in_cache(true);

        let mut chunks = Options::default();
        chunks.set_write_buffer_size(tuning.write_buffer_size);
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(tuning.min_blob_size);
        chunks.set_blob_file_size(tuning.blob_file_size);
        // Blob GC stays off while nothing deletes chunks: with it on, every
        // compaction of the chunk keys relocated the live blobs of the oldest
        // files and reclaimed nothing (an export right after an incremental
        // put took 1.0 CPU-s with it, 0.3 without: `bitclone-bench --s3`).
        // Chunk deletion (snapshot expiry) must turn it on, or deleted blobs
        // stay on disk.
        chunks.set_enable_blob_gc(false);
        chunks.set_block_based_table_factory(&cache_opts);

        let mut small = Options::default();
        small.set_write_buffer_size(16 << 20);
        small.set_block_based_table_factory(&cache_opts);
        small.set_compression_type(rocksdb::DBCompressionType::Lz4);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_CHUNK_INDEX, small.clone()),
            ColumnFamilyDescriptor::new(CF_MANIFESTS, small.clone()),
            ColumnFamilyDescriptor::new(CF_META, small),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, dir, cfs)?);
        let poisoned = Arc::new(OnceLock::new());
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bitclone-store-watch".into())
            .spawn({
                let (db, poisoned) = (db.clone(), poisoned.clone());
                move || watch(db, poisoned, stopped)
            })
            .map_err(|e| Error::io("start the store's watcher", dir, e))?;
        let store = RocksStore {
            db,
            path: dir.to_path_buf(),
            poisoned,
            watcher: Some((stop, thread)),
            gc: GcState {
                boot: u64::from(std::process::id())
                    ^ (now_ms() as u64).rotate_left(20)
                    ^ u64::from(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.subsec_nanos()),
                    ),
                ..GcState::default()
            },
            keyring: Keyring::default(),
            cold: OnceLock::new(),
        };
        let any = store
            .db
            .iterator_cf(
                store.cf(CF_GC_PENDING),
                IteratorMode::From(&[PENDING_PREFIX], Direction::Forward),
            )
            .next()
            .and_then(|r| r.ok())
            .is_some_and(|(k, _)| k.first() == Some(&PENDING_PREFIX));
        store.gc.pending_any.store(any, Ordering::Release);
        Ok(store)
    }

    /// The database, for garbage collection.
    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    /// Looks `keys` (chunk or root keys, by `kind`) up and keeps what it
    /// finds from garbage collection: a candidate found is taken off the
    /// list, under the gate a sweep frees under (a sweep may have freed it
    /// just before: then it is absent). Candidates are read before the
    /// index: a sweep frees an index entry and its record together, so an
    /// entry read after finding no record is not freed before a later pass.
    /// Costs one read while there are no candidates.
    pub(crate) fn lookup(&self, kind: u8, keys: &[&[u8]]) -> Result<Vec<Found>> {
        let family = if kind == PENDING_ROOT {
            CF_MANIFESTS
        } else {
            CF_CHUNK_INDEX
        };
        let pending = self.cf(CF_GC_PENDING);
        let mut candidate = vec![false; keys.len()];
        let pending_keys: Vec<Vec<u8>> = keys.iter().map(|k| pending_key(kind, k)).collect();
        if !keys.is_empty() && self.gc.pending_any.load(Ordering::Acquire) {
            let found = self.db.batched_multi_get_cf(pending, &pending_keys, false);
            for (i, got) in found.into_iter().enumerate() {
                candidate[i] = got?.is_some();
            }
        }
        let present = self.db.batched_multi_get_cf(self.cf(family), keys, false);
        let mut out = Vec::with_capacity(keys.len());
        for got in present {
            out.push(if got?.is_some() {
                Found::Present
            } else {
                Found::Absent
            });
        }
        if !candidate.contains(&true) {
            return Ok(out);
        }
        let _gate = self.gc.gate.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = WriteBatch::default();
        for (i, _) in candidate.iter().enumerate().filter(|(_, c)| **c) {
            if out[i] == Found::Absent {
                continue;
            }
            batch.delete_cf(pending, &pending_keys[i]);
            out[i] = if self.db.get_pinned_cf(self.cf(family), keys[i])?.is_some() {
                Found::Revived
            } else {
                Found::Absent
            };
        }
        self.write(batch, false)?;
        Ok(out)
    }

    /// Holds garbage collection off what a writer finds or writes from now
    /// on until the hold is dropped (see [`GcHold`]).
    pub fn hold(&self) -> GcHold {
        let id = self.gc.tick();
        self.gc
            .holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, id);
        GcHold {
            holds: self.gc.holds.clone(),
            id,
        }
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn cf(&self, name: &'static str) -> &ColumnFamily {
        // The families are created at open; a missing one is a programming
        // error that open would already have reported.
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if let Some(why) = self.poisoned() {
            return Err(Error::Poisoned(format!(
                "a previous write failed ({why}); restart the node to recover from the WAL"
            )));
        }
        Ok(())
    }

    /// Why the store refuses writes, once a write has failed: the node is
    /// then unfit for writes until it restarts.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.get().map(String::as_str)
    }

    pub(crate) fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.write_opt(batch, &opts)
    }

    fn write_opt(&self, batch: WriteBatch, opts: &WriteOptions) -> Result<()> {
        self.check_writable()?;
        self.db.write_opt(batch, opts).map_err(|e| self.poison(e))
    }

    /// After a failed (synced) write we no longer know what is on disk: the
    /// store refuses writes from now on.
    fn poison(&self, e: rocksdb::Error) -> Error {
        let _ = self.poisoned.set(e.to_string());
        Error::Poisoned(e.to_string())
    }

    /// Makes every chunk written so far durable: flushes the chunk and index
    /// memtables (atomically, as one) to blob and SST files, which RocksDB
    /// fsyncs before it records them.
    fn persist_chunks(&self) -> Result<()> {
        self.check_writable()?;
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        self.db
            .flush_cfs_opt(&[self.cf(CF_CHUNKS), self.cf(CF_CHUNK_INDEX)], &opts)
            .map_err(|e| self.poison(e))
    }

    /// Durably stores a manifest, after its chunks. It names no dataset: the
    /// dataset's head moves through Raft once the manifest is durable here
    /// (and on a majority of the shard's replicas).
    pub fn store_manifest_durable(
        &self,
        tenant: &str,
        id: &SnapshotId,
        bytes: &[u8],
    ) -> Result<()> {
        self.persist_chunks()?;
        let key = tenant_key(tenant, id.as_bytes());
        // Stored again while a candidate: it must not be freed under the
        // commit about to name it. Under the gate, so that a sweep either
        // freed it before this write or sees that it is no candidate.
        let _gate = self.root_gate(&key)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_MANIFESTS), &key, bytes);
        batch.delete_cf(self.cf(CF_GC_PENDING), pending_key(PENDING_ROOT, &key));
        self.write(batch, true)
    }

    /// The sweep's gate when `key` (a root) is a candidate for freeing.
    fn root_gate(&self, key: &[u8]) -> Result<Option<std::sync::MutexGuard<'_, ()>>> {
        if !self.gc.pending_any.load(Ordering::Acquire) {
            return Ok(None);
        }
        let pending = pending_key(PENDING_ROOT, key);
        if self
            .db
            .get_pinned_cf(self.cf(CF_GC_PENDING), pending)?
            .is_none()
        {
            return Ok(None);
        }
        Ok(Some(self.gc.gate.lock().unwrap_or_else(|e| e.into_inner())))
    }

    /// Sets where evicted chunks are read back from (once).
    pub fn set_cold_reader(&self, reader: SharedColdReader) {
        let _ = self.cold.set(reader);
    }

    /// An evicted chunk's stored bytes, from its pack in the cold tier
    /// (checked against its name by the caller, as any read).
    fn load_cold(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>> {
        let Some((pack, offset, len)) = self.cold_record(tenant, id)? else {
            return Err(Error::MissingChunk(*id));
        };
        let reader = self.cold.get().ok_or_else(|| {
            Error::Unavailable(format!(
                "chunk {id} is in the cold tier (pack {pack}) and this node has no [cold] bucket"
            ))
        })?;
        reader.read(&pack, offset, len)
    }

    /// Where `id` is in the cold tier, if it is.
    pub fn cold_record(&self, tenant: &str, id: &ChunkId) -> Result<Option<(ChunkId, u64, u32)>> {
        let key = cold_key(&tenant_key(tenant, id.as_bytes()));
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_META), key)?
            .and_then(|v| decode_record(&v)))
    }

    /// The stored bytes of `id` if this store holds them itself (not
    /// evicted to the cold tier), not checked yet.
    pub fn load_local(&self, tenant: &str, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        // Every chunk read is checked against its BLAKE3 name, which
        // catches everything RocksDB's block CRC would; skipping the CRC
        // saves a software crc32c pass over every byte read (the portable
        // RocksDB build has no SSE4.2 CRC), a third of an export's CPU.
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_verify_checksums(false);
        match self
            .db
            .get_cf_opt(self.cf(CF_CHUNKS), tenant_key(tenant, id.as_bytes()), &opts)
        {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == ErrorKind::Corruption => Err(Error::CorruptChunk {
                chunk: *id,
                detail: e.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether this store holds a copy of `id` itself (not evicted).
    pub fn holds_locally(&self, tenant: &str, id: &ChunkId) -> Result<bool> {
        Ok(self.load_local(tenant, id)?.is_some())
    }

    /// Whether the pack `pack` was indexed here.
    pub fn has_pack(&self, pack: &ChunkId) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_META), pack_key(pack))?
            .is_some())
    }

    /// Records every chunk of `pack` (in the cold bucket now) and drops
    /// the local copies; returns how many chunks it recorded. A chunk freed
    /// meanwhile (no index entry) or already in an earlier pack is left as
    /// it is. Durable when it returns.
    pub fn index_pack(&self, pack: &ChunkId, entries: &[PackEntry]) -> Result<u64> {
        self.check_writable()?;
        let mut batch = WriteBatch::default();
        let mut evicted = 0;
        let _gate = self.gc.gate.lock().unwrap_or_else(|e| e.into_inner());
        for e in entries {
            let key = tenant_key(&e.tenant, e.id.as_bytes());
            // Freed meanwhile, or in a pack indexed before: nothing to do.
            // (Presence is asked of the index and the records, never of
            // the chunks family: that would read every blob of the pack.)
            if self
                .db
                .get_pinned_cf(self.cf(CF_CHUNK_INDEX), &key)?
                .is_none()
                || self
                    .db
                    .get_pinned_cf(self.cf(CF_META), cold_key(&key))?
                    .is_some()
            {
                continue;
            }
            batch.put_cf(
                self.cf(CF_META),
                cold_key(&key),
                encode_record(pack, e.offset, e.len),
            );
            batch.delete_cf(self.cf(CF_CHUNKS), &key);
            evicted += 1;
        }
        batch.put_cf(self.cf(CF_META), pack_key(pack), []);
        self.write(batch, true)?;
        Ok(evicted)
    }

    /// Replaces a stored chunk with good bytes (from a replica) after a read
    /// found it corrupt or missing, and makes the repair durable.
    pub fn repair_chunk(&self, tenant: &str, id: &ChunkId, data: &[u8]) -> Result<()> {
        if !id.verify(data) {
            return Err(Error::CorruptChunk {
                chunk: *id,
                detail: "the replacement does not match the chunk's name either".into(),
            });
        }
        self.write_chunk(tenant, id, data)?;
        self.persist_chunks()
    }

    /// Writes a chunk and its index entry together. Chunk bytes bypass the
    /// WAL: written once (to blob files at flush) instead of twice. Losing
    /// unflushed chunks in a crash is harmless: nothing refers to them until
    /// `commit_snapshot`, which flushes them before the manifest is written.
    /// Adds a chunk and its index entry to `batch`.
    fn stage_chunk(&self, batch: &mut WriteBatch, key: &[u8], data: &[u8]) {
        batch.put_cf(self.cf(CF_CHUNKS), key, data);
        batch.put_cf(
            self.cf(CF_CHUNK_INDEX),
            key,
            (data.len() as u32).to_le_bytes(),
        );
        // A record left from before (a purge that raced a sweep): the chunk
        // is new now. Only while records may exist: an ordinary put adds no
        // tombstone per new chunk.
        if self.gc.pending_any.load(Ordering::Acquire) {
            batch.delete_cf(self.cf(CF_GC_PENDING), pending_key(PENDING_CHUNK, key));
        }
    }

    fn write_chunk(&self, tenant: &str, id: &ChunkId, data: &[u8]) -> Result<()> {
        let key = tenant_key(tenant, id.as_bytes());
        let mut batch = WriteBatch::default();
        self.stage_chunk(&mut batch, &key, data);
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        self.write_opt(batch, &opts)
    }

    /// The dataset heads, snapshot records and opaque records (jobs) that
    /// the previous release kept in the metadata family of a standalone
    /// node; empty once they have been moved into the cluster state (see
    /// [`RocksStore::drop_legacy_metadata`]).
    ///
    /// Layout of that release: `h\0<tenant>\0<dataset>` → the head's 32
    /// bytes; `s\0<tenant>\0<dataset>\0<ms:8 BE><id:32>` → a
    /// [`SnapshotRecord`] as JSON; `r<key>` → opaque bytes (`job/<id>` → a
    /// job as JSON).
    pub fn legacy_metadata(&self) -> Result<LegacyMetadata> {
        let mut out = LegacyMetadata::default();
        for (k, v) in self.scan(CF_META, &[b'h', 0])? {
            let (tenant, dataset) = split_names(&k[2..])
                .ok_or_else(|| Error::decode("legacy dataset head key", format!("{k:?}")))?;
            let head = SnapshotId::from_slice(&v)
                .map_err(|_| Error::decode("legacy dataset head", dataset.clone()))?;
            out.heads.push(LegacyHead {
                tenant,
                dataset,
                head,
            });
        }
        for (k, v) in self.scan(CF_META, &[b's', 0])? {
            let (tenant, _) = split_names(&k[2..])
                .ok_or_else(|| Error::decode("legacy snapshot key", format!("{k:?}")))?;
            let record: SnapshotRecord = serde_json::from_slice(&v)
                .map_err(|e| Error::decode("legacy snapshot record", e.to_string()))?;
            out.snapshots.push((tenant, record));
        }
        for (k, v) in self.scan(CF_META, b"r")? {
            out.records
                .push((String::from_utf8_lossy(&k[1..]).into_owned(), v));
        }
        Ok(out)
    }

    /// Deletes what [`RocksStore::legacy_metadata`] reads, durably, in one
    /// batch, but for the records named in `keep` (ones that could not be
    /// read, left for a person to look at): called once the cluster state
    /// holds the rest.
    pub fn drop_legacy_metadata(&self, keep: &[String]) -> Result<()> {
        let mut batch = WriteBatch::default();
        let kept: Vec<Vec<u8>> = keep.iter().map(|k| [b"r", k.as_bytes()].concat()).collect();
        for prefix in [&[b'h', 0][..], &[b's', 0][..], &b"r"[..]] {
            for (k, _) in self.scan(CF_META, prefix)? {
                if !kept.contains(&k) {
                    batch.delete_cf(self.cf(CF_META), k);
                }
            }
        }
        self.write(batch, true)
    }

    fn scan(&self, cf: &'static str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf), IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Approximate chunk count and bytes, and each column family's size.
    pub fn stats(&self) -> Result<StoreStats> {
        let prop = |cf, name| -> Result<u64> {
            Ok(self
                .db
                .property_int_value_cf(self.cf(cf), name)?
                .unwrap_or(0))
        };
        let families = [CF_CHUNKS, CF_CHUNK_INDEX, CF_MANIFESTS, CF_META]
            .into_iter()
            .map(|name| {
                Ok(FamilyStats {
                    name,
                    keys: prop(name, "rocksdb.estimate-num-keys")?,
                    bytes: prop(name, "rocksdb.total-blob-file-size")?
                        + prop(name, "rocksdb.live-sst-files-size")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let chunk_bytes = families
            .iter()
            .find(|f| f.name == CF_CHUNKS)
            .map_or(0, |f| f.bytes);
        Ok(StoreStats {
            chunks: prop(CF_CHUNK_INDEX, "rocksdb.estimate-num-keys")?,
            chunk_bytes,
            families,
        })
    }

    /// Flushes memtables and the WAL to disk; call before a clean shutdown.
    pub fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        for cf in [CF_CHUNKS, CF_CHUNK_INDEX, CF_MANIFESTS, CF_META] {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }
}

impl ChunkStore for RocksStore {
    fn has_chunk(&self, tenant: &str, id: &ChunkId) -> Result<bool> {
        // Whoever asks is about to rely on it (a dedup check).
        let key = tenant_key(tenant, id.as_bytes());
        Ok(self.lookup(PENDING_CHUNK, &[&key])?[0] != Found::Absent)
    }

    fn has_settled_chunk(&self, tenant: &str, id: &ChunkId) -> Result<bool> {
        let key = tenant_key(tenant, id.as_bytes());
        Ok(self.lookup(PENDING_CHUNK, &[&key])?[0] == Found::Present)
    }

    fn put_chunk(&self, tenant: &str, id: &ChunkId, data: &[u8]) -> Result<bool> {
        if self.has_chunk(tenant, id)? {
            return Ok(false);
        }
        self.write_chunk(tenant, id, data)?;
        Ok(true)
    }

    fn put_chunks(&self, tenant: &str, chunks: &[(ChunkId, &[u8])]) -> Result<Vec<bool>> {
        self.check_writable()?;
        let keys: Vec<Vec<u8>> = chunks
            .iter()
            .map(|(id, _)| tenant_key(tenant, id.as_bytes()))
            .collect();
        // Those found are kept from garbage collection; one freed in the
        // meantime is written again.
        let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let found = self.lookup(PENDING_CHUNK, &key_refs)?;
        let mut batch = WriteBatch::default();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(chunks.len());
        for ((key, (id, data)), got) in keys.iter().zip(chunks).zip(found) {
            let new = got == Found::Absent && seen.insert(*id);
            if new {
                self.stage_chunk(&mut batch, key, data);
            }
            out.push(new);
        }
        if !batch.is_empty() {
            // No WAL, as for single chunks (see `write_chunk`).
            let mut opts = WriteOptions::default();
            opts.disable_wal(true);
            self.write_opt(batch, &opts)?;
        }
        Ok(out)
    }

    fn load_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>> {
        match self.load_local(tenant, id)? {
            Some(v) => Ok(v),
            None => self.load_cold(tenant, id),
        }
    }

    fn put_manifest(&self, tenant: &str, id: &SnapshotId, bytes: &[u8]) -> Result<()> {
        let key = tenant_key(tenant, id.as_bytes());
        let _gate = self.root_gate(&key)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_MANIFESTS), &key, bytes);
        batch.delete_cf(self.cf(CF_GC_PENDING), pending_key(PENDING_ROOT, &key));
        self.write(batch, false)
    }

    fn load_manifest(&self, tenant: &str, id: &SnapshotId) -> Result<Vec<u8>> {
        match self
            .db
            .get_cf(self.cf(CF_MANIFESTS), tenant_key(tenant, id.as_bytes()))?
        {
            Some(v) => Ok(v),
            None => Err(Error::not_found("snapshot", id.to_hex())),
        }
    }

    fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    fn sync(&self) -> Result<()> {
        self.persist_chunks()?;
        self.db.flush_wal(true).map_err(|e| self.poison(e))
    }
}

// Chunk and manifest keys: [len(tenant) u8][tenant][32-byte id]. The length
// prefix keeps tenant "t" from aliasing tenant "t1".
/// A candidate record's key in `meta`: `[b'g'][kind][key]`.
pub(crate) fn pending_key(kind: u8, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.len());
    k.push(PENDING_PREFIX);
    k.push(kind);
    k.extend_from_slice(key);
    k
}

/// A cold record's key in `meta`.
pub(crate) fn cold_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(COLD_PREFIX);
    k.extend_from_slice(key);
    k
}

fn pack_key(pack: &ChunkId) -> Vec<u8> {
    let mut k = vec![PACK_PREFIX];
    k.extend_from_slice(pack.as_bytes());
    k
}

pub(crate) fn tenant_key(tenant: &str, id: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + tenant.len() + 32);
    k.push(tenant.len() as u8);
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(id);
    k
}

/// Splits `<tenant>\0<dataset>[\0...]` (names never contain NUL).
fn split_names(k: &[u8]) -> Option<(String, String)> {
    let mut parts = k.splitn(3, |b| *b == 0);
    let tenant = std::str::from_utf8(parts.next()?).ok()?;
    let dataset = std::str::from_utf8(parts.next()?).ok()?;
    Some((tenant.to_string(), dataset.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        crate::conformance::run_all(&store);
    }

    #[test]
    fn conformance_mem() {
        crate::conformance::run_all(&crate::store::MemStore::new());
    }

    #[test]
    fn legacy_metadata_is_read_in_the_previous_layout_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        assert!(store.legacy_metadata().unwrap().is_empty());
        // Written key by key as the previous release wrote them.
        let id = SnapshotId::of(b"snapshot");
        let record = SnapshotRecord {
            id: id.to_hex(),
            dataset: "d".into(),
            parent: String::new(),
            files: 3,
            bytes: 30,
            created_unix_ms: 7,
        };
        let mut snap_key = b"s\0t\0d\0".to_vec();
        snap_key.extend_from_slice(&7u64.to_be_bytes());
        snap_key.extend_from_slice(id.as_bytes());
        let meta = store.cf(CF_META);
        store.db.put_cf(meta, b"h\0t\0d", id.as_bytes()).unwrap();
        store
            .db
            .put_cf(meta, &snap_key, serde_json::to_vec(&record).unwrap())
            .unwrap();
        store.db.put_cf(meta, b"rjob/j1", b"{}").unwrap();
        let m = store.legacy_metadata().unwrap();
        assert_eq!(
            m.heads,
            vec![LegacyHead {
                tenant: "t".into(),
                dataset: "d".into(),
                head: id
            }]
        );
        assert_eq!(m.snapshots, vec![("t".to_string(), record)]);
        assert_eq!(m.records, vec![("job/j1".to_string(), b"{}".to_vec())]);
        store.db.put_cf(meta, b"rjob/bad", b"{").unwrap();
        store
            .drop_legacy_metadata(&["job/bad".to_string()])
            .unwrap();
        drop(store);
        let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        // Only the record kept for a person to look at is left.
        let left = store.legacy_metadata().unwrap();
        assert!(left.heads.is_empty() && left.snapshots.is_empty());
        assert_eq!(left.records, vec![("job/bad".to_string(), b"{".to_vec())]);
    }
}
