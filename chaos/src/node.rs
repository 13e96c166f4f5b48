//! One `bitclone node` process: started on loopback with the API port bound
//! by the node itself (port 0, read back from `node.addr`), stopped with
//! SIGTERM, killed, paused and resumed; the CLI run against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::env::{bin, clean_command};

pub struct TestNode {
    pub data_dir: PathBuf,
    pub endpoint: String,
    /// The certificate directory: the CA (`ca.pem`), the dev token key and
    /// the admin token the harness issues (`admin.token`).
    pub certs: PathBuf,
    /// TLS and tokens (every node but an older release's).
    secure: bool,
    /// The `bitclone` binary the node runs.
    bin: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

static OWN_GROUPS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on nodes (and Garage) start in process groups of their own, so
/// that a Ctrl-C at the terminal reaches only a harness that handles it
/// (and stops them itself); tests leave it off, and a Ctrl-C ends their
/// nodes with them.
pub fn own_process_groups() {
    OWN_GROUPS.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Puts `cmd` in a process group of its own when [`own_process_groups`]
/// was called.
pub fn maybe_own_group(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    if OWN_GROUPS.load(std::sync::atomic::Ordering::SeqCst) {
        cmd.process_group(0);
    }
}

/// Sends `sig` (`-STOP`, `-CONT`, ...) to process `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// The file the harness keeps an admin token for every tenant in.
pub const ADMIN_TOKEN: &str = "admin.token";

/// Signs a token with the dev key in `certs` (`bitclone token issue`).
pub fn issue_token(certs: &Path, tenant: &str, scopes: &str, ttl: &str) -> String {
    let out = clean_command(bin())
        .args(["token", "issue", "--certs"])
        .arg(certs)
        .args(["--tenant", tenant, "--scope", scopes, "--ttl", ttl])
        .args(["--subject", &format!("test-{tenant}-{scopes}")])
        .output()
        .expect("run bitclone token issue");
    assert!(
        out.status.success(),
        "bitclone token issue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Makes `<certs>/admin.token` once the dev key exists.
fn ensure_admin_token(certs: &Path) {
    let file = certs.join(ADMIN_TOKEN);
    if file.exists() || !certs.join("token.key").exists() {
        return;
    }
    let token = issue_token(certs, "*", "read,write,admin", "24h");
    let tmp = certs.join(format!(".{ADMIN_TOKEN}.{}", std::process::id()));
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
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
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> TestNode {
        Self::spawn_full(bin, data_dir, listen, args, env, true, None)
    }

    /// Like `spawn_bin`, for a release from before TLS and tokens on the
    /// public API (0.1.0): plain text, no token.
    pub fn spawn_release(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> TestNode {
        let mut node = Self::spawn_full(bin, data_dir, listen, args, env, true, None);
        node.secure = false;
        node.endpoint = node.endpoint.replace("https://", "http://");
        node
    }

    /// Starts a node whose chunk store (`<data_dir>/db`) lives on a tmpfs of
    /// `mib` MiB in a mount namespace of its own, so that it fills up.
    /// Needs root (`unshare -m`); the tmpfs goes away with the process.
    /// `env` adds to the node's environment.
    pub fn start_with_small_store(data_dir: &Path, mib: u64, env: &[(&str, &str)]) -> TestNode {
        Self::spawn_full(bin(), data_dir, "127.0.0.1:0", &[], env, true, Some(mib))
    }

    /// Grows (or shrinks) the tmpfs of a node started with a small store,
    /// from inside the node's own mount namespace: space coming back, as
    /// when an operator grows a volume.
    pub fn resize_store(&self, mib: u64) {
        let db = self.data_dir.join("db");
        let out = Command::new("nsenter")
            .args(["-t", &self.pid().to_string(), "-m", "mount", "-o"])
            .arg(format!("remount,size={mib}m"))
            .arg(&db)
            .output()
            .expect("run nsenter");
        assert!(
            out.status.success(),
            "resizing the store's tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Like `spawn`; with `wait == false` returns as soon as the process runs.
    pub fn spawn_opts(
        data_dir: &Path,
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
        wait: bool,
    ) -> TestNode {
        Self::spawn_full(bin(), data_dir, listen, args, env, wait, None)
    }

    fn spawn_full(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
        wait: bool,
        store_tmpfs_mib: Option<u64>,
    ) -> TestNode {
        std::fs::create_dir_all(data_dir).unwrap();
        let certs = args
            .iter()
            .position(|a| a == "--certs")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| data_dir.join("certs"));
        ensure_admin_token(&certs);
        let addr_file = data_dir.join("node.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = match store_tmpfs_mib {
            None => clean_command(bin),
            Some(mib) => {
                let db = data_dir.join("db");
                std::fs::create_dir_all(&db).unwrap();
                let mut c = clean_command("unshare");
                // The mount is private to the node's own namespace; `exec`
                // keeps one process, so signals reach the node itself.
                c.args(["-m", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount -t tmpfs -o "size=$1m" tmpfs "$2" && shift 2 && exec "$@""#)
                    .arg("sh")
                    .arg(mib.to_string())
                    .arg(&db)
                    .arg(bin);
                c
            }
        };
        cmd.args(["node", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", listen])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log_file);
        // Read only by a node that joins through another.
        cmd.env("BITCLONE_JOIN_TOKEN_FILE", certs.join(ADMIN_TOKEN));
        // Metrics and health on a free port, read back from `http.addr`.
        cmd.env("BITCLONE_HTTP_LISTEN", "127.0.0.1:0");
        // file:// sources and sinks anywhere in the test's own directory
        // (the node's data dir, inside it, stays refused).
        // Shared by all tenants: most tests act as one tenant anywhere there.
        if let Some(dir) = data_dir.parent() {
            cmd.env("BITCLONE_FILE_ROOTS", dir);
            cmd.env("BITCLONE_FILE_ROOTS_PER_TENANT", "0");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        maybe_own_group(&mut cmd);
        let child = cmd.spawn().expect("spawn bitclone node");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut node = TestNode {
            data_dir: data_dir.to_path_buf(),
            certs,
            secure: true,
            bin: bin.to_path_buf(),
            endpoint: String::new(),
            child: Some(child),
            log,
        };
        if !wait {
            return node;
        }
        loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                // A node on its own makes its CA and dev key at start.
                ensure_admin_token(&node.certs);
                node.endpoint = format!("https://{}", addr.trim());
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

    /// GETs `path` from the node's HTTP listener; `None` when the node
    /// serves none (yet) or does not answer.
    pub fn try_http(&self, path: &str) -> Option<HttpReply> {
        let addr = std::fs::read_to_string(self.data_dir.join("http.addr")).ok()?;
        try_http_get(addr.trim(), path)
    }

    /// `http://ADDR` of the node's metrics and health listener.
    pub fn http_url(&self) -> String {
        let addr = std::fs::read_to_string(self.data_dir.join("http.addr"))
            .expect("the node serves no HTTP listener (http.addr)");
        format!("http://{}", addr.trim())
    }

    /// GETs `path` from the node's HTTP listener.
    pub fn http_get(&self, path: &str) -> HttpReply {
        let url = self.http_url();
        http_get(url.trim_start_matches("http://"), path)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits (at most `timeout`) for a node that should stop by itself, say
    /// a refused join; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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

    /// The variables that let a CLI run by a bench or script reach this
    /// node as the harness's admin (the CA and the token file).
    pub fn client_env(&self) -> Vec<(&'static str, PathBuf)> {
        if !self.secure {
            return Vec::new();
        }
        vec![
            ("BITCLONE_CA", self.ca_file()),
            ("BITCLONE_TOKEN_FILE", self.certs.join(ADMIN_TOKEN)),
        ]
    }

    /// The CA that issued the node's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.certs.join("ca.pem")
    }

    /// An admin token for every tenant.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.certs.join(ADMIN_TOKEN)).unwrap()
    }

    /// Signs a token for `tenant` ("*": all) with `scopes` ("read,write").
    pub fn token(&self, tenant: &str, scopes: &str) -> String {
        issue_token(&self.certs, tenant, scopes, "1h")
    }

    /// Runs the CLI against this node as the harness's admin, with a
    /// manifest page cache of its own next to the node's data dir (never
    /// the user's).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(Some(&self.certs.join(ADMIN_TOKEN).to_string_lossy()), args)
    }

    /// [`TestNode::cli`], killed after `limit` (`None` then): for a
    /// harness that must not wait on a call that never ends.
    pub fn cli_within(&self, args: &[&str], limit: Duration) -> Option<Output> {
        output_within(self.command().args(args), limit)
    }

    /// What a pod's `preStop` hook runs: `bitclone drain` of the node's
    /// own binary, beside it (its data dir and id), killed after `limit`.
    pub fn drain_within(&self, id: u64, limit: Duration) -> Option<Output> {
        let mut cmd = self.command_with(
            &self.bin,
            Some(&self.certs.join(ADMIN_TOKEN).to_string_lossy()),
        );
        cmd.env("BITCLONE_DATA_DIR", &self.data_dir)
            .env("BITCLONE_NODE_ID", id.to_string())
            .args(["--json", "drain"]);
        output_within(&mut cmd, limit)
    }

    /// Runs the CLI with `token_file` (`None`: no token at all).
    pub fn cli_as(&self, token_file: Option<&str>, args: &[&str]) -> Output {
        self.command_as(token_file)
            .args(args)
            .output()
            .expect("run bitclone")
    }

    /// The CLI aimed at this node as the harness's admin, for a test to
    /// add arguments to and run as it likes.
    pub fn command(&self) -> Command {
        self.command_as(Some(&self.certs.join(ADMIN_TOKEN).to_string_lossy()))
    }

    fn command_as(&self, token_file: Option<&str>) -> Command {
        self.command_with(bin(), token_file)
    }

    fn command_with(&self, bin: &Path, token_file: Option<&str>) -> Command {
        let mut cmd = clean_command(bin);
        cmd.env(
            "BITCLONE_CACHE_DIR",
            self.data_dir.with_extension("client-cache"),
        );
        if self.secure {
            cmd.env("BITCLONE_CA", self.ca_file());
            if let Some(t) = token_file {
                cmd.env("BITCLONE_TOKEN_FILE", t);
            }
        }
        cmd.arg("--endpoint").arg(&self.endpoint);
        cmd
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

/// Runs `cmd` with its output captured, killed after `limit` (`None`
/// then, or when it could not start).
fn output_within(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + limit;
    while child.try_wait().ok()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().ok()
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// An HTTP response, as much of it as tests look at.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// A plain HTTP/1.1 GET on loopback, whole body read (`Connection: close`).
pub fn http_get(addr: &str, path: &str) -> HttpReply {
    try_http_get(addr, path).unwrap_or_else(|| panic!("GET http://{addr}{path} failed"))
}

/// [`http_get`], `None` when the server cannot be reached or hangs up.
pub fn try_http_get(addr: &str, path: &str) -> Option<HttpReply> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let body = if header("transfer-encoding").eq_ignore_ascii_case("chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some(HttpReply {
        status,
        content_type: header("content-type"),
        body,
    })
}

/// A chunked HTTP body, joined.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
