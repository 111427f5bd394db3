//! The benchmark's handle on its peer process (`tandem bench transport-peer`): started from this
//! very binary, its addresses read from its first line, stopped by closing its stdin, and killed
//! when the guard goes unless it was stopped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::peer::PeerAddrs;

/// Starting the peer (certificates, listeners) on a loaded machine.
const PEER_START_WAIT: Duration = Duration::from_secs(30);
/// The peer exits on its own when its stdin closes; after this it is killed.
const PEER_STOP_WAIT: Duration = Duration::from_secs(10);

/// The peer process, killed when the guard goes unless it was stopped.
pub(super) struct PeerProcess {
    child: tokio::process::Child,
    /// Closing it tells the peer to exit.
    stdin: Option<tokio::process::ChildStdin>,
    pub(super) addrs: PeerAddrs,
}

impl PeerProcess {
    pub(super) async fn start(dir: &Path) -> anyhow::Result<PeerProcess> {
        let exe = std::env::current_exe().context("cannot find the tandem executable")?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["bench", "transport-peer", "--dir"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The peer's logs and errors go where ours go.
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} bench transport-peer", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        // From here on the guard kills the peer, whatever happens.
        let mut peer = PeerProcess { child, stdin, addrs: PeerAddrs { mesh: unspecified(), plaintext: unspecified() } };
        let stdout = stdout.ok_or_else(|| anyhow!("the peer's stdout is not piped"))?;
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        let read = stdout.read_line(&mut line);
        let n = tokio::time::timeout(PEER_START_WAIT, read)
            .await
            .map_err(|_| anyhow!("the peer did not report its addresses within {PEER_START_WAIT:?}"))?
            .context("cannot read the peer's stdout")?;
        if n == 0 {
            let status = peer.child.try_wait().ok().flatten();
            bail!("the peer exited before reporting its addresses (status {status:?}; its errors are above)");
        }
        peer.addrs = serde_json::from_str(line.trim())
            .with_context(|| format!("the peer reported {:?}, not its addresses", line.trim()))?;
        Ok(peer)
    }

    /// Closes the peer's stdin and waits for it to exit; kills it if it does not.
    pub(super) async fn stop(&mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(PEER_STOP_WAIT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(anyhow!("the peer exited with {status}")),
            Ok(Err(e)) => Err(anyhow!("cannot wait for the peer: {e}")),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                Err(anyhow!("the peer did not exit within {PEER_STOP_WAIT:?} of its stdin closing; killed it"))
            }
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        // Harmless when it has exited; tokio reaps a child that is not waited for.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.start_kill();
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
