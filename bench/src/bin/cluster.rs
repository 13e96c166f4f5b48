//! `bitclone-bench-cluster`: failover and Raft throughput of a 3-node
//! cluster of real `bitclone` processes on loopback.
//!
//! Measures (one JSON object on stdout, progress on stderr):
//! - Raft write throughput: clone-job submissions per second, 32 in flight;
//! - leader failover: SIGKILL the leader, time until the first successful
//!   write through a survivor (median of `--rounds`), then restart it;
//! - lease takeover: SIGKILL the node holding a running job's lease, time
//!   until another node holds it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitclone_chaos::TestCluster;
use bitclone_client::Client;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "bitclone-bench-cluster",
    about = "Failover and Raft write throughput of a 3-node cluster"
)]
struct Args {
    /// Path to the `bitclone` binary.
    #[arg(long, env = "BITCLONE_BIN")]
    bitclone: PathBuf,
    /// Leader-kill rounds (the median is reported).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Lease-takeover rounds.
    #[arg(long, default_value_t = 3)]
    lease_rounds: usize,
    /// Job submissions for the throughput figure.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Size of the cold put with R = 3 (bytes, or with KiB/MiB/GiB); 0 skips it.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    put_size: u64,
    /// Work directory (default: a new one under the temp dir; removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
}

/// Holds each destination write back so that a job is running when its
/// holder is killed (the node's opt-in test hook).
const SLOW_SINK_MS: &str = "3000";

/// Pause after a restarted member has caught up, before the next round.
const STEADY: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Member {
    id: u64,
    endpoint: String,
    pid: u32,
}

fn log(msg: &str) {
    eprintln!("bench-cluster: {msg}");
}

fn kill(sig: &str, pid: u32) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// The cluster (the test harness's, so nodes start, bind ports and restart
/// the one way tests do) and the bench's work dir.
struct Bench {
    bin: PathBuf,
    dir: PathBuf,
    cluster: TestCluster,
}

impl Bench {
    fn members(&self) -> Vec<Member> {
        self.cluster
            .nodes
            .iter()
            .map(|(id, n)| Member {
                id: *id,
                endpoint: n.endpoint.clone(),
                pid: n.pid(),
            })
            .collect()
    }

    /// Restarts a killed member on its ports.
    fn restart(&mut self, id: u64) {
        self.cluster.start_node(id, &[]);
    }

    fn member(&self, id: u64) -> Result<Member> {
        self.members()
            .into_iter()
            .find(|m| m.id == id)
            .context("unknown member")
    }
}

/// The cluster's CA and the harness's admin token, set once it started.
static ACCESS: std::sync::OnceLock<bitclone_client::ConnectOptions> = std::sync::OnceLock::new();

fn access() -> bitclone_client::ConnectOptions {
    ACCESS.get().cloned().unwrap_or_default()
}

async fn connect(endpoint: &str) -> Result<Client> {
    Ok(Client::connect_with([endpoint], access()).await?)
}

/// The leader every member agrees on (and which says it leads), once every
/// member is a voter and caught up: a restarted node may still believe in
/// an old leader for a moment.
async fn settled_leader(members: &[Member], timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut views = Vec::new();
        for m in members {
            let st = match connect(&m.endpoint).await {
                Ok(c) => c.cluster_status().await.ok(),
                Err(_) => None,
            };
            views.push(st);
        }
        let agreed = views.iter().all(|v| {
            v.as_ref().is_some_and(|s| {
                s.leader_id != 0
                    && s.leader_id == views[0].as_ref().map(|f| f.leader_id).unwrap_or(0)
                    && s.members.iter().filter(|m| m.voter).count() == members.len()
            })
        });
        if agreed {
            let leader = views[0].as_ref().map(|s| s.leader_id).unwrap_or(0);
            let leads = members.iter().zip(&views).any(|(m, v)| {
                m.id == leader && v.as_ref().is_some_and(|s| s.raft_state == "Leader")
            });
            if leads {
                return Ok(leader);
            }
        }
        if Instant::now() > deadline {
            bail!("cluster did not settle");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}")),
    };
    Ok(n * mult)
}

fn sync() -> Result<()> {
    Command::new("sync").status()?;
    Ok(())
}

/// Cold put of `size` bytes through node 1 with R = 3, against three
/// `cp -r` + `sync` of the same tree (all three replicas share this disk).
async fn cold_put(b: &Bench, size: u64) -> Result<Value> {
    use rand::{RngCore, SeedableRng};
    let src = b.dir.join("put-src");
    std::fs::create_dir_all(&src)?;
    let files = 256u64;
    let per = size / files;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut buf = vec![0u8; per as usize];
    for i in 0..files {
        rng.fill_bytes(&mut buf);
        std::fs::write(src.join(format!("f{i:04}")), &buf)?;
    }
    let bytes = per * files;
    sync()?;
    let t = Instant::now();
    for k in 0..3 {
        let status = Command::new("cp")
            .arg("-r")
            .arg(&src)
            .arg(b.dir.join(format!("cp{k}")))
            .status()?;
        if !status.success() {
            bail!("cp -r failed");
        }
    }
    sync()?;
    let cp3 = t.elapsed().as_secs_f64();
    for k in 0..3 {
        std::fs::remove_dir_all(b.dir.join(format!("cp{k}")))?;
    }
    sync()?;
    let node1 = b.member(1)?;
    let client = connect(&node1.endpoint).await?;
    let before = client.stats().await?.bytes_replicated;
    let t = Instant::now();
    let out = Command::new(&b.bin)
        .envs(b.cluster.node(1).client_env())
        .args(["--endpoint", &node1.endpoint, "--json", "put"])
        .arg(&src)
        .args(["--dataset", "coldput"])
        .output()?;
    if !out.status.success() {
        bail!("put failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let acked = t.elapsed().as_secs_f64();
    // The put returns once a majority holds it; wait for the third replica.
    while client.stats().await?.bytes_replicated < before + 2 * bytes {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the third replica never caught up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all3 = t.elapsed().as_secs_f64();
    let limit = 3.0 * bytes as f64 / cp3;
    log(&format!(
        "cold put {bytes} bytes, R=3: acked after {acked:.2} s, on all replicas after {all3:.2} s; three cp -r + sync {cp3:.2} s; ratio {:.2}",
        (3.0 * bytes as f64 / all3) / limit
    ));
    std::fs::remove_dir_all(&src)?;
    Ok(json!({
        "bytes": bytes, "files": files,
        "three_cp_sync_seconds": cp3,
        "acked_seconds": acked, "all_replicas_seconds": all3,
        "ratio_to_limit": (3.0 * bytes as f64 / all3) / limit,
    }))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

async fn write_throughput(b: &Bench, jobs: usize) -> Result<Value> {
    let endpoints: Vec<String> = b.members().iter().map(|m| m.endpoint.clone()).collect();
    let client = Client::connect_with(&endpoints, access()).await?;
    let dest = vec![format!("file://{}/tp-out", b.dir.display())];
    let started = Instant::now();
    let mut done = 0usize;
    let mut failed = 0usize;
    use futures::stream::{self, StreamExt};
    let mut results = stream::iter(0..jobs)
        .map(|i| {
            let (client, dest) = (client.clone(), dest.clone());
            async move {
                client
                    .submit_clone(
                        &format!("tp{}", i % 64),
                        "file:///nonexistent/bench-source",
                        &dest,
                        1,
                    )
                    .await
            }
        })
        .buffer_unordered(32);
    let mut first_error = None;
    while let Some(r) = results.next().await {
        match r {
            Ok(_) => done += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if let Some(e) = &first_error {
        log(&format!("first failed submission: {e}"));
    }
    let secs = started.elapsed().as_secs_f64();
    log(&format!(
        "{done} submissions in {secs:.2} s ({:.0}/s), {failed} failed",
        done as f64 / secs
    ));
    Ok(
        json!({"jobs": done, "failed": failed, "seconds": secs, "per_sec": done as f64 / secs, "in_flight": 32}),
    )
}

async fn leader_failover(b: &mut Bench, rounds: usize) -> Result<Value> {
    let mut times = Vec::new();
    for round in 0..rounds {
        let leader = settled_leader(&b.members(), Duration::from_secs(60)).await?;
        let pid = b.member(leader)?.pid;
        let survivor = b
            .members()
            .iter()
            .find(|m| m.id != leader)
            .context("no survivor")?
            .endpoint
            .clone();
        let client = connect(&survivor).await?;
        let dest = vec![format!("file://{}/fo-out", b.dir.display())];
        let t0 = Instant::now();
        kill("-KILL", pid);
        loop {
            // Short attempts: a write stuck on the dead leader is abandoned
            // and retried, so the figure is not rounded up to the timeout.
            let attempt = tokio::time::timeout(
                Duration::from_millis(200),
                client.submit_clone("failover", "file:///nonexistent/x", &dest, 1),
            )
            .await;
            if matches!(attempt, Ok(Ok(_))) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no write succeeded within 60 s of killing leader {leader}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        log(&format!(
            "round {round}: leader {leader} killed; first write after {ms:.0} ms"
        ));
        times.push(ms);
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        b.restart(leader);
        // Measure failover of a steady cluster: a member that has just come
        // back refuses votes until its own election timeout has passed, which
        // would add a second election to the next round.
        settled_leader(&b.members(), Duration::from_secs(60)).await?;
        tokio::time::sleep(STEADY).await;
    }
    let raw = times.clone();
    Ok(
        json!({"rounds": rounds, "ms": raw, "median_ms": median(&mut times), "steady_ms_between_rounds": STEADY.as_millis() as u64}),
    )
}

async fn lease_takeover(b: &mut Bench, rounds: usize) -> Result<Value> {
    let src = b.dir.join("lease-src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("f"), vec![7u8; 1 << 20])?;
    let mut times = Vec::new();
    for round in 0..rounds {
        settled_leader(&b.members(), Duration::from_secs(60)).await?;
        let endpoints: Vec<String> = b.members().iter().map(|m| m.endpoint.clone()).collect();
        let client = Client::connect_with(&endpoints, access()).await?;
        let out = format!("file://{}/lease-out-{round}", b.dir.display());
        let job = client
            .submit_clone(
                &format!("lease{round}"),
                &format!("file://{}", src.display()),
                &[out],
                3,
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let holder = loop {
            let j = client.get_job(&job.id).await?;
            if j.lease_holder != 0 && j.state == bitclone_client::proto::JobState::Running as i32 {
                break j.lease_holder;
            }
            if Instant::now() > deadline {
                bail!("job {} never ran", job.id);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let pid = b.member(holder)?.pid;
        let t0 = Instant::now();
        kill("-KILL", pid);
        let others: Vec<String> = b
            .members()
            .iter()
            .filter(|m| m.id != holder)
            .map(|m| m.endpoint.clone())
            .collect();
        let client = Client::connect_with(&others, access()).await?;
        let next = loop {
            if let Ok(j) = client.get_job(&job.id).await {
                if j.lease_holder != 0 && j.lease_holder != holder {
                    break j.lease_holder;
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no takeover within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        log(&format!(
            "round {round}: holder {holder} killed; node {next} holds the lease after {ms:.0} ms"
        ));
        times.push(ms);
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        b.restart(holder);
    }
    let raw = times.clone();
    Ok(json!({"rounds": rounds, "ms": raw, "median_ms": median(&mut times), "lease_ms": 5000}))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = match &args.work {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("bitclone-bench-cluster-{}", std::process::id())),
    };
    if dir.exists() {
        bail!("work dir {} exists; pass a new one", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    let bin = std::fs::canonicalize(&args.bitclone)?;
    // Holds each destination write back 3 s so a job is running when its
    // holder is killed (lease takeover rounds).
    let cluster = TestCluster::start_with_bin(
        &bin,
        &dir,
        3,
        3,
        &[("BITCLONE_FAULT_EXPORT_DELAY_MS", SLOW_SINK_MS)],
    );
    let admin = cluster.node(1);
    let _ = ACCESS.set(
        bitclone_client::ConnectOptions::new()
            .ca_pem(std::fs::read(admin.ca_file())?)
            .token(admin.admin_token()),
    );
    let mut b = Bench {
        bin: bin.clone(),
        dir: dir.clone(),
        cluster,
    };
    let result = async {
        let put = if args.put_size > 0 {
            cold_put(&b, args.put_size).await?
        } else {
            Value::Null
        };
        let throughput = write_throughput(&b, args.jobs).await?;
        let failover = leader_failover(&mut b, args.rounds).await?;
        let takeover = lease_takeover(&mut b, args.lease_rounds).await?;
        anyhow::Ok(json!({
            "cluster": {"nodes": 3, "heartbeat_ms": 100, "election_timeout_ms": [500, 1000]},
            "cold_put_r3": put,
            "raft_write_throughput": throughput,
            "leader_failover": failover,
            "lease_takeover": takeover,
        }))
    }
    .await;
    for n in std::mem::take(&mut b.cluster.nodes).into_values() {
        n.stop();
    }
    let report = result?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if args.work.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
