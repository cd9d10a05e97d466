//! hyper's HTTP/1.1 and HTTP/2 connections: the builders made from `[server]` once per
//! config, the service every request goes through, and serving a connection until it ends or
//! the drain asks it to finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::listen::Kind;
use super::{route, Live, State};
use crate::config::ServerConfig;
use crate::model::ConnInfo;
use crate::response::Body;

/// hyper's two protocol builders, made from `[server]` once per config.
pub(super) struct HttpBuilders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    pub(super) header_timeout: Duration,
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

/// The service of one connection. `stop` closes that connection (a response may ask for it:
/// an SSE stream whose reader stopped reading).
pub(super) fn service(
    state: &Arc<State>,
    kind: Kind,
    conn: ConnInfo,
    stop: &CancellationToken,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
> + Send
       + Clone
       + 'static {
    let st = state.clone();
    let stop = stop.clone();
    service_fn(move |req| {
        let st = st.clone();
        let stop = stop.clone();
        async move { Ok::<_, Infallible>(route::dispatch(&st, kind, req, conn, &stop).await) }
    })
}

/// HTTP/1.1 through hyper until the connection ends, `drain` asks it to finish, or `stop`
/// closes it. hyper's header read timeout bounds the first and every later request head.
pub(super) async fn serve_h1<I, S>(
    io: I,
    svc: S,
    live: Arc<Live>,
    drain: CancellationToken,
    stop: CancellationToken,
) where
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
        _ = stop.cancelled() => return,
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
pub(super) async fn serve_h2<I, S>(
    io: I,
    svc: S,
    live: Arc<Live>,
    drain: CancellationToken,
    stop: CancellationToken,
) where
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
            _ = stop.cancelled() => return,
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
