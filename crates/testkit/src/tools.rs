//! The real clients a test drives (qemu-io, nbdcopy, fio, nft, ...): installed on demand on a
//! fresh Debian machine, or the test fails naming what is missing. A test never passes
//! without running.

use std::process::Command;

/// The Debian package that provides each real client the tests drive.
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("qemu-io", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("fio", "fio"),
    ("nft", "nftables"),
    ("iscsi-test-cu", "libiscsi-bin"),
    ("iscsi-inq", "libiscsi-bin"),
    ("iscsi-ls", "libiscsi-bin"),
];

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Makes sure the real clients a test drives are installed. On a fresh Debian machine, as
/// root, it installs their packages (once), so `cargo test --workspace` needs no other set-up.
/// A client that cannot be had fails the test.
pub fn require_tools(tools: &[&str]) {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return;
    }
    let mut packages: Vec<&str> =
        missing.iter().filter_map(|t| TOOL_PACKAGES.iter().find(|(tool, _)| tool == t).map(|(_, p)| *p)).collect();
    packages.sort();
    packages.dedup();
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root && on_path("apt-get") && !packages.is_empty() {
        println!("installing {packages:?} for {missing:?}");
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    let still: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    assert!(
        still.is_empty(),
        "this test drives {still:?}; install the packages {packages:?} (as root: apt-get install)"
    );
}

/// Makes sure qemu-img and qemu-io can open `iscsi://` URLs. Their iSCSI driver is a module of
/// `qemu-block-extra`, loaded only from a package of exactly their own build; Debian's sources
/// may offer an older one than the qemu-utils installed (this machine image ships qemu-utils
/// from backports). As root, it installs both at the version the sources offer for
/// qemu-block-extra (as `.ci/run` does); otherwise the test fails naming the fix.
pub fn require_qemu_iscsi() {
    require_tools(&["qemu-img", "qemu-io"]);
    let lists_iscsi = || {
        Command::new("qemu-img").arg("--help").output().is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w == "iscsi")
        })
    };
    if lists_iscsi() {
        return;
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let candidate = Command::new("apt-cache").args(["policy", "qemu-block-extra"]).output().ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:").map(|v| v.trim().to_string()))
            .filter(|v| v != "(none)")
    });
    if let (true, Some(version)) = (root, &candidate) {
        println!("installing qemu-utils and qemu-block-extra {version} (qemu-img's iSCSI driver)");
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--allow-downgrades"])
            .arg(format!("qemu-utils={version}"))
            .arg(format!("qemu-block-extra={version}"))
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    assert!(
        lists_iscsi(),
        "qemu-img cannot open iscsi:// URLs: install qemu-block-extra of exactly qemu-utils' version \
         (as root: apt-get install --allow-downgrades qemu-utils=V qemu-block-extra=V, V from \
         apt-cache policy qemu-block-extra; candidate here: {candidate:?})"
    );
}
