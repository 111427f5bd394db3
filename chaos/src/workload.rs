//! The workloads every scenario runs, each client a thread that records every operation it
//! makes (invoke, then ok / fail / info):
//!
//! - `register`: NBD clients reading and overwriting a few hot blocks (self-describing
//!   contents, [`crate::block`]), one node each, moving to the next node when theirs fails;
//!   Beside them, one pinned reader per node reads the hot blocks through that node only;
//! - `set`: NBD clients writing blocks no one else writes, each once;
//! - `meta`: HTTP clients reading, writing and compare-and-setting settings (linearizable);
//! - `paths`: a host's path-map watcher (long-poll): generations never go back, and two
//!   answers with one generation carry one map.
//!
//! Outcomes: a write the cluster did not answer with success is `info` (it may still land: an
//! NBD error after the primary sequenced it, a timeout); a failed read is `fail` (it changed
//! nothing); a compare-and-set refused with 409 is `fail`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tandem_testkit::{NbdClient, NbdError, Rng};

use crate::block::{decode, encode, Content, BLOCK_BYTES};
use crate::history::{Call, Outcome, Workload};
use crate::recorder::Recorder;
use crate::world::World;

/// How long an NBD client waits for one request before it counts it as unknown: longer than a
/// failover, shorter than a host's own timeout (30 s and more).
pub const NBD_TIMEOUT: Duration = Duration::from_secs(15);
const NBD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HTTP_TIMEOUT: Duration = Duration::from_secs(8);
/// Between two operations of one client: keeps the history a checker can read in seconds.
const THINK: Duration = Duration::from_millis(15);
/// The register workload's hot blocks.
pub const HOT_BLOCKS: u64 = 6;
/// Where the set workload's blocks start (MiB into the volume).
pub const SET_BASE_BLOCK: u64 = 1024;
/// The meta workload's registers (settings).
pub const META_KEYS: u64 = 3;
/// A path-map watch waits this long for a newer map.
const WATCH_WAIT_MS: u64 = 3000;

/// A host-visible error: an NBD error reply, and whether a fault touched the node then.
#[derive(Clone, Debug, Serialize)]
pub struct HostError {
    pub time_s: f64,
    pub node: u64,
    pub op: String,
    pub error: String,
    /// A fault touched the node (stopped, killed, cut off): an error is expected there. An
    /// error from a node no fault touched is a failure of its own.
    pub expected: bool,
}

/// What the clients share.
pub struct Ctx {
    pub world: Arc<World>,
    pub rec: Arc<Recorder>,
    pub stop: Arc<AtomicBool>,
    values: AtomicU64,
    pub host_errors: Mutex<Vec<HostError>>,
    /// Every path map seen, by generation (its volumes, as JSON text), and the conflicts.
    maps: Mutex<BTreeMap<u64, String>>,
    pub map_conflicts: Mutex<Vec<String>>,
    /// The set workload's blocks that were written (acknowledged or not).
    pub set_blocks: Mutex<Vec<u64>>,
}

impl Ctx {
    pub fn new(world: Arc<World>, rec: Arc<Recorder>, stop: Arc<AtomicBool>) -> Ctx {
        Ctx {
            world,
            rec,
            stop,
            values: AtomicU64::new(1),
            host_errors: Mutex::new(Vec::new()),
            maps: Mutex::new(BTreeMap::new()),
            map_conflicts: Mutex::new(Vec::new()),
            set_blocks: Mutex::new(Vec::new()),
        }
    }

    /// A value no other write of the run has.
    fn next_value(&self) -> u64 {
        self.values.fetch_add(1, Ordering::Relaxed)
    }

    fn host_error(&self, node: u64, op: &str, error: &str, touched_at_invoke: bool) {
        let expected = touched_at_invoke || self.world.touched(node);
        let time_s = self.rec.now() as f64 / 1e9;
        self.host_errors.lock().unwrap_or_else(|p| p.into_inner()).push(HostError {
            time_s,
            node,
            op: op.into(),
            error: error.into(),
            expected,
        });
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// An NBD connection to one node at a time; the next node after a broken one.
struct NbdPath {
    nodes: Vec<u64>,
    next: usize,
    conn: Option<(u64, NbdClient)>,
}

impl NbdPath {
    fn new(nodes: Vec<u64>, first: usize) -> NbdPath {
        NbdPath { nodes, next: first, conn: None }
    }

    fn get(&mut self, ctx: &Ctx) -> Option<(u64, &mut NbdClient)> {
        if self.conn.is_none() {
            let node = self.nodes[self.next % self.nodes.len()];
            self.next += 1;
            match NbdClient::connect_with(ctx.world.nbd_addr(node), &ctx.world.volume, NBD_CONNECT_TIMEOUT, NBD_TIMEOUT)
            {
                Ok(c) => self.conn = Some((node, c)),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    return None;
                }
            }
        }
        self.conn.as_mut().map(|(n, c)| (*n, c))
    }

    fn broken(&mut self) {
        self.conn = None;
    }
}

/// One NBD write of a self-describing block, recorded.
fn nbd_write(ctx: &Ctx, path: &mut NbdPath, process: u64, workload: Workload, block: u64) -> bool {
    let Some((node, client)) = path.get(ctx) else { return false };
    let value = ctx.next_value();
    let data = encode(ctx.world.volume_id, block, process, value);
    let key = format!("{}/{block}", ctx.world.volume);
    let touched = ctx.world.touched(node);
    let id = ctx.rec.invoke(process, workload, &key, Call::Write { value }, node);
    match client.write(block * BLOCK_BYTES as u64, &data) {
        Ok(()) => ctx.rec.complete(id, Outcome::Ok { read: None }, None),
        Err(e) => {
            let msg = e.to_string();
            ctx.rec.complete(id, Outcome::Info, Some(msg.clone()));
            if let NbdError::Refused(_) = e {
                ctx.host_error(node, "write", &msg, touched);
            }
            path.broken();
        }
    }
    true
}

/// One NBD read of a block, recorded; what it returned.
fn nbd_read(ctx: &Ctx, path: &mut NbdPath, process: u64, workload: Workload, block: u64) -> Option<Content> {
    let (node, client) = path.get(ctx)?;
    let key = format!("{}/{block}", ctx.world.volume);
    let touched = ctx.world.touched(node);
    let id = ctx.rec.invoke(process, workload, &key, Call::Read, node);
    match client.read(block * BLOCK_BYTES as u64, BLOCK_BYTES) {
        Ok(b) => {
            let content = decode(ctx.world.volume_id, block, &b);
            let error = match &content {
                Content::Unrecognized(why) => Some(why.clone()),
                _ => None,
            };
            ctx.rec.complete(id, Outcome::Ok { read: Some(content.value()) }, error);
            Some(content)
        }
        Err(e) => {
            let msg = e.to_string();
            ctx.rec.complete(id, Outcome::Fail, Some(msg.clone()));
            if let NbdError::Refused(_) = e {
                ctx.host_error(node, "read", &msg, touched);
            }
            path.broken();
            None
        }
    }
}

/// A register client: reads and overwrites the hot blocks until stopped.
pub fn register_client(ctx: Arc<Ctx>, process: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut path = NbdPath::new(ctx.world.nodes.clone(), process as usize);
    while !ctx.stopped() {
        let block = rng.below(HOT_BLOCKS);
        if rng.below(2) == 0 {
            nbd_read(&ctx, &mut path, process, Workload::Register, block);
        } else {
            nbd_write(&ctx, &mut path, process, Workload::Register, block);
        }
        std::thread::sleep(THINK);
    }
}

/// A pinned reader: reads through one node only, whatever happens to it (a host whose only
/// path is that node), the hot blocks or (`fresh`) the set blocks written last. Readers never
/// write, so a node cut off from the others is asked to serve reads while the rest of the
/// cluster moves on: a stale read there is a linearizability violation (a deposed primary
/// serving without its lease, a read of a write that was never acknowledged). A hot block may
/// have a write stuck at a cut-off primary, which a read there rightly waits for, holding the
/// reader up; a fresh set block, written through the new primary, has none: hence the two.
pub fn pinned_reader(ctx: Arc<Ctx>, process: u64, node: u64, seed: u64, fresh: bool) {
    let mut rng = Rng::new(seed);
    let mut path = NbdPath::new(vec![node], 0);
    while !ctx.stopped() {
        let recent = fresh.then(|| {
            let set = ctx.set_blocks.lock().unwrap_or_else(|p| p.into_inner());
            let n = set.len().min(RECENT_SET_BLOCKS);
            (n > 0).then(|| set[set.len() - 1 - rng.below(n as u64) as usize])
        });
        let (workload, block) = match recent {
            Some(Some(b)) => (Workload::Set, b),
            Some(None) => {
                std::thread::sleep(THINK);
                continue;
            }
            None => (Workload::Register, rng.below(HOT_BLOCKS)),
        };
        if nbd_read(&ctx, &mut path, process, workload, block).is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(THINK);
    }
}

/// How many of the set's latest blocks a pinned reader picks from.
const RECENT_SET_BLOCKS: usize = 16;

/// A set client: writes blocks of its own, each once, until stopped.
pub fn set_client(ctx: Arc<Ctx>, process: u64, clients: u64) {
    let mut path = NbdPath::new(ctx.world.nodes.clone(), process as usize);
    let blocks = ctx.world.volume_bytes / BLOCK_BYTES as u64;
    let mut k = 0u64;
    while !ctx.stopped() {
        let block = SET_BASE_BLOCK + k * clients + process % clients;
        if block >= blocks {
            break;
        }
        // Each block is written once, acknowledged or not: a write whose outcome is unknown
        // stays unknown (a retry of the same block would paper over replicas that disagree
        // about it), and the final reads read it back too.
        let acked = nbd_write(&ctx, &mut path, process, Workload::Set, block);
        ctx.set_blocks.lock().unwrap_or_else(|p| p.into_inner()).push(block);
        k += 1;
        if !acked {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(THINK);
    }
}

/// After the heal: one write of a block no one else writes, through `node` (retried on a
/// broken connection); whether it was acknowledged. The final reads read it back.
pub fn final_write(ctx: &Ctx, process: u64, node: u64) -> bool {
    let mut path = NbdPath::new(vec![node], 0);
    let block = ctx.world.volume_bytes / BLOCK_BYTES as u64 - 1;
    for _ in 0..3 {
        let before = ctx.rec.ops();
        if nbd_write(ctx, &mut path, process, Workload::Set, block) {
            ctx.set_blocks.lock().unwrap_or_else(|p| p.into_inner()).push(block);
            if path.conn.is_some() && ctx.rec.ops() > before {
                return true;
            }
        }
    }
    false
}

/// After the heal: one read of every hot block and every set block, through `node` (recorded
/// like any read); how many reads failed.
pub fn final_reads(ctx: &Ctx, process: u64, node: u64) -> usize {
    let mut path = NbdPath::new(vec![node], 0);
    let mut failed = 0;
    let mut set: Vec<u64> = ctx.set_blocks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    set.sort_unstable();
    set.dedup();
    let reads = (0..HOT_BLOCKS).map(|b| (Workload::Register, b)).chain(set.into_iter().map(|b| (Workload::Set, b)));
    for (workload, block) in reads {
        let mut ok = false;
        for _ in 0..3 {
            if nbd_read(ctx, &mut path, process, workload, block).is_some() {
                ok = true;
                break;
            }
        }
        failed += usize::from(!ok);
    }
    failed
}

fn meta_value(text: &str) -> Option<u64> {
    text.strip_prefix('w')?.parse().ok()
}

/// A meta client: reads, writes and compare-and-sets settings through one node after another.
pub fn meta_client(ctx: Arc<Ctx>, process: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let client = ctx.world.http(HTTP_TIMEOUT);
    let nodes = ctx.world.nodes.clone();
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut at = process as usize;
    while !ctx.stopped() {
        let node = nodes[at % nodes.len()];
        let k = rng.below(META_KEYS);
        let key = format!("chaos-m{k}");
        let url = format!("{}/v1/settings/{key}", ctx.world.api(node));
        let roll = rng.below(10);
        let (call, body) = if roll < 4 {
            (Call::Read, None)
        } else if roll < 7 {
            let value = ctx.next_value();
            (Call::Write { value }, Some(serde_json::json!({ "value": format!("w{value}") })))
        } else {
            let value = ctx.next_value();
            let expect = seen.get(&k).copied().unwrap_or(0);
            let expect_json = if expect == 0 { serde_json::Value::Null } else { format!("w{expect}").into() };
            (
                Call::Cas { expect, new: value },
                Some(serde_json::json!({ "value": format!("w{value}"), "expect": expect_json })),
            )
        };
        let id = ctx.rec.invoke(process, Workload::Meta, &key, call, node);
        let resp = match &body {
            None => client.get(&url).send(),
            Some(b) => client.put(&url).json(b).send(),
        };
        let (outcome, error) = match resp {
            Err(e) => {
                at += 1;
                (if body.is_none() { Outcome::Fail } else { Outcome::Info }, Some(e.to_string()))
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().unwrap_or_default();
                match (call, status) {
                    (Call::Read, 200) => {
                        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        let value = v["value"].as_str().and_then(meta_value).unwrap_or(crate::history::UNRECOGNIZED);
                        seen.insert(k, value);
                        (Outcome::Ok { read: Some(value) }, None)
                    }
                    (Call::Read, 404) => {
                        seen.insert(k, 0);
                        (Outcome::Ok { read: Some(0) }, None)
                    }
                    (Call::Read, _) => {
                        at += 1;
                        (Outcome::Fail, Some(format!("{status} {text}")))
                    }
                    (Call::Write { value }, 200 | 201) | (Call::Cas { new: value, .. }, 200 | 201) => {
                        seen.insert(k, value);
                        (Outcome::Ok { read: None }, None)
                    }
                    // Refused before anything was proposed: a bad request, a compare that failed.
                    (_, 400 | 409 | 422) => (Outcome::Fail, Some(format!("{status} {text}"))),
                    _ => {
                        at += 1;
                        (Outcome::Info, Some(format!("{status} {text}")))
                    }
                }
            }
        };
        ctx.rec.complete(id, outcome, error);
        std::thread::sleep(THINK);
    }
}

/// After the heal: one linearizable read of every meta key through `node`.
pub fn final_meta_reads(ctx: &Ctx, process: u64, node: u64) {
    let client = ctx.world.http(HTTP_TIMEOUT);
    for k in 0..META_KEYS {
        let key = format!("chaos-m{k}");
        for _ in 0..3 {
            let id = ctx.rec.invoke(process, Workload::Meta, &key, Call::Read, node);
            let url = format!("{}/v1/settings/{key}", ctx.world.api(node));
            match client.get(&url).send() {
                Ok(r) if r.status().as_u16() == 200 => {
                    let v: serde_json::Value = r.json().unwrap_or_default();
                    let value = v["value"].as_str().and_then(meta_value).unwrap_or(crate::history::UNRECOGNIZED);
                    ctx.rec.complete(id, Outcome::Ok { read: Some(value) }, None);
                    break;
                }
                Ok(r) if r.status().as_u16() == 404 => {
                    ctx.rec.complete(id, Outcome::Ok { read: Some(0) }, None);
                    break;
                }
                Ok(r) => ctx.rec.complete(id, Outcome::Fail, Some(r.status().to_string())),
                Err(e) => ctx.rec.complete(id, Outcome::Fail, Some(e.to_string())),
            }
        }
    }
}

/// A path-map watcher: long-polls the host's map through one node after another.
pub fn paths_watcher(ctx: Arc<Ctx>, process: u64) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(WATCH_WAIT_MS) + HTTP_TIMEOUT)
        .build()
        .expect("an HTTP client");
    let nodes = ctx.world.nodes.clone();
    let mut at = process as usize;
    let mut since = 0u64;
    while !ctx.stopped() {
        let node = nodes[at % nodes.len()];
        let url =
            format!("{}/v1/hosts/{}/paths?since={since}&wait_ms={WATCH_WAIT_MS}", ctx.world.api(node), ctx.world.host);
        let id = ctx.rec.invoke(process, Workload::Paths, &ctx.world.host, Call::Watch, node);
        match client.get(&url).send().and_then(|r| r.error_for_status()).and_then(|r| r.json::<serde_json::Value>()) {
            Ok(v) => {
                let generation = v["generation"].as_u64().unwrap_or(0);
                let map = v["volumes"].to_string();
                let mut maps = ctx.maps.lock().unwrap_or_else(|p| p.into_inner());
                match maps.get(&generation) {
                    Some(known) if *known != map => {
                        ctx.map_conflicts.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                            "generation {generation}: node {node} served {map}, another answer was {known}"
                        ));
                    }
                    Some(_) => {}
                    None => {
                        maps.insert(generation, map);
                    }
                }
                drop(maps);
                ctx.rec.complete(id, Outcome::Ok { read: Some(generation) }, None);
                since = since.max(generation);
            }
            Err(e) => {
                ctx.rec.complete(id, Outcome::Fail, Some(e.to_string()));
                at += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // Some watches go to the next node even when this one answers, so every node's maps
        // are compared.
        at += 1;
    }
}
