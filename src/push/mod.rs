//! Subscriber transports. One URL per channel serves all of them; the request picks one:
//! `Upgrade: websocket` → WebSocket, `Accept: text/event-stream` → SSE, `POST` of an SDP
//! offer → WebRTC (`DELETE` ends that session), anything else → long-poll.
//!
//! `locations` says which push location a path names and which owns a channel; `admission`
//! turns a request into a checked subscription (Origin → transport → auth → position, by the
//! channel's owner); each transport owns its wire encoding and its loop, in its own file.

pub mod admission;
pub mod envelope;
pub mod feed;
pub mod inbound;
pub mod locations;
pub mod longpoll;
pub mod relay;
pub mod sse;
pub mod webrtc;
pub mod ws;

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::config::{OnLag, PushLocation};
use crate::hub::{Hub, HubError};
use crate::model::{ChannelName, Transport};
use crate::response::{self, Body};
pub use admission::{Admission, Admitted, Position, Refusal, RequestView};
use feed::{Feed, Item};

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
    /// Closes the request's connection (an SSE reader through hyper that stopped reading).
    pub conn_stop: &'a tokio_util::sync::CancellationToken,
    pub admission: Admission,
    /// The `[webrtc]` socket and sessions, when configured.
    pub webrtc: Option<&'a webrtc::WebRtc>,
    /// Where `client_messages = "forward"` POSTs a WebSocket client's messages.
    pub relay: &'a Arc<relay::Relay>,
}

/// Serves one request at a push location `loc` whose path names `channels` (one, or the
/// several of a multiplexed request).
pub async fn serve(
    ctx: PushContext<'_>,
    mut req: Request<Incoming>,
    loc: &Arc<PushLocation>,
    channels: Vec<ChannelName>,
) -> Response<Body> {
    ensure_host(&mut req);
    // Requests that are not subscriptions: a CORS preflight, the end of a WebRTC session.
    if req.method() == Method::OPTIONS
        || (loc.allows(Transport::WebRtc) && req.method() == Method::DELETE)
    {
        let mut cors = None;
        for c in &channels {
            match admission::check_origin(req.headers(), ctx.admission.owner(c, loc)) {
                Ok(Some(o)) => cors = Some(o),
                Ok(None) => {}
                Err(_) => return Refusal::Origin.into_response(None),
            }
        }
        let mut resp = if req.method() == Method::OPTIONS {
            preflight(cors.is_some(), loc)
        } else {
            // The session id in the URL is the capability (as in WHIP): no auth round trip.
            match ctx.webrtc {
                Some(w) => webrtc::delete(w, req.uri().query(), &channels),
                None => response::text(StatusCode::NOT_FOUND, "no such WebRTC session"),
            }
        };
        if let Some(origin) = cors {
            response::add_cors(resp.headers_mut(), &origin);
        }
        return resp;
    }
    let admitted = match ctx
        .admission
        .admit(loc, channels, RequestView::of(&req))
        .await
    {
        Ok(a) => a,
        Err((refusal, cors)) => return refusal.into_response(cors.as_ref()),
    };
    let cors = admitted.cors.clone();
    let mut resp = match admitted.transport {
        Transport::WebRtc => match ctx.webrtc {
            Some(w) => {
                webrtc::offer(w, ctx.hub, req, loc, &admitted, ctx.admission.conn.peer).await
            }
            // [webrtc] was added by a reload: its socket opens at the next start.
            None => response::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "webrtc is configured but its UDP socket opens only at start; restart crier",
            ),
        },
        t => {
            let on_lag = match t {
                // One message per poll: a poll that fell behind goes on from the oldest.
                Transport::LongPoll => OnLag::Skip,
                // A plain WebSocket cannot be told of a gap in band: it is closed (1013).
                Transport::WebSocket
                    if !ws::wants_json(req.headers()) && admitted.channels.len() == 1 =>
                {
                    OnLag::Disconnect
                }
                _ => loc.on_lag,
            };
            let peer = ctx.admission.conn.peer;
            let feed = open_feed(ctx.hub, loc, &admitted, t, on_lag, peer);
            match feed.await {
                Err(e) => admission::hub_error(e),
                Ok(feed) => match t {
                    Transport::Sse => sse::respond(feed, loc, ctx.conn_stop),
                    Transport::WebSocket => {
                        let dynamic = ws::Dynamic::new(
                            &ctx.admission,
                            loc,
                            ctx.hub,
                            &req,
                            &admitted.channels,
                            ctx.relay,
                        );
                        ws::respond(&mut req, feed, loc, ctx.ws_tasks, dynamic)
                    }
                    _ => longpoll::respond(feed, loc, &admitted.position).await,
                },
            }
        }
    };
    if let Some(origin) = cors {
        response::add_cors(resp.headers_mut(), &origin);
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

/// Subscribes to every admitted channel at its start and makes the connection's feed (which
/// ends when the permission does).
pub async fn open_feed(
    hub: &Hub,
    loc: &PushLocation,
    admitted: &Admitted,
    transport: Transport,
    on_lag: OnLag,
    peer: std::net::SocketAddr,
) -> Result<Feed, HubError> {
    let mut subs = Vec::with_capacity(admitted.channels.len());
    for (c, start) in admitted.channels.iter().zip(&admitted.starts) {
        subs.push(hub.subscribe(c, transport, *start, Some(peer)).await?);
    }
    let mut feed = Feed::new(
        subs,
        transport,
        loc.channel_prefix.len(),
        on_lag,
        hub.metrics().clone(),
    );
    feed.expire_at(admitted.expires);
    if crate::access_log::on() {
        let names: Vec<&str> = admitted.channels.iter().map(|c| c.as_str()).collect();
        feed.log_access(peer, &names.join(","));
    }
    Ok(feed)
}

/// `Crier-Resume: gap` when messages after the client's position were already gone.
pub fn resume_value(gap: bool) -> HeaderValue {
    HeaderValue::from_static(if gap { "gap" } else { "ok" })
}

fn preflight(cross_origin: bool, loc: &PushLocation) -> Response<Body> {
    let mut r = Response::new(response::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h: &mut HeaderMap = r.headers_mut();
    let methods = HeaderValue::from_static(admission::allowed_methods(loc));
    h.insert(header::ALLOW, methods.clone());
    if cross_origin {
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

/// Records one batch handed to a subscriber connection: the delivery-lag histogram, one
/// observation per batch (the counters were bumped at publish).
pub(crate) fn record_batch(feed: &Feed, batch: &[Item]) {
    let first = batch.iter().find_map(|i| match i {
        Item::Message { msg, .. } => Some(msg),
        Item::Ended(_) => None,
    });
    if let Some(first) = first {
        feed.metrics()
            .delivery_lag
            .observe(first.published_at.elapsed().as_secs_f64());
    }
}
