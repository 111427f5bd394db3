//! Measures the block store against a plain file written the way `qemu-nbd` serves a raw image
//! with writethrough caching (`pwrite` then `fdatasync` for every write), in the same run on
//! the same disk:
//! - 4 KiB random writes, 32 concurrent writers, each waiting for durability before the next;
//! - 1 MiB sequential writes, one writer, durable after each.
//!
//! `cargo run --release -p tandem-storage --example store_bench -- [dir] [seconds] [all|store|file]`
//! (default: a temporary directory under /var/tmp, 5 seconds per test, both).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_storage::{BlockStore, SledStore};
use tandem_types::VolumeId;

const VOLUME_BYTES: u64 = 1 << 30;
const WRITERS: u64 = 32;
const SMALL: usize = 4096;
const LARGE: usize = 1 << 20;

/// xorshift64*, seeded per writer.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn report(name: &str, ops: u64, bytes_per_op: usize, elapsed: Duration, lat_us: &mut [u64]) {
    let s = elapsed.as_secs_f64();
    lat_us.sort_unstable();
    let pct = |p: f64| lat_us.get(((lat_us.len() as f64 * p) as usize).min(lat_us.len().saturating_sub(1))).copied();
    println!(
        "{name:<44} {:>9.0} IOPS {:>8.1} MB/s   p50 {:>6} us  p99 {:>6} us",
        ops as f64 / s,
        ops as f64 * bytes_per_op as f64 / s / 1e6,
        pct(0.5).unwrap_or(0),
        pct(0.99).unwrap_or(0)
    );
}

async fn store_random(store: &SledStore, secs: u64) {
    store.create_volume(VolumeId(1), VOLUME_BYTES).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let flushes0 = store.space().flushes;
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for w in 0..WRITERS {
        let (store, stop, ops) = (store.clone(), stop.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x1234_5678 + w;
            let data = vec![w as u8 + 1; SMALL];
            let mut lat = Vec::new();
            let mut write_lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let off = next(&mut rng) % (VOLUME_BYTES / SMALL as u64) * SMALL as u64;
                let t = Instant::now();
                let lsn = store.write(VolumeId(1), off, &data).unwrap();
                write_lat.push(t.elapsed().as_micros() as u64);
                store.durable(lsn).await.unwrap();
                lat.push(t.elapsed().as_micros() as u64);
                ops.fetch_add(1, Ordering::Relaxed);
            }
            (lat, write_lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut lat, mut write_lat) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, w) = t.await.unwrap();
        lat.extend(l);
        write_lat.extend(w);
    }
    let elapsed = t0.elapsed();
    let n = ops.load(Ordering::Relaxed);
    report("store: 4 KiB random, 32 writers", n, SMALL, elapsed, &mut lat);
    write_lat.sort_unstable();
    println!(
        "{:<44} the write call alone: p50 {} us, p99 {} us, max {} us",
        "",
        write_lat[write_lat.len() / 2],
        write_lat[write_lat.len() * 99 / 100],
        write_lat[write_lat.len() - 1]
    );
    let flushes = store.space().flushes - flushes0;
    println!("{:<44} {flushes} flushes, {:.1} writes per flush", "", n as f64 / flushes.max(1) as f64);
}

async fn store_sequential(store: &SledStore, secs: u64) {
    store.create_volume(VolumeId(2), VOLUME_BYTES).unwrap();
    let data = vec![7u8; LARGE];
    let (t0, mut n, mut lat) = (Instant::now(), 0u64, Vec::new());
    while t0.elapsed() < Duration::from_secs(secs) {
        let off = n * LARGE as u64 % VOLUME_BYTES;
        let t = Instant::now();
        let lsn = store.write(VolumeId(2), off, &data).unwrap();
        store.durable(lsn).await.unwrap();
        lat.push(t.elapsed().as_micros() as u64);
        n += 1;
    }
    report("store: 1 MiB sequential, 1 writer", n, LARGE, t0.elapsed(), &mut lat);
}

fn file_random(path: &Path, secs: u64) {
    let f = Arc::new(OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap());
    f.set_len(VOLUME_BYTES).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = 0x1234_5678 + w;
                let data = vec![w as u8 + 1; SMALL];
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let off = next(&mut rng) % (VOLUME_BYTES / SMALL as u64) * SMALL as u64;
                    let t = Instant::now();
                    f.write_all_at(&data, off).unwrap();
                    f.sync_data().unwrap();
                    lat.push(t.elapsed().as_micros() as u64);
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(t.join().unwrap());
    }
    let n = lat.len() as u64;
    report("file: 4 KiB random, 32 threads, pwrite+fdatasync", n, SMALL, t0.elapsed(), &mut lat);
}

fn file_sequential(path: &Path, secs: u64) {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    f.set_len(VOLUME_BYTES).unwrap();
    let data = vec![7u8; LARGE];
    let (t0, mut n, mut lat) = (Instant::now(), 0u64, Vec::new());
    while t0.elapsed() < Duration::from_secs(secs) {
        let off = n * LARGE as u64 % VOLUME_BYTES;
        let t = Instant::now();
        f.write_all_at(&data, off).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed().as_micros() as u64);
        n += 1;
    }
    report("file: 1 MiB sequential, pwrite+fdatasync", n, LARGE, t0.elapsed(), &mut lat);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let tmp;
    let dir = match args.next() {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::Builder::new().prefix("store-bench").tempdir_in("/var/tmp").unwrap();
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    let secs: u64 = args.next().map(|s| s.parse().expect("seconds")).unwrap_or(5);
    let which = args.next().unwrap_or_else(|| "all".into());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("directory {}, {secs} s per test", dir.display());

    if which != "store" {
        let raw = dir.join("raw.img");
        file_random(&raw, secs);
        file_sequential(&raw, secs);
        std::fs::remove_file(&raw).unwrap();
    }
    if which == "file" {
        return;
    }

    let store_dir = dir.join("store");
    let store = SledStore::open(&store_dir).unwrap();
    rt.block_on(async {
        store_random(&store, secs).await;
        store_sequential(&store, secs).await;
        store.durable(store.last_lsn()).await.unwrap();
    });
    let s = store.space();
    println!("store space: {} MiB live, {} MiB on disk", s.live_bytes >> 20, s.segment_disk_bytes >> 20);
}
