//! The chaos suite against real nodes: CI's short pass (a fixed set of scenarios and seeds,
//! both transports, every verdict must be valid), the proof that the suite can fail (each
//! planted bug of a `chaos-bugs` build, switched on, is caught), and the cleanup on Ctrl-C. Each run's report
//! lands in `<target>/chaos-ci/<scenario>-<seed>/` (`.ci/run` prints the summaries).
//!
//! The runs go one at a time (the test kit's turn): two clusters on two cores would make each
//! other's faults.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tandem_chaos::run::{run, RunOptions};
use tandem_chaos::{scenario, verdict};
use tandem_testkit::{require_tools, take_turn, tandem_bin, tandem_chaos_bin, wait_for};

/// How long each short-pass run injects faults.
const SHORT: Duration = Duration::from_secs(12);

/// Where the reports go: beside the build, so a CI run can print them.
fn reports() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    // <target>/<profile>/deps/chaos-...
    let target = exe.ancestors().nth(3).expect("the target dir").to_path_buf();
    target.join("chaos-ci")
}

/// Runs one scenario with one seed and asserts a valid verdict; the report's path.
fn short_run(
    name: &str,
    seed: u64,
    transport: &str,
    exe: PathBuf,
    bugs: &[&str],
    duration: Duration,
) -> verdict::Verdict {
    require_tools(&["nft"]);
    let _turn = take_turn();
    let s = scenario::find(name).unwrap_or_else(|| panic!("no scenario {name}"));
    let out = reports().join(format!("{name}-{seed}"));
    let _ = std::fs::remove_dir_all(&out);
    let opts = RunOptions {
        exe,
        seed,
        duration,
        nodes: 3,
        transport: transport.into(),
        out: out.clone(),
        interrupted: Arc::new(AtomicBool::new(false)),
        bugs: bugs.iter().map(|b| b.to_string()).collect(),
        progress: false,
    };
    println!("chaos run {name} seed {seed} on {transport}: report in {}", out.display());
    let record =
        run(&s, &opts, seed as u32 % 1000).unwrap_or_else(|e| panic!("{name} seed {seed}: the run failed: {e:#}"));
    let v = verdict::judge_and_report(&record, &out);
    let line = v.line(name, seed);
    println!("{line}");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(reports().join("summary.txt"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    v
}

fn must_be_valid(name: &str, seed: u64, transport: &str) {
    must_be_valid_on(name, seed, transport, tandem_bin());
}

fn must_be_valid_on(name: &str, seed: u64, transport: &str, exe: PathBuf) {
    let v = short_run(name, seed, transport, exe, &[], SHORT);
    assert!(v.passed(), "{}", v.line(name, seed));
    assert!(v.ops > 500, "{name} seed {seed}: only {} operations were made", v.ops);
    assert!(v.faults > 0, "{name} seed {seed}: no fault was injected");
}

macro_rules! short_pass {
    ($($test:ident: $name:literal, $seed:literal, $transport:literal;)*) => {
        $(
            #[test]
            fn $test() {
                must_be_valid($name, $seed, $transport);
            }
        )*
    };
}

// CI's short pass: 20 nemesis kinds (two through regression scenarios), 3 nodes (5 for
// replace-node), both transports, fixed seeds.
short_pass! {
    short_partition_primary: "partition-primary", 101, "tcp";
    short_partition_leader: "partition-leader", 102, "quic";
    short_partition_halves: "partition-halves", 103, "tcp";
    short_blackhole: "blackhole", 104, "quic";
    short_packet_loss: "packet-loss", 105, "tcp";
    short_tcp_reset: "tcp-reset", 106, "tcp";
    short_kill_primary: "kill-primary", 107, "quic";
    short_kill_all: "kill-all", 108, "tcp";
    short_pause_primary: "pause-primary", 109, "quic";
    short_pause_leader: "pause-leader", 110, "tcp";
    short_switch_data: "switch-data", 111, "quic";
    short_switch_during_partition: "switch-during-partition", 112, "tcp";
    short_slow_link: "slow-link", 113, "quic";
    short_kill_primary_lagging: "kill-primary-lagging", 119, "quic";
    short_snapshot_catch_up: "snapshot-catch-up", 115, "quic";
    short_add_remove_node: "add-remove-node", 116, "tcp";
    short_replace_node: "replace-node", 120, "quic";
    short_regress_stale_read_after_power_cut: "regress-stale-read-after-power-cut", 117, "tcp";
    short_regress_lease_blip: "regress-lease-blip", 118, "quic";
    short_regress_restarted_replica_resync: "regress-restarted-replica-resync", 114, "tcp";
}

/// The regression scenario of a bug the failpoints found: a primary whose store fails must drop
/// out and fail over with no host error (docs/ARCHITECTURE.md, "Failure handling").
#[test]
fn regress_primary_store_fails() {
    must_be_valid_on("regress-primary-store-fails", 1, "tcp", tandem_chaos_bin());
}

/// A node whose snapshot install failed must restart and catch up (openraft 0.9 persisted a
/// purge past the failed install, and the node could never start again; `LogStore::purge` now
/// waits for the state machine's durable snapshot).
#[test]
fn regress_failed_snapshot_install() {
    must_be_valid_on("fail-snapshot-install", 1, "tcp", tandem_chaos_bin());
}

/// How many seeds a planted bug may take before the test gives up on the checker, and how
/// long each of those runs injects faults (the bugs that need a fault to land in a narrow
/// window get a few chances per run).
const PLANTED_SEEDS: std::ops::RangeInclusive<u64> = 201..=210;
const PLANTED_RUN: Duration = Duration::from_secs(20);

/// Runs `scenario` on the chaos build with `bug` planted in every node, seed after seed, until
/// the verdict fails (invalid, acknowledged writes lost, unexpected host errors, divergence);
/// asserts that some seed catches it and says how many it took.
fn must_catch(bug: &str, scenario: &str, transport: &str) {
    let mut seen = Vec::new();
    for (taken, seed) in PLANTED_SEEDS.enumerate() {
        let v = short_run(scenario, seed, transport, tandem_chaos_bin(), &[bug], PLANTED_RUN);
        if !v.passed() {
            println!(
                "planted {bug}: caught by {scenario} on seed {seed}, after {} seed(s): {} lost, {} unexpected host errors, {:?}",
                taken + 1,
                v.lost,
                v.host_errors_unexpected,
                v.problems
            );
            return;
        }
        seen.push(v.line(scenario, seed));
    }
    panic!("planted {bug} was not caught by {scenario} in {} seeds:\n{}", seen.len(), seen.join("\n"));
}

macro_rules! planted {
    ($($test:ident: $bug:literal by $scenario:literal on $transport:literal;)*) => {
        $(
            #[test]
            fn $test() {
                must_catch($bug, $scenario, $transport);
            }
        )*
    };
}

// The suite can fail: each planted bug (docs/ARCHITECTURE.md, "Planted bugs") is caught by the
// scenario that exposes it (docs/CHAOS.md, "The suite can fail").
planted! {
    planted_ack_before_backups_is_caught: "ack-before-backups" by "partition-primary" on "tcp";
    planted_read_without_lease_is_caught: "read-without-lease" by "partition-primary" on "quic";
    planted_accept_older_epoch_is_caught: "accept-older-epoch" by "partition-primary" on "tcp";
    planted_skip_reconciliation_is_caught: "skip-reconciliation" by "regress-restarted-replica-resync" on "tcp";
    planted_read_unacknowledged_is_caught: "read-unacknowledged" by "kill-primary-alone" on "tcp";
    planted_backup_ack_before_fsync_is_caught: "backup-ack-before-fsync" by "power-cut-all-primary-late" on "tcp";
    planted_late_isr_change_is_caught: "late-isr-change" by "late-grow-across-rebuild" on "tcp";
    planted_park_at_stopped_primary_is_caught: "park-at-stopped-primary" by "kill-primary-slow-reroute" on "tcp";
}

/// `kill-primary-slow-reroute` on correct nodes (the chaos build, for its failpoint): the
/// planted `park-at-stopped-primary` fails it (above), a correct cluster must not.
#[test]
fn kill_primary_slow_reroute_is_valid() {
    must_be_valid_on("kill-primary-slow-reroute", 203, "quic", tandem_chaos_bin());
}

/// `late-grow-across-rebuild` on correct nodes (the chaos build, for its failpoints): the
/// planted `late-isr-change` fails it (above), a correct cluster must not.
#[test]
fn late_grow_across_rebuild_is_valid() {
    must_be_valid_on("late-grow-across-rebuild", 2, "quic", tandem_chaos_bin());
}

/// Ctrl-C in the middle of a run: the command stops, and leaves no namespace and no node
/// process behind.
#[test]
fn ctrl_c_stops_a_run_and_cleans_up_everything() {
    require_tools(&["nft", "ip"]);
    let _turn = take_turn();
    let out = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(tandem_bin())
        .args(["chaos", "run", "--scenario", "kill-node", "--seed", "5", "--duration", "60s", "--quiet", "--out"])
        .arg(out.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tandem chaos run");
    let pid = child.id() as i32;
    let history = out.path().join("kill-node-5").join("history.jsonl");
    // The run is under way once its clients have recorded operations.
    wait_for("the run's clients to record operations", Duration::from_secs(120), || {
        (std::fs::metadata(&history).map(|m| m.len()).unwrap_or(0) > 10_000).then_some(())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = wait_for("the run to stop after Ctrl-C", Duration::from_secs(60), || child.try_wait().ok().flatten());
    assert!(!status.success(), "an interrupted run must not report success");
    let namespaces = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(!namespaces.contains(&format!("tdmnet{pid}x")), "namespaces left behind: {namespaces}");
    let procs = Command::new("pgrep").args(["-f", &out.path().display().to_string()]).output().expect("pgrep");
    let left = String::from_utf8_lossy(&procs.stdout);
    assert!(left.trim().is_empty(), "processes left behind: {left}");
}
