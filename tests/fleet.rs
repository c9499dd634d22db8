//! Fleet mode: sidecars sharing one PostgreSQL database (the machine's server,
//! `PDGATE_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`) share policy
//! versions. An Apply or a Rollback on one sidecar reaches the others at once, through NOTIFY
//! (the members here poll only every 60 s, so an arrival within seconds is NOTIFY's); each
//! test works in a schema of its own.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::pg::TestSchema;
use common::{Harness, Options, SubjectsChoice, policy_admin, policy_dir};
use pdgate::gate::Bundle;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::proto::v1::{ApplyRequest, CheckRequest, PolicyBundle, RollbackRequest, StatusRequest};
use sqlx::{Connection, PgConnection};
use std::time::{Duration, Instant};

/// Billing may no longer read names; the policy tests do not contradict it.
const DENY_NAMES: &str = "p, role:billing, service.billing, customer.name, read, deny";

/// The stored versions of the fleet in `schema`, oldest first, once there is at least one (a
/// member seeds an empty fleet right after it starts).
async fn versions(schema: &TestSchema) -> Vec<(String, String, String)> {
    let started = Instant::now();
    loop {
        let mut conn = PgConnection::connect_with(&schema.options()).await.unwrap();
        // Before the first member has migrated the schema there is no table yet.
        let rows: Option<Vec<(String, String, String)>> =
            sqlx::query_as("SELECT version, applied_by, comment FROM policy_versions ORDER BY id")
                .fetch_all(&mut conn)
                .await
                .ok();
        conn.close().await.unwrap();
        if let Some(rows) = rows
            && !rows.is_empty()
        {
            return rows;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no policy version stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How often a member polls the fleet's table: far longer than any test waits, so a version
/// that arrives is one NOTIFY brought.
const POLL: Duration = Duration::from_secs(60);

/// A bound on NOTIFY's delivery that holds on a loaded 2-core machine, far below [`POLL`].
const NOTIFY_BOUND: Duration = Duration::from_secs(10);

/// The seed row a member writes into an empty fleet.
const SEED_COMMENT: &str = "first version of the fleet, from the policy directory";

async fn member(schema: &TestSchema) -> Harness {
    Harness::with(Options {
        subjects: SubjectsChoice::Postgres(schema.url()),
        reload: pdgate::config::ReloadSettings {
            watch: false,
            debounce: POLL,
            ..pdgate::config::ReloadSettings::default()
        },
        ..Options::default()
    })
    .await
}

fn bundle_with(rows: &[&str]) -> PolicyBundle {
    let mut bundle = PolicyBundle::from(Bundle::read_dir(&policy_dir(), None).unwrap());
    for row in rows {
        bundle.policy.push('\n');
        bundle.policy.push_str(row);
    }
    bundle.policy.push('\n');
    bundle
}

async fn active_version(h: &Harness) -> String {
    policy_admin(h, "sre")
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .active
        .map(|a| a.version)
        .unwrap_or_default()
}

/// Waits until `h` runs `version`; returns how long that took.
async fn until_active(h: &Harness, version: &str, from: Instant) -> Duration {
    loop {
        if active_version(h).await == version {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < common::wait::LIMIT,
            "sidecar never switched to {version}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn billing_reads_name(h: &Harness) -> pdgate::proto::v1::CheckResponse {
    let mut client = AccessControlClient::new(h.channel(h.api_addr).await);
    client
        .check(CheckRequest {
            caller: "billing-service".into(),
            purpose: "service.billing".into(),
            action: "read".into(),
            categories: vec!["customer.name".into()],
            subjects: vec!["cust-1".into()],
            recipient: String::new(),
            minimizable: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn an_apply_on_one_sidecar_reaches_the_other_within_a_second_and_so_does_a_rollback() {
    let schema = TestSchema::create().await;
    let mut one = member(&schema).await;
    // The first member seeds the empty fleet with its directory's policy: one row, its own.
    let start = active_version(&one).await;
    let seeded = versions(&schema).await;
    assert_eq!(
        seeded,
        vec![(start.clone(), "file".to_owned(), SEED_COMMENT.to_owned())]
    );
    // The second joins a fleet that has a version: it seeds nothing.
    let mut two = member(&schema).await;
    until_active(&two, &start, Instant::now()).await;
    assert_eq!(versions(&schema).await, seeded);
    assert_eq!(
        policy_admin(&two, "sre")
            .await
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .store,
        "postgres"
    );
    assert!(billing_reads_name(&two).await.allowed);

    let sent = Instant::now();
    let applied = policy_admin(&one, "security-team")
        .await
        .apply(ApplyRequest {
            bundle: Some(bundle_with(&[DENY_NAMES])),
            comment: "CHG-42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(applied.changed);
    assert_eq!(applied.previous_version, start);
    let delay = until_active(&two, &applied.version, sent).await;
    println!("apply on sidecar 1 -> active on sidecar 2: {delay:?} (NOTIFY; the poll is {POLL:?})");
    assert!(delay < NOTIFY_BOUND, "took {delay:?}");
    let answer = billing_reads_name(&two).await;
    assert!(!answer.allowed);
    assert_eq!(answer.policy_version, applied.version);
    assert_eq!(answer.reasons[0].code, "DENIED_BY_RULE");

    // The table records who applied which version, and why.
    let versions = versions(&schema).await;
    let last = versions.last().unwrap();
    assert_eq!(
        last,
        &(
            applied.version.clone(),
            "security-team".to_owned(),
            "CHG-42".to_owned()
        )
    );
    // Sidecar 2 shows the apply as the fleet's.
    let status = policy_admin(&two, "sre")
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.active.unwrap().applied_by, "fleet");

    // A rollback on sidecar 2 is a new fleet version too.
    let sent = Instant::now();
    let rolled = policy_admin(&two, "security-team")
        .await
        .rollback(RollbackRequest {
            version: start[..12].to_owned(),
            comment: "CHG-42 undone".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.version, start);
    let delay = until_active(&one, &start, sent).await;
    println!(
        "rollback on sidecar 2 -> active on sidecar 1: {delay:?} (NOTIFY; the poll is {POLL:?})"
    );
    assert!(delay < NOTIFY_BOUND, "took {delay:?}");
    assert!(billing_reads_name(&one).await.allowed);

    one.shutdown().await.unwrap();
    two.shutdown().await.unwrap();
    schema.remove().await;
}

#[tokio::test]
async fn a_sidecar_joining_later_takes_the_fleets_policy_over_its_directory() {
    let schema = TestSchema::create().await;
    let mut first = member(&schema).await;
    let start = active_version(&first).await;
    // The first member has seeded the fleet (its join is done) before the apply.
    assert_eq!(
        versions(&schema).await,
        vec![(start.clone(), "file".to_owned(), SEED_COMMENT.to_owned())]
    );
    let applied = policy_admin(&first, "security-team")
        .await
        .apply(ApplyRequest {
            bundle: Some(bundle_with(&[DENY_NAMES])),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // The newcomer's directory holds the repository's policy; the fleet's newer one wins.
    assert_ne!(applied.version, start);
    let mut late = member(&schema).await;
    let delay = until_active(&late, &applied.version, Instant::now()).await;
    println!("a new member took the fleet's policy after {delay:?}");
    let answer = billing_reads_name(&late).await;
    assert!(!answer.allowed);
    assert_eq!(answer.reasons[0].code, "DENIED_BY_RULE");
    let status = policy_admin(&late, "sre")
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.active.unwrap().applied_by, "fleet");
    // Its directory's policy did not become a fleet version.
    assert_eq!(versions(&schema).await.len(), 2);
    first.shutdown().await.unwrap();
    late.shutdown().await.unwrap();
    schema.remove().await;
}

#[tokio::test]
async fn a_push_while_the_database_is_down_fails_and_the_sidecar_keeps_its_policy() {
    // The fleet's database is a port that refuses connections (reserved for the test).
    let schema = TestSchema::create().await;
    let down = common::ports::ClosedPort::new();
    let mut h = Harness::with(Options {
        subjects: SubjectsChoice::Postgres(schema.url_via(down.addr)),
        reload: pdgate::config::ReloadSettings {
            watch: false,
            debounce: POLL,
            ..pdgate::config::ReloadSettings::default()
        },
        ..Options::default()
    })
    .await;
    let start = active_version(&h).await;
    assert!(!start.is_empty(), "the local policy is active");
    let status = policy_admin(&h, "security-team")
        .await
        .apply(ApplyRequest {
            bundle: Some(bundle_with(&[DENY_NAMES])),
            comment: "CHG-7".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // Nothing applied on this sidecar alone: it still decides under the policy it had.
    assert_eq!(active_version(&h).await, start);
    let answer = billing_reads_name(&h).await;
    assert!(answer.allowed, "{answer:?}");
    assert_eq!(answer.policy_version, start);
    h.shutdown().await.unwrap();
    schema.remove().await;
}
