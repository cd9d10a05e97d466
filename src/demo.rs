//! `crier demo`: a stand-in for "your app". A tiny HTTP server on loopback that serves one
//! page; crier runs in front of it as usual, so the page arrives through the proxy and its
//! `EventSource` subscribes to `/live/demo` on the same origin — exactly what a real app's page
//! does. Nothing here is used by `crier run`.

use std::convert::Infallible;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::config::{
    Config, HostPattern, KeyFile, Origin, WebPushConfig, WebRtcConfig, DEFAULT_PUSH_HOSTS,
};
use crate::keys::{VapidError, VapidKey};
use crate::model::Transport;
use crate::response::{self, Body};

/// The demo app's page: HTML, CSS and script in one file, compiled into the binary.
pub const PAGE: &str = include_str!("demo.html");

/// The Web Push service worker the page registers (at `/sw.js`); the README shows it too.
pub const SERVICE_WORKER: &str = include_str!("demo_sw.js");

/// The channel the demo page subscribes to.
pub const CHANNEL: &str = "demo";

/// The push location of the page's chat box: its WebSocket clients publish what they type
/// (`client_messages = "publish"`), on channels of their own.
pub const CHAT_LOCATION: &str = "[[push]]\npath = \"/demo-chat/{channel}\"\nchannel_prefix = \"demo-chat:\"\n\
                                 client_messages = \"publish\"\ntransports = [\"websocket\", \"sse\"]\n";

/// Gives the demo page's chat box its location (see [`CHAT_LOCATION`]) unless the config
/// already has one at that path.
pub fn enable_chat(config: &mut Config) {
    let Ok(chat) = Config::from_toml(CHAT_LOCATION, None) else {
        return;
    };
    for loc in chat.push {
        if config.push.iter().all(|l| l.path != loc.path) {
            config.push.push(loc);
        }
    }
}

/// Gives the demo its WebRTC column when the config has no `[webrtc]`: a UDP socket on this
/// host's own address (browsers refuse or filter 127.0.0.1 candidates; the address a default
/// route leaves from is one they take), on a free port, and "webrtc" on every push location
/// that serves all the other transports.
pub fn enable_webrtc(config: &mut Config) {
    if config.webrtc.is_some() {
        return;
    }
    // `connect` on UDP only picks the route and the source address: nothing is sent.
    let ip = std::net::UdpSocket::bind(("0.0.0.0", 0))
        .and_then(|s| s.connect(("192.0.2.1", 9)).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
    config.webrtc = Some(WebRtcConfig {
        listen: (ip, 0).into(),
        candidates: Vec::new(),
        max_sessions: 100,
        ice_timeout: Duration::from_secs(30),
    });
    for loc in &mut config.push {
        if loc.allows(Transport::WebSocket)
            && loc.allows(Transport::Sse)
            && loc.allows(Transport::LongPoll)
        {
            loc.transports[Transport::WebRtc.index()] = true;
        }
    }
}

/// `crier demo` without a `[webpush]` section: a fresh key and store in `dir`, the real
/// browsers' push services, so the demo page's "Notify me" works as it would on a site.
pub fn webpush_config(dir: &std::path::Path) -> Result<WebPushConfig, VapidError> {
    let path = dir.join("vapid.pem");
    VapidKey::generate(&path)?;
    Ok(WebPushConfig {
        vapid_key_file: KeyFile {
            path,
            origin: Origin {
                file: "<crier demo>".into(),
                line: 0,
                col: 0,
                key: "webpush.vapid_key_file",
            },
        },
        subject: "mailto:crier-demo@example.invalid".into(),
        path: "/_crier/webpush".into(),
        store: dir.join("webpush.redb"),
        push_hosts: DEFAULT_PUSH_HOSTS
            .iter()
            .filter_map(|h| HostPattern::parse(h).ok())
            .collect(),
        ttl: Duration::from_secs(3600),
        max_subscriptions: 10_000,
        ca_file: None,
        push_ports: vec![443],
        allow_addresses: Vec::new(),
        resolve: Default::default(),
    })
}

/// Serves the demo app on `listener` until the task is dropped: the page at `/`, an empty
/// favicon, 404 elsewhere.
pub async fn serve_app(listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("demo app: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(|req| async move { Ok::<_, Infallible>(app(&req)) }),
                );
            if let Err(e) = conn.await {
                tracing::debug!("demo app: connection ended with an error: {e}");
            }
        });
    }
}

fn app(req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response::method_not_allowed("GET, HEAD", false);
    }
    match req.uri().path() {
        "/" | "/index.html" => {
            let mut r = Response::new(response::full(PAGE));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        "/sw.js" => {
            let mut r = Response::new(response::full(SERVICE_WORKER));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            );
            r
        }
        // Browsers ask for one; a 404 would show up as an error on the status page.
        "/favicon.ico" => {
            let mut r = Response::new(response::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        _ => response::text(
            StatusCode::NOT_FOUND,
            "not found: the demo app serves only / (crier serves /live/{channel})",
        ),
    }
}
