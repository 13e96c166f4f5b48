//! `bitclone node`: wiring, the job workers, serving and clean shutdown.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bitclone_proto::v1::bit_clone_server::BitCloneServer;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use std::sync::atomic::{AtomicBool, Ordering};

use bitclone_raft::job::Job;
use bitclone_raft::state::{Command, Fence, NodeInfo, Response};
use bitclone_raft::tls::PeerTls;
use bitclone_raft::{Cluster, ClusterConfig};

use crate::config::{ClusterSettings, NodeConfig, Overrides};
use crate::jobs::Jobs;
use crate::link::{fenced_error, JobLink, Live};
use crate::node::{classify, Node};
use crate::service::Api;

#[derive(clap::Args)]
pub struct NodeArgs {
    /// Directory for the store and job records.
    #[arg(long, env = "BITCLONE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC address, IP:PORT (port 0: any free port).
    #[arg(long, env = "BITCLONE_LISTEN")]
    listen: Option<String>,
    /// TOML config file (see deploy/bitclone.example.toml).
    #[arg(long, env = "BITCLONE_CONFIG")]
    config: Option<PathBuf>,
    /// Worker threads for chunking, hashing and RocksDB.
    #[arg(long)]
    cpu_threads: Option<usize>,
    /// Clone jobs run at once.
    #[arg(long)]
    job_workers: Option<usize>,
    /// Log as JSON lines.
    #[arg(long, env = "BITCLONE_LOG_JSON")]
    log_json: bool,
    /// This node's id in the cluster (a number ≥ 1, stable for the node).
    #[arg(long)]
    node_id: Option<u64>,
    /// Mutual-TLS address for Raft and forwarding (IP:PORT); enables cluster mode.
    #[arg(long)]
    peer_listen: Option<String>,
    /// Directory with ca.pem and node-<id>.pem/.key (default <data-dir>/certs).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Start a new cluster with this node as its first member.
    #[arg(long)]
    bootstrap: bool,
    /// Join the cluster through any member's public API address.
    #[arg(long)]
    join: Option<String>,
}

fn init_logging(json: bool) {
    use std::io::IsTerminal;
    // openraft narrates every election at info; its warnings are what matter.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

pub async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    init_logging(args.log_json);
    let env = |k: &str| std::env::var(k).ok();
    let config = NodeConfig::load(
        args.config.as_deref(),
        &env,
        Overrides {
            data_dir: args.data_dir,
            listen: args.listen,
            cpu_threads: args.cpu_threads,
            job_workers: args.job_workers,
            node_id: args.node_id,
            peer_listen: args.peer_listen,
            certs: args.certs,
            bootstrap: args.bootstrap,
            join: args.join,
        },
    )?;
    let incoming = TcpIncoming::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?
        .with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let cluster = match &config.cluster {
        Some(c) => Some(start_cluster(c, &config, addr, stop_rx.clone()).await?),
        None => None,
    };
    let node = Node::open(config.clone(), cluster.clone())?;
    if let Some(c) = &cluster {
        // QUIC on the peer address (UDP; the same port number as the TCP
        // peer gRPC service).
        let peer_addr: std::net::SocketAddr = c
            .info()
            .peer_addr
            .parse()
            .with_context(|| format!("peer address {}", c.info().peer_addr))?;
        let tls = c.tls();
        let t = bitclone_transport::Transport::bind(
            c.id,
            peer_addr,
            tls.rustls_server_config()?,
            tls.rustls_client_config()?,
            Arc::new(crate::replica::NodeChunks {
                store: node.store.clone(),
                cluster: c.clone(),
            }),
            config.transport.clone(),
        )
        .with_context(|| format!("binding QUIC on {peer_addr}"))?;
        tracing::info!(%peer_addr, "QUIC chunk transport (mutual TLS) up");
        let _ = node.transport.set(t.clone());
        tokio::spawn(crate::replica::repair_loop(node.clone(), c.clone(), t));
    }

    let mut workers = Vec::new();
    for _ in 0..config.job_workers {
        workers.push(match &cluster {
            Some(c) => tokio::spawn(cluster_worker(node.clone(), c.clone())),
            None => tokio::spawn(worker(node.clone())),
        });
    }

    let jobs: Arc<Jobs> = node.jobs.clone();
    tokio::spawn(async move {
        let reason = wait_for_signal().await;
        tracing::info!(signal = reason, "shutting down: draining requests and jobs");
        jobs.shut_down();
        let _ = stop_tx.send(true);
    });

    let api = BitCloneServer::new(Api { node: node.clone() })
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);
    let server = Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));

    // Announce the address only once it is bound, atomically, for scripts.
    let addr_file = config.data_dir.join("node.addr");
    let tmp = config.data_dir.join("node.addr.tmp");
    std::fs::write(&tmp, addr.to_string()).context("writing node.addr")?;
    std::fs::rename(&tmp, &addr_file).context("writing node.addr")?;
    tracing::info!(%addr, node_id = node.node_id, data_dir = %config.data_dir.display(), "serving");
    println!("listening on {addr}");

    let grace = config.shutdown_grace;
    tokio::select! {
        r = server => r.context("serving gRPC")?,
        _ = async { stopped(stop_rx).await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over; closing the remaining streams");
        }
    }
    let drain = async {
        for w in workers {
            let _ = w.await;
        }
    };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!("jobs did not stop within the grace period");
    }
    let store = node.store.clone();
    node.pool
        .run(move || store.flush())
        .await
        .context("flushing the store")?;
    if let Some(c) = &cluster {
        c.shutdown().await;
    }
    let _ = std::fs::remove_file(&addr_file);
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// Starts Raft and its mutual-TLS peer server, then bootstraps or joins.
async fn start_cluster(
    c: &ClusterSettings,
    config: &NodeConfig,
    api_addr: std::net::SocketAddr,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<Arc<Cluster>> {
    bitclone_raft::tls::install_crypto_provider();
    let tls = PeerTls::load(&c.certs, c.node_id)?;
    let peer_incoming = TcpIncoming::bind(c.peer_listen)
        .with_context(|| format!("binding the peer address {}", c.peer_listen))?
        .with_nodelay(Some(true));
    let peer_addr = peer_incoming.local_addr()?;
    let cluster = Cluster::start(ClusterConfig {
        id: c.node_id,
        dir: config.data_dir.join("raft"),
        info: NodeInfo {
            api_addr: api_addr.to_string(),
            peer_addr: peer_addr.to_string(),
        },
        tls,
        heartbeat: c.heartbeat,
        election_timeout: c.election_timeout,
        rpc_timeout: std::time::Duration::from_secs(5),
        snapshot_logs: c.snapshot_logs,
    })
    .await?;
    let peer_server = Server::builder()
        .tls_config(cluster.tls().server_config())
        .context("peer TLS")?
        .add_service(cluster.peer_service())
        .serve_with_incoming_shutdown(peer_incoming, stopped(stop_rx));
    tokio::spawn(async move {
        if let Err(e) = peer_server.await {
            tracing::error!(error = %e, "peer server failed");
        }
    });
    tracing::info!(node_id = c.node_id, %peer_addr, "peer server (mutual TLS) up");
    if c.bootstrap {
        cluster
            .bootstrap()
            .await
            .context("bootstrapping the cluster")?;
        tracing::info!("bootstrapped a new cluster");
    } else if let Some(seed) = &c.join {
        join_through(&cluster, seed).await?;
    }
    Ok(cluster)
}

/// Finds the leader through a member's public API and asks it to admit us.
async fn join_through(cluster: &Cluster, seed: &str) -> anyhow::Result<()> {
    let url = if seed.contains("://") {
        seed.to_string()
    } else {
        format!("http://{seed}")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let client = bitclone_client::Client::connect([url.as_str()]).await?;
            let status = client.cluster_status().await?;
            let leader = status
                .members
                .iter()
                .find(|m| m.id == status.leader_id)
                .ok_or_else(|| anyhow::anyhow!("{seed} knows no leader yet"))?;
            cluster.join(leader.id, &leader.peer_addr).await?;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => {
                tracing::info!(seed, "joined the cluster");
                return Ok(());
            }
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::warn!(seed, error = %format!("{e:#}"), "join failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("joining through {seed}"))),
        }
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn wait_for_signal() -> &'static str {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// One job worker: claims due jobs and runs them until shutdown.
async fn worker(node: Arc<Node>) {
    while !node.jobs.is_shutting_down() {
        match node.jobs.claim().await {
            Ok(Ok(claimed)) => {
                let id = claimed.job.id.clone();
                tracing::info!(job = id, attempt = claimed.job.attempts, "job started");
                let outcome = node
                    .run_job(
                        claimed.job,
                        claimed.stop,
                        &JobLink::Local(node.jobs.clone()),
                    )
                    .await
                    .map_err(|e| (e.to_string(), classify(&e)));
                if let Err(e) = node.jobs.finish(&id, outcome).await {
                    tracing::error!(job = id, error = %format!("{e:#}"), "recording the job's outcome failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Ok(Err(wait)) => node.jobs.wait(wait).await,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "claiming a job failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// One job worker in a cluster: takes leases on claimable jobs of the shards
/// this node replicates, runs them under a heartbeat, ends them fenced.
async fn cluster_worker(node: Arc<Node>, cluster: Arc<Cluster>) {
    while !node.jobs.is_shutting_down() {
        let now = bitclone_raft::cluster::now_ms();
        let candidates: Vec<String> = cluster.local(|s| {
            s.claimable(cluster.id, now)
                .iter()
                .filter(|j| runs_here(s, cluster.id, j))
                .map(|j| j.id.clone())
                .collect()
        });
        let mut ran = false;
        for id in candidates {
            // The lease runs from the leader's clock when it applies the
            // grant, which is after this: counting from here is safe.
            let asked = std::time::Instant::now();
            let r = cluster
                .write(Command::AcquireLease {
                    job: id.clone(),
                    node: cluster.id,
                })
                .await;
            match r {
                Ok(Response::Lease { token, job }) => {
                    run_leased(&node, &cluster, job, token, asked).await;
                    ran = true;
                    break;
                }
                // Another node was faster, or the job moved on.
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(job = id, error = %e, "could not take a lease");
                    break;
                }
            }
        }
        if !ran {
            node.jobs.wait(Duration::from_millis(200)).await;
        }
    }
}

/// A clone of a stored snapshot runs where the snapshot's data is: on a
/// replica of its shard (they hold it once replicated or repaired), or on
/// the node that wrote it.
fn runs_here(s: &bitclone_raft::state::ClusterState, me: u64, j: &Job) -> bool {
    let Some(rest) = j.source.strip_prefix("snapshot://") else {
        return true;
    };
    let (dataset, id) = rest.split_once('@').unwrap_or((rest, ""));
    let Some(head) = s.datasets.get(&j.tenant).and_then(|d| d.get(dataset)) else {
        return true; // unknown dataset: let the attempt fail with a clear error
    };
    let id = if id.is_empty() {
        head.snapshot.as_str()
    } else {
        id
    };
    match head.history.iter().find(|e| e.id == id) {
        Some(e) => e.written_by == me || s.replicas_of(&j.tenant, dataset).contains(&me),
        None => true,
    }
}

async fn run_leased(
    node: &Arc<Node>,
    cluster: &Arc<Cluster>,
    job: Job,
    token: u64,
    asked: std::time::Instant,
) {
    let fence = Fence {
        node: cluster.id,
        token,
    };
    let id = job.id.clone();
    tracing::info!(
        job = id,
        token,
        attempt = job.attempts,
        "lease acquired; job started"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(std::sync::Mutex::new(Live {
        checkpoint: job.checkpoint.clone(),
        ..Live::default()
    }));
    let lease_ms = cluster.local(|s| s.settings.lease_ms).max(300) as u64;
    let hb = tokio::spawn(heartbeat(
        node.clone(),
        cluster.clone(),
        id.clone(),
        fence,
        stop.clone(),
        live.clone(),
        (asked, Duration::from_millis(lease_ms)),
    ));
    let link = JobLink::Cluster {
        cluster: cluster.clone(),
        fence,
        live: live.clone(),
    };
    let outcome = node.run_job(job, stop.clone(), &link).await;
    hb.abort();
    let cmd = match outcome {
        Err(bitclone_storage::Error::Cancelled) if node.jobs.is_shutting_down() => {
            Command::ReleaseLease {
                job: id.clone(),
                fence,
            }
        }
        outcome => {
            // Publish the last checkpoint with the outcome's attempt.
            let cp = live
                .lock()
                .map(|l| l.checkpoint.clone())
                .unwrap_or_default();
            let _ = cluster
                .write(Command::SaveCheckpoint {
                    job: id.clone(),
                    fence,
                    checkpoint: cp,
                    progress: None,
                })
                .await;
            Command::FinishAttempt {
                job: id.clone(),
                fence,
                outcome: outcome.map_err(|e| (e.to_string(), classify(&e))),
                jitter: rand::random(),
            }
        }
    };
    match cluster.write(cmd).await {
        Ok(r) => {
            // A refusal is logged by fenced_error.
            if fenced_error(&id, r).is_ok() {
                tracing::info!(job = id, token, "attempt recorded");
            }
        }
        Err(e) => {
            tracing::error!(job = id, error = %e, "recording the attempt failed; the lease will lapse")
        }
    }
}

/// Renews the lease (every third of it) while the job runs and publishes
/// its checkpoint; stops the job when the lease is lost, the job is
/// cancelled or the node stops, and also when no renewal has succeeded for a
/// whole lease: a holder cut off from the cluster (or paused) may already
/// have been replaced, so it stops its own effects without waiting to hear.
async fn heartbeat(
    node: Arc<Node>,
    cluster: Arc<Cluster>,
    id: String,
    fence: Fence,
    stop: Arc<AtomicBool>,
    live: Arc<std::sync::Mutex<Live>>,
    (asked, lease): (std::time::Instant, Duration),
) {
    // A lease (or renewal) runs from when the leader applied it, which is
    // after its request was sent: counting from the send is safe.
    let mut renewed = asked;
    let self_fence = |id: &str| {
        tracing::warn!(
            job = id,
            "no lease renewal for a whole lease; stopping the job (it may run elsewhere now)"
        );
        stop.store(true, Ordering::Release);
    };
    loop {
        tokio::time::sleep(lease / 3).await;
        if node.jobs.is_shutting_down() {
            stop.store(true, Ordering::Release);
        }
        let deadline = tokio::time::Instant::from_std(renewed + lease);
        if tokio::time::Instant::now() >= deadline {
            return self_fence(&id);
        }
        let sent = std::time::Instant::now();
        // A renewal stuck behind a leaderless cluster must not keep the job
        // running past the lease it may already have lost.
        let r = tokio::select! {
            r = cluster.write(Command::RenewLease {
                job: id.clone(),
                fence,
            }) => r,
            _ = tokio::time::sleep_until(deadline) => return self_fence(&id),
        };
        match r {
            Ok(Response::Job(j)) => {
                renewed = sent;
                if j.cancel_requested {
                    stop.store(true, Ordering::Release);
                }
            }
            Ok(Response::Err(e)) => {
                tracing::warn!(job = id, error = %e, "lease lost; stopping the job");
                stop.store(true, Ordering::Release);
                return;
            }
            Ok(_) => renewed = sent,
            Err(e) => tracing::warn!(job = id, error = %e, "lease renewal failed"),
        }
        let publish = {
            let mut l = live.lock().unwrap_or_else(|e| e.into_inner());
            let dirty = std::mem::take(&mut l.dirty);
            dirty.then(|| (l.checkpoint.clone(), l.progress.clone()))
        };
        if let Some((checkpoint, progress)) = publish {
            let save = cluster.write(Command::SaveCheckpoint {
                job: id.clone(),
                fence,
                checkpoint,
                progress: Some(progress),
            });
            let deadline = tokio::time::Instant::from_std(renewed + lease);
            tokio::select! {
                _ = save => {}
                _ = tokio::time::sleep_until(deadline) => return self_fence(&id),
            }
        }
    }
}
