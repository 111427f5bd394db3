//! The reference of `bench io`: a raw file preallocated with zeros, served by `qemu-nbd
//! --cache=writethrough` on 127.0.0.1, stopped by pid when the guard goes.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::REFERENCE_EXPORT;

const QEMU_NBD_START_WAIT: Duration = Duration::from_secs(15);
/// How long qemu-nbd gets after SIGTERM before SIGKILL.
const QEMU_NBD_STOP_WAIT: Duration = Duration::from_secs(10);
/// The reference file is preallocated with zeros written in pieces of this size.
const ZERO_PIECE_BYTES: usize = 1 << 20;

/// The reference's raw file, preallocated by writing zeros (not `fallocate`: its unwritten
/// extents would make each of qemu-nbd's O_DSYNC writes also commit an extent conversion,
/// handicapping the reference), then made durable.
pub(super) fn write_zeros(path: &Path, size_bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let zeros = vec![0u8; ZERO_PIECE_BYTES];
    let mut left = size_bytes;
    while left > 0 {
        let n = left.min(ZERO_PIECE_BYTES as u64) as usize;
        f.write_all(&zeros[..n]).with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().with_context(|| format!("cannot sync {}", path.display()))
}

/// `qemu-nbd --cache=writethrough` serving the raw file on 127.0.0.1; stopped by pid (SIGTERM,
/// then SIGKILL) when dropped.
pub(super) struct QemuNbd {
    pub(super) addr: SocketAddr,
    log: PathBuf,
    child: Child,
}

impl QemuNbd {
    pub(super) fn start(qemu_nbd: &Path, raw: &Path, log_dir: &Path) -> anyhow::Result<QemuNbd> {
        use std::os::unix::process::CommandExt;
        // A free port: bound here, released, and bound by qemu-nbd right after.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port on 127.0.0.1")?;
        let log = log_dir.join("qemu-nbd.log");
        let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = std::process::Command::new(qemu_nbd)
            .args(["-f", "raw", "--cache=writethrough", "--persistent", "--shared=8", "-b", "127.0.0.1"])
            .arg("-p")
            .arg(addr.port().to_string())
            .arg("-x")
            .arg(REFERENCE_EXPORT)
            .arg(raw)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            // Its own process group: a Ctrl-C reaches the benchmark, which stops qemu-nbd itself.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", qemu_nbd.display()))?;
        Ok(QemuNbd { addr, log, child })
    }

    /// Until qemu-nbd accepts connections; fails early, with its log, if it exits.
    pub(super) async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + QEMU_NBD_START_WAIT;
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            let log = || std::fs::read_to_string(&self.log).unwrap_or_default();
            if Instant::now() >= deadline {
                bail!(
                    "qemu-nbd does not accept connections on {} within {QEMU_NBD_START_WAIT:?}: {}",
                    self.addr,
                    log()
                );
            }
            // qemu-nbd's exit (a port taken in the meantime, say) shows as a refused connection
            // until the deadline; its log says why.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // Blocking is acceptable here: the benchmark is ending, and qemu-nbd must not outlive it.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + QEMU_NBD_STOP_WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(25)),
            }
        }
    }
}
