//! The UDP side: one listening socket per peer address; per client address (a flow), a marked
//! socket connected to the peer. Each datagram, either way, is sent after its own delay draw
//! (so datagrams may be reordered) or lost; replies go back from the listening socket, which
//! conntrack makes look like the peer.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{mark, Shared};

/// Flows (client addresses) per listening socket; a datagram from a new client past it is
/// dropped. A node has one QUIC endpoint, so one flow per peer is the normal case.
const FLOWS_MAX: usize = 64;
/// A flow with no datagram either way for this long is closed.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Datagrams waiting for their release time, per listening socket; more are dropped (a full
/// queue on a real link).
const IN_FLIGHT_MAX: usize = 4096;
/// The largest datagram.
const DATAGRAM_BYTES_MAX: usize = 64 * 1024;

struct Flow {
    upstream: Arc<UdpSocket>,
    last_out: Mutex<Instant>,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

/// Binds the listening socket for `peer` on `local_ip` and serves it in the background.
pub(super) async fn listen(local_ip: Ipv4Addr, peer: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<SocketAddr> {
    let socket = UdpSocket::bind((local_ip, 0)).await.context("bind a UDP socket")?;
    let addr = socket.local_addr()?;
    tokio::spawn(serve(Arc::new(socket), local_ip, peer, shared));
    Ok(addr)
}

async fn serve(listen: Arc<UdpSocket>, local_ip: Ipv4Addr, peer: SocketAddr, shared: Arc<Shared>) {
    let flows: Flows = Arc::new(Mutex::new(HashMap::new()));
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        let (n, client) = match listen.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => {
                // An ICMP error for an earlier reply, or out of memory: keep serving.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let existing = flows.lock().expect("flows").get(&client).cloned();
        let flow = match existing {
            Some(f) => f,
            None => match open_flow(local_ip, peer, client, &listen, &flows, &in_flight, &shared).await {
                Some(f) => f,
                None => {
                    Shared::count(&shared.dropped, 1);
                    continue;
                }
            },
        };
        *flow.last_out.lock().expect("last_out") = Instant::now();
        forward(&shared, &in_flight, flow.upstream.clone(), None, buf[..n].to_vec()).await;
    }
}

async fn open_flow(
    local_ip: Ipv4Addr,
    peer: SocketAddr,
    client: SocketAddr,
    listen: &Arc<UdpSocket>,
    flows: &Flows,
    in_flight: &Arc<Semaphore>,
    shared: &Arc<Shared>,
) -> Option<Arc<Flow>> {
    if flows.lock().expect("flows").len() >= FLOWS_MAX {
        return None;
    }
    let upstream = UdpSocket::bind((local_ip, 0)).await.ok()?;
    mark(&upstream).ok()?;
    upstream.connect(peer).await.ok()?;
    let flow = Arc::new(Flow { upstream: Arc::new(upstream), last_out: Mutex::new(Instant::now()) });
    flows.lock().expect("flows").insert(client, flow.clone());
    Shared::count(&shared.udp_flows, 1);
    tokio::spawn(replies(flow.clone(), client, listen.clone(), flows.clone(), in_flight.clone(), shared.clone()));
    Some(flow)
}

/// Carries the peer's datagrams of one flow back to its client until the flow is idle.
async fn replies(
    flow: Arc<Flow>,
    client: SocketAddr,
    listen: Arc<UdpSocket>,
    flows: Flows,
    in_flight: Arc<Semaphore>,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        match tokio::time::timeout(FLOW_IDLE, flow.upstream.recv(&mut buf)).await {
            Ok(Ok(n)) => forward(&shared, &in_flight, listen.clone(), Some(client), buf[..n].to_vec()).await,
            // The peer's port is closed (ICMP): it may come back; each error is one ICMP.
            Ok(Err(_)) => {}
            Err(_) => {
                if flow.last_out.lock().expect("last_out").elapsed() >= FLOW_IDLE {
                    flows.lock().expect("flows").remove(&client);
                    return;
                }
            }
        }
    }
}

/// Sends `data` on `socket` (to `to`, or to the socket's peer) after its delay draw, or loses
/// it. A clean link sends at once, keeping order (a full send buffer holds up the caller:
/// backpressure).
async fn forward(
    shared: &Arc<Shared>,
    in_flight: &Arc<Semaphore>,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    data: Vec<u8>,
) {
    let Some(delay) = shared.datagram_delay() else {
        Shared::count(&shared.dropped, 1);
        return;
    };
    if delay.is_zero() {
        send(shared, &socket, to, &data).await;
        return;
    }
    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
        Shared::count(&shared.dropped, 1);
        return;
    };
    let shared = shared.clone();
    let at = Instant::now() + delay;
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        send(&shared, &socket, to, &data).await;
        drop(permit);
    });
}

async fn send(shared: &Shared, socket: &UdpSocket, to: Option<SocketAddr>, data: &[u8]) {
    let sent = match to {
        Some(to) => socket.send_to(data, to).await,
        None => socket.send(data).await,
    };
    match sent {
        Ok(n) => {
            Shared::count(&shared.datagrams, 1);
            Shared::count(&shared.bytes, n as u64);
        }
        // A closed port (an ICMP error for an earlier datagram): this one is lost, as on a wire.
        Err(_) => Shared::count(&shared.dropped, 1),
    }
}
