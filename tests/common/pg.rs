//! The machine's PostgreSQL for the fleet-mode tests (`PDGATE_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`): each test works in a schema of its own, so
//! parallel tests and reruns never see each other's rows (the NOTIFY channels are
//! database-wide; the tables are not).

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub fn database_url() -> String {
    std::env::var("PDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of one test, named `pdgate_test_<unix seconds>_<pid>_<n>`.
pub struct TestSchema {
    pub name: String,
    base: PgConnectOptions,
}

impl TestSchema {
    pub async fn create() -> Self {
        let url = database_url();
        let base = PgConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("PDGATE_TEST_DATABASE_URL `{url}` is not a URL: {e}"));
        let mut admin = admin(&base, &url).await;
        drop_stale_schemas(&mut admin).await;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pdgate_test_{}_{}_{}",
            unix_secs(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        Self { name, base }
    }

    /// Connect options whose search_path is this schema.
    pub fn options(&self) -> PgConnectOptions {
        self.base.clone().options([("search_path", &self.name)])
    }

    /// A URL (for a sidecar or the CLI) with the schema in `options`.
    pub fn url(&self) -> String {
        format!(
            "{}?options=-c%20search_path%3D{}",
            database_url(),
            self.name
        )
    }

    /// The URL of this schema through `host:port` (the server itself, or a relay).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        format!(
            "postgres://{}@{addr}/{}?options=-c%20search_path%3D{}",
            self.base.get_username(),
            self.base.get_database().unwrap_or("test"),
            self.name
        )
    }

    /// [`url_via`](Self::url_via) with every session named `application` (PostgreSQL's
    /// `application_name`, shown in `pg_stat_activity`): one sidecar's connections told apart
    /// from another's on the same server.
    pub fn url_named(&self, addr: SocketAddr, application: &str) -> String {
        format!("{}&application_name={application}", self.url_via(addr))
    }

    /// Waits until a session named `application` has run `LISTEN` on `channel`: the sidecar's
    /// change feed is connected. A listener's session shows its `LISTEN` as its last statement
    /// until the feed's first heartbeat (`SELECT pg_notify(..)` on the same session, sent only
    /// once it listens), so either one says so. Returns how long that took; fails the test
    /// after [`LIMIT`](super::wait::LIMIT).
    pub async fn until_listening(&self, application: &str, channel: &str) -> std::time::Duration {
        let mut admin = admin(&self.base, &database_url()).await;
        let started = std::time::Instant::now();
        loop {
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND ((query LIKE 'LISTEN %' \
                 AND position($2 IN query) > 0) OR query LIKE 'SELECT pg_notify(%')",
            )
            .bind(application)
            .bind(format!("\"{channel}\""))
            .fetch_one(&mut admin)
            .await
            .unwrap();
            if listening > 0 {
                break;
            }
            assert!(
                started.elapsed() < super::wait::LIMIT,
                "no session `{application}` listening on `{channel}` after {:?}",
                super::wait::LIMIT
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        admin.close().await.unwrap();
        started.elapsed()
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        let host = match self.base.get_host() {
            "localhost" => "127.0.0.1",
            h => h,
        };
        format!("{host}:{}", self.base.get_port()).parse().unwrap()
    }

    pub async fn remove(self) {
        let mut admin = admin(&self.base, &database_url()).await;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
    }
}

async fn admin(base: &PgConnectOptions, url: &str) -> PgConnection {
    PgConnection::connect_with(base).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at `{url}`: {e}\n\
             The fleet-mode tests need it (database `test`, user `postgres`, trust auth). Start \
             it with\n    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
             create the database with `createdb -h 127.0.0.1 -U postgres test`, or point \
             PDGATE_TEST_DATABASE_URL at another server."
        )
    })
}

/// Schemas of test runs that died before dropping theirs, left for over an hour.
async fn drop_stale_schemas(admin: &mut PgConnection) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'pdgate\\_test\\_%'",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    for name in names {
        let secs: Option<u64> = name
            .strip_prefix("pdgate_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|s| s.parse().ok());
        if secs.is_some_and(|s| s + 3600 < unix_secs()) {
            // Another run may be dropping it too.
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .execute(&mut *admin)
                .await;
        }
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
