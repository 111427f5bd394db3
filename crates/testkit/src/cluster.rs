//! One launcher of local `tandem` clusters, and its fault verbs.
//!
//! A cluster lives in a temp dir made by `tandem up` (CA, certificates, `cluster.toml`). Its
//! nodes run either detached on 127.0.0.1 (`tandem up --detach`, pid files) or, with
//! [`ClusterBuilder::in_namespaces`], one per network namespace of a [`Network`], as children
//! of the test. The verbs: [`Cluster::kill`], [`Cluster::pause`] (and [`Paused::resume`]),
//! [`Cluster::restart`], and in namespaces [`Cluster::isolate`], [`Cluster::cut`],
//! [`Cluster::heal`]. Dropping the cluster stops every node, removes the namespaces and the
//! temp dir (kept with `TANDEM_TEST_KEEP`), and prints the nodes' log tails if the test failed.
//!
//! [`Cluster::try_add_node`] and [`Cluster::try_remove_node`] change a detached cluster's
//! membership as `tandem node add|remove` does.
//!
//! The fallible forms (`ClusterBuilder::start`, `try_*`, [`Cluster::stop`]) serve callers
//! that must not panic, such as the benchmarks (with [`ClusterBuilder::log_level_from_env`]
//! and [`Cluster::try_sigkill`]); tests use the panicking ones.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::binary::tandem_bin;
use crate::netns::Network;
use crate::process::{alive, log_level, signal, tandem_ok_logging};
use crate::wait::poll;
use crate::Error;

/// Clusters of one test binary run one at a time: the machine has two cores, and timing
/// assertions must not depend on how many other clusters are busy.
static TURN_TAKEN: Mutex<bool> = Mutex::new(false);
static TURN_FREED: Condvar = Condvar::new();

/// This test binary's turn to run a cluster, until dropped. Unlike a lock guard it may move
/// to another thread with the cluster that holds it.
pub struct Turn(());

impl Drop for Turn {
    fn drop(&mut self) {
        *TURN_TAKEN.lock().unwrap_or_else(|p| p.into_inner()) = false;
        TURN_FREED.notify_one();
    }
}

/// Waits for this test binary's turn to run a cluster.
pub fn take_turn() -> Turn {
    let mut taken = TURN_TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    while *taken {
        taken = TURN_FREED.wait(taken).unwrap_or_else(|p| p.into_inner());
    }
    *taken = true;
    Turn(())
}

/// A node started in a namespace must answer on its API within this long.
const NODE_START_WAIT: Duration = Duration::from_secs(30);
/// A killed node's process is gone within this long.
const DEATH_WAIT: Duration = Duration::from_secs(10);
/// Log lines of each node printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

type ConfigEdit<'a> = Box<dyn FnOnce(&str) -> String + 'a>;
type BeforeStart<'a> = Box<dyn FnOnce(&Path, &[(u64, PathBuf)]) -> Result<(), String> + 'a>;

/// How to start a [`Cluster`]: `Cluster::builder().nodes(3).transport("quic").start()`.
pub struct ClusterBuilder<'a> {
    nodes: u32,
    transport: String,
    exe: Option<PathBuf>,
    prefix: String,
    turn: bool,
    edit: Option<ConfigEdit<'a>>,
    before_start: Option<BeforeStart<'a>>,
    namespaces: Option<u32>,
    log_from_env: bool,
    spares: u32,
}

impl<'a> ClusterBuilder<'a> {
    pub fn nodes(mut self, nodes: u32) -> Self {
        self.nodes = nodes;
        self
    }

    /// The node-to-node transport it starts on (`tcp` or `quic`).
    pub fn transport(mut self, transport: &str) -> Self {
        self.transport = transport.to_string();
        self
    }

    /// The `tandem` executable (default: [`tandem_bin`], built from the current sources).
    pub fn exe(mut self, exe: impl Into<PathBuf>) -> Self {
        self.exe = Some(exe.into());
        self
    }

    /// The temp dir's name prefix (default `tandem-test-`).
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// Does not wait for this process's turn (a second cluster of a test that holds one, or a
    /// caller that runs one cluster anyway).
    pub fn without_turn(mut self) -> Self {
        self.turn = false;
        self
    }

    /// Runs the CLI, and so the nodes `tandem up` starts, with this process's `RUST_LOG` (unset
    /// if it is unset) instead of the tests' [`log_level`]: for a caller whose user chose the
    /// nodes' log level, such as the benchmarks.
    pub fn log_level_from_env(mut self) -> Self {
        self.log_from_env = true;
        self
    }

    /// Restarts the new cluster with `edit` applied to its cluster.toml.
    pub fn edit_config(mut self, edit: impl FnOnce(&str) -> String + 'a) -> Self {
        self.edit = Some(Box::new(edit));
        self
    }

    /// Also prepares `spares` more nodes (namespaces only): each has its namespace, certificate
    /// and cluster.toml entry but is not started and not a member until
    /// [`Cluster::try_add_spare`] brings it in; [`Cluster::try_retire`] sends a member back.
    pub fn spares(mut self, spares: u32) -> Self {
        self.spares = spares;
        self
    }

    /// In namespaces only: calls `f(cluster_dir, [(node id, its data dir)])` once the cluster dir
    /// holds its config and certificates and before any node starts on it (the data dirs do not
    /// exist then): e.g. to mount a filesystem of the caller's on each data dir, as the chaos
    /// suite's power-loss nemesis does. The caller unmounts it after the nodes stopped
    /// ([`Cluster::try_down`]) and before the cluster drops (which removes the dir).
    pub fn before_nodes_start(mut self, f: impl FnOnce(&Path, &[(u64, PathBuf)]) -> Result<(), String> + 'a) -> Self {
        self.before_start = Some(Box::new(f));
        self
    }

    /// Runs each node in a network namespace of its own ([`Network`]); `tag` tells apart the
    /// networks of one test process.
    pub fn in_namespaces(mut self, tag: u32) -> Self {
        self.namespaces = Some(tag);
        self
    }

    pub fn start(self) -> Result<Cluster, Error> {
        let turn = self.turn.then(take_turn);
        let dir = tempfile::Builder::new()
            .prefix(&self.prefix)
            .tempdir()
            .map_err(|e| Error(format!("cannot make a temp dir for the cluster: {e}")))?;
        let exe = self.exe.unwrap_or_else(tandem_bin);
        // The guard exists before `up` runs, so that nodes of a half-started cluster are stopped.
        let log = (!self.log_from_env).then(log_level);
        let mut c = Cluster {
            exe,
            log,
            net: None,
            children: Mutex::new(Vec::new()),
            dir: Some(dir),
            stopped: false,
            spares: Mutex::new(BTreeSet::new()),
            _turn: turn,
        };
        if self.spares > 0 && self.namespaces.is_none() {
            return Err(Error("spare nodes are supported in namespaces only".into()));
        }
        let nodes = (self.nodes + self.spares).to_string();
        let d = c.path_str().to_string();
        c.try_tandem(&["up", "--detach", "--nodes", &nodes, "--transport", &self.transport, "--dir", &d])?;
        match self.namespaces {
            None => {
                if let Some(edit) = self.edit {
                    c.try_down()?;
                    c.edit_config_file(edit)?;
                    c.try_restart_missing()?;
                }
            }
            Some(tag) => {
                c.try_down()?;
                let all = c.node_ids();
                c.net = Some(Network::build(&all, tag));
                c.move_into_namespaces()?;
                let ids: Vec<u64> = all.iter().copied().take(self.nodes as usize).collect();
                if self.spares > 0 {
                    c.set_initial_members(&ids)?;
                    *c.spares.lock().expect("spares") = all.iter().copied().skip(ids.len()).collect();
                }
                if let Some(edit) = self.edit {
                    c.edit_config_file(edit)?;
                }
                if let Some(f) = self.before_start {
                    let dirs: Vec<(u64, PathBuf)> = ids.iter().map(|&id| (id, c.data_dir(id))).collect();
                    f(c.path(), &dirs).map_err(|e| Error(format!("before the nodes start: {e}")))?;
                }
                for &id in &ids {
                    c.spawn_in_namespace(id)?;
                }
                c.wait_for_apis(&ids)?;
                let init = format!("{}/v1/cluster/init", c.api(1));
                let resp = c
                    .http()
                    .post(&init)
                    .json(&serde_json::json!({}))
                    .send()
                    .map_err(|e| Error(format!("POST {init}: {e}")))?;
                if !resp.status().is_success() {
                    return Err(Error(format!("init: {} {}", resp.status(), resp.text().unwrap_or_default())));
                }
            }
        }
        Ok(c)
    }
}

/// A local cluster of real `tandem` processes; stopped and removed when dropped.
pub struct Cluster {
    exe: PathBuf,
    /// The `RUST_LOG` the CLI runs with; `None`: this process's own.
    log: Option<String>,
    /// The namespaces, when the nodes run in them; removed after the nodes are stopped.
    net: Option<Network>,
    /// The node processes started in namespaces (detached nodes have pid files instead).
    children: Mutex<Vec<(u64, Child)>>,
    dir: Option<tempfile::TempDir>,
    stopped: bool,
    /// Nodes in cluster.toml that are not members now (see [`ClusterBuilder::spares`]).
    spares: Mutex<BTreeSet<u64>>,
    _turn: Option<Turn>,
}

impl Cluster {
    pub fn builder<'a>() -> ClusterBuilder<'a> {
        ClusterBuilder {
            nodes: 3,
            transport: "tcp".into(),
            exe: None,
            prefix: "tandem-test-".into(),
            turn: true,
            edit: None,
            before_start: None,
            namespaces: None,
            log_from_env: false,
            spares: 0,
        }
    }

    pub fn up(nodes: u32) -> Cluster {
        Cluster::up_on(nodes, "tcp")
    }

    /// A cluster whose node-to-node traffic starts on `transport` (`tcp` or `quic`).
    pub fn up_on(nodes: u32, transport: &str) -> Cluster {
        Cluster::builder().nodes(nodes).transport(transport).start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// A second cluster inside a test that already holds a [`Cluster`] (and so the turn).
    pub fn also_up(nodes: u32, transport: &str) -> Cluster {
        Cluster::builder().nodes(nodes).transport(transport).without_turn().start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates a cluster, then restarts it with `edit` applied to its cluster.toml.
    pub fn up_with(nodes: u32, transport: &str, edit: impl FnOnce(&str) -> String) -> Cluster {
        Cluster::builder().nodes(nodes).transport(transport).edit_config(edit).start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// A cluster with one network namespace per node (see [`Network`]).
    pub fn in_namespaces(nodes: u32, transport: &str, tag: u32) -> Cluster {
        Cluster::builder()
            .nodes(nodes)
            .transport(transport)
            .prefix("tandem-netns-")
            .in_namespaces(tag)
            .start()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adopts a dir made by a `tandem up` the test ran itself; stops its nodes on drop.
    pub fn adopt(dir: tempfile::TempDir, turn: Option<Turn>) -> Cluster {
        Cluster {
            exe: tandem_bin(),
            log: Some(log_level()),
            net: None,
            children: Mutex::new(Vec::new()),
            dir: Some(dir),
            stopped: false,
            spares: Mutex::new(BTreeSet::new()),
            _turn: turn,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("the cluster's dir").path()
    }

    pub fn path_str(&self) -> &str {
        self.path().to_str().expect("utf-8 temp path")
    }

    /// The `tandem` executable the cluster runs.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Runs the `tandem` CLI of this cluster; its stdout, or what went wrong.
    pub fn try_tandem(&self, args: &[&str]) -> Result<String, Error> {
        tandem_ok_logging(&self.exe, args, self.log.as_deref())
    }

    pub fn tandem(&self, args: &[&str]) -> String {
        self.try_tandem(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs an admin command against this cluster (`--cluster DIR`).
    pub fn admin(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--cluster", self.path_str()]);
        self.tandem(&all)
    }

    /// Stops every node (in namespaces: SIGKILL and reap), leaving the dir and the namespaces.
    pub fn try_down(&self) -> Result<(), Error> {
        if self.net.is_some() {
            for (_, mut child) in self.children.lock().expect("children").drain(..) {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Ok(());
        }
        self.try_tandem(&["down", "--dir", self.path_str()]).map(drop)
    }

    /// Stops every node (`tandem down`); [`Cluster::restart_missing`] starts them again.
    pub fn down(&self) {
        self.try_down().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts every node that is not running (`tandem up --detach` on the existing dir, or
    /// the namespace's node processes), and waits for their APIs.
    pub fn try_restart_missing(&self) -> Result<(), Error> {
        if self.net.is_none() {
            return self.try_tandem(&["up", "--detach", "--dir", self.path_str()]).map(drop);
        }
        let ids = self.member_ids();
        for &id in &ids {
            if !self.running(id) {
                // A node that ended on its own (a crash, an abort) leaves its child behind:
                // reap it, so the new process is the one found by its id.
                let mut children = self.children.lock().expect("children");
                children.retain_mut(|(n, child)| *n != id || !matches!(child.try_wait(), Ok(Some(_))));
                drop(children);
                self.spawn_in_namespace(id)?;
            }
        }
        self.wait_for_apis(&ids)
    }

    /// The nodes of cluster.toml that are members (all of them unless the cluster has spares).
    pub fn member_ids(&self) -> Vec<u64> {
        let spares = self.spares.lock().expect("spares").clone();
        self.node_ids().into_iter().filter(|id| !spares.contains(id)).collect()
    }

    /// The spare nodes not brought in (see [`ClusterBuilder::spares`]).
    pub fn spare_ids(&self) -> Vec<u64> {
        self.spares.lock().expect("spares").iter().copied().collect()
    }

    /// Brings spare node `id` in: starts its process in its namespace and registers it with
    /// `POST /v1/nodes` through a member (as `tandem node add` does); it then joins Raft and
    /// catches up on its own.
    pub fn try_add_spare(&self, id: u64) -> Result<(), Error> {
        if !self.spares.lock().expect("spares").contains(&id) {
            return Err(Error(format!("node {id} is not a spare")));
        }
        self.spawn_in_namespace(id)?;
        self.wait_for_apis(&[id])?;
        let n = self.node_config(id);
        let field = |k: &str| n[k].as_str().map(str::to_string).unwrap_or_default();
        let record = serde_json::json!({
            "id": id,
            "site": field("site"),
            "raft_addr": field("raft_addr"),
            "api_addr": field("api_addr"),
            "nbd_addr": field("nbd_addr"),
        });
        self.on_a_member(id, |api| self.http().post(format!("{api}/v1/nodes")).json(&record))?;
        self.spares.lock().expect("spares").remove(&id);
        Ok(())
    }

    /// Sends member `id` back to the spares: `DELETE /v1/nodes/{id}` through another member
    /// (refused while it holds a replica), then stops its process and wipes its data, so that
    /// it can be brought in again as a new node.
    pub fn try_retire(&self, id: u64) -> Result<(), Error> {
        self.on_a_member(id, |api| self.http().delete(format!("{api}/v1/nodes/{id}")))?;
        if self.running(id) {
            self.try_kill(id)?;
        }
        self.children.lock().expect("children").retain(|(n, _)| *n != id);
        let data = self.data_dir(id);
        if data.exists() {
            std::fs::remove_dir_all(&data).map_err(|e| Error(format!("wipe {}: {e}", data.display())))?;
        }
        self.spares.lock().expect("spares").insert(id);
        Ok(())
    }

    /// Sends a request to each member but `not` in turn until one answers with success.
    fn on_a_member(&self, not: u64, request: impl Fn(&str) -> reqwest::blocking::RequestBuilder) -> Result<(), Error> {
        let mut last = String::from("no member to ask");
        for m in self.member_ids().into_iter().filter(|&m| m != not) {
            match request(&self.api(m)).timeout(Duration::from_secs(10)).send() {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = format!("node {m}: {} {}", r.status(), r.text().unwrap_or_default()),
                Err(e) => last = format!("node {m}: {e}"),
            }
        }
        Err(Error(last))
    }

    /// Sets `cluster.initial_members` in cluster.toml.
    fn set_initial_members(&self, ids: &[u64]) -> Result<(), Error> {
        let path = self.path().join("cluster.toml");
        let mut cfg = self.config();
        let members = ids.iter().map(|&i| toml::Value::Integer(i as i64)).collect();
        cfg.get_mut("cluster")
            .and_then(toml::Value::as_table_mut)
            .ok_or_else(|| Error("cluster.toml has no [cluster]".into()))?
            .insert("initial_members".into(), toml::Value::Array(members));
        let text = toml::to_string(&cfg).map_err(|e| Error(format!("serialize config: {e}")))?;
        std::fs::write(&path, text).map_err(|e| Error(format!("{}: {e}", path.display())))
    }

    /// In namespaces: starts node `id` again if it is not running (the others stay as they
    /// are) and waits for its API; for a caller that brings nodes back in an order of its own.
    pub fn try_start_node(&self, id: u64) -> Result<(), Error> {
        if self.net.is_none() {
            return Err(Error("starting one node is supported in namespaces only".into()));
        }
        if !self.running(id) {
            self.spawn_in_namespace(id)?;
        }
        self.wait_for_apis(&[id])
    }

    pub fn restart_missing(&self) {
        self.try_restart_missing().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds a node to a detached cluster with `tandem node add --cluster DIR` (its certificate,
    /// config entry, process and registration; `Drop` stops it with the others) and returns its
    /// id once the leader has registered it (`id`: that id, which must be new; `None`: the
    /// next after the largest in cluster.toml). The new node then catches up on its own.
    pub fn try_add_node(&self, id: Option<u64>) -> Result<u64, Error> {
        if self.net.is_some() {
            return Err(Error("adding a node is supported on detached clusters only".into()));
        }
        let before = self.node_ids();
        let id_arg = id.map(|i| i.to_string());
        let mut args = vec!["node", "add", "--cluster", self.path_str()];
        if let Some(i) = &id_arg {
            args.extend(["--id", i.as_str()]);
        }
        self.try_tandem(&args)?;
        self.node_ids()
            .into_iter()
            .find(|id| !before.contains(id))
            .ok_or_else(|| Error("`tandem node add` added no node to cluster.toml".into()))
    }

    /// Removes node `id` from a detached cluster (`tandem node remove ID --cluster DIR`: the
    /// leader drops it, its process is stopped and its config entry goes).
    pub fn try_remove_node(&self, id: u64) -> Result<(), Error> {
        if self.net.is_some() {
            return Err(Error("removing a node is supported on detached clusters only".into()));
        }
        self.try_tandem(&["node", "remove", &id.to_string(), "--cluster", self.path_str()]).map(drop)
    }

    /// Stops the cluster and reports how it went; dropping it does the same silently.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stopped = true;
        self.try_down()
    }

    pub fn config(&self) -> toml::Value {
        let text = std::fs::read_to_string(self.path().join("cluster.toml")).expect("config");
        toml::from_str(&text).expect("toml")
    }

    fn edit_config_file(&self, edit: ConfigEdit<'_>) -> Result<(), Error> {
        let path = self.path().join("cluster.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
        std::fs::write(&path, edit(&text)).map_err(|e| Error(format!("{}: {e}", path.display())))
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.config()["node"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["id"].as_integer().expect("id") as u64)
            .collect()
    }

    /// Node `id`'s entry in cluster.toml.
    pub fn node_config(&self, id: u64) -> toml::Value {
        let cfg = self.config();
        cfg["node"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["id"].as_integer() == Some(id as i64))
            .unwrap_or_else(|| panic!("node {id} not in config"))
            .clone()
    }

    /// `http://` and node `id`'s API address.
    pub fn api(&self, id: u64) -> String {
        format!("http://{}", self.node_config(id)["api_addr"].as_str().expect("api_addr"))
    }

    pub fn nbd_addr(&self, id: u64) -> SocketAddr {
        self.node_config(id)["nbd_addr"].as_str().expect("nbd_addr").parse().expect("socket address")
    }

    /// Node `id`'s iSCSI portal (`tandem up` gives every node one).
    pub fn iscsi_addr(&self, id: u64) -> SocketAddr {
        self.node_config(id)["iscsi_addr"].as_str().expect("iscsi_addr").parse().expect("socket address")
    }

    /// Node `id`'s process id.
    pub fn try_pid(&self, id: u64) -> Result<i32, Error> {
        if self.net.is_some() {
            let children = self.children.lock().expect("children");
            let child =
                children.iter().find(|(n, _)| *n == id).ok_or_else(|| Error(format!("node {id} not started")))?;
            return Ok(child.1.id() as i32);
        }
        let path = self.path().join(format!("node-{id}.pid"));
        let text = std::fs::read_to_string(&path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
        text.trim().parse().map_err(|_| Error(format!("{} does not hold a pid", path.display())))
    }

    pub fn pid(&self, id: u64) -> i32 {
        self.try_pid(id).unwrap_or_else(|e| panic!("{e}"))
    }

    fn running(&self, id: u64) -> bool {
        self.try_pid(id).is_ok_and(alive)
    }

    /// Node `id`'s data dir (`data_dir` of its cluster.toml entry, resolved against the dir).
    pub fn data_dir(&self, id: u64) -> PathBuf {
        let dir = self.node_config(id)["data_dir"].as_str().map(PathBuf::from).expect("data_dir");
        self.path().join(dir)
    }

    /// Node `id`'s log file.
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.path().join(format!("node-{id}.log"))
    }

    /// The lines of node `id`'s log that contain `needle`.
    pub fn log_lines(&self, id: u64, needle: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
        text.lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `kill -9` of node `id`; returns once its process is gone.
    pub fn try_kill(&self, id: u64) -> Result<(), Error> {
        let pid = self.try_sigkill(id)?;
        poll(&format!("node {id} (pid {pid}) to die"), DEATH_WAIT, || (!alive(pid)).then_some(()))
    }

    /// `kill -9` of node `id`, returning its pid as soon as the signal is sent (a detached
    /// node's process may take a moment to go): for a caller that times from the kill, such as
    /// the failover benchmark. [`Cluster::try_kill`] also waits for the process to be gone.
    pub fn try_sigkill(&self, id: u64) -> Result<i32, Error> {
        let pid = self.try_pid(id)?;
        signal(pid, Signal::SIGKILL)?;
        if self.net.is_some() {
            let mut children = self.children.lock().expect("children");
            if let Some(i) = children.iter().position(|(n, _)| *n == id) {
                let (_, mut child) = children.remove(i);
                let _ = child.wait();
            }
        }
        Ok(pid)
    }

    pub fn kill(&self, id: u64) {
        self.try_kill(id).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Stops node `id` with SIGSTOP (a VM stun, a long stall); the guard continues it with
    /// SIGCONT when resumed or dropped, also when the test fails.
    pub fn pause(&self, id: u64) -> Paused {
        let pid = self.pid(id);
        signal(pid, Signal::SIGSTOP).unwrap_or_else(|e| panic!("pause node {id}: {e}"));
        Paused { pid }
    }

    /// Starts node `id` again after a [`Cluster::kill`] (detached: every node that is not
    /// running, as `tandem up --detach` does).
    pub fn restart(&self, id: u64) {
        assert!(!self.running(id), "node {id} is still running");
        self.restart_missing();
    }

    fn network(&self) -> &Network {
        self.net.as_ref().expect("this cluster runs in namespaces (ClusterBuilder::in_namespaces)")
    }

    /// The namespaces the nodes run in, if they do (for callers that install rules of their
    /// own, such as the chaos suite's nemeses).
    pub fn try_network(&self) -> Option<&Network> {
        self.net.as_ref()
    }

    /// Cuts node `id` off from every other node (the test still reaches it).
    pub fn isolate(&self, id: u64) {
        let others: Vec<u64> = self.node_ids().into_iter().filter(|&n| n != id).collect();
        self.cut(&[id], &others);
    }

    /// Drops every packet between the nodes of `a` and those of `b`, on top of earlier cuts.
    pub fn cut(&self, a: &[u64], b: &[u64]) {
        self.network().cut(a, b);
    }

    /// Removes every cut.
    pub fn heal(&self) {
        self.network().heal();
    }

    /// Whether a TCP connection from node `from` to node `to`'s API opens within 1 s.
    pub fn can_connect(&self, from: u64, to: u64) -> bool {
        let addr: SocketAddr = self.node_config(to)["api_addr"].as_str().expect("api_addr").parse().expect("addr");
        self.network().can_connect(from, addr)
    }

    /// Moves the loopback config `up` made onto the namespaces' addresses; the loopback run's
    /// data and logs go.
    fn move_into_namespaces(&self) -> Result<(), Error> {
        let net = self.network();
        let dir = self.path();
        let path = dir.join("cluster.toml");
        let mut cfg = self.config();
        for node in cfg.get_mut("node").and_then(toml::Value::as_array_mut).expect("[[node]]") {
            let id = node["id"].as_integer().expect("id") as u64;
            std::fs::remove_dir_all(dir.join(format!("node-{id}")))
                .map_err(|e| Error(format!("remove the loopback run's data: {e}")))?;
            let _ = std::fs::remove_file(self.log_path(id));
            let table = node.as_table_mut().expect("node table");
            for field in ["raft_addr", "api_addr", "nbd_addr"] {
                let old: SocketAddr = table[field].as_str().expect("address").parse().expect("socket address");
                let new = SocketAddr::new(net.ip(id).into(), old.port());
                table.insert(field.into(), toml::Value::String(new.to_string()));
            }
        }
        let text = toml::to_string(&cfg).map_err(|e| Error(format!("serialize config: {e}")))?;
        std::fs::write(&path, text).map_err(|e| Error(format!("{}: {e}", path.display())))
    }

    fn spawn_in_namespace(&self, id: u64) -> Result<(), Error> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .map_err(|e| Error(format!("log file: {e}")))?;
        let log2 = log.try_clone().map_err(|e| Error(format!("log file: {e}")))?;
        // `ip netns exec` execs the node, so the child's pid is the node's.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.network().ns(id)])
            .arg(&self.exe)
            .args(["node", "--config"])
            .arg(self.path().join("cluster.toml"))
            .args(["--id", &id.to_string()])
            .env("RUST_LOG", std::env::var("TANDEM_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| Error(format!("start node {id}: {e}")))?;
        self.children.lock().expect("children").push((id, child));
        Ok(())
    }

    fn wait_for_apis(&self, ids: &[u64]) -> Result<(), Error> {
        for &id in ids {
            let api = self.api(id);
            poll(&format!("node {id}'s API at {api}"), NODE_START_WAIT, || {
                let mut children = self.children.lock().expect("children");
                if let Some((_, child)) = children.iter_mut().find(|(n, _)| *n == id) {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("node {id} exited while starting ({status}): {}", self.log_tail(id, 30));
                    }
                }
                drop(children);
                self.view(id)
            })?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if self.net.is_some() {
            let _ = self.try_down();
        } else if !self.stopped {
            let _ = Command::new(&self.exe)
                .args(["down", "--dir", self.path_str()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Belt and braces: anything left from a pid file is killed.
        if let Ok(entries) = std::fs::read_dir(self.path()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".pid") {
                    let pid = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
                    if String::from_utf8_lossy(&cmdline).contains("tandem") {
                        if let Ok(pid) = pid.trim().parse() {
                            let _ = signal(pid, Signal::SIGKILL);
                        }
                    }
                }
            }
        }
        if failing && self.net.is_some() {
            for id in self.node_ids() {
                eprintln!("---- end of node {id}'s log ----\n{}", self.log_tail(id, LOG_TAIL_LINES));
            }
        }
        // The namespaces go after their processes, the dir last.
        self.net = None;
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("TANDEM_TEST_KEEP").is_some() {
                eprintln!("kept {} (TANDEM_TEST_KEEP)", dir.keep().display());
            }
        }
    }
}

/// A node stopped with SIGSTOP; continued (SIGCONT) when resumed or dropped.
pub struct Paused {
    pid: i32,
}

impl Paused {
    pub fn resume(self) {}
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = signal(self.pid, Signal::SIGCONT);
    }
}
