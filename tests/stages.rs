//! DESIGN §2: stages 1–4 are evaluated in full and each reports its own reasons; stage 5 runs
//! only when they all allow. Checked through `explain`, which reports the decision's own path.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

use pdgate::decision::{
    DecisionIds, Explanation, ReasonCode, Request, Stage, StageOutcome, explain,
};
use pdgate::subjects::{InMemorySubjects, SubjectState};
use std::path::Path;

async fn policy() -> pdgate::policy::Snapshot {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    match pdgate::policy::load_dir(&dir).await {
        Ok(s) => s,
        Err(problems) => panic!("the default policy does not load: {problems}"),
    }
}

/// Explains `caller` reading `category` of `cust-1` for `purpose` under the default policy.
async fn explained(
    caller: &str,
    purpose: &str,
    category: &str,
    subjects: &InMemorySubjects,
) -> Explanation {
    let request = Request {
        caller: caller.into(),
        purpose: purpose.into(),
        action: "read".into(),
        categories: vec![category.into()],
        subjects: vec!["cust-1".into()],
        recipient: None,
        minimizable: Vec::new(),
    };
    explain(
        Some(&policy().await),
        &request,
        subjects,
        DecisionIds::default().next(),
    )
}

/// `cust-1` asked for their data to be deleted (§7).
fn asked_for_deletion() -> InMemorySubjects {
    let subjects = InMemorySubjects::new();
    subjects.set(
        "cust-1",
        SubjectState {
            deletion_requested: true,
            ..SubjectState::default()
        },
    );
    subjects
}

fn outcomes(e: &Explanation) -> Vec<(Stage, StageOutcome, Vec<ReasonCode>)> {
    e.stages
        .iter()
        .map(|s| {
            (
                s.stage,
                s.outcome,
                s.reasons.iter().map(|r| r.code).collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_static_stage_reports_its_reasons_and_stage_five_is_skipped() {
    // The subject asked for deletion: a caller that breaks stages 1–4 must not learn it.
    let subjects = asked_for_deletion();
    let e = explained(
        "softbank",
        "research.statistics",
        "communications.call_history",
        &subjects,
    )
    .await;
    use ReasonCode::*;
    assert_eq!(
        outcomes(&e),
        [
            (
                Stage::WellFormed,
                StageOutcome::Deny,
                vec![PurposeNotRegistered, RecipientNotAllowed]
            ),
            (Stage::Grant, StageOutcome::Deny, vec![NoGrant]),
            (
                Stage::Secrecy,
                StageOutcome::Deny,
                vec![SecrecyOfCommunications]
            ),
            (
                Stage::Deidentification,
                StageOutcome::Deny,
                vec![IdentifiedDataForResearch]
            ),
            (Stage::SubjectState, StageOutcome::Skipped, vec![]),
        ]
    );
    assert_eq!(
        e.decision.codes(),
        [
            PurposeNotRegistered,
            RecipientNotAllowed,
            NoGrant,
            SecrecyOfCommunications,
            IdentifiedDataForResearch
        ],
        "the decision lists the reasons in stage order"
    );
}

#[tokio::test]
async fn stage_five_runs_when_stages_one_to_four_allow() {
    let subjects = asked_for_deletion();
    let e = explained(
        "softbank",
        "joint_use.marketing_research",
        "customer.contact.fax",
        &subjects,
    )
    .await;
    let got = outcomes(&e);
    assert!(
        got[..4].iter().all(|(_, o, _)| *o == StageOutcome::Pass),
        "{got:?}"
    );
    assert_eq!(
        got[4],
        (
            Stage::SubjectState,
            StageOutcome::Deny,
            vec![ReasonCode::DeletionRequested]
        )
    );
}

#[tokio::test]
async fn an_unknown_name_ends_the_decision_at_stage_one() {
    let e = explained(
        "softbank",
        "joint_use.nonsense",
        "communications.call_history",
        &InMemorySubjects::new(),
    )
    .await;
    let got = outcomes(&e);
    assert_eq!(
        got[0],
        (
            Stage::WellFormed,
            StageOutcome::Deny,
            vec![ReasonCode::PurposeUnknown]
        )
    );
    assert!(
        got[1..].iter().all(|(_, o, _)| *o == StageOutcome::Skipped),
        "{got:?}"
    );
}
