//! Thin provisioning that hosts can see, against real `tandem` processes and real NBD clients:
//! `nbdinfo --map` and `qemu-img map` of a volume list exactly its written ranges as data,
//! through the primary and through the nodes that proxy to it; `nbdcopy` of a 64 GiB volume
//! with 64 MiB written copies the data and reads none of the holes (the node's
//! `tandem_host_read_bytes_total` says what it read).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_testkit::{
    create_served_volume, qemu_io_ok as qemu_io, random_bytes, require_tools, run_ok as tool, volume, wait_for,
    Cluster, NbdClient,
};

const LEADER_WAIT: Duration = Duration::from_secs(20);
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn nbd_url(c: &Cluster, id: u64, volume: &str) -> String {
    format!("nbd://{}/{volume}", c.nbd_addr(id))
}

fn create_volume(c: &Cluster, name: &str, size: &str) -> (u64, Vec<u64>) {
    require_tools(&["qemu-io", "qemu-img", "nbdinfo", "nbdcopy"]);
    let v = create_served_volume(c, name, size);
    let primary = v["primary"].as_u64().expect("primary");
    let others = c.node_ids().into_iter().filter(|&n| n != primary).collect();
    (primary, others)
}

/// `nbdinfo --map` of `url`: (offset, length, type) per line; type 0 is data, 3 a hole that
/// reads as zeroes.
fn nbdinfo_map(url: &str) -> Vec<(u64, u64, u32)> {
    let out = tool("nbdinfo", &["--map", url]);
    out.lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let parse = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match (parse(0), parse(1), parse(2)) {
                (Some(offset), Some(len), Some(kind)) => (offset, len, kind as u32),
                _ => panic!("nbdinfo --map line {line:?} of:\n{out}"),
            }
        })
        .collect()
}

/// The map a volume of `size` bytes should have with data in exactly `data` (sorted,
/// disjoint, not adjacent): alternating holes (3) and data (0).
fn expected_map(size: u64, data: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(offset, len) in data {
        if offset > at {
            out.push((at, offset - at, 3));
        }
        out.push((offset, len, 0));
        at = offset + len;
    }
    if at < size {
        out.push((at, size - at, 3));
    }
    out
}

/// The ranges `qemu-img map --output=json` calls data.
fn qemu_img_data(url: &str) -> Vec<(u64, u64)> {
    let json = tool("qemu-img", &["map", "--output=json", "-f", "raw", url]);
    let entries: Vec<Value> = serde_json::from_str(&json).unwrap_or_else(|e| panic!("qemu-img map JSON: {e}: {json}"));
    for e in &entries {
        assert!(e["data"] == Value::Bool(true) || e["zero"] == Value::Bool(true), "a hole that is not zero: {json}");
    }
    entries
        .iter()
        .filter(|e| e["data"] == Value::Bool(true))
        .map(|e| (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length")))
        .collect()
}

#[test]
fn nbdinfo_map_lists_exactly_the_written_ranges_through_every_node() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let size = GIB;
    let (primary, others) = create_volume(&c, "thin", "1G");
    let url = |node| nbd_url(&c, node, "thin");
    // Written through a node that is not the primary (proxied): a few ranges, not adjacent,
    // one unaligned inside a block, one at the very end.
    let odd = 700 * MIB + 5;
    let odd_write = format!("write -P 0x33 {odd} 10");
    qemu_io(&url(others[0]), &["write -P 0x11 0 64k", "write -P 0x22 100M 1M", &odd_write, "write -P 0x44 1020M 4M"]);
    let written = [(0, 64 * KIB), (100 * MIB, MIB), (700 * MIB, 4 * KIB), (1020 * MIB, 4 * MIB)];
    let want = expected_map(size, &written);
    for node in std::iter::once(primary).chain(others.iter().copied()) {
        assert_eq!(nbdinfo_map(&url(node)), want, "nbdinfo --map through node {node} (primary {primary})");
    }
    assert_eq!(qemu_img_data(&url(others[1])), written, "qemu-img map through node {}", others[1]);

    // Zeroing (WRITE_ZEROES) and trimming make holes again, seen at once through every node.
    qemu_io(&url(others[1]), &["write -z 100M 512k", "discard 1020M 1M"]);
    let written = [(0, 64 * KIB), (100 * MIB + 512 * KIB, 512 * KIB), (700 * MIB, 4 * KIB), (1021 * MIB, 3 * MIB)];
    let want = expected_map(size, &written);
    for node in std::iter::once(primary).chain(others.iter().copied()) {
        assert_eq!(nbdinfo_map(&url(node)), want, "nbdinfo --map through node {node} after zeroing");
    }
    // The data is still there, and the holes read as zeroes.
    let reads = [
        "read -P 0x11 0 64k".to_string(),
        "read -P 0 100M 512k".to_string(),
        format!("read -P 0x22 {} 512k", 100 * MIB + 512 * KIB),
        format!("read -P 0x33 {odd} 10"),
        format!("read -P 0 {} 5", odd - 5),
        "read -P 0 900M 1M".to_string(),
    ];
    qemu_io(&url(others[0]), &reads.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The bytes of `len` at `offset` of a local file.
fn file_bytes(file: &mut File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.read_exact(&mut buf).expect("read the copy");
    buf
}

fn host_read_bytes(c: &Cluster, node: u64) -> u64 {
    c.metric(node, "tandem_host_read_bytes_total")
        .unwrap_or_else(|| panic!("node {node} exports no tandem_host_read_bytes_total")) as u64
}

#[test]
fn nbdcopy_of_a_64_gib_volume_with_64_mib_written_reads_only_the_data() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let size = 64 * GIB;
    // Not `create_served_volume`: its readiness check digests every copy (16 Mi block checksums
    // here, longer than its probe waits). An NBD write waits for the primary to serve instead.
    require_tools(&["qemu-img", "nbdcopy"]);
    c.tandem(&["volume", "create", "big", "--size", "64G", "--cluster", c.path_str()]);
    let primary = volume(&c, 1, "big").and_then(|v| v["primary"].as_u64()).expect("the volume's primary");
    let others: Vec<u64> = c.node_ids().into_iter().filter(|&n| n != primary).collect();
    // 64 MiB in four places: the start, two in the middle (one not block-aligned), the end.
    let piece = 16 * MIB;
    let ranges = [0, 10 * GIB + 4 * KIB, 33 * GIB + 512, size - piece];
    let mut writer = wait_for("an NBD connection to big", Duration::from_secs(60), || {
        NbdClient::connect(c.nbd_addr(primary), "big", Duration::from_secs(60)).ok()
    });
    let mut written = Vec::new();
    for (i, &offset) in ranges.iter().enumerate() {
        let data = random_bytes(0x7417 + i as u64, piece as usize);
        writer.write(offset, &data).unwrap_or_else(|e| panic!("write at {offset}: {e:?}"));
        written.push((offset, data));
    }
    writer.flush().expect("flush");
    writer.disconnect();

    // Copied out through a node that proxies to the primary, into a sparse local file.
    let node = others[0];
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("copy.img");
    File::create(&path).and_then(|f| f.set_len(size)).expect("a sparse 64 GiB file");
    let path = path.to_str().expect("path");
    let before = host_read_bytes(&c, node);
    let started = Instant::now();
    tool("nbdcopy", &[&nbd_url(&c, node, "big"), path]);
    let elapsed = started.elapsed();
    let read = host_read_bytes(&c, node) - before;
    println!(
        "nbdcopy of a 64 GiB volume with 64 MiB written, through node {node} (primary {primary}): {:.2} s, \
         {} MiB read from the volume",
        elapsed.as_secs_f64(),
        read / MIB
    );
    // The holes were not read: a small multiple of the data, not 64 GiB.
    assert!(read >= 64 * MIB, "only {read} bytes were read, less than the data");
    assert!(read <= 4 * 64 * MIB, "{read} bytes read out of a volume with 64 MiB of data: the holes were read");

    // The copy holds the data where it was written, and zeroes everywhere else.
    let mut copy = File::open(path).expect("open the copy");
    for (offset, data) in &written {
        assert!(file_bytes(&mut copy, *offset, data.len()) == *data, "the copy differs in the range at {offset}");
    }
    for offset in [64 * MIB, 5 * GIB, 33 * GIB - 2 * MIB, size - piece - MIB] {
        assert!(file_bytes(&mut copy, offset, MIB as usize).iter().all(|b| *b == 0), "non-zero bytes at {offset}");
    }
    // And all of it agrees with the volume (qemu-img compares what either side says holds data).
    let cmp = tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", path, &nbd_url(&c, others[1], "big")]);
    assert!(cmp.contains("identical"), "qemu-img compare: {cmp}");
}
