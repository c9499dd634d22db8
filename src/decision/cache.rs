//! The decision cache and [`Decider`], the entry point the sidecar and the CLI call.
//!
//! The key is a full struct of interned ids plus the policy version, never a hash of the
//! request: a hash collision would hand one request another's decision. Ids are only
//! meaningful within one policy version, which is part of the key, so an entry made under an
//! older policy can never be found under a newer one. The value holds no subject state.

use super::engine::{self, Outcome};
use super::{Decision, DecisionIds, Request};
use crate::policy::{Action, NodeId, PolicyVersion, Snapshot};
use crate::subjects::SubjectStates;
use arc_swap::ArcSwapOption;
use moka::sync::Cache;
use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Everything a subject-independent decision depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub version: PolicyVersion,
    pub caller: u32,
    pub purpose: NodeId,
    pub action: Action,
    /// Sorted, without duplicates.
    pub categories: SmallVec<[NodeId; 4]>,
    pub recipient: Option<u32>,
}

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
    /// `subjects` on every call.
    pub fn decide(&self, request: &Request, subjects: &dyn SubjectStates) -> Decision {
        let guard = self.policy.load();
        match guard.as_deref() {
            Some(snapshot) => self.decide_under(snapshot, request, subjects),
            None => engine::no_policy(self.ids.next()),
        }
    }

    /// Decides under a snapshot the caller already holds (the sidecar reads the route from
    /// the same snapshot it decides under).
    pub fn decide_under(
        &self,
        snapshot: &Snapshot,
        request: &Request,
        subjects: &dyn SubjectStates,
    ) -> Decision {
        let id = self.ids.next();
        let mut decision = match engine::resolve(snapshot, request) {
            Ok(key) => {
                let (outcome, hit) = self.outcome(snapshot, key);
                let counter = if hit {
                    &self.stats.hits
                } else {
                    &self.stats.misses
                };
                counter.fetch_add(1, Ordering::Relaxed);
                engine::finish(snapshot, &outcome, request, subjects, id, hit)
            }
            Err(reasons) => engine::denied_early(snapshot, reasons, id),
        };
        let shadow = self.shadow.load();
        if let Some(shadow) = shadow.as_deref() {
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
        subjects: &dyn SubjectStates,
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
    /// decision (`Shared::audited`), not here in `decide`: a call may be decided twice (again
    /// after its subjects' state was read) and must count once.
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

    /// A deny that the engine did not reach (no route for a method, say), with a fresh id.
    pub fn deny(&self, snapshot: Option<&Snapshot>, reason: super::Reason) -> Decision {
        let id = self.ids.next();
        match snapshot {
            Some(s) => engine::denied_early(s, vec![reason], id),
            None => engine::no_policy(id),
        }
    }

    /// A fresh decision id, for a response that carries no decision (malformed metadata).
    pub fn next_id(&self) -> super::DecisionId {
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
