//! The client subcommands of `bitclone`, on top of the SDK.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitclone_client::{proto, Client, Progress};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::Cmd;

pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:7443";

/// How the CLI reaches the nodes and who it calls them as.
#[derive(Default)]
pub struct Access {
    pub ca: Option<std::path::PathBuf>,
    pub token: Option<String>,
    pub token_file: Option<std::path::PathBuf>,
    pub allow_plaintext: bool,
    pub request_id: Option<String>,
}

impl Access {
    pub fn options(&self) -> Result<bitclone_client::ConnectOptions> {
        let mut o = bitclone_client::ConnectOptions::new().allow_plaintext(self.allow_plaintext);
        if let Some(id) = &self.request_id {
            o = o.request_id(id.clone());
        }
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
            o = o.ca_pem(pem);
        }
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading the token file {}", f.display()))?,
            ),
            (None, None) => None,
        };
        if let Some(t) = token {
            o = o.token(t);
        }
        Ok(o)
    }
}

pub struct Ctx {
    endpoints: Vec<String>,
    tenant: String,
    json: bool,
    access: Access,
}

impl Ctx {
    pub fn new(endpoints: Vec<String>, tenant: String, json: bool, access: Access) -> Ctx {
        let endpoints = if endpoints.is_empty() {
            vec![DEFAULT_ENDPOINT.to_string()]
        } else {
            endpoints
        };
        Ctx {
            endpoints,
            tenant,
            json,
            access,
        }
    }

    /// A client of one member, at its API address (HOST:PORT), with the
    /// scheme the endpoints given use.
    async fn connect_to(&self, api_addr: &str) -> Result<Client> {
        let scheme = if self.endpoints.iter().all(|e| e.starts_with("http://")) {
            "http"
        } else {
            "https"
        };
        Ok(
            Client::connect_with([format!("{scheme}://{api_addr}")], self.access.options()?)
                .await
                .with_context(|| format!("connecting to {api_addr}"))?
                .with_tenant(self.tenant.clone()),
        )
    }

    async fn client(&self) -> Result<Client> {
        Ok(
            Client::connect_with(&self.endpoints, self.access.options()?)
                .await
                .with_context(|| format!("connecting to {}", self.endpoints.join(", ")))?
                .with_tenant(self.tenant.clone()),
        )
    }
}

/// Progress on stderr: a bar on a terminal, a plain line every few seconds otherwise.
struct Bar {
    bar: Option<ProgressBar>,
    label: String,
    plain: Mutex<(u64, u64, Instant)>,
}

impl Bar {
    fn new(label: &str, quiet: bool) -> Bar {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(label.to_string());
            b
        });
        Bar {
            bar,
            label: label.to_string(),
            plain: Mutex::new((0, 0, Instant::now())),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn set_total(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_length(bytes);
        } else if let Ok(mut p) = self.plain.lock() {
            p.1 = bytes;
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
            return;
        }
        if let Ok(mut p) = self.plain.lock() {
            p.0 += bytes;
            if p.2.elapsed() >= Duration::from_secs(2) {
                p.2 = Instant::now();
                eprintln!("{}: {} of {} bytes", self.label, p.0, p.1);
            }
        }
    }

    fn message(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }
}

fn job_json(j: &proto::Job) -> serde_json::Value {
    let p = j.progress.clone().unwrap_or_default();
    json!({
        "id": j.id,
        "tenant": j.tenant,
        "dataset": j.dataset,
        "source": j.source,
        "destinations": j.destinations,
        "state": bitclone_client::job_state_name(j.state),
        "attempts": j.attempts,
        "max_attempts": j.max_attempts,
        "last_error": j.last_error,
        "snapshot": j.snapshot,
        "progress": {
            "phase": p.phase,
            "files_done": p.files_done,
            "files_total": p.files_total,
            "bytes_done": p.bytes_done,
            "bytes_total": p.bytes_total,
        },
        "created_unix_ms": j.created_unix_ms,
        "updated_unix_ms": j.updated_unix_ms,
        "next_attempt_unix_ms": j.next_attempt_unix_ms,
        "lease_holder": if j.lease_holder == 0 { serde_json::Value::Null } else { json!(j.lease_holder) },
        "fencing_token": j.fencing_token,
    })
}

fn job_line(j: &proto::Job) -> String {
    let p = j.progress.clone().unwrap_or_default();
    let mut s = format!(
        "{}  {:9}  {} -> {}  attempts {}/{}",
        j.id,
        bitclone_client::job_state_name(j.state),
        j.source,
        j.destinations.join(","),
        j.attempts,
        j.max_attempts
    );
    if !p.phase.is_empty() {
        s.push_str(&format!(
            "  [{}: {}/{} files]",
            p.phase, p.files_done, p.files_total
        ));
    }
    if !j.snapshot.is_empty() {
        s.push_str(&format!("  snapshot {}", j.snapshot));
    }
    if !j.last_error.is_empty() {
        s.push_str(&format!("  error: {}", j.last_error));
    }
    s
}

pub fn status_json(st: &proto::ClusterStatusResponse) -> serde_json::Value {
    json!({
        "node_id": st.node_id,
        // Always true now (a node on its own is a cluster of one); kept for
        // scripts written against 0.1.0.
        "clustered": st.clustered,
        "leader": if st.leader_id == 0 { serde_json::Value::Null } else { json!(st.leader_id) },
        "term": st.term,
        "applied_index": st.applied_index,
        "last_log_index": st.last_log_index,
        "raft_state": st.raft_state,
        "members": st.members.iter().map(|m| json!({
            "id": m.id, "api_addr": m.api_addr, "peer_addr": m.peer_addr, "voter": m.voter,
            "reachable": m.reachable,
            "ready": if m.reachable { json!(m.ready) } else { serde_json::Value::Null },
            "not_ready": m.not_ready,
        })).collect::<Vec<_>>(),
        "snapshot_index": st.snapshot_index,
        "purged_index": st.purged_index,
        "layout_version": st.layout_version,
        "ready_nodes": st.ready_nodes,
        "previous_layout_version": if st.previous_layout_version == 0 { serde_json::Value::Null } else { json!(st.previous_layout_version) },
        "shards": st.shards.iter().map(|s| json!({
            "tenant": s.tenant, "shard": s.shard, "replicas": s.replicas,
        })).collect::<Vec<_>>(),
    })
}

fn print_status(st: &proto::ClusterStatusResponse) {
    println!(
        "node {}  state {}  leader {}  term {}  applied {}  last log {}",
        st.node_id,
        st.raft_state,
        if st.leader_id == 0 {
            "none".to_string()
        } else {
            st.leader_id.to_string()
        },
        st.term,
        st.applied_index,
        st.last_log_index
    );
    for m in &st.members {
        let readiness = match (m.reachable, m.ready) {
            (false, _) => "unreachable".to_string(),
            (true, true) => "ready".to_string(),
            (true, false) => format!("NOT READY: {}", m.not_ready.join("; ")),
        };
        println!(
            "  member {}  api {}  peer {}  {}  {}",
            m.id,
            m.api_addr,
            m.peer_addr,
            if m.voter { "voter" } else { "learner" },
            readiness
        );
    }
    println!(
        "  layout v{} ({} shards)",
        st.layout_version,
        st.shards.len()
    );
    let mut load: std::collections::BTreeMap<u64, usize> = Default::default();
    for s in &st.shards {
        for r in &s.replicas {
            *load.entry(*r).or_default() += 1;
        }
    }
    for (n, l) in load {
        println!("    node {n}: {l} shard replicas");
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{v}");
}

/// Follows a job until it ends; returns its final state.
async fn follow(client: &Client, id: &str, ctx: &Ctx, show_bar: bool) -> Result<proto::Job> {
    let bar = Bar::new("clone", ctx.json || !show_bar);
    let mut stream = client.watch_job(id).await?;
    let mut last: Option<proto::Job> = None;
    let mut last_line = Instant::now() - Duration::from_secs(10);
    while let Some(item) = stream.next().await {
        let j = item?;
        if let Some(p) = &j.progress {
            if let Some(b) = &bar.bar {
                b.set_length(p.bytes_total);
                b.set_position(p.bytes_done);
                b.set_message(p.phase.chars().take(12).collect::<String>());
            } else if !ctx.json && last_line.elapsed() >= Duration::from_secs(2) {
                last_line = Instant::now();
                eprintln!("{}", job_line(&j));
            }
        }
        let done = bitclone_client::is_final(j.state);
        last = Some(j);
        if done {
            break;
        }
    }
    bar.finish();
    match last {
        Some(j) => Ok(j),
        None => bail!("the node ended the watch of job {id} without sending it"),
    }
}

/// `bitclone drain`: drains the node whose configuration this process sees
/// (in a preStop hook, the pod's own), through its own API address.
pub async fn drain(
    endpoints: Vec<String>,
    mut access: Access,
    config: Option<&std::path::Path>,
    timeout: &str,
    json: bool,
) -> Result<ExitCode> {
    let timeout = humantime::parse_duration(timeout)
        .with_context(|| format!("--timeout {timeout:?} is not a duration like 20s"))?;
    let env = |k: &str| std::env::var(k).ok();
    let cfg = crate::config::NodeConfig::load(config, &env, Default::default())
        .context("reading the node's configuration (to find which node to drain)")?;
    let plaintext = cfg.api.tls.is_none();
    let endpoint = match endpoints.first() {
        Some(e) => e.clone(),
        None => {
            // Its advertised name is what its certificate names; a
            // wildcard listen address is reached on loopback.
            let host = cfg.api.advertise.clone().unwrap_or_else(|| {
                let mut a = cfg.listen;
                if a.ip().is_unspecified() {
                    a.set_ip(if a.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                a.to_string()
            });
            cfg.api.url(&host)
        }
    };
    if access.ca.is_none() && !plaintext {
        access.ca = Some(cfg.api.ca.clone());
    }
    access.allow_plaintext |= plaintext;
    let id = cfg.cluster.node_id;
    let client = Client::connect_with([endpoint.as_str()], access.options()?)
        .await
        .with_context(|| format!("connecting to node {id} at {endpoint}"))?;
    let r = client
        .drain_node(id, timeout)
        .await
        .with_context(|| format!("draining node {id} at {endpoint}"))?;
    let complete = r.jobs_still_running == 0 && (!r.was_leader || r.leadership_moved);
    if json {
        print_json(&json!({
            "node": id, "jobs_handed_off": r.jobs_handed_off,
            "jobs_still_running": r.jobs_still_running, "was_leader": r.was_leader,
            "leadership_moved": r.leadership_moved, "leader": r.leader_id,
            "complete": complete,
        }));
    } else {
        eprintln!(
            "node {id} drained: {} jobs handed off, {} still running; {}",
            r.jobs_handed_off,
            r.jobs_still_running,
            match (r.was_leader, r.leadership_moved) {
                (false, _) => format!("leader is node {}", r.leader_id),
                (true, true) => format!("leadership moved to node {}", r.leader_id),
                (true, false) => "still the leader (no other voter took over in time)".into(),
            }
        );
    }
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn run(ctx: Ctx, cmd: Cmd) -> Result<ExitCode> {
    let client = ctx.client().await?;
    match cmd {
        Cmd::Node(_)
        | Cmd::Keygen { .. }
        | Cmd::Certs(_)
        | Cmd::Dev(_)
        | Cmd::Token(_)
        | Cmd::Restore { .. }
        | Cmd::Drain { .. } => {
            unreachable!("handled by main")
        }
        Cmd::Tenant(crate::TenantCmd::Quota {
            name,
            max_bytes,
            max_jobs,
        }) => {
            let max = crate::config::parse_size(&max_bytes)
                .with_context(|| format!("--max-bytes {max_bytes:?}"))?;
            let used = client.set_quota(&name, max, max_jobs).await?;
            if ctx.json {
                print_json(
                    &json!({"tenant": name, "max_bytes": max, "max_jobs": max_jobs, "stored_bytes": used}),
                );
            } else {
                println!("tenant {name}: stores {used} bytes; limits {max} bytes, {max_jobs} jobs (0: none)");
            }
        }
        Cmd::Tenant(crate::TenantCmd::Encrypt { name }) => {
            let k = client.encrypt_tenant(&name).await?;
            print_keys(&ctx, "encrypted", &[k]);
        }
        Cmd::Tenant(crate::TenantCmd::Keys { name }) => {
            let keys = client.tenant_keys(name.as_deref()).await?;
            print_keys(&ctx, "", &keys);
        }
        Cmd::Tenant(crate::TenantCmd::Rewrap { name }) => {
            let keys = client.rewrap_tenant_keys(name.as_deref()).await?;
            print_keys(&ctx, "re-wrapped", &keys);
        }
        Cmd::Tenant(crate::TenantCmd::Erase { name, yes }) => {
            if !yes {
                anyhow::bail!(
                    "tenant erase deletes every dataset, snapshot and job of {name} and its \
                     data in owned sinks: add --yes to confirm"
                );
            }
            let r = client.erase_tenant(&name).await?;
            if ctx.json {
                print_json(&json!({
                    "tenant": r.tenant, "datasets": r.datasets, "snapshots": r.snapshots,
                    "jobs": r.jobs,
                    "sinks": r.sinks.iter().map(|s| json!({
                        "sink": s.sink, "unit": s.unit, "removed": s.removed,
                    })).collect::<Vec<_>>(),
                    "nodes": r.nodes.iter().map(|n| json!({
                        "node": n.node, "done": n.done, "chunks": n.chunks, "bytes": n.bytes,
                        "snapshots": n.snapshots,
                    })).collect::<Vec<_>>(),
                }));
            } else {
                println!(
                    "tenant {name} erased: {} datasets, {} snapshots, {} jobs",
                    r.datasets, r.snapshots, r.jobs
                );
                for s in &r.sinks {
                    println!("  sink {}: {} {} deleted", s.sink, s.removed, s.unit);
                }
                for n in &r.nodes {
                    if n.done {
                        println!(
                            "  node {}: {} chunks ({} bytes) and {} snapshot roots purged",
                            n.node, n.chunks, n.bytes, n.snapshots
                        );
                    } else {
                        println!(
                            "  node {}: not purged yet (it purges when it runs again)",
                            n.node
                        );
                    }
                }
            }
        }
        Cmd::Tenant(t) => {
            let (name, shards) = match t {
                crate::TenantCmd::Create { name, shards } => (name, shards.unwrap_or(0)),
                crate::TenantCmd::Grow { name, shards } => (name, shards),
                crate::TenantCmd::Quota { .. }
                | crate::TenantCmd::Erase { .. }
                | crate::TenantCmd::Encrypt { .. }
                | crate::TenantCmd::Keys { .. }
                | crate::TenantCmd::Rewrap { .. } => {
                    unreachable!("matched above")
                }
            };
            let version = client.set_tenant(&name, shards).await?;
            if ctx.json {
                print_json(&json!({"tenant": name, "layout_version": version}));
            } else {
                println!("tenant {name} (layout v{version})");
            }
        }
        Cmd::Cluster(crate::ClusterCmd::Status) => {
            let st = client.cluster_status().await?;
            if ctx.json {
                print_json(&status_json(&st));
            } else {
                print_status(&st);
            }
        }
        Cmd::Cluster(crate::ClusterCmd::Remove { id }) => {
            // Membership changes go through the leader.
            let st = client.cluster_status().await?;
            let leader = st
                .members
                .iter()
                .find(|m| m.id == st.leader_id)
                .with_context(|| "no leader is known right now; retry".to_string())?;
            let leader_client = ctx.connect_to(&leader.api_addr).await?;
            let st = leader_client.remove_node(id).await?;
            if ctx.json {
                print_json(&status_json(&st));
            } else {
                eprintln!("node {id} removed");
                print_status(&st);
            }
        }
        Cmd::Cluster(crate::ClusterCmd::AllowRejoin { id }) => {
            let st = client.allow_rejoin(id).await?;
            if ctx.json {
                print_json(&status_json(&st));
            } else {
                eprintln!("node {id} may join again");
            }
        }
        Cmd::Put { dir, dataset } => {
            let bar = Bar::new("put", ctx.json);
            let s = client.upload_dir(&dataset, &dir, &bar).await;
            bar.finish();
            let s = s.with_context(|| format!("uploading {}", dir.display()))?;
            if ctx.json {
                print_json(&json!({
                    "snapshot": s.snapshot, "files": s.files, "bytes": s.bytes,
                    "new_chunks": s.new_chunks, "new_bytes": s.new_bytes, "chunks": s.chunks,
                    "unchanged_files": s.unchanged_files, "symlinks": s.symlinks,
                    "new_pages": s.new_pages, "new_page_bytes": s.new_page_bytes,
                    "parent_pages_fetched": s.parent_pages.fetched,
                    "parent_pages_cached": s.parent_pages.cached,
                    "skipped": s.skipped, "seconds": s.seconds,
                }));
            } else {
                for p in &s.skipped {
                    eprintln!("skipped (a socket, device or pipe, or a link leading out of the tree): {p}");
                }
                eprintln!(
                    "{} files, {} bytes in {:.2}s ({:.1} MB/s, {:.0} files/s); stored {} new chunks, {} new bytes, {} new manifest pages; {} files unchanged",
                    s.files, s.bytes, s.seconds, s.bytes as f64 / 1e6 / s.seconds.max(1e-9),
                    s.files as f64 / s.seconds.max(1e-9),
                    s.new_chunks, s.new_bytes, s.new_pages, s.unchanged_files
                );
                println!("{}", s.snapshot);
            }
        }
        Cmd::Get {
            dataset,
            snapshot,
            dir,
        } => {
            let bar = Bar::new("get", ctx.json);
            let s = client
                .download(&dataset, snapshot.as_deref(), &dir, &bar)
                .await;
            bar.finish();
            let s = s.with_context(|| format!("restoring into {}", dir.display()))?;
            if ctx.json {
                print_json(
                    &json!({"snapshot": s.snapshot, "files": s.files, "bytes": s.bytes,
                        "symlinks": s.symlinks, "seconds": s.seconds,
                        "sync_seconds": s.sync_seconds}),
                );
            } else {
                eprintln!(
                    "restored {} files, {} bytes of snapshot {} in {:.2}s ({:.1} MB/s; \
                     {:.2}s of it syncing to disk)",
                    s.files,
                    s.bytes,
                    s.snapshot,
                    s.seconds,
                    s.bytes as f64 / 1e6 / s.seconds.max(1e-9),
                    s.sync_seconds
                );
            }
        }
        Cmd::Clone {
            from,
            to,
            dataset,
            wait,
            max_attempts,
        } => {
            let job = client
                .submit_clone(&dataset, &from, &to, max_attempts.unwrap_or(0))
                .await?;
            return finish_job(&client, job, wait, &ctx).await;
        }
        Cmd::Reconcile {
            dataset,
            snapshot,
            to,
            deep,
            repair,
            wait,
        } => {
            let job = client
                .submit_reconcile(&dataset, snapshot.as_deref(), &to, deep, repair)
                .await?;
            return finish_job(&client, job, wait, &ctx).await;
        }
        Cmd::Job { id, watch } => {
            let j = if watch {
                follow(&client, &id, &ctx, true).await?
            } else {
                client.get_job(&id).await?
            };
            if ctx.json {
                print_json(&job_json(&j));
            } else {
                println!("{}", job_line(&j));
            }
        }
        Cmd::Cancel { id } => {
            let j = client.cancel_job(&id).await?;
            if ctx.json {
                print_json(&job_json(&j));
            } else {
                println!("{}", job_line(&j));
            }
        }
        Cmd::Jobs => {
            let jobs = client.list_jobs().await?;
            if ctx.json {
                print_json(&json!({"jobs": jobs.iter().map(job_json).collect::<Vec<_>>()}));
            } else {
                for j in &jobs {
                    println!("{}", job_line(j));
                }
            }
        }
        Cmd::Datasets => {
            let list = client.list_datasets().await?;
            if ctx.json {
                print_json(&json!({"datasets": list.iter().map(|d| json!({
                    "name": d.name, "latest_snapshot": d.latest_snapshot, "snapshots": d.snapshots,
                })).collect::<Vec<_>>()}));
            } else {
                for d in &list {
                    println!(
                        "{}  {}  ({} snapshots)",
                        d.name, d.latest_snapshot, d.snapshots
                    );
                }
            }
        }
        Cmd::Snapshots { dataset } => {
            let list = client.list_snapshots(&dataset).await?;
            if ctx.json {
                print_json(&json!({"snapshots": list.iter().map(|s| json!({
                    "id": s.id, "dataset": s.dataset, "parent": s.parent, "files": s.files,
                    "bytes": s.bytes, "created_unix_ms": s.created_unix_ms,
                })).collect::<Vec<_>>()}));
            } else {
                for s in &list {
                    println!(
                        "{}  {} files  {} bytes  created {}",
                        s.id, s.files, s.bytes, s.created_unix_ms
                    );
                }
            }
        }
        Cmd::SnapshotDelete { dataset, id } => {
            let r = client.delete_snapshot(&dataset, &id).await?;
            print_deleted(&ctx, &dataset, &r);
        }
        Cmd::DatasetDelete { name, yes } => {
            if !yes {
                anyhow::bail!(
                    "dataset-delete removes every snapshot of {name}: add --yes to confirm"
                );
            }
            let r = client.delete_dataset(&name).await?;
            print_deleted(&ctx, &name, &r);
        }
        Cmd::Retention {
            dataset,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_within,
            clear,
        } => {
            let setting = clear
                || keep_last.is_some()
                || keep_daily.is_some()
                || keep_weekly.is_some()
                || keep_monthly.is_some()
                || keep_within.is_some();
            let r = if setting {
                let within = keep_within
                    .map(|w| {
                        humantime::parse_duration(&w)
                            .map_err(|e| anyhow::anyhow!("--keep-within {w:?}: {e}"))
                    })
                    .transpose()?;
                let policy = bitclone_client::proto::RetentionPolicy {
                    keep_last: keep_last.unwrap_or(0),
                    keep_daily: keep_daily.unwrap_or(0),
                    keep_weekly: keep_weekly.unwrap_or(0),
                    keep_monthly: keep_monthly.unwrap_or(0),
                    keep_within_seconds: within.map_or(0, |d| d.as_secs()),
                };
                client.set_retention(&dataset, policy).await?
            } else {
                client.get_retention(&dataset).await?
            };
            let p = r.policy.unwrap_or_default();
            if ctx.json {
                print_json(&json!({
                    "dataset": dataset,
                    "policy": {
                        "keep_last": p.keep_last, "keep_daily": p.keep_daily,
                        "keep_weekly": p.keep_weekly, "keep_monthly": p.keep_monthly,
                        "keep_within_seconds": p.keep_within_seconds,
                    },
                    "would_delete": r.would_delete,
                }));
            } else {
                if p == bitclone_client::proto::RetentionPolicy::default() {
                    println!("{dataset}: no retention policy (every snapshot is kept)");
                } else {
                    println!(
                        "{dataset}: keep last {}, daily {}, weekly {}, monthly {}, within {}",
                        p.keep_last,
                        p.keep_daily,
                        p.keep_weekly,
                        p.keep_monthly,
                        humantime::format_duration(std::time::Duration::from_secs(
                            p.keep_within_seconds
                        ))
                    );
                }
                println!("would delete now: {} snapshots", r.would_delete.len());
                for id in &r.would_delete {
                    println!("  {id}");
                }
            }
        }
        Cmd::Tier { all } => {
            let (reports, failed) =
                on_members(&client, &ctx, all, |c| async move { c.tier().await }).await?;
            let nodes: Vec<_> = reports
                .iter()
                .map(|r| {
                    json!({
                        "node": r.node, "packs": r.packs, "chunks": r.chunks, "bytes": r.bytes,
                        "evicted": r.evicted, "seconds": r.seconds,
                    })
                })
                .collect();
            if ctx.json {
                print_json(&json!({ "nodes": nodes }));
            } else {
                for r in &reports {
                    println!(
                        "node {}: {} packs, {} chunks ({} bytes) moved to the cold tier, {} \
                         evicted here, in {:.1}s",
                        r.node, r.packs, r.chunks, r.bytes, r.evicted, r.seconds
                    );
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Scrub { all } => {
            let (reports, mut failed) =
                on_members(&client, &ctx, all, |c| async move { c.scrub().await }).await?;
            let mut nodes = Vec::new();
            for r in &reports {
                failed |= !r.unrepaired.is_empty();
                if ctx.json {
                    nodes.push(json!({
                        "node": r.node, "chunks": r.chunks, "bytes": r.bytes, "roots": r.roots,
                        "bad": r.bad, "repaired": r.repaired, "seconds": r.seconds,
                        "unrepaired": r.unrepaired.iter().map(|p| json!({
                            "tenant": p.tenant, "id": p.id, "error": p.error,
                        })).collect::<Vec<_>>(),
                    }));
                } else {
                    println!(
                        "node {}: checked {} chunks and {} snapshot roots ({} bytes) in {:.1}s: \
                         {} bad, {} repaired",
                        r.node, r.chunks, r.roots, r.bytes, r.seconds, r.bad, r.repaired
                    );
                    for p in &r.unrepaired {
                        println!("  NOT REPAIRED {}/{}: {}", p.tenant, p.id, p.error);
                    }
                }
            }
            if ctx.json {
                print_json(&json!({ "nodes": nodes }));
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Gc { dry_run, all } => {
            let (reports, failed) = on_members(&client, &ctx, all, move |c| async move {
                c.collect_garbage(dry_run).await
            })
            .await?;
            let mut nodes = Vec::new();
            for r in &reports {
                if ctx.json {
                    nodes.push(json!({
                        "node": r.node, "dry_run": r.dry_run, "roots": r.roots,
                        "roots_absent": r.roots_absent, "examined": r.examined, "live": r.live,
                        "waiting": r.waiting, "waiting_bytes": r.waiting_bytes,
                        "freed": r.freed, "freed_bytes": r.freed_bytes,
                        "roots_freed": r.roots_freed, "marked": r.marked,
                        "pages_read": r.pages_read, "seconds": r.seconds,
                        "store_bytes_before": r.store_bytes_before,
                        "store_bytes_after": r.store_bytes_after,
                    }));
                } else {
                    let verb = if r.dry_run { "would free" } else { "freed" };
                    println!(
                        "node {}: examined {} chunks in {:.2}s ({} snapshots): {verb} {} chunks \
                         ({} bytes) and {} snapshot roots; {} unreachable ({} bytes) wait out \
                         the grace period; store {} -> {} bytes",
                        r.node,
                        r.examined,
                        r.seconds,
                        r.roots,
                        r.freed,
                        r.freed_bytes,
                        r.roots_freed,
                        r.waiting,
                        r.waiting_bytes,
                        r.store_bytes_before,
                        r.store_bytes_after
                    );
                }
            }
            if ctx.json {
                print_json(&json!({ "nodes": nodes }));
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Stats => {
            let s = client.stats().await?;
            let v = json!({
                "node_id": s.node_id, "version": s.version, "chunks": s.chunks,
                "chunk_bytes": s.chunk_bytes, "datasets": s.datasets, "snapshots": s.snapshots,
                "jobs_pending": s.jobs_pending, "jobs_running": s.jobs_running,
                "bytes_ingested": s.bytes_ingested, "bytes_stored": s.bytes_stored,
                "uptime_seconds": s.uptime_seconds,
                "bytes_replicated": s.bytes_replicated,
                "page_bytes_stored": s.page_bytes_stored,
                "page_bytes_replicated": s.page_bytes_replicated,
                "chunks_repaired": s.chunks_repaired,
                "fatal": if s.fatal.is_empty() { serde_json::Value::Null } else { json!(s.fatal) },
                "ready": s.ready,
                "not_ready": s.not_ready,
            });
            if ctx.json {
                print_json(&v);
            } else if let Some(map) = v.as_object() {
                for (k, val) in map {
                    println!("{k:15} {val}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_deleted(ctx: &Ctx, dataset: &str, r: &bitclone_client::proto::DeleteResponse) {
    if ctx.json {
        print_json(&json!({"dataset": dataset, "deleted": r.deleted, "head": r.head}));
    } else {
        for id in &r.deleted {
            println!("deleted {dataset}@{id}");
        }
        if r.head.is_empty() {
            println!("{dataset}: no snapshots left, the dataset is gone");
        } else {
            println!("{dataset}: head is {}", r.head);
        }
    }
}

/// Prints a submitted job's id, or with `wait` follows it to its end and
/// fails unless it succeeded.
async fn finish_job(client: &Client, job: proto::Job, wait: bool, ctx: &Ctx) -> Result<ExitCode> {
    if !wait {
        if ctx.json {
            print_json(&job_json(&job));
        } else {
            println!("{}", job.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let j = follow(client, &job.id, ctx, true).await?;
    if ctx.json {
        print_json(&job_json(&j));
    } else {
        println!("{}", job_line(&j));
    }
    if j.state != proto::JobState::Succeeded as i32 {
        eprintln!(
            "error: job {} ended {}: {}",
            j.id,
            bitclone_client::job_state_name(j.state),
            j.last_error
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `call` on the node called, or with `all` on every member: the answers,
/// and whether a member failed (named on stderr; the others go on).
async fn on_members<T, F, Fut>(
    client: &Client,
    ctx: &Ctx,
    all: bool,
    call: F,
) -> Result<(Vec<T>, bool)>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = bitclone_client::Result<T>>,
{
    if !all {
        return Ok((vec![call(client.clone()).await?], false));
    }
    let (mut out, mut failed) = (Vec::new(), false);
    for m in client.cluster_status().await?.members {
        let one = async { Ok::<_, anyhow::Error>(call(ctx.connect_to(&m.api_addr).await?).await?) };
        match one.await {
            Ok(r) => out.push(r),
            Err(e) => {
                failed = true;
                eprintln!("node {}: {e:#}", m.id);
            }
        }
    }
    Ok((out, failed))
}

fn print_keys(ctx: &Ctx, verb: &str, keys: &[proto::TenantKeyInfo]) {
    if ctx.json {
        print_json(&json!(keys
            .iter()
            .map(|k| json!({
                "tenant": k.tenant, "key_id": k.key_id, "kek": k.kek,
                "since_unix_ms": k.since_unix_ms, "open_here": k.open_here,
                "previous_kek": k.previous_kek,
            }))
            .collect::<Vec<_>>()));
        return;
    }
    if keys.is_empty() && verb.is_empty() {
        println!("no encrypted tenant");
    }
    for k in keys {
        let was = if k.previous_kek.is_empty() {
            String::new()
        } else {
            format!(" (was {})", k.previous_kek)
        };
        println!(
            "tenant {}{}{}: data key {} wrapped by {}{was}{}",
            k.tenant,
            if verb.is_empty() { "" } else { " " },
            verb,
            k.key_id,
            k.kek,
            if k.open_here {
                ""
            } else {
                "; NOT open on this node"
            }
        );
    }
}
