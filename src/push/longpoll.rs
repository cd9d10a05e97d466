//! Long-poll: one message per response, the next after the client's position, or a wait for
//! one up to `longpoll_timeout`. A client that loops on `If-None-Match` sees every message once
//! and in order.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::{record_delivery, resume_header, Position, RESUME_HEADER};
use crate::config::PushLocation;
use crate::hub::{CloseReason, MessageId, Read, Subscription};
use crate::metrics::DropReason;
use crate::model::Transport;
use crate::response::{self, Body};

pub async fn respond(mut sub: Subscription, loc: &PushLocation, pos: Position) -> Response<Body> {
    let mut batch = Vec::with_capacity(1);
    let deadline = tokio::time::Instant::now() + loc.longpoll_timeout;
    let read = loop {
        match tokio::time::timeout_at(deadline, sub.next(&mut batch, 1)).await {
            Err(_) => return not_modified(&sub, pos),
            // The position fell out of the buffer while we waited: go on from the oldest
            // message still buffered, and say so (`Crier-Resume: gap`).
            Ok(Read::Lagged) => {
                sub.metrics().dropped(DropReason::Lagged);
                sub.restart_from_oldest();
            }
            Ok(r) => break r,
        }
    };
    match read {
        Read::Messages(_) => {
            record_delivery(&sub, Transport::LongPoll, &batch);
            let m = &batch[0];
            let mut r = Response::new(response::full(m.body.clone()));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, m.content_type.clone());
            h.insert(header::ETAG, etag(m.id));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert(RESUME_HEADER, resume_header(&sub));
            if let Some(e) = &m.event {
                if let Ok(v) = HeaderValue::from_str(e) {
                    h.insert("crier-event", v);
                }
            }
            r
        }
        Read::Closed(CloseReason::Deleted) => response::text(StatusCode::GONE, "channel deleted"),
        Read::Closed(CloseReason::ShuttingDown) | Read::Empty | Read::Lagged => {
            let mut r = response::text(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// Nothing new within the timeout: 304 with the ETag to poll from next.
fn not_modified(sub: &Subscription, pos: Position) -> Response<Body> {
    let id = match pos {
        Position::After(id) => id,
        // No position named: continue after what existed when we gave up (nothing newer
        // arrived, or we would have answered with it).
        Position::Unnamed | Position::Earliest => sub.channel().head_id(),
    };
    let mut r = Response::new(response::empty());
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    let h = r.headers_mut();
    h.insert(header::ETAG, etag(id));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn etag(id: MessageId) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{id}\"")).unwrap_or(HeaderValue::from_static("\"0-0\""))
}
