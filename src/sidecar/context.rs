//! The request context: who calls, for what purpose, about whom, read from the call's
//! metadata (and, in mTLS mode, from the peer certificate).

use http::HeaderMap;

/// Metadata the sidecar reads.
pub const PURPOSE: &str = "x-purpose";
pub const SUBJECT: &str = "x-data-subject";
pub const RECIPIENT: &str = "x-recipient";
pub const CALLER: &str = "x-caller";
/// Set by pdgate on forwarded calls: the caller it authenticated (any incoming value is
/// replaced).
pub const AUTHENTICATED_CALLER: &str = "x-pdgate-caller";
/// On every response: the id of the decision (and of its audit record).
pub const DECISION_ID: &str = "x-pdgate-decision-id";

/// What one call says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    pub caller: String,
    /// Empty when the call declares none (denied `PURPOSE_NOT_DECLARED`).
    pub purpose: String,
    pub subjects: Vec<String>,
    pub recipient: Option<String>,
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
}

/// Reads the context. `caller` is the authenticated identity when the transport gives one
/// (mTLS); otherwise (`insecure-header` mode) it comes from `x-caller`.
pub fn extract(headers: &HeaderMap, caller: Option<String>) -> Result<CallContext, MetadataError> {
    let caller = match caller {
        Some(c) => c,
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
            let id = id.trim();
            if id.is_empty() {
                return Err(MetadataError::Empty(SUBJECT));
            }
            subjects.push(id.to_owned());
        }
    }
    Ok(CallContext {
        caller,
        purpose,
        subjects,
        recipient,
    })
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
    Ok(Some(text.trim().to_owned()))
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
        h.append(SUBJECT, HeaderValue::from_static("cust-2, cust-3"));
        h.insert(CALLER, HeaderValue::from_static("billing-service"));
        let ctx = extract(&h, None).unwrap();
        assert_eq!(ctx.caller, "billing-service");
        assert_eq!(ctx.purpose, "service.billing");
        assert_eq!(ctx.subjects, vec!["cust-1", "cust-2", "cust-3"]);
        // An authenticated caller wins over the header.
        assert_eq!(
            extract(&h, Some("fraud-service".into())).unwrap().caller,
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
    fn no_purpose_is_not_an_error_but_empty() {
        let ctx = extract(&HeaderMap::new(), None).unwrap();
        assert_eq!(ctx.purpose, "");
        assert_eq!(ctx.caller, "");
    }
}
