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

use bitclone_raft::job::{Job, JobState, LeaseHolder, Renewal, Source, Stop};
use bitclone_raft::state::{Command, Fence, NodeInfo, Response, SettingsUpdate};
use bitclone_raft::tls::PeerTls;
use bitclone_raft::{Cluster, ClusterConfig};

use crate::config::{ClusterSettings, NodeConfig, Overrides};
use crate::link::{fenced_error, JobLink, Live};
use crate::node::{classify, Node};
use crate::service::Api;

#[derive(clap::Args)]
pub struct NodeArgs {
    /// Directory for the store, the Raft log and (unless --certs) the certificates.
    #[arg(long, env = "BITCLONE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC address, IP:PORT (port 0: any free port).
    #[arg(long, env = "BITCLONE_LISTEN")]
    listen: Option<String>,
    /// Plain-HTTP address for /metrics, /healthz and /readyz, IP:PORT (port
    /// 0: any free port, written to <data-dir>/http.addr); off when unset.
    #[arg(long)]
    http_listen: Option<String>,
    /// TOML config file (see deploy/bitclone.example.toml).
    #[arg(long, env = "BITCLONE_CONFIG")]
    config: Option<PathBuf>,
    /// Worker threads for chunking, hashing and RocksDB.
    #[arg(long)]
    cpu_threads: Option<usize>,
    /// Clone jobs run at once.
    #[arg(long)]
    job_workers: Option<usize>,
    /// Log format: text, or json (one JSON object per line, with the
    /// request id and job id of the call or job a line belongs to).
    #[arg(long, env = "BITCLONE_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Same as --log-format json (kept for scripts).
    #[arg(long, env = "BITCLONE_LOG_JSON", hide = true)]
    log_json: bool,
    /// This node's id in the cluster (a number ≥ 1, stable for the node; default 1).
    #[arg(long)]
    node_id: Option<u64>,
    /// Mutual-TLS address for Raft, forwarding and QUIC (IP:PORT; default 127.0.0.1:0).
    #[arg(long)]
    peer_listen: Option<String>,
    /// Directory with ca.pem and node-<id>.pem/.key (default <data-dir>/certs,
    /// made on first start by a node that starts its own cluster).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Start a new cluster with this node as its first member (what a node
    /// that is not told to --join does anyway on first start).
    #[arg(long)]
    bootstrap: bool,
    /// Join the cluster through any member's public API address.
    #[arg(long)]
    join: Option<String>,
    /// Export OpenTelemetry traces over OTLP/gRPC to this endpoint
    /// (http://HOST:PORT); off when unset.
    #[arg(long, env = "BITCLONE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of new traces sampled (0..=1; a call from a traced caller
    /// follows its caller's choice).
    #[arg(long, env = "BITCLONE_TRACE_SAMPLE_RATIO", default_value_t = 1.0)]
    trace_sample_ratio: f64,
}

/// Log lines to stderr (text or JSON) and, with an OTLP endpoint, spans to
/// an OpenTelemetry collector; returns the tracer provider to shut down
/// (flushing the last spans) before exit.
fn init_logging(
    json: bool,
    otlp: Option<&str>,
    ratio: f64,
    node_id: u64,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // openraft narrates every election at info; its warnings are what matter.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let provider = otlp
        .map(|endpoint| crate::telemetry::provider(endpoint, ratio, node_id))
        .transpose()?;
    // Spans are exported whatever RUST_LOG keeps in the log: a quiet log
    // must not end traces (nor the trace context passed on to peers).
    let traces = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("bitclone"))
            .with_filter(tracing_subscriber::EnvFilter::new("info,openraft=warn"))
    });
    tracing_subscriber::registry().with(fmt).with(traces).init();
    Ok(provider)
}

pub async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let env = |k: &str| std::env::var(k).ok();
    let config = NodeConfig::load(
        args.config.as_deref(),
        &env,
        Overrides {
            data_dir: args.data_dir,
            listen: args.listen,
            http_listen: args.http_listen,
            cpu_threads: args.cpu_threads,
            job_workers: args.job_workers,
            node_id: args.node_id,
            peer_listen: args.peer_listen,
            certs: args.certs,
            bootstrap: args.bootstrap,
            join: args.join,
        },
    )?;
    let traces = init_logging(
        args.log_json || args.log_format == "json",
        args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()),
        args.trace_sample_ratio,
        config.cluster.node_id,
    )?;
    let r = serve(config).await;
    if let Some(p) = traces {
        // The batch of spans still buffered goes out now.
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
    r
}

async fn serve(config: NodeConfig) -> anyhow::Result<ExitCode> {
    let incoming = TcpIncoming::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?
        .with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (cluster, peer_addr) =
        start_cluster(&config.cluster, &config, addr, stop_rx.clone()).await?;
    let node = Node::open(config.clone(), cluster.clone())?;
    crate::keys::sync_now(&node).await;
    crate::migrate::legacy(&node)
        .await
        .context("moving the previous release's datasets and jobs into the cluster state")?;
    // QUIC on the bound peer address (UDP; the same port number as the TCP
    // peer gRPC service).
    let tls = cluster.tls();
    let t = bitclone_transport::Transport::bind(
        cluster.id,
        peer_addr,
        tls.rustls_server_config()?,
        tls.rustls_client_config()?,
        Arc::new(crate::replica::NodeChunks {
            store: node.store.clone(),
            cluster: cluster.clone(),
            space: node.space.clone(),
        }),
        config.transport.clone(),
    )
    .with_context(|| format!("binding QUIC on {peer_addr}"))?;
    tracing::info!(%peer_addr, "QUIC chunk transport (mutual TLS) up");
    let _ = node.transport.set(t.clone());
    tokio::spawn(crate::replica::repair_loop(
        node.clone(),
        cluster.clone(),
        t,
    ));

    tokio::spawn(crate::keys::sync_loop(node.clone()));
    tokio::spawn(crate::cold::cold_loop(node.clone()));
    tokio::spawn(crate::gc::gc_loop(node.clone()));
    tokio::spawn(crate::gc::retention_loop(node.clone()));
    tokio::spawn(crate::erase::purge_loop(node.clone()));
    tokio::spawn(crate::gc::scrub_loop(node.clone()));
    tokio::spawn(crate::reconcile::schedule_loop(node.clone()));

    let workers: Vec<_> = (0..config.job_workers)
        .map(|_| tokio::spawn(worker(node.clone())))
        .collect();

    let n = node.clone();
    tokio::spawn(async move {
        let reason = wait_for_signal().await;
        tracing::info!(signal = reason, "shutting down: draining requests and jobs");
        n.shut_down();
        let _ = stop_tx.send(true);
    });

    let auth = Arc::new(
        crate::auth::Verifier::new(config.auth.clone())
            .map_err(|e| anyhow::anyhow!("token keys (auth): {e}"))?,
    );
    tokio::spawn(reload_keys(auth.clone(), stop_rx.clone()));
    let audit = Arc::new(
        crate::audit::Audit::open(&config.audit)
            .with_context(|| format!("opening the audit log {:?}", config.audit))?,
    );
    let api = BitCloneServer::new(Api {
        node: node.clone(),
        auth,
        audit,
    })
    .max_decoding_message_size(config.max_message_size)
    .max_encoding_message_size(config.max_message_size);
    let metrics = Arc::new(crate::metrics::Metrics::new(&node));
    // The sinks' requests, into this node's metrics.
    bitclone_storage::sink::requests::set_observer(node.events.sink_requests.clone());
    let http_file = config.data_dir.join("http.addr");
    if let Some(at) = config.http_listen {
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("binding the HTTP listener on {at}"))?;
        let bound = listener.local_addr()?;
        let (n, m, stop) = (node.clone(), metrics.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, n, m, stop).await {
                tracing::error!(error = %e, "the HTTP listener failed");
            }
        });
        write_address(&http_file, bound)?;
        tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz over HTTP");
    }
    // grpc.health.v1 on the API port: serving when ready, as /readyz.
    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(node.clone(), health, stop_rx.clone()));
    let mut builder = Server::builder();
    if let Some((cert, key)) = &config.api.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading the API certificate {}", p.display()))
        };
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("the API's TLS certificate")?;
    } else {
        tracing::warn!(%addr, "serving the API in plain text (api.plaintext): tokens travel in the clear");
    }
    let server = builder
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .layer(crate::metrics::RpcLayer(metrics))
        .add_service(health_service)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));

    // Announce the address only once it serves, for scripts.
    let addr_file = config.data_dir.join("node.addr");
    write_address(&addr_file, addr)?;
    tracing::info!(%addr, node_id = cluster.id, data_dir = %config.data_dir.display(), "serving");
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
    cluster.shutdown().await;
    let _ = std::fs::remove_file(&addr_file);
    let _ = std::fs::remove_file(&http_file);
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// Starts Raft and its mutual-TLS peer server; returns the cluster and the
/// bound peer address. A node whose Raft state is new joins the cluster it
/// is told to join, or else starts one of its own (a node on its own is a
/// cluster of one voter; the first pod of a set starts one when no seed
/// knows one); a node that has Raft state rejoins in the background with
/// its current addresses.
async fn start_cluster(
    c: &ClusterSettings,
    config: &NodeConfig,
    api_addr: std::net::SocketAddr,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<(Arc<Cluster>, std::net::SocketAddr)> {
    bitclone_raft::tls::install_crypto_provider();
    if c.certs_are_default && c.join.is_empty() && !c.certs.join("ca.pem").exists() {
        // Nobody configured certificates: this node starts its own cluster
        // and is its own CA (`bitclone certs dev` makes the same files).
        bitclone_raft::tls::generate_dev(&c.certs, c.node_id).with_context(|| {
            format!("making a CA and node certificate in {}", c.certs.display())
        })?;
        tracing::info!(dir = %c.certs.display(), "made a CA and node certificate for this node's cluster");
    } else if c.certs_are_default && c.certs.join(bitclone_raft::tls::CA_KEY_FILE).exists() {
        // A data dir made before tokens existed: its own CA gets a token key.
        bitclone_raft::tls::generate_token_key(&c.certs, bitclone_raft::tls::DEV_TOKEN_KEY)
            .with_context(|| format!("making a token key in {}", c.certs.display()))?;
    }
    let tls = PeerTls::load(&c.certs, c.node_id).with_context(|| {
        format!(
            "loading node {}'s certificate from {} (a node that joins needs the cluster's CA and its own certificate there: `bitclone certs dev`)",
            c.node_id,
            c.certs.display()
        )
    })?;
    // A node given port 0 keeps the port it got the first time: its peers
    // know it by that address (the Raft membership holds it).
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let saved = config.data_dir.join("peer.addr");
    let mut peer_listen = c.peer_listen;
    if peer_listen.port() == 0 {
        let kept = std::fs::read_to_string(&saved)
            .ok()
            .and_then(|s| s.trim().parse::<std::net::SocketAddr>().ok());
        if let Some(kept) = kept {
            peer_listen.set_port(kept.port());
        }
    }
    let peer_incoming = TcpIncoming::bind(peer_listen)
        .with_context(|| {
            format!("binding the peer address {peer_listen} (set cluster.peer_listen to move it)")
        })?
        .with_nodelay(Some(true));
    let peer_addr = peer_incoming.local_addr()?;
    write_address(&saved, peer_addr)?;
    let cluster = Cluster::start(ClusterConfig {
        id: c.node_id,
        dir: config.data_dir.join("raft"),
        // What the others dial: the advertised names (stable across a
        // pod's restarts) or else the bound addresses.
        info: NodeInfo {
            api_addr: (config.api.advertise.clone()).unwrap_or_else(|| api_addr.to_string()),
            peer_addr: (c.peer_advertise.clone()).unwrap_or_else(|| peer_addr.to_string()),
        },
        tls,
        heartbeat: c.heartbeat,
        election_timeout: c.election_timeout,
        rpc_timeout: std::time::Duration::from_secs(5),
        snapshot_logs: c.snapshot_logs,
        source_ip: c.source_ip(),
    })
    .await?;
    let peer_server = Server::builder()
        .tls_config(cluster.tls().server_config())
        .context("peer TLS")?
        .add_service(cluster.peer_service())
        .serve_with_incoming_shutdown(peer_incoming, stopped(stop_rx.clone()));
    tokio::spawn(async move {
        if let Err(e) = peer_server.await {
            tracing::error!(error = %e, "peer server failed");
        }
    });
    tracing::info!(node_id = c.node_id, %peer_addr, "peer server (mutual TLS) up");
    if cluster.is_initialized().await? {
        if !c.join.is_empty() && !c.forms {
            tracing::info!(
                seeds = ?c.join,
                "this node already belongs to a cluster (it has Raft state); not joining again"
            );
        }
        tokio::spawn(rejoin(cluster.clone(), c.settings.clone(), stop_rx));
    } else if c.forms {
        // Another member may be up with a cluster this node lost (its
        // volume was replaced): ask the other seeds first, and start a
        // cluster only when none of them knows one.
        let own = &cluster.info().api_addr;
        let others: Vec<String> = c.join.iter().filter(|s| *s != own).cloned().collect();
        let mut answered = false;
        let joined = if others.is_empty() {
            Err(anyhow::anyhow!("no other seed"))
        } else {
            join_through(&cluster, &others, config, FORM_WAIT, &mut answered).await
        };
        match joined {
            Ok(()) => settings_applied(&cluster, c).await?,
            Err(e) if is_refusal(&e) => return Err(e),
            // A seed that answers is a member of a cluster: never start a
            // second one beside it (the pod restarts and tries again).
            Err(e) if answered => return Err(e.context(
                "a seed answered but this node could not join its cluster; not starting another",
            )),
            Err(e) => {
                tracing::info!(error = %format!("{e:#}"), "no seed knows a cluster");
                cluster
                    .bootstrap(&c.settings)
                    .await
                    .context("starting a cluster of this node")?;
                tracing::info!(
                    seeds = ?others,
                    "no seed knows a cluster: bootstrapped a new one as the first member of the set"
                );
            }
        }
    } else if !c.join.is_empty() {
        join_through(&cluster, &c.join, config, JOIN_WAIT, &mut false).await?;
        settings_applied(&cluster, c).await?;
    } else {
        cluster
            .bootstrap(&c.settings)
            .await
            .context("starting a cluster of this node")?;
        tracing::info!("bootstrapped a new cluster");
    }
    Ok((cluster, peer_addr))
}

/// How long one seed may take to answer a status call while joining.
const SEED_ANSWER: Duration = Duration::from_secs(3);
/// How long a joining node keeps trying its seeds.
const JOIN_WAIT: Duration = Duration::from_secs(60);
/// How long the first pod of a set asks the other seeds for a cluster
/// before it starts one: the others cannot answer before they joined, so
/// this is what a new set's formation waits.
const FORM_WAIT: Duration = Duration::from_secs(10);

async fn settings_applied(cluster: &Cluster, c: &ClusterSettings) -> anyhow::Result<()> {
    cluster
        .update_settings(&c.settings)
        .await
        .context("applying the configured cluster settings")
}

/// A member answered and refused (not a member's certificate, a node that
/// must be allowed back first): retrying or starting a cluster would not
/// help.
fn is_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<bitclone_raft::Error>()
            .is_some_and(|r| !r.is_retryable())
    })
}

/// Reads the token keys again when their files change (checked every two
/// seconds) or on SIGHUP; a key file that cannot be read leaves the keys in
/// use as they were.
async fn reload_keys(auth: Arc<crate::auth::Verifier>, mut stop: watch::Receiver<bool>) {
    let mut hup = signal(SignalKind::hangup()).ok();
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = hangup => tracing::info!("SIGHUP: reading the token keys again"),
            _ = stop.wait_for(|s| *s) => return,
        }
        match auth.reload_if_changed() {
            Ok(true) => tracing::info!("token keys reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "token keys not reloaded; the previous keys stay in use")
            }
        }
    }
}

/// Writes an address file atomically (readers never see half of it).
/// Keeps the gRPC health service's answer (for the whole server, "", and
/// for the API) in step with readiness, checked every second.
async fn report_health(
    node: Arc<Node>,
    reporter: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let ready = crate::metrics::readiness_of(&node).ready();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in ["", "bitclone.v1.BitClone"] {
                reporter.set_service_status(service, status).await;
            }
            last = Some(ready);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn write_address(path: &std::path::Path, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let tmp = path.with_extension("addr.tmp");
    std::fs::write(&tmp, addr.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// A restarted node records its current addresses and configured settings
/// once a leader answers (it may be behind a partition for a while).
async fn rejoin(cluster: Arc<Cluster>, settings: SettingsUpdate, stop: watch::Receiver<bool>) {
    loop {
        match cluster.rejoin(&settings).await {
            Ok(()) => return,
            Err(e) if !e.is_retryable() => {
                return tracing::error!(error = %e, "recording this node's addresses and settings was refused");
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record this node's addresses yet; retrying")
            }
        }
        if *stop.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Finds the leader through the members' public APIs (any seed that
/// answers) and asks it to admit us, retrying for `wait`.
async fn join_through(
    cluster: &Cluster,
    seeds: &[String],
    config: &NodeConfig,
    wait: Duration,
    answered: &mut bool,
) -> anyhow::Result<()> {
    let plaintext = config.api.tls.is_none();
    let urls: Vec<String> = seeds.iter().map(|seed| config.api.url(seed)).collect();
    let seed = seeds.join(",");
    let seed = seed.as_str();
    // The member's API answers an admin with the leader's peer address.
    let token_file = config.cluster.join_token_file.as_ref().context(
        "joining needs an admin token: set cluster.join_token_file (or BITCLONE_JOIN_TOKEN_FILE)",
    )?;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("reading the join token {}", token_file.display()))?;
    let mut options = bitclone_client::ConnectOptions::new()
        .token(token)
        .allow_plaintext(plaintext);
    if !plaintext {
        let ca = std::fs::read(&config.api.ca)
            .with_context(|| format!("reading api.ca {}", config.api.ca.display()))?;
        options = options.ca_pem(ca);
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        let attempt = async {
            // A member that is starting has bound its API port but does not
            // answer yet: its TCP accepts and its TLS never replies.
            let status = tokio::time::timeout(SEED_ANSWER, async {
                let client = bitclone_client::Client::connect_with(
                    urls.iter().map(String::as_str),
                    options.clone(),
                )
                .await?;
                anyhow::Ok(client.cluster_status().await?)
            })
            .await
            .map_err(|_| anyhow::anyhow!("no seed answered within {SEED_ANSWER:?}"))??;
            *answered = true;
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
            // A refusal (not a member's certificate, say) stays a refusal.
            Err(e) if is_refusal(&e) => {
                return Err(e.context(format!("joining through {seed} was refused")));
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

/// One job worker: takes leases on claimable jobs of the shards this node
/// replicates, runs them under a heartbeat, ends them fenced.
async fn worker(node: Arc<Node>) {
    let cluster = node.cluster.clone();
    while !node.is_shutting_down() {
        // A node that cannot write, or is drained, takes no job another
        // node could run.
        if node.fatal().is_some() || node.is_draining() {
            node.idle(Duration::from_secs(1)).await;
            continue;
        }
        let now = bitclone_raft::cluster::now_ms();
        // With whether each was running (taking it is a takeover) and the
        // trace of the call that submitted it.
        let candidates: Vec<(String, bool, String)> = cluster.local(|s| {
            s.claimable(cluster.id, now)
                .iter()
                .filter(|j| runs_here(s, cluster.id, j))
                .map(|j| {
                    let running = j.state == JobState::Running;
                    (j.id.clone(), running, j.traceparent.clone())
                })
                .collect()
        });
        let mut ran = false;
        for (id, was_running, traceparent) in candidates {
            // The lease runs from the leader's clock when it applies the
            // grant, which is after this: counting from here is safe.
            let asked = std::time::Instant::now();
            let span = tracing::info_span!("acquire_lease", job = %id, takeover = was_running);
            bitclone_raft::context::set_remote_parent(&span, &traceparent);
            // A drain waits for requests in flight: one may still grant a
            // lease after the drain began.
            node.leasing.fetch_add(1, Ordering::AcqRel);
            let r = tracing::Instrument::instrument(
                cluster.write(Command::AcquireLease {
                    job: id.clone(),
                    node: cluster.id,
                }),
                span,
            )
            .await;
            node.leasing.fetch_sub(1, Ordering::AcqRel);
            match r {
                Ok(Response::Lease { token, job }) => {
                    let ev = &node.events;
                    crate::metrics::Events::count(&ev.leases_acquired);
                    if was_running {
                        crate::metrics::Events::count(&ev.lease_takeovers);
                    }
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
            node.idle(Duration::from_millis(200)).await;
        }
    }
}

/// A clone of a stored snapshot runs where the snapshot's data is: on a
/// replica of its shard (they hold it once replicated or repaired), or on
/// the node that wrote it.
fn runs_here(s: &bitclone_raft::state::ClusterState, me: u64, j: &Job) -> bool {
    let Source::Snapshot { dataset, snapshot } = &j.source else {
        return true;
    };
    let Some(head) = s.datasets.get(&j.tenant).and_then(|d| d.get(dataset)) else {
        return true; // unknown dataset: let the attempt fail with a clear error
    };
    let id = match snapshot {
        Some(id) => id.to_hex(),
        None => head.snapshot.clone(),
    };
    match head.history.iter().find(|e| e.id == id) {
        Some(e) => e.written_by == me || s.replicas_of(&j.tenant, dataset).contains(&me),
        None => true,
    }
}

/// Runs a leased job on a log span naming the job and the call that
/// submitted it.
async fn run_leased(
    node: &Arc<Node>,
    cluster: &Arc<Cluster>,
    job: Job,
    token: u64,
    asked: std::time::Instant,
) {
    use tracing::Instrument;
    let span = tracing::info_span!("job", job = %job.id, request_id = %job.request_id);
    bitclone_raft::context::set_remote_parent(&span, &job.traceparent);
    // What the job causes (replication of what it commits) carries the id
    // and continues the trace.
    let id = job.request_id.clone();
    let traceparent = bitclone_raft::context::traceparent_of(&span);
    let run = run_leased_in_span(node, cluster, job, token, asked).instrument(span);
    bitclone_raft::context::scope_traced(id, traceparent, run).await
}

async fn run_leased_in_span(
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
    // At least MIN_LEASE_MS: the state machine validates its settings.
    let lease_ms = cluster.local(|s| s.settings.lease_ms) as u64;
    let hb = tokio::spawn(tracing::Instrument::in_current_span(heartbeat(
        node.clone(),
        cluster.clone(),
        id.clone(),
        fence,
        stop.clone(),
        live.clone(),
        LeaseHolder::new(asked, Duration::from_millis(lease_ms)),
    )));
    let link = JobLink {
        cluster: cluster.clone(),
        fence,
        live: live.clone(),
    };
    let outcome = node.run_job(job, stop.clone(), &link).await;
    hb.abort();
    let cmd = match outcome {
        // Stopping, or unable to write: the job is not at fault; it goes
        // back to Pending at once, for this node later or another now.
        Err(e)
            if node.fatal().is_some()
                || (node.is_leaving() && matches!(e, bitclone_storage::Error::Cancelled)) =>
        {
            Command::ReleaseLease {
                job: id.clone(),
                fence,
            }
        }
        outcome => {
            // Publish the last checkpoint with the outcome's attempt.
            let _ = cluster
                .write(Command::SaveCheckpoint {
                    job: id.clone(),
                    fence,
                    checkpoint: link.checkpoint(),
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
    let released = matches!(cmd, Command::ReleaseLease { .. });
    let seconds = asked.elapsed().as_secs_f64();
    let written = cluster.write(cmd).await;
    let outcome = match &written {
        Ok(Response::Job(_)) if released => Some("released"),
        Ok(Response::Job(j)) => Some(match j.state {
            JobState::Failed => "failed",
            JobState::Pending => "retry",
            JobState::Cancelled => "cancelled",
            _ => "succeeded",
        }),
        // Refused: a newer lease holder fenced this attempt out.
        Ok(_) => Some("fenced"),
        Err(_) => None,
    };
    if let Some(o) = outcome {
        node.events.attempt(o, seconds);
    }
    match written {
        Ok(Response::Job(_)) if released => {
            tracing::info!(job = id, token, "lease released; the job resumes later")
        }
        Ok(Response::Job(j)) => match j.state {
            JobState::Failed => tracing::warn!(
                job = id,
                token,
                attempts = j.attempts,
                error = j.last_error,
                "job failed"
            ),
            JobState::Pending => tracing::info!(
                job = id,
                token,
                attempts = j.attempts,
                error = j.last_error,
                retry_at_ms = j.next_attempt_unix_ms,
                "job will retry"
            ),
            state => tracing::info!(job = id, token, ?state, "attempt recorded"),
        },
        // A refusal is logged by fenced_error.
        Ok(r) => {
            let _ = fenced_error(&id, r);
        }
        Err(e) => {
            tracing::error!(job = id, error = %e, "recording the attempt failed; the lease will lapse")
        }
    }
}

/// Drives the lease holder's rule (`LeaseHolder`): renews the lease while
/// the job runs and publishes its progress; stops the job when the rule says
/// so (lease lost, cancelled, no renewal for a whole lease) and when the
/// node shuts down.
async fn heartbeat(
    node: Arc<Node>,
    cluster: Arc<Cluster>,
    id: String,
    fence: Fence,
    stop: Arc<AtomicBool>,
    live: Arc<std::sync::Mutex<Live>>,
    mut holder: LeaseHolder,
) {
    let stopped = |why: Stop| {
        match why {
            Stop::NoRenewal => tracing::warn!(
                job = id,
                "no lease renewal for a whole lease; stopping the job (it may run elsewhere now)"
            ),
            Stop::LeaseLost => tracing::warn!(job = id, "lease lost; stopping the job"),
        }
        crate::metrics::Events::count(&node.events.leases_lost);
        stop.store(true, Ordering::Release);
    };
    loop {
        tokio::time::sleep(holder.cadence()).await;
        if node.is_leaving() {
            // The attempt winds down and releases its lease; keep renewing
            // until then.
            stop.store(true, Ordering::Release);
        }
        if let Err(why) = holder.check(std::time::Instant::now()) {
            return stopped(why);
        }
        let deadline = tokio::time::Instant::from_std(holder.deadline());
        let sent = std::time::Instant::now();
        // A renewal stuck behind a leaderless cluster must not keep the job
        // running past the lease it may already have lost.
        let r = tokio::select! {
            r = cluster.write(Command::RenewLease {
                job: id.clone(),
                fence,
            }) => r,
            _ = tokio::time::sleep_until(deadline) => return stopped(Stop::NoRenewal),
        };
        let renewal = match r {
            Ok(Response::Job(j)) => Renewal::Renewed {
                cancel_requested: j.cancel_requested,
            },
            Ok(Response::Err(e)) => {
                tracing::warn!(job = id, error = %e, "lease renewal refused");
                Renewal::Refused
            }
            // Not an answer a renewal gets: never taken as one.
            Ok(other) => {
                tracing::warn!(job = id, answer = ?other, "unexpected answer to a lease renewal");
                Renewal::Failed
            }
            Err(e) => {
                tracing::warn!(job = id, error = %e, "lease renewal failed");
                Renewal::Failed
            }
        };
        let ev = &node.events;
        crate::metrics::Events::count(match renewal {
            Renewal::Renewed { .. } => &ev.lease_renewals,
            Renewal::Refused => &ev.lease_renewals_refused,
            Renewal::Failed => &ev.lease_renewals_failed,
        });
        match holder.renewal(sent, renewal) {
            Ok(cancel) => {
                if cancel {
                    stop.store(true, Ordering::Release);
                }
            }
            Err(why) => return stopped(why),
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
            let deadline = tokio::time::Instant::from_std(holder.deadline());
            tokio::select! {
                _ = save => {}
                _ = tokio::time::sleep_until(deadline) => return stopped(Stop::NoRenewal),
            }
        }
    }
}
