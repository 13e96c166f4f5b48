#![allow(clippy::unwrap_used)]
//! Three (and four) real nodes on loopback forming a Raft cluster over
//! mutual TLS: formation, leader loss, join, removal, refused peers.

use std::time::{Duration, Instant};

use bitclone_chaos::*;

fn put_through(c: &TestCluster, id: u64, src: &std::path::Path, dataset: &str) -> String {
    let v = c
        .node(id)
        .json(&["put", src.to_str().unwrap(), "--dataset", dataset]);
    v["snapshot"].as_str().unwrap().to_string()
}

/// The leader nodes 1-3 all agree on (waited for: on a loaded machine a
/// late heartbeat may start an election).
fn agreed_leader(c: &TestCluster) -> u64 {
    c.wait_for("all nodes to agree on the leader", 30, |c| {
        let l = c.leader(1);
        l.is_some() && (2..=3).all(|id| c.leader(id) == l)
    });
    c.leader(1).unwrap()
}

/// `cluster remove ID` through node `via`, which must answer (within 60 s)
/// with success.
fn remove_through(c: &TestCluster, via: u64, id: u64) {
    let out = c
        .node(via)
        .cli_within(
            &["--json", "cluster", "remove", &id.to_string()],
            Duration::from_secs(60),
        )
        .expect("cluster remove answers");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cluster_forms_and_survives_the_loss_of_its_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(tmp.path(), 3, 3);
    let src = tmp.path().join("src");
    generate_tree(&src, 21, 10, 0);
    let leader = agreed_leader(&c);
    let st = c.status(2).unwrap();
    assert!(st["layout_version"].as_u64().unwrap() >= 1);
    assert_eq!(st["members"].as_array().unwrap().len(), 3);
    let mut snaps = Vec::new();
    for id in 1..=3 {
        snaps.push(put_through(&c, id, &src, &format!("via{id}")));
    }
    // Dataset pointers live in the replicated state: every node lists all three.
    for id in 1..=3 {
        let ds = c.node(id).json(&["datasets"]);
        let names: Vec<&str> = ds["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["via1", "via2", "via3"], "as seen by node {id}");
        let s = c.node(id).json(&["snapshots", "--dataset", "via1"]);
        assert_eq!(s["snapshots"][0]["id"], snaps[0].as_str());
    }
    // Chunks stay on the writer until the QUIC data plane; a read through
    // any node is served from the writer.
    for id in 1..=3 {
        let restore = tmp.path().join(format!("restore{id}"));
        c.node(id)
            .json(&["get", "--dataset", "via1", restore.to_str().unwrap()]);
        assert_same_tree(&src, &restore, true, &[]);
    }
    // A put through another node than the writer works too: the same tree
    // (stored again there, since chunks do not move yet) and a changed one.
    put_through(&c, 3, &src, "via1");
    let src2 = tmp.path().join("src2");
    generate_tree(&src2, 21, 10, 0);
    std::fs::write(src2.join("added.txt"), b"one more file").unwrap();
    let p = c
        .node(3)
        .json(&["put", src2.to_str().unwrap(), "--dataset", "via1"]);
    assert_eq!(p["files"], 11);

    let old_term = c.status(leader).unwrap()["term"].as_u64().unwrap();
    let killed = Instant::now();
    c.kill9(leader);
    let survivor = (1..=3).find(|n| *n != leader).unwrap();
    c.wait_for("a new leader", 30, |c| {
        c.leader(survivor).is_some_and(|l| l != leader)
    });
    let elected = killed.elapsed();
    let new_leader = c.leader(survivor).unwrap();
    let st = c.status(survivor).unwrap();
    assert!(st["term"].as_u64().unwrap() > old_term, "a new term begins");
    // A write through each survivor.
    for id in (1..=3).filter(|n| *n != leader) {
        put_through(&c, id, &src, &format!("after{id}"));
    }
    println!(
        "leader {leader} killed; node {new_leader} elected after {:.0} ms; first write ok after {:.0} ms",
        elected.as_secs_f64() * 1000.0,
        killed.elapsed().as_secs_f64() * 1000.0
    );

    // The killed node comes back on the same addresses and catches up.
    c.start_node(leader, &[]);
    c.wait_for("the old leader to rejoin as follower", 30, |c| {
        c.leader(leader) == Some(new_leader)
    });
}

#[test]
fn a_fourth_node_joins_and_gets_shards_then_a_removed_node_loses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(tmp.path(), 3, 4);
    let before = c.shard_load(1);
    assert_eq!(before.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    // Tenants get their own shard count; it can grow, never shrink.
    let t = c
        .node(2)
        .json(&["tenant", "create", "acme", "--shards", "4"]);
    assert!(t["layout_version"].as_u64().unwrap() > 0);
    let acme = c.status(1).unwrap()["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["tenant"] == "acme")
        .count();
    assert_eq!(acme, 4);
    let e = c
        .node(1)
        .fails(&["tenant", "grow", "acme", "--shards", "2"]);
    assert!(e.contains("only grow"), "{e}");
    c.join(4);
    c.wait_for("node 4 to hold shards", 30, |c| {
        c.shard_load(1).contains_key(&4)
    });
    let load = c.shard_load(4);
    assert_eq!(load.len(), 4, "{load:?}");
    let (lo, hi) = (load.values().min().unwrap(), load.values().max().unwrap());
    assert!(hi - lo <= 1, "balanced: {load:?}");

    let out = c.node(3).cli(&["--json", "cluster", "remove", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_for("node 2's shards to move away", 30, |c| {
        let l = c.shard_load(1);
        !l.contains_key(&2) && l.len() == 3
    });
    let st = c.status(1).unwrap();
    let ids: Vec<u64> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3, 4]);
    // Removing a node that is not a member is a clear error.
    let e = c.node(1).fails(&["cluster", "remove", "2"]);
    assert!(e.contains("not a member"), "{e}");
}

#[test]
fn peers_from_another_ca_or_with_unknown_ids_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start(tmp.path(), 3, 3);

    // A node whose certificate comes from another CA cannot join.
    let other = tmp.path().join("other-ca");
    dev_certs(bin(), &other, 4);
    let seed = c.node(1).endpoint.clone();
    let intruder = TestNode::spawn_opts(
        &tmp.path().join("intruder"),
        "127.0.0.1:0",
        &[
            "--node-id".into(),
            "4".into(),
            "--certs".into(),
            other.display().to_string(),
            "--join".into(),
            seed,
        ],
        &[],
        false,
    );
    c.wait_for("the intruder's join to fail", 30, |_| {
        let log = intruder.log_text();
        log.contains("join failed") || log.contains("was refused")
    });
    let st = c.status(1).unwrap();
    assert_eq!(st["members"].as_array().unwrap().len(), 3, "{st}");
    drop(intruder);

    // Raw peer RPCs: a valid certificate for an id that is not a member, a
    // certificate used to claim another id, a vote from a stale term (sent
    // as a build before the versions were on the wire would), and one from
    // a member two releases ahead.
    dev_certs(bin(), &tmp.path().join("certs"), 9);
    let leader = c.leader(1).unwrap();
    let peer_port = c.ports[&leader].1;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let vote_as = |cert_id: u64, from: u64, term: u64, protocol: (u32, u32)| {
        let certs = tmp.path().join("certs");
        rt.block_on(async move {
            bitclone_raft::tls::install_crypto_provider();
            let tls = bitclone_raft::tls::PeerTls::load(&certs, cert_id).unwrap();
            let ch = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{peer_port}"))
                .unwrap()
                .tls_config(tls.client_config(leader))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = bitclone_proto::internal::v1::peer_client::PeerClient::new(ch);
            let payload = format!(
                r#"{{"vote":{{"leader_id":{{"term":{term},"node_id":{from}}},"committed":false}},"last_log_id":null}}"#
            );
            client
                .vote(bitclone_proto::internal::v1::PeerMessage {
                    from,
                    payload: payload.into_bytes().into(),
                    protocol_min: protocol.0,
                    protocol_max: protocol.1,
                })
                .await
        })
    };
    let ours = bitclone_raft::protocol::PEER_PROTOCOL;
    let vote = |cert_id, from, term| vote_as(cert_id, from, term, (ours.min, ours.max));
    let unknown = vote(9, 9, 1_000).unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::PermissionDenied, "{unknown}");
    assert!(unknown.message().contains("not a member"), "{unknown}");
    let forged = vote(9, 3, 1_000).unwrap_err();
    assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged}");
    assert!(forged.message().contains("node-3"), "{forged}");
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let stale = vote(follower, follower, 0).unwrap().into_inner();
    let reply = String::from_utf8(stale.payload.to_vec()).unwrap();
    assert!(
        reply.contains("\"vote_granted\":false"),
        "stale-term vote must be refused: {reply}"
    );
    // The reply says which versions the leader speaks.
    assert_eq!(
        (stale.protocol_min, stale.protocol_max),
        (ours.min, ours.max)
    );
    // A build before 0.2.0 (no versions sent: v1) is two releases back.
    let behind = vote_as(follower, follower, 1_000, (0, 0)).unwrap_err();
    assert_eq!(behind.code(), tonic::Code::FailedPrecondition, "{behind}");
    let ahead = vote_as(follower, follower, 1_000, (ours.max + 1, ours.max + 2)).unwrap_err();
    assert_eq!(ahead.code(), tonic::Code::FailedPrecondition, "{ahead}");
    assert!(
        ahead.message().contains("upgrade one release at a time"),
        "{ahead}"
    );
    drop(rt);
    // The refused peers changed nothing: still three members and a leader.
    let st = c.status(1).unwrap();
    assert_eq!(st["members"].as_array().unwrap().len(), 3);
    assert!(st["leader"].as_u64().is_some());
}

#[test]
fn a_new_node_catches_up_from_a_snapshot_after_the_log_was_purged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c =
        TestCluster::start_with_env(tmp.path(), 3, 4, &[("BITCLONE_RAFT_SNAPSHOT_LOGS", "10")]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"small").unwrap();
    for i in 0..25 {
        put_through(&c, 1 + i % 3, &src, &format!("d{i:02}"));
    }
    c.wait_for("the leader to purge its log", 30, |c| {
        let l = c.leader(1).unwrap();
        c.status(l)
            .is_some_and(|s| s["purged_index"].as_u64().unwrap_or(0) > 0)
    });
    c.join(4);
    c.wait_for("node 4 to hold every dataset", 30, |c| {
        c.node(4).json(&["datasets"])["datasets"]
            .as_array()
            .map(|a| a.len())
            == Some(25)
    });
    let st = c.status(4).unwrap();
    assert!(
        st["snapshot_index"].as_u64().unwrap() > 0,
        "node 4 installed a snapshot: {st}"
    );
    // Restarted, a node rebuilds its state from its snapshot and log.
    c.kill9(2);
    c.start_node(2, &[]);
    c.wait_for("node 2 to serve its state again", 30, |c| {
        c.status(2).is_some_and(|s| s["leader"].as_u64().is_some())
            && c.node(2).json(&["datasets"])["datasets"]
                .as_array()
                .map(|a| a.len())
                == Some(25)
    });
}

#[test]
fn an_acknowledged_put_survives_its_writer_and_a_second_put_sends_no_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(tmp.path(), 3, 3);
    let src = tmp.path().join("src");
    let total = generate_tree(&src, seed(), 30, 1);
    let stats = |c: &TestCluster, id: u64| c.node(id).json(&["stats"]);
    put_through(&c, 1, &src, "rep");
    // Both other replicas receive every chunk (random data: no dedup); the
    // put returns once a majority has it, the third finishes in background.
    c.wait_for("both replicas to hold the snapshot", 30, |c| {
        stats(c, 1)["bytes_replicated"].as_u64() == Some(2 * total)
    });
    let sent = 2 * total;
    for id in 2..=3 {
        assert!(
            stats(&c, id)["chunks"].as_u64().unwrap() > 0,
            "node {id} holds chunks"
        );
    }
    // The same tree again: every chunk is already on every replica.
    put_through(&c, 1, &src, "rep");
    assert_eq!(stats(&c, 1)["bytes_replicated"].as_u64().unwrap(), sent);
    // The writer dies; the snapshot reads back from the replicas, and a
    // clone of it runs on a surviving replica.
    c.kill9(1);
    for id in 2..=3 {
        let restore = tmp.path().join(format!("r{id}"));
        c.node(id)
            .json(&["get", "--dataset", "rep", restore.to_str().unwrap()]);
        assert_same_tree(&src, &restore, true, &[]);
    }
    let out = tmp.path().join("clone");
    let job = c.node(2).json(&[
        "clone",
        "--from",
        "snapshot://rep",
        "--to",
        &file_url(&out),
        "--dataset",
        "rep",
        "--wait",
    ]);
    assert_eq!(job["state"], "Succeeded", "{job}");
    assert_same_tree(&src, &out, false, &[".bitclone"]);
}

#[test]
fn a_corrupt_chunk_on_one_replica_is_repaired_from_another_and_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(tmp.path(), 3, 3);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Below the minimum chunk size: exactly one chunk.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
    let data = random_bytes(&mut rng, 200_000);
    std::fs::write(src.join("victim.bin"), &data).unwrap();
    put_through(&c, 1, &src, "heal");
    c.wait_for("both replicas to hold the snapshot", 30, |c| {
        c.node(1).json(&["stats"])["bytes_replicated"].as_u64() == Some(400_000)
    });
    // Flip a byte of the chunk in node 2's store (stopped, so it is flushed).
    c.nodes.remove(&2).unwrap().stop();
    let flipped = flip_in_files(
        &tmp.path().join("node-2/db"),
        &data[100_000..100_064],
        7,
        0x20,
    );
    assert!(flipped >= 1, "chunk bytes not found in node 2's store");
    c.start_node(2, &[]);
    c.wait_voters(2, 3);
    for round in 0..2 {
        let restore = tmp.path().join(format!("r{round}"));
        c.node(2)
            .json(&["get", "--dataset", "heal", restore.to_str().unwrap()]);
        assert_eq!(std::fs::read(restore.join("victim.bin")).unwrap(), data);
    }
    let st = c.node(2).json(&["stats"]);
    assert_eq!(
        st["chunks_repaired"], 1,
        "repaired once, then served from the repaired copy: {st}"
    );
    assert!(c.node(2).log_text().contains("repaired from a replica"));
}

#[test]
fn repair_moves_data_to_new_replicas_after_a_join_and_a_removal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(tmp.path(), 3, 4);
    let src = tmp.path().join("src");
    let total = generate_tree(&src, seed(), 20, 1);
    put_through(&c, 1, &src, "rp");
    c.wait_for("both replicas to hold the snapshot", 30, |c| {
        c.node(1).json(&["stats"])["bytes_replicated"].as_u64() == Some(2 * total)
    });
    let settled = |c: &TestCluster| {
        c.status(1)
            .is_some_and(|s| s["previous_layout_version"].is_null())
    };
    c.join(4);
    c.wait_for("the layout with node 4 to take effect", 60, settled);
    let out = c.node(3).cli(&["--json", "cluster", "remove", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_for("the layout without node 2 to take effect", 60, |c| {
        settled(c) && !c.shard_load(1).contains_key(&2)
    });
    // Members 1, 3, 4 with R = 3 all hold every shard. Without the writer,
    // nodes 3 and 4 serve the snapshot from their own stores.
    c.kill9(1);
    c.kill9(2);
    for id in [3, 4] {
        let restore = tmp.path().join(format!("r{id}"));
        c.node(id)
            .json(&["get", "--dataset", "rp", restore.to_str().unwrap()]);
        assert_same_tree(&src, &restore, true, &[]);
        let st = c.node(id).json(&["stats"]);
        assert_eq!(st["chunks_repaired"], 0, "node {id} had every chunk: {st}");
    }
}

#[test]
fn a_removed_node_cannot_rejoin_until_an_admin_allows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(tmp.path(), 3, 3);
    let removed = c.node(1).json(&["cluster", "remove", "3"]);
    assert!(
        removed["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["id"] != 3),
        "{removed}"
    );
    c.kill9(3);
    let seed = c.node(1).endpoint.clone();
    let certs = tmp.path().join("certs").display().to_string();
    let args: Vec<String> = vec![
        "--node-id".into(),
        "3".into(),
        "--certs".into(),
        certs,
        "--join".into(),
        seed,
    ];
    // Its certificate is still valid, and it has the join token: refused.
    let mut again =
        TestNode::spawn_opts(&tmp.path().join("again"), "127.0.0.1:0", &args, &[], false);
    let status = again
        .wait_exit(Duration::from_secs(90))
        .expect("a refused join ends the node");
    assert!(!status.success());
    let log = again.log_text();
    assert!(log.contains("was removed from the cluster"), "{log}");
    assert_eq!(c.status(1).unwrap()["members"].as_array().unwrap().len(), 2);

    // Only an admin lets it back.
    let reader = tmp.path().join("reader.token");
    std::fs::write(&reader, c.node(1).token("default", "read,write")).unwrap();
    let out = c.node(1).cli_as(
        Some(reader.to_str().unwrap()),
        &["cluster", "allow-rejoin", "3"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
    c.node(1).json(&["cluster", "allow-rejoin", "3"]);
    let back = TestNode::spawn(&tmp.path().join("back"), "127.0.0.1:0", &args, &[]);
    c.wait_for("node 3 to be a voter again", 60, |c| c.is_voter(1, 3));
    drop(back);
}

#[test]
fn the_leader_removed_through_a_follower_leaves_and_the_others_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start(tmp.path(), 3, 3);
    let src = tmp.path().join("src");
    generate_tree(&src, 31, 6, 0);
    let leader = agreed_leader(&c);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // Bounded: the removal once waited forever on a proposal the removed
    // leader made after its own removal had committed.
    remove_through(&c, follower, leader);
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    c.wait_for("a new leader among the others", 30, |c| {
        others.iter().all(|id| {
            c.leader(*id)
                .is_some_and(|l| l != leader && others.contains(&l))
        })
    });
    let st = c.status(follower).unwrap();
    let ids: Vec<u64> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, others);
    let snap = put_through(&c, others[1], &src, "after");
    let out = tmp.path().join("out");
    c.node(others[0]).json(&[
        "get",
        "--dataset",
        "after",
        "--snapshot",
        &snap,
        out.to_str().unwrap(),
    ]);
    assert_same_tree(&src, &out, true, &[]);
}

#[test]
fn a_node_that_rejoins_with_an_empty_store_serves_what_it_wrote_from_the_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(tmp.path(), 4, 4);
    // Several datasets written through node 1: with 4 nodes and 3 replicas
    // some shards leave node 1 out once it is back, so repair never
    // brings those to it and a read there must come from the replicas.
    let mut puts = Vec::new();
    for k in 0..6 {
        let src = tmp.path().join(format!("src{k}"));
        generate_tree(&src, 40 + k, 5, 0);
        let ds = format!("mine{k}");
        let snap = put_through(&c, 1, &src, &ds);
        puts.push((src, ds, snap));
    }
    // Node 1 loses its disk. While it is still a voter, it may not join
    // again as itself: it may have forgotten a vote it cast.
    c.kill9(1);
    std::fs::remove_dir_all(c.node_dir(1)).unwrap();
    let seed = c.node(2).endpoint.clone();
    let mut early = TestNode::spawn_opts(
        &c.node_dir(1),
        "127.0.0.1:0",
        &[
            "--node-id".into(),
            "1".into(),
            "--certs".into(),
            tmp.path().join("certs").display().to_string(),
            "--join".into(),
            seed.clone(),
        ],
        &[],
        false,
    );
    let status = early.wait_exit(Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a voter that lost its state joined again: {status:?}"
    );
    let log = early.log_text();
    assert!(log.contains("is a voter already"), "{log}");
    std::fs::remove_dir_all(c.node_dir(1)).unwrap();
    // Removed and allowed back, it comes back as itself.
    remove_through(&c, 2, 1);
    c.node(2).json(&["cluster", "allow-rejoin", "1"]);
    c.start_node(1, &["--join".to_string(), seed]);
    c.wait_for("node 1 to be a voter again", 60, |c| c.is_voter(2, 1));
    for (src, ds, snap) in &puts {
        let out = tmp.path().join(format!("out-{ds}"));
        c.node(1).json(&[
            "get",
            "--dataset",
            ds,
            "--snapshot",
            snap,
            out.to_str().unwrap(),
        ]);
        assert_same_tree(src, &out, true, &[]);
    }
}
