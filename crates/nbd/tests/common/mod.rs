//! Shared by the integration tests: an in-memory backend with counters and fault switches, a
//! server on a free port, and a raw-socket client that speaks the protocol byte by byte.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_frontend::{Budgets, Exports, Extent, IoError, OpenError, Peer, Volume};
use tandem_nbd::codec::{
    OptionReplyHeader, SimpleReply, StructuredChunk, StructuredReplyHeader, OPTION_REPLY_HEADER_BYTES,
    STRUCTURED_REPLY_HEADER_BYTES,
};
use tandem_nbd::READ_BUFFER_BYTES_MAX;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Every wait in these tests ends by this deadline instead of hanging.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub const MIB: u64 = 1024 * 1024;
/// Reads of `gated` at or past this offset wait until the test opens the gate.
pub const GATED_FROM: u64 = 4 * MIB;
/// Reads of `broken` at or past this offset fail with EIO.
pub const BROKEN_FROM: u64 = MIB;

#[derive(Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    /// Largest buffer the server asked the volume to fill.
    pub read_buf_bytes_max: AtomicUsize,
    pub reads_in_flight: AtomicUsize,
    pub reads_in_flight_max: AtomicUsize,
    pub writes: AtomicU64,
    pub fua_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub extents_calls: AtomicU64,
}

/// The allocation unit of the in-memory volumes' map: a block is allocated when it holds a
/// byte other than zero.
pub const MEM_BLOCK_BYTES: u64 = 4096;

pub struct MemVolume {
    pub data: Mutex<Vec<u8>>,
    pub read_only: bool,
    pub counters: Counters,
    gate: Option<watch::Sender<bool>>,
    broken: bool,
}

impl MemVolume {
    fn new(size_bytes: u64, read_only: bool, gated: bool, broken: bool) -> Self {
        MemVolume {
            data: Mutex::new(vec![0; size_bytes as usize]),
            read_only,
            counters: Counters::default(),
            gate: gated.then(|| watch::channel(false).0),
            broken,
        }
    }

    pub fn open_gate(&self) {
        self.gate.as_ref().expect("gated volume").send_replace(true);
    }

    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + len].to_vec()
    }

    pub fn fill(&self, offset: u64, bytes: &[u8]) {
        let mut data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    }
}

/// The handle the server holds; the test keeps another `Arc` to inspect the volume.
pub struct MemHandle(pub Arc<MemVolume>);

impl Volume for MemHandle {
    fn size_bytes(&self) -> u64 {
        self.0.data.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        self.0.read_only
    }

    fn multi_conn(&self) -> bool {
        // One shared buffer: a flush on one connection covers all.
        true
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let v = &self.0;
        let c = &v.counters;
        let now = c.reads_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.reads_in_flight_max.fetch_max(now, Ordering::SeqCst);
        c.read_buf_bytes_max.fetch_max(buf.len(), Ordering::SeqCst);
        if let Some(gate) = &v.gate {
            if offset >= GATED_FROM {
                let mut open = gate.subscribe();
                open.wait_for(|open| *open).await.expect("gate sender lives in the volume");
            }
        }
        let result = if v.broken && offset + buf.len() as u64 > BROKEN_FROM {
            Err(IoError::Io("injected read failure".into()))
        } else {
            let data = v.data.lock().unwrap();
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        };
        c.reads.fetch_add(1, Ordering::SeqCst);
        c.read_bytes.fetch_add(buf.len() as u64, Ordering::SeqCst);
        c.reads_in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.0.fill(offset, &data);
        self.0.counters.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.0.counters.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.0.counters.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.0.fill(offset, &vec![0; len as usize]);
        self.0.counters.trims.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), IoError> {
        self.0.fill(offset, &vec![0; len as usize]);
        self.0.counters.write_zeroes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Blocks of [`MEM_BLOCK_BYTES`] that hold a byte other than zero are allocated; a range
    /// starting or ending inside a block reports that block's state.
    async fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, IoError> {
        self.0.counters.extents_calls.fetch_add(1, Ordering::SeqCst);
        let data = self.0.data.lock().unwrap();
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end && out.len() <= max {
            let block = at / MEM_BLOCK_BYTES * MEM_BLOCK_BYTES;
            let block_end = (block + MEM_BLOCK_BYTES).min(data.len() as u64);
            let allocated = data[block as usize..block_end as usize].iter().any(|b| *b != 0);
            let piece = block_end.min(end) - at;
            match out.last_mut() {
                Some(last) if last.allocated == allocated => last.len += piece,
                _ => out.push(Extent { len: piece, allocated }),
            }
            at += piece;
        }
        out.truncate(max.max(1));
        Ok(out)
    }
}

pub struct MemExports {
    pub volumes: HashMap<String, Arc<MemVolume>>,
}

impl MemExports {
    /// `disk` 64 MiB, `small` 32 MiB, `ro` 1 MiB read-only, `gated` 8 MiB, `broken` 4 MiB;
    /// `offline` exists but cannot be opened.
    pub fn standard() -> Self {
        let mut volumes = HashMap::new();
        volumes.insert("disk".into(), Arc::new(MemVolume::new(64 * MIB, false, false, false)));
        volumes.insert("small".into(), Arc::new(MemVolume::new(32 * MIB, false, false, false)));
        volumes.insert("ro".into(), Arc::new(MemVolume::new(MIB, true, false, false)));
        volumes.insert("gated".into(), Arc::new(MemVolume::new(8 * MIB, false, true, false)));
        volumes.insert("broken".into(), Arc::new(MemVolume::new(4 * MIB, false, false, true)));
        MemExports { volumes }
    }

    pub fn volume(&self, name: &str) -> &Arc<MemVolume> {
        &self.volumes[name]
    }
}

impl Exports for MemExports {
    type Volume = MemHandle;

    fn list(&self, _peer: &Peer) -> Vec<String> {
        // `offline` is not listed: clients such as `nbdinfo --list` fail on a listed export
        // they cannot open.
        let mut names: Vec<String> = self.volumes.keys().cloned().collect();
        names.sort();
        names
    }

    async fn open(&self, name: &str, _peer: &Peer) -> Result<MemHandle, OpenError> {
        if name == "offline" {
            return Err(OpenError::Unavailable(format!("{name} has no primary right now")));
        }
        self.volumes
            .get(name)
            .map(|v| MemHandle(Arc::clone(v)))
            .ok_or_else(|| OpenError::NotFound(format!("no export named {name:?}")))
    }
}

/// A server on 127.0.0.1 with a free port, stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub exports: Arc<MemExports>,
    /// What the server was given; the test keeps a clone to watch the read budget.
    pub budgets: Budgets,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
        let addr = listener.local_addr().expect("local addr");
        let exports = Arc::new(MemExports::standard());
        let budgets = Budgets::new(READ_BUFFER_BYTES_MAX);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tandem_nbd::serve(listener, Arc::clone(&exports), budgets.clone(), None, async {
            let _ = stopped.await;
        }));
        TestServer { addr, exports, budgets, stop: Some(stop), task }
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// Stops the server and waits for it to finish (it must not hang on open connections).
    pub async fn stop(mut self) {
        let _ = self.stop.take().expect("stopped once").send(());
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("server stops by the deadline")
            .expect("server task did not panic");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client that speaks NBD byte by byte; every read has [`DEADLINE`].
pub struct RawClient {
    pub stream: TcpStream,
}

// The wire bytes come from the one test client's module.
#[allow(unused_imports)] // each test binary uses some
pub use tandem_testkit::nbd::{go_bytes, option_bytes, request_bytes};

impl RawClient {
    /// Connects and checks the greeting (fixed newstyle, no-zeroes offered).
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut client = RawClient { stream };
        let greeting = client.read_exact(18).await;
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]), 0b11);
        client
    }

    /// Connects and sends client flags (fixed newstyle, no zeroes).
    pub async fn negotiating(addr: SocketAddr) -> Self {
        let mut client = Self::connect(addr).await;
        client.send(&3u32.to_be_bytes()).await;
        client
    }

    /// Connects and enters transmission on `export` with NBD_OPT_GO; returns size and flags.
    pub async fn transmitting(addr: SocketAddr, export: &str) -> (Self, u64, u16) {
        let mut client = Self::negotiating(addr).await;
        client.send(&go_bytes(export)).await;
        let mut export_info = None;
        loop {
            let (header, data) = client.read_option_reply().await;
            assert_eq!(header.option, 7);
            match header.reply_type {
                3 if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export_info = Some((size, flags));
                }
                3 => {}
                1 => break,
                other => panic!("GO {export} answered {other:#x}: {}", String::from_utf8_lossy(&data)),
            }
        }
        let (size, flags) = export_info.expect("GO sent NBD_INFO_EXPORT");
        (client, size, flags)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(DEADLINE, self.stream.write_all(bytes))
            .await
            .expect("send by the deadline")
            .expect("send");
    }

    pub async fn read_exact(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        tokio::time::timeout(DEADLINE, self.stream.read_exact(&mut buf))
            .await
            .expect("reply by the deadline")
            .expect("read");
        buf
    }

    pub async fn read_option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let raw = self.read_exact(OPTION_REPLY_HEADER_BYTES).await;
        let header = OptionReplyHeader::decode(&raw).expect("option reply header");
        let data = self.read_exact(header.data_len as usize).await;
        (header, data)
    }

    /// Sends an option and returns its replies up to and including the final one (an ACK or
    /// an error).
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        self.send(&option_bytes(option, data)).await;
        let mut replies = Vec::new();
        loop {
            let (header, data) = self.read_option_reply().await;
            assert_eq!(header.option, option);
            let last = header.reply_type == 1 || header.reply_type & (1 << 31) != 0;
            replies.push((header, data));
            if last {
                return replies;
            }
        }
    }

    /// One structured reply chunk.
    pub async fn read_chunk(&mut self) -> (StructuredReplyHeader, StructuredChunk) {
        let mut frame = self.read_exact(STRUCTURED_REPLY_HEADER_BYTES).await;
        let header = StructuredReplyHeader::decode(&frame).expect("structured reply header");
        frame.extend_from_slice(&self.read_exact(header.length as usize).await);
        let (decoded, chunk, used) = StructuredChunk::decode(&frame).expect("structured reply chunk");
        assert_eq!((decoded, used), (header, frame.len()));
        (header, chunk)
    }

    /// The chunks of one reply, up to the one marked done. Every chunk carries `cookie`
    /// (requests are sent one at a time).
    pub async fn read_chunks(&mut self, cookie: u64) -> Vec<StructuredChunk> {
        let mut chunks = Vec::new();
        loop {
            let (header, chunk) = self.read_chunk().await;
            assert_eq!(header.cookie, cookie);
            chunks.push(chunk);
            if header.is_done() {
                return chunks;
            }
        }
    }

    pub async fn read_reply(&mut self) -> SimpleReply {
        SimpleReply::decode(&self.read_exact(16).await).expect("simple reply")
    }

    /// Bytes the server sends before closing (a well-behaved server sends none here).
    pub async fn read_until_closed(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, self.stream.read_to_end(&mut rest))
            .await
            .expect("server closes the connection by the deadline");
        match read {
            Ok(_) => rest,
            // A reset also ends the connection (the server closed with our bytes unread).
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => rest,
            Err(err) => panic!("reading until close: {err}"),
        }
    }
}

/// Seeded data and the installer of real clients are the test kit's.
#[allow(unused_imports)] // each test binary uses some
pub use tandem_testkit::{random_bytes as pseudo_random_bytes, require_tools};

/// Polls `condition` until it holds or [`DEADLINE`] passes.
pub async fn eventually(what: &str, condition: impl FnMut() -> bool) {
    tandem_testkit::wait::eventually(what, DEADLINE, condition).await
}
