//! `pdgate.v1.AccessControl`: the decision API. A deny is an answer (`allowed: false`), not an
//! error status.

use crate::gate::{Ask, Call, Door, Gate, Peer};
use crate::identity::IdentityMode;
use crate::proto::v1::access_control_server::{AccessControl, AccessControlServer};
use crate::proto::v1::{BatchCheckRequest, BatchCheckResponse, CheckRequest, CheckResponse};
use crate::transport::limits::Limits;
use crate::transport::rescue::ApiError;
use std::net::IpAddr;
use std::sync::Arc;
use tonic::transport::CertificateDer;
use tonic::{Response, Status};

pub struct AccessControlService {
    gate: Arc<Gate>,
    /// Who may ask, and how much one request may hold (`[limits] check_*`): every Check is
    /// decided and recorded, so an unbounded request is an unbounded audit record.
    limits: Limits,
}

impl AccessControlService {
    pub fn new(gate: Arc<Gate>, limits: Limits) -> Self {
        Self { gate, limits }
    }

    /// Refuses a caller outside `limits.check_callers` (when set): the answers reveal
    /// subjects' consent state. The caller is the mTLS peer, the mesh's (mesh mode), or, in
    /// the insecure mode, the `caller` each request names.
    fn allowed_caller(
        &self,
        method: &'static str,
        peer: Option<&CertificateDer<'static>>,
        connection: (Option<IpAddr>, &http::HeaderMap),
        requests: &[CheckRequest],
    ) -> Result<(), ApiError> {
        let Some(allowed) = &self.limits.check_callers else {
            return Ok(());
        };
        let refuse = |identity: String| ApiError::CallerNotAllowed { method, identity };
        match self.gate.identity() {
            IdentityMode::Mtls => {
                let identity = peer.map_or_else(String::new, |leaf| {
                    self.gate
                        .naming()
                        .caller(leaf.as_ref(), |name| allowed.iter().any(|a| a == name))
                });
                if !allowed.contains(&identity) {
                    return Err(refuse(identity));
                }
            }
            IdentityMode::Mesh => {
                let (remote, headers) = connection;
                let identity = self.gate.mesh_caller(remote, headers).unwrap_or_default();
                if !allowed.contains(&identity) {
                    return Err(refuse(identity));
                }
            }
            IdentityMode::InsecureHeader => {
                if let Some(r) = requests.iter().find(|r| !allowed.contains(&r.caller)) {
                    return Err(refuse(r.caller.clone()));
                }
            }
        }
        Ok(())
    }

    /// Refuses a request past the `check_max_*` limits, naming the field and the limit.
    fn within_limits(&self, field: &str, request: &CheckRequest) -> Result<(), ApiError> {
        let limits = &self.limits;
        let over = |what: &str, count: usize, key: &str, limit: usize| ApiError::InvalidField {
            field: "request",
            message: format!("`{field}{what}` holds {count}; at most {limit} (`limits.{key}`)"),
        };
        for (what, count) in [
            ("categories", request.categories.len()),
            ("minimizable", request.minimizable.len()),
        ] {
            if count > limits.check_max_categories {
                return Err(over(
                    what,
                    count,
                    "check_max_categories",
                    limits.check_max_categories,
                ));
            }
        }
        if request.subjects.len() > limits.check_max_subjects {
            return Err(over(
                "subjects",
                request.subjects.len(),
                "check_max_subjects",
                limits.check_max_subjects,
            ));
        }
        let values = [
            &request.caller,
            &request.purpose,
            &request.action,
            &request.recipient,
        ]
        .into_iter()
        .chain(&request.categories)
        .chain(&request.minimizable)
        .chain(&request.subjects);
        if let Some(long) = values
            .into_iter()
            .find(|v| v.len() > limits.check_max_value_bytes)
        {
            return Err(ApiError::InvalidField {
                field: "request",
                message: format!(
                    "a value in `{field}` is {} bytes long; at most {} (`limits.check_max_value_bytes`)",
                    long.len(),
                    limits.check_max_value_bytes
                ),
            });
        }
        Ok(())
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
        remote: Option<IpAddr>,
        metadata: &http::HeaderMap,
    ) -> CheckResponse {
        let admission = self
            .gate
            .admit(Call {
                policy: self.gate.policy(),
                door,
                ask: Ask::Check(request.into()),
                peer: Peer::of_connection(
                    self.gate.identity(),
                    peer.map(AsRef::as_ref),
                    remote,
                    metadata,
                ),
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

const CHECK: &str = "/pdgate.v1.AccessControl/Check";
const BATCH_CHECK: &str = "/pdgate.v1.AccessControl/BatchCheck";

#[tonic::async_trait]
impl AccessControl for AccessControlService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let certs = request.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        let remote = request.remote_addr().map(|a| a.ip());
        let (metadata, _, message) = request.into_parts();
        let connection = (remote, metadata.as_ref());
        self.allowed_caller(CHECK, leaf, connection, std::slice::from_ref(&message))?;
        self.within_limits("", &message)?;
        Ok(Response::new(
            self.decide(message, Door::Check, leaf, remote, metadata.as_ref())
                .await,
        ))
    }

    async fn batch_check(
        &self,
        request: tonic::Request<BatchCheckRequest>,
    ) -> Result<Response<BatchCheckResponse>, Status> {
        let certs = request.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        let remote = request.remote_addr().map(|a| a.ip());
        let (metadata, _, message) = request.into_parts();
        let connection = (remote, metadata.as_ref());
        let requests = message.requests;
        let max_batch = self.limits.check_max_batch;
        if requests.len() > max_batch {
            return Err(ApiError::InvalidField {
                field: "requests",
                message: format!(
                    "holds {} requests; at most {max_batch} per BatchCheck (`limits.check_max_batch`)",
                    requests.len()
                ),
            }
            .into());
        }
        self.allowed_caller(BATCH_CHECK, leaf, connection, &requests)?;
        for (i, r) in requests.iter().enumerate() {
            self.within_limits(&format!("requests[{i}]."), r)?;
        }
        // Decided one by one, audited together: the records share the writer's batches. Each
        // decision has its own span, all children of the caller's.
        let decisions = requests
            .into_iter()
            .map(|r| self.decide(r, Door::BatchCheck, leaf, remote, metadata.as_ref()));
        let responses = futures_util::future::join_all(decisions).await;
        Ok(Response::new(BatchCheckResponse { responses }))
    }
}
