//! The cluster under test and what the nemeses and workloads ask of it: nodes in network
//! namespaces of their own on a bridge (the test kit's [`Cluster`]), the volume and host the
//! workloads use, the fault rules on the bridge, and which nodes a fault touches right now
//! (a host error from a node no fault touches is a failure of its own). In a run with a
//! power-loss nemesis each node's data dir is a [`LazyFs`] mount, unmounted when the world
//! drops, after its nodes are stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Context};
use nix::sys::signal::Signal;
use serde_json::Value;
use tandem_testkit::firewall::nft_load;
use tandem_testkit::process::signal;
use tandem_testkit::Cluster;

use crate::lazyfs::{LazyFs, PowerCut};
use crate::proxy::{Link, LinkProxy, Proto};

/// The nftables table in the bridge namespace that holds the nemeses' rules.
const TABLE: &str = "tandem_chaos";
/// One API request of the harness gives up after this long (a stopped node must not stall it).
const API_TIMEOUT: Duration = Duration::from_secs(3);

/// What a node without failpoints is, in the error that says so (`--all` skips on it).
pub const NOT_A_FAILPOINTS_BUILD: &str = "it is not a failpoints build";

/// A rule on the bridge, between node addresses (the harness itself is never cut off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetRule {
    /// Every packet between a node of `a` and a node of `b`, both ways.
    Cut(Vec<u64>, Vec<u64>),
    /// Packets from `from` to `to` only (a one-way blackhole).
    OneWay(Vec<u64>, Vec<u64>),
    /// `percent` of the packets to and from `node` (from and to other nodes), at random.
    Loss(u64, u8),
}

#[derive(Default)]
struct Faults {
    rules: Vec<(u64, NetRule)>,
    next_rule: u64,
    /// Nodes that are down (killed, not yet restarted) or stopped (SIGSTOP).
    down: BTreeSet<u64>,
    /// Each fault's nodes it touches, by fault id.
    touched: Vec<(u64, Vec<u64>)>,
}

pub struct World {
    /// The delay proxies on the node-to-node paths, by node (only in runs with `slow-link`);
    /// declared first so they go before the cluster's namespaces do.
    proxies: Mutex<BTreeMap<u64, LinkProxy>>,
    pub cluster: Cluster,
    pub nodes: Vec<u64>,
    pub volume: String,
    pub volume_id: u64,
    pub volume_bytes: u64,
    pub host: String,
    faults: Mutex<Faults>,
    /// Each node's data dir layer, in a run with a power-loss nemesis (else empty).
    power: Vec<(u64, LazyFs)>,
}

/// What a power cut of some nodes dropped, for the fault's description.
#[derive(Debug, Default)]
pub struct CutReport {
    pub files: u64,
    pub bytes_lost: u64,
    pub bytes_kept: u64,
}

impl std::fmt::Display for CutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} KiB unsynced dropped in {} files", self.bytes_lost >> 10, self.files)?;
        if self.bytes_kept > 0 {
            write!(f, ", {} KiB kept (torn)", self.bytes_kept >> 10)?;
        }
        Ok(())
    }
}

impl World {
    /// `power`: the data dir layers of the nodes, when the run cuts power.
    pub fn new(
        cluster: Cluster,
        volume: String,
        volume_id: u64,
        volume_bytes: u64,
        host: String,
        power: Vec<(u64, LazyFs)>,
    ) -> World {
        let nodes = cluster.member_ids();
        World {
            proxies: Mutex::new(BTreeMap::new()),
            cluster,
            nodes,
            volume,
            volume_id,
            volume_bytes,
            host,
            faults: Mutex::new(Faults::default()),
            power,
        }
    }

    /// Puts a delay proxy (clean to begin with) on every node's path to the others' transport
    /// addresses, TCP and UDP; [`World::set_link`] then slows one node's links.
    pub fn start_proxies(&self, seed: u64) -> anyhow::Result<()> {
        let net = self.cluster.try_network().context("the cluster does not run in namespaces")?;
        let addr = |id: u64| -> anyhow::Result<SocketAddr> {
            let a = self.cluster.node_config(id)["raft_addr"].as_str().map(str::to_string);
            a.context("raft_addr")?.parse().with_context(|| format!("node {id}'s raft_addr"))
        };
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        for &id in &self.nodes {
            let mut peers = Vec::new();
            for &other in self.nodes.iter().filter(|&&o| o != id) {
                let a = addr(other)?;
                peers.extend([(a, Proto::Tcp), (a, Proto::Udp)]);
            }
            proxies.insert(id, LinkProxy::start(&net.ns(id), &peers, seed ^ id)?);
        }
        Ok(())
    }

    /// Sets the link of node `id`'s outgoing node-to-node traffic (replies to it come back
    /// through the same proxy, so both directions feel it); `Link::default()` cleans it.
    pub fn set_link(&self, id: u64, link: Link) -> anyhow::Result<()> {
        let proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        proxies.get(&id).context("no delay proxy in this run (the scenario has no slow-link)")?.set(link);
        Ok(())
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn nbd_addr(&self, id: u64) -> SocketAddr {
        self.cluster.nbd_addr(id)
    }

    pub fn api(&self, id: u64) -> String {
        self.cluster.api(id)
    }

    /// An HTTP client with the cluster's admin token and `timeout`.
    pub fn http(&self, timeout: std::time::Duration) -> reqwest::blocking::Client {
        tandem_testkit::http_as_within(self.cluster.admin_token().as_deref(), timeout)
    }

    fn client(&self) -> reqwest::blocking::Client {
        self.http(API_TIMEOUT)
    }

    /// `GET path` of node `id`, if it answers with success.
    pub fn get(&self, id: u64, path: &str) -> Option<Value> {
        let resp = self.client().get(format!("{}{path}", self.api(id))).send().ok()?;
        resp.status().is_success().then(|| resp.json().ok()).flatten()
    }

    /// Nodes that are neither killed nor stopped, those no fault touches first (a node cut
    /// off answers a linearizable read only after a timeout).
    pub fn running(&self) -> Vec<u64> {
        let f = self.faults();
        let touched = |n: &u64| f.touched.iter().any(|(_, t)| t.contains(n));
        let up = self.nodes.iter().copied().filter(|n| !f.down.contains(n));
        let (mut clear, cut): (Vec<u64>, Vec<u64>) = up.partition(|n| !touched(n));
        clear.extend(cut);
        clear
    }

    /// The Raft leader as the first running node that knows one says.
    pub fn leader(&self) -> Option<u64> {
        self.running().into_iter().find_map(|n| self.get(n, "/v1/cluster")?["raft"]["leader"].as_u64())
    }

    /// The volume's record (primary, epoch, ISR), read linearizably through a running node.
    pub fn volume_record(&self) -> Option<Value> {
        let path = format!("/v1/volumes/{}", self.volume);
        self.running().into_iter().find_map(|n| self.get(n, &path))
    }

    /// A list of node ids of the volume's record (`isr`, `replicas`), if the record can be read.
    pub fn volume_nodes(&self, field: &str) -> Option<Vec<u64>> {
        self.volume_record().and_then(|v| node_ids(&v[field]))
    }

    pub fn primary(&self) -> Option<u64> {
        self.volume_record()?["primary"].as_u64()
    }

    /// Remembers that fault `fault` touches `nodes` (a host error from them is expected).
    pub fn touch(&self, fault: u64, nodes: Vec<u64>) {
        self.faults().touched.push((fault, nodes));
    }

    pub fn untouch(&self, fault: u64) {
        self.faults().touched.retain(|(f, _)| *f != fault);
    }

    /// Whether a fault touches node `id` right now.
    pub fn touched(&self, id: u64) -> bool {
        let f = self.faults();
        f.down.contains(&id) || f.touched.iter().any(|(_, n)| n.contains(&id))
    }

    /// Whether any fault is in place.
    pub fn any_fault(&self) -> bool {
        let f = self.faults();
        !f.down.is_empty() || !f.touched.is_empty() || !f.rules.is_empty()
    }

    /// `kill -9` of node `id`; returns once it is gone.
    pub fn kill(&self, id: u64) -> anyhow::Result<()> {
        self.faults().down.insert(id);
        self.cluster.try_kill(id).map_err(|e| anyhow!("kill node {id}: {e}"))
    }

    /// A power cut of `ids` at once: SIGKILL to every one of them before any is reaped (so none
    /// syncs after another is gone), then their layers drop every write not yet fsynced (a
    /// torn cut keeps a seeded half of the pages). They stay down until restarted.
    pub fn power_cut(&self, ids: &[u64], torn: Option<u64>) -> anyhow::Result<CutReport> {
        anyhow::ensure!(!self.power.is_empty(), "this run has no lazyfs layers (no power nemesis in the scenario)");
        {
            let mut f = self.faults();
            f.down.extend(ids.iter().copied());
        }
        for &id in ids {
            if let Ok(pid) = self.cluster.try_pid(id) {
                let _ = signal(pid, Signal::SIGKILL);
            }
        }
        for &id in ids {
            if self.cluster.try_pid(id).is_ok() {
                self.cluster.try_kill(id).map_err(|e| anyhow!("kill node {id}: {e}"))?;
            }
        }
        let mut report = CutReport::default();
        for &id in ids {
            let fs = self.power.iter().find(|(n, _)| *n == id).map(|(_, fs)| fs);
            let fs = fs.ok_or_else(|| anyhow!("node {id} has no lazyfs layer"))?;
            let cut: PowerCut = match torn {
                Some(seed) => fs.power_cut_torn(seed ^ id),
                None => fs.power_cut(),
            };
            report.files += cut.files;
            report.bytes_lost += cut.bytes_lost;
            report.bytes_kept += cut.bytes_kept;
        }
        Ok(report)
    }

    /// Starts node `id` again if it is down, and waits for its API.
    pub fn restart_node(&self, id: u64) -> anyhow::Result<()> {
        self.cluster.try_start_node(id).map_err(|e| anyhow!("restart node {id}: {e}"))?;
        self.faults().down.remove(&id);
        Ok(())
    }

    /// Starts every killed node again and waits for their APIs.
    pub fn restart_killed(&self) -> anyhow::Result<()> {
        self.cluster.try_restart_missing().map_err(|e| anyhow!("restart: {e}"))?;
        let mut f = self.faults();
        let running: Vec<u64> = f.down.iter().copied().filter(|&n| self.cluster.try_pid(n).is_ok()).collect();
        for n in running {
            f.down.remove(&n);
        }
        Ok(())
    }

    /// Node `id` is being removed from the cluster (its process stopped, its data wiped): down
    /// until [`World::rejoined`].
    pub fn retired(&self, id: u64) {
        self.faults().down.insert(id);
    }

    /// Node `id` is a member again, with a process of its own.
    pub fn rejoined(&self, id: u64) {
        self.faults().down.remove(&id);
    }

    /// SIGSTOP of node `id` (a VM stun, a long stall).
    pub fn pause(&self, id: u64) -> anyhow::Result<()> {
        let pid = self.cluster.try_pid(id).map_err(|e| anyhow!("{e}"))?;
        self.faults().down.insert(id);
        signal(pid, Signal::SIGSTOP).map_err(|e| anyhow!("pause node {id}: {e}"))
    }

    pub fn resume(&self, id: u64) -> anyhow::Result<()> {
        let pid = self.cluster.try_pid(id).map_err(|e| anyhow!("{e}"))?;
        signal(pid, Signal::SIGCONT).map_err(|e| anyhow!("resume node {id}: {e}"))?;
        self.faults().down.remove(&id);
        Ok(())
    }

    /// Adds a rule on the bridge; its id for [`World::remove_rule`].
    pub fn add_rule(&self, rule: NetRule) -> anyhow::Result<u64> {
        let mut f = self.faults();
        let id = f.next_rule;
        f.next_rule += 1;
        f.rules.push((id, rule));
        self.install(&f.rules)?;
        Ok(id)
    }

    pub fn remove_rule(&self, id: u64) -> anyhow::Result<()> {
        let mut f = self.faults();
        f.rules.retain(|(r, _)| *r != id);
        self.install(&f.rules)
    }

    fn install(&self, rules: &[(u64, NetRule)]) -> anyhow::Result<()> {
        let net = self.cluster.try_network().context("the cluster does not run in namespaces")?;
        let set = |ids: &[u64]| ids.iter().map(|&n| net.ip(n).to_string()).collect::<Vec<_>>().join(", ");
        let mut body = String::new();
        for (_, r) in rules {
            match r {
                NetRule::Cut(a, b) => {
                    body += &format!("    ip saddr {{ {} }} ip daddr {{ {} }} drop\n", set(a), set(b));
                    body += &format!("    ip saddr {{ {} }} ip daddr {{ {} }} drop\n", set(b), set(a));
                }
                NetRule::OneWay(a, b) => {
                    body += &format!("    ip saddr {{ {} }} ip daddr {{ {} }} drop\n", set(a), set(b))
                }
                NetRule::Loss(n, pct) => {
                    let others: Vec<u64> = self.nodes.iter().copied().filter(|o| o != n).collect();
                    let (me, them) = (set(&[*n]), set(&others));
                    body += &format!("    ip saddr {me} ip daddr {{ {them} }} numgen random mod 100 < {pct} drop\n");
                    body += &format!("    ip saddr {{ {them} }} ip daddr {me} numgen random mod 100 < {pct} drop\n");
                }
            }
        }
        // Declaring, deleting and defining the table in one file replaces it atomically.
        let rules = format!(
            "table bridge {TABLE}\ndelete table bridge {TABLE}\ntable bridge {TABLE} {{\n  chain faults {{\n    \
             type filter hook forward priority -10; policy accept;\n{body}  }}\n}}\n"
        );
        nft_load(Some(&net.bridge_ns()), &rules).map_err(|e| anyhow!("{e}"))
    }

    /// Resets every TCP connection from node `id` to the other nodes while the returned rule is
    /// in place (an nftables `reject with tcp reset` in the node's own namespace).
    pub fn tcp_reset(&self, id: u64, on: bool) -> anyhow::Result<()> {
        let net = self.cluster.try_network().context("the cluster does not run in namespaces")?;
        let ns = net.ns(id);
        let table = "tandem_chaos_rst";
        if !on {
            return nft_load(Some(&ns), &format!("table inet {table}\ndelete table inet {table}\n"))
                .map_err(|e| anyhow!("{e}"));
        }
        let others: Vec<String> = self.nodes.iter().filter(|&&n| n != id).map(|&n| net.ip(n).to_string()).collect();
        let rules = format!(
            "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n  chain out {{\n    \
             type filter hook output priority 0; policy accept;\n    ip daddr {{ {} }} meta l4proto tcp reject with tcp reset\n  }}\n  \
             chain in {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {{ {} }} meta l4proto tcp reject with tcp reset\n  }}\n}}\n",
            others.join(", "),
            others.join(", ")
        );
        nft_load(Some(&ns), &rules).map_err(|e| anyhow!("{e}"))
    }

    /// Removes every rule on the bridge and in the nodes, continues every stopped node and
    /// starts every killed one.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        let stopped: Vec<u64> = {
            let mut f = self.faults();
            f.rules.clear();
            f.touched.clear();
            f.down.iter().copied().collect()
        };
        self.install(&[])?;
        for &n in &self.nodes {
            let _ = self.tcp_reset(n, false);
        }
        for p in self.proxies.lock().unwrap_or_else(|p| p.into_inner()).values() {
            p.set(Link::default());
        }
        for n in stopped {
            if let Ok(pid) = self.cluster.try_pid(n) {
                let _ = signal(pid, Signal::SIGCONT);
            }
        }
        self.restart_killed()?;
        self.faults().down.clear();
        Ok(())
    }

    /// Sets failpoint `name` of node `id` to `actions` (`off` clears it) through
    /// `PUT /v1/debug/failpoints/{name}`. Only a `failpoints` build has that route: a node that
    /// answers 404 without naming the failpoint has none, and the error says which build to run.
    pub fn set_failpoint(&self, id: u64, name: &str, actions: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/debug/failpoints/{name}", self.api(id));
        let resp = self
            .client()
            .put(&url)
            .json(&serde_json::json!({ "actions": actions }))
            .send()
            .map_err(|e| anyhow!("set failpoint {name}={actions} on node {id}: {e}"))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().unwrap_or_default();
        if status == reqwest::StatusCode::NOT_FOUND && !body.contains("no failpoint named") {
            return Err(anyhow!(
                "node {id} answers 404 on /v1/debug/failpoints: {NOT_A_FAILPOINTS_BUILD}; run the chaos suite with \
                 --exe pointing at one (cargo build -p tandem --features failpoints,chaos-bugs)"
            ));
        }
        Err(anyhow!("set failpoint {name}={actions} on node {id}: {status} {body}"))
    }

    /// Whether node `id`'s process is alive (not killed, not crashed).
    pub fn alive(&self, id: u64) -> bool {
        self.cluster.try_pid(id).is_ok_and(tandem_testkit::process::alive)
    }

    /// Node `id` ended on its own (a failpoint's crash): counts as down until restarted.
    pub fn crashed(&self, id: u64) {
        self.faults().down.insert(id);
    }

    /// `PUT /v1/transport` through a running node.
    pub fn set_transport(&self, layer: &str, kind: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({ "transport": kind, "layer": layer });
        let mut last = String::new();
        for n in self.running() {
            match self.client().put(format!("{}/v1/transport", self.api(n))).json(&body).send() {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = format!("node {n}: {} {}", r.status(), r.text().unwrap_or_default()),
                Err(e) => last = format!("node {n}: {e}"),
            }
        }
        Err(anyhow!("switch {layer} to {kind}: {last}"))
    }
}

impl Drop for World {
    /// The layers go after the nodes that use them (an unmount under a running node would wait
    /// for it), before the cluster removes its dir.
    fn drop(&mut self) {
        if self.power.is_empty() {
            return;
        }
        if let Err(e) = self.cluster.try_down() {
            eprintln!("stop the nodes before unmounting their layers: {e}");
        }
        for (id, fs) in self.power.drain(..) {
            if let Err(e) = fs.unmount() {
                eprintln!("unmount node {id}'s lazyfs: {e:#}");
            }
        }
    }
}

/// The node ids of a JSON array, if it is one.
pub fn node_ids(v: &Value) -> Option<Vec<u64>> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect())
}
