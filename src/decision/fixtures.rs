//! Policy tests as data: `policy/tests/*.yaml`, each case a request, the subjects' state and
//! the expected decision with its reason codes. One runner serves `pdgate policy test`,
//! `cargo test` and every reload (`gate::bundle::check`), which refuses a policy whose tests
//! fail.
//!
//! ```yaml
//! cases:
//!   - name: marketing email without consent
//!     clause: "§1(2)"
//!     request: { caller: marketing-service, purpose: marketing.email, action: read,
//!                categories: [customer.contact.email], subjects: [cust-1] }
//!     subjects:
//!       cust-1: { consent: [], use_suspended: false }
//!     expect: { decision: deny, reasons: [CONSENT_REQUIRED] }
//! ```
//!
//! `extra_rules` (casbin rows appended to policy.csv for that case) shows what the built-in
//! limits do when a grant is added by mistake. A subject with `unavailable: true` behaves like
//! a store that cannot be read.

use crate::decision::{DecisionIds, ReasonCode, Request, decide_fresh};
use crate::policy::{PolicyRows, PolicySource, Problems, Snapshot, compile};
use crate::subjects::{SubjectState, SubjectStateError, SubjectStates};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FixtureFile {
    #[serde(default)]
    pub description: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// The clause of the privacy policy this case illustrates.
    #[serde(default)]
    pub clause: Option<String>,
    pub request: Request,
    #[serde(default)]
    pub subjects: BTreeMap<String, FixtureSubject>,
    #[serde(default)]
    pub extra_rules: Vec<String>,
    pub expect: Expect,
}

/// A subject's state in a case: the fields of [`SubjectState`], plus `unavailable`.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FixtureSubject {
    #[serde(default)]
    pub consent: Vec<String>,
    #[serde(default)]
    pub comms_consent: Vec<String>,
    #[serde(default)]
    pub use_suspended: bool,
    #[serde(default)]
    pub provision_suspended: bool,
    #[serde(default)]
    pub deletion_requested: bool,
    /// The store fails when asked for this subject.
    #[serde(default)]
    pub unavailable: bool,
}

impl FixtureSubject {
    /// The state this subject gives a decision (`unavailable` aside).
    pub fn state(&self) -> SubjectState {
        SubjectState {
            consent: self.consent.iter().cloned().collect(),
            comms_consent: self.comms_consent.iter().cloned().collect(),
            use_suspended: self.use_suspended,
            provision_suspended: self.provision_suspended,
            deletion_requested: self.deletion_requested,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Expected {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub decision: Expected,
    /// Reason codes, compared as a set (order does not matter).
    #[serde(default)]
    pub reasons: Vec<String>,
    /// For a request with `minimizable` categories: those the decision leaves out, compared
    /// as a set. Absent: not checked.
    #[serde(default)]
    pub minimized: Option<Vec<String>>,
}

/// The JSON Schema of a policy test file (`tests/*.yaml`; `pdgate policy schema tests`).
pub fn schema() -> schemars::Schema {
    schemars::schema_for!(FixtureFile)
}

/// Why the tests could not be run at all (as opposed to a case that failed).
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read policy tests in `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}{}: {message}", .line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{path}: case `{case}`: `extra_rules` make the policy invalid: {problems}")]
    Overlay {
        path: PathBuf,
        case: String,
        problems: Problems,
    },
}

/// One case that did not decide as expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub file: String,
    pub case: String,
    pub expected: String,
    pub got: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: case `{}`: expected {}, got {}",
            self.file, self.case, self.expected, self.got
        )
    }
}

/// One case that ran, passed or not (for per-case output such as JUnit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub file: String,
    pub case: String,
    pub clause: Option<String>,
    pub passed: bool,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub cases: usize,
    pub failures: Vec<Failure>,
    /// Every case run, in file and case order.
    pub outcomes: Vec<Outcome>,
    /// Lines of policy.csv among the matched rules of a case that passed (cases with
    /// `extra_rules` run against another policy and add none).
    pub rows_matched: Vec<usize>,
    /// Reason codes that some case expects.
    pub codes_covered: Vec<ReasonCode>,
    /// Clauses named by some case.
    pub clauses_covered: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.cases > 0
    }
}

/// Compiled overlays: the policy with a case's `extra_rules` appended, keyed by those rows.
pub type Overlays = HashMap<Vec<String>, Arc<Snapshot>>;

/// Each distinct `extra_rules` of `files`, with the file and case that first uses it (to name
/// them when the overlay does not compile).
pub fn overlay_sets(files: &[(PathBuf, FixtureFile)]) -> Vec<(Vec<String>, PathBuf, String)> {
    let mut sets: Vec<(Vec<String>, PathBuf, String)> = Vec::new();
    for (path, file) in files {
        for case in &file.cases {
            if !case.extra_rules.is_empty() && !sets.iter().any(|(r, _, _)| *r == case.extra_rules)
            {
                sets.push((case.extra_rules.clone(), path.clone(), case.name.clone()));
            }
        }
    }
    sets
}

/// `source` with `rows` appended to its policy.csv.
pub fn overlay_source(source: &PolicySource, rows: &[String]) -> PolicySource {
    let mut source = source.clone();
    PolicyRows::push_text(&mut source.policy, rows);
    source
}

/// Reads every `*.yaml` in `dir`, in name order.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, FixtureFile)>, FixtureError> {
    let read_err = |source| FixtureError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| FixtureError::Read {
                path: path.clone(),
                source,
            })?;
            let file = parse(&path, &text)?;
            Ok((path, file))
        })
        .collect()
}

/// Parses one test file's text (`path` names it in errors): the YAML, and every expected
/// reason code must be a known one.
pub fn parse(path: &Path, text: &str) -> Result<FixtureFile, FixtureError> {
    let file: FixtureFile = serde_yaml::from_str(text).map_err(|e| FixtureError::Parse {
        path: path.to_path_buf(),
        line: e
            .location()
            .map(|l| crate::policy::yaml_error_line(text, l.line())),
        message: e.to_string(),
    })?;
    for case in &file.cases {
        for code in &case.expect.reasons {
            if ReasonCode::parse(code).is_none() {
                return Err(FixtureError::Parse {
                    path: path.to_path_buf(),
                    line: None,
                    message: format!("case `{}`: unknown reason code `{code}`", case.name),
                });
            }
        }
    }
    Ok(file)
}

/// Runs the cases of `files` against `snapshot` (uncached: the policy is under test, not the
/// cache).
pub async fn run(
    snapshot: &Arc<Snapshot>,
    files: &[(PathBuf, FixtureFile)],
) -> Result<Report, FixtureError> {
    run_with(snapshot, files, HashMap::new()).await
}

/// Like [`run`], with some overlays (the policy plus a case's `extra_rules`, keyed by those
/// rows) already compiled: a reload compiles them in parallel with the policy itself. Any
/// overlay not given is compiled here.
pub async fn run_with(
    snapshot: &Arc<Snapshot>,
    files: &[(PathBuf, FixtureFile)],
    mut overlays: Overlays,
) -> Result<Report, FixtureError> {
    let ids = DecisionIds::default();
    let mut report = Report {
        files: files.len(),
        ..Report::default()
    };
    for (path, file) in files {
        let file_name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        for case in &file.cases {
            report.cases += 1;
            let policy =
                if case.extra_rules.is_empty() {
                    snapshot.clone()
                } else if let Some(p) = overlays.get(&case.extra_rules) {
                    p.clone()
                } else {
                    let mut source: PolicySource = snapshot.source().clone();
                    PolicyRows::push_text(&mut source.policy, &case.extra_rules);
                    let compiled = Arc::new(compile(source).await.map_err(|problems| {
                        FixtureError::Overlay {
                            path: path.clone(),
                            case: case.name.clone(),
                            problems,
                        }
                    })?);
                    overlays.insert(case.extra_rules.clone(), compiled.clone());
                    compiled
                };
            let store = FixtureStore(&case.subjects);
            let decision = decide_fresh(Some(&policy), &case.request, &store, ids.next());
            let mut got: Vec<&str> = decision.reasons.iter().map(|r| r.code.as_str()).collect();
            got.sort_unstable();
            got.dedup();
            let mut want: Vec<&str> = case.expect.reasons.iter().map(String::as_str).collect();
            want.sort_unstable();
            want.dedup();
            let got_decision = if decision.allowed {
                Expected::Allow
            } else {
                Expected::Deny
            };
            let minimized_ok = case.expect.minimized.as_ref().is_none_or(|expected| {
                let set =
                    |v: &[String]| v.iter().cloned().collect::<std::collections::BTreeSet<_>>();
                set(expected) == set(&decision.minimized)
            });
            let passed = got_decision == case.expect.decision && got == want && minimized_ok;
            report.outcomes.push(Outcome {
                file: file_name.clone(),
                case: case.name.clone(),
                clause: case.clause.clone(),
                passed,
            });
            if passed && case.extra_rules.is_empty() {
                report
                    .rows_matched
                    .extend(decision.matched_rules.iter().map(|r| r.line));
            }
            if !passed {
                let with_minimized = |text: String, minimized: Option<&[String]>| match minimized {
                    Some(m) => format!("{text}, minimized [{}]", m.join(", ")),
                    None => text,
                };
                report.failures.push(Failure {
                    file: file_name.clone(),
                    case: case.name.clone(),
                    expected: with_minimized(
                        describe(case.expect.decision, &want),
                        case.expect.minimized.as_deref(),
                    ),
                    got: with_minimized(
                        describe(got_decision, &got),
                        case.expect
                            .minimized
                            .as_ref()
                            .map(|_| decision.minimized.as_slice()),
                    ),
                });
            }
            report
                .codes_covered
                .extend(want.iter().filter_map(|c| ReasonCode::parse(c)));
            if let Some(clause) = &case.clause {
                report.clauses_covered.push(clause.clone());
            }
        }
    }
    report.codes_covered.sort();
    report.codes_covered.dedup();
    report.clauses_covered.sort();
    report.clauses_covered.dedup();
    report.rows_matched.sort_unstable();
    report.rows_matched.dedup();
    Ok(report)
}

/// The reason codes a policy test can produce: stages 1 to 5 of a decision. The others come
/// from the sidecar (routes, metadata, messages, audit) or from having no policy at all.
pub const DECIDABLE_CODES: [ReasonCode; 19] = [
    ReasonCode::PurposeNotDeclared,
    ReasonCode::PurposeUnknown,
    ReasonCode::CategoryNotDeclared,
    ReasonCode::CategoryUnknown,
    ReasonCode::ActionUnknown,
    ReasonCode::CallerUnknown,
    ReasonCode::RecipientUnknown,
    ReasonCode::PurposeNotRegistered,
    ReasonCode::RecipientNotAllowed,
    ReasonCode::NoGrant,
    ReasonCode::DeniedByRule,
    ReasonCode::SecrecyOfCommunications,
    ReasonCode::IdentifiedDataForResearch,
    ReasonCode::SubjectRequired,
    ReasonCode::ConsentRequired,
    ReasonCode::UseSuspended,
    ReasonCode::ProvisionSuspended,
    ReasonCode::DeletionRequested,
    ReasonCode::SubjectStateUnavailable,
];

/// What the tests exercise of a policy: each grant or deny row of policy.csv (matched by a
/// passing case), each clause the taxonomy names (named by a case: `§2(b)` counts for `§2`
/// too), each reason code a decision can give (expected by a case).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Coverage {
    pub rows: Vec<Covered>,
    pub clauses: Vec<Covered>,
    pub reason_codes: Vec<Covered>,
}

/// One item of [`Coverage`]: a row (`policy.csv:LINE: p, ...`), a clause or a reason code.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Covered {
    pub item: String,
    pub covered: bool,
}

impl Coverage {
    pub fn of(snapshot: &Snapshot, report: &Report) -> Self {
        let rows = snapshot
            .rows()
            .grants
            .iter()
            .map(|row| Covered {
                item: format!(
                    "policy.csv:{}: p, {}, {}, {}, {}, {}",
                    row.line,
                    row.role,
                    row.purpose,
                    row.category,
                    row.action.as_str(),
                    match row.effect {
                        crate::policy::Effect::Allow => "allow",
                        crate::policy::Effect::Deny => "deny",
                    }
                ),
                covered: report.rows_matched.binary_search(&row.line).is_ok(),
            })
            .collect();
        let mut clauses: Vec<String> = snapshot
            .purposes()
            .iter_names()
            .filter_map(|n| snapshot.purposes().id(n))
            .map(|id| snapshot.purposes().info(id).clause.to_string())
            .chain(
                snapshot
                    .categories()
                    .iter_names()
                    .filter_map(|n| snapshot.categories().id(n))
                    .map(|id| snapshot.categories().info(id).clause.to_string()),
            )
            .chain(snapshot.callers().iter().map(|c| c.clause.to_string()))
            .collect();
        clauses.sort();
        clauses.dedup();
        let clauses = clauses
            .into_iter()
            .map(|clause| Covered {
                covered: report.clauses_covered.iter().any(|named| {
                    named == &clause
                        || (named.starts_with(clause.as_str())
                            && named[clause.len()..].starts_with('('))
                }),
                item: clause,
            })
            .collect();
        let reason_codes = DECIDABLE_CODES
            .iter()
            .map(|code| Covered {
                item: code.as_str().to_owned(),
                covered: report.codes_covered.contains(code),
            })
            .collect();
        Self {
            rows,
            clauses,
            reason_codes,
        }
    }

    /// Percent covered of each kind: (rows, clauses, reason codes). An empty kind is 100.
    pub fn percents(&self) -> (f64, f64, f64) {
        let percent = |items: &[Covered]| {
            if items.is_empty() {
                return 100.0;
            }
            let hit = items.iter().filter(|c| c.covered).count();
            let ratio = hit as f64 / items.len() as f64;
            ratio * 100.0
        };
        (
            percent(&self.rows),
            percent(&self.clauses),
            percent(&self.reason_codes),
        )
    }
}

fn describe(decision: Expected, codes: &[&str]) -> String {
    let d = match decision {
        Expected::Allow => "allow",
        Expected::Deny => "deny",
    };
    if codes.is_empty() {
        d.to_owned()
    } else {
        format!("{d} [{}]", codes.join(", "))
    }
}

struct FixtureStore<'a>(&'a BTreeMap<String, FixtureSubject>);

impl SubjectStates for FixtureStore<'_> {
    fn state(&self, subject: &str) -> Result<Option<Arc<SubjectState>>, SubjectStateError> {
        match self.0.get(subject) {
            Some(s) if s.unavailable => Err(SubjectStateError::Unavailable(
                "marked unavailable by the policy test".into(),
            )),
            Some(s) => Ok(Some(Arc::new(s.state()))),
            None => Ok(None),
        }
    }
}
