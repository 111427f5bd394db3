//! `bench copy`'s result: medians over the repeats, the token copies' ratios to nbdcopy and of
//! the large copy to the small one, the goals, and the table (or the JSON document).
//!
//! Only copies the cluster made by reference count towards the token figures: a streamed copy
//! is listed with its run, counted by its own goal, and left out of the medians, so that it can
//! never pass for a copy by reference.

use serde::Serialize;
use tandem_client::format_size;

use super::CopyArgs;
use crate::goal::{ratio, Goal, Op};
use crate::load;

/// The goals of BENCH.md: the small token copy this many times faster than nbdcopy of the same
/// bytes, and the large one within this factor of the small one's time.
const SPEEDUP_TARGET: f64 = 100.0;
const SIZE_FACTOR_TARGET: f64 = 2.0;

/// Writing a source whole before the runs.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Fill {
    pub(super) volume: String,
    pub(super) bytes: u64,
    pub(super) seconds: f64,
}

/// One copy by token, as the API's caller saw it.
#[derive(Clone, Debug, Serialize)]
pub(super) struct TokenCopy {
    pub(super) bytes: u64,
    /// The nodes holding the token's image.
    pub(super) holders: usize,
    /// `POST /v1/volumes/{source}/tokens`: the image made on every in-sync replica.
    pub(super) token_ms: f64,
    /// `POST /v1/volumes/{target}/copy`: the clone record on every in-sync replica.
    pub(super) copy_ms: f64,
    /// Both, back to back.
    pub(super) total_ms: f64,
    /// What the copy's reply said: false for a copy the cluster streamed.
    pub(super) by_reference: bool,
}

/// One repeat: nbdcopy of the small range, then the two token copies.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Run {
    pub(super) repeat: u32,
    pub(super) nbdcopy_ms: f64,
    pub(super) small: TokenCopy,
    pub(super) large: TokenCopy,
}

/// A volume's bytes read back over NBD against those its source was filled with.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Verified {
    pub(super) volume: String,
    pub(super) source: String,
    pub(super) bytes: u64,
    pub(super) same: bool,
}

/// Medians over the token copies of one size that were made by reference.
#[derive(Clone, Debug, Serialize)]
struct Medians {
    bytes: u64,
    by_reference: usize,
    streamed: usize,
    token_ms: f64,
    copy_ms: f64,
    total_ms: f64,
}

#[derive(Serialize)]
pub(super) struct Report {
    benchmark: &'static str,
    nbdcopy_version: String,
    tandem_nodes: u32,
    repeats: u32,
    cores: usize,
    fills: Vec<Fill>,
    nbdcopy_ms: f64,
    small: Medians,
    large: Medians,
    /// nbdcopy's time over the small token copy's (token and copy), and over its copy alone.
    speedup_total: f64,
    speedup_copy_only: f64,
    /// The large token copy's time over the small one's (token and copy), and copy alone.
    size_factor_total: f64,
    size_factor_copy_only: f64,
    runs: Vec<Run>,
    verified: Vec<Verified>,
    goals: Vec<Goal>,
}

fn medians(copies: &[&TokenCopy], bytes: u64) -> Medians {
    let by_ref: Vec<&&TokenCopy> = copies.iter().filter(|c| c.by_reference).collect();
    let of = |f: fn(&TokenCopy) -> f64| load::median(&by_ref.iter().map(|c| f(c)).collect::<Vec<f64>>());
    Medians {
        bytes,
        by_reference: by_ref.len(),
        streamed: copies.len() - by_ref.len(),
        token_ms: of(|c| c.token_ms),
        copy_ms: of(|c| c.copy_ms),
        total_ms: of(|c| c.total_ms),
    }
}

/// The size of `gib` GiB as the goal names and labels say it, e.g. `16g`.
fn gib_name(bytes: u64) -> String {
    format!("{}g", bytes >> 30)
}

pub(super) fn report(
    args: &CopyArgs,
    nbdcopy_version: String,
    fills: Vec<Fill>,
    runs: Vec<Run>,
    verified: Vec<Verified>,
) -> Report {
    let (small_bytes, large_bytes) = (args.small_gib << 30, args.large_gib << 30);
    let small = medians(&runs.iter().map(|r| &r.small).collect::<Vec<_>>(), small_bytes);
    let large = medians(&runs.iter().map(|r| &r.large).collect::<Vec<_>>(), large_bytes);
    let nbdcopy_ms = load::median(&runs.iter().map(|r| r.nbdcopy_ms).collect::<Vec<_>>());
    let speedup_total = ratio(nbdcopy_ms, small.total_ms);
    let speedup_copy_only = ratio(nbdcopy_ms, small.copy_ms);
    let size_factor_total = ratio(large.total_ms, small.total_ms);
    let size_factor_copy_only = ratio(large.copy_ms, small.copy_ms);
    let (s, l) = (gib_name(small_bytes), gib_name(large_bytes));
    let streamed = small.streamed + large.streamed;
    let differing = verified.iter().filter(|v| !v.same).count();
    let goals = vec![
        Goal::ratio(&format!("copy-token-{s}-speedup"), speedup_total, "nbdcopy", Op::AtLeast, SPEEDUP_TARGET),
        Goal::labelled(
            &format!("copy-token-{l}-vs-{s}-time"),
            &format!("{l}/{s}"),
            size_factor_total,
            Op::AtMost,
            SIZE_FACTOR_TARGET,
        ),
        Goal::absolute("copy-token-streamed-copies", streamed as f64, 0, Op::AtMost, 0.0),
        Goal::absolute("copy-targets-differing", differing as f64, 0, Op::AtMost, 0.0),
    ];
    Report {
        benchmark: "copy",
        nbdcopy_version,
        tandem_nodes: args.nodes,
        repeats: args.repeats,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        fills,
        nbdcopy_ms,
        small,
        large,
        speedup_total,
        speedup_copy_only,
        size_factor_total,
        size_factor_copy_only,
        runs,
        verified,
        goals,
    }
}

pub(super) fn print_table(r: &Report) {
    println!(
        "bench copy: copy by token (token, then copy) beside {} of the same range over NBD; median of {} interleaved repeats; {} cores",
        r.nbdcopy_version, r.repeats, r.cores
    );
    println!(
        "tandem: {} node(s) (this binary), every volume replicated {} way(s); sources written whole with pseudo-random bytes first",
        r.tandem_nodes, r.tandem_nodes
    );
    for f in &r.fills {
        println!(
            "  filled {} ({}) in {:.1} s, {:.0} MB/s",
            f.volume,
            format_size(f.bytes),
            f.seconds,
            f.bytes as f64 / f.seconds / 1e6
        );
    }
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12} {:>9}",
        "copy", "token ms", "copy ms", "total ms", "by reference", "streamed"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10.0} {:>12} {:>9}",
        format!("nbdcopy {}", format_size(r.small.bytes)),
        "-",
        "-",
        r.nbdcopy_ms,
        "-",
        "-"
    );
    for m in [&r.small, &r.large] {
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>10.1} {:>12} {:>9}",
            format!("token {}", format_size(m.bytes)),
            m.token_ms,
            m.copy_ms,
            m.total_ms,
            m.by_reference,
            m.streamed
        );
    }
    println!(
        "speedup over nbdcopy ({}): {:.1}x (token + copy), {:.1}x (copy alone)",
        format_size(r.small.bytes),
        r.speedup_total,
        r.speedup_copy_only
    );
    println!(
        "{} over {}: {:.2} (token + copy), {:.2} (copy alone)",
        format_size(r.large.bytes),
        format_size(r.small.bytes),
        r.size_factor_total,
        r.size_factor_copy_only
    );
    println!();
    println!("{:>6} {:>11} {:>24} {:>24}", "repeat", "nbdcopy ms", "small token+copy ms", "large token+copy ms");
    for run in &r.runs {
        let cell = |c: &TokenCopy| {
            format!("{:.1}+{:.1}{}", c.token_ms, c.copy_ms, if c.by_reference { "" } else { " STREAMED" })
        };
        println!("{:>6} {:>11.0} {:>24} {:>24}", run.repeat, run.nbdcopy_ms, cell(&run.small), cell(&run.large));
    }
    let same = r.verified.iter().filter(|v| v.same).count();
    println!(
        "bytes read back over NBD (crc32c of the whole range): {same} of {} volumes hold their source's bytes",
        r.verified.len()
    );
    for v in r.verified.iter().filter(|v| !v.same) {
        println!("  {} differs from {}", v.volume, v.source);
    }
    println!();
    for g in &r.goals {
        println!("{}", g.line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(total_ms: f64, by_reference: bool) -> TokenCopy {
        TokenCopy { bytes: 0, holders: 3, token_ms: total_ms / 2.0, copy_ms: total_ms / 2.0, total_ms, by_reference }
    }

    fn args() -> CopyArgs {
        CopyArgs { repeats: 3, small_gib: 1, large_gib: 16, nodes: 3, json: false }
    }

    fn run(repeat: u32, nbdcopy_ms: f64, small: TokenCopy, large: TokenCopy) -> Run {
        Run { repeat, nbdcopy_ms, small, large }
    }

    #[test]
    fn ratios_are_of_the_medians_and_goals_judge_them() {
        let runs = vec![
            run(1, 9000.0, copy(50.0, true), copy(90.0, true)),
            run(2, 10000.0, copy(40.0, true), copy(70.0, true)),
            run(3, 30000.0, copy(500.0, true), copy(80.0, true)),
        ];
        let r = report(&args(), "nbdcopy 1.14.2".into(), vec![], runs, vec![]);
        assert_eq!(r.nbdcopy_ms, 10000.0);
        assert_eq!(r.small.total_ms, 50.0);
        assert_eq!(r.large.total_ms, 80.0);
        assert_eq!(r.speedup_total, 200.0);
        assert_eq!(r.speedup_copy_only, 400.0);
        assert_eq!(r.size_factor_total, 1.6);
        let lines: Vec<&str> = r.goals.iter().map(|g| g.line.as_str()).collect();
        assert_eq!(
            lines,
            [
                "goal copy-token-1g-speedup: 200.00x nbdcopy (target >= 100.0x) met",
                "goal copy-token-16g-vs-1g-time: 16g/1g 1.60 (target <= 2.00) met",
                "goal copy-token-streamed-copies: 0 (target <= 0) met",
                "goal copy-targets-differing: 0 (target <= 0) met",
            ]
        );
    }

    #[test]
    fn streamed_copies_are_left_out_of_the_medians_and_fail_their_goal() {
        // A streamed copy that was fast must not make the by-reference figures look better.
        let runs = vec![
            run(1, 10000.0, copy(1.0, false), copy(100.0, true)),
            run(2, 10000.0, copy(200.0, true), copy(300.0, true)),
        ];
        let r = report(&args(), "nbdcopy".into(), vec![], runs, vec![]);
        assert_eq!((r.small.by_reference, r.small.streamed), (1, 1));
        assert_eq!(r.small.total_ms, 200.0);
        assert_eq!(r.speedup_total, 50.0);
        assert!(!r.goals[0].met, "50x misses 100x");
        assert_eq!(r.goals[2].line, "goal copy-token-streamed-copies: 1 (target <= 0) missed");
    }

    #[test]
    fn no_copy_by_reference_meets_no_goal() {
        let runs = vec![run(1, 10000.0, copy(1.0, false), copy(1.0, false))];
        let r = report(&args(), "nbdcopy".into(), vec![], runs, vec![]);
        assert!(r.speedup_total.is_nan());
        assert!(!r.goals[0].met && !r.goals[1].met && !r.goals[2].met);
    }

    #[test]
    fn a_target_with_other_bytes_fails_its_goal() {
        let runs = vec![run(1, 10000.0, copy(10.0, true), copy(10.0, true))];
        let verified = vec![
            Verified { volume: "a".into(), source: "s".into(), bytes: 1, same: true },
            Verified { volume: "b".into(), source: "s".into(), bytes: 1, same: false },
        ];
        let r = report(&args(), "nbdcopy".into(), vec![], runs, verified);
        assert_eq!(r.goals[3].line, "goal copy-targets-differing: 1 (target <= 0) missed");
    }
}
