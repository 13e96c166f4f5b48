//! Sinks: where a clone is written out once its snapshot is committed.
//!
//! Two kinds: object stores ([`objects`]: S3, or a local directory through
//! object_store's filesystem backend) and the Postgres catalog ([`catalog`]).
//! Writes to either are fenced: they carry the job and the fencing token of
//! its lease ([`Writer`]), and a token lower than one already committed is
//! refused. [`restore`] reads a committed snapshot back out without the
//! cluster; [`source`] reads the objects under a prefix as a clone source;
//! [`spec`] holds a job's source and destinations as typed values.
//!
//! A job writes every destination through one interface, [`Sink`]: open it
//! from its [`Destination`], then [`Sink::write`] a committed snapshot.

pub mod catalog;
pub mod objects;
pub mod requests;
pub mod restore;
pub mod source;
pub mod spec;

pub use spec::{Destination, Location, Source};

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use futures::stream::BoxStream;

use crate::chunk::SnapshotId;
use crate::error::Result;
use crate::manifest::{Entry, Stored};
use crate::pool::CpuPool;
use crate::store::{ChunkStore, EntryPages};

/// An opened destination. Cheap to clone (a catalog is a connection pool).
#[derive(Debug, Clone)]
pub enum Sink {
    /// An object store.
    Objects(objects::Target),
    /// A Postgres catalog.
    Catalog(catalog::Catalog),
}

/// What [`Sink::write`] writes, and with what.
pub struct SinkWrite<'a> {
    /// Runs chunk reads and hashing off the async threads.
    pub pool: &'a CpuPool,
    /// Where the snapshot's chunks are.
    pub store: Arc<dyn ChunkStore>,
    /// The committed snapshot's stored root: its entries are read from
    /// `store` a page at a time, never all at once.
    pub manifest: &'a Stored,
    /// Its id.
    pub snapshot: &'a SnapshotId,
    /// The job and fencing token every effect carries.
    pub writer: &'a Writer,
    /// Set to stop: writes in flight end, nothing further starts.
    pub stop: Arc<AtomicBool>,
    /// Called as files are written (object stores).
    pub on_progress: &'a mut (dyn FnMut(objects::ExportProgress) + Send),
}

/// What a write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// Files (objects, or catalog entry rows) written.
    pub files_written: u64,
    /// Files found as they should be and left alone (object stores).
    pub files_unchanged: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Objects deleted because the snapshot no longer has them (mirror).
    pub objects_deleted: u64,
    /// Manifest pages written (object stores hold only those of the
    /// pages they did not have yet).
    pub pages_written: u64,
    /// The snapshot was already committed there; nothing was written.
    pub already_committed: bool,
}

impl SinkWrite<'_> {
    /// The snapshot's entries in path order, read a page at a time from the
    /// chunk store.
    pub(crate) fn entries(&self) -> BoxStream<'static, Result<Entry>> {
        let root = self.manifest.clone();
        EntryPages::from_store(self.pool, self.store.clone(), self.manifest.tenant(), root)
            .into_stream()
    }
}

/// A snapshot a sink holds as committed, and the token it was committed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// The fencing token of the commit.
    pub token: u64,
}

impl Sink {
    /// Opens a destination: an object store's client (a `file://`
    /// directory is created), or a catalog's pool (connected, migrated,
    /// with `pg_password` unless the URL has one). A declared sink
    /// (`sink://`) is resolved to one of those by whoever declared it
    /// before it can be opened.
    pub async fn open(
        dest: &Destination,
        s3: &objects::S3Options,
        pg_password: Option<&[u8]>,
    ) -> Result<Sink> {
        match dest {
            Destination::Objects { location, mirror } => Ok(Sink::Objects(objects::open_location(
                location, *mirror, s3,
            )?)),
            Destination::Catalog { url } => Ok(Sink::Catalog(
                catalog::Catalog::connect_with_password(url, pg_password).await?,
            )),
            Destination::Declared { .. } => Err(crate::Error::InvalidArgument(format!(
                "sink {}: a declared sink is opened through the node that declares it",
                dest.display()
            ))),
        }
    }

    /// The destination as shown to users (no password).
    pub fn name(&self) -> &str {
        match self {
            Sink::Objects(t) => &t.url,
            Sink::Catalog(c) => c.redacted_url(),
        }
    }

    /// Writes a committed snapshot, fenced by `w.writer`'s token:
    /// idempotent (the same snapshot and token again writes nothing) and
    /// refused with [`crate::Error::Fenced`] when a higher token already
    /// committed there.
    ///
    /// Not cancel-safe: stop it with `w.stop`, which lets uploads in flight
    /// end cleanly.
    pub async fn write(&self, w: SinkWrite<'_>) -> Result<Written> {
        match self {
            Sink::Objects(target) => {
                objects::check_create_only(target).await?;
                objects::export_snapshot(target, w).await
            }
            Sink::Catalog(c) => {
                let (pool, store, manifest) = (w.pool, w.store.clone(), w.manifest);
                let entries = move || {
                    let root = manifest.clone();
                    EntryPages::from_store(pool, store.clone(), manifest.tenant(), root)
                        .into_stream()
                };
                let outcome = c
                    .commit(&catalog::CatalogCommit {
                        manifest: w.manifest,
                        entries: &entries,
                        snapshot: w.snapshot,
                        job: &w.writer.job,
                        fencing_token: w.writer.token,
                    })
                    .await?;
                let already = outcome == catalog::CommitOutcome::AlreadyCommitted;
                Ok(Written {
                    files_written: if already { 0 } else { w.manifest.entry_count() },
                    already_committed: already,
                    ..Written::default()
                })
            }
        }
    }

    /// The snapshot of `tenant`/`dataset` the sink holds as committed with
    /// the highest token, if any. An object-store prefix holds one dataset.
    pub async fn latest(&self, tenant: &str, dataset: &str) -> Result<Option<Committed>> {
        match self {
            Sink::Objects(t) => match objects::latest_commit(t).await? {
                Some(r) => Ok(Some(Committed {
                    snapshot: r.snapshot_id()?,
                    token: r.fencing_token,
                })),
                None => Ok(None),
            },
            Sink::Catalog(c) => Ok(c.latest(tenant, dataset).await?.map(|s| Committed {
                snapshot: s.id,
                token: s.fencing_token,
            })),
        }
    }
}

/// Who is writing: the job and the fencing token of its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    /// Job id.
    pub job: String,
    /// Fencing token.
    pub token: u64,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
