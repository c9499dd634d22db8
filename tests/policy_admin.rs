//! `PolicyAdmin` over real sockets: separation of duties per method, Apply (validated, tested,
//! swapped, written to the policy directory, audited), rejected candidates (every problem
//! with file:line, the running policy kept), Rollback, Status, Explain stage by stage, the
//! shadow policy (decided, never enforced, differences recorded and counted), and health after
//! a reload.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::{Harness, Options, call, decision_id, policy_admin, policy_copy, reason};
use pdgate::audit::{AuditRecord, RecordKind};
use pdgate::gate::Bundle;
use pdgate::proto::demo::GetProfileRequest;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::proto::v1::{
    ApplyRequest, CheckRequest, ClearShadowRequest, ExplainRequest, ExplainSubject, PolicyBundle,
    RollbackRequest, StatusRequest, ValidateRequest,
};
use std::path::Path;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

/// A deny row that the policy tests do not contradict: billing may no longer read names.
const DENY_NAMES: &str = "p, role:billing, service.billing, customer.name, read, deny";
/// A deny row that breaks a policy test (billing reads the billing data).
const DENY_BILLING: &str = "p, role:billing, service.billing, customer.billing, read, deny";

fn bundle_of(dir: &Path) -> PolicyBundle {
    PolicyBundle::from(Bundle::read_dir(dir, None).unwrap())
}

/// The default policy with `rows` appended to policy.csv.
fn with_rows(rows: &[&str]) -> PolicyBundle {
    let mut b = bundle_of(&common::policy_dir());
    for row in rows {
        b.policy.push('\n');
        b.policy.push_str(row);
    }
    b.policy.push('\n');
    b
}

fn apply(bundle: PolicyBundle, comment: &str) -> ApplyRequest {
    ApplyRequest {
        bundle: Some(bundle),
        comment: comment.into(),
    }
}

/// Billing reads a name: allowed by the default policy, denied `DENIED_BY_RULE` by
/// [`DENY_NAMES`].
fn billing_reads_name() -> CheckRequest {
    CheckRequest {
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.name".into()],
        subjects: vec!["cust-1".into()],
        recipient: String::new(),
        minimizable: Vec::new(),
    }
}

async fn check(h: &Harness, request: CheckRequest) -> pdgate::proto::v1::CheckResponse {
    let mut client = AccessControlClient::new(h.channel(h.api_addr).await);
    client.check(request).await.unwrap().into_inner()
}

fn admin_records(h: &Harness, action: &str) -> Vec<AuditRecord> {
    h.audit_records()
        .into_iter()
        .filter(|r| r.body.kind == Some(RecordKind::Admin) && r.body.action == action)
        .collect()
}

#[tokio::test]
async fn each_method_needs_its_role_and_refusals_are_audited() {
    let mut h = Harness::start().await;
    let b = bundle_of(&common::policy_dir());
    for identity in ["", "sre", "audit-team", "billing-service"] {
        let mut c = policy_admin(&h, identity).await;
        let refused = [
            c.validate(ValidateRequest {
                bundle: Some(b.clone()),
            })
            .await
            .unwrap_err(),
            c.apply(apply(b.clone(), "x")).await.unwrap_err(),
            c.rollback(RollbackRequest {
                version: "00000000".into(),
                comment: String::new(),
            })
            .await
            .unwrap_err(),
            c.set_shadow(apply(b.clone(), "x")).await.unwrap_err(),
            c.clear_shadow(ClearShadowRequest {}).await.unwrap_err(),
        ];
        for status in refused {
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{identity}: {status:?}"
            );
            assert_eq!(reason(&status), "ADMIN_ROLE_REQUIRED");
        }
    }
    // Status and Explain: operator or policy-admin; nobody else.
    for identity in ["", "audit-team", "privacy-office"] {
        let mut c = policy_admin(&h, identity).await;
        let status = c.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let explain = c
            .explain(ExplainRequest {
                request: Some(billing_reads_name()),
                subjects: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(explain.code(), Code::PermissionDenied);
        assert_eq!(reason(&explain), "ADMIN_ROLE_REQUIRED");
    }
    for identity in ["sre", "security-team"] {
        let mut c = policy_admin(&h, identity).await;
        c.status(StatusRequest {}).await.unwrap();
        c.explain(ExplainRequest {
            request: Some(billing_reads_name()),
            subjects: vec![],
        })
        .await
        .unwrap();
    }
    // An operator may look but not change: no Apply went through, the version is the same.
    let refused: Vec<_> = admin_records(&h, "Apply")
        .into_iter()
        .filter(|r| r.body.decision == "deny")
        .collect();
    assert_eq!(refused.len(), 4);
    assert!(refused.iter().any(|r| r.body.caller == "sre"));
    assert!(
        refused
            .iter()
            .all(|r| r.body.reasons[0].code == "ADMIN_ROLE_REQUIRED")
    );
    let statuses = admin_records(&h, "Status");
    assert!(
        statuses
            .iter()
            .any(|r| r.body.caller == "sre" && r.body.decision == "allow")
    );
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn apply_swaps_a_tested_policy_writes_the_directory_and_rollback_restores() {
    let dir = policy_copy();
    let mut h = Harness::with(Options {
        policy: dir.path().to_path_buf(),
        ..Options::default()
    })
    .await;
    let before = check(&h, billing_reads_name()).await;
    assert!(before.allowed);
    let version_a = before.policy_version.clone();

    let mut admin = policy_admin(&h, "security-team").await;
    let validated = admin
        .validate(ValidateRequest {
            bundle: Some(with_rows(&[DENY_NAMES])),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(validated.valid, "{:?}", validated.problems);
    assert!(validated.tests_run > 100);
    // Validate changes nothing.
    assert_eq!(
        check(&h, billing_reads_name()).await.policy_version,
        version_a
    );

    let applied = admin
        .apply(apply(
            with_rows(&[DENY_NAMES]),
            "CHG-1 billing stops reading names",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(applied.changed);
    assert_eq!(applied.previous_version, version_a);
    assert_eq!(applied.version, validated.version);
    assert!(applied.not_persisted.is_empty());
    assert!(applied.tests_run > 100);
    let after = check(&h, billing_reads_name()).await;
    assert!(!after.allowed);
    assert_eq!(after.reasons[0].code, "DENIED_BY_RULE");
    assert_eq!(after.policy_version, applied.version);
    // Written into the directory: a restart keeps it.
    let on_disk = std::fs::read_to_string(dir.path().join("policy.csv")).unwrap();
    assert!(on_disk.contains(DENY_NAMES));

    // The same bundle again: nothing to do.
    let again = admin
        .apply(apply(with_rows(&[DENY_NAMES]), "again"))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.changed);

    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    let active = status.active.unwrap();
    assert_eq!(active.version, applied.version);
    assert_eq!(active.applied_by, "security-team");
    assert_eq!(active.comment, "CHG-1 billing stops reading names");
    assert_eq!(status.store, "files");
    assert!(status.last_error.is_empty());
    let history: Vec<&str> = status.history.iter().map(|i| i.version.as_str()).collect();
    assert_eq!(history, [applied.version.as_str(), version_a.as_str()]);
    assert_eq!(status.history[1].applied_by, "file");

    // Back to A by a 12-digit prefix.
    let rolled = admin
        .rollback(RollbackRequest {
            version: version_a[..12].into(),
            comment: "CHG-1 reverted".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.version, version_a);
    assert_eq!(rolled.previous_version, applied.version);
    let restored = check(&h, billing_reads_name()).await;
    assert!(restored.allowed);
    assert_eq!(restored.policy_version, version_a);
    assert!(
        !std::fs::read_to_string(dir.path().join("policy.csv"))
            .unwrap()
            .contains(DENY_NAMES)
    );
    // An unknown version, a malformed one.
    let unknown = admin
        .rollback(RollbackRequest {
            version: "0123456789ab".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(reason(&unknown), "POLICY_VERSION_UNKNOWN");
    let malformed = admin
        .rollback(RollbackRequest {
            version: "abc".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);

    // Audited before they took effect: the actor, the version, the comment.
    let applies: Vec<_> = admin_records(&h, "Apply")
        .into_iter()
        .filter(|r| r.body.decision == "allow")
        .collect();
    assert_eq!(applies.len(), 2);
    assert_eq!(applies[0].body.caller, "security-team");
    assert_eq!(
        applies[0].body.policy_version.as_deref(),
        Some(applied.version.as_str())
    );
    assert!(applies[0].body.detail.as_deref().unwrap().contains("CHG-1"));
    let rollbacks = admin_records(&h, "Rollback");
    assert_eq!(rollbacks.len(), 3);
    assert_eq!(
        rollbacks[0].body.policy_version.as_deref(),
        Some(version_a.as_str())
    );
    assert!(admin_records(&h, "Validate")[0].body.caller == "security-team");
    assert!(
        common::scrape(&h)
            .await
            .contains("pdgate_policy_reloads_total 2")
    );
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn rejected_candidates_list_every_problem_and_the_running_policy_stays() {
    let dir = policy_copy();
    let mut h = Harness::with(Options {
        policy: dir.path().to_path_buf(),
        ..Options::default()
    })
    .await;
    let version_a = check(&h, billing_reads_name()).await.policy_version;
    let mut admin = policy_admin(&h, "security-team").await;

    // Two problems at once, each with its line.
    let invalid = with_rows(&[
        "p, role:billing, service.nonsense, customer.name, read, allow",
        "p, role:billing, service.billing, customer.nonsense, read, allow",
    ]);
    let lines = invalid.policy.lines().count();
    let status = admin
        .apply(apply(invalid.clone(), "bad"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "POLICY_INVALID");
    let violations: Vec<String> = status
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert!(
        violations.contains(&format!("policy.csv:{}", lines - 1)),
        "{violations:?}"
    );
    assert!(
        violations.contains(&format!("policy.csv:{lines}")),
        "{violations:?}"
    );
    let validated = admin
        .validate(ValidateRequest {
            bundle: Some(invalid),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!validated.valid);
    assert_eq!(validated.problems.len(), 2);

    // Valid but its own tests fail: the failed case is named with its file and line.
    let failing = admin
        .apply(apply(with_rows(&[DENY_BILLING]), "breaks billing"))
        .await
        .unwrap_err();
    assert_eq!(failing.code(), Code::FailedPrecondition);
    assert_eq!(reason(&failing), "POLICY_TESTS_FAILED");
    let failed_at: Vec<String> = failing
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert!(
        failed_at
            .iter()
            .any(|f| f.starts_with("tests/s1_1_service.yaml:")),
        "{failed_at:?}"
    );

    // A bundle with a bad test file name is bad input.
    let mut named = bundle_of(&common::policy_dir());
    named.tests[0].name = "../escape.yaml".into();
    let bad_name = admin.apply(apply(named, "x")).await.unwrap_err();
    assert_eq!(bad_name.code(), Code::InvalidArgument);

    // Nothing changed, on the wire or on disk; the failure is reported.
    let now = check(&h, billing_reads_name()).await;
    assert!(now.allowed);
    assert_eq!(now.policy_version, version_a);
    assert!(
        !std::fs::read_to_string(dir.path().join("policy.csv"))
            .unwrap()
            .contains(DENY_BILLING)
    );
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.active.unwrap().version, version_a);
    assert!(
        status.last_error.contains("s1_1_service.yaml"),
        "{}",
        status.last_error
    );
    assert!(status.last_error_at_us > 0);
    assert!(
        common::scrape(&h)
            .await
            .contains("pdgate_policy_reload_failures_total 2")
    );
    let rejected: Vec<_> = admin_records(&h, "Apply")
        .into_iter()
        .filter(|r| r.body.decision == "deny")
        .collect();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0].body.reasons[0].code, "POLICY_INVALID");
    assert_eq!(rejected[1].body.reasons[0].code, "POLICY_TESTS_FAILED");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn explain_reports_the_outcome_of_every_stage() {
    let mut h = Harness::start().await;
    let mut operator = policy_admin(&h, "sre").await;
    let marketing = CheckRequest {
        caller: "marketing-service".into(),
        purpose: "marketing.email".into(),
        action: "read".into(),
        categories: vec!["customer.contact.email".into()],
        subjects: vec!["cust-9".into()],
        recipient: String::new(),
        minimizable: Vec::new(),
    };
    let stages = |r: &pdgate::proto::v1::ExplainResponse| -> Vec<(String, String)> {
        r.stages
            .iter()
            .map(|s| (s.stage.clone(), s.outcome.clone()))
            .collect()
    };
    let no_consent = operator
        .explain(ExplainRequest {
            request: Some(marketing.clone()),
            subjects: vec![ExplainSubject {
                subject: "cust-9".into(),
                ..ExplainSubject::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let pair = |s: &str, o: &str| (s.to_owned(), o.to_owned());
    assert_eq!(
        stages(&no_consent),
        [
            pair("well_formed", "pass"),
            pair("grant", "pass"),
            pair("secrecy", "pass"),
            pair("deidentification", "pass"),
            pair("subject_state", "deny"),
        ]
    );
    assert_eq!(no_consent.stages[4].reasons[0].code, "CONSENT_REQUIRED");
    assert!(!no_consent.decision.unwrap().allowed);

    let consented = operator
        .explain(ExplainRequest {
            request: Some(marketing.clone()),
            subjects: vec![ExplainSubject {
                subject: "cust-9".into(),
                consent: vec!["marketing".into()],
                ..ExplainSubject::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(consented.stages.iter().all(|s| s.outcome == "pass"));
    assert!(consented.decision.unwrap().allowed);

    let unknown = operator
        .explain(ExplainRequest {
            request: Some(CheckRequest {
                purpose: "marketing.nonsense".into(),
                ..marketing.clone()
            }),
            subjects: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unknown.stages[0].outcome, "deny");
    assert_eq!(unknown.stages[0].reasons[0].code, "PURPOSE_UNKNOWN");
    assert!(unknown.stages[1..].iter().all(|s| s.outcome == "skipped"));

    let secrecy = operator
        .explain(ExplainRequest {
            request: Some(CheckRequest {
                categories: vec!["communications.call_history".into()],
                ..marketing
            }),
            subjects: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    // Stages 1–4 all run: no grant, and §5 forbids it; stage 5 is not reached.
    let denied: Vec<_> = secrecy
        .stages
        .iter()
        .filter(|s| s.outcome == "deny")
        .map(|s| s.stage.as_str())
        .collect();
    assert_eq!(denied, ["grant", "secrecy"]);
    assert_eq!(secrecy.stages[4].outcome, "skipped");

    // Audited as admin actions, never as accesses.
    let records = h.audit_records();
    assert!(
        records
            .iter()
            .all(|r| r.body.kind == Some(RecordKind::Admin))
    );
    let explains = admin_records(&h, "Explain");
    assert_eq!(explains.len(), 4);
    assert_eq!(explains[0].body.caller, "sre");
    assert_eq!(explains[0].body.subjects, ["cust-9"]);
    assert!(explains[0].body.policy_version.is_some());
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_shadow_policy_is_decided_never_enforced_and_its_differences_recorded() {
    let mut h = Harness::start().await;
    let mut admin = policy_admin(&h, "security-team").await;
    let shadow = admin
        .set_shadow(apply(with_rows(&[DENY_NAMES]), "try CHG-2"))
        .await
        .unwrap()
        .into_inner();
    assert!(shadow.tests_run > 100);

    let mut client = h.client().await;
    // The active policy allows and is enforced; the shadow would deny.
    let response = client
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .unwrap();
    let differing = decision_id(response.metadata()).unwrap();
    // Both decide alike: no shadow decision recorded.
    let same = client
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "support-service",
            "service.support",
            &["cust-1"],
        ))
        .await
        .unwrap();
    let alike = decision_id(same.metadata()).unwrap();
    // The Check API too.
    let checked = check(&h, billing_reads_name()).await;
    assert!(checked.allowed);

    let by_id = |id: &str| h.audit_record(id);
    assert_eq!(by_id(&differing).body.decision, "allow");
    assert_eq!(
        by_id(&differing).body.shadow_decision.as_deref(),
        Some("deny")
    );
    assert_eq!(by_id(&alike).body.shadow_decision, None);
    assert_eq!(
        by_id(&checked.decision_id).body.shadow_decision.as_deref(),
        Some("deny")
    );

    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.shadow.unwrap().version, shadow.version);
    assert_eq!(status.shadow_differences, 2);
    assert!(
        common::scrape(&h)
            .await
            .contains("pdgate_shadow_differences_total{active=\"allow\",shadow=\"deny\"} 2")
    );
    let set = admin_records(&h, "SetShadow");
    assert_eq!(
        set[0].body.policy_version.as_deref(),
        Some(shadow.version.as_str())
    );

    let cleared = admin
        .clear_shadow(ClearShadowRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.version, shadow.version);
    assert_eq!(cleared.differences, 2);
    let after = check(&h, billing_reads_name()).await;
    let record = h.audit_record(&after.decision_id);
    assert_eq!(record.body.shadow_decision, None);
    assert_eq!(
        admin_records(&h, "ClearShadow")[0].body.caller,
        "security-team"
    );

    // A candidate whose tests fail is not loaded as a shadow.
    let refused = admin
        .set_shadow(apply(with_rows(&[DENY_BILLING]), "x"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_follows_the_policy_after_an_apply() {
    let dir = policy_copy();
    std::fs::write(dir.path().join("policy.csv"), "p, nonsense\n").unwrap();
    let mut h = Harness::with(Options {
        policy: dir.path().to_path_buf(),
        ..Options::default()
    })
    .await;
    let mut health = HealthClient::new(h.channel(h.api_addr).await);
    let serving = |health: &mut HealthClient<_>| {
        let mut health: HealthClient<tonic::transport::Channel> = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    assert_eq!(serving(&mut health).await, ServingStatus::NotServing as i32);
    let mut admin = policy_admin(&h, "security-team").await;
    let applied = admin
        .apply(apply(
            bundle_of(&common::policy_dir()),
            "first valid policy",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(applied.previous_version.is_empty());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while serving(&mut health).await != ServingStatus::Serving as i32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health stayed NOT_SERVING"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(check(&h, billing_reads_name()).await.allowed);
    h.shutdown().await.unwrap();
}

/// Runs the `pdgate` binary against the harness's API port, through the one runner (off the
/// runtime's threads: the sidecar it talks to runs on this test's runtime).
async fn pdgate(h: &Harness, args: &[&str]) -> (i32, String, String) {
    let admin = h.api_addr.to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--admin", admin.as_str()]);
    let out = common::bin::Pdgate::new(all).output_async().await;
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_pushes_reports_rolls_back_explains_and_shadows() {
    let dir = policy_copy();
    let mut h = Harness::with(Options {
        policy: dir.path().to_path_buf(),
        ..Options::default()
    })
    .await;
    let version_a = check(&h, billing_reads_name()).await.policy_version;
    let candidate = policy_copy();
    let csv = candidate.path().join("policy.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, format!("{text}{DENY_NAMES}\n")).unwrap();
    let cand = candidate.path().to_str().unwrap();

    // Wrong role: refused, exit 1.
    let (code, refused) = cli_json(&h, &["policy", "push", cand], "sre").await;
    assert_eq!(code, 1, "{refused}");
    assert_eq!(refused["code"], "PermissionDenied", "{refused}");
    assert_eq!(refused["reason"], "ADMIN_ROLE_REQUIRED", "{refused}");
    assert!(
        check(&h, billing_reads_name()).await.allowed,
        "a refused push changes nothing"
    );

    let (code, out, err) = pdgate(
        &h,
        &[
            "policy",
            "push",
            cand,
            "--comment",
            "CHG-9",
            "--as",
            "security-team",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied version"), "{out}");
    assert!(!check(&h, billing_reads_name()).await.allowed);

    let (code, out, err) = pdgate(&h, &["policy", "status", "--json", "--as", "sre"]).await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["active"]["applied_by"], "security-team");
    assert_eq!(status["active"]["comment"], "CHG-9");
    assert_eq!(status["history"].as_array().unwrap().len(), 2);
    let (code, out, _) = pdgate(&h, &["policy", "status", "--as", "security-team"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("history"), "{out}");

    // An invalid candidate: exit 1, every problem with file:line on stderr.
    std::fs::write(
        &csv,
        format!("{text}p, role:billing, service.nonsense, customer.name, read, allow\n"),
    )
    .unwrap();
    let (code, _, err) = pdgate(&h, &["policy", "push", cand, "--as", "security-team"]).await;
    assert_eq!(code, 1, "{err}");
    let line = text.lines().count() + 1;
    assert!(err.contains(&format!("policy.csv:{line}")), "{err}");

    // Explain: exit 1 denied, 0 allowed; stages printed.
    let request = [
        "--caller",
        "marketing-service",
        "--purpose",
        "marketing.email",
        "--action",
        "read",
        "--category",
        "customer.contact.email",
        "--subject",
        "cust-9",
    ];
    let mut args = vec!["policy", "explain"];
    args.extend(request);
    args.extend(["--as", "sre"]);
    let (code, out, err) = pdgate(&h, &args).await;
    assert_eq!(code, 1, "{err}");
    assert!(out.contains("subject_state"), "{out}");
    assert!(out.contains("CONSENT_REQUIRED"), "{out}");
    args.extend(["--consent", "marketing", "--json"]);
    let (code, out, err) = pdgate(&h, &args).await;
    assert_eq!(code, 0, "{err}");
    let explained: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(explained["decision"], "allow");
    assert_eq!(explained["stages"].as_array().unwrap().len(), 5);

    // Rollback by prefix; a malformed version is bad input (2).
    let prefix = &version_a[..12];
    let (code, out, err) =
        pdgate(&h, &["policy", "rollback", prefix, "--as", "security-team"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rolled back to"), "{out}");
    assert!(check(&h, billing_reads_name()).await.allowed);
    let (code, _, _) = pdgate(&h, &["policy", "rollback", "xyz", "--as", "security-team"]).await;
    assert_eq!(code, 2);

    // Shadow and clear.
    std::fs::write(&csv, format!("{text}{DENY_NAMES}\n")).unwrap();
    let (code, out, err) = pdgate(&h, &["policy", "shadow", cand, "--as", "security-team"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("shadow version"), "{out}");
    assert!(check(&h, billing_reads_name()).await.allowed);
    let (code, out, err) = pdgate(
        &h,
        &[
            "policy",
            "shadow",
            "--clear",
            "--json",
            "--as",
            "security-team",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let cleared: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cleared["differences"], 1);

    // Bad input: no such directory, both DIR and --clear.
    let (code, _, _) = pdgate(
        &h,
        &["policy", "push", "/no/such/dir", "--as", "security-team"],
    )
    .await;
    assert_eq!(code, 2);
    let (code, _, _) = pdgate(&h, &["policy", "shadow", cand, "--clear"]).await;
    assert_eq!(code, 2);
    h.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Where an applied policy is kept, and the audit record that comes first

/// `pdgate policy … --json --admin <api> --as <identity>`, parsed.
async fn cli_json(h: &Harness, args: &[&str], identity: &str) -> (i32, serde_json::Value) {
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    all.extend(
        [
            "--json",
            "--admin",
            &h.api_addr.to_string(),
            "--as",
            identity,
        ]
        .map(str::to_owned),
    );
    let out = common::bin::Pdgate::new(all).output_async().await;
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), json)
}

#[tokio::test]
async fn a_read_only_policy_directory_is_applied_in_memory_only_and_push_and_status_say_so() {
    let dir = policy_copy();
    let before = Bundle::read_dir(dir.path(), None).unwrap().version();
    let _read_only = common::ReadOnly::new(dir.path());
    let mut h = Harness::with(Options {
        policy: dir.path().to_path_buf(),
        ..Options::default()
    })
    .await;
    let candidate = policy_copy();
    let csv = candidate.path().join("policy.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, format!("{text}{DENY_NAMES}\n")).unwrap();
    let (code, pushed) = cli_json(
        &h,
        &["policy", "push", &candidate.path().display().to_string()],
        "security-team",
    )
    .await;
    assert_eq!(code, 0, "{pushed}");
    assert_eq!(pushed["changed"], true, "{pushed}");
    let note = pushed["not_persisted"].as_str().unwrap();
    assert!(
        !note.is_empty(),
        "push does not say the policy is in memory only: {pushed}"
    );
    println!("push: note: {note}");
    // Applied: the next decision is made under it.
    let answer = check(&h, billing_reads_name()).await;
    assert!(!answer.allowed);
    assert_eq!(answer.reasons[0].code, "DENIED_BY_RULE");
    assert_eq!(answer.policy_version, pushed["version"].as_str().unwrap());
    // In memory only: the directory still holds the old policy.
    assert_eq!(
        Bundle::read_dir(dir.path(), None).unwrap().version(),
        before
    );
    let (code, status) = cli_json(&h, &["policy", "status"], "sre").await;
    assert_eq!(code, 0, "{status}");
    assert_eq!(status["active"]["version"], pushed["version"], "{status}");
    assert_eq!(
        status["active"]["not_persisted"].as_str().unwrap(),
        note,
        "status says so too: {status}"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_admin_change_whose_audit_record_fails_is_not_made() {
    // The audit log's segment is /dev/full: every record fails to be written.
    let audit = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/full", audit.path().join("segment-00000001.jsonl")).unwrap();
    let dir = policy_copy();
    let before = Bundle::read_dir(dir.path(), None).unwrap().version();
    let mut h = Harness::with(Options {
        policy: dir.path().to_path_buf(),
        audit: Some(pdgate::audit::AuditSettings::new(audit.path())),
        ..Options::default()
    })
    .await;
    let status = policy_admin(&h, "security-team")
        .await
        .apply(apply(with_rows(&[DENY_NAMES]), "CHG-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Not made: the active policy and the directory are the old ones.
    assert_eq!(
        Bundle::read_dir(dir.path(), None).unwrap().version(),
        before
    );
    // (Status is an audited read too, so the state is read from the running core.)
    let active = h
        .gate
        .policies()
        .status()
        .active
        .expect("a policy is active");
    assert_eq!(active.version, before);
    assert_eq!(active.applied_by, "file");
    assert_eq!(h.gate.policies().status().history.len(), 1);
    h.shutdown().await.unwrap();
}
