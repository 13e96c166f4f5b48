//! BitClone storage: content-defined chunking, BLAKE3 names, the RocksDB
//! chunk store, manifests, the sinks snapshots are written out to, per-tenant
//! encryption at rest (`crypt`) and the cold tier's packs (`cold`).
//!
//! Nothing here knows about Raft, QUIC or gRPC. Blocking work (chunking,
//! hashing, RocksDB) runs on a [`CpuPool`], never on the async runtime.

mod backoff;
mod chunk;
pub mod chunker;
pub mod cold;
pub mod conformance;
pub mod crypt;
mod error;
pub mod gc;
pub mod ingest;
pub mod manifest;
pub mod path;
mod pool;
pub mod rocks;
pub mod sink;
mod store;

pub use backoff::{jitter, Backoff};
pub use chunk::{ChunkId, SnapshotId};
pub use chunker::ChunkParams;
pub use crypt::{Codec, DataKey, Keyring};
pub use error::{Error, Result};
pub use gc::{GcOptions, GcReport, GcRoot, ScrubReport, TenantErased};
pub use manifest::{ChunkRef, Entry, EntryKind, Manifest};
pub use pool::CpuPool;
pub use rocks::{
    FamilyStats, GcHold, LegacyHead, LegacyMetadata, RocksOptions, RocksStore, SnapshotRecord,
    StoreStats,
};
pub use store::{
    load_manifest, read_chunks, read_root, ChunkStore, Entries, EntryPages, FetchPage, MemStore,
};
