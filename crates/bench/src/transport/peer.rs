//! The peer process of `bench transport` (`tandem bench transport-peer`, node 2): a Mesh whose
//! handler echoes payloads of up to 4 KiB and answers larger ones with an empty reply, and a
//! plaintext TCP server with the same rule; it prints its two addresses as one JSON line and runs
//! until its stdin closes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use serde::{Deserialize, Serialize};
use tandem_transport::{BoxFuture, Handler};
use tandem_types::Channel;
use tandem_types::NodeId;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::mesh_setup::start_mesh;
use super::plaintext::{read_plain_frame, write_plain_frame, PlainConn};
use super::{LOOPBACK, PEER_ID, POLL_INTERVAL, SMALL_BYTES};

/// The peer echoes payloads up to this size and answers larger ones with an empty reply.
const ECHO_MAX: usize = SMALL_BYTES;

#[derive(Args)]
pub struct PeerArgs {
    /// The dir holding ca.pem, node-2.pem and node-2.key.
    #[arg(long)]
    dir: PathBuf,
}

/// What the peer prints, as one JSON line, once it listens.
#[derive(Serialize, Deserialize)]
pub(super) struct PeerAddrs {
    pub(super) mesh: SocketAddr,
    pub(super) plaintext: SocketAddr,
}

/// The peer's reply rule, the same on the Mesh and on plaintext TCP.
fn reply_to(payload: Bytes) -> Bytes {
    if payload.len() <= ECHO_MAX {
        payload
    } else {
        Bytes::new()
    }
}

struct EchoSmall;

impl Handler for EchoSmall {
    fn handle(&self, _from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move { Ok(reply_to(payload)) })
    }
}

/// `tandem bench transport-peer --dir DIR`: node 2 and the plaintext server, until stdin closes.
pub async fn peer(args: PeerArgs) -> anyhow::Result<()> {
    let (mesh, mesh_addr) = start_mesh(&args.dir, PEER_ID).await?;
    let handler: Arc<dyn Handler> = Arc::new(EchoSmall);
    for channel in [Channel::Bulk, Channel::Replication] {
        mesh.set_handler(channel, handler.clone());
    }
    let plain = TcpListener::bind(LOOPBACK).await.context("cannot bind the plaintext listener")?;
    let addrs = PeerAddrs { mesh: mesh_addr, plaintext: plain.local_addr().context("plaintext listener address")? };
    let server = tokio::spawn(serve_plaintext(plain));
    let addrs_line = serde_json::to_string(&addrs).context("cannot encode the addresses")?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{addrs_line}").and_then(|()| out.flush()).context("cannot write to stdout")?;
    }
    // The benchmark closes our stdin when it is done, or when it dies.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 256];
    while stdin.read(&mut sink).await.context("cannot read stdin")? > 0 {}
    server.abort();
    mesh.shutdown();
    Ok(())
}

async fn serve_plaintext(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = serve_plaintext_conn(stream).await {
                        tracing::debug!(error = %e, "plaintext connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "plaintext accept failed");
                // Out of descriptors or similar: do not spin on the error.
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }
}

async fn serve_plaintext_conn(stream: TcpStream) -> std::io::Result<()> {
    let mut conn = PlainConn::new(stream)?;
    while let Some(payload) = read_plain_frame(&mut conn.r).await? {
        write_plain_frame(&mut conn.w, &reply_to(payload)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_echoes_small_payloads_only() {
        assert_eq!(reply_to(Bytes::from(vec![1u8; SMALL_BYTES])).len(), SMALL_BYTES);
        assert!(reply_to(Bytes::from(vec![1u8; SMALL_BYTES + 1])).is_empty());
    }
}
