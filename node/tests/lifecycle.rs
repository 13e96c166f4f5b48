#![allow(clippy::unwrap_used)]
//! Data lifecycle on three real nodes: deleting snapshots and datasets,
//! garbage collection freeing their chunks on every replica (space
//! measured) while puts that dedup against them keep running, retention.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use bitclone_chaos::*;

fn put(c: &TestCluster, id: u64, src: &Path, dataset: &str) -> String {
    let v = c
        .node(id)
        .json(&["put", src.to_str().unwrap(), "--dataset", dataset]);
    v["snapshot"].as_str().unwrap().to_string()
}

/// `gc --all`: one report per member.
fn gc_all(c: &TestCluster, via: u64, dry_run: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["gc", "--all"];
    if dry_run {
        args.push("--dry-run");
    }
    let v = c.node(via).json(&args);
    let nodes = v["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 3, "{v}");
    nodes
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn get_matches(c: &TestCluster, via: u64, dataset: &str, snapshot: &str, want: &Path) {
    let out = c.dir.join(format!("get-{via}-{dataset}-{snapshot}"));
    c.node(via).ok(&[
        "get",
        "--dataset",
        dataset,
        "--snapshot",
        snapshot,
        out.to_str().unwrap(),
    ]);
    assert_same_tree(want, &out, false, &[]);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn deleted_data_is_freed_on_every_replica_while_puts_that_dedup_against_it_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [
        // Passes on demand only, and no grace period: the second pass after
        // a delete frees it. Puts are protected by their holds, not by time.
        ("BITCLONE_GC_INTERVAL", "0s"),
        ("BITCLONE_GC_GRACE", "0s"),
    ];
    let c = TestCluster::start_with_env(tmp.path(), 3, 3, &env);
    let (keep, gone, edited) = (
        tmp.path().join("keep"),
        tmp.path().join("gone"),
        tmp.path().join("edited"),
    );
    generate_tree(&keep, 1, 40, 0);
    let gone_bytes = generate_tree(&gone, 2, 40, 0);
    let keep_1 = put(&c, 1, &keep, "keep");
    // A second snapshot of `keep` with one big file (1-5 MiB) replaced.
    copy_tree(&keep, &edited);
    std::fs::write(
        edited.join("d3/s1/f10.bin"),
        random_bytes(&mut seeded(3), 3 << 20),
    )
    .unwrap();
    let keep_2 = put(&c, 2, &edited, "keep");
    let gone_1 = put(&c, 3, &gone, "gone");

    // Both live: nothing to free anywhere.
    for r in gc_all(&c, 1, false) {
        assert_eq!((n(&r, "freed"), n(&r, "waiting")), (0, 0), "{r}");
    }
    let before: Vec<u64> = gc_all(&c, 1, true)
        .iter()
        .map(|r| n(r, "store_bytes_after"))
        .collect();

    // The head cannot go behind a put's back: deleting keep's first
    // snapshot leaves the head; deleting `gone` leaves nothing of it.
    let d = c
        .node(1)
        .json(&["snapshot-delete", "--dataset", "keep", &keep_1]);
    assert_eq!(d["head"], keep_2.as_str(), "{d}");
    assert!(c
        .node(2)
        .fails(&["dataset-delete", "gone"])
        .contains("--yes"));
    let d = c.node(2).json(&["dataset-delete", "gone", "--yes"]);
    assert_eq!(d["deleted"][0], gone_1.as_str(), "{d}");
    assert_eq!(d["head"], "", "{d}");
    let e = c.node(3).fails(&[
        "get",
        "--dataset",
        "gone",
        tmp.path().join("nothing").to_str().unwrap(),
    ]);
    assert!(e.contains("not found"), "{e}");

    // Puts that share files with the deleted dataset (their chunks are
    // candidates now) run while passes go on.
    let racing = tmp.path().join("racing");
    copy_tree(&gone, &racing);
    let stop = AtomicBool::new(false);
    let mut racing_snapshots = Vec::new();
    let passes = std::thread::scope(|s| {
        let collector = s.spawn(|| {
            let mut passes = 0;
            while !stop.load(Ordering::Acquire) && passes < 60 {
                c.node(3).json(&["gc"]);
                passes += 1;
            }
            passes
        });
        for i in 0..4u64 {
            std::fs::write(
                racing.join(format!("own-{i}.bin")),
                random_bytes(&mut seeded(10 + i), 100 << 10),
            )
            .unwrap();
            let id = put(&c, 1 + i % 3, &racing, "racing");
            racing_snapshots.push((id, copy_of(&racing, tmp.path(), i)));
        }
        stop.store(true, Ordering::Release);
        collector.join().unwrap()
    });
    assert!(passes >= 1);

    // Two passes on every node: the first finds what is unreachable, the
    // second frees it; then the space is back on disk.
    gc_all(&c, 2, false);
    let after = gc_all(&c, 2, false);
    for (i, r) in after.iter().enumerate() {
        let (b, a) = (before[i], n(r, "store_bytes_after"));
        // The racing puts hold `gone`'s files again: what went is keep's
        // first snapshot's replaced file (1-5 MiB) and its pages (node 3
        // freed them during the race already).
        let id = n(r, "node");
        assert!(metric(&c, id, "bitclone_gc_freed_bytes_total") >= (1 << 20) as f64);
        assert!(metric(&c, id, "bitclone_gc_freed_snapshot_roots_total") >= 2.0);
        println!(
            "node {}: store {b} -> {a} bytes, freed {} chunks ({} bytes) in {:.2}s, {} examined",
            n(r, "node"),
            n(r, "freed"),
            n(r, "freed_bytes"),
            r["seconds"].as_f64().unwrap(),
            n(r, "examined")
        );
    }
    // What is kept reads back byte-identical through every node.
    for via in 1..=3 {
        get_matches(&c, via, "keep", &keep_2, &edited);
    }
    for (id, tree) in &racing_snapshots {
        get_matches(&c, 2, "racing", id, tree);
    }
    let e = c.node(1).fails(&[
        "get",
        "--dataset",
        "keep",
        "--snapshot",
        &keep_1,
        tmp.path().join("nothing").to_str().unwrap(),
    ]);
    assert!(e.contains("not found"), "{e}");
    // Deleting the racing dataset too frees `gone`'s bytes on every node.
    c.node(1).json(&["dataset-delete", "racing", "--yes"]);
    gc_all(&c, 1, false);
    let dry = gc_all(&c, 1, true);
    let last = gc_all(&c, 1, false);
    for ((d, r), b) in dry.iter().zip(&last).zip(&before) {
        assert_eq!(n(d, "freed"), n(r, "freed"), "the dry run said what goes");
        let a = n(r, "store_bytes_after");
        assert!(
            a + gone_bytes * 8 / 10 <= *b,
            "node {}: {b} bytes before, {a} after; the deleted tree held {gone_bytes}",
            n(r, "node")
        );
    }
    // Nothing left to free.
    for r in gc_all(&c, 3, false) {
        assert_eq!((n(&r, "freed"), n(&r, "waiting")), (0, 0), "{r}");
    }
}

#[test]
fn retention_keeps_what_the_policy_says_and_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("BITCLONE_RETENTION_EVERY", "200ms")];
    let c = TestCluster::start_with_env(tmp.path(), 3, 3, &env);
    let src = tmp.path().join("src");
    let mut ids = Vec::new();
    for i in 0..4u64 {
        generate_tree(&src, 20 + i, 5, 0);
        ids.push(put(&c, 1, &src, "r"));
    }
    let shown = c.node(2).json(&["retention", "r"]);
    assert_eq!(
        shown["would_delete"].as_array().unwrap().len(),
        0,
        "{shown}"
    );
    let set = c.node(2).json(&["retention", "r", "--keep-last", "2"]);
    assert_eq!(set["policy"]["keep_last"], 2, "{set}");
    c.wait_for("retention to delete the two oldest snapshots", 30, |c| {
        c.node(3).json(&["snapshots", "--dataset", "r"])["snapshots"]
            .as_array()
            .is_some_and(|s| s.len() == 2)
    });
    let left: Vec<String> = c.node(3).json(&["snapshots", "--dataset", "r"])["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, ids[2..]);
    let metrics = c.node(c.leader(1).unwrap()).http_get("/metrics").body;
    assert!(
        metrics.contains("bitclone_snapshots_expired_total 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("expired"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Cleared: nothing more goes.
    let cleared = c.node(1).json(&["retention", "r", "--clear"]);
    assert_eq!(cleared["policy"]["keep_last"], 0, "{cleared}");
}

/// An object-store target on the test's Garage, with its keys.
fn garage_target(
    g: &bitclone_chaos::servers::Garage,
    url: &str,
) -> bitclone_storage::sink::objects::Target {
    bitclone_storage::sink::objects::open_target(
        url,
        &bitclone_storage::sink::objects::S3Options {
            endpoint: Some(g.endpoint()),
            region: Some(g.region().into()),
            access_key_id: Some(g.access_key().into()),
            secret_access_key: Some(g.secret_key().into()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// A counter or gauge of node `id`'s `/metrics`.
fn metric(c: &TestCluster, id: u64, name: &str) -> f64 {
    let body = c.node(id).http_get("/metrics").body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("node {id} has no {name}"))
}

fn seeded(seed: u64) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A copy of `tree` as it is now, to compare a snapshot with later.
fn copy_of(tree: &Path, dir: &Path, i: u64) -> std::path::PathBuf {
    let to = dir.join(format!("copy-{i}"));
    copy_tree(tree, &to);
    to
}

#[test]
fn an_erased_tenant_leaves_no_key_in_any_store_nor_in_its_owned_sinks() {
    use bitclone_chaos::servers::{Garage, PgServer};
    assert!(
        Garage::available() && PgServer::available(),
        "garage or Postgres is missing: make test installs them"
    );
    let g = Garage::start();
    g.create_bucket("clones");
    let db = PgServer::start();
    db.create_database("catalog");
    let tmp = tempfile::tempdir().unwrap();
    // Both sinks owned: a tenant's objects (per tenant, under its own
    // prefix) and catalog rows go with it.
    let config = tmp.path().join("sinks.toml");
    std::fs::write(
        &config,
        format!(
            "[sinks.s3]\ntenants = [\"*\"]\nowned = true\n[sinks.s3.s3]\nbucket = \"clones\"\n\
             prefix = \"team\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\n\
             secret_access_key = \"{}\"\n\
             [sinks.pg]\ntenants = [\"*\"]\nowned = true\n[sinks.pg.postgres]\nurl = \"{}\"\n",
            g.endpoint(),
            g.region(),
            g.access_key(),
            g.secret_key(),
            db.url("catalog")
        ),
    )
    .unwrap();
    let mut c = TestCluster::start_with_env(
        tmp.path(),
        3,
        3,
        &[("BITCLONE_CONFIG", config.to_str().unwrap())],
    );
    let src = tmp.path().join("src");
    generate_tree(&src, 7, 30, 0);
    for tenant in ["acme", "other"] {
        c.node(1).ok(&["tenant", "create", tenant]);
        let t = ["--tenant", tenant];
        c.node(1)
            .ok(&[&t[..], &["put", src.to_str().unwrap(), "--dataset", "ds"]].concat());
        c.node(2).ok(&[
            &t[..],
            &[
                "clone",
                "--from",
                "snapshot://ds",
                "--to",
                "sink://s3/ds",
                "--to",
                "sink://pg",
                "--dataset",
                "ds",
                "--wait",
            ],
        ]
        .concat());
    }
    let rows = |tenant: &str| -> u64 {
        db.psql(
            "catalog",
            &format!(
                "SELECT (SELECT count(*) FROM bitclone_entries WHERE tenant = '{tenant}') \
                 + (SELECT count(*) FROM bitclone_datasets WHERE tenant = '{tenant}')"
            ),
        )
        .trim()
        .parse()
        .unwrap()
    };
    let objects_under = |prefix: &str| -> usize {
        let t = garage_target(&g, &format!("s3://clones/{prefix}"));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                use futures::TryStreamExt;
                t.store.list(Some(&t.prefix)).try_collect::<Vec<_>>().await
            })
            .unwrap()
            .len()
    };
    assert!(rows("acme") > 0 && objects_under("team/acme") > 0);

    assert!(c
        .node(3)
        .fails(&["tenant", "erase", "acme"])
        .contains("--yes"));
    let r = c.node(3).json(&["tenant", "erase", "acme", "--yes"]);
    println!("{r}");
    assert_eq!(
        (r["datasets"].as_u64(), r["jobs"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    let sinks = r["sinks"].as_array().unwrap();
    assert_eq!(sinks.len(), 2, "{r}");
    assert!(
        sinks.iter().all(|s| s["removed"].as_u64().unwrap() > 0),
        "{r}"
    );
    let nodes = r["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{r}");
    for n in nodes {
        assert_eq!(n["done"], true, "{r}");
        assert!(
            n["chunks"].as_u64().unwrap() > 0,
            "every node held a replica: {r}"
        );
    }
    // Gone from the sinks; the other tenant's data is all there.
    assert_eq!(objects_under("team/acme"), 0);
    assert_eq!(rows("acme"), 0);
    assert!(objects_under("team/other") > 0 && rows("other") > 0);
    // Gone from the cluster: its name is free again, with nothing in it.
    let e = c.node(1).fails(&["--tenant", "acme", "datasets"]);
    assert!(e.contains("not found"), "{e}");
    c.node(1).ok(&["tenant", "create", "acme"]);
    let ds = c.node(2).json(&["--tenant", "acme", "datasets"]);
    assert_eq!(ds["datasets"].as_array().unwrap().len(), 0, "{ds}");
    // A scan of every node's store finds no key of it, and the other's.
    let dirs: Vec<_> = (1..=3).map(|id| c.node_dir(id)).collect();
    for (_, node) in std::mem::take(&mut c.nodes) {
        node.stop();
    }
    for dir in dirs {
        let store = bitclone_storage::RocksStore::open(
            &dir.join("db"),
            &bitclone_storage::RocksOptions::default(),
        )
        .unwrap();
        assert_eq!(store.tenant_keys("acme").unwrap(), 0, "{}", dir.display());
        assert!(store.tenant_keys("other").unwrap() > 0);
    }
}

#[test]
fn a_scrub_finds_a_flipped_byte_and_repairs_it_from_a_replica() {
    let tmp = tempfile::tempdir().unwrap();
    // Scrubs only when asked, unpaced.
    let env = [
        ("BITCLONE_SCRUB_INTERVAL", "0s"),
        ("BITCLONE_SCRUB_RATE", "0"),
    ];
    let mut c = TestCluster::start_with_env(tmp.path(), 3, 3, &env);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Below the minimum chunk size: exactly one chunk.
    let data = random_bytes(&mut seeded(5), 200_000);
    std::fs::write(src.join("victim.bin"), &data).unwrap();
    put(&c, 1, &src, "scrubbed");
    c.wait_for("every replica to hold the snapshot", 30, |c| {
        c.node(1).json(&["stats"])["bytes_replicated"].as_u64() == Some(400_000)
    });
    let clean = c.node(2).json(&["scrub", "--all"]);
    for r in clean["nodes"].as_array().unwrap() {
        assert_eq!((n(r, "bad"), n(r, "repaired")), (0, 0), "{clean}");
        assert!(n(r, "chunks") >= 2, "the file and its page: {clean}");
    }
    // Flip a byte of the chunk in node 3's store (stopped, so it is flushed).
    c.nodes.remove(&3).unwrap().stop();
    let flipped = flip_in_files(
        &tmp.path().join("node-3/db"),
        &data[100_000..100_064],
        7,
        0x20,
    );
    assert!(flipped >= 1, "chunk bytes not found in node 3's store");
    c.start_node(3, &[]);
    c.wait_voters(3, 3);
    // Nobody read it: the scrub is what finds it, and mends it.
    let found = c.node(3).json(&["scrub"]);
    let r = &found["nodes"][0];
    assert_eq!(
        (n(r, "node"), n(r, "bad"), n(r, "repaired")),
        (3, 1, 1),
        "{found}"
    );
    assert!(r["unrepaired"].as_array().unwrap().is_empty(), "{found}");
    let again = c.node(3).json(&["scrub"]);
    assert_eq!(n(&again["nodes"][0], "bad"), 0, "{again}");
    assert!(metric(&c, 3, "bitclone_scrub_repaired_total") >= 1.0);
    let restore = tmp.path().join("restored");
    c.node(3)
        .ok(&["get", "--dataset", "scrubbed", restore.to_str().unwrap()]);
    assert_eq!(std::fs::read(restore.join("victim.bin")).unwrap(), data);
    assert!(c.node(3).log_text().contains("scrub found a bad chunk"));
}

#[test]
fn reconcile_finds_drift_in_s3_and_the_catalog_and_repairs_it() {
    use bitclone_chaos::jobs::restore_cli;
    use bitclone_chaos::servers::{Garage, PgServer};
    use object_store::{Attribute, AttributeValue, Attributes, ObjectStoreExt, PutOptions};
    assert!(
        Garage::available() && PgServer::available(),
        "garage or Postgres is missing: make test installs them"
    );
    let g = Garage::start();
    g.create_bucket("clones");
    let db = PgServer::start();
    db.create_database("catalog");
    let tmp = tempfile::tempdir().unwrap();
    let config = bitclone_chaos::jobs::sinks_config(
        tmp.path(),
        &g,
        &[("s3", "clones/team", g.secret_key())],
        &[("pg", &db.url("catalog"))],
    );
    // Scheduled reconcile jobs every second, reporting only.
    let node = TestNode::start_with(
        &tmp.path().join("n"),
        &[
            ("BITCLONE_CONFIG", &config),
            ("BITCLONE_RECONCILE_INTERVAL", "1s"),
        ],
    );
    let src = tmp.path().join("src");
    generate_tree(&src, 9, 30, 0);
    node.ok(&["put", src.to_str().unwrap(), "--dataset", "ds"]);
    let to = ["--to", "sink://s3/ds?mirror=true", "--to", "sink://pg"];
    let job = |extra: &[&str]| {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&to);
        args.extend_from_slice(&["--dataset", "ds", "--wait"]);
        node.cli(&args)
    };
    let clone = job(&["clone", "--from", "snapshot://ds"]);
    assert!(
        clone.status.success(),
        "{}",
        String::from_utf8_lossy(&clone.stderr)
    );
    // The leader schedules a reconcile of what that job wrote (the only
    // other job so far): it finds it whole.
    let clone_id = serde_json::from_slice::<serde_json::Value>(&clone.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let scheduled_ok = |node: &TestNode| {
        node.json(&["jobs"])["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] != clone_id.as_str() && j["state"] == "Succeeded")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !scheduled_ok(&node) {
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled reconcile succeeded"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let clean = job(&["reconcile", "--deep"]);
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );

    // Drift: one object gone, one rewritten by hand (no BLAKE3 metadata),
    // one with other bytes of its size under its old metadata (only a deep
    // reconcile sees it), one object the snapshot lacks, a catalog row changed.
    let s3 = garage_target(&g, "s3://clones/team/default/ds");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let loc = |p: &str| object_store::path::Path::from(format!("{}/{p}", s3.prefix));
    let (gone, bare, rotten) = ("d1/s1/f1.bin", "d2/s2/f2.bin", "d3/s0/f3.bin");
    rt.block_on(async {
        s3.store.delete(&loc(gone)).await.unwrap();
        s3.store
            .put(&loc(bare), b"by hand".to_vec().into())
            .await
            .unwrap();
        let old = std::fs::read(src.join(rotten)).unwrap();
        let mut rot = old.clone();
        rot[0] ^= 1;
        let mut attrs = Attributes::new();
        attrs.insert(
            Attribute::Metadata("blake3".into()),
            AttributeValue::from(blake3::hash(&old).to_hex().to_string()),
        );
        let opts = PutOptions {
            attributes: attrs,
            ..Default::default()
        };
        s3.store
            .put_opts(&loc(rotten), rot.into(), opts)
            .await
            .unwrap();
        s3.store
            .put(&loc("stray.txt"), b"stray".to_vec().into())
            .await
            .unwrap();
    });
    db.psql(
        "catalog",
        "UPDATE bitclone_entries SET mode = 0 WHERE path = 'd4/s1/f4.bin'",
    );

    let shallow = job(&["reconcile"]);
    assert!(!shallow.status.success());
    let e = String::from_utf8_lossy(&shallow.stderr);
    for found in [gone, bare, "stray.txt", "catalog"] {
        assert!(e.contains(found), "{found} not named: {e}");
    }
    assert!(
        !e.contains(rotten),
        "metadata alone cannot see {rotten}: {e}"
    );
    let deep = job(&["reconcile", "--deep"]);
    assert!(!deep.status.success());
    assert!(String::from_utf8_lossy(&deep.stderr).contains(rotten));

    let repair = job(&["reconcile", "--deep", "--repair"]);
    assert!(
        repair.status.success(),
        "{}",
        String::from_utf8_lossy(&repair.stderr)
    );
    let after = job(&["reconcile", "--deep"]);
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    // The sinks alone give the snapshot back, checked against the catalog.
    let out = tmp.path().join("restored");
    let r = restore_cli(
        &g,
        &[
            "--from",
            "s3://clones/team/default/ds",
            "--catalog",
            &db.url("catalog"),
            out.to_str().unwrap(),
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_same_tree(&src, &out, false, &[]);
    let m = node.http_get("/metrics").body;
    assert!(
        m.contains("bitclone_reconcile_repairs_total 2"),
        "{}",
        m.lines()
            .filter(|l| l.contains("reconcile"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_cold_tier_moves_old_chunks_to_garage_and_reads_them_back_verified() {
    use bitclone_chaos::servers::Garage;
    use bitclone_storage::{ChunkId, RocksOptions, RocksStore};
    use object_store::ObjectStoreExt;
    assert!(
        Garage::available(),
        "garage is missing: make test installs it"
    );
    let g = Garage::start();
    g.create_bucket("cold");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("cold.toml");
    // Chunks only snapshots older than 5 s reach move; passes on demand.
    std::fs::write(
        &config,
        format!(
            "[cold]\nurl = \"s3://cold/tier\"\nage = \"5s\"\ninterval = \"0s\"\n\
             [cold.s3]\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\n\
             secret_access_key = \"{}\"\n",
            g.endpoint(),
            g.region(),
            g.access_key(),
            g.secret_key(),
        ),
    )
    .unwrap();
    let env = [
        ("BITCLONE_CONFIG", config.to_str().unwrap()),
        ("BITCLONE_GC_INTERVAL", "0s"),
        ("BITCLONE_GC_GRACE", "0s"),
    ];
    let mut c = TestCluster::start_with_env(tmp.path(), 3, 3, &env);
    // The first snapshot has a file the second drops (`gone.bin`: reached
    // only by an old snapshot, it moves) and one both keep (`kept.bin`:
    // a young snapshot reaches it, it stays). Both smaller than a chunk.
    let mut rng = seeded(77);
    let (gone, kept) = (
        random_bytes(&mut rng, 90 << 10),
        random_bytes(&mut rng, 90 << 10),
    );
    let (v1, v2) = (tmp.path().join("v1"), tmp.path().join("v2"));
    generate_tree(&v1, 8, 30, 0);
    std::fs::write(v1.join("gone.bin"), &gone).unwrap();
    std::fs::write(v1.join("kept.bin"), &kept).unwrap();
    let s1 = put(&c, 1, &v1, "ds");
    std::thread::sleep(std::time::Duration::from_secs(6));
    copy_tree(&v1, &v2);
    std::fs::remove_file(v2.join("gone.bin")).unwrap();
    std::fs::write(v2.join("d1/s1/f1.bin"), b"edited").unwrap();
    let s2 = put(&c, 2, &v2, "ds");

    // One node (the dataset's first replica) packs; a second round makes
    // every node index the pack (a pass first catches up) and evict.
    let first: Vec<serde_json::Value> = c.node(1).json(&["tier", "--all"])["nodes"]
        .as_array()
        .unwrap()
        .clone();
    let packs: u64 = first.iter().map(|r| n(r, "packs")).sum();
    let moved: u64 = first.iter().map(|r| n(r, "chunks")).sum();
    assert_eq!(packs, 1, "{first:?}");
    assert!(
        moved >= 2,
        "gone.bin and the edited file's old chunks: {first:?}"
    );
    let second = c.node(2).json(&["tier", "--all"]);
    let nodes = second["nodes"].as_array().unwrap();
    assert!(
        nodes.iter().all(|r| n(r, "packs") == 0),
        "nothing left to move: {second}"
    );
    let written: f64 = (1..=3)
        .map(|id| metric(&c, id, "bitclone_cold_packs_written_total"))
        .sum();
    assert_eq!(written, 1.0);
    for id in 1..=3 {
        let evicted = metric(&c, id, "bitclone_cold_chunks_evicted_total");
        assert!(evicted >= 2.0, "node {id} evicted {evicted}");
    }

    // Offline, every node: gone.bin's chunk is no longer held locally, only
    // recorded in the pack (the bucket is the one copy); kept.bin's is.
    let dirs: Vec<_> = (1..=3).map(|id| c.node_dir(id)).collect();
    let (gone_id, kept_id) = (ChunkId::of(&gone), ChunkId::of(&kept));
    let check = |c: &mut TestCluster, moved: bool| {
        for (_, node) in std::mem::take(&mut c.nodes) {
            node.stop();
        }
        for dir in &dirs {
            let store = RocksStore::open(&dir.join("db"), &RocksOptions::default()).unwrap();
            assert!(
                !store.holds_locally("default", &gone_id).unwrap(),
                "{}",
                dir.display()
            );
            assert_eq!(
                store.cold_record("default", &gone_id).unwrap().is_some(),
                moved,
                "{}",
                dir.display()
            );
            assert!(store.holds_locally("default", &kept_id).unwrap());
            assert!(store.cold_record("default", &kept_id).unwrap().is_none());
        }
    };
    check(&mut c, true);
    for id in 1..=3 {
        c.start_node(id, &[]);
    }
    c.wait_voters(1, 3);

    // Reads through every node fetch evicted chunks back, byte-identical,
    // and each node counts them.
    for via in 1..=3 {
        get_matches(&c, via, "ds", &s1, &v1);
        get_matches(&c, via, "ds", &s2, &v2);
        assert!(metric(&c, via, "bitclone_cold_reads_total") >= 1.0);
        assert_eq!(metric(&c, via, "bitclone_cold_read_errors_total"), 0.0);
    }
    // A damaged pack: the read is refused, naming the chunk, not served.
    let bucket = garage_target(&g, "s3://cold/tier");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listed: Vec<object_store::path::Path> = rt.block_on(async {
        use futures::TryStreamExt;
        bucket
            .store
            .list(Some(&bucket.prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .unwrap()
    });
    assert_eq!(listed.len(), 1, "{listed:?}");
    let good = rt.block_on(async {
        bucket
            .store
            .get(&listed[0])
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    let at = good
        .windows(64)
        .position(|w| w == &gone[1000..1064])
        .expect("gone.bin is in the pack, as stored");
    let mut bad = good.to_vec();
    bad[at] ^= 1;
    rt.block_on(bucket.store.put(&listed[0], bad.into()))
        .unwrap();
    let out = tmp.path().join("damaged");
    let e = c.node(3).fails(&[
        "get",
        "--dataset",
        "ds",
        "--snapshot",
        &s1,
        out.to_str().unwrap(),
    ]);
    assert!(
        e.contains(&gone_id.to_hex()),
        "the error names the chunk: {e}"
    );
    rt.block_on(bucket.store.put(&listed[0], good.clone().into()))
        .unwrap();
    get_matches(&c, 3, "ds", &s1, &v1);

    // Deleting the old snapshot frees its cold chunks' records too.
    c.node(1).json(&["snapshot-delete", "--dataset", "ds", &s1]);
    for _ in 0..2 {
        gc_all(&c, 1, false);
    }
    get_matches(&c, 2, "ds", &s2, &v2);
    check(&mut c, false);
}
