//! Reading a snapshot's entries page by page (`GetManifest` paged, then
//! `GetManifestPage`), with a local cache of pages by id: pages are
//! content-addressed and never change, so an incremental upload fetches
//! only the pages that changed since the snapshot it last compared against.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use bitclone_proto::v1::{self as proto, EntryMeta, ManifestPage, PageRef};
use futures::StreamExt;
use prost::Message;

use crate::{blocking, Client, Error, Result};

/// The page cache directory from the environment: `BITCLONE_CACHE_DIR`, or
/// `bitclone/pages` under `XDG_CACHE_HOME` or `~/.cache`; `None` when none
/// is set (no cache: every page is fetched).
pub(crate) fn default_cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("BITCLONE_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("pages"));
    }
    var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|cache| cache.join("bitclone").join("pages"))
}

/// A cached page: the BLAKE3 of the encoded page, then the page. The hash
/// catches a damaged or truncated cache file (it is then fetched again).
fn read_cached(path: &Path) -> Option<ManifestPage> {
    let bytes = std::fs::read(path).ok()?;
    let (sum, body) = bytes.split_at_checked(32)?;
    (blake3::hash(body).as_bytes() == sum)
        .then(|| ManifestPage::decode(body).ok())
        .flatten()
}

fn write_cached(path: &Path, page: &ManifestPage) -> std::io::Result<()> {
    let body = page.encode_to_vec();
    let mut bytes = Vec::with_capacity(32 + body.len());
    bytes.extend_from_slice(blake3::hash(&body).as_bytes());
    bytes.extend_from_slice(&body);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Written aside and renamed: a reader never sees half a page.
    let tmp = path.with_extension(format!(
        "tmp{}-{}",
        std::process::id(),
        crate::download::TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Pages of one level read at once (the rest of the level waits).
const PAGES_IN_FLIGHT: usize = 16;

/// Pages fetched and taken from the cache by one read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageCounts {
    /// Pages asked of the node.
    pub fetched: u64,
    /// Pages found in the local cache.
    pub cached: u64,
}

impl Client {
    /// One page of a manifest, from the cache when it is there; true when
    /// it was fetched from the node.
    async fn page(&self, page: &PageRef, level: u32) -> Result<(ManifestPage, bool)> {
        // The id names a file in the cache: only a BLAKE3 name is taken.
        if page.id.len() != 64 || !page.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::protocol(format!(
                "manifest page id {:?} is not 64 hex digits",
                page.id
            )));
        }
        let cached = self
            .page_cache()
            .map(|dir| dir.join(self.tenant()).join(&page.id[..2]).join(&page.id));
        if let Some(path) = cached.clone() {
            let found = blocking(move || Ok(read_cached(&path))).await?;
            if let Some(found) = found.filter(|p| p.id == page.id && p.level == level) {
                return Ok((found, false));
            }
        }
        let request = proto::GetManifestPageRequest {
            tenant: self.tenant().to_owned(),
            page: page.id.clone(),
            level,
        };
        let got = self
            .call(|mut grpc| {
                let request = request.clone();
                async move { grpc.get_manifest_page(request).await }
            })
            .await?;
        if got.id != page.id || got.level != level {
            return Err(Error::protocol(format!(
                "asked for page {} at level {level}, got {} at level {}",
                page.id, got.id, got.level
            )));
        }
        if let Some(path) = cached {
            let copy = got.clone();
            // A cache that cannot be written only costs a fetch next time.
            let _ = blocking(move || {
                write_cached(&path, &copy).map_err(|source| Error::io(&path, source))
            })
            .await
            .inspect_err(|error| tracing::debug!(%error, "cannot cache a manifest page"));
        }
        Ok((got, true))
    }

    /// The snapshot (the latest when `snapshot` is `None`) and all its
    /// entries, without chunk lists, read page by page. Each entry is
    /// handed to `each` in path order; no single message holds them all.
    pub async fn for_each_entry(
        &self,
        dataset: &str,
        snapshot: Option<&str>,
        mut each: impl FnMut(EntryMeta) + Send,
    ) -> Result<(proto::SnapshotInfo, PageCounts)> {
        let (info, root) = self.manifest_root(dataset, snapshot).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let walk = self.send_entries(root, tx);
        let consume = async {
            while let Some(page) = rx.recv().await {
                page.into_iter().for_each(&mut each);
            }
        };
        let (counts, ()) = tokio::join!(walk, consume);
        Ok((info, counts?))
    }

    /// The snapshot and its manifest's root (`GetManifest`, paged).
    pub(crate) async fn manifest_root(
        &self,
        dataset: &str,
        snapshot: Option<&str>,
    ) -> Result<(proto::SnapshotInfo, proto::GetManifestResponse)> {
        let request = proto::GetManifestRequest {
            tenant: self.tenant().to_owned(),
            dataset: dataset.to_owned(),
            snapshot: snapshot.unwrap_or_default().to_owned(),
            paged: true,
        };
        let mut root = self
            .call(|mut grpc| {
                let request = request.clone();
                async move { grpc.get_manifest(request).await }
            })
            .await?;
        let info = root
            .snapshot
            .take()
            .ok_or_else(|| Error::protocol("manifest without its snapshot"))?;
        Ok((info, root))
    }

    /// Sends the entries under `root` to `tx` in path order, a page's worth
    /// at a time; stops early, without an error, when `tx` is closed.
    pub(crate) async fn send_entries(
        &self,
        root: proto::GetManifestResponse,
        tx: tokio::sync::mpsc::Sender<Vec<EntryMeta>>,
    ) -> Result<PageCounts> {
        let mut counts = PageCounts::default();
        // A manifest with no pages (format v1, or small) is answered inline.
        if !root.entries.is_empty() && tx.send(root.entries).await.is_err() {
            return Ok(counts);
        }
        self.walk_pages(root.pages, root.level, &mut counts, &tx)
            .await?;
        Ok(counts)
    }

    /// Reads `pages` (of `level`) and everything below them depth first,
    /// in path order, with several pages of a level in flight at once.
    /// False when `tx` was closed.
    fn walk_pages<'a>(
        &'a self,
        pages: Vec<PageRef>,
        level: u32,
        counts: &'a mut PageCounts,
        tx: &'a tokio::sync::mpsc::Sender<Vec<EntryMeta>>,
    ) -> futures::future::BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut got = futures::stream::iter(pages)
                .map(|page| async move { self.page(&page, level).await })
                .buffered(PAGES_IN_FLIGHT);
            while let Some(page) = got.next().await {
                let (page, fetched) = page?;
                if fetched {
                    counts.fetched += 1;
                } else {
                    counts.cached += 1;
                }
                let open = if level > 0 {
                    self.walk_pages(page.pages, level - 1, counts, tx).await?
                } else {
                    tx.send(page.entries).await.is_ok()
                };
                if !open {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }
}
