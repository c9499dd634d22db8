//! Load harness: N concurrent clients making unary `GetBillingStatement` calls for a fixed
//! time against several targets, in the same run, so the sidecar is measured against what it
//! stands in front of:
//!
//! - `(a) direct`: the demo customer-data service, served in this process;
//! - `(b) baseline`: pdgate's forwarding path with authorization left out — a tonic server
//!   (the data plane's builder) whose service is pdgate's upstream `Channel`. It exists only
//!   here, never in `src/`, and runs as a child process (this binary re-executed with
//!   `PDGATE_LOAD_BASELINE_LISTEN` / `PDGATE_LOAD_UPSTREAM`) so it pays what pdgate pays;
//! - `(h) hyper-util client`: the same, forwarding with a candidate leaner forwarder
//!   (hyper-util's pooled client, `load/hyper.rs`), for the target that compares forwarders;
//! - `(c) pdgate`: the real `target/release/pdgate serve` as a child process, with the
//!   durable default (`[audit] fsync = "batch"`);
//! - `(d) pdgate fsync=interval`: a second `pdgate serve`, with `[audit] fsync = "interval"`;
//! - `(e) Check API`: `AccessControl.Check` on `(c)`'s API port (the durable default; two
//!   categories, one subject, allowed);
//! - with `PDGATE_LOAD_REFERENCE=/path/to/pdgate`: `(r)` another build (the previous commit's,
//!   say) measured on its data plane and its Check API in the same run, which the targets
//!   that compare with "today's" pdgate need.
//!
//! Then a server-streaming run (issue #12's target, see `load/stream.rs`): one client reads
//! streams of 1 KiB messages directly, through the baseline, and through pdgate on a route
//! that decides each message's subject (`records`) and on one that clears a field of each
//! message (`minimize`, a third `pdgate serve` on a policy copy).
//!
//! Before the runs, the harness measures `fdatasync` of one audit-record-sized append on the
//! file system of the audit directories (p50, p99): a target allows for it.
//!
//! For each concurrency level the targets run back to back, so the noise of this shared
//! machine falls on them alike. Each run warms up for 1 s, then measures for the duration;
//! every latency is kept (µs, one `Vec` per client task) and sorted for the percentiles.
//! The issue's targets are printed next to the measurements, not asserted: one noisy run must
//! not fail a build. An error through pdgate is a correctness failure (the call is allowed by
//! the policy) and makes the run exit non-zero.
//!
//! Last, a reload run: pdgate under load at the highest concurrency while its policy
//! directory (a temporary copy of `policy/`) is rewritten every `RELOAD_EVERY`, each time to a
//! new version that decides the same; the file watch swaps every one in. Any failed or denied
//! call of that run is a wrongly decided call, and makes the run exit non-zero too.
//!
//! Run with:
//!
//! ```text
//! cargo build --release --bin pdgate && cargo bench --bench load
//! PDGATE_LOAD_CONCURRENCY=1,16,64 PDGATE_LOAD_SECONDS=5 cargo bench --bench load
//! PDGATE_LOAD_BINARY=/path/to/another/pdgate cargo bench --bench load   # another build
//! PDGATE_LOAD_REFERENCE=/path/to/old/pdgate cargo bench --bench load     # A/B in one run
//! PDGATE_LOAD_ONLY=c PDGATE_LOAD_SECONDS=20 cargo bench --bench load  # one target (profiling)
//! ```

// The harness aborts with a message when its setup fails (no runtime, no loopback socket):
// there is nothing useful to measure then.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "a load harness whose setup fails has nothing to measure: abort with the message"
)]

#[path = "load/hyper.rs"]
mod hyper;
#[path = "load/stream.rs"]
mod stream;

use pdgate::proto::demo::GetBillingStatementRequest;
use pdgate::proto::demo::customer_data_client::CustomerDataClient;
use pdgate::proto::v1::CheckRequest;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// Set in the re-executed child: serve the baseline forwarder on this address, and nothing else.
const BASELINE_LISTEN_ENV: &str = "PDGATE_LOAD_BASELINE_LISTEN";
/// Set in the re-executed child: the upstream the baseline forwards to.
const UPSTREAM_ENV: &str = "PDGATE_LOAD_UPSTREAM";
/// Set in the re-executed child to `hyper`: forward with the candidate forwarder
/// (`load/hyper.rs`) instead of pdgate's upstream `Channel`.
const BASELINE_CLIENT_ENV: &str = "PDGATE_LOAD_BASELINE_CLIENT";
const CONCURRENCY_ENV: &str = "PDGATE_LOAD_CONCURRENCY";
/// Another pdgate build measured in the same run (data plane and Check API).
const REFERENCE_ENV: &str = "PDGATE_LOAD_REFERENCE";
const SECONDS_ENV: &str = "PDGATE_LOAD_SECONDS";
/// Only these runs, by their letters (`a,c`: direct and pdgate; `s`: the streaming run,
/// `reload`: the reload run), e.g. to profile one target; every run when unset.
const ONLY_ENV: &str = "PDGATE_LOAD_ONLY";

const DEFAULT_CONCURRENCY: [usize; 3] = [1, 16, 64];
const DEFAULT_SECONDS: f64 = 5.0;
const WARMUP: Duration = Duration::from_secs(1);
/// Client tasks per HTTP/2 connection: a small pool, as a real client would keep.
const TASKS_PER_CHANNEL: usize = 8;
/// pdgate sheds calls beyond `--max-concurrent-calls`; the harness stays well under it.
const MAX_CONCURRENT_CALLS: usize = 4096;
/// A call that takes longer than this counts as an error (and the loop goes on).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a child gets to start serving.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Concurrency at which the latency ratios and the throughput ratio are taken.
const LATENCY_CONCURRENCY: usize = 1;
/// How often the reload run rewrites the policy directory (the watch's debounce is 500 ms, so
/// each change is swapped in about one second later).
const RELOAD_EVERY: Duration = Duration::from_millis(1500);
const THROUGHPUT_CONCURRENCY: usize = 64;

/// Appends and syncs of the fsync measurement, at most; it stops after `FSYNC_TIME` (a busy
/// disk can take seconds per sync) once it has `FSYNC_MIN_SAMPLES`.
const FSYNC_SAMPLES: usize = 2000;
const FSYNC_MIN_SAMPLES: usize = 50;
const FSYNC_TIME: Duration = Duration::from_secs(3);
/// Bytes of one append in the fsync measurement: about one audit record.
const RECORD_BYTES: usize = 630;

// The targets of issue #13, printed next to the measurements.
/// 1. c=64, durable default: pdgate's calls/s at least this share of the baseline's.
const TARGET_THROUGHPUT_RATIO: f64 = 0.90;
/// 2. c=1, `fsync = "interval"`: p50 and p99 added over the baseline's, at most.
const TARGET_INTERVAL_P50_ADDED_US: f64 = 60.0;
const TARGET_INTERVAL_P99_ADDED_US: f64 = 250.0;
/// 3. c=1, durable default, a read: p50 added over the baseline's at most this plus
///    max(0, fsync p50 − direct p50) (the sync overlapped with the upstream call).
const TARGET_DURABLE_P50_SLACK_US: f64 = 60.0;
/// 4. pdgate's forwarder adds at most this share of what tonic's `Channel` adds over direct.
const TARGET_FORWARDER_SHARE: f64 = 0.60;
/// 5. Check API calls/s against the reference build's: at c=1, at c=64.
const TARGET_CHECK_GAIN_C1: f64 = 3.0;
const TARGET_CHECK_GAIN_C64: f64 = 1.5;
/// 6. RSS during the c=64 run, at most.
const TARGET_RSS_MIB: f64 = 30.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Baseline,
    HyperBaseline,
    Pdgate,
    PdgateInterval,
    Check,
    Reference,
    ReferenceCheck,
}

/// Which API a target's clients call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `CustomerData.GetBillingStatement` (a read route).
    Data,
    /// `AccessControl.Check`.
    Check,
}

impl Target {
    const ALL: [Self; 8] = [
        Self::Direct,
        Self::Baseline,
        Self::HyperBaseline,
        Self::Pdgate,
        Self::PdgateInterval,
        Self::Check,
        Self::Reference,
        Self::ReferenceCheck,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "(a) direct",
            Self::Baseline => "(b) baseline",
            Self::HyperBaseline => "(h) hyper-util client",
            Self::Pdgate => "(c) pdgate",
            Self::PdgateInterval => "(d) pdgate interval",
            Self::Check => "(e) Check API",
            Self::Reference => "(r) reference",
            Self::ReferenceCheck => "(r) reference Check",
        }
    }

    /// The letter [`ONLY_ENV`] names it by.
    fn letter(self) -> &'static str {
        match self {
            Self::Reference | Self::ReferenceCheck => "r",
            other => &other.label()[1..2],
        }
    }

    fn api(self) -> Api {
        match self {
            Self::Check | Self::ReferenceCheck => Api::Check,
            _ => Api::Data,
        }
    }
}

struct Settings {
    concurrency: Vec<usize>,
    duration: Duration,
    /// [`ONLY_ENV`]: the runs to make, when not all.
    only: Option<Vec<String>>,
}

impl Settings {
    /// Whether the run lettered `letter` is made.
    fn runs(&self, letter: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == letter))
    }
}

/// One measured run: a target at a concurrency level.
struct Row {
    target: Target,
    concurrency: usize,
    calls: usize,
    errors: u64,
    first_error: Option<String>,
    throughput: f64,
    p50: u32,
    p99: u32,
    p999: u32,
    /// Highest VmRSS of the target's process during the run, in KiB (children only).
    max_rss_kib: Option<u64>,
}

/// What one client task saw during the measured window.
#[derive(Default)]
struct TaskResult {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    /// When its last measured call completed: the end of the window as this task saw it.
    last_done: Option<Instant>,
}

/// A child process killed (and reaped) at the end, or killed on drop if the harness panics.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// pdgate's API port (`/metrics`); `None` for the baseline.
    api: Option<SocketAddr>,
    pid: u32,
    /// pdgate's stderr, kept for a failure report and removed when the run ends.
    log: Option<PathBuf>,
}

/// Criterion's test mode, which CI runs (`cargo test --benches`: no `--bench` flag) to check
/// that the benchmark still runs: once, on a small input, nothing measured.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench")
}

fn main() -> ExitCode {
    if let Ok(listen) = std::env::var(BASELINE_LISTEN_ENV) {
        return baseline_main(&listen);
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // PDGATE_LOAD_BINARY: another build to measure (e.g. the previous commit's, for an A/B run).
    // In test mode: the binary cargo built with this bench, whatever the profile.
    let pdgate = std::env::var_os("PDGATE_LOAD_BINARY").map_or_else(
        || {
            if test_mode() {
                PathBuf::from(env!("CARGO_BIN_EXE_pdgate"))
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/pdgate")
            }
        },
        PathBuf::from,
    );
    if !pdgate.is_file() {
        eprintln!(
            "error: `{}` not found; build it first:\n  cargo build --release --bin pdgate",
            pdgate.display()
        );
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(harness(settings, pdgate))
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let concurrency = match std::env::var(CONCURRENCY_ENV) {
            Ok(list) => list
                .split(',')
                .map(|c| match c.trim().parse::<usize>() {
                    Ok(n) if (1..=MAX_CONCURRENT_CALLS / 2).contains(&n) => Ok(n),
                    _ => Err(format!(
                        "{CONCURRENCY_ENV}: `{c}` is not a concurrency between 1 and {}",
                        MAX_CONCURRENT_CALLS / 2
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Err(_) if test_mode() => vec![1],
            Err(_) => DEFAULT_CONCURRENCY.to_vec(),
        };
        let seconds = match std::env::var(SECONDS_ENV) {
            Ok(s) => match s.trim().parse::<f64>() {
                Ok(x) if x > 0.0 && x <= 3600.0 => x,
                _ => return Err(format!("{SECONDS_ENV}: `{s}` is not a number of seconds")),
            },
            // Long enough for the reload run to see a swap (one every RELOAD_EVERY).
            Err(_) if test_mode() => 2.0,
            Err(_) => DEFAULT_SECONDS,
        };
        let only = std::env::var(ONLY_ENV).ok().map(|list| {
            list.split(',')
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect()
        });
        Ok(Self {
            concurrency,
            duration: Duration::from_secs_f64(seconds),
            only,
        })
    }
}

async fn harness(settings: Settings, pdgate: PathBuf) -> ExitCode {
    let reference = std::env::var_os(REFERENCE_ENV).map(PathBuf::from);
    if let Some(r) = reference.as_ref().filter(|r| !r.is_file()) {
        eprintln!("error: {REFERENCE_ENV}: `{}` not found", r.display());
        return ExitCode::from(2);
    }
    println!(
        "pdgate load harness: unary GetBillingStatement, {:?} warm-up + {:?} per run, \
         concurrency {:?}, {TASKS_PER_CHANNEL} tasks per HTTP/2 connection, {} CPUs, load average {}",
        WARMUP,
        settings.duration,
        settings.concurrency,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
    );

    // (a) The upstream, in this process.
    let (stop, stop_rx) = watch::channel(false);
    let upstream_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let upstream_addr = upstream_listener.local_addr().expect("upstream address");
    let mut stopped = stop_rx.clone();
    // The demo service, with an export that streams 1 KiB messages (the streaming run).
    let upstream = tokio::spawn(stream::serve(upstream_listener, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));

    // pdgate runs on a copy of the repository's policy, which the reload run rewrites.
    let scratch = tempfile::tempdir().expect("temporary directory");
    let policy = scratch.path().join("policy");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("policy"),
        &policy,
    )
    .expect("copy of policy/");
    // The streaming run's second pdgate reads a copy whose export route minimizes.
    let minimize_policy = scratch.path().join("policy-minimize");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("policy"),
        &minimize_policy,
    )
    .expect("copy of policy/");
    if let Err(e) = stream::minimize_export(&minimize_policy) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // pdgate's audit directories are in `scratch`: the sync measured is the one they pay.
    let fsync = {
        let dir = scratch.path().to_path_buf();
        match tokio::task::spawn_blocking(move || measure_fsync(&dir)).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                eprintln!("error: fsync measurement: {e}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("error: fsync measurement: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    println!(
        "fdatasync of one {RECORD_BYTES}-byte append on the audit directory's file system \
         ({} samples): p50 {} µs, p99 {} µs",
        fsync.samples, fsync.p50, fsync.p99
    );
    let interval_config = scratch.path().join("interval.toml");
    if let Err(e) = std::fs::write(&interval_config, "[audit]\nfsync = \"interval\"\n") {
        eprintln!("error: `{}`: {e}", interval_config.display());
        return ExitCode::FAILURE;
    }
    let load_config = std::env::var_os("PDGATE_LOAD_CONFIG").map(PathBuf::from);
    let servers = async {
        let baseline = start_baseline(upstream_addr, "channel").await?;
        let hyper = start_baseline(upstream_addr, "hyper").await?;
        let start = |binary: PathBuf, name: &'static str, config: Option<PathBuf>| {
            let (policy, scratch) = (policy.clone(), scratch.path().to_path_buf());
            async move { start_pdgate(&binary, name, upstream_addr, &policy, &scratch, config).await }
        };
        let durable = start(pdgate.clone(), "durable", load_config.clone()).await?;
        let interval = start(pdgate.clone(), "interval", Some(interval_config.clone())).await?;
        let minimize = start_pdgate(
            &pdgate,
            "minimize",
            upstream_addr,
            &minimize_policy,
            scratch.path(),
            load_config.clone(),
        )
        .await?;
        let reference = match &reference {
            Some(r) => Some(start(r.clone(), "reference", load_config.clone()).await?),
            None => None,
        };
        Ok::<_, String>((baseline, hyper, durable, interval, minimize, reference))
    };
    let (mut baseline, mut hyper, mut pdgate, mut interval, mut minimize, mut reference) =
        match servers.await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
    println!(
        "upstream {upstream_addr} (in-process) · baseline {} (pid {}) · hyper-util client {} (pid {}) · \
         pdgate {} (pid {}) · pdgate interval {} (pid {}){}\n",
        baseline.addr,
        baseline.pid,
        hyper.addr,
        hyper.pid,
        pdgate.addr,
        pdgate.pid,
        interval.addr,
        interval.pid,
        reference
            .as_ref()
            .map(|r| format!(" · reference {} (pid {})", r.addr, r.pid))
            .unwrap_or_default()
    );

    print_header();
    let mut rows = Vec::new();
    for &concurrency in &settings.concurrency {
        for target in Target::ALL {
            if !settings.runs(target.letter()) {
                continue;
            }
            let api_of = |s: &Server| s.api.expect("pdgate has an API address");
            let (addr, watch_pid) = match (target, &reference) {
                (Target::Direct, _) => (upstream_addr, None),
                (Target::Baseline, _) => (baseline.addr, Some(baseline.pid)),
                (Target::HyperBaseline, _) => (hyper.addr, Some(hyper.pid)),
                (Target::Pdgate, _) => (pdgate.addr, Some(pdgate.pid)),
                (Target::PdgateInterval, _) => (interval.addr, Some(interval.pid)),
                (Target::Check, _) => (api_of(&pdgate), Some(pdgate.pid)),
                (Target::Reference, Some(r)) => (r.addr, Some(r.pid)),
                (Target::ReferenceCheck, Some(r)) => (api_of(r), Some(r.pid)),
                (Target::Reference | Target::ReferenceCheck, None) => continue,
            };
            let row = match run_load(target, addr, concurrency, settings.duration, watch_pid).await
            {
                Ok(row) => row,
                Err(e) => {
                    eprintln!(
                        "error: {} at concurrency {concurrency}: {e}",
                        target.label()
                    );
                    return ExitCode::FAILURE;
                }
            };
            print_row(&row);
            rows.push(row);
        }
    }

    let mut stream_rows = Vec::new();
    if settings.runs("s") {
        stream::print_header();
        let (stream_warmup, stream_duration) = if test_mode() {
            (Duration::from_millis(200), Duration::from_millis(500))
        } else {
            (WARMUP, settings.duration)
        };
        for (label, addr, expect) in [
            ("(a) direct", upstream_addr, stream::Expect::Whole),
            ("(b) baseline", baseline.addr, stream::Expect::Whole),
            (
                "(s) pdgate, records route",
                pdgate.addr,
                stream::Expect::Whole,
            ),
            (
                "(s) pdgate, minimize route",
                minimize.addr,
                stream::Expect::Minimized,
            ),
        ] {
            match stream::run(label, addr, expect, stream_warmup, stream_duration).await {
                Ok(row) => {
                    stream::print_row(&row);
                    stream_rows.push(row);
                }
                Err(e) => {
                    eprintln!("error: streaming run {label}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }

    let top = settings.concurrency.iter().copied().max().unwrap_or(1);
    let reload = if settings.runs("reload") {
        match reload_run(&pdgate, &policy, top, settings.duration).await {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("error: reload run: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };

    baseline.stop().await;
    hyper.stop().await;
    pdgate.stop().await;
    interval.stop().await;
    minimize.stop().await;
    if let Some(r) = &mut reference {
        r.stop().await;
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), upstream).await;

    println!();
    print_errors(&rows);
    for row in stream_rows.iter().filter(|r| r.errors > 0) {
        println!(
            "errors: streaming {}: {} (first: {})",
            row.label,
            row.errors,
            row.first_error.as_deref().unwrap_or("?")
        );
    }
    print_targets(&rows, fsync);
    stream::print_target(&stream_rows, "(b) baseline");

    if let Some(reload) = &reload {
        println!(
            "\nreload under load (concurrency {top}, the policy rewritten every {RELOAD_EVERY:?}): \
             {} policy versions swapped in; {} calls, {} failed or wrongly decided; p50 {} µs, \
             p99 {} µs, p999 {} µs",
            reload.reloads,
            reload.row.calls,
            reload.row.errors,
            reload.row.p50,
            reload.row.p99,
            reload.row.p999
        );
        if let Some(e) = &reload.row.first_error {
            println!("  first failure: {e}");
        }
        if reload.reloads == 0 {
            eprintln!("error: no reload happened during the reload run");
            return ExitCode::FAILURE;
        }
    }
    let pdgate_errors: u64 = rows
        .iter()
        .filter(|r| {
            !matches!(
                r.target,
                Target::Direct | Target::Baseline | Target::HyperBaseline
            )
        })
        .map(|r| r.errors)
        .sum::<u64>()
        + reload.as_ref().map_or(0, |r| r.row.errors)
        + stream_rows
            .iter()
            .filter(|r| r.label.starts_with("(s) pdgate"))
            .map(|r| r.errors)
            .sum::<u64>();
    if pdgate_errors > 0 {
        eprintln!(
            "error: {pdgate_errors} calls through pdgate failed; the policy allows every one of them"
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Warms up, then runs `concurrency` client tasks against `addr` for `duration`.
async fn run_load(
    target: Target,
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
    watch_pid: Option<u32>,
) -> Result<Row, String> {
    let mut channels = Vec::new();
    for _ in 0..concurrency.div_ceil(TASKS_PER_CHANNEL) {
        channels.push(
            endpoint(addr)
                .connect()
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?,
        );
    }
    let measure_from = Instant::now() + WARMUP;
    let until = measure_from + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let channel = channels[i / TASKS_PER_CHANNEL].clone();
            tokio::spawn(client_loop(channel, target.api(), measure_from, until))
        })
        .collect();
    // The sampler ends with the run: it checks the deadline itself.
    let sampler = watch_pid.map(|pid| tokio::spawn(sample_rss(pid, until)));

    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut last_done = measure_from;
    for task in tasks {
        let result = task.await.map_err(|e| format!("client task: {e}"))?;
        latencies.extend_from_slice(&result.latencies_us);
        errors += result.errors;
        first_error = first_error.or(result.first_error);
        if let Some(done) = result.last_done {
            last_done = last_done.max(done);
        }
    }
    let max_rss_kib = match sampler {
        Some(s) => s.await.map_err(|e| format!("RSS sampler: {e}"))?,
        None => None,
    };
    latencies.sort_unstable();
    let elapsed = last_done.saturating_duration_since(measure_from);
    let calls = latencies.len();
    let throughput = if elapsed.is_zero() {
        0.0
    } else {
        calls as f64 / elapsed.as_secs_f64()
    };
    Ok(Row {
        target,
        concurrency,
        calls,
        errors,
        first_error,
        throughput,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        p999: percentile(&latencies, 0.999),
        max_rss_kib,
    })
}

/// One client: calls back to back until `until`; only calls started after `measure_from` count.
async fn client_loop(
    channel: Channel,
    api: Api,
    measure_from: Instant,
    until: Instant,
) -> TaskResult {
    let mut data = CustomerDataClient::new(channel.clone());
    let mut check = AccessControlClient::new(channel);
    let mut result = TaskResult::default();
    loop {
        let start = Instant::now();
        if start >= until {
            return result;
        }
        let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
        let outcome = match api {
            Api::Data => tokio::time::timeout(CALL_TIMEOUT, data.get_billing_statement(request()))
                .await
                .map_err(|_| format!("no answer in {CALL_TIMEOUT:?}"))
                .and_then(|r| r.map(|_| ()).map_err(status)),
            Api::Check => tokio::time::timeout(CALL_TIMEOUT, check.check(check_request()))
                .await
                .map_err(|_| format!("no answer in {CALL_TIMEOUT:?}"))
                .and_then(|r| r.map_err(status))
                .and_then(|r| {
                    let r = r.into_inner();
                    if r.allowed {
                        Ok(())
                    } else {
                        Err(format!("Check denied: {:?}", r.reasons))
                    }
                }),
        };
        let done = Instant::now();
        if start < measure_from {
            continue;
        }
        result.last_done = Some(done);
        match outcome {
            Ok(_) => {
                let micros = done.duration_since(start).as_micros();
                result
                    .latencies_us
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
            }
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert(e);
            }
        }
    }
}

/// The call: allowed by the repository's policy (billing-service, service.billing, cust-1).
fn request() -> tonic::Request<GetBillingStatementRequest> {
    let mut request = tonic::Request::new(GetBillingStatementRequest {
        customer_id: "cust-1".to_owned(),
        month: String::new(),
    });
    let md = request.metadata_mut();
    md.insert("x-caller", MetadataValue::from_static("billing-service"));
    md.insert("x-purpose", MetadataValue::from_static("service.billing"));
    md.insert("x-data-subject", MetadataValue::from_static("cust-1"));
    request
}

/// The Check of the Check API run: allowed by the repository's policy, two categories, one
/// subject (the durable default records it like a data-plane call).
fn check_request() -> CheckRequest {
    CheckRequest {
        caller: "billing-service".to_owned(),
        purpose: "service.billing".to_owned(),
        action: "read".to_owned(),
        categories: vec!["customer.billing".to_owned(), "customer.name".to_owned()],
        subjects: vec!["cust-1".to_owned()],
        recipient: String::new(),
        minimizable: Vec::new(),
    }
}

/// Latency of a sync, in µs.
#[derive(Clone, Copy)]
struct Fsync {
    samples: usize,
    p50: u32,
    p99: u32,
}

/// `fdatasync` of one record-sized append, up to [`FSYNC_SAMPLES`] times, in a file in `dir`.
fn measure_fsync(dir: &Path) -> std::io::Result<Fsync> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let mut line = vec![b'x'; RECORD_BYTES - 1];
    line.push(b'\n');
    let mut latencies = Vec::with_capacity(FSYNC_SAMPLES);
    let began = Instant::now();
    for i in 0..FSYNC_SAMPLES {
        if i >= FSYNC_MIN_SAMPLES && began.elapsed() > FSYNC_TIME {
            break;
        }
        let start = Instant::now();
        file.write_all(&line)?;
        file.sync_data()?;
        latencies.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    drop(file);
    std::fs::remove_file(&path)?;
    latencies.sort_unstable();
    Ok(Fsync {
        samples: latencies.len(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    })
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("loopback URI")
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
}

/// Nearest-rank percentile of sorted `values` (0 when empty).
fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The highest VmRSS of `pid` seen until `until`, in KiB.
async fn sample_rss(pid: u32, until: Instant) -> Option<u64> {
    let mut max = None;
    while Instant::now() < until {
        if let Some(rss) = rss_kib(pid) {
            max = Some(max.map_or(rss, |m: u64| m.max(rss)));
        }
        tokio::time::sleep(RSS_SAMPLE_EVERY).await;
    }
    max
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The children.

impl Server {
    async fn stop(&mut self) {
        let _ = self.child.kill().await;
        if let Some(log) = self.log.take() {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// Re-executes this binary as the baseline forwarder; it binds a free loopback port and
/// reports it on its first line of output.
async fn start_baseline(upstream: SocketAddr, client: &str) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut child = Command::new(&exe)
        .env(BASELINE_LISTEN_ENV, "127.0.0.1:0")
        .env(UPSTREAM_ENV, upstream.to_string())
        .env(BASELINE_CLIENT_ENV, client)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the baseline `{}`: {e}", exe.display()))?;
    let pid = child.id().ok_or("the baseline exited at once")?;
    let stdout = child.stdout.take().ok_or("no baseline stdout")?;
    let mut first = String::new();
    let mut stdout = BufReader::new(stdout);
    let read = stdout.read_line(&mut first);
    match tokio::time::timeout(STARTUP_TIMEOUT, read).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return Err("the baseline did not report its address".to_owned()),
    }
    let addr = first
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("the baseline said `{}`", first.trim()))?;
    let mut server = Server {
        child,
        addr,
        api: None,
        pid,
        log: None,
    };
    wait_serving(&mut server, "baseline").await?;
    Ok(server)
}

/// Starts `pdgate serve` on free loopback ports. A port picked free can be taken by someone
/// else before pdgate binds it (other builds and tests share this machine): retry a few times.
async fn start_pdgate(
    binary: &Path,
    name: &str,
    upstream: SocketAddr,
    policy: &Path,
    scratch: &Path,
    config: Option<PathBuf>,
) -> Result<Server, String> {
    let mut last_error = String::new();
    for attempt in 1..=3 {
        let addr = free_port()?;
        let api = free_port()?;
        let log =
            std::env::temp_dir().join(format!("pdgate-load-{}-{name}.log", std::process::id()));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("`{}`: {e}", log.display()))?;
        let child = Command::new(binary)
            .args(["serve", "--identity", "insecure-header"])
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--api-listen")
            .arg(api.to_string())
            .arg("--upstream")
            .arg(upstream.to_string())
            .arg("--policy")
            .arg(policy)
            .arg("--max-concurrent-calls")
            .arg(MAX_CONCURRENT_CALLS.to_string())
            // The audit log and the subject registry of a load run are thrown away; never
            // the working directory's.
            .arg("--audit")
            .arg(scratch.join(format!("audit-{name}")))
            .arg("--subjects-store")
            .arg(scratch.join(format!("subjects-{name}.db")))
            // A pdgate.toml for what flags cannot set (`[audit] fsync`; PDGATE_LOAD_CONFIG
            // for the durable instances); the flags above still win.
            .args(
                config
                    .as_ref()
                    .map(|c| vec![std::ffi::OsString::from("--config"), c.into()])
                    .unwrap_or_default(),
            )
            .env_remove("PDGATE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", binary.display()))?;
        let pid = child.id().ok_or("pdgate exited at once")?;
        let mut server = Server {
            child,
            addr,
            api: Some(api),
            pid,
            log: Some(log),
        };
        match wait_serving(&mut server, "pdgate").await {
            Ok(()) => return Ok(server),
            Err(e) => {
                server.stop().await;
                last_error = format!("attempt {attempt}: {e}");
            }
        }
    }
    Err(last_error)
}

/// Waits until a call through `server` succeeds. Only `UNAVAILABLE` (not listening yet) is
/// retried: a denial means the policy or the call is wrong, and measuring it would be useless.
async fn wait_serving(server: &mut Server, name: &str) -> Result<(), String> {
    let log = server.log.clone();
    let log_tail = || {
        log.as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .map(|text| format!("; its log:\n{text}"))
            .unwrap_or_default()
    };
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(format!("{name} exited with {status}{}", log_tail()));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{name} did not serve within {STARTUP_TIMEOUT:?}{}",
                log_tail()
            ));
        }
        if let Ok(channel) = endpoint(server.addr).connect().await {
            let mut client = CustomerDataClient::new(channel);
            let call = client.get_billing_statement(request());
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {}
                Ok(Err(s)) => {
                    return Err(format!(
                        "the allowed call through {name} failed: {:?}: {}",
                        s.code(),
                        s.message()
                    ));
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// The child side of the baseline: a tonic server (the same builder as pdgate's data plane)
/// whose service is the raw upstream `Channel`. It serves until its stdin closes, so it ends
/// with the harness even if the harness is killed before it can kill the child.
fn baseline_main(listen: &str) -> ExitCode {
    let Ok(upstream) = std::env::var(UPSTREAM_ENV) else {
        eprintln!("error: {BASELINE_LISTEN_ENV} is set but {UPSTREAM_ENV} is not");
        return ExitCode::from(2);
    };
    let candidate = std::env::var(BASELINE_CLIENT_ENV).is_ok_and(|c| c == "hyper");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let served = runtime.block_on(async {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot bind `{listen}`: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let limits = pdgate::transport::limits::Limits::default();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = closed_tx.send(());
        });
        println!("listening {addr}");
        // As in `serve_data_plane`: the same builder and incoming, minus the Authorize layer.
        let connections = pdgate::transport::connections::Connections::new(&limits);
        let server =
            pdgate::transport::server_builder(&limits, &connections).map_err(|e| e.to_string())?;
        let closed = async {
            let _ = closed_rx.await;
        };
        if candidate {
            let client = hyper::Upstream::new(&upstream, &limits).map_err(|e| e.to_string())?;
            server
                .serve_with_incoming_shutdown(client, connections.incoming(listener), closed)
                .await
                .map_err(|e| e.to_string())
        } else {
            let channel = pdgate::sidecar::upstream_channel(&upstream, &limits)
                .map_err(|e| format!("upstream `{upstream}`: {e}"))?;
            server
                .serve_with_incoming_shutdown(channel, connections.incoming(listener), closed)
                .await
                .map_err(|e| e.to_string())
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

fn print_header() {
    println!(
        "{:<20} {:>5} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>9}",
        "target", "conc", "calls", "errors", "calls/s", "p50 µs", "p99 µs", "p999 µs", "max RSS"
    );
}

fn print_row(row: &Row) {
    let rss = row
        .max_rss_kib
        .map_or_else(|| "-".to_owned(), |k| format!("{:.1} MiB", mib(k)));
    println!(
        "{:<20} {:>5} {:>9} {:>7} {:>10.0} {:>8} {:>8} {:>8} {:>9}",
        row.target.label(),
        row.concurrency,
        row.calls,
        row.errors,
        row.throughput,
        row.p50,
        row.p99,
        row.p999,
        rss
    );
}

fn print_errors(rows: &[Row]) {
    for row in rows.iter().filter(|r| r.errors > 0) {
        println!(
            "errors: {} at concurrency {}: {} (first: {})",
            row.target.label(),
            row.concurrency,
            row.errors,
            row.first_error.as_deref().unwrap_or("?")
        );
    }
}

/// Each target of issue #13 with its verdict, from this run's rows. A run with failed calls
/// gives no verdict (its figures are not the target's).
fn print_targets(rows: &[Row], fsync: Fsync) {
    let find = |target: Target, concurrency: usize| {
        rows.iter()
            .find(|r| r.target == target && r.concurrency == concurrency && r.errors == 0)
    };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let (c1, c64) = (LATENCY_CONCURRENCY, THROUGHPUT_CONCURRENCY);
    println!(
        "issue #13's targets (reported, not asserted; ratios from this run; \"not measured\" \
         also when a run's calls failed):"
    );

    match (find(Target::Baseline, c64), find(Target::Pdgate, c64)) {
        (Some(b), Some(p)) if b.throughput > 0.0 => {
            let ratio = p.throughput / b.throughput;
            println!(
                "  1. c={c64}, durable: pdgate / baseline calls/s {:.1}% (≥ {:.0}%): {}",
                ratio * 100.0,
                TARGET_THROUGHPUT_RATIO * 100.0,
                verdict(ratio >= TARGET_THROUGHPUT_RATIO)
            );
        }
        _ => println!("  1. c={c64}, durable: not measured (add {c64} to {CONCURRENCY_ENV})"),
    }

    let baseline_c1 = find(Target::Baseline, c1);
    match (baseline_c1, find(Target::PdgateInterval, c1)) {
        (Some(b), Some(p)) => {
            let p50 = f64::from(p.p50) - f64::from(b.p50);
            let p99 = f64::from(p.p99) - f64::from(b.p99);
            println!(
                "  2. c={c1}, fsync=interval: p50 {p50:+.0} µs over the baseline \
                 (≤ {TARGET_INTERVAL_P50_ADDED_US}): {}; p99 {p99:+.0} µs \
                 (≤ {TARGET_INTERVAL_P99_ADDED_US}): {}",
                verdict(p50 <= TARGET_INTERVAL_P50_ADDED_US),
                verdict(p99 <= TARGET_INTERVAL_P99_ADDED_US)
            );
        }
        _ => println!("  2. c={c1}, fsync=interval: not measured (add {c1} to {CONCURRENCY_ENV})"),
    }

    let direct_c1 = find(Target::Direct, c1);
    match (baseline_c1, direct_c1, find(Target::Pdgate, c1)) {
        (Some(b), Some(d), Some(p)) => {
            let p50 = f64::from(p.p50) - f64::from(b.p50);
            let sync_beyond_upstream = (f64::from(fsync.p50) - f64::from(d.p50)).max(0.0);
            let allowed = sync_beyond_upstream + TARGET_DURABLE_P50_SLACK_US;
            println!(
                "  3. c={c1}, durable, a read: p50 {p50:+.0} µs over the baseline (≤ max(0, \
                 fsync p50 {} − direct p50 {}) + {TARGET_DURABLE_P50_SLACK_US} = {allowed:.0}): {}",
                fsync.p50,
                d.p50,
                verdict(p50 <= allowed)
            );
        }
        _ => println!("  3. c={c1}, durable: not measured (add {c1} to {CONCURRENCY_ENV})"),
    }

    match (baseline_c1, find(Target::HyperBaseline, c1), direct_c1) {
        (Some(b), Some(h), Some(d)) => {
            let channel = f64::from(b.p50) - f64::from(d.p50);
            let candidate = f64::from(h.p50) - f64::from(d.p50);
            let share = if channel > 0.0 {
                candidate / channel
            } else {
                f64::INFINITY
            };
            println!(
                "  4. c={c1}, forwarder: pdgate still forwards with tonic's `Channel` (adds p50 \
                 {channel:+.0} µs over direct), so MISSED; the hyper-util candidate adds \
                 {candidate:+.0} µs, {:.0}% of the `Channel`'s (≤ {:.0}%): {}",
                share * 100.0,
                TARGET_FORWARDER_SHARE * 100.0,
                verdict(share <= TARGET_FORWARDER_SHARE)
            );
        }
        _ => println!("  4. forwarder: not measured (add {c1} to {CONCURRENCY_ENV})"),
    }

    for (c, gain) in [(c1, TARGET_CHECK_GAIN_C1), (c64, TARGET_CHECK_GAIN_C64)] {
        match (find(Target::Check, c), find(Target::ReferenceCheck, c)) {
            (Some(p), Some(r)) if r.throughput > 0.0 => {
                let ratio = p.throughput / r.throughput;
                println!(
                    "  5. Check API c={c}: {:.0} calls/s, {ratio:.2}× the reference's {:.0} \
                     (≥ {gain}×): {}",
                    p.throughput,
                    r.throughput,
                    verdict(ratio >= gain)
                );
            }
            (Some(p), _) => println!(
                "  5. Check API c={c}: {:.0} calls/s; no reference run to compare with \
                 ({REFERENCE_ENV} unset, or its calls failed)",
                p.throughput
            ),
            _ => println!("  5. Check API c={c}: not measured (add {c} to {CONCURRENCY_ENV})"),
        }
    }

    match find(Target::Pdgate, c64).and_then(|r| r.max_rss_kib) {
        Some(kib) => println!(
            "  6. pdgate max RSS during the c={c64} run: {:.1} MiB (≤ {TARGET_RSS_MIB}): {}",
            mib(kib),
            verdict(mib(kib) <= TARGET_RSS_MIB)
        ),
        None => println!("  6. RSS at c={c64}: not measured"),
    }
    if let (Some(d), Some(b)) = (direct_c1, baseline_c1) {
        println!(
            "  (context at c={c1}: the baseline adds p50 {:+.0} µs, p99 {:+.0} µs over direct)",
            f64::from(b.p50) - f64::from(d.p50),
            f64::from(b.p99) - f64::from(d.p99)
        );
    }
    if let (Some(r), Some(p)) = (find(Target::Reference, c1), find(Target::Pdgate, c1)) {
        println!(
            "  (reference vs pdgate at c={c1}: p50 {} → {} µs, {:.0} → {:.0} calls/s)",
            r.p50, p.p50, r.throughput, p.throughput
        );
    }
    if let (Some(r), Some(p)) = (find(Target::Reference, c64), find(Target::Pdgate, c64)) {
        println!(
            "  (reference vs pdgate at c={c64}: {:.0} → {:.0} calls/s)",
            r.throughput, p.throughput
        );
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// The reload run.

struct ReloadRun {
    row: Row,
    /// Policy versions pdgate swapped in during the run (its reload counter).
    reloads: u64,
}

/// Loads pdgate at `concurrency` for `duration` while `policy/policy.csv` is rewritten every
/// [`RELOAD_EVERY`] with one more comment line: a new version (the version is a digest of the
/// text) that decides exactly as before, so every call must still be allowed.
async fn reload_run(
    pdgate: &Server,
    policy: &Path,
    concurrency: usize,
    duration: Duration,
) -> Result<ReloadRun, String> {
    let api = pdgate.api.ok_or("pdgate has no API address")?;
    let before = reloads_counted(api).await?;
    let csv = policy.join("policy.csv");
    let original =
        std::fs::read_to_string(&csv).map_err(|e| format!("`{}`: {e}", csv.display()))?;
    let until = Instant::now() + WARMUP + duration;
    let writer = tokio::spawn(async move {
        let mut n = 0u32;
        while Instant::now() + RELOAD_EVERY < until {
            tokio::time::sleep(RELOAD_EVERY).await;
            n += 1;
            // Written whole to a temporary name and renamed: the watch never sees half a file.
            let text = format!("{original}# load-harness reload {n}\n");
            let tmp = csv.with_extension("csv.tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, &csv))
                .map_err(|e| format!("`{}`: {e}", csv.display()))?;
        }
        Ok::<u32, String>(n)
    });
    let row = run_load(Target::Pdgate, pdgate.addr, concurrency, duration, None).await?;
    let written = writer.await.map_err(|e| format!("policy writer: {e}"))??;
    // The last rewrite is swapped in about a second after it was written.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reloads = reloads_counted(api).await?.saturating_sub(before);
    if written > 0 && reloads == 0 {
        return Err(format!("{written} rewrites of the policy, no reload"));
    }
    Ok(ReloadRun { row, reloads })
}

/// `pdgate_policy_reloads_total` from pdgate's `/metrics` (HTTP/1 on the API port).
async fn reloads_counted(api: SocketAddr) -> Result<u64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(api)
        .await
        .map_err(|e| format!("metrics at {api}: {e}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: pdgate\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("metrics at {api}: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .map_err(|e| format!("metrics at {api}: {e}"))?;
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
