//! openraft storage on RocksDB: the log and vote, durably; the state machine
//! in memory, rebuilt at start from the last snapshot plus the log.

// openraft fixes the error type of its storage traits; helpers share it.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, RaftLogId, RaftLogReader, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::state::{apply, ClusterState, NodeInfo, Response};
use crate::types::{StorageError, TypeConfig};
use crate::NodeId;

const CF_LOGS: &str = "logs";
const CF_STORE: &str = "store";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

fn io_err(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

/// Opens the Raft RocksDB (log + vote + snapshot) under `dir`.
pub fn open_db(dir: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_LOGS, Options::default()),
        ColumnFamilyDescriptor::new(CF_STORE, Options::default()),
    ];
    Ok(Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?))
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(name).ok_or_else(|| {
        StorageIOError::read(AnyError::error(format!("column family {name} missing"))).into()
    })
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

fn get_json<T: for<'de> Deserialize<'de>>(db: &DB, key: &[u8]) -> Result<Option<T>, StorageError> {
    let Some(bytes) = db
        .get_cf(cf(db, CF_STORE)?, key)
        .map_err(|e| StorageIOError::read(io_err(e)))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StorageIOError::read(io_err(e)).into())
}

fn put_json<T: Serialize>(db: &DB, key: &[u8], value: &T) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StorageIOError::write(io_err(e)))?;
    db.put_cf_opt(cf(db, CF_STORE)?, key, bytes, &synced())
        .map_err(|e| StorageIOError::write(io_err(e)).into())
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// The commit index openraft last saved, plus one (0: none yet); read
    /// by status (openraft 0.9's metrics carry no commit index).
    committed: Arc<AtomicU64>,
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        LogStore {
            db,
            committed: Arc::default(),
        }
    }

    /// The commit index as this node last saved it (leader and followers
    /// alike), shared with the store.
    pub fn commit_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn note_committed(&self, committed: &Option<LogId<NodeId>>) {
        let v = committed.map_or(0, |l| l.index + 1);
        self.committed.store(v, Ordering::Relaxed);
    }

    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, StorageError> {
        let mut it = self
            .db
            .iterator_cf(cf(&self.db, CF_LOGS)?, IteratorMode::End);
        match it.next() {
            Some(Ok((_, v))) => {
                let e: Entry<TypeConfig> =
                    serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
                Ok(Some(*e.get_log_id()))
            }
            Some(Err(e)) => Err(StorageIOError::read_logs(io_err(e)).into()),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let key = start.to_be_bytes();
        for item in self.db.iterator_cf(
            cf(&self.db, CF_LOGS)?,
            IteratorMode::From(&key, Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            let idx = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StorageIOError::read_logs(AnyError::error("bad log key")))?,
            );
            if !range.contains(&idx) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(io_err(e)))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = get_json(&self.db, KEY_PURGED)?;
        let last = self.last_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        put_json(&self.db, KEY_VOTE, vote).map_err(|_| {
            StorageIOError::write_vote(AnyError::error("writing the vote failed")).into()
        })
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        get_json(&self.db, KEY_VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        put_json(&self.db, KEY_COMMITTED, &committed)?;
        self.note_committed(&committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        let c = get_json::<Option<LogId<NodeId>>>(&self.db, KEY_COMMITTED)?.flatten();
        self.note_committed(&c);
        Ok(c)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // One batch, synced, and only then the callback (CRATES.md).
        let logs = cf(&self.db, CF_LOGS)?;
        let mut batch = WriteBatch::default();
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
            batch.put_cf(logs, e.get_log_id().index.to_be_bytes(), v);
        }
        let res = self.db.write_opt(batch, &synced());
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(io_err(e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // Remove log_id.index and everything after it.
        let logs = cf(&self.db, CF_LOGS)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(logs, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(logs, u64::MAX.to_be_bytes());
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // Record the purge point first: a crash in between leaves extra logs,
        // never a gap.
        put_json(&self.db, KEY_PURGED, &log_id)?;
        let logs = cf(&self.db, CF_LOGS)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(logs, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }
}

/// The format of the applied state written into snapshots now: 2 since jobs
/// hold typed specs (0.1.0 wrote 1, without this field, with URLs; it still
/// reads).
pub const STATE_FORMAT: u32 = 2;

/// The applied state: the cluster state plus what openraft needs to know
/// about how far it got. A snapshot's data is this, as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    /// [`STATE_FORMAT`] when written; 1 for snapshots of 0.1.0.
    #[serde(default = "format_1")]
    pub format: u32,
    pub state: ClusterState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, NodeInfo>,
}

fn format_1() -> u32 {
    1
}

impl Default for Applied {
    fn default() -> Self {
        Applied {
            format: STATE_FORMAT,
            state: ClusterState::default(),
            last_applied: None,
            membership: StoredMembership::default(),
        }
    }
}

impl Applied {
    /// Reads a snapshot's data; refuses a format newer than this code.
    fn decode(data: &[u8]) -> Result<Applied, String> {
        // The format first: a newer state may not decode at all.
        #[derive(Deserialize)]
        struct Format {
            #[serde(default = "format_1")]
            format: u32,
        }
        let f: Format = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if f.format > STATE_FORMAT {
            return Err(format!(
                "the state is in format {}, newer than this node's {STATE_FORMAT}: upgrade the node",
                f.format
            ));
        }
        serde_json::from_slice(data).map_err(|e| e.to_string())
    }
}

/// A stored snapshot: its meta and its data (the applied state).
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

/// Stored snapshots start with these bytes (format 2): then the meta's
/// length (u32, little-endian), the meta (JSON) and the data, as they are.
/// 0.1.0 stored one JSON object whose data was an array of numbers (JSON
/// inside JSON, four to five bytes a byte); it still reads.
const SNAPSHOT_MAGIC: &[u8; 4] = b"BCS2";

impl StoredSnapshot {
    fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let meta = serde_json::to_vec(&self.meta)?;
        let mut out = Vec::with_capacity(8 + meta.len() + self.data.len());
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.data);
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Result<StoredSnapshot, String> {
        let Some(rest) = bytes.strip_prefix(SNAPSHOT_MAGIC) else {
            #[derive(Deserialize)]
            struct V1 {
                meta: SnapshotMeta<NodeId, NodeInfo>,
                data: Vec<u8>,
            }
            let v1: V1 = serde_json::from_slice(bytes)
                .map_err(|e| format!("a stored snapshot of no known format: {e}"))?;
            return Ok(StoredSnapshot {
                meta: v1.meta,
                data: v1.data,
            });
        };
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or("a stored snapshot cut short")?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err("a stored snapshot cut short".into());
        }
        let (meta, data) = rest.split_at(len);
        Ok(StoredSnapshot {
            meta: serde_json::from_slice(meta).map_err(|e| e.to_string())?,
            data: data.to_vec(),
        })
    }
}

fn get_snapshot(db: &DB) -> Result<Option<StoredSnapshot>, StorageError> {
    let Some(bytes) = db
        .get_cf(cf(db, CF_STORE)?, KEY_SNAPSHOT)
        .map_err(|e| StorageIOError::read_state_machine(io_err(e)))?
    else {
        return Ok(None);
    };
    StoredSnapshot::decode(&bytes)
        .map(Some)
        .map_err(|e| StorageIOError::read_state_machine(AnyError::error(e)).into())
}

fn put_snapshot(db: &DB, s: &StoredSnapshot) -> Result<(), StorageError> {
    let bytes = s
        .encode()
        .map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
    db.put_cf_opt(cf(db, CF_STORE)?, KEY_SNAPSHOT, bytes, &synced())
        .map_err(|e| StorageIOError::write_state_machine(io_err(e)).into())
}

/// The state machine. The cluster state is shared (`shared()`) with readers.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    applied: Arc<RwLock<Applied>>,
    snapshot_seq: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachine {
    /// Loads the last snapshot, if any; openraft re-applies the log after it.
    pub fn open(db: Arc<DB>) -> Result<Self, StorageError> {
        let applied = match get_snapshot(&db)? {
            Some(s) => Applied::decode(&s.data)
                .map_err(|e| StorageIOError::read_state_machine(AnyError::error(e)))?,
            None => Applied::default(),
        };
        Ok(StateMachine {
            db,
            applied: Arc::new(RwLock::new(applied)),
            snapshot_seq: Arc::default(),
        })
    }

    /// The live state, for reads.
    pub fn shared(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, membership) = {
            let mut a = self.read().clone();
            // Written in this code's format, whatever it was read in.
            a.format = STATE_FORMAT;
            let data = serde_json::to_vec(&a)
                .map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
            (data, a.last_applied, a.membership.clone())
        };
        let seq = self
            .snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        put_snapshot(
            &self.db,
            &StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            },
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StorageError> {
        let a = self.read();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut a = self.write();
        let mut out = Vec::new();
        for e in entries {
            a.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Response::Ok),
                EntryPayload::Normal(req) => out.push(apply(&mut a.state, &req)),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Response::Ok);
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let applied = Applied::decode(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::error(e))
        })?;
        put_snapshot(
            &self.db,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        *self.write() = applied;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(get_snapshot(&self.db)?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Destination, JobState, Source};

    /// A Raft dir written by 0.1.0 (56dfad0), one node, snapshot at index 14:
    /// two tenants' datasets and a finished clone job (source and
    /// destination stored as URLs, the snapshot as JSON inside JSON).
    #[test]
    fn a_snapshot_written_by_0_1_0_still_reads_and_is_rewritten_in_format_2() {
        let tmp = tempfile::tempdir().unwrap();
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/raft-0.1.0.tar.gz"
        );
        let st = std::process::Command::new("tar")
            .args(["-xzf", fixture, "-C"])
            .arg(tmp.path())
            .status()
            .unwrap();
        assert!(st.success());
        let db = open_db(&tmp.path().join("raft")).unwrap();
        let sm = StateMachine::open(db.clone()).unwrap();
        let a = sm.read().clone();
        assert_eq!(a.format, 1);
        assert_eq!(a.last_applied.map(|l| l.index), Some(14));
        let s = &a.state;
        assert_eq!(s.datasets["default"]["ds"].history.len(), 2);
        assert!(s.datasets["acme"].contains_key("other"));
        assert_eq!(s.settings, crate::state::Settings::default());
        let job = s.jobs.values().next().unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(job.source, Source::parse("snapshot://ds").unwrap());
        assert!(matches!(
            job.destinations.as_slice(),
            [Destination::Objects { mirror: false, .. }]
        ));
        assert_eq!(job.fencing_token, 1);

        // The log entries it kept after the snapshot decode too.
        let mut log = LogStore::new(db.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let entries = rt.block_on(log.try_get_log_entries(..)).unwrap();
        assert!(!entries.is_empty(), "the fixture keeps some log");
        // Those after the snapshot apply on top of it, as at a start.
        let later: Vec<_> = entries
            .into_iter()
            .filter(|e| e.log_id.index > 14)
            .collect();
        let mut applier = sm.clone();
        rt.block_on(applier.apply(later)).unwrap();
        let a = sm.read().clone();

        // A new snapshot is written in format 2, binary-framed, and reads back.
        let mut builder = sm.clone();
        rt.block_on(builder.build_snapshot()).unwrap();
        let raw = db
            .get_cf(cf(&db, CF_STORE).unwrap(), KEY_SNAPSHOT)
            .unwrap()
            .unwrap();
        assert!(raw.starts_with(SNAPSHOT_MAGIC));
        let again = StateMachine::open(db).unwrap();
        let b = again.read().clone();
        assert_eq!(b.format, STATE_FORMAT);
        assert_eq!(b.state, a.state);
    }

    #[test]
    fn a_state_newer_than_this_code_is_refused() {
        let a = Applied {
            format: STATE_FORMAT + 1,
            ..Applied::default()
        };
        let data = serde_json::to_vec(&a).unwrap();
        let e = Applied::decode(&data).unwrap_err();
        assert!(e.contains("newer"), "{e}");
        assert!(StoredSnapshot::decode(b"BCS2\x09\x00").is_err());
    }
}
