//! Processes a test starts: the `tandem` CLI with a deadline, signals by pid, and the one
//! kill guard ([`Reap`]) that stops a child when the test ends, also when it fails.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::binary::tandem_bin;
use crate::wait::poll;
use crate::Error;

/// A CLI command (`up` waits for APIs and a leader, `down` gives each node 15 s) that has not
/// finished after this long is hung, not slow.
pub const CLI_DEADLINE: Duration = Duration::from_secs(180);

/// Kills a child process (SIGKILL) and reaps it when dropped.
pub struct Reap(pub Child);

impl Reap {
    pub fn spawn(cmd: &mut Command) -> Reap {
        Reap(cmd.spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}")))
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end with its output captured; kills it and fails after `deadline`.
pub fn output_within(cmd: &mut Command, deadline: Duration) -> Result<Output, Error> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error(format!("{what}: {e}")))?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let mut child = Reap(child);
    let status = poll(&format!("{what} to finish"), deadline, || child.0.try_wait().ok().flatten())?;
    Ok(Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() })
}

/// The log level of `tandem` processes the tests start: `warn`, or `TANDEM_TEST_LOG` (e.g.
/// `info,tandem_replication=debug`) when set, for debugging a test.
pub fn log_level() -> String {
    std::env::var("TANDEM_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

/// Runs the `tandem` CLI; nodes started through it (`up`) inherit [`log_level`].
pub fn run_tandem(args: &[&str]) -> Output {
    try_run_tandem(args).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_run_tandem(args: &[&str]) -> Result<Output, Error> {
    tandem_output(&tandem_bin(), args)
}

/// Runs `exe` (a `tandem` executable) with `args` by [`CLI_DEADLINE`].
pub fn tandem_output(exe: &Path, args: &[&str]) -> Result<Output, Error> {
    tandem_output_logging(exe, args, Some(&log_level()))
}

/// [`tandem_output`] with `RUST_LOG` set to `log`, or, with `None`, as this process has it (the
/// benchmarks' nodes log as their caller asked).
pub fn tandem_output_logging(exe: &Path, args: &[&str], log: Option<&str>) -> Result<Output, Error> {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if let Some(log) = log {
        cmd.env("RUST_LOG", log);
    }
    output_within(&mut cmd, CLI_DEADLINE)
}

/// Runs `exe` with `args`; its stdout, or a failure with its exit status and output.
pub fn tandem_ok(exe: &Path, args: &[&str]) -> Result<String, Error> {
    tandem_ok_logging(exe, args, Some(&log_level()))
}

/// [`tandem_ok`] with `RUST_LOG` as [`tandem_output_logging`] sets it.
pub fn tandem_ok_logging(exe: &Path, args: &[&str], log: Option<&str>) -> Result<String, Error> {
    let out = tandem_output_logging(exe, args, log)?;
    if !out.status.success() {
        return Err(Error(format!(
            "tandem {args:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the `tandem` CLI and returns its stdout, or fails with its exit status and output.
pub fn try_run_tandem_ok(args: &[&str]) -> Result<String, Error> {
    tandem_ok(&tandem_bin(), args)
}

pub fn run_tandem_ok(args: &[&str]) -> String {
    try_run_tandem_ok(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: i32, signal: Signal) -> Result<(), Error> {
    nix::sys::signal::kill(Pid::from_raw(pid), signal).map_err(|e| Error(format!("kill -{signal} {pid}: {e}")))
}

/// Whether `pid` is a live process (a zombie counts as dead).
pub fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'))
}
