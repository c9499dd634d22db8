//! The CLI speaks one language across subcommands: one flag and one environment variable per
//! concept (the old spellings still work, with a warning), durations with units, help on every
//! flag, completions and a man page; and a reader that closes stdout early ends the command
//! quietly, with the exit code it had reached.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use clap::CommandFactory;
use common::bin::Pdgate;
use pdgate::audit::{AuditLog, AuditSettings, RecordBody};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const ALLOWED: &[&str] = &[
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
    "--subjects-store",
    "target/cli-tests-no-such-subjects.db",
];

fn denied() -> Vec<&'static str> {
    let mut args = ALLOWED.to_vec();
    args[4] = "marketing.email";
    args
}

/// `pdgate args` with its stdout a pipe whose only reader has already exited, so the first
/// write meets a closed pipe (EPIPE) every time, not only when a race goes one way.
fn into_closed_pipe(args: &[&str]) -> Output {
    let mut reader = Command::new("true")
        .stdin(Stdio::piped())
        .spawn()
        .expect("run `true`");
    let write_end = reader.stdin.take().expect("the pipe's write end");
    assert!(reader.wait().expect("`true` ends").success());
    let out = Pdgate::new(args).stdout(write_end).output();
    assert_quiet(&out);
    out
}

fn assert_quiet(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "pdgate panicked: {stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

#[test]
fn a_closed_stdout_ends_check_quietly_with_the_decisions_exit_code() {
    let out = into_closed_pipe(ALLOWED);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let out = into_closed_pipe(&denied());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let mut json = denied();
    json.push("--json");
    assert_eq!(into_closed_pipe(&json).status.code(), Some(1));
}

#[test]
fn a_closed_stdout_ends_policy_test_and_help_quietly() {
    let out = into_closed_pipe(&["policy", "test", "policy"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = into_closed_pipe(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = into_closed_pipe(&["man"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// A log of `n` records about `cust-1`, more than a pipe holds when printed.
async fn log_of(n: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (log, writer, _) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
    for i in 0..n {
        log.record(RecordBody {
            time_us: 1_764_000_000_000_000 + i * 1_000_000,
            decision_id: format!("d-{i}"),
            caller: "billing-service".into(),
            purpose: "service.billing".into(),
            action: "read".into(),
            categories: vec!["customer.billing".into()],
            subjects: vec!["cust-1".into()],
            decision: "allow".into(),
            ..RecordBody::default()
        })
        .await
        .unwrap();
    }
    drop(log);
    writer.close().await;
    dir
}

/// `pdgate args | head -n 1`, two real processes joined by a pipe.
fn into_head(args: &[&str], dir: &Path) -> (Output, String) {
    let mut head = Command::new("head")
        .args(["-n", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run head");
    let into_head = head.stdin.take().expect("head's stdin");
    let out = Pdgate::new(args)
        .current_dir(dir)
        .stdout(into_head)
        .output();
    assert_quiet(&out);
    // `head` has printed its line and exited by the time pdgate met the closed pipe.
    let head = head.wait_with_output().expect("head ends");
    (out, String::from_utf8(head.stdout).unwrap())
}

#[tokio::test]
async fn audit_query_into_head_ends_quietly_after_the_first_line() {
    let dir = log_of(2_000).await;
    let (out, first) = into_head(&["audit", "query", "--audit", "."], dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(first.lines().count(), 1, "{first}");
    assert!(first.contains("#1 "), "the first record: {first}");
    let (out, first) = into_head(&["audit", "query", "--json", "--audit", "."], dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let record: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
    assert_eq!(record["seq"], 1);
    let (out, _) = into_head(&["audit", "tail", "-n", "2000", "--audit", "."], dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn every_flag_and_subcommand_has_help() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let path = format!("{path} {}", cmd.get_name());
        if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
            missing.push(format!("{path} (the subcommand)"));
        }
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {}", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &path, missing);
        }
    }
    let mut cmd = pdgate::cli::Cli::command();
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, "", &mut missing);
    assert!(missing.is_empty(), "no help: {missing:#?}");
}

#[test]
fn one_spelling_per_concept_across_subcommands() {
    // For each concept, the flag every subcommand that takes it spells the same way.
    let concepts: [(&str, &[&str]); 3] = [
        (
            "--audit",
            &["serve", "audit query", "audit report", "policy diff"],
        ),
        (
            "--subjects-store",
            &["serve", "check", "subjects consent", "policy diff"],
        ),
        ("--since", &["audit query", "audit report", "policy diff"]),
    ];
    let mut root = pdgate::cli::Cli::command();
    root.build();
    for (flag, commands) in concepts {
        for path in commands {
            let mut cmd = &root;
            for name in path.split(' ') {
                cmd = cmd
                    .find_subcommand(name)
                    .unwrap_or_else(|| panic!("no subcommand `{path}`"));
            }
            let long = flag.trim_start_matches("--");
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(long) && !a.is_hide_set())
                .unwrap_or_else(|| panic!("`pdgate {path}` has no visible {flag}"));
            // `policy diff --subjects-store` is a choice (the registry as it is now instead of
            // the recorded state), so no variable makes it silently.
            if flag != "--since" && !(flag == "--subjects-store" && *path == "policy diff") {
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                let want = if flag == "--audit" {
                    "PDGATE_AUDIT"
                } else {
                    "PDGATE_SUBJECTS"
                };
                assert_eq!(env.as_deref(), Some(want), "`pdgate {path} {flag}`");
            }
        }
    }
}

#[test]
fn old_spellings_still_work_and_say_what_to_use() {
    let store = tempfile::tempdir().unwrap();
    let db = store.path().join("subjects.db");
    let db = db.to_str().unwrap();
    let out = Pdgate::new([
        "subjects",
        "consent",
        "cust-9",
        "--purpose",
        "marketing",
        "--actor",
        "alice",
        "--store",
        db,
    ])
    .output();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`--store` is deprecated") && stderr.contains("`--subjects-store`"),
        "{stderr}"
    );
    // The new spelling reads what the old one wrote, without a warning.
    let out = Pdgate::new([
        "subjects",
        "show",
        "cust-9",
        "--json",
        "--subjects-store",
        db,
    ])
    .output();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(state.to_string().contains("marketing"), "{state}");
}

#[tokio::test]
async fn policy_diff_takes_durations_and_the_shared_audit_variable() {
    let dir = log_of(3).await;
    let audit = dir.path().to_str().unwrap();
    let run = |extra: &[&str], env: Option<(&str, &str)>| {
        let mut args = vec!["policy", "diff", "--candidate", "policy", "--json"];
        args.extend_from_slice(extra);
        let mut p = Pdgate::new(args);
        if let Some((k, v)) = env {
            p = p.env(k, v);
        }
        p.output()
    };
    let replayed = |out: &Output| -> u64 {
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        v["replayed"].as_u64().unwrap()
    };
    let out = run(
        &["--since", "2025-11-24T16:00:01Z"],
        Some(("PDGATE_AUDIT", audit)),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(replayed(&out), 2, "records at or after the second one");
    assert!(out.stderr.is_empty(), "{out:?}");
    // A duration back from now: all three records are older than a day.
    let out = run(&["--since", "24h", "--audit", audit], None);
    assert_eq!(replayed(&out), 0, "{out:?}");
    let out = run(&["--since", "24 parsecs", "--audit", audit], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
    // The old spellings: PDGATE_AUDIT_DIR and --since-us.
    let out = run(
        &["--since-us", "1764000001000000"],
        Some(("PDGATE_AUDIT_DIR", audit)),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(replayed(&out), 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`PDGATE_AUDIT_DIR` is deprecated"),
        "{stderr}"
    );
    assert!(stderr.contains("`--since-us` is deprecated"), "{stderr}");
}

#[test]
fn completions_and_man_page_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Pdgate::new(["completions", shell]).output();
        assert_eq!(out.status.code(), Some(0), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("subjects-store"), "{shell}: {script}");
    }
    let out = Pdgate::new(["completions", "tcsh"]).output();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = Pdgate::new(["man"]).output();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH pdgate 1"),
        "{page}"
    );
    for sub in [
        "serve",
        "check",
        "policy",
        "audit",
        "subjects",
        "completions",
    ] {
        assert!(page.contains(sub), "the man page names `{sub}`");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Pdgate::new(["man", "--dir", dir.path().to_str().unwrap()]).output();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for page in ["pdgate.1", "pdgate-audit-query.1", "pdgate-policy-test.1"] {
        assert!(dir.path().join(page).is_file(), "{page} written");
    }
}

#[test]
fn durations_replace_bare_seconds() {
    // --timeout takes a duration; a bare number still means seconds, with a warning.
    let query = |timeout: &str| {
        Pdgate::new([
            "audit",
            "verify",
            "--admin",
            "127.0.0.1:1",
            "--as",
            "x",
            "--timeout",
            timeout,
        ])
        .output()
    };
    let out = query("2s");
    assert_eq!(out.status.code(), Some(1), "unreachable: {out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("deprecated"));
    let out = query("2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("`--timeout 2` is deprecated"));
    let out = query("soon");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
