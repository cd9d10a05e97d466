//! One client connection: count it, pick its protocol, serve it with hyper (or hand an
//! HTTP/1.1 SSE subscriber to the SSE fast path), drain it on shutdown.
//!
//! The protocol is chosen by peeking at the first bytes (h2 prior knowledge vs HTTP/1.1) or
//! from ALPN (TLS), so hyper's HTTP/1 and HTTP/2 connections get the socket directly; hyper-
//! util's auto builder would instead re-feed the sniffed bytes and grow the read buffer.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;

use super::prefixed::Prefixed;
use super::{Kind, Live, State};
use crate::admin::{self, AdminView};
use crate::auth::{Ask, Gatekeeper};
use crate::config::{PushLocation, ServerConfig};
use crate::proxy::{h1, ConnInfo, Proxy};
use crate::push::{self, PushContext};
use crate::response::{self, Body};
use crate::router::Route;

/// hyper's two protocol builders, made from `[server]` once per config.
pub(super) struct HttpBuilders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_timeout: Duration,
}

impl HttpBuilders {
    pub(super) fn new(cfg: &ServerConfig) -> HttpBuilders {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(cfg.header_timeout)
            .max_buf_size(cfg.max_header_bytes)
            .max_headers(cfg.max_headers)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(cfg.h2_max_concurrent_streams)
            .max_header_list_size(cfg.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        HttpBuilders {
            h1,
            h2,
            header_timeout: cfg.header_timeout,
        }
    }
}

pub(super) async fn accept_tcp(
    listener: TcpListener,
    kind: Kind,
    state: Arc<State>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            peer,
            tls: kind == Kind::PublicTls,
        };
        match kind {
            Kind::Public | Kind::PublicTls => {
                let Some(guard) = ConnectionGuard::acquire(&state) else {
                    refuse(stream, &state);
                    continue;
                };
                if kind == Kind::Public {
                    state
                        .conns
                        .spawn(serve_public(stream, state.clone(), conn, guard));
                } else {
                    state
                        .conns
                        .spawn(serve_tls(stream, state.clone(), conn, guard));
                }
            }
            Kind::Publish | Kind::PublishUnix => {
                let live = state.live.read().clone();
                let svc = service(&state, kind, conn);
                state
                    .conns
                    .spawn(serve_h1(stream, svc, live, state.drain.clone()));
            }
            Kind::Admin => {
                // Not drained and not tracked: /readyz must answer 503 during the drain.
                let live = state.live.read().clone();
                let svc = service(&state, kind, conn);
                tokio::spawn(serve_h1(stream, svc, live, CancellationToken::new()));
            }
        }
    }
}

pub(super) async fn accept_unix(
    listener: UnixListener,
    state: Arc<State>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accept on the publish socket failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let conn = ConnInfo {
            peer: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: false,
        };
        let live = state.live.read().clone();
        let svc = service(&state, Kind::PublishUnix, conn);
        state
            .conns
            .spawn(serve_h1(stream, svc, live, state.drain.clone()));
    }
}

/// What the first bytes of a plain-TCP connection say.
enum FirstBytes {
    /// Nothing arrived within the header timeout, or the peer closed.
    Nothing,
    H2,
    /// An SSE subscription the fast path serves (its request head already consumed).
    Sse(push::FastSse, Duration),
    /// The fast path answered the request itself (an auth denial) and closed.
    Answered,
    H1,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The fast path needs the whole request head in one peek; larger heads go to hyper.
const PEEK: usize = 4096;

async fn serve_public(
    mut stream: TcpStream,
    state: Arc<State>,
    conn: ConnInfo,
    guard: ConnectionGuard,
) {
    let live = state.live.read().clone();
    let first = first_bytes(&mut stream, &state, &live, &conn).await;
    match first {
        FirstBytes::Nothing | FirstBytes::Answered => {}
        FirstBytes::Sse(fast, keepalive) => {
            push::sse::serve_h1(stream, fast.sub, fast.cors, keepalive).await
        }
        FirstBytes::H2 => {
            let svc = service(&state, Kind::Public, conn);
            Box::pin(serve_h2(stream, svc, live, state.drain.clone())).await
        }
        FirstBytes::H1 => {
            // Boxed, like the other branches: an idle SSE connection's task must not carry
            // the proxy's state in its size.
            let st = state.clone();
            let site = move || PublicSite {
                live: st.live.read().clone(),
                state: st.clone(),
            };
            let served = Box::pin(h1::serve(&mut stream, site, &conn, &state.drain)).await;
            if let h1::Served::Handoff(read) = served {
                let svc = service(&state, Kind::Public, conn);
                let io = Prefixed::new(read, stream);
                Box::pin(serve_h1(io, svc, live, state.drain.clone())).await
            }
        }
    }
    drop(guard);
}

/// Waits (bounded by the header timeout) for the first bytes and looks at them without
/// consuming them, unless the fast path takes the connection.
async fn first_bytes(
    stream: &mut TcpStream,
    state: &State,
    live: &Live,
    conn: &ConnInfo,
) -> FirstBytes {
    let timeout = live.http.header_timeout;
    let mut buf = vec![0u8; PEEK];
    // The timeout bounds the peek itself: tokio reports a fresh socket readable before any
    // byte has arrived, so `readable()` alone does not wait for a silent client.
    let n = match tokio::time::timeout(timeout, stream.peek(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return FirstBytes::Nothing,
    };
    let head = &buf[..n];
    if head.len() >= 3 && H2_PREFACE.starts_with(&head[..head.len().min(H2_PREFACE.len())]) {
        return FirstBytes::H2;
    }
    let Some(sse) = fast_sse_head(head, live) else {
        return FirstBytes::H1;
    };
    let Some(checked) = push::check_fast_sse(&sse.location, sse.query(), &sse.headers) else {
        return FirstBytes::H1;
    };
    if Gatekeeper::guards(&sse.location) {
        // Boxed: the check (a whole upstream request) takes memory only while it runs, not in
        // every connection's task for as long as the connection lives.
        return Box::pin(guarded_fast_sse(
            stream, state, live, conn, sse, checked, buf,
        ))
        .await;
    }
    let (len, keepalive) = (sse.len, sse.location.keepalive);
    let subscribed = push::subscribe_fast_sse(&state.hub, &sse.channel, checked, conn.peer);
    drop(sse);
    match subscribed {
        Ok(fast) => {
            // The head is in the socket buffer (we peeked it): consume exactly that much.
            if stream.read_exact(&mut buf[..len]).await.is_err() {
                return FirstBytes::Nothing;
            }
            FirstBytes::Sse(fast, keepalive)
        }
        // hyper answers the error (keep-alive and all).
        Err(_) => FirstBytes::H1,
    }
}

/// The fast path at a location with forward auth or JWT. The check runs while the head is
/// still unread in the socket and before anything is subscribed; its answer is final here
/// (handing the request to hyper would ask the upstream a second time), so a refusal, or a hub
/// error after an allowed check, is written on the raw socket.
async fn guarded_fast_sse(
    stream: &mut TcpStream,
    state: &State,
    live: &Live,
    conn: &ConnInfo,
    sse: FastSseHead,
    checked: push::FastSseRequest,
    mut buf: Vec<u8>,
) -> FirstBytes {
    let ask = Ask {
        headers: &sse.headers,
        target: &sse.target,
        query: sse.query(),
        conn,
    };
    let checked_result = live
        .gatekeeper
        .check(&sse.location, &sse.channel, &ask)
        .await;
    let answer = match checked_result {
        Err(denial) => denial.into_response(checked.cors.as_ref()),
        Ok(()) => match push::subscribe_fast_sse(&state.hub, &sse.channel, checked, conn.peer) {
            Ok(fast) => {
                if stream.read_exact(&mut buf[..sse.len]).await.is_err() {
                    return FirstBytes::Nothing;
                }
                return FirstBytes::Sse(fast, sse.location.keepalive);
            }
            Err(e) => push::hub_error(e),
        },
    };
    if stream.read_exact(&mut buf[..sse.len]).await.is_ok() {
        write_and_close(stream, answer, live.http.header_timeout).await;
    }
    FirstBytes::Answered
}

/// A complete `GET` head at a push location, parsed by the fast path.
struct FastSseHead {
    location: Arc<PushLocation>,
    channel: String,
    /// Path and query, as sent.
    target: String,
    headers: HeaderMap,
    /// Bytes of the head (request line, headers, blank line).
    len: usize,
}

impl FastSseHead {
    fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
}

/// Parses a complete HTTP/1.1 `GET` head for a push location; None leaves it to hyper.
fn fast_sse_head(head: &[u8], live: &Live) -> Option<FastSseHead> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if req.method != Some(Method::GET.as_str()) || req.version != Some(1) {
        return None;
    }
    let target = req.path?;
    if !target.starts_with('/') {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let Route::Push { location, channel } = live.router.route(path) else {
        return None;
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        // A body on a GET, or anything hop-by-hop we do not speak: leave it to hyper.
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            return None;
        }
        map.append(name, value);
    }
    Some(FastSseHead {
        location,
        channel,
        target: target.to_string(),
        headers: map,
        len,
    })
}

/// Most body bytes the fast path writes in an answer of its own (denials are small).
const MAX_RAW_BODY: usize = 16 * 1024;

/// Writes a complete HTTP/1.1 response with `Connection: close` on the raw socket, then closes
/// it; the whole write is bounded by `timeout`.
async fn write_and_close(stream: &mut TcpStream, resp: Response<Body>, timeout: Duration) {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let (parts, body) = resp.into_parts();
    // Our own small, fixed bodies (denials, hub errors): a longer one is cut, not streamed.
    let mut body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => bytes::Bytes::new(),
    };
    body.truncate(MAX_RAW_BODY);
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if matches!(
            name,
            &http::header::CONTENT_LENGTH
                | &http::header::CONNECTION
                | &http::header::TRANSFER_ENCODING
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    out.extend_from_slice(&body);
    let write = async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!("writing a fast-path answer failed: {e}");
    }
}

/// TLS: handshake (bounded by the header timeout), then h2 or HTTP/1.1 as ALPN chose.
async fn serve_tls(stream: TcpStream, state: Arc<State>, conn: ConnInfo, guard: ConnectionGuard) {
    let live = state.live.read().clone();
    let Some(acceptor) = live.tls.clone() else {
        return;
    };
    let timeout = live.http.header_timeout;
    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake with {} failed: {e}", conn.peer);
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake with {} timed out", conn.peer);
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let svc = service(&state, Kind::PublicTls, conn);
    if h2 {
        serve_h2(tls, svc, live, state.drain.clone()).await;
    } else {
        serve_h1(tls, svc, live, state.drain.clone()).await;
    }
    drop(guard);
}

fn service(
    state: &Arc<State>,
    kind: Kind,
    conn: ConnInfo,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
> + Send
       + Clone
       + 'static {
    let st = state.clone();
    service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, Infallible>(dispatch(&st, kind, req, conn).await) }
    })
}

/// HTTP/1.1 through hyper until the connection ends or `drain` asks it to finish. hyper's
/// header read timeout bounds the first and every later request head.
async fn serve_h1<I, S>(io: I, svc: S, live: Arc<Live>, drain: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = live
        .http
        .h1
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    drop(live);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!("connection ended with an error: {e}");
    }
}

/// HTTP/2 through hyper. hyper has no header timeout for h2: a client that sends the preface
/// and no request within the header timeout is closed here, so it cannot hold a slot forever.
async fn serve_h2<I, S>(io: I, svc: S, live: Arc<Live>, drain: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + Clone
        + 'static,
    S::Future: Send + 'static,
{
    let header_timeout = live.http.header_timeout;
    let first_request = Arc::new(tokio::sync::Notify::new());
    let svc = {
        let seen = first_request.clone();
        service_fn(move |req| {
            seen.notify_one(); // no waiter after the first request: an atomic store
            let svc = svc.clone();
            async move { svc.call(req).await }
        })
    };
    let conn = live.http.h2.serve_connection(TokioIo::new(io), svc);
    drop(live);
    tokio::pin!(conn);
    let first = tokio::time::timeout(header_timeout, first_request.notified());
    tokio::pin!(first);
    let mut waiting_for_first = true;
    let r = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            seen = first.as_mut(), if waiting_for_first => {
                if seen.is_err() {
                    tracing::debug!("no h2 request within {header_timeout:?}; closing");
                    return;
                }
                waiting_for_first = false;
            }
        }
    };
    if let Err(e) = r {
        tracing::debug!("h2 connection ended with an error: {e}");
    }
}

async fn dispatch(
    state: &Arc<State>,
    kind: Kind,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<Body> {
    match kind {
        Kind::Public | Kind::PublicTls => public(state, req, conn).await,
        Kind::Publish | Kind::PublishUnix => {
            let config = state.live.read().config.clone();
            // TCP may need the token; the Unix socket is guarded by its file permissions.
            let token = match kind {
                Kind::Publish => config.publish.token.as_ref(),
                _ => None,
            };
            let max = config.channels.max_message_size;
            crate::publish::handle(&state.hub, max, token, req, state.webpush.as_ref()).await
        }
        Kind::Admin => admin::handle(
            AdminView {
                hub: &state.hub,
                metrics: &state.metrics,
                ready: !state.draining.load(Ordering::Relaxed),
                webpush: state.webpush.as_ref(),
                server: super::ServerHandle {
                    state: state.clone(),
                },
            },
            &req,
        ),
    }
}

/// Who answers a public request path, in order: an `[[ingress]]` path, the Web Push API, then
/// the router (push locations, else the upstream). The one decision `public` and the proxy
/// fast path both follow.
enum PublicRoute<'a> {
    Ingress(&'a crate::webhook::ingress::IngressPoint),
    /// The Web Push API, with the part of the path after its base.
    WebPush(&'a crate::webpush::WebPush, String),
    Router(Route),
}

fn route_public<'a>(state: &'a State, live: &'a Live, path: &str) -> PublicRoute<'a> {
    if let Some(ingress) = live.ingress.find(path) {
        return PublicRoute::Ingress(ingress);
    }
    if let Some(wp) = &state.webpush {
        if let Some(rest) = wp.route(path) {
            return PublicRoute::WebPush(wp, rest.to_string());
        }
    }
    PublicRoute::Router(live.router.route(path))
}

async fn public(state: &Arc<State>, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let live = state.live.read().clone();
    match route_public(state, &live, req.uri().path()) {
        PublicRoute::Ingress(ingress) => {
            crate::webhook::ingress::serve(&state.hub, ingress, req, conn.peer).await
        }
        PublicRoute::WebPush(wp, rest) => {
            let ctx = crate::webpush::api::ApiContext {
                webpush: wp,
                locations: &live.config.push,
                gatekeeper: &live.gatekeeper,
                conn: &conn,
            };
            Box::pin(crate::webpush::api::handle(ctx, req, &rest)).await
        }
        PublicRoute::Router(Route::Proxy) => live.proxy.forward(req, &conn).await,
        PublicRoute::Router(Route::BadChannel(reason)) => {
            response::text(StatusCode::BAD_REQUEST, reason)
        }
        PublicRoute::Router(Route::Push { location, channel }) => {
            let ctx = PushContext {
                hub: &state.hub,
                ws_tasks: &state.upgraded,
                gatekeeper: &live.gatekeeper,
                conn: &conn,
                webrtc: state.webrtc.as_ref(),
            };
            push::serve(ctx, req, &location, &channel).await
        }
    }
}

/// Counts an open public connection; dropping it uncounts.
pub(super) struct ConnectionGuard(Arc<State>);

impl ConnectionGuard {
    fn acquire(state: &Arc<State>) -> Option<ConnectionGuard> {
        let max = state.live.read().config.server.max_connections;
        let prev = state.open_connections.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            state.open_connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        state.metrics.client_connections.inc();
        Some(ConnectionGuard(state.clone()))
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.client_connections.dec();
    }
}

/// Over `max_connections`: a best-effort 503 written without waiting, then close.
fn refuse(stream: TcpStream, state: &State) {
    state.metrics.connections_refused.inc();
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 21\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many connections\n";
    let _ = stream.try_write(BUSY);
}

/// What the proxy fast path reads: the live config, and the server's own paths.
struct PublicSite {
    live: Arc<Live>,
    state: Arc<State>,
}

impl h1::Site for PublicSite {
    fn proxy(&self) -> &Proxy {
        &self.live.proxy
    }

    fn proxies(&self, path: &str) -> bool {
        matches!(
            route_public(&self.state, &self.live, path),
            PublicRoute::Router(Route::Proxy)
        )
    }

    fn header_timeout(&self) -> Duration {
        self.live.http.header_timeout
    }

    fn max_header_bytes(&self) -> usize {
        self.live.config.server.max_header_bytes
    }

    fn max_headers(&self) -> usize {
        self.live.config.server.max_headers
    }
}
