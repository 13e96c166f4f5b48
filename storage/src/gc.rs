//! Online garbage collection of the chunk store: frees chunks, manifest
//! pages and roots that no snapshot reaches, while puts, reads and repairs
//! go on.
//!
//! A pass marks what the given snapshots reach, exactly, in a scratch
//! RocksDB beside the store (its memory is the scratch database's write
//! buffer, whatever the number of chunks), then walks the chunk index and
//! the marks together in key order. What is unreachable is not freed at
//! once: it becomes a *candidate* (a record in `meta`, with the pass that found
//! it) and is freed by a later pass that finds it still unreachable once
//! the grace period has passed. A lookup that finds a candidate (the dedup
//! check of a put, a replica asked what it lacks, a write of the same
//! chunk) takes it off the list, under the gate the sweep frees under, so
//! a chunk something relies on is freed only after a later pass, at least a
//! grace period on, finds it unreachable again. A writer that takes longer
//! than that (a put, a repair) holds collection off ([`RocksStore::hold`]):
//! while it runs, no candidate found by a pass that was still running when
//! it began is freed, so nothing it found or wrote is freed before its
//! snapshot is committed (and then reached).
//!
//! A manifest page that is here stands for its whole subtree (replication
//! and repair do not descend below a page a node has): a page is freed
//! only when it is unreachable, so its children are kept while it is
//! reachable; and while a page is a candidate (its children may already be
//! gone), [`ChunkStore::has_settled_chunk`] says it is missing, so that a
//! sender or a repair descends below it.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::manifest::{decode_root, Page, Stored};
use crate::rocks::{
    cold_key, now_ms, pending_key, tenant_key, RocksStore, CF_CHUNKS, CF_CHUNK_INDEX,
    CF_GC_PENDING, CF_MANIFESTS, PENDING_CHUNK, PENDING_ROOT,
};
use crate::store::{verified, ChunkStore};

/// How a pass runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// How long something stays unreachable before it is freed.
    pub grace: Duration,
    /// Memory for the mark: the scratch database's write buffer.
    pub memory_bytes: usize,
    /// Count what would be freed, change nothing.
    pub dry_run: bool,
    /// After freeing at least a sixteenth of the chunk bytes, compact the
    /// chunk families with blob garbage collection on, so that the space
    /// comes back on disk.
    pub compact: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            memory_bytes: 64 << 20,
            dry_run: false,
            compact: true,
        }
    }
}

/// A snapshot that must stay readable: every chunk and page it reaches is
/// live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcRoot {
    /// Its tenant.
    pub tenant: String,
    /// Its id.
    pub snapshot: SnapshotId,
}

/// What a pass found and did (with `dry_run`, what it would have freed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Snapshots walked.
    pub roots: u64,
    /// Snapshots named but not stored on this node.
    pub roots_absent: u64,
    /// Manifest pages read.
    pub pages_read: u64,
    /// Reachable chunks and pages written to the mark (a chunk two
    /// snapshots share, twice).
    pub marked: u64,
    /// Chunks (and pages) examined.
    pub examined: u64,
    /// Of those, reachable.
    pub live: u64,
    /// Unreachable, kept until the grace period has passed.
    pub waiting: u64,
    pub waiting_bytes: u64,
    /// Freed (chunks and pages).
    pub freed: u64,
    pub freed_bytes: u64,
    /// Snapshot roots freed (roots of deleted snapshots, or of uploads that
    /// never committed).
    pub roots_freed: u64,
    /// Freed per tenant: (chunks, bytes).
    pub tenants: BTreeMap<String, (u64, u64)>,
    /// Whether the chunk families were compacted afterwards.
    pub compacted: bool,
    /// Time spent marking and sweeping.
    pub mark_time: Duration,
    pub sweep_time: Duration,
}

/// Candidates freed under the gate at a time.
const FREE_BATCH: usize = 256;
/// Marks written at a time.
const MARK_BATCH: usize = 4096;
/// Passes remembered (their start and end on the store's clock) to tell
/// which candidates a writer in progress may have missed; a candidate of a
/// pass forgotten since is kept while any writer holds collection off.
const KEEP_PASSES: usize = 1024;

/// Splits a chunk or root key (`[len][tenant][32-byte id]`).
pub(crate) fn split_key(key: &[u8]) -> Option<(&[u8], [u8; 32])> {
    let n = usize::from(*key.first()?);
    if key.len() != 1 + n + 32 {
        return None;
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&key[1 + n..]);
    Some((&key[1..1 + n], id))
}

/// A candidate's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    /// When the pass that found it started (ms): the grace period.
    since: i64,
    len: u32,
    /// The process (store opening) and the pass on its clock.
    boot: u64,
    pass: u64,
}

impl Pending {
    fn encode(&self) -> [u8; 28] {
        let mut v = [0u8; 28];
        v[..8].copy_from_slice(&self.since.to_be_bytes());
        v[8..12].copy_from_slice(&self.len.to_le_bytes());
        v[12..20].copy_from_slice(&self.boot.to_le_bytes());
        v[20..].copy_from_slice(&self.pass.to_le_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Pending> {
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(v.get(i..i + 8)?.try_into().ok()?))
        };
        Some(Pending {
            since: i64::from_be_bytes(v.get(..8)?.try_into().ok()?),
            len: u32::from_le_bytes(v.get(8..12)?.try_into().ok()?),
            boot: u64_at(12)?,
            pass: u64_at(20)?,
        })
    }
}

/// Which candidates a pass may free.
struct Freeable {
    /// Found by a pass that started at or before this time (ms): the grace
    /// period.
    cutoff: i64,
    /// The start (store clock) of the oldest writer in progress when the
    /// pass began.
    held_since: Option<u64>,
    /// This process's store opening.
    boot: u64,
    /// Passes of this process: start → end, on the store's clock.
    passes: BTreeMap<u64, u64>,
}

impl Freeable {
    /// Whether a candidate may be freed: it is past the grace period, and
    /// no writer in progress began while the pass that found it was running
    /// (a lookup of it then could have come just before the record was
    /// written, and not taken it off).
    fn allows(&self, p: &Pending) -> bool {
        if p.since > self.cutoff {
            return false;
        }
        let Some(held) = self.held_since else {
            return true;
        };
        if p.boot != self.boot {
            // Found before this process: every writer in progress began
            // later.
            return true;
        }
        self.passes.get(&p.pass).copied().unwrap_or(u64::MAX) < held
    }
}

/// The scratch database of a pass's marks, removed when dropped.
struct Marks {
    db: Option<DB>,
    dir: PathBuf,
}

impl Marks {
    fn open(dir: PathBuf, memory: usize) -> Result<Marks> {
        let _ = std::fs::remove_dir_all(&dir);
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        // Two write buffers of half each: the mark's memory.
        opts.set_write_buffer_size(memory.clamp(1 << 20, 256 << 20) / 2);
        opts.set_max_write_buffer_number(2);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let db = DB::open(&opts, &dir)?;
        Ok(Marks { db: Some(db), dir })
    }

    fn db(&self) -> &DB {
        // Taken only in drop.
        #[allow(clippy::expect_used)]
        self.db.as_ref().expect("open until dropped")
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        // Scratch: nothing to recover after a crash.
        let mut w = WriteOptions::default();
        w.disable_wal(true);
        Ok(self.db().write_opt(batch, &w)?)
    }

    fn contains(&self, key: &[u8]) -> Result<bool> {
        Ok(self.db().get_pinned(key)?.is_some())
    }
}

impl Drop for Marks {
    fn drop(&mut self) {
        drop(self.db.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The sweep's rule for one chunk or root, given whether it is reached
/// and its candidate record.
struct Judge<'a> {
    pending_cf: &'a rocksdb::ColumnFamily,
    this: &'a Pending,
    free_before: &'a Freeable,
    dry_run: bool,
}

impl Judge<'_> {
    /// Drops a reached object's record; queues an unreachable one whose
    /// record allows it on `free`; records one found unreachable for the
    /// first time. True when it is left waiting.
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &self,
        reached: bool,
        record: Option<Pending>,
        pending_key: Vec<u8>,
        key: &[u8],
        len: u32,
        batch: &mut WriteBatch,
        free: &mut Vec<Candidate>,
    ) -> bool {
        match record {
            Some(_) if reached => {
                if !self.dry_run {
                    batch.delete_cf(self.pending_cf, &pending_key);
                }
                false
            }
            _ if reached => false,
            Some(r) if self.free_before.allows(&r) => {
                free.push(Candidate {
                    pending_key,
                    key: key.to_vec(),
                    record: r,
                });
                false
            }
            Some(_) => true,
            None => {
                if !self.dry_run {
                    let r = Pending { len, ..*self.this };
                    batch.put_cf(self.pending_cf, &pending_key, r.encode());
                }
                true
            }
        }
    }
}

/// What the sweep decided for one unreachable object that may be freed.
struct Candidate {
    pending_key: Vec<u8>,
    key: Vec<u8>,
    record: Pending,
}

impl RocksStore {
    /// Runs one garbage collection pass: everything the snapshots `roots`
    /// returns reach is kept, the rest becomes a candidate, and candidates
    /// unreachable since before `grace` are freed. `roots` is called once
    /// the pass has noted which writers are in progress (so that a writer
    /// that ends before it is read has its snapshot among them). Blocking;
    /// one pass at a time (another caller waits). A root whose manifest is
    /// stored but cannot be read in full stops the pass before it frees
    /// anything.
    pub fn collect_garbage(
        &self,
        roots: &mut dyn FnMut() -> Result<Vec<GcRoot>>,
        opts: &GcOptions,
    ) -> Result<GcReport> {
        let mut passes = self.gc.passes.lock().unwrap_or_else(|e| e.into_inner());
        if !opts.dry_run {
            self.check_writable()?;
        }
        let pass = self.gc.tick();
        let started_ms = now_ms();
        let grace_ms = i64::try_from(opts.grace.as_millis()).unwrap_or(i64::MAX);
        let free_before = Freeable {
            cutoff: started_ms.saturating_sub(grace_ms),
            held_since: self
                .gc
                .holds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .min()
                .copied(),
            boot: self.gc.boot,
            passes: passes.clone(),
        };
        let roots = roots()?;
        let mut report = GcReport::default();

        let started = Instant::now();
        let mut present: Vec<&GcRoot> = Vec::new();
        let mut live_roots = HashSet::new();
        for r in &roots {
            let key = tenant_key(&r.tenant, r.snapshot.as_bytes());
            if self
                .db()
                .get_pinned_cf(self.cf(CF_MANIFESTS), &key)?
                .is_some()
            {
                present.push(r);
            } else {
                report.roots_absent += 1;
            }
            live_roots.insert(key);
        }
        report.roots = present.len() as u64;
        let marks = Marks::open(self.path().with_extension("gc-marks"), opts.memory_bytes)?;
        for r in &present {
            self.mark(r, &marks, &mut report)?;
        }
        report.mark_time = started.elapsed();
        if !opts.dry_run {
            // Before the first record is written: lookups must read them.
            self.gc.pending_any.store(true, Ordering::Release);
        }

        let started = Instant::now();
        let this = Pending {
            since: started_ms,
            len: 0,
            boot: self.gc.boot,
            pass,
        };
        let mut waiting = self.sweep_chunks(&marks, &this, &free_before, opts, &mut report)?;
        drop(marks);
        waiting += self.sweep_roots(&live_roots, &this, &free_before, opts, &mut report)?;
        report.sweep_time = started.elapsed();
        if !opts.dry_run {
            self.gc.pending_any.store(waiting > 0, Ordering::Release);
            let stored = self.stats().map_or(0, |s| s.chunk_bytes);
            if opts.compact && report.freed > 0 && report.freed_bytes.saturating_mul(16) >= stored {
                self.compact_freed()?;
                report.compacted = true;
            }
            passes.insert(pass, self.gc.tick());
            while passes.len() > KEEP_PASSES {
                passes.pop_first();
            }
        }
        Ok(report)
    }

    /// Writes to `marks` what `root` reaches: its pages and the chunks of
    /// its files. A page marked already (by a snapshot walked before) is
    /// not read again: its subtree is marked, and snapshots of one dataset
    /// share most of their pages.
    fn mark(&self, root: &GcRoot, marks: &Marks, report: &mut GcReport) -> Result<()> {
        let context = |e: Error| {
            Error::Unavailable(format!(
                "garbage collection stopped: snapshot {} of tenant {} cannot be read ({e}); \
                 nothing was freed",
                root.snapshot, root.tenant
            ))
        };
        let tenant = root.tenant.as_str();
        let key = |id: &ChunkId| tenant_key(tenant, id.as_bytes());
        let mut batch = WriteBatch::default();
        let add = |batch: &mut WriteBatch, id: &ChunkId, report: &mut GcReport| -> Result<()> {
            batch.put(key(id), []);
            report.marked += 1;
            if batch.len() >= MARK_BATCH {
                marks.write(std::mem::take(batch))?;
            }
            Ok(())
        };
        let stored = decode_root(&self.get_manifest(tenant, &root.snapshot).map_err(context)?)
            .map_err(context)?;
        let root = match stored {
            Stored::V1(m) => {
                for e in &m.entries {
                    for c in &e.chunks {
                        add(&mut batch, &c.id, report)?;
                    }
                }
                return marks.write(batch);
            }
            Stored::V2(root) => root,
        };
        let top = root.height.saturating_sub(1);
        let mut stack: Vec<(ChunkId, u8)> =
            root.pages.iter().rev().map(|(id, _)| (*id, top)).collect();
        while let Some((id, level)) = stack.pop() {
            if marks.contains(&key(&id))? {
                continue;
            }
            let bytes = self.get_chunk(tenant, &id).map_err(context)?;
            report.pages_read += 1;
            match Page::decode(&id, level, &bytes).map_err(context)? {
                Page::Index(items) => {
                    let below = level.checked_sub(1).ok_or_else(|| {
                        context(Error::decode("manifest page", "an index page at level 0"))
                    })?;
                    stack.extend(items.iter().rev().map(|(c, _)| (*c, below)));
                }
                Page::Leaf(entries) => {
                    for e in &entries {
                        for c in &e.chunks {
                            add(&mut batch, &c.id, report)?;
                        }
                    }
                }
            }
            // Written once its children are on their way: a later walk that
            // finds it marked skips a subtree this walk completes.
            marks.write(std::mem::take(&mut batch))?;
            let mut one = WriteBatch::default();
            one.put(key(&id), []);
            marks.write(one)?;
            report.marked += 1;
        }
        marks.write(batch)
    }

    /// Sweeps the chunks against `marks`; returns how many are left
    /// waiting as candidates.
    fn sweep_chunks(
        &self,
        marks: &Marks,
        this: &Pending,
        free_before: &Freeable,
        opts: &GcOptions,
        report: &mut GcReport,
    ) -> Result<u64> {
        let pending_cf = self.cf(CF_GC_PENDING);
        let chunk_records = pending_key(PENDING_CHUNK, &[]);
        let mut pending = self
            .db()
            .iterator_cf(
                pending_cf,
                IteratorMode::From(&chunk_records, rocksdb::Direction::Forward),
            )
            .peekable();
        let mut marked = marks.db().iterator(IteratorMode::Start).peekable();
        let mut batch = WriteBatch::default();
        let mut free = Vec::new();
        let mut waiting = 0;
        for item in self
            .db()
            .iterator_cf(self.cf(CF_CHUNK_INDEX), IteratorMode::Start)
        {
            let (key, value) = item?;
            report.examined += 1;
            let len = value
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes);
            let pending_key = pending_key(PENDING_CHUNK, &key);
            // Candidates of chunks no longer stored are dropped on the way.
            let mut record = None;
            while let Some(Ok((pk, pv))) = pending.peek() {
                if !pk.starts_with(&chunk_records) || pk.as_ref() > pending_key.as_slice() {
                    break;
                }
                if pk.as_ref() == pending_key.as_slice() {
                    record = Pending::decode(pv);
                } else if !opts.dry_run {
                    batch.delete_cf(pending_cf, pk);
                }
                pending.next();
            }
            if let Some(Err(_)) = pending.peek() {
                if let Some(Err(e)) = pending.next() {
                    return Err(e.into());
                }
            }
            let mut live = false;
            while let Some(Ok((mk, _))) = marked.peek() {
                if mk.as_ref() > key.as_ref() {
                    break;
                }
                live |= mk.as_ref() == key.as_ref();
                marked.next();
            }
            if let Some(Err(_)) = marked.peek() {
                if let Some(Err(e)) = marked.next() {
                    return Err(e.into());
                }
            }
            let judge = Judge {
                pending_cf,
                this,
                free_before,
                dry_run: opts.dry_run,
            };
            if live {
                report.live += 1;
            }
            if judge.judge(live, record, pending_key, &key, len, &mut batch, &mut free) {
                waiting += 1;
                report.waiting += 1;
                report.waiting_bytes += u64::from(len);
            }
            if free.len() >= FREE_BATCH {
                self.free(&mut free, CF_CHUNK_INDEX, opts, report)?;
            }
            if batch.len() >= FREE_BATCH {
                self.write(std::mem::take(&mut batch), false)?;
            }
        }
        // Candidates past the last chunk: their chunks are gone.
        while let Some(Ok((pk, _))) = pending.next() {
            if !pk.starts_with(&chunk_records) {
                break;
            }
            if !opts.dry_run {
                batch.delete_cf(pending_cf, pk);
            }
        }
        self.free(&mut free, CF_CHUNK_INDEX, opts, report)?;
        if !batch.is_empty() {
            self.write(batch, false)?;
        }
        Ok(waiting)
    }

    /// Sweeps the snapshot roots: those not in `live` become candidates or
    /// are freed like chunks. Returns how many are left waiting.
    fn sweep_roots(
        &self,
        live: &HashSet<Vec<u8>>,
        this: &Pending,
        free_before: &Freeable,
        opts: &GcOptions,
        report: &mut GcReport,
    ) -> Result<u64> {
        let pending_cf = self.cf(CF_GC_PENDING);
        let mut batch = WriteBatch::default();
        let mut free = Vec::new();
        let mut waiting = 0;
        for item in self
            .db()
            .iterator_cf(self.cf(CF_MANIFESTS), IteratorMode::Start)
        {
            let (key, value) = item?;
            let pending_key = pending_key(PENDING_ROOT, &key);
            let record = self
                .db()
                .get_pinned_cf(pending_cf, &pending_key)?
                .and_then(|v| Pending::decode(&v));
            let judge = Judge {
                pending_cf,
                this,
                free_before,
                dry_run: opts.dry_run,
            };
            let reached = live.contains(key.as_ref());
            let len = value.len() as u32;
            if judge.judge(
                reached,
                record,
                pending_key,
                &key,
                len,
                &mut batch,
                &mut free,
            ) {
                waiting += 1;
            }
        }
        self.free(&mut free, CF_MANIFESTS, opts, report)?;
        if !batch.is_empty() {
            self.write(batch, false)?;
        }
        Ok(waiting)
    }

    /// Frees the candidates that are still candidates of the same pass,
    /// under the gate (a lookup that revived one in the meantime wins), and
    /// empties `free`.
    fn free(
        &self,
        free: &mut Vec<Candidate>,
        family: &'static str,
        opts: &GcOptions,
        report: &mut GcReport,
    ) -> Result<()> {
        if free.is_empty() {
            return Ok(());
        }
        let count = |c: &Candidate, report: &mut GcReport| {
            if family == CF_MANIFESTS {
                report.roots_freed += 1;
                return;
            }
            let len = u64::from(c.record.len);
            report.freed += 1;
            report.freed_bytes += len;
            let tenant = split_key(&c.key).map_or_else(String::new, |(t, _)| {
                String::from_utf8_lossy(t).into_owned()
            });
            let t = report.tenants.entry(tenant).or_default();
            t.0 += 1;
            t.1 += len;
        };
        if opts.dry_run {
            for c in free.drain(..) {
                count(&c, report);
            }
            return Ok(());
        }
        let pending_cf = self.cf(CF_GC_PENDING);
        let _gate = self.gc.gate.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<&[u8]> = free.iter().map(|c| c.pending_key.as_slice()).collect();
        let now = self.db().batched_multi_get_cf(pending_cf, &keys, false);
        let mut batch = WriteBatch::default();
        for (c, got) in free.iter().zip(now) {
            let still = got?.and_then(|v| Pending::decode(&v));
            if still != Some(c.record) {
                continue;
            }
            batch.delete_cf(pending_cf, &c.pending_key);
            batch.delete_cf(self.cf(family), &c.key);
            if family == CF_CHUNK_INDEX {
                batch.delete_cf(self.cf(CF_CHUNKS), &c.key);
                batch.delete_cf(pending_cf, cold_key(&c.key));
            }
            count(c, report);
        }
        self.write(batch, false)?;
        free.clear();
        Ok(())
    }

    /// Compacts the chunk families with blob garbage collection on for the
    /// duration: deleted chunks' index entries go, and the live blobs of
    /// blob files holding freed ones are rewritten, so the files go too.
    /// Off otherwise: with it on, ordinary compactions rewrite old blob
    /// files whether or not anything in them was freed.
    pub(crate) fn compact_freed(&self) -> Result<()> {
        let chunks = self.cf(CF_CHUNKS);
        self.db().set_options_cf(
            chunks,
            &[
                ("enable_blob_garbage_collection", "true"),
                ("blob_garbage_collection_age_cutoff", "1.0"),
            ],
        )?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db()
            .compact_range_cf_opt(chunks, None::<&[u8]>, None::<&[u8]>, &opts);
        self.db().compact_range_cf_opt(
            self.cf(CF_CHUNK_INDEX),
            None::<&[u8]>,
            None::<&[u8]>,
            &opts,
        );
        self.db()
            .set_options_cf(chunks, &[("enable_blob_garbage_collection", "false")])?;
        Ok(())
    }
}

/// What [`RocksStore::erase_tenant`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantErased {
    /// Chunks and manifest pages.
    pub chunks: u64,
    pub bytes: u64,
    /// Snapshot roots.
    pub snapshots: u64,
}

/// The key range of a tenant in the chunk, index and manifest families:
/// `[len][tenant]` followed by 32 bytes.
fn tenant_range(tenant: &str) -> (Vec<u8>, Vec<u8>) {
    let start = tenant_key(tenant, &[0; 32])[..1 + tenant.len()].to_vec();
    let mut end = start.clone();
    end.extend_from_slice(&[0xff; 33]);
    (start, end)
}

impl RocksStore {
    /// Removes every chunk, page, root and candidate record of `tenant`
    /// (range deletions, synced), then compacts so that the bytes leave
    /// the disk too. Blocking.
    pub fn erase_tenant(&self, tenant: &str) -> Result<TenantErased> {
        // Not while a pass sweeps: it could write candidate records of the
        // tenant's chunks after the range deletes.
        let _passes = self.gc.passes.lock().unwrap_or_else(|e| e.into_inner());
        self.check_writable()?;
        let (start, end) = tenant_range(tenant);
        let mut out = TenantErased::default();
        for item in self.db().iterator_cf(
            self.cf(CF_CHUNK_INDEX),
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&start) || k.len() != start.len() + 32 {
                break;
            }
            out.chunks += 1;
            out.bytes += v
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, |b| u64::from(u32::from_le_bytes(b)));
        }
        out.snapshots = self.count_prefix(CF_MANIFESTS, &start)?;
        let mut batch = WriteBatch::default();
        for family in [CF_CHUNKS, CF_CHUNK_INDEX, CF_MANIFESTS] {
            batch.delete_range_cf(self.cf(family), &start, &end);
        }
        for kind in [PENDING_CHUNK, PENDING_ROOT] {
            let k = |b: &[u8]| pending_key(kind, b);
            batch.delete_range_cf(self.cf(CF_GC_PENDING), k(&start), k(&end));
        }
        batch.delete_range_cf(self.cf(CF_GC_PENDING), cold_key(&start), cold_key(&end));
        self.write(batch, true)?;
        self.compact_freed()?;
        Ok(out)
    }

    /// Keys of `tenant` left in any family (0 once it is erased): a scan
    /// of its key range in the chunk, index, manifest and candidate
    /// families. Blocking.
    pub fn tenant_keys(&self, tenant: &str) -> Result<u64> {
        let (start, _) = tenant_range(tenant);
        let mut n = 0;
        for family in [CF_CHUNKS, CF_CHUNK_INDEX, CF_MANIFESTS] {
            n += self.count_prefix(family, &start)?;
        }
        n += self.count_prefix(CF_GC_PENDING, &cold_key(&start))?;
        for kind in [PENDING_CHUNK, PENDING_ROOT] {
            n += self.count_prefix(CF_GC_PENDING, &pending_key(kind, &start))?;
        }
        Ok(n)
    }

    fn count_prefix(&self, family: &'static str, prefix: &[u8]) -> Result<u64> {
        let mut n = 0;
        for item in self.db().iterator_cf(
            self.cf(family),
            IteratorMode::From(prefix, rocksdb::Direction::Forward),
        ) {
            let (k, _) = item?;
            // `[len][tenant]` then the id: another tenant whose name starts
            // with this one has another length byte.
            if !k.starts_with(prefix) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }
}

/// What a scrub read and what it found wrong.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScrubReport {
    /// Chunks and pages read and checked against their names.
    pub chunks: u64,
    pub bytes: u64,
    /// Snapshot roots read and checked.
    pub roots: u64,
    /// Chunks whose bytes do not match their name, or that the index
    /// lists but are not stored: (tenant, chunk, what was wrong).
    pub bad: Vec<(String, ChunkId, String)>,
    /// Roots that do not match their name: (tenant, snapshot).
    pub bad_roots: Vec<(String, SnapshotId)>,
    /// Chunks in the cold tier, not held here: checked when read back.
    pub cold: u64,
    pub seconds: f64,
}

/// How long a reader that has read `bytes` in `elapsed` waits to stay at
/// `rate` bytes per second (0: no limit).
fn pace_wait(bytes: u64, rate: u64, elapsed: Duration) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(bytes as f64 / rate as f64).saturating_sub(elapsed)
}

/// Bad chunks a scrub lists; more are counted in the metrics only.
const SCRUB_LIST: usize = 10_000;

impl RocksStore {
    /// Reads every chunk, page and snapshot root in the store and checks
    /// each against its BLAKE3 name, at most `bytes_per_second` (0: no
    /// limit) so that it does not starve puts and reads. Finds; does not
    /// repair (the node fetches good copies from replicas). Blocking.
    pub fn scrub(&self, bytes_per_second: u64) -> Result<ScrubReport> {
        let started = Instant::now();
        let mut report = ScrubReport::default();
        let pace = |report: &ScrubReport| {
            let wait = pace_wait(report.bytes, bytes_per_second, started.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        };
        for item in self
            .db()
            .iterator_cf(self.cf(CF_CHUNK_INDEX), IteratorMode::Start)
        {
            let (key, _) = item?;
            let Some((tenant, id)) = split_key(&key) else {
                continue;
            };
            let tenant = String::from_utf8_lossy(tenant).into_owned();
            let id = ChunkId(id);
            report.chunks += 1;
            // The stored bytes against their name: no key needed, so an
            // encrypted tenant's chunks are checked on every node.
            // An evicted chunk is checked where it is, in its pack, when
            // read (and was, by every node, before it was evicted): a scrub
            // reads only what this node holds.
            let got = match self.load_local(&tenant, &id) {
                Ok(Some(v)) => verified(&id, v),
                Ok(None) if self.cold_record(&tenant, &id)?.is_some() => {
                    report.cold += 1;
                    continue;
                }
                Ok(None) => Err(Error::MissingChunk(id)),
                Err(e) => Err(e),
            };
            match got {
                Ok(data) => report.bytes += data.len() as u64,
                // Freed by garbage collection since the index was read.
                Err(Error::MissingChunk(_))
                    if self
                        .db()
                        .get_pinned_cf(self.cf(CF_CHUNK_INDEX), &key)?
                        .is_none() => {}
                Err(e @ (Error::CorruptChunk { .. } | Error::MissingChunk(_))) => {
                    if report.bad.len() < SCRUB_LIST {
                        report.bad.push((tenant, id, e.to_string()));
                    }
                }
                Err(e) => return Err(e),
            }
            pace(&report);
        }
        for item in self
            .db()
            .iterator_cf(self.cf(CF_MANIFESTS), IteratorMode::Start)
        {
            let (key, value) = item?;
            let Some((tenant, id)) = split_key(&key) else {
                continue;
            };
            report.roots += 1;
            report.bytes += value.len() as u64;
            if !ChunkId(id).verify(&value) {
                report
                    .bad_roots
                    .push((String::from_utf8_lossy(tenant).into_owned(), SnapshotId(id)));
            }
            pace(&report);
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::chunker::ChunkParams;
    use crate::ingest::{ingest_stream, SnapshotBuilder};
    use crate::rocks::RocksOptions;
    use crate::store::{load_manifest, read_chunks};

    fn open(dir: &Path) -> Arc<RocksStore> {
        Arc::new(RocksStore::open(dir, &RocksOptions::default()).unwrap())
    }

    /// Bytes that do not repeat (a xorshift stream from `seed`).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Stores a snapshot of `files` (path, bytes) and its root.
    fn put(store: &Arc<RocksStore>, files: &[(&str, &[u8])]) -> SnapshotId {
        let dyn_store: Arc<dyn ChunkStore> = store.clone();
        let mut b = SnapshotBuilder::new(dyn_store, "t", "d", ChunkParams::default()).unwrap();
        for (path, data) in files {
            let got = ingest_stream(
                store.as_ref(),
                "t",
                ChunkParams::default(),
                *data,
                Path::new(path),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap();
            b.add_file(path, 0o644, 0, got).unwrap();
        }
        let built = b.finish(0).unwrap();
        store
            .store_manifest_durable("t", &built.id, &built.root)
            .unwrap();
        built.id
    }

    fn roots(ids: &[SnapshotId]) -> Vec<GcRoot> {
        ids.iter()
            .map(|id| GcRoot {
                tenant: "t".into(),
                snapshot: *id,
            })
            .collect()
    }

    /// Every file of the snapshot, read and checked.
    fn read_all(store: &RocksStore, id: &SnapshotId) -> crate::Result<Vec<(String, Vec<u8>)>> {
        let m = load_manifest(store, "t", id)?;
        m.entries
            .iter()
            .map(|e| Ok((e.path.clone(), read_chunks(store, "t", &e.chunks)?)))
            .collect()
    }

    /// The roots a pass reads: always these.
    fn given(roots: Vec<GcRoot>) -> impl FnMut() -> crate::Result<Vec<GcRoot>> {
        move || Ok(roots.clone())
    }

    fn no_grace() -> GcOptions {
        GcOptions {
            grace: Duration::ZERO,
            ..Default::default()
        }
    }

    #[test]
    fn a_deleted_snapshot_is_freed_after_a_second_pass_and_its_space_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (f1, f2, f3) = (noise(1, 3 << 20), noise(2, 3 << 20), noise(3, 3 << 20));
        let a = put(&store, &[("f1", &f1), ("f2", &f2)]);
        let b = put(&store, &[("f2", &f2), ("f3", &f3)]);
        let r = store
            .collect_garbage(&mut given(roots(&[a, b])), &no_grace())
            .unwrap();
        assert_eq!((r.roots, r.freed, r.waiting), (2, 0, 0), "{r:?}");
        let before = store.stats().unwrap().chunk_bytes;

        // Snapshot a is deleted: its own chunks and pages become candidates.
        let first = store
            .collect_garbage(&mut given(roots(&[b])), &no_grace())
            .unwrap();
        assert_eq!(first.freed, 0, "nothing is freed on the first pass");
        assert!(first.waiting_bytes >= 3 << 20, "{first:?}");
        // A dry run says what the next pass frees, and changes nothing.
        let dry = GcOptions {
            dry_run: true,
            ..no_grace()
        };
        let would = store
            .collect_garbage(&mut given(roots(&[b])), &dry)
            .unwrap();
        assert_eq!(would.freed, first.waiting, "{would:?}");
        assert!(read_all(&store, &a).is_ok(), "a dry run freed something");

        let second = store
            .collect_garbage(&mut given(roots(&[b])), &no_grace())
            .unwrap();
        assert_eq!(second.freed, first.waiting, "{second:?}");
        assert_eq!(second.roots_freed, 1);
        assert_eq!(second.tenants["t"].1, second.freed_bytes);
        assert!(second.compacted);
        // b reads back whole; a is gone, f1's chunks with it.
        let got = read_all(&store, &b).unwrap();
        assert_eq!(got, [("f2".to_string(), f2), ("f3".to_string(), f3)]);
        assert!(matches!(
            store.get_manifest("t", &a),
            Err(Error::NotFound { .. })
        ));
        let after = store.stats().unwrap().chunk_bytes;
        assert!(
            after + (5 << 19) <= before,
            "{before} bytes of chunks before, {after} after freeing {}",
            second.freed_bytes
        );
        // Nothing left to do.
        let third = store
            .collect_garbage(&mut given(roots(&[b])), &no_grace())
            .unwrap();
        assert_eq!((third.freed, third.waiting), (0, 0), "{third:?}");
    }

    #[test]
    fn a_candidate_found_again_by_a_lookup_is_not_freed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let f = noise(4, 1 << 20);
        let a = put(&store, &[("f", &f)]);
        store
            .collect_garbage(&mut given(Vec::new()), &no_grace())
            .unwrap();
        // A put's dedup check finds the candidate's chunk...
        let m = load_manifest(store.as_ref(), "t", &a).unwrap();
        let chunk = m.entries[0].chunks[0].id;
        assert!(store.has_chunk("t", &chunk).unwrap());
        // ...so the next pass does not free it (it starts over as a
        // candidate), but frees the rest.
        let r = store
            .collect_garbage(&mut given(Vec::new()), &no_grace())
            .unwrap();
        assert!(r.freed > 0);
        assert!(store.get_chunk("t", &chunk).is_ok());
        store
            .collect_garbage(&mut given(Vec::new()), &no_grace())
            .unwrap();
        assert!(!store.has_chunk("t", &chunk).unwrap(), "freed a pass later");
    }

    /// The interleaving a grace period alone does not cover: a writer finds
    /// a candidate's chunks, a pass runs before its snapshot is committed
    /// and finds them unreachable again, and a later pass would free them.
    /// The writer's hold keeps them; without it they are freed (the same
    /// steps on a second store), so the hold is what keeps them.
    #[test]
    fn a_writer_holding_collection_off_keeps_what_it_found_until_it_commits() {
        for held in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            let shared = noise(5, 2 << 20);
            put(&store, &[("shared", &shared)]);
            // Deleted: its chunks are candidates.
            store
                .collect_garbage(&mut given(Vec::new()), &no_grace())
                .unwrap();
            let hold = held.then(|| store.hold());
            // The writer dedups against them (revived)...
            let parts: Vec<(ChunkId, &[u8])> =
                crate::chunker::chunk_slice(&shared, ChunkParams::default())
                    .map(|c| (ChunkId::of(c), c))
                    .collect();
            let new = store.put_chunks("t", &parts).unwrap();
            assert!(new.iter().all(|n| !n), "all found");
            // ...two passes run before it commits...
            store
                .collect_garbage(&mut given(Vec::new()), &no_grace())
                .unwrap();
            store
                .collect_garbage(&mut given(Vec::new()), &no_grace())
                .unwrap();
            let kept = parts.iter().all(|(id, _)| store.get_chunk("t", id).is_ok());
            assert_eq!(kept, held, "held: {held}");
            drop(hold);
        }
    }

    /// Puts that dedup against deleted snapshots race passes with no grace
    /// period; every committed snapshot reads back whole. Seeded: the seed
    /// is printed, `BITCLONE_GC_SEED` replays it.
    #[test]
    fn puts_racing_collection_keep_every_byte() {
        let seed: u64 = std::env::var("BITCLONE_GC_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| crate::rocks::now_ms() as u64);
        println!("seed {seed} (BITCLONE_GC_SEED={seed} replays it)");
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // Files the puts share, first stored by a snapshot deleted at once.
        let shared: Vec<Vec<u8>> = (0..4).map(|i| noise(seed ^ (100 + i), 1 << 20)).collect();
        let files: Vec<(&str, &[u8])> = shared.iter().map(|f| ("s", f.as_slice())).collect();
        put(&store, &files[..1]);
        let committed: Arc<Mutex<Vec<SnapshotId>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let collector = {
            let (store, committed, done) = (store.clone(), committed.clone(), done.clone());
            std::thread::spawn(move || {
                let mut passes = 0;
                while !done.load(Ordering::Acquire) && passes < 500 {
                    // Read once the pass noted the writers in progress.
                    let mut live = || Ok(roots(&committed.lock().unwrap()));
                    store.collect_garbage(&mut live, &no_grace()).unwrap();
                    passes += 1;
                }
                passes
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = seed | 1;
        for i in 0..40u64 {
            if Instant::now() > deadline {
                break;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let hold = store.hold();
            let own = noise(seed ^ i, 64 << 10);
            let pick = &shared[(x % 4) as usize];
            let id = put(&store, &[("own", &own), ("shared", pick)]);
            committed.lock().unwrap().push(id);
            drop(hold);
            // Some puts are deleted again at once.
            if x % 3 == 0 {
                committed.lock().unwrap().retain(|c| *c != id);
            }
        }
        done.store(true, Ordering::Release);
        let passes = collector.join().unwrap();
        assert!(passes > 0);
        let live = committed.lock().unwrap().clone();
        for _ in 0..2 {
            store
                .collect_garbage(&mut given(roots(&live)), &no_grace())
                .unwrap();
        }
        for id in &live {
            read_all(&store, id).unwrap_or_else(|e| panic!("seed {seed}: snapshot {id}: {e}"));
        }
    }

    #[test]
    fn a_candidate_page_is_not_settled_so_that_a_sender_descends_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let f = noise(12, 1 << 20);
        let a = put(&store, &[("f", &f)]);
        let Stored::V2(root) = crate::store::read_root(store.as_ref(), "t", &a).unwrap() else {
            panic!("v2 expected")
        };
        let page = root.pages[0].0;
        assert!(store.has_settled_chunk("t", &page).unwrap());
        // Deleted: the page and its chunks are candidates; the page may
        // have lost children, so it does not count as here...
        store
            .collect_garbage(&mut given(Vec::new()), &no_grace())
            .unwrap();
        assert!(!store.has_settled_chunk("t", &page).unwrap());
        // ...but the lookup took it off the list: whoever asked descends
        // below it (and takes its children off the list) now.
        assert!(store.has_settled_chunk("t", &page).unwrap());
    }

    #[test]
    fn erasing_a_tenant_leaves_no_key_of_it_and_every_key_of_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let f = noise(9, 2 << 20);
        let a = put(&store, &[("f", &f)]);
        // The same bytes in tenant "t1" (a name that starts like "t").
        let parts: Vec<(ChunkId, &[u8])> = crate::chunker::chunk_slice(&f, ChunkParams::default())
            .map(|c| (ChunkId::of(c), c))
            .collect();
        store.put_chunks("t1", &parts).unwrap();
        store
            .collect_garbage(&mut given(Vec::new()), &no_grace())
            .unwrap();
        assert!(store.tenant_keys("t").unwrap() > 0);
        let erased = store.erase_tenant("t").unwrap();
        assert_eq!(erased.snapshots, 1);
        assert!(erased.bytes >= 2 << 20, "{erased:?}");
        assert_eq!(store.tenant_keys("t").unwrap(), 0);
        assert!(store.get_manifest("t", &a).is_err());
        // The other tenant's chunks and their candidate records are left.
        let left = store.tenant_keys("t1").unwrap();
        assert_eq!(left, 3 * parts.len() as u64, "chunk, index entry, record");
        assert!(parts
            .iter()
            .all(|(id, _)| store.get_chunk("t1", id).is_ok()));
    }

    #[test]
    fn a_scrub_finds_a_flipped_byte_and_a_missing_chunk_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let f = noise(11, 2 << 20);
        let a = put(&store, &[("f", &f)]);
        let clean = store.scrub(0).unwrap();
        assert!(
            clean.bad.is_empty() && clean.bad_roots.is_empty(),
            "{clean:?}"
        );
        assert_eq!(clean.roots, 1);
        assert!(clean.bytes >= 2 << 20);
        // One chunk's bytes replaced by others, one chunk's bytes dropped
        // (its index entry stays).
        let m = load_manifest(store.as_ref(), "t", &a).unwrap();
        let (x, y) = (m.entries[0].chunks[0].id, m.entries[0].chunks[1].id);
        let key = |id: &ChunkId| tenant_key("t", id.as_bytes());
        store
            .db()
            .put_cf(store.cf(CF_CHUNKS), key(&x), b"flipped!")
            .unwrap();
        store.db().delete_cf(store.cf(CF_CHUNKS), key(&y)).unwrap();
        let r = store.scrub(0).unwrap();
        let bad: Vec<ChunkId> = r.bad.iter().map(|(_, id, _)| *id).collect();
        assert_eq!(bad.len(), 2, "{r:?}");
        assert!(bad.contains(&x) && bad.contains(&y));
    }

    #[test]
    fn a_paced_reader_waits_for_what_it_read_ahead_of_its_rate() {
        let s = Duration::from_secs;
        assert_eq!(pace_wait(10 << 20, 0, s(0)), Duration::ZERO, "no limit");
        assert_eq!(pace_wait(4 << 20, 1 << 20, s(1)), s(3));
        assert_eq!(pace_wait(1 << 20, 1 << 20, s(2)), Duration::ZERO, "behind");
    }
}
