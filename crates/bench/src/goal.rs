//! The goal lines every benchmark ends with, in the one form scripts read:
//! `goal <name>: <measured> (target <op> <value>) met|missed`, judged on the printed figure.

use serde::Serialize;

/// How a goal compares its measured value with its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::AtLeast => ">=",
            Op::AtMost => "<=",
        }
    }
}

/// One goal of a benchmark: a ratio of Tandem's figure to its reference's, or an absolute figure.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub name: String,
    /// Tandem's figure divided by the reference's (or the absolute figure), rounded to the
    /// decimals printed.
    pub measured: f64,
    /// What the ratio is relative to, e.g. `etcd`; absent for an absolute figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The unit of an absolute figure and its target, e.g. `ms`; absent for a ratio or a count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub op: Op,
    pub target: f64,
    pub met: bool,
    /// The goal as printed: `goal <name>: <measured> (target <op> <value>) met|missed`.
    pub line: String,
}

impl Goal {
    pub fn ratio(name: &str, ratio: f64, reference: &str, op: Op, target: f64) -> Goal {
        // Judge the rounded value, so that the printed figure and the verdict never disagree.
        let measured = (ratio * 100.0).round() / 100.0;
        let met = judge(measured, op, target);
        let line = format!(
            "goal {name}: {measured:.2}x {reference} (target {} {}x) {}",
            op.symbol(),
            target_text(target),
            verdict(met)
        );
        Goal {
            name: name.to_string(),
            measured,
            reference: Some(reference.to_string()),
            unit: None,
            op,
            target,
            met,
            line,
        }
    }

    /// A goal on an absolute figure such as a count, printed with `decimals` decimals and
    /// judged on the printed value, e.g. `goal x-failed-requests: 0 (target <= 0) met`.
    pub fn absolute(name: &str, figure: f64, decimals: u8, op: Op, target: f64) -> Goal {
        let scale = 10f64.powi(i32::from(decimals));
        let measured = (figure * scale).round() / scale;
        let met = judge(measured, op, target);
        let d = usize::from(decimals);
        let line = format!("goal {name}: {measured:.d$} (target {} {target:.d$}) {}", op.symbol(), verdict(met));
        Goal { name: name.to_string(), measured, reference: None, unit: None, op, target, met, line }
    }

    /// An absolute goal on a figure with a unit, e.g.
    /// `goal failover-write-stall: 3120 ms (target <= 3750 ms) met`.
    pub fn absolute_in(name: &str, figure: f64, decimals: u8, unit: &str, op: Op, target: f64) -> Goal {
        let mut g = Goal::absolute(name, figure, decimals, op, target);
        let d = usize::from(decimals);
        g.line = format!(
            "goal {name}: {:.d$} {unit} (target {} {target:.d$} {unit}) {}",
            g.measured,
            op.symbol(),
            verdict(g.met)
        );
        g.unit = Some(unit.to_string());
        g
    }

    /// An absolute goal on a ratio that is not to a reference, named by `label` and printed
    /// with two decimals on both sides, e.g.
    /// `goal meta-rate-flat-1-client: last/first 0.97 (target >= 0.90) met`.
    pub fn labelled(name: &str, label: &str, figure: f64, op: Op, target: f64) -> Goal {
        let mut g = Goal::absolute(name, figure, 2, op, target);
        g.line =
            format!("goal {name}: {label} {:.2} (target {} {target:.2}) {}", g.measured, op.symbol(), verdict(g.met));
        g
    }
}

fn judge(measured: f64, op: Op, target: f64) -> bool {
    match op {
        Op::AtLeast => measured >= target,
        Op::AtMost => measured <= target,
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

/// A ratio target with one decimal, or two when it needs them (`1.5`, `0.25`).
fn target_text(target: f64) -> String {
    let mut s = format!("{target:.2}");
    if s.ends_with('0') && !s.ends_with(".0") {
        s.pop();
    }
    s
}

/// A ratio of two figures, NaN when the reference's figure is not positive (so that no goal on
/// it is met).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goal_line_has_the_scripted_form() {
        let g = Goal::ratio("meta-writes-64-clients", 1.6213, "etcd", Op::AtLeast, 1.5);
        assert_eq!(g.line, "goal meta-writes-64-clients: 1.62x etcd (target >= 1.5x) met");
        let g = Goal::ratio("meta-p50-1-client", 1.2, "etcd", Op::AtMost, 1.0);
        assert_eq!(g.line, "goal meta-p50-1-client: 1.20x etcd (target <= 1.0x) missed");
    }

    #[test]
    fn ratio_targets_keep_a_second_decimal_they_need() {
        let g = Goal::ratio("transport-quic-throughput", 0.3, "plaintext", Op::AtLeast, 0.25);
        assert_eq!(g.line, "goal transport-quic-throughput: 0.30x plaintext (target >= 0.25x) met");
        let g = Goal::ratio("transport-tls-rtt", 2.004, "plaintext", Op::AtMost, 2.0);
        assert_eq!(g.line, "goal transport-tls-rtt: 2.00x plaintext (target <= 2.0x) met");
    }

    #[test]
    fn absolute_goal_line_has_the_scripted_form() {
        let g = Goal::absolute("transport-switch-failed-requests", 0.0, 0, Op::AtMost, 0.0);
        assert_eq!(g.line, "goal transport-switch-failed-requests: 0 (target <= 0) met");
        assert!(!Goal::absolute("f", 3.0, 0, Op::AtMost, 0.0).met);
    }

    #[test]
    fn absolute_goal_with_a_unit_names_it_twice() {
        let g = Goal::absolute_in("failover-write-stall", 3120.4, 0, "ms", Op::AtMost, 3750.0);
        assert_eq!(g.line, "goal failover-write-stall: 3120 ms (target <= 3750 ms) met");
        assert!(!Goal::absolute_in("f", 3750.6, 0, "ms", Op::AtMost, 3750.0).met);
    }

    #[test]
    fn labelled_goal_line_has_the_scripted_form() {
        let g = Goal::labelled("meta-rate-flat-1-client", "last/first", 0.9712, Op::AtLeast, 0.9);
        assert_eq!(g.line, "goal meta-rate-flat-1-client: last/first 0.97 (target >= 0.90) met");
        assert!(!Goal::labelled("f", "last/first", 0.894, Op::AtLeast, 0.9).met);
        assert!(!Goal::labelled("f", "last/first", f64::NAN, Op::AtLeast, 0.9).met);
    }

    #[test]
    fn goal_is_judged_on_the_printed_figure() {
        assert!(Goal::ratio("g", 0.996, "etcd", Op::AtLeast, 1.0).met);
        assert!(!Goal::ratio("g", 0.994, "etcd", Op::AtLeast, 1.0).met);
    }
}
