//! `tandem bench copy`: copy by token (`POST /v1/volumes/{v}/tokens`, then `POST
//! /v1/volumes/{t}/copy`) of a fully written 1 GiB range and of a fully written 16 GiB range,
//! beside `nbdcopy` of the same 1 GiB between two volumes of the same cluster over NBD, in the
//! same run, interleaved (see ../../shared/design/BENCH.md).
//!
//! The sources are written whole before anything is timed, with pseudo-random bytes (a token's
//! image and its copy cost one metadata clone per written chunk, so an empty thin source would
//! flatter the copy). Each repeat: `nbdcopy` from the small source to its target volume, then
//! a token of the small source copied into a fresh volume, then the same for the large one;
//! the token's creation and the copy are timed apart. A copy the cluster streamed instead of
//! making by reference is reported as such and never counted as a by-reference figure. After
//! the repeats, the targets' bytes (crc32c of the whole range, read over NBD) are compared with
//! those the sources were filled with: nbdcopy's target, every small token copy, the last large
//! one.
//!
//! - `nbd.rs`: nbdcopy: the reference copy, filling the sources, reading digests.
//! - `report.rs`: the medians, the ratios, the goals and the table.

mod nbd;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use reqwest::Method;
use serde::Serialize;
use tandem_client::format_size;
use tandem_node::copy_api::{CopyRequest, TokenRequest, TokenView};

use self::report::{print_table, report, Fill, Run, TokenCopy, Verified};
use crate::cluster_api::BenchCluster;
use crate::tools::{apt_get, on_path};

/// The cluster's size by default: every volume replicated 3 ways, as in the other benchmarks.
const NODES_DEFAULT: u32 = 3;
const NODES_MAX: i64 = 5;
const GIB: u64 = 1 << 30;
const SMALL_SOURCE: &str = "bench-copy-src-small";
const LARGE_SOURCE: &str = "bench-copy-src-large";
/// nbdcopy's target: written over in every repeat.
const NBDCOPY_TARGET: &str = "bench-copy-nbdcopy";
/// The seeds of the sources' bytes (see [`nbd::fill_bytes`]).
const SMALL_SEED: u64 = 1;
const LARGE_SEED: u64 = 2;
const REPEATS_MAX: i64 = 20;
const GIB_MAX: u64 = 1024;
/// Every replica holds a copy of both sources and of nbdcopy's target, plus the store's
/// journal and index: the benchmark wants this much room per byte it writes per replica.
const DISK_HEADROOM: f64 = 1.1;

#[derive(Args)]
pub struct CopyArgs {
    /// How many times each copy runs; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    pub(super) repeats: u32,
    /// The small copy's size in GiB, copied both by token and by nbdcopy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=GIB_MAX))]
    pub(super) small_gib: u64,
    /// The large copy's size in GiB, copied by token only (its source is written whole first).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=GIB_MAX))]
    pub(super) large_gib: u64,
    /// The local cluster's nodes, each holding a copy of every volume: 3 by default; 1 when the
    /// disk cannot hold three copies of the sources (the check at the start says so).
    #[arg(long, default_value_t = NODES_DEFAULT, value_parser = clap::value_parser!(u32).range(1..=NODES_MAX))]
    pub(super) nodes: u32,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

/// Which of the two token copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Size {
    Small,
    Large,
}

impl Size {
    fn source(self) -> &'static str {
        match self {
            Size::Small => SMALL_SOURCE,
            Size::Large => LARGE_SOURCE,
        }
    }

    fn target(self, repeat: u32) -> String {
        match self {
            Size::Small => format!("bench-copy-dst-small-{repeat}"),
            Size::Large => format!("bench-copy-dst-large-{repeat}"),
        }
    }
}

pub async fn run(args: CopyArgs) -> anyhow::Result<()> {
    let nbdcopy = ensure_nbdcopy().await?;
    let nbdcopy_version = first_line(&nbdcopy, "--version")?;
    let (small, large) = (args.small_gib * GIB, args.large_gib * GIB);
    let started = Instant::now();

    let nodes = args.nodes;
    eprintln!("starting a {nodes}-node Tandem cluster (tandem up --detach)");
    let tandem = BenchCluster::start(nodes).await?;
    eprintln!("  in {}", tandem.dir().display());
    let measured = async {
        check_disk(tandem.dir(), nodes, f64::from(nodes) * (2 * small + large) as f64 * DISK_HEADROOM)?;
        measure(&args, &tandem, &nbdcopy).await
    }
    .await;
    if std::env::var_os("TANDEM_TEST_KEEP").is_some() {
        eprintln!("keeping the cluster's dir and its nodes' logs (TANDEM_TEST_KEEP)");
    }
    eprintln!("stopping the Tandem cluster");
    let stopped = tandem.stop().await;
    let (fills, runs, verified) = measured?;
    stopped?;
    eprintln!("bench copy took {:.0} s", started.elapsed().as_secs_f64());

    let report = report(&args, nbdcopy_version, fills, runs, verified);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure(
    args: &CopyArgs,
    tandem: &BenchCluster,
    nbdcopy: &Path,
) -> anyhow::Result<(Vec<Fill>, Vec<Run>, Vec<Verified>)> {
    let (small, large) = (args.small_gib * GIB, args.large_gib * GIB);
    for (name, size) in [(SMALL_SOURCE, small), (NBDCOPY_TARGET, small), (LARGE_SOURCE, large)] {
        let v = tandem.create_volume(name, size).await?;
        eprintln!("volume {name} ({}): primary node {}, ISR {:?}", format_size(size), v.primary, v.isr);
    }
    let mut fills = Vec::new();
    let mut digests = Vec::new();
    for (name, size, seed) in [(SMALL_SOURCE, small, SMALL_SEED), (LARGE_SOURCE, large, LARGE_SEED)] {
        let uri = nbd_uri(tandem, name).await?;
        eprintln!("filling {name} whole with {} of pseudo-random bytes: nbdcopy - {uri}", format_size(size));
        let t0 = Instant::now();
        let crc = nbd::fill(nbdcopy, &uri, seed, size).await.with_context(|| format!("filling {name}"))?;
        let seconds = t0.elapsed().as_secs_f64();
        eprintln!("  {:.1} s, {:.0} MB/s", seconds, size as f64 / seconds / 1e6);
        fills.push(Fill { volume: name.to_string(), bytes: size, seconds });
        digests.push((name, crc));
    }
    let leader = tandem.api(tandem.leader_api().await?);

    let mut runs = Vec::new();
    for repeat in 1..=args.repeats {
        let what = format!("repeat {repeat}/{}", args.repeats);
        let (src, dst) = (nbd_uri(tandem, SMALL_SOURCE).await?, nbd_uri(tandem, NBDCOPY_TARGET).await?);
        let t0 = Instant::now();
        nbd::copy(nbdcopy, &src, &dst).await.with_context(|| format!("{what}: nbdcopy"))?;
        let nbdcopy_ms = ms_since(t0);
        eprintln!("{what}: nbdcopy of {}: {nbdcopy_ms:.0} ms", format_size(small));
        let mut copies = Vec::new();
        for (size, bytes) in [(Size::Small, small), (Size::Large, large)] {
            let target = size.target(repeat);
            tandem.create_volume(&target, bytes).await?;
            let c = token_copy(&leader, size.source(), &target, bytes)
                .await
                .with_context(|| format!("{what}: token copy of {} to {target}", format_size(bytes)))?;
            eprintln!(
                "{what}: token copy of {}: token {:.1} ms + copy {:.1} ms = {:.1} ms, {}",
                format_size(bytes),
                c.token_ms,
                c.copy_ms,
                c.total_ms,
                if c.by_reference { "by reference" } else { "STREAMED" }
            );
            copies.push(c);
        }
        let large_copy = copies.pop().expect("two copies");
        let small_copy = copies.pop().expect("two copies");
        runs.push(Run { repeat, nbdcopy_ms, small: small_copy, large: large_copy });
    }

    // The targets against the bytes their sources were filled with (which checks the fills
    // too): nbdcopy's, every small one, and the last large one (reading 16 GiB over NBD takes
    // minutes on this machine).
    let mut targets = vec![(NBDCOPY_TARGET.to_string(), SMALL_SOURCE, small)];
    for r in 1..=args.repeats {
        targets.push((Size::Small.target(r), SMALL_SOURCE, small));
    }
    targets.push((Size::Large.target(args.repeats), LARGE_SOURCE, large));
    let mut verified = Vec::new();
    for (name, source, bytes) in targets {
        let expected = digests.iter().find(|(n, _)| *n == source).map(|(_, c)| *c).expect("filled");
        let uri = nbd_uri(tandem, &name).await?;
        let t0 = Instant::now();
        let crc = nbd::digest(nbdcopy, &uri, bytes).await.with_context(|| format!("reading {name}"))?;
        eprintln!(
            "{name}: crc32c {crc:08x} ({:.1} s), {} {source} as filled",
            t0.elapsed().as_secs_f64(),
            if crc == expected { "the same as" } else { "DIFFERENT FROM" }
        );
        verified.push(Verified { volume: name, source: source.to_string(), bytes, same: crc == expected });
    }
    Ok((fills, runs, verified))
}

/// A token of the whole of `source`'s first `bytes`, then a copy of it to `target` at 0.
async fn token_copy(api: &tandem_client::Api, source: &str, target: &str, bytes: u64) -> anyhow::Result<TokenCopy> {
    let req = TokenRequest { offset: Some(0), length: Some(bytes), ranges: None, lifetime_s: None, idle_s: None };
    let t0 = Instant::now();
    let token: TokenView = api.request(Method::POST, &format!("/v1/volumes/{source}/tokens"), Some(&req)).await?;
    let token_ms = ms_since(t0);
    let value = token.token.ok_or_else(|| anyhow!("the new token's reply has no value"))?;
    let req = CopyRequest { token: value, offset: 0, token_offset: 0, length: None };
    let t1 = Instant::now();
    let reply: serde_json::Value = api.request(Method::POST, &format!("/v1/volumes/{target}/copy"), Some(&req)).await?;
    let copy_ms = ms_since(t1);
    let total_ms = ms_since(t0);
    let copied = reply["bytes"].as_u64().ok_or_else(|| anyhow!("the copy's reply has no bytes: {reply}"))?;
    if copied != bytes {
        bail!("the copy wrote {copied} bytes, not {bytes}");
    }
    let by_reference =
        reply["by_reference"].as_bool().ok_or_else(|| anyhow!("the copy's reply has no by_reference: {reply}"))?;
    Ok(TokenCopy { bytes, holders: token.holders.len(), token_ms, copy_ms, total_ms, by_reference })
}

/// The volume's export at its primary's NBD address, the path a host would use.
async fn nbd_uri(tandem: &BenchCluster, name: &str) -> anyhow::Result<String> {
    let v = tandem.volume(name, None).await?;
    let cfg = tandem.config()?;
    let primary =
        cfg.node(v.primary).ok_or_else(|| anyhow!("the primary, node {}, is not in the config", v.primary))?;
    Ok(format!("nbd://{}/{name}", primary.nbd_addr))
}

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

/// Refuses to start when the file system of the cluster's dir has less than `need_bytes` free:
/// filling it would break the benchmark and everything else on the machine.
fn check_disk(dir: &Path, nodes: u32, need_bytes: f64) -> anyhow::Result<()> {
    let st = nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let free = st.blocks_available() as f64 * st.fragment_size() as f64;
    if free < need_bytes {
        bail!(
            "{} has {:.1} GiB free; the sources and nbdcopy's target on {nodes} replicas need {:.1} GiB \
             (try a smaller --large-gib, or fewer --nodes)",
            dir.display(),
            free / GIB as f64,
            need_bytes / GIB as f64
        );
    }
    Ok(())
}

/// nbdcopy: on PATH, or installed from Debian's `libnbd-bin` first.
async fn ensure_nbdcopy() -> anyhow::Result<PathBuf> {
    if let Some(p) = on_path("nbdcopy") {
        return Ok(p);
    }
    eprintln!("nbdcopy is not on PATH: installing it (apt-get update && apt-get install -y libnbd-bin)");
    apt_get(&["update"]).await?;
    apt_get(&["install", "-y", "libnbd-bin"]).await?;
    on_path("nbdcopy").ok_or_else(|| anyhow!("libnbd-bin is installed but nbdcopy is not on PATH"))
}

/// A tool's `--version` first line, e.g. `nbdcopy 1.14.2`.
fn first_line(bin: &Path, arg: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin)
        .arg(arg)
        .output()
        .with_context(|| format!("cannot run {} {arg}", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string())
}
