//! The hub owns channels: publish appends once and wakes subscribers; each subscriber reads
//! from its own position, so resume and live delivery are the same code.
//!
//! The hub knows no wire format and no outbound protocol: transports (and later webhooks and
//! Web Push) all take messages the same way, through a [`Subscription`].

mod channel;
mod message;
mod observer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

pub use channel::{Channel, ChannelStats, CloseReason, Read, Start, StartPosition};
pub use message::{BadMessageId, Message, MessageId, ENCODING_SLOTS};
pub use observer::{HubObserver, Published, SubscriberEvent};

use observer::Observers;

use crate::config::{Config, Transport};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error("too many channels (channels.max_channels = {0})")]
    TooManyChannels(usize),
    #[error("no such channel")]
    NoSuchChannel,
    #[error("shutting down")]
    ShuttingDown,
}

impl HubError {
    /// The HTTP status every API answers it with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            HubError::TooManyChannels(_) => http::StatusCode::TOO_MANY_REQUESTS,
            HubError::NoSuchChannel => http::StatusCode::NOT_FOUND,
            HubError::ShuttingDown => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What a publish answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishReceipt {
    pub id: String,
    pub channel: String,
    pub subscribers: usize,
    pub buffered: usize,
}

/// A message to publish.
pub struct NewMessage {
    pub event: Option<Box<str>>,
    pub content_type: http::HeaderValue,
    pub body: Bytes,
    /// The publish request's headers, for observers (empty when not published over HTTP).
    pub headers: http::HeaderMap,
}

/// A cheap handle to the shared hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// parking_lot: held only for map lookups/inserts/removals, never across `.await`.
    /// Subscriber counts change under this lock (read side for joining an existing channel,
    /// write side for freeing one), which is what makes freeing an idle channel race-free.
    channels: RwLock<HashMap<Arc<str>, Arc<Channel>>>,
    /// Replaced as a whole on reload; channels keep the policy they were created with.
    config: RwLock<Arc<Config>>,
    closing: AtomicBool,
    metrics: Arc<Metrics>,
    /// Sorts before every id this process makes: the floor of a channel never seen before.
    floor: MessageId,
    /// The last id of freed and deleted channels (with when they went), so a channel made
    /// again continues above it and a resume from an older id reports the gap. Bounded by
    /// `max_channels` and a day (see `sweep`).
    tombstones: Mutex<HashMap<Arc<str>, (MessageId, Instant)>>,
    /// Webhooks and Web Push; usually empty, and then publishing costs one read lock more.
    observers: RwLock<Observers>,
}

/// How long a freed channel's last id is remembered for gap reporting.
const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);

impl Hub {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                channels: RwLock::new(HashMap::new()),
                config: RwLock::new(config),
                closing: AtomicBool::new(false),
                metrics,
                floor: process_floor(),
                tombstones: Mutex::new(HashMap::new()),
                observers: RwLock::new(Observers::default()),
            }),
        }
    }

    pub fn set_config(&self, config: Arc<Config>) {
        *self.inner.config.write() = config;
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Installs (or with None removes) the observer registered under `key`.
    pub fn set_observer(&self, key: &'static str, observer: Option<Arc<dyn HubObserver>>) {
        let mut obs = self.inner.observers.write();
        *obs = obs.with(key, observer);
    }

    /// The observers, or None when there are none (the common case costs no refcount).
    fn observers(&self) -> Option<Observers> {
        let obs = self.inner.observers.read();
        (!obs.is_empty()).then(|| obs.clone())
    }

    /// Finds a channel, creating it when absent (bounded by `channels.max_channels`).
    fn get_or_create(&self, name: &str, join: Option<Transport>) -> Result<Arc<Channel>, HubError> {
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(HubError::ShuttingDown);
        }
        if let Some(c) = self.inner.channels.read().get(name) {
            if let Some(t) = join {
                c.add_subscriber(t);
            }
            return Ok(c.clone());
        }
        let config = self.inner.config.read().clone();
        let mut map = self.inner.channels.write();
        let len = map.len();
        let c = match map.get(name) {
            Some(c) => c.clone(),
            None => {
                if len >= config.channels.max_channels {
                    return Err(HubError::TooManyChannels(config.channels.max_channels));
                }
                let name: Arc<str> = name.into();
                let floor = self
                    .inner
                    .tombstones
                    .lock()
                    .remove(&name)
                    .map_or(self.inner.floor, |t| t.0);
                let c = Arc::new(Channel::new(
                    name.clone(),
                    config.buffer_policy_for(&name),
                    floor,
                ));
                map.insert(name, c.clone());
                self.inner.metrics.channels.set(map.len() as i64);
                c
            }
        };
        if let Some(t) = join {
            c.add_subscriber(t);
        }
        Ok(c)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Channel>> {
        self.inner.channels.read().get(name).cloned()
    }

    /// Appends a message to a channel (created when new) and wakes its subscribers. The body
    /// is stored once; nothing here depends on the number of subscribers.
    pub fn publish(&self, name: &str, msg: NewMessage) -> Result<PublishReceipt, HubError> {
        let now = Instant::now();
        let observers = self.observers();
        loop {
            let chan = self.get_or_create(name, None)?;
            let Some(out) = chan.append(
                msg.event.clone(),
                msg.content_type.clone(),
                msg.body.clone(),
                now,
                |m| {
                    let Some(obs) = &observers else { return };
                    let p = Published {
                        channel: name,
                        message: m,
                        headers: &msg.headers,
                    };
                    obs.iter().for_each(|o| o.message(&p));
                },
            ) else {
                continue; // freed while we looked it up: take the new one
            };
            self.inner.metrics.messages_published.inc();
            return Ok(PublishReceipt {
                id: out.id.to_string(),
                channel: name.to_string(),
                subscribers: chan.subscriber_count(),
                buffered: out.buffered,
            });
        }
    }

    /// Starts a subscription. `from` is where it starts; the returned position says whether
    /// messages after the requested id were already gone (`gap`). `remote` is the client's
    /// address, for observers.
    pub fn subscribe(
        &self,
        name: &str,
        transport: Transport,
        from: Start,
        remote: Option<SocketAddr>,
    ) -> Result<Subscription, HubError> {
        let chan = self.get_or_create(name, Some(transport))?;
        let start = chan.start(from);
        self.inner.metrics.subscriber_connected(transport);
        if let Some(obs) = self.observers() {
            let e = SubscriberEvent {
                channel: &chan.name,
                transport,
                subscribers: chan.subscriber_count(),
                remote,
            };
            obs.iter().for_each(|o| o.subscribed(&e));
        }
        Ok(Subscription {
            hub: self.clone(),
            channel: chan,
            transport,
            remote,
            next_seq: start.next_seq,
            gap: start.gap,
        })
    }

    /// Removes a channel: its subscribers see `Closed(Deleted)`.
    pub fn delete(&self, name: &str) -> Result<(), HubError> {
        let chan = {
            let mut map = self.inner.channels.write();
            let c = map.remove(name).ok_or(HubError::NoSuchChannel)?;
            self.inner.metrics.channels.set(map.len() as i64);
            c
        };
        chan.mark_removed();
        chan.close(CloseReason::Deleted);
        self.bury(&chan);
        if let Some(obs) = self.observers() {
            obs.iter().for_each(|o| o.channel_deleted(name));
        }
        Ok(())
    }

    /// Tells every subscriber to go (drain). New subscriptions and publishes are refused.
    pub fn close_all(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        let chans: Vec<_> = self.inner.channels.read().values().cloned().collect();
        for c in chans {
            c.close(CloseReason::ShuttingDown);
        }
    }

    pub fn stats(&self, name: &str) -> Option<ChannelStats> {
        self.get(name).map(|c| c.stats())
    }

    /// Channel figures, sorted by name, filtered by prefix, at most `limit`.
    pub fn list(&self, prefix: &str, limit: usize) -> Vec<ChannelStats> {
        let mut chans: Vec<_> = self
            .inner
            .channels
            .read()
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, c)| c.clone())
            .collect();
        chans.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        chans.truncate(limit);
        chans.iter().map(|c| c.stats()).collect()
    }

    pub fn channel_count(&self) -> usize {
        self.inner.channels.read().len()
    }

    /// Drops expired messages everywhere and frees channels that are idle and empty.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.sweep_tombstones(now);
        let chans: Vec<_> = self.inner.channels.read().values().cloned().collect();
        let idle: Vec<_> = chans.into_iter().filter(|c| c.trim(now)).collect();
        if idle.is_empty() {
            return;
        }
        let mut map = self.inner.channels.write();
        for c in idle {
            self.remove_if_idle(&mut map, &c);
        }
        self.inner.metrics.channels.set(map.len() as i64);
    }

    fn remove_if_idle(&self, map: &mut HashMap<Arc<str>, Arc<Channel>>, c: &Arc<Channel>) {
        // Only the incarnation we hold: a deleted-and-recreated channel of the same name stays.
        if map.get(&c.name).is_some_and(|m| Arc::ptr_eq(m, c)) && c.try_mark_removed() {
            map.remove(&c.name);
            self.bury(c);
        }
    }

    /// Remembers a freed channel's last id (if it ever had a message).
    fn bury(&self, c: &Channel) {
        if let Some(id) = c.last_id() {
            self.inner
                .tombstones
                .lock()
                .insert(c.name.clone(), (id, Instant::now()));
        }
    }

    fn sweep_tombstones(&self, now: Instant) {
        let cap = self.inner.config.read().channels.max_channels;
        let mut t = self.inner.tombstones.lock();
        t.retain(|_, (_, at)| now.saturating_duration_since(*at) < TOMBSTONE_TTL);
        if t.len() > cap {
            let mut ages: Vec<Instant> = t.values().map(|(_, at)| *at).collect();
            ages.sort_unstable();
            let cutoff = ages[t.len() - cap];
            t.retain(|_, (_, at)| *at >= cutoff);
        }
    }

    /// Runs `sweep` every `every` until the hub closes.
    pub async fn run_sweeper(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.inner.closing.load(Ordering::Relaxed) {
            tick.tick().await;
            self.sweep();
        }
    }

    fn leave(&self, chan: &Arc<Channel>, t: Transport, remote: Option<SocketAddr>) {
        self.inner.metrics.subscriber_disconnected(t);
        let left = chan.remove_subscriber(t);
        if let Some(obs) = self.observers() {
            let e = SubscriberEvent {
                channel: &chan.name,
                transport: t,
                subscribers: left,
                remote,
            };
            obs.iter().for_each(|o| o.unsubscribed(&e));
        }
        if left == 0 {
            let mut map = self.inner.channels.write();
            self.remove_if_idle(&mut map, chan);
            self.inner.metrics.channels.set(map.len() as i64);
        }
    }
}

/// Just below the first id this process can make: `<start-millis - 1>-<max>`.
fn process_floor() -> MessageId {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    MessageId {
        ms: ms.saturating_sub(1),
        seq: u64::MAX,
    }
}

/// One subscriber's position in one channel. Dropping it leaves the channel.
pub struct Subscription {
    hub: Hub,
    channel: Arc<Channel>,
    transport: Transport,
    remote: Option<SocketAddr>,
    next_seq: u64,
    gap: bool,
}

impl Subscription {
    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// Messages after the requested position had already left the buffer.
    pub fn gap(&self) -> bool {
        self.gap
    }

    pub fn metrics(&self) -> &Metrics {
        &self.hub.inner.metrics
    }

    /// Moves the position to the oldest buffered message after falling behind; the
    /// subscriber then reports a gap.
    pub fn restart_from_oldest(&mut self) {
        self.next_seq = self.channel.start(Start::Oldest).next_seq;
        self.gap = true;
    }

    /// Appends what is available now (up to `max`) to `out`, without waiting.
    pub fn try_read(&mut self, out: &mut Vec<Arc<Message>>, max: usize) -> Read {
        self.channel.read(&mut self.next_seq, out, max)
    }

    /// Resolves once the next message this subscription needs has left the buffer. A
    /// transport stuck writing to a client that stopped reading selects on this, so the slow
    /// client is let go when it falls behind, not only when (if ever) it reads again.
    pub async fn fell_behind(&self) {
        loop {
            let notified = self.channel.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.channel.is_behind(self.next_seq) {
                return;
            }
            notified.await;
        }
    }

    /// Waits until there is something to report: messages (appended to `out`), lag or close.
    /// Cancel-safe: the position only moves in the poll that returns.
    pub async fn next(&mut self, out: &mut Vec<Arc<Message>>, max: usize) -> Read {
        loop {
            let notified = self.channel.notify().notified();
            tokio::pin!(notified);
            // Register before looking, so an append between the look and the wait still wakes us.
            notified.as_mut().enable();
            match self.channel.read(&mut self.next_seq, out, max) {
                Read::Empty => notified.await,
                r => return r,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.leave(&self.channel, self.transport, self.remote);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(max_channels: usize) -> Hub {
        let mut c = Config::default();
        c.channels.max_channels = max_channels;
        Hub::new(Arc::new(c), Arc::new(Metrics::new()))
    }

    fn msg(b: &'static str) -> NewMessage {
        NewMessage {
            event: None,
            content_type: http::HeaderValue::from_static("text/plain"),
            body: Bytes::from_static(b.as_bytes()),
            headers: http::HeaderMap::new(),
        }
    }

    #[test]
    fn idle_channels_are_freed() {
        let h = hub(10);
        let s = h
            .subscribe("a", Transport::Sse, Start::Newest, None)
            .expect("test setup");
        assert_eq!(h.channel_count(), 1);
        drop(s);
        assert_eq!(h.channel_count(), 0, "no subscriber and nothing buffered");
        h.publish("b", msg("x")).expect("test setup");
        assert_eq!(h.channel_count(), 1, "buffered messages keep it");
    }

    #[test]
    fn max_channels() {
        let h = hub(2);
        h.publish("a", msg("x")).expect("test setup");
        h.publish("b", msg("x")).expect("test setup");
        assert_eq!(
            h.publish("c", msg("x")).unwrap_err(),
            HubError::TooManyChannels(2)
        );
        assert!(
            h.publish("a", msg("y")).is_ok(),
            "existing channels still take messages"
        );
    }

    #[test]
    fn publish_stores_one_body_for_all_subscribers() {
        let h = hub(10);
        let mut subs: Vec<_> = (0..100)
            .map(|_| {
                h.subscribe("a", Transport::WebSocket, Start::Newest, None)
                    .expect("test setup")
            })
            .collect();
        let r = h.publish("a", msg("hello")).expect("test setup");
        assert_eq!(r.subscribers, 100);
        let mut ptrs = Vec::new();
        for s in &mut subs {
            let mut out = Vec::new();
            assert_eq!(s.try_read(&mut out, 10), Read::Messages(1));
            ptrs.push(out[0].body.as_ptr());
        }
        assert!(ptrs.windows(2).all(|w| w[0] == w[1]), "one shared body");
    }

    #[test]
    fn a_freed_channel_made_again_keeps_ids_increasing_and_reports_gaps() {
        let h = hub(10);
        let first: MessageId = h
            .publish("a", msg("1"))
            .expect("test setup")
            .id
            .parse()
            .expect("test setup");
        let last: MessageId = h
            .publish("a", msg("2"))
            .expect("test setup")
            .id
            .parse()
            .expect("test setup");
        h.delete("a").expect("test setup");
        let again: MessageId = h
            .publish("a", msg("3"))
            .expect("test setup")
            .id
            .parse()
            .expect("test setup");
        assert!(again > last, "ids keep increasing across incarnations");
        let from_first = h
            .subscribe("a", Transport::Sse, Start::After(first), None)
            .expect("test setup");
        assert!(from_first.gap(), "message 2 is gone");
        let from_last = h
            .subscribe("a", Transport::Sse, Start::After(last), None)
            .expect("test setup");
        assert!(!from_last.gap(), "nothing after `last` was lost");
    }

    #[test]
    fn ids_from_before_this_process_report_a_gap() {
        let h = hub(10);
        let old = MessageId { ms: 1_000, seq: 0 };
        let s = h
            .subscribe("new", Transport::LongPoll, Start::After(old), None)
            .expect("test setup");
        assert!(s.gap(), "what happened before the restart cannot be known");
        let head = s.channel().head_id();
        drop(s);
        let s = h
            .subscribe("new", Transport::LongPoll, Start::After(head), None)
            .expect("test setup");
        assert!(!s.gap(), "the idle channel's head is a clean position");
    }

    #[test]
    fn delete_then_recreate_is_a_new_channel() {
        let h = hub(10);
        let mut old = h
            .subscribe("a", Transport::Sse, Start::Newest, None)
            .expect("test setup");
        h.delete("a").expect("test setup");
        assert_eq!(h.delete("a").unwrap_err(), HubError::NoSuchChannel);
        h.publish("a", msg("new")).expect("test setup");
        assert_eq!(
            old.try_read(&mut Vec::new(), 10),
            Read::Closed(CloseReason::Deleted)
        );
        drop(old);
        assert_eq!(
            h.channel_count(),
            1,
            "dropping the old subscriber keeps the new channel"
        );
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl HubObserver for Recorder {
        fn message(&self, m: &Published<'_>) {
            let tag = m
                .headers
                .get("x-tag")
                .map_or("", |v| v.to_str().unwrap_or(""));
            self.0
                .lock()
                .push(format!("msg {} {} {}", m.channel, m.message.id.seq, tag));
        }
        fn subscribed(&self, e: &SubscriberEvent<'_>) {
            self.0
                .lock()
                .push(format!("sub {} {}", e.channel, e.subscribers));
        }
        fn unsubscribed(&self, e: &SubscriberEvent<'_>) {
            self.0
                .lock()
                .push(format!("unsub {} {}", e.channel, e.subscribers));
        }
        fn channel_deleted(&self, channel: &str) {
            self.0.lock().push(format!("deleted {channel}"));
        }
    }

    #[test]
    fn observers_hear_every_event_once() {
        let h = hub(10);
        let rec = Arc::new(Recorder::default());
        h.set_observer("test", Some(rec.clone()));
        let a = h
            .subscribe("a", Transport::Sse, Start::Newest, None)
            .expect("test setup");
        let b = h
            .subscribe("a", Transport::WebSocket, Start::Newest, None)
            .expect("test setup");
        let mut m = msg("x");
        m.headers
            .insert("x-tag", http::HeaderValue::from_static("t1"));
        h.publish("a", m).expect("test setup");
        h.publish("a", msg("y")).expect("test setup");
        drop(a);
        h.delete("a").expect("test setup");
        drop(b);
        h.set_observer("test", None);
        h.publish("a", msg("z")).expect("test setup");
        let got = rec.0.lock().clone();
        assert_eq!(
            got,
            [
                "sub a 1",
                "sub a 2",
                "msg a 0 t1",
                "msg a 1 ",
                "unsub a 1",
                "deleted a",
                "unsub a 0",
            ]
        );
    }
}
