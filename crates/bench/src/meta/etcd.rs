//! The etcd reference of `bench meta`: Debian's etcd-server (installed with apt-get when `etcd`
//! is not on PATH), a 3-member cluster on 127.0.0.1 with free ports and default durability
//! (fsync on), and a guard that stops the members by pid even when the benchmark fails. The
//! gRPC client that drives it is `etcd_client.rs`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::etcd_client::status;
use crate::tools::{apt_get, on_path};

pub const MEMBERS: usize = 3;
/// Long enough for a first start on a slow disk and an election (etcd's default election
/// timeout is 1 s).
const START_WAIT: Duration = Duration::from_secs(60);
/// How long a member gets after SIGTERM before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// Lines of a member's log shown when it fails to start.
const LOG_TAIL_LINES: usize = 20;

/// The etcd binary: on PATH, or installed from Debian's `etcd-server` package first.
pub async fn ensure_installed() -> anyhow::Result<PathBuf> {
    if let Some(p) = on_path("etcd") {
        return Ok(p);
    }
    eprintln!(
        "etcd is not on PATH: installing Debian's etcd-server (apt-get update && apt-get install -y etcd-server)"
    );
    apt_get(&["update"]).await?;
    apt_get(&["install", "-y", "etcd-server"]).await?;
    on_path("etcd").ok_or_else(|| anyhow!("etcd-server is installed but `etcd` is not on PATH"))
}

/// `etcd --version`'s first line's version, e.g. `3.4.23`.
pub fn version(etcd: &Path) -> anyhow::Result<String> {
    let out = Command::new(etcd)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", etcd.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| anyhow!("unexpected `etcd --version` output: {text}"))
}

struct Member {
    name: String,
    client_addr: SocketAddr,
    log: PathBuf,
    child: Child,
}

/// A running 3-member etcd; stops its members (by pid) when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    /// The members' data dirs and logs, removed after the members are stopped.
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub async fn start(etcd: &Path) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("tandem-bench-etcd-")
            .tempdir()
            .context("cannot make a temporary dir for etcd")?;
        let (client_addrs, peer_addrs) = free_addrs()?;
        let initial_cluster =
            (0..MEMBERS).map(|i| format!("m{}=http://{}", i + 1, peer_addrs[i])).collect::<Vec<_>>().join(",");
        // Distinct per run, so members of an earlier run can never join this cluster.
        let token = format!("tandem-bench-{}", std::process::id());
        let mut cluster = EtcdCluster { members: Vec::with_capacity(MEMBERS), _dir: dir };
        for i in 0..MEMBERS {
            let name = format!("m{}", i + 1);
            let data = cluster._dir.path().join(&name);
            let log = cluster._dir.path().join(format!("{name}.log"));
            let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
            let client_url = format!("http://{}", client_addrs[i]);
            let peer_url = format!("http://{}", peer_addrs[i]);
            use std::os::unix::process::CommandExt;
            let child = Command::new(etcd)
                .arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-token")
                .arg(&token)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--logger")
                .arg("zap")
                .arg("--log-outputs")
                .arg("stderr")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                // Its own process group: a Ctrl-C reaches the benchmark, which stops etcd itself.
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start {} (member {name})", etcd.display()))?;
            cluster.members.push(Member { name, client_addr: client_addrs[i], log, child });
        }
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// Until every member answers and they agree on a leader.
    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_WAIT;
        loop {
            for m in &mut self.members {
                if let Some(status) = m.child.try_wait().context("cannot check an etcd member")? {
                    bail!(
                        "etcd member {} exited ({status}) while starting; the end of {}:\n{}",
                        m.name,
                        m.log.display(),
                        log_tail(&m.log)
                    );
                }
            }
            let last = match self.leader_addr().await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let m = &self.members[0];
                return Err(last.context(format!(
                    "etcd is not healthy within {START_WAIT:?}; the end of {}:\n{}",
                    m.log.display(),
                    log_tail(&m.log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The client address of the member that every member names as leader.
    pub async fn leader_addr(&self) -> anyhow::Result<SocketAddr> {
        let mut statuses = Vec::with_capacity(self.members.len());
        for m in &self.members {
            let s =
                status(m.client_addr).await.with_context(|| format!("etcd member {} ({})", m.name, m.client_addr))?;
            statuses.push((m.client_addr, s));
        }
        let leader = statuses[0].1.leader;
        if leader == 0 || statuses.iter().any(|(_, s)| s.leader != leader) {
            bail!("the etcd members do not agree on a leader yet");
        }
        statuses
            .iter()
            .find(|(_, s)| s.header.as_ref().map(|h| h.member_id) == Some(leader))
            .map(|(addr, _)| *addr)
            .ok_or_else(|| anyhow!("no etcd member answers as the leader {leader:x}"))
    }

    /// SIGTERM to every member, then SIGKILL to those still running after `STOP_WAIT`.
    fn stop_members(&mut self) {
        for m in &self.members {
            if let Ok(pid) = i32::try_from(m.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = std::time::Instant::now() + STOP_WAIT;
        for m in &mut self.members {
            loop {
                match m.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() >= deadline => {
                        let _ = m.child.kill();
                        let _ = m.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(25)),
                }
            }
        }
        self.members.clear();
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Blocking is acceptable here: the benchmark is ending, and etcd must not outlive it.
        self.stop_members();
    }
}

/// Six distinct free ports (a client and a peer port per member). All listeners are held until
/// all are picked, so that no port is picked twice; etcd binds them right after.
fn free_addrs() -> anyhow::Result<(Vec<SocketAddr>, Vec<SocketAddr>)> {
    let listeners = (0..2 * MEMBERS)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot find free ports on 127.0.0.1")?;
    let addrs = listeners.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?;
    Ok((addrs[..MEMBERS].to_vec(), addrs[MEMBERS..].to_vec()))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
