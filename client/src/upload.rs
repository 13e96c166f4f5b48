//! `Client::upload_dir`: walk a local tree, skip what the parent snapshot
//! already has, stream the rest.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bitclone_proto::v1::upload_request::{self, Msg};
use bitclone_proto::v1::{EntryBatch, EntryKind, EntryMeta, FileBatch, FileData, UploadRequest};
use bitclone_proto::{BATCH_BYTES, BATCH_ENTRIES, DATA_FRAME_BYTES, SMALL_FILE_BYTES};
use futures::{Stream, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::{blocking, Client, Error, Progress, Result, UploadSummary};

/// Requests queued between the file reader and the gRPC stream: bounds the
/// memory an upload holds to a few data frames.
const UPLOAD_QUEUE: usize = 8;

/// One directory or regular file found under the upload root.
#[derive(Debug, Clone)]
pub(crate) struct LocalEntry {
    /// Path relative to the root, `/`-separated.
    pub(crate) rel: String,
    /// Path on the local filesystem.
    pub(crate) abs: PathBuf,
    pub(crate) kind: EntryKind,
    /// File length; 0 for directories and links.
    pub(crate) size: u64,
    /// A symbolic link's target.
    pub(crate) target: Option<String>,
    /// Permission bits (`& 0o7777`).
    pub(crate) mode: u32,
    pub(crate) mtime_ns: i64,
}

impl LocalEntry {
    fn new(rel: String, abs: PathBuf, kind: EntryKind, metadata: &std::fs::Metadata) -> Self {
        let size = match kind {
            EntryKind::File => metadata.len(),
            EntryKind::Dir | EntryKind::Symlink => 0,
        };
        LocalEntry {
            rel,
            abs,
            kind,
            size,
            target: None,
            mode: metadata.permissions().mode() & 0o7777,
            mtime_ns: metadata
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(metadata.mtime_nsec()),
        }
    }

    fn meta(&self) -> EntryMeta {
        EntryMeta {
            path: self.rel.clone(),
            kind: self.kind as i32,
            size: self.size,
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            target: self.target.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// Whether a link target stays inside the tree, by the node's rule
/// (`storage::path::validate_symlink`): relative, `..` only as a prefix and
/// no more of them than the link's depth, so it can never climb out, not
/// even through another link.
pub(crate) fn link_stays_inside(rel: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    let depth = rel.split('/').count() - 1;
    let (mut ups, mut descended) = (0, false);
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if descended => return false,
            ".." => {
                ups += 1;
                if ups > depth {
                    return false;
                }
            }
            _ => descended = true,
        }
    }
    true
}

/// The result of walking an upload root.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    /// Directories, regular files and links, sorted by `rel`.
    pub(crate) entries: Vec<LocalEntry>,
    /// Special files and links leading out of the tree, sorted.
    pub(crate) skipped: Vec<String>,
}

/// Walks `root` (not following symbolic links). The root itself is not an
/// entry. Blocking.
pub(crate) fn walk_tree(root: &Path) -> Result<Tree> {
    let mut tree = Tree::default();
    let mut pending: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, dir_rel)) = pending.pop() {
        let listing = std::fs::read_dir(&dir).map_err(|source| Error::io(&dir, source))?;
        for item in listing {
            let item = item.map_err(|source| Error::io(&dir, source))?;
            let abs = item.path();
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                return Err(Error::invalid_path(
                    abs.to_string_lossy(),
                    "file name is not valid UTF-8",
                ));
            };
            let rel = if dir_rel.is_empty() {
                name.to_owned()
            } else {
                format!("{dir_rel}/{name}")
            };
            let metadata =
                std::fs::symlink_metadata(&abs).map_err(|source| Error::io(&abs, source))?;
            let file_type = metadata.file_type();
            if file_type.is_dir() {
                tree.entries.push(LocalEntry::new(
                    rel.clone(),
                    abs.clone(),
                    EntryKind::Dir,
                    &metadata,
                ));
                pending.push((abs, rel));
            } else if file_type.is_file() {
                tree.entries
                    .push(LocalEntry::new(rel, abs, EntryKind::File, &metadata));
            } else if file_type.is_symlink() {
                let target = std::fs::read_link(&abs).map_err(|source| Error::io(&abs, source))?;
                let Some(target) = target.to_str().map(str::to_owned) else {
                    return Err(Error::invalid_path(
                        abs.to_string_lossy(),
                        "symbolic link target is not valid UTF-8",
                    ));
                };
                if link_stays_inside(&rel, &target) {
                    let mut entry = LocalEntry::new(rel, abs, EntryKind::Symlink, &metadata);
                    entry.target = Some(target);
                    tree.entries.push(entry);
                } else {
                    tracing::warn!(path = %rel, %target, "skipping a symbolic link that leads out of the tree");
                    tree.skipped.push(rel);
                }
            } else {
                tracing::warn!(path = %rel, "skipping a special file (socket, device or pipe)");
                tree.skipped.push(rel);
            }
        }
    }
    tree.entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    tree.skipped.sort();
    Ok(tree)
}

/// A regular file the parent snapshot has with the same size, mtime and
/// mode: sent as `Unchanged`, not read.
pub(crate) fn is_unchanged(entry: &LocalEntry, parent: &HashMap<String, EntryMeta>) -> bool {
    entry.kind == EntryKind::File
        && parent.get(&entry.rel).is_some_and(|old| {
            old.kind == EntryKind::File as i32
                && old.size == entry.size
                && old.mtime_ns == entry.mtime_ns
                && old.mode == entry.mode
        })
}

/// What the producer hands to the request stream.
enum Frame {
    Msg(UploadRequest),
    /// Everything was sent: end the request stream normally.
    End,
}

/// The request stream of the `Upload` call. It ends only on an explicit
/// [`Frame::End`]: if the producer goes away without one (IO error,
/// cancelled call) the stream stays pending instead of ending, so the node
/// never sees a complete-looking upload; dropping the call then resets the
/// HTTP/2 stream and the node commits nothing.
fn request_stream(rx: mpsc::Receiver<Frame>) -> impl Stream<Item = UploadRequest> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Some(Frame::Msg(request)) => Some((request, rx)),
            Some(Frame::End) => None,
            None => {
                futures::future::pending::<()>().await;
                None
            }
        }
    })
}

/// Hands `msg` to the request stream; false when the call is gone.
async fn send(tx: &mpsc::Sender<Frame>, msg: Msg) -> bool {
    tx.send(Frame::Msg(UploadRequest { msg: Some(msg) }))
        .await
        .is_ok()
}

/// Fills `buf` from `file` unless the file ends first; returns the bytes read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Small files read at once (each group in one blocking task).
const READ_GROUPS_IN_FLIGHT: usize = 4;

/// Reads a group of small files whole. Blocking.
fn read_group(group: Vec<LocalEntry>) -> Result<Vec<FileData>> {
    group
        .into_iter()
        .map(|entry| {
            let data = std::fs::read(&entry.abs).map_err(|source| Error::io(&entry.abs, source))?;
            Ok(FileData {
                meta: Some(entry.meta()),
                data: data.into(),
            })
        })
        .collect()
}

/// Sends one large file as `FileStart`, data frames, `FileEnd`.
async fn send_streamed(
    tx: &mpsc::Sender<Frame>,
    entry: &LocalEntry,
    progress: &dyn Progress,
) -> Result<bool> {
    let mut file = tokio::fs::File::open(&entry.abs)
        .await
        .map_err(|source| Error::io(&entry.abs, source))?;
    if !send(tx, Msg::FileStart(entry.meta())).await {
        return Ok(false);
    }
    loop {
        let mut frame = vec![0u8; DATA_FRAME_BYTES];
        let n = read_full(&mut file, &mut frame)
            .await
            .map_err(|source| Error::io(&entry.abs, source))?;
        if n == 0 {
            break;
        }
        frame.truncate(n);
        if !send(tx, Msg::Data(frame.into())).await {
            return Ok(false);
        }
        progress.advance(n as u64);
        if n < DATA_FRAME_BYTES {
            break;
        }
    }
    Ok(send(tx, Msg::FileEnd(upload_request::FileEnd {})).await)
}

/// Sends the whole upload. `Ok(true)`: every request including the end was
/// handed over; `Ok(false)`: the call went away first (its result tells
/// why); `Err`: a local file could not be read. Directories, links and
/// unchanged files go first, many to a message; then small files, read
/// several groups at a time and sent many to a message; then large files,
/// streamed.
async fn produce(
    tx: &mpsc::Sender<Frame>,
    begin: upload_request::Begin,
    entries: &[LocalEntry],
    parent: &HashMap<String, EntryMeta>,
    progress: &dyn Progress,
) -> Result<bool> {
    if !send(tx, Msg::Begin(begin)).await {
        return Ok(false);
    }
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut listed = Vec::new();
    for entry in entries {
        match entry.kind {
            EntryKind::File if !is_unchanged(entry, parent) => {
                if entry.size <= SMALL_FILE_BYTES {
                    small.push(entry.clone());
                } else {
                    large.push(entry);
                }
            }
            _ => listed.push(entry.meta()),
        }
    }
    for batch in listed.chunks(BATCH_ENTRIES) {
        let msg = Msg::Entries(EntryBatch {
            entries: batch.to_vec(),
        });
        if !send(tx, msg).await {
            return Ok(false);
        }
    }
    let mut groups: Vec<Vec<LocalEntry>> = Vec::new();
    let mut group_bytes = 0u64;
    for entry in small {
        let full = groups.last().is_none_or(|g| {
            group_bytes + entry.size > BATCH_BYTES as u64 || g.len() >= BATCH_ENTRIES
        });
        if full {
            groups.push(Vec::new());
            group_bytes = 0;
        }
        group_bytes += entry.size;
        if let Some(g) = groups.last_mut() {
            g.push(entry);
        }
    }
    let mut reads = futures::stream::iter(groups)
        .map(|group| blocking(move || read_group(group)))
        .buffered(READ_GROUPS_IN_FLIGHT);
    while let Some(files) = reads.next().await {
        let files = files?;
        let n: u64 = files.iter().map(|f| f.data.len() as u64).sum();
        if !send(tx, Msg::Files(FileBatch { files })).await {
            return Ok(false);
        }
        progress.advance(n);
    }
    for entry in large {
        if !send_streamed(tx, entry, progress).await? {
            return Ok(false);
        }
    }
    Ok(tx.send(Frame::End).await.is_ok())
}

pub(crate) async fn upload_dir(
    client: &Client,
    dataset: &str,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<UploadSummary> {
    let started = Instant::now();
    let metadata = tokio::fs::metadata(dir)
        .await
        .map_err(|source| Error::io(dir, source))?;
    if !metadata.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }

    progress.message("reading the latest snapshot");
    let mut parent = HashMap::new();
    let read = client
        .for_each_entry(dataset, None, |entry| {
            // Only files can be sent as unchanged.
            if entry.kind == EntryKind::File as i32 {
                parent.insert(entry.path.clone(), entry);
            }
        })
        .await;
    let (parent_id, parent_pages) = match read {
        Ok((info, counts)) => (info.id, counts),
        // NotFound: a new dataset. Unavailable: the latest snapshot's
        // manifest is held by another node; upload everything and let the
        // node compare-and-set on whatever the head is.
        Err(Error::Status(status))
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::Unavailable
            ) =>
        {
            parent.clear();
            (String::new(), Default::default())
        }
        Err(error) => return Err(error),
    };

    progress.message("scanning");
    let root = dir.to_path_buf();
    let tree = blocking(move || walk_tree(&root)).await?;
    let to_send: u64 = tree
        .entries
        .iter()
        .filter(|entry| entry.kind == EntryKind::File && !is_unchanged(entry, &parent))
        .map(|entry| entry.size)
        .sum();
    progress.set_total(to_send);
    progress.message("uploading");

    let begin = upload_request::Begin {
        tenant: client.tenant().to_owned(),
        dataset: dataset.to_owned(),
        parent: parent_id,
        chunking: None,
    };
    let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
    let mut grpc = client.current_grpc();
    let mut rpc = std::pin::pin!(async move { grpc.upload(request_stream(rx)).await });
    let mut producer = std::pin::pin!(produce(&tx, begin, &tree.entries, &parent, progress));

    // The producer runs alongside the call. A local IO error returns at
    // once: dropping `rpc` cancels the call (the request stream never ended
    // cleanly), so the node commits nothing.
    let mut produced: Option<bool> = None;
    let answer = loop {
        tokio::select! {
            biased;
            result = &mut producer, if produced.is_none() => {
                produced = Some(result?);
            }
            answer = &mut rpc => break answer,
        }
    };
    let response = answer.map_err(Error::Status)?.into_inner();
    if produced != Some(true) {
        return Err(Error::protocol(
            "the node answered the upload before it was complete",
        ));
    }

    Ok(UploadSummary {
        snapshot: response.snapshot,
        files: response.files,
        bytes: response.bytes,
        new_chunks: response.new_chunks,
        new_bytes: response.new_bytes,
        chunks: response.chunks,
        unchanged_files: response.unchanged_files,
        symlinks: response.symlinks,
        new_pages: response.new_pages,
        new_page_bytes: response.new_page_bytes,
        parent_pages,
        skipped: tree.skipped,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rels(tree: &Tree) -> Vec<&str> {
        tree.entries
            .iter()
            .map(|entry| entry.rel.as_str())
            .collect()
    }

    #[test]
    fn walk_is_sorted_and_keeps_links_inside_the_tree() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir_all(root.path().join("a/c"))?;
        std::fs::create_dir(root.path().join("empty"))?;
        std::fs::write(root.path().join("a/b.txt"), b"bee")?;
        std::fs::write(root.path().join("a/c/d.txt"), b"dee")?;
        std::fs::write(root.path().join("top.txt"), b"hello")?;
        std::fs::write(root.path().join("a.txt"), b"")?;
        std::os::unix::fs::symlink("top.txt", root.path().join("link"))?;
        std::os::unix::fs::symlink("../../etc/passwd", root.path().join("a/out"))?;

        let tree = walk_tree(root.path())?;
        assert_eq!(
            rels(&tree),
            [
                "a",
                "a.txt",
                "a/b.txt",
                "a/c",
                "a/c/d.txt",
                "empty",
                "link",
                "top.txt"
            ]
        );
        assert_eq!(tree.skipped, ["a/out"]);

        let kinds: Vec<EntryKind> = tree.entries.iter().map(|entry| entry.kind).collect();
        use EntryKind::{Dir, File, Symlink};
        assert_eq!(kinds, [Dir, File, File, Dir, File, Dir, Symlink, File]);
        assert_eq!(tree.entries[6].target.as_deref(), Some("top.txt"));
        let top = tree
            .entries
            .iter()
            .find(|entry| entry.rel == "top.txt")
            .expect("top.txt listed");
        assert_eq!(top.size, 5);
        assert_eq!(top.abs, root.path().join("top.txt"));
        assert!(top.mtime_ns > 0);
        assert_eq!(top.mode & !0o7777, 0);
        Ok(())
    }

    #[test]
    fn walk_of_missing_root_is_an_io_error() {
        let result = walk_tree(Path::new("/nonexistent/bitclone-test-root"));
        assert!(matches!(result, Err(Error::Io { .. })));
    }

    #[test]
    fn unchanged_needs_same_size_mtime_and_mode() {
        let entry = LocalEntry {
            rel: "x/y.bin".into(),
            abs: PathBuf::from("/tmp/x/y.bin"),
            kind: EntryKind::File,
            size: 10,
            mode: 0o644,
            mtime_ns: 1_700_000_000_123_456_789,
            target: None,
        };
        let mut parent = HashMap::new();
        assert!(!is_unchanged(&entry, &parent));

        parent.insert(entry.rel.clone(), entry.meta());
        assert!(is_unchanged(&entry, &parent));

        for change in [
            EntryMeta {
                size: 11,
                ..entry.meta()
            },
            EntryMeta {
                mtime_ns: 1,
                ..entry.meta()
            },
            EntryMeta {
                mode: 0o600,
                ..entry.meta()
            },
            EntryMeta {
                kind: EntryKind::Dir as i32,
                ..entry.meta()
            },
        ] {
            parent.insert(entry.rel.clone(), change);
            assert!(!is_unchanged(&entry, &parent));
        }
    }

    #[tokio::test]
    async fn stream_ends_only_on_end_frame() {
        use futures::StreamExt;
        use std::time::Duration;

        // Explicit end: the stream yields the messages and ends.
        let (tx, rx) = mpsc::channel(4);
        let mut stream = Box::pin(request_stream(rx));
        assert!(send(&tx, Msg::FileEnd(upload_request::FileEnd {})).await);
        assert!(tx.send(Frame::End).await.is_ok());
        assert!(stream.next().await.is_some());
        assert!(stream.next().await.is_none());

        // Producer gone without an end: the stream must not end.
        let (tx, rx) = mpsc::channel::<Frame>(4);
        let mut stream = Box::pin(request_stream(rx));
        drop(tx);
        let next = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(next.is_err(), "stream ended without an End frame");
    }
}
