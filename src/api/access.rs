//! `pdgate.v1.AccessControl`: the decision API. A deny is an answer (`allowed: false`), not an
//! error status.

use crate::audit::{self, RecordKind};
use crate::decision::Request;
use crate::proto::v1::access_control_server::{AccessControl, AccessControlServer};
use crate::proto::v1::{BatchCheckRequest, BatchCheckResponse, CheckRequest, CheckResponse};
use crate::sidecar::{IdentityMode, Shared};
use std::sync::Arc;
use tonic::transport::CertificateDer;
use tonic::{Response, Status};

/// Most requests in one BatchCheck.
pub const MAX_BATCH: usize = 1000;

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

    /// Decides and audits one request (kind `check`).
    async fn decide(&self, request: CheckRequest, caller: Option<&str>) -> CheckResponse {
        let started = std::time::Instant::now();
        let mut request = Request::from(request);
        if let Some(caller) = caller {
            caller.clone_into(&mut request.caller);
        }
        let decision = self
            .shared
            .decider
            .decide(&request, self.shared.subjects.as_ref());
        let mut body = audit::body_of(&decision, &request, RecordKind::Check);
        body.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        CheckResponse::from(&self.shared.audited(decision, body).await)
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
        Ok(Response::new(
            self.decide(request.into_inner(), caller.as_deref()).await,
        ))
    }

    async fn batch_check(
        &self,
        request: tonic::Request<BatchCheckRequest>,
    ) -> Result<Response<BatchCheckResponse>, Status> {
        let certs = request.peer_certs();
        let caller = self.caller(certs.as_deref().map(Vec::as_slice));
        let requests = request.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "`requests` holds {} requests; at most {MAX_BATCH} per BatchCheck",
                requests.len()
            )));
        }
        // Decided one by one, audited together: the records share the writer's batches.
        let decisions = requests
            .into_iter()
            .map(|r| self.decide(r, caller.as_deref()));
        let responses = futures_util::future::join_all(decisions).await;
        Ok(Response::new(BatchCheckResponse { responses }))
    }
}
