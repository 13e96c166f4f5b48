//! Objects as a clone source: everything under an object-store prefix,
//! streamed through the chunker into a snapshot as it downloads.

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};
use crate::ingest::{ingest_stream, SnapshotBuilder};
use crate::path::validate_path;
use crate::sink::objects::layout::list_under;
use crate::sink::objects::s3::sink_error;
use crate::sink::objects::Target;

/// A blocking reader over an object's byte stream, fed by an async task:
/// lets the chunker (on a blocking thread) read an object as it downloads.
struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    buf: Bytes,
}

impl Read for StreamReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}

/// Ingests every object under `target` (outside `.bitclone/`) into
/// `builder`: objects stream through the chunker on blocking threads (up to
/// the target's concurrency, and no more than the cores, two at least); an object whose
/// size and modification time match the parent snapshot is taken over
/// without reading it. Keys that are not safe relative paths are skipped
/// (keys object_store cannot parse at all, such as `a//b`, fail the listing)
/// (and reported by the builder). `progress(files, bytes)` follows the work.
pub async fn ingest_objects(
    target: &Target,
    mut builder: SnapshotBuilder,
    cancel: Arc<AtomicBool>,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<SnapshotBuilder> {
    let mut objects = list_under(target, "listing the source").await?;
    objects.sort_by(|a, b| a.0.cmp(&b.0));
    // Empty "folder" objects (`dir/`, as S3 consoles make them) name a
    // directory that other keys are under: they are not files.
    let dirs: HashSet<&str> = objects
        .iter()
        .flat_map(|(rel, _)| rel.match_indices('/').map(move |(i, _)| &rel[..i]))
        .collect();
    let folders: HashSet<String> = objects
        .iter()
        .filter(|(rel, m)| m.size == 0 && dirs.contains(rel.as_str()))
        .map(|(rel, _)| rel.clone())
        .collect();
    objects.retain(|(rel, _)| !folders.contains(rel));
    let (store, tenant) = (builder.store().clone(), builder.tenant().to_string());
    let params = builder.chunking();
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut todo = Vec::new();
    for (rel, meta) in objects {
        let mtime_ns = meta
            .last_modified
            .timestamp_nanos_opt()
            .unwrap_or_else(|| meta.last_modified.timestamp().saturating_mul(1_000_000_000));
        if validate_path(&rel).is_err() {
            builder.skip(rel);
        } else {
            let old = builder.unchanged(&rel, meta.size, mtime_ns, 0o644)?;
            todo.push((rel, meta, mtime_ns, old));
        }
    }
    // In key order: the builder takes entries in path order.
    let mut results = futures::stream::iter(todo.into_iter().map(|(rel, meta, mtime_ns, old)| {
        let (store, tenant, cancel) = (store.clone(), tenant.clone(), cancel.clone());
        async move {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            if let Some(old) = old {
                return Ok((rel, mtime_ns, Err(old)));
            }
            let got = target
                .store
                .get(&meta.location)
                .await
                .map_err(|e| sink_error(target, &format!("reading {rel}"), e))?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut stream = got.into_stream();
            let feeder = tokio::spawn(async move {
                while let Some(b) = stream.next().await {
                    let b = b.map_err(|e| std::io::Error::other(e.to_string()));
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
            });
            let source = PathBuf::from(format!("{}/{rel}", target.url));
            // On a blocking thread, not the CPU pool: this reader waits on
            // the network, and the pool's few threads serve the whole node.
            let data = tokio::task::spawn_blocking(move || {
                let reader = StreamReader {
                    rx,
                    buf: Bytes::new(),
                };
                ingest_stream(
                    store.as_ref(),
                    &tenant,
                    params,
                    reader,
                    &source,
                    &cancel,
                    &mut |_| {},
                )
            })
            .await
            .map_err(|_| Error::Panicked)
            .and_then(|r| r);
            feeder.abort();
            Ok((rel, mtime_ns, Ok(data?)))
        }
    }))
    .buffered(target.concurrency.min(cores()))
    .boxed();
    while let Some(r) = results.next().await {
        let (rel, mtime_ns, read) = r?;
        files += 1;
        match read {
            Ok(data) => {
                bytes += data.size;
                builder.add_file(&rel, 0o644, mtime_ns, data)?;
            }
            // Taken over from the parent without reading it.
            Err(old) => {
                bytes += old.size;
                builder.add_taken(old)?;
            }
        }
        progress(files, bytes);
    }
    Ok(builder)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}
