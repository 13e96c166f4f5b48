//! Clone jobs in a 3-node cluster: leases, takeover when the holder dies,
//! fencing of a holder that was paused past its lease.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bitclone_chaos::*;

/// Holds each destination write back so the job is certainly running when
/// the test acts on it.
const SLOW_SINK: (&str, &str) = ("BITCLONE_FAULT_EXPORT_DELAY_MS", "3000");

fn job(c: &TestCluster, via: u64, id: &str) -> Option<serde_json::Value> {
    let out = c.nodes.get(&via)?.cli(&["--json", "job", id]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn submit(
    c: &TestCluster,
    via: u64,
    src: &std::path::Path,
    out: &std::path::Path,
    ds: &str,
) -> String {
    c.node(via)
        .ok(&[
            "clone",
            "--from",
            &file_url(src),
            "--to",
            &file_url(out),
            "--dataset",
            ds,
        ])
        .trim()
        .to_string()
}

fn wait_holder(c: &TestCluster, via: u64, id: &str, not: Option<u64>) -> u64 {
    let mut holder = 0;
    c.wait_for("a lease holder", 60, |c| {
        let j = job(c, via, id);
        holder = j
            .as_ref()
            .filter(|j| j["state"] == "Running")
            .and_then(|j| j["lease_holder"].as_u64())
            .unwrap_or(0);
        holder != 0 && Some(holder) != not
    });
    holder
}

#[test]
fn killing_the_lease_holder_hands_the_job_to_another_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start_with_env(tmp.path(), 3, 3, &[SLOW_SINK]);
    let src = tmp.path().join("src");
    generate_tree(&src, seed(), 40, 1);
    let out = tmp.path().join("out");
    let id = submit(&c, 1, &src, &out, "kj");
    let holder = wait_holder(&c, 1, &id, None);
    let via = (1..=3).find(|n| *n != holder).unwrap();
    let killed = Instant::now();
    c.kill9(holder);
    let next = wait_holder(&c, via, &id, Some(holder));
    println!(
        "node {holder} (lease holder) killed; node {next} took the lease after {:.0} ms",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    c.wait_for("the job to succeed", 90, |c| {
        job(c, via, &id).is_some_and(|j| j["state"] == "Succeeded")
    });
    let j = job(&c, via, &id).unwrap();
    assert!(j["fencing_token"].as_u64().unwrap() >= 2, "{j}");
    assert_same_tree(&src, &out, false, &[".bitclone"]);
}

#[test]
fn a_paused_holder_is_fenced_when_it_wakes() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start_with_env(tmp.path(), 3, 3, &[SLOW_SINK]);
    let src = tmp.path().join("src");
    generate_tree(&src, 8, 20, 0);
    let out = tmp.path().join("out");
    let id = submit(&c, 1, &src, &out, "pj");
    let holder = wait_holder(&c, 1, &id, None);
    let via = (1..=3).find(|n| *n != holder).unwrap();
    let pid = c.node(holder).pid().to_string();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    // The lease lapses; another replica takes the job and finishes it.
    let next = wait_holder(&c, via, &id, Some(holder));
    c.wait_for("the job to succeed elsewhere", 90, |c| {
        job(c, via, &id).is_some_and(|j| j["state"] == "Succeeded")
    });
    let done = job(&c, via, &id).unwrap();
    signal("-CONT");
    // The woken holder tries to go on with its stale lease and is refused.
    c.wait_for("the stale holder's commit to be rejected", 60, |c| {
        c.node(holder).log_text().contains("commit rejected")
    });
    std::thread::sleep(Duration::from_millis(500));
    let after = job(&c, via, &id).unwrap();
    assert_eq!(after["state"], "Succeeded");
    assert_eq!(
        after["fencing_token"], done["fencing_token"],
        "nothing moved after the finish"
    );
    assert!(
        done["fencing_token"].as_u64().unwrap() >= 2,
        "node {next} took over with a new token: {done}"
    );
    assert_same_tree(&src, &out, false, &[".bitclone"]);
}

#[test]
fn a_running_job_is_cancelled_from_another_node() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start_with_env(tmp.path(), 3, 3, &[SLOW_SINK]);
    let src = tmp.path().join("src");
    generate_tree(&src, 9, 5, 0);
    let id = submit(&c, 1, &src, &tmp.path().join("out"), "cj");
    let holder = wait_holder(&c, 1, &id, None);
    let other = (1..=3).find(|n| *n != holder).unwrap();
    let j = c.node(other).json(&["cancel", &id]);
    assert!(j["state"] == "Running" || j["state"] == "Cancelled", "{j}");
    c.wait_for("the job to end Cancelled", 60, |c| {
        job(c, other, &id).is_some_and(|j| j["state"] == "Cancelled")
    });
    let j = job(&c, holder, &id).unwrap();
    assert!(j["lease_holder"].is_null(), "the lease is released: {j}");
}

/// `bitclone drain` as a preStop hook runs it (`TestNode::drain_within`:
/// the node's own settings from the environment, its id and data dir; the
/// harness gives the endpoint, which a pod's config would).
fn drain(c: &TestCluster, id: u64) -> serde_json::Value {
    let out = c
        .node(id)
        .drain_within(id, Duration::from_secs(60))
        .expect("the drain ends within 60 s");
    assert!(
        out.status.success(),
        "drain of node {id} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_drained_node_hands_its_job_over_without_a_failed_attempt_and_its_leadership_away() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TestCluster::start_with_env(tmp.path(), 3, 3, &[SLOW_SINK]);
    let src = tmp.path().join("src");
    generate_tree(&src, 11, 30, 0);
    let out = tmp.path().join("out");
    let id = submit(&c, 1, &src, &out, "dj");
    let holder = wait_holder(&c, 1, &id, None);
    let other = (1..=3).find(|n| *n != holder).unwrap();
    // A drain meant for one node and sent to another is refused.
    let wrong = c
        .node(other)
        .drain_within(holder, Duration::from_secs(60))
        .expect("the refusal comes within 60 s");
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not node"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    let d = drain(&c, holder);
    println!("drained the lease holder, node {holder}: {d}");
    assert_eq!(d["jobs_handed_off"], 1, "{d}");
    assert_eq!(d["jobs_still_running"], 0, "{d}");
    assert_eq!(d["complete"], true, "{d}");
    // Not ready, and says why.
    let ready = c.node(holder).http_get("/readyz");
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.contains("drained"), "{ready:?}");
    c.wait_for("the job to succeed on another node", 90, |c| {
        job(c, other, &id).is_some_and(|j| j["state"] == "Succeeded")
    });
    let j = job(&c, other, &id).unwrap();
    assert_eq!(j["attempts"], 1, "the hand-off cost no attempt: {j}");
    assert_eq!(j["last_error"], "", "{j}");
    assert!(j["fencing_token"].as_u64().unwrap() >= 2, "taken over: {j}");
    assert_same_tree(&src, &out, false, &[".bitclone"]);
    // The drained node takes no new job.
    let out2 = tmp.path().join("out2");
    let id2 = submit(&c, other, &src, &out2, "dj2");
    let second = wait_holder(&c, other, &id2, None);
    assert_ne!(second, holder, "a drained node took a new job");

    // Leadership: the holder handed it on if it led; otherwise drain the
    // leader too, and another voter leads.
    let mut drained = vec![holder];
    if d["was_leader"] == true {
        assert_eq!(d["leadership_moved"], true, "{d}");
        assert_ne!(d["leader"], holder, "{d}");
    } else {
        let leader = c.leader(other).unwrap();
        let d = drain(&c, leader);
        println!("drained the leader, node {leader}: {d}");
        assert_eq!(d["was_leader"], true, "{d}");
        assert_eq!(d["leadership_moved"], true, "{d}");
        assert_ne!(d["leader"], leader, "{d}");
        drained.push(leader);
    }
    let survivor = (1..=3).find(|n| !drained.contains(n)).unwrap();
    c.wait_for("a leader other than the drained nodes", 30, |c| {
        c.leader(survivor).is_some_and(|l| !drained.contains(&l))
    });
    // The cluster still takes writes.
    c.node(survivor)
        .ok(&["put", src.to_str().unwrap(), "--dataset", "after-drain"]);
}
