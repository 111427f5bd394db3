//! The mesh between in-process endpoints over real sockets, on both network layers: round
//! trips on every channel, foreign certificates refused, garbage and oversized frames, channel
//! isolation, descriptor rings, and live switching under load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_transport::link::{Listeners, Mesh};
use tandem_transport::ring::{Descriptor, DescriptorRing, RegionRegistry};
use tandem_transport::tls::{generate_ca, issue_node_cert, Identity, PemPair};
use tandem_transport::{BoxFuture, Handler, Transport, TransportError};
use tandem_types::NodeId;
use tandem_types::{Channel, Layer, TransportKind};
use tokio::io::AsyncWriteExt;

const KINDS: [TransportKind; 2] = [TransportKind::Tcp, TransportKind::Quic];

/// Echoes the payload prefixed with the sender's id; fails on "fail".
struct Echo;

impl Handler for Echo {
    fn handle(&self, from: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            if &payload[..] == b"fail" {
                return Err(format!("refused on {channel}"));
            }
            let mut out = from.get().to_be_bytes().to_vec();
            out.extend_from_slice(&payload);
            Ok(Bytes::from(out))
        })
    }
}

struct Ca {
    name: &'static str,
    ca: PemPair,
}

impl Ca {
    fn new(name: &'static str) -> Ca {
        Ca { name, ca: generate_ca(name).expect("ca") }
    }
    fn identity(&self, id: NodeId) -> Identity {
        let pair = issue_node_cert(self.name, &self.ca.key_pem, id).expect("node cert");
        Identity::from_pem(id, &self.ca.cert_pem, &pair).expect("identity")
    }
}

async fn mesh(identity: &Identity, kind: TransportKind, handler: Arc<dyn Handler>) -> (Mesh, std::net::SocketAddr) {
    let listeners = Listeners::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
    let addr = listeners.tcp.local_addr().expect("addr");
    let regions = RegionRegistry::new(4, 1024 * 1024, 1024);
    let m = Mesh::start(identity, listeners, kind, kind, regions).expect("mesh");
    for c in Channel::ALL {
        m.set_handler(c, handler.clone());
    }
    (m, addr)
}

/// Node 1 and node 2 of one CA, each knowing the other.
async fn pair(kind: TransportKind, handler2: Arc<dyn Handler>) -> (Mesh, Mesh) {
    let ca = Ca::new("pair");
    let (a, a_addr) = mesh(&ca.identity(NodeId(1)), kind, Arc::new(Echo)).await;
    let (b, b_addr) = mesh(&ca.identity(NodeId(2)), kind, handler2).await;
    a.set_peer_addr(NodeId(2), b_addr);
    b.set_peer_addr(NodeId(1), a_addr);
    (a, b)
}

#[tokio::test]
async fn round_trips_on_every_channel_and_size_on_both_layers() {
    for kind in KINDS {
        let (a, _b) = pair(kind, Arc::new(Echo)).await;
        for channel in Channel::ALL {
            for size in [0usize, 1, 4096, 8 * 1024 * 1024] {
                let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
                let reply = a.call(NodeId(2), channel, Bytes::from(payload.clone())).await.expect("call");
                assert_eq!(&reply[..8], &1u64.to_be_bytes(), "{kind}: the server saw the authenticated sender");
                assert_eq!(&reply[8..], &payload[..], "{kind}: {size} bytes on {channel}");
            }
        }
        let err = a.call(NodeId(2), Channel::Control, Bytes::from_static(b"fail")).await.expect_err("remote error");
        assert!(
            matches!(err, TransportError::Remote { peer: NodeId(2), ref reason } if reason.contains("control")),
            "{err}"
        );
        let stats = a.link_stats();
        assert_eq!(stats.len(), 4);
        for s in &stats {
            assert_eq!(s.transport, Some(kind), "{s:?}");
            assert!(s.messages_sent >= 4 && s.pending == 0, "{s:?}");
        }
    }
}

#[tokio::test]
async fn many_concurrent_requests_share_a_link() {
    for kind in KINDS {
        let (a, _b) = pair(kind, Arc::new(Echo)).await;
        let mut tasks = Vec::new();
        for i in 0..2000u32 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let reply =
                    a.call(NodeId(2), Channel::Replication, Bytes::from(i.to_be_bytes().to_vec())).await.expect("call");
                assert_eq!(&reply[8..], &i.to_be_bytes());
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let s = &a.link_stats()[0];
        assert_eq!((s.reconnects, s.pending), (0, 0), "{kind}: {s:?}");
    }
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused_on_both_layers() {
    for kind in KINDS {
        let ours = Ca::new("ours");
        let theirs = Ca::new("theirs");
        let (_srv, srv_addr) = mesh(&ours.identity(NodeId(2)), kind, Arc::new(Echo)).await;
        // A client with a certificate from another CA cannot call our node...
        let (intruder, _) = mesh(&theirs.identity(NodeId(1)), kind, Arc::new(Echo)).await;
        intruder.set_peer_addr(NodeId(2), srv_addr);
        let err = intruder.call(NodeId(2), Channel::Control, Bytes::from_static(b"x")).await.expect_err("refused");
        assert!(matches!(err, TransportError::Unreachable { .. }), "{kind}: {err}");
        // ...and our node does not talk to a server of another CA.
        let (_foreign, foreign_addr) = mesh(&theirs.identity(NodeId(3)), kind, Arc::new(Echo)).await;
        let (client, _) = mesh(&ours.identity(NodeId(1)), kind, Arc::new(Echo)).await;
        client.set_peer_addr(NodeId(3), foreign_addr);
        let err = client.call(NodeId(3), Channel::Control, Bytes::from_static(b"x")).await.expect_err("refused");
        assert!(matches!(err, TransportError::Unreachable { .. }), "{kind}: {err}");
        // A certificate of our CA used under another node's id is refused too.
        let pair = issue_node_cert("ours", &ours.ca.key_pem, NodeId(1)).expect("cert");
        let (liar, _) =
            mesh(&Identity::from_pem(NodeId(4), &ours.ca.cert_pem, &pair).expect("id"), kind, Arc::new(Echo)).await;
        liar.set_peer_addr(NodeId(2), srv_addr);
        let err = liar.call(NodeId(2), Channel::Control, Bytes::from_static(b"x")).await.expect_err("refused");
        assert!(matches!(err, TransportError::Unreachable { .. }), "{kind}: {err}");
    }
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let ca = Ca::new("garbage");
    let (_srv, srv_addr) = mesh(&ca.identity(NodeId(2)), TransportKind::Tcp, Arc::new(Echo)).await;
    let (client, _) = mesh(&ca.identity(NodeId(1)), TransportKind::Tcp, Arc::new(Echo)).await;
    client.set_peer_addr(NodeId(2), srv_addr);
    client.call(NodeId(2), Channel::Control, Bytes::from_static(b"before")).await.expect("call");

    // A raw authenticated connection sends a good hello, then garbage: the server drops it.
    let identity = ca.identity(NodeId(1));
    let oversized = ((16 * 1024 * 1024 + 1) as u32).to_be_bytes().to_vec();
    for bad in [vec![0xffu8; 64], u32::MAX.to_be_bytes().to_vec(), oversized] {
        let connector = tokio_rustls::TlsConnector::from(identity.client_config().expect("config"));
        let tcp = tokio::net::TcpStream::connect(srv_addr).await.expect("connect");
        let mut tls = connector.connect(tandem_transport::tls::server_name(NodeId(2)), tcp).await.expect("tls");
        tls.write_all(&tandem_transport::pipe::hello(NodeId(1), Channel::Control).encode()).await.expect("hello");
        tls.write_all(&bad).await.expect("garbage");
        tls.flush().await.expect("flush");
        // The server's hello comes first, then nothing: the connection closes.
        let (node, _) = tandem_transport::pipe::read_server_hello(&mut tls).await.expect("server hello");
        assert_eq!(node, NodeId(2));
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(20), tokio::io::AsyncReadExt::read(&mut tls, &mut buf))
            .await
            .expect("server closes the connection");
        assert!(matches!(n, Ok(0) | Err(_)), "server answered garbage: {n:?}");
    }
    // The real link is unaffected.
    let reply = client.call(NodeId(2), Channel::Control, Bytes::from_static(b"after")).await.expect("call");
    assert_eq!(&reply[8..], b"after");
}

#[tokio::test]
async fn garbage_and_oversized_frames_on_a_quic_stream_close_only_that_stream() {
    let ca = Ca::new("garbage-quic");
    let (_srv, srv_addr) = mesh(&ca.identity(NodeId(2)), TransportKind::Quic, Arc::new(Echo)).await;
    let (client, _) = mesh(&ca.identity(NodeId(1)), TransportKind::Quic, Arc::new(Echo)).await;
    client.set_peer_addr(NodeId(2), srv_addr);
    client.call(NodeId(2), Channel::Control, Bytes::from_static(b"before")).await.expect("call");

    // A raw authenticated QUIC connection opens streams that say hello, then send garbage.
    let identity = ca.identity(NodeId(1));
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(identity.client_config().expect("config"))
        .expect("quic client config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(srv_addr, "node-2").expect("connect").await.expect("handshake");
    let oversized = ((16 * 1024 * 1024 + 1) as u32).to_be_bytes().to_vec();
    for bad in [vec![0xffu8; 64], u32::MAX.to_be_bytes().to_vec(), oversized] {
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&tandem_transport::pipe::hello(NodeId(1), Channel::Bulk).encode()).await.expect("hello");
        send.write_all(&bad).await.expect("garbage");
        let (node, _) = tandem_transport::pipe::read_server_hello(&mut recv).await.expect("server hello");
        assert_eq!(node, NodeId(2));
        let mut buf = [0u8; 16];
        let n =
            tokio::time::timeout(Duration::from_secs(20), recv.read(&mut buf)).await.expect("server ends the stream");
        assert!(matches!(n, Ok(None) | Err(_)), "server answered garbage: {n:?}");
    }
    // The real link is unaffected.
    let reply = client.call(NodeId(2), Channel::Control, Bytes::from_static(b"after")).await.expect("call");
    assert_eq!(&reply[8..], b"after");
}

/// Echoes like [`Echo`], but holds every bulk request until [`LetGo`] is dropped (counting the
/// ones it holds): the bulk channel can be wedged on purpose.
struct HoldBulk {
    let_go: tokio::sync::watch::Receiver<bool>,
    held: Arc<AtomicU64>,
}

/// Releases the bulk requests a [`HoldBulk`] holds, and every later one, when dropped (also when
/// the test fails, so that nothing waits on a wedged channel after it).
struct LetGo(tokio::sync::watch::Sender<bool>);

impl Drop for LetGo {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

fn hold_bulk() -> (HoldBulk, LetGo, Arc<AtomicU64>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let held = Arc::new(AtomicU64::new(0));
    (HoldBulk { let_go: rx, held: held.clone() }, LetGo(tx), held)
}

/// Size of each bulk request [`wedge_bulk`] sends.
const WEDGE_CHUNK: usize = 4 * 1024 * 1024;

/// Sends `calls` bulk requests of [`WEDGE_CHUNK`] bytes from `a` to node 2 (whose handler is a
/// [`HoldBulk`]) and waits until the bulk channel is wedged: its window full (one more chunk
/// does not fit) and the peer's handler holding every request in it.
async fn wedge_bulk(a: &Mesh, held: &AtomicU64, calls: usize) -> Vec<Call> {
    let bulk: Vec<Call> = (0..calls)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.call(NodeId(2), Channel::Bulk, Bytes::from(vec![7u8; WEDGE_CHUNK])).await })
        })
        .collect();
    tandem_testkit::wait::eventually("the bulk channel to be wedged", Duration::from_secs(60), || {
        let Some(s) = a.link_stats().into_iter().find(|s| s.channel == Channel::Bulk) else { return false };
        (s.pending + 1) * WEDGE_CHUNK > tandem_linkcore::CHANNEL_BYTES_MAX
            && held.load(Ordering::SeqCst) as usize == s.pending
    })
    .await;
    bulk
}

impl Handler for HoldBulk {
    fn handle(&self, from: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            if channel == Channel::Bulk {
                self.held.fetch_add(1, Ordering::SeqCst);
                let mut let_go = self.let_go.clone();
                let _ = let_go.wait_for(|go| *go).await;
            }
            Echo.handle(from, channel, payload).await
        })
    }
}

/// Control requests do not queue behind bulk ones: with the bulk channel wedged (its window
/// full of requests the peer holds, more senders waiting for room), control requests are still
/// answered. Had control shared bulk's link or queue, they would wait for the bulk requests,
/// which here never end until released. The timings are printed for information only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_bulk_channel_does_not_hold_up_control() {
    const BULK_CALLS: usize = tandem_linkcore::CHANNEL_BYTES_MAX / WEDGE_CHUNK + 4;
    for kind in KINDS {
        let (hold, let_go, held) = hold_bulk();
        let (a, _b) = pair(kind, Arc::new(hold)).await;
        let ping = |a: Mesh| async move {
            let t = Instant::now();
            tokio::time::timeout(
                Duration::from_secs(20),
                a.call(NodeId(2), Channel::Control, Bytes::from_static(b"ping")),
            )
            .await
            .unwrap_or_else(|_| panic!("{kind}: a control request was not answered within 20 s"))
            .expect("ping");
            t.elapsed()
        };
        let idle = ping(a.clone()).await;
        let bulk = wedge_bulk(&a, &held, BULK_CALLS).await;
        let mut loaded = Vec::new();
        for _ in 0..20 {
            loaded.push(ping(a.clone()).await);
        }
        loaded.sort();
        let unfinished = bulk.iter().filter(|b| !b.is_finished()).count();
        assert_eq!(unfinished, BULK_CALLS, "{kind}: bulk requests ended while the peer held them");
        eprintln!(
            "{kind}: control round trip idle {idle:?}, with bulk wedged p50 {:?} max {:?} (information only)",
            loaded[loaded.len() / 2],
            loaded[loaded.len() - 1]
        );
        // Released, the bulk requests complete.
        drop(let_go);
        for b in bulk {
            let reply = tokio::time::timeout(Duration::from_secs(60), b)
                .await
                .unwrap_or_else(|_| panic!("{kind}: a bulk request did not complete after the release"))
                .expect("bulk task")
                .expect("bulk");
            assert_eq!(reply.len(), 8 + WEDGE_CHUNK, "{kind}");
        }
    }
}

#[tokio::test]
async fn descriptor_ring_blocks_when_full_and_completes_in_order_at_the_offsets() {
    for kind in KINDS {
        let (a, b) = pair(kind, Arc::new(Echo)).await;
        b.regions().register(7).expect("register");
        let ring = Arc::new(DescriptorRing::new(&a, NodeId(2), 4));
        // Nobody reads completions yet: the ring fills, and then a post has to wait.
        let mut expected = Vec::new();
        let mut posted = 0u64;
        let descriptor = |i: u64| {
            let data: Vec<u8> = (0..4096u64).map(|j| ((j + i) % 251) as u8).collect();
            (
                Descriptor {
                    data: Bytes::from(data.clone()),
                    region: 7,
                    offset: i * 4096,
                    channel: Channel::Replication,
                },
                data,
            )
        };
        loop {
            let (d, data) = descriptor(posted);
            match ring.try_post(d) {
                Ok(()) => {
                    expected.push((posted * 4096, data));
                    posted += 1;
                }
                Err(_) => break,
            }
        }
        assert_eq!(posted, 4, "{kind}: the ring holds exactly its capacity");
        assert_eq!(ring.free_slots(), 0);
        let (d, data) = descriptor(posted);
        let blocked = tokio::time::timeout(Duration::from_millis(300), ring.post(d.clone())).await;
        assert!(blocked.is_err(), "{kind}: a post into a full ring must wait");
        // A reader of completions frees slots; the rest of the posts go through.
        let reader = {
            let ring = ring.clone();
            tokio::spawn(async move {
                let mut offsets = Vec::new();
                for _ in 0..64 {
                    let c = ring.next_completion().await.expect("local completion");
                    c.result.expect("write succeeded");
                    offsets.push(c.offset);
                }
                offsets
            })
        };
        ring.post(d).await.expect("post");
        expected.push((posted * 4096, data));
        posted += 1;
        while posted < 64 {
            let (d, data) = descriptor(posted);
            ring.post(d).await.expect("post");
            expected.push((posted * 4096, data));
            posted += 1;
        }
        let in_order: Vec<u64> = (0..64).map(|i| i * 4096).collect();
        let offsets = reader.await.expect("reader");
        assert_eq!(offsets, in_order, "{kind}: local completions in ring order");
        let mut remote = Vec::new();
        for _ in 0..64 {
            let c = b.regions().next_completion().await.expect("remote completion");
            assert_eq!((c.from, c.region, c.len, c.channel), (NodeId(1), 7, 4096, Channel::Replication));
            remote.push(c.offset);
        }
        assert_eq!(remote, in_order, "{kind}: remote completions in ring order");
        for (offset, data) in expected {
            assert_eq!(b.regions().read(7, offset, 4096).expect("read"), data, "{kind}: bytes at {offset}");
        }
        // Writes outside the region, or to an unknown region, fail and change nothing.
        let before = b.regions().read(7, 1024 * 1024 - 8, 8).expect("read");
        let bad =
            Descriptor { data: Bytes::from(vec![1u8; 16]), region: 7, offset: 1024 * 1024 - 8, channel: Channel::Bulk };
        ring.post(bad).await.expect("post");
        assert!(ring.next_completion().await.expect("completion").result.is_err(), "{kind}: out of range");
        assert_eq!(b.regions().read(7, 1024 * 1024 - 8, 8).expect("read"), before);
        ring.post(Descriptor { data: Bytes::from(vec![1u8; 16]), region: 99, offset: 0, channel: Channel::Bulk })
            .await
            .expect("post");
        assert!(ring.next_completion().await.expect("completion").result.is_err(), "{kind}: unknown region");
    }
}

/// Checks the numbers it receives per channel: each must be the next one.
#[derive(Default)]
struct Sequence {
    next: Mutex<std::collections::HashMap<Channel, u64>>,
    errors: AtomicU64,
}

impl Handler for Sequence {
    fn handle(&self, _from: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let n = u64::from_be_bytes(payload[..8].try_into().map_err(|_| "short".to_string())?);
            let mut next = self.next.lock().expect("lock");
            let expected = next.entry(channel).or_insert(0);
            if n != *expected {
                self.errors.fetch_add(1, Ordering::Relaxed);
                return Err(format!("got {n}, expected {expected}"));
            }
            *expected += 1;
            Ok(payload)
        })
    }
}

#[tokio::test]
async fn switching_layers_under_load_delivers_every_message_once_in_order() {
    let seq = Arc::new(Sequence::default());
    let (a, _b) = pair(TransportKind::Quic, seq.clone()).await;
    let total = 6000u64;
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut replies = std::collections::VecDeque::new();
            for n in 0..total {
                let mut payload = n.to_be_bytes().to_vec();
                payload.resize(1024, 0);
                replies
                    .push_back((n, a.send(NodeId(2), Channel::Replication, Bytes::from(payload)).await.expect("send")));
                while replies.len() > 64 {
                    let (k, r) = replies.pop_front().expect("reply");
                    let got = r.wait().await.expect("no send may fail during a switch");
                    assert_eq!(&got[..8], &k.to_be_bytes());
                }
            }
            for (k, r) in replies {
                let got = r.wait().await.expect("no send may fail during a switch");
                assert_eq!(&got[..8], &k.to_be_bytes());
            }
        })
    };
    // The layer flips each time the link has moved to the selected one and carried another
    // few hundred messages on it, so the stream sees switches however fast or slow it runs.
    let replication = |a: &Mesh| a.link_stats().into_iter().find(|s| s.channel == Channel::Replication);
    let mut flips = 0;
    let mut kind = TransportKind::Quic;
    let mut flipped_at = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sender.is_finished() {
        let moved_on =
            replication(&a).is_some_and(|s| s.transport == Some(kind) && s.messages_sent >= flipped_at + 300);
        if !moved_on {
            assert!(Instant::now() < deadline, "the link did not move to {kind} and carry on: {:?}", replication(&a));
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        flipped_at = replication(&a).map_or(0, |s| s.messages_sent);
        kind = if kind == TransportKind::Quic { TransportKind::Tcp } else { TransportKind::Quic };
        a.set_kind(Layer::Data, kind);
        flips += 1;
    }
    sender.await.expect("sender");
    assert!(flips >= 4, "the stream ended before enough switches ({flips})");
    assert_eq!(seq.errors.load(Ordering::Relaxed), 0);
    assert_eq!(seq.next.lock().expect("lock").get(&Channel::Replication), Some(&total));
    let s = a.link_stats().into_iter().find(|s| s.channel == Channel::Replication).expect("link");
    assert!(s.switches >= 2, "{s:?}");
    eprintln!("{flips} switches: {s:?}");
}

#[tokio::test]
async fn a_credited_region_completes_a_write_only_once_the_receiver_consumed_it() {
    for kind in KINDS {
        let (a, b) = pair(kind, Arc::new(Echo)).await;
        b.regions().register_credited(9).expect("register");
        let ring = DescriptorRing::new(&a, NodeId(2), 8);
        let d =
            Descriptor { data: Bytes::from_static(b"record"), region: 9, offset: 64, channel: Channel::Replication };
        ring.post(d).await.expect("post");
        let landed = b.regions().next_completion().await.expect("remote completion");
        assert_eq!(b.regions().read(9, landed.offset, landed.len).expect("read"), b"record");
        // The bytes sit unconsumed in the receiver's region: the sender must not see them done.
        let early = tokio::time::timeout(Duration::from_millis(300), ring.next_completion()).await;
        assert!(early.is_err(), "{kind}: the sender saw a completion before the receiver consumed the bytes");
        landed.consumed.consume();
        let done = tokio::time::timeout(Duration::from_secs(20), ring.next_completion())
            .await
            .expect("completion after consume")
            .expect("ring open");
        done.result.expect("write succeeded");
        // Dropping an unread completion also gives the space back.
        let d = Descriptor { data: Bytes::from_static(b"again"), region: 9, offset: 0, channel: Channel::Replication };
        ring.post(d).await.expect("post");
        drop(b.regions().next_completion().await.expect("remote completion"));
        let done =
            tokio::time::timeout(Duration::from_secs(20), ring.next_completion()).await.expect("completion after drop");
        done.expect("ring open").result.expect("write succeeded");
    }
}

/// Echoes like [`Echo`], but holds a request named "during" forever (counting it): the
/// process dies with it received and unanswered.
struct HoldDuring(Arc<AtomicU64>);

impl Handler for HoldDuring {
    fn handle(&self, from: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            if &payload[..] == b"during" {
                self.0.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            Echo.handle(from, channel, payload).await
        })
    }
}

/// Node 2 of a test, which can crash and start again on the same address. Its sockets are
/// opened by the test and kept (duplicated) for its next process: the address stays bound
/// across the restart, so the sender's first dial after its pipe breaks waits for the new
/// process instead of being refused. (A sender that cannot reach the peer at all fails its
/// requests and starts a new session.)
struct Restartable {
    identity: Identity,
    kind: TransportKind,
    tcp: std::net::TcpListener,
    udp: std::net::UdpSocket,
    addr: std::net::SocketAddr,
    peer: std::net::SocketAddr,
}

impl Restartable {
    fn new(identity: Identity, kind: TransportKind, peer: std::net::SocketAddr) -> Restartable {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let udp = std::net::UdpSocket::bind(addr).expect("bind udp");
        Restartable { identity, kind, tcp, udp, addr, peer }
    }

    /// A process of node 2 (on the current runtime), knowing node 1.
    fn start(&self, handler: Arc<dyn Handler>) -> Mesh {
        let tcp = self.tcp.try_clone().expect("dup tcp");
        tcp.set_nonblocking(true).expect("nonblocking");
        let listeners = Listeners {
            tcp: tokio::net::TcpListener::from_std(tcp).expect("tcp"),
            udp: self.udp.try_clone().expect("dup udp"),
        };
        let regions = RegionRegistry::new(4, 1024 * 1024, 1024);
        let m = Mesh::start(&self.identity, listeners, self.kind, self.kind, regions).expect("mesh");
        for c in Channel::ALL {
            m.set_handler(c, handler.clone());
        }
        m.set_peer_addr(NodeId(1), self.peer);
        m
    }

    /// A first process on a runtime of its own: dropping that runtime ends every task and
    /// socket of it at once, as a crash would (no goodbye on either layer).
    fn start_crashable(&self, handler: Arc<dyn Handler>) -> (Mesh, tokio::runtime::Runtime) {
        let process = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
        let m = {
            let _in = process.enter();
            self.start(handler)
        };
        (m, process)
    }
}

/// Waits until `count` reaches `n`.
async fn wait_count(count: &AtomicU64, n: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while count.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "{what}: node 2 never received {n} held requests");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends "during" from node 1 to node 2 in a task of its own.
fn call_during(a: &Mesh) -> tokio::task::JoinHandle<Result<Bytes, TransportError>> {
    let a = a.clone();
    tokio::spawn(async move { a.call(NodeId(2), Channel::Control, Bytes::from_static(b"during")).await })
}

/// The answer to a call made before node 2 restarted, from its new process.
async fn answered_across(call: tokio::task::JoinHandle<Result<Bytes, TransportError>>, kind: TransportKind) -> Bytes {
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap_or_else(|_| panic!("{kind}: a request in flight across the restart was never answered"))
        .expect("task")
        .unwrap_or_else(|e| panic!("{kind}: a request in flight across the restart failed: {e}"))
}

/// After node 2 restarted, the link goes on: a call is answered within 30 s (a call that went
/// out on a pipe to the dead process fails `Unreachable` and is made again, as callers do).
async fn goes_on(a: &Mesh, kind: TransportKind) {
    let call = async {
        loop {
            match a.call(NodeId(2), Channel::Control, Bytes::from_static(b"after")).await {
                Err(TransportError::Unreachable { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
    };
    let reply = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap_or_else(|_| panic!("{kind}: the restarted peer never answered"))
        .expect("call after the restart");
    assert_eq!(&reply[8..], b"after", "{kind}");
}

/// Node 1 talking to node 2, whose first process holds every "during" request (counting them)
/// and can crash, and whose next process starts on the same address.
struct RestartCase {
    kind: TransportKind,
    a: Mesh,
    node2: Restartable,
    first: Option<(Mesh, tokio::runtime::Runtime)>,
    /// "during" requests the first process received.
    received: Arc<AtomicU64>,
}

impl RestartCase {
    async fn new(kind: TransportKind, name: &'static str) -> RestartCase {
        let ca = Ca::new(name);
        let received = Arc::new(AtomicU64::new(0));
        let (a, a_addr) = mesh(&ca.identity(NodeId(1)), kind, Arc::new(Echo)).await;
        let node2 = Restartable::new(ca.identity(NodeId(2)), kind, a_addr);
        let first = node2.start_crashable(Arc::new(HoldDuring(received.clone())));
        a.set_peer_addr(NodeId(2), node2.addr);
        RestartCase { kind, a, node2, first: Some(first), received }
    }

    /// Until the first process received `n` "during" requests.
    async fn held(&self, n: u64) {
        wait_count(&self.received, n, &self.kind.to_string()).await;
    }

    /// Node 2 crashes and starts again on the same address, knowing nothing of the session,
    /// with `handler`.
    fn crash_and_restart(&mut self, handler: Arc<dyn Handler>) -> Mesh {
        if let Some((b, process)) = self.first.take() {
            drop(b);
            process.shutdown_background();
        }
        self.node2.start(handler)
    }
}

/// docs/ARCHITECTURE.md, transport invariants: "a receiver that restarted while the sender had
/// requests outstanding gets them again, in a new session (what the dead process had received
/// but not answered is delivered again: at-least-once across a receiver crash)".
#[tokio::test]
async fn a_restarted_receiver_picks_up_a_long_running_session() {
    for kind in KINDS {
        let mut case = RestartCase::new(kind, "restart").await;
        // More requests than a window, so the session's numbers are far from 1.
        for i in 0..300u32 {
            case.a.call(NodeId(2), Channel::Control, Bytes::from(i.to_be_bytes().to_vec())).await.expect("call");
        }
        // A request node 2 receives and never answers: it is in flight when node 2 dies.
        let waiting = call_during(&case.a);
        case.held(1).await;
        let _b2 = case.crash_and_restart(Arc::new(Echo));
        // The request the dead process held is delivered again, to the new one, and answered.
        assert_eq!(&answered_across(waiting, kind).await[8..], b"during", "{kind}");
        assert_eq!(case.received.load(Ordering::SeqCst), 1, "{kind}: the old process saw it once");
        goes_on(&case.a, kind).await;
    }
}

/// The chaos suite's `kill-primary-lagging` seed 114: a receiver that dies having answered
/// requests above one it holds leaves gaps in the sender's outstanding numbers. Resent with
/// those numbers, the new process waited for the gaps for ever (a new primary's chunk copies
/// to a restarted replica timed out again and again). Every outstanding request must reach
/// the new process and be answered.
#[tokio::test]
async fn a_restarted_receiver_gets_every_outstanding_request_whatever_the_old_one_answered() {
    for kind in KINDS {
        let mut case = RestartCase::new(kind, "gaps").await;
        // Held, then answered, then held again: the answered ones leave a gap between the two.
        let first = call_during(&case.a);
        case.held(1).await;
        for i in 0..3u32 {
            case.a.call(NodeId(2), Channel::Control, Bytes::from(i.to_be_bytes().to_vec())).await.expect("call");
        }
        let second = call_during(&case.a);
        case.held(2).await;
        let _b2 = case.crash_and_restart(Arc::new(Echo));
        assert_eq!(&answered_across(first, kind).await[8..], b"during", "{kind}");
        assert_eq!(&answered_across(second, kind).await[8..], b"during", "{kind}");
        goes_on(&case.a, kind).await;
    }
}

/// A request its caller gave up on before the receiver restarted is not sent to the new
/// process, and the next request, alone in the new session, is answered (it once went out
/// marked as answered already, and the new process skipped it).
#[tokio::test]
async fn a_request_given_up_before_the_receiver_restarted_is_dropped_and_the_link_goes_on() {
    for kind in KINDS {
        let mut case = RestartCase::new(kind, "given-up").await;
        let given_up = call_during(&case.a);
        case.held(1).await;
        given_up.abort();
        let new_process = Arc::new(AtomicU64::new(0));
        let _b2 = case.crash_and_restart(Arc::new(HoldDuring(new_process.clone())));
        goes_on(&case.a, kind).await;
        assert_eq!(new_process.load(Ordering::SeqCst), 0, "{kind}: the given-up request reached the new process");
    }
}

/// Blocks requests named "block" until released (or cancelled); logs every request it
/// completes.
struct Gate {
    release: Arc<tokio::sync::Semaphore>,
    started: Arc<AtomicU64>,
    done: Arc<Mutex<Vec<String>>>,
}

impl Handler for Gate {
    fn handle(&self, _from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let name = String::from_utf8_lossy(&payload).to_string();
            if name.starts_with("block") {
                self.started.fetch_add(1, Ordering::SeqCst);
                self.release.acquire().await.expect("gate").forget();
            }
            self.done.lock().expect("log").push(name);
            Ok(Bytes::new())
        })
    }
}

type Call = tokio::task::JoinHandle<Result<Bytes, TransportError>>;

/// Sends `name` from `a` to node 2 on the bulk channel, in a task of its own.
fn spawn_call(a: &Mesh, name: String) -> Call {
    let a = a.clone();
    tokio::spawn(async move { a.call(NodeId(2), Channel::Bulk, Bytes::from(name)).await })
}

/// Waits until `a` has sent at least `n` requests on the bulk channel and its pipe's writer has
/// taken them all (they are on their way to the peer).
async fn wait_sent(a: &Mesh, n: u64) {
    tandem_testkit::wait::eventually("the requests to go out", Duration::from_secs(20), || {
        a.link_stats()
            .into_iter()
            .find(|s| s.channel == Channel::Bulk)
            .is_some_and(|s| s.messages_sent >= n && s.queue_depth == 0)
    })
    .await;
}

/// Takes every handler slot of node 2's bulk channel with a request named `block-<i>` that its
/// handler holds, and waits until `running()` counts them all.
async fn block_every_slot(a: &Mesh, running: impl Fn() -> usize) -> Vec<Call> {
    let slots = tandem_transport::link::DISPATCH_IN_FLIGHT_MAX;
    let calls = (0..slots).map(|i| spawn_call(a, format!("block-{i}"))).collect();
    tandem_testkit::wait::eventually("the blocking requests to start", Duration::from_secs(10), || running() >= slots)
        .await;
    calls
}

/// Node 1 (echo) and node 2 (a [`Gate`]), and the gate's handles.
struct GatedPair {
    ca: Ca,
    a: Mesh,
    b: Mesh,
    b_addr: std::net::SocketAddr,
    release: Arc<tokio::sync::Semaphore>,
    started: Arc<AtomicU64>,
    done: Arc<Mutex<Vec<String>>>,
}

async fn gated_pair(kind: TransportKind, name: &'static str) -> GatedPair {
    let ca = Ca::new(name);
    let gate = Gate {
        release: Arc::new(tokio::sync::Semaphore::new(0)),
        started: Arc::new(AtomicU64::new(0)),
        done: Arc::new(Mutex::new(Vec::new())),
    };
    let (release, started, done) = (gate.release.clone(), gate.started.clone(), gate.done.clone());
    let (b, b_addr) = mesh(&ca.identity(NodeId(2)), kind, Arc::new(gate)).await;
    let (a, a_addr) = mesh(&ca.identity(NodeId(1)), kind, Arc::new(Echo)).await;
    a.set_peer_addr(NodeId(2), b_addr);
    b.set_peer_addr(NodeId(1), a_addr);
    GatedPair { ca, a, b, b_addr, release, started, done }
}

/// Finding 7 of issue 13: a request the sender gave up on (its session abandoned: here the
/// sender restarted; a link that cannot be re-made does the same) must not take effect after
/// the sender's next requests. Requests of the old session still queued at the receiver are
/// never started, and those running are cancelled, as soon as the new session begins.
#[tokio::test]
async fn requests_of_an_abandoned_session_never_run_after_the_new_session_begins() {
    for kind in KINDS {
        let GatedPair { ca, a, b, b_addr, release, started, done } = gated_pair(kind, "fence").await;
        // Every handler slot of the channel is taken by a blocked request; two more wait in
        // the receiver's queue behind them.
        let slots = tandem_transport::link::DISPATCH_IN_FLIGHT_MAX;
        let mut calls = block_every_slot(&a, || started.load(Ordering::SeqCst) as usize).await;
        for name in ["old-1", "old-2"] {
            calls.push(spawn_call(&a, name.into()));
        }
        wait_sent(&a, slots as u64 + 2).await;
        // The sender goes away with all of them unanswered and comes back: a new session.
        a.shutdown();
        drop(a);
        for c in calls {
            c.abort();
        }
        let (a2, a2_addr) = mesh(&ca.identity(NodeId(1)), kind, Arc::new(Echo)).await;
        a2.set_peer_addr(NodeId(2), b_addr);
        b.set_peer_addr(NodeId(1), a2_addr);
        let mut new_1 = {
            let a2 = a2.clone();
            tokio::spawn(async move { a2.call(NodeId(2), Channel::Bulk, Bytes::from_static(b"new-1")).await })
        };
        // The new session's request runs at once: the abandoned ones hold no handler slot.
        // (Before the fence it waited behind them; they are let go after 20 s regardless, so
        // that the check below shows what runs in which order.)
        let answered_at_once = tokio::time::timeout(Duration::from_secs(20), &mut new_1).await.is_ok();
        // Let anything of the old session that could still run, run.
        release.add_permits(slots * 2);
        if !answered_at_once {
            new_1.await.expect("task").expect("new-1");
        }
        a2.call(NodeId(2), Channel::Bulk, Bytes::from_static(b"new-2")).await.expect("new-2");
        // What is checked is that nothing stale runs: there is no event to wait for, so the
        // stale requests, released above, get this long to show up if they would run at all.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = done.lock().expect("log").clone();
        assert!(done.contains(&"new-1".to_string()) && done.contains(&"new-2".to_string()), "{kind}: {done:?}");
        let stale: Vec<&String> = done.iter().filter(|n| !n.starts_with("new")).collect();
        assert!(stale.is_empty(), "{kind}: requests of the abandoned session ran after the new one began: {stale:?}");
        assert!(answered_at_once, "{kind}: the new session's request waited for the abandoned ones");
        a2.shutdown();
        b.shutdown();
    }
}

/// A caller that gives up on a request after it went out (here: its task is aborted, as an
/// NBD connection's requests are when the host disconnects) cancels it at the receiver: a
/// request still queued there never starts, one running is cancelled, both before anything the
/// sender sends later on the link. The link goes on (the cancelled requests are answered, so
/// the window moves).
#[tokio::test]
async fn a_request_given_up_after_it_went_out_is_cancelled_before_later_ones_run() {
    for kind in KINDS {
        let GatedPair { a, b, release, started, done, .. } = gated_pair(kind, "cancel").await;
        a.call(NodeId(2), Channel::Bulk, Bytes::from_static(b"warm-up")).await.expect("warm-up");
        let slots = tandem_transport::link::DISPATCH_IN_FLIGHT_MAX;
        let mut calls = block_every_slot(&a, || started.load(Ordering::SeqCst) as usize).await;
        // Queued at the receiver behind the blocked ones.
        for name in ["queued-1", "queued-2"] {
            calls.push(spawn_call(&a, name.into()));
        }
        // The warm-up, the blocked ones and the two queued ones have gone out.
        wait_sent(&a, 1 + slots as u64 + 2).await;
        for c in &calls {
            c.abort();
        }
        for c in calls {
            let _ = c.await;
        }
        // The link is still up: later requests run at once (the cancelled ones freed their
        // handler slots), and a window's worth more go through.
        tokio::time::timeout(Duration::from_secs(20), a.call(NodeId(2), Channel::Bulk, Bytes::from_static(b"after-1")))
            .await
            .unwrap_or_else(|_| panic!("{kind}: a request after the cancelled ones waited for them"))
            .expect("after-1");
        release.add_permits(slots * 2);
        for i in 0..300u32 {
            a.call(NodeId(2), Channel::Bulk, Bytes::from(format!("after-more-{i}"))).await.expect("after-more");
        }
        // What is checked is that the given-up requests never run: there is no event to wait
        // for, so they get this long (after the release above) to show up if they would.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = done.lock().expect("log").clone();
        let ran: Vec<&String> = done.iter().filter(|n| n.starts_with("block") || n.starts_with("queued")).collect();
        assert!(ran.is_empty(), "{kind}: requests given up on still ran: {ran:?}");
        assert_eq!(done.iter().filter(|n| n.starts_with("after")).count(), 301, "{kind}");
        a.shutdown();
        b.shutdown();
    }
}

/// A request's name, when the node read it, and when its handler began.
type Seen = (String, Option<std::time::Instant>, std::time::Instant);

/// Records, for each request, when the node read it and when its handler began.
struct Clock {
    release: Arc<tokio::sync::Semaphore>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Handler for Clock {
    fn handle(&self, _from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let name = String::from_utf8_lossy(&payload).to_string();
            let received = tandem_transport::link::request_received_at();
            self.seen.lock().expect("log").push((name.clone(), received, std::time::Instant::now()));
            if name.starts_with("block") {
                self.release.acquire().await.expect("gate").forget();
            }
            Ok(Bytes::new())
        })
    }
}

/// A handler learns when its request arrived, not when it got a handler slot: the primary's
/// deadline fence for proxied writes counts from there.
#[tokio::test]
async fn a_handler_sees_when_its_request_arrived() {
    let ca = Ca::new("clock");
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (b, b_addr) = mesh(
        &ca.identity(NodeId(2)),
        TransportKind::Tcp,
        Arc::new(Clock { release: release.clone(), seen: seen.clone() }),
    )
    .await;
    let (a, a_addr) = mesh(&ca.identity(NodeId(1)), TransportKind::Tcp, Arc::new(Echo)).await;
    a.set_peer_addr(NodeId(2), b_addr);
    b.set_peer_addr(NodeId(1), a_addr);
    assert_eq!(tandem_transport::link::request_received_at(), None, "outside a handler");
    let slots = tandem_transport::link::DISPATCH_IN_FLIGHT_MAX;
    let calls = block_every_slot(&a, || seen.lock().expect("log").len()).await;
    let queued = spawn_call(&a, "queued".into());
    wait_sent(&a, slots as u64 + 1).await;
    // The request is on its way; it then waits for a slot until the release. Nothing can be
    // observed of its arrival at node 2 (its handler has not begun): this leaves it ample
    // time to get there, and is what it waits for a slot.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let released_at = std::time::Instant::now();
    release.add_permits(slots);
    queued.await.expect("task").expect("queued");
    for c in calls {
        c.await.expect("task").expect("block");
    }
    let seen = seen.lock().expect("log").clone();
    let (_, received, started) = seen.iter().find(|(n, _, _)| n == "queued").expect("the queued request ran");
    let received = received.expect("a handler knows when its request arrived");
    // Its handler began after the release; had it been told when it got its slot, that would
    // be after the release too.
    assert!(*started >= released_at, "the queued request began before the slots were released");
    assert!(
        received < released_at,
        "the handler was told its request arrived {:?} after the release (when it got its slot), not before",
        received.duration_since(released_at)
    );
    a.shutdown();
    b.shutdown();
}

/// Calls node 2 from `a` with a request its [`HoldDuring`] handler never answers, and waits
/// until the handler holds it (`received` reaches `n`).
async fn call_never_answered(a: &Mesh, received: &AtomicU64, n: u64) -> Call {
    let call = {
        let a = a.clone();
        tokio::spawn(async move { a.call(NodeId(2), Channel::Control, Bytes::from_static(b"during")).await })
    };
    tandem_testkit::wait::eventually("node 2 to hold the request", Duration::from_secs(20), || {
        received.load(Ordering::SeqCst) >= n
    })
    .await;
    call
}

/// Waits (20 s at most) for a call that must fail as unreachable.
async fn fails_unreachable(kind: TransportKind, call: Call, after: &str) {
    let result = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap_or_else(|_| panic!("{kind}: a caller waiting on the peer still waits after {after}"))
        .expect("task");
    assert!(matches!(result, Err(TransportError::Unreachable { peer: NodeId(2), .. })), "{kind}: {result:?}");
}

/// A peer that left the cluster is forgotten: callers still waiting on it fail at once
/// (rather than wait for a reply that may never come), the links' tasks and pipes end, and
/// both sides drop what they kept for it. The same when a peer moves to another address.
#[tokio::test]
async fn forgetting_a_peer_ends_its_links_and_fails_their_callers() {
    for kind in KINDS {
        let received = Arc::new(AtomicU64::new(0));
        let ca = Ca::new("forget");
        let (a, a_addr) = mesh(&ca.identity(NodeId(1)), kind, Arc::new(Echo)).await;
        let (b, b_addr) = mesh(&ca.identity(NodeId(2)), kind, Arc::new(HoldDuring(received.clone()))).await;
        a.set_peer_addr(NodeId(2), b_addr);
        b.set_peer_addr(NodeId(1), a_addr);
        a.call(NodeId(2), Channel::Bulk, Bytes::from_static(b"x")).await.expect("bulk call");
        let waiting = call_never_answered(&a, &received, 1).await;
        assert!(a.live_link_tasks() > 0, "{kind}: the links run tasks");
        assert_eq!(b.inbound_windows(), 2, "{kind}: node 2 keeps a window per channel node 1 used");

        a.forget_peer(NodeId(2));
        fails_unreachable(kind, waiting, "forget_peer").await;
        tandem_testkit::wait::eventually("the forgotten peer's link tasks to end", Duration::from_secs(20), || {
            a.live_link_tasks() == 0
        })
        .await;
        assert!(a.link_stats().is_empty(), "{kind}: {:?}", a.link_stats());
        b.forget_peer(NodeId(1));
        assert_eq!(b.inbound_windows(), 0, "{kind}: node 2 still keeps windows of the node it forgot");

        // Known again, it is reached afresh; moved to another address, its old links end too.
        a.set_peer_addr(NodeId(2), b_addr);
        let reply = a.call(NodeId(2), Channel::Control, Bytes::from_static(b"again")).await.expect("call again");
        assert_eq!(&reply[8..], b"again", "{kind}");
        let waiting = call_never_answered(&a, &received, 2).await;
        let nowhere = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        a.set_peer_addr(NodeId(2), nowhere);
        fails_unreachable(kind, waiting, "set_peer_addr to another address").await;
        tandem_testkit::wait::eventually("the moved peer's old link tasks to end", Duration::from_secs(20), || {
            a.live_link_tasks() == 0
        })
        .await;
        a.shutdown();
        b.shutdown();
    }
}

/// Callers waiting for room in a full window of a forgotten peer fail too, as do those whose
/// requests are in it.
#[tokio::test]
async fn forgetting_a_peer_fails_callers_waiting_for_room_in_its_window() {
    const IN_WINDOW: usize = tandem_linkcore::CHANNEL_BYTES_MAX / WEDGE_CHUNK;
    for kind in KINDS {
        let (hold, _let_go, held) = hold_bulk();
        let (a, _b) = pair(kind, Arc::new(hold)).await;
        let bulk = wedge_bulk(&a, &held, IN_WINDOW + 2).await;
        assert_eq!(bulk.iter().filter(|b| !b.is_finished()).count(), IN_WINDOW + 2, "{kind}");
        a.forget_peer(NodeId(2));
        for b in bulk {
            fails_unreachable(kind, b, "forget_peer").await;
        }
        tandem_testkit::wait::eventually("the link tasks to end", Duration::from_secs(20), || a.live_link_tasks() == 0)
            .await;
    }
}

/// A UDP relay between node 1 and node 2's QUIC endpoint that can drop every datagram both
/// ways: a network partition, as a QUIC connection sees one (datagrams lost, nothing closed).
struct UdpCut {
    /// Where node 1 reaches node 2 through the relay.
    addr: std::net::SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// Extra delay per datagram, in ms (a slow link: 1 to 2 times this, so also jitter).
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpCut {
    async fn to(target: std::net::SocketAddr) -> UdpCut {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind front");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind back");
        back.connect(target).await.expect("connect back");
        let addr = front.local_addr().expect("addr");
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (dropping, delaying) = (cut.clone(), delay_ms.clone());
        let (front, back) = (Arc::new(front), Arc::new(back));
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            let mut jitter = 0u64;
            loop {
                let (datagram, to_back) = tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        (up[..n].to_vec(), true)
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { return };
                        (down[..n].to_vec(), false)
                    }
                };
                if dropping.load(Ordering::SeqCst) {
                    continue;
                }
                let (front, back) = (front.clone(), back.clone());
                let base = delaying.load(Ordering::SeqCst);
                jitter = jitter.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let delay = Duration::from_millis(base + if base > 0 { (jitter >> 33) % base } else { 0 });
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if to_back {
                        let _ = back.send(&datagram).await;
                    } else if let Some(to) = client {
                        let _ = front.send_to(&datagram, to).await;
                    }
                });
            }
        });
        UdpCut { addr, cut, delay_ms, task }
    }

    fn set(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for UdpCut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls node 2 on the control channel every 50 ms, as Raft's heartbeats do (each given up
/// after 100 ms), and records when the last one was answered.
fn heartbeats(a: &Mesh) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Option<Instant>>>) {
    let last = Arc::new(Mutex::new(None));
    let seen = last.clone();
    let a = a.clone();
    let task = tokio::spawn(async move {
        loop {
            let call = a.call(NodeId(2), Channel::Control, Bytes::from_static(b"beat"));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), call).await {
                *seen.lock().expect("lock") = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (task, last)
}

/// The chaos suite's `partition-leader` seed 102 on QUIC: after a partition of a few seconds
/// healed, a link's pipe stayed silent for tens of seconds (QUIC's retransmission timer had
/// grown with a loaded node's round trips and backed off during the cut, or the peer had
/// dropped the connection while this side kept it), and the cut-off node lost its lease and
/// failed a host's read. A link must notice a pipe that carries nothing back and make a new
/// one: within seconds of every heal, calls are answered again.
#[tokio::test]
async fn a_link_is_answered_again_within_seconds_after_a_partition_heals() {
    const HEALED_WITHIN: Duration = Duration::from_secs(5);
    let kind = TransportKind::Quic;
    let ca = Ca::new("partition");
    let (a, _a_addr) = mesh(&ca.identity(NodeId(1)), kind, Arc::new(Echo)).await;
    let (_b, b_addr) = mesh(&ca.identity(NodeId(2)), kind, Arc::new(Echo)).await;
    let relay = UdpCut::to(b_addr).await;
    a.set_peer_addr(NodeId(2), relay.addr);
    let (beats, last) = heartbeats(&a);
    // Bulk traffic too, as a primary copying chunks has: the connection's windows are full
    // when a cut comes.
    let bulk: Vec<_> = (0..4)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move {
                loop {
                    let call = a.call(NodeId(2), Channel::Bulk, Bytes::from(vec![7u8; 1 << 20]));
                    let _ = tokio::time::timeout(Duration::from_secs(5), call).await;
                }
            })
        })
        .collect();
    tandem_testkit::wait::eventually("a first answer", Duration::from_secs(10), || {
        last.lock().expect("lock").is_some()
    })
    .await;
    let mut took = Vec::new();
    for _ in 0..2 {
        // A slow link (a loaded node's round trips, which QUIC's retransmission timer grows
        // with), then two cuts with a short heal between them, as partition-leader's schedule had.
        relay.delay_ms.store(300, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(4)).await;
        relay.delay_ms.store(0, Ordering::SeqCst);
        for _ in 0..2 {
            relay.set(true);
            tokio::time::sleep(Duration::from_secs(8)).await;
            relay.set(false);
            let heal = Instant::now();
            let deadline = heal + HEALED_WITHIN + Duration::from_secs(30);
            let answered_after = || last.lock().expect("lock").is_some_and(|t| t > heal);
            while !answered_after() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            took.push(heal.elapsed());
            eprintln!("{kind}: first answer {:?} after the heal", heal.elapsed());
        }
    }
    beats.abort();
    for t in bulk {
        t.abort();
    }
    assert!(
        took.iter().all(|t| *t <= HEALED_WITHIN),
        "{kind}: first answers {took:?} after the heals (at most {HEALED_WITHIN:?} each)"
    );
}
