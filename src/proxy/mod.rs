//! Reverse proxy to the upstream app: a function from request to response that streams both
//! bodies (never collects them), over pooled keep-alive connections (TCP or a Unix socket).
//!
//! One function per step, called in order from [`Proxy::forward`]: rewrite the request
//! headers, send, rewrite the response headers, map failures to 502/504.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::task::TaskTracker;

pub mod h1;

use crate::config::{UpstreamAddr, UpstreamConfig};
use crate::metrics::Metrics;
use crate::response::{self, Body, BoxError};

/// Facts about the client connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

impl ConnInfo {
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

pub struct Proxy {
    client: Client<UpstreamConnector, UpstreamBody>,
    /// `http://host:port` (or `http://localhost` for a Unix socket): the prefix of every
    /// upstream URI; the client's `Host` header is sent as it came.
    base: String,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Tunnelled WebSocket connections, so shutdown can wait for them within its deadline.
    tunnels: TaskTracker,
    /// Raw upstream connections of the HTTP/1.1 fast path ([`h1`]).
    fast: h1::Pool,
}

impl Proxy {
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>, tunnels: TaskTracker) -> Proxy {
        let (client, base) = upstream_client(cfg);
        Proxy {
            client,
            base,
            response_timeout: cfg.response_timeout,
            metrics,
            tunnels,
            fast: h1::Pool::new(cfg),
        }
    }

    /// Sends one request to the upstream and streams its response back.
    pub async fn forward(&self, mut req: Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
        let started = Instant::now();
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let req = match self.upstream_request(req, conn, upgrade) {
            Ok(r) => r,
            Err(reason) => return self.finish(response::text(StatusCode::BAD_REQUEST, reason)),
        };
        let sent = self.send(req).await;
        self.metrics
            .proxy_duration
            .observe(started.elapsed().as_secs_f64());
        let resp = match sent {
            None => {
                self.metrics.upstream_errors_timeout.inc();
                let reason = format!(
                    "upstream did not answer within {}",
                    humanize(self.response_timeout)
                );
                return self.finish(response::text(StatusCode::GATEWAY_TIMEOUT, &reason));
            }
            Some(Err(e)) => return self.finish(self.upstream_error(e)),
            Some(Ok(resp)) => resp,
        };
        if let Some(client_upgrade) = client_upgrade {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                return self.finish(self.tunnel(resp, client_upgrade));
            }
        }
        self.finish(downstream_response(resp))
    }

    fn finish(&self, resp: Response<Body>) -> Response<Body> {
        self.metrics.proxy_response(resp.status().as_u16());
        resp
    }

    /// Step 2: send, and wait for the response headers; None when they do not come in time.
    /// `response_timeout` counts from the last request-body frame handed to the upstream, so
    /// an upload that keeps moving is never cut (a 1 GiB upload can outlast any sane timeout)
    /// while one the upstream stops reading is.
    async fn send(
        &self,
        req: Request<Incoming>,
    ) -> Option<Result<Response<Incoming>, hyper_util::client::legacy::Error>> {
        let progress = Arc::new(BodyProgress::new());
        let req = req.map(|inner| UpstreamBody {
            inner,
            progress: progress.clone(),
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
        // h2 clients name the host in :authority; HTTP/1.1 upstreams want it in Host.
        if !parts.headers.contains_key(header::HOST) {
            if let Some(a) = &client_authority {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        add_forwarded_headers(&mut parts.headers, conn);
        Ok(Request::from_parts(parts, body))
    }

    /// Step 4: the upstream failed before answering.
    fn upstream_error(&self, e: hyper_util::client::legacy::Error) -> Response<Body> {
        use std::error::Error;
        let cause = e
            .source()
            .and_then(|s| s.source().or(Some(s)))
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string());
        if e.is_connect() {
            self.metrics.upstream_errors_connect.inc();
            let timed_out = cause.contains("timed out") || cause.contains("deadline");
            if timed_out {
                return response::text(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("upstream connect timed out: {cause}"),
                );
            }
            return response::text(
                StatusCode::BAD_GATEWAY,
                &format!("upstream unreachable: {cause}"),
            );
        }
        self.metrics.upstream_errors_other.inc();
        response::text(
            StatusCode::BAD_GATEWAY,
            &format!("upstream failed: {cause}"),
        )
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
fn downstream_response(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // hyper frames the response for the client's own protocol; an HTTP/1.0 upstream must
    // not downgrade the client connection.
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE) && header_has_token(h, &header::CONNECTION, "upgrade")
}

pub fn header_has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The hop-by-hop headers every message drops (RFC 9110 §7.6.1), besides those its
/// `Connection` names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it
/// names, plus the fixed list.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// Appends the client's address to `X-Forwarded-For` and sets `X-Forwarded-Proto/-Host`.
pub(crate) fn add_forwarded_headers(h: &mut HeaderMap, conn: &ConnInfo) {
    let ip = conn.peer.ip().to_string();
    let xff = match h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .fold(String::new(), |mut acc, v| {
            if !acc.is_empty() {
                acc.push_str(", ");
            }
            acc.push_str(v);
            acc
        }) {
        prior if prior.is_empty() => ip,
        mut prior => {
            prior.push_str(", ");
            prior.push_str(&ip);
            prior
        }
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(conn.scheme()));
    if let Some(host) = h.get(header::HOST).cloned() {
        h.insert("x-forwarded-host", host);
    }
}

/// A pooled client to the upstream (TCP or Unix socket, as configured) and the base of its
/// request URIs: `http://host:port`, or `http://localhost` for a Unix socket. The proxy and
/// forward auth each make one, with their own body type and their own pool.
pub fn upstream_client<B>(cfg: &UpstreamConfig) -> (Client<UpstreamConnector, B>, String)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let (connector, base) = match &cfg.url {
        UpstreamAddr::Http { authority } => {
            let mut c = HttpConnector::new();
            c.set_connect_timeout(Some(cfg.connect_timeout));
            c.set_nodelay(true);
            c.set_keepalive(Some(Duration::from_secs(60)));
            (UpstreamConnector::Tcp(c), format!("http://{authority}"))
        }
        UpstreamAddr::Unix(path) => (
            UpstreamConnector::Unix {
                path: Arc::new(path.clone()),
                timeout: cfg.connect_timeout,
            },
            "http://localhost".to_string(),
        ),
    };
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);
    (client, base)
}

/// When a request body last moved toward the upstream: set by the body, read by
/// [`Proxy::send`]. An atomic rather than a wake-up per frame: the timer only looks at it
/// when it fires.
struct BodyProgress {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl BodyProgress {
    fn new() -> BodyProgress {
        BodyProgress {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
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
        polled.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn humanize(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

// ---------------------------------------------------------------------------------------
// Connector: TCP or Unix socket, one pooled client type for both.

#[derive(Clone)]
pub enum UpstreamConnector {
    Tcp(HttpConnector),
    Unix {
        path: Arc<PathBuf>,
        timeout: Duration,
    },
}

pub enum UpstreamIo {
    Tcp(TokioIo<TcpStream>),
    Unix(TokioIo<UnixStream>),
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self {
            UpstreamConnector::Tcp(c) => {
                let fut = c.call(uri);
                Box::pin(async move { Ok(UpstreamIo::Tcp(fut.await?)) })
            }
            UpstreamConnector::Unix { path, timeout } => {
                let (path, timeout) = (path.clone(), *timeout);
                Box::pin(async move {
                    let s = tokio::time::timeout(timeout, UnixStream::connect(path.as_path()))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                    Ok(UpstreamIo::Unix(TokioIo::new(s)))
                })
            }
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Tcp(s) => s.connected(),
            UpstreamIo::Unix(_) => Connected::new(),
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        let conn = ConnInfo {
            peer: "192.0.2.7:5555".parse().expect("test setup"),
            tls: true,
        };
        add_forwarded_headers(&mut h, &conn);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.example");
    }
}
