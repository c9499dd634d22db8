//! Subject state in the decision path and the `SubjectRights` API, end to end: real sockets, a
//! real SQLite file, the machine's PostgreSQL (`PDGATE_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; each test in a schema of its own), and the built
//! `pdgate` binary for the CLI.
//!
//! A PostgreSQL that cannot be reached fails these tests (it never skips them), as in
//! tests/registry.rs.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use common::pg::TestSchema;
use common::{Harness, Options, SubjectsChoice, call};
use pdgate::proto::demo::GetProfileRequest;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::proto::v1::subject_rights_client::SubjectRightsClient;
use pdgate::proto::v1::{CheckRequest, ConsentRequest, GetSubjectRequest, SubjectChangeRequest};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// A subject id no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", getrandom::u64().unwrap())
}

/// A message with `x-caller` set (the harness runs in insecure-header mode).
fn as_identity<T>(message: T, identity: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if !identity.is_empty() {
        request
            .metadata_mut()
            .insert("x-caller", MetadataValue::try_from(identity).unwrap());
    }
    request
}

async fn rights(h: &Harness) -> SubjectRightsClient<Channel> {
    SubjectRightsClient::new(h.channel(h.api_addr).await)
}

async fn access(h: &Harness) -> AccessControlClient<Channel> {
    AccessControlClient::new(h.channel(h.api_addr).await)
}

fn consent(subject: &str, purpose: &str, source: &str) -> ConsentRequest {
    ConsentRequest {
        subject: subject.into(),
        purpose: purpose.into(),
        communications: false,
        source: source.into(),
    }
}

fn change(subject: &str, source: &str) -> SubjectChangeRequest {
    SubjectChangeRequest {
        subject: subject.into(),
        source: source.into(),
    }
}

/// A marketing read (subject-dependent: needs consent, stopped by a suspension of use).
fn marketing(subject: &str) -> CheckRequest {
    CheckRequest {
        caller: "marketing-service".into(),
        purpose: "marketing.email".into(),
        action: "read".into(),
        categories: vec!["customer.contact.email".into()],
        subjects: vec![subject.into()],
        recipient: String::new(),
        minimizable: Vec::new(),
    }
}

/// A billing read (subject-independent: billing for service given goes on whatever the
/// subject asked).
fn billing(subject: &str) -> CheckRequest {
    CheckRequest {
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.billing".into()],
        subjects: vec![subject.into()],
        recipient: String::new(),
        minimizable: Vec::new(),
    }
}

/// The decision's reason codes; empty when allowed.
async fn codes(client: &mut AccessControlClient<Channel>, request: CheckRequest) -> Vec<String> {
    let response = client.check(request).await.unwrap().into_inner();
    let codes: Vec<String> = response.reasons.iter().map(|r| r.code.clone()).collect();
    assert_eq!(response.allowed, codes.is_empty(), "{codes:?}");
    codes
}

async fn sqlite_harness(dir: &Path) -> Harness {
    Harness::with(Options {
        subjects: SubjectsChoice::Sqlite(dir.join("subjects.db")),
        ..Options::default()
    })
    .await
}

/// The field names of an `INVALID_ARGUMENT`'s `BadRequest` details.
fn fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn only_the_privacy_office_may_call_and_refusals_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = sqlite_harness(dir.path()).await;
    let mut client = rights(&h).await;
    let subject = unique("role");
    for identity in ["", "sre", "security-team", "marketing-service"] {
        let status = client
            .set_consent(as_identity(consent(&subject, "marketing", ""), identity))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "`{identity}`");
        assert_eq!(common::reason(&status), "ADMIN_ROLE_REQUIRED");
        let status = client
            .get(as_identity(
                GetSubjectRequest {
                    subject: subject.clone(),
                },
                identity,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "`{identity}`");
    }
    // Nothing was recorded.
    let got = client
        .get(as_identity(
            GetSubjectRequest {
                subject: subject.clone(),
            },
            "privacy-office",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.version, 0);
    h.shutdown().await.unwrap();
    let refusals = h
        .audit_records()
        .into_iter()
        .filter(|r| {
            r.body.method.as_deref() == Some("/pdgate.v1.SubjectRights/SetConsent")
                && r.body.decision == "deny"
        })
        .count();
    assert_eq!(refusals, 4, "every refusal is audited");
}

#[tokio::test]
async fn every_rpc_changes_or_reads_the_registry_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = sqlite_harness(dir.path()).await;
    let mut client = rights(&h).await;
    let s = unique("rpc");
    let po = "privacy-office";
    let state = client
        .set_consent(as_identity(consent(&s, "marketing", "REQ-1"), po))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (state.version, state.consent.clone()),
        (1, vec!["marketing".to_owned()])
    );
    let mut comms = consent(&s, "marketing.email", "REQ-2");
    comms.communications = true;
    let state = client
        .set_consent(as_identity(comms.clone(), po))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.comms_consent, vec!["marketing.email".to_owned()]);
    let state = client
        .withdraw_consent(as_identity(comms, po))
        .await
        .unwrap()
        .into_inner();
    assert!(state.comms_consent.is_empty() && state.version == 3);
    let state = client
        .suspend_use(as_identity(change(&s, "REQ-3"), po))
        .await
        .unwrap()
        .into_inner();
    assert!(state.use_suspended);
    let state = client
        .resume_use(as_identity(change(&s, ""), po))
        .await
        .unwrap()
        .into_inner();
    assert!(!state.use_suspended);
    let state = client
        .suspend_provision(as_identity(change(&s, ""), po))
        .await
        .unwrap()
        .into_inner();
    assert!(state.provision_suspended);
    let state = client
        .resume_provision(as_identity(change(&s, ""), po))
        .await
        .unwrap()
        .into_inner();
    assert!(!state.provision_suspended);
    let state = client
        .request_deletion(as_identity(change(&s, "REQ-4"), po))
        .await
        .unwrap()
        .into_inner();
    assert!(state.deletion_requested);
    assert_eq!(state.version, 8);
    let got = client
        .get(as_identity(GetSubjectRequest { subject: s.clone() }, po))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, state);
    let history = client
        .history(as_identity(GetSubjectRequest { subject: s.clone() }, po))
        .await
        .unwrap()
        .into_inner();
    let changes: Vec<&str> = history.events.iter().map(|e| e.change.as_str()).collect();
    assert_eq!(
        changes,
        [
            "consent",
            "consent",
            "withdraw",
            "suspend_use",
            "resume_use",
            "suspend_provision",
            "resume_provision",
            "request_deletion"
        ]
    );
    // The actor is the verified identity; the source is the request's.
    assert!(history.events.iter().all(|e| e.actor == po));
    assert_eq!(history.events[0].source, "REQ-1");
    assert_eq!(history.events[1].purpose, "marketing.email");
    assert!(history.events[1].communications);
    assert_eq!(history.events[4].source, "");
    h.shutdown().await.unwrap();

    let admin: Vec<_> = h
        .audit_records()
        .into_iter()
        .filter(|r| {
            r.body
                .method
                .as_deref()
                .is_some_and(|m| m.starts_with("/pdgate.v1.SubjectRights/"))
        })
        .collect();
    // 8 changes and 2 reads, each allowed and audited, each naming the subject.
    assert_eq!(admin.len(), 10);
    assert!(
        admin
            .iter()
            .all(|r| r.body.decision == "allow" && r.body.subjects == [s.clone()])
    );
    assert!(admin.iter().all(|r| r.body.caller == po));
    let first = &admin[0].body;
    assert_eq!(first.purpose, "marketing");
    assert_eq!(
        first.detail.as_deref(),
        Some("consent marketing (communications: false), source REQ-1")
    );
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = sqlite_harness(dir.path()).await;
    let mut client = rights(&h).await;
    let po = "privacy-office";
    let status = client
        .set_consent(as_identity(consent("cust 1", "marketing", ""), po))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(fields(&status), ["subject"]);
    // A purpose the policy does not define: refused (it could never match).
    let s = unique("bad");
    let status = client
        .set_consent(as_identity(consent(&s, "marketting", ""), po))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(fields(&status), ["purpose"]);
    let status = client
        .suspend_use(as_identity(change(&s, &"x".repeat(300)), po))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(fields(&status), ["source"]);
    let status = client
        .history(as_identity(
            GetSubjectRequest {
                subject: "a,b".into(),
            },
            po,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A withdrawal of a purpose the policy lacks is allowed (recorded under an older policy).
    let state = client
        .withdraw_consent(as_identity(consent(&s, "marketting", ""), po))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.version, 1);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_change_through_the_api_is_honoured_by_the_next_data_plane_call() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = sqlite_harness(dir.path()).await;
    let mut rights = rights(&h).await;
    let mut data = h.client().await;
    let po = "privacy-office";
    let profile = || {
        call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "marketing-service",
            "marketing.email",
            &["cust-1"],
        )
    };
    let status = data.get_profile(profile()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(common::reason(&status), "CONSENT_REQUIRED");
    rights
        .set_consent(as_identity(consent("cust-1", "marketing", "REQ-1"), po))
        .await
        .unwrap();
    data.get_profile(profile()).await.unwrap();
    rights
        .suspend_use(as_identity(change("cust-1", "REQ-2"), po))
        .await
        .unwrap();
    let status = data.get_profile(profile()).await.unwrap_err();
    assert_eq!(common::reason(&status), "USE_SUSPENDED");
    assert_eq!(
        h.service.calls(),
        1,
        "only the allowed call reached the upstream"
    );
    // The same through AccessControl, and a subject-independent purpose goes on.
    let mut check = access(&h).await;
    assert_eq!(
        codes(&mut check, marketing("cust-1")).await,
        ["USE_SUSPENDED"]
    );
    assert!(codes(&mut check, billing("cust-1")).await.is_empty());
    h.shutdown().await.unwrap();
}

/// Runs the built `pdgate` with `args`; returns (exit code, stdout, stderr). Awaited, not
/// blocking: the sidecar it talks to runs on this test's runtime.
async fn pdgate(args: &[&str]) -> (i32, String, String) {
    let out = Pdgate::new(args).output_async().await;
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_change_the_cli_writes_into_the_file_is_noticed_by_the_running_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subjects.db");
    let mut h = sqlite_harness(dir.path()).await;
    let mut check = access(&h).await;
    let s = unique("file");
    // Cached as "no consent" first, so the sidecar must notice the change, not just read it.
    assert_eq!(codes(&mut check, marketing(&s)).await, ["CONSENT_REQUIRED"]);
    let store = path.to_str().unwrap();
    let (code, _, err) = pdgate(&[
        "subjects",
        "consent",
        &s,
        "--purpose",
        "marketing",
        "--actor",
        "alice",
        "--store",
        store,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    // While the feed's polls succeed they keep the cached "no consent" confirmed, so only the
    // feed delivering the change can bring the allow.
    let took = until(&mut check, &marketing(&s), &[], NOTICE_BOUND).await;
    println!("out-of-process change honoured after {took:?} (documented: within 250 ms)");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn cli_admin_mode_goes_through_a_running_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = sqlite_harness(dir.path()).await;
    let addr = h.api_addr.to_string();
    let s = unique("cli");
    let (code, out, err) = pdgate(&[
        "subjects",
        "consent",
        &s,
        "--purpose",
        "marketing",
        "--source",
        "REQ-7",
        "--admin",
        &addr,
        "--as",
        "privacy-office",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["state"]["consent"][0], "marketing");
    // Honoured by the sidecar's next decision.
    let mut check = access(&h).await;
    assert!(codes(&mut check, marketing(&s)).await.is_empty());

    let (code, out, err) = pdgate(&[
        "subjects",
        "suspend",
        &s,
        "--use",
        "--admin",
        &addr,
        "--as",
        "privacy-office",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version 2"), "{out}");
    let (code, out, _) = pdgate(&[
        "subjects",
        "show",
        &s,
        "--admin",
        &addr,
        "--as",
        "privacy-office",
        "--json",
    ])
    .await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["recorded"], true);
    assert_eq!(json["state"]["use_suspended"], true);
    let (code, out, _) = pdgate(&[
        "subjects",
        "history",
        &s,
        "--admin",
        &addr,
        "--as",
        "privacy-office",
        "--json",
    ])
    .await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let events = json["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["actor"], "privacy-office");
    assert_eq!(events[0]["source"], "REQ-7");
    assert_eq!(events[1]["change"], "suspend_use");
    // A subject never changed: no record, exit 0, as in the direct mode.
    let (code, out, _) = pdgate(&[
        "subjects",
        "show",
        &unique("none"),
        "--admin",
        &addr,
        "--as",
        "privacy-office",
        "--json",
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["recorded"],
        false
    );

    // Wrong role: refused by the sidecar, exit 1.
    let (code, _, _) = pdgate(&[
        "subjects", "resume", &s, "--use", "--admin", &addr, "--as", "sre",
    ])
    .await;
    assert_eq!(code, 1);
    // Bad input: exit 2 (before or at the sidecar).
    let (code, _, _) = pdgate(&[
        "subjects",
        "consent",
        "a b",
        "--purpose",
        "marketing",
        "--admin",
        &addr,
        "--as",
        "privacy-office",
    ])
    .await;
    assert_eq!(code, 2);
    let (code, _, _) = pdgate(&[
        "subjects",
        "consent",
        &s,
        "--purpose",
        "marketting",
        "--admin",
        &addr,
        "--as",
        "privacy-office",
    ])
    .await;
    assert_eq!(code, 2, "a purpose the policy lacks is refused");
    // --actor is the direct mode's; --store and --admin exclude each other.
    let (code, _, _) = pdgate(&[
        "subjects",
        "delete",
        &s,
        "--actor",
        "bob",
        "--admin",
        &addr,
        "--as",
        "privacy-office",
    ])
    .await;
    assert_eq!(code, 2);
    let (code, _, _) = pdgate(&[
        "subjects",
        "show",
        &s,
        "--store",
        "x.db",
        "--admin",
        &addr,
        "--as",
        "privacy-office",
    ])
    .await;
    assert_eq!(code, 2);
    // Nothing listening: exit 1.
    let (code, _, _) = pdgate(&[
        "subjects",
        "show",
        &s,
        "--admin",
        "127.0.0.1:1",
        "--as",
        "privacy-office",
        "--timeout",
        "2",
    ])
    .await;
    assert_eq!(code, 1);
    h.shutdown().await.unwrap();
}

// ---- PostgreSQL (fleet mode) ----

async fn pg_harness(url: String, stale_after: Duration) -> Harness {
    Harness::with(Options {
        subjects: SubjectsChoice::Postgres(url),
        stale_after,
        ..Options::default()
    })
    .await
}

/// A bound on a change reaching a running sidecar (the SQLite feed's poll, NOTIFY) that holds
/// on a loaded 2-core machine. The documented figures (250 ms, 1 s) are targets, printed beside
/// what was measured, not asserted here.
const NOTICE_BOUND: Duration = Duration::from_secs(10);

/// Polls `check` until `request` is decided with `expected` codes; returns how long it took.
async fn until(
    check: &mut AccessControlClient<Channel>,
    request: &CheckRequest,
    expected: &[&str],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let got = codes(check, request.clone()).await;
        if got == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still {got:?} after {within:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sidecars_on_one_database_see_each_others_changes_through_notify() {
    let schema = TestSchema::create().await;
    let second = format!("two-{}", schema.name);
    let mut one = pg_harness(schema.url_via(schema.server()), Duration::from_secs(5)).await;
    let mut two = pg_harness(
        schema.url_named(schema.server(), &second),
        Duration::from_secs(5),
    )
    .await;
    let mut rights = rights(&one).await;
    let mut check_one = access(&one).await;
    let mut check_two = access(&two).await;
    let po = "privacy-office";
    let s = unique("fleet");
    // Both sidecars reach the database (the first read migrates lazily) and cache the subject.
    until(
        &mut check_one,
        &marketing(&s),
        &["CONSENT_REQUIRED"],
        Duration::from_secs(10),
    )
    .await;
    until(
        &mut check_two,
        &marketing(&s),
        &["CONSENT_REQUIRED"],
        Duration::from_secs(10),
    )
    .await;
    // Sidecar 2's change feed is connected, so what follows measures NOTIFY, not the feed's
    // first connection (which drops the cache and reads again).
    let took = schema
        .until_listening(&second, pdgate::registry::NOTIFY_CHANNEL)
        .await;
    println!("sidecar 2 listening {took:?} after its subject was cached");
    // Connecting dropped its cache (changes may have been missed before): cache it again.
    assert_eq!(
        codes(&mut check_two, marketing(&s)).await,
        ["CONSENT_REQUIRED"]
    );
    let mut delays = Vec::new();
    for (i, expect) in [(0, &[][..]), (1, &["USE_SUSPENDED"][..]), (2, &[][..])] {
        let sent = Instant::now();
        match i {
            0 => drop(
                rights
                    .set_consent(as_identity(consent(&s, "marketing", ""), po))
                    .await
                    .unwrap(),
            ),
            1 => drop(
                rights
                    .suspend_use(as_identity(change(&s, ""), po))
                    .await
                    .unwrap(),
            ),
            _ => drop(
                rights
                    .resume_use(as_identity(change(&s, ""), po))
                    .await
                    .unwrap(),
            ),
        }
        // Sidecar 1 honours its own change on the very next call.
        assert_eq!(codes(&mut check_one, marketing(&s)).await, expect);
        // While heartbeats (every 250 ms) keep sidecar 2's cached state confirmed, only a
        // NOTIFY of the change makes it decide otherwise.
        until(&mut check_two, &marketing(&s), expect, NOTICE_BOUND).await;
        delays.push(sent.elapsed());
    }
    println!(
        "change through sidecar 1 honoured by sidecar 2 after {delays:?} (documented: within 1 s)"
    );
    one.shutdown().await.unwrap();
    two.shutdown().await.unwrap();
    schema.remove().await;
}

/// A TCP relay to the database that the test can cut (every connection dropped, new ones
/// refused at once) and restore.
struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                conns2.lock().unwrap().push(task);
            }
        });
        Self {
            addr,
            up,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_fails_closed_after_stale_after_and_recovers() {
    let schema = TestSchema::create().await;
    let relay = Relay::start(schema.server()).await;
    // Long enough that the first call after the cut is decided within it on a loaded machine.
    let stale_after = Duration::from_secs(5);
    let mut h = pg_harness(schema.url_via(relay.addr), stale_after).await;
    let mut rights = rights(&h).await;
    let mut check = access(&h).await;
    let s = unique("outage");
    // The database is reachable through the relay: the consent is recorded and honoured.
    let po = "privacy-office";
    let started = Instant::now();
    while rights
        .set_consent(as_identity(consent(&s, "marketing", ""), po))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < common::wait::LIMIT,
            "the schema was never migrated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // This decision used a state confirmed at most `refresh_after` (750 ms) before it was
    // asked for, or read the state again.
    let confirmed = Instant::now();
    assert!(codes(&mut check, marketing(&s)).await.is_empty());

    relay.cut();
    let cut = Instant::now();
    // Within stale_after the cached state is still trusted; past it, it is not. Ask until the
    // denial comes and see that it did not come early.
    let mut allowed_after_cut = 0;
    let denied_at = loop {
        let got = codes(&mut check, marketing(&s)).await;
        if !got.is_empty() {
            assert_eq!(got, ["SUBJECT_STATE_UNAVAILABLE"]);
            break Instant::now();
        }
        allowed_after_cut += 1;
        assert!(
            cut.elapsed() < stale_after + common::wait::LIMIT,
            "still allowed {:?} after the cut (stale_after {stale_after:?})",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "store cut: {allowed_after_cut} calls answered from the cache, the first denial {:?} after the cut (stale_after {stale_after:?})",
        denied_at - cut
    );
    assert!(
        allowed_after_cut > 0,
        "no call after the cut was answered from the cache"
    );
    // A denial is decided before it is received: received earlier than this, it would have
    // been decided while the state was younger than stale_after.
    let earliest = stale_after - Duration::from_secs(1);
    assert!(
        denied_at - confirmed >= earliest,
        "denied {:?} after the last confirmation, before stale_after ({stale_after:?})",
        denied_at - confirmed
    );
    // Now it is not: subject-dependent decisions are denied, others go on.
    assert_eq!(
        codes(&mut check, marketing(&s)).await,
        ["SUBJECT_STATE_UNAVAILABLE"]
    );
    assert_eq!(
        codes(&mut check, marketing(&unique("new"))).await,
        ["SUBJECT_STATE_UNAVAILABLE"]
    );
    assert!(codes(&mut check, billing(&s)).await.is_empty());
    let status = rights
        .get(as_identity(GetSubjectRequest { subject: s.clone() }, po))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let status = rights
        .suspend_use(as_identity(change(&s, ""), po))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    relay.restore();
    let took = until(&mut check, &marketing(&s), &[], common::wait::LIMIT).await;
    println!("recovered {took:?} after the relay was restored");
    // Changes are accepted and honoured again.
    rights
        .suspend_use(as_identity(change(&s, ""), po))
        .await
        .unwrap();
    assert_eq!(codes(&mut check, marketing(&s)).await, ["USE_SUSPENDED"]);
    h.shutdown().await.unwrap();
    drop(relay);
    schema.remove().await;
}

#[tokio::test]
async fn a_sidecar_on_in_memory_subjects_has_no_registry_to_change() {
    // The harness's default (the demo's subjects in memory), as `pdgate demo` runs.
    let mut h = Harness::start().await;
    let mut client = rights(&h).await;
    let status = client
        .suspend_use(as_identity(change("cust-1", ""), "privacy-office"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    // The role is still checked first.
    let status = client
        .suspend_use(as_identity(change("cust-1", ""), "sre"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    h.shutdown().await.unwrap();
}
