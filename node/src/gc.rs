//! Garbage collection and retention on the node: the passes over this
//! node's store (on a timer and on demand) and the leader's retention pass.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bitclone_raft::state::{ClusterState, Command, Response};
use bitclone_storage::{Error as StoreError, GcOptions, GcReport, GcRoot, SnapshotId};

use crate::node::{raft_error, Node};

/// What the passes did, for `/metrics`.
#[derive(Default)]
pub struct GcStats {
    pub passes: AtomicU64,
    pub passes_failed: AtomicU64,
    pub examined: AtomicU64,
    pub freed_chunks: AtomicU64,
    pub freed_bytes: AtomicU64,
    pub roots_freed: AtomicU64,
    /// Unreachable, waiting out the grace period (as of the last pass).
    pub waiting_chunks: AtomicI64,
    pub waiting_bytes: AtomicI64,
    /// Length of the last pass, ms.
    pub last_pass_ms: AtomicI64,
    /// Snapshots the retention passes this node led deleted.
    pub snapshots_expired: AtomicU64,
}

/// Every snapshot of every dataset: what a pass keeps. All of them, not
/// only those placed here: a superset keeps nothing it should free. An id
/// that does not parse stops the pass (its data would be freed).
fn roots(state: &ClusterState) -> Result<Vec<GcRoot>, StoreError> {
    let mut out = Vec::new();
    for (tenant, datasets) in &state.datasets {
        for head in datasets.values() {
            for s in &head.history {
                out.push(GcRoot {
                    tenant: tenant.clone(),
                    snapshot: s.id.parse::<SnapshotId>()?,
                });
            }
        }
    }
    Ok(out)
}

/// One pass over this node's store. The snapshots are read linearizably,
/// once the pass has noted the writers in progress: every commit
/// acknowledged before that is kept, and a writer still running then
/// holds what it found.
pub async fn collect(node: &Arc<Node>, dry_run: bool) -> Result<GcReport, StoreError> {
    let started = Instant::now();
    let runtime = tokio::runtime::Handle::current();
    let cluster = node.cluster.clone();
    let mut read_roots = move || runtime.block_on(cluster.read(roots)).map_err(raft_error)?;
    let opts = GcOptions {
        grace: node.config.gc.grace,
        memory_bytes: node.config.gc.memory_bytes,
        dry_run,
        compact: true,
    };
    // A pass takes a while: on a thread of its own, not the CPU pool's.
    let store = node.store.clone();
    let result = tokio::task::spawn_blocking(move || store.collect_garbage(&mut read_roots, &opts))
        .await
        .unwrap_or(Err(StoreError::Panicked));
    let s = &node.gc;
    match &result {
        Ok(r) if !dry_run => {
            s.passes.fetch_add(1, Ordering::Relaxed);
            s.examined.fetch_add(r.examined, Ordering::Relaxed);
            s.freed_chunks.fetch_add(r.freed, Ordering::Relaxed);
            s.freed_bytes.fetch_add(r.freed_bytes, Ordering::Relaxed);
            s.roots_freed.fetch_add(r.roots_freed, Ordering::Relaxed);
            s.waiting_chunks.store(r.waiting as i64, Ordering::Relaxed);
            s.waiting_bytes
                .store(r.waiting_bytes as i64, Ordering::Relaxed);
            s.last_pass_ms
                .store(started.elapsed().as_millis() as i64, Ordering::Relaxed);
            tracing::info!(
                examined = r.examined,
                freed = r.freed,
                freed_bytes = r.freed_bytes,
                roots_freed = r.roots_freed,
                waiting = r.waiting,
                marked = r.marked,
                seconds = started.elapsed().as_secs_f64(),
                "garbage collection pass"
            );
        }
        Ok(_) => {}
        Err(e) => {
            s.passes_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "garbage collection pass failed");
        }
    }
    result
}

/// Runs `step` every `period` until shutdown (never when `period` is
/// zero), on the leader only with `leader_only`. Job activity does not wake
/// it.
pub async fn periodically<F, Fut>(
    node: Arc<Node>,
    period: std::time::Duration,
    leader_only: bool,
    mut step: F,
) where
    F: FnMut(Arc<Node>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if period.is_zero() {
        return;
    }
    loop {
        node.pause(period).await;
        if node.is_shutting_down() {
            return;
        }
        if leader_only && node.cluster.leader() != Some(node.cluster.id) {
            continue;
        }
        step(node.clone()).await;
    }
}

/// Collects garbage every `gc.interval`.
pub async fn gc_loop(node: Arc<Node>) {
    let every = node.config.gc.interval;
    periodically(node, every, false, |n| async move {
        let _ = collect(&n, false).await;
    })
    .await;
}

/// On the leader, every `gc.retention_every`: deletes what the datasets'
/// retention policies no longer keep (decided again inside the state
/// machine, at the leader's time).
pub async fn retention_loop(node: Arc<Node>) {
    let every = node.config.gc.retention_every;
    periodically(node, every, true, |n| async move {
        if let Err(e) = expire_once(&n).await {
            tracing::warn!(error = %e, "retention pass failed");
        }
    })
    .await;
}

/// One retention pass: the policies the config file sets are made the
/// cluster's, then the datasets whose policy expires something now.
pub async fn expire_once(node: &Arc<Node>) -> Result<u64, StoreError> {
    for (tenant, dataset, policy) in &node.config.retention {
        let current = node.cluster.local(|s| {
            s.retention
                .get(tenant)
                .and_then(|p| p.get(dataset))
                .cloned()
        });
        if current.as_ref() != Some(policy) {
            // One entry the cluster refuses (a tenant being erased) leaves
            // the others to go on.
            match node
                .write(Command::SetRetention {
                    tenant: tenant.clone(),
                    dataset: dataset.clone(),
                    policy: policy.clone(),
                })
                .await
            {
                Ok(_) => {
                    tracing::info!(%tenant, %dataset, %policy, "retention policy from the config file")
                }
                Err(e) => {
                    tracing::warn!(%tenant, %dataset, error = %e, "retention policy from the config file refused")
                }
            }
        }
    }
    let now = bitclone_raft::cluster::now_ms();
    let due: Vec<(String, String)> = node.cluster.local(|s| {
        s.retention
            .iter()
            .flat_map(|(t, p)| p.keys().map(move |d| (t.clone(), d.clone())))
            .filter(|(t, d)| !s.expired(t, d, now).is_empty())
            .collect()
    });
    let mut deleted = 0;
    for (tenant, dataset) in due {
        let r = node
            .write(Command::ExpireSnapshots {
                tenant: tenant.clone(),
                dataset: dataset.clone(),
            })
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%tenant, %dataset, error = %e, "expiring snapshots failed");
                continue;
            }
        };
        if let Response::Deleted { snapshots, .. } = r {
            if !snapshots.is_empty() {
                tracing::info!(%tenant, %dataset, expired = snapshots.len(), "retention deleted snapshots");
            }
            deleted += snapshots.len() as u64;
        }
    }
    node.gc
        .snapshots_expired
        .fetch_add(deleted, Ordering::Relaxed);
    Ok(deleted)
}

/// What scrubs found and mended, for `/metrics`.
#[derive(Default)]
pub struct ScrubStats {
    pub passes: AtomicU64,
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    pub bad: AtomicU64,
    pub repaired: AtomicU64,
    /// Bad chunks and roots no replica could replace (last pass).
    pub unrepaired: AtomicI64,
    pub last_pass_ms: AtomicI64,
    /// Reconcile jobs: destinations checked, objects or catalogs found
    /// drifted, destinations written again to repair them.
    pub reconciled: AtomicU64,
    pub drifted: AtomicU64,
    pub reconcile_repairs: AtomicU64,
}

/// What a scrub of this node's store found and did.
pub struct Scrubbed {
    pub report: bitclone_storage::ScrubReport,
    pub repaired: u64,
    /// (tenant, chunk or snapshot, why it could not be repaired).
    pub unrepaired: Vec<(String, String, String)>,
}

/// Reads and checks everything in this node's store (paced at
/// `scrub.rate`), and replaces each bad chunk or root with a good copy from
/// another member.
pub async fn scrub(node: &Arc<Node>) -> Result<Scrubbed, StoreError> {
    let store = node.store.clone();
    let rate = node.config.scrub.rate;
    let report = tokio::task::spawn_blocking(move || store.scrub(rate))
        .await
        .unwrap_or(Err(StoreError::Panicked))?;
    let others: Vec<u64> = node.cluster.local(|s| {
        s.members
            .keys()
            .copied()
            .filter(|n| *n != node.cluster.id)
            .collect()
    });
    let mut repaired = 0;
    let mut unrepaired = Vec::new();
    for (tenant, id, what) in &report.bad {
        tracing::warn!(%tenant, chunk = %id, problem = %what, "scrub found a bad chunk");
        match node.repair_from(&others, tenant, id).await {
            Ok(_) => repaired += 1,
            Err(e) => unrepaired.push((tenant.clone(), id.to_hex(), e.to_string())),
        }
    }
    for (tenant, id) in &report.bad_roots {
        tracing::warn!(%tenant, snapshot = %id, "scrub found a bad snapshot root");
        match crate::replica::repair_root(node, &others, tenant, id).await {
            Ok(()) => repaired += 1,
            Err(e) => unrepaired.push((tenant.clone(), id.to_hex(), e.to_string())),
        }
    }
    let s = &node.scrub;
    s.passes.fetch_add(1, Ordering::Relaxed);
    s.chunks.fetch_add(report.chunks, Ordering::Relaxed);
    s.bytes.fetch_add(report.bytes, Ordering::Relaxed);
    s.bad.fetch_add(
        (report.bad.len() + report.bad_roots.len()) as u64,
        Ordering::Relaxed,
    );
    s.repaired.fetch_add(repaired, Ordering::Relaxed);
    s.unrepaired
        .store(unrepaired.len() as i64, Ordering::Relaxed);
    s.last_pass_ms
        .store((report.seconds * 1000.0) as i64, Ordering::Relaxed);
    tracing::info!(
        chunks = report.chunks,
        bytes = report.bytes,
        bad = report.bad.len() + report.bad_roots.len(),
        repaired,
        unrepaired = unrepaired.len(),
        seconds = report.seconds,
        "scrub pass"
    );
    Ok(Scrubbed {
        report,
        repaired,
        unrepaired,
    })
}

/// Scrubs this node's store every `scrub.interval`.
pub async fn scrub_loop(node: Arc<Node>) {
    let every = node.config.scrub.interval;
    periodically(node, every, false, |n| async move {
        if let Err(e) = scrub(&n).await {
            tracing::warn!(error = %e, "scrub pass failed");
        }
    })
    .await;
}
