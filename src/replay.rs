//! What-if replay: the decisions of an audit log decided again under a candidate policy, and
//! the ones that would flip, grouped so that a reviewer sees what a policy change does before
//! it is applied (`pdgate policy diff --candidate DIR --audit PATH`).
//!
//! Each access or check record becomes a request again: caller, purpose, subjects and recipient
//! as recorded; for a call through the data plane the action and categories come from the
//! *candidate's* route for the recorded method (a changed or removed route is part of what a
//! candidate changes), for a Check from the record. Admin records are skipped, and so are
//! denials that were not policy decisions (`AUDIT_UNAVAILABLE`: the audit could not be written).
//!
//! The audit log holds identifiers, not the subjects' state at the time, so stage 5 needs a
//! stand-in. Two are offered:
//! - [`SubjectBasis::AsRecorded`] (default): a state that reproduces the recorded outcome —
//!   for a recorded allow, or a deny before stage 5, a subject that consented to the purpose
//!   (ordinary and communications consent) and suspended nothing; for a recorded stage-5 deny,
//!   a subject lacking exactly what the reasons name. Flips then come from the policy alone.
//!   Its blind spot: a candidate that *adds* a consent requirement does not flip a recorded
//!   allow (the stand-in consented). The report says so.
//! - [`SubjectBasis::Registry`]: the registry's current state for each subject. Exact for
//!   today's subjects, but a flip may then come from a consent given or withdrawn since.

use crate::audit::{AuditError, AuditRecord, RecordKind, read};
use crate::decision::{DecisionIds, Reason, ReasonCode, Request, decide_fresh};
use crate::policy::Snapshot;
use crate::registry::SubjectRegistry;
use crate::subjects::{InMemorySubjects, SubjectState};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// Where stage 5 of the replay reads the subjects' state.
#[derive(Debug)]
pub enum SubjectBasis<'a> {
    AsRecorded,
    Registry(&'a dyn SubjectRegistry),
}

/// Most flips kept as examples.
pub const MAX_EXAMPLES: usize = 50;

/// The result of a replay.
#[derive(Debug, Default, Serialize)]
pub struct Replay {
    pub candidate_version: String,
    /// Access and check records decided again.
    pub replayed: u64,
    /// Records not decided again: admin actions, and denials that were not policy decisions.
    pub skipped: u64,
    pub flips: u64,
    /// Recorded allow, candidate deny.
    pub allow_to_deny: u64,
    /// Recorded deny, candidate allow: what the candidate newly lets through.
    pub deny_to_allow: u64,
    /// Flips counted per value; a record with two categories counts under each.
    pub by_purpose: BTreeMap<String, u64>,
    pub by_category: BTreeMap<String, u64>,
    pub by_caller: BTreeMap<String, u64>,
    /// The clauses behind each flip: the candidate's reasons for a new deny, the recorded
    /// reasons for a new allow (what no longer holds).
    pub by_clause: BTreeMap<String, u64>,
    /// The first flips, in log order.
    pub examples: Vec<Flip>,
}

/// One decision that would flip.
#[derive(Debug, Clone, Serialize)]
pub struct Flip {
    pub seq: u64,
    pub decision_id: String,
    pub caller: String,
    pub purpose: String,
    pub action: String,
    pub categories: Vec<String>,
    pub subjects: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `allow` or `deny`, as recorded.
    pub recorded: String,
    pub recorded_reasons: Vec<String>,
    pub candidate: String,
    /// `CODE clause` of the candidate's reasons.
    pub candidate_reasons: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("the audit log could not be read: {0}")]
    Reader(String),
    #[error("the subject registry cannot be read: {0}")]
    Registry(#[from] crate::registry::RegistryError),
}

/// Replays every record of the audit log in `dir` matching `filter` under `candidate`.
pub async fn replay(
    dir: &Path,
    filter: &read::Filter,
    candidate: &Snapshot,
    basis: SubjectBasis<'_>,
) -> Result<Replay, ReplayError> {
    // The log is read on a blocking thread in one pass; the records are replayed afterwards so
    // that the registry (async) can be read between them.
    let dir = dir.to_owned();
    let filter = filter.clone();
    let records = tokio::task::spawn_blocking(move || {
        let mut records = Vec::new();
        read::scan(&dir, &filter, |r| {
            records.push(r);
            true
        })
        .map(|()| records)
    })
    .await
    .map_err(|e| ReplayError::Reader(e.to_string()))??;

    let mut replay = Replay {
        candidate_version: candidate.version().to_string(),
        ..Replay::default()
    };
    let ids = DecisionIds::default();
    let mut registry_states: HashMap<String, SubjectState> = HashMap::new();
    for record in records {
        let Some(request) = request_of(&record, candidate) else {
            replay.skipped += 1;
            continue;
        };
        let subjects = match &basis {
            SubjectBasis::AsRecorded => as_recorded(&record),
            SubjectBasis::Registry(registry) => {
                for s in &record.body.subjects {
                    if !registry_states.contains_key(s) {
                        let state = registry.get(s).await?.map(|r| r.state).unwrap_or_default();
                        registry_states.insert(s.clone(), state);
                    }
                }
                record
                    .body
                    .subjects
                    .iter()
                    .filter_map(|s| registry_states.get(s).map(|st| (s.clone(), st.clone())))
                    .collect()
            }
        };
        let (allowed, reasons) = match request {
            Replayed::Decide(request) => {
                let d = decide_fresh(Some(candidate), &request, &subjects, ids.next());
                (d.allowed, d.reasons)
            }
            Replayed::NoRoute => (
                false,
                vec![Reason::new(
                    ReasonCode::RouteUnknown,
                    "§6(5)",
                    "the candidate has no route for the method",
                )],
            ),
        };
        replay.replayed += 1;
        let recorded_allow = record.body.decision == "allow";
        if allowed == recorded_allow {
            continue;
        }
        replay.flips += 1;
        if recorded_allow {
            replay.allow_to_deny += 1;
        } else {
            replay.deny_to_allow += 1;
        }
        let b = &record.body;
        *replay.by_purpose.entry(b.purpose.clone()).or_default() += 1;
        *replay.by_caller.entry(b.caller.clone()).or_default() += 1;
        for c in &b.categories {
            *replay.by_category.entry(c.clone()).or_default() += 1;
        }
        let clauses: BTreeSet<String> = if recorded_allow {
            reasons.iter().map(|r| r.clause.to_string()).collect()
        } else {
            b.reasons.iter().map(|r| r.clause.clone()).collect()
        };
        for clause in clauses {
            *replay.by_clause.entry(clause).or_default() += 1;
        }
        if replay.examples.len() < MAX_EXAMPLES {
            replay.examples.push(Flip {
                seq: record.seq,
                decision_id: b.decision_id.clone(),
                caller: b.caller.clone(),
                purpose: b.purpose.clone(),
                action: b.action.clone(),
                categories: b.categories.clone(),
                subjects: b.subjects.clone(),
                method: b.method.clone(),
                recorded: b.decision.clone(),
                recorded_reasons: b
                    .reasons
                    .iter()
                    .map(|r| format!("{} {}", r.code, r.clause))
                    .collect(),
                candidate: if allowed { "allow" } else { "deny" }.to_owned(),
                candidate_reasons: reasons
                    .iter()
                    .map(|r| format!("{} {}", r.code, r.clause))
                    .collect(),
            });
        }
    }
    Ok(replay)
}

enum Replayed {
    Decide(Request),
    /// A data-plane call to a method the candidate has no route for.
    NoRoute,
}

/// The request a record stands for under `candidate`, or `None` for a record that is not a
/// policy decision.
fn request_of(record: &AuditRecord, candidate: &Snapshot) -> Option<Replayed> {
    let b = &record.body;
    if b.kind == Some(RecordKind::Admin)
        || b.reasons
            .iter()
            .any(|r| r.code == ReasonCode::AuditUnavailable.as_str())
    {
        return None;
    }
    let mut request = Request {
        caller: b.caller.clone(),
        purpose: b.purpose.clone(),
        action: b.action.clone(),
        categories: b.categories.clone(),
        subjects: b.subjects.clone(),
        recipient: b.recipient.clone(),
        // A Check's own `minimizable` (a data-plane call takes its route's, below).
        minimizable: b.minimizable.clone(),
    };
    if let (Some(RecordKind::Access), Some(method)) = (b.kind, &b.method) {
        let Some(route) = candidate.route(method) else {
            return Some(Replayed::NoRoute);
        };
        route.action.as_str().clone_into(&mut request.action);
        request.categories.clone_from(&route.categories);
        request.minimizable.clone_from(&route.minimize);
    }
    Some(Replayed::Decide(request))
}

/// A state for each recorded subject that reproduces the recorded stage-5 outcome (see the
/// module documentation).
fn as_recorded(record: &AuditRecord) -> InMemorySubjects {
    let b = &record.body;
    let has = |code: ReasonCode| b.reasons.iter().any(|r| r.code == code.as_str());
    let consented = !has(ReasonCode::ConsentRequired);
    // A run-time secrecy deny (a purpose outside the §5 lists, without the subject's
    // communications consent) is the only stage-3 deny that depends on the subject.
    let comms_consented = !has(ReasonCode::SecrecyOfCommunications);
    let purpose: BTreeSet<String> = [b.purpose.clone()].into();
    let state = SubjectState {
        consent: if consented {
            purpose.clone()
        } else {
            BTreeSet::new()
        },
        comms_consent: if comms_consented {
            purpose
        } else {
            BTreeSet::new()
        },
        use_suspended: has(ReasonCode::UseSuspended),
        provision_suspended: has(ReasonCode::ProvisionSuspended),
        deletion_requested: has(ReasonCode::DeletionRequested),
    };
    b.subjects
        .iter()
        .map(|s| (s.clone(), state.clone()))
        .collect()
}
