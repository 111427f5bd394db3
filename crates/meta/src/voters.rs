//! Which members vote: the rule, pure (no I/O, no clock, no openraft types).
//!
//! A cluster keeps a small odd number of Raft voters (`cluster.voters`: 1, 3 or 5) whatever its
//! size, so a commit waits on a majority of a few nodes rather than of all of them; every other
//! member is a learner that replicates the log, serves linearizable reads and forwards writes.
//! Voters are spread over sites: the next voter is the candidate whose site holds the fewest
//! voters so far (ties: the lowest id), so losing one site costs as few voters as possible.
//!
//! [`settle`] is the one rule every membership change applies (forming a cluster, adding,
//! removing or replacing a node, the leader's periodic check): grow the voters from eligible
//! learners (live and caught up) towards the target, or shrink an even count of four or more to
//! the odd count below it. Two voters stay two: dropping to one would make a single node the
//! whole quorum and leave every commit on one disk, while two keep every commit on two disks
//! for the same tolerance (none).

use std::collections::{BTreeMap, BTreeSet};

use tandem_types::NodeId;

/// The voter counts `cluster.voters` may be set to: odd, so a majority never needs half.
pub const VOTER_COUNTS: [usize; 3] = [1, 3, 5];
/// The default `cluster.voters`.
pub const VOTERS_DEFAULT: usize = 3;

/// How many voters a cluster of `members` nodes keeps when configured with `cap`: the largest odd
/// number at most `min(cap, members)` (0 only for no members).
pub fn voter_target(cap: usize, members: usize) -> usize {
    largest_odd(cap.min(members))
}

fn largest_odd(n: usize) -> usize {
    if n == 0 {
        0
    } else if n % 2 == 1 {
        n
    } else {
        n - 1
    }
}

fn site_of(sites: &BTreeMap<NodeId, String>, id: NodeId) -> &str {
    sites.get(&id).map_or("", String::as_str)
}

fn voters_per_site<'a>(voters: &BTreeSet<NodeId>, sites: &'a BTreeMap<NodeId, String>) -> BTreeMap<&'a str, usize> {
    let mut per_site = BTreeMap::new();
    for v in voters {
        *per_site.entry(site_of(sites, *v)).or_insert(0) += 1;
    }
    per_site
}

/// The next voter among `candidates` (members of `voters` are skipped): the one whose site holds
/// the fewest voters, ties broken by the lowest id. A node missing from `sites` counts as being in
/// a site of its own name `""`.
pub fn pick_voter(
    voters: &BTreeSet<NodeId>,
    candidates: &BTreeSet<NodeId>,
    sites: &BTreeMap<NodeId, String>,
) -> Option<NodeId> {
    let per_site = voters_per_site(voters, sites);
    candidates
        .iter()
        .filter(|c| !voters.contains(c))
        .min_by_key(|c| (per_site.get(site_of(sites, **c)).copied().unwrap_or(0), **c))
        .copied()
}

/// The voter to demote when there are too many: one that is not `eligible` (not live or behind)
/// first, then one from the site with the most voters, ties broken by the highest id; never
/// `keep` (the leader, whose demotion would cost an election).
fn pick_demotion(
    voters: &BTreeSet<NodeId>,
    eligible: &BTreeSet<NodeId>,
    sites: &BTreeMap<NodeId, String>,
    keep: Option<NodeId>,
) -> Option<NodeId> {
    let per_site = voters_per_site(voters, sites);
    voters
        .iter()
        .filter(|v| Some(**v) != keep)
        .max_by_key(|v| (!eligible.contains(v), per_site.get(site_of(sites, **v)).copied().unwrap_or(0), **v))
        .copied()
}

/// Chooses the voters of a new cluster formed by `me` from `members`: `me` first (the node that
/// forms a cluster must vote in it), then by [`pick_voter`] up to [`voter_target`].
pub fn initial_voters(
    me: NodeId,
    members: &BTreeSet<NodeId>,
    sites: &BTreeMap<NodeId, String>,
    cap: usize,
) -> BTreeSet<NodeId> {
    let mut voters = BTreeSet::from([me]);
    let target = voter_target(cap, members.len());
    while voters.len() < target {
        match pick_voter(&voters, members, sites) {
            Some(v) => voters.insert(v),
            None => break,
        };
    }
    voters
}

/// The voters the cluster should have, from the current `voters`, the learners that may be
/// promoted now (`eligible`: live and caught up), the sites and the `target`
/// ([`voter_target`] of the cap and the member count). Grows by [`pick_voter`] to the largest
/// odd count the eligible learners allow (at most the target); shrinks an even count of four or
/// more, or a count above the target, by demoting (never `keep`); otherwise leaves them as they
/// are. Applying it again to its own result (with the demoted voters now eligible learners)
/// changes nothing, so a periodic check cannot flap.
pub fn settle(
    voters: &BTreeSet<NodeId>,
    eligible: &BTreeSet<NodeId>,
    sites: &BTreeMap<NodeId, String>,
    target: usize,
    keep: Option<NodeId>,
) -> BTreeSet<NodeId> {
    let candidates: BTreeSet<NodeId> = eligible.difference(voters).copied().collect();
    let goal = largest_odd(target.min(voters.len() + candidates.len())).max(1);
    let mut next = voters.clone();
    while next.len() < goal {
        match pick_voter(&next, &candidates, sites) {
            Some(v) => next.insert(v),
            None => break,
        };
    }
    // Two voters stay two (see the module's header); more than the goal shrink to it.
    while next.len() > goal && next.len() > 2 {
        match pick_demotion(&next, eligible, sites, keep) {
            Some(v) => next.remove(&v),
            None => break,
        };
    }
    next
}

/// Whether `voters` can still commit with only `live` of them answering: a majority of them is
/// live.
pub fn has_live_majority(voters: &BTreeSet<NodeId>, live: impl Fn(NodeId) -> bool) -> bool {
    voters.iter().filter(|v| live(**v)).count() * 2 > voters.len()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().map(|i| NodeId(*i)).collect()
    }

    fn sites(list: &[(u64, &str)]) -> BTreeMap<NodeId, String> {
        list.iter().map(|(i, s)| (NodeId(*i), s.to_string())).collect()
    }

    #[test]
    fn the_target_is_the_largest_odd_count_within_the_cap_and_the_members() {
        let cases =
            [(3, 0, 0), (3, 1, 1), (3, 2, 1), (3, 3, 3), (3, 7, 3), (5, 4, 3), (5, 5, 5), (5, 20, 5), (1, 9, 1)];
        for (cap, members, want) in cases {
            assert_eq!(voter_target(cap, members), want, "cap {cap}, {members} members");
        }
    }

    #[test]
    fn voters_spread_over_sites_before_doubling_up() {
        let s = sites(&[(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "b"), (6, "c"), (7, "c")]);
        let all = ids(&[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(initial_voters(NodeId(1), &all, &s, 3), ids(&[1, 4, 6]));
        assert_eq!(initial_voters(NodeId(2), &all, &s, 3), ids(&[2, 4, 6]));
        // Five voters over three sites: two, two and one, lowest ids first.
        assert_eq!(initial_voters(NodeId(1), &all, &s, 5), ids(&[1, 2, 4, 5, 6]));
        // One site: the lowest ids.
        let one = sites(&[(1, "x"), (2, "x"), (3, "x"), (4, "x")]);
        assert_eq!(initial_voters(NodeId(1), &ids(&[1, 2, 3, 4]), &one, 3), ids(&[1, 2, 3]));
        assert_eq!(initial_voters(NodeId(3), &ids(&[1, 2, 3, 4]), &one, 1), ids(&[3]));
        // Two members: one voter.
        assert_eq!(initial_voters(NodeId(1), &ids(&[1, 2]), &one, 3), ids(&[1]));
    }

    #[test]
    fn a_removed_voter_is_replaced_from_the_site_with_the_fewest_voters() {
        let s = sites(&[(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "c"), (6, "b")]);
        // Voter 2 (site b) goes: of the learners, 6 is in site b, which now has no voter.
        let after = settle(&ids(&[1, 3]), &ids(&[4, 5, 6]), &s, 3, Some(NodeId(1)));
        assert_eq!(after, ids(&[1, 3, 6]));
        // Only learners of occupied sites: the lowest id.
        let after = settle(&ids(&[1, 3]), &ids(&[4, 5]), &s, 3, Some(NodeId(1)));
        assert_eq!(after, ids(&[1, 3, 4]));
    }

    #[test]
    fn without_a_learner_two_voters_stay_two_and_four_become_three() {
        let s = sites(&[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c")]);
        assert_eq!(settle(&ids(&[1, 2]), &ids(&[]), &s, 1, Some(NodeId(1))), ids(&[1, 2]));
        assert_eq!(settle(&ids(&[1, 2]), &ids(&[]), &s, 3, Some(NodeId(1))), ids(&[1, 2]));
        // Four voters: a live one from the fullest site goes (highest id), never the leader.
        let four = ids(&[1, 2, 3, 5]);
        assert_eq!(settle(&four, &four, &s, 5, Some(NodeId(2))), ids(&[2, 3, 5]));
        // One that is not live goes first.
        assert_eq!(settle(&four, &ids(&[1, 2, 3]), &s, 5, Some(NodeId(1))), ids(&[1, 2, 3]));
        // Above a lowered cap: down to it.
        let five = ids(&[1, 2, 3, 4, 5]);
        assert_eq!(settle(&five, &five, &s, 3, Some(NodeId(1))).len(), 3);
    }

    #[test]
    fn growth_stops_at_an_odd_count_and_at_the_target() {
        let s = sites(&[(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")]);
        // Cap 5, one eligible learner: four would be even, so three stay.
        assert_eq!(settle(&ids(&[1, 2, 3]), &ids(&[4]), &s, 5, None), ids(&[1, 2, 3]));
        assert_eq!(settle(&ids(&[1, 2, 3]), &ids(&[4, 5]), &s, 5, None), ids(&[1, 2, 3, 4, 5]));
        // Cap 3: learners stay learners.
        assert_eq!(settle(&ids(&[1, 2, 3]), &ids(&[4, 5]), &s, 3, None), ids(&[1, 2, 3]));
        // Two voters (after a removal) and one learner back: three.
        assert_eq!(settle(&ids(&[1, 2]), &ids(&[5]), &s, 3, None), ids(&[1, 2, 5]));
    }

    #[test]
    fn a_live_majority_is_more_than_half() {
        let v = ids(&[1, 2, 3]);
        assert!(has_live_majority(&v, |n| n != NodeId(3)));
        assert!(!has_live_majority(&v, |n| n == NodeId(1)));
        assert!(!has_live_majority(&ids(&[1, 2]), |n| n == NodeId(1)));
    }

    proptest! {
        /// Whatever the state, settling gives a count within the bounds, keeps the leader, only
        /// promotes eligible nodes, and settling its result again changes nothing (no flapping).
        #[test]
        fn settle_is_bounded_and_stable(
            voter_bits in 1u16..(1 << 9),
            eligible_bits in 0u16..(1 << 9),
            site_seed in proptest::collection::vec(0u8..3, 9),
            cap_idx in 0usize..3,
        ) {
            let all: Vec<NodeId> = (1..=9).map(NodeId).collect();
            let pick = |bits: u16| -> BTreeSet<NodeId> {
                all.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, n)| *n).collect()
            };
            let voters = pick(voter_bits);
            let eligible = pick(eligible_bits);
            let s: BTreeMap<NodeId, String> =
                all.iter().zip(&site_seed).map(|(n, x)| (*n, format!("s{x}"))).collect();
            let cap = VOTER_COUNTS[cap_idx];
            let members = voters.union(&eligible).count();
            let target = voter_target(cap, members);
            let keep = voters.iter().next().copied();
            let next = settle(&voters, &eligible, &s, target, keep);
            prop_assert!(!next.is_empty());
            prop_assert!(keep.is_none_or(|k| next.contains(&k)));
            for v in next.difference(&voters) {
                prop_assert!(eligible.contains(v));
            }
            prop_assert!(next.len() <= voters.len().max(target));
            prop_assert!(next.len() % 2 == 1 || next.len() == 2 || next.len() == voters.len());
            // The demoted voters are learners now; if they were eligible they still are.
            let again = settle(&next, &eligible, &s, target, keep);
            prop_assert_eq!(again, next);
        }
    }
}
