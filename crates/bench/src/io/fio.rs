//! The fio jobs of `bench io`, run with the same parameters on both sides, and the figures read
//! from fio's JSON output.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use super::SEQ_IODEPTH;

/// fio gets this long beyond its runtime (connecting, and the preconditioning pass) before the
/// benchmark gives up on it.
const FIO_GRACE: Duration = Duration::from_secs(120);

/// One fio job, run with the same parameters on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Job {
    RandwriteQd1,
    RandwriteQd32,
    Write1mSeq,
    RandreadQd32,
}

pub(super) const JOBS: [Job; 4] = [Job::RandwriteQd1, Job::RandwriteQd32, Job::Write1mSeq, Job::RandreadQd32];

impl Job {
    pub(super) fn label(self) -> String {
        match self {
            Job::RandwriteQd1 => "randwrite 4k qd1".into(),
            Job::RandwriteQd32 => "randwrite 4k qd32".into(),
            Job::Write1mSeq => format!("write 1M seq qd{SEQ_IODEPTH}"),
            Job::RandreadQd32 => "randread 4k qd32".into(),
        }
    }

    /// fio's `--rw`, `--bs` and `--iodepth`.
    fn fio_params(self) -> (&'static str, &'static str, u32) {
        match self {
            Job::RandwriteQd1 => ("randwrite", "4k", 1),
            Job::RandwriteQd32 => ("randwrite", "4k", 32),
            Job::Write1mSeq => ("write", "1M", SEQ_IODEPTH),
            Job::RandreadQd32 => ("randread", "4k", 32),
        }
    }

    fn reads(self) -> bool {
        self == Job::RandreadQd32
    }
}

/// What one fio run reports for its one direction.
#[derive(Clone, Debug, Serialize)]
pub(super) struct FioFigures {
    pub(super) iops: f64,
    /// 10^6 bytes per second.
    pub(super) mb_per_s: f64,
    pub(super) clat_p50_us: f64,
    pub(super) clat_p99_us: f64,
}

/// Runs fio once against `uri`: `job` for `runtime_secs`, or with no job the preconditioning
/// pass (1 MiB sequential writes over the working set, once, not timed).
pub(super) async fn fio(
    fio_bin: &Path,
    uri: &str,
    job: Option<Job>,
    size: u64,
    runtime_secs: u64,
) -> anyhow::Result<FioFigures> {
    let mut cmd = tokio::process::Command::new(fio_bin);
    cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}")).arg(format!("--size={size}")).arg("--output-format=json");
    match job {
        Some(job) => {
            let (rw, bs, iodepth) = job.fio_params();
            cmd.arg(format!("--name={}", job.label().replace(' ', "-")))
                .arg(format!("--rw={rw}"))
                .arg(format!("--bs={bs}"))
                .arg(format!("--iodepth={iodepth}"))
                .arg("--time_based=1")
                .arg(format!("--runtime={runtime_secs}"));
        }
        None => {
            cmd.arg("--name=precondition").arg("--rw=write").arg("--bs=1M").arg(format!("--iodepth={SEQ_IODEPTH}"));
        }
    }
    let out = cmd.stdin(Stdio::null()).kill_on_drop(true).output();
    let wait = Duration::from_secs(runtime_secs) + FIO_GRACE;
    let out = tokio::time::timeout(wait, out)
        .await
        .map_err(|_| anyhow!("fio did not finish within {wait:?}"))?
        .context("cannot run fio")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("fio failed ({}): {}{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
    }
    parse_fio(&stdout, job.is_some_and(Job::reads))
}

/// The figures of fio's JSON output (which its NBD engine precedes with a line of its own).
fn parse_fio(stdout: &str, reads: bool) -> anyhow::Result<FioFigures> {
    let start = stdout.find("\n{").map(|i| i + 1).or_else(|| stdout.starts_with('{').then_some(0));
    let json = &stdout[start.ok_or_else(|| anyhow!("no JSON in fio's output: {stdout}"))?..];
    let doc: serde_json::Value = serde_json::from_str(json).context("fio's JSON output does not parse")?;
    let job = &doc["jobs"][0];
    let error = job["error"].as_i64().unwrap_or(-1);
    if error != 0 {
        bail!("fio's job reports error {error}");
    }
    let dir = &job[if reads { "read" } else { "write" }];
    let num = |v: &serde_json::Value, what: &str| v.as_f64().ok_or_else(|| anyhow!("fio's output has no {what}"));
    let percentiles = &dir["clat_ns"]["percentile"];
    Ok(FioFigures {
        iops: num(&dir["iops"], "iops")?,
        mb_per_s: num(&dir["bw_bytes"], "bw_bytes")? / 1e6,
        clat_p50_us: num(&percentiles["50.000000"], "clat p50")? / 1e3,
        clat_p99_us: num(&percentiles["99.000000"], "clat p99")? / 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO_OUT: &str = "fio: connected to NBD server\n{\n  \"jobs\" : [ { \"error\" : 0,\n    \"read\" : { \"iops\" : 0.0, \"bw_bytes\" : 0, \"clat_ns\" : { \"percentile\" : { \"50.000000\" : 0, \"99.000000\" : 0 } } },\n    \"write\" : { \"iops\" : 3054.9, \"bw_bytes\" : 12513054, \"clat_ns\" : { \"percentile\" : { \"50.000000\" : 309248, \"99.000000\" : 643072 } } } } ]\n}\n";

    #[test]
    fn fio_json_is_found_after_the_engine_line() {
        let f = parse_fio(FIO_OUT, false).expect("parses");
        assert_eq!(f.iops, 3054.9);
        assert_eq!(f.mb_per_s, 12.513054);
        assert_eq!(f.clat_p50_us, 309.248);
        assert_eq!(f.clat_p99_us, 643.072);
    }

    #[test]
    fn a_job_error_is_an_error() {
        assert!(parse_fio(&FIO_OUT.replace("\"error\" : 0", "\"error\" : 5"), false).is_err());
        assert!(parse_fio("no json here", false).is_err());
    }
}
