//! Local clusters (`tandem up`, `down`, local `node add|remove`) and running one node.
//!
//! A local cluster lives in one data dir: `cluster.toml`, `certs/` (the CA with its key, and a
//! certificate per node), `node-<id>/` (each node's data), `node-<id>.log` and, while the node
//! runs, `node-<id>.pid`.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::Method;
use tandem_client::{admin_token_path, config_path, read_admin_token, Api};
use tandem_clustermap::AccessPolicy;
use tandem_node::config::{ClusterConfig, ClusterSection, NodeSection, SecuritySection, TlsSection};
use tandem_node::security::{self, ClusterSecret};
use tandem_transport::tls;
use tandem_types::NodeId;
use tandem_types::TransportKind;
use tokio::time::Instant;

use crate::client;
use crate::{LogFormat, Target};

/// How long `up` waits for the nodes' APIs and for a leader.
const START_WAIT: Duration = Duration::from_secs(60);
/// How long a node gets to stop after SIGTERM before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(15);
const SITE_DEFAULT: &str = "local";

fn pid_path(dir: &Path, id: NodeId) -> PathBuf {
    dir.join(format!("node-{id}.pid"))
}

fn log_path(dir: &Path, id: NodeId) -> PathBuf {
    dir.join(format!("node-{id}.log"))
}

/// Where `tandem up` looks for ports: below the kernel's ephemeral range, which every outgoing
/// connection draws its local port from. A listening port inside that range is one a dead node
/// can lose while it is down: its peers keep dialing it, and a dial to a closed port on the same
/// address may be given that very port as its source (TCP's simultaneous open then connects the
/// socket to itself), or any other outgoing connection may be; the restarted node then cannot
/// bind its own address. Ports below the range are never handed out implicitly.
const PORTS_FROM: u16 = 10_000;

/// The first port of the kernel's ephemeral range (Linux's default when it cannot be read).
fn ephemeral_from() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(32_768)
}

/// A port free now, outside the ephemeral range, and not handed out before by this process (two
/// nodes' addresses of one cluster must not collide). Another process could take it before the
/// node binds it; the node then reports the port as in use and `up` shows that.
fn free_addr() -> anyhow::Result<SocketAddr> {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let end = ephemeral_from();
    if end <= PORTS_FROM + 1_000 {
        bail!("the kernel's ephemeral port range starts at {end}: too low to leave ports for nodes below it")
    }
    // Random probes, so that two `tandem up` run at once rarely try the same ports.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let mut seed = hasher.finish();
    for _ in 0..1_000 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let port = PORTS_FROM + ((seed >> 33) % u64::from(end - PORTS_FROM)) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(addr).is_ok() {
            given.push(port);
            return Ok(addr);
        }
    }
    bail!("cannot find a free port on 127.0.0.1 between {PORTS_FROM} and {end}")
}

/// A port free for both TCP and UDP now (a node's raft_addr serves TCP and, for QUIC, UDP).
fn free_addr_tcp_udp() -> anyhow::Result<SocketAddr> {
    for _ in 0..100 {
        let addr = free_addr()?;
        if std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("cannot find a port free for both TCP and UDP on 127.0.0.1")
}

/// A pid file: it means nothing after a power loss, so it is not synced.
fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `text` to `path` so that it survives a power loss once this returns, and so that a
/// crash at any point leaves the old file or the new one, never an empty or partial one: `PATH.tmp`
/// (created with `mode`), fsync, rename, fsync of the folder. A node needs its config and
/// certificates at every restart; written without fsync, a power cut soon after `tandem up`
/// left them empty (found by the chaos suite's power-loss nemesis).
pub(crate) fn write_durable(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// A certificate or config: readable by all, durable.
fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    write_durable(path, text, 0o644)
}

/// A private key: readable by its owner only, durable.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    write_durable(path, text, 0o600)
}

/// Makes a certificate for node `id` and its `[[node]]` entry with fresh ports.
fn new_node(dir: &Path, cluster_name: &str, ca_key: &Path, id: NodeId, site: &str) -> anyhow::Result<NodeSection> {
    let ca_key_pem =
        fs::read_to_string(ca_key).with_context(|| format!("cannot read the CA key {}", ca_key.display()))?;
    let pair = tls::issue_node_cert(cluster_name, &ca_key_pem, id)?;
    let cert = PathBuf::from(format!("certs/node-{id}.pem"));
    let key = PathBuf::from(format!("certs/node-{id}.key"));
    write_public(&dir.join(&cert), &pair.cert_pem)?;
    write_private(&dir.join(&key), &pair.key_pem)?;
    Ok(NodeSection {
        id,
        site: site.to_string(),
        raft_addr: free_addr_tcp_udp()?,
        api_addr: free_addr()?,
        nbd_addr: free_addr()?,
        extra_nbd_addrs: Vec::new(),
        iscsi_addr: Some(free_addr()?),
        data_dir: PathBuf::from(format!("node-{id}")),
        cert,
        key,
    })
}

/// Creates a new local cluster's files in `dir`.
fn create(dir: &Path, nodes: u32, transport: TransportKind) -> anyhow::Result<ClusterConfig> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    fs::create_dir_all(dir.join("certs")).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = "local";
    let ca = tls::generate_ca(name)?;
    write_public(&dir.join("certs/ca.pem"), &ca.cert_pem)?;
    write_private(&dir.join("certs/ca.key"), &ca.key_pem)?;
    // The cluster secret keys the API's tokens; the admin's token goes next to the config.
    let secret_text = ClusterSecret::generate_file_text();
    write_private(&dir.join("certs/cluster.secret"), &secret_text)?;
    let secret = ClusterSecret::from_text(&secret_text).map_err(|e| anyhow!(e))?;
    let admin = secret
        .mint(&tandem_clustermap::Principal::Admin(ADMIN_NAME.into()), &security::new_credential_id())
        .expect("an admin has a token");
    write_private(&admin_token_path(dir), &format!("{admin}\n"))?;
    let mut node_sections = Vec::new();
    for id in 1..=u64::from(nodes) {
        node_sections.push(new_node(dir, name, &dir.join("certs/ca.key"), NodeId(id), SITE_DEFAULT)?);
    }
    let cfg = ClusterConfig {
        cluster: ClusterSection {
            name: name.to_string(),
            initial_members: (1..=u64::from(nodes)).map(NodeId).collect(),
            transport,
            // Loopback round trips are tens of microseconds: a lost leader is noticed within
            // 0.5–1 s, five heartbeats at the least.
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_after_entries: 10_000,
            logs_to_keep: 2_000,
            voters: tandem_meta::voters::VOTERS_DEFAULT,
            voter_replace_after_secs: 300,
        },
        tls: TlsSection { ca_cert: "certs/ca.pem".into(), ca_key: Some("certs/ca.key".into()) },
        // A local cluster's convenient default: TLS is offered, and clients that do not
        // identify reach every volume (`tandem up` says so); cluster-config/'s production
        // examples require TLS.
        security: SecuritySection {
            secret: "certs/cluster.secret".into(),
            access: AccessPolicy::Tls,
            metrics_open: false,
        },
        nodes: node_sections,
        base_dir: dir.to_path_buf(),
    };
    save_config(dir, &cfg)?;
    Ok(cfg)
}

fn save_config(dir: &Path, cfg: &ClusterConfig) -> anyhow::Result<()> {
    let text = format!(
        "# Tandem cluster config, written by `tandem up`; the same format serves hand-written\n\
         # production files (see cluster-config/). Paths are relative to this file.\n\n{}",
        cfg.to_toml()
    );
    // Write, fsync, rename, fsync the folder: a crash or power loss never leaves half a config.
    write_public(&config_path(dir), &text)
}

/// The pid in `node-<id>.pid`, if that process is alive and is a tandem process.
fn running_pid(dir: &Path, id: NodeId) -> Option<i32> {
    let text = fs::read_to_string(pid_path(dir, id)).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let alive_tandem = String::from_utf8_lossy(&cmdline).contains("tandem");
    let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().map(|r| r.trim_start().starts_with('Z')).unwrap_or(false))
        .unwrap_or(false);
    (alive_tandem && !zombie).then_some(pid)
}

/// Starts node `id` as a child process in its own process group (so a Ctrl-C at the terminal
/// reaches `up`, which then stops the nodes in order), logging to `node-<id>.log`.
fn spawn_node(dir: &Path, id: NodeId, log_format: LogFormat) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the tandem executable")?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(dir, id))
        .with_context(|| format!("cannot open {}", log_path(dir, id).display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("node").arg("--config").arg(config_path(dir)).arg("--id").arg(id.to_string());
    if log_format == LogFormat::Json {
        cmd.arg("--log-format").arg("json");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start node {id}"))?;
    write_file(&pid_path(dir, id), &format!("{}\n", child.id()))?;
    Ok(child)
}

fn log_tail(dir: &Path, id: NodeId) -> String {
    let text = fs::read_to_string(log_path(dir, id)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// What `tandem up` says of the access policy hosts meet: the cluster's setting, else the
/// config's.
async fn report_access(dir: &Path, cfg: &ClusterConfig) -> String {
    let api = local_api(dir, cfg.nodes[0].api_addr);
    let set = api.get::<serde_json::Value>("/v1/settings/access").await.ok();
    let policy = set
        .and_then(|v| v["value"].as_str().and_then(|p| p.parse::<AccessPolicy>().ok()))
        .unwrap_or(cfg.security.access);
    match policy {
        AccessPolicy::TlsRequired => "tls-required (hosts identify with a certificate or a known iSCSI name)".into(),
        p => format!(
            "{p}: a local convenience, NBD and iSCSI clients that do not identify reach every volume; \
             require identities with `tandem setting set access tls-required`"
        ),
    }
}

/// The operator's name in the admin token `tandem up` makes.
const ADMIN_NAME: &str = "admin";

/// A client of a local node's API with the data dir's admin token.
fn local_api(dir: &Path, addr: SocketAddr) -> Api {
    Api::new(&addr.to_string()).with_token(read_admin_token(dir))
}

/// Waits until node `id`'s API answers; fails early, with its log, if the process exits.
async fn wait_for_api(dir: &Path, id: NodeId, api: &Api, child: &mut Option<Child>) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        if api.get::<serde_json::Value>("/v1/cluster").await.is_ok() {
            return Ok(());
        }
        if let Some(c) = child.as_mut() {
            if let Some(status) = c.try_wait()? {
                let _ = fs::remove_file(pid_path(dir, id));
                bail!(
                    "node {id} exited ({status}) while starting; the end of {}:\n{}",
                    log_path(dir, id).display(),
                    log_tail(dir, id)
                );
            }
        }
        if Instant::now() > deadline {
            bail!("node {id} did not answer on its API within {START_WAIT:?}; see {}", log_path(dir, id).display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn up(
    dir: &Path,
    nodes: u32,
    transport: Option<TransportKind>,
    detach: bool,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let fresh = !config_path(dir).exists();
    let cfg = if fresh {
        create(dir, nodes, transport.unwrap_or(TransportKind::Tcp))?
    } else {
        let cfg = ClusterConfig::load(&config_path(dir))?;
        if cfg.nodes.len() != nodes as usize && nodes != 3 {
            eprintln!(
                "note: {} already holds a cluster of {} nodes; restarting it as it is (--nodes applies to new clusters)",
                dir.display(),
                cfg.nodes.len()
            );
        }
        cfg
    };
    let mut children: Vec<(NodeId, Option<Child>)> = Vec::new();
    for n in &cfg.nodes {
        if let Some(pid) = running_pid(dir, n.id) {
            eprintln!("node {} is already running (pid {pid})", n.id);
            children.push((n.id, None));
            continue;
        }
        children.push((n.id, Some(spawn_node(dir, n.id, log_format)?)));
    }
    let started = async {
        for (id, child) in children.iter_mut() {
            let n = cfg.node(*id).expect("node from the config");
            wait_for_api(dir, *id, &local_api(dir, n.api_addr), child).await?;
        }
        let first = local_api(dir, cfg.nodes[0].api_addr);
        if fresh {
            let _: serde_json::Value =
                first.request(Method::POST, "/v1/cluster/init", Some(&serde_json::json!({}))).await?;
        }
        client::wait_for_leader(&first, START_WAIT).await
    };
    let report = match started.await {
        Ok(r) => r,
        Err(e) => {
            stop_children(dir, &mut children).await;
            return Err(e);
        }
    };
    client::print_status(&report);
    println!(
        "\nthe API wants a token: the CLI finds the admin's in {} (curl -H \"authorization: Bearer $(cat {})\")",
        admin_token_path(dir).display(),
        admin_token_path(dir).display()
    );
    let access = report_access(dir, &cfg).await;
    println!("host access policy: {access}");
    if detach {
        println!("\ncluster running in the background; stop it with `tandem down --dir {}`", dir.display());
        return Ok(());
    }
    println!("\ncluster running; press Ctrl-C to stop it");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping the nodes...");
    stop_children(dir, &mut children).await;
    println!("stopped");
    Ok(())
}

/// SIGTERM to a pid, then wait for it to go, then SIGKILL.
async fn stop_pid(pid: i32, is_gone: impl Fn() -> bool) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_WAIT;
    while Instant::now() < deadline {
        if is_gone() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

async fn stop_children(dir: &Path, children: &mut [(NodeId, Option<Child>)]) {
    for (id, child) in children.iter_mut() {
        if let Some(c) = child.as_mut() {
            let pid = c.id() as i32;
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_WAIT;
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(25)).await,
                }
            }
            let _ = fs::remove_file(pid_path(dir, *id));
        }
    }
}

pub async fn down(dir: &Path) -> anyhow::Result<()> {
    let cfg = ClusterConfig::load(&config_path(dir))?;
    let mut stopped = 0;
    for n in &cfg.nodes {
        if let Some(pid) = running_pid(dir, n.id) {
            let id = n.id;
            stop_pid(pid, || running_pid(dir, id).is_none()).await;
            stopped += 1;
        }
        let _ = fs::remove_file(pid_path(dir, n.id));
    }
    println!("stopped {stopped} node(s) of the cluster in {}", dir.display());
    Ok(())
}

pub async fn run_node(config: &Path, id: NodeId) -> anyhow::Result<()> {
    let cfg = ClusterConfig::load(config)?;
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tandem_node::run(cfg, id, shutdown).await
}

fn local_dir(target: &Target) -> Option<PathBuf> {
    if target.endpoint.is_some() {
        return None;
    }
    let dir = target.dir();
    config_path(&dir).exists().then_some(dir)
}

#[allow(clippy::too_many_arguments)]
pub async fn node_add(
    target: &Target,
    id: Option<NodeId>,
    site: Option<String>,
    raft_addr: Option<SocketAddr>,
    api_addr: Option<SocketAddr>,
    nbd_addr: Option<SocketAddr>,
    iscsi_addr: Option<SocketAddr>,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let api = client::find_api(target).await?;
    let record = match (raft_addr, api_addr, nbd_addr) {
        (Some(raft_addr), Some(api_addr), Some(nbd_addr)) => {
            let id = id.ok_or_else(|| anyhow!("--id is required with explicit addresses"))?;
            tandem_clustermap::NodeRecord {
                id,
                site: site.unwrap_or_else(|| SITE_DEFAULT.into()),
                raft_addr,
                api_addr,
                nbd_addr,
                extra_nbd_addrs: Vec::new(),
                iscsi_addr,
            }
        }
        (None, None, None) => {
            let dir = local_dir(target).ok_or_else(|| {
                anyhow!("give --raft-addr, --api-addr and --nbd-addr of the running node, or use a cluster made by `tandem up`")
            })?;
            let mut cfg = ClusterConfig::load(&config_path(&dir))?;
            let ca_key = cfg.tls.ca_key.clone().ok_or_else(|| {
                anyhow!("{} has no tls.ca_key to issue a certificate with", config_path(&dir).display())
            })?;
            let id = id.unwrap_or_else(|| cfg.nodes.iter().map(|n| n.id).max().unwrap_or(NodeId(0)).next());
            if cfg.node(id).is_some() {
                bail!("node {id} is already in {}", config_path(&dir).display());
            }
            let section =
                new_node(&dir, &cfg.cluster.name, &cfg.resolve(&ca_key), id, site.as_deref().unwrap_or(SITE_DEFAULT))?;
            let record = section.record();
            cfg.nodes.push(section);
            save_config(&dir, &cfg)?;
            let mut child = Some(spawn_node(&dir, id, log_format)?);
            wait_for_api(&dir, id, &local_api(&dir, record.api_addr), &mut child).await?;
            record
        }
        _ => bail!("give all of --raft-addr, --api-addr and --nbd-addr, or none of them"),
    };
    let added: tandem_clustermap::NodeRecord = api.request(Method::POST, "/v1/nodes", Some(&record)).await?;
    println!("node {} added (raft {}, api {}, nbd {})", added.id, added.raft_addr, added.api_addr, added.nbd_addr);
    Ok(())
}

pub async fn node_remove(target: &Target, id: NodeId) -> anyhow::Result<()> {
    let api = client::find_api(target).await?;
    let _: serde_json::Value = api.request::<(), _>(Method::DELETE, &format!("/v1/nodes/{id}"), None).await?;
    println!("node {id} removed from the cluster");
    if let Some(dir) = local_dir(target) {
        if let Some(pid) = running_pid(&dir, id) {
            stop_pid(pid, || running_pid(&dir, id).is_none()).await;
            println!("stopped its process (pid {pid})");
        }
        let _ = fs::remove_file(pid_path(&dir, id));
        let mut cfg = ClusterConfig::load(&config_path(&dir))?;
        cfg.nodes.retain(|n| n.id != id);
        cfg.cluster.initial_members.retain(|m| *m != id);
        save_config(&dir, &cfg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn node_ports_are_distinct_free_and_below_the_ephemeral_range() {
        let end = ephemeral_from();
        let ports: Vec<u16> = (0..64).map(|_| free_addr().expect("a free port").port()).collect();
        for p in &ports {
            assert!((PORTS_FROM..end).contains(p), "port {p} outside {PORTS_FROM}..{end}");
            assert_eq!(ports.iter().filter(|q| *q == p).count(), 1, "port {p} handed out twice: {ports:?}");
        }
    }

    #[test]
    fn durable_writes_replace_the_file_whole_keep_its_mode_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("node-1.key");
        write_private(&key, "old").expect("first write");
        write_private(&key, "new").expect("second write");
        assert_eq!(fs::read_to_string(&key).expect("read"), "new");
        assert_eq!(fs::metadata(&key).expect("metadata").permissions().mode() & 0o777, 0o600);
        let cert = dir.path().join("node-1.pem");
        write_public(&cert, "cert").expect("public write");
        assert_eq!(fs::read_to_string(&cert).expect("read"), "cert");
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
    }
}
