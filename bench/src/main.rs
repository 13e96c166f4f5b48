//! `bitclone-bench`: bulk-clone throughput of one `bitclone` node, side by side
//! with `cp -r` + `sync` and, optionally, restic, on a generated dataset.
//!
//! Steps, in this order (restic must back up the original tree before the edit):
//! generate → `cp -r` baseline → restic cold backup → bitclone cold put →
//! [--s3: export the snapshot to a local Garage, and `rclone copy` the tree to
//! it] → edit → bitclone incremental put → [--s3: both again] → restic
//! incremental backup → optional restore + verify. One JSON object goes to
//! stdout; progress lines to stderr.
//!
//! The dataset is deterministic for a given `--seed`, `--size`, `--files`,
//! `--dup` and `--edit`. File contents are random bytes (incompressible), so
//! the numbers show chunking, hashing, dedup and storage, not compression.
//!
//! That is the `large` profile (the default). `--profile many-files` (module
//! `files`) times per-file overhead instead: 100,000 small files (or
//! `--million`) through bitclone on 1 and 3 nodes, restic, rsync and `cp -r`.
//! Either profile also writes a Markdown report with an SVG chart (module
//! `report`) to `--report`.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

use bitclone_chaos::servers;
use bitclone_chaos::TestNode;

mod files;
mod report;

const KIB: u64 = 1024;
/// Smallest generated file.
const MIN_FILE: u64 = KIB;
/// Size of the region overwritten in each edited file.
const EDIT_LEN: u64 = 4 * KIB;
/// Write buffer for generated files.
const BUF_LEN: usize = 1 << 20;
const DATASET: &str = "bench";
const RESTIC_PASSWORD: &str = "bitclone-bench";
/// Sub-directories of the work dir this program creates (and removes).
const WORK_SUBDIRS: &[&str] = &[
    "src",
    "cp",
    "node",
    "restic-repo",
    "restic-cache",
    "restore",
    // many-files: the rsync copy, and the 3-node cluster (certificates and
    // data dirs in the work dir itself, so its logs outlive a failure).
    "rsync",
    "client-cache",
    "certs",
    "node-1",
    "node-2",
    "node-3",
];
/// Node logs in the work dir, kept when a run fails.
const WORK_LOGS: &[&str] = &["node.log", "node-1.log", "node-2.log", "node-3.log"];
/// Marks a directory as a bench work dir, which a later run may clean.
const WORK_MARKER: &str = ".bitclone-bench";

/// What the bench measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    /// GiBs in a few thousand files: throughput (--size, --files, --dup, --edit, --s3).
    Large,
    /// Many small files: per-file overhead against restic, rsync and cp -r
    /// (--files-count, --million).
    ManyFiles,
}

#[derive(Parser, Debug)]
#[command(
    name = "bitclone-bench",
    version,
    about = "Bulk-clone throughput of a bitclone node vs cp -r + sync (and restic)"
)]
struct Args {
    /// Path to the `bitclone` binary.
    #[arg(long, env = "BITCLONE_BIN")]
    bitclone: PathBuf,
    /// Which benchmark to run.
    #[arg(long, value_enum, default_value_t = Profile::Large)]
    profile: Profile,
    /// many-files: number of files in the generated tree.
    #[arg(long, default_value_t = files::DEFAULT_FILES)]
    files_count: usize,
    /// many-files: 1,000,000 files instead of --files-count.
    #[arg(long, conflicts_with = "files_count")]
    million: bool,
    /// many-files: only these tools, by key (bitclone-1, bitclone-3,
    /// restic, rsync, cp), comma-separated [default: all].
    #[arg(long, value_delimiter = ',')]
    tools: Vec<String>,
    /// Directory for the Markdown report and its SVG chart (<profile>.md,
    /// <profile>.svg) [default: the directory of --out, else .bitclone/bench-report].
    #[arg(long)]
    report: Option<PathBuf>,
    /// Also write the JSON result to this file (it still goes to stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Total dataset size: bytes, or with a unit (KiB, MiB, GiB, TiB; KB, MB, GB, TB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Number of files.
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// Fraction of files whose content duplicates another file's.
    #[arg(long, default_value_t = 0.1)]
    dup: f64,
    /// Seed of the dataset generator and of the edits.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fraction of files edited (a 4 KiB region overwritten) before the incremental put.
    #[arg(long, default_value_t = 0.05)]
    edit: f64,
    /// Work directory [default: a new directory under the system temp dir].
    #[arg(long)]
    work: Option<PathBuf>,
    /// Keep the work directory (dataset, node data, logs) at the end.
    #[arg(long)]
    keep: bool,
    /// Also time restic (cold and incremental backup), if `restic` is on PATH.
    #[arg(long)]
    restic: bool,
    /// Also restore the final snapshot with `bitclone get` and check it byte for byte.
    #[arg(long)]
    verify: bool,
    /// Also export each snapshot to a Garage S3 server on loopback (started
    /// here; scripts/install-garage.sh installs it) and time `rclone copy` of
    /// the same tree to the same Garage.
    #[arg(long)]
    s3: bool,
}

/// Parses `1GiB`, `512MiB`, `1.5GB`, `4096`.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected e.g. 1GiB, 512MiB, 100000"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "bad size unit {other:?} in {s:?} (use KiB, MiB, GiB, TiB, KB, MB, GB, TB or none)"
            ))
        }
    };
    let v = (n * mult as f64).round();
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(format!("bad size {s:?}"));
    }
    Ok(v as u64)
}

// ------------------------------------------------------------------ progress

struct Progress {
    t0: Instant,
}

impl Progress {
    fn say(&self, msg: &str) {
        let t = self.t0.elapsed().as_secs_f64();
        eprintln!("bench [{t:7.1}s] {msg}");
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// MB/s with MB = 1e6 bytes (NaN, serialised as null, when `seconds` is 0).
fn mb_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        r3(bytes as f64 / 1e6 / seconds)
    } else {
        f64::NAN
    }
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ------------------------------------------------------------------ dataset

enum Content {
    /// Random bytes from a generator seeded with this value.
    Random(u64),
    /// Same bytes as file number `.0` (always a `Random` one).
    CopyOf(usize),
}

struct FileSpec {
    rel: PathBuf,
    size: u64,
    content: Content,
}

struct Plan {
    files: Vec<FileSpec>,
    bytes: u64,
    dup_files: usize,
}

/// Size of a log-uniform draw `u` in [0, 1) between MIN_FILE and `cap`.
fn size_at(u: f64, cap: f64) -> u64 {
    let min = MIN_FILE as f64;
    let s = (min * (cap / min).powf(u)).round();
    if s.is_finite() && s < u64::MAX as f64 {
        (s as u64).max(MIN_FILE)
    } else {
        u64::MAX
    }
}

/// Chooses file sizes (log-uniform between 1 KiB and a cap found by bisection
/// so that the total is about `target`), duplicates and paths.
fn make_plan(n: usize, target: u64, dup: f64, rng: &mut StdRng) -> Result<Plan> {
    if n == 0 {
        bail!("--files must be at least 1");
    }
    if target < (n as u64).saturating_mul(MIN_FILE) {
        bail!("--size {target} bytes is too small for {n} files of at least 1 KiB each");
    }
    let ndup = ((n as f64 * dup).round() as usize).min(n - 1);
    let nuniq = n - ndup;
    let draws: Vec<f64> = (0..nuniq).map(|_| rng.random::<f64>()).collect();
    let seeds: Vec<u64> = (0..nuniq).map(|_| rng.next_u64()).collect();
    let dup_of: Vec<usize> = (0..ndup).map(|_| rng.random_range(0..nuniq)).collect();
    let mut weight = vec![1u64; nuniq];
    for &i in &dup_of {
        weight[i] += 1;
    }
    let total_at = |cap: f64| -> u64 {
        draws.iter().zip(&weight).fold(0u64, |acc, (&u, &w)| {
            acc.saturating_add(size_at(u, cap).saturating_mul(w))
        })
    };
    // Bisection on ln(cap); the upper bound is loose on purpose (few files).
    let (mut lo, mut hi) = ((MIN_FILE as f64).ln(), (target as f64).ln() + 40.0);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if total_at(mid.exp()) > target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let cap = lo.exp();
    let mut sizes: Vec<u64> = draws.iter().map(|&u| size_at(u, cap)).collect();
    // With few files the draws may not reach the target at any cap: the
    // largest file takes the remainder.
    let short = target.saturating_sub(total_at(cap));
    if let Some(big) = (0..nuniq).max_by_key(|&i| sizes[i]) {
        sizes[big] += short / weight[big];
    }

    let mut files = Vec::with_capacity(n);
    for i in 0..n {
        let a = i % 20;
        let b = (i / 20) % 10;
        let rel = PathBuf::from(format!("d{a:02}/e{b:02}/file-{i:06}.bin"));
        let (size, content) = if i < nuniq {
            (sizes[i], Content::Random(seeds[i]))
        } else {
            let of = dup_of[i - nuniq];
            (sizes[of], Content::CopyOf(of))
        };
        files.push(FileSpec { rel, size, content });
    }
    let bytes = files.iter().map(|f| f.size).sum();
    Ok(Plan {
        files,
        bytes,
        dup_files: ndup,
    })
}

fn write_random(path: &Path, size: u64, seed: u64, buf: &mut [u8]) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        rng.fill_bytes(chunk);
        f.write_all(chunk)
            .with_context(|| format!("write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

fn generate(plan: &Plan, src: &Path, p: &Progress) -> Result<()> {
    let mut buf = vec![0u8; BUF_LEN];
    let mut written = 0u64;
    let mut next_report = plan.bytes / 10;
    for spec in &plan.files {
        let path = src.join(&spec.rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
        }
        match spec.content {
            Content::Random(seed) => write_random(&path, spec.size, seed, &mut buf)?,
            Content::CopyOf(of) => {
                let from = src.join(&plan.files[of].rel);
                fs::copy(&from, &path)
                    .with_context(|| format!("copy {} to {}", from.display(), path.display()))?;
            }
        }
        written += spec.size;
        if written >= next_report {
            let pct = 100.0 * written as f64 / plan.bytes.max(1) as f64;
            p.say(&format!("  generated {pct:.0}%"));
            next_report = next_report.saturating_add(plan.bytes / 10).max(written + 1);
        }
    }
    Ok(())
}

/// Overwrites a random 4 KiB region (the whole file if smaller) of `frac` of
/// the files, keeping every size. Returns the number of edited files.
fn edit_files(plan: &Plan, src: &Path, frac: f64, rng: &mut StdRng) -> Result<usize> {
    let n = plan.files.len();
    let k = ((n as f64 * frac).round() as usize).min(n);
    let picked = rand::seq::index::sample(rng, n, k);
    let mut buf = vec![0u8; EDIT_LEN as usize];
    for i in picked.iter() {
        let spec = &plan.files[i];
        let path = src.join(&spec.rel);
        let len = spec.size.min(EDIT_LEN) as usize;
        let off = if spec.size > EDIT_LEN {
            rng.random_range(0..=spec.size - EDIT_LEN)
        } else {
            0
        };
        let region = &mut buf[..len];
        rng.fill_bytes(region);
        let mut f = OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        f.seek(SeekFrom::Start(off))?;
        f.write_all(region)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(k)
}

/// A tree entry, as far as a comparison goes.
enum Entry {
    /// A regular file of this length.
    File(u64),
    /// A symlink with this target (never followed).
    Link(PathBuf),
}

/// Every regular file and symlink under `root`, without following symlinks:
/// (path relative to root, entry), sorted by path.
fn walk_entries(root: &Path) -> Result<Vec<(PathBuf, Entry)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("read dir {}", dir.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let len = entry.metadata()?.len();
                out.push((path.strip_prefix(root)?.to_path_buf(), Entry::File(len)));
            } else if kind.is_symlink() {
                let target =
                    fs::read_link(&path).with_context(|| format!("readlink {}", path.display()))?;
                out.push((path.strip_prefix(root)?.to_path_buf(), Entry::Link(target)));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Every regular file under `root`: (path relative to root, length), sorted.
fn walk(root: &Path) -> Result<Vec<(PathBuf, u64)>> {
    Ok(walk_entries(root)?
        .into_iter()
        .filter_map(|(path, entry)| match entry {
            Entry::File(len) => Some((path, len)),
            Entry::Link(_) => None,
        })
        .collect())
}

fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)
        .with_context(|| format!("read {}", path.display()))?;
    Ok(h.finalize())
}

/// What a restored tree must hold of the source's symlinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Links {
    /// The same symlinks, with the same targets.
    Kept,
    /// None of them: for a tool that leaves symlinks out (and says so, as
    /// `bitclone put` does in its list of skipped entries).
    Dropped,
}

/// Checks that `b` holds exactly the files of `a`, byte for byte (BLAKE3),
/// and its symlinks with the same targets. Returns the number of files.
fn compare_trees(a: &Path, b: &Path) -> Result<usize> {
    compare_trees_with(a, b, Links::Kept)
}

/// Like `compare_trees`, with `a`'s symlinks expected as `links` says.
/// Symlinks are compared by target, never followed.
fn compare_trees_with(a: &Path, b: &Path, links: Links) -> Result<usize> {
    let ea: Vec<(PathBuf, Entry)> = walk_entries(a)?
        .into_iter()
        .filter(|(_, e)| links == Links::Kept || matches!(e, Entry::File(_)))
        .collect();
    let eb = walk_entries(b)?;
    if ea.len() != eb.len() {
        bail!(
            "{} has {} entries to restore ({links:?} symlinks), {} has {}",
            a.display(),
            ea.len(),
            b.display(),
            eb.len()
        );
    }
    let mut files = 0;
    for ((pa, xa), (pb, xb)) in ea.iter().zip(&eb) {
        if pa != pb {
            bail!("file lists differ at {} vs {}", pa.display(), pb.display());
        }
        match (xa, xb) {
            (Entry::File(la), Entry::File(lb)) => {
                if la != lb || hash_file(&a.join(pa))? != hash_file(&b.join(pb))? {
                    bail!("{} differs after restore", pa.display());
                }
                files += 1;
            }
            (Entry::Link(ta), Entry::Link(tb)) => {
                if ta != tb {
                    bail!(
                        "symlink {} points to {} after restore, not {}",
                        pa.display(),
                        tb.display(),
                        ta.display()
                    );
                }
            }
            _ => bail!(
                "{} is a file in one tree and a symlink in the other",
                pa.display()
            ),
        }
    }
    Ok(files)
}

// ------------------------------------------------------------------ processes

/// Runs a command to completion; fails with its output if it exits non-zero.
fn run_checked(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn sync() -> Result<f64> {
    let t = Instant::now();
    run_checked(&mut Command::new("sync"), "sync")?;
    Ok(secs(t.elapsed()))
}

/// The JSON object a `--json` command printed: the whole output, or else its
/// last line that is a JSON object.
fn parse_json_output(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(&text) {
        return Ok(v);
    }
    for line in text.lines().rev() {
        let line = line.trim();
        if !line.starts_with('{') {
            continue;
        }
        if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(line) {
            return Ok(v);
        }
    }
    bail!("no JSON object in the command's output:\n{text}")
}

fn get_u64(v: &Value, key: &str) -> Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("`{key}` missing or not an integer in {v}"))
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// Peak resident set size so far of process `pid` (VmHWM of
/// /proc/PID/status), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("bad VmHWM line {line:?}"))?;
    Ok(kb * 1024)
}

/// `bitclone --endpoint E --json put SRC --dataset bench`: (JSON, wall seconds).
fn put(bin: &Path, node: &TestNode, src: &Path) -> Result<(Value, f64)> {
    let t = Instant::now();
    let out = run_checked(
        Command::new(bin)
            .envs(node.client_env())
            .arg("--endpoint")
            .arg(&node.endpoint)
            .arg("--json")
            .arg("put")
            .arg(src)
            .arg("--dataset")
            .arg(DATASET),
        "bitclone put",
    )?;
    let wall = secs(t.elapsed());
    Ok((parse_json_output(&out.stdout)?, wall))
}

/// Garage servers for the `--s3` comparison: one per tool, because Garage
/// deduplicates blocks across buckets, so whichever tool went second to a
/// shared server would find its data already stored.
struct S3Bench {
    garage: servers::Garage,
    rclone_garage: servers::Garage,
    rclone_version: String,
}

impl S3Bench {
    fn start() -> Result<S3Bench> {
        if !servers::Garage::available() {
            bail!("--s3: garage is not installed; run scripts/install-garage.sh");
        }
        let out = Command::new("rclone")
            .arg("version")
            .output()
            .context("--s3: rclone not found (apt-get install rclone)")?;
        let rclone_version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let garage = servers::Garage::start();
        garage.create_bucket("bench-bitclone");
        let rclone_garage = servers::Garage::start();
        rclone_garage.create_bucket("bench-rclone");
        Ok(S3Bench {
            garage,
            rclone_garage,
            rclone_version,
        })
    }

    /// One round: export the dataset's head to one Garage with a clone job,
    /// then `rclone copy` the same tree to the other; both timed, object
    /// writes and CPU seconds counted.
    fn round(
        &self,
        bin: &Path,
        node: &TestNode,
        src: &Path,
        label: &str,
        p: &Progress,
    ) -> Result<Value> {
        let (g, rg) = (&self.garage, &self.rclone_garage);
        let writes = || g.object_write_count() + rg.object_write_count();
        let cpu = || -> Result<[f64; 4]> {
            Ok([
                proc_cpu_seconds(g.pid(), false)?,
                proc_cpu_seconds(node.pid(), false)?,
                proc_cpu_seconds(std::process::id(), true)?,
                proc_cpu_seconds(rg.pid(), false)?,
            ])
        };
        let w0 = writes();
        let c0 = cpu()?;
        let t = Instant::now();
        run_checked(
            Command::new(bin)
                .envs(node.client_env())
                .arg("--endpoint")
                .arg(&node.endpoint)
                .arg("--json")
                .args(["clone", "--from", "snapshot://bench", "--dataset", DATASET])
                .args(["--to", "sink://bench/tree?mirror=true", "--wait"]),
            "bitclone clone to s3",
        )?;
        let bitclone_s = secs(t.elapsed());
        let w1 = writes();
        let c1 = cpu()?;
        let t = Instant::now();
        run_checked(
            without_aws(&mut Command::new("rclone"))
                .args(["copy", "--config", "/dev/null"])
                .arg(src)
                .arg("garage:bench-rclone/tree")
                .envs(self.rclone_env()),
            "rclone copy",
        )?;
        let rclone_s = secs(t.elapsed());
        let w2 = writes();
        let c2 = cpu()?;
        p.say(&format!(
            "s3 {label}: bitclone export {bitclone_s:.2} s ({} object writes; CPU s: node {:.1}, garage {:.1}), \
             rclone copy {rclone_s:.2} s ({} object writes; CPU s: rclone {:.1}, garage {:.1})",
            w1 - w0,
            c1[1] - c0[1],
            c1[0] - c0[0],
            w2 - w1,
            c2[2] - c1[2],
            c2[3] - c1[3],
        ));
        Ok(json!({
            "bitclone_export_seconds": r3(bitclone_s),
            "bitclone_object_writes": w1 - w0,
            "bitclone_node_cpu_seconds": r3(c1[1] - c0[1]),
            "garage_cpu_seconds_for_bitclone": r3(c1[0] - c0[0]),
            "rclone_copy_seconds": r3(rclone_s),
            "rclone_object_writes": w2 - w1,
            "rclone_cpu_seconds": r3(c2[2] - c1[2]),
            "garage_cpu_seconds_for_rclone": r3(c2[3] - c1[3]),
            "ratio_rclone_over_bitclone": r3(rclone_s / bitclone_s),
        }))
    }

    /// rclone's remote `garage:` from the environment, with nothing inherited.
    fn rclone_env(&self) -> Vec<(String, String)> {
        let g = &self.rclone_garage;
        [
            ("TYPE", "s3".to_string()),
            ("PROVIDER", "Other".to_string()),
            ("ACCESS_KEY_ID", g.access_key().to_string()),
            ("SECRET_ACCESS_KEY", g.secret_key().to_string()),
            ("ENDPOINT", g.endpoint()),
            ("REGION", g.region().to_string()),
            ("FORCE_PATH_STYLE", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("RCLONE_CONFIG_GARAGE_{k}"), v))
        .collect()
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat; with
/// `children`, those of its waited-for children instead.
fn proc_cpu_seconds(pid: u32, children: bool) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14..17 of stat: 11..14 here.
    let at = if children { 13 } else { 11 };
    let ticks: f64 = f
        .get(at..at + 2)
        .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .sum();
    Ok(ticks / clock_ticks())
}

/// Asked once: a `getconf` child per sample would be counted in the
/// children's CPU time the bench reports for rclone.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The S3 settings of the node and rclone come from the bench only, never
/// from the caller's AWS_* variables (this machine sets AWS_CA_BUNDLE).
fn without_aws(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Whether `program arg` runs and succeeds (the tool is installed).
fn tool_available(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn restic_available() -> bool {
    tool_available("restic", "version")
}

fn restic(work: &Path) -> Command {
    let mut c = Command::new("restic");
    c.arg("--repo")
        .arg(work.join("restic-repo"))
        .arg("--cache-dir")
        .arg(work.join("restic-cache"))
        .arg("--quiet")
        .env("RESTIC_PASSWORD", RESTIC_PASSWORD);
    c
}

/// Times `restic backup SRC` (wall clock of the process).
fn restic_backup(work: &Path, src: &Path) -> Result<f64> {
    let t = Instant::now();
    run_checked(restic(work).arg("backup").arg(src), "restic backup")?;
    Ok(secs(t.elapsed()))
}

// ------------------------------------------------------------------ main

fn check_args(args: &Args) -> Result<()> {
    if !(0.0..1.0).contains(&args.dup) {
        bail!("--dup must be in [0, 1), got {}", args.dup);
    }
    if !(0.0..=1.0).contains(&args.edit) {
        bail!("--edit must be in [0, 1], got {}", args.edit);
    }
    if !args.bitclone.is_file() {
        bail!(
            "--bitclone {}: no such file (build it with: cargo build -p bitclone-node)",
            args.bitclone.display()
        );
    }
    if args.profile == Profile::ManyFiles && args.s3 {
        bail!("--s3 belongs to the large profile, not to many-files");
    }
    Ok(())
}

/// `--report`, else the directory of `--out`, else .bitclone/bench-report.
fn report_dir(args: &Args) -> PathBuf {
    if let Some(dir) = &args.report {
        return dir.clone();
    }
    match args.out.as_deref().and_then(Path::parent) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        Some(_) => PathBuf::from("."),
        None => PathBuf::from(".bitclone/bench-report"),
    }
}

fn bench(args: &Args, work: &Path, p: &Progress) -> Result<Value> {
    let src = work.join("src");
    let bin = args.bitclone.as_path();
    let mut rng = StdRng::seed_from_u64(args.seed);

    // 1. dataset
    let plan = make_plan(args.files, args.size, args.dup, &mut rng)?;
    p.say(&format!(
        "generating {} files ({} duplicates), {} bytes, in {}",
        plan.files.len(),
        plan.dup_files,
        plan.bytes,
        src.display()
    ));
    let t = Instant::now();
    generate(&plan, &src, p)?;
    sync()?;
    let gen_s = secs(t.elapsed());
    p.say(&format!("generated in {gen_s:.1} s"));

    // 2. baseline: cp -r + sync
    let cp_dst = work.join("cp");
    let t = Instant::now();
    run_checked(Command::new("cp").arg("-r").arg(&src).arg(&cp_dst), "cp -r")?;
    sync()?;
    let cp_s = secs(t.elapsed());
    p.say(&format!(
        "cp -r + sync: {cp_s:.2} s, {:.1} MB/s",
        mb_s(plan.bytes, cp_s)
    ));
    fs::remove_dir_all(&cp_dst)?;
    sync()?;

    // 3. restic, cold (before the edit)
    let use_restic = args.restic && restic_available();
    if args.restic && !use_restic {
        p.say("restic not found on PATH: skipping the restic comparison");
    }
    let mut restic_cold = None;
    if use_restic {
        run_checked(restic(work).arg("init"), "restic init")?;
        let s = restic_backup(work, &src)?;
        sync()?;
        p.say(&format!(
            "restic cold backup: {s:.2} s, {:.1} MB/s",
            mb_s(plan.bytes, s)
        ));
        restic_cold = Some(s);
    }

    // 4. bitclone, cold
    let garage = if args.s3 {
        let g = S3Bench::start()?;
        p.say(&format!("garage serving S3 at {}", g.garage.endpoint()));
        Some(g)
    } else {
        None
    };
    let mut node_env = garage
        .as_ref()
        .map(|g| g.garage.env_vars())
        .unwrap_or_default();
    if garage.is_some() {
        // The bucket as a declared sink; its endpoint and keys come from
        // the AWS_* variables above.
        let config = work.join("sinks.toml");
        std::fs::write(
            &config,
            "[sinks.bench]\ntenants = [\"*\"]\ns3 = { bucket = \"bench-bitclone\" }\n",
        )?;
        node_env.push(("BITCLONE_CONFIG".into(), config.display().to_string()));
    }
    let node_dir = work.join("node");
    let env: Vec<(&str, &str)> = node_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Logs to <work>/node.log; a failed start or unclean stop panics.
    let node = TestNode::spawn_bin(bin, &node_dir, "127.0.0.1:0", &[], &env);
    p.say(&format!("node {} serving at {}", node.pid(), node.endpoint));
    let (cold, cold_s) = put(bin, &node, &src)?;
    let cold_bytes = get_u64(&cold, "bytes")?;
    let cold_new = get_u64(&cold, "new_bytes")?;
    let cold_sync = sync()?;
    p.say(&format!(
        "bitclone cold put: {cold_s:.2} s, {:.1} MB/s, {cold_bytes} bytes, {cold_new} new",
        mb_s(cold_bytes, cold_s)
    ));

    let s3_cold = match &garage {
        Some(g) => Some(g.round(bin, &node, &src, "cold", p)?),
        None => None,
    };

    // 5. edit, then bitclone incremental
    let edited = edit_files(&plan, &src, args.edit, &mut rng)?;
    sync()?;
    p.say(&format!("edited {edited} files (4 KiB each, sizes kept)"));
    let (inc, inc_s) = put(bin, &node, &src)?;
    let inc_new = get_u64(&inc, "new_bytes")?;
    sync()?;
    p.say(&format!(
        "bitclone incremental put: {inc_s:.2} s, {inc_new} new bytes"
    ));

    let s3_out = match (&garage, s3_cold) {
        (Some(g), Some(cold)) => {
            let inc = g.round(bin, &node, &src, "incremental", p)?;
            json!({ "cold": cold, "incremental": inc, "rclone": g.rclone_version })
        }
        _ => Value::Null,
    };

    // 6. restic, incremental
    let restic_out = match restic_cold {
        Some(cold_restic) => {
            let s = restic_backup(work, &src)?;
            sync()?;
            p.say(&format!("restic incremental backup: {s:.2} s"));
            json!({ "cold_seconds": r3(cold_restic), "incremental_seconds": r3(s) })
        }
        None => Value::Null,
    };

    // 7. optional restore + byte-for-byte check
    let restore_out = if args.verify {
        let dst = work.join("restore");
        let t = Instant::now();
        let out = run_checked(
            Command::new(bin)
                .envs(node.client_env())
                .arg("--endpoint")
                .arg(&node.endpoint)
                .arg("--json")
                .arg("get")
                .arg("--dataset")
                .arg(DATASET)
                .arg(&dst),
            "bitclone get",
        )?;
        let get_s = secs(t.elapsed());
        let got = parse_json_output(&out.stdout)?;
        let n = compare_trees(&src, &dst)?;
        p.say(&format!(
            "restore: {get_s:.2} s, {n} files identical to the source"
        ));
        json!({
            "seconds": r3(get_s),
            "mb_s": mb_s(get_u64(&got, "bytes").unwrap_or(plan.bytes), get_s),
            "files_verified": n,
        })
    } else {
        Value::Null
    };

    // 8. node: peak memory, clean stop, store size
    let rss = peak_rss(node.pid()).ok();
    node.stop();
    let store_bytes: u64 = walk(&node_dir)?.iter().map(|(_, len)| len).sum();
    // > 1 means the cold put was faster than cp -r + sync.
    let ratio_vs_cp = if cold_s > 0.0 {
        r3(cp_s / cold_s)
    } else {
        f64::NAN
    };

    Ok(json!({
        "seed": args.seed,
        "dataset": {
            "bytes": plan.bytes,
            "files": plan.files.len(),
            "dup": args.dup,
            "dup_files": plan.dup_files,
        },
        "cp_sync_seconds": r3(cp_s),
        "cp_sync_mb_s": mb_s(plan.bytes, cp_s),
        "cold": {
            "seconds": r3(cold_s),
            "reported_seconds": get_f64(&cold, "seconds"),
            "sync_after_seconds": r3(cold_sync),
            "mb_s": mb_s(cold_bytes, cold_s),
            "bytes": cold_bytes,
            "new_bytes": cold_new,
            "ratio_vs_cp": ratio_vs_cp,
        },
        "incremental": {
            "seconds": r3(inc_s),
            "reported_seconds": get_f64(&inc, "seconds"),
            "new_bytes": inc_new,
            "edited_files": edited,
        },
        "restic": restic_out,
        "s3": s3_out,
        "restore": restore_out,
        "node_peak_rss_bytes": rss,
        "store_bytes": store_bytes,
    }))
}

/// Creates the work dir, or cleans one left by an earlier run. Refuses a
/// non-empty directory that is not a bench work dir.
fn prepare_work(work: &Path) -> Result<()> {
    if work.exists() {
        let empty = fs::read_dir(work)
            .with_context(|| format!("read dir {}", work.display()))?
            .next()
            .is_none();
        if !empty && !work.join(WORK_MARKER).exists() {
            bail!(
                "--work {}: not empty and not a bitclone-bench work dir; use a new or empty directory",
                work.display()
            );
        }
        remove_subdirs(work);
    }
    fs::create_dir_all(work).with_context(|| format!("mkdir {}", work.display()))?;
    File::create(work.join(WORK_MARKER))?;
    Ok(())
}

fn remove_subdirs(work: &Path) {
    for d in WORK_SUBDIRS {
        let path = work.join(d);
        if path.exists() {
            if let Err(e) = fs::remove_dir_all(&path) {
                eprintln!("bench: cannot remove {}: {e}", path.display());
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    check_args(&args)?;
    let p = Progress { t0: Instant::now() };
    let seed = args.seed;
    p.say(&format!("seed {seed}"));

    let (work, own_work) = match &args.work {
        Some(w) => (w.clone(), false),
        None => {
            let pid = std::process::id();
            (
                std::env::temp_dir().join(format!("bitclone-bench-{pid}")),
                true,
            )
        }
    };
    prepare_work(&work)?;
    p.say(&format!("work dir {}", work.display()));

    let result = match args.profile {
        Profile::Large => bench(&args, &work, &p).map(|v| {
            let r = report::Report::from_large(&v);
            (v, r)
        }),
        Profile::ManyFiles => files::bench(&args, &work, &p),
    };

    if args.keep {
        p.say(&format!("kept {}", work.display()));
    } else if result.is_ok() && own_work {
        if let Err(e) = fs::remove_dir_all(&work) {
            eprintln!("bench: cannot remove {}: {e}", work.display());
        }
    } else {
        // Remove the bulky data; on failure leave the logs for inspection.
        remove_subdirs(&work);
        if result.is_err() {
            p.say(&format!("logs left in {}", work.display()));
        } else {
            for log in WORK_LOGS {
                let _ = fs::remove_file(work.join(log));
            }
            let _ = fs::remove_file(work.join(WORK_MARKER));
            let _ = fs::remove_dir(&work);
        }
    }

    let (mut out, rep) = result?;
    let dir = report_dir(&args);
    let md = rep.md_path(&dir);
    if let Some(obj) = out.as_object_mut() {
        obj.insert("report".to_string(), json!(md.display().to_string()));
    }
    // The JSON first: a report that cannot be written loses no measurement.
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(path) = &args.out {
        fs::write(path, format!("{text}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    rep.write(&dir)?;
    eprint!("{}", rep.text_table());
    p.say(&format!("report: {}", md.display()));
    Ok(())
}
