//! The suite on disk (every case, and `skip.json`), checked as a whole when
//! it loads, and each runner's [`Plan`]: which cases it runs, and why it
//! skips the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::case::{load_case, SuiteCase};
use crate::runner::{Capability, Runner};

/// Every case, and the per-case skips of `skip.json`.
#[derive(Debug)]
pub struct Suite {
    pub dir: PathBuf,
    /// Sorted by name.
    pub cases: Vec<SuiteCase>,
    /// `skip.json`: per runner, case name -> why this runner cannot run
    /// that one case (when it could run the case's needs otherwise).
    skips: BTreeMap<Runner, BTreeMap<String, String>>,
}

/// Why a runner leaves a case out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip<'s> {
    /// The case needs a capability the runner lacks ([`Runner::lacks`]).
    Lacks(Capability, &'static str),
    /// A difference of this one case, written in `skip.json`.
    Listed(&'s str),
}

impl Skip<'_> {
    /// The reason, as the runner or `skip.json` gives it.
    pub fn reason(&self) -> &str {
        match self {
            Skip::Lacks(_, reason) => reason,
            Skip::Listed(reason) => reason,
        }
    }

    /// A short label for counts: `needs CAPABILITY`, or `skip.json`.
    pub fn label(&self) -> String {
        match self {
            Skip::Lacks(capability, _) => format!("needs {capability}"),
            Skip::Listed(_) => "skip.json".to_string(),
        }
    }
}

/// Which cases a runner runs and which it skips, with the reasons.
#[derive(Debug)]
pub struct Plan<'s> {
    pub runner: Runner,
    pub run: Vec<&'s SuiteCase>,
    pub skipped: Vec<(&'s SuiteCase, Skip<'s>)>,
}

impl Plan<'_> {
    /// How many cases are skipped, by [`Skip::label`].
    pub fn skip_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (_, skip) in &self.skipped {
            *counts.entry(skip.label()).or_insert(0) += 1;
        }
        counts
    }
}

impl Suite {
    /// Loads `dir/cases/*.json`, sorted by name, and `dir/skip.json`, and
    /// checks them together (see [`Suite::check`]).
    ///
    /// # Errors
    /// A case or skip list that cannot be read or parsed, named by file, or
    /// the first fault [`Suite::check`] finds.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let cases_dir = dir.join("cases");
        let entries = std::fs::read_dir(&cases_dir).map_err(|e| format!("{}: {e}", cases_dir.display()))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut cases = Vec::with_capacity(files.len());
        for file in files {
            cases.push(load_case(dir, &file).map_err(|e| format!("{}: {e}", file.display()))?);
        }
        let skip_file = dir.join("skip.json");
        let by_name: BTreeMap<String, BTreeMap<String, String>> = match std::fs::read_to_string(&skip_file) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", skip_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("{}: {e}", skip_file.display())),
        };
        let mut skips = BTreeMap::new();
        for (name, entries) in by_name {
            let runner = Runner::from_name(&name).ok_or_else(|| format!("skip.json: `{name}` is not a runner"))?;
            skips.insert(runner, entries);
        }
        let suite = Self { dir: dir.to_path_buf(), cases, skips };
        suite.check()?;
        Ok(suite)
    }

    /// Checks that the skips cannot rot and no case is dropped: every
    /// `skip.json` entry names a case, gives a reason, and is a case its
    /// runner could otherwise run (a capability it lacks already skips the
    /// others); and every case is run by some runner.
    ///
    /// # Errors
    /// The first fault found.
    pub fn check(&self) -> Result<(), String> {
        for (runner, entries) in &self.skips {
            for (name, reason) in entries {
                let case = self
                    .cases
                    .iter()
                    .find(|c| &c.name == name)
                    .ok_or_else(|| format!("skip.json: {runner} skips `{name}`, which is not a case"))?;
                if reason.trim().is_empty() {
                    return Err(format!("skip.json: {runner} skips `{name}` without a reason"));
                }
                if let Some((capability, _)) = runner.cannot_run(case.needs.iter().copied()) {
                    return Err(format!(
                        "skip.json: {runner} skips `{name}`, which needs {capability}, which {runner} lacks: \
                         the entry says nothing"
                    ));
                }
            }
        }
        for case in &self.cases {
            if Runner::ALL.iter().all(|runner| self.skip(*runner, case).is_some()) {
                let why: Vec<String> = Runner::ALL
                    .iter()
                    .filter_map(|runner| self.skip(*runner, case).map(|skip| format!("{runner}: {}", skip.label())))
                    .collect();
                return Err(format!("case `{}` is run by no runner ({})", case.name, why.join(", ")));
            }
        }
        Ok(())
    }

    /// Why `runner` skips `case`, if it does: the first capability it lacks
    /// that the case needs, else its `skip.json` entry.
    pub fn skip(&self, runner: Runner, case: &SuiteCase) -> Option<Skip<'_>> {
        if let Some((capability, reason)) = runner.cannot_run(case.needs.iter().copied()) {
            return Some(Skip::Lacks(capability, reason));
        }
        let listed = self.skips.get(&runner).and_then(|entries| entries.get(&case.name));
        listed.map(|reason| Skip::Listed(reason.as_str()))
    }

    /// The cases `runner` runs and skips.
    pub fn plan(&self, runner: Runner) -> Plan<'_> {
        let mut plan = Plan { runner, run: Vec::new(), skipped: Vec::new() };
        for case in &self.cases {
            match self.skip(runner, case) {
                Some(skip) => plan.skipped.push((case, skip)),
                None => plan.run.push(case),
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A suite in a fresh directory: `cases` as `(name, json)`, `skip` as
    /// the text of `skip.json`.
    fn suite(test: &str, cases: &[(&str, &str)], skip: &str) -> Result<Suite, String> {
        let dir = std::env::temp_dir().join(format!("keyswap-conformance-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cases")).unwrap();
        for (name, json) in cases {
            std::fs::write(dir.join("cases").join(format!("{name}.json")), json).unwrap();
        }
        std::fs::write(dir.join("skip.json"), skip).unwrap();
        let loaded = Suite::load(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        loaded
    }

    const PLAIN: &str = r#"{"description": "d", "config": {}, "expect": {"config_error": "x"}}"#;
    const OWN: &str =
        r#"{"description": "d", "needs": ["own-routing"], "config": {}, "expect": {"config_error": "x"}}"#;
    const BOTH: &str = r#"{"description": "d", "needs": ["own-routing", "envoy-routing"], "config": {},
        "expect": {"config_error": "x"}}"#;

    #[test]
    fn a_plan_skips_by_capability_then_by_skip_json() {
        let suite = suite("plan", &[("a-plain", PLAIN), ("b-own", OWN)], r#"{"envoy": {"a-plain": "why"}}"#).unwrap();
        let envoy = suite.plan(Runner::Envoy);
        assert!(envoy.run.is_empty());
        let skipped: Vec<(&str, String)> = envoy.skipped.iter().map(|(c, s)| (c.name.as_str(), s.label())).collect();
        assert_eq!(skipped, [("a-plain", "skip.json".to_string()), ("b-own", "needs own-routing".to_string())]);
        let component = suite.plan(Runner::Component);
        assert_eq!(component.run.len(), 2);
    }

    #[test]
    fn skip_json_entries_that_rot_are_refused() {
        let cases = [("a-plain", PLAIN), ("b-own", OWN)];
        let err = suite("no-case", &cases, r#"{"envoy": {"gone": "why"}}"#).unwrap_err();
        assert!(err.contains("`gone`, which is not a case"), "{err}");
        let err = suite("no-reason", &cases, r#"{"envoy": {"a-plain": " "}}"#).unwrap_err();
        assert!(err.contains("without a reason"), "{err}");
        let err = suite("no-runner", &cases, r#"{"wasmtime": {"a-plain": "why"}}"#).unwrap_err();
        assert!(err.contains("`wasmtime` is not a runner"), "{err}");
        let err = suite("redundant", &cases, r#"{"native": {"b-own": "why"}}"#).unwrap_err();
        assert!(err.contains("needs own-routing, which native lacks"), "{err}");
    }

    #[test]
    fn a_case_no_runner_runs_is_refused() {
        let err = suite("nowhere", &[("both", BOTH)], "{}").unwrap_err();
        assert!(err.contains("`both` is run by no runner"), "{err}");
        let listed = r#"{"component": {"a-own": "why"}, "serve": {"a-own": "why"}}"#;
        let err = suite("listed", &[("a-own", OWN)], listed).unwrap_err();
        assert!(err.contains("`a-own` is run by no runner"), "{err}");
    }

    #[test]
    fn needs_the_case_contradicts_are_refused() {
        let timeline = r#"{"description": "d", "needs": ["timeline"], "config": {}, "expect": {"config_error": "x"}}"#;
        let err = suite("timeline", &[("t", timeline)], "{}").unwrap_err();
        assert!(err.contains("implied by `steps`"), "{err}");
        let unnamed =
            r#"{"description": "d", "needs": ["route-and-cluster"], "config": {}, "expect": {"config_error": "x"}}"#;
        let err = suite("unnamed", &[("u", unnamed)], "{}").unwrap_err();
        assert!(err.contains("no route_name or cluster"), "{err}");
        let unknown =
            r#"{"description": "d", "needs": ["time-travel"], "config": {}, "expect": {"config_error": "x"}}"#;
        assert!(suite("unknown", &[("x", unknown)], "{}").unwrap_err().contains("time-travel"));
    }

    #[test]
    fn steps_imply_a_timeline() {
        let stepped = r#"{"description": "d", "config": {}, "steps": [{"tick_at": 0}],
            "expect": {"config_error": "x"}}"#;
        let suite = suite("steps", &[("s", stepped)], "{}").unwrap();
        assert!(suite.cases[0].needs.contains(&Capability::Timeline));
        assert!(suite.plan(Runner::Envoy).run.is_empty());
        assert_eq!(suite.plan(Runner::Harness).run.len(), 1);
    }
}
