//! Subject-registry benchmark: what reading a subject's state costs on the decision path, from
//! the sidecar's versioned cache (`SubjectCache`: a hit, and a miss that reads the store) and
//! from the store itself (SQLite; PostgreSQL too when `PDGATE_TEST_DATABASE_URL` reaches one),
//! what a change costs, and (PostgreSQL) how long a change made through one sidecar's cache
//! takes to reach another's by NOTIFY. Prints the figures; asserts nothing.
//!
//!     cargo bench --bench registry
//!
//! `PDGATE_BENCH_SUBJECTS` (default 10 000) subjects are stored, each with a few consents.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark whose setup fails should abort"
)]

use pdgate::registry::{
    Action, Change, PostgresRegistry, Preloaded, SqliteRegistry, SubjectCache,
    SubjectCacheSettings, SubjectRecord, SubjectRegistry,
};
use pdgate::subjects::SubjectStates;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use std::hint::black_box;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn subject(i: usize) -> String {
    format!("cust-{i}")
}

async fn fill(registry: &dyn SubjectRegistry, subjects: usize) {
    for i in 0..subjects {
        for purpose in ["marketing", "service.support"] {
            registry
                .apply(&Change {
                    subject: subject(i),
                    action: Action::Consent {
                        purpose: purpose.into(),
                        communications: false,
                    },
                    actor: "bench".into(),
                    source: None,
                })
                .await
                .unwrap();
        }
    }
}

struct Latencies(Vec<Duration>);

impl Latencies {
    fn report(mut self, what: &str) {
        self.0.sort_unstable();
        let n = self.0.len();
        let at = |q: f64| self.0[((n as f64 * q) as usize).min(n - 1)];
        let mean = self.0.iter().sum::<Duration>() / n as u32;
        println!(
            "{what:<46} mean {:>9.1?}  p50 {:>9.1?}  p99 {:>9.1?}  ({n} samples)",
            mean,
            at(0.50),
            at(0.99)
        );
    }
}

/// Reads random stored subjects one after the other.
async fn reads(registry: &dyn SubjectRegistry, subjects: usize, n: usize) -> Latencies {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let s = subject((i * 7919) % subjects);
        let started = Instant::now();
        black_box(registry.get(&s).await.unwrap());
        out.push(started.elapsed());
    }
    Latencies(out)
}

/// Reads from `tasks` concurrent tasks; returns reads per second.
async fn concurrent_reads(
    registry: Arc<dyn SubjectRegistry>,
    subjects: usize,
    tasks: usize,
    per_task: usize,
) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let registry = registry.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    let s = subject((t * 104_729 + i * 7919) % subjects);
                    black_box(registry.get(&s).await.unwrap());
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    (tasks * per_task) as f64 / started.elapsed().as_secs_f64()
}

async fn writes(registry: &dyn SubjectRegistry, n: usize) -> Latencies {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let change = Change {
            subject: "cust-written".into(),
            action: if i % 2 == 0 {
                Action::SuspendUse
            } else {
                Action::ResumeUse
            },
            actor: "bench".into(),
            source: Some(format!("REQ-{i}")),
        };
        let started = Instant::now();
        black_box(registry.apply(&change).await.unwrap());
        out.push(started.elapsed());
    }
    Latencies(out)
}

/// The whole read path of `pdgate check`: read one subject's state, then answer the decision's
/// synchronous lookup from it.
async fn preloads(registry: &dyn SubjectRegistry, subjects: usize, n: usize) -> Latencies {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let names = [subject((i * 7919) % subjects)];
        let started = Instant::now();
        let loaded = Preloaded::load(registry, &names).await;
        black_box(loaded.state(&names[0]).unwrap());
        out.push(started.elapsed());
    }
    Latencies(out)
}

/// Lookups in a cache that holds every subject: per lookup, over `n` lookups.
fn cache_hits(records: &[(String, Arc<SubjectRecord>)], n: usize) -> (Duration, Duration) {
    let sync: moka::sync::Cache<String, Arc<SubjectRecord>> = moka::sync::Cache::new(100_000);
    let future: moka::future::Cache<String, Arc<SubjectRecord>> = moka::future::Cache::new(100_000);
    for (k, v) in records {
        sync.insert(k.clone(), v.clone());
    }
    let started = Instant::now();
    for i in 0..n {
        let (k, _) = &records[(i * 7919) % records.len()];
        black_box(sync.get(k.as_str()).unwrap());
    }
    let sync_per = started.elapsed() / n as u32;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let future_per = rt.block_on(async {
        for (k, v) in records {
            future.insert(k.clone(), v.clone()).await;
        }
        let started = Instant::now();
        for i in 0..n {
            let (k, _) = &records[(i * 7919) % records.len()];
            black_box(future.get(k.as_str()).await.unwrap());
        }
        started.elapsed() / n as u32
    });
    (sync_per, future_per)
}

/// The decision path through the sidecar's cache: on a hit, the synchronous lookup a decision
/// makes; on a miss, reading the subject from the store into the cache, then the lookup.
async fn cache_path(
    registry: Arc<dyn SubjectRegistry>,
    subjects: usize,
    n: usize,
) -> (Latencies, Latencies) {
    let settings = SubjectCacheSettings {
        // No change feed runs here: keep entries answerable for the whole run.
        stale_after: Duration::from_secs(3600),
        refresh_after: Duration::from_secs(3600),
        ..SubjectCacheSettings::default()
    };
    let cache = SubjectCache::new(registry, settings);
    let n = n.min(subjects);
    let mut misses = Vec::with_capacity(n);
    for i in 0..n {
        let names = [subject(i)];
        let started = Instant::now();
        if cache.needs_load(&names[0]) {
            cache.load(&names).await;
        }
        black_box(cache.state(&names[0]).unwrap());
        misses.push(started.elapsed());
    }
    let mut hits = Vec::with_capacity(200_000);
    for i in 0..200_000 {
        let name = subject((i * 7919) % n);
        let started = Instant::now();
        black_box(cache.state(&name).unwrap());
        hits.push(started.elapsed());
    }
    (Latencies(hits), Latencies(misses))
}

async fn bench_store(name: &str, registry: Arc<dyn SubjectRegistry>, subjects: usize) {
    let started = Instant::now();
    fill(registry.as_ref(), subjects).await;
    println!(
        "{name}: stored {subjects} subjects ({} changes) in {:.1?}",
        subjects * 2,
        started.elapsed()
    );
    reads(registry.as_ref(), subjects, 20_000)
        .await
        .report(&format!("{name} get (read from the store)"));
    preloads(registry.as_ref(), subjects, 20_000)
        .await
        .report(&format!("{name} check path (Preloaded::load + state)"));
    let (hits, misses) = cache_path(registry.clone(), subjects, 5_000).await;
    hits.report(&format!("{name} decision path, cache hit"));
    misses.report(&format!("{name} decision path, cache miss (load + state)"));
    for tasks in [1, 8, 64] {
        let rate = concurrent_reads(registry.clone(), subjects, tasks, 20_000 / tasks).await;
        println!(
            "{name} get from {tasks:>2} concurrent tasks{:>14} {rate:>9.0} reads/s",
            ""
        );
    }
    writes(registry.as_ref(), 500)
        .await
        .report(&format!("{name} apply (one change, committed)"));
    registry.close().await;
}

/// Criterion's test mode, which CI runs (`cargo test --benches`: no `--bench` flag) to check
/// that the benchmark still runs: once, on a small input, nothing measured.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench")
}

fn main() {
    let subjects: usize = std::env::var("PDGATE_BENCH_SUBJECTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if test_mode() { 200 } else { 10_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("subject registry, {subjects} subjects\n");

    let records: Vec<(String, Arc<SubjectRecord>)> = (0..subjects)
        .map(|i| {
            let mut record = SubjectRecord::default();
            record.state.consent = ["marketing".into(), "service.support".into()].into();
            record.version = 2;
            (subject(i), Arc::new(record))
        })
        .collect();
    let (sync, future) = cache_hits(&records, 2_000_000);
    println!(
        "{:<46} {sync:>9.1?} per lookup (moka::sync, as the decision path reads)",
        "cache hit"
    );
    println!(
        "{:<46} {future:>9.1?} per lookup (moka::future)\n",
        "cache hit"
    );

    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let sqlite = SqliteRegistry::open(&dir.path().join("subjects.db"))
            .await
            .unwrap();
        bench_store("sqlite", Arc::new(sqlite), subjects).await;
    });
    println!();

    let url = std::env::var("PDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    rt.block_on(async {
        let base = PgConnectOptions::from_str(&url).unwrap();
        let Ok(mut admin) = PgConnection::connect_with(&base).await else {
            println!("postgres: not reachable at {url}; skipped");
            return;
        };
        let schema = format!("pdgate_bench_{}", std::process::id());
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(base.options([("search_path", &schema)]))
            .await
            .unwrap();
        let pg = PostgresRegistry::from_pool(pool).await.unwrap();
        // Fewer subjects: each change is a round trip to the server.
        bench_store("postgres", Arc::new(pg), subjects.min(2_000)).await;
        let sep = if url.contains('?') { '&' } else { '?' };
        propagation(
            &format!("{url}{sep}options=-c%20search_path%3D{schema}"),
            50,
        )
        .await;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut admin)
            .await
            .unwrap();
    });
}

/// Two sidecars' caches on one database, each with its NOTIFY listener: the delay between a
/// change applied through the first and the second answering the new state, over `n` changes.
async fn propagation(url: &str, n: usize) {
    let open = || {
        let store =
            PostgresRegistry::connect_lazy(url, Duration::from_secs(2), Duration::from_secs(1))
                .unwrap();
        let cache = Arc::new(SubjectCache::new(
            Arc::new(store.clone()),
            SubjectCacheSettings::default(),
        ));
        let feed = cache.spawn_postgres_feed(store);
        (cache, feed)
    };
    let (one, feed_one) = open();
    let (two, feed_two) = open();
    let name = format!("propagation-{}", std::process::id());
    let names = [name.clone()];
    // Let both listeners connect (each drops its cache when it does).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut delays = Vec::with_capacity(n);
    let mut after_commit = Vec::with_capacity(n);
    for i in 0..n {
        let consented = i % 2 == 0;
        let purpose = "marketing".to_owned();
        let action = if consented {
            Action::Consent {
                purpose,
                communications: false,
            }
        } else {
            Action::Withdraw {
                purpose,
                communications: false,
            }
        };
        // Sidecar 2 holds the old state.
        two.load(&names).await;
        let change = Change {
            subject: name.clone(),
            action,
            actor: "bench".into(),
            source: None,
        };
        let started = Instant::now();
        one.apply(&change).await.unwrap();
        let committed = Instant::now();
        loop {
            if two.needs_load(&name) {
                two.load(&names).await;
            }
            let now = two.state(&name).ok().flatten();
            if now.is_some_and(|s| s.consent.contains("marketing") == consented) {
                break;
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        delays.push(started.elapsed());
        after_commit.push(committed.elapsed());
    }
    Latencies(delays).report("postgres change via sidecar 1 seen by sidecar 2 (from apply)");
    Latencies(after_commit).report("  the same, from the apply's return (commit)");
    feed_one.abort();
    feed_two.abort();
}
