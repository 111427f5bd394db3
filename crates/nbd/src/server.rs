//! The async driver: sockets in, [`crate::handshake`] and [`crate::transmission`] decide,
//! the [`Volume`] does the I/O.
//!
//! One connection is one task reading requests in order plus one task per accepted request
//! (at most [`INFLIGHT_MAX`]). Replies go out in completion order, each written whole under
//! the lock of the socket's write half, so they never interleave. Memory per connection is
//! bounded by constants: buffered write payloads by [`WRITE_BUFFER_BYTES_MAX`] (acquired before
//! the payload is read, so a full budget stops the reader and TCP pushes back on the client),
//! read buffers by `INFLIGHT_MAX * READ_CHUNK_BYTES` (and all connections together by the
//! [`Budgets::read_buffers`] the server is given, [`READ_BUFFER_BYTES_MAX`] on a node), socket
//! buffers by `2 * SOCKET_BUFFER_BYTES`. A write over [`REQUEST_BYTES_MAX`] is answered with
//! EINVAL and the connection is closed: its payload is not read, and the stream cannot be
//! resynchronised without reading it.
//!
//! With structured replies negotiated, a read is answered in chunks of at most
//! [`READ_CHUNK_BYTES`], each read before it is sent: a piece that reads as zeroes goes as a
//! hole chunk (no data on the wire), and a piece that fails ends the reply with an error chunk
//! at its offset, so the connection survives it. With `NBD_CMD_FLAG_DF` the data goes in one
//! chunk, streamed like a simple reply. Errors are error chunks with a message; successes
//! without data stay simple replies (the protocol allows both). Block status asks the volume
//! for the range's extents ([`Volume::extents`]) and answers one `base:allocation` chunk.
//!
//! TLS: given a rustls configuration, the server offers `NBD_OPT_STARTTLS`, or not, or requires
//! it, as [`Exports::identification`] says; a client certificate verified by that configuration is
//! the connection's [`Peer`], which decides what it may list and open. A volume whose opener
//! loses access ([`Volume::revoked`]) ends the connection: requests in flight are answered,
//! nothing more is read.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tandem_frontend::{Budgets, BufferBudget, Exports, Identification, IoError, Peer, Volume};
use thiserror::Error;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf,
    WriteHalf,
};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tracing::{debug, error, info, warn};

use crate::codec::{
    decode_client_flags, encode_block_status_chunk, encode_error_chunk, encode_none_chunk, encode_offset_data_header,
    encode_offset_hole_chunk, DecodeError, OptionHeader, RequestHeader, SimpleReply, CLIENT_FLAGS_BYTES,
    OPTION_HEADER_BYTES, REQUEST_BYTES_MAX, REQUEST_HEADER_BYTES,
};
use crate::handshake::{
    ExportInfo, Features, Handshake, HandshakeError, Opened, OptionData, Step, TlsMode, BASE_ALLOCATION_ID,
};
use crate::transmission::{block_status_descriptors, classify, errno_of_io_error, extents_wanted, Payload, Request};

/// Largest piece of a read held in memory: a longer read is streamed to the socket in pieces
/// of this size, so its length does not change the memory it takes.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// The read-buffer budget a node gives its NBD servers ([`Budgets::read_buffers`]), for the
/// read buffers of all their connections together: many clients reading at full queue depth
/// wait for buffers rather than multiply them.
pub const READ_BUFFER_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// Requests of one connection run concurrently up to this many (qemu uses 16, fio's nbd engine
/// its iodepth, nbdcopy 64 per connection); the next request is not read until one finishes.
pub const INFLIGHT_MAX: usize = 64;
/// Write payloads one connection may hold in memory at once: two maximal writes.
pub const WRITE_BUFFER_BYTES_MAX: u32 = 2 * REQUEST_BYTES_MAX;
/// Connections served at once by [`serve`]; more wait in the listen backlog. With the
/// per-connection bounds above this caps the server's buffers at about 10 GiB in the worst case
/// (every connection full of maximal writes), and at a few MiB per idle connection.
pub const CONNECTIONS_MAX: usize = 128;
/// A client that has not finished negotiating by then is disconnected, so stalled handshakes
/// cannot hold connection slots.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 30_000;
/// Buffer of each direction of the socket: small frames are read and written in few system
/// calls, large payloads bypass it.
pub const SOCKET_BUFFER_BYTES: usize = 64 * 1024;
/// Pause after a failed accept (for example, out of file descriptors) before the next one.
pub const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;

/// Why a connection ended other than by the client's choice.
#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("client closed the connection in the middle of a frame")]
    Truncated,
    #[error("handshake not finished within {HANDSHAKE_TIMEOUT_MS} ms")]
    HandshakeTimeout,
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("bad request frame: {0}")]
    BadRequest(DecodeError),
    #[error("write of {length} bytes is over REQUEST_BYTES_MAX; its payload was not read")]
    WriteTooLarge { length: u32 },
    #[error("volume failed after a read reply had started (cookie {cookie}): {error}")]
    StreamedRead { cookie: u64, error: IoError },
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("the client sent more after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls,
    #[error("access revoked: {0}")]
    Revoked(String),
}

/// A connection's byte stream before and after STARTTLS: the socket, or TLS over it.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// The stream negotiation runs on, swapped for TLS over itself by STARTTLS.
type Conn = BufReader<Box<dyn Stream>>;

/// TLS for NBD: the rustls server configuration (certificate, and the client certificates it
/// verifies). `None`: the server does not offer TLS.
pub type TlsConfig = Option<Arc<rustls::ServerConfig>>;

/// Accepts NBD clients on `listener` until `shutdown` completes, serving at most
/// [`CONNECTIONS_MAX`] at a time, each in its own task, within `budgets` (shared with whatever
/// else was given them). Connection errors are logged, not returned. On shutdown, open
/// connections are dropped (in-flight volume calls are cancelled).
pub async fn serve<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    budgets: Budgets,
    tls: TlsConfig,
    shutdown: impl Future<Output = ()>,
) {
    assert_budgets(&budgets);
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(joined) = connections.join_next() => {
                log_panic(joined);
                continue;
            }
            accepted = accept_with_slot(&listener, &slots) => accepted,
        };
        let (stream, peer, slot) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "NBD accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        if let Err(err) = stream.set_nodelay(true) {
            warn!(%peer, error = %err, "could not set TCP_NODELAY");
        }
        let exports = Arc::clone(&exports);
        let budgets = budgets.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _slot = slot;
            debug!(%peer, "NBD client connected");
            match serve_connection(stream, exports, budgets, tls).await {
                Ok(()) => debug!(%peer, "NBD client disconnected"),
                Err(err) => warn!(%peer, error = %err, "NBD connection closed on error"),
            }
        });
    }
    info!(connections = connections.len(), "NBD server shutting down");
    connections.shutdown().await;
}

/// A read chunk must fit in the read budget, or a read would wait for it forever.
fn assert_budgets(budgets: &Budgets) {
    let bytes_max = budgets.read_buffers.bytes_max();
    assert!(bytes_max >= READ_CHUNK_BYTES as u64, "a read budget of {bytes_max} bytes cannot hold one read chunk");
}

async fn accept_with_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> io::Result<(tokio::net::TcpStream, std::net::SocketAddr, OwnedSemaphorePermit)> {
    let slot = Arc::clone(slots).acquire_owned().await.expect("the slot semaphore is never closed");
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, slot))
}

fn log_panic(joined: Result<(), JoinError>) {
    if let Err(err) = joined {
        if err.is_panic() {
            error!(error = %err, "NBD connection task panicked");
        }
    }
}

/// Serves one client on `stream`: negotiation, then requests until the client disconnects.
/// `Ok` when the client ended the session (`NBD_OPT_ABORT`, `NBD_CMD_DISC`, or closing the
/// socket between frames).
pub async fn serve_connection<S, E>(
    stream: S,
    exports: Arc<E>,
    budgets: Budgets,
    tls: TlsConfig,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Exports,
{
    assert_budgets(&budgets);
    let mode = match (&tls, exports.identification()) {
        (None, _) | (Some(_), Identification::Off) => TlsMode::Off,
        (Some(_), Identification::Optional) => TlsMode::Offered,
        (Some(_), Identification::Required) => TlsMode::Required,
    };
    let conn: Conn = BufReader::with_capacity(SOCKET_BUFFER_BYTES, Box::new(stream));
    let negotiation = negotiate(conn, &*exports, tls, mode);
    let negotiated = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), negotiation)
        .await
        .map_err(|_| ConnectionError::HandshakeTimeout)??;
    match negotiated {
        Some((conn, volume, export, features)) => {
            // Requests the client sent right after the handshake are in `conn`'s buffer: the
            // halves read through it.
            let (read_half, write_half) = tokio::io::split(conn);
            let reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, read_half);
            let writer = BufWriter::with_capacity(SOCKET_BUFFER_BYTES, write_half);
            transmit(reader, writer, Arc::new(volume), export, features, budgets.read_buffers).await
        }
        None => Ok(()),
    }
}

/// The first certificate the client presented, as the TLS handshake verified it.
fn client_certificate<S>(tls: &tokio_rustls::server::TlsStream<S>) -> Option<Vec<u8>> {
    tls.get_ref().1.peer_certificates().and_then(|certs| certs.first()).map(|c| c.to_vec())
}

/// Runs option haggling; `None` when the client aborted or went away.
async fn negotiate<E>(
    mut conn: Conn,
    exports: &E,
    tls: TlsConfig,
    mode: TlsMode,
) -> Result<Option<(Conn, E::Volume, ExportInfo, Features)>, ConnectionError>
where
    E: Exports,
{
    let mut handshake = Handshake::with_tls(mode);
    let mut peer = Peer::anonymous();
    send(&mut conn, &Handshake::greeting()).await?;
    let mut flags = [0u8; CLIENT_FLAGS_BYTES];
    if !read_frame(&mut conn, &mut flags).await? {
        return Ok(None);
    }
    handshake.on_client_flags(decode_client_flags(&flags).map_err(HandshakeError::from)?)?;
    loop {
        let mut raw = [0u8; OPTION_HEADER_BYTES];
        if !read_frame(&mut conn, &mut raw).await? {
            return Ok(None);
        }
        let header = OptionHeader::decode(&raw).map_err(HandshakeError::from)?;
        let data = match handshake.on_option_header(header) {
            OptionData::Read(len) => {
                let mut data = vec![0u8; len];
                conn.read_exact(&mut data).await.map_err(eof_is_truncated)?;
                data
            }
            OptionData::DrainThenTooBig(len) => {
                discard(&mut conn, len).await?;
                send(&mut conn, &Handshake::too_big_reply(header.option)).await?;
                continue;
            }
            OptionData::TooBigDisconnect(err) => {
                // Best effort: the client learns why before the connection closes.
                let _ = send(&mut conn, &Handshake::too_big_reply(header.option)).await;
                return Err(err.into());
            }
        };
        match handshake.on_option(header.option, &data) {
            Step::Reply(bytes) => send(&mut conn, &bytes).await?,
            Step::List => send(&mut conn, &Handshake::list_reply(&exports.list(&peer))).await?,
            Step::Abort(bytes) => {
                // The client may already be gone; that is its right after ABORT.
                if send(&mut conn, &bytes).await.is_ok() {
                    let _ = conn.shutdown().await;
                }
                return Ok(None);
            }
            Step::StartTls(bytes) => {
                let config = tls.clone().expect("STARTTLS is accepted only with a TLS configuration");
                send(&mut conn, &bytes).await?;
                // The TLS handshake starts with the client's next bytes: anything already
                // buffered was sent before it, which the protocol forbids.
                if !conn.buffer().is_empty() {
                    return Err(ConnectionError::DataBeforeTls);
                }
                let plain = conn.into_inner();
                let stream =
                    tokio_rustls::TlsAcceptor::from(config).accept(plain).await.map_err(ConnectionError::Tls)?;
                peer = Peer { certificate: client_certificate(&stream), ..Peer::default() };
                debug!(certificate = peer.certificate.is_some(), "NBD connection is TLS now");
                conn = BufReader::with_capacity(SOCKET_BUFFER_BYTES, Box::new(stream));
                handshake.on_tls_started();
            }
            Step::Disconnect(err) => return Err(err.into()),
            Step::Open(request) => {
                let name = request.name.clone();
                let (result, volume) = match exports.open(&name, &peer).await {
                    Ok(volume) => (Ok(export_info(&volume)), Some(volume)),
                    Err(err) => {
                        info!(export = %name, error = %err, "NBD client asked for an export that cannot be opened");
                        (Err(err), None)
                    }
                };
                match handshake.on_opened(request, result.clone()) {
                    Opened::Reply(bytes) => send(&mut conn, &bytes).await?,
                    Opened::Disconnect(err) => return Err(err.into()),
                    Opened::Transmission(bytes, features) => {
                        send(&mut conn, &bytes).await?;
                        let (Some(volume), Ok(export)) = (volume, result) else {
                            unreachable!("transmission starts only on an opened export")
                        };
                        debug!(export = %name, size_bytes = export.size_bytes, ?features, "NBD transmission starts");
                        return Ok(Some((conn, volume, export, features)));
                    }
                }
            }
        }
    }
}

fn export_info<V: Volume>(volume: &V) -> ExportInfo {
    ExportInfo { size_bytes: volume.size_bytes(), read_only: volume.read_only(), multi_conn: volume.multi_conn() }
}

/// The socket's write half, shared by the request tasks. Once `broken` (a reply could not be
/// completed), nothing more is written: a half-sent read reply must not be followed by bytes
/// the client would take for its data.
struct ReplyWriter<W> {
    sink: BufWriter<W>,
    broken: bool,
}

impl<W: AsyncWrite + Unpin> ReplyWriter<W> {
    async fn reply(&mut self, cookie: u64, error: u32) -> Result<(), ConnectionError> {
        if self.broken {
            return Ok(());
        }
        let header = SimpleReply { error, cookie }.to_bytes();
        let sent = async {
            self.sink.write_all(&header).await?;
            self.sink.flush().await
        };
        if let Err(err) = sent.await {
            self.broken = true;
            return Err(err.into());
        }
        Ok(())
    }

    /// Sends whole frames (`bytes`, then `data`), flushed.
    async fn frame(&mut self, bytes: &[u8], data: &[u8]) -> Result<(), ConnectionError> {
        if self.broken {
            return Ok(());
        }
        self.write_or_break(bytes).await?;
        self.write_or_break(data).await?;
        if let Err(err) = self.sink.flush().await {
            self.broken = true;
            return Err(err.into());
        }
        Ok(())
    }

    /// The reply to a request that failed: a simple reply with the errno, or, with structured
    /// replies, an error chunk that also says why (at `offset` of a read, if known).
    async fn fail(
        &mut self,
        features: Features,
        cookie: u64,
        errno: u32,
        message: &str,
        offset: Option<u64>,
    ) -> Result<(), ConnectionError> {
        if !features.structured_replies {
            return self.reply(cookie, errno).await;
        }
        let mut chunk = Vec::new();
        encode_error_chunk(&mut chunk, cookie, errno, message, offset);
        self.frame(&chunk, &[]).await
    }

    async fn write_or_break(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        if let Err(err) = self.sink.write_all(bytes).await {
            self.broken = true;
            return Err(err.into());
        }
        Ok(())
    }

    async fn close(&mut self) {
        self.broken = true;
        let _ = self.sink.flush().await;
        let _ = self.sink.shutdown().await;
    }
}

/// A request accepted for execution, with the budget it holds until it is answered.
struct Job {
    cookie: u64,
    request: Request,
    payload: Bytes,
    _inflight: OwnedSemaphorePermit,
    _payload_budget: Option<OwnedSemaphorePermit>,
}

enum Incoming {
    Run(Job),
    /// `too_large` is the length of a write whose payload will not be read.
    Rejected {
        cookie: u64,
        errno: u32,
        reason: &'static str,
        too_large: Option<u32>,
    },
    Disconnect,
}

async fn transmit<S, V>(
    mut reader: BufReader<ReadHalf<S>>,
    writer: BufWriter<WriteHalf<S>>,
    volume: Arc<V>,
    export: ExportInfo,
    features: Features,
    read_budget: Arc<BufferBudget>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    V: Volume,
{
    let writer = Arc::new(Mutex::new(ReplyWriter { sink: writer, broken: false }));
    let inflight = Arc::new(Semaphore::new(INFLIGHT_MAX));
    let payload_budget = Arc::new(Semaphore::new(WRITE_BUFFER_BYTES_MAX as usize));
    // Set by a task whose failure ends the connection, so the reader stops waiting for requests.
    let (failed_tx, mut failed_rx) = watch::channel(false);
    let failed_tx = Arc::new(failed_tx);
    let mut tasks: JoinSet<Result<(), ConnectionError>> = JoinSet::new();
    let mut task_error = None;
    let mut abandoned = false;
    let revoked_volume = Arc::clone(&volume);
    let revoked = revoked_volume.revoked();
    tokio::pin!(revoked);

    let reader_result = loop {
        while let Some(joined) = tasks.try_join_next() {
            keep_first_error(&mut task_error, joined);
        }
        if task_error.is_some() {
            break Ok(());
        }
        // Cancelling `next_request` loses a partly read frame; that only happens when the
        // connection is being torn down anyway.
        let incoming = tokio::select! {
            biased;
            // The failed task's error is collected below.
            _ = failed_rx.wait_for(|failed| *failed) => break Ok(()),
            // The opener lost access: requests running are answered, nothing more is read.
            reason = &mut revoked => break Err(ConnectionError::Revoked(reason)),
            incoming = next_request(&mut reader, &export, features, &inflight, &payload_budget) => incoming,
        };
        match incoming {
            Ok(Some(Incoming::Run(job))) => {
                let volume = Arc::clone(&volume);
                let writer = Arc::clone(&writer);
                let failed_tx = Arc::clone(&failed_tx);
                let read_budget = Arc::clone(&read_budget);
                tasks.spawn(async move {
                    let result = execute(job, &*volume, &writer, &read_budget, features).await;
                    if result.is_err() {
                        failed_tx.send_replace(true);
                    }
                    result
                });
            }
            Ok(Some(Incoming::Rejected { cookie, errno, reason, too_large })) => {
                if let Err(err) = writer.lock().await.fail(features, cookie, errno, reason, None).await {
                    break Err(err);
                }
                if let Some(length) = too_large {
                    break Err(ConnectionError::WriteTooLarge { length });
                }
            }
            Ok(Some(Incoming::Disconnect)) => break Ok(()),
            Ok(None) => {
                abandoned = true;
                break Ok(());
            }
            Err(err) => {
                abandoned = true;
                break Err(err);
            }
        }
    };
    if abandoned {
        // The client is gone without NBD_CMD_DISC (it closed the socket, perhaps after giving
        // up on a request). Its requests still running are cancelled: a write it gave up on
        // must not be carried out later (for instance retried after a failover), when the
        // client may already have written the same blocks again through another path.
        tasks.abort_all();
    }
    // After NBD_CMD_DISC, requests already accepted are finished and answered, as the
    // protocol asks.
    while let Some(joined) = tasks.join_next().await {
        keep_first_error(&mut task_error, joined);
    }
    writer.lock().await.close().await;
    match (reader_result, task_error) {
        (Err(err), _) | (Ok(()), Some(err)) => Err(err),
        (Ok(()), None) => Ok(()),
    }
}

fn keep_first_error(first: &mut Option<ConnectionError>, joined: Result<Result<(), ConnectionError>, JoinError>) {
    let err = match joined {
        Ok(Ok(())) => return,
        Ok(Err(err)) => err,
        // Cancelled because the client went away: not an error of its own.
        Err(join_error) if join_error.is_cancelled() => return,
        Err(join_error) => ConnectionError::Io(io::Error::other(format!("request task failed: {join_error}"))),
    };
    if first.is_none() {
        *first = Some(err);
    }
}

/// Reads the next request and, for a write, its payload. `None` at a clean end of stream.
async fn next_request<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    export: &ExportInfo,
    features: Features,
    inflight: &Arc<Semaphore>,
    payload_budget: &Arc<Semaphore>,
) -> Result<Option<Incoming>, ConnectionError> {
    let mut raw = [0u8; REQUEST_HEADER_BYTES];
    if !read_frame(reader, &mut raw).await? {
        return Ok(None);
    }
    let header = RequestHeader::decode(&raw).map_err(ConnectionError::BadRequest)?;
    let request = match classify(&header, export, features) {
        Ok(Request::Disconnect) => return Ok(Some(Incoming::Disconnect)),
        Ok(request) => request,
        Err(rejection) => {
            debug!(cookie = header.cookie, command = header.command, reason = rejection.reason, "NBD request rejected");
            if let Payload::Discard(len) = rejection.payload {
                discard(reader, len).await?;
            }
            return Ok(Some(Incoming::Rejected {
                cookie: header.cookie,
                errno: rejection.errno,
                reason: rejection.reason,
                too_large: (rejection.payload == Payload::Disconnect).then_some(header.length),
            }));
        }
    };
    let inflight = Arc::clone(inflight).acquire_owned().await.expect("the inflight semaphore is never closed");
    let (payload, payload_budget) = match request {
        Request::Write { length, .. } => {
            // Budget first, then the bytes: a full budget leaves the payload in the socket.
            let permit = Arc::clone(payload_budget)
                .acquire_many_owned(length)
                .await
                .expect("the payload semaphore is never closed");
            let mut payload = BytesMut::zeroed(length as usize);
            reader.read_exact(&mut payload).await.map_err(eof_is_truncated)?;
            (payload.freeze(), Some(permit))
        }
        _ => (Bytes::new(), None),
    };
    Ok(Some(Incoming::Run(Job {
        cookie: header.cookie,
        request,
        payload,
        _inflight: inflight,
        _payload_budget: payload_budget,
    })))
}

/// Runs one request on the volume and sends its reply. An error return ends the connection.
async fn execute<V, W>(
    job: Job,
    volume: &V,
    writer: &Mutex<ReplyWriter<W>>,
    read_budget: &BufferBudget,
    features: Features,
) -> Result<(), ConnectionError>
where
    V: Volume,
    W: AsyncWrite + Unpin,
{
    let cookie = job.cookie;
    let outcome = match job.request {
        Request::Read { offset, length, df } if features.structured_replies => {
            let read = ChunkedRead { cookie, offset, length: u64::from(length), df };
            return read.run(volume, writer, read_budget).await;
        }
        Request::Read { offset, length, .. } => {
            return stream_read(cookie, offset, length, volume, writer, read_budget).await
        }
        Request::BlockStatus { offset, length, req_one } => {
            let extents = volume.extents(offset, u64::from(length), extents_wanted(req_one)).await;
            return match block_status_descriptors(extents, length, req_one) {
                Ok(descriptors) => {
                    let mut chunk = Vec::new();
                    encode_block_status_chunk(&mut chunk, cookie, true, BASE_ALLOCATION_ID, &descriptors);
                    writer.lock().await.frame(&chunk, &[]).await
                }
                Err(err) => {
                    warn!(cookie, offset, length, error = %err, "NBD block status failed");
                    writer.lock().await.fail(features, cookie, errno_of_io_error(&err), &err.to_string(), None).await
                }
            };
        }
        Request::Write { length: 0, .. } | Request::Trim { length: 0, .. } | Request::WriteZeroes { length: 0, .. } => {
            Ok(())
        }
        Request::Write { offset, fua, .. } => volume.write(offset, job.payload, fua).await,
        Request::Flush => volume.flush().await,
        Request::Trim { offset, length, fua } => match volume.unmap(offset, u64::from(length)).await {
            Ok(()) if fua => volume.flush().await,
            other => other,
        },
        Request::WriteZeroes { offset, length, fua } => volume.write_zeroes(offset, u64::from(length), fua).await,
        Request::Disconnect => unreachable!("the reader handles NBD_CMD_DISC"),
    };
    match outcome {
        Ok(()) => writer.lock().await.reply(cookie, 0).await,
        Err(err) => {
            warn!(cookie, request = ?job.request, error = %err, "NBD request failed");
            writer.lock().await.fail(features, cookie, errno_of_io_error(&err), &err.to_string(), None).await
        }
    }
}

/// A read answered in structured reply chunks.
struct ChunkedRead {
    cookie: u64,
    offset: u64,
    length: u64,
    /// One data chunk for the whole read (`NBD_CMD_FLAG_DF`).
    df: bool,
}

impl ChunkedRead {
    /// Reads piece by piece through one buffer of at most [`READ_CHUNK_BYTES`]. Without DF each
    /// piece is its own chunk, sent once read: a hole chunk if it reads as zeroes, data
    /// otherwise; the last one is marked done, and a failed piece ends the reply with an error
    /// chunk at its offset. With DF, a read that fits one piece is one chunk the same way; a
    /// longer one is a single data chunk streamed like a simple reply (a failure after its
    /// header can only close the connection).
    async fn run<V, W>(
        self,
        volume: &V,
        writer: &Mutex<ReplyWriter<W>>,
        read_budget: &BufferBudget,
    ) -> Result<(), ConnectionError>
    where
        V: Volume,
        W: AsyncWrite + Unpin,
    {
        let ChunkedRead { cookie, offset, length, df } = self;
        let features = Features { structured_replies: true, base_allocation: false };
        if length == 0 {
            let mut chunk = Vec::new();
            encode_none_chunk(&mut chunk, cookie);
            return writer.lock().await.frame(&chunk, &[]).await;
        }
        let chunk_bytes = (READ_CHUNK_BYTES as u64).min(length);
        let _budget = read_budget.reserve(chunk_bytes).await;
        let mut buf = vec![0u8; chunk_bytes as usize];
        if df && length > chunk_bytes {
            return self.stream_one_chunk(volume, writer, &mut buf).await;
        }
        let mut done = 0u64;
        while done < length {
            let piece = &mut buf[..(length - done).min(chunk_bytes) as usize];
            let at = offset + done;
            if let Err(err) = volume.read(at, piece).await {
                warn!(cookie, offset = at, length, error = %err, "NBD read failed");
                let message = format!("read at {at}: {err}");
                return writer.lock().await.fail(features, cookie, errno_of_io_error(&err), &message, Some(at)).await;
            }
            done += piece.len() as u64;
            let last = done == length;
            let piece_len = u32::try_from(piece.len()).expect("a piece is at most READ_CHUNK_BYTES");
            let mut header = Vec::new();
            if reads_as_zeroes(piece) {
                encode_offset_hole_chunk(&mut header, cookie, last, at, piece_len);
                writer.lock().await.frame(&header, &[]).await?;
            } else {
                encode_offset_data_header(&mut header, cookie, last, at, piece_len);
                writer.lock().await.frame(&header, piece).await?;
            }
        }
        Ok(())
    }

    /// A DF read longer than one piece: its first piece is read before anything is sent, so its
    /// failure is still an error chunk; the rest streams under the socket's lock.
    async fn stream_one_chunk<V, W>(
        &self,
        volume: &V,
        writer: &Mutex<ReplyWriter<W>>,
        buf: &mut [u8],
    ) -> Result<(), ConnectionError>
    where
        V: Volume,
        W: AsyncWrite + Unpin,
    {
        let (cookie, offset, length) = (self.cookie, self.offset, self.length);
        let features = Features { structured_replies: true, base_allocation: false };
        if let Err(err) = volume.read(offset, buf).await {
            warn!(cookie, offset, length, error = %err, "NBD read failed");
            let message = format!("read at {offset}: {err}");
            return writer.lock().await.fail(features, cookie, errno_of_io_error(&err), &message, Some(offset)).await;
        }
        let mut header = Vec::new();
        let data_len = u32::try_from(length).expect("reads are at most REQUEST_BYTES_MAX");
        encode_offset_data_header(&mut header, cookie, true, offset, data_len);
        let mut sink = writer.lock().await;
        if sink.broken {
            return Ok(());
        }
        sink.write_or_break(&header).await?;
        stream_rest(&mut sink, volume, cookie, offset, length, buf).await
    }
}

/// Sends the first piece of a read reply already in `buf` (its header is out), then the rest of
/// `length` bytes from `offset` through `buf`, and flushes. A failed read past the first piece
/// can only be reported by closing the connection.
async fn stream_rest<V, W>(
    sink: &mut ReplyWriter<W>,
    volume: &V,
    cookie: u64,
    offset: u64,
    length: u64,
    buf: &mut [u8],
) -> Result<(), ConnectionError>
where
    V: Volume,
    W: AsyncWrite + Unpin,
{
    sink.write_or_break(buf).await?;
    let chunk_bytes = buf.len() as u64;
    let mut done = chunk_bytes;
    while done < length {
        let piece = &mut buf[..(length - done).min(chunk_bytes) as usize];
        if let Err(error) = volume.read(offset + done, piece).await {
            sink.close().await;
            return Err(ConnectionError::StreamedRead { cookie, error });
        }
        sink.write_or_break(piece).await?;
        done += piece.len() as u64;
    }
    if let Err(err) = sink.sink.flush().await {
        sink.broken = true;
        return Err(err.into());
    }
    Ok(())
}

/// Whether a piece read holds nothing but zeroes (it is then sent as a hole). Checked a block
/// at a time so a piece of data is told apart in its first block.
fn reads_as_zeroes(piece: &[u8]) -> bool {
    piece.chunks(4096).all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Sends a read reply through a buffer of at most [`READ_CHUNK_BYTES`]. The first piece is read
/// before the reply header is sent, so its failure can still be reported; a failure after that
/// can only be reported by closing the connection.
async fn stream_read<V, W>(
    cookie: u64,
    offset: u64,
    length: u32,
    volume: &V,
    writer: &Mutex<ReplyWriter<W>>,
    read_budget: &BufferBudget,
) -> Result<(), ConnectionError>
where
    V: Volume,
    W: AsyncWrite + Unpin,
{
    let length = u64::from(length);
    let chunk_bytes = (READ_CHUNK_BYTES as u64).min(length);
    // Taken before the buffer exists and held until the reply is out: the bound across
    // connections.
    let _budget = read_budget.reserve(chunk_bytes).await;
    let mut buf = vec![0u8; chunk_bytes as usize];
    if chunk_bytes > 0 {
        if let Err(err) = volume.read(offset, &mut buf).await {
            warn!(cookie, offset, length, error = %err, "NBD read failed");
            return writer.lock().await.reply(cookie, errno_of_io_error(&err)).await;
        }
    }
    // Held for the whole reply: its data must not be interleaved with other replies.
    let mut sink = writer.lock().await;
    if sink.broken {
        return Ok(());
    }
    sink.write_or_break(&SimpleReply { error: 0, cookie }.to_bytes()).await?;
    stream_rest(&mut sink, volume, cookie, offset, length, &mut buf).await
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// Fills `buf` with the next frame. `false` if the stream ended cleanly before the frame;
/// [`ConnectionError::Truncated`] if it ended inside it.
async fn read_frame<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> Result<bool, ConnectionError> {
    if reader.fill_buf().await?.is_empty() {
        return Ok(false);
    }
    reader.read_exact(buf).await.map_err(eof_is_truncated)?;
    Ok(true)
}

/// Reads and drops `len` bytes through a small fixed buffer.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> Result<(), ConnectionError> {
    let copied = tokio::io::copy(&mut (&mut *reader).take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied < u64::from(len) {
        return Err(ConnectionError::Truncated);
    }
    Ok(())
}

fn eof_is_truncated(err: io::Error) -> ConnectionError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        ConnectionError::Truncated
    } else {
        ConnectionError::Io(err)
    }
}
