//! The decision cache and [`Decider`], the entry point the sidecar and the CLI call.
//!
//! The key is a full struct of interned ids plus the policy version, never a hash of the
//! request: a hash collision would hand one request another's decision. Ids are only
//! meaningful within one policy version, which is part of the key, so an entry made under an
//! older policy can never be found under a newer one. The value holds no subject state.

use super::engine::{self, Outcome};
use super::key::CacheKey;
use super::{Decision, DecisionId, DecisionIds, Request};
use crate::policy::Snapshot;
use crate::subjects::SubjectStates;
use arc_swap::ArcSwapOption;
use moka::sync::Cache;
use rustc_hash::FxBuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bounds of the decision cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Most entries kept (moka evicts the least useful beyond it).
    pub max_entries: u64,
    /// An entry is dropped this long after it was made. Entries are exact for their policy
    /// version, so this bounds memory, not staleness.
    pub ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            ttl: Duration::from_secs(300),
        }
    }
}

/// Lookups of the decision cache since start, read by the metrics (`/metrics`, OTLP). Only
/// requests that reach the cache count: one denied before it (an unknown purpose, say) is
/// neither a hit nor a miss.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

/// Calls that a shadow policy decided otherwise than the active one, since start (the
/// metrics read them live: `pdgate_shadow_differences_total`).
#[derive(Debug, Default)]
pub struct ShadowStats {
    /// Active allowed, shadow denied.
    pub allow_deny: AtomicU64,
    /// Active denied, shadow allowed.
    pub deny_allow: AtomicU64,
}

/// A candidate policy decided alongside the active one and never enforced.
struct Shadow {
    snapshot: Arc<Snapshot>,
    /// Differences since this shadow was loaded (`Status`, `ClearShadow`).
    differences: AtomicU64,
}

/// Holds the current policy snapshot and the decision cache; decides requests.
pub struct Decider {
    policy: ArcSwapOption<Snapshot>,
    /// Empty unless a shadow is loaded: then one atomic load per decision is its whole cost.
    shadow: ArcSwapOption<Shadow>,
    cache: Cache<CacheKey, Arc<Outcome>, FxBuildHasher>,
    ids: DecisionIds,
    stats: Arc<CacheStats>,
    shadow_stats: Arc<ShadowStats>,
}

/// A decision begun by [`Decider::begin`] or [`Decider::refuse`]: its id and the part that
/// does not depend on whose data it is. [`Decider::finish`] turns it into a [`Decision`].
pub struct Pending<'s> {
    snapshot: Option<&'s Snapshot>,
    part: Part,
    id: DecisionId,
    /// The call's subjects are decided one by one, per record of its response
    /// ([`Pending::per_record`]): stage 5 does not run for the call itself.
    per_record: bool,
}

impl Pending<'_> {
    /// Leaves stage 5 to the records of the call's response: an export names no subject up
    /// front, and each record it streams is decided for its own subject before it is
    /// delivered (`policy::inspect::Inspection::records`).
    #[must_use]
    pub fn per_record(mut self) -> Self {
        self.per_record = true;
        self
    }

    pub fn is_per_record(&self) -> bool {
        self.per_record
    }
}

enum Part {
    /// Stages 1–4, from the cache (`true`) or the engine, and the minimizable categories
    /// the call goes without.
    Evaluated(Arc<Outcome>, bool, Vec<String>),
    /// Denied before the engine: unknown names, no route, unreadable metadata; with no
    /// snapshot and no reason, no policy is loaded.
    Denied(Vec<super::Reason>),
}

impl Decider {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            policy: ArcSwapOption::empty(),
            shadow: ArcSwapOption::empty(),
            cache: Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(settings.ttl)
                .build_with_hasher(FxBuildHasher),
            ids: DecisionIds::default(),
            stats: Arc::default(),
            shadow_stats: Arc::default(),
        }
    }

    /// A decider that already holds `snapshot`.
    pub fn with_policy(snapshot: Arc<Snapshot>, settings: CacheSettings) -> Self {
        let decider = Self::new(settings);
        decider.set_policy(snapshot);
        decider
    }

    /// Publishes a new policy; the next decision uses it. Entries of older versions can no
    /// longer be hit (the version is in the key); they are dropped to free memory. A decision
    /// that loaded the old snapshot just before the swap may still insert an entry under the
    /// old version after `invalidate_all`: it is never found under the new version, and it is
    /// exact for the old one (equal versions decide equally), so a later rollback may use it.
    pub fn set_policy(&self, snapshot: Arc<Snapshot>) {
        self.policy.store(Some(snapshot));
        self.cache.invalidate_all();
    }

    /// Loads `snapshot` as the shadow policy: from the next call on, every decision is also
    /// made under it, and a different outcome is recorded on the decision
    /// ([`Decision::shadow_allowed`]) and counted. Replaces any earlier shadow.
    pub fn set_shadow(&self, snapshot: Arc<Snapshot>) {
        self.shadow.store(Some(Arc::new(Shadow {
            snapshot,
            differences: AtomicU64::new(0),
        })));
    }

    /// Stops shadow evaluation; returns the shadow's version and how many calls it decided
    /// otherwise, when one was loaded.
    pub fn clear_shadow(&self) -> Option<(crate::policy::PolicyVersion, u64)> {
        self.shadow
            .swap(None)
            .map(|s| (s.snapshot.version(), s.differences.load(Ordering::Relaxed)))
    }

    /// The shadow's version and its differences so far, when one is loaded.
    pub fn shadow(&self) -> Option<(crate::policy::PolicyVersion, u64)> {
        self.shadow
            .load()
            .as_deref()
            .map(|s| (s.snapshot.version(), s.differences.load(Ordering::Relaxed)))
    }

    /// Differences counted over every shadow since start; shared with the metrics.
    pub fn shadow_stats(&self) -> &Arc<ShadowStats> {
        &self.shadow_stats
    }

    pub fn policy(&self) -> Option<Arc<Snapshot>> {
        self.policy.load_full()
    }

    /// Decides `request`: stages 1–4 from the cache (or computed and cached), stage 5 against
    /// `subjects`.
    pub fn decide(&self, request: &Request, subjects: &dyn SubjectStates) -> Decision {
        let snapshot = self.policy.load();
        let pending = self.begin(snapshot.as_deref(), request);
        self.finish(&pending, request, subjects)
    }

    /// The subject-independent part of a decision under `snapshot` (the one the caller loaded,
    /// so that a route and its decision come from the same policy): stages 1–4 from the cache
    /// or the engine, and a decision id. Counted once as a cache hit or miss, however often
    /// [`Decider::finish`] then runs.
    pub fn begin<'s>(&self, snapshot: Option<&'s Snapshot>, request: &Request) -> Pending<'s> {
        let id = self.ids.next();
        let Some(snapshot) = snapshot else {
            return Pending {
                snapshot,
                part: Part::Denied(Vec::new()),
                id,
                per_record: false,
            };
        };
        let resolved = engine::resolve(snapshot, request).and_then(|key| {
            super::minimize::resolve(snapshot, &request.minimizable).map(|ids| (key, ids))
        });
        let part = match resolved {
            Ok((key, minimizable)) => {
                let (outcome, hit) = self.outcome(snapshot, key.clone());
                let counter = if hit {
                    &self.stats.hits
                } else {
                    &self.stats.misses
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let minimized = if outcome.reasons.is_empty() && !minimizable.is_empty() {
                    super::minimize::minimized(snapshot, &key, &outcome, &minimizable, |k| {
                        self.outcome(snapshot, k).0
                    })
                } else {
                    Vec::new()
                };
                Part::Evaluated(outcome, hit, minimized)
            }
            Err(reasons) => Part::Denied(reasons),
        };
        Pending {
            snapshot: Some(snapshot),
            part,
            id,
            per_record: false,
        }
    }

    /// A decision the engine is not asked for, denied for `reason` before it (a method with
    /// no route, metadata that cannot be read), with its own decision id.
    pub fn refuse<'s>(&self, snapshot: Option<&'s Snapshot>, reason: super::Reason) -> Pending<'s> {
        Pending {
            snapshot,
            part: Part::Denied(vec![reason]),
            id: self.ids.next(),
            per_record: false,
        }
    }

    /// Completes `pending` with stage 5 against `subjects` (and, with a shadow policy loaded,
    /// notes whether the shadow decides otherwise). Runs again, with the same id, when the
    /// subjects' state had to be read first.
    pub fn finish(
        &self,
        pending: &Pending<'_>,
        request: &Request,
        subjects: &dyn SubjectStates,
    ) -> Decision {
        let mut decision = match (pending.snapshot, &pending.part) {
            (Some(snapshot), Part::Evaluated(outcome, hit, minimized)) => {
                let subjects = (!pending.per_record).then_some(subjects);
                let mut decision =
                    engine::finish(snapshot, outcome, request, subjects, pending.id, *hit);
                if decision.allowed {
                    decision.minimized.clone_from(minimized);
                }
                decision
            }
            (Some(snapshot), Part::Denied(reasons)) => {
                engine::denied_early(snapshot, reasons.clone(), pending.id)
            }
            (None, Part::Denied(reasons)) if !reasons.is_empty() => {
                let mut decision = engine::no_policy(pending.id);
                decision.reasons.clone_from(reasons);
                decision
            }
            (None, _) => engine::no_policy(pending.id),
        };
        let shadow = self.shadow.load();
        if let (Some(shadow), Part::Evaluated(..)) = (shadow.as_deref(), &pending.part) {
            let subjects = (!pending.per_record).then_some(subjects);
            self.compare_with_shadow(shadow, request, subjects, &mut decision);
        }
        decision
    }

    /// The cached outcome of `key`, or computed and cached; whether it was a hit.
    fn outcome(&self, snapshot: &Snapshot, key: CacheKey) -> (Arc<Outcome>, bool) {
        match self.cache.get(&key) {
            Some(outcome) => (outcome, true),
            None => {
                // `or_insert_with` coalesces concurrent misses of the same key.
                let entry = self
                    .cache
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(engine::evaluate(snapshot, &key)));
                let hit = !entry.is_fresh();
                (entry.into_value(), hit)
            }
        }
    }

    /// Decides `request` under the shadow too (through the same cache: its entries carry the
    /// shadow's version) and notes a different outcome on `decision`. Not counted in the cache
    /// statistics, which describe the enforced decisions. The shadow decides the request as
    /// the active policy's routes mapped it (a shadow's own routes are not consulted).
    fn compare_with_shadow(
        &self,
        shadow: &Shadow,
        request: &Request,
        subjects: Option<&dyn SubjectStates>,
        decision: &mut Decision,
    ) {
        let snapshot = &shadow.snapshot;
        let allowed = match engine::resolve(snapshot, request) {
            Ok(key) => {
                let (outcome, _) = self.outcome(snapshot, key);
                engine::finish(
                    snapshot,
                    &outcome,
                    request,
                    subjects,
                    decision.decision_id,
                    false,
                )
                .allowed
            }
            Err(_) => false,
        };
        if allowed != decision.allowed {
            decision.shadow_allowed = Some(allowed);
        }
    }

    /// Counts `decision`'s shadow difference, if it has one. Called once per final, audited
    /// decision (by the gate), not in [`Decider::finish`], which may run twice for one call
    /// (again after its subjects' state was read).
    pub fn count_shadow_difference(&self, decision: &Decision) {
        let Some(shadow_allowed) = decision.shadow_allowed else {
            return;
        };
        if let Some(shadow) = self.shadow.load().as_deref() {
            shadow.differences.fetch_add(1, Ordering::Relaxed);
        }
        let counter = if shadow_allowed {
            &self.shadow_stats.deny_allow
        } else {
            &self.shadow_stats.allow_deny
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Decides `request` uncached under the active policy and reports every stage.
    pub fn explain(&self, request: &Request, subjects: &dyn SubjectStates) -> engine::Explanation {
        let guard = self.policy.load();
        engine::explain(guard.as_deref(), request, subjects, self.ids.next())
    }

    /// A fresh decision id, for an admin record.
    pub fn next_id(&self) -> DecisionId {
        self.ids.next()
    }

    /// Decides without the cache: what the cache must always agree with.
    pub fn decide_uncached(&self, request: &Request, subjects: &dyn SubjectStates) -> Decision {
        let guard = self.policy.load();
        engine::decide_fresh(guard.as_deref(), request, subjects, self.ids.next())
    }

    /// Whether the current policy defines purpose `name` (false with no policy loaded).
    pub fn knows_purpose(&self, name: &str) -> bool {
        self.policy
            .load()
            .as_deref()
            .is_some_and(|p| p.purposes().id(name).is_some())
    }

    /// Hits and misses of the cache so far; shared, so that the metrics read them live.
    pub fn cache_stats(&self) -> &Arc<CacheStats> {
        &self.stats
    }

    /// Entries currently cached (approximate, as moka counts).
    pub fn cached_entries(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}
