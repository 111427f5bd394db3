//! The named scenarios `tandem chaos list` shows: which nemeses a run draws its faults from,
//! how many at once, and on how many nodes at least. Every nemesis kind is a scenario of its
//! own; the mixes combine them; regression scenarios (`regress-*`) replay the schedules that
//! found bugs.

use std::time::Duration;

use crate::nemesis::Kind;

/// One step of a fixed schedule: the kind, how long it is held, the gap after it.
pub type FixedStep = (Kind, Duration, Duration);

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub about: String,
    /// The kinds each step draws from.
    pub kinds: Vec<Kind>,
    /// Kinds started together with each drawn fault (e.g. a transport switch during a
    /// partition).
    pub with: Vec<Kind>,
    /// The fewest nodes it runs on.
    pub nodes_min: u32,
    /// How the steps' kinds, holds and gaps are chosen.
    pub timing: Timing,
}

/// How a scenario's schedule is made: drawn from the seed, or pinned (in part or whole) by a
/// regression scenario that replays what found a bug.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Timing {
    /// Everything from the seed: which of the kinds, how long each is held, the gaps.
    Drawn,
    /// Kinds and gaps from the seed, but every fault held this long.
    Hold(Duration),
    /// These steps as they are, whatever the seed and the duration.
    Fixed(Vec<FixedStep>),
}

impl Scenario {
    fn single(kind: Kind) -> Scenario {
        Scenario {
            name: kind.name().into(),
            about: kind.about().into(),
            kinds: vec![kind],
            with: vec![],
            nodes_min: if kind.needs_five() { 5 } else { 3 },
            timing: Timing::Drawn,
        }
    }

    fn mix(name: &str, about: &str, kinds: &[Kind], with: &[Kind]) -> Scenario {
        Scenario {
            name: name.into(),
            about: about.into(),
            kinds: kinds.to_vec(),
            with: with.to_vec(),
            nodes_min: 3,
            timing: Timing::Drawn,
        }
    }

    /// A regression scenario: `steps` replayed as they are, whatever the seed.
    fn regress(name: &str, about: &str, steps: &[FixedStep]) -> Scenario {
        let mut kinds: Vec<Kind> = steps.iter().map(|s| s.0).collect();
        kinds.sort();
        kinds.dedup();
        Scenario { timing: Timing::Fixed(steps.to_vec()), ..Scenario::mix(name, about, &kinds, &[]) }
    }

    /// Whether its nodes must be a `failpoints` build.
    pub fn needs_failpoints(&self) -> bool {
        self.all_kinds().into_iter().any(Kind::needs_failpoints)
    }

    /// Every nemesis kind this scenario may inject.
    pub fn all_kinds(&self) -> Vec<Kind> {
        let mut k: Vec<Kind> = self.kinds.iter().chain(&self.with).copied().collect();
        k.sort();
        k.dedup();
        k
    }
}

/// Every scenario, in the order `list` shows them.
pub fn all() -> Vec<Scenario> {
    use Kind::*;
    let mut s: Vec<Scenario> = Kind::ALL.into_iter().map(Scenario::single).collect();
    s.push(Scenario::mix(
        "partitions",
        "every kind of partition (3-node safe ones), one at a time",
        &[PartitionNode, PartitionLeader, PartitionPrimary, PartitionHalves, PartitionBridge, Blackhole],
        &[],
    ));
    s.push(Scenario::mix(
        "crashes",
        "SIGKILL of a node, the leader, the primary, a minority, every node; then restarts",
        &[KillNode, KillLeader, KillPrimary, KillPrimaryLagging, KillPrimaryAlone, KillMinority, KillAll],
        &[],
    ));
    s.push(Scenario::mix(
        "stalls",
        "SIGSTOP of the primary or the leader past its lease (with and without failover), packet loss, TCP resets",
        &[PausePrimary, PauseLeader, PausePrimaryBlip, PacketLoss, TcpReset],
        &[],
    ));
    s.push(Scenario::mix(
        "switch-during-partition",
        "a live transport switch of the data or control layer while a node is cut off",
        &[PartitionNode, PartitionLeader, PartitionPrimary],
        &[SwitchData],
    ));
    s.push(Scenario::mix(
        "power-loss",
        "power cuts (unsynced writes lost) of a node, the primary, every node; the primary back last",
        &[PowerCutNode, PowerCutPrimary, PowerCutAll, PowerCutAllPrimaryLate],
        &[],
    ));
    s.push(Scenario::mix(
        "regress-stale-read-after-power-cut",
        "every node's power cut while settings are written: the Raft leader, restored as leader at \
         restart with its commit index lost, must not answer reads that miss acknowledged writes \
         (found with power-cut-all-primary-late seed 1; fixed in MetaStore::local_read_index)",
        &[PowerCutAll, PowerCutAllPrimaryLate],
        &[],
    ));
    s.push(Scenario::mix("mix", "every 3-node nemesis, drawn at random", &Kind::ALL[..5], &[]));
    let last = s.len() - 1;
    s[last].kinds = Kind::ALL.into_iter().filter(|k| !k.needs_five() && !k.needs_failpoints()).collect();
    // With fail-snapshot-install, the whole run has short snapshot intervals.
    s.push(Scenario::mix(
        "failpoints",
        "faults inside the nodes (a failpoints build, --exe): failed and crashing journal fsyncs on the primary \
         and the backups, late backup acks, ISR changes that cannot be proposed or commit late, failed snapshot installs",
        &[
            FailFsyncPrimary,
            FailFsyncBackup,
            CrashBeforeFsync,
            CrashAfterFsync,
            StallBackupReply,
            StallIsrPropose,
            FailSnapshotInstall,
            LateIsrCommit,
            IsolateAlonePrimary,
            KillPrimarySlowReroute,
        ],
        &[],
    ));
    // Regression scenarios: the schedules that found bugs, replayed as they were.
    let secs = Duration::from_secs;
    let millis = Duration::from_millis;
    s.push(Scenario::regress(
        "regress-primary-store-fails",
        "the primary's journal fsync fails twice in a row (store poisoned): it must drop out and the volume fail \
         over with no host error (it kept its lease, churned epochs and answered EIO)",
        &[(FailFsyncPrimary, secs(9), secs(4)), (FailFsyncPrimary, secs(9), secs(4))],
    ));
    // kill-primary-lagging seed 114 (docs/ARCHITECTURE.md, transport invariants): a node's
    // link kept its session across the peer's restart and resent what was outstanding with
    // the old numbers; the new process waited for ever for the numbers its predecessor had
    // answered out of order, so the new primary's chunk copies to the restarted former
    // primary timed out every 30 s and writes to that chunk waited behind them.
    s.push(Scenario::regress(
        "regress-restarted-replica-resync",
        "the primary killed twice, a backup lagging each time: both restarted former primaries must be resynced \
         promptly (their links' resent requests left gaps the new processes waited on for ever)",
        &[(KillPrimaryLagging, millis(8400), millis(2600)), (KillPrimaryLagging, millis(6500), secs(3))],
    ));
    // A primary rebuilt in one process must not take over what its predecessor left pending:
    // the grow of a backup, committed late, would count the backup in sync without the writes
    // the new core acknowledges meanwhile; the kill then fails the volume over to it
    // (docs/ARCHITECTURE.md, "One primary per epoch"; the planted bug `late-isr-change`).
    s.push(Scenario::regress(
        "late-grow-across-rebuild",
        "the primary alone in the ISR and cut off past the hold time with a backup's grow on its way, rebuilt at \
         the heal, then killed: the late grow must not put that backup in the ISR and fail the volume over to it",
        &[(IsolateAlonePrimary, secs(35), secs(3))],
    ));
    // pause-primary-blip seed 1 (docs/PROTOCOL.md, "Retries of a write that may have taken
    // effect"): the primary stops with host writes sequenced and sent, just long enough that
    // the leader fails it over as it wakes; its node then re-routed those writes to the new
    // primary, which executed them a second time after newer acknowledged writes.
    s.push(Scenario {
        timing: Timing::Hold(REGRESS_LEASE_BLIP_HOLD),
        ..Scenario::mix(
            "regress-lease-blip",
            "SIGSTOP of the primary for 2.8 s every time: it wakes as the leader fails it over (a retried write ran twice)",
            &[PausePrimaryBlip],
            &[],
        )
    });
    s
}

/// Just past the leader's failure timeout (2.5 s), well short of the time a failover with
/// reconciliation takes to settle: the stopped primary wakes while the new one starts serving.
const REGRESS_LEASE_BLIP_HOLD: Duration = Duration::from_millis(2800);

pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_kind_has_a_scenario() {
        let all = all();
        let mut names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate scenario names");
        for k in Kind::ALL {
            assert!(find(k.name()).is_some_and(|s| s.kinds == vec![k]), "{}", k.name());
        }
        let failpoint_kinds = Kind::ALL.into_iter().filter(|k| k.needs_failpoints()).count();
        let five_node_kinds = Kind::ALL.into_iter().filter(|k| k.needs_five()).count();
        assert!(find("mix").is_some_and(|s| s.kinds.len() == Kind::ALL.len() - five_node_kinds - failpoint_kinds));
        assert!(find("mix").is_some_and(|s| !s.needs_failpoints()));
        assert!(find("failpoints").is_some_and(|s| s.kinds.len() == failpoint_kinds && s.needs_failpoints()));
        let regress = find("regress-primary-store-fails").expect("the regression scenario");
        assert_eq!(regress.kinds, vec![Kind::FailFsyncPrimary]);
        assert!(matches!(&regress.timing, Timing::Fixed(steps) if steps.len() == 2));
        assert!(find("power-loss").is_some_and(|s| s.all_kinds().iter().all(|k| k.cuts_power())));
    }
}
