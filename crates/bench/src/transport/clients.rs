//! The two clients `bench transport`'s runs drive with `load::run`: one plaintext connection per
//! sender, and callers sharing the Mesh's one link per channel; and `settle`, which moves the
//! data layer to one transport and waits until it alone carries traffic.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tandem_transport::link::Mesh;
use tandem_transport::Transport;
use tandem_types::{Channel, Layer, TransportKind};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::plaintext::{read_plain_frame, write_plain_frame, PlainConn};
use super::{PEER_ID, POLL_INTERVAL};
use crate::load::{KvClient, PUT_TIMEOUT};

/// Until both data links run on the selected layer alone after a switch.
const SETTLE_WAIT: Duration = Duration::from_secs(15);

fn check_reply(got: usize, want: usize) -> anyhow::Result<()> {
    if got != want {
        bail!("reply of {got} bytes, expected {want}");
    }
    Ok(())
}

/// One plaintext connection, one request in flight.
pub(super) struct PlainClient {
    conn: tokio::sync::Mutex<PlainConn>,
    reply_bytes: usize,
}

impl PlainClient {
    pub(super) async fn connect(addr: SocketAddr, reply_bytes: usize) -> anyhow::Result<PlainClient> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        let conn = PlainConn::new(stream).context("cannot set up the plaintext connection")?;
        Ok(PlainClient { conn: tokio::sync::Mutex::new(conn), reply_bytes })
    }
}

impl KvClient for PlainClient {
    async fn put(&self, _key: &str, value: &Bytes) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().await;
        let conn = &mut *conn;
        write_plain_frame(&mut conn.w, value).await.context("plaintext send")?;
        let reply = read_plain_frame(&mut conn.r)
            .await
            .context("plaintext reply")?
            .ok_or_else(|| anyhow!("the peer closed the plaintext connection"))?;
        check_reply(reply.len(), self.reply_bytes)
    }
}

/// A caller of the Mesh; all callers of a channel share its one link.
pub(super) struct MeshClient {
    pub(super) mesh: Mesh,
    pub(super) channel: Channel,
    pub(super) reply_bytes: usize,
}

impl KvClient for MeshClient {
    async fn put(&self, _key: &str, value: &Bytes) -> anyhow::Result<()> {
        let reply = self.mesh.call(PEER_ID, self.channel, value.clone()).await?;
        check_reply(reply.len(), self.reply_bytes)
    }
}

/// Selects `kind` for the data layer and waits until both data links run on it alone: one pipe,
/// of that kind (make-before-break keeps the old one until its requests are answered).
pub(super) async fn settle(mesh: &Mesh, kind: TransportKind) -> anyhow::Result<()> {
    mesh.set_kind(Layer::Data, kind);
    let probe = Bytes::from_static(b"settle");
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        for channel in [Channel::Bulk, Channel::Replication] {
            tokio::time::timeout(PUT_TIMEOUT, mesh.call(PEER_ID, channel, probe.clone()))
                .await
                .map_err(|_| anyhow!("{channel}: no reply within {PUT_TIMEOUT:?} after switching to {kind}"))?
                .with_context(|| format!("{channel}: request after switching to {kind}"))?;
        }
        let stats = mesh.link_stats();
        let settled = [Channel::Bulk, Channel::Replication].iter().all(|&channel| {
            stats.iter().any(|s| s.peer == PEER_ID && s.channel == channel && s.transport == Some(kind) && s.pipes == 1)
        });
        if settled {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the data links did not move to {kind} alone within {SETTLE_WAIT:?}: {stats:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
