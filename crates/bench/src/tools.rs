//! The tools a reference needs: found on PATH, or installed with apt-get by the benchmark
//! itself (../../shared/design/BENCH.md).

use anyhow::Context;

/// Runs apt-get (references that are missing are installed by the benchmark itself).
pub async fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    // apt-get's output goes to stderr, so that stdout holds only the benchmark's result.
    let status = tokio::process::Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .stdout(std::io::stderr())
        .stderr(std::io::stderr())
        .status()
        .await
        .with_context(|| format!("cannot run apt-get {}", args.join(" ")))?;
    if !status.success() {
        anyhow::bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The first file named `name` in a dir of PATH.
pub fn on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}
