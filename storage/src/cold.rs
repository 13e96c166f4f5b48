//! The cold tier: chunks packed into large objects in a bucket the
//! operator declares, evicted from the local store, read back on demand.
//!
//! A pack is a sequence of chunks' stored bytes (sealed, for an encrypted
//! tenant: the bucket holds no content in clear) followed by its index:
//!
//! ```text
//! "BCPACK01" chunk bytes…
//! index: per chunk [len(tenant) u8][tenant][id 32][offset u64][len u32]
//! trailer: [chunks u32][index bytes u64]["BCPACK01"]
//! ```
//!
//! and is named by the BLAKE3 of all of it. A store keeps a record per
//! chunk of a pack it indexed (`meta`, prefix `c`: pack, offset, length)
//! and drops its local copy; a read of an evicted chunk fetches its range
//! through a [`ColdReader`] and is checked against the chunk's name like
//! any read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::sink::objects::{open_target, S3Options, Target};

const MAGIC: &[u8; 8] = b"BCPACK01";
/// Bytes of a pack's trailer.
pub const TRAILER_BYTES: usize = 4 + 8 + 8;

/// One chunk of a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackEntry {
    /// The tenant the chunk belongs to.
    pub tenant: String,
    /// The chunk's name.
    pub id: ChunkId,
    /// Where its stored bytes start in the pack.
    pub offset: u64,
    /// How many there are.
    pub len: u32,
}

/// Builds a pack in memory.
#[derive(Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> PackBuilder {
        PackBuilder {
            buf: MAGIC.to_vec(),
            entries: Vec::new(),
        }
    }

    /// Adds a chunk's stored bytes.
    pub fn add(&mut self, tenant: &str, id: ChunkId, stored: &[u8]) {
        self.entries.push(PackEntry {
            tenant: tenant.to_string(),
            id,
            offset: self.buf.len() as u64,
            len: stored.len() as u32,
        });
        self.buf.extend_from_slice(stored);
    }

    /// Bytes of chunks so far.
    pub fn len(&self) -> usize {
        self.buf.len() - MAGIC.len()
    }

    /// Whether no chunk was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Chunks so far.
    pub fn chunks(&self) -> usize {
        self.entries.len()
    }

    /// The pack's name (BLAKE3 of its bytes), bytes and entries.
    pub fn finish(mut self) -> (ChunkId, Vec<u8>, Vec<PackEntry>) {
        let start = self.buf.len();
        for e in &self.entries {
            self.buf.push(e.tenant.len() as u8);
            self.buf.extend_from_slice(e.tenant.as_bytes());
            self.buf.extend_from_slice(e.id.as_bytes());
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
            self.buf.extend_from_slice(&e.len.to_le_bytes());
        }
        let index = (self.buf.len() - start) as u64;
        self.buf
            .extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&index.to_le_bytes());
        self.buf.extend_from_slice(MAGIC);
        (ChunkId::of(&self.buf), self.buf, self.entries)
    }
}

/// The length of a pack's index, from its last [`TRAILER_BYTES`] bytes.
pub fn index_len(trailer: &[u8]) -> Result<(u32, u64)> {
    let bad = |why: &str| Error::decode("cold pack", why.to_string());
    if trailer.len() != TRAILER_BYTES || &trailer[12..] != MAGIC {
        return Err(bad("not a pack's trailer"));
    }
    let count = u32::from_le_bytes(trailer[..4].try_into().map_err(|_| bad("count"))?);
    let len = u64::from_le_bytes(trailer[4..12].try_into().map_err(|_| bad("length"))?);
    Ok((count, len))
}

/// Decodes a pack's index (`count` entries), checking every entry lies
/// within `chunk_bytes_end` (where the index starts).
pub fn parse_index(bytes: &[u8], count: u32, chunk_bytes_end: u64) -> Result<Vec<PackEntry>> {
    let bad = |why: String| Error::decode("cold pack index", why);
    let mut out = Vec::with_capacity(count as usize);
    let mut r = bytes;
    let mut take = |n: usize| -> Result<&[u8]> {
        if r.len() < n {
            return Err(bad("truncated".into()));
        }
        let (h, t) = r.split_at(n);
        r = t;
        Ok(h)
    };
    for _ in 0..count {
        let tl = take(1)?[0] as usize;
        let tenant = std::str::from_utf8(take(tl)?)
            .map_err(|_| bad("a tenant name is not UTF-8".into()))?
            .to_string();
        let id = ChunkId::from_slice(take(32)?)?;
        let offset = u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad("offset".into()))?);
        let len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("length".into()))?);
        if offset < MAGIC.len() as u64 || offset + u64::from(len) > chunk_bytes_end {
            return Err(bad(format!("chunk {id} lies outside the pack")));
        }
        out.push(PackEntry {
            tenant,
            id,
            offset,
            len,
        });
    }
    if !r.is_empty() {
        return Err(bad("trailing bytes".into()));
    }
    Ok(out)
}

/// The entries of a whole pack's `bytes` (its trailer and index).
pub fn parse_pack(bytes: &[u8]) -> Result<Vec<PackEntry>> {
    let short = || Error::decode("cold pack", "shorter than its index".to_string());
    let trailer_at = bytes.len().checked_sub(TRAILER_BYTES).ok_or_else(short)?;
    let (count, len) = index_len(&bytes[trailer_at..])?;
    let start = trailer_at
        .checked_sub(usize::try_from(len).map_err(|_| short())?)
        .ok_or_else(short)?;
    parse_index(&bytes[start..trailer_at], count, start as u64)
}

/// Reads a byte range of a pack from the cold bucket. Blocking: called by
/// store reads, which run on worker threads.
pub trait ColdReader: Send + Sync {
    /// `len` bytes of `pack` from `offset` (not checked: the caller checks
    /// them against the chunk's name).
    fn read(&self, pack: &ChunkId, offset: u64, len: u32) -> Result<Vec<u8>>;
}

/// Where a store's evicted chunks are read from.
pub type SharedColdReader = Arc<dyn ColdReader>;

/// The cold tier's bucket: packs under `<prefix>/cold/<name>.pack`.
pub struct ColdBucket {
    target: Target,
    rt: tokio::runtime::Handle,
    /// Reads of evicted chunks done.
    pub reads: AtomicU64,
    /// Their bytes.
    pub read_bytes: AtomicU64,
    /// Reads that failed.
    pub read_errors: AtomicU64,
}

impl ColdBucket {
    /// Opens the bucket at `url` (`s3://bucket[/prefix]` or
    /// `file:///abs/dir`); blocking reads ([`ColdReader`]) run on `rt`.
    pub fn open(url: &str, s3: &S3Options, rt: tokio::runtime::Handle) -> Result<ColdBucket> {
        Ok(ColdBucket {
            target: open_target(url, s3)?,
            rt,
            reads: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
        })
    }

    fn loc(&self, pack: &ChunkId) -> ObjectPath {
        self.target
            .prefix
            .clone()
            .join("cold")
            .join(format!("{}.pack", pack.to_hex()))
    }

    fn err(&self, what: String, e: impl std::fmt::Display) -> Error {
        Error::Sink {
            sink: self.target.url.clone(),
            detail: format!("{what}: {e}"),
            permanent: false,
        }
    }

    async fn range(&self, pack: &ChunkId, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
        let want = range.end - range.start;
        let got = self
            .target
            .store
            .get_range(&self.loc(pack), range)
            .await
            .map_err(|e| self.err(format!("reading cold pack {pack}"), e))?;
        if got.len() as u64 != want {
            return Err(self.err(
                format!("reading cold pack {pack}"),
                format!("{} bytes where {want} were asked for", got.len()),
            ));
        }
        Ok(got.to_vec())
    }

    /// Writes a pack (named by its content: writing it again is harmless).
    pub async fn put(&self, pack: &ChunkId, bytes: Vec<u8>) -> Result<()> {
        self.target
            .store
            .put(&self.loc(pack), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.err(format!("writing cold pack {pack}"), e))
    }

    /// Reads a whole pack back and checks it: its bytes hash to its name
    /// and each chunk's bytes to the chunk's name. Returns its entries.
    /// Nothing is evicted on the strength of a pack not checked so.
    pub async fn verified_entries(&self, pack: &ChunkId) -> Result<Vec<PackEntry>> {
        let what = || format!("reading cold pack {pack}");
        let bytes = self
            .target
            .store
            .get(&self.loc(pack))
            .await
            .map_err(|e| self.err(what(), e))?
            .bytes()
            .await
            .map_err(|e| self.err(what(), e))?;
        if !pack.verify(&bytes) {
            return Err(Error::CorruptChunk {
                chunk: *pack,
                detail: format!(
                    "cold pack of {} bytes does not hash to its name",
                    bytes.len()
                ),
            });
        }
        let entries = parse_pack(&bytes)?;
        for e in &entries {
            let at = e.offset as usize..(e.offset + u64::from(e.len)) as usize;
            if !e.id.verify(&bytes[at]) {
                return Err(Error::CorruptChunk {
                    chunk: e.id,
                    detail: format!("its bytes in cold pack {pack} do not hash to its name"),
                });
            }
        }
        Ok(entries)
    }
}

impl ColdReader for ColdBucket {
    fn read(&self, pack: &ChunkId, offset: u64, len: u32) -> Result<Vec<u8>> {
        // Store reads run on worker threads, never on the runtime's own.
        let got = self
            .rt
            .block_on(self.range(pack, offset..offset + u64::from(len)));
        match &got {
            Ok(b) => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                self.read_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        got
    }
}

/// A cold record's value: `[pack 32][offset u64][len u32]`.
pub(crate) fn encode_record(pack: &ChunkId, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(44);
    v.extend_from_slice(pack.as_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v
}

pub(crate) fn decode_record(v: &[u8]) -> Option<(ChunkId, u64, u32)> {
    if v.len() != 44 {
        return None;
    }
    Some((
        ChunkId::from_slice(&v[..32]).ok()?,
        u64::from_le_bytes(v[32..40].try_into().ok()?),
        u32::from_le_bytes(v[40..44].try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_round_trip_and_refuse_what_does_not_fit() {
        let mut p = PackBuilder::new();
        let (a, b) = (b"first chunk".to_vec(), vec![7u8; 5000]);
        p.add("t", ChunkId::of(&a), &a);
        p.add("other", ChunkId::of(&b), &b);
        assert_eq!((p.chunks(), p.len()), (2, a.len() + b.len()));
        let (name, bytes, entries) = p.finish();
        assert_eq!(name, ChunkId::of(&bytes));
        assert_eq!(parse_pack(&bytes).unwrap(), entries);
        assert!(parse_pack(&bytes[..bytes.len() - 1]).is_err());
        let (count, len) = index_len(&bytes[bytes.len() - TRAILER_BYTES..]).unwrap();
        let end = bytes.len() - TRAILER_BYTES;
        let start = end - len as usize;
        let parsed = parse_index(&bytes[start..end], count, start as u64).unwrap();
        assert_eq!(parsed, entries);
        for e in &parsed {
            let got = &bytes[e.offset as usize..(e.offset + u64::from(e.len)) as usize];
            assert!(e.id.verify(got));
        }
        assert!(index_len(&bytes[..TRAILER_BYTES]).is_err());
        assert!(parse_index(&bytes[start..end - 1], count, start as u64).is_err());
        assert!(
            parse_index(&bytes[start..end], count, 20).is_err(),
            "outside"
        );
        let r = encode_record(&name, 9, 10);
        assert_eq!(decode_record(&r), Some((name, 9, 10)));
        assert_eq!(decode_record(&r[1..]), None);
    }
}
