//! Server-Sent Events: a never-ending stream of frames fed from the subscription.
//!
//! Two writers share one [`EventStream`]: a hyper response body (HTTP/2, TLS, and any request
//! hyper had to parse), and a direct writer for a plain HTTP/1.1 connection whose first request
//! is an SSE subscription ([`serve_h1`]). The direct writer exists for memory: a hyper HTTP/1
//! connection keeps two 8 KiB buffers for its whole life, while an idle subscriber needs
//! almost nothing; it also writes a whole batch of frames with one `writev`.
//!
//! Either way the stream is only fed when the connection can take more, so a slow reader
//! holds at most what sits in its socket. One that falls behind the buffer is moved to the
//! oldest buffered message and told with an `event: crier.gap` (`on_lag = "skip"`, the
//! default), or its stream ends and its EventSource reconnects with `Last-Event-ID`
//! (`"disconnect"`). A multiplexed stream (`/live/a,b,c`) sends crier.json envelopes that name
//! their channel, each event's `id:` the compound cursor that resumes every channel.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::net::TcpStream;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::feed::{Feed, Item, Next};
use super::{encoding, envelope, record_batch, RESUME_HEADER};
use crate::config::{OnLag, PushLocation};
use crate::hub::{CloseReason, Message};
use crate::metrics::DropReason;
use crate::response::{Body, BoxError, H1Framing};

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

/// Turns a feed into SSE frames: messages (each frame shared by every subscriber of a
/// channel; a multiplexed stream adds its own `id:` line), gap notices, keepalive comments,
/// and the last words on lag or shutdown.
pub struct EventStream {
    feed: Feed,
    items: Vec<Item>,
    keepalive: Interval,
    phase: Phase,
}

impl EventStream {
    pub fn new(feed: Feed, keepalive: Duration) -> EventStream {
        let mut tick = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        EventStream {
            feed,
            items: Vec::new(),
            keepalive: tick,
            phase: Phase::Start,
        }
    }

    /// Waits for what to send next and appends it to `out`. Returns false when the stream is
    /// over. Cancel-safe: nothing is taken from the feed until it returns.
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
                r = self.feed.next(&mut self.items, super::feed::BATCH) => match r {
                    Next::Items => {
                        self.encode(out);
                        return true;
                    }
                    // The client reconnects from its last id and learns of the gap.
                    Next::Lagged => self.phase = Phase::Closing(LAGGED),
                    Next::Closed(CloseReason::Deleted) => self.phase = Phase::Done,
                    Next::Closed(CloseReason::ShuttingDown) => self.phase = Phase::Closing(RETRY),
                    // The EventSource reconnects (after `retry:`); the app gives it a new token.
                    Next::Expired => {
                        self.feed.metrics().dropped(DropReason::Expired);
                        self.phase = Phase::Closing(RETRY);
                    }
                },
                _ = self.keepalive.tick() => {
                    out.push(Bytes::from_static(KEEPALIVE));
                    return true;
                }
            }
        }
    }

    /// The frames of the items taken: shared frames where every subscriber gets the same
    /// bytes; what is this subscriber's own (gap notices, a multiplexed stream's cursors) is
    /// written into one buffer per batch and split, so a batch allocates once.
    fn encode(&mut self, out: &mut Vec<Bytes>) {
        record_batch(&self.feed, &self.items);
        let mux = self.feed.is_multiplexed();
        let mut own = BytesMut::new();
        let mut items = std::mem::take(&mut self.items);
        for item in items.drain(..) {
            match &item {
                Item::Message { msg, chan, gap } => {
                    if *gap {
                        write_gap(&mut own, self.feed.name(*chan), msg);
                        out.push(own.split().freeze());
                    }
                    self.feed.delivered(&item);
                    let name = self.feed.name(*chan);
                    if mux {
                        own.put_slice(b"id: ");
                        let mut cursor = Vec::with_capacity(24 * self.feed.len());
                        self.feed.write_cursor(&mut cursor);
                        own.put_slice(&cursor);
                        own.put_u8(b'\n');
                        out.push(own.split().freeze());
                        let key = self.feed.prefix_len();
                        out.push(envelope::sse_data(msg, name, key, false));
                    } else {
                        out.push(msg.encoded(encoding::SSE, encode_sse_frame).clone());
                    }
                }
                Item::Ended(chan) => {
                    own.put_slice(b"event: crier.deleted\ndata: ");
                    own.put_slice(
                        &serde_json::to_vec(
                            &serde_json::json!({ "channel": self.feed.name(*chan) }),
                        )
                        .unwrap_or_default(),
                    );
                    own.put_slice(b"\n\n");
                    out.push(own.split().freeze());
                }
            }
        }
        super::feed::release(&mut items);
        self.items = items;
    }

    pub fn feed(&self) -> &Feed {
        &self.feed
    }
}

/// `event: crier.gap` with `{"channel", "next"}`: the first id the client gets now. It carries
/// no `id:` line, so the EventSource's last id (its resume position) does not move.
fn write_gap(own: &mut BytesMut, channel: &str, next: &Message) {
    own.put_slice(b"event: crier.gap\ndata: ");
    own.put_slice(
        &serde_json::to_vec(
            &serde_json::json!({ "channel": channel, "next": next.id.to_string() }),
        )
        .unwrap_or_default(),
    );
    own.put_slice(b"\n\n");
}

/// The SSE response through hyper: the body yields the stream's frames one by one.
///
/// A reader that stops reading gets the fast path's rule here too: hyper stops asking the
/// body for frames while the connection takes nothing, so a small task watches the body and
/// closes the connection (`conn_stop`) when a frame has waited for two keepalive intervals.
pub fn respond(feed: Feed, loc: &PushLocation, conn_stop: &CancellationToken) -> Response<Body> {
    let mut headers = HeaderMap::with_capacity(4);
    stream_headers(&mut headers, &feed);
    let stall = loc.keepalive * 2;
    let progress = Arc::new(Progress::new());
    tokio::spawn(watch_stall(
        Arc::downgrade(&progress),
        stall,
        conn_stop.clone(),
        feed.metrics_handle(),
    ));
    let events = EventStream::new(feed, loc.keepalive);
    let frames = stream::unfold(
        (events, Vec::new(), 0usize, progress),
        |(mut events, mut pending, mut next, progress)| async move {
            if next == pending.len() {
                super::feed::release(&mut pending);
                next = 0;
                // Waiting for the feed, not for the reader.
                progress.waiting(true);
                let more = events.next(&mut pending).await;
                progress.waiting(false);
                if !more {
                    return None;
                }
            }
            let frame = pending[next].clone();
            next += 1;
            progress.handed();
            Some((
                Ok::<_, BoxError>(Frame::data(frame)),
                (events, pending, next, progress),
            ))
        },
    );
    let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
    *r.headers_mut() = headers;
    r
}

/// When the body last handed hyper a frame, and whether it is waiting for the feed (then a
/// quiet stream is not a stalled reader).
struct Progress {
    start: Instant,
    /// Milliseconds after `start`.
    handed_ms: AtomicU64,
    waiting: AtomicBool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: Instant::now(),
            handed_ms: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        }
    }

    fn handed(&self) {
        self.handed_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn waiting(&self, w: bool) {
        self.waiting.store(w, Ordering::Relaxed);
        if w {
            self.handed();
        }
    }
}

/// Closes the connection once the body has had a frame for hyper that hyper did not take
/// for `stall`; ends with the body.
async fn watch_stall(
    progress: Weak<Progress>,
    stall: Duration,
    stop: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(stall / 2) => {}
            _ = stop.cancelled() => return,
        }
        let Some(p) = progress.upgrade() else { return };
        let quiet = (p.start.elapsed().as_millis() as u64)
            .saturating_sub(p.handed_ms.load(Ordering::Relaxed));
        if !p.waiting.load(Ordering::Relaxed) && quiet >= stall.as_millis() as u64 {
            tracing::debug!("an SSE reader took nothing for {stall:?}; closing its connection");
            metrics.dropped(DropReason::Timeout);
            stop.cancel();
            return;
        }
    }
}

/// The SSE fast path: the whole HTTP/1.1 response written straight to the socket (chunked),
/// each wake-up's frames in one chunk and one `writev`. The request head was already read.
///
/// Not an `async fn`: an async fn keeps each argument twice in its future (the argument and
/// the local it is moved into, rust-lang/rust#62958), and an idle subscriber holds this
/// future for its whole life. The async block below uses what it captures in place.
pub fn serve_h1(
    mut stream: TcpStream,
    feed: Feed,
    cors: Option<HeaderValue>,
    keepalive: Duration,
) -> impl std::future::Future<Output = ()> + Send {
    let head = response_head(&feed, cors.as_ref());
    drop(cors);
    // A write that cannot finish in two keepalive intervals means a peer that stopped
    // reading; its buffer share is bounded by the socket, so let it go.
    let stall = keepalive * 2;
    let disconnect_on_lag = feed.on_lag() == OnLag::Disconnect;
    let mut events = EventStream::new(feed, keepalive);
    async move {
        if write_timed(&mut stream, &mut [IoSlice::new(&head)], stall).await != Wrote::All {
            return;
        }
        drop(head);
        let mut frames: Vec<Bytes> = Vec::new();
        loop {
            // The select only says what woke the task; the write comes after it. The task's
            // future is then as large as the larger of the two, not their sum: every idle
            // subscriber holds it for its whole life (benches/sizing.sh).
            let more = tokio::select! {
                more = events.next(&mut frames) => more,
                // The peer sends nothing on an SSE stream; readable means it closed (or broke
                // protocol): either way the subscription ends.
                r = stream.readable() => {
                    if r.is_err() || peer_closed(&stream) {
                        return;
                    }
                    continue;
                }
            };
            if !more {
                let _ = write_timed(&mut stream, &mut [IoSlice::new(b"0\r\n\r\n")], stall).await;
                return;
            }
            // A peer that stops reading blocks the write: it is let go when the socket takes
            // nothing for the stall limit; under `on_lag = "disconnect"` already once it has
            // fallen behind the buffer. (Skipping, it catches up with a gap notice once the
            // socket moves again.)
            let wrote = tokio::select! {
                biased;
                w = write_chunks(&mut stream, &frames, stall) => w,
                _ = events.feed().fell_behind(), if disconnect_on_lag => {
                    events.feed().metrics().dropped(DropReason::Lagged);
                    return;
                }
            };
            match wrote {
                Wrote::All => {}
                Wrote::Stalled => {
                    events.feed().metrics().dropped(DropReason::Timeout);
                    return;
                }
                Wrote::Closed => return,
            }
            super::feed::release(&mut frames);
        }
    }
}

/// The socket of an SSE stream is readable: true when the peer closed it (or it broke);
/// anything the peer sent is read and ignored.
fn peer_closed(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match stream.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// The headers of an SSE response, on either path.
fn stream_headers(h: &mut HeaderMap, feed: &Feed) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(RESUME_HEADER, super::resume_value(feed.started_with_gap()));
}

/// The fast path's response head: the same headers, written by crier's one raw HTTP/1 writer.
fn response_head(feed: &Feed, cors: Option<&HeaderValue>) -> Vec<u8> {
    let mut h = HeaderMap::with_capacity(8);
    stream_headers(&mut h, feed);
    if let Some(origin) = cors {
        crate::response::add_cors(&mut h, origin);
    }
    let mut out = Vec::with_capacity(384);
    crate::response::h1_head(&mut out, StatusCode::OK, &h, H1Framing::Chunked, false);
    out
}

/// Frames a wake-up usually brings fit in a slice list on the stack (no allocation per
/// delivery); a larger batch (a subscriber catching up) builds its list once, on the heap.
const STACK_FRAMES: usize = 14;
/// Most slices one `writev` takes (IOV_MAX on Linux).
const MAX_IOV: usize = 1024;

/// Writes the frames as one HTTP/1.1 chunk (size line, frames, CRLF) per `writev`: a batch
/// goes out in one system call, up to IOV_MAX slices.
async fn write_chunks(stream: &mut TcpStream, frames: &[Bytes], stall: Duration) -> Wrote {
    for group in frames.chunks(MAX_IOV - 2) {
        let len: usize = group.iter().map(Bytes::len).sum();
        let mut size_line = [0u8; 20];
        let n = hex_line(len, &mut size_line);
        let wrote = if group.len() <= STACK_FRAMES {
            let mut slices = [IoSlice::new(&[]); STACK_FRAMES + 2];
            slices[0] = IoSlice::new(&size_line[..n]);
            for (slot, f) in slices[1..].iter_mut().zip(group) {
                *slot = IoSlice::new(f);
            }
            slices[group.len() + 1] = IoSlice::new(b"\r\n");
            write_timed(stream, &mut slices[..group.len() + 2], stall).await
        } else {
            let mut slices = Vec::with_capacity(group.len() + 2);
            slices.push(IoSlice::new(&size_line[..n]));
            slices.extend(group.iter().map(|f| IoSlice::new(f)));
            slices.push(IoSlice::new(b"\r\n"));
            write_timed(stream, &mut slices, stall).await
        };
        if wrote != Wrote::All {
            return wrote;
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

    /// Every idle fast-path subscriber holds this future (inside its connection's task) for
    /// its whole life: its size is memory per subscriber. 1,776 B (debug build) before the
    /// select stopped holding the write and the arguments stopped being kept twice.
    #[test]
    fn the_idle_stream_future_stays_small() {
        fn ret<A, B, C, D, F>(_: impl Fn(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let n = ret(serve_h1);
        assert!(n <= 1400, "sse::serve_h1's future is {n} B");
    }

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
