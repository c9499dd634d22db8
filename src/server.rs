//! Running the sidecar: both listeners, the policy, the shared state, and shutdown.
//! `main` checks the whole configuration and binds the ports; [`run`] is what tests drive.

use crate::audit::AuditLog;
use crate::config::Config;
use crate::decision::Decider;
use crate::policy::{PolicySource, Snapshot, compile};
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

/// Builds the shared state for `config` with `policy` (if any), and starts the OTLP
/// exporters when `config.telemetry` names an endpoint (inside the tokio runtime: their
/// channels live on it). [`run`] stops them when the servers have stopped.
pub fn shared_state(
    config: &Config,
    policy: Option<Arc<Snapshot>>,
    subjects: Arc<dyn SubjectStates>,
    audit: AuditLog,
) -> Result<Arc<Shared>, ServeError> {
    let decider = Arc::new(Decider::new(config.cache));
    let metrics = Arc::new(Metrics::new(decider.cache_stats().clone(), audit.clone()));
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
    Ok(Arc::new(shared))
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
        (data, api) = &mut servers => return finished(data, api),
        () = shutdown => {}
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new calls, draining calls in flight");
    let _ = stop_tx.send(true);
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
