//! Soak (#14): one bounded run of mixed traffic against the real `pdgate serve`, looking for
//! what only time shows — memory that creeps, records that go missing, decisions that drift
//! while the policy is reloaded and subjects change under load.
//!
//! For the run's length, at the same time:
//!
//! - worker tasks call the data plane: allowed unary calls (billing reads a statement), denied
//!   ones (marketing reads call history), and server streams (an interconnect export to
//!   `ntt-east`, decided record by record); each answer is checked against what the default
//!   policy decides, and its decision id kept;
//! - a subject task changes subjects through `SubjectRights` (consent given and withdrawn, use
//!   suspended and resumed) and after each change asks `AccessControl.Check` the question the
//!   change decides: the answer must follow the change at once;
//! - a reload task rewrites `policy.csv` every [`RELOAD_EVERY`] with one more comment line —
//!   a new policy version that decides the same — and the file watch swaps each in;
//! - a sampler reads pdgate's resident set (`/proc/PID/status`) every second.
//!
//! At the end pdgate is stopped (SIGTERM, a graceful drain), `pdgate audit verify` checks the
//! chain, and every decision id a caller was given is looked up in the log.
//!
//! Printed: calls by kind; **wrong decisions** (an answer other than the policy's, or an
//! allowed or denied answer without a decision id — must be 0); **lost records** (decision ids
//! answered with and missing from the log — must be 0); RSS at start (after the warm-up, the
//! first tenth of the run), its maximum and at the end, and whether it stayed within
//! [`RSS_FLAT`] of the start. Any of those failing makes the run exit non-zero.
//!
//! Not in CI as a soak: `cargo test --benches` runs it in test mode (1 s of traffic and one
//! reload against the debug binary, about 3 s in all) so that it keeps building and running. Run it with:
//!
//! ```text
//! cargo build --release --bin pdgate && cargo bench --bench soak            # 10 minutes
//! PDGATE_SOAK_SECONDS=60 cargo bench --bench soak                            # shorter
//! PDGATE_SOAK_BINARY=/path/to/pdgate cargo bench --bench soak                # another build
//! ```

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "a soak whose setup fails has nothing to measure: abort with the message"
)]

use pdgate::demo::customer::CustomerService;
use pdgate::proto::demo::customer_data_client::CustomerDataClient;
use pdgate::proto::demo::{ExportRequest, GetBillingStatementRequest, GetCallHistoryRequest};
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::proto::v1::subject_rights_client::SubjectRightsClient;
use pdgate::proto::v1::{CheckRequest, ConsentRequest, SubjectChangeRequest};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tonic::Code;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};

const SECONDS_ENV: &str = "PDGATE_SOAK_SECONDS";
const BINARY_ENV: &str = "PDGATE_SOAK_BINARY";
const DEFAULT_SECONDS: u64 = 600;
const TEST_MODE_SECONDS: u64 = 1;
/// Data-plane worker tasks, over [`CHANNELS`] HTTP/2 connections.
const WORKERS: usize = 8;
const CHANNELS: usize = 2;
const RELOAD_EVERY: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// RSS may end at most this much above the start, and peak at most this much above it.
const RSS_FLAT: f64 = 0.10;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// The identity given the privacy-office role in the soak's pdgate.toml.
const PRIVACY_OFFICE: &str = "soak-privacy-office";

/// Criterion's test mode, which CI runs (`cargo test --benches`, no `--bench` flag).
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench")
}

fn main() -> ExitCode {
    let seconds = match std::env::var(SECONDS_ENV) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(n) if (1..=86_400).contains(&n) => n,
            _ => {
                eprintln!("error: {SECONDS_ENV}: `{s}` is not a number of seconds (1 to 86400)");
                return ExitCode::from(2);
            }
        },
        Err(_) if test_mode() => TEST_MODE_SECONDS,
        Err(_) => DEFAULT_SECONDS,
    };
    let binary = std::env::var_os(BINARY_ENV).map_or_else(
        || {
            if test_mode() {
                PathBuf::from(env!("CARGO_BIN_EXE_pdgate"))
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/pdgate")
            }
        },
        PathBuf::from,
    );
    if !binary.is_file() {
        eprintln!(
            "error: `{}` not found; build it first:\n  cargo build --release --bin pdgate",
            binary.display()
        );
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(soak(&binary, Duration::from_secs(seconds))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the run saw.
#[derive(Default)]
struct Tally {
    allowed: AtomicU64,
    denied: AtomicU64,
    streams: AtomicU64,
    stream_records: AtomicU64,
    checks: AtomicU64,
    subject_changes: AtomicU64,
    /// Calls pdgate shed or could not finish (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`, a timeout):
    /// not decisions, counted apart and printed.
    unanswered: AtomicU64,
    wrong: AtomicU64,
    /// Every decision id a caller was given.
    ids: Mutex<Vec<String>>,
    /// The first few wrong answers, for the report.
    wrong_examples: Mutex<Vec<String>>,
}

impl Tally {
    fn id(&self, id: Option<String>, what: &str) {
        match id {
            Some(id) => self.ids.lock().unwrap().push(id),
            None => self.wrong(format!("{what}: answered without a decision id")),
        }
    }

    fn wrong(&self, what: String) {
        self.wrong.fetch_add(1, Ordering::Relaxed);
        let mut examples = self.wrong_examples.lock().unwrap();
        if examples.len() < 10 {
            examples.push(what);
        }
    }

    /// An answer that is not a decision: shed, or cut off by the machine's load.
    fn unanswered(&self, status: &tonic::Status, what: &str) -> bool {
        if matches!(
            status.code(),
            Code::ResourceExhausted | Code::Unavailable | Code::DeadlineExceeded
        ) {
            self.unanswered.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.wrong(format!("{what}: {:?} {}", status.code(), status.message()));
        false
    }
}

fn decision_id(md: &MetadataMap) -> Option<String> {
    md.get("x-pdgate-decision-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn call<T>(message: T, caller: &str, purpose: &str, subjects: &[&str]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    let md = request.metadata_mut();
    md.insert("x-caller", MetadataValue::try_from(caller).unwrap());
    md.insert("x-purpose", MetadataValue::try_from(purpose).unwrap());
    for s in subjects {
        md.append("x-data-subject", MetadataValue::try_from(*s).unwrap());
    }
    request
}

fn as_identity<T>(message: T, identity: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
        .metadata_mut()
        .insert("x-caller", MetadataValue::try_from(identity).unwrap());
    request
}

/// One data-plane worker: allowed, denied and streaming calls in a fixed mix (5 : 3 : 2).
async fn worker(channel: Channel, tally: Arc<Tally>, until: Instant, n: usize) {
    let mut client = CustomerDataClient::new(channel);
    let subjects = ["cust-1", "cust-2", "cust-3"];
    let mut i = n;
    while Instant::now() < until {
        i += 1;
        let subject = subjects[i % subjects.len()];
        match i % 10 {
            0..=4 => {
                let request = call(
                    GetBillingStatementRequest {
                        customer_id: subject.into(),
                        month: String::new(),
                    },
                    "billing-service",
                    "service.billing",
                    &[subject],
                );
                match client.get_billing_statement(request).await {
                    Ok(response) => {
                        tally.allowed.fetch_add(1, Ordering::Relaxed);
                        tally.id(decision_id(response.metadata()), "billing read");
                    }
                    Err(status) => {
                        tally.unanswered(&status, "billing read (allowed by the policy)");
                    }
                }
            }
            5..=7 => {
                let request = call(
                    GetCallHistoryRequest {
                        customer_id: subject.into(),
                    },
                    "marketing-service",
                    "marketing",
                    &[subject],
                );
                match client.get_call_history(request).await {
                    Ok(_) => tally.wrong("marketing read call history: allowed".into()),
                    Err(status) if status.code() == Code::PermissionDenied => {
                        tally.denied.fetch_add(1, Ordering::Relaxed);
                        tally.id(decision_id(status.metadata()), "call-history denial");
                    }
                    Err(status) => {
                        tally.unanswered(&status, "call-history read (denied by the policy)");
                    }
                }
            }
            _ => {
                let request = call(
                    ExportRequest {
                        recipient: "ntt-east".into(),
                        delay_ms: 0,
                    },
                    "ntt-east",
                    "third_party.interconnect",
                    &["cust-1", "cust-2"],
                );
                match client.export_for_interconnect(request).await {
                    Ok(response) => {
                        let id = decision_id(response.metadata());
                        let mut stream = response.into_inner();
                        let mut ids = Vec::new();
                        let end = loop {
                            match stream.message().await {
                                Ok(Some(r)) => ids.push(r.customer_id),
                                Ok(None) => break None,
                                Err(status) => break Some(status),
                            }
                        };
                        match end {
                            None if ids == ["cust-1", "cust-2"] => {
                                tally.streams.fetch_add(1, Ordering::Relaxed);
                                tally.stream_records.fetch_add(2, Ordering::Relaxed);
                                tally.id(id, "export stream");
                            }
                            None => tally.wrong(format!("export stream gave records {ids:?}")),
                            Some(status) => {
                                tally.unanswered(&status, "export stream");
                            }
                        }
                    }
                    Err(status) => {
                        tally.unanswered(&status, "export stream (allowed by the policy)");
                    }
                }
            }
        }
    }
}

/// Changes subjects and checks that each change decides the next question about them.
async fn subjects_task(api: Channel, tally: Arc<Tally>, until: Instant) {
    let mut rights = SubjectRightsClient::new(api.clone());
    let mut access = AccessControlClient::new(api);
    let check = |subject: &str, purpose: &str, category: &str| CheckRequest {
        caller: "marketing-service".into(),
        purpose: purpose.into(),
        action: "read".into(),
        categories: vec![category.into()],
        subjects: vec![subject.into()],
        ..CheckRequest::default()
    };
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        // A few subjects, reused: their state goes back and forth many times.
        let subject = format!("soak-subject-{}", n % 7);
        let consent = ConsentRequest {
            subject: subject.clone(),
            purpose: "marketing.email".into(),
            communications: false,
            source: format!("SOAK-{n}"),
        };
        let change = SubjectChangeRequest {
            subject: subject.clone(),
            source: format!("SOAK-{n}"),
        };
        // Marketing needs the subject's consent and is stopped by a suspension of use.
        let marketing = check(&subject, "marketing.email", "customer.contact.email");
        // (change made, expected answer to the marketing question after it)
        let steps: [(&str, bool); 4] = [
            ("consent", true),
            ("suspend_use", false),
            ("resume_use", true),
            ("withdraw", false),
        ];
        for (what, allow) in steps {
            let question = marketing.clone();
            let changed = match what {
                "consent" => rights
                    .set_consent(as_identity(consent.clone(), PRIVACY_OFFICE))
                    .await
                    .map(drop),
                "withdraw" => rights
                    .withdraw_consent(as_identity(consent.clone(), PRIVACY_OFFICE))
                    .await
                    .map(drop),
                "suspend_use" => rights
                    .suspend_use(as_identity(change.clone(), PRIVACY_OFFICE))
                    .await
                    .map(drop),
                _ => rights
                    .resume_use(as_identity(change.clone(), PRIVACY_OFFICE))
                    .await
                    .map(drop),
            };
            if let Err(status) = changed {
                tally.unanswered(&status, &format!("subject change {what} of {subject}"));
                break;
            }
            tally.subject_changes.fetch_add(1, Ordering::Relaxed);
            let mut request = tonic::Request::new(question.clone());
            request.set_timeout(CALL_TIMEOUT);
            match access.check(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    tally.checks.fetch_add(1, Ordering::Relaxed);
                    if answer.allowed != allow {
                        tally.wrong(format!(
                            "after {what} of {subject}: {} {} answered allowed={} ({:?})",
                            question.caller,
                            question.purpose,
                            answer.allowed,
                            answer.reasons.iter().map(|r| &r.code).collect::<Vec<_>>()
                        ));
                    }
                    let id = Some(answer.decision_id).filter(|id| !id.is_empty());
                    tally.id(id, "Check");
                }
                Err(status) => {
                    tally.unanswered(&status, "Check after a subject change");
                }
            }
        }
    }
}

/// Rewrites `policy.csv` with one more comment line every [`RELOAD_EVERY`]: a new version
/// that decides the same. Returns how many it wrote.
async fn reload_task(policy: PathBuf, until: Instant, every: Duration) -> u64 {
    let csv = policy.join("policy.csv");
    let original = std::fs::read_to_string(&csv).expect("policy.csv");
    let mut n = 0;
    while Instant::now() + every < until {
        tokio::time::sleep(every).await;
        n += 1;
        // Whole, under a temporary name, then renamed: the watch never sees half a file.
        let tmp = csv.with_extension("csv.tmp");
        std::fs::write(&tmp, format!("{original}# soak reload {n}\n")).expect("write policy");
        std::fs::rename(&tmp, &csv).expect("rename policy");
    }
    n
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn soak(binary: &Path, duration: Duration) -> Result<bool, String> {
    let scratch = tempfile::tempdir().map_err(|e| format!("scratch directory: {e}"))?;
    let policy = scratch.path().join("policy");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("policy"),
        &policy,
    )
    .map_err(|e| format!("copy of policy/: {e}"))?;
    let config = scratch.path().join("pdgate.toml");
    std::fs::write(
        &config,
        format!("[admin]\nprivacy_office = [\"{PRIVACY_OFFICE}\"]\n"),
    )
    .map_err(|e| format!("{}: {e}", config.display()))?;
    let audit = scratch.path().join("audit");

    // The protected service, in this process.
    let upstream_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("upstream: {e}"))?;
    let upstream = upstream_listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(CustomerService::new().serve(upstream_listener, std::future::pending()));

    let data = free_port()?;
    let api = free_port()?;
    let log = scratch.path().join("pdgate.log");
    let mut child = Command::new(binary)
        .args(["serve", "--identity", "insecure-header"])
        .arg("--listen")
        .arg(data.to_string())
        .arg("--api-listen")
        .arg(api.to_string())
        .arg("--upstream")
        .arg(upstream.to_string())
        .arg("--policy")
        .arg(&policy)
        .arg("--audit")
        .arg(&audit)
        .arg("--subjects-store")
        .arg(scratch.path().join("subjects.db"))
        .arg("--config")
        .arg(&config)
        .env_remove("PDGATE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", binary.display()))?;
    let pid = child.id().ok_or("pdgate exited at once")?;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let channels = match wait_serving(&mut child, data).await {
        Ok(()) => {
            let mut channels = Vec::new();
            for _ in 0..CHANNELS {
                channels.push(endpoint(data).connect().await.map_err(|e| e.to_string())?);
            }
            channels
        }
        Err(e) => return Err(format!("{e}; its log:\n{}", log_text())),
    };
    let api_channel = endpoint(api).connect().await.map_err(|e| e.to_string())?;
    let rss_before = rss_kib(pid).unwrap_or(0);
    let started = Instant::now();
    let until = started + duration;
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for n in 0..WORKERS {
        tasks.push(tokio::spawn(worker(
            channels[n % CHANNELS].clone(),
            tally.clone(),
            until,
            n,
        )));
    }
    tasks.push(tokio::spawn(subjects_task(
        api_channel,
        tally.clone(),
        until,
    )));
    // A short run (test mode) rewrites the policy once, half-way.
    let every = RELOAD_EVERY.min(duration / 2);
    let reloader = tokio::spawn(reload_task(policy.clone(), until, every));
    println!(
        "pdgate soak: {} for {duration:?}, {WORKERS} data-plane workers over {CHANNELS} connections, \
         a subject task, a policy rewrite every {every:?}; RSS at serving {:.1} MiB",
        binary.display(),
        mib(rss_before)
    );
    // RSS: every second; the start is the first sample after the warm-up (a tenth of the run).
    let warm_up = duration / 10;
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let mut last_report = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep(SAMPLE_EVERY).await;
        if let Some(rss) = rss_kib(pid) {
            samples.push((started.elapsed(), rss));
        }
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = Instant::now();
            println!(
                "  {:>4.0} s: {} allowed, {} denied, {} streams, {} checks, RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                tally.allowed.load(Ordering::Relaxed),
                tally.denied.load(Ordering::Relaxed),
                tally.streams.load(Ordering::Relaxed),
                tally.checks.load(Ordering::Relaxed),
                samples.last().map_or(0.0, |s| mib(s.1)),
            );
        }
    }
    for task in tasks {
        task.await.map_err(|e| format!("task: {e}"))?;
    }
    let rewrites = reloader.await.map_err(|e| format!("reloader: {e}"))?;
    // The watch swaps the last rewrite in a moment after it was written.
    let mut reloads = reloads_counted(api).await.unwrap_or(0);
    let waited = Instant::now();
    while rewrites > 0 && reloads == 0 && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        reloads = reloads_counted(api).await.unwrap_or(0);
    }
    let elapsed = started.elapsed();

    // Stop pdgate the way an orchestrator does (SIGTERM), so it drains and closes the log.
    let stopped = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await
        .map_err(|e| format!("kill: {e}"))?;
    if !stopped.success() {
        return Err("could not signal pdgate".into());
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => return Err(format!("pdgate exited with {status}; log:\n{}", log_text())),
        Ok(Err(e)) => return Err(format!("waiting for pdgate: {e}")),
        Err(_) => return Err("pdgate did not stop within 30 s of SIGTERM".into()),
    }

    // The log: its chain, by `pdgate audit verify`; its decision ids, by the same reader.
    let verify = Command::new(binary)
        .args(["audit", "verify", "--audit"])
        .arg(&audit)
        .output()
        .await
        .map_err(|e| format!("pdgate audit verify: {e}"))?;
    let chain_ok = verify.status.success();
    let mut logged = HashSet::new();
    pdgate::audit::read::scan(&audit, &pdgate::audit::read::Filter::default(), |r| {
        logged.insert(r.body.decision_id);
        true
    })
    .map_err(|e| format!("reading the audit log: {e}"))?;
    let ids = std::mem::take(&mut *tally.ids.lock().unwrap());
    let lost: Vec<&String> = ids.iter().filter(|id| !logged.contains(*id)).collect();

    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let wrong = load(&tally.wrong);
    println!(
        "calls in {:.0} s: {} allowed, {} denied, {} streams ({} records), {} checks after {} subject changes; \
         {} not answered (shed or cut off: not decisions); {rewrites} policy rewrites, {reloads} reloads",
        elapsed.as_secs_f64(),
        load(&tally.allowed),
        load(&tally.denied),
        load(&tally.streams),
        load(&tally.stream_records),
        load(&tally.checks),
        load(&tally.subject_changes),
        load(&tally.unanswered),
    );
    println!("wrong decisions: {wrong}");
    for example in tally.wrong_examples.lock().unwrap().iter() {
        println!("  {example}");
    }
    println!(
        "lost records: {} of {} decision ids answered ({} records in the log; chain {})",
        lost.len(),
        ids.len(),
        logged.len(),
        if chain_ok { "verified" } else { "BROKEN" }
    );
    for id in lost.iter().take(10) {
        println!("  missing: {id}");
    }
    if !chain_ok {
        println!("{}", String::from_utf8_lossy(&verify.stdout));
    }
    let start = samples
        .iter()
        .find(|(at, _)| *at >= warm_up)
        .or(samples.first())
        .map_or(0, |s| s.1);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let end = samples.last().map_or(0, |s| s.1);
    let growth = |v: u64| {
        if start == 0 {
            0.0
        } else {
            v as f64 / start as f64 - 1.0
        }
    };
    let flat = growth(max) <= RSS_FLAT && growth(end) <= RSS_FLAT;
    println!(
        "RSS: {:.1} MiB at serving; start (after {warm_up:?} of warm-up) {:.1} MiB, max {:.1} MiB ({:+.1} %), end {:.1} MiB ({:+.1} %): {}",
        mib(rss_before),
        mib(start),
        mib(max),
        growth(max) * 100.0,
        mib(end),
        growth(end) * 100.0,
        if flat {
            "flat within 10 %"
        } else {
            "NOT flat within 10 %"
        }
    );
    let mut ok = wrong == 0 && lost.is_empty() && chain_ok;
    if rewrites > 0 && reloads == 0 {
        println!("{rewrites} policy rewrites and no reload: the watch did not swap them in");
        ok = false;
    }
    if load(&tally.allowed) == 0 || load(&tally.denied) == 0 {
        println!("no allowed or no denied call was answered: the run shows nothing");
        ok = false;
    }
    // A short run's warm-up is seconds: its RSS is not a steady state, so flatness is judged
    // on runs of a minute or more.
    if duration >= Duration::from_secs(60) && !flat {
        ok = false;
    }
    println!("{}", if ok { "soak: ok" } else { "soak: FAILED" });
    Ok(ok)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
}

fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// Waits until an allowed call through pdgate succeeds.
async fn wait_serving(child: &mut Child, data: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("pdgate exited with {status}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("pdgate did not serve within {STARTUP_TIMEOUT:?}"));
        }
        if let Ok(channel) = endpoint(data).connect().await {
            let request = call(
                GetBillingStatementRequest {
                    customer_id: "cust-1".into(),
                    month: String::new(),
                },
                "billing-service",
                "service.billing",
                &["cust-1"],
            );
            match CustomerDataClient::new(channel)
                .get_billing_statement(request)
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == Code::Unavailable => {}
                Err(s) => return Err(format!("the first allowed call failed: {s:?}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `pdgate_policy_reloads_total` from `/metrics`.
async fn reloads_counted(api: SocketAddr) -> Result<u64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(api)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: pdgate\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.strip_prefix("pdgate_policy_reloads_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| "no pdgate_policy_reloads_total in /metrics".to_owned())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
