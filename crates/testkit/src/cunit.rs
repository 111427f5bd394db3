//! Reading the verdicts of a CUnit suite run (libiscsi's `iscsi-test-cu`) from its verbose
//! output, test by test.

/// A test's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Pass,
    Skip,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Skip => "SKIP",
            Verdict::Fail => "FAIL",
        }
    }
}

/// Per-test verdicts, `Suite.Test` in the order they ran (a test run twice appears twice).
/// CUnit's verdict is the first bare `passed` or `FAILED` word after the test's name; the
/// test's own lines before it say `[FAILED]` for an error it provoked on purpose, and
/// `[SKIPPED]` when it did not apply.
pub fn verdicts(output: &str) -> Vec<(String, Verdict)> {
    let mut out = Vec::new();
    let mut suite = "";
    let mut current: Option<(String, String)> = None;
    let finish = |current: &mut Option<(String, String)>, out: &mut Vec<(String, Verdict)>| {
        if let Some((name, body)) = current.take() {
            let words: Vec<&str> = body.split_whitespace().collect();
            let verdict = match words.iter().position(|w| *w == "passed" || *w == "FAILED") {
                Some(i) if words[i] == "FAILED" => Verdict::Fail,
                Some(i) if words[..i].contains(&"[SKIPPED]") => Verdict::Skip,
                Some(_) => Verdict::Pass,
                None => Verdict::Fail,
            };
            out.push((name, verdict));
        }
    };
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("Suite: ") {
            finish(&mut current, &mut out);
            suite = name.trim();
        } else if let Some(rest) = line.strip_prefix("  Test: ") {
            finish(&mut current, &mut out);
            let (name, body) = rest.split_once(" ...").unwrap_or((rest, ""));
            current = Some((format!("{suite}.{}", name.trim()), format!("{body}\n")));
        } else if line.starts_with("Run Summary") {
            finish(&mut current, &mut out);
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    finish(&mut current, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_come_from_cunit_words_not_from_the_tests_own_lines() {
        let out = "Suite: A\n  Test: One ...passed\n  Test: Two ...    [SKIPPED] not here\npassed\n  \
                   Test: Three ...    [FAILED] provoked on purpose\npassed\n  Test: Four ...    [WARNING] x\n\
                   FAILED\n    1. test.c:1\nSuite: B\n  Test: One ...\nRun Summary: ...\n";
        let got = verdicts(out);
        let want = [
            ("A.One", Verdict::Pass),
            ("A.Two", Verdict::Skip),
            ("A.Three", Verdict::Pass),
            ("A.Four", Verdict::Fail),
            ("B.One", Verdict::Fail),
        ];
        assert_eq!(got, want.map(|(n, v)| (n.to_string(), v)));
    }
}
