//! One Tandem node: the metadata store, the node-to-node transport and the admin HTTP API,
//! wired together from the cluster config.
//!
//! - [`config`]: the cluster config file (TOML), parsed and validated.
//! - [`api`]: the HTTP/JSON admin API (axum). It validates input and calls the metadata store;
//!   it holds no state of its own.
//! - [`run`]: start everything, serve until told to stop, then stop cleanly.

pub mod api;
pub mod config;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use tandem_meta::store::MetaStore;
use tandem_transport::tcp::{TcpServer, TcpTransport};
use tandem_transport::tls::Identity;
use tandem_transport::Transport;
use tandem_types::NodeId;
use tokio::net::TcpListener;

use crate::config::ClusterConfig;

async fn bind(id: NodeId, field: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("node {id}: {field} {addr} is already in use by another process")
        } else {
            anyhow!("node {id}: cannot listen on {field} {addr}: {e}")
        }
    })
}

/// Runs node `id` of `cfg` until `shutdown` resolves, then stops Raft and flushes its store.
pub async fn run(
    cfg: ClusterConfig,
    id: NodeId,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let me = cfg
        .node(id)
        .ok_or_else(|| anyhow!("node {id} has no [[node]] entry in the cluster config"))?
        .clone();
    let identity = Identity::load(
        id,
        &cfg.resolve(&cfg.tls.ca_cert),
        &cfg.resolve(&me.cert),
        &cfg.resolve(&me.key),
    )?;
    // Bind before opening anything, so a taken port is reported first and plainly.
    let raft_listener = bind(id, "raft_addr", me.raft_addr).await?;
    let api_listener = bind(id, "api_addr", me.api_addr).await?;

    let transport = Arc::new(TcpTransport::new(identity.clone())?);
    for n in &cfg.nodes {
        transport.set_peer_addr(n.id, n.raft_addr);
    }
    let data_dir = cfg.resolve(&me.data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let meta = MetaStore::open(
        id,
        &cfg.meta_config(),
        &data_dir.join("meta"),
        transport.clone() as Arc<dyn Transport>,
    )
    .await
    .map_err(|e| anyhow!("node {id}: {e} (is this node already running?)"))?;
    let _raft_server = TcpServer::start(raft_listener, &identity, meta.handler())?;

    tracing::info!(node = id, raft = %me.raft_addr, api = %me.api_addr, "node started");
    let state = api::ApiState::new(meta.clone(), Arc::new(cfg), transport);
    let served = axum::serve(api_listener, api::router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    tracing::info!(node = id, "stopping");
    meta.shutdown().await;
    served.context("admin API server failed")?;
    tracing::info!(node = id, "stopped");
    Ok(())
}
