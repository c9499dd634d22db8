//! The policy tests as data (`policy/tests/*.yaml`) run against the default policy: every case
//! passes, every reason code a policy can produce is exercised, and every clause of the privacy
//! policy that the rules come from has cases.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

use pdgate::decision::ReasonCode;
use pdgate::decision::fixtures::{self, FixtureError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The clauses the default policy's tests must cover ("§1" is general well-formedness).
const CLAUSES: [&str; 14] = [
    "§1", "§1(1)", "§1(2)", "§1(3)", "§1(4)", "§1(5)", "§2", "§2(a)", "§2(b)", "§2(c)", "§3", "§4",
    "§5", "§7",
];

fn policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policy")
}

#[tokio::test]
async fn default_policy_passes_its_tests_and_covers_every_code_and_clause() {
    let dir = policy_dir();
    let snapshot = match pdgate::policy::load_dir(&dir).await {
        Ok(s) => Arc::new(s),
        Err(problems) => panic!("the default policy does not load: {problems}"),
    };
    let files = fixtures::read_dir(&dir.join("tests")).expect("policy tests are readable");
    let report = fixtures::run(&snapshot, &files)
        .await
        .expect("policy tests run");

    let failures: Vec<String> = report.failures.iter().map(ToString::to_string).collect();
    assert!(
        failures.is_empty(),
        "{} of {} policy test cases failed:\n{}",
        failures.len(),
        report.cases,
        failures.join("\n")
    );
    assert!(report.cases > 0, "no policy test cases found");
    assert!(report.passed());

    // POLICY_UNAVAILABLE needs no policy at all, which a case run against a policy cannot show
    // (tests/cache_consistency.rs and tests/sidecar.rs do); ROUTE_UNKNOWN is the sidecar's,
    // about a gRPC method rather than a request (tests/sidecar.rs), as METADATA_INVALID is
    // about its metadata (tests/gate.rs) and SUBJECT_MISMATCH and MESSAGE_INSPECTION_REQUIRED
    // about its message (tests/inspect.rs); AUDIT_UNAVAILABLE is about the audit log, not the
    // policy (tests/audit.rs).
    let missing: Vec<&str> = ReasonCode::ALL
        .into_iter()
        .filter(|c| {
            !matches!(
                c,
                ReasonCode::PolicyUnavailable
                    | ReasonCode::RouteUnknown
                    | ReasonCode::MetadataInvalid
                    | ReasonCode::SubjectMismatch
                    | ReasonCode::MessageInspectionRequired
                    | ReasonCode::AuditUnavailable
            )
        })
        .filter(|c| !report.codes_covered.contains(c))
        .map(ReasonCode::as_str)
        .collect();
    assert!(
        missing.is_empty(),
        "no policy test case expects these reason codes: {}",
        missing.join(", ")
    );

    let missing: Vec<&str> = CLAUSES
        .into_iter()
        .filter(|c| !report.clauses_covered.iter().any(|k| k == c))
        .collect();
    assert!(
        missing.is_empty(),
        "no policy test case illustrates these clauses: {}",
        missing.join(", ")
    );
}

/// §2(d): the manager responsible for jointly used data is the CISO. The taxonomy says so on
/// `joint_use`, and every joint-use purpose inherits it; no other purpose names a manager.
#[tokio::test]
async fn joint_use_names_the_ciso_as_responsible() {
    let snapshot = match pdgate::policy::load_dir(&policy_dir()).await {
        Ok(s) => s,
        Err(problems) => panic!("the default policy does not load: {problems}"),
    };
    let purposes = snapshot.purposes();
    let mut joint = 0;
    for name in purposes.iter_names() {
        let id = purposes.id(name).expect("a listed purpose resolves");
        let manager = purposes.info(id).manager.as_ref();
        if name.as_ref() == "joint_use" || name.starts_with("joint_use.") {
            joint += 1;
            let (who, clause) = manager.unwrap_or_else(|| panic!("`{name}` names no manager"));
            assert!(who.contains("CISO"), "`{name}`: manager is `{who}`");
            assert_eq!(clause.as_ref(), "§2(d)", "`{name}`");
        } else {
            assert!(manager.is_none(), "`{name}` names a manager: {manager:?}");
        }
    }
    assert!(
        joint >= 7,
        "joint_use, its marketing research and the five §1 counterparts"
    );
}

/// A temporary directory holding one fixture file, `case.yaml`, with `text`.
fn write_fixture(text: &str) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("case.yaml"), text)?;
    Ok(dir)
}

#[test]
fn unknown_reason_code_is_a_fixture_error() {
    let dir = write_fixture(
        r#"
description: a case that expects a code pdgate does not have
cases:
  - name: made-up code
    clause: "§1"
    request: { caller: billing-service, purpose: service.billing, action: read,
               categories: [customer.billing], subjects: [cust-1] }
    expect: { decision: deny, reasons: [NOT_A_REAL_CODE] }
"#,
    )
    .expect("write fixture");
    match fixtures::read_dir(dir.path()) {
        Err(FixtureError::Parse { message, .. }) => assert!(
            message.contains("NOT_A_REAL_CODE"),
            "the error names the code: {message}"
        ),
        Err(other) => panic!("expected a parse error, got {other}"),
        Ok(_) => panic!("a fixture with an unknown reason code was accepted"),
    }
}

#[test]
fn invalid_yaml_is_a_fixture_error() {
    let dir = write_fixture("cases:\n  - name: [unclosed\n    expect: {\n").expect("write fixture");
    match fixtures::read_dir(dir.path()) {
        Err(FixtureError::Parse { path, .. }) => assert!(path.ends_with("case.yaml")),
        Err(other) => panic!("expected a parse error, got {other}"),
        Ok(_) => panic!("invalid YAML was accepted"),
    }
}
