//! Fleet mode: policy versions kept in PostgreSQL, shared by every sidecar of the fleet.
//!
//! An Apply (or Rollback) on any sidecar inserts a row into `policy_versions` and NOTIFYs
//! [`NOTIFY_CHANNEL`] in the same transaction; every sidecar LISTENs, and its watch
//! ([`super::watch`]) wakes on the notification, reads the newest row and reloads it through the
//! same check-then-swap path as any other change (a version that fails its tests on one sidecar
//! is not swapped in there, and `Status` says why). The newest row is the fleet's policy: a
//! sidecar that starts, or whose listener reconnects, loads it.
//!
//! The table keeps every version ever applied (they are small, and they are the record of who
//! changed the policy when); a sidecar keeps the last `keep_versions` of them for Rollback.

use super::bundle::{Bundle, TestFile};
use super::store::{Origin, Persisted, PolicyStore, StoreError};
use crate::policy::{DescriptorFile, PolicySource};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// The channel a new policy version is announced on; the payload is its row id.
pub const NOTIFY_CHANNEL: &str = "pdgate_policy";

/// The same migrations as the subject registry: one schema per fleet database.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a read waits for a pooled connection before it counts as failed.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// Policy versions in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresPolicyStore {
    /// One connection is held by the listener; the others serve reads and applies.
    pool: PgPool,
    /// Woken by every notification, and when the listener (re)connects — a version may have
    /// been applied while it was away. The watch waits on it.
    wake: Arc<Notify>,
    /// Whether the schema is known to be in place (migrations run once per process).
    migrated: Arc<AtomicBool>,
}

impl PostgresPolicyStore {
    /// A store for `url`; no connection is made here (the sidecar starts while the database is
    /// down: `current` then fails and the sidecar keeps the policy it has). Statements running
    /// longer than `statement_timeout` are cancelled by the server.
    pub fn connect_lazy(url: &str, statement_timeout: Duration) -> Result<Self, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Refused(
                "the fleet database URL must start with `postgres://` or `postgresql://`".into(),
            ));
        }
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Refused(format!("the fleet database URL: {e}")))?
            .options([(
                "statement_timeout",
                statement_timeout.as_millis().max(1).to_string(),
            )])
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            wake: Arc::new(Notify::new()),
            migrated: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        MIGRATOR.run(&self.pool).await.map_err(|e| {
            StoreError::Refused(format!(
                "the fleet schema cannot be brought up to date: {e}"
            ))
        })?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    /// Listens for new versions until `shutdown` completes, reconnecting with a growing pause
    /// (up to 5 s) while the database is away. Every (re)connection wakes the watch too.
    pub async fn listen(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut pause = Duration::from_millis(100);
        loop {
            let connected = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen(NOTIFY_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                () = &mut shutdown => return,
                result = connected => match result {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?pause, "fleet policy listener cannot connect");
                        tokio::select! {
                            () = &mut shutdown => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            pause = Duration::from_millis(100);
            // Anything applied while we were not listening is picked up now.
            self.wake.notify_one();
            loop {
                tokio::select! {
                    () = &mut shutdown => return,
                    received = listener.try_recv() => match received {
                        Ok(Some(_)) => self.wake.notify_one(),
                        // `None`: the connection was lost (sqlx reconnects on the next
                        // call); a version may have been missed meanwhile.
                        Ok(None) => self.wake.notify_one(),
                        Err(e) => {
                            tracing::warn!(error = %e, "fleet policy listener lost its connection");
                            break;
                        }
                    },
                }
            }
        }
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
        let row = sqlx::query(
            "SELECT id, model, policy, taxonomy, routes, tests, descriptors FROM policy_versions ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| database("the fleet's policy cannot be read", &e))?;
        row.as_ref().map(Self::bundle_of).transpose()
    }

    async fn marker(&self) -> Option<u64> {
        // The newest row id: it changes exactly when a version is applied. While the database
        // cannot be read there is no marker, and the watch keeps the policy it has.
        if self.migrate().await.is_err() {
            return None;
        }
        sqlx::query_scalar::<_, Option<i64>>("SELECT max(id) FROM policy_versions")
            .fetch_one(&self.pool)
            .await
            .ok()
            .flatten()
            .and_then(|id| u64::try_from(id).ok())
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
        tx.commit()
            .await
            .map_err(|e| database("the policy version cannot be stored", &e))?;
        Ok(Persisted::Yes)
    }

    fn wakeup(&self) -> Option<Arc<Notify>> {
        Some(self.wake.clone())
    }

    fn settles(&self) -> bool {
        false
    }

    fn origin(&self) -> Origin {
        Origin::Fleet
    }
}
