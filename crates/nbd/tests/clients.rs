//! The server driven by real NBD clients: qemu-io and qemu-img (qemu-utils), nbdinfo and
//! nbdcopy (libnbd-bin). A missing client is installed (as root, on Debian) or fails the test.

mod common;

use std::sync::atomic::Ordering;

use common::{pseudo_random_bytes, require_tools, TestServer, DEADLINE, MIB};
use tandem_nbd::READ_CHUNK_BYTES;
use tandem_testkit::qemu::{qemu_io_args, Ran};

/// Runs a client off the runtime's workers (the server under test runs on them), by the
/// deadline.
async fn run(program: &str, args: &[&str]) -> Ran {
    let program = program.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tandem_testkit::qemu::run_within(&program, &args, DEADLINE)
    })
    .await
    .expect("the client runner")
}

/// Runs a client that must succeed; returns its stdout and stderr together.
async fn run_ok(program: &str, args: &[&str]) -> String {
    let ran = run(program, args).await;
    assert!(ran.status.success(), "{program} {args:?} failed ({}):\n{}", ran.status, ran.text);
    ran.text
}

async fn qemu_io(url: &str, commands: &[&str]) -> Ran {
    run("qemu-io", &qemu_io_args(url, commands)).await
}

fn text(output: &Ran) -> String {
    output.text.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_back() {
    require_tools(&["qemu-io"]);
    let server = TestServer::start().await;
    let url = server.url("disk");
    let out = qemu_io(&url, &["write -P 0xab 0 1M", "read -P 0xab 0 1M"]).await;
    let out_text = text(&out);
    assert!(out.status.success(), "{out_text}");
    assert!(!out_text.contains("Pattern verification failed"), "{out_text}");
    assert!(out_text.contains("wrote 1048576/1048576 bytes"), "{out_text}");
    assert!(out_text.contains("read 1048576/1048576 bytes"), "{out_text}");
    let disk = server.exports.volume("disk");
    assert!(disk.bytes(0, MIB as usize).iter().all(|&b| b == 0xab));
    assert!(disk.bytes(MIB, 4096).iter().all(|&b| b == 0));

    // The check can fail: a different pattern is reported.
    let out = qemu_io(&url, &["read -P 0xcd 0 4k"]).await;
    assert!(text(&out).contains("Pattern verification failed"), "{}", text(&out));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_uses_every_command() {
    require_tools(&["qemu-io"]);
    let server = TestServer::start().await;
    let out = qemu_io(
        &server.url("disk"),
        &[
            "write -P 0x11 0 256k",
            "write -f -P 0x22 256k 256k",
            "write -z 0 64k",
            "discard 128k 64k",
            "flush",
            "read -P 0 0 64k",
            "read -P 0x11 64k 64k",
            "read -P 0x22 256k 256k",
            "aio_write -P 0x33 1M 64k",
            "aio_write -P 0x44 2M 64k",
            "aio_flush",
            "read -P 0x33 1M 64k",
            "read -P 0x44 2M 64k",
        ],
    )
    .await;
    let out_text = text(&out);
    assert!(out.status.success() && !out_text.contains("failed"), "{out_text}");
    let c = &server.exports.volume("disk").counters;
    assert!(c.write_zeroes.load(Ordering::SeqCst) >= 1, "write -z reached the volume as WRITE_ZEROES");
    assert!(c.trims.load(Ordering::SeqCst) >= 1, "discard reached the volume as TRIM");
    assert!(c.flushes.load(Ordering::SeqCst) >= 1);
    assert!(c.fua_writes.load(Ordering::SeqCst) >= 1, "write -f sent FUA");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_large_read_streams_in_chunks() {
    require_tools(&["qemu-io"]);
    let server = TestServer::start().await;
    // 48 MiB: qemu splits it at the advertised 32 MiB maximum; the server splits each request
    // into READ_CHUNK_BYTES pieces.
    let out = qemu_io(&server.url("disk"), &["write -P 0x5a 0 48M", "read -P 0x5a 0 48M"]).await;
    let out_text = text(&out);
    assert!(out.status.success() && !out_text.contains("Pattern verification failed"), "{out_text}");
    assert!(out_text.contains("read 50331648/50331648 bytes"), "{out_text}");
    let c = &server.exports.volume("disk").counters;
    assert_eq!(c.read_buf_bytes_max.load(Ordering::SeqCst), READ_CHUNK_BYTES);
    assert!(c.read_bytes.load(Ordering::SeqCst) >= 48 * MIB);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_refuses_writes_to_a_read_only_export_and_missing_exports() {
    require_tools(&["qemu-io"]);
    let server = TestServer::start().await;
    let ro = server.url("ro");
    let out = run("qemu-io", &["-r", "-f", "raw", &ro, "-c", "read -P 0 0 64k"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = qemu_io(&ro, &["write -P 1 0 4k"]).await;
    assert!(
        !out.status.success() || text(&out).contains("not permitted") || text(&out).contains("read-only"),
        "{}",
        text(&out)
    );
    assert!(server.exports.volume("ro").bytes(0, 4096).iter().all(|&b| b == 0));

    let out = qemu_io(&server.url("missing"), &["read 0 4k"]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("missing"), "the server's message reaches the user: {}", text(&out));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_reports_the_size() {
    require_tools(&["qemu-img"]);
    let server = TestServer::start().await;
    let info = run_ok("qemu-img", &["info", &server.url("disk")]).await;
    assert!(info.contains("virtual size: 64 MiB (67108864 bytes)"), "{info}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_and_describes_exports() {
    require_tools(&["nbdinfo"]);
    let server = TestServer::start().await;
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{}", server.addr)]).await;
    for name in ["disk", "small", "ro", "gated", "broken"] {
        assert!(list.contains(&format!("export=\"{name}\"")), "{name} missing from:\n{list}");
    }
    let info = run_ok("nbdinfo", &[&server.url("small")]).await;
    assert!(info.contains("export-size: 33554432"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("is_read_only: false"), "{info}");
    assert!(info.contains("block_size_maximum: 33554432"), "{info}");
    let size = run_ok("nbdinfo", &["--size", &server.url("ro")]).await;
    assert_eq!(size.trim(), MIB.to_string());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_32_mib_bit_exactly() {
    require_tools(&["nbdcopy"]);
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let seed = 0x5eed_0001;
    println!("nbdcopy data seed {seed:#x}");
    let data = pseudo_random_bytes(seed, 32 * MIB as usize);
    let source = dir.path().join("source.bin");
    let copy = dir.path().join("copy.bin");
    std::fs::write(&source, &data).expect("write source");
    let url = server.url("small");
    run_ok("nbdcopy", &[source.to_str().unwrap(), &url]).await;
    assert!(
        server.exports.volume("small").bytes(0, data.len()) == data,
        "export differs from the source (seed {seed:#x})"
    );
    run_ok("nbdcopy", &[&url, copy.to_str().unwrap()]).await;
    let copied = std::fs::read(&copy).expect("read copy");
    assert_eq!(copied.len(), data.len());
    assert!(copied == data, "copy differs from the source (seed {seed:#x})");
    server.stop().await;
}
