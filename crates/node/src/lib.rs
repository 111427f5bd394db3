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
use tandem_transport::link::{Listeners, Mesh};
use tandem_transport::ring::RegionRegistry;
use tandem_transport::tls::Identity;
use tandem_transport::{Channel, Layer, Transport, TransportKind};
use tandem_types::NodeId;
use tokio::net::TcpListener;

use crate::config::ClusterConfig;

/// Region buffers for one-sided writes from peers (the data plane registers regions in them).
const REGION_BUFFERS: usize = 8;
const REGION_BYTES: usize = 4 * 1024 * 1024;
const REGION_COMPLETIONS_MAX: usize = 1024;

fn bind_error(id: NodeId, field: &str, addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow!("node {id}: {field} {addr} is already in use by another process")
    } else {
        anyhow!("node {id}: cannot listen on {field} {addr}: {e}")
    }
}

/// Runs node `id` of `cfg` until `shutdown` resolves, then stops Raft and flushes its store.
pub async fn run(
    cfg: ClusterConfig,
    id: NodeId,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let me = cfg.node(id).ok_or_else(|| anyhow!("node {id} has no [[node]] entry in the cluster config"))?.clone();
    let identity = Identity::load(id, &cfg.resolve(&cfg.tls.ca_cert), &cfg.resolve(&me.cert), &cfg.resolve(&me.key))?;
    // Bind before opening anything, so a taken port is reported first and plainly. QUIC listens
    // on UDP at the raft_addr's port.
    let listeners =
        Listeners::bind(me.raft_addr).await.map_err(|e| bind_error(id, "raft_addr (TCP and UDP)", me.raft_addr, e))?;
    let api_listener = TcpListener::bind(me.api_addr).await.map_err(|e| bind_error(id, "api_addr", me.api_addr, e))?;

    let default_kind = cfg.cluster.transport;
    let regions = RegionRegistry::new(REGION_BUFFERS, REGION_BYTES, REGION_COMPLETIONS_MAX);
    let mesh = Mesh::start(&identity, listeners, default_kind, default_kind, regions)?;
    for n in &cfg.nodes {
        mesh.set_peer_addr(n.id, n.raft_addr);
    }
    let data_dir = cfg.resolve(&me.data_dir);
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let transport: Arc<dyn Transport> = Arc::new(mesh.clone());
    let meta = MetaStore::open(id, &cfg.meta_config(), &data_dir.join("meta"), transport)
        .await
        .map_err(|e| anyhow!("node {id}: {e} (is this node already running?)"))?;
    mesh.set_handler(Channel::Control, meta.handler());
    follow_transport_policy(meta.clone(), mesh.clone(), default_kind);

    tracing::info!(node = id, raft = %me.raft_addr, api = %me.api_addr, transport = %default_kind, "node started");
    let state = api::ApiState::new(meta.clone(), Arc::new(cfg), mesh.clone());
    let served = axum::serve(api_listener, api::router(state)).with_graceful_shutdown(shutdown).await;
    tracing::info!(node = id, "stopping");
    meta.shutdown().await;
    mesh.shutdown();
    served.context("admin API server failed")?;
    tracing::info!(node = id, "stopped");
    Ok(())
}

/// Keeps the mesh on the network layers the cluster map selects (the config's `transport`
/// until the map says otherwise). Runs on every node, so a `PUT /v1/transport` moves every
/// link once the change is applied there.
fn follow_transport_policy(meta: Arc<MetaStore>, mesh: Mesh, default: TransportKind) {
    tokio::spawn(async move {
        let mut applied = meta.subscribe();
        loop {
            let policy = meta.local_read(|st| st.map.transport.clone());
            for layer in [Layer::Control, Layer::Data] {
                mesh.set_kind(layer, policy.get(&layer).copied().unwrap_or(default));
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    });
}
