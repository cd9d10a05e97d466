//! The Prometheus registry and typed metric handles.
//!
//! Handles with a label are resolved once here (one per transport, reason, ...) so the hot
//! path increments a plain atomic, never looks a label up. No per-channel labels: per-channel
//! figures come from `/channels`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::model::Transport;

/// Why the hub let go of a subscriber.
#[derive(Debug, Clone, Copy)]
pub enum DropReason {
    /// Fell behind the buffer (slow reader).
    Lagged,
    /// No pong within two keepalive intervals (WebSocket).
    Timeout,
    /// Sent a frame larger than allowed (WebSocket).
    Oversized,
    /// The token the stream was opened with expired.
    Expired,
}

/// Which check decided (`crier_auth_checks_total{method}`).
#[derive(Debug, Clone, Copy)]
pub enum AuthMethod {
    /// `auth_request` to the upstream app.
    Forward,
    /// `[push.jwt]`.
    Jwt,
    /// The publish API's bearer token on TCP.
    PublishToken,
}

/// How a check ended (`crier_auth_checks_total{result}`).
#[derive(Debug, Clone, Copy)]
pub enum AuthResult {
    Allow,
    Deny,
    /// No answer could be had (forward auth: upstream down, slow or odd): 503.
    Error,
}

/// What became of a frame a WebSocket client sent (`crier_client_messages_total{result}`).
#[derive(Debug, Clone, Copy)]
pub enum ClientResult {
    /// Published to the channel.
    Published,
    /// POSTed to the upstream, which answered 2xx.
    Forwarded,
    /// Not taken: the location refuses client messages (the frame is ignored).
    Ignored,
    /// The JWT or forward auth does not allow publishing, or the channel is not this
    /// location's to publish to.
    Denied,
    /// Larger than `max_client_message` (closed with 1009).
    TooBig,
    /// Over `client_rate` (closed with 1008).
    RateLimited,
    /// The upstream failed, refused or did not answer in time (forward).
    UpstreamError,
    /// Malformed (bad channel name, data or event; several channels and a plain frame).
    Invalid,
    /// The hub could not take it (shutting down, too many channels, the store down).
    Error,
}

/// The `location_kind` labels of `crier_client_messages_total`, in `ClientMessages` order.
const CLIENT_KINDS: [&str; 3] = ["refuse", "publish", "forward"];

pub struct Metrics {
    pub registry: Registry,
    connections: [IntGauge; Transport::COUNT],
    connections_total: [IntCounter; Transport::COUNT],
    pub messages_published: IntCounter,
    messages_delivered: [IntCounter; Transport::COUNT],
    delivered_bytes: [IntCounter; Transport::COUNT],
    messages_skipped: [IntCounter; Transport::COUNT],
    lag_skips: [IntCounter; Transport::COUNT],
    pub channels: IntGauge,
    dropped: [IntCounter; 4],
    pub publish_duration: Histogram,
    pub delivery_lag: Histogram,
    pub proxy_requests: [IntCounter; 5],
    pub proxy_duration: Histogram,
    pub upstream_errors_connect: IntCounter,
    pub upstream_errors_timeout: IntCounter,
    pub upstream_errors_other: IntCounter,
    pub client_connections: IntGauge,
    /// Open public connections per event loop (`server.event_loops`), labelled `loop`.
    pub event_loop_connections: IntGaugeVec,
    pub connections_refused: IntCounter,
    pub config_reloads_ok: IntCounter,
    pub config_reloads_error: IntCounter,
    /// [method][result], see [`AuthMethod`] and [`AuthResult`].
    auth_checks: [[IntCounter; 3]; 3],
    pub auth_cache_hits: IntCounter,
    /// Outbound webhooks, labelled `webhook` (its `name`, else the URL's host and path) and
    /// `outcome` (delivered, retried, failed, dropped, disabled); each endpoint resolves its
    /// handles once when the webhook set is built.
    pub webhook_deliveries: IntCounterVec,
    pub webhook_queue_depth: IntGaugeVec,
    pub webhook_duration: HistogramVec,
    /// `[[publish_on]]` rules, labelled `rule` (its `name`, else its path) and `result`
    /// (published, truncated, status, aborted, bad_channel, failed); each rule resolves its
    /// handles once when the rule set is built.
    pub publish_on: IntCounterVec,
    /// `[[poll]]`, labelled `poll` (its `name`, else its channel) and `result` (changed,
    /// unchanged, not_modified, status, error, timeout, too_large, failed).
    pub polls: IntCounterVec,
    /// `crier_webrtc_sessions{state}`: [connecting, open].
    webrtc_sessions: [IntGauge; 2],
    /// POST of the offer → the client's data channel open.
    pub webrtc_handshake: Histogram,
    /// `crier_publish_rejected_total{reason}`, by [`PublishRejection`].
    publish_rejected: [IntCounter; PublishRejection::ALL.len()],
    /// 1 while the last connect probe of the upstream succeeded (every 5 s), else 0.
    pub upstream_up: IntGauge,
    /// 1 from the start of the draining shutdown.
    pub draining: IntGauge,
    /// `[cluster]`: 1 while every Redis shard answers and its fan-out is subscribed, else 0.
    pub cluster_up: IntGauge,
    /// `[cluster]`: fan-out connections made again after one was lost or found wedged.
    pub cluster_reconnects: IntCounter,
    /// `[cluster]`: time of each Redis command (publish script, stream reads).
    pub cluster_command_duration: Histogram,
    /// `[cluster]`: holes in a channel's fan-out that the stream could not fill (reported to
    /// subscribers as a gap).
    pub cluster_gaps: IntCounter,
    /// [location kind][result], see [`ClientResult`].
    client_messages: [[IntCounter; 9]; 3],
}

/// Why a publish (`POST`/`PUT /pub/...`) was refused, for `crier_publish_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRejection {
    /// 401: a TCP publish without the right token.
    Unauthorized,
    /// 400 or 404: a bad channel or event name, an unreadable body, a wrong path.
    BadRequest,
    /// 413: over `channels.max_message_size`.
    TooLarge,
    /// 429: `channels.max_channels` reached.
    MaxChannels,
    /// 503: draining, or the store cannot take it now.
    Unavailable,
}

impl PublishRejection {
    pub const ALL: [PublishRejection; 5] = [
        PublishRejection::Unauthorized,
        PublishRejection::BadRequest,
        PublishRejection::TooLarge,
        PublishRejection::MaxChannels,
        PublishRejection::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PublishRejection::Unauthorized => "unauthorized",
            PublishRejection::BadRequest => "bad_request",
            PublishRejection::TooLarge => "too_large",
            PublishRejection::MaxChannels => "max_channels",
            PublishRejection::Unavailable => "unavailable",
        }
    }

    /// The reason an error status of the publish API stands for.
    pub fn of_status(status: http::StatusCode) -> PublishRejection {
        match status.as_u16() {
            401 | 403 => PublishRejection::Unauthorized,
            413 => PublishRejection::TooLarge,
            429 => PublishRejection::MaxChannels,
            500..=599 => PublishRejection::Unavailable,
            _ => PublishRejection::BadRequest,
        }
    }
}

/// A WebRTC session's state for `crier_webrtc_sessions{state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebRtcState {
    /// Answered, waiting for ICE, DTLS, SCTP and the client's data channel.
    Connecting,
    /// The data channel is open: messages flow.
    Open,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let transports =
            |vec: &IntGaugeVec| Transport::ALL.map(|t| vec.with_label_values(&[t.as_str()]));
        let per_transport =
            |vec: &IntCounterVec| Transport::ALL.map(|t| vec.with_label_values(&[t.as_str()]));
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let v = IntGaugeVec::new(Opts::new(name, help).namespace("crier"), &[label])
                .expect("valid metric"); // ok: constant names
            r.register(Box::new(v.clone())).expect("unique metric"); // ok: registered once
            v
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let v = IntCounterVec::new(Opts::new(name, help).namespace("crier"), &[label])
                .expect("valid metric"); // ok: constant names
            r.register(Box::new(v.clone())).expect("unique metric"); // ok
            v
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name, help).namespace("crier"))
                .expect("valid metric"); // ok
            r.register(Box::new(c.clone())).expect("unique metric"); // ok
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(name, help).namespace("crier"))
                .expect("valid metric"); // ok
            r.register(Box::new(g.clone())).expect("unique metric"); // ok
            g
        };
        let histogram = |name: &str, help: &str| {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .namespace("crier")
                    .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"); // ok
            r.register(Box::new(h.clone())).expect("unique metric"); // ok
            h
        };

        let connections = transports(&gauge_vec(
            "connections",
            "Open subscriber connections.",
            "transport",
        ));
        let connections_total = per_transport(&counter_vec(
            "connections_total",
            "Subscriber connections accepted.",
            "transport",
        ));
        let messages_delivered = per_transport(&counter_vec(
            "messages_delivered_total",
            "Messages handed to subscriber connections: counted at publish for each subscriber connected then, and when a resume reads older ones; long-poll: one per response.",
            "transport",
        ));
        let delivered_bytes = per_transport(&counter_vec(
            "delivered_bytes_total",
            "Message body bytes handed to subscriber connections.",
            "transport",
        ));
        let messages_skipped = per_transport(&counter_vec(
            "messages_skipped_total",
            "Messages a subscriber that fell behind the buffer jumped over (on_lag = \"skip\"); it was told of the gap.",
            "transport",
        ));
        let lag_skips = per_transport(&counter_vec(
            "lag_skips_total",
            "Times a subscriber fell behind the buffer, was moved to its oldest message and told of the gap.",
            "transport",
        ));
        let dropped_vec = counter_vec(
            "subscribers_dropped_total",
            "Subscribers the server disconnected, by reason.",
            "reason",
        );
        let dropped = ["lagged", "timeout", "oversized", "expired"]
            .map(|r| dropped_vec.with_label_values(&[r]));
        let proxy_vec = counter_vec(
            "proxy_requests_total",
            "Proxied requests by response status class.",
            "code_class",
        );
        let proxy_requests =
            ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| proxy_vec.with_label_values(&[c]));
        let upstream_errors = counter_vec(
            "upstream_errors_total",
            "Failed upstream requests by kind.",
            "kind",
        );
        let reloads = counter_vec(
            "config_reloads_total",
            "Config reloads (SIGHUP) by result.",
            "result",
        );

        let auth_vec = IntCounterVec::new(
            Opts::new(
                "auth_checks_total",
                "Subscriber and publisher checks, by method and result.",
            )
            .namespace("crier"),
            &["method", "result"],
        )
        .expect("valid metric"); // ok: constant names
        r.register(Box::new(auth_vec.clone()))
            .expect("unique metric"); // ok: registered once
        let auth_checks = ["forward", "jwt", "publish_token"]
            .map(|m| ["allow", "deny", "error"].map(|res| auth_vec.with_label_values(&[m, res])));

        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "webhook_deliveries_total",
                "Outbound webhook events by endpoint and outcome (delivered, retried, failed, dropped, disabled).",
            )
            .namespace("crier"),
            &["webhook", "outcome"],
        )
        .expect("valid metric"); // ok: constant names
        r.register(Box::new(webhook_deliveries.clone()))
            .expect("unique metric"); // ok: registered once
        let event_loop_connections = gauge_vec(
            "event_loop_connections",
            "Open client connections on the public listeners, per event loop (server.event_loops).",
            "loop",
        );
        let webhook_queue_depth = gauge_vec(
            "webhook_queue_depth",
            "Outbound webhook events waiting, by endpoint.",
            "webhook",
        );
        let webhook_duration = HistogramVec::new(
            HistogramOpts::new(
                "webhook_duration_seconds",
                "Time of one outbound webhook attempt (request sent to response read), by endpoint.",
            )
            .namespace("crier")
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["webhook"],
        )
        .expect("valid metric"); // ok: constant names
        r.register(Box::new(webhook_duration.clone()))
            .expect("unique metric"); // ok: registered once
        let two_labels = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help).namespace("crier"), labels)
                .expect("valid metric"); // ok: constant names
            r.register(Box::new(v.clone())).expect("unique metric"); // ok: registered once
            v
        };
        let publish_on = two_labels(
            "publish_on_total",
            "Proxied requests that matched a [[publish_on]] rule, by rule and result (published, truncated, status, aborted, bad_channel, failed).",
            &["rule", "result"],
        );
        let polls = two_labels(
            "poll_total",
            "[[poll]] requests to the upstream, by poll and result (changed, unchanged, not_modified, status, error, timeout, too_large, failed).",
            &["poll", "result"],
        );
        let webrtc_vec = gauge_vec(
            "webrtc_sessions",
            "WebRTC DataChannel sessions, by state (connecting: answered, channel not open yet).",
            "state",
        );
        let webrtc_sessions = ["connecting", "open"].map(|s| webrtc_vec.with_label_values(&[s]));
        let rejected_vec = counter_vec(
            "publish_rejected_total",
            "Publishes the publish API refused, by reason (unauthorized, bad_request, too_large, max_channels, unavailable).",
            "reason",
        );
        let publish_rejected =
            PublishRejection::ALL.map(|r| rejected_vec.with_label_values(&[r.as_str()]));
        // The version as a label on a constant 1, the Prometheus way to join it to any series.
        gauge_vec(
            "build_info",
            "Always 1; the label says which crier version runs.",
            "version",
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        let client_vec = IntCounterVec::new(
            Opts::new(
                "client_messages_total",
                "Frames WebSocket clients sent, by the client_messages mode of the location that took them and by result.",
            )
            .namespace("crier"),
            &["location_kind", "result"],
        )
        .expect("valid metric"); // ok: constant names
        r.register(Box::new(client_vec.clone()))
            .expect("unique metric"); // ok: registered once
        let client_messages = CLIENT_KINDS.map(|k| {
            [
                "published",
                "forwarded",
                "ignored",
                "denied",
                "too_big",
                "rate_limited",
                "upstream_error",
                "invalid",
                "error",
            ]
            .map(|res| client_vec.with_label_values(&[k, res]))
        });

        let m = Metrics {
            connections,
            connections_total,
            messages_published: counter(
                "messages_published_total",
                "Messages accepted by the publish API.",
            ),
            messages_delivered,
            delivered_bytes,
            messages_skipped,
            lag_skips,
            channels: gauge("channels", "Channels in the hub."),
            dropped,
            publish_duration: histogram(
                "publish_duration_seconds",
                "Time to accept a publish (body read, append, wake).",
            ),
            delivery_lag: histogram(
                "delivery_lag_seconds",
                "Time from publish accepted to the message handed to the subscriber's connection.",
            ),
            proxy_requests,
            proxy_duration: histogram(
                "proxy_request_duration_seconds",
                "Time from a proxied request's arrival to its upstream response headers.",
            ),
            upstream_errors_connect: upstream_errors.with_label_values(&["connect"]),
            upstream_errors_timeout: upstream_errors.with_label_values(&["timeout"]),
            upstream_errors_other: upstream_errors.with_label_values(&["other"]),
            client_connections: gauge(
                "client_connections",
                "Open client connections on the public listeners.",
            ),
            event_loop_connections,
            connections_refused: counter(
                "client_connections_refused_total",
                "Client connections refused because server.max_connections was reached.",
            ),
            config_reloads_ok: reloads.with_label_values(&["ok"]),
            config_reloads_error: reloads.with_label_values(&["error"]),
            auth_checks,
            auth_cache_hits: counter(
                "auth_cache_hits_total",
                "Forward-auth answers taken from auth_cache_ttl instead of asking the upstream.",
            ),
            webhook_deliveries,
            webhook_queue_depth,
            webhook_duration,
            publish_on,
            polls,
            webrtc_sessions,
            webrtc_handshake: Histogram::with_opts(
                HistogramOpts::new(
                    "webrtc_handshake_seconds",
                    "Time from a WebRTC offer's POST to the client's data channel open (ICE, DTLS, SCTP).",
                )
                .namespace("crier")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )
            .expect("valid metric"), // ok: constant names
            publish_rejected,
            upstream_up: gauge(
                "upstream_up",
                "1 while the upstream app accepts connections (a connect probe every 5 s), else 0.",
            ),
            draining: gauge(
                "draining",
                "1 from the start of the draining shutdown (SIGTERM), else 0.",
            ),
            // Registered only by the cluster engine (`register_cluster`): a single node has no
            // Redis to be up or down, and a 0 there would fire the Redis alert.
            cluster_up: IntGauge::with_opts(
                Opts::new(
                    "cluster_up",
                    "[cluster]: 1 while every Redis shard's fan-out connection is up, else 0.",
                )
                .namespace("crier"),
            )
            .expect("valid metric"), // ok: constant names
            cluster_reconnects: IntCounter::with_opts(
                Opts::new(
                    "cluster_reconnects_total",
                    "[cluster]: fan-out connections to Redis made again after one was lost or wedged.",
                )
                .namespace("crier"),
            )
            .expect("valid metric"), // ok: constant names
            cluster_command_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "cluster_command_duration_seconds",
                    "[cluster]: time of each Redis command (publish script, stream reads).",
                )
                .namespace("crier")
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"), // ok: constant names
            cluster_gaps: IntCounter::with_opts(
                Opts::new(
                    "cluster_gaps_total",
                    "[cluster]: holes in a channel's fan-out the Redis stream could not fill (told as gaps).",
                )
                .namespace("crier"),
            )
            .expect("valid metric"), // ok: constant names
            client_messages,
            registry: r,
        };
        m.registry
            .register(Box::new(m.webrtc_handshake.clone()))
            .expect("unique metric"); // ok: registered once
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // A second in-process server (tests) shares the process: one collector is enough.
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Adds the `crier_cluster_*` metrics to the exposition (the cluster engine does, once).
    pub fn register_cluster(&self) {
        let r = &self.registry;
        // Err: already registered (a second engine on the same metrics): nothing to add.
        let _ = r.register(Box::new(self.cluster_up.clone()));
        let _ = r.register(Box::new(self.cluster_reconnects.clone()));
        let _ = r.register(Box::new(self.cluster_command_duration.clone()));
        let _ = r.register(Box::new(self.cluster_gaps.clone()));
    }

    pub fn subscriber_connected(&self, t: Transport) {
        self.connections[t.index()].inc();
        self.connections_total[t.index()].inc();
    }

    pub fn subscriber_disconnected(&self, t: Transport) {
        self.connections[t.index()].dec();
    }

    /// A subscriber fell behind and jumped over `messages`.
    pub fn skipped(&self, t: Transport, messages: u64) {
        self.lag_skips[t.index()].inc();
        self.messages_skipped[t.index()].inc_by(messages);
    }

    pub fn delivered(&self, t: Transport, messages: u64, bytes: u64) {
        self.messages_delivered[t.index()].inc_by(messages);
        self.delivered_bytes[t.index()].inc_by(bytes);
    }

    /// Open subscriber connections of one transport (the `crier_connections` gauge).
    pub fn subscribers(&self, t: Transport) -> i64 {
        self.connections[t.index()].get()
    }

    /// Messages handed to subscribers of one transport so far.
    pub fn delivered_total(&self, t: Transport) -> u64 {
        self.messages_delivered[t.index()].get()
    }

    /// Proxied responses so far, by status class (`1xx` … `5xx`).
    pub fn proxy_responses(&self) -> [u64; 5] {
        self.proxy_requests.each_ref().map(|c| c.get())
    }

    pub fn webrtc_session(&self, state: WebRtcState, delta: i64) {
        self.webrtc_sessions[state as usize].add(delta);
    }

    /// WebRTC sessions in one state (the `crier_webrtc_sessions` gauge).
    pub fn webrtc_sessions(&self, state: WebRtcState) -> i64 {
        self.webrtc_sessions[state as usize].get()
    }

    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].inc();
    }

    pub fn publish_rejected(&self, why: PublishRejection) {
        self.publish_rejected[why as usize].inc();
    }

    pub fn auth_check(&self, method: AuthMethod, result: AuthResult) {
        self.auth_checks[method as usize][result as usize].inc();
    }

    /// One client frame at a location whose `client_messages` is `kind` ("refuse",
    /// "publish", "forward").
    pub fn client_message(&self, kind: &str, result: ClientResult) {
        let k = CLIENT_KINDS.iter().position(|c| *c == kind).unwrap_or(0);
        self.client_messages[k][result as usize].inc();
    }

    pub fn proxy_response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.proxy_requests[class].inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would be a bad metric name.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("metrics encoding failed: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
