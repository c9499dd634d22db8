//! pdgate's own API port: `AccessControl` (Check, BatchCheck) for services that ask instead of
//! passing their calls through, `grpc.health.v1`, server reflection (so grpcurl works), and
//! `GET /metrics` (Prometheus text, over HTTP/1 or HTTP/2).

pub mod access;
pub mod admin;
pub mod audit_log;
pub mod envoy;
pub mod metrics;
pub mod policy_admin;
pub mod subject_rights;

use crate::gate::Gate;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Reports `SERVING` while a valid policy is loaded and `NOT_SERVING` otherwise, both for the
/// server as a whole (`""`) and for `pdgate.v1.AccessControl`.
pub async fn report_health(reporter: &HealthReporter, gate: &Gate) {
    let status = if gate.decider().policy().is_some() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status("pdgate.v1.AccessControl", status)
        .await;
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve_api(
    listener: TcpListener,
    gate: Arc<Gate>,
    tls: Option<&crate::transport::TlsFiles>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (reporter, health) = tonic_health::server::health_reporter();
    report_health(&reporter, &gate).await;
    // Health follows the policy: a reload (file watch, Apply, Rollback) may be the first valid
    // policy. The task ends when the server does (aborted below).
    let health_task = {
        let (reporter, gate) = (reporter.clone(), gate.clone());
        let mut changes = gate.policies().subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                report_health(&reporter, &gate).await;
            }
        })
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let metrics = metrics::MetricsEndpointLayer::new(gate.telemetry().metrics().clone());
    // `AuditLog.Tail` streams run until their client leaves; they must end at shutdown too, or
    // the graceful shutdown would wait on them: the same signal, fanned out to them.
    let (stopping, tails_stop) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    let served = crate::transport::server_builder(tls)?
        // HTTP/1 for `GET /metrics` (a Prometheus scrape); gRPC stays on HTTP/2.
        .accept_http1(true)
        .layer(metrics)
        .add_service(health)
        .add_service(reflection)
        .add_service(envoy::EnvoyAuthorization::new(gate.clone()).into_server())
        .add_service(subject_rights::SubjectRightsService::new(gate.clone()).into_server())
        .add_service(policy_admin::PolicyAdminService::new(gate.clone()).into_server())
        .add_service(audit_log::AuditLogService::new(gate.clone(), tails_stop).into_server())
        .add_service(access::AccessControlService::new(gate).into_server())
        .serve_with_incoming_shutdown(crate::transport::incoming(listener), shutdown)
        .await;
    health_task.abort();
    served?;
    Ok(())
}
