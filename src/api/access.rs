//! `pdgate.v1.AccessControl`: the decision API. A deny is an answer (`allowed: false`), not an
//! error status.

use crate::audit::{self, RecordKind};
use crate::decision::Request;
use crate::proto::v1::access_control_server::{AccessControl, AccessControlServer};
use crate::proto::v1::{BatchCheckRequest, BatchCheckResponse, CheckRequest, CheckResponse};
use crate::sidecar::{IdentityMode, Shared};
use crate::telemetry::CallSpan;
use std::sync::Arc;
use tonic::transport::CertificateDer;
use tonic::{Response, Status};

/// Most requests in one BatchCheck.
pub const MAX_BATCH: usize = 1000;

/// The RPC names of the decisions' spans (`rpc.method`).
const CHECK: &str = "pdgate.v1.AccessControl/Check";
const BATCH_CHECK: &str = "pdgate.v1.AccessControl/BatchCheck";

pub struct AccessControlService {
    shared: Arc<Shared>,
}

impl AccessControlService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    pub fn into_server(self) -> AccessControlServer<Self> {
        AccessControlServer::new(self)
    }

    /// In mTLS mode the caller is the peer that asks, whatever the request says: a service may
    /// ask about its own calls, not borrow another's identity.
    fn caller(&self, peer_certs: Option<&[CertificateDer<'static>]>) -> Option<String> {
        match self.shared.identity {
            IdentityMode::InsecureHeader => None,
            IdentityMode::Mtls => {
                let policy = self.shared.decider.policy();
                Some(
                    peer_certs
                        .and_then(|c| c.first())
                        .map_or_else(String::new, |leaf| {
                            self.shared.naming.caller(leaf.as_ref(), |name| {
                                policy.as_ref().is_some_and(|p| p.caller(name).is_some())
                            })
                        }),
                )
            }
        }
    }

    /// Decides and audits one request (kind `check`). `metadata` is the gRPC call's, whose
    /// `traceparent` parents the decision's span (OTLP on); `rpc_method` names the call.
    async fn decide(
        &self,
        request: CheckRequest,
        caller: Option<&str>,
        metadata: &http::HeaderMap,
        rpc_method: &str,
    ) -> CheckResponse {
        let started = std::time::Instant::now();
        let mut span = self.shared.telemetry.start_span(metadata, rpc_method);
        let mut request = Request::from(request);
        if let Some(caller) = caller {
            caller.clone_into(&mut request.caller);
        }
        let decision = self.shared.decide_loaded(&request).await;
        let mut body = audit::body_of(&decision, &request, RecordKind::Check);
        if let Some((trace, span)) = span.as_ref().and_then(CallSpan::ids) {
            body.trace_id = Some(trace);
            body.span_id = Some(span);
        }
        body.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let decision = self.shared.audited(decision, body).await;
        self.shared.observe(&decision, &request.purpose, started);
        if let Some(span) = &mut span {
            span.record_decision(&decision, &request, None);
        }
        CheckResponse::from(&decision)
    }
}

#[tonic::async_trait]
impl AccessControl for AccessControlService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let certs = request.peer_certs();
        let caller = self.caller(certs.as_deref().map(Vec::as_slice));
        let (metadata, _, message) = request.into_parts();
        Ok(Response::new(
            self.decide(message, caller.as_deref(), metadata.as_ref(), CHECK)
                .await,
        ))
    }

    async fn batch_check(
        &self,
        request: tonic::Request<BatchCheckRequest>,
    ) -> Result<Response<BatchCheckResponse>, Status> {
        let certs = request.peer_certs();
        let caller = self.caller(certs.as_deref().map(Vec::as_slice));
        let (metadata, _, message) = request.into_parts();
        let requests = message.requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "`requests` holds {} requests; at most {MAX_BATCH} per BatchCheck",
                requests.len()
            )));
        }
        // Decided one by one, audited together: the records share the writer's batches. Each
        // decision has its own span, all children of the caller's.
        let decisions = requests
            .into_iter()
            .map(|r| self.decide(r, caller.as_deref(), metadata.as_ref(), BATCH_CHECK));
        let responses = futures_util::future::join_all(decisions).await;
        Ok(Response::new(BatchCheckResponse { responses }))
    }
}
