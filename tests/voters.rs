//! Raft membership that scales: a few voters (`cluster.voters`, 3 by default), every other node
//! a learner that serves linearizable reads, forwards writes, and takes a voter's seat when one
//! is removed or lost for good. Real `tandem` processes started by `tandem up`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tandem_testkit::{wait_for, Cluster};

/// Generous: seven processes share two cores with whatever else runs.
const WAIT: Duration = Duration::from_secs(60);

fn id_set(v: &Value) -> BTreeSet<u64> {
    v.as_array().into_iter().flatten().filter_map(Value::as_u64).collect()
}

/// The voters and learners node `id` sees, once it answers.
fn membership(c: &Cluster, id: u64) -> Option<(BTreeSet<u64>, BTreeSet<u64>)> {
    let v = c.view(id)?;
    Some((id_set(&v["raft"]["voters"]), id_set(&v["raft"]["learners"])))
}

/// Waits until every node of `nodes` sees the same membership, with `voters` voters of which
/// none is in `not`, and returns it.
fn agreed_membership(
    c: &Cluster,
    nodes: &[u64],
    voters: usize,
    not: &[u64],
    what: &str,
) -> (BTreeSet<u64>, BTreeSet<u64>) {
    wait_for(what, WAIT, || {
        let seen: Vec<(BTreeSet<u64>, BTreeSet<u64>)> =
            nodes.iter().map(|id| membership(c, *id)).collect::<Option<_>>()?;
        let first = seen[0].clone();
        let agreed = seen.iter().all(|m| *m == first);
        (agreed && first.0.len() == voters && not.iter().all(|n| !first.0.contains(n))).then_some(first)
    })
}

fn metric(c: &Cluster, id: u64, name: &str) -> Option<u64> {
    c.metric(id, name).map(|v| v as u64)
}

/// Seven nodes, three voters: a voter's loss leaves the cluster committing and learners
/// answering linearizable reads; removing it gives its seat to a learner, from the site with
/// no voter.
#[test]
fn seven_nodes_keep_three_voters_and_a_learner_takes_a_removed_voters_seat() {
    // `up` puts every node in one site; node 6 moves to another, so it is the learner the
    // site-spread rule promotes first.
    let c = Cluster::builder()
        .nodes(7)
        .edit_config(|cfg| cfg.replace("id = 6\nsite = \"local\"", "id = 6\nsite = \"east\""))
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let all = c.node_ids();
    assert_eq!(all, vec![1, 2, 3, 4, 5, 6, 7]);
    let (voters, learners) = agreed_membership(&c, &all, 3, &[], "every node to see 3 voters");
    assert_eq!(voters, BTreeSet::from([1, 2, 3]), "the node that formed the cluster and the lowest ids");
    assert_eq!(learners, BTreeSet::from([4, 5, 6, 7]));
    let leader = c.agreed_leader(&all, WAIT);
    assert!(voters.contains(&leader));
    for id in &learners {
        let v = c.view(*id).expect("view");
        assert_eq!(v["raft"]["role"], "learner", "node {id}: {v}");
        let node = v["nodes"].as_array().expect("nodes").iter().find(|n| n["id"].as_u64() == Some(*id)).cloned();
        assert_eq!(node.expect("its own record")["membership"], "learner", "node {id}: {v}");
    }
    assert_eq!(metric(&c, leader, "tandem_raft_voters"), Some(3));
    assert_eq!(metric(&c, leader, "tandem_raft_learners"), Some(4));
    // `tandem status` shows the same.
    let status = c.status_json(5);
    assert_eq!(id_set(&status["voters"]), voters, "{status}");
    assert_eq!(id_set(&status["learners"]), learners, "{status}");
    // Node 6 advertised its new site after the restart.
    wait_for("node 6's new site in the map", WAIT, || {
        let nodes: Value = c.http().get(format!("{}/v1/nodes", c.api(leader))).send().ok()?.json().ok()?;
        let six = nodes.as_array()?.iter().find(|n| n["id"].as_u64() == Some(6))?.clone();
        (six["site"] == "east").then_some(())
    });

    // Writes through a learner are forwarded; a learner reads what was committed.
    c.put_setting(4, "before", "1");
    assert_eq!(c.get_setting(7, "before").as_deref(), Some("1"));

    // Lose the leader, a voter: the two voters left elect a new one and the cluster commits.
    c.kill(leader);
    let alive: Vec<u64> = all.iter().copied().filter(|i| *i != leader).collect();
    let new_leader = wait_for("a new leader every live node agrees on", WAIT, || {
        let leaders: Vec<Option<u64>> =
            alive.iter().map(|id| c.view(*id).and_then(|v| v["raft"]["leader"].as_u64())).collect();
        match leaders[0] {
            Some(l) if l != leader && leaders.iter().all(|x| *x == Some(l)) => Some(l),
            _ => None,
        }
    });
    assert!(voters.contains(&new_leader), "a learner cannot lead: {new_leader}");
    wait_for("a write through a learner without the old leader", WAIT, || {
        let resp = c
            .http()
            .put(format!("{}/v1/settings/after-kill", c.api(5)))
            .json(&serde_json::json!({ "value": "2" }))
            .send()
            .ok()?;
        resp.status().is_success().then_some(())
    });
    assert_eq!(c.get_setting(7, "after-kill").as_deref(), Some("2"), "a linearizable read through a learner");

    // Remove the lost voter: a learner takes its seat in the same change, node 6 as the only
    // one in a site without a voter.
    let out = c.admin(&["node", "remove", &leader.to_string()]);
    assert!(out.contains("removed"), "{out}");
    let (voters2, learners2) =
        agreed_membership(&c, &alive, 3, &[leader], "a learner to take the removed voter's seat");
    assert!(voters2.contains(&6), "the learner of the voterless site: {voters2:?}");
    let rest: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != leader).chain([6]).collect();
    assert_eq!(voters2, rest);
    assert_eq!(learners2, alive.iter().copied().filter(|n| !voters2.contains(n)).collect());
    assert_eq!(metric(&c, new_leader, "tandem_raft_voters"), Some(3));
    assert_eq!(metric(&c, new_leader, "tandem_raft_learners"), Some(3));
    let v6 = wait_for("node 6 to vote", WAIT, || {
        let v = c.view(6)?;
        (v["raft"]["role"] != "learner").then_some(v)
    });
    assert!(matches!(v6["raft"]["role"].as_str(), Some("follower" | "leader")), "{v6}");
    c.put_setting(4, "after-remove", "3");
    assert_eq!(c.get_setting(6, "after-remove").as_deref(), Some("3"));
}

/// `cluster.voter_replace_after_secs`: the leader gives the seat of a voter it has not heard
/// from for that long to a live learner on its own; the lost node stays a member as a learner
/// and, when it returns, catches up as one.
#[test]
fn a_voter_lost_for_good_is_replaced_by_a_learner_and_returns_as_a_learner() {
    let c = Cluster::builder()
        .nodes(4)
        .edit_config(|cfg| cfg.replace("voter_replace_after_secs = 300", "voter_replace_after_secs = 3"))
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let all = c.node_ids();
    let (voters, learners) = agreed_membership(&c, &all, 3, &[], "3 voters and a learner");
    assert_eq!(learners, BTreeSet::from([4]));
    let leader = c.agreed_leader(&all, WAIT);
    let lost = *voters.iter().find(|v| **v != leader).expect("a voter that does not lead");

    c.kill(lost);
    let alive: Vec<u64> = all.iter().copied().filter(|i| *i != lost).collect();
    let (voters2, learners2) = agreed_membership(&c, &alive, 3, &[lost], "the learner to take the lost voter's seat");
    assert!(voters2.contains(&4), "{voters2:?}");
    assert_eq!(learners2, BTreeSet::from([lost]), "the lost node stays a member, as a learner");
    c.put_setting(4, "while-lost", "1");

    // It returns: a learner that catches up, while the voters stay as they are.
    c.restart_missing();
    let v = wait_for("the returned node to catch up as a learner", WAIT, || {
        let v = c.view(lost)?;
        (v["raft"]["role"] == "learner").then_some(())?;
        c.get_setting(lost, "while-lost").filter(|x| x == "1").map(|_| v)
    });
    assert_eq!(id_set(&v["raft"]["voters"]), voters2, "{v}");
    assert_eq!(membership(&c, leader).expect("leader answers").0, voters2);
}
