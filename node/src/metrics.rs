//! What a node tells Prometheus (`/metrics`) and its probes (`/healthz`,
//! `/readyz`, gRPC health). RPC counts and latencies are kept as calls end
//! ([`RpcLayer`]); everything else is read from the node when scraped
//! ([`NodeCollector`]), so nothing is counted twice and values are never
//! stale. Readiness is a plain function over a snapshot of the node's state
//! ([`readiness`]).
//!
//! Names carry their unit (`_bytes`, `_seconds`); counters get `_total`
//! from the encoder. No metric has a tenant label: the endpoint is the
//! operator's, and tenants' names stay off it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use bitclone_raft::job::JobState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::node::Node;

/// Committed Raft entries a node may not have applied yet and still be
/// ready: more means it is catching up.
pub const MAX_APPLY_LAG: u64 = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

type Histograms = Family<MethodLabels, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// `s3`, `dir` or `catalog`.
    pub kind: &'static str,
    /// `ok` or the error kind.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkRequestLabels {
    /// `s3`, `dir` or `catalog`.
    pub kind: &'static str,
    /// The request (`put`, `get`, `head`, `list`, `delete`, `put_part`,
    /// ...; for a catalog, the step: `connect`, `migrate`, `commit`, ...).
    pub op: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkOpLabels {
    pub kind: &'static str,
    pub op: &'static str,
}

/// Each request sinks make (below whole destination writes), reported by
/// the storage crate's sinks.
pub struct SinkRequests {
    pub count: Family<SinkRequestLabels, Counter>,
    pub seconds: Family<SinkOpLabels, Histogram, fn() -> Histogram>,
    pub bytes: Family<SinkOpLabels, Counter>,
}

impl bitclone_storage::sink::requests::RequestObserver for SinkRequests {
    fn request(&self, kind: &'static str, op: &'static str, ok: bool, seconds: f64, bytes: u64) {
        let outcome = if ok { "ok" } else { "error" };
        self.count
            .get_or_create(&SinkRequestLabels { kind, op, outcome })
            .inc();
        let l = SinkOpLabels { kind, op };
        self.seconds.get_or_create(&l).observe(seconds);
        if bytes > 0 {
            self.bytes.get_or_create(&l).inc_by(bytes);
        }
    }
}

fn latency() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn long_latency() -> Histogram {
    // 10 ms .. ~3 h.
    Histogram::new(exponential_buckets(0.01, 2.0, 21))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The receiving node's id.
    pub peer: String,
}

/// Replication over QUIC: chunk and page puts to each peer, snapshot sends
/// to replicas, and what repair found missing here.
pub struct QuicStats {
    pub bytes: Family<PeerLabels, Counter>,
    pub chunks: Family<PeerLabels, Counter>,
    /// One put (a batch of a few MiB) until the peer stored it.
    pub seconds: Family<PeerLabels, Histogram, fn() -> Histogram>,
    /// Snapshot sends to replicas started here and not ended (a replica
    /// slower than the majority a commit waits for shows here).
    pub sends_in_flight: Gauge,
    /// Snapshot sends to a replica that failed (its repair fetches it).
    pub send_failures: Family<PeerLabels, Counter>,
    /// Snapshots placed on this node that its last repair pass could not
    /// complete: the replication lag as this replica sees it.
    pub missing_snapshots: Gauge,
}

impl QuicStats {
    pub fn send_failed(&self, peer: u64) {
        let l = PeerLabels {
            peer: peer.to_string(),
        };
        self.send_failures.get_or_create(&l).inc();
    }

    pub fn sent(&self, peer: u64, chunks: u64, bytes: u64, seconds: f64) {
        let l = PeerLabels {
            peer: peer.to_string(),
        };
        self.bytes.get_or_create(&l).inc_by(bytes);
        self.chunks.get_or_create(&l).inc_by(chunks);
        self.seconds.get_or_create(&l).observe(seconds);
    }
}

/// Events counted where they happen (job workers, the lease holder, sink
/// writes); the collector and the registry read them.
pub struct Events {
    pub leases_acquired: AtomicU64,
    /// Leases taken on a job whose previous holder's lease had lapsed.
    pub lease_takeovers: AtomicU64,
    pub lease_renewals: AtomicU64,
    pub lease_renewals_refused: AtomicU64,
    pub lease_renewals_failed: AtomicU64,
    /// Attempts this node stopped because its lease was lost or not renewed
    /// for a whole lease.
    pub leases_lost: AtomicU64,
    /// Writes refused because a newer lease holder had fenced this one out.
    pub fenced: AtomicU64,
    /// Attempts ended here, by what they ended as.
    pub attempts: [AtomicU64; ATTEMPT_OUTCOMES.len()],
    /// Duration of each attempt run here.
    pub attempt_seconds: Histogram,
    /// Each destination write of a job, by sink kind and outcome.
    pub sink_seconds: Family<SinkLabels, Histogram, fn() -> Histogram>,
    pub sink_bytes: Family<SinkLabels, Counter>,
    /// Commands this node proposed for clients, until applied.
    pub proposal_seconds: Histogram,
    pub quic: Arc<QuicStats>,
    pub sink_requests: Arc<SinkRequests>,
}

/// What an attempt ended as, for `bitclone_job_attempts_total{outcome}`.
pub const ATTEMPT_OUTCOMES: [&str; 6] = [
    "succeeded",
    "failed",
    "retry",
    "released",
    "cancelled",
    "fenced",
];

impl Default for Events {
    fn default() -> Self {
        Events {
            leases_acquired: AtomicU64::new(0),
            lease_takeovers: AtomicU64::new(0),
            lease_renewals: AtomicU64::new(0),
            lease_renewals_refused: AtomicU64::new(0),
            lease_renewals_failed: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            attempts: Default::default(),
            attempt_seconds: long_latency(),
            sink_seconds: Family::new_with_constructor(long_latency),
            sink_bytes: Family::default(),
            proposal_seconds: latency(),
            quic: Arc::new(QuicStats {
                bytes: Family::default(),
                chunks: Family::default(),
                seconds: Family::new_with_constructor(latency),
                sends_in_flight: Gauge::default(),
                send_failures: Family::default(),
                missing_snapshots: Gauge::default(),
            }),
            sink_requests: Arc::new(SinkRequests {
                count: Family::default(),
                seconds: Family::new_with_constructor(latency),
                bytes: Family::default(),
            }),
        }
    }
}

impl Events {
    pub fn count(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an attempt that ran for `seconds` and ended as `outcome`
    /// (one of [`ATTEMPT_OUTCOMES`]).
    pub fn attempt(&self, outcome: &str, seconds: f64) {
        if let Some(i) = ATTEMPT_OUTCOMES.iter().position(|o| *o == outcome) {
            Self::count(&self.attempts[i]);
        }
        self.attempt_seconds.observe(seconds);
    }
}

/// The node's metrics registry.
pub struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    rpc_seconds: Histograms,
}

impl Metrics {
    /// Registers every metric; `node` is read at each scrape.
    pub fn new(node: &Arc<Node>) -> Metrics {
        let mut m = Metrics::bare(Arc::downgrade(node));
        let e = &node.events;
        m.registry.register(
            "bitclone_job_attempt_duration_seconds",
            "Job attempts run on this node, from lease to outcome",
            e.attempt_seconds.clone(),
        );
        m.registry.register(
            "bitclone_sink_write_duration_seconds",
            "Destination writes of jobs run here, by sink kind and outcome",
            e.sink_seconds.clone(),
        );
        m.registry.register(
            "bitclone_quic_sent_bytes",
            "Chunk and page bytes this node put to each peer over QUIC",
            e.quic.bytes.clone(),
        );
        m.registry.register(
            "bitclone_quic_sent_chunks",
            "Chunks and pages this node put to each peer over QUIC",
            e.quic.chunks.clone(),
        );
        m.registry.register(
            "bitclone_quic_put_duration_seconds",
            "QUIC puts (batches of a few MiB) to each peer, until stored there",
            e.quic.seconds.clone(),
        );
        m.registry.register(
            "bitclone_replication_sends_in_flight",
            "Snapshot sends from this node to replicas not ended yet",
            e.quic.sends_in_flight.clone(),
        );
        m.registry.register(
            "bitclone_replication_send_failures",
            "Snapshot sends from this node to each replica that failed (repair fetches them)",
            e.quic.send_failures.clone(),
        );
        m.registry.register(
            "bitclone_replication_missing_snapshots",
            "Snapshots placed on this node that its last repair pass could not complete",
            e.quic.missing_snapshots.clone(),
        );
        m.registry.register(
            "bitclone_sink_requests",
            "Requests this node made to sinks (S3 and directory object-store calls, catalog steps), by kind, operation and outcome",
            e.sink_requests.count.clone(),
        );
        m.registry.register(
            "bitclone_sink_request_duration_seconds",
            "Duration of each sink request, by kind and operation",
            e.sink_requests.seconds.clone(),
        );
        m.registry.register(
            "bitclone_sink_request_bytes",
            "Payload bytes of sink requests (sent by puts, asked for by gets), by kind and operation",
            e.sink_requests.bytes.clone(),
        );
        m.registry.register(
            "bitclone_raft_proposal_duration_seconds",
            "Client commands (commits, jobs, tenants) this node proposed, until applied",
            e.proposal_seconds.clone(),
        );
        m.registry.register(
            "bitclone_sink_written_bytes",
            "Bytes written to sinks by jobs run here, by sink kind and outcome",
            e.sink_bytes.clone(),
        );
        m
    }

    /// The registry with the API's and the node's own metrics.
    fn bare(node: Weak<Node>) -> Metrics {
        let mut registry = Registry::default();
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register(
            "bitclone_rpc_requests",
            "Public API calls ended, by method and gRPC status code",
            rpcs.clone(),
        );
        let rpc_seconds: Histograms = Family::new_with_constructor(latency);
        registry.register(
            "bitclone_rpc_duration_seconds",
            "Public API call duration, to the end of the response (streams included)",
            rpc_seconds.clone(),
        );
        registry.register_collector(Box::new(NodeCollector { node }));
        Metrics {
            registry,
            rpcs,
            rpc_seconds,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    fn observe(&self, method: &str, code: &str, seconds: f64) {
        self.rpcs
            .get_or_create(&RpcLabels {
                method: method.to_string(),
                code: code.to_string(),
            })
            .inc();
        self.rpc_seconds
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(seconds);
    }
}

/// Why a node is not ready; empty when it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    pub reasons: Vec<String>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// What readiness is decided from.
#[derive(Debug, Clone, Default)]
pub struct ReadinessInput {
    /// Why the store stopped taking writes, if it did.
    pub fatal: Option<String>,
    /// The node is a voter or learner of the cluster.
    pub member: bool,
    pub leader: Option<u64>,
    pub last_log_index: u64,
    /// The commit index this node knows (`None` before its first commit).
    pub commit_index: Option<u64>,
    pub applied_index: u64,
    /// Free bytes on the data dir's file system (`None`: unknown).
    pub disk_free: Option<u64>,
    pub disk_reserve: u64,
    /// The node was drained (`bitclone drain`) and is on its way out.
    pub draining: bool,
}

/// Ready: the store takes writes, the node is a member that sees a leader
/// and has applied close to what it has received, and its disk is above
/// the reserve.
pub fn readiness(i: &ReadinessInput) -> Readiness {
    let mut reasons = Vec::new();
    if let Some(f) = &i.fatal {
        reasons.push(format!("the store takes no writes: {f}"));
    }
    if !i.member {
        reasons.push("not a member of the cluster".to_string());
    }
    if i.draining {
        reasons.push("drained: takes no jobs, until it restarts".to_string());
    }
    if i.leader.is_none() {
        reasons.push("no leader in sight".to_string());
    }
    // Before its first commit is known, what it holds stands in.
    let committed = i.commit_index.unwrap_or(i.last_log_index);
    let lag = committed.saturating_sub(i.applied_index);
    if lag > MAX_APPLY_LAG {
        reasons.push(format!(
            "catching up: {lag} committed log entries not applied yet (at most {MAX_APPLY_LAG})"
        ));
    }
    if let Some(free) = i.disk_free {
        if free < i.disk_reserve {
            reasons.push(format!(
                "disk below its reserve: {} MiB free, {} MiB kept free",
                free >> 20,
                i.disk_reserve >> 20
            ));
        }
    }
    Readiness { reasons }
}

/// The readiness inputs of a running node.
pub fn readiness_of(node: &Node) -> Readiness {
    let st = node.cluster.status();
    readiness(&ReadinessInput {
        fatal: node.fatal(),
        member: st.voters.contains(&st.id) || st.learners.contains(&st.id),
        leader: st.leader,
        last_log_index: st.last_log_index.unwrap_or(0),
        commit_index: st.commit_index,
        applied_index: st.last_applied.unwrap_or(0),
        disk_free: node.space.free(),
        disk_reserve: node.space.reserve,
        draining: node.is_draining(),
    })
}

/// Values read from the node at each scrape.
#[derive(Debug)]
struct NodeCollector {
    node: Weak<Node>,
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// One metric with a value per value of one label.
fn labelled<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, kind)?;
    for (value, v) in values {
        let labels = [(label.to_string(), value.to_string())];
        let m = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(m)?,
            _ => ConstGauge::new(v as i64).encode(m)?,
        }
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Some(node) = self.node.upgrade() else {
            return Ok(());
        };
        let e = &mut e;
        labelled(
            e,
            "bitclone_build_info",
            "The running release",
            MetricType::Gauge,
            "version",
            [(env!("CARGO_PKG_VERSION"), 1)],
        )?;
        gauge(
            e,
            "bitclone_uptime_seconds",
            "Seconds since the node started",
            node.started.elapsed().as_secs_f64(),
        )?;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            e,
            "bitclone_ingested_bytes",
            "File bytes received in puts and job ingests (logical, before dedup)",
            load(&node.bytes_ingested),
        )?;
        counter(
            e,
            "bitclone_served_bytes",
            "File bytes this node read out of its store for clients' downloads",
            load(&node.bytes_served),
        )?;
        counter(
            e,
            "bitclone_stored_bytes",
            "Chunk bytes new to this node's store (after dedup)",
            load(&node.bytes_stored),
        )?;
        counter(
            e,
            "bitclone_stored_page_bytes",
            "Manifest page bytes new to this node's store",
            load(&node.page_bytes_stored),
        )?;
        labelled(
            e,
            "bitclone_replicated_bytes",
            "Bytes sent to replicas over QUIC, by kind",
            MetricType::Counter,
            "kind",
            [
                ("chunk", load(&node.bytes_replicated)),
                ("page", load(&node.page_bytes_replicated)),
            ],
        )?;
        counter(
            e,
            "bitclone_chunks_repaired",
            "Chunks found corrupt or missing on read and replaced from a replica",
            load(&node.chunks_repaired),
        )?;
        let gc = &node.gc;
        labelled(
            e,
            "bitclone_gc_passes",
            "Garbage collection passes of this node's store, by outcome",
            MetricType::Counter,
            "outcome",
            [
                ("ok", load(&gc.passes)),
                ("failed", load(&gc.passes_failed)),
            ],
        )?;
        counter(
            e,
            "bitclone_gc_examined_chunks",
            "Chunks and manifest pages garbage collection examined",
            load(&gc.examined),
        )?;
        counter(
            e,
            "bitclone_gc_freed_chunks",
            "Chunks and manifest pages garbage collection freed",
            load(&gc.freed_chunks),
        )?;
        counter(
            e,
            "bitclone_gc_freed_bytes",
            "Bytes of the chunks and pages garbage collection freed",
            load(&gc.freed_bytes),
        )?;
        counter(
            e,
            "bitclone_gc_freed_snapshot_roots",
            "Snapshot roots garbage collection freed",
            load(&gc.roots_freed),
        )?;
        let iload = |a: &std::sync::atomic::AtomicI64| a.load(Ordering::Relaxed) as f64;
        gauge(
            e,
            "bitclone_gc_waiting_chunks",
            "Unreachable chunks and pages waiting out the grace period (last pass)",
            iload(&gc.waiting_chunks),
        )?;
        gauge(
            e,
            "bitclone_gc_waiting_bytes",
            "Bytes of the unreachable chunks and pages waiting out the grace period",
            iload(&gc.waiting_bytes),
        )?;
        gauge(
            e,
            "bitclone_gc_last_pass_seconds",
            "Length of the last garbage collection pass",
            iload(&gc.last_pass_ms) / 1000.0,
        )?;
        counter(
            e,
            "bitclone_snapshots_expired",
            "Snapshots deleted by retention passes this node led",
            load(&gc.snapshots_expired),
        )?;
        let cs = &node.cold_stats;
        for (name, help, v) in [
            (
                "bitclone_cold_packs_written",
                "Packs this node wrote to the cold tier",
                &cs.packs_written,
            ),
            (
                "bitclone_cold_chunks_moved",
                "Chunks this node packed into the cold tier",
                &cs.chunks_moved,
            ),
            (
                "bitclone_cold_bytes_moved",
                "Bytes of chunks this node packed into the cold tier",
                &cs.bytes_moved,
            ),
            (
                "bitclone_cold_chunks_evicted",
                "Local copies this node dropped for chunks in checked cold packs",
                &cs.chunks_evicted,
            ),
            (
                "bitclone_cold_pack_failures",
                "Listed cold packs that could not be read or failed their check here",
                &cs.pack_failures,
            ),
        ] {
            counter(e, name, help, load(v))?;
        }
        // Served without a cold tier too (zero): alerts use them.
        let cold = |f: fn(&bitclone_storage::cold::ColdBucket) -> &std::sync::atomic::AtomicU64| {
            node.cold.as_deref().map_or(0, |b| load(f(b)))
        };
        counter(
            e,
            "bitclone_cold_reads",
            "Evicted chunks read back from the cold tier",
            cold(|b| &b.reads),
        )?;
        counter(
            e,
            "bitclone_cold_read_bytes",
            "Bytes of evicted chunks read back from the cold tier",
            cold(|b| &b.read_bytes),
        )?;
        counter(
            e,
            "bitclone_cold_read_errors",
            "Reads from the cold tier that failed",
            cold(|b| &b.read_errors),
        )?;
        let sc = &node.scrub;
        counter(
            e,
            "bitclone_scrub_passes",
            "Scrub passes of this node's store",
            load(&sc.passes),
        )?;
        counter(
            e,
            "bitclone_scrub_checked_chunks",
            "Chunks and pages scrubs read and checked against their names",
            load(&sc.chunks),
        )?;
        counter(
            e,
            "bitclone_scrub_checked_bytes",
            "Bytes scrubs read and checked",
            load(&sc.bytes),
        )?;
        counter(
            e,
            "bitclone_scrub_bad",
            "Bad or missing chunks and roots scrubs found",
            load(&sc.bad),
        )?;
        counter(
            e,
            "bitclone_scrub_repaired",
            "Bad or missing chunks and roots scrubs replaced from other members",
            load(&sc.repaired),
        )?;
        gauge(
            e,
            "bitclone_scrub_unrepaired",
            "Bad chunks and roots the last scrub could not replace",
            iload(&sc.unrepaired),
        )?;
        gauge(
            e,
            "bitclone_scrub_last_pass_seconds",
            "Length of the last scrub pass",
            iload(&sc.last_pass_ms) / 1000.0,
        )?;
        counter(
            e,
            "bitclone_reconcile_checked",
            "Destinations reconcile jobs compared with their snapshot here",
            load(&sc.reconciled),
        )?;
        counter(
            e,
            "bitclone_reconcile_drifted",
            "Objects (or catalogs) reconcile jobs found drifted from their snapshot",
            load(&sc.drifted),
        )?;
        counter(
            e,
            "bitclone_reconcile_repairs",
            "Destinations reconcile jobs wrote out again to mend drift",
            load(&sc.reconcile_repairs),
        )?;
        let ev = &node.events;
        counter(
            e,
            "bitclone_leases_acquired",
            "Job leases this node took",
            load(&ev.leases_acquired),
        )?;
        counter(
            e,
            "bitclone_lease_takeovers",
            "Job leases this node took over from a holder whose lease had lapsed",
            load(&ev.lease_takeovers),
        )?;
        labelled(
            e,
            "bitclone_lease_renewals",
            "Lease renewals this node sent, by outcome",
            MetricType::Counter,
            "outcome",
            [
                ("renewed", load(&ev.lease_renewals)),
                ("refused", load(&ev.lease_renewals_refused)),
                ("failed", load(&ev.lease_renewals_failed)),
            ],
        )?;
        counter(
            e,
            "bitclone_leases_lost",
            "Attempts stopped here because the lease was lost or went unrenewed for a whole lease",
            load(&ev.leases_lost),
        )?;
        counter(
            e,
            "bitclone_fenced_writes",
            "Writes of this node refused because a newer lease holder fenced it out",
            load(&ev.fenced),
        )?;
        labelled(
            e,
            "bitclone_job_attempts",
            "Job attempts run here, by how they ended",
            MetricType::Counter,
            "outcome",
            ATTEMPT_OUTCOMES
                .iter()
                .copied()
                .zip(ev.attempts.iter().map(load)),
        )?;
        if let Some(t) = node.transport.get() {
            let received = t.received();
            let peers: Vec<String> = received.iter().map(|(p, _)| p.to_string()).collect();
            labelled(
                e,
                "bitclone_quic_received_bytes",
                "Chunk, page and manifest bytes this node received from each peer over QUIC (sent to it or fetched)",
                MetricType::Counter,
                "peer",
                peers.iter().map(|p| p.as_str()).zip(received.iter().map(|(_, t)| t.bytes)),
            )?;
            labelled(
                e,
                "bitclone_quic_received_chunks",
                "Chunks, pages and manifests this node received from each peer over QUIC",
                MetricType::Counter,
                "peer",
                peers
                    .iter()
                    .map(|p| p.as_str())
                    .zip(received.iter().map(|(_, t)| t.items)),
            )?;
        }
        if let Ok(s) = node.store.stats() {
            gauge(
                e,
                "bitclone_store_chunks",
                "Chunks in the store (RocksDB's estimate)",
                s.chunks as f64,
            )?;
            gauge(
                e,
                "bitclone_store_bytes",
                "Bytes of chunk data in the store's files",
                s.chunk_bytes as f64,
            )?;
            labelled(
                e,
                "bitclone_store_family_keys",
                "Keys in each RocksDB column family of the store (RocksDB's estimate)",
                MetricType::Gauge,
                "family",
                s.families.iter().map(|f| (f.name, f.keys)),
            )?;
            labelled(
                e,
                "bitclone_store_family_bytes",
                "Bytes of each RocksDB column family's live SST and blob files",
                MetricType::Gauge,
                "family",
                s.families.iter().map(|f| (f.name, f.bytes)),
            )?;
        }
        let st = node.cluster.status();
        gauge(e, "bitclone_raft_term", "Current Raft term", st.term as f64)?;
        gauge(
            e,
            "bitclone_raft_leader_id",
            "The leader this node sees (0: none)",
            st.leader.unwrap_or(0) as f64,
        )?;
        gauge(
            e,
            "bitclone_raft_is_leader",
            "1 when this node is the leader",
            if st.leader == Some(st.id) { 1.0 } else { 0.0 },
        )?;
        gauge(
            e,
            "bitclone_raft_last_log_index",
            "Index of the last Raft entry this node holds",
            st.last_log_index.unwrap_or(0) as f64,
        )?;
        gauge(
            e,
            "bitclone_raft_commit_index",
            "Index of the last Raft entry this node knows committed",
            st.commit_index.unwrap_or(0) as f64,
        )?;
        gauge(
            e,
            "bitclone_raft_applied_index",
            "Index of the last Raft entry applied to this node's state machine",
            st.last_applied.unwrap_or(0) as f64,
        )?;
        counter(
            e,
            "bitclone_raft_leader_changes",
            "Times the leader this node sees changed since it started",
            node.cluster.leader_changes(),
        )?;
        gauge(
            e,
            "bitclone_raft_voters",
            "Voters in the membership this node has applied",
            st.voters.len() as f64,
        )?;
        let protocols = node.cluster.peer_protocols();
        let peers: Vec<String> = protocols.iter().map(|(p, _)| p.to_string()).collect();
        labelled(
            e,
            "bitclone_peer_protocol",
            "The peer protocol version spoken with each peer heard from (the newest both speak)",
            MetricType::Gauge,
            "peer",
            peers
                .iter()
                .map(|p| p.as_str())
                .zip(protocols.iter().map(|(_, v)| u64::from(*v))),
        )?;
        let (jobs, under) = node.cluster.local(|s| {
            let mut by = [0u64; 5];
            for j in s.jobs.values() {
                by[job_state_index(&j.state)] += 1;
            }
            (by, s.under_replicated_shards())
        });
        gauge(
            e,
            "bitclone_under_replicated_shards",
            "Shards not yet on as many members as they should be (short, or a layout change under way)",
            under as f64,
        )?;
        labelled(
            e,
            "bitclone_jobs",
            "Clone jobs in the cluster state, by state",
            MetricType::Gauge,
            "state",
            JOB_STATES.iter().copied().zip(jobs),
        )?;
        if let Some(free) = node.space.free() {
            gauge(
                e,
                "bitclone_disk_free_bytes",
                "Free bytes on the fullest file system the node writes to (data dir, db/, raft/)",
                free as f64,
            )?;
        }
        gauge(
            e,
            "bitclone_disk_reserve_bytes",
            "Free bytes the node keeps on the data dir's file system",
            node.space.reserve as f64,
        )?;
        gauge(
            e,
            "bitclone_store_fatal",
            "1 when the store stopped taking writes (see the log and /readyz)",
            if node.fatal().is_some() { 1.0 } else { 0.0 },
        )?;
        gauge(
            e,
            "bitclone_ready",
            "1 when the node is ready (the conditions of /readyz hold)",
            if readiness_of(&node).ready() {
                1.0
            } else {
                0.0
            },
        )?;
        Ok(())
    }
}

const JOB_STATES: [&str; 5] = ["pending", "running", "succeeded", "failed", "cancelled"];

fn job_state_index(s: &JobState) -> usize {
    match s {
        JobState::Pending => 0,
        JobState::Running => 1,
        JobState::Succeeded => 2,
        JobState::Failed => 3,
        JobState::Cancelled => 4,
    }
}

/// A tower layer on the public API: each call's method and gRPC status
/// code, and its duration to the end of the response body (so a stream is
/// timed whole).
#[derive(Clone)]
pub struct RpcLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// `/bitclone.v1.BitClone/Upload` → `Upload`; a health check →
/// `health.Check`; anything else (an unknown path anyone may send, before
/// authentication) → `other`, so that callers cannot mint label values.
/// `None` for the long-lived health `Watch` streams, which are not timed.
fn method_of(path: &str) -> Option<String> {
    let plain =
        |m: &str| !m.is_empty() && m.len() <= 32 && m.chars().all(|c| c.is_ascii_alphanumeric());
    if let Some(m) = path.strip_prefix("/bitclone.v1.BitClone/") {
        return Some(if plain(m) {
            m.to_string()
        } else {
            "other".into()
        });
    }
    match path {
        "/grpc.health.v1.Health/Check" => Some("health.Check".into()),
        "/grpc.health.v1.Health/Watch" => None,
        _ => Some("other".into()),
    }
}

/// The gRPC status code name of a numeric code.
fn code_name(code: &str) -> String {
    let n: i32 = code.trim().parse().unwrap_or(2);
    format!("{:?}", tonic::Code::from_i32(n))
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: http_body::Body + Unpin + Send + 'static,
{
    type Response = http::Response<Observed<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let timed = method_of(req.uri().path());
        let method = timed.clone().unwrap_or_else(|| "health.Watch".into());
        let metrics = self.metrics.clone();
        let start = Instant::now();
        // The call's correlation id: the client's, or a new one, so that
        // the handler, the audit log and what the call causes share it.
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .and_then(bitclone_raft::context::accepted)
            .map(str::to_string)
            .unwrap_or_else(bitclone_raft::context::fresh);
        if let Ok(v) = http::HeaderValue::from_str(&id) {
            req.headers_mut().insert("x-request-id", v);
        }
        let span = tracing::info_span!("rpc", method = %method, request_id = %id);
        // A traced caller's span is the parent; what this call causes on
        // other nodes continues this span's trace.
        if let Some(tp) = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
        {
            bitclone_raft::context::set_remote_parent(&span, tp);
        }
        let traceparent = bitclone_raft::context::traceparent_of(&span);
        let fut = bitclone_raft::context::scope_traced(id, traceparent, self.inner.call(req))
            .instrument(span);
        // Recorded as Cancelled if the call is dropped before it answers
        // (a client deadline or reset while a streamed upload is read).
        let mut pending = timed.map(|method| Pending {
            metrics,
            method,
            start,
        });
        Box::pin(async move {
            let mut guard = Guard(pending.take());
            let resp = fut.await?;
            let pending = guard.0.take();
            // A trailers-only response (an error before any message) has
            // its status in the headers; otherwise it comes in the trailers.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(code_name);
            let pending = match (code, pending) {
                (Some(code), Some(p)) => {
                    p.done(&code);
                    None
                }
                (_, p) => p,
            };
            Ok(resp.map(|body| Observed { body, pending }))
        })
    }
}

struct Pending {
    metrics: Arc<Metrics>,
    method: String,
    start: Instant,
}

/// Records a call that never answered.
struct Guard(Option<Pending>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.done("Cancelled");
        }
    }
}

impl Pending {
    fn done(self, code: &str) {
        self.metrics
            .observe(&self.method, code, self.start.elapsed().as_secs_f64());
    }
}

/// A response body that records its call when the trailers pass (or, when
/// it is dropped first, as cancelled).
pub struct Observed<B> {
    body: B,
    pending: Option<Pending>,
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.done("Cancelled");
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Observed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    let code = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map_or_else(|| "Ok".to_string(), code_name);
                    if let Some(p) = this.pending.take() {
                        p.done(&code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.take() {
                    p.done("Unknown");
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.done("Ok");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_input() -> ReadinessInput {
        ReadinessInput {
            fatal: None,
            member: true,
            leader: Some(1),
            last_log_index: 120,
            commit_index: Some(100),
            applied_index: 100,
            disk_free: Some(10 << 30),
            disk_reserve: 1 << 30,
            draining: false,
        }
    }

    #[test]
    fn ready_only_when_every_condition_holds_and_says_which_failed() {
        assert!(readiness(&ok_input()).ready());
        type Change = fn(&mut ReadinessInput);
        let cases: [(&str, Change); 6] = [
            ("store takes no writes", |i| {
                i.fatal = Some("disk full".into())
            }),
            ("not a member", |i| i.member = false),
            ("no leader", |i| i.leader = None),
            ("catching up", |i| i.commit_index = Some(5000)),
            ("disk below its reserve", |i| i.disk_free = Some(5)),
            ("drained", |i| i.draining = true),
        ];
        for (why, change) in cases {
            let mut i = ok_input();
            change(&mut i);
            let r = readiness(&i);
            assert_eq!(r.reasons.len(), 1, "{r:?}");
            assert!(r.reasons[0].contains(why), "{r:?}");
        }
        // Entries received but not committed are not lag; before any
        // commit is known, received ones count.
        let mut i = ok_input();
        i.last_log_index = 5000;
        assert!(readiness(&i).ready());
        i.commit_index = None;
        assert!(readiness(&i).reasons[0].contains("catching up"));
        // An unknown disk does not make a node unready by itself.
        let mut i = ok_input();
        i.disk_free = None;
        assert!(readiness(&i).ready());
    }

    #[test]
    fn methods_and_codes_read_as_operators_expect() {
        assert_eq!(
            method_of("/bitclone.v1.BitClone/Upload").as_deref(),
            Some("Upload")
        );
        assert_eq!(method_of("/x/made-up-1").as_deref(), Some("other"));
        assert_eq!(
            method_of("/bitclone.v1.BitClone/a-b/../c").as_deref(),
            Some("other")
        );
        assert_eq!(method_of("/grpc.health.v1.Health/Watch"), None);
        assert_eq!(code_name("0"), "Ok");
        assert_eq!(code_name("5"), "NotFound");
        assert_eq!(code_name("16"), "Unauthenticated");
        assert_eq!(code_name("x"), "Unknown");
    }

    #[test]
    fn rpc_metrics_encode_in_the_prometheus_text_format() {
        let m = Metrics::bare(Weak::new());
        m.observe("Put", "Ok", 0.2);
        m.observe("Put", "Ok", 0.3);
        m.observe("Get", "NotFound", 0.01);
        let text = m.encode();
        assert!(
            text.contains("# TYPE bitclone_rpc_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains(r#"bitclone_rpc_requests_total{method="Put",code="Ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"bitclone_rpc_duration_seconds_count{method="Get"} 1"#),
            "{text}"
        );
    }
}
