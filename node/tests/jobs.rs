//! Job lifecycle against the real binary: retries with backoff resume from
//! the checkpoint, attempts run out, cancellation. Transient failures come
//! from the node's `BITCLONE_FAULT_EXPORT_FAILURES` test hook.

use bitclone_chaos::*;

fn small_tree(root: &std::path::Path) {
    generate_tree(root, 3, 12, 0);
}

#[test]
fn transient_failures_are_retried_and_the_job_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    small_tree(&src);
    let node = TestNode::start_with(
        &tmp.path().join("node"),
        &[
            ("BITCLONE_FAULT_EXPORT_FAILURES", "2"),
            ("BITCLONE_JOB_BACKOFF_BASE", "50ms"),
            ("BITCLONE_JOB_BACKOFF_MAX", "200ms"),
        ],
    );
    let out = tmp.path().join("out");
    let job = node.json(&[
        "clone",
        "--from",
        &file_url(&src),
        "--to",
        &file_url(&out),
        "--dataset",
        "r",
        "--wait",
    ]);
    assert_eq!(job["state"], "Succeeded", "{job}");
    assert_eq!(
        job["attempts"], 3,
        "two injected failures, then success: {job}"
    );
    assert_same_tree(&src, &out, false, &[".bitclone"]);
    // The source was ingested once; the retries reused the checkpointed snapshot.
    let snaps = node.json(&["snapshots", "--dataset", "r"]);
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1, "{snaps}");
    assert!(node.log_text().contains("job will retry"));
    node.stop();
}

#[test]
fn a_job_fails_with_its_last_error_after_max_attempts() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    small_tree(&src);
    let node = TestNode::start_with(
        &tmp.path().join("node"),
        &[
            ("BITCLONE_FAULT_EXPORT_FAILURES", "1000"),
            ("BITCLONE_JOB_BACKOFF_BASE", "10ms"),
            ("BITCLONE_JOB_BACKOFF_MAX", "40ms"),
        ],
    );
    let out = node.cli(&[
        "--json",
        "clone",
        "--from",
        &file_url(&src),
        "--to",
        &file_url(&tmp.path().join("o")),
        "--dataset",
        "f",
        "--wait",
        "--max-attempts",
        "3",
    ]);
    assert!(!out.status.success(), "a failed job must fail the command");
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "Failed", "{job}");
    assert_eq!(job["attempts"], 3);
    assert!(
        job["last_error"].as_str().unwrap().contains("injected"),
        "{job}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ended Failed"));
    node.stop();
}

#[test]
fn cancel_stops_a_job_waiting_to_retry_and_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    small_tree(&src);
    let data_dir = tmp.path().join("node");
    let env = [
        ("BITCLONE_FAULT_EXPORT_FAILURES", "1000"),
        ("BITCLONE_JOB_BACKOFF_BASE", "60s"),
        ("BITCLONE_JOB_BACKOFF_MAX", "60s"),
    ];
    let node = TestNode::start_with(&data_dir, &env);
    let id = node
        .ok(&[
            "clone",
            "--from",
            &file_url(&src),
            "--to",
            &file_url(&tmp.path().join("o")),
            "--dataset",
            "c",
        ])
        .trim()
        .to_string();
    // Wait (bounded) for the first attempt to fail and the job to wait for its retry.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let j = node.json(&["job", &id]);
        if j["attempts"] == 1 && j["state"] == "Pending" {
            // The configured backoff (60 s, equal jitter: at least 30 s) is
            // the cluster's now, not the 1 s default.
            let wait = j["next_attempt_unix_ms"].as_i64().unwrap()
                - j["updated_unix_ms"].as_i64().unwrap();
            assert!(wait >= 30_000, "retry in {wait} ms: {j}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job never failed its first attempt: {j}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let j = node.json(&["cancel", &id]);
    assert_eq!(j["state"], "Cancelled", "{j}");
    // Watching a finished job returns at once with its final state.
    let w = node.json(&["job", &id, "--watch"]);
    assert_eq!(w["state"], "Cancelled");
    // A second cancel changes nothing.
    assert_eq!(node.json(&["cancel", &id])["state"], "Cancelled");
    node.stop();
    let node = TestNode::start_with(&data_dir, &env);
    assert_eq!(node.json(&["job", &id])["state"], "Cancelled");
    assert!(node
        .fails(&["job", "0123456789abcdef"])
        .contains("not found"));
    node.stop();
}
