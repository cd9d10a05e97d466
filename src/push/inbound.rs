//! What a WebSocket client sends (`client_messages`): on a plain WebSocket each text or binary
//! frame is a message to the connection's channel; on crier.json it is
//! `{"publish": "c", "data": "..." | "data_b64": "...", "event": "..."}`. What a message does
//! is the `client_messages` of the location the client connected to — or, for a channel a
//! location with a longer `channel_prefix` owns, of that owner: `refuse` (the default: ignored
//! on a plain WebSocket, an error frame on crier.json), `publish` (the hub, exactly like the
//! publish API) or `forward` (POSTed to the app, see `relay`). Who may send is always the
//! owner's checks, as for subscribing (locations that share a prefix check alike).
//!
//! Per connection this keeps: a token bucket (`client_rate`, burst twice the rate), the
//! channels it was allowed to publish to (the JWT's `crier.publish` or forward auth asked with
//! `X-Crier-Action: publish`, once per channel, not per message), the ids of its own messages
//! while `echo = false` hides them from it, and its queue of messages for the app (one in
//! flight, so the app sees them in order; a full queue stops reading the client's socket).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;
use hyper::body::Incoming;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::admission::{check_origin, Admission, RequestView};
use super::feed::{Feed, Item};
use super::relay::{Job, Relay, RelayError, Reply};
use crate::auth::Action;
use crate::config::{ClientMessages, PushLocation};
use crate::hub::{Hub, MessageId, NewMessage};
use crate::metrics::ClientResult;
use crate::model::ChannelName;

/// Messages one connection may have waiting for the app besides the one in flight. When the
/// queue is full crier stops reading the client's socket until the app answers: a client
/// that sends faster than the app takes is slowed down by TCP, never buffered without bound.
pub const FORWARD_QUEUE: usize = 8;
/// Own message ids an `echo = false` connection remembers until they come back: more than
/// `client_rate` lets it have in flight; past it the oldest is forgotten (and echoed).
const MAX_OWN: usize = 256;
/// Channels whose publish permission one connection remembers; past it the oldest is asked
/// again.
const MAX_ALLOWED: usize = 64;

/// What a connection that may send commands or messages keeps of its handshake, to check what
/// it sends like a new connection: the checks, its location, and the parts of the handshake
/// the checks read (the target for `access_token`, the headers forward auth, the Origin check
/// and forwarded messages carry).
pub struct Dynamic {
    pub(super) admission: Admission,
    pub(super) loc: Arc<PushLocation>,
    pub(super) hub: Hub,
    pub(super) target: String,
    pub(super) headers: HeaderMap,
    /// Whether the client speaks crier.json (commands) rather than plain frames.
    pub(super) json: bool,
    /// The one channel the path named (what a plain frame is sent to).
    pub(super) path_channel: Option<ChannelName>,
    pub(super) relay: Arc<Relay>,
    /// `X-Crier-Connection`: the same for every message of this connection.
    pub(super) conn_id: HeaderValue,
}

impl Dynamic {
    /// For a crier.json handshake, or any WebSocket at a location that takes client messages;
    /// None otherwise (its frames are ignored).
    pub fn new(
        admission: &Admission,
        loc: &Arc<PushLocation>,
        hub: &Hub,
        req: &Request<Incoming>,
        channels: &[ChannelName],
        relay: &Arc<Relay>,
    ) -> Option<Dynamic> {
        let json = super::ws::wants_json(req.headers());
        let path_channel = match channels {
            [one] => Some(one.clone()),
            _ => None,
        };
        // A plain WebSocket can only send to its one channel: nothing to keep when that
        // channel takes no client messages.
        let takes = |c: &ChannelName| {
            rules(loc, admission.owner(c, loc)).client_messages != ClientMessages::Refuse
        };
        let plain_takes = match &path_channel {
            Some(c) => takes(c),
            None => loc.client_messages != ClientMessages::Refuse,
        };
        if !json && !plain_takes {
            return None;
        }
        let mut headers = HeaderMap::new();
        for name in [
            header::HOST,
            header::ORIGIN,
            header::COOKIE,
            header::AUTHORIZATION,
            HeaderName::from_static("x-forwarded-for"),
        ] {
            for v in req.headers().get_all(&name) {
                headers.append(name.clone(), v.clone());
            }
        }
        Some(Dynamic {
            admission: admission.clone(),
            loc: loc.clone(),
            hub: hub.clone(),
            target: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            headers,
            json,
            path_channel,
            relay: relay.clone(),
            conn_id: connection_id(),
        })
    }

    pub(super) fn view(&self) -> RequestView<'_> {
        RequestView {
            method: &http::Method::GET,
            target: &self.target,
            headers: &self.headers,
        }
    }
}

/// A process-unique connection id: the process's start (hex millis) and a counter.
fn connection_id() -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    static BOOT: OnceLock<u128> = OnceLock::new();
    let boot = BOOT.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::try_from(format!("{boot:x}-{n}")).unwrap_or(HeaderValue::from_static("0"))
}

/// A data frame the client sent.
pub enum ClientFrame {
    Text(Bytes),
    Binary(Bytes),
}

/// A crier.json `publish` command.
pub struct PublishCommand {
    /// The client's name of the channel (without the location's `channel_prefix`).
    pub channel: String,
    pub data: Option<String>,
    pub data_b64: Option<String>,
    pub event: Option<String>,
}

/// What the connection does after a client frame.
pub enum Outcome {
    /// Nothing to send.
    Quiet,
    /// Send this crier.json frame (an ack or an error) and go on.
    Answer(serde_json::Value),
    /// Close with this code and reason, after sending the frame, if any.
    Close(Option<serde_json::Value>, CloseCode, String),
}

/// Where the app's answer to a forwarded message goes.
pub enum ReplyTo {
    /// A plain frame.
    Plain,
    /// `{"forwarded": "<the client's channel name>"}`.
    Json(Box<str>),
}

type InFlight = Pin<Box<dyn Future<Output = (ReplyTo, Result<Reply, RelayError>)> + Send>>;

/// The per-connection state of client messages (see the module's comment): nothing but a
/// pointer until the client sends one, so a subscriber that only reads pays 8 bytes for it.
#[derive(Default)]
pub struct Inbound(Option<Box<State>>);

struct State {
    bucket: Bucket,
    /// Channels this connection may publish to, with when the permission ends.
    allowed: VecDeque<(ChannelName, Option<SystemTime>)>,
    /// `echo = false`: this connection's own messages not delivered yet (id, client's name of
    /// the channel).
    own: VecDeque<(MessageId, Box<str>)>,
    queue: VecDeque<(ReplyTo, Job)>,
    in_flight: Option<InFlight>,
    relay: Arc<Relay>,
}

impl Inbound {
    /// The state, made when the client sends its first message.
    fn state(&mut self, d: &Dynamic) -> &mut State {
        self.0.get_or_insert_with(|| {
            Box::new(State {
                bucket: Bucket::new(d.loc.client_rate),
                allowed: VecDeque::new(),
                own: VecDeque::new(),
                queue: VecDeque::new(),
                in_flight: None,
                relay: d.relay.clone(),
            })
        })
    }

    /// The forward queue is full: stop reading the client until the app answers.
    pub fn is_full(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| s.queue.len() >= FORWARD_QUEUE)
    }

    pub fn is_forwarding(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.in_flight.is_some())
    }

    /// The app's answer to the message in flight; the next queued one is sent at once.
    /// Cancel-safe: nothing changes until the answer is there. Never resolves while nothing
    /// is in flight.
    pub async fn forwarded(&mut self) -> (ReplyTo, Result<Reply, RelayError>) {
        let Some(st) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let Some(f) = st.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let out = f.await;
        st.in_flight = None;
        st.start_next();
        out
    }

    /// Whether `item` is this connection's own message that `echo = false` keeps from it.
    /// Free when it has published nothing (the usual case): one check per delivery.
    pub fn is_own(&mut self, feed: &Feed, item: &Item) -> bool {
        match self.0.as_mut() {
            Some(st) if !st.own.is_empty() => st.is_own(feed, item),
            _ => false,
        }
    }
}

impl State {
    fn enqueue(&mut self, reply: ReplyTo, job: Job) {
        self.queue.push_back((reply, job));
        if self.in_flight.is_none() {
            self.start_next();
        }
    }

    fn start_next(&mut self) {
        let Some((reply, job)) = self.queue.pop_front() else {
            return;
        };
        let relay = self.relay.clone();
        self.in_flight = Some(Box::pin(async move { (reply, relay.post(job).await) }));
    }

    fn is_own(&mut self, feed: &Feed, item: &Item) -> bool {
        let Item::Message { msg, chan, .. } = item else {
            return false;
        };
        let name = feed.name(*chan);
        let mut own = false;
        // A channel delivers in id order: an own id below this one will never come (it was
        // skipped over by a lag), so it is forgotten too.
        self.own.retain(|(id, n)| {
            if &**n != name {
                return true;
            }
            if *id == msg.id {
                own = true;
            }
            *id > msg.id
        });
        own
    }

    fn remember_own(&mut self, id: MessageId, name: &str) {
        if self.own.len() >= MAX_OWN {
            self.own.pop_front();
        }
        self.own.push_back((id, name.into()));
    }

    /// Whether the connection may still publish to `channel` without asking again.
    fn may_publish(&mut self, channel: &ChannelName) -> bool {
        let now = SystemTime::now();
        self.allowed
            .retain(|(_, until)| until.is_none_or(|t| t > now));
        self.allowed.iter().any(|(c, _)| c == channel)
    }

    fn allow(&mut self, channel: &ChannelName, until: Option<SystemTime>) {
        if self.allowed.len() >= MAX_ALLOWED {
            self.allowed.pop_front();
        }
        self.allowed.push_back((channel.clone(), until));
    }
}

/// `client_rate`: `rate` messages a second, in bursts of up to twice as many.
struct Bucket {
    tokens: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            tokens: 2.0 * f64::from(rate),
            rate: f64::from(rate),
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(2.0 * self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A client message that was not taken: counted, then told (how depends on the transport).
struct Failed {
    code: CloseCode,
    reason: String,
}

/// What became of a message that was taken.
enum Sent {
    Published(String),
    /// Queued for the app; its answer comes later.
    Queued,
}

/// One message to send on.
struct Outgoing {
    content_type: HeaderValue,
    body: Bytes,
    event: Option<Box<str>>,
}

/// A data frame on a plain WebSocket: a message to the path's channel.
pub async fn plain(d: &Dynamic, st: &mut Inbound, feed: &Feed, frame: ClientFrame) -> Outcome {
    let st = st.state(d);
    let metrics = d.hub.metrics();
    let Some(channel) = &d.path_channel else {
        let kind = d.loc.client_messages.kind();
        if d.loc.client_messages == ClientMessages::Refuse {
            metrics.client_message(kind, ClientResult::Ignored);
            return Outcome::Quiet;
        }
        metrics.client_message(kind, ClientResult::Invalid);
        return Outcome::Close(
            None,
            CloseCode::Policy,
            "this connection reads several channels: publish with the crier.json subprotocol"
                .into(),
        );
    };
    let rules = rules(&d.loc, d.admission.owner(channel, &d.loc));
    let kind = rules.client_messages.kind();
    if rules.client_messages == ClientMessages::Refuse {
        metrics.client_message(kind, ClientResult::Ignored);
        return Outcome::Quiet;
    }
    if !st.bucket.take() {
        metrics.client_message(kind, ClientResult::RateLimited);
        return Outcome::Close(None, CloseCode::Policy, over_rate(&d.loc));
    }
    let msg = match frame {
        ClientFrame::Text(body) => Outgoing {
            content_type: HeaderValue::from_static("text/plain"),
            body,
            event: None,
        },
        ClientFrame::Binary(body) => Outgoing {
            content_type: HeaderValue::from_static("application/octet-stream"),
            body,
            event: None,
        },
    };
    let name = &channel.as_str()[d.loc.channel_prefix.len().min(channel.as_str().len())..];
    match send_on(d, st, feed, channel, name, msg, ReplyTo::Plain).await {
        Ok(_) => Outcome::Quiet,
        Err(f) => Outcome::Close(None, f.code, f.reason),
    }
}

/// A crier.json `publish` command: an ack `{"published", "id"}` (or, forwarded, the app's
/// answer later), else `{"error", "channel"}`; over the rate, that error and a 1008 close.
pub async fn publish(d: &Dynamic, st: &mut Inbound, feed: &Feed, cmd: PublishCommand) -> Outcome {
    let st = st.state(d);
    let error = |reason: &str| serde_json::json!({ "error": reason, "channel": cmd.channel });
    let metrics = d.hub.metrics();
    if !st.bucket.take() {
        metrics.client_message(d.loc.client_messages.kind(), ClientResult::RateLimited);
        let reason = over_rate(&d.loc);
        return Outcome::Close(Some(error(&reason)), CloseCode::Policy, reason);
    }
    let channel = match ChannelName::with_prefix(&d.loc.channel_prefix, &cmd.channel) {
        Ok(c) => c,
        Err(e) => {
            metrics.client_message(d.loc.client_messages.kind(), ClientResult::Invalid);
            return Outcome::Answer(error(&e.to_string()));
        }
    };
    let owner = d.admission.owner(&channel, &d.loc);
    let kind = rules(&d.loc, owner).client_messages.kind();
    if check_origin(&d.headers, owner).is_err() {
        metrics.client_message(kind, ClientResult::Denied);
        return Outcome::Answer(error("origin not allowed"));
    }
    let (content_type, body) = match (cmd.data, cmd.data_b64) {
        (Some(s), None) => (HeaderValue::from_static("text/plain"), Bytes::from(s)),
        (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
            Ok(b) => (
                HeaderValue::from_static("application/octet-stream"),
                Bytes::from(b),
            ),
            Err(_) => {
                metrics.client_message(kind, ClientResult::Invalid);
                return Outcome::Answer(error("data_b64 is not base64"));
            }
        },
        _ => {
            metrics.client_message(kind, ClientResult::Invalid);
            return Outcome::Answer(error("a publish carries one of data or data_b64"));
        }
    };
    let event = match cmd.event {
        None => None,
        Some(e) if crate::model::is_event_name(&e) => Some(e.into_boxed_str()),
        Some(_) => {
            metrics.client_message(kind, ClientResult::Invalid);
            return Outcome::Answer(error(
                "event name: 1 to 64 characters of A-Z a-z 0-9 . _ - :",
            ));
        }
    };
    let msg = Outgoing {
        content_type,
        body,
        event,
    };
    let reply = ReplyTo::Json(cmd.channel.as_str().into());
    match send_on(d, st, feed, &channel, &cmd.channel, msg, reply).await {
        Ok(Sent::Published(id)) => {
            Outcome::Answer(serde_json::json!({ "published": cmd.channel, "id": id }))
        }
        Ok(Sent::Queued) => Outcome::Quiet,
        Err(f) => Outcome::Answer(error(&f.reason)),
    }
}

fn over_rate(loc: &PushLocation) -> String {
    format!(
        "more than {} messages a second (client_rate)",
        loc.client_rate
    )
}

/// Publishes or forwards one message to `channel` (`name` to the client) by the rules of the
/// channel's owner, once the connection may publish there.
async fn send_on(
    d: &Dynamic,
    st: &mut State,
    feed: &Feed,
    channel: &ChannelName,
    name: &str,
    msg: Outgoing,
    reply: ReplyTo,
) -> Result<Sent, Failed> {
    let owner = d.admission.owner(channel, &d.loc);
    let rules = rules(&d.loc, owner);
    let kind = rules.client_messages.kind();
    let metrics = d.hub.metrics();
    let fail = |result: ClientResult, code: CloseCode, reason: String| {
        metrics.client_message(kind, result);
        Err(Failed { code, reason })
    };
    if rules.client_messages == ClientMessages::Refuse {
        return fail(
            ClientResult::Denied,
            CloseCode::Policy,
            "this channel takes no client messages (client_messages = \"refuse\")".into(),
        );
    }
    if !st.may_publish(channel) {
        match d
            .admission
            .authorize_for(owner, channel, Action::Publish, d.view())
            .await
        {
            Ok(until) => st.allow(channel, until),
            Err(refusal) => return fail(ClientResult::Denied, CloseCode::Policy, refusal.reason()),
        }
    }
    match &rules.client_messages {
        ClientMessages::Forward(to) => {
            let headers = forward_headers(d, channel, &msg);
            let job = Job {
                target: to.target(channel.as_str()),
                headers,
                body: msg.body,
            };
            st.enqueue(reply, job);
            Ok(Sent::Queued)
        }
        _ => {
            let new = NewMessage {
                event: msg.event,
                content_type: msg.content_type,
                body: msg.body,
                headers: HeaderMap::new(),
            };
            match d.hub.publish(channel, new).await {
                Ok(receipt) => {
                    if !rules.echo && feed.has(name) {
                        if let Ok(id) = receipt.id.parse::<MessageId>() {
                            st.remember_own(id, name);
                        }
                    }
                    metrics.client_message(kind, ClientResult::Published);
                    Ok(Sent::Published(receipt.id))
                }
                Err(e) => fail(ClientResult::Error, CloseCode::Error, e.to_string()),
            }
        }
    }
}

/// Whose `client_messages` (and `echo`, `forward_to`) apply to a message for a channel that
/// `owner` owns: the connection's own location, unless the channel belongs to a location of
/// its own (a longer `channel_prefix`: `/live` naming `chat:room` of `/chat`). Two locations
/// with the same prefix serve the same channels and check them alike, and each takes the
/// messages of its own clients: a `/room` that publishes next to a `/live` that only reads.
fn rules<'a>(loc: &'a PushLocation, owner: &'a PushLocation) -> &'a PushLocation {
    if owner.channel_prefix.len() > loc.channel_prefix.len() {
        owner
    } else {
        loc
    }
}

/// The request headers of a forwarded message, built from scratch: the client's `Host`,
/// `Cookie` and `Authorization`, `X-Forwarded-For/-Proto/-Host` as the proxy sends them,
/// `X-Crier-Channel`, `X-Crier-Connection`, the frame's `Content-Type`, and `Crier-Event`
/// when the message names one.
fn forward_headers(d: &Dynamic, channel: &ChannelName, msg: &Outgoing) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in [
        header::HOST,
        header::COOKIE,
        header::AUTHORIZATION,
        HeaderName::from_static("x-forwarded-for"),
    ] {
        for v in d.headers.get_all(&name) {
            h.append(name.clone(), v.clone());
        }
    }
    crate::proxy::add_forwarded_headers(&mut h, &d.admission.conn);
    if let Ok(v) = HeaderValue::from_str(channel.as_str()) {
        h.insert("x-crier-channel", v);
    }
    h.insert("x-crier-connection", d.conn_id.clone());
    h.insert(header::CONTENT_TYPE, msg.content_type.clone());
    if let Some(e) = msg
        .event
        .as_deref()
        .and_then(|e| HeaderValue::from_str(e).ok())
    {
        // The publish API's header: an app can pass it on as it is.
        h.insert("crier-event", e);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_of_twice_the_rate() {
        let mut b = Bucket::new(5);
        let taken = (0..20).filter(|_| b.take()).count();
        assert_eq!(taken, 10, "burst = 2 × rate, then nothing until it refills");
        b.at -= std::time::Duration::from_millis(400);
        assert!(b.take() && b.take(), "0.4 s refills two");
    }
}
