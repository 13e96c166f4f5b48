//! One chaos run: a cluster of real `bitclone node` processes, SDK clients
//! putting and reading back while a schedule of faults plays, then healing,
//! reading every acknowledged snapshot back through every node, the
//! oracle's verdicts and the report. Process faults (kill, pause, a
//! corrupted chunk) only so far: the network and disk nemeses are drawn
//! only when [`RunOptions::kinds`] holds them, and the runner refuses
//! those it cannot play.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::cluster::TestCluster;
use crate::node::signal;
use crate::oracle::{self, FinalRead, FinalState, Op, OpKind, Outcome, Verdict};
use crate::report;
use crate::schedule::{Fault, Nemesis, Schedule};
use crate::tree::{generate_tree, tree_digest};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub nodes: u64,
    pub clients: u32,
    pub schedule: Schedule,
    /// Quiet time after a fault counted into its unavailability.
    pub quiet_ms: u64,
    /// How soon after the last fault the cluster must have healed.
    pub heal_bound_ms: u64,
    /// Where the cluster, the clients' trees and the report go.
    pub dir: PathBuf,
    /// Notes for the report (what was left out and why).
    pub notes: Vec<String>,
}

/// What a run found.
#[derive(Debug)]
pub struct RunOutcome {
    pub verdicts: Vec<Verdict>,
    pub ops: usize,
    pub report_md: PathBuf,
}

impl RunOutcome {
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.holds)
    }
}

/// The nemeses this runner can play.
pub fn playable(n: &Nemesis) -> bool {
    matches!(
        n,
        Nemesis::KillLeader | Nemesis::KillRandom | Nemesis::Pause | Nemesis::CorruptChunk
    )
}

/// A digest of a whole tree (paths, contents, modes).
pub fn digest_of(dir: &Path) -> String {
    let mut h = blake3::Hasher::new();
    for (path, (hash, mode)) in tree_digest(dir, &[]) {
        h.update(path.as_bytes());
        h.update(&[0]);
        h.update(hash.as_bytes());
        h.update(&mode.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// Runs it. Panics (a harness fails loudly) if the cluster cannot start
/// or a schedule holds a nemesis it cannot play.
pub fn run(opts: &RunOptions) -> RunOutcome {
    for f in &opts.schedule.faults {
        assert!(
            playable(&f.nemesis),
            "this runner cannot play {} yet",
            f.nemesis.name()
        );
    }
    std::fs::create_dir_all(&opts.dir).unwrap();
    let cluster = TestCluster::start(&opts.dir.join("cluster"), opts.nodes, opts.nodes);
    let endpoints: Vec<String> = cluster.nodes.values().map(|n| n.endpoint.clone()).collect();
    let first = cluster.nodes.values().next().unwrap();
    let (ca, token) = (std::fs::read(first.ca_file()).unwrap(), first.admin_token());
    let cluster = Arc::new(Mutex::new(cluster));
    let started = Instant::now();
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workload_ms = opts.schedule.end_ms() + opts.quiet_ms;

    let clients: Vec<_> = (0..opts.clients)
        .map(|client| {
            let ctx = ClientCtx {
                client,
                seed: opts.schedule.seed ^ (u64::from(client) << 32),
                endpoints: endpoints.clone(),
                ca: ca.clone(),
                token: token.trim().to_string(),
                dir: opts.dir.join(format!("client-{client}")),
                started,
                history: history.clone(),
                stop: stop.clone(),
            };
            std::thread::spawn(move || ctx.run(workload_ms))
        })
        .collect();

    // Starts and ends in time order (faults may overlap). What was played
    // keeps the times each fault really began and ended (finding the
    // leader to kill takes a moment): the figures are measured from those.
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, f) in opts.schedule.faults.iter().enumerate() {
        events.push((f.start_ms, true, i));
        events.push((f.end_ms, false, i));
    }
    events.sort();
    let mut played = opts.schedule.clone();
    let mut undo: BTreeMap<usize, Undo> = BTreeMap::new();
    let mut last_fault_end = started;
    let since = |t: Instant| t.saturating_duration_since(started).as_millis() as u64;
    for (at, start, i) in events {
        sleep_until(started + Duration::from_millis(at));
        if start {
            undo.insert(
                i,
                inflict(&cluster, &opts.schedule.faults[i], opts.schedule.seed),
            );
            played.faults[i].start_ms = since(Instant::now());
        } else {
            if let Some(u) = undo.remove(&i) {
                heal(&cluster, u);
            }
            last_fault_end = Instant::now();
            played.faults[i].end_ms = since(last_fault_end).max(played.faults[i].start_ms);
        }
    }
    sleep_until(started + Duration::from_millis(workload_ms));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let healed_after_ms = wait_healed(&cluster, opts.heal_bound_ms * 2)
        .map(|at| at.saturating_duration_since(last_fault_end).as_millis() as u64);
    let history = history.lock().unwrap().clone();
    let end = final_state(&cluster, &history, healed_after_ms, &opts.dir, &ca, &token);
    let verdicts = oracle::check(&history, &end, opts.heal_bound_ms);

    let figures = report::fault_figures(&history, &played, opts.quiet_ms);
    let failover: Vec<(String, Vec<Option<u64>>)> = ["kill-leader", "kill-random"]
        .iter()
        .map(|n| {
            let times = report::first_write_after(&history, &played, n);
            (n.to_string(), times)
        })
        .filter(|(_, t)| !t.is_empty())
        .collect();
    let out = opts.dir.join("report");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("plot.svg"), report::svg(&history, &played)).unwrap();
    std::fs::write(
        out.join("schedule.json"),
        serde_json::to_string_pretty(&opts.schedule).unwrap(),
    )
    .unwrap();
    let lines: Vec<String> = history
        .iter()
        .map(|o| serde_json::to_string(o).unwrap())
        .collect();
    std::fs::write(out.join("history.jsonl"), lines.join("\n") + "\n").unwrap();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &history {
        let k = match (&o.kind, &o.outcome) {
            (_, Outcome::Ok) => "ok",
            (_, Outcome::Failed(_)) => "failed",
            (_, Outcome::Unknown(_)) => "unknown",
        };
        *counts.entry(k).or_default() += 1;
    }
    let json = serde_json::json!({
        "seed": opts.schedule.seed,
        "version": env!("CARGO_PKG_VERSION"),
        "nodes": opts.nodes,
        "clients": opts.clients,
        "schedule": opts.schedule,
        "played": played,
        "verdicts": verdicts,
        "faults": figures,
        "failover_ms": failover,
        "counts": counts,
        "healed_after_ms": healed_after_ms,
        "notes": opts.notes,
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let md = report::markdown(
        "BitClone chaos run",
        &opts.schedule,
        &verdicts,
        &figures,
        &failover,
        &opts.notes,
        "plot.svg",
    );
    let report_md = out.join("report.md");
    std::fs::write(&report_md, md).unwrap();
    RunOutcome {
        verdicts,
        ops: history.len(),
        report_md,
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// How to undo a fault.
enum Undo {
    Restart(u64),
    Resume(u32),
}

fn alive_leader(c: &TestCluster) -> Option<u64> {
    c.nodes.keys().find_map(|id| c.leader(*id))
}

fn inflict(cluster: &Mutex<TestCluster>, f: &Fault, seed: u64) -> Undo {
    let mut c = cluster.lock().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ f.start_ms);
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    let random = ids[rng.random_range(0..ids.len())];
    match f.nemesis {
        Nemesis::KillLeader => {
            let id = alive_leader(&c).unwrap_or(random);
            c.kill9(id);
            Undo::Restart(id)
        }
        Nemesis::KillRandom => {
            c.kill9(random);
            Undo::Restart(random)
        }
        Nemesis::Pause => {
            let pid = c.node(random).pid();
            signal(pid, "-STOP");
            Undo::Resume(pid)
        }
        Nemesis::CorruptChunk => {
            // A chunk of one replica flipped while it is down; it comes
            // back with the bad chunk, found (and repaired) when read.
            c.kill9(random);
            let db = c.dir.join(format!("node-{random}/db"));
            corrupt_one_blob(&db, seed);
            Undo::Restart(random)
        }
        other => panic!("this runner cannot play {} yet", other.name()),
    }
}

/// Flips one byte in the middle of the largest blob file under `db`.
fn corrupt_one_blob(db: &Path, seed: u64) {
    let mut blobs: Vec<(u64, PathBuf)> = walkdir::WalkDir::new(db)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "blob"))
        .filter_map(|e| Some((e.metadata().ok()?.len(), e.path().to_path_buf())))
        .collect();
    blobs.sort();
    if let Some((len, path)) = blobs.last() {
        let mut bytes = std::fs::read(path).unwrap();
        let at = (*len as usize / 2 + (seed as usize % 1024)).min(bytes.len() - 1);
        bytes[at] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }
}

fn heal(cluster: &Mutex<TestCluster>, undo: Undo) {
    let mut c = cluster.lock().unwrap();
    match undo {
        Undo::Restart(id) => c.start_node(id, &[]),
        Undo::Resume(pid) => signal(pid, "-CONT"),
    }
}

/// When the cluster has one leader that every node sees and no
/// under-replicated shard, polled for at most `bound_ms`.
fn wait_healed(cluster: &Mutex<TestCluster>, bound_ms: u64) -> Option<Instant> {
    let deadline = Instant::now() + Duration::from_millis(bound_ms);
    while Instant::now() < deadline {
        let c = cluster.lock().unwrap();
        let leaders: Vec<Option<u64>> = c.nodes.keys().map(|id| c.leader(*id)).collect();
        let one = leaders.first().copied().flatten();
        let agreed = one.is_some() && leaders.iter().all(|l| *l == one);
        let replicated = c.nodes.values().all(|n| {
            let m = n.http_get("/metrics").body;
            m.lines().any(|l| {
                l.strip_prefix("bitclone_under_replicated_shards ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    == Some(0.0)
            })
        });
        if agreed && replicated {
            return Some(Instant::now());
        }
        drop(c);
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// Every snapshot a put acknowledged, read back through every node.
fn final_state(
    cluster: &Mutex<TestCluster>,
    history: &[Op],
    healed_after_ms: Option<u64>,
    dir: &Path,
    ca: &[u8],
    token: &str,
) -> FinalState {
    let c = cluster.lock().unwrap();
    let nodes: Vec<(u64, String)> = c
        .nodes
        .iter()
        .map(|(id, n)| (*id, n.endpoint.clone()))
        .collect();
    drop(c);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut reads = Vec::new();
    let puts: Vec<(&str, &str)> = history
        .iter()
        .filter_map(|o| match (&o.kind, &o.outcome) {
            (
                OpKind::Put {
                    dataset,
                    snapshot: Some(s),
                    ..
                },
                Outcome::Ok,
            ) => Some((dataset.as_str(), s.as_str())),
            _ => None,
        })
        .collect();
    for (id, endpoint) in &nodes {
        let client = rt.block_on(connect(std::slice::from_ref(endpoint), ca, token));
        for (k, (dataset, snapshot)) in puts.iter().enumerate() {
            let out = dir.join(format!("final-{id}-{k}"));
            let digest = match &client {
                Ok(client) => rt
                    .block_on(client.download(
                        dataset,
                        Some(snapshot),
                        &out,
                        &bitclone_client::NoProgress,
                    ))
                    .map(|_| digest_of(&out))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            let _ = std::fs::remove_dir_all(&out);
            reads.push(FinalRead {
                node: *id,
                dataset: dataset.to_string(),
                snapshot: snapshot.to_string(),
                digest,
            });
        }
    }
    FinalState {
        nodes: nodes.iter().map(|(id, _)| *id).collect(),
        reads,
        jobs: Vec::new(),
        sinks: Vec::new(),
        healed_after_ms,
    }
}

async fn connect(
    endpoints: &[String],
    ca: &[u8],
    token: &str,
) -> Result<bitclone_client::Client, String> {
    let options = bitclone_client::ConnectOptions::new()
        .ca_pem(ca.to_vec())
        .token(token.to_string());
    bitclone_client::Client::connect_with(endpoints.to_vec(), options)
        .await
        .map_err(|e| e.to_string())
}

/// One SDK client's loop.
struct ClientCtx {
    client: u32,
    seed: u64,
    endpoints: Vec<String>,
    ca: Vec<u8>,
    token: String,
    dir: PathBuf,
    started: Instant,
    history: Arc<Mutex<Vec<Op>>>,
    stop: Arc<AtomicBool>,
}

/// Each operation's deadline, as a client with a deadline would set one:
/// past it a put's outcome is unknown and the connection is replaced.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Runs `fut` on `rt` for at most [`OP_TIMEOUT`] (`Err`: it timed out).
fn within<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    rt.block_on(async { tokio::time::timeout(OP_TIMEOUT, fut).await })
}

/// Operations per client at most (a bound besides the time).
const MAX_OPS: usize = 100_000;

impl ClientCtx {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Logs an operation; true when it was acknowledged.
    fn record(&self, invoked_ms: u64, kind: OpKind, outcome: Outcome) -> bool {
        let ok = outcome == Outcome::Ok;
        let op = Op {
            client: self.client,
            invoked_ms,
            completed_ms: self.ms(),
            kind,
            outcome,
        };
        self.history.lock().unwrap().push(op);
        ok
    }

    fn run(self, workload_ms: u64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        std::fs::create_dir_all(&self.dir).unwrap();
        // Snapshots this client saw acknowledged: (dataset, id, digest).
        let mut acked: Vec<(String, String, String)> = Vec::new();
        let mut version = 0u64;
        let mut conn: Option<bitclone_client::Client> = None;
        // Clients start on different nodes.
        let mut rotation = self.client as usize;
        for n in 0..MAX_OPS {
            if self.stop.load(Ordering::Relaxed) || self.ms() > workload_ms {
                break;
            }
            let invoked = self.ms();
            // One connection kept while it serves; a new one after any
            // failure, trying the endpoints from the next one on (the SDK
            // takes the first that answers, and a paused node answers
            // nothing for its whole connect timeout).
            let connected = match conn.take() {
                Some(c) => Ok(Ok(c)),
                None => {
                    rotation += 1;
                    let mut order = self.endpoints.clone();
                    let n = order.len().max(1);
                    order.rotate_left(rotation % n);
                    within(&rt, connect(&order, &self.ca, &self.token))
                }
            };
            let client = match connected {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    self.record(invoked, OpKind::Status { leader: None }, Outcome::Failed(e));
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(_) => {
                    let kind = OpKind::Status { leader: None };
                    self.record(invoked, kind, Outcome::Failed("connect timed out".into()));
                    continue;
                }
            };
            let pick = rng.random_range(0..10);
            let ok = if pick < 4 || acked.is_empty() {
                // A put: a new tree, or the client's dataset edited.
                let dataset = format!("c{}-{}", self.client, rng.random_range(0..3));
                version += 1;
                let src = self.dir.join(format!("put-{n}"));
                generate_tree(&src, self.seed ^ version, 8, 0);
                let digest = digest_of(&src);
                let r = within(
                    &rt,
                    client.upload_dir(&dataset, &src, &bitclone_client::NoProgress),
                );
                let _ = std::fs::remove_dir_all(&src);
                // A put that did not answer may have committed: unknown.
                let (snapshot, outcome) = match r {
                    Ok(Ok(s)) => (Some(s.snapshot), Outcome::Ok),
                    Ok(Err(e)) => (None, Outcome::Unknown(e.to_string())),
                    Err(_) => (None, Outcome::Unknown("timed out".into())),
                };
                if let Some(s) = &snapshot {
                    acked.push((dataset.clone(), s.clone(), digest.clone()));
                }
                let kind = OpKind::Put {
                    dataset,
                    digest,
                    snapshot,
                };
                self.record(invoked, kind, outcome)
            } else if pick < 8 {
                let (dataset, snapshot, _) = acked[rng.random_range(0..acked.len())].clone();
                let out = self.dir.join(format!("get-{n}"));
                let r = within(
                    &rt,
                    client.download(
                        &dataset,
                        Some(&snapshot),
                        &out,
                        &bitclone_client::NoProgress,
                    ),
                );
                let (digest, outcome) = match r {
                    Ok(Ok(_)) => (Some(digest_of(&out)), Outcome::Ok),
                    Ok(Err(e)) => (None, Outcome::Failed(e.to_string())),
                    Err(_) => (None, Outcome::Failed("timed out".into())),
                };
                let _ = std::fs::remove_dir_all(&out);
                let kind = OpKind::Get {
                    dataset,
                    snapshot,
                    digest,
                };
                self.record(invoked, kind, outcome)
            } else {
                let r = within(&rt, client.cluster_status());
                match r {
                    Ok(Ok(s)) => {
                        let leader = (s.leader_id != 0).then_some(s.leader_id);
                        self.record(invoked, OpKind::Status { leader }, Outcome::Ok)
                    }
                    Ok(Err(e)) => self.record(
                        invoked,
                        OpKind::Status { leader: None },
                        Outcome::Failed(e.to_string()),
                    ),
                    Err(_) => self.record(
                        invoked,
                        OpKind::Status { leader: None },
                        Outcome::Failed("timed out".into()),
                    ),
                }
            };
            if ok {
                conn = Some(client);
            }
        }
    }
}
