//! The TCP side: one listener per peer address; per accepted connection, a marked connection
//! to the peer and a pump each way that holds each chunk until its release time.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

use super::link::release_at;
use super::{mark, Shared};

/// Connections proxied at once; more are refused (closed on accept): a node has a handful.
const CONNECTIONS_MAX: u64 = 256;
/// The largest chunk read at once.
const CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Chunks held per direction of a connection (at most 4 MiB); a full queue stops reading, so
/// the sender feels backpressure as on a slow link.
const CHUNKS_QUEUED_MAX: usize = 64;
/// How long a connection to the peer may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the listener for `peer` on `local_ip` and serves it in the background.
pub(super) async fn listen(local_ip: Ipv4Addr, peer: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((local_ip, 0)).await.context("bind a TCP listener")?;
    let addr = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, local_ip, peer, shared));
    Ok(addr)
}

async fn accept_loop(listener: TcpListener, local_ip: Ipv4Addr, peer: SocketAddr, shared: Arc<Shared>) {
    let open = Arc::new(AtomicU64::new(0));
    loop {
        let client = match listener.accept().await {
            Ok((c, _)) => c,
            Err(_) => {
                // Out of descriptors or similar: try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (open, shared) = (open.clone(), shared.clone());
        tokio::spawn(async move {
            proxy_connection(client, local_ip, peer, shared).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn proxy_connection(client: TcpStream, local_ip: Ipv4Addr, peer: SocketAddr, shared: Arc<Shared>) {
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, connect_marked(local_ip, peer)).await {
        Ok(Ok(s)) => s,
        // The peer is down or cut off: the client sees its connection close.
        _ => return,
    };
    Shared::count(&shared.tcp_connections, 1);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    tokio::join!(pump(client_r, up_w, shared.clone()), pump(up_r, client_w, shared));
}

async fn connect_marked(local_ip: Ipv4Addr, peer: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    mark(&socket)?;
    socket.bind((local_ip, 0).into())?;
    socket.connect(peer).await
}

/// One direction: reads chunks, stamps each with its release time, and writes it then; the
/// end of the stream (or a read error) is passed on as a shutdown at its own release time.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: Arc<Shared>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Option<Vec<u8>>)>(CHUNKS_QUEUED_MAX);
    let read_shared = shared.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK_BYTES_MAX];
        let mut previous = None;
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let at = release_at(previous, Instant::now().into_std(), read_shared.chunk_delay());
            previous = Some(at);
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((at.into(), chunk)).await.is_err() || n == 0 {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let Some(chunk) = chunk else {
                let _ = to.shutdown().await;
                break;
            };
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            Shared::count(&shared.bytes, chunk.len() as u64);
        }
        // Dropping `rx` here ends the reader at its next chunk.
    };
    tokio::join!(reader, writer);
}
