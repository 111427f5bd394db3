//! `bench copy`'s use of `nbdcopy`: the reference copy itself, filling a source volume with
//! pseudo-random bytes (generated here and piped into `nbdcopy - URI`, so no file of that size
//! is written), and the digest of a volume's bytes (`nbdcopy URI -` piped back here). Every
//! child is killed if the benchmark drops it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Bytes generated and piped at a time.
const PIPE_PIECE_BYTES: usize = 1 << 20;
/// nbdcopy copies from a pipe with one request in flight, 256 KiB by default: at a replicated
/// write's latency that fills a source at about 10 MB/s here. Larger requests (within the NBD
/// server's 32 MiB) amortize it.
const FILL_REQUEST_BYTES: usize = 16 << 20;
/// A copy, fill or digest of up to 16 GiB at tens of MB/s takes minutes; one that takes longer
/// than this is stuck.
const NBDCOPY_WAIT: Duration = Duration::from_secs(1800);

/// The pseudo-random bytes a source volume is filled with: splitmix64 of the position (in
/// 8-byte words) and `seed`, so that no two 8-byte words of a volume, nor of two volumes with
/// different seeds, are alike (a store that deduplicated or compressed would gain nothing).
pub(super) fn fill_bytes(seed: u64, offset: u64, buf: &mut [u8]) {
    debug_assert!(offset.is_multiple_of(8) && buf.len().is_multiple_of(8));
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let mut z = (seed << 40) ^ (offset / 8 + i as u64);
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        word.copy_from_slice(&z.to_le_bytes());
    }
}

/// `nbdcopy --flush SRC DST`: the reference copy.
pub(super) async fn copy(nbdcopy: &Path, src: &str, dst: &str) -> anyhow::Result<()> {
    let mut child = Command::new(nbdcopy)
        .args(["--flush", src, dst])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", nbdcopy.display()))?;
    let mut stderr = child.stderr.take().context("nbdcopy's stderr")?;
    let waited = tokio::time::timeout(NBDCOPY_WAIT, async {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err).await;
        (child.wait().await, err)
    })
    .await;
    match waited {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((status, err)) => bail!("nbdcopy {src} {dst} failed ({status:?}): {}", err.trim()),
        Err(_) => bail!("nbdcopy {src} {dst} did not finish within {NBDCOPY_WAIT:?}"),
    }
}

/// Writes `size_bytes` of [`fill_bytes`]`(seed)` to the NBD export at `uri` (`nbdcopy --flush -
/// URI`); returns their crc32c.
pub(super) async fn fill(nbdcopy: &Path, uri: &str, seed: u64, size_bytes: u64) -> anyhow::Result<u32> {
    let mut child = Command::new(nbdcopy)
        .arg("--flush")
        .arg(format!("--request-size={FILL_REQUEST_BYTES}"))
        .args(["-", uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", nbdcopy.display()))?;
    let mut stdin = child.stdin.take().context("nbdcopy's stdin")?;
    let mut stderr = child.stderr.take().context("nbdcopy's stderr")?;
    let feed = async {
        let mut buf = vec![0u8; PIPE_PIECE_BYTES];
        let mut crc = 0u32;
        let mut at = 0u64;
        while at < size_bytes {
            let n = (size_bytes - at).min(PIPE_PIECE_BYTES as u64) as usize;
            fill_bytes(seed, at, &mut buf[..n]);
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            stdin.write_all(&buf[..n]).await.context("nbdcopy stopped reading its stdin")?;
            at += n as u64;
        }
        // EOF: nbdcopy flushes and exits.
        drop(stdin);
        anyhow::Ok(crc)
    };
    let waited = tokio::time::timeout(NBDCOPY_WAIT, async {
        let crc = feed.await;
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err).await;
        (crc, child.wait().await, err)
    })
    .await;
    match waited {
        Ok((Ok(crc), Ok(status), _)) if status.success() => Ok(crc),
        Ok((crc, status, err)) => {
            bail!("nbdcopy - {uri} failed ({status:?}; feeding it: {:?}): {}", crc.err(), err.trim())
        }
        Err(_) => bail!("nbdcopy - {uri} did not finish within {NBDCOPY_WAIT:?}"),
    }
}

/// The crc32c of the first `len` bytes of the NBD export at `uri` (`nbdcopy URI -`), which must
/// be exactly `len` bytes long.
pub(super) async fn digest(nbdcopy: &Path, uri: &str, len: u64) -> anyhow::Result<u32> {
    let mut child = Command::new(nbdcopy)
        .args([uri, "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", nbdcopy.display()))?;
    let mut stdout = child.stdout.take().context("nbdcopy's stdout")?;
    let mut stderr = child.stderr.take().context("nbdcopy's stderr")?;
    let read = async {
        let mut buf = vec![0u8; PIPE_PIECE_BYTES];
        let (mut crc, mut total) = (0u32, 0u64);
        loop {
            let n = stdout.read(&mut buf).await.context("reading nbdcopy's stdout")?;
            if n == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            total += n as u64;
        }
        anyhow::Ok((crc, total))
    };
    let waited = tokio::time::timeout(NBDCOPY_WAIT, async {
        let read = read.await;
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err).await;
        (read, child.wait().await, err)
    })
    .await;
    match waited {
        Ok((Ok((crc, total)), Ok(status), _)) if status.success() => {
            if total != len {
                bail!("{uri} holds {total} bytes, not {len}");
            }
            Ok(crc)
        }
        Ok((read, status, err)) => {
            bail!("nbdcopy {uri} - failed ({status:?}; reading it: {:?}): {}", read.err(), err.trim())
        }
        Err(_) => bail!("nbdcopy {uri} - did not finish within {NBDCOPY_WAIT:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_bytes_depend_on_position_and_seed_only() {
        let mut whole = vec![0u8; 64];
        fill_bytes(1, 4096, &mut whole);
        let mut halves = vec![0u8; 64];
        fill_bytes(1, 4096, &mut halves[..32]);
        fill_bytes(1, 4096 + 32, &mut halves[32..]);
        assert_eq!(whole, halves, "the bytes at a position do not depend on how they are cut");
        let mut other = vec![0u8; 64];
        fill_bytes(2, 4096, &mut other);
        assert_ne!(whole, other, "another seed gives other bytes");
        let words: std::collections::BTreeSet<&[u8]> = whole.chunks(8).collect();
        assert_eq!(words.len(), 8, "no two words alike");
    }
}
