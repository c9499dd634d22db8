//! The fleet store: PostgreSQL shared by several sidecars. Every change is NOTIFYed on
//! [`NOTIFY_CHANNEL`] and appended to the fleet's change table when it commits, so that
//! sidecars can drop what they cached (see [`super::feed`]).

use super::{
    Action, Change, Event, EventRow, RecordBuilder, RegistryError, SubjectRecord, SubjectRegistry,
    event_from_row, validate_subject, version,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Row};
use std::str::FromStr;
use std::time::Duration;

/// The channel every change is NOTIFYed on; the payload is a [`Notification`].
pub const NOTIFY_CHANNEL: &str = super::feed::SUBJECT_CHANNEL;

/// How long `connect` and each later query wait for a connection: an unreachable database is
/// reported within it instead of hanging the caller.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The payload of a change notification: `"<version> <subject>"`. A subject id has no
/// whitespace, so the first space separates the two; sent inside the change's transaction, so
/// a listener hears of a change only once it is visible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub subject: String,
    pub version: u64,
}

impl Notification {
    pub fn payload(&self) -> String {
        format!("{} {}", self.version, self.subject)
    }

    pub fn parse(payload: &str) -> Option<Self> {
        let (version, subject) = payload.split_once(' ')?;
        Some(Self {
            subject: subject.to_owned(),
            version: version.parse().ok()?,
        })
    }
}

/// A subject registry in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresRegistry {
    pool: PgPool,
    /// `postgres://user@host:port/database`, never the password, for error messages.
    location: String,
}

impl PostgresRegistry {
    /// Connects to `url` (a `postgres://` URL; `?options=-c%20search_path%3DSCHEMA` chooses the
    /// schema), creates or updates the schema, and keeps a small pool.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        // sqlx would take any scheme as PostgreSQL; a `mysql://` URL is a mistake to name.
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(RegistryError::InvalidUrl(
                "it must start with `postgres://` or `postgresql://`".into(),
            ));
        }
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| RegistryError::InvalidUrl(e.to_string()))?;
        let location = location(&options);
        // One connection first, so that an unreachable database is reported with its cause
        // (refused, unknown host, authentication) at once: the pool retries until its timeout and
        // then reports only that it timed out.
        let first = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            .map_err(|source| RegistryError::Open {
                location: location.clone(),
                source,
            })?;
        drop(first.close().await);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Self::from_pool(pool).await
    }

    /// A registry for a sidecar: no connection is made here (the sidecar starts while the
    /// database is down; every read then fails, and subject-dependent calls are denied, until it
    /// is up). Statements running longer than `statement_timeout` are cancelled by the server,
    /// and a read waits at most `acquire_timeout` for a connection. The schema is brought up to
    /// date by [`Self::migrate`], which the sidecar's change listener calls once it reaches the
    /// database.
    pub fn connect_lazy(
        url: &str,
        statement_timeout: Duration,
        acquire_timeout: Duration,
    ) -> Result<Self, RegistryError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(RegistryError::InvalidUrl(
                "it must start with `postgres://` or `postgresql://`".into(),
            ));
        }
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| RegistryError::InvalidUrl(e.to_string()))?
            .options([(
                "statement_timeout",
                statement_timeout.as_millis().max(1).to_string(),
            )]);
        let location = location(&options);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self { pool, location })
    }

    /// Creates or updates the schema (an advisory lock makes sidecars starting together apply
    /// it once).
    pub async fn migrate(&self) -> Result<(), RegistryError> {
        super::feed::migrate(&self.pool)
            .await
            .map_err(|source| RegistryError::Migrate {
                location: self.location.clone(),
                source,
            })
    }

    /// Uses an existing pool (its connect options choose the database and schema); creates or
    /// updates the schema. Migrations take an advisory lock, so sidecars starting together
    /// apply them once.
    pub async fn from_pool(pool: PgPool) -> Result<Self, RegistryError> {
        let location = location(&pool.connect_options());
        super::feed::migrate(&pool)
            .await
            .map_err(|source| RegistryError::Migrate {
                location: location.clone(),
                source,
            })?;
        Ok(Self { pool, location })
    }

    /// A registry on the sidecar's fleet pool ([`super::feed::pool`]); no connection is made
    /// and no migration run here (the change feed migrates once it reaches the database).
    pub fn from_lazy_pool(pool: PgPool) -> Self {
        let location = location(&pool.connect_options());
        Self { pool, location }
    }

    /// The pool, for a `PgListener` on [`NOTIFY_CHANNEL`] (`PgListener::connect_with`).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn unavailable(&self, source: sqlx::Error) -> RegistryError {
        RegistryError::Unavailable {
            location: self.location.clone(),
            source,
        }
    }

    async fn read(
        &self,
        conn: &mut PgConnection,
        subject: &str,
    ) -> Result<Option<SubjectRecord>, RegistryError> {
        // One statement, so the state and its consents come from one snapshot.
        let rows = sqlx::query(
            "SELECT s.version, s.use_suspended, s.provision_suspended, s.deletion_requested,
                    c.communications, c.purpose
             FROM subjects s LEFT JOIN subject_consents c ON c.subject = s.subject
             WHERE s.subject = $1",
        )
        .bind(subject)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| self.unavailable(e))?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut record = RecordBuilder::new(
            version(
                &self.location,
                first.try_get(0).map_err(|e| self.unavailable(e))?,
            )?,
            first.try_get(1).map_err(|e| self.unavailable(e))?,
            first.try_get(2).map_err(|e| self.unavailable(e))?,
            first.try_get(3).map_err(|e| self.unavailable(e))?,
        );
        for row in &rows {
            let communications: Option<bool> = row.try_get(4).map_err(|e| self.unavailable(e))?;
            let purpose: Option<String> = row.try_get(5).map_err(|e| self.unavailable(e))?;
            if let (Some(communications), Some(purpose)) = (communications, purpose) {
                record.consent(communications, purpose);
            }
        }
        Ok(Some(record.record))
    }
}

/// Where the database is, without the password.
fn location(options: &PgConnectOptions) -> String {
    format!(
        "`postgres://{}@{}:{}/{}`",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    )
}

#[async_trait::async_trait]
impl SubjectRegistry for PostgresRegistry {
    async fn get(&self, subject: &str) -> Result<Option<SubjectRecord>, RegistryError> {
        validate_subject(subject)?;
        // A transaction even for one read: behind a transaction-mode pooler the statement's
        // parse and execution must reach the same server connection.
        let mut tx = self.pool.begin().await.map_err(|e| self.unavailable(e))?;
        let record = self.read(&mut tx, subject).await?;
        tx.commit().await.map_err(|e| self.unavailable(e))?;
        Ok(record)
    }

    async fn apply(&self, change: &Change) -> Result<SubjectRecord, RegistryError> {
        change.validate()?;
        let subject = change.subject.as_str();
        let mut tx = self.pool.begin().await.map_err(|e| self.unavailable(e))?;
        // The upsert locks the subject's row until commit: a concurrent change to the same
        // subject waits here and then reads the committed version (READ COMMITTED re-reads the
        // row after the wait), so no update is lost.
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO subjects (subject, version) VALUES ($1, 1)
             ON CONFLICT (subject) DO UPDATE SET version = subjects.version + 1
             RETURNING version",
        )
        .bind(subject)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.unavailable(e))?;
        let mutation = match &change.action {
            Action::Consent {
                purpose,
                communications,
            } => sqlx::query(
                "INSERT INTO subject_consents (subject, communications, purpose)
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(subject)
            .bind(*communications)
            .bind(purpose),
            Action::Withdraw {
                purpose,
                communications,
            } => sqlx::query(
                "DELETE FROM subject_consents
                 WHERE subject = $1 AND communications = $2 AND purpose = $3",
            )
            .bind(subject)
            .bind(*communications)
            .bind(purpose),
            Action::SuspendUse | Action::ResumeUse => {
                sqlx::query("UPDATE subjects SET use_suspended = $2 WHERE subject = $1")
                    .bind(subject)
                    .bind(matches!(change.action, Action::SuspendUse))
            }
            Action::SuspendProvision | Action::ResumeProvision => {
                sqlx::query("UPDATE subjects SET provision_suspended = $2 WHERE subject = $1")
                    .bind(subject)
                    .bind(matches!(change.action, Action::SuspendProvision))
            }
            Action::RequestDeletion => {
                sqlx::query("UPDATE subjects SET deletion_requested = true WHERE subject = $1")
                    .bind(subject)
            }
        };
        mutation
            .execute(&mut *tx)
            .await
            .map_err(|e| self.unavailable(e))?;
        let (purpose, communications) = change.action.purpose().unzip();
        // clock_timestamp(), not now(): taken after the row lock, so times follow versions even
        // when a transaction that started earlier waited for a later one.
        sqlx::query(
            "INSERT INTO subject_events
                 (subject, version, at, actor, source, change, purpose, communications)
             VALUES ($1, $2, clock_timestamp(), $3, $4, $5, $6, $7)",
        )
        .bind(subject)
        .bind(version)
        .bind(&change.actor)
        .bind(&change.source)
        .bind(change.action.name())
        .bind(purpose)
        .bind(communications.unwrap_or(false))
        .execute(&mut *tx)
        .await
        .map_err(|e| self.unavailable(e))?;
        let notification = Notification {
            subject: subject.to_owned(),
            version: u64::try_from(version).unwrap_or_default(),
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(notification.payload())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.unavailable(e))?;
        // Last: from here the fleet's change counter is locked until the commit.
        super::feed::record_change(&mut tx, "subject", &notification.payload())
            .await
            .map_err(|e| self.unavailable(e))?;
        let record = self.read(&mut tx, subject).await?;
        tx.commit().await.map_err(|e| self.unavailable(e))?;
        record.ok_or_else(|| RegistryError::Corrupt {
            location: self.location.clone(),
            detail: format!("subject `{subject}` vanished inside its own change"),
        })
    }

    async fn history(&self, subject: &str) -> Result<Vec<Event>, RegistryError> {
        validate_subject(subject)?;
        let mut tx = self.pool.begin().await.map_err(|e| self.unavailable(e))?;
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT version, (extract(epoch FROM at) * 1000000)::bigint, actor, source, change,
                    purpose, communications
             FROM subject_events WHERE subject = $1 ORDER BY version",
        )
        .bind(subject)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.unavailable(e))?;
        tx.commit().await.map_err(|e| self.unavailable(e))?;
        rows.into_iter()
            .map(|row| event_from_row(&self.location, subject, row))
            .collect()
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::Notification;

    #[test]
    fn notification_payload_round_trips() {
        let n = Notification {
            subject: "cust-1".into(),
            version: 42,
        };
        assert_eq!(n.payload(), "42 cust-1");
        assert_eq!(Notification::parse(&n.payload()), Some(n));
        assert_eq!(Notification::parse("cust-1"), None);
        assert_eq!(Notification::parse("x cust-1"), None);
    }
}
