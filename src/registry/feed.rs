//! Fleet mode's connection to PostgreSQL: one pool and one change feed per sidecar, shared by
//! the subject registry and the policy store.
//!
//! # Connections
//!
//! The pool opens connections on demand and closes each one unused for `[fleet]
//! idle_timeout_ms`; it never holds more than `[fleet] max_connections`. An idle sidecar thus
//! holds only what its change feed needs: one LISTEN connection (`listen`), or none between two
//! reads of the change table (`poll`).
//!
//! # The change feed
//!
//! Two kinds of change reach every sidecar through one feed: subject changes (the cache marks
//! the subject outdated) and policy versions (the policy watch wakes and loads the newest one).
//!
//! - `listen`: one `PgListener` on [`SUBJECT_CHANNEL`], [`POLICY_CHANNEL`] and a heartbeat
//!   channel of the sidecar's own. The heartbeat NOTIFY is sent on the listener's own
//!   connection every `heartbeat_interval`: when it comes back, every change committed before
//!   it has been delivered (NOTIFYs arrive in commit order), which confirms the cache. A
//!   listener that stays silent is replaced; after any reconnection the cache is dropped and the
//!   policy reread, since changes may have been missed in between. LISTEN needs a session of
//!   its own, so this mode needs the database itself (or a session-mode pooler).
//! - `poll`: every `poll_interval` one transaction reads `fleet_changes` after the last id
//!   seen (see `migrations/postgres/0004_fleet_changes.sql`: ids commit in order, without
//!   gaps). Each read that succeeds confirms the cache as of when it began. Nothing is held
//!   between reads, so it works through a transaction-mode pooler (PgBouncer), which then bounds
//!   the database's connections whatever the number of sidecars. Every statement runs inside an
//!   explicit transaction and no statement is kept prepared: a transaction-mode pooler may hand
//!   each transaction to a different server connection.
//!
//! While the feed is down, the cache's confirmation stops advancing and the cache's own rules
//! apply (read again past `refresh_after`, deny subject-dependent calls past `stale_after`);
//! the policy in force stays in force.

use super::cache::{SubjectCache, SubjectCacheSettings};
use super::{Notification, RegistryError};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection};
use std::borrow::Cow;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Subject changes; the payload is a [`Notification`].
pub const SUBJECT_CHANNEL: &str = "pdgate_subjects";
/// Policy versions; the payload is the version's row id.
pub const POLICY_CHANNEL: &str = "pdgate_policy";

/// The schema of a fleet database (the registry's and the policy versions').
pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The key of the transaction-level advisory lock that makes sidecars starting together apply
/// the migrations once ("pdgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x7064_6761_7465;

/// Rows read from the change table at most per transaction.
const POLL_BATCH: i64 = 1000;

/// Change rows older than this are pruned (by every thousandth writer).
const KEEP_CHANGES: &str = "15 minutes";

/// Backoff of the listener's reconnection.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Creates or updates the fleet schema in one transaction, serialised between sidecars by a
/// transaction-level advisory lock (a session-level lock, as sqlx's own migrator takes, would
/// stay with whichever server connection a transaction-mode pooler gave it).
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let migrator = Migrator {
        migrations: Cow::Borrowed(&*MIGRATOR.migrations),
        ignore_missing: false,
        locking: false,
        no_tx: false,
    };
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    // Each migration's own transaction becomes a savepoint of this one.
    migrator.run_direct(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Appends a change to `fleet_changes` inside the caller's transaction; returns its id. Call it
/// last before the commit: from here on the change counter's row is locked, and every other
/// change of the fleet waits for this commit.
pub async fn record_change(
    tx: &mut PgConnection,
    kind: &str,
    payload: &str,
) -> Result<i64, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(
        "WITH next AS (UPDATE fleet_change_counter SET last = last + 1 RETURNING last)
         INSERT INTO fleet_changes (id, kind, payload) SELECT last, $1, $2 FROM next
         RETURNING id",
    )
    .bind(kind)
    .bind(payload)
    .fetch_one(&mut *tx)
    .await?;
    if id % 1000 == 0 {
        sqlx::query(&format!(
            "DELETE FROM fleet_changes WHERE id < $1 AND at < clock_timestamp() - interval '{KEEP_CHANGES}'"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    Ok(id)
}

/// The pool of one sidecar: connections opened on demand, closed after `idle_timeout`, at most
/// `max_connections`, tagged with `application_name` (the URL's, else `[fleet]`'s). With the `poll` feed (through a
/// transaction-mode pooler) no statement is kept prepared, and no `options` startup parameter is
/// sent (PgBouncer refuses it): set `statement_timeout` on the database role instead.
pub fn pool(settings: &FleetSettings, acquire_timeout: Duration) -> Result<PgPool, RegistryError> {
    let url = settings.database_url.as_str();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(RegistryError::InvalidUrl(
            "it must start with `postgres://` or `postgresql://`".into(),
        ));
    }
    let mut options = PgConnectOptions::from_str(url)
        .map_err(|e| RegistryError::InvalidUrl(e.to_string()))?
        .disable_statement_logging();
    // An `application_name` in the URL names this sidecar's sessions; otherwise
    // `[fleet] application_name` does.
    if options.get_application_name().is_none() {
        options = options.application_name(&settings.application_name);
    }
    match settings.change_feed {
        ChangeFeed::Listen => {
            options = options.options([(
                "statement_timeout",
                settings.statement_timeout.as_millis().max(1).to_string(),
            )]);
        }
        ChangeFeed::Poll(_) => options = options.statement_cache_capacity(0),
    }
    Ok(PgPoolOptions::new()
        .min_connections(0)
        .max_connections(settings.max_connections)
        .idle_timeout(settings.idle_timeout)
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with(options))
}

/// What the policy store learns from the feed: the newest policy version id announced, and how
/// often the feed (re)started (after which a version may have been missed). Its
/// [`marker`](Self::marker) changes exactly when the policy must be looked at again, so the
/// policy watch needs no query of its own while nothing changes.
#[derive(Debug, Default)]
pub struct PolicySignal {
    wake: Arc<Notify>,
    newest: AtomicU64,
    generation: AtomicU64,
    /// Whether the feed is delivering now.
    live: AtomicBool,
}

impl PolicySignal {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Woken on every announced version and every (re)start of the feed.
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Changes when a version was announced or the feed restarted.
    pub fn marker(&self) -> u64 {
        let generation = self.generation.load(Ordering::Acquire);
        let newest = self.newest.load(Ordering::Acquire);
        (generation << 40) ^ newest
    }

    /// Whether the feed is connected (listen) or its last read succeeded (poll).
    pub fn live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    fn announced(&self, id: u64) {
        self.newest.fetch_max(id, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn restarted(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.live.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn down(&self) {
        self.live.store(false, Ordering::Release);
    }
}

/// The pool and the feed's policy signal, for the policy store of the same sidecar.
#[derive(Debug, Clone)]
pub struct FleetLink {
    pub pool: PgPool,
    pub policy: Arc<PolicySignal>,
}

/// Where the feed delivers.
struct Targets {
    /// `None`: a policy-only feed, which runs as long as the runtime.
    cache: Option<Weak<SubjectCache>>,
    policy: Option<Arc<PolicySignal>>,
}

impl Targets {
    /// The cache was dropped: the feed ends.
    fn gone(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.strong_count() == 0)
    }

    fn cache(&self) -> Option<Arc<SubjectCache>> {
        self.cache.as_ref().and_then(Weak::upgrade)
    }

    fn now_us(&self) -> u64 {
        self.cache().map_or(0, |c| c.now_us())
    }

    fn confirm(&self, at_us: u64) {
        if let Some(cache) = self.cache() {
            cache.confirm(at_us);
        }
    }

    /// The feed (re)started: whatever happened before is unknown.
    fn restarted(&self) {
        if let Some(cache) = self.cache() {
            cache.reset();
        }
        if let Some(policy) = &self.policy {
            policy.restarted();
        }
    }

    fn down(&self) {
        if let Some(policy) = &self.policy {
            policy.down();
        }
    }

    fn subject(&self, payload: &str) {
        match Notification::parse(payload) {
            Some(change) => {
                if let Some(cache) = self.cache() {
                    cache.notify(&change);
                }
            }
            None => tracing::warn!(%payload, "unreadable subject change notification ignored"),
        }
    }

    fn policy(&self, payload: &str) {
        if let Some(policy) = &self.policy {
            // An unreadable id still means "look again": the marker's generation moves.
            match payload.trim().parse::<u64>() {
                Ok(id) => policy.announced(id),
                Err(_) => policy.restarted(),
            }
        }
    }
}

/// Runs the change feed of one sidecar until `cache` is dropped (or for good, without a cache).
pub(crate) async fn run(
    cache: Option<Weak<SubjectCache>>,
    pool: PgPool,
    policy: Option<Arc<PolicySignal>>,
    mode: ChangeFeed,
    settings: SubjectCacheSettings,
) {
    let targets = Targets { cache, policy };
    match mode {
        ChangeFeed::Listen => listen(&targets, &pool, &settings).await,
        ChangeFeed::Poll(every) => poll(&targets, &pool, every, settings.read_timeout).await,
    }
}

async fn listen(targets: &Targets, pool: &PgPool, s: &SubjectCacheSettings) {
    // A channel of this sidecar's own for its heartbeats (lowercase: LISTEN folds case).
    let heartbeat_channel = format!(
        "pdgate_hb_{:016x}",
        getrandom::u64().unwrap_or_else(|_| {
            u64::from(std::process::id()) << 32 | u64::from(Instant::now().elapsed().subsec_nanos())
        })
    );
    let mut migrated = false;
    let mut backoff = BACKOFF_MIN;
    let mut down_logged = false;
    loop {
        if targets.gone() {
            return;
        }
        let connected = async {
            if !migrated {
                migrate(pool).await.map_err(|e| e.to_string())?;
                migrated = true;
            }
            let mut listener = PgListener::connect_with(pool)
                .await
                .map_err(|e| e.to_string())?;
            listener
                .listen_all([SUBJECT_CHANNEL, POLICY_CHANNEL, heartbeat_channel.as_str()])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(listener)
        };
        let mut listener = match connected.await {
            Ok(l) => l,
            Err(e) => {
                targets.down();
                if !down_logged {
                    tracing::error!(error = %e, "fleet change feed cannot connect; retrying, cached subject states expire after subjects.stale_after_ms, the policy in force stays");
                    down_logged = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        if down_logged {
            tracing::info!("fleet change feed connected");
            down_logged = false;
        }
        // Changes may have been missed while no listener was connected.
        targets.restarted();
        let dead_after = (s.heartbeat_interval * 8).max(Duration::from_secs(2));
        let mut last_heard = Instant::now();
        let mut tick = tokio::time::interval(s.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => {
                        let channel = n.channel();
                        if channel == heartbeat_channel {
                            if let Ok(at) = n.payload().parse::<u64>() {
                                targets.confirm(at);
                            }
                            last_heard = Instant::now();
                        } else if channel == SUBJECT_CHANNEL {
                            targets.subject(n.payload());
                        } else if channel == POLICY_CHANNEL {
                            targets.policy(n.payload());
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("fleet change feed lost its connection");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fleet change feed failed");
                        break;
                    }
                },
                _ = tick.tick() => {
                    if targets.gone() {
                        return;
                    }
                    // Silent while heartbeats are due: dead even if its socket has not said so
                    // (a network that drops packets).
                    if last_heard.elapsed() > dead_after {
                        tracing::warn!(silent = ?last_heard.elapsed(), "fleet change feed silent; reconnecting");
                        break;
                    }
                    // On the listener's own connection: an idle sidecar holds no other.
                    let sent = sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(&heartbeat_channel)
                        .bind(targets.now_us().to_string())
                        .execute(&mut listener);
                    match tokio::time::timeout(s.read_timeout, sent).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "fleet change feed heartbeat failed; reconnecting");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(timeout = ?s.read_timeout, "fleet change feed heartbeat timed out; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
        targets.down();
        drop(listener);
        tokio::time::sleep(BACKOFF_MIN).await;
    }
}

/// What one read of the change table found.
enum Read {
    /// The first read: the newest id, where the cursor starts.
    Start(i64),
    Rows(Vec<(i64, String, String)>),
}

async fn poll(targets: &Targets, pool: &PgPool, every: Duration, timeout: Duration) {
    let mut cursor: Option<i64> = None;
    let mut migrated = false;
    let mut failing = false;
    loop {
        if targets.gone() {
            return;
        }
        let started = targets.now_us();
        let read = async {
            if !migrated {
                migrate(pool).await.map_err(|e| e.to_string())?;
                migrated = true;
            }
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            let read = match cursor {
                None => Read::Start(
                    sqlx::query_scalar("SELECT last FROM fleet_change_counter")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|e| e.to_string())?,
                ),
                Some(after) => Read::Rows(
                    sqlx::query_as(
                        "SELECT id, kind, payload FROM fleet_changes WHERE id > $1 ORDER BY id LIMIT $2",
                    )
                    .bind(after)
                    .bind(POLL_BATCH)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?,
                ),
            };
            tx.commit().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(read)
        };
        let read = tokio::time::timeout(timeout.max(Duration::from_secs(1)), read)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let mut more = false;
        let ok = read.is_ok();
        match read {
            Ok(Read::Start(last)) => {
                cursor = Some(last);
                targets.restarted();
                targets.confirm(started);
            }
            Ok(Read::Rows(rows)) => {
                let after = cursor.unwrap_or_default();
                if rows.first().is_some_and(|(id, _, _)| *id != after + 1) {
                    // Rows this sidecar never saw were pruned: it was away too long.
                    tracing::warn!(
                        after,
                        "fleet change feed fell behind the change table; cached states dropped"
                    );
                    targets.restarted();
                }
                for (id, kind, payload) in &rows {
                    match kind.as_str() {
                        "subject" => targets.subject(payload),
                        "policy" => targets.policy(payload),
                        _ => {}
                    }
                    cursor = Some(*id);
                }
                more = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= POLL_BATCH;
                if !more {
                    targets.confirm(started);
                }
                if let Some(policy) = &targets.policy {
                    policy.live.store(true, Ordering::Release);
                }
            }
            Err(e) => {
                targets.down();
                if !failing {
                    tracing::error!(error = %e, "fleet change feed cannot read the change table; retrying, cached subject states expire after subjects.stale_after_ms, the policy in force stays");
                    failing = true;
                }
            }
        }
        if ok && failing {
            tracing::info!("fleet change feed reading again");
            failing = false;
        }
        if !more {
            tokio::time::sleep(every).await;
        }
    }
}

/// Fleet mode, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub database_url: String,
    pub statement_timeout: Duration,
    /// Most connections one sidecar opens; none is kept open while idle except the feed's.
    pub max_connections: u32,
    pub idle_timeout: Duration,
    pub change_feed: ChangeFeed,
    pub application_name: String,
}

impl FleetSettings {
    /// The defaults for `database_url`: a LISTEN feed, connections on demand.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            statement_timeout: Duration::from_secs(2),
            max_connections: DEFAULT_FLEET_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_FLEET_IDLE_TIMEOUT,
            change_feed: ChangeFeed::Listen,
            application_name: DEFAULT_FLEET_APPLICATION_NAME.to_owned(),
        }
    }
}

/// How a fleet sidecar hears of changes made by the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeFeed {
    /// One LISTEN connection on the policy and subject channels (needs a session to the
    /// database itself: LISTEN does not pass through a transaction-mode pooler).
    Listen,
    /// A read of the change table every interval, through any pooler; no connection is held
    /// between reads.
    Poll(Duration),
}

/// The fleet defaults: a sidecar opens connections on demand, at most this many.
pub const DEFAULT_FLEET_MAX_CONNECTIONS: u32 = 4;
pub const DEFAULT_FLEET_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_FLEET_POLL_INTERVAL: Duration = Duration::from_millis(250);
pub const DEFAULT_FLEET_APPLICATION_NAME: &str = "pdgate";
