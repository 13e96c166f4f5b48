//! Chunk replication over QUIC: this node's side of the chunk protocol, and
//! pushing a snapshot's chunks and manifest to its shard's replicas.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bitclone_raft::Cluster;
use bitclone_storage::manifest::{chunk_ids, decode_root, Page, Stored};
use bitclone_storage::path::validate_name;
use bitclone_storage::{ChunkId, ChunkStore, Error as StoreError, RocksStore, SnapshotId};
use bitclone_transport::{ChunkServer, Transport};
use rustls::pki_types::CertificateDer;

use crate::metrics::QuicStats;

/// Chunks sent in one put: a few MiB keeps memory bounded (per replica
/// being sent to, read here and framed by the transport).
const PUT_BATCH_BYTES: u64 = 4 << 20;
/// Leaf pages whose chunks are asked about and sent in one round.
const LEAVES_PER_ROUND: usize = 256;
/// Names asked about in one `missing` frame.
const IDS_BATCH: usize = 8192;

/// A chunk's name and bytes.
type NamedChunk = ([u8; 32], Vec<u8>);

/// Serves the chunk protocol from this node's store to cluster members.
pub struct NodeChunks {
    pub store: Arc<RocksStore>,
    pub cluster: Arc<Cluster>,
    /// Chunks and pages sent here are refused below the reserve.
    pub space: crate::space::Space,
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
        // A page garbage collection had found unreachable may have lost
        // children: missing, so that the sender descends below it.
        ids.iter()
            .map(|i| {
                self.store
                    .has_settled_chunk(tenant, &ChunkId(*i))
                    .map(|h| !h)
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    fn store(&self, tenant: &str, id: &[u8; 32], data: &[u8]) -> Result<bool, String> {
        tenant_ok(tenant)?;
        self.space.check(self.cluster.id)?;
        self.store
            .put_chunk(tenant, &ChunkId(*id), data)
            .map_err(|e| e.to_string())
    }

    fn store_many(&self, tenant: &str, chunks: &[([u8; 32], &[u8])]) -> Result<u64, String> {
        tenant_ok(tenant)?;
        self.space.check(self.cluster.id)?;
        let named: Vec<(ChunkId, &[u8])> =
            chunks.iter().map(|(id, d)| (ChunkId(*id), *d)).collect();
        let new = self
            .store
            .put_chunks(tenant, &named)
            .map_err(|e| e.to_string())?;
        Ok(new.into_iter().filter(|n| *n).count() as u64)
    }

    fn load(&self, tenant: &str, id: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        tenant_ok(tenant)?;
        match self.store.get_stored_chunk(tenant, &ChunkId(*id)) {
            Ok(d) => Ok(Some(d)),
            Err(StoreError::MissingChunk(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn load_manifest(&self, tenant: &str, id: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        tenant_ok(tenant)?;
        match self.store.get_stored_manifest(tenant, &SnapshotId(*id)) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn store_manifest(&self, tenant: &str, id: &[u8; 32], bytes: &[u8]) -> Result<(), String> {
        tenant_ok(tenant)?;
        self.space.check(self.cluster.id)?;
        // Puts are acknowledged before they are durable, so a restart since
        // they came could have lost them. The root's pages came last and a
        // store loses only its latest writes: with them here, everything
        // the root needs is here (and the flush below makes it durable).
        let content = self
            .store
            .open(tenant, &ChunkId(*id), bytes.to_vec())
            .map_err(|e| e.to_string())?;
        if let Stored::V2(root) = decode_root(&content).map_err(|e| e.to_string())? {
            for (page, _) in &root.pages {
                if !self
                    .store
                    .has_settled_chunk(tenant, page)
                    .map_err(|e| e.to_string())?
                {
                    return Err(format!(
                        "manifest page {page} of snapshot {} is not here (lost in a restart?); send the snapshot again",
                        SnapshotId(*id)
                    ));
                }
            }
        }
        self.store
            .store_manifest_durable(tenant, &SnapshotId(*id), bytes)
            .map_err(|e| e.to_string())
    }

    fn adopt_trace(&self, span: &tracing::Span, traceparent: &str) {
        bitclone_raft::context::set_remote_parent(span, traceparent);
    }
}

/// Asks `peer` which of `ids` it lacks, a frame's worth at a time.
async fn peer_lacks(
    transport: &Transport,
    peer: u64,
    addr: SocketAddr,
    tenant: &str,
    ids: &[ChunkId],
) -> Result<Vec<ChunkId>, String> {
    let raw: Vec<[u8; 32]> = ids.iter().map(|i| i.0).collect();
    let mut missing = Vec::new();
    for batch in raw.chunks(IDS_BATCH) {
        missing.extend(
            transport
                .missing(peer, addr, tenant, batch)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(ChunkId),
        );
    }
    Ok(missing)
}

/// Sends chunks (or pages) from the local store to `peer`, a batch of a
/// few MiB at a time; returns once the peer stored all of them.
async fn send_chunks(
    transport: &Transport,
    store: &Arc<RocksStore>,
    peer: u64,
    addr: SocketAddr,
    tenant: &str,
    ids: Vec<ChunkId>,
    quic: &QuicStats,
) -> Result<u64, String> {
    let ids: Arc<[ChunkId]> = ids.into();
    let mut sent = 0u64;
    let mut i = 0;
    while i < ids.len() {
        // Read a batch locally (blocking), then send it.
        let (s, t, ids, start) = (store.clone(), tenant.to_string(), ids.clone(), i);
        let batch = tokio::task::spawn_blocking(move || -> Result<Vec<NamedChunk>, String> {
            let mut out = Vec::new();
            let mut size = 0u64;
            for id in &ids[start..] {
                let data = s.get_stored_chunk(&t, id).map_err(|e| e.to_string())?;
                size += data.len() as u64;
                out.push((id.0, data));
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
        let put = std::time::Instant::now();
        transport
            .put(peer, addr, tenant, &refs)
            .await
            .map_err(|e| e.to_string())?;
        let bytes = batch.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        quic.sent(peer, batch.len() as u64, bytes, put.elapsed().as_secs_f64());
        sent += bytes;
    }
    Ok(sent)
}

/// The children of local pages at `level`, deduplicated (blocking read).
async fn children_of(
    store: &Arc<RocksStore>,
    tenant: &str,
    pages: &[ChunkId],
    level: u8,
) -> Result<Vec<ChunkId>, String> {
    let (s, t, pages) = (store.clone(), tenant.to_string(), pages.to_vec());
    tokio::task::spawn_blocking(move || -> Result<Vec<ChunkId>, StoreError> {
        let mut out = Vec::new();
        for id in &pages {
            let bytes = s.get_chunk(&t, id)?;
            out.extend(Page::decode(id, level, &bytes)?.children());
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Sends a snapshot to one peer: what it lacks, then the root; returns the
/// chunk bytes and the page bytes sent. The peer's holdings are found top-down (a page it holds is
/// complete below, since every store writes a page after what it names), so
/// an incremental snapshot costs what changed, not what the dataset holds;
/// everything is sent bottom-up (chunks, then pages level by level) to keep
/// that true on the peer.
async fn replicate_to(
    transport: &Transport,
    store: &Arc<RocksStore>,
    peer: u64,
    addr: SocketAddr,
    tenant: &str,
    (id, root): (&SnapshotId, &[u8]),
    (quic, request_id): (&QuicStats, Option<String>),
) -> Result<(u64, u64), String> {
    let mut levels: Vec<Vec<ChunkId>> = Vec::new();
    let mut sent = 0;
    let content = store
        .open(tenant, &ChunkId(id.0), root.to_vec())
        .map_err(|e| e.to_string())?;
    match decode_root(&content).map_err(|e| e.to_string())? {
        // Snapshots of 0.1.0 (one blob, no pages): every chunk is asked about.
        Stored::V1(m) => {
            let lacking = peer_lacks(transport, peer, addr, tenant, &chunk_ids(&m.entries)).await?;
            sent += send_chunks(transport, store, peer, addr, tenant, lacking, quic).await?;
        }
        Stored::V2(r) => {
            // `frontier` holds pages of level `below - 1`.
            let mut frontier: Vec<ChunkId> = r.pages.iter().map(|(p, _)| *p).collect();
            let mut below = r.height;
            loop {
                let lacking = peer_lacks(transport, peer, addr, tenant, &frontier).await?;
                if lacking.is_empty() {
                    break;
                }
                below -= 1;
                if below == 0 {
                    // Leaf pages: their chunks go a group of pages at a
                    // time, so the names held stay few however many files.
                    for leaves in lacking.chunks(LEAVES_PER_ROUND) {
                        let chunks = children_of(store, tenant, leaves, 0).await?;
                        let chunks = peer_lacks(transport, peer, addr, tenant, &chunks).await?;
                        sent +=
                            send_chunks(transport, store, peer, addr, tenant, chunks, quic).await?;
                    }
                    levels.push(lacking);
                    break;
                }
                frontier = children_of(store, tenant, &lacking, below).await?;
                levels.push(lacking);
            }
        }
    }
    let mut pages_sent = 0;
    for pages in levels.into_iter().rev() {
        pages_sent += send_chunks(transport, store, peer, addr, tenant, pages, quic).await?;
    }
    // The replicate span this runs in is the parent of the peer's.
    let traceparent = bitclone_raft::context::traceparent();
    let call = bitclone_transport::CallContext {
        request_id: request_id.as_deref(),
        traceparent: traceparent.as_deref(),
    };
    transport
        .put_manifest(peer, addr, tenant, (&id.0, root), call)
        .await
        .map_err(|e| e.to_string())?;
    Ok((sent, pages_sent))
}

/// A send to a replica, counted in `bitclone_replication_sends_in_flight`
/// while it lives.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn start(g: &prometheus_client::metrics::gauge::Gauge) -> InFlight {
        g.inc();
        InFlight(g.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Makes a snapshot durable on a majority of its shard's replica set before
/// it may be committed; slower replicas keep receiving in the background (a
/// dead one is given up on when its connection times out). Chunk bytes sent
/// are added to `sent` as each replica finishes.
pub async fn replicate(
    transport: &Arc<Transport>,
    cluster: &Cluster,
    store: &Arc<RocksStore>,
    (tenant, dataset): (&str, &str),
    (id, root): (&SnapshotId, &[u8]),
    (sent, pages_sent): (&Arc<AtomicU64>, &Arc<AtomicU64>),
    quic: &Arc<QuicStats>,
) -> Result<(), StoreError> {
    let me = cluster.id;
    let (replicas, members) =
        cluster.local(|s| (s.replicas_of(tenant, dataset), s.members.clone()));
    let need = replicas.len() / 2 + 1;
    let mut durable = usize::from(replicas.contains(&me));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut pending = 0;
    // Each task looks its peer's address up itself: a name's lookup (a
    // StatefulSet's DNS) runs alongside the others' and the sends.
    let members = Arc::new(members);
    for r in replicas.iter().filter(|r| **r != me) {
        pending += 1;
        let members = members.clone();
        let quic = quic.clone();
        // Counted out when the task ends, however it ends.
        let in_flight = InFlight::start(&quic.sends_in_flight);
        // The put's correlation id and span, into the task that sends to
        // this peer.
        let request_id = bitclone_raft::context::current();
        let span = tracing::info_span!("replicate", peer = *r);
        let (t, s, tn, b, id, tx, peer, counter, page_counter) = (
            transport.clone(),
            store.clone(),
            tenant.to_string(),
            root.to_vec(),
            *id,
            tx.clone(),
            *r,
            sent.clone(),
            pages_sent.clone(),
        );
        tokio::spawn(async move {
            let r = match crate::node::peer_socket(&members, peer).await {
                Some(addr) => {
                    tracing::Instrument::instrument(
                        replicate_to(&t, &s, peer, addr, &tn, (&id, &b), (&quic, request_id)),
                        span,
                    )
                    .await
                }
                None => Err("its peer address does not resolve".to_string()),
            };
            match &r {
                Ok((chunks, pages)) => {
                    counter.fetch_add(*chunks, Ordering::Relaxed);
                    page_counter.fetch_add(*pages, Ordering::Relaxed);
                }
                Err(e) => {
                    quic.send_failed(peer);
                    tracing::warn!(
                        peer,
                        error = e,
                        "replicating a snapshot to a replica failed"
                    )
                }
            }
            drop(in_flight);
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
            node.events.quic.missing_snapshots.set(0);
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
            // Snapshots placed here that this pass could not complete; a
            // pass cut short by an error counts the one it was on too.
            let mut incomplete = 0;
            // What a pass pulls is named by no root here until the pass
            // stores it last.
            let hold = node.store.hold();
            let pass = repair_once(&node, &cluster, &transport, &mut incomplete).await;
            drop(hold);
            let missing = incomplete + u64::from(pass.is_err());
            node.events.quic.missing_snapshots.set(missing as i64);
            match pass {
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
/// `incomplete` counts the snapshots placed here it could not complete.
async fn repair_once(
    node: &crate::node::Node,
    cluster: &Cluster,
    transport: &Transport,
    incomplete: &mut u64,
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
    let mut addrs = PeerAddrs {
        members: &members,
        found: HashMap::new(),
    };
    let mut present: HashMap<String, HashSet<ChunkId>> = HashMap::new();
    for (tenant, id_hex, from) in work {
        let id: SnapshotId = id_hex.parse().map_err(|e: StoreError| e.to_string())?;
        let (store, t) = (node.store.clone(), tenant.clone());
        let local = tokio::task::spawn_blocking(move || store.get_stored_manifest(&t, &id).ok())
            .await
            .map_err(|e| e.to_string())?;
        let is_local = local.is_some();
        let bytes = match local {
            Some(b) => b,
            None => {
                let mut got = None;
                for peer in &from {
                    let Some(a) = addrs.get(*peer).await else {
                        continue;
                    };
                    if let Ok(b) = transport
                        .get_manifest(*peer, a, &tenant, &id.0, MAX_MANIFEST_BYTES)
                        .await
                    {
                        got = Some(b);
                        break;
                    }
                }
                let Some(b) = got else {
                    *incomplete += 1;
                    continue;
                };
                b
            }
        };
        let (store, t, b) = (node.store.clone(), tenant.clone(), bytes.clone());
        let content = tokio::task::spawn_blocking(move || store.open(&t, &ChunkId(id.0), b))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let manifest = match decode_root(&content).map_err(|e| e.to_string())? {
            Stored::V2(root) => {
                // A root is stored after everything below it: one that is
                // here is complete.
                if is_local {
                    continue;
                }
                let mut peers: Vec<(u64, SocketAddr)> = Vec::new();
                for p in &from {
                    if let Some(a) = addrs.get(*p).await {
                        peers.push((*p, a));
                    }
                }
                let top: Vec<ChunkId> = root.pages.iter().map(|(p, _)| *p).collect();
                let lacking = local_lacks(&node.store, &tenant, top).await?;
                let pulled = Pull {
                    store: &node.store,
                    transport,
                    peers: &peers,
                    tenant: &tenant,
                };
                if !pulled.items(lacking, Some(root.height - 1)).await? {
                    *incomplete += 1;
                    continue;
                }
                let (store, t) = (node.store.clone(), tenant.clone());
                tokio::task::spawn_blocking(move || store.store_manifest_durable(&t, &id, &bytes))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                tracing::info!(snapshot = id_hex, "repair: snapshot complete here");
                continue;
            }
            Stored::V1(m) => m,
        };
        // A 0.1.0 snapshot (no pages): its manifest first, then every chunk
        // it names that is not here.
        if !is_local {
            let (store, t, bb) = (node.store.clone(), tenant.clone(), bytes.clone());
            tokio::task::spawn_blocking(move || store.store_manifest_durable(&t, &id, &bb))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        let mut ids = chunk_ids(&manifest.entries);
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
        let mut pulled_all = true;
        for batch in missing.chunks(REPAIR_BATCH) {
            let mut done = false;
            for peer in &from {
                let Some(a) = addrs.get(*peer).await else {
                    continue;
                };
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
                pulled_all = false;
            }
        }
        *incomplete += u64::from(!pulled_all);
    }
    Ok(*incomplete == 0)
}

/// Which of `ids` (chunks or pages) this node's store lacks.
/// Members' peer addresses for one repair pass, each looked up the first
/// time the pass needs it: a pass that finds every snapshot here looks
/// none up (a name is a DNS query).
struct PeerAddrs<'a> {
    members: &'a std::collections::BTreeMap<u64, bitclone_raft::state::NodeInfo>,
    found: HashMap<u64, Option<SocketAddr>>,
}

impl PeerAddrs<'_> {
    async fn get(&mut self, peer: u64) -> Option<SocketAddr> {
        if let Some(a) = self.found.get(&peer) {
            return *a;
        }
        let a = crate::node::peer_socket(self.members, peer).await;
        self.found.insert(peer, a);
        a
    }
}

async fn local_lacks(
    store: &Arc<RocksStore>,
    tenant: &str,
    ids: Vec<ChunkId>,
) -> Result<Vec<ChunkId>, String> {
    let (store, t) = (store.clone(), tenant.to_string());
    tokio::task::spawn_blocking(move || -> Result<Vec<ChunkId>, StoreError> {
        let mut out = Vec::new();
        for id in ids {
            // A page that was a garbage collection candidate: pulled again
            // (with whatever below it is gone).
            if !store.has_settled_chunk(&t, &id)? {
                out.push(id);
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Pulls the missing part of a page tree from peers, depth first: a page is
/// stored only after everything below it, so that what this store holds
/// stays complete below every page (and memory holds one batch per level).
struct Pull<'a> {
    store: &'a Arc<RocksStore>,
    transport: &'a Transport,
    peers: &'a [(u64, SocketAddr)],
    tenant: &'a str,
}

impl Pull<'_> {
    /// Fetches `ids` from the first peer that has them all (verified by the
    /// transport against their names).
    async fn fetch(&self, ids: &[ChunkId]) -> Option<Vec<Vec<u8>>> {
        let raw: Vec<[u8; 32]> = ids.iter().map(|i| i.0).collect();
        for (peer, addr) in self.peers {
            if let Ok(datas) = self.transport.get(*peer, *addr, self.tenant, &raw).await {
                return Some(datas);
            }
        }
        None
    }

    async fn put(&self, items: Vec<(ChunkId, Vec<u8>)>) -> Result<(), String> {
        let (store, t) = (self.store.clone(), self.tenant.to_string());
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let named: Vec<(ChunkId, &[u8])> =
                items.iter().map(|(id, d)| (*id, d.as_slice())).collect();
            store.put_chunks(&t, &named).map(|_| ())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Pulls `ids`, which this store lacks: pages of `level`, or chunks
    /// when `level` is `None`. False when no peer could supply something.
    fn items(
        &self,
        ids: Vec<ChunkId>,
        level: Option<u8>,
    ) -> futures::future::BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move {
            for batch in ids.chunks(REPAIR_BATCH) {
                let Some(datas) = self.fetch(batch).await else {
                    return Ok(false);
                };
                let items: Vec<(ChunkId, Vec<u8>)> = batch.iter().copied().zip(datas).collect();
                if let Some(level) = level {
                    let codec = self.store.codec(self.tenant).map_err(|e| e.to_string())?;
                    for (id, bytes) in &items {
                        let children = Page::open(&codec, id, level, bytes.clone())
                            .map_err(|e| e.to_string())?
                            .children();
                        let lacking = local_lacks(self.store, self.tenant, children).await?;
                        if !self.items(lacking, level.checked_sub(1)).await? {
                            return Ok(false);
                        }
                    }
                }
                self.put(items).await?;
            }
            Ok(true)
        })
    }
}

/// Replaces a snapshot root that is bad here with a good copy from the
/// first of `peers` that has it (checked against its name), durably.
pub async fn repair_root(
    node: &crate::node::Node,
    peers: &[u64],
    tenant: &str,
    id: &SnapshotId,
) -> Result<(), StoreError> {
    let Some(t) = node.transport.get() else {
        return Err(StoreError::Unavailable(
            "no replicas: the chunk transport is not up yet".into(),
        ));
    };
    let members = node.cluster.local(|s| s.members.clone());
    let mut errors = Vec::new();
    for peer in peers {
        let Some(addr) = crate::node::peer_socket(&members, *peer).await else {
            continue;
        };
        match t
            .get_manifest(
                *peer,
                addr,
                tenant,
                &id.0,
                bitclone_proto::DEFAULT_MAX_MESSAGE_BYTES,
            )
            .await
        {
            Ok(bytes) => {
                let (store, tn, sid) = (node.store.clone(), tenant.to_string(), *id);
                tokio::task::spawn_blocking(move || {
                    store.store_manifest_durable(&tn, &sid, &bytes)
                })
                .await
                .unwrap_or(Err(StoreError::Panicked))?;
                node.chunks_repaired.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(snapshot = %id, from = peer, "snapshot root was bad here; repaired from a replica");
                return Ok(());
            }
            Err(e) => errors.push(format!("node {peer}: {e}")),
        }
    }
    Err(StoreError::Unavailable(format!(
        "no replica could supply snapshot root {id}: {}",
        errors.join("; ")
    )))
}
