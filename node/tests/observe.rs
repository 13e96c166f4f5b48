#![allow(clippy::unwrap_used)]
//! Operating a node, against real node processes: `/metrics` in the
//! Prometheus text format (checked by promtool), counters that move with the
//! work, `/healthz`, `/readyz` and grpc.health.v1 on the API port, and a
//! node that is not ready saying why.

use std::time::{Duration, Instant};

use bitclone_chaos::*;

/// The value of one sample (`name{labels}` as written) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

fn metrics(node: &TestNode) -> String {
    let r = node.http_get("/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.content_type.starts_with("text/plain; version=0.0.4"),
        "{r:?}"
    );
    r.body
}

fn wait_ready(node: &TestNode) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = node.http_get("/readyz");
        if r.status == 200 {
            assert_eq!(r.body, "ready\n");
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// grpc.health.v1 `Check` for the whole server, over the API's TLS.
fn grpc_health(node: &TestNode) -> i32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
        use tonic_health::pb::health_client::HealthClient;
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca = std::fs::read(node.ca_file()).unwrap();
        let channel = Endpoint::from_shared(node.endpoint.clone())
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    })
}

/// `promtool check metrics` on a scrape: the exposition parses and follows
/// Prometheus' naming rules.
fn promtool_check(text: &str) {
    use std::io::Write;
    assert!(
        std::process::Command::new("promtool")
            .arg("--version")
            .output()
            .is_ok(),
        "promtool not found: scripts/install-deps.sh installs it (Debian's prometheus; make test does)"
    );
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_health_and_readiness_of_a_running_node() {
    let tmp = tempfile::tempdir().unwrap();
    let node = TestNode::start(&tmp.path().join("n"));
    let h = node.http_get("/healthz");
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"), "{h:?}");
    wait_ready(&node);
    // SERVING is 1 in grpc.health.v1.
    assert_eq!(grpc_health(&node), 1);

    let text = metrics(&node);
    let before = sample(&text, "bitclone_ingested_bytes_total").unwrap();
    let src = tmp.path().join("src");
    generate_tree(&src, seed(), 20, 1);
    let bytes: u64 = walkdir::WalkDir::new(&src)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().unwrap().len())
        .sum();
    node.ok(&["put", src.to_str().unwrap(), "--dataset", "ds"]);
    // A call without a token, refused.
    assert!(!node.cli_as(None, &["datasets"]).status.success());
    // A clone job into a directory: a lease, an attempt, a sink write.
    let out = tmp.path().join("out");
    clone_into_dir(&node, &out);
    // A download: the bytes served.
    let got = tmp.path().join("got");
    node.ok(&["get", "--dataset", "ds", got.to_str().unwrap()]);

    let text = metrics(&node);
    promtool_check(&text);
    assert_eq!(
        sample(&text, "bitclone_served_bytes_total"),
        Some(bytes as f64)
    );
    // The commit index the log store saw: past the put's and the job's
    // entries, and the applied index never ahead of it.
    let commit = sample(&text, "bitclone_raft_commit_index").unwrap();
    let applied = sample(&text, "bitclone_raft_applied_index").unwrap();
    assert!(commit >= 3.0 && applied <= commit, "{commit} {applied}");
    let after = sample(&text, "bitclone_ingested_bytes_total").unwrap();
    assert!(
        after - before >= bytes as f64,
        "{before} -> {after}, {bytes} put"
    );
    assert!(sample(&text, "bitclone_stored_bytes_total").unwrap() > 0.0);
    assert!(
        sample(
            &text,
            r#"bitclone_rpc_requests_total{method="Upload",code="Ok"}"#
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"bitclone_rpc_requests_total{method="ListDatasets",code="Unauthenticated"}"#
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"bitclone_rpc_duration_seconds_count{method="Upload"}"#
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(sample(&text, "bitclone_leases_acquired_total"), Some(1.0));
    assert_eq!(sample(&text, "bitclone_lease_takeovers_total"), Some(0.0));
    assert_eq!(
        sample(&text, r#"bitclone_job_attempts_total{outcome="succeeded"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "bitclone_job_attempt_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"bitclone_sink_write_duration_seconds_count{kind="dir",outcome="ok"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"bitclone_sink_written_bytes_total{kind="dir",outcome="ok"}"#
        )
        .unwrap()
            >= bytes as f64
    );
    assert_eq!(
        sample(&text, r#"bitclone_jobs{state="succeeded"}"#),
        Some(1.0)
    );
    assert!(sample(&text, "bitclone_raft_leader_changes_total").unwrap() >= 1.0);
    assert!(sample(&text, "bitclone_raft_proposal_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(sample(&text, "bitclone_ready"), Some(1.0));
    assert_eq!(sample(&text, "bitclone_raft_is_leader"), Some(1.0));
    assert_eq!(sample(&text, "bitclone_store_fatal"), Some(0.0));
    assert!(sample(&text, "bitclone_store_chunks").unwrap() > 0.0);
    assert!(sample(&text, "bitclone_disk_free_bytes").unwrap() > 0.0);
    assert!(text.contains(&format!(
        "bitclone_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    // No tenant's name is on the endpoint.
    assert!(!text.contains("default"), "{text}");
}

#[test]
fn a_node_below_its_disk_reserve_is_not_ready_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(
        &tmp.path().join("n"),
        &[("BITCLONE_DISK_RESERVE", "1000000TiB")],
    );
    // It serves, it is alive, and it is not ready.
    let h = node.http_get("/healthz");
    assert_eq!(h.status, 200);
    let r = node.http_get("/readyz");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("disk below its reserve"), "{r:?}");
    let text = metrics(&node);
    assert_eq!(sample(&text, "bitclone_ready"), Some(0.0));
    let status = node.json(&["cluster", "status"]);
    let me = &status["members"][0];
    assert_eq!(me["ready"], false, "{status}");
    assert!(
        me["not_ready"][0].as_str().unwrap().contains("reserve"),
        "{status}"
    );
    // A tenant's token learns that it is not ready, not the node's figures.
    let tenant = tmp.path().join("tenant.token");
    std::fs::write(&tenant, node.token("default", "read")).unwrap();
    let out = node.cli_as(Some(tenant.to_str().unwrap()), &["--json", "stats"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["ready"], false, "{stats}");
    assert!(!stats.to_string().contains("MiB"), "{stats}");
    assert!(sample(&text, "bitclone_disk_reserve_bytes").unwrap() > 1e18);
    // NOT_SERVING is 2 (the health service updates within a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while grpc_health(&node) != 2 {
        assert!(Instant::now() < deadline, "gRPC health still serving");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_real_prometheus_scrapes_a_three_node_cluster() {
    use bitclone_chaos::servers::Prometheus;
    assert!(
        Prometheus::available(),
        "prometheus not found: scripts/install-deps.sh installs it (Debian's prometheus; make test does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start(tmp.path(), 3, 3);
    let targets: Vec<String> = c
        .nodes
        .values()
        .map(|n| n.http_url().trim_start_matches("http://").to_string())
        .collect();
    let prom = Prometheus::start(&targets);
    let value = |v: &serde_json::Value| -> f64 { v["value"][1].as_str().unwrap().parse().unwrap() };
    // Every node up, as Prometheus sees it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = prom.query("up");
        let ups: Vec<f64> = up.as_array().unwrap().iter().map(value).collect();
        if ups.len() == 3 && ups.iter().all(|v| *v == 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "up = {up}; prometheus log:\n{}",
            prom.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let ingested = |p: &Prometheus| -> f64 {
        p.query("sum(bitclone_ingested_bytes_total)")
            .as_array()
            .unwrap()
            .first()
            .map(value)
            .unwrap_or(0.0)
    };
    let before = ingested(&prom);
    let src = tmp.path().join("src");
    generate_tree(&src, seed(), 10, 1);
    c.node(1)
        .ok(&["put", src.to_str().unwrap(), "--dataset", "ds"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ingested(&prom) <= before {
        assert!(
            Instant::now() < deadline,
            "the counter never rose in Prometheus"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // One leader among the three, as scraped.
    let leaders = prom.query("sum(bitclone_raft_is_leader)");
    assert_eq!(value(&leaders[0]), 1.0, "{leaders}");
    // The put went to the two other replicas over QUIC, per peer; every
    // shard is fully replicated.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let peers = prom.query("bitclone_quic_sent_bytes_total > 0");
        if peers.as_array().unwrap().len() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "QUIC bytes per peer: {peers}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let under = prom.query("max(bitclone_under_replicated_shards)");
    assert_eq!(value(&under[0]), 0.0, "{under}");

    // The dashboard and the alert rules use only metrics the nodes serve
    // (after a put and a clone job, so that every family has samples).
    let out = tmp.path().join("out");
    clone_into_dir(c.node(1), &out);
    let scraped: String = c.nodes.values().map(metrics).collect();
    let served = |name: &str| {
        scraped.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
    };
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let rules = std::fs::read_to_string(deploy.join("prometheus/alerts.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/bitclone-dashboard.json")).unwrap(),
    )
    .unwrap();
    let rule_lines: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut exprs = vec![rule_lines];
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "the dashboard has its queries");
    let mut checked = 0;
    for e in &exprs {
        for name in metric_names(e) {
            if let Some(rule) = name.strip_prefix("bitclone:") {
                assert!(
                    rules.contains(&format!("record: bitclone:{rule}")),
                    "{name}"
                );
            } else {
                assert!(served(&name), "{name} is used but no node serves it");
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "{checked}");

    // `cluster status` shows each member ready, then one unreachable.
    let members = |c: &TestCluster| c.node(1).json(&["cluster", "status"])["members"].clone();
    let m = members(&c);
    assert!(
        m.as_array().unwrap().iter().all(|m| m["ready"] == true),
        "{m}"
    );
    let mut c = c;
    c.kill9(3);
    let m = members(&c);
    let three = m.as_array().unwrap().iter().find(|m| m["id"] == 3).unwrap();
    assert_eq!(three["reachable"], false, "{m}");
}

/// A clone job of dataset `ds` into the directory `out`, waited for; it
/// must succeed.
fn clone_into_dir(node: &TestNode, out: &std::path::Path) {
    let job = node.json(&[
        "clone",
        "--from",
        "snapshot://ds",
        "--to",
        &file_url(out),
        "--dataset",
        "ds",
        "--wait",
    ]);
    assert_eq!(job["state"], "Succeeded", "{job}");
}

/// Every `expr` string in a Grafana dashboard.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `bitclone_*` metric names (and `bitclone:*` recorded series) in a
/// PromQL text.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("bitclone") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // A word that merely starts with it (a label value, prose) is skipped.
        let before = rest[..i].chars().last();
        if (name.starts_with("bitclone_") || name.starts_with("bitclone:"))
            && !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '"')
        {
            out.push(name.to_string());
        }
        rest = &tail[end.max(1)..];
    }
    out
}

#[test]
fn the_alert_rules_are_valid_and_pass_their_unit_tests() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool not found: scripts/install-deps.sh installs it (make test does)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn one_put_is_followed_across_three_nodes_logs_by_its_request_id() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start_with_env(
        tmp.path(),
        3,
        3,
        &[
            ("BITCLONE_LOG_FORMAT", "json"),
            (
                "RUST_LOG",
                "info,openraft=warn,bitclone_raft=debug,bitclone_transport=debug",
            ),
        ],
    );
    let leader = c.leader(1).unwrap();
    // Through a follower, so that the commit is forwarded to the leader.
    let via = (1..=3).find(|n| *n != leader).unwrap();
    let src = tmp.path().join("src");
    generate_tree(&src, seed(), 10, 0);
    let id = "follow-me-4711";
    let run = |args: &[&str]| {
        let out = c
            .node(via)
            .command()
            .env("BITCLONE_REQUEST_ID", id)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["put", src.to_str().unwrap(), "--dataset", "ds"]);
    let out = tmp.path().join("out");
    run(&[
        "clone",
        "--from",
        "snapshot://ds",
        "--to",
        &file_url(&out),
        "--dataset",
        "ds",
        "--wait",
    ]);
    // Every line of every log is JSON; the id is on the lines of what the
    // put and the job caused, on each node.
    let lines_with = |n: u64, what: &str| -> usize {
        c.node(n)
            .log_text()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| {
                    panic!("node {n} logged a line that is not JSON ({e}): {l}")
                })
            })
            .filter(|v| v.to_string().contains(id) && v.to_string().contains(what))
            .count()
    };
    assert!(
        lines_with(via, "snapshot committed") >= 1,
        "the node that took the put"
    );
    assert!(
        lines_with(leader, "applied a command a follower forwarded") >= 1,
        "the leader"
    );
    for n in (1..=3).filter(|n| *n != via) {
        assert!(
            lines_with(n, "stored a snapshot's manifest sent by a peer") >= 1,
            "replica {n}"
        );
    }
    assert!(
        (1..=3).any(|n| lines_with(n, "job started") >= 1),
        "the job's holder"
    );
    // And the audit line of the put.
    let audit = std::fs::read_to_string(c.node(via).data_dir.join("audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains(id) && l.contains("\"put\"")),
        "{audit}"
    );
}

/// A span as the collector keeps it: trace id, span name, node id.
type Seen = (Vec<u8>, String, String);

/// An in-process OTLP collector: keeps every span it is sent, with the
/// `service.instance.id` (node id) of the resource that sent it.
#[derive(Default, Clone)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let node = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.instance.id")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((s.trace_id, s.name, node.clone()));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[test]
fn a_put_and_a_job_through_a_follower_are_each_one_trace_across_nodes() {
    // The collector, on a runtime of its own for the test's length.
    let collector = Collector::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let serving = collector.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(
                    opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(serving),
                )
                .serve_with_incoming(incoming)
                .await;
        });
    });
    let endpoint = format!("http://{addr}");
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start_with_env(
        tmp.path(),
        3,
        3,
        &[
            ("BITCLONE_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let leader = c.leader(1).unwrap();
    let via = (1..=3).find(|n| *n != leader).unwrap();
    let src = tmp.path().join("src");
    generate_tree(&src, seed(), 5, 0);
    c.node(via)
        .ok(&["put", src.to_str().unwrap(), "--dataset", "ds"]);
    // The put's rpc span on the follower, the leader's span for the
    // forwarded commit, and the replicas' spans for the manifest sent over
    // QUIC share a trace.
    wait_for_trace(
        &collector,
        &c,
        &[
            "rpc",
            "commit",
            "forwarded_command",
            "replicate",
            "store_replica",
        ],
    );
    // A job continues the trace of the call that submitted it, on
    // whichever node takes its lease.
    let out = tmp.path().join("out");
    clone_into_dir(c.node(via), &out);
    wait_for_trace(
        &collector,
        &c,
        &["rpc", "acquire_lease", "job", "sink_write"],
    );
}

/// Waits for one trace holding spans of every name in `names`, from at
/// least two nodes.
fn wait_for_trace(collector: &Collector, c: &TestCluster, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let spans = collector.spans.lock().unwrap().clone();
        let found = spans.iter().any(|(trace, _, _)| {
            let nodes: std::collections::BTreeSet<&String> = spans
                .iter()
                .filter(|(t, _, _)| t == trace)
                .map(|(_, _, n)| n)
                .collect();
            let named = |n: &str| spans.iter().any(|(t, name, _)| t == trace && name == n);
            nodes.len() >= 2 && names.iter().all(|n| named(n))
        });
        if found {
            return;
        }
        if Instant::now() >= deadline {
            for n in c.nodes.keys() {
                eprintln!("node {n} log:\n{}", c.node(*n).log_text());
            }
            panic!(
                "no trace with spans {names:?} from two nodes; spans: {:?}",
                spans
                    .iter()
                    .map(|(_, n, node)| (n, node))
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A replica that stops answering shows as replication lag on the writer
/// (a send in flight, then a failed one), and once back it fetches what it
/// missed: bytes received from a peer, nothing missing, and the store's
/// column families have their keys.
#[test]
fn a_paused_replica_shows_as_replication_lag_and_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start(tmp.path(), 3, 3);
    let leader = c.leader(1).unwrap();
    let paused = (1..=3).find(|n| *n != leader).unwrap();
    let pid = c.node(paused).pid();
    let scrape = |n: u64, series: &str| sample(&metrics(c.node(n)), series).unwrap_or(0.0);
    signal(pid, "-STOP");
    let src = tmp.path().join("src");
    generate_tree(&src, seed(), 10, 1);
    // Durable on the two running replicas: the put returns while the send
    // to the paused one waits for its connection to time out (10 s).
    c.node(leader)
        .ok(&["put", src.to_str().unwrap(), "--dataset", "ds"]);
    let in_flight = scrape(leader, "bitclone_replication_sends_in_flight");
    assert!(in_flight >= 1.0, "{in_flight}");
    let failed = format!("bitclone_replication_send_failures_total{{peer=\"{paused}\"}}");
    c.wait_for("the send to the paused replica to fail", 60, |_| {
        scrape(leader, &failed) >= 1.0
    });
    assert_eq!(scrape(leader, "bitclone_replication_sends_in_flight"), 0.0);
    signal(pid, "-CONT");
    // Its repair pass (at most 30 s apart) pulls the snapshot.
    c.wait_for("the paused replica to fetch the snapshot", 120, |c| {
        let text = metrics(c.node(paused));
        let received: f64 = text
            .lines()
            .filter(|l| l.starts_with("bitclone_quic_received_bytes_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        received > 0.0
            && sample(&text, "bitclone_replication_missing_snapshots") == Some(0.0)
            && sample(&text, "bitclone_store_family_keys{family=\"manifests\"}")
                .is_some_and(|k| k >= 1.0)
    });
    let text = metrics(c.node(leader));
    for family in ["chunks", "chunk_index", "manifests"] {
        let keys = sample(
            &text,
            &format!("bitclone_store_family_keys{{family=\"{family}\"}}"),
        );
        assert!(keys.is_some_and(|k| k >= 1.0), "{family}: {keys:?}");
    }
    assert!(
        sample(&text, "bitclone_store_family_bytes{family=\"meta\"}").is_some(),
        "{text}"
    );
}
