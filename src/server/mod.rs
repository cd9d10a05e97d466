//! The server: listeners, connections, routing, reload and the draining shutdown. A request
//! takes this path through the files here:
//!
//! - `listen.rs`: which listeners a config asks for; binding them; their accept loops.
//! - `accept.rs`: one accepted connection: counted (`max_connections`), TLS, then served.
//! - `sniff.rs`: the first bytes of a plain-TCP connection pick h2, HTTP/1.1 through the proxy
//!   fast path or hyper, or the SSE fast path (`fast_sse.rs`).
//! - `http_conn.rs`: hyper's HTTP/1.1 and HTTP/2 connections, bounded and drained.
//! - `route.rs`: which part of crier answers a request (ingress, Web Push API, push location,
//!   proxy; the publish API and admin on their own listeners).
//!
//! Build is separate from run: [`Server::bind`] binds every socket (so a port in use is a
//! clear startup error) and reports the real addresses; [`Server::run`] serves until the
//! [`ServerHandle`] says stop, then drains.

mod accept;
mod fast_sse;
mod http_conn;
mod listen;
mod prefixed;
mod route;
mod sniff;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Gatekeeper;
use crate::config::{Config, ConfigError};
use crate::event_loop::EventLoops;
use crate::hub::Hub;
use crate::keys::{Keys, PublishToken};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::push::locations::Locations;
use crate::push::webrtc::WebRtc;
use crate::webpush::WebPush;
use http_conn::HttpBuilders;
use listen::{
    addrs_of, bind_keys, listen_keys, listener_stop, set_socket_access, spawn_accept,
    start_listener, ListenKey, Listening,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A key file the config names cannot be read or is not a valid key.
    #[error("{0}")]
    Keys(#[from] ConfigError),
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
    #[error("cannot start the event loops (server.event_loops): {0}")]
    EventLoops(io::Error),
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
    #[error("{0}")]
    Store(#[from] crate::hub::store::FileError),
    #[error("{0}")]
    Cluster(#[from] crate::hub::store::ClusterError),
}

/// The parts of the server that a config reload replaces as a whole. Connections accepted
/// after a reload use the new parts; open ones keep what they started with.
struct Live {
    config: Arc<Config>,
    /// The push locations: path → location and channel; channel → owner.
    locations: Arc<Locations>,
    proxy: Proxy,
    /// Subscriber checks (forward auth, JWT) of this config; its caches go with it on reload.
    gatekeeper: Arc<Gatekeeper>,
    /// The upstream client of forwarded WebSocket client messages (`client_messages`).
    relay: Arc<crate::push::relay::Relay>,
    http: Arc<HttpBuilders>,
    tls: Option<TlsAcceptor>,
    /// `[[ingress]]` paths, answered before the push locations.
    ingress: crate::webhook::Ingress,
    /// `[publish] token_file`: what TCP publishes must present.
    publish_token: Option<PublishToken>,
    /// `[[publish_on]]`: proxied writes that publish.
    publish_on: crate::publish::publish_on::PublishOn,
}

impl Live {
    /// `loops`: the event loops running (a reload does not change them).
    fn new(
        config: Arc<Config>,
        keys: &Keys,
        state_metrics: &Arc<Metrics>,
        upgraded: &TaskTracker,
        loops: usize,
    ) -> Result<Live, StartError> {
        let tls = match &config.server.tls {
            Some(t) => Some(TlsAcceptor::from(crate::tls::load(t)?)),
            None => None,
        };
        Ok(Live {
            locations: Arc::new(Locations::new(&config)),
            proxy: Proxy::new(
                &config.upstream,
                loops,
                state_metrics.clone(),
                upgraded.clone(),
            ),
            gatekeeper: Arc::new(Gatekeeper::new(&config, keys, state_metrics.clone())),
            relay: Arc::new(crate::push::relay::Relay::new(&config.upstream)),
            http: Arc::new(HttpBuilders::new(&config.server)),
            tls,
            ingress: crate::webhook::Ingress::new(&config.ingress, keys),
            publish_token: keys.publish_token.clone(),
            publish_on: crate::publish::publish_on::PublishOn::new(
                &config.publish_on,
                state_metrics,
            ),
            config,
        })
    }
}

/// Shared by every connection.
struct State {
    /// Read once per request (a lock-free load); swapped as a whole on reload.
    live: ArcSwap<Live>,
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
    /// `[[poll]]`: started by `run`, changed on reload, stopped when the drain begins.
    polls: crate::publish::poll::Polls,
    /// `server.event_loops` (none when 0): they serve the public listeners' connections.
    loops: EventLoops,
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
    /// defaults, key files and TLS certificates re-read. Connections the new config still
    /// serves stay open. On any error nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let keys = Keys::load(&config).map_err(StartError::from)?;
        self.reload_with_keys(config, keys)
    }

    /// [`ServerHandle::reload`] with the keys already read (`crier` reads both to report
    /// every problem at once).
    pub fn reload_with_keys(&self, config: Config, keys: Keys) -> Result<(), ReloadError> {
        let st = &self.state;
        if st.stop.is_cancelled() {
            return Err(ReloadError::ShuttingDown);
        }
        let config = Arc::new(config);
        let mut live = Live::new(
            config.clone(),
            &keys,
            &st.metrics,
            &st.upgraded,
            st.loops.handles().len(),
        )?;
        let old = st.live.load();
        live.ingress.keep_seen(&old.ingress);
        let webhooks = st
            .webhooks
            .prepare(&config, &keys)
            .map_err(StartError::from)?;
        if config.webrtc != old.config.webrtc {
            tracing::warn!("[webrtc] changed: it takes effect at the next start (the UDP socket and its sessions stay as they are)");
        }
        let wanted = listen_keys(&config);
        let mut listeners = st.listeners.lock();
        let open: Vec<ListenKey> = listeners.iter().map(|l| l.key.clone()).collect();
        let fresh = bind_keys(
            wanted.iter().filter(|k| !open.contains(k)),
            &config.publish,
            st.loops.handles().len(),
        )?;
        // A socket that stays open takes the new mode and group.
        for key in wanted.iter().filter(|k| open.contains(k)) {
            if let ListenKey::Unix(p) = key {
                if let Err(e) = set_socket_access(p, &config.publish) {
                    tracing::warn!("{e}");
                }
            }
        }
        if config.channels.store != old.config.channels.store {
            tracing::warn!("channels.store changed: it takes effect when crier restarts (the buffers stay where they are until then)");
        }
        if config.cluster != old.config.cluster {
            tracing::warn!("[cluster] changed: it takes effect when crier restarts");
        }
        if config.server.event_loops != st.loops.handles().len() {
            tracing::warn!(
                "server.event_loops changed: it takes effect when crier restarts ({} running)",
                st.loops.handles().len()
            );
        }
        match &st.webpush {
            Some(wp) => wp.reload(config.webpush.as_ref(), keys.vapid.as_ref()),
            None if config.webpush.is_some() => {
                tracing::warn!("[webpush] was added; it takes effect when crier restarts")
            }
            None => {}
        }
        st.hub.set_config(config.clone());
        st.live.store(Arc::new(live));
        crate::access_log::configure(config.server.access_log);
        st.polls.apply(&config);
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
        self.state.live.load().config.clone()
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

impl Server {
    /// Reads the key files `config` names, binds every listener and loads the TLS
    /// certificate. Nothing is served until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let keys = Keys::load(&config)?;
        Server::bind_with_keys(config, keys).await
    }

    /// [`Server::bind`] with the keys already read.
    pub async fn bind_with_keys(config: Config, keys: Keys) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let config = Arc::new(config);
        let upgraded = TaskTracker::new();
        // Config validation refuses a store and a cluster together.
        let mut shared_table = None;
        let hub = match (&config.channels.store, &config.cluster) {
            (None, Some(cluster)) => {
                let redis = crate::hub::store::Redis::new(
                    cluster,
                    keys.cluster_password.as_ref(),
                    metrics.clone(),
                )?;
                redis.check().await?;
                let redis = Arc::new(redis);
                shared_table = Some(redis.table("webpush"));
                let hub = Hub::with_engine(config.clone(), metrics.clone(), redis.clone());
                redis.start(&hub);
                tracing::info!(
                    "[cluster]: channels shared through {} Redis shard(s)",
                    cluster.redis.len()
                );
                hub
            }
            (None, None) => Hub::new(config.clone(), metrics.clone()),
            (Some(path), _) => {
                let (file, restored) = crate::hub::store::File::open(path, &config)?;
                let hub = Hub::with_engine(config.clone(), metrics.clone(), Arc::new(file));
                let (channels, messages) = restored.into_hub(&hub);
                tracing::info!(
                    "channels.store {}: {messages} messages in {channels} channels read back",
                    path.display()
                );
                hub
            }
        };
        let loops = EventLoops::start(config.server.event_loops, &metrics.event_loop_connections)
            .await
            .map_err(StartError::EventLoops)?;
        hub.start_loop_relays(loops.handles());
        let live = Live::new(
            config.clone(),
            &keys,
            &metrics,
            &upgraded,
            loops.handles().len(),
        )?;
        crate::access_log::configure(config.server.access_log);
        let webhooks = crate::webhook::Webhooks::new(hub.clone(), metrics.clone());
        let endpoints = webhooks.prepare(&config, &keys)?;
        let bound = bind_keys(
            listen_keys(&config).iter(),
            &config.publish,
            loops.handles().len(),
        )?;
        let webpush = match (&config.webpush, &keys.vapid) {
            (Some(w), Some(vapid)) => {
                Some(WebPush::start(w, vapid, &hub, &metrics.registry, shared_table.clone()).await?)
            }
            _ => None,
        };
        // Delivery tasks start only once nothing else can fail.
        webhooks.install(endpoints);
        let stop = CancellationToken::new();
        let finished = CancellationToken::new();
        let listening: Vec<Listening> = bound
            .into_iter()
            .map(|(key, b)| Listening {
                stop: listener_stop(&key, &stop, &finished),
                local: b.local_addr(),
                key,
                idle: Some(b),
            })
            .collect();
        let webrtc = match &config.webrtc {
            Some(w) => Some(WebRtc::bind(w, metrics.clone())?),
            None => None,
        };
        let mut addrs = addrs_of(&listening);
        addrs.webrtc = webrtc.as_ref().and_then(WebRtc::local_addr);
        Ok(Server {
            state: Arc::new(State {
                live: ArcSwap::from_pointee(live),
                polls: crate::publish::poll::Polls::new(hub.clone(), metrics.clone()),
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
                loops,
            }),
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
        let Server { state, .. } = self;
        {
            // Each listener still waiting, with its own socket: a reload that came first has
            // already closed some and started others.
            let mut listeners = state.listeners.lock();
            for l in listeners.iter_mut() {
                if let Some(bound) = l.idle.take() {
                    spawn_accept(&state, l, bound);
                }
            }
        }
        let sweeper = tokio::spawn(state.hub.clone().run_sweeper(Duration::from_secs(1)));
        let prober = tokio::spawn({
            let state = state.clone();
            async move {
                let config = || state.live.load().config.clone();
                crate::proxy::probe::run(config, state.hub.metrics()).await
            }
        });
        state.polls.apply(&state.live.load().config);
        if let Some(w) = &state.webrtc {
            tokio::spawn(w.clone().serve());
        }
        tracing::info!("crier is ready");

        state.stop.cancelled().await;
        tracing::info!("shutting down: draining connections");
        state.draining.store(true, Ordering::SeqCst);
        state.hub.metrics().draining.set(1);
        state.polls.stop();
        state.accept.close();
        state.accept.wait().await; // listeners closed: no new connections
        state.hub.close_all(); // subscribers: SSE ends, WebSocket 1001, long-poll 503
        state.drain.cancel(); // keep-alive connections close after their in-flight request
        state.conns.close();
        state.upgraded.close();
        let deadline = state.live.load().config.server.shutdown_timeout;
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
        prober.abort();
        // The message store's last commit (publishes already acknowledged are on disk; this
        // releases the file for the next start).
        if tokio::time::timeout(deadline, state.hub.engine_closed())
            .await
            .is_err()
        {
            tracing::warn!("channels.store: the writer did not finish within shutdown_timeout");
        }
        if let Some(wp) = &state.webpush {
            wp.close(); // stops deliveries and releases the store file
        }
        state.finished.cancel();
        for l in state.listeners.lock().drain(..) {
            if let ListenKey::Unix(p) = l.key {
                let _ = std::fs::remove_file(p);
            }
        }
        // Whatever still runs on the event loops (connections past shutdown_timeout) is
        // dropped with them, as the runtime's would be at exit.
        state.loops.stop();
        // The access log's last lines (the subscribers just closed) reach stdout before exit.
        let _ =
            tokio::task::spawn_blocking(|| crate::access_log::flush(Duration::from_secs(2))).await;
        tracing::info!("stopped");
    }
}
