//! The connections a port holds open, bounded: how many ([`Limits::max_connections`]), how
//! long one may take from accept to its first call's headers — TLS handshake and HTTP/2 preface
//! included ([`Limits::handshake_timeout`]) — and how long one may stay open with no call in
//! flight ([`Limits::idle_timeout`]). Without them every idle or half-open connection is kept
//! forever, and memory with it (#14 finding 3: 5 000 idle connections, +83 MiB, never freed).
//!
//! Idle means no call in flight, not no bytes: HTTP/2 keepalive PINGs keep a quiet connection
//! busy on the wire, and a long `AuditLog.Tail` stream may send nothing for minutes. So the
//! connection ([`Conn`], the socket) and the calls on it ([`CallsLayer`], a tower layer that
//! sees each request) meet in [`Connections`]: the layer counts the calls of the connection the
//! request came on (found by its peer address), and the socket closes itself, on its next
//! read, once the count has been zero for the idle time.

use super::limits::Limits;
use futures_util::future::BoxFuture;
use futures_util::task::AtomicWaker;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// The open connections of one port. Cloned into the port's incoming stream and its layer.
#[derive(Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

struct Shared {
    /// By peer address: unique among open connections of one listening socket.
    open: Mutex<HashMap<SocketAddr, Arc<Activity>>>,
    slots: Arc<Semaphore>,
    handshake_timeout: std::time::Duration,
    idle_timeout: std::time::Duration,
}

/// The calls in flight on one connection.
#[derive(Default)]
struct Activity {
    calls: AtomicUsize,
    /// When the last call ended; `None` until the first call has come.
    quiet_since: Mutex<Option<Instant>>,
    /// The connection's reader, woken when its last call ends so that its idle clock starts.
    reader: AtomicWaker,
}

impl Connections {
    pub fn new(limits: &Limits) -> Self {
        Self {
            shared: Arc::new(Shared {
                open: Mutex::new(HashMap::new()),
                slots: Arc::new(Semaphore::new(limits.max_connections)),
                handshake_timeout: limits.handshake_timeout,
                idle_timeout: limits.idle_timeout,
            }),
        }
    }

    /// The connections `listener` accepts, as [`super::incoming`] gives them, each bounded. One
    /// past `max_connections` is closed at once: a client that cannot be served should hear so
    /// now, not hang in the accept backlog until its deadline.
    pub fn incoming(&self, listener: TcpListener) -> impl Stream<Item = io::Result<Conn>> + use<> {
        let shared = self.shared.clone();
        super::incoming(listener).filter_map(move |accepted| match accepted {
            Err(e) => Some(Err(e)),
            Ok(io) => shared.admit(io).map(Ok),
        })
    }

    /// How many connections are open (accepted and not yet closed).
    pub fn open(&self) -> usize {
        self.shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The layer that counts each connection's calls; give it to the server of the same port.
    pub fn layer(&self) -> CallsLayer {
        CallsLayer {
            connections: self.clone(),
        }
    }

    fn activity(&self, peer: SocketAddr) -> Option<Arc<Activity>> {
        self.shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&peer)
            .cloned()
    }
}

impl Shared {
    fn admit(self: &Arc<Self>, io: TcpStream) -> Option<Conn> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::debug!(peer = ?io.peer_addr().ok(), "connection refused: at `limits.max_connections`");
            return None;
        };
        let peer = io.peer_addr().ok();
        let activity = Arc::new(Activity::default());
        if let Some(peer) = peer {
            self.open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(peer, activity.clone());
        }
        let accepted = Instant::now();
        Some(Conn {
            io,
            peer,
            activity,
            accepted,
            timer: Box::pin(tokio::time::sleep_until(accepted + self.handshake_timeout)),
            shared: self.clone(),
            _slot: slot,
        })
    }
}

impl Activity {
    /// When the connection is to be closed, if no call comes before: `None` while a call is in
    /// flight.
    fn closes_at(&self, accepted: Instant, shared: &Shared) -> Option<Instant> {
        if self.calls.load(Ordering::Acquire) > 0 {
            return None;
        }
        let quiet_since = *self
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(match quiet_since {
            None => accepted + shared.handshake_timeout,
            Some(since) => since + shared.idle_timeout,
        })
    }

    fn begin(self: Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(self)
    }
}

/// One call in flight on its connection, until dropped (with the response body).
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        // The instant is set before the count falls, so a reader that sees no call sees it.
        *self
            .0
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

/// An accepted connection: a TCP stream that closes itself (its next read fails with
/// `TimedOut`) when its time without a call is up, and frees its `max_connections` slot when
/// dropped.
pub struct Conn {
    io: TcpStream,
    peer: Option<SocketAddr>,
    activity: Arc<Activity>,
    accepted: Instant,
    timer: Pin<Box<Sleep>>,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(peer) = self.peer {
            let mut open = self
                .shared
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // A new connection from the same address may already be registered only after this
            // one's socket closed, which is after this drop: the entry is this connection's.
            open.remove(&peer);
        }
    }
}

impl Connected for Conn {
    // The TCP stream's own: tonic's `peer_certs`/`remote_addr` look for exactly this type.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(closes_at) = this.activity.closes_at(this.accepted, &this.shared) {
            this.activity.reader.register(cx.waker());
            if this.timer.deadline() != closes_at {
                this.timer.as_mut().reset(closes_at);
            }
            if this.timer.as_mut().poll(cx).is_ready() {
                let why = if this.activity.calls.load(Ordering::Acquire) == 0
                    && this
                        .activity
                        .quiet_since
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_none()
                {
                    "no call within `limits.handshake_timeout_seconds` of connecting"
                } else {
                    "no call in flight for `limits.idle_timeout_seconds`"
                };
                tracing::debug!(peer = ?this.peer, "closing connection: {why}");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Counts each call on its connection, from its headers to the end of its response body.
#[derive(Clone)]
pub struct CallsLayer {
    connections: Connections,
}

impl<S> Layer<S> for CallsLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted {
            inner,
            connections: self.connections.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    connections: Connections,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Counted<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let extensions = request.extensions();
        let peer = extensions
            .get::<TcpConnectInfo>()
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .map(TlsConnectInfo::get_ref)
            })
            .and_then(TcpConnectInfo::remote_addr);
        let guard = peer
            .and_then(|peer| self.connections.activity(peer))
            .map(Activity::begin);
        let answered = self.inner.call(request);
        Box::pin(async move {
            let response = answered.await?;
            Ok(response.map(|body| {
                Body::new(Tracked {
                    body: Body::new(body),
                    _guard: guard,
                })
            }))
        })
    }
}

/// A response body that keeps its call counted until it is finished or dropped.
struct Tracked {
    body: Body,
    _guard: Option<CallGuard>,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
