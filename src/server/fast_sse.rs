//! The SSE fast path: a plain-TCP HTTP/1.1 connection whose first request is an SSE
//! subscription is served without hyper (`push::sse::serve_h1` writes the stream). Here: the
//! request head, parsed once from the peeked bytes; the admission pipeline every subscription
//! goes through (the same as through hyper); and the raw answer when it refuses.
//!
//! Why: a hyper HTTP/1 connection keeps two 8 KiB buffers for its whole life, while an idle
//! subscriber needs almost nothing (measured: RSS per idle SSE subscriber, benches/).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::sniff::FirstBytes;
use super::{Live, State};
use crate::config::PushLocation;
use crate::model::{ChannelName, ConnInfo, Transport};
use crate::push::admission::{accepts_event_stream, hub_error};
use crate::push::feed::Feed;
use crate::push::locations::Route;
use crate::push::open_feed;
use crate::push::{Admission, RequestView};
use crate::response::{self, Body, H1Framing};

/// An SSE subscription the fast path serves.
pub(super) struct FastSse {
    pub(super) feed: Feed,
    pub(super) cors: Option<HeaderValue>,
    pub(super) keepalive: Duration,
}

/// A complete `GET` head asking for SSE at a push location.
pub(super) struct FastSseHead {
    location: Arc<PushLocation>,
    channels: Vec<ChannelName>,
    /// Path and query, as sent.
    target: String,
    headers: HeaderMap,
    /// Bytes of the head (request line, headers, blank line).
    len: usize,
}

/// Parses a complete HTTP/1.1 `GET` head that asks a push location for SSE; None leaves the
/// connection to HTTP/1.1 (and whatever answers it there).
pub(super) fn parse_head(head: &[u8], live: &Live) -> Option<FastSseHead> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if req.method != Some(Method::GET.as_str()) || req.version != Some(1) {
        return None;
    }
    let target = req.path?;
    if !target.starts_with('/') {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let Route::Push { location, channels } = live.locations.route(path) else {
        return None;
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        // A body on a GET, or an upgrade: not a plain SSE subscription.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
        {
            return None;
        }
        map.append(name, value);
    }
    if !accepts_event_stream(&map) {
        return None;
    }
    Some(FastSseHead {
        location,
        channels,
        target: target.to_string(),
        headers: map,
        len,
    })
}

/// Runs the admission pipeline on the head while it is still unread in the socket, then
/// subscribes and consumes the head. Its answer is final here (handing the request to hyper
/// would run the checks, perhaps an upstream auth request, a second time): a refusal is
/// written on the raw socket, and the connection closed.
pub(super) async fn admit(
    stream: &mut TcpStream,
    state: &State,
    live: &Live,
    conn: &ConnInfo,
    head: FastSseHead,
    mut buf: Vec<u8>,
) -> FirstBytes {
    let admission = Admission {
        locations: live.locations.clone(),
        gatekeeper: live.gatekeeper.clone(),
        conn: *conn,
    };
    let view = RequestView {
        method: &Method::GET,
        target: &head.target,
        headers: &head.headers,
    };
    let admitted = admission
        .admit(&head.location, head.channels.clone(), view)
        .await;
    let answer = match admitted {
        Err((refusal, cors)) => refusal.into_response(cors.as_ref()),
        Ok(a) => {
            debug_assert_eq!(a.transport, Transport::Sse);
            let loc = &head.location;
            let feed = open_feed(&state.hub, loc, &a, Transport::Sse, loc.on_lag, conn.peer);
            match feed.await {
                Ok(feed) => {
                    // The head is in the socket buffer (we peeked it): consume exactly that.
                    if stream.read_exact(&mut buf[..head.len]).await.is_err() {
                        return FirstBytes::Nothing;
                    }
                    // Boxed: the feed is large next to the other answers of the sniff.
                    return FirstBytes::Sse(Box::new(FastSse {
                        feed,
                        cors: a.cors,
                        keepalive: head.location.keepalive,
                    }));
                }
                Err(e) => {
                    let mut r = hub_error(e);
                    if let Some(origin) = &a.cors {
                        response::add_cors(r.headers_mut(), origin);
                    }
                    r
                }
            }
        }
    };
    if stream.read_exact(&mut buf[..head.len]).await.is_ok() {
        write_and_close(stream, answer, live.http.header_timeout).await;
    }
    FirstBytes::Answered
}

/// Most body bytes the fast path writes in an answer of its own (refusals are small).
const MAX_RAW_BODY: usize = 16 * 1024;

/// Writes a complete HTTP/1.1 response with `Connection: close` on the raw socket, then closes
/// it; the whole write is bounded by `timeout`.
async fn write_and_close(stream: &mut TcpStream, resp: Response<Body>, timeout: Duration) {
    use http_body_util::BodyExt;
    let (parts, body) = resp.into_parts();
    // Our own small, fixed bodies (refusals, hub errors): a longer one is cut, not streamed.
    let mut body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => bytes::Bytes::new(),
    };
    body.truncate(MAX_RAW_BODY);
    let mut out = Vec::with_capacity(256 + body.len());
    response::h1_head(
        &mut out,
        parts.status,
        &parts.headers,
        H1Framing::Length(body.len()),
        true,
    );
    out.extend_from_slice(&body);
    let write = async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!("writing a fast-path answer failed: {e}");
    }
}
