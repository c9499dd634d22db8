//! Hot reload over real sockets: the file watch (debounced, the last good policy kept on a
//! bad edit, the sidecar's own write after an Apply a no-op), and swaps under load — many
//! concurrent data-plane calls while the policy alternates, every answer decided under a
//! version active during its call, never an old one after a swap completed, none failed.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::wait::eventually;
use common::{Harness, Options, call, decision_id, logs, policy_admin, policy_copy, reason};
use pdgate::config::ReloadSettings;
use pdgate::gate::Bundle;
use pdgate::proto::demo::GetProfileRequest;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::proto::v1::{ApplyRequest, CheckRequest, PolicyBundle, StatusRequest};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;

const DENY_NAMES: &str = "p, role:billing, service.billing, customer.name, read, deny";

fn watching(dir: &Path) -> Options {
    Options {
        policy: dir.to_path_buf(),
        reload: ReloadSettings {
            watch: true,
            debounce: Duration::from_millis(50),
            keep_versions: 3,
        },
        ..Options::default()
    }
}

fn billing_reads_name() -> CheckRequest {
    CheckRequest {
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.name".into()],
        subjects: vec!["cust-1".into()],
        recipient: String::new(),
        minimizable: Vec::new(),
    }
}

async fn check(h: &Harness) -> pdgate::proto::v1::CheckResponse {
    let mut client = AccessControlClient::new(h.channel(h.api_addr).await);
    client
        .check(billing_reads_name())
        .await
        .unwrap()
        .into_inner()
}

async fn status(h: &Harness) -> pdgate::proto::v1::StatusResponse {
    let mut admin = policy_admin(h, "sre").await;
    admin.status(StatusRequest {}).await.unwrap().into_inner()
}

/// Where the file watch logs, and what it logs when a change of the directory turns out to
/// hold the active policy (its own write after an Apply, a test file) or a new one. The only
/// signal that the watch looked at a change it did not act on.
const WATCH: &str = "pdgate::gate::watch";
const SAW_ACTIVE: &str = "policy store changed; the policy is the active one";
const RELOADED: &str = "policy store changed: reloaded";

fn bundle_of(dir: &Path, extra: &[&str]) -> PolicyBundle {
    let mut bundle = PolicyBundle::from(Bundle::read_dir(dir, None).unwrap());
    for row in extra {
        bundle.policy.push('\n');
        bundle.policy.push_str(row);
    }
    bundle
}

#[tokio::test]
async fn the_file_watch_reloads_a_changed_directory_and_keeps_the_last_good_policy() {
    let (events, _capture) = logs::capture();
    let dir = policy_copy();
    let mut h = Harness::with(watching(dir.path())).await;
    let version_a = check(&h).await.policy_version;

    let csv = dir.path().join("policy.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str(DENY_NAMES);
    text.push('\n');
    std::fs::write(&csv, &text).unwrap();
    eventually("the edited policy.csv is active", || async {
        check(&h).await.policy_version != version_a
    })
    .await;
    let now = check(&h).await;
    assert!(!now.allowed);
    assert_eq!(now.reasons[0].code, "DENIED_BY_RULE");
    let s = status(&h).await;
    assert_eq!(s.active.as_ref().unwrap().applied_by, "file");
    assert_eq!(s.history.len(), 2);
    let version_b = now.policy_version;

    // A broken edit: rejected, the last good policy stays, the error is reported.
    std::fs::write(
        &csv,
        format!("{text}p, role:billing, service.nonsense, customer.name, read, allow\n"),
    )
    .unwrap();
    eventually("the broken edit is reported", || async {
        !status(&h).await.last_error.is_empty()
    })
    .await;
    let s = status(&h).await;
    assert!(s.last_error.contains("policy.csv:"), "{}", s.last_error);
    assert_eq!(s.active.unwrap().version, version_b);
    assert_eq!(check(&h).await.policy_version, version_b);

    // A test that the directory's policy fails is a rejected reload too.
    let looked = events.matching(WATCH, SAW_ACTIVE).len();
    std::fs::write(&csv, &text).unwrap();
    eventually("the fixed edit clears the error", || async {
        status(&h).await.last_error.is_empty() && events.matching(WATCH, SAW_ACTIVE).len() > looked
    })
    .await;
    std::fs::write(
        dir.path().join("tests/zz_extra.yaml"),
        "cases:\n  - name: billing reads names\n    request: { caller: billing-service, purpose: service.billing, action: read, categories: [customer.name], subjects: [cust-1] }\n    expect: { decision: allow }\n",
    )
    .unwrap();
    // A test file alone is a change of the bundle (#14): its tests are run, and fail.
    eventually("the failing test file is reported", || async {
        status(&h).await.last_error.contains("zz_extra.yaml")
    })
    .await;
    assert_eq!(check(&h).await.policy_version, version_b);
    std::fs::write(&csv, format!("{text}# a comment changes the version\n")).unwrap();
    eventually("the failing test is reported", || async {
        status(&h).await.last_error.contains("zz_extra.yaml")
    })
    .await;
    assert_eq!(check(&h).await.policy_version, version_b);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_watch_sees_an_api_apply_as_its_own_write() {
    let (events, _capture) = logs::capture();
    let dir = policy_copy();
    let mut h = Harness::with(watching(dir.path())).await;
    let mut admin = policy_admin(&h, "security-team").await;
    let applied = admin
        .apply(ApplyRequest {
            bundle: Some(bundle_of(&common::policy_dir(), &[DENY_NAMES])),
            comment: "via API".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(applied.changed);
    // The Apply wrote the directory; the watch sees the change, reads it, and finds the
    // version the Apply made active: nothing to reload.
    let took = eventually("the watch looks at the Apply's write", || async {
        !events.matching(WATCH, SAW_ACTIVE).is_empty()
    })
    .await;
    println!("the watch looked at the Apply's write after {took:?}");
    assert!(
        events.matching(WATCH, RELOADED).is_empty(),
        "the watch reloaded the sidecar's own write: {:?}",
        events.matching(WATCH, RELOADED)
    );
    let s = status(&h).await;
    let active = s.active.unwrap();
    assert_eq!(active.version, applied.version);
    assert_eq!(active.applied_by, "security-team");
    assert!(s.last_error.is_empty());
    assert_eq!(s.history.len(), 2);
    h.shutdown().await.unwrap();
}

/// One data-plane call and what came back.
struct Answer {
    started: Instant,
    ended: Instant,
    outcome: Result<String, (Code, String, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_call_is_decided_under_an_old_version_after_a_swap() {
    let dir = policy_copy();
    let mut h = Harness::with(Options {
        policy: dir.path().to_path_buf(),
        max_concurrent_calls: 1024,
        ..Options::default()
    })
    .await;
    let bundle_a = bundle_of(&common::policy_dir(), &[]);
    let bundle_b = bundle_of(&common::policy_dir(), &[DENY_NAMES]);
    let version_a = Bundle::read_dir(&common::policy_dir(), None)
        .unwrap()
        .version()
        .to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..16 {
        let client = h.client().await;
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            let mut client = client;
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = client
                    .get_profile(call(
                        GetProfileRequest {
                            customer_id: "cust-1".into(),
                        },
                        "billing-service",
                        "service.billing",
                        &["cust-1"],
                    ))
                    .await;
                let ended = Instant::now();
                let outcome = match result {
                    Ok(response) => Ok(decision_id(response.metadata()).unwrap()),
                    Err(status) => {
                        use tonic_types::StatusExt;
                        let version = status
                            .get_error_details()
                            .error_info()
                            .and_then(|i| i.metadata.get("policy_version").cloned())
                            .unwrap_or_default();
                        Err((status.code(), reason(&status), version))
                    }
                };
                answers.push(Answer {
                    started,
                    ended,
                    outcome,
                });
            }
            answers
        }));
    }
    // Swaps: (started, ended, version now active).
    let mut swaps: Vec<(Instant, Instant, String)> = Vec::new();
    let mut admin = policy_admin(&h, "security-team").await;
    // Every caller is calling before the first swap.
    eventually("the callers are calling", || async {
        h.service.calls() >= 32
    })
    .await;
    for i in 0..10 {
        let bundle = if i % 2 == 0 { &bundle_b } else { &bundle_a };
        let started = Instant::now();
        let applied = admin
            .apply(ApplyRequest {
                bundle: Some(bundle.clone()),
                comment: format!("swap {i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(applied.changed);
        swaps.push((started, Instant::now(), applied.version));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for caller in callers {
        answers.extend(caller.await.unwrap());
    }
    let version_b = swaps[0].2.clone();

    // The version of each allowed call, from its audit record.
    let versions: HashMap<String, String> = h
        .audit_records()
        .into_iter()
        .filter_map(|r| Some((r.body.decision_id, r.body.policy_version?)))
        .collect();
    let mut allowed = 0;
    let mut denied = 0;
    for answer in &answers {
        let version = match &answer.outcome {
            Ok(id) => {
                allowed += 1;
                let v = versions
                    .get(id)
                    .expect("every allowed call is audited")
                    .clone();
                assert_eq!(v, version_a, "allowed under {v}: only A allows");
                v
            }
            Err((code, why, v)) => {
                denied += 1;
                assert_eq!(*code, Code::PermissionDenied, "a call failed: {why}");
                assert_eq!(why, "DENIED_BY_RULE");
                assert_eq!(*v, version_b, "denied under {v}: only B denies");
                v.clone()
            }
        };
        // Versions that may decide this call: the one active when it started (with the swap
        // in progress then, its outcome too) and those of swaps begun before it ended.
        let mut possible = vec![version_a.clone()];
        for (s_start, s_end, v) in &swaps {
            if *s_end <= answer.started {
                possible = vec![v.clone()];
            } else if *s_start <= answer.ended {
                possible.push(v.clone());
            }
        }
        assert!(
            possible.contains(&version),
            "a call decided under {version}, not active during it ({possible:?})"
        );
    }
    eprintln!(
        "{} calls over 10 swaps: {allowed} allowed under A, {denied} denied under B, 0 failed",
        answers.len()
    );
    assert!(
        allowed > 10 && denied > 10,
        "allowed {allowed}, denied {denied}"
    );
    h.shutdown().await.unwrap();
}
