//! A minimal client of etcd's v3 gRPC API for `bench meta`: a member's status (who leads) and
//! one benchmark client that puts keys.
//!
//! It speaks the API over tonic + prost, the stack the `etcd-client` crate is built on; the
//! messages it needs are declared here by hand because `etcd-client`'s build script needs
//! `protoc`, which these machines do not have.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

use crate::load::{KvClient, PUT_TIMEOUT};

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const PUT_PATH: &str = "/etcdserverpb.KV/Put";
const STATUS_PATH: &str = "/etcdserverpb.Maintenance/Status";

// The parts of etcd's api/etcdserverpb/rpc.proto that the benchmark uses, with its field
// numbers; prost skips the fields of the answers that are not declared.

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub(super) member_id: u64,
    #[prost(int64, tag = "3")]
    revision: i64,
    #[prost(uint64, tag = "4")]
    raft_term: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub(super) header: Option<ResponseHeader>,
    #[prost(string, tag = "2")]
    version: String,
    #[prost(uint64, tag = "4")]
    pub(super) leader: u64,
}

async fn connect(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))
        .context("an etcd endpoint URL")?
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to etcd at {addr}"))
}

async fn unary<Req, Resp>(channel: Channel, path: &'static str, request: Req) -> anyhow::Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("the gRPC channel is not ready")?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let answer = grpc
        .unary(tonic::Request::new(request), http::uri::PathAndQuery::from_static(path), codec)
        .await
        .map_err(|s| anyhow!("{path}: {:?}: {}", s.code(), s.message()))?;
    Ok(answer.into_inner())
}

/// A member's status: its id (in the header) and the leader it knows.
pub(super) async fn status(addr: SocketAddr) -> anyhow::Result<StatusResponse> {
    let channel = connect(addr, PROBE_TIMEOUT).await?;
    unary(channel, STATUS_PATH, StatusRequest {}).await
}

/// One benchmark client of etcd: its own HTTP/2 connection to the leader, one put in flight.
pub struct EtcdClient {
    channel: Channel,
}

impl EtcdClient {
    pub async fn connect(leader: SocketAddr) -> anyhow::Result<EtcdClient> {
        Ok(EtcdClient { channel: connect(leader, PUT_TIMEOUT).await? })
    }
}

impl KvClient for EtcdClient {
    async fn put(&self, key: &str, value: &Bytes) -> anyhow::Result<()> {
        let request = PutRequest { key: key.as_bytes().to_vec(), value: value.clone() };
        let _: PutResponse = unary(self.channel.clone(), PUT_PATH, request).await?;
        Ok(())
    }
}
