//! Property: over random requests, random subject-state changes and random policy swaps, the
//! cached decision always equals a fresh, uncached decision under the current policy version.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

use pdgate::decision::{CacheSettings, Decider, Decision, DecisionId, Request, decide_fresh};
use pdgate::policy::{self, Snapshot, compile};
use pdgate::subjects::{InMemorySubjects, SubjectState};
use proptest::prelude::*;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Three policies that decide many of the generated requests differently: the default, the
/// default with broad deny rows (flips cached allows to denies), and the default with extra
/// grants (flips cached denies to allows).
fn policies() -> &'static [Arc<Snapshot>] {
    static POLICIES: OnceLock<Vec<Arc<Snapshot>>> = OnceLock::new();
    POLICIES.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
            let base = policy::load_dir(&dir).await.expect("default policy");
            let mut denying = base.source().clone();
            for row in [
                "p, role:billing, service, customer, read, deny",
                "p, role:marketing, marketing, customer.contact, read, deny",
                "p, role:privacy_office, subject_request, customer, read, deny",
                "p, role:fraud, fraud, communications, read, deny",
            ] {
                denying.policy.push_str(row);
                denying.policy.push('\n');
            }
            let mut granting = base.source().clone();
            for row in [
                "p, role:support, service.support, customer.billing, read, allow",
                "p, role:billing, service.billing, customer.contact, write, allow",
                "p, role:analytics, research, customer.usage_history, read, allow",
                "p, role:joint_user, joint_use, customer.billing, read, allow",
            ] {
                granting.policy.push_str(row);
                granting.policy.push('\n');
            }
            vec![
                Arc::new(base),
                Arc::new(compile(denying).await.expect("denying policy")),
                Arc::new(compile(granting).await.expect("granting policy")),
            ]
        })
    })
}

const CALLERS: &[&str] = &[
    "billing-service",
    "support-service",
    "marketing-service",
    "analytics-service",
    "provisioning-service",
    "softbank",
    "ntt-east",
    "privacy-office",
    "nobody",
];
const PURPOSES: &[&str] = &[
    "service.billing",
    "service.support",
    "marketing",
    "marketing.email",
    "research.statistics",
    "third_party.interconnect",
    "joint_use.marketing_research",
    "subject_request.disclosure",
    "fraud.investigation",
    "",
    "mystery",
];
const CATEGORIES: &[&str] = &[
    "customer.billing",
    "customer.contact.email",
    "customer.contact.fax",
    "customer.name",
    "communications.call_history",
    "deidentified",
    "customer.usage_history",
    "nonsense",
];
const SUBJECTS: &[&str] = &["s1", "s2", "s3"];

#[derive(Debug, Clone)]
enum Op {
    Swap(usize),
    SetState(usize, SubjectState),
    /// Decide the request at this index of the case's pool. A small pool makes the same
    /// request come back across swaps and state changes, which is where a stale cache shows.
    Decide(usize),
}

const POOL: usize = 6;

fn state() -> impl Strategy<Value = SubjectState> {
    (
        proptest::sample::subsequence(vec!["marketing", "marketing.email", "service"], 0..=2),
        proptest::sample::subsequence(vec!["marketing", "service.support"], 0..=1),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(consent, comms, use_suspended, provision_suspended, deletion_requested)| {
                SubjectState {
                    consent: consent.into_iter().map(String::from).collect(),
                    comms_consent: comms.into_iter().map(String::from).collect(),
                    use_suspended,
                    provision_suspended,
                    deletion_requested,
                }
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    (
        proptest::sample::select(CALLERS),
        proptest::sample::select(PURPOSES),
        prop_oneof![6 => Just("read"), 2 => Just("write"), 1 => Just("delete")],
        proptest::sample::subsequence(CATEGORIES, 0..=2),
        proptest::sample::subsequence(SUBJECTS, 0..=2),
        proptest::option::weighted(
            0.2,
            proptest::sample::select(&["ntt-east", "softbank", "billing-service", "acme"][..]),
        ),
        // Categories the call may go without: which of them the decision minimizes must
        // come out of the cache as it comes out of a fresh evaluation.
        proptest::sample::subsequence(CATEGORIES, 0..=2),
    )
        .prop_map(
            |(caller, purpose, action, categories, subjects, recipient, minimizable)| Request {
                caller: caller.into(),
                purpose: purpose.into(),
                action: action.into(),
                categories: categories.into_iter().map(String::from).collect(),
                subjects: subjects.into_iter().map(String::from).collect(),
                recipient: recipient.map(String::from),
                minimizable: minimizable.into_iter().map(String::from).collect(),
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..3usize).prop_map(Op::Swap),
        2 => (0..SUBJECTS.len(), state()).prop_map(|(i, s)| Op::SetState(i, s)),
        12 => (0..POOL).prop_map(Op::Decide),
    ]
}

/// Everything of a decision but its id and whether it was a hit.
fn essence(d: &Decision) -> impl PartialEq + std::fmt::Debug + use<> {
    (
        d.allowed,
        d.reasons.clone(),
        d.matched_rules.to_vec(),
        d.policy_version,
        d.minimized.clone(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn cached_decision_equals_fresh_decision(
        pool in proptest::collection::vec(request(), POOL),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let policies = policies();
        let decider = Decider::with_policy(policies[0].clone(), CacheSettings::default());
        let subjects = InMemorySubjects::new();
        let mut current = 0;
        for op in ops {
            match op {
                Op::Swap(i) => {
                    decider.set_policy(policies[i].clone());
                    current = i;
                }
                Op::SetState(i, s) => subjects.set(SUBJECTS[i], s),
                Op::Decide(i) => {
                    let request = &pool[i];
                    let cached = decider.decide(request, &subjects);
                    let fresh = decide_fresh(Some(&policies[current]), request, &subjects, DecisionId(0));
                    prop_assert_eq!(essence(&cached), essence(&fresh), "request {:?}", request);
                    prop_assert_eq!(cached.policy_version, Some(policies[current].version()));
                }
            }
        }
    }
}

#[test]
fn second_identical_request_is_a_hit_and_decision_ids_differ() {
    let decider = Decider::with_policy(policies()[0].clone(), CacheSettings::default());
    let subjects = InMemorySubjects::new();
    let request = Request {
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.billing".into()],
        subjects: vec!["s1".into()],
        recipient: None,
        minimizable: Vec::new(),
    };
    let first = decider.decide(&request, &subjects);
    let second = decider.decide(&request, &subjects);
    assert!(first.allowed && second.allowed);
    assert!(!first.cache_hit);
    assert!(second.cache_hit);
    assert_ne!(first.decision_id, second.decision_id);
}

#[test]
fn subject_state_is_never_served_from_the_cache() {
    // Same request, two subjects: one consented, one not. The cache entry is shared; the
    // subject's state is read per call.
    let decider = Decider::with_policy(policies()[0].clone(), CacheSettings::default());
    let subjects = InMemorySubjects::new();
    subjects.set(
        "s1",
        SubjectState {
            consent: ["marketing".to_owned()].into(),
            ..SubjectState::default()
        },
    );
    let mut request = Request {
        caller: "marketing-service".into(),
        purpose: "marketing.email".into(),
        action: "read".into(),
        categories: vec!["customer.contact.email".into()],
        subjects: vec!["s1".into()],
        recipient: None,
        minimizable: Vec::new(),
    };
    assert!(decider.decide(&request, &subjects).allowed);
    request.subjects = vec!["s2".into()];
    let denied = decider.decide(&request, &subjects);
    assert!(denied.cache_hit);
    assert!(!denied.allowed);
    // s1 withdraws: the very next call is denied.
    subjects.set("s1", SubjectState::default());
    request.subjects = vec!["s1".into()];
    assert!(!decider.decide(&request, &subjects).allowed);
}

#[test]
fn a_swap_applies_to_the_next_call() {
    let policies = policies();
    let decider = Decider::with_policy(policies[0].clone(), CacheSettings::default());
    let subjects = InMemorySubjects::new();
    let request = Request {
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.billing".into()],
        subjects: vec!["s1".into()],
        recipient: None,
        minimizable: Vec::new(),
    };
    assert!(decider.decide(&request, &subjects).allowed);
    assert!(decider.decide(&request, &subjects).cache_hit);
    decider.set_policy(policies[1].clone());
    let after = decider.decide(&request, &subjects);
    assert!(
        !after.allowed,
        "the deny row of the new policy applies at once"
    );
    assert_eq!(after.policy_version, Some(policies[1].version()));
}

#[test]
fn no_policy_denies() {
    let decider = Decider::new(CacheSettings::default());
    let d = decider.decide(&Request::default(), &InMemorySubjects::new());
    assert!(!d.allowed);
    assert_eq!(
        d.codes(),
        vec![pdgate::decision::ReasonCode::PolicyUnavailable]
    );
    assert_eq!(d.policy_version, None);
}
