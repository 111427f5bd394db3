//! A writer process killed with SIGKILL in the middle of its writes. This test binary runs
//! itself again as the writer (`child_writer`, active only when `CHILD_DIR_ENV` is set): the
//! child writes a deterministic sequence and prints the index of each write once it is durable;
//! the parent kills it, reopens the store, and checks every block: it holds a whole block of
//! some write to that block no older than the last durable one, or zeros if no write to it was
//! durable — never a torn or foreign block.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_storage::{BlockStore, SledStore};
use tandem_types::{VolumeId, BLOCK_BYTES};

const CHILD_DIR_ENV: &str = "TANDEM_STORAGE_CRASH_CHILD_DIR";
const VOLUME: u64 = 1;
const VOLUME_BLOCKS: u64 = 2048;
const B: usize = BLOCK_BYTES as usize;

/// Write `i` of the sequence: (first block, block count), from a fixed hash of `i`.
fn plan(i: u64) -> (u64, u64) {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ i;
    let blocks = if h.is_multiple_of(4) { 1 + (h >> 8) % 64 } else { 1 };
    ((h >> 20) % (VOLUME_BLOCKS - blocks + 1), blocks)
}

/// The content write `i` puts in `block`: a header naming both, then bytes derived from them.
fn content(i: u64, block: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(B);
    v.extend_from_slice(&i.to_le_bytes());
    v.extend_from_slice(&block.to_le_bytes());
    v.extend((16..B).map(|k| (k as u64 ^ i.wrapping_mul(31) ^ block.wrapping_mul(7)) as u8));
    v
}

#[test]
fn child_writer() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let store = SledStore::open(std::path::Path::new(&dir)).unwrap();
        store.create_volume(VolumeId(VOLUME), VOLUME_BLOCKS * BLOCK_BYTES).unwrap();
        store.durable(store.last_lsn()).await.unwrap();
        println!("ready");
        // Writes in flight while earlier ones are being made durable, as a replica would.
        let mut pending = Vec::new();
        for i in 1u64.. {
            let (b0, n) = plan(i);
            let data: Vec<u8> = (b0..b0 + n).flat_map(|b| content(i, b)).collect();
            let lsn = store.write(VolumeId(VOLUME), b0 * BLOCK_BYTES, &data).unwrap();
            pending.push((i, lsn));
            if pending.len() == 16 {
                store.durable(lsn).await.unwrap();
                println!("durable {i}");
                pending.clear();
            }
        }
    });
}

#[test]
fn a_killed_writer_leaves_whole_blocks() {
    if std::env::var(CHILD_DIR_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut durable = 0u64;
    let mut acks = 0;
    while acks < 150 {
        assert!(Instant::now() < deadline, "the child made too little progress: {acks} flushes");
        let Some(line) = lines.next() else { panic!("the child exited early") };
        if let Some(i) = line.unwrap().strip_prefix("durable ") {
            durable = i.parse().unwrap();
            acks += 1;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // What the child reported before it died, including lines not read yet.
    for line in lines {
        if let Some(i) = line.unwrap().strip_prefix("durable ") {
            durable = i.parse().unwrap();
        }
    }
    // Writes the child may have issued after its last report are bounded by its loop: at most
    // 16 more before it would have printed again.
    let newest = durable + 16;

    // The newest durable write of each block.
    let mut floor = vec![0u64; VOLUME_BLOCKS as usize];
    for i in 1..=durable {
        let (b0, n) = plan(i);
        for b in b0..b0 + n {
            floor[b as usize] = i;
        }
    }
    let store = SledStore::open(dir.path()).unwrap();
    let mut buf = vec![0u8; (VOLUME_BLOCKS * BLOCK_BYTES) as usize];
    store.read(VolumeId(VOLUME), 0, &mut buf).unwrap();
    for (b, got) in buf.chunks(B).enumerate() {
        let b = b as u64;
        if got.iter().all(|x| *x == 0) {
            assert_eq!(floor[b as usize], 0, "block {b} lost durable write {}", floor[b as usize]);
            continue;
        }
        let i = u64::from_le_bytes(got[..8].try_into().unwrap());
        assert!(got == content(i, b), "block {b} is torn or foreign");
        let (b0, n) = plan(i);
        assert!((b0..b0 + n).contains(&b), "block {b} holds write {i}, which never touched it");
        assert!(i >= floor[b as usize], "block {b} holds write {i}, older than durable write {}", floor[b as usize]);
        assert!(i <= newest, "block {b} holds write {i}, which the child had not issued");
    }
}
