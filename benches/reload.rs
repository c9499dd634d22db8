//! Reload cost as the policy grows: a whole reload as the file watch and `PolicyAdmin` Apply
//! run it (`reload/full`: compile + validate, the policy's own tests, swap), and its parts
//! (`reload/compile`, `reload/tests`). Target: a full reload of a 10k-rule policy in at most
//! 200 ms.
//!
//! The policies are the default policy grown to about 1k, 10k and 100k grant rows by
//! `synthetic::scaled_default`, with the default policy's tests (`policy/tests/*.yaml`,
//! which still pass: the generated rows belong to generated callers). Each iteration applies
//! the other of two versions of the same size, so that every reload really swaps.
//!
//! Run with `cargo bench --bench reload`.

// A benchmark whose setup fails measures nothing useful: aborting with a message is the right
// reaction, so `expect` is allowed here.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use pdgate::decision::{CacheSettings, Decider};
use pdgate::gate::bundle::{self, read_tests};
use pdgate::gate::{Bundle, Origin, PolicyManager};
use pdgate::policy::{PolicySource, synthetic};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

const SIZES: [(usize, &str); 3] = [(1_000, "1k"), (10_000, "10k"), (100_000, "100k")];

fn bundles(rows: usize) -> [Bundle; 2] {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    let base = PolicySource::read_dir(&dir).expect("the default policy reads");
    let tests = read_tests(&dir.join("tests")).expect("the default tests read");
    [1, 2].map(|seed| Bundle {
        source: synthetic::scaled_default(&base, rows, seed),
        tests: tests.clone(),
    })
}

fn reload(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let mut group = c.benchmark_group("reload");
    group.sampling_mode(SamplingMode::Flat);
    for (rows, label) in SIZES {
        let pair = bundles(rows);
        let (samples, time) = if rows >= 100_000 {
            (10, Duration::from_secs(20))
        } else {
            (10, Duration::from_secs(5))
        };
        group.sample_size(samples).measurement_time(time);

        let decider = Arc::new(Decider::new(CacheSettings::default()));
        let manager = PolicyManager::in_memory(decider.clone(), 10, None);
        rt.block_on(manager.apply(pair[1].clone(), Origin::File, "setup"))
            .expect("the generated policy passes its tests");
        let mut next = 0;
        group.bench_function(format!("full/{label}"), |b| {
            b.iter(|| {
                let applied = rt
                    .block_on(manager.apply(pair[next].clone(), Origin::File, "bench"))
                    .expect("reload");
                assert!(applied.changed);
                next = 1 - next;
                black_box(applied)
            });
        });

        group.bench_function(format!("compile/{label}"), |b| {
            b.iter(|| rt.block_on(pdgate::policy::compile(pair[0].source.clone())))
        });

        let tests_only = Bundle {
            source: pair[0].source.clone(),
            tests: pair[0].tests.clone(),
        };
        group.bench_function(format!("compile_and_tests/{label}"), |b| {
            b.iter(|| rt.block_on(bundle::check(&tests_only)).expect("passes"))
        });
    }
    group.finish();
}

criterion_group!(benches, reload);
criterion_main!(benches);
