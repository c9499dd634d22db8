//! The `pdgate` binary: exit codes (0 allowed/ok, 1 denied/failed, 2 bad command line), JSON
//! output, and messages that name the flag or file at fault. Never a panic.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use common::policy_dir;
use serde_json::Value;
use std::process::Output;

/// `pdgate args` through the one runner (scrubbed environment, time limit, panic detection).
fn pdgate(args: &[&str]) -> Output {
    Pdgate::new(args)
        // `check` reads the subject registry when no inline state is given: point it at a file
        // that never exists (read as nothing recorded), not at whatever `subjects.db` the
        // working directory holds.
        .env("PDGATE_SUBJECTS", "target/cli-tests-no-such-subjects.db")
        .output()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

const BILLING: &[&str] = &[
    "check",
    "--caller",
    "billing-service",
    "--purpose",
    "service.billing",
    "--action",
    "read",
    "--category",
    "customer.billing",
    "--subject",
    "cust-1",
];

#[test]
fn allowed_check_exits_0_and_explains() {
    let out = pdgate(BILLING);
    assert_eq!(code(&out), 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ALLOW"), "{text}");
    assert!(
        text.contains("policy.csv:"),
        "names the granting rule: {text}"
    );
}

#[test]
fn check_json_has_the_documented_fields() {
    let mut args = BILLING.to_vec();
    args.push("--json");
    let out = pdgate(&args);
    assert_eq!(code(&out), 0);
    let v = json(&out);
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["reasons"], Value::Array(vec![]));
    assert!(v["matched_rules"].as_array().is_some_and(|r| !r.is_empty()));
    assert_eq!(v["policy_version"].as_str().map(str::len), Some(64));
    assert_eq!(v["decision_id"].as_str().map(str::len), Some(36));
}

#[test]
fn denied_check_exits_1_with_reason_and_clause() {
    let out = pdgate(&[
        "check",
        "--caller",
        "marketing-service",
        "--purpose",
        "marketing.email",
        "--action",
        "read",
        "--category",
        "customer.contact.email",
        "--subject",
        "cust-1",
        "--json",
    ]);
    assert_eq!(code(&out), 1);
    let v = json(&out);
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reasons"][0]["code"], "CONSENT_REQUIRED");
    assert_eq!(v["reasons"][0]["clause"], "§1(2)");
    // The same call with the subject's consent to the parent purpose is allowed.
    let out = pdgate(&[
        "check",
        "--caller",
        "marketing-service",
        "--purpose",
        "marketing.email",
        "--action",
        "read",
        "--category",
        "customer.contact.email",
        "--subject",
        "cust-1",
        "--consent",
        "marketing",
    ]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn unknown_names_are_denials_not_input_errors() {
    for (flag, value, reason) in [
        ("--purpose", "mystery", "PURPOSE_UNKNOWN"),
        ("--purpose", "", "PURPOSE_NOT_DECLARED"),
        ("--caller", "eve", "CALLER_UNKNOWN"),
        ("--category", "customer.shoe_size", "CATEGORY_UNKNOWN"),
        ("--action", "peek", "ACTION_UNKNOWN"),
    ] {
        let mut args = BILLING.to_vec();
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
        args.push("--json");
        let out = pdgate(&args);
        assert_eq!(code(&out), 1, "{flag} {value}");
        let v = json(&out);
        assert_eq!(v["decision"], "deny");
        assert!(
            v["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["code"] == reason),
            "{flag} {value}: {v}"
        );
    }
}

#[test]
fn missing_or_malformed_flags_exit_2_naming_the_flag() {
    let out = pdgate(&[
        "check",
        "--caller",
        "billing-service",
        "--action",
        "read",
        "--category",
        "customer.billing",
    ]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--purpose"));

    let out = pdgate(&[
        "check",
        "--caller",
        "billing-service",
        "--purpose",
        "service.billing",
        "--action",
        "read",
    ]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--category"));

    // Subject state without a subject is meaningless.
    let mut args = BILLING[..9].to_vec();
    args.push("--suspend-use");
    let out = pdgate(&args);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--subject"));

    let out = pdgate(&["check", "--bogus"]);
    assert_eq!(code(&out), 2);
    let out = pdgate(&["frobnicate"]);
    assert_eq!(code(&out), 2);
}

#[test]
fn help_exits_0_and_teaches() {
    let out = pdgate(&["check", "--help"]);
    assert_eq!(code(&out), 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--comms-consent") && text.contains("Examples"),
        "{text}"
    );
}

#[test]
fn missing_policy_directory_exits_2_naming_it() {
    let mut args = BILLING.to_vec();
    args.extend(["--policy", "/nonexistent/dir"]);
    let out = pdgate(&args);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir"));
    let out = pdgate(&["policy", "validate", "/nonexistent/dir"]);
    assert_eq!(code(&out), 2);
}

#[test]
fn policy_directory_from_the_environment() {
    let out = Pdgate::new(["policy", "validate", "--json"])
        .env("PDGATE_POLICY", policy_dir())
        .current_dir("/")
        .output();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["valid"], true);
}

#[test]
fn invalid_policy_exits_1_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.conf", "policy.csv", "taxonomy.toml"] {
        std::fs::copy(policy_dir().join(file), dir.path().join(file)).unwrap();
    }
    let csv = dir.path().join("policy.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    let line = text.lines().count() + 1;
    text.push_str("p, role:marketing, marketing, communications.call_history, read, allow\n");
    text.push_str("p, role:billing, service.bill, customer.billing, read, allow\n");
    std::fs::write(&csv, text).unwrap();
    let d = dir.path().to_str().unwrap();

    let out = pdgate(&["policy", "validate", d]);
    assert_eq!(code(&out), 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("policy.csv:{line}:")) && err.contains("§5"),
        "{err}"
    );
    assert!(err.contains(&format!("policy.csv:{}:", line + 1)), "{err}");

    let out = pdgate(&["policy", "validate", d, "--json"]);
    assert_eq!(code(&out), 1);
    let v = json(&out);
    assert_eq!(v["valid"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 2);

    // `check` refuses to decide under an invalid policy.
    let mut args = BILLING.to_vec();
    args.extend(["--policy", d]);
    assert_eq!(code(&pdgate(&args)), 1);
}

#[test]
fn policy_test_passes_on_the_default_policy_and_fails_naming_the_case() {
    let out = pdgate(&["policy", "test"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));

    let tests = tempfile::tempdir().unwrap();
    std::fs::write(
        tests.path().join("wrong.yaml"),
        "cases:\n  - name: billing may not read billing\n    request: { caller: billing-service, purpose: service.billing, action: read, categories: [customer.billing], subjects: [c] }\n    expect: { decision: deny, reasons: [NO_GRANT] }\n",
    )
    .unwrap();
    let out = pdgate(&[
        "policy",
        "test",
        "policy",
        "--tests",
        tests.path().to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 1);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("billing may not read billing"), "{text}");
    assert!(
        text.contains("expected deny [NO_GRANT], got allow"),
        "{text}"
    );
}

#[test]
fn the_demo_runs_and_every_step_goes_as_promised() {
    // The README's first command. Default ports that are taken are replaced by free ones.
    let out = pdgate(&["demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        code(&out),
        0,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("0 not as the policy promises"), "{text}");
    assert!(
        text.contains("CONSENT_REQUIRED") && text.contains("grpcurl"),
        "{text}"
    );
}
