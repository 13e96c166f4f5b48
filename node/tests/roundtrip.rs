//! Put, get, incremental put and clone through the real binary.

use std::os::unix::fs::PermissionsExt;

use bitclone_chaos::*;
use rand::{Rng, SeedableRng};

#[test]
fn put_get_incremental_put_and_clone_are_byte_identical() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let total = generate_tree(&src, seed, 320, 2);
    let node = TestNode::start(&tmp.path().join("node"));

    // Cold put: everything is new.
    let put1 = node.json(&["put", src.to_str().unwrap(), "--dataset", "ds"]);
    assert_eq!(put1["files"], 320);
    assert_eq!(put1["bytes"].as_u64().unwrap(), total);
    let new1 = put1["new_bytes"].as_u64().unwrap();
    // Random data does not deduplicate; every byte is new once.
    assert_eq!(new1, total);
    let snap1 = put1["snapshot"].as_str().unwrap().to_string();
    assert_eq!(snap1.len(), 64);

    // Get it back: same bytes, same modes.
    let restore = tmp.path().join("restore");
    let got = node.json(&["get", "--dataset", "ds", restore.to_str().unwrap()]);
    assert_eq!(got["snapshot"], snap1.as_str());
    assert_same_tree(&src, &restore, true, &[]);
    assert!(
        restore.join("empty/dir").is_dir(),
        "empty directories survive"
    );

    // Edit part of the tree: a region inside a big file, a few small files,
    // one new file, one deleted file.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xed17);
    let mut changed = 0u64;
    let mut bound = 0u64;
    let big = src.join("d0/s0/f0.bin");
    let mut data = std::fs::read(&big).unwrap();
    let at = data.len() / 2;
    let region = random_bytes(&mut rng, 64 << 10);
    data[at..at + region.len()].copy_from_slice(&region);
    std::fs::write(&big, &data).unwrap();
    changed += region.len() as u64;
    // A rewritten region dirties the chunks it touches and perhaps one more.
    bound += region.len() as u64 + 2 * (4 << 20);
    for i in [3usize, 4, 5] {
        let p = src.join(format!("d{}/s{}/f{i}.bin", i % 7, i % 3));
        let mut d = std::fs::read(&p).unwrap();
        d.extend_from_slice(b"appended");
        std::fs::write(&p, &d).unwrap();
        changed += 8;
        bound += d.len() as u64; // small files are a single chunk
    }
    let newfile = src.join("d1/new.bin");
    let n = rng.random_range(100_000..200_000);
    let nd = random_bytes(&mut rng, n);
    std::fs::write(&newfile, &nd).unwrap();
    std::fs::set_permissions(&newfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    changed += nd.len() as u64;
    bound += nd.len() as u64;
    std::fs::remove_file(src.join("d6/s0/f6.bin")).unwrap();

    let put2 = node.json(&["put", src.to_str().unwrap(), "--dataset", "ds"]);
    let new2 = put2["new_bytes"].as_u64().unwrap();
    println!("changed {changed} bytes; second put stored {new2} new bytes (bound {bound})");
    assert!(
        new2 >= changed - 64,
        "stored less than what changed: {new2} < {changed}"
    );
    assert!(
        new2 <= bound,
        "stored {new2} new bytes for {changed} changed (bound {bound})"
    );
    assert!(
        new2 < total / 10,
        "incremental put stored {new2} of {total} bytes"
    );
    assert_eq!(put2["files"], 320, "one added, one removed");
    assert_eq!(
        put2["unchanged_files"],
        320 - 5,
        "only edited and new files are read"
    );
    let snap2 = put2["snapshot"].as_str().unwrap().to_string();
    assert_ne!(snap1, snap2);

    let snaps = node.json(&["snapshots", "--dataset", "ds"]);
    let ids: Vec<&str> = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![snap1.as_str(), snap2.as_str()]);

    // The old snapshot is still intact next to the new one.
    let old = tmp.path().join("old");
    node.ok(&[
        "get",
        "--dataset",
        "ds",
        "--snapshot",
        &snap1,
        old.to_str().unwrap(),
    ]);
    assert_same_tree(&restore, &old, true, &[]);

    // Clone the latest snapshot to a file:// object store.
    let export = tmp.path().join("export");
    let job = node.json(&[
        "clone",
        "--from",
        "snapshot://ds",
        "--to",
        &file_url(&export),
        "--dataset",
        "ds",
        "--wait",
    ]);
    assert_eq!(job["state"], "Succeeded", "{job}");
    assert_eq!(job["snapshot"], snap2.as_str());
    assert_same_tree(&src, &export, false, &[".bitclone"]);
    // The commit point: one record, naming the snapshot, written last.
    let commits: Vec<String> = std::fs::read_dir(export.join(".bitclone/commits"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(commits.len(), 1, "{commits:?}");
    assert!(commits[0].ends_with(&format!("-{snap2}")), "{commits:?}");

    // Clone straight from a directory on the node into a new dataset, to two sinks.
    let stored_before = node.json(&["stats"])["bytes_stored"].as_u64().unwrap();
    let (e1, e2) = (tmp.path().join("e1"), tmp.path().join("e2"));
    let job = node.json(&[
        "clone",
        "--from",
        &file_url(&src),
        "--to",
        &file_url(&e1),
        "--to",
        &file_url(&e2),
        "--dataset",
        "fromdir",
        "--wait",
    ]);
    assert_eq!(job["state"], "Succeeded", "{job}");
    assert_same_tree(&src, &e1, false, &[".bitclone"]);
    assert_same_tree(&src, &e2, false, &[".bitclone"]);
    // Same content as ds's latest snapshot: no new chunk bytes were needed.
    let stats = node.json(&["stats"]);
    assert_eq!(
        stats["bytes_stored"].as_u64().unwrap(),
        stored_before,
        "{stats}"
    );
    assert_eq!(stats["datasets"], 2);
    let jobs = node.json(&["jobs"]);
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2);
    node.stop();
}

#[test]
fn acknowledged_put_survives_kill_9() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    generate_tree(&src, seed, 60, 1);
    let data_dir = tmp.path().join("node");
    let node = TestNode::start(&data_dir);
    let put = node.json(&["put", src.to_str().unwrap(), "--dataset", "durable"]);
    let snap = put["snapshot"].as_str().unwrap().to_string();
    // No flush, no shutdown: the acknowledgement alone must be durable.
    node.kill9();

    let node = TestNode::start(&data_dir);
    let restore = tmp.path().join("restore");
    let got = node.json(&["get", "--dataset", "durable", restore.to_str().unwrap()]);
    assert_eq!(got["snapshot"], snap.as_str());
    assert_same_tree(&src, &restore, true, &[]);

    // Kill the node in the middle of an unacknowledged put: chunks written
    // so far may be lost, but the store must not believe it has them.
    let src2 = tmp.path().join("src2");
    generate_tree(&src2, seed ^ 1, 40, 3);
    let mut put = node
        .command()
        .args(["put", src2.to_str().unwrap(), "--dataset", "torn"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    node.kill9();
    let _ = put.wait();
    let node = TestNode::start(&data_dir);
    node.json(&["put", src2.to_str().unwrap(), "--dataset", "torn"]);
    let restore2 = tmp.path().join("restore2");
    node.json(&["get", "--dataset", "torn", restore2.to_str().unwrap()]);
    assert_same_tree(&src2, &restore2, true, &[]);
    node.stop();
}

#[test]
fn sigterm_resumes_nothing_lost_and_jobs_survive_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    generate_tree(&src, 5, 20, 0);
    let data_dir = tmp.path().join("node");
    let node = TestNode::start(&data_dir);
    let out = tmp.path().join("out");
    let job = node.json(&[
        "clone",
        "--from",
        &file_url(&src),
        "--to",
        &file_url(&out),
        "--dataset",
        "j",
        "--wait",
    ]);
    assert_eq!(job["state"], "Succeeded");
    let id = job["id"].as_str().unwrap().to_string();
    node.stop();
    let node = TestNode::start(&data_dir);
    let again = node.json(&["job", &id]);
    assert_eq!(
        again["state"], "Succeeded",
        "job record must survive a restart"
    );
    assert_eq!(again["snapshot"], job["snapshot"]);
    node.stop();
}

#[test]
fn a_node_on_its_own_is_a_cluster_of_one_that_others_can_join() {
    let tmp = tempfile::tempdir().unwrap();
    let d1 = tmp.path().join("n1");
    let node = TestNode::start(&d1);
    // One voter, the leader, with a CA and certificate it made itself.
    let st = node.json(&["cluster", "status"]);
    assert_eq!(st["leader"], 1, "{st}");
    assert_eq!(st["members"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["members"][0]["voter"], true);
    assert!(st["members"][0]["peer_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let certs = d1.join("certs");
    assert!(certs.join("ca.pem").is_file() && certs.join("node-1.pem").is_file());
    let src = tmp.path().join("src");
    generate_tree(&src, 5, 12, 0);
    let snap = node.json(&["put", src.to_str().unwrap(), "--dataset", "ds"])["snapshot"].clone();

    // Grow it: a certificate for node 2 from the node's own CA, then join.
    dev_certs(bin(), &certs, 2);
    let args: Vec<String> = vec![
        "--node-id".into(),
        "2".into(),
        "--certs".into(),
        certs.display().to_string(),
        "--join".into(),
        node.endpoint.clone(),
    ];
    let node2 = TestNode::spawn(&tmp.path().join("n2"), "127.0.0.1:0", &args, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let st = node2.json(&["cluster", "status"]);
        let voters = st["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["voter"] == true)
            .count();
        if voters == 2 && st["leader"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 2 never joined: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The dataset written while alone reads back through the new member.
    let restore = tmp.path().join("restore");
    let got = node2.json(&["get", "--dataset", "ds", restore.to_str().unwrap()]);
    assert_eq!(got["snapshot"], snap);
    assert_same_tree(&src, &restore, true, &[]);
    node2.stop();
    node.stop();
}
