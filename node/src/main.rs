//! `bitclone`: the node and the command-line client in one binary.

mod audit;
mod auth;
mod cli;
mod cold;
mod config;
mod dev;
mod erase;
mod gc;
mod http;
mod keys;
mod link;
mod metrics;
mod migrate;
mod node;
mod reconcile;
mod replica;
mod restore;
mod roots;
mod server;
mod service;
mod sinks;
mod space;
mod telemetry;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bitclone",
    version,
    about = "BitClone: clone datasets, deduplicated and verified"
)]
struct Cli {
    /// Node to talk to (repeat, or comma-separate, for failover).
    #[arg(
        long = "endpoint",
        global = true,
        env = "BITCLONE_ENDPOINT",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Tenant the datasets belong to.
    #[arg(
        long,
        global = true,
        env = "BITCLONE_TENANT",
        default_value = "default"
    )]
    tenant: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// CA certificate (PEM) that verifies the nodes' TLS certificates
    /// (default: the public web PKI roots).
    #[arg(long, global = true, env = "BITCLONE_CA")]
    ca: Option<PathBuf>,
    /// Bearer token (JWT) sent with every call.
    #[arg(long, global = true, env = "BITCLONE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(
        long,
        global = true,
        env = "BITCLONE_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Allow sending the token over plain-text http:// (loopback addresses only).
    #[arg(long, global = true, env = "BITCLONE_ALLOW_PLAINTEXT")]
    allow_plaintext: bool,
    /// Correlation id sent as x-request-id: the nodes' logs of everything
    /// the command causes (forwarding, replication, jobs) carry it.
    #[arg(long, global = true, env = "BITCLONE_REQUEST_ID")]
    request_id: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Node(server::NodeArgs),
    /// Print a new key-encryption key as a key file line (`ID HEX`, 32
    /// random bytes) for [encryption] key_file; runs locally.
    Keygen {
        #[arg(long, default_value = "k1")]
        id: String,
    },
    /// Upload a directory as a new snapshot of a dataset.
    Put {
        dir: PathBuf,
        #[arg(long)]
        dataset: String,
    },
    /// Restore a snapshot (default: the latest) into a directory.
    Get {
        #[arg(long)]
        dataset: String,
        #[arg(long)]
        snapshot: Option<String>,
        dir: PathBuf,
    },
    /// Submit a clone job: SRC (snapshot://NAME[@ID], sink://SINK[/path]
    /// or file:///abs/path) to each DST (sink://SINK[/path][?mirror=true]
    /// or file:///abs/dir[?mirror=true]). SINK is an S3 bucket or Postgres
    /// catalog the node's operator declared; file:// paths must be under
    /// the node's files.roots.
    Clone {
        #[arg(long)]
        from: String,
        #[arg(long = "to", required = true)]
        to: Vec<String>,
        #[arg(long)]
        dataset: String,
        /// Wait for the job to end, showing its progress.
        #[arg(long)]
        wait: bool,
        /// Attempts before the job fails (default: the node's setting).
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// Submit a reconcile job: compare each destination (sink://SINK[/path]
    /// or file:///abs/dir, as clone names them) with a snapshot of the
    /// dataset (default: the latest): every file an object of the same size
    /// and BLAKE3, nothing else in a mirror, a catalog's rows the
    /// snapshot's entries. Drift fails the job, naming it; --repair clears
    /// what drifted and writes the snapshot out again.
    Reconcile {
        #[arg(long)]
        dataset: String,
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(long = "to", required = true)]
        to: Vec<String>,
        /// Hash every object's bytes instead of trusting its metadata.
        #[arg(long)]
        deep: bool,
        #[arg(long)]
        repair: bool,
        /// Wait for the job to end.
        #[arg(long)]
        wait: bool,
    },
    /// Rebuild a committed snapshot into DIR from the sinks alone (no
    /// cluster): the objects under an s3:// (or file://) prefix, checked
    /// against a Postgres catalog when one is given. Every file's BLAKE3 is
    /// verified. Credentials come from the AWS_* variables.
    Restore {
        /// The object-store sink: s3://bucket/prefix or file:///abs/dir.
        #[arg(long)]
        from: String,
        /// A Postgres catalog the job also wrote (postgres://…).
        #[arg(long)]
        catalog: Option<String>,
        /// The snapshot to restore (default: the newest committed one).
        #[arg(long)]
        snapshot: Option<String>,
        /// S3 endpoint (default: AWS_ENDPOINT_URL / AWS_ENDPOINT, else AWS).
        #[arg(long)]
        s3_endpoint: Option<String>,
        /// S3 region (default: AWS_REGION, else us-east-1).
        #[arg(long)]
        s3_region: Option<String>,
        /// List the sink's commit records and count its objects instead of
        /// restoring.
        #[arg(long, conflicts_with_all = ["catalog", "snapshot", "dir"])]
        list: bool,
        /// Where to restore: a missing or empty directory.
        #[arg(required_unless_present = "list")]
        dir: Option<PathBuf>,
    },
    /// Show a job, or follow it with --watch.
    Job {
        id: String,
        #[arg(long)]
        watch: bool,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// List the tenant's jobs.
    Jobs,
    /// List the tenant's datasets.
    Datasets,
    /// List the snapshots of a dataset.
    Snapshots {
        #[arg(long)]
        dataset: String,
    },
    /// Delete a snapshot of a dataset by its id (the whole id, as
    /// `snapshots` lists it). Deleting the head moves it to the newest
    /// snapshot left; its chunks are freed by garbage collection after the
    /// grace period.
    #[command(name = "snapshot-delete")]
    SnapshotDelete {
        #[arg(long)]
        dataset: String,
        id: String,
    },
    /// Delete a dataset with all its snapshots.
    #[command(name = "dataset-delete")]
    DatasetDelete {
        name: String,
        /// Confirms the deletion of every snapshot.
        #[arg(long)]
        yes: bool,
    },
    /// Show a dataset's retention policy and what it would delete now, or
    /// set it: a snapshot any rule keeps stays, the head always does.
    Retention {
        dataset: String,
        /// Keep the newest N snapshots.
        #[arg(long)]
        keep_last: Option<u32>,
        /// Keep the newest snapshot of each of the N most recent days (UTC)
        /// that have one.
        #[arg(long)]
        keep_daily: Option<u32>,
        /// ... of ISO weeks.
        #[arg(long)]
        keep_weekly: Option<u32>,
        /// ... of calendar months.
        #[arg(long)]
        keep_monthly: Option<u32>,
        /// Keep every snapshot younger than this, e.g. 30d.
        #[arg(long)]
        keep_within: Option<String>,
        /// Remove the policy (keep everything).
        #[arg(long, conflicts_with_all = ["keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_within"])]
        clear: bool,
    },
    /// Run a garbage collection pass (admin) on the node called, or on
    /// every member with --all; --dry-run says what it would free.
    Gc {
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        all: bool,
    },
    /// Move the chunks of snapshots older than [cold] age to the cold
    /// bucket (admin) now, on the node called (or every member with --all):
    /// packed, then evicted locally; reads fetch them back.
    Tier {
        #[arg(long)]
        all: bool,
    },
    /// Scrub (admin): read every chunk, page and snapshot root on the node
    /// called (or every member with --all), check each against its BLAKE3
    /// name and replace bad or missing ones from other members.
    Scrub {
        #[arg(long)]
        all: bool,
    },
    /// Show node statistics.
    Stats,
    /// Tenants (admin).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Bearer tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Cluster membership: status, remove a node.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Drain the node this runs beside (a Kubernetes preStop hook): it takes
    /// no new jobs, hands its running jobs to other nodes and its Raft
    /// leadership to another voter, and reports not ready, until it
    /// restarts. Reads the node's own configuration (--config or
    /// BITCLONE_CONFIG, and the BITCLONE_* variables) to find its id,
    /// address and CA; the admin token comes from --token or --token-file.
    Drain {
        #[arg(long, env = "BITCLONE_CONFIG")]
        config: Option<PathBuf>,
        /// How long to wait for the hand-off.
        #[arg(long, default_value = "20s")]
        timeout: String,
    },
    /// Certificates for the cluster's mutual TLS.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Local development clusters (background processes on loopback).
    #[command(subcommand)]
    Dev(DevCmd),
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant: datasets and jobs exist only in tenants an admin
    /// created.
    Create {
        name: String,
        /// Shards (default: the cluster's default_shards).
        #[arg(long)]
        shards: Option<u32>,
    },
    /// Grow a tenant's shard count (it never shrinks).
    Grow {
        name: String,
        #[arg(long)]
        shards: u32,
    },
    /// Erase a tenant: stop its jobs, delete its data in the sinks declared
    /// `owned`, forget its datasets, snapshots and jobs, and purge its
    /// chunks from every node; prints what was removed where. The name can
    /// be used again once every node purged.
    Erase {
        name: String,
        /// Confirms that everything of the tenant goes.
        #[arg(long)]
        yes: bool,
    },
    /// Encrypt a tenant that has no data yet: its chunks and manifests are
    /// sealed with a data key of its own, wrapped by the nodes'
    /// key-encryption key ([encryption] in their config).
    Encrypt { name: String },
    /// List the encrypted tenants: their data keys' fingerprints, the
    /// key-encryption key wrapping each, and whether the answering node
    /// holds it open.
    Keys { name: Option<String> },
    /// Re-wrap the data key of a tenant (all encrypted tenants without a
    /// name) with the nodes' current key-encryption key, the first of their
    /// key file: rotates that key without rewriting any chunk.
    Rewrap { name: Option<String> },
    /// Set a tenant's limits (0: none): bytes its snapshots may add to the
    /// store, and jobs not yet finished.
    Quota {
        name: String,
        /// e.g. 500GiB.
        #[arg(long, default_value = "0")]
        max_bytes: String,
        #[arg(long, default_value_t = 0)]
        max_jobs: u32,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Sign a token with the dev key (<certs>/token.key) for local use:
    /// for the tenant given with --tenant ("*": every tenant).
    Issue {
        /// The dev CA directory (`bitclone certs dev --out`), holding token.key.
        #[arg(long, env = "BITCLONE_CERTS")]
        certs: PathBuf,
        /// Scopes, comma-separated: read, write, admin.
        #[arg(long, value_delimiter = ',', default_value = "read,write")]
        scope: Vec<String>,
        /// How long the token is valid, e.g. 1h, 30m.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Who the token names (the `sub` claim; shown in the audit log).
        #[arg(long, default_value = "dev")]
        subject: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term, commit index and shard layout.
    Status,
    /// Drain a node out of the cluster (its shards move to the others). It
    /// cannot join again until `allow-rejoin`.
    Remove { id: u64 },
    /// Let a removed node join again.
    AllowRejoin { id: u64 },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Make (or extend) a development CA and node certificates node-1..node-N.
    Dev {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Another name (IP address or DNS name) every node certificate
        /// carries besides node-N, localhost, 127.0.0.1 and ::1
        /// (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// Start a local cluster of N nodes (mutual TLS, bootstrap, join) and wait until it is ready.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long)]
        data_dir: PathBuf,
        /// A directory file:// sources and sinks may use (repeatable; none
        /// by default).
        #[arg(long = "allow-root")]
        allow_roots: Vec<PathBuf>,
        /// A node config file each node reads (e.g. its [sinks.NAME]);
        /// dev up's own settings win over it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Stop the local cluster started in DATA_DIR.
    Down {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// glibc gives threads that allocate at once arenas of their own (up to 8
/// per core) and keeps what is freed in each. One arena: a 1 GiB put's node
/// peak RSS 96 MiB instead of 135, a 100,000-file put's 106 instead of 117
/// (and the CLI's 44 instead of 63), no slower (`bitclone-bench`, both
/// profiles, MALLOC_ARENA_MAX=1 against the default).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; it runs before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}

fn main() -> std::process::ExitCode {
    one_malloc_arena();
    let cli = Cli::parse();
    let is_node = matches!(cli.cmd, Cmd::Node(_));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Node(args) => server::run(args).await,
            Cmd::Keygen { id } => {
                println!("{}", keys::generate_line(&id)?);
                Ok(std::process::ExitCode::SUCCESS)
            }
            Cmd::Certs(CertsCmd::Dev { out, nodes, sans }) => {
                dev::certs(&out, nodes, &sans, cli.json)
            }
            Cmd::Dev(DevCmd::Up {
                nodes,
                data_dir,
                allow_roots,
                config,
            }) => dev::up(&data_dir, nodes, &allow_roots, config.as_deref(), cli.json).await,
            Cmd::Token(TokenCmd::Issue {
                certs,
                scope,
                ttl,
                subject,
            }) => dev::issue_token(&certs, &cli.tenant, &scope, &ttl, &subject, cli.json),
            Cmd::Dev(DevCmd::Down { data_dir }) => dev::down(&data_dir, cli.json).await,
            Cmd::Restore {
                from,
                catalog,
                snapshot,
                s3_endpoint,
                s3_region,
                list,
                dir,
            } => {
                let s3 = bitclone_storage::sink::objects::S3Options {
                    endpoint: s3_endpoint,
                    region: s3_region,
                    ..Default::default()
                };
                match dir {
                    Some(dir) if !list => {
                        restore::run(
                            &from,
                            catalog.as_deref(),
                            snapshot.as_deref(),
                            s3,
                            &dir,
                            cli.json,
                        )
                        .await
                    }
                    _ => restore::list(&from, s3, cli.json).await,
                }
            }
            cmd => {
                let access = cli::Access {
                    ca: cli.ca,
                    token: cli.token,
                    token_file: cli.token_file,
                    allow_plaintext: cli.allow_plaintext,
                    request_id: cli.request_id,
                };
                if let Cmd::Drain { config, timeout } = cmd {
                    return cli::drain(
                        cli.endpoints,
                        access,
                        config.as_deref(),
                        &timeout,
                        cli.json,
                    )
                    .await;
                }
                let ctx = cli::Ctx::new(cli.endpoints, cli.tenant, cli.json, access);
                cli::run(ctx, cmd).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            if is_node {
                tracing::error!("{e:#}");
            }
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
