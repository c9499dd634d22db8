//! Fleet mode: policy versions kept in PostgreSQL, shared by every sidecar of the fleet.
//!
//! An Apply (or Rollback) on any sidecar inserts a row into `policy_versions`, NOTIFYs
//! [`NOTIFY_CHANNEL`] and appends it to the fleet's change table in the same transaction; every
//! sidecar's change feed ([`crate::registry::feed`]) hears of it, and its watch
//! ([`super::watch`]) wakes, reads the newest row and reloads it through the
//! same check-then-swap path as any other change (a version that fails its tests on one sidecar
//! is not swapped in there, and `Status` says why). The newest row is the fleet's policy: a
//! sidecar that starts, or whose listener reconnects, loads it.
//!
//! The table keeps every version ever applied (they are small, and they are the record of who
//! changed the policy when); a sidecar keeps the last `keep_versions` of them for Rollback.

use super::bundle::{Bundle, TestFile};
use super::store::{Origin, Persisted, PolicyStore, StoreError};
use crate::policy::{DescriptorFile, PolicySource};
use crate::registry::feed::{self, FleetLink, FleetSettings, PolicySignal};
use sqlx::Row;
use sqlx::postgres::PgPool;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// The channel a new policy version is announced on; the payload is its row id.
pub const NOTIFY_CHANNEL: &str = feed::POLICY_CHANNEL;

/// How long a read waits for a pooled connection before it counts as failed.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// Policy versions in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresPolicyStore {
    /// The sidecar's fleet pool, shared with the subject registry.
    pool: PgPool,
    /// The change feed's news of policy versions: it wakes the watch, and its marker moves
    /// when a version was announced or the feed restarted (a version may have been applied
    /// while it was away).
    signal: Arc<PolicySignal>,
    /// Whether the schema is known to be in place (migrations run once per process).
    migrated: Arc<AtomicBool>,
}

impl PostgresPolicyStore {
    /// A store on the pool and change feed the sidecar's subject cache already runs
    /// ([`crate::registry::SubjectCache::fleet`]).
    pub fn on_link(link: &FleetLink) -> Self {
        Self {
            pool: link.pool.clone(),
            signal: link.policy.clone(),
            migrated: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A store with a pool and a policy-only change feed of its own (a sidecar without a
    /// subject registry). No connection is made here (the sidecar starts while the database is
    /// down: `current` then fails and the sidecar keeps the policy it has). Must be called
    /// inside the tokio runtime: the feed is spawned on it and runs as long as the runtime.
    pub fn start(settings: &FleetSettings) -> Result<Self, StoreError> {
        let pool = feed::pool(settings, ACQUIRE_TIMEOUT)
            .map_err(|e| StoreError::Refused(format!("the fleet database URL: {e}")))?;
        let signal = PolicySignal::new();
        drop(tokio::spawn(feed::run(
            None,
            pool.clone(),
            Some(signal.clone()),
            settings.change_feed,
            crate::registry::SubjectCacheSettings::default(),
        )));
        Ok(Self::on_link(&FleetLink {
            pool,
            policy: signal,
        }))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        feed::migrate(&self.pool).await.map_err(|e| {
            StoreError::Refused(format!(
                "the fleet schema cannot be brought up to date: {e}"
            ))
        })?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    fn bundle_of(row: &sqlx::postgres::PgRow) -> Result<Bundle, StoreError> {
        let get = |name: &str| -> Result<String, StoreError> {
            row.try_get::<String, _>(name)
                .map_err(|e| database("a stored policy version cannot be read", &e))
        };
        let id: i64 = row
            .try_get("id")
            .map_err(|e| database("a stored policy version cannot be read", &e))?;
        let routes: Option<String> = row
            .try_get("routes")
            .map_err(|e| database("a stored policy version cannot be read", &e))?;
        let tests_json = get("tests")?;
        let tests: Vec<(String, String)> = serde_json::from_str(&tests_json).map_err(|e| {
            StoreError::Refused(format!(
                "stored policy version {id}: its tests are not readable ({e})"
            ))
        })?;
        let unreadable = |e: &dyn std::fmt::Display| {
            StoreError::Refused(format!(
                "stored policy version {id}: its descriptors are not readable ({e})"
            ))
        };
        let descriptors: Vec<(String, String)> =
            serde_json::from_str(&get("descriptors")?).map_err(|e| unreadable(&e))?;
        let descriptors = descriptors
            .into_iter()
            .map(|(name, content)| {
                hex::decode(content)
                    .map(|content| DescriptorFile { name, content })
                    .map_err(|e| unreadable(&e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Bundle {
            source: PolicySource {
                origin: PathBuf::from(format!("postgres:policy_versions/{id}")),
                model: get("model")?,
                policy: get("policy")?,
                taxonomy: get("taxonomy")?,
                routes,
                descriptors,
            },
            tests: tests
                .into_iter()
                .map(|(name, content)| TestFile { name, content })
                .collect(),
        })
    }
}

fn database(what: &str, e: &sqlx::Error) -> StoreError {
    StoreError::Refused(format!("{what}: {e}"))
}

#[async_trait::async_trait]
impl PolicyStore for PostgresPolicyStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn current(&self) -> Result<Option<Bundle>, StoreError> {
        self.migrate().await?;
        let unreadable = |e: sqlx::Error| database("the fleet's policy cannot be read", &e);
        // In a transaction: behind a transaction-mode pooler a statement's parse and execution
        // must reach the same server connection.
        let mut tx = self.pool.begin().await.map_err(unreadable)?;
        let row = sqlx::query(
            "SELECT id, model, policy, taxonomy, routes, tests, descriptors FROM policy_versions ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(unreadable)?;
        tx.commit().await.map_err(unreadable)?;
        row.as_ref().map(Self::bundle_of).transpose()
    }

    async fn marker(&self) -> Option<u64> {
        // Moves when the change feed announced a version or restarted: no query while nothing
        // changes. While the feed is down the policy in force stays.
        Some(self.signal.marker())
    }

    async fn publish(&self, bundle: &Bundle) -> Result<Persisted, StoreError> {
        self.publish_by(bundle, "", "").await
    }

    async fn publish_by(
        &self,
        bundle: &Bundle,
        applied_by: &str,
        comment: &str,
    ) -> Result<Persisted, StoreError> {
        self.migrate().await?;
        let tests: Vec<(&str, &str)> = bundle
            .tests
            .iter()
            .map(|t| (t.name.as_str(), t.content.as_str()))
            .collect();
        let tests = serde_json::to_string(&tests)
            .map_err(|e| StoreError::Refused(format!("the tests cannot be encoded: {e}")))?;
        let descriptors: Vec<(&str, String)> = bundle
            .source
            .descriptors
            .iter()
            .map(|d| (d.name.as_str(), hex::encode(&d.content)))
            .collect();
        let descriptors = serde_json::to_string(&descriptors)
            .map_err(|e| StoreError::Refused(format!("the descriptors cannot be encoded: {e}")))?;
        let version = hex::encode(bundle.source.digest());
        // The insert and the notification commit together: a sidecar woken by the
        // notification always finds the row.
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| database("the fleet database cannot be reached", &e))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO policy_versions \
             (version, model, policy, taxonomy, routes, tests, applied_by, comment, descriptors) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        )
        .bind(&version)
        .bind(&bundle.source.model)
        .bind(&bundle.source.policy)
        .bind(&bundle.source.taxonomy)
        .bind(&bundle.source.routes)
        .bind(&tests)
        .bind(applied_by)
        .bind(comment)
        .bind(&descriptors)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| database("the policy version cannot be stored", &e))?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| database("the new version cannot be announced", &e))?;
        feed::record_change(&mut tx, "policy", &id.to_string())
            .await
            .map_err(|e| database("the new version cannot be announced", &e))?;
        tx.commit()
            .await
            .map_err(|e| database("the policy version cannot be stored", &e))?;
        Ok(Persisted::Yes)
    }

    fn wakeup(&self) -> Option<Arc<Notify>> {
        Some(self.signal.wake())
    }

    fn settles(&self) -> bool {
        false
    }

    fn origin(&self) -> Origin {
        Origin::Fleet
    }
}
