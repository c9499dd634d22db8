//! The data subject's state as decisions see it: consent per purpose, consent to the use of
//! communications data per purpose (kept apart: a marketing opt-in is not it), suspension of
//! use and of third-party provision, and a request for deletion (§7).
//!
//! Decisions read it through [`SubjectStates`]; [`InMemorySubjects`] is the implementation for
//! the demo and tests. The persistent registry (SQLite, PostgreSQL) reaches decisions through
//! `registry::SubjectCache` (the sidecar) and `registry::Preloaded` (`pdgate check`), which
//! implement the same trait.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

/// What one data subject has consented to or asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectState {
    /// Purposes consented to; consent to a parent purpose covers its children.
    #[serde(default)]
    pub consent: BTreeSet<String>,
    /// Purposes for which communications data (§5) may be used; recorded apart from `consent`.
    #[serde(default)]
    pub comms_consent: BTreeSet<String>,
    /// The subject asked to stop using their data.
    #[serde(default)]
    pub use_suspended: bool,
    /// The subject asked to stop providing their data to third parties.
    #[serde(default)]
    pub provision_suspended: bool,
    /// The subject asked for their data to be deleted: until it is, the data serves only their
    /// requests and what the law requires to be kept.
    #[serde(default)]
    pub deletion_requested: bool,
}

impl SubjectState {
    /// Whether `consents` holds the purpose or one of its ancestors (`chain`, nearest first).
    pub(crate) fn covers<S: AsRef<str>>(consents: &BTreeSet<String>, chain: &[S]) -> bool {
        chain.iter().any(|p| consents.contains(p.as_ref()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectStateError {
    #[error("subject state store unavailable: {0}")]
    Unavailable(String),
}

/// Where decisions read subject state. `Ok(None)` is a subject with no record: no consent,
/// nothing suspended.
pub trait SubjectStates: Send + Sync {
    fn state(&self, subject: &str) -> Result<Option<Arc<SubjectState>>, SubjectStateError>;
}

/// Subject state held in memory.
#[derive(Debug, Default)]
pub struct InMemorySubjects {
    states: RwLock<HashMap<String, Arc<SubjectState>>>,
}

impl InMemorySubjects {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, subject: impl Into<String>, state: SubjectState) {
        let mut states = self
            .states
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        states.insert(subject.into(), Arc::new(state));
    }
}

impl FromIterator<(String, SubjectState)> for InMemorySubjects {
    fn from_iter<I: IntoIterator<Item = (String, SubjectState)>>(iter: I) -> Self {
        Self {
            states: RwLock::new(iter.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()),
        }
    }
}

impl SubjectStates for InMemorySubjects {
    fn state(&self, subject: &str) -> Result<Option<Arc<SubjectState>>, SubjectStateError> {
        let states = self
            .states
            .read()
            .map_err(|_| SubjectStateError::Unavailable("in-memory store poisoned".into()))?;
        Ok(states.get(subject).cloned())
    }
}
