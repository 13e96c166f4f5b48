//! Content-defined chunking (FastCDC v2020) over a stream, with bounded memory.

use std::io::{ErrorKind, Read};

use fastcdc::v2020::FastCDC;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// FastCDC size bounds of one dataset's chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    /// No cut before this many bytes (except at the end of a file).
    pub min_size: u32,
    /// The average chunk size the cut-point mask aims for.
    pub avg_size: u32,
    /// A chunk is cut here at the latest.
    pub max_size: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min_size: 256 * 1024,
            avg_size: 1024 * 1024,
            max_size: 4 * 1024 * 1024,
        }
    }
}

impl ChunkParams {
    /// Checks the bounds against FastCDC's limits and against each other.
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ChunkParams {
            min_size,
            avg_size,
            max_size,
        } = *self;
        let bad = |why: String| Err(Error::InvalidArgument(format!("chunking {self:?}: {why}")));
        if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&min_size) {
            return bad(format!("min_size must be in {MINIMUM_MIN}..={MINIMUM_MAX}"));
        }
        if !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg_size) {
            return bad(format!("avg_size must be in {AVERAGE_MIN}..={AVERAGE_MAX}"));
        }
        if !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max_size) {
            return bad(format!("max_size must be in {MAXIMUM_MIN}..={MAXIMUM_MAX}"));
        }
        if !(min_size <= avg_size && avg_size <= max_size) {
            return bad("need min_size <= avg_size <= max_size".into());
        }
        Ok(())
    }
}

/// The chunks of a buffer already in memory: the same cut points
/// [`Chunker`] finds streaming over the same bytes, without its window
/// (small files are cut straight from the bytes that arrived).
pub fn chunk_slice(data: &[u8], params: ChunkParams) -> impl Iterator<Item = &[u8]> {
    FastCDC::new(data, params.min_size, params.avg_size, params.max_size)
        .map(move |c| &data[c.offset..c.offset + c.length])
}

/// Cuts a byte stream into content-defined chunks.
///
/// Holds at most two `max_size` windows of the stream in memory. Cut points are
/// the same as FastCDC over the whole file: a chunk is only emitted once at
/// least `max_size` bytes past its start are buffered (or the stream ended), so
/// the cut never depends on where reads happened to stop.
pub struct Chunker<R> {
    reader: R,
    params: ChunkParams,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Chunker<R> {
    /// Wraps `reader`; `params` must have passed [`ChunkParams::validate`].
    pub fn new(reader: R, params: ChunkParams) -> Result<Self> {
        params.validate()?;
        Ok(Chunker {
            reader,
            params,
            buf: vec![0; 2 * params.max_size as usize],
            start: 0,
            end: 0,
            eof: false,
        })
    }

    /// Calls `each` with every chunk in stream order; returns the total length.
    /// Read errors are returned as `std::io::Error` wrapped by the caller.
    pub fn for_each_chunk(
        mut self,
        mut each: impl FnMut(&[u8]) -> Result<()>,
    ) -> std::result::Result<u64, ChunkerError> {
        let max = self.params.max_size as usize;
        let mut total = 0u64;
        loop {
            self.fill().map_err(ChunkerError::Read)?;
            if self.start == self.end {
                return Ok(total);
            }
            let window = &self.buf[self.start..self.end];
            let mut consumed = 0usize;
            let cdc = FastCDC::new(
                window,
                self.params.min_size,
                self.params.avg_size,
                self.params.max_size,
            );
            for chunk in cdc {
                // A cut is final only if max_size bytes past the chunk start were
                // visible (or the stream ended); otherwise read more first.
                if !self.eof && chunk.offset + max > window.len() {
                    break;
                }
                each(&window[chunk.offset..chunk.offset + chunk.length])
                    .map_err(ChunkerError::Sink)?;
                consumed = chunk.offset + chunk.length;
            }
            total += consumed as u64;
            self.start += consumed;
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while !self.eof && self.end < self.buf.len() {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Why chunking a stream stopped.
#[derive(Debug)]
pub enum ChunkerError {
    /// Reading the source failed.
    Read(std::io::Error),
    /// The chunk consumer failed.
    Sink(Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn small() -> ChunkParams {
        ChunkParams {
            min_size: 2048,
            avg_size: 8192,
            max_size: 32768,
        }
    }

    fn cuts(data: &[u8], params: ChunkParams, read_size: usize) -> Vec<Vec<u8>> {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(out.len()).min(self.1);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        let total = Chunker::new(Trickle(data, read_size), params)
            .unwrap()
            .for_each_chunk(|c| {
                out.push(c.to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(total, data.len() as u64);
        out
    }

    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        v
    }

    #[test]
    fn same_cuts_as_whole_buffer_fastcdc_whatever_the_read_size() {
        let seed = 7;
        println!("seed {seed}");
        let data = random(seed, 1_000_000);
        let p = small();
        let expected: Vec<Vec<u8>> = FastCDC::new(&data, p.min_size, p.avg_size, p.max_size)
            .map(|c| data[c.offset..c.offset + c.length].to_vec())
            .collect();
        for read_size in [1usize, 777, 4096, 65536, 1 << 20] {
            assert_eq!(cuts(&data, p, read_size), expected, "read size {read_size}");
        }
    }

    #[test]
    fn insertion_changes_only_nearby_chunks() {
        let seed = 11;
        println!("seed {seed}");
        let data = random(seed, 2_000_000);
        let p = small();
        let before = cuts(&data, p, 1 << 16);
        let mut edited = data.clone();
        let at = 1_000_000;
        edited.splice(at..at, b"an insertion in the middle".iter().copied());
        let after = cuts(&edited, p, 1 << 16);
        let old: std::collections::HashSet<_> = before.iter().collect();
        let changed = after.iter().filter(|c| !old.contains(c)).count();
        assert!(
            before.len() > 100,
            "expected many chunks, got {}",
            before.len()
        );
        // Only the chunk holding the edit (and at most its neighbour) may change.
        assert!(
            (1..=2).contains(&changed),
            "{changed} of {} chunks changed",
            after.len()
        );
    }

    #[test]
    fn empty_stream_has_no_chunks_and_bounds_are_checked() {
        assert!(cuts(&[], small(), 10).is_empty());
        let bad = ChunkParams {
            min_size: 10,
            avg_size: 8192,
            max_size: 32768,
        };
        assert!(bad.validate().is_err());
        let inverted = ChunkParams {
            min_size: 65536,
            avg_size: 8192,
            max_size: 32768,
        };
        assert!(inverted.validate().is_err());
        assert!(ChunkParams::default().validate().is_ok());
    }

    #[test]
    fn chunks_respect_bounds() {
        let data = random(3, 500_000);
        let p = small();
        let c = cuts(&data, p, 1 << 16);
        for (i, chunk) in c.iter().enumerate() {
            assert!(chunk.len() <= p.max_size as usize);
            if i + 1 < c.len() {
                assert!(chunk.len() >= p.min_size as usize);
            }
        }
    }
}
