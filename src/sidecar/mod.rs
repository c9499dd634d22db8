//! The sidecar: the data plane that every call to the protected service goes through, and
//! pdgate's own API port.
//!
//! ```text
//! client ──h2──▶ data plane (tonic server, any method path)
//!                 └▶ Authorize: context → snapshot → decision cache → decide
//!                      → deny (PERMISSION_DENIED)  |  forward ──h2──▶ upstream (pooled Channel)
//! ```
//!
//! Messages are never decoded: bodies, trailers and `grpc-status` stream through untouched,
//! for unary and every streaming kind.

pub mod authorize;
pub mod context;
pub mod deadline;
pub mod identity;
pub mod rescue;

use crate::audit::AuditLog;
use crate::config::TlsFiles;
use crate::decision::Decider;
use crate::subjects::SubjectStates;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::{PURPOSE_NONE, PURPOSE_UNKNOWN};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Channel, Endpoint, Identity, ServerTlsConfig};

/// How the sidecar learns who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// The caller names itself in `x-caller`. Development only: anyone can claim anything.
    InsecureHeader,
    /// The caller is named by its TLS client certificate; `x-caller` is ignored.
    Mtls,
}

/// State shared by every call of the data plane.
pub struct Shared {
    pub decider: Arc<Decider>,
    pub subjects: Arc<dyn SubjectStates>,
    /// Every decision is written here before it is answered.
    pub audit: AuditLog,
    pub identity: IdentityMode,
    /// How certificate names map to callers (mTLS mode).
    pub naming: identity::CallerNaming,
    /// Calls in flight; a call that finds none left is shed (`RESOURCE_EXHAUSTED`).
    pub inflight: Arc<Semaphore>,
    pub max_inflight: usize,
    /// Who may call the admin services (`PolicyAdmin`, `AuditLog`, `SubjectRights`).
    pub admin_roles: crate::api::admin::AdminRoles,
    /// The policy lifecycle (reload, rollback, shadow) over `decider`. In memory by default;
    /// `server::shared_state` gives it the policy directory as its store.
    pub policies: Arc<crate::policy::PolicyManager>,
    /// The subject registry behind `subjects`, when there is one (`serve`; `None` with
    /// in-memory subjects): read on a cache miss before a subject-dependent decision, and
    /// changed through `SubjectRights`.
    pub subject_cache: Option<Arc<crate::registry::SubjectCache>>,
    /// Metrics, and spans when OTLP is on. Its exporters are stopped by `server::run` when
    /// the servers have stopped.
    pub telemetry: Telemetry,
}

impl Shared {
    pub fn new(
        decider: Arc<Decider>,
        subjects: Arc<dyn SubjectStates>,
        audit: AuditLog,
        identity: IdentityMode,
        naming: identity::CallerNaming,
        max_inflight: usize,
        telemetry: Telemetry,
    ) -> Self {
        let policies = Arc::new(crate::policy::PolicyManager::in_memory(
            decider.clone(),
            crate::config::ReloadSettings::default().keep_versions,
            Some(telemetry.metrics().clone()),
        ));
        Self {
            decider,
            subjects,
            audit,
            identity,
            naming,
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
            admin_roles: crate::api::admin::AdminRoles::default(),
            policies,
            subject_cache: None,
            telemetry,
        }
    }

    /// [`Shared::decide_call`], reading from the subject registry the subjects the decision
    /// needed and the cache could not answer for, then deciding again. A decision that needs
    /// no subject state never waits for the registry (see `registry::SubjectCache`).
    pub async fn decide_call_loaded(
        &self,
        path: &str,
        ctx: context::CallContext,
    ) -> (crate::decision::Decision, crate::decision::Request) {
        let (decision, request) = self.decide_call(path, ctx);
        let Some(cache) = &self.subject_cache else {
            return (decision, request);
        };
        if !cache.wants_load(&decision, &request.subjects) {
            return (decision, request);
        }
        cache.load(&request.subjects).await;
        let ctx = context::CallContext {
            caller: request.caller,
            purpose: request.purpose,
            subjects: request.subjects,
            recipient: request.recipient,
        };
        self.decide_call(path, ctx)
    }

    /// [`Decider::decide`] with the subjects' state read as in [`Shared::decide_call_loaded`].
    pub async fn decide_loaded(
        &self,
        request: &crate::decision::Request,
    ) -> crate::decision::Decision {
        let decision = self.decider.decide(request, self.subjects.as_ref());
        let Some(cache) = &self.subject_cache else {
            return decision;
        };
        if !cache.wants_load(&decision, &request.subjects) {
            return decision;
        }
        cache.load(&request.subjects).await;
        self.decider.decide(request, self.subjects.as_ref())
    }

    /// Counts a final (audited) decision in the metrics, with the time since the call
    /// arrived. The purpose label is the declared purpose only when the policy defines it, so
    /// callers cannot make new series by sending new names.
    pub fn observe(
        &self,
        decision: &crate::decision::Decision,
        purpose: &str,
        started: std::time::Instant,
    ) {
        let label = if purpose.is_empty() {
            PURPOSE_NONE
        } else if self.decider.knows_purpose(purpose) {
            purpose
        } else {
            PURPOSE_UNKNOWN
        };
        self.telemetry
            .record_decision(decision, label, started.elapsed());
    }
}

/// A pooled HTTP/2 client to the upstream. Lazy: the sidecar starts while the upstream is
/// down, and answers `UNAVAILABLE` until it is up.
pub fn upstream_channel(upstream: &str) -> Result<Channel, tonic::transport::Error> {
    let uri = if upstream.contains("://") {
        upstream.to_owned()
    } else {
        format!("http://{upstream}")
    };
    Ok(Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_lazy())
}

/// Serves the data plane on `listener` until `shutdown` completes, then stops accepting and
/// waits for calls in flight to finish.
pub async fn serve_data_plane(
    listener: TcpListener,
    shared: Arc<Shared>,
    upstream: Channel,
    tls: Option<&TlsFiles>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = tower::ServiceBuilder::new()
        .layer(authorize::AuthorizeLayer::new(shared))
        .service(upstream);
    server_builder(tls)?
        .serve_with_incoming_shutdown(
            service,
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// A tonic server builder, with mTLS when `tls` is given: pdgate's certificate, and client
/// certificates required and verified against the client CA.
pub fn server_builder(
    tls: Option<&TlsFiles>,
) -> Result<tonic::transport::Server, tonic::transport::Error> {
    let builder = tonic::transport::Server::builder().tcp_nodelay(true);
    match tls {
        None => Ok(builder),
        Some(tls) => builder.tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
                .client_ca_root(Certificate::from_pem(&tls.client_ca_pem))
                .client_auth_optional(false),
        ),
    }
}
