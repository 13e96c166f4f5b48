//! Wire types of the BitClone public API (`bitclone.v1`), generated from
//! `proto/bitclone/v1/*.proto` at build time, the node-to-node ones, and
//! the constants both sides of a wire agree on (sizes, protocol versions).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("bitclone.v1");
}

/// Node-to-node RPCs (mutual TLS), not part of the public API.
pub mod internal {
    pub mod v1 {
        tonic::include_proto!("bitclone.internal.v1");
    }
}

pub mod peer_protocol;

/// Largest gRPC message either side accepts by default: one data frame of
/// up to 1 MiB plus headroom. Larger frames are refused.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Size of the data frames senders cut file bytes into.
pub const DATA_FRAME_BYTES: usize = 1024 * 1024;

/// Files up to this size travel whole, many to a message (`FileBatch`), on
/// upload and download; larger ones are streamed in data frames.
pub const SMALL_FILE_BYTES: u64 = 256 * 1024;

/// A `FileBatch` or `EntryBatch` is closed once it holds this many bytes of
/// file data or this many entries.
pub const BATCH_BYTES: usize = DATA_FRAME_BYTES;
/// See [`BATCH_BYTES`].
pub const BATCH_ENTRIES: usize = 1024;
