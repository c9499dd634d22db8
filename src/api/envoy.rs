//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`) on the
//! API port, so that Envoy or Istio can ask pdgate about each call instead of sending it
//! through pdgate's data plane.
//!
//! The call is admitted by the gate as a data-plane call is ([`Gate::admit`]): the same route
//! table, metadata, caller naming, audit record and refusal statuses; only the shape of the
//! answer differs.
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
//! - allowed: `OK`; upstream, `x-pdgate-caller` and `x-pdgate-decision-id` are set, any other
//!   `x-pdgate-*` header the client sent is removed and, in mTLS mode, so is `x-caller` (as
//!   at the data plane); the decision id is also added to the response the client gets.
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
//! [`CallerNaming::caller_from_name`]: crate::identity::CallerNaming::caller_from_name

use crate::gate::metadata::{CALLER, DECISION_ID, MetadataError, PURPOSE, RECIPIENT, SUBJECT};
use crate::gate::{Admission, Ask, Call, Door, Gate, Peer};
use crate::message::{
    self,
    compression::{self, Encoding},
    frames::{self, FrameError},
};
use crate::policy::inspect::Inspection;
use crate::transport::rescue;
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

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The metadata keys pdgate reads; Envoy sends every header, pdgate looks at these only.
const READ: [&str; 4] = [PURPOSE, SUBJECT, RECIPIENT, CALLER];

/// Keys that hold one value. Envoy's `headers` map joins a repeated header with `,`, and no
/// purpose, caller or recipient id contains one, so a comma there means the key was given
/// more than once: refused like two values at the data plane.
const SINGLE: [&str; 3] = [PURPOSE, RECIPIENT, CALLER];

pub struct EnvoyAuthorization {
    gate: Arc<Gate>,
}

impl EnvoyAuthorization {
    pub fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }

    pub fn into_server(self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self)
    }

    async fn answer(&self, request: &CheckRequest, metadata: &HeaderMap) -> CheckResponse {
        let started = std::time::Instant::now();
        let trace = trace_parent(metadata, request);
        let attributes = request.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        // Envoy verified the peer's certificate and names it; read only in mTLS mode.
        let principal = attributes
            .and_then(|a| a.source.as_ref())
            .map_or("", |s| s.principal.as_str());
        // The service routes on the path alone; a query string must not make the method
        // unknown, nor name another one.
        let path = http.map(|h| h.path.split_once('?').map_or(h.path.as_str(), |(p, _)| p));
        let policy = self.gate.policy();
        let headers = http
            .ok_or(MetadataError::NoHttpRequest)
            .and_then(call_headers);
        // A route that reads its request's subjects: from the body Envoy sends along
        // (`with_request_body`); without it, the call is refused MESSAGE_INSPECTION_REQUIRED.
        let message_subjects = match (http, path.and_then(|p| policy.inspection(p))) {
            (Some(http), Some(inspection)) => body_subjects(http, &inspection),
            _ => Ok(None),
        };
        let ask = match (&headers, path, message_subjects) {
            (Ok(_), path, Err(error)) => Ask::Unreadable { path, error },
            (Ok(metadata), Some(path), Ok(message_subjects)) => Ask::Method {
                path,
                metadata,
                message_subjects,
                // Envoy forwards the body itself: a write that would need a field refused is
                // denied anyway (`MESSAGE_INSPECTION_REQUIRED`, it cannot be minimized).
                message_writes: 0,
            },
            (Err(error), path, _) => Ask::Unreadable {
                path,
                error: error.clone(),
            },
            (Ok(_), None, Ok(_)) => Ask::Unreadable {
                path: None,
                error: MetadataError::NoHttpRequest,
            },
        };
        let admission = self
            .gate
            .admit(Call {
                policy,
                door: Door::Envoy,
                ask,
                peer: Peer::Principal(principal),
                trace: &trace,
                started,
            })
            .await;
        if admission.allowed() {
            allowed(&admission, http)
        } else {
            tracing::debug!(path, decision = %admission.decision.decision_id, "refused (ext_authz)");
            refused(&admission)
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

/// The subjects of the request message in the body Envoy buffered and sent, on a route that
/// reads them: `None` when Envoy sent no body, or the call is a client stream (Envoy sees its
/// first messages only, never what follows).
fn body_subjects(
    http: &HttpRequest,
    inspection: &Inspection,
) -> Result<Option<Vec<String>>, MetadataError> {
    let Some(path) = &inspection.request_subjects else {
        return Ok(None);
    };
    let body: &[u8] = if http.raw_body.is_empty() {
        http.body.as_bytes()
    } else {
        &http.raw_body
    };
    if inspection.client_streaming || body.is_empty() {
        return Ok(None);
    }
    match frames::first(body) {
        Ok(Some((compressed, message))) => {
            let encoding = Encoding::named(http.headers.get("grpc-encoding").map(String::as_str));
            let message =
                compression::readable(compressed, &encoding, &message, frames::MAX_MESSAGE_BYTES)
                    .map_err(MetadataError::from)?;
            message::subjects(&message, path)
                .map(Some)
                .map_err(|e| MetadataError::MessageUnreadable(e.to_string()))
        }
        // Cut off at Envoy's `max_request_bytes`: the message cannot be read whole.
        Ok(None) => Err(MetadataError::MessageUnreadable(
            "Envoy sent a partial body (raise `with_request_body.max_request_bytes`)".into(),
        )),
        Err(FrameError::TooLarge { len, limit }) => {
            Err(MetadataError::MessageTooLarge { len, limit })
        }
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

/// The headers pdgate reads, as an `http::HeaderMap` for the gate: from
/// `header_map` when Envoy sends raw headers (`encode_raw_headers`: repeated headers stay
/// apart, values are bytes), else from the `headers` map (repeated headers joined by `,`).
fn call_headers(http: &HttpRequest) -> Result<HeaderMap, MetadataError> {
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

/// `OK`, with the metadata the upstream must see (as the data plane would stamp it): pdgate's
/// caller and decision id set, any other client-sent `x-pdgate-*` and, in mTLS mode,
/// `x-caller` removed.
fn allowed(admission: &Admission, http: Option<&HttpRequest>) -> CheckResponse {
    // Overwrite, never append: a client must not be able to send its own x-pdgate-caller.
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    let mut ok = OkHttpResponseBuilder::new();
    let set = admission.upstream_metadata();
    for (name, value) in &set {
        if let Ok(value) = value.to_str() {
            ok.add_header(name.as_str(), value, overwrite, false);
        }
    }
    if let Some(id) = admission.decision_id() {
        ok.add_response_header(DECISION_ID, id.to_string(), overwrite, false);
    }
    for name in http.map(sent_header_names).unwrap_or_default() {
        if admission.strips(&name) && !set.iter().any(|(n, _)| n.as_str() == name) {
            ok.remove_header(&name);
        }
    }
    let mut response = CheckResponse::with_status(Status::ok(""));
    response.set_http_response(ok);
    response
}

/// The names of the headers of the checked request, lowercase.
fn sent_header_names(http: &HttpRequest) -> Vec<String> {
    match http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
        Some(raw) => raw
            .headers
            .iter()
            .map(|h| h.key.to_ascii_lowercase())
            .collect(),
        None => http
            .headers
            .keys()
            .map(|k| k.to_ascii_lowercase())
            .collect(),
    }
}

/// A refusal: the status for Envoy, and the HTTP answer Envoy sends the client
/// (`403` with the reason codes for a denial, `400` for an unreadable call).
fn refused(admission: &Admission) -> CheckResponse {
    let status = rescue::refusal_status(admission);
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    let mut denied = DeniedHttpResponseBuilder::new();
    denied.set_body(status.message());
    if admission.malformed.is_some() {
        denied.set_http_status(HttpStatusCode::BadRequest);
    } else {
        let codes: Vec<&str> = admission
            .decision
            .reasons
            .iter()
            .map(|r| r.code.as_str())
            .collect();
        denied
            .set_http_status(HttpStatusCode::Forbidden)
            .add_header(REASONS, codes.join(","), overwrite, false);
    }
    if let Some(id) = admission.decision_id() {
        denied.add_header(DECISION_ID, id.to_string(), overwrite, false);
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
        // Envoy joins a repeated header with `,` alone.
        http.headers.insert(SUBJECT.into(), "cust-1,cust-2".into());
        let headers = call_headers(&http).unwrap();
        assert_eq!(
            crate::gate::metadata::extract(&headers, None),
            Err(MetadataError::Repeated(PURPOSE, 2))
        );
        http.headers
            .insert(PURPOSE.into(), "service.billing".into());
        let ctx = crate::gate::metadata::extract(&call_headers(&http).unwrap(), None).unwrap();
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
            crate::gate::metadata::extract(&headers, None),
            Err(MetadataError::NotText(PURPOSE))
        );
    }
}
