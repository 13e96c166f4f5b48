#![allow(clippy::unwrap_used)]
//! Encryption at rest on three real nodes: an encrypted tenant's files are
//! nowhere in clear on any node's disk, the same file in two tenants gets
//! two chunk names, everything still replicates, reads back, exports, is
//! collected and scrubbed; the key-encryption key rotates by re-wrapping,
//! and a node without the key refuses the tenant instead of guessing.

use std::path::Path;

use bitclone_chaos::*;
use bitclone_storage::{ChunkId, ChunkStore, RocksOptions, RocksStore};
use rand::SeedableRng;

/// A key file line for key `id` made of byte `b`.
fn key_line(id: &str, b: u8) -> String {
    format!("{id} {}\n", format!("{b:02x}").repeat(32))
}

/// Every file under `dir` (the whole node directory: store, Raft log,
/// logs), read raw: whether any holds `needle`.
fn found_on_disk(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for e in walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
    {
        if !e.file_type().is_file() {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap_or_default();
        if bytes.windows(needle.len()).any(|w| w == needle) {
            hits.push(e.path().display().to_string());
        }
    }
    hits
}

fn tenant(name: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["--tenant".to_string(), name.to_string()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn run(c: &TestCluster, id: u64, args: &[String]) -> serde_json::Value {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    c.node(id).json(&a)
}

fn get_matches(c: &TestCluster, via: u64, t: &str, want: &Path) {
    let out = c.dir.join(format!("get-{t}-{via}"));
    run(
        c,
        via,
        &tenant(t, &["get", "--dataset", "ds", out.to_str().unwrap()]),
    );
    assert_same_tree(want, &out, false, &[]);
    std::fs::remove_dir_all(&out).unwrap();
}

fn restart(c: &mut TestCluster, id: u64) {
    c.nodes.remove(&id).unwrap().stop();
    c.start_node(id, &[]);
    c.wait_voters(id, 3);
}

#[test]
fn an_encrypted_tenant_is_never_on_disk_in_clear_and_rotates_its_kek_without_rewriting() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("kek");
    std::fs::write(&keys, key_line("k1", 0x11)).unwrap();
    let env = [
        ("BITCLONE_KEY_FILE", keys.to_str().unwrap()),
        ("BITCLONE_GC_INTERVAL", "0s"),
        ("BITCLONE_GC_GRACE", "0s"),
        ("BITCLONE_SCRUB_INTERVAL", "0s"),
    ];
    let mut c = TestCluster::start_with_env(tmp.path(), 3, 3, &env);

    // Nearly the same tree in two tenants: "sec" encrypted, "pub" not.
    // Known files are random (no compression could hide them in a scan)
    // and smaller than the minimum chunk (one chunk whole: in a plain
    // tenant, named by the file's BLAKE3). `shared.bin` is in both,
    // `top-secret-plan.bin` only in "sec", `control.bin` only in "pub".
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let (shared, secret, control) = (
        random_bytes(&mut rng, 100 << 10),
        random_bytes(&mut rng, 100 << 10),
        random_bytes(&mut rng, 100 << 10),
    );
    let (src_sec, src_pub) = (tmp.path().join("sec"), tmp.path().join("pub"));
    for (dir, own, bytes) in [
        (&src_sec, "top-secret-plan.bin", &secret),
        (&src_pub, "control.bin", &control),
    ] {
        generate_tree(dir, 5, 25, 0);
        std::fs::write(dir.join("shared.bin"), &shared).unwrap();
        std::fs::write(dir.join(own), bytes).unwrap();
    }
    for t in ["sec", "pub"] {
        c.node(1).ok(&["tenant", "create", t]);
    }
    let k = c.node(2).json(&["tenant", "encrypt", "sec"]);
    let key_id = k[0]["key_id"].as_str().unwrap().to_string();
    assert_eq!(k[0]["kek"], "k1", "{k}");
    // Known to every node, open on each.
    for id in 1..=3 {
        c.wait_for("the tenant key open on every node", 30, |c| {
            let v = c.node(id).json(&["tenant", "keys"]);
            v[0]["tenant"] == "sec" && v[0]["open_here"] == true && v[0]["key_id"] == key_id
        });
    }
    for (t, via, dir) in [("sec", 1, &src_sec), ("pub", 2, &src_pub)] {
        run(
            &c,
            via,
            &tenant(t, &["put", dir.to_str().unwrap(), "--dataset", "ds"]),
        );
    }
    // A tenant that has data cannot be encrypted any more.
    let e = c.node(3).fails(&["tenant", "encrypt", "pub"]);
    assert!(e.contains("without data"), "{e}");

    // Read back through every node (each holds a replica), exported to a
    // sink and restored from the sink alone, with no key.
    for via in 1..=3 {
        get_matches(&c, via, "sec", &src_sec);
    }
    let export = tmp.path().join("export");
    let job = run(
        &c,
        3,
        &tenant(
            "sec",
            &[
                "clone",
                "--from",
                "snapshot://ds",
                "--to",
                &file_url(&export),
                "--dataset",
                "ds",
                "--wait",
            ],
        ),
    );
    assert_eq!(job["state"], "Succeeded", "{job}");
    assert_same_tree(&src_sec, &export, false, &[".bitclone"]);
    let restored = tmp.path().join("restored");
    c.node(1).ok(&[
        "restore",
        "--from",
        &file_url(&export),
        restored.to_str().unwrap(),
    ]);
    assert_same_tree(&src_sec, &restored, false, &[]);

    // Collection and scrub go through the encrypted tenant's pages and
    // chunks on every node: nothing live is freed, nothing is bad.
    for r in c.node(1).json(&["gc", "--all"])["nodes"]
        .as_array()
        .unwrap()
    {
        assert_eq!(r["freed"], 0, "{r}");
    }
    for r in c.node(2).json(&["scrub", "--all"])["nodes"]
        .as_array()
        .unwrap()
    {
        assert_eq!(r["bad"], 0, "{r}");
        assert!(r["chunks"].as_u64().unwrap() > 0, "{r}");
    }
    for via in 1..=3 {
        get_matches(&c, via, "sec", &src_sec);
    }

    // Rotation: a new primary key-encryption key, the old one kept to
    // unwrap; re-wrapping keeps the data key (and every chunk).
    std::fs::write(&keys, key_line("k2", 0x22) + &key_line("k1", 0x11)).unwrap();
    let r = c.node(1).json(&["tenant", "rewrap"]);
    assert_eq!(
        (&r[0]["kek"], &r[0]["previous_kek"], &r[0]["key_id"]),
        (&"k2".into(), &"k1".into(), &key_id.as_str().into()),
        "{r}"
    );
    // The old key retired: a node that starts now opens the tenant with
    // the new one alone.
    std::fs::write(&keys, key_line("k2", 0x22)).unwrap();
    restart(&mut c, 2);
    c.wait_for("the re-wrapped key open on the restarted node", 30, |c| {
        c.node(2).json(&["tenant", "keys"])[0]["open_here"] == true
    });
    get_matches(&c, 2, "sec", &src_sec);

    // A node that cannot unwrap the key refuses the tenant with the
    // reason, and still serves the others.
    std::fs::write(&keys, key_line("k9", 0x99)).unwrap();
    restart(&mut c, 3);
    assert_eq!(c.node(3).json(&["tenant", "keys"])[0]["open_here"], false);
    let out = c.dir.join("locked");
    let a = tenant("sec", &["get", "--dataset", "ds", out.to_str().unwrap()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let e = c.node(3).fails(&a);
    assert!(e.contains("no key k2"), "{e}");
    get_matches(&c, 3, "pub", &src_pub);
    std::fs::write(&keys, key_line("k2", 0x22)).unwrap();
    restart(&mut c, 3);
    get_matches(&c, 3, "sec", &src_sec);

    // On disk, every node's whole directory (store, Raft log, logs) read
    // raw: the control file is found in clear (so the scan sees chunk
    // bytes), the encrypted tenant's file nowhere, at any offset, nor its
    // file name in the store.
    let dirs: Vec<_> = (1..=3).map(|id| c.node_dir(id)).collect();
    for (_, node) in std::mem::take(&mut c.nodes) {
        node.stop();
    }
    for dir in &dirs {
        let hits = found_on_disk(dir, &control[5000..5032]);
        assert!(
            !hits.is_empty(),
            "control not found under {}",
            dir.display()
        );
        for at in [0, 5000, 50_000, (100 << 10) - 32] {
            let hits = found_on_disk(dir, &secret[at..at + 32]);
            assert!(
                hits.is_empty(),
                "the encrypted tenant's file in clear: {hits:?}"
            );
        }
        let hits = found_on_disk(&dir.join("db"), b"top-secret-plan");
        assert!(
            hits.is_empty(),
            "the encrypted tenant's file name in clear: {hits:?}"
        );
    }
    // The same file, two names: the plain tenant's chunk is named by the
    // file's BLAKE3; the encrypted tenant holds no chunk of that name (its
    // names are keyed), yet holds chunks of its own.
    let shared_id = ChunkId::of(&shared);
    for dir in &dirs {
        let store = RocksStore::open(&dir.join("db"), &RocksOptions::default()).unwrap();
        assert!(
            store.has_chunk("pub", &shared_id).unwrap(),
            "{}",
            dir.display()
        );
        assert!(!store.has_chunk("sec", &shared_id).unwrap());
        assert!(store.tenant_keys("sec").unwrap() > 0);
    }
}
