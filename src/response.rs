//! The response body type every handler returns, and the one place where errors become an
//! HTTP status with a one-line reason.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body: a fixed buffer, a proxied stream or a subscriber stream.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// A plain-text error: `status` and a one-line reason.
pub fn text(status: StatusCode, reason: &str) -> Response<Body> {
    let mut line = String::with_capacity(reason.len() + 1);
    line.push_str(reason);
    line.push('\n');
    let mut r = Response::new(full(line));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON answer (the publish and admin APIs).
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A JSON error `{"error": "..."}` (the publish API's error shape).
pub fn json_error(status: StatusCode, reason: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": reason }))
}

/// 405 with the `Allow` header.
pub fn method_not_allowed(allow: &'static str, as_json: bool) -> Response<Body> {
    let reason = format!("method not allowed (allowed: {allow})");
    let mut r = if as_json {
        json_error(StatusCode::METHOD_NOT_ALLOWED, &reason)
    } else {
        text(StatusCode::METHOD_NOT_ALLOWED, &reason)
    };
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}
