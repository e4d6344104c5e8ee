//! keyswap's conformance suite, for every host that runs it: one case a
//! file under `tests/conformance/cases/`, the same files and the same
//! comparison for the policy natively, the filter module in the harness,
//! the component, `keyswap serve` and the real Envoy. No host types here
//! (no wasmtime, no proxy-wasm): a host turns a [`SuiteCase`] into what it
//! [`Observed`], and [`SuiteCase::check`] judges that.
//!
//! ```text
//!  case ──── SuiteCase: request, expectation, steps, needs (the format)
//!       └─── Observed, SuiteCase::check (the one comparison)
//!  runner ── Runner (the five hosts), Capability, Runner::lacks (once, with a reason)
//!  suite ─── Suite: cases + skip.json, checked as a whole; Plan per runner
//!  report ── SuiteReport: a plan run and checked, skips counted by why
//! ```
//!
//! A runner skips a case for one of two reasons: the case needs a
//! [`Capability`] the runner lacks, or `skip.json` names the case for that
//! runner (a difference of that case alone). [`Suite::load`] refuses a skip
//! that names no case, gives no reason or repeats a lacked capability, and
//! a case that no runner runs.

mod case;
mod report;
mod runner;
mod suite;

pub use case::{
    step_worker, CallAnswer, Expect, ExpectCall, ExpectDeny, ExpectForward, Observed, RefusedStep, Request,
    RequestsStep, RespondStep, Response, SendStep, Step, SuiteCase, STEPS_START,
};
pub use report::SuiteReport;
pub use runner::{Capability, Runner};
pub use suite::{Plan, Skip, Suite};

use std::path::{Path, PathBuf};

/// The suite's directory in this repository (`tests/conformance`).
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The suite in this repository is sound ([`Suite::load`] checks it):
    /// every skip is explained and every case is run by some runner. Prints
    /// what each runner runs and skips.
    #[test]
    fn the_repository_suite_loads_and_every_case_runs_somewhere() {
        let suite = Suite::load(&default_dir()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!suite.cases.is_empty());
        for runner in Runner::ALL {
            let plan = suite.plan(runner);
            println!("{runner}: runs {}, skips {} {:?}", plan.run.len(), plan.skipped.len(), plan.skip_counts());
        }
    }
}
