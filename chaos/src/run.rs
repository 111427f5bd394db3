//! One scenario with one seed, from an empty machine to a verdict: build the topology, start
//! the workloads, inject the seeded schedule of faults, heal, wait for the replicas to agree,
//! read everything back, and hand the history to the checker and the report. Everything made
//! (namespaces, processes, rules, temp dirs) goes when the run's [`World`] drops, also on an
//! error or Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::Serialize;
use tandem_testkit::{Cluster, Rng};

use crate::history::{Fault, MarkKind, Timeline};
use crate::lazyfs::LazyFs;
use crate::nemesis::{Active, Kind, CHAOS_LOGS_TO_KEEP, CHAOS_SNAPSHOT_AFTER};
use crate::recorder::Recorder;
use crate::scenario::{Scenario, Timing};
use crate::workload::{self, Ctx, HostError};
use crate::world::{node_ids, World};

/// What a run is asked to do.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub exe: PathBuf,
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    pub nodes: u32,
    pub transport: String,
    pub out: PathBuf,
    /// Ctrl-C: every phase gives up, and the run cleans up.
    pub interrupted: Arc<AtomicBool>,
    /// Planted bugs to switch on in every node (`chaos-bugs` builds only).
    pub bugs: Vec<String>,
    /// Prints the progress line.
    pub progress: bool,
}

const VOLUME: &str = "chaos";
/// Datasets of fewer replicas than nodes: a run that replaces nodes (three replicas), and
/// one that leaves the primary alone in the ISR (two: no other backup whose grows move the ISR
/// version meanwhile).
const THREE_REPLICAS: (&str, &str) = ("chaos-3", "3");
const TWO_REPLICAS: (&str, &str) = ("chaos-2", "2");
const VOLUME_BYTES: u64 = 64 << 20;
const HOST: &str = "chaos-host";
const REGISTER_CLIENTS: u64 = 4;
const SET_CLIENTS: u64 = 2;
const META_CLIENTS: u64 = 2;
/// Workloads run this long before the first fault, and after the heal before they stop.
const WARM_UP: Duration = Duration::from_secs(3);
const COOL_DOWN: Duration = Duration::from_secs(5);
/// Between two faults, the cluster gets this long (at least) to settle.
const GAP_MIN: Duration = Duration::from_secs(2);
const GAP_MAX: Duration = Duration::from_secs(4);
/// After the heal, every replica must be back in sync with identical data within this long.
const CONVERGE_WAIT: Duration = Duration::from_secs(90);

/// The raw outcome of a run, before the checker reads it.
#[derive(Debug, Serialize)]
pub struct RunRecord {
    pub scenario: String,
    pub seed: u64,
    pub nodes: u32,
    pub transport: String,
    pub commit: String,
    #[serde(skip)]
    pub timeline: Timeline,
    pub host_errors: Vec<HostError>,
    pub map_conflicts: Vec<String>,
    /// Replicas whose data differs from the others' at the end (node, its data digest).
    pub divergent: Vec<(u64, String)>,
    /// Why convergence was not reached, if it was not.
    pub converge_error: Option<String>,
    pub final_reads_failed: usize,
    /// The write made after the heal was not acknowledged.
    pub heal_write_failed: bool,
    pub faults_by_kind: Vec<(String, usize)>,
    pub bugs: Vec<String>,
}

/// The commit the suite was built from (`git describe`), if known.
pub fn commit() -> String {
    // The checkout the binary was built in, else the one it runs from (a build kept after its
    // clone was removed, as CI's is).
    [env!("CARGO_MANIFEST_DIR"), "."]
        .into_iter()
        .find_map(|dir| {
            std::process::Command::new("git")
                .args(["-C", dir, "describe", "--always", "--dirty"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn check_interrupted(opts: &RunOptions) -> anyhow::Result<()> {
    if opts.interrupted.load(Ordering::Relaxed) {
        return Err(anyhow!("interrupted"));
    }
    Ok(())
}

/// Sleeps `d` in short steps, giving up early on Ctrl-C.
fn pause(opts: &RunOptions, d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted(opts)?;
        std::thread::sleep(Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

fn between(rng: &mut Rng, (lo, hi): (Duration, Duration)) -> Duration {
    let span = hi.saturating_sub(lo).as_millis() as u64;
    lo + Duration::from_millis(if span == 0 { 0 } else { rng.below(span + 1) })
}

/// Starts the cluster in namespaces, creates the volume and the host the workloads use.
fn build_world(scenario: &Scenario, opts: &RunOptions, tag: u32) -> anyhow::Result<World> {
    // The nodes (started and restarted by this process) take their planted bugs from the
    // environment; a run without bugs clears it, so that a run after one with bugs (the tests
    // make one after another in one process) does not inherit them.
    let bugs = opts.bugs.join(",");
    if bugs.is_empty() {
        std::env::remove_var("TANDEM_CHAOS_BUGS");
    } else {
        std::env::set_var("TANDEM_CHAOS_BUGS", &bugs);
    }
    // Filled by the builder's hook (declared first: the builder borrows them).
    let layers: std::sync::Mutex<Vec<(u64, LazyFs)>> = Default::default();
    let cluster_dir: std::sync::Mutex<Option<PathBuf>> = Default::default();
    let mut builder = Cluster::builder()
        .exe(&opts.exe)
        .nodes(opts.nodes.max(scenario.nodes_min))
        .transport(&opts.transport)
        .prefix("tandem-chaos-")
        .without_turn()
        .in_namespaces(tag);
    let kinds = scenario.all_kinds();
    if kinds.iter().any(|k| k.needs_spare()) {
        builder = builder.spares(1);
    }
    let (snapshots, slow) = (kinds.iter().copied().any(Kind::needs_short_snapshots), kinds.contains(&Kind::SlowLink));
    if snapshots || slow {
        builder = builder.edit_config(move |toml| {
            let mut toml = toml.to_string();
            if snapshots {
                toml = set_key(&toml, "snapshot_after_entries", CHAOS_SNAPSHOT_AFTER);
                toml = set_key(&toml, "logs_to_keep", CHAOS_LOGS_TO_KEEP);
            }
            if slow {
                for (key, value) in SLOW_LINK_TIMINGS {
                    toml = set_key(&toml, key, value);
                }
            }
            toml
        });
    }
    // A power nemesis needs each node's data dir on a layer that can lose unsynced writes.
    if kinds.iter().any(|k| k.cuts_power()) {
        builder = builder.before_nodes_start(|dir, data_dirs| {
            *cluster_dir.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_path_buf());
            let mounted = mount_layers(dir, data_dirs).map_err(|e| format!("{e:#}"))?;
            layers.lock().unwrap_or_else(|p| p.into_inner()).extend(mounted);
            Ok(())
        });
    }
    let cluster = match builder.start() {
        Ok(c) => c,
        Err(e) => {
            // The cluster is gone (it removed what it could of its dir); the layers go now, and
            // then what was under them.
            for (_, fs) in layers.into_inner().unwrap_or_else(|p| p.into_inner()) {
                let _ = fs.unmount();
            }
            if let Some(dir) = cluster_dir.into_inner().unwrap_or_else(|p| p.into_inner()) {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(anyhow!("start the cluster: {e}"));
        }
    };
    let layers = layers.into_inner().unwrap_or_else(|p| p.into_inner());
    // The volume's id is filled in below; from here on a failure drops the world, which stops
    // the nodes before it unmounts their layers.
    let mut world = World::new(cluster, VOLUME.into(), 0, VOLUME_BYTES, HOST.into(), layers);
    let cluster = &world.cluster;
    let ids = cluster.member_ids();
    cluster.try_agreed_leader(&ids, Duration::from_secs(60)).map_err(|e| anyhow!("{e}"))?;
    let size = format!("{}M", VOLUME_BYTES >> 20);
    // A membership replace needs nodes that hold no replica: three replicas, not one per node.
    // A primary alone in the ISR with its one backup: two.
    let dataset = if kinds.contains(&Kind::ReplaceNode) {
        Some(THREE_REPLICAS)
    } else if kinds.contains(&Kind::IsolateAlonePrimary) {
        Some(TWO_REPLICAS)
    } else {
        None
    };
    if let Some((d, replicas)) = dataset {
        cluster
            .try_tandem(&["dataset", "create", d, "--replicas", replicas, "--cluster", cluster.path_str()])
            .map_err(|e| anyhow!("create the dataset: {e}"))?;
    }
    let v = tandem_testkit::queries::try_create_served_volume_in(cluster, VOLUME, &size, dataset.map(|d| d.0))
        .map_err(|e| anyhow!("create the volume: {e}"))?;
    let volume_id = v["id"].as_u64().context("the volume's id")?;
    let site = cluster.node_config(1)["site"].as_str().unwrap_or("local").to_string();
    let h = tandem_testkit::http_as(cluster.admin_token().as_deref());
    let api = cluster.api(1);
    let r = h.post(format!("{api}/v1/hosts")).json(&serde_json::json!({ "name": HOST, "site": site })).send()?;
    anyhow::ensure!(r.status().is_success(), "add the host: {} {}", r.status(), r.text().unwrap_or_default());
    let r = h.post(format!("{api}/v1/hosts/{HOST}/volumes")).json(&serde_json::json!({ "volume": VOLUME })).send()?;
    anyhow::ensure!(r.status().is_success(), "connect the host: {} {}", r.status(), r.text().unwrap_or_default());
    world.volume_id = volume_id;
    if slow {
        world.start_proxies(opts.seed).context("start the delay proxies")?;
    }
    Ok(world)
}

/// Mounts a [`LazyFs`] on each node's data dir, over a backing dir `<cluster dir>/lazyfs/node-N`.
fn mount_layers(dir: &Path, data_dirs: &[(u64, PathBuf)]) -> anyhow::Result<Vec<(u64, LazyFs)>> {
    let mut mounted = Vec::new();
    for (id, data_dir) in data_dirs {
        let backing = dir.join("lazyfs").join(format!("node-{id}"));
        std::fs::create_dir_all(&backing).with_context(|| format!("make {}", backing.display()))?;
        std::fs::create_dir_all(data_dir).with_context(|| format!("make {}", data_dir.display()))?;
        // On an error the layers mounted so far drop, and so unmount.
        mounted.push((*id, LazyFs::mount(&backing, data_dir)?));
    }
    Ok(mounted)
}

/// Raft timings of a run with `slow-link`: a Raft RPC may take one heartbeat interval, and a
/// slowed link adds up to 100 ms to a round trip (`tandem up`'s local 100 ms would not do).
const SLOW_LINK_TIMINGS: [(&str, u64); 3] =
    [("heartbeat_interval_ms", 250), ("election_timeout_min_ms", 1250), ("election_timeout_max_ms", 2500)];

/// `toml` with the line `key = ...` set to `value`.
fn set_key(toml: &str, key: &str, value: u64) -> String {
    let mut out: Vec<String> = toml
        .lines()
        .map(
            |l| if l.trim_start().starts_with(&format!("{key} ")) { format!("{key} = {value}") } else { l.to_string() },
        )
        .collect();
    out.push(String::new());
    out.join("\n")
}

/// Marks elections and failovers on the timeline as the cluster reports them.
fn monitor(world: Arc<World>, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let mut leader: Option<u64> = None;
    let mut primary: Option<(u64, u64)> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Some(l) = world.leader() {
            if leader != Some(l) {
                if leader.is_some() {
                    rec.mark(MarkKind::Election, format!("node {l} leads"));
                }
                leader = Some(l);
            }
        }
        if let Some(v) = world.volume_record() {
            if let (Some(p), Some(e)) = (v["primary"].as_u64(), v["epoch"].as_u64()) {
                if primary.map(|(pp, _)| pp) != Some(p) {
                    if let Some((old, _)) = primary {
                        rec.mark(MarkKind::Failover, format!("primary {old} -> {p} (epoch {e})"));
                    }
                }
                primary = Some((p, e));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The [`monitor`] thread, stopped and joined when dropped: on every return from [`drive`], also
/// an early one on an error or Ctrl-C, so that its handle on the world never outlives the run
/// (the world, dropped last, stops the nodes and removes namespaces and mounts).
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One step of the schedule: the kinds to start together, and for how long.
#[derive(Clone, Debug)]
pub struct Step {
    pub kinds: Vec<Kind>,
    pub hold: Duration,
    pub gap: Duration,
}

/// The schedule a seed gives for a scenario: the same seed, the same steps.
pub fn schedule(scenario: &Scenario, seed: u64, duration: Duration, nodes: u32) -> Vec<Step> {
    if let Timing::Fixed(steps) = &scenario.timing {
        return steps.iter().map(|&(kind, hold, gap)| Step { kinds: vec![kind], hold, gap }).collect();
    }
    let mut rng = Rng::new(seed ^ 0x5ced_u64);
    let usable: Vec<Kind> = scenario.kinds.iter().copied().filter(|k| nodes >= 5 || !k.needs_five()).collect();
    let mut steps = Vec::new();
    let mut t = Duration::ZERO;
    while t < duration && !usable.is_empty() {
        let first = usable[rng.below(usable.len() as u64) as usize];
        let mut kinds = vec![first];
        kinds.extend(scenario.with.iter().copied().filter(|k| *k != first));
        // Drawn even when pinned, so that the rest of the schedule is the same.
        let drawn = between(&mut rng, first.hold());
        let hold = match scenario.timing {
            Timing::Hold(hold) => hold,
            _ => drawn,
        };
        let gap = between(&mut rng, (GAP_MIN, GAP_MAX));
        t += hold + gap;
        steps.push(Step { kinds, hold, gap });
    }
    steps
}

fn progress(opts: &RunOptions, scenario: &str, phase: &str, faults: usize, rec: &Recorder) {
    if opts.progress {
        eprint!("\r\x1b[2K{scenario} seed {}: {phase:<10} faults {faults:>3}  ops {:>7}", opts.seed, rec.ops());
    }
}

/// Runs `scenario` with `opts`; the record the checker reads, written under `opts.out`.
pub fn run(scenario: &Scenario, opts: &RunOptions, tag: u32) -> anyhow::Result<RunRecord> {
    std::fs::create_dir_all(&opts.out).with_context(|| format!("make {}", opts.out.display()))?;
    let nodes = opts.nodes.max(scenario.nodes_min);
    let steps = schedule(scenario, opts.seed, opts.duration, nodes);
    let world = Arc::new(build_world(scenario, opts, tag)?);
    let result = check_failpoints_build(scenario, &world).and_then(|()| drive(scenario, opts, &world, &steps));
    copy_logs(&world, &opts.out);
    // The world (cluster, namespaces) drops here, whatever happened.
    result
}

/// A scenario that sets failpoints runs only on nodes that have them: otherwise every fault
/// would fail to start and the run would test nothing.
fn check_failpoints_build(scenario: &Scenario, world: &World) -> anyhow::Result<()> {
    if !scenario.needs_failpoints() {
        return Ok(());
    }
    // Clearing a failpoint nobody set changes nothing; a build without them answers 404.
    world
        .set_failpoint(world.nodes[0], "journal-before-fsync", "off")
        .with_context(|| format!("scenario {} sets failpoints", scenario.name))
}

fn copy_logs(world: &World, out: &Path) {
    let dir = out.join("logs");
    let _ = std::fs::create_dir_all(&dir);
    for n in world.cluster.node_ids() {
        let _ = std::fs::copy(world.cluster.log_path(n), dir.join(format!("node-{n}.log")));
    }
}

fn drive(scenario: &Scenario, opts: &RunOptions, world: &Arc<World>, steps: &[Step]) -> anyhow::Result<RunRecord> {
    let rec = Arc::new(Recorder::create(&opts.out.join("history.jsonl"))?);
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Ctx::new(world.clone(), rec.clone(), stop.clone()));
    let mut threads = Vec::new();
    let mut seeds = Rng::new(opts.seed);
    let mut process = 0u64;
    for _ in 0..REGISTER_CLIENTS {
        let (c, s) = (ctx.clone(), seeds.next_u64());
        threads.push(std::thread::spawn(move || workload::register_client(c, process, s)));
        process += 1;
    }
    for i in 0..SET_CLIENTS {
        let c = ctx.clone();
        let p = process;
        threads.push(std::thread::spawn(move || workload::set_client(c, p, SET_CLIENTS.max(i + 1))));
        process += 1;
    }
    for _ in 0..META_CLIENTS {
        let (c, s, p) = (ctx.clone(), seeds.next_u64(), process);
        threads.push(std::thread::spawn(move || workload::meta_client(c, p, s)));
        process += 1;
    }
    {
        let (c, p) = (ctx.clone(), process);
        threads.push(std::thread::spawn(move || workload::paths_watcher(c, p)));
        process += 1;
    }
    for fresh in [false, true] {
        for &node in &world.nodes {
            let (c, s, p) = (ctx.clone(), seeds.next_u64(), process);
            threads.push(std::thread::spawn(move || workload::pinned_reader(c, p, node, s, fresh)));
            process += 1;
        }
    }
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let mon = {
        let (w, r, s) = (world.clone(), rec.clone(), monitor_stop.clone());
        Monitor { stop: monitor_stop, thread: Some(std::thread::spawn(move || monitor(w, r, s))) }
    };
    let outcome = faults_and_heal(scenario, opts, world, &rec, steps);
    // Whatever happened, the clients stop and every fault is taken back.
    let heal_error = world.heal_all().err();
    let converge = outcome.as_ref().ok().map(|_| converge(opts, world, &rec));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let faults = outcome?;
    if let Some(e) = heal_error {
        return Err(e.context("heal"));
    }
    check_interrupted(opts)?;
    progress(opts, &scenario.name, "reading", faults.len(), &rec);
    rec.mark(MarkKind::Phase, "final reads");
    let reader = world.primary().unwrap_or(world.nodes[0]);
    let heal_write_failed = !workload::final_write(&ctx, process, reader);
    let final_reads_failed = workload::final_reads(&ctx, process, reader);
    workload::final_meta_reads(&ctx, process + 1, reader);
    let divergent = match &converge {
        Some(Ok(_)) => divergence(world),
        _ => Vec::new(),
    };
    drop(mon);
    rec.mark(MarkKind::Phase, "end");
    let mut timeline = Timeline::from_events(&rec.events());
    let (faults_start, heal) = phase_times(&timeline);
    timeline.faults_start = faults_start;
    timeline.heal = heal;
    let mut by_kind: std::collections::BTreeMap<String, usize> = Default::default();
    for f in &timeline.faults {
        *by_kind.entry(f.kind.clone()).or_default() += 1;
    }
    if opts.progress {
        eprintln!();
    }
    let host_errors = ctx.host_errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let map_conflicts = ctx.map_conflicts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(RunRecord {
        scenario: scenario.name.clone(),
        seed: opts.seed,
        nodes: world.nodes.len() as u32,
        transport: opts.transport.clone(),
        commit: commit(),
        timeline,
        host_errors,
        map_conflicts,
        divergent,
        converge_error: converge.and_then(|c| c.err()).map(|e| format!("{e:#}")),
        final_reads_failed,
        heal_write_failed,
        faults_by_kind: by_kind.into_iter().collect(),
        bugs: opts.bugs.clone(),
    })
}

/// The times of the "faults begin" and "heal" marks.
fn phase_times(t: &Timeline) -> (u64, u64) {
    let at = |label: &str| t.marks.iter().find(|m| m.kind == MarkKind::Phase && m.label == label).map(|m| m.time);
    let start = at("faults begin").unwrap_or(0);
    (start, at("heal").unwrap_or(t.end).max(start))
}

/// Warm-up, the scheduled faults, then the heal; the faults injected.
fn faults_and_heal(
    scenario: &Scenario,
    opts: &RunOptions,
    world: &World,
    rec: &Recorder,
    steps: &[Step],
) -> anyhow::Result<Vec<Fault>> {
    let mut rng = Rng::new(opts.seed.rotate_left(17));
    progress(opts, &scenario.name, "warm-up", 0, rec);
    pause(opts, WARM_UP)?;
    rec.mark(MarkKind::Phase, "faults begin");
    let mut faults = Vec::new();
    let mut fault_id = 0u64;
    for step in steps {
        check_interrupted(opts)?;
        let mut active = Vec::new();
        for &kind in &step.kinds {
            let start = rec.now();
            match Active::start(kind, world, &mut rng, fault_id) {
                Ok(a) => active.push((a, start, fault_id)),
                Err(e) => rec.mark(MarkKind::Phase, format!("{} could not start: {e:#}", kind.name())),
            }
            fault_id += 1;
        }
        progress(opts, &scenario.name, "faults", faults.len() + active.len(), rec);
        let held = pause(opts, step.hold);
        for (a, start, id) in active.into_iter().rev() {
            let (kind, target) = (a.kind.name().to_string(), a.target.clone());
            let stopped = a.stop(world, id);
            let f = Fault { kind, target, start, stop: Some(rec.now()) };
            rec.fault(f.clone());
            faults.push(f);
            stopped.with_context(|| "stop a fault".to_string())?;
        }
        held?;
        progress(opts, &scenario.name, "faults", faults.len(), rec);
        pause(opts, step.gap)?;
    }
    world.heal_all()?;
    rec.mark(MarkKind::Phase, "heal");
    progress(opts, &scenario.name, "heal", faults.len(), rec);
    pause(opts, COOL_DOWN)?;
    Ok(faults)
}

/// Waits until every replica is back in the volume's ISR.
fn converge(opts: &RunOptions, world: &World, rec: &Recorder) -> anyhow::Result<()> {
    progress(opts, "", "converging", 0, rec);
    let deadline = Instant::now() + CONVERGE_WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        check_interrupted(opts)?;
        if let Some(v) = world.volume_record() {
            let mut isr = node_ids(&v["isr"]).unwrap_or_default();
            isr.sort_unstable();
            if isr == replicas(world) {
                rec.mark(MarkKind::Phase, "in sync");
                return Ok(());
            }
            last = format!("ISR {isr:?}, epoch {}", v["epoch"]);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(anyhow!("the replicas were not back in sync {CONVERGE_WAIT:?} after the heal: last seen {last}"))
}

/// The nodes that hold a replica of the volume (every node, unless its dataset has fewer).
fn replicas(world: &World) -> Vec<u64> {
    let mut r = world.volume_nodes("replicas").unwrap_or_default();
    r.sort_unstable();
    if r.is_empty() {
        world.nodes.clone()
    } else {
        r
    }
}

/// Every replica's own data digest; the replicas that differ from the majority's digest.
fn divergence(world: &World) -> Vec<(u64, String)> {
    let mut digests = Vec::new();
    for n in replicas(world) {
        let v = world.get(n, "/v1/local/volumes?data=true");
        let d = v
            .and_then(|v| {
                v["volumes"].as_array()?.iter().find(|x| x["name"] == world.volume.as_str())?["data_digest"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unavailable".into());
        digests.push((n, d));
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, d) in &digests {
        *counts.entry(d.as_str()).or_default() += 1;
    }
    let majority = counts.iter().max_by_key(|(_, c)| **c).map(|(d, _)| d.to_string()).unwrap_or_default();
    digests.into_iter().filter(|(_, d)| *d != majority).collect()
}
