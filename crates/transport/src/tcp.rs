//! The TCP network layer: TLS over TCP (tokio-rustls), one connection per (peer, channel).
//!
//! TCP delivers one connection's bytes in order, so channels multiplexed on one connection
//! would put a bulk transfer's bytes in front of a heartbeat and share one send window; a
//! connection per channel gives each its own flow control and kernel buffers, at the cost of
//! one handshake per channel, paid once and lazily.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_types::{Channel, NodeId};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::pipe::{hello, read_hello, BoxRead, BoxWrite};
use crate::tls::{cert_names_node, server_name, Identity, TlsError};

/// TLS handshake plus hello, on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// An authenticated pipe that a peer opened to this node.
pub struct Incoming {
    pub from: NodeId,
    pub channel: Channel,
    pub read: BoxRead,
    pub write: BoxWrite,
}

pub type OnPipe = Arc<dyn Fn(Incoming) + Send + Sync>;

pub struct TcpLayer {
    me: NodeId,
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

impl TcpLayer {
    pub fn new(identity: &Identity) -> Result<TcpLayer, TlsError> {
        Ok(TcpLayer {
            me: identity.node_id,
            connector: TlsConnector::from(identity.client_config()?),
            acceptor: TlsAcceptor::from(identity.server_config()?),
        })
    }

    pub async fn dial(&self, peer: NodeId, addr: SocketAddr, channel: Channel) -> io::Result<(BoxRead, BoxWrite)> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut tls = self.connector.connect(server_name(peer), tcp).await?;
        tls.write_all(&hello(self.me, channel).encode()).await?;
        tls.flush().await?;
        let (r, w) = tokio::io::split(tls);
        Ok((Box::new(r), Box::new(w)))
    }

    /// Accepts connections on `listener` until the returned task is aborted.
    pub fn serve(&self, listener: TcpListener, on_pipe: OnPipe) -> tokio::task::JoinHandle<()> {
        let acceptor = self.acceptor.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "tcp accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let on_pipe = on_pipe.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(tcp, acceptor)).await {
                        Ok(Ok(incoming)) => on_pipe(incoming),
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "tcp peer refused"),
                        Err(_) => tracing::debug!(%remote, "tcp handshake timed out"),
                    }
                });
            }
        })
    }
}

async fn accept(tcp: TcpStream, acceptor: TlsAcceptor) -> io::Result<Incoming> {
    tcp.set_nodelay(true)?;
    let mut tls = acceptor.accept(tcp).await?;
    let (from, channel) = read_hello(&mut tls).await?;
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
    match cert {
        Some(cert) if cert_names_node(&cert, from) => {
            let (r, w) = tokio::io::split(tls);
            Ok(Incoming { from, channel, read: Box::new(r), write: Box::new(w) })
        }
        _ => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer claims to be node {from} but its certificate does not say so"),
        )),
    }
}
