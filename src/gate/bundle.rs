//! A candidate policy as one unit: the policy files and the policy's own tests. Whatever
//! brings a new policy (the file watch, `PolicyAdmin` Apply, a rollback, a shadow) hands over a
//! [`Bundle`]; [`check`] compiles it and runs its tests, and only a checked bundle can become
//! active.

use crate::decision::fixtures::{self, FixtureError, FixtureFile};
use crate::policy::{PolicySource, PolicyVersion, Problem, Problems, Snapshot, compile};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The directory of the policy tests, inside a policy directory.
pub const TESTS_DIR: &str = "tests";

/// One policy test file (`tests/NAME.yaml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFile {
    /// A plain file name ending in `.yaml` or `.yml` (no directory).
    pub name: String,
    pub content: String,
}

/// A whole policy: its files and its tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub source: PolicySource,
    /// In name order.
    pub tests: Vec<TestFile>,
}

/// Why a bundle was not accepted. Every variant can list its problems with their place
/// ([`CheckError::problems`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("invalid policy: {0}")]
    Invalid(Problems),
    #[error("{}", describe_tests(.failures, *.cases))]
    TestsFailed {
        /// Each failed case, as a problem of its test file.
        failures: Vec<Problem>,
        cases: usize,
    },
    #[error("policy tests cannot be run: {0}")]
    Tests(#[from] FixtureError),
    #[error("test file name `{0}` is not allowed: a plain file name ending in `.yaml` or `.yml`")]
    TestName(String),
    /// A policy that nothing checks could grant anything: every bundle carries at least one
    /// test case (there is no override; the first policy is written with its tests).
    #[error(
        "the bundle has no policy test cases: add `{TESTS_DIR}/*.yaml` with at least one case (every bundle is checked by its tests before it is used)"
    )]
    NoTests,
}

fn describe_tests(failures: &[Problem], cases: usize) -> String {
    let mut text = format!(
        "policy tests failed: {} of {cases} case{} failed",
        failures.len(),
        if cases == 1 { "" } else { "s" }
    );
    for f in failures {
        text.push_str("\n  ");
        text.push_str(&f.to_string());
    }
    text
}

impl CheckError {
    /// Every problem, with its file (and line when known), for the API and the CLI.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Invalid(problems) => problems.0.clone(),
            Self::TestsFailed { failures, .. } => failures.clone(),
            Self::Tests(FixtureError::Parse {
                path,
                line,
                message,
            }) => vec![Problem {
                file: test_location(path),
                line: *line,
                message: message.clone(),
            }],
            Self::Tests(FixtureError::Overlay {
                path,
                case,
                problems,
            }) => problems
                .0
                .iter()
                .map(|p| {
                    Problem::in_file(
                        &test_location(path),
                        format!("case `{case}`: `extra_rules` make the policy invalid: {p}"),
                    )
                })
                .collect(),
            Self::Tests(e @ FixtureError::Read { path, .. }) => {
                vec![Problem::in_file(&test_location(path), e.to_string())]
            }
            Self::NoTests => vec![Problem::in_file(&format!("{TESTS_DIR}/"), self.to_string())],
            Self::TestName(name) => vec![Problem::in_file(
                &format!("{TESTS_DIR}/{name}"),
                "not a plain file name ending in `.yaml` or `.yml`",
            )],
        }
    }
}

/// `tests/NAME` for a test file path.
fn test_location(path: &Path) -> String {
    match path.file_name() {
        Some(name) => format!("{TESTS_DIR}/{}", name.to_string_lossy()),
        None => path.display().to_string(),
    }
}

/// A bundle that compiled and passed its tests.
#[derive(Debug, Clone)]
pub struct Checked {
    pub snapshot: Arc<Snapshot>,
    /// Test cases run (at least one: a bundle without any is refused).
    pub cases: usize,
}

impl Bundle {
    /// Reads a policy directory: the files (as [`PolicySource::read`]) and `DIR/tests/*.yaml`.
    /// A missing `tests` directory is a bundle without tests.
    pub fn read_dir(dir: &Path, routes: Option<&Path>) -> Result<Self, Vec<Problem>> {
        let source = PolicySource::read(dir, routes)?;
        let tests = read_tests(&dir.join(TESTS_DIR))?;
        Ok(Self { source, tests })
    }

    /// The version it would have: SHA-256 of the policy files (the tests are not part of it:
    /// they do not change a decision). Whether a bundle is new to the lifecycle is not a
    /// question of its version: a change of its tests alone is checked too (the manager
    /// compares whole bundles).
    pub fn version(&self) -> PolicyVersion {
        PolicyVersion(self.source.digest())
    }

    /// Whether `other` is the same bundle to the lifecycle: the same policy (version) and the
    /// same tests, whatever order they were read in.
    pub fn same_as(&self, other: &Self) -> bool {
        fn tests(b: &Bundle) -> Vec<(&str, &str)> {
            let mut t: Vec<(&str, &str)> = b
                .tests
                .iter()
                .map(|t| (t.name.as_str(), t.content.as_str()))
                .collect();
            t.sort_unstable();
            t
        }
        self.version() == other.version() && tests(self) == tests(other)
    }
}

/// The `*.yaml` and `*.yml` files of `dir`, in name order; none when `dir` does not exist.
pub fn read_tests(dir: &Path) -> Result<Vec<TestFile>, Vec<Problem>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(vec![Problem::in_file(
                &dir.display().to_string(),
                format!("cannot be read: {e}"),
            )]);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_test_name(&p.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    paths.sort();
    let mut problems = Vec::new();
    let mut tests = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(content) => tests.push(TestFile {
                name: path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                content,
            }),
            Err(e) => problems.push(Problem::in_file(
                &path.display().to_string(),
                format!("cannot be read: {e}"),
            )),
        }
    }
    if problems.is_empty() {
        Ok(tests)
    } else {
        Err(problems)
    }
}

/// A test file name a bundle may carry: a plain name (it is written into `tests/`, so no path
/// may escape it) ending in `.yaml` or `.yml`.
pub fn is_test_name(name: &str) -> bool {
    (name.ends_with(".yaml") || name.ends_with(".yml"))
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= 255
}

/// Compiles `bundle` and runs its tests against the result. Every compile problem is reported
/// at once; every failed case too.
pub async fn check(bundle: &Bundle) -> Result<Checked, CheckError> {
    let mut files: Vec<(PathBuf, FixtureFile)> = Vec::with_capacity(bundle.tests.len());
    for test in &bundle.tests {
        if !is_test_name(&test.name) {
            return Err(CheckError::TestName(test.name.clone()));
        }
        let path = Path::new(TESTS_DIR).join(&test.name);
        let file = fixtures::parse(&path, &test.content)?;
        files.push((path, file));
    }
    // The policy and every overlay of its tests (the policy plus a case's `extra_rules`) are
    // independent compilations: run them in parallel. Each is a whole compile, so at 10k rows
    // and 5 overlays this is most of a reload's time (see benches/reload.rs).
    let base = tokio::spawn(compile(bundle.source.clone()));
    let sets = fixtures::overlay_sets(&files);
    let spawned: Vec<_> = sets
        .iter()
        .map(|(rows, _, _)| tokio::spawn(compile(fixtures::overlay_source(&bundle.source, rows))))
        .collect();
    let snapshot = match joined(base.await) {
        Ok(snapshot) => Arc::new(snapshot),
        Err(problems) => {
            // The overlays of an invalid policy are of no use: stop them.
            for task in &spawned {
                task.abort();
            }
            return Err(CheckError::Invalid(problems));
        }
    };
    let mut overlays = fixtures::Overlays::new();
    for ((rows, path, case), task) in sets.into_iter().zip(spawned) {
        let compiled = joined(task.await).map_err(|problems| {
            CheckError::Tests(FixtureError::Overlay {
                path,
                case,
                problems,
            })
        })?;
        overlays.insert(rows, Arc::new(compiled));
    }
    if files.is_empty() {
        return Err(CheckError::NoTests);
    }
    let report = fixtures::run_with(&snapshot, &files, overlays).await?;
    if report.cases == 0 {
        return Err(CheckError::NoTests);
    }
    if !report.failures.is_empty() {
        return Err(CheckError::TestsFailed {
            failures: report
                .failures
                .iter()
                .map(|f| Problem {
                    file: format!("{TESTS_DIR}/{}", f.file),
                    line: bundle
                        .tests
                        .iter()
                        .find(|t| t.name == f.file)
                        .and_then(|t| line_of_case(&t.content, &f.case)),
                    message: format!("case `{}`: expected {}, got {}", f.case, f.expected, f.got),
                })
                .collect(),
            cases: report.cases,
        });
    }
    Ok(Checked {
        snapshot,
        cases: report.cases,
    })
}

/// The line of a case's `name:` in a test file, so that a failure points at its case.
fn line_of_case(content: &str, case: &str) -> Option<usize> {
    content
        .lines()
        .position(|line| {
            let line = line.trim_start().trim_start_matches("- ").trim_start();
            line.strip_prefix("name:")
                .is_some_and(|rest| rest.trim().trim_matches(|c| c == '"' || c == '\'') == case)
        })
        .map(|i| i + 1)
}

/// A spawned compilation's result; one that did not finish (the runtime is shutting down) is a
/// problem like any other, so the candidate is rejected, never half-checked.
fn joined(
    result: Result<Result<Snapshot, Problems>, tokio::task::JoinError>,
) -> Result<Snapshot, Problems> {
    result.unwrap_or_else(|e| {
        Err(Problems(vec![Problem::in_file(
            "policy",
            format!("compilation did not finish: {e}"),
        )]))
    })
}
