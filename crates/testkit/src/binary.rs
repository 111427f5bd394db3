//! The `tandem` executable the tests start, always built from the current sources.
//!
//! A test binary lives in `<target>/<profile>/deps/`; the `tandem` binary of the same build
//! is `<target>/<profile>/tandem`. The first test of a process that needs it runs
//! `cargo build -p tandem --bin tandem` for that target dir and profile (cargo decides whether
//! anything changed, and its own lock on the build dir serializes concurrent test processes);
//! later calls in the process reuse the answer. `cargo test` no longer holds that lock while
//! test binaries run, so the nested build cannot deadlock on it. `TANDEM_BIN` overrides it all
//! with a given executable (no build).
//!
//! The chaos build ([`tandem_chaos_bin`]) is the same binary with [`CHAOS_FEATURES`] on (the
//! failpoints, the planted bugs, and their debug API), built in a target dir of its own, `<target>/chaos-build`,
//! debug profile: it never replaces `<target>/<profile>/tandem`, which the other tests run.
//! `TANDEM_CHAOS_BIN` overrides it with a given executable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace this kit was compiled in (its manifest is the root of the build).
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The path of a current `tandem` executable; builds it on first use. Panics with cargo's
/// output if the build fails.
pub fn tandem_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TANDEM_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("the test's own path");
        let (target_dir, profile_dir) = build_dirs(&exe)
            .unwrap_or_else(|| panic!("{} is not in <target>/<profile>/deps; set TANDEM_BIN", exe.display()));
        build(&target_dir, &profile_dir);
        let bin = profile_dir.join("tandem");
        assert!(bin.is_file(), "cargo built tandem but {} is missing", bin.display());
        bin
    })
    .clone()
}

/// The `tandem` crate features of the chaos build.
pub const CHAOS_FEATURES: &[&str] = &["failpoints", "chaos-bugs"];

/// The path of a current chaos build of `tandem` (with [`CHAOS_FEATURES`]); builds it on
/// first use into `<target>/chaos-build/debug/tandem`. Panics with cargo's output if the
/// build fails.
pub fn tandem_chaos_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TANDEM_CHAOS_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("the test's own path");
        let (target_dir, _) = build_dirs(&exe)
            .unwrap_or_else(|| panic!("{} is not in <target>/<profile>/deps; set TANDEM_CHAOS_BIN", exe.display()));
        let chaos_dir = target_dir.join("chaos-build");
        cargo_build(&chaos_dir, "dev", CHAOS_FEATURES);
        let bin = chaos_dir.join("debug").join("tandem");
        assert!(bin.is_file(), "cargo built the chaos tandem but {} is missing", bin.display());
        bin
    })
    .clone()
}

/// `(<target>, <target>/<profile>)` of an executable in `<target>/<profile>/deps/`.
fn build_dirs(exe: &Path) -> Option<(PathBuf, PathBuf)> {
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    let profile_dir = deps.parent()?.to_path_buf();
    let target_dir = profile_dir.parent()?.to_path_buf();
    Some((target_dir, profile_dir))
}

fn build(target_dir: &Path, profile_dir: &Path) {
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => panic!("no profile dir in {}", profile_dir.display()),
    };
    cargo_build(target_dir, &profile, &[]);
}

/// `cargo build -p tandem --bin tandem` with `features` into `target_dir`.
fn cargo_build(target_dir: &Path, profile: &str, features: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(WORKSPACE).join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "tandem", "--bin", "tandem", "--profile", profile]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd
        .arg("--manifest-path")
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .expect("run cargo to build tandem");
    assert!(
        out.status.success(),
        "cargo build -p tandem --bin tandem --features '{}' ({}) failed: {}",
        features.join(","),
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_dirs_of_a_test_binary() {
        let (target, profile) = build_dirs(Path::new("/t/target/debug/deps/data-0123")).expect("dirs");
        assert_eq!((target.as_path(), profile.as_path()), (Path::new("/t/target"), Path::new("/t/target/debug")));
        assert!(build_dirs(Path::new("/usr/bin/tandem")).is_none());
    }
}
