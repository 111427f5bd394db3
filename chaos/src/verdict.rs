//! A run's verdict and its report files: the checker's findings joined with what the run saw
//! (host errors, convergence, divergence, path maps), written as `report.json` (every figure),
//! `report.txt` (the same for a terminal) and the timeline picture (`timeline.svg`, and
//! `timeline.html` with the key figures beside it).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::check::{self, Findings};
use crate::report::{figures, html_page, timeline_svg, Figures};
use crate::run::RunRecord;

/// The checker gives up on a run's history after this long (the verdict is then "unknown").
pub const CHECK_TIME_LIMIT: Duration = Duration::from_secs(60);

/// The verdict of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// Every check passed.
    pub valid: bool,
    /// Why not, one line each.
    pub problems: Vec<String>,
    pub ops: usize,
    pub faults: usize,
    /// Acknowledged writes lost (must be 0).
    pub lost: usize,
    /// Host-visible errors from nodes no fault touched (must be 0).
    pub host_errors_unexpected: usize,
    /// Per workload: valid, invalid or unknown.
    pub linearizable: Vec<(String, String)>,
}

impl Verdict {
    pub fn error(e: String) -> Verdict {
        Verdict {
            valid: false,
            problems: vec![format!("the run failed: {e}")],
            ops: 0,
            faults: 0,
            lost: 0,
            host_errors_unexpected: 0,
            linearizable: vec![],
        }
    }

    pub fn passed(&self) -> bool {
        self.valid
    }

    pub fn line(&self, scenario: &str, seed: u64) -> String {
        let head = if self.valid { "valid  " } else { "INVALID" };
        let lin: Vec<String> = self.linearizable.iter().map(|(w, v)| format!("{w} {v}")).collect();
        let mut s = format!(
            "{head} {scenario} seed {seed}: {} ops, {} faults, {} acknowledged writes lost, {} unexpected host errors; {}",
            self.ops,
            self.faults,
            self.lost,
            self.host_errors_unexpected,
            lin.join(", ")
        );
        for p in &self.problems {
            s += &format!("\n          {p}");
        }
        s
    }
}

/// Everything `report.json` holds.
#[derive(Serialize)]
struct Report<'a> {
    verdict: &'a Verdict,
    run: &'a RunRecord,
    figures: &'a Figures,
    findings: &'a Findings,
}

fn problems(record: &RunRecord, findings: &Findings) -> Vec<String> {
    let mut problems = Vec::new();
    for w in &findings.workloads {
        if w.verdict.is_invalid() {
            let first = w.keys_invalid.first().map(|k| format!(": {}", k.explanation)).unwrap_or_default();
            problems.push(format!("{} is {}{first}", w.workload.name(), w.verdict.name()));
        }
    }
    if !findings.lost.is_empty() {
        problems.push(format!(
            "{} acknowledged writes lost (first: {})",
            findings.lost.len(),
            findings.lost[0].describe()
        ));
    }
    if !findings.stale.is_empty() {
        problems.push(format!("{} stale reads (first: {})", findings.stale.len(), findings.stale[0].describe()));
    }
    if !findings.unrecognized.is_empty() {
        problems.push(format!(
            "{} reads returned data no write wrote (first: {})",
            findings.unrecognized.len(),
            findings.unrecognized[0].describe()
        ));
    }
    if !findings.paths_back.is_empty() {
        problems.push(format!("{} path-map generations went back", findings.paths_back.len()));
    }
    let unexpected: Vec<_> = record.host_errors.iter().filter(|e| !e.expected).collect();
    if !unexpected.is_empty() {
        problems.push(format!(
            "{} host-visible errors from nodes no fault touched (first: node {} at {:.1}s: {} {})",
            unexpected.len(),
            unexpected[0].node,
            unexpected[0].time_s,
            unexpected[0].op,
            unexpected[0].error
        ));
    }
    if let Some(e) = &record.converge_error {
        problems.push(e.clone());
    }
    if !record.divergent.is_empty() {
        problems.push(format!("replicas diverge at the end (node, data digest): {:?}", record.divergent));
    }
    if !record.map_conflicts.is_empty() {
        problems.push(format!("{} path maps conflict: {}", record.map_conflicts.len(), record.map_conflicts[0]));
    }
    if record.final_reads_failed > 0 {
        problems.push(format!("{} final reads failed after the heal", record.final_reads_failed));
    }
    if record.heal_write_failed {
        problems.push("no write succeeded after the heal".into());
    }
    problems
}

/// Judges a run and writes its report under `out`.
pub fn judge_and_report(record: &RunRecord, out: &Path) -> Verdict {
    let findings = check::check(&record.timeline, CHECK_TIME_LIMIT);
    let figures = figures(&record.timeline);
    let problems = problems(record, &findings);
    let verdict = Verdict {
        valid: problems.is_empty(),
        problems,
        ops: record.timeline.ops.len(),
        faults: record.timeline.faults.len(),
        lost: findings.lost.len(),
        host_errors_unexpected: record.host_errors.iter().filter(|e| !e.expected).count(),
        linearizable: findings
            .workloads
            .iter()
            .map(|w| (w.workload.name().to_string(), w.verdict.name().to_string()))
            .collect(),
    };
    let report = Report { verdict: &verdict, run: record, figures: &figures, findings: &findings };
    let write = |name: &str, text: &str| {
        if let Err(e) = std::fs::write(out.join(name), text) {
            eprintln!("cannot write {}: {e}", out.join(name).display());
        }
    };
    write("report.json", &serde_json::to_string_pretty(&report).unwrap_or_default());
    let title = format!("tandem chaos: {} (seed {})", record.scenario, record.seed);
    let subtitle = format!(
        "{} nodes · {} · commit {} · {}",
        record.nodes,
        record.transport,
        record.commit,
        if verdict.valid { "valid".to_string() } else { format!("INVALID: {}", verdict.problems.join("; ")) }
    );
    let svg = timeline_svg(&record.timeline, &title, &subtitle);
    let mut rows = vec![("verdict".to_string(), if verdict.valid { "valid".into() } else { "INVALID".into() })];
    rows.extend(verdict.problems.iter().map(|p| ("problem".to_string(), p.clone())));
    rows.push(("acknowledged writes lost".into(), verdict.lost.to_string()));
    rows.push((
        "linearizability".into(),
        verdict.linearizable.iter().map(|(w, v)| format!("{w}: {v}")).collect::<Vec<_>>().join(", "),
    ));
    rows.push((
        "keys checked".into(),
        findings
            .workloads
            .iter()
            .map(|w| format!("{}: {} ops on {} keys", w.workload.name(), w.ops, w.keys))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    rows.push((
        "host errors".into(),
        format!("{} ({} from nodes no fault touched)", record.host_errors.len(), verdict.host_errors_unexpected),
    ));
    rows.push(("divergent replicas".into(), record.divergent.len().to_string()));
    rows.extend(figures.summary_rows());
    write("timeline.svg", &svg);
    write("timeline.html", &html_page(&svg, &title, &rows));
    let mut text = format!("{title}\n{subtitle}\n\n");
    for (k, v) in &rows {
        text += &format!("{k:<26} {v}\n");
    }
    text += &format!("\nfaults ({}):\n", record.timeline.faults.len());
    for f in &figures.faults.list {
        text += &format!("  {:>7.1}s - {:>7.1}s  {:<20} {}\n", f.start_s, f.stop_s, f.kind, f.target);
    }
    text += &format!("\nfiles: {}/{{history.jsonl, report.json, timeline.svg, timeline.html, logs/}}\n", out.display());
    write("report.txt", &text);
    verdict
}
