//! The sidecar's view of the subject registry: a versioned in-memory cache (moka) that the
//! synchronous decision reads, kept current by the store's change feed.
//!
//! # How state reaches a decision
//!
//! A decision reads [`SubjectStates`] synchronously; the store is asynchronous. The sidecar
//! decides once against the cache; only when that decision came out `SUBJECT_STATE_UNAVAILABLE`
//! for a subject the cache cannot answer for (never read, changed since, or too old) does it
//! read those subjects from the store ([`SubjectCache::load`]) and decide again. So a decision
//! that needs no subject state (stages 1–4 deny, or the purpose is subject-independent) never
//! waits for the store, even when the store is down.
//!
//! # Versions
//!
//! Every stored state has a version (+1 per change). The cache never replaces a version with
//! an older one: a read, a change applied through this sidecar and a change notification are
//! all merged by version. A notification of version `v` leaves a marker "at least `v`" (even
//! for a subject not cached), so a read that began before the change and returns `v - 1` is not
//! taken as current: it is read again, and the second read, begun after the notification
//! arrived, sees the change.
//!
//! # Staleness
//!
//! A cached state is trusted while it is *confirmed*: its last confirmation is the later of
//! when it was read and when the change feed last proved it had delivered every earlier change
//! (a successful poll of the SQLite file; a heartbeat NOTIFY that came back on the PostgreSQL
//! listener). While the feed is down its confirmation stops advancing:
//!
//! - past `refresh_after` (750 ms; 300 ms for SQLite) the state is read again before it is
//!   used, so a sidecar whose listener is down but whose store answers still honours other
//!   sidecars' changes within 1 s;
//! - when that read fails, the cached state is still answered, until its last confirmation is
//!   older than `stale_after` (`[subjects] stale_after_ms`); after that, subject-dependent calls
//!   are denied `SUBJECT_STATE_UNAVAILABLE` until the store answers again.
//!
//! # Change feeds
//!
//! - SQLite ([`SubjectCache::spawn_sqlite_feed`]): polls the history for rows after the last
//!   one seen, every [`SubjectCacheSettings::poll_interval`] (100 ms): a change that another
//!   process (`pdgate subjects --store`) commits is honoured by every call that starts after
//!   the next poll, i.e. within about 100 ms plus the poll's own time (bounded here by 250 ms).
//! - PostgreSQL ([`SubjectCache::spawn_fleet_feed`], see [`super::feed`]): the sidecar's one
//!   change feed, for policy versions and subject changes alike — a `PgListener` whose heartbeat
//!   NOTIFY every [`SubjectCacheSettings::heartbeat_interval`] proves it alive (NOTIFYs arrive
//!   in commit order, so every change committed before the heartbeat was delivered before it),
//!   or a poll of the change table, whose every successful read confirms the cache. A lost
//!   listener is reconnected with backoff; because changes may have been missed in between, the
//!   whole cache is dropped when it is back.

use super::{Change, Event, SubjectRegistry};
use super::{Notification, PostgresRegistry, RegistryError, SqliteRegistry, SubjectRecord};
use crate::decision::{Decision, ReasonCode};
use crate::subjects::{SubjectState, SubjectStateError, SubjectStates};
use moka::ops::compute::Op;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How the cache is bounded and kept current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectCacheSettings {
    /// A cached state whose last confirmation is older than this is not answered.
    pub stale_after: Duration,
    /// A cached state whose last confirmation is older than this is read again before it is
    /// used; if that read fails it is still answered, up to `stale_after`.
    pub refresh_after: Duration,
    /// Subjects kept (moka evicts beyond it).
    pub max_entries: u64,
    /// Longest wait for one read of the store in the decision path; a read that takes longer
    /// counts as failed.
    pub read_timeout: Duration,
    /// SQLite: how often the history is polled for changes made by other processes.
    pub poll_interval: Duration,
    /// PostgreSQL: how often the listener is proved alive.
    pub heartbeat_interval: Duration,
}

impl Default for SubjectCacheSettings {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(5),
            refresh_after: Duration::from_millis(750),
            max_entries: 100_000,
            read_timeout: Duration::from_secs(1),
            poll_interval: Duration::from_millis(100),
            heartbeat_interval: Duration::from_millis(250),
        }
    }
}

/// Subject states cached in front of a [`SubjectRegistry`]; see the module docs.
pub struct SubjectCache {
    registry: Arc<dyn SubjectRegistry>,
    entries: moka::sync::Cache<String, Slot>,
    settings: SubjectCacheSettings,
    /// The origin of every time kept here (µs since it, in atomics).
    base: Instant,
    /// When the change feed last proved that it had delivered every earlier change (µs since
    /// `base`; 0: never).
    confirmed_us: AtomicU64,
    /// Bumped when the cache is dropped after a gap in the feed: a read begun before it is not
    /// cached.
    epoch: AtomicU64,
    /// When a read of the store last failed (µs since `base`; 0: the last read succeeded).
    /// Within [`RETRY_AFTER`] of it, calls do not try again: during an outage one call per
    /// interval waits for the store, not every call.
    failed_us: AtomicU64,
    /// Store reads on the decision path, and those that failed (metrics).
    stats: Arc<ReadStats>,
    /// Fleet mode: the pool and policy signal the change feed shares with the policy store.
    fleet: std::sync::OnceLock<super::feed::FleetLink>,
}

/// Reads of the store through [`SubjectCache::read_through`] (the decision path), for the
/// metrics registry: every read begun, and those that failed or timed out.
#[derive(Debug, Default)]
pub struct ReadStats {
    pub reads: AtomicU64,
    pub failures: AtomicU64,
}

/// How long after a failed read the decision path answers from the cache alone.
const RETRY_AFTER: Duration = Duration::from_millis(200);

impl std::fmt::Debug for SubjectCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectCache")
            .field("registry", &self.registry)
            .field("entries", &self.entries.entry_count())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What the cache holds for one subject.
#[derive(Debug, Clone)]
enum Slot {
    /// The state as read (or as a change through this sidecar produced it).
    Known {
        /// `None`: no record (never changed), version 0.
        state: Option<Arc<SubjectState>>,
        version: u64,
        /// When it was read: µs since `base`, taken before the read began.
        read_us: u64,
        /// The cache epoch the read began in; an entry of an older epoch is never answered
        /// (so a read racing a reset cannot slip a pre-gap state in).
        epoch: u64,
    },
    /// A change to at least this version happened; the state must be read again.
    Outdated { at_least: u64 },
}

/// How a read merged into the cache.
enum Merge {
    Cached,
    /// The cache knows of a newer version than the one read: read again.
    Older,
    /// The cache was dropped while the read was under way.
    Dropped,
}

impl SubjectCache {
    pub fn new(registry: Arc<dyn SubjectRegistry>, settings: SubjectCacheSettings) -> Self {
        Self {
            registry,
            entries: moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .build(),
            settings,
            base: Instant::now(),
            confirmed_us: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            failed_us: AtomicU64::new(0),
            stats: Arc::default(),
            fleet: std::sync::OnceLock::new(),
        }
    }

    /// The store behind the cache.
    pub fn read_stats(&self) -> &Arc<ReadStats> {
        &self.stats
    }

    pub fn registry(&self) -> &Arc<dyn SubjectRegistry> {
        &self.registry
    }

    pub fn settings(&self) -> &SubjectCacheSettings {
        &self.settings
    }

    pub(crate) fn now_us(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The cached state, when it can be trusted now.
    fn usable(&self, subject: &str) -> Option<Option<Arc<SubjectState>>> {
        let Slot::Known {
            state,
            read_us,
            epoch,
            ..
        } = self.entries.get(subject)?
        else {
            return None;
        };
        if epoch != self.epoch.load(Ordering::Acquire) {
            return None;
        }
        let now = self.now_us();
        let confirmed = read_us.max(self.confirmed_us.load(Ordering::Acquire));
        let age = Duration::from_micros(now.saturating_sub(confirmed));
        if age <= self.settings.refresh_after.min(self.settings.stale_after) {
            return Some(state);
        }
        // Older than `refresh_after`: answered only while the store is known to be failing
        // (a read failed within the last `stale_after`), and never past `stale_after`.
        let failed = self.failed_us.load(Ordering::Acquire);
        let store_down = failed != 0
            && Duration::from_micros(now.saturating_sub(failed)) <= self.settings.stale_after;
        (store_down && age <= self.settings.stale_after).then_some(state)
    }

    /// Whether the cache cannot answer for `subject` now (a decision would find it
    /// unavailable).
    pub fn needs_load(&self, subject: &str) -> bool {
        self.usable(subject).is_none()
    }

    /// Whether `decision` was denied only for want of state the cache can go and read: it has
    /// `SUBJECT_STATE_UNAVAILABLE` and one of `subjects` is not answerable from the cache.
    pub fn wants_load(&self, decision: &Decision, subjects: &[String]) -> bool {
        decision
            .reasons
            .iter()
            .any(|r| r.code == ReasonCode::SubjectStateUnavailable)
            && subjects.iter().any(|s| self.needs_load(s))
    }

    /// Reads from the store every subject in `subjects` that the cache cannot answer for.
    /// A read that fails leaves the cache as it was and marks the store as failing: a cached
    /// state is then answered up to `stale_after`, and a subject with none (or an older one) is
    /// denied `SUBJECT_STATE_UNAVAILABLE` by the decision that follows.
    pub async fn load(&self, subjects: &[String]) {
        let failed = self.failed_us.load(Ordering::Acquire);
        if failed != 0 && Duration::from_micros(self.now_us().saturating_sub(failed)) < RETRY_AFTER
        {
            return;
        }
        for (i, subject) in subjects.iter().enumerate() {
            if subjects[..i].contains(subject) || !self.needs_load(subject) {
                continue;
            }
            match self.read_through(subject).await {
                Ok(_) => self.failed_us.store(0, Ordering::Release),
                // A malformed subject id is the caller's, not the store's: it must not hold
                // back other callers' reads.
                Err(CacheError::Registry(e)) if e.is_input() => {
                    tracing::debug!(%subject, error = %e, "subject id refused by the registry");
                }
                Err(e) => {
                    // `max(1)`: 0 means "no failure".
                    self.failed_us
                        .store(self.now_us().max(1), Ordering::Release);
                    tracing::warn!(%subject, error = %e, "subject state cannot be read");
                    return;
                }
            }
        }
    }

    /// Reads one subject from the store and caches it; returns the record read.
    pub async fn read_through(&self, subject: &str) -> Result<Option<SubjectRecord>, CacheError> {
        // A read replaces an "at least" marker that was there before it began: it began after
        // that notification arrived, so it sees that change. (It can still be below the marker
        // only when the notification came from another registry sharing the channel — another
        // schema of the same database — and then this store's state is the right one.) A
        // marker set or raised during the read makes it outdated: read once more.
        let mut last = None;
        for _ in 0..2 {
            let epoch = self.epoch.load(Ordering::Acquire);
            let seen = self.marker(subject);
            let read_us = self.now_us();
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            let read = tokio::time::timeout(self.settings.read_timeout, self.registry.get(subject))
                .await
                .map_err(|_| CacheError::Timeout(self.settings.read_timeout))
                .and_then(|read| read.map_err(CacheError::Registry))
                .inspect_err(|_| _ = self.stats.failures.fetch_add(1, Ordering::Relaxed))?;
            match self.merge(subject, read.as_ref(), read_us, Some(epoch), seen) {
                Merge::Cached => return Ok(read),
                Merge::Older | Merge::Dropped => last = Some(read),
            }
        }
        // A newer state is cached already, or the cache was dropped meanwhile: this read is
        // answered to its caller, and the next decision reads again.
        Ok(last.flatten())
    }

    /// Merges a state read at `read_us` (µs since `base`) into the cache, never over a newer
    /// version. `epoch`: the cache epoch when the read began (`None`: a change this sidecar
    /// applied, current whatever happened meanwhile). `seen`: the "at least" marker that was
    /// there when the read began, which the read replaces whatever its version.
    fn merge(
        &self,
        subject: &str,
        record: Option<&SubjectRecord>,
        read_us: u64,
        epoch: Option<u64>,
        seen: Option<u64>,
    ) -> Merge {
        let version = record.map_or(0, |r| r.version);
        let mut outcome = Merge::Cached;
        self.entries
            .entry_by_ref(subject)
            .and_compute_with(|existing| {
                // Checked under the entry's lock: a reset that happened before is seen here,
                // one that happens after drops this entry too.
                if epoch.is_some_and(|e| e != self.epoch.load(Ordering::Acquire)) {
                    outcome = Merge::Dropped;
                    return Op::Nop;
                }
                let newer_known = match existing.as_ref().map(moka::Entry::value) {
                    Some(Slot::Known { version: v, .. }) => *v > version,
                    Some(Slot::Outdated { at_least }) => {
                        *at_least > version && seen.is_none_or(|m| *at_least > m)
                    }
                    None => false,
                };
                if newer_known {
                    outcome = Merge::Older;
                    return Op::Nop;
                }
                Op::Put(Slot::Known {
                    state: record.map(|r| Arc::new(r.state.clone())),
                    version,
                    read_us,
                    epoch: epoch.unwrap_or_else(|| self.epoch.load(Ordering::Acquire)),
                })
            });
        outcome
    }

    /// The "at least" marker of `subject`, if it has one.
    fn marker(&self, subject: &str) -> Option<u64> {
        match self.entries.get(subject) {
            Some(Slot::Outdated { at_least }) => Some(at_least),
            _ => None,
        }
    }

    /// A change to `subject` reached `version`: a cached older state must be read again.
    pub fn notify(&self, change: &Notification) {
        self.entries
            .entry_by_ref(change.subject.as_str())
            .and_compute_with(|existing| match existing.as_ref().map(moka::Entry::value) {
                Some(Slot::Known { version, .. }) if *version >= change.version => Op::Nop,
                Some(Slot::Outdated { at_least }) if *at_least >= change.version => Op::Nop,
                _ => Op::Put(Slot::Outdated {
                    at_least: change.version,
                }),
            });
    }

    /// Applies `change` to the store and caches the state it produced, so that this sidecar's
    /// next call honours it.
    pub async fn apply(&self, change: &Change) -> Result<SubjectRecord, RegistryError> {
        let read_us = self.now_us();
        let record = self.registry.apply(change).await?;
        self.merge(&change.subject, Some(&record), read_us, None, None);
        Ok(record)
    }

    /// The subject's state read from the store (not the cache), cached on the way.
    pub async fn get(&self, subject: &str) -> Result<Option<SubjectRecord>, RegistryError> {
        let read_us = self.now_us();
        let epoch = self.epoch.load(Ordering::Acquire);
        let seen = self.marker(subject);
        let record = self.registry.get(subject).await?;
        self.merge(subject, record.as_ref(), read_us, Some(epoch), seen);
        Ok(record)
    }

    pub async fn history(&self, subject: &str) -> Result<Vec<Event>, RegistryError> {
        self.registry.history(subject).await
    }

    /// The feed delivered every change committed before `at_us` (µs since `base`).
    pub(crate) fn confirm(&self, at_us: u64) {
        self.confirmed_us.fetch_max(at_us, Ordering::AcqRel);
    }

    /// Drops everything after a gap in the feed (changes may have been missed). The epoch is
    /// what makes entries unanswerable; `invalidate_all` frees their memory.
    pub(crate) fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
    }

    /// How long since the feed last confirmed the cache.
    pub fn unconfirmed_for(&self) -> Duration {
        Duration::from_micros(
            self.now_us()
                .saturating_sub(self.confirmed_us.load(Ordering::Acquire)),
        )
    }

    /// Entries cached (approximate, as moka counts).
    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Starts polling `store` (the same file as the registry) for changes written by other
    /// processes. The task ends when the cache is dropped.
    pub async fn spawn_sqlite_feed(
        self: &Arc<Self>,
        store: SqliteRegistry,
    ) -> Result<tokio::task::JoinHandle<()>, RegistryError> {
        let mut cursor = store.change_cursor().await?;
        self.confirm(self.now_us());
        let cache = Arc::downgrade(self);
        let interval = self.settings.poll_interval;
        Ok(tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(interval).await;
                let Some(cache) = cache.upgrade() else { return };
                let started = cache.now_us();
                match store.changes_since(cursor).await {
                    Ok((changes, next)) => {
                        for change in &changes {
                            cache.notify(change);
                        }
                        cursor = next;
                        cache.confirm(started);
                        if failing {
                            tracing::info!("subject registry readable again");
                            failing = false;
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!(error = %e, "cannot poll the subject registry for changes; cached states expire after subjects.stale_after_ms");
                            failing = true;
                        }
                    }
                }
            }
        }))
    }

    /// Starts a LISTEN feed on `store`'s pool for subject changes alone (benchmarks, tests);
    /// a sidecar uses [`Self::spawn_fleet_feed`]. The task ends when the cache is dropped.
    pub fn spawn_postgres_feed(
        self: &Arc<Self>,
        store: PostgresRegistry,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_fleet_feed(store.pool().clone(), None, super::feed::ChangeFeed::Listen)
    }

    /// Starts the fleet's one change feed on `pool` (see [`super::feed`]): subject changes
    /// reach this cache, policy versions `policy`. The task ends when the cache is dropped.
    pub fn spawn_fleet_feed(
        self: &Arc<Self>,
        pool: sqlx::PgPool,
        policy: Option<Arc<super::feed::PolicySignal>>,
        mode: super::feed::ChangeFeed,
    ) -> tokio::task::JoinHandle<()> {
        if let Some(policy) = &policy {
            // The first link wins; a second feed on one cache is a caller's mistake.
            let _ = self.fleet.set(super::feed::FleetLink {
                pool: pool.clone(),
                policy: policy.clone(),
            });
        }
        tokio::spawn(super::feed::run(
            Some(Arc::downgrade(self)),
            pool,
            policy,
            mode,
            self.settings,
        ))
    }

    /// The fleet pool and policy signal of the feed, when one runs (fleet mode): the policy
    /// store shares them.
    pub fn fleet(&self) -> Option<&super::feed::FleetLink> {
        self.fleet.get()
    }
}

impl SubjectStates for SubjectCache {
    fn state(&self, subject: &str) -> Result<Option<Arc<SubjectState>>, SubjectStateError> {
        self.usable(subject).ok_or_else(|| {
            SubjectStateError::Unavailable(format!(
                "the state of `{subject}` is not cached or older than {:?} and could not be read",
                self.settings.stale_after
            ))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Registry(RegistryError),
    #[error("the subject registry did not answer within {0:?}")]
    Timeout(Duration),
}

#[cfg(test)]
mod tests;
