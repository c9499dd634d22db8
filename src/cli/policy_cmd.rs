//! `pdgate policy validate` and `pdgate policy test`.

use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, print_json};
use crate::policy::{self, Problems, fixtures};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

/// Validates `dir`; exit 0 valid, 1 invalid (every problem listed), 2 no such directory.
pub async fn validate(dir: &Path, json: bool) -> u8 {
    if !dir.is_dir() {
        return missing_dir(dir, json);
    }
    match policy::load_dir(dir).await {
        Ok(snapshot) => {
            if json {
                print_json(&json!({
                    "valid": true,
                    "policy": dir.display().to_string(),
                    "policy_version": snapshot.version().to_string(),
                    "rules": snapshot.rule_count(),
                    "purposes": snapshot.purposes().len(),
                    "categories": snapshot.categories().len(),
                    "callers": snapshot.callers().len(),
                    "problems": [],
                }));
            } else {
                println!(
                    "{}: valid (policy {}; {} rules, {} purposes, {} categories, {} callers)",
                    dir.display(),
                    snapshot.version().short(),
                    snapshot.rule_count(),
                    snapshot.purposes().len(),
                    snapshot.categories().len(),
                    snapshot.callers().len()
                );
            }
            EXIT_OK
        }
        Err(problems) => {
            report_invalid(dir, &problems, json);
            EXIT_DENIED
        }
    }
}

/// Runs the policy tests; exit 0 all passed, 1 a case failed or the policy is invalid.
pub async fn test(dir: &Path, tests: Option<&Path>, json: bool) -> u8 {
    if !dir.is_dir() {
        return missing_dir(dir, json);
    }
    let snapshot = match policy::load_dir(dir).await {
        Ok(s) => Arc::new(s),
        Err(problems) => {
            report_invalid(dir, &problems, json);
            return EXIT_DENIED;
        }
    };
    let tests_dir = tests.map_or_else(|| dir.join("tests"), Path::to_path_buf);
    let report = match fixtures::read_dir(&tests_dir) {
        Ok(files) => fixtures::run(&snapshot, &files).await,
        Err(e) => Err(e),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            if json {
                print_json(&json!({ "passed": false, "error": e.to_string() }));
            } else {
                eprintln!("error: {e}");
            }
            return EXIT_DENIED;
        }
    };
    if json {
        print_json(&json!({
            "passed": report.passed(),
            "policy_version": snapshot.version().to_string(),
            "files": report.files,
            "cases": report.cases,
            "failures": report.failures.iter().map(|f| json!({
                "file": f.file, "case": f.case, "expected": f.expected, "got": f.got,
            })).collect::<Vec<_>>(),
        }));
    } else {
        for failure in &report.failures {
            println!("FAIL {failure}");
        }
        if report.cases == 0 {
            println!("no policy tests found in {}", tests_dir.display());
        }
        println!(
            "{} passed, {} failed ({} files, policy {})",
            report.cases - report.failures.len(),
            report.failures.len(),
            report.files,
            snapshot.version().short()
        );
    }
    if report.passed() {
        EXIT_OK
    } else {
        EXIT_DENIED
    }
}

fn missing_dir(dir: &Path, json: bool) -> u8 {
    let message = format!(
        "policy directory `{}` does not exist (give DIR, or set PDGATE_POLICY)",
        dir.display()
    );
    if json {
        print_json(&json!({ "valid": false, "error": message }));
    } else {
        eprintln!("error: {message}");
    }
    EXIT_USAGE
}

pub(super) fn report_invalid(dir: &Path, problems: &Problems, json: bool) {
    if json {
        print_json(&json!({
            "valid": false,
            "policy": dir.display().to_string(),
            "problems": problems.0.iter().map(|p| json!({
                "file": p.file, "line": p.line, "message": p.message,
            })).collect::<Vec<_>>(),
        }));
    } else {
        eprintln!("{}: invalid policy, {problems}", dir.display());
    }
}
