//! The QUIC network layer (quinn): one QUIC connection per peer, one bidirectional stream per
//! channel. QUIC streams have independent flow control and no head-of-line blocking between
//! them, so the channels share a connection (one handshake per peer) without delaying each
//! other. The endpoint listens on UDP at the same port number as the node's TCP address.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use tandem_types::{node_cert_name, Channel, NodeId};

use crate::pipe::{hello, read_hello, BoxRead, BoxWrite};
use crate::tcp::{Incoming, OnPipe, HANDSHAKE_TIMEOUT};
use crate::tls::{cert_names_node, Identity, TlsError};

/// A connection with no traffic for this long is closed; keep-alives keep live links open and
/// let a vanished peer be noticed within this time.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// How long a connection replaced by a new one (after a pipe on it stalled) stays open.
const REPLACED_GRACE: Duration = Duration::from_secs(10);
/// Flow-control windows sized for 1 MiB messages at loopback speed.
const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("10 s is a valid idle timeout")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.stream_receive_window(STREAM_WINDOW_BYTES.into());
    t.receive_window(CONNECTION_WINDOW_BYTES.into());
    t.send_window(u64::from(CONNECTION_WINDOW_BYTES));
    // Four channels per peer, and room for streams of a link being replaced.
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

/// The connection pipes to one peer share, with its serial.
type Slot = Option<(u64, quinn::Connection)>;

pub struct QuicLayer {
    me: NodeId,
    endpoint: quinn::Endpoint,
    /// One connection per peer (and its serial), behind a per-peer lock so concurrent dials
    /// share it.
    conns: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<Slot>>>>,
    /// Per peer, the serial of a connection a link found a pipe on silent (docs/ARCHITECTURE.md,
    /// "A silent pipe"): the next dial makes a new connection, and closes that one once the new
    /// one is up.
    stalled: Mutex<HashMap<NodeId, u64>>,
    /// Numbers the connections this layer makes (a pipe names the one it rides on).
    serials: AtomicU64,
}

fn tls_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

impl QuicLayer {
    /// Builds the endpoint on an already bound UDP socket (so a taken port is reported by the
    /// caller before anything starts). Must be called inside a tokio runtime.
    pub fn new(identity: &Identity, socket: std::net::UdpSocket) -> Result<QuicLayer, TlsError> {
        let server_crypto = QuicServerConfig::try_from(identity.server_config()?).map_err(tls_err)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport_config());
        let client_crypto = QuicClientConfig::try_from(identity.client_config()?).map_err(tls_err)?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport_config());
        let mut endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, Arc::new(quinn::TokioRuntime))
                .map_err(tls_err)?;
        endpoint.set_default_client_config(client);
        Ok(QuicLayer {
            me: identity.node_id,
            endpoint,
            conns: Mutex::new(HashMap::new()),
            stalled: Mutex::new(HashMap::new()),
            serials: AtomicU64::new(1),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The connection to `peer` and its serial: the one pipes share, or a new one when there
    /// is none, it ended, the peer moved, or it was found stalled. A new connection replaces
    /// a stalled one only once its handshake is done, and closes it [`REPLACED_GRACE`] later.
    async fn connection(&self, peer: NodeId, addr: SocketAddr) -> io::Result<(u64, quinn::Connection)> {
        let slot = self.conns.lock().expect("conns lock").entry(peer).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some((serial, c)) = slot.as_ref() {
            let stalled = self.stalled.lock().expect("stalled lock").get(&peer) == Some(serial);
            if !stalled && c.close_reason().is_none() && c.remote_address() == addr {
                return Ok((*serial, c.clone()));
            }
        }
        let connecting = self.endpoint.connect(addr, &node_cert_name(peer)).map_err(io::Error::other)?;
        let conn = connecting.await.map_err(io::Error::other)?;
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        if let Some((_, old)) = slot.replace((serial, conn.clone())) {
            // Links still on the old connection move when their pipes stall or end; it is
            // closed once they have had the time to (an idle link's pipe then ends, and the
            // link dials again when it has something to send).
            tokio::spawn(async move {
                tokio::time::sleep(REPLACED_GRACE).await;
                old.close(3u32.into(), b"replaced by a new connection");
            });
        }
        self.stalled.lock().expect("stalled lock").remove(&peer);
        Ok((serial, conn))
    }

    /// A pipe on connection `serial` to `peer` carried nothing back for too long: the next
    /// dial makes a new connection (this one stays until that one is up).
    pub fn stalled(&self, peer: NodeId, serial: u64) {
        self.stalled.lock().expect("stalled lock").insert(peer, serial);
    }

    /// A new stream to `peer` for `channel`, with the client's hello sent, and the serial of
    /// the connection it is on.
    pub async fn dial(&self, peer: NodeId, addr: SocketAddr, channel: Channel) -> io::Result<(BoxRead, BoxWrite, u64)> {
        let (serial, conn) = self.connection(peer, addr).await?;
        let (mut send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
        send.write_all(&hello(self.me, channel).encode()).await?;
        Ok((Box::new(recv), Box::new(send), serial))
    }

    /// Accepts connections and their streams until the returned task is aborted.
    pub fn serve(&self, on_pipe: OnPipe) -> tokio::task::JoinHandle<()> {
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let on_pipe = on_pipe.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "quic peer refused");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "quic handshake timed out");
                            return;
                        }
                    };
                    let cert = conn
                        .peer_identity()
                        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                        .and_then(|certs| certs.first().cloned());
                    let Some(cert) = cert else {
                        conn.close(1u32.into(), b"no client certificate");
                        return;
                    };
                    loop {
                        let (send, mut recv) = match conn.accept_bi().await {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::debug!(%remote, error = %e, "quic connection ended");
                                return;
                            }
                        };
                        let on_pipe = on_pipe.clone();
                        let cert = cert.clone();
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_hello(&mut recv)).await {
                                Ok(Ok((from, channel))) if cert_names_node(&cert, from) => {
                                    on_pipe(Incoming { from, channel, read: Box::new(recv), write: Box::new(send) })
                                }
                                Ok(Ok((from, _))) => {
                                    tracing::debug!(%remote, %from, "quic peer claims an id its certificate lacks");
                                    conn.close(2u32.into(), b"certificate does not name the claimed node");
                                }
                                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "bad quic stream hello"),
                                Err(_) => tracing::debug!(%remote, "quic stream hello timed out"),
                            }
                        });
                    }
                });
            }
        })
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}
