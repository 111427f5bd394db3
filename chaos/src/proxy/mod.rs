//! A seeded delay/jitter proxy on a node's outgoing node-to-node traffic, TCP and UDP (QUIC),
//! inside the node's network namespace (`tc netem` is not available to the suite).
//!
//! One [`LinkProxy`] per node namespace. Its OS thread enters the namespace (`setns`) and runs a
//! current-thread tokio runtime, so every socket it makes lives there. For each peer transport
//! address it listens on a port of the node's own address; an nftables table in the namespace
//! (`tandem_proxy`) DNATs the node's packets to that peer address to the proxy's port, except the
//! proxy's own (they carry [`MARK`]). Conntrack rewrites the replies, so the node sees the peer's
//! address (a QUIC client checks it). The proxy then forwards to the real peer:
//!
//! - TCP ([`tcp`]): per connection, a connection to the peer and a pump each way; each chunk
//!   is released at `max(previous release, now + delay + jitter draw)`, so a stream keeps its
//!   order.
//! - UDP ([`udp`]): per client address a marked socket connected to the peer; each datagram
//!   (either way) goes after its own delay draw (so datagrams may be reordered), or is lost.
//!
//! The proxy is on the path from [`LinkProxy::start`] on, with a clean link, so that
//! [`LinkProxy::set`] reaches connections that exist already (conntrack would not re-NAT a
//! flow if the rule came later). The table also puts every packet of the namespace in a
//! conntrack zone of its own, so flows the node opened before the proxy started are tracked
//! afresh and NATed too (a "flush" without the conntrack tool): a TCP connection opened before
//! the start is then reset, and the node opens a new one, through the proxy. Run a proxy in
//! every node's namespace (all of them, or none): see the guard in `redirect_rules`.
//!
//! Delays apply in each direction: a round trip through a link with delay `d` takes `2d` more.
//! A Raft RPC may take one heartbeat interval (openraft's `hard_ttl`), so a cluster with
//! `tandem up`'s 100 ms heartbeat stops committing once `2d` nears it (50 ms each way did, in
//! the tests); give such runs WAN timings, as the tests do.
//! The draws are seeded ([`link::Schedule`]) but packet timing still depends on the scheduler
//! and on arrival order, so a run is reproducible in its distribution, not to the packet.

pub mod link;
mod tcp;
mod udp;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tandem_testkit::firewall::nft_load;

pub use link::Link;
use link::Schedule;

/// The nftables table (family `ip`) in the node's namespace.
pub const TABLE: &str = "tandem_proxy";
/// The `SO_MARK` of the proxy's own outgoing sockets: the redirect skips them.
pub const MARK: u32 = 0x7a1d_0001;
/// The conntrack zone the table moves the namespace's traffic into.
const CT_ZONE: u16 = 7;
/// How long the proxy thread may take to enter the namespace and bind its ports.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol of a peer's transport address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn nft(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// What a proxy has forwarded since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// TCP connections proxied (accepted and connected to the peer).
    pub tcp_connections: u64,
    /// UDP flows (client addresses) opened.
    pub udp_flows: u64,
    /// Datagrams forwarded, both ways.
    pub datagrams: u64,
    /// Payload bytes forwarded, TCP and UDP, both ways.
    pub bytes: u64,
    /// Datagrams not forwarded: lost on purpose, or over a limit.
    pub dropped: u64,
}

/// What the proxy's tasks share with its handle: the link, the draws and the counters.
pub(crate) struct Shared {
    link: Mutex<Link>,
    schedule: Mutex<Schedule>,
    tcp_connections: AtomicU64,
    udp_flows: AtomicU64,
    datagrams: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
}

impl Shared {
    fn new(seed: u64) -> Shared {
        Shared {
            link: Mutex::new(Link::default()),
            schedule: Mutex::new(Schedule::new(seed)),
            tcp_connections: AtomicU64::new(0),
            udp_flows: AtomicU64::new(0),
            datagrams: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn link(&self) -> Link {
        *self.link.lock().expect("link")
    }

    /// The delay of the next TCP chunk.
    pub(crate) fn chunk_delay(&self) -> Duration {
        let link = self.link();
        if link.jitter.is_zero() {
            return link.delay;
        }
        self.schedule.lock().expect("schedule").delay(&link)
    }

    /// The fate of the next datagram: `None` lost, else its delay.
    pub(crate) fn datagram_delay(&self) -> Option<Duration> {
        let link = self.link();
        if link.is_clean() {
            return Some(Duration::ZERO);
        }
        let mut s = self.schedule.lock().expect("schedule");
        if s.lose(&link) {
            return None;
        }
        Some(s.delay(&link))
    }

    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A delay proxy in one node's namespace; removed (table and thread) by [`LinkProxy::stop`]
/// or on drop.
pub struct LinkProxy {
    ns: String,
    shared: Arc<Shared>,
    /// Where each peer address is listened for, as `(peer, proto, listen)`.
    routes: Vec<(SocketAddr, Proto, SocketAddr)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    table_installed: bool,
}

impl LinkProxy {
    /// Starts a proxy in namespace `ns` (a name under /run/netns) for the node's traffic to
    /// each of `peers` (IPv4 transport addresses), with a clean link; draws from `seed`.
    pub fn start(ns: &str, peers: &[(SocketAddr, Proto)], seed: u64) -> anyhow::Result<LinkProxy> {
        if peers.is_empty() {
            bail!("a proxy needs at least one peer address");
        }
        if let Some((p, _)) = peers.iter().find(|(p, _)| !p.is_ipv4()) {
            bail!("peer {p} is not IPv4 (the redirect is an `ip` table)");
        }
        let ns_file = ["/run/netns", "/var/run/netns"]
            .iter()
            .find_map(|dir| File::open(format!("{dir}/{ns}")).ok())
            .ok_or_else(|| anyhow!("no network namespace {ns} under /run/netns"))?;
        let shared = Arc::new(Shared::new(seed));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel();
        let thread_shared = shared.clone();
        let thread_peers = peers.to_vec();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{ns}"))
            .spawn(move || run(ns_file, thread_peers, thread_shared, ready_tx, shutdown_rx))
            .context("spawn the proxy thread")?;
        let mut proxy = LinkProxy {
            ns: ns.to_string(),
            shared,
            routes: Vec::new(),
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            table_installed: false,
        };
        // On any error below, dropping `proxy` ends the thread.
        let listens = match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(r) => r.with_context(|| format!("proxy in {ns}"))?,
            Err(e) => bail!("the proxy thread in {ns} did not start: {e}"),
        };
        proxy.routes = peers.iter().zip(listens).map(|(&(peer, proto), listen)| (peer, proto, listen)).collect();
        proxy.table_installed = true;
        nft_load(Some(ns), &redirect_rules(&proxy.routes)).map_err(|e| {
            proxy.table_installed = false;
            anyhow!("install the redirect in {ns}: {e}")
        })?;
        Ok(proxy)
    }

    /// Changes the link from now on, for existing connections and flows too;
    /// `set(Link::default())` makes it clean again.
    pub fn set(&self, link: Link) {
        assert!(link.udp_loss_percent <= 100, "loss {}% is not a percentage", link.udp_loss_percent);
        *self.shared.link.lock().expect("link") = link;
    }

    pub fn link(&self) -> Link {
        self.shared.link()
    }

    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyStats {
            tcp_connections: get(&s.tcp_connections),
            udp_flows: get(&s.udp_flows),
            datagrams: get(&s.datagrams),
            bytes: get(&s.bytes),
            dropped: get(&s.dropped),
        }
    }

    /// `(peer, proto, listen)`: the port of the node's address that stands for each peer.
    pub fn routes(&self) -> &[(SocketAddr, Proto, SocketAddr)] {
        &self.routes
    }

    /// Removes the redirect and ends the proxy (its connections close; the node reconnects
    /// directly). Idempotent; an error says what could not be cleaned up.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        if self.table_installed {
            self.table_installed = false;
            if let Err(e) =
                tandem_testkit::netns::sh(&["ip", "netns", "exec", &self.ns, "nft", "delete", "table", "ip", TABLE])
            {
                errors.push(e);
            }
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                errors.push(format!("the proxy thread in {} panicked", self.ns));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(errors.join("; ")))
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("proxy cleanup: {e}");
        }
    }
}

/// The table: a conntrack zone of its own for every packet (see the module docs), the DNAT
/// of the node's packets to each peer address onto the proxy's port for it, and a guard that
/// drops packets opening a flow *from* a peer's transport address. With a proxy in every node's
/// namespace no node sends from its transport port to a peer's, so only a node whose proxy is
/// not installed yet does; tracked here, such a UDP flow (QUIC sends from its listening port)
/// would make this node's packets to that peer replies, which are never NATed, and they would
/// bypass the proxy for as long as the flow lives.
fn redirect_rules(routes: &[(SocketAddr, Proto, SocketAddr)]) -> String {
    let mut dnat = String::new();
    let mut guard = String::new();
    for (peer, proto, listen) in routes {
        let (ip, proto, port) = (peer.ip(), proto.nft(), peer.port());
        dnat.push_str(&format!("    meta mark != {MARK:#x} ip daddr {ip} {proto} dport {port} dnat to {listen}\n"));
        guard.push_str(&format!("    ct state new ip saddr {ip} {proto} sport {port} drop\n"));
    }
    // Declaring, deleting and defining the table in one file replaces it atomically.
    format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n  \
         chain zone_out {{\n    type filter hook output priority -300; policy accept;\n    ct zone set {CT_ZONE}\n  }}\n  \
         chain zone_in {{\n    type filter hook prerouting priority -300; policy accept;\n    ct zone set {CT_ZONE}\n  }}\n  \
         chain to_proxy {{\n    type nat hook output priority -100; policy accept;\n{dnat}  }}\n  \
         chain new_from_peers {{\n    type filter hook input priority 0; policy accept;\n{guard}  }}\n}}\n"
    )
}

/// The proxy thread: enters the namespace, binds a listener per peer (reported on `ready`),
/// and serves until `shutdown`.
fn run(
    ns_file: File,
    peers: Vec<(SocketAddr, Proto)>,
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<anyhow::Result<Vec<SocketAddr>>>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let setup = || -> anyhow::Result<tokio::runtime::Runtime> {
        nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        drop(ns_file);
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")
    };
    let rt = match setup() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let bound = async {
            let local_ip = local_ip(peers[0].0)?;
            let mut listens = Vec::new();
            for &(peer, proto) in &peers {
                let listen = match proto {
                    Proto::Tcp => tcp::listen(local_ip, peer, shared.clone()).await?,
                    Proto::Udp => udp::listen(local_ip, peer, shared.clone()).await?,
                };
                listens.push(listen);
            }
            anyhow::Ok(listens)
        };
        match bound.await {
            Ok(listens) => {
                if ready.send(Ok(listens)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
        let _ = shutdown.await;
    });
    // Dropping the runtime cancels every task and closes every socket.
}

/// This namespace's address towards `peer` (the node's own address on the bridge).
fn local_ip(peer: SocketAddr) -> anyhow::Result<Ipv4Addr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").context("bind a probe socket")?;
    probe.connect(peer).with_context(|| format!("no route to {peer}"))?;
    match probe.local_addr()?.ip() {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(ip) => bail!("local address {ip} is not IPv4"),
    }
}

/// Marks a socket as the proxy's own, so the redirect lets it through.
fn mark(fd: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::Mark, &MARK).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_redirect_each_peer_address_except_the_proxys_own() {
        let routes = [
            ("10.1.2.2:7000".parse().unwrap(), Proto::Tcp, "10.1.2.1:40000".parse().unwrap()),
            ("10.1.2.2:7000".parse().unwrap(), Proto::Udp, "10.1.2.1:40001".parse().unwrap()),
        ];
        let rules = redirect_rules(&routes);
        assert!(rules.contains("meta mark != 0x7a1d0001 ip daddr 10.1.2.2 tcp dport 7000 dnat to 10.1.2.1:40000\n"));
        assert!(rules.contains("meta mark != 0x7a1d0001 ip daddr 10.1.2.2 udp dport 7000 dnat to 10.1.2.1:40001\n"));
        assert!(rules.contains("ct state new ip saddr 10.1.2.2 udp sport 7000 drop\n"));
        assert!(rules.starts_with("table ip tandem_proxy\ndelete table ip tandem_proxy\n"));
    }
}
