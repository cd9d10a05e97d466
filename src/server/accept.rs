//! One accepted connection: counted against `max_connections` (public listeners), wrapped in
//! TLS where the listener has it, and served: h2 or HTTP/1.1 through hyper, the proxy fast
//! path, or the SSE fast path, as the first bytes say (`sniff`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;

use super::http_conn::{serve_h1, serve_h2, service};
use super::listen::Kind;
use super::prefixed::{Counted, Prefixed};
use super::route::PublicSite;
use super::sniff::{first_bytes, FirstBytes};
use super::State;
use crate::model::ConnInfo;
use crate::proxy::fast as h1;

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
                let live = state.live.load_full();
                let stop = CancellationToken::new();
                let svc = service(&state, kind, conn, &stop);
                state
                    .conns
                    .spawn(serve_h1(stream, svc, live, state.drain.clone(), stop));
            }
            Kind::Admin => {
                // Not drained and not tracked: /readyz must answer 503 during the drain.
                let live = state.live.load_full();
                let stop = CancellationToken::new();
                let svc = service(&state, kind, conn, &stop);
                tokio::spawn(serve_h1(stream, svc, live, CancellationToken::new(), stop));
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
        let live = state.live.load_full();
        let stop = CancellationToken::new();
        let svc = service(&state, Kind::PublishUnix, conn, &stop);
        state
            .conns
            .spawn(serve_h1(stream, svc, live, state.drain.clone(), stop));
    }
}

///
/// Not an `async fn`, which would keep each argument twice in the task (rust-lang/rust#62958):
/// an idle SSE subscriber's connection holds this future for its whole life.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn serve_public(
    mut stream: TcpStream,
    state: Arc<State>,
    conn: ConnInfo,
    guard: ConnectionGuard,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let live = state.live.load_full();
        let first = first_bytes(&mut stream, &state, &live, &conn).await;
        match first {
            FirstBytes::Nothing | FirstBytes::Answered => {}
            FirstBytes::Sse(fast) => {
                let super::fast_sse::FastSse {
                    feed,
                    cors,
                    keepalive,
                } = *fast;
                crate::push::sse::serve_h1(stream, feed, cors, keepalive).await
            }
            FirstBytes::H2 => {
                let stop = CancellationToken::new();
                let svc = service(&state, Kind::Public, conn, &stop);
                Box::pin(serve_h2(stream, svc, live, state.drain.clone(), stop)).await
            }
            FirstBytes::H1 => {
                // Boxed, like the other branches: an idle SSE connection's task must not carry
                // the proxy's state in its size.
                let st = state.clone();
                let site = move || PublicSite {
                    live: st.live.load_full(),
                    state: st.clone(),
                };
                let served = Box::pin(h1::serve(&mut stream, site, &conn, &state.drain)).await;
                if let h1::Served::Handoff(read) = served {
                    let stop = CancellationToken::new();
                    let svc = service(&state, Kind::Public, conn, &stop);
                    // The count goes with the socket: a WebSocket upgrade outlives hyper's
                    // connection future, and stays counted until it closes.
                    let io = Counted::new(Prefixed::new(read, stream), guard);
                    Box::pin(serve_h1(io, svc, live, state.drain.clone(), stop)).await
                }
            }
        }
    }
}

/// TLS: handshake (bounded by the header timeout), then h2 or HTTP/1.1 as ALPN chose.
async fn serve_tls(stream: TcpStream, state: Arc<State>, conn: ConnInfo, guard: ConnectionGuard) {
    let live = state.live.load_full();
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
    let stop = CancellationToken::new();
    let svc = service(&state, Kind::PublicTls, conn, &stop);
    if h2 {
        serve_h2(tls, svc, live, state.drain.clone(), stop).await;
    } else {
        // Counted with the socket, as on plain TCP: an upgrade keeps it.
        serve_h1(
            Counted::new(tls, guard),
            svc,
            live,
            state.drain.clone(),
            stop,
        )
        .await;
    }
}

/// Counts an open public connection; dropping it uncounts.
pub(super) struct ConnectionGuard(Arc<State>);

impl ConnectionGuard {
    fn acquire(state: &Arc<State>) -> Option<ConnectionGuard> {
        let max = state.live.load().config.server.max_connections;
        let prev = state.open_connections.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            state.open_connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        state.metrics.client_connections.inc();
        crate::event_loop::connection_opened();
        Some(ConnectionGuard(state.clone()))
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.client_connections.dec();
        crate::event_loop::connection_closed();
    }
}

/// Over `max_connections`: a best-effort 503 written without waiting, then close.
fn refuse(stream: TcpStream, state: &State) {
    state.metrics.connections_refused.inc();
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    let busy = crate::response::h1_text(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many connections",
        &h,
        true,
    );
    let _ = stream.try_write(&busy);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain-TCP connection's task is this future (with the SSE fast path's stream inline):
    /// its size is memory per idle SSE subscriber. 2,024 B (debug build) before.
    #[test]
    fn the_connection_task_stays_small() {
        fn ret<A, B, C, D, F>(_: impl Fn(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let n = ret(serve_public);
        assert!(n <= 1600, "serve_public's future is {n} B");
    }
}
