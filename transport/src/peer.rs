//! The QUIC endpoint: serving the chunk protocol and calling peers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;

use crate::frame::{self, kind, op};
use crate::{Error, Result};

/// The local side of the protocol: where received chunks go and where
/// requested ones come from. Methods block (RocksDB) and run on tokio's
/// blocking pool, all but `authorize`, which runs on the async thread and
/// must not block.
pub trait ChunkServer: Send + Sync + 'static {
    /// Checks that the certificate chain (already verified against the
    /// cluster CA) belongs to node `claimed` and that it may talk to us.
    fn authorize(
        &self,
        peer_certs: &[CertificateDer<'static>],
        claimed: u64,
    ) -> std::result::Result<(), String>;
    /// For each name, whether this node lacks it.
    fn missing(&self, tenant: &str, ids: &[[u8; 32]]) -> std::result::Result<Vec<bool>, String>;
    /// Stores a chunk whose name was verified; returns true if it was new.
    fn store(&self, tenant: &str, id: &[u8; 32], data: &[u8]) -> std::result::Result<bool, String>;
    /// Stores chunks whose names were verified; returns how many were new.
    /// A store that can write many at once overrides this.
    fn store_many(
        &self,
        tenant: &str,
        chunks: &[([u8; 32], &[u8])],
    ) -> std::result::Result<u64, String> {
        let mut new = 0;
        for (id, data) in chunks {
            new += u64::from(self.store(tenant, id, data)?);
        }
        Ok(new)
    }
    /// Reads a chunk (verified by the store), or `None` if it is not here.
    fn load(&self, tenant: &str, id: &[u8; 32]) -> std::result::Result<Option<Vec<u8>>, String>;
    /// Reads a manifest, or `None` if it is not here.
    fn load_manifest(
        &self,
        tenant: &str,
        id: &[u8; 32],
    ) -> std::result::Result<Option<Vec<u8>>, String>;
    /// Durably stores a manifest whose name was verified, and with it every
    /// chunk stored before (a put is acknowledged once stored, not yet
    /// durable: the manifest, sent last, makes the snapshot durable).
    fn store_manifest(
        &self,
        tenant: &str,
        id: &[u8; 32],
        bytes: &[u8],
    ) -> std::result::Result<(), String>;
    /// Makes `span` (this node's handling of a peer's request) a child of
    /// the sender's span named by a W3C `traceparent`, when this node
    /// exports traces; by default nothing.
    fn adopt_trace(&self, span: &tracing::Span, traceparent: &str) {
        let _ = (span, traceparent);
    }
}

/// What ties a request to the call that caused it: the caller's
/// correlation id and, when traced, its span as a W3C `traceparent`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallContext<'a> {
    pub request_id: Option<&'a str>,
    pub traceparent: Option<&'a str>,
}

/// Flow control and limits; the defaults suit bulk transfer on loopback and
/// on a real network.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest frame accepted (a chunk is at most 4 MiB + its name).
    pub max_frame: usize,
    /// Per-stream receive window.
    pub stream_window: u64,
    /// Per-connection receive window.
    pub connection_window: u64,
    /// Concurrent bidirectional streams a peer may open.
    pub max_streams: u32,
    /// UDP socket send and receive buffers.
    pub udp_buffer: usize,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// The chunk protocol versions offered (ALPN ids, newest first); the
    /// default is [`crate::CHUNK_PROTOCOLS`]. Tests set others to play
    /// builds of other releases.
    pub protocols: Vec<Vec<u8>>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_frame: (4 << 20) + 64,
            // Enough for a 1 Gbit/s × 100 ms path; loopback needs less.
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            max_streams: 256,
            udp_buffer: 8 << 20,
            // Also bounds how long a handshake with a dead peer can hang.
            idle_timeout: Duration::from_secs(10),
            protocols: crate::CHUNK_PROTOCOLS.iter().map(|p| p.to_vec()).collect(),
        }
    }
}

/// One node's QUIC endpoint, server and client.
pub struct Transport {
    me: u64,
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    conns: Mutex<HashMap<(u64, SocketAddr), Connection>>,
    max_frame: usize,
    /// The chunk protocol versions offered (ALPN ids).
    protocols: Vec<Vec<u8>>,
    received: Arc<Received>,
}

/// What this node received from each peer: chunks, pages and manifests it
/// was sent (puts) or fetched (gets), counted a put's group or a whole get
/// at a time (one lock for many small chunks).
#[derive(Default)]
struct Received(Mutex<HashMap<u64, Tally>>);

/// Items (chunks, pages, manifests) and their bytes (without names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub items: u64,
    pub bytes: u64,
}

impl Received {
    /// Adds `items` holding `bytes` (names not counted) from `peer`.
    fn add(&self, peer: u64, items: usize, bytes: usize) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let t = m.entry(peer).or_default();
        t.items += items as u64;
        t.bytes += bytes as u64;
    }

    /// Adds frames (each a 32-byte name and its bytes) from `peer`.
    fn add_frames(&self, peer: u64, frames: &[Vec<u8>]) {
        let bytes = frames.iter().map(|f| f.len().saturating_sub(32)).sum();
        self.add(peer, frames.len(), bytes);
    }
}

fn transport_config(cfg: &TransportConfig) -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    let varint = |v: u64| quinn::VarInt::from_u64(v).map_err(|e| Error::Setup(e.to_string()));
    t.stream_receive_window(varint(cfg.stream_window)?)
        .receive_window(varint(cfg.connection_window)?)
        .send_window(cfg.connection_window)
        .max_concurrent_bidi_streams(cfg.max_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.idle_timeout)
                .map_err(|e| Error::Setup(e.to_string()))?,
        ));
    Ok(Arc::new(t))
}

impl Transport {
    /// Binds `addr` (UDP) and starts serving `server`. The rustls configs
    /// must require client certificates (server) and present one (client).
    pub fn bind(
        me: u64,
        addr: SocketAddr,
        mut server_tls: rustls::ServerConfig,
        mut client_tls: rustls::ClientConfig,
        server: Arc<dyn ChunkServer>,
        cfg: TransportConfig,
    ) -> Result<Arc<Transport>> {
        server_tls.alpn_protocols = cfg.protocols.clone();
        client_tls.alpn_protocols = cfg.protocols.clone();
        let tc = transport_config(&cfg)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).map_err(|e| Error::Setup(e.to_string()))?,
        ));
        server_config.transport_config(tc.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).map_err(|e| Error::Setup(e.to_string()))?,
        ));
        client.transport_config(tc);

        // Large socket buffers matter most for throughput (CRATES.md).
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .map_err(|e| Error::Setup(format!("udp socket: {e}")))?;
        let _ = socket.set_recv_buffer_size(cfg.udp_buffer);
        let _ = socket.set_send_buffer_size(cfg.udp_buffer);
        socket
            .bind(&addr.into())
            .map_err(|e| Error::Setup(format!("binding {addr}: {e}")))?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket.into(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| Error::Setup(e.to_string()))?;
        let t = Arc::new(Transport {
            me,
            endpoint: endpoint.clone(),
            client,
            conns: Mutex::default(),
            max_frame: cfg.max_frame,
            protocols: cfg.protocols.clone(),
            received: Arc::default(),
        });
        tokio::spawn(serve(endpoint, server, cfg.max_frame, t.received.clone()));
        Ok(t)
    }

    /// What this node has received from each peer since it started, by
    /// peer id.
    pub fn received(&self) -> Vec<(u64, Tally)> {
        let m = self.received.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(u64, Tally)> = m.iter().map(|(p, t)| (*p, *t)).collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::Setup(e.to_string()))
    }

    /// Closes the endpoint and its connections.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    async fn connection(&self, peer: u64, addr: SocketAddr) -> Result<Connection> {
        if let Some(c) = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(peer, addr))
        {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let err = |detail: String| Error::Connection { peer, detail };
        // The server must prove it is node `peer`: its name is checked.
        // quinn runs the connection's driver in the span current at connect
        // time, for as long as the connection lives; connecting from a task
        // of its own keeps a pooled connection from holding the first
        // request's span (and its trace) open.
        let (endpoint, client, name) = (
            self.endpoint.clone(),
            self.client.clone(),
            format!("node-{peer}"),
        );
        let conn = tokio::spawn(async move { endpoint.connect_with(client, addr, &name) })
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(self.handshake_error(e)))?;
        tracing::debug!(
            peer,
            protocol = %negotiated(&conn).unwrap_or_default(),
            "connected to a peer's chunk service"
        );
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((peer, addr), conn.clone());
        Ok(conn)
    }

    /// The chunk protocol version spoken with `peer` (its ALPN id),
    /// connecting if need be.
    pub async fn protocol(&self, peer: u64, addr: SocketAddr) -> Result<String> {
        let conn = self.connection(peer, addr).await?;
        negotiated(&conn).ok_or_else(|| Error::Connection {
            peer,
            detail: "the connection negotiated no chunk protocol".into(),
        })
    }

    /// Says so when the peer speaks no chunk protocol version this node
    /// offers (TLS alert 120): builds more than one release apart.
    fn handshake_error(&self, e: quinn::ConnectionError) -> String {
        let no_protocol = quinn::TransportErrorCode::crypto(120);
        let refused = match &e {
            quinn::ConnectionError::ConnectionClosed(c) => c.error_code == no_protocol,
            quinn::ConnectionError::TransportError(t) => t.code == no_protocol,
            _ => false,
        };
        if !refused {
            return e.to_string();
        }
        let offered: Vec<String> = self
            .protocols
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        format!(
            "the peer speaks none of the chunk protocol versions this node does ({}): \
             nodes more than one release apart cannot run in one cluster; upgrade one release at a time",
            offered.join(", ")
        )
    }

    async fn request(
        &self,
        peer: u64,
        addr: SocketAddr,
        operation: u8,
        tenant: &str,
    ) -> Result<(SendStream, RecvStream)> {
        let conn = self.connection(peer, addr).await?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| Error::Connection {
            peer,
            detail: e.to_string(),
        })?;
        frame::write(
            &mut send,
            kind::REQUEST,
            &[&self.me.to_le_bytes(), &[operation], tenant.as_bytes()],
        )
        .await?;
        Ok((send, recv))
    }

    /// Opens a request whose whole body is one IDS frame; returns the reply side.
    async fn request_ids(
        &self,
        peer: u64,
        addr: SocketAddr,
        operation: u8,
        tenant: &str,
        ids: &[[u8; 32]],
    ) -> Result<RecvStream> {
        let (mut send, recv) = self.request(peer, addr, operation, tenant).await?;
        frame::write(&mut send, kind::IDS, &[ids.as_flattened()]).await?;
        let _ = send.finish();
        Ok(recv)
    }

    /// Which of `ids` the peer lacks.
    pub async fn missing(
        &self,
        peer: u64,
        addr: SocketAddr,
        tenant: &str,
        ids: &[[u8; 32]],
    ) -> Result<Vec<[u8; 32]>> {
        let mut recv = self
            .request_ids(peer, addr, op::MISSING, tenant, ids)
            .await?;
        let (k, payload) = frame::read(&mut recv, self.max_frame.max(ids.len() + 64)).await?;
        match k {
            kind::MISSING if payload.len() == ids.len() => Ok(ids
                .iter()
                .zip(payload)
                .filter(|(_, m)| *m == 1)
                .map(|(i, _)| *i)
                .collect()),
            kind::ERROR => Err(remote(peer, &payload)),
            _ => Err(Error::Protocol("unexpected reply to missing".into())),
        }
    }

    /// Sends chunks (name, bytes); the peer verifies each name before it
    /// stores. Returns how many were new there. They are durable there once
    /// a manifest sent after them is acknowledged ([`Transport::put_manifest`]).
    pub async fn put(
        &self,
        peer: u64,
        addr: SocketAddr,
        tenant: &str,
        chunks: &[([u8; 32], &[u8])],
    ) -> Result<u64> {
        let (mut send, mut recv) = self.request(peer, addr, op::PUT, tenant).await?;
        let io = |e: quinn::WriteError| Error::Protocol(format!("write: {e}"));
        // Small chunks (small files, manifest pages) are coalesced into
        // writes of about 256 KiB: one stream write per chunk cost more
        // than the bytes.
        let mut buf = Vec::with_capacity(WRITE_COALESCE_BYTES + 64);
        for (id, data) in chunks {
            if data.len() >= WRITE_COALESCE_BYTES {
                send.write_all(&buf).await.map_err(io)?;
                buf.clear();
                frame::write(&mut send, kind::CHUNK, &[id, data]).await?;
                continue;
            }
            frame::encode(&mut buf, kind::CHUNK, &[id, data])?;
            if buf.len() >= WRITE_COALESCE_BYTES {
                send.write_all(&buf).await.map_err(io)?;
                buf.clear();
            }
        }
        frame::encode(&mut buf, kind::END, &[])?;
        send.write_all(&buf).await.map_err(io)?;
        let _ = send.finish();
        let (k, payload) = frame::read(&mut recv, self.max_frame).await?;
        match k {
            kind::STORED if payload.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&payload);
                Ok(u64::from_le_bytes(b))
            }
            kind::ERROR => Err(remote(peer, &payload)),
            _ => Err(Error::Protocol("unexpected reply to put".into())),
        }
    }

    /// Sends a manifest (named by its BLAKE3); acknowledged once durable.
    /// `call`, the call that made the snapshot, goes along: its id for the
    /// peer's log, its trace context for the peer's span.
    pub async fn put_manifest(
        &self,
        peer: u64,
        addr: SocketAddr,
        tenant: &str,
        (id, bytes): (&[u8; 32], &[u8]),
        call: CallContext<'_>,
    ) -> Result<()> {
        // In the request header after the tenant, past a newline (which no
        // tenant name holds): `tenant\nrequest_id[\ntraceparent]`. A peer
        // of the release before reads id and traceparent as one id that is
        // not plain, and drops it.
        fn clean(v: Option<&str>) -> &str {
            v.filter(|v| !v.contains('\n')).unwrap_or("")
        }
        let (r, tp) = (clean(call.request_id), clean(call.traceparent));
        let target = match (r, tp) {
            ("", "") => tenant.to_string(),
            (r, "") => format!("{tenant}\n{r}"),
            (r, tp) => format!("{tenant}\n{r}\n{tp}"),
        };
        let (mut send, mut recv) = self.request(peer, addr, op::PUT_MANIFEST, &target).await?;
        frame::write(&mut send, kind::CHUNK, &[id, bytes]).await?;
        let _ = send.finish();
        let (k, payload) = frame::read(&mut recv, self.max_frame).await?;
        match k {
            kind::STORED => Ok(()),
            kind::ERROR => Err(remote(peer, &payload)),
            _ => Err(Error::Protocol("unexpected reply to put_manifest".into())),
        }
    }

    /// Fetches a manifest (verified against its name), `max` bytes at most.
    pub async fn get_manifest(
        &self,
        peer: u64,
        addr: SocketAddr,
        tenant: &str,
        id: &[u8; 32],
        max: usize,
    ) -> Result<Vec<u8>> {
        let mut recv = self
            .request_ids(peer, addr, op::GET_MANIFEST, tenant, &[*id])
            .await?;
        let (k, payload) = frame::read(&mut recv, max).await?;
        match k {
            kind::CHUNK => {
                self.received.add(peer, 1, payload.len().saturating_sub(32));
                let (got, bytes) = frame::split_chunk(&payload)?;
                if &got != id || blake3::hash(bytes).as_bytes() != id {
                    return Err(Error::Remote {
                        peer,
                        message: "sent a manifest that does not match its name".into(),
                    });
                }
                Ok(bytes.to_vec())
            }
            kind::ERROR => Err(remote(peer, &payload)),
            _ => Err(Error::Protocol("unexpected reply to get_manifest".into())),
        }
    }

    /// Fetches chunks; each one is verified against its name here too.
    pub async fn get(
        &self,
        peer: u64,
        addr: SocketAddr,
        tenant: &str,
        ids: &[[u8; 32]],
    ) -> Result<Vec<Vec<u8>>> {
        let mut recv = self.request_ids(peer, addr, op::GET, tenant, ids).await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut received = 0;
        for want in ids {
            let (k, payload) = frame::read(&mut recv, self.max_frame).await?;
            match k {
                kind::CHUNK => {
                    let (id, data) = frame::split_chunk(&payload)?;
                    if &id != want || blake3::hash(data).as_bytes() != want {
                        return Err(Error::Remote {
                            peer,
                            message: "sent a chunk that does not match its name".into(),
                        });
                    }
                    received += data.len();
                    out.push(data.to_vec());
                }
                kind::ERROR => return Err(remote(peer, &payload)),
                _ => return Err(Error::Protocol("unexpected reply to get".into())),
            }
        }
        // Counted once the get is whole.
        self.received.add(peer, out.len(), received);
        Ok(out)
    }
}

/// The chunk protocol version a connection speaks (its ALPN id).
fn negotiated(conn: &Connection) -> Option<String> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
        .map(|p| String::from_utf8_lossy(&p).into_owned())
}

fn remote(peer: u64, payload: &[u8]) -> Error {
    Error::Remote {
        peer,
        message: String::from_utf8_lossy(payload).into_owned(),
    }
}

async fn serve(
    endpoint: Endpoint,
    server: Arc<dyn ChunkServer>,
    max_frame: usize,
    received: Arc<Received>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (server, received) = (server.clone(), received.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "QUIC handshake refused");
                    return;
                }
            };
            let certs: Vec<CertificateDer<'static>> = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|b| *b)
                .unwrap_or_default();
            let certs = Arc::new(certs);
            loop {
                let (send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(_) => return,
                };
                let (server, certs, received) = (server.clone(), certs.clone(), received.clone());
                tokio::spawn(async move {
                    let mut send = send;
                    if let Err(e) =
                        handle(&server, &certs, &mut send, recv, (max_frame, &received)).await
                    {
                        let msg = e.to_string();
                        tracing::warn!(error = msg, "chunk request failed");
                        let _ = frame::write(&mut send, kind::ERROR, &[msg.as_bytes()]).await;
                    }
                    let _ = send.finish();
                });
            }
        });
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Protocol(e.to_string()))?
        .map_err(Error::Protocol)
}

/// Small frames of a put are sent in writes of about this size.
const WRITE_COALESCE_BYTES: usize = 256 << 10;

/// Groups of a put's chunks verified and stored concurrently.
const STORE_PIPELINE: usize = 4;
/// A group closes at this many bytes or chunks: small chunks (small files)
/// are stored many to a write, not one write each.
const STORE_GROUP_BYTES: usize = 1 << 20;
const STORE_GROUP_CHUNKS: usize = 256;

type StoreTask = tokio::task::JoinHandle<std::result::Result<u64, String>>;

/// Waits for the oldest store of a put; the chunks it found new.
async fn settle(in_flight: &mut std::collections::VecDeque<StoreTask>) -> Result<u64> {
    match in_flight.pop_front() {
        Some(task) => task
            .await
            .map_err(|e| Error::Protocol(e.to_string()))?
            .map_err(Error::Protocol),
        None => Ok(0),
    }
}

/// Verifies a group of received chunk frames and stores them in one go
/// (off the async threads).
fn store_group(server: &Arc<dyn ChunkServer>, tenant: &str, group: Vec<Vec<u8>>) -> StoreTask {
    let (srv, t) = (server.clone(), tenant.to_string());
    tokio::task::spawn_blocking(move || {
        let mut chunks = Vec::with_capacity(group.len());
        for payload in &group {
            let (id, data) = frame::split_chunk(payload).map_err(|e| e.to_string())?;
            // Never store bytes under a name they do not have.
            if blake3::hash(data).as_bytes() != &id {
                return Err(format!(
                    "chunk {} does not match its name; nothing stored for it",
                    blake3::Hash::from(id).to_hex()
                ));
            }
            chunks.push((id, data));
        }
        srv.store_many(&t, &chunks)
    })
}

async fn handle(
    server: &Arc<dyn ChunkServer>,
    certs: &Arc<Vec<CertificateDer<'static>>>,
    send: &mut SendStream,
    mut recv: RecvStream,
    (max_frame, received): (usize, &Received),
) -> Result<()> {
    let (k, header) = frame::read(&mut recv, 4096).await?;
    if k != kind::REQUEST || header.len() < 9 {
        return Err(Error::Protocol("a stream must start with a request".into()));
    }
    let mut from = [0u8; 8];
    from.copy_from_slice(&header[..8]);
    let from = u64::from_le_bytes(from);
    let operation = header[8];
    let target = String::from_utf8(header[9..].to_vec())
        .map_err(|_| Error::Protocol("tenant is not UTF-8".into()))?;
    // Only a manifest put carries the sender's call (correlation id and
    // trace context), and only a plain id is kept (it goes into this
    // node's log).
    let (tenant, request_id, traceparent) = match (operation, target.split_once('\n')) {
        (op::PUT_MANIFEST, Some((t, call))) => {
            let (r, tp) = call.split_once('\n').unwrap_or((call, ""));
            let plain = r.len() <= 64
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            (
                t.to_string(),
                if plain { r.to_string() } else { String::new() },
                tp.to_string(),
            )
        }
        (_, Some(_)) => return Err(Error::Protocol("a newline in the tenant".into())),
        (_, None) => (target, String::new(), String::new()),
    };
    server
        .authorize(certs, from)
        .map_err(|e| Error::Protocol(format!("peer refused: {e}")))?;
    let span = if operation == op::PUT_MANIFEST {
        let span = tracing::info_span!("store_replica", peer = from, request_id = %request_id);
        if !traceparent.is_empty() {
            server.adopt_trace(&span, &traceparent);
        }
        span
    } else {
        tracing::Span::none()
    };
    let work = async move {
        match operation {
            op::MISSING => {
                let (k, payload) = frame::read(&mut recv, max_frame).await?;
                if k != kind::IDS {
                    return Err(Error::Protocol("expected ids".into()));
                }
                let ids = frame::split_ids(&payload)?;
                let s = server.clone();
                let missing = blocking(move || s.missing(&tenant, &ids)).await?;
                let bytes: Vec<u8> = missing.iter().map(|m| u8::from(*m)).collect();
                frame::write(send, kind::MISSING, &[&bytes]).await
            }
            op::PUT => {
                let mut stored = 0u64;
                let mut in_flight = std::collections::VecDeque::new();
                let (mut group, mut group_bytes) = (Vec::new(), 0usize);
                loop {
                    let (k, payload) = frame::read(&mut recv, max_frame).await?;
                    match k {
                        kind::END => break,
                        kind::CHUNK => {
                            frame::split_chunk(&payload)?;
                            group_bytes += payload.len();
                            group.push(payload);
                            if group_bytes < STORE_GROUP_BYTES && group.len() < STORE_GROUP_CHUNKS {
                                continue;
                            }
                            // Verified and stored off the async threads, a few
                            // groups at a time, while the next frames arrive.
                            group_bytes = 0;
                            received.add_frames(from, &group);
                            in_flight.push_back(store_group(
                                server,
                                &tenant,
                                std::mem::take(&mut group),
                            ));
                            if in_flight.len() >= STORE_PIPELINE {
                                stored += settle(&mut in_flight).await?;
                            }
                        }
                        _ => return Err(Error::Protocol("expected a chunk or the end".into())),
                    }
                }
                if !group.is_empty() {
                    received.add_frames(from, &group);
                    in_flight.push_back(store_group(server, &tenant, group));
                }
                while !in_flight.is_empty() {
                    stored += settle(&mut in_flight).await?;
                }
                // Stored, not yet durable: the manifest, sent after the chunks
                // and pages, is stored durably and makes them so (one flush per
                // snapshot, not one per put).
                frame::write(send, kind::STORED, &[&stored.to_le_bytes()]).await
            }
            op::GET_MANIFEST => {
                let (k, payload) = frame::read(&mut recv, max_frame).await?;
                let ids = if k == kind::IDS {
                    frame::split_ids(&payload)?
                } else {
                    Vec::new()
                };
                let [id] = ids.as_slice() else {
                    return Err(Error::Protocol("expected one manifest name".into()));
                };
                let (s, t, id) = (server.clone(), tenant.clone(), *id);
                match blocking(move || s.load_manifest(&t, &id)).await? {
                    Some(bytes) => frame::write(send, kind::CHUNK, &[&id, &bytes]).await,
                    None => Err(Error::Protocol(format!(
                        "manifest {} is not here",
                        blake3::Hash::from(id).to_hex()
                    ))),
                }
            }
            op::PUT_MANIFEST => {
                let (k, payload) = frame::read(&mut recv, max_frame).await?;
                if k != kind::CHUNK {
                    return Err(Error::Protocol("expected a manifest".into()));
                }
                let (id, bytes) = frame::split_chunk(&payload)?;
                received.add(from, 1, payload.len().saturating_sub(32));
                if blake3::hash(bytes).as_bytes() != &id {
                    return Err(Error::Protocol("manifest does not match its name".into()));
                }
                let s = server.clone();
                let t = tenant.clone();
                blocking(move || {
                    let (id, bytes) = frame::split_chunk(&payload).map_err(|e| e.to_string())?;
                    s.store_manifest(&t, &id, bytes)
                })
                .await?;
                tracing::debug!(
                    peer = from,
                    tenant = %tenant,
                    request_id = %request_id,
                    manifest = %blake3::Hash::from(id).to_hex(),
                    "stored a snapshot's manifest sent by a peer"
                );
                frame::write(send, kind::STORED, &[&1u64.to_le_bytes()]).await
            }
            op::GET => {
                let (k, payload) = frame::read(&mut recv, max_frame).await?;
                if k != kind::IDS {
                    return Err(Error::Protocol("expected ids".into()));
                }
                for id in frame::split_ids(&payload)? {
                    let (s, t) = (server.clone(), tenant.clone());
                    match blocking(move || s.load(&t, &id)).await? {
                        Some(data) => frame::write(send, kind::CHUNK, &[&id, &data]).await?,
                        None => {
                            return Err(Error::Protocol(format!(
                                "chunk {} is not here",
                                blake3::Hash::from(id).to_hex()
                            )))
                        }
                    }
                }
                Ok(())
            }
            other => Err(Error::Protocol(format!("unknown operation {other}"))),
        }
    };
    tracing::Instrument::instrument(work, span).await
}
