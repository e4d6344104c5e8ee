//! A runner's plan run and checked case by case: [`SuiteReport`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::case::{Observed, SuiteCase};
use crate::runner::Runner;
use crate::suite::Plan;

/// The outcome of running a plan.
#[derive(Debug)]
pub struct SuiteReport {
    pub runner: Runner,
    pub passed: usize,
    /// `(case, differences)`.
    pub failed: Vec<(String, String)>,
    /// How many cases were skipped, by [`crate::Skip::label`].
    pub skipped: BTreeMap<String, usize>,
}

impl SuiteReport {
    /// Runs every planned case through `run` and checks it.
    pub fn run(plan: &Plan<'_>, mut run: impl FnMut(&SuiteCase) -> Result<Observed, String>) -> Self {
        let mut report =
            SuiteReport { runner: plan.runner, passed: 0, failed: Vec::new(), skipped: plan.skip_counts() };
        for case in &plan.run {
            match run(case).and_then(|observed| case.check(&observed)) {
                Ok(()) => report.passed += 1,
                Err(diff) => report.failed.push((case.name.clone(), diff)),
            }
        }
        report
    }

    /// Every case skipped.
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    /// Each failure, then the closing line
    /// `RUNNER: N passed, M failed, K skipped (k1 needs CAPABILITY, k2 skip.json)`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, diff) in &self.failed {
            let _ = writeln!(out, "FAIL {name}\n{diff}");
        }
        let _ = write!(out, "{}: {} passed, {} failed", self.runner, self.passed, self.failed.len());
        if !self.skipped.is_empty() {
            let why: Vec<String> = self.skipped.iter().map(|(label, n)| format!("{n} {label}")).collect();
            let _ = write!(out, ", {} skipped ({})", self.skipped_total(), why.join(", "));
        }
        out
    }
}
