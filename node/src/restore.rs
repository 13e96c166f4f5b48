//! `bitclone restore`: the off-cluster restore drill. Reads a committed
//! snapshot back out of an object-store sink (and checks it against the
//! Postgres catalog when given), verifying every file.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitclone_storage::sink::catalog::{Catalog, CatalogEntry};
use bitclone_storage::sink::objects::{self, S3Options};
use bitclone_storage::sink::restore::{self, RestoreStats};
use bitclone_storage::{EntryKind, Manifest, SnapshotId};
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
        Some(url) => Some(Catalog::connect(url).await?),
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
        let entries = cat.entries(&found).await?;
        check_against_catalog(&manifest, &entries)
            .with_context(|| format!("snapshot {id}: the catalog and {} disagree", target.url))?;
    }
    let last = Mutex::new((Instant::now(), 0u64));
    let total = manifest.total_bytes();
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

/// The newest snapshot committed in the object store that the catalog also
/// has: a snapshot counts only once both sinks committed it.
async fn newest_in_both(
    target: &objects::Target,
    cat: &Catalog,
) -> Result<(objects::CommitRecord, Manifest)> {
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
/// same size, mode and BLAKE3.
fn check_against_catalog(m: &Manifest, rows: &[CatalogEntry]) -> Result<()> {
    let files: Vec<_> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .collect();
    let rows: Vec<_> = rows.iter().filter(|r| r.kind == EntryKind::File).collect();
    if files.len() != rows.len() {
        bail!(
            "{} files in the manifest, {} in the catalog",
            files.len(),
            rows.len()
        );
    }
    for (e, r) in files.iter().zip(rows) {
        if e.path != r.path || e.size != r.size || e.mode != r.mode || r.blake3 != Some(e.blake3) {
            bail!(
                "{:?}: manifest has {} bytes mode {:o}, catalog row {:?} has {} bytes mode {:o} (or another BLAKE3)",
                e.path,
                e.size,
                e.mode,
                r.path,
                r.size,
                r.mode
            );
        }
    }
    Ok(())
}
