//! Audit-trail benchmark: sustained write throughput (concurrent writers, each waiting for its
//! record to be written, as calls do), verify speed, and query by subject and by decision id
//! without and with the segment indexes, over a log of `PDGATE_AUDIT_RECORDS` records (default
//! 1 000 000). Prints the figures; asserts only that both ways find the same records.
//!
//!     cargo bench --bench audit

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark whose setup fails should abort"
)]

use pdgate::audit::read::{self, Access, Filter};
use pdgate::audit::{AuditLog, AuditSettings, Fsync, RecordBody};
use std::time::{Duration, Instant};

fn body(i: u64) -> RecordBody {
    RecordBody {
        time_us: 1_700_000_000_000_000 + i,
        decision_id: format!("{i:032x}"),
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        method: Some("/demo.customer.v1.CustomerData/GetBillingStatement".into()),
        categories: vec!["customer.billing".into()],
        subjects: vec![format!("cust-{}", i % 100_000)],
        decision: "allow".into(),
        matched_rules: vec!["policy.csv:66".into()],
        policy_version: Some(
            "45500195206fc3c5772458e7ad7a2c52c5c2d46cf5c1fc7ba1d39b05ae1439c6".into(),
        ),
        latency_us: 12,
        ..RecordBody::default()
    }
}

/// Writes `n` records from `writers` concurrent tasks; returns records per second.
async fn write(dir: &std::path::Path, fsync: Fsync, n: u64, writers: u64) -> f64 {
    let mut settings = AuditSettings::new(dir);
    settings.fsync = fsync;
    let (log, writer, _) = AuditLog::open(settings).unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut i = w;
                while i < n {
                    log.record(body(i)).await.unwrap();
                    i += writers;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    drop(log);
    writer.close().await;
    n as f64 / elapsed.as_secs_f64()
}

/// Criterion's test mode, which CI runs (`cargo test --benches`: no `--bench` flag) to check
/// that the benchmark still runs: once, on a small input, nothing measured.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench")
}

fn main() {
    let n: u64 = std::env::var("PDGATE_AUDIT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if test_mode() { 2_000 } else { 1_000_000 });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        println!(
            "audit benchmark, {n} records, {} cores",
            std::thread::available_parallelism().map_or(1, |p| p.get())
        );
        let small = tempfile::tempdir().unwrap();
        let rate = write(small.path(), Fsync::EveryBatch, n.min(200_000), 256).await;
        println!("write, fsync every batch, 256 writers: {rate:>10.0} records/s");
        let dir = tempfile::tempdir().unwrap();
        let rate = write(
            dir.path(),
            Fsync::Interval(Duration::from_millis(100)),
            n,
            256,
        )
        .await;
        println!(
            "write, fsync every 100 ms, 256 writers: {rate:>10.0} records/s (target >= 100000)"
        );
        let bytes: u64 = pdgate::audit::segment_paths(dir.path())
            .unwrap()
            .iter()
            .map(|(_, p)| std::fs::metadata(p).unwrap().len())
            .sum();
        println!(
            "log size: {:.0} MiB, {:.0} bytes per record",
            bytes as f64 / 1048576.0,
            bytes as f64 / n as f64
        );

        let started = Instant::now();
        let v = read::verify(dir.path()).unwrap();
        assert!(v.ok() && v.records == n);
        println!(
            "verify {n} records: {:?} (target <= 5 s for 1M)",
            started.elapsed()
        );

        // Query by subject: a full scan (memchr pre-filter, every segment read), then through
        // the sealed segments' indexes (built by the writer's maintenance thread; the active
        // segment is still scanned). Same log, same run; each the best of 5.
        let filter = Filter {
            subject: Some("cust-4242".into()),
            ..Filter::default()
        };
        let segments = pdgate::audit::segment_paths(dir.path()).unwrap();
        let indexed = segments
            .iter()
            .filter(|(_, p)| pdgate::audit::index::summary_of(p).is_some())
            .count();
        println!(
            "segments: {}, {indexed} indexed (the last is the active one)",
            segments.len()
        );
        let time = |access: Access, filter: &Filter| {
            let mut best = Duration::MAX;
            let mut found = 0;
            for _ in 0..5 {
                let started = Instant::now();
                found = 0;
                read::scan_lines(dir.path(), filter, access, 0, |_, _| {
                    found += 1;
                    true
                })
                .unwrap();
                best = best.min(started.elapsed());
            }
            (best, found)
        };
        let (scan, scanned) = time(Access::Scan, &filter);
        let (index, found) = time(Access::Indexed, &filter);
        assert_eq!(scanned, found);
        println!(
            "query by subject over {n} records: full scan {scan:?}, with the index {index:?}, {found} found (target <= 100 ms for 1M)"
        );
        let by_id = Filter {
            decision_id: Some(format!("{:032x}", n / 3)),
            ..Filter::default()
        };
        let (scan, _) = time(Access::Scan, &by_id);
        let (index, found) = time(Access::Indexed, &by_id);
        println!(
            "query by decision id over {n} records: full scan {scan:?}, with the index {index:?}, {found} found"
        );
        if let Some((_, first)) = segments.first() {
            let bytes = std::fs::metadata(first).unwrap().len();
            let started = Instant::now();
            pdgate::audit::index::build(first).unwrap();
            println!(
                "index build of one sealed segment ({:.0} MiB): {:?} (in the background, off the writer's path)",
                bytes as f64 / 1048576.0,
                started.elapsed()
            );
        }
    });
}
