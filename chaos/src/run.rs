//! One chaos run: a cluster of real `bitclone node` processes, SDK clients
//! putting and reading back while a schedule of faults plays, then healing,
//! reading every acknowledged snapshot back through every node, the
//! oracle's verdicts and the report. With a [`Sandbox`] (the harness runs
//! as root, in namespaces of its own) every node has a loopback address
//! and a tmpfs store of its own, and the network and disk nemeses play
//! too; without one, only the process and membership faults do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::cluster::TestCluster;
use crate::jobs::JobSinks;
use crate::node::{signal, tail};
use crate::oracle::{self, FinalJob, FinalRead, FinalState, Op, OpKind, Outcome, Verdict};
use crate::report;
use crate::sandbox::Sandbox;
use crate::schedule::{cut_links, Build, Fault, Nemesis, Schedule};
use crate::tree::{generate_tree, random_bytes, tree_digest};

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
    /// Inside the harness's namespaces (root): network and disk faults.
    pub sandbox: bool,
    /// Each client starts an operation at most this often: every
    /// acknowledged put is read back through every node at the end, so the
    /// rate bounds that work.
    pub op_interval_ms: u64,
    /// Notes for the report (what was left out and why).
    pub notes: Vec<String>,
    /// A rolling-upgrade run: the nodes start on this build (the previous
    /// release), `Replace` faults move them between it and this one, and
    /// no clone job may fail.
    pub previous: Option<PathBuf>,
}

/// Set by SIGINT or SIGTERM (see [`watch_signals`]): the run stops where it
/// is, heals what it did, stops its processes and reports what it saw.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Sets [`INTERRUPTED`] on SIGINT or SIGTERM, from a thread of its own.
pub fn watch_signals() {
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the signal watcher");
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!(
                "bitclone-chaos: interrupted; healing, stopping the nodes, writing the report"
            );
            INTERRUPTED.store(true, Ordering::SeqCst);
        });
    });
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Size of each node's tmpfs store in the sandbox (RAM only for what it
/// holds), and the disk reserve the nodes keep there (a full disk leaves
/// less than it free).
/// Large enough for a long run's puts (nothing is deleted yet) and
/// RocksDB's flushes and compactions above the reserve: a reserve smaller
/// than those let background writes hit ENOSPC in a 1 GiB store.
const STORE_MIB: u64 = 4096;
const DISK_RESERVE: &str = "256MiB";
const FULL_HEADROOM_MIB: u64 = 8;
/// The pause per file a job exports (see `BITCLONE_FAULT_EXPORT_FILE_DELAY_MS`).
const JOB_FILE_DELAY_MS: &str = "20";

/// What a run found.
#[derive(Debug)]
pub struct RunOutcome {
    pub verdicts: Vec<Verdict>,
    pub ops: usize,
    pub report_md: PathBuf,
    /// Stopped early by a signal.
    pub interrupted: bool,
}

impl RunOutcome {
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.holds)
    }
}

/// The nemeses this runner can play (`sandbox`: inside the namespaces).
/// `jobs`: Garage and Postgres are there for the clone-job workload.
/// `upgrade`: a previous build to replace nodes with was given.
pub fn playable(n: &Nemesis, sandbox: bool, jobs: bool, upgrade: bool) -> bool {
    match n {
        Nemesis::KillLeaseHolder => jobs,
        Nemesis::Replace { .. } => upgrade,
        n if n.needs_root() => sandbox,
        _ => true,
    }
}

/// Jobs submitted in a run, in order: (id, the job's dataset, the digest
/// of the tree it clones).
type JobRegistry = Arc<Mutex<Vec<(String, String, String)>>>;

/// The client id the harness's own operations (a nemesis's job) carry.
pub const HARNESS_CLIENT: u32 = 1000;

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
    std::fs::create_dir_all(&opts.dir).unwrap();
    let mut notes = opts.notes.clone();
    // One spare node id for joins; in the sandbox every node (the spare
    // too) gets a tmpfs store before it starts.
    let spare = opts.nodes + 1;
    let cluster_dir = opts.dir.join("cluster");
    let mut sandbox = opts
        .sandbox
        .then(|| Sandbox::new().expect("the sandbox's loopback"));
    let mut env: Vec<(&str, &str)> = Vec::new();
    let sinks = match JobSinks::start(&opts.dir.join("sinks")) {
        Ok(s) => Some(s),
        Err(e) => {
            notes.push(format!("No clone jobs: {e}."));
            None
        }
    };
    for f in &opts.schedule.faults {
        assert!(
            playable(
                &f.nemesis,
                opts.sandbox,
                sinks.is_some(),
                opts.previous.is_some()
            ),
            "this runner cannot play {} here",
            f.nemesis.name()
        );
    }
    if let Some(s) = &sinks {
        env.push(("BITCLONE_CONFIG", s.config.to_str().unwrap()));
        // A job's writes take long enough that a fault can catch one
        // running (the nodes' test knob: a pause per file exported).
        env.push(("BITCLONE_FAULT_EXPORT_FILE_DELAY_MS", JOB_FILE_DELAY_MS));
    }
    if let Some(sb) = sandbox.as_mut() {
        for id in 1..=spare {
            let db = cluster_dir.join(format!("node-{id}/db"));
            sb.mount_tmpfs(&db, STORE_MIB).expect("a tmpfs store");
        }
        env.push(("BITCLONE_DISK_RESERVE", DISK_RESERVE));
    }
    let cluster = TestCluster::start_opts(
        opts.previous.as_deref().unwrap_or(crate::env::bin()),
        &cluster_dir,
        opts.nodes,
        spare,
        &env,
        opts.sandbox,
    );
    let endpoints: Vec<String> = cluster.nodes.values().map(|n| n.endpoint.clone()).collect();
    let first = cluster.nodes.values().next().unwrap();
    let (ca, token) = (std::fs::read(first.ca_file()).unwrap(), first.admin_token());
    let cluster = Arc::new(Mutex::new(cluster));
    let started = Instant::now();
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let jobs: JobRegistry = Arc::default();
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
                interval_ms: opts.op_interval_ms,
                jobs: sinks.is_some().then(|| jobs.clone()),
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
    let mut begun = 0;
    // Faults that could not be inflicted or healed: the run proves less
    // than it says, which fails it.
    let mut troubles: Vec<String> = Vec::new();
    // Packets each network fault dropped (its nftables counters).
    let mut dropped: BTreeMap<usize, u64> = BTreeMap::new();
    let mut last_fault_end = started;
    let since = |t: Instant| t.saturating_duration_since(started).as_millis() as u64;
    let mut faults = Faults {
        cluster: &cluster,
        sandbox: sandbox.as_mut(),
        seed: opts.schedule.seed,
        spare,
        started,
        history: &history,
        jobs: &jobs,
        scratch: opts.dir.join("nemesis"),
        lease_kills: Vec::new(),
        errors: Vec::new(),
        gone: std::collections::BTreeSet::new(),
        previous: opts.previous.clone(),
        notes: Vec::new(),
    };
    for (at, start, i) in events {
        if !sleep_until(started + Duration::from_millis(at)) {
            break;
        }
        let f = &opts.schedule.faults[i];
        if start {
            // Faults begin in index order (the schedule is in start order).
            begun = begun.max(i + 1);
            match faults.inflict(f, i) {
                Ok(u) => {
                    undo.insert(i, u);
                }
                Err(e) => troubles.push(format!(
                    "fault {i} ({}) at {} ms was not inflicted: {e}",
                    f.nemesis.name(),
                    f.start_ms
                )),
            }
            troubles.append(&mut faults.errors);
            played.faults[i].start_ms = since(Instant::now());
        } else {
            if let Some(u) = undo.remove(&i) {
                match faults.heal(u) {
                    Ok(Some(n)) => {
                        dropped.insert(i, n);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        troubles.push(format!("healing fault {i} ({}): {e}", f.nemesis.name()))
                    }
                }
                troubles.append(&mut faults.errors);
            }
            last_fault_end = Instant::now();
            played.faults[i].end_ms = since(last_fault_end).max(played.faults[i].start_ms);
        }
    }
    let interrupted_at = interrupted().then(|| since(Instant::now()));
    // Interrupted: whatever is still in place is undone now, and what
    // never began is not in what was played.
    for (i, u) in std::mem::take(&mut undo) {
        // The nodes are about to stop: membership is not worth restoring.
        if matches!(u, Undo::Leave(_) | Undo::Rejoin(_)) {
            continue;
        }
        match faults.heal(u) {
            Ok(Some(n)) => {
                dropped.insert(i, n);
            }
            Ok(None) => {}
            Err(e) => notes.push(format!("healing fault {i}: {e}")),
        }
        played.faults[i].end_ms = since(Instant::now());
    }
    played.faults.truncate(begun);
    sleep_until(started + Duration::from_millis(workload_ms));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let lease_kills = std::mem::take(&mut faults.lease_kills);
    notes.append(&mut faults.notes);
    drop(faults);
    let history = history.lock().unwrap().clone();
    let jobs = jobs.lock().unwrap().clone();
    let mut job_done_after: Vec<Option<u64>> = Vec::new();
    let (verdicts, healed_after_ms) = match interrupted_at {
        Some(at) => {
            notes.push(format!(
                "Interrupted by a signal at {at} ms: no final reads, no oracle."
            ));
            let v = Verdict {
                invariant: "the run completed",
                holds: false,
                counterexamples: vec![format!("interrupted at {at} ms")],
                violations: 1,
            };
            (vec![v], None)
        }
        None => {
            let healed_after_ms = wait_healed(&cluster, opts.heal_bound_ms * 2)
                .map(|at| at.saturating_duration_since(last_fault_end).as_millis() as u64);
            let mut end = final_state(&cluster, &history, healed_after_ms, &opts.dir, &ca, &token);
            let (final_jobs, job_views) = final_jobs(&endpoints, &history, &ca, &token);
            if let Some(s) = &sinks {
                end.sinks
                    .extend(check_sinks(s, &final_jobs, &jobs, &job_views, &opts.dir));
            }
            // Why jobs failed, for the reader of the report.
            let mut why: BTreeMap<&str, usize> = BTreeMap::new();
            for j in final_jobs.iter().filter(|j| j.state == "Failed") {
                *why.entry(j.error.as_str()).or_default() += 1;
            }
            for (error, n) in why {
                notes.push(format!("{n} job(s) failed: {error}"));
            }
            // From each lease holder's kill to its job done on another node.
            for (job, killed_unix_ms, holder) in &lease_kills {
                job_done_after.push(job_views.get(job).and_then(|v| {
                    (v.state == bitclone_client::proto::JobState::Succeeded as i32
                        && v.lease_holder != *holder)
                        .then(|| (v.updated_unix_ms as u64).saturating_sub(*killed_unix_ms))
                }));
            }
            let mut states: BTreeMap<&str, usize> = BTreeMap::new();
            for j in &final_jobs {
                *states.entry(j.state.as_str()).or_default() += 1;
            }
            notes.push(format!(
                "Clone jobs: {} submitted and acknowledged, ended {:?}; {} sink checks (restore drills against the catalog).",
                final_jobs.len(),
                states,
                end.sinks.len()
            ));
            end.jobs = final_jobs;
            let mut verdicts = oracle::check(&history, &end, opts.heal_bound_ms);
            if opts.previous.is_some() {
                verdicts.push(oracle::no_job_failed(&end.jobs));
            }
            verdicts.push(network_faults_bit(&opts.schedule, &dropped));
            verdicts.push(Verdict {
                invariant: "every fault was inflicted and healed",
                holds: troubles.is_empty(),
                violations: troubles.len(),
                counterexamples: troubles
                    .iter()
                    .take(oracle::MAX_EXAMPLES)
                    .cloned()
                    .collect(),
            });
            (verdicts, healed_after_ms)
        }
    };

    let figures = report::fault_figures(&history, &played, opts.quiet_ms);
    let failover: Vec<(String, Vec<Option<u64>>)> =
        ["kill-leader", "kill-random", "kill-lease-holder"]
            .iter()
            .map(|n| {
                let times = report::first_write_after(&history, &played, n);
                (n.to_string(), times)
            })
            .filter(|(_, t)| !t.is_empty())
            .chain((!job_done_after.is_empty()).then(|| {
                (
                    "kill-lease-holder (job done elsewhere)".to_string(),
                    job_done_after,
                )
            }))
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
        "notes": notes,
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
        &notes,
        "plot.svg",
    );
    let report_md = out.join("report.md");
    std::fs::write(&report_md, md).unwrap();
    RunOutcome {
        verdicts,
        ops: history.len(),
        report_md,
        interrupted: interrupted_at.is_some(),
    }
}

/// A successful job's sinks hold exactly its snapshot: each one checked
/// (three jobs at a time).
fn check_sinks(
    s: &JobSinks,
    final_jobs: &[FinalJob],
    jobs: &[(String, String, String)],
    views: &BTreeMap<String, bitclone_client::proto::Job>,
    dir: &Path,
) -> Vec<crate::oracle::SinkState> {
    let todo: Vec<(&str, &str, &str, &str)> = final_jobs
        .iter()
        .filter(|j| j.state == "Succeeded")
        .filter_map(|j| {
            let (_, dataset, digest) = jobs.iter().find(|(id, _, _)| *id == j.id)?;
            let view = views.get(&j.id)?;
            Some((
                j.id.as_str(),
                dataset.as_str(),
                view.snapshot.as_str(),
                digest.as_str(),
            ))
        })
        .collect();
    let per = todo.len().div_ceil(3).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = todo
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .flat_map(|(job, ds, snap, digest)| s.check(job, ds, snap, digest, dir))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a sink checker"))
            .collect()
    })
}

/// The harness's own check: every partition and packet-loss fault dropped
/// packets (a rule that matched nothing would make a run pass untested).
fn network_faults_bit(schedule: &Schedule, dropped: &BTreeMap<usize, u64>) -> Verdict {
    let broken: Vec<String> = schedule
        .faults
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f.nemesis, Nemesis::Partition { .. } | Nemesis::Loss { .. }))
        .filter(|(i, _)| dropped.get(i).copied().unwrap_or(0) == 0)
        .map(|(i, f)| format!("fault {i} ({}) dropped no packet", f.nemesis.name()))
        .collect();
    Verdict {
        invariant: "every network fault dropped packets",
        holds: broken.is_empty(),
        violations: broken.len(),
        counterexamples: broken.into_iter().take(oracle::MAX_EXAMPLES).collect(),
    }
}

/// Sleeps until `t`, in short steps; false when interrupted first.
fn sleep_until(t: Instant) -> bool {
    loop {
        if interrupted() {
            return false;
        }
        let now = Instant::now();
        if now >= t {
            return true;
        }
        std::thread::sleep((t - now).min(Duration::from_millis(100)));
    }
}

/// How to undo a fault.
enum Undo {
    Restart(u64),
    Resume(u32),
    /// An nftables table to remove.
    Table(String),
    /// A bandwidth limit to lift.
    Unlimit(std::net::Ipv4Addr),
    /// A tmpfs store to give its size back.
    Unfill(PathBuf),
    /// A node that joined leaves again.
    Leave(u64),
    /// A removed node joins again (with an empty store).
    Rejoin(u64),
    /// A node stopped to run another build starts on it.
    Replaced(u64),
}

fn alive_leader(c: &TestCluster) -> Option<u64> {
    c.nodes.keys().find_map(|id| c.leader(*id))
}

/// What plays the faults: the cluster, the sandbox when there is one.
struct Faults<'a> {
    cluster: &'a Mutex<TestCluster>,
    sandbox: Option<&'a mut Sandbox>,
    seed: u64,
    /// The node id that joins (and leaves) in a join fault.
    spare: u64,
    started: Instant,
    history: &'a Mutex<Vec<Op>>,
    jobs: &'a JobRegistry,
    /// Where a nemesis's own trees go.
    scratch: PathBuf,
    /// Each lease-holder kill: (job, when killed in Unix ms, the holder).
    lease_kills: Vec<(String, u64, u64)>,
    /// What went wrong in a fault that was still inflicted (or healed).
    errors: Vec<String>,
    /// Nodes that left the cluster while down: not restarted.
    gone: std::collections::BTreeSet<u64>,
    /// The build a rolling upgrade starts from.
    previous: Option<PathBuf>,
    /// What the faults saw, for the report.
    notes: Vec<String>,
}

impl Faults<'_> {
    fn sandbox(&mut self) -> Result<&mut Sandbox, String> {
        self.sandbox
            .as_deref_mut()
            .ok_or_else(|| "needs the sandbox (root)".to_string())
    }

    fn inflict(&mut self, f: &Fault, i: usize) -> Result<Undo, String> {
        let cluster = self.cluster;
        let mut c = cluster.lock().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ f.start_ms);
        let ids: Vec<u64> = c.nodes.keys().copied().collect();
        // Targets are original nodes: the spare comes and goes with the
        // join fault (a partition still cuts it off with the others).
        let originals: Vec<u64> = ids.iter().copied().filter(|id| *id != self.spare).collect();
        let random = *originals
            .get(rng.random_range(0..originals.len().max(1)))
            .ok_or("no node to act on")?;
        let table = format!("bitclone_chaos_{i}");
        match f.nemesis {
            Nemesis::KillLeader => {
                let id = alive_leader(&c).unwrap_or(random);
                c.kill9(id);
                Ok(Undo::Restart(id))
            }
            Nemesis::KillRandom => {
                c.kill9(random);
                Ok(Undo::Restart(random))
            }
            Nemesis::Pause => {
                // A lease holder when a job runs: it wakes as a zombie.
                let target = self.a_lease_holder(&c).unwrap_or(random);
                let pid = c.node(target).pid();
                signal(pid, "-STOP");
                Ok(Undo::Resume(pid))
            }
            Nemesis::CorruptChunk => {
                // A chunk of one replica flipped while it is down; it comes
                // back with the bad chunk, found (and repaired) when read.
                c.kill9(random);
                corrupt_one_blob(&c.node_dir(random).join("db"), self.seed);
                Ok(Undo::Restart(random))
            }
            Nemesis::Partition { cut } => {
                let links: Vec<_> = cut_links(cut, &ids, rng.random_range(0..ids.len()))
                    .into_iter()
                    .map(|(a, b)| (c.ip(a), c.ip(b)))
                    .collect();
                drop(c);
                self.sandbox()?.add_table(&table, &links, &[])?;
                Ok(Undo::Table(table))
            }
            Nemesis::Loss { percent } => {
                let ip = c.ip(random);
                drop(c);
                self.sandbox()?.add_table(&table, &[], &[(ip, percent)])?;
                Ok(Undo::Table(table))
            }
            Nemesis::Bandwidth { kbit } => {
                let ip = c.ip(random);
                drop(c);
                self.sandbox()?.limit(ip, Some(kbit))?;
                Ok(Undo::Unlimit(ip))
            }
            Nemesis::FullDisk => {
                let db = c.node_dir(random).join("db");
                drop(c);
                self.sandbox()?.fill(&db, FULL_HEADROOM_MIB)?;
                Ok(Undo::Unfill(db))
            }
            Nemesis::Join => {
                let id = self.spare;
                if c.nodes.contains_key(&id) {
                    return Err(format!("node {id} is a member already"));
                }
                self.gone.remove(&id);
                match join(&mut c, id) {
                    Ok(()) => Ok(Undo::Leave(id)),
                    // Started but not (yet) a voter: it leaves at the end.
                    Err(e) if c.nodes.contains_key(&id) => {
                        self.errors.push(format!("join of node {id}: {e}"));
                        Ok(Undo::Leave(id))
                    }
                    Err(e) => Err(e),
                }
            }
            Nemesis::Remove => match remove(&mut c, random) {
                Ok(()) => Ok(Undo::Rejoin(random)),
                // Out and stopped, but not allowed back or not emptied: it
                // still rejoins at the end (and says why if it cannot).
                Err(e) if !c.nodes.contains_key(&random) => {
                    self.errors.push(format!("removal of node {random}: {e}"));
                    Ok(Undo::Rejoin(random))
                }
                Err(e) => Err(e),
            },
            Nemesis::Replace { node, build } => {
                if !c.nodes.contains_key(&node) {
                    return Err(format!("node {node} is not running"));
                }
                let to = match build {
                    Build::Current => crate::env::bin().to_path_buf(),
                    Build::Previous => self.previous.clone().ok_or("no previous build")?,
                };
                // What the pod's preStop hook runs; a failed drain is a
                // finding, and the pod stops anyway (as the kubelet does).
                let drain = c.node(node).drain_within(node, Duration::from_secs(70));
                match drain {
                    Some(o) if o.status.success() => self.notes.push(format!(
                        "{}: drained: {}",
                        f.nemesis.name(),
                        String::from_utf8_lossy(&o.stdout).trim()
                    )),
                    Some(o) => self.errors.push(format!(
                        "draining node {node}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    None => self
                        .errors
                        .push(format!("draining node {node}: no answer in 70 s")),
                }
                let stopping = c.nodes.remove(&node).ok_or("gone")?;
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stopping.stop()))
                    .map_err(|_| format!("node {node} did not stop cleanly on SIGTERM"))?;
                c.builds.insert(node, to);
                Ok(Undo::Replaced(node))
            }
            Nemesis::KillLeaseHolder => {
                let (job, holder) = self.job_running(&c, i, random)?;
                c.kill9(holder);
                let now_unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                self.lease_kills.push((job, now_unix_ms, holder));
                Ok(Undo::Restart(holder))
            }
        }
    }

    /// A node holding the lease of one of the last few jobs submitted, if
    /// one is running now.
    fn a_lease_holder(&self, c: &TestCluster) -> Option<u64> {
        let recent: Vec<String> = {
            let jobs = self.jobs.lock().unwrap();
            jobs.iter()
                .rev()
                .take(5)
                .map(|(id, _, _)| id.clone())
                .collect()
        };
        let node = c.nodes.values().next()?;
        recent.iter().find_map(|id| {
            let v = job_view(node, id, Duration::from_secs(5))?;
            let holder = v["lease_holder"].as_u64()?;
            (v["state"] == "Running" && c.nodes.contains_key(&holder)).then_some(holder)
        })
    }

    /// A clone job of the harness's own, submitted through node `via` and
    /// seen running: its id and its lease holder (each step bounded: the
    /// put and the submission 20 s each, then 20 s to see it run). Its tree
    /// is large enough (and each file's export paused) that it runs for a
    /// while; it is logged like a client's, so the oracle checks it too.
    fn job_running(&self, c: &TestCluster, i: usize, via: u64) -> Result<(String, u64), String> {
        let src = self.scratch.join(format!("lease-{i}"));
        generate_tree(&src, self.seed ^ i as u64, 30, 0);
        let digest = digest_of(&src);
        let dataset = format!("lease-{i}");
        let invoked = self.started.elapsed().as_millis() as u64;
        let node = c.node(via);
        let put = node.cli_within(
            &[
                "--json",
                "put",
                src.to_str().unwrap_or_default(),
                "--dataset",
                &dataset,
            ],
            Duration::from_secs(20),
        );
        let _ = std::fs::remove_dir_all(&src);
        let snapshot = put
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["snapshot"].as_str().map(str::to_string))
            .ok_or("the put of its tree failed")?;
        let job_dataset = format!("{dataset}-job");
        let mut args = vec![
            "clone".to_string(),
            "--from".into(),
            format!("snapshot://{dataset}@{snapshot}"),
            "--dataset".into(),
            job_dataset.clone(),
        ];
        for d in JobSinks::destinations(&job_dataset) {
            args.extend(["--to".to_string(), d]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = node
            .cli_within(&args, Duration::from_secs(20))
            .filter(|o| o.status.success())
            .ok_or("submitting its clone job failed")?;
        let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.jobs
            .lock()
            .unwrap()
            .push((job.clone(), job_dataset.clone(), digest));
        self.history.lock().unwrap().push(Op {
            client: HARNESS_CLIENT,
            invoked_ms: invoked,
            completed_ms: self.started.elapsed().as_millis() as u64,
            kind: OpKind::Clone {
                dataset: job_dataset,
                snapshot,
                job: Some(job.clone()),
            },
            outcome: Outcome::Ok,
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(v) = job_view(node, &job, Duration::from_secs(10)) {
                if v["state"] == "Running" {
                    if let Some(holder) = v["lease_holder"]
                        .as_u64()
                        .filter(|h| c.nodes.contains_key(h))
                    {
                        return Ok((job, holder));
                    }
                }
                if !["Pending", "Running"].contains(&v["state"].as_str().unwrap_or("")) {
                    return Err(format!("job {job} ended before it was caught running: {v}"));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("job {job} was not running within 20 s"))
    }

    /// Undoes a fault; for a network fault, returns the packets it dropped.
    fn heal(&mut self, undo: Undo) -> Result<Option<u64>, String> {
        let cluster = self.cluster;
        match undo {
            // A node that left while it was down stays down.
            Undo::Restart(id) if self.gone.contains(&id) => {}
            Undo::Restart(id) => start(&mut cluster.lock().unwrap(), id, &[])?,
            Undo::Resume(pid) => signal(pid, "-CONT"),
            Undo::Table(t) => return self.sandbox()?.remove_table(&t).map(Some),
            Undo::Unlimit(ip) => self.sandbox()?.limit(ip, None)?,
            Undo::Unfill(db) => self.sandbox()?.unfill(&db)?,
            Undo::Leave(id) => {
                remove(&mut cluster.lock().unwrap(), id)?;
                self.gone.insert(id);
            }
            Undo::Rejoin(id) => join(&mut cluster.lock().unwrap(), id)?,
            Undo::Replaced(id) => {
                let mut c = cluster.lock().unwrap();
                start(&mut c, id, &[])?;
                let seen = check_build(&c, id)?;
                self.notes.push(seen);
            }
        }
        Ok(None)
    }
}

/// The version `bitclone --version` of a binary prints.
fn version_of(bin: &Path) -> Result<String, String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("{} --version printed {text:?}", bin.display()))
}

/// After a replace, waiting at most 20 s (as a StatefulSet waits for a
/// pod to be Ready before the next): node `id` is ready, reports the
/// version of the build it was started on, and (once it heard from a peer;
/// on the previous build, if it reports versions) speaks with each peer it
/// heard from the
/// newest version both builds know: this build's newest between two of
/// this build, its oldest (the previous release's newest) when either
/// runs the previous build.
/// Says what it saw.
fn check_build(c: &TestCluster, id: u64) -> Result<String, String> {
    use bitclone_proto::peer_protocol::PEER_PROTOCOL;
    let version = version_of(c.build_of(id))?;
    let current = c.build_of(id) == crate::env::bin();
    let info = format!("bitclone_build_info{{version=\"{version}\"}} 1");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = c
            .node(id)
            .try_http("/metrics")
            .filter(|r| r.status == 200)
            .map(|r| r.body)
            .unwrap_or_default();
        let protocols: Vec<(u64, u32)> = metrics
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("bitclone_peer_protocol{peer=\"")?;
                let (peer, value) = rest.split_once("\"} ")?;
                Some((peer.parse().ok()?, value.trim().parse().ok()?))
            })
            .collect();
        let heard = !current || !protocols.is_empty();
        let ready = c
            .node(id)
            .try_http("/readyz")
            .is_some_and(|r| r.status == 200);
        if metrics.contains(&info) && heard && ready {
            let mut seen = vec![format!("node {id} runs {version}")];
            for (peer, v) in protocols {
                // Two builds speak the newest version both know: this
                // build's newest between two of it, else the previous
                // release's newest, which is this build's oldest.
                let expected = if current && c.build_of(peer) == crate::env::bin() {
                    PEER_PROTOCOL.max
                } else {
                    PEER_PROTOCOL.min
                };
                let with = format!(
                    "peer protocol v{v} with node {peer} ({})",
                    version_of(c.build_of(peer))?
                );
                if v != expected {
                    return Err(format!("node {id} speaks {with}, not v{expected}"));
                }
                seen.push(with);
            }
            return Ok(seen.join(", "));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node {id} was not ready, reporting version {version}{}, within 20 s",
                if heard { "" } else { " and a peer protocol" }
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `bitclone job ID` through `node` as JSON, within `limit`; `None` when
/// it did not answer or refused.
fn job_view(node: &crate::node::TestNode, id: &str, limit: Duration) -> Option<serde_json::Value> {
    node.cli_within(&["--json", "job", id], limit)
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
}

/// Runs `cluster ARGS` through a member other than `not` (each in turn,
/// for at most 20 s): membership changes go through the leader.
fn membership(c: &TestCluster, not: u64, args: &[&str]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        for (id, n) in c.nodes.iter().filter(|(id, _)| **id != not) {
            let mut all = vec!["--json", "cluster"];
            all.extend_from_slice(args);
            match n.cli_within(&all, Duration::from_secs(15)) {
                Some(out) if out.status.success() => return Ok(()),
                Some(out) => {
                    last = format!(
                        "via node {id}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                }
                None => last = format!("via node {id}: no answer in 15 s"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!("cluster {}: {last}", args.join(" ")))
}

/// Starts node `id` (see [`TestCluster::start_node`]); a node that does
/// not come up is an error here, not the harness's end.
fn start(c: &mut TestCluster, id: u64, extra: &[String]) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.start_node(id, extra))).map_err(
        |p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("node {id} did not start: {}", tail(&why, 5))
        },
    )
}

/// Removes member `id` from the cluster, stops it and empties its data
/// directory (its tmpfs mount stays), so that it can join again afresh.
fn remove(c: &mut TestCluster, id: u64) -> Result<(), String> {
    let idarg = id.to_string();
    membership(c, id, &["remove", &idarg])?;
    if c.nodes.contains_key(&id) {
        c.kill9(id);
    }
    membership(c, id, &["allow-rejoin", &idarg])?;
    empty_dir(&c.node_dir(id)).map_err(|e| format!("emptying node {id}'s directory: {e}"))
}

/// Starts node `id` with an empty store, joining through a member, and
/// waits (at most 60 s) until the leader counts it a voter.
fn join(c: &mut TestCluster, id: u64) -> Result<(), String> {
    let seed = c
        .nodes
        .iter()
        .find(|(other, _)| **other != id)
        .map(|(_, n)| n.endpoint.clone())
        .ok_or("no member to join through")?;
    start(c, id, &["--join".to_string(), seed])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let voter = c
            .nodes
            .keys()
            .filter(|m| **m != id)
            .any(|m| c.is_voter(*m, id));
        if voter {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node {id} was not a voter 60 s after starting to join"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes everything under `dir`, and everything under its `db` (which
/// may be a mount point, kept).
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_name() == "db" {
            empty_dir(&e.path())?;
        } else if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Rewrites one file of the tree at `root` and adds one.
fn edit_tree(root: &Path, rng: &mut rand::rngs::StdRng, version: u64) {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect();
    files.sort();
    if !files.is_empty() {
        let f = &files[rng.random_range(0..files.len())];
        let len = rng.random_range(1..4096);
        std::fs::write(f, random_bytes(rng, len)).unwrap();
    }
    let len = rng.random_range(1..4096);
    std::fs::write(
        root.join(format!("edit-{version}.bin")),
        random_bytes(rng, len),
    )
    .unwrap();
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
            let Some(m) = n.try_http("/metrics").map(|r| r.body) else {
                return false;
            };
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
    let puts: Vec<(String, String)> = history
        .iter()
        .filter_map(|o| match (&o.kind, &o.outcome) {
            (
                OpKind::Put {
                    dataset,
                    snapshot: Some(s),
                    ..
                },
                Outcome::Ok,
            ) => Some((dataset.clone(), s.clone())),
            _ => None,
        })
        .collect();
    // One reader per node, at once.
    let reads: Vec<FinalRead> = std::thread::scope(|scope| {
        let readers: Vec<_> = nodes
            .iter()
            .map(|(id, endpoint)| {
                let puts = &puts;
                scope.spawn(move || read_back(*id, endpoint, puts, dir, ca, token))
            })
            .collect();
        readers
            .into_iter()
            .flat_map(|r| r.join().expect("a final reader"))
            .collect()
    });
    FinalState {
        nodes: nodes.iter().map(|(id, _)| *id).collect(),
        reads,
        jobs: Vec::new(),
        sinks: Vec::new(),
        healed_after_ms,
    }
}

/// The longest a call of the final reads may take.
const FINAL_CALL: Duration = Duration::from_secs(60);

/// Every job a client (or the harness) saw submitted, as the cluster has
/// it once it ended (waited for, at most 120 s in all): the oracle's view,
/// and the jobs themselves.
fn final_jobs(
    endpoints: &[String],
    history: &[Op],
    ca: &[u8],
    token: &str,
) -> (Vec<FinalJob>, BTreeMap<String, bitclone_client::proto::Job>) {
    let ids: Vec<&str> = history
        .iter()
        .filter_map(|o| match (&o.kind, &o.outcome) {
            (OpKind::Clone { job: Some(id), .. }, Outcome::Ok) => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let mut views = BTreeMap::new();
    if ids.is_empty() {
        return (Vec::new(), views);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let client = loop {
        match rt.block_on(connect(endpoints, ca, token)) {
            Ok(c) => break Some(c),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            Err(_) => break None,
        }
    };
    for id in &ids {
        let Some(client) = &client else { break };
        loop {
            let j = within_for(&rt, FINAL_CALL, client.get_job(id))
                .ok()
                .and_then(|r| r.ok());
            let done = j
                .as_ref()
                .is_some_and(|j| bitclone_client::is_final(j.state));
            if let Some(j) = j {
                views.insert(id.to_string(), j);
            }
            if done || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let jobs = views
        .values()
        .map(|j| FinalJob {
            id: j.id.clone(),
            state: bitclone_client::job_state_name(j.state).to_string(),
            error: j.last_error.clone(),
        })
        .collect();
    (jobs, views)
}

/// Every snapshot of `puts` read back through node `id`.
fn read_back(
    id: u64,
    endpoint: &str,
    puts: &[(String, String)],
    dir: &Path,
    ca: &[u8],
    token: &str,
) -> Vec<FinalRead> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(connect(&[endpoint.to_string()], ca, token));
    puts.iter()
        .enumerate()
        .map(|(k, (dataset, snapshot))| {
            let out = dir.join(format!("final-{id}-{k}"));
            let digest = match &client {
                Ok(client) => within_for(
                    &rt,
                    FINAL_CALL,
                    client.download(dataset, Some(snapshot), &out, &bitclone_client::NoProgress),
                )
                .map_err(|_| format!("no answer in {FINAL_CALL:?}"))
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map(|_| digest_of(&out)),
                Err(e) => Err(e.clone()),
            };
            let _ = std::fs::remove_dir_all(&out);
            FinalRead {
                node: id,
                dataset: dataset.clone(),
                snapshot: snapshot.clone(),
                digest,
            }
        })
        .collect()
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
    interval_ms: u64,
    /// Where submitted jobs are registered; `None`: no sinks, no jobs.
    jobs: Option<JobRegistry>,
}

/// Each operation's deadline, as a client with a deadline would set one:
/// past it a put's outcome is unknown and the connection is replaced.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Runs `fut` on `rt` for at most [`OP_TIMEOUT`] (`Err`: it timed out).
fn within<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    within_for(rt, OP_TIMEOUT, fut)
}

/// Runs `fut` on `rt` for at most `limit` (the timer made inside it).
fn within_for<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    rt.block_on(async { tokio::time::timeout(limit, fut).await })
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
        // Jobs this client submitted (acknowledged).
        let mut mine: Vec<String> = Vec::new();
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
            // Puts 40%, reads 30%; with sinks, clone jobs 6%, watches 10%
            // and cancels 4%; cluster status the rest.
            let pick = rng.random_range(0..100);
            let jobs = self.jobs.as_ref().filter(|_| !acked.is_empty());
            let ok = if pick < 40 || acked.is_empty() {
                // A put: a new tree, or the client's dataset edited.
                let dataset = format!("c{}-{}", self.client, rng.random_range(0..3));
                version += 1;
                // Half the time an incremental put: the dataset's last tree
                // with a file rewritten and one added (the rest dedups).
                let src = self.dir.join(format!("ws-{dataset}"));
                if src.exists() && rng.random_bool(0.5) {
                    edit_tree(&src, &mut rng, version);
                } else {
                    let _ = std::fs::remove_dir_all(&src);
                    generate_tree(&src, self.seed ^ version, 8, 0);
                }
                let digest = digest_of(&src);
                let r = within(
                    &rt,
                    client.upload_dir(&dataset, &src, &bitclone_client::NoProgress),
                );
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
            } else if let (Some(jobs), 80..86) = (jobs, pick) {
                let (dataset, snapshot, digest) = acked[rng.random_range(0..acked.len())].clone();
                let job_dataset = format!("j{}-{n}", self.client);
                let r = within(
                    &rt,
                    client.submit_clone(
                        &job_dataset,
                        &format!("snapshot://{dataset}@{snapshot}"),
                        &JobSinks::destinations(&job_dataset),
                        0,
                    ),
                );
                let (job, outcome) = match r {
                    Ok(Ok(j)) => (Some(j.id), Outcome::Ok),
                    Ok(Err(e)) => (None, Outcome::Unknown(e.to_string())),
                    Err(_) => (None, Outcome::Unknown("timed out".into())),
                };
                if let Some(id) = &job {
                    mine.push(id.clone());
                    jobs.lock()
                        .unwrap()
                        .push((id.clone(), job_dataset.clone(), digest));
                }
                let kind = OpKind::Clone {
                    dataset: job_dataset,
                    snapshot,
                    job,
                };
                self.record(invoked, kind, outcome)
            } else if let (false, 86..96) = (mine.is_empty(), pick) {
                // A watch: the job as its stream first shows it.
                let job = mine[rng.random_range(0..mine.len())].clone();
                let r = within(&rt, async {
                    use futures::StreamExt;
                    let mut updates = client.watch_job(&job).await?;
                    updates.next().await.unwrap_or_else(|| {
                        Err(bitclone_client::Error::Config(
                            "the watch ended without an update".into(),
                        ))
                    })
                });
                match r {
                    Ok(Ok(j)) => {
                        let kind = OpKind::Watch {
                            job,
                            state: bitclone_client::job_state_name(j.state).to_string(),
                            token: j.fencing_token,
                        };
                        self.record(invoked, kind, Outcome::Ok)
                    }
                    Ok(Err(e)) => {
                        let kind = OpKind::Watch {
                            job,
                            state: String::new(),
                            token: 0,
                        };
                        self.record(invoked, kind, Outcome::Failed(e.to_string()))
                    }
                    Err(_) => {
                        let kind = OpKind::Watch {
                            job,
                            state: String::new(),
                            token: 0,
                        };
                        self.record(invoked, kind, Outcome::Failed("timed out".into()))
                    }
                }
            } else if let (false, 96..100) = (mine.is_empty(), pick) {
                let job = mine[rng.random_range(0..mine.len())].clone();
                let outcome = match within(&rt, client.cancel_job(&job)) {
                    Ok(Ok(_)) => Outcome::Ok,
                    Ok(Err(e)) => Outcome::Unknown(e.to_string()),
                    Err(_) => Outcome::Unknown("timed out".into()),
                };
                self.record(invoked, OpKind::Cancel { job }, outcome)
            } else if pick < 70 {
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
            // Paced: a client starts an operation at most every interval.
            let next = self.started + Duration::from_millis(invoked + self.interval_ms);
            if !sleep_until(next) {
                break;
            }
        }
    }
}
