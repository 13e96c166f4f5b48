//! Chunk replication over QUIC: this node's side of the chunk protocol, and
//! pushing a snapshot's chunks and manifest to its shard's replicas.

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

    fn store_manifest(&self, tenant: &str, id: &[u8; 32], bytes: &[u8]) -> Result<(), String> {
        tenant_ok(tenant)?;
        self.store
            .store_manifest_durable(tenant, &ChunkId(*id), bytes)
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
    let mut sent = 0u64;
    let mut i = 0;
    while i < missing.len() {
        // Read a batch locally (blocking), then send it.
        let (s, t, rest) = (store.clone(), tenant.to_string(), missing[i..].to_vec());
        let batch = tokio::task::spawn_blocking(move || -> Result<Vec<NamedChunk>, String> {
            let mut out = Vec::new();
            let mut size = 0u64;
            for id in rest {
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
