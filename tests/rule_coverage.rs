//! Every rule of the default policy is exercised by its tests: each `p` row of `policy/policy.csv`
//! is among the `matched_rules` of some case in `policy/tests/` that decides as the row says
//! (an allow row in a case expecting `allow`, a deny row in a case expecting the deny). A row no
//! case reaches is a rule nobody has checked against the privacy policy.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

use pdgate::decision::fixtures::{self, Expected};
use pdgate::decision::{DecisionIds, decide_fresh};
use pdgate::policy::Effect;
use pdgate::subjects::InMemorySubjects;
use std::collections::BTreeSet;
use std::path::Path;

/// Rows no case may reach, and why. Each must still exist and still be unreached, so that the
/// exemption cannot outlive its reason.
const LEFT_UNTESTED: [(&str, &str); 1] = [(
    "p, role:billing, service.billing, customer.name, read, allow",
    "tests/reload.rs, tests/fleet.rs and tests/policy_admin.rs apply a policy that denies it \
     (DENY_NAMES); a reload runs the policy tests, so no case may expect it",
)];

#[tokio::test]
async fn every_policy_row_is_matched_by_a_test_case_that_expects_its_effect() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    let snapshot = match pdgate::policy::load_dir(&dir).await {
        Ok(s) => s,
        Err(problems) => panic!("the default policy does not load: {problems}"),
    };
    let files = fixtures::read_dir(&dir.join("tests")).expect("policy tests are readable");
    let ids = DecisionIds::default();
    let mut covered: BTreeSet<usize> = BTreeSet::new();
    for (_, file) in &files {
        // A case with `extra_rules` runs against another policy, whose lines are not these.
        for case in file.cases.iter().filter(|c| c.extra_rules.is_empty()) {
            // A subject marked unavailable has no state to give; such a case is a deny that
            // matches no row.
            let subjects: InMemorySubjects = case
                .subjects
                .iter()
                .filter(|(_, s)| !s.unavailable)
                .map(|(name, s)| (name.clone(), s.state()))
                .collect();
            let decision = decide_fresh(Some(&snapshot), &case.request, &subjects, ids.next());
            let expected_allow = case.expect.decision == Expected::Allow;
            if decision.allowed != expected_allow {
                // tests/policy_fixtures.rs reports it; a case that fails covers nothing.
                continue;
            }
            covered.extend(decision.matched_rules.iter().map(|r| r.line));
        }
    }
    let rows = &snapshot.rows().grants;
    let text = |row: &pdgate::policy::GrantRow| {
        let effect = match row.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        format!(
            "p, {}, {}, {}, {}, {effect}",
            row.role,
            row.purpose,
            row.category,
            row.action.as_str()
        )
    };
    for (rule, why) in LEFT_UNTESTED {
        let row = rows
            .iter()
            .find(|row| text(row) == rule)
            .unwrap_or_else(|| panic!("`{rule}` is exempted ({why}) but is not in policy.csv"));
        assert!(
            !covered.contains(&row.line),
            "`{rule}` (line {}) is exempted ({why}) but a case reaches it: drop the exemption",
            row.line
        );
    }
    let missing: Vec<String> = rows
        .iter()
        .filter(|row| !covered.contains(&row.line))
        .filter(|row| !LEFT_UNTESTED.iter().any(|(rule, _)| text(row) == *rule))
        .map(|row| format!("  policy.csv line {}: {}", row.line, text(row)))
        .collect();
    println!(
        "policy rule coverage: {} of {} rows matched by a test case ({} left untested on purpose)",
        rows.len() - missing.len() - LEFT_UNTESTED.len(),
        rows.len(),
        LEFT_UNTESTED.len()
    );
    assert!(
        missing.is_empty(),
        "{} of {} policy.csv rows are matched by no policy test case expecting their effect:\n{}",
        missing.len(),
        rows.len(),
        missing.join("\n")
    );
}
