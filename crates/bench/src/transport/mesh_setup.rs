//! Both processes' side of `bench transport`'s Mesh: a throwaway CA and the certificates of
//! nodes 1 and 2 in a temporary dir, and a node's Mesh on 127.0.0.1 with its identity.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tandem_transport::link::{Listeners, Mesh};
use tandem_transport::ring::RegionRegistry;
use tandem_transport::tls::{generate_ca, issue_node_cert, Identity};
use tandem_types::NodeId;
use tandem_types::TransportKind;

use super::{CLIENT_ID, LOOPBACK, MIB, PEER_ID};

const CLUSTER_NAME: &str = "bench-transport";
/// The Mesh's region pool; this benchmark registers no region, so it is kept small.
const REGION_BUFFERS: usize = 4;
const REGION_BYTES: usize = MIB;
const REGION_COMPLETIONS_MAX: usize = 1024;

fn cert_paths(dir: &Path, id: NodeId) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join(format!("node-{id}.pem")), dir.join(format!("node-{id}.key")))
}

pub(super) fn write_certificates(dir: &Path) -> anyhow::Result<()> {
    let ca = generate_ca(CLUSTER_NAME).context("cannot make the CA")?;
    let (ca_path, _, _) = cert_paths(dir, CLIENT_ID);
    std::fs::write(&ca_path, &ca.cert_pem).with_context(|| format!("cannot write {}", ca_path.display()))?;
    for id in [CLIENT_ID, PEER_ID] {
        let pair = issue_node_cert(CLUSTER_NAME, &ca.key_pem, id)
            .with_context(|| format!("cannot issue the certificate of node {id}"))?;
        let (_, cert, key) = cert_paths(dir, id);
        std::fs::write(&cert, &pair.cert_pem).with_context(|| format!("cannot write {}", cert.display()))?;
        std::fs::write(&key, &pair.key_pem).with_context(|| format!("cannot write {}", key.display()))?;
    }
    Ok(())
}

/// Node `id`'s Mesh on 127.0.0.1, and its address (TCP and UDP share the port).
pub(super) async fn start_mesh(dir: &Path, id: NodeId) -> anyhow::Result<(Mesh, SocketAddr)> {
    let (ca, cert, key) = cert_paths(dir, id);
    let identity = Identity::load(id, &ca, &cert, &key).with_context(|| format!("cannot load node {id}'s identity"))?;
    let addr: SocketAddr = LOOPBACK.parse().context("bad loopback address")?;
    let listeners = Listeners::bind(addr).await.with_context(|| format!("node {id}: cannot bind {addr}"))?;
    let bound = listeners.tcp.local_addr().with_context(|| format!("node {id}: mesh listener address"))?;
    let regions = RegionRegistry::new(REGION_BUFFERS, REGION_BYTES, REGION_COMPLETIONS_MAX);
    // The layers start on TCP; each Mesh run selects its own.
    let mesh = Mesh::start(&identity, listeners, TransportKind::Tcp, TransportKind::Tcp, regions)
        .with_context(|| format!("node {id}: cannot start the mesh"))?;
    Ok((mesh, bound))
}
