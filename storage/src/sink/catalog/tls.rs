//! TLS to the catalog: rustls (aws-lc-rs), verifying against the webpki
//! roots or the `sslrootcert` file, and telling TLS failures apart.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{with_causes, Error, Result};

pub(super) async fn rustls_connector(root_cert: Option<&Path>) -> Result<MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let pem = tokio::fs::read(path)
                .await
                .map_err(|e| Error::io("read sslrootcert", path, e))?;
            let bad =
                |e: String| Error::InvalidArgument(format!("sslrootcert {}: {e}", path.display()));
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots
                    .add(cert.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no PEM certificate in the file".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidArgument(format!("postgres TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Whether `e` comes from a TLS failure (a certificate that does not verify,
/// a server without TLS): retrying cannot fix it.
pub(super) fn tls_refused(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        source = s.source();
    }
    let text = with_causes(e);
    text.contains("TLS") || text.contains("certificate")
}
