//! The admission pipeline (`src/gate/`) as every door sees it, over real sockets: one decision
//! id per call and every id in the audit log, the first decision of a fresh sidecar a cache
//! miss, unreadable metadata refused *and* recorded, pdgate's own metadata never taken from a
//! client, and a sidecar whose data plane stops does not run on half alive.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::{Harness, Options, SubjectsChoice, call, decision_id, reason};
use pdgate::audit::AuditRecord;
use pdgate::proto::demo::GetProfileRequest;
use pdgate::proto::v1::CheckRequest;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::server::ServeError;
use std::time::Duration;
use tonic::Code;

fn profile(customer: &str) -> GetProfileRequest {
    GetProfileRequest {
        customer_id: customer.into(),
    }
}

/// The counter half of a decision id (`xxxxxxxx-xxxx-xxxx-CCCC-CCCCCCCCCCCC`), and the random
/// half it shares with every id of the same sidecar.
fn id_parts(id: &str) -> (String, u64) {
    let hex: String = id.chars().filter(|c| *c != '-').collect();
    assert_eq!(hex.len(), 32, "{id}");
    (
        hex[..16].to_owned(),
        u64::from_str_radix(&hex[16..], 16).unwrap(),
    )
}

/// Asserts the records' decision ids are one sidecar's, in order, with none skipped.
fn assert_ids_without_gaps(records: &[AuditRecord]) {
    assert!(!records.is_empty(), "no audit records");
    let (high, first) = id_parts(&records[0].body.decision_id);
    for (i, record) in records.iter().enumerate() {
        let (h, n) = id_parts(&record.body.decision_id);
        assert_eq!(h, high, "record {i} is from another sidecar");
        assert_eq!(
            n,
            first + i as u64,
            "record {i}: decision id {} skips {} id(s)",
            record.body.decision_id,
            n.saturating_sub(first + i as u64)
        );
    }
}

#[tokio::test]
async fn a_fresh_sidecars_first_decision_is_a_cache_miss_with_one_id() {
    // With the subject registry, the first call must read its subject from the store: the
    // gate finishes the same decision again after the read (same id, same cache lookup).
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Harness::with(Options {
        subjects: SubjectsChoice::Sqlite(tmp.path().join("subjects.db")),
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;
    for _ in 0..3 {
        client
            .get_profile(call(
                profile("cust-1"),
                "support-service",
                "service.support",
                &["cust-1"],
            ))
            .await
            .unwrap();
    }
    h.shutdown().await.unwrap();
    let records = h.audit_records();
    assert_eq!(records.len(), 3);
    let hits: Vec<bool> = records.iter().map(|r| r.body.cache_hit).collect();
    assert_eq!(hits, [false, true, true], "cache_hit of each record");
    assert_ids_without_gaps(&records);
}

#[tokio::test]
async fn the_demo_walkthroughs_decision_ids_run_without_gaps() {
    let mut h = Harness::start().await;
    let mut report = String::new();
    let summary = pdgate::demo::walkthrough::run(h.channel(h.data_addr).await, &mut report).await;
    assert!(summary.unexpected.is_empty(), "{report}");
    // A malformed call and a Check through the API too: every door draws from one sequence.
    let mut client = h.client().await;
    let mut malformed = call(
        profile("cust-1"),
        "support-service",
        "service.support",
        &["cust-1"],
    );
    malformed
        .metadata_mut()
        .append("x-purpose", "marketing".parse().unwrap());
    assert_eq!(
        client.get_profile(malformed).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut api = AccessControlClient::new(h.channel(h.api_addr).await);
    api.check(CheckRequest {
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.billing".into()],
        subjects: vec!["cust-1".into()],
        ..CheckRequest::default()
    })
    .await
    .unwrap();
    h.shutdown().await.unwrap();
    let records = h.audit_records();
    // An export's records are decided one by one, each with its own record.
    let streamed_records = records
        .iter()
        .filter(|r| {
            r.body
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with("a record of the response"))
        })
        .count();
    assert!(streamed_records > 0, "{report}");
    assert_eq!(
        records.len(),
        summary.allowed + summary.denied + streamed_records + 2,
        "one record per walkthrough call and streamed record, the malformed call and the Check\n{report}"
    );
    assert_ids_without_gaps(&records);
}

#[tokio::test]
async fn a_malformed_metadata_refusal_is_recorded_under_its_decision_id() {
    let mut h = Harness::start().await;
    let mut client = h.client().await;
    let mut request = call(
        profile("cust-1"),
        "support-service",
        "service.support",
        &["cust-1"],
    );
    request
        .metadata_mut()
        .insert("grpc-timeout", "soon".parse().unwrap());
    let status = client.get_profile(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let id = decision_id(status.metadata()).expect("the refusal names its decision");
    assert_eq!(
        h.service.calls(),
        0,
        "a refused call never reaches the upstream"
    );
    h.shutdown().await.unwrap();
    let record = h.audit_record(&id);
    assert_eq!(record.body.decision, "deny");
    assert_eq!(
        record.body.caller, "",
        "insecure mode: the caller is only claimed"
    );
    assert_eq!(
        record.body.method.as_deref(),
        Some("/demo.customer.v1.CustomerData/GetProfile")
    );
    let codes: Vec<&str> = record
        .body
        .reasons
        .iter()
        .map(|r| r.code.as_str())
        .collect();
    assert_eq!(codes, ["METADATA_INVALID"]);
    assert!(
        record
            .body
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("grpc-timeout"),
        "{:?}",
        record.body.detail
    );
}

#[tokio::test]
async fn a_client_sent_pdgate_header_never_reaches_the_upstream() {
    let mut h = Harness::start().await;
    let mut client = h.client().await;
    let mut request = call(
        profile("cust-1"),
        "support-service",
        "service.support",
        &["cust-1"],
    );
    let md = request.metadata_mut();
    md.insert("x-pdgate-decision-id", "forged-decision".parse().unwrap());
    md.insert("x-pdgate-caller", "fraud-service".parse().unwrap());
    md.insert("x-pdgate-anything", "forged".parse().unwrap());
    let response = client.get_profile(request).await.unwrap();
    let id = decision_id(response.metadata()).unwrap();
    assert_eq!(
        h.service.last_metadata_all("x-pdgate-decision-id"),
        [id],
        "the upstream sees pdgate's decision id, once"
    );
    assert_eq!(
        h.service.last_metadata_all("x-pdgate-caller"),
        ["support-service"]
    );
    assert_eq!(h.service.last_metadata("x-pdgate-anything"), None);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_denial_that_cannot_be_recorded_is_audit_unavailable_without_an_id() {
    // The segment the writer appends to is /dev/full: every write fails with ENOSPC.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.path().join("segment-00000001.jsonl")).unwrap();
    let h = Harness::with(Options {
        audit: Some(pdgate::audit::AuditSettings::new(dir.path())),
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;
    let status = client
        .get_profile(call(
            profile("cust-1"),
            "nobody",
            "service.support",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "AUDIT_UNAVAILABLE");
    assert_eq!(
        decision_id(status.metadata()),
        None,
        "an answer without a record names no decision"
    );
}

#[tokio::test]
async fn serve_stops_with_an_error_when_the_data_plane_stops_accepting() {
    let mut h = Harness::with(Options {
        data_listener_handle: true,
        ..Options::default()
    })
    .await;
    // Shut the data plane's listening socket down under it (a second handle on the same
    // socket): the listener can no longer accept.
    let socket = h.data_listener_handle();
    socket2::SockRef::from(&socket)
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), h.sidecar.take().unwrap())
        .await
        .expect("pdgate keeps running with a dead data plane")
        .unwrap();
    match ended {
        Err(ServeError::Stopped("data plane")) => {}
        other => panic!("expected the data plane to be named as stopped, got {other:?}"),
    }
}
