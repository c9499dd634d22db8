//! The embedded store: one SQLite file, created on first use, in WAL mode so that reads never
//! wait for a write.

use super::{
    Action, Change, Event, EventRow, RecordBuilder, RegistryError, SubjectRecord, SubjectRegistry,
    event_from_row, now_us, validate_subject, version,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection};
use std::path::Path;
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a change waits for another process's write to finish before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A subject registry in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteRegistry {
    pool: SqlitePool,
    /// The path, in backticks, for error messages.
    location: String,
}

impl SqliteRegistry {
    /// Opens the registry at `path`, creating the file (not its directory) and the schema on
    /// first use, and bringing an older schema up to date.
    pub async fn open(path: &Path) -> Result<Self, RegistryError> {
        Self::connect(path, true).await
    }

    /// Opens the registry at `path` if the file exists; `Ok(None)` if it does not. For commands
    /// that only read, which should not leave an empty database behind a mistyped path.
    pub async fn open_existing(path: &Path) -> Result<Option<Self>, RegistryError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // Anything else (a path through a regular file, no permission) is for SQLite to
            // report, with the same error as a change would get.
            _ => Self::connect(path, false).await.map(Some),
        }
    }

    async fn connect(path: &Path, create: bool) -> Result<Self, RegistryError> {
        let location = format!("`{}`", path.display());
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            // A withdrawn consent must not come back after a power loss: every commit is
            // synced (NORMAL, the usual WAL setting, may lose the last commits).
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| RegistryError::Open {
                location: location.clone(),
                source,
            })?;
        // Two processes opening a new file at once can both try the first migration; the loser
        // fails on the migration table's key. A second run then finds it applied.
        if let Err(first) = MIGRATOR.run(&pool).await {
            tracing::debug!(error = %first, "subject registry migration failed; retrying once");
            MIGRATOR
                .run(&pool)
                .await
                .map_err(|source| RegistryError::Migrate {
                    location: location.clone(),
                    source,
                })?;
        }
        Ok(Self { pool, location })
    }

    /// Where the change feed stands now: the newest history row. [`Self::changes_since`] from
    /// it returns the changes committed after this call.
    pub async fn change_cursor(&self) -> Result<i64, RegistryError> {
        sqlx::query_scalar("SELECT COALESCE(MAX(rowid), 0) FROM subject_events")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// The changes committed after `cursor` (subject and version, oldest first), and the cursor
    /// after them. This is the embedded store's change feed, for a sidecar to notice changes
    /// that another process (`pdgate subjects --store`) wrote into the file.
    ///
    /// The history is append-only and every change takes the write lock (`BEGIN IMMEDIATE`)
    /// before it appends, so rowids grow in commit order and a row below the cursor can never
    /// appear later: polling from the last cursor sees every change exactly once.
    pub async fn changes_since(
        &self,
        cursor: i64,
    ) -> Result<(Vec<super::Notification>, i64), RegistryError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT rowid, subject, version FROM subject_events WHERE rowid > ?1 ORDER BY rowid",
        )
        .bind(cursor)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.unavailable(e))?;
        let next = rows.last().map_or(cursor, |(rowid, _, _)| *rowid);
        let changes = rows
            .into_iter()
            .map(|(_, subject, stored)| {
                Ok(super::Notification {
                    subject,
                    version: version(&self.location, stored)?,
                })
            })
            .collect::<Result<_, RegistryError>>()?;
        Ok((changes, next))
    }

    fn unavailable(&self, source: sqlx::Error) -> RegistryError {
        RegistryError::Unavailable {
            location: self.location.clone(),
            source,
        }
    }

    async fn read(
        &self,
        conn: &mut SqliteConnection,
        subject: &str,
    ) -> Result<Option<SubjectRecord>, RegistryError> {
        // One statement, so the state and its consents come from one snapshot.
        let rows = sqlx::query(
            "SELECT s.version, s.use_suspended, s.provision_suspended, s.deletion_requested,
                    c.communications, c.purpose
             FROM subjects s LEFT JOIN subject_consents c ON c.subject = s.subject
             WHERE s.subject = ?1",
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

#[async_trait::async_trait]
impl SubjectRegistry for SqliteRegistry {
    async fn get(&self, subject: &str) -> Result<Option<SubjectRecord>, RegistryError> {
        validate_subject(subject)?;
        let mut conn = self.pool.acquire().await.map_err(|e| self.unavailable(e))?;
        self.read(&mut conn, subject).await
    }

    async fn apply(&self, change: &Change) -> Result<SubjectRecord, RegistryError> {
        change.validate()?;
        let subject = change.subject.as_str();
        // IMMEDIATE takes the write lock before anything is read: a deferred transaction that
        // reads and then writes fails with SQLITE_BUSY, without waiting, when another writer got
        // in between. (The upsert below writes first anyway; this keeps it so if it changes.)
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.unavailable(e))?;
        // Taken under the write lock, so times follow versions (unless the clock steps back).
        let at_us = now_us();
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO subjects (subject, version) VALUES (?1, 1)
             ON CONFLICT (subject) DO UPDATE SET version = version + 1
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
                 VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )
            .bind(subject)
            .bind(communications)
            .bind(purpose),
            Action::Withdraw {
                purpose,
                communications,
            } => sqlx::query(
                "DELETE FROM subject_consents
                 WHERE subject = ?1 AND communications = ?2 AND purpose = ?3",
            )
            .bind(subject)
            .bind(communications)
            .bind(purpose),
            Action::SuspendUse | Action::ResumeUse => {
                sqlx::query("UPDATE subjects SET use_suspended = ?2 WHERE subject = ?1")
                    .bind(subject)
                    .bind(matches!(change.action, Action::SuspendUse))
            }
            Action::SuspendProvision | Action::ResumeProvision => {
                sqlx::query("UPDATE subjects SET provision_suspended = ?2 WHERE subject = ?1")
                    .bind(subject)
                    .bind(matches!(change.action, Action::SuspendProvision))
            }
            Action::RequestDeletion => {
                sqlx::query("UPDATE subjects SET deletion_requested = 1 WHERE subject = ?1")
                    .bind(subject)
            }
        };
        mutation
            .execute(&mut *tx)
            .await
            .map_err(|e| self.unavailable(e))?;
        let (purpose, communications) = change.action.purpose().unzip();
        sqlx::query(
            "INSERT INTO subject_events
                 (subject, version, at_us, actor, source, change, purpose, communications)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(subject)
        .bind(version)
        .bind(at_us)
        .bind(&change.actor)
        .bind(&change.source)
        .bind(change.action.name())
        .bind(purpose)
        .bind(communications.unwrap_or(false))
        .execute(&mut *tx)
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
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT version, at_us, actor, source, change, purpose, communications
             FROM subject_events WHERE subject = ?1 ORDER BY version",
        )
        .bind(subject)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.unavailable(e))?;
        rows.into_iter()
            .map(|row| event_from_row(&self.location, subject, row))
            .collect()
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
