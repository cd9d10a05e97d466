//! Long-poll: one message per response, the next after the client's position, or a wait for
//! one up to `longpoll_timeout`. A client that loops on `If-None-Match` sees every message once
//! and in order. A multiplexed request (`/live/a,b,c`) answers the next message of any of its
//! channels as a crier.json envelope, its `ETag` the compound cursor that resumes them all.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::feed::{Feed, Item, Next};
use super::{envelope, record_batch, resume_value, Position, RESUME_HEADER};
use crate::config::PushLocation;
use crate::hub::{CloseReason, MessageId};
use crate::model::Transport;
use crate::response::{self, Body};

pub async fn respond(mut feed: Feed, loc: &PushLocation, pos: &Position) -> Response<Body> {
    let mut items = Vec::with_capacity(1);
    let deadline = tokio::time::Instant::now() + loc.longpoll_timeout;
    let started_with_gap = feed.started_with_gap();
    let next = loop {
        match tokio::time::timeout_at(deadline, feed.next(&mut items, 1)).await {
            // The token expired while it waited: the next poll is checked afresh.
            Err(_) | Ok(Next::Expired) => return not_modified(&feed, pos),
            Ok(Next::Items) => {
                // A deleted channel of a multiplexed poll: the others go on.
                items.retain(|i| matches!(i, Item::Message { .. }));
                if items.is_empty() {
                    continue;
                }
                break Next::Items;
            }
            Ok(other) => break other,
        }
    };
    match next {
        Next::Items => {
            record_batch(&feed, &items);
            let Item::Message { msg, chan, gap } = items.swap_remove(0) else {
                return closing();
            };
            let item_gap = gap || started_with_gap;
            let mux = feed.is_multiplexed();
            let (body, content_type) = if mux {
                let name = feed.name(chan);
                let b = envelope::for_subscriber(&msg, Some((name, feed.prefix_len())), gap);
                (b, HeaderValue::from_static("application/json"))
            } else {
                (msg.body.clone(), msg.content_type.clone())
            };
            // Only the first message counts: the rest are read again from the cursor. The hub
            // counts no long-poll delivery (see `AppendOutcome::count_fanout`): this is the one.
            feed.metrics()
                .delivered(Transport::LongPoll, 1, msg.body.len() as u64);
            feed.delivered(&Item::Message {
                msg: msg.clone(),
                chan,
                gap,
            });
            let mut r = Response::new(response::full(body));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, content_type);
            h.insert(header::ETAG, etag_of(&feed, Some(msg.id)));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert(RESUME_HEADER, resume_value(item_gap));
            if let Some(e) = &msg.event {
                if let Ok(v) = HeaderValue::from_str(e) {
                    h.insert("crier-event", v);
                }
            }
            r
        }
        Next::Closed(CloseReason::Deleted) => response::text(StatusCode::GONE, "channel deleted"),
        // Falling behind within one poll (`on_lag = "disconnect"`): try again from the cursor.
        Next::Lagged | Next::Closed(CloseReason::ShuttingDown) | Next::Expired => closing(),
    }
}

/// 503 with `Retry-After`: the server is going (or the poll must start again).
fn closing() -> Response<Body> {
    let mut r = response::text(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Nothing new within the timeout: 304 with the ETag to poll from next.
fn not_modified(feed: &Feed, pos: &Position) -> Response<Body> {
    let id = match pos {
        Position::After(id) => Some(*id),
        // No position named: continue after what existed when we gave up (nothing newer
        // arrived, or we would have answered with it).
        _ => None,
    };
    let mut r = Response::new(response::empty());
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    let h = r.headers_mut();
    h.insert(header::ETAG, etag_of(feed, id));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `"<id>"` for one channel (`id`, else the channel's head), `"<cursor>"` for several.
fn etag_of(feed: &Feed, id: Option<MessageId>) -> HeaderValue {
    let mut v = Vec::with_capacity(32);
    v.push(b'"');
    if feed.is_multiplexed() {
        feed.write_cursor(&mut v);
    } else {
        use std::io::Write;
        let id = id.unwrap_or_else(|| {
            feed.single()
                .map_or(MessageId::ZERO, |s| s.channel().head_id())
        });
        let _ = write!(v, "{id}");
    }
    v.push(b'"');
    HeaderValue::from_bytes(&v).unwrap_or(HeaderValue::from_static("\"0-0\""))
}
