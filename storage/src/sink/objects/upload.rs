//! The first half of an export: every file's object (skipping those that
//! already hold the file's bytes, streaming large ones as multipart uploads)
//! and the manifest; nothing a reader trusts yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload,
};

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::manifest::{decode_root, Stored};
use crate::manifest::{ChunkRef, Entry, EntryKind};
use crate::pool::CpuPool;
use crate::sink::objects::commit::check_fence;
use crate::sink::objects::layout::{
    is_meta, join, list_pages, list_under, manifest_loc, page_loc, read_commit,
};
use crate::sink::objects::s3::sink_error;
use crate::sink::objects::{
    ExportProgress, Target, BLAKE3_METADATA, MULTIPART_THRESHOLD, PART_BYTES,
};
use crate::sink::{SinkWrite, Written};
use crate::store::{page_ids, read_chunks, ChunkStore};

/// An upload waiting for its commit: what [`upload_snapshot`] wrote or found,
/// which [`commit_snapshot`] checks again before the commit point.
///
/// [`commit_snapshot`]: super::commit_snapshot
#[derive(Debug, Default)]
pub struct Upload {
    /// What was done so far.
    pub stats: Written,
    /// Every file's object as this writer left it, in the manifest's file
    /// order: a digest of its e_tag (0 when the store gave none). The commit
    /// reads the manifest again in the same order, so 8 bytes a file is all
    /// it needs to keep.
    pub(super) tags: Vec<u64>,
    /// The objects found under the prefix before the upload: the only ones
    /// a mirror commit may delete (a concurrent writer's new objects are
    /// not this writer's to remove).
    pub(super) listed: HashMap<String, Listed>,
    /// Where the sink holds the manifest if not under the snapshot's id:
    /// an encrypted tenant's, written in clear ([`write_clear_manifest`]).
    pub(super) manifest: Option<SnapshotId>,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Listed {
    pub(super) size: u64,
    pub(super) e_tag: Option<String>,
}

/// A digest of an object's e_tag; 0 for none.
pub(super) fn tag_digest(e_tag: Option<&str>) -> u64 {
    e_tag.map_or(0, |t| {
        let h = blake3::hash(t.as_bytes());
        u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default()) | 1
    })
}

/// The first half of [`export_snapshot`]: the objects and the manifest,
/// nothing a reader trusts yet. `already_committed` in the result means
/// the writer's record for this snapshot exists and nothing was done.
///
/// The manifest is read a page at a time as the upload goes: a path that
/// collides with the sink's own records stops it there, uncommitted (files
/// before it in path order may already be written).
///
/// [`export_snapshot`]: super::export_snapshot
pub async fn upload_snapshot(target: &Target, w: &mut SinkWrite<'_>) -> Result<Upload> {
    let (pool, id, writer) = (w.pool, w.snapshot, w.writer);
    let (store, cancel) = (w.store.clone(), w.stop.clone());
    let mut upload = Upload::default();
    if let Some((t, s)) = check_fence(target, writer.token).await? {
        // This snapshot is committed by this job already: by this attempt,
        // or by an earlier one whose holder lost its lease after the commit
        // (a takeover must not commit it a second time).
        let done = s == id.to_hex()
            && (t == writer.token || read_commit(target, t, &s).await?.job == writer.job);
        if done {
            upload.stats.already_committed = true;
            return Ok(upload);
        }
    }
    upload.listed = list_objects(target).await?;
    let listed = &upload.listed;
    let abort = AtomicBool::new(false);
    let ctx = Ctx {
        pool,
        store: &store,
        tenant: w.manifest.tenant(),
        target,
        cancel: &cancel,
        abort: &abort,
    };
    // Any entry under `.bitclone/` stops the export (files before it in
    // path order may already be written; nothing is committed).
    let files = w.entries().try_filter_map(|e| {
        futures::future::ready(if is_meta(&e.path) {
            Err(Error::InvalidPath {
                path: e.path.clone(),
                reason: "collides with the sink's own records under .bitclone/",
            })
        } else {
            Ok((e.kind == EntryKind::File).then_some(e))
        })
    });
    // Two stages, both in order: whether an object already holds its file's
    // bytes (one small request, so more of them in flight), then the upload.
    let checked = files
        .map(|e| {
            let ctx = &ctx;
            async move {
                let e = e?;
                // After a failure or a cancel the rest only drains: no
                // further requests.
                if ctx.stopped() {
                    return Err(Error::Cancelled);
                }
                let same_size = listed.get(&e.path).map(|l| l.size) == Some(e.size);
                let unchanged = same_size && ctx.holds(&e).await?;
                Ok::<_, Error>((e, unchanged))
            }
        })
        .buffered((target.concurrency * 4).min(64));
    let mut results = checked
        .map(|r| {
            let ctx = &ctx;
            async move {
                let (e, unchanged) = r?;
                let written = ctx.write_entry(&e, unchanged).await?;
                Ok::<_, Error>((e, written))
            }
        })
        .buffered(target.concurrency)
        // Boxing pins down the lifetimes, so that callers' futures stay Send.
        .boxed();
    let on_progress = &mut *w.on_progress;
    let mut at = ExportProgress::default();
    let mut failed = None;
    while let Some(r) = results.next().await {
        let (e, written) = match r {
            Ok(v) => v,
            Err(err) => {
                // Let the uploads in flight see the flag and abort cleanly
                // rather than dropping them half-done; keep the first error.
                abort.store(true, Ordering::Relaxed);
                failed.get_or_insert(err);
                continue;
            }
        };
        if failed.is_some() {
            continue;
        }
        let e_tag = match written {
            Some(tag) => {
                upload.stats.files_written += 1;
                upload.stats.bytes_written += e.size;
                tag
            }
            None => {
                upload.stats.files_unchanged += 1;
                listed.get(&e.path).and_then(|l| l.e_tag.clone())
            }
        };
        upload.tags.push(tag_digest(e_tag.as_deref()));
        at.files_done += 1;
        at.bytes_done += e.size;
        on_progress(at);
    }
    drop(results);
    if let Some(err) = failed {
        return Err(err);
    }
    if ctx.store.codec(ctx.tenant)?.is_plain() {
        upload.stats.pages_written = write_manifest(&ctx, id).await?;
    } else {
        let (pages, clear) = write_clear_manifest(&ctx, id).await?;
        upload.stats.pages_written = pages;
        upload.manifest = Some(clear);
    }
    Ok(upload)
}

/// Copies the snapshot's stored manifest from the chunk store: a v1
/// manifest whole; a v2 root after the pages the sink does not hold yet (an
/// incremental export writes only its new pages). Returns the pages written.
async fn write_manifest(ctx: &Ctx<'_>, id: &SnapshotId) -> Result<u64> {
    let (store, tenant, id) = (ctx.store.clone(), ctx.tenant.to_string(), *id);
    let (root, pages) = ctx
        .pool
        .run(move || -> Result<_> {
            let root = store.get_manifest(&tenant, &id)?;
            let pages = match decode_root(&root)? {
                Stored::V1(_) => Vec::new(),
                Stored::V2(r) => page_ids(store.as_ref(), &tenant, &r)?,
            };
            Ok((root, pages))
        })
        .await?;
    let have = list_pages(ctx.target).await?;
    let new: Vec<ChunkId> = pages.into_iter().filter(|p| !have.contains(p)).collect();
    let written = new.len() as u64;
    futures::stream::iter(new)
        .map(|page| async move {
            let (store, tenant) = (ctx.store.clone(), ctx.tenant.to_string());
            let bytes = ctx
                .pool
                .run(move || store.get_chunk(&tenant, &page))
                .await?;
            ctx.target
                .store
                .put(&page_loc(ctx.target, &page)?, PutPayload::from(bytes))
                .await
                .map_err(|e| sink_error(ctx.target, "writing a manifest page", e))?;
            Ok::<_, Error>(())
        })
        .buffer_unordered(ctx.target.concurrency)
        .try_collect::<()>()
        .await?;
    ctx.target
        .store
        .put(&manifest_loc(ctx.target, &id)?, PutPayload::from(root))
        .await
        .map_err(|e| sink_error(ctx.target, "writing the manifest", e))?;
    Ok(written)
}

/// An encrypted tenant's manifest, for the sink: the sink holds the files
/// in clear, and a restore from the sink alone must need no key, so the
/// manifest is encoded again in clear (the same entries, pages named by
/// their plain BLAKE3; unchanged pages of an incremental export are shared
/// as usual). Returns the pages written and the clear manifest's id, which
/// the commit record names.
async fn write_clear_manifest(ctx: &Ctx<'_>, id: &SnapshotId) -> Result<(u64, SnapshotId)> {
    let have = list_pages(ctx.target).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<(ChunkId, Vec<u8>)>(ctx.target.concurrency * 2);
    let (store, tenant, id) = (ctx.store.clone(), ctx.tenant.to_string(), *id);
    let encode = ctx.pool.run(move || -> Result<(SnapshotId, Vec<u8>)> {
        let Stored::V2(root) = crate::store::read_root(store.as_ref(), &tenant, &id)? else {
            return Err(Error::decode(
                "manifest",
                "an encrypted tenant's snapshot in the v1 format",
            ));
        };
        let header = root.clone();
        let mut encoder = crate::manifest::Encoder::new();
        let mut emit = |page: &ChunkId, bytes: &[u8]| {
            tx.blocking_send((*page, bytes.to_vec()))
                .map_err(|_| Error::Cancelled)
        };
        for e in crate::store::Entries::new(store, &tenant, Stored::V2(root)) {
            encoder.push(&e?, &mut emit)?;
        }
        encoder.finish(
            (&header.tenant, &header.dataset),
            header.parent,
            header.created_unix_ms,
            header.chunking,
            &mut emit,
        )
    });
    let have = &have;
    let upload = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|page| (page, rx))
    })
    .filter(|(page, _)| futures::future::ready(!have.contains(page)))
    .map(|(page, bytes)| async move {
        ctx.target
            .store
            .put(&page_loc(ctx.target, &page)?, PutPayload::from(bytes))
            .await
            .map_err(|e| sink_error(ctx.target, "writing a manifest page", e))?;
        Ok::<_, Error>(1u64)
    })
    .buffer_unordered(ctx.target.concurrency)
    .try_fold(0u64, |n, one| futures::future::ready(Ok(n + one)));
    let ((clear, root), written) = futures::try_join!(encode, upload)?;
    ctx.target
        .store
        .put(&manifest_loc(ctx.target, &clear)?, PutPayload::from(root))
        .await
        .map_err(|e| sink_error(ctx.target, "writing the manifest", e))?;
    Ok((written, clear))
}

struct Ctx<'a> {
    pool: &'a CpuPool,
    store: &'a Arc<dyn ChunkStore>,
    tenant: &'a str,
    target: &'a Target,
    cancel: &'a AtomicBool,
    /// Set when another upload of this export failed.
    abort: &'a AtomicBool,
}

impl Ctx<'_> {
    fn stopped(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.abort.load(Ordering::Relaxed)
    }

    /// Writes one entry's object unless it already holds the same bytes.
    /// Returns `Some(e_tag)` when it wrote, `None` when it did not.
    async fn write_entry(&self, e: &Entry, unchanged: bool) -> Result<Option<Option<String>>> {
        if self.stopped() {
            return Err(Error::Cancelled);
        }
        if unchanged {
            return Ok(None);
        }
        let location = join(&self.target.prefix, &e.path)?;
        let mut attributes = Attributes::new();
        if self.target.local_root.is_none() {
            attributes.insert(
                Attribute::Metadata(BLAKE3_METADATA.into()),
                AttributeValue::from(ChunkId(e.blake3).to_hex()),
            );
        }
        if e.size < MULTIPART_THRESHOLD {
            let (s, t, c) = (
                self.store.clone(),
                self.tenant.to_string(),
                e.chunks.clone(),
            );
            let data = self
                .pool
                .run(move || read_chunks(s.as_ref(), &t, &c))
                .await?;
            let done = self
                .target
                .store
                .put_opts(
                    &location,
                    PutPayload::from(data),
                    PutOptions::from(attributes),
                )
                .await
                .map_err(|err| sink_error(self.target, "uploading", err))?;
            Ok(Some(done.e_tag))
        } else {
            self.put_multipart(&e.chunks, &location, attributes)
                .await
                .map(Some)
        }
    }

    /// Whether the object for `e` already holds the file's bytes.
    async fn holds(&self, e: &Entry) -> Result<bool> {
        let location = join(&self.target.prefix, &e.path)?;
        Ok(self.stored_blake3(&location).await? == Some(e.blake3))
    }

    async fn stored_blake3(&self, location: &ObjectPath) -> Result<Option<[u8; 32]>> {
        stored_blake3(self.target, self.pool, location).await
    }

    async fn put_multipart(
        &self,
        chunks: &[ChunkRef],
        location: &ObjectPath,
        attributes: Attributes,
    ) -> Result<Option<String>> {
        let mut upload = self
            .target
            .store
            .put_multipart_opts(location, PutMultipartOptions::from(attributes))
            .await
            .map_err(|e| sink_error(self.target, "starting a multipart upload", e))?;
        let result = async {
            let mut start = 0;
            while start < chunks.len() {
                if self.stopped() {
                    return Err(Error::Cancelled);
                }
                let mut end = start;
                let mut bytes = 0u64;
                while end < chunks.len() && bytes < PART_BYTES {
                    bytes += u64::from(chunks[end].len);
                    end += 1;
                }
                let (s, t, c) = (
                    self.store.clone(),
                    self.tenant.to_string(),
                    chunks[start..end].to_vec(),
                );
                let data = self
                    .pool
                    .run(move || read_chunks(s.as_ref(), &t, &c))
                    .await?;
                upload
                    .put_part(PutPayload::from(data))
                    .await
                    .map_err(|e| sink_error(self.target, "uploading a part", e))?;
                start = end;
            }
            let done = upload
                .complete()
                .await
                .map_err(|e| sink_error(self.target, "completing a multipart upload", e))?;
            Ok(done.e_tag)
        }
        .await;
        if result.is_err() {
            // Leave no half-written object behind; the original error matters more.
            let _ = upload.abort().await;
        }
        result
    }
}

/// [`list_under`] as path → size and e_tag.
pub(super) async fn list_objects(target: &Target) -> Result<HashMap<String, Listed>> {
    Ok(list_under(target, "listing objects")
        .await?
        .into_iter()
        .map(|(rel, m)| {
            let l = Listed {
                size: m.size,
                e_tag: m.e_tag,
            };
            (rel, l)
        })
        .collect())
}

/// The BLAKE3 the object at `location` claims to hold: from its metadata on
/// S3, by hashing the file on a local target (which keeps no metadata).
pub(crate) async fn stored_blake3(
    target: &Target,
    pool: &CpuPool,
    location: &ObjectPath,
) -> Result<Option<[u8; 32]>> {
    if let Some(root) = &target.local_root {
        let path = root.join(location.as_ref());
        return pool
            .run(move || match std::fs::File::open(&path) {
                Ok(mut f) => {
                    let mut h = blake3::Hasher::new();
                    std::io::copy(&mut f, &mut h)
                        .map_err(|e| Error::io("read", path.clone(), e))?;
                    Ok(Some(*h.finalize().as_bytes()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("open", path, e)),
            })
            .await;
    }
    let head = target
        .store
        .get_opts(
            location,
            GetOptions {
                head: true,
                ..GetOptions::default()
            },
        )
        .await;
    match head {
        Ok(r) => Ok(r
            .attributes
            .get(&Attribute::Metadata(BLAKE3_METADATA.into()))
            .and_then(|v| v.as_ref().parse::<ChunkId>().ok())
            .map(|c| c.0)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(sink_error(target, "reading object metadata", e)),
    }
}
