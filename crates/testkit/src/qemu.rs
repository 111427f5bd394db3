//! Running the real clients a test drives, with explicit failure rules.
//!
//! [`qemu_io`] runs qemu-io and returns what it did; [`qemu_io_ok`] is the rule for a run that
//! must succeed: exit status 0, no "Pattern verification failed" (a `read -P` that found other
//! data), and no "failed" anywhere (qemu-io reports a failed request on stdout and may still
//! exit 0). [`run_ok`] is the rule for other clients: exit status 0.

use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::process::output_within;

/// A client that has not finished after this long is hung.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(600);

/// How a client run ended: its status and its stdout and stderr together.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub text: String,
}

/// Runs `program` with `args` to its end (at most [`CLIENT_DEADLINE`]).
pub fn run(program: &str, args: &[&str]) -> Ran {
    run_within(program, args, CLIENT_DEADLINE)
}

/// Runs `program` with `args` to its end; fails the test if it takes longer than `deadline`.
pub fn run_within(program: &str, args: &[&str], deadline: Duration) -> Ran {
    let out = output_within(Command::new(program).args(args), deadline).unwrap_or_else(|e| panic!("{e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ran { status: out.status, text }
}

/// Runs a client that must exit 0; its stdout and stderr.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let ran = run(program, args);
    assert!(ran.status.success(), "{program} {args:?} failed ({}): {}", ran.status, ran.text);
    ran.text
}

/// The arguments of `qemu-io -f raw URL -c CMD...`.
pub fn qemu_io_args<'a>(url: &'a str, commands: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-f", "raw", url];
    for command in commands {
        args.extend(["-c", *command]);
    }
    args
}

/// `qemu-io -f raw URL -c CMD...`, whatever its outcome.
pub fn qemu_io(url: &str, commands: &[&str]) -> Ran {
    run("qemu-io", &qemu_io_args(url, commands))
}

/// `qemu-io` that must succeed by the rules above; its output.
pub fn qemu_io_ok(url: &str, commands: &[&str]) -> String {
    let ran = qemu_io(url, commands);
    let text = &ran.text;
    assert!(ran.status.success(), "qemu-io {commands:?} on {url} failed ({}): {text}", ran.status);
    assert!(!text.contains("Pattern verification failed"), "qemu-io {commands:?} on {url}: {text}");
    assert!(!text.contains("failed"), "qemu-io {commands:?} on {url}: {text}");
    ran.text
}

/// qemu's `--image-opts` for `volume` through the NBD server at `nbd`, over TLS with the
/// object `tls0` ([`tls_object`]) when `tls`.
pub fn nbd_image_opts(nbd: std::net::SocketAddr, volume: &str, tls: bool) -> String {
    let mut opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={},file.server.port={},file.export={volume}",
        nbd.ip(),
        nbd.port()
    );
    if tls {
        opts.push_str(",file.tls-creds=tls0");
    }
    opts
}

/// qemu's TLS object `tls0` with the credentials in `dir` (qemu's file names, as `tandem host
/// credentials` writes them).
pub fn tls_object(dir: &std::path::Path) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display())
}

/// `qemu-io` on `volume` through `nbd` with the TLS credentials in `creds`, or in plaintext
/// without.
pub fn qemu_io_tls(nbd: std::net::SocketAddr, volume: &str, creds: Option<&std::path::Path>, commands: &[&str]) -> Ran {
    let mut args: Vec<String> = Vec::new();
    if let Some(dir) = creds {
        args.extend(["--object".into(), tls_object(dir)]);
    }
    args.extend(["--image-opts".into(), nbd_image_opts(nbd, volume, creds.is_some())]);
    for c in commands {
        args.extend(["-c".into(), c.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_within("qemu-io", &args, Duration::from_secs(120))
}

/// libnbd's URI of `volume` through `nbd` over TLS with the credentials in `creds`.
pub fn nbds_url(nbd: std::net::SocketAddr, volume: &str, creds: &std::path::Path) -> String {
    format!("nbds://{nbd}/{volume}?tls-certificates={}", creds.display())
}

/// Whether `ran` did its I/O: qemu-io may exit 0 after a failed request.
pub fn io_ok(ran: &Ran) -> bool {
    ran.status.success() && !ran.text.contains("failed") && !ran.text.contains("rror")
}
