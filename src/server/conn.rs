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

use super::{Kind, Live, State};
use crate::admin::{self, AdminView};
use crate::config::ServerConfig;
use crate::proxy::ConnInfo;
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
            Kind::Publish => {
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
        let svc = service(&state, Kind::Publish, conn);
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
    let first = first_bytes(&mut stream, &state, &live).await;
    match first {
        FirstBytes::Nothing => {}
        FirstBytes::Sse(fast, keepalive) => {
            push::sse::serve_h1(stream, fast.sub, fast.cors, keepalive).await
        }
        FirstBytes::H2 => {
            let svc = service(&state, Kind::Public, conn);
            Box::pin(serve_h2(stream, svc, live, state.drain.clone())).await
        }
        FirstBytes::H1 => {
            let svc = service(&state, Kind::Public, conn);
            Box::pin(serve_h1(stream, svc, live, state.drain.clone())).await
        }
    }
    drop(guard);
}

/// Waits (bounded by the header timeout) for the first bytes and looks at them without
/// consuming them, unless the fast path takes the connection.
async fn first_bytes(stream: &mut TcpStream, state: &State, live: &Live) -> FirstBytes {
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
    let Some((fast, head_len)) = fast_sse(head, state, live) else {
        return FirstBytes::H1;
    };
    let keepalive = fast.1;
    // The head is in the socket buffer (we just peeked it): consume exactly that much.
    if stream.read_exact(&mut buf[..head_len]).await.is_err() {
        return FirstBytes::Nothing;
    }
    FirstBytes::Sse(fast.0, keepalive)
}

/// A complete `GET` head for an SSE subscription at a push location, that `push::serve`
/// would answer with a stream: subscribes and returns the head's length.
fn fast_sse(head: &[u8], state: &State, live: &Live) -> Option<((push::FastSse, Duration), usize)> {
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
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
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
    let fast = push::subscribe_fast_sse(&state.hub, &location, &channel, query, &map)?;
    Some(((fast, location.keepalive), len))
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
        Kind::Publish => {
            let max = state.live.read().config.channels.max_message_size;
            crate::publish::handle(&state.hub, max, req).await
        }
        Kind::Admin => admin::handle(
            AdminView {
                hub: &state.hub,
                metrics: &state.metrics,
                ready: !state.draining.load(Ordering::Relaxed),
            },
            &req,
        ),
    }
}

async fn public(state: &Arc<State>, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let live = state.live.read().clone();
    match live.router.route(req.uri().path()) {
        Route::Proxy => live.proxy.forward(req, &conn).await,
        Route::BadChannel(reason) => response::text(StatusCode::BAD_REQUEST, reason),
        Route::Push { location, channel } => {
            let ctx = PushContext {
                hub: &state.hub,
                ws_tasks: &state.upgraded,
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
