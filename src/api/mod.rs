//! pdgate's own API port: `AccessControl` (Check, BatchCheck) for services that ask instead of
//! passing their calls through, Envoy ext_authz, the admin services, `grpc.health.v1`, server
//! reflection (v1 and v1alpha, so grpcurl 1.8, grpc_cli and older GUI clients work too), and
//! `GET /metrics` (Prometheus text, over HTTP/1 or HTTP/2).

pub mod access;
pub mod admin;
pub mod audit_log;
pub mod envoy;
pub mod metrics;
pub mod policy_admin;
pub mod probes;
pub mod subject_rights;

use crate::gate::Gate;
use crate::proto::v1;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tonic_reflection::server::{v1 as reflection_v1, v1alpha as reflection_v1alpha};

/// Every gRPC service the API port serves: what reflection lists, and nothing else (pdgate's
/// descriptors also hold the demo service, which is not served here).
pub const SERVICES: [&str; 8] = [
    <v1::access_control_server::AccessControlServer<access::AccessControlService> as NamedService>::NAME,
    <envoy_types::ext_authz::v3::pb::AuthorizationServer<envoy::EnvoyAuthorization> as NamedService>::NAME,
    <v1::policy_admin_server::PolicyAdminServer<policy_admin::PolicyAdminService> as NamedService>::NAME,
    <v1::subject_rights_server::SubjectRightsServer<subject_rights::SubjectRightsService> as NamedService>::NAME,
    <v1::audit_log_server::AuditLogServer<audit_log::AuditLogService> as NamedService>::NAME,
    <tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> as NamedService>::NAME,
    <reflection_v1::ServerReflectionServer<reflection_v1::ReflectionService> as NamedService>::NAME,
    <reflection_v1alpha::ServerReflectionServer<reflection_v1alpha::ReflectionService> as NamedService>::NAME,
];

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

/// Server reflection describing [`SERVICES`].
fn reflection() -> tonic_reflection::server::Builder<'static> {
    SERVICES.iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(crate::proto::ENVOY_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ),
        |builder, name| builder.with_service_name(*name),
    )
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve_api(
    listener: TcpListener,
    gate: Arc<Gate>,
    tls: Option<Arc<crate::transport::tls::ServerTls>>,
    limits: &crate::transport::limits::Limits,
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
    // One description, two protocol versions: the builder is consumed by each build.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let metrics = metrics::MetricsEndpointLayer::new(gate.telemetry().metrics().clone());
    // `AuditLog.Tail` streams run until their client leaves; they must end at shutdown too, or
    // the graceful shutdown would wait on them: the same signal, fanned out to them.
    let (stopping, tails_stop) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    let connections = crate::transport::connections::Connections::new(limits);
    let router = crate::transport::server_builder(limits, &connections)?
        // HTTP/1 for `GET /metrics` (a Prometheus scrape); gRPC stays on HTTP/2.
        .accept_http1(true)
        .layer(metrics)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(envoy::EnvoyAuthorization::new(gate.clone()).into_server())
        .add_service(subject_rights::SubjectRightsService::new(gate.clone()).into_server())
        .add_service(policy_admin::PolicyAdminService::new(gate.clone()).into_server())
        .add_service(audit_log::AuditLogService::new(gate.clone(), tails_stop).into_server())
        .add_service(access::AccessControlService::new(gate, limits.clone()).into_server());
    let accepted = connections.incoming(listener);
    let served = match tls {
        None => {
            router
                .serve_with_incoming_shutdown(accepted, shutdown)
                .await
        }
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(
                    crate::transport::tls::handshaken(accepted, tls, limits.handshake_timeout),
                    shutdown,
                )
                .await
        }
    };
    health_task.abort();
    served?;
    Ok(())
}
