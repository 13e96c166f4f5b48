//! Online garbage collection of the chunk store: frees chunks, manifest
//! pages and roots that no snapshot reaches, while puts, reads and repairs
//! go on.
//!
//! A pass marks what the given snapshots reach in a Bloom filter of a
//! fixed size (more chunks than it holds at ~1% false positives split the
//! store into partitions by chunk id, one mark and sweep each), then walks
//! the chunk index in key order. What is unreachable is not freed at once:
//! it becomes a *candidate* (`gc_pending`, with the time it was first found
//! unreachable) and is freed by a later pass that finds it still
//! unreachable once the grace period has passed. A lookup that finds a
//! candidate (the dedup check of a put, a replica asked what it lacks, a
//! write of the same chunk) takes it off the list, under the gate the sweep
//! frees under, so a chunk something relies on is freed only after a later
//! pass, at least a grace period on, finds it unreachable again. A writer
//! that takes longer than that (a put, a repair) holds collection off
//! ([`RocksStore::hold`]): while it runs, no candidate found by a pass that
//! was still running when it began is freed, so nothing it found or wrote
//! is freed before its snapshot is committed (and then reached). False
//! positives only keep garbage for another pass (each pass hashes with
//! another seed).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rocksdb::{IteratorMode, WriteBatch};

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::manifest::{decode_root, Page, Stored};
use crate::rocks::{
    tenant_key, RocksStore, CF_CHUNKS, CF_CHUNK_INDEX, CF_GC_PENDING, CF_MANIFESTS, PENDING_CHUNK,
    PENDING_ROOT,
};
use crate::store::ChunkStore;

/// How a pass runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// How long something stays unreachable before it is freed.
    pub grace: Duration,
    /// Memory for the mark (the filter and the set of pages already
    /// walked); more chunks than fit split the pass into partitions.
    pub memory_bytes: usize,
    /// Count what would be freed, change nothing.
    pub dry_run: bool,
    /// After freeing, compact the chunk families with blob garbage
    /// collection on, so that the space comes back on disk.
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
    /// Manifest pages read (over all partitions).
    pub pages_read: u64,
    /// Partitions (a mark and a sweep each).
    pub partitions: u32,
    /// Bytes of one partition's filter.
    pub filter_bytes: u64,
    /// Chunks (and pages) examined.
    pub examined: u64,
    /// Of those, reachable (or a filter's false positive).
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

/// Bits per chunk the filter aims at (~1% false positives with 7 hashes).
const BITS_PER_KEY: u64 = 10;
const HASHES: usize = 7;
/// Partitions are by the last byte of a chunk id.
const MAX_PARTITIONS: u64 = 256;
/// Candidates freed under the gate at a time.
const FREE_BATCH: usize = 256;
/// Bytes a page id costs in the set of pages already walked.
const VISITED_ENTRY_BYTES: usize = 64;

/// A Bloom filter over (tenant, chunk id). Chunk ids are BLAKE3 hashes,
/// already uniform: the filter's hashes are mixed from their bytes and a
/// seed, so each pass's false positives are other chunks.
struct Filter {
    bits: Vec<u64>,
    len: u64,
    seed: u64,
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finalizer.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a tenant's name, mixed into its chunks' hashes so that one id
/// in two tenants is two keys.
fn tenant_hash(tenant: &[u8]) -> u64 {
    tenant.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Filter {
    fn new(bits: u64, seed: u64) -> Filter {
        let words = bits.div_ceil(64).max(1);
        Filter {
            bits: vec![0; words as usize],
            len: words * 64,
            seed,
        }
    }

    fn positions(&self, tenant: u64, id: &[u8; 32]) -> [u64; HASHES] {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&id[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let h1 = mix(word(0) ^ tenant ^ self.seed);
        let h2 = mix(word(8) ^ tenant.rotate_left(17) ^ self.seed.rotate_left(32)) | 1;
        std::array::from_fn(|i| h1.wrapping_add((i as u64).wrapping_mul(h2)) % self.len)
    }

    fn insert(&mut self, tenant: u64, id: &[u8; 32]) {
        for p in self.positions(tenant, id) {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    fn contains(&self, tenant: u64, id: &[u8; 32]) -> bool {
        self.positions(tenant, id)
            .iter()
            .all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

fn partition(id: &[u8; 32], partitions: u64) -> u64 {
    u64::from(id[31]) * partitions / MAX_PARTITIONS
}

/// Splits a chunk or root key (`[len][tenant][32-byte id]`).
fn split_key(key: &[u8]) -> Option<(&[u8], [u8; 32])> {
    let n = usize::from(*key.first()?);
    if key.len() != 1 + n + 32 {
        return None;
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&key[1 + n..]);
    Some((&key[1..1 + n], id))
}

/// A candidate's record: first found unreachable at (ms), and its length.
fn pending_value(since_ms: i64, len: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&since_ms.to_be_bytes());
    v[8..].copy_from_slice(&len.to_le_bytes());
    v
}

fn read_pending(v: &[u8]) -> Option<(i64, u32)> {
    let since = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(v.get(8..12)?.try_into().ok()?);
    Some((since, len))
}

/// Passes remembered (start → end) to tell which candidates a writer in
/// progress may have missed; a candidate of a pass forgotten since is kept
/// while any writer holds collection off.
const KEEP_PASSES: usize = 1024;

/// Which candidates a pass may free.
struct Freeable {
    /// Found unreachable at or before this time (ms): the grace period.
    cutoff: i64,
    /// The start of the oldest writer in progress at the pass's start.
    held_since: Option<i64>,
    /// When the store opened.
    opened: i64,
    /// Passes since it opened: start → end.
    passes: BTreeMap<i64, i64>,
}

impl Freeable {
    /// Whether a candidate found by the pass that started at `since` may
    /// be freed: it is past the grace period, and no writer in progress
    /// began while that pass was running (a lookup of it then could have
    /// come just before the candidate was written, and not taken it off).
    fn allows(&self, since: i64) -> bool {
        if since > self.cutoff {
            return false;
        }
        let Some(held) = self.held_since else {
            return true;
        };
        let ended = if since < self.opened {
            // Before this process: every writer in progress began later.
            i64::MIN
        } else {
            self.passes.get(&since).copied().unwrap_or(i64::MAX)
        };
        ended < held
    }
}

/// Which partition a mark is for.
struct Mark {
    partition: u64,
    partitions: u64,
    visited_cap: usize,
}

/// What the sweep decided for one unreachable object that may be freed.
struct Candidate {
    pending_key: Vec<u8>,
    key: Vec<u8>,
    since: i64,
    len: u32,
}

impl RocksStore {
    /// Runs one garbage collection pass: everything `roots` reach is kept,
    /// the rest becomes a candidate, and candidates unreachable since
    /// before `now_ms - grace` are freed. Blocking; one pass at a time
    /// (another caller waits). A root whose manifest is stored but cannot
    /// be read in full stops the pass before it frees anything it could
    /// have reached.
    pub fn collect_garbage(&self, roots: &[GcRoot], opts: &GcOptions) -> Result<GcReport> {
        let mut passes = self.gc.passes.lock().unwrap_or_else(|e| e.into_inner());
        if !opts.dry_run {
            self.check_writable()?;
        }
        // The pass's id: its start, later than every earlier pass's.
        let now_ms = crate::rocks::now_ms().max(passes.last_key_value().map_or(0, |(s, _)| s + 1));
        let grace_ms = i64::try_from(opts.grace.as_millis()).unwrap_or(i64::MAX);
        let free_before = Freeable {
            cutoff: now_ms.saturating_sub(grace_ms),
            held_since: self
                .gc
                .holds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .min()
                .copied(),
            opened: self.gc.opened_ms.load(Ordering::Acquire),
            passes: passes.clone(),
        };
        let mut report = GcReport::default();

        let mut present: Vec<&GcRoot> = Vec::new();
        let mut live_roots = HashSet::new();
        for r in roots {
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
        // A tenant's snapshots one after another: pages walked are skipped
        // within a tenant.
        present.sort_by(|a, b| a.tenant.cmp(&b.tenant));

        let keys = self
            .db()
            .property_int_value_cf(self.cf(CF_CHUNK_INDEX), "rocksdb.estimate-num-keys")?
            .unwrap_or(0)
            .max(1);
        let filter_budget = (opts.memory_bytes as u64 * 8 * 3 / 4).max(64 * 1024);
        let partitions = (keys * BITS_PER_KEY)
            .div_ceil(filter_budget)
            .clamp(1, MAX_PARTITIONS);
        let filter_bits = ((keys * BITS_PER_KEY).div_ceil(partitions)).min(filter_budget);
        let visited_cap = opts.memory_bytes / 4 / VISITED_ENTRY_BYTES;
        report.partitions = partitions as u32;
        report.filter_bytes = filter_bits.div_ceil(64) * 8;
        if !opts.dry_run {
            // Before the first candidate is written: lookups must check.
            self.gc.pending_any.store(true, Ordering::Release);
        }
        let seed = mix(now_ms as u64);
        let mut waiting_total = 0u64;
        for p in 0..partitions {
            let started = Instant::now();
            let mut filter = Filter::new(filter_bits, mix(seed ^ p));
            let mut visited = HashSet::new();
            for (i, r) in present.iter().enumerate() {
                if i > 0 && present[i - 1].tenant != r.tenant {
                    visited.clear();
                }
                let mark = Mark {
                    partition: p,
                    partitions,
                    visited_cap,
                };
                self.mark(r, &mut filter, &mark, &mut visited, &mut report)?;
            }
            report.mark_time += started.elapsed();
            let started = Instant::now();
            waiting_total += self.sweep_chunks(
                &filter,
                p,
                partitions,
                now_ms,
                &free_before,
                opts,
                &mut report,
            )?;
            report.sweep_time += started.elapsed();
        }
        let started = Instant::now();
        waiting_total += self.sweep_roots(&live_roots, now_ms, &free_before, opts, &mut report)?;
        report.sweep_time += started.elapsed();
        if !opts.dry_run {
            self.gc
                .pending_any
                .store(waiting_total > 0, Ordering::Release);
            if opts.compact && report.freed > 0 {
                self.compact_freed()?;
                report.compacted = true;
            }
            passes.insert(now_ms, crate::rocks::now_ms());
            while passes.len() > KEEP_PASSES {
                passes.pop_first();
            }
        }
        Ok(report)
    }

    /// Marks in `filter` what `root` reaches in the partition: its pages
    /// and the chunks of its files. Pages in `visited` (walked already in
    /// this partition, up to `visited_cap` of them, of the same tenant) are
    /// not read again: snapshots of one dataset share most of their pages.
    fn mark(
        &self,
        root: &GcRoot,
        filter: &mut Filter,
        how: &Mark,
        visited: &mut HashSet<ChunkId>,
        report: &mut GcReport,
    ) -> Result<()> {
        let (p, partitions, visited_cap) = (how.partition, how.partitions, how.visited_cap);
        let context = |e: Error| {
            Error::Unavailable(format!(
                "garbage collection stopped: snapshot {} of tenant {} cannot be read ({e}); \
                 nothing it may reach was freed",
                root.snapshot, root.tenant
            ))
        };
        let tenant = root.tenant.as_str();
        let th = tenant_hash(tenant.as_bytes());
        let add = |filter: &mut Filter, id: &ChunkId| {
            if partition(id.as_bytes(), partitions) == p {
                filter.insert(th, id.as_bytes());
            }
        };
        let stored = decode_root(&self.get_manifest(tenant, &root.snapshot).map_err(context)?)
            .map_err(context)?;
        let root = match stored {
            Stored::V1(m) => {
                for e in &m.entries {
                    for c in &e.chunks {
                        add(filter, &c.id);
                    }
                }
                return Ok(());
            }
            Stored::V2(root) => root,
        };
        let top = root.height.saturating_sub(1);
        let mut stack: Vec<(ChunkId, u8)> =
            root.pages.iter().rev().map(|(id, _)| (*id, top)).collect();
        while let Some((id, level)) = stack.pop() {
            add(filter, &id);
            if visited.contains(&id) {
                continue;
            }
            if visited.len() < visited_cap {
                visited.insert(id);
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
                            add(filter, &c.id);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Sweeps the chunks of partition `p` against `filter`; returns how
    /// many are left waiting as candidates.
    #[allow(clippy::too_many_arguments)]
    fn sweep_chunks(
        &self,
        filter: &Filter,
        p: u64,
        partitions: u64,
        now_ms: i64,
        free_before: &Freeable,
        opts: &GcOptions,
        report: &mut GcReport,
    ) -> Result<u64> {
        let pending_cf = self.cf(CF_GC_PENDING);
        let mut pending = self
            .db()
            .iterator_cf(
                pending_cf,
                IteratorMode::From(&[PENDING_CHUNK], rocksdb::Direction::Forward),
            )
            .peekable();
        let mut batch = WriteBatch::default();
        let mut free = Vec::new();
        let mut waiting = 0;
        let mut last_tenant: (Vec<u8>, u64) = (Vec::new(), tenant_hash(b""));
        for item in self
            .db()
            .iterator_cf(self.cf(CF_CHUNK_INDEX), IteratorMode::Start)
        {
            let (key, value) = item?;
            let Some((tenant, id)) = split_key(&key) else {
                continue;
            };
            if partition(&id, partitions) != p {
                continue;
            }
            report.examined += 1;
            let len = value
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes);
            let pending_key = [&[PENDING_CHUNK][..], &key].concat();
            // Candidates of chunks no longer stored are dropped on the way.
            let mut since = None;
            while let Some(Ok((pk, pv))) = pending.peek() {
                if pk.first() != Some(&PENDING_CHUNK) || pk.as_ref() > pending_key.as_slice() {
                    break;
                }
                if pk.as_ref() == pending_key.as_slice() {
                    since = read_pending(pv).map(|(s, _)| s);
                } else if !opts.dry_run
                    && split_key(&pk[1..]).is_some_and(|(_, i)| partition(&i, partitions) == p)
                {
                    batch.delete_cf(pending_cf, pk);
                }
                pending.next();
            }
            if let Some(Err(_)) = pending.peek() {
                if let Some(Err(e)) = pending.next() {
                    return Err(e.into());
                }
            }
            if last_tenant.0 != tenant {
                last_tenant = (tenant.to_vec(), tenant_hash(tenant));
            }
            if filter.contains(last_tenant.1, &id) {
                report.live += 1;
                if since.is_some() && !opts.dry_run {
                    batch.delete_cf(pending_cf, &pending_key);
                }
            } else {
                match since {
                    Some(s) if free_before.allows(s) => free.push(Candidate {
                        pending_key,
                        key: key.to_vec(),
                        since: s,
                        len,
                    }),
                    Some(_) => {
                        waiting += 1;
                        report.waiting += 1;
                        report.waiting_bytes += u64::from(len);
                    }
                    None => {
                        waiting += 1;
                        report.waiting += 1;
                        report.waiting_bytes += u64::from(len);
                        if !opts.dry_run {
                            batch.put_cf(pending_cf, &pending_key, pending_value(now_ms, len));
                        }
                    }
                }
            }
            if free.len() >= FREE_BATCH {
                self.free(&mut free, CF_CHUNK_INDEX, opts, report)?;
            }
            if batch.len() >= FREE_BATCH {
                self.write(std::mem::take(&mut batch), false)?;
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
        now_ms: i64,
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
            let pending_key = [&[PENDING_ROOT][..], &key].concat();
            let since = self
                .db()
                .get_pinned_cf(pending_cf, &pending_key)?
                .and_then(|v| read_pending(&v).map(|(s, _)| s));
            if live.contains(key.as_ref()) {
                if since.is_some() && !opts.dry_run {
                    batch.delete_cf(pending_cf, &pending_key);
                }
                continue;
            }
            let len = value.len() as u32;
            match since {
                Some(s) if free_before.allows(s) => free.push(Candidate {
                    pending_key,
                    key: key.to_vec(),
                    since: s,
                    len,
                }),
                Some(_) => waiting += 1,
                None => {
                    waiting += 1;
                    if !opts.dry_run {
                        batch.put_cf(pending_cf, &pending_key, pending_value(now_ms, len));
                    }
                }
            }
        }
        self.free(&mut free, CF_MANIFESTS, opts, report)?;
        if !batch.is_empty() {
            self.write(batch, false)?;
        }
        Ok(waiting)
    }

    /// Frees the candidates that are still candidates, since the same
    /// time, under the gate (a lookup that revived one in the meantime
    /// wins), and empties `free`.
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
            report.freed += 1;
            report.freed_bytes += u64::from(c.len);
            let tenant = split_key(&c.key).map_or_else(String::new, |(t, _)| {
                String::from_utf8_lossy(t).into_owned()
            });
            let t = report.tenants.entry(tenant).or_default();
            t.0 += 1;
            t.1 += u64::from(c.len);
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
            let still = got?.and_then(|v| read_pending(&v)).map(|(s, _)| s);
            if still != Some(c.since) {
                continue;
            }
            batch.delete_cf(pending_cf, &c.pending_key);
            batch.delete_cf(self.cf(family), &c.key);
            if family == CF_CHUNK_INDEX {
                batch.delete_cf(self.cf(CF_CHUNKS), &c.key);
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
    fn compact_freed(&self) -> Result<()> {
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
            let k = |b: &[u8]| [&[kind][..], b].concat();
            batch.delete_range_cf(self.cf(CF_GC_PENDING), k(&start), k(&end));
        }
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
        for kind in [PENDING_CHUNK, PENDING_ROOT] {
            n += self.count_prefix(CF_GC_PENDING, &[&[kind][..], &start].concat())?;
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
            match self.get_chunk(&tenant, &id) {
                Ok(data) => report.bytes += data.len() as u64,
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
        let r = store.collect_garbage(&roots(&[a, b]), &no_grace()).unwrap();
        assert_eq!((r.roots, r.freed, r.waiting), (2, 0, 0), "{r:?}");
        let before = store.stats().unwrap().chunk_bytes;

        // Snapshot a is deleted: its own chunks and pages become candidates.
        let first = store.collect_garbage(&roots(&[b]), &no_grace()).unwrap();
        assert_eq!(first.freed, 0, "nothing is freed on the first pass");
        assert!(first.waiting_bytes >= 3 << 20, "{first:?}");
        // A dry run says what the next pass frees, and changes nothing.
        let dry = GcOptions {
            dry_run: true,
            ..no_grace()
        };
        let would = store.collect_garbage(&roots(&[b]), &dry).unwrap();
        assert_eq!(would.freed, first.waiting, "{would:?}");
        assert!(read_all(&store, &a).is_ok(), "a dry run freed something");

        let second = store.collect_garbage(&roots(&[b]), &no_grace()).unwrap();
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
        let third = store.collect_garbage(&roots(&[b]), &no_grace()).unwrap();
        assert_eq!((third.freed, third.waiting), (0, 0), "{third:?}");
    }

    #[test]
    fn a_candidate_found_again_by_a_lookup_is_not_freed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let f = noise(4, 1 << 20);
        let a = put(&store, &[("f", &f)]);
        store.collect_garbage(&[], &no_grace()).unwrap();
        // A put's dedup check finds the candidate's chunk...
        let m = load_manifest(store.as_ref(), "t", &a).unwrap();
        let chunk = m.entries[0].chunks[0].id;
        assert!(store.has_chunk("t", &chunk).unwrap());
        // ...so the next pass does not free it (it starts over as a
        // candidate), but frees the rest.
        let r = store.collect_garbage(&[], &no_grace()).unwrap();
        assert!(r.freed > 0);
        assert!(store.get_chunk("t", &chunk).is_ok());
        store.collect_garbage(&[], &no_grace()).unwrap();
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
            store.collect_garbage(&[], &no_grace()).unwrap();
            let hold = held.then(|| store.hold());
            // The writer dedups against them (revived)...
            let parts: Vec<(ChunkId, &[u8])> =
                crate::chunker::chunk_slice(&shared, ChunkParams::default())
                    .map(|c| (ChunkId::of(c), c))
                    .collect();
            let new = store.put_chunks("t", &parts).unwrap();
            assert!(new.iter().all(|n| !n), "all found");
            // ...two passes run before it commits...
            store.collect_garbage(&[], &no_grace()).unwrap();
            store.collect_garbage(&[], &no_grace()).unwrap();
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
                    let live = roots(&committed.lock().unwrap());
                    store.collect_garbage(&live, &no_grace()).unwrap();
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
            store.collect_garbage(&roots(&live), &no_grace()).unwrap();
        }
        for id in &live {
            read_all(&store, id).unwrap_or_else(|e| panic!("seed {seed}: snapshot {id}: {e}"));
        }
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
        store.collect_garbage(&[], &no_grace()).unwrap();
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

    #[test]
    fn the_filter_has_no_false_negatives_and_few_false_positives() {
        let n = 20_000u64;
        let mut f = Filter::new(n * BITS_PER_KEY, 7);
        let th = tenant_hash(b"t");
        let id = |i: u64| *ChunkId::of(&i.to_le_bytes()).as_bytes();
        for i in 0..n {
            f.insert(th, &id(i));
        }
        assert!((0..n).all(|i| f.contains(th, &id(i))));
        let fp = (n..2 * n).filter(|i| f.contains(th, &id(*i))).count();
        assert!(fp < (n / 50) as usize, "{fp} false positives of {n}");
        // The same id in another tenant is another key.
        let other = tenant_hash(b"u");
        let fp = (0..n).filter(|i| f.contains(other, &id(*i))).count();
        assert!(fp < (n / 50) as usize, "{fp} of {n} hit in another tenant");
    }
}
