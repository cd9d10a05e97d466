//! Subscriber transports. One URL per channel serves all of them; the request picks one:
//! `Upgrade: websocket` → WebSocket, `Accept: text/event-stream` → SSE, `POST` of an SDP
//! offer → WebRTC (`DELETE` ends that session), anything else → long-poll.
//!
//! `locations` says which push location a path names and which owns a channel; `admission`
//! turns a request into a checked subscription (Origin → transport → auth → position, by the
//! channel's owner); each transport owns its wire encoding and its loop, in its own file.

pub mod admission;
pub mod locations;
pub mod longpoll;
pub mod sse;
pub mod webrtc;
pub mod ws;

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::config::PushLocation;
use crate::hub::{Hub, Subscription};
use crate::model::{ChannelName, Transport};
use crate::response::{self, Body};
pub use admission::{Admission, Position, Refusal, RequestView};

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
    pub admission: Admission<'a>,
    /// The `[webrtc]` socket and sessions, when configured.
    pub webrtc: Option<&'a webrtc::WebRtc>,
}

/// Serves one request at a push location `loc` whose path names `channel`.
pub async fn serve(
    ctx: PushContext<'_>,
    mut req: Request<Incoming>,
    loc: &Arc<PushLocation>,
    channel: ChannelName,
) -> Response<Body> {
    ensure_host(&mut req);
    let owner = ctx.admission.owner(&channel, loc);
    // Requests that are not subscriptions: a CORS preflight, the end of a WebRTC session.
    if req.method() == Method::OPTIONS
        || (loc.allows(Transport::WebRtc) && req.method() == Method::DELETE)
    {
        let cors = match admission::check_origin(req.headers(), owner) {
            Ok(c) => c,
            Err(_) => return Refusal::Origin.into_response(None),
        };
        let mut resp = if req.method() == Method::OPTIONS {
            preflight(cors.is_some(), loc)
        } else {
            // The session id in the URL is the capability (as in WHIP): no auth round trip.
            match ctx.webrtc {
                Some(w) => webrtc::delete(w, req.uri().query(), &channel),
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
        .admit(loc, channel, RequestView::of(&req))
        .await
    {
        Ok(a) => a,
        Err((refusal, cors)) => return refusal.into_response(cors.as_ref()),
    };
    let cors = admitted.cors.clone();
    let mut resp = match admitted.transport {
        Transport::WebRtc => match ctx.webrtc {
            Some(w) => {
                webrtc::offer(
                    w,
                    ctx.hub,
                    req,
                    &admitted.channel,
                    admitted.start,
                    ctx.admission.conn.peer,
                )
                .await
            }
            // [webrtc] was added by a reload: its socket opens at the next start.
            None => response::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "webrtc is configured but its UDP socket opens only at start; restart crier",
            ),
        },
        t => {
            let sub = ctx
                .hub
                .subscribe(
                    &admitted.channel,
                    t,
                    admitted.start,
                    Some(ctx.admission.conn.peer),
                )
                .await;
            match sub {
                Err(e) => admission::hub_error(e),
                Ok(sub) => match t {
                    Transport::Sse => sse::respond(sub, loc),
                    Transport::WebSocket => ws::respond(&mut req, sub, loc, ctx.ws_tasks),
                    _ => longpoll::respond(sub, loc, admitted.position).await,
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

/// `Crier-Resume: gap` when messages after the client's position were already gone.
pub fn resume_header(sub: &Subscription) -> HeaderValue {
    HeaderValue::from_static(if sub.gap() { "gap" } else { "ok" })
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
