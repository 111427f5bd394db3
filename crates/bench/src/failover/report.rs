//! `bench failover`'s result: what each kill measured, the summary over the kills, the goals
//! against the failure timeout, and the table (or the JSON document).

use serde::Serialize;
use tandem_client::format_size;
use tandem_node::lease::FAILURE_TIMEOUT;
use tandem_types::{Epoch, NodeId};

use super::{ms, BLOCK_BYTES, NODES, PATH_MAP_TARGET, RESUME_WAIT, VOLUME_BYTES, WRITE_RANGE_BYTES};
use crate::goal::{Goal, Op};
use crate::load;

/// What happened around one kill.
#[derive(Serialize)]
pub(super) struct Kill {
    pub(super) kill: u32,
    pub(super) killed_node: NodeId,
    /// Whether the killed primary was also the Raft leader, so a leader election came first.
    pub(super) killed_raft_leader: bool,
    /// The node the write load was connected to.
    pub(super) client_node: NodeId,
    pub(super) new_primary: Option<NodeId>,
    pub(super) new_epoch: Option<Epoch>,
    /// The longest gap between two consecutive acknowledged writes over the load's window.
    pub(super) stall_ms: f64,
    /// From the kill to the first write acknowledged after it.
    pub(super) resume_ms: Option<f64>,
    /// From the kill to when a survivor's API first showed the new primary (polled every 50 ms).
    pub(super) failover_seen_ms: Option<f64>,
    /// From the kill to the first path map, at a host watching it, without the killed node and
    /// with another node's path active-optimized.
    pub(super) path_map_ms: Option<f64>,
    /// From the kill to the first new generation of the watched map, whatever it showed.
    pub(super) path_map_first_change_ms: Option<f64>,
    pub(super) writes_acked: u64,
    pub(super) writes_failed: u64,
    pub(super) errors: Vec<String>,
    /// From starting the killed node again until the volume's ISR held every node.
    pub(super) rejoin_s: f64,
}

#[derive(Serialize)]
struct Summary {
    stall_ms_median: f64,
    stall_ms_max: f64,
    resume_ms_median: f64,
    rejoin_s_median: f64,
    path_map_ms_median: f64,
    path_map_ms_max: f64,
    writes_failed: u64,
}

#[derive(Serialize)]
pub(super) struct Report {
    benchmark: &'static str,
    tandem_nodes: u32,
    volume_bytes: u64,
    write_range_bytes: u64,
    block_bytes: usize,
    failure_timeout_ms: f64,
    stall_target_ms: f64,
    cores: usize,
    kills: Vec<Kill>,
    summary: Summary,
    goals: Vec<Goal>,
}

pub(super) fn report(kills: Vec<Kill>) -> Report {
    let stalls: Vec<f64> = kills.iter().map(|k| k.stall_ms).collect();
    let resumes: Vec<f64> = kills.iter().filter_map(|k| k.resume_ms).collect();
    let rejoins: Vec<f64> = kills.iter().map(|k| k.rejoin_s).collect();
    // A kill whose map never came counts as the longest possible wait.
    let maps: Vec<f64> = kills.iter().map(|k| k.path_map_ms.unwrap_or(ms(RESUME_WAIT))).collect();
    let summary = Summary {
        stall_ms_median: load::median(&stalls),
        stall_ms_max: stalls.iter().copied().fold(0.0, f64::max),
        resume_ms_median: load::median(&resumes),
        rejoin_s_median: load::median(&rejoins),
        path_map_ms_median: load::median(&maps),
        path_map_ms_max: maps.iter().copied().fold(0.0, f64::max),
        writes_failed: kills.iter().map(|k| k.writes_failed).sum(),
    };
    let failure_timeout_ms = ms(FAILURE_TIMEOUT);
    let stall_target_ms = 1.5 * failure_timeout_ms;
    let goals = vec![
        Goal::absolute_in("failover-write-stall", summary.stall_ms_max, 0, "ms", Op::AtMost, stall_target_ms),
        Goal::absolute_in(
            "failover-path-map-p50",
            summary.path_map_ms_median,
            0,
            "ms",
            Op::AtMost,
            ms(PATH_MAP_TARGET),
        ),
    ];
    Report {
        benchmark: "failover",
        tandem_nodes: NODES,
        volume_bytes: VOLUME_BYTES,
        write_range_bytes: WRITE_RANGE_BYTES,
        block_bytes: BLOCK_BYTES,
        failure_timeout_ms,
        stall_target_ms,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        kills,
        summary,
        goals,
    }
}

pub(super) fn print_table(r: &Report) {
    println!(
        "bench failover: kill -9 of the primary under 4 KiB writes (qd 1) through another node; {} kills; {} cores",
        r.kills.len(),
        r.cores
    );
    println!(
        "tandem: {} nodes (this binary), a {} volume replicated {} ways, writes to random blocks of its first {}; FAILURE_TIMEOUT {:.0} ms",
        r.tandem_nodes,
        format_size(r.volume_bytes),
        r.tandem_nodes,
        format_size(r.write_range_bytes),
        r.failure_timeout_ms
    );
    println!("stall: the longest gap between two acknowledged writes; rejoin: from the restart until the ISR is full");
    println!("path map: from the kill until a host watching its map (long-poll via the client node) had one without the killed node");
    println!();
    println!(
        "{:>4} {:>6} {:>7} {:>6} {:>8} {:>9} {:>10} {:>11} {:>11} {:>7} {:>6} {:>9}",
        "kill",
        "killed",
        "leader?",
        "client",
        "new prim",
        "stall ms",
        "resume ms",
        "failover ms",
        "path map ms",
        "writes",
        "failed",
        "rejoin s"
    );
    for k in &r.kills {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "{:>4} {:>6} {:>7} {:>6} {:>8} {:>9.0} {:>10} {:>11} {:>11} {:>7} {:>6} {:>9.1}",
            k.kill,
            k.killed_node,
            if k.killed_raft_leader { "yes" } else { "no" },
            k.client_node,
            k.new_primary.map_or("-".to_string(), |p| p.to_string()),
            k.stall_ms,
            opt(k.resume_ms),
            opt(k.failover_seen_ms),
            opt(k.path_map_ms),
            k.writes_acked,
            k.writes_failed,
            k.rejoin_s
        );
    }
    let s = &r.summary;
    println!();
    println!(
        "stall ms: median {:.0}, max {:.0}; resume ms median {:.0}; rejoin s median {:.1}; failed writes {}",
        s.stall_ms_median, s.stall_ms_max, s.resume_ms_median, s.rejoin_s_median, s.writes_failed
    );
    println!(
        "path map at a watching host (kill -> map without the killed node): median {:.0} ms, max {:.0} ms",
        s.path_map_ms_median, s.path_map_ms_max
    );
    for e in r.kills.iter().flat_map(|k| k.errors.iter().map(move |e| (k.kill, e))) {
        println!("kill {}: {}", e.0, e.1);
    }
    println!();
    for g in &r.goals {
        println!("{}", g.line);
    }
}
