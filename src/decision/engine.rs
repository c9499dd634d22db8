//! The stages of a decision (DESIGN §2). Stages 1–4 and the list of what the subject's state
//! must satisfy depend only on the policy and the request, so they are computed once per
//! [`CacheKey`] ([`evaluate`]) and cached; stage 5 reads the subjects' state on every call
//! ([`finish`]), so nothing subject-dependent is ever cached.
//!
//! Stages 1–4 are evaluated in full once the request's names resolve: a deny lists every rule
//! they find broken, in stage order (a joint user asking for call history hears `NO_GRANT` and
//! `SECRECY_OF_COMMUNICATIONS`). Stage 5 runs only when they all allow, so a caller without a
//! grant learns nothing about a subject.

use super::key::CacheKey;
use super::reason::{Reason, ReasonCode};
use super::{Decision, DecisionId, Request};
use crate::policy::{
    Action, CallerInfo, CallerKind, MatchedRule, MatchingRows, NodeId, SecrecyUse, Snapshot,
};
use crate::subjects::{SubjectState, SubjectStates};
use smallvec::SmallVec;
use std::sync::Arc;

/// The subject-independent result of a request under one policy version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Reasons of stages 1–4; empty means "allowed, if the subjects' state agrees".
    pub reasons: Arc<[Reason]>,
    pub matched_rules: Arc<[MatchedRule]>,
    pub requirements: Requirements,
}

/// What stage 5 must check in each subject's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    /// The purpose and its ancestors, nearest first (consent to any of them counts).
    pub purpose_chain: SmallVec<[Arc<str>; 4]>,
    /// Consent to the purpose is needed; the clause that says so.
    pub consent: Option<Arc<str>>,
    /// Consent to communications data for the purpose is needed; the §5 clause.
    pub comms_consent: Option<Arc<str>>,
    /// A suspension of use stops this request; the §7 clause.
    pub use_suspension: Option<Arc<str>>,
    /// A suspension of third-party provision stops this request; the §7 clause.
    pub provision_suspension: Option<Arc<str>>,
    /// A deletion request stops this request; the §7 clause.
    pub deletion: Option<Arc<str>>,
    /// The purpose needs a named subject even when no state applies.
    pub subject_required: bool,
}

impl Requirements {
    /// Whether the decision depends on whose data it is.
    pub fn subject_dependent(&self) -> bool {
        self.consent.is_some()
            || self.comms_consent.is_some()
            || self.use_suspension.is_some()
            || self.provision_suspension.is_some()
            || self.deletion.is_some()
            || self.subject_required
    }
}

/// Decides `request` under `snapshot` without any cache: the reference the cache is held to.
pub fn decide_fresh(
    snapshot: Option<&Snapshot>,
    request: &Request,
    subjects: &dyn SubjectStates,
    id: DecisionId,
) -> Decision {
    let Some(snapshot) = snapshot else {
        return no_policy(id);
    };
    let key = match resolve(snapshot, request) {
        Ok(key) => key,
        Err(reasons) => return denied_early(snapshot, reasons, id),
    };
    let minimizable = match super::minimize::resolve(snapshot, &request.minimizable) {
        Ok(ids) => ids,
        Err(reasons) => return denied_early(snapshot, reasons, id),
    };
    let outcome = evaluate(snapshot, &key);
    let mut decision = finish(snapshot, &outcome, request, Some(subjects), id, false);
    if decision.allowed {
        decision.minimized =
            super::minimize::minimized(snapshot, &key, &outcome, &minimizable, |k| {
                Arc::new(evaluate(snapshot, &k))
            });
    }
    decision
}

pub(crate) fn no_policy(id: DecisionId) -> Decision {
    Decision {
        decision_id: id,
        allowed: false,
        reasons: vec![Reason::new(
            ReasonCode::PolicyUnavailable,
            "§1",
            "no valid policy is loaded; every call is denied until one is",
        )],
        matched_rules: Arc::from([]),
        policy_version: None,
        cache_hit: false,
        shadow_allowed: None,
        minimized: Vec::new(),
    }
}

pub(crate) fn denied_early(snapshot: &Snapshot, reasons: Vec<Reason>, id: DecisionId) -> Decision {
    Decision {
        decision_id: id,
        allowed: false,
        reasons,
        matched_rules: Arc::from([]),
        policy_version: Some(snapshot.version()),
        cache_hit: false,
        shadow_allowed: None,
        minimized: Vec::new(),
    }
}

/// Stage 1, the part that needs no cache: turns the request's names into the policy's ids.
/// Every unknown or missing name is a reason; a request with any is denied here.
pub(crate) fn resolve(snapshot: &Snapshot, request: &Request) -> Result<CacheKey, Vec<Reason>> {
    let mut reasons = Vec::new();
    let caller = snapshot.caller(&request.caller);
    if caller.is_none() {
        reasons.push(Reason::new(
            ReasonCode::CallerUnknown,
            "§6(5)",
            if request.caller.is_empty() {
                "the caller is not identified".to_owned()
            } else {
                format!("caller `{}` is not a caller of the policy", request.caller)
            },
        ));
    }
    let purpose = if request.purpose.is_empty() {
        reasons.push(Reason::new(
            ReasonCode::PurposeNotDeclared,
            "§1",
            "the call declares no purpose of use",
        ));
        None
    } else {
        let found = snapshot.purposes().id(&request.purpose);
        if found.is_none() {
            reasons.push(Reason::new(
                ReasonCode::PurposeUnknown,
                "§1",
                format!(
                    "purpose `{}` is not a purpose of use of the policy; a new purpose needs the subject's prior consent",
                    request.purpose
                ),
            ));
        }
        found
    };
    let action = Action::parse(&request.action);
    if action.is_none() {
        reasons.push(Reason::new(
            ReasonCode::ActionUnknown,
            "§6(2)",
            format!(
                "action `{}` is unknown; allowed: `read`, `write`, `delete`",
                request.action
            ),
        ));
    }
    let mut categories: SmallVec<[NodeId; 4]> = SmallVec::new();
    if request.categories.is_empty() {
        reasons.push(Reason::new(
            ReasonCode::CategoryNotDeclared,
            "§1",
            "the call names no category of personal data",
        ));
    }
    for name in &request.categories {
        match snapshot.categories().id(name) {
            Some(id) => categories.push(id),
            None => reasons.push(Reason::new(
                ReasonCode::CategoryUnknown,
                "§1",
                format!("category `{name}` is not a category of the policy"),
            )),
        }
    }
    let recipient = match &request.recipient {
        None => None,
        Some(name) => {
            let found = snapshot.caller(name);
            if found.is_none() {
                reasons.push(Reason::new(
                    ReasonCode::RecipientUnknown,
                    "§2, §3",
                    format!("recipient `{name}` is not a company of the policy"),
                ));
            }
            found.map(|c| c.id)
        }
    };
    match (caller, purpose, action) {
        (Some(caller), Some(purpose), Some(action)) if reasons.is_empty() => {
            categories.sort_unstable();
            categories.dedup();
            Ok(CacheKey {
                version: snapshot.version(),
                caller: caller.id,
                purpose,
                action,
                categories,
                recipient,
            })
        }
        _ => Err(reasons),
    }
}

/// Stages 1 (registration, recipient), 2 (grants), 3 (secrecy), 4 (de-identification), and
/// what stage 5 must check. Deterministic in (`snapshot`, `key`): this is what the cache holds.
/// Every stage runs, so a deny names every rule the request breaks, in stage order.
pub fn evaluate(snapshot: &Snapshot, key: &CacheKey) -> Outcome {
    let caller = snapshot.caller_by_id(key.caller);
    let named = key.recipient.map(|r| snapshot.caller_by_id(r));
    // A joint user or a third party that calls receives the data itself (DESIGN §1): a company
    // it names instead is refused below, and never counts as where the data goes.
    let recipient = match named {
        Some(named) if caller.kind == CallerKind::Internal => named,
        _ => caller,
    };
    let purposes = snapshot.purposes();
    let categories = snapshot.categories();
    let purpose = purposes.info(key.purpose);
    let purpose_name = purposes.name(key.purpose);

    // Stage 1: the purpose is registered for the caller, the data goes where the purpose says.
    let mut reasons = Vec::new();
    if !is_registered(snapshot, caller, key.purpose) {
        reasons.push(Reason::new(
            ReasonCode::PurposeNotRegistered,
            "§1",
            format!(
                "caller `{}` is not registered for purpose `{purpose_name}`",
                caller.name
            ),
        ));
    }
    let mismatch = recipient_mismatch(
        caller,
        recipient,
        purpose_name,
        &purpose.recipient,
        &purpose.clause,
    );
    let named_wrong = || named_recipient_wrong(snapshot, caller, named?, key.purpose);
    if let Some(reason) = mismatch.or_else(named_wrong) {
        reasons.push(reason);
    }

    // Stage 2: casbin grants, deny rows overriding allow rows.
    let mut granted: Vec<u32> = Vec::new();
    let mut denied: Vec<u32> = Vec::new();
    for &category in &key.categories {
        let MatchingRows {
            allow,
            deny: mut deny_rows,
        } = snapshot.matching_rows(caller, key.purpose, category, key.action);
        // A request for a parent category is a request for all of its children: a deny row on
        // any child denies it (casbin, asked for the parent alone, would not see that row).
        for &below in categories.descendants(category) {
            let rows = snapshot.matching_rows(caller, key.purpose, below, key.action);
            deny_rows.extend_from_slice(&rows.deny);
        }
        deny_rows.sort_unstable();
        deny_rows.dedup();
        let category_name = categories.name(category);
        if let Some(first) = deny_rows.first() {
            reasons.push(Reason::new(
                ReasonCode::DeniedByRule,
                purpose.clause.clone(),
                format!(
                    "policy.csv line {} denies `{}` of `{category_name}` for `{purpose_name}`",
                    snapshot.rule(*first).line,
                    key.action.as_str()
                ),
            ));
            denied.extend_from_slice(&deny_rows);
        } else if allow.is_empty() {
            reasons.push(Reason::new(
                ReasonCode::NoGrant,
                purpose.clause.clone(),
                format!(
                    "role `{}` of caller `{}` has no grant to {} `{category_name}` for `{purpose_name}`",
                    caller.role,
                    caller.name,
                    key.action.as_str()
                ),
            ));
        } else {
            granted.extend_from_slice(&allow);
        }
    }

    // Stage 3: secrecy of communications.
    let limits = snapshot.limits();
    let mut comms_consent = None;
    for &category in &key.categories {
        if !categories.info(category).secrecy {
            continue;
        }
        let category_name = categories.name(category);
        if limits.never_recipients.contains(&recipient.kind) {
            reasons.push(Reason::new(
                ReasonCode::SecrecyOfCommunications,
                limits.secrecy_clause.clone(),
                format!(
                    "`{category_name}` is never provided to a {} (`{}`)",
                    recipient.kind.as_str().replace('_', " "),
                    recipient.name
                ),
            ));
            continue;
        }
        match purpose.secrecy {
            SecrecyUse::Allowed => {}
            SecrecyUse::NeedsConsent => comms_consent = Some(limits.secrecy_clause.clone()),
            SecrecyUse::Never => reasons.push(Reason::new(
                ReasonCode::SecrecyOfCommunications,
                limits.secrecy_clause.clone(),
                format!("`{category_name}` is never used for `{purpose_name}`"),
            )),
        }
    }

    // Stage 4: de-identified data only, for research.
    if purpose.deidentified_only {
        for &category in &key.categories {
            if !categories.info(category).deidentified {
                reasons.push(Reason::new(
                    ReasonCode::IdentifiedDataForResearch,
                    limits.deidentification_clause.clone(),
                    format!(
                        "`{purpose_name}` gets de-identified data only; `{}` identifies a person",
                        categories.name(category)
                    ),
                ));
            }
        }
    }

    if !reasons.is_empty() {
        return Outcome {
            reasons: reasons.into(),
            matched_rules: rules(snapshot, denied).into(),
            requirements: Requirements::default(),
        };
    }

    // What stage 5 must check. De-identified data is not personal data: no subject's state
    // applies to it.
    let identified = key
        .categories
        .iter()
        .any(|c| !categories.info(*c).deidentified);
    let requirements = if identified {
        Requirements {
            purpose_chain: purposes
                .ancestors(key.purpose)
                .iter()
                .map(|p| purposes.name(*p).clone())
                .collect(),
            consent: purpose.consent_clause.clone(),
            comms_consent,
            use_suspension: (!purpose.use_exempt).then(|| limits.suspension_clause.clone()),
            provision_suspension: purpose.provision.then(|| limits.suspension_clause.clone()),
            deletion: (!purpose.deletion_exempt).then(|| limits.suspension_clause.clone()),
            subject_required: purpose.subject_required,
        }
    } else {
        Requirements::default()
    };
    Outcome {
        reasons: Arc::from([]),
        matched_rules: rules(snapshot, granted).into(),
        requirements,
    }
}

/// The rule rows for `ids`, each once, in file order.
fn rules(snapshot: &Snapshot, mut ids: Vec<u32>) -> Vec<MatchedRule> {
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter().map(|i| snapshot.rule(i).clone()).collect()
}

/// Whether `caller` may declare `purpose` (a registered parent covers its children).
fn is_registered(snapshot: &Snapshot, caller: &CallerInfo, purpose: NodeId) -> bool {
    caller
        .registered
        .iter()
        .any(|r| snapshot.purposes().is_within(purpose, *r))
}

/// A recipient named in the request must be who receives the data: a joint user or third party
/// that calls receives it itself and can name no one else (else the audit log and the
/// disclosure report would credit another company with the provision); an internal caller that
/// hands data to a company names it, and that company must be registered for the purpose.
fn named_recipient_wrong(
    snapshot: &Snapshot,
    caller: &CallerInfo,
    named: &CallerInfo,
    purpose: NodeId,
) -> Option<Reason> {
    if named.id == caller.id {
        return None;
    }
    let purposes = snapshot.purposes();
    let purpose_name = purposes.name(purpose);
    let clause = purposes
        .info(purpose)
        .recipient
        .as_ref()
        .map_or_else(|| purposes.info(purpose).clause.clone(), |(_, c)| c.clone());
    if caller.kind != CallerKind::Internal {
        return Some(Reason::new(
            ReasonCode::RecipientNotAllowed,
            clause,
            format!(
                "`{}` is a {} and receives the data itself: it cannot name `{}` as recipient",
                caller.name,
                caller.kind.as_str().replace('_', " "),
                named.name
            ),
        ));
    }
    (!is_registered(snapshot, named, purpose)).then(|| {
        Reason::new(
            ReasonCode::RecipientNotAllowed,
            clause,
            format!(
                "recipient `{}` is not registered for purpose `{purpose_name}`",
                named.name
            ),
        )
    })
}

/// A purpose that hands data to a joint user or a third party needs such a recipient; any
/// other purpose keeps data inside the company.
fn recipient_mismatch(
    caller: &CallerInfo,
    recipient: &CallerInfo,
    purpose_name: &str,
    needed: &Option<(CallerKind, Arc<str>)>,
    purpose_clause: &Arc<str>,
) -> Option<Reason> {
    match needed {
        Some((kind, clause)) if recipient.kind != *kind => Some(Reason::new(
            ReasonCode::RecipientNotAllowed,
            clause.clone(),
            if recipient.kind == CallerKind::Internal && recipient.id == caller.id {
                format!(
                    "`{purpose_name}` provides data to a {}: name the receiving company as recipient",
                    kind.as_str().replace('_', " ")
                )
            } else {
                format!(
                    "`{purpose_name}` provides data to a {}; `{}` is {}",
                    kind.as_str().replace('_', " "),
                    recipient.name,
                    recipient.kind.as_str().replace('_', " ")
                )
            },
        )),
        None if recipient.kind != CallerKind::Internal => Some(Reason::new(
            ReasonCode::RecipientNotAllowed,
            purpose_clause.clone(),
            format!(
                "`{purpose_name}` keeps data inside the company; `{}` is a {}",
                recipient.name,
                recipient.kind.as_str().replace('_', " ")
            ),
        )),
        _ => None,
    }
}

/// Stage 5 on top of a (possibly cached) outcome: reads each subject's state. Without
/// `subjects`, stage 5 is left to the records of the response, each decided on its own.
pub fn finish(
    snapshot: &Snapshot,
    outcome: &Outcome,
    request: &Request,
    subjects: Option<&dyn SubjectStates>,
    id: DecisionId,
    cache_hit: bool,
) -> Decision {
    let mut decision = Decision {
        decision_id: id,
        allowed: false,
        reasons: outcome.reasons.to_vec(),
        matched_rules: outcome.matched_rules.clone(),
        policy_version: Some(snapshot.version()),
        cache_hit,
        shadow_allowed: None,
        minimized: Vec::new(),
    };
    if !decision.reasons.is_empty() {
        return decision;
    }
    let req = &outcome.requirements;
    if let (true, Some(subjects)) = (req.subject_dependent(), subjects) {
        decision.reasons = subject_reasons(req, &request.subjects, subjects);
    }
    decision.allowed = decision.reasons.is_empty();
    decision
}

fn subject_reasons<'n>(
    req: &Requirements,
    names: &'n [String],
    subjects: &dyn SubjectStates,
) -> Vec<Reason> {
    if names.is_empty() || names.iter().any(String::is_empty) {
        return vec![Reason::new(
            ReasonCode::SubjectRequired,
            "§7",
            format!(
                "`{}` depends on the data subject's consent and requests: name the subject (x-data-subject)",
                req.purpose_chain.first().map_or("", |p| p)
            ),
        )];
    }
    // One reason per code, naming the subjects it applies to.
    let mut found: Vec<(ReasonCode, Arc<str>, Vec<&str>)> = Vec::new();
    let mut add = |code: ReasonCode, clause: &Arc<str>, subject: &'n str| match found
        .iter_mut()
        .find(|(c, _, _)| *c == code)
    {
        Some((_, _, who)) => who.push(subject),
        None => found.push((code, clause.clone(), vec![subject])),
    };
    let none = SubjectState::default();
    for name in names {
        let state = match subjects.state(name) {
            Ok(state) => state,
            Err(e) => {
                add(ReasonCode::SubjectStateUnavailable, &Arc::from("§7"), name);
                // Denied, never allowed; the store's own health is reported where it is read.
                tracing::debug!(subject = %name, error = %e, "subject state unavailable; denying");
                continue;
            }
        };
        let state = state.as_deref().unwrap_or(&none);
        if let Some(clause) = &req.consent
            && !SubjectState::covers(&state.consent, &req.purpose_chain)
        {
            add(ReasonCode::ConsentRequired, clause, name);
        }
        if let Some(clause) = &req.comms_consent
            && !SubjectState::covers(&state.comms_consent, &req.purpose_chain)
        {
            add(ReasonCode::SecrecyOfCommunications, clause, name);
        }
        if let Some(clause) = &req.use_suspension
            && state.use_suspended
        {
            add(ReasonCode::UseSuspended, clause, name);
        }
        if let Some(clause) = &req.provision_suspension
            && state.provision_suspended
        {
            add(ReasonCode::ProvisionSuspended, clause, name);
        }
        if let Some(clause) = &req.deletion
            && state.deletion_requested
        {
            add(ReasonCode::DeletionRequested, clause, name);
        }
    }
    let purpose = req.purpose_chain.first().map_or("", |p| p);
    found
        .into_iter()
        .map(|(code, clause, who)| {
            let shown: Vec<String> = who.iter().take(5).map(|s| format!("`{s}`")).collect();
            let more = if who.len() > 5 {
                format!(" and {} more", who.len() - 5)
            } else {
                String::new()
            };
            let what = match code {
                ReasonCode::ConsentRequired => format!("no consent to `{purpose}`"),
                ReasonCode::SecrecyOfCommunications => {
                    format!("no consent to the use of communications data for `{purpose}`")
                }
                ReasonCode::UseSuspended => {
                    "use of their data is suspended at their request".into()
                }
                ReasonCode::ProvisionSuspended => {
                    "provision of their data to third parties is suspended at their request".into()
                }
                ReasonCode::DeletionRequested => "they asked for their data to be deleted: it \
                     serves only their requests and what the law requires to be kept"
                    .into(),
                _ => "their state could not be read".into(),
            };
            Reason::new(
                code,
                clause,
                format!("subject {}{more}: {what}", shown.join(", ")),
            )
        })
        .collect()
}

/// A stage of DESIGN §2, as `Explain` reports it, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    WellFormed,
    Grant,
    Secrecy,
    Deidentification,
    SubjectState,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Self::WellFormed,
        Self::Grant,
        Self::Secrecy,
        Self::Deidentification,
        Self::SubjectState,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::WellFormed => "well_formed",
            Self::Grant => "grant",
            Self::Secrecy => "secrecy",
            Self::Deidentification => "deidentification",
            Self::SubjectState => "subject_state",
        }
    }

    /// The stage of stages 1–4 that denies with `code` (stage 5's codes are told apart by
    /// where they come from: [`finish`] only adds reasons when stages 1–4 found none, and
    /// `SECRECY_OF_COMMUNICATIONS` is in both).
    fn of_early(code: ReasonCode) -> Self {
        match code {
            ReasonCode::NoGrant | ReasonCode::DeniedByRule => Self::Grant,
            ReasonCode::SecrecyOfCommunications => Self::Secrecy,
            ReasonCode::IdentifiedDataForResearch => Self::Deidentification,
            // Every other early code is about the request's names and registration; an
            // unexpected one is reported under stage 1 rather than dropped.
            _ => Self::WellFormed,
        }
    }
}

/// What one stage concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageOutcome {
    Pass,
    Deny,
    /// Not evaluated: a name of the request did not resolve (stages 2–5), or stages 1–4
    /// denied (stage 5).
    Skipped,
}

impl StageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Deny => "deny",
            Self::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StageReport {
    pub stage: Stage,
    pub outcome: StageOutcome,
    pub reasons: Vec<Reason>,
}

/// A decision with the outcome of every stage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explanation {
    pub decision: Decision,
    pub stages: Vec<StageReport>,
}

/// Decides `request` uncached and says what each stage concluded: exactly the decision's own
/// path, not a second evaluation that could differ. Stages 1–4 all run once the request's names
/// resolve, so each reports its own reasons; stage 5 is `skipped` when any of them denied, and
/// stages 2–5 are when a name did not resolve (there is nothing to evaluate them on).
pub fn explain(
    snapshot: Option<&Snapshot>,
    request: &Request,
    subjects: &dyn SubjectStates,
    id: DecisionId,
) -> Explanation {
    let Some(snapshot) = snapshot else {
        let decision = no_policy(id);
        let stages = stage_reports(Stage::WellFormed, &decision.reasons, |_| Stage::WellFormed);
        return Explanation { decision, stages };
    };
    let (decision, last) = match resolve(snapshot, request) {
        Err(reasons) => (denied_early(snapshot, reasons, id), Stage::WellFormed),
        Ok(key) => {
            let outcome = evaluate(snapshot, &key);
            let decision = finish(snapshot, &outcome, request, Some(subjects), id, false);
            if outcome.reasons.is_empty() {
                (decision, Stage::SubjectState)
            } else {
                (decision, Stage::Deidentification)
            }
        }
    };
    let stage_of = |code| match last {
        Stage::SubjectState => Stage::SubjectState,
        _ => Stage::of_early(code),
    };
    let stages = stage_reports(last, &decision.reasons, stage_of);
    Explanation { decision, stages }
}

/// Stages up to `last` were evaluated: each denied with the reasons `stage_of` puts in it, or
/// passed; the stages after `last` were skipped.
fn stage_reports(
    last: Stage,
    reasons: &[Reason],
    stage_of: impl Fn(ReasonCode) -> Stage,
) -> Vec<StageReport> {
    Stage::ALL
        .iter()
        .map(|&stage| {
            let mine: Vec<Reason> = reasons
                .iter()
                .filter(|r| stage_of(r.code) == stage)
                .cloned()
                .collect();
            let outcome = if stage > last {
                StageOutcome::Skipped
            } else if mine.is_empty() {
                StageOutcome::Pass
            } else {
                StageOutcome::Deny
            };
            StageReport {
                stage,
                outcome,
                reasons: mine,
            }
        })
        .collect()
}
