//! The many-files profile: per-file overhead rather than throughput.
//!
//! A deterministic tree (from `--seed`) of many small files: lognormal sizes
//! around 4 KiB (median 4 KiB, sigma 1, at most 1 MiB), 1000 files per leaf
//! directory two levels down (like an image dataset's class directories),
//! random (incompressible) contents, and one relative symlink per 1000 files
//! pointing at a file of the tree. Then each tool in turn, on that same tree:
//! a cold put, an incremental put after 0.1% of the files were rewritten
//! (new contents and sizes) and a few added and deleted, and a restore into a
//! fresh directory, checked against the source. The tree is put back as
//! generated after each tool, and each tool's storage removed, so the disk
//! holds one tool's data at a time.
//!
//! Tools: bitclone on 1 node and on 3 (put through node 1, get through node
//! 2), restic (`--restic`), `rsync -a`, and `cp -r` (no incremental step).
//! Every step is timed until a `sync` after it returns, so that no tool gains
//! by leaving dirty pages behind. Peak RSS comes from VmHWM in /proc, sampled
//! while the step's process runs (with its children: rsync forks); a node's
//! peak is reset before each step through /proc/PID/clear_refs.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Map, Value};

use bitclone_chaos::{TestCluster, TestNode};

use crate::report::{fmt_bytes, thousands, Measure, Report, ToolRow};
use crate::{
    compare_trees_with, get_f64, get_u64, parse_json_output, peak_rss, r3, restic,
    restic_available, run_checked, secs, sync, walk, write_random, Args, Links, Progress, BUF_LEN,
    DATASET,
};

/// `--files-count` by default.
pub const DEFAULT_FILES: usize = 100_000;
/// `--million`.
const MILLION: usize = 1_000_000;
const MEDIAN_SIZE: f64 = 4096.0;
/// Sigma of ln(size): about two thirds of the files between 1.5 and 11 KiB.
const SIGMA: f64 = 1.0;
const MAX_SIZE: u64 = 1 << 20;
const FILES_PER_DIR: usize = 1000;
/// Leaf directories are spread over this many top-level ones.
const TOP_DIRS: usize = 10;
const LINK_EVERY: usize = 1000;
/// Fraction of the files rewritten before the incremental put.
const EDIT_FRACTION: f64 = 0.001;
const STEPS: [&str; 3] = ["cold put", "incremental put", "restore"];
/// How often a running step's peak RSS is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// Processes followed in one step (the command and its descendants).
const MAX_TRACKED: usize = 256;
/// How long the third replica may take to catch up after a put.
const REPLICATION_WAIT: Duration = Duration::from_secs(600);

// ------------------------------------------------------------------ tree

struct Link {
    /// Where the link is, relative to the root.
    rel: PathBuf,
    /// What it points to, relative to its directory.
    target: PathBuf,
    /// The file it points to.
    to: usize,
}

/// The generated tree; file `i` is at `file_rel(i)`.
struct Tree {
    sizes: Vec<u32>,
    seeds: Vec<u64>,
    links: Vec<Link>,
    bytes: u64,
}

/// The edit before the incremental put.
struct Edit {
    /// (file, new size, new seed): new contents, and a size that differs
    /// from the old one, so that no tool may skip it on size and mtime.
    rewrite: Vec<(usize, u64, u64)>,
    /// Files deleted; never a symlink's target.
    delete: Vec<usize>,
    /// (path, size, seed) of new files.
    add: Vec<(PathBuf, u64, u64)>,
}

fn leaf_dir(i: usize) -> String {
    let leaf = i / FILES_PER_DIR;
    format!("p{}/c{leaf:05}", leaf % TOP_DIRS)
}

fn file_rel(i: usize) -> PathBuf {
    PathBuf::from(format!("{}/f{i:07}.bin", leaf_dir(i)))
}

/// A lognormal size around MEDIAN_SIZE, at most MAX_SIZE. The normal draw is
/// Box–Muller's, so the sizes depend on nothing but the seed and `rand`.
fn lognormal_size(rng: &mut StdRng) -> u64 {
    // 1 - [0, 1) is (0, 1]: ln stays finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    let size = (MEDIAN_SIZE.ln() + SIGMA * z).exp().round();
    if size.is_finite() && size < MAX_SIZE as f64 {
        size as u64
    } else {
        MAX_SIZE
    }
}

fn make_tree(n: usize, rng: &mut StdRng) -> Tree {
    let mut sizes = Vec::with_capacity(n);
    for _ in 0..n {
        sizes.push(u32::try_from(lognormal_size(rng)).unwrap_or(u32::MAX));
    }
    let seeds: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
    let mut links = Vec::new();
    for k in 0..n.div_ceil(LINK_EVERY) {
        let to = rng.random_range(0..n);
        links.push(Link {
            rel: Path::new(&leaf_dir((k * LINK_EVERY).min(n - 1))).join(format!("link-{k:05}")),
            // From a leaf directory, ../.. is the root: the link stays
            // inside the tree wherever the tree is copied.
            target: Path::new("../..").join(file_rel(to)),
            to,
        });
    }
    let bytes = sizes.iter().map(|&s| u64::from(s)).sum();
    Tree {
        sizes,
        seeds,
        links,
        bytes,
    }
}

fn make_edit(tree: &Tree, rng: &mut StdRng) -> Edit {
    let n = tree.sizes.len();
    let k = ((n as f64 * EDIT_FRACTION).round() as usize).max(1);
    let few = (k / 10).max(1);
    let targets: HashSet<usize> = tree.links.iter().map(|l| l.to).collect();
    // Enough candidates for the deletions even if many are link targets.
    let picked = rand::seq::index::sample(rng, n, (k + few + targets.len()).min(n));
    let mut delete = Vec::new();
    let mut rewrite = Vec::new();
    for i in picked.iter() {
        if delete.len() < few && !targets.contains(&i) {
            delete.push(i);
        } else if rewrite.len() < k {
            let old = u64::from(tree.sizes[i]);
            let mut size = lognormal_size(rng);
            if size == old {
                size = if size < MAX_SIZE { size + 1 } else { size - 1 };
            }
            rewrite.push((i, size, rng.next_u64()));
        }
    }
    let mut add = Vec::with_capacity(few);
    for j in 0..few {
        let near = rng.random_range(0..n);
        let rel = Path::new(&leaf_dir(near)).join(format!("added-{j:04}.bin"));
        add.push((rel, lognormal_size(rng), rng.next_u64()));
    }
    Edit {
        rewrite,
        delete,
        add,
    }
}

fn generate(tree: &Tree, src: &Path, p: &Progress) -> Result<()> {
    let mut buf = vec![0u8; BUF_LEN];
    let n = tree.sizes.len();
    let mut made_leaf = None;
    for (i, (&size, &seed)) in tree.sizes.iter().zip(&tree.seeds).enumerate() {
        let leaf = i / FILES_PER_DIR;
        if made_leaf != Some(leaf) {
            let dir = src.join(leaf_dir(i));
            fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            made_leaf = Some(leaf);
        }
        write_random(&src.join(file_rel(i)), u64::from(size), seed, &mut buf)?;
        if (i + 1) * 10 / n != i * 10 / n {
            p.say(&format!("  generated {}%", (i + 1) * 100 / n));
        }
    }
    for link in &tree.links {
        let path = src.join(&link.rel);
        symlink(&link.target, &path).with_context(|| format!("symlink {}", path.display()))?;
    }
    Ok(())
}

// ------------------------------------------------------------------ measuring

/// Runs a command to completion like `run_checked`, with its wall time and
/// the peak RSS of it and its descendants (summed over processes).
fn run_measured(cmd: &mut Command, what: &str) -> Result<(Output, f64, Option<u64>)> {
    let t = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let pid = child.id();
    let stop = AtomicBool::new(false);
    let (out, seconds, rss) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample_peak_rss(pid, &stop));
        let out = child.wait_with_output();
        let seconds = secs(t.elapsed());
        stop.store(true, Ordering::Relaxed);
        (out, seconds, sampler.join().ok().flatten())
    });
    let out = out.with_context(|| format!("wait for {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((out, seconds, rss))
}

/// Reads VmHWM of `root` and its descendants every SAMPLE_EVERY until
/// `stop`; returns the sum of each process's largest value. A process that
/// lives less than one interval may be missed.
fn sample_peak_rss(root: u32, stop: &AtomicBool) -> Option<u64> {
    let mut peaks: HashMap<u32, u64> = HashMap::new();
    loop {
        let mut stack = vec![root];
        let mut seen = 0;
        while let Some(pid) = stack.pop() {
            seen += 1;
            if seen > MAX_TRACKED {
                break;
            }
            if let Ok(rss) = peak_rss(pid) {
                let peak = peaks.entry(pid).or_insert(0);
                *peak = (*peak).max(rss);
            }
            stack.extend(child_pids(pid));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    if peaks.is_empty() {
        None
    } else {
        Some(peaks.values().sum())
    }
}

/// Children of every thread of `pid` (/proc/PID/task/TID/children).
fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Resets the peak RSS of each process (Linux: `5` to clear_refs), so that
/// a node's VmHWM covers the next step only. False if any refused.
fn reset_peak_rss(pids: &[u32]) -> bool {
    let mut all = true;
    for pid in pids {
        if fs::write(format!("/proc/{pid}/clear_refs"), "5").is_err() {
            all = false;
        }
    }
    all
}

/// The largest VmHWM among the processes.
fn max_peak_rss(pids: &[u32]) -> Option<u64> {
    pids.iter().filter_map(|&pid| peak_rss(pid).ok()).max()
}

/// A step's command: its own time, the `sync` after it, and its peak RSS.
struct Timed {
    out: Output,
    tool_s: f64,
    sync_s: f64,
    rss: Option<u64>,
}

impl Timed {
    fn measure(&self, files: u64, node_rss: Option<u64>) -> Measure {
        Measure {
            seconds: self.tool_s + self.sync_s,
            files,
            peak_rss: self.rss,
            node_rss,
        }
    }

    fn json(&self, m: &Measure) -> Value {
        json!({
            "seconds": r3(m.seconds),
            "tool_seconds": r3(self.tool_s),
            "sync_seconds": r3(self.sync_s),
            "files": m.files,
            "files_per_s": m.files_per_s().map(r3),
            "peak_rss_bytes": m.peak_rss,
            "node_peak_rss_bytes": m.node_rss,
        })
    }
}

fn timed(cmd: &mut Command, what: &str) -> Result<Timed> {
    let (out, tool_s, rss) = run_measured(cmd, what)?;
    let sync_s = sync()?;
    Ok(Timed {
        out,
        tool_s,
        sync_s,
        rss,
    })
}

// ------------------------------------------------------------------ tools

/// What every tool works on.
struct Ctx<'a> {
    bin: &'a Path,
    /// The work dir, absolute (restic restores under the absolute path).
    work: &'a Path,
    src: PathBuf,
    tree: &'a Tree,
    edit: &'a Edit,
    p: &'a Progress,
    /// Set when a node's peak RSS could not be reset before a step.
    rss_reset_failed: Cell<bool>,
}

/// A tool's figures per step (`None`: no such step) and its JSON.
type Outcome = (Vec<Option<Measure>>, Value);

impl Ctx<'_> {
    /// The CLI with a manifest page cache of `b`'s own, in the work dir:
    /// never the user's, never shared between tools or runs (a cache filled
    /// by an earlier run would flatter the incremental put).
    fn cli(&self, b: &Bitclone) -> Command {
        let mut cmd = Command::new(self.bin);
        cmd.envs(b.env.clone());
        cmd.env(
            "BITCLONE_CACHE_DIR",
            self.work.join("client-cache").join(b.key),
        );
        cmd
    }

    fn files_before(&self) -> u64 {
        self.tree.sizes.len() as u64
    }

    fn files_after(&self) -> u64 {
        self.files_before() + self.edit.add.len() as u64 - self.edit.delete.len() as u64
    }

    fn apply_edit(&self) -> Result<()> {
        let mut buf = vec![0u8; BUF_LEN];
        for &(i, size, seed) in &self.edit.rewrite {
            write_random(&self.src.join(file_rel(i)), size, seed, &mut buf)?;
        }
        for &i in &self.edit.delete {
            let path = self.src.join(file_rel(i));
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        for (rel, size, seed) in &self.edit.add {
            write_random(&self.src.join(rel), *size, *seed, &mut buf)?;
        }
        sync()?;
        self.p.say(&format!(
            "  edited: {} files rewritten, {} added, {} deleted",
            self.edit.rewrite.len(),
            self.edit.add.len(),
            self.edit.delete.len()
        ));
        Ok(())
    }

    /// Puts the tree back as generated (same contents; new mtimes), whether
    /// or not the edit was applied.
    fn revert_edit(&self) -> Result<()> {
        let mut buf = vec![0u8; BUF_LEN];
        let touched = self.edit.rewrite.iter().map(|r| r.0);
        for i in touched.chain(self.edit.delete.iter().copied()) {
            let (size, seed) = (u64::from(self.tree.sizes[i]), self.tree.seeds[i]);
            write_random(&self.src.join(file_rel(i)), size, seed, &mut buf)?;
        }
        for (rel, _, _) in &self.edit.add {
            let path = self.src.join(rel);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("remove {}", path.display()));
                }
            }
        }
        sync()?;
        Ok(())
    }

    /// A fresh restore target `<work>/restore/<key>` (absent; parent made).
    fn restore_dir(&self, key: &str) -> Result<PathBuf> {
        let parent = self.work.join("restore");
        fs::create_dir_all(&parent).with_context(|| format!("mkdir {}", parent.display()))?;
        let dst = parent.join(key);
        remove_tree(&dst)?;
        Ok(dst)
    }

    fn say_step(&self, tool: &str, step: &str, m: &Measure) {
        let rate = m
            .files_per_s()
            .map_or_else(|| "-".to_string(), |r| thousands(r.round() as u64));
        let rss = m.peak_rss.map_or_else(|| "-".to_string(), fmt_bytes);
        let node = m
            .node_rss
            .map(|b| format!(", node {}", fmt_bytes(b)))
            .unwrap_or_default();
        self.p.say(&format!(
            "{tool} {step}: {:.2} s, {rate} files/s, peak RSS {rss}{node}",
            m.seconds
        ));
    }

    /// Checks a restored tree against the source; removes it once checked.
    fn verify(&self, restored: &Path, links: Links, remove: &Path) -> Result<usize> {
        let n = compare_trees_with(&self.src, restored, links)
            .with_context(|| format!("checking {} against the source", restored.display()))?;
        self.p
            .say(&format!("  restore checked: {n} files identical"));
        remove_tree(remove)?;
        Ok(n)
    }
}

fn remove_tree(path: &Path) -> Result<()> {
    if path.exists() {
        fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

fn dir_bytes(path: &Path) -> Result<u64> {
    Ok(walk(path)?.iter().map(|(_, len)| len).sum())
}

/// First line of `program arg`'s output (its version), if it runs.
fn version_of(program: &str, arg: &str) -> Option<String> {
    let out = Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next()?.trim().to_string())
}

fn rsync_available() -> bool {
    crate::tool_available("rsync", "--version")
}

/// `dir/`: rsync copies a directory's contents, not the directory.
fn with_slash(dir: &Path) -> OsString {
    let mut s = dir.as_os_str().to_os_string();
    s.push("/");
    s
}

/// Where bitclone puts and gets, and the node processes to watch.
struct Bitclone<'a> {
    name: &'a str,
    key: &'a str,
    put_endpoint: String,
    get_endpoint: String,
    pids: Vec<u32>,
    /// BITCLONE_CA and BITCLONE_TOKEN_FILE for the CLI.
    env: Vec<(&'static str, PathBuf)>,
    /// Other replicas a put reaches (0 on one node): waited for, untimed,
    /// so that the next step starts on a settled cluster and the get
    /// through another node finds the snapshot there.
    other_replicas: u64,
}

fn bytes_replicated(bin: &Path, b: &Bitclone) -> Result<u64> {
    let out = run_checked(
        Command::new(bin)
            .envs(b.env.clone())
            .arg("--endpoint")
            .arg(&b.put_endpoint)
            .args(["--json", "stats"]),
        "bitclone stats",
    )?;
    // Chunks and manifest pages: a replica holds the snapshot once both
    // (and the root, sent last) arrived.
    let v = parse_json_output(&out.stdout)?;
    Ok(get_u64(&v, "bytes_replicated")? + get_u64(&v, "page_bytes_replicated")?)
}

/// A put through `b`, timed; then, on a cluster, the wait for every replica.
/// Returns (timing, the put's JSON, node peak RSS, seconds until every
/// replica held the snapshot, if seen).
fn bitclone_put(c: &Ctx, b: &Bitclone) -> Result<(Timed, Value, Option<u64>, Option<f64>)> {
    let before = if b.other_replicas > 0 {
        Some(bytes_replicated(c.bin, b)?)
    } else {
        None
    };
    if !reset_peak_rss(&b.pids) {
        c.rss_reset_failed.set(true);
    }
    let t0 = Instant::now();
    let t = timed(
        c.cli(b)
            .arg("--endpoint")
            .arg(&b.put_endpoint)
            .args(["--json", "put"])
            .arg(&c.src)
            .args(["--dataset", DATASET]),
        "bitclone put",
    )?;
    let node_rss = max_peak_rss(&b.pids);
    let v = parse_json_output(&t.out.stdout)?;
    let mut all_replicas = None;
    if let Some(before) = before {
        // Each replica adds what it was sent (the new chunks, at least) to
        // the writer's counter once it holds the snapshot.
        let want = before
            + b.other_replicas * (get_u64(&v, "new_bytes")? + get_u64(&v, "new_page_bytes")?);
        let deadline = Instant::now() + REPLICATION_WAIT;
        loop {
            let have = bytes_replicated(c.bin, b)?;
            if have >= want {
                all_replicas = Some(secs(t0.elapsed()));
                break;
            }
            if Instant::now() > deadline {
                // Not fatal: a node fetches what it lacks from a replica
                // when read; the get may just be slower for it.
                c.p.say(&format!(
                    "  WARNING: the other replicas did not catch up within {} s \
                     ({have} of {want} bytes replicated); going on",
                    REPLICATION_WAIT.as_secs()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok((t, v, node_rss, all_replicas))
}

fn bitclone_steps(c: &Ctx, b: &Bitclone) -> Result<Outcome> {
    let (cold, cold_v, node_rss, cold_all) = bitclone_put(c, b)?;
    let m_cold = cold.measure(c.files_before(), node_rss);
    c.say_step(b.name, STEPS[0], &m_cold);
    // A bitclone that does not store symlinks lists them as skipped; its
    // restore is then checked for the regular files and no symlinks.
    let skipped = cold_v
        .get("skipped")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let links = if skipped > 0 {
        Links::Dropped
    } else {
        Links::Kept
    };

    c.apply_edit()?;
    let (inc, inc_v, node_rss, inc_all) = bitclone_put(c, b)?;
    let m_inc = inc.measure(c.files_after(), node_rss);
    c.say_step(b.name, STEPS[1], &m_inc);

    let dst = c.restore_dir(b.key)?;
    if !reset_peak_rss(&b.pids) {
        c.rss_reset_failed.set(true);
    }
    let get = timed(
        c.cli(b)
            .arg("--endpoint")
            .arg(&b.get_endpoint)
            .args(["--json", "get", "--dataset", DATASET])
            .arg(&dst),
        "bitclone get",
    )?;
    let m_get = get.measure(c.files_after(), max_peak_rss(&b.pids));
    c.say_step(b.name, STEPS[2], &m_get);
    // The restore's own syncfs: the disk's share of its time, which on a
    // shared or busy disk varies several-fold from run to run.
    let get_sync = get_f64(&parse_json_output(&get.out.stdout)?, "sync_seconds");
    if let Some(s) = get_sync {
        c.p.say(&format!("  restore: {s:.2} s of it in the final syncfs"));
    }
    let verified = c.verify(&dst, links, &dst)?;

    let v = json!({
        "cold": cold.json(&m_cold),
        "cold_reported_seconds": get_f64(&cold_v, "seconds"),
        "cold_new_bytes": get_u64(&cold_v, "new_bytes").ok(),
        "cold_all_replicas_seconds": cold_all.map(r3),
        "incremental": inc.json(&m_inc),
        "incremental_reported_seconds": get_f64(&inc_v, "seconds"),
        "incremental_new_bytes": get_u64(&inc_v, "new_bytes").ok(),
        "incremental_all_replicas_seconds": inc_all.map(r3),
        "restore": get.json(&m_get),
        "restore_sync_seconds": get_sync,
        "files_verified": verified,
        "entries_skipped": skipped,
    });
    Ok((vec![Some(m_cold), Some(m_inc), Some(m_get)], v))
}

fn set(v: &mut Value, key: &str, value: Value) {
    if let Some(obj) = v.as_object_mut() {
        obj.insert(key.to_string(), value);
    }
}

fn bitclone_one(c: &Ctx) -> Result<Outcome> {
    let node_dir = c.work.join("node");
    // Logs to <work>/node.log; a failed start or unclean stop panics.
    let node = TestNode::spawn_bin(c.bin, &node_dir, "127.0.0.1:0", &[], &[]);
    let b = Bitclone {
        name: Tool::Bitclone1.name(),
        key: Tool::Bitclone1.key(),
        put_endpoint: node.endpoint.clone(),
        get_endpoint: node.endpoint.clone(),
        pids: vec![node.pid()],
        env: node.client_env(),
        other_replicas: 0,
    };
    let (steps, mut v) = bitclone_steps(c, &b)?;
    node.stop();
    set(&mut v, "store_bytes", json!(dir_bytes(&node_dir)?));
    remove_tree(&node_dir)?;
    Ok((steps, v))
}

fn bitclone_three(c: &Ctx) -> Result<Outcome> {
    // Certificates and node-N data dirs in the work dir itself, so the logs
    // (<work>/node-N.log) outlive a failure.
    let mut cluster = TestCluster::start_with_bin(c.bin, c.work, 3, 3, &[]);
    let b = Bitclone {
        name: Tool::Bitclone3.name(),
        key: Tool::Bitclone3.key(),
        put_endpoint: cluster.node(1).endpoint.clone(),
        get_endpoint: cluster.node(2).endpoint.clone(),
        pids: cluster.nodes.values().map(TestNode::pid).collect(),
        env: cluster.node(1).client_env(),
        other_replicas: 2,
    };
    let (steps, mut v) = bitclone_steps(c, &b)?;
    for node in std::mem::take(&mut cluster.nodes).into_values() {
        node.stop();
    }
    let mut store = 0;
    for id in 1..=3 {
        let dir = c.work.join(format!("node-{id}"));
        store += dir_bytes(&dir)?;
        remove_tree(&dir)?;
    }
    remove_tree(&c.work.join("certs"))?;
    set(&mut v, "store_bytes_all_nodes", json!(store));
    Ok((steps, v))
}

fn restic_steps(c: &Ctx) -> Result<Outcome> {
    let name = Tool::Restic.name();
    run_checked(restic(c.work).arg("init"), "restic init")?;
    let cold = timed(restic(c.work).arg("backup").arg(&c.src), "restic backup")?;
    let m_cold = cold.measure(c.files_before(), None);
    c.say_step(name, STEPS[0], &m_cold);

    c.apply_edit()?;
    let inc = timed(restic(c.work).arg("backup").arg(&c.src), "restic backup")?;
    let m_inc = inc.measure(c.files_after(), None);
    c.say_step(name, STEPS[1], &m_inc);

    let dst = c.restore_dir(Tool::Restic.key())?;
    let get = timed(
        restic(c.work)
            .args(["restore", "latest", "--target"])
            .arg(&dst),
        "restic restore",
    )?;
    let m_get = get.measure(c.files_after(), None);
    c.say_step(name, STEPS[2], &m_get);
    // restic restores a backup of /a/b under <target>/a/b.
    let rel = c
        .src
        .strip_prefix("/")
        .context("the source path is not absolute")?;
    let verified = c.verify(&dst.join(rel), Links::Kept, &dst)?;

    let repo = c.work.join("restic-repo");
    let repo_bytes = dir_bytes(&repo)?;
    remove_tree(&repo)?;
    remove_tree(&c.work.join("restic-cache"))?;
    let v = json!({
        "version": version_of("restic", "version"),
        "cold": cold.json(&m_cold),
        "incremental": inc.json(&m_inc),
        "restore": get.json(&m_get),
        "files_verified": verified,
        "repo_bytes": repo_bytes,
    });
    Ok((vec![Some(m_cold), Some(m_inc), Some(m_get)], v))
}

fn rsync_steps(c: &Ctx) -> Result<Outcome> {
    let name = Tool::Rsync.name();
    let copy = c.work.join("rsync");
    let cold = timed(
        Command::new("rsync")
            .arg("-a")
            .arg(with_slash(&c.src))
            .arg(with_slash(&copy)),
        "rsync -a",
    )?;
    let m_cold = cold.measure(c.files_before(), None);
    c.say_step(name, STEPS[0], &m_cold);

    c.apply_edit()?;
    // --delete: the copy loses the deleted files too.
    let inc = timed(
        Command::new("rsync")
            .args(["-a", "--delete"])
            .arg(with_slash(&c.src))
            .arg(with_slash(&copy)),
        "rsync -a --delete",
    )?;
    let m_inc = inc.measure(c.files_after(), None);
    c.say_step(name, STEPS[1], &m_inc);

    let dst = c.restore_dir(Tool::Rsync.key())?;
    let get = timed(
        Command::new("rsync")
            .arg("-a")
            .arg(with_slash(&copy))
            .arg(with_slash(&dst)),
        "rsync -a (restore)",
    )?;
    let m_get = get.measure(c.files_after(), None);
    c.say_step(name, STEPS[2], &m_get);
    let verified = c.verify(&dst, Links::Kept, &dst)?;
    remove_tree(&copy)?;
    let v = json!({
        "version": version_of("rsync", "--version"),
        "cold": cold.json(&m_cold),
        "incremental": inc.json(&m_inc),
        "restore": get.json(&m_get),
        "files_verified": verified,
    });
    Ok((vec![Some(m_cold), Some(m_inc), Some(m_get)], v))
}

/// No incremental mode: the copy and its restore are of the unedited tree.
fn cp_steps(c: &Ctx) -> Result<Outcome> {
    let name = Tool::Cp.name();
    let copy = c.work.join("cp");
    let cold = timed(Command::new("cp").arg("-r").arg(&c.src).arg(&copy), "cp -r")?;
    let m_cold = cold.measure(c.files_before(), None);
    c.say_step(name, STEPS[0], &m_cold);

    let dst = c.restore_dir(Tool::Cp.key())?;
    let get = timed(
        Command::new("cp").arg("-r").arg(&copy).arg(&dst),
        "cp -r (restore)",
    )?;
    let m_get = get.measure(c.files_before(), None);
    c.say_step(name, STEPS[2], &m_get);
    let verified = c.verify(&dst, Links::Kept, &dst)?;
    remove_tree(&copy)?;
    let v = json!({
        "cold": cold.json(&m_cold),
        "incremental": null,
        "restore": get.json(&m_get),
        "files_verified": verified,
    });
    Ok((vec![Some(m_cold), None, Some(m_get)], v))
}

#[derive(Clone, Copy)]
enum Tool {
    Bitclone1,
    Bitclone3,
    Restic,
    Rsync,
    Cp,
}

impl Tool {
    const ALL: [Tool; 5] = [
        Tool::Bitclone1,
        Tool::Bitclone3,
        Tool::Restic,
        Tool::Rsync,
        Tool::Cp,
    ];

    /// As in the report.
    fn name(self) -> &'static str {
        match self {
            Tool::Bitclone1 => "bitclone (1 node)",
            Tool::Bitclone3 => "bitclone (3 nodes)",
            Tool::Restic => "restic",
            Tool::Rsync => "rsync -a",
            Tool::Cp => "cp -r",
        }
    }

    /// As in the JSON and the restore directories.
    fn key(self) -> &'static str {
        match self {
            Tool::Bitclone1 => "bitclone-1",
            Tool::Bitclone3 => "bitclone-3",
            Tool::Restic => "restic",
            Tool::Rsync => "rsync",
            Tool::Cp => "cp",
        }
    }

    /// Why the tool is not run, if it is not.
    fn unavailable(self, args: &Args) -> Option<&'static str> {
        if !args.tools.is_empty() && !args.tools.iter().any(|t| t == self.key()) {
            return Some("not in --tools");
        }
        match self {
            Tool::Restic if !args.restic => Some("pass --restic"),
            Tool::Restic if !restic_available() => {
                Some("restic is not on PATH (scripts/install-deps.sh --bench installs it)")
            }
            Tool::Rsync if !rsync_available() => {
                Some("rsync is not on PATH (scripts/install-deps.sh --bench installs it)")
            }
            _ => None,
        }
    }

    fn run(self, c: &Ctx) -> Result<Outcome> {
        match self {
            Tool::Bitclone1 => bitclone_one(c),
            Tool::Bitclone3 => bitclone_three(c),
            Tool::Restic => restic_steps(c),
            Tool::Rsync => rsync_steps(c),
            Tool::Cp => cp_steps(c),
        }
    }
}

// ------------------------------------------------------------------ profile

/// Runs the profile in `work` (a prepared bench work dir): the JSON result
/// and the report.
pub fn bench(args: &Args, work: &Path, p: &Progress) -> Result<(Value, Report)> {
    let n = if args.million {
        MILLION
    } else {
        args.files_count
    };
    if n == 0 {
        bail!("--files-count must be at least 1");
    }
    if let Some(t) = args
        .tools
        .iter()
        .find(|t| !Tool::ALL.iter().any(|tool| tool.key() == t.as_str()))
    {
        bail!("--tools: unknown tool {t:?} (bitclone-1, bitclone-3, restic, rsync, cp)");
    }
    let work = fs::canonicalize(work).with_context(|| format!("resolve {}", work.display()))?;
    let src = work.join("src");
    let mut rng = StdRng::seed_from_u64(args.seed);
    let tree = make_tree(n, &mut rng);
    let edit = make_edit(&tree, &mut rng);
    p.say(&format!(
        "generating {} files ({} bytes) and {} symlinks in {}",
        thousands(n as u64),
        tree.bytes,
        tree.links.len(),
        src.display()
    ));
    let t = Instant::now();
    generate(&tree, &src, p)?;
    sync()?;
    let gen_s = secs(t.elapsed());
    p.say(&format!("generated in {gen_s:.1} s"));

    let c = Ctx {
        bin: &args.bitclone,
        work: &work,
        src,
        tree: &tree,
        edit: &edit,
        p,
        rss_reset_failed: Cell::new(false),
    };
    let mut rows = Vec::new();
    let mut tools = Map::new();
    let mut skipped = Map::new();
    let mut notes = Vec::new();
    for tool in Tool::ALL {
        if let Some(why) = tool.unavailable(args) {
            p.say(&format!("{}: not run ({why})", tool.name()));
            skipped.insert(tool.key().to_string(), json!(why));
            notes.push(format!("{} not run: {why}.", tool.name()));
            continue;
        }
        p.say(&format!("{}:", tool.name()));
        let (steps, v) = tool.run(&c).with_context(|| tool.name())?;
        // The next tool starts from the tree as generated.
        c.revert_edit()?;
        if tool.key().starts_with("bitclone") {
            let dropped = v["entries_skipped"].as_u64().unwrap_or(0);
            if dropped > 0 {
                notes.push(format!(
                    "{} left out {dropped} entries (the symlinks); its restore was checked \
                     for every regular file and no symlinks.",
                    tool.name()
                ));
            }
        }
        rows.push(ToolRow {
            tool: tool.name().to_string(),
            steps,
        });
        tools.insert(tool.key().to_string(), v);
    }

    let few = edit.add.len();
    let mut all_notes = vec![
        format!(
            "{} files, {}, lognormal sizes (median 4 KiB, sigma {SIGMA}, at most 1 MiB), \
                 {FILES_PER_DIR} per directory two levels down, {} relative symlinks; seed {}.",
            thousands(n as u64),
            fmt_bytes(tree.bytes),
            tree.links.len(),
            args.seed
        ),
        format!(
            "Incremental: {} files rewritten (new contents and sizes), {few} added, {} deleted. \
                 files/s counts every file in the tree, for the incremental step too.",
            edit.rewrite.len(),
            edit.delete.len()
        ),
        "Each step is timed until a `sync` after it returns. Every restore is checked \
             against the source, contents and symlink targets."
            .to_string(),
        format!(
            "peak RSS: the step's process and its children (VmHWM, read every {} ms); \
                 node peak RSS: the largest bitclone node during the step{}.",
            SAMPLE_EVERY.as_millis(),
            if c.rss_reset_failed.get() {
                " (could not be reset: since the node started)"
            } else {
                ""
            }
        ),
        "bitclone (3 nodes): put through node 1 (it returns once a majority holds the \
             snapshot; the bench then waits, untimed, for the third), get through node 2."
            .to_string(),
        "cp -r has no incremental step; its restore is a `cp -r` of the copy.".to_string(),
    ];
    all_notes.extend(notes);

    let out = json!({
        "profile": "many-files",
        "seed": args.seed,
        "dataset": {
            "files": n,
            "bytes": tree.bytes,
            "symlinks": tree.links.len(),
            "median_size": MEDIAN_SIZE,
            "sigma": SIGMA,
            "max_size": MAX_SIZE,
            "files_per_dir": FILES_PER_DIR,
        },
        "edit": {
            "rewritten": edit.rewrite.len(),
            "added": few,
            "deleted": edit.delete.len(),
            "files_after": c.files_after(),
        },
        "generate_seconds": r3(gen_s),
        "tools": tools,
        "not_run": skipped,
    });
    let report = Report {
        name: "many-files".to_string(),
        title: format!(
            "many-files: {} files, seconds per step",
            thousands(n as u64)
        ),
        steps: STEPS.into_iter().map(String::from).collect(),
        tools: rows,
        baseline: Tool::Restic.name().to_string(),
        notes: all_notes,
    };
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(n: usize, seed: u64) -> (Tree, Edit) {
        let mut rng = StdRng::seed_from_u64(seed);
        let t = make_tree(n, &mut rng);
        let e = make_edit(&t, &mut rng);
        (t, e)
    }

    #[test]
    fn generator_is_deterministic_and_lognormal() {
        let (a, ea) = tree(20_000, 7);
        let (b, eb) = tree(20_000, 7);
        assert_eq!(a.sizes, b.sizes);
        assert_eq!(a.seeds, b.seeds);
        assert_eq!(ea.rewrite, eb.rewrite);
        assert_eq!(ea.delete, eb.delete);
        let (c, _) = tree(20_000, 8);
        assert_ne!(a.sizes, c.sizes);

        let mut sizes = a.sizes.clone();
        sizes.sort_unstable();
        let median = sizes[sizes.len() / 2];
        assert!((3600..4600).contains(&median), "median {median}");
        assert!(sizes.iter().all(|&s| u64::from(s) <= MAX_SIZE));
        // Sigma 1: about 84% below e * median.
        let below = sizes
            .iter()
            .filter(|&&s| f64::from(s) < MEDIAN_SIZE * std::f64::consts::E)
            .count();
        let share = below as f64 / sizes.len() as f64;
        assert!((0.81..0.87).contains(&share), "share {share}");
        assert_eq!(a.links.len(), 20);
    }

    #[test]
    fn edit_counts_and_link_targets() {
        let (t, e) = tree(100_000, 1);
        assert_eq!(e.rewrite.len(), 100);
        assert_eq!(e.add.len(), 10);
        assert_eq!(e.delete.len(), 10);
        let targets: HashSet<usize> = t.links.iter().map(|l| l.to).collect();
        assert!(e.delete.iter().all(|i| !targets.contains(i)));
        for &(i, size, _) in &e.rewrite {
            assert_ne!(u64::from(t.sizes[i]), size);
            assert!(!e.delete.contains(&i));
        }
        // A tiny tree still gets an edit.
        let (t1, e1) = tree(1, 1);
        assert_eq!(t1.links.len(), 1);
        assert_eq!(e1.rewrite.len() + e1.delete.len(), 1);
        assert_eq!(e1.add.len(), 1);
    }

    #[test]
    fn paths_group_a_thousand_files_per_directory() {
        assert_eq!(file_rel(0), PathBuf::from("p0/c00000/f0000000.bin"));
        assert_eq!(file_rel(999), PathBuf::from("p0/c00000/f0000999.bin"));
        assert_eq!(file_rel(1000), PathBuf::from("p1/c00001/f0001000.bin"));
        assert_eq!(file_rel(12_345), PathBuf::from("p2/c00012/f0012345.bin"));
    }

    #[test]
    fn generate_edit_and_revert() {
        let dir = tempfile::tempdir().unwrap();
        let (t, e) = tree(1500, 3);
        let p = Progress { t0: Instant::now() };
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        generate(&t, &a, &p).unwrap();
        generate(&t, &b, &p).unwrap();
        assert_eq!(compare_trees_with(&a, &b, Links::Kept).unwrap(), 1500);
        // Every link resolves to a file of the tree.
        for l in &t.links {
            assert!(a.join(&l.rel).is_file(), "{} dangles", l.rel.display());
        }
        let c = Ctx {
            bin: Path::new("bitclone"),
            work: dir.path(),
            src: b.clone(),
            tree: &t,
            edit: &e,
            p: &p,
            rss_reset_failed: Cell::new(false),
        };
        c.apply_edit().unwrap();
        assert!(compare_trees_with(&a, &b, Links::Kept).is_err());
        assert_eq!(walk(&b).unwrap().len() as u64, c.files_after());
        c.revert_edit().unwrap();
        assert_eq!(compare_trees_with(&a, &b, Links::Kept).unwrap(), 1500);
        // Reverting twice changes nothing.
        c.revert_edit().unwrap();
        assert_eq!(compare_trees_with(&a, &b, Links::Kept).unwrap(), 1500);
    }

    #[test]
    fn tree_comparison_checks_symlinks_without_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for root in [&a, &b] {
            fs::create_dir_all(root.join("d")).unwrap();
            fs::write(root.join("d/f"), b"data").unwrap();
            fs::write(root.join("g"), b"other").unwrap();
        }
        symlink("d/f", a.join("l")).unwrap();
        // No symlink in b: fine only if the tool drops them.
        assert!(compare_trees_with(&a, &b, Links::Kept).is_err());
        assert_eq!(compare_trees_with(&a, &b, Links::Dropped).unwrap(), 2);
        // Same name, other target (with the same contents behind it).
        symlink("g", b.join("l")).unwrap();
        fs::write(b.join("g"), b"data").unwrap();
        fs::write(a.join("g"), b"data").unwrap();
        let err = compare_trees_with(&a, &b, Links::Kept).unwrap_err();
        assert!(err.to_string().contains("points to"), "{err}");
        fs::remove_file(b.join("l")).unwrap();
        symlink("d/f", b.join("l")).unwrap();
        assert_eq!(compare_trees_with(&a, &b, Links::Kept).unwrap(), 2);
        // A dangling link compares by target too.
        symlink("missing", a.join("dangling")).unwrap();
        symlink("missing", b.join("dangling")).unwrap();
        assert_eq!(compare_trees_with(&a, &b, Links::Kept).unwrap(), 2);
        // A symlink where the source has a file.
        fs::remove_file(b.join("g")).unwrap();
        symlink("d/f", b.join("g")).unwrap();
        assert!(compare_trees_with(&a, &b, Links::Kept).is_err());
    }

    #[test]
    fn peak_rss_of_a_child_is_sampled() {
        // sh keeps running while sleep (its child) does: both are sampled.
        let (out, seconds, rss) =
            run_measured(Command::new("sh").args(["-c", "sleep 0.3; true"]), "sh").unwrap();
        assert!(out.status.success());
        assert!(seconds >= 0.3);
        assert!(rss.is_some_and(|b| b > 0));
        assert!(run_measured(&mut Command::new("false"), "false").is_err());
    }
}
