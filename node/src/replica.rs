//! Chunk replication over QUIC: this node's side of the chunk protocol, and
//! pushing a snapshot's chunks and manifest to its shard's replicas.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use bitclone_raft::Cluster;
use bitclone_storage::path::validate_name;
use bitclone_storage::{
    ChunkId, ChunkStore, Error as StoreError, Manifest, RocksStore, SnapshotId,
};
use bitclone_transport::{ChunkServer, Transport};
use rustls::pki_types::CertificateDer;

/// Chunks sent in one put: a few MiB keeps memory bounded.
const PUT_BATCH_BYTES: u64 = 16 << 20;
/// Names asked about in one `missing` frame.
const IDS_BATCH: usize = 8192;

/// A chunk's name and bytes.
type NamedChunk = ([u8; 32], Vec<u8>);

/// Serves the chunk protocol from this node's store to cluster members.
pub struct NodeChunks {
    pub store: Arc<RocksStore>,
    pub cluster: Arc<Cluster>,
}

fn tenant_ok(tenant: &str) -> Result<(), String> {
    validate_name("tenant", tenant).map_err(|e| e.to_string())
}

impl ChunkServer for NodeChunks {
    fn authorize(&self, certs: &[CertificateDer<'static>], claimed: u64) -> Result<(), String> {
        bitclone_raft::tls::check_peer(certs, claimed).map_err(|e| e.to_string())?;
        if !self.cluster.local(|s| s.members.contains_key(&claimed)) {
            return Err(format!("node {claimed} is not a member of this cluster"));
        }
        Ok(())
    }

    fn missing(&self, tenant: &str, ids: &[[u8; 32]]) -> Result<Vec<bool>, String> {
        tenant_ok(tenant)?;
        ids.iter()
            .map(|i| {
                self.store
                    .has_chunk(tenant, &ChunkId(*i))
                    .map(|h| !h)
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    fn store(&self, tenant: &str, id: &[u8; 32], data: &[u8]) -> Result<bool, String> {
        tenant_ok(tenant)?;
        self.store
            .put_chunk(tenant, &ChunkId(*id), data)
            .map_err(|e| e.to_string())
    }

    fn load(&self, tenant: &str, id: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        tenant_ok(tenant)?;
        match self.store.get_chunk(tenant, &ChunkId(*id)) {
            Ok(d) => Ok(Some(d)),
            Err(StoreError::MissingChunk(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn flush(&self) -> Result<(), String> {
        self.store.sync().map_err(|e| e.to_string())
    }

    fn load_manifest(&self, tenant: &str, id: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        tenant_ok(tenant)?;
        match self.store.get_manifest(tenant, &SnapshotId(*id)) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn store_manifest(&self, tenant: &str, id: &[u8; 32], bytes: &[u8]) -> Result<(), String> {
        tenant_ok(tenant)?;
        self.store
            .store_manifest_durable(tenant, &SnapshotId(*id), bytes)
            .map_err(|e| e.to_string())
    }
}

/// Sends `manifest`'s missing chunks and the manifest to one peer; returns
/// the chunk bytes sent.
async fn replicate_to(
    transport: &Transport,
    store: &Arc<RocksStore>,
    peer: u64,
    addr: SocketAddr,
    manifest: &Manifest,
    id: &SnapshotId,
    bytes: &[u8],
) -> Result<u64, String> {
    let tenant = manifest.tenant.as_str();
    let mut ids: Vec<[u8; 32]> = manifest
        .entries
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.id.0))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut missing = Vec::new();
    for batch in ids.chunks(IDS_BATCH) {
        missing.extend(
            transport
                .missing(peer, addr, tenant, batch)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let missing: Arc<[[u8; 32]]> = missing.into();
    let mut sent = 0u64;
    let mut i = 0;
    while i < missing.len() {
        // Read a batch locally (blocking), then send it.
        let (s, t, ids, start) = (store.clone(), tenant.to_string(), missing.clone(), i);
        let batch = tokio::task::spawn_blocking(move || -> Result<Vec<NamedChunk>, String> {
            let mut out = Vec::new();
            let mut size = 0u64;
            for &id in &ids[start..] {
                let data = s.get_chunk(&t, &ChunkId(id)).map_err(|e| e.to_string())?;
                size += data.len() as u64;
                out.push((id, data));
                if size >= PUT_BATCH_BYTES {
                    break;
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())??;
        i += batch.len();
        let refs: Vec<([u8; 32], &[u8])> = batch.iter().map(|(i, d)| (*i, d.as_slice())).collect();
        transport
            .put(peer, addr, tenant, &refs)
            .await
            .map_err(|e| e.to_string())?;
        sent += batch.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
    }
    transport
        .put_manifest(peer, addr, tenant, &id.0, bytes)
        .await
        .map_err(|e| e.to_string())?;
    Ok(sent)
}

/// Makes a snapshot durable on a majority of its shard's replica set before
/// it may be committed; slower replicas keep receiving in the background (a
/// dead one is given up on when its connection times out). Chunk bytes sent
/// are added to `sent` as each replica finishes.
pub async fn replicate(
    transport: &Arc<Transport>,
    cluster: &Cluster,
    store: &Arc<RocksStore>,
    manifest: &Manifest,
    id: &SnapshotId,
    bytes: &[u8],
    sent: &Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), StoreError> {
    let me = cluster.id;
    let (replicas, members) = cluster.local(|s| {
        (
            s.replicas_of(&manifest.tenant, &manifest.dataset),
            s.members.clone(),
        )
    });
    let need = replicas.len() / 2 + 1;
    let mut durable = usize::from(replicas.contains(&me));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut pending = 0;
    for r in replicas.iter().filter(|r| **r != me) {
        let Some(addr) = members
            .get(r)
            .and_then(|m| m.peer_addr.parse::<SocketAddr>().ok())
        else {
            continue;
        };
        pending += 1;
        let (t, s, m, b, id, tx, peer, counter) = (
            transport.clone(),
            store.clone(),
            manifest.clone(),
            bytes.to_vec(),
            *id,
            tx.clone(),
            *r,
            sent.clone(),
        );
        tokio::spawn(async move {
            let r = replicate_to(&t, &s, peer, addr, &m, &id, &b).await;
            match &r {
                Ok(n) => {
                    counter.fetch_add(*n, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(
                    peer,
                    error = e,
                    "replicating a snapshot to a replica failed"
                ),
            }
            let _ = tx.send((peer, r.map(|_| ())));
        });
    }
    drop(tx);
    let mut errors = Vec::new();
    while durable < need && pending > 0 {
        let Some((peer, r)) = rx.recv().await else {
            break;
        };
        pending -= 1;
        match r {
            Ok(()) => durable += 1,
            Err(e) => errors.push(format!("node {peer}: {e}")),
        }
    }
    if durable < need {
        return Err(StoreError::Unavailable(format!(
            "snapshot {id} is durable on {durable} of {} replicas, {need} needed: {}",
            replicas.len(),
            errors.join("; ")
        )));
    }
    Ok(())
}

/// Largest manifest accepted from a peer.
const MAX_MANIFEST_BYTES: usize = 256 << 20;
/// Chunks fetched per request during repair.
const REPAIR_BATCH: usize = 32;

/// Repair: pulls what the current layout places on this node (manifests
/// and chunks it lacks) from the other members, and reports the node ready
/// for the layout once it holds all of it. Runs until shutdown.
pub async fn repair_loop(
    node: Arc<crate::node::Node>,
    cluster: Arc<Cluster>,
    transport: Arc<Transport>,
) {
    let mut last_scan: Option<(u64, std::time::Instant)> = None;
    while !node.is_shutting_down() {
        let (version, ready, member) = cluster.local(|s| {
            (
                s.layout.version,
                s.ready.contains(&cluster.id),
                s.members.contains_key(&cluster.id),
            )
        });
        if !member {
            // Removed (or not yet admitted): nothing is placed here.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        }
        // Scan when the layout is not in effect for us yet, when it changed,
        // and every 30 s (to catch snapshots a down replica missed).
        let due = !ready
            || last_scan.is_none_or(|(v, at)| {
                v != version || at.elapsed() > std::time::Duration::from_secs(30)
            });
        if due {
            match repair_once(&node, &cluster, &transport).await {
                Ok(true) => {
                    last_scan = Some((version, std::time::Instant::now()));
                    if !ready {
                        let r = cluster
                            .write(bitclone_raft::state::Command::ReplicaReady {
                                node: cluster.id,
                                version,
                            })
                            .await;
                        match r {
                            Ok(_) => tracing::info!(version, "holding all data of the layout"),
                            Err(e) => {
                                tracing::warn!(error = %e, "reporting repair progress failed")
                            }
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = e, "repair pass failed"),
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// One pass; true when this node holds everything the layout gives it.
async fn repair_once(
    node: &crate::node::Node,
    cluster: &Cluster,
    transport: &Transport,
) -> Result<bool, String> {
    let me = cluster.id;
    let (work, members) = cluster.local(|s| {
        let mut work = Vec::new();
        for (tenant, sets) in &s.datasets {
            for (name, head) in sets {
                if !s.replicas_of(tenant, name).contains(&me) {
                    continue;
                }
                for e in &head.history {
                    // Ask the writer first, then everyone else.
                    let mut from = vec![e.written_by];
                    from.extend(
                        s.members
                            .keys()
                            .filter(|m| **m != me && **m != e.written_by),
                    );
                    from.retain(|m| *m != me);
                    work.push((tenant.clone(), e.id.clone(), from));
                }
            }
        }
        (work, s.members.clone())
    });
    let addr = |peer: &u64| {
        members
            .get(peer)
            .and_then(|m| m.peer_addr.parse::<SocketAddr>().ok())
    };
    let mut complete = true;
    let mut present: HashMap<String, HashSet<ChunkId>> = HashMap::new();
    for (tenant, id_hex, from) in work {
        let id: SnapshotId = id_hex.parse().map_err(|e: StoreError| e.to_string())?;
        let (store, t) = (node.store.clone(), tenant.clone());
        let local = tokio::task::spawn_blocking(move || store.get_manifest(&t, &id).ok())
            .await
            .map_err(|e| e.to_string())?;
        let bytes = match local {
            Some(b) => b,
            None => {
                let mut got = None;
                for peer in &from {
                    let Some(a) = addr(peer) else { continue };
                    if let Ok(b) = transport
                        .get_manifest(*peer, a, &tenant, &id.0, MAX_MANIFEST_BYTES)
                        .await
                    {
                        got = Some(b);
                        break;
                    }
                }
                let Some(b) = got else {
                    complete = false;
                    continue;
                };
                let (store, t, bb) = (node.store.clone(), tenant.clone(), b.clone());
                tokio::task::spawn_blocking(move || store.store_manifest_durable(&t, &id, &bb))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                b
            }
        };
        let manifest = Manifest::decode(&bytes).map_err(|e| e.to_string())?;
        let mut ids: Vec<ChunkId> = manifest
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| c.id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        // Snapshots of a dataset share most chunks: check each one once a pass.
        let seen = present.entry(tenant.clone()).or_default();
        ids.retain(|i| !seen.contains(i));
        let (store, t, check) = (node.store.clone(), tenant.clone(), ids.clone());
        let missing: Vec<[u8; 32]> = tokio::task::spawn_blocking(move || {
            check
                .into_iter()
                .filter(|i| !store.has_chunk(&t, i).unwrap_or(false))
                .map(|i| i.0)
                .collect()
        })
        .await
        .map_err(|e| e.to_string())?;
        let absent: HashSet<[u8; 32]> = missing.iter().copied().collect();
        seen.extend(ids.into_iter().filter(|i| !absent.contains(&i.0)));
        if missing.is_empty() {
            continue;
        }
        tracing::info!(
            snapshot = id_hex,
            chunks = missing.len(),
            "repair: pulling chunks"
        );
        for batch in missing.chunks(REPAIR_BATCH) {
            let mut done = false;
            for peer in &from {
                let Some(a) = addr(peer) else { continue };
                if let Ok(datas) = transport.get(*peer, a, &tenant, batch).await {
                    let (store, t, ids) = (node.store.clone(), tenant.clone(), batch.to_vec());
                    tokio::task::spawn_blocking(move || -> Result<(), String> {
                        for (i, d) in ids.iter().zip(datas) {
                            store
                                .put_chunk(&t, &ChunkId(*i), &d)
                                .map_err(|e| e.to_string())?;
                        }
                        store.sync().map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|e| e.to_string())??;
                    done = true;
                    break;
                }
            }
            if !done {
                complete = false;
            }
        }
    }
    Ok(complete)
}
