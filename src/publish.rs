//! The publish API (`POST/GET/DELETE /pub/{channel}`), served on the Unix socket and on
//! loopback TCP, never on the public listeners; and the client that `crier publish` uses.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::auth::PublishToken;
use crate::hub::{Hub, HubError, NewMessage};
use crate::metrics::{AuthMethod, AuthResult};
use crate::response::{self, Body};
use crate::router::validate_channel;

pub const EVENT_HEADER: &str = "crier-event";

/// Serves one publish API request. `token`: the bearer token this listener requires (TCP with
/// `publish.token_file`); None for the Unix socket, whose file permissions guard it.
pub async fn handle(
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
    let channel = channel.to_string();
    if let Err(e) = validate_channel(&channel) {
        return response::json_error(StatusCode::BAD_REQUEST, e);
    }
    match *req.method() {
        Method::POST | Method::PUT => {
            let r = publish(hub, &channel, max_message_size, req).await;
            hub.metrics()
                .publish_duration
                .observe(started.elapsed().as_secs_f64());
            r
        }
        Method::GET | Method::HEAD => match hub.get(&channel) {
            Some(c) => {
                let s = c.stats();
                let mut v = serde_json::json!({
                    "channel": s.channel,
                    "subscribers": s.subscribers,
                    "buffered": s.buffered,
                    "last_id": s.last_id,
                    "published": s.published,
                });
                if let Some(wp) = webpush {
                    v["webpush_subscribers"] = wp.subscribers(&channel).into();
                }
                response::json(StatusCode::OK, &v)
            }
            None => response::json_error(StatusCode::NOT_FOUND, "no such channel"),
        },
        Method::DELETE => match hub.delete(&channel) {
            Ok(()) => response::json(
                StatusCode::OK,
                &serde_json::json!({ "channel": channel, "deleted": true }),
            ),
            Err(e) => hub_error(e),
        },
        _ => response::method_not_allowed("GET, POST, PUT, DELETE", true),
    }
}

async fn publish(hub: &Hub, channel: &str, max: usize, req: Request<Incoming>) -> Response<Body> {
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
    match hub.publish(channel, msg) {
        Ok(receipt) => response::json(StatusCode::CREATED, &receipt),
        Err(e) => hub_error(e),
    }
}

/// `Crier-Event` header or `?event=`: 1 to 64 characters of `A-Z a-z 0-9 . _ - :`.
fn event_name(req: &Request<Incoming>) -> Result<Option<Box<str>>, &'static str> {
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == "event")
            .map(|(_, v)| v)
    });
    let name = match (req.headers().get(EVENT_HEADER), from_query) {
        (Some(h), _) => h.to_str().map_err(|_| "bad Crier-Event header")?,
        (None, Some(q)) => q,
        (None, None) => return Ok(None),
    };
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if !ok {
        return Err("event name: 1 to 64 characters of A-Z a-z 0-9 . _ - :");
    }
    Ok(Some(name.into()))
}

/// A hub refusal as the JSON APIs answer it (publish API, webhook ingress).
pub(crate) fn hub_error(e: HubError) -> Response<Body> {
    response::json_error(e.status(), &e.to_string())
}

// ---------------------------------------------------------------------------------------
// The `crier publish` client.

/// Where `crier publish` sends to.
pub enum Target {
    Socket(PathBuf),
    /// `http://127.0.0.1:8081`
    Url(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("{0} is not an http:// URL with host:port")]
    BadUrl(String),
    #[error("request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
}

/// Sends one request to the publish API; returns the status and the body text. `token` goes
/// in `Authorization: Bearer` (TCP with `publish.token_file`).
pub async fn client_request(
    target: &Target,
    method: Method,
    channel: &str,
    event: Option<&str>,
    token: Option<&str>,
    body: Bytes,
) -> Result<(StatusCode, String), ClientError> {
    let (io, host): (Box<dyn IoStream>, String) = match target {
        Target::Socket(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| ClientError::Connect(p.display().to_string(), e))?;
            (Box::new(s), "localhost".into())
        }
        Target::Url(u) => {
            let authority = u
                .strip_prefix("http://")
                .map(|a| a.trim_end_matches('/'))
                .filter(|a| !a.is_empty() && !a.contains('/'))
                .ok_or_else(|| ClientError::BadUrl(u.clone()))?;
            let s = tokio::net::TcpStream::connect(authority)
                .await
                .map_err(|e| ClientError::Connect(authority.to_string(), e))?;
            (Box::new(s), authority.to_string())
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(format!("/pub/{channel}"))
        .header(header::HOST, host);
    if let Some(e) = event {
        req = req.header(EVENT_HEADER, e);
    }
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status();
    let text = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}
