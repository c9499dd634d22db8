//! The `AuditLog` gRPC API over real sockets: the auditor queries, tails and verifies; anyone
//! else is refused and the refusal is in the log; every read is itself audited; `pdgate audit
//! ... --admin` asks a running sidecar and prints what it prints for a directory.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use common::wait::eventually;
use common::{Harness, Options, call};
use pdgate::api::admin::ADMIN_ROLE_REQUIRED;
use pdgate::audit::{AuditLog, AuditRecord, AuditSettings, RecordKind, Retention};
use pdgate::proto::demo::{GetBillingStatementRequest, GetProfileRequest};
use pdgate::proto::v1::audit_log_client::AuditLogClient;
use pdgate::proto::v1::{AuditQuery, AuditTailRequest, AuditVerifyRequest};
use std::time::Duration;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// A request from `identity` (insecure-header mode: `x-caller`); `""` sends none.
fn as_<T>(identity: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if !identity.is_empty() {
        request
            .metadata_mut()
            .insert("x-caller", MetadataValue::try_from(identity).unwrap());
    }
    request
}

fn auditor<T>(message: T) -> tonic::Request<T> {
    as_("audit-team", message)
}

async fn audit_client(h: &Harness) -> AuditLogClient<Channel> {
    AuditLogClient::new(h.channel(h.api_addr).await)
}

async fn billing(h: &Harness, subject: &str) {
    h.client()
        .await
        .get_billing_statement(call(
            GetBillingStatementRequest {
                customer_id: subject.into(),
                month: String::new(),
            },
            "billing-service",
            "service.billing",
            &[subject],
        ))
        .await
        .unwrap();
}

async fn marketing_denied(h: &Harness, subject: &str) {
    let status = h
        .client()
        .await
        .get_profile(call(
            GetProfileRequest {
                customer_id: subject.into(),
            },
            "marketing-service",
            "marketing.email",
            &[subject],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

fn parse(json: &str) -> AuditRecord {
    serde_json::from_str(json).unwrap()
}

fn subject(s: &str) -> AuditQuery {
    AuditQuery {
        subject: s.into(),
        ..AuditQuery::default()
    }
}

/// The admin records of `method` (`Query`, `Tail`, `Verify`).
fn admin_records(h: &Harness, action: &str) -> Vec<AuditRecord> {
    h.audit_records()
        .into_iter()
        .filter(|r| r.body.kind == Some(RecordKind::Admin) && r.body.action == action)
        .collect()
}

#[tokio::test]
async fn an_auditor_queries_and_verifies_and_each_read_is_audited() {
    let h = Harness::start().await;
    billing(&h, "cust-1").await;
    billing(&h, "cust-2").await;
    marketing_denied(&h, "cust-1").await;
    let mut client = audit_client(&h).await;

    let found = client
        .query(auditor(subject("cust-1")))
        .await
        .unwrap()
        .into_inner();
    assert!(!found.truncated);
    let records: Vec<AuditRecord> = found.records.iter().map(|m| parse(&m.json)).collect();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.body.subjects == ["cust-1"]));
    assert_eq!(records[0].body.decision, "allow");
    assert_eq!(records[1].body.decision, "deny");
    // The line is sent exactly as stored: its hash checks.
    for (m, r) in found.records.iter().zip(&records) {
        assert_eq!(m.seq, r.seq);
        let (body, claimed) = pdgate::audit::record::split_line(&m.json).unwrap();
        let prev: [u8; 32] = hex::decode(&r.prev).unwrap().try_into().unwrap();
        assert_eq!(
            pdgate::audit::record::chain_hash(&prev, body.as_bytes()),
            claimed
        );
    }

    // Every filter field reaches the scan.
    let denied = client
        .query(auditor(AuditQuery {
            decision: "deny".into(),
            reason: "CONSENT_REQUIRED".into(),
            purpose: "marketing".into(),
            kind: "access".into(),
            ..AuditQuery::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.records.len(), 1);
    let limited = client
        .query(auditor(AuditQuery {
            kind: "access".into(),
            limit: 2,
            ..AuditQuery::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limited.records.len(), 2);
    assert!(limited.truncated);

    let v = client
        .verify(auditor(AuditVerifyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.first_seq, 1);
    assert_eq!(v.anchor_seq, 0);

    // Each read is in the log, in the order they were made, right after the three calls.
    let queries = admin_records(&h, "Query");
    let seqs: Vec<u64> = queries.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [4, 5, 6], "the three queries, as records 4 to 6");
    let q = &queries[0].body;
    assert_eq!(q.caller, "audit-team");
    assert_eq!(q.decision, "allow");
    assert_eq!(q.method.as_deref(), Some("/pdgate.v1.AuditLog/Query"));
    assert!(q.detail.as_deref().unwrap().contains("subject=cust-1"));
    let verifies: Vec<u64> = admin_records(&h, "Verify").iter().map(|r| r.seq).collect();
    assert_eq!(verifies, [7]);
    // Written before the answer: a query of the admin records finds its own record (8) as
    // the last of what it returns. Were the record written after answering, the answer
    // would end at 7.
    let own = client
        .query(auditor(AuditQuery {
            kind: "admin".into(),
            caller: "audit-team".into(),
            ..AuditQuery::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let last = parse(&own.records.last().unwrap().json);
    assert_eq!(last.seq, 8, "the query's answer holds its own record");
    assert_eq!(last.body.action, "Query");
    assert!(last.body.detail.unwrap().contains("kind=admin"));
}

#[tokio::test]
async fn bad_filters_are_invalid_argument_naming_the_field() {
    let h = Harness::start().await;
    let mut client = audit_client(&h).await;
    let cases = [
        (
            AuditQuery {
                decision: "maybe".into(),
                ..AuditQuery::default()
            },
            "decision",
        ),
        (
            AuditQuery {
                kind: "data".into(),
                ..AuditQuery::default()
            },
            "kind",
        ),
        (
            AuditQuery {
                reason: "NOT_A_CODE".into(),
                ..AuditQuery::default()
            },
            "reason",
        ),
        (
            AuditQuery {
                since_us: 2_000,
                until_us: 1_000,
                ..AuditQuery::default()
            },
            "since_us",
        ),
        (
            AuditQuery {
                limit: 10_001,
                ..AuditQuery::default()
            },
            "limit",
        ),
    ];
    for (query, field) in cases {
        let status = client.query(auditor(query.clone())).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(violations[0].field, field);
        // Tail takes the same filter (and has no limit).
        if field != "limit" {
            let status = client
                .tail(auditor(AuditTailRequest {
                    filter: Some(query),
                    ..AuditTailRequest::default()
                }))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "tail {field}");
        }
    }
    let status = client
        .tail(auditor(AuditTailRequest {
            last: 10_001,
            ..AuditTailRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // An admin refusal's reason code is a reason code too.
    client
        .query(auditor(AuditQuery {
            reason: ADMIN_ROLE_REQUIRED.into(),
            ..AuditQuery::default()
        }))
        .await
        .unwrap();
}

#[tokio::test]
async fn anyone_but_an_auditor_is_refused_and_the_refusal_is_audited() {
    let h = Harness::start().await;
    billing(&h, "cust-1").await;
    let mut client = audit_client(&h).await;
    for identity in ["security-team", "privacy-office", "billing-service", ""] {
        let status = client
            .query(as_(identity, subject("cust-1")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
        assert_eq!(common::reason(&status), ADMIN_ROLE_REQUIRED);
        let status = client
            .verify(as_(identity, AuditVerifyRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
        let status = client
            .tail(as_(identity, AuditTailRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
    }
    let refusals: Vec<AuditRecord> = h
        .audit_records()
        .into_iter()
        .filter(|r| r.body.kind == Some(RecordKind::Admin))
        .collect();
    assert_eq!(refusals.len(), 12);
    for r in &refusals {
        assert_eq!(r.body.decision, "deny");
        assert_eq!(r.body.reasons[0].code, ADMIN_ROLE_REQUIRED);
        assert!(["Query", "Verify", "Tail"].contains(&r.body.action.as_str()));
    }
    assert_eq!(refusals[0].body.caller, "security-team");
    assert_eq!(refusals[0].body.action, "Query");
    // The refusals are found like any record: by kind, decision and reason.
    let found = client
        .query(auditor(AuditQuery {
            kind: "admin".into(),
            decision: "deny".into(),
            reason: ADMIN_ROLE_REQUIRED.into(),
            ..AuditQuery::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.records.len(), 12);
}

#[tokio::test]
async fn tail_sends_records_written_after_it_started_and_replays_from_a_sequence_number() {
    let h = Harness::start().await;
    billing(&h, "cust-1").await;
    let mut client = audit_client(&h).await;
    let mut live = client
        .tail(auditor(AuditTailRequest {
            filter: Some(subject("cust-3")),
            ..AuditTailRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    // Not for cust-3: filtered out. Then one that is.
    billing(&h, "cust-2").await;
    billing(&h, "cust-3").await;
    let m = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .expect("a record within 10 s")
        .unwrap()
        .unwrap();
    let r = parse(&m.json);
    assert_eq!(r.body.subjects, ["cust-3"]);
    assert_eq!(r.body.caller, "billing-service");

    // From a sequence number: what was written after it, then what comes.
    let mut replay = client
        .tail(auditor(AuditTailRequest {
            filter: Some(AuditQuery {
                kind: "access".into(),
                ..AuditQuery::default()
            }),
            from_seq: 1,
            ..AuditTailRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut subjects = Vec::new();
    for _ in 0..2 {
        let m = replay.message().await.unwrap().unwrap();
        subjects.push(parse(&m.json).body.subjects[0].clone());
    }
    assert_eq!(subjects, ["cust-2", "cust-3"]);
    billing(&h, "cust-4").await;
    let m = tokio::time::timeout(Duration::from_secs(10), replay.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(parse(&m.json).body.subjects, ["cust-4"]);

    // The last records, without following: the stream ends by itself.
    let mut last = client
        .tail(auditor(AuditTailRequest {
            filter: Some(AuditQuery {
                kind: "access".into(),
                ..AuditQuery::default()
            }),
            last: 2,
            no_follow: true,
            ..AuditTailRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = last.message().await.unwrap() {
        got.push(parse(&m.json).body.subjects[0].clone());
    }
    assert_eq!(got, ["cust-3", "cust-4"]);
    assert_eq!(admin_records(&h, "Tail").len(), 3);
}

/// A sidecar's API port served here, with the audit handle kept, so the test can see the
/// tails' subscriptions come and go.
struct ApiOnly {
    addr: std::net::SocketAddr,
    audit: AuditLog,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn api_only() -> ApiOnly {
    use pdgate::config::{Config, ReloadSettings, SubjectsSettings};
    let dir = tempfile::tempdir().unwrap();
    let (audit, writer, _) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
    // The writer runs as long as the test; its thread ends with the process.
    std::mem::forget(writer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: addr,
        upstream: "127.0.0.1:1".into(),
        policy: common::policy_dir(),
        routes: None,
        identity: pdgate::identity::IdentityMode::InsecureHeader,
        tls: None,
        mesh: None,
        cache: pdgate::decision::CacheSettings::default(),
        max_concurrent_calls: 64,
        limits: pdgate::config::Limits::default(),
        shutdown_grace: Duration::from_secs(60),
        audit: AuditSettings::new(dir.path()),
        telemetry: pdgate::telemetry::TelemetrySettings::default(),
        admin_roles: common::test_admin_roles(),
        subjects: SubjectsSettings::default(),
        fleet: None,
        reload: ReloadSettings {
            watch: false,
            ..ReloadSettings::default()
        },
        log_format: Default::default(),
        admin_listen: None,
    };
    let policy = pdgate::server::load_policy(&config).await;
    let gate = pdgate::server::gate(
        &config,
        policy,
        pdgate::gate::Subjects::Fixed(std::sync::Arc::new(
            pdgate::demo::walkthrough::demo_subjects(),
        )),
        audit.clone(),
    )
    .unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        pdgate::api::serve_api(
            listener,
            gate,
            None,
            &pdgate::config::Limits::default(),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )
        .await
        .unwrap();
    });
    ApiOnly {
        addr,
        audit,
        stop,
        server,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_tail_ends_when_its_client_goes_away_and_when_the_server_shuts_down() {
    let api = api_only().await;
    let channel = Channel::from_shared(format!("http://{}", api.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AuditLogClient::new(channel);
    assert_eq!(api.audit.subscribers(), 0);
    let stream = client
        .tail(auditor(AuditTailRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(api.audit.subscribers(), 1);
    // The client goes away (the connection stays): the tail ends, nothing is left behind.
    drop(stream);
    common::wait::until("the tail ended after its client left", || {
        api.audit.subscribers() == 0
    })
    .await;

    // A tail open at shutdown ends cleanly (status OK), and the server stops without waiting
    // out its grace period for it.
    let mut stream = client
        .tail(auditor(AuditTailRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(api.audit.subscribers(), 1);
    api.stop.send(true).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the stream ended at shutdown");
    assert!(matches!(end, Ok(None)), "{end:?}");
    tokio::time::timeout(Duration::from_secs(20), api.server)
        .await
        .expect("the server stopped")
        .unwrap();
    assert_eq!(api.audit.subscribers(), 0);
}

#[tokio::test]
async fn verify_over_the_api_after_retention_reports_where_the_log_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = AuditSettings::new(dir.path());
    settings.segment_max_bytes = 4_000;
    settings.retention = Retention {
        segments: Some(2),
        max_age: None,
    };
    let mut h = Harness::with(Options {
        audit: Some(settings),
        ..Options::default()
    })
    .await;
    for i in 0..40 {
        billing(&h, &format!("cust-{}", i % 4 + 1)).await;
    }
    let mut client = audit_client(&h).await;
    // Retention runs beside the writer: wait until it has deleted something.
    common::wait::until("retention deleted the first segment", || {
        !dir.path().join("segment-00000001.jsonl").exists()
    })
    .await;
    let v = client
        .verify(auditor(AuditVerifyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert!(v.anchor_seq > 0);
    assert_eq!(v.first_seq, v.anchor_seq + 1);
    // What retention kept is still found, through the indexes and the active segment alike.
    let found = client
        .query(auditor(subject("cust-4")))
        .await
        .unwrap()
        .into_inner();
    assert!(!found.records.is_empty());
    assert!(
        found
            .records
            .iter()
            .all(|m| m.seq > v.anchor_seq && parse(&m.json).body.subjects == ["cust-4"])
    );
    h.shutdown().await.unwrap();
}

/// Runs the CLI off the runtime's threads (the sidecar runs on them).
async fn cli(args: Vec<String>) -> std::process::Output {
    Pdgate::new(args).output_async().await
}

fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|a| (*a).to_owned()).collect()
}

#[tokio::test]
async fn the_cli_asks_a_running_sidecar_with_admin_and_prints_what_it_prints_for_a_directory() {
    let h = Harness::start().await;
    billing(&h, "cust-1").await;
    marketing_denied(&h, "cust-1").await;
    billing(&h, "cust-2").await;
    let addr = h.api_addr.to_string();
    let dir = h.audit_dir.display().to_string();

    let remote = cli(args(&[
        "audit",
        "query",
        "--admin",
        &addr,
        "--as",
        "audit-team",
        "--subject",
        "cust-1",
    ]))
    .await;
    assert_eq!(remote.status.code(), Some(0), "{remote:?}");
    let local = cli(args(&[
        "audit",
        "query",
        "--audit",
        &dir,
        "--subject",
        "cust-1",
    ]))
    .await;
    assert_eq!(local.status.code(), Some(0), "{local:?}");
    assert_eq!(remote.stdout, local.stdout);
    assert_eq!(String::from_utf8_lossy(&remote.stdout).lines().count(), 2);

    let remote = cli(args(&[
        "audit",
        "query",
        "--admin",
        &addr,
        "--as",
        "audit-team",
        "--decision",
        "deny",
        "--kind",
        "access",
        "--json",
    ]))
    .await;
    assert_eq!(remote.status.code(), Some(0), "{remote:?}");
    let text = String::from_utf8(remote.stdout).unwrap();
    let lines: Vec<AuditRecord> = text.lines().map(parse).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].body.caller, "marketing-service");

    let v = cli(args(&[
        "audit",
        "verify",
        "--admin",
        &addr,
        "--as",
        "audit-team",
    ]))
    .await;
    assert_eq!(v.status.code(), Some(0), "{v:?}");
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("ok: "));

    let tail = cli(args(&[
        "audit",
        "tail",
        "--admin",
        &addr,
        "--as",
        "audit-team",
        "-n",
        "3",
    ]))
    .await;
    assert_eq!(tail.status.code(), Some(0), "{tail:?}");
    assert_eq!(String::from_utf8_lossy(&tail.stdout).lines().count(), 3);

    // Not an auditor: refused, exit 1. A bad filter: exit 2. Both sources at once: exit 2.
    let refused = cli(args(&[
        "audit",
        "verify",
        "--admin",
        &addr,
        "--as",
        "security-team",
    ]))
    .await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let bad = cli(args(&[
        "audit",
        "query",
        "--admin",
        &addr,
        "--as",
        "audit-team",
        "--limit",
        "20000",
    ]))
    .await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let both = cli(args(&[
        "audit", "verify", "--admin", &addr, "--audit", &dir,
    ]))
    .await;
    assert_eq!(both.status.code(), Some(2), "{both:?}");
    // Nobody listening: exit 1.
    let closed_port = common::ports::ClosedPort::new();
    let closed = closed_port.to_string();
    let down = cli(args(&[
        "audit",
        "verify",
        "--admin",
        &closed,
        "--as",
        "audit-team",
        "--timeout",
        "2",
    ]))
    .await;
    assert_eq!(down.status.code(), Some(1), "{down:?}");

    // The CLI's reads are audited like any other.
    let reads = h
        .audit_records()
        .into_iter()
        .filter(|r| r.body.kind == Some(RecordKind::Admin) && r.body.caller == "audit-team")
        .count();
    assert_eq!(reads, 4, "query, query, verify, tail");

    // `tail --follow` keeps following past `--timeout` (which bounds connecting and each
    // answer, not a stream) and prints what is written meanwhile.
    let subscribed = h.audit.subscribers();
    let mut follow = Pdgate::new([
        "audit",
        "tail",
        "--admin",
        &addr,
        "--as",
        "audit-team",
        "-n",
        "0",
        "--follow",
        "--timeout",
        "1",
    ])
    .spawn();
    // Written once the tail has subscribed (the writer counts its subscribers), and after
    // longer than `--timeout`.
    let took = eventually("`tail --follow` subscribes", || async {
        h.audit.subscribers() > subscribed
    })
    .await;
    println!("`tail --follow` subscribed after {took:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    billing(&h, "cust-4").await;
    let printed = follow
        .line("the line of the call made while following", |l| {
            l.contains("subjects cust-4")
        })
        .await;
    println!("{printed}");
    assert!(
        follow.try_status().is_none(),
        "`tail --follow` exited: {}",
        follow.stderr()
    );
}

#[tokio::test]
async fn a_tail_that_falls_behind_catches_up_from_the_files_without_a_gap() {
    let api = api_only().await;
    let channel = Channel::from_shared(format!("http://{}", api.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AuditLogClient::new(channel);
    let mut stream = client
        .tail(auditor(AuditTailRequest::default()))
        .await
        .unwrap()
        .into_inner();
    // Record 1 is the tail's own audit record. Then 3000 batches of one record (12 MB) while
    // the client reads nothing: far more than the writer keeps for a subscriber that lags.
    for i in 0..3000u64 {
        api.audit
            .record(pdgate::audit::RecordBody {
                time_us: 1_700_000_000_000_000 + i,
                kind: Some(RecordKind::Check),
                decision_id: format!("d-{i}"),
                caller: "billing-service".into(),
                decision: "allow".into(),
                // Big enough that the connection's flow-control windows fill up too.
                detail: Some("x".repeat(4000)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 3000 {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the tail keeps sending")
            .unwrap()
            .expect("the stream is open");
        assert_eq!(parse(&m.json).seq, m.seq);
        seqs.push(m.seq);
    }
    assert_eq!(
        seqs,
        (2..=3001).collect::<Vec<u64>>(),
        "every record once, in order"
    );
}
