//! Reconciling an object-store sink with a snapshot: every file of the
//! snapshot must be an object of the same size holding the same bytes
//! (its BLAKE3 metadata, or with `deep` the bytes themselves hashed), and
//! in a mirror nothing else may be there. Drift is reported, and with repair the
//! drifted objects are deleted so that the next export writes them again.

use std::collections::HashMap;

use futures::StreamExt;
use object_store::ObjectStoreExt;

use crate::chunk::ChunkId;
use crate::error::Result;
use crate::manifest::EntryKind;
use crate::pool::CpuPool;
use crate::sink::objects::layout::{join, latest_commit, list_under};
use crate::sink::objects::s3::sink_error;
use crate::sink::objects::upload::stored_blake3;
use crate::sink::objects::Target;
use crate::store::EntryPages;
use crate::SnapshotId;

/// One object that does not match the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The file's path (relative to the sink's prefix).
    pub path: String,
    pub problem: String,
    /// The object is there, with other bytes: an export skips an object
    /// whose metadata matches, so repair deletes it first.
    pub present: bool,
}

/// What a reconcile of an object-store sink found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// The snapshot of the sink's newest commit record, if any.
    pub committed: Option<SnapshotId>,
    /// Files of the snapshot checked.
    pub files: u64,
    /// Bytes read (with `deep`).
    pub bytes_read: u64,
    /// Every drifted object, up to [`DRIFT_LISTED`]; `drifted` counts all.
    pub drift: Vec<Drift>,
    pub drifted: u64,
    /// With `for_repair`: the path of every drifted object that is there
    /// (to delete before the export), however many.
    pub to_delete: Vec<String>,
    for_repair: bool,
}

/// Drifted objects listed in a report; more are counted.
pub const DRIFT_LISTED: usize = 1000;

impl Reconciled {
    fn found(&mut self, path: &str, problem: String, present: bool) {
        self.drifted += 1;
        if present && self.for_repair {
            self.to_delete.push(path.to_string());
        }
        if self.drift.len() < DRIFT_LISTED {
            self.drift.push(Drift {
                path: path.to_string(),
                problem,
                present,
            });
        }
    }
}

/// Compares `target` with the snapshot whose entries `entries` yields (in
/// path order, a page at a time). Holds the sink's listing (path and size
/// per object), as an export does, and with `for_repair` the paths of the
/// drifted objects to delete.
pub async fn reconcile(
    target: &Target,
    pool: &CpuPool,
    mut entries: EntryPages<'_>,
    deep: bool,
    for_repair: bool,
) -> Result<Reconciled> {
    let mut out = Reconciled {
        committed: latest_commit(target)
            .await?
            .map(|c| c.snapshot_id())
            .transpose()?,
        for_repair,
        ..Reconciled::default()
    };
    let mut listed: HashMap<String, u64> = list_under(target, "listing for a reconcile")
        .await?
        .into_iter()
        .map(|(rel, meta)| (rel, meta.size))
        .collect();
    while let Some(page) = entries.next_page().await? {
        for e in page.into_iter().filter(|e| e.kind == EntryKind::File) {
            out.files += 1;
            let Some(size) = listed.remove(&e.path) else {
                out.found(&e.path, "missing".into(), false);
                continue;
            };
            if size != e.size {
                out.found(
                    &e.path,
                    format!("{size} bytes where the snapshot has {}", e.size),
                    true,
                );
                continue;
            }
            let location = join(&target.prefix, &e.path)?;
            let (held, how) = if deep {
                let (hash, read) = hash_object(target, &location).await?;
                out.bytes_read += read;
                (Some(hash), "its bytes hash")
            } else {
                (
                    stored_blake3(target, pool, &location).await?,
                    "its metadata says",
                )
            };
            match held {
                Some(h) if h == e.blake3 => {}
                Some(h) => out.found(
                    &e.path,
                    format!(
                        "{how} BLAKE3 {}, the snapshot's is {}",
                        ChunkId(h),
                        ChunkId(e.blake3)
                    ),
                    true,
                ),
                None => out.found(&e.path, "no BLAKE3 metadata".into(), true),
            }
        }
    }
    // A mirror holds the snapshot and nothing else; other sinks may hold
    // more under their prefix.
    if target.mirror {
        let mut extra: Vec<String> = listed.into_keys().collect();
        extra.sort();
        for path in extra {
            out.found(&path, "not in the snapshot".into(), true);
        }
    }
    Ok(out)
}

/// BLAKE3 of an object's bytes, read as a stream, and how many there were.
async fn hash_object(
    target: &Target,
    location: &object_store::path::Path,
) -> Result<([u8; 32], u64)> {
    let got = target
        .store
        .get(location)
        .await
        .map_err(|e| sink_error(target, "reading an object to hash it", e))?;
    let mut stream = got.into_stream();
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(|e| sink_error(target, "reading an object to hash it", e))?;
        n += bytes.len() as u64;
        h.update(&bytes);
    }
    Ok((*h.finalize().as_bytes(), n))
}

/// Deletes the drifted objects that are there (with other bytes, or not in
/// the snapshot: [`Reconciled::to_delete`]), so that an export writes the
/// snapshot's again; returns how many.
pub async fn delete_drifted(target: &Target, paths: &[String]) -> Result<u64> {
    let mut n = 0;
    for path in paths {
        let location = join(&target.prefix, path)?;
        match target.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => n += 1,
            Err(e) => return Err(sink_error(target, "deleting a drifted object", e)),
        }
    }
    Ok(n)
}
