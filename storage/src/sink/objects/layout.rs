//! Where things live under an object-store sink's prefix: one object per
//! file, and the sink's own records under `.bitclone/` (manifests, commit
//! records), with the readers of those records.

use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use std::collections::HashSet;

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::{Error, Result};
use crate::manifest::{decode_root, Manifest, Stored};
use crate::sink::objects::s3::sink_error;
use crate::sink::objects::Target;
use crate::store::EntryPages;

/// Where the sink keeps its own records, under the prefix.
pub const META_DIR: &str = ".bitclone";

/// A commit record: the sink's statement that a snapshot is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The record's format ([`COMMIT_FORMAT`]); 0.1.0 wrote none (1).
    #[serde(default = "format_1")]
    pub format: u32,
    /// The committed snapshot (hex).
    pub snapshot: String,
    /// Owner of the snapshot.
    pub tenant: String,
    /// Dataset of the snapshot.
    pub dataset: String,
    /// The job that wrote it.
    pub job: String,
    /// The fencing token of the lease the job held.
    pub fencing_token: u64,
    /// Number of regular files.
    pub files: u64,
    /// Total file bytes.
    pub bytes: u64,
    /// When the record was written (milliseconds since the Unix epoch).
    pub committed_unix_ms: i64,
    /// The id the sink holds the snapshot's manifest under, when it is not
    /// the snapshot's: an encrypted tenant's snapshot, whose manifest the
    /// sink holds in clear (encoded again, so under another id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

/// The format of commit records written now.
pub const COMMIT_FORMAT: u32 = 1;

fn format_1() -> u32 {
    1
}

impl CommitRecord {
    /// The snapshot id.
    pub fn snapshot_id(&self) -> Result<SnapshotId> {
        self.snapshot.parse()
    }

    /// The id of the manifest the sink holds for it ([`read_root`]).
    pub fn manifest_id(&self) -> Result<SnapshotId> {
        self.manifest.as_deref().unwrap_or(&self.snapshot).parse()
    }
}

fn commit_name(token: u64, snapshot: &str) -> String {
    format!("{token:020}-{snapshot}")
}

pub(super) fn commit_loc(target: &Target, token: u64, snapshot: &str) -> Result<ObjectPath> {
    join(
        &target.prefix,
        &format!("{META_DIR}/commits/{}", commit_name(token, snapshot)),
    )
}

pub(super) fn manifest_loc(target: &Target, id: &SnapshotId) -> Result<ObjectPath> {
    join(
        &target.prefix,
        &format!("{META_DIR}/manifests/{}", id.to_hex()),
    )
}

pub(super) fn page_loc(target: &Target, id: &ChunkId) -> Result<ObjectPath> {
    join(&target.prefix, &format!("{META_DIR}/pages/{}", id.to_hex()))
}

/// The manifest pages already in the sink (an export writes only others).
pub(super) async fn list_pages(target: &Target) -> Result<HashSet<ChunkId>> {
    let dir = join(&target.prefix, &format!("{META_DIR}/pages"))?;
    let metas: Vec<_> = target
        .store
        .list(Some(&dir))
        .try_collect()
        .await
        .map_err(|e| sink_error(target, "listing manifest pages", e))?;
    Ok(metas
        .iter()
        .filter_map(|m| m.location.filename()?.parse().ok())
        .collect())
}

/// Whether a relative path lies in the sink's own records.
pub(super) fn is_meta(rel: &str) -> bool {
    rel.split('/').next() == Some(META_DIR)
}

/// Lists the commit records' names under `target`: (token, snapshot hex),
/// highest token last.
pub async fn list_commits(target: &Target) -> Result<Vec<(u64, String)>> {
    let dir = join(&target.prefix, &format!("{META_DIR}/commits"))?;
    let metas: Vec<_> = target
        .store
        .list(Some(&dir))
        .try_collect()
        .await
        .map_err(|e| sink_error(target, "listing commit records", e))?;
    let mut out: Vec<(u64, String)> = metas
        .iter()
        .filter_map(|m| m.location.filename())
        .filter_map(|name| {
            let (t, s) = name.split_once('-')?;
            Some((t.parse().ok()?, s.to_string()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Reads one commit record.
pub async fn read_commit(target: &Target, token: u64, snapshot: &str) -> Result<CommitRecord> {
    let loc = commit_loc(target, token, snapshot)?;
    let bytes = target
        .store
        .get(&loc)
        .await
        .map_err(|e| sink_error(target, "reading a commit record", e))?
        .bytes()
        .await?;
    let rec: CommitRecord = serde_json::from_slice(&bytes)
        .map_err(|e| Error::decode("commit record", format!("{loc}: {e}")))?;
    if rec.format > COMMIT_FORMAT {
        return Err(Error::decode(
            "commit record",
            format!(
                "{loc} is in format {}, newer than this node's {COMMIT_FORMAT}",
                rec.format
            ),
        ));
    }
    if rec.fencing_token != token || rec.snapshot != snapshot {
        return Err(Error::decode(
            "commit record",
            format!("{loc} does not match its name"),
        ));
    }
    Ok(rec)
}

/// The commit record with the highest fencing token, if any.
pub async fn latest_commit(target: &Target) -> Result<Option<CommitRecord>> {
    match list_commits(target).await?.pop() {
        Some((t, s)) => Ok(Some(read_commit(target, t, &s).await?)),
        None => Ok(None),
    }
}

/// Reads and checks the stored root (v2) or whole manifest (v1) of a
/// snapshot in the sink: its bytes must hash to the id.
pub async fn read_root(target: &Target, id: &SnapshotId) -> Result<Stored> {
    let loc = manifest_loc(target, id)?;
    let bytes = get(target, &loc, "reading a manifest").await?;
    if SnapshotId::of(&bytes) != *id {
        return Err(Error::decode(
            "manifest",
            format!("{loc} does not hash to its name"),
        ));
    }
    decode_root(&bytes)
}

/// The entries of `stored` (from [`read_root`]), their pages read from the
/// sink (each checked against its name), a few ahead.
pub fn sink_entries(target: &Target, stored: Stored) -> EntryPages<'_> {
    EntryPages::new(
        stored,
        Box::new(move |page| {
            // Each GET runs as a task of its own: a page fetched ahead is
            // read in full even while its reader is busy for minutes (a
            // restore of large files), rather than timing out unpolled.
            let t = target.clone();
            // A sink's manifest is in clear (an encrypted tenant's is
            // written again in clear): its pages are named by their BLAKE3.
            let task = AbortOnDrop(tokio::spawn(async move {
                let bytes = get(&t, &page_loc(&t, &page)?, "reading a manifest page").await?;
                if !page.verify(&bytes) {
                    return Err(Error::CorruptChunk {
                        chunk: page,
                        detail: format!("manifest page in {} does not hash to its name", t.url),
                    });
                }
                Ok(bytes)
            }));
            async move {
                let mut task = task;
                (&mut task.0).await.map_err(|e| Error::Sink {
                    sink: target.url.clone(),
                    detail: format!("reading a manifest page: {e}"),
                    permanent: false,
                })?
            }
            .boxed()
        }),
    )
}

/// A spawned task, aborted when its handle is dropped unread (a reader that
/// stopped early leaves no GETs running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads and checks the whole manifest of a committed snapshot from the
/// sink, every entry in memory (tools and tests): restores read it a page at
/// a time through [`sink_entries`].
pub async fn read_manifest(target: &Target, id: &SnapshotId) -> Result<Manifest> {
    let stored = read_root(target, id).await?;
    let mut pages = sink_entries(target, stored.clone());
    let mut entries = Vec::new();
    while let Some(mut page) = pages.next_page().await? {
        entries.append(&mut page);
    }
    Ok(match stored {
        Stored::V1(m) => m,
        Stored::V2(root) => root.with_entries(entries),
    })
}

async fn get(target: &Target, loc: &ObjectPath, doing: &str) -> Result<bytes::Bytes> {
    Ok(target
        .store
        .get(loc)
        .await
        .map_err(|e| sink_error(target, doing, e))?
        .bytes()
        .await?)
}

/// The objects under the prefix, outside `.bitclone/`, with their paths
/// relative to it.
pub(crate) async fn list_under(
    target: &Target,
    doing: &str,
) -> Result<Vec<(String, object_store::ObjectMeta)>> {
    let prefix = (!target.prefix.as_ref().is_empty()).then_some(&target.prefix);
    let mut out = Vec::new();
    let mut s = target.store.list(prefix);
    while let Some(m) = s.next().await {
        let m = m.map_err(|e| sink_error(target, doing, e))?;
        let Some(rel) = relative(&target.prefix, &m.location) else {
            continue;
        };
        if is_meta(&rel) {
            continue;
        }
        out.push((rel, m));
    }
    Ok(out)
}

/// `location` relative to `prefix`, if it is under it.
fn relative(prefix: &ObjectPath, location: &ObjectPath) -> Option<String> {
    let parts: Vec<_> = location.prefix_match(prefix)?.collect();
    if parts.is_empty() {
        return None;
    }
    Some(
        parts
            .iter()
            .map(|p| p.as_ref())
            .collect::<Vec<_>>()
            .join("/"),
    )
}

/// Joins a validated relative path onto a prefix.
pub(crate) fn join(prefix: &ObjectPath, rel: &str) -> Result<ObjectPath> {
    let mut p = prefix.clone();
    for part in rel.split('/') {
        let part = object_store::path::PathPart::parse(part).map_err(|_| Error::InvalidPath {
            path: rel.to_string(),
            reason: "not a valid object name",
        })?;
        p = p.join(part);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit record as 0.1.0 (56dfad0) wrote it, from a real clone job.
    #[test]
    fn a_commit_record_written_by_0_1_0_still_reads() {
        let text = include_str!("../../../tests/fixtures/commit-record-0.1.0.json");
        let rec: CommitRecord = serde_json::from_str(text).unwrap();
        assert_eq!(rec.format, 1);
        assert_eq!(rec.fencing_token, 1);
        assert_eq!((rec.files, rec.bytes), (4, 6002));
        assert_eq!(
            rec.snapshot_id().unwrap().to_hex(),
            "be29d2e94c8a1380087d85a9c50da4bea208fd64d200e33a838aeeea8dcd3af3"
        );
        // What is written now carries its format.
        let now = serde_json::to_value(CommitRecord {
            format: COMMIT_FORMAT,
            ..rec
        })
        .unwrap();
        assert_eq!(now["format"], COMMIT_FORMAT);
    }
}
