//! A network of its own for a cluster: one network namespace per node (`<p>-n<id>`, address
//! `10.213.B.<id>/24` on `eth0`), joined by a Linux bridge in a namespace of its own (`<p>-br`),
//! plus a veth from the test's own namespace to that bridge (10.213.B.254), so the test talks
//! to every node directly, a cut-off one included. Cuts are an nftables `bridge` table in the
//! bridge namespace ([`crate::firewall::bridge_cut`]); healing deletes it. Everything is
//! removed on drop, and what a killed earlier run left behind is removed on the next build.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::firewall::{bridge_cut, nft_load, CUT_TABLE};
use crate::tools::require_tools;

/// The 10.213.0.0/16 range the network's /24 is taken from.
const NET_A: u8 = 213;
const NS_PREFIX: &str = "tdmnet";
/// The test's own address in the /24.
const HOST_OCTET: u8 = 254;

/// Runs a system command; its stdout, or what went wrong.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn must(args: &[&str]) -> String {
    sh(args).unwrap_or_else(|e| panic!("{e}"))
}

/// The namespaces, links and cut table of one cluster.
pub struct Network {
    prefix: String,
    subnet: u8,
    host_if: String,
    host_if_made: bool,
    namespaces: Vec<String>,
    /// The cuts in place (a Mutex so that a shared cluster can cut and heal).
    cuts: std::sync::Mutex<Vec<(Vec<u64>, Vec<u64>)>>,
}

impl Network {
    /// Builds the namespaces and links for nodes `ids` (nothing runs in them yet). `tag`
    /// tells apart networks of one test process.
    pub fn build(ids: &[u64], tag: u32) -> Network {
        require_tools(&["nft"]);
        if let Err(e) = sh(&["nft", "--version"]) {
            panic!("this test needs nftables' `nft` (apt-get install nftables): {e}");
        }
        reap_stale();
        let pid = std::process::id();
        let mut n = Network {
            prefix: format!("{NS_PREFIX}{pid}x{tag}"),
            subnet: pick_subnet(tag),
            host_if: format!("tn{pid}x{tag}"),
            host_if_made: false,
            namespaces: Vec::new(),
            cuts: std::sync::Mutex::new(Vec::new()),
        };
        let br = n.bridge_ns();
        n.add_ns(br.clone());
        must(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]);
        must(&["ip", "-n", &br, "link", "set", "br0", "up"]);
        for &id in ids {
            let ns = n.ns(id);
            n.add_ns(ns.clone());
            let port = format!("v{id}");
            must(&["ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &br]);
            must(&["ip", "-n", &br, "link", "set", &port, "master", "br0", "up"]);
            must(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", n.ip(id)), "dev", "eth0"]);
            must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        let host_if = n.host_if.clone();
        must(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", "vh", "netns", &br]);
        n.host_if_made = true;
        must(&["ip", "-n", &br, "link", "set", "vh", "master", "br0", "up"]);
        must(&["ip", "addr", "add", &format!("{}/24", n.host_ip()), "dev", &host_if]);
        must(&["ip", "link", "set", &host_if, "up"]);
        let ips: Vec<String> = ids.iter().map(|&id| n.ip(id).to_string()).collect();
        println!("network {}: nodes at {}; the test at {}", n.prefix, ips.join(", "), n.host_ip());
        n
    }

    fn add_ns(&mut self, name: String) {
        must(&["ip", "netns", "add", &name]);
        self.namespaces.push(name);
    }

    pub fn bridge_ns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// The namespace node `id` runs in.
    pub fn ns(&self, id: u64) -> String {
        format!("{}-n{id}", self.prefix)
    }

    pub fn ip(&self, id: u64) -> Ipv4Addr {
        assert!((1..HOST_OCTET as u64).contains(&id), "node id {id} does not fit the /24");
        Ipv4Addr::new(10, NET_A, self.subnet, id as u8)
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, NET_A, self.subnet, HOST_OCTET)
    }

    /// Drops every packet between the nodes of `a` and those of `b` on the bridge (added to
    /// any cut already in place); the test still reaches every node.
    pub fn cut(&self, a: &[u64], b: &[u64]) {
        let mut cuts = self.cuts.lock().expect("cuts");
        cuts.push((a.to_vec(), b.to_vec()));
        self.install(&cuts);
    }

    /// Removes every cut.
    pub fn heal(&self) {
        self.cuts.lock().expect("cuts").clear();
        must(&["ip", "netns", "exec", &self.bridge_ns(), "nft", "delete", "table", "bridge", CUT_TABLE]);
    }

    fn install(&self, cuts: &[(Vec<u64>, Vec<u64>)]) {
        let ips = |ids: &[u64]| ids.iter().map(|&id| self.ip(id)).collect::<Vec<_>>();
        let cuts: Vec<_> = cuts.iter().map(|(a, b)| (ips(a), ips(b))).collect();
        // Declaring, deleting and defining the table in one file replaces it atomically.
        let rules = format!("table bridge {CUT_TABLE}\ndelete table bridge {CUT_TABLE}\n{}", bridge_cut(&cuts));
        nft_load(Some(&self.bridge_ns()), &rules).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Whether a TCP connection from node `from`'s namespace to `to` opens within 1 s.
    pub fn can_connect(&self, from: u64, to: std::net::SocketAddr) -> bool {
        let target = format!("{}/{}", to.ip(), to.port());
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns(from),
            "timeout",
            "1",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{target}"),
        ])
        .is_ok()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if self.host_if_made {
            let _ = sh(&["ip", "link", "del", &self.host_if]);
        }
        for ns in self.namespaces.iter().rev() {
            // Only this test's node processes can be in there.
            kill_all_in(ns);
            if let Err(e) = sh(&["ip", "netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

fn kill_all_in(ns: &str) {
    if let Ok(pids) = sh(&["ip", "netns", "pids", ns]) {
        for p in pids.split_whitespace() {
            let _ = sh(&["kill", "-9", p]);
        }
    }
}

/// Removes what an earlier run left behind when it was killed before its drop guards ran:
/// namespaces named after a test process that no longer exists, and the processes inside
/// them (every process in such a namespace was started by that run).
fn reap_stale() {
    let Ok(list) = sh(&["ip", "netns", "list"]) else { return };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_all_in(name);
        let _ = sh(&["ip", "netns", "del", name]);
        println!("removed stale namespace {name} (its test process {pid} is gone)");
    }
}

/// A /24 in 10.213.0.0/16 that nothing on this host uses or routes (other than by the default
/// route), chosen from the process id so that concurrent runs differ.
fn pick_subnet(tag: u32) -> u8 {
    let addrs = must(&["ip", "-4", "-o", "addr", "show"]);
    let routes = must(&["ip", "-4", "route", "show", "table", "all"]);
    let default = routes.lines().find(|l| l.starts_with("default")).map(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
        (after("via").map(str::to_string), after("dev").map(str::to_string))
    });
    let start = std::process::id().wrapping_mul(2).wrapping_add(tag);
    for i in 0..256u32 {
        let b = (start.wrapping_add(i * 7) % 254 + 1) as u8;
        let prefix = format!("10.{NET_A}.{b}.");
        if addrs.contains(&prefix) || routes.contains(&prefix) {
            continue;
        }
        // Only the default route (or none) leads there.
        if let Ok(get) = sh(&["ip", "-4", "route", "get", &format!("{prefix}1")]) {
            let Some((via, dev)) = &default else { continue };
            let uses_default = via.as_ref().is_none_or(|v| get.contains(&format!("via {v} ")))
                && dev.as_ref().is_none_or(|d| get.contains(&format!("dev {d} ")));
            if !uses_default {
                continue;
            }
        }
        return b;
    }
    panic!("no free /24 in 10.{NET_A}.0.0/16 on this host");
}
