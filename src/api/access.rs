//! `pdgate.v1.AccessControl`: the decision API. A deny is an answer (`allowed: false`), not an
//! error status.

use crate::decision::Request;
use crate::proto::v1::access_control_server::{AccessControl, AccessControlServer};
use crate::proto::v1::{BatchCheckRequest, BatchCheckResponse, CheckRequest, CheckResponse};
use crate::sidecar::Shared;
use std::sync::Arc;
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

    fn decide(&self, request: CheckRequest) -> CheckResponse {
        let request = Request::from(request);
        CheckResponse::from(
            &self
                .shared
                .decider
                .decide(&request, self.shared.subjects.as_ref()),
        )
    }
}

#[tonic::async_trait]
impl AccessControl for AccessControlService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.decide(request.into_inner())))
    }

    async fn batch_check(
        &self,
        request: tonic::Request<BatchCheckRequest>,
    ) -> Result<Response<BatchCheckResponse>, Status> {
        let requests = request.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "`requests` holds {} requests; at most {MAX_BATCH} per BatchCheck",
                requests.len()
            )));
        }
        Ok(Response::new(BatchCheckResponse {
            responses: requests.into_iter().map(|r| self.decide(r)).collect(),
        }))
    }
}
