//! The policy lifecycle: one [`PolicyManager`] per sidecar, used at startup, by the file watch
//! ([`super::watch`]) and by the `PolicyAdmin` API. Every change goes the same way:
//!
//! 1. a whole candidate [`Bundle`] (files and tests) is compiled and validated, every problem
//!    reported at once, and the policy's own tests are run against it ([`check`]);
//! 2. the caller may act between check and swap (the API writes its audit record there, and
//!    does not go on if it cannot) — [`Staged`];
//! 3. the store keeps it ([`PolicyStore::publish`]: the policy directory in embedded mode);
//! 4. it is swapped in atomically ([`Decider::set_policy`]) and the history updated.
//!
//! On any failure nothing is swapped: the running policy stays, and the error is kept for
//! `Status`, logged and counted (`pdgate_policy_reload_failures_total`). Changes are serialised
//! by one async mutex held from check to swap, so two reloads never interleave and a reload
//! never validates against one active version and swaps over another.

use super::bundle::{Bundle, CheckError, Checked, TestFile, check};
use super::store::{MemoryStore, Origin, Persisted, PolicyStore, StoreError};
use crate::decision::Decider;
use crate::policy::{PolicyVersion, Snapshot};
use crate::telemetry::metrics::Metrics;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;

/// A version as `Status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    pub version: PolicyVersion,
    /// Microseconds since the Unix epoch when it became active (or was loaded as shadow).
    pub applied_at_us: u64,
    pub applied_by: String,
    pub comment: String,
    pub rules: usize,
    /// Why the store did not keep it (it then lives in memory only), when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_persisted: Option<String>,
}

/// The lifecycle's state, for `Status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `None` when no valid policy is loaded (every call is denied `POLICY_UNAVAILABLE`).
    pub active: Option<VersionInfo>,
    /// The last failed reload since the active version became active, with its time (µs).
    pub last_error: Option<(String, u64)>,
    /// Kept versions, newest first, the active one included.
    pub history: Vec<VersionInfo>,
    pub shadow: Option<VersionInfo>,
    /// Calls the shadow decided otherwise than the active policy, since it was loaded.
    pub shadow_differences: u64,
    /// The store's kind: `files`, `memory` (or `postgres`).
    pub store: &'static str,
}

/// What an apply or a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: PolicyVersion,
    pub previous: Option<PolicyVersion>,
    /// False when the candidate was already the active version (nothing was done).
    pub changed: bool,
    pub persisted: Persisted,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("policy store: {0}")]
    Store(#[from] StoreError),
    #[error("version `{0}` is not among the kept versions (see `pdgate policy status`)")]
    UnknownVersion(String),
    #[error("version prefix `{0}` matches more than one kept version; give more digits")]
    AmbiguousVersion(String),
    #[error(
        "version `{0}` is not a version: give the full version or at least 8 of its hex digits"
    )]
    BadVersion(String),
}

impl ReloadError {
    /// Whether the candidate itself is at fault (invalid, failing tests, unknown version), as
    /// opposed to the sidecar (its store).
    pub fn is_candidate(&self) -> bool {
        !matches!(self, Self::Store(_))
    }
}

struct Kept {
    info: VersionInfo,
    bundle: Bundle,
}

#[derive(Default)]
struct State {
    active: Option<VersionInfo>,
    /// Newest first; the active version is the first when one is active.
    history: VecDeque<Kept>,
    last_error: Option<(String, u64)>,
    /// The last bundle the file watch failed to load: not retried (it would fail the same
    /// way) until the files change again — its tests included, so a fixed test is retried
    /// though the policy files (the version) are the same.
    failed_from_store: Option<Bundle>,
    shadow: Option<VersionInfo>,
}

/// See the module documentation.
pub struct PolicyManager {
    decider: Arc<Decider>,
    store: Arc<dyn PolicyStore>,
    metrics: Option<Arc<Metrics>>,
    keep: usize,
    /// Held from check to swap: one change at a time.
    reload: tokio::sync::Mutex<()>,
    /// Short critical sections only (never held across an await).
    state: Mutex<State>,
    /// The active version after each change; the API's health reporter follows it.
    changes: watch::Sender<Option<PolicyVersion>>,
}

/// A checked candidate, with the change lock held: nothing else can change the policy until
/// it is committed or dropped (dropping it changes nothing).
pub struct Staged<'a> {
    manager: &'a PolicyManager,
    _lock: tokio::sync::MutexGuard<'a, ()>,
    bundle: Bundle,
    /// `None` when the candidate is already the active version.
    checked: Option<Checked>,
    version: PolicyVersion,
    previous: Option<PolicyVersion>,
}

impl PolicyManager {
    /// A manager of `decider`'s policy, keeping `keep` versions (at least 1) in `store`.
    pub fn new(
        decider: Arc<Decider>,
        store: Arc<dyn PolicyStore>,
        keep: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let (changes, _) = watch::channel(decider.policy().map(|p| p.version()));
        Self {
            decider,
            store,
            metrics,
            keep: keep.max(1),
            reload: tokio::sync::Mutex::new(()),
            state: Mutex::default(),
            changes,
        }
    }

    /// A manager with no store (policies live in memory only).
    pub fn in_memory(decider: Arc<Decider>, keep: usize, metrics: Option<Arc<Metrics>>) -> Self {
        Self::new(decider, Arc::new(MemoryStore), keep, metrics)
    }

    pub fn decider(&self) -> &Arc<Decider> {
        &self.decider
    }

    pub fn store(&self) -> &Arc<dyn PolicyStore> {
        &self.store
    }

    /// Follows the active version (health reporting).
    pub fn subscribe(&self) -> watch::Receiver<Option<PolicyVersion>> {
        self.changes.subscribe()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `bundle` is the active policy with the tests it was checked with: nothing to
    /// do. The same version with other tests is a candidate (its tests are run).
    fn is_active(&self, bundle: &Bundle) -> bool {
        let state = self.state();
        let Some(active) = &state.active else {
            return false;
        };
        state
            .history
            .iter()
            .find(|k| k.info.version == active.version)
            .is_some_and(|k| k.bundle.same_as(bundle))
            && self.decider.policy().map(|p| p.version()) == Some(active.version)
    }

    /// Records the policy the decider was started with (loaded from the policy directory,
    /// with `tests`, the directory's tests, kept for a rollback to it).
    pub fn adopt(&self, tests: Vec<TestFile>) {
        let Some(snapshot) = self.decider.policy() else {
            return;
        };
        let info = info_of(&snapshot, &Origin::File, "loaded at start", None);
        let mut state = self.state();
        state.active = Some(info.clone());
        state.history.clear();
        state.history.push_front(Kept {
            info,
            bundle: Bundle {
                source: snapshot.source().clone(),
                tests,
            },
        });
        drop(state);
        self.changes.send_replace(Some(snapshot.version()));
    }

    /// Compiles `bundle` and runs its tests; changes nothing.
    pub async fn validate(&self, bundle: &Bundle) -> Result<Checked, CheckError> {
        check(bundle).await
    }

    /// Takes the change lock and checks `bundle`. A failure is recorded (`Status.last_error`,
    /// log, metric) and the running policy stays.
    pub async fn stage(&self, bundle: Bundle) -> Result<Staged<'_>, ReloadError> {
        let lock = self.reload.lock().await;
        self.stage_locked(lock, bundle).await
    }

    async fn stage_locked<'a>(
        &'a self,
        lock: tokio::sync::MutexGuard<'a, ()>,
        bundle: Bundle,
    ) -> Result<Staged<'a>, ReloadError> {
        let version = bundle.version();
        let previous = self.decider.policy().map(|p| p.version());
        let checked = if self.is_active(&bundle) {
            None
        } else {
            match check(&bundle).await {
                Ok(checked) => Some(checked),
                Err(e) => {
                    let e = ReloadError::Check(e);
                    self.failed(&e, version);
                    return Err(e);
                }
            }
        };
        Ok(Staged {
            manager: self,
            _lock: lock,
            bundle,
            checked,
            version,
            previous,
        })
    }

    /// Check, keep and swap in one go (the file watch, startup tools, benchmarks).
    pub async fn apply(
        &self,
        bundle: Bundle,
        origin: Origin,
        comment: &str,
    ) -> Result<Applied, ReloadError> {
        self.stage(bundle).await?.commit(origin, comment).await
    }

    /// A kept version's bundle, by full version or a prefix of at least 8 hex digits.
    pub fn find(&self, version: &str) -> Result<Bundle, ReloadError> {
        let wanted = version.trim().to_ascii_lowercase();
        if wanted.len() < 8 || wanted.len() > 64 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReloadError::BadVersion(version.to_owned()));
        }
        let state = self.state();
        let mut found = state
            .history
            .iter()
            .filter(|k| k.info.version.to_string().starts_with(&wanted));
        match (found.next(), found.next()) {
            (Some(kept), None) => Ok(kept.bundle.clone()),
            (Some(_), Some(_)) => Err(ReloadError::AmbiguousVersion(version.to_owned())),
            (None, _) => Err(ReloadError::UnknownVersion(version.to_owned())),
        }
    }

    /// Loads the store's current policy when it is not the active one (the file watch calls
    /// this once the files have been quiet for the debounce interval). `Ok(None)`: nothing to
    /// do. A version that already failed is not retried until the store changes again.
    pub async fn reload_from_store(&self, origin: Origin) -> Result<Option<Applied>, ReloadError> {
        let lock = self.reload.lock().await;
        let bundle = match self.store.current().await {
            Ok(Some(bundle)) => bundle,
            Ok(None) => return Ok(None),
            Err(e) => {
                let e = ReloadError::Store(e);
                self.failed(&e, PolicyVersion([0; 32]));
                return Err(e);
            }
        };
        if self.is_active(&bundle) {
            // The store holds the active policy again (an edit reverted, the sidecar's own
            // write after an Apply): an earlier failed reload is no longer pending.
            let mut state = self.state();
            if state.failed_from_store.take().is_some() {
                state.last_error = None;
            }
            return Ok(None);
        }
        if self
            .state()
            .failed_from_store
            .as_ref()
            .is_some_and(|failed| failed.same_as(&bundle))
        {
            return Ok(None);
        }
        let staged = match self.stage_locked(lock, bundle.clone()).await {
            Ok(staged) => staged,
            Err(e) => {
                self.state().failed_from_store = Some(bundle);
                return Err(e);
            }
        };
        let comment = match origin {
            Origin::Fleet => "applied on another sidecar of the fleet",
            Origin::File | Origin::Admin(_) => "policy directory changed",
        };
        staged.commit_as(origin, comment, false).await.map(Some)
    }

    /// Loads a checked candidate ([`validate`](Self::validate): its tests must pass, a shadow
    /// is a candidate for Apply) as the shadow policy.
    pub fn set_shadow(&self, checked: Checked, origin: &Origin, comment: &str) -> VersionInfo {
        let info = info_of(&checked.snapshot, origin, comment, None);
        self.decider.set_shadow(checked.snapshot);
        self.state().shadow = Some(info.clone());
        tracing::info!(version = %info.version, by = %info.applied_by, "shadow policy loaded");
        info
    }

    /// Stops the shadow; its version and differences, when one was loaded.
    pub fn clear_shadow(&self) -> Option<(PolicyVersion, u64)> {
        self.state().shadow = None;
        let cleared = self.decider.clear_shadow();
        if let Some((version, differences)) = cleared {
            tracing::info!(%version, differences, "shadow policy cleared");
        }
        cleared
    }

    pub fn status(&self) -> Status {
        let state = self.state();
        let shadow_differences = self.decider.shadow().map_or(0, |(_, d)| d);
        Status {
            active: state.active.clone(),
            last_error: state.last_error.clone(),
            history: state.history.iter().map(|k| k.info.clone()).collect(),
            shadow: state.shadow.clone(),
            shadow_differences,
            store: self.store.kind(),
        }
    }

    fn failed(&self, error: &ReloadError, version: PolicyVersion) {
        let message = error.to_string();
        tracing::error!(version = %version.short(), error = %message, "policy reload rejected; the running policy stays");
        if let Some(metrics) = &self.metrics {
            metrics.record_reload_failure();
        }
        self.state().last_error = Some((message, crate::audit::now_us()));
    }
}

impl Staged<'_> {
    /// The candidate's version.
    pub fn version(&self) -> PolicyVersion {
        self.version
    }

    /// The version active now (before the commit).
    pub fn previous(&self) -> Option<PolicyVersion> {
        self.previous
    }

    /// Test cases the candidate passed (0 when it is the active version: nothing was run).
    pub fn cases(&self) -> usize {
        self.checked.as_ref().map_or(0, |c| c.cases)
    }

    pub fn rules(&self) -> usize {
        self.checked.as_ref().map_or(0, |c| c.snapshot.rule_count())
    }

    /// Keeps the candidate in the store and makes it active.
    pub async fn commit(self, origin: Origin, comment: &str) -> Result<Applied, ReloadError> {
        self.commit_as(origin, comment, true).await
    }

    async fn commit_as(
        self,
        origin: Origin,
        comment: &str,
        publish: bool,
    ) -> Result<Applied, ReloadError> {
        let manager = self.manager;
        let Some(checked) = self.checked else {
            return Ok(Applied {
                version: self.version,
                previous: self.previous,
                changed: false,
                persisted: Persisted::Yes,
            });
        };
        // The watch loads what the store already holds: nothing to write back.
        let persisted = if publish {
            match manager
                .store
                .publish_by(&self.bundle, &origin.applied_by(), comment)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    let e = ReloadError::Store(e);
                    manager.failed(&e, self.version);
                    return Err(e);
                }
            }
        } else {
            Persisted::Yes
        };
        let not_persisted = match &persisted {
            Persisted::Yes => None,
            Persisted::No(why) => {
                tracing::warn!(version = %self.version.short(), reason = %why, "policy applied in memory only");
                Some(why.clone())
            }
        };
        let info = info_of(&checked.snapshot, &origin, comment, not_persisted);
        // Holding the old snapshot past the swap makes this task, not a call in flight, the
        // one that usually frees it — off the request path (at 100k rules it takes ms).
        let replaced = manager.decider.policy();
        manager.decider.set_policy(checked.snapshot);
        if let Some(old) = replaced {
            tokio::task::spawn_blocking(move || drop(old));
        }
        {
            let mut state = manager.state();
            state.active = Some(info.clone());
            state.last_error = None;
            state.failed_from_store = None;
            state.history.retain(|k| k.info.version != self.version);
            state.history.push_front(Kept {
                info: info.clone(),
                bundle: self.bundle,
            });
            state.history.truncate(manager.keep);
        }
        if let Some(metrics) = &manager.metrics {
            metrics.record_reload();
        }
        manager.changes.send_replace(Some(self.version));
        tracing::info!(
            version = %self.version,
            previous = ?self.previous.map(|v| v.short()),
            by = %info.applied_by,
            rules = info.rules,
            tests = checked.cases,
            "policy swapped in"
        );
        Ok(Applied {
            version: self.version,
            previous: self.previous,
            changed: true,
            persisted,
        })
    }
}

fn info_of(
    snapshot: &Snapshot,
    origin: &Origin,
    comment: &str,
    not_persisted: Option<String>,
) -> VersionInfo {
    VersionInfo {
        version: snapshot.version(),
        applied_at_us: crate::audit::now_us(),
        applied_by: origin.applied_by(),
        comment: comment.to_owned(),
        rules: snapshot.rule_count(),
        not_persisted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::CacheSettings;
    use std::path::Path;

    fn bundle(extra: &str) -> Bundle {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
        let mut b = Bundle::read_dir(&dir, None).unwrap();
        b.source.policy.push_str(extra);
        b
    }

    #[tokio::test]
    async fn history_keeps_the_last_versions_and_a_failure_keeps_the_running_one() {
        let decider = Arc::new(Decider::new(CacheSettings::default()));
        let manager = PolicyManager::in_memory(decider.clone(), 2, None);
        let mut versions = Vec::new();
        for i in 0..3 {
            let applied = manager
                .apply(bundle(&format!("\n# v{i}\n")), Origin::File, "")
                .await
                .unwrap();
            assert!(applied.changed);
            assert_eq!(
                applied.persisted,
                Persisted::No("no policy directory (in-memory store)".into())
            );
            versions.push(applied.version);
        }
        let status = manager.status();
        let kept: Vec<_> = status.history.iter().map(|i| i.version).collect();
        assert_eq!(kept, [versions[2], versions[1]]);
        assert!(matches!(
            manager.find(&versions[0].to_string()),
            Err(ReloadError::UnknownVersion(_))
        ));
        assert!(manager.find(&versions[1].to_string()[..8]).is_ok());

        let broken = manager
            .apply(
                bundle("\np, role:billing, nowhere, customer.name, read, allow\n"),
                Origin::File,
                "",
            )
            .await
            .unwrap_err();
        assert!(broken.is_candidate());
        assert_eq!(decider.policy().unwrap().version(), versions[2]);
        assert!(manager.status().last_error.is_some());
        // A success clears the error.
        manager
            .apply(
                bundle("\n# v0\n"),
                Origin::Admin("security-team".into()),
                "back",
            )
            .await
            .unwrap();
        let status = manager.status();
        assert!(status.last_error.is_none());
        assert_eq!(status.active.unwrap().applied_by, "security-team");
    }

    #[tokio::test]
    async fn reloads_are_serialised() {
        let decider = Arc::new(Decider::new(CacheSettings::default()));
        let manager = Arc::new(PolicyManager::in_memory(decider, 10, None));
        let staged = manager.stage(bundle("\n# a\n")).await.unwrap();
        let other = manager.clone();
        let second =
            tokio::spawn(async move { other.apply(bundle("\n# b\n"), Origin::File, "").await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // The second reload waits for the lock the first one holds.
        assert!(!second.is_finished());
        let first = staged.commit(Origin::File, "").await.unwrap();
        let second = second.await.unwrap().unwrap();
        assert_eq!(second.previous, Some(first.version));
    }
}
