//! Reverse proxy to the upstream app: one semantics, two engines.
//!
//! - The semantics, written once: what is rewritten in a relayed message (`rewrite`: hop-by-hop
//!   headers, `X-Forwarded-*`, framing) and how a failure becomes 502/504 (`failure`).
//! - The hyper engine (here): a function from request to response that streams both bodies
//!   (never collects them) over hyper-util's pooled client (`client`). It takes everything.
//! - The HTTP/1.1 fast path (`fast`): body-less GET/HEAD/OPTIONS on plain TCP, relayed as raw
//!   heads and framed bytes over its own pool, because measurements showed hyper's per-request
//!   overhead was most of crier's proxy CPU; anything else it hands to hyper.
//! - `tee`: a bounded copy of a body as it streams, and how the body ended, for
//!   `[[publish_on]]` (the proxy copies; `publish::publish_on` publishes).
//!
//! One function per step, called in order from [`Proxy::forward`]: rewrite the request
//! headers, send, rewrite the response headers, map failures to 502/504.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

mod client;
pub mod failure;
pub mod fast;
pub(crate) mod probe;
pub mod rewrite;
pub mod tee;

pub use client::{upstream_client, UpstreamConnector};
pub use failure::UpstreamFailure;
pub use rewrite::{add_forwarded_headers, header_has_token};

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::model::ConnInfo;
use crate::response::{self, Body, BoxError};
use rewrite::strip_hop_by_hop;

/// The `Allow` of a refused CONNECT: every method the proxy forwards is the app's to
/// answer, so this names the usual ones.
const PROXIED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

pub struct Proxy {
    client: Client<UpstreamConnector, UpstreamBody>,
    /// `http://host:port` (or `http://localhost` for a Unix socket): the prefix of every
    /// upstream URI; the client's `Host` header is sent as it came.
    base: String,
    response_timeout: Duration,
    /// Longest wait between two frames of a response body (both engines).
    read_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Tunnelled WebSocket connections, so shutdown can wait for them within its deadline.
    tunnels: TaskTracker,
    /// Raw upstream connections of the HTTP/1.1 fast path ([`fast`]).
    fast: fast::Pool,
}

impl Proxy {
    /// `loops`: the event loops running (the fast path keeps idle connections per loop).
    pub fn new(
        cfg: &UpstreamConfig,
        loops: usize,
        metrics: Arc<Metrics>,
        tunnels: TaskTracker,
    ) -> Proxy {
        let (client, base) = upstream_client(cfg);
        Proxy {
            client,
            base,
            response_timeout: cfg.response_timeout,
            read_timeout: cfg.read_timeout,
            metrics,
            tunnels,
            fast: fast::Pool::new(cfg, loops),
        }
    }

    /// Sends one request to the upstream and streams its response back.
    pub async fn forward(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
        self.forward_copying(req, conn, None).await
    }

    /// [`Proxy::forward`], copying the request body into `copy` as the upstream reads it
    /// (`[[publish_on]]` with `body = "request"`).
    pub async fn forward_copying(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        copy: Option<tee::Tee>,
    ) -> Response<Body> {
        // A reverse proxy is no tunnel: CONNECT would ask the upstream app to open one (as
        // nginx, answer 405 and never forward it).
        if req.method() == http::Method::CONNECT {
            return self.finish(response::method_not_allowed(PROXIED_METHODS, false));
        }
        let started = Instant::now();
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let req = match self.upstream_request(req, conn, upgrade) {
            Ok(r) => r,
            Err(reason) => return self.finish(response::text(StatusCode::BAD_REQUEST, reason)),
        };
        let progress = Arc::new(BodyProgress::new());
        let sent = self.send(req, copy, &progress).await;
        self.metrics
            .proxy_duration
            .observe(started.elapsed().as_secs_f64());
        let resp = match sent {
            None => return self.fail(UpstreamFailure::NoAnswer(self.response_timeout)),
            // The client's body broke (bad chunked framing, a reset mid-upload): hyper-util
            // reports it like an upstream failure, but the fault is the client's.
            Some(Err(_)) if progress.client_failed() => {
                return self.finish(response::text(
                    StatusCode::BAD_REQUEST,
                    "malformed request body",
                ))
            }
            Some(Err(e)) => return self.fail(UpstreamFailure::from_client(&e)),
            Some(Ok(resp)) => resp,
        };
        if let Some(client_upgrade) = client_upgrade {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                return self.finish(self.tunnel(resp, client_upgrade));
            }
        }
        self.finish(downstream_response(resp, self.read_timeout))
    }

    fn finish(&self, resp: Response<Body>) -> Response<Body> {
        self.metrics.proxy_response(resp.status().as_u16());
        resp
    }

    /// Step 4: the upstream failed before answering.
    fn fail(&self, f: UpstreamFailure) -> Response<Body> {
        f.count(&self.metrics);
        self.finish(response::text(f.status(), &f.reason()))
    }

    /// Step 2: send, and wait for the response headers; None when they do not come in time.
    /// `response_timeout` counts from the last request-body frame handed to the upstream, so
    /// an upload that keeps moving is never cut (a 1 GiB upload can outlast any sane timeout)
    /// while one the upstream stops reading is.
    async fn send(
        &self,
        req: Request<Incoming>,
        copy: Option<tee::Tee>,
        progress: &Arc<BodyProgress>,
    ) -> Option<Result<Response<Incoming>, hyper_util::client::legacy::Error>> {
        let req = req.map(|inner| UpstreamBody {
            inner,
            progress: progress.clone(),
            copy,
        });
        let pending = self.client.request(req);
        tokio::pin!(pending);
        loop {
            let deadline = progress.last() + self.response_timeout;
            match tokio::time::timeout_at(deadline.into(), pending.as_mut()).await {
                Ok(r) => return Some(r),
                // The body moved while we slept: the clock restarts from there.
                Err(_) if progress.last() + self.response_timeout > Instant::now() => continue,
                Err(_) => return None,
            }
        }
    }

    /// Step 1: the request as the upstream sees it.
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        upgrade: bool,
    ) -> Result<Request<Incoming>, &'static str> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut uri = String::with_capacity(self.base.len() + path.len());
        uri.push_str(&self.base);
        uri.push_str(path);
        let client_authority = parts.uri.authority().cloned();
        parts.uri = uri
            .parse::<Uri>()
            .map_err(|_| "request target cannot be proxied")?;
        // The upstream is a plain HTTP/1.1 app, whatever the client spoke.
        parts.version = Version::HTTP_11;
        let upgrade_proto = if upgrade {
            parts.headers.get(header::UPGRADE).cloned()
        } else {
            None
        };
        strip_hop_by_hop(&mut parts.headers);
        if let Some(p) = upgrade_proto {
            parts.headers.insert(header::UPGRADE, p);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        // The target's authority, when there is one, is the host: an absolute-form target
        // overrides any Host header (RFC 9112 §3.2.2) and h2 clients name the host in
        // :authority; an HTTP/1.1 upstream reads it in Host.
        if let Some(a) = &client_authority {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        add_forwarded_headers(&mut parts.headers, conn);
        Ok(Request::from_parts(parts, body))
    }

    /// An upgrade the upstream accepted: join the two upgraded connections until either closes.
    fn tunnel(
        &self,
        mut resp: Response<Incoming>,
        client: hyper::upgrade::OnUpgrade,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut resp);
        self.tunnels.spawn(async move {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!("websocket tunnel not established: {e}");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!("websocket tunnel ended: {e}");
            }
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, response::empty())
    }
}

/// Step 3: the upstream's response as the client sees it; the body streams through.
fn downstream_response(resp: Response<Incoming>, read_timeout: Duration) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    // hyper decoded the transfer coding; a Content-Length beside it is void (RFC 9112 §6.3)
    // and must not make hyper frame (and cut) the body by it.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers);
    // hyper frames the response for the client's own protocol; an HTTP/1.0 upstream must
    // not downgrade the client connection.
    parts.version = Version::HTTP_11;
    let body = IdleTimeout {
        inner: body,
        limit: read_timeout,
        sleep: Box::pin(tokio::time::sleep(read_timeout)),
        waiting: false,
    };
    Response::from_parts(parts, body.boxed_unsync())
}

/// A response body cut when the upstream sends nothing for `limit` (`upstream.read_timeout`),
/// as the fast path does between reads: an app's long-poll behaves the same on both engines.
struct IdleTimeout {
    inner: Incoming,
    limit: Duration,
    /// Armed when a read finds nothing; one timer per body, not one per frame.
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// A read found nothing and the timer runs.
    waiting: bool,
}

impl http_body::Body for IdleTimeout {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                self.waiting = false;
                Poll::Ready(r.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                // The clock starts at the first read that finds nothing, not at the last
                // frame: time the client took to take that frame is not the upstream's.
                if !self.waiting {
                    self.waiting = true;
                    let next = tokio::time::Instant::now() + self.limit;
                    self.sleep.as_mut().reset(next);
                }
                match self.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "upstream read timeout",
                    ))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn wants_upgrade(h: &http::HeaderMap) -> bool {
    h.contains_key(header::UPGRADE) && header_has_token(h, &header::CONNECTION, "upgrade")
}

/// When a request body last moved toward the upstream: set by the body, read by
/// [`Proxy::send`]. An atomic rather than a wake-up per frame: the timer only looks at it
/// when it fires.
struct BodyProgress {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
    /// The client's body ended in an error (set by the body, read after the send failed).
    client_failed: AtomicBool,
}

impl BodyProgress {
    fn new() -> BodyProgress {
        BodyProgress {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            client_failed: AtomicBool::new(false),
        }
    }

    fn mark(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Relaxed)
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The client's request body on its way to the upstream, streamed as it comes; each frame
/// the upstream connection takes marks progress.
pub struct UpstreamBody {
    inner: Incoming,
    progress: Arc<BodyProgress>,
    copy: Option<tee::Tee>,
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            self.progress.mark();
        }
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.progress.client_failed.store(true, Ordering::Relaxed);
        }
        if let Some(copy) = &self.copy {
            match &polled {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        copy.data(d);
                    }
                    // The client stops polling a body that says it is over.
                    if self.inner.is_end_stream() {
                        copy.ended();
                    }
                }
                Poll::Ready(None) => copy.ended(),
                _ => {}
            }
        }
        polled.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
