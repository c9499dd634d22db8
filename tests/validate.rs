//! Policy validation: every problem reported at once, each with its file, line and what is
//! wrong; a grant beyond the secrecy of communications is refused.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

use pdgate::policy::{Problem, load_dir};
use std::path::{Path, PathBuf};

/// A copy of the default policy in a temporary directory, for editing.
struct PolicyCopy {
    dir: tempfile::TempDir,
}

impl PolicyCopy {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
        for file in ["model.conf", "policy.csv", "taxonomy.toml"] {
            std::fs::copy(src.join(file), dir.path().join(file)).expect("copy policy file");
        }
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn append(&self, file: &str, text: &str) -> usize {
        let path = self.dir.path().join(file);
        let mut content = std::fs::read_to_string(&path).expect("read");
        let line = content.lines().count() + 1;
        content.push_str(text);
        std::fs::write(&path, content).expect("write");
        line
    }

    fn replace(&self, file: &str, from: &str, to: &str) {
        let path = self.dir.path().join(file);
        let content = std::fs::read_to_string(&path).expect("read");
        assert!(content.contains(from), "`{from}` not in {file}");
        std::fs::write(&path, content.replacen(from, to, 1)).expect("write");
    }

    async fn problems(&self) -> Vec<Problem> {
        match load_dir(&self.path()).await {
            Ok(_) => Vec::new(),
            Err(p) => p.0,
        }
    }
}

fn has(problems: &[Problem], file: &str, line: Option<usize>, needle: &str) -> bool {
    problems
        .iter()
        .any(|p| p.file == file && (line.is_none() || p.line == line) && p.message.contains(needle))
}

#[tokio::test]
async fn default_policy_is_valid() {
    let copy = PolicyCopy::new();
    assert_eq!(copy.problems().await, Vec::new());
}

#[tokio::test]
async fn every_problem_is_reported_at_once_with_its_line() {
    let copy = PolicyCopy::new();
    let first = copy.append(
        "policy.csv",
        "p, role:billing, service.biling, customer.billing, read, allow\n\
         p, role:billing, service.billing, customer.bill, read, allow\n\
         p, role:billing, service.billing, customer.billing, peek, allow\n\
         p, role:billing, service.billing, customer.billing, read, maybe\n\
         p, role:billing, service.billing\n\
         x, what\n\
         p, role:nobody, service.billing, customer.billing, read, allow\n\
         p, billing-service, service.billing, customer.billing, read, allow\n",
    );
    let problems = copy.problems().await;
    let f = "policy.csv";
    assert!(
        has(
            &problems,
            f,
            Some(first),
            "unknown purpose `service.biling` (did you mean `service.billing`?)"
        ),
        "{problems:#?}"
    );
    assert!(has(
        &problems,
        f,
        Some(first + 1),
        "unknown category `customer.bill`"
    ));
    assert!(has(&problems, f, Some(first + 2), "unknown action `peek`"));
    assert!(has(&problems, f, Some(first + 3), "unknown effect `maybe`"));
    assert!(has(&problems, f, Some(first + 4), "has 6 fields"));
    assert!(has(&problems, f, Some(first + 5), "unknown row type `x`"));
    assert!(has(
        &problems,
        f,
        Some(first + 6),
        "role `role:nobody` is held by no caller"
    ));
    assert!(has(
        &problems,
        f,
        Some(first + 7),
        "is a caller, not a role"
    ));
    assert_eq!(problems.len(), 8, "{problems:#?}");
}

#[tokio::test]
async fn a_cycle_in_the_purpose_tree_is_refused() {
    let copy = PolicyCopy::new();
    copy.append("policy.csv", "g2, service, service.billing\n");
    let problems = copy.problems().await;
    assert!(
        problems
            .iter()
            .any(|p| p.message.contains("cycle in the purpose tree")),
        "{problems:#?}"
    );
}

#[tokio::test]
async fn a_second_parent_and_a_cycle_in_roles_are_refused() {
    let copy = PolicyCopy::new();
    let line = copy.append(
        "policy.csv",
        "g3, customer.contact.email, communications\n\
         g, role:billing, role:support\n\
         g, role:support, role:billing\n",
    );
    let problems = copy.problems().await;
    assert!(
        has(
            &problems,
            "policy.csv",
            Some(line),
            "already has parent `customer.contact`"
        ),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.message.contains("cycle in the role hierarchy")),
        "{problems:#?}"
    );
}

#[tokio::test]
async fn communications_for_marketing_research_joint_use_or_third_parties_is_refused() {
    let copy = PolicyCopy::new();
    let line = copy.append(
        "policy.csv",
        "p, role:marketing, marketing, communications.call_history, read, allow\n\
         p, role:analytics, research.statistics, communications, read, allow\n\
         p, role:joint_user, joint_use.marketing_research, communications.history, read, allow\n\
         p, role:provisioning, third_party.interconnect, communications.caller_info, read, allow\n\
         p, role:interconnect_partner, third_party.interconnect, communications, read, allow\n",
    );
    let problems = copy.problems().await;
    for (offset, purpose) in [
        (0, "marketing"),
        (1, "research.statistics"),
        (2, "joint_use.marketing_research"),
        (3, "third_party.interconnect"),
    ] {
        assert!(
            has(
                &problems,
                "policy.csv",
                Some(line + offset),
                &format!(
                    "for purpose `{purpose}`, which the secrecy of communications never allows (§5)"
                )
            ),
            "{purpose}: {problems:#?}"
        );
    }
    // The partner row breaks the limit twice: the purpose, and the recipient.
    assert!(has(
        &problems,
        "policy.csv",
        Some(line + 4),
        "never provided to joint users or third parties (§5)"
    ));
    assert!(has(
        &problems,
        "policy.csv",
        Some(line + 2),
        "held by joint_user"
    ));
}

#[tokio::test]
async fn a_grant_on_a_parent_category_that_covers_communications_is_refused() {
    // A new root above both trees would hand communications data to marketing.
    let copy = PolicyCopy::new();
    copy.append(
        "taxonomy.toml",
        "\n[[category]]\nid = \"everything\"\nclause = \"§1\"\n",
    );
    let line = copy.append(
        "policy.csv",
        "g3, customer, everything\ng3, communications, everything\np, role:marketing, marketing, everything, read, allow\n",
    );
    let problems = copy.problems().await;
    assert!(
        has(
            &problems,
            "policy.csv",
            Some(line + 2),
            "grants communications data"
        ),
        "{problems:#?}"
    );
}

#[tokio::test]
async fn taxonomy_problems_name_their_line() {
    let copy = PolicyCopy::new();
    copy.replace(
        "taxonomy.toml",
        "purposes = [\"service.billing\"]",
        "purposes = [\"service.bill\"]",
    );
    copy.replace(
        "taxonomy.toml",
        "never_purposes = [\"marketing\",",
        "never_purposes = [\"marketting\",",
    );
    let dup = copy.append(
        "taxonomy.toml",
        "\n[[purpose]]\nid = \"service\"\nclause = \"§1(1)\"\n",
    );
    let problems = copy.problems().await;
    let text = std::fs::read_to_string(copy.path().join("taxonomy.toml")).unwrap();
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    assert!(
        has(
            &problems,
            "taxonomy.toml",
            Some(line_of("\"service.bill\"")),
            "unknown purpose `service.bill`"
        ),
        "{problems:#?}"
    );
    assert!(has(
        &problems,
        "taxonomy.toml",
        Some(line_of("marketting")),
        "unknown purpose `marketting`"
    ));
    assert!(has(
        &problems,
        "taxonomy.toml",
        Some(dup + 2),
        "purpose `service` is declared twice"
    ));
}

#[tokio::test]
async fn taxonomy_syntax_and_unknown_keys_are_reported_with_a_line() {
    let copy = PolicyCopy::new();
    copy.replace(
        "taxonomy.toml",
        "clause = \"§1(2)\"\nconsent = true",
        "clause = \"§1(2)\"\nconsnet = true",
    );
    let problems = copy.problems().await;
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].file, "taxonomy.toml");
    assert!(problems[0].line.is_some());
    assert!(problems[0].message.contains("consnet"), "{problems:#?}");
}

#[tokio::test]
async fn a_different_casbin_matcher_is_refused() {
    let copy = PolicyCopy::new();
    copy.replace("model.conf", "r.act == p.act && ", "");
    let problems = copy.problems().await;
    assert!(
        has(&problems, "model.conf", None, "the matcher differs"),
        "{problems:#?}"
    );
    // Reordering the terms is fine.
    let copy = PolicyCopy::new();
    copy.replace(
        "model.conf",
        "m = r.act == p.act && g(r.sub, p.sub)",
        "m = g(r.sub, p.sub) && r.act == p.act",
    );
    assert_eq!(copy.problems().await, Vec::new());
}

#[tokio::test]
async fn a_missing_directory_or_file_is_named() {
    let problems = load_dir(Path::new("/nonexistent/policy"))
        .await
        .unwrap_err()
        .0;
    assert!(problems[0].file.contains("/nonexistent/policy"));
    let copy = PolicyCopy::new();
    std::fs::remove_file(copy.path().join("policy.csv")).unwrap();
    let problems = copy.problems().await;
    assert!(problems[0].file.ends_with("policy.csv"), "{problems:#?}");
    assert!(problems[0].message.contains("cannot be read"));
}

#[tokio::test]
async fn the_version_is_the_content_hash() {
    let a = PolicyCopy::new();
    let b = PolicyCopy::new();
    let va = load_dir(&a.path()).await.unwrap().version();
    assert_eq!(va, load_dir(&b.path()).await.unwrap().version());
    b.append(
        "policy.csv",
        "# a comment changes the text, and so the version\n",
    );
    assert_ne!(va, load_dir(&b.path()).await.unwrap().version());
}
