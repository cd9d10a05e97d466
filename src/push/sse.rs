//! Server-Sent Events: a never-ending response body fed from the subscription.
//!
//! The body is polled only when the connection can take more, so a slow reader holds at most
//! what sits in its socket; once it falls behind the buffer its stream ends (counted) and its
//! EventSource reconnects with `Last-Event-ID`, which tells it of any gap.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use http::header::{self, HeaderValue};
use http::Response;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::{encoding, record_delivery, resume_header, RESUME_HEADER};
use crate::config::{PushLocation, Transport};
use crate::hub::{CloseReason, Message, Read, Subscription};
use crate::metrics::DropReason;
use crate::response::{Body, BoxError};

/// How many buffered messages one wake-up hands to the connection at most.
const BATCH: usize = 64;
/// Reconnect delay suggested to EventSource at the start and on shutdown.
const RETRY: &[u8] = b"retry: 2000\n\n";
const KEEPALIVE: &[u8] = b":\n\n";

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
        match body[i] {
            b'\n' | b'\r' => {
                b.put_slice(b"data: ");
                b.put_slice(&body[start..i]);
                b.put_u8(b'\n');
                if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    b.put_slice(b"data: ");
    b.put_slice(&body[start..]);
    b.put_slice(b"\n\n");
    b.freeze()
}

enum Phase {
    Open,
    /// Send this last frame, then end the stream.
    Closing(&'static [u8]),
    Done,
}

struct Stream {
    sub: Subscription,
    batch: Vec<Arc<Message>>,
    next: usize,
    keepalive: Interval,
    phase: Phase,
}

pub fn respond(sub: Subscription, loc: &PushLocation) -> Response<Body> {
    let resume = resume_header(&sub);
    let mut keepalive = tokio::time::interval_at(Instant::now() + loc.keepalive, loc.keepalive);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let st = Stream {
        sub,
        batch: Vec::new(),
        next: 0,
        keepalive,
        phase: Phase::Open,
    };
    let first = stream::once(async { Ok::<_, BoxError>(Frame::data(Bytes::from_static(RETRY))) });
    let frames = stream::unfold(st, |mut st| async move {
        let data = next_frame(&mut st).await?;
        Some((Ok(Frame::data(data)), st))
    });
    let body = StreamBody::new(futures_util::StreamExt::chain(first, frames)).boxed_unsync();
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(RESUME_HEADER, resume);
    r
}

async fn next_frame(st: &mut Stream) -> Option<Bytes> {
    loop {
        match st.phase {
            Phase::Done => return None,
            Phase::Closing(last) => {
                st.phase = Phase::Done;
                return Some(Bytes::from_static(last));
            }
            Phase::Open => {}
        }
        if let Some(m) = st.batch.get(st.next) {
            st.next += 1;
            return Some(m.encoded(encoding::SSE, encode_sse_frame).clone());
        }
        st.batch.clear();
        st.next = 0;
        tokio::select! {
            r = st.sub.next(&mut st.batch, BATCH) => match r {
                Read::Messages(_) => record_delivery(&st.sub, Transport::Sse, &st.batch),
                Read::Empty => {}
                Read::Lagged => {
                    st.sub.metrics().dropped(DropReason::Lagged);
                    // The client reconnects from its last id and learns of the gap.
                    st.phase = Phase::Closing(b": fell behind the buffer; reconnect\n\n");
                }
                Read::Closed(CloseReason::Deleted) => st.phase = Phase::Done,
                Read::Closed(CloseReason::ShuttingDown) => st.phase = Phase::Closing(RETRY),
            },
            _ = st.keepalive.tick() => return Some(Bytes::from_static(KEEPALIVE)),
        }
    }
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
        String::from_utf8(encode_sse_frame(&m).to_vec()).unwrap()
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
}
