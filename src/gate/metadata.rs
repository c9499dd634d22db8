//! A call's context: who calls, for what purpose, about whom, and by when, read from the
//! call's gRPC metadata (and, in mTLS mode, from the peer). Both doors that carry a call — the
//! data plane and Envoy's `ext_authz` — present it as an `http::HeaderMap` and read it here.

use crate::message::compression::CompressionError;
use http::HeaderMap;
use std::time::Duration;

/// Metadata the sidecar reads.
pub const PURPOSE: &str = "x-purpose";
pub const SUBJECT: &str = "x-data-subject";
pub const RECIPIENT: &str = "x-recipient";
pub const CALLER: &str = "x-caller";
/// Set by pdgate on forwarded calls: the caller it authenticated (any incoming value is
/// replaced).
pub const AUTHENTICATED_CALLER: &str = "x-pdgate-caller";
/// On every response, and on every call pdgate forwards: the id of the decision (and of its
/// audit record).
pub const DECISION_ID: &str = "x-pdgate-decision-id";
/// The prefix of the metadata pdgate sets. A client cannot set any of it: every door drops
/// what a client sent under it before the call goes on.
pub const PDGATE_PREFIX: &str = "x-pdgate-";
/// The caller's deadline (gRPC over HTTP/2: `TimeoutValue TimeoutUnit`).
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// What one call says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    pub caller: String,
    /// Empty when the call declares none (denied `PURPOSE_NOT_DECLARED`).
    pub purpose: String,
    pub subjects: Vec<String>,
    pub recipient: Option<String>,
    /// The caller's `grpc-timeout`, when it gives one.
    pub timeout: Option<Duration>,
}

/// Metadata that cannot be read as intended: the call is refused `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata `{0}` is given {1} times; give it once")]
    Repeated(&'static str, usize),
    #[error("metadata `{0}` is not valid UTF-8 text")]
    NotText(&'static str),
    #[error("metadata `{0}` is empty")]
    Empty(&'static str),
    /// Values are taken byte for byte: ` billing-service` is not `billing-service`, and the
    /// upstream must not be handed a value other than the one decided on.
    #[error("metadata `{0}` has whitespace around its value (or around an id in its list)")]
    Whitespace(&'static str),
    /// Not a gRPC call: another HTTP method than `POST`, or a content type that is not gRPC.
    #[error(
        "not a gRPC call ({0}); pdgate forwards only `POST` with `content-type: application/grpc` or `application/grpc+proto`"
    )]
    NotGrpc(String),
    /// A gRPC call in another encoding than protobuf (answered `UNIMPLEMENTED`).
    #[error(
        "gRPC content type `{0}` is not supported; pdgate forwards `application/grpc` and `application/grpc+proto`"
    )]
    UnsupportedCodec(String),
    #[error(
        "metadata `grpc-timeout` is `{0}`; expected 1 to 8 digits and a unit (H, M, S, m, u, n)"
    )]
    Timeout(String),
    /// A request message over the inspection limit (answered `RESOURCE_EXHAUSTED`).
    #[error("a request message of {len} bytes is over pdgate's inspection limit of {limit} bytes")]
    MessageTooLarge { len: usize, limit: usize },
    /// A request message compressed in an encoding pdgate does not read, on a route whose
    /// messages it reads (answered `UNIMPLEMENTED`).
    #[error("{0}")]
    MessageCompressed(String),
    /// A compressed request message that expands past the inspection limit (answered
    /// `RESOURCE_EXHAUSTED`).
    #[error("a compressed request message expands past pdgate's inspection limit of {limit} bytes")]
    MessageExpandsTooLarge { limit: usize },
    /// A request message that is not what the service's descriptors say.
    #[error("the request message cannot be read: {0}")]
    MessageUnreadable(String),
    /// An Envoy check request without the checked call's HTTP attributes.
    #[error(
        "the check request has no HTTP request attributes; pdgate authorizes HTTP/2 (gRPC) calls (Envoy's HTTP ext_authz filter, not the network one)"
    )]
    NoHttpRequest,
}

impl From<CompressionError> for MetadataError {
    fn from(e: CompressionError) -> Self {
        match e {
            CompressionError::TooLarge { limit } => Self::MessageExpandsTooLarge { limit },
            CompressionError::Unsupported(_) => Self::MessageCompressed(e.to_string()),
            CompressionError::Corrupt(_) => Self::MessageUnreadable(e.to_string()),
        }
    }
}

/// Reads the context. `caller` is the authenticated identity when the transport gives one
/// (mTLS); otherwise (`insecure-header` mode) it comes from `x-caller`.
pub fn extract(headers: &HeaderMap, caller: Option<&str>) -> Result<CallContext, MetadataError> {
    let caller = match caller {
        Some(c) => c.to_owned(),
        None => single(headers, CALLER)?.unwrap_or_default(),
    };
    let purpose = single(headers, PURPOSE)?.unwrap_or_default();
    let recipient = single(headers, RECIPIENT)?;
    // A repeated header and one comma-joined header mean the same (HTTP semantics), and the
    // upstream may read either way: split both, so that pdgate authorizes exactly the subjects
    // the service will serve.
    let mut subjects = Vec::new();
    for value in headers.get_all(SUBJECT) {
        let text = value
            .to_str()
            .map_err(|_| MetadataError::NotText(SUBJECT))?;
        for id in text.split(',') {
            if id.is_empty() {
                return Err(MetadataError::Empty(SUBJECT));
            }
            if id.trim() != id {
                return Err(MetadataError::Whitespace(SUBJECT));
            }
            subjects.push(id.to_owned());
        }
    }
    Ok(CallContext {
        caller,
        purpose,
        subjects,
        recipient,
        timeout: timeout(headers)?,
    })
}

/// Reads `grpc-timeout`.
pub fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, MetadataError> {
    let Some(value) = headers.get(GRPC_TIMEOUT) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        MetadataError::Timeout(String::from_utf8_lossy(value.as_bytes()).into_owned())
    })?;
    let bad = || MetadataError::Timeout(text.to_owned());
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let duration = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    Ok(Some(duration))
}

fn single(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, MetadataError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let extra = values.count();
    if extra > 0 {
        return Err(MetadataError::Repeated(name, extra + 1));
    }
    let text = first.to_str().map_err(|_| MetadataError::NotText(name))?;
    if text.trim() != text {
        return Err(MetadataError::Whitespace(name));
    }
    Ok(Some(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn reads_purpose_subjects_and_caller() {
        let mut h = HeaderMap::new();
        h.insert(PURPOSE, HeaderValue::from_static("service.billing"));
        h.append(SUBJECT, HeaderValue::from_static("cust-1"));
        h.append(SUBJECT, HeaderValue::from_static("cust-2,cust-3"));
        h.insert(CALLER, HeaderValue::from_static("billing-service"));
        let ctx = extract(&h, None).unwrap();
        assert_eq!(ctx.caller, "billing-service");
        assert_eq!(ctx.purpose, "service.billing");
        assert_eq!(ctx.subjects, vec!["cust-1", "cust-2", "cust-3"]);
        // An authenticated caller wins over the header.
        assert_eq!(
            extract(&h, Some("fraud-service")).unwrap().caller,
            "fraud-service"
        );
    }

    #[test]
    fn two_purposes_or_bad_text_are_refused() {
        let mut h = HeaderMap::new();
        h.append(PURPOSE, HeaderValue::from_static("service.billing"));
        h.append(PURPOSE, HeaderValue::from_static("marketing"));
        assert_eq!(extract(&h, None), Err(MetadataError::Repeated(PURPOSE, 2)));
        let mut h = HeaderMap::new();
        h.insert(PURPOSE, HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert_eq!(extract(&h, None), Err(MetadataError::NotText(PURPOSE)));
        let mut h = HeaderMap::new();
        h.insert(SUBJECT, HeaderValue::from_static("cust-1,,cust-2"));
        assert_eq!(extract(&h, None), Err(MetadataError::Empty(SUBJECT)));
    }

    #[test]
    fn values_are_taken_byte_for_byte() {
        for (name, value) in [
            (PURPOSE, " service.billing"),
            (CALLER, "billing-service\t"),
            (RECIPIENT, " ntt-east "),
            (SUBJECT, "cust-1, cust-2"),
            (SUBJECT, "cust-1 "),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_str(value).unwrap());
            assert_eq!(
                extract(&h, None),
                Err(MetadataError::Whitespace(name)),
                "{name}: {value:?}"
            );
        }
    }

    #[test]
    fn no_purpose_is_not_an_error_but_empty() {
        let ctx = extract(&HeaderMap::new(), None).unwrap();
        assert_eq!(ctx.purpose, "");
        assert_eq!(ctx.caller, "");
    }

    fn with_timeout(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(GRPC_TIMEOUT, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn reads_every_timeout_unit() {
        let timeout = |v: &str| extract(&with_timeout(v), None).map(|c| c.timeout);
        assert_eq!(timeout("2H"), Ok(Some(Duration::from_secs(7200))));
        assert_eq!(timeout("3M"), Ok(Some(Duration::from_secs(180))));
        assert_eq!(timeout("10S"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(timeout("250m"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(timeout("7u"), Ok(Some(Duration::from_micros(7))));
        assert_eq!(
            timeout("99999999n"),
            Ok(Some(Duration::from_nanos(99_999_999)))
        );
        assert_eq!(
            extract(&HeaderMap::new(), None).map(|c| c.timeout),
            Ok(None)
        );
    }

    #[test]
    fn refuses_malformed_timeouts() {
        for bad in ["", "S", "10", "10s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(
                extract(&with_timeout(bad), None),
                Err(MetadataError::Timeout(bad.to_owned())),
                "{bad}"
            );
        }
    }
}
