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

use bitclone_raft::state::NodeInfo;
use bitclone_raft::tls::PeerTls;
use bitclone_raft::{Cluster, ClusterConfig};

use crate::config::{ClusterSettings, NodeConfig, Overrides};
use crate::jobs::Jobs;
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

    let mut workers = Vec::new();
    for _ in 0..config.job_workers {
        workers.push(tokio::spawn(worker(node.clone())));
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
    })
    .await?;
    let peer_server = Server::builder()
        .tls_config(cluster.server_tls())
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
                    .run_job(claimed.job, claimed.stop)
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
