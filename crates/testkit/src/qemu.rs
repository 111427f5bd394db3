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
