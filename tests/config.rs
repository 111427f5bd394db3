//! Cluster config files: every example parses; a bad file or a taken port stops a node with a
//! message naming the problem.

use std::path::PathBuf;

use tandem_testkit::run_tandem as run;
use tandem_testkit::Cluster;

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cluster-config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("cluster-config/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_parses() {
    let files = examples();
    assert!(files.len() >= 2, "expected the 3-node and 5-node examples, found {files:?}");
    for f in files {
        let cfg = tandem_node::config::ClusterConfig::load(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cfg.cluster.initial_members.is_empty(), "{}", f.display());
    }
    let five = tandem_node::config::ClusterConfig::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cluster-config/five-node-two-site.toml"),
    )
    .expect("five-node example");
    let sites: std::collections::BTreeSet<&str> = five.nodes.iter().map(|n| n.site.as_str()).collect();
    assert_eq!((five.nodes.len(), sites.len()), (5, 2));
}

fn node_error(config_text: &str) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config_text).expect("write");
    let out = run(&["node", "--config", path.to_str().expect("utf-8"), "--id", "1"]);
    assert!(!out.status.success(), "a bad config must stop the node");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_config_names_the_file_field_and_problem() {
    let good = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cluster-config/three-node-local.toml"),
    )
    .expect("example");
    let err = node_error(&good.replacen("raft_addr = \"127.0.0.1:", "raft_addr = \"127.0.0.1:x", 1));
    assert!(err.contains("bad.toml") && err.contains("raft_addr"), "{err}");
    let err = node_error(&good.replacen("heartbeat_interval_ms = ", "heartbeat_interval_ms = \"fast\" # ", 1));
    assert!(err.contains("bad.toml") && err.contains("heartbeat_interval_ms"), "{err}");
    let err = node_error("this is not toml");
    assert!(err.contains("bad.toml"), "{err}");
    let out = run(&["node", "--config", "/nonexistent/cluster.toml", "--id", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cluster.toml"));
}

#[test]
fn a_port_in_use_is_reported_as_such() {
    let c = Cluster::up(1);
    c.down();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let path = c.path().join("cluster.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let raft_line = text.lines().find(|l| l.starts_with("raft_addr")).expect("raft_addr line").to_string();
    std::fs::write(&path, text.replace(&raft_line, &format!("raft_addr = \"127.0.0.1:{port}\""))).expect("write");
    let out = run(&["up", "--detach", "--dir", c.path_str()]);
    assert!(!out.status.success(), "up must fail when a port is taken");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use") && err.contains(&port.to_string()), "{err}");
}
