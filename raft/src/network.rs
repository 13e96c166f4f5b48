//! The Raft network: openraft RPCs over tonic gRPC with mutual TLS. One
//! lazily connected channel per peer; a timeout per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitclone_proto::internal::v1::peer_client::PeerClient;
use bitclone_proto::internal::v1::PeerMessage;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;
use crate::protocol::{Versions, PEER_PROTOCOL};
use crate::state::NodeInfo;
use crate::tls::PeerTls;
use crate::types::TypeConfig;
use crate::NodeId;

/// Largest peer message (AppendEntries batches, snapshot chunks).
pub const MAX_PEER_MESSAGE: usize = 64 << 20;

/// Peer channels, shared by Raft replication and request forwarding.
#[derive(Clone)]
pub struct Peers {
    pub me: NodeId,
    tls: PeerTls,
    /// The address connections to peers leave from (see
    /// [`crate::cluster::ClusterConfig::source_ip`]).
    source_ip: Option<IpAddr>,
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
    /// The newest peer protocol version in common with each peer heard
    /// from (its requests or its replies).
    protocols: Arc<Mutex<HashMap<NodeId, u32>>>,
}

impl Peers {
    pub fn new(me: NodeId, tls: PeerTls, source_ip: Option<IpAddr>) -> Self {
        Peers {
            me,
            tls,
            source_ip,
            channels: Arc::default(),
            protocols: Arc::default(),
        }
    }

    /// Checks the versions a message from `peer` carries and notes the
    /// newest one both speak.
    pub fn heard(&self, peer: NodeId, min: u32, max: u32) -> Result<u32, String> {
        let v = PEER_PROTOCOL.agree(peer, Versions::of(min, max))?;
        self.protocols
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, v);
        Ok(v)
    }

    /// The peer protocol version spoken with each peer heard from, by id.
    pub fn protocols(&self) -> Vec<(NodeId, u32)> {
        let m = self.protocols.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(NodeId, u32)> = m.iter().map(|(p, v)| (*p, *v)).collect();
        v.sort_unstable();
        v
    }

    fn channel(&self, peer: NodeId, addr: &str) -> Result<Channel, Error> {
        let key = (peer, addr.to_string());
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let unreachable = |detail: String| Error::Unreachable {
            peer,
            addr: addr.to_string(),
            detail,
        };
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| unreachable(e.to_string()))?
            .tls_config(self.tls.client_config(peer))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .local_address(self.source_ip);
        let ch = endpoint.connect_lazy();
        map.insert(key, ch.clone());
        Ok(ch)
    }

    /// Calls `rpc` on `peer` with a JSON payload and decodes the JSON reply.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: NodeId,
        addr: &str,
        rpc: PeerRpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, Error> {
        let payload = serde_json::to_vec(req).map_err(|e| Error::Protocol {
            peer,
            detail: e.to_string(),
        })?;
        let mut client = PeerClient::new(self.channel(peer, addr)?)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE);
        let mut request = tonic::Request::new(PeerMessage {
            from: self.me,
            payload: payload.into(),
            protocol_min: PEER_PROTOCOL.min,
            protocol_max: PEER_PROTOCOL.max,
        });
        request.set_timeout(timeout);
        // A client command forwarded to the leader keeps the client call's
        // correlation id.
        if matches!(rpc, PeerRpc::Forward) {
            if let Some(v) = crate::context::current().and_then(|id| id.parse().ok()) {
                request.metadata_mut().insert("x-request-id", v);
            }
            if let Some(v) = crate::context::traceparent().and_then(|t| t.parse().ok()) {
                request.metadata_mut().insert("traceparent", v);
            }
        }
        let reply = match rpc {
            PeerRpc::AppendEntries => client.append_entries(request).await,
            PeerRpc::Vote => client.vote(request).await,
            PeerRpc::InstallSnapshot => client.install_snapshot(request).await,
            PeerRpc::Forward => client.forward(request).await,
            PeerRpc::ReadIndex => client.read_index(request).await,
            PeerRpc::Join => client.join(request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                Error::Unreachable {
                    peer,
                    addr: addr.to_string(),
                    detail: status.message().to_string(),
                }
            }
            // The peer answered and refused (rights, a bad request).
            _ => Error::Refused(format!("peer {peer}: {}", status.message())),
        })?;
        let reply = reply.into_inner();
        self.heard(peer, reply.protocol_min, reply.protocol_max)
            .map_err(|detail| Error::Protocol { peer, detail })?;
        serde_json::from_slice(&reply.payload).map_err(|e| Error::Protocol {
            peer,
            detail: e.to_string(),
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub enum PeerRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Forward,
    ReadIndex,
    Join,
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerLink {
        PeerLink {
            peers: self.clone(),
            target,
            addr: node.peer_addr.clone(),
        }
    }
}

/// openraft's handle on one peer.
pub struct PeerLink {
    peers: Peers,
    target: NodeId,
    addr: String,
}

impl PeerLink {
    async fn send<Req, Resp, E>(
        &self,
        rpc: PeerRpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Result<Resp, E>, Error> = self
            .peers
            .call(self.target, &self.addr, rpc, req, option.hard_ttl())
            .await;
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(e @ Error::Unreachable { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send(PeerRpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(PeerRpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send(PeerRpc::Vote, &rpc, &option).await
    }
}
