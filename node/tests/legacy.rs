#![allow(clippy::unwrap_used)]
//! A data dir written by the previous release (0.1.0 at 56dfad0: a
//! standalone node keeping dataset heads, snapshot records and jobs in its
//! RocksDB) is migrated on first start into the one-voter state machine.
//!
//! The fixture `fixtures/legacy-standalone-0.1.0.tar.gz` was made by that
//! release's own binary with `make_legacy_fixture` below (ignored; run it
//! with `BITCLONE_LEGACY_BIN=/path/to/old/bitclone`); the expected listings
//! it printed are in `fixtures/legacy-standalone-0.1.0.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitclone_chaos::*;

const FIXTURE: &str = "legacy-standalone-0.1.0";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Small deterministic trees (the migration test regenerates them to check
/// the restored bytes): `n` files of 1..=6 KiB in two directories.
fn small_tree(root: &Path, salt: u8, n: usize) {
    for i in 0..n {
        let dir = root.join(format!("d{}", i % 2));
        std::fs::create_dir_all(&dir).unwrap();
        let len = 1024 * (1 + i % 6);
        let data: Vec<u8> = (0..len)
            .map(|j| (j as u32 * 31 + i as u32 * 7 + salt as u32) as u8)
            .collect();
        std::fs::write(dir.join(format!("f{i}.txt")), data).unwrap();
    }
}

fn wait_job(node: &TestNode, id: &str, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = node.json(&["job", id]);
        if f(&j) {
            return;
        }
        assert!(Instant::now() < deadline, "job never {what}: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes the fixture with the previous release's binary.
#[test]
#[ignore = "makes the fixture; needs BITCLONE_LEGACY_BIN (the previous release's bitclone)"]
fn make_legacy_fixture() {
    let bin = std::env::var("BITCLONE_LEGACY_BIN").expect("BITCLONE_LEGACY_BIN");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    let node = TestNode::spawn_release(
        std::path::Path::new(&bin),
        &data,
        "127.0.0.1:0",
        &[],
        &[
            ("BITCLONE_FAULT_EXPORT_FAILURES", "1"),
            ("BITCLONE_JOB_BACKOFF_BASE", "87600h"),
            ("BITCLONE_JOB_BACKOFF_MAX", "87600h"),
        ],
    );
    let (v1, v2, other) = (
        tmp.path().join("v1"),
        tmp.path().join("v2"),
        tmp.path().join("other"),
    );
    small_tree(&v1, 1, 8);
    small_tree(&v2, 1, 8);
    small_tree(&v2.join("added"), 2, 3);
    small_tree(&other, 3, 4);
    node.ok(&["put", v1.to_str().unwrap(), "--dataset", "photos"]);
    node.ok(&["put", v2.to_str().unwrap(), "--dataset", "photos"]);
    node.ok(&[
        "--tenant",
        "acme",
        "put",
        other.to_str().unwrap(),
        "--dataset",
        "docs",
    ]);
    // The first attempt of the first job fails (the injected fault) and
    // waits years to retry: an unfinished job that stays one while tests run.
    let waiting = node
        .ok(&[
            "clone",
            "--from",
            "snapshot://photos",
            "--to",
            &file_url(&tmp.path().join("out-a")),
            "--dataset",
            "photos",
        ])
        .trim()
        .to_string();
    wait_job(&node, &waiting, "failed its first attempt", |j| {
        j["attempts"] == 1 && j["state"] == "Pending"
    });
    let done = node
        .ok(&[
            "clone",
            "--from",
            "snapshot://photos",
            "--to",
            &file_url(&tmp.path().join("out-b")),
            "--dataset",
            "photos",
        ])
        .trim()
        .to_string();
    wait_job(&node, &done, "succeeded", |j| j["state"] == "Succeeded");
    let expected = serde_json::json!({
        "photos": node.json(&["snapshots", "--dataset", "photos"]),
        "acme_docs": node.json(&["--tenant", "acme", "snapshots", "--dataset", "docs"]),
        "waiting": node.json(&["job", &waiting]),
        "done": node.json(&["job", &done]),
    });
    node.stop();
    let _ = std::fs::remove_file(data.join("node.addr"));
    let out = fixtures();
    std::fs::create_dir_all(&out).unwrap();
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(out.join(format!("{FIXTURE}.tar.gz")))
        .arg("-C")
        .arg(tmp.path())
        .arg("node")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(
        out.join(format!("{FIXTURE}.json")),
        serde_json::to_string_pretty(&expected).unwrap(),
    )
    .unwrap();
}

fn ids(listing: &serde_json::Value) -> Vec<String> {
    listing["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_data_dir_of_the_previous_release_is_migrated_on_first_start() {
    let tmp = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(fixtures().join(format!("{FIXTURE}.tar.gz")))
        .arg("-C")
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(st.success());
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join(format!("{FIXTURE}.json"))).unwrap())
            .unwrap();
    let data = tmp.path().join("node");
    assert!(
        !data.join("raft").exists(),
        "the fixture is of a standalone node"
    );
    let node = TestNode::start(&data);

    // Datasets: every snapshot, in order, under its tenant.
    let photos = node.json(&["snapshots", "--dataset", "photos"]);
    assert_eq!(ids(&photos), ids(&expected["photos"]));
    assert_eq!(ids(&photos).len(), 2);
    let docs = node.json(&["--tenant", "acme", "snapshots", "--dataset", "docs"]);
    assert_eq!(ids(&docs), ids(&expected["acme_docs"]));
    // The heads read back byte-identical to the trees they were made from.
    let (v2, other) = (tmp.path().join("v2"), tmp.path().join("other"));
    small_tree(&v2, 1, 8);
    small_tree(&v2.join("added"), 2, 3);
    small_tree(&other, 3, 4);
    let got = tmp.path().join("got-photos");
    node.ok(&["get", "--dataset", "photos", got.to_str().unwrap()]);
    assert_same_tree(&v2, &got, false, &[]);
    let got = tmp.path().join("got-docs");
    node.ok(&[
        "--tenant",
        "acme",
        "get",
        "--dataset",
        "docs",
        got.to_str().unwrap(),
    ]);
    assert_same_tree(&other, &got, false, &[]);

    // Jobs: the unfinished one waits for its retry with its attempt and
    // error; the finished one stays finished.
    let old = &expected["waiting"];
    let waiting = node.json(&["job", old["id"].as_str().unwrap()]);
    assert_eq!(waiting["state"], "Pending", "{waiting}");
    for k in [
        "attempts",
        "last_error",
        "fencing_token",
        "next_attempt_unix_ms",
    ] {
        assert_eq!(waiting[k], old[k], "{k}: {waiting} vs {old}");
    }
    let done = node.json(&["job", expected["done"]["id"].as_str().unwrap()]);
    assert_eq!(done["state"], "Succeeded");
    assert_eq!(done["fencing_token"], expected["done"]["fencing_token"]);

    // The node is a cluster of one voter, the leader.
    let status = node.json(&["cluster", "status"]);
    assert_eq!(status["leader"], 1, "{status}");
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{status}");
    assert_eq!(members[0]["voter"], true);

    // New grants go above the tokens the old node gave its sinks.
    let out = tmp.path().join("out-new");
    let job = node.json(&[
        "clone",
        "--from",
        "snapshot://photos",
        "--to",
        &file_url(&out),
        "--dataset",
        "photos",
        "--wait",
    ]);
    assert_eq!(job["state"], "Succeeded", "{job}");
    let old_max = old["fencing_token"]
        .as_u64()
        .unwrap()
        .max(expected["done"]["fencing_token"].as_u64().unwrap());
    assert!(job["fencing_token"].as_u64().unwrap() > old_max, "{job}");
    assert_same_tree(&v2, &out, false, &[".bitclone"]);

    // Once only: a restart finds nothing left to move, and the state holds.
    node.stop();
    let node = TestNode::start(&data);
    assert_eq!(
        ids(&node.json(&["snapshots", "--dataset", "photos"])),
        ids(&photos)
    );
    let moved = node
        .log_text()
        .matches("moved the previous release's datasets and jobs")
        .count();
    assert_eq!(moved, 1, "{}", node.log_text());
    node.stop();
}
