//! Listeners (public TCP, publish TCP + Unix socket, admin), connection limits, and the
//! draining shutdown.
//!
//! Build is separate from run: [`Server::bind`] binds every socket (so a port in use is a
//! clear startup error) and reports the real addresses; [`Server::run`] serves until the
//! [`ServerHandle`] says stop, then drains.

mod conn;
mod prefixed;

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Gatekeeper;
use crate::config::{Config, PublishConfig};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::push::webrtc::WebRtc;
use crate::router::Router;
use crate::webpush::WebPush;
use conn::HttpBuilders;

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
    #[error("publish socket {path}: cannot give it the group {group:?} (publish.unix_group; crier must run as root or be a member of it): {source}")]
    UnixGroup {
        path: PathBuf,
        group: String,
        source: io::Error,
    },
    #[error("publish socket {0}: another process is listening on it")]
    UnixInUse(PathBuf),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Webhook(#[from] crate::webhook::WebhookError),
    #[error("{0}")]
    WebPush(#[from] crate::webpush::WebPushError),
    #[error("{0}")]
    WebRtc(#[from] crate::push::webrtc::WebRtcError),
}

/// The parts of the server that a config reload replaces as a whole. Connections accepted
/// after a reload use the new parts; open ones keep what they started with.
struct Live {
    config: Arc<Config>,
    router: Router,
    proxy: Proxy,
    /// Subscriber checks (forward auth, JWT) of this config; its caches go with it on reload.
    gatekeeper: Gatekeeper,
    http: Arc<HttpBuilders>,
    tls: Option<TlsAcceptor>,
    /// `[[ingress]]` paths, answered before the router.
    ingress: crate::webhook::Ingress,
}

impl Live {
    fn new(
        config: Arc<Config>,
        state_metrics: &Arc<Metrics>,
        upgraded: &TaskTracker,
    ) -> Result<Live, StartError> {
        let tls = match &config.server.tls {
            Some(t) => Some(TlsAcceptor::from(crate::tls::load(t)?)),
            None => None,
        };
        Ok(Live {
            router: Router::new(&config),
            proxy: Proxy::new(&config.upstream, state_metrics.clone(), upgraded.clone()),
            gatekeeper: Gatekeeper::new(&config, state_metrics.clone()),
            http: Arc::new(HttpBuilders::new(&config.server)),
            tls,
            ingress: crate::webhook::Ingress::new(&config.ingress),
            config,
        })
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Public,
    PublicTls,
    /// The publish API on TCP: a bearer token when `publish.token_file` is set.
    Publish,
    /// The publish API on the Unix socket: its file mode and group guard it.
    PublishUnix,
    Admin,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Public => "server.listen",
            Kind::PublicTls => "server.tls.listen",
            Kind::Publish => "publish.listen",
            Kind::PublishUnix => "publish.unix",
            Kind::Admin => "admin.listen",
        }
    }
}

/// A listener as configured: reload compares these to decide what to open and close.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ListenKey {
    Tcp(Kind, SocketAddr),
    Unix(PathBuf),
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An open listener: its accept loop stops when `stop` is cancelled.
struct Listening {
    key: ListenKey,
    local: Option<SocketAddr>,
    stop: CancellationToken,
}

/// Shared by every connection.
struct State {
    /// Read once per request (an Arc clone); swapped on reload.
    live: RwLock<Arc<Live>>,
    hub: Hub,
    metrics: Arc<Metrics>,
    /// Outbound webhooks: replaced on reload, drained on shutdown.
    webhooks: crate::webhook::Webhooks,
    draining: AtomicBool,
    /// Upgraded WebSocket subscribers and tunnels: outside hyper's connections, so shutdown
    /// waits on them separately.
    upgraded: TaskTracker,
    open_connections: AtomicUsize,
    /// Cancelled on shutdown: the public and publish accept loops stop.
    stop: CancellationToken,
    /// Cancelled when the drain is over: the admin listener (which answers `/readyz` 503
    /// during the drain) stops too.
    finished: CancellationToken,
    /// Cancelled after the listeners closed: connections finish their request and close.
    drain: CancellationToken,
    conns: TaskTracker,
    accept: TaskTracker,
    /// parking_lot: touched only at start, reload and shutdown, never across `.await`.
    listeners: Mutex<Vec<Listening>>,
    /// `[webpush]`, when on: made at start (its store file stays open until shutdown).
    webpush: Option<WebPush>,
    /// `[webrtc]` of the config crier started with (its socket is not reopened on reload).
    webrtc: Option<WebRtc>,
}

/// The addresses the server really listens on (port 0 resolved).
#[derive(Debug, Clone, Default)]
pub struct Addrs {
    pub public: Vec<SocketAddr>,
    pub public_tls: Vec<SocketAddr>,
    pub publish: Vec<SocketAddr>,
    pub publish_unix: Option<PathBuf>,
    pub admin: Option<SocketAddr>,
    /// The `[webrtc]` UDP socket.
    pub webrtc: Option<SocketAddr>,
}

pub struct Server {
    state: Arc<State>,
    /// Bound but not yet accepting, in the order of `State::listeners`: `run` starts them.
    pending: Vec<Bound>,
    addrs: Addrs,
}

/// Controls a running server from outside (signals, tests).
#[derive(Clone)]
pub struct ServerHandle {
    state: Arc<State>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("server is shutting down")]
    ShuttingDown,
}

impl ServerHandle {
    /// Begins the draining shutdown; `Server::run` returns when it is done.
    pub fn shutdown(&self) {
        self.state.stop.cancel();
    }

    /// Applies a new config: listeners opened and closed, push locations, upstream, channel
    /// defaults, TLS certificates re-read. Connections the new config still serves stay open.
    /// On any error nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let st = &self.state;
        if st.stop.is_cancelled() {
            return Err(ReloadError::ShuttingDown);
        }
        let config = Arc::new(config);
        let mut live = Live::new(config.clone(), &st.metrics, &st.upgraded)?;
        live.ingress.keep_seen(&st.live.read().ingress);
        let webhooks = st.webhooks.prepare(&config).map_err(StartError::from)?;
        if config.webrtc != st.live.read().config.webrtc {
            tracing::warn!("[webrtc] changed: it takes effect at the next start (the UDP socket and its sessions stay as they are)");
        }
        let wanted = listen_keys(&config);
        let mut listeners = st.listeners.lock();
        let open: Vec<ListenKey> = listeners.iter().map(|l| l.key.clone()).collect();
        let fresh = bind_keys(wanted.iter().filter(|k| !open.contains(k)), &config.publish)?;
        // A socket that stays open takes the new mode and group.
        for key in wanted.iter().filter(|k| open.contains(k)) {
            if let ListenKey::Unix(p) = key {
                if let Err(e) = set_socket_access(p, &config.publish) {
                    tracing::warn!("{e}");
                }
            }
        }
        match &st.webpush {
            Some(wp) => wp.reload(config.webpush.as_ref()),
            None if config.webpush.is_some() => {
                tracing::warn!("[webpush] was added; it takes effect when crier restarts")
            }
            None => {}
        }
        st.hub.set_config(config);
        *st.live.write() = Arc::new(live);
        st.webhooks.install(webhooks);
        listeners.retain(|l| {
            if wanted.contains(&l.key) {
                return true;
            }
            l.stop.cancel();
            if let ListenKey::Unix(p) = &l.key {
                let _ = std::fs::remove_file(p);
            }
            tracing::info!("closed listener {:?}", l.key);
            false
        });
        for (key, bound) in fresh {
            tracing::info!("opened listener {key:?}");
            listeners.push(start_listener(st, key, bound));
        }
        Ok(())
    }

    /// The addresses currently listened on.
    pub fn addrs(&self) -> Addrs {
        let mut a = addrs_of(&self.state.listeners.lock());
        a.webrtc = self.state.webrtc.as_ref().and_then(WebRtc::local_addr);
        a
    }

    /// True from the start of the draining shutdown.
    pub fn is_draining(&self) -> bool {
        self.state.draining.load(Ordering::Relaxed)
    }

    /// True once the drain is over and the admin listener closes too.
    pub fn is_stopped(&self) -> bool {
        self.state.finished.is_cancelled()
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

    pub fn webhooks(&self) -> &crate::webhook::Webhooks {
        &self.state.webhooks
    }

    pub fn webpush(&self) -> Option<&WebPush> {
        self.state.webpush.as_ref()
    }
}

fn listen_keys(c: &Config) -> Vec<ListenKey> {
    let mut keys: Vec<ListenKey> = c
        .server
        .listen
        .iter()
        .map(|a| ListenKey::Tcp(Kind::Public, *a))
        .collect();
    if let Some(t) = &c.server.tls {
        keys.extend(t.listen.iter().map(|a| ListenKey::Tcp(Kind::PublicTls, *a)));
    }
    keys.extend(
        c.publish
            .listen
            .iter()
            .map(|a| ListenKey::Tcp(Kind::Publish, *a)),
    );
    if let Some(p) = &c.publish.unix {
        keys.push(ListenKey::Unix(p.clone()));
    }
    if let Some(a) = c.admin.listen {
        keys.push(ListenKey::Tcp(Kind::Admin, a));
    }
    keys
}

/// Binds every key; on the first error the ones already bound are dropped (closed).
fn bind_keys<'a>(
    keys: impl Iterator<Item = &'a ListenKey>,
    publish: &PublishConfig,
) -> Result<Vec<(ListenKey, Bound)>, StartError> {
    keys.map(|k| {
        let b = match k {
            ListenKey::Tcp(kind, addr) => Bound::Tcp(bind_tcp(*addr, kind.key())?),
            ListenKey::Unix(p) => Bound::Unix(bind_unix(p, publish)?),
        };
        Ok((k.clone(), b))
    })
    .collect()
}

fn addrs_of(listeners: &[Listening]) -> Addrs {
    let mut a = Addrs::default();
    for l in listeners {
        match (&l.key, l.local) {
            (ListenKey::Tcp(Kind::Public, _), Some(s)) => a.public.push(s),
            (ListenKey::Tcp(Kind::PublicTls, _), Some(s)) => a.public_tls.push(s),
            (ListenKey::Tcp(Kind::Publish, _), Some(s)) => a.publish.push(s),
            (ListenKey::Tcp(Kind::Admin, _), Some(s)) => a.admin = Some(s),
            (ListenKey::Unix(p), _) => a.publish_unix = Some(p.clone()),
            _ => {}
        }
    }
    a
}

/// The admin listener outlives the drain; every other one stops when it begins.
fn listener_stop(
    key: &ListenKey,
    stop: &CancellationToken,
    finished: &CancellationToken,
) -> CancellationToken {
    match key {
        ListenKey::Tcp(Kind::Admin, _) => finished.child_token(),
        _ => stop.child_token(),
    }
}

/// Registers a bound listener and starts its accept loop.
fn start_listener(st: &Arc<State>, key: ListenKey, bound: Bound) -> Listening {
    let l = Listening {
        local: match &bound {
            Bound::Tcp(l) => l.local_addr().ok(),
            Bound::Unix(_) => None,
        },
        stop: listener_stop(&key, &st.stop, &st.finished),
        key,
    };
    spawn_accept(st, &l, bound);
    l
}

fn spawn_accept(st: &Arc<State>, l: &Listening, bound: Bound) {
    match (bound, &l.key) {
        (Bound::Tcp(t), ListenKey::Tcp(Kind::Admin, _)) => {
            // Not on the accept tracker: the admin listener stays up through the drain.
            tokio::spawn(conn::accept_tcp(t, Kind::Admin, st.clone(), l.stop.clone()));
        }
        (Bound::Tcp(t), ListenKey::Tcp(kind, _)) => {
            st.accept
                .spawn(conn::accept_tcp(t, *kind, st.clone(), l.stop.clone()));
        }
        (Bound::Unix(u), _) => {
            st.accept
                .spawn(conn::accept_unix(u, st.clone(), l.stop.clone()));
        }
        (Bound::Tcp(_), ListenKey::Unix(_)) => {}
    }
}

impl Server {
    /// Binds every listener of `config` and loads its TLS certificate. Nothing is served
    /// until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let config = Arc::new(config);
        let upgraded = TaskTracker::new();
        let hub = Hub::new(config.clone(), metrics.clone());
        let live = Live::new(config.clone(), &metrics, &upgraded)?;
        let webhooks = crate::webhook::Webhooks::new(hub.clone(), metrics.clone());
        let endpoints = webhooks.prepare(&config)?;
        let bound = bind_keys(listen_keys(&config).iter(), &config.publish)?;
        let webpush = match &config.webpush {
            Some(w) => Some(WebPush::start(w, &hub, &metrics.registry)?),
            None => None,
        };
        // Delivery tasks start only once nothing else can fail.
        webhooks.install(endpoints);
        let stop = CancellationToken::new();
        let finished = CancellationToken::new();
        let mut listening = Vec::new();
        let mut pending = Vec::new();
        for (key, b) in bound {
            let local = match &b {
                Bound::Tcp(l) => l.local_addr().ok(),
                Bound::Unix(_) => None,
            };
            listening.push(Listening {
                stop: listener_stop(&key, &stop, &finished),
                key,
                local,
            });
            pending.push(b);
        }
        let webrtc = match &config.webrtc {
            Some(w) => Some(WebRtc::bind(w, metrics.clone())?),
            None => None,
        };
        let mut addrs = addrs_of(&listening);
        addrs.webrtc = webrtc.as_ref().and_then(WebRtc::local_addr);
        Ok(Server {
            state: Arc::new(State {
                live: RwLock::new(Arc::new(live)),
                hub,
                metrics,
                webhooks,
                draining: AtomicBool::new(false),
                upgraded,
                open_connections: AtomicUsize::new(0),
                stop,
                finished,
                drain: CancellationToken::new(),
                conns: TaskTracker::new(),
                accept: TaskTracker::new(),
                listeners: Mutex::new(listening),
                webpush,
                webrtc,
            }),
            pending,
            addrs,
        })
    }

    pub fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            state: self.state.clone(),
        }
    }

    /// Serves until the handle's `shutdown`, then drains: stop accepting, tell subscribers to
    /// go, let in-flight requests finish up to `server.shutdown_timeout`.
    pub async fn run(self) {
        let Server { state, pending, .. } = self;
        {
            let listeners = state.listeners.lock();
            for (l, bound) in listeners.iter().zip(pending) {
                spawn_accept(&state, l, bound);
            }
        }
        let sweeper = tokio::spawn(state.hub.clone().run_sweeper(Duration::from_secs(1)));
        if let Some(w) = &state.webrtc {
            tokio::spawn(w.clone().serve());
        }
        tracing::info!("crier is ready");

        state.stop.cancelled().await;
        tracing::info!("shutting down: draining connections");
        state.draining.store(true, Ordering::SeqCst);
        state.accept.close();
        state.accept.wait().await; // listeners closed: no new connections
        state.hub.close_all(); // subscribers: SSE ends, WebSocket 1001, long-poll 503
        state.drain.cancel(); // keep-alive connections close after their in-flight request
        state.conns.close();
        state.upgraded.close();
        let deadline = state.live.read().config.server.shutdown_timeout;
        let all = async {
            if let Some(w) = &state.webrtc {
                w.shutdown(deadline).await; // sessions: SCTP shutdown, DTLS close_notify
            }
            state.conns.wait().await;
            state.upgraded.wait().await;
        };
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(
                "shutdown_timeout ({:?}) passed with connections still open; closing them",
                deadline
            );
        }
        // Subscribers are gone, so their unsubscribe events are queued: deliveries get the
        // same deadline again to go out.
        state.webhooks.drain(deadline).await;
        sweeper.abort();
        if let Some(wp) = &state.webpush {
            wp.close(); // stops deliveries and releases the store file
        }
        state.finished.cancel();
        for l in state.listeners.lock().drain(..) {
            if let ListenKey::Unix(p) = l.key {
                let _ = std::fs::remove_file(p);
            }
        }
        tracing::info!("stopped");
    }
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

/// Removes a stale socket file, binds, then sets the mode and group; each step its own error.
fn bind_unix(path: &Path, publish: &PublishConfig) -> Result<UnixListener, StartError> {
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
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(err(
                "exists and is not a socket; refusing to remove it",
                io::ErrorKind::AlreadyExists.into(),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::UnixInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| err("cannot remove the stale socket file", e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| err("cannot bind", e))?;
    set_socket_access(path, publish)?;
    Ok(l)
}

/// `chmod unix_mode` and, with `unix_group`, `chown :group` on the socket file.
fn set_socket_access(path: &Path, publish: &PublishConfig) -> Result<(), StartError> {
    let err = |what, source| StartError::Unix {
        path: path.to_path_buf(),
        what,
        source,
    };
    if let Some(g) = &publish.unix_group {
        std::os::unix::fs::chown(path, None, Some(g.gid)).map_err(|e| StartError::UnixGroup {
            path: path.to_path_buf(),
            group: g.name.clone(),
            source: e,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(publish.unix_mode))
        .map_err(|e| err("cannot set its file mode", e))
}
