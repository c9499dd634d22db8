//! Decision cost as the policy grows: the cached path (`decide/hit`), the uncached path
//! (`decide/miss`: resolve + evaluate + finish), plain casbin on the same request
//! (`casbin/enforce`), compiling a policy (`reload`), and what a shadow policy adds to a
//! decision (`shadow/hit/none`: no shadow loaded, one atomic load; `shadow/hit/loaded`: every
//! decision also made under the shadow, from the same cache).
//!
//! Every point uses the same request, decided the same way at every size: the default policy,
//! then the default policy grown to about 1k, 10k and 100k grant rows by
//! `synthetic::scaled_default` (which leaves the default callers and rules unchanged).
//!
//! Run with `cargo bench --bench decision`.

// A benchmark whose setup fails (policy does not compile, request not allowed) measures
// nothing useful: aborting with a message is the right reaction, so `expect` is allowed here.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use casbin::Enforcer;
use criterion::{BatchSize, Criterion, SamplingMode, criterion_group, criterion_main};
use pdgate::decision::{CacheSettings, Decider, Request};
use pdgate::policy::{self, PolicySource, Snapshot, reference, synthetic};
use pdgate::subjects::{InMemorySubjects, SubjectState};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

/// Seed of the generated rows: fixed, so every run measures the same policies.
const SEED: u64 = 0x5eed;

/// Generated policy sizes (grant rows added to the default policy) and their labels.
const SIZES: [(usize, &str); 3] = [(1_000, "1k"), (10_000, "10k"), (100_000, "100k")];

const CALLER: &str = "billing-service";
const PURPOSE: &str = "service.billing";
const ACTION: &str = "read";
const CATEGORY: &str = "customer.billing";
const SUBJECT: &str = "cust-1";

fn request() -> Request {
    Request {
        caller: CALLER.to_owned(),
        purpose: PURPOSE.to_owned(),
        action: ACTION.to_owned(),
        categories: vec![CATEGORY.to_owned()],
        subjects: vec![SUBJECT.to_owned()],
        recipient: None,
        minimizable: Vec::new(),
    }
}

fn subjects() -> InMemorySubjects {
    let subjects = InMemorySubjects::new();
    subjects.set(SUBJECT, SubjectState::default());
    subjects
}

fn default_snapshot(rt: &Runtime) -> Snapshot {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    rt.block_on(policy::load_dir(&dir))
        .expect("the default policy in policy/ compiles")
}

fn scaled_source(base: &Snapshot, rows: usize) -> PolicySource {
    synthetic::scaled_default(base.source(), rows, SEED)
}

/// One policy, ready to be measured: the decider (cache warmed for the request) and the
/// casbin reference built from the same snapshot.
struct Fixture {
    label: &'static str,
    rows: usize,
    decider: Decider,
    enforcer: Enforcer,
}

impl Fixture {
    fn new(
        rt: &Runtime,
        label: &'static str,
        snapshot: Snapshot,
        subjects: &InMemorySubjects,
    ) -> Self {
        let enforcer = rt
            .block_on(reference::enforcer(&snapshot))
            .expect("casbin builds an enforcer from the snapshot");
        let rows = snapshot.rows().grants.len();
        let decider = Decider::with_policy(Arc::new(snapshot), CacheSettings::default());
        let request = request();

        // The request must be allowed, by the cache, by the uncached path and by casbin alike:
        // otherwise the three points would not measure the same work.
        let first = decider.decide(&request, subjects);
        assert!(
            first.allowed,
            "{label}: request denied: {:?}",
            first.reasons
        );
        let warm = decider.decide(&request, subjects);
        assert!(
            warm.allowed && warm.cache_hit,
            "{label}: warm decision is not a cache hit"
        );
        let fresh = decider.decide_uncached(&request, subjects);
        assert!(
            fresh.allowed && !fresh.cache_hit,
            "{label}: uncached decision differs"
        );
        let casbin = reference::enforce(&enforcer, CALLER, PURPOSE, CATEGORY, ACTION)
            .expect("casbin evaluates the request");
        assert!(casbin, "{label}: casbin denies the request");

        Self {
            label,
            rows,
            decider,
            enforcer,
        }
    }
}

fn bench_fixture(c: &mut Criterion, fixture: &Fixture, subjects: &InMemorySubjects) {
    let request = request();
    let label = fixture.label;
    eprintln!("policy {label}: {} grant rows", fixture.rows);

    // Cached and uncached decisions: microseconds, criterion's default settings.
    let mut group = c.benchmark_group("decide");
    group.bench_function(format!("hit/{label}"), |b| {
        b.iter(|| fixture.decider.decide(black_box(&request), subjects));
    });
    group.bench_function(format!("miss/{label}"), |b| {
        b.iter(|| {
            fixture
                .decider
                .decide_uncached(black_box(&request), subjects)
        });
    });
    group.finish();

    // casbin scans every row per call: from ~0.1 ms on the default policy to many ms at 100k
    // rows. Few flat samples for the large policies keep the whole bench short.
    let mut group = c.benchmark_group("casbin");
    if fixture.rows > 5_000 {
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
    }
    group.bench_function(format!("enforce/{label}"), |b| {
        b.iter(|| {
            reference::enforce(
                &fixture.enforcer,
                black_box(CALLER),
                black_box(PURPOSE),
                black_box(CATEGORY),
                black_box(ACTION),
            )
        });
    });
    group.finish();
}

fn decision(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let subjects = subjects();
    let base = default_snapshot(&rt);
    let base_source = base.source().clone();

    // The default policy first, then each generated size; one fixture alive at a time.
    let fixture = Fixture::new(&rt, "default", base, &subjects);
    bench_fixture(c, &fixture, &subjects);
    drop(fixture);

    let base = rt
        .block_on(policy::compile(base_source))
        .expect("the default policy compiles");
    for (rows, label) in SIZES {
        let snapshot = rt
            .block_on(policy::compile(scaled_source(&base, rows)))
            .expect("the generated policy compiles");
        let fixture = Fixture::new(&rt, label, snapshot, &subjects);
        bench_fixture(c, &fixture, &subjects);
    }
}

/// Compiling a policy from its text: what a reload costs before the new snapshot is swapped in.
fn reload(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let base = default_snapshot(&rt);
    let mut group = c.benchmark_group("reload");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for (rows, label) in SIZES {
        let source = scaled_source(&base, rows);
        group.bench_function(label, |b| {
            b.iter_batched(
                || source.clone(),
                |source| {
                    rt.block_on(policy::compile(source))
                        .expect("the generated policy compiles")
                },
                // The snapshot is dropped outside the measurement.
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

/// The cost of a shadow policy on the cached path, default policy: none loaded (the path
/// every sidecar takes unless the security team loads one) and one loaded (a second version of
/// the same rules, so both decide alike and the comparison is the whole extra cost).
fn shadow(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let subjects = subjects();
    let base = default_snapshot(&rt);
    let mut shadow_source = base.source().clone();
    shadow_source
        .policy
        .push_str("\n# shadow: same rules, another version\n");
    let shadow = rt
        .block_on(policy::compile(shadow_source))
        .expect("the shadow compiles");
    let decider = Decider::with_policy(Arc::new(base), CacheSettings::default());
    let request = request();
    let mut group = c.benchmark_group("shadow");
    assert!(decider.decide(&request, &subjects).allowed);
    group.bench_function("hit/none", |b| {
        b.iter(|| decider.decide(black_box(&request), &subjects));
    });
    decider.set_shadow(Arc::new(shadow));
    let decision = decider.decide(&request, &subjects);
    assert!(decision.allowed && decision.shadow_allowed.is_none());
    group.bench_function("hit/loaded", |b| {
        b.iter(|| decider.decide(black_box(&request), &subjects));
    });
    group.finish();
}

criterion_group!(benches, decision, reload, shadow);
criterion_main!(benches);
