//! Subscriber transports. One URL per channel serves all of them; the request picks one:
//! `Upgrade: websocket` → WebSocket, `Accept: text/event-stream` → SSE, `POST` of an SDP
//! offer → WebRTC (`DELETE` ends that session), anything else → long-poll.
//! Each transport owns its wire encoding and its loop, in its own file.

pub mod longpoll;
pub mod sse;
pub mod webrtc;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::auth::{Ask, Gatekeeper};
use crate::config::{FirstMessage, PushLocation, Transport};
use crate::hub::{Hub, HubError, MessageId, Start, Subscription};
use crate::proxy::ConnInfo;
use crate::response::{self, Body};

/// The wire-encoding slots of [`crate::hub::Message`], one per encoding that is worth building
/// once per message and sharing between subscribers.
pub mod encoding {
    pub const SSE: usize = 0;
    pub const WS_JSON: usize = 1;
}

pub const RESUME_HEADER: &str = "crier-resume";

/// What a push request needs from the server.
pub struct PushContext<'a> {
    pub hub: &'a Hub,
    /// WebSocket tasks live outside the HTTP connection; shutdown waits on this tracker.
    pub ws_tasks: &'a TaskTracker,
    /// Forward auth and JWT, for the locations that ask for them.
    pub gatekeeper: &'a Gatekeeper,
    pub conn: &'a ConnInfo,
    /// The `[webrtc]` socket and sessions, when configured.
    pub webrtc: Option<&'a webrtc::WebRtc>,
}

/// Where the client says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Nothing named: the location's `first_message` decides.
    Unnamed,
    /// `last_event_id=earliest`: the whole buffer.
    Earliest,
    After(MessageId),
}

impl Position {
    fn start(self, loc: &PushLocation) -> Start {
        match self {
            Position::Unnamed => match loc.first_message {
                FirstMessage::Newest => Start::Newest,
                FirstMessage::Oldest => Start::Oldest,
            },
            Position::Earliest => Start::Oldest,
            Position::After(id) => Start::After(id),
        }
    }
}

/// Serves one request at a push location: Origin → transport → who (auth) → position →
/// subscription. The Origin check comes first, so a cross-site page never makes crier send
/// the victim's cookies to the app's auth endpoint.
pub async fn serve(
    ctx: PushContext<'_>,
    mut req: Request<Incoming>,
    loc: &PushLocation,
    channel: &str,
) -> Response<Body> {
    ensure_host(&mut req);
    let cors = match check_origin(req.headers(), loc) {
        Ok(c) => c,
        Err(OriginNotAllowed) => {
            return response::text(StatusCode::FORBIDDEN, "origin not allowed")
        }
    };
    let transport = if hyper_tungstenite::is_upgrade_request(&req) {
        Transport::WebSocket
    } else if req.method() == Method::OPTIONS {
        return preflight(cors, loc);
    } else if loc.allows(Transport::WebRtc) && req.method() == Method::POST {
        Transport::WebRtc
    } else if loc.allows(Transport::WebRtc) && req.method() == Method::DELETE {
        // The session id in the URL is the capability (as in WHIP): no auth round trip.
        let mut resp = match ctx.webrtc {
            Some(w) => webrtc::delete(w, req.uri().query(), channel),
            None => response::text(StatusCode::NOT_FOUND, "no such WebRTC session"),
        };
        if let Some(origin) = cors {
            add_cors(resp.headers_mut(), origin);
        }
        return resp;
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        return response::method_not_allowed(allowed_methods(loc), false);
    } else if accepts_event_stream(req.headers()) {
        Transport::Sse
    } else {
        Transport::LongPoll
    };
    if !loc.allows(transport) {
        return if transport == Transport::WebSocket {
            response::text(
                StatusCode::BAD_REQUEST,
                "websocket is not enabled at this location",
            )
        } else {
            response::text(
                StatusCode::NOT_ACCEPTABLE,
                &format!("{} is not enabled at this location", transport.as_str()),
            )
        };
    }
    // Once per subscription: WebSocket and SSE at connect, long-poll at every request.
    if let Err(denial) = check_subscriber(
        ctx.gatekeeper,
        ctx.conn,
        (req.uri(), req.headers()),
        loc,
        channel,
    )
    .await
    {
        return denial.into_response(cors.as_ref());
    }
    let position = match position(req.uri().query(), req.headers(), transport) {
        Ok(p) => p,
        Err(e) => return response::text(StatusCode::BAD_REQUEST, &e),
    };
    if transport == Transport::WebRtc {
        let mut resp = match ctx.webrtc {
            Some(w) => {
                webrtc::offer(w, ctx.hub, req, channel, position.start(loc), ctx.conn.peer).await
            }
            // [webrtc] was added by a reload: its socket opens at the next start.
            None => response::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "webrtc is configured but its UDP socket opens only at start; restart crier",
            ),
        };
        if let Some(origin) = cors {
            add_cors(resp.headers_mut(), origin);
        }
        return resp;
    }
    let sub = match ctx
        .hub
        .subscribe(channel, transport, position.start(loc), Some(ctx.conn.peer))
    {
        Ok(s) => s,
        Err(e) => return hub_error(e),
    };
    let mut resp = match transport {
        Transport::Sse => sse::respond(sub, loc),
        Transport::WebSocket => ws::respond(&mut req, sub, loc, ctx.ws_tasks),
        // (WebRTC answered above, before any subscription.)
        Transport::LongPoll | Transport::WebRtc => longpoll::respond(sub, loc, position).await,
    };
    if let Some(origin) = cors {
        add_cors(resp.headers_mut(), origin);
    }
    resp
}

/// HTTP/2 carries the request's host in `:authority`, not `Host`: same-origin checks need it.
pub fn ensure_host<B>(req: &mut Request<B>) {
    if !req.headers().contains_key(header::HOST) {
        if let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
}

/// The location's subscriber checks (forward auth, JWT) for a request that passed the Origin
/// check: what a subscription at `loc` needs, whatever asks for one (a transport, Web Push).
pub async fn check_subscriber(
    gatekeeper: &Gatekeeper,
    conn: &ConnInfo,
    (uri, headers): (&http::Uri, &HeaderMap),
    loc: &PushLocation,
    channel: &str,
) -> Result<(), crate::auth::Denial> {
    if !Gatekeeper::guards(loc) {
        return Ok(());
    }
    let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let ask = Ask {
        headers,
        target,
        query: uri.query(),
        conn,
    };
    // Boxed: the check's future (an upstream request) is not kept in the state of every
    // request's future, long-polls waiting for a message included.
    Box::pin(gatekeeper.check(loc, channel, &ask)).await
}

/// An SSE subscription the fast path may serve itself (see `sse::serve_h1`).
pub struct FastSse {
    pub sub: Subscription,
    pub cors: Option<HeaderValue>,
}

/// An SSE request that passed every check of [`serve`] that needs no I/O; what is left is
/// the location's auth (async) and the subscription itself.
pub struct FastSseRequest {
    pub cors: Option<HeaderValue>,
    start: Start,
}

/// Everything [`serve`] checks before auth for a GET that asks for SSE, on a request head the
/// server parsed itself. None whenever `serve` would answer anything but a plain SSE stream
/// (an error, another transport): the general path then answers the request.
pub fn check_fast_sse(
    loc: &PushLocation,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Option<FastSseRequest> {
    if !loc.allows(Transport::Sse)
        || !accepts_event_stream(headers)
        || headers.contains_key(header::UPGRADE)
    {
        return None;
    }
    let cors = check_origin(headers, loc).ok()?;
    let position = position(query, headers, Transport::Sse).ok()?;
    Some(FastSseRequest {
        cors,
        start: position.start(loc),
    })
}

/// Subscribes a request that [`check_fast_sse`] (and auth) let through; on Err, `serve`
/// would answer [`hub_error`].
pub fn subscribe_fast_sse(
    hub: &Hub,
    channel: &str,
    req: FastSseRequest,
    remote: SocketAddr,
) -> Result<FastSse, HubError> {
    let sub = hub.subscribe(channel, Transport::Sse, req.start, Some(remote))?;
    Ok(FastSse {
        sub,
        cors: req.cors,
    })
}

pub fn hub_error(e: HubError) -> Response<Body> {
    match e {
        HubError::TooManyChannels(_) | HubError::NoSuchChannel => {
            response::text(e.status(), &e.to_string())
        }
        HubError::ShuttingDown => {
            let mut r = response::text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// `Crier-Resume: gap` when messages after the client's position were already gone.
pub fn resume_header(sub: &Subscription) -> HeaderValue {
    HeaderValue::from_static(if sub.gap() { "gap" } else { "ok" })
}

fn accepts_event_stream(h: &HeaderMap) -> bool {
    h.get_all(header::ACCEPT).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|m| {
                m.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
            })
        })
    })
}

/// Reads the client's position: `last_event_id` in the query (all transports),
/// `Last-Event-ID` (SSE), `If-None-Match: "<id>"` (long-poll). The query wins.
fn position(query: Option<&str>, h: &HeaderMap, t: Transport) -> Result<Position, String> {
    if let Some(q) = query {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == "last_event_id" {
                return parse_position(v);
            }
        }
    }
    match t {
        Transport::Sse => match h.get("last-event-id") {
            Some(v) => parse_position(v.to_str().map_err(|_| "malformed Last-Event-ID")?.trim()),
            None => Ok(Position::Unnamed),
        },
        Transport::LongPoll => match h.get(header::IF_NONE_MATCH) {
            Some(v) => {
                let s = v.to_str().map_err(|_| "malformed If-None-Match")?.trim();
                if s == "*" {
                    return Ok(Position::Unnamed);
                }
                // An entity tag is `"<id>"`, perhaps weak (`W/"<id>"`): exactly one pair of
                // quotes around exactly one id.
                let s = s.strip_prefix("W/").unwrap_or(s);
                let id = s
                    .strip_prefix('"')
                    .and_then(|s| s.strip_suffix('"'))
                    .ok_or("If-None-Match must be a quoted message id like \"1732400000123-0\"")?;
                parse_position(id)
            }
            None => Ok(Position::Unnamed),
        },
        Transport::WebSocket | Transport::WebRtc => Ok(Position::Unnamed),
    }
}

fn parse_position(v: &str) -> Result<Position, String> {
    match v {
        "" => Ok(Position::Unnamed),
        "earliest" => Ok(Position::Earliest),
        id => id
            .parse::<MessageId>()
            .map(Position::After)
            .map_err(|e| e.to_string()),
    }
}

/// A page whose Origin the location does not allow (403).
#[derive(Debug, Clone, Copy)]
pub struct OriginNotAllowed;

/// Ok(Some(origin)) when the request is cross-origin and allowed (CORS headers needed),
/// Ok(None) when it is same-origin or carries no Origin, Err when it is not allowed.
pub fn check_origin(
    h: &HeaderMap,
    loc: &PushLocation,
) -> Result<Option<HeaderValue>, OriginNotAllowed> {
    let Some(origin) = h.get(header::ORIGIN) else {
        return Ok(None);
    };
    let o = origin
        .to_str()
        .map_err(|_| OriginNotAllowed)?
        .trim_end_matches('/');
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let same_origin = host.is_some_and(|host| {
        o.split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host))
    });
    if same_origin {
        return Ok(None);
    }
    if loc
        .allow_origins
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(o))
    {
        return Ok(Some(origin.clone()));
    }
    Err(OriginNotAllowed)
}

/// The CORS headers for an allowed cross-origin subscriber.
pub fn cors_headers(origin: &HeaderValue) -> [(header::HeaderName, HeaderValue); 4] {
    [
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()),
        (
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        ),
        (
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("ETag, Crier-Resume, Location"),
        ),
        (header::VARY, HeaderValue::from_static("Origin")),
    ]
}

fn add_cors(h: &mut HeaderMap, origin: HeaderValue) {
    for (name, value) in cors_headers(&origin) {
        h.append(name, value);
    }
}

/// The methods a push location answers: WebRTC signalling adds POST and DELETE.
fn allowed_methods(loc: &PushLocation) -> &'static str {
    if loc.allows(Transport::WebRtc) {
        "GET, POST, DELETE, OPTIONS"
    } else {
        "GET, OPTIONS"
    }
}

fn preflight(cors: Option<HeaderValue>, loc: &PushLocation) -> Response<Body> {
    let mut r = Response::new(response::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    let methods = HeaderValue::from_static(allowed_methods(loc));
    h.insert(header::ALLOW, methods.clone());
    if let Some(origin) = cors {
        add_cors(h, origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "Last-Event-ID, If-None-Match, Cache-Control, Authorization, Content-Type",
            ),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    r
}

/// Records one batch handed to a subscriber connection.
pub(crate) fn record_delivery(
    sub: &Subscription,
    t: Transport,
    batch: &[Arc<crate::hub::Message>],
) {
    let Some(first) = batch.first() else { return };
    let bytes: usize = batch.iter().map(|m| m.body.len()).sum();
    let m = sub.metrics();
    m.delivered(t, batch.len() as u64, bytes as u64);
    // One observation per batch keeps the histogram off the per-message path.
    m.delivery_lag
        .observe(first.published_at.elapsed().as_secs_f64());
}
