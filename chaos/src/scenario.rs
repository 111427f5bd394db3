//! The named scenarios `tandem chaos list` shows: which nemeses a run draws its faults from,
//! how many at once, and on how many nodes at least. Every nemesis kind is a scenario of its
//! own; the mixes combine them; regression scenarios (`regress-*`) replay the schedules that
//! found bugs.

use std::time::Duration;

use crate::nemesis::Kind;

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
    /// How long every fault is held, if not drawn from the kind's range (a regression
    /// scenario's fixed schedule).
    pub hold: Option<Duration>,
}

impl Scenario {
    fn single(kind: Kind) -> Scenario {
        Scenario {
            name: kind.name().into(),
            about: kind.about().into(),
            kinds: vec![kind],
            with: vec![],
            nodes_min: if kind.needs_five() { 5 } else { 3 },
            hold: None,
        }
    }

    fn mix(name: &str, about: &str, kinds: &[Kind], with: &[Kind]) -> Scenario {
        Scenario {
            name: name.into(),
            about: about.into(),
            kinds: kinds.to_vec(),
            with: with.to_vec(),
            nodes_min: 3,
            hold: None,
        }
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
    s.push(Scenario::mix("mix", "every 3-node nemesis, drawn at random", &Kind::ALL[..5], &[]));
    let last = s.len() - 1;
    s[last].kinds = Kind::ALL.into_iter().filter(|k| !k.needs_five()).collect();
    // pause-primary-blip seed 1 (docs/PROTOCOL.md, "Retries of a write that may have taken
    // effect"): the primary stops with host writes sequenced and sent, just long enough that
    // the leader fails it over as it wakes; its node then re-routed those writes to the new
    // primary, which executed them a second time after newer acknowledged writes.
    s.push(Scenario {
        hold: Some(REGRESS_LEASE_BLIP_HOLD),
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
        assert!(find("mix").is_some_and(|s| s.kinds.len() == Kind::ALL.len() - 1));
        assert!(find("regress-lease-blip").is_some_and(|s| s.kinds == vec![Kind::PausePrimaryBlip] && s.hold.is_some()));
    }
}
