//! WebSocket subscribers (hyper-tungstenite). The upgraded connection lives outside hyper's
//! connection, in a task on the server's WebSocket tracker so shutdown can wait for its
//! close handshake.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use hyper_tungstenite::tungstenite::{self, Message as WsMessage, Utf8Bytes};
use hyper_tungstenite::HyperWebsocketStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::TaskTracker;

use super::{encoding, record_delivery, resume_header, RESUME_HEADER};
use crate::config::PushLocation;
use crate::hub::{CloseReason, Message, Read, Subscription};
use crate::metrics::DropReason;
use crate::model::Transport;
use crate::response::{self, Body};

/// The subprotocol whose frames carry ids: `{"id","event","data"|"data_b64"}`.
pub const JSON_PROTOCOL: &str = "crier.json";
/// Subscribers send nothing but control frames; anything bigger is refused with 1009.
pub const MAX_CLIENT_MESSAGE: usize = 16 * 1024;
const BATCH: usize = 64;
/// How long a close handshake may take before the connection is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

fn ws_config() -> WebSocketConfig {
    // Small buffers: a subscriber connection mostly idles, and subscribers send only control
    // frames. Frames of one wake-up are gathered up to 4 KiB and written together at the
    // flush after the batch (one syscall, not one per frame); the buffer a busy subscriber
    // keeps stays about that size.
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(4 << 20)
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

pub fn respond(
    req: &mut Request<Incoming>,
    sub: Subscription,
    loc: &PushLocation,
    tasks: &TaskTracker,
) -> Response<Body> {
    let json = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|p| p.trim() == JSON_PROTOCOL);
    let (resp, pending) = match hyper_tungstenite::upgrade(&mut *req, Some(ws_config())) {
        Ok(pair) => pair,
        Err(e) => {
            return response::text(
                StatusCode::BAD_REQUEST,
                &format!("bad websocket handshake: {e}"),
            )
        }
    };
    let resume = resume_header(&sub);
    let keepalive = loc.keepalive;
    tasks.spawn(async move {
        match pending.await {
            Ok(ws) => run(ws, sub, keepalive, json).await,
            Err(e) => tracing::debug!("websocket upgrade failed: {e}"),
        }
    });
    let (mut parts, _) = resp.into_parts();
    if json {
        parts.headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(JSON_PROTOCOL),
        );
    }
    parts.headers.insert(RESUME_HEADER, resume);
    Response::from_parts(parts, response::empty())
}

/// The frame for one message: text when the body is textual UTF-8, else binary; with
/// `crier.json`, the shared JSON envelope built once per message.
fn frame(m: &Message, json: bool) -> WsMessage {
    if json {
        let b = m.encoded(encoding::WS_JSON, encode_json_envelope).clone();
        // SAFETY: the envelope is serde_json output, which is always valid UTF-8.
        return WsMessage::Text(unsafe { Utf8Bytes::from_bytes_unchecked(b) });
    }
    if m.is_text {
        // SAFETY: `is_text` is set at publish only after the body was checked to be UTF-8.
        WsMessage::Text(unsafe { Utf8Bytes::from_bytes_unchecked(m.body.clone()) })
    } else {
        WsMessage::Binary(m.body.clone())
    }
}

/// `{"id":"...","event":"...","data":"..."}`; a non-UTF-8 body goes base64 in `data_b64`.
pub fn encode_json_envelope(m: &Message) -> Bytes {
    Bytes::from(serde_json::to_vec(&envelope_fields(m)).unwrap_or_default())
}

/// The fields of the crier.json envelope (WebSocket, WebRTC, Web Push): `id`, `event` when
/// the message has one, and `data`, or `data_b64` for a body that is not UTF-8.
pub fn envelope_fields(m: &Message) -> serde_json::Map<String, serde_json::Value> {
    let mut v = serde_json::Map::new();
    v.insert("id".into(), m.id.to_string().into());
    if let Some(e) = &m.event {
        v.insert("event".into(), e.to_string().into());
    }
    match std::str::from_utf8(&m.body) {
        Ok(s) => v.insert("data".into(), s.into()),
        Err(_) => v.insert(
            "data_b64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(&m.body)
                .into(),
        ),
    };
    v
}

async fn run(mut ws: HyperWebsocketStream, mut sub: Subscription, keepalive: Duration, json: bool) {
    let mut batch: Vec<Arc<Message>> = Vec::new();
    let mut ping = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let close = loop {
        tokio::select! {
            frame = ws.next() => match frame {
                None => return,
                Some(Ok(WsMessage::Close(_))) => {
                    // tungstenite queued the reply; flush it and let the peer close.
                    let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
                    return;
                }
                // Subscribers only: data frames are ignored; any frame shows the peer lives.
                Some(Ok(_)) => last_heard = Instant::now(),
                Some(Err(tungstenite::Error::Capacity(_))) => {
                    sub.metrics().dropped(DropReason::Oversized);
                    break Some((CloseCode::Size, "message too big"));
                }
                Some(Err(_)) => return,
            },
            r = sub.next(&mut batch, BATCH) => match r {
                Read::Messages(_) => {
                    record_delivery(&sub, Transport::WebSocket, &batch);
                    let write = async {
                        for m in batch.drain(..) {
                            ws.feed(frame(&m, json)).await?;
                        }
                        ws.flush().await
                    };
                    // A client that stops reading blocks the write; it must not hold its
                    // connection (and this task) forever: once it has fallen behind the
                    // buffer it is let go, as a slow reader that is not stuck would be.
                    // `biased`: the stall timer is only armed when the write does not finish
                    // at once, so the common case costs no timer.
                    tokio::select! {
                        biased;
                        r = write => if r.is_err() {
                            return;
                        },
                        _ = sub.fell_behind() => {
                            sub.metrics().dropped(DropReason::Lagged);
                            break Some((CloseCode::Again, "fell behind the buffer; reconnect"));
                        }
                        _ = tokio::time::sleep(keepalive * 2) => {
                            // Not behind yet (a large buffer), but not reading either.
                            sub.metrics().dropped(DropReason::Timeout);
                            return;
                        }
                    }
                }
                Read::Empty => {}
                Read::Lagged => {
                    sub.metrics().dropped(DropReason::Lagged);
                    break Some((CloseCode::Again, "fell behind the buffer; reconnect"));
                }
                Read::Closed(CloseReason::Deleted) => break Some((CloseCode::Normal, "channel deleted")),
                Read::Closed(CloseReason::ShuttingDown) => break Some((CloseCode::Away, "server shutting down")),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > keepalive * 2 {
                    sub.metrics().dropped(DropReason::Timeout);
                    break Some((CloseCode::Away, "no pong"));
                }
                match tokio::time::timeout(keepalive, ws.send(WsMessage::Ping(Bytes::new()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        sub.metrics().dropped(DropReason::Timeout);
                        return;
                    }
                }
            }
        }
    };
    drop(sub);
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // Send our close and wait (bounded) for the peer's, so it sees a clean close.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            if ws.close(Some(frame)).await.is_ok() {
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::MessageId;

    fn msg(ct: &'static str, body: &'static [u8]) -> Message {
        Message::new(
            MessageId { ms: 1, seq: 2 },
            Some("ev".into()),
            HeaderValue::from_static(ct),
            Bytes::from_static(body),
            std::time::Instant::now(),
        )
    }

    #[test]
    fn text_or_binary() {
        assert!(matches!(frame(&msg("text/plain", b"hi"), false), WsMessage::Text(t) if t == "hi"));
        assert!(matches!(
            frame(&msg("application/octet-stream", b"hi"), false),
            WsMessage::Binary(_)
        ));
        assert!(matches!(
            frame(&msg("text/plain", b"\xff"), false),
            WsMessage::Binary(_)
        ));
    }

    #[test]
    fn json_envelope() {
        let v: serde_json::Value =
            serde_json::from_slice(&encode_json_envelope(&msg("text/plain", b"a\nb")))
                .expect("test setup");
        assert_eq!(
            v,
            serde_json::json!({"id": "1-2", "event": "ev", "data": "a\nb"})
        );
        let v: serde_json::Value =
            serde_json::from_slice(&encode_json_envelope(&msg("x/y", b"\xff\x00")))
                .expect("test setup");
        assert_eq!(v["data_b64"], "/wA=");
    }
}
