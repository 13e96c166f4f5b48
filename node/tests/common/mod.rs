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
        if k.starts_with("BITCLONE_")
            || k.starts_with("AWS_")
            || k.starts_with("PG")
            || k == "RUST_LOG"
        {
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
        Self::spawn(data_dir, "127.0.0.1:0", &[], env)
    }

    /// Starts `bitclone node` listening on `listen` with extra arguments and
    /// waits until it serves.
    pub fn spawn(data_dir: &Path, listen: &str, args: &[String], env: &[(&str, &str)]) -> TestNode {
        Self::spawn_opts(data_dir, listen, args, env, true)
    }

    /// Like `spawn`, with another `bitclone` binary (e.g. an older release).
    pub fn spawn_bin(
        bin: &str,
        data_dir: &Path,
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> TestNode {
        Self::spawn_full(bin, data_dir, listen, args, env, true)
    }

    /// Like `spawn`; with `wait == false` returns as soon as the process runs.
    pub fn spawn_opts(
        data_dir: &Path,
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
        wait: bool,
    ) -> TestNode {
        Self::spawn_full(BIN, data_dir, listen, args, env, wait)
    }

    fn spawn_full(
        bin: &str,
        data_dir: &Path,
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
        wait: bool,
    ) -> TestNode {
        std::fs::create_dir_all(data_dir).unwrap();
        let addr_file = data_dir.join("node.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = clean_command(bin);
        cmd.args(["node", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", listen])
            .args(args)
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
        if !wait {
            return node;
        }
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

/// A free loopback port (released before use; fine for tests on loopback).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Real `bitclone node` processes forming a Raft cluster over mutual TLS.
pub struct TestCluster {
    pub dir: PathBuf,
    pub nodes: BTreeMap<u64, TestNode>,
    pub ports: BTreeMap<u64, (u16, u16)>,
    /// Extra environment for every node.
    pub env: Vec<(String, String)>,
}

impl TestCluster {
    /// Certificates for `max_nodes`, node 1 bootstraps, 2..=n join one by one.
    pub fn start(dir: &Path, n: u64, max_nodes: u64) -> TestCluster {
        Self::start_with_env(dir, n, max_nodes, &[])
    }

    pub fn start_with_env(dir: &Path, n: u64, max_nodes: u64, env: &[(&str, &str)]) -> TestCluster {
        let certs = dir.join("certs");
        let out = clean_command(BIN)
            .args(["certs", "dev", "--out"])
            .arg(&certs)
            .args(["--nodes", &max_nodes.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut c = TestCluster {
            dir: dir.to_path_buf(),
            nodes: BTreeMap::new(),
            ports: BTreeMap::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        c.start_node(1, &["--bootstrap".to_string()]);
        c.wait_voters(1, 1);
        for id in 2..=n {
            c.join(id);
        }
        c
    }

    pub fn join(&mut self, id: u64) {
        let seed = self.nodes.values().next().unwrap().endpoint.clone();
        self.start_node(id, &["--join".to_string(), seed]);
        let voters = self.nodes.len();
        self.wait_voters(id, voters);
    }

    /// Starts (or restarts, on the same ports) node `id`.
    pub fn start_node(&mut self, id: u64, extra: &[String]) {
        let (api, peer) = *self
            .ports
            .entry(id)
            .or_insert_with(|| (free_port(), free_port()));
        let mut args = vec![
            "--node-id".to_string(),
            id.to_string(),
            "--peer-listen".to_string(),
            format!("127.0.0.1:{peer}"),
            "--certs".to_string(),
            self.dir.join("certs").display().to_string(),
        ];
        args.extend_from_slice(extra);
        let mut env: Vec<(&str, &str)> = vec![("BITCLONE_SHUTDOWN_GRACE", "5s")];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let node = TestNode::spawn(
            &self.dir.join(format!("node-{id}")),
            &format!("127.0.0.1:{api}"),
            &args,
            &env,
        );
        self.nodes.insert(id, node);
    }

    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[&id]
    }

    pub fn status(&self, id: u64) -> Option<serde_json::Value> {
        let out = self.nodes.get(&id)?.cli(&["--json", "cluster", "status"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn leader(&self, via: u64) -> Option<u64> {
        self.status(via).and_then(|s| s["leader"].as_u64())
    }

    /// Polls `f` every 50 ms until it holds, for at most `secs` seconds.
    pub fn wait_for(&self, what: &str, secs: u64, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_voters(&self, via: u64, voters: usize) {
        self.wait_for(
            &format!("{voters} voters and a leader seen by node {via}"),
            60,
            |c| {
                c.status(via).is_some_and(|s| {
                    s["leader"].as_u64().is_some()
                        && s["members"]
                            .as_array()
                            .map(|m| m.iter().filter(|m| m["voter"] == true).count())
                            == Some(voters)
                })
            },
        );
    }

    /// node → number of shard replicas it holds, as `via` sees the layout.
    pub fn shard_load(&self, via: u64) -> BTreeMap<u64, usize> {
        let mut load = BTreeMap::new();
        if let Some(s) = self.status(via) {
            for shard in s["shards"].as_array().unwrap() {
                for r in shard["replicas"].as_array().unwrap() {
                    *load.entry(r.as_u64().unwrap()).or_insert(0) += 1;
                }
            }
        }
        load
    }

    pub fn kill9(&mut self, id: u64) {
        self.nodes.remove(&id).unwrap().kill9();
    }
}
