//! WebSocket subscribers (hyper-tungstenite). The upgraded connection lives outside hyper's
//! connection, in a task on the server's WebSocket tracker so shutdown can wait for its
//! close handshake.
//!
//! A plain WebSocket gets each message as a text or binary frame; with the `crier.json`
//! subprotocol, and on every multiplexed stream, each frame is a crier.json envelope (which
//! can say `"gap": true`). A crier.json client may also `{"subscribe": "c"}` and
//! `{"unsubscribe": "c"}`; each subscribe passes the same checks as a new connection.
//! What else a client sends (`client_messages`: publish or forward) is `inbound`'s.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_tungstenite::tungstenite::error::ProtocolError;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use hyper_tungstenite::tungstenite::{self, Message as WsMessage, Utf8Bytes};
use hyper_tungstenite::{HyperWebsocket, HyperWebsocketStream};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::TaskTracker;

use super::admission::check_origin;
use super::feed::{Feed, Item, Next};
pub use super::inbound::Dynamic;
use super::inbound::{self, ClientFrame, Inbound, Outcome, PublishCommand, ReplyTo};
use super::relay::{truncate, RelayError, Reply};
use super::{envelope, record_batch, resume_value, Position, RESUME_HEADER};
use crate::config::{ClientMessages, OnLag, PushLocation};
use crate::hub::{CloseReason, Message, MessageId, Start};
use crate::metrics::{ClientResult, DropReason, Metrics};
use crate::model::{ChannelName, Transport};
use crate::response::{self, Body};

/// The subprotocol whose frames carry ids: `{"id","event","data"|"data_b64"}`.
pub const JSON_PROTOCOL: &str = "crier.json";
/// How long a close handshake may take before the connection is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Messages one wake-up writes at most. Smaller than the SSE batch: tungstenite writes its
/// buffer every 4 KiB whatever the batch, so a larger one saves no system call, and only
/// keeps a task on its worker longer while 10,000 others wait (fanout-ws-max, 3 runs each
/// against the same base: p99 1.34x base with 256, 1.20x with 64).
const WS_BATCH: usize = 64;
/// Wake-ups in a row that take waiting messages before the client's side is looked at again.
const FEED_STREAK: u32 = 8;

/// The read buffer of a location whose clients' messages are refused: they send pongs, close
/// frames and the odd crier.json command, so a 512-byte buffer (a tenth of an idle
/// subscriber's memory, benches/sizing.sh) buys nothing. A larger frame is read in several
/// reads.
const SUBSCRIBER_READ_BUFFER: usize = 64;
/// Where clients publish or forward: several small frames per read.
const CLIENT_READ_BUFFER: usize = 512;

/// `max_client`: the location's `max_client_message`; a larger frame is refused with 1009.
/// `sends`: the location takes client messages (`client_messages` is not "refuse").
fn ws_config(max_client: usize, sends: bool) -> WebSocketConfig {
    // Small buffers: a subscriber connection mostly idles, and subscribers send small frames
    // (control frames, commands, chat lines). Frames of one wake-up are gathered up to 4 KiB
    // and written together at the flush after the batch (one syscall, not one per frame); the
    // buffer a busy subscriber keeps stays about that size.
    let read = if sends {
        CLIENT_READ_BUFFER
    } else {
        SUBSCRIBER_READ_BUFFER
    };
    WebSocketConfig::default()
        .read_buffer_size(read)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(4 << 20)
        .max_message_size(Some(max_client))
        .max_frame_size(Some(max_client))
}

/// Whether the handshake asks for the `crier.json` subprotocol.
pub fn wants_json(h: &HeaderMap) -> bool {
    h.get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|p| p.trim() == JSON_PROTOCOL)
}

impl Dynamic {
    /// Subscribes to the channel the client calls `name`: the same checks as a connection
    /// (the owner's Origin, JWT and forward auth), then the hub. Returns the channel's
    /// position (the id it starts after), or the one-line reason it was refused.
    async fn subscribe(
        &self,
        feed: &mut Feed,
        name: &str,
        last_event_id: Option<&str>,
    ) -> Result<MessageId, String> {
        let channel =
            ChannelName::with_prefix(&self.loc.channel_prefix, name).map_err(|e| e.to_string())?;
        if feed.has(name) {
            return Err("already subscribed".into());
        }
        if feed.len() >= self.loc.max_channels_per_subscription {
            return Err(format!(
                "this location takes at most {} channels per connection (max_channels_per_subscription)",
                self.loc.max_channels_per_subscription
            ));
        }
        let owner = self.admission.owner(&channel, &self.loc).clone();
        check_origin(&self.headers, &owner).map_err(|_| "origin not allowed".to_string())?;
        if let Err(refusal) = self
            .admission
            .authorize(&owner, &channel, self.view())
            .await
        {
            return Err(refusal.reason());
        }
        let start = match last_event_id {
            None | Some("") => Position::Unnamed,
            Some("earliest") => Position::Earliest,
            Some(id) => Position::After(id.parse::<MessageId>().map_err(|e| e.to_string())?),
        }
        .starts(&self.loc, 1)?
        .first()
        .copied()
        .unwrap_or(Start::Newest);
        let peer = Some(self.admission.conn.peer);
        let sub = self
            .hub
            .subscribe(&channel, Transport::WebSocket, start, peer)
            .await
            .map_err(|e| e.to_string())?;
        let after = sub.start_after();
        feed.add(sub);
        Ok(after)
    }
}

pub fn respond(
    req: &mut Request<Incoming>,
    feed: Feed,
    loc: &PushLocation,
    tasks: &TaskTracker,
    dynamic: Option<Dynamic>,
) -> Response<Body> {
    let json = wants_json(req.headers());
    let (resp, pending) = match hyper_tungstenite::upgrade(
        &mut *req,
        Some(ws_config(
            loc.max_client_message,
            loc.client_messages != ClientMessages::Refuse,
        )),
    ) {
        Ok(pair) => pair,
        Err(e) => {
            return response::text(
                StatusCode::BAD_REQUEST,
                &format!("bad websocket handshake: {e}"),
            )
        }
    };
    let resume = resume_value(feed.started_with_gap());
    let keepalive = loc.keepalive;
    // Boxed: the task keeps its arguments for its whole life, and most connections have no
    // `Dynamic` (264 B) while the upgrade (72 B) is done with at once.
    tasks.spawn(run(
        Box::new(pending),
        feed,
        keepalive,
        json,
        dynamic.map(Box::new),
    ));
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

/// The frame for one message on a plain WebSocket: text when the body is textual UTF-8,
/// else binary.
fn plain_frame(m: &Message) -> WsMessage {
    if m.is_text {
        // SAFETY: `is_text` is set at publish only after the body was checked to be UTF-8.
        WsMessage::Text(unsafe { Utf8Bytes::from_bytes_unchecked(m.body.clone()) })
    } else {
        WsMessage::Binary(m.body.clone())
    }
}

/// A crier.json frame.
fn json_frame(b: Bytes) -> WsMessage {
    // SAFETY: every crier.json frame is serde_json output, which is always valid UTF-8.
    WsMessage::Text(unsafe { Utf8Bytes::from_bytes_unchecked(b) })
}

fn json_value(v: serde_json::Value) -> WsMessage {
    json_frame(Bytes::from(serde_json::to_vec(&v).unwrap_or_default()))
}

/// The frame of one item for this connection.
fn item_frame(feed: &Feed, item: &Item, json: bool) -> WsMessage {
    match item {
        Item::Message { msg, chan, gap } => {
            if feed.is_multiplexed() {
                let name = feed.name(*chan);
                json_frame(envelope::for_subscriber(
                    msg,
                    Some((name, feed.prefix_len())),
                    *gap,
                ))
            } else if json {
                json_frame(envelope::for_subscriber(msg, None, *gap))
            } else {
                plain_frame(msg)
            }
        }
        Item::Ended(chan) => json_value(
            serde_json::json!({ "unsubscribed": feed.name(*chan), "reason": "channel deleted" }),
        ),
    }
}

/// A command a crier.json client sends.
#[derive(serde::Deserialize)]
struct Command {
    subscribe: Option<String>,
    unsubscribe: Option<String>,
    last_event_id: Option<String>,
    publish: Option<String>,
    data: Option<String>,
    data_b64: Option<String>,
    event: Option<String>,
}

impl Command {
    /// Takes a `publish` that comes with no other command.
    fn take_publish(&mut self) -> Option<PublishCommand> {
        if self.subscribe.is_some() || self.unsubscribe.is_some() {
            return None;
        }
        Some(PublishCommand {
            channel: self.publish.take()?,
            data: self.data.take(),
            data_b64: self.data_b64.take(),
            event: self.event.take(),
        })
    }
}

/// Sends a frame that answers the client (an ack, an error, the app's reply), bounded like a
/// delivery: a client that only sends and never reads is let go after two keepalive
/// intervals. False when the connection is over.
async fn answer(
    ws: &mut HyperWebsocketStream,
    m: WsMessage,
    feed: &Feed,
    keepalive: Duration,
) -> bool {
    match tokio::time::timeout(keepalive * 2, ws.send(m)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            feed.metrics().dropped(DropReason::Timeout);
            false
        }
    }
}

/// What a text or binary frame from a client that may send some asks for: a crier.json
/// command (subscribe, unsubscribe, publish) or, on a plain WebSocket, a message.
async fn take_frame(d: &Dynamic, inbound: &mut Inbound, feed: &mut Feed, m: WsMessage) -> Outcome {
    match m {
        WsMessage::Text(t) if d.json => {
            let mut cmd = serde_json::from_str::<Command>(t.as_str()).ok();
            match cmd.as_mut().and_then(Command::take_publish) {
                Some(p) => inbound::publish(d, inbound, feed, p).await,
                None => Outcome::Answer(command(d, feed, cmd).await),
            }
        }
        // crier.json commands are text; a binary frame only shows the peer lives.
        WsMessage::Binary(_) if d.json => Outcome::Quiet,
        WsMessage::Text(t) => inbound::plain(d, inbound, feed, ClientFrame::Text(t.into())).await,
        WsMessage::Binary(b) => inbound::plain(d, inbound, feed, ClientFrame::Binary(b)).await,
        _ => Outcome::Quiet,
    }
}

/// The app's answer to a forwarded message, counted: the frame to send (if any), or the
/// close of a plain WebSocket whose message the app did not take (1011).
fn forward_answer(
    to: &ReplyTo,
    r: Result<Reply, RelayError>,
    metrics: &Metrics,
) -> Result<Option<WsMessage>, (CloseCode, String)> {
    match r {
        Ok(reply) => {
            metrics.client_message("forward", ClientResult::Forwarded);
            Ok(reply_frame(to, reply))
        }
        Err(e) => {
            metrics.client_message("forward", ClientResult::UpstreamError);
            tracing::debug!("forwarding a client message: {e}");
            match to {
                ReplyTo::Json(c) => Ok(Some(json_value(
                    serde_json::json!({ "error": e.to_string(), "channel": &**c }),
                ))),
                ReplyTo::Plain => Err((CloseCode::Error, e.to_string())),
            }
        }
    }
}

/// The frame that carries the app's answer to a forwarded message: None for an empty answer
/// on a plain WebSocket (nothing to say).
fn reply_frame(to: &ReplyTo, r: Reply) -> Option<WsMessage> {
    let textual = r.content_type.as_ref().is_none_or(|ct| {
        let ct = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        ct.starts_with("text/") || ct == "application/json" || ct.ends_with("+json")
    });
    match to {
        ReplyTo::Plain if r.body.is_empty() => None,
        ReplyTo::Plain => Some(match Utf8Bytes::try_from(r.body.clone()) {
            Ok(t) if textual => WsMessage::Text(t),
            _ => WsMessage::Binary(r.body),
        }),
        ReplyTo::Json(c) => {
            let mut v = serde_json::json!({ "forwarded": &**c });
            if !r.body.is_empty() {
                match std::str::from_utf8(&r.body) {
                    Ok(s) => v["data"] = s.into(),
                    Err(_) => {
                        use base64::Engine;
                        v["data_b64"] = base64::engine::general_purpose::STANDARD
                            .encode(&r.body)
                            .into();
                    }
                }
            }
            Some(json_value(v))
        }
    }
}

/// What woke a WebSocket connection's task.
enum Woke {
    Frame(Option<Result<WsMessage, tungstenite::Error>>),
    Forwarded(ReplyTo, Result<Reply, RelayError>),
    Feed(Next),
    Ping,
}

/// The connection's task, from the upgrade on.
///
/// Not an `async fn`, which would keep each argument twice in the task (rust-lang/rust#62958):
/// an idle subscriber holds this future for its whole life, so the async block uses what it
/// captures in place.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn run(
    pending: Box<HyperWebsocket>,
    mut feed: Feed,
    keepalive: Duration,
    json: bool,
    dynamic: Option<Box<Dynamic>>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let mut ws = match (*pending).await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!("websocket upgrade failed: {e}");
                return;
            }
        };
        let mut items: Vec<Item> = Vec::new();
        let mut ping = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let disconnect_on_lag = feed.on_lag() == OnLag::Disconnect;
        // A multiplexed stream says first where each channel starts (what a resume needs).
        if feed.is_multiplexed() {
            for i in 0..feed.len() {
                let mut pos = Vec::new();
                feed.write_position(i, &mut pos);
                let v = serde_json::json!({
                    "subscribed": feed.name(i),
                    "id": String::from_utf8_lossy(&pos),
                });
                if ws.feed(json_value(v)).await.is_err() {
                    return;
                }
            }
            if ws.flush().await.is_err() {
                return;
            }
        }
        let mut inbound = Inbound::default();
        let mut feed_streak = 0;
        let close: Option<(CloseCode, String)> = loop {
            // The select only says what woke the task; what to do about it comes after. The
            // task's future is then as large as the larger of the two, not their sum: every idle
            // subscriber holds it for its whole life (benches/sizing.sh).
            //
            // Waiting messages are looked at first: a wake-up is nearly always the channel's,
            // and polling the client's side on the way (through tungstenite) and the timer
            // finds nothing and costs a good part of a delivery (benches/callgrind.sh, ws).
            // Unpolled, their wakers stay registered. After FEED_STREAK wake-ups in a row that
            // took messages, the others go first once, so the client's frames (pongs, closes,
            // commands), the forwarded answers and the pings get their turn on a busy channel.
            let others_first = feed_streak >= FEED_STREAK;
            let woke = if others_first {
                tokio::select! {
                    biased;
                    // A full forward queue stops reading the client (TCP slows it down) until
                    // the app answers.
                    frame = ws.next(), if !inbound.is_full() => Woke::Frame(frame),
                    (to, r) = inbound.forwarded(), if inbound.is_forwarding() => Woke::Forwarded(to, r),
                    _ = ping.tick() => Woke::Ping,
                    r = feed.next(&mut items, WS_BATCH) => Woke::Feed(r),
                }
            } else {
                tokio::select! {
                    biased;
                    r = feed.next(&mut items, WS_BATCH) => Woke::Feed(r),
                    frame = ws.next(), if !inbound.is_full() => Woke::Frame(frame),
                    (to, r) = inbound.forwarded(), if inbound.is_forwarding() => Woke::Forwarded(to, r),
                    _ = ping.tick() => Woke::Ping,
                }
            };
            feed_streak = match woke {
                Woke::Feed(_) if !others_first => feed_streak + 1,
                _ => 0,
            };
            match woke {
                Woke::Frame(frame) => match frame {
                    None => return,
                    Some(Ok(WsMessage::Close(_))) => {
                        // tungstenite queued the reply; flush it and let the peer close.
                        let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
                        return;
                    }
                    Some(Ok(m @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => {
                        last_heard = Instant::now();
                        let Some(d) = &dynamic else {
                            // The location refuses client messages: ignored, as it always was.
                            feed.metrics()
                                .client_message("refuse", ClientResult::Ignored);
                            continue;
                        };
                        // Boxed: a command or a publish (perhaps an auth request) takes memory
                        // only while it runs, not in every subscriber's task.
                        let outcome = Box::pin(take_frame(d, &mut inbound, &mut feed, m)).await;
                        match outcome {
                            Outcome::Quiet => {}
                            Outcome::Answer(v) => {
                                if !answer(&mut ws, json_value(v), &feed, keepalive).await {
                                    return;
                                }
                            }
                            Outcome::Close(v, code, reason) => {
                                if let Some(v) = v {
                                    if !answer(&mut ws, json_value(v), &feed, keepalive).await {
                                        return;
                                    }
                                }
                                break Some((code, reason));
                            }
                        }
                    }
                    // Anything else only shows the peer lives.
                    Some(Ok(_)) => last_heard = Instant::now(),
                    Some(Err(tungstenite::Error::Capacity(_))) => {
                        feed.metrics().dropped(DropReason::Oversized);
                        let kind = dynamic
                            .as_ref()
                            .map_or("refuse", |d| d.loc.client_messages.kind());
                        feed.metrics().client_message(kind, ClientResult::TooBig);
                        break Some((CloseCode::Size, "message too big".into()));
                    }
                    // A peer that breaks the protocol is told why before the connection goes
                    // (RFC 6455 §7.4.1), as a client library can then report it.
                    Some(Err(tungstenite::Error::Utf8(_))) => {
                        break Some((CloseCode::Invalid, "invalid UTF-8 in a text message".into()));
                    }
                    Some(Err(tungstenite::Error::Protocol(e)))
                        if !matches!(e, ProtocolError::ResetWithoutClosingHandshake) =>
                    {
                        break Some((CloseCode::Protocol, e.to_string()));
                    }
                    Some(Err(_)) => return,
                },
                Woke::Forwarded(to, r) => {
                    let frame = match forward_answer(&to, r, feed.metrics()) {
                        Ok(f) => f,
                        Err(close) => break Some(close),
                    };
                    if let Some(f) = frame {
                        if !answer(&mut ws, f, &feed, keepalive).await {
                            return;
                        }
                    }
                }
                Woke::Feed(r) => match r {
                    Next::Items => {
                        record_batch(&feed, &items);
                        for item in &items {
                            feed.delivered(item);
                        }
                        // `echo = false`: the sender does not get its own message back.
                        items.retain(|item| !inbound.is_own(&feed, item));
                        // Each frame is made as tungstenite takes it: no second buffer of frames.
                        let write = async {
                            for item in &items {
                                ws.feed(item_frame(&feed, item, json)).await?;
                            }
                            ws.flush().await
                        };
                        // A client that stops reading blocks the write; it must not hold its
                        // connection (and this task) forever: it is let go when the socket takes
                        // nothing for two keepalive intervals, and under `on_lag = "disconnect"`
                        // (always for a plain WebSocket) once it fell behind the buffer.
                        // `biased`: the timers are only armed when the write does not finish at
                        // once.
                        tokio::select! {
                            biased;
                            r = write => if r.is_err() {
                                return;
                            },
                            _ = feed.fell_behind(), if disconnect_on_lag => {
                                feed.metrics().dropped(DropReason::Lagged);
                                break Some((CloseCode::Again, "fell behind the buffer; reconnect".into()));
                            }
                            _ = tokio::time::sleep(keepalive * 2) => {
                                feed.metrics().dropped(DropReason::Timeout);
                                return;
                            }
                        }
                        super::feed::release(&mut items);
                    }
                    Next::Lagged => {
                        break Some((CloseCode::Again, "fell behind the buffer; reconnect".into()))
                    }
                    Next::Closed(CloseReason::Deleted) => {
                        break Some((CloseCode::Normal, "channel deleted".into()))
                    }
                    Next::Closed(CloseReason::ShuttingDown) => {
                        break Some((CloseCode::Away, "server shutting down".into()))
                    }
                    Next::Expired => {
                        feed.metrics().dropped(DropReason::Expired);
                        break Some((
                            CloseCode::Policy,
                            "token expired; reconnect with a new one".into(),
                        ));
                    }
                },
                Woke::Ping => {
                    // While the forward queue holds its reading, the client's pongs wait unread:
                    // not the client's fault.
                    if last_heard.elapsed() > keepalive * 2 && !inbound.is_full() {
                        feed.metrics().dropped(DropReason::Timeout);
                        break Some((CloseCode::Away, "no pong".into()));
                    }
                    match tokio::time::timeout(keepalive, ws.send(WsMessage::Ping(Bytes::new())))
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            feed.metrics().dropped(DropReason::Timeout);
                            return;
                        }
                    }
                }
            }
        };
        drop(feed);
        if let Some((code, reason)) = close {
            // A close reason is at most 123 bytes (RFC 6455 §5.5).
            let frame = CloseFrame {
                code,
                reason: truncate(&reason, 123).into(),
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
}

/// Answers one crier.json command: `{"subscribed"}`/`{"unsubscribed"}`, or `{"error",
/// "channel"}` (the connection stays). None: the frame was not a command.
async fn command(d: &Dynamic, feed: &mut Feed, cmd: Option<Command>) -> serde_json::Value {
    let Some(cmd) = cmd else {
        return serde_json::json!({
            "error": "not a command: {\"subscribe\": \"c\"}, {\"unsubscribe\": \"c\"} or {\"publish\": \"c\", \"data\": \"...\"}"
        });
    };
    if cmd.publish.is_some() {
        // `take_publish` took every lone publish: this one came with another command.
        return serde_json::json!({
            "error": "a command names one of subscribe, unsubscribe or publish"
        });
    }
    match (cmd.subscribe, cmd.unsubscribe) {
        (Some(c), None) => match d.subscribe(feed, &c, cmd.last_event_id.as_deref()).await {
            Ok(after) => serde_json::json!({ "subscribed": c, "id": after.to_string() }),
            Err(e) => serde_json::json!({ "error": e, "channel": c }),
        },
        (None, Some(c)) => {
            if feed.remove(&c) {
                serde_json::json!({ "unsubscribed": c })
            } else {
                serde_json::json!({ "error": "not subscribed", "channel": c })
            }
        }
        _ => serde_json::json!({
            "error": "a command names one of subscribe, unsubscribe or publish"
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every WebSocket subscriber's task is this future: its size is memory per subscriber.
    /// 3,232 B for `run` alone (debug build) before the select stopped holding what its arms
    /// do, the arguments stopped being kept twice and the optional parts were boxed.
    #[test]
    fn the_connection_future_stays_small() {
        fn ret<A, B, C, D, E, F>(_: impl Fn(A, B, C, D, E) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let n = ret(run);
        assert!(n <= 1400, "ws::run's future is {n} B");
    }
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
        assert!(matches!(plain_frame(&msg("text/plain", b"hi")), WsMessage::Text(t) if t == "hi"));
        assert!(matches!(
            plain_frame(&msg("application/octet-stream", b"hi")),
            WsMessage::Binary(_)
        ));
        assert!(matches!(
            plain_frame(&msg("text/plain", b"\xff")),
            WsMessage::Binary(_)
        ));
    }
}
