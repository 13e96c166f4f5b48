//! Throwaway servers on loopback for integration tests: a PostgreSQL server
//! ([`PgServer`]) and a single-node Garage S3 server ([`Garage`]).
//!
//! Every external program runs with a cleared environment, so the machine's
//! PG* and AWS_* variables never leak into a test.
//!
//! Both servers are stopped and their files removed on drop. Setup failures
//! panic with the server's log tail.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// `PATH` given to every child process.
const CLEAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// ---------------------------------------------------------------------------
// shared helpers
// ---------------------------------------------------------------------------

/// Picks `n` distinct free TCP ports on 127.0.0.1 (bound together, then
/// released): for servers that cannot bind port 0 and say which port they
/// got. `bitclone` nodes bind their own ports.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to pick a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr of probe listener").port())
        .collect()
}

/// A loopback port nothing listens on (for "unreachable server" tests).
pub fn unused_port() -> u16 {
    free_ports(1)[0]
}

/// The last `max_lines` lines of a text file (or why it could not be read).
fn file_tail(path: &Path, max_lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Hex string of `n` random bytes from /dev/urandom.
fn random_hex(n: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    let mut out = String::with_capacity(n * 2);
    for b in buf {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// Finds a program in the clean PATH.
fn find_tool(name: &str) -> Option<PathBuf> {
    CLEAN_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// A command for a system tool with a clean environment.
fn tool_command(name: &str) -> Command {
    let program = find_tool(name).unwrap_or_else(|| PathBuf::from(name));
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", CLEAN_PATH)
        .env("LANG", "C")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

/// Human-readable description of a failed command.
fn describe_failure(what: &str, out: &Output) -> String {
    format!(
        "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Whether the effective uid of this process is 0.
fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
        if let Some(euid) = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
        {
            return euid == "0";
        }
    }
    tool_command("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Numeric uid of `nobody` and gid of `nogroup` (falling back to nobody's
/// primary group).
fn nobody_ids() -> Result<(u32, u32), String> {
    let uid_out = tool_command("id")
        .args(["-u", "nobody"])
        .output()
        .map_err(|e| format!("run `id -u nobody`: {e}"))?;
    if !uid_out.status.success() {
        return Err(describe_failure("id -u nobody", &uid_out));
    }
    let uid: u32 = String::from_utf8_lossy(&uid_out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("parse uid of nobody: {e}"))?;

    // "nogroup:x:65534:"
    let from_getent = tool_command("getent")
        .args(["group", "nogroup"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(':')
                .nth(2)
                .and_then(|g| g.trim().parse::<u32>().ok())
        });
    let gid = match from_getent {
        Some(gid) => gid,
        None => {
            let gid_out = tool_command("id")
                .args(["-g", "nobody"])
                .output()
                .map_err(|e| format!("run `id -g nobody`: {e}"))?;
            if !gid_out.status.success() {
                return Err(describe_failure("id -g nobody", &gid_out));
            }
            String::from_utf8_lossy(&gid_out.stdout)
                .trim()
                .parse()
                .map_err(|e| format!("parse gid of nobody: {e}"))?
        }
    };
    Ok((uid, gid))
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find_bytes(body, b"\r\n").ok_or("chunked body: missing chunk size line")?;
        let size_line = String::from_utf8_lossy(&body[..line_end]).into_owned();
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|e| format!("chunked body: bad chunk size {size_hex:?}: {e}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            return Err("chunked body: truncated chunk".to_string());
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
}

/// A tiny HTTP/1.0 GET against 127.0.0.1:`port`. Returns (status, body).
fn http_get(port: u16, path: &str, bearer: Option<&str>) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| format!("set read timeout: {e}"))?;
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| format!("set write timeout: {e}"))?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n{auth}Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send GET {path}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read response to GET {path}: {e}"))?;

    let head_end = find_bytes(&raw, b"\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: malformed HTTP response ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let body = &raw[head_end + 4..];
    let mut head_lines = head.lines();
    let status_line = head_lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line {status_line:?}"))?;
    let chunked = head_lines.any(|h| {
        h.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Parses the inside of a Prometheus label set (`a="x",b="y"`).
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut name = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            name.push(c);
        }
        if name.is_empty() || chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                other => value.push(other),
            }
        }
        labels.push((name.trim().to_string(), value));
    }
}

/// Sums every sample of counter `metric` (with or without a `_total` suffix)
/// whose label `label` equals `value`, in Prometheus text format.
fn sum_counter(text: &str, metric: &str, label: &str, value: &str) -> u64 {
    let mut total = 0f64;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let rest = rest.strip_prefix("_total").unwrap_or(rest);
        let (labels, sample) = if let Some(inner) = rest.strip_prefix('{') {
            match inner.rfind('}') {
                Some(end) => (&inner[..end], &inner[end + 1..]),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let matches = parse_labels(labels)
            .iter()
            .any(|(k, v)| k == label && v == value);
        if !matches {
            continue;
        }
        if let Some(v) = sample
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            total += v;
        }
    }
    total as u64
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

fn has_pg_tools(bin: &Path) -> bool {
    bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()
}

/// `$BITCLONE_PG_BIN`, else the newest `/usr/lib/postgresql/<v>/bin` with
/// `initdb` and `pg_ctl`.
fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("BITCLONE_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return has_pg_tools(&dir).then_some(dir);
    }
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    for entry in fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let version: Vec<u32> = name.split('.').map(|p| p.parse().unwrap_or(0)).collect();
        let bin = entry.path().join("bin");
        if !has_pg_tools(&bin) {
            continue;
        }
        let better = match &best {
            None => true,
            Some((v, _)) => version > *v,
        };
        if better {
            best = Some((version, bin));
        }
    }
    best.map(|(_, bin)| bin)
}

/// A throwaway PostgreSQL server on 127.0.0.1 (trust auth, superuser
/// `postgres`, fsync off). When the tests run as root, the server runs as
/// `nobody` through `setpriv`. Stopped (immediate) and deleted on drop.
pub struct PgServer {
    bin: PathBuf,
    as_nobody: bool,
    data: PathBuf,
    port: u16,
    running: bool,
    // Last field: removed after `Drop::drop` has stopped the server.
    dir: tempfile::TempDir,
}

impl PgServer {
    /// Whether PostgreSQL binaries (and, as root, `setpriv`) were found.
    /// The tests fail with a clear message when this is false.
    pub fn available() -> bool {
        pg_bin_dir().is_some() && (!running_as_root() || find_tool("setpriv").is_some())
    }

    /// Starts a fresh server; panics (with the server log tail) on failure.
    pub fn start() -> PgServer {
        Self::try_start().unwrap_or_else(|e| panic!("PgServer::start: {e}"))
    }

    /// Starts a fresh server.
    pub fn try_start() -> Result<PgServer, String> {
        let bin = pg_bin_dir().ok_or(
            "no PostgreSQL binaries: set BITCLONE_PG_BIN or install postgresql (initdb, pg_ctl)",
        )?;
        let as_nobody = running_as_root();
        if as_nobody && find_tool("setpriv").is_none() {
            return Err("running as root and `setpriv` (util-linux) is missing".to_string());
        }
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("bitclone-pg-");
            b
        };
        // As root the directory must be reachable by `nobody`: use /tmp, not a
        // possibly private $TMPDIR. Short paths also keep the unix socket path
        // under its length limit.
        let dir = if as_nobody {
            builder.tempdir_in("/tmp")
        } else {
            builder.tempdir()
        }
        .map_err(|e| format!("create temp dir: {e}"))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod 0755 {}: {e}", dir.path().display()))?;
        let data = dir.path().join("data");
        fs::create_dir(&data).map_err(|e| format!("mkdir {}: {e}", data.display()))?;
        if as_nobody {
            let (uid, gid) = nobody_ids()?;
            std::os::unix::fs::chown(&data, Some(uid), Some(gid))
                .map_err(|e| format!("chown nobody {}: {e}", data.display()))?;
        }
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod 0700 {}: {e}", data.display()))?;

        let mut server = PgServer {
            bin,
            as_nobody,
            data,
            port: 0,
            running: false,
            dir,
        };
        server.initdb()?;

        let mut last_error = String::new();
        for attempt in 1..=3 {
            let port = unused_port();
            match server.pg_ctl_start(port) {
                Ok(()) => {
                    server.port = port;
                    server.running = true;
                    return Ok(server);
                }
                Err(e) => {
                    last_error = format!("attempt {attempt} (port {port}): {e}");
                    // In case it came up after all (e.g. pg_ctl timed out).
                    server.running = true;
                    server.stop();
                }
            }
        }
        Err(format!(
            "PostgreSQL did not start after 3 attempts; last {last_error}\n--- server log tail ---\n{}",
            server.log_tail()
        ))
    }

    /// Command for a server-side PostgreSQL tool, as `nobody` when root.
    fn pg_command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_nobody {
            let mut c = tool_command("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(exe);
            c
        } else {
            let mut c = Command::new(exe);
            c.env_clear()
                .env("PATH", CLEAN_PATH)
                .env("LANG", "C")
                .env("LC_ALL", "C")
                .stdin(Stdio::null());
            c
        };
        cmd.env("HOME", self.dir.path());
        cmd
    }

    fn initdb(&self) -> Result<(), String> {
        let out = self
            .pg_command("initdb")
            .arg("-D")
            .arg(&self.data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .map_err(|e| format!("run initdb: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(describe_failure("initdb", &out))
        }
    }

    fn pg_ctl_start(&self, port: u16) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c full_page_writes=off -c synchronous_commit=off",
            self.data.display()
        );
        let out = self
            .pg_command("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(self.log_path())
            .arg("-o")
            .arg(options)
            .arg("start")
            .output()
            .map_err(|e| format!("run pg_ctl start: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(describe_failure("pg_ctl start", &out))
        }
    }

    /// Path of the server log (inside the data directory).
    fn log_path(&self) -> PathBuf {
        self.data.join("log")
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log_path(), 40)
    }

    /// Turns TLS on with `cert` (PEM chain) and `key` (PEM private key):
    /// copies them into the data dir, owned by the server's user, and
    /// reloads the configuration (`ssl` needs no restart).
    pub fn enable_tls(&self, cert: &Path, key: &Path) {
        for (from, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
            let to = self.data.join(name);
            fs::copy(from, &to).unwrap();
            if self.as_nobody {
                let (uid, gid) = nobody_ids().unwrap();
                std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
            }
            fs::set_permissions(&to, fs::Permissions::from_mode(mode)).unwrap();
        }
        self.psql("postgres", "ALTER SYSTEM SET ssl = on");
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn psql_command(&self, db: &str) -> Command {
        let local = self.bin.join("psql");
        let psql = if local.is_file() {
            local
        } else {
            PathBuf::from("/usr/bin/psql")
        };
        let mut cmd = Command::new(psql);
        cmd.env_clear()
            .env("PATH", CLEAN_PATH)
            .env("LANG", "C")
            .env("LC_ALL", "C")
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .args(["-X", "-q", "-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1"]);
        cmd
    }

    /// Creates database `name` (quoted, so the name is taken verbatim).
    pub fn create_database(&self, name: &str) {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        let out = self
            .psql_command("postgres")
            .args(["-c", &sql])
            .output()
            .unwrap_or_else(|e| panic!("run psql: {e}"));
        if !out.status.success() {
            panic!(
                "{}\n--- server log tail ---\n{}",
                describe_failure(&format!("psql -c {sql:?}"), &out),
                self.log_tail()
            );
        }
    }

    /// Runs `sql` in `db` with `psql -At -F '|'`; returns stdout.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self
            .psql_command(db)
            .args(["-At", "-F", "|", "-c", sql])
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(describe_failure(&format!("psql -d {db} -c {sql:?}"), &out))
        }
    }

    /// Runs `sql` in `db` with `psql -At -F '|'`; returns stdout, panics
    /// (with stderr and the server log tail) on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("{e}\n--- server log tail ---\n{}", self.log_tail()))
    }

    /// Stops the server (`pg_ctl stop -m immediate`). Idempotent.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let out = self
            .pg_command("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-t", "30", "-D"])
            .arg(&self.data)
            .output();
        let stopped = out.as_ref().is_ok_and(|o| o.status.success());
        if stopped {
            return;
        }
        // pg_ctl failed: if a postmaster is still around, kill it.
        let pid_file = self.data.join("postmaster.pid");
        if let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
            .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        {
            let _ = tool_command("kill").args(["-KILL", &pid]).output();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Garage
// ---------------------------------------------------------------------------

/// Name of the S3 access key created by [`Garage::start`].
pub const GARAGE_KEY_NAME: &str = "bitclone-test";

/// Prometheus counter of S3 API calls (Garage `api.s3.request_counter`),
/// labelled `api_endpoint="<Endpoint>"`, e.g. `PutObject`, `GetObject`,
/// `HeadObject`, `DeleteObject`, `ListObjectsV2`, `CopyObject`,
/// `CreateMultipartUpload`, `UploadPart`, `CompleteMultipartUpload`,
/// `AbortMultipartUpload` (names from garage_api_s3 `router.rs`).
pub const GARAGE_S3_REQUEST_COUNTER: &str = "api_s3_request_counter";

/// How long Garage gets to come up.
const GARAGE_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a mutating CLI command is retried (cluster settling after layout apply).
const GARAGE_CLI_RETRY: Duration = Duration::from_secs(30);
const GARAGE_POLL: Duration = Duration::from_millis(200);

/// A single-node Garage S3 server on loopback (sqlite metadata,
/// replication_factor 1), with access key `bitclone-test`. Killed and
/// deleted on drop.
pub struct Garage {
    child: Child,
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
    admin_port: u16,
    metrics_token: String,
    access_key: String,
    secret_key: String,
    // Last field: removed after `Drop::drop` has killed the server.
    dir: tempfile::TempDir,
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Parses the `Key ID:` and `Secret key:` lines printed by `garage key
/// create` / `garage key info --show-secret` (Garage v2 `print_key_info`).
fn parse_key_info(stdout: &str) -> Option<(String, String)> {
    let mut id = None;
    let mut secret = None;
    for line in stdout.lines() {
        if let Some(v) = line.strip_prefix("Key ID:") {
            id = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Secret key:") {
            secret = Some(v.trim().to_string());
        }
    }
    let id = id.filter(|v| !v.is_empty())?;
    let secret = secret.filter(|v| !v.is_empty() && v != "(redacted)")?;
    Some((id, secret))
}

impl Garage {
    /// The garage binary: `$BITCLONE_GARAGE`, else
    /// `$HOME/.cache/bitclone/garage/bin/garage`, if it exists.
    pub fn binary() -> Option<PathBuf> {
        let path = match std::env::var_os("BITCLONE_GARAGE").filter(|p| !p.is_empty()) {
            Some(p) => PathBuf::from(p),
            // Where scripts/install-garage.sh puts it.
            None => std::env::var_os("BITCLONE_CACHE")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .or_else(|| Some(PathBuf::from(std::env::var_os("HOME")?).join(".cache/bitclone")))?
                .join("garage/bin/garage"),
        };
        path.is_file().then_some(path)
    }

    /// Whether the garage binary was found (the tests fail without it).
    pub fn available() -> bool {
        Self::binary().is_some()
    }

    /// Starts a fresh single-node server with a layout and key
    /// `bitclone-test`; panics with the log tail if it does not come up.
    pub fn start() -> Garage {
        let binary = Self::binary().unwrap_or_else(|| {
            panic!("garage binary not found: set BITCLONE_GARAGE or install it at $HOME/.cache/bitclone/garage/bin/garage (scripts/install-garage.sh)")
        });
        let dir = tempfile::Builder::new()
            .prefix("bitclone-garage-")
            .tempdir()
            .expect("create garage temp dir");
        let meta = dir.path().join("meta");
        let data = dir.path().join("data");
        fs::create_dir(&meta).expect("mkdir garage meta");
        fs::create_dir(&data).expect("mkdir garage data");

        let ports = free_ports(3);
        let (s3_port, rpc_port, admin_port) = (ports[0], ports[1], ports[2]);
        let rpc_secret = random_hex(32);
        let metrics_token = random_hex(24);
        let admin_token = random_hex(24);
        let config_text = format!(
            r#"metadata_dir = {meta}
data_dir = {data}
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
metrics_token = "{metrics_token}"
admin_token = "{admin_token}"
"#,
            meta = toml_string(&meta.to_string_lossy()),
            data = toml_string(&data.to_string_lossy()),
        );
        let config = dir.path().join("garage.toml");
        fs::write(&config, config_text).expect("write garage.toml");
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).expect("chmod garage.toml");

        let log = dir.path().join("garage.log");
        let log_file = fs::File::create(&log).expect("create garage.log");
        let log_file_err = log_file.try_clone().expect("clone garage.log handle");
        let mut cmd = Self::command_for(&binary, &config, dir.path());
        crate::node::maybe_own_group(&mut cmd);
        let child = cmd
            .arg("server")
            .stdout(log_file)
            .stderr(log_file_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} server: {e}", binary.display()));

        // From here on, a panic drops `garage`, which kills the child.
        let mut garage = Garage {
            child,
            binary,
            config,
            log,
            s3_port,
            admin_port,
            metrics_token,
            access_key: String::new(),
            secret_key: String::new(),
            dir,
        };
        garage.wait_until_up();
        garage.setup_layout();
        garage.create_key();
        garage
    }

    /// A garage command with a clean environment (no inherited AWS_*,
    /// GARAGE_*, RUST_LOG, ...).
    fn command_for(binary: &Path, config: &Path, home: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("PATH", CLEAN_PATH)
            .env("HOME", home)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .arg("-c")
            .arg(config);
        cmd
    }

    fn command(&self) -> Command {
        Self::command_for(&self.binary, &self.config, self.dir.path())
    }

    /// Runs `garage -c <cfg> <args>`; stdout on success.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| format!("run garage {}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(describe_failure(
                &format!("garage {}", args.join(" ")),
                &out,
            ))
        }
    }

    /// Runs `garage -c <cfg> <args>`; stdout, or a panic with the log tail.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| self.fail(&e))
    }

    /// Retries `args` until it succeeds, for up to 30 s (the cluster may
    /// still be settling after `layout apply`). For commands that are not
    /// idempotent, `done` is asked after each failure whether the effect is
    /// there anyway (an earlier attempt may have worked); its `Some(stdout)`
    /// counts as success.
    fn cli_retry(&self, args: &[&str], done: impl Fn(&Self) -> Option<String>) -> String {
        let deadline = Instant::now() + GARAGE_CLI_RETRY;
        loop {
            match self.try_cli(args) {
                Ok(out) => return out,
                Err(e) => {
                    if let Some(out) = done(self) {
                        return out;
                    }
                    // A rejected request (e.g. an invalid bucket name) will
                    // not get better by waiting.
                    let permanent = e.contains("InvalidRequest") || e.contains("Bad request");
                    if permanent || Instant::now() >= deadline {
                        self.fail(&e);
                    }
                }
            }
            thread::sleep(GARAGE_POLL);
        }
    }

    fn fail(&self, msg: &str) -> ! {
        panic!(
            "Garage: {msg}\n--- garage log tail ({}) ---\n{}",
            self.log.display(),
            self.log_tail()
        )
    }

    fn wait_until_up(&mut self) {
        let deadline = Instant::now() + GARAGE_BOOT_TIMEOUT;
        let mut status_ok = false;
        let mut last_error = String::from("(not tried)");
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => self.fail(&format!("server exited during startup ({status})")),
                Ok(None) => {}
                Err(e) => self.fail(&format!("wait on server: {e}")),
            }
            if !status_ok {
                match self.try_cli(&["status"]) {
                    Ok(_) => status_ok = true,
                    Err(e) => last_error = e,
                }
            }
            if status_ok {
                match TcpStream::connect(("127.0.0.1", self.s3_port)) {
                    Ok(_) => return,
                    Err(e) => last_error = format!("S3 port {} not accepting: {e}", self.s3_port),
                }
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "server not up within {} s; last error: {last_error}",
                    GARAGE_BOOT_TIMEOUT.as_secs()
                ));
            }
            thread::sleep(GARAGE_POLL);
        }
    }

    /// `garage node id -q` prints `<64 hex>@<rpc_public_addr>`.
    fn node_id(&self) -> String {
        let out = self.cli(&["node", "id", "-q"]);
        let first = out.lines().next().unwrap_or("").trim();
        let id = first.split('@').next().unwrap_or("").to_string();
        if id.len() != 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            self.fail(&format!("unexpected `garage node id -q` output: {out:?}"));
        }
        id
    }

    fn setup_layout(&self) {
        let id = self.node_id();
        self.cli_retry(&["layout", "assign", "-z", "dc1", "-c", "1G", &id], |_| {
            None
        });
        // `layout show` prints "Current cluster layout version: <n>".
        self.cli_retry(&["layout", "apply", "--version", "1"], |g| {
            g.try_cli(&["layout", "show"])
                .ok()
                .filter(|out| out.contains("Current cluster layout version: 1"))
        });
    }

    fn create_key(&mut self) {
        let out = self.cli_retry(&["key", "create", GARAGE_KEY_NAME], |g| {
            g.try_cli(&["key", "info", "--show-secret", GARAGE_KEY_NAME])
                .ok()
        });
        match parse_key_info(&out) {
            Some((id, secret)) => {
                self.access_key = id;
                self.secret_key = secret;
            }
            None => self.fail(&format!(
                "could not find `Key ID:` / `Secret key:` in `garage key create` output:\n{out}"
            )),
        }
    }

    /// Creates bucket `name` and gives key `bitclone-test` read, write and
    /// owner rights on it.
    pub fn create_bucket(&self, name: &str) {
        self.cli_retry(&["bucket", "create", name], |g| {
            g.try_cli(&["bucket", "info", name]).ok()
        });
        self.cli_retry(
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                name,
                "--key",
                GARAGE_KEY_NAME,
            ],
            |_| None,
        );
    }

    /// `http://127.0.0.1:<s3 port>`
    /// Process id of the server (for CPU accounting in benches).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn s3_port(&self) -> u16 {
        self.s3_port
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn region(&self) -> &str {
        "garage"
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log, 40)
    }

    /// `GET /metrics` on the admin API with the metrics bearer token
    /// (Prometheus text format).
    pub fn metrics(&self) -> String {
        match http_get(self.admin_port, "/metrics", Some(&self.metrics_token)) {
            Ok((200, body)) => body,
            Ok((status, body)) => self.fail(&format!("GET /metrics: HTTP {status}: {body}")),
            Err(e) => self.fail(&format!("GET /metrics: {e}")),
        }
    }

    /// Number of S3 API calls to `endpoint` (Garage's endpoint name, e.g.
    /// `PutObject`, `UploadPart`, `CompleteMultipartUpload`, `GetObject`),
    /// summed over all label sets of `api_s3_request_counter`. Counted when
    /// the handler returns, so every request whose response was received is
    /// included (failed ones too).
    pub fn request_count(&self, endpoint: &str) -> u64 {
        sum_counter(
            &self.metrics(),
            GARAGE_S3_REQUEST_COUNTER,
            "api_endpoint",
            endpoint,
        )
    }

    /// Objects written either way: `PutObject` + `CompleteMultipartUpload`
    /// (one metrics scrape).
    pub fn object_write_count(&self) -> u64 {
        let text = self.metrics();
        ["PutObject", "CompleteMultipartUpload"]
            .iter()
            .map(|e| sum_counter(&text, GARAGE_S3_REQUEST_COUNTER, "api_endpoint", e))
            .sum()
    }

    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION=garage,
    /// AWS_ENDPOINT=<endpoint>, AWS_ALLOW_HTTP=true.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".to_string(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), self.secret_key.clone()),
            ("AWS_REGION".to_string(), self.region().to_string()),
            ("AWS_ENDPOINT".to_string(), self.endpoint()),
            ("AWS_ALLOW_HTTP".to_string(), "true".to_string()),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus server (Debian's `prometheus`) on loopback scraping
/// `targets` (HOST:PORT of `/metrics` listeners) every second, its data in
/// a directory of its own; killed on drop.
pub struct Prometheus {
    pub addr: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn available() -> bool {
        Command::new("prometheus")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn start(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: bitclone\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
        let log = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            addr,
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while crate::node::try_http_get(&p.addr, "/-/ready").map(|r| r.status) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "prometheus did not start:\n{}",
                file_tail(&p.log, 20)
            );
            thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// An instant query's `data.result` (the HTTP query API).
    pub fn query(&self, expr: &str) -> serde_json::Value {
        let q: String = url_encode(expr);
        let r = crate::node::http_get(&self.addr, &format!("/api/v1/query?query={q}"));
        assert_eq!(r.status, 200, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["status"], "success", "{v}");
        v["data"]["result"].clone()
    }

    pub fn log_tail(&self) -> String {
        file_tail(&self.log, 20)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
