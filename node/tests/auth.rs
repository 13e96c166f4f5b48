#![allow(clippy::unwrap_used)]
//! Who may do what, against real node processes with TLS on: tokens that
//! are missing, expired or signed by an unknown key; one tenant's token on
//! another's datasets, snapshots and jobs; scopes; admin calls; the audit
//! log; key rotation without a restart.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bitclone_chaos::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Writes `token` to a file of its own and returns the path.
fn token_file(dir: &Path, name: &str, token: &str) -> String {
    let p = dir.join(format!("{name}.token"));
    std::fs::write(&p, token).unwrap();
    p.display().to_string()
}

/// Runs the CLI as `token` (None: no token) and expects a failure.
fn refused(node: &TestNode, token: Option<&str>, args: &[&str]) -> String {
    let out = node.cli_as(token, args);
    assert!(
        !out.status.success(),
        "bitclone {args:?} should have been refused; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn ok_as(node: &TestNode, token: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = node.cli_as(Some(token), &all);
    assert!(
        out.status.success(),
        "bitclone {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A token signed with the dev key in `certs`, with claims as given.
fn signed(certs: &Path, claims: serde_json::Value) -> String {
    let key = std::fs::read(certs.join("token.key")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&key).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        &key,
    )
    .unwrap()
}

fn audit_lines(node: &TestNode) -> Vec<serde_json::Value> {
    std::fs::read_to_string(node.data_dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn audited(lines: &[serde_json::Value], action: &str, result: &str) -> usize {
    lines
        .iter()
        .filter(|l| l["action"] == action && l["result"] == result)
        .count()
}

#[test]
fn tokens_tenants_scopes_and_the_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let node = TestNode::start(&tmp.path().join("node"));
    let t = tmp.path();
    let admin = node.certs.join("admin.token").display().to_string();
    for tenant in ["a", "b"] {
        ok_as(&node, &admin, &["tenant", "create", tenant]);
    }
    let src = t.join("src");
    generate_tree(&src, 3, 6, 0);
    let src_s = src.to_str().unwrap();
    let put_b = ok_as(
        &node,
        &admin,
        &["--tenant", "b", "put", src_s, "--dataset", "ds"],
    );
    let snap_b = put_b["snapshot"].as_str().unwrap().to_string();
    let job_b = ok_as(
        &node,
        &admin,
        &[
            "--tenant",
            "b",
            "clone",
            "--from",
            "snapshot://ds",
            "--to",
            &file_url(&t.join("out-b")),
            "--dataset",
            "ds",
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_string();

    // No token, a token that is not a JWT, an expired one, one from an
    // unknown key: Unauthenticated.
    let e = refused(&node, None, &["--tenant", "b", "datasets"]);
    assert!(
        e.contains("Unauthenticated") && e.contains("no bearer token"),
        "{e}"
    );
    let junk = token_file(t, "junk", "not-a-token");
    let e = refused(&node, Some(&junk), &["--tenant", "b", "datasets"]);
    assert!(e.contains("Unauthenticated"), "{e}");
    let expired = signed(
        &node.certs,
        serde_json::json!({"sub": "late", "tenants": ["*"], "scopes": ["read"],
            "exp": now() - 3600, "iat": now() - 7200}),
    );
    let expired = token_file(t, "expired", &expired);
    let e = refused(&node, Some(&expired), &["--tenant", "b", "datasets"]);
    assert!(
        e.contains("Unauthenticated") && e.contains("expired"),
        "{e}"
    );
    let other = t.join("other-ca");
    dev_certs(bin(), &other, 1);
    let stranger = token_file(
        t,
        "stranger",
        &issue_token(&other, "*", "read,write,admin", "1h"),
    );
    let e = refused(&node, Some(&stranger), &["--tenant", "b", "datasets"]);
    assert!(
        e.contains("Unauthenticated") && e.contains("unknown key"),
        "{e}"
    );

    // Tenant a's token on tenant b's dataset, snapshot and job: NotFound,
    // exactly as for things that do not exist.
    let a_rw = token_file(t, "a-rw", &node.token("a", "read,write"));
    let out_dir = t.join("never-written");
    let out_dir = out_dir.to_str().unwrap();
    for args in [
        vec!["--tenant", "b", "datasets"],
        vec!["--tenant", "b", "snapshots", "--dataset", "ds"],
        vec![
            "--tenant",
            "b",
            "get",
            "--dataset",
            "ds",
            "--snapshot",
            &snap_b,
            out_dir,
        ],
        vec!["--tenant", "b", "put", src_s, "--dataset", "ds"],
        vec!["job", &job_b],
        vec!["cancel", &job_b],
    ] {
        let e = refused(&node, Some(&a_rw), &args);
        assert!(e.contains("NotFound"), "{args:?}: {e}");
        assert!(!e.contains("PermissionDenied"), "{args:?}: {e}");
    }
    assert!(!Path::new(out_dir).exists());
    let e = refused(&node, Some(&a_rw), &["job", "0000000000000000"]);
    assert!(e.contains("NotFound"), "{e}");
    // Its own tenant works, and cluster status shows it no peer address.
    ok_as(
        &node,
        &a_rw,
        &["--tenant", "a", "put", src_s, "--dataset", "mine"],
    );
    // Stats count only the caller's tenants.
    assert_eq!(ok_as(&node, &a_rw, &["stats"])["datasets"], 1);
    assert_eq!(ok_as(&node, &admin, &["stats"])["datasets"], 2);
    let st = ok_as(&node, &a_rw, &["cluster", "status"]);
    assert_eq!(st["members"][0]["peer_addr"], "", "{st}");
    assert!(
        st["shards"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["tenant"] == "a"),
        "{st}"
    );
    let st = ok_as(&node, &admin, &["cluster", "status"]);
    assert_ne!(st["members"][0]["peer_addr"], "", "{st}");

    // A tenant nobody created does not come into being by a put.
    let e = refused(
        &node,
        Some(&admin),
        &["--tenant", "ghost", "put", src_s, "--dataset", "x"],
    );
    assert!(e.contains("NotFound") && e.contains("tenant ghost"), "{e}");
    let st = ok_as(&node, &admin, &["cluster", "status"]);
    assert!(st["shards"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["tenant"] != "ghost"));

    // Scopes: a read token may list and read, not put or clone; only admin
    // runs cluster and tenant changes.
    let b_read = token_file(t, "b-read", &node.token("b", "read"));
    ok_as(
        &node,
        &b_read,
        &["--tenant", "b", "snapshots", "--dataset", "ds"],
    );
    let e = refused(
        &node,
        Some(&b_read),
        &["--tenant", "b", "put", src_s, "--dataset", "ds"],
    );
    assert!(e.contains("PermissionDenied") && e.contains("write"), "{e}");
    let e = refused(&node, Some(&b_read), &["cancel", &job_b]);
    assert!(e.contains("PermissionDenied"), "{e}");
    let e = refused(&node, Some(&a_rw), &["cluster", "remove", "1"]);
    assert!(e.contains("PermissionDenied") && e.contains("admin"), "{e}");
    let e = refused(&node, Some(&a_rw), &["tenant", "create", "c"]);
    assert!(e.contains("PermissionDenied"), "{e}");

    // A token over plain text is refused by the client itself.
    let plain = node.endpoint.replace("https://", "http://");
    let e = refused(&node, Some(&admin), &["--endpoint", &plain, "datasets"]);
    assert!(e.contains("plain text"), "{e}");

    // The audit log: one line per refusal and per accepted write.
    let lines = audit_lines(&node);
    assert!(
        audited(&lines, "list-datasets", "Unauthenticated") >= 4,
        "{lines:#?}"
    );
    assert!(audited(&lines, "list-datasets", "NotFound") >= 1);
    assert!(audited(&lines, "get", "NotFound") >= 1);
    assert!(audited(&lines, "get-job", "NotFound") >= 2);
    assert!(audited(&lines, "cancel", "NotFound") >= 1);
    assert!(audited(&lines, "put", "PermissionDenied") >= 1);
    assert!(audited(&lines, "remove-node", "PermissionDenied") >= 1);
    assert!(audited(&lines, "set-tenant", "PermissionDenied") >= 1);
    assert_eq!(audited(&lines, "set-tenant", "ok"), 2, "{lines:#?}");
    assert!(audited(&lines, "put", "ok") >= 2);
    assert_eq!(audited(&lines, "clone", "ok"), 1);
    let put = lines
        .iter()
        .find(|l| l["action"] == "put" && l["result"] == "ok" && l["tenant"] == "a")
        .unwrap();
    assert_eq!(put["target"], "mine");
    assert!(
        put["subject"].as_str().unwrap().starts_with("test-a"),
        "{put}"
    );
    assert!(!put["request_id"].as_str().unwrap().is_empty());
    // Reads that were allowed are not audited.
    assert_eq!(audited(&lines, "list-snapshots", "ok"), 0);
}

#[test]
fn a_new_key_verifies_once_its_file_appears_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    dev_certs(bin(), &certs, 1);
    let keys = tmp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::copy(certs.join("token.pub"), keys.join("old.pub")).unwrap();
    let config = tmp.path().join("node.toml");
    std::fs::write(
        &config,
        format!("[auth]\npublic_keys = [{:?}]\n", keys.display().to_string()),
    )
    .unwrap();
    let args: Vec<String> = vec![
        "--certs".into(),
        certs.display().to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    let node = TestNode::spawn(&tmp.path().join("node"), "127.0.0.1:0", &args, &[]);
    node.json(&["datasets"]);

    let newer = tmp.path().join("new-ca");
    dev_certs(bin(), &newer, 1);
    let fresh = token_file(tmp.path(), "fresh", &issue_token(&newer, "*", "read", "1h"));
    let e = refused(&node, Some(&fresh), &["datasets"]);
    assert!(e.contains("unknown key"), "{e}");
    std::fs::copy(newer.join("token.pub"), keys.join("new.pub")).unwrap();
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    until("the new key to verify", &|| {
        node.cli_as(Some(&fresh), &["datasets"]).status.success()
    });
    // The old key verifies until its file goes.
    node.json(&["datasets"]);
    std::fs::remove_file(keys.join("old.pub")).unwrap();
    until("the old key to stop verifying", &|| {
        !node.cli(&["datasets"]).status.success()
    });
    assert!(node.cli_as(Some(&fresh), &["datasets"]).status.success());
}

#[test]
fn file_urls_stay_under_the_operators_roots_and_off_the_nodes_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().canonicalize().unwrap();
    // The harness allows the test's directory; the data dir inside it stays
    // out of bounds.
    let node = TestNode::start(&t.join("node"));
    let admin = node.certs.join("admin.token").display().to_string();
    let src = t.join("src");
    generate_tree(&src, 4, 5, 0);
    ok_as(
        &node,
        &admin,
        &["put", src.to_str().unwrap(), "--dataset", "ds"],
    );
    std::os::unix::fs::symlink("/etc", t.join("exit")).unwrap();
    let clone = |from: &str, to: &str| {
        refused(
            &node,
            Some(&admin),
            &["clone", "--from", from, "--to", to, "--dataset", "ds"],
        )
    };
    let out = file_url(&t.join("out"));
    let certs = file_url(&node.certs);
    let e = clone(&certs, &out);
    assert!(
        e.contains("PermissionDenied") && e.contains("overlaps"),
        "{e}"
    );
    let into_data = format!("{}?mirror=true", file_url(&node.data_dir));
    let e = clone("snapshot://ds", &into_data);
    assert!(
        e.contains("PermissionDenied") && e.contains("overlaps"),
        "{e}"
    );
    // A directory that holds the data dir: a mirror there would delete it.
    let e = clone("snapshot://ds", &format!("{}?mirror=true", file_url(&t)));
    assert!(e.contains("PermissionDenied"), "{e}");
    let e = clone(&file_url(&t.join("exit")), &out);
    assert!(
        e.contains("PermissionDenied") && e.contains("outside"),
        "{e}"
    );
    let e = clone("snapshot://ds", &file_url(&t.join("exit/bitclone-test")));
    assert!(
        e.contains("PermissionDenied") && e.contains("outside"),
        "{e}"
    );
    assert!(!Path::new("/etc/bitclone-test").exists());
    assert!(!t.join("out").exists());
    // Inside the root it works.
    let ok = ok_as(
        &node,
        &admin,
        &[
            "clone",
            "--from",
            "snapshot://ds",
            "--to",
            &out,
            "--dataset",
            "ds",
            "--wait",
        ],
    );
    assert_eq!(ok["state"], "Succeeded", "{ok}");
    assert_same_tree(&src, &t.join("out"), false, &[".bitclone"]);
    let lines = audit_lines(&node);
    assert_eq!(
        audited(&lines, "clone", "PermissionDenied"),
        5,
        "{lines:#?}"
    );

    // A node whose operator allowed no roots refuses file:// altogether.
    let closed = TestNode::start_with(&t.join("closed"), &[("BITCLONE_FILE_ROOTS", "")]);
    let admin = closed.certs.join("admin.token").display().to_string();
    let e = refused(
        &closed,
        Some(&admin),
        &[
            "clone",
            "--from",
            &file_url(&src),
            "--to",
            &file_url(&t.join("o2")),
            "--dataset",
            "x",
        ],
    );
    assert!(e.contains("files.roots"), "{e}");

    // Roots per tenant: each tenant only under <root>/<tenant>.
    let split = TestNode::start_with(&t.join("split"), &[("BITCLONE_FILE_ROOTS_PER_TENANT", "1")]);
    let admin = split.certs.join("admin.token").display().to_string();
    ok_as(
        &split,
        &admin,
        &["put", src.to_str().unwrap(), "--dataset", "ds"],
    );
    let e = refused(
        &split,
        Some(&admin),
        &[
            "clone",
            "--from",
            "snapshot://ds",
            "--to",
            &file_url(&t.join("o3")),
            "--dataset",
            "ds",
        ],
    );
    assert!(e.contains("for tenant default"), "{e}");
    let mine = t.join("default").join("o3");
    let ok = ok_as(
        &split,
        &admin,
        &[
            "clone",
            "--from",
            "snapshot://ds",
            "--to",
            &file_url(&mine),
            "--dataset",
            "ds",
            "--wait",
        ],
    );
    assert_eq!(ok["state"], "Succeeded", "{ok}");
}

/// A listener that speaks just enough of the Postgres protocol to ask
/// whoever connects for a cleartext password, and keeps every byte it is
/// sent. Stops by itself after `secs`.
struct PasswordTrap {
    port: u16,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl PasswordTrap {
    fn start(secs: u64) -> PasswordTrap {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let trap = PasswordTrap {
            port: listener.local_addr().unwrap().port(),
            connections: Default::default(),
            received: Default::default(),
        };
        let (connections, received) = (trap.connections.clone(), trap.received.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let message = |conn: &mut std::net::TcpStream| -> Option<Vec<u8>> {
                    let mut len = [0u8; 4];
                    conn.read_exact(&mut len).ok()?;
                    let n = u32::from_be_bytes(len).saturating_sub(4).min(1 << 16) as usize;
                    let mut body = vec![0u8; n];
                    conn.read_exact(&mut body).ok()?;
                    received.lock().unwrap().extend_from_slice(&body);
                    Some(body)
                };
                // The startup message (after a refused TLS request).
                let Some(mut first) = message(&mut conn) else {
                    continue;
                };
                if first == [4, 210, 22, 47] {
                    let _ = conn.write_all(b"N");
                    let Some(again) = message(&mut conn) else {
                        continue;
                    };
                    first = again;
                }
                let _ = first;
                // AuthenticationCleartextPassword; the reply is 'p' + length + password.
                let _ = conn.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
                let mut tag = [0u8; 1];
                if conn.read_exact(&mut tag).is_ok() {
                    message(&mut conn);
                }
            }
        });
        trap
    }

    fn saw(&self, secret: &str) -> bool {
        let got = self.received.lock().unwrap();
        got.windows(secret.len()).any(|w| w == secret.as_bytes())
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn a_client_chosen_postgres_host_gets_no_connection_and_no_password() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().canonicalize().unwrap();
    let chosen = PasswordTrap::start(120);
    let declared = PasswordTrap::start(120);
    // The operator declares one catalog, with its password in a variable of
    // its own; the node also has a PGPASSWORD, which no URL may draw out.
    let config = t.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[sinks.cat]\ntenants = [\"*\"]\n[sinks.cat.postgres]\n\
             url = \"postgres://bitclone@127.0.0.1:{}/catalog\"\npassword_env = \"CAT_PW\"\n",
            declared.port
        ),
    )
    .unwrap();
    let node = TestNode::start_with(
        &t.join("node"),
        &[
            ("BITCLONE_CONFIG", config.to_str().unwrap()),
            ("PGPASSWORD", "node-pgpassword-1"),
            ("CAT_PW", "declared-password-2"),
        ],
    );
    let admin = node.certs.join("admin.token").display().to_string();
    let src = t.join("src");
    generate_tree(&src, 4, 5, 0);
    ok_as(
        &node,
        &admin,
        &["put", src.to_str().unwrap(), "--dataset", "ds"],
    );
    let clone = |to: &str| {
        refused(
            &node,
            Some(&admin),
            &[
                "clone",
                "--from",
                "snapshot://ds",
                "--to",
                to,
                "--dataset",
                "ds",
            ],
        )
    };
    for url in [
        format!("postgres://postgres@127.0.0.1:{}/x", chosen.port),
        format!(
            "postgresql://bitclone:hunter2@127.0.0.1:{}/x?sslmode=disable",
            chosen.port
        ),
        format!("postgres://u@h/x?host=127.0.0.1&port={}", chosen.port),
    ] {
        let e = clone(&url);
        assert!(e.contains("PermissionDenied"), "{e}");
        assert!(
            e.contains("sink://NAME") && e.contains("declared for it: cat"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }
    // The declared catalog: the job runs and the node sends that sink's
    // password, and only to that host (the trap fails the job afterwards).
    let id = node
        .ok(&[
            "clone",
            "--from",
            "snapshot://ds",
            "--to",
            "sink://cat",
            "--dataset",
            "ds",
            "--max-attempts",
            "1",
        ])
        .trim()
        .to_string();
    node.cli(&["job", &id, "--watch"]);
    let job = node.json(&["job", &id]);
    assert_eq!(job["state"], "Failed", "{job}");
    assert_eq!(job["destinations"][0], "sink://cat", "{job}");
    assert!(declared.connections() >= 1);
    assert!(declared.saw("declared-password-2"));
    assert!(!declared.saw("node-pgpassword-1"));
    // Given time to connect, had it been going to.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(chosen.connections(), 0, "the client's host was contacted");
    assert!(!chosen.saw("node-pgpassword-1") && !chosen.saw("declared-password-2"));
    // Refusals are audited; no password is in the log.
    let lines = audit_lines(&node);
    assert_eq!(
        audited(&lines, "clone", "PermissionDenied"),
        3,
        "{lines:#?}"
    );
    let log = std::fs::read_to_string(node.data_dir.join("audit.log")).unwrap();
    for secret in ["hunter2", "declared-password-2", "node-pgpassword-1"] {
        assert!(!log.contains(secret), "{secret} in the audit log");
        assert!(
            !node.log_text().contains(secret),
            "{secret} in the node's log"
        );
    }
}

#[test]
fn a_tenant_over_its_quota_is_refused_and_nothing_is_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // The first clone attempt fails and waits years to retry: a job that
    // stays in flight.
    let node = TestNode::start_with(
        &t.join("node"),
        &[
            ("BITCLONE_FAULT_EXPORT_FAILURES", "1"),
            ("BITCLONE_JOB_BACKOFF_BASE", "87600h"),
            ("BITCLONE_JOB_BACKOFF_MAX", "87600h"),
        ],
    );
    node.json(&["tenant", "create", "q"]);
    let set = node.json(&[
        "tenant",
        "quota",
        "q",
        "--max-bytes",
        "1MiB",
        "--max-jobs",
        "1",
    ]);
    assert_eq!(set["stored_bytes"], 0, "{set}");
    let small = t.join("small");
    generate_tree(&small, 1, 6, 0);
    let first = node.json(&[
        "--tenant",
        "q",
        "put",
        small.to_str().unwrap(),
        "--dataset",
        "ds",
    ]);
    // Twelve files: one of them is 1-5 MiB.
    let big = t.join("big");
    generate_tree(&big, 2, 12, 0);
    let e = node.fails(&[
        "--tenant",
        "q",
        "put",
        big.to_str().unwrap(),
        "--dataset",
        "ds",
    ]);
    assert!(
        e.contains("ResourceExhausted") && e.contains("quota"),
        "{e}"
    );
    let snaps = node.json(&["--tenant", "q", "snapshots", "--dataset", "ds"]);
    let snaps = snaps["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "nothing committed: {snaps:?}");
    assert_eq!(snaps[0]["id"], first["snapshot"]);
    // Another tenant is not limited by q's quota.
    node.json(&["put", big.to_str().unwrap(), "--dataset", "ds"]);

    let clone = |to: &str| {
        node.cli(&[
            "--tenant",
            "q",
            "clone",
            "--from",
            "snapshot://ds",
            "--to",
            to,
            "--dataset",
            "ds",
        ])
    };
    assert!(clone(&file_url(&t.join("o1"))).status.success());
    let out = clone(&file_url(&t.join("o2")));
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("ResourceExhausted") && e.contains("jobs not finished"),
        "{e}"
    );
    let jobs = node.json(&["--tenant", "q", "jobs"]);
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "{jobs}");
    let lines = audit_lines(&node);
    assert_eq!(audited(&lines, "put", "ResourceExhausted"), 1, "{lines:#?}");
    assert_eq!(audited(&lines, "clone", "ResourceExhausted"), 1);
    assert_eq!(audited(&lines, "set-quota", "ok"), 1);
}
