//! `pdgate policy test`: the policy tests of a directory (the runner is
//! [`crate::decision::fixtures`]), a subset of them (`--run`), their results for a person, a
//! program or a CI server (`--format`), and what they exercise of the policy (coverage, with
//! `--min-coverage` to fail below a floor).

use super::policy_cmd::{missing_dir, report_invalid};
use super::{EXIT_DENIED, EXIT_OK, print_json};
use crate::decision::fixtures::{self, Coverage, Covered, FixtureFile, Report};
use crate::policy;
use clap::{Args, ValueEnum};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Args)]
#[command(
    after_help = "Coverage: each grant or deny row of policy.csv matched by a passing case, \
each clause of taxonomy.toml named by a case (`§2(b)` counts for `§2`), each reason code a \
decision can give expected by a case. With --run, of the cases run.\n\n\
Exit codes: 0 every case passed (and coverage at or above --min-coverage), 1 a case failed, no \
case ran, the coverage is below the floor or the policy is invalid, 2 bad input.\n\n\
Examples:\n  pdgate policy test policy/\n  pdgate policy test policy/ --run 'secrecy|§5'\n  \
pdgate policy test policy/ --format junit > policy-tests.xml\n  \
pdgate policy test policy/ --min-coverage 90"
)]
pub struct PolicyTestArgs {
    /// Policy directory (model.conf, policy.csv, taxonomy.toml).
    #[arg(value_name = "DIR", env = "PDGATE_POLICY", default_value = "policy")]
    dir: PathBuf,
    /// Directory of the test files (default: DIR/tests).
    #[arg(long, value_name = "TESTS")]
    tests: Option<PathBuf>,
    /// Run only the cases whose `FILE/NAME` (file name without .yaml, then the case's name) or
    /// clause matches this regular expression.
    #[arg(long = "run", value_name = "PATTERN", value_parser = parse_pattern)]
    run: Option<regex::Regex>,
    /// `human` (failures, coverage summary and what is not covered), `json` (one object) or
    /// `junit` (XML for CI servers).
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Same as --format json.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// Fail (exit 1) when the rows, the clauses or the reason codes covered are below this
    /// percentage, e.g. 90.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    min_coverage: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Human,
    Json,
    Junit,
}

fn parse_pattern(text: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(text).map_err(|e| format!("not a regular expression: {e}"))
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("`{text}`: a percentage from 0 to 100 is allowed")),
    }
}

/// Runs the policy tests; exit 0 all passed, 1 a case failed, none ran, coverage below the
/// floor or an invalid policy; 2 no such directory.
pub async fn run(args: PolicyTestArgs) -> u8 {
    let format = if args.json { Format::Json } else { args.format };
    let json = format == Format::Json;
    let dir = &args.dir;
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
    let tests_dir = args.tests.clone().unwrap_or_else(|| dir.join("tests"));
    let report = match fixtures::read_dir(&tests_dir) {
        Ok(files) => {
            let files = select(files, args.run.as_ref());
            fixtures::run(&snapshot, &files).await
        }
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
    let coverage = Coverage::of(&snapshot, &report);
    let (rows, clauses, codes) = coverage.percents();
    let below = args
        .min_coverage
        .filter(|floor| rows < *floor || clauses < *floor || codes < *floor);
    let passed = report.passed() && below.is_none();
    match format {
        Format::Json => print_json(&json!({
            "passed": passed,
            "policy_version": snapshot.version().to_string(),
            "files": report.files,
            "cases": report.cases,
            "failures": report.failures.iter().map(|f| json!({
                "file": f.file, "case": f.case, "expected": f.expected, "got": f.got,
            })).collect::<Vec<_>>(),
            "coverage": {
                "rows_percent": rows, "clauses_percent": clauses, "reason_codes_percent": codes,
                "min_coverage": args.min_coverage,
                "rows": coverage.rows, "clauses": coverage.clauses,
                "reason_codes": coverage.reason_codes,
            },
        })),
        Format::Junit => outln!("{}", junit(&report)),
        Format::Human => {
            for failure in &report.failures {
                outln!("FAIL {failure}");
            }
            if report.cases == 0 {
                let filter = args
                    .run
                    .as_ref()
                    .map(|r| format!(" matching `{r}`"))
                    .unwrap_or_default();
                outln!("no policy tests{filter} in {}", tests_dir.display());
            }
            outln!(
                "{} passed, {} failed ({} files, policy {})",
                report.cases - report.failures.len(),
                report.failures.len(),
                report.files,
                snapshot.version().short()
            );
            if report.cases > 0 {
                print_coverage(&coverage);
            }
        }
    }
    if let Some(floor) = below {
        eprintln!(
            "error: coverage below --min-coverage {floor}%: rows {rows:.1}%, clauses {clauses:.1}%, reason codes {codes:.1}%"
        );
    }
    if report.cases == 0 && format != Format::Human {
        eprintln!("error: no policy test ran (a directory without tests is a failure)");
    }
    if passed { EXIT_OK } else { EXIT_DENIED }
}

/// `files` with only the cases `pattern` selects (all without a pattern); files left without
/// a case are dropped.
fn select(
    files: Vec<(PathBuf, FixtureFile)>,
    pattern: Option<&regex::Regex>,
) -> Vec<(PathBuf, FixtureFile)> {
    let Some(pattern) = pattern else {
        return files;
    };
    files
        .into_iter()
        .filter_map(|(path, mut file)| {
            let stem = stem(&path);
            file.cases.retain(|case| {
                pattern.is_match(&format!("{stem}/{}", case.name))
                    || case.clause.as_deref().is_some_and(|c| pattern.is_match(c))
            });
            (!file.cases.is_empty()).then_some((path, file))
        })
        .collect()
}

fn stem(path: &Path) -> String {
    path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

fn print_coverage(coverage: &Coverage) {
    let (rows, clauses, codes) = coverage.percents();
    let count = |items: &[Covered]| (items.iter().filter(|c| c.covered).count(), items.len());
    let line = |kind: &str, items: &[Covered], percent: f64| {
        let (hit, all) = count(items);
        outln!("coverage: {kind} {hit}/{all} ({percent:.1}%)");
        for item in items.iter().filter(|c| !c.covered) {
            outln!("  not covered: {}", item.item);
        }
    };
    line("policy.csv rows", &coverage.rows, rows);
    line("clauses", &coverage.clauses, clauses);
    line("reason codes", &coverage.reason_codes, codes);
}

/// JUnit XML: one test suite per file, one test case per case.
fn junit(report: &Report) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"pdgate policy test\" tests=\"{}\" failures=\"{}\">\n",
        report.cases,
        report.failures.len()
    );
    let mut files: Vec<&str> = report.outcomes.iter().map(|o| o.file.as_str()).collect();
    files.dedup();
    for file in files {
        let cases: Vec<_> = report.outcomes.iter().filter(|o| o.file == file).collect();
        let failed = cases.iter().filter(|o| !o.passed).count();
        xml.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failed}\">\n",
            esc(file),
            cases.len()
        ));
        for case in cases {
            xml.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\"",
                esc(file),
                esc(&case.case)
            ));
            let failure = report
                .failures
                .iter()
                .find(|f| f.file == case.file && f.case == case.case);
            match failure {
                Some(f) => xml.push_str(&format!(
                    ">\n      <failure message=\"expected {}, got {}\"/>\n    </testcase>\n",
                    esc(&f.expected),
                    esc(&f.got)
                )),
                None => xml.push_str("/>\n"),
            }
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>");
    xml
}
