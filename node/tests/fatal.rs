#![allow(clippy::unwrap_used)]
//! A node whose store refused a write is unfit for writes until it restarts:
//! it says so in `stats` and refuses writes at once, naming the cause, while
//! reads go on. The store fills a small tmpfs (a mount namespace of the
//! node's own, so this runs as root, as CI does).

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
    let node = TestNode::start_with_small_store(&tmp.path().join("node"), 24);
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
