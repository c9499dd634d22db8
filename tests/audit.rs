//! The audit trail: one record per decision, written before the call is answered; a chain
//! that `verify` checks for every kind of tampering; faults that deny calls instead of losing
//! records (a full disk, an unusable directory); nothing lost to SIGKILL or a clean shutdown.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use common::{Harness, Options, call, decision_id, reason};
use pdgate::audit::read::{self, Filter};
use pdgate::audit::{AuditLog, AuditSettings, Overflow, RecordBody};
use pdgate::proto::demo::{GetBillingStatementRequest, GetProfileRequest, UpdateContactRequest};
use pdgate::proto::v1::CheckRequest;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

fn billing(subject: &str) -> tonic::Request<GetBillingStatementRequest> {
    call(
        GetBillingStatementRequest {
            customer_id: subject.into(),
            month: String::new(),
        },
        "billing-service",
        "service.billing",
        &[subject],
    )
}

#[tokio::test]
async fn every_decision_is_recorded_before_the_answer() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mut allowed = billing("cust-1");
    allowed.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let response = client.get_billing_statement(allowed).await.unwrap();
    let allowed_id = decision_id(response.metadata()).unwrap();
    let status = client
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "marketing-service",
            "marketing.email",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    let denied_id = decision_id(status.metadata()).unwrap();

    // The records are there as soon as the answers are: nothing waits in a queue.
    let records = h.audit_records();
    assert_eq!(records.len(), 2);
    let (a, d) = (&records[0].body, &records[1].body);
    assert_eq!(a.decision_id, allowed_id);
    assert_eq!(a.decision, "allow");
    assert_eq!(a.caller, "billing-service");
    assert_eq!(a.purpose, "service.billing");
    assert_eq!(a.action, "read");
    assert_eq!(a.categories, vec!["customer.billing"]);
    assert_eq!(a.subjects, vec!["cust-1"]);
    assert_eq!(
        a.method.as_deref(),
        Some("/demo.customer.v1.CustomerData/GetBillingStatement")
    );
    assert_eq!(
        a.trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(a.span_id.as_deref(), Some("00f067aa0ba902b7"));
    assert_eq!(a.policy_version.as_ref().map(String::len), Some(64));
    assert!(
        a.matched_rules.iter().all(|m| m.starts_with("policy.csv:")) && !a.matched_rules.is_empty()
    );
    assert!(a.latency_us > 0 && a.time_us > 0);
    assert_eq!(d.decision_id, denied_id);
    assert_eq!(d.decision, "deny");
    assert_eq!(d.reasons[0].code, "CONSENT_REQUIRED");
    assert_eq!(d.reasons[0].clause, "§1(2)");
    // Identifiers only: the personal data that came back is not in the log.
    let profile = client
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-2".into(),
            },
            "marketing-service",
            "marketing.email",
            &["cust-2"],
        ))
        .await
        .unwrap()
        .into_inner();
    let text = std::fs::read_to_string(h.audit_dir.join("segment-00000001.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 3);
    for personal in [
        &profile.name,
        &profile.email,
        &profile.address,
        &profile.phone,
    ] {
        assert!(
            !personal.is_empty() && !text.contains(personal.as_str()),
            "`{personal}` is in the audit log"
        );
    }
    assert!(read::verify(&h.audit_dir).unwrap().ok());
}

#[tokio::test]
async fn check_api_decisions_are_recorded_too() {
    let h = Harness::start().await;
    let mut api = AccessControlClient::new(h.channel(h.api_addr).await);
    let response = api
        .check(CheckRequest {
            caller: "billing-service".into(),
            purpose: "service.billing".into(),
            action: "read".into(),
            categories: vec!["customer.billing".into()],
            subjects: vec!["cust-9".into()],
            recipient: String::new(),
            minimizable: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let records = h.audit_records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].body.kind, Some(pdgate::audit::RecordKind::Check));
    assert_eq!(records[0].body.decision_id, response.decision_id);
    assert_eq!(records[0].body.subjects, vec!["cust-9"]);
}

/// A write: provisioning may change a customer's contact data (§1(1)).
fn update_contact(subject: &str) -> tonic::Request<UpdateContactRequest> {
    call(
        UpdateContactRequest {
            customer_id: subject.into(),
            email: "new@example.com".into(),
            address: String::new(),
            phone: String::new(),
        },
        "provisioning-service",
        "service.provision",
        &[subject],
    )
}

#[tokio::test]
async fn a_full_disk_denies_calls_instead_of_losing_records() {
    // The segment the writer appends to is /dev/full: every write fails with ENOSPC.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.path().join("segment-00000001.jsonl")).unwrap();
    let h = Harness::with(Options {
        audit: Some(AuditSettings::new(dir.path())),
        ..Options::default()
    })
    .await;
    // A write is recorded before it is forwarded: it never reaches the upstream.
    let status = h
        .client()
        .await
        .update_contact(update_contact("cust-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "AUDIT_UNAVAILABLE");
    assert_eq!(decision_id(status.metadata()), None);
    assert_eq!(
        h.service.calls(),
        0,
        "an unaudited write reached the upstream"
    );
    // A read may go ahead of its record (it changes nothing there), but its answer is
    // refused all the same.
    let status = h
        .client()
        .await
        .get_billing_statement(billing("cust-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "AUDIT_UNAVAILABLE");
    assert_eq!(decision_id(status.metadata()), None);
    // A call that is denied anyway is refused too, but not with its own reason: that answer
    // would name a decision no record holds.
    let status = h
        .client()
        .await
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "marketing-service",
            "marketing.email",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "AUDIT_UNAVAILABLE");
}

#[tokio::test]
async fn refused_records_are_exactly_the_missing_ones() {
    // A queue of one and 300 records at once: some are refused. Every refused record's call
    // would be denied; every accepted one is in the log. None is dropped silently.
    let dir = tempfile::tempdir().unwrap();
    let mut settings = AuditSettings::new(dir.path());
    settings.queue_capacity = 1;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    let results = futures_util::future::join_all((0..300).map(|i| {
        let log = log.clone();
        async move { log.record(body(i)).await }
    }))
    .await;
    let mut accepted = std::collections::BTreeSet::new();
    let mut refused = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(_) => {
                accepted.insert(format!("decision-{i}"));
            }
            Err(e) => {
                assert!(matches!(e, pdgate::audit::AuditError::QueueFull(1)), "{e}");
                refused += 1;
            }
        }
    }
    println!(
        "queue of 1, 300 records at once: {} accepted, {refused} refused",
        accepted.len()
    );
    // Both kinds happened, or the test shows nothing about refusals.
    assert!(refused > 0, "no record was refused by a queue of one");
    assert!(!accepted.is_empty(), "no record was accepted");
    drop(log);
    writer.close().await;
    let v = read::verify(dir.path()).unwrap();
    assert!(v.ok(), "{v:?}");
    // The log holds exactly the accepted records: a refused one is missing, an accepted one
    // is not.
    let mut logged = std::collections::BTreeSet::new();
    read::scan(dir.path(), &Filter::default(), |r| {
        logged.insert(r.body.decision_id);
        true
    })
    .unwrap();
    assert_eq!(logged, accepted);

    // Waiting instead of refusing: all 300 get in.
    let dir = tempfile::tempdir().unwrap();
    let mut settings = AuditSettings::new(dir.path());
    settings.queue_capacity = 1;
    settings.overflow = Overflow::Wait(Duration::from_secs(10));
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    let results = futures_util::future::join_all((0..300).map(|i| {
        let log = log.clone();
        async move { log.record(body(i)).await }
    }))
    .await;
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "record {i} was not accepted: {r:?}");
    }
    drop(log);
    writer.close().await;
    assert_eq!(read::verify(dir.path()).unwrap().records, 300);
}

#[tokio::test]
async fn a_clean_shutdown_writes_everything_and_a_restart_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (log, writer, head) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
    assert_eq!(head.seq, 0);
    for i in 0..50 {
        log.record(body(i)).await.unwrap();
    }
    drop(log);
    writer.close().await;
    let (log, writer, head) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
    assert_eq!(head.seq, 50);
    assert_eq!(log.record(body(50)).await.unwrap(), 51);
    writer.close().await;
    let v = read::verify(dir.path()).unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.records, 51);
}

#[tokio::test]
async fn segments_rotate_and_the_chain_runs_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = AuditSettings::new(dir.path());
    settings.segment_max_bytes = 2_000;
    settings.batch_max = 4;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    for i in 0..60 {
        log.record(body(i)).await.unwrap();
    }
    drop(log);
    writer.close().await;
    let v = read::verify(dir.path()).unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.records, 60);
    assert!(v.segments > 3, "{} segments", v.segments);
}

fn body(i: u64) -> RecordBody {
    RecordBody {
        time_us: 1_700_000_000_000_000 + i,
        decision_id: format!("decision-{i}"),
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.billing".into()],
        subjects: vec![format!("cust-{}", i % 7)],
        decision: "allow".into(),
        ..RecordBody::default()
    }
}

/// A log of 20 records in a fresh directory.
async fn twenty_records() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (log, writer, _) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
    for i in 0..20 {
        log.record(body(i)).await.unwrap();
    }
    drop(log);
    writer.close().await;
    dir
}

fn edit_lines(dir: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let path = dir.join("segment-00000001.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(|l| format!("{l}\n")).collect();
    edit(&mut lines);
    std::fs::write(&path, lines.concat()).unwrap();
}

#[tokio::test]
async fn verify_names_the_first_modified_deleted_inserted_or_reordered_record() {
    let whole = twenty_records().await;
    let v = read::verify(whole.path()).unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.records, 20);

    type Edit = Box<dyn FnOnce(&mut Vec<String>)>;
    let cases: Vec<(&str, Edit, usize, &str)> = vec![
        (
            "modified",
            Box::new(|l| l[4] = l[4].replace("billing-service", "billing-servicf")),
            5,
            "was modified",
        ),
        (
            "a decision flipped",
            Box::new(|l| l[9] = l[9].replace("\"allow\"", "\"deny\"")),
            10,
            "was modified",
        ),
        (
            "a field added",
            Box::new(|l| l[2] = l[2].replacen("{", "{\"note\":\"x\",", 1)),
            3,
            "was modified",
        ),
        (
            "deleted",
            Box::new(|l| {
                l.remove(4);
            }),
            5,
            "deleted",
        ),
        (
            "inserted",
            Box::new(|l| {
                let copy = l[4].clone();
                l.insert(5, copy);
            }),
            6,
            "inserted",
        ),
        ("reordered", Box::new(|l| l.swap(6, 7)), 7, "reordered"),
    ];
    for (what, edit, line, needle) in cases {
        let copy = tempfile::tempdir().unwrap();
        for f in ["segment-00000001.jsonl", "HEAD"] {
            std::fs::copy(whole.path().join(f), copy.path().join(f)).unwrap();
        }
        edit_lines(copy.path(), edit);
        let v = read::verify(copy.path()).unwrap();
        let b = v
            .first_break
            .unwrap_or_else(|| panic!("{what}: not detected"));
        assert_eq!(b.line, Some(line), "{what}: {b:?}");
        assert!(b.what.contains(needle), "{what}: {b:?}");
    }
}

#[tokio::test]
async fn verify_notices_a_log_cut_short() {
    let whole = twenty_records().await;
    // The last three records removed, whole lines: only HEAD can tell.
    let copy = tempfile::tempdir().unwrap();
    for f in ["segment-00000001.jsonl", "HEAD"] {
        std::fs::copy(whole.path().join(f), copy.path().join(f)).unwrap();
    }
    edit_lines(copy.path(), |l| l.truncate(17));
    let b = read::verify(copy.path())
        .unwrap()
        .first_break
        .expect("cut detected");
    assert!(
        b.what.contains("ends at record 17 but HEAD says 20"),
        "{b:?}"
    );
    // Cut in the middle of a line.
    let path = copy.path().join("segment-00000001.jsonl");
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 30]).unwrap();
    let b = read::verify(copy.path())
        .unwrap()
        .first_break
        .expect("cut detected");
    assert!(b.what.contains("unfinished"), "{b:?}");
    // HEAD removed: a cut could no longer be told, so that is a break too.
    std::fs::copy(whole.path().join("segment-00000001.jsonl"), &path).unwrap();
    std::fs::remove_file(copy.path().join("HEAD")).unwrap();
    let b = read::verify(copy.path())
        .unwrap()
        .first_break
        .expect("missing HEAD detected");
    assert!(b.what.contains("HEAD"), "{b:?}");
}

#[tokio::test]
async fn query_filters_by_each_field() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    client
        .get_billing_statement(billing("cust-1"))
        .await
        .unwrap();
    client
        .get_billing_statement(billing("cust-2"))
        .await
        .unwrap();
    let denied = client
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "marketing-service",
            "marketing.email",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(reason(&denied), "CONSENT_REQUIRED");
    let count = |filter: Filter| {
        let mut n = 0;
        read::scan(&h.audit_dir, &filter, |_| {
            n += 1;
            true
        })
        .unwrap();
        n
    };
    assert_eq!(count(Filter::default()), 3);
    assert_eq!(
        count(Filter {
            subject: Some("cust-1".into()),
            ..Filter::default()
        }),
        2
    );
    assert_eq!(
        count(Filter {
            caller: Some("marketing-service".into()),
            ..Filter::default()
        }),
        1
    );
    assert_eq!(
        count(Filter {
            purpose: Some("marketing".into()),
            ..Filter::default()
        }),
        1
    );
    assert_eq!(
        count(Filter {
            purpose: Some("service".into()),
            ..Filter::default()
        }),
        2
    );
    assert_eq!(
        count(Filter {
            category: Some("customer".into()),
            ..Filter::default()
        }),
        3
    );
    assert_eq!(
        count(Filter {
            decision: Some("deny".into()),
            ..Filter::default()
        }),
        1
    );
    assert_eq!(
        count(Filter {
            reason: Some("CONSENT_REQUIRED".into()),
            ..Filter::default()
        }),
        1
    );
    assert_eq!(
        count(Filter {
            since_us: Some(u64::MAX),
            ..Filter::default()
        }),
        0
    );
    let first = h.audit_records()[0].body.decision_id.clone();
    assert_eq!(
        count(Filter {
            decision_id: Some(first),
            ..Filter::default()
        }),
        1
    );
}

#[test]
fn an_audit_directory_under_a_regular_file_stops_serve_before_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let config = tmp.path().join("pdgate.toml");
    std::fs::write(
        &config,
        format!(
            "policy = {:?}\nlisten = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n[audit]\ndir = {:?}\n",
            common::policy_dir(),
            file.join("audit")
        ),
    )
    .unwrap();
    let out = Pdgate::new(["serve", "--config", config.to_str().unwrap()]).output();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Exit 2 is a configuration error: rejected before any port was bound. The key is named.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`audit.dir`"),
        "{out:?}"
    );
}

#[tokio::test]
async fn sigkill_loses_no_record_of_an_answered_call() {
    // The upstream runs here; pdgate runs as its own process, killed with SIGKILL mid-traffic.
    let service = pdgate::demo::customer::CustomerService::new();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(service.clone().serve(upstream, std::future::pending()));
    let audit = tempfile::tempdir().unwrap();
    let config = audit.path().join("pdgate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\nupstream = \"{upstream_addr}\"\npolicy = {:?}\n[audit]\ndir = {:?}\nfsync = \"batch\"\n[subjects]\npath = {:?}\n",
            common::policy_dir(),
            audit.path().join("log"),
            audit.path().join("subjects.db")
        ),
    )
    .unwrap();
    let mut child = Pdgate::new(["serve", "--config", config.to_str().unwrap()])
        .env("PDGATE_LOG", "warn,pdgate=info")
        .spawn();
    let (data, _) = child.serving().await;
    let client = pdgate::proto::demo::customer_data_client::CustomerDataClient::new(
        tonic::transport::Channel::from_shared(format!("http://{data}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    // Concurrent calls, then SIGKILL while more are in flight.
    let mut answered = Vec::new();
    for round in 0..5 {
        let calls = (0..20).map(|_| {
            let mut c = client.clone();
            async move { c.get_billing_statement(billing("cust-1")).await }
        });
        for response in futures_util::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
        {
            answered.push(decision_id(response.metadata()).unwrap());
        }
        if round == 3 {
            let mut c = client.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    let _ = c.get_billing_statement(billing("cust-2")).await;
                }
            });
            child.signal("KILL");
        }
    }
    let out = child.exit_within(common::bin::EVENT_LIMIT).await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9),
        "killed by SIGKILL: {out:?}"
    );
    assert!(answered.len() >= 80, "{} answered", answered.len());
    let log = audit.path().join("log");
    let mut recorded = std::collections::HashSet::new();
    read::scan(&log, &Filter::default(), |r| {
        recorded.insert(r.body.decision_id);
        true
    })
    .unwrap();
    for id in &answered {
        assert!(
            recorded.contains(id),
            "answered call {id} has no audit record"
        );
    }
    let v = read::verify(&log).unwrap();
    assert!(
        v.ok()
            || v.first_break
                .as_ref()
                .is_some_and(|b| b.what.contains("unfinished")),
        "{v:?}"
    );
}

#[tokio::test]
async fn interval_sync_writes_everything_and_the_chain_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = AuditSettings::new(dir.path());
    settings.fsync = pdgate::audit::Fsync::Interval(Duration::from_millis(20));
    settings.segment_max_bytes = 3_000;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    for i in 0..40 {
        log.record(body(i)).await.unwrap();
    }
    // Quiet for five intervals: the scenario is an idle syncer (no batch to trigger it), a
    // duration rather than an event to wait for; the syncer shows nothing to poll, and what
    // is asserted (health, every record, the chain) must hold whether it ran or not.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(log.healthy());
    drop(log);
    writer.close().await;
    let v = read::verify(dir.path()).unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.records, 40);
}

/// A log of `n` records (`body(i)`) in small segments, written and closed: the maintenance
/// pass at close has indexed the sealed segments and applied `retention`.
async fn small_segments(dir: &Path, n: u64, retention: pdgate::audit::Retention) -> Vec<u64> {
    let mut settings = AuditSettings::new(dir);
    settings.segment_max_bytes = 2_000;
    settings.batch_max = 4;
    settings.retention = retention;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    let mut seqs = Vec::new();
    for i in 0..n {
        seqs.push(log.record(body(i)).await.unwrap());
    }
    drop(log);
    writer.close().await;
    seqs
}

fn segment_files(dir: &Path) -> Vec<String> {
    pdgate::audit::segment_paths(dir)
        .unwrap()
        .iter()
        .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn retention_keeps_the_newest_segments_and_verify_starts_from_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let retention = pdgate::audit::Retention {
        segments: Some(2),
        max_age: None,
    };
    small_segments(dir.path(), 60, retention).await;
    // Two sealed segments and the active one are left; the first ones are gone.
    let files = segment_files(dir.path());
    assert!(files.len() <= 3, "{files:?}");
    assert!(!files.contains(&"segment-00000001.jsonl".to_owned()));
    let v = read::verify(dir.path()).unwrap();
    assert!(v.ok(), "{v:?}");
    let anchor = v.anchor.expect("an anchor");
    assert_eq!(v.first_seq, anchor.seq + 1);
    assert_eq!(v.last_seq(), 60);
    assert_eq!(v.records, 60 - anchor.seq);

    // A restart continues the chain, from the anchor if need be.
    let mut settings = AuditSettings::new(dir.path());
    settings.retention = retention;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    assert_eq!(log.record(body(60)).await.unwrap(), 61);
    drop(log);
    writer.close().await;
    let v = read::verify(dir.path()).unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.last_seq(), 61);
}

#[tokio::test]
async fn retention_by_age_never_deletes_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    // `body(i)` records are from 2023: older than a day.
    let retention = pdgate::audit::Retention {
        segments: None,
        max_age: Some(Duration::from_secs(86_400)),
    };
    small_segments(dir.path(), 60, retention).await;
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1, "only the active segment is left: {files:?}");
    let v = read::verify(dir.path()).unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.last_seq(), 60);
    assert!(v.anchor.is_some());

    // Even when the active segment is empty and every record before it deleted, a restart
    // continues from the anchor.
    let mut settings = AuditSettings::new(dir.path());
    settings.retention = retention;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    assert_eq!(log.record(body(60)).await.unwrap(), 61);
    drop(log);
    writer.close().await;
    assert!(read::verify(dir.path()).unwrap().ok());
}

#[tokio::test]
async fn tampering_is_still_detected_after_retention() {
    let whole = tempfile::tempdir().unwrap();
    let retention = pdgate::audit::Retention {
        segments: Some(3),
        max_age: None,
    };
    small_segments(whole.path(), 80, retention).await;
    assert!(read::verify(whole.path()).unwrap().ok());
    let copy = || {
        let c = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(whole.path()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), c.path().join(entry.file_name())).unwrap();
        }
        c
    };
    let broken = |dir: &Path| {
        read::verify(dir)
            .unwrap()
            .first_break
            .expect("tampering detected")
    };

    // The oldest kept segment deleted as well: the anchor no longer matches the log.
    let c = copy();
    let first = pdgate::audit::segment_paths(c.path()).unwrap()[0].1.clone();
    std::fs::remove_file(&first).unwrap();
    let b = broken(c.path());
    assert!(b.what.contains("ANCHOR"), "{b:?}");

    // No anchor at all: segments were deleted, not by retention.
    let c = copy();
    std::fs::remove_file(c.path().join("ANCHOR")).unwrap();
    let b = broken(c.path());
    assert!(b.what.contains("no ANCHOR"), "{b:?}");

    // An anchor with another hash.
    let c = copy();
    let text = std::fs::read_to_string(c.path().join("ANCHOR")).unwrap();
    let mut parts: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    parts[1] = "ab".repeat(32);
    std::fs::write(c.path().join("ANCHOR"), parts.join(" ") + "\n").unwrap();
    let b = broken(c.path());
    assert!(b.what.contains("ANCHOR"), "{b:?}");

    // A record edited in a kept segment.
    let c = copy();
    let last = pdgate::audit::segment_paths(c.path())
        .unwrap()
        .last()
        .unwrap()
        .1
        .clone();
    let text = std::fs::read_to_string(&last).unwrap();
    std::fs::write(
        &last,
        text.replacen("billing-service", "billing-servicf", 1),
    )
    .unwrap();
    let b = broken(c.path());
    assert!(b.what.contains("was modified"), "{b:?}");

    // An unreadable anchor.
    let c = copy();
    std::fs::write(c.path().join("ANCHOR"), "garbage\n").unwrap();
    let b = broken(c.path());
    assert!(b.what.contains("ANCHOR"), "{b:?}");
}

/// Sequence numbers of the records `filter` finds, through the index and by a full scan.
fn both_ways(dir: &Path, filter: &Filter) -> (Vec<u64>, Vec<u64>) {
    let mut indexed = Vec::new();
    read::scan(dir, filter, |r| {
        indexed.push(r.seq);
        true
    })
    .unwrap();
    let mut scanned = Vec::new();
    read::scan_lines(dir, filter, read::Access::Scan, 0, |r, _| {
        scanned.push(r.seq);
        true
    })
    .unwrap();
    (indexed, scanned)
}

#[tokio::test]
async fn queries_through_the_index_find_exactly_what_a_full_scan_finds() {
    // Many people, each in about one record per segment (so that the index, not a scan, finds
    // them), some records about two people.
    let many = |i: u64| {
        let mut b = body(i);
        b.subjects = vec![format!("cust-{}", i % 97)];
        if i.is_multiple_of(5) {
            b.subjects.push(format!("family-{}", i % 13));
        }
        b
    };
    let dir = tempfile::tempdir().unwrap();
    let mut settings = AuditSettings::new(dir.path());
    settings.segment_max_bytes = 40_000;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    for i in 0..1200 {
        log.record(many(i)).await.unwrap();
    }
    drop(log);
    writer.close().await;
    // More records after a restart: they are in the active segment, which has no index.
    let mut settings = AuditSettings::new(dir.path());
    settings.segment_max_bytes = 1_000_000;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    for i in 1200..1300 {
        log.record(many(i)).await.unwrap();
    }
    drop(log);
    writer.close().await;
    let segments = pdgate::audit::segment_paths(dir.path()).unwrap();
    let indexed: Vec<_> = segments
        .iter()
        .filter(|(_, p)| pdgate::audit::index::index_path(p).exists())
        .collect();
    assert!(indexed.len() >= 8, "sealed segments are indexed");
    for (_, p) in &indexed {
        assert!(
            pdgate::audit::index::summary_of(p).is_some(),
            "{} has a valid index",
            p.display()
        );
    }
    assert!(
        !pdgate::audit::index::index_path(&segments.last().unwrap().1).exists(),
        "the active segment has no index"
    );

    let filters = || {
        let mut all: Vec<Filter> = [0, 3, 50, 96, 97]
            .iter()
            .map(|s| Filter {
                subject: Some(format!("cust-{s}")),
                ..Filter::default()
            })
            .collect();
        all.push(Filter {
            subject: Some("family-4".into()),
            ..Filter::default()
        });
        all.push(Filter {
            subject: Some("cust-3".into()),
            decision: Some("allow".into()),
            since_us: Some(1_700_000_000_000_500),
            ..Filter::default()
        });
        for i in [0, 37, 699, 1199, 1250] {
            all.push(Filter {
                decision_id: Some(format!("decision-{i}")),
                ..Filter::default()
            });
        }
        all
    };
    let check = |when: &str| {
        for filter in filters() {
            let (indexed, scanned) = both_ways(dir.path(), &filter);
            assert_eq!(indexed, scanned, "{when}: {filter:?}");
        }
    };
    check("every index valid");
    let (found, _) = both_ways(
        dir.path(),
        &Filter {
            subject: Some("cust-3".into()),
            ..Filter::default()
        },
    );
    assert_eq!(found.len(), (0..1300).filter(|i| i % 97 == 3).count());

    // One index deleted, one cut short, one with a byte flipped in every region, one left
    // over from a segment that changed since.
    let idx = |n: usize| pdgate::audit::index::index_path(&indexed[n].1);
    std::fs::remove_file(idx(0)).unwrap();
    let bytes = std::fs::read(idx(1)).unwrap();
    std::fs::write(idx(1), &bytes[..bytes.len() / 2]).unwrap();
    let mut bytes = std::fs::read(idx(2)).unwrap();
    for at in [20, 120, bytes.len() / 2, bytes.len() - 3] {
        bytes[at] ^= 0x55;
    }
    std::fs::write(idx(2), &bytes).unwrap();
    std::fs::copy(idx(4), idx(3)).unwrap();
    for n in [0, 1, 3] {
        assert_eq!(
            pdgate::audit::index::summary_of(&indexed[n].1),
            None,
            "index {n} is not trusted"
        );
    }
    check("indexes missing or corrupt");
}

#[tokio::test]
async fn admin_records_are_queryable_and_the_report_lists_requests_handled_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (log, writer, _) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
    log.record(body(0)).await.unwrap(); // cust-0, billing
    log.record(RecordBody {
        time_us: 1_700_000_000_100_000,
        kind: Some(pdgate::audit::RecordKind::Admin),
        decision_id: "admin-1".into(),
        caller: "privacy-office".into(),
        action: "SuspendUse".into(),
        method: Some("/pdgate.v1.SubjectRights/SuspendUse".into()),
        subjects: vec!["cust-0".into()],
        decision: "allow".into(),
        detail: Some("use suspended at the person's request".into()),
        ..RecordBody::default()
    })
    .await
    .unwrap();
    drop(log);
    writer.close().await;
    let audit = dir.path().to_str().unwrap();
    let out = Pdgate::new([
        "audit", "query", "--audit", audit, "--kind", "admin", "--json",
    ])
    .output_async()
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["caller"], "privacy-office");
    assert_eq!(lines[0]["action"], "SuspendUse");

    // The report lists the request handled apart from the uses of the data (tests/report.rs
    // covers the rest of the report).
    let out = Pdgate::new([
        "audit",
        "report",
        "--audit",
        audit,
        "--subject",
        "cust-0",
        "--lang",
        "en",
        "--json",
    ])
    .output_async()
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["summary"]["accesses"], 1, "{report}");
    assert_eq!(report["requests"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["requests"][0]["request"], "Stop using my data");
    assert_eq!(report["requests"][0]["done"], true);
    assert!(
        !report["by_purpose"].to_string().contains("SuspendUse"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_queue_denies_on_the_data_plane() {
    // A queue of one record and 256 calls at once: the writer cannot keep up, the queue is
    // full, and the calls whose record it refuses are denied AUDIT_UNAVAILABLE without
    // reaching the upstream; every answered call has its record.
    let audit = tempfile::tempdir().unwrap();
    let mut settings = AuditSettings::new(audit.path());
    settings.queue_capacity = 1;
    let mut h = Harness::with(Options {
        audit: Some(settings),
        max_concurrent_calls: 1024,
        ..Options::default()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(h.client().await);
    }
    let calls = (0..256).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        async move { client.get_billing_statement(billing("cust-1")).await }
    });
    let results = futures_util::future::join_all(calls).await;
    let mut answered = Vec::new();
    let mut refused = 0;
    for result in results {
        match result {
            Ok(response) => answered.push(decision_id(response.metadata()).unwrap()),
            Err(status) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                assert_eq!(reason(&status), "AUDIT_UNAVAILABLE");
                refused += 1;
            }
        }
    }
    println!(
        "queue of 1, 256 calls at once: {} answered, {refused} denied AUDIT_UNAVAILABLE",
        answered.len()
    );
    assert!(
        refused > 0,
        "the queue never filled: nothing shows the denial"
    );
    assert_eq!(
        h.service.calls(),
        answered.len() as u64,
        "only the answered calls reached the upstream"
    );
    h.shutdown().await.unwrap();
    let recorded: std::collections::HashSet<String> = read::verify(audit.path())
        .map(|v| {
            assert!(v.ok(), "{v:?}");
            let mut ids = std::collections::HashSet::new();
            read::scan(audit.path(), &Filter::default(), |r| {
                ids.insert(r.body.decision_id);
                true
            })
            .unwrap();
            ids
        })
        .unwrap();
    for id in &answered {
        assert!(recorded.contains(id), "answered call {id} has no record");
    }
}

/// An audit segment that is a FIFO whose buffer the test has filled: the writer's next write
/// blocks — its records are neither written nor refused — until the test reads the other end
/// ([`StalledSegment::drain`]) or closes it ([`StalledSegment::break_pipe`]: the write fails,
/// EPIPE, as a device that fails under the writer).
struct StalledSegment {
    path: std::path::PathBuf,
    /// Both ends in one handle (Linux opens a FIFO read-write without waiting for a peer),
    /// non-blocking, so that filling and draining never hang the test.
    fifo: Option<std::fs::File>,
    drained: Vec<u8>,
}

/// `O_NONBLOCK` on Linux (x86_64 and aarch64 alike).
const O_NONBLOCK: i32 = 0o4000;

impl StalledSegment {
    /// Makes `dir`'s first segment a FIFO, open at both ends (the writer can open it).
    fn new(dir: &Path) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("segment-00000001.jsonl");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo: {made}");
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(&path)
            .unwrap();
        Self {
            path,
            fifo: Some(fifo),
            drained: Vec::new(),
        }
    }

    /// Fills the FIFO's buffer to the last byte: the writer's next write waits.
    fn fill(&mut self) {
        use std::io::Write;
        let fifo = self.fifo.as_mut().unwrap();
        for chunk in [4096, 1] {
            let bytes = vec![b'#'; chunk];
            loop {
                match fifo.write(&bytes) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("filling the FIFO: {e}"),
                }
            }
        }
    }

    /// Reads what is in the FIFO now (the filler, then records), keeping the records' text.
    fn drain(&mut self) -> String {
        use std::io::Read;
        let fifo = self.fifo.as_mut().unwrap();
        let mut buf = [0u8; 65536];
        loop {
            match fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.drained.extend(buf[..n].iter().filter(|b| **b != b'#')),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("draining the FIFO: {e}"),
            }
        }
        String::from_utf8_lossy(&self.drained).into_owned()
    }

    /// Closes the last reading end: the writer's waiting write fails (EPIPE).
    fn break_pipe(&mut self) {
        self.fifo = None;
    }

    /// Whether a thread of this process is blocked writing into this FIFO (the audit writer:
    /// the test's own handle never blocks). Read from `/proc`: the thread waits in
    /// `pipe_write` (`anon_pipe_write` on newer kernels), and its system call's first argument is a descriptor of this FIFO.
    fn writer_blocked(&self) -> bool {
        let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == self.path))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .any(|task| {
                let read =
                    |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
                read("wchan").trim().ends_with("pipe_write")
                    && read("syscall")
                        .split_whitespace()
                        .nth(1)
                        .and_then(|fd| u64::from_str_radix(fd.trim_start_matches("0x"), 16).ok())
                        .is_some_and(|fd| fds.contains(&fd.to_string()))
            })
    }
}

/// A harness whose audit segment is a [`StalledSegment`], filled: its writer's next write
/// waits. `fsync = "interval"`: a FIFO cannot be synced, and the write is what this stalls.
async fn stalled_harness() -> (tempfile::TempDir, StalledSegment, Harness) {
    let dir = tempfile::tempdir().unwrap();
    let mut segment = StalledSegment::new(dir.path());
    let mut settings = AuditSettings::new(dir.path());
    settings.fsync = pdgate::audit::Fsync::Interval(Duration::from_secs(60));
    let h = Harness::with(Options {
        audit: Some(settings),
        ..Options::default()
    })
    .await;
    segment.fill();
    (dir, segment, h)
}

/// Sends a read through `h` in a task of its own, and waits until it reaches the upstream.
async fn read_reaching_upstream(
    h: &Harness,
    calls_before: u64,
) -> tokio::task::JoinHandle<
    Result<tonic::Response<pdgate::proto::demo::BillingStatement>, tonic::Status>,
> {
    let mut client = h.client().await;
    let read = tokio::spawn(async move { client.get_billing_statement(billing("cust-1")).await });
    common::wait::eventually("the read reaching the upstream", || async {
        h.service.calls() == calls_before + 1
    })
    .await;
    read
}

#[tokio::test]
async fn a_read_goes_ahead_of_its_record_and_a_write_waits_for_its_record() {
    let (_dir, mut segment, h) = stalled_harness().await;

    // A write, while the writer cannot write: recorded first, so it waits before the upstream.
    let mut client = h.client().await;
    let write = tokio::spawn(async move { client.update_contact(update_contact("cust-1")).await });
    common::wait::eventually("the write's record stuck in the writer", || async {
        segment.writer_blocked()
    })
    .await;
    assert_eq!(h.service.calls(), 0, "a write went ahead of its record");

    // A read meanwhile: forwarded at once, its record queued behind the write's.
    let read = read_reaching_upstream(&h, 0).await;
    assert_eq!(
        h.service.last_metadata("x-pdgate-caller").as_deref(),
        Some("billing-service"),
        "the call that reached the upstream is not the read"
    );
    // Neither is answered while its record is not written.
    assert!(!write.is_finished() && !read.is_finished());

    // The device takes the records: both are answered, each after its record.
    let mut text = String::new();
    common::wait::eventually("both records written", || {
        text = segment.drain();
        let done = text.lines().count() >= 2;
        async move { done }
    })
    .await;
    let write = write.await.unwrap().unwrap();
    let read = read.await.unwrap().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let write_id = decision_id(write.metadata()).unwrap();
    let read_id = decision_id(read.metadata()).unwrap();
    assert!(lines[0].contains(&write_id), "{lines:?}");
    assert!(lines[1].contains(&read_id), "{lines:?}");
    assert_eq!(h.service.calls(), 2);
}

#[tokio::test]
async fn a_read_whose_record_fails_after_the_upstream_answered_gets_nothing_of_the_answer() {
    let (_dir, mut segment, h) = stalled_harness().await;
    // The upstream has the call (and answers it at once) while the record waits to be
    // written.
    let read = read_reaching_upstream(&h, 0).await;
    common::wait::eventually("the read's record stuck in the writer", || async {
        segment.writer_blocked()
    })
    .await;
    assert!(!read.is_finished());

    // The device fails under the writer: the record is not written.
    segment.break_pipe();
    let status = read.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "AUDIT_UNAVAILABLE");
    assert_eq!(decision_id(status.metadata()), None);
}
