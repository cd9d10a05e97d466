//! Listeners (public TCP, publish TCP + Unix socket, admin), connection limits, and the
//! draining shutdown.
//!
//! Build is separate from run: [`Server::bind`] binds every socket (so a port in use is a
//! clear startup error) and reports the real addresses; [`Server::run`] serves until the
//! [`ServerHandle`] says stop, then drains.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::RwLock;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminView};
use crate::config::{Config, ServerConfig};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, Proxy};
use crate::push::{self, PushContext};
use crate::response::{self, Body};
use crate::router::{Route, Router};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("publish socket {path}: {what}: {source}")]
    Unix {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("publish socket {0}: another process is listening on it")]
    UnixInUse(PathBuf),
}

/// The parts of the server that a config reload replaces as a whole.
struct Live {
    config: Arc<Config>,
    router: Router,
    proxy: Proxy,
}

/// Shared by every connection.
struct State {
    /// Read once per request (an Arc clone); swapped on reload.
    live: RwLock<Arc<Live>>,
    hub: Hub,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// Upgraded WebSocket subscribers and tunnels: outside hyper's connections, so shutdown
    /// waits on them separately.
    upgraded: TaskTracker,
    open_connections: AtomicUsize,
}

/// The addresses the server really listens on (port 0 resolved).
#[derive(Debug, Clone)]
pub struct Addrs {
    pub public: Vec<SocketAddr>,
    pub publish: Vec<SocketAddr>,
    pub publish_unix: Option<PathBuf>,
    pub admin: Option<SocketAddr>,
}

pub struct Server {
    state: Arc<State>,
    public: Vec<TcpListener>,
    publish: Vec<TcpListener>,
    publish_unix: Option<(UnixListener, PathBuf)>,
    admin: Option<TcpListener>,
    addrs: Addrs,
    stop: CancellationToken,
}

/// Controls a running server from outside (signals, tests).
#[derive(Clone)]
pub struct ServerHandle {
    state: Arc<State>,
    stop: CancellationToken,
}

impl ServerHandle {
    /// Begins the draining shutdown; `Server::run` returns when it is done.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Applies a new config to what can change without rebinding: push locations, upstream,
    /// channel defaults. Open connections stay.
    pub fn reload(&self, config: Config) {
        let config = Arc::new(config);
        let live = Live {
            router: Router::new(&config),
            proxy: Proxy::new(
                &config.upstream,
                self.state.metrics.clone(),
                self.state.upgraded.clone(),
            ),
            config: config.clone(),
        };
        self.state.hub.set_config(config);
        *self.state.live.write() = Arc::new(live);
    }

    pub fn config(&self) -> Arc<Config> {
        self.state.live.read().config.clone()
    }

    pub fn hub(&self) -> &Hub {
        &self.state.hub
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.state.metrics
    }
}

impl Server {
    /// Binds every listener of `config`. Nothing is served until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let config = Arc::new(config);
        let upgraded = TaskTracker::new();
        let hub = Hub::new(config.clone(), metrics.clone());
        let live = Live {
            router: Router::new(&config),
            proxy: Proxy::new(&config.upstream, metrics.clone(), upgraded.clone()),
            config: config.clone(),
        };
        let public = bind_all(&config.server.listen, "server.listen")?;
        let publish = bind_all(&config.publish.listen, "publish.listen")?;
        let admin = match config.admin.listen {
            Some(a) => Some(bind_tcp(a, "admin.listen")?),
            None => None,
        };
        let publish_unix = match &config.publish.unix {
            Some(p) => Some((bind_unix(p, config.publish.unix_mode)?, p.clone())),
            None => None,
        };
        let local = |ls: &[TcpListener]| ls.iter().filter_map(|l| l.local_addr().ok()).collect();
        let addrs = Addrs {
            public: local(&public),
            publish: local(&publish),
            publish_unix: publish_unix.as_ref().map(|(_, p)| p.clone()),
            admin: admin.as_ref().and_then(|l| l.local_addr().ok()),
        };
        Ok(Server {
            state: Arc::new(State {
                live: RwLock::new(Arc::new(live)),
                hub,
                metrics,
                draining: AtomicBool::new(false),
                upgraded,
                open_connections: AtomicUsize::new(0),
            }),
            public,
            publish,
            publish_unix,
            admin,
            addrs,
            stop: CancellationToken::new(),
        })
    }

    pub fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            state: self.state.clone(),
            stop: self.stop.clone(),
        }
    }

    /// Serves until the handle's `shutdown`, then drains: stop accepting, tell subscribers to
    /// go, let in-flight requests finish up to `server.shutdown_timeout`.
    pub async fn run(self) {
        let Server {
            state,
            public,
            publish,
            publish_unix,
            admin,
            stop,
            ..
        } = self;
        let cfg = state.live.read().config.clone();
        let builder = Arc::new(http_builder(&cfg.server));
        // `drain` tells live connections to finish; `conns` lets us wait until they have.
        let drain = CancellationToken::new();
        let conns = TaskTracker::new();
        let accept = TaskTracker::new();
        let spawn_tcp = |l: TcpListener, kind: Kind| {
            accept.spawn(accept_tcp(
                l,
                kind,
                state.clone(),
                builder.clone(),
                stop.clone(),
                drain.clone(),
                conns.clone(),
            ));
        };
        for l in public {
            spawn_tcp(l, Kind::Public);
        }
        for l in publish {
            spawn_tcp(l, Kind::Publish);
        }
        if let Some(l) = admin {
            spawn_tcp(l, Kind::Admin);
        }
        let unix_path = publish_unix.map(|(l, path)| {
            accept.spawn(accept_unix(
                l,
                state.clone(),
                builder.clone(),
                stop.clone(),
                drain.clone(),
                conns.clone(),
            ));
            path
        });
        let sweeper = tokio::spawn(state.hub.clone().run_sweeper(Duration::from_secs(1)));
        tracing::info!("crier is ready");

        stop.cancelled().await;
        tracing::info!("shutting down: draining connections");
        state.draining.store(true, Ordering::SeqCst);
        accept.close();
        accept.wait().await; // listeners closed: no new connections
        state.hub.close_all(); // subscribers: SSE ends, WebSocket 1001, long-poll 503
        drain.cancel(); // keep-alive connections close after their in-flight request
        conns.close();
        state.upgraded.close();
        let deadline = cfg.server.shutdown_timeout;
        let all = async {
            conns.wait().await;
            state.upgraded.wait().await;
        };
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(
                "shutdown_timeout ({:?}) passed with connections still open; closing them",
                deadline
            );
        }
        sweeper.abort();
        if let Some(path) = unix_path {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("stopped");
    }
}

fn http_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .max_headers(cfg.max_headers)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(cfg.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

fn bind_all(addrs: &[SocketAddr], key: &'static str) -> Result<Vec<TcpListener>, StartError> {
    addrs.iter().map(|a| bind_tcp(*a, key)).collect()
}

fn bind_tcp(addr: SocketAddr, key: &'static str) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { key, addr, source };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    sock.listen(4096).map_err(err)
}

/// Removes a stale socket file, binds, then sets the mode; each step its own error.
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, StartError> {
    let err = |what, source| StartError::Unix {
        path: path.to_path_buf(),
        what,
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| err("cannot create its directory", e))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::UnixInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| err("cannot remove the stale socket file", e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| err("cannot bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err("cannot set its file mode", e))?;
    Ok(l)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Public,
    Publish,
    Admin,
}

async fn accept_tcp(
    listener: TcpListener,
    kind: Kind,
    state: Arc<State>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stop: CancellationToken,
    drain: CancellationToken,
    conns: TaskTracker,
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
        let guard = if kind == Kind::Public {
            match ConnectionGuard::acquire(&state) {
                Some(g) => Some(g),
                None => {
                    refuse(stream, &state);
                    continue;
                }
            }
        } else {
            None
        };
        let conn = ConnInfo { peer, tls: false };
        let st = state.clone();
        let svc = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(dispatch(&st, kind, req, conn).await) }
        });
        conns.spawn(serve(stream, svc, builder.clone(), drain.clone(), guard));
    }
}

async fn accept_unix(
    listener: UnixListener,
    state: Arc<State>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stop: CancellationToken,
    drain: CancellationToken,
    conns: TaskTracker,
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
        let st = state.clone();
        let svc = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(dispatch(&st, Kind::Publish, req, conn).await) }
        });
        conns.spawn(serve(stream, svc, builder.clone(), drain.clone(), None));
    }
}

async fn serve<I, S>(
    io: I,
    svc: S,
    builder: Arc<auto::Builder<TokioExecutor>>,
    drain: CancellationToken,
    _guard: Option<ConnectionGuard>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
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

async fn dispatch(
    state: &Arc<State>,
    kind: Kind,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<Body> {
    match kind {
        Kind::Public => public(state, req, conn).await,
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
struct ConnectionGuard(Arc<State>);

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
fn refuse(stream: tokio::net::TcpStream, state: &State) {
    state.metrics.connections_refused.inc();
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 21\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many connections\n";
    let _ = stream.try_write(BUSY);
}

/// Runs a server until `shutdown` resolves (tests and embedders).
pub async fn run_until(server: Server, shutdown: impl Future<Output = ()>) {
    let h = server.handle();
    let run = tokio::spawn(server.run());
    shutdown.await;
    h.shutdown();
    let _ = run.await;
}
