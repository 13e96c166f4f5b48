//! `bitclone certs dev` and `bitclone dev up|down`: local clusters of real
//! node processes on loopback, with mutual TLS from a development CA.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevNode {
    id: u64,
    endpoint: String,
    api_addr: String,
    peer_addr: String,
    /// `/metrics`, `/healthz`, `/readyz` (plain HTTP).
    #[serde(default)]
    http_addr: String,
    pid: u32,
    data_dir: PathBuf,
    log: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct DevCluster {
    nodes: Vec<DevNode>,
}

pub fn certs(out: &Path, nodes: u64, sans: &[String], json_out: bool) -> Result<ExitCode> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if let Some(bad) = sans.iter().find(|n| {
        // `*.NAME`: a wildcard, for every pod of a StatefulSet.
        let n = n.strip_prefix("*.").unwrap_or(n);
        rustls::pki_types::ServerName::try_from(n).is_err() || n.contains('*')
    }) {
        bail!("--san {bad:?} is neither an IP address, a DNS name nor *.DNS-NAME");
    }
    let written = bitclone_raft::tls::generate_dev_with(out, nodes, sans)?;
    if json_out {
        println!("{}", json!({"dir": out, "written": written}));
    } else {
        for f in &written {
            eprintln!("wrote {}", f.display());
        }
        eprintln!(
            "development CA and certificates for node-1..node-{nodes} are in {}",
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `bitclone token issue`: signs a token with `<certs>/token.key`.
pub fn issue_token(
    certs: &Path,
    tenant: &str,
    scopes: &[String],
    ttl: &str,
    subject: &str,
    json_out: bool,
) -> Result<ExitCode> {
    let token = sign_dev_token(certs, tenant, scopes, ttl, subject)?;
    if json_out {
        println!("{}", json!({"token": token}));
    } else {
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}

fn sign_dev_token(
    certs: &Path,
    tenant: &str,
    scopes: &[String],
    ttl: &str,
    subject: &str,
) -> Result<String> {
    use crate::auth::{claims_for, issue, Scope};
    let scopes = scopes
        .iter()
        .map(|s| {
            Scope::parse(s.trim()).with_context(|| format!("no scope {s:?}: read, write or admin"))
        })
        .collect::<Result<Vec<_>>>()?;
    let ttl = humantime::parse_duration(ttl)
        .with_context(|| format!("--ttl {ttl:?} is not a duration like 1h"))?;
    if ttl.is_zero() {
        bail!("--ttl must be more than 0s");
    }
    let name = bitclone_raft::tls::DEV_TOKEN_KEY;
    let key_path = certs.join(format!("{name}.key"));
    let key = std::fs::read(&key_path).with_context(|| {
        format!(
            "reading the token signing key {} (`bitclone certs dev --out {}` makes one)",
            key_path.display(),
            certs.display()
        )
    })?;
    let claims = claims_for(subject, vec![tenant.to_string()], scopes, ttl);
    issue(&key, name, &claims).map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))
}

/// Where `dev up` leaves the admin token of the cluster it starts.
fn admin_token_file(dir: &Path) -> PathBuf {
    dir.join("admin.token")
}

fn ca_file(dir: &Path) -> PathBuf {
    dir.join("certs").join(bitclone_raft::tls::CA_CERT_FILE)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

async fn status(
    endpoint: &str,
    dir: &Path,
) -> Option<bitclone_client::proto::ClusterStatusResponse> {
    let options = bitclone_client::ConnectOptions::new()
        .ca_pem(std::fs::read(ca_file(dir)).ok()?)
        .token(std::fs::read_to_string(admin_token_file(dir)).ok()?);
    let c = bitclone_client::Client::connect_with([endpoint], options)
        .await
        .ok()?;
    c.cluster_status().await.ok()
}

/// Starts node `id` on `api` and `peer` (port 0: the node binds a free port
/// and says which: `node.addr` once it serves, `peer.addr` at start) and
/// waits until it serves (it bootstrapped or joined).
fn spawn_node(
    dir: &Path,
    id: u64,
    (api, peer, http): (&str, &str, &str),
    extra: &[String],
    roots: &str,
    deadline: Instant,
) -> Result<DevNode> {
    let data_dir = dir.join(format!("node-{id}"));
    std::fs::create_dir_all(&data_dir)?;
    let log = dir.join(format!("node-{id}.log"));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the bitclone binary")?;
    let _ = std::fs::remove_file(data_dir.join("node.addr"));
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--listen",
            api,
            "--peer-listen",
            peer,
            "--http-listen",
            http,
            "--node-id",
            &id.to_string(),
        ])
        .arg("--certs")
        .arg(dir.join("certs"))
        .env("BITCLONE_JOIN_TOKEN_FILE", admin_token_file(dir))
        .env("BITCLONE_FILE_ROOTS", roots)
        // A dev cluster is one developer's: its roots are theirs whole.
        .env("BITCLONE_FILE_ROOTS_PER_TENANT", "0")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    // Its own process group: Ctrl-C in this terminal must not stop the cluster.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().context("starting a node")?;
    let pid = child.id();
    let read = |name: &str| {
        std::fs::read_to_string(data_dir.join(name))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let (api_addr, peer_addr, http_addr) = loop {
        if let (Some(a), Some(p), Some(h)) =
            (read("node.addr"), read("peer.addr"), read("http.addr"))
        {
            break (a, p, h);
        }
        if !alive(pid) {
            bail!("node {id} exited; see {}", log.display());
        }
        if Instant::now() > deadline {
            bail!("node {id} did not start in time; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(DevNode {
        id,
        endpoint: format!("https://{api_addr}"),
        api_addr,
        peer_addr,
        http_addr,
        pid,
        data_dir,
        log,
    })
}

async fn wait_ready(dir: &Path, node: &DevNode, voters: usize, deadline: Instant) -> Result<()> {
    loop {
        if !alive(node.pid) {
            bail!("node {} exited; see {}", node.id, node.log.display());
        }
        if let Some(st) = status(&node.endpoint, dir).await {
            let v = st.members.iter().filter(|m| m.voter).count();
            if st.leader_id != 0 && v >= voters {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "node {} not ready in time; see {}",
                node.id,
                node.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn up(
    dir: &Path,
    nodes: u64,
    roots: &[PathBuf],
    config: Option<&Path>,
    json_out: bool,
) -> Result<ExitCode> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    // Every node reads it: the same sinks everywhere, whichever runs a job.
    let config: Vec<String> = match config {
        Some(c) => {
            let c =
                std::fs::canonicalize(c).with_context(|| format!("--config {}", c.display()))?;
            vec!["--config".into(), c.to_string_lossy().into_owned()]
        }
        None => vec![],
    };
    let roots = roots
        .iter()
        .map(|r| {
            std::fs::canonicalize(r)
                .with_context(|| format!("--allow-root {}", r.display()))
                .and_then(|r| {
                    r.to_str()
                        .map(str::to_string)
                        .with_context(|| format!("--allow-root {}: not UTF-8", r.display()))
                })
        })
        .collect::<Result<Vec<_>>>()?
        .join(",");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let previous: Option<DevCluster> = std::fs::read(state_file(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(p) = &previous {
        if let Some(n) = p.nodes.iter().find(|n| alive(n.pid)) {
            bail!(
                "a cluster is already running in {} (node {} pid {}); `bitclone dev down --data-dir {}` first",
                dir.display(),
                n.id,
                n.pid,
                dir.display()
            );
        }
    }
    bitclone_raft::tls::generate_dev(&dir.join("certs"), nodes)?;
    // An admin token for scripts (and for joining nodes), valid for a week.
    let admin = sign_dev_token(
        &dir.join("certs"),
        crate::auth::ALL_TENANTS,
        &["read".into(), "write".into(), "admin".into()],
        "7d",
        "dev-admin",
    )?;
    write_private(&admin_token_file(dir), admin.as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut started = Vec::new();
    // Restarting a stopped cluster reuses its addresses (members know each
    // other by them); new nodes bind free ports themselves.
    let addr_of = |id: u64| -> (String, String, String) {
        let any = "127.0.0.1:0".to_string();
        match previous
            .as_ref()
            .and_then(|p| p.nodes.iter().find(|n| n.id == id))
        {
            Some(n) => (
                n.api_addr.clone(),
                n.peer_addr.clone(),
                Some(n.http_addr.clone())
                    .filter(|h| !h.is_empty())
                    .unwrap_or(any),
            ),
            None => (any.clone(), any.clone(), any),
        }
    };
    let fresh = |id: u64| !dir.join(format!("node-{id}/raft")).exists();
    let (api1, peer1, http1) = addr_of(1);
    let mut first_extra = config.clone();
    if fresh(1) {
        first_extra.push("--bootstrap".to_string());
    }
    let first = spawn_node(
        dir,
        1,
        (&api1, &peer1, &http1),
        &first_extra,
        &roots,
        deadline,
    )?;
    let api1 = first.api_addr.clone();
    wait_ready(dir, &first, 1, deadline).await?;
    started.push(first);
    for id in 2..=nodes {
        let (api, peer, http) = addr_of(id);
        let mut extra = config.clone();
        if fresh(id) {
            extra.extend(["--join".to_string(), api1.clone()]);
        }
        let n = spawn_node(dir, id, (&api, &peer, &http), &extra, &roots, deadline)?;
        // Join one at a time: each membership change completes before the next.
        wait_ready(dir, &n, id as usize, deadline).await?;
        started.push(n);
    }
    let cluster = DevCluster { nodes: started };
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&cluster)?)?;
    std::fs::rename(&tmp, state_file(dir))?;
    if json_out {
        println!(
            "{}",
            json!({
                "ca": ca_file(dir),
                "token_file": admin_token_file(dir),
                "nodes": cluster.nodes.iter().map(|n| json!({
                    "id": n.id, "endpoint": n.endpoint, "pid": n.pid, "peer_addr": n.peer_addr,
                    "http": format!("http://{}", n.http_addr),
                    "data_dir": n.data_dir, "log": n.log,
                })).collect::<Vec<_>>()
            })
        );
    } else {
        for n in &cluster.nodes {
            println!(
                "node {}  {}  pid {}  metrics http://{}/metrics",
                n.id, n.endpoint, n.pid, n.http_addr
            );
        }
        let endpoints: Vec<&str> = cluster.nodes.iter().map(|n| n.endpoint.as_str()).collect();
        eprintln!(
            "ready; export BITCLONE_ENDPOINT={} BITCLONE_CA={} BITCLONE_TOKEN_FILE={}",
            endpoints.join(","),
            ca_file(dir).display(),
            admin_token_file(dir).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a secret file with mode 0600, replacing what was there.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

pub async fn down(dir: &Path, json_out: bool) -> Result<ExitCode> {
    let bytes = std::fs::read(state_file(dir))
        .with_context(|| format!("no dev cluster state in {}", dir.display()))?;
    let cluster: DevCluster = serde_json::from_slice(&bytes).context("reading cluster.json")?;
    let mut stopped = Vec::new();
    for n in cluster.nodes.iter().filter(|n| alive(n.pid)) {
        let _ = Command::new("kill")
            .args(["-TERM", &n.pid.to_string()])
            .status();
        stopped.push(n);
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    for n in &stopped {
        while alive(n.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if alive(n.pid) {
            let _ = Command::new("kill")
                .args(["-KILL", &n.pid.to_string()])
                .status();
        }
    }
    if json_out {
        println!(
            "{}",
            json!({"stopped": stopped.iter().map(|n| n.id).collect::<Vec<_>>()})
        );
    } else {
        eprintln!(
            "stopped {} node(s); data kept in {}",
            stopped.len(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
