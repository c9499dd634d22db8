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

/// Holds the current policy snapshot and the decision cache; decides requests.
pub struct Decider {
    policy: ArcSwapOption<Snapshot>,
    cache: Cache<CacheKey, Arc<Outcome>, FxBuildHasher>,
    ids: DecisionIds,
    stats: Arc<CacheStats>,
}

impl Decider {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            policy: ArcSwapOption::empty(),
            cache: Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(settings.ttl)
                .build_with_hasher(FxBuildHasher),
            ids: DecisionIds::default(),
            stats: Arc::default(),
        }
    }

    /// A decider that already holds `snapshot`.
    pub fn with_policy(snapshot: Arc<Snapshot>, settings: CacheSettings) -> Self {
        let decider = Self::new(settings);
        decider.set_policy(snapshot);
        decider
    }

    /// Publishes a new policy; the next decision uses it. Entries of older versions can no
    /// longer be hit (the version is in the key); they are dropped to free memory.
    pub fn set_policy(&self, snapshot: Arc<Snapshot>) {
        self.policy.store(Some(snapshot));
        self.cache.invalidate_all();
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
        let key = match engine::resolve(snapshot, request) {
            Ok(key) => key,
            Err(reasons) => return engine::denied_early(snapshot, reasons, id),
        };
        let (outcome, hit) = match self.cache.get(&key) {
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
        };
        let counter = if hit {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        engine::finish(snapshot, &outcome, request, subjects, id, hit)
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
