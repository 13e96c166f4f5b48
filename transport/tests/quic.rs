//! Two real QUIC endpoints on loopback with mutual TLS from a dev CA.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bitclone_raft::tls::{check_peer, generate_dev, install_crypto_provider, PeerTls};
use bitclone_transport::{ChunkServer, Error, Transport, TransportConfig};
use rustls::pki_types::CertificateDer;

type Chunks = HashMap<(String, [u8; 32]), Vec<u8>>;

#[derive(Default)]
struct MemServer {
    chunks: Mutex<Chunks>,
}

impl ChunkServer for MemServer {
    fn authorize(&self, certs: &[CertificateDer<'static>], claimed: u64) -> Result<(), String> {
        check_peer(certs, claimed).map_err(|e| e.to_string())
    }
    fn missing(&self, tenant: &str, ids: &[[u8; 32]]) -> Result<Vec<bool>, String> {
        let map = self.chunks.lock().unwrap();
        Ok(ids
            .iter()
            .map(|i| !map.contains_key(&(tenant.to_string(), *i)))
            .collect())
    }
    fn store(&self, tenant: &str, id: &[u8; 32], data: &[u8]) -> Result<bool, String> {
        let mut map = self.chunks.lock().unwrap();
        Ok(map
            .insert((tenant.to_string(), *id), data.to_vec())
            .is_none())
    }
    fn load(&self, tenant: &str, id: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .chunks
            .lock()
            .unwrap()
            .get(&(tenant.to_string(), *id))
            .cloned())
    }
    fn load_manifest(&self, tenant: &str, id: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        self.load(tenant, id)
    }
    fn store_manifest(&self, tenant: &str, id: &[u8; 32], bytes: &[u8]) -> Result<(), String> {
        self.store(tenant, id, bytes).map(|_| ())
    }
}

fn node(dir: &Path, id: u64, cfg: TransportConfig) -> (Arc<Transport>, Arc<MemServer>, SocketAddr) {
    install_crypto_provider();
    let tls = PeerTls::load(dir, id).unwrap();
    let server = Arc::new(MemServer::default());
    let t = Transport::bind(
        id,
        "127.0.0.1:0".parse().unwrap(),
        tls.rustls_server_config().unwrap(),
        tls.rustls_client_config().unwrap(),
        server.clone(),
        cfg,
    )
    .unwrap();
    let addr = t.local_addr().unwrap();
    (t, server, addr)
}

fn chunk(seed: u8, len: usize) -> ([u8; 32], Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    (*blake3::hash(&data).as_bytes(), data)
}

#[tokio::test]
async fn chunks_move_verified_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    generate_dev(dir.path(), 2).unwrap();
    let (a, _, _) = node(dir.path(), 1, TransportConfig::default());
    let (b, b_store, b_addr) = node(dir.path(), 2, TransportConfig::default());
    let chunks: Vec<_> = (0..20u8).map(|i| chunk(i, 1 << 20)).collect();
    let ids: Vec<[u8; 32]> = chunks.iter().map(|(i, _)| *i).collect();
    assert_eq!(a.missing(2, b_addr, "t", &ids).await.unwrap().len(), 20);
    let refs: Vec<([u8; 32], &[u8])> = chunks.iter().map(|(i, d)| (*i, d.as_slice())).collect();
    assert_eq!(a.put(2, b_addr, "t", &refs).await.unwrap(), 20);
    assert!(a.missing(2, b_addr, "t", &ids).await.unwrap().is_empty());
    // Another tenant does not see them.
    assert_eq!(a.missing(2, b_addr, "other", &ids).await.unwrap().len(), 20);
    assert_eq!(
        a.put(2, b_addr, "t", &refs[..3]).await.unwrap(),
        0,
        "already there"
    );
    let back = a.get(2, b_addr, "t", &ids[5..8]).await.unwrap();
    assert_eq!(
        back,
        vec![
            chunks[5].1.clone(),
            chunks[6].1.clone(),
            chunks[7].1.clone()
        ]
    );
    assert_eq!(b_store.chunks.lock().unwrap().len(), 20);
    // Manifests travel verified the same way.
    let (mid, m) = chunk(99, 5000);
    a.put_manifest(
        2,
        b_addr,
        "t",
        (&mid, &m),
        bitclone_transport::CallContext {
            request_id: Some("req-1"),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        a.get_manifest(2, b_addr, "t", &mid, 1 << 20).await.unwrap(),
        m
    );
    let e = a.get(2, b_addr, "t", &[[9u8; 32]]).await.unwrap_err();
    assert!(e.to_string().contains("not here"), "{e}");
    // Each side counts what arrived, by sender: b the 23 chunks put (3 of
    // them already there) and the manifest; a the 3 chunks and the
    // manifest it fetched.
    let tally = |items, bytes| bitclone_transport::Tally { items, bytes };
    assert_eq!(
        b.received(),
        vec![(1, tally(24, (23 << 20) + m.len() as u64))]
    );
    assert_eq!(
        a.received(),
        vec![(2, tally(4, (3 << 20) + m.len() as u64))]
    );
}

#[tokio::test]
async fn a_chunk_that_does_not_match_its_name_is_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    generate_dev(dir.path(), 2).unwrap();
    let (a, _, _) = node(dir.path(), 1, TransportConfig::default());
    let (_b, b_store, b_addr) = node(dir.path(), 2, TransportConfig::default());
    let (good_id, good) = chunk(1, 1000);
    let (_, other) = chunk(2, 1000);
    let e = a
        .put(2, b_addr, "t", &[(good_id, other.as_slice())])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Remote { .. }), "{e}");
    assert!(e.to_string().contains("does not match its name"), "{e}");
    assert!(b_store.chunks.lock().unwrap().is_empty());
    // The connection is still usable for good chunks.
    assert_eq!(
        a.put(2, b_addr, "t", &[(good_id, good.as_slice())])
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn frames_over_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    generate_dev(dir.path(), 2).unwrap();
    let (a, _, _) = node(dir.path(), 1, TransportConfig::default());
    let small = TransportConfig {
        max_frame: 64 << 10,
        ..TransportConfig::default()
    };
    let (_b, b_store, b_addr) = node(dir.path(), 2, small);
    let (id, data) = chunk(3, 1 << 20);
    let e = a
        .put(2, b_addr, "t", &[(id, data.as_slice())])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
    assert!(b_store.chunks.lock().unwrap().is_empty());
}

#[tokio::test]
async fn peers_from_another_ca_or_with_the_wrong_name_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    generate_dev(dir.path(), 3).unwrap();
    let other = tempfile::tempdir().unwrap();
    generate_dev(other.path(), 3).unwrap();
    let (_b, b_store, b_addr) = node(dir.path(), 2, TransportConfig::default());
    // A client whose certificate comes from another CA.
    let (intruder, _, _) = node(other.path(), 3, TransportConfig::default());
    let (id, data) = chunk(4, 100);
    let e = intruder
        .put(2, b_addr, "t", &[(id, data.as_slice())])
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Connection { .. } | Error::Protocol(_)),
        "{e}"
    );
    assert!(b_store.chunks.lock().unwrap().is_empty());
    // A genuine node dialing node 2's address while expecting node 1: the
    // server's certificate does not carry that name.
    let (a, _, _) = node(dir.path(), 1, TransportConfig::default());
    let e = a.missing(1, b_addr, "t", &[id]).await.unwrap_err();
    assert!(matches!(e, Error::Connection { .. }), "{e}");
    // A genuine certificate claiming another node's id in the request.
    let liar = {
        install_crypto_provider();
        let tls = PeerTls::load(dir.path(), 3).unwrap();
        Transport::bind(
            1, // claims to be node 1 with node 3's certificate
            "127.0.0.1:0".parse().unwrap(),
            tls.rustls_server_config().unwrap(),
            tls.rustls_client_config().unwrap(),
            Arc::new(MemServer::default()),
            TransportConfig::default(),
        )
        .unwrap()
    };
    let e = liar
        .put(2, b_addr, "t", &[(id, data.as_slice())])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("peer refused"), "{e}");
    assert!(b_store.chunks.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    generate_dev(dir.path(), 2).unwrap();
    let (_b, b_store, b_addr) = node(dir.path(), 2, TransportConfig::default());
    install_crypto_provider();
    let tls = PeerTls::load(dir.path(), 1).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in <CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(tls.ca_pem()) {
        roots.add(c.unwrap()).unwrap();
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let t = Transport::bind(
        1,
        "127.0.0.1:0".parse().unwrap(),
        tls.rustls_server_config().unwrap(),
        anonymous,
        Arc::new(MemServer::default()),
        TransportConfig::default(),
    )
    .unwrap();
    let (id, data) = chunk(5, 100);
    let e = t
        .put(2, b_addr, "t", &[(id, data.as_slice())])
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Connection { .. } | Error::Protocol(_)),
        "{e}"
    );
    assert!(b_store.chunks.lock().unwrap().is_empty());
}

/// Builds of other releases, played by the versions they offer: the
/// newest version both speak is used, and none in common is refused at the
/// handshake with an error that says why.
#[tokio::test]
async fn builds_talk_in_the_newest_chunk_protocol_both_speak_and_refuse_none_in_common() {
    let dir = tempfile::tempdir().unwrap();
    generate_dev(dir.path(), 4).unwrap();
    let speaks = |versions: &[&str]| TransportConfig {
        protocols: versions.iter().map(|v| v.as_bytes().to_vec()).collect(),
        ..TransportConfig::default()
    };
    // This build, and the next release speaking /2 and still /1.
    let (current, _, _) = node(dir.path(), 1, TransportConfig::default());
    let (_next, next_store, next_addr) = node(
        dir.path(),
        2,
        speaks(&["bitclone-chunks/2", "bitclone-chunks/1"]),
    );
    let (id, data) = chunk(9, 1000);
    assert_eq!(
        current
            .put(2, next_addr, "t", &[(id, data.as_slice())])
            .await
            .unwrap(),
        1
    );
    assert!(next_store
        .chunks
        .lock()
        .unwrap()
        .contains_key(&("t".into(), id)));
    assert_eq!(
        current.protocol(2, next_addr).await.unwrap(),
        "bitclone-chunks/1"
    );
    // Two builds of the next release speak /2 with each other.
    let (next_too, _, _) = node(
        dir.path(),
        3,
        speaks(&["bitclone-chunks/2", "bitclone-chunks/1"]),
    );
    assert_eq!(
        next_too.protocol(2, next_addr).await.unwrap(),
        "bitclone-chunks/2"
    );
    // A release that dropped /1 and this build share nothing.
    let (_later, later_store, later_addr) = node(dir.path(), 4, speaks(&["bitclone-chunks/2"]));
    let e = current
        .put(4, later_addr, "t", &[(id, data.as_slice())])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connection { .. }), "{e}");
    assert!(
        e.to_string().contains("upgrade one release at a time"),
        "{e}"
    );
    assert!(later_store.chunks.lock().unwrap().is_empty());
}
