#![allow(clippy::unwrap_used)]
//! Bad input gets a clear error and changes nothing.

use bitclone_chaos::*;
use bitclone_proto::v1 as pb;

mod raw;
use pb::upload_request::Msg;

fn msg(m: Msg) -> pb::UploadRequest {
    pb::UploadRequest { msg: Some(m) }
}

fn begin(dataset: &str) -> pb::UploadRequest {
    msg(Msg::Begin(pb::upload_request::Begin {
        tenant: "default".into(),
        dataset: dataset.into(),
        parent: String::new(),
        chunking: None,
        in_path_order: true,
    }))
}

fn file_meta(path: &str, size: u64) -> pb::EntryMeta {
    pb::EntryMeta {
        path: path.into(),
        kind: pb::EntryKind::File as i32,
        size,
        mode: 0o644,
        mtime_ns: 1,
        ..Default::default()
    }
}

async fn raw_upload(
    node: &TestNode,
    reqs: Vec<pb::UploadRequest>,
) -> Result<pb::UploadResponse, tonic::Status> {
    let mut c = raw::connect(raw::target(node)).await;
    c.upload(futures::stream::iter(reqs))
        .await
        .map(|r| r.into_inner())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn traversal_paths_and_oversized_frames_are_refused_and_commit_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let node = TestNode::start(&tmp.path().join("node"));
    let rt = rt();
    for bad in ["../escape", "/etc/passwd", "a/../../b", "a\0b", "./x", ""] {
        let err = rt
            .block_on(raw_upload(
                &node,
                vec![
                    begin("evil"),
                    msg(Msg::FileStart(file_meta(bad, 3))),
                    msg(Msg::Data(b"abc".to_vec().into())),
                    msg(Msg::FileEnd(pb::upload_request::FileEnd {})),
                ],
            ))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err}");
        assert!(
            err.message().contains("invalid path"),
            "{bad:?}: {}",
            err.message()
        );
    }
    // A directory entry with a traversal path is refused the same way.
    let err = rt
        .block_on(raw_upload(
            &node,
            vec![
                begin("evil"),
                msg(Msg::Dir(pb::EntryMeta {
                    kind: pb::EntryKind::Dir as i32,
                    ..file_meta("..", 0)
                })),
            ],
        ))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Entries out of path order, or twice, also when a batch of files
    // (ingested on the pool) is followed by an earlier entry.
    let dir = |path: &str| pb::EntryMeta {
        kind: pb::EntryKind::Dir as i32,
        ..file_meta(path, 0)
    };
    let files = |paths: &[&str]| {
        msg(Msg::Files(pb::FileBatch {
            files: paths
                .iter()
                .map(|p| pb::FileData {
                    meta: Some(file_meta(p, 3)),
                    data: b"abc".to_vec().into(),
                })
                .collect(),
        }))
    };
    let entries = |paths: &[&str]| {
        msg(Msg::Entries(pb::EntryBatch {
            entries: paths.iter().map(|p| dir(p)).collect(),
        }))
    };
    for (case, reqs) in [
        ("reversed", vec![entries(&["b", "a"])]),
        ("twice", vec![entries(&["a"]), entries(&["a"])]),
        (
            "after a file batch",
            vec![files(&["m/1", "m/2"]), entries(&["a"])],
        ),
        ("inside a file batch", vec![files(&["x", "w"])]),
    ] {
        let mut all = vec![begin("evil")];
        all.extend(reqs);
        let err = rt.block_on(raw_upload(&node, all)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{case}: {err}");
        assert!(
            err.message().contains("path order") || err.message().contains("appears twice"),
            "{case}: {}",
            err.message()
        );
    }

    // A client that does not send entries in path order (older ones did
    // not) is refused at the start, before it sends any data.
    let err = rt
        .block_on(raw_upload(
            &node,
            vec![msg(Msg::Begin(pb::upload_request::Begin {
                tenant: "default".into(),
                dataset: "evil".into(),
                ..Default::default()
            }))],
        ))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("upgrade"), "{err}");

    // A frame over the 4 MiB message limit.
    let err = rt
        .block_on(raw_upload(
            &node,
            vec![
                begin("evil"),
                msg(Msg::FileStart(file_meta("big", 5 << 20))),
                msg(Msg::Data(vec![0u8; 5 << 20].into())),
                msg(Msg::FileEnd(pb::upload_request::FileEnd {})),
            ],
        ))
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::Internal
        ),
        "oversized frame: {err}"
    );
    assert!(err.message().to_lowercase().contains("message"), "{err}");

    // An upload must start with begin; bad names are refused.
    let err = rt
        .block_on(raw_upload(&node, vec![msg(Msg::Dir(file_meta("x", 0)))]))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = rt
        .block_on(raw_upload(&node, vec![begin("no/slash")]))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Idle client connections would hold up the node's graceful shutdown.
    drop(rt);

    // Nothing of the above was committed.
    let ds = node.json(&["datasets"]);
    assert_eq!(ds["datasets"].as_array().unwrap().len(), 0, "{ds}");
    assert!(node
        .fails(&["snapshots", "--dataset", "evil"])
        .contains("not found"));

    // The node still works afterwards.
    let src = tmp.path().join("ok");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"fine").unwrap();
    node.json(&["put", src.to_str().unwrap(), "--dataset", "ok"]);
    node.stop();
}

#[test]
fn unknown_dataset_snapshot_and_unreadable_sources_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let node = TestNode::start(&tmp.path().join("node"));
    let dest = tmp.path().join("restore");
    let e = node.fails(&["get", "--dataset", "nope", dest.to_str().unwrap()]);
    assert!(e.contains("dataset nope not found"), "{e}");
    assert!(!dest.join("f").exists());

    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    node.json(&["put", src.to_str().unwrap(), "--dataset", "real"]);
    let missing = "0".repeat(64);
    let e = node.fails(&[
        "get",
        "--dataset",
        "real",
        "--snapshot",
        &missing,
        dest.to_str().unwrap(),
    ]);
    assert!(e.contains("not found"), "{e}");
    let e = node.fails(&[
        "get",
        "--dataset",
        "real",
        "--snapshot",
        "zzz",
        dest.to_str().unwrap(),
    ]);
    assert!(e.contains("not a 64-digit hex"), "{e}");

    // Put of a directory that does not exist.
    let e = node.fails(&["put", "/nonexistent/bitclone-src", "--dataset", "real"]);
    assert!(e.contains("/nonexistent/bitclone-src"), "{e}");

    // A clone job whose source cannot be read fails with the path in its
    // error (a missing directory inside the allowed root: one outside is
    // refused at submit).
    let missing = tmp.path().join("nonexistent-src");
    let out = node.cli(&[
        "--json",
        "clone",
        "--from",
        &file_url(&missing),
        "--to",
        &file_url(&tmp.path().join("o")),
        "--dataset",
        "real",
        "--wait",
    ]);
    assert!(!out.status.success());
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "Failed");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("nonexistent-src"),
        "{job}"
    );
    assert_eq!(
        job["attempts"], 1,
        "a missing source is permanent: no retries"
    );

    // Malformed URLs are refused at submit time.
    let e = node.fails(&[
        "clone",
        "--from",
        "ftp://x/y",
        "--to",
        "file:///tmp/x",
        "--dataset",
        "real",
    ]);
    assert!(e.contains("supported sources"), "{e}");
    let e = node.fails(&[
        "clone",
        "--from",
        "snapshot://real",
        "--to",
        "sink://bucket/p?bogus=1",
        "--dataset",
        "real",
    ]);
    assert!(e.contains("unknown option bogus=1"), "{e}");
    let e = node.fails(&[
        "clone",
        "--from",
        "snapshot://real",
        "--to",
        "mysql://h/db",
        "--dataset",
        "real",
    ]);
    assert!(e.contains("supported: sink://, file://"), "{e}");

    // The dataset is untouched by all of this.
    let snaps = node.json(&["snapshots", "--dataset", "real"]);
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1);
    node.stop();
}

/// Flips one byte of a stored chunk on disk: reads must fail naming the chunk.
#[test]
fn corrupted_chunk_is_an_error_naming_the_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("node");
    let node = TestNode::start(&data_dir);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // One file below the minimum chunk size is exactly one chunk.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(99);
    let data = random_bytes(&mut rng, 200_000);
    std::fs::write(src.join("victim.bin"), &data).unwrap();
    std::fs::write(src.join("other.txt"), b"unharmed").unwrap();
    node.json(&["put", src.to_str().unwrap(), "--dataset", "c"]);
    // A clean stop flushes the chunk from the WAL into a blob file.
    node.stop();

    let flipped = flip_in_files(&data_dir.join("db"), &data[100_000..100_064], 10, 0x55);
    assert!(flipped >= 1, "chunk bytes not found on disk");

    let node = TestNode::start(&data_dir);
    let dest = tmp.path().join("restore");
    let e = node.fails(&["get", "--dataset", "c", dest.to_str().unwrap()]);
    let chunk = blake3::hash(&data).to_hex().to_string();
    assert!(
        e.contains(&format!("chunk {chunk}")),
        "error must name the chunk {chunk}: {e}"
    );
    assert!(e.contains("corrupt"), "{e}");
    assert!(
        !dest.join("victim.bin").exists(),
        "a corrupt file must not be written"
    );
    node.stop();
}

#[test]
fn oversized_requests_are_refused_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let node = TestNode::start(&tmp.path().join("node"));
    let entries: Vec<pb::EntryMeta> = (0..1025)
        .map(|i| pb::EntryMeta {
            path: format!("d{i:05}"),
            kind: pb::EntryKind::Dir as i32,
            mode: 0o755,
            ..Default::default()
        })
        .collect();
    let err = rt()
        .block_on(raw_upload(
            &node,
            vec![begin("big"), msg(Msg::Entries(pb::EntryBatch { entries }))],
        ))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("at most 1024"), "{err:?}");
    let out = tmp.path().join("out");
    let mut args: Vec<String> = ["clone", "--from", "snapshot://x", "--dataset", "x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for i in 0..17 {
        args.push("--to".into());
        args.push(file_url(&out.join(i.to_string())));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = node.fails(&args);
    assert!(e.contains("at most 16"), "{e}");
    let long = file_url(&out.join("x".repeat(3000)));
    let e = node.fails(&[
        "clone",
        "--from",
        "snapshot://x",
        "--to",
        &long,
        "--dataset",
        "x",
    ]);
    assert!(e.contains("at most 2048"), "{e}");
    assert!(node.json(&["datasets"])["datasets"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(node.json(&["jobs"])["jobs"].as_array().unwrap().is_empty());
}
