//! `pdgate policy test`: a subset of the cases (`--run`), results as text, JSON or JUnit, the
//! coverage of rows, clauses and reason codes with a floor (`--min-coverage`), no case is a
//! failure; and the JSON Schemas of the policy files, equal to the ones generated from the types.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use pdgate::cli::SchemaKind;
use serde_json::Value;
use std::path::Path;
use std::process::Output;

fn run(args: &[&str]) -> Output {
    let mut all = vec!["policy", "test"];
    all.extend_from_slice(args);
    Pdgate::new(all).output()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// A test directory with one file holding `yaml`.
fn tests_with(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cases.yaml"), yaml).unwrap();
    dir
}

const ONE_PASS_ONE_FAIL: &str = r#"
cases:
  - name: billing reads the bill
    clause: "§1(1)"
    request: { caller: billing-service, purpose: service.billing, action: read,
               categories: [customer.billing], subjects: [cust-1] }
    expect: { decision: allow }
  - name: marketing email said to be allowed without consent <wrong>
    clause: "§1(2)"
    request: { caller: marketing-service, purpose: marketing.email, action: read,
               categories: [customer.contact.email], subjects: [cust-1] }
    expect: { decision: allow }
"#;

#[test]
fn the_default_policy_passes_with_its_coverage_reported() {
    let out = run(&["policy", "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json(&out);
    assert_eq!(v["passed"], true);
    let cov = &v["coverage"];
    // Every clause and reason code a decision can give; every row but the one
    // tests/rule_coverage.rs exempts on purpose.
    assert_eq!(cov["clauses_percent"], 100.0, "{cov}");
    assert_eq!(cov["reason_codes_percent"], 100.0, "{cov}");
    let rows = cov["rows"].as_array().unwrap();
    let missed: Vec<&str> = rows
        .iter()
        .filter(|r| r["covered"] == false)
        .map(|r| r["item"].as_str().unwrap())
        .collect();
    assert_eq!(
        missed,
        ["policy.csv:68: p, role:billing, service.billing, customer.name, read, allow"],
        "{cov}"
    );
    // The floor: 65 of 66 rows is 98.5 %.
    assert_eq!(
        run(&["policy", "--min-coverage", "98"]).status.code(),
        Some(0)
    );
    let out = run(&["policy", "--min-coverage", "99"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--min-coverage"));
    assert_eq!(
        run(&["policy", "--min-coverage", "101"]).status.code(),
        Some(2)
    );
    // Human output names what is not covered.
    let out = run(&["policy"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("coverage: policy.csv rows 65/66"), "{text}");
    assert!(text.contains("not covered: policy.csv:68:"), "{text}");
}

#[test]
fn run_selects_cases_by_file_name_and_clause() {
    let all = json(&run(&["policy", "--json"]))["cases"].as_u64().unwrap();
    let secrecy = json(&run(&["policy", "--json", "--run", "^s5_secrecy/"]));
    let n = secrecy["cases"].as_u64().unwrap();
    assert!(n > 0 && n < all, "{n} of {all}");
    assert_eq!(secrecy["files"], 1);
    // By clause: the §5 cases of every file, at least those of s5_secrecy.yaml.
    let by_clause = json(&run(&["policy", "--json", "--run", "^§5$"]));
    assert!(by_clause["cases"].as_u64().unwrap() >= n);
    // Nothing selected is a failure, not a pass.
    let out = run(&["policy", "--run", "no such case"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no policy tests matching"));
    let out = run(&["policy", "--run", "(unclosed"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_directory_without_cases_fails() {
    let empty = tempfile::tempdir().unwrap();
    let out = run(&["policy", "--tests", empty.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = run(&[
        "policy",
        "--tests",
        empty.path().to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(json(&out)["passed"], false);
}

#[test]
fn junit_names_each_case_and_the_failure() {
    let dir = tests_with(ONE_PASS_ONE_FAIL);
    let out = run(&[
        "policy",
        "--tests",
        dir.path().to_str().unwrap(),
        "--format",
        "junit",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let xml = String::from_utf8(out.stdout).unwrap();
    assert!(xml.starts_with("<?xml"), "{xml}");
    assert!(
        xml.contains("<testsuites name=\"pdgate policy test\" tests=\"2\" failures=\"1\">"),
        "{xml}"
    );
    assert_eq!(xml.matches("<testcase ").count(), 2, "{xml}");
    // The failing case, its name escaped, with what was expected and what came.
    let failing = xml
        .split("<testcase ")
        .find(|c| c.contains("&lt;wrong&gt;"))
        .expect("the failing case, escaped");
    assert!(
        failing.contains("<failure message=\"expected allow, got deny [CONSENT_REQUIRED]\""),
        "{xml}"
    );
    let passing = xml
        .split("<testcase ")
        .find(|c| c.contains("billing reads the bill"))
        .unwrap();
    assert!(passing.starts_with("classname=\"cases.yaml\""), "{passing}");
    assert!(
        !passing
            .split("</testsuite>")
            .next()
            .unwrap()
            .contains("<failure")
    );
}

#[test]
fn the_schemas_in_the_repository_are_the_generated_ones() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    for kind in SchemaKind::ALL {
        let path = dir.join(kind.file_name());
        let stored =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            stored,
            kind.schema_text(),
            "{} is stale: regenerate it with `pdgate policy schema {kind:?}` (lowercase)",
            path.display()
        );
    }
    // The command prints the same text.
    let out = Pdgate::new(["policy", "schema", "routes"]).output();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        SchemaKind::Routes.schema_text()
    );
    // What the schema says matches what the reader accepts: a test file's keys.
    let tests: Value = serde_json::from_str(&SchemaKind::Tests.schema_text()).unwrap();
    let case = &tests["$defs"]["Case"];
    assert_eq!(case["additionalProperties"], false);
    let mut keys: Vec<&str> = case["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "clause",
            "expect",
            "extra_rules",
            "name",
            "request",
            "subjects"
        ]
    );
    let taxonomy: Value = serde_json::from_str(&SchemaKind::Taxonomy.schema_text()).unwrap();
    let purpose = &taxonomy["$defs"]["PurposeEntry"]["properties"];
    assert_eq!(purpose["id"]["type"], "string", "{purpose}");
}
