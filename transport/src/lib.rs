//! BitClone's node-to-node data plane: one QUIC (quinn) endpoint per node,
//! client and server, mutual TLS with the cluster CA, and the chunk
//! protocol on it: "which of these do you lack", "store these" (each chunk
//! verified against its BLAKE3 name before it is stored), "send me these".
//!
//! Framing: every message is `[u8 kind][u32 len LE][len bytes]`; a frame
//! longer than the configured limit is refused before it is read. One
//! request per bidirectional stream; many streams per connection; QUIC flow
//! control carries back-pressure from a slow receiver to the sender.

mod frame;
mod peer;

pub use peer::{CallContext, ChunkServer, Tally, Transport, TransportConfig};

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Setting up the endpoint or TLS failed.
    #[error("transport setup: {0}")]
    Setup(String),
    /// The peer could not be reached or the connection broke.
    #[error("peer {peer}: {detail}")]
    Connection {
        /// The peer's node id.
        peer: u64,
        /// What happened.
        detail: String,
    },
    /// The peer answered with an error.
    #[error("peer {peer} refused: {message}")]
    Remote {
        /// The peer's node id.
        peer: u64,
        /// Its message.
        message: String,
    },
    /// A frame broke the protocol (unknown kind, too long, truncated).
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Result alias of the transport crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The chunk protocol's versions this build speaks, as ALPN ids, newest
/// first. The version travels in the QUIC handshake: both sides offer
/// theirs and the server picks the first of its own the client offered,
/// so two builds talk in the newest version both speak, and builds with
/// none in common are refused at the handshake. A release that changes
/// the frames adds `bitclone-chunks/N+1` in front and keeps the older one
/// until the release after (docs/ARCHITECTURE.md, "Versions and
/// upgrades").
pub const CHUNK_PROTOCOLS: &[&[u8]] = &[b"bitclone-chunks/1"];
