//! The second half of an export: the fenced, create-only commit record, then
//! the mirror's deletes and the pruning of old records.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Error, Result};
use crate::manifest::EntryKind;
use crate::sink::objects::layout::{
    commit_loc, join, list_commits, read_commit, CommitRecord, COMMIT_FORMAT, META_DIR,
};
use crate::sink::objects::s3::sink_error;
use crate::sink::objects::upload::{list_objects, tag_digest, Upload};
use crate::sink::objects::Target;
use crate::sink::{now_ms, SinkWrite};

/// Refuses a writer whose token is lower than the highest committed one.
/// Returns the latest record.
pub(super) async fn check_fence(target: &Target, token: u64) -> Result<Option<(u64, String)>> {
    let latest = list_commits(target).await?.pop();
    if let Some((t, s)) = &latest {
        if *t > token {
            return Err(Error::Fenced(format!(
                "{}: snapshot {s} is committed with fencing token {t}, higher than this writer's \
                 {token} (a newer attempt or job wrote it; tokens from another cluster or a \
                 rebuilt node do not compare: give those a fresh prefix)",
                target.url
            )));
        }
    }
    Ok(latest)
}

/// The second half of [`export_snapshot`]: checks that every object is still
/// as the upload left it, writes the commit record (create-only, refused
/// when a higher token has committed), then, with `mirror`, deletes the
/// objects the snapshot does not have.
///
/// [`export_snapshot`]: super::export_snapshot
///
/// `w` is taken `&mut` only so that the future is `Send` without asking
/// `w.on_progress` to be `Sync`.
pub async fn commit_snapshot(
    target: &Target,
    w: &mut SinkWrite<'_>,
    upload: &mut Upload,
) -> Result<()> {
    let (manifest, id, writer, cancel) = (w.manifest, w.snapshot, w.writer, w.stop.clone());
    // Fenced again right before the commit point: a newer holder may have
    // committed while this one was uploading.
    check_fence(target, writer.token).await?;
    // Another writer on the same prefix may have replaced or removed an
    // object since: then this snapshot is not what the bucket holds.
    let now = list_objects(target).await?;
    let mut files = w
        .entries()
        .try_filter(|e| futures::future::ready(e.kind == EntryKind::File));
    let mut tags = upload.tags.iter();
    // What a mirror deletes: the objects listed before the upload, less the
    // snapshot's files, worked out before the record so that nothing read
    // after it can fail the deletes.
    let mut extra: HashSet<&str> = if target.mirror {
        upload.listed.keys().map(String::as_str).collect()
    } else {
        HashSet::new()
    };
    while let Some(e) = files.try_next().await? {
        extra.remove(e.path.as_str());
        let Some(&tag) = tags.next() else {
            return Err(Error::Conflict(format!(
                "{}: the snapshot has more files than job {} uploaded; not committed",
                target.url, writer.job
            )));
        };
        let same = now.get(&e.path).is_some_and(|l| {
            let now_tag = tag_digest(l.e_tag.as_deref());
            l.size == e.size && (tag == 0 || now_tag == 0 || now_tag == tag)
        });
        if !same {
            return Err(Error::Conflict(format!(
                "{}: object {} changed while job {} was writing it (another writer on this prefix?); not committed",
                target.url, e.path, writer.job
            )));
        }
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let record = CommitRecord {
        format: COMMIT_FORMAT,
        snapshot: id.to_hex(),
        tenant: manifest.tenant().to_string(),
        dataset: manifest.dataset().to_string(),
        job: writer.job.clone(),
        fencing_token: writer.token,
        files: manifest.files(),
        bytes: manifest.bytes(),
        committed_unix_ms: now_ms(),
        manifest: upload.manifest.map(|m| m.to_hex()),
    };
    let loc = commit_loc(target, writer.token, &record.snapshot)?;
    let body = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::InvalidArgument(format!("encoding commit record: {e}")))?;
    let put = target
        .store
        .put_opts(
            &loc,
            PutPayload::from(body),
            PutOptions::from(PutMode::Create),
        )
        .await;
    match put {
        Ok(_) => {}
        // The same record from an earlier attempt of this job: done already.
        Err(object_store::Error::AlreadyExists { .. }) => {
            let prev = read_commit(target, writer.token, &record.snapshot).await?;
            if prev.job != writer.job {
                return Err(Error::Fenced(format!(
                    "{}: token {} was already used by job {}",
                    target.url, writer.token, prev.job
                )));
            }
            upload.stats.already_committed = true;
        }
        Err(e) => return Err(sink_error(target, "writing the commit record", e)),
    }
    // Only the newest commit prunes, and only what it listed before its
    // upload: an older writer must not delete a newer snapshot's objects.
    let commits = list_commits(target).await?;
    let newest = commits.last().is_some_and(|(t, _)| *t <= writer.token);
    if newest && !cancel.load(Ordering::Relaxed) {
        if target.mirror {
            upload.stats.objects_deleted = delete_extra(target, extra).await?;
        }
        prune_commits(target, &commits).await?;
    }
    Ok(())
}

/// Commit records kept per prefix: readers need only the newest, and every
/// export lists them all.
pub const KEEP_COMMITS: usize = 64;

/// Deletes all but the newest [`KEEP_COMMITS`] commit records (their small
/// manifests stay). Only the newest writer prunes.
async fn prune_commits(target: &Target, commits: &[(u64, String)]) -> Result<()> {
    let old = commits.len().saturating_sub(KEEP_COMMITS);
    for (token, snapshot) in &commits[..old] {
        let loc = commit_loc(target, *token, snapshot)?;
        match target.store.delete(&loc).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(sink_error(target, "pruning old commit records", e)),
        }
    }
    Ok(())
}

async fn delete_extra(target: &Target, extra: HashSet<&str>) -> Result<u64> {
    let mut doomed: Vec<&str> = extra.into_iter().collect();
    doomed.sort_unstable();
    let n = doomed.len() as u64;
    futures::stream::iter(doomed)
        .map(|rel| async move {
            let loc = join(&target.prefix, rel)?;
            match target.store.delete(&loc).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(sink_error(target, "deleting an object", e)),
            }
        })
        .buffer_unordered(target.concurrency)
        .boxed()
        .try_collect::<Vec<()>>()
        .await?;
    Ok(n)
}

/// Checks that the target refuses a second create of the same key (the
/// commit records rely on it; some S3 servers ignore `If-None-Match`).
/// Returns false, and logs once per target, when it does not.
pub async fn check_create_only(target: &Target) -> Result<bool> {
    static SEEN: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(v) = seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&target.url)
    {
        return Ok(*v);
    }
    let loc = join(
        &target.prefix,
        &format!("{META_DIR}/probe/{}-{}", std::process::id(), now_ms()),
    )?;
    let create = || {
        target.store.put_opts(
            &loc,
            PutPayload::from_static(b"probe"),
            PutOptions::from(PutMode::Create),
        )
    };
    create()
        .await
        .map_err(|e| sink_error(target, "probing conditional create", e))?;
    let refused = matches!(
        create().await,
        Err(object_store::Error::AlreadyExists { .. })
    );
    let _ = target.store.delete(&loc).await;
    if !refused {
        tracing::warn!(
            sink = target.url,
            "the sink does not refuse a second create of the same key; commit records still \
             order by fencing token, but two writers with the same token would not be told apart"
        );
    }
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(target.url.clone(), refused);
    Ok(refused)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use super::*;
    use crate::chunker::ChunkParams;
    use crate::ingest::SnapshotBuilder;
    use crate::pool::CpuPool;
    use crate::sink::objects::{export_snapshot, open_target, S3Options};
    use crate::sink::Writer;
    use crate::store::{ChunkStore, MemStore};

    #[test]
    fn only_the_newest_commit_records_are_kept() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemStore::new());
        let pool = CpuPool::new(1, "t").unwrap();
        let out = tempfile::tempdir().unwrap();
        let target = open_target(
            &format!("file://{}", out.path().display()),
            &S3Options::default(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let n = KEEP_COMMITS as u64 + 3;
        for token in 1..=n {
            let mut b =
                SnapshotBuilder::new(store.clone(), "t", "d", ChunkParams::default()).unwrap();
            b.add_dir("d", 0o755, token as i64).unwrap();
            let built = b.finish(0).unwrap();
            built.store_and_load(store.as_ref(), "t").unwrap();
            let (m, id) = (crate::manifest::decode_root(&built.root).unwrap(), built.id);
            let writer = Writer {
                job: format!("j{token}"),
                token,
            };
            rt.block_on(export_snapshot(
                &target,
                crate::sink::SinkWrite {
                    pool: &pool,
                    store: store.clone(),
                    manifest: &m,
                    snapshot: &id,
                    writer: &writer,
                    stop: Arc::new(AtomicBool::new(false)),
                    on_progress: &mut |_| {},
                },
            ))
            .unwrap();
        }
        let commits = rt.block_on(list_commits(&target)).unwrap();
        assert_eq!(commits.len(), KEEP_COMMITS);
        assert_eq!(commits.first().unwrap().0, n - KEEP_COMMITS as u64 + 1);
        assert_eq!(commits.last().unwrap().0, n);
    }
}
