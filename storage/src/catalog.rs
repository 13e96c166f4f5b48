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

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::chunk::SnapshotId;
use crate::error::{with_causes, Error, Result};
use crate::manifest::{EntryKind, Manifest};

/// Schema migrations, applied in order at start: `(version, name, SQL)`.
///
/// Rule (expand → migrate → contract): a migration only adds — tables,
/// nullable columns or columns with a default, indexes — so that nodes of the
/// previous release keep working against the new schema during a rolling
/// upgrade. Dropping or renaming comes in a later release, once no running
/// version reads the old column. Never edit a released migration; add one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "catalog tables",
        "CREATE TABLE bitclone_tenants (name text PRIMARY KEY);
        CREATE TABLE bitclone_datasets (
            tenant text NOT NULL REFERENCES bitclone_tenants (name), name text NOT NULL,
            max_fencing_token bigint NOT NULL, head_snapshot text,
            PRIMARY KEY (tenant, name));
        CREATE TABLE bitclone_snapshots (
            tenant text NOT NULL, dataset text NOT NULL,
            id text NOT NULL CHECK (id ~ '^[0-9a-f]{64}$'),
            parent text CHECK (parent ~ '^[0-9a-f]{64}$'),
            job text NOT NULL, fencing_token bigint NOT NULL,
            files bigint NOT NULL, bytes bigint NOT NULL, created_unix_ms bigint NOT NULL,
            PRIMARY KEY (tenant, dataset, id),
            FOREIGN KEY (tenant, dataset) REFERENCES bitclone_datasets (tenant, name));
        CREATE INDEX bitclone_snapshots_by_id ON bitclone_snapshots (id);
        CREATE TABLE bitclone_entries (
            tenant text NOT NULL, dataset text NOT NULL, snapshot text NOT NULL,
            path text NOT NULL, kind smallint NOT NULL, size bigint NOT NULL,
            mode integer NOT NULL, blake3 bytea CHECK (octet_length(blake3) = 32),
            chunk_count integer NOT NULL,
            PRIMARY KEY (tenant, dataset, snapshot, path),
            FOREIGN KEY (tenant, dataset, snapshot)
                REFERENCES bitclone_snapshots (tenant, dataset, id) ON DELETE CASCADE);",
    ),
    (
        2,
        "snapshots.committed_at",
        // Expand only: a default, so writers that do not know the column still work.
        "ALTER TABLE bitclone_snapshots
            ADD COLUMN committed_at timestamptz NOT NULL DEFAULT now();",
    ),
];

/// Session-level advisory lock serialising migrations across nodes ("bitclone").
const MIGRATION_LOCK_KEY: i64 = 0x6269_7463_6c6f_6e65;
const POOL_SIZE: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ATTEMPTS: u32 = 5;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

const COPY_ENTRIES: &str = "COPY bitclone_entries \
    (tenant, dataset, snapshot, path, kind, size, mode, blake3, chunk_count) \
    FROM STDIN (FORMAT binary)";

/// What to write for one snapshot.
#[derive(Debug, Clone, Copy)]
pub struct CatalogCommit<'a> {
    /// The snapshot's manifest (tenant, dataset, parent and entries).
    pub manifest: &'a Manifest,
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
    pub async fn connect(url: &str) -> Result<Catalog> {
        let target = parse_url(url)?;
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
        let rows = entry_rows(c.manifest)?;
        let rows = rows.as_slice();
        self.retry("commit", move || self.commit_once(c, token, rows))
            .await
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
            .select("find snapshot", &sql, &[&hex], snapshot_from_row)
            .await?;
        Ok(found.into_iter().next())
    }

    /// The entries of a snapshot, ordered by path (byte order, as in manifests).
    pub async fn entries(&self, s: &CatalogSnapshot) -> Result<Vec<CatalogEntry>> {
        let sql = "SELECT path, kind, size, mode, blake3, chunk_count FROM bitclone_entries \
                   WHERE tenant = $1 AND dataset = $2 AND snapshot = $3 ORDER BY path COLLATE \"C\"";
        let hex = s.id.to_hex();
        let params: [&(dyn ToSql + Sync); 3] = [&s.tenant, &s.dataset, &hex];
        self.select("entries", sql, &params, entry_from_row).await
    }

    async fn select<T>(
        &self,
        what: &str,
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
        rows: &[EntryRow<'_>],
    ) -> Result<CommitOutcome, Failure> {
        let m = c.manifest;
        let (tenant, dataset, job) = (m.tenant.as_str(), m.dataset.as_str(), c.job);
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
        let (parent, created) = (m.parent.map(|p| p.to_hex()), m.created_unix_ms);
        let files = to_i64(m.file_count(), "file count")?;
        let bytes = to_i64(m.total_bytes(), "total bytes")?;
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
        for r in rows {
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

    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(f) if attempt < ATTEMPTS && f.transient() => {
                    let delay = backoff(attempt);
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

/// One entries row, converted (and range-checked) before the transaction.
struct EntryRow<'a> {
    path: &'a str,
    kind: i16,
    size: i64,
    mode: i32,
    blake3: Option<&'a [u8]>,
    chunk_count: i32,
}

fn entry_rows(m: &Manifest) -> Result<Vec<EntryRow<'_>>> {
    m.entries
        .iter()
        .map(|e| {
            let range = |what: &str| {
                Error::InvalidArgument(format!("{:?}: {what} does not fit the catalog", e.path))
            };
            Ok::<_, Error>(EntryRow {
                path: &e.path,
                kind: match e.kind {
                    EntryKind::File => 0,
                    EntryKind::Dir => 1,
                },
                size: i64::try_from(e.size).map_err(|_| range("size"))?,
                mode: i32::try_from(e.mode).map_err(|_| range("mode"))?,
                blake3: match e.kind {
                    EntryKind::File => Some(e.blake3.as_slice()),
                    EntryKind::Dir => None,
                },
                chunk_count: i32::try_from(e.chunks.len()).map_err(|_| range("chunk count"))?,
            })
        })
        .collect()
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

/// Why one attempt failed; kept raw until the retry loop decides.
enum Failure {
    Pg(tokio_postgres::Error),
    Pool(PoolError),
    Other(Error),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Pg(e)
    }
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        Failure::Pool(e)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Other(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Pg(e) => write!(f, "{e}"),
            Failure::Pool(e) => write!(f, "{e}"),
            Failure::Other(e) => write!(f, "{e}"),
        }
    }
}

impl Failure {
    fn transient(&self) -> bool {
        match self {
            Failure::Pg(e) | Failure::Pool(PoolError::Backend(e)) => is_transient(e),
            Failure::Pool(PoolError::Timeout(_)) => true,
            Failure::Pool(_) | Failure::Other(_) => false,
        }
    }

    fn into_error(self, endpoint: &str, sink: &str) -> Error {
        match self {
            Failure::Other(e) => e,
            Failure::Pg(e) | Failure::Pool(PoolError::Backend(e)) => {
                let text = with_causes(&e);
                if tls_refused(&e) {
                    Error::Sink {
                        sink: sink.to_owned(),
                        detail: text,
                        permanent: true,
                    }
                } else if is_connection_error(&e) {
                    Error::Unavailable(format!("postgres at {endpoint} is unreachable: {text}"))
                } else if is_transient(&e) {
                    Error::Unavailable(format!(
                        "postgres at {endpoint}: {text} (gave up after {ATTEMPTS} attempts)"
                    ))
                } else {
                    Error::Sink {
                        sink: sink.to_owned(),
                        detail: text,
                        // Without an SQLSTATE nothing is known to be lasting
                        // (a DNS hiccup): worth the job's retries.
                        permanent: e.code().is_some_and(|c| is_permanent_sqlstate(c.code())),
                    }
                }
            }
            Failure::Pool(e) => Error::Unavailable(format!("postgres at {endpoint}: {e}")),
        }
    }
}

/// Whether `e` comes from a TLS failure (a certificate that does not verify,
/// a server without TLS): retrying cannot fix it.
fn tls_refused(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        source = s.source();
    }
    let text = with_causes(e);
    text.contains("TLS") || text.contains("certificate")
}

/// Connection exceptions and server shutdown / start-up.
fn is_connection_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

/// Errors worth another attempt: the connection ones, serialization
/// failures, deadlocks and too many connections.
fn is_transient_sqlstate(code: &str) -> bool {
    is_connection_sqlstate(code) || matches!(code, "40001" | "40P01" | "53300")
}

/// Errors a retry of the whole job will not fix: authentication, access
/// rules and syntax, missing database or schema, bad data, constraints.
fn is_permanent_sqlstate(code: &str) -> bool {
    matches!(
        code.get(..2),
        Some("28" | "42" | "3D" | "3F" | "22" | "23" | "0A")
    )
}

fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => is_connection_sqlstate(code.code()),
        None => e.is_closed() || broken_io(e),
    }
}

fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => is_transient_sqlstate(code.code()),
        None => is_connection_error(e),
    }
}

/// An I/O error in `e`'s source chain that a new connection may not hit.
fn broken_io(e: &tokio_postgres::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::NotConnected
                    | K::BrokenPipe
                    | K::TimedOut
                    | K::UnexpectedEof
                    | K::Interrupted
                    | K::HostUnreachable
                    | K::NetworkUnreachable
            );
        }
        source = s.source();
    }
    false
}

/// Equal-jitter exponential backoff before attempt `attempt + 1`.
fn backoff(attempt: u32) -> Duration {
    let full = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    let half = full / 2;
    half + half.mul_f64(jitter())
}

/// A number in [0, 1); std's per-instance random hash keys stand in for rand.
fn jitter() -> f64 {
    use std::hash::BuildHasher;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let h = std::collections::hash_map::RandomState::new().hash_one(nanos);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

async fn rustls_connector(root_cert: Option<&Path>) -> Result<MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let pem = tokio::fs::read(path)
                .await
                .map_err(|e| Error::io("read sslrootcert", path, e))?;
            let bad =
                |e: String| Error::InvalidArgument(format!("sslrootcert {}: {e}", path.display()));
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots
                    .add(cert.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no PEM certificate in the file".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidArgument(format!("postgres TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A parsed catalog URL.
#[derive(Debug)]
struct Target {
    config: tokio_postgres::Config,
    /// `None`: plaintext; `Some(ca)`: TLS, verified against `ca` or the webpki roots.
    tls: Option<Option<PathBuf>>,
    redacted: String,
    endpoint: String,
    /// `scheme://hosts/dbname`: no credentials, no parameters.
    sink: String,
}

fn parse_url(url: &str) -> Result<Target> {
    let url = url.trim();
    let redacted = redact(url);
    let bad = |why: &str| Error::InvalidArgument(format!("postgres URL {redacted}: {why}"));
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("expected postgres://user:password@host:port/dbname"));
    };
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(bad("the scheme must be postgres:// or postgresql://"));
    }
    // tokio-postgres knows neither sslrootcert nor the verify-* modes: take
    // them out and pass the rest through unchanged (encoding included).
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut sslmode, mut root_cert, mut kept, mut port) = (None, None, Vec::new(), None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = url::form_urlencoded::parse(pair.as_bytes())
            .next()
            .unwrap_or_default();
        match &*key {
            "sslmode" => sslmode = Some(value.into_owned()),
            "sslrootcert" => root_cert = Some(PathBuf::from(value.into_owned())),
            k => {
                if k == "port" {
                    port = Some(value.into_owned());
                }
                kept.push(pair);
            }
        }
    }
    let (mode, tls) = match sslmode.as_deref() {
        None if root_cert.is_some() => (SslMode::Require, true),
        None | Some("disable") => (SslMode::Disable, false),
        Some("prefer") => (SslMode::Prefer, true),
        Some("require" | "verify-ca" | "verify-full") => (SslMode::Require, true),
        Some(_) => {
            return Err(bad(
                "sslmode must be disable, prefer, require, verify-ca or verify-full",
            ))
        }
    };
    if root_cert.is_some() && !tls {
        return Err(bad(
            "sslrootcert is given but sslmode=disable turns TLS off",
        ));
    }
    let cleaned = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config = tokio_postgres::Config::from_str(&cleaned).map_err(|e| bad(&e.to_string()))?;
    if config.get_user().is_none() {
        return Err(bad("no user given"));
    }
    if config.get_hosts().is_empty() {
        return Err(bad("no host given"));
    }
    config.ssl_mode(mode);
    // As libpq does: a password can stay out of the URL (and so out of job
    // records and listings) in the process's PGPASSWORD.
    if config.get_password().is_none() {
        if let Some(p) = std::env::var_os("PGPASSWORD").filter(|p| !p.is_empty()) {
            config.password(p.as_encoded_bytes());
        }
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("bitclone");
    }
    Ok(Target {
        config,
        tls: tls.then_some(root_cert),
        endpoint: endpoint(rest, port.as_deref().unwrap_or("5432")),
        sink: format!("{scheme}://{}", sink_part(rest)),
        redacted,
    })
}

/// The part after `://` without user info and parameters. Like
/// tokio-postgres, the user info runs up to the first '@'.
fn sink_part(rest: &str) -> &str {
    let after_at = rest.split_once('@').map_or(rest, |(_, a)| a);
    after_at.split_once('?').map_or(after_at, |(a, _)| a)
}

/// `host:port[,host:port…]` from the part after `://`, for messages.
fn endpoint(rest: &str, default_port: &str) -> String {
    let part = sink_part(rest);
    let hosts = part.split_once('/').map_or(part, |(h, _)| h);
    if hosts.is_empty() {
        return format!("the host given in the URL parameters (port {default_port})");
    }
    hosts
        .split(',')
        .map(|h| match h.rfind(':') {
            Some(i) if !h[i..].contains(']') => h.to_owned(),
            _ => format!("{h}:{default_port}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `url` with the password (in the user info or a `password=` parameter)
/// replaced by `***`.
/// `url` with any password replaced by `***`: for job listings and logs.
pub fn redact_url(url: &str) -> String {
    redact(url)
}

/// Checks a catalog URL without connecting (a clear error at submit time
/// rather than when the job runs).
pub fn check_url(url: &str) -> Result<()> {
    parse_url(url).map(|_| ())
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".to_owned();
    };
    // Like tokio-postgres, the user info runs up to the first '@'.
    let (userinfo, after_at) = match rest.split_once('@') {
        Some((u, a)) => (Some(u), a),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(u) = userinfo {
        match u.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***@");
            }
            None => {
                out.push_str(u);
                out.push('@');
            }
        }
    }
    match after_at.split_once('?') {
        None => out.push_str(after_at),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => p.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact("postgres://alice:s3cr%40t@db.example:6432/bc?sslmode=require&password=x"),
            "postgres://alice:***@db.example:6432/bc?sslmode=require&password=***"
        );
        assert_eq!(redact("postgres://bob@h/db"), "postgres://bob@h/db");
        assert_eq!(redact("postgresql://h/db"), "postgresql://h/db");
        let err = parse_url("mysql://alice:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse_url("postgres://alice:hunter2@h:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn url_modes_and_endpoint() {
        let t = parse_url("postgres://u:p@127.0.0.1:5999/db").unwrap();
        assert!(t.tls.is_none());
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(t.endpoint, "127.0.0.1:5999");
        assert_eq!(t.redacted, "postgres://u:***@127.0.0.1:5999/db");
        assert_eq!(t.sink, "postgres://127.0.0.1:5999/db");

        let t = parse_url("postgres://u@db.example/bc?sslmode=verify-full&sslrootcert=/ca.pem")
            .unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.tls, Some(Some(PathBuf::from("/ca.pem"))));
        assert_eq!(t.endpoint, "db.example:5432");

        let t = parse_url("postgres://u@h/db?sslmode=prefer&connect_timeout=3").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(t.tls, Some(None));
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );

        for bad in [
            "postgres://u@h/db?sslmode=sometimes",
            "postgres://u@h/db?sslmode=disable&sslrootcert=/ca.pem",
            "postgres://h/db",
            "http://u@h/db",
            "u@h/db",
        ] {
            assert!(
                matches!(parse_url(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sqlstate_classification() {
        for code in [
            "40001", "40P01", "57P01", "57P02", "57P03", "08000", "08006", "53300",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "28P01", "42501", "57014", "22001"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
        assert!(is_connection_sqlstate("08001"));
        for code in ["28P01", "42501", "3D000", "23505"] {
            assert!(is_permanent_sqlstate(code), "{code}");
        }
        assert!(!is_permanent_sqlstate("53100") && !is_permanent_sqlstate("X"));
        assert!(!is_connection_sqlstate("40001"));
    }

    #[test]
    fn migrations_strictly_increase_from_one() {
        assert_eq!(MIGRATIONS.first().map(|m| m.0), Some(1));
        for w in MIGRATIONS.windows(2) {
            assert!(w[0].0 < w[1].0, "{} then {}", w[0].0, w[1].0);
        }
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 1..=ATTEMPTS {
            let full = (BACKOFF_BASE * 2u32.pow(attempt - 1)).min(BACKOFF_CAP);
            let d = backoff(attempt);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(40) <= BACKOFF_CAP);
    }
}
