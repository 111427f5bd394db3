//! A pipe: frames over one ordered, reliable byte stream (a TLS-over-TCP connection or one
//! QUIC stream). A writer task drains a bounded queue ([`PIPE_QUEUE_MAX`] frames; full means
//! the sender waits) and coalesces small frames into one write; a reader turns bytes back into
//! frames, checking each length before allocating.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use tandem_types::{Channel, NodeId};
use tandem_wire::{Frame, FrameKind, FRAME_LEN_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

/// Frames waiting to be written on one pipe.
pub const PIPE_QUEUE_MAX: usize = 256;
/// Small frames are coalesced into one write up to this size; larger payloads are written
/// straight from their buffer.
const COALESCE_BYTES: usize = 64 * 1024;
/// Bytes read from a pipe at a time when frames are small (large bodies bypass the buffer).
pub(crate) const READ_BUFFER_BYTES: usize = 64 * 1024;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut prefix = [0u8; FRAME_LEN_BYTES];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = Frame::decode_len(prefix).map_err(invalid)?;
    // Read into uninitialised capacity: zeroing a large body first would cost a pass over it.
    let mut body = BytesMut::with_capacity(len);
    let mut limited = (&mut *r).take(len as u64);
    while body.len() < len {
        if limited.read_buf(&mut body).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended inside a frame"));
        }
    }
    Frame::decode_body(body.freeze()).map(Some).map_err(invalid)
}

/// The hello that opens every pipe: who is speaking, and for which channel.
pub fn hello(me: NodeId, channel: Channel) -> Frame {
    Frame::new(FrameKind::Hello, channel, 0, 0, 0, me.get().to_be_bytes().to_vec())
}

/// Reads and checks a hello; returns the claimed node id and channel.
pub async fn read_hello<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> io::Result<(NodeId, Channel)> {
    let frame = read_frame(r).await?.ok_or_else(|| invalid("closed before hello"))?;
    if frame.kind != FrameKind::Hello || frame.payload.len() != 8 {
        return Err(invalid("first frame is not a hello"));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&frame.payload);
    Ok((NodeId(u64::from_be_bytes(id)), frame.channel))
}

/// The server's answer to a hello, its first frame on every pipe: who answers, and which
/// process of that node (its incarnation, new at every start). A sender learns from it that
/// the peer restarted, so it never continues a session with a process that did not see its
/// beginning (docs/PROTOCOL.md, "Pipes and sessions").
pub fn server_hello(me: NodeId, incarnation: u64) -> Frame {
    let mut payload = me.get().to_be_bytes().to_vec();
    payload.extend_from_slice(&incarnation.to_be_bytes());
    Frame::new(FrameKind::Hello, Channel::Control, 0, 0, 0, payload)
}

/// Reads and checks a server's hello; returns the node id it names and its incarnation.
pub async fn read_server_hello<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> io::Result<(NodeId, u64)> {
    let frame = read_frame(r).await?.ok_or_else(|| invalid("closed before the server's hello"))?;
    if frame.kind != FrameKind::Hello || frame.payload.len() != 16 {
        return Err(invalid("the server's first frame is not a hello"));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&frame.payload[..8]);
    let mut incarnation = [0u8; 8];
    incarnation.copy_from_slice(&frame.payload[8..]);
    Ok((NodeId(u64::from_be_bytes(id)), u64::from_be_bytes(incarnation)))
}

/// Milliseconds since this process first asked (a clock an atomic can hold).
pub(crate) fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What a pipe's sender watches it by ([`clock_ms`] times): when bytes last came in, when its
/// writer last made progress, and when it last wrote a `Ping`.
#[derive(Default)]
pub struct PipeClock {
    heard: AtomicU64,
    wrote: AtomicU64,
    writing: AtomicBool,
    pinged: AtomicU64,
}

impl PipeClock {
    fn new() -> PipeClock {
        let now = clock_ms();
        PipeClock { heard: AtomicU64::new(now), wrote: AtomicU64::new(now), ..PipeClock::default() }
    }

    /// When bytes last came in (or the pipe was made).
    pub fn heard(&self) -> u64 {
        self.heard.load(Ordering::Relaxed)
    }

    /// When a `Ping` was last written out (0: never).
    pub fn pinged(&self) -> u64 {
        self.pinged.load(Ordering::Relaxed)
    }

    /// Since when the writer has been stuck inside a write with no progress, if it is.
    pub fn blocked_since(&self) -> Option<u64> {
        self.writing.load(Ordering::Relaxed).then(|| self.wrote.load(Ordering::Relaxed))
    }
}

/// The read half of a pipe, noting in its [`PipeClock`] when bytes come in: a frame still
/// arriving counts, so a large reply on a slow path is not taken for silence.
pub(crate) struct Heard {
    inner: BoxRead,
    clock: Arc<PipeClock>,
}

impl Heard {
    pub(crate) fn new(inner: BoxRead, clock: Arc<PipeClock>) -> Heard {
        Heard { inner, clock }
    }
}

impl AsyncRead for Heard {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.heard.store(clock_ms(), Ordering::Relaxed);
        }
        polled
    }
}

/// The write half of a pipe, noting in its [`PipeClock`] every write that makes progress.
struct Wrote {
    inner: BoxWrite,
    clock: Arc<PipeClock>,
}

impl AsyncWrite for Wrote {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote.store(clock_ms(), Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The sending half of a pipe, shared by whoever writes on it.
#[derive(Clone)]
pub struct PipeTx {
    pub out: mpsc::Sender<Frame>,
    alive: Arc<AtomicBool>,
    pub clock: Arc<PipeClock>,
}

impl PipeTx {
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.out.is_closed()
    }

    pub fn mark_dead(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }

    pub fn queue_depth(&self) -> usize {
        PIPE_QUEUE_MAX - self.out.capacity()
    }
}

/// Starts the writer task of a pipe; `on_dead` runs once when writing fails or the queue is
/// closed and drained.
pub fn spawn_writer(w: BoxWrite, on_dead: impl FnOnce() + Send + 'static) -> PipeTx {
    spawn_writer_task(w, on_dead).0
}

/// [`spawn_writer`], also returning a handle to abort the writer task with (`on_dead` is then
/// dropped without running).
pub(crate) fn spawn_writer_task(
    w: BoxWrite,
    on_dead: impl FnOnce() + Send + 'static,
) -> (PipeTx, tokio::task::AbortHandle) {
    let (tx, mut rx) = mpsc::channel::<Frame>(PIPE_QUEUE_MAX);
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    let clock = Arc::new(PipeClock::new());
    let mut w = Wrote { inner: w, clock: clock.clone() };
    let watch = clock.clone();
    let task = tokio::spawn(async move {
        let result: io::Result<()> = async {
            let mut buf = BytesMut::with_capacity(COALESCE_BYTES * 2);
            while let Some(frame) = rx.recv().await {
                buf.clear();
                watch.wrote.store(clock_ms(), Ordering::Relaxed);
                watch.writing.store(true, Ordering::Relaxed);
                let mut ping = false;
                let mut next = Some(frame);
                while let Some(f) = next.take() {
                    ping |= f.kind == FrameKind::Ping;
                    if f.payload.len() >= COALESCE_BYTES {
                        // Flush what is coalesced, then the big payload without copying it.
                        f.encode_header_into(&mut buf);
                        w.write_all(&buf).await?;
                        buf.clear();
                        w.write_all(&f.payload).await?;
                    } else {
                        f.encode_into(&mut buf);
                    }
                    if buf.len() < COALESCE_BYTES {
                        next = rx.try_recv().ok();
                    }
                }
                if !buf.is_empty() {
                    w.write_all(&buf).await?;
                }
                w.flush().await?;
                watch.writing.store(false, Ordering::Relaxed);
                if ping {
                    watch.pinged.store(clock_ms(), Ordering::Relaxed);
                }
            }
            w.shutdown().await
        }
        .await;
        flag.store(false, Ordering::SeqCst);
        if let Err(e) = result {
            tracing::debug!(error = %e, "pipe writer ended");
        }
        on_dead();
    });
    (PipeTx { out: tx, alive, clock }, task.abort_handle())
}
