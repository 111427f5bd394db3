//! One Tandem node: the metadata store, the node-to-node transport and the admin HTTP API,
//! wired together from the cluster config.
//!
//! - [`config`]: the cluster config file (TOML), parsed and validated.
//! - [`api`]: the HTTP/JSON admin API (axum). It validates input and calls the metadata store;
//!   it holds no state of its own.
//! - [`api_state`]: what every API handler shares: its state, its error answer, and the narrow
//!   view of the links it shows.
//! - [`lease`]: this node's lease, and on the Raft leader the record of whom it heard from.
//! - [`failover`]: on the Raft leader, failing volumes over from primaries that failed.
//! - `failpoints` (a `failpoints` build only): the node's failpoints, `TANDEM_FAILPOINTS` and
//!   the debug API that sets them, for the chaos suite.
//! - [`probe`], [`probe_answer`]: the probe channel's calling and answering sides (lease
//!   requests, pings, forwarded host probe reports).
//! - [`volumes`]: the data plane's bindings: committed volumes in, ISR changes out, and the
//!   frontend seam every host protocol (NBD) serves volumes through.
//! - [`iscsi`]: the node's iSCSI portal: every volume as a target, with ALUA states from the
//!   cluster map.
//! - [`hosts`]: the leader's path manager: hosts' path maps, recomputed and published.
//! - [`voter_keeper`]: on the Raft leader, gives a lost voter's seat to a live learner.
//! - [`host_api`]: the host endpoints of the API, and the JSON types they answer with.
//! - [`debug_bugs`]: planted bugs (`chaos-bugs`): `TANDEM_CHAOS_BUGS` and `/v1/debug/bugs`.
//! - [`host_watch`]: wakes a host's path-map long-polls when that host's record changes.
//! - [`run`]: start everything, serve until told to stop, then stop cleanly.

pub mod api;
pub mod api_auth;
pub mod api_state;
pub mod config;
pub mod copies;
pub mod copy_api;
pub mod debug_bugs;
pub mod failover;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod host_api;
pub mod host_watch;
pub mod hosts;
pub mod iscsi;
pub mod lease;
pub mod probe;
pub mod probe_answer;
pub mod reservation_api;
pub mod security;
pub mod volumes;
pub mod voter_keeper;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tandem_frontend::Budgets;
use tandem_meta::store::MetaStore;
/// How long a host request may go unserved, or a node without its lease, before a host sees an
/// error (docs/PROTOCOL.md, "Errors a host can see").
pub use tandem_replication::driver::HOLD_TIME_DEFAULT;
use tandem_replication::driver::{DataPlane, DataPlaneConfig};
use tandem_storage::{BlockStore, SledStore};
use tandem_transport::link::{Listeners, Mesh};
use tandem_transport::ring::RegionRegistry;
use tandem_transport::tls::Identity;
use tandem_transport::Transport;
use tandem_types::NodeId;
use tandem_types::{Channel, Layer, TransportKind};
use tokio::net::TcpListener;

use crate::lease::Leases;

use crate::config::ClusterConfig;

/// Region buffers for one-sided writes from peers: the data plane registers one per peer, so
/// this bounds the cluster size a node can replicate with.
const REGION_BUFFERS: usize = 32;
const REGION_BYTES: usize = tandem_replication::driver::REGION_BYTES;
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
    #[cfg(feature = "failpoints")]
    failpoints::apply_env()?;
    debug_bugs::plant_from_env(id)?;
    // Secrets open to others are refused before anything starts.
    for key in std::iter::once(&me.key).chain(cfg.tls.ca_key.as_ref()) {
        security::check_private_file(&cfg.resolve(key)).map_err(|e| anyhow!("node {id}: {e}"))?;
    }
    let secret = Arc::new(
        security::ClusterSecret::load(&cfg.resolve(&cfg.security.secret)).map_err(|e| anyhow!("node {id}: {e}"))?,
    );
    let identity = Identity::load(id, &cfg.resolve(&cfg.tls.ca_cert), &cfg.resolve(&me.cert), &cfg.resolve(&me.key))?;
    // Bind before opening anything, so a taken port is reported first and plainly. QUIC listens
    // on UDP at the raft_addr's port.
    let listeners =
        Listeners::bind(me.raft_addr).await.map_err(|e| bind_error(id, "raft_addr (TCP and UDP)", me.raft_addr, e))?;
    let api_listener = TcpListener::bind(me.api_addr).await.map_err(|e| bind_error(id, "api_addr", me.api_addr, e))?;
    let mut nbd_listeners = Vec::new();
    for (field, addr) in
        std::iter::once(("nbd_addr", me.nbd_addr)).chain(me.extra_nbd_addrs.iter().map(|a| ("extra_nbd_addrs", *a)))
    {
        nbd_listeners.push(TcpListener::bind(addr).await.map_err(|e| bind_error(id, field, addr, e))?);
    }
    let iscsi_listener = match me.iscsi_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| bind_error(id, "iscsi_addr", addr, e))?),
        None => None,
    };

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
    advertise(meta.clone(), me.record());

    let leases = Leases::new(id, meta.clone(), Duration::from_millis(cfg.cluster.election_timeout_min_ms));
    let paths = hosts::PathManager::new(id, meta.clone(), leases.clone());
    // The iSCSI sessions of this node, by target: resets through other nodes reach them.
    let iscsi_sessions = Arc::new(tandem_iscsi::server::Sessions::default());
    mesh.set_handler(Channel::Probe, probe_answer::handler(leases.clone(), paths.clone(), iscsi_sessions.clone()));
    leases.spawn_renewal(mesh.clone());
    meta.set_liveness(voter_keeper::liveness(&leases));
    voter_keeper::spawn(meta.clone(), leases.clone(), Duration::from_secs(cfg.cluster.voter_replace_after_secs));
    failover::spawn_supervisor(meta.clone(), leases.clone());
    paths.spawn();
    let store = SledStore::open(&data_dir.join("blocks"))
        .map_err(|e| anyhow!("node {id}: cannot open the block store: {e}"))?;
    // A node whose store failed drops out of every volume's replicas until it restarts.
    let health = store.clone();
    leases.set_health(Box::new(move || health.failed()));
    let coord = Arc::new(volumes::MetaCoordinator {
        meta: meta.clone(),
        leases: leases.clone(),
        default_access: cfg.security.access,
    });
    let plane = DataPlane::start(id, mesh.clone(), Arc::new(store.clone()), coord, DataPlaneConfig::default());
    volumes::follow_volumes(meta.clone(), plane.clone(), leases.clone());
    copies::spawn_expiry(meta.clone(), id);
    copies::spawn_image_sweeper(meta.clone(), plane.clone());
    // Every target port serves every volume, and all of them share one set of budgets.
    let (nbd_stop_tx, nbd_stop_rx) = tokio::sync::watch::channel(false);
    let host_watches = host_watch::HostWatches::spawn(&meta);
    let exports = Arc::new(volumes::VolumeExports {
        plane: plane.clone(),
        meta: meta.clone(),
        default_access: cfg.security.access,
        watches: host_watches.clone(),
        copies: Arc::new(copies::Copies {
            meta: meta.clone(),
            plane: plane.clone(),
            secret: secret.clone(),
            default_access: cfg.security.access,
        }),
        cluster: cfg.cluster.name.clone(),
    });
    // NBD over TLS: the node's certificate; a host's client certificate identifies it.
    let nbd_tls = Some(identity.host_server_config()?);
    let budgets = Budgets::new(tandem_nbd::READ_BUFFER_BYTES_MAX);
    let nbd: Vec<_> = nbd_listeners
        .into_iter()
        .map(|listener| {
            let mut stop = nbd_stop_rx.clone();
            tokio::spawn(tandem_nbd::serve(listener, exports.clone(), budgets.clone(), nbd_tls.clone(), async move {
                let _ = stop.wait_for(|s| *s).await;
            }))
        })
        .collect();
    let iscsi = iscsi_listener.map(|listener| {
        let portal = Arc::new(iscsi::Portal {
            me: id,
            cluster: cfg.cluster.name.clone(),
            meta: meta.clone(),
            exports: exports.clone(),
            transport: Arc::new(mesh.clone()),
            secret: secret.clone(),
        });
        let config = tandem_iscsi::TargetConfig {
            target_portal_group_tag: iscsi::port_of(id),
            ..tandem_iscsi::TargetConfig::default()
        };
        let mut stop = nbd_stop_rx.clone();
        let serve = tandem_iscsi::server::serve(
            listener,
            portal,
            Arc::new(config),
            budgets.clone(),
            iscsi_sessions,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        );
        tokio::spawn(serve)
    });

    tracing::info!(node = %id, raft = %me.raft_addr, api = %me.api_addr, transport = %default_kind, "node started");
    // Stopping also ends the path-map watches in progress, which graceful shutdown waits for.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let state = api::ApiState::new(
        meta.clone(),
        Arc::new(cfg),
        secret,
        host_watches,
        mesh.clone(),
        plane.clone(),
        paths,
        stopping,
        budgets,
    );
    let stop_signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let served = axum::serve(api_listener, api::router(state)).with_graceful_shutdown(stop_signal).await;
    tracing::info!(node = %id, "stopping");
    let _ = nbd_stop_tx.send(true);
    for server in nbd.into_iter().chain(iscsi) {
        let _ = server.await;
    }
    // Dropping the store is a crash to it: make everything applied durable first.
    if let Err(e) = store.durable(store.last_lsn()).await {
        tracing::error!(node = %id, error = %e, "block store flush at shutdown failed");
    }
    meta.shutdown().await;
    mesh.shutdown();
    served.context("admin API server failed")?;
    tracing::info!(node = %id, "stopped");
    Ok(())
}

/// Brings this node's record in the cluster map in line with its config (site, addresses,
/// target ports) once the node has caught up, so that a node restarted with a new target port
/// advertises it. A node the map does not hold is left alone: joining is `tandem node add`.
/// One task, which ends once the record is in line; its retries back off to 2 s.
fn advertise(meta: Arc<MetaStore>, record: tandem_clustermap::NodeRecord) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match meta.read(|st| st.map.nodes.get(&record.id).cloned()).await {
                Ok(None) => return,
                Ok(Some(known)) if known == record => return,
                Ok(Some(_)) => match meta.write(tandem_clustermap::MetaCmd::RegisterNode(record.clone())).await {
                    Ok(_) => {
                        tracing::info!(node = %record.id, "advertised this node's site and addresses");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node = %record.id, error = %e, "cannot advertise this node's addresses yet")
                    }
                },
                Err(_) => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
}

/// Keeps the mesh on the network layers the cluster map selects (the config's `transport`
/// until the map says otherwise), and on the peer addresses the map records. Runs on every node, so a `PUT /v1/transport` moves every
/// link once the change is applied there. One task per node, for the node's lifetime.
fn follow_transport_policy(meta: Arc<MetaStore>, mesh: Mesh, default: TransportKind) {
    tokio::spawn(async move {
        let mut applied = meta.subscribe();
        // The nodes of the map as last seen: a node that leaves it is forgotten by the mesh.
        let mut members: BTreeSet<NodeId> = BTreeSet::new();
        loop {
            let (policy, addrs) = meta.local_read(|st| {
                let addrs: Vec<(NodeId, SocketAddr)> = st.map.nodes.values().map(|n| (n.id, n.raft_addr)).collect();
                (st.map.transport.clone(), addrs)
            });
            // Every node learns every peer's address from the map, also peers added after it
            // started: the data plane talks to all of them, not only Raft's leader.
            for (id, addr) in &addrs {
                mesh.set_peer_addr(*id, *addr);
            }
            // Only nodes that were in the map and left it: a peer this node learned of
            // elsewhere first (a Raft leader while joining) is not forgotten.
            let now: BTreeSet<NodeId> = addrs.iter().map(|(id, _)| *id).collect();
            for gone in members.difference(&now) {
                mesh.forget_peer(*gone);
            }
            members = now;
            for layer in [Layer::Control, Layer::Data] {
                mesh.set_kind(layer, policy.get(&layer).copied().unwrap_or(default));
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    });
}
