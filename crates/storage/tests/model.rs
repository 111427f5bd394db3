//! A model test: random sequences of writes, trims, clones, reads, flushes, reopens and crashes
//! against an in-memory copy of each volume's bytes. Every read must equal the model, and
//! `block_checksums` must equal the crc32c of the model's blocks. After a crash (the store
//! dropped without `durable`), each block must hold one of the values it had since the last
//! durable point — never anything else. proptest prints the failing case and its seed.

use std::collections::HashSet;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tandem_storage::{BlockStore, SledStore, StoreError, StoreOptions};
use tandem_types::{VolumeId, BLOCK_BYTES};

const B: usize = BLOCK_BYTES as usize;
/// Two volumes over many chunk boundaries (128 KiB chunks), so that runs, chunk edges and
/// cross-volume clones are exercised; small segments, so that segment files roll over.
const SIZES: [usize; 2] = [600 * B, 300 * B];
const SEGMENT_BYTES: u64 = 64 * BLOCK_BYTES;
const IO_BYTES_MAX: u64 = 80 * BLOCK_BYTES;

#[derive(Debug, Clone)]
enum Op {
    Write { vol: usize, off: u64, len: u64, seed: u8 },
    Zero { vol: usize, off: u64, len: u64 },
    Clone { src: usize, src_block: u64, dst: usize, dst_block: u64, blocks: u64 },
    Read { vol: usize, off: u64, len: u64 },
    Durable,
    Reopen,
    Crash,
}

fn arb_op() -> impl Strategy<Value = Op> {
    // Offsets and lengths are reduced to the volume in `run`; aligned ones are made common.
    let off = prop_oneof![any::<u64>(), (0..u64::MAX / BLOCK_BYTES).prop_map(|x| x * BLOCK_BYTES)];
    let len = prop_oneof![0..IO_BYTES_MAX, (0..IO_BYTES_MAX / BLOCK_BYTES).prop_map(|x| x * BLOCK_BYTES)];
    prop_oneof![
        6 => (0..2usize, off.clone(), len.clone(), any::<u8>()).prop_map(|(vol, off, len, seed)| Op::Write { vol, off, len, seed }),
        2 => (0..2usize, off.clone(), len.clone()).prop_map(|(vol, off, len)| Op::Zero { vol, off, len }),
        3 => (0..2usize, any::<u64>(), 0..2usize, any::<u64>(), 0..300u64)
            .prop_map(|(src, src_block, dst, dst_block, blocks)| Op::Clone { src, src_block, dst, dst_block, blocks }),
        4 => (0..2usize, off, len).prop_map(|(vol, off, len)| Op::Read { vol, off, len }),
        1 => Just(Op::Durable),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

fn data(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed ^ (i >> 12) as u8)).collect()
}

/// Reduces (off, len) to a range inside a volume of `size` bytes.
fn fit(size: usize, off: u64, len: u64) -> (u64, u64) {
    let off = off % size as u64;
    (off, len.min(size as u64 - off))
}

struct Model {
    vols: [Vec<u8>; 2],
    /// Since the last durable point: every content each block has had (for crash checks).
    seen: [Vec<HashSet<Vec<u8>>>; 2],
}

impl Model {
    fn new() -> Model {
        let vols = SIZES.map(|s| vec![0u8; s]);
        let mut m = Model { vols, seen: [Vec::new(), Vec::new()] };
        m.mark_durable();
        m
    }

    fn mark_durable(&mut self) {
        for v in 0..2 {
            self.seen[v] = self.vols[v].chunks(B).map(|b| HashSet::from([b.to_vec()])).collect();
        }
    }

    fn note(&mut self, vol: usize, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (b0, b1) = (off as usize / B, (off + len).div_ceil(BLOCK_BYTES) as usize);
        for b in b0..b1 {
            self.seen[vol][b].insert(self.vols[vol][b * B..(b + 1) * B].to_vec());
        }
    }
}

fn open(dir: &std::path::Path) -> SledStore {
    SledStore::open_with(dir, StoreOptions { segment_bytes: SEGMENT_BYTES, ..StoreOptions::default() }).expect("open")
}

fn check_checksums(store: &SledStore, model: &Model) -> Result<(), TestCaseError> {
    for (v, size) in SIZES.iter().enumerate() {
        let sums = store.block_checksums(VolumeId(v as u64 + 1), 0, *size as u64).expect("checksums");
        let want: Vec<u32> = model.vols[v].chunks(B).map(crc32c::crc32c).collect();
        prop_assert_eq!(sums, want, "checksums of volume {}", v + 1);
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(dir.path());
    for (v, size) in SIZES.iter().enumerate() {
        store.create_volume(VolumeId(v as u64 + 1), *size as u64).expect("create");
    }
    rt.block_on(store.durable(store.last_lsn())).expect("durable");
    let mut model = Model::new();
    for op in ops {
        match op {
            Op::Write { vol, off, len, seed } => {
                let (off, len) = fit(SIZES[vol], off, len);
                let d = data(seed, off, len);
                store.write(VolumeId(vol as u64 + 1), off, &d).expect("write");
                model.vols[vol][off as usize..(off + len) as usize].copy_from_slice(&d);
                model.note(vol, off, len);
            }
            Op::Zero { vol, off, len } => {
                let (off, len) = fit(SIZES[vol], off, len);
                store.write_zeroes(VolumeId(vol as u64 + 1), off, len).expect("write_zeroes");
                model.vols[vol][off as usize..(off + len) as usize].fill(0);
                model.note(vol, off, len);
            }
            Op::Clone { src, src_block, dst, dst_block, blocks } => {
                let (sb, db) = (SIZES[src] / B, SIZES[dst] / B);
                let s0 = src_block % sb as u64;
                let d0 = dst_block % db as u64;
                let n = blocks.min(sb as u64 - s0).min(db as u64 - d0);
                let (so, dof, len) = (s0 * BLOCK_BYTES, d0 * BLOCK_BYTES, n * BLOCK_BYTES);
                let r = store.clone_range(VolumeId(src as u64 + 1), so, VolumeId(dst as u64 + 1), dof, len);
                if src == dst && n > 0 && s0 < d0 + n && d0 < s0 + n {
                    prop_assert!(matches!(r, Err(StoreError::Invalid(_))), "overlapping clone: {:?}", r);
                    continue;
                }
                r.expect("clone_range");
                let piece = model.vols[src][so as usize..(so + len) as usize].to_vec();
                model.vols[dst][dof as usize..(dof + len) as usize].copy_from_slice(&piece);
                model.note(dst, dof, len);
            }
            Op::Read { vol, off, len } => {
                let (off, len) = fit(SIZES[vol], off, len);
                let mut buf = vec![0x55u8; len as usize];
                store.read(VolumeId(vol as u64 + 1), off, &mut buf).expect("read");
                prop_assert!(
                    buf == model.vols[vol][off as usize..(off + len) as usize],
                    "read of volume {} at {}+{} differs from the model",
                    vol + 1,
                    off,
                    len
                );
                check_checksums(&store, &model)?;
            }
            Op::Durable => {
                rt.block_on(store.durable(store.last_lsn())).expect("durable");
                model.mark_durable();
            }
            Op::Reopen => {
                rt.block_on(store.durable(store.last_lsn())).expect("durable");
                drop(store);
                store = open(dir.path());
                model.mark_durable();
            }
            Op::Crash => {
                drop(store);
                store = open(dir.path());
                for (v, size) in SIZES.iter().enumerate() {
                    let mut buf = vec![0u8; *size];
                    store.read(VolumeId(v as u64 + 1), 0, &mut buf).expect("read after crash");
                    for (b, got) in buf.chunks(B).enumerate() {
                        prop_assert!(
                            model.seen[v][b].contains(got),
                            "after a crash, block {} of volume {} holds a value it never had",
                            b,
                            v + 1
                        );
                    }
                    model.vols[v] = buf;
                }
                model.mark_durable();
            }
        }
    }
    for (v, size) in SIZES.iter().enumerate() {
        let mut buf = vec![0u8; *size];
        store.read(VolumeId(v as u64 + 1), 0, &mut buf).expect("final read");
        prop_assert!(buf == model.vols[v], "volume {} differs from the model at the end", v + 1);
    }
    check_checksums(&store, &model)
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES overrides, for longer runs by hand.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_a_byte_model(ops in proptest::collection::vec(arb_op(), 1..40)) {
        run(ops)?;
    }
}
