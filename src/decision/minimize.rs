//! Minimization (DESIGN §3): of a request's `minimizable` categories, which the caller may
//! not have for its purpose, so that the call is allowed without them instead of denied.

use super::engine::Outcome;
use super::key::CacheKey;
use super::reason::{Reason, ReasonCode};
use crate::policy::{NodeId, Snapshot};
use smallvec::SmallVec;
use std::sync::Arc;

/// The minimizable categories' ids; an unknown name is a stage-1 deny, as for any category.
pub(crate) fn resolve(
    snapshot: &Snapshot,
    names: &[String],
) -> Result<SmallVec<[NodeId; 4]>, Vec<Reason>> {
    let mut ids = SmallVec::new();
    let mut reasons = Vec::new();
    for name in names {
        match snapshot.categories().id(name) {
            Some(id) => ids.push(id),
            None => reasons.push(Reason::new(
                ReasonCode::CategoryUnknown,
                "§1",
                format!("category `{name}` (minimizable) is not a category of the policy"),
            )),
        }
    }
    if reasons.is_empty() {
        Ok(ids)
    } else {
        Err(reasons)
    }
}

/// The names of the `minimizable` categories the call must go without, given the call's own
/// outcome `main` (allowed by stages 1–4). A category goes when stages 1–4 deny it for this
/// caller, purpose, action and recipient, or when it would need more of the subject's state
/// than the call's own categories do (consent to communications data): stage 5 is checked
/// for the call as a whole, so such a category could not be vouched for. `outcome_of`
/// answers a key (from the decision cache, or computed).
pub(crate) fn minimized(
    snapshot: &Snapshot,
    key: &CacheKey,
    main: &Outcome,
    minimizable: &[NodeId],
    mut outcome_of: impl FnMut(CacheKey) -> Arc<Outcome>,
) -> Vec<String> {
    let mut out = Vec::new();
    for &category in minimizable {
        let mut alone = key.clone();
        alone.categories = SmallVec::from_slice(&[category]);
        let outcome = outcome_of(alone);
        let needs_more = |mine: bool, theirs: bool| mine && !theirs;
        let (c, m) = (&outcome.requirements, &main.requirements);
        let goes = !outcome.reasons.is_empty()
            || needs_more(c.consent.is_some(), m.consent.is_some())
            || needs_more(c.comms_consent.is_some(), m.comms_consent.is_some())
            || needs_more(c.use_suspension.is_some(), m.use_suspension.is_some())
            || needs_more(
                c.provision_suspension.is_some(),
                m.provision_suspension.is_some(),
            )
            || needs_more(c.deletion.is_some(), m.deletion.is_some())
            || needs_more(c.subject_required, m.subject_required);
        if goes {
            out.push(snapshot.categories().name(category).to_string());
        }
    }
    out
}
