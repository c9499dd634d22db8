//! `pdgate serve` and `pdgate demo`.

use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE};
use crate::audit::{AuditLog, AuditSettings};
use crate::config::{Config, ConfigError, FileConfig};
use crate::demo::customer::CustomerService;
use crate::demo::walkthrough;
use crate::gate::Subjects;
use crate::identity::IdentityMode;
use crate::server::{self, Listeners};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Debug, Args)]
#[command(
    after_help = "Flags override the configuration file; every key is documented in \
deploy/pdgate.toml. The whole configuration is checked before any port is bound (exit 2 names \
the key). SIGTERM or SIGINT stops accepting calls and drains those in flight (exit 0).\n\n\
Example:\n  pdgate serve --upstream 127.0.0.1:50051 --policy policy/ --identity insecure-header"
)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE", env = "PDGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data-plane address: callers connect here instead of to the service [default: 127.0.0.1:8443].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// pdgate's own API (AccessControl, health, reflection) [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    api_listen: Option<String>,
    /// Plaintext HTTP/1.1 probe listener: GET /metrics, /livez, /readyz, no TLS and no
    /// identity; e.g. 127.0.0.1:9091 [default: none, off].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// The protected service, HOST:PORT or http://URI [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    upstream: Option<String>,
    /// Policy directory [default: policy].
    #[arg(long, value_name = "DIR", env = "PDGATE_POLICY")]
    policy: Option<PathBuf>,
    /// Routes file [default: DIR/routes.yaml].
    #[arg(long, value_name = "FILE")]
    routes: Option<PathBuf>,
    /// How callers are identified: `mtls` (client certificate), `mesh` (the service mesh's
    /// verified-peer header, from its local proxy only; `[mesh]` in the config) or
    /// `insecure-header` (the `x-caller` metadata; development only) [default:
    /// insecure-header].
    #[arg(long, value_name = "MODE")]
    identity: Option<String>,
    /// Most decisions kept in the cache [default: 100000].
    #[arg(long, value_name = "N")]
    cache_max_entries: Option<u64>,
    /// How long a cached decision is kept, e.g. 5m [default: 300s].
    #[arg(long = "cache-ttl", value_name = "DURATION", value_parser = super::parse_seconds)]
    cache_ttl_seconds: Option<u64>,
    /// Deprecated spelling of --cache-ttl (bare seconds).
    #[arg(long = "cache-ttl-seconds", value_name = "SECONDS", hide = true,
        value_parser = super::deprecated_flag::<u64>("--cache-ttl-seconds", "--cache-ttl"))]
    old_cache_ttl_seconds: Option<u64>,
    /// Calls in flight before new ones are shed with RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long, value_name = "N")]
    max_concurrent_calls: Option<usize>,
    /// How long calls in flight get to finish after SIGTERM, e.g. 30s [default: 30s].
    #[arg(long = "shutdown-grace", value_name = "DURATION", value_parser = super::parse_seconds)]
    shutdown_grace_seconds: Option<u64>,
    /// Deprecated spelling of --shutdown-grace (bare seconds).
    #[arg(long = "shutdown-grace-seconds", value_name = "SECONDS", hide = true,
        value_parser = super::deprecated_flag::<u64>("--shutdown-grace-seconds", "--shutdown-grace"))]
    old_shutdown_grace_seconds: Option<u64>,
    /// Directory of the audit log [default: audit].
    #[arg(long = "audit", value_name = "DIR", env = "PDGATE_AUDIT")]
    audit_dir: Option<PathBuf>,
    /// Deprecated spelling of --audit.
    #[arg(long = "audit-dir", value_name = "DIR", hide = true,
        value_parser = super::deprecated_flag::<PathBuf>("--audit-dir", "--audit"))]
    old_audit_dir: Option<PathBuf>,
    /// Export spans and metrics over OTLP/gRPC to this collector, http://HOST:PORT
    /// [default: none, nothing exported].
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The embedded subject registry, a SQLite file created on first run
    /// [default: subjects.db].
    #[arg(long, value_name = "PATH", env = "PDGATE_SUBJECTS")]
    subjects_store: Option<PathBuf>,
    /// Fleet mode: the PostgreSQL database shared by the fleet's sidecars (policy versions and
    /// subject registry), `postgres://USER@HOST:PORT/DATABASE`. From the environment, it keeps
    /// the password out of the configuration file [default: none, embedded mode].
    #[arg(
        long,
        value_name = "URL",
        env = "PDGATE_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Fleet mode: how changes reach this sidecar, `listen` (LISTEN/NOTIFY, direct to
    /// PostgreSQL) or `poll` (the change table, through a transaction-mode pooler such as
    /// PgBouncer) [default: listen].
    #[arg(long, value_name = "FEED", env = "PDGATE_CHANGE_FEED")]
    change_feed: Option<String>,
    /// pdgate's log on stderr: `text` (coloured only on a terminal) or `json` (one object per
    /// line) [default: text]. Which events: PDGATE_LOG, e.g. `debug` [default: warn,pdgate=info].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
}

impl ServeArgs {
    /// The file's configuration with the flags on top. An error about a value that came from
    /// a flag names the flag, not the file.
    fn config(mut self) -> Result<Config, ConfigError> {
        // A deprecated spelling given on the command line counts as its flag.
        self.cache_ttl_seconds = self.old_cache_ttl_seconds.or(self.cache_ttl_seconds);
        self.shutdown_grace_seconds = self
            .old_shutdown_grace_seconds
            .or(self.shutdown_grace_seconds);
        self.audit_dir = self.old_audit_dir.take().or(self.audit_dir);
        let (mut file, origin) = match &self.config {
            Some(path) => (FileConfig::read(path)?, path.display().to_string()),
            None => (FileConfig::default(), "command line".to_owned()),
        };
        // (config key, flag) of every flag given.
        let mut from_flags: Vec<(&str, &str)> = Vec::new();
        let mut flag = |given: bool, key: &'static str, name: &'static str| {
            if given {
                from_flags.push((key, name));
            }
        };
        flag(self.listen.is_some(), "listen", "--listen");
        flag(self.api_listen.is_some(), "api_listen", "--api-listen");
        flag(
            self.admin_listen.is_some(),
            "admin_listen",
            "--admin-listen",
        );
        flag(self.upstream.is_some(), "upstream", "--upstream");
        flag(self.identity.is_some(), "identity", "--identity");
        flag(self.policy.is_some(), "policy", "--policy");
        flag(self.routes.is_some(), "routes", "--routes");
        flag(
            self.cache_max_entries.is_some(),
            "cache.max_entries",
            "--cache-max-entries",
        );
        flag(
            self.cache_ttl_seconds.is_some(),
            "cache.ttl_seconds",
            "--cache-ttl",
        );
        flag(
            self.max_concurrent_calls.is_some(),
            "limits.max_concurrent_calls",
            "--max-concurrent-calls",
        );
        flag(
            self.shutdown_grace_seconds.is_some(),
            "limits.shutdown_grace_seconds",
            "--shutdown-grace",
        );
        flag(self.audit_dir.is_some(), "audit.dir", "--audit");
        flag(
            self.otlp_endpoint.is_some(),
            "telemetry.otlp_endpoint",
            "--otlp-endpoint",
        );
        flag(
            self.subjects_store.is_some(),
            "subjects.path",
            "--subjects-store",
        );
        flag(
            self.database_url.is_some(),
            "fleet.database_url",
            "--database-url",
        );
        flag(
            self.change_feed.is_some(),
            "fleet.change_feed",
            "--change-feed",
        );
        flag(self.log_format.is_some(), "log.format", "--log-format");
        file.listen = self.listen.or(file.listen);
        file.api_listen = self.api_listen.or(file.api_listen);
        file.admin_listen = self.admin_listen.or(file.admin_listen);
        file.upstream = self.upstream.or(file.upstream);
        file.identity = self.identity.or(file.identity);
        file.policy = self.policy.or(file.policy);
        file.routes = self.routes.or(file.routes);
        file.cache.max_entries = self.cache_max_entries.or(file.cache.max_entries);
        file.cache.ttl_seconds = self.cache_ttl_seconds.or(file.cache.ttl_seconds);
        file.limits.max_concurrent_calls = self
            .max_concurrent_calls
            .or(file.limits.max_concurrent_calls);
        file.limits.shutdown_grace_seconds = self
            .shutdown_grace_seconds
            .or(file.limits.shutdown_grace_seconds);
        file.audit.dir = self.audit_dir.or(file.audit.dir);
        file.telemetry.otlp_endpoint = self.otlp_endpoint.or(file.telemetry.otlp_endpoint);
        file.subjects.path = self.subjects_store.or(file.subjects.path);
        file.fleet.database_url = self.database_url.or(file.fleet.database_url);
        file.fleet.change_feed = self.change_feed.or(file.fleet.change_feed);
        file.log.format = self.log_format.or(file.log.format);
        file.resolve(&origin).map_err(|mut e| {
            if let Some((_, name)) = from_flags.iter().find(|(key, _)| *key == e.key) {
                e.origin = "command line".to_owned();
                (*name).clone_into(&mut e.key);
            }
            e
        })
    }
}

/// `PDGATE_LOG` when it is not set.
const DEFAULT_LOG_FILTER: &str = "warn,pdgate=info";

pub async fn serve(args: ServeArgs) -> u8 {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    // At the default level: pdgate's own lifecycle (listeners, policy loads, shutdown); a
    // dependency's events only when they are warnings.
    crate::telemetry::logs::init(config.log_format, DEFAULT_LOG_FILTER);
    // The audit log is part of the configuration: one that cannot be opened is a bad
    // `audit.dir`, reported before any port is bound.
    let (audit, writer, head) = match AuditLog::open(config.audit.clone()) {
        Ok(opened) => opened,
        Err(e) => {
            eprintln!("error: `audit.dir`: {e}");
            return EXIT_USAGE;
        }
    };
    tracing::info!(dir = %config.audit.dir.display(), records = head.seq, "audit log open");
    let policy = server::load_policy(&config).await;
    // The subject registry: a SQLite file that cannot be opened is a bad `subjects.path` (a
    // fleet database is connected lazily: only a malformed URL is refused here).
    let subjects = match server::open_subject_cache(&config).await {
        Ok(cache) => cache,
        Err(e) => {
            let key = if config.fleet.is_some() {
                "fleet.database_url"
            } else {
                "subjects.path"
            };
            eprintln!("error: `{key}`: {e}");
            writer.close().await;
            return EXIT_USAGE;
        }
    };
    // Before any port is bound: an OTLP exporter that cannot be built is a bad
    // `telemetry.otlp_endpoint`.
    let gate = match server::gate(&config, policy, Subjects::Registry(subjects), audit) {
        Ok(gate) => gate,
        Err(e) => {
            eprintln!("error: {e}");
            writer.close().await;
            return EXIT_USAGE;
        }
    };
    let bound = match Listeners::bind(config.listen, config.api_listen).await {
        Ok(l) => l.with_admin(config.admin_listen).await,
        Err(e) => Err(e),
    };
    let listeners = match bound {
        Ok(l) => l,
        Err(e) => {
            let admin = config
                .admin_listen
                .map_or(String::new(), |a| format!(" / `{a}`"));
            eprintln!(
                "error: cannot bind `{}` / `{}`{admin}: {e}",
                config.listen, config.api_listen
            );
            gate.telemetry().shutdown().await;
            writer.close().await;
            return EXIT_DENIED;
        }
    };
    if config.identity == IdentityMode::InsecureHeader {
        tracing::warn!(
            "identity mode insecure-header: callers name themselves in x-caller; development only"
        );
    }
    // One line per listener, with the bound address, not the configured one: with port 0 the
    // kernel picks, and these lines are how a supervisor (or a test) learns which.
    let identity = config.identity.as_str();
    let data = listeners.data_addr().unwrap_or(config.listen);
    let api = listeners.api_addr().unwrap_or(config.api_listen);
    tracing::info!(listener = "data", addr = %data, identity, upstream = %config.upstream, "listening");
    tracing::info!(listener = "api", addr = %api, identity, "listening");
    if let Some(admin) = listeners.admin.as_ref().and_then(|l| l.local_addr().ok()) {
        // Plaintext and anonymous whatever the identity mode: probes and scrapes only.
        tracing::info!(listener = "admin", addr = %admin, identity = "none", "listening");
    }
    let result = server::run(&config, listeners, gate, server::shutdown_signal()).await;
    // A clean shutdown writes every record still queued.
    writer.close().await;
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_DENIED
        }
    }
}

#[derive(Debug, Args)]
#[command(
    after_help = "Starts the demo customer-data service and pdgate in front of it on \
embedded defaults (insecure-header identity, loopback only), walks through allowed and denied \
calls with a real gRPC client, prints how to call it yourself, and exits 0. A default port \
that is taken is replaced by a free one."
)]
pub struct DemoArgs {
    /// Keep the service and the sidecar running until interrupted.
    #[arg(long)]
    serve: bool,
    /// Policy directory.
    #[arg(
        long,
        value_name = "DIR",
        env = "PDGATE_POLICY",
        default_value = "policy"
    )]
    policy: PathBuf,
}

/// Binds `addr`, or a free port on the same host when it is taken.
async fn bind_or_any(addr: &str) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            TcpListener::bind("127.0.0.1:0").await
        }
        Err(e) => Err(e),
    }
}

pub async fn demo(args: DemoArgs) -> u8 {
    if !args.policy.is_dir() {
        eprintln!(
            "error: --policy `{}` is not a directory (run from the repository root, or give --policy DIR)",
            args.policy.display()
        );
        return EXIT_USAGE;
    }
    let bound = async {
        let upstream = bind_or_any(crate::config::DEFAULT_UPSTREAM).await?;
        let data = bind_or_any(crate::config::DEFAULT_LISTEN).await?;
        let api = bind_or_any(crate::config::DEFAULT_API_LISTEN).await?;
        Ok::<_, std::io::Error>((
            upstream,
            Listeners {
                data,
                api,
                admin: None,
            },
        ))
    };
    let (upstream_listener, listeners) = match bound.await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot bind a loopback port: {e}");
            return EXIT_DENIED;
        }
    };
    let addr = |l: &TcpListener| {
        l.local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    };
    let (upstream_addr, data_addr, api_addr) = (
        addr(&upstream_listener),
        addr(&listeners.data),
        addr(&listeners.api),
    );
    let config = Config {
        listen: data_addr,
        api_listen: api_addr,
        admin_listen: None,
        upstream: upstream_addr.to_string(),
        policy: args.policy.clone(),
        routes: None,
        identity: IdentityMode::InsecureHeader,
        tls: None,
        mesh: None,
        cache: crate::decision::CacheSettings::default(),
        max_concurrent_calls: 1024,
        limits: crate::config::Limits::default(),
        shutdown_grace: std::time::Duration::from_secs(5),
        // Each demo run starts a fresh audit log of its own.
        audit: AuditSettings::new(std::env::temp_dir().join(format!(
            "pdgate-demo-audit-{}-{}",
            std::process::id(),
            crate::audit::now_us()
        ))),
        telemetry: crate::telemetry::TelemetrySettings::default(),
        admin_roles: crate::identity::AdminRoles::default(),
        subjects: crate::config::SubjectsSettings::default(),
        fleet: None,
        reload: crate::config::ReloadSettings {
            watch: false,
            ..crate::config::ReloadSettings::default()
        },
        log_format: crate::telemetry::logs::LogFormat::Text,
    };
    let Some(policy) = server::load_policy(&config).await else {
        eprintln!(
            "error: the policy in `{}` is invalid; run `pdgate policy validate {}`",
            args.policy.display(),
            args.policy.display()
        );
        return EXIT_DENIED;
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let service = CustomerService::new();
    let upstream_task = tokio::spawn(service.serve(upstream_listener, stopped(stop_rx.clone())));
    let (audit, audit_writer, _) = match AuditLog::open(config.audit.clone()) {
        Ok(opened) => opened,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_DENIED;
        }
    };
    let gate = match server::gate(
        &config,
        Some(policy),
        Subjects::Fixed(Arc::new(walkthrough::demo_subjects())),
        audit,
    ) {
        Ok(gate) => gate,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_DENIED;
        }
    };
    let sidecar_config = config.clone();
    let sidecar_stop = stopped(stop_rx);
    let sidecar_task =
        tokio::spawn(
            async move { server::run(&sidecar_config, listeners, gate, sidecar_stop).await },
        );

    outln!(
        "pdgate demo: customer-data service on {upstream_addr}, pdgate in front of it on {data_addr} (API {api_addr})\n"
    );
    let summary = match tonic::transport::Endpoint::from_shared(format!("http://{data_addr}")) {
        Ok(endpoint) => match endpoint.connect().await {
            Ok(channel) => {
                let mut report = String::new();
                let summary = walkthrough::run(channel, &mut report).await;
                out!("{report}");
                Some(summary)
            }
            Err(e) => {
                eprintln!("error: cannot reach the sidecar at {data_addr}: {e}");
                None
            }
        },
        Err(e) => {
            eprintln!("error: bad sidecar address {data_addr}: {e}");
            None
        }
    };
    if let Some(s) = &summary {
        outln!(
            "\n{} calls allowed, {} denied, {} not as the policy promises",
            s.allowed,
            s.denied,
            s.unexpected.len()
        );
        for u in &s.unexpected {
            outln!("  UNEXPECTED {u}");
        }
    }
    outln!(
        "\nCall it yourself (grpcurl, from the repository root):\n  \
grpcurl -plaintext -import-path proto -proto demo/customer/v1/customer.proto \\\n    \
-H 'x-caller: billing-service' -H 'x-purpose: service.billing' -H 'x-data-subject: cust-1' \\\n    \
-d '{{\"customer_id\": \"cust-1\"}}' {data_addr} demo.customer.v1.CustomerData/GetBillingStatement\n  \
grpcurl -plaintext -d '{{\"caller\": \"marketing-service\", \"purpose\": \"marketing.email\", \"action\": \"read\", \"categories\": [\"customer.contact.email\"], \"subjects\": [\"cust-1\"]}}' \\\n    \
{api_addr} pdgate.v1.AccessControl/Check\n  \
grpcurl -plaintext {api_addr} grpc.health.v1.Health/Check"
    );
    if args.serve {
        outln!("\nServing until interrupted (Ctrl-C).");
        server::shutdown_signal().await;
    }
    let _ = stop_tx.send(true);
    let sidecar = sidecar_task.await;
    let upstream = upstream_task.await;
    audit_writer.close().await;
    let audit_dir = config.audit.dir.display();
    match crate::audit::read::verify(&config.audit.dir) {
        Ok(v) if v.ok() => outln!(
            "\nEvery decision above is in the audit log, hash-chained ({} records, chain verified):\n  \
pdgate audit query --audit {audit_dir} --subject cust-4\n  \
pdgate audit verify --audit {audit_dir}",
            v.records
        ),
        Ok(v) => outln!("\naudit log {audit_dir}: {:?}", v.first_break),
        Err(e) => outln!("\naudit log {audit_dir}: {e}"),
    }
    let clean = matches!(sidecar, Ok(Ok(()))) && matches!(upstream, Ok(Ok(())));
    match summary {
        Some(s) if s.unexpected.is_empty() && clean => EXIT_OK,
        _ => EXIT_DENIED,
    }
}
