//! Clone jobs into real sinks: a Garage S3 server and a throwaway Postgres on
//! loopback, with real `bitclone` processes; restore from the sinks alone.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use bitclone_chaos::jobs::{restore_cli as restore, sinks_config};
use bitclone_chaos::servers::{Garage, PgServer};
use bitclone_chaos::*;
use bitclone_storage::sink::objects::{self, S3Options};

fn garage() -> Garage {
    assert!(
        Garage::available(),
        "garage is not installed: run scripts/install-garage.sh (make test does)"
    );
    Garage::start()
}

fn pg() -> PgServer {
    assert!(
        PgServer::available(),
        "Postgres binaries not found: scripts/install-deps.sh installs them (make test does)"
    );
    PgServer::start()
}

fn target(g: &Garage, url: &str) -> objects::Target {
    objects::open_target(
        url,
        &S3Options {
            endpoint: Some(g.endpoint()),
            region: Some(g.region().into()),
            access_key_id: Some(g.access_key().into()),
            secret_access_key: Some(g.secret_key().into()),
            ..S3Options::default()
        },
    )
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The catalog's rows for a snapshot as path → (BLAKE3 hex, mode), files only.
fn catalog_files(
    db: &PgServer,
    snapshot: &str,
) -> std::collections::BTreeMap<String, (String, u32)> {
    db.psql(
        "catalog",
        &format!(
            "SELECT path, encode(blake3, 'hex'), mode FROM bitclone_entries \
             WHERE snapshot = '{snapshot}' AND blake3 IS NOT NULL"
        ),
    )
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split('|').collect();
        (f[0].to_string(), (f[1].to_string(), f[2].parse().unwrap()))
    })
    .collect()
}

/// Objects under the target's prefix, outside `.bitclone/`. On `rt`, the
/// runtime that already drove `t` (its pooled connections belong to it).
fn object_count(rt: &tokio::runtime::Runtime, t: &objects::Target) -> usize {
    rt.block_on(async {
        use futures::TryStreamExt;
        t.store.list(Some(&t.prefix)).try_collect::<Vec<_>>().await
    })
    .unwrap()
    .into_iter()
    .filter(|m| !m.location.as_ref().contains("/.bitclone/"))
    .count()
}

/// Manifest pages in the sink.
fn page_count(rt: &tokio::runtime::Runtime, t: &objects::Target) -> usize {
    rt.block_on(async {
        use futures::TryStreamExt;
        t.store.list(Some(&t.prefix)).try_collect::<Vec<_>>().await
    })
    .unwrap()
    .into_iter()
    .filter(|m| m.location.as_ref().contains("/.bitclone/pages/"))
    .count()
}

fn edit_tree(src: &Path) {
    std::fs::write(src.join("d1/s1/f1.bin"), b"edited one").unwrap();
    std::fs::write(src.join("d2/s2/f2.bin"), b"edited two").unwrap();
    std::fs::write(src.join("d3/s0/f3.bin"), b"edited three").unwrap();
    std::fs::write(src.join("added.txt"), b"a new file").unwrap();
    std::fs::remove_file(src.join("d4/s1/f4.bin")).unwrap();
}

#[test]
fn clone_to_s3_and_postgres_incrementally_then_restore_without_the_cluster() {
    let g = garage();
    g.create_bucket("clones");
    let db = pg();
    db.create_database("catalog");
    let catalog = db.url("catalog");
    let tmp = tempfile::tempdir().unwrap();
    let config = sinks_config(
        tmp.path(),
        &g,
        &[("clones", "clones/team", g.secret_key())],
        &[("catalog", &catalog)],
    );
    let node = TestNode::start_with(&tmp.path().join("n"), &[("BITCLONE_CONFIG", &config)]);
    let src = tmp.path().join("src");
    generate_tree(&src, seed(), 60, 1);
    // sink://clones/ds is s3://clones/team/<tenant>/ds.
    let s3 = "s3://clones/team/default/ds";
    let clone_to_both = |node: &TestNode| {
        let from = file_url(&src);
        node.json(&[
            "clone",
            "--from",
            &from,
            "--to",
            "sink://clones/ds?mirror=true",
            "--to",
            "sink://catalog",
            "--dataset",
            "ds",
            "--wait",
        ])
    };

    let job = clone_to_both(&node);
    assert_eq!(job["state"], "Succeeded", "{job}");
    let snap1 = job["snapshot"].as_str().unwrap().to_string();
    // Every row: the catalog has each file with its BLAKE3 and mode.
    assert_eq!(catalog_files(&db, &snap1), tree_digest(&src, &[]));

    // Incremental: 3 edits, 1 new file, 1 removed → only 4 objects written
    // (plus the manifest and the commit record), 1 deleted.
    edit_tree(&src);
    let before = g.object_write_count();
    let requests = |node: &TestNode, series: &str| -> f64 {
        let r = node.http_get("/metrics");
        assert_eq!(r.status, 200, "{r:?}");
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    let s3_writes = |node: &TestNode| {
        requests(
            node,
            r#"bitclone_sink_requests_total{kind="s3",op="put",outcome="ok"}"#,
        ) + requests(
            node,
            r#"bitclone_sink_requests_total{kind="s3",op="complete_multipart",outcome="ok"}"#,
        )
    };
    let (writes_before, commits_before) = (
        s3_writes(&node),
        requests(
            &node,
            r#"bitclone_sink_requests_total{kind="catalog",op="commit",outcome="ok"}"#,
        ),
    );
    let pages_before = page_count(&rt(), &target(&g, s3));
    let job = clone_to_both(&node);
    assert_eq!(job["state"], "Succeeded", "{job}");
    // The node counts the object writes Garage counts, and one catalog
    // commit.
    assert_eq!(
        s3_writes(&node) - writes_before,
        (g.object_write_count() - before) as f64
    );
    assert_eq!(
        requests(
            &node,
            r#"bitclone_sink_requests_total{kind="catalog",op="commit",outcome="ok"}"#
        ) - commits_before,
        1.0
    );
    assert!(
        requests(
            &node,
            r#"bitclone_sink_request_bytes_total{kind="s3",op="put"}"#
        ) > 0.0
    );
    let snap2 = job["snapshot"].as_str().unwrap().to_string();
    // The manifest pages around the edits are new; the others are shared.
    let new_pages = page_count(&rt(), &target(&g, s3)) - pages_before;
    assert!((1..=4).contains(&new_pages), "{new_pages} new pages");
    assert_eq!(
        g.object_write_count() - before,
        4 + 2 + new_pages as u64,
        "only changed objects"
    );
    assert_eq!(
        object_count(&rt(), &target(&g, s3)),
        tree_digest(&src, &[]).len(),
        "the removed file's object is deleted (mirror)"
    );
    assert_eq!(catalog_files(&db, &snap2), tree_digest(&src, &[]));
    let heads = db.psql(
        "catalog",
        "SELECT head_snapshot, max_fencing_token FROM bitclone_datasets",
    );
    assert!(heads.starts_with(&snap2), "{heads}");

    // Restore from S3 + the catalog into an empty dir: byte-identical, modes kept.
    let out = tmp.path().join("restored");
    let r = restore(
        &g,
        &["--from", s3, "--catalog", &catalog, out.to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(summary["snapshot"], snap2.as_str());
    assert_eq!(summary["catalog_checked"], true);
    assert_same_tree(&src, &out, true, &[]);

    // The restore refuses a snapshot that was never committed there.
    let r = restore(
        &g,
        &[
            "--from",
            s3,
            "--snapshot",
            &"0".repeat(64),
            tmp.path().join("none").to_str().unwrap(),
        ],
    );
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("not found"));

    // S3 as a source: the objects stream through the chunker into a new
    // dataset and out to a directory, identical to the tree.
    let copy = tmp.path().join("copy");
    let job = node.json(&[
        "clone",
        "--from",
        "sink://clones/ds",
        "--to",
        &file_url(&copy),
        "--dataset",
        "from-s3",
        "--wait",
    ]);
    assert_eq!(job["state"], "Succeeded", "{job}");
    assert_same_tree(&src, &copy, false, &[".bitclone"]);
    // S3 → S3: a second run finds every object unchanged on the destination.
    let s3_copy = |node: &TestNode| {
        node.json(&[
            "clone",
            "--from",
            "sink://clones/ds",
            "--to",
            "sink://clones/mirror",
            "--dataset",
            "s3-copy",
            "--wait",
        ])
    };
    assert_eq!(s3_copy(&node)["state"], "Succeeded");
    let before = g.object_write_count();
    assert_eq!(s3_copy(&node)["state"], "Succeeded");
    assert_eq!(
        g.object_write_count() - before,
        2,
        "only the manifest and the commit record"
    );
}

#[test]
fn bad_sinks_fail_the_job_clearly_and_commit_nothing() {
    let g = garage();
    g.create_bucket("real-bucket");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    generate_tree(&src, 3, 5, 0);
    let port = bitclone_chaos::servers::unused_port();
    let wrong = "0".repeat(64);
    let config = sinks_config(
        tmp.path(),
        &g,
        &[
            ("missing", "no-such-bucket/x", g.secret_key()),
            ("wrong-key", "real-bucket/x", &wrong),
        ],
        &[("gone", &format!("postgres://postgres@127.0.0.1:{port}/x"))],
    );
    let node = TestNode::start_with(&tmp.path().join("n"), &[("BITCLONE_CONFIG", &config)]);
    // The job ends Failed, so `clone --wait` would exit non-zero: submit,
    // watch to the end, then read the job.
    let clone = |node: &TestNode, to: &str, ds: &str| {
        let id = node
            .ok(&[
                "clone",
                "--from",
                &file_url(&src),
                "--to",
                to,
                "--dataset",
                ds,
                "--max-attempts",
                "2",
            ])
            .trim()
            .to_string();
        node.cli(&["job", &id, "--watch"]);
        node.json(&["job", &id])
    };

    // A bucket that does not exist: permanent, one attempt.
    let j = clone(&node, "sink://missing", "a");
    assert_eq!(j["state"], "Failed", "{j}");
    assert_eq!(j["attempts"], 1, "not retried: {j}");
    let err = j["last_error"].as_str().unwrap();
    assert!(err.contains("no-such-bucket"), "{err}");

    // An unreachable Postgres: a clear error after the retries.
    let j = clone(&node, "sink://gone", "b");
    assert_eq!(j["state"], "Failed", "{j}");
    let err = j["last_error"].as_str().unwrap();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("unreachable"), "{err}");

    // Wrong credentials: permanent, and nothing committed in the bucket.
    let j = clone(&node, "sink://wrong-key", "c");
    assert_eq!(j["state"], "Failed", "{j}");
    assert_eq!(j["attempts"], 1, "not retried: {j}");
    let err = j["last_error"].as_str().unwrap();
    assert!(err.contains("credentials"), "{err}");
    assert!(!err.contains(&wrong), "{err}");
    let t = target(&g, "s3://real-bucket/x/default");
    assert!(rt().block_on(objects::latest_commit(&t)).unwrap().is_none());

    // A place the client chose is refused at submit: nothing runs.
    for to in ["s3://real-bucket/x", "sink://nope"] {
        let e = node.fails(&[
            "clone",
            "--from",
            &file_url(&src),
            "--to",
            to,
            "--dataset",
            "d",
        ]);
        assert!(
            e.contains("declared for it: gone, missing, wrong-key"),
            "{e}"
        );
    }
    let e = node.fails(&[
        "clone",
        "--from",
        "s3://real-bucket/x",
        "--to",
        &file_url(&tmp.path().join("o")),
        "--dataset",
        "d",
    ]);
    assert!(e.contains("sink://NAME"), "{e}");
}

#[test]
fn killing_the_holder_mid_upload_leaves_exactly_one_commit_in_each_sink() {
    holder_lost_mid_upload(Fault::Kill);
}

#[test]
fn a_holder_paused_mid_upload_is_fenced_out_of_both_sinks() {
    holder_lost_mid_upload(Fault::Pause);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// SIGKILL: the holder is gone.
    Kill,
    /// SIGSTOP until another node has finished the job, then SIGCONT: a
    /// zombie that wakes up holding a superseded lease.
    Pause,
}

fn holder_lost_mid_upload(fault: Fault) {
    let g = garage();
    g.create_bucket("failover");
    let db = pg();
    db.create_database("catalog");
    let catalog = db.url("catalog");
    let tmp = tempfile::tempdir().unwrap();
    let config = sinks_config(
        tmp.path(),
        &g,
        &[("failover", "failover", g.secret_key())],
        &[("catalog", &catalog)],
    );
    let env = [
        ("BITCLONE_CONFIG", config.as_str()),
        // Slow enough per file that the kill lands in the middle of the upload.
        ("BITCLONE_FAULT_EXPORT_FILE_DELAY_MS", "150"),
    ];
    let mut c = TestCluster::start_with_env(tmp.path(), 3, 3, &env);
    let src = tmp.path().join("src");
    generate_tree(&src, seed(), 40, 1);
    let s3 = "s3://failover/default/ds";
    let id = c
        .node(1)
        .ok(&[
            "clone",
            "--from",
            &file_url(&src),
            "--to",
            "sink://failover/ds",
            "--to",
            "sink://catalog",
            "--dataset",
            "fo",
        ])
        .trim()
        .to_string();
    let job = |c: &TestCluster, via: u64| -> Option<serde_json::Value> {
        let out = c.nodes.get(&via)?.cli(&["--json", "job", &id]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    };
    // Wait until the holder is uploading (some files done, not all).
    let mut holder = 0;
    c.wait_for("the upload to be under way", 120, |c| {
        let Some(j) = job(c, 1) else { return false };
        holder = j["lease_holder"].as_u64().unwrap_or(0);
        let p = &j["progress"];
        holder != 0
            && p["phase"]
                .as_str()
                .unwrap_or("")
                .starts_with("writing sink://failover/ds")
            && p["files_done"].as_u64().unwrap_or(0) > 0
    });
    let via = (1..=3).find(|n| *n != holder).unwrap();
    let killed = Instant::now();
    let signal = |pid: u32, sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    let paused = c.node(holder).pid();
    match fault {
        Fault::Kill => c.kill9(holder),
        Fault::Pause => signal(paused, "-STOP"),
    }
    c.wait_for("the job to succeed on another node", 180, |c| {
        job(c, via).is_some_and(|j| j["state"] == "Succeeded")
    });
    let j = job(&c, via).unwrap();
    println!(
        "holder {holder} {fault:?} mid-upload; job done after {:.1} s with token {}",
        killed.elapsed().as_secs_f64(),
        j["fencing_token"]
    );
    if fault == Fault::Pause {
        // The zombie wakes, finds no renewal for a whole lease and stops
        // before it can commit anywhere.
        let writes = g.object_write_count();
        signal(paused, "-CONT");
        c.wait_for("the woken holder to stop its attempt", 60, |c| {
            c.node(holder)
                .log_text()
                .contains("no lease renewal for a whole lease")
        });
        std::thread::sleep(std::time::Duration::from_secs(2));
        // Requests already under way when it was paused may still land; no
        // new upload may start (at most the default concurrency of 8 were
        // in flight), and nothing is committed (checked below).
        let late = g.object_write_count() - writes;
        assert!(
            late <= 8,
            "the woken holder kept uploading after its lease was gone: {late} writes"
        );
    }
    let snap = j["snapshot"].as_str().unwrap().to_string();

    // The bucket: one commit record (the new holder's), and exactly the
    // snapshot's files.
    let t = target(&g, s3);
    let rt = rt();
    let commits = rt.block_on(objects::list_commits(&t)).unwrap();
    assert_eq!(commits.len(), 1, "{commits:?}");
    assert_eq!(commits[0].1, snap);
    assert_eq!(commits[0].0, j["fencing_token"].as_u64().unwrap());
    // What an operator sees of it with `restore --list`.
    let listed = restore(&g, &["--from", s3, "--list"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["commits"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["commits"][0]["job"], j["id"], "{listed}");
    assert_eq!(listed["commits"][0]["snapshot"], snap.as_str(), "{listed}");
    assert_eq!(
        listed["data_objects"].as_u64().unwrap() as usize,
        tree_digest(&src, &[]).len(),
        "{listed}"
    );
    let out = tmp.path().join("restored");
    let r = restore(
        &g,
        &["--from", s3, "--catalog", &catalog, out.to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_same_tree(&src, &out, true, &[]);
    assert_eq!(
        object_count(&rt, &t),
        tree_digest(&src, &[]).len(),
        "no stray objects"
    );
    // The catalog: exactly one row set.
    assert_eq!(
        db.psql(
            "catalog",
            "SELECT count(*), min(id) FROM bitclone_snapshots"
        )
        .trim(),
        format!("1|{snap}")
    );
    assert_eq!(catalog_files(&db, &snap), tree_digest(&src, &[]));
}
