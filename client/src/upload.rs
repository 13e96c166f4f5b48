//! `Client::upload_dir`: walk a local tree, skip what the parent snapshot
//! already has, stream the rest.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bitclone_proto::v1::upload_request::{self, Msg};
use bitclone_proto::v1::{EntryBatch, EntryKind, EntryMeta, FileBatch, FileData, UploadRequest};
use bitclone_proto::{BATCH_BYTES, BATCH_ENTRIES, DATA_FRAME_BYTES, SMALL_FILE_BYTES};
use futures::{FutureExt, Stream, StreamExt};
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

/// What a directory holds, in walk order.
enum Visit {
    Entry(LocalEntry),
    /// A special file or a link leading out of the tree.
    Skip(String),
    /// A subdirectory's contents (after its own entry, and after siblings
    /// whose names sort before `name/`).
    Descend(PathBuf, String),
}

/// Directories with more children than this are statted by several threads.
const PARALLEL_STAT_MIN: usize = 256;
/// Threads that stat one large directory.
const STAT_THREADS: usize = 4;

/// Stats one child of a directory (not following links).
fn visit(dir: &Path, dir_rel: &str, name: std::ffi::OsString) -> Result<Vec<(String, Visit)>> {
    let abs = dir.join(&name);
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
    let metadata = std::fs::symlink_metadata(&abs).map_err(|source| Error::io(&abs, source))?;
    let file_type = metadata.file_type();
    let key = name.to_owned();
    Ok(if file_type.is_dir() {
        vec![
            (
                key.clone(),
                Visit::Entry(LocalEntry::new(
                    rel.clone(),
                    abs.clone(),
                    EntryKind::Dir,
                    &metadata,
                )),
            ),
            (key + "/", Visit::Descend(abs, rel)),
        ]
    } else if file_type.is_file() {
        vec![(
            key,
            Visit::Entry(LocalEntry::new(rel, abs, EntryKind::File, &metadata)),
        )]
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
            vec![(key, Visit::Entry(entry))]
        } else {
            tracing::warn!(path = %rel, %target, "skipping a symbolic link that leads out of the tree");
            vec![(key, Visit::Skip(rel))]
        }
    } else {
        tracing::warn!(path = %rel, "skipping a special file (socket, device or pipe)");
        vec![(key, Visit::Skip(rel))]
    })
}

/// Lists and stats a directory's children, sorted so that walking them
/// depth first yields paths in byte order (the manifest's order): a
/// subdirectory's contents sort as `name/`, after a sibling `name.txt`.
fn list_dir(dir: &Path, dir_rel: &str) -> Result<Vec<Visit>> {
    let names = std::fs::read_dir(dir)
        .map_err(|source| Error::io(dir, source))?
        .map(|item| {
            item.map(|item| item.file_name())
                .map_err(|source| Error::io(dir, source))
        })
        .collect::<Result<Vec<_>>>()?;
    let stat = |names: Vec<std::ffi::OsString>| -> Result<Vec<(String, Visit)>> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.extend(visit(dir, dir_rel, name)?);
        }
        Ok(out)
    };
    let mut visits = if names.len() < PARALLEL_STAT_MIN {
        stat(names)?
    } else {
        let per = names.len().div_ceil(STAT_THREADS);
        let mut parts = Vec::new();
        let mut names = names.into_iter();
        loop {
            let part: Vec<_> = names.by_ref().take(per).collect();
            if part.is_empty() {
                break;
            }
            parts.push(part);
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| scope.spawn(move || stat(part)))
                .collect();
            let mut out = Vec::new();
            for handle in handles {
                let part = handle
                    .join()
                    .map_err(|_| Error::protocol("a directory scan thread panicked"))??;
                out.extend(part);
            }
            Ok::<_, Error>(out)
        })?
    };
    visits.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(visits.into_iter().map(|(_, v)| v).collect())
}

/// Walks `root` (not following symbolic links) depth first, handing each
/// directory, regular file and link to `each` in path order; the root
/// itself is not an entry. Memory holds one directory listing per level,
/// not the tree. `each` returns false to stop. Returns the paths skipped
/// (special files, links leading out of the tree). Blocking.
pub(crate) fn walk_tree(
    root: &Path,
    each: &mut dyn FnMut(LocalEntry) -> bool,
) -> Result<Vec<String>> {
    let mut skipped = Vec::new();
    let mut stack = vec![list_dir(root, "")?.into_iter()];
    while let Some(top) = stack.last_mut() {
        match top.next() {
            None => {
                stack.pop();
            }
            Some(Visit::Entry(entry)) => {
                if !each(entry) {
                    break;
                }
            }
            Some(Visit::Skip(rel)) => skipped.push(rel),
            Some(Visit::Descend(abs, rel)) => stack.push(list_dir(&abs, &rel)?.into_iter()),
        }
    }
    Ok(skipped)
}

/// The parent snapshot's entries, read forward (they arrive page by page in
/// path order) as the walk asks about paths in the same order.
struct ParentCursor {
    pages: Option<mpsc::Receiver<Vec<EntryMeta>>>,
    page: std::vec::IntoIter<EntryMeta>,
    next: Option<EntryMeta>,
}

impl ParentCursor {
    fn new(pages: Option<mpsc::Receiver<Vec<EntryMeta>>>) -> Self {
        ParentCursor {
            pages,
            page: Vec::new().into_iter(),
            next: None,
        }
    }

    /// The parent's entry for `rel` (which comes after every path asked
    /// before). Blocking: waits for the parent's pages.
    fn find(&mut self, rel: &str) -> Option<&EntryMeta> {
        loop {
            if self.next.as_ref().is_some_and(|e| e.path.as_str() >= rel) {
                break;
            }
            self.next = self.page.next();
            if self.next.is_none() {
                match self.pages.as_mut().and_then(|rx| rx.blocking_recv()) {
                    Some(page) => self.page = page.into_iter(),
                    None => {
                        self.pages = None;
                        return None;
                    }
                }
            }
        }
        self.next.as_ref().filter(|e| e.path == rel)
    }
}

/// A regular file the parent snapshot has with the same size, mtime and
/// mode: sent as `Unchanged`, not read.
fn is_unchanged(entry: &LocalEntry, old: Option<&EntryMeta>) -> bool {
    entry.kind == EntryKind::File
        && old.is_some_and(|old| {
            old.kind == EntryKind::File as i32
                && old.size == entry.size
                && old.mtime_ns == entry.mtime_ns
                && old.mode == entry.mode
        })
}

/// What the walk hands to the producer.
enum Walked {
    Entry(LocalEntry, bool),
    /// The walk is complete; the paths it skipped.
    Done(Vec<String>),
    Failed(Error),
}

/// Walks `root` into `tx`, each entry marked unchanged or not against the
/// parent's entries from `parent`. Blocking.
fn walk_into(
    root: &Path,
    parent: Option<mpsc::Receiver<Vec<EntryMeta>>>,
    tx: mpsc::Sender<Walked>,
) {
    let mut parent = ParentCursor::new(parent);
    let walked = walk_tree(root, &mut |entry| {
        let unchanged = is_unchanged(&entry, parent.find(&entry.rel));
        tx.blocking_send(Walked::Entry(entry, unchanged)).is_ok()
    });
    let _ = tx.blocking_send(match walked {
        Ok(skipped) => Walked::Done(skipped),
        Err(error) => Walked::Failed(error),
    });
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

/// Messages being prepared (small files being read), sent in the order
/// they were queued.
struct Ordered<'a> {
    tx: &'a mpsc::Sender<Frame>,
    progress: &'a dyn Progress,
    queue: futures::stream::FuturesOrdered<futures::future::BoxFuture<'static, Result<(Msg, u64)>>>,
}

impl Ordered<'_> {
    /// Sends the oldest message. False when the call is gone.
    async fn send_one(&mut self) -> Result<bool> {
        let Some(next) = self.queue.next().await else {
            return Ok(true);
        };
        let (msg, bytes) = next?;
        if !send(self.tx, msg).await {
            return Ok(false);
        }
        self.progress.advance(bytes);
        Ok(true)
    }

    async fn push(
        &mut self,
        message: futures::future::BoxFuture<'static, Result<(Msg, u64)>>,
    ) -> Result<bool> {
        if self.queue.len() >= READ_GROUPS_IN_FLIGHT && !self.send_one().await? {
            return Ok(false);
        }
        self.queue.push_back(message);
        Ok(true)
    }

    async fn drain(&mut self) -> Result<bool> {
        while !self.queue.is_empty() {
            if !self.send_one().await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Queues `listed` as one message.
    async fn entries(&mut self, listed: &mut Vec<EntryMeta>) -> Result<bool> {
        if listed.is_empty() {
            return Ok(true);
        }
        let msg = Msg::Entries(EntryBatch {
            entries: std::mem::take(listed),
        });
        self.push(futures::future::ready(Ok((msg, 0))).boxed())
            .await
    }

    /// Queues `group` (small files) to be read and sent as one message.
    async fn files(&mut self, group: &mut Vec<LocalEntry>) -> Result<bool> {
        if group.is_empty() {
            return Ok(true);
        }
        let group = std::mem::take(group);
        self.push(
            async move {
                let files = blocking(move || read_group(group)).await?;
                let bytes = files.iter().map(|f| f.data.len() as u64).sum();
                Ok((Msg::Files(FileBatch { files }), bytes))
            }
            .boxed(),
        )
        .await
    }
}

/// Sends the whole upload. `Ok(true)`: every request including the end was
/// handed over; `Ok(false)`: the call went away first (its result tells
/// why); `Err`: a local file could not be read. Entries go in path order
/// (the node builds the manifest as they arrive): runs of directories,
/// links and unchanged files many to a message, runs of small files read
/// several groups at a time and sent many to a message, large files
/// streamed.
async fn produce(
    tx: &mpsc::Sender<Frame>,
    begin: upload_request::Begin,
    walked: &mut mpsc::Receiver<Walked>,
    progress: &dyn Progress,
) -> Result<Option<Vec<String>>> {
    if !send(tx, Msg::Begin(begin)).await {
        return Ok(None);
    }
    let mut out = Ordered {
        tx,
        progress,
        queue: futures::stream::FuturesOrdered::new(),
    };
    let (mut listed, mut group, mut group_bytes) = (Vec::new(), Vec::new(), 0u64);
    let mut to_send = 0u64;
    let skipped = loop {
        let (entry, unchanged) = match walked.recv().await {
            Some(Walked::Entry(entry, unchanged)) => (entry, unchanged),
            Some(Walked::Done(skipped)) => break skipped,
            Some(Walked::Failed(error)) => return Err(error),
            None => return Err(Error::protocol("the directory walk ended early")),
        };
        let sent = match entry.kind {
            EntryKind::File if !unchanged => {
                // The total grows as the walk (a little ahead) finds files.
                to_send += entry.size;
                progress.set_total(to_send);
                if !out.entries(&mut listed).await? {
                    return Ok(None);
                }
                if entry.size > SMALL_FILE_BYTES {
                    if !out.files(&mut group).await? || !out.drain().await? {
                        return Ok(None);
                    }
                    group_bytes = 0;
                    send_streamed(tx, &entry, progress).await?
                } else {
                    if group_bytes + entry.size > BATCH_BYTES as u64 || group.len() >= BATCH_ENTRIES
                    {
                        if !out.files(&mut group).await? {
                            return Ok(None);
                        }
                        group_bytes = 0;
                    }
                    group_bytes += entry.size;
                    group.push(entry);
                    true
                }
            }
            _ => {
                if !out.files(&mut group).await? {
                    return Ok(None);
                }
                group_bytes = 0;
                listed.push(entry.meta());
                listed.len() < BATCH_ENTRIES || out.entries(&mut listed).await?
            }
        };
        if !sent {
            return Ok(None);
        }
    };
    if !out.entries(&mut listed).await? || !out.files(&mut group).await? || !out.drain().await? {
        return Ok(None);
    }
    Ok(tx.send(Frame::End).await.is_ok().then_some(skipped))
}

/// Entries the walk hands over ahead of the upload: bounds what it holds.
const WALK_AHEAD: usize = 4096;

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
    let parent = match client.manifest_root(dataset, None).await {
        Ok((info, root)) => Some((info.id, root)),
        // NotFound: a new dataset. Unavailable: the latest snapshot's
        // manifest is held by another node; upload everything and let the
        // node compare-and-set on whatever the head is.
        Err(Error::Status(status))
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::Unavailable
            ) =>
        {
            None
        }
        Err(error) => return Err(error),
    };
    let (parent_id, parent_root) = parent.unzip();
    // The parent's pages stream in alongside the walk, which compares
    // against them in path order: neither side is held whole.
    let (pages_tx, pages_rx) = mpsc::channel(2);
    let read_parent = async {
        match parent_root {
            Some(root) => client.send_entries(root, pages_tx).await,
            None => Ok(Default::default()),
        }
    };
    let (walk_tx, mut walked) = mpsc::channel(WALK_AHEAD);
    let root = dir.to_path_buf();
    let parent_pages = parent_id.is_some().then_some(pages_rx);
    let walker = tokio::task::spawn_blocking(move || walk_into(&root, parent_pages, walk_tx));

    progress.message("uploading");
    let begin = upload_request::Begin {
        tenant: client.tenant().to_owned(),
        dataset: dataset.to_owned(),
        parent: parent_id.unwrap_or_default(),
        chunking: None,
        in_path_order: true,
    };
    let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
    let mut grpc = client.current_grpc();
    let mut rpc = std::pin::pin!(async move { grpc.upload(request_stream(rx)).await });
    let mut producer = std::pin::pin!(produce(&tx, begin, &mut walked, progress));
    let mut read_parent = std::pin::pin!(read_parent);

    // The producer runs alongside the call. A local IO error returns at
    // once: dropping `rpc` cancels the call (the request stream never ended
    // cleanly), so the node commits nothing.
    let (mut produced, mut parent_pages) = (None, None);
    let answer = loop {
        tokio::select! {
            biased;
            // Once everything was sent, the parent's pages no longer matter
            // (an error reading them must not hide the node's answer).
            pages = &mut read_parent, if parent_pages.is_none() && produced.is_none() => {
                parent_pages = Some(pages?);
            }
            result = &mut producer, if produced.is_none() => {
                produced = Some(result?);
            }
            answer = &mut rpc => break answer,
        }
    };
    // The walk, if still going, stops at its next entry once `walked` is
    // dropped on return.
    drop(walker);
    let response = answer.map_err(Error::Status)?.into_inner();
    let Some(Some(skipped)) = produced else {
        return Err(Error::protocol(
            "the node answered the upload before it was complete",
        ));
    };

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
        parent_pages: parent_pages.unwrap_or_default(),
        skipped,
        seconds: started.elapsed().as_secs_f64(),
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    fn walk(root: &Path) -> Result<(Vec<LocalEntry>, Vec<String>)> {
        let mut entries = Vec::new();
        let skipped = walk_tree(root, &mut |entry| {
            entries.push(entry);
            true
        })?;
        Ok((entries, skipped))
    }

    fn rels(entries: &[LocalEntry]) -> Vec<&str> {
        entries.iter().map(|entry| entry.rel.as_str()).collect()
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

        let (entries, skipped) = walk(root.path())?;
        assert_eq!(
            rels(&entries),
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
        assert_eq!(skipped, ["a/out"]);

        let kinds: Vec<EntryKind> = entries.iter().map(|entry| entry.kind).collect();
        use EntryKind::{Dir, File, Symlink};
        assert_eq!(kinds, [Dir, File, File, Dir, File, Dir, Symlink, File]);
        assert_eq!(entries[6].target.as_deref(), Some("top.txt"));
        let top = entries
            .iter()
            .find(|entry| entry.rel == "top.txt")
            .expect("top.txt listed");
        assert_eq!(top.size, 5);
        assert_eq!(top.abs, root.path().join("top.txt"));
        assert!(top.mtime_ns > 0);
        assert_eq!(top.mode & !0o7777, 0);
        Ok(())
    }

    /// The depth-first walk yields exactly byte order of the full paths
    /// (which the node requires), also where names share a prefix with a
    /// directory (`d`, `d-x`, `d.x`, `d/…`) and where a large directory is
    /// statted by several threads.
    #[test]
    fn walk_order_is_path_byte_order() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        for dir in ["d", "d/d", "d-", "big", "z"] {
            std::fs::create_dir_all(root.path().join(dir))?;
        }
        for file in [
            "d-x", "d.x", "d0", "d/d.x", "d/d-", "d/d/e", "d-/a", "z/!", "z/~",
        ] {
            std::fs::write(root.path().join(file), file)?;
        }
        for i in 0..(PARALLEL_STAT_MIN * 2 + 7) {
            let name = format!("f{}{}", i % 7, ["", ".a", "-b", "/"][i % 3]);
            let name = name.trim_end_matches('/');
            std::fs::write(root.path().join("big").join(format!("{name}{i}")), b"x")?;
        }
        let (entries, skipped) = walk(root.path())?;
        assert!(skipped.is_empty());
        let walked = rels(&entries);
        let mut sorted = walked.clone();
        sorted.sort();
        assert_eq!(walked, sorted);
        assert_eq!(walked.len(), 14 + PARALLEL_STAT_MIN * 2 + 7);
        Ok(())
    }

    #[test]
    fn walk_of_missing_root_is_an_io_error() {
        let result = walk(Path::new("/nonexistent/bitclone-test-root"));
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
        assert!(!is_unchanged(&entry, None));
        assert!(is_unchanged(&entry, Some(&entry.meta())));

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
            assert!(!is_unchanged(&entry, Some(&change)));
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
