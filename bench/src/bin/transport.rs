//! `bitclone-bench-transport`: chunk transfer throughput over the QUIC
//! transport (mutual TLS, two endpoints on loopback in one process), next to
//! a TLS-over-TCP copy (socat OPENSSL, the same certificates) and a plain
//! TCP copy of the same bytes. One JSON object on stdout.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitclone_raft::tls::{generate_dev, install_crypto_provider, PeerTls};
use bitclone_transport::{ChunkServer, Transport, TransportConfig};
use clap::Parser;
use rand::{RngCore, SeedableRng};
use rustls::pki_types::CertificateDer;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "bitclone-bench-transport",
    about = "QUIC chunk transfer vs TLS and plain TCP copies"
)]
struct Args {
    /// MiB to send (in 1 MiB chunks).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Chunks per put request.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Put requests in flight.
    #[arg(long, default_value_t = 4)]
    streams: usize,
}

/// Verifies names (the transport does) and counts, but keeps nothing: this
/// measures the wire, not the disk.
#[derive(Default)]
struct Sink {
    bytes: AtomicU64,
}

impl ChunkServer for Sink {
    fn authorize(&self, certs: &[CertificateDer<'static>], claimed: u64) -> Result<(), String> {
        bitclone_raft::tls::check_peer(certs, claimed).map_err(|e| e.to_string())
    }
    fn missing(&self, _: &str, ids: &[[u8; 32]]) -> Result<Vec<bool>, String> {
        Ok(vec![true; ids.len()])
    }
    fn store(&self, _: &str, _: &[u8; 32], data: &[u8]) -> Result<bool, String> {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(true)
    }
    fn load(&self, _: &str, _: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    fn load_manifest(&self, _: &str, _: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    fn store_manifest(&self, _: &str, _: &[u8; 32], _: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Times a socat copy of `file` from a client to a listening server.
fn socat_copy(file: &Path, listen: &str, connect: &str) -> Result<f64> {
    let mut server = Command::new("socat")
        .args(["-u", listen, "OPEN:/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("socat (install it: scripts/install-deps.sh --bench)")?;
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let status = Command::new("socat")
        .args(["-u", &format!("OPEN:{}", file.display()), connect])
        .status()?;
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        // The server never got its client: it would wait for ever.
        let _ = server.kill();
        let _ = server.wait();
        bail!("socat client failed for {connect}");
    }
    let _ = server.wait();
    Ok(secs)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("bitclone-bench-transport-{}", std::process::id()));
    let certs = dir.join("certs");
    generate_dev(&certs, 2)?;
    let bytes = (args.mib as u64) << 20;

    // QUIC: node 1 puts 1 MiB chunks to node 2.
    let sink = Arc::new(Sink::default());
    let tls = |id| PeerTls::load(&certs, id);
    let (t1, t2) = (tls(1)?, tls(2)?);
    let b = Transport::bind(
        2,
        "127.0.0.1:0".parse()?,
        t2.rustls_server_config()?,
        t2.rustls_client_config()?,
        sink.clone(),
        TransportConfig::default(),
    )?;
    let b_addr = b.local_addr()?;
    let a = Transport::bind(
        1,
        "127.0.0.1:0".parse()?,
        t1.rustls_server_config()?,
        t1.rustls_client_config()?,
        Arc::new(Sink::default()),
        TransportConfig::default(),
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let chunks: Vec<([u8; 32], Vec<u8>)> = (0..args.batch * args.streams)
        .map(|_| {
            let mut d = vec![0u8; 1 << 20];
            rng.fill_bytes(&mut d);
            (*blake3::hash(&d).as_bytes(), d)
        })
        .collect();
    // Warm the connection up.
    a.missing(2, b_addr, "bench", &[[0u8; 32]]).await?;
    let puts = args.mib / args.batch;
    let t = Instant::now();
    use futures::stream::{self, StreamExt};
    let mut results = stream::iter(0..puts)
        .map(|i| {
            let (a, chunks) = (a.clone(), &chunks);
            async move {
                let start = (i % args.streams) * args.batch;
                let refs: Vec<([u8; 32], &[u8])> = chunks[start..start + args.batch]
                    .iter()
                    .map(|(id, d)| (*id, d.as_slice()))
                    .collect();
                a.put(2, b_addr, "bench", &refs).await
            }
        })
        .buffer_unordered(args.streams);
    while let Some(r) = results.next().await {
        r?;
    }
    let quic_s = t.elapsed().as_secs_f64();
    let moved = sink.bytes.load(Ordering::Relaxed);
    let mb = |b: u64, s: f64| b as f64 / 1e6 / s;
    eprintln!(
        "quic: {moved} bytes in {quic_s:.2} s ({:.0} MB/s)",
        mb(moved, quic_s)
    );

    // The same bytes through socat: TLS over TCP (same CA and certificates),
    // then plain TCP.
    let file = dir.join("data");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file)?;
        for i in 0..args.mib {
            f.write_all(&chunks[i % chunks.len()].1)?;
        }
    }
    let c = |n: &str| certs.join(n).display().to_string();
    let port = free_port()?;
    let tls_s = socat_copy(
        &file,
        &format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,cert={},key={},cafile={},verify=1",
            c("node-2.pem"),
            c("node-2.key"),
            c("ca.pem")
        ),
        &format!(
            "OPENSSL:127.0.0.1:{port},cert={},key={},cafile={},verify=1,commonname=node-2",
            c("node-1.pem"),
            c("node-1.key"),
            c("ca.pem")
        ),
    )?;
    eprintln!(
        "socat TLS: {bytes} bytes in {tls_s:.2} s ({:.0} MB/s)",
        mb(bytes, tls_s)
    );
    let port = free_port()?;
    let tcp_s = socat_copy(
        &file,
        &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
        &format!("TCP:127.0.0.1:{port}"),
    )?;
    eprintln!(
        "socat TCP: {bytes} bytes in {tcp_s:.2} s ({:.0} MB/s)",
        mb(bytes, tcp_s)
    );
    a.close();
    b.close();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "bytes": moved,
            "quic": {"seconds": quic_s, "mb_s": mb(moved, quic_s), "chunk_bytes": 1 << 20, "chunks_per_put": args.batch, "streams": args.streams},
            "tls_tcp_socat": {"seconds": tls_s, "mb_s": mb(bytes, tls_s)},
            "plain_tcp_socat": {"seconds": tcp_s, "mb_s": mb(bytes, tcp_s)},
            "quic_vs_tls": (mb(moved, quic_s)) / mb(bytes, tls_s),
        }))?
    );
    Ok(())
}
