//! The cold tier, the node's side: packing the chunks of old snapshots
//! into the operator's bucket (`[cold]`), indexing the packs the cluster
//! state lists and evicting local copies, and reading evicted chunks back.
//!
//! A pass on a node moves the chunks of the datasets it is the first
//! replica of: those that snapshots older than `cold.age` reach and no
//! younger snapshot of the dataset does. It reads their stored bytes (an
//! encrypted tenant's stay sealed: the bucket holds no content of it in
//! clear), fills packs of `cold.pack_size`, uploads each under its BLAKE3
//! name, then lists it in the state (`AddColdPack`). Every node indexes
//! every listed pack (a node with an empty store too: the bucket is the
//! copy) and drops its local copies of the chunks in it; a read of one of
//! those fetches its range from the pack and checks it against its name.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitclone_raft::state::{ColdPack, Command as RaftCommand};
use bitclone_storage::cold::PackBuilder;
use bitclone_storage::{ChunkId, ChunkStore, Entries, Error as StoreError, SnapshotId};

use crate::node::Node;

/// What this node did for the cold tier since it started (`/metrics`).
#[derive(Default)]
pub struct ColdStats {
    pub packs_written: AtomicU64,
    pub chunks_moved: AtomicU64,
    pub bytes_moved: AtomicU64,
    pub chunks_evicted: AtomicU64,
    /// Listed packs that failed their check (or could not be read) here.
    pub pack_failures: AtomicU64,
}

/// What a pass moved.
#[derive(Debug, Default, Clone)]
pub struct TierReport {
    pub packs: u64,
    pub chunks: u64,
    pub bytes: u64,
    /// Local copies dropped here (of this pass's packs and of packs other
    /// nodes wrote since this node last looked).
    pub evicted: u64,
    pub seconds: f64,
}

/// One dataset's snapshots by age.
struct Work {
    tenant: String,
    old: Vec<SnapshotId>,
    young: Vec<SnapshotId>,
}

/// One pass on this node (see the module docs).
pub async fn tier_once(node: &Arc<Node>) -> Result<TierReport, StoreError> {
    let started = Instant::now();
    let Some(tier) = node.cold.clone() else {
        return Err(StoreError::InvalidArgument(
            "this node has no cold tier: set [cold] url (and age)".into(),
        ));
    };
    let Some(age) = node.config.cold.age else {
        return Err(StoreError::InvalidArgument(
            "cold.age is not set: no chunk is old enough to move".into(),
        ));
    };
    let _pass = node.cold_pass.lock().await;
    // Packs other nodes wrote first: their chunks are not moved again.
    let mut report = TierReport {
        evicted: index_new_packs(node).await,
        ..TierReport::default()
    };
    let cutoff = bitclone_raft::cluster::now_ms() - age.as_millis() as i64;
    let me = node.cluster.id;
    let work: Vec<Work> = node.cluster.local(|s| {
        let mut out = Vec::new();
        for (tenant, datasets) in &s.datasets {
            for (dataset, head) in datasets {
                if s.replicas_of(tenant, dataset).first() != Some(&me) {
                    continue;
                }
                let (mut old, mut young) = (Vec::new(), Vec::new());
                for e in &head.history {
                    let Ok(id) = e.id.parse::<SnapshotId>() else {
                        continue;
                    };
                    if e.created_unix_ms < cutoff {
                        old.push(id);
                    } else {
                        young.push(id);
                    }
                }
                if !old.is_empty() {
                    out.push(Work {
                        tenant: tenant.clone(),
                        old,
                        young,
                    });
                }
            }
        }
        out
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PackBuilder>(1);
    let (store, pack_size) = (node.store.clone(), node.config.cold.pack_size as usize);
    let fill = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        let mut pack = PackBuilder::new();
        for w in work {
            let chunks_of = |ids: &[SnapshotId]| -> Result<Vec<ChunkId>, StoreError> {
                let mut out = Vec::new();
                for id in ids {
                    let root = bitclone_storage::read_root(store.as_ref(), &w.tenant, id)?;
                    let chunks: Arc<dyn ChunkStore> = store.clone();
                    for e in Entries::new(chunks, &w.tenant, root) {
                        out.extend(e?.chunks.iter().map(|c| c.id));
                    }
                }
                Ok(out)
            };
            let young: HashSet<ChunkId> = chunks_of(&w.young)?.into_iter().collect();
            let mut seen = HashSet::new();
            for id in chunks_of(&w.old)? {
                if young.contains(&id)
                    || !seen.insert(id)
                    || store.cold_record(&w.tenant, &id)?.is_some()
                {
                    continue;
                }
                // Only a good copy held here goes (a bad one is scrub's to
                // repair first).
                let bytes = match store.load_local(&w.tenant, &id) {
                    Ok(Some(b)) if id.verify(&b) => b,
                    Ok(_) | Err(StoreError::CorruptChunk { .. }) => continue,
                    Err(e) => return Err(e),
                };
                pack.add(&w.tenant, id, &bytes);
                if pack.len() >= pack_size {
                    let full = std::mem::replace(&mut pack, PackBuilder::new());
                    tx.blocking_send(full).map_err(|_| StoreError::Cancelled)?;
                }
            }
        }
        if !pack.is_empty() {
            tx.blocking_send(pack).map_err(|_| StoreError::Cancelled)?;
        }
        Ok(())
    });
    while let Some(pack) = rx.recv().await {
        let chunks = pack.chunks() as u64;
        let bytes = pack.len() as u64;
        let (name, data, _) = pack.finish();
        tier.put(&name, data).await?;
        // Read back and checked before anyone drops a copy on its account.
        let entries = tier.verified_entries(&name).await?;
        let resp = node
            .cluster
            .write(RaftCommand::AddColdPack {
                pack: name.to_hex(),
                info: ColdPack {
                    chunks,
                    bytes,
                    by: me,
                    unix_ms: 0,
                },
            })
            .await
            .map_err(crate::node::raft_error)?;
        crate::link::fenced_error("", resp)?;
        let store = node.store.clone();
        let evicted = tokio::task::spawn_blocking(move || store.index_pack(&name, &entries))
            .await
            .unwrap_or(Err(StoreError::Panicked))?;
        report.evicted += evicted;
        report.packs += 1;
        report.chunks += chunks;
        report.bytes += bytes;
        let st = &node.cold_stats;
        st.packs_written.fetch_add(1, Ordering::Relaxed);
        st.chunks_moved.fetch_add(chunks, Ordering::Relaxed);
        st.bytes_moved.fetch_add(bytes, Ordering::Relaxed);
        st.chunks_evicted.fetch_add(evicted, Ordering::Relaxed);
        tracing::info!(pack = %name, chunks, bytes, "cold tier: pack written");
    }
    fill.await.unwrap_or(Err(StoreError::Panicked))?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Indexes the packs the state lists that this store has not: each read
/// whole and checked (see [`bitclone_storage::cold::ColdBucket::verified_entries`]),
/// then its chunks' records written and local copies dropped. Returns the
/// copies dropped; a pack that fails is logged and tried again next time,
/// the others go on.
pub async fn index_new_packs(node: &Arc<Node>) -> u64 {
    let Some(tier) = node.cold.clone() else {
        return 0;
    };
    let packs: Vec<String> = node
        .cluster
        .local(|s| s.cold_packs.keys().cloned().collect());
    let mut evicted = 0;
    for hex in packs {
        let one = async {
            let pack: ChunkId = hex.parse()?;
            let store = node.store.clone();
            if tokio::task::spawn_blocking(move || store.has_pack(&pack))
                .await
                .unwrap_or(Err(StoreError::Panicked))?
            {
                return Ok(0);
            }
            let entries = tier.verified_entries(&pack).await?;
            let store = node.store.clone();
            tokio::task::spawn_blocking(move || store.index_pack(&pack, &entries))
                .await
                .unwrap_or(Err(StoreError::Panicked))
        };
        match one.await {
            Ok(n) => {
                evicted += n;
                node.cold_stats
                    .chunks_evicted
                    .fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                node.cold_stats
                    .pack_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(pack = %hex, error = %e, "cold tier: a pack cannot be indexed; its chunks stay here")
            }
        }
    }
    evicted
}

/// Every node: follows the state's packs (every 2 s) and, every
/// `cold.interval` (not zero) with an age set, runs a pass.
pub async fn cold_loop(node: Arc<Node>) {
    if node.cold.is_none() {
        return;
    }
    let interval = node.config.cold.interval;
    let mut last_pass = Instant::now();
    loop {
        node.pause(Duration::from_secs(2)).await;
        if node.is_shutting_down() {
            return;
        }
        index_new_packs(&node).await;
        if interval.is_zero() || node.config.cold.age.is_none() || last_pass.elapsed() < interval {
            continue;
        }
        last_pass = Instant::now();
        match tier_once(&node).await {
            Ok(r) if r.packs > 0 => tracing::info!(
                packs = r.packs,
                chunks = r.chunks,
                bytes = r.bytes,
                "cold tier: pass done"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cold tier: pass failed"),
        }
    }
}
