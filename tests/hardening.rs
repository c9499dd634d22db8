//! Hardening (#14), over real sockets: metadata taken byte for byte, only gRPC calls forwarded,
//! deadlines answered `DEADLINE_EXCEEDED` wherever they pass, and a policy lifecycle that
//! cannot be tricked (a bundle without tests, failing tests at start, a change to `tests/`).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::raw::{billing, frame, silent_upstream};
use common::{Harness, Options, call};
use std::net::SocketAddr;
use tonic::Code;
use tonic::metadata::MetadataValue;

/// The reason codes of the audit record of the decision `id`.
fn recorded_reasons(h: &Harness, id: &str) -> Vec<String> {
    h.audit_records()
        .into_iter()
        .find(|r| r.body.decision_id == id)
        .map(|r| r.body.reasons.into_iter().map(|r| r.code).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn metadata_with_surrounding_whitespace_is_invalid_and_never_forwarded() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    // Each value is what an allowed call sends, with one space or tab around it.
    let cases: [(&str, &str); 6] = [
        ("x-caller", " billing-service"),
        ("x-purpose", "service.billing "),
        ("x-purpose", "\tservice.billing"),
        ("x-data-subject", "cust-1 "),
        ("x-data-subject", "cust-2, cust-1"),
        ("x-recipient", " ntt-east"),
    ];
    for (key, value) in cases {
        let mut request = call(billing("cust-1"), "billing-service", "service.billing", &[]);
        let md = request.metadata_mut();
        md.remove(key);
        md.insert(key, MetadataValue::try_from(value).unwrap());
        let status = client.get_billing_statement(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{key}: {value:?}");
        let id = common::decision_id(status.metadata()).expect("the refusal is recorded");
        assert_eq!(recorded_reasons(&h, &id), ["METADATA_INVALID"], "{key}");
    }
    assert_eq!(h.service.calls(), 0, "no refused call reached the upstream");
    // The same call without the whitespace is allowed: the refusals were the whitespace's.
    client
        .get_billing_statement(call(
            billing("cust-1"),
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .unwrap();
    assert_eq!(h.service.calls(), 1);
}

/// Sends one request over raw HTTP/2 — what a non-gRPC client sends, or a gRPC client that
/// does not enforce its own deadline — and returns the gRPC status of the answer (from the
/// headers of a trailers-only answer, else from the trailers).
async fn raw_h2(addr: SocketAddr, request: http::Request<()>, body: bytes::Bytes) -> tonic::Status {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(body, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

/// An allowed call's request (billing-service reads cust-1's statement), as raw HTTP/2.
fn billing_request(method: http::Method, content_type: Option<&str>) -> http::request::Builder {
    let mut request = http::Request::builder()
        .method(method)
        .uri("http://pdgate/demo.customer.v1.CustomerData/GetBillingStatement")
        .header("te", "trailers")
        .header("x-caller", "billing-service")
        .header("x-purpose", "service.billing")
        .header("x-data-subject", "cust-1");
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request
}

async fn raw(h: &Harness, method: http::Method, content_type: Option<&str>) -> tonic::Status {
    raw_h2(
        h.data_addr,
        billing_request(method, content_type).body(()).unwrap(),
        frame(&billing("cust-1")),
    )
    .await
}

#[tokio::test]
async fn only_grpc_posts_are_forwarded() {
    let h = Harness::start().await;
    for (method, content_type, expected) in [
        (
            http::Method::GET,
            Some("application/grpc"),
            Code::InvalidArgument,
        ),
        (
            http::Method::PUT,
            Some("application/grpc"),
            Code::InvalidArgument,
        ),
        (http::Method::POST, None, Code::InvalidArgument),
        (
            http::Method::POST,
            Some("application/json"),
            Code::InvalidArgument,
        ),
        (
            http::Method::POST,
            Some("text/plain"),
            Code::InvalidArgument,
        ),
        (
            http::Method::POST,
            Some("application/grpc+json"),
            Code::Unimplemented,
        ),
        (
            http::Method::POST,
            Some("application/grpc-web"),
            Code::InvalidArgument,
        ),
    ] {
        let status = raw(&h, method.clone(), content_type).await;
        assert_eq!(status.code(), expected, "{method} {content_type:?}");
    }
    assert_eq!(h.service.calls(), 0, "no refused call reached the upstream");
    // Both gRPC protobuf content types go through.
    for content_type in ["application/grpc", "application/grpc+proto"] {
        let status = raw(&h, http::Method::POST, Some(content_type)).await;
        assert_eq!(status.code(), Code::Ok, "{content_type}: {status:?}");
    }
    assert_eq!(h.service.calls(), 2);
}

#[tokio::test]
async fn a_deadline_that_passes_before_the_upstream_answers_is_deadline_exceeded() {
    let h = Harness::with(Options {
        upstream: Some(silent_upstream().await.0),
        ..Options::default()
    })
    .await;
    // A tonic client enforces its deadline itself (and calls it `CANCELLED`): these calls
    // come over raw HTTP/2, so that the answer is pdgate's. 1 ms passes while pdgate admits
    // the call, 300 ms while the upstream is silent.
    for timeout in ["1m", "300m"] {
        let request = billing_request(http::Method::POST, Some("application/grpc"))
            .header("grpc-timeout", timeout)
            .body(())
            .unwrap();
        let status = raw_h2(h.data_addr, request, frame(&billing("cust-1"))).await;
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{timeout}: {status:?}"
        );
    }
}

/// Billing may not read names: a policy row that changes one decision of the default policy.
const DENY_NAMES: &str = "p, role:billing, service.billing, customer.name, read, deny";

/// A policy test file with one case: billing reading a name gets `expect`.
fn billing_name_test(expect: &str) -> String {
    format!(
        "cases:\n  - name: billing reads names\n    request: {{ caller: billing-service, purpose: service.billing, action: read, categories: [customer.name], subjects: [cust-1] }}\n    expect: {expect}\n"
    )
}
const EXPECT_ALLOW: &str = "{ decision: allow }";
const EXPECT_DENY: &str = "{ decision: deny, reasons: [DENIED_BY_RULE] }";

fn watching(dir: &std::path::Path) -> Options {
    Options {
        policy: dir.to_path_buf(),
        reload: pdgate::config::ReloadSettings {
            watch: true,
            debounce: std::time::Duration::from_millis(50),
            keep_versions: 3,
        },
        ..Options::default()
    }
}

fn active(h: &Harness) -> Option<pdgate::policy::PolicyVersion> {
    h.gate
        .policy()
        .snapshot()
        .map(pdgate::policy::Snapshot::version)
}

async fn last_error(h: &Harness) -> String {
    let mut admin = common::policy_admin(h, "sre").await;
    admin
        .status(pdgate::proto::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .last_error
}

async fn serving(h: &Harness) -> tonic_health::pb::health_check_response::ServingStatus {
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(h.channel(h.api_addr).await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

async fn billing_call(h: &Harness) -> Result<(), tonic::Status> {
    h.client()
        .await
        .get_billing_statement(call(
            billing("cust-1"),
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .map(drop)
}

#[tokio::test]
async fn a_bundle_without_test_cases_is_refused_and_the_running_policy_stays() {
    let dir = common::policy_copy();
    let h = Harness::with(watching(dir.path())).await;
    let running = active(&h).unwrap();
    let mut admin = common::policy_admin(&h, "security-team").await;

    // Apply: a changed policy with no tests, then with a test file that holds no case.
    let mut bundle = pdgate::gate::Bundle::read_dir(dir.path(), None).unwrap();
    bundle.source.policy.push_str(&format!("\n{DENY_NAMES}\n"));
    bundle.tests.clear();
    let refused = admin
        .apply(pdgate::proto::v1::ApplyRequest {
            bundle: Some(bundle.clone().into()),
            comment: "no tests".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(common::reason(&refused), "POLICY_TESTS_MISSING");
    bundle.tests = vec![pdgate::gate::TestFile {
        name: "empty.yaml".into(),
        content: "cases: []\n".into(),
    }];
    let refused = admin
        .apply(pdgate::proto::v1::ApplyRequest {
            bundle: Some(bundle.into()),
            comment: "an empty test file".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(common::reason(&refused), "POLICY_TESTS_MISSING");
    assert_eq!(active(&h), Some(running));
    // Audited as every refused Apply is.
    let refusals: Vec<_> = h
        .audit_records()
        .into_iter()
        .filter(|r| r.body.action == "Apply" && r.body.decision == "deny")
        .map(|r| r.body.reasons[0].code.clone())
        .collect();
    assert_eq!(refusals, ["POLICY_TESTS_MISSING", "POLICY_TESTS_MISSING"]);

    // The file watch: the directory loses its tests (and changes its policy).
    std::fs::remove_dir_all(dir.path().join("tests")).unwrap();
    let csv = dir.path().join("policy.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, format!("{text}\n{DENY_NAMES}\n")).unwrap();
    common::wait::eventually("the reload without tests is refused", || async {
        !last_error(&h).await.is_empty()
    })
    .await;
    assert_eq!(active(&h), Some(running));
    billing_call(&h).await.unwrap();
}

#[tokio::test]
async fn a_policy_whose_tests_fail_at_start_denies_every_call_until_they_pass() {
    let dir = common::policy_copy();
    std::fs::write(
        dir.path().join("tests/zz_start.yaml"),
        billing_name_test(EXPECT_DENY),
    )
    .unwrap();
    let h = Harness::with(watching(dir.path())).await;
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(serving(&h).await, ServingStatus::NotServing);
    assert_eq!(active(&h), None);
    let status = billing_call(&h).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(common::reason(&status), "POLICY_UNAVAILABLE");
    assert_eq!(h.service.calls(), 0);

    // The test fixed (the policy files unchanged): the watch loads the policy.
    std::fs::write(
        dir.path().join("tests/zz_start.yaml"),
        billing_name_test(EXPECT_ALLOW),
    )
    .unwrap();
    common::wait::eventually("the policy passes its tests and is loaded", || async {
        serving(&h).await == ServingStatus::Serving
    })
    .await;
    billing_call(&h).await.unwrap();
}

#[tokio::test]
async fn the_watch_reloads_on_a_change_of_the_tests_alone() {
    let dir = common::policy_copy();
    let h = Harness::with(watching(dir.path())).await;
    let v1 = active(&h).unwrap();
    let test = dir.path().join("tests/zz_names.yaml");

    // A test the running policy fails, alone: checked, and reported.
    std::fs::write(&test, billing_name_test(EXPECT_DENY)).unwrap();
    common::wait::eventually("the failing test is reported", || async {
        last_error(&h).await.contains("zz_names.yaml")
    })
    .await;
    assert_eq!(active(&h), Some(v1));
    let first_refusal = h.gate.policies().status().last_error.unwrap().1;

    // A policy change whose test is wrong: refused.
    std::fs::write(&test, billing_name_test(EXPECT_ALLOW)).unwrap();
    let csv = dir.path().join("policy.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, format!("{text}\n{DENY_NAMES}\n")).unwrap();
    common::wait::eventually("the change with a wrong test is refused", || {
        // The refusal of the new policy files, not the earlier one.
        std::future::ready(
            h.gate
                .policies()
                .status()
                .last_error
                .is_some_and(|(error, at)| at > first_refusal && error.contains("zz_names.yaml")),
        )
    })
    .await;
    assert_eq!(active(&h), Some(v1));

    // The test fixed, the policy files as they were refused: loaded.
    std::fs::write(&test, billing_name_test(EXPECT_DENY)).unwrap();
    common::wait::eventually("the fixed test lets the change in", || async {
        active(&h).is_some_and(|v| v != v1)
    })
    .await;
    assert!(last_error(&h).await.is_empty());
    assert_eq!(billing_name_read(&h).await, "DENIED_BY_RULE");
}

/// Billing reads a name through `AccessControl.Check`: the first reason code, or `allow`.
async fn billing_name_read(h: &Harness) -> String {
    let mut client = pdgate::proto::v1::access_control_client::AccessControlClient::new(
        h.channel(h.api_addr).await,
    );
    let response = client
        .check(pdgate::proto::v1::CheckRequest {
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
        .into_inner();
    match response.reasons.first() {
        _ if response.allowed => "allow".to_owned(),
        Some(reason) => reason.code.clone(),
        None => String::new(),
    }
}

#[tokio::test]
async fn a_push_cannot_lower_the_secrecy_floor_and_marketing_never_reads_call_history() {
    // #14 finding 4: drop `marketing` from the never-purposes, list it where communications
    // data is allowed, and grant it call history — with the tests kept, so that only the
    // floor stands in the way.
    let dir = common::policy_copy();
    let h = Harness::with(watching(dir.path())).await;
    let running = active(&h).unwrap();
    let mut admin = common::policy_admin(&h, "security-team").await;
    let mut bundle = pdgate::gate::Bundle::read_dir(dir.path(), None).unwrap();
    let taxonomy = bundle.source.taxonomy.clone();
    bundle.source.taxonomy = taxonomy
        .replace(
            r#"never_purposes = ["marketing", "research", "joint_use", "third_party"]"#,
            r#"never_purposes = ["research", "joint_use", "third_party"]"#,
        )
        .replace(
            r#"purposes = ["service.provision", "service.billing","#,
            r#"purposes = ["marketing", "service.provision", "service.billing","#,
        );
    assert_ne!(bundle.source.taxonomy, taxonomy, "the edit applies");
    bundle
        .source
        .policy
        .push_str("\np, role:marketing, marketing, communications.call_history, read, allow\n");
    let refused = admin
        .apply(pdgate::proto::v1::ApplyRequest {
            bundle: Some(bundle.into()),
            comment: "marketing reads call history".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(common::reason(&refused), "POLICY_INVALID");
    assert_eq!(active(&h), Some(running));
    // Marketing still never reads call history.
    let status = h
        .client()
        .await
        .get_call_history(call(
            pdgate::proto::demo::GetCallHistoryRequest {
                customer_id: "cust-2".into(),
            },
            "marketing-service",
            "marketing",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(h.service.calls(), 0);
}

#[tokio::test]
async fn the_secrecy_floor_names_every_widening_with_its_line() {
    let dir = common::policy_copy();
    let path = dir.path().join("taxonomy.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let widened = text
        .replace(
            r#"never_recipients = ["joint_user", "third_party"]"#,
            r#"never_recipients = ["third_party"]"#,
        )
        .replace(
            r#"purposes = ["service.provision", "service.billing","#,
            r#"purposes = ["inquiry", "service.provision", "service.billing","#,
        );
    assert_ne!(widened, text);
    std::fs::write(&path, widened).unwrap();
    let Err(problems) = pdgate::policy::load_dir(dir.path()).await else {
        panic!("a taxonomy that widens the §5 floor was accepted");
    };
    let problems = problems.0;
    let floor: Vec<_> = problems
        .iter()
        .filter(|p| p.message.contains("§5 floor"))
        .collect();
    assert_eq!(floor.len(), 2, "{problems:?}");
    assert!(
        floor
            .iter()
            .all(|p| p.file == "taxonomy.toml" && p.line.is_some())
    );
    assert!(floor.iter().any(|p| p.message.contains("`inquiry`")));
    assert!(floor.iter().any(|p| p.message.contains("joint_user")));
}

/// Finding 8: a syntax error in `taxonomy.toml` used to hide every other file's problems (no
/// name can be resolved without the taxonomy, so nothing else was read). The other files are
/// still read: a syntax error in `routes.yaml` and a malformed `policy.csv` row are reported
/// with it, each with its file and line.
#[tokio::test]
async fn a_syntax_error_in_one_file_does_not_hide_the_others_problems() {
    let dir = common::policy_copy();
    let append = |file: &str, text: &str| -> usize {
        let path = dir.path().join(file);
        let mut content = std::fs::read_to_string(&path).unwrap();
        if !content.ends_with('\n') {
            content.push('\n');
        }
        let line = content.lines().count() + 1;
        content.push_str(text);
        std::fs::write(&path, content).unwrap();
        line
    };
    let taxonomy = append("taxonomy.toml", "[[purposes]\nid = \"broken\"\n");
    let routes = append("routes.yaml", "  - [unclosed\n");
    let policy = append("policy.csv", "p, role:billing\n");
    let problems = pdgate::policy::load_dir(dir.path()).await.unwrap_err().0;
    let at = |file: &str| {
        problems
            .iter()
            .find(|p| p.file == file)
            .and_then(|p| p.line)
    };
    assert_eq!(at("taxonomy.toml"), Some(taxonomy), "{problems:?}");
    assert!(
        at("routes.yaml").is_some_and(|l| l >= routes),
        "the routes' syntax error is reported too: {problems:?}"
    );
    assert_eq!(at("policy.csv"), Some(policy), "{problems:?}");
}

/// The fuzz targets' bodies (`fuzz/src/lib.rs`, which AFL++ drives through `fuzz/`), here
/// without AFL: every committed input of `fuzz/corpus/<target>/` and every crash kept in
/// `fuzz/artifacts/<target>/` is run through its target, so a regression fails `cargo test`.
#[path = "../fuzz/src/lib.rs"]
mod fuzz_targets;

fn replay_fuzz_corpus(target: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let body = fuzz_targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, body)| *body)
        .unwrap();
    let n = fuzz_targets::replay(&root, target, body);
    assert!(n > 0, "no committed inputs for fuzz target `{target}`");
}

#[test]
fn fuzz_corpus_metadata() {
    replay_fuzz_corpus("metadata");
}

#[test]
fn fuzz_corpus_policy() {
    replay_fuzz_corpus("policy");
}

#[test]
fn fuzz_corpus_descriptors() {
    replay_fuzz_corpus("descriptors");
}

#[test]
fn fuzz_corpus_audit() {
    replay_fuzz_corpus("audit");
}
