//! Length-checked frames on a QUIC stream.

use quinn::{RecvStream, SendStream};

use crate::{Error, Result};

/// Frame kinds.
pub mod kind {
    /// Request header: u64 sender id, u8 op, tenant (UTF-8).
    pub const REQUEST: u8 = 1;
    /// A list of 32-byte chunk names.
    pub const IDS: u8 = 2;
    /// One chunk: 32-byte name, then its bytes.
    pub const CHUNK: u8 = 3;
    /// End of a chunk sequence.
    pub const END: u8 = 4;
    /// One byte per asked name: 1 if missing.
    pub const MISSING: u8 = 5;
    /// u64 count of chunks stored.
    pub const STORED: u8 = 6;
    /// An error message (UTF-8); ends the exchange.
    pub const ERROR: u8 = 7;
}

/// Request operations.
pub mod op {
    pub const MISSING: u8 = 1;
    pub const PUT: u8 = 2;
    pub const GET: u8 = 3;
    pub const PUT_MANIFEST: u8 = 4;
    pub const GET_MANIFEST: u8 = 5;
}

/// Appends one frame to `out` (to send many small frames in one write).
pub fn encode(out: &mut Vec<u8>, kind: u8, payload: &[&[u8]]) -> Result<()> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(|_| Error::Protocol(format!("frame of {len} bytes")))?;
    out.push(kind);
    out.extend_from_slice(&len.to_le_bytes());
    for p in payload {
        out.extend_from_slice(p);
    }
    Ok(())
}

pub async fn write(send: &mut SendStream, kind: u8, payload: &[&[u8]]) -> Result<()> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(|_| Error::Protocol(format!("frame of {len} bytes")))?;
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&len.to_le_bytes());
    let io = |e: quinn::WriteError| Error::Protocol(format!("write: {e}"));
    send.write_all(&header).await.map_err(io)?;
    for p in payload {
        send.write_all(p).await.map_err(io)?;
    }
    Ok(())
}

/// Reads one frame, refusing lengths above `max` before reading them.
pub async fn read(recv: &mut RecvStream, max: usize) -> Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| Error::Protocol(format!("read: {e}")))?;
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > max {
        return Err(Error::Protocol(format!(
            "frame of {len} bytes exceeds the limit of {max}"
        )));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| Error::Protocol(format!("read: {e}")))?;
    Ok((header[0], buf))
}

/// Splits a CHUNK payload into name and bytes.
pub fn split_chunk(payload: &[u8]) -> Result<([u8; 32], &[u8])> {
    if payload.len() < 32 {
        return Err(Error::Protocol("chunk frame shorter than its name".into()));
    }
    let (id, data) = payload.split_at(32);
    let mut name = [0u8; 32];
    name.copy_from_slice(id);
    Ok((name, data))
}

/// Splits an IDS payload into names.
pub fn split_ids(payload: &[u8]) -> Result<Vec<[u8; 32]>> {
    if payload.len() % 32 != 0 {
        return Err(Error::Protocol(
            "ids frame is not a multiple of 32 bytes".into(),
        ));
    }
    Ok(payload
        .chunks_exact(32)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            a
        })
        .collect())
}
