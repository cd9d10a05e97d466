//! The publish API (`POST/PUT/GET/DELETE /pub/{channel}`), served on the Unix socket and on
//! loopback TCP, never on the public listeners.

use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::EVENT_HEADER;
use crate::hub::{Hub, HubError, NewMessage};
use crate::keys::PublishToken;
use crate::metrics::{AuthMethod, AuthResult, PublishRejection};
use crate::model::ChannelName;
use crate::response::{self, Body};

/// Serves one publish API request. `token`: the bearer token this listener requires (TCP with
/// `publish.token_file`); None for the Unix socket, whose file permissions guard it.
pub async fn handle(
    hub: &Hub,
    max_message_size: usize,
    token: Option<&PublishToken>,
    req: Request<Incoming>,
    webpush: Option<&crate::webpush::WebPush>,
) -> Response<Body> {
    let publishing = matches!(*req.method(), Method::POST | Method::PUT);
    let r = answer(hub, max_message_size, token, req, webpush).await;
    if publishing && r.status() != StatusCode::CREATED {
        hub.metrics()
            .publish_rejected(PublishRejection::of_status(r.status()));
    }
    r
}

async fn answer(
    hub: &Hub,
    max_message_size: usize,
    token: Option<&PublishToken>,
    req: Request<Incoming>,
    webpush: Option<&crate::webpush::WebPush>,
) -> Response<Body> {
    let started = Instant::now();
    if let Some(token) = token {
        if !token.authorizes(req.headers()) {
            hub.metrics()
                .auth_check(AuthMethod::PublishToken, AuthResult::Deny);
            let mut r = response::json_error(
                StatusCode::UNAUTHORIZED,
                "publishing over TCP needs Authorization: Bearer <the publish.token_file token>",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"crier-publish\""),
            );
            return r;
        }
        hub.metrics()
            .auth_check(AuthMethod::PublishToken, AuthResult::Allow);
    }
    let Some(channel) = req.uri().path().strip_prefix("/pub/") else {
        return response::json_error(
            StatusCode::NOT_FOUND,
            "not found; the publish API is /pub/{channel}",
        );
    };
    let channel = match ChannelName::new(channel) {
        Ok(c) => c,
        Err(e) => return response::json_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match *req.method() {
        Method::POST | Method::PUT => {
            let r = publish(hub, &channel, max_message_size, req).await;
            hub.metrics()
                .publish_duration
                .observe(started.elapsed().as_secs_f64());
            r
        }
        Method::GET | Method::HEAD => {
            let push_subs = webpush.map(|wp| wp.subscribers(&channel));
            match hub.stats(&channel).await {
                Err(e) => hub_error(e),
                // A channel with Web Push subscribers exists for its publisher, even before
                // its first message and with no one connected.
                Ok(None) if push_subs.unwrap_or(0) == 0 => {
                    response::json_error(StatusCode::NOT_FOUND, "no such channel")
                }
                Ok(s) => {
                    let mut v = match s {
                        Some(s) => serde_json::json!({
                            "channel": s.channel,
                            "subscribers": s.subscribers,
                            "buffered": s.buffered,
                            "last_id": s.last_id,
                            "published": s.published,
                        }),
                        None => serde_json::json!({
                            "channel": channel,
                            "subscribers": 0,
                            "buffered": 0,
                            "last_id": null,
                            "published": 0,
                        }),
                    };
                    if let Some(n) = push_subs {
                        v["webpush_subscribers"] = n.into();
                    }
                    response::json(StatusCode::OK, &v)
                }
            }
        }
        Method::DELETE => match hub.delete(&channel).await {
            Ok(()) => response::json(
                StatusCode::OK,
                &serde_json::json!({ "channel": channel, "deleted": true }),
            ),
            Err(e) => hub_error(e),
        },
        _ => response::method_not_allowed("GET, POST, PUT, DELETE", true),
    }
}

async fn publish(
    hub: &Hub,
    channel: &ChannelName,
    max: usize,
    req: Request<Incoming>,
) -> Response<Body> {
    let too_big = || {
        let mut r = response::json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("message larger than channels.max_message_size ({max} bytes)"),
        );
        // The rest of the body stays unread, so the connection cannot carry another request:
        // say so, or a keep-alive client sends its next request into a closing socket.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    let event = match event_name(&req) {
        Ok(e) => e,
        Err(e) => return response::json_error(StatusCode::BAD_REQUEST, e),
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("text/plain"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_big();
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_big(),
        Err(e) => {
            return response::json_error(
                StatusCode::BAD_REQUEST,
                &format!("reading the body failed: {e}"),
            )
        }
    };
    let msg = NewMessage {
        event,
        content_type,
        body,
        headers: parts.headers,
    };
    match hub.publish(channel, msg).await {
        Ok(receipt) => response::json(StatusCode::CREATED, &receipt),
        Err(e) => hub_error(e),
    }
}

/// `Crier-Event` header or `?event=`: 1 to 64 characters of `A-Z a-z 0-9 . _ - :`.
fn event_name(req: &Request<Incoming>) -> Result<Option<Box<str>>, &'static str> {
    let from_query = crate::query::param(req.uri().query(), "event");
    let name = match (req.headers().get(EVENT_HEADER), &from_query) {
        (Some(h), _) => h.to_str().map_err(|_| "bad Crier-Event header")?,
        (None, Some(q)) => q.as_ref(),
        (None, None) => return Ok(None),
    };
    if !crate::model::is_event_name(name) {
        return Err("event name: 1 to 64 characters of A-Z a-z 0-9 . _ - :");
    }
    Ok(Some(name.into()))
}

/// A hub refusal as the JSON APIs answer it (publish API, webhook ingress); a 503 says
/// when to try again.
pub fn hub_error(e: HubError) -> Response<Body> {
    let mut r = response::json_error(e.status(), &e.to_string());
    if e.status() == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}
