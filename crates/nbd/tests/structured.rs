//! Structured replies, metadata contexts and block status, byte by byte: chunked and sparse
//! reads, errors as error chunks, `base:allocation` negotiation and block status (with and
//! without `NBD_CMD_FLAG_REQ_ONE`, past the end, without a context), then the same through real
//! clients (`nbdinfo --map`, `qemu-img map`).

mod common;

use common::{pseudo_random_bytes, request_bytes, require_tools, RawClient, TestServer, BROKEN_FROM, DEADLINE, MIB};
use tandem_nbd::codec::{
    cmd, cmd_flag, decode_meta_context_reply, errno, opt, rep, state, tx_flag, ClientOption, MetaContextQuery,
    StructuredChunk, BASE_ALLOCATION,
};
use tandem_nbd::handshake::BASE_ALLOCATION_ID;
use tandem_nbd::READ_CHUNK_BYTES;

const HOLE_ZERO: u32 = state::HOLE | state::ZERO;

fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let query = MetaContextQuery { name: export.into(), queries: queries.iter().map(|q| q.to_string()).collect() };
    let mut bytes = Vec::new();
    ClientOption::SetMetaContext(query).encode(&mut bytes);
    bytes[16..].to_vec()
}

/// Negotiates structured replies (and `base:allocation` if asked), then GO on `export`.
/// Returns the client and the transmission flags.
async fn structured(server: &TestServer, export: &str, base_allocation: bool) -> (RawClient, u16) {
    let mut client = RawClient::negotiating(server.addr).await;
    let acked = client.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(acked.len(), 1);
    assert_eq!(acked[0].0.reply_type, rep::ACK);
    if base_allocation {
        let replies = client.option(opt::SET_META_CONTEXT, &meta_data(export, &[BASE_ALLOCATION])).await;
        assert_eq!(replies.len(), 2, "one context, then ACK");
        assert_eq!(replies[0].0.reply_type, rep::META_CONTEXT);
        assert_eq!(decode_meta_context_reply(&replies[0].1), Ok((BASE_ALLOCATION_ID, BASE_ALLOCATION.to_string())));
    }
    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    let mut flags = None;
    for (header, data) in client.option(opt::GO, &go).await {
        match header.reply_type {
            rep::INFO if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                flags = Some(u16::from_be_bytes([data[10], data[11]]));
            }
            rep::INFO | rep::ACK => {}
            other => panic!("GO {export}: {other:#x} {}", String::from_utf8_lossy(&data)),
        }
    }
    (client, flags.expect("NBD_INFO_EXPORT"))
}

/// Puts the pieces of a chunked read back together: (bytes, how many came as holes).
fn assemble(chunks: &[StructuredChunk], offset: u64, len: usize) -> (Vec<u8>, usize) {
    let mut out = vec![0xaau8; len];
    let mut covered = 0;
    let mut holes = 0;
    for chunk in chunks {
        let (at, bytes) = match chunk {
            StructuredChunk::OffsetData { offset: at, data } => (*at, data.clone()),
            StructuredChunk::OffsetHole { offset: at, length } => {
                holes += 1;
                (*at, vec![0; *length as usize])
            }
            other => panic!("a read answered {other:?}"),
        };
        let start = (at - offset) as usize;
        out[start..start + bytes.len()].copy_from_slice(&bytes);
        covered += bytes.len();
    }
    assert_eq!(covered, len, "chunks cover the read exactly once");
    (out, holes)
}

async fn write(client: &mut RawClient, cookie: u64, offset: u64, data: &[u8]) {
    let mut request = request_bytes(cmd::WRITE, 0, cookie, offset, data.len() as u32);
    request.extend_from_slice(data);
    client.send(&request).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.cookie, reply.error), (cookie, 0), "write {cookie}");
}

fn error_of(chunks: &[StructuredChunk]) -> (u32, String, Option<u64>) {
    match chunks.last() {
        Some(StructuredChunk::Error { errno, message, offset }) => (*errno, message.clone(), *offset),
        other => panic!("expected an error chunk, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_come_in_chunks_and_zeroes_as_holes() {
    let server = TestServer::start().await;
    let (mut client, flags) = structured(&server, "disk", false).await;
    assert_ne!(flags & tx_flag::SEND_DF, 0, "DF with structured replies");
    assert_ne!(flags & tx_flag::SEND_FAST_ZERO, 0);
    let chunk = READ_CHUNK_BYTES as u64;
    // Data in the second piece only, and at the very end of the fourth.
    let data = pseudo_random_bytes(1, 5000);
    write(&mut client, 1, chunk + 100, &data).await;
    write(&mut client, 2, 4 * chunk - 3, &[7, 8, 9]).await;
    let len = 4 * chunk as usize;
    client.send(&request_bytes(cmd::READ, 0, 3, 0, len as u32)).await;
    let chunks = client.read_chunks(3).await;
    assert_eq!(chunks.len(), 4, "one chunk per piece");
    let (bytes, holes) = assemble(&chunks, 0, len);
    assert_eq!(holes, 2, "the pieces of zeroes are holes");
    assert_eq!(bytes, server.exports.volume("disk").bytes(0, len));
    assert_eq!(&bytes[chunk as usize + 100..chunk as usize + 5100], &data[..]);

    // DF: one data chunk for the whole read, streamed.
    client.send(&request_bytes(cmd::READ, cmd_flag::DF, 4, 0, len as u32)).await;
    let chunks = client.read_chunks(4).await;
    assert!(matches!(&chunks[..], [StructuredChunk::OffsetData { offset: 0, data }] if *data == bytes));
    // DF on a read of one piece of zeroes: one hole.
    client.send(&request_bytes(cmd::READ, cmd_flag::DF, 5, 8 * chunk, 4096)).await;
    assert_eq!(client.read_chunks(5).await, vec![StructuredChunk::OffsetHole { offset: 8 * chunk, length: 4096 }]);
    // A read of no bytes: nothing to say.
    client.send(&request_bytes(cmd::READ, 0, 6, 0, 0)).await;
    assert_eq!(client.read_chunks(6).await, vec![StructuredChunk::None]);
    // Writes still get simple replies.
    write(&mut client, 7, 0, &[1]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_error_chunks_and_the_connection_goes_on() {
    let server = TestServer::start().await;
    let (mut client, _) = structured(&server, "broken", false).await;
    // Fails after its first pieces: data for those, then an error at the first bad piece.
    let len = BROKEN_FROM as u32 + READ_CHUNK_BYTES as u32;
    client.send(&request_bytes(cmd::READ, 0, 1, 0, len)).await;
    let chunks = client.read_chunks(1).await;
    let (code, message, offset) = error_of(&chunks);
    assert_eq!((code, offset), (errno::EIO, Some(BROKEN_FROM)));
    assert!(message.contains("injected read failure"), "{message}");
    assert_eq!(chunks.len() as u64, BROKEN_FROM / READ_CHUNK_BYTES as u64 + 1);
    // Rejected requests: error chunks that say why, even for a read.
    for (cookie, command, flags, offset, length, want) in [
        (2, cmd::READ, 0, 4 * MIB, 1, errno::EINVAL),
        (3, cmd::READ, cmd_flag::REQ_ONE, 0, 1, errno::EINVAL),
        (4, 77, 0, 0, 0, errno::EINVAL),
        (5, cmd::BLOCK_STATUS, 0, 0, 4096, errno::EINVAL),
        (6, cmd::WRITE_ZEROES, 0, 4 * MIB - 1, 2, errno::ENOSPC),
    ] {
        client.send(&request_bytes(command, flags, cookie, offset, length)).await;
        let chunks = client.read_chunks(cookie).await;
        let (code, message, at) = error_of(&chunks);
        assert_eq!((chunks.len(), code, at), (1, want, None), "request {cookie}: {message}");
        assert!(!message.is_empty());
    }
    // Still serving, and a fast zero is done, not refused.
    client.send(&request_bytes(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 7, 0, 4096)).await;
    assert_eq!(client.read_reply().await.error, 0);
    client.send(&request_bytes(cmd::READ, 0, 8, 0, 4096)).await;
    assert_eq!(client.read_chunks(8).await, vec![StructuredChunk::OffsetHole { offset: 0, length: 4096 }]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_context_negotiation_offers_base_allocation_only() {
    let server = TestServer::start().await;
    let mut client = RawClient::negotiating(server.addr).await;
    // Before structured replies: invalid.
    let replies = client.option(opt::SET_META_CONTEXT, &meta_data("disk", &[BASE_ALLOCATION])).await;
    assert_eq!(replies.last().map(|r| r.0.reply_type), Some(rep::ERR_INVALID));
    client.option(opt::STRUCTURED_REPLY, &[]).await;
    let contexts = |replies: Vec<(tandem_nbd::codec::OptionReplyHeader, Vec<u8>)>| {
        assert_eq!(replies.last().map(|r| r.0.reply_type), Some(rep::ACK));
        replies[..replies.len() - 1]
            .iter()
            .map(|(_, data)| decode_meta_context_reply(data).expect("context").1)
            .collect::<Vec<_>>()
    };
    for (queries, want) in [
        (&[][..], vec![BASE_ALLOCATION]),
        (&["base:"][..], vec![BASE_ALLOCATION]),
        (&["qemu:dirty-bitmap:x", "base:allocation"][..], vec![BASE_ALLOCATION]),
        (&["qemu:allocation-depth"][..], vec![]),
    ] {
        let replies = client.option(opt::LIST_META_CONTEXT, &meta_data("disk", queries)).await;
        assert_eq!(contexts(replies), want, "{queries:?}");
    }
    // Wrong namespace syntax and wrong exports are errors; a name from another namespace
    // selects nothing.
    let replies = client.option(opt::SET_META_CONTEXT, &meta_data("disk", &["allocation"])).await;
    assert_eq!(replies.last().map(|r| r.0.reply_type), Some(rep::ERR_INVALID));
    let replies = client.option(opt::SET_META_CONTEXT, &meta_data("nope", &[BASE_ALLOCATION])).await;
    assert_eq!(replies.last().map(|r| r.0.reply_type), Some(rep::ERR_UNKNOWN));
    assert_eq!(
        contexts(client.option(opt::SET_META_CONTEXT, &meta_data("disk", &["qemu:x"])).await),
        Vec::<String>::new()
    );
    // Selected for `small`, then GO to `disk`: no context there, block status is refused.
    contexts(client.option(opt::SET_META_CONTEXT, &meta_data("small", &[BASE_ALLOCATION])).await);
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    let replies = client.option(opt::GO, &go).await;
    assert_eq!(replies.last().map(|r| r.0.reply_type), Some(rep::ACK));
    client.send(&request_bytes(cmd::BLOCK_STATUS, 0, 1, 0, 4096)).await;
    assert_eq!(error_of(&client.read_chunks(1).await).0, errno::EINVAL);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_reports_what_holds_data() {
    let server = TestServer::start().await;
    let (mut client, _) = structured(&server, "small", true).await;
    let size = 32 * MIB;
    let status = |cookie, flags, offset, length| request_bytes(cmd::BLOCK_STATUS, flags, cookie, offset, length);
    let descriptors = |chunks: Vec<StructuredChunk>| match &chunks[..] {
        [StructuredChunk::BlockStatus { context_id: BASE_ALLOCATION_ID, descriptors }] => {
            descriptors.iter().map(|d| (d.length, d.flags)).collect::<Vec<_>>()
        }
        other => panic!("block status answered {other:?}"),
    };
    // A new volume: one hole that reads as zeroes.
    client.send(&status(1, 0, 0, size as u32)).await;
    assert_eq!(descriptors(client.read_chunks(1).await), vec![(size as u32, HOLE_ZERO)]);
    // Data at 1 MiB (8 KiB), at 3 MiB + 100 (inside one block), and in the last block.
    write(&mut client, 2, MIB, &pseudo_random_bytes(2, 8192)).await;
    write(&mut client, 3, 3 * MIB + 100, &[1]).await;
    write(&mut client, 4, size - 1, &[1]).await;
    client.send(&status(5, 0, 0, size as u32)).await;
    let b = 4096;
    assert_eq!(
        descriptors(client.read_chunks(5).await),
        vec![
            (MIB as u32, HOLE_ZERO),
            (2 * b, 0),
            ((2 * MIB - 2 * b as u64) as u32, HOLE_ZERO),
            (b, 0),
            ((size - 3 * MIB - 2 * b as u64) as u32, HOLE_ZERO),
            (b, 0),
        ]
    );
    // REQ_ONE: the first extent only, within the request.
    client.send(&status(6, cmd_flag::REQ_ONE, 0, size as u32)).await;
    assert_eq!(descriptors(client.read_chunks(6).await), vec![(MIB as u32, HOLE_ZERO)]);
    client.send(&status(7, cmd_flag::REQ_ONE, MIB + 4096, 100)).await;
    assert_eq!(descriptors(client.read_chunks(7).await), vec![(100, 0)]);
    // Past the end, across it, of no bytes, with a flag of another command: EINVAL chunks.
    for (cookie, flags, offset, length) in
        [(8, 0, size, 1), (9, 0, size - 1, 2), (10, 0, 0, 0), (11, cmd_flag::DF, 0, 1)]
    {
        client.send(&status(cookie, flags, offset, length)).await;
        assert_eq!(error_of(&client.read_chunks(cookie).await).0, errno::EINVAL, "request {cookie}");
    }
    // Zeroing makes a hole again.
    client.send(&request_bytes(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 12, MIB, 2 * b)).await;
    assert_eq!(client.read_reply().await.error, 0);
    client.send(&status(13, 0, 0, 2 * MIB as u32)).await;
    assert_eq!(descriptors(client.read_chunks(13).await), vec![(2 * MIB as u32, HOLE_ZERO)]);
    server.stop().await;
}

/// Runs a real client to completion and returns its stdout.
async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(DEADLINE, tokio::process::Command::new(program).args(args).output())
        .await
        .expect("client finishes by the deadline")
        .expect("client starts");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{program} {args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// `nbdinfo --map` and `qemu-img map` see exactly the written ranges as data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_map_the_written_ranges() {
    require_tools(&["nbdinfo", "qemu-img", "qemu-io"]);
    let server = TestServer::start().await;
    let url = server.url("small");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 1M 64k", "-c", "write -P 2 20M 4k", "-c", "write -P 3 32764k 4k", &url],
    )
    .await;
    let map = run_ok("nbdinfo", &["--map", &url]).await;
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f[0].parse().expect("offset"), f[1].parse().expect("length"), f[2].parse().expect("type"))
        })
        .collect();
    let k = 1024;
    assert_eq!(
        rows,
        vec![
            (0, MIB, 3),
            (MIB, 64 * k, 0),
            (MIB + 64 * k, 19 * MIB - 64 * k, 3),
            (20 * MIB, 4 * k, 0),
            (20 * MIB + 4 * k, 32764 * k - 20 * MIB - 4 * k, 3),
            (32764 * k, 4 * k, 0),
        ],
        "{map}"
    );
    let json = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &url]).await;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).expect("qemu-img map JSON");
    let data: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e["data"] == serde_json::Value::Bool(true))
        .map(|e| (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length")))
        .collect();
    assert_eq!(data, vec![(MIB, 64 * k), (20 * MIB, 4 * k), (32764 * k, 4 * k)], "{json}");
    assert!(entries.iter().filter(|e| e["data"] == serde_json::Value::Bool(false)).all(|e| e["zero"] == true));
    server.stop().await;
}
