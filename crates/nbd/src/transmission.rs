//! Transmission-phase decisions: a request header and the export in, a command to run or an
//! error to reply out; and the errno a volume's failure is answered with. Sans-IO;
//! `server.rs` runs what this accepts.

use tandem_frontend::IoError;

use crate::codec::{cmd, cmd_flag, errno, RequestHeader, REQUEST_BYTES_MAX};
use crate::handshake::ExportInfo;

/// A checked request: offsets and lengths are within the export and the payload limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        length: u32,
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
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
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

/// Checks a request against the protocol and the export, following the protocol's choice of
/// errno: EINVAL for unknown commands and flags, oversized payloads and reads or trims past
/// the end; ENOSPC for writes (and write-zeroes) past the end; EPERM for changes to a
/// read-only export.
pub fn classify(header: &RequestHeader, export: &ExportInfo) -> Result<Request, Rejection> {
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
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM => cmd_flag::FUA,
        cmd::WRITE_ZEROES => cmd_flag::FUA | cmd_flag::NO_HOLE,
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
        cmd::READ => Ok(Request::Read { offset, length }),
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
        other => unreachable!("command {other} passed the flag check"),
    }
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
        assert_eq!(classify(&header(cmd::READ, 0, 0, 4096), &RW), Ok(Request::Read { offset: 0, length: 4096 }));
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
            errno_of(classify(&header(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 0, 2), &RW)),
            Some((e, Payload::None))
        );
        for unknown in [cmd::CACHE, cmd::BLOCK_STATUS, 8, 999, u16::MAX] {
            assert_eq!(errno_of(classify(&header(unknown, 0, 0, 512), &RW)), Some((e, Payload::None)));
        }
    }

    proptest! {
        /// Whatever the header, an accepted data request lies inside the export and the limit.
        #[test]
        fn accepted_requests_are_in_bounds(command in 0u16..10, flags in any::<u16>(), offset in any::<u64>(), length in any::<u32>()) {
            match classify(&header(command, flags, offset, length), &RW) {
                Ok(Request::Read { offset, length }) | Ok(Request::Write { offset, length, .. }) => {
                    prop_assert!(length <= REQUEST_BYTES_MAX);
                    prop_assert!(offset + u64::from(length) <= SIZE);
                }
                Ok(Request::Trim { offset, length, .. }) | Ok(Request::WriteZeroes { offset, length, .. }) => {
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
