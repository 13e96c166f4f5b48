#![allow(clippy::unwrap_used)]
//! A full disk, on a small tmpfs for the store (a mount namespace of the
//! node's own, so this runs as root, as CI does). Below its free-space
//! reserve a node refuses writes, keeps serving reads, and takes writes
//! again once space comes back. Without a reserve, a store that refused a
//! write is unfit for writes until the node restarts: it says so in
//! `stats` and refuses writes at once, naming the cause, while reads go on.

use bitclone_chaos::*;

#[test]
fn a_full_disk_poisons_the_store_and_the_node_says_so_and_takes_no_writes() {
    assert_eq!(
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        "0",
        "this test mounts a tmpfs in a private mount namespace: run it as root"
    );
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    // No reserve: the disk fills up to the store's own refusal.
    let node = TestNode::start_with_small_store(
        &tmp.path().join("node"),
        24,
        &[("BITCLONE_DISK_RESERVE", "0")],
    );
    let small = tmp.path().join("small");
    generate_tree(&small, seed, 6, 0);
    let first = node.json(&["put", small.to_str().unwrap(), "--dataset", "small"]);
    assert_eq!(node.json(&["stats"])["fatal"], serde_json::Value::Null);

    // More random bytes than the tmpfs holds: the flush before the commit
    // fails, and the store refuses writes from then on.
    let big = tmp.path().join("big");
    generate_tree(&big, seed ^ 1, 4, 2);
    let e = node.fails(&["put", big.to_str().unwrap(), "--dataset", "big"]);
    assert!(!e.is_empty());
    let stats = node.json(&["stats"]);
    let fatal = stats["fatal"].as_str().unwrap_or_default();
    assert!(fatal.contains("the store refused a write"), "{stats}");
    // A further write is refused at once, with the cause.
    let e = node.fails(&["put", small.to_str().unwrap(), "--dataset", "again"]);
    assert!(e.contains("stopped taking writes"), "{e}");
    assert!(node.json(&["datasets"])["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["name"] != "big" && d["name"] != "again"));
    // Reads go on: what was committed before reads back intact.
    let out = tmp.path().join("out");
    let got = node.json(&["get", "--dataset", "small", out.to_str().unwrap()]);
    assert_eq!(got["snapshot"], first["snapshot"]);
    assert_same_tree(&small, &out, true, &[]);
}

#[test]
fn below_the_disk_reserve_writes_are_refused_reads_go_on_and_writes_resume_when_space_returns() {
    assert_eq!(
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        "0",
        "this test mounts a tmpfs in a private mount namespace: run it as root"
    );
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    // 96 MiB for the store, 40 of them kept free.
    let node = TestNode::start_with_small_store(
        &tmp.path().join("node"),
        96,
        &[("BITCLONE_DISK_RESERVE", "40MiB")],
    );
    let small = tmp.path().join("small");
    generate_tree(&small, seed, 6, 0);
    let first = node.json(&["put", small.to_str().unwrap(), "--dataset", "small"]);
    assert_eq!(node.http_get("/readyz").status, 200);

    // 80+ MiB of random bytes: the put stops at the reserve, refused, and
    // nothing of it is committed. The store itself is not harmed.
    let big = tmp.path().join("big");
    generate_tree(&big, seed ^ 1, 5, 4);
    let e = node.fails(&["put", big.to_str().unwrap(), "--dataset", "big"]);
    assert!(
        e.contains("ResourceExhausted") || e.contains("reserve"),
        "{e}"
    );
    assert!(e.contains("reserve"), "{e}");
    assert_eq!(node.json(&["stats"])["fatal"], serde_json::Value::Null);
    let r = node.http_get("/readyz");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("disk below its reserve"), "{r:?}");
    let stats = node.json(&["stats"]);
    assert_eq!(stats["ready"], false, "{stats}");
    assert!(
        stats["not_ready"][0].as_str().unwrap().contains("reserve"),
        "{stats}"
    );
    // A further write is refused at once, before anything is sent.
    let e = node.fails(&["put", small.to_str().unwrap(), "--dataset", "again"]);
    assert!(e.contains("reserve"), "{e}");
    let names = |node: &TestNode| -> Vec<String> {
        node.json(&["datasets"])["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&node), ["small"]);
    // Reads go on.
    let out = tmp.path().join("out");
    let got = node.json(&["get", "--dataset", "small", out.to_str().unwrap()]);
    assert_eq!(got["snapshot"], first["snapshot"]);
    assert_same_tree(&small, &out, true, &[]);

    // Space comes back: ready again and taking writes, no restart.
    node.resize_store(512);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node.http_get("/readyz").status != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready again");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let again = node.json(&["put", big.to_str().unwrap(), "--dataset", "big"]);
    assert!(again["snapshot"].is_string(), "{again}");
    // Every acknowledged snapshot reads back identical.
    for (ds, src) in [("small", &small), ("big", &big)] {
        let out = tmp.path().join(format!("out-{ds}"));
        node.json(&["get", "--dataset", ds, out.to_str().unwrap()]);
        assert_same_tree(src, &out, true, &[]);
    }
}
