//! The live status page of the admin listener.
//!
//! `/` serves one self-contained HTML page (no build step, no external assets). The page
//! subscribes with `EventSource` to `/stats/stream`, an SSE stream on the same listener that
//! sends a JSON snapshot at once and then every second: the listeners, the upstream's health,
//! open connections per transport, message rates, and the busiest channels.
//!
//! Everything in a snapshot is read from what the server keeps anyway (metric gauges and
//! counters, the hub's channel table, the listener table); nothing on the message path
//! counts anything for this page. Rates are the difference between two snapshots, so each
//! viewer's stream keeps its own previous figures. A viewer costs, once a second, one
//! [`Hub::list`](crate::hub::Hub::list) (which sorts the channel names and reads the figures of
//! at most [`CHANNELS_SCANNED`] channels), and a TCP connect to the upstream every
//! [`UPSTREAM_CHECK_EVERY`]; with no viewer it costs nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use http::header::{self, HeaderValue};
use http::Response;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde::Serialize;

use super::ServerView;
use crate::config::UpstreamAddr;
use crate::hub::ChannelStats;
use crate::model::Transport;
use crate::response::{self, Body, BoxError};

/// The page: HTML, CSS and script in one file, compiled into the binary.
pub const PAGE: &str = include_str!("status.html");

/// How often a snapshot is sent.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How often the upstream is probed (a TCP or Unix connect, closed at once) while a viewer is
/// connected. The proxy's own counters show errors in between.
pub const UPSTREAM_CHECK_EVERY: Duration = Duration::from_secs(5);
/// At most this many channels (the first by name) have their figures read per snapshot; the
/// snapshot says how many it looked at (`channels.scanned`) next to the total.
pub const CHANNELS_SCANNED: usize = 1000;
/// The busiest channels (by subscribers, then message rate) a snapshot lists.
pub const CHANNELS_SHOWN: usize = 50;

/// `GET /`: the page.
pub fn page() -> Response<Body> {
    let mut r = Response::new(response::full(PAGE));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // The page loads nothing from anywhere: say so, so a browser enforces it.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:",
        ),
    );
    r
}

/// `GET /stats/stream`: SSE, one `data:` line of JSON (a [`Snapshot`]) per second, until the
/// viewer goes or the server has stopped.
pub fn stream(server: Arc<dyn ServerView>) -> Response<Body> {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sampler = Sampler {
        server,
        tick,
        prev: None,
        upstream: UpstreamCheck::default(),
        checked_at: None,
        sent: 0,
    };
    let frames = stream::unfold(sampler, |mut s| async move {
        s.tick.tick().await; // the first tick is immediate
        if s.server.stopped() {
            return None;
        }
        let snap = s.sample().await;
        let mut frame = Vec::with_capacity(4096);
        if s.sent == 1 {
            frame.extend_from_slice(b"retry: 1000\n\n");
        }
        frame.extend_from_slice(b"data: ");
        // serde_json writes no raw newline: the snapshot is one `data:` line.
        if serde_json::to_writer(&mut frame, &snap).is_err() {
            return None;
        }
        frame.extend_from_slice(b"\n\n");
        Some((Ok::<_, BoxError>(Frame::data(Bytes::from(frame))), s))
    });
    let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// One status snapshot, as the page and scripts read it.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub version: &'static str,
    /// Unix milliseconds when it was taken.
    pub time_ms: u64,
    /// Seconds since the previous snapshot of this stream (rates are per second over it).
    pub interval_s: f64,
    /// False while draining (after SIGTERM).
    pub ready: bool,
    pub listeners: Listeners,
    pub upstream: Upstream,
    pub connections: Connections,
    pub messages: Messages,
    pub channels: Channels,
}

#[derive(Debug, Serialize)]
pub struct Listeners {
    pub public: Vec<String>,
    pub public_tls: Vec<String>,
    pub publish: Vec<String>,
    pub publish_unix: Option<String>,
    pub admin: Option<String>,
    /// The push locations' path templates.
    pub push: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Upstream {
    pub url: String,
    /// `ok`, `errors` (reachable, but proxied requests failed in the last interval), `down`
    /// (the last probe could not connect), or `unknown` (no probe yet).
    pub health: &'static str,
    pub check: UpstreamCheck,
    /// Proxied responses per second over the last interval, and in total by status class.
    pub requests_per_s: f64,
    pub responses: BTreeMap<&'static str, u64>,
    /// Failed upstream requests (connect, timeout, other): per second and in total.
    pub errors_per_s: f64,
    pub errors: BTreeMap<&'static str, u64>,
}

/// The last probe of the upstream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamCheck {
    /// None until the first probe.
    pub reachable: Option<bool>,
    pub connect_ms: Option<f64>,
    pub error: Option<String>,
    pub age_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Connections {
    /// Open client connections on the public listeners (subscribers and proxied traffic).
    pub clients: i64,
    pub websocket: i64,
    pub sse: i64,
    pub longpoll: i64,
    pub webrtc: i64,
}

#[derive(Debug, Serialize)]
pub struct Messages {
    pub published: u64,
    pub published_per_s: f64,
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub delivered_per_s_by_transport: PerTransport,
}

#[derive(Debug, Serialize)]
pub struct PerTransport {
    pub websocket: f64,
    pub sse: f64,
    pub longpoll: f64,
    pub webrtc: f64,
}

#[derive(Debug, Serialize)]
pub struct Channels {
    pub total: usize,
    /// How many channels this snapshot looked at (at most [`CHANNELS_SCANNED`]).
    pub scanned: usize,
    pub busiest: Vec<ChannelRow>,
}

#[derive(Debug, Serialize)]
pub struct ChannelRow {
    #[serde(flatten)]
    pub stats: ChannelStats,
    /// Messages published per second over the last interval (0 on the first snapshot).
    pub rate: f64,
}

/// What the previous snapshot of one stream saw.
struct Previous {
    at: Instant,
    published: u64,
    delivered: [u64; Transport::COUNT],
    proxied: u64,
    upstream_errors: u64,
    /// Per-channel `published` of the channels scanned last time.
    channels: HashMap<String, u64>,
}

struct Sampler {
    server: Arc<dyn ServerView>,
    tick: tokio::time::Interval,
    prev: Option<Previous>,
    upstream: UpstreamCheck,
    checked_at: Option<Instant>,
    /// Snapshots taken so far.
    sent: u64,
}

impl Sampler {
    async fn sample(&mut self) -> Snapshot {
        let now = Instant::now();
        if self
            .checked_at
            .is_none_or(|t| now.duration_since(t) >= UPSTREAM_CHECK_EVERY)
        {
            let cfg = self.server.config();
            let limit = cfg.upstream.connect_timeout.min(Duration::from_secs(2));
            self.upstream = probe_upstream(&cfg.upstream.url, limit).await;
            self.checked_at = Some(Instant::now());
        }
        self.sent += 1;
        self.take(now)
    }

    fn take(&mut self, now: Instant) -> Snapshot {
        let prev = self.prev.take();
        let server = &self.server;
        let cfg = server.config();
        let m = server.metrics();
        let hub = server.hub();

        let published = m.messages_published.get();
        let delivered = Transport::ALL.map(|t| m.delivered_total(t));
        let responses = m.proxy_responses();
        let proxied: u64 = responses.iter().sum();
        let err_counts = [
            ("connect", m.upstream_errors_connect.get()),
            ("timeout", m.upstream_errors_timeout.get()),
            ("other", m.upstream_errors_other.get()),
        ];
        let upstream_errors: u64 = err_counts.iter().map(|(_, n)| n).sum();

        // Per second since the previous snapshot; 0 on the first.
        let dt = prev
            .as_ref()
            .map_or(0.0, |p| now.duration_since(p.at).as_secs_f64().max(1e-3));
        let per_s = |cur: u64, before: Option<u64>| match before {
            Some(b) if dt > 0.0 => cur.saturating_sub(b) as f64 / dt,
            _ => 0.0,
        };

        let mut rows: Vec<ChannelRow> = hub
            .list("", CHANNELS_SCANNED)
            .1
            .into_iter()
            .map(|stats| {
                let before = prev.as_ref().and_then(|p| p.channels.get(&stats.channel));
                let rate = per_s(stats.published, before.copied());
                ChannelRow { stats, rate }
            })
            .collect();
        let scanned = rows.len();
        let channel_published: HashMap<String, u64> = rows
            .iter()
            .map(|r| (r.stats.channel.clone(), r.stats.published))
            .collect();
        rows.sort_by(|a, b| {
            b.stats
                .subscribers
                .cmp(&a.stats.subscribers)
                .then(b.rate.total_cmp(&a.rate))
                .then_with(|| a.stats.channel.cmp(&b.stats.channel))
        });
        rows.truncate(CHANNELS_SHOWN);

        let delivered_rate = |t: Transport| {
            let i = t.index();
            per_s(delivered[i], prev.as_ref().map(|p| p.delivered[i]))
        };
        let by_transport = PerTransport {
            websocket: delivered_rate(Transport::WebSocket),
            sse: delivered_rate(Transport::Sse),
            longpoll: delivered_rate(Transport::LongPoll),
            webrtc: delivered_rate(Transport::WebRtc),
        };
        let errors_per_s = per_s(upstream_errors, prev.as_ref().map(|p| p.upstream_errors));
        let health = match self.upstream.reachable {
            None => "unknown",
            Some(false) => "down",
            Some(true) if errors_per_s > 0.0 => "errors",
            Some(true) => "ok",
        };
        let mut check = self.upstream.clone();
        check.age_s = self
            .checked_at
            .map(|t| now.saturating_duration_since(t).as_secs_f64());
        let snap = Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            interval_s: dt,
            ready: !server.draining(),
            listeners: server.listeners(),
            upstream: Upstream {
                url: cfg.upstream.url.to_string(),
                health,
                check,
                requests_per_s: per_s(proxied, prev.as_ref().map(|p| p.proxied)),
                responses: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                    .into_iter()
                    .zip(responses)
                    .collect(),
                errors_per_s,
                errors: err_counts.into_iter().collect(),
            },
            connections: Connections {
                clients: m.client_connections.get(),
                websocket: m.subscribers(Transport::WebSocket),
                sse: m.subscribers(Transport::Sse),
                longpoll: m.subscribers(Transport::LongPoll),
                webrtc: m.subscribers(Transport::WebRtc),
            },
            messages: Messages {
                published,
                published_per_s: per_s(published, prev.as_ref().map(|p| p.published)),
                delivered: delivered.iter().sum(),
                delivered_per_s: by_transport.websocket
                    + by_transport.sse
                    + by_transport.longpoll
                    + by_transport.webrtc,
                delivered_per_s_by_transport: by_transport,
            },
            channels: Channels {
                total: hub.channel_count(),
                scanned,
                busiest: rows,
            },
        };
        self.prev = Some(Previous {
            at: now,
            published,
            delivered,
            proxied,
            upstream_errors,
            channels: channel_published,
        });
        snap
    }
}

/// Connects to the upstream and hangs up: can crier reach it at all?
async fn probe_upstream(addr: &UpstreamAddr, limit: Duration) -> UpstreamCheck {
    match crate::proxy::probe::connect(addr, limit).await {
        Ok(took) => UpstreamCheck {
            reachable: Some(true),
            connect_ms: Some(took.as_secs_f64() * 1000.0),
            error: None,
            age_s: None,
        },
        Err(e) => UpstreamCheck {
            reachable: Some(false),
            connect_ms: None,
            error: Some(e.to_string()),
            age_s: None,
        },
    }
}
