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
    pid: u32,
    data_dir: PathBuf,
    log: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct DevCluster {
    nodes: Vec<DevNode>,
}

pub fn certs(out: &Path, nodes: u64, json_out: bool) -> Result<ExitCode> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let written = bitclone_raft::tls::generate_dev(out, nodes)?;
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

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

async fn status(endpoint: &str) -> Option<bitclone_client::proto::ClusterStatusResponse> {
    let c = bitclone_client::Client::connect([endpoint]).await.ok()?;
    c.cluster_status().await.ok()
}

/// Starts node `id` on `api` and `peer` (port 0: the node binds a free port
/// and says which: `node.addr` once it serves, `peer.addr` at start) and
/// waits until it serves (it bootstrapped or joined).
fn spawn_node(
    dir: &Path,
    id: u64,
    api: &str,
    peer: &str,
    extra: &[String],
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
            "--node-id",
            &id.to_string(),
        ])
        .arg("--certs")
        .arg(dir.join("certs"))
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
    let (api_addr, peer_addr) = loop {
        if let (Some(a), Some(p)) = (read("node.addr"), read("peer.addr")) {
            break (a, p);
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
        endpoint: format!("http://{api_addr}"),
        api_addr,
        peer_addr,
        pid,
        data_dir,
        log,
    })
}

async fn wait_ready(node: &DevNode, voters: usize, deadline: Instant) -> Result<()> {
    loop {
        if !alive(node.pid) {
            bail!("node {} exited; see {}", node.id, node.log.display());
        }
        if let Some(st) = status(&node.endpoint).await {
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

pub async fn up(dir: &Path, nodes: u64, json_out: bool) -> Result<ExitCode> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
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
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut started = Vec::new();
    // Restarting a stopped cluster reuses its addresses (members know each
    // other by them); new nodes bind free ports themselves.
    let addr_of = |id: u64| -> Result<(String, String)> {
        if let Some(n) = previous
            .as_ref()
            .and_then(|p| p.nodes.iter().find(|n| n.id == id))
        {
            return Ok((n.api_addr.clone(), n.peer_addr.clone()));
        }
        Ok(("127.0.0.1:0".into(), "127.0.0.1:0".into()))
    };
    let fresh = |id: u64| !dir.join(format!("node-{id}/raft")).exists();
    let (api1, peer1) = addr_of(1)?;
    let first_extra = if fresh(1) {
        vec!["--bootstrap".to_string()]
    } else {
        vec![]
    };
    let first = spawn_node(dir, 1, &api1, &peer1, &first_extra, deadline)?;
    let api1 = first.api_addr.clone();
    wait_ready(&first, 1, deadline).await?;
    started.push(first);
    for id in 2..=nodes {
        let (api, peer) = addr_of(id)?;
        let extra = if fresh(id) {
            vec!["--join".to_string(), api1.clone()]
        } else {
            vec![]
        };
        let n = spawn_node(dir, id, &api, &peer, &extra, deadline)?;
        // Join one at a time: each membership change completes before the next.
        wait_ready(&n, id as usize, deadline).await?;
        started.push(n);
    }
    let cluster = DevCluster { nodes: started };
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&cluster)?)?;
    std::fs::rename(&tmp, state_file(dir))?;
    if json_out {
        println!(
            "{}",
            json!({"nodes": cluster.nodes.iter().map(|n| json!({
                "id": n.id, "endpoint": n.endpoint, "pid": n.pid, "peer_addr": n.peer_addr,
                "data_dir": n.data_dir, "log": n.log,
            })).collect::<Vec<_>>()})
        );
    } else {
        for n in &cluster.nodes {
            println!("node {}  {}  pid {}", n.id, n.endpoint, n.pid);
        }
        let endpoints: Vec<&str> = cluster.nodes.iter().map(|n| n.endpoint.as_str()).collect();
        eprintln!("ready; export BITCLONE_ENDPOINT={}", endpoints.join(","));
    }
    Ok(ExitCode::SUCCESS)
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
