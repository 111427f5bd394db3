//! NBD server for Tandem volumes: what hosts (qemu, nbdcopy, fio, the kernel's nbd client)
//! speak to reach a volume.
//!
//! This crate is the Network Block Device protocol, server side, in three layers:
//! - [`codec`]: bytes ↔ frames. Sans-IO; every decoder is bounded and never panics.
//! - [`handshake`] and [`transmission`]: frames → decisions (option replies, which request to
//!   run, which errno to answer). Sans-IO, unit-tested without sockets.
//! - [`server`]: the tokio driver. Fixed newstyle negotiation (`NBD_OPT_GO`, `INFO`, `LIST`,
//!   `EXPORT_NAME`, `ABORT`), then READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC, run
//!   concurrently per connection with bounded memory.
//!
//! It is not a storage engine and knows nothing of replication: exports come from an
//! [`Exports`] implementation of the protocol-neutral `tandem-frontend` seam (the node's,
//! backed by replicated volumes), whose errors it maps to NBD errnos
//! ([`transmission::errno_of_io_error`]), and the budgets shared with other connections are
//! given to it ([`Budgets`]). It is not a client.
//! It sends simple replies only (no structured replies, block status or metadata contexts),
//! and has no TLS: it is meant for a host-local or trusted network.

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
