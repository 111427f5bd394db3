//! The cluster config file (TOML): one format for the file `tandem up` writes and for files
//! written by hand for production. Relative paths are relative to the file's own folder.
//!
//! ```toml
//! [cluster]
//! name = "local"
//! initial_members = [1, 2, 3]
//!
//! [tls]
//! ca_cert = "certs/ca.pem"
//!
//! [security]
//! secret = "certs/cluster.secret"
//! access = "tls-required"
//!
//! [[node]]
//! id = 1
//! site = "dc1"
//! raft_addr = "127.0.0.1:7101"
//! api_addr = "127.0.0.1:7201"
//! nbd_addr = "127.0.0.1:10809"
//! iscsi_addr = "127.0.0.1:3260"
//! data_dir = "node-1"
//! cert = "certs/node-1.pem"
//! key = "certs/node-1.key"
//! ```
//!
//! Every error names the file, the field and the problem.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_clustermap::{AccessPolicy, NodeRecord};
use tandem_meta::store::MetaConfig;
use tandem_types::TransportKind;
use tandem_types::{validate_name, NodeId};

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    pub tls: TlsSection,
    pub security: SecuritySection,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeSection>,
    /// The folder relative paths are resolved against (the file's folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn default_transport() -> TransportKind {
    TransportKind::Tcp
}
fn default_heartbeat() -> u64 {
    150
}
fn default_election_min() -> u64 {
    750
}
fn default_election_max() -> u64 {
    1500
}
fn default_snapshot_after() -> u64 {
    10_000
}
fn default_logs_to_keep() -> u64 {
    2_000
}
fn default_voters() -> usize {
    tandem_meta::voters::VOTERS_DEFAULT
}
fn default_voter_replace_after() -> u64 {
    300
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    /// The members a new cluster is formed with (by `tandem up`, or `POST /v1/cluster/init`):
    /// up to `voters` of them vote, the rest join as learners. Nodes listed under `[[node]]` but
    /// not here join later with `tandem node add`.
    #[serde(default)]
    pub initial_members: Vec<NodeId>,
    /// The network layer node-to-node traffic starts on (`tcp` or `quic`), until the cluster
    /// map selects one (`tandem transport set`).
    #[serde(default = "default_transport")]
    pub transport: TransportKind,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in [min, max] starts an election.
    #[serde(default = "default_election_min")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_max")]
    pub election_timeout_max_ms: u64,
    #[serde(default = "default_snapshot_after")]
    pub snapshot_after_entries: u64,
    #[serde(default = "default_logs_to_keep")]
    pub logs_to_keep: u64,
    /// Raft voters the cluster keeps (1, 3 or 5): the largest odd number up to this and the
    /// member count, spread over sites. Every other member is a learner.
    #[serde(default = "default_voters")]
    pub voters: usize,
    /// The Raft leader gives the seat of a voter it has not heard from for this long to a live
    /// learner (the lost node stays a learner). 0: never.
    #[serde(default = "default_voter_replace_after")]
    pub voter_replace_after_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca_cert: PathBuf,
    /// The CA's private key. Only on the machine that issues node certificates (`tandem up`
    /// keeps it in its data dir); production nodes should not have it. A node that has it also
    /// issues hosts' client certificates (`tandem host credentials`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<PathBuf>,
}

/// Who may connect: the cluster secret, the default access policy, and what is open without a
/// credential. docs/OPERATIONS.md, "Security".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// The cluster secret (64 hex digits, mode 0600, the same file on every node): it keys the
    /// API's bearer tokens and seals CHAP secrets in Raft.
    pub secret: PathBuf,
    /// The access policy until the cluster map holds one (`tandem setting set access ...`):
    /// `open`, `tls` (the default) or `tls-required`.
    #[serde(default)]
    pub access: AccessPolicy,
    /// Whether `GET /metrics` answers without a credential (for a scraper without a token).
    #[serde(default)]
    pub metrics_open: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub id: NodeId,
    pub site: String,
    pub raft_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub nbd_addr: SocketAddr,
    /// More NBD addresses (target ports) the node listens on, e.g. one per network: each is one
    /// more path from a host to the node's volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_nbd_addrs: Vec<SocketAddr>,
    /// The node's iSCSI portal (3260 in production); without it the node serves no iSCSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl NodeSection {
    pub fn record(&self) -> NodeRecord {
        NodeRecord {
            id: self.id,
            site: self.site.clone(),
            raft_addr: self.raft_addr,
            api_addr: self.api_addr,
            nbd_addr: self.nbd_addr,
            extra_nbd_addrs: self.extra_nbd_addrs.clone(),
            iscsi_addr: self.iscsi_addr,
        }
    }
}

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { file: file.clone(), message: format!("cannot read: {e}") })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        ClusterConfig::parse(&text, &file, &base)
    }

    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<ClusterConfig, ConfigError> {
        let err = |message: String| ConfigError { file: file.to_string(), message };
        let mut cfg: ClusterConfig = toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        cfg.base_dir = base_dir.to_path_buf();
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let c = &self.cluster;
        validate_name(&c.name).map_err(|e| format!("cluster.name {:?} {e}", c.name))?;
        if c.heartbeat_interval_ms == 0 {
            return Err("cluster.heartbeat_interval_ms must be at least 1".into());
        }
        if c.election_timeout_min_ms <= c.heartbeat_interval_ms {
            return Err(format!(
                "cluster.election_timeout_min_ms ({}) must be greater than cluster.heartbeat_interval_ms ({})",
                c.election_timeout_min_ms, c.heartbeat_interval_ms
            ));
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(format!(
                "cluster.election_timeout_max_ms ({}) must be greater than cluster.election_timeout_min_ms ({})",
                c.election_timeout_max_ms, c.election_timeout_min_ms
            ));
        }
        if !tandem_meta::voters::VOTER_COUNTS.contains(&c.voters) {
            return Err(format!(
                "cluster.voters is {}; it must be one of {:?} (an odd number, so a majority never needs half)",
                c.voters,
                tandem_meta::voters::VOTER_COUNTS
            ));
        }
        if c.snapshot_after_entries == 0 {
            return Err("cluster.snapshot_after_entries must be at least 1".into());
        }
        if self.nodes.is_empty() {
            return Err("no [[node]] entries: a cluster needs at least one node".into());
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let at = format!("node[{i}] (id {})", n.id);
            if n.id == NodeId(0) {
                return Err(format!("{at}: id must be at least 1"));
            }
            if !ids.insert(n.id) {
                return Err(format!("{at}: id {} appears twice", n.id));
            }
            validate_name(&n.site).map_err(|e| format!("{at}: site {:?} {e}", n.site))?;
            if n.extra_nbd_addrs.len() > tandem_clustermap::EXTRA_TARGETS_MAX {
                return Err(format!(
                    "{at}: extra_nbd_addrs lists {} addresses; at most {} are allowed",
                    n.extra_nbd_addrs.len(),
                    tandem_clustermap::EXTRA_TARGETS_MAX
                ));
            }
            let fixed = [("raft_addr", n.raft_addr), ("api_addr", n.api_addr), ("nbd_addr", n.nbd_addr)];
            let extra = n.extra_nbd_addrs.iter().map(|a| ("extra_nbd_addrs", *a));
            let iscsi = n.iscsi_addr.map(|a| ("iscsi_addr", a));
            for (field, addr) in fixed.into_iter().chain(extra).chain(iscsi) {
                if addr.port() == 0 {
                    return Err(format!("{at}: {field} {addr} needs a port"));
                }
                if !addrs.insert(addr) {
                    return Err(format!("{at}: {field} {addr} is used twice in this file"));
                }
            }
        }
        for m in &c.initial_members {
            if !ids.contains(m) {
                return Err(format!("cluster.initial_members: node {m} has no [[node]] entry"));
            }
        }
        Ok(())
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeSection> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn initial_records(&self) -> Vec<NodeRecord> {
        self.nodes.iter().filter(|n| self.cluster.initial_members.contains(&n.id)).map(NodeSection::record).collect()
    }

    pub fn meta_config(&self) -> MetaConfig {
        let c = &self.cluster;
        MetaConfig {
            cluster_name: c.name.clone(),
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            election_timeout_min_ms: c.election_timeout_min_ms,
            election_timeout_max_ms: c.election_timeout_max_ms,
            snapshot_after_entries: c.snapshot_after_entries,
            logs_to_keep: c.logs_to_keep,
            voters: c.voters,
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "t"
initial_members = [1, 2]

[tls]
ca_cert = "ca.pem"

[security]
secret = "cluster.secret"
access = "open"

[[node]]
id = 1
site = "a"
raft_addr = "127.0.0.1:7001"
api_addr = "127.0.0.1:7002"
nbd_addr = "127.0.0.1:7003"
data_dir = "n1"
cert = "n1.pem"
key = "n1.key"

[[node]]
id = 2
site = "b"
raft_addr = "127.0.0.1:7011"
api_addr = "127.0.0.1:7012"
nbd_addr = "127.0.0.1:7013"
data_dir = "/abs/n2"
cert = "n2.pem"
key = "n2.key"
"#;

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(text, "test.toml", Path::new("/base"))
    }

    #[test]
    fn a_good_file_parses_with_defaults_and_paths() {
        let cfg = parse(GOOD).expect("parses");
        assert_eq!(cfg.nodes.len(), 2);
        assert_eq!(cfg.cluster.heartbeat_interval_ms, 150);
        assert_eq!(cfg.cluster.voters, 3);
        assert_eq!(cfg.cluster.voter_replace_after_secs, 300);
        assert_eq!(cfg.resolve(&cfg.nodes[0].data_dir), PathBuf::from("/base/n1"));
        assert_eq!(cfg.resolve(&cfg.nodes[1].data_dir), PathBuf::from("/abs/n2"));
        assert_eq!(cfg.initial_records().len(), 2);
        // What `up` writes reads back the same.
        let again = parse(&cfg.to_toml()).expect("round trip");
        assert_eq!(again, cfg);
    }

    fn error_of(text: &str) -> String {
        let e = parse(text).expect_err("must fail");
        assert_eq!(e.file, "test.toml");
        e.to_string()
    }

    #[test]
    fn bad_files_name_the_field_and_the_problem() {
        let e = error_of(&GOOD.replace("127.0.0.1:7011", "nonsense"));
        assert!(e.contains("raft_addr") && e.contains("test.toml"), "{e}");
        let e = error_of(&GOOD.replace("id = 2", "id = 1"));
        assert!(e.contains("appears twice"), "{e}");
        let e = error_of(&GOOD.replace("7012", "7002"));
        assert!(e.contains("api_addr") && e.contains("used twice"), "{e}");
        let e = error_of(&GOOD.replace("[1, 2]", "[1, 5]"));
        assert!(e.contains("initial_members") && e.contains('5'), "{e}");
        let e = error_of(&GOOD.replace("site = \"b\"", "site = \"b c\""));
        assert!(e.contains("site"), "{e}");
        let e = error_of(&GOOD.replace("name = \"t\"", "name = \"t\"\nelection_timeout_min_ms = 10"));
        assert!(e.contains("election_timeout_min_ms"), "{e}");
        for bad in [0, 2, 4, 7] {
            let e = error_of(&GOOD.replace("name = \"t\"", &format!("name = \"t\"\nvoters = {bad}")));
            assert!(e.contains("cluster.voters") && e.contains("[1, 3, 5]"), "{e}");
        }
        for good in [1, 3, 5] {
            let cfg = parse(&GOOD.replace("name = \"t\"", &format!("name = \"t\"\nvoters = {good}"))).expect("parses");
            assert_eq!(cfg.meta_config().voters, good);
        }
        let e = error_of(&GOOD.replace("name = \"t\"", "name = \"t\"\ncolour = 1"));
        assert!(e.contains("colour"), "{e}");
        let e = error_of(&GOOD.replace("key = \"n2.key\"", ""));
        assert!(e.contains("key"), "{e}");
        let e = error_of(&GOOD.replace("access = \"open\"", "access = \"closed\""));
        assert!(e.contains("access"), "{e}");
        let e = error_of(&GOOD.replace("secret = \"cluster.secret\"", ""));
        assert!(e.contains("secret"), "{e}");
        let e = error_of("node = []\n[cluster]\nname = \"t\"\n[tls]\nca_cert = \"x\"\n[security]\nsecret = \"s\"\n");
        assert!(e.contains("no [[node]]"), "{e}");
    }
}
