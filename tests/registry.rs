//! The subject registry: one behavioural suite run against both stores, SQLite (a temporary
//! file) and PostgreSQL (the machine's server, `PDGATE_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; each test in a schema of its own, dropped at the
//! end). Then what is particular to each store: the SQLite file created on first use, in WAL
//! mode; NOTIFY on commit; unreachable databases; the history being append-only.
//!
//! A PostgreSQL that cannot be reached fails these tests (it never skips them): CI must not
//! pass without having tested the fleet store.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::pg::TestSchema;

use pdgate::registry::{
    Action, Change, Event, NOTIFY_CHANNEL, Notification, PostgresRegistry, RegistryError,
    SqliteRegistry, SubjectRecord, SubjectRegistry,
};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

// ---------------------------------------------------------------------------------------------
// The stores under test.

type Registry = Arc<dyn SubjectRegistry>;

/// A store for one test, and what to remove when it ends.
struct Store {
    registry: Registry,
    cleanup: Cleanup,
}

enum Cleanup {
    /// The file's directory, removed when dropped.
    Sqlite(tempfile::TempDir),
    Postgres(Box<TestSchema>),
}

async fn sqlite() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let registry = SqliteRegistry::open(&dir.path().join("subjects.db"))
        .await
        .unwrap();
    Store {
        registry: Arc::new(registry),
        cleanup: Cleanup::Sqlite(dir),
    }
}

async fn postgres() -> Store {
    let schema = TestSchema::create().await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(schema.options())
        .await
        .unwrap();
    let registry = PostgresRegistry::from_pool(pool).await.unwrap();
    Store {
        registry: Arc::new(registry),
        cleanup: Cleanup::Postgres(Box::new(schema)),
    }
}

/// Runs `case` on `store`, then removes the store whether the case passed or not.
async fn run<F, Fut>(store: Store, case: F)
where
    F: FnOnce(Registry) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(case(store.registry.clone())).await;
    store.remove().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

impl Store {
    async fn remove(self) {
        self.registry.close().await;
        match self.cleanup {
            Cleanup::Sqlite(dir) => drop(dir),
            Cleanup::Postgres(schema) => schema.remove().await,
        }
    }
}

/// Each case of the suite, once per store.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run(super::sqlite().await, super::cases::$case).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run(super::postgres().await, super::cases::$case).await;
                }
            )*
        }
    };
}

suite!(
    consent_and_withdrawal_are_per_purpose,
    communications_consent_is_kept_apart,
    suspensions_and_their_end,
    deletion_request_is_recorded_and_keeps_the_rest,
    history_has_actor_source_and_time_in_order,
    versions_increase_per_subject,
    concurrent_changes_to_one_subject_are_all_recorded,
    bad_input_is_rejected_and_stores_nothing,
);

// ---------------------------------------------------------------------------------------------
// Helpers for the cases.

fn change(subject: &str, action: Action) -> Change {
    Change {
        subject: subject.into(),
        action,
        actor: "alice".into(),
        source: Some("REQ-1".into()),
    }
}

fn consent(purpose: &str) -> Action {
    Action::Consent {
        purpose: purpose.into(),
        communications: false,
    }
}

fn comms_consent(purpose: &str) -> Action {
    Action::Consent {
        purpose: purpose.into(),
        communications: true,
    }
}

fn withdraw(purpose: &str, communications: bool) -> Action {
    Action::Withdraw {
        purpose: purpose.into(),
        communications,
    }
}

async fn apply(registry: &Registry, subject: &str, action: Action) -> SubjectRecord {
    let record = registry.apply(&change(subject, action)).await.unwrap();
    // What a change returns is what a read then sees.
    assert_eq!(registry.get(subject).await.unwrap().as_ref(), Some(&record));
    record
}

fn set(items: &[&str]) -> std::collections::BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

mod cases {
    use super::*;

    pub async fn consent_and_withdrawal_are_per_purpose(r: Registry) {
        assert_eq!(r.get("cust-1").await.unwrap(), None, "no record yet");
        let rec = apply(&r, "cust-1", consent("marketing")).await;
        assert_eq!(rec.state.consent, set(&["marketing"]));
        assert_eq!(rec.version, 1);
        let rec = apply(&r, "cust-1", consent("research.statistics")).await;
        assert_eq!(
            rec.state.consent,
            set(&["marketing", "research.statistics"])
        );
        let rec = apply(&r, "cust-1", withdraw("marketing", false)).await;
        assert_eq!(rec.state.consent, set(&["research.statistics"]));
        // Withdrawing a consent never given is still recorded, and changes nothing else.
        let rec = apply(&r, "cust-1", withdraw("marketing.email", false)).await;
        assert_eq!(rec.state.consent, set(&["research.statistics"]));
        assert_eq!(rec.version, 4);
        // A consent given twice is one consent, recorded twice.
        apply(&r, "cust-1", consent("research.statistics")).await;
        let rec = apply(&r, "cust-1", withdraw("research.statistics", false)).await;
        assert!(rec.state.consent.is_empty());
        assert_eq!(r.history("cust-1").await.unwrap().len(), 6);
        // Another subject is untouched.
        assert_eq!(r.get("cust-2").await.unwrap(), None);
    }

    pub async fn communications_consent_is_kept_apart(r: Registry) {
        let rec = apply(&r, "cust-1", consent("marketing")).await;
        assert!(
            rec.state.comms_consent.is_empty(),
            "a marketing opt-in is not consent to communications data"
        );
        let rec = apply(&r, "cust-1", comms_consent("marketing")).await;
        assert_eq!(rec.state.consent, set(&["marketing"]));
        assert_eq!(rec.state.comms_consent, set(&["marketing"]));
        // Withdrawing the ordinary consent leaves the communications consent, and back.
        let rec = apply(&r, "cust-1", withdraw("marketing", false)).await;
        assert!(rec.state.consent.is_empty());
        assert_eq!(rec.state.comms_consent, set(&["marketing"]));
        apply(&r, "cust-1", consent("marketing")).await;
        let rec = apply(&r, "cust-1", withdraw("marketing", true)).await;
        assert_eq!(rec.state.consent, set(&["marketing"]));
        assert!(rec.state.comms_consent.is_empty());
        // The history tells the two kinds apart.
        let kinds: Vec<Option<bool>> = r
            .history("cust-1")
            .await
            .unwrap()
            .iter()
            .map(|e| e.action.purpose().map(|(_, comms)| comms))
            .collect();
        assert_eq!(
            kinds,
            [
                Some(false),
                Some(true),
                Some(false),
                Some(false),
                Some(true)
            ]
        );
    }

    pub async fn suspensions_and_their_end(r: Registry) {
        let rec = apply(&r, "cust-1", Action::SuspendUse).await;
        assert!(rec.state.use_suspended);
        assert!(!rec.state.provision_suspended);
        let rec = apply(&r, "cust-1", Action::SuspendProvision).await;
        assert!(rec.state.use_suspended && rec.state.provision_suspended);
        let rec = apply(&r, "cust-1", Action::ResumeUse).await;
        assert!(!rec.state.use_suspended);
        assert!(rec.state.provision_suspended, "the other suspension stays");
        let rec = apply(&r, "cust-1", Action::ResumeProvision).await;
        assert!(!rec.state.use_suspended && !rec.state.provision_suspended);
        // Resuming what was never suspended is recorded and harmless.
        let rec = apply(&r, "cust-2", Action::ResumeProvision).await;
        assert_eq!(rec.version, 1);
        assert!(!rec.state.provision_suspended);
    }

    pub async fn deletion_request_is_recorded_and_keeps_the_rest(r: Registry) {
        apply(&r, "cust-1", consent("marketing")).await;
        apply(&r, "cust-1", Action::SuspendUse).await;
        let rec = apply(&r, "cust-1", Action::RequestDeletion).await;
        assert!(rec.state.deletion_requested);
        assert_eq!(rec.state.consent, set(&["marketing"]));
        assert!(rec.state.use_suspended);
        let last = r.history("cust-1").await.unwrap().pop().unwrap();
        assert_eq!(last.action, Action::RequestDeletion);
        assert_eq!(last.version, 3);
    }

    pub async fn history_has_actor_source_and_time_in_order(r: Registry) {
        // The PostgreSQL store uses the database's clock: allow for a little skew.
        let before = SystemTime::now() - Duration::from_secs(5);
        let changes = [
            Change {
                subject: "cust-1".into(),
                action: consent("marketing"),
                actor: "alice".into(),
                source: Some("REQ-123".into()),
            },
            Change {
                subject: "cust-1".into(),
                action: comms_consent("marketing.email"),
                actor: "bob".into(),
                source: None,
            },
            Change {
                subject: "cust-1".into(),
                action: Action::SuspendProvision,
                actor: "privacy-office".into(),
                source: Some("REQ-124".into()),
            },
            Change {
                subject: "cust-1".into(),
                action: withdraw("marketing", false),
                actor: "Alice Smith".into(),
                source: Some("phone call 2026-11-27".into()),
            },
        ];
        for c in &changes {
            r.apply(c).await.unwrap();
        }
        r.apply(&change("cust-2", Action::SuspendUse))
            .await
            .unwrap();
        let after = SystemTime::now() + Duration::from_secs(5);
        let history: Vec<Event> = r.history("cust-1").await.unwrap();
        assert_eq!(history.len(), changes.len(), "only cust-1's changes");
        for (i, (event, c)) in history.iter().zip(&changes).enumerate() {
            assert_eq!(event.subject, "cust-1");
            assert_eq!(event.version, i as u64 + 1);
            assert_eq!(event.action, c.action);
            assert_eq!(event.actor, c.actor);
            assert_eq!(event.source, c.source);
            assert!(event.at >= before && event.at <= after, "{event:?}");
        }
        assert!(
            history.windows(2).all(|w| w[0].at <= w[1].at),
            "times follow versions: {history:?}"
        );
        assert!(r.history("nobody").await.unwrap().is_empty());
    }

    pub async fn versions_increase_per_subject(r: Registry) {
        for expected in 1..=5u64 {
            let rec = apply(&r, "cust-1", consent(&format!("p{expected}"))).await;
            assert_eq!(rec.version, expected);
        }
        // Each subject counts its own changes.
        assert_eq!(apply(&r, "cust-2", Action::SuspendUse).await.version, 1);
        assert_eq!(r.get("cust-1").await.unwrap().unwrap().version, 5);
    }

    pub async fn concurrent_changes_to_one_subject_are_all_recorded(r: Registry) {
        const N: u64 = 24;
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.apply(&change("cust-c", consent(&format!("p{i}"))))
                        .await
                        .unwrap()
                        .version
                })
            })
            .collect();
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap());
        }
        versions.sort_unstable();
        assert_eq!(
            versions,
            (1..=N).collect::<Vec<_>>(),
            "each change got its own version"
        );
        let rec = r.get("cust-c").await.unwrap().unwrap();
        assert_eq!(rec.version, N);
        assert_eq!(rec.state.consent.len(), N as usize, "no consent lost");
        let history = r.history("cust-c").await.unwrap();
        assert_eq!(
            history.iter().map(|e| e.version).collect::<Vec<_>>(),
            (1..=N).collect::<Vec<_>>()
        );
        let mut purposes: Vec<String> = history
            .iter()
            .map(|e| e.action.purpose().unwrap().0.to_owned())
            .collect();
        purposes.sort();
        purposes.dedup();
        assert_eq!(
            purposes.len(),
            N as usize,
            "every change in the history once"
        );
    }

    pub async fn bad_input_is_rejected_and_stores_nothing(r: Registry) {
        let ok = change("cust-1", consent("marketing"));
        let bad = [
            (
                Change {
                    subject: String::new(),
                    ..ok.clone()
                },
                vec!["subject"],
            ),
            (
                Change {
                    subject: "cust 1".into(),
                    ..ok.clone()
                },
                vec!["subject"],
            ),
            (
                Change {
                    subject: "cust-1,cust-2".into(),
                    ..ok.clone()
                },
                vec!["subject"],
            ),
            (
                Change {
                    subject: "cust-1\n".into(),
                    ..ok.clone()
                },
                vec!["subject"],
            ),
            (
                Change {
                    subject: "c".repeat(300),
                    ..ok.clone()
                },
                vec!["subject"],
            ),
            (
                Change {
                    action: consent(""),
                    ..ok.clone()
                },
                vec!["purpose"],
            ),
            (
                Change {
                    action: withdraw("a b", true),
                    ..ok.clone()
                },
                vec!["purpose"],
            ),
            (
                Change {
                    actor: "  ".into(),
                    ..ok.clone()
                },
                vec!["actor"],
            ),
            (
                Change {
                    source: Some(String::new()),
                    ..ok.clone()
                },
                vec!["source"],
            ),
            (
                Change {
                    subject: "x,y".into(),
                    action: consent(""),
                    actor: String::new(),
                    source: Some("a\u{7}".into()),
                },
                vec!["subject", "purpose", "actor", "source"],
            ),
        ];
        for (c, fields) in bad {
            match r.apply(&c).await {
                Err(e @ RegistryError::Invalid(_)) => {
                    assert!(e.is_input());
                    let RegistryError::Invalid(invalid) = e else {
                        unreachable!()
                    };
                    let named: Vec<&str> = invalid.problems.iter().map(|p| p.field).collect();
                    assert_eq!(named, fields, "{c:?}");
                }
                other => panic!("{c:?} was not rejected: {other:?}"),
            }
        }
        assert!(matches!(r.get("a b").await, Err(RegistryError::Invalid(_))));
        assert!(matches!(
            r.history("").await,
            Err(RegistryError::Invalid(_))
        ));
        assert_eq!(r.get("cust-1").await.unwrap(), None, "nothing was stored");
        assert!(r.history("cust-1").await.unwrap().is_empty());
        // The valid change still goes through.
        assert_eq!(r.apply(&ok).await.unwrap().version, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite.

#[tokio::test]
async fn sqlite_file_is_created_on_first_run_in_wal_mode_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subjects.db");
    // Reading a registry that does not exist leaves no file behind.
    assert!(
        SqliteRegistry::open_existing(&path)
            .await
            .unwrap()
            .is_none()
    );
    assert!(!path.exists());

    let registry = SqliteRegistry::open(&path).await.unwrap();
    assert!(path.exists(), "created on first run");
    registry
        .apply(&change("cust-1", consent("marketing")))
        .await
        .unwrap();
    registry.close().await;

    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    conn.close().await.unwrap();

    // Reopened (the migrations already applied), the state and history are there.
    let registry = SqliteRegistry::open_existing(&path).await.unwrap().unwrap();
    let rec = registry.get("cust-1").await.unwrap().unwrap();
    assert_eq!(rec.state.consent, set(&["marketing"]));
    assert_eq!(registry.history("cust-1").await.unwrap().len(), 1);
    registry.close().await;
}

#[tokio::test]
async fn sqlite_path_that_cannot_be_a_file_is_a_store_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let path = file.join("subjects.db");
    for result in [
        SqliteRegistry::open(&path).await.map(|_| ()),
        SqliteRegistry::open_existing(&path).await.map(|_| ()),
    ] {
        let e = result.unwrap_err();
        assert!(matches!(e, RegistryError::Open { .. }), "{e:?}");
        assert!(!e.is_input());
    }
    // No directory is created for a missing one either.
    let e = SqliteRegistry::open(&dir.path().join("no-such-dir/subjects.db"))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Open { .. }), "{e:?}");
}

#[tokio::test]
async fn sqlite_history_is_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subjects.db");
    let registry = SqliteRegistry::open(&path).await.unwrap();
    registry
        .apply(&change("cust-1", consent("marketing")))
        .await
        .unwrap();
    registry.close().await;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    for sql in [
        "UPDATE subject_events SET actor = 'mallory'",
        "DELETE FROM subject_events",
    ] {
        let e = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        assert!(e.to_string().contains("append-only"), "{sql}: {e}");
    }
    conn.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notifies_every_change_on_commit() {
    let store = postgres().await;
    let Cleanup::Postgres(schema) = &store.cleanup else {
        unreachable!()
    };
    // NOTIFY is database-wide: other tests notify too, so this one's subject is unique.
    let subject = format!("notify-{}", schema.name);
    let mut listener = PgListener::connect_with(
        &PgPoolOptions::new()
            .max_connections(1)
            .connect_with(schema.options())
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    listener.listen(NOTIFY_CHANNEL).await.unwrap();
    let registry = store.registry.clone();
    let outcome = tokio::spawn({
        let subject = subject.clone();
        async move {
            for action in [consent("marketing"), Action::SuspendUse] {
                registry.apply(&change(&subject, action)).await.unwrap();
            }
            let mut heard = Vec::new();
            while heard.len() < 2 {
                let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
                    .await
                    .expect("a notification within 5 s")
                    .unwrap();
                let parsed =
                    Notification::parse(n.payload()).expect("payload `<version> <subject>`");
                if parsed.subject == subject {
                    heard.push(parsed.version);
                }
            }
            assert_eq!(heard, [1, 2]);
            // A rejected change notifies nothing (and records nothing).
            let bad = Change {
                actor: String::new(),
                ..change(&subject, Action::SuspendUse)
            };
            let refused = registry.apply(&bad).await.unwrap_err();
            match &refused {
                RegistryError::Invalid(invalid) => assert!(
                    invalid.problems.iter().any(|p| p.field == "actor"),
                    "{refused}"
                ),
                other => panic!("not refused as input naming `actor`: {other:?}"),
            }
            assert_eq!(registry.get(&subject).await.unwrap().unwrap().version, 2);
        }
    })
    .await;
    store.remove().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test]
async fn postgres_unreachable_or_malformed_urls_are_told_apart() {
    // Nothing listens on port 1: refused at once, reported as the store's failure.
    let started = std::time::Instant::now();
    let e = PostgresRegistry::connect("postgres://postgres@127.0.0.1:1/test")
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Open { .. }), "{e:?}");
    assert!(!e.is_input());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains("127.0.0.1:1"), "names where: {e}");
    // A URL that is not PostgreSQL's is the caller's input.
    for url in [
        "mysql://root@127.0.0.1/test",
        "not a url",
        "postgres://[::1",
    ] {
        let e = PostgresRegistry::connect(url).await.unwrap_err();
        assert!(e.is_input(), "{url}: {e:?}");
    }
    // The password never appears in an error.
    let e = PostgresRegistry::connect("postgres://postgres:hunter2@127.0.0.1:1/test")
        .await
        .unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[tokio::test]
async fn postgres_history_is_append_only() {
    let store = postgres().await;
    let Cleanup::Postgres(schema) = store.cleanup else {
        unreachable!()
    };
    store
        .registry
        .apply(&change("cust-1", consent("marketing")))
        .await
        .unwrap();
    store.registry.close().await;
    let mut conn = PgConnection::connect_with(&schema.options()).await.unwrap();
    for sql in [
        "UPDATE subject_events SET actor = 'mallory'",
        "DELETE FROM subject_events",
    ] {
        let e = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        assert!(e.to_string().contains("append-only"), "{sql}: {e}");
    }
    conn.close().await.unwrap();
    schema.remove().await;
}

#[tokio::test]
async fn postgres_connect_with_a_url_creates_the_schema_once() {
    let schema = TestSchema::create().await;
    // Two sidecars starting together: the migrations' advisory lock lets one apply them.
    let url = schema.url();
    let (a, b) = tokio::join!(
        PostgresRegistry::connect(&url),
        PostgresRegistry::connect(&url)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    a.apply(&change("cust-1", consent("marketing")))
        .await
        .unwrap();
    assert_eq!(b.get("cust-1").await.unwrap().unwrap().version, 1);
    a.close().await;
    b.close().await;
    schema.remove().await;
}

#[tokio::test]
async fn sqlite_change_feed_returns_each_commit_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subjects.db");
    let writer = SqliteRegistry::open(&path).await.unwrap();
    writer
        .apply(&change("cust-1", consent("marketing")))
        .await
        .unwrap();
    // A second handle on the file, as a sidecar beside `pdgate subjects --store` has.
    let reader = SqliteRegistry::open(&path).await.unwrap();
    let cursor = reader.change_cursor().await.unwrap();
    let (none, same) = reader.changes_since(cursor).await.unwrap();
    assert!(none.is_empty());
    assert_eq!(same, cursor);
    writer
        .apply(&change("cust-2", Action::SuspendUse))
        .await
        .unwrap();
    writer
        .apply(&change("cust-1", withdraw("marketing", false)))
        .await
        .unwrap();
    let (changes, next) = reader.changes_since(cursor).await.unwrap();
    assert_eq!(
        changes,
        [
            Notification {
                subject: "cust-2".into(),
                version: 1
            },
            Notification {
                subject: "cust-1".into(),
                version: 2
            },
        ]
    );
    assert!(reader.changes_since(next).await.unwrap().0.is_empty());
    writer.close().await;
    reader.close().await;
}

#[tokio::test]
async fn postgres_lazy_connection_starts_without_the_database_and_fails_reads() {
    // Nothing listens on port 1: the registry is made (the sidecar starts), reads fail as the
    // store's failure within the acquire timeout, and a bad URL is still the caller's.
    let registry = PostgresRegistry::connect_lazy(
        "postgres://postgres@127.0.0.1:1/test",
        Duration::from_secs(2),
        Duration::from_millis(300),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let e = registry.get("cust-1").await.unwrap_err();
    assert!(matches!(e, RegistryError::Unavailable { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let e = PostgresRegistry::connect_lazy(
        "mysql://root@127.0.0.1/test",
        Duration::from_secs(2),
        Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(e.is_input());
}

#[tokio::test]
async fn postgres_statement_timeout_is_set_on_every_connection() {
    let schema = TestSchema::create().await;
    let registry = PostgresRegistry::connect_lazy(
        &schema.url(),
        Duration::from_millis(1234),
        Duration::from_secs(2),
    )
    .unwrap();
    registry.migrate().await.unwrap();
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(registry.pool())
        .await
        .unwrap();
    assert_eq!(timeout, "1234ms");
    // The schema chosen in the URL is kept beside it.
    registry
        .apply(&change("cust-1", consent("marketing")))
        .await
        .unwrap();
    let e = sqlx::query("SELECT pg_sleep(2)")
        .execute(registry.pool())
        .await
        .unwrap_err();
    // 57014 query_canceled: the server cancelled it.
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("57014"), "{e}");
    registry.close().await;
    schema.remove().await;
}
