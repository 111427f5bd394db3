//! The server driven byte by byte: negotiation corners, malformed and hostile input, bounds,
//! concurrency and memory limits. Each test checks the server still serves a fresh client
//! afterwards where the test could have broken it.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{
    go_bytes, option_bytes, pseudo_random_bytes, request_bytes, MemExports, RawClient, TestServer, BROKEN_FROM,
    DEADLINE, GATED_FROM, MIB,
};
use tandem_frontend::Budgets;
use tandem_nbd::codec::{cmd, cmd_flag, decode_server_reply, errno, opt, rep, tx_flag};
use tandem_nbd::{
    serve_connection, ConnectionError, INFLIGHT_MAX, READ_BUFFER_BYTES_MAX, READ_CHUNK_BYTES, REQUEST_BYTES_MAX,
};
use tokio::io::AsyncWriteExt;

/// A fresh client can still negotiate, write and read: the server survived.
async fn assert_serving(server: &TestServer) {
    let (mut client, size, _) = RawClient::transmitting(server.addr, "disk").await;
    assert_eq!(size, 64 * MIB);
    let data = pseudo_random_bytes(7, 4096);
    let mut request = request_bytes(cmd::WRITE, 0, 1, 8192, 4096);
    request.extend_from_slice(&data);
    client.send(&request).await;
    assert_eq!(client.read_reply().await.error, 0);
    client.send(&request_bytes(cmd::READ, 0, 2, 8192, 4096)).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.error, reply.cookie), (0, 2));
    assert_eq!(client.read_exact(4096).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_reports_size_and_flags_and_info_list_work() {
    let server = TestServer::start().await;
    let (_, size, flags) = RawClient::transmitting(server.addr, "disk").await;
    assert_eq!(size, 64 * MIB);
    for flag in [
        tx_flag::HAS_FLAGS,
        tx_flag::SEND_FLUSH,
        tx_flag::SEND_FUA,
        tx_flag::SEND_TRIM,
        tx_flag::SEND_WRITE_ZEROES,
        tx_flag::CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & flag, 0, "flag {flag:#x} in {flags:#x}");
    }
    assert_eq!(flags & tx_flag::READ_ONLY, 0);
    let (_, _, ro_flags) = RawClient::transmitting(server.addr, "ro").await;
    assert_ne!(ro_flags & tx_flag::READ_ONLY, 0);

    let mut client = RawClient::negotiating(server.addr).await;
    client.send(&option_bytes(opt::LIST, &[])).await;
    let mut names = Vec::new();
    loop {
        let (header, data) = client.read_option_reply().await;
        match header.reply_type {
            rep::SERVER => names.push(decode_server_reply(&data).expect("server reply")),
            rep::ACK => break,
            other => panic!("LIST answered {other:#x}"),
        }
    }
    assert_eq!(names, ["broken", "disk", "gated", "ro", "small"]);

    // INFO with a NAME request: export, name and block size, then ACK; negotiation goes on.
    let mut data = Vec::new();
    data.extend_from_slice(&5u32.to_be_bytes());
    data.extend_from_slice(b"small");
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&3u16.to_be_bytes());
    client.send(&option_bytes(opt::INFO, &data)).await;
    let mut infos = Vec::new();
    loop {
        let (header, data) = client.read_option_reply().await;
        assert_eq!(header.option, opt::INFO);
        if header.reply_type == rep::ACK {
            break;
        }
        assert_eq!(header.reply_type, rep::INFO);
        infos.push(tandem_nbd::codec::Info::decode(&data).expect("info").expect("known info"));
    }
    use tandem_nbd::codec::Info;
    assert!(infos.contains(&Info::Name("small".into())));
    assert!(infos.contains(&Info::BlockSize { min: 1, preferred: 4096, max: REQUEST_BYTES_MAX }));
    assert!(infos.iter().any(|i| matches!(i, Info::Export { size_bytes, .. } if *size_bytes == 32 * MIB)));

    // Then ABORT: ACK and a clean close.
    client.send(&option_bytes(opt::ABORT, &[])).await;
    let (header, _) = client.read_option_reply().await;
    assert_eq!((header.option, header.reply_type), (opt::ABORT, rep::ACK));
    assert!(client.read_until_closed().await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unavailable_exports_and_unsupported_options_keep_negotiating() {
    let server = TestServer::start().await;
    let mut client = RawClient::negotiating(server.addr).await;
    for (bytes, option, expected, message) in [
        (go_bytes("missing"), opt::GO, rep::ERR_UNKNOWN, "missing"),
        (go_bytes("offline"), opt::GO, rep::ERR_UNKNOWN, "no primary"),
        // Metadata contexts need structured replies first; structured replies take no data.
        (option_bytes(opt::SET_META_CONTEXT, &[0; 8]), opt::SET_META_CONTEXT, rep::ERR_INVALID, "structured replies"),
        (option_bytes(opt::LIST_META_CONTEXT, &[0; 8]), opt::LIST_META_CONTEXT, rep::ERR_INVALID, "structured replies"),
        (option_bytes(opt::STRUCTURED_REPLY, b"x"), opt::STRUCTURED_REPLY, rep::ERR_INVALID, ""),
        (option_bytes(opt::STARTTLS, &[]), opt::STARTTLS, rep::ERR_POLICY, "does not offer TLS"),
        (option_bytes(4242, b"whatever"), 4242, rep::ERR_UNSUP, ""),
        (option_bytes(opt::LIST, b"x"), opt::LIST, rep::ERR_INVALID, ""),
        (option_bytes(opt::GO, &[0, 0, 0, 9, b'd']), opt::GO, rep::ERR_INVALID, ""),
    ] {
        client.send(&bytes).await;
        let (header, data) = client.read_option_reply().await;
        assert_eq!((header.option, header.reply_type), (option, expected));
        assert!(String::from_utf8_lossy(&data).contains(message), "{:?}", String::from_utf8_lossy(&data));
    }
    // Still negotiating: GO on a real export enters transmission.
    client.send(&go_bytes("disk")).await;
    loop {
        let (header, _) = client.read_option_reply().await;
        if header.reply_type == rep::ACK {
            break;
        }
        assert_eq!(header.reply_type, rep::INFO);
    }
    client.send(&request_bytes(cmd::FLUSH, 0, 9, 0, 0)).await;
    assert_eq!(client.read_reply().await.cookie, 9);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_replies_with_and_without_zeroes() {
    let server = TestServer::start().await;
    for (client_flags, reply_len) in [(1u32, 134usize), (3, 10)] {
        let mut client = RawClient::connect(server.addr).await;
        client.send(&client_flags.to_be_bytes()).await;
        client.send(&option_bytes(opt::EXPORT_NAME, b"ro")).await;
        let reply = client.read_exact(reply_len).await;
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), MIB);
        assert_ne!(u16::from_be_bytes([reply[8], reply[9]]) & tx_flag::READ_ONLY, 0);
        assert!(reply[10..].iter().all(|&b| b == 0));
        client.send(&request_bytes(cmd::READ, 0, 5, 0, 512)).await;
        assert_eq!(client.read_reply().await.error, 0);
        assert_eq!(client.read_exact(512).await, vec![0; 512]);
    }
    // EXPORT_NAME cannot carry an error: an unknown name closes the connection.
    let mut client = RawClient::negotiating(server.addr).await;
    client.send(&option_bytes(opt::EXPORT_NAME, b"missing")).await;
    assert!(client.read_until_closed().await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_negotiation_is_refused() {
    let server = TestServer::start().await;
    // Client flags without fixed newstyle, and with unknown bits.
    for flags in [0u32, 1 | 1 << 7] {
        let mut client = RawClient::connect(server.addr).await;
        client.send(&flags.to_be_bytes()).await;
        assert!(client.read_until_closed().await.is_empty());
    }
    // An option without IHAVEOPT.
    let mut client = RawClient::negotiating(server.addr).await;
    let mut bad = option_bytes(opt::LIST, &[]);
    bad[0] = b'X';
    client.send(&bad).await;
    assert!(client.read_until_closed().await.is_empty());

    // Oversized but drainable option data: ERR_TOO_BIG, and negotiation continues.
    let mut client = RawClient::negotiating(server.addr).await;
    client.send(&option_bytes(opt::GO, &vec![0x55; 100_000])).await;
    let (header, _) = client.read_option_reply().await;
    assert_eq!((header.option, header.reply_type), (opt::GO, rep::ERR_TOO_BIG));
    client.send(&option_bytes(opt::LIST, &[])).await;
    let (header, _) = client.read_option_reply().await;
    assert_eq!(header.reply_type, rep::SERVER);

    // A claimed length of 4 GiB: ERR_TOO_BIG, then the server hangs up without reading it.
    let mut client = RawClient::negotiating(server.addr).await;
    let mut huge = Vec::new();
    huge.extend_from_slice(b"IHAVEOPT");
    huge.extend_from_slice(&opt::INFO.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    client.send(&huge).await;
    let (header, _) = client.read_option_reply().await;
    assert_eq!(header.reply_type, rep::ERR_TOO_BIG);
    assert!(client.read_until_closed().await.is_empty());

    assert_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_connection_goes_on() {
    let server = TestServer::start().await;
    let (mut client, _, _) = RawClient::transmitting(server.addr, "disk").await;
    let size = 64 * MIB;
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (request_bytes(999, 0, 1, 0, 0), errno::EINVAL),
        (request_bytes(cmd::BLOCK_STATUS, 0, 2, 0, 4096), errno::EINVAL),
        (request_bytes(cmd::READ, 0, 3, size - 100, 4096), errno::EINVAL),
        (request_bytes(cmd::READ, 0, 4, u64::MAX - 10, 4096), errno::EINVAL),
        (request_bytes(cmd::READ, 0, 5, 0, REQUEST_BYTES_MAX + 1), errno::EINVAL),
        (request_bytes(cmd::READ, cmd_flag::DF, 6, 0, 512), errno::EINVAL),
        (request_bytes(cmd::TRIM, 0, 7, size, 1), errno::EINVAL),
        (request_bytes(cmd::WRITE_ZEROES, 0, 8, size - 1, 2), errno::ENOSPC),
        // Writes past the end: ENOSPC, and their payload is consumed.
        ([request_bytes(cmd::WRITE, 0, 9, size - 512, 1024), vec![0xee; 1024]].concat(), errno::ENOSPC),
        ([request_bytes(cmd::WRITE, cmd_flag::FAST_ZERO, 10, 0, 100), vec![0xee; 100]].concat(), errno::EINVAL),
    ];
    for (bytes, _) in &cases {
        client.send(bytes).await;
    }
    let mut replies: Vec<(u64, u32)> = Vec::new();
    for _ in &cases {
        let reply = client.read_reply().await;
        replies.push((reply.cookie, reply.error));
    }
    replies.sort();
    let expected: Vec<(u64, u32)> = cases.iter().enumerate().map(|(i, (_, e))| (i as u64 + 1, *e)).collect();
    assert_eq!(replies, expected);
    // Nothing was written by the rejected writes.
    assert!(server.exports.volume("disk").bytes(0, 100).iter().all(|&b| b == 0));
    // The stream is still in sync.
    client.send(&request_bytes(cmd::READ, 0, 77, size - 4096, 4096)).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.cookie, reply.error), (77, 0));
    assert_eq!(client.read_exact(4096).await, vec![0; 4096]);

    // Read-only export: writes and trims are EPERM.
    let (mut client, _, _) = RawClient::transmitting(server.addr, "ro").await;
    client.send(&[request_bytes(cmd::WRITE, 0, 1, 0, 512), vec![1; 512]].concat()).await;
    assert_eq!(client.read_reply().await.error, errno::EPERM);
    client.send(&request_bytes(cmd::TRIM, 0, 2, 0, 512)).await;
    assert_eq!(client.read_reply().await.error, errno::EPERM);
    client.send(&request_bytes(cmd::WRITE_ZEROES, 0, 3, 0, 512)).await;
    assert_eq!(client.read_reply().await.error, errno::EPERM);
    assert!(server.exports.volume("ro").bytes(0, 512).iter().all(|&b| b == 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_disconnect_without_hurting_other_clients() {
    let server = TestServer::start().await;
    let (mut bystander, _, _) = RawClient::transmitting(server.addr, "disk").await;

    // Bad request magic.
    let (mut client, _, _) = RawClient::transmitting(server.addr, "disk").await;
    let mut bad = request_bytes(cmd::READ, 0, 1, 0, 512);
    bad[3] ^= 0xff;
    client.send(&bad).await;
    assert!(client.read_until_closed().await.is_empty());

    // A write over the limit: EINVAL for it, then the server hangs up without reading 4 GiB.
    let (mut client, _, _) = RawClient::transmitting(server.addr, "disk").await;
    // (Only the header is sent: unread payload would make the close a reset, racing the reply.)
    client.send(&request_bytes(cmd::WRITE, 0, 42, 0, u32::MAX)).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.cookie, reply.error), (42, errno::EINVAL));
    assert!(client.read_until_closed().await.is_empty());

    // A truncated request, then the client closes its side.
    let (mut client, _, _) = RawClient::transmitting(server.addr, "disk").await;
    client.send(&request_bytes(cmd::READ, 0, 1, 0, 512)[..10]).await;
    client.stream.shutdown().await.expect("shutdown");
    assert!(client.read_until_closed().await.is_empty());

    // Random garbage in transmission and in negotiation.
    for seed in 1..=20u64 {
        let (mut client, _, _) = RawClient::transmitting(server.addr, "disk").await;
        client.send(&pseudo_random_bytes(seed, 300)).await;
        client.stream.shutdown().await.expect("shutdown");
        let _ = client.read_until_closed().await;
        let mut client = RawClient::negotiating(server.addr).await;
        client.send(&pseudo_random_bytes(seed, 300)).await;
        client.stream.shutdown().await.expect("shutdown");
        let _ = client.read_until_closed().await;
    }

    // The bystander, connected all along, is unaffected.
    bystander.send(&request_bytes(cmd::READ, 0, 5, 0, 512)).await;
    assert_eq!(bystander.read_reply().await.error, 0);
    assert_eq!(bystander.read_exact(512).await.len(), 512);
    assert_serving(&server).await;
    server.stop().await;
}

/// `serve_connection` on an in-memory pipe: the result tells how each session ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_connection_reports_how_sessions_end() {
    let exports = Arc::new(MemExports::standard());
    async fn session(exports: &Arc<MemExports>, bytes: Vec<u8>) -> Result<(), ConnectionError> {
        let (mut client, server_side) = tokio::io::duplex(1 << 20);
        let served =
            tokio::spawn(serve_connection(server_side, Arc::clone(exports), Budgets::new(READ_BUFFER_BYTES_MAX), None));
        client.write_all(&bytes).await.expect("write");
        client.shutdown().await.expect("shutdown");
        // Drain replies so the server never blocks on a full pipe.
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        });
        let result = tokio::time::timeout(DEADLINE, served).await.expect("session ends").expect("no panic");
        drain.await.expect("drain");
        result
    }
    let go = [3u32.to_be_bytes().to_vec(), go_bytes("disk")].concat();

    // Clean ends: hang up between options, ABORT, DISC, hang up between requests.
    assert!(session(&exports, 3u32.to_be_bytes().to_vec()).await.is_ok());
    assert!(session(&exports, [3u32.to_be_bytes().to_vec(), option_bytes(opt::ABORT, &[])].concat()).await.is_ok());
    let disc =
        [go.clone(), request_bytes(cmd::WRITE, 0, 1, 0, 3), b"abc".to_vec(), request_bytes(cmd::DISC, 0, 2, 0, 0)]
            .concat();
    assert!(session(&exports, disc).await.is_ok());
    assert_eq!(exports.volume("disk").bytes(0, 3), b"abc");
    assert!(session(&exports, [go.clone(), request_bytes(cmd::FLUSH, 0, 1, 0, 0)].concat()).await.is_ok());

    // Errors.
    let truncated = [go.clone(), request_bytes(cmd::READ, 0, 1, 0, 512)[..27].to_vec()].concat();
    assert!(matches!(session(&exports, truncated).await, Err(ConnectionError::Truncated)));
    let short_write = [go.clone(), request_bytes(cmd::WRITE, 0, 1, 0, 512), vec![0; 100]].concat();
    assert!(matches!(session(&exports, short_write).await, Err(ConnectionError::Truncated)));
    let mut bad_magic = request_bytes(cmd::READ, 0, 1, 0, 512);
    bad_magic[0] = 0;
    assert!(matches!(session(&exports, [go.clone(), bad_magic].concat()).await, Err(ConnectionError::BadRequest(_))));
    let too_large = [go.clone(), request_bytes(cmd::WRITE, 0, 1, 0, REQUEST_BYTES_MAX + 1)].concat();
    assert!(matches!(
        session(&exports, too_large).await,
        Err(ConnectionError::WriteTooLarge { length }) if length == REQUEST_BYTES_MAX + 1
    ));
    assert!(matches!(session(&exports, 0u32.to_be_bytes().to_vec()).await, Err(ConnectionError::Handshake(_))));
    let partial_option = [3u32.to_be_bytes().to_vec(), go_bytes("disk")[..20].to_vec()].concat();
    assert!(matches!(session(&exports, partial_option).await, Err(ConnectionError::Truncated)));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_handshake_times_out() {
    let exports = Arc::new(MemExports::standard());
    let (_client, server_side) = tokio::io::duplex(4096);
    // Virtual time: the runtime jumps to the timeout as soon as everything is idle.
    let result = serve_connection(server_side, exports, Budgets::new(READ_BUFFER_BYTES_MAX), None).await;
    assert!(matches!(result, Err(ConnectionError::HandshakeTimeout)), "{result:?}");
}

/// Replies go out in completion order: a read stuck in the volume does not hold back others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_matched_by_cookie_not_order() {
    let server = TestServer::start().await;
    let gated = server.exports.volume("gated");
    gated.fill(GATED_FROM, &[0x77; 4096]);
    let (mut client, _, _) = RawClient::transmitting(server.addr, "gated").await;
    client.send(&request_bytes(cmd::READ, 0, 1, GATED_FROM, 4096)).await;
    client.send(&[request_bytes(cmd::WRITE, cmd_flag::FUA, 2, 0, 4), b"abcd".to_vec()].concat()).await;
    let first = client.read_reply().await;
    assert_eq!((first.cookie, first.error), (2, 0), "the write overtakes the blocked read");
    // Sent only now: concurrent overlapping requests may complete in either order.
    client.send(&request_bytes(cmd::READ, 0, 3, 0, 4)).await;
    let second = client.read_reply().await;
    assert_eq!((second.cookie, second.error), (3, 0));
    assert_eq!(client.read_exact(4).await, b"abcd");
    assert_eq!(gated.counters.fua_writes.load(Ordering::SeqCst), 1);
    gated.open_gate();
    let third = client.read_reply().await;
    assert_eq!((third.cookie, third.error), (1, 0));
    assert_eq!(client.read_exact(4096).await, vec![0x77; 4096]);
    server.stop().await;
}

/// At most INFLIGHT_MAX requests of one connection reach the volume at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_bounded() {
    let server = TestServer::start().await;
    let gated = Arc::clone(server.exports.volume("gated"));
    let (mut client, _, _) = RawClient::transmitting(server.addr, "gated").await;
    let total = INFLIGHT_MAX + 16;
    for cookie in 0..total as u64 {
        client.send(&request_bytes(cmd::READ, 0, cookie, GATED_FROM + cookie * 512, 512)).await;
    }
    let counters = &gated.counters;
    common::eventually("the volume to hold INFLIGHT_MAX reads", || {
        counters.reads_in_flight.load(Ordering::SeqCst) == INFLIGHT_MAX
    })
    .await;
    gated.open_gate();
    let mut cookies = Vec::new();
    for _ in 0..total {
        let reply = client.read_reply().await;
        assert_eq!(reply.error, 0);
        cookies.push(reply.cookie);
        client.read_exact(512).await;
    }
    cookies.sort();
    assert_eq!(cookies, (0..total as u64).collect::<Vec<_>>());
    assert_eq!(counters.reads_in_flight_max.load(Ordering::SeqCst), INFLIGHT_MAX);
    server.stop().await;
}

/// The read buffers of all connections together stay within the read budget the server was
/// given, and reads beyond it wait rather than fail: with more reads pending than fit, exactly
/// a budget's worth reach the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_buffers_of_all_connections_share_one_budget() {
    let server = TestServer::start().await;
    let gated = Arc::clone(server.exports.volume("gated"));
    let budget = Arc::clone(&server.budgets.read_buffers);
    let chunk = READ_CHUNK_BYTES as u32;
    let fit = (budget.bytes_max() / u64::from(chunk)) as usize;
    // Three connections of INFLIGHT_MAX / 2 reads each: more than fit, fewer than one
    // connection's own bound, so only the shared budget can hold them back.
    let per_client = INFLIGHT_MAX / 2;
    let mut clients = Vec::new();
    for c in 0..3u64 {
        let (mut client, _, _) = RawClient::transmitting(server.addr, "gated").await;
        for i in 0..per_client as u64 {
            client.send(&request_bytes(cmd::READ, 0, c * 1000 + i, GATED_FROM, chunk)).await;
        }
        clients.push(client);
    }
    assert!(3 * per_client > fit, "the test must ask for more than the budget holds");
    let counters = &gated.counters;
    common::eventually("a budget's worth of reads to reach the volume", || {
        counters.reads_in_flight.load(Ordering::SeqCst) == fit
    })
    .await;
    assert_eq!(budget.reserved_bytes(), budget.bytes_max());
    gated.open_gate();
    for client in &mut clients {
        for _ in 0..per_client {
            let reply = client.read_reply().await;
            assert_eq!(reply.error, 0);
            client.read_exact(chunk as usize).await;
        }
    }
    assert_eq!(counters.reads_in_flight_max.load(Ordering::SeqCst), fit);
    assert_eq!(budget.high_water_bytes(), budget.bytes_max(), "the budget was used up and never overdrawn");
    common::eventually("every read buffer to be given back", || budget.reserved_bytes() == 0).await;
    server.stop().await;
}

/// Maximal reads and writes stream through bounded buffers; pipelined maximal writes beyond
/// the per-connection write budget wait instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximal_requests_stay_within_memory_bounds() {
    let server = TestServer::start().await;
    let disk = Arc::clone(server.exports.volume("disk"));
    let (mut client, _, _) = RawClient::transmitting(server.addr, "disk").await;
    let len = REQUEST_BYTES_MAX as usize;
    let data = pseudo_random_bytes(99, len);
    let writes = 3u64; // 96 MiB pipelined against a 64 MiB budget
    let mut replies = Vec::new();
    for cookie in 0..writes {
        client.send(&request_bytes(cmd::WRITE, 0, cookie, 0, REQUEST_BYTES_MAX)).await;
        client.send(&data).await;
    }
    for _ in 0..writes {
        replies.push(client.read_reply().await);
    }
    assert!(replies.iter().all(|r| r.error == 0));
    client.send(&request_bytes(cmd::READ, 0, 100, 0, REQUEST_BYTES_MAX)).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.cookie, reply.error), (100, 0));
    assert!(client.read_exact(len).await == data, "read back differs");
    assert_eq!(disk.counters.read_buf_bytes_max.load(Ordering::SeqCst), READ_CHUNK_BYTES);
    assert_eq!(disk.counters.reads.load(Ordering::SeqCst), (len / READ_CHUNK_BYTES) as u64);
    server.stop().await;
}

/// A volume error before the reply starts is an errno; after it starts, a disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_failures_are_reported_or_end_the_connection() {
    let server = TestServer::start().await;
    let (mut client, _, _) = RawClient::transmitting(server.addr, "broken").await;
    client.send(&request_bytes(cmd::READ, 0, 1, BROKEN_FROM, 4096)).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.cookie, reply.error), (1, errno::EIO));
    // Starts fine, fails after the first chunk: the header and some data, then a hang-up.
    let len = 2 * BROKEN_FROM as u32;
    client.send(&request_bytes(cmd::READ, 0, 2, 0, len)).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.cookie, reply.error), (2, 0));
    let rest = client.read_until_closed().await;
    assert!(rest.len() < len as usize, "got {} of {len} bytes", rest.len());
    assert_serving(&server).await;
    server.stop().await;
}
