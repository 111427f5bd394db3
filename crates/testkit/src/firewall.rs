//! nftables rules a test installs and always removes: TCP to some loopback ports dropped
//! ([`BlockedPorts`]), and packets between groups of addresses dropped on a bridge
//! ([`bridge_cut`], installed and healed by [`crate::netns::Network`]).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::tools::require_tools;

/// Loads `rules` with `nft -f -`, inside network namespace `netns` if given.
pub fn nft_load(netns: Option<&str>, rules: &str) -> Result<(), String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run nft: {e}"))?;
    child.stdin.take().expect("stdin").write_all(rules.as_bytes()).map_err(|e| format!("write rules: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft refused ({}): {}\n{rules}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// An nftables table in this network namespace that drops TCP to some ports of 127.0.0.1 (a
/// port that stops answering: SYNs unanswered); deleted when dropped.
pub struct BlockedPorts(String);

impl BlockedPorts {
    pub fn new(ports: &[u16]) -> BlockedPorts {
        require_tools(&["nft"]);
        let table = format!("tandem_test_block_{}", std::process::id());
        let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let rules = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
             ip daddr 127.0.0.1 tcp dport {{ {list} }} drop\n  }}\n}}\n"
        );
        nft_load(None, &rules).unwrap_or_else(|e| panic!("{e}"));
        BlockedPorts(table)
    }
}

impl Drop for BlockedPorts {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.0]).status();
    }
}

/// The name of the bridge table that holds the cuts.
pub const CUT_TABLE: &str = "tandem_cut";

/// A `bridge` table that drops every IPv4 packet between any address of `a` and any of `b`
/// (TCP and UDP: QUIC too), forwarded across the bridge: a silent loss on the wire.
pub fn bridge_cut(cuts: &[(Vec<Ipv4Addr>, Vec<Ipv4Addr>)]) -> String {
    let set = |ips: &[Ipv4Addr]| ips.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(", ");
    let mut rules = String::new();
    for (a, b) in cuts {
        let (a, b) = (set(a), set(b));
        rules.push_str(&format!("    ip saddr {{ {a} }} ip daddr {{ {b} }} drop\n"));
        rules.push_str(&format!("    ip saddr {{ {b} }} ip daddr {{ {a} }} drop\n"));
    }
    format!(
        "table bridge {CUT_TABLE} {{\n  chain cut {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
    )
}
