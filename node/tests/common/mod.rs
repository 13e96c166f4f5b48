//! Harness for process-level tests: real `bitclone` node processes on
//! loopback, the real CLI, generated trees compared by BLAKE3 and mode.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

pub const BIN: &str = env!("CARGO_BIN_EXE_bitclone");

/// A command with none of the ambient variables a test must not inherit.
pub fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("BITCLONE_") || k.starts_with("AWS_") || k == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

pub struct TestNode {
    pub data_dir: PathBuf,
    pub endpoint: String,
    child: Option<Child>,
    log: PathBuf,
}

impl TestNode {
    pub fn start(data_dir: &Path) -> TestNode {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> TestNode {
        std::fs::create_dir_all(data_dir).unwrap();
        let addr_file = data_dir.join("node.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = clean_command(BIN);
        cmd.args(["node", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn bitclone node");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut node = TestNode {
            data_dir: data_dir.to_path_buf(),
            endpoint: String::new(),
            child: Some(child),
            log,
        };
        loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                node.endpoint = format!("http://{}", addr.trim());
                return node;
            }
            if let Some(status) = node.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("node exited early ({status}); log:\n{}", node.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "node did not start; log:\n{}",
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let mut c = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "node exit {status}; log:\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(Instant::now() < deadline, "node ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = clean_command(BIN);
        cmd.arg("--endpoint").arg(&self.endpoint).args(args);
        cmd.output().expect("run bitclone")
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "bitclone {args:?} failed: {}\nstderr: {}\nnode log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log_text(), 40)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI with --json and parses the single object it prints.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON {out:?}: {e}"))
    }

    /// Runs the CLI and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "bitclone {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The seed of a randomised test: `BITCLONE_TEST_SEED` to replay, else random.
pub fn seed() -> u64 {
    let seed = std::env::var("BITCLONE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (replay with BITCLONE_TEST_SEED={seed})");
    seed
}

pub fn random_bytes(rng: &mut impl RngCore, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Writes a tree of `files` files, sizes from 0 bytes to tens of MiB, in
/// nested directories, with assorted modes (and one empty directory).
/// Returns the total bytes.
pub fn generate_tree(root: &Path, seed: u64, files: usize, big_files: usize) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut total = 0u64;
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    for i in 0..files {
        let dir = root.join(format!("d{}/s{}", i % 7, i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let size = if i < big_files {
            rng.random_range(20 << 20..30 << 20)
        } else if i % 50 == 0 {
            0
        } else if i % 10 == 0 {
            rng.random_range(1 << 20..5 << 20)
        } else {
            rng.random_range(1..64 << 10)
        };
        let path = dir.join(format!("f{i}.bin"));
        std::fs::write(&path, random_bytes(&mut rng, size)).unwrap();
        let mode = [0o644, 0o600, 0o755, 0o640][i % 4];
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        total += size as u64;
    }
    total
}

/// path → (BLAKE3 hex, mode) of every regular file, skipping `skip` prefixes.
pub fn tree_digest(root: &Path, skip: &[&str]) -> BTreeMap<String, (String, u32)> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root) {
        let e = e.unwrap();
        if !e.file_type().is_file() {
            continue;
        }
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if skip.iter().any(|s| rel.starts_with(s)) {
            continue;
        }
        let data = std::fs::read(e.path()).unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
        out.insert(rel, (blake3::hash(&data).to_hex().to_string(), mode));
    }
    out
}

/// Asserts two trees hold the same files with the same bytes (and modes if asked).
pub fn assert_same_tree(a: &Path, b: &Path, modes: bool, skip: &[&str]) {
    let da = tree_digest(a, skip);
    let db = tree_digest(b, skip);
    assert_eq!(
        da.keys().collect::<Vec<_>>(),
        db.keys().collect::<Vec<_>>(),
        "different file sets"
    );
    for (path, (hash, mode)) in &da {
        let (h2, m2) = &db[path];
        assert_eq!(hash, h2, "{path}: contents differ");
        if modes {
            assert_eq!(mode, m2, "{path}: mode differs");
        }
    }
}

pub fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}
