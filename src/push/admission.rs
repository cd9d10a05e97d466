//! One subscriber admission pipeline, for every way a subscription starts (SSE through hyper
//! or the fast path, WebSocket, long-poll, WebRTC, the Web Push API): the request is read once
//! into what it asks for, then checked in order — Origin → transport → auth → position — by
//! the push location that **owns the channel** (see `locations`), not the one whose path
//! happened to match. The Origin check comes first, so a cross-site page never makes crier
//! send the victim's cookies to the app's auth endpoint.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::locations::Locations;
use crate::auth::{Action, Ask, Denial, Gatekeeper};
use crate::config::{FirstMessage, PushLocation};
use crate::hub::{HubError, MessageId, Start};
use crate::model::{ChannelName, ConnInfo, Transport};
use crate::proxy::header_has_token;
use crate::response::{self, Body};

/// What the pipeline needs from the server: the config's locations and checks, and the
/// connection. Cheap to clone (a crier.json WebSocket keeps one for its later `subscribe`s).
#[derive(Clone)]
pub struct Admission {
    pub locations: Arc<Locations>,
    pub gatekeeper: Arc<Gatekeeper>,
    pub conn: ConnInfo,
}

/// What the pipeline reads of a request: the same whether hyper parsed it or the fast path.
#[derive(Clone, Copy)]
pub struct RequestView<'r> {
    pub method: &'r Method,
    /// Path and query, as sent.
    pub target: &'r str,
    pub headers: &'r HeaderMap,
}

impl<'r> RequestView<'r> {
    /// The view of a request hyper parsed.
    pub fn of<B>(req: &'r http::Request<B>) -> RequestView<'r> {
        RequestView {
            method: req.method(),
            target: req.uri().path_and_query().map_or("/", |p| p.as_str()),
            headers: req.headers(),
        }
    }

    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
}

/// A subscription the pipeline let through: what to subscribe to and from where, and the CORS
/// headers its response needs.
#[derive(Debug)]
pub struct Admitted {
    pub transport: Transport,
    /// One channel, or the several of a multiplexed request, in the order named.
    pub channels: Vec<ChannelName>,
    pub position: Position,
    /// Where each channel starts.
    pub starts: Vec<Start>,
    /// Some(origin) for an allowed cross-origin page.
    pub cors: Option<HeaderValue>,
    /// When the permission ends (the earliest JWT `exp` plus leeway): the stream ends then.
    pub expires: Option<std::time::SystemTime>,
}

/// Where the client says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Nothing named: the location's `first_message` decides.
    Unnamed,
    /// `last_event_id=earliest`: the whole buffer.
    Earliest,
    After(MessageId),
    /// A multiplexed stream's compound cursor: one id per channel, in the order named.
    Cursor(Vec<MessageId>),
}

impl Position {
    /// Where each of `n` channels starts.
    pub fn starts(&self, loc: &PushLocation, n: usize) -> Result<Vec<Start>, String> {
        let unnamed = match loc.first_message {
            FirstMessage::Newest => Start::Newest,
            FirstMessage::Oldest => Start::Oldest,
        };
        match self {
            Position::Unnamed => Ok(vec![unnamed; n]),
            Position::Earliest => Ok(vec![Start::Oldest; n]),
            Position::After(id) if n == 1 => Ok(vec![Start::After(*id)]),
            Position::After(_) => Err(format!(
                "a stream of {n} channels resumes from its cursor (one id per channel, comma-separated), not from one id"
            )),
            Position::Cursor(ids) if ids.len() == n && n > 1 => {
                Ok(ids.iter().map(|id| Start::After(*id)).collect())
            }
            Position::Cursor(ids) => Err(format!(
                "the cursor holds {} positions for {n} channel(s)",
                ids.len()
            )),
        }
    }
}

/// Why a subscription does not start; each becomes one HTTP answer.
#[derive(Debug)]
pub enum Refusal {
    /// The page's Origin is not allowed by the channel's location (403).
    Origin,
    /// A method the location does not answer (405), with its `Allow`.
    Method(&'static str),
    /// The transport is not enabled at this location.
    NotEnabled(Transport),
    /// Malformed position (400).
    BadRequest(String),
    /// JWT or forward auth said no (or could not say: 503).
    Denied(Denial),
}

impl Refusal {
    /// The one-line reason (what a crier.json error frame says).
    pub fn reason(&self) -> String {
        match self {
            Refusal::Origin => "origin not allowed".into(),
            Refusal::Method(allow) => format!("method not allowed (allowed: {allow})"),
            Refusal::NotEnabled(t) => format!("{} is not enabled at this location", t.as_str()),
            Refusal::BadRequest(e) => e.clone(),
            Refusal::Denied(d) => {
                let body = String::from_utf8_lossy(&d.body);
                let line = body.lines().next().unwrap_or("").trim();
                match line {
                    "" => d.status.canonical_reason().unwrap_or("denied").to_string(),
                    l => format!(
                        "{}: {}",
                        d.status.as_u16(),
                        l.chars().take(200).collect::<String>()
                    ),
                }
            }
        }
    }

    pub fn into_response(self, cors: Option<&HeaderValue>) -> Response<Body> {
        let mut r = match self {
            Refusal::Origin => response::text(StatusCode::FORBIDDEN, "origin not allowed"),
            Refusal::Method(allow) => response::method_not_allowed(allow, false),
            Refusal::NotEnabled(Transport::WebSocket) => response::text(
                StatusCode::BAD_REQUEST,
                "websocket is not enabled at this location",
            ),
            Refusal::NotEnabled(t) => response::text(
                StatusCode::NOT_ACCEPTABLE,
                &format!("{} is not enabled at this location", t.as_str()),
            ),
            Refusal::BadRequest(e) => response::text(StatusCode::BAD_REQUEST, &e),
            Refusal::Denied(d) => return d.into_response(cors),
        };
        if let Some(origin) = cors {
            response::add_cors(r.headers_mut(), origin);
        }
        r
    }
}

/// A hub refusal as push locations answer it (plain text; 503 says when to come back).
pub fn hub_error(e: HubError) -> Response<Body> {
    let mut r = response::text(e.status(), &e.to_string());
    if e.status() == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

impl Admission {
    /// The location whose checks apply to `channel`: its owner, else (a channel no prefix
    /// fits, which a path of `loc` cannot name) `loc` itself.
    pub fn owner<'l>(&'l self, channel: &str, loc: &'l Arc<PushLocation>) -> &'l Arc<PushLocation> {
        self.locations.owner(channel).unwrap_or(loc)
    }

    /// The whole pipeline for a request at push location `loc` naming `channels`: each
    /// channel is checked by its owner (Origin, then JWT and forward auth).
    pub async fn admit(
        &self,
        loc: &Arc<PushLocation>,
        channels: Vec<ChannelName>,
        req: RequestView<'_>,
    ) -> Result<Admitted, (Refusal, Option<HeaderValue>)> {
        let mut cors = None;
        for c in &channels {
            match check_origin(req.headers, self.owner(c, loc)) {
                Ok(Some(o)) => cors = Some(o),
                Ok(None) => {}
                Err(_) => return Err((Refusal::Origin, None)),
            }
        }
        let fail = |r: Refusal| (r, cors.clone());
        let transport = transport(loc, req).map_err(fail)?;
        let mut expires = None;
        for c in &channels {
            let until = self
                .authorize(self.owner(c, loc), c, req)
                .await
                .map_err(fail)?;
            expires = expires.into_iter().chain(until).min();
        }
        let position = position(req.query(), req.headers, transport)
            .map_err(|e| fail(Refusal::BadRequest(e)))?;
        let starts = position
            .starts(loc, channels.len())
            .map_err(|e| fail(Refusal::BadRequest(e)))?;
        Ok(Admitted {
            transport,
            starts,
            position,
            channels,
            cors,
            expires,
        })
    }

    /// The auth checks of `owner` (JWT, forward auth) for a request that passed its Origin
    /// check: what a subscription to `channel` needs, whatever asks for one. Ok holds when
    /// the permission ends, if it does (a JWT's expiry).
    pub async fn authorize(
        &self,
        owner: &PushLocation,
        channel: &ChannelName,
        req: RequestView<'_>,
    ) -> Result<Option<std::time::SystemTime>, Refusal> {
        self.authorize_for(owner, channel, Action::Subscribe, req)
            .await
    }

    /// The same checks for `action`: `Publish` for a WebSocket client's message (the JWT's
    /// `crier.publish`, forward auth asked with `X-Crier-Action: publish`).
    pub async fn authorize_for(
        &self,
        owner: &PushLocation,
        channel: &ChannelName,
        action: Action,
        req: RequestView<'_>,
    ) -> Result<Option<std::time::SystemTime>, Refusal> {
        if !Gatekeeper::guards(owner) {
            return Ok(None);
        }
        let ask = Ask {
            action,
            headers: req.headers,
            target: req.target,
            query: req.query(),
            conn: &self.conn,
        };
        // Boxed: the check's future (an upstream request) is not kept in the state of every
        // request's future, long-polls waiting for a message included.
        Box::pin(self.gatekeeper.check(owner, channel, &ask))
            .await
            .map_err(Refusal::Denied)
    }
}

/// The transport a request asks for: `Upgrade: websocket` → WebSocket, `POST` (an SDP offer)
/// → WebRTC where enabled, `Accept: text/event-stream` → SSE, else long-poll.
fn transport(loc: &PushLocation, req: RequestView<'_>) -> Result<Transport, Refusal> {
    let t = if is_websocket_upgrade(req.headers) {
        Transport::WebSocket
    } else if loc.allows(Transport::WebRtc) && req.method == Method::POST {
        Transport::WebRtc
    } else if req.method != Method::GET && req.method != Method::HEAD {
        return Err(Refusal::Method(allowed_methods(loc)));
    } else if accepts_event_stream(req.headers) {
        Transport::Sse
    } else {
        Transport::LongPoll
    };
    if !loc.allows(t) {
        return Err(Refusal::NotEnabled(t));
    }
    Ok(t)
}

/// A WebSocket handshake asks `Upgrade: websocket` with `Connection: upgrade` (RFC 6455 §4.1);
/// hyper-tungstenite checks the rest (method, key, version) when it answers.
fn is_websocket_upgrade(h: &HeaderMap) -> bool {
    header_has_token(h, &header::CONNECTION, "upgrade")
        && header_has_token(h, &header::UPGRADE, "websocket")
}

/// The methods a push location answers: WebRTC signalling adds POST and DELETE.
pub fn allowed_methods(loc: &PushLocation) -> &'static str {
    if loc.allows(Transport::WebRtc) {
        "GET, POST, DELETE, OPTIONS"
    } else {
        "GET, OPTIONS"
    }
}

pub fn accepts_event_stream(h: &HeaderMap) -> bool {
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
pub(crate) fn position(
    query: Option<&str>,
    h: &HeaderMap,
    t: Transport,
) -> Result<Position, String> {
    if let Some(v) = crate::query::param(query, "last_event_id") {
        return parse_position(&v);
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

pub(crate) fn parse_position(v: &str) -> Result<Position, String> {
    match v {
        "" => Ok(Position::Unnamed),
        "earliest" => Ok(Position::Earliest),
        cursor if cursor.contains(',') => cursor
            .split(',')
            .map(|id| id.trim().parse::<MessageId>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map(Position::Cursor),
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
