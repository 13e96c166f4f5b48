//! Mutual TLS between nodes.
//!
//! Every node holds a certificate issued by the one cluster CA whose DNS
//! subject alternative name is [`node_name`] of its node id. Servers require
//! client certificates signed by that CA; clients trust only that CA and check
//! the server's certificate against the name of the node they meant to reach.
//! On the server side, [`check_peer`] ties the node id a request claims to the
//! certificate the caller presented.
//!
//! Layout of a certificate directory (as written by [`generate_dev`]):
//!
//! ```text
//! ca.pem        the cluster CA certificate (trust root)
//! ca.key        the CA private key (only needed to issue certificates)
//! node-<id>.pem node <id>'s certificate
//! node-<id>.key node <id>'s private key (mode 0600)
//! ```

use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::Error;

/// File name of the cluster CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the cluster CA private key.
pub const CA_KEY_FILE: &str = "ca.key";

const DAY: Duration = Duration::from_secs(86_400);
/// Validity of dev certificates: ten years (and a couple of leap days).
const DEV_VALIDITY: Duration = Duration::from_secs(86_400 * 3_653);

/// The DNS name in node `id`'s certificate, and the name a client checks
/// when it dials node `id`.
pub fn node_name(id: u64) -> String {
    format!("node-{id}")
}

fn io_err(path: &Path, source: io::Error) -> Error {
    Error::TlsFile {
        path: path.to_path_buf(),
        detail: source.to_string(),
    }
}

/// One node's TLS material: the cluster CA and the node's own certificate
/// and key, all PEM.
#[derive(Clone)]
pub struct PeerTls {
    pub node_id: u64,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl fmt::Debug for PeerTls {
    /// Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Reads `dir/ca.pem`, `dir/node-<id>.pem` and `dir/node-<id>.key`, and
    /// checks that they fit together: the certificate chains to the CA, is
    /// valid for [`node_name`]`(node_id)`, and matches the private key. A
    /// misconfigured node therefore fails at start rather than at its first
    /// RPC.
    pub fn load(dir: &Path, node_id: u64) -> Result<PeerTls, Error> {
        let name = node_name(node_id);
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));

        let ca_pem = read_tls_file(dir, &ca_path)?;
        let cert_pem = read_tls_file(dir, &cert_path)?;
        let key_pem = read_tls_file(dir, &key_path)?;
        warn_if_key_readable(&key_path);

        let ca_certs = parse_certs(&ca_path, &ca_pem)?;
        let chain = parse_certs(&cert_path, &cert_pem)?;
        verify_node(&ca_certs, &chain, &key_pem, &name).map_err(|e| {
            Error::Cert(format!(
                "{} (this node's certificate, node id {node_id}): {e}",
                cert_path.display()
            ))
        })?;

        Ok(PeerTls {
            node_id,
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// Server side: present this node's certificate and require client
    /// certificates issued by the cluster CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side for dialing node `peer`: trust only the cluster CA,
    /// present this node's certificate, and require the server's certificate
    /// to be valid for [`node_name`]`(peer)`, so we talk to the node we meant.
    pub fn client_config(&self, peer: u64) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(self.identity())
            .domain_name(node_name(peer))
    }

    /// rustls server config for QUIC: TLS 1.3, this node's certificate,
    /// client certificates required and verified against the cluster CA.
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig, Error> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(|e| Error::Cert(format!("client verifier: {e}")))?;
        rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Cert(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, self.key()?)
            .map_err(|e| Error::Cert(e.to_string()))
    }

    /// rustls client config for QUIC: trust only the cluster CA, present
    /// this node's certificate. The server name (`node-<id>`) is given per
    /// connection.
    pub fn rustls_client_config(&self) -> Result<rustls::ClientConfig, Error> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Cert(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain()?, self.key()?)
            .map_err(|e| Error::Cert(e.to_string()))
    }

    fn roots(&self) -> Result<rustls::RootCertStore, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| Error::Cert(format!("CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Cert(format!("CA certificate: {e}")))?;
        }
        Ok(roots)
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, Error> {
        CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Cert(format!("node certificate: {e}")))
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, Error> {
        PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| Error::Cert(format!("node key: {e}")))
    }

    /// The cluster CA certificate(s), PEM.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }
}

/// Checks that the caller of an RPC is the node it claims to be.
///
/// `peer_certs` is what tonic's `request.peer_certs()` yields: rustls has
/// already verified the chain against the cluster CA during the handshake
/// (that is where CA trust is enforced). This only checks that the
/// end-entity certificate (the first) is valid for [`node_name`]`(claimed)`.
pub fn check_peer(peer_certs: &[CertificateDer<'static>], claimed: u64) -> Result<(), Error> {
    let expected = node_name(claimed);
    let Some(leaf) = peer_certs.first() else {
        return Err(Error::Identity {
            expected,
            detail: "the peer presented no certificate".to_string(),
        });
    };
    check_name(leaf, &expected).map_err(|detail| Error::Identity { expected, detail })
}

/// Installs aws-lc-rs as the process-wide rustls crypto provider. Call it
/// first thing in `main` (and in test setup): with more than one provider in
/// the build rustls cannot pick one by itself. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Creates (or completes) a development CA and node certificates in `out`.
///
/// Idempotent: an existing CA is reused (`ca.pem` + `ca.key`); a node whose
/// certificate and key already exist, chain to the CA, name the node and
/// match each other is kept byte for byte, so running again with a larger
/// `nodes` only adds the new nodes. A node whose files are incomplete or do
/// not fit the CA is issued afresh (with a warning). Private keys are written
/// with mode 0600; every file is written atomically. Returns the files
/// written.
pub fn generate_dev(out: &Path, nodes: u64) -> Result<Vec<PathBuf>, Error> {
    generate_dev_with(out, nodes, &[])
}

/// [`generate_dev`] with more names (IP addresses or DNS names) on every
/// node certificate, for nodes reached at addresses other than loopback's
/// `127.0.0.1` (several nodes on loopback addresses of their own, DNS
/// names of a StatefulSet's pods). An existing certificate that lacks one
/// of them is issued afresh.
pub fn generate_dev_with(
    out: &Path,
    nodes: u64,
    extra_names: &[String],
) -> Result<Vec<PathBuf>, Error> {
    fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let mut written = Vec::new();

    let ca_cert_path = out.join(CA_CERT_FILE);
    let ca_key_path = out.join(CA_KEY_FILE);
    let have_cert = ca_cert_path
        .try_exists()
        .map_err(|e| io_err(&ca_cert_path, e))?;
    let have_key = ca_key_path
        .try_exists()
        .map_err(|e| io_err(&ca_key_path, e))?;

    let (ca_pem, ca_key) = match (have_cert, have_key) {
        (true, true) => {
            let ca_pem = read_string(&ca_cert_path)?;
            let key_pem = read_string(&ca_key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| {
                Error::Cert(format!(
                    "{}: cannot parse the CA private key: {e}",
                    ca_key_path.display()
                ))
            })?;
            (ca_pem, key)
        }
        (false, false) => {
            let key = KeyPair::generate()
                .map_err(|e| Error::Cert(format!("generating the CA key pair: {e}")))?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| Error::Cert(format!("self-signing the dev CA: {e}")))?;
            let ca_pem = cert.pem();
            written.push(write_atomic(
                out,
                CA_KEY_FILE,
                key.serialize_pem().as_bytes(),
                0o600,
            )?);
            written.push(write_atomic(out, CA_CERT_FILE, ca_pem.as_bytes(), 0o644)?);
            (ca_pem, key)
        }
        (true, false) => {
            return Err(Error::Cert(format!(
                "{} exists but {} is missing, so no node certificates can be issued; \
                 restore the CA key, or remove {} to start a new dev CA (and reissue all nodes)",
                ca_cert_path.display(),
                ca_key_path.display(),
                out.display()
            )));
        }
        (false, true) => {
            return Err(Error::Cert(format!(
                "{} exists but {} is missing; restore the CA certificate, or remove {} \
                 to start a new dev CA (and reissue all nodes)",
                ca_key_path.display(),
                ca_cert_path.display(),
                out.display()
            )));
        }
    };

    let ca_certs = parse_certs(&ca_cert_path, ca_pem.as_bytes())?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| {
        Error::Cert(format!(
            "{}: cannot use it as an issuer: {e}",
            ca_cert_path.display()
        ))
    })?;

    for id in 1..=nodes {
        let name = node_name(id);
        let cert_file = format!("{name}.pem");
        let key_file = format!("{name}.key");
        let cert_path = out.join(&cert_file);
        let key_path = out.join(&key_file);
        let have_cert = cert_path.try_exists().map_err(|e| io_err(&cert_path, e))?;
        let have_key = key_path.try_exists().map_err(|e| io_err(&key_path, e))?;
        if have_cert || have_key {
            match existing_node_fits(&ca_certs, &cert_path, &key_path, &name, extra_names) {
                Ok(()) => continue,
                Err(reason) => tracing::warn!(
                    node = id,
                    path = %cert_path.display(),
                    "reissuing the dev certificate: {reason}"
                ),
            }
        }

        let key = KeyPair::generate()
            .map_err(|e| Error::Cert(format!("generating a key pair for {name}: {e}")))?;
        let cert = node_params(&name, extra_names)?
            .signed_by(&key, &issuer)
            .map_err(|e| Error::Cert(format!("signing the certificate of {name}: {e}")))?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();

        // Catches a ca.key that does not belong to ca.pem before anything is
        // written.
        let chain = vec![cert.der().clone()];
        verify_node(&ca_certs, &chain, key_pem.as_bytes(), &name).map_err(|e| {
            Error::Cert(format!(
                "the certificate just issued for {name} does not verify against {}: {e} \
                 (does {} belong to it?)",
                ca_cert_path.display(),
                ca_key_path.display()
            ))
        })?;

        // Key first: a crash between the two leaves a pair that does not
        // match, which the next run reissues.
        written.push(write_atomic(out, &key_file, key_pem.as_bytes(), 0o600)?);
        written.push(write_atomic(out, &cert_file, cert_pem.as_bytes(), 0o644)?);
    }
    written.extend(generate_token_key(out, DEV_TOKEN_KEY)?);

    Ok(written)
}

/// File name (without extension) of the dev token signing key that
/// [`generate_dev`] makes next to the CA: `token.key` signs (`bitclone token
/// issue`), `token.pub` verifies (a node's default key when none is set).
pub const DEV_TOKEN_KEY: &str = "token";

/// Makes an Ed25519 key pair for signing tokens, `<name>.key` (PKCS#8 PEM,
/// mode 0600) and `<name>.pub` (SPKI PEM), unless both exist. Returns the
/// files written.
pub fn generate_token_key(dir: &Path, name: &str) -> Result<Vec<PathBuf>, Error> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let (key_file, pub_file) = (format!("{name}.key"), format!("{name}.pub"));
    if dir.join(&key_file).exists() && dir.join(&pub_file).exists() {
        return Ok(Vec::new());
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| Error::Cert(format!("generating a token signing key: {e}")))?;
    // Private key first: a crash between the two leaves no public key that
    // nothing can sign for.
    Ok(vec![
        write_atomic(dir, &key_file, key.serialize_pem().as_bytes(), 0o600)?,
        write_atomic(dir, &pub_file, key.public_key_pem().as_bytes(), 0o644)?,
    ])
}

/// Parameters of the dev CA certificate.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    set_dev_validity(&mut params);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "BitClone dev CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Parameters of a node certificate.
fn node_params(name: &str, extra_names: &[String]) -> Result<CertificateParams, Error> {
    // `CertificateParams::new` turns strings that parse as IP addresses into
    // IP SANs and the others into DNS SANs.
    let mut sans = vec![
        name.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for n in extra_names {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let mut params = CertificateParams::new(sans)
        .map_err(|e| Error::Cert(format!("subject alternative names of {name}: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_dev_validity(&mut params);
    Ok(params)
}

/// Sets the validity of a dev certificate to `now - 1 day ..= now + 10
/// years` (computed from rcgen's own date helper, so this crate does not
/// depend on `time` directly).
fn set_dev_validity(params: &mut CertificateParams) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - DAY;
    params.not_after = now + DEV_VALIDITY;
}

/// Reads a TLS file; a missing file names the command that creates one.
fn read_tls_file(dir: &Path, path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| {
        let source = if source.kind() == ErrorKind::NotFound {
            io::Error::new(
                ErrorKind::NotFound,
                format!(
                    "{source}; create development certificates with \
                     `bitclone certs dev --out {} --nodes N`",
                    dir.display()
                ),
            )
        } else {
            source
        };
        io_err(path, source)
    })
}

fn read_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// A private key readable by group or others is worth a warning, not a
/// refusal (containers often mount secrets with other modes).
fn warn_if_key_readable(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "private key file has mode {mode:o}; 600 is recommended"
            );
        }
    }
}

/// All `CERTIFICATE` blocks of a PEM file; at least one.
fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Cert(format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Cert(format!(
            "{}: no CERTIFICATE block found",
            path.display()
        )));
    }
    Ok(certs)
}

/// Is `cert` valid for the DNS name `name`?
fn check_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    // A wildcard (`*.peers.ns.svc`, every pod of a set) covers any one
    // name below it: check one such name.
    let probe = name.strip_prefix("*.").map(|rest| format!("pod.{rest}"));
    let name = probe.as_deref().unwrap_or(name);
    let server_name =
        ServerName::try_from(name).map_err(|e| format!("{name:?} is not a valid name: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    ee.verify_is_valid_for_subject_name(&server_name)
        .map_err(|e| format!("its names do not include {name} ({e})"))
}

/// Does `chain` (end entity first, then intermediates) chain to one of
/// `ca_certs`, for TLS server authentication, now?
fn verify_chain(
    ca_certs: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
) -> Result<(), String> {
    let mut anchors = Vec::with_capacity(ca_certs.len());
    for ca in ca_certs {
        let anchor = webpki::anchor_from_trusted_cert(ca)
            .map_err(|e| format!("the CA certificate cannot be a trust anchor: {e}"))?;
        anchors.push(anchor);
    }
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("no certificate".to_string());
    };
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("not issued by the cluster CA or not valid now ({e})"))
}

/// Does the PEM private key belong to the chain's end-entity certificate?
fn check_key(chain: &[CertificateDer<'static>], key_pem: &[u8]) -> Result<(), String> {
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("cannot read the private key: {e}"))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.to_vec(), key, &provider)
        .map(|_| ())
        .map_err(|e| format!("the private key does not fit the certificate ({e})"))
}

/// Everything [`PeerTls::load`] checks about a node's own material.
fn verify_node(
    ca_certs: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    key_pem: &[u8],
    name: &str,
) -> Result<(), String> {
    let leaf = chain.first().ok_or_else(|| "no certificate".to_string())?;
    check_name(leaf, name)?;
    verify_chain(ca_certs, chain)?;
    check_key(chain, key_pem)
}

/// Can an existing node certificate + key be kept?
fn existing_node_fits(
    ca_certs: &[CertificateDer<'static>],
    cert_path: &Path,
    key_path: &Path,
    name: &str,
    extra_names: &[String],
) -> Result<(), String> {
    let cert_pem = fs::read(cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key_pem = fs::read(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let chain = parse_certs(cert_path, &cert_pem).map_err(|e| e.to_string())?;
    verify_node(ca_certs, &chain, &key_pem, name)?;
    extra_names
        .iter()
        .try_for_each(|n| check_name(&chain[0], n))
}

/// Writes `dir/name` atomically (temporary file, fsync, rename) with the
/// given permission bits, and returns its path.
fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, e)),
    }
    let result = write_new_file(&tmp, contents, mode).and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&path, e));
    }
    // Make the rename durable; best effort.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // `mode` above is filtered by the umask; make it exact.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_der(dir: &Path, id: u64) -> CertificateDer<'static> {
        let pem = fs::read(dir.join(format!("node-{id}.pem"))).unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap()
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn node_names() {
        assert_eq!(node_name(3), "node-3");
    }

    #[test]
    fn generate_dev_is_idempotent_and_adds_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");

        let written = generate_dev(&dir, 2).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ca.key",
                "ca.pem",
                "node-1.key",
                "node-1.pem",
                "node-2.key",
                "node-2.pem",
                "token.key",
                "token.pub"
            ]
        );
        let ca_before = fs::read(dir.join("ca.pem")).unwrap();
        let node1_before = fs::read(dir.join("node-1.pem")).unwrap();
        let key1_before = fs::read(dir.join("node-1.key")).unwrap();
        assert!(!dir.join("node-3.pem").exists());

        // A larger N adds node-3, signed by the CA loaded from disk.
        let written = generate_dev(&dir, 3).unwrap();
        assert_eq!(
            written,
            vec![dir.join("node-3.key"), dir.join("node-3.pem")]
        );
        assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), ca_before);
        assert_eq!(fs::read(dir.join("node-1.pem")).unwrap(), node1_before);
        assert_eq!(fs::read(dir.join("node-1.key")).unwrap(), key1_before);

        // Nothing left to do.
        assert!(generate_dev(&dir, 3).unwrap().is_empty());

        for key in [
            "ca.key",
            "node-1.key",
            "node-2.key",
            "node-3.key",
            "token.key",
        ] {
            assert_eq!(mode_of(&dir.join(key)), 0o600, "{key}");
        }
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Every node, including the one issued by the reloaded CA, loads.
        for id in 1..=3 {
            let tls = PeerTls::load(&dir, id).unwrap();
            assert_eq!(tls.node_id, id);
        }
    }

    #[test]
    fn extra_names_go_on_every_node_certificate_and_a_missing_one_reissues() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        generate_dev(&dir, 2).unwrap();
        let pem = |id: u64| fs::read(dir.join(format!("node-{id}.pem"))).unwrap();
        let leaf = |id: u64| parse_certs(&dir, &pem(id)).unwrap().remove(0);
        assert!(check_name(&leaf(1), "127.0.0.12").is_err());

        let names = [
            "127.0.0.12".to_string(),
            "bitclone-1.peers".to_string(),
            "*.bitclone-peers.ns.svc.cluster.local".to_string(),
        ];
        let written = generate_dev_with(&dir, 2, &names).unwrap();
        assert_eq!(written.len(), 4, "both nodes reissued: {written:?}");
        for id in 1..=2 {
            for n in &names {
                check_name(&leaf(id), n).unwrap();
            }
            check_name(&leaf(id), "127.0.0.1").unwrap();
            check_name(&leaf(id), &node_name(id)).unwrap();
            // The wildcard covers every pod of the set.
            check_name(&leaf(id), "bitclone-4.bitclone-peers.ns.svc.cluster.local").unwrap();
        }
        // Nothing left to do with the same names; fewer names keep them too.
        assert!(generate_dev_with(&dir, 2, &names).unwrap().is_empty());
        assert!(generate_dev(&dir, 2).unwrap().is_empty());
    }

    #[test]
    fn load_and_check_peer() {
        let tmp = tempfile::tempdir().unwrap();
        generate_dev(tmp.path(), 2).unwrap();

        let tls = PeerTls::load(tmp.path(), 2).unwrap();
        assert_eq!(tls.node_id, 2);
        // Builders only; nothing is dialed.
        let _server = tls.server_config();
        let _client = tls.client_config(1);
        // Debug never shows the key.
        assert!(!format!("{tls:?}").contains("PRIVATE KEY"));

        let node2 = read_der(tmp.path(), 2);
        check_peer(std::slice::from_ref(&node2), 2).unwrap();
        let err = check_peer(std::slice::from_ref(&node2), 1).unwrap_err();
        assert!(
            matches!(&err, Error::Identity { expected, .. } if expected == "node-1"),
            "{err}"
        );
        assert!(err.to_string().contains("node-1"), "{err}");
        assert!(check_peer(&[], 2).is_err());
    }

    #[test]
    fn load_refuses_a_certificate_for_another_node() {
        let tmp = tempfile::tempdir().unwrap();
        generate_dev(tmp.path(), 1).unwrap();
        // node-1's material installed under node-2's file names.
        fs::copy(tmp.path().join("node-1.pem"), tmp.path().join("node-2.pem")).unwrap();
        fs::copy(tmp.path().join("node-1.key"), tmp.path().join("node-2.key")).unwrap();
        let err = PeerTls::load(tmp.path(), 2).unwrap_err();
        assert!(err.to_string().contains("node-2"), "{err}");
    }

    #[test]
    fn another_ca_issues_different_certificates() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        generate_dev(a.path(), 1).unwrap();
        generate_dev(b.path(), 1).unwrap();
        let a1 = read_der(a.path(), 1);
        let b1 = read_der(b.path(), 1);
        assert_ne!(a1, b1);
        // check_peer only checks the name: B's node-1 still names node-1.
        // Refusing a certificate from a foreign CA is rustls' job during the
        // handshake (the server trusts only our CA via client_ca_root).
        check_peer(&[b1], 1).unwrap();

        // Our CA with a node certificate from another CA fails at load.
        let mixed = tempfile::tempdir().unwrap();
        fs::copy(a.path().join("ca.pem"), mixed.path().join("ca.pem")).unwrap();
        fs::copy(b.path().join("node-1.pem"), mixed.path().join("node-1.pem")).unwrap();
        fs::copy(b.path().join("node-1.key"), mixed.path().join("node-1.key")).unwrap();
        assert!(PeerTls::load(mixed.path(), 1).is_err());

        // A key that does not belong to the certificate fails at load too.
        let swapped = tempfile::tempdir().unwrap();
        fs::copy(a.path().join("ca.pem"), swapped.path().join("ca.pem")).unwrap();
        fs::copy(
            a.path().join("node-1.pem"),
            swapped.path().join("node-1.pem"),
        )
        .unwrap();
        fs::copy(
            b.path().join("node-1.key"),
            swapped.path().join("node-1.key"),
        )
        .unwrap();
        assert!(PeerTls::load(swapped.path(), 1).is_err());
    }

    #[test]
    fn generate_dev_reissues_a_node_that_does_not_fit_the_ca() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        generate_dev(a.path(), 1).unwrap();
        generate_dev(b.path(), 1).unwrap();
        fs::copy(b.path().join("node-1.pem"), a.path().join("node-1.pem")).unwrap();
        let written = generate_dev(a.path(), 1).unwrap();
        assert_eq!(
            written,
            vec![a.path().join("node-1.key"), a.path().join("node-1.pem")]
        );
        PeerTls::load(a.path(), 1).unwrap();
    }

    #[test]
    fn load_from_a_missing_dir_names_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("no-such-dir");
        let err = PeerTls::load(&missing, 1).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("bitclone certs dev"), "{msg}");
        assert!(matches!(err, Error::TlsFile { .. }));
    }

    #[test]
    fn ca_without_its_key_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        generate_dev(tmp.path(), 1).unwrap();
        fs::remove_file(tmp.path().join("ca.key")).unwrap();
        let err = generate_dev(tmp.path(), 2).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
    }
}
