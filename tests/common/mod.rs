//! Harness for black-box tests: local clusters of real `tandem` processes in temp dirs.
//!
//! Everything polls with a deadline; nothing sleeps a fixed time to "let things settle".
//! A [`Cluster`] stops its processes when dropped, also when the test panics.

#![allow(dead_code)]

pub mod nbd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the `tandem` CLI. Nodes started through it (`up`) inherit its log level: `warn`, or
/// `TANDEM_TEST_LOG` (e.g. `info,tandem_replication=debug`) when set, for debugging a test.
pub fn run(args: &[&str]) -> Output {
    let level = std::env::var("TANDEM_TEST_LOG").unwrap_or_else(|_| "warn".into());
    Command::new(bin()).args(args).env("RUST_LOG", level).output().expect("run tandem")
}

pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "tandem {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

/// Clusters of one test binary run one at a time: the machine has two cores, and timing
/// assertions (a new leader within 3 s) must not depend on how many other clusters are busy.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits for this test binary's turn to run a cluster.
pub fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A local cluster made by `tandem up --detach` in a temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    _turn: Option<std::sync::MutexGuard<'static, ()>>,
}

impl Cluster {
    pub fn up(nodes: u32) -> Cluster {
        Cluster::up_on(nodes, "tcp")
    }

    /// A cluster whose node-to-node traffic starts on `transport` (`tcp` or `quic`).
    pub fn up_on(nodes: u32, transport: &str) -> Cluster {
        Cluster::start(nodes, transport, Some(take_turn()))
    }

    /// A second cluster inside a test that already holds a [`Cluster`] (and so the turn).
    pub fn also_up(nodes: u32, transport: &str) -> Cluster {
        Cluster::start(nodes, transport, None)
    }

    /// Adopts a dir made by a `tandem up` the test ran itself; stops its nodes on drop.
    pub fn adopt(dir: tempfile::TempDir, turn: Option<std::sync::MutexGuard<'static, ()>>) -> Cluster {
        Cluster { dir, _turn: turn }
    }

    fn start(nodes: u32, transport: &str, turn: Option<std::sync::MutexGuard<'static, ()>>) -> Cluster {
        let dir = tempfile::Builder::new().prefix("tandem-test-").tempdir().expect("temp dir");
        let c = Cluster { dir, _turn: turn };
        let nodes = nodes.to_string();
        c.tandem(&["up", "--detach", "--nodes", &nodes, "--transport", transport, "--dir", c.path_str()]);
        c
    }

    /// Creates a cluster, then restarts it with `edit` applied to its cluster.toml.
    pub fn up_with(nodes: u32, transport: &str, edit: impl FnOnce(&str) -> String) -> Cluster {
        let c = Cluster::up_on(nodes, transport);
        c.down();
        let path = c.path().join("cluster.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, edit(&text)).expect("write config");
        c.restart_missing();
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 temp path")
    }

    pub fn tandem(&self, args: &[&str]) -> String {
        run_ok(args)
    }

    /// Runs an admin command against this cluster.
    pub fn admin(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--cluster", self.path_str()]);
        run_ok(&all)
    }

    pub fn down(&self) {
        self.tandem(&["down", "--dir", self.path_str()]);
    }

    /// `tandem up --detach` on the existing dir: starts every node that is not running.
    pub fn restart_missing(&self) {
        self.tandem(&["up", "--detach", "--dir", self.path_str()]);
    }

    pub fn config(&self) -> toml::Value {
        let text = std::fs::read_to_string(self.path().join("cluster.toml")).expect("config");
        toml::from_str(&text).expect("toml")
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
    fn node_config(&self, id: u64) -> toml::Value {
        let cfg = self.config();
        cfg["node"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["id"].as_integer() == Some(id as i64))
            .unwrap_or_else(|| panic!("node {id} not in config"))
            .clone()
    }

    pub fn api(&self, id: u64) -> String {
        format!("http://{}", self.node_config(id)["api_addr"].as_str().expect("api_addr"))
    }

    pub fn nbd_addr(&self, id: u64) -> std::net::SocketAddr {
        self.node_config(id)["nbd_addr"].as_str().expect("nbd_addr").parse().expect("socket address")
    }

    pub fn pid(&self, id: u64) -> i32 {
        std::fs::read_to_string(self.path().join(format!("node-{id}.pid")))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    /// Stops node `id` with SIGSTOP (a VM stun, a long stall); the guard continues it with
    /// SIGCONT when dropped, also when the test fails.
    pub fn pause(&self, id: u64) -> Paused {
        let pid = self.pid(id);
        let status = Command::new("kill").args(["-STOP", &pid.to_string()]).status().expect("kill -STOP");
        assert!(status.success(), "kill -STOP {pid} (node {id})");
        Paused { pid }
    }

    /// The lines of node `id`'s log that contain `needle`.
    pub fn log_lines(&self, id: u64, needle: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.path().join(format!("node-{id}.log"))).unwrap_or_default();
        text.lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }

    pub fn kill9(&self, id: u64) {
        let pid = self.pid(id);
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        wait_for(&format!("node {id} (pid {pid}) to die"), Duration::from_secs(10), || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            (stat.is_empty() || stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'))).then_some(())
        });
    }

    /// `GET /v1/cluster` of one node; `None` if it does not answer.
    pub fn view(&self, id: u64) -> Option<Value> {
        let resp = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?
            .get(format!("{}/v1/cluster", self.api(id)))
            .send()
            .ok()?;
        resp.json().ok()
    }

    pub fn status_json(&self, endpoint_node: u64) -> Value {
        let out = run_ok(&["status", "--json", "--endpoint", &self.api(endpoint_node)]);
        serde_json::from_str(&out).expect("status --json is JSON")
    }

    /// Waits until every given node reports the same leader, and returns it.
    pub fn agreed_leader(&self, nodes: &[u64], timeout: Duration) -> u64 {
        wait_for("all nodes to agree on a leader", timeout, || {
            let leaders: Vec<Option<u64>> =
                nodes.iter().map(|id| self.view(*id).and_then(|v| v["raft"]["leader"].as_u64())).collect();
            let first = leaders[0]?;
            leaders.iter().all(|l| *l == Some(first)).then_some(first)
        })
    }

    pub fn put_setting(&self, via: u64, key: &str, value: &str) {
        let resp = http()
            .put(format!("{}/v1/settings/{key}", self.api(via)))
            .json(&serde_json::json!({ "value": value }))
            .send()
            .expect("put");
        assert!(
            resp.status().is_success(),
            "put {key} via node {via}: {} {}",
            resp.status(),
            resp.text().unwrap_or_default()
        );
    }

    pub fn get_setting(&self, via: u64, key: &str) -> Option<String> {
        let resp = http().get(format!("{}/v1/settings/{key}", self.api(via))).send().ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let v: Value = resp.json().ok()?;
        v["value"].as_str().map(str::to_string)
    }
}

/// A node stopped with SIGSTOP; continued on drop.
pub struct Paused {
    pid: i32,
}

impl Paused {
    pub fn resume(self) {}
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.pid.to_string()]).status();
    }
}

/// The volume's record as `tandem volume list --json` shows it through node `via`.
pub fn volume(c: &Cluster, via: u64, name: &str) -> Option<Value> {
    let out = run(&["volume", "list", "--json", "--endpoint", &c.api(via)]);
    if !out.status.success() {
        return None;
    }
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    list.as_array()?.iter().find(|v| v["name"] == name).cloned()
}

/// The node ids of a JSON array.
pub fn ids(v: &Value) -> Vec<u64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

/// This node's own copy of `name`, from `GET /v1/local/volumes` (never forwarded).
pub fn local_copy(c: &Cluster, id: u64, name: &str) -> Option<Value> {
    let v: Value = http().get(format!("{}/v1/local/volumes", c.api(id))).send().ok()?.json().ok()?;
    v["volumes"].as_array()?.iter().find(|x| x["name"] == name).cloned()
}

/// Creates a volume through node 1 and waits until its primary serves it.
pub fn create_served_volume(c: &Cluster, name: &str, size: &str) -> Value {
    c.admin(&["volume", "create", name, "--size", size]);
    wait_for(&format!("{name} to be served"), Duration::from_secs(20), || {
        let v = volume(c, 1, name)?;
        let primary = v["primary"].as_u64()?;
        local_copy(c, primary, name).filter(|l| l["serving"] == true).map(|_| v)
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(bin()).args(["down", "--dir", self.path_str()]).output();
        // Belt and braces: anything left from a pid file is killed.
        if let Ok(entries) = std::fs::read_dir(self.path()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".pid") {
                    let pid = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
                    if String::from_utf8_lossy(&cmdline).contains("tandem") {
                        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                    }
                }
            }
        }
    }
}

/// The Debian package that provides each real client the tests drive.
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("qemu-io", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("fio", "fio"),
    ("nft", "nftables"),
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Makes sure the real clients a test drives are installed. On a fresh Debian machine, as
/// root, it installs their packages (once), so `cargo test --workspace` needs no other set-up.
/// A client that cannot be had fails the test: it never passes without running.
pub fn require_tools(tools: &[&str]) {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return;
    }
    let mut packages: Vec<&str> =
        missing.iter().filter_map(|t| TOOL_PACKAGES.iter().find(|(tool, _)| tool == t).map(|(_, p)| *p)).collect();
    packages.sort();
    packages.dedup();
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root && on_path("apt-get") && !packages.is_empty() {
        println!("installing {packages:?} for {missing:?}");
        let _ = std::process::Command::new("apt-get").args(["update", "-qq"]).status();
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    let still: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    assert!(
        still.is_empty(),
        "this test drives {still:?}; install the packages {packages:?} (as root: apt-get install)"
    );
}

/// Deterministic pseudo-random bytes (splitmix64).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}
