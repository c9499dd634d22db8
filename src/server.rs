//! Running the sidecar: both listeners, the policy, the gate, and shutdown.
//! `main` checks the whole configuration and binds the ports; [`run`] is what tests drive.

use crate::audit::AuditLog;
use crate::config::Config;
use crate::decision::Decider;
use crate::gate::bundle::Bundle;
use crate::gate::{
    FileStore, Gate, GateParts, PolicyManager, PolicyStore, PostgresPolicyStore, Subjects,
};
use crate::identity::CallerNaming;
use crate::policy::Snapshot;
use crate::registry::{PostgresRegistry, SqliteRegistry, SubjectCache, SubjectCacheSettings};
use crate::sidecar;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{Telemetry, TelemetryError};
use crate::transport::tls::ServerTls;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The sockets the sidecar serves on, bound before anything else starts.
pub struct Listeners {
    pub data: TcpListener,
    pub api: TcpListener,
    /// The plaintext probe listener (`admin_listen`), when configured.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// The data plane and the API; no probe listener (see [`Listeners::with_admin`]).
    pub async fn bind(data: SocketAddr, api: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            data: TcpListener::bind(data).await?,
            api: TcpListener::bind(api).await?,
            admin: None,
        })
    }

    /// Also binds the probe listener on `admin`, if given.
    pub async fn with_admin(mut self, admin: Option<SocketAddr>) -> std::io::Result<Self> {
        if let Some(addr) = admin {
            self.admin = Some(TcpListener::bind(addr).await?);
        }
        Ok(self)
    }

    pub fn data_addr(&self) -> std::io::Result<SocketAddr> {
        self.data.local_addr()
    }

    pub fn api_addr(&self) -> std::io::Result<SocketAddr> {
        self.api.local_addr()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("upstream `{upstream}`: {source}")]
    Upstream {
        upstream: String,
        source: tonic::transport::Error,
    },
    #[error("data plane: {0}")]
    DataPlane(#[source] tonic::transport::Error),
    #[error("API server: {0}")]
    Api(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("probe listener: {0}")]
    Probes(#[source] tonic::transport::Error),
    /// A server task ended before the shutdown signal, without an error of its own.
    #[error("{0} stopped unexpectedly; pdgate stops with it")]
    Stopped(&'static str),
    /// A server task panicked or was cancelled.
    #[error("{0} crashed: {1}")]
    Crashed(&'static str, #[source] tokio::task::JoinError),
    #[error("`fleet.database_url`: {0}")]
    Fleet(#[source] crate::gate::StoreError),
    #[error("`telemetry.otlp_endpoint`: {0}")]
    Telemetry(#[from] TelemetryError),
    #[error("`tls`: {}", crate::transport::tls::error_chain(.0))]
    Tls(#[source] crate::transport::tls::TlsError),
}

/// Loads the configured policy and runs its tests, as a reload does. A policy that cannot be
/// read, is invalid, has no test cases or fails one is logged with every problem and `None`
/// is returned: the sidecar then runs `NOT_SERVING` and denies every call
/// (`POLICY_UNAVAILABLE`) until a bundle that passes is loaded (the file watch, Apply).
pub async fn load_policy(config: &Config) -> Option<Arc<Snapshot>> {
    let bundle = match Bundle::read_dir(&config.policy, config.routes.as_deref()) {
        Ok(bundle) => bundle,
        Err(problems) => {
            for p in problems {
                tracing::error!(problem = %p, "policy cannot be read");
            }
            return None;
        }
    };
    match crate::gate::bundle::check(&bundle).await {
        Ok(checked) => {
            let snapshot = checked.snapshot;
            tracing::info!(
                version = %snapshot.version(),
                rules = snapshot.rule_count(),
                routes = snapshot.route_count(),
                tests = checked.cases,
                "policy loaded; its tests passed"
            );
            for warning in snapshot.warnings() {
                tracing::warn!(%warning, "policy");
            }
            Some(snapshot)
        }
        Err(e) => {
            for p in e.problems() {
                tracing::error!(problem = %p, error = %e, "policy refused at start; every call is denied until a policy that passes its tests is loaded");
            }
            None
        }
    }
}

/// Opens the subject registry `config` names — PostgreSQL in fleet mode (lazily: the sidecar
/// starts while the database is down), else the SQLite file `subjects.path` (created on first
/// run) — behind the decision path's cache, and starts its change feed. The feed's task ends
/// when the cache is dropped (after the servers stop).
pub async fn open_subject_cache(
    config: &Config,
) -> Result<Arc<SubjectCache>, crate::registry::RegistryError> {
    let mut settings = SubjectCacheSettings {
        stale_after: config.subjects.stale_after,
        max_entries: config.subjects.cache_max_entries,
        ..SubjectCacheSettings::default()
    };
    match &config.fleet {
        Some(fleet) => {
            // A read in the decision path waits at most this long, below the server-side
            // statement timeout when that is long: a call should not hang on a dead database.
            settings.read_timeout = fleet.statement_timeout.min(Duration::from_secs(1));
            // One pool and one change feed for the registry and the policy store (`gate`
            // takes them from the cache): see registry::feed.
            let pool = crate::registry::feed::pool(fleet, settings.read_timeout)?;
            let store = PostgresRegistry::from_lazy_pool(pool.clone());
            let cache = Arc::new(SubjectCache::new(Arc::new(store), settings));
            drop(cache.spawn_fleet_feed(
                pool,
                Some(crate::registry::PolicySignal::new()),
                fleet.change_feed,
            ));
            Ok(cache)
        }
        None => {
            // A few polls missed (100 ms each) and the state is read again.
            settings.refresh_after = Duration::from_millis(300);
            let store = SqliteRegistry::open(&config.subjects.path).await?;
            let cache = Arc::new(SubjectCache::new(Arc::new(store.clone()), settings));
            drop(cache.spawn_sqlite_feed(store).await?);
            Ok(cache)
        }
    }
}

/// Builds the gate for `config` with `policy` (if any) and `subjects`, and starts the OTLP
/// exporters when `config.telemetry` names an endpoint (inside the tokio runtime: their
/// channels live on it). [`run`] stops them when the servers have stopped.
pub fn gate(
    config: &Config,
    policy: Option<Arc<Snapshot>>,
    subjects: Subjects,
    audit: AuditLog,
) -> Result<Arc<Gate>, ServeError> {
    let decider = Arc::new(Decider::new(config.cache));
    let metrics = Arc::new(
        Metrics::new(decider.cache_stats().clone(), audit.clone())
            .with_shadow_stats(decider.shadow_stats().clone()),
    );
    if let Subjects::Registry(cache) = &subjects {
        metrics.report_registry_reads(cache.read_stats().clone());
    }
    let telemetry = Telemetry::start(&config.telemetry, metrics)?
        .with_audit_export(&config.telemetry, &audit)?;
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        tracing::info!(%endpoint, service = %config.telemetry.service_name, "exporting spans and metrics over OTLP");
    }
    if let Some(policy) = policy {
        decider.set_policy(policy);
    }
    // Embedded: the policy directory is the store, Apply and Rollback write into it (see
    // gate::store). Fleet: PostgreSQL is, on the pool and change feed of the subject cache
    // (one feed per sidecar wakes the watch on every new version).
    let store: Arc<dyn PolicyStore> = match &config.fleet {
        Some(fleet) => {
            let link = match &subjects {
                Subjects::Registry(cache) => cache.fleet().cloned(),
                _ => None,
            };
            match link {
                Some(link) => Arc::new(PostgresPolicyStore::on_link(&link)),
                None => Arc::new(PostgresPolicyStore::start(fleet).map_err(ServeError::Fleet)?),
            }
        }
        None => Arc::new(FileStore::new(config.policy.clone(), config.routes.clone())),
    };
    let policies = PolicyManager::new(
        decider,
        store,
        config.reload.keep_versions,
        Some(telemetry.metrics().clone()),
    );
    // The tests kept with the start version, for a rollback to it; unreadable tests are
    // reported by the first reload that needs them.
    policies.adopt(
        crate::gate::bundle::read_tests(&config.policy.join(crate::gate::bundle::TESTS_DIR))
            .unwrap_or_default(),
    );
    let naming = CallerNaming {
        uri_prefix: config.tls.as_ref().map_or_else(
            || crate::config::DEFAULT_URI_PREFIX.to_owned(),
            |t| t.uri_prefix.clone(),
        ),
        dns_suffix: config.tls.as_ref().and_then(|t| t.dns_suffix.clone()),
    };
    Ok(Arc::new(Gate::new(GateParts {
        policies: Arc::new(policies),
        subjects,
        audit,
        telemetry,
        identity: config.identity,
        naming,
        mesh: config.mesh.clone(),
        admin_roles: config.admin_roles.clone(),
    })))
}

/// Serves the data plane and the API until `shutdown` completes; then both stop accepting
/// and calls in flight get `config.shutdown_grace` to finish. Last, the telemetry still
/// buffered is exported and the exporters stop.
pub async fn run(
    config: &Config,
    listeners: Listeners,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let result = serve(config, listeners, gate.clone(), shutdown).await;
    gate.telemetry().shutdown().await;
    result
}

/// The servers (data plane, API, probe listener), each on its own task.
type Server = tokio::task::JoinHandle<Result<(), ServeError>>;

async fn serve(
    config: &Config,
    listeners: Listeners,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let upstream =
        sidecar::upstream_channel(&config.upstream, &config.limits).map_err(|source| {
            ServeError::Upstream {
                upstream: config.upstream.clone(),
                source,
            }
        })?;
    // One signal, two servers: the watch channel fans it out.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // One TLS configuration for both ports, its files read again until the stop signal.
    let tls = match &config.tls {
        Some(files) => {
            let tls = ServerTls::new(files).map_err(ServeError::Tls)?;
            drop(tokio::spawn(tls.clone().watch(
                gate.telemetry().metrics().clone(),
                stopped(stop_rx.clone()),
            )));
            Some(tls)
        }
        None => None,
    };
    let data: Server = {
        let (tls, gate, stop) = (tls.clone(), gate.clone(), stopped(stop_rx.clone()));
        let (max_calls, limits) = (config.max_concurrent_calls, config.limits.clone());
        tokio::spawn(async move {
            sidecar::serve_data_plane(
                listeners.data,
                gate,
                upstream,
                max_calls,
                &limits,
                tls,
                stop,
            )
            .await
            .map_err(ServeError::DataPlane)
        })
    };
    // The file watch (`[reload] watch`) ends with the same stop signal. A fleet member always
    // watches: that is how it follows the fleet's applies.
    let watch = (config.reload.watch || config.fleet.is_some()).then(|| {
        tokio::spawn(crate::gate::watch::run(
            gate.policies().clone(),
            config.reload.debounce,
            stopped(stop_rx.clone()),
        ))
    });
    // The probe listener (`admin_listen`) is optional; when configured it is a server like the
    // other two: one that ends early ends pdgate.
    let probes: Option<Server> = listeners.admin.map(|listener| {
        let (gate, stop) = (gate.clone(), stopped(stop_rx.clone()));
        tokio::spawn(async move {
            crate::api::probes::serve_probes(listener, gate, stop)
                .await
                .map_err(ServeError::Probes)
        })
    });
    let api: Server = {
        let (limits, stop) = (config.limits.clone(), stopped(stop_rx));
        tokio::spawn(async move {
            crate::api::serve_api(listeners.api, gate, tls, &limits, stop)
                .await
                .map_err(ServeError::Api)
        })
    };
    let mut servers = vec![("data plane", data), ("API server", api)];
    servers.extend(probes.map(|p| ("probe listener", p)));
    // Every server runs until the shutdown signal. One that ends before it — a listener that
    // failed, a task that panicked — ends pdgate: half a sidecar (health answering while no
    // call can pass, or the reverse) must not keep running.
    let early = {
        let first_to_end = futures_util::future::select_all(
            servers
                .iter_mut()
                .map(|(name, server)| Box::pin(async move { (*name, server.await) })),
        );
        tokio::select! {
            ((name, ended), _, _) = first_to_end => Some((name, ended)),
            () = shutdown => None,
        }
    };
    let _ = stop_tx.send(true);
    if let Some(watch) = watch {
        let _ = watch.await;
    }
    if let Some((name, ended)) = early {
        for (_, server) in &servers {
            server.abort();
        }
        return Err(match ended {
            Ok(Err(e)) => e,
            Ok(Ok(())) => ServeError::Stopped(name),
            Err(e) => ServeError::Crashed(name, e),
        });
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new calls, draining calls in flight");
    let drained = async {
        let mut first_error = None;
        for (name, server) in servers {
            let result = match server.await {
                Ok(result) => result,
                Err(e) => Err(ServeError::Crashed(name, e)),
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    };
    match tokio::time::timeout(config.shutdown_grace, drained).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("calls still in flight after the grace period; closing them");
            Ok(())
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// How long to wait, in tests and the demo, for a server to accept connections.
pub const STARTUP_WAIT: Duration = Duration::from_secs(5);
