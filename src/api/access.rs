//! `pdgate.v1.AccessControl`: the decision API. A deny is an answer (`allowed: false`), not an
//! error status.

use crate::gate::{Ask, Call, Door, Gate, Peer};
use crate::proto::v1::access_control_server::{AccessControl, AccessControlServer};
use crate::proto::v1::{BatchCheckRequest, BatchCheckResponse, CheckRequest, CheckResponse};
use crate::transport::rescue::ApiError;
use std::sync::Arc;
use tonic::transport::CertificateDer;
use tonic::{Response, Status};

/// Most requests in one BatchCheck.
pub const MAX_BATCH: usize = 1000;

pub struct AccessControlService {
    gate: Arc<Gate>,
}

impl AccessControlService {
    pub fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }

    pub fn into_server(self) -> AccessControlServer<Self> {
        AccessControlServer::new(self)
    }

    /// Decides and audits one request (kind `check`) through the gate. In mTLS mode the caller
    /// is the peer that asks, whatever the request says: a service may ask about its own
    /// calls, not borrow another's identity. `metadata` is the gRPC call's, whose
    /// `traceparent` parents the decision's span.
    async fn decide(
        &self,
        request: CheckRequest,
        door: Door,
        peer: Option<&CertificateDer<'static>>,
        metadata: &http::HeaderMap,
    ) -> CheckResponse {
        let admission = self
            .gate
            .admit(Call {
                policy: self.gate.policy(),
                door,
                ask: Ask::Check(request.into()),
                peer: Peer::Certificate(peer.map(AsRef::as_ref)),
                trace: metadata,
                started: std::time::Instant::now(),
            })
            .await;
        let mut response = CheckResponse::from(&admission.decision);
        if admission.decision_id().is_none() {
            // No record, no decision to refer to.
            response.decision_id.clear();
        }
        response
    }
}

#[tonic::async_trait]
impl AccessControl for AccessControlService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let certs = request.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        let (metadata, _, message) = request.into_parts();
        Ok(Response::new(
            self.decide(message, Door::Check, leaf, metadata.as_ref())
                .await,
        ))
    }

    async fn batch_check(
        &self,
        request: tonic::Request<BatchCheckRequest>,
    ) -> Result<Response<BatchCheckResponse>, Status> {
        let certs = request.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        let (metadata, _, message) = request.into_parts();
        let requests = message.requests;
        if requests.len() > MAX_BATCH {
            return Err(ApiError::InvalidField {
                field: "requests",
                message: format!(
                    "holds {} requests; at most {MAX_BATCH} per BatchCheck",
                    requests.len()
                ),
            }
            .into());
        }
        // Decided one by one, audited together: the records share the writer's batches. Each
        // decision has its own span, all children of the caller's.
        let decisions = requests
            .into_iter()
            .map(|r| self.decide(r, Door::BatchCheck, leaf, metadata.as_ref()));
        let responses = futures_util::future::join_all(decisions).await;
        Ok(Response::new(BatchCheckResponse { responses }))
    }
}
