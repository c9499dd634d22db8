//! The subject registry: what each data subject has consented to or asked for (§7), kept
//! persistently with the history of every change.
//!
//! The current state of a subject is one row with a `version` that grows by one with every
//! change; each change is one transaction that also appends an [`Event`] (time, actor, source)
//! to the history, so the state and its history never disagree. Two stores implement
//! [`SubjectRegistry`]: [`SqliteRegistry`], a file that is the embedded default, and
//! [`PostgresRegistry`], shared by a fleet of sidecars (it NOTIFYs every change on
//! [`NOTIFY_CHANNEL`]).
//!
//! Purposes stay strings here: the registry does not know the policy, so a consent to a purpose
//! the policy lacks is recorded (and never matches); `pdgate check` warns about it.
//!
//! Decisions are synchronous and read [`SubjectStates`]; [`Preloaded`] bridges the two by
//! reading the states a request needs before it is decided (`pdgate check`), and
//! [`SubjectCache`] is the sidecar's versioned cache, kept current by the store's change feed.

mod cache;
pub mod feed;
mod postgres;
mod sqlite;

pub use cache::{CacheError, ReadStats, SubjectCache, SubjectCacheSettings};
pub use feed::{FleetLink, PolicySignal};
pub use postgres::{NOTIFY_CHANNEL, Notification, PostgresRegistry};
pub use sqlite::SqliteRegistry;

use crate::subjects::{SubjectState, SubjectStateError, SubjectStates};
use serde::{Serialize, Serializer};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest subject id, purpose, actor or source accepted, in bytes: ids are keys, not documents,
/// and a bound keeps a NOTIFY payload (8000 bytes) and log lines small.
pub const MAX_FIELD_LEN: usize = 256;

/// Where per-subject state is kept. Implementations are shared across tasks (`Arc<dyn _>`): the
/// sidecar picks the store at run time from its configuration.
#[async_trait::async_trait]
pub trait SubjectRegistry: Send + Sync + fmt::Debug {
    /// The subject's current state and version; `None` for a subject never changed (no
    /// consent, nothing suspended).
    async fn get(&self, subject: &str) -> Result<Option<SubjectRecord>, RegistryError>;

    /// Applies one change and records it in the history, in one transaction; returns the state
    /// it produced. Concurrent changes to one subject are serialised, each gets its own version.
    /// Every valid change is recorded, even one that changes nothing (a consent given again is
    /// still the privacy office's act, and the history must show it).
    async fn apply(&self, change: &Change) -> Result<SubjectRecord, RegistryError>;

    /// Every change to the subject, oldest first (by version); empty for an unknown subject.
    async fn history(&self, subject: &str) -> Result<Vec<Event>, RegistryError>;

    /// Closes the store's connections, waiting for those in use. For SQLite this also folds the
    /// write-ahead log back into the file.
    async fn close(&self);
}

/// A subject's current state as stored, with its version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SubjectRecord {
    /// What decisions read, the deletion request (§7) included.
    pub state: SubjectState,
    /// 1 after the first change, +1 with each change after it. A cache holding an older
    /// version holds a stale state.
    pub version: u64,
}

/// One change requested for one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub subject: String,
    pub action: Action,
    /// Who made the change (a person of the privacy office, a service); required.
    pub actor: String,
    /// Where the change comes from, e.g. the privacy office's request id.
    pub source: Option<String>,
}

/// What a change does. Serialised with the tag `change` (`{"change": "consent", "purpose":
/// "marketing", "communications": false}`); the same names are stored in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Action {
    /// Opt in to a purpose; with `communications`, to the use of communications data for it
    /// (§5), which is recorded apart from ordinary consent.
    Consent {
        purpose: String,
        communications: bool,
    },
    /// Withdraw the consent to exactly this purpose (of the same kind). A consent to a parent
    /// purpose still covers it: the registry does not know the purpose tree.
    Withdraw {
        purpose: String,
        communications: bool,
    },
    SuspendUse,
    ResumeUse,
    SuspendProvision,
    ResumeProvision,
    RequestDeletion,
}

/// One entry of a subject's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub subject: String,
    /// The version this change produced.
    pub version: u64,
    /// When the store recorded it (its own clock; the order is the version's).
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    pub actor: String,
    pub source: Option<String>,
    #[serde(flatten)]
    pub action: Action,
}

/// A change or a subject id that the registry refuses; every problem is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidChange {
    pub problems: Vec<Problem>,
}

/// One problem of an [`InvalidChange`]: the field (`subject`, `purpose`, `actor`, `source`)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The change or subject id is malformed: the caller's input, not the store. The message
    /// names each field at fault (`subject: \`a b\` contains whitespace`).
    #[error("{0}")]
    Invalid(#[from] InvalidChange),
    /// The database URL cannot be parsed: the caller's input, not the store.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    #[error("cannot open the subject registry {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot bring the schema of the subject registry {location} up to date: {source}")]
    Migrate {
        location: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("subject registry {location} unavailable: {source}")]
    Unavailable {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    /// A stored row that this version cannot read (a newer schema, or edited by hand).
    #[error("subject registry {location} holds a record it cannot read: {detail}")]
    Corrupt { location: String, detail: String },
}

impl RegistryError {
    /// Whether the error is the caller's input (exit 2, `INVALID_ARGUMENT`) rather than the
    /// store's (exit 1, `UNAVAILABLE`).
    pub fn is_input(&self) -> bool {
        matches!(self, Self::Invalid(_) | Self::InvalidUrl(_))
    }
}

impl Action {
    /// The name stored in the history's `change` column.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Consent { .. } => "consent",
            Self::Withdraw { .. } => "withdraw",
            Self::SuspendUse => "suspend_use",
            Self::ResumeUse => "resume_use",
            Self::SuspendProvision => "suspend_provision",
            Self::ResumeProvision => "resume_provision",
            Self::RequestDeletion => "request_deletion",
        }
    }

    /// The purpose and kind of a consent or withdrawal.
    pub fn purpose(&self) -> Option<(&str, bool)> {
        match self {
            Self::Consent {
                purpose,
                communications,
            }
            | Self::Withdraw {
                purpose,
                communications,
            } => Some((purpose, *communications)),
            _ => None,
        }
    }

    /// Rebuilds an action from a history row; `None` for a row this version does not know.
    pub fn from_row(change: &str, purpose: Option<String>, communications: bool) -> Option<Self> {
        Some(match (change, purpose) {
            ("consent", Some(purpose)) => Self::Consent {
                purpose,
                communications,
            },
            ("withdraw", Some(purpose)) => Self::Withdraw {
                purpose,
                communications,
            },
            ("suspend_use", None) => Self::SuspendUse,
            ("resume_use", None) => Self::ResumeUse,
            ("suspend_provision", None) => Self::SuspendProvision,
            ("resume_provision", None) => Self::ResumeProvision,
            ("request_deletion", None) => Self::RequestDeletion,
            _ => return None,
        })
    }
}

impl fmt::Display for Action {
    /// How the CLI names a change: `consent to \`marketing\``.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let comms = |c: bool| if c { "communications data for " } else { "" };
        match self {
            Self::Consent {
                purpose,
                communications,
            } => write!(f, "consent to {}`{purpose}`", comms(*communications)),
            Self::Withdraw {
                purpose,
                communications,
            } => write!(
                f,
                "withdrawal of the consent to {}`{purpose}`",
                comms(*communications)
            ),
            Self::SuspendUse => f.write_str("suspension of use"),
            Self::ResumeUse => f.write_str("end of the suspension of use"),
            Self::SuspendProvision => f.write_str("suspension of third-party provision"),
            Self::ResumeProvision => f.write_str("end of the suspension of third-party provision"),
            Self::RequestDeletion => f.write_str("deletion request"),
        }
    }
}

impl Change {
    /// Checks every field; all problems are reported at once.
    pub fn validate(&self) -> Result<(), InvalidChange> {
        let mut problems = Vec::new();
        check_id("subject", &self.subject, &mut problems);
        if let Some((purpose, _)) = self.action.purpose() {
            check_id("purpose", purpose, &mut problems);
        }
        check_text("actor", &self.actor, &mut problems);
        if let Some(source) = &self.source {
            check_text("source", source, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidChange { problems })
        }
    }
}

/// Checks a subject id as a key of the registry.
pub fn validate_subject(subject: &str) -> Result<(), InvalidChange> {
    let mut problems = Vec::new();
    check_id("subject", subject, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(InvalidChange { problems })
    }
}

/// Subject ids and purposes: non-empty, no whitespace (a padded id would be a second subject)
/// and no commas (`x-data-subject` and `x-purpose` split on them, so such an id could never be
/// named in a call).
fn check_id(field: &'static str, value: &str, problems: &mut Vec<Problem>) {
    let mut problem = |message: String| problems.push(Problem { field, message });
    if value.is_empty() {
        problem("must not be empty".into());
    } else if value.len() > MAX_FIELD_LEN {
        problem(format!(
            "is {} bytes long; at most {MAX_FIELD_LEN}",
            value.len()
        ));
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        problem(format!("`{}` contains whitespace", value.escape_debug()));
    } else if value.contains(',') {
        problem(format!(
            "`{value}` contains a comma (x-data-subject and x-purpose split on commas)"
        ));
    }
}

/// Actor and source: free text for people, but non-blank, single-line and bounded, because
/// they are printed in histories and reports.
fn check_text(field: &'static str, value: &str, problems: &mut Vec<Problem>) {
    let mut problem = |message: String| problems.push(Problem { field, message });
    if value.trim().is_empty() {
        problem("must not be empty".into());
    } else if value.len() > MAX_FIELD_LEN {
        problem(format!(
            "is {} bytes long; at most {MAX_FIELD_LEN}",
            value.len()
        ));
    } else if value.chars().any(char::is_control) {
        problem(format!(
            "`{}` contains a control character",
            value.escape_debug()
        ));
    }
}

/// Assembles a record from the rows of a subject joined with its consents (one row per
/// consent, or one row with no consent). `consent` is `(communications, purpose)`.
struct RecordBuilder {
    record: SubjectRecord,
}

impl RecordBuilder {
    fn new(version: u64, use_suspended: bool, provision_suspended: bool, deletion: bool) -> Self {
        Self {
            record: SubjectRecord {
                state: SubjectState {
                    use_suspended,
                    provision_suspended,
                    deletion_requested: deletion,
                    ..SubjectState::default()
                },
                version,
            },
        }
    }

    fn consent(&mut self, communications: bool, purpose: String) {
        let state = &mut self.record.state;
        if communications {
            state.comms_consent.insert(purpose);
        } else {
            state.consent.insert(purpose);
        }
    }
}

/// One history row as both stores select it: version, time in µs, actor, source, change,
/// purpose, communications.
pub(crate) type EventRow = (
    i64,
    i64,
    String,
    Option<String>,
    String,
    Option<String>,
    bool,
);

/// A history row of `subject` as an [`Event`]; a row pdgate did not write is `Corrupt`.
pub(crate) fn event_from_row(
    location: &str,
    subject: &str,
    (stored_version, at_us, actor, source, change, purpose, communications): EventRow,
) -> Result<Event, RegistryError> {
    let action = Action::from_row(&change, purpose, communications).ok_or_else(|| {
        RegistryError::Corrupt {
            location: location.to_owned(),
            detail: format!("unknown change `{change}` in the history of `{subject}`"),
        }
    })?;
    Ok(Event {
        subject: subject.to_owned(),
        version: version(location, stored_version)?,
        at: event_time(location, at_us)?,
        actor,
        source,
        action,
    })
}

/// A stored version (a positive integer) as `u64`.
fn version(location: &str, stored: i64) -> Result<u64, RegistryError> {
    u64::try_from(stored)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| RegistryError::Corrupt {
            location: location.to_owned(),
            detail: format!("version {stored} is not positive"),
        })
}

fn event_time(location: &str, at_us: i64) -> Result<SystemTime, RegistryError> {
    u64::try_from(at_us)
        .ok()
        .and_then(|us| UNIX_EPOCH.checked_add(Duration::from_micros(us)))
        .ok_or_else(|| RegistryError::Corrupt {
            location: location.to_owned(),
            detail: format!("time {at_us} µs is before 1970"),
        })
}

/// Microseconds since the Unix epoch: how SQLite stores times (one integer, exact, ordered).
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn ser_time<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*at))
}

/// Subject states read from a registry ahead of one decision: decisions are synchronous and
/// read [`SubjectStates`], the registry is asynchronous. A subject whose state could not be
/// read answers `Err` (denied `SUBJECT_STATE_UNAVAILABLE`), and so does a subject that was not
/// loaded: nothing here can turn a failure into an allow.
#[derive(Debug, Default)]
pub struct Preloaded {
    states: HashMap<String, Result<Option<Arc<SubjectState>>, SubjectStateError>>,
    /// Set when a decision asked for a state: tells whether the store mattered to it.
    consulted: AtomicBool,
}

impl Preloaded {
    /// Reads each subject's state from `registry`, one after the other.
    pub async fn load(registry: &dyn SubjectRegistry, subjects: &[String]) -> Self {
        let mut loaded = Self::default();
        for subject in subjects {
            if loaded.states.contains_key(subject) {
                continue;
            }
            let state = registry.get(subject).await;
            loaded.insert(subject.clone(), state);
        }
        loaded
    }

    /// Every subject answers `Err(why)`: the store could not be opened.
    pub fn unavailable(subjects: &[String], why: &str) -> Self {
        Self {
            states: subjects
                .iter()
                .map(|s| {
                    (
                        s.clone(),
                        Err(SubjectStateError::Unavailable(why.to_owned())),
                    )
                })
                .collect(),
            consulted: AtomicBool::new(false),
        }
    }

    /// Every subject has no record: a registry that does not exist yet.
    pub fn absent(subjects: &[String]) -> Self {
        Self {
            states: subjects.iter().map(|s| (s.clone(), Ok(None))).collect(),
            consulted: AtomicBool::new(false),
        }
    }

    /// Records the outcome of reading one subject.
    pub fn insert(&mut self, subject: String, read: Result<Option<SubjectRecord>, RegistryError>) {
        let state = read
            .map(|r| r.map(|r| Arc::new(r.state)))
            .map_err(|e| SubjectStateError::Unavailable(e.to_string()));
        self.states.insert(subject, state);
    }

    /// The subjects whose state was read, with it.
    pub fn states(&self) -> impl Iterator<Item = (&str, &SubjectState)> {
        self.states
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_ref().ok()?.as_deref()?)))
    }

    /// The subjects whose state could not be read, with why.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &SubjectStateError)> {
        self.states
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_ref().err()?)))
    }

    /// Whether a decision asked for any subject's state.
    pub fn consulted(&self) -> bool {
        self.consulted.load(Ordering::Relaxed)
    }
}

impl SubjectStates for Preloaded {
    fn state(&self, subject: &str) -> Result<Option<Arc<SubjectState>>, SubjectStateError> {
        self.consulted.store(true, Ordering::Relaxed);
        match self.states.get(subject) {
            Some(state) => state.clone(),
            None => Err(SubjectStateError::Unavailable(format!(
                "the state of `{subject}` was not loaded"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(subject: &str, action: Action, actor: &str) -> Change {
        Change {
            subject: subject.into(),
            action,
            actor: actor.into(),
            source: None,
        }
    }

    #[test]
    fn every_problem_is_named_with_its_field() {
        let bad = Change {
            source: Some("  ".into()),
            ..change(
                "cust 1",
                Action::Consent {
                    purpose: "a,b".into(),
                    communications: false,
                },
                "",
            )
        };
        let fields: Vec<&str> = bad
            .validate()
            .unwrap_err()
            .problems
            .iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(fields, ["subject", "purpose", "actor", "source"]);
        assert!(validate_subject("").is_err());
        assert!(validate_subject("cust-1,cust-2").is_err());
        assert!(validate_subject(&"x".repeat(MAX_FIELD_LEN + 1)).is_err());
        assert!(validate_subject("cust-1").is_ok());
        assert!(
            change("cust-1", Action::SuspendUse, "Alice Smith")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn history_rows_round_trip() {
        for action in [
            Action::Consent {
                purpose: "marketing".into(),
                communications: true,
            },
            Action::Withdraw {
                purpose: "marketing".into(),
                communications: false,
            },
            Action::SuspendUse,
            Action::ResumeUse,
            Action::SuspendProvision,
            Action::ResumeProvision,
            Action::RequestDeletion,
        ] {
            let (purpose, comms) = action.purpose().unzip();
            let back = Action::from_row(
                action.name(),
                purpose.map(str::to_owned),
                comms.unwrap_or(false),
            );
            assert_eq!(back.as_ref(), Some(&action));
        }
        assert_eq!(Action::from_row("erase_everything", None, false), None);
        assert_eq!(Action::from_row("consent", None, false), None);
    }

    #[test]
    fn a_subject_not_loaded_is_unavailable_never_empty() {
        let loaded = Preloaded::absent(&["cust-1".into()]);
        assert!(!loaded.consulted());
        assert_eq!(loaded.state("cust-1"), Ok(None));
        assert!(loaded.state("cust-2").is_err());
        assert!(loaded.consulted());
        let down = Preloaded::unavailable(&["cust-1".into()], "down");
        assert!(down.state("cust-1").is_err());
        assert_eq!(down.failures().count(), 1);
    }
}
