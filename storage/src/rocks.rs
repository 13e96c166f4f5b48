//! The RocksDB implementation of [`ChunkStore`], plus the node's small
//! metadata (dataset heads, snapshot records, opaque records such as jobs).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, ErrorKind, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::store::{verified, ChunkStore};

const CF_CHUNKS: &str = "chunks";
const CF_CHUNK_INDEX: &str = "chunk_index";
const CF_MANIFESTS: &str = "manifests";
const CF_META: &str = "meta";

/// Tuning of the RocksDB store.
#[derive(Debug, Clone)]
pub struct RocksOptions {
    /// Values at least this large go to blob files (BlobDB) instead of SSTs.
    pub min_blob_size: u64,
    /// Target size of one blob file.
    pub blob_file_size: u64,
    /// Memtable size per column family.
    pub write_buffer_size: usize,
    /// Block cache for SST blocks (index, small chunks, metadata).
    pub block_cache_bytes: usize,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            min_blob_size: 4096,
            blob_file_size: 256 << 20,
            write_buffer_size: 64 << 20,
            block_cache_bytes: 64 << 20,
        }
    }
}

/// What the store holds about one committed snapshot (the manifest itself is
/// stored separately, content-addressed).
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

/// Summary of one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSummary {
    /// Dataset name.
    pub name: String,
    /// Its latest snapshot.
    pub head: SnapshotId,
    /// How many snapshots it has.
    pub snapshots: u64,
}

/// Rough sizes for the stats endpoint.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Estimated number of distinct chunks.
    pub chunks: u64,
    /// Bytes on disk used by chunk data (blob files and SSTs).
    pub chunk_bytes: u64,
    /// Datasets of all tenants.
    pub datasets: u64,
    /// Snapshots of all tenants.
    pub snapshots: u64,
}

/// [`ChunkStore`] on RocksDB: chunk bytes in a BlobDB column family, a small
/// index column family for existence checks that never touch blob files,
/// manifests and metadata in their own families.
pub struct RocksStore {
    db: DB,
    path: PathBuf,
    poisoned: AtomicBool,
    // Serialises the compare-and-set on dataset heads.
    commit_lock: Mutex<()>,
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
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs)?;
        Ok(RocksStore {
            db,
            path: dir.to_path_buf(),
            poisoned: AtomicBool::new(false),
            commit_lock: Mutex::new(()),
        })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &'static str) -> &ColumnFamily {
        // The families are created at open; a missing one is a programming
        // error that open would already have reported.
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn check_writable(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned(
                "a previous write failed; restart the node to recover from the WAL".into(),
            ));
        }
        Ok(())
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
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
        self.poisoned.store(true, Ordering::Release);
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

    /// Atomically and durably (fsync) stores a manifest and moves the
    /// dataset's head to it, if the head is still `manifest.parent`
    /// (compare-and-set). Returns the record of the new snapshot.
    pub fn commit_snapshot(
        &self,
        manifest: &Manifest,
        id: &SnapshotId,
        bytes: &[u8],
    ) -> Result<SnapshotRecord> {
        let _guard = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tenant = &manifest.tenant;
        let dataset = &manifest.dataset;
        let head = self.head(tenant, dataset)?;
        if head != manifest.parent && head != Some(*id) {
            return Err(Error::Conflict(format!(
                "dataset {dataset} moved to {} while this snapshot was built on {}; retry",
                head.map(|h| h.to_hex()).unwrap_or_else(|| "nothing".into()),
                manifest
                    .parent
                    .map(|h| h.to_hex())
                    .unwrap_or_else(|| "nothing".into())
            )));
        }
        let record = SnapshotRecord {
            id: id.to_hex(),
            dataset: dataset.clone(),
            parent: manifest.parent.map(|p| p.to_hex()).unwrap_or_default(),
            files: manifest.file_count(),
            bytes: manifest.total_bytes(),
            created_unix_ms: manifest.created_unix_ms,
        };
        if head == Some(*id) {
            // The same content again: nothing moves.
            return Ok(record);
        }
        // Chunks first: a manifest must never be durable before its chunks.
        self.persist_chunks()?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_MANIFESTS), tenant_key(tenant, id), bytes);
        batch.put_cf(
            self.cf(CF_META),
            snapshot_key(tenant, dataset, manifest.created_unix_ms, id),
            serde_json::to_vec(&record)
                .map_err(|e| Error::InvalidArgument(format!("encode snapshot record: {e}")))?,
        );
        batch.put_cf(self.cf(CF_META), head_key(tenant, dataset), id.as_bytes());
        self.write(batch, true)?;
        Ok(record)
    }

    /// Durably stores a manifest (after its chunks) without moving any
    /// dataset head: in a cluster the head moves through Raft instead.
    pub fn store_manifest_durable(
        &self,
        tenant: &str,
        id: &SnapshotId,
        bytes: &[u8],
    ) -> Result<()> {
        self.persist_chunks()?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_MANIFESTS), tenant_key(tenant, id), bytes);
        self.write(batch, true)
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
    fn write_chunk(&self, tenant: &str, id: &ChunkId, data: &[u8]) -> Result<()> {
        let key = tenant_key(tenant, id);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_CHUNKS), &key, data);
        batch.put_cf(
            self.cf(CF_CHUNK_INDEX),
            &key,
            (data.len() as u32).to_le_bytes(),
        );
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        self.write_opt(batch, &opts)
    }

    /// The latest snapshot of a dataset, if it has one.
    pub fn head(&self, tenant: &str, dataset: &str) -> Result<Option<SnapshotId>> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_META), head_key(tenant, dataset))?
        {
            Some(v) => Ok(Some(ChunkId::from_slice(&v).map_err(|_| {
                Error::decode("dataset head", format!("{} bytes", v.len()))
            })?)),
            None => Ok(None),
        }
    }

    /// The datasets of a tenant, sorted by name.
    pub fn list_datasets(&self, tenant: &str) -> Result<Vec<DatasetSummary>> {
        let mut out = Vec::new();
        for (key, value) in self.scan(CF_META, &meta_prefix(b'h', tenant))? {
            let name =
                String::from_utf8_lossy(&key[meta_prefix(b'h', tenant).len()..]).into_owned();
            let head = ChunkId::from_slice(&value)
                .map_err(|_| Error::decode("dataset head", name.clone()))?;
            let snapshots = self.list_snapshots(tenant, &name)?.len() as u64;
            out.push(DatasetSummary {
                name,
                head,
                snapshots,
            });
        }
        Ok(out)
    }

    /// The snapshots of a dataset, oldest first.
    pub fn list_snapshots(&self, tenant: &str, dataset: &str) -> Result<Vec<SnapshotRecord>> {
        let mut prefix = meta_prefix(b's', tenant);
        prefix.extend_from_slice(dataset.as_bytes());
        prefix.push(0);
        self.scan(CF_META, &prefix)?
            .into_iter()
            .map(|(_, v)| {
                serde_json::from_slice(&v)
                    .map_err(|e| Error::decode("snapshot record", e.to_string()))
            })
            .collect()
    }

    /// Stores an opaque record (e.g. a job) under `key` in the metadata family.
    pub fn put_record(&self, key: &str, value: &[u8], sync: bool) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), record_key(key), value);
        self.write(batch, sync)
    }

    /// Reads an opaque record.
    pub fn get_record(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_META), record_key(key))?
            .map(|v| v.to_vec()))
    }

    /// All opaque records whose key starts with `prefix`, in key order.
    pub fn scan_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let p = record_key(prefix);
        Ok(self
            .scan(CF_META, &p)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k[1..]).into_owned(), v))
            .collect())
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

    /// Approximate chunk count and bytes.
    pub fn stats(&self) -> Result<StoreStats> {
        let prop = |cf, name| -> Result<u64> {
            Ok(self
                .db
                .property_int_value_cf(self.cf(cf), name)?
                .unwrap_or(0))
        };
        Ok(StoreStats {
            chunks: prop(CF_CHUNK_INDEX, "rocksdb.estimate-num-keys")?,
            chunk_bytes: prop(CF_CHUNKS, "rocksdb.total-blob-file-size")?
                + prop(CF_CHUNKS, "rocksdb.live-sst-files-size")?,
            datasets: self.scan(CF_META, &[b'h', 0])?.len() as u64,
            snapshots: self.scan(CF_META, &[b's', 0])?.len() as u64,
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
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_CHUNK_INDEX), tenant_key(tenant, id))?
            .is_some())
    }

    fn put_chunk(&self, tenant: &str, id: &ChunkId, data: &[u8]) -> Result<bool> {
        if self.has_chunk(tenant, id)? {
            return Ok(false);
        }
        self.write_chunk(tenant, id, data)?;
        Ok(true)
    }

    fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>> {
        // Every chunk read is checked against its BLAKE3 name below, which
        // catches everything RocksDB's block CRC would; skipping the CRC
        // saves a software crc32c pass over every byte read (the portable
        // RocksDB build has no SSE4.2 CRC), a third of an export's CPU.
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_verify_checksums(false);
        match self
            .db
            .get_cf_opt(self.cf(CF_CHUNKS), tenant_key(tenant, id), &opts)
        {
            Ok(Some(v)) => verified(id, v),
            Ok(None) => Err(Error::MissingChunk(*id)),
            Err(e) if e.kind() == ErrorKind::Corruption => Err(Error::CorruptChunk {
                chunk: *id,
                detail: e.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn put_manifest(&self, tenant: &str, id: &SnapshotId, bytes: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_MANIFESTS), tenant_key(tenant, id), bytes);
        self.write(batch, false)
    }

    fn get_manifest(&self, tenant: &str, id: &SnapshotId) -> Result<Vec<u8>> {
        match self
            .db
            .get_cf(self.cf(CF_MANIFESTS), tenant_key(tenant, id))?
        {
            Some(v) => verified(id, v),
            None => Err(Error::not_found("snapshot", id.to_hex())),
        }
    }

    fn sync(&self) -> Result<()> {
        self.persist_chunks()?;
        self.db.flush_wal(true).map_err(|e| self.poison(e))
    }
}

// Chunk and manifest keys: [len(tenant) u8][tenant][32-byte id]. The length
// prefix keeps tenant "t" from aliasing tenant "t1".
fn tenant_key(tenant: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + tenant.len() + 32);
    k.push(tenant.len() as u8);
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

// Metadata keys: a one-byte kind, then NUL-separated names (names are
// validated and never contain NUL).
fn meta_prefix(kind: u8, tenant: &str) -> Vec<u8> {
    let mut k = vec![kind, 0];
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k
}

fn head_key(tenant: &str, dataset: &str) -> Vec<u8> {
    let mut k = meta_prefix(b'h', tenant);
    k.extend_from_slice(dataset.as_bytes());
    k
}

fn snapshot_key(tenant: &str, dataset: &str, created_ms: i64, id: &ChunkId) -> Vec<u8> {
    let mut k = meta_prefix(b's', tenant);
    k.extend_from_slice(dataset.as_bytes());
    k.push(0);
    // Big-endian so that keys sort by time (times before 1970 are not expected).
    k.extend_from_slice(&(created_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn record_key(key: &str) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(key.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Entry, EntryKind};

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

    fn manifest(parent: Option<SnapshotId>, ms: i64, content: &str) -> Manifest {
        let id = ChunkId::of(content.as_bytes());
        Manifest {
            tenant: "t".into(),
            dataset: "d".into(),
            parent,
            created_unix_ms: ms,
            chunking: Default::default(),
            entries: vec![Entry {
                path: "f".into(),
                kind: EntryKind::File,
                size: content.len() as u64,
                mode: 0o644,
                mtime_ns: 0,
                blake3: *id.as_bytes(),
                chunks: vec![crate::manifest::ChunkRef {
                    id,
                    len: content.len() as u32,
                }],
            }],
        }
    }

    #[test]
    fn commit_is_compare_and_set_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first;
        {
            let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
            let m1 = manifest(None, 1, "one");
            let (id1, b1) = m1.encode_with_id().unwrap();
            store.commit_snapshot(&m1, &id1, &b1).unwrap();
            // A writer that still believes the dataset is empty loses.
            let stale = manifest(None, 2, "two");
            let (id2, b2) = stale.encode_with_id().unwrap();
            assert!(matches!(
                store.commit_snapshot(&stale, &id2, &b2),
                Err(Error::Conflict(_))
            ));
            let m2 = manifest(Some(id1), 3, "two");
            let (id2, b2) = m2.encode_with_id().unwrap();
            store.commit_snapshot(&m2, &id2, &b2).unwrap();
            assert_eq!(store.head("t", "d").unwrap(), Some(id2));
            first = id1;
        }
        let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        let snaps = store.list_snapshots("t", "d").unwrap();
        assert_eq!(snaps.len(), 2);
        assert_eq!(snaps[0].id, first.to_hex());
        let ds = store.list_datasets("t").unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].snapshots, 2);
        assert!(store.list_datasets("other").unwrap().is_empty());
        let bytes = store.get_manifest("t", &first).unwrap();
        assert_eq!(Manifest::decode(&bytes).unwrap(), manifest(None, 1, "one"));
    }

    #[test]
    fn records_scan_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        store.put_record("job/b", b"2", false).unwrap();
        store.put_record("job/a", b"1", true).unwrap();
        store.put_record("other", b"x", false).unwrap();
        let jobs = store.scan_records("job/").unwrap();
        assert_eq!(
            jobs,
            vec![
                ("job/a".to_string(), b"1".to_vec()),
                ("job/b".to_string(), b"2".to_vec())
            ]
        );
        assert_eq!(store.get_record("other").unwrap(), Some(b"x".to_vec()));
    }
}
