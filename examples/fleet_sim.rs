//! The fleet simulation (issue #19): N `pdgate serve` processes on this machine against one
//! PostgreSQL, directly or through a transaction-mode PgBouncer the harness starts, measuring
//! what decides whether a fleet fits one database:
//!
//! - connections held (`pg_stat_activity`), idle and after the run;
//! - RSS per sidecar (`/proc/PID/status`);
//! - how long a subject change made through one sidecar takes to be honoured by all (p50, p99,
//!   max over every sidecar and change);
//! - how long a policy push takes to be active on all;
//! - with `--restart`: recovery after a PostgreSQL restart (a new change honoured by all).
//!
//! ```text
//! cargo build --release --bin pdgate --example fleet_sim
//! target/release/examples/fleet_sim --sidecars 40 --via direct
//! target/release/examples/fleet_sim --sidecars 200 --via pgbouncer --restart
//! ```
//!
//! Options: `--pdgate PATH` (default `target/release/pdgate`), `--database-url URL` (an admin
//! URL of the server, default `postgres://postgres@127.0.0.1:5432/test`; the simulation works
//! in a database of its own, `pdgate_fleet_sim`, created and dropped here), `--changes K`
//! subject changes (default 10), `--pushes P` policy pushes (default 3), `--pool N` PgBouncer's
//! server connections (default 20), `--cluster VERSION/NAME` for the restart (default
//! `15/main`). Not run by CI: it starts hundreds of processes and, with `--restart`, restarts
//! the machine's PostgreSQL.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line harness: a failed step aborts the run with its message"
)]

use pdgate::gate::Bundle;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::proto::v1::policy_admin_client::PolicyAdminClient;
use pdgate::proto::v1::subject_rights_client::SubjectRightsClient;
use pdgate::proto::v1::{ApplyRequest, CheckRequest, ConsentRequest, PolicyBundle, StatusRequest};
use sqlx::{Connection, PgConnection};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const SIM_DB: &str = "pdgate_fleet_sim";
/// Sidecar connections idle this long are closed.
const IDLE_TIMEOUT_MS: u64 = 2000;
/// How often a waiting sidecar is asked again (the figures' resolution).
const ASK_EVERY: Duration = Duration::from_millis(20);
/// Longest wait for any one step before the run fails.
const STEP_LIMIT: Duration = Duration::from_secs(120);

struct Args {
    sidecars: usize,
    pooler: bool,
    restart: bool,
    pdgate: PathBuf,
    admin_url: String,
    changes: usize,
    pushes: usize,
    pool: usize,
    cluster: String,
}

fn args() -> Args {
    let mut a = Args {
        sidecars: 10,
        pooler: false,
        restart: false,
        pdgate: PathBuf::from("target/release/pdgate"),
        admin_url: std::env::var("PDGATE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        changes: 10,
        pushes: 3,
        pool: 20,
        cluster: "15/main".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("`{flag}` needs a value"))
        };
        match flag.as_str() {
            "--sidecars" => a.sidecars = value().parse().expect("--sidecars N"),
            "--via" => {
                a.pooler = match value().as_str() {
                    "direct" => false,
                    "pgbouncer" => true,
                    other => panic!("--via `{other}`: allowed `direct`, `pgbouncer`"),
                }
            }
            "--restart" => a.restart = true,
            "--pdgate" => a.pdgate = PathBuf::from(value()),
            "--database-url" => a.admin_url = value(),
            "--changes" => a.changes = value().parse().expect("--changes K"),
            "--pushes" => a.pushes = value().parse().expect("--pushes P"),
            "--pool" => a.pool = value().parse().expect("--pool N"),
            "--cluster" => a.cluster = value(),
            other => panic!("unknown flag `{other}` (see the source's header)"),
        }
    }
    a
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The admin URL with another database name.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let base = base.rsplit_once('/').map_or(base, |(head, _)| head);
    if query.is_empty() {
        format!("{base}/{database}")
    } else {
        format!("{base}/{database}?{query}")
    }
}

async fn admin(args: &Args) -> PgConnection {
    PgConnection::connect(&args.admin_url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at `{}`: {e}", args.admin_url))
}

async fn recreate_database(args: &Args) {
    let mut conn = admin(args).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {SIM_DB} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {SIM_DB}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// Connections the server holds in the simulation's database, by application name.
async fn held(args: &Args) -> BTreeMap<String, i64> {
    let mut conn = admin(args).await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity
         WHERE datname = $1 GROUP BY 1",
    )
    .bind(SIM_DB)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    rows.into_iter().collect()
}

fn summarize_held(held: &BTreeMap<String, i64>, sidecars: usize) -> String {
    let total: i64 = held.values().sum();
    let per_sidecar: Vec<i64> = (0..sidecars)
        .map(|i| held.get(&format!("pdgate-sim-{i}")).copied().unwrap_or(0))
        .collect();
    let max = per_sidecar.iter().max().copied().unwrap_or(0);
    format!(
        "{total} in all (max_connections 100); most held by one sidecar's own connections: {max}; by application: {held:?}"
    )
}

fn server(args: &Args) -> sqlx::postgres::PgConnectOptions {
    args.admin_url
        .parse()
        .unwrap_or_else(|e| panic!("`{}`: {e}", args.admin_url))
}

struct PgBouncer {
    child: Child,
    port: u16,
}

fn start_pgbouncer(dir: &Path, args: &Args) -> PgBouncer {
    let port = free_port();
    let server = server(args);
    let (host, pg_port, user) = (server.get_host(), server.get_port(), server.get_username());
    std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"\"\n")).unwrap();
    let ini = format!(
        "[databases]\n\
         {SIM_DB} = host={host} port={pg_port} dbname={SIM_DB}\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {dir}/userlist.txt\n\
         pool_mode = transaction\n\
         default_pool_size = {pool}\n\
         max_db_connections = {pool}\n\
         max_client_conn = 4000\n\
         server_reset_query =\n\
         ignore_startup_parameters = extra_float_digits\n\
         logfile = {dir}/pgbouncer.log\n",
        dir = dir.display(),
        pool = args.pool,
    );
    let ini_path = dir.join("pgbouncer.ini");
    std::fs::write(&ini_path, ini).unwrap();
    // PgBouncer refuses to run as root.
    let child = Command::new("pgbouncer")
        .arg("-u")
        .arg("nobody")
        .arg(&ini_path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("pgbouncer (Debian package `pgbouncer`)");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < STEP_LIMIT, "pgbouncer did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    PgBouncer { child, port }
}

struct Sidecar {
    child: Child,
    api: u16,
}

fn start_sidecar(i: usize, dir: &Path, url: &str, args: &Args, policy: &Path) -> Sidecar {
    let api = free_port();
    let data = free_port();
    let feed = if args.pooler { "poll" } else { "listen" };
    let audit = dir.join(format!("audit-{i}"));
    let config = format!(
        "listen = \"127.0.0.1:{data}\"\n\
         api_listen = \"127.0.0.1:{api}\"\n\
         upstream = \"127.0.0.1:1\"\n\
         policy = \"{policy}\"\n\
         identity = \"insecure-header\"\n\
         [audit]\n\
         dir = \"{audit}\"\n\
         fsync = \"interval\"\n\
         [admin]\n\
         policy_admin = [\"sim-admin\"]\n\
         operator = [\"sim-ops\"]\n\
         privacy_office = [\"sim-po\"]\n\
         [fleet]\n\
         database_url = \"{url}\"\n\
         change_feed = \"{feed}\"\n\
         application_name = \"pdgate-sim-{i}\"\n\
         idle_timeout_ms = {IDLE_TIMEOUT_MS}\n\
         max_connections = 4\n",
        policy = policy.display(),
        audit = audit.display(),
    );
    let path = dir.join(format!("sidecar-{i}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("sidecar-{i}.log"))).unwrap();
    let child = Command::new(&args.pdgate)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env_clear()
        .env("PDGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("`{}`: {e}", args.pdgate.display()));
    Sidecar { child, api }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn with_caller<T>(message: T, caller: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-caller", caller.parse().unwrap());
    request
}

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

/// The reason codes of a marketing read of `subject` (empty: allowed); `None` when the call
/// itself failed.
async fn codes(client: &mut AccessControlClient<Channel>, subject: &str) -> Option<Vec<String>> {
    let response = client.check(marketing(subject)).await.ok()?.into_inner();
    Some(response.reasons.into_iter().map(|r| r.code).collect())
}

/// Asks every sidecar until `done` holds for its answer; returns each one's delay from `from`.
async fn until_all<F>(
    checks: &[AccessControlClient<Channel>],
    subject: &str,
    from: Instant,
    done: F,
) -> Vec<Duration>
where
    F: Fn(&[String]) -> bool + Copy + Send + 'static,
{
    let tasks: Vec<_> = checks
        .iter()
        .cloned()
        .map(|mut client| {
            let subject = subject.to_owned();
            tokio::spawn(async move {
                loop {
                    if codes(&mut client, &subject).await.is_some_and(|c| done(&c)) {
                        return from.elapsed();
                    }
                    assert!(from.elapsed() < STEP_LIMIT, "a sidecar never got there");
                    tokio::time::sleep(ASK_EVERY).await;
                }
            })
        })
        .collect();
    let mut delays = Vec::with_capacity(tasks.len());
    for task in tasks {
        delays.push(task.await.unwrap());
    }
    delays
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn bundle(n: usize) -> PolicyBundle {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    let mut bundle = PolicyBundle::from(Bundle::read_dir(&dir, None).unwrap());
    bundle
        .policy
        .push_str(&format!("\n# fleet simulation push {n}\n"));
    bundle
}

async fn active(admin: &mut PolicyAdminClient<Channel>) -> Option<String> {
    let status = admin
        .status(with_caller(StatusRequest {}, "sim-ops"))
        .await
        .ok()?;
    status.into_inner().active.map(|a| a.version)
}

async fn consent(rights: &mut SubjectRightsClient<Channel>, subject: &str) -> bool {
    rights
        .set_consent(with_caller(
            ConsentRequest {
                subject: subject.into(),
                purpose: "marketing.email".into(),
                communications: false,
                source: "fleet-sim".into(),
            },
            "sim-po",
        ))
        .await
        .is_ok()
}

fn subject_name(what: &str, k: usize) -> String {
    format!("sim-{what}-{k}-{}", std::process::id())
}

#[tokio::main]
async fn main() {
    let args = args();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pdgate = repo.join(&args.pdgate);
    let args = Args { pdgate, ..args };
    assert!(
        args.pdgate.exists(),
        "`{}` missing: cargo build --release --bin pdgate",
        args.pdgate.display()
    );
    let dir = tempfile::tempdir().unwrap();
    // PgBouncer runs as `nobody` and writes its log here.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    recreate_database(&args).await;
    let mut bouncer = None;
    let url = if args.pooler {
        let b = start_pgbouncer(dir.path(), &args);
        let user = server(&args).get_username().to_owned();
        let url = format!("postgres://{user}@127.0.0.1:{}/{SIM_DB}", b.port);
        bouncer = Some(b);
        url
    } else {
        with_database(&args.admin_url, SIM_DB)
    };
    let layout = if args.pooler {
        format!(
            "through PgBouncer (transaction mode, {} server connections), change_feed = poll",
            args.pool
        )
    } else {
        "direct, change_feed = listen".to_owned()
    };
    println!("fleet simulation: {} sidecars, {layout}", args.sidecars);

    let policy = repo.join("policy");
    let started = Instant::now();
    let mut sidecars: Vec<Sidecar> = (0..args.sidecars)
        .map(|i| start_sidecar(i, dir.path(), &url, &args, &policy))
        .collect();
    // Clients, once each sidecar's API answers with an active policy.
    let mut checks = Vec::new();
    let mut admins = Vec::new();
    let mut channels = Vec::new();
    for (i, s) in sidecars.iter_mut().enumerate() {
        let endpoint = format!("http://127.0.0.1:{}", s.api);
        let channel = loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!(
                    "sidecar {i} exited ({status}); see {}/sidecar-{i}.log",
                    dir.path().display()
                );
            }
            if let Ok(channel) = Channel::from_shared(endpoint.clone())
                .unwrap()
                .connect()
                .await
            {
                let mut admin = PolicyAdminClient::new(channel.clone());
                if active(&mut admin).await.is_some() {
                    break channel;
                }
            }
            assert!(started.elapsed() < STEP_LIMIT, "sidecar {i} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        checks.push(AccessControlClient::new(channel.clone()));
        admins.push(PolicyAdminClient::new(channel.clone()));
        channels.push(channel);
    }
    let mut rights = SubjectRightsClient::new(channels[0].clone());
    println!("started in {:?}", started.elapsed());

    // Every sidecar reads the store once (its feed has migrated and connected).
    let warm = subject_name("warm", 0);
    until_all(&checks, &warm, Instant::now(), |c| {
        c == ["CONSENT_REQUIRED"]
    })
    .await;

    // Idle: pools emptied after the idle timeout.
    tokio::time::sleep(Duration::from_millis(IDLE_TIMEOUT_MS) + Duration::from_secs(3)).await;
    let idle = held(&args).await;
    println!(
        "connections held, idle: {}",
        summarize_held(&idle, args.sidecars)
    );
    let commits = |args: &Args| {
        let args_url = args.admin_url.clone();
        async move {
            let mut conn = PgConnection::connect(&args_url).await.unwrap();
            let n: i64 =
                sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
                    .bind(SIM_DB)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            conn.close().await.unwrap();
            n
        }
    };
    let before = commits(&args).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = commits(&args).await;
    println!(
        "database load of the idle fleet: {:.0} transactions/s (heartbeats or polls)",
        (after - before) as f64 / 5.0
    );
    let mut rss: Vec<u64> = sidecars.iter().map(|s| rss_kib(s.child.id())).collect();
    rss.sort_unstable();
    println!(
        "RSS per idle sidecar: min {:.1} MiB, median {:.1} MiB, max {:.1} MiB",
        rss[0] as f64 / 1024.0,
        rss[rss.len() / 2] as f64 / 1024.0,
        rss[rss.len() - 1] as f64 / 1024.0
    );

    // Subject changes, each made through a different sidecar.
    let mut delays = Vec::new();
    let mut worst_per_change = Vec::new();
    for k in 0..args.changes {
        let subject = subject_name("change", k);
        // Cached everywhere first, so that what is measured is the feed, not a first read.
        until_all(&checks, &subject, Instant::now(), |c| {
            c == ["CONSENT_REQUIRED"]
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let through = k % args.sidecars;
        let mut rights_k = SubjectRightsClient::new(channels[through].clone());
        let sent = Instant::now();
        assert!(consent(&mut rights_k, &subject).await, "consent refused");
        let d = until_all(&checks, &subject, sent, <[String]>::is_empty).await;
        worst_per_change.push(d.iter().max().copied().unwrap_or_default());
        delays.extend(d);
    }
    delays.sort_unstable();
    println!(
        "subject change honoured by all ({} changes x {} sidecars, asked every {ASK_EVERY:?}): p50 {:?}, p99 {:?}, max {:?}",
        args.changes,
        args.sidecars,
        percentile(&delays, 50.0),
        percentile(&delays, 99.0),
        delays.last().copied().unwrap_or_default()
    );

    // Policy pushes.
    let mut push_times = Vec::new();
    for n in 0..args.pushes {
        let sent = Instant::now();
        let applied = admins[n % args.sidecars]
            .apply(with_caller(
                ApplyRequest {
                    bundle: Some(bundle(n)),
                    comment: format!("fleet-sim push {n}"),
                },
                "sim-admin",
            ))
            .await
            .expect("apply")
            .into_inner();
        let tasks: Vec<_> = admins
            .iter()
            .cloned()
            .map(|mut admin| {
                let version = applied.version.clone();
                tokio::spawn(async move {
                    loop {
                        if active(&mut admin).await.as_deref() == Some(version.as_str()) {
                            return sent.elapsed();
                        }
                        assert!(sent.elapsed() < STEP_LIMIT, "a push never arrived");
                        tokio::time::sleep(ASK_EVERY).await;
                    }
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for t in tasks {
            slowest = slowest.max(t.await.unwrap());
        }
        push_times.push(slowest);
    }
    println!("policy push active on all: {push_times:?}");

    let busy = held(&args).await;
    println!(
        "connections held, just after the run: {}",
        summarize_held(&busy, args.sidecars)
    );

    if args.restart {
        let subject = subject_name("restart", 0);
        until_all(&checks, &subject, Instant::now(), |c| {
            c == ["CONSENT_REQUIRED"]
        })
        .await;
        let (version, name) = args
            .cluster
            .split_once('/')
            .expect("--cluster VERSION/NAME");
        let restart = Instant::now();
        let status = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", version, name, "restart"])
            .status()
            .expect("pg_ctlcluster");
        assert!(status.success(), "pg_ctlcluster restart: {status}");
        let restarted = restart.elapsed();
        // The first change the database accepts after the restart, made through sidecar 0.
        loop {
            if consent(&mut rights, &subject).await {
                break;
            }
            assert!(
                restart.elapsed() < STEP_LIMIT,
                "no change accepted after the restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let accepted = restart.elapsed();
        let sent = Instant::now();
        let d = until_all(&checks, &subject, sent, <[String]>::is_empty).await;
        let slowest = d.iter().max().copied().unwrap_or_default();
        println!(
            "PostgreSQL restart: took {restarted:?}; first change accepted {accepted:?} after it began; that change honoured by all {slowest:?} after it was made ({:?} after the restart began)",
            accepted + slowest
        );
        tokio::time::sleep(Duration::from_millis(IDLE_TIMEOUT_MS) + Duration::from_secs(3)).await;
        let after = held(&args).await;
        println!(
            "connections held, idle after the restart: {}",
            summarize_held(&after, args.sidecars)
        );
    }

    let exited: Vec<usize> = sidecars
        .iter_mut()
        .enumerate()
        .filter_map(|(i, s)| s.child.try_wait().unwrap().map(|_| i))
        .collect();
    println!("sidecars that exited during the run: {exited:?}");
    for s in &mut sidecars {
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
    if let Some(mut b) = bouncer {
        let _ = b.child.kill();
        let _ = b.child.wait();
    }
    let mut conn = admin(&args).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {SIM_DB} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}
