//! Running the sidecar: both listeners, the policy, the shared state, and shutdown.
//! `main` checks the whole configuration and binds the ports; [`run`] is what tests drive.

use crate::audit::AuditLog;
use crate::config::Config;
use crate::decision::Decider;
use crate::policy::{PolicySource, Snapshot, compile};
use crate::registry::{PostgresRegistry, SqliteRegistry, SubjectCache, SubjectCacheSettings};
use crate::sidecar::{self, Shared};
use crate::subjects::SubjectStates;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{Telemetry, TelemetryError};
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
}

impl Listeners {
    pub async fn bind(data: SocketAddr, api: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            data: TcpListener::bind(data).await?,
            api: TcpListener::bind(api).await?,
        })
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
    DataPlane(tonic::transport::Error),
    #[error("API server: {0}")]
    Api(Box<dyn std::error::Error + Send + Sync>),
    #[error("`fleet.database_url`: {0}")]
    Fleet(String),
    #[error("`telemetry.otlp_endpoint`: {0}")]
    Telemetry(#[from] TelemetryError),
}

/// Loads the configured policy. An invalid policy is logged with every problem and `None` is
/// returned: the sidecar then runs `NOT_SERVING` and denies every call (`POLICY_UNAVAILABLE`).
pub async fn load_policy(config: &Config) -> Option<Arc<Snapshot>> {
    let source = match PolicySource::read(&config.policy, config.routes.as_deref()) {
        Ok(s) => s,
        Err(problems) => {
            for p in problems {
                tracing::error!(problem = %p, "policy cannot be read");
            }
            return None;
        }
    };
    match compile(source).await {
        Ok(snapshot) => {
            tracing::info!(
                version = %snapshot.version(),
                rules = snapshot.rule_count(),
                routes = snapshot.route_count(),
                "policy loaded"
            );
            Some(Arc::new(snapshot))
        }
        Err(problems) => {
            for p in &problems.0 {
                tracing::error!(problem = %p, "invalid policy; every call is denied until a valid one is loaded");
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
            let store = PostgresRegistry::connect_lazy(
                &fleet.database_url,
                fleet.statement_timeout,
                settings.read_timeout,
            )?;
            let cache = Arc::new(SubjectCache::new(Arc::new(store.clone()), settings));
            drop(cache.spawn_postgres_feed(store));
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

/// [`shared_state`] with subject state from `cache` (see [`open_subject_cache`]).
pub fn shared_state_with_registry(
    config: &Config,
    policy: Option<Arc<Snapshot>>,
    cache: Arc<SubjectCache>,
    audit: AuditLog,
) -> Result<Arc<Shared>, ServeError> {
    let mut shared = build_shared(config, policy, cache.clone(), audit)?;
    shared.subject_cache = Some(cache);
    Ok(Arc::new(shared))
}

/// Builds the shared state for `config` with `policy` (if any), and starts the OTLP
/// exporters when `config.telemetry` names an endpoint (inside the tokio runtime: their
/// channels live on it). [`run`] stops them when the servers have stopped.
pub fn shared_state(
    config: &Config,
    policy: Option<Arc<Snapshot>>,
    subjects: Arc<dyn SubjectStates>,
    audit: AuditLog,
) -> Result<Arc<Shared>, ServeError> {
    build_shared(config, policy, subjects, audit).map(Arc::new)
}

fn build_shared(
    config: &Config,
    policy: Option<Arc<Snapshot>>,
    subjects: Arc<dyn SubjectStates>,
    audit: AuditLog,
) -> Result<Shared, ServeError> {
    let decider = Arc::new(Decider::new(config.cache));
    let metrics = Arc::new(
        Metrics::new(decider.cache_stats().clone(), audit.clone())
            .with_shadow_stats(decider.shadow_stats().clone()),
    );
    let telemetry = Telemetry::start(&config.telemetry, metrics)?;
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        tracing::info!(%endpoint, service = %config.telemetry.service_name, "exporting spans and metrics over OTLP");
    }
    if let Some(policy) = policy {
        decider.set_policy(policy);
    }
    let naming = crate::sidecar::identity::CallerNaming {
        uri_prefix: config.tls.as_ref().map_or_else(
            || crate::config::DEFAULT_URI_PREFIX.to_owned(),
            |t| t.uri_prefix.clone(),
        ),
        dns_suffix: config.tls.as_ref().and_then(|t| t.dns_suffix.clone()),
    };
    let mut shared = Shared::new(
        decider,
        subjects,
        audit,
        config.identity,
        naming,
        config.max_concurrent_calls,
        telemetry,
    );
    shared.admin_roles = config.admin_roles.clone();
    // Embedded: the policy directory is the store, Apply and Rollback write into it (see
    // policy::store). Fleet: PostgreSQL is, and its listener wakes the watch on every NOTIFY;
    // the listener runs as long as the runtime (it holds only the store's connection).
    let store: Arc<dyn crate::policy::PolicyStore> = match &config.fleet {
        Some(fleet) => {
            let store = crate::policy::PostgresPolicyStore::connect_lazy(
                &fleet.database_url,
                fleet.statement_timeout,
            )
            .map_err(|e| ServeError::Fleet(e.to_string()))?;
            drop(tokio::spawn(store.clone().listen(std::future::pending())));
            Arc::new(store)
        }
        None => Arc::new(crate::policy::FileStore::new(
            config.policy.clone(),
            config.routes.clone(),
        )),
    };
    let policies = crate::policy::PolicyManager::new(
        shared.decider.clone(),
        store,
        config.reload.keep_versions,
        Some(shared.telemetry.metrics().clone()),
    );
    // The tests kept with the start version, for a rollback to it; unreadable tests are
    // reported by the first reload that needs them.
    policies.adopt(
        crate::policy::bundle::read_tests(&config.policy.join(crate::policy::bundle::TESTS_DIR))
            .unwrap_or_default(),
    );
    shared.policies = Arc::new(policies);
    Ok(shared)
}

/// Serves the data plane and the API until `shutdown` completes; then both stop accepting
/// and calls in flight get `config.shutdown_grace` to finish. Last, the telemetry still
/// buffered is exported and the exporters stop.
pub async fn run(
    config: &Config,
    listeners: Listeners,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let result = serve(config, listeners, shared.clone(), shutdown).await;
    shared.telemetry.shutdown().await;
    result
}

async fn serve(
    config: &Config,
    listeners: Listeners,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let upstream =
        sidecar::upstream_channel(&config.upstream).map_err(|source| ServeError::Upstream {
            upstream: config.upstream.clone(),
            source,
        })?;
    // One signal, two servers: the watch channel fans it out.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let data_tls = config.tls.clone();
    let data_shared = shared.clone();
    let data_stop = stopped(stop_rx.clone());
    let data = tokio::spawn(async move {
        sidecar::serve_data_plane(
            listeners.data,
            data_shared,
            upstream,
            data_tls.as_ref(),
            data_stop,
        )
        .await
    });
    // The file watch (`[reload] watch`) ends with the same stop signal. A fleet member always
    // watches: that is how it follows the fleet's applies.
    let watch = (config.reload.watch || config.fleet.is_some()).then(|| {
        tokio::spawn(crate::policy::watch::run(
            shared.policies.clone(),
            config.reload.debounce,
            stopped(stop_rx.clone()),
        ))
    });
    let api_tls = config.tls.clone();
    let api_stop = stopped(stop_rx);
    let api = tokio::spawn(async move {
        crate::api::serve_api(listeners.api, shared, api_tls.as_ref(), api_stop).await
    });
    let servers = async {
        let data = data.await;
        let api = api.await;
        (data, api)
    };
    tokio::pin!(servers);
    tokio::select! {
        (data, api) = &mut servers => {
            if let Some(watch) = &watch {
                watch.abort();
            }
            return finished(data, api);
        }
        () = shutdown => {}
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new calls, draining calls in flight");
    let _ = stop_tx.send(true);
    if let Some(watch) = watch {
        let _ = watch.await;
    }
    match tokio::time::timeout(config.shutdown_grace, &mut servers).await {
        Ok((data, api)) => finished(data, api),
        Err(_) => {
            tracing::warn!("calls still in flight after the grace period; closing them");
            Ok(())
        }
    }
}

type Joined<T> = Result<T, tokio::task::JoinError>;

fn finished(
    data: Joined<Result<(), tonic::transport::Error>>,
    api: Joined<Result<(), Box<dyn std::error::Error + Send + Sync>>>,
) -> Result<(), ServeError> {
    match data {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ServeError::DataPlane(e)),
        Err(e) => return Err(ServeError::Api(Box::new(e))),
    }
    match api {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServeError::Api(e)),
        Err(e) => Err(ServeError::Api(Box::new(e))),
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
