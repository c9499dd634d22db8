//! `pdgate subjects` on the embedded store and on PostgreSQL, and `pdgate check --subject`
//! reading the registry: exit codes (0 ok/allowed, 1 denied or store failure, 2 bad input),
//! JSON output, and a registry that cannot be read denying, never allowing.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use common::pg::TestSchema;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Runs pdgate in `dir` through the one runner (no registry or policy settings from the
/// environment), with the repository's policy.
fn pdgate_in(dir: &Path, args: &[&str]) -> Output {
    Pdgate::new(args)
        .env("PDGATE_POLICY", common::policy_dir())
        .current_dir(dir)
        .output()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// A temporary directory with the store path in it.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("subjects.db")
    }

    /// `pdgate ARGS --store STORE`, expecting `expected` as exit code.
    fn run(&self, args: &[&str], expected: i32) -> Output {
        let store = self.store();
        let mut all = args.to_vec();
        all.extend(["--store", store.to_str().unwrap()]);
        let out = pdgate_in(self.dir.path(), &all);
        assert_eq!(
            code(&out),
            expected,
            "pdgate {all:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        out
    }
}

const MARKETING_EMAIL: &[&str] = &[
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
];

fn codes(decision: &Value) -> Vec<String> {
    decision["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn subjects_commands_record_show_and_history() {
    let d = Dir::new();
    assert!(!d.store().exists());
    let out = d.run(
        &[
            "subjects",
            "consent",
            "cust-1",
            "--purpose",
            "marketing",
            "--actor",
            "alice",
            "--source",
            "REQ-123",
            "--json",
        ],
        0,
    );
    assert!(d.store().exists(), "the first change creates the file");
    let v = json(&out);
    assert_eq!(v["version"], 1);
    assert_eq!(v["state"]["consent"], serde_json::json!(["marketing"]));

    d.run(
        &[
            "subjects",
            "consent",
            "cust-1",
            "--purpose",
            "marketing.email",
            "--comms",
            "--actor",
            "alice",
        ],
        0,
    );
    d.run(
        &[
            "subjects",
            "suspend",
            "cust-1",
            "--provision",
            "--actor",
            "bob",
        ],
        0,
    );
    d.run(
        &["subjects", "suspend", "cust-1", "--use", "--actor", "bob"],
        0,
    );
    d.run(
        &["subjects", "resume", "cust-1", "--use", "--actor", "bob"],
        0,
    );
    let out = d.run(
        &[
            "subjects", "delete", "cust-1", "--actor", "bob", "--source", "REQ-9",
        ],
        0,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deletion request"));

    let v = json(&d.run(&["subjects", "show", "cust-1", "--json"], 0));
    assert_eq!(v["recorded"], true);
    assert_eq!(v["version"], 6);
    assert_eq!(v["state"]["consent"], serde_json::json!(["marketing"]));
    assert_eq!(
        v["state"]["comms_consent"],
        serde_json::json!(["marketing.email"])
    );
    assert_eq!(v["state"]["use_suspended"], false);
    assert_eq!(v["state"]["provision_suspended"], true);
    assert_eq!(v["deletion_requested"], true);

    let v = json(&d.run(&["subjects", "history", "cust-1", "--json"], 0));
    let events = v["events"].as_array().unwrap();
    let changes: Vec<&str> = events
        .iter()
        .map(|e| e["change"].as_str().unwrap())
        .collect();
    assert_eq!(
        changes,
        [
            "consent",
            "consent",
            "suspend_provision",
            "suspend_use",
            "resume_use",
            "request_deletion"
        ]
    );
    assert_eq!(events[0]["actor"], "alice");
    assert_eq!(events[0]["source"], "REQ-123");
    assert_eq!(events[1]["communications"], true);
    assert_eq!(events[5]["source"], "REQ-9");
    assert!(
        events
            .iter()
            .all(|e| e["at"].as_str().is_some_and(|t| t.ends_with('Z')))
    );

    // Human output names the state and each change.
    let text =
        String::from_utf8_lossy(&d.run(&["subjects", "history", "cust-1"], 0).stdout).into_owned();
    assert!(
        text.contains("6 changes") && text.contains("REQ-123"),
        "{text}"
    );

    // A subject never changed is not an error.
    let v = json(&d.run(&["subjects", "show", "cust-2", "--json"], 0));
    assert_eq!(v["recorded"], false);
    assert_eq!(v["version"], 0);
}

#[test]
fn withdrawal_says_what_still_covers_the_purpose() {
    let d = Dir::new();
    d.run(
        &[
            "subjects",
            "consent",
            "cust-1",
            "--purpose",
            "marketing",
            "--actor",
            "a",
        ],
        0,
    );
    let out = d.run(
        &[
            "subjects",
            "withdraw",
            "cust-1",
            "--purpose",
            "marketing.email",
            "--actor",
            "a",
        ],
        0,
    );
    assert!(
        stderr(&out).contains("`marketing` still covers"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_exits_2_naming_the_field_and_creates_nothing() {
    let d = Dir::new();
    for (args, named) in [
        (
            vec!["subjects", "consent", "cust-1", "--purpose", "marketing"],
            "--actor",
        ),
        (
            vec!["subjects", "consent", "cust-1", "--actor", "a"],
            "--purpose",
        ),
        (
            vec![
                "subjects",
                "consent",
                "cust 1",
                "--purpose",
                "marketing",
                "--actor",
                "a",
            ],
            "subject",
        ),
        (
            vec![
                "subjects",
                "consent",
                "cust-1,cust-2",
                "--purpose",
                "marketing",
                "--actor",
                "a",
            ],
            "comma",
        ),
        (
            vec![
                "subjects",
                "consent",
                "cust-1",
                "--purpose",
                "",
                "--actor",
                "a",
            ],
            "purpose",
        ),
        (
            vec![
                "subjects",
                "withdraw",
                "cust-1",
                "--purpose",
                "m",
                "--actor",
                " ",
            ],
            "actor",
        ),
        (
            vec!["subjects", "suspend", "cust-1", "--actor", "a"],
            "--use",
        ),
        (
            vec![
                "subjects",
                "resume",
                "cust-1",
                "--use",
                "--provision",
                "--actor",
                "a",
            ],
            "--provision",
        ),
        (vec!["subjects", "show", ""], "subject"),
        (vec!["subjects", "frobnicate"], "frobnicate"),
    ] {
        let out = d.run(&args, 2);
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
    }
    assert!(!d.store().exists(), "bad input never creates the store");
}

#[test]
fn unreadable_store_exits_1() {
    let d = Dir::new();
    let file = d.dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let store = file.join("subjects.db");
    for args in [
        vec![
            "subjects",
            "consent",
            "cust-1",
            "--purpose",
            "marketing",
            "--actor",
            "a",
        ],
        vec!["subjects", "show", "cust-1"],
        vec!["subjects", "history", "cust-1"],
    ] {
        let mut all = args.clone();
        all.extend(["--store", store.to_str().unwrap()]);
        let out = pdgate_in(d.dir.path(), &all);
        assert_eq!(code(&out), 1, "{all:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("plain-file"),
            "names the store: {}",
            stderr(&out)
        );
    }
    // A database that refuses connections, and a URL that is not PostgreSQL's.
    let out = pdgate_in(
        d.dir.path(),
        &[
            "subjects",
            "show",
            "cust-1",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/test",
        ],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let out = pdgate_in(
        d.dir.path(),
        &[
            "subjects",
            "show",
            "cust-1",
            "--database-url",
            "mysql://127.0.0.1/test",
        ],
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn reading_a_missing_store_creates_nothing() {
    let d = Dir::new();
    let out = d.run(&["subjects", "show", "cust-1"], 0);
    assert!(
        stderr(&out).contains("no subject registry"),
        "{}",
        stderr(&out)
    );
    d.run(&["subjects", "history", "cust-1"], 0);
    let v = json(&d.run(MARKETING_EMAIL, 1));
    assert_eq!(
        codes(&v),
        ["CONSENT_REQUIRED"],
        "nothing recorded: no consent"
    );
    assert!(!d.store().exists());
}

#[test]
fn check_reads_the_subjects_state_from_the_registry() {
    let d = Dir::new();
    let v = json(&d.run(MARKETING_EMAIL, 1));
    assert_eq!(codes(&v), ["CONSENT_REQUIRED"]);

    // Consent to the parent purpose, recorded: allowed.
    d.run(
        &[
            "subjects",
            "consent",
            "cust-1",
            "--purpose",
            "marketing",
            "--actor",
            "alice",
        ],
        0,
    );
    let v = json(&d.run(MARKETING_EMAIL, 0));
    assert_eq!(v["decision"], "allow");

    // Suspended use: denied for it, though the consent stands.
    d.run(
        &["subjects", "suspend", "cust-1", "--use", "--actor", "alice"],
        0,
    );
    let v = json(&d.run(MARKETING_EMAIL, 1));
    assert_eq!(codes(&v), ["USE_SUSPENDED"]);
    d.run(
        &["subjects", "resume", "cust-1", "--use", "--actor", "alice"],
        0,
    );

    // Withdrawn: denied again.
    d.run(
        &[
            "subjects",
            "withdraw",
            "cust-1",
            "--purpose",
            "marketing",
            "--actor",
            "alice",
        ],
        0,
    );
    let v = json(&d.run(MARKETING_EMAIL, 1));
    assert_eq!(codes(&v), ["CONSENT_REQUIRED"]);

    // Inline state flags replace the registry for the check.
    let mut inline = MARKETING_EMAIL.to_vec();
    inline.extend(["--consent", "marketing"]);
    d.run(&inline, 0);

    // A consent to a purpose the policy does not have is recorded, never matches, and `check`
    // says so.
    d.run(
        &[
            "subjects",
            "consent",
            "cust-1",
            "--purpose",
            "mktg",
            "--actor",
            "alice",
        ],
        0,
    );
    let out = d.run(MARKETING_EMAIL, 1);
    assert!(
        stderr(&out).contains("`mktg`, which is not a purpose"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_with_an_unreadable_store_denies_subject_state_unavailable() {
    let d = Dir::new();
    let file = d.dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let store = file.join("subjects.db");
    let mut args = MARKETING_EMAIL.to_vec();
    args.extend(["--store", store.to_str().unwrap()]);
    let out = pdgate_in(d.dir.path(), &args);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["decision"], "deny");
    assert_eq!(codes(&v), ["SUBJECT_STATE_UNAVAILABLE"]);
    assert!(
        stderr(&out).contains("could not be read"),
        "{}",
        stderr(&out)
    );

    // The same through an unreachable PostgreSQL.
    let mut args = MARKETING_EMAIL.to_vec();
    args.extend(["--database-url", "postgres://postgres@127.0.0.1:1/test"]);
    let v = json(&pdgate_in(d.dir.path(), &args));
    assert_eq!(codes(&v), ["SUBJECT_STATE_UNAVAILABLE"]);

    // A decision that needs no subject state is unaffected by the store.
    let args = [
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
        "--store",
        store.to_str().unwrap(),
    ];
    assert_eq!(code(&pdgate_in(d.dir.path(), &args)), 0);

    // Inline flags do not read the store at all.
    let mut args = MARKETING_EMAIL.to_vec();
    args.extend(["--store", store.to_str().unwrap(), "--consent", "marketing"]);
    assert_eq!(code(&pdgate_in(d.dir.path(), &args)), 0);
}

#[test]
fn store_path_from_the_environment() {
    let d = Dir::new();
    let store = d.dir.path().join("elsewhere.db");
    let out = Pdgate::new([
        "subjects",
        "consent",
        "cust-1",
        "--purpose",
        "marketing",
        "--actor",
        "a",
    ])
    .env("PDGATE_SUBJECTS", &store)
    .current_dir(d.dir.path())
    .output();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(store.exists());
    assert!(!d.store().exists(), "not the default `subjects.db`");
}

/// The CLI on PostgreSQL, in a schema of its own (named in the URL's `options`).
#[tokio::test]
async fn subjects_and_check_on_postgres() {
    let schema = TestSchema::create().await;
    let db = schema.url();
    let dir = tempfile::tempdir().unwrap();
    let outcome = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || {
            let run = |args: &[&str]| {
                let mut all = args.to_vec();
                all.extend(["--database-url", db.as_str()]);
                pdgate_in(&dir, &all)
            };
            let out = run(&[
                "subjects",
                "consent",
                "cust-1",
                "--purpose",
                "marketing",
                "--actor",
                "alice",
                "--source",
                "REQ-1",
            ]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            assert_eq!(code(&run(MARKETING_EMAIL)), 0, "check reads PostgreSQL");
            let out = run(&[
                "subjects",
                "withdraw",
                "cust-1",
                "--purpose",
                "marketing",
                "--actor",
                "alice",
            ]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            let v = json(&run(MARKETING_EMAIL));
            assert_eq!(codes(&v), ["CONSENT_REQUIRED"]);
            let v = json(&run(&["subjects", "history", "cust-1", "--json"]));
            assert_eq!(v["events"].as_array().unwrap().len(), 2);
            assert!(
                !dir.join("subjects.db").exists(),
                "no SQLite file on the side"
            );
        }
    })
    .await;
    schema.remove().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
