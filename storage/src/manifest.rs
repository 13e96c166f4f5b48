//! Manifests: the entries of one snapshot, in a versioned binary encoding.
//!
//! Layout of format v1 (all integers little-endian):
//!
//! ```text
//! magic "BCMF" | u16 version=1 | str tenant | str dataset | u8 has_parent [32 parent]
//! | i64 created_unix_ms | u32 min | u32 avg | u32 max | u64 entry_count | entry*
//! entry: u8 kind | str path | u64 size | u32 mode | i64 mtime_ns | [32 blake3]
//!        | u32 chunk_count | (32 id, u32 len)*
//! str:   u32 byte_len | UTF-8 bytes
//! ```
//!
//! A snapshot is named by the BLAKE3 of these bytes, so encoding is canonical:
//! entries are sorted by path and unique, which decoding checks too.

use crate::chunk::{ChunkId, SnapshotId};
use crate::chunker::ChunkParams;
use crate::error::{Error, Result};
use crate::path::validate_path;

const MAGIC: &[u8; 4] = b"BCMF";
/// The manifest format version this build writes.
pub const FORMAT_VERSION: u16 = 1;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with content.
    File,
    /// A directory (kept so that empty directories survive a round trip).
    Dir,
}

/// One chunk of a file: its name and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk bytes.
    pub id: ChunkId,
    /// Length in bytes.
    pub len: u32,
}

/// One file or directory of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative `/`-separated path, validated by [`validate_path`].
    pub path: String,
    /// File or directory.
    pub kind: EntryKind,
    /// Length in bytes (0 for directories).
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// BLAKE3 of the whole file (of nothing for directories).
    pub blake3: [u8; 32],
    /// The file's chunks in order.
    pub chunks: Vec<ChunkRef>,
}

/// The immutable description of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Owner of the dataset.
    pub tenant: String,
    /// Dataset the snapshot belongs to.
    pub dataset: String,
    /// The snapshot this one was taken incrementally against.
    pub parent: Option<SnapshotId>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
    /// Chunking used for this snapshot's files.
    pub chunking: ChunkParams,
    /// Entries sorted by path, unique.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Number of regular files.
    pub fn file_count(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .count() as u64
    }

    /// Encodes into format v1 after checking the entries (sorted, unique, safe
    /// paths, chunk lengths adding up to sizes).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.check()?;
        let mut out = Vec::with_capacity(64 + self.entries.len() * 96);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        put_str(&mut out, &self.tenant);
        put_str(&mut out, &self.dataset);
        match &self.parent {
            Some(p) => {
                out.push(1);
                out.extend_from_slice(p.as_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        for v in [
            self.chunking.min_size,
            self.chunking.avg_size,
            self.chunking.max_size,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            out.push(match e.kind {
                EntryKind::File => 0,
                EntryKind::Dir => 1,
            });
            put_str(&mut out, &e.path);
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(&e.mode.to_le_bytes());
            out.extend_from_slice(&e.mtime_ns.to_le_bytes());
            out.extend_from_slice(&e.blake3);
            out.extend_from_slice(&(e.chunks.len() as u32).to_le_bytes());
            for c in &e.chunks {
                out.extend_from_slice(c.id.as_bytes());
                out.extend_from_slice(&c.len.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Encodes and names the manifest: the snapshot id is the BLAKE3 of the bytes.
    pub fn encode_with_id(&self) -> Result<(SnapshotId, Vec<u8>)> {
        let bytes = self.encode()?;
        Ok((SnapshotId::of(&bytes), bytes))
    }

    /// Decodes any supported format version, validating everything.
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        let mut r = Reader { buf: bytes };
        if r.take(4)? != MAGIC {
            return Err(Error::decode("manifest", "bad magic"));
        }
        let version = r.u16()?;
        if version != 1 {
            return Err(Error::decode(
                "manifest",
                format!("format version {version} is newer than this build understands (1)"),
            ));
        }
        let tenant = r.str()?;
        let dataset = r.str()?;
        let parent = match r.u8()? {
            0 => None,
            1 => Some(SnapshotId::from_slice(r.take(32)?)?),
            x => return Err(Error::decode("manifest", format!("bad parent flag {x}"))),
        };
        let created_unix_ms = r.i64()?;
        let chunking = ChunkParams {
            min_size: r.u32()?,
            avg_size: r.u32()?,
            max_size: r.u32()?,
        };
        let count = r.u64()?;
        // Every entry takes at least 61 bytes: refuse counts the input cannot hold
        // before allocating for them.
        if count > (r.buf.len() / 61) as u64 {
            return Err(Error::decode("manifest", "entry count exceeds input"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let kind = match r.u8()? {
                0 => EntryKind::File,
                1 => EntryKind::Dir,
                x => return Err(Error::decode("manifest", format!("unknown entry kind {x}"))),
            };
            let path = r.str()?;
            let size = r.u64()?;
            let mode = r.u32()?;
            let mtime_ns = r.i64()?;
            let blake3: [u8; 32] = *ChunkId::from_slice(r.take(32)?)?.as_bytes();
            let n = r.u32()? as usize;
            if n > r.buf.len() / 36 {
                return Err(Error::decode("manifest", "chunk count exceeds input"));
            }
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                let id = ChunkId::from_slice(r.take(32)?)?;
                let len = r.u32()?;
                chunks.push(ChunkRef { id, len });
            }
            entries.push(Entry {
                path,
                kind,
                size,
                mode,
                mtime_ns,
                blake3,
                chunks,
            });
        }
        if !r.buf.is_empty() {
            return Err(Error::decode("manifest", "trailing bytes"));
        }
        let m = Manifest {
            tenant,
            dataset,
            parent,
            created_unix_ms,
            chunking,
            entries,
        };
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        for (i, e) in self.entries.iter().enumerate() {
            validate_path(&e.path)?;
            if i > 0 && self.entries[i - 1].path >= e.path {
                return Err(Error::decode(
                    "manifest",
                    format!("entries not sorted/unique at {:?}", e.path),
                ));
            }
            let sum: u64 = e.chunks.iter().map(|c| u64::from(c.len)).sum();
            if sum != e.size {
                return Err(Error::decode(
                    "manifest",
                    format!("{:?}: chunks add up to {sum}, size is {}", e.path, e.size),
                ));
            }
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::decode("manifest", "truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::decode("manifest", "non-UTF-8 string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest stored in `tests/fixtures/manifest-v1.bin`.
    pub(crate) fn fixture_manifest() -> Manifest {
        let c1 = ChunkId::of(b"chunk one");
        let c2 = ChunkId::of(b"chunk two");
        Manifest {
            tenant: "acme".into(),
            dataset: "training-set".into(),
            parent: Some(SnapshotId::of(b"parent")),
            created_unix_ms: 1_764_000_000_000,
            chunking: ChunkParams::default(),
            entries: vec![
                Entry {
                    path: "data".into(),
                    kind: EntryKind::Dir,
                    size: 0,
                    mode: 0o755,
                    mtime_ns: 1_700_000_000_000_000_000,
                    blake3: *blake3::hash(b"").as_bytes(),
                    chunks: vec![],
                },
                Entry {
                    path: "data/a.bin".into(),
                    kind: EntryKind::File,
                    size: 9 + 9,
                    mode: 0o644,
                    mtime_ns: 1_700_000_000_123_456_789,
                    blake3: *blake3::hash(b"chunk onechunk two").as_bytes(),
                    chunks: vec![ChunkRef { id: c1, len: 9 }, ChunkRef { id: c2, len: 9 }],
                },
                Entry {
                    path: "empty".into(),
                    kind: EntryKind::File,
                    size: 0,
                    mode: 0o600,
                    mtime_ns: -5,
                    blake3: *blake3::hash(b"").as_bytes(),
                    chunks: vec![],
                },
            ],
        }
    }

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/manifest-v1.bin"
    );

    #[test]
    fn round_trip() {
        let m = fixture_manifest();
        let bytes = m.encode().unwrap();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn reads_the_stored_v1_fixture() {
        if std::env::var_os("BITCLONE_WRITE_FIXTURES").is_some() {
            std::fs::write(FIXTURE, fixture_manifest().encode().unwrap()).unwrap();
        }
        let stored = std::fs::read(FIXTURE).unwrap();
        let decoded = Manifest::decode(&stored).unwrap();
        assert_eq!(decoded, fixture_manifest());
        // The id of a stored snapshot must never change across builds.
        assert_eq!(
            ChunkId::of(&stored).to_hex(),
            include_str!("../tests/fixtures/manifest-v1.id").trim()
        );
    }

    #[test]
    fn refuses_damaged_input() {
        let bytes = fixture_manifest().encode().unwrap();
        for cut in [0, 3, 10, bytes.len() - 1] {
            assert!(Manifest::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut future = bytes.clone();
        future[4] = 9;
        assert!(Manifest::decode(&future).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Manifest::decode(&trailing).is_err());
    }

    #[test]
    fn refuses_traversal_and_unsorted_entries() {
        let mut m = fixture_manifest();
        m.entries[1].path = "../escape".into();
        assert!(matches!(m.encode(), Err(Error::InvalidPath { .. })));
        let mut m = fixture_manifest();
        m.entries.swap(1, 2);
        assert!(m.encode().is_err());
        let mut m = fixture_manifest();
        m.entries[1].size += 1;
        assert!(m.encode().is_err());
    }
}
