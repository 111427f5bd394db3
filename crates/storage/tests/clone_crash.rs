//! A process cloning ranges by reference (`clone_range`, as a replica applies a clone record or
//! makes a token's image) killed in the middle of its work, then the store reopened and checked.
//! This test binary runs itself again as the child (`child_cloner`, active only when
//! `CHILD_DIR_ENV` is set): from a seed it runs a sequence of writes, clones between volumes
//! (some over 16 MiB, so that `clone_range` works in several steps, each a change of its own),
//! images made the way the data plane makes them (a new volume, then a clone into it) and
//! deletions, printing each operation's index before it starts and, from a flusher thread, the
//! index of the last one made durable. The parent kills it (SIGKILL after a random number of
//! flushes; or, in a `failpoints` build, an abort at the failpoint between two steps of a
//! clone), reopens the store and checks:
//! - the store's own check (`SledStore::check`): every reference count equals the block-map
//!   slots that use the block, so nothing is freed while referenced and nothing leaks;
//! - the volumes and their blocks are those after some prefix of the operations, no shorter
//!   than the last durable one, where the operation after the prefix, if a clone, may be
//!   partly applied: each of its target blocks holds either its old bytes or the source's,
//!   whole (a block's index checksum and its bytes both match one of the two), never garbage;
//! - then every mapped block is overwritten in one volume and another volume and every image
//!   are deleted: the other volumes still read the bytes they shared with them, before and
//!   after another reopen, and the check still passes.
//!
//! Randomized: each round prints its seed; `TANDEM_CLONE_CRASH_SEED=N` replays one.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_storage::{BlockStore, SledStore};
use tandem_types::{VolumeId, BLOCK_BYTES};

const CHILD_DIR_ENV: &str = "TANDEM_STORAGE_CLONE_CRASH_DIR";
const CHILD_SEED_ENV: &str = "TANDEM_STORAGE_CLONE_CRASH_CHILD_SEED";
/// In a `failpoints` build: abort at this evaluation of the failpoint between clone steps.
const CHILD_ABORT_AT_ENV: &str = "TANDEM_STORAGE_CLONE_CRASH_ABORT_AT";
const SEED_ENV: &str = "TANDEM_CLONE_CRASH_SEED";
/// The volumes the child creates first; images get ids from `IMAGE_ID_BASE` up.
const VOLUMES: u64 = 3;
/// 256 MiB: a clone of most of a volume takes a dozen of the store's 16 MiB steps.
const VOLUME_BLOCKS: u64 = 1 << 16;
const IMAGE_ID_BASE: u64 = 100;
const B: usize = BLOCK_BYTES as usize;
/// How long the child may take to reach the kill point, and the parent to read its output.
const CHILD_WAIT: Duration = Duration::from_secs(120);
const ROUNDS: u64 = 3;

/// A block's content is named by the write that made it: (write index, volume, block); its
/// bytes are derived from that (see [`content`]), so a block moved by clones keeps its name.
type Tag = (u64, u64, u64);

fn content(tag: Tag) -> Vec<u8> {
    let (i, v, b) = tag;
    let mut out = Vec::with_capacity(B);
    out.extend_from_slice(&i.to_le_bytes());
    out.extend_from_slice(&v.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out.extend((24..B).map(|k| (k as u64 ^ i.wrapping_mul(31) ^ v.wrapping_mul(131) ^ b.wrapping_mul(7)) as u8));
    out
}

/// A small seeded generator (splitmix64): the child and the parent derive the same operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Create { vol: u64, blocks: u64 },
    Write { vol: u64, b0: u64, n: u64 },
    Clone { src: u64, s0: u64, dst: u64, d0: u64, n: u64 },
    Delete { vol: u64 },
}

/// The volumes after some operations: size in blocks and the tags of the written blocks.
#[derive(Clone, Default)]
struct Model {
    vols: BTreeMap<u64, (u64, BTreeMap<u64, Tag>)>,
}

impl Model {
    fn apply(&mut self, i: u64, op: Op) {
        match op {
            Op::Create { vol, blocks } => {
                self.vols.insert(vol, (blocks, BTreeMap::new()));
            }
            Op::Write { vol, b0, n } => {
                let map = &mut self.vols.get_mut(&vol).expect("planned on a live volume").1;
                for b in b0..b0 + n {
                    map.insert(b, (i, vol, b));
                }
            }
            Op::Clone { src, s0, dst, d0, n } => {
                let moved: Vec<(u64, Tag)> =
                    self.vols[&src].1.range(s0..s0 + n).map(|(b, t)| (b - s0 + d0, *t)).collect();
                let map = &mut self.vols.get_mut(&dst).expect("planned on a live volume").1;
                let stale: Vec<u64> = map.range(d0..d0 + n).map(|(b, _)| *b).collect();
                for b in stale {
                    map.remove(&b);
                }
                map.extend(moved);
            }
            Op::Delete { vol } => {
                self.vols.remove(&vol);
            }
        }
    }
}

/// The operations of a seed, generated against the model as it goes (they name live volumes
/// and ranges inside them). Op 0 to `VOLUMES - 1` create the volumes.
struct Plan {
    rng: Rng,
    model: Model,
    next_image: u64,
    /// An image being made: its clone comes right after its creation, as in the data plane.
    pending_image_clone: Option<Op>,
}

impl Plan {
    fn new(seed: u64) -> Plan {
        Plan { rng: Rng(seed), model: Model::default(), next_image: IMAGE_ID_BASE, pending_image_clone: None }
    }

    fn next_op(&mut self, i: u64) -> Op {
        let op = self.choose(i);
        self.model.apply(i, op);
        op
    }

    fn choose(&mut self, i: u64) -> Op {
        if i < VOLUMES {
            return Op::Create { vol: i + 1, blocks: VOLUME_BLOCKS };
        }
        if let Some(op) = self.pending_image_clone.take() {
            return op;
        }
        let r = &mut self.rng;
        let vols: Vec<(u64, u64)> = self.model.vols.iter().map(|(v, (n, _))| (*v, *n)).collect();
        let pick = |r: &mut Rng, only_volumes: bool| -> (u64, u64) {
            let pool: Vec<(u64, u64)> = vols.iter().copied().filter(|(v, _)| !only_volumes || *v <= VOLUMES).collect();
            pool[r.below(pool.len() as u64) as usize]
        };
        // A range of `n` blocks: mostly small, sometimes most of a volume (several steps).
        let len = |r: &mut Rng, max: u64| -> u64 {
            match r.below(10) {
                0 | 1 => (VOLUME_BLOCKS / 3 + r.below(VOLUME_BLOCKS / 2)).min(max),
                2 | 3 => (1 + r.below(4096)).min(max),
                _ => (1 + r.below(64)).min(max),
            }
        };
        match r.below(20) {
            0..=9 => {
                let (vol, size) = pick(r, false);
                let n = 1 + r.below(16.min(size));
                Op::Write { vol, b0: r.below(size - n + 1), n }
            }
            10..=15 => {
                let (src, ssize) = pick(r, false);
                let (dst, dsize) = pick(r, true);
                let n = len(r, ssize.min(dsize));
                let s0 = r.below(ssize - n + 1);
                let mut d0 = r.below(dsize - n + 1);
                if src == dst && s0 < d0 + n && d0 < s0 + n {
                    // Within one volume the ranges must not overlap: a small piece elsewhere.
                    let n = n.min(64);
                    d0 = if s0 >= n { 0 } else { s0 + n };
                    return Op::Clone { src, s0, dst, d0, n };
                }
                Op::Clone { src, s0, dst, d0, n }
            }
            16..=17 => {
                // An image of a range of a volume, as a token's: a new volume, then the clone.
                let (src, size) = pick(r, true);
                let n = len(r, size);
                let s0 = r.below(size - n + 1);
                let vol = self.next_image;
                self.next_image += 1;
                self.pending_image_clone = Some(Op::Clone { src, s0, dst: vol, d0: 0, n });
                Op::Create { vol, blocks: n }
            }
            _ => {
                let images: Vec<u64> = vols.iter().map(|(v, _)| *v).filter(|v| *v >= IMAGE_ID_BASE).collect();
                if images.is_empty() {
                    let (vol, size) = pick(r, false);
                    return Op::Write { vol, b0: r.below(size), n: 1 };
                }
                Op::Delete { vol: images[r.below(images.len() as u64) as usize] }
            }
        }
    }
}

/// Runs operation `i`, as the child does.
fn run_op(store: &SledStore, i: u64, op: Op) {
    match op {
        Op::Create { vol, blocks } => store.create_volume(VolumeId(vol), blocks * BLOCK_BYTES).unwrap(),
        Op::Write { vol, b0, n } => {
            let data: Vec<u8> = (b0..b0 + n).flat_map(|b| content((i, vol, b))).collect();
            store.write(VolumeId(vol), b0 * BLOCK_BYTES, &data).unwrap();
        }
        Op::Clone { src, s0, dst, d0, n } => {
            store
                .clone_range(VolumeId(src), s0 * BLOCK_BYTES, VolumeId(dst), d0 * BLOCK_BYTES, n * BLOCK_BYTES)
                .unwrap();
        }
        Op::Delete { vol } => store.delete_volume(VolumeId(vol)).unwrap(),
    }
}

#[test]
fn child_cloner() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else { return };
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    let store = SledStore::open(std::path::Path::new(&dir)).unwrap();
    #[cfg(feature = "failpoints")]
    if let Ok(at) = std::env::var(CHILD_ABORT_AT_ENV) {
        let at: u64 = at.parse().unwrap();
        let seen = AtomicU64::new(0);
        let store = store.clone();
        fail::cfg_callback(tandem_storage::failpoints::CLONE_BETWEEN_STEPS, move || {
            if seen.fetch_add(1, Ordering::SeqCst) == at {
                // The clone's first steps made durable, then a crash before the next one.
                wait_durable(&store);
                println!("abort");
                std::process::abort();
            }
        })
        .unwrap();
    }
    // The last operation done; the flusher makes it durable and reports it, as a replica's
    // acknowledgements do, while the next ones go on.
    let done = Arc::new(AtomicU64::new(u64::MAX));
    {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (mut reported, mut flushed) = (u64::MAX, store.last_lsn());
            loop {
                let i = done.load(Ordering::SeqCst);
                let lsn = store.last_lsn();
                if lsn == flushed {
                    // Nothing new: pace the loop rather than spin on an idle store.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                // Also the steps of a clone under way, which may become durable before it ends.
                rt.block_on(store.durable(lsn)).unwrap();
                flushed = lsn;
                if i != reported && i != u64::MAX {
                    println!("durable {i}");
                    reported = i;
                }
            }
        });
    }
    let mut plan = Plan::new(seed);
    for i in 0u64.. {
        let op = plan.next_op(i);
        println!("issued {i}");
        run_op(&store, i, op);
        done.store(i, Ordering::SeqCst);
    }
}

/// Kills the child when dropped, so that a failing parent leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the child's output said: the last durable operation and the last one it started.
struct Progress {
    durable: Option<u64>,
    issued: Option<u64>,
    aborted: bool,
}

fn note(p: &mut Progress, line: &str) {
    if let Some(i) = line.strip_prefix("durable ") {
        p.durable = Some(p.durable.unwrap_or(0).max(i.parse().unwrap()));
    } else if let Some(i) = line.strip_prefix("issued ") {
        p.issued = Some(i.parse().unwrap());
    } else if line == "abort" {
        p.aborted = true;
    }
}

/// Runs the child on `dir` with `seed`, until `flushes` flushes were reported (then SIGKILL),
/// or with `abort_at` until it aborts at that failpoint evaluation.
fn crash_child(dir: &std::path::Path, seed: u64, flushes: u64, abort_at: Option<u64>) -> Progress {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_cloner", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(at) = abort_at {
        cmd.env(CHILD_ABORT_AT_ENV, at.to_string());
    }
    let mut child = ChildGuard(cmd.spawn().unwrap());
    let lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    // The reader thread hands lines over so that the deadline holds even if the child stalls.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + CHILD_WAIT;
    let mut p = Progress { durable: None, issued: None, aborted: false };
    let mut seen_flushes = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.starts_with("durable ") {
                    seen_flushes += 1;
                }
                note(&mut p, &line);
                if abort_at.is_none() && seen_flushes >= flushes {
                    child.0.kill().unwrap();
                    break;
                }
            }
            // The child is gone and its output read to the end: the abort, nothing else.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                assert!(abort_at.is_some(), "seed {seed}: the child exited before it was killed");
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("seed {seed}: the child did not reach its crash within {CHILD_WAIT:?}")
            }
        }
    }
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "seed {seed}: the child exited normally");
    // What the child printed before it died and the parent had not read yet.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        note(&mut p, &line);
    }
    p
}

fn crc(tag: Tag, cache: &mut HashMap<Tag, u32>) -> u32 {
    *cache.entry(tag).or_insert_with(|| crc32c::crc32c(&content(tag)))
}

/// The store's volumes and, per volume, the index checksum of every block that holds data.
fn observe(store: &SledStore) -> BTreeMap<u64, (u64, BTreeMap<u64, u32>)> {
    let zero = crc32c::crc32c(&[0u8; B]);
    let mut out = BTreeMap::new();
    for (vol, size) in store.volumes() {
        let sums = store.block_checksums(vol, 0, size).unwrap();
        let data = sums.iter().enumerate().filter(|(_, c)| **c != zero).map(|(b, c)| (b as u64, *c)).collect();
        out.insert(vol.get(), (size / BLOCK_BYTES, data));
    }
    out
}

/// Whether the store, as observed, is `before` with `partial` (a clone, the next operation)
/// applied to some of its target blocks, each either old or new. Returns the tag each data
/// block should hold.
fn matches(
    seen: &BTreeMap<u64, (u64, BTreeMap<u64, u32>)>,
    before: &Model,
    after: Option<(&Model, Op)>,
    cache: &mut HashMap<Tag, u32>,
) -> Option<BTreeMap<(u64, u64), Tag>> {
    let sizes = |m: &Model| m.vols.iter().map(|(v, (n, _))| (*v, *n)).collect::<Vec<_>>();
    if seen.iter().map(|(v, (n, _))| (*v, *n)).collect::<Vec<_>>() != sizes(before) {
        return None;
    }
    let partial = match after {
        Some((m, Op::Clone { dst, d0, n, .. })) => Some((m, dst, d0, n)),
        _ => None,
    };
    let mut expect = BTreeMap::new();
    for (vol, (_, data)) in seen {
        let old = &before.vols[vol].1;
        let new = partial.filter(|p| p.1 == *vol).map(|p| (&p.0.vols[vol].1, p.2, p.3));
        // Every block that holds data in the store, or should before or after the clone.
        let mut blocks: Vec<u64> = data.keys().chain(old.keys()).copied().collect();
        if let Some((new, _, _)) = new {
            blocks.extend(new.keys().copied());
        }
        blocks.sort_unstable();
        blocks.dedup();
        for b in blocks {
            let got = data.get(&b).copied();
            let want_old = old.get(&b).copied();
            if got == want_old.map(|t| crc(t, cache)) {
                if let Some(t) = want_old {
                    expect.insert((*vol, b), t);
                }
                continue;
            }
            let want_new = match new {
                Some((new, d0, n)) if (d0..d0 + n).contains(&b) => new.get(&b).copied(),
                _ => return None,
            };
            if got != want_new.map(|t| crc(t, cache)) {
                return None;
            }
            if let Some(t) = want_new {
                expect.insert((*vol, b), t);
            }
        }
    }
    Some(expect)
}

/// Reads every block that should hold data and compares its bytes.
fn check_bytes(store: &SledStore, expect: &BTreeMap<(u64, u64), Tag>, seed: u64) {
    let mut buf = vec![0u8; B];
    for (&(vol, b), &tag) in expect {
        store.read(VolumeId(vol), b * BLOCK_BYTES, &mut buf).unwrap_or_else(|e| {
            panic!("seed {seed}: volume {vol} block {b} does not read back: {e}");
        });
        assert!(buf == content(tag), "seed {seed}: volume {vol} block {b} is not the bytes of write {tag:?}");
    }
}

/// The model as the store must hold it exactly (no partial operation).
fn check_exactly(store: &SledStore, model: &Model, seed: u64, what: &str) {
    store.check().unwrap_or_else(|e| panic!("seed {seed}: {what}: the store's check fails: {e}"));
    let mut cache = HashMap::new();
    let seen = observe(store);
    let expect = matches(&seen, model, None, &mut cache)
        .unwrap_or_else(|| panic!("seed {seed}: {what}: the store does not hold the expected blocks"));
    check_bytes(store, &expect, seed);
}

fn round(seed: u64, abort: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed ^ 0x5EED);
    let progress = if abort {
        crash_child(dir.path(), seed, 0, Some(rng.below(4)))
    } else {
        crash_child(dir.path(), seed, 5 + rng.below(60), None)
    };
    let issued = progress.issued.expect("the child issued operations");
    assert!(!abort || progress.aborted, "seed {seed}: the child died before the failpoint");
    // Operations 0..durable_count are durable; issued + 1 of them were started.
    let durable_count = progress.durable.map_or(0, |i| i + 1);

    let store = SledStore::open(dir.path()).unwrap();
    let stats = store.check().unwrap_or_else(|e| panic!("seed {seed}: the store's check fails after the crash: {e}"));
    let seen = observe(&store);
    let mut cache = HashMap::new();
    // Candidates: the model after `count` operations, with the next one (a clone) possibly
    // partly applied; the first that fits.
    let mut plan = Plan::new(seed);
    let mut ops = Vec::new();
    for i in 0..durable_count {
        ops.push(plan.next_op(i));
    }
    let mut found = None;
    for count in durable_count..=issued + 1 {
        let before = plan.model.clone();
        let next = (count <= issued).then(|| {
            let op = plan.next_op(count);
            ops.push(op);
            op
        });
        if let Some(expect) = matches(&seen, &before, None, &mut cache) {
            found = Some((count, before, None, expect));
            break;
        }
        if let Some(op) = next {
            if let Some(expect) = matches(&seen, &before, Some((&plan.model, op)), &mut cache) {
                found = Some((count, before, Some(op), expect));
                break;
            }
        }
    }
    let Some((count, before, partial, expect)) = found else {
        panic!(
            "seed {seed}: after the crash the store holds no prefix of the operations from the \
             durable ones ({durable_count}) to all those issued ({})",
            issued + 1
        );
    };
    check_bytes(&store, &expect, seed);
    eprintln!(
        "seed {seed}: {} after {count} operations (durable {durable_count}, issued {}){}; {stats:?}",
        if abort { "aborted between two clone steps" } else { "killed" },
        issued + 1,
        if partial.is_some() { ", the next clone partly applied" } else { "" }
    );

    // References after the crash: overwrite what volume 1 holds, delete volume 2 and every
    // image; the rest must still read what it shared with them.
    let mut model = before;
    if let Some(op) = partial {
        // Its targets hold a mix the model cannot name: finish it, as a resync would.
        run_op(&store, count, op);
        model.apply(count, op);
    }
    let marker = u64::MAX / 2;
    let written: Vec<u64> = model.vols[&1].1.keys().copied().collect();
    for b in written {
        run_op(&store, marker, Op::Write { vol: 1, b0: b, n: 1 });
        model.apply(marker, Op::Write { vol: 1, b0: b, n: 1 });
    }
    let doomed: Vec<u64> = model.vols.keys().copied().filter(|v| *v == 2 || *v >= IMAGE_ID_BASE).collect();
    for vol in doomed {
        run_op(&store, marker, Op::Delete { vol });
        model.apply(marker, Op::Delete { vol });
    }
    wait_durable(&store);
    check_exactly(&store, &model, seed, "after overwriting volume 1 and deleting the others");
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    check_exactly(&store, &model, seed, "after another reopen");
}

/// Waits until everything the store was given is durable (the test itself is synchronous).
fn wait_durable(store: &SledStore) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(store.durable(store.last_lsn())).unwrap();
}

fn seeds() -> Vec<u64> {
    match std::env::var(SEED_ENV) {
        Ok(s) => vec![s.parse().expect("TANDEM_CLONE_CRASH_SEED is a number")],
        Err(_) => {
            let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
            (0..ROUNDS).map(|k| base.wrapping_add(k.wrapping_mul(0x9E37_79B9))).collect()
        }
    }
}

#[test]
fn a_cloner_killed_at_random_points_leaves_a_consistent_store() {
    if std::env::var(CHILD_DIR_ENV).is_ok() {
        return;
    }
    for seed in seeds() {
        eprintln!("seed {seed} (replay with {SEED_ENV}={seed})");
        round(seed, false);
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn a_cloner_aborted_between_clone_steps_leaves_a_consistent_store() {
    if std::env::var(CHILD_DIR_ENV).is_ok() {
        return;
    }
    for seed in seeds() {
        eprintln!("seed {seed} (replay with {SEED_ENV}={seed})");
        round(seed, true);
    }
}
