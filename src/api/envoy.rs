//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`) on the
//! API port, so that Envoy or Istio can ask pdgate about each call instead of sending it
//! through pdgate's data plane.
//!
//! The decision is the sidecar's own ([`Shared::decide_call`]), audited as a data-plane call
//! is: the same route table, metadata, caller naming, audit record and denial statuses; only
//! the shape of the answer differs.
//!
//! | in the `CheckRequest` | read as |
//! |---|---|
//! | `attributes.request.http.path` | the gRPC method `/pkg.Service/Method` (a query string is ignored, as the service ignores it) |
//! | headers `x-purpose`, `x-data-subject`, `x-recipient` | the call's metadata, as the sidecar reads it |
//! | `attributes.source.principal` (identity `mtls`) | the caller, named as a certificate would name it ([`CallerNaming::caller_from_name`]) |
//! | header `x-caller` (identity `insecure-header`) | the caller (development only) |
//!
//! Every answer is a `CheckResponse`, never an error status of the Check call itself, since
//! Envoy would count that as the authorizer failing rather than as a denial:
//!
//! - allowed: `OK`; upstream, `x-pdgate-caller` and `x-pdgate-decision-id` are set (any value
//!   the client sent is overwritten) and, in mTLS mode, `x-caller` is removed; the decision id
//!   is also added to the response the client gets.
//! - denied: `PERMISSION_DENIED` (google.rpc.Code 7) and an HTTP 403 whose body names the
//!   reasons, with `x-pdgate-decision-id` and `x-pdgate-reasons`.
//! - malformed metadata (two purposes, non-UTF-8) or no HTTP attributes: `INVALID_ARGUMENT`
//!   (3) and an HTTP 400 naming the key.
//!
//! Each denial also carries `grpc-status` and `grpc-status-details-bin` headers: Envoy keeps
//! a `grpc-status` it is given when it answers a gRPC client locally, so a gRPC client behind
//! Envoy gets exactly the status it would get from pdgate's data plane (`PERMISSION_DENIED`
//! with its `google.rpc.ErrorInfo`, or `INVALID_ARGUMENT` — without it, Envoy would turn
//! HTTP 400 into `INTERNAL`).
//!
//! [`CallerNaming::caller_from_name`]: crate::sidecar::identity::CallerNaming::caller_from_name

use crate::audit::{self, RecordKind};
use crate::decision::{Decision, DecisionId};
use crate::sidecar::context::{
    self, AUTHENTICATED_CALLER, CALLER, DECISION_ID, MetadataError, PURPOSE, RECIPIENT, SUBJECT,
};
use crate::sidecar::{IdentityMode, Shared, rescue};
use crate::telemetry::CallSpan;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderAppendAction,
    HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::google::rpc;
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message;
use std::sync::Arc;
use tonic::{Response, Status};

/// Set on a denial: the reason codes, comma-separated, for proxies and logs that do not read
/// the body.
pub const REASONS: &str = "x-pdgate-reasons";

/// The RPC name of an Envoy check's span (`rpc.method`).
const ENVOY_CHECK: &str = "envoy.service.auth.v3.Authorization/Check";
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The metadata keys pdgate reads; Envoy sends every header, pdgate looks at these only.
const READ: [&str; 4] = [PURPOSE, SUBJECT, RECIPIENT, CALLER];

/// Keys that hold one value. Envoy's `headers` map joins a repeated header with `,`, and no
/// purpose, caller or recipient id contains one, so a comma there means the key was given
/// more than once: refused like two values at the data plane.
const SINGLE: [&str; 3] = [PURPOSE, RECIPIENT, CALLER];

pub struct EnvoyAuthorization {
    shared: Arc<Shared>,
}

/// A `CheckRequest` that cannot be read as a call: refused `INVALID_ARGUMENT`.
#[derive(Debug, thiserror::Error)]
enum CheckRequestError {
    #[error(
        "the check request has no HTTP request attributes; pdgate authorizes HTTP/2 (gRPC) calls (Envoy's HTTP ext_authz filter, not the network one)"
    )]
    NoHttpRequest,
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

impl EnvoyAuthorization {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    pub fn into_server(self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self)
    }

    async fn answer(&self, request: &CheckRequest, metadata: &HeaderMap) -> CheckResponse {
        let started = std::time::Instant::now();
        let mut span = if self.shared.telemetry.tracing() {
            self.shared
                .telemetry
                .start_span(&trace_parent(metadata, request), ENVOY_CHECK)
        } else {
            None
        };
        let attributes = request.attributes.as_ref();
        let Some(http) = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
        else {
            mark(&mut span, &CheckRequestError::NoHttpRequest);
            return invalid(
                &CheckRequestError::NoHttpRequest,
                self.shared.decider.next_id(),
            );
        };
        let authenticated = match self.shared.identity {
            IdentityMode::InsecureHeader => None,
            // Envoy verified the peer's certificate; x-caller is ignored.
            IdentityMode::Mtls => Some(
                self.shared.naming.caller_from_name(
                    attributes
                        .and_then(|a| a.source.as_ref())
                        .map_or("", |s| s.principal.as_str()),
                ),
            ),
        };
        let ctx = match call_headers(http).and_then(|h| Ok(context::extract(&h, authenticated)?)) {
            Ok(ctx) => ctx,
            Err(e) => {
                mark(&mut span, &e);
                return invalid(&e, self.shared.decider.next_id());
            }
        };
        // The service routes on the path alone; a query string must not make the method
        // unknown, nor name another one.
        let path = http
            .path
            .split_once('?')
            .map_or(http.path.as_str(), |(p, _)| p);
        let caller = ctx.caller.clone();
        // Decided and audited as a call through the data plane is: Envoy forwards the call
        // pdgate allows, so it is an access like any other.
        let (decision, decided) = self.shared.decide_call_loaded(path, ctx).await;
        let mut body = audit::body_of(&decision, &decided, RecordKind::Access);
        body.method = Some(path.to_owned());
        if let Some((trace, span)) = span.as_ref().and_then(CallSpan::ids) {
            body.trace_id = Some(trace);
            body.span_id = Some(span);
        }
        body.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let decision = self.shared.audited(decision, body).await;
        self.shared.observe(&decision, &decided.purpose, started);
        if let Some(span) = &mut span {
            span.record_decision(&decision, &decided, Some(path));
        }
        if decision.allowed {
            allowed(
                &decision,
                &caller,
                self.shared.identity == IdentityMode::Mtls,
            )
        } else {
            tracing::debug!(path, decision = %decision.decision_id, "denied (ext_authz)");
            denied(&decision)
        }
    }
}

#[tonic::async_trait]
impl Authorization for EnvoyAuthorization {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(
            self.answer(request.get_ref(), request.metadata().as_ref())
                .await,
        ))
    }
}

/// The trace context pdgate's span continues: Envoy's own, when Envoy traces its ext_authz
/// calls (the gRPC call's `traceparent`), else the checked request's.
fn trace_parent(metadata: &HeaderMap, request: &CheckRequest) -> HeaderMap {
    let mut parent = HeaderMap::new();
    let from_call = metadata.contains_key(TRACEPARENT);
    let http = request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    for key in [TRACEPARENT, TRACESTATE] {
        let value = if from_call {
            metadata.get(key).cloned()
        } else {
            http.and_then(|h| checked_header(h, key))
        };
        if let Some(value) = value {
            parent.insert(key, value);
        }
    }
    parent
}

/// Header `key` of the checked request, from raw headers or the joined map.
fn checked_header(http: &HttpRequest, key: &str) -> Option<HeaderValue> {
    if let Some(raw) = http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
        let header = raw
            .headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))?;
        let bytes = if header.raw_value.is_empty() {
            header.value.as_bytes()
        } else {
            &header.raw_value
        };
        return HeaderValue::from_bytes(bytes).ok();
    }
    HeaderValue::from_str(http.headers.get(key)?).ok()
}

/// Records a refusal (`INVALID_ARGUMENT`) on the check's span, if there is one.
fn mark(span: &mut Option<CallSpan>, error: &CheckRequestError) {
    if let Some(span) = span {
        span.record_status(tonic::Code::InvalidArgument, &error.to_string());
    }
}

/// The headers pdgate reads, as an `http::HeaderMap` for [`context::extract`]: from
/// `header_map` when Envoy sends raw headers (`encode_raw_headers`: repeated headers stay
/// apart, values are bytes), else from the `headers` map (repeated headers joined by `,`).
fn call_headers(http: &HttpRequest) -> Result<HeaderMap, CheckRequestError> {
    let mut headers = HeaderMap::new();
    if let Some(raw) = http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
        for header in &raw.headers {
            let Some(key) = READ.iter().find(|k| header.key.eq_ignore_ascii_case(k)) else {
                continue;
            };
            let bytes = if header.raw_value.is_empty() {
                header.value.as_bytes()
            } else {
                &header.raw_value
            };
            let value = HeaderValue::from_bytes(bytes).map_err(|_| MetadataError::NotText(key))?;
            headers.append(HeaderName::from_static(key), value);
        }
        return Ok(headers);
    }
    for key in READ {
        let Some(joined) = http.headers.get(key) else {
            continue;
        };
        let values: Vec<&str> = if SINGLE.contains(&key) {
            joined.split(',').collect()
        } else {
            vec![joined.as_str()]
        };
        for value in values {
            let value = HeaderValue::from_str(value).map_err(|_| MetadataError::NotText(key))?;
            headers.append(HeaderName::from_static(key), value);
        }
    }
    Ok(headers)
}

fn allowed(decision: &Decision, caller: &str, mtls: bool) -> CheckResponse {
    let id = decision.decision_id.to_string();
    // Overwrite, never append: a client must not be able to send its own x-pdgate-caller.
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    let mut ok = OkHttpResponseBuilder::new();
    ok.add_header(AUTHENTICATED_CALLER, caller, overwrite, false)
        .add_header(DECISION_ID, id.as_str(), overwrite, false)
        .add_response_header(DECISION_ID, id, overwrite, false);
    if mtls {
        // As at the data plane: the service learns the caller pdgate authorized, nothing a
        // client claimed.
        ok.remove_header(CALLER);
    }
    let mut response = CheckResponse::with_status(Status::ok(""));
    response.set_http_response(ok);
    response
}

fn denied(decision: &Decision) -> CheckResponse {
    let codes: Vec<&str> = decision.reasons.iter().map(|r| r.code.as_str()).collect();
    refused(
        &rescue::denied_status(decision),
        HttpStatusCode::Forbidden,
        decision.decision_id,
        Some(codes.join(",")),
    )
}

fn invalid(error: &CheckRequestError, id: DecisionId) -> CheckResponse {
    refused(
        &rescue::invalid_argument_status(error),
        HttpStatusCode::BadRequest,
        id,
        None,
    )
}

/// A refusal: `status` for Envoy, and the HTTP answer Envoy sends the client.
fn refused(
    status: &Status,
    http_status: HttpStatusCode,
    id: DecisionId,
    reasons: Option<String>,
) -> CheckResponse {
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    let mut denied = DeniedHttpResponseBuilder::new();
    denied
        .set_http_status(http_status)
        .set_body(status.message())
        .add_header(DECISION_ID, id.to_string(), overwrite, false);
    if let Some(reasons) = reasons {
        denied.add_header(REASONS, reasons, overwrite, false);
    }
    // grpc-message is left out: Envoy makes it from the body.
    let mut grpc = HeaderMap::new();
    if status.add_header(&mut grpc).is_ok() {
        for key in ["grpc-status", "grpc-status-details-bin"] {
            if let Some(value) = grpc.get(key).and_then(|v| v.to_str().ok()) {
                denied.add_header(key, value, overwrite, false);
            }
        }
    }
    // The details are an encoded google.rpc.Status (code, message, ErrorInfo), the same wire
    // type as Envoy's: decode them whole, or fall back to code and message.
    let rpc_status = rpc::Status::decode(status.details())
        .ok()
        .filter(|s| s.code == status.code() as i32)
        .unwrap_or_else(|| rpc::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: Vec::new(),
        });
    let mut response = CheckResponse {
        status: Some(rpc_status),
        ..CheckResponse::default()
    };
    response.set_http_response(denied);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{
        HeaderMap as EnvoyHeaderMap, HeaderValue as EnvoyHeaderValue,
    };

    fn raw(key: &str, value: &[u8]) -> EnvoyHeaderValue {
        EnvoyHeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.to_vec(),
        }
    }

    #[test]
    fn joined_single_keys_count_as_repeated() {
        let mut http = HttpRequest::default();
        http.headers
            .insert(PURPOSE.into(), "service.billing,marketing".into());
        http.headers.insert(SUBJECT.into(), "cust-1, cust-2".into());
        let headers = call_headers(&http).unwrap();
        assert_eq!(
            context::extract(&headers, None),
            Err(MetadataError::Repeated(PURPOSE, 2))
        );
        http.headers
            .insert(PURPOSE.into(), "service.billing".into());
        let ctx = context::extract(&call_headers(&http).unwrap(), None).unwrap();
        assert_eq!(ctx.subjects, vec!["cust-1", "cust-2"]);
    }

    #[test]
    fn raw_headers_keep_repeats_apart_and_bytes_as_sent() {
        let http = HttpRequest {
            header_map: Some(EnvoyHeaderMap {
                headers: vec![
                    raw("x-data-subject", b"cust-1"),
                    raw("X-Data-Subject", b"cust-2"),
                    raw("x-purpose", b"caf\xe9"),
                    raw("authorization", b"Bearer secret"),
                ],
            }),
            ..HttpRequest::default()
        };
        let headers = call_headers(&http).unwrap();
        assert_eq!(headers.get_all(SUBJECT).iter().count(), 2);
        assert!(headers.get("authorization").is_none());
        assert_eq!(
            context::extract(&headers, None),
            Err(MetadataError::NotText(PURPOSE))
        );
    }
}
