//! Node configuration: a TOML file with human units, overridden by
//! `BITCLONE_*` environment variables and flags, validated in one place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitclone_raft::state::{Settings, SettingsUpdate};
use bitclone_storage::ChunkParams;
use serde::Deserialize;

/// The config file as written by people: every field optional, sizes as
/// "256KiB", durations as "1s".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    #[serde(default)]
    pub chunking: FileChunking,
    pub max_message_size: Option<String>,
    pub cpu_threads: Option<usize>,
    #[serde(default)]
    pub jobs: FileJobs,
    pub shutdown_grace: Option<String>,
    /// An upload that sends nothing for this long is ended (and commits
    /// nothing).
    pub upload_idle_timeout: Option<String>,
    /// Free space kept on the data dir's file system, e.g. "1GiB".
    pub disk_reserve: Option<String>,
    #[serde(default)]
    pub http: FileHttp,
    #[serde(default)]
    pub cluster: FileCluster,
    #[serde(default)]
    pub transport: FileTransport,
    /// Defaults for declared S3 sinks (endpoint, credentials); unset
    /// fields come from the standard `AWS_*` variables.
    #[serde(default)]
    pub s3: bitclone_storage::sink::objects::S3Options,
    #[serde(default)]
    pub api: FileApi,
    #[serde(default)]
    pub auth: FileAuth,
    #[serde(default)]
    pub audit: FileAudit,
    #[serde(default)]
    pub files: FileFiles,
    /// The S3 buckets and Postgres catalogs jobs may use, by name.
    #[serde(default)]
    pub sinks: std::collections::BTreeMap<String, crate::sinks::FileSink>,
    #[serde(default)]
    pub gc: FileGc,
    #[serde(default)]
    pub scrub: FileScrub,
    #[serde(default)]
    pub reconcile: FileReconcile,
    /// Retention policies set by the operator (`[[retention]]`).
    #[serde(default)]
    pub retention: Vec<FileRetention>,
    #[serde(default)]
    pub encryption: FileEncryption,
    #[serde(default)]
    pub cold: FileCold,
}

/// The cold tier: chunks of old snapshots packed into a bucket.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCold {
    /// `s3://bucket[/prefix]` (or `file:///abs/dir`): the same on every node.
    pub url: Option<String>,
    /// Chunks only snapshots older than this reach are moved, e.g. "30d".
    pub age: Option<String>,
    /// Between this node's passes ("0s": only on demand, `bitclone tier`).
    pub interval: Option<String>,
    /// The size a pack is filled to, e.g. "64MiB".
    pub pack_size: Option<String>,
    /// S3 settings of the bucket (default: the node's `[s3]`).
    pub s3: Option<bitclone_storage::sink::objects::S3Options>,
}
/// Where the key-encryption keys of encrypted tenants come from (one of
/// the two).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEncryption {
    /// A file of `ID HEX` lines; the first key wraps.
    pub key_file: Option<PathBuf>,
    /// A key-management hook: the program and its first arguments.
    pub kms_command: Option<Vec<String>>,
}

/// One dataset's retention policy in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetention {
    pub tenant: String,
    pub dataset: String,
    pub keep_last: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    /// e.g. "48h".
    pub keep_within: Option<String>,
}

/// Scheduled reconcile jobs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReconcile {
    /// Between rounds ("0s": only on demand, `bitclone reconcile`).
    pub interval: Option<String>,
    /// Hash objects' bytes instead of trusting their metadata.
    pub deep: Option<bool>,
    /// Write out again what drifted (otherwise the job fails, naming it).
    pub repair: Option<bool>,
}

/// Scrubbing: every chunk read back and checked, bad ones replaced.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileScrub {
    /// Between passes ("0s": only on demand, `bitclone scrub`).
    pub interval: Option<String>,
    /// Bytes read per second at most, e.g. "32MiB" ("0": no limit).
    pub rate: Option<String>,
}

/// Garbage collection and retention.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGc {
    /// How often this node collects its store's garbage ("0s": only on
    /// demand, `bitclone gc`).
    pub interval: Option<String>,
    /// How long a chunk stays unreachable before it is freed.
    pub grace: Option<String>,
    /// Memory for a pass's mark, e.g. "64MiB".
    pub memory: Option<String>,
    /// How often the leader applies retention policies ("0s": never).
    pub retention_every: Option<String>,
}

/// The HTTP listener for metrics and health.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttp {
    /// HOST:PORT for `/metrics`, `/healthz` and `/readyz` (off when unset).
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFiles {
    /// Directories `file://` sources and sinks may be in (default: none).
    pub roots: Option<Vec<PathBuf>>,
    /// Each tenant only under `<root>/<tenant>` (default: true).
    pub per_tenant: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAudit {
    /// A file, or "stdout"; default `<data_dir>/audit.log`.
    pub log: Option<String>,
}

/// The public API's TLS.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApi {
    /// Server certificate chain and key (PEM); default: the node's cluster
    /// certificate (`<certs>/node-<id>.pem`, valid for localhost).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA that issued the other nodes' API certificates (node-to-node
    /// reads); default: the cluster CA.
    pub ca: Option<PathBuf>,
    /// Serve plain-text gRPC: only on a loopback address.
    pub plaintext: Option<bool>,
    /// HOST:PORT other nodes reach this node's API at (a DNS name is
    /// fine); default: the bound listen address.
    pub advertise: Option<String>,
}

/// How bearer tokens are verified.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    /// PEM public keys (Ed25519 or RSA) or directories of them.
    pub public_keys: Option<Vec<PathBuf>>,
    /// A JWKS file.
    pub jwks: Option<PathBuf>,
    /// HS256 shared secret file: development only, with `allow_hs256`.
    pub hs256_secret: Option<PathBuf>,
    pub allow_hs256: Option<bool>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    /// Allowed clock skew, e.g. "60s".
    pub leeway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTransport {
    pub max_frame: Option<String>,
    pub stream_window: Option<String>,
    pub connection_window: Option<String>,
    pub max_streams: Option<u32>,
    pub udp_buffer: Option<String>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub node_id: Option<u64>,
    /// A StatefulSet pod's name, `<set>-<ordinal>`: the node id is the
    /// ordinal plus one unless node_id is given.
    pub node_name: Option<String>,
    pub peer_listen: Option<String>,
    /// HOST:PORT other nodes reach this node's peer port at (a DNS name
    /// is fine); default: the bound peer address.
    pub peer_advertise: Option<String>,
    pub certs: Option<PathBuf>,
    pub bootstrap: Option<bool>,
    pub join: Option<String>,
    /// A file holding an admin token, which a node joining through a
    /// member's public API presents there.
    pub join_token_file: Option<PathBuf>,
    pub heartbeat: Option<String>,
    pub election_timeout_min: Option<String>,
    pub election_timeout_max: Option<String>,
    pub snapshot_logs: Option<u64>,
    /// How long a job's lease lasts without a renewal (cluster-wide).
    pub lease: Option<String>,
    /// Shards of a tenant created without a count (cluster-wide).
    pub default_shards: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileChunking {
    pub min_size: Option<String>,
    pub avg_size: Option<String>,
    pub max_size: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileJobs {
    pub workers: Option<usize>,
    pub max_attempts: Option<u32>,
    pub backoff_base: Option<String>,
    pub backoff_max: Option<String>,
}

/// Values given on the command line or in `BITCLONE_*` variables; they win
/// over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub http_listen: Option<String>,
    pub node_id: Option<u64>,
    pub peer_listen: Option<String>,
    pub certs: Option<PathBuf>,
    pub bootstrap: bool,
    pub join: Option<String>,
    pub cpu_threads: Option<usize>,
    pub job_workers: Option<usize>,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub chunking: ChunkParams,
    pub max_message_size: usize,
    pub cpu_threads: usize,
    pub job_workers: usize,
    pub max_attempts: u32,
    pub shutdown_grace: Duration,
    pub upload_idle_timeout: Duration,
    /// Free bytes kept on the data dir's file system.
    pub disk_reserve: u64,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (plain HTTP).
    pub http_listen: Option<SocketAddr>,
    /// Raft membership; a node on its own is a cluster of one.
    pub cluster: ClusterSettings,
    /// QUIC chunk transport tuning.
    pub transport: bitclone_transport::TransportConfig,
    /// The sinks jobs may name (`sink://NAME`).
    pub sinks: crate::sinks::DeclaredSinks,
    /// The public API's TLS.
    pub api: ApiSettings,
    /// How bearer tokens are verified.
    pub auth: crate::auth::AuthSettings,
    /// Where the audit log goes.
    pub audit: crate::audit::AuditTarget,
    /// Where `file://` sources and sinks may be.
    pub files: crate::roots::FileRoots,
    /// Garbage collection and retention.
    pub gc: GcSettings,
    pub scrub: ScrubSettings,
    pub reconcile: ReconcileSettings,
    /// (tenant, dataset, policy) from `[[retention]]`: the leader keeps
    /// the cluster's policies of these datasets equal to them.
    pub retention: Vec<(String, String, bitclone_raft::retention::Retention)>,
    /// The key-encryption keys of encrypted tenants.
    pub keys: crate::keys::KeySource,
    pub cold: ColdSettings,
}

#[derive(Debug, Clone)]
pub struct ColdSettings {
    /// The bucket's URL; none: no cold tier.
    pub url: Option<String>,
    pub s3: bitclone_storage::sink::objects::S3Options,
    /// Chunks reached only by snapshots older than this move; none: none
    /// move (packs already there are still read).
    pub age: Option<Duration>,
    /// Between passes; zero: only on demand.
    pub interval: Duration,
    pub pack_size: u64,
}

#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// Between the leader's rounds; zero: only on demand.
    pub interval: Duration,
    pub deep: bool,
    pub repair: bool,
}

#[derive(Debug, Clone)]
pub struct ScrubSettings {
    /// Between passes; zero: only on demand.
    pub interval: Duration,
    /// Bytes per second at most; zero: no limit.
    pub rate: u64,
}

#[derive(Debug, Clone)]
pub struct GcSettings {
    /// Between passes; zero: only on demand.
    pub interval: Duration,
    pub grace: Duration,
    pub memory_bytes: usize,
    /// Between the leader's retention passes; zero: never.
    pub retention_every: Duration,
}

#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Certificate chain and key files; `None`: plain text (loopback only).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// CA file that verifies other nodes' API certificates.
    pub ca: PathBuf,
    /// HOST:PORT other nodes reach the API at; `None`: the bound address.
    pub advertise: Option<String>,
}

impl ApiSettings {
    /// The URL of a member's API at `addr` (HOST:PORT, or a URL kept as it
    /// is): members serve TLS as this node does, or plain text with it.
    pub fn url(&self, addr: &str) -> String {
        if addr.contains("://") {
            addr.to_string()
        } else if self.tls.is_none() {
            format!("http://{addr}")
        } else {
            format!("https://{addr}")
        }
    }
}

impl ClusterSettings {
    /// The address this node's connections to other members leave from:
    /// the peer listen address's IP unless that is a wildcard. Members
    /// (and firewall rules between them) then see a node's traffic come
    /// from the address it is known by, even when several nodes share a
    /// host on loopback addresses of their own.
    pub fn source_ip(&self) -> Option<std::net::IpAddr> {
        let ip = self.peer_listen.ip();
        (!ip.is_unspecified()).then_some(ip)
    }
}

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub node_id: u64,
    pub peer_listen: SocketAddr,
    pub certs: PathBuf,
    /// No certificate directory was configured: a node that starts a
    /// cluster makes its own CA and certificate there when none exist.
    pub certs_are_default: bool,
    /// Public API addresses (HOST:PORT or URL) of members to join through;
    /// any one that answers will do. Empty: none.
    pub join: Vec<String>,
    /// This node may start the cluster when no seed knows one: it is the
    /// first pod of a StatefulSet (`node_name` ending in `-0`).
    pub forms: bool,
    /// HOST:PORT other nodes reach the peer port at; `None`: the bound
    /// address.
    pub peer_advertise: Option<String>,
    /// The admin token file a joining node presents to that member.
    pub join_token_file: Option<PathBuf>,
    pub heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
    pub snapshot_logs: u64,
    /// Cluster-wide settings this node's config gives (the rest stay as
    /// the cluster has them).
    pub settings: SettingsUpdate,
}

/// The peer address of a node given none: loopback, any free port.
pub const DEFAULT_PEER_LISTEN: &str = "127.0.0.1:0";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

impl NodeConfig {
    /// Reads `file` (if given), applies `env` (the `BITCLONE_*` variables) and
    /// `flags`, and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        flags: Overrides,
    ) -> Result<NodeConfig> {
        let fc: FileConfig = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let mut config = Self::resolve(fc, env, flags)?;
        if let Some(p) = file {
            config.files.protected.push(p.to_path_buf());
        }
        Ok(config)
    }

    pub fn resolve(
        fc: FileConfig,
        env: &dyn Fn(&str) -> Option<String>,
        flags: Overrides,
    ) -> Result<NodeConfig> {
        let flags_cluster = ClusterFlags {
            node_id: flags.node_id,
            peer_listen: flags.peer_listen.clone(),
            certs: flags.certs.clone(),
            bootstrap: flags.bootstrap,
            join: flags.join.clone(),
        };
        // Precedence: flag > environment > file > default.
        let pick = |flag: Option<String>, var: &str, file: Option<String>| {
            flag.or_else(|| env(var)).or(file)
        };
        let data_dir = flags
            .data_dir
            .or_else(|| env("BITCLONE_DATA_DIR").map(PathBuf::from))
            .or(fc.data_dir)
            .context("no data directory: pass --data-dir, set BITCLONE_DATA_DIR or data_dir in the config file")?;
        let listen = pick(flags.listen, "BITCLONE_LISTEN", fc.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen.parse().with_context(|| {
            format!("listen address {listen:?} is not HOST:PORT (an IP address and a port)")
        })?;
        let http_listen = pick(flags.http_listen, "BITCLONE_HTTP_LISTEN", fc.http.listen)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<SocketAddr>().with_context(|| {
                    format!("http listen address {s:?} is not HOST:PORT (an IP address and a port)")
                })
            })
            .transpose()?;
        let size = |var: &str, file: Option<String>, default: u64| -> Result<u64> {
            match env(var).or(file) {
                Some(s) => parse_size(&s).with_context(|| var.to_string()),
                None => Ok(default),
            }
        };
        let disk_reserve = size("BITCLONE_DISK_RESERVE", fc.disk_reserve, 1 << 30)?;
        let d = ChunkParams::default();
        let chunking = ChunkParams {
            min_size: u32_size(size(
                "BITCLONE_CHUNK_MIN_SIZE",
                fc.chunking.min_size,
                d.min_size.into(),
            )?)?,
            avg_size: u32_size(size(
                "BITCLONE_CHUNK_AVG_SIZE",
                fc.chunking.avg_size,
                d.avg_size.into(),
            )?)?,
            max_size: u32_size(size(
                "BITCLONE_CHUNK_MAX_SIZE",
                fc.chunking.max_size,
                d.max_size.into(),
            )?)?,
        };
        chunking.validate().context("chunking")?;
        let max_message_size = size(
            "BITCLONE_MAX_MESSAGE_SIZE",
            fc.max_message_size,
            bitclone_proto::DEFAULT_MAX_MESSAGE_BYTES as u64,
        )? as usize;
        if max_message_size < 2 * bitclone_proto::DATA_FRAME_BYTES {
            bail!("max_message_size must be at least 2MiB (data frames are 1MiB)");
        }
        let num = |var: &str| -> Result<Option<u64>> {
            env(var)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .with_context(|| format!("{var}={v:?} is not a number"))
                })
                .transpose()
        };
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let cpu_threads = flags
            .cpu_threads
            .or(num("BITCLONE_CPU_THREADS")?.map(|n| n as usize))
            .or(fc.cpu_threads)
            .unwrap_or(cpus);
        let job_workers = flags
            .job_workers
            .or(num("BITCLONE_JOB_WORKERS")?.map(|n| n as usize))
            .or(fc.jobs.workers)
            .unwrap_or(2);
        let max_attempts = num("BITCLONE_JOB_MAX_ATTEMPTS")?
            .map(|n| n as u32)
            .or(fc.jobs.max_attempts)
            .unwrap_or(5);
        let dur = |var: &str, file: Option<String>, default: &str| -> Result<Duration> {
            let s = env(var).or(file).unwrap_or_else(|| default.to_string());
            humantime::parse_duration(&s)
                .with_context(|| format!("{var}={s:?} is not a duration like 5s"))
        };
        // Given or not: only what is given changes the cluster's settings.
        let backoff_base = opt_duration(env, "BITCLONE_JOB_BACKOFF_BASE", fc.jobs.backoff_base)?;
        let backoff_max = opt_duration(env, "BITCLONE_JOB_BACKOFF_MAX", fc.jobs.backoff_max)?;
        let shutdown_grace = dur("BITCLONE_SHUTDOWN_GRACE", fc.shutdown_grace, "30s")?;
        let upload_idle_timeout = dur(
            "BITCLONE_UPLOAD_IDLE_TIMEOUT",
            fc.upload_idle_timeout,
            "60s",
        )?;
        if upload_idle_timeout.is_zero() {
            bail!("upload_idle_timeout must be more than 0s");
        }
        let gc = GcSettings {
            interval: dur("BITCLONE_GC_INTERVAL", fc.gc.interval, "1h")?,
            grace: dur("BITCLONE_GC_GRACE", fc.gc.grace, "1h")?,
            memory_bytes: size("BITCLONE_GC_MEMORY", fc.gc.memory, 64 << 20)? as usize,
            retention_every: dur("BITCLONE_RETENTION_EVERY", fc.gc.retention_every, "1m")?,
        };
        let scrub = ScrubSettings {
            interval: dur("BITCLONE_SCRUB_INTERVAL", fc.scrub.interval, "24h")?,
            rate: size("BITCLONE_SCRUB_RATE", fc.scrub.rate, 32 << 20)?,
        };
        let flag = |var: &str, file: Option<bool>| -> Result<bool> {
            match env(var) {
                Some(v) => v
                    .trim()
                    .parse::<bool>()
                    .with_context(|| format!("{var}={v:?} is not true or false")),
                None => Ok(file.unwrap_or(false)),
            }
        };
        let reconcile = ReconcileSettings {
            interval: dur("BITCLONE_RECONCILE_INTERVAL", fc.reconcile.interval, "24h")?,
            deep: flag("BITCLONE_RECONCILE_DEEP", fc.reconcile.deep)?,
            repair: flag("BITCLONE_RECONCILE_REPAIR", fc.reconcile.repair)?,
        };
        let mut retention = Vec::new();
        for r in fc.retention {
            let what = format!("[[retention]] {}/{}", r.tenant, r.dataset);
            bitclone_storage::path::validate_name("tenant", &r.tenant).context(what.clone())?;
            bitclone_storage::path::validate_name("dataset", &r.dataset).context(what.clone())?;
            let within = match &r.keep_within {
                Some(w) => humantime::parse_duration(w)
                    .with_context(|| format!("{what}: keep_within {w:?} is not a duration"))?,
                None => Duration::ZERO,
            };
            let policy = bitclone_raft::retention::Retention {
                keep_last: r.keep_last.unwrap_or(0),
                keep_daily: r.keep_daily.unwrap_or(0),
                keep_weekly: r.keep_weekly.unwrap_or(0),
                keep_monthly: r.keep_monthly.unwrap_or(0),
                keep_within_ms: i64::try_from(within.as_millis()).unwrap_or(i64::MAX),
            };
            if policy.keeps_all() {
                bail!("{what}: no rule; give keep_last, keep_daily, keep_weekly, keep_monthly or keep_within");
            }
            if retention
                .iter()
                .any(|(t, d, _)| *t == r.tenant && *d == r.dataset)
            {
                bail!("{what} is given twice");
            }
            retention.push((r.tenant, r.dataset, policy));
        }
        if gc.memory_bytes < 1 << 20 {
            bail!("gc.memory must be at least 1MiB");
        }
        let mut cluster = resolve_cluster(fc.cluster, env, &flags_cluster, &data_dir)?;
        cluster.settings.backoff_base_ms = backoff_base.map(|d| d.as_millis() as u64);
        cluster.settings.backoff_max_ms = backoff_max.map(|d| d.as_millis() as u64);
        // Checked as the state machine will, against the defaults for what
        // is not given (the cluster checks again against its own).
        cluster
            .settings
            .applied_to(&Settings::default())
            .validate()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cluster settings (jobs.backoff_*, cluster.lease, cluster.default_shards): {e}"
                )
            })?;
        let transport = resolve_transport(fc.transport)?;
        if cpu_threads == 0 || job_workers == 0 {
            bail!("cpu_threads and jobs.workers must be at least 1");
        }
        if max_attempts == 0 {
            bail!("jobs.max_attempts must be at least 1");
        }
        let api = resolve_api(fc.api, env, &cluster, listen)?;
        let auth = resolve_auth(fc.auth, &cluster)?;
        let audit = match env("BITCLONE_AUDIT_LOG").or(fc.audit.log).as_deref() {
            Some("stdout") => crate::audit::AuditTarget::Stdout,
            Some("") => bail!("audit.log is empty: give a file or \"stdout\""),
            Some(path) => crate::audit::AuditTarget::File(path.into()),
            None => crate::audit::AuditTarget::File(data_dir.join("audit.log")),
        };
        let roots = match env("BITCLONE_FILE_ROOTS") {
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect(),
            None => fc.files.roots.unwrap_or_default(),
        };
        if let Some(r) = roots.iter().find(|r| !r.is_absolute()) {
            bail!("files.roots: {} is not an absolute path", r.display());
        }
        // The node's own files: no file:// source or sink may be in them or
        // hold them.
        let mut protected = vec![data_dir.clone(), cluster.certs.clone(), api.ca.clone()];
        protected.extend(api.tls.iter().flat_map(|(c, k)| [c.clone(), k.clone()]));
        protected.extend(auth.public_keys.iter().cloned());
        protected.extend(auth.jwks.iter().cloned());
        protected.extend(auth.hs256_secret.iter().cloned());
        protected.extend(cluster.join_token_file.iter().cloned());
        if let crate::audit::AuditTarget::File(f) = &audit {
            protected.push(f.clone());
        }
        protected.extend(crate::sinks::DeclaredSinks::files(&fc.sinks));
        let s3 = fc.s3.or_env();
        protected.extend(s3.ca_file.iter().cloned());
        let sinks = crate::sinks::DeclaredSinks::from_config(fc.sinks, &s3, env)?;
        let key_file = env("BITCLONE_KEY_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or(fc.encryption.key_file);
        let keys = match (key_file, fc.encryption.kms_command) {
            (Some(_), Some(_)) => {
                bail!("[encryption]: set key_file or kms_command, not both")
            }
            (Some(f), None) => {
                if !f.is_absolute() {
                    bail!(
                        "encryption.key_file: {} is not an absolute path",
                        f.display()
                    );
                }
                crate::keys::KeySource::File(f)
            }
            (None, Some(cmd)) if cmd.is_empty() || cmd[0].is_empty() => {
                bail!("encryption.kms_command: give the program (and its first arguments)")
            }
            (None, Some(cmd)) => crate::keys::KeySource::Hook(cmd),
            (None, None) => crate::keys::KeySource::None,
        };
        if let crate::keys::KeySource::File(f) = &keys {
            protected.push(f.clone());
        }
        let cold = ColdSettings {
            url: env("BITCLONE_COLD_URL")
                .filter(|v| !v.is_empty())
                .or(fc.cold.url),
            s3: fc.cold.s3.unwrap_or_else(|| s3.clone()).or_env(),
            age: opt_duration(env, "BITCLONE_COLD_AGE", fc.cold.age)?,
            interval: dur("BITCLONE_COLD_INTERVAL", fc.cold.interval, "1h")?,
            pack_size: size("BITCLONE_COLD_PACK_SIZE", fc.cold.pack_size, 64 << 20)?,
        };
        if cold.url.is_none() && cold.age.is_some() {
            bail!("cold.age is set but cold.url is not: where would chunks go?");
        }
        if !(1 << 20..=1 << 30).contains(&cold.pack_size) {
            bail!("cold.pack_size must be between 1MiB and 1GiB");
        }
        Ok(NodeConfig {
            cold,
            keys,
            sinks,
            files: crate::roots::FileRoots {
                roots,
                protected,
                per_tenant: match env("BITCLONE_FILE_ROOTS_PER_TENANT").as_deref() {
                    Some("1" | "true") => true,
                    Some("0" | "false" | "") => false,
                    Some(v) => bail!("BITCLONE_FILE_ROOTS_PER_TENANT={v:?} is not true or false"),
                    // Tenants sharing a root could read each other's files.
                    None => fc.files.per_tenant.unwrap_or(true),
                },
            },
            audit,
            api,
            auth,
            data_dir,
            listen,
            chunking,
            max_message_size,
            cpu_threads,
            job_workers,
            max_attempts,
            shutdown_grace,
            upload_idle_timeout,
            gc,
            scrub,
            reconcile,
            retention,
            disk_reserve,
            http_listen,
            cluster,
            transport,
        })
    }
}

fn resolve_api(
    fa: FileApi,
    env: &dyn Fn(&str) -> Option<String>,
    c: &ClusterSettings,
    listen: SocketAddr,
) -> Result<ApiSettings> {
    let node = bitclone_raft::tls::node_name(c.node_id);
    let tls = match (fa.plaintext.unwrap_or(false), fa.tls_cert, fa.tls_key) {
        (true, None, None) => {
            if !listen.ip().is_loopback() {
                bail!(
                    "api.plaintext serves tokens in the clear: only on a loopback address, not {listen}"
                );
            }
            None
        }
        (true, _, _) => bail!("api.plaintext and api.tls_cert/tls_key exclude each other"),
        (false, Some(cert), Some(key)) => Some((cert, key)),
        (false, None, None) => Some((
            c.certs.join(format!("{node}.pem")),
            c.certs.join(format!("{node}.key")),
        )),
        (false, _, _) => bail!("api.tls_cert and api.tls_key go together"),
    };
    let advertise = advertised(env, "BITCLONE_API_ADVERTISE", fa.advertise, "api.advertise")?;
    Ok(ApiSettings {
        tls,
        advertise,
        ca: fa
            .ca
            .unwrap_or_else(|| c.certs.join(bitclone_raft::tls::CA_CERT_FILE)),
    })
}

fn resolve_auth(fa: FileAuth, c: &ClusterSettings) -> Result<crate::auth::AuthSettings> {
    let leeway = match fa.leeway {
        Some(s) => humantime::parse_duration(&s)
            .with_context(|| format!("auth.leeway {s:?} is not a duration like 60s"))?,
        None => Duration::from_secs(60),
    };
    let mut public_keys = fa.public_keys.unwrap_or_default();
    if public_keys.is_empty() && fa.jwks.is_none() && fa.hs256_secret.is_none() {
        // The dev key `bitclone certs dev` makes next to the CA.
        public_keys.push(
            c.certs
                .join(format!("{}.pub", bitclone_raft::tls::DEV_TOKEN_KEY)),
        );
    }
    Ok(crate::auth::AuthSettings {
        public_keys,
        jwks: fa.jwks,
        hs256_secret: fa.hs256_secret,
        allow_hs256: fa.allow_hs256.unwrap_or(false),
        audience: fa.audience,
        issuer: fa.issuer,
        leeway,
    })
}

fn resolve_transport(ft: FileTransport) -> Result<bitclone_transport::TransportConfig> {
    let d = bitclone_transport::TransportConfig::default();
    let size = |v: Option<String>, default: u64, what: &str| -> Result<u64> {
        v.map(|s| parse_size(&s).with_context(|| format!("transport.{what}")))
            .unwrap_or(Ok(default))
    };
    let t = bitclone_transport::TransportConfig {
        max_frame: size(ft.max_frame, d.max_frame as u64, "max_frame")? as usize,
        stream_window: size(ft.stream_window, d.stream_window, "stream_window")?,
        connection_window: size(
            ft.connection_window,
            d.connection_window,
            "connection_window",
        )?,
        max_streams: ft.max_streams.unwrap_or(d.max_streams),
        udp_buffer: size(ft.udp_buffer, d.udp_buffer as u64, "udp_buffer")? as usize,
        idle_timeout: match ft.idle_timeout {
            Some(s) => humantime::parse_duration(&s)
                .with_context(|| format!("transport.idle_timeout {s:?}"))?,
            None => d.idle_timeout,
        },
        protocols: d.protocols,
    };
    if t.max_frame < (4 << 20) + 64 {
        bail!(
            "transport.max_frame must hold a 4 MiB chunk and its name (at least 4MiB + 64 bytes)"
        );
    }
    if t.stream_window > t.connection_window {
        bail!("transport.stream_window is larger than transport.connection_window");
    }
    Ok(t)
}

struct ClusterFlags {
    node_id: Option<u64>,
    peer_listen: Option<String>,
    certs: Option<PathBuf>,
    bootstrap: bool,
    join: Option<String>,
}

fn resolve_cluster(
    fc: FileCluster,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &ClusterFlags,
    data_dir: &Path,
) -> Result<ClusterSettings> {
    let peer_listen = flags
        .peer_listen
        .clone()
        .or_else(|| env("BITCLONE_PEER_LISTEN"))
        .or(fc.peer_listen)
        .unwrap_or_else(|| DEFAULT_PEER_LISTEN.to_string());
    let peer_listen: SocketAddr = peer_listen
        .parse()
        .with_context(|| format!("peer listen address {peer_listen:?} is not IP:PORT"))?;
    let join: Vec<String> = flags
        .join
        .clone()
        .or_else(|| env("BITCLONE_JOIN"))
        .or(fc.join)
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let node_name = env("BITCLONE_NODE_NAME")
        .or(fc.node_name)
        .filter(|s| !s.is_empty());
    let ordinal = node_name.as_deref().map(ordinal_of).transpose()?;
    let peer_advertise = advertised(
        env,
        "BITCLONE_PEER_ADVERTISE",
        fc.peer_advertise,
        "cluster.peer_advertise",
    )?;
    let node_id = match flags.node_id {
        Some(n) => Some(n),
        None => env("BITCLONE_NODE_ID")
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .with_context(|| format!("BITCLONE_NODE_ID={v:?}"))
            })
            .transpose()?
            .or(fc.node_id)
            .or(ordinal.map(|o| o + 1)),
    };
    // A node on its own is node 1 of its cluster of one; a node that joins
    // must say which member it is (its certificate names it).
    let node_id = match (node_id, join.is_empty()) {
        (Some(n), _) => n,
        (None, true) => 1,
        (None, false) => bail!(
            "--join needs --node-id or cluster.node_name (a number, unique and stable for the node, named by its certificate)"
        ),
    };
    if node_id == 0 {
        bail!("node ids start at 1");
    }
    let certs = flags
        .certs
        .clone()
        .or_else(|| env("BITCLONE_CERTS").map(PathBuf::from))
        .or(fc.certs);
    let certs_are_default = certs.is_none();
    let certs = certs.unwrap_or_else(|| data_dir.join("certs"));
    // A node that is not told to join starts a cluster of its own anyway;
    // `--bootstrap` stays accepted and must not be combined with `--join`.
    let truthy = |v: String| matches!(v.as_str(), "1" | "true" | "yes");
    let bootstrap = flags.bootstrap
        || env("BITCLONE_BOOTSTRAP").map(truthy).unwrap_or(false)
        || fc.bootstrap.unwrap_or(false);
    let join_token_file = env("BITCLONE_JOIN_TOKEN_FILE")
        .map(PathBuf::from)
        .or(fc.join_token_file);
    if bootstrap && !join.is_empty() {
        bail!("--bootstrap starts a new cluster and --join joins one: pass only one");
    }
    // The first pod of a set starts the cluster when none of the seeds
    // knows one; every other pod only ever joins.
    let forms = ordinal == Some(0) && !join.is_empty();
    let dur = |var: &str, file: Option<String>, default: &str| -> Result<Duration> {
        let s = env(var).or(file).unwrap_or_else(|| default.to_string());
        humantime::parse_duration(&s).with_context(|| format!("{var}={s:?} is not a duration"))
    };
    // openraft 0.9 has no pre-vote; a follower that heard from a leader
    // waits out a lease of election_timeout_max before its own random
    // election timeout, so a dead leader is replaced after max + (min..max):
    // 600-800 ms with these, measured by the chaos harness. openraft's own
    // 50/150-300 ms are tight for real disks (CRATES.md); a leader stalled
    // past ~600 ms (an fsync, a starved CPU) costs an election.
    let heartbeat = dur("BITCLONE_RAFT_HEARTBEAT", fc.heartbeat, "50ms")?;
    let emin = dur(
        "BITCLONE_RAFT_ELECTION_MIN",
        fc.election_timeout_min,
        "200ms",
    )?;
    let emax = dur(
        "BITCLONE_RAFT_ELECTION_MAX",
        fc.election_timeout_max,
        "400ms",
    )?;
    if !(heartbeat < emin && emin < emax) {
        bail!("need heartbeat < election_timeout_min < election_timeout_max");
    }
    let snapshot_logs = match env("BITCLONE_RAFT_SNAPSHOT_LOGS") {
        Some(v) => v
            .trim()
            .parse::<u64>()
            .with_context(|| format!("BITCLONE_RAFT_SNAPSHOT_LOGS={v:?}"))?,
        None => fc.snapshot_logs.unwrap_or(1000),
    };
    if snapshot_logs < 5 {
        bail!("cluster.snapshot_logs must be at least 5");
    }
    let lease = opt_duration(env, "BITCLONE_LEASE", fc.lease)?;
    let default_shards = match env("BITCLONE_DEFAULT_SHARDS") {
        Some(v) => Some(
            v.trim()
                .parse::<u32>()
                .with_context(|| format!("BITCLONE_DEFAULT_SHARDS={v:?}"))?,
        ),
        None => fc.default_shards,
    };
    Ok(ClusterSettings {
        join_token_file,
        forms,
        peer_advertise,
        node_id,
        peer_listen,
        certs,
        certs_are_default,
        join,
        heartbeat,
        election_timeout: (emin, emax),
        snapshot_logs,
        settings: SettingsUpdate {
            default_shards,
            lease_ms: lease.map(|l| l.as_millis() as i64),
            ..SettingsUpdate::default()
        },
    })
}

/// The ordinal of a StatefulSet pod's name (`bitclone-2` → 2).
fn ordinal_of(name: &str) -> Result<u64> {
    name.rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .with_context(|| {
            format!(
                "node name {name:?} does not end in -ORDINAL like a StatefulSet pod's (bitclone-0)"
            )
        })
}

/// An address to advertise, from `var`, else the file's value, if either
/// is given (see [`check_advertised`]).
fn advertised(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    file: Option<String>,
    what: &str,
) -> Result<Option<String>> {
    env(var)
        .or(file)
        .filter(|s| !s.is_empty())
        .map(|a| check_advertised(what, &a))
        .transpose()
}

/// An address to advertise: HOST:PORT, the host a name or an IP address
/// other nodes can reach (not a wildcard), the port a number.
fn check_advertised(what: &str, a: &str) -> Result<String> {
    let bad = |why: &str| anyhow::anyhow!("{what} {a:?} is not HOST:PORT: {why}");
    if let Ok(sa) = a.parse::<SocketAddr>() {
        if sa.ip().is_unspecified() || sa.port() == 0 {
            return Err(bad("other nodes cannot reach a wildcard address or port 0"));
        }
        return Ok(a.to_string());
    }
    let (host, port) = a.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad("the port is not a number from 1 to 65535"));
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !name_ok {
        return Err(bad("the host is not a DNS name or an IP address"));
    }
    Ok(a.to_string())
}

/// A duration from `var`, else the file's value, if either is given.
fn opt_duration(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    file: Option<String>,
) -> Result<Option<Duration>> {
    env(var)
        .or(file)
        .map(|s| {
            humantime::parse_duration(&s)
                .with_context(|| format!("{var}={s:?} is not a duration like 5s"))
        })
        .transpose()
}

fn u32_size(v: u64) -> Result<u32> {
    u32::try_from(v).context("size does not fit in 32 bits")
}

/// Parses "4MiB", "256 KiB", "1GiB", "512k", "1000" (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size like 4MiB"))?;
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
        other => bail!("unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB, TiB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn example_config_parses_and_validates() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/bitclone.example.toml"
        );
        let cfg = NodeConfig::load(Some(Path::new(path)), &no_env, Overrides::default()).unwrap();
        assert_eq!(cfg.chunking, ChunkParams::default());
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cfg.max_attempts, 5);
    }

    #[test]
    fn precedence_flag_env_file() {
        let fc: FileConfig = toml::from_str(
            "data_dir = \"/file\"\nlisten = \"127.0.0.1:1\"\n[jobs]\nmax_attempts = 3\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "BITCLONE_LISTEN" => Some("127.0.0.1:2".to_string()),
            "BITCLONE_JOB_MAX_ATTEMPTS" => Some("7".to_string()),
            _ => None,
        };
        let flags = Overrides {
            data_dir: Some("/flag".into()),
            ..Default::default()
        };
        let cfg = NodeConfig::resolve(fc, &env, flags).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/flag"));
        assert_eq!(cfg.listen.port(), 2);
        assert_eq!(cfg.max_attempts, 7);
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let with = |toml_text: &str| {
            let fc: FileConfig = toml::from_str(toml_text).unwrap();
            NodeConfig::resolve(
                fc,
                &no_env,
                Overrides {
                    data_dir: Some("/d".into()),
                    ..Default::default()
                },
            )
        };
        assert!(with("[chunking]\nmin_size = \"8MiB\"\n").is_err());
        assert!(with("listen = \"nowhere\"\n").is_err());
        assert!(with("[jobs]\nbackoff_base = \"2m\"\nbackoff_max = \"1m\"\n").is_err());
        assert!(with("[cluster]\nlease = \"10ms\"\n").is_err());
        assert!(with("[cluster]\ndefault_shards = 0\n").is_err());
        // A joining node must say which member it is.
        let e = with("[cluster]\njoin = \"127.0.0.1:7443\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("--node-id"), "{e:#}");
        assert!(with("[cluster]\njoin = \"127.0.0.1:7443\"\nnode_id = 2\n").is_ok());
        assert!(toml::from_str::<FileConfig>("unknown_key = 1\n").is_err());
        assert!(NodeConfig::resolve(FileConfig::default(), &no_env, Overrides::default()).is_err());
        // Lifecycle settings.
        assert!(with("[gc]\nmemory = \"100KiB\"\n").is_err());
        assert!(with("[gc]\ngrace = \"soon\"\n").is_err());
        assert!(toml::from_str::<FileConfig>("[reconcile]\nrepair = \"yes\"\n").is_err());
        let retention = |body: &str| {
            with(&format!(
                "[[retention]]\ntenant = \"t\"\ndataset = \"d\"\n{body}"
            ))
        };
        let e = retention("").unwrap_err();
        assert!(format!("{e:#}").contains("no rule"), "{e:#}");
        assert!(retention("keep_within = \"a while\"\n").is_err());
        let twice =
            "keep_last = 1\n[[retention]]\ntenant = \"t\"\ndataset = \"d\"\nkeep_last = 2\n";
        assert!(format!("{:#}", retention(twice).unwrap_err()).contains("twice"));
        let ok = retention("keep_last = 3\nkeep_within = \"2d\"\n").unwrap();
        assert_eq!(ok.retention.len(), 1);
        assert_eq!(ok.retention[0].2.keep_last, 3);
        assert_eq!(ok.retention[0].2.keep_within_ms, 2 * 86_400_000);
    }

    #[test]
    fn a_statefulset_pod_takes_its_id_addresses_and_seeds_from_its_environment() {
        let pod = |name: &str| {
            let name = name.to_string();
            move |k: &str| match k {
                "BITCLONE_NODE_NAME" => Some(name.clone()),
                "BITCLONE_PEER_ADVERTISE" => Some(format!("{name}.bitclone-peers.ns.svc:7444")),
                "BITCLONE_API_ADVERTISE" => Some(format!("{name}.bitclone-peers.ns.svc:7443")),
                "BITCLONE_JOIN" => Some(
                    "bitclone-0.bitclone-peers.ns.svc:7443, bitclone-1.bitclone-peers.ns.svc:7443"
                        .to_string(),
                ),
                _ => None,
            }
        };
        let load = |env: &dyn Fn(&str) -> Option<String>| {
            NodeConfig::resolve(
                FileConfig::default(),
                env,
                Overrides {
                    data_dir: Some("/d".into()),
                    ..Default::default()
                },
            )
        };
        let first = load(&pod("bitclone-0")).unwrap();
        assert_eq!(first.cluster.node_id, 1);
        assert!(first.cluster.forms, "ordinal 0 may start the cluster");
        assert_eq!(first.cluster.join.len(), 2);
        assert_eq!(
            first.cluster.peer_advertise.as_deref(),
            Some("bitclone-0.bitclone-peers.ns.svc:7444")
        );
        assert_eq!(
            first.api.advertise.as_deref(),
            Some("bitclone-0.bitclone-peers.ns.svc:7443")
        );
        let third = load(&pod("bitclone-2")).unwrap();
        assert_eq!(third.cluster.node_id, 3);
        assert!(!third.cluster.forms, "only ordinal 0 starts a cluster");
        // An explicit id wins over the name.
        let env = pod("bitclone-2");
        let given = load(&|k: &str| match k {
            "BITCLONE_NODE_ID" => Some("9".into()),
            k => env(k),
        })
        .unwrap();
        assert_eq!(given.cluster.node_id, 9);
        // Names and addresses that cannot work are refused with a reason.
        let e = load(&pod("bitclone")).unwrap_err();
        assert!(format!("{e:#}").contains("-ORDINAL"), "{e:#}");
        for bad in [
            "0.0.0.0:7444",
            "host",
            "host:0",
            "host:x",
            "bad host:1",
            ":7444",
        ] {
            let env = pod("bitclone-1");
            let e = load(&|k: &str| match k {
                "BITCLONE_PEER_ADVERTISE" => Some(bad.into()),
                k => env(k),
            })
            .unwrap_err();
            assert!(format!("{e:#}").contains("peer_advertise"), "{bad}: {e:#}");
        }
        assert_eq!(check_advertised("a", "[::1]:7443").unwrap(), "[::1]:7443");
    }

    #[test]
    fn a_node_given_no_cluster_settings_is_node_1_of_its_own_cluster() {
        let cfg = NodeConfig::resolve(
            FileConfig::default(),
            &no_env,
            Overrides {
                data_dir: Some("/d".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let c = &cfg.cluster;
        assert_eq!(c.node_id, 1);
        assert_eq!(c.peer_listen.to_string(), DEFAULT_PEER_LISTEN);
        assert!(c.peer_listen.ip().is_loopback());
        assert_eq!(c.certs, PathBuf::from("/d/certs"));
        assert!(c.certs_are_default);
        // Nothing given: the cluster's settings stay as they are.
        assert_eq!(c.settings, SettingsUpdate::default());
    }

    #[test]
    fn cluster_settings_given_in_config_reach_the_state_machine_update() {
        let fc: FileConfig = toml::from_str(
            "[jobs]\nbackoff_base = \"50ms\"\n[cluster]\nlease = \"2s\"\ndefault_shards = 4\n",
        )
        .unwrap();
        let env = |k: &str| (k == "BITCLONE_JOB_BACKOFF_MAX").then(|| "200ms".to_string());
        let flags = Overrides {
            data_dir: Some("/d".into()),
            ..Default::default()
        };
        let cfg = NodeConfig::resolve(fc, &env, flags).unwrap();
        assert_eq!(
            cfg.cluster.settings,
            SettingsUpdate {
                default_shards: Some(4),
                lease_ms: Some(2_000),
                backoff_base_ms: Some(50),
                backoff_max_ms: Some(200),
            }
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("256 KiB").unwrap(), 256 << 10);
        assert_eq!(parse_size("10").unwrap(), 10);
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }
}
