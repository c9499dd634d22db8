//! `pdgate policy diff`: the decisions of a real audit log (calls through a sidecar over real
//! sockets) replayed under candidate policies; flips are found, grouped and set the exit code.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use common::{Harness, call};
use pdgate::proto::demo::{GetBillingStatementRequest, GetProfileRequest};
use pdgate::registry::{Action, Change, SqliteRegistry, SubjectRegistry};
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;

/// An audit log of four calls: billing allowed, marketing allowed (cust-2 consented),
/// marketing denied CONSENT_REQUIRED (cust-1), and a call with no purpose denied.
async fn recorded_calls() -> Harness {
    let mut h = Harness::start().await;
    let mut client = h.client().await;
    let billing = |subject: &str| GetBillingStatementRequest {
        customer_id: subject.into(),
        month: String::new(),
    };
    let profile = |subject: &str| GetProfileRequest {
        customer_id: subject.into(),
    };
    client
        .get_billing_statement(call(
            billing("cust-1"),
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .expect("billing is allowed");
    client
        .get_profile(call(
            profile("cust-2"),
            "marketing-service",
            "marketing.email",
            &["cust-2"],
        ))
        .await
        .expect("cust-2 consented to marketing");
    let denied = client
        .get_profile(call(
            profile("cust-1"),
            "marketing-service",
            "marketing.email",
            &["cust-1"],
        ))
        .await
        .expect_err("cust-1 did not consent");
    assert_eq!(common::reason(&denied), "CONSENT_REQUIRED");
    client
        .get_billing_statement(call(billing("cust-1"), "billing-service", "", &["cust-1"]))
        .await
        .expect_err("no purpose declared");
    h.shutdown().await.unwrap();
    assert_eq!(h.audit_records().len(), 4);
    h
}

/// A copy of the default policy with `edit` applied to policy.csv.
fn candidate(edit: impl FnOnce(String) -> String) -> tempfile::TempDir {
    let dir = common::policy_copy();
    let csv = dir.path().join("policy.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, edit(text)).unwrap();
    dir
}

/// `pdgate policy diff` through the one runner. The harness that wrote the log has stopped,
/// so blocking this thread holds up nothing.
fn diff(candidate: &Path, audit: &Path, extra: &[&str]) -> (Output, Option<Value>) {
    let mut args: Vec<OsString> = ["policy", "diff", "--candidate"].map(OsString::from).into();
    args.extend([candidate.into(), "--audit".into(), audit.into()]);
    args.extend(extra.iter().map(OsString::from));
    let out = Pdgate::new(args).output();
    let json = serde_json::from_slice(&out.stdout).ok();
    (out, json)
}

#[tokio::test]
async fn the_same_policy_flips_nothing() {
    let h = recorded_calls().await;
    let same = candidate(|t| t);
    let (out, json) = diff(same.path(), &h.audit_dir, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json = json.unwrap();
    assert_eq!(json["replayed"], 4);
    assert_eq!(json["flips"], 0);
}

#[tokio::test]
async fn a_removed_grant_flips_the_calls_it_allowed_and_fails_the_command() {
    let h = recorded_calls().await;
    let line = "p, role:billing, service.billing, customer.billing, read, allow\n";
    let without = candidate(|t| {
        assert!(t.contains(line));
        t.replace(line, "")
    });
    let (out, json) = diff(without.path(), &h.audit_dir, &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "flips fail the command: {out:?}"
    );
    let json = json.unwrap();
    assert_eq!(json["flips"], 1);
    assert_eq!(json["allow_to_deny"], 1);
    assert_eq!(json["deny_to_allow"], 0);
    assert_eq!(json["by_caller"]["billing-service"], 1);
    assert_eq!(json["by_purpose"]["service.billing"], 1);
    assert_eq!(json["by_category"]["customer.billing"], 1);
    let example = &json["examples"][0];
    assert_eq!(example["recorded"], "allow");
    assert_eq!(example["candidate"], "deny");
    assert!(
        example["candidate_reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("NO_GRANT"),
        "{example}"
    );

    // Meant to flip: --allow-flips exits 0; the text report names the groups.
    let (out, _) = diff(without.path(), &h.audit_dir, &["--allow-flips"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 allow -> deny"), "{text}");
    assert!(text.contains("billing-service"), "{text}");

    // A filter that leaves the flipped record out finds nothing to flip.
    let (out, json) = diff(
        without.path(),
        &h.audit_dir,
        &["--json", "--caller", "marketing-service"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json.unwrap()["replayed"], 2);
}

#[tokio::test]
async fn the_registry_basis_decides_stage_5_against_todays_consent() {
    let h = recorded_calls().await;
    let same = candidate(|t| t);
    let store_dir = tempfile::tempdir().unwrap();
    let store: PathBuf = store_dir.path().join("subjects.db");
    let registry = SqliteRegistry::open(&store).await.unwrap();
    // cust-1 was denied for lack of consent; they consent now. cust-2 consented before (the
    // demo's subjects) but is not in this registry.
    registry
        .apply(&Change {
            subject: "cust-1".into(),
            action: Action::Consent {
                purpose: "marketing".into(),
                communications: false,
            },
            actor: "privacy-office".into(),
            source: Some("REQ-1".into()),
        })
        .await
        .unwrap();
    registry.close().await;

    let (out, json) = diff(
        same.path(),
        &h.audit_dir,
        &["--json", "--subjects-store", store.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let json = json.unwrap();
    assert_eq!(json["deny_to_allow"], 1, "{json}");
    assert_eq!(json["allow_to_deny"], 1, "{json}");
    let subjects: Vec<&Value> = json["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["subjects"][0])
        .collect();
    assert!(subjects.contains(&&Value::from("cust-1")));
    assert!(subjects.contains(&&Value::from("cust-2")));
}

#[tokio::test]
async fn bad_input_exits_2_and_an_invalid_candidate_exits_1() {
    let h = recorded_calls().await;
    let missing = Path::new("/nonexistent/policy");
    let (out, _) = diff(missing, &h.audit_dir, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--candidate"));

    let same = candidate(|t| t);
    let (out, _) = diff(same.path(), Path::new("/nonexistent/audit"), &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--audit"));

    let broken = candidate(|t| {
        format!("{t}p, role:billing, no.such.purpose, customer.billing, read, allow\n")
    });
    let (out, _) = diff(broken.path(), &h.audit_dir, &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy.csv"));
}
