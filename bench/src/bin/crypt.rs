//! `bitclone-bench-crypt`: what encryption at rest costs. One real node
//! with a key file; the same trees put into a plain tenant and into an
//! encrypted one, then read back (`get`), timed; data shaped both ways: many
//! small files (one chunk each) and a few large ones.
//!
//! One JSON object on stdout, a Markdown table on stderr.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitclone_chaos::{generate_small_files, random_bytes, tree_digest, TestNode};
use clap::Parser;
use rand::SeedableRng;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "bitclone-bench-crypt",
    about = "Put and get throughput of an encrypted tenant next to a plain one"
)]
struct Args {
    /// Path to the `bitclone` binary.
    #[arg(long, env = "BITCLONE_BIN")]
    bitclone: PathBuf,
    /// Small files (one chunk each) in the many-files tree.
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Large files of 64 MiB each in the large-files tree.
    #[arg(long, default_value_t = 8)]
    large: usize,
    /// Work directory (default: a new one under the temp dir; removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
}

fn log(msg: &str) {
    eprintln!("bench-crypt: {msg}");
}

fn cli(node: &TestNode, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = node.cli(&all);
    if !out.status.success() {
        bail!(
            "bitclone {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

/// (put seconds, get seconds), the tree read back checked.
fn round(node: &TestNode, tenant: &str, tree: &Path, name: &str, out: &Path) -> Result<(f64, f64)> {
    let started = Instant::now();
    let t = tree.to_string_lossy();
    cli(node, &["--tenant", tenant, "put", &t, "--dataset", name])?;
    let put = started.elapsed().as_secs_f64();
    let dest = out.join(format!("{tenant}-{name}"));
    let started = Instant::now();
    let d = dest.to_string_lossy();
    cli(node, &["--tenant", tenant, "get", "--dataset", name, &d])?;
    let get = started.elapsed().as_secs_f64();
    if tree_digest(tree, &[]) != tree_digest(&dest, &[]) {
        bail!("{tenant}/{name} read back different");
    }
    std::fs::remove_dir_all(&dest).ok();
    Ok((put, get))
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
    let small = work.join("trees/small");
    if !small.exists() {
        log(&format!("generating {} small files", args.files));
        generate_small_files(&small, 1, args.files);
    }
    let large = work.join("trees/large");
    if !large.exists() {
        log(&format!("generating {} files of 64 MiB", args.large));
        std::fs::create_dir_all(&large)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for i in 0..args.large {
            std::fs::write(
                large.join(format!("f{i}.bin")),
                random_bytes(&mut rng, 64 << 20),
            )?;
        }
    }
    let large_bytes = (args.large as u64) << 26;
    let keys = work.join("kek");
    std::fs::write(&keys, format!("k1 {}\n", "5a".repeat(32)))?;
    let data = work.join("node");
    let _ = std::fs::remove_dir_all(&data);
    let k = keys.to_string_lossy().to_string();
    let node = TestNode::start_with(&data, &[("BITCLONE_KEY_FILE", k.as_str())]);
    for t in ["plain", "sealed"] {
        cli(&node, &["tenant", "create", t])?;
    }
    cli(&node, &["tenant", "encrypt", "sealed"]).context("encrypting a tenant")?;
    let out = work.join("out");
    std::fs::create_dir_all(&out)?;
    let mut rows = Vec::new();
    // Interleaved, so that neither tenant always runs on a warmer machine.
    for (shape, tree, files, bytes) in [
        ("many small files", &small, args.files as u64, 0u64),
        ("large files", &large, args.large as u64, large_bytes),
    ] {
        for tenant in ["plain", "sealed"] {
            log(&format!("{shape}: {tenant}"));
            let (put, get) = round(&node, tenant, tree, &shape.replace(' ', "-"), &out)?;
            rows.push(json!({
                "shape": shape, "tenant": tenant, "files": files, "bytes": bytes,
                "put_seconds": put, "get_seconds": get,
                "put_files_per_second": (files as f64 / put).round(),
                "get_files_per_second": (files as f64 / get).round(),
                "put_mib_per_second": bytes as f64 / put / 1048576.0,
                "get_mib_per_second": bytes as f64 / get / 1048576.0,
            }));
        }
    }
    node.stop();
    eprintln!("\n| shape | tenant | put | get |\n| --- | --- | --- | --- |");
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let rate = |s: &str| {
            if r["bytes"].as_u64().unwrap_or(0) > 0 {
                format!("{:.0} MiB/s", f(&format!("{s}_mib_per_second")))
            } else {
                format!("{:.0} files/s", f(&format!("{s}_files_per_second")))
            }
        };
        eprintln!(
            "| {} | {} | {:.2} s ({}) | {:.2} s ({}) |",
            r["shape"].as_str().unwrap_or(""),
            r["tenant"].as_str().unwrap_or(""),
            f("put_seconds"),
            rate("put"),
            f("get_seconds"),
            rate("get")
        );
    }
    println!("{}", json!({ "rounds": rows }));
    Ok(())
}
