//! Server-Sent Events: a never-ending stream of frames fed from the subscription.
//!
//! Two writers share one [`Feed`]: a hyper response body (HTTP/2, TLS, and any request hyper
//! had to parse), and a direct writer for a plain HTTP/1.1 connection whose first request is
//! an SSE subscription ([`serve_h1`]). The direct writer exists for memory: a hyper HTTP/1
//! connection keeps two 8 KiB buffers for its whole life, while an idle subscriber needs
//! almost nothing; it also writes a whole batch of frames with one `writev`.
//!
//! Either way the stream is only fed when the connection can take more, so a slow reader
//! holds at most what sits in its socket; once it falls behind the buffer its stream ends
//! (counted) and its EventSource reconnects with `Last-Event-ID`, which tells it of any gap.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::net::TcpStream;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::{encoding, record_delivery, resume_header, RESUME_HEADER};
use crate::config::PushLocation;
use crate::hub::{CloseReason, Message, Read, Subscription};
use crate::metrics::DropReason;
use crate::model::Transport;
use crate::response::{Body, BoxError, H1Framing};

/// How many buffered messages one wake-up hands to the connection at most.
const BATCH: usize = 64;
/// Reconnect delay suggested to EventSource at the start and on shutdown.
const RETRY: &[u8] = b"retry: 2000\n\n";
const KEEPALIVE: &[u8] = b":\n\n";
const LAGGED: &[u8] = b": fell behind the buffer; reconnect\n\n";

/// Builds the SSE frame of a message: `id:`, optional `event:`, one `data:` line per body
/// line. Called once per message (cached in the message), never once per subscriber.
pub fn encode_sse_frame(m: &Message) -> Bytes {
    let mut b = BytesMut::with_capacity(m.body.len() + 48);
    b.put_slice(b"id: ");
    b.put_slice(m.id.to_string().as_bytes());
    b.put_u8(b'\n');
    if let Some(e) = &m.event {
        b.put_slice(b"event: ");
        b.put_slice(e.as_bytes());
        b.put_u8(b'\n');
    }
    // EventSource splits lines at CRLF, LF and CR alike; split the same way so a lone CR
    // starts a new data line instead of cutting the rest of the body.
    let body = &m.body[..];
    let mut start = 0;
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'\n' || body[i] == b'\r' {
            b.put_slice(b"data: ");
            b.put_slice(&body[start..i]);
            b.put_u8(b'\n');
            if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
            start = i + 1;
        }
        i += 1;
    }
    b.put_slice(b"data: ");
    b.put_slice(&body[start..]);
    b.put_slice(b"\n\n");
    b.freeze()
}

enum Phase {
    /// Nothing sent yet: the `retry:` hint goes first.
    Start,
    Open,
    /// Send this last frame, then end the stream.
    Closing(&'static [u8]),
    Done,
}

/// Turns a subscription into SSE frames: messages (each frame shared by every subscriber),
/// keepalive comments, and the last words on lag or shutdown.
pub struct Feed {
    sub: Subscription,
    batch: Vec<Arc<Message>>,
    keepalive: Interval,
    phase: Phase,
}

impl Feed {
    pub fn new(sub: Subscription, keepalive: Duration) -> Feed {
        let mut tick = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Feed {
            sub,
            batch: Vec::new(),
            keepalive: tick,
            phase: Phase::Start,
        }
    }

    /// Waits for what to send next and appends it to `out`. Returns false when the stream is
    /// over. Cancel-safe: nothing is taken from the subscription until it returns.
    pub async fn next(&mut self, out: &mut Vec<Bytes>) -> bool {
        loop {
            match self.phase {
                Phase::Done => return false,
                Phase::Start => {
                    self.phase = Phase::Open;
                    out.push(Bytes::from_static(RETRY));
                    return true;
                }
                Phase::Closing(last) => {
                    self.phase = Phase::Done;
                    out.push(Bytes::from_static(last));
                    return true;
                }
                Phase::Open => {}
            }
            tokio::select! {
                r = self.sub.next(&mut self.batch, BATCH) => match r {
                    Read::Messages(_) => {
                        record_delivery(&self.sub, Transport::Sse, &self.batch);
                        out.extend(
                            self.batch
                                .drain(..)
                                .map(|m| m.encoded(encoding::SSE, encode_sse_frame).clone()),
                        );
                        return true;
                    }
                    Read::Empty => {}
                    Read::Lagged => {
                        self.sub.metrics().dropped(DropReason::Lagged);
                        // The client reconnects from its last id and learns of the gap.
                        self.phase = Phase::Closing(LAGGED);
                    }
                    Read::Closed(CloseReason::Deleted) => self.phase = Phase::Done,
                    Read::Closed(CloseReason::ShuttingDown) => self.phase = Phase::Closing(RETRY),
                },
                _ = self.keepalive.tick() => {
                    out.push(Bytes::from_static(KEEPALIVE));
                    return true;
                }
            }
        }
    }

    pub fn subscription(&self) -> &Subscription {
        &self.sub
    }
}

/// The SSE response through hyper: the body yields the feed's frames one by one.
pub fn respond(sub: Subscription, loc: &PushLocation) -> Response<Body> {
    let mut headers = HeaderMap::with_capacity(4);
    stream_headers(&mut headers, &sub);
    let feed = Feed::new(sub, loc.keepalive);
    let frames = stream::unfold(
        (feed, Vec::new(), 0usize),
        |(mut feed, mut pending, mut next)| async move {
            if next == pending.len() {
                pending.clear();
                next = 0;
                if !feed.next(&mut pending).await {
                    return None;
                }
            }
            let frame = pending[next].clone();
            next += 1;
            Some((Ok::<_, BoxError>(Frame::data(frame)), (feed, pending, next)))
        },
    );
    let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
    *r.headers_mut() = headers;
    r
}

/// The SSE fast path: the whole HTTP/1.1 response written straight to the socket (chunked),
/// each wake-up's frames in one chunk and one `writev`. The request head was already read.
pub async fn serve_h1(
    mut stream: TcpStream,
    sub: Subscription,
    cors: Option<HeaderValue>,
    keepalive: Duration,
) {
    let head = response_head(&sub, cors.as_ref());
    // A write that cannot finish in two keepalive intervals means a peer that stopped
    // reading; its buffer share is bounded by the socket, so let it go.
    let stall = keepalive * 2;
    let mut feed = Feed::new(sub, keepalive);
    if write_timed(&mut stream, &mut [IoSlice::new(&head)], stall).await != Wrote::All {
        return;
    }
    drop(head);
    let mut frames: Vec<Bytes> = Vec::new();
    let mut peer_buf = [0u8; 64];
    loop {
        tokio::select! {
            more = feed.next(&mut frames) => {
                if !more {
                    let _ = write_timed(&mut stream, &mut [IoSlice::new(b"0\r\n\r\n")], stall).await;
                    return;
                }
                // A peer that stops reading blocks the write: let it go once it has fallen
                // behind the buffer (lagged), or when the socket takes nothing for the stall
                // limit (a large buffer it may never fall behind).
                let wrote = tokio::select! {
                    biased;
                    w = write_chunks(&mut stream, &frames, stall) => w,
                    _ = feed.subscription().fell_behind() => {
                        feed.subscription().metrics().dropped(DropReason::Lagged);
                        return;
                    }
                };
                match wrote {
                    Wrote::All => {}
                    Wrote::Stalled => {
                        feed.subscription().metrics().dropped(DropReason::Timeout);
                        return;
                    }
                    Wrote::Closed => return,
                }
                frames.clear();
            }
            // The peer sends nothing on an SSE stream; readable means it closed (or broke
            // protocol): either way the subscription ends.
            r = stream.readable() => {
                if r.is_err() {
                    return;
                }
                match stream.try_read(&mut peer_buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    }
}

/// The headers of an SSE response, on either path.
fn stream_headers(h: &mut HeaderMap, sub: &Subscription) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(RESUME_HEADER, resume_header(sub));
}

/// The fast path's response head: the same headers, written by crier's one raw HTTP/1 writer.
fn response_head(sub: &Subscription, cors: Option<&HeaderValue>) -> Vec<u8> {
    let mut h = HeaderMap::with_capacity(8);
    stream_headers(&mut h, sub);
    if let Some(origin) = cors {
        crate::response::add_cors(&mut h, origin);
    }
    let mut out = Vec::with_capacity(384);
    crate::response::h1_head(&mut out, StatusCode::OK, &h, H1Framing::Chunked, false);
    out
}

/// Frames per chunk (and per `writev`): the slices live on the stack, so no allocation
/// happens per delivery.
const GROUP: usize = 14;

/// Writes the frames as HTTP/1.1 chunks (size line, frames, CRLF), one `writev` per group.
async fn write_chunks(stream: &mut TcpStream, frames: &[Bytes], stall: Duration) -> Wrote {
    for group in frames.chunks(GROUP) {
        let len: usize = group.iter().map(Bytes::len).sum();
        let mut size_line = [0u8; 20];
        let n = hex_line(len, &mut size_line);
        let mut slices = [IoSlice::new(&[]); GROUP + 2];
        slices[0] = IoSlice::new(&size_line[..n]);
        for (slot, f) in slices[1..].iter_mut().zip(group) {
            *slot = IoSlice::new(f);
        }
        slices[group.len() + 1] = IoSlice::new(b"\r\n");
        match write_timed(stream, &mut slices[..group.len() + 2], stall).await {
            Wrote::All => {}
            other => return other,
        }
    }
    Wrote::All
}

/// `{len:x}\r\n` into `buf`; returns its length.
fn hex_line(mut len: usize, buf: &mut [u8; 20]) -> usize {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[len & 0xf];
        len >>= 4;
        if len == 0 {
            break;
        }
    }
    let d = &digits[i..];
    buf[..d.len()].copy_from_slice(d);
    buf[d.len()..d.len() + 2].copy_from_slice(b"\r\n");
    d.len() + 2
}

/// Writes every slice, or gives up when the socket takes nothing for `stall`. Tries the
/// write first: a timer is armed only when the socket is full.
async fn write_timed(
    stream: &mut TcpStream,
    mut bufs: &mut [IoSlice<'_>],
    stall: Duration,
) -> Wrote {
    while !bufs.is_empty() {
        match stream.try_write_vectored(bufs) {
            Ok(0) => return Wrote::Closed,
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(stall, stream.writable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Wrote::Closed,
                    Err(_) => return Wrote::Stalled,
                }
            }
            Err(_) => return Wrote::Closed,
        }
    }
    Wrote::All
}

#[derive(Debug, PartialEq, Eq)]
enum Wrote {
    All,
    /// The peer took nothing for the stall limit.
    Stalled,
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::MessageId;

    fn frame(body: &'static [u8], event: Option<&str>) -> String {
        let m = Message::new(
            MessageId { ms: 5, seq: 1 },
            event.map(Into::into),
            HeaderValue::from_static("text/plain"),
            Bytes::from_static(body),
            std::time::Instant::now(),
        );
        String::from_utf8(encode_sse_frame(&m).to_vec()).expect("test setup")
    }

    #[test]
    fn splits_at_every_line_ending() {
        assert_eq!(frame(b"hi", None), "id: 5-1\ndata: hi\n\n");
        assert_eq!(
            frame(b"a\nb", Some("up")),
            "id: 5-1\nevent: up\ndata: a\ndata: b\n\n"
        );
        assert_eq!(
            frame(b"a\r\nb\rc\n", None),
            "id: 5-1\ndata: a\ndata: b\ndata: c\ndata: \n\n"
        );
        assert_eq!(frame(b"", None), "id: 5-1\ndata: \n\n");
        assert_eq!(frame(b"\r", None), "id: 5-1\ndata: \ndata: \n\n");
    }

    #[test]
    fn chunk_size_lines() {
        let mut b = [0u8; 20];
        let n = hex_line(0, &mut b);
        assert_eq!(&b[..n], b"0\r\n");
        let n = hex_line(255, &mut b);
        assert_eq!(&b[..n], b"ff\r\n");
        let n = hex_line(0x1234abcd, &mut b);
        assert_eq!(&b[..n], b"1234abcd\r\n");
    }
}
