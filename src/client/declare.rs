//! What a call declares to pdgate, and the tower layer that writes it into each call.

use crate::gate::metadata::{CALLER, PURPOSE, RECIPIENT, SUBJECT};
use http::HeaderValue;
use http::header::HeaderMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::{Layer, Service};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A declaration that pdgate would refuse as malformed metadata (`INVALID_ARGUMENT`), caught
/// before the call is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("`{key}` is empty: pdgate needs a value")]
    Empty { key: &'static str },
    #[error(
        "`{key}` value `{value}` has whitespace around it: pdgate takes values byte for byte, \
         never trimmed"
    )]
    Whitespace { key: &'static str, value: String },
    #[error(
        "`{key}` value `{value}` contains a comma: pdgate splits `{key}` on commas, so it would \
         read two values"
    )]
    Comma { key: &'static str, value: String },
    #[error("`{key}` value `{value}` is not visible ASCII, which gRPC metadata requires")]
    NotAscii { key: &'static str, value: String },
}

/// The purpose of use a call declares, the data subjects it concerns and the company that
/// receives the data when that is not the caller. Built once per kind of call and attached to
/// each request ([`Declaration::attach`], read by [`DeclareLayer`]) or written into it
/// ([`Declaration::apply`]).
///
/// ```
/// use pdgate::client::Declaration;
/// let billing = Declaration::purpose("service.billing").subject("cust-1");
/// let request = billing.apply(tonic::Request::new(())).unwrap();
/// assert_eq!(request.metadata().get("x-purpose").unwrap(), "service.billing");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    purpose: String,
    subjects: Vec<String>,
    recipient: Option<String>,
    caller: Option<String>,
}

impl Declaration {
    /// A call for this purpose of use (`x-purpose`), e.g. `service.billing`.
    pub fn purpose(purpose: impl Into<String>) -> Self {
        Self {
            purpose: purpose.into(),
            subjects: Vec::new(),
            recipient: None,
            caller: None,
        }
    }

    /// A data subject the call concerns (one `x-data-subject` value each). pdgate reads the
    /// subjects from the request message where the route says so; these must then name
    /// exactly those (else `SUBJECT_MISMATCH`).
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subjects.push(subject.into());
        self
    }

    /// Several data subjects at once (an export, a client stream).
    pub fn subjects<I, S>(mut self, subjects: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.subjects.extend(subjects.into_iter().map(Into::into));
        self
    }

    /// The company receiving the data when it is not the caller (`x-recipient`): an internal
    /// service exporting to `ntt-east`, say.
    pub fn recipient(mut self, recipient: impl Into<String>) -> Self {
        self.recipient = Some(recipient.into());
        self
    }

    /// The caller's name in `x-caller`: only a pdgate in the development mode
    /// (`--identity insecure-header`) reads it; with mTLS the client certificate names the
    /// caller and pdgate ignores this.
    pub fn insecure_caller(mut self, caller: impl Into<String>) -> Self {
        self.caller = Some(caller.into());
        self
    }

    /// Carries this declaration in the request's extensions for a [`DeclareLayer`] below the
    /// client to write; nothing is checked until then.
    pub fn attach<T>(&self, mut request: tonic::Request<T>) -> tonic::Request<T> {
        request.extensions_mut().insert(self.clone());
        request
    }

    /// Writes the declaration into the request's metadata, replacing any values of these keys
    /// already there.
    pub fn apply<T>(
        &self,
        mut request: tonic::Request<T>,
    ) -> Result<tonic::Request<T>, ClientError> {
        let mut headers = std::mem::take(request.metadata_mut()).into_headers();
        self.write(&mut headers)?;
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
        Ok(request)
    }

    /// Checks every value as pdgate will read it, then writes them; nothing is written when
    /// one is wrong.
    fn write(&self, headers: &mut HeaderMap) -> Result<(), ClientError> {
        let purpose = value(PURPOSE, &self.purpose)?;
        let subjects = self
            .subjects
            .iter()
            .map(|s| value(SUBJECT, s))
            .collect::<Result<Vec<_>, _>>()?;
        let recipient = self
            .recipient
            .as_deref()
            .map(|r| value(RECIPIENT, r))
            .transpose()?;
        let caller = self
            .caller
            .as_deref()
            .map(|c| value(CALLER, c))
            .transpose()?;
        headers.insert(PURPOSE, purpose);
        headers.remove(SUBJECT);
        for subject in subjects {
            headers.append(SUBJECT, subject);
        }
        headers.remove(RECIPIENT);
        if let Some(recipient) = recipient {
            headers.insert(RECIPIENT, recipient);
        }
        if let Some(caller) = caller {
            headers.insert(CALLER, caller);
        }
        Ok(())
    }
}

/// One metadata value as pdgate's `gate::metadata` will accept it: non-empty, not padded, no
/// comma (pdgate splits on them), visible ASCII.
fn value(key: &'static str, text: &str) -> Result<HeaderValue, ClientError> {
    if text.is_empty() {
        return Err(ClientError::Empty { key });
    }
    if text.trim() != text {
        return Err(ClientError::Whitespace {
            key,
            value: text.to_owned(),
        });
    }
    if text.contains(',') {
        return Err(ClientError::Comma {
            key,
            value: text.to_owned(),
        });
    }
    if !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(ClientError::NotAscii {
            key,
            value: text.to_owned(),
        });
    }
    HeaderValue::from_str(text).map_err(|_| ClientError::NotAscii {
        key,
        value: text.to_owned(),
    })
}

/// A tower layer for a tonic client's channel: each call's [`Declaration`] — the one attached
/// to the request, else the layer's default — is written into its metadata. A call with
/// neither goes out as it is (pdgate denies it `PURPOSE_NOT_DECLARED`). A declaration pdgate
/// would refuse fails the call here, before anything is sent.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use pdgate::client::{Declaration, DeclareLayer};
/// use pdgate::proto::demo::customer_data_client::CustomerDataClient;
/// let channel = tonic::transport::Channel::from_static("http://127.0.0.1:8443").connect().await?;
/// let channel = tower::ServiceBuilder::new().layer(DeclareLayer::new()).service(channel);
/// let mut client = CustomerDataClient::new(channel);
/// let billing = Declaration::purpose("service.billing").subject("cust-1");
/// let request = pdgate::proto::demo::GetBillingStatementRequest {
///     customer_id: "cust-1".into(),
///     ..Default::default()
/// };
/// client.get_billing_statement(billing.attach(tonic::Request::new(request))).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct DeclareLayer {
    default: Option<Declaration>,
}

impl DeclareLayer {
    /// Only calls that carry a [`Declaration`] get metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls without a [`Declaration`] of their own declare this one (a service that only ever
    /// calls for one purpose).
    pub fn with_default(declaration: Declaration) -> Self {
        Self {
            default: Some(declaration),
        }
    }
}

impl<S> Layer<S> for DeclareLayer {
    type Service = DeclareService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeclareService {
            inner,
            default: self.default.clone(),
        }
    }
}

/// The service [`DeclareLayer`] makes.
#[derive(Debug, Clone)]
pub struct DeclareService<S> {
    inner: S,
    default: Option<Declaration>,
}

impl<S, B> Service<http::Request<B>> for DeclareService<S>
where
    S: Service<http::Request<B>>,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let declaration = request
            .extensions_mut()
            .remove::<Declaration>()
            .or_else(|| self.default.clone());
        if let Some(declaration) = declaration
            && let Err(e) = declaration.write(request.headers_mut())
        {
            return Box::pin(std::future::ready(Err(e.into())));
        }
        // `self.inner` is the service `poll_ready` readied: called directly, never a clone.
        let future = self.inner.call(request);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}
