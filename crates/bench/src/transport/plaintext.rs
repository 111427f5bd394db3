//! `bench transport`'s plaintext reference: length-prefixed frames (u32 BE length + payload)
//! on bare TCP, read and written the same way on both sides.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::MIB;

/// A plaintext frame longer than this is a protocol error, not an allocation.
const PLAIN_FRAME_MAX: usize = 16 * MIB;
/// Buffers of the plaintext connections, as the Mesh's pipes coalesce up to 64 KiB.
const PLAIN_BUF_BYTES: usize = 64 * 1024;

pub(super) struct PlainConn {
    pub(super) r: BufReader<OwnedReadHalf>,
    pub(super) w: BufWriter<OwnedWriteHalf>,
}

impl PlainConn {
    pub(super) fn new(stream: TcpStream) -> std::io::Result<PlainConn> {
        // As the Mesh's TCP pipes: no Nagle delay on small frames.
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(PlainConn {
            r: BufReader::with_capacity(PLAIN_BUF_BYTES, r),
            w: BufWriter::with_capacity(PLAIN_BUF_BYTES, w),
        })
    }
}

/// Reads one frame into a fresh buffer, as the Mesh hands each payload on as its own `Bytes`;
/// `None` on a clean end of stream between frames.
pub(super) async fn read_plain_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Bytes>> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > PLAIN_FRAME_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes, more than {PLAIN_FRAME_MAX}"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(payload.into()))
}

/// Writes one frame and flushes; a large payload goes straight from its buffer (`BufWriter`
/// passes writes larger than its capacity through), a small one in the same write as its length.
pub(super) async fn write_plain_frame<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame longer than 4 GiB"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plaintext_frames_round_trip_and_refuse_oversized_lengths() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut w = BufWriter::new(a);
        let mut r = BufReader::new(b);
        let writer = async {
            write_plain_frame(&mut w, b"hello").await?;
            write_plain_frame(&mut w, b"").await?;
            w.write_all(&((PLAIN_FRAME_MAX + 1) as u32).to_be_bytes()).await?;
            w.flush().await
        };
        let reader = async {
            let first = read_plain_frame(&mut r).await?;
            let second = read_plain_frame(&mut r).await?;
            let third = read_plain_frame(&mut r).await;
            std::io::Result::Ok((first, second, third))
        };
        let (written, read) = tokio::join!(writer, reader);
        written.expect("write");
        let (first, second, third) = read.expect("read");
        assert_eq!(first.as_deref(), Some(&b"hello"[..]));
        assert_eq!(second.as_deref(), Some(&b""[..]));
        assert_eq!(third.expect_err("oversized").kind(), std::io::ErrorKind::InvalidData);
    }
}
