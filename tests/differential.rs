//! The compiled grant index against plain casbin: for every caller, purpose, category and
//! action of a policy, `Snapshot::matching_rows(..).allowed()` must equal casbin's `enforce`
//! with the same model and rows. Run on the default policy and on random policies with random
//! trees, role inheritance and deny rows.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

use pdgate::policy::synthetic::{Shape, random_policy};
use pdgate::policy::{self, Action, Snapshot, compile, reference};
use std::path::Path;

/// Compares the index with casbin on every combination; returns how many were compared.
async fn compare_all(snapshot: &Snapshot) -> usize {
    let enforcer = reference::enforcer(snapshot)
        .await
        .expect("casbin enforcer");
    let purposes = snapshot.purposes();
    let categories = snapshot.categories();
    let mut compared = 0;
    let mut allowed = 0;
    for caller in snapshot.callers() {
        for p in 0..purposes.len() as u32 {
            for c in 0..categories.len() as u32 {
                for action in Action::ALL {
                    let ours = snapshot.matching_rows(caller, p, c, action).allowed();
                    let theirs = reference::enforce(
                        &enforcer,
                        &caller.name,
                        purposes.name(p),
                        categories.name(c),
                        action.as_str(),
                    )
                    .expect("casbin enforce");
                    assert_eq!(
                        ours,
                        theirs,
                        "index and casbin disagree on ({}, {}, {}, {}) in {}",
                        caller.name,
                        purposes.name(p),
                        categories.name(c),
                        action.as_str(),
                        snapshot.source().origin.display()
                    );
                    compared += 1;
                    allowed += usize::from(ours);
                }
            }
        }
    }
    // A comparison where everything is denied would prove little.
    assert!(allowed > 0, "no combination was allowed");
    assert!(allowed < compared, "every combination was allowed");
    compared
}

#[tokio::test]
async fn default_policy_index_equals_casbin() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    let snapshot = policy::load_dir(&dir).await.expect("default policy loads");
    let compared = compare_all(&snapshot).await;
    assert_eq!(
        compared,
        snapshot.callers().len() * snapshot.purposes().len() * snapshot.categories().len() * 3
    );
}

#[tokio::test]
async fn random_policies_index_equals_casbin() {
    for seed in 0..12 {
        let shape = Shape {
            purposes: 10,
            categories: 12,
            roles: 8,
            callers: 10,
            rows: 150,
            deny_percent: 15,
        };
        let source = random_policy(seed, shape);
        let snapshot = compile(source)
            .await
            .unwrap_or_else(|p| panic!("random policy {seed} does not load: {p}"));
        compare_all(&snapshot).await;
    }
}

#[tokio::test]
async fn scaled_default_policy_index_equals_casbin_on_default_callers() {
    // The generated rows must not change what the default callers may do.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    let base = policy::load_dir(&dir).await.expect("default policy loads");
    let scaled = compile(pdgate::policy::synthetic::scaled_default(
        base.source(),
        2_000,
        7,
    ))
    .await
    .expect("scaled policy loads");
    assert!(scaled.rule_count() >= base.rule_count() + 2_000);
    let enforcer = reference::enforcer(&scaled).await.expect("casbin enforcer");
    for caller in base.callers() {
        let scaled_caller = scaled.caller(&caller.name).expect("same callers");
        for p in 0..base.purposes().len() as u32 {
            for c in 0..base.categories().len() as u32 {
                let before = base.matching_rows(caller, p, c, Action::Read).allowed();
                let after = scaled
                    .matching_rows(scaled_caller, p, c, Action::Read)
                    .allowed();
                let casbin = reference::enforce(
                    &enforcer,
                    &caller.name,
                    base.purposes().name(p),
                    base.categories().name(c),
                    "read",
                )
                .expect("casbin enforce");
                assert_eq!(before, after);
                assert_eq!(after, casbin);
            }
        }
    }
}
