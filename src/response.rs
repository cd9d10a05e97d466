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

/// The CORS headers for an allowed cross-origin page (a subscriber, the Web Push API, a
/// denial it must be able to read).
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

/// Appends the CORS headers for `origin` to `h`.
pub fn add_cors(h: &mut http::HeaderMap, origin: &HeaderValue) {
    for (name, value) in cors_headers(origin) {
        h.append(name, value);
    }
}

/// How a response crier writes itself on a raw HTTP/1.1 socket delimits its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H1Framing {
    /// A body of this many bytes follows.
    Length(usize),
    /// A stream of chunks follows (SSE).
    Chunked,
}

/// The one writer of the HTTP/1.1 responses crier writes without hyper (the SSE fast path,
/// the proxy fast path's errors, a refused connection): the status line, `headers` (any
/// framing or `connection` header among them is dropped: this function frames), `date`, the
/// framing, and `connection: close` when `close`.
pub fn h1_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &http::HeaderMap,
    framing: H1Framing,
    close: bool,
) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in headers {
        if matches!(
            name,
            &header::CONTENT_LENGTH | &header::CONNECTION | &header::TRANSFER_ENCODING
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    match framing {
        H1Framing::Length(n) => {
            let _ = write!(out, "\r\ncontent-length: {n}\r\n");
        }
        H1Framing::Chunked => out.extend_from_slice(b"\r\ntransfer-encoding: chunked\r\n"),
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A whole plain-text answer (`reason` and a newline) on a raw HTTP/1.1 socket.
pub fn h1_text(
    status: StatusCode,
    reason: &str,
    headers: &http::HeaderMap,
    close: bool,
) -> Vec<u8> {
    let mut h = headers.clone();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let mut out = Vec::with_capacity(160 + reason.len());
    h1_head(
        &mut out,
        status,
        &h,
        H1Framing::Length(reason.len() + 1),
        close,
    );
    out.extend_from_slice(reason.as_bytes());
    out.push(b'\n');
    out
}
