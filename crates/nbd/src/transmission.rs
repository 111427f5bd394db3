//! Transmission-phase decisions: a request header, the export and the negotiated features in,
//! a command to run or an error to reply out; the errno a volume's failure is answered with;
//! and a block status reply's descriptors from a volume's extents. Sans-IO; `server.rs` runs
//! what this accepts.

use tandem_frontend::{Extent, IoError};

use crate::codec::{cmd, cmd_flag, errno, state, BlockDescriptor, RequestHeader, REQUEST_BYTES_MAX};
use crate::handshake::{ExportInfo, Features};

/// Extents one block status reply describes at most: a client asking about a long, fragmented
/// range gets the first ones (the protocol lets a reply cover less than was asked) and asks
/// again from where they end. 8 KiB of descriptors.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 1024;

/// A checked request: offsets and lengths are within the export and the payload limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `df`: `NBD_CMD_FLAG_DF`, the data in one chunk (structured replies only).
    Read {
        offset: u64,
        length: u32,
        df: bool,
    },
    /// `length` payload bytes follow the header.
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// `NBD_CMD_FLAG_NO_HOLE` is accepted and ignored: the backend decides how zeroes are stored.
    /// `NBD_CMD_FLAG_FAST_ZERO` is accepted and needs nothing: zeroing is a metadata change.
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// `NBD_CMD_BLOCK_STATUS` for the selected `base:allocation` context; `req_one`:
    /// `NBD_CMD_FLAG_REQ_ONE`, one descriptor only.
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
    /// Finish in-flight requests, then close. No reply.
    Disconnect,
}

/// What to do with the payload of a rejected request before replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// No payload follows.
    None,
    /// This many payload bytes follow; read and discard them to stay in sync.
    Discard(u32),
    /// The payload is longer than the server is willing to read: reply, then disconnect, since
    /// the stream cannot be resynchronised without reading it. Only writes over
    /// [`REQUEST_BYTES_MAX`], which the protocol allows a server to treat as a denial of service.
    Disconnect,
}

/// A request answered with an error and not passed to the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub payload: Payload,
    pub reason: &'static str,
}

/// Checks a request against the protocol, the export and what was negotiated, following the
/// protocol's choice of errno: EINVAL for unknown commands and flags (`NBD_CMD_FLAG_DF` without
/// structured replies), oversized payloads, reads, trims and block status past the end, and
/// block status without a selected context or of no bytes; ENOSPC for writes (and
/// write-zeroes) past the end; EPERM for changes to a read-only export.
pub fn classify(header: &RequestHeader, export: &ExportInfo, features: Features) -> Result<Request, Rejection> {
    let length = header.length;
    let offset = header.offset;
    let write_payload = if header.command == cmd::WRITE {
        if length > REQUEST_BYTES_MAX {
            return Err(reject(errno::EINVAL, Payload::Disconnect, "write payload over REQUEST_BYTES_MAX"));
        }
        Payload::Discard(length)
    } else {
        Payload::None
    };
    let allowed_flags = match header.command {
        cmd::READ if features.structured_replies => cmd_flag::FUA | cmd_flag::DF,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM => cmd_flag::FUA,
        cmd::WRITE_ZEROES => cmd_flag::FUA | cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO,
        cmd::BLOCK_STATUS if features.base_allocation => cmd_flag::REQ_ONE,
        cmd::BLOCK_STATUS => {
            return Err(reject(errno::EINVAL, Payload::None, "block status without a selected metadata context"))
        }
        // No reply is possible; flags do not matter.
        cmd::DISC => return Ok(Request::Disconnect),
        _ => return Err(reject(errno::EINVAL, Payload::None, "unknown or unsupported command")),
    };
    if header.flags & !allowed_flags != 0 {
        return Err(reject(errno::EINVAL, write_payload, "command flag not valid for this command"));
    }
    let fua = header.flags & cmd_flag::FUA != 0;
    let in_bounds = offset.checked_add(u64::from(length)).is_some_and(|end| end <= export.size_bytes);
    let changes_data = matches!(header.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if changes_data && export.read_only {
        return Err(reject(errno::EPERM, write_payload, "export is read-only"));
    }
    match header.command {
        cmd::READ if length > REQUEST_BYTES_MAX => {
            Err(reject(errno::EINVAL, Payload::None, "read length over REQUEST_BYTES_MAX"))
        }
        cmd::READ if !in_bounds => Err(reject(errno::EINVAL, Payload::None, "read beyond the end of the export")),
        cmd::READ => Ok(Request::Read { offset, length, df: header.flags & cmd_flag::DF != 0 }),
        cmd::WRITE if !in_bounds => Err(reject(errno::ENOSPC, write_payload, "write beyond the end of the export")),
        cmd::WRITE => Ok(Request::Write { offset, length, fua }),
        // Offset and length of a flush are meant to be zero; nothing depends on them.
        cmd::FLUSH => Ok(Request::Flush),
        cmd::TRIM if !in_bounds => Err(reject(errno::EINVAL, Payload::None, "trim beyond the end of the export")),
        cmd::TRIM => Ok(Request::Trim { offset, length, fua }),
        cmd::WRITE_ZEROES if !in_bounds => {
            Err(reject(errno::ENOSPC, Payload::None, "write-zeroes beyond the end of the export"))
        }
        cmd::WRITE_ZEROES => Ok(Request::WriteZeroes { offset, length, fua }),
        cmd::BLOCK_STATUS if length == 0 => Err(reject(errno::EINVAL, Payload::None, "block status of no bytes")),
        cmd::BLOCK_STATUS if !in_bounds => {
            Err(reject(errno::EINVAL, Payload::None, "block status beyond the end of the export"))
        }
        cmd::BLOCK_STATUS => {
            Ok(Request::BlockStatus { offset, length, req_one: header.flags & cmd_flag::REQ_ONE != 0 })
        }
        other => unreachable!("command {other} passed the flag check"),
    }
}

/// How many extents to ask the volume for, for a block status request.
pub fn extents_wanted(req_one: bool) -> usize {
    if req_one {
        1
    } else {
        BLOCK_STATUS_EXTENTS_MAX
    }
}

/// The `base:allocation` descriptors of a block status reply for `length` bytes, from what the
/// volume answered: allocated extents are data (flags 0), the others holes that read as zeroes
/// (`NBD_STATE_HOLE | NBD_STATE_ZERO`). Clipped to the request and merged where neighbours
/// agree; one descriptor with `req_one`. A volume without an allocation map
/// ([`IoError::NotSupported`]) has all of it allocated, which the protocol allows a server
/// that cannot tell to say. A volume that answered nothing for a non-empty range failed.
pub fn block_status_descriptors(
    extents: Result<Vec<Extent>, IoError>,
    length: u32,
    req_one: bool,
) -> Result<Vec<BlockDescriptor>, IoError> {
    let extents = match extents {
        Err(IoError::NotSupported(_)) => vec![Extent { len: u64::from(length), allocated: true }],
        other => other?,
    };
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut left = u64::from(length);
    for extent in extents {
        let len = extent.len.min(left);
        if len == 0 {
            continue;
        }
        left -= len;
        let flags = if extent.allocated { 0 } else { state::HOLE | state::ZERO };
        let len = u32::try_from(len).expect("clipped to the request's 32-bit length");
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += len,
            _ => out.push(BlockDescriptor { length: len, flags }),
        }
    }
    if out.is_empty() {
        return Err(IoError::Io("the volume reported no extent for the range".into()));
    }
    if req_one {
        out.truncate(1);
    }
    Ok(out)
}

fn reject(errno: u32, payload: Payload, reason: &'static str) -> Rejection {
    Rejection { errno, payload, reason }
}

/// The `NBD_E*` value sent in the reply to a request the volume failed.
pub fn errno_of_io_error(error: &IoError) -> u32 {
    match error {
        IoError::Io(_) => errno::EIO,
        IoError::Invalid(_) => errno::EINVAL,
        IoError::NoSpace(_) => errno::ENOSPC,
        // NBD has no errno of its own for reservation conflicts.
        IoError::NotPermitted(_) | IoError::ReservationConflict(_) => errno::EPERM,
        IoError::NotSupported(_) => errno::ENOTSUP,
        IoError::NoMemory(_) => errno::ENOMEM,
        IoError::Shutdown(_) => errno::ESHUTDOWN,
        // NBD has no copy by reference: nothing of it reaches here.
        IoError::Token(..) | IoError::CopyTarget(_) => errno::EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;
    const RW: ExportInfo = ExportInfo { size_bytes: SIZE, read_only: false, multi_conn: false };
    const RO: ExportInfo = ExportInfo { size_bytes: SIZE, read_only: true, multi_conn: false };
    const SIMPLE: Features = Features { structured_replies: false, base_allocation: false };
    const STRUCTURED: Features = Features { structured_replies: true, base_allocation: false };
    const ALLOCATION: Features = Features { structured_replies: true, base_allocation: true };

    /// Every existing test ran with simple replies.
    fn classify(header: &RequestHeader, export: &ExportInfo) -> Result<Request, Rejection> {
        super::classify(header, export, SIMPLE)
    }

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, cookie: 7, offset, length }
    }

    /// Each kind keeps the errno the server answered before the seam moved out of this crate.
    #[test]
    fn volume_errors_map_to_their_errnos() {
        let m = || "m".to_string();
        let cases = [
            (IoError::Io(m()), errno::EIO),
            (IoError::Invalid(m()), errno::EINVAL),
            (IoError::NoSpace(m()), errno::ENOSPC),
            (IoError::NotPermitted(m()), errno::EPERM),
            (IoError::ReservationConflict(m()), errno::EPERM),
            (IoError::NotSupported(m()), errno::ENOTSUP),
            (IoError::NoMemory(m()), errno::ENOMEM),
            (IoError::Shutdown(m()), errno::ESHUTDOWN),
        ];
        for (error, want) in cases {
            assert_eq!(errno_of_io_error(&error), want, "{error}");
        }
    }

    fn errno_of(result: Result<Request, Rejection>) -> Option<(u32, Payload)> {
        result.err().map(|r| (r.errno, r.payload))
    }

    #[test]
    fn accepted_requests() {
        assert_eq!(
            classify(&header(cmd::READ, 0, 0, 4096), &RW),
            Ok(Request::Read { offset: 0, length: 4096, df: false })
        );
        assert_eq!(
            classify(&header(cmd::WRITE, cmd_flag::FUA, SIZE - 1, 1), &RW),
            Ok(Request::Write { offset: SIZE - 1, length: 1, fua: true })
        );
        assert_eq!(classify(&header(cmd::FLUSH, 0, 0, 0), &RW), Ok(Request::Flush));
        assert_eq!(
            classify(&header(cmd::WRITE_ZEROES, cmd_flag::NO_HOLE, 0, SIZE as u32), &RW),
            Ok(Request::WriteZeroes { offset: 0, length: SIZE as u32, fua: false })
        );
        assert_eq!(
            classify(&header(cmd::TRIM, 0, 4096, 4096), &RW),
            Ok(Request::Trim { offset: 4096, length: 4096, fua: false })
        );
        assert_eq!(classify(&header(cmd::DISC, 0xffff, 0, 0), &RW), Ok(Request::Disconnect));
        // Reads are fine on a read-only export.
        assert!(classify(&header(cmd::READ, cmd_flag::FUA, 0, 1), &RO).is_ok());
    }

    #[test]
    fn rejections_follow_the_protocol() {
        let e = errno::EINVAL;
        assert_eq!(errno_of(classify(&header(cmd::READ, 0, SIZE, 1), &RW)), Some((e, Payload::None)));
        assert_eq!(errno_of(classify(&header(cmd::READ, 0, u64::MAX, 2), &RW)), Some((e, Payload::None)));
        assert_eq!(errno_of(classify(&header(cmd::READ, 0, 0, REQUEST_BYTES_MAX + 1), &RW)), Some((e, Payload::None)));
        assert_eq!(
            errno_of(classify(&header(cmd::WRITE, 0, SIZE, 512), &RW)),
            Some((errno::ENOSPC, Payload::Discard(512)))
        );
        assert_eq!(
            errno_of(classify(&header(cmd::WRITE, 0, 0, REQUEST_BYTES_MAX + 1), &RW)),
            Some((e, Payload::Disconnect))
        );
        assert_eq!(
            errno_of(classify(&header(cmd::WRITE, cmd_flag::DF, 0, 512), &RW)),
            Some((e, Payload::Discard(512)))
        );
        assert_eq!(
            errno_of(classify(&header(cmd::WRITE, 0, 0, 512), &RO)),
            Some((errno::EPERM, Payload::Discard(512)))
        );
        assert_eq!(errno_of(classify(&header(cmd::TRIM, 0, 0, 512), &RO)), Some((errno::EPERM, Payload::None)));
        assert_eq!(errno_of(classify(&header(cmd::TRIM, 0, SIZE - 1, 2), &RW)), Some((e, Payload::None)));
        assert_eq!(
            errno_of(classify(&header(cmd::WRITE_ZEROES, 0, SIZE - 1, 2), &RW)),
            Some((errno::ENOSPC, Payload::None))
        );
        assert_eq!(
            errno_of(classify(&header(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 0, 2), &RO)),
            Some((errno::EPERM, Payload::None))
        );
        // DF only means something in a structured reply.
        assert_eq!(errno_of(classify(&header(cmd::READ, cmd_flag::DF, 0, 2), &RW)), Some((e, Payload::None)));
        for unknown in [cmd::CACHE, cmd::BLOCK_STATUS, 8, 999, u16::MAX] {
            assert_eq!(errno_of(classify(&header(unknown, 0, 0, 512), &RW)), Some((e, Payload::None)));
        }
    }

    #[test]
    fn fast_zero_df_and_block_status_as_negotiated() {
        let e = errno::EINVAL;
        assert_eq!(
            classify(&header(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO | cmd_flag::NO_HOLE, 0, 2), &RW),
            Ok(Request::WriteZeroes { offset: 0, length: 2, fua: false })
        );
        assert_eq!(
            super::classify(&header(cmd::READ, cmd_flag::DF, 8, 2), &RW, STRUCTURED),
            Ok(Request::Read { offset: 8, length: 2, df: true })
        );
        // Block status: only with base:allocation selected, of at least a byte, inside the export.
        let status = |flags, offset, length, features| {
            super::classify(&header(cmd::BLOCK_STATUS, flags, offset, length), &RW, features)
        };
        assert_eq!(
            status(cmd_flag::REQ_ONE, 0, SIZE as u32, ALLOCATION),
            Ok(Request::BlockStatus { offset: 0, length: SIZE as u32, req_one: true })
        );
        assert_eq!(
            status(0, SIZE - 1, 1, ALLOCATION),
            Ok(Request::BlockStatus { offset: SIZE - 1, length: 1, req_one: false })
        );
        assert_eq!(errno_of(status(0, 0, 4096, STRUCTURED)), Some((e, Payload::None)), "no context selected");
        assert_eq!(errno_of(status(0, 0, 4096, SIMPLE)), Some((e, Payload::None)));
        assert_eq!(errno_of(status(0, 0, 0, ALLOCATION)), Some((e, Payload::None)), "no bytes");
        assert_eq!(errno_of(status(0, SIZE, 1, ALLOCATION)), Some((e, Payload::None)), "past the end");
        assert_eq!(errno_of(status(0, SIZE - 1, 2, ALLOCATION)), Some((e, Payload::None)), "across the end");
        assert_eq!(errno_of(status(0, u64::MAX, 2, ALLOCATION)), Some((e, Payload::None)), "overflow");
        assert_eq!(errno_of(status(cmd_flag::FUA, 0, 1, ALLOCATION)), Some((e, Payload::None)), "a flag of writes");
        // A read-only export answers block status too.
        assert!(super::classify(&header(cmd::BLOCK_STATUS, 0, 0, 1), &RO, ALLOCATION).is_ok());
    }

    #[test]
    fn block_status_descriptors_from_extents() {
        let (data, hole) = (|len| Extent { len, allocated: true }, |len| Extent { len, allocated: false });
        let d = |length, flags| BlockDescriptor { length, flags };
        let hz = state::HOLE | state::ZERO;
        let all = block_status_descriptors(Ok(vec![data(4096), hole(8192), hole(4096), data(100)]), 1 << 20, false);
        assert_eq!(all.expect("extents"), vec![d(4096, 0), d(12288, hz), d(100, 0)], "merged where they agree");
        // Clipped to the request; REQ_ONE keeps the first only.
        assert_eq!(block_status_descriptors(Ok(vec![hole(1 << 30)]), 4096, false).expect("extents"), vec![d(4096, hz)]);
        assert_eq!(
            block_status_descriptors(Ok(vec![data(4096), hole(4096)]), 8192, true).expect("extents"),
            vec![d(4096, 0)]
        );
        assert_eq!(
            block_status_descriptors(Ok(vec![data(4096), hole(4096), data(1)]), 6000, false).expect("extents"),
            vec![d(4096, 0), d(1904, hz)]
        );
        // A volume without a map: all data. One that says nothing, or fails: an error.
        let unsupported = Err(IoError::NotSupported("no map".into()));
        assert_eq!(block_status_descriptors(unsupported, 512, false).expect("all data"), vec![d(512, 0)]);
        assert!(block_status_descriptors(Ok(vec![]), 512, false).is_err());
        assert!(block_status_descriptors(Ok(vec![hole(0)]), 512, false).is_err());
        assert!(matches!(block_status_descriptors(Err(IoError::Io("x".into())), 512, true), Err(IoError::Io(_))));
        assert_eq!((extents_wanted(true), extents_wanted(false)), (1, BLOCK_STATUS_EXTENTS_MAX));
    }

    proptest! {
        /// Whatever the header, an accepted data request lies inside the export and the limit.
        #[test]
        fn accepted_requests_are_in_bounds(command in 0u16..10, flags in any::<u16>(), offset in any::<u64>(), length in any::<u32>(),
                                           features in prop_oneof![Just(SIMPLE), Just(STRUCTURED), Just(ALLOCATION)]) {
            match super::classify(&header(command, flags, offset, length), &RW, features) {
                Ok(Request::Read { offset, length, df }) => {
                    prop_assert!(length <= REQUEST_BYTES_MAX);
                    prop_assert!(offset + u64::from(length) <= SIZE);
                    prop_assert!(!df || features.structured_replies);
                }
                Ok(Request::Write { offset, length, .. }) => {
                    prop_assert!(length <= REQUEST_BYTES_MAX);
                    prop_assert!(offset + u64::from(length) <= SIZE);
                }
                Ok(Request::Trim { offset, length, .. }) | Ok(Request::WriteZeroes { offset, length, .. }) => {
                    prop_assert!(offset + u64::from(length) <= SIZE);
                }
                Ok(Request::BlockStatus { offset, length, .. }) => {
                    prop_assert!(features.base_allocation && length > 0);
                    prop_assert!(offset + u64::from(length) <= SIZE);
                }
                Ok(Request::Flush) | Ok(Request::Disconnect) => {}
                Err(rejection) => {
                    if command == cmd::WRITE && length <= REQUEST_BYTES_MAX {
                        prop_assert_eq!(rejection.payload, Payload::Discard(length));
                    } else if command != cmd::WRITE {
                        prop_assert_eq!(rejection.payload, Payload::None);
                    }
                }
            }
        }
    }
}
