//! A raw gRPC client of a test node (TLS checked against the node's CA, the
//! harness's admin token), for tests that speak the protocol directly.

use std::path::PathBuf;

use bitclone_chaos::TestNode;
use bitclone_proto::v1::bit_clone_client::BitCloneClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub type Raw = BitCloneClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

/// What `connect` needs, owned, so it can move into a task.
#[derive(Clone)]
pub struct Target {
    endpoint: String,
    ca: PathBuf,
    token: String,
}

pub fn target(node: &TestNode) -> Target {
    Target {
        endpoint: node.endpoint.clone(),
        ca: node.ca_file(),
        token: node.admin_token(),
    }
}

pub async fn connect(t: Target) -> Raw {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca = std::fs::read(&t.ca).unwrap();
    let channel = Endpoint::from_shared(t.endpoint)
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(format!("Bearer {}", t.token.trim()).parse().unwrap());
    BitCloneClient::with_interceptor(channel, bearer)
}
