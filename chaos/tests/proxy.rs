//! The delay proxy against real sockets in network namespaces of the test's own (root only):
//! echo servers in one namespace, clients in another, the proxy on the client's side; then
//! real clusters (QUIC and TCP) with a proxy in every node's namespace and 50 ms on each link.
//!
//! Timing assertions are lower bounds (a delay is never shorter than asked); the only upper
//! bounds are several seconds wide.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tandem_chaos::proxy::{Link, LinkProxy, Proto};
use tandem_testkit::netns::{sh, Network};
use tandem_testkit::{create_served_volume, random_bytes, wait_for, Cluster, NbdClient};

const SEED: u64 = 0x5eed_0001;
/// The delay that a round trip must clearly exceed, and which "back to clean" must clearly
/// undercut, with room for a slow machine on either side.
const LONG_DELAY: Duration = Duration::from_millis(1500);

/// Runs `f` on a thread inside namespace `ns`; sockets it makes stay in `ns` wherever they
/// are used afterwards.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("namespace file");
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in namespace")
    })
}

/// A TCP echo server in `ns` on `ip`; its address. Runs until the process ends (its
/// namespace goes with the network).
fn tcp_echo(ns: &str, ip: std::net::Ipv4Addr) -> SocketAddr {
    let listener = in_ns(ns, || TcpListener::bind((ip, 0)).expect("bind echo"));
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn udp_echo(ns: &str, ip: std::net::Ipv4Addr) -> SocketAddr {
    let socket = in_ns(ns, || UdpSocket::bind((ip, 0)).expect("bind echo"));
    let addr = socket.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    addr
}

/// One small round trip on `conn`.
fn tcp_ping(conn: &mut TcpStream) -> Duration {
    let start = Instant::now();
    conn.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");
    start.elapsed()
}

/// One datagram round trip, or `None` if nothing came back within 5 s.
fn udp_ping(socket: &UdpSocket, n: u32) -> Option<Duration> {
    let start = Instant::now();
    let msg = n.to_be_bytes();
    socket.send(&msg).expect("send");
    let mut buf = [0u8; 16];
    loop {
        socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        match socket.recv(&mut buf) {
            // A late echo of an earlier, delayed ping.
            Ok(4) if buf[..4] != msg => continue,
            Ok(k) => {
                assert_eq!(&buf[..k], &msg);
                return Some(start.elapsed());
            }
            Err(_) => return None,
        }
    }
}

fn table_present(ns: &str) -> bool {
    sh(&["ip", "netns", "exec", ns, "nft", "list", "table", "ip", tandem_chaos::proxy::TABLE]).is_ok()
}

fn delay(ms: u64) -> Link {
    Link { delay: Duration::from_millis(ms), ..Link::default() }
}

#[test]
fn tcp_through_the_proxy_keeps_the_stream_and_feels_the_delay() {
    let net = Network::build(&[1, 2], 1);
    let echo = tcp_echo(&net.ns(2), net.ip(2));
    let mut proxy = LinkProxy::start(&net.ns(1), &[(echo, Proto::Tcp)], SEED).expect("start the proxy");
    assert!(table_present(&net.ns(1)));

    // Opened on a clean link, before any delay: it must feel the delay later.
    let mut conn = in_ns(&net.ns(1), || TcpStream::connect(echo).expect("connect through the proxy"));
    conn.set_nodelay(true).expect("nodelay");
    conn.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let clean = tcp_ping(&mut conn);
    println!("clean round trip {clean:?}");

    // Data arrives intact and in order, also with jitter (chunks drawing shorter delays wait).
    for (i, link) in [
        Link::default(),
        Link { delay: Duration::from_millis(5), jitter: Duration::from_millis(20), udp_loss_percent: 0 },
    ]
    .into_iter()
    .enumerate()
    {
        proxy.set(link);
        let data = random_bytes(SEED + i as u64, 2 << 20);
        let mut writer = conn.try_clone().expect("clone");
        let sent = data.clone();
        let t = std::thread::spawn(move || {
            for piece in sent.chunks(3000) {
                writer.write_all(piece).expect("write");
            }
        });
        let mut got = vec![0u8; data.len()];
        conn.read_exact(&mut got).expect("read the echo");
        t.join().expect("writer");
        assert!(got == data, "the echo of 2 MiB differs with {link:?}");
    }

    proxy.set(delay(200));
    let slow = tcp_ping(&mut conn);
    println!("round trip with 200 ms each way: {slow:?}");
    assert!(slow >= Duration::from_millis(400), "200 ms each way, yet a round trip of {slow:?}");

    proxy.set(Link { delay: LONG_DELAY, ..Link::default() });
    let long = tcp_ping(&mut conn);
    assert!(long >= 2 * LONG_DELAY, "{long:?}");
    proxy.set(Link::default());
    let back = (0..5).map(|_| tcp_ping(&mut conn)).min().expect("pings");
    println!("round trip back on a clean link: {back:?}");
    assert!(back < 2 * LONG_DELAY, "the link is clean again, yet a round trip takes {back:?}");

    let stats = proxy.stats();
    println!("{stats:?}");
    assert_eq!(stats.tcp_connections, 1);
    assert!(stats.bytes >= 2 * 2 * (2 << 20), "{stats:?}");

    proxy.stop().expect("stop");
    proxy.stop().expect("stop again");
    assert!(!table_present(&net.ns(1)), "the table is gone after stop");
    // The node reaches the peer directly again.
    let mut direct = in_ns(&net.ns(1), || TcpStream::connect(echo).expect("connect directly"));
    direct.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    tcp_ping(&mut direct);
}

#[test]
fn udp_through_the_proxy_feels_delay_and_loss() {
    let net = Network::build(&[1, 2], 2);
    let echo = udp_echo(&net.ns(2), net.ip(2));
    let proxy = LinkProxy::start(&net.ns(1), &[(echo, Proto::Udp)], SEED).expect("start the proxy");
    // A connected socket only takes datagrams from the echo's address: conntrack must make
    // the proxy's replies look like the peer's.
    let socket = in_ns(&net.ns(1), || {
        let s = UdpSocket::bind((net.ip(1), 0)).expect("bind");
        s.connect(echo).expect("connect");
        s
    });
    for n in 0..50 {
        udp_ping(&socket, n).unwrap_or_else(|| panic!("ping {n} lost on a clean link: {:?}", proxy.stats()));
    }

    proxy.set(delay(200));
    let slow = udp_ping(&socket, 100).expect("a delayed ping comes back");
    println!("round trip with 200 ms each way: {slow:?}");
    assert!(slow >= Duration::from_millis(400), "{slow:?}");

    proxy.set(Link { udp_loss_percent: 100, ..Link::default() });
    let dropped = proxy.stats().dropped;
    assert_eq!(udp_ping(&socket, 200), None, "everything is lost");
    assert!(proxy.stats().dropped > dropped);

    // Half lost each way: about a quarter come back.
    proxy.set(Link { udp_loss_percent: 50, ..Link::default() });
    let mut back = 0;
    for n in 300..340 {
        socket.send(&(n as u32).to_be_bytes()).expect("send");
    }
    socket.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let mut buf = [0u8; 16];
    while socket.recv(&mut buf).is_ok() {
        back += 1;
    }
    println!("50% loss each way: {back} of 40 came back");
    assert!(back > 0 && back < 40, "{back} of 40");

    proxy.set(Link { delay: LONG_DELAY, ..Link::default() });
    let long = udp_ping(&socket, 400).expect("a delayed ping comes back");
    assert!(long >= 2 * LONG_DELAY, "{long:?}");
    proxy.set(Link::default());
    let back = (500..505).filter_map(|n| udp_ping(&socket, n)).min().expect("pings on a clean link");
    assert!(back < 2 * LONG_DELAY, "the link is clean again, yet a round trip takes {back:?}");

    let stats = proxy.stats();
    println!("{stats:?}");
    assert_eq!(stats.udp_flows, 1);
    assert!(stats.datagrams >= 100 && stats.dropped > 0, "{stats:?}");
    drop(proxy);
    assert!(!table_present(&net.ns(1)), "the table is gone after drop");
}

/// Raft timings for a link with 50 ms each way (a 100 ms round trip): a Raft RPC may take
/// one heartbeat interval (openraft's `hard_ttl`), and `tandem up`'s local 100 ms would not do
/// (as cluster-config/five-node-two-site.toml gives elections room for the inter-site trip).
fn wan_timings(config: &str) -> String {
    let timings =
        [("heartbeat_interval_ms", 400), ("election_timeout_min_ms", 2000), ("election_timeout_max_ms", 4000)];
    let mut out = String::new();
    for line in config.lines() {
        match timings.iter().find(|(key, _)| line.trim_start().starts_with(&format!("{key} "))) {
            Some((key, value)) => out.push_str(&format!("{key} = {value}\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (key, _) in timings {
        assert!(out.contains(&format!("{key} = ")), "cluster.toml has no {key}:\n{config}");
    }
    out
}

/// Every node's transport address (TCP and UDP on `raft_addr`).
fn transport_addrs(c: &Cluster) -> Vec<(u64, SocketAddr)> {
    c.node_ids()
        .into_iter()
        .map(|id| (id, c.node_config(id)["raft_addr"].as_str().expect("raft_addr").parse().expect("address")))
        .collect()
}

fn cluster_serves_through_delayed_links(transport: &str, tag: u32) {
    let c = Cluster::builder()
        .nodes(3)
        .transport(transport)
        .prefix("tandem-proxy-")
        .edit_config(wan_timings)
        .in_namespaces(tag)
        .start()
        .expect("cluster");
    let nodes = transport_addrs(&c);
    let ids: Vec<u64> = nodes.iter().map(|(id, _)| *id).collect();
    let net_ns: Vec<String> = ids
        .iter()
        .map(|&id| {
            // The cluster's network names node `id`'s namespace; find it by the node's address.
            let ip = nodes.iter().find(|(n, _)| *n == id).expect("node").1.ip();
            find_ns_with(ip)
        })
        .collect();
    let mut proxies = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let peers: Vec<(SocketAddr, Proto)> =
            nodes.iter().filter(|(n, _)| *n != id).flat_map(|(_, a)| [(*a, Proto::Tcp), (*a, Proto::Udp)]).collect();
        proxies.push(LinkProxy::start(&net_ns[i], &peers, SEED + id).expect("proxy"));
    }
    // A clean link through the proxies first: the cluster serves as it did without them.
    let leader = c.agreed_leader(&ids, Duration::from_secs(60));
    println!("[{transport}] leader {leader}, proxies on the path with clean links");
    write_and_check(&c, transport, &ids, "clean", 0, Duration::ZERO);
    let before: Vec<_> = proxies.iter().map(LinkProxy::stats).collect();

    for p in &proxies {
        p.set(delay(50));
    }
    let leader = c.agreed_leader(&ids, Duration::from_secs(60));
    println!("[{transport}] leader {leader} with 50 ms each way on every link");
    let round_trip = Duration::from_millis(100);
    write_and_check(&c, transport, &ids, "clean", 4 << 20, round_trip);
    write_and_check(&c, transport, &ids, "delayed", 0, round_trip);
    for (i, p) in proxies.iter().enumerate() {
        let s = p.stats();
        println!("[{transport}] node {}'s proxy: {s:?}", ids[i]);
        assert!(s.bytes > before[i].bytes, "node {}'s proxy forwarded nothing with the delay: {s:?}", ids[i]);
        match transport {
            "quic" => assert!(s.datagrams > before[i].datagrams && s.udp_flows > 0, "{s:?}"),
            _ => assert!(s.tcp_connections > 0, "{s:?}"),
        }
    }
    for mut p in proxies {
        p.stop().expect("stop the proxy");
    }
    c.stop().expect("stop the cluster");
}

/// Writes 1 MiB at `offset` of volume `name` (created if new) through its primary, reads it
/// back, and waits until every node's copy has one digest (replication crossed the proxies).
/// With `round_trip_min`, the write must take at least that long (a durable write waits for a
/// replica's acknowledgement, one round trip over a delayed link).
fn write_and_check(c: &Cluster, transport: &str, ids: &[u64], name: &str, offset: u64, round_trip_min: Duration) {
    let v = match tandem_testkit::volume(c, 1, name) {
        Some(v) => v,
        None => create_served_volume(c, name, "16M"),
    };
    let primary = v["primary"].as_u64().expect("primary");
    let data = random_bytes(SEED + offset, 1 << 20);
    let mut nbd = NbdClient::connect(c.nbd_addr(primary), name, Duration::from_secs(30)).expect("nbd connect");
    let start = Instant::now();
    nbd.write(offset, &data).expect("write through the primary");
    nbd.flush().expect("flush");
    let took = start.elapsed();
    println!("[{transport}] {name}: 1 MiB at {offset} written and flushed in {took:?}");
    assert!(took >= round_trip_min, "{name}: a write took {took:?}, less than a round trip ({round_trip_min:?})");
    assert!(nbd.read(offset, data.len()).expect("read back") == data, "{name}: read back differs");
    nbd.disconnect();
    wait_for(&format!("every node to hold {name}'s data"), Duration::from_secs(60), || {
        let digests: Vec<Option<String>> = ids.iter().map(|&id| tandem_testkit::digest(c, id, name)).collect();
        (digests.iter().all(Option::is_some) && digests.windows(2).all(|w| w[0] == w[1])).then_some(())
    });
}

/// The namespace (of this test process) in which `ip` is configured.
fn find_ns_with(ip: std::net::IpAddr) -> String {
    let list = sh(&["ip", "netns", "list"]).expect("ip netns list");
    // The test kit's namespaces are `tdmnet<pid>x<tag>-n<id>` (its Cluster keeps its Network).
    let me = format!("tdmnet{}x", std::process::id());
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if !name.starts_with(&me) {
            continue;
        }
        if let Ok(addrs) = sh(&["ip", "-n", name, "-4", "-o", "addr", "show"]) {
            if addrs.contains(&format!("inet {ip}/")) {
                return name.to_string();
            }
        }
    }
    panic!("no namespace of this test holds {ip}");
}

#[test]
fn a_quic_cluster_serves_through_delayed_links() {
    cluster_serves_through_delayed_links("quic", 3);
}

#[test]
fn a_tcp_cluster_serves_through_delayed_links() {
    cluster_serves_through_delayed_links("tcp", 4);
}

#[test]
fn a_proxy_that_cannot_start_says_why() {
    let peer: SocketAddr = "10.213.0.2:7000".parse().expect("addr");
    let err = |r: anyhow::Result<LinkProxy>| format!("{:#}", r.err().expect("an error"));
    assert!(err(LinkProxy::start("tdmnet-no-such-ns", &[(peer, Proto::Tcp)], SEED)).contains("no network namespace"));
    assert!(err(LinkProxy::start("tdmnet-no-such-ns", &[], SEED)).contains("at least one peer"));
    let v6: SocketAddr = "[fd00::2]:7000".parse().expect("addr");
    assert!(err(LinkProxy::start("tdmnet-no-such-ns", &[(v6, Proto::Udp)], SEED)).contains("not IPv4"));
}
