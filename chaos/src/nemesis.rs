//! The nemeses: each injects one kind of fault when started and takes it back when stopped.
//! Targets that depend on the cluster's state (the leader, the volume's primary) are looked
//! up when the fault starts; random choices come from the run's seeded generator, so the same
//! seed replays the same schedule (docs/CHAOS.md).

use std::time::{Duration, Instant};

use anyhow::anyhow;
use serde_json::Value;
use tandem_testkit::queries::local_copy;
use tandem_testkit::Rng;

use crate::proxy::Link;
use crate::world::{NetRule, World};

/// Every kind of fault the suite can inject (`tandem chaos list` shows them by name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// One node cut off from the others (both ways).
    PartitionNode,
    PartitionLeader,
    PartitionPrimary,
    /// A majority and a minority, at random.
    PartitionHalves,
    /// Two halves that both still reach one bridge node.
    PartitionBridge,
    /// Every node reaches only its neighbours on a ring (5 nodes: each sees a majority, no two
    /// the same one).
    PartitionRing,
    /// Packets from one node to the others are dropped, the other way they pass.
    Blackhole,
    /// A share of one node's packets to and from the others is dropped at random.
    PacketLoss,
    /// Every TCP connection of one node to the others is reset while the fault lasts.
    TcpReset,
    /// One node's links to the others get a seeded delay and jitter (and UDP loss) through a
    /// userspace proxy (`tc netem` does not exist here).
    SlowLink,
    KillNode,
    KillLeader,
    KillPrimary,
    /// SIGKILL of the primary while one backup lags (the primary's packets to it dropped for a
    /// moment, so writes in flight reached one backup and not the other): the next primary
    /// must reconcile them.
    KillPrimaryLagging,
    /// SIGKILL of the primary after its packets to every backup were dropped for a moment:
    /// the writes it took in that moment reached no backup (none was acknowledged).
    KillPrimaryAlone,
    /// A minority of the nodes at once.
    KillMinority,
    /// Every node at once, under load; then all restart.
    KillAll,
    /// A follower cut off until the leader has snapshotted and purged the log it misses: it
    /// must catch up by snapshot.
    SnapshotCatchUp,
    /// SIGSTOP of the primary for longer than its lease, then SIGCONT.
    PausePrimary,
    PauseLeader,
    /// SIGSTOP of the primary for longer than its lease but shorter than a failover takes: a
    /// lease blip with no failover; the requests that reached it meanwhile run late, or not.
    PausePrimaryBlip,
    /// A new node joins under load (a Raft learner); it leaves again at the stop.
    AddRemoveNode,
    /// Membership replace on 5 nodes (the volume on 3 of them): a new node joins, then a node
    /// that holds no replica (the Raft leader if it holds none) is removed and wiped; at the
    /// stop the removed node joins again, afresh, and the new one leaves.
    ReplaceNode,
    /// The data layer moves to the other transport (QUIC <-> TCP), and back at the stop.
    SwitchData,
    SwitchControl,
    // Failpoints inside the nodes (docs/ARCHITECTURE.md, "Failpoints"): the nodes must be a
    // `failpoints` build (`--exe`). Kept together, last.
    /// `journal-before-fsync` `return` on the primary: its disk fails (the store is poisoned
    /// until the node restarts, so the stop restarts it).
    FailFsyncPrimary,
    /// The same on a backup.
    FailFsyncBackup,
    /// `1*panic` at `journal-before-fsync` on the primary or a backup: a crash between the
    /// journal write and its fsync (restarted at the stop).
    CrashBeforeFsync,
    /// `1*panic` at `journal-after-fsync`: a crash after the fsync, before durability is
    /// published (restarted at the stop).
    CrashAfterFsync,
    /// `backup-before-reply` `sleep` longer than the member timeout on a backup: its
    /// acknowledgements come late, the primary times it out and shrinks the ISR.
    StallBackupReply,
    /// `isr-before-propose` `return` on the primary and the leader while a backup's
    /// acknowledgements are lost: the shrink (and any failover) cannot be proposed for the hold.
    StallIsrPropose,
    /// `snapshot-catch-up` with `snapshot-before-install` `1*return` on the follower: its first
    /// install fails, which stops its Raft (openraft treats it as fatal); restarted at the stop,
    /// it must catch up by snapshot.
    FailSnapshotInstall,
    /// Proposals that commit late: `isr-before-propose` = `sleep` on the primary, so each of its
    /// ISR changes is proposed 2.5 s after it was computed; a backup is cut off from it (a late
    /// shrink), let back (a late grow once it caught up), and the primary stopped for a lease
    /// blip while the grow may still be on its way: its core is deposed and rebuilt in one
    /// process with a change of its predecessor pending.
    LateIsrCommit,
    /// The primary alone in the ISR (its backup cut off from it, any other's acknowledgements
    /// lost), the backup let back while the primary's ISR changes are proposed 50 s late (the
    /// grow is on its way), then the primary cut off for longer than the hold time: no
    /// failover can happen, its core is deposed, and at the heal it is rebuilt in one process
    /// with the grow of its predecessor still pending. Its stop kills the rebuilt primary (see
    /// [`heal_alone`]).
    IsolateAlonePrimary,
    /// SIGKILL of the primary while every other node learns of the failover late
    /// (`proxy-before-reroute` = `sleep` there): the host writes they proxied to the dead
    /// primary, some of which reached a backup and come back with reconciliation, are re-routed
    /// to the new primary seconds after the hosts on its node wrote and read those blocks again.
    /// Restarted at the stop.
    KillPrimarySlowReroute,
    // Power loss: each node's data dir is on a lazyfs layer (`crate::lazyfs`); a cut is a
    // SIGKILL followed by the loss of every write the node had not fsynced.
    /// A power cut of one random node; it restarts at the stop.
    PowerCutNode,
    /// A power cut of the volume's primary.
    PowerCutPrimary,
    /// A power cut of every node at once, under load; all restart together.
    PowerCutAll,
    /// A power cut of every node at once; at the stop every node but the old primary comes
    /// back, a backup is failed over to, and only then does the old primary return (a machine
    /// slow to boot). What the backups acknowledged but had not fsynced is gone then.
    PowerCutAllPrimaryLate,
}

impl Kind {
    pub const ALL: [Kind; 39] = [
        Kind::PartitionNode,
        Kind::PartitionLeader,
        Kind::PartitionPrimary,
        Kind::PartitionHalves,
        Kind::PartitionBridge,
        Kind::PartitionRing,
        Kind::Blackhole,
        Kind::PacketLoss,
        Kind::TcpReset,
        Kind::SlowLink,
        Kind::KillNode,
        Kind::KillLeader,
        Kind::KillPrimary,
        Kind::KillPrimaryLagging,
        Kind::KillPrimaryAlone,
        Kind::KillMinority,
        Kind::KillAll,
        Kind::SnapshotCatchUp,
        Kind::PausePrimary,
        Kind::PauseLeader,
        Kind::PausePrimaryBlip,
        Kind::AddRemoveNode,
        Kind::ReplaceNode,
        Kind::SwitchData,
        Kind::SwitchControl,
        Kind::FailFsyncPrimary,
        Kind::FailFsyncBackup,
        Kind::CrashBeforeFsync,
        Kind::CrashAfterFsync,
        Kind::StallBackupReply,
        Kind::StallIsrPropose,
        Kind::FailSnapshotInstall,
        Kind::LateIsrCommit,
        Kind::IsolateAlonePrimary,
        Kind::KillPrimarySlowReroute,
        Kind::PowerCutNode,
        Kind::PowerCutPrimary,
        Kind::PowerCutAll,
        Kind::PowerCutAllPrimaryLate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::PartitionNode => "partition-node",
            Kind::PartitionLeader => "partition-leader",
            Kind::PartitionPrimary => "partition-primary",
            Kind::PartitionHalves => "partition-halves",
            Kind::PartitionBridge => "partition-bridge",
            Kind::PartitionRing => "partition-ring",
            Kind::Blackhole => "blackhole",
            Kind::PacketLoss => "packet-loss",
            Kind::TcpReset => "tcp-reset",
            Kind::SlowLink => "slow-link",
            Kind::KillNode => "kill-node",
            Kind::KillLeader => "kill-leader",
            Kind::KillPrimary => "kill-primary",
            Kind::KillPrimaryLagging => "kill-primary-lagging",
            Kind::KillPrimaryAlone => "kill-primary-alone",
            Kind::KillMinority => "kill-minority",
            Kind::KillAll => "kill-all",
            Kind::SnapshotCatchUp => "snapshot-catch-up",
            Kind::PausePrimary => "pause-primary",
            Kind::PauseLeader => "pause-leader",
            Kind::PausePrimaryBlip => "pause-primary-blip",
            Kind::AddRemoveNode => "add-remove-node",
            Kind::ReplaceNode => "replace-node",
            Kind::SwitchData => "switch-data",
            Kind::SwitchControl => "switch-control",
            Kind::FailFsyncPrimary => "fail-fsync-primary",
            Kind::FailFsyncBackup => "fail-fsync-backup",
            Kind::CrashBeforeFsync => "crash-before-fsync",
            Kind::CrashAfterFsync => "crash-after-fsync",
            Kind::StallBackupReply => "stall-backup-reply",
            Kind::StallIsrPropose => "stall-isr-propose",
            Kind::FailSnapshotInstall => "fail-snapshot-install",
            Kind::LateIsrCommit => "late-isr-commit",
            Kind::IsolateAlonePrimary => "isolate-alone-primary",
            Kind::KillPrimarySlowReroute => "kill-primary-slow-reroute",
            Kind::PowerCutNode => "power-cut-node",
            Kind::PowerCutPrimary => "power-cut-primary",
            Kind::PowerCutAll => "power-cut-all",
            Kind::PowerCutAllPrimaryLate => "power-cut-all-primary-late",
        }
    }

    pub fn about(self) -> &'static str {
        match self {
            Kind::PartitionNode => "one random node cut off from the others, both ways",
            Kind::PartitionLeader => "the Raft leader cut off from the others",
            Kind::PartitionPrimary => "the volume's primary cut off from the others",
            Kind::PartitionHalves => "a random majority and minority cut apart",
            Kind::PartitionBridge => "two halves that both still reach one bridge node",
            Kind::PartitionRing => "each node reaches only its two ring neighbours (5 nodes)",
            Kind::Blackhole => "one node's packets to the others dropped; the other way passes",
            Kind::PacketLoss => "20-40% of one node's packets to and from the others dropped at random",
            Kind::TcpReset => "every TCP connection between one node and the others reset",
            Kind::SlowLink => "one node's links delayed 10-30 ms each way, 0-20 ms jitter, 0-3% UDP loss (a proxy)",
            Kind::KillNode => "SIGKILL of one random node, restarted at the stop",
            Kind::KillLeader => "SIGKILL of the Raft leader, restarted at the stop",
            Kind::KillPrimary => "SIGKILL of the volume's primary, restarted at the stop",
            Kind::KillPrimaryLagging => {
                "SIGKILL of the primary while one backup lags behind the other, restarted at the stop"
            }
            Kind::KillPrimaryAlone => {
                "SIGKILL of the primary after its packets to every backup were dropped for a moment"
            }
            Kind::KillMinority => "SIGKILL of a minority of the nodes at once, restarted at the stop",
            Kind::KillAll => "SIGKILL of every node at once under load, all restarted",
            Kind::SnapshotCatchUp => {
                "a follower cut off until the leader purged the log it misses; it catches up by snapshot"
            }
            Kind::PausePrimary => "SIGSTOP of the primary for longer than its lease, then SIGCONT",
            Kind::PauseLeader => "SIGSTOP of the Raft leader for longer than its lease, then SIGCONT",
            Kind::PausePrimaryBlip => "SIGSTOP of the primary for 2-3 s: past its lease, short of a failover",
            Kind::AddRemoveNode => {
                "a new node joins under load (a Raft learner, a voter if the count allows), removed at the stop"
            }
            Kind::ReplaceNode => {
                "5 nodes, 3 replicas: a new node joins under load and one holding no replica (the Raft leader if it \
                 holds none) is removed; at the stop the removed one joins again, afresh, and the new one leaves"
            }
            Kind::SwitchData => "the data layer switched live to the other transport, and back",
            Kind::SwitchControl => "the control layer switched live to the other transport, and back",
            Kind::FailFsyncPrimary => {
                "the primary's journal fsync fails (failpoint): its store is poisoned; restarted at the stop"
            }
            Kind::FailFsyncBackup => {
                "a backup's journal fsync fails (failpoint): its store is poisoned; restarted at the stop"
            }
            Kind::CrashBeforeFsync => {
                "the primary or a backup crashes before its next journal fsync (failpoint); restarted"
            }
            Kind::CrashAfterFsync => {
                "the primary or a backup crashes after a journal fsync, before it is published (failpoint); restarted"
            }
            Kind::StallBackupReply => "a backup's acknowledgements held past the member timeout (failpoint)",
            Kind::StallIsrPropose => {
                "no ISR change or failover can be proposed by the primary or the leader while a backup's acks are lost"
            }
            Kind::FailSnapshotInstall => {
                "a cut-off follower's snapshot install fails (failpoint; its Raft stops); restarted, it catches up"
            }
            Kind::IsolateAlonePrimary => {
                "the primary alone in the ISR, a backup let back while ISR changes commit 50 s late, then the \
                 primary cut off past the hold time (no failover can happen; its core is rebuilt at the heal)"
            }
            Kind::KillPrimarySlowReroute => {
                "SIGKILL of the primary while the other nodes re-route the writes they proxied to it 2.5 s late \
                 (failpoint); restarted at the stop"
            }
            Kind::LateIsrCommit => {
                "the primary's ISR changes commit 2.5 s late (failpoint): a backup cut off and let back, then the \
                 primary stopped for a lease blip while the grow may still be on its way"
            }
            Kind::PowerCutNode => "power cut of a random node: SIGKILL, its unsynced writes lost; restarted",
            Kind::PowerCutPrimary => "power cut of the volume's primary: SIGKILL, its unsynced writes lost; restarted",
            Kind::PowerCutAll => "power cut of every node at once under load: unsynced writes lost; all restarted",
            Kind::PowerCutAllPrimaryLate => {
                "power cut of every node; the old primary restarts only after a backup took over"
            }
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the kind cuts power: a run with it mounts a lazyfs layer on every data dir.
    pub fn cuts_power(self) -> bool {
        matches!(self, Kind::PowerCutNode | Kind::PowerCutPrimary | Kind::PowerCutAll | Kind::PowerCutAllPrimaryLate)
    }

    /// Whether the kind needs at least 5 nodes.
    pub fn needs_five(self) -> bool {
        matches!(self, Kind::PartitionRing | Kind::ReplaceNode)
    }

    /// Whether a run with the kind prepares a spare node (namespace, certificate, config).
    pub fn needs_spare(self) -> bool {
        matches!(self, Kind::AddRemoveNode | Kind::ReplaceNode)
    }

    /// Whether the kind sets failpoints: the nodes must be a `failpoints` build (`--exe`).
    pub fn needs_failpoints(self) -> bool {
        matches!(
            self,
            Kind::FailFsyncPrimary
                | Kind::FailFsyncBackup
                | Kind::CrashBeforeFsync
                | Kind::CrashAfterFsync
                | Kind::StallBackupReply
                | Kind::StallIsrPropose
                | Kind::FailSnapshotInstall
                | Kind::LateIsrCommit
                | Kind::IsolateAlonePrimary
                | Kind::KillPrimarySlowReroute
        )
    }

    /// Whether the kind needs Raft to snapshot often ([`CHAOS_SNAPSHOT_AFTER`]), so that a
    /// follower cut off for seconds misses purged entries.
    pub fn needs_short_snapshots(self) -> bool {
        matches!(self, Kind::SnapshotCatchUp | Kind::FailSnapshotInstall)
    }

    /// How long the fault is held, at least and at most: long enough for a lease to run out
    /// and a failover to happen where the fault calls for one.
    pub fn hold(self) -> (Duration, Duration) {
        let s = Duration::from_secs;
        match self {
            Kind::PausePrimary | Kind::PauseLeader => (s(4), s(7)),
            // The lease is 1.5 s; the leader fails a primary over 2.5 s after its lease ran out.
            Kind::PausePrimaryBlip | Kind::LateIsrCommit => (Duration::from_millis(2000), Duration::from_millis(3000)),
            Kind::TcpReset => (s(1), s(3)),
            // Past the hold time (30 s), after which a node without a lease deposes its cores.
            Kind::IsolateAlonePrimary => (s(34), s(36)),
            Kind::SwitchData | Kind::SwitchControl => (s(3), s(6)),
            Kind::KillAll | Kind::PowerCutAll | Kind::PowerCutAllPrimaryLate => (s(1), s(3)),
            _ => (s(4), s(9)),
        }
    }
}

/// The failpoints the nemeses set (crates/node/src/failpoints.rs lists every one).
const JOURNAL_BEFORE_FSYNC: &str = "journal-before-fsync";
const JOURNAL_AFTER_FSYNC: &str = "journal-after-fsync";
const BACKUP_BEFORE_REPLY: &str = "backup-before-reply";
const ISR_BEFORE_PROPOSE: &str = "isr-before-propose";
const SNAPSHOT_BEFORE_INSTALL: &str = "snapshot-before-install";
const PROXY_BEFORE_REROUTE: &str = "proxy-before-reroute";
/// `kill-primary-slow-reroute`: how late the other nodes re-route the writes they proxied to
/// the killed primary: past the failover's reconciliation, so that the new primary serves
/// (reads and new writes of the blocks) before those writes come again.
const REROUTE_LATE_MS: u64 = 2500;
/// `late-isr-commit`: how late the primary's ISR changes are proposed (after the version they
/// were computed on was read), and how long the backup is cut off (past the member timeout of
/// 2 s and the late shrink).
const LATE_ISR_MS: u64 = 2500;
const LATE_ISR_CUT: (Duration, Duration) = (Duration::from_millis(5000), Duration::from_millis(6500));
/// ... and how long after the backup is let back the primary stops, at most (the grow comes
/// once the backup has caught up, then waits 2.5 s).
const LATE_ISR_BLIP_AFTER_MS: u64 = 2000;

/// `isolate-alone-primary`: the grow of the backup let back is proposed this long after it caught up: past the cut
/// (it is let back [`ALONE_ISOLATE_AFTER`] before the cut, which lasts 35 s) and the rebuild
/// at the heal, so that it commits late, under the rebuilt core.
const ALONE_LATE_MS: u64 = 50_000;
/// Long enough for the backup to catch up (the grow is then on its way).
const ALONE_ISOLATE_AFTER: Duration = Duration::from_secs(8);
/// How long the ISR may take to shrink to the primary alone.
const ALONE_SHRINK_WAIT: Duration = Duration::from_secs(20);
/// After a start that failed, how long the nodes stay touched (a lease coming back).
const ALONE_SETTLE: Duration = Duration::from_secs(5);
/// How long a primary cut off past the hold time may take to serve again after the heal (it
/// fails host I/O at once until its lease is back).
const ALONE_SERVE_WAIT: Duration = Duration::from_secs(30);
/// How long after it serves again the rebuilt primary is killed: past the late grow (50 s
/// after the backup caught up, 0 to 8 s before the cut of 35 s).
const ALONE_KILL_AFTER: Duration = Duration::from_secs(16);
/// How long the killed primary stays down for a failover (one takes 3 to 8 s): short enough
/// that, when none can happen, the hosts' I/O waits for it well inside the hold time.
const ALONE_FAILOVER_WAIT: Duration = Duration::from_secs(10);

/// `stall-backup-reply`'s stall of each batch of acknowledgements: past the primary's member
/// timeout (2 s), so the member is timed out, and far inside the hosts' hold time (30 s).
const BACKUP_REPLY_STALL_MS: u64 = 3000;

/// How long `kill-primary-lagging` holds one backup back before the kill: a moment, well
/// inside the time the primary waits before it drops a silent backup from the ISR.
const LAG_BEFORE_KILL: Duration = Duration::from_millis(400);

/// A fault in place; [`Active::stop`] takes it back.
pub struct Active {
    pub kind: Kind,
    /// What it hit, in words.
    pub target: String,
    undo: Undo,
}

enum Undo {
    Rules(Vec<u64>),
    Restart,
    /// Removes the rules, then restarts.
    RulesThenRestart(Vec<u64>),
    Resume(Vec<u64>),
    TcpReset(u64),
    Link(u64),
    Retire(u64),
    /// `old` joins again, afresh; then `new` leaves.
    Replace {
        new: u64,
        old: u64,
    },
    Switch(&'static str, String),
    /// Every node but the old primary, then (after a failover or [`FAILOVER_WAIT`]) it.
    RestartLast(u64),
    /// The cut-off follower, its rule, and how many snapshots it had installed before;
    /// `install_fails`: its first install fails (a failpoint), then it is restarted.
    CatchUp {
        node: u64,
        rule: u64,
        installed: f64,
        install_fails: bool,
    },
    /// `isolate-alone-primary`'s stop, see [`heal_alone`].
    HealAlone {
        rule: u64,
        set: Vec<(u64, &'static str)>,
        primary: u64,
        back: u64,
    },
    /// `node` resumed (SIGCONT), then the failpoints of `set` cleared.
    ResumeThenFailpoints {
        node: u64,
        set: Vec<(u64, &'static str)>,
    },
    /// Failpoints set, cleared (`off`) at the stop in this order. A node that crashed meanwhile
    /// is started again; the nodes of `restart` are killed and started again once cleared (a
    /// poisoned store is healed only by a restart).
    Failpoints {
        set: Vec<(u64, &'static str)>,
        restart: Vec<u64>,
    },
}

fn pick(rng: &mut Rng, from: &[u64]) -> u64 {
    from[rng.below(from.len() as u64) as usize]
}

fn shuffled(rng: &mut Rng, from: &[u64]) -> Vec<u64> {
    let mut v = from.to_vec();
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

fn others(w: &World, of: &[u64]) -> Vec<u64> {
    w.nodes.iter().copied().filter(|n| !of.contains(n)).collect()
}

fn set(ids: &[u64]) -> String {
    format!("{{{}}}", ids.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
}

impl Active {
    /// Starts a fault of `kind`; `fault` is its id in the run (for the touched-nodes record).
    pub fn start(kind: Kind, w: &World, rng: &mut Rng, fault: u64) -> anyhow::Result<Active> {
        // Drawn whatever the kind, so that one kind's choices do not shift the next ones.
        let roll = rng.next_u64();
        let mut r = Rng::new(roll);
        let leader_or_random = |r: &mut Rng| w.leader().unwrap_or_else(|| pick(r, &w.nodes));
        let primary_or_random = |r: &mut Rng| w.primary().unwrap_or_else(|| pick(r, &w.nodes));
        let isolate = |n: u64| -> anyhow::Result<Active> {
            let rest = others(w, &[n]);
            let rule = w.add_rule(NetRule::Cut(vec![n], rest.clone()))?;
            w.touch(fault, vec![n]);
            Ok(Active { kind, target: format!("{} | {}", set(&[n]), set(&rest)), undo: Undo::Rules(vec![rule]) })
        };
        let minority = w.nodes.len().saturating_sub(1) / 2;
        // A member of the ISR other than the primary (any other node if the record is unknown).
        let backup = |r: &mut Rng, p: u64| {
            let isr = w.volume_nodes("isr").unwrap_or_default();
            let backups: Vec<u64> = isr.into_iter().filter(|&n| n != p).collect();
            if backups.is_empty() {
                pick(r, &others(w, &[p]))
            } else {
                pick(r, &backups)
            }
        };
        // Sets each (node, failpoint, actions) in turn; on a refusal, clears those already set
        // and the fault's touch (a fault that did not start is never stopped).
        let set_all = |points: &[(u64, &'static str, String)]| -> anyhow::Result<Vec<(u64, &'static str)>> {
            let mut set: Vec<(u64, &'static str)> = Vec::new();
            for (n, name, actions) in points {
                if let Err(e) = w.set_failpoint(*n, name, actions) {
                    for (m, done) in &set {
                        let _ = w.set_failpoint(*m, done, "off");
                    }
                    w.untouch(fault);
                    return Err(e);
                }
                set.push((*n, *name));
            }
            Ok(set)
        };
        match kind {
            Kind::PartitionNode => isolate(pick(&mut r, &w.nodes)),
            Kind::PartitionLeader => isolate(leader_or_random(&mut r)),
            Kind::PartitionPrimary => isolate(primary_or_random(&mut r)),
            Kind::PartitionHalves => {
                let order = shuffled(&mut r, &w.nodes);
                let (small, big) = order.split_at(minority.max(1));
                let rule = w.add_rule(NetRule::Cut(small.to_vec(), big.to_vec()))?;
                w.touch(fault, small.to_vec());
                Ok(Active { kind, target: format!("{} | {}", set(small), set(big)), undo: Undo::Rules(vec![rule]) })
            }
            Kind::PartitionBridge => {
                let order = shuffled(&mut r, &w.nodes);
                let bridge = order[0];
                let rest = &order[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                let rule = w.add_rule(NetRule::Cut(a.to_vec(), b.to_vec()))?;
                // The side without a majority of its own may fail requests.
                let touched = if a.len() < b.len() { a.to_vec() } else { b.to_vec() };
                w.touch(fault, touched);
                Ok(Active {
                    kind,
                    target: format!("{} | {} (bridge {bridge})", set(a), set(b)),
                    undo: Undo::Rules(vec![rule]),
                })
            }
            Kind::PartitionRing => {
                if w.nodes.len() < 5 {
                    return Err(anyhow!("partition-ring needs 5 nodes"));
                }
                let ring = shuffled(&mut r, &w.nodes);
                let n = ring.len();
                let mut rules = Vec::new();
                for i in 0..n {
                    for j in i + 1..n {
                        let apart = (j - i) % n;
                        if apart != 1 && apart != n - 1 {
                            rules.push(w.add_rule(NetRule::Cut(vec![ring[i]], vec![ring[j]]))?);
                        }
                    }
                }
                w.touch(fault, w.nodes.clone());
                Ok(Active { kind, target: format!("ring {}", set(&ring)), undo: Undo::Rules(rules) })
            }
            Kind::Blackhole => {
                let n = pick(&mut r, &w.nodes);
                let rest = others(w, &[n]);
                let rule = w.add_rule(NetRule::OneWay(vec![n], rest.clone()))?;
                w.touch(fault, w.nodes.clone());
                Ok(Active { kind, target: format!("{n} -> {} dropped", set(&rest)), undo: Undo::Rules(vec![rule]) })
            }
            Kind::PacketLoss => {
                let n = pick(&mut r, &w.nodes);
                let pct = 20 + r.below(21) as u8;
                let rule = w.add_rule(NetRule::Loss(n, pct))?;
                w.touch(fault, vec![n]);
                Ok(Active { kind, target: format!("{pct}% of node {n}'s packets"), undo: Undo::Rules(vec![rule]) })
            }
            Kind::TcpReset => {
                let n = pick(&mut r, &w.nodes);
                w.tcp_reset(n, true)?;
                w.touch(fault, vec![n]);
                Ok(Active { kind, target: format!("node {n}'s TCP links"), undo: Undo::TcpReset(n) })
            }
            Kind::SlowLink => {
                let n = pick(&mut r, &w.nodes);
                let link = Link {
                    delay: Duration::from_millis(10 + r.below(21)),
                    jitter: Duration::from_millis(r.below(21)),
                    udp_loss_percent: r.below(4) as u8,
                };
                w.set_link(n, link)?;
                // A slow link is no excuse for a host error: nothing is marked touched.
                Ok(Active {
                    kind,
                    target: format!(
                        "node {n}: +{} ms, jitter {} ms, {}% UDP loss",
                        link.delay.as_millis(),
                        link.jitter.as_millis(),
                        link.udp_loss_percent
                    ),
                    undo: Undo::Link(n),
                })
            }
            Kind::KillNode | Kind::KillLeader | Kind::KillPrimary => {
                let n = match kind {
                    Kind::KillLeader => leader_or_random(&mut r),
                    Kind::KillPrimary => primary_or_random(&mut r),
                    _ => pick(&mut r, &w.nodes),
                };
                w.kill(n)?;
                Ok(Active { kind, target: format!("node {n}"), undo: Undo::Restart })
            }
            Kind::KillPrimaryLagging | Kind::KillPrimaryAlone => {
                let p = primary_or_random(&mut r);
                let backups = others(w, &[p]);
                let lagging = if kind == Kind::KillPrimaryAlone { backups } else { vec![pick(&mut r, &backups)] };
                // Writes pile up in flight to the lagging backup while the other has them.
                let rule = w.add_rule(NetRule::OneWay(vec![p], lagging.clone()))?;
                std::thread::sleep(LAG_BEFORE_KILL);
                if let Err(e) = w.kill(p) {
                    w.remove_rule(rule)?;
                    return Err(e);
                }
                // The rule stays until the restart: the dead process's kernel still
                // retransmits what its TCP sockets held, and would deliver the held-back
                // writes to the lagging backups after all.
                Ok(Active {
                    kind,
                    target: format!("node {p} ({} lagging)", set(&lagging)),
                    undo: Undo::RulesThenRestart(vec![rule]),
                })
            }
            Kind::KillMinority => {
                let order = shuffled(&mut r, &w.nodes);
                let victims = &order[..minority.max(1)];
                for &n in victims {
                    w.kill(n)?;
                }
                Ok(Active { kind, target: format!("nodes {}", set(victims)), undo: Undo::Restart })
            }
            Kind::KillAll => {
                for &n in &w.nodes {
                    w.kill(n)?;
                }
                Ok(Active { kind, target: "every node".into(), undo: Undo::Restart })
            }
            Kind::SnapshotCatchUp | Kind::FailSnapshotInstall => {
                let leader = w.leader();
                let followers: Vec<u64> = w.running().into_iter().filter(|n| Some(*n) != leader).collect();
                anyhow::ensure!(!followers.is_empty(), "no follower to cut off");
                let n = pick(&mut r, &followers);
                let installed = w.cluster.metric(n, SNAPSHOTS_INSTALLED).unwrap_or(0.0);
                let install_fails = kind == Kind::FailSnapshotInstall;
                w.touch(fault, vec![n]);
                if install_fails {
                    set_all(&[(n, SNAPSHOT_BEFORE_INSTALL, "1*return".into())])?;
                }
                let rest = others(w, &[n]);
                let rule = w.add_rule(NetRule::Cut(vec![n], rest.clone()))?;
                Ok(Active {
                    kind,
                    target: format!(
                        "node {n} until the log is purged{}",
                        if install_fails { "; its first install fails" } else { "" }
                    ),
                    undo: Undo::CatchUp { node: n, rule, installed, install_fails },
                })
            }
            Kind::PausePrimary | Kind::PauseLeader | Kind::PausePrimaryBlip => {
                let n = if kind == Kind::PauseLeader { leader_or_random(&mut r) } else { primary_or_random(&mut r) };
                w.pause(n)?;
                Ok(Active { kind, target: format!("node {n}"), undo: Undo::Resume(vec![n]) })
            }
            Kind::AddRemoveNode => {
                let spare = join_spare(w)?;
                Ok(Active { kind, target: format!("node {spare} joins"), undo: Undo::Retire(spare) })
            }
            Kind::ReplaceNode => {
                let holders =
                    w.volume_nodes("replicas").ok_or_else(|| anyhow!("the volume's replicas are not known"))?;
                let free: Vec<u64> = w.running().into_iter().filter(|n| !holders.contains(n)).collect();
                anyhow::ensure!(
                    !free.is_empty(),
                    "no running node without a replica to replace (replicas {holders:?})"
                );
                // The Raft leader when it holds no replica (its removal hands leadership on).
                let old = match w.leader() {
                    Some(l) if free.contains(&l) => l,
                    _ => pick(&mut r, &free),
                };
                let new = join_spare(w)?;
                // Down from here on: the clients leave it, and an error from it is expected.
                w.touch(fault, vec![old]);
                w.retired(old);
                w.cluster
                    .try_retire(old)
                    .map_err(|e| anyhow!("remove node {old}: {e}"))
                    .and_then(|_| wait_for_member(w, old, false))?;
                Ok(Active { kind, target: format!("node {new} replaces node {old}"), undo: Undo::Replace { new, old } })
            }
            Kind::PowerCutNode | Kind::PowerCutPrimary => {
                let n = if kind == Kind::PowerCutPrimary { primary_or_random(&mut r) } else { pick(&mut r, &w.nodes) };
                // Half the draws tear the cut: a seeded half of the unsynced pages reached the disk.
                let torn = (r.below(2) == 0).then(|| r.next_u64());
                let cut = w.power_cut(&[n], torn)?;
                let how = if torn.is_some() { "torn power cut" } else { "power cut" };
                Ok(Active { kind, target: format!("node {n}, {how}: {cut}"), undo: Undo::Restart })
            }
            Kind::PowerCutAll => {
                let torn = (r.below(2) == 0).then(|| r.next_u64());
                let cut = w.power_cut(&w.nodes, torn)?;
                let how = if torn.is_some() { "torn power cut" } else { "power cut" };
                Ok(Active { kind, target: format!("every node, {how}: {cut}"), undo: Undo::Restart })
            }
            Kind::PowerCutAllPrimaryLate => {
                // Never torn: what the backups had not synced is all gone, the case this is for.
                let p = primary_or_random(&mut r);
                let cut = w.power_cut(&w.nodes, None)?;
                Ok(Active {
                    kind,
                    target: format!("every node (primary {p} back last): {cut}"),
                    undo: Undo::RestartLast(p),
                })
            }
            Kind::SwitchData | Kind::SwitchControl => {
                let layer = if kind == Kind::SwitchData { "data" } else { "control" };
                let now = current_transport(w, layer).unwrap_or_else(|| "tcp".into());
                let to = if now == "quic" { "tcp" } else { "quic" };
                w.set_transport(layer, to)?;
                Ok(Active { kind, target: format!("{layer}: {now} -> {to}"), undo: Undo::Switch(layer, now) })
            }
            Kind::FailFsyncPrimary | Kind::FailFsyncBackup => {
                let p = primary_or_random(&mut r);
                let (n, role) =
                    if kind == Kind::FailFsyncPrimary { (p, "primary") } else { (backup(&mut r, p), "backup") };
                w.touch(fault, vec![n]);
                let set = set_all(&[(n, JOURNAL_BEFORE_FSYNC, "return".into())])?;
                Ok(Active {
                    kind,
                    target: format!("node {n} ({role}): {JOURNAL_BEFORE_FSYNC}=return"),
                    undo: Undo::Failpoints { set, restart: vec![n] },
                })
            }
            Kind::CrashBeforeFsync | Kind::CrashAfterFsync => {
                let p = primary_or_random(&mut r);
                let (n, role) = if r.below(2) == 0 { (p, "primary") } else { (backup(&mut r, p), "backup") };
                let point = if kind == Kind::CrashBeforeFsync { JOURNAL_BEFORE_FSYNC } else { JOURNAL_AFTER_FSYNC };
                w.touch(fault, vec![n]);
                let set = set_all(&[(n, point, "1*panic".into())])?;
                Ok(Active {
                    kind,
                    target: format!("node {n} ({role}): {point}=1*panic"),
                    undo: Undo::Failpoints { set, restart: vec![] },
                })
            }
            Kind::StallBackupReply => {
                let p = primary_or_random(&mut r);
                let b = backup(&mut r, p);
                w.touch(fault, vec![b]);
                let actions = format!("sleep({BACKUP_REPLY_STALL_MS})");
                let set = set_all(&[(b, BACKUP_BEFORE_REPLY, actions.clone())])?;
                Ok(Active {
                    kind,
                    target: format!("node {b} (backup): {BACKUP_BEFORE_REPLY}={actions}"),
                    undo: Undo::Failpoints { set, restart: vec![] },
                })
            }
            Kind::IsolateAlonePrimary => {
                let p = primary_or_random(&mut r);
                let isr = |w: &World| w.volume_nodes("isr").unwrap_or_default();
                let backups: Vec<u64> = isr(w).into_iter().filter(|&n| n != p).collect();
                anyhow::ensure!(!backups.is_empty(), "the primary {p} is alone in the ISR already");
                // Not the Raft leader: cut off from it, the primary would lose its lease and fail over.
                let leader = w.leader();
                let candidates: Vec<u64> = backups.iter().copied().filter(|&b| Some(b) != leader).collect();
                let back = pick(&mut r, if candidates.is_empty() { &backups } else { &candidates });
                // Every host path goes through the primary: past the hold time, all see errors.
                w.touch(fault, w.nodes.clone());
                // The backup let back later is cut off from the primary; the others' acks are lost.
                let lost: Vec<(u64, &'static str, String)> = backups
                    .iter()
                    .filter(|&&b| b != back)
                    .map(|&b| (b, BACKUP_BEFORE_REPLY, "return".to_string()))
                    .collect();
                let mut set = set_all(&lost)?;
                let started = (|| -> anyhow::Result<u64> {
                    // From every node if it leads Raft (cut off from it, the primary would lose
                    // its lease and be failed over to it).
                    let from = if w.leader() == Some(back) { others(w, &[back]) } else { vec![p] };
                    let away = w.add_rule(NetRule::Cut(vec![back], from))?;
                    let deadline = Instant::now() + ALONE_SHRINK_WAIT;
                    while isr(w) != vec![p] {
                        if Instant::now() >= deadline {
                            let _ = w.remove_rule(away);
                            anyhow::bail!("the ISR did not shrink to {{{p}}} within {ALONE_SHRINK_WAIT:?}");
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    let late = w.set_failpoint(p, ISR_BEFORE_PROPOSE, &format!("sleep({ALONE_LATE_MS})"));
                    w.remove_rule(away)?;
                    late?;
                    set.insert(0, (p, ISR_BEFORE_PROPOSE));
                    std::thread::sleep(ALONE_ISOLATE_AFTER);
                    w.add_rule(NetRule::Cut(vec![p], others(w, &[p])))
                })();
                match started {
                    Ok(rule) => Ok(Active {
                        kind,
                        target: format!(
                            "primary {p} alone in the ISR; backup {back} let back, {ISR_BEFORE_PROPOSE}=sleep({ALONE_LATE_MS}); \
                             primary cut off"
                        ),
                        undo: Undo::HealAlone { rule, set, primary: p, back },
                    }),
                    Err(e) => {
                        let _ = clear_failpoints(w, &set, &[]);
                        // A node cut off from the leader for long fails host I/O at once until
                        // its lease is back.
                        std::thread::sleep(ALONE_SETTLE);
                        w.untouch(fault);
                        Err(e)
                    }
                }
            }
            Kind::LateIsrCommit => {
                let p = primary_or_random(&mut r);
                let b = backup(&mut r, p);
                w.touch(fault, vec![p, b]);
                let set = set_all(&[(p, ISR_BEFORE_PROPOSE, format!("sleep({LATE_ISR_MS})"))])?;
                let cut = LATE_ISR_CUT.0
                    + Duration::from_millis(r.below((LATE_ISR_CUT.1 - LATE_ISR_CUT.0).as_millis() as u64));
                let blip_after = Duration::from_millis(r.below(LATE_ISR_BLIP_AFTER_MS));
                let paused = w.add_rule(NetRule::Cut(vec![b], vec![p])).and_then(|rule| {
                    std::thread::sleep(cut);
                    w.remove_rule(rule)?;
                    std::thread::sleep(blip_after);
                    w.pause(p)
                });
                if let Err(e) = paused {
                    let _ = clear_failpoints(w, &set, &[]);
                    w.untouch(fault);
                    return Err(e);
                }
                Ok(Active {
                    kind,
                    target: format!(
                        "primary {p}: {ISR_BEFORE_PROPOSE}=sleep({LATE_ISR_MS}); backup {b} cut off {} ms, \
                         primary stopped {} ms after",
                        cut.as_millis(),
                        blip_after.as_millis()
                    ),
                    undo: Undo::ResumeThenFailpoints { node: p, set },
                })
            }
            Kind::KillPrimarySlowReroute => {
                let p = primary_or_random(&mut r);
                let late: Vec<_> = others(w, &[p])
                    .into_iter()
                    .map(|n| (n, PROXY_BEFORE_REROUTE, format!("sleep({REROUTE_LATE_MS})")))
                    .collect();
                let set = set_all(&late)?;
                if let Err(e) = w.kill(p) {
                    let _ = clear_failpoints(w, &set, &[]);
                    return Err(e);
                }
                Ok(Active {
                    kind,
                    target: format!("node {p}; the others: {PROXY_BEFORE_REROUTE}=sleep({REROUTE_LATE_MS})"),
                    undo: Undo::Failpoints { set, restart: vec![] },
                })
            }
            Kind::StallIsrPropose => {
                let p = primary_or_random(&mut r);
                let leader = leader_or_random(&mut r);
                let b = backup(&mut r, p);
                let mut touched = vec![p, leader, b];
                touched.sort_unstable();
                touched.dedup();
                w.touch(fault, touched);
                let mut points = vec![(p, ISR_BEFORE_PROPOSE, "return".to_string())];
                if leader != p {
                    points.push((leader, ISR_BEFORE_PROPOSE, "return".to_string()));
                }
                // Cleared after the proposals may go again (the stop clears in this order).
                points.push((b, BACKUP_BEFORE_REPLY, "return".to_string()));
                let set = set_all(&points)?;
                Ok(Active {
                    kind,
                    target: format!(
                        "primary {p} and leader {leader}: {ISR_BEFORE_PROPOSE}=return; backup {b}: acks lost"
                    ),
                    undo: Undo::Failpoints { set, restart: vec![] },
                })
            }
        }
    }

    /// Takes the fault back (the nodes it stopped or killed run again).
    pub fn stop(self, w: &World, fault: u64) -> anyhow::Result<()> {
        let r = match &self.undo {
            Undo::Rules(ids) => ids.iter().try_for_each(|&id| w.remove_rule(id)),
            Undo::Restart => w.restart_killed(),
            Undo::RulesThenRestart(ids) => {
                ids.iter().try_for_each(|&id| w.remove_rule(id)).and_then(|_| w.restart_killed())
            }
            Undo::Resume(ids) => ids.iter().try_for_each(|&n| w.resume(n)),
            Undo::TcpReset(n) => w.tcp_reset(*n, false),
            Undo::Link(n) => w.set_link(*n, Link::default()),
            Undo::Retire(n) => w
                .cluster
                .try_retire(*n)
                .map_err(|e| anyhow!("remove node {n}: {e}"))
                .and_then(|_| wait_for_member(w, *n, false)),
            Undo::Replace { new, old } => w
                .cluster
                .try_add_spare(*old)
                .map_err(|e| anyhow!("add node {old} again: {e}"))
                .and_then(|_| wait_for_member(w, *old, true))
                .map(|_| w.rejoined(*old))
                .and_then(|_| w.cluster.try_retire(*new).map_err(|e| anyhow!("remove node {new}: {e}")))
                .and_then(|_| wait_for_member(w, *new, false)),
            Undo::Switch(layer, back) => w.set_transport(layer, back),
            Undo::CatchUp { node, rule, installed, install_fails } => {
                catch_up(w, *node, *rule, *installed, *install_fails)
            }
            Undo::Failpoints { set, restart } => clear_failpoints(w, set, restart),
            Undo::HealAlone { rule, set, primary, back } => heal_alone(w, *rule, set, *primary, *back),
            Undo::ResumeThenFailpoints { node, set } => w.resume(*node).and_then(|_| clear_failpoints(w, set, &[])),
            Undo::RestartLast(p) => restart_last(w, *p),
        };
        w.untouch(fault);
        r
    }
}

/// `isolate-alone-primary`'s stop: the primary's cut is healed and its failpoint cleared, but
/// the backup let back is cut off from every node (it misses what the rebuilt primary
/// acknowledges), and the other backups' acks stay lost. Once the primary serves again, and
/// the grow of its predecessor had the time to commit, the primary is killed and the backup
/// let back. A correct cluster cannot fail over (the primary is alone in the ISR: the late
/// grow was refused, the rebuilt primary having claimed a new epoch) and the primary comes
/// back; with the planted `late-isr-change` the late grow put the backup in the ISR, the
/// volume fails over to it, and what the rebuilt primary acknowledged is lost. Then every
/// failpoint is cleared.
fn heal_alone(w: &World, rule: u64, set: &[(u64, &'static str)], primary: u64, back: u64) -> anyhow::Result<()> {
    // Cut off from every node (cut off from the primary alone, it might lead Raft, or win an
    // election, and keep the primary from its lease).
    let away = w.add_rule(NetRule::Cut(vec![back], others(w, &[back])))?;
    // The primary's next ISR changes are not late (the one on its way still is): should the
    // grow have committed before the rebuild, the primary drops the backup it cannot reach.
    let (late, acks): (Vec<_>, Vec<_>) = set.iter().copied().partition(|&(n, _)| n == primary);
    let killed = w
        .remove_rule(rule)
        .and_then(|_| clear_failpoints(w, &late, &[]))
        .and_then(|_| wait_serving(w, primary))
        .map(|_| std::thread::sleep(ALONE_KILL_AFTER))
        .and_then(|_| w.kill(primary));
    // Back with the primary dead: the backup is alive for the leader to fail over to, if the
    // map says it is in sync.
    let healed = w.remove_rule(away);
    if killed.is_ok() {
        let deadline = Instant::now() + ALONE_FAILOVER_WAIT;
        while Instant::now() < deadline && w.primary().is_none_or(|p| p == primary) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let restarted = w.restart_killed();
    let cleared = clear_failpoints(w, &acks, &[]);
    killed.and(healed).and(restarted).and(cleared)
}

/// Waits until node `n` serves the volume again (its own view), or another node is its
/// primary.
fn wait_serving(w: &World, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + ALONE_SERVE_WAIT;
    while Instant::now() < deadline {
        let serving = local_copy(&w.cluster, n, &w.volume).is_some_and(|l| l["serving"] == true);
        if serving || w.primary().is_some_and(|p| p != n) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(anyhow!("node {n} did not serve the volume within {ALONE_SERVE_WAIT:?} after the heal"))
}

/// Brings the first spare node in and waits until it is a member; its id.
fn join_spare(w: &World) -> anyhow::Result<u64> {
    let spare = w.cluster.spare_ids().first().copied().ok_or_else(|| anyhow!("no spare node to add"))?;
    let joined = w
        .cluster
        .try_add_spare(spare)
        .map_err(|e| anyhow!("add node {spare}: {e}"))
        .and_then(|_| wait_for_member(w, spare, true));
    if let Err(e) = joined {
        // Back to where it was, as far as it goes: the next step may try again.
        let _ = w.cluster.try_retire(spare);
        return Err(e);
    }
    Ok(spare)
}

/// How long a joining node may take to become a member (it catches up first), and a leaving
/// one to be gone.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(30);

/// Waits until the Raft membership (voters and learners), as a running member sees it,
/// includes node `id` (`member`) or does not. (A fourth node stays a learner: the cluster
/// keeps an odd number of voters.)
fn wait_for_member(w: &World, id: u64, member: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + MEMBERSHIP_WAIT;
    let mut seen = Value::Null;
    while Instant::now() < deadline {
        if let Some(v) = w.running().into_iter().find_map(|n| w.get(n, "/v1/cluster")) {
            let raft = &v["raft"];
            let all = [&raft["voters"], &raft["learners"]];
            let found = all.iter().filter_map(|l| l.as_array()).flatten().any(|x| x.as_u64() == Some(id));
            if found == member {
                return Ok(());
            }
            seen = serde_json::json!({ "voters": raft["voters"], "learners": raft["learners"] });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let what = if member { "a member" } else { "gone" };
    Err(anyhow!("node {id} was not {what} within {MEMBERSHIP_WAIT:?} ({seen})"))
}

/// Clears the failpoints of `set` on the nodes still running (a node that crashed on one is
/// marked down), kills and restarts the nodes of `restart`, and starts every node that is down.
fn clear_failpoints(w: &World, set: &[(u64, &'static str)], restart: &[u64]) -> anyhow::Result<()> {
    let mut first_error = None;
    for &(n, name) in set {
        if !w.alive(n) {
            w.crashed(n);
            continue;
        }
        if let Err(e) = w.set_failpoint(n, name, "off") {
            // It may have crashed just now; a live node that refuses is an error.
            if w.alive(n) {
                first_error.get_or_insert(e);
            } else {
                w.crashed(n);
            }
        }
    }
    for &n in restart {
        if w.alive(n) {
            w.kill(n)?;
        } else {
            w.crashed(n);
        }
    }
    w.restart_killed()?;
    first_error.map_or(Ok(()), Err)
}

/// What a node's log says when `snapshot-before-install` fails an install.
const INSTALL_FAILED: &str = "failpoint snapshot-before-install";

/// How long `power-cut-all-primary-late` waits for a backup to take over before the old
/// primary comes back anyway: the leader's election plus its failure timeout (2.5 s), with room.
const FAILOVER_WAIT: Duration = Duration::from_secs(30);

/// Restarts every down node but `primary`, waits until the volume has another primary, then
/// restarts `primary`.
fn restart_last(w: &World, primary: u64) -> anyhow::Result<()> {
    for n in others(w, &[primary]) {
        w.restart_node(n)?;
    }
    let deadline = Instant::now() + FAILOVER_WAIT;
    while Instant::now() < deadline && w.primary().is_none_or(|p| p == primary) {
        std::thread::sleep(Duration::from_millis(200));
    }
    w.restart_node(primary)
}

/// The snapshot counter of a node's `/metrics`.
const SNAPSHOTS_INSTALLED: &str = "tandem_raft_snapshots_installed_total";
/// How long `snapshot-catch-up` waits for the purge, and then for the install.
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

/// Holds the follower off until the leader's snapshot is past its log by more than the log the
/// leader keeps (so the entries it misses are purged), heals it, and waits for it to install
/// a snapshot: the nemesis failed if it caught up some other way. With `install_fails`, the
/// first install fails first (its failpoint; the node's Raft stops): the node is restarted
/// and must then install one.
fn catch_up(w: &World, node: u64, rule: u64, installed: f64, install_fails: bool) -> anyhow::Result<()> {
    let metric = |n: u64, name: &str| w.cluster.metric(n, name);
    let deadline = Instant::now() + CATCH_UP_WAIT;
    let behind = metric(node, "tandem_raft_last_log_index").unwrap_or(0.0);
    while Instant::now() < deadline {
        let snap = w.leader().and_then(|l| metric(l, "tandem_raft_snapshot_index")).unwrap_or(0.0);
        if snap > behind + CHAOS_LOGS_TO_KEEP as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    w.remove_rule(rule)?;
    let mut installed = installed;
    if install_fails {
        // The failed install: the node logs its error, and its Raft stops.
        let deadline = Instant::now() + CATCH_UP_WAIT;
        let failed = loop {
            if !w.cluster.log_lines(node, INSTALL_FAILED).is_empty() {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if w.alive(node) {
            w.kill(node)?;
        } else {
            w.crashed(node);
        }
        w.restart_killed()?;
        anyhow::ensure!(failed, "node {node} attempted no snapshot install within {CATCH_UP_WAIT:?} of its heal");
        // The restarted process counts from zero.
        installed = 0.0;
    }
    let deadline = Instant::now() + CATCH_UP_WAIT;
    while Instant::now() < deadline {
        if metric(node, SNAPSHOTS_INSTALLED).is_some_and(|v| v > installed) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(anyhow!(
        "node {node} did not install a snapshot within {CATCH_UP_WAIT:?} of its heal (its log ended at {behind})"
    ))
}

/// A scenario with `snapshot-catch-up` runs with Raft snapshots this often, keeping this much
/// log behind each, so that a follower cut off for seconds misses purged entries.
pub const CHAOS_SNAPSHOT_AFTER: u64 = 100;
pub const CHAOS_LOGS_TO_KEEP: u64 = 20;

/// The transport a layer runs on, from `GET /v1/transport`.
fn current_transport(w: &World, layer: &str) -> Option<String> {
    let v = w.running().into_iter().find_map(|n| w.get(n, "/v1/transport"))?;
    v["policy"][layer].as_str().or_else(|| v[layer].as_str()).map(str::to_string)
}
