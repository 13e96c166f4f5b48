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
