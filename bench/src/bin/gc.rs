//! `bitclone-bench-gc`: garbage collection on a real node, on data shaped
//! like a training set (many small files, one chunk each).
//!
//! Measures (one JSON object on stdout, a Markdown table on stderr):
//! - a pass's throughput (chunks and pages examined per second) and the
//!   node's peak RSS during it, next to its RSS before, for the default
//!   mark memory (the scratch database's write buffer) and for a small one;
//! - what a pass frees after a dataset is deleted, and the store's bytes on
//!   disk before and after;
//! - put throughput while passes run back to back, next to the same put
//!   without them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bitclone_chaos::{generate_small_files, tree_digest, TestNode};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "bitclone-bench-gc",
    about = "Garbage collection throughput, memory, and puts while it runs"
)]
struct Args {
    /// Path to the `bitclone` binary.
    #[arg(long, env = "BITCLONE_BIN")]
    bitclone: PathBuf,
    /// Files in each of the two datasets stored first (one chunk each).
    #[arg(long, default_value_t = 200_000)]
    files: usize,
    /// Files in each of the two timed puts (with and without passes).
    #[arg(long, default_value_t = 200_000)]
    put_files: usize,
    /// The small mark memory (the default is the node's, 64 MiB).
    #[arg(long, default_value = "1MiB")]
    small_memory: String,
    /// Work directory (default: a new one under the temp dir; removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
}

fn log(msg: &str) {
    eprintln!("bench-gc: {msg}");
}

/// (VmRSS, VmHWM) of a process, bytes.
fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))?;
        let kb: u64 = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad line {line:?}"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn start(dir: &Path, memory: Option<&str>) -> TestNode {
    let mut env = vec![
        // Passes only when the bench asks, and no grace period: the second
        // pass after a deletion frees it.
        ("BITCLONE_GC_INTERVAL", "0s"),
        ("BITCLONE_GC_GRACE", "0s"),
    ];
    if let Some(m) = memory {
        env.push(("BITCLONE_GC_MEMORY", m));
    }
    TestNode::start_with(dir, &env)
}

fn put(node: &TestNode, tree: &Path, dataset: &str) -> Result<f64> {
    let started = Instant::now();
    let out = node.cli(&[
        "--json",
        "put",
        &tree.to_string_lossy(),
        "--dataset",
        dataset,
    ]);
    if !out.status.success() {
        bail!(
            "put {dataset} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One pass; its report with the node's RSS before and peak during.
fn pass(node: &TestNode, dry_run: bool) -> Result<Value> {
    let pid = node.pid();
    let (before, _) = rss(pid)?;
    let reset = reset_peak(pid);
    let mut args = vec!["--json", "gc"];
    if dry_run {
        args.push("--dry-run");
    }
    let out = node.cli(&args);
    if !out.status.success() {
        bail!("gc failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let mut r = v["nodes"][0].clone();
    let (_, peak) = rss(pid)?;
    let examined = r["examined"].as_f64().unwrap_or(0.0);
    let seconds = r["seconds"].as_f64().unwrap_or(0.0);
    r["examined_per_second"] = json!((examined / seconds.max(1e-9)).round());
    r["node_rss_before"] = json!(before);
    r["node_peak_rss"] = if reset { json!(peak) } else { Value::Null };
    Ok(r)
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::env::set_var("BITCLONE_BIN", &args.bitclone);
    let tmp;
    let work = match &args.work {
        Some(w) => w.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let trees = work.join("trees");
    let gen = |name: &str, seed: u64, files: usize| -> Result<PathBuf> {
        let p = trees.join(name);
        if !p.exists() {
            log(&format!("generating {files} files in {}", p.display()));
            generate_small_files(&p, seed, files);
        }
        Ok(p)
    };
    let a = gen("a", 1, args.files)?;
    let b = gen("b", 2, args.files)?;
    let c = gen("c", 3, args.put_files)?;
    let d = gen("d", 4, args.put_files)?;

    let data = work.join("node");
    let _ = std::fs::remove_dir_all(&data);
    let node = start(&data, None);
    log("storing two datasets");
    put(&node, &a, "a")?;
    put(&node, &b, "b")?;
    let live = pass(&node, false)?;
    log(&format!("a pass over everything live: {live}"));
    let out = node.cli(&["--json", "dataset-delete", "a", "--yes"]);
    if !out.status.success() {
        bail!("delete failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let first = pass(&node, false)?;
    let dry = pass(&node, true)?;
    let freeing = pass(&node, false)?;
    log(&format!("after deleting a: {first}\nfreeing: {freeing}"));
    if freeing["freed"].as_u64().unwrap_or(0) == 0 {
        bail!("the second pass after the deletion freed nothing: {freeing}");
    }

    log("a timed put without passes");
    let quiet = put(&node, &c, "c")?;
    log("the same put while passes run back to back");
    let running = AtomicBool::new(true);
    let (busy, passes) = std::thread::scope(|s| -> Result<(f64, u64)> {
        let collector = s.spawn(|| {
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(600);
            while running.load(Ordering::Acquire) && Instant::now() < deadline {
                if node.cli(&["gc"]).status.success() {
                    n += 1;
                }
            }
            n
        });
        let t = put(&node, &d, "d");
        running.store(false, Ordering::Release);
        let n = collector
            .join()
            .map_err(|_| anyhow!("the collector panicked"))?;
        Ok((t?, n))
    })?;
    node.stop();

    log(&format!("a node with gc.memory = {}", args.small_memory));
    let node = start(&data, Some(&args.small_memory));
    let small = pass(&node, false)?;
    // Every dataset left reads back whole after all those passes.
    for (dataset, tree) in [("b", &b), ("c", &c), ("d", &d)] {
        let out_dir = work.join(format!("get-{dataset}"));
        let _ = std::fs::remove_dir_all(&out_dir);
        let out = node.cli(&["get", "--dataset", dataset, &out_dir.to_string_lossy()]);
        if !out.status.success() {
            bail!(
                "get {dataset} after the passes failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if tree_digest(tree, &[]) != tree_digest(&out_dir, &[]) {
            bail!("{dataset} read back differs from what was put");
        }
        std::fs::remove_dir_all(&out_dir)?;
    }
    log("every dataset left reads back byte-identical");
    node.stop();

    let put_files = args.put_files as f64;
    let result = json!({
        "files_per_dataset": args.files,
        "live_pass": live,
        "after_delete_first_pass": first,
        "dry_run": dry,
        "freeing_pass": freeing,
        "small_memory": args.small_memory,
        "small_memory_pass": small,
        "put_files": args.put_files,
        "put_seconds_without_gc": quiet,
        "put_seconds_with_gc": busy,
        "put_files_per_second_without_gc": (put_files / quiet).round(),
        "put_files_per_second_with_gc": (put_files / busy).round(),
        "gc_passes_during_put": passes,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    let mib = |v: &Value| {
        v.as_f64()
            .map_or("-".into(), |b| format!("{:.0}", b / 1048576.0))
    };
    let row = |name: &str, r: &Value| {
        format!(
            "| {name} | {} | {} | {:.2} | {} | {} | {} | {} |",
            r["examined"],
            r["marked"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["examined_per_second"],
            r["freed"],
            mib(&r["node_rss_before"]),
            mib(&r["node_peak_rss"]),
        )
    };
    eprintln!("\n| pass | examined | marked | s | examined/s | freed | node RSS before (MiB) | peak during (MiB) |");
    eprintln!("|---|---|---|---|---|---|---|---|");
    eprintln!("{}", row("all live", &live));
    eprintln!("{}", row("after delete (finds candidates)", &first));
    eprintln!("{}", row("frees", &freeing));
    eprintln!(
        "{}",
        row(&format!("gc.memory {}", args.small_memory), &small)
    );
    eprintln!(
        "\nstore on disk {} -> {} MiB; put of {} files: {:.2} s without passes ({:.0} files/s), \
         {:.2} s with {} passes back to back ({:.0} files/s)",
        mib(&freeing["store_bytes_before"]),
        mib(&freeing["store_bytes_after"]),
        args.put_files,
        quiet,
        put_files / quiet,
        busy,
        passes,
        put_files / busy
    );
    Ok(())
}
