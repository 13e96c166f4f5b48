//! `bitclone restore`: the off-cluster restore drill. Reads a committed
//! snapshot back out of an object-store sink (and checks it against the
//! Postgres catalog when given), verifying every file.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitclone_storage::manifest::Stored;
use bitclone_storage::sink::catalog::{Catalog, CatalogEntry, CatalogSnapshot};
use bitclone_storage::sink::objects::{self, S3Options};
use bitclone_storage::sink::restore::{self, RestoreStats};
use bitclone_storage::{EntryKind, SnapshotId};
use futures::TryStreamExt;
use serde_json::json;

pub async fn run(
    from: &str,
    catalog: Option<&str>,
    snapshot: Option<&str>,
    s3: S3Options,
    dir: &Path,
    json_out: bool,
) -> Result<ExitCode> {
    let target = objects::open_target(from, &s3.or_env())?;
    let wanted: Option<SnapshotId> = snapshot
        .map(|s| s.parse())
        .transpose()
        .with_context(|| format!("--snapshot {snapshot:?}"))?;
    let catalog = match catalog {
        // As libpq does: the user's own PGPASSWORD, for the host they named.
        Some(url) => Some(
            Catalog::connect_with_password(
                url,
                std::env::var_os("PGPASSWORD")
                    .filter(|p| !p.is_empty())
                    .as_ref()
                    .map(|p| p.as_encoded_bytes()),
            )
            .await?,
        ),
        None => None,
    };
    let (record, manifest) = match (&wanted, &catalog) {
        (None, Some(cat)) => newest_in_both(&target, cat).await?,
        _ => restore::committed_snapshot(&target, wanted.as_ref()).await?,
    };
    let id = record.snapshot_id()?;
    if let Some(cat) = &catalog {
        let found = cat.find_snapshot(&id).await?.with_context(|| {
            format!(
                "snapshot {id} is committed in {} but not in the catalog {}",
                target.url,
                cat.redacted_url()
            )
        })?;
        check_against_catalog(&target, &manifest, cat, &found)
            .await
            .with_context(|| format!("snapshot {id}: the catalog and {} disagree", target.url))?;
    }
    let last = Mutex::new((Instant::now(), 0u64));
    let total = manifest.bytes();
    let progress = |s: RestoreStats| {
        let Ok(mut l) = last.lock() else { return };
        if !json_out && l.0.elapsed() >= Duration::from_secs(2) {
            l.0 = Instant::now();
            eprintln!("restore: {} of {total} bytes, {} files", s.bytes, s.files);
        }
        l.1 = s.bytes;
    };
    let stats = restore::restore_into(&target, &manifest, dir, &progress).await?;
    if json_out {
        println!(
            "{}",
            json!({
                "snapshot": id.to_hex(),
                "tenant": record.tenant,
                "dataset": record.dataset,
                "job": record.job,
                "fencing_token": record.fencing_token,
                "files": stats.files,
                "bytes": stats.bytes,
                "catalog_checked": catalog.is_some(),
                "dir": dir.display().to_string(),
            })
        );
    } else {
        println!(
            "restored snapshot {id} of {}/{} ({} files, {} bytes, every file's BLAKE3 verified{}) into {}",
            record.tenant,
            record.dataset,
            stats.files,
            stats.bytes,
            if catalog.is_some() { ", matches the catalog" } else { "" },
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `bitclone restore --from URL --list`: the commit records an
/// object-store sink holds (token, snapshot, job) and how many objects it
/// holds besides its own metadata, for an operator (or the chaos oracle)
/// to see what is there before restoring.
pub async fn list(from: &str, s3: S3Options, json_out: bool) -> Result<ExitCode> {
    let target = objects::open_target(from, &s3.or_env())?;
    let mut commits = Vec::new();
    for (token, snapshot) in objects::list_commits(&target).await? {
        let r = objects::read_commit(&target, token, &snapshot).await?;
        commits.push(json!({
            "fencing_token": token,
            "snapshot": snapshot,
            "tenant": r.tenant,
            "dataset": r.dataset,
            "job": r.job,
            "files": r.files,
        }));
    }
    let meta = format!("{}/", objects::META_DIR);
    let prefix = target.prefix.as_ref().to_string();
    // Counted as the listing streams: a sink may hold millions of objects.
    let data_objects = target
        .store
        .list(Some(&target.prefix))
        .try_fold(0usize, |n, m| {
            let rel = m.location.as_ref();
            let rel = rel.strip_prefix(prefix.as_str()).unwrap_or(rel);
            let data = !rel.trim_start_matches('/').starts_with(&meta);
            futures::future::ready(Ok(n + usize::from(data)))
        })
        .await
        .with_context(|| format!("listing {}", target.url))?;
    if json_out {
        println!(
            "{}",
            json!({"from": target.url, "commits": commits, "data_objects": data_objects})
        );
    } else {
        for c in &commits {
            println!(
                "token {} snapshot {} ({}/{}, {} files) by job {}",
                c["fencing_token"], c["snapshot"], c["tenant"], c["dataset"], c["files"], c["job"]
            );
        }
        println!(
            "{} commit record(s); {data_objects} data object(s) in {}",
            commits.len(),
            target.url
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The newest snapshot committed in the object store that the catalog also
/// has: a snapshot counts only once both sinks committed it.
async fn newest_in_both(
    target: &objects::Target,
    cat: &Catalog,
) -> Result<(objects::CommitRecord, Stored)> {
    let commits = objects::list_commits(target).await?;
    if commits.is_empty() {
        bail!("no committed snapshot in {}", target.url);
    }
    for (token, snap) in commits.iter().rev() {
        let id: SnapshotId = snap.parse()?;
        if cat.find_snapshot(&id).await?.is_some() {
            return Ok(restore::read_committed(target, *token, snap).await?);
        }
    }
    bail!(
        "none of the {} snapshots committed in {} is in the catalog {}",
        commits.len(),
        target.url,
        cat.redacted_url()
    )
}

/// Every file of the manifest, and nothing else, is in the catalog with the
/// same size, mode and BLAKE3. Both are read in path order, a page (or a
/// batch of rows) at a time, and compared through digests of runs of files:
/// memory stays flat, and a difference is still placed within one run.
async fn check_against_catalog(
    target: &objects::Target,
    root: &Stored,
    cat: &Catalog,
    found: &CatalogSnapshot,
) -> Result<()> {
    let ours = digest_pages(objects::sink_entries(target, root.clone())).await?;
    compare(ours, digest_catalog(cat, found).await?)
}

/// Whether a catalog's rows of `found` differ from the files `entries`
/// yields (a snapshot read from the chunk store), and where: a reconcile's
/// check of a catalog.
pub async fn catalog_drift(
    entries: bitclone_storage::EntryPages<'_>,
    cat: &Catalog,
    found: &CatalogSnapshot,
) -> Result<Option<String>, bitclone_storage::Error> {
    let ours = digest_pages(entries).await?;
    let theirs = digest_catalog(cat, found).await?;
    Ok(compare(ours, theirs).err().map(|e| e.to_string()))
}

/// The digests of a snapshot's files, read a page at a time.
async fn digest_pages(
    mut entries: bitclone_storage::EntryPages<'_>,
) -> Result<FileDigest, bitclone_storage::Error> {
    let mut d = FileDigest::default();
    while let Some(page) = entries.next_page().await? {
        for e in page.iter().filter(|e| e.kind == EntryKind::File) {
            d.add(&e.path, e.size, e.mode, &e.blake3);
        }
    }
    Ok(d)
}

/// The digests of a catalog's file rows of `found`, read in batches.
async fn digest_catalog(
    cat: &Catalog,
    found: &CatalogSnapshot,
) -> Result<FileDigest, bitclone_storage::Error> {
    let mut d = FileDigest::default();
    cat.each_entry(found, &mut |r: CatalogEntry| {
        if r.kind == EntryKind::File {
            d.add(&r.path, r.size, r.mode, &r.blake3.unwrap_or_default());
        }
        Ok(())
    })
    .await?;
    Ok(d)
}

/// The manifest's files (`ours`) against the catalog's rows (`theirs`).
fn compare(ours: FileDigest, theirs: FileDigest) -> Result<()> {
    let (ours, theirs) = (ours.finish(), theirs.finish());
    if ours.0 != theirs.0 {
        bail!(
            "{} files in the manifest, {} in the catalog",
            ours.0,
            theirs.0
        );
    }
    if let Some(((from, _), (row, _))) = ours.1.iter().zip(&theirs.1).find(|(a, b)| a.1 != b.1) {
        bail!(
            "files differ (path, size, mode or BLAKE3) in the run of up to {RUN} files from {from:?} \
             (the catalog's run starts at {row:?})"
        );
    }
    Ok(())
}

/// Files per digest in [`FileDigest`].
const RUN: u64 = 4096;

/// Digests of runs of [`RUN`] files (path, size, mode, BLAKE3), each with
/// its first path.
#[derive(Default)]
struct FileDigest {
    files: u64,
    runs: Vec<(String, [u8; 32])>,
    hasher: blake3::Hasher,
}

impl FileDigest {
    fn add(&mut self, path: &str, size: u64, mode: u32, blake3: &[u8; 32]) {
        if self.files % RUN == 0 {
            self.close();
            self.runs.push((path.to_string(), [0; 32]));
        }
        self.files += 1;
        let h = &mut self.hasher;
        h.update(&(path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update(&size.to_le_bytes());
        h.update(&mode.to_le_bytes());
        h.update(blake3);
    }

    fn close(&mut self) {
        if let Some(last) = self.runs.last_mut() {
            last.1 = *self.hasher.finalize().as_bytes();
            self.hasher.reset();
        }
    }

    fn finish(mut self) -> (u64, Vec<(String, [u8; 32])>) {
        self.close();
        (self.files, self.runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(files: &[(&str, u64, u32)]) -> FileDigest {
        let mut d = FileDigest::default();
        for (path, size, mode) in files {
            d.add(path, *size, *mode, &[7; 32]);
        }
        d
    }

    #[test]
    fn a_difference_is_placed_in_its_run_of_files() {
        let names: Vec<String> = (0..(2 * RUN + 5)).map(|i| format!("f{i:06}")).collect();
        let files: Vec<(&str, u64, u32)> = names.iter().map(|n| (n.as_str(), 1, 0o644)).collect();
        compare(digest(&files), digest(&files)).unwrap();

        let mut changed = files.clone();
        changed[RUN as usize + 3].2 = 0o600;
        let err = compare(digest(&files), digest(&changed))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("f{:06}", RUN)), "{err}");

        let err = compare(digest(&files), digest(&files[1..]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("files in the manifest"), "{err}");
    }
}
