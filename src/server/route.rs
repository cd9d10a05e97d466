//! Which part of crier answers a request. On a public listener, in order: an `[[ingress]]`
//! path, the Web Push API, a push location, else the upstream app (the proxy). The publish
//! API and the admin endpoints have listeners of their own.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use super::listen::Kind;
use super::{Live, ServerHandle, State};
use crate::admin::{self, ServerView};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::ConnInfo;
use crate::proxy::{fast as h1, Proxy};
use crate::push::locations::Route;
use crate::push::{self, Admission, PushContext};
use crate::response::{self, Body};

pub(super) async fn dispatch(
    state: &Arc<State>,
    kind: Kind,
    req: Request<Incoming>,
    conn: ConnInfo,
    stop: &CancellationToken,
) -> Response<Body> {
    match kind {
        Kind::Public | Kind::PublicTls => public(state, req, conn, stop).await,
        Kind::Publish | Kind::PublishUnix => {
            let live = state.live.load();
            // TCP may need the token; the Unix socket is guarded by its file permissions.
            let token = match kind {
                Kind::Publish => live.publish_token.as_ref(),
                _ => None,
            };
            let max = live.config.channels.max_message_size;
            crate::publish::handle(&state.hub, max, token, req, state.webpush.as_ref()).await
        }
        Kind::Admin => admin::handle(Arc::new(View(state.clone())), &req),
    }
}

/// Who answers a public request path. The one decision `public` and the proxy fast path both
/// follow.
enum PublicRoute<'a> {
    Ingress(&'a crate::webhook::ingress::IngressPoint),
    /// The Web Push API, with the part of the path after its base.
    WebPush(&'a crate::webpush::WebPush, String),
    /// A push location, or (`Route::Proxy`) the upstream.
    Push(Route),
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
    PublicRoute::Push(live.locations.route(path))
}

async fn public(
    state: &Arc<State>,
    req: Request<Incoming>,
    conn: ConnInfo,
    stop: &CancellationToken,
) -> Response<Body> {
    let live = state.live.load_full();
    let admission = Admission {
        locations: live.locations.clone(),
        gatekeeper: live.gatekeeper.clone(),
        conn,
    };
    match route_public(state, &live, req.uri().path()) {
        PublicRoute::Ingress(ingress) => {
            crate::webhook::ingress::serve(&state.hub, ingress, req, conn.peer).await
        }
        PublicRoute::WebPush(wp, rest) => {
            Box::pin(crate::webpush::api::handle(wp, &admission, req, &rest)).await
        }
        PublicRoute::Push(Route::Proxy) => {
            let logged = crate::access_log::Request::of(&req, conn.peer);
            let resp = match live.publish_on.find(req.method(), req.uri().path()) {
                None => live.proxy.forward(req, &conn).await,
                Some(m) => {
                    let max = live.config.channels.max_message_size;
                    crate::publish::publish_on::forward(&state.hub, &live.proxy, m, req, &conn, max)
                        .await
                }
            };
            match logged {
                None => resp,
                Some(l) => l.watch(resp),
            }
        }
        PublicRoute::Push(Route::BadChannel(reason)) => {
            response::text(StatusCode::BAD_REQUEST, &reason)
        }
        PublicRoute::Push(Route::Push { location, channels }) => {
            let ctx = PushContext {
                hub: &state.hub,
                ws_tasks: &state.upgraded,
                conn_stop: stop,
                admission,
                webrtc: state.webrtc.as_ref(),
                relay: &live.relay,
            };
            push::serve(ctx, req, &location, channels).await
        }
    }
}

/// What the proxy fast path reads: the live config, and the server's own paths.
pub(super) struct PublicSite {
    pub(super) live: Arc<Live>,
    pub(super) state: Arc<State>,
}

impl h1::Site for PublicSite {
    fn proxy(&self) -> &Proxy {
        &self.live.proxy
    }

    fn proxies(&self, method: &str, path: &str) -> bool {
        // A request a `[[publish_on]]` rule takes goes to hyper, which can publish.
        matches!(
            route_public(&self.state, &self.live, path),
            PublicRoute::Push(Route::Proxy)
        ) && !self.live.publish_on.catches(method, path)
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

/// The admin listener's view of the server.
struct View(Arc<State>);

impl ServerView for View {
    fn hub(&self) -> &Hub {
        &self.0.hub
    }

    fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    fn config(&self) -> Arc<Config> {
        self.0.live.load().config.clone()
    }

    fn listeners(&self) -> admin::status::Listeners {
        let a = ServerHandle {
            state: self.0.clone(),
        }
        .addrs();
        let cfg = self.config();
        admin::status::Listeners {
            public: a.public.iter().map(|s| format!("http://{s}")).collect(),
            public_tls: a
                .public_tls
                .iter()
                .map(|s| format!("https://{s}"))
                .collect(),
            publish: a.publish.iter().map(|s| format!("http://{s}")).collect(),
            publish_unix: a.publish_unix.map(|p| p.display().to_string()),
            admin: a.admin.map(|s| format!("http://{s}")),
            push: cfg.push.iter().map(|p| p.path.clone()).collect(),
        }
    }

    fn draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }

    fn stopped(&self) -> bool {
        self.0.finished.is_cancelled()
    }

    fn webhooks(&self) -> serde_json::Value {
        self.0.webhooks.status()
    }

    fn webpush(&self) -> Option<serde_json::Value> {
        self.0.webpush.as_ref().map(|wp| wp.admin_json())
    }
}
