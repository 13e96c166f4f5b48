#![allow(clippy::unwrap_used)]
//! Datasets shaped like real ones: many small files, symbolic links,
//! incremental puts whose cost follows what changed, and uploads that stall.

use std::time::Duration;

use bitclone_chaos::*;
use bitclone_proto::v1 as pb;

mod raw;
use pb::upload_request::Msg;

/// Files in the large test (the 200,000; `BITCLONE_TEST_FILES`
/// overrides for a quicker local run).
fn file_count() -> usize {
    std::env::var("BITCLONE_TEST_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn many_small_files_put_incrementally_replicate_what_changed_and_survive_the_writer() {
    let tmp = tempdir_for_many_files();
    let mut c = TestCluster::start(tmp.path(), 3, 3);
    let (seed, files) = (seed(), file_count());
    let src = tmp.path().join("src");
    let total = generate_small_files(&src, seed, files);

    let first = c
        .node(1)
        .json(&["put", src.to_str().unwrap(), "--dataset", "imgs"]);
    assert_eq!(num(&first, "files"), files as u64);
    assert_eq!(num(&first, "bytes"), total);
    assert_eq!(num(&first, "symlinks"), (2 * (files / 1000)) as u64 - 1);
    assert!(num(&first, "new_pages") > 1, "{first}");
    // Random contents: nothing dedups, every byte goes to both replicas.
    let stats = |c: &TestCluster, id: u64| c.node(id).json(&["stats"]);
    let (data1, pages1) = (num(&first, "new_bytes"), num(&first, "new_page_bytes"));
    c.wait_for("both replicas to hold the first snapshot", 120, |c| {
        let s = stats(c, 1);
        num(&s, "bytes_replicated") == 2 * data1 && num(&s, "page_bytes_replicated") == 2 * pages1
    });

    // 0.1% of the files edited, a few added and deleted.
    edit_small_files(&src, seed, files, files / 1000, 5, 5);
    let second = c
        .node(1)
        .json(&["put", src.to_str().unwrap(), "--dataset", "imgs"]);
    let changed = num(&second, "new_bytes") + num(&second, "new_page_bytes");
    assert!(
        changed * 50 < data1 + pages1,
        "the second put stored {changed} bytes, the first {}: {second}",
        data1 + pages1
    );
    assert!(
        num(&second, "unchanged_files") >= (files - files / 500) as u64,
        "{second}"
    );
    // The client compared against the parent through its page cache.
    assert!(num(&second, "parent_pages_fetched") > 0, "{second}");
    let (data2, pages2) = (num(&second, "new_bytes"), num(&second, "new_page_bytes"));
    c.wait_for("both replicas to hold the second snapshot", 120, |c| {
        let s = stats(c, 1);
        num(&s, "bytes_replicated") == 2 * (data1 + data2)
            && num(&s, "page_bytes_replicated") == 2 * (pages1 + pages2)
    });
    // A third put of the same tree.
    let third = c
        .node(1)
        .json(&["put", src.to_str().unwrap(), "--dataset", "imgs"]);
    // Only the second snapshot's own new pages are fetched; the rest come
    // from the client's page cache.
    assert_eq!(num(&third, "new_bytes"), 0, "{third}");
    assert!(
        num(&third, "parent_pages_fetched") <= num(&second, "new_pages"),
        "{third}"
    );
    assert!(num(&third, "parent_pages_cached") > 0, "{third}");

    // Read back through another node, links included.
    let out2 = tmp.path().join("out2");
    let got = c
        .node(2)
        .json(&["get", "--dataset", "imgs", out2.to_str().unwrap()]);
    assert_eq!(num(&got, "symlinks"), num(&first, "symlinks"));
    assert_same_tree(&src, &out2, true, &[]);
    assert_eq!(
        std::fs::read_link(out2.join("class001/previous")).unwrap(),
        std::path::Path::new("../class000/img0000999.bin")
    );
    // The writer dies after the acknowledgement; a survivor serves it all.
    c.kill9(1);
    let out3 = tmp.path().join("out3");
    c.node(3)
        .json(&["get", "--dataset", "imgs", out3.to_str().unwrap()]);
    assert_same_tree(&src, &out3, true, &[]);
}

fn msg(m: Msg) -> pb::UploadRequest {
    pb::UploadRequest { msg: Some(m) }
}

fn begin(dataset: &str) -> pb::UploadRequest {
    msg(Msg::Begin(pb::upload_request::Begin {
        tenant: "default".into(),
        dataset: dataset.into(),
        in_path_order: true,
        ..Default::default()
    }))
}

#[test]
fn stalled_uploads_hold_no_cpu_thread_and_end_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cpu_threads = 1;
    let node = TestNode::spawn(
        &tmp.path().join("node"),
        "127.0.0.1:0",
        &["--cpu-threads".into(), cpu_threads.to_string()],
        &[("BITCLONE_UPLOAD_IDLE_TIMEOUT", "15s")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    // `cpu_threads + 1` uploads that stop in the middle of a file; their
    // senders stay open, so the node sees a client that went quiet.
    let mut stalled = Vec::new();
    let mut senders = Vec::new();
    for i in 0..=cpu_threads {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let start = [
            begin(&format!("stalled{i}")),
            msg(Msg::FileStart(pb::EntryMeta {
                path: "big.bin".into(),
                size: 100 << 20,
                mode: 0o644,
                ..Default::default()
            })),
            msg(Msg::Data(vec![7u8; 1 << 20].into())),
        ];
        for m in start {
            tx.try_send(m).unwrap();
        }
        senders.push(tx);
        let target = raw::target(&node);
        stalled.push(rt.spawn(async move {
            let mut c = raw::connect(target).await;
            c.upload(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        }));
    }
    // Every stalled upload's first messages have left its stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while senders.iter().any(|tx| tx.capacity() < 8) {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled uploads never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A small put and `stats` still finish while those hang.
    let src = tmp.path().join("src");
    generate_small_files(&src, seed(), 300);
    let put = node.json(&["put", src.to_str().unwrap(), "--dataset", "small"]);
    assert_eq!(num(&put, "files"), 300);
    node.json(&["stats"]);
    assert!(
        stalled.iter().all(|h| !h.is_finished()),
        "the stalled uploads ended before the small put finished"
    );

    for h in stalled {
        let err = rt.block_on(h).unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
        assert!(err.message().contains("sent nothing for 15s"), "{err}");
    }
    drop(senders);
    let datasets = node.json(&["datasets"]).to_string();
    assert!(datasets.contains("small"), "{datasets}");
    assert!(
        !datasets.contains("stalled"),
        "a stalled upload committed: {datasets}"
    );
}

#[test]
fn links_leading_out_of_the_tree_and_names_that_are_not_utf8_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let node = TestNode::start(&tmp.path().join("node"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    for target in ["../../etc/passwd", "/etc/passwd", "a/../../../x", ""] {
        let err = rt
            .block_on(async {
                let mut c = raw::connect(raw::target(&node)).await;
                c.upload(futures::stream::iter(vec![
                    begin("evil"),
                    msg(Msg::Symlink(pb::EntryMeta {
                        path: "d/link".into(),
                        kind: pb::EntryKind::Symlink as i32,
                        target: target.into(),
                        ..Default::default()
                    })),
                ]))
                .await
            })
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{target:?}: {err}"
        );
        assert!(err.message().contains("d/link"), "{target:?}: {err}");
    }

    // The CLI leaves a link out of the tree out (and says so), and keeps
    // the ones inside.
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"file").unwrap();
    std::os::unix::fs::symlink("f", src.join("d/inside")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("d/outside")).unwrap();
    let put = node.json(&["put", src.to_str().unwrap(), "--dataset", "links"]);
    assert_eq!(put["skipped"], serde_json::json!(["d/outside"]), "{put}");
    assert_eq!(num(&put, "symlinks"), 1);

    // A name that is not UTF-8: a clear error naming it, nothing committed.
    use std::os::unix::ffi::OsStrExt;
    let bad = src.join(std::ffi::OsStr::from_bytes(b"bad-\xff.bin"));
    std::fs::write(&bad, b"x").unwrap();
    let err = node.fails(&["put", src.to_str().unwrap(), "--dataset", "latin1"]);
    assert!(
        err.contains("not valid UTF-8") && err.contains("bad-"),
        "{err}"
    );
    let datasets = node.json(&["datasets"]).to_string();
    assert!(
        !datasets.contains("latin1") && !datasets.contains("evil"),
        "{datasets}"
    );
}

#[test]
fn a_damaged_manifest_page_is_refused_and_repaired_from_a_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = TestCluster::start(tmp.path(), 3, 3);
    let src = tmp.path().join("src");
    generate_small_files(&src, seed(), 2000);
    let put = c
        .node(1)
        .json(&["put", src.to_str().unwrap(), "--dataset", "pages"]);
    let pages = num(&put, "new_page_bytes");
    c.wait_for("both replicas to hold the pages", 60, |c| {
        num(&c.node(1).json(&["stats"]), "page_bytes_replicated") == 2 * pages
    });
    // Flip a byte of one entry's path in node 2's copy of its page (leaf
    // pages of ~64 entries are blobs, stored as written; stopped, so flushed).
    c.nodes.remove(&2).unwrap().stop();
    let needle = b"class001/img0001234.bin";
    let flipped = flip_in_files(&tmp.path().join("node-2/db"), needle, 12, 0x01);
    assert_eq!(flipped, 1, "the page was not found once in node 2's store");
    c.start_node(2, &[]);
    c.wait_voters(2, 3);
    // Never served: node 2 refuses its copy, repairs it, and serves the tree.
    let out = tmp.path().join("out");
    c.node(2)
        .json(&["get", "--dataset", "pages", out.to_str().unwrap()]);
    assert_same_tree(&src, &out, true, &[]);
    let st = c.node(2).json(&["stats"]);
    assert_eq!(num(&st, "chunks_repaired"), 1, "{st}");
    assert!(c.node(2).log_text().contains("manifest page bad here"));
}
