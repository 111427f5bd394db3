//! NBD server for Tandem volumes: what hosts (qemu, nbdcopy, fio, the kernel's nbd client)
//! speak to reach a volume.
//!
//! This crate is the Network Block Device protocol, server side, in three layers:
//! - [`codec`]: bytes ↔ frames. Sans-IO; every decoder is bounded and never panics.
//! - [`handshake`] and [`transmission`]: frames → decisions (option replies, which request to
//!   run, which errno to answer). Sans-IO, unit-tested without sockets.
//! - [`server`]: the tokio driver. Fixed newstyle negotiation (`NBD_OPT_GO`, `INFO`, `LIST`,
//!   `EXPORT_NAME`, `ABORT`, `STARTTLS`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`,
//!   `SET_META_CONTEXT`), then READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with FAST_ZERO),
//!   BLOCK_STATUS (with REQ_ONE) and DISC, run concurrently per connection with bounded memory.
//!
//! It is not a storage engine and knows nothing of replication: exports come from an
//! [`Exports`] implementation of the protocol-neutral `tandem-frontend` seam (the node's,
//! backed by replicated volumes), whose errors it maps to NBD errnos
//! ([`transmission::errno_of_io_error`]), and the budgets shared with other connections are
//! given to it ([`Budgets`]). It is not a client.
//! Replies are simple until the client negotiates structured replies; then reads come in
//! chunks (a piece that reads as zeroes as a hole: sparse reads, or one chunk with DF) and
//! errors as error chunks with a message. Block status offers exactly one metadata context,
//! `base:allocation`, from the volume's allocation map ([`tandem_frontend::Volume::extents`]):
//! unallocated ranges are holes that read as zeroes. TLS is the node's to offer
//! (`NBD_OPT_STARTTLS`, see [`handshake`]). No extended headers, no `NBD_CMD_CACHE`.

pub mod codec;
pub mod handshake;
pub mod server;
pub mod transmission;

// The seam now lives in `tandem-frontend`; re-exported here while other code moves over.
pub use codec::{DecodeError, NAME_BYTES_MAX, OPTION_DATA_BYTES_MAX, REQUEST_BYTES_MAX};
pub use handshake::{ExportInfo, HandshakeError, HANDSHAKE_OPTIONS_MAX, OPTION_DRAIN_BYTES_MAX};
pub use server::{
    serve, serve_connection, ConnectionError, CONNECTIONS_MAX, HANDSHAKE_TIMEOUT_MS, INFLIGHT_MAX,
    READ_BUFFER_BYTES_MAX, READ_CHUNK_BYTES, WRITE_BUFFER_BYTES_MAX,
};
