//! The Postgres catalog sink: one row per snapshot and per entry, so that what
//! was cloned can be queried and restored without the cluster.
//!
//! A `postgres://` URL names the database. Tables live in the connection's
//! default schema, prefixed `bitclone_`, and are created by the versioned
//! [`MIGRATIONS`] at [`Catalog::connect`]. A commit is one transaction per
//! snapshot, fenced per dataset: a writer holding a lower fencing token than
//! one already committed for the dataset (its lease was superseded; tokens
//! grow across jobs) is refused.
//!
//! TLS follows `sslmode`: absent or `disable` is plaintext; `prefer`,
//! `require`, `verify-ca` and `verify-full` use rustls (aws-lc-rs) and always
//! verify the server's chain and host name, against the webpki roots or the
//! PEM file named by `sslrootcert=`. (libpq's `require` skips verification;
//! here a self-signed server needs its CA given as `sslrootcert`.)

mod errors;
pub mod migrations;
mod tls;
mod url;

pub use self::migrations::MIGRATIONS;
pub use self::url::{check_url, has_password, public_url, redact_url, root_cert};

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures::stream::BoxStream;
use futures::TryStreamExt;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};

use self::errors::{Failure, RETRY};
use self::migrations::MIGRATION_LOCK_KEY;
use self::tls::rustls_connector;
use self::url::parse_url;
use crate::chunk::SnapshotId;
use crate::error::{Error, Result};
use crate::manifest::{Entry, EntryKind, Stored};

const POOL_SIZE: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ATTEMPTS: u32 = 5;

const COPY_ENTRIES: &str = "COPY bitclone_entries \
    (tenant, dataset, snapshot, path, kind, size, mode, blake3, chunk_count) \
    FROM STDIN (FORMAT binary)";

/// Reads a snapshot's entries in path order, from the start each call (a
/// retried commit copies them again).
pub type ReadEntries<'a> = dyn Fn() -> BoxStream<'a, Result<Entry>> + Send + Sync + 'a;

const ENTRIES_QUERY: &str =
    "SELECT path, kind, size, mode, blake3, chunk_count FROM bitclone_entries \
    WHERE tenant = $1 AND dataset = $2 AND snapshot = $3 ORDER BY path COLLATE \"C\"";

/// Rows fetched at a time by [`Catalog::each_entry`].
const ENTRY_BATCH: i32 = 8192;

/// What to write for one snapshot.
#[derive(Clone, Copy)]
pub struct CatalogCommit<'a> {
    /// The snapshot's stored root (tenant, dataset, parent, totals).
    pub manifest: &'a Stored,
    /// Its entries, copied into the catalog as they stream by: no commit
    /// holds a whole manifest.
    pub entries: &'a ReadEntries<'a>,
    /// The snapshot id (BLAKE3 of the encoded manifest).
    pub snapshot: &'a SnapshotId,
    /// The job writing it.
    pub job: &'a str,
    /// The job's fencing token from its current lease.
    pub fencing_token: u64,
}

/// How a commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The snapshot's rows were written and the dataset head moved to it.
    Committed,
    /// The snapshot was already in the catalog; nothing was duplicated.
    AlreadyCommitted,
}

/// One snapshot as recorded in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogSnapshot {
    /// Owner of the dataset.
    pub tenant: String,
    /// Dataset name.
    pub dataset: String,
    /// Snapshot id.
    pub id: SnapshotId,
    /// The snapshot this one was taken against.
    pub parent: Option<SnapshotId>,
    /// The job that committed it.
    pub job: String,
    /// The fencing token it was committed with.
    pub fencing_token: u64,
    /// Number of regular files.
    pub files: u64,
    /// Total bytes of all files.
    pub bytes: u64,
}

/// One entry of a snapshot as recorded in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Relative `/`-separated path.
    pub path: String,
    /// File or directory.
    pub kind: EntryKind,
    /// Length in bytes.
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// BLAKE3 of the whole file; `None` for directories and old manifests.
    pub blake3: Option<[u8; 32]>,
    /// Number of chunks of the file.
    pub chunk_count: u32,
}

/// A pooled connection to the catalog database.
#[derive(Clone)]
pub struct Catalog {
    pool: Pool,
    redacted: String,
    endpoint: String,
    sink: String,
}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Catalog")
            .field("url", &self.redacted)
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// Parses `url`, builds the pool, checks that the server answers and
    /// applies missing [`MIGRATIONS`].
    ///
    /// Errors: `InvalidArgument` for a bad URL (the password never appears
    /// in messages), `Unavailable` when the server cannot be reached after
    /// retries, `Sink` when the server refuses (authentication, rights).
    /// The password is the URL's, if it has one: nothing is taken from the
    /// environment (see [`Catalog::connect_with_password`]).
    pub async fn connect(url: &str) -> Result<Catalog> {
        Self::connect_with_password(url, None).await
    }

    /// [`Catalog::connect`] with a password kept out of the URL (so out of
    /// records and messages); a password in the URL wins.
    pub async fn connect_with_password(url: &str, password: Option<&[u8]>) -> Result<Catalog> {
        let mut target = parse_url(url)?;
        if let (None, Some(p)) = (target.config.get_password(), password) {
            target.config.password(p);
        }
        let manager_config = ManagerConfig {
            // A server restart leaves dead pooled connections; check each one
            // before handing it out instead of failing the next query.
            recycling_method: RecyclingMethod::Verified,
        };
        let manager = match &target.tls {
            None => Manager::from_config(target.config, NoTls, manager_config),
            Some(root_cert) => {
                let tls = rustls_connector(root_cert.as_deref()).await?;
                Manager::from_config(target.config, tls, manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT * 2))
            .wait_timeout(Some(Duration::from_secs(60)))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("postgres pool: {e}")))?;
        let catalog = Catalog {
            pool,
            redacted: target.redacted,
            endpoint: target.endpoint,
            sink: target.sink,
        };
        let this = &catalog;
        this.retry("connect", move || this.ping()).await?;
        this.retry("migrate", move || this.migrate_once()).await?;
        Ok(catalog)
    }

    /// The URL with its password replaced by `***`, for messages.
    pub fn redacted_url(&self) -> &str {
        &self.redacted
    }

    /// Records `c` in one transaction: the snapshot row, its entries (binary
    /// COPY) and the dataset head.
    ///
    /// Idempotent: a snapshot already present is not written again
    /// ([`CommitOutcome::AlreadyCommitted`]), so a retried job leaves the
    /// same rows. Fenced: a token lower than the highest already committed
    /// for the dataset is refused with [`Error::Fenced`] and nothing changes.
    pub async fn commit(&self, c: &CatalogCommit<'_>) -> Result<CommitOutcome> {
        let token = i64::try_from(c.fencing_token).map_err(|_| {
            Error::InvalidArgument(format!("fencing token {} is out of range", c.fencing_token))
        })?;
        self.retry("commit", move || self.commit_once(c, token))
            .await
    }

    /// Deletes every row of `tenant` (its entries, snapshots, datasets and
    /// its name) in one transaction; returns the rows deleted. Safe to run
    /// again (it then deletes nothing).
    pub async fn erase_tenant(&self, tenant: &str) -> Result<u64> {
        self.retry("erase_tenant", move || async move {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let mut rows = 0;
            for sql in [
                "DELETE FROM bitclone_entries WHERE tenant = $1",
                "DELETE FROM bitclone_snapshots WHERE tenant = $1",
                "DELETE FROM bitclone_datasets WHERE tenant = $1",
                "DELETE FROM bitclone_tenants WHERE name = $1",
            ] {
                rows += tx.execute(sql, &[&tenant]).await?;
            }
            tx.commit().await?;
            Ok(rows)
        })
        .await
    }

    /// Deletes one snapshot's rows (its entries go with it), so that a
    /// commit of it writes them all again: a reconcile's repair of rows
    /// that drifted. The dataset's head is left as it is.
    pub async fn drop_snapshot(&self, tenant: &str, dataset: &str, id: &SnapshotId) -> Result<u64> {
        let hex = id.to_hex();
        self.retry("drop_snapshot", move || {
            let hex = hex.clone();
            async move {
                let client = self.pool.get().await?;
                Ok(client
                    .execute(
                        "DELETE FROM bitclone_snapshots WHERE tenant = $1 AND dataset = $2 \
                         AND id = $3",
                        &[&tenant, &dataset, &hex],
                    )
                    .await?)
            }
        })
        .await
    }

    /// Rows of `tenant` left in the catalog's tables (0 once erased).
    pub async fn tenant_rows(&self, tenant: &str) -> Result<u64> {
        let sql = "SELECT (SELECT count(*) FROM bitclone_entries WHERE tenant = $1) \
                   + (SELECT count(*) FROM bitclone_snapshots WHERE tenant = $1) \
                   + (SELECT count(*) FROM bitclone_datasets WHERE tenant = $1) \
                   + (SELECT count(*) FROM bitclone_tenants WHERE name = $1)";
        let counts = self
            .select("tenant_rows", sql, &[&tenant], |row| {
                Ok(row.try_get::<_, i64>(0)?)
            })
            .await?;
        Ok(counts.first().copied().unwrap_or(0).max(0) as u64)
    }

    /// The head snapshot of a dataset, if the catalog has one.
    pub async fn latest(&self, tenant: &str, dataset: &str) -> Result<Option<CatalogSnapshot>> {
        let sql = snapshot_query("s.id = d.head_snapshot AND d.tenant = $1 AND d.name = $2");
        let params: [&(dyn ToSql + Sync); 2] = [&tenant, &dataset];
        let found = self
            .select("latest", &sql, &params, snapshot_from_row)
            .await?;
        Ok(found.into_iter().next())
    }

    /// A snapshot by id, in whichever tenant and dataset holds it.
    pub async fn find_snapshot(&self, id: &SnapshotId) -> Result<Option<CatalogSnapshot>> {
        let (sql, hex) = (snapshot_query("s.id = $1"), id.to_hex());
        let found = self
            .select("find_snapshot", &sql, &[&hex], snapshot_from_row)
            .await?;
        Ok(found.into_iter().next())
    }

    /// The entries of a snapshot, ordered by path (byte order, as in manifests).
    /// Every row in memory: [`Catalog::each_entry`] reads them in batches.
    pub async fn entries(&self, s: &CatalogSnapshot) -> Result<Vec<CatalogEntry>> {
        let hex = s.id.to_hex();
        let params: [&(dyn ToSql + Sync); 3] = [&s.tenant, &s.dataset, &hex];
        self.select("entries", ENTRIES_QUERY, &params, entry_from_row)
            .await
    }

    /// Calls `f` with each entry of a snapshot in path order (byte order, as
    /// in manifests), fetched in batches from one cursor: memory stays flat
    /// however many entries the snapshot has. Not retried (`f` has seen
    /// rows by then); returns the number of entries.
    pub async fn each_entry(
        &self,
        s: &CatalogSnapshot,
        f: &mut (dyn FnMut(CatalogEntry) -> Result<()> + Send),
    ) -> Result<u64> {
        let run = async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let hex = s.id.to_hex();
            let params: [&(dyn ToSql + Sync); 3] = [&s.tenant, &s.dataset, &hex];
            let portal = tx.bind(ENTRIES_QUERY, &params).await?;
            let mut n = 0u64;
            loop {
                // Each page of the cursor is one request (the caller's
                // work on it is not timed).
                let started = std::time::Instant::now();
                let rows = tx.query_portal(&portal, ENTRY_BATCH).await;
                let ok = rows.is_ok();
                crate::sink::requests::observe("catalog", "entries_page", ok, started, 0);
                let rows = rows?;
                if rows.is_empty() {
                    break;
                }
                for row in &rows {
                    f(entry_from_row(row)?)?;
                    n += 1;
                }
            }
            tx.commit().await?;
            Ok::<_, Failure>(n)
        };
        run.await
            .map_err(|f| f.into_error(&self.endpoint, &self.sink))
    }

    async fn select<T>(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        map: fn(&Row) -> Result<T, Failure>,
    ) -> Result<Vec<T>> {
        self.retry(what, move || async move {
            let rows = self.pool.get().await?.query(sql, params).await?;
            rows.iter().map(map).collect::<Result<Vec<T>, Failure>>()
        })
        .await
    }

    async fn ping(&self) -> Result<(), Failure> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn migrate_once(&self) -> Result<(), Failure> {
        // Taken out of the pool for good: if anything below fails, dropping the
        // connection ends the session and Postgres releases the advisory lock.
        let mut client = Object::take(self.pool.get().await?);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        // Checked first so that a read-only user (a restore) needs no CREATE right.
        let table: Option<String> = client
            .query_one(
                "SELECT to_regclass('bitclone_schema_migrations')::text",
                &[],
            )
            .await?
            .try_get(0)?;
        if table.is_none() {
            client
                .batch_execute(
                    "CREATE TABLE bitclone_schema_migrations (
                        version integer PRIMARY KEY,
                        name text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now()
                    )",
                )
                .await?;
        }
        let mut applied = Vec::new();
        for row in client
            .query("SELECT version, name FROM bitclone_schema_migrations", &[])
            .await?
        {
            applied.push((row.try_get::<_, i32>(0)?, row.try_get::<_, String>(1)?));
        }
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        for (version, name) in applied.iter().filter(|(v, _)| *v > known) {
            // A newer release already migrated (rolling upgrade): its changes
            // only add, so this node keeps working.
            tracing::warn!(
                catalog = %self.redacted, version, name = %name,
                "catalog schema is newer than this build knows ({known}); continuing"
            );
        }
        for &(version, name, sql) in MIGRATIONS {
            if applied.iter().any(|(v, _)| *v == version) {
                continue;
            }
            let tx = client.transaction().await?;
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO bitclone_schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(catalog = %self.redacted, version, name, "applied catalog migration");
        }
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        Ok(())
    }

    async fn commit_once(
        &self,
        c: &CatalogCommit<'_>,
        token: i64,
    ) -> Result<CommitOutcome, Failure> {
        let m = c.manifest;
        let (tenant, dataset, job) = (m.tenant(), m.dataset(), c.job);
        let id = c.snapshot.to_hex();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO bitclone_tenants (name) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&tenant],
        )
        .await?;
        tx.execute(
            "INSERT INTO bitclone_datasets (tenant, name, max_fencing_token) VALUES ($1, $2, 0) \
             ON CONFLICT DO NOTHING",
            &[&tenant, &dataset],
        )
        .await?;
        // The row lock makes commits to one dataset take turns, so the fence
        // check, the existence check and the head move cannot interleave.
        let max: i64 = tx
            .query_one(
                "SELECT max_fencing_token FROM bitclone_datasets \
                 WHERE tenant = $1 AND name = $2 FOR UPDATE",
                &[&tenant, &dataset],
            )
            .await?
            .try_get(0)?;
        if token < max {
            tx.rollback().await?;
            return Err(Failure::Other(Error::Fenced(format!(
                "token {token} is lower than token {max} already committed for dataset \
                 {tenant}/{dataset} in {}",
                self.sink
            ))));
        }
        let exists = tx
            .query_opt(
                "SELECT 1 FROM bitclone_snapshots WHERE tenant = $1 AND dataset = $2 AND id = $3",
                &[&tenant, &dataset, &id],
            )
            .await?
            .is_some();
        if exists {
            // token >= max here. A higher token re-committing a snapshot the
            // catalog already has makes it the head again, as the object
            // sink's newest record does; an equal one (a retry) changes
            // nothing.
            tx.execute(
                "UPDATE bitclone_datasets SET max_fencing_token = $3, \
                 head_snapshot = CASE WHEN $3 > max_fencing_token THEN $4 ELSE head_snapshot END \
                 WHERE tenant = $1 AND name = $2",
                &[&tenant, &dataset, &token, &id],
            )
            .await?;
            tx.commit().await?;
            return Ok(CommitOutcome::AlreadyCommitted);
        }
        let (parent, created) = (m.parent().map(|p| p.to_hex()), m.created_unix_ms());
        let files = to_i64(m.files(), "file count")?;
        let bytes = to_i64(m.bytes(), "total bytes")?;
        tx.execute(
            "INSERT INTO bitclone_snapshots (tenant, dataset, id, parent, job, fencing_token, \
             files, bytes, created_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &tenant, &dataset, &id, &parent, &job, &token, &files, &bytes, &created,
            ],
        )
        .await?;
        // The types must match the columns exactly: binary COPY does not convert.
        let mut types = vec![Type::TEXT; 4];
        types.extend([Type::INT2, Type::INT8, Type::INT4, Type::BYTEA, Type::INT4]);
        let copy = tx.copy_in(COPY_ENTRIES).await?;
        let mut writer = std::pin::pin!(BinaryCopyInWriter::new(copy, &types));
        let mut entries = (c.entries)();
        while let Some(e) = entries.try_next().await.map_err(Failure::Other)? {
            // A value out of the catalog's range fails the whole transaction.
            let r = entry_row(&e)?;
            let (path, blake3) = (&r.path, &r.blake3);
            let (kind, size, mode, chunks) = (&r.kind, &r.size, &r.mode, &r.chunk_count);
            let row: [&(dyn ToSql + Sync); 9] = [
                &tenant, &dataset, &id, path, kind, size, mode, blake3, chunks,
            ];
            writer.as_mut().write(&row).await?;
        }
        writer.as_mut().finish().await?;
        tx.execute(
            "UPDATE bitclone_datasets SET max_fencing_token = $3, head_snapshot = $4 \
             WHERE tenant = $1 AND name = $2",
            &[&tenant, &dataset, &token, &id],
        )
        .await?;
        tx.commit().await?;
        Ok(CommitOutcome::Committed)
    }

    async fn retry<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut attempt = 1;
        loop {
            let started = std::time::Instant::now();
            let r = op().await;
            crate::sink::requests::observe("catalog", what, r.is_ok(), started, 0);
            match r {
                Ok(v) => return Ok(v),
                Err(f) if attempt < ATTEMPTS && f.transient() => {
                    let delay = RETRY.delay(attempt, crate::backoff::jitter());
                    tracing::warn!(
                        postgres = %self.endpoint, attempt, ?delay, error = %f,
                        "catalog {what} failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(f) => return Err(f.into_error(&self.endpoint, &self.sink)),
            }
        }
    }
}

/// One entries row, converted and range-checked.
struct EntryRow<'a> {
    path: &'a str,
    kind: i16,
    size: i64,
    mode: i32,
    blake3: Option<&'a [u8]>,
    chunk_count: i32,
}

fn entry_row(e: &Entry) -> Result<EntryRow<'_>> {
    let range = |what: &str| {
        Error::InvalidArgument(format!("{:?}: {what} does not fit the catalog", e.path))
    };
    Ok(EntryRow {
        path: &e.path,
        kind: match e.kind {
            EntryKind::File => 0,
            EntryKind::Dir => 1,
            EntryKind::Symlink => 2,
        },
        size: i64::try_from(e.size).map_err(|_| range("size"))?,
        mode: i32::try_from(e.mode).map_err(|_| range("mode"))?,
        blake3: match e.kind {
            EntryKind::File => Some(e.blake3.as_slice()),
            EntryKind::Dir | EntryKind::Symlink => None,
        },
        chunk_count: i32::try_from(e.chunks.len()).map_err(|_| range("chunk count"))?,
    })
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} {v} is out of range")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::decode("catalog row", format!("{what} is negative ({v})")))
}

fn parse_id(s: &str) -> Result<SnapshotId> {
    SnapshotId::from_str(s).map_err(|_| {
        Error::decode(
            "catalog row",
            format!("snapshot id {s:?} is not 64 hex digits"),
        )
    })
}

fn snapshot_query(filter: &str) -> String {
    format!(
        "SELECT s.tenant, s.dataset, s.id, s.parent, s.job, s.fencing_token, s.files, s.bytes \
         FROM bitclone_snapshots s \
         JOIN bitclone_datasets d ON d.tenant = s.tenant AND d.name = s.dataset \
         WHERE {filter} ORDER BY s.tenant, s.dataset"
    )
}

fn snapshot_from_row(row: &Row) -> Result<CatalogSnapshot, Failure> {
    let id: String = row.try_get(2)?;
    let parent: Option<String> = row.try_get(3)?;
    Ok(CatalogSnapshot {
        tenant: row.try_get(0)?,
        dataset: row.try_get(1)?,
        id: parse_id(&id)?,
        parent: parent.as_deref().map(parse_id).transpose()?,
        job: row.try_get(4)?,
        fencing_token: to_u64(row.try_get(5)?, "fencing_token")?,
        files: to_u64(row.try_get(6)?, "files")?,
        bytes: to_u64(row.try_get(7)?, "bytes")?,
    })
}

fn entry_from_row(row: &Row) -> Result<CatalogEntry, Failure> {
    let path: String = row.try_get(0)?;
    let bad = |detail: String| Error::decode("catalog row", format!("{path:?}: {detail}"));
    let kind = match row.try_get::<_, i16>(1)? {
        0 => EntryKind::File,
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        k => return Err(bad(format!("unknown entry kind {k}")).into()),
    };
    let mode: i32 = row.try_get(3)?;
    let chunk_count: i32 = row.try_get(5)?;
    let blake3 = row
        .try_get::<_, Option<Vec<u8>>>(4)?
        .map(|h| {
            <[u8; 32]>::try_from(h.as_slice())
                .map_err(|_| bad(format!("blake3 has {} bytes", h.len())))
        })
        .transpose()?;
    Ok(CatalogEntry {
        kind,
        size: to_u64(row.try_get(2)?, "size")?,
        mode: u32::try_from(mode).map_err(|_| bad(format!("negative mode {mode}")))?,
        blake3,
        chunk_count: u32::try_from(chunk_count)
            .map_err(|_| bad(format!("negative chunk count {chunk_count}")))?,
        path,
    })
}
