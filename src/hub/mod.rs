//! The hub owns channels: publish appends once and wakes subscribers; each subscriber reads
//! from its own position, so resume and live delivery are the same code.
//!
//! The hub knows no wire format and no outbound protocol: transports, webhooks and Web Push
//! all take messages the same way (a [`Subscription`] or a [`HubObserver`]). Where buffers live
//! beyond this process is the storage engine's business ([`store`]): the hub keeps each
//! channel's local tail, and every engine feeds it.

mod channel;
mod expiry;
mod loop_wake;
mod message;
mod observer;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

pub use channel::{
    AppendOutcome, Assigned, Channel, ChannelStats, CloseReason, Paced, Read, Start, StartPosition,
    SubscriberCounts,
};
pub use message::{BadMessageId, Message, MessageId, ENCODING_SLOTS};
pub use observer::{HubObserver, Published, SubscriberEvent};

use expiry::Expiries;
use loop_wake::LoopRelays;
use observer::Observers;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{ChannelName, Transport};
use store::Engine;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error("too many channels (channels.max_channels = {0})")]
    TooManyChannels(usize),
    #[error("no such channel")]
    NoSuchChannel,
    #[error("shutting down")]
    ShuttingDown,
    /// The storage engine cannot take the request now (a disk error, Redis down): nothing
    /// was accepted; the client may retry.
    #[error("message store unavailable: {0}")]
    Unavailable(String),
}

impl HubError {
    /// The HTTP status every API answers it with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            HubError::TooManyChannels(_) => http::StatusCode::TOO_MANY_REQUESTS,
            HubError::NoSuchChannel => http::StatusCode::NOT_FOUND,
            HubError::ShuttingDown | HubError::Unavailable(_) => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
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

impl NewMessage {
    /// The body and content type in allocations of their own. What a connection read (a
    /// publish request's body and headers, a WebSocket frame) is a slice of that
    /// connection's read buffer: kept in a channel's buffer for `buffer_ttl`, a 100-byte
    /// message pinned several KiB (measured with benches/sizing.sh: 4.6 KB per 100 B message
    /// before, see README "Sizing a node"). One copy per publish, outside every lock.
    fn unshared(self) -> NewMessage {
        let content_type = http::HeaderValue::from_bytes(self.content_type.as_bytes())
            .unwrap_or(self.content_type);
        NewMessage {
            content_type,
            body: Bytes::copy_from_slice(&self.body),
            ..self
        }
    }
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
    /// Where buffers live beyond this process ([`store`]).
    engine: Arc<dyn Engine>,
    /// The channels the sweep visits, by when their oldest message expires.
    expiries: Arc<Expiries>,
    /// Each event loop's relay, which wakes the channels' subscribers on that loop.
    loop_relays: Arc<LoopRelays>,
}

/// How long a freed channel's last id is remembered for gap reporting.
const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);

impl Hub {
    /// A hub on the memory engine.
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Hub {
        Hub::with_engine(config, metrics, Arc::new(store::Memory))
    }

    pub fn with_engine(config: Arc<Config>, metrics: Arc<Metrics>, engine: Arc<dyn Engine>) -> Hub {
        let loop_relays = Arc::new(LoopRelays::new(config.server.event_loops));
        Hub {
            inner: Arc::new(Inner {
                channels: RwLock::new(HashMap::new()),
                config: RwLock::new(config),
                closing: AtomicBool::new(false),
                metrics,
                floor: process_floor(),
                tombstones: Mutex::new(HashMap::new()),
                observers: RwLock::new(Observers::default()),
                engine,
                expiries: Arc::default(),
                loop_relays,
            }),
        }
    }

    /// Starts the relays that wake subscribers on the event loops from the loops themselves
    /// (`handles[i]` runs loop `i + 1`). Once, when the loops have started.
    pub fn start_loop_relays(&self, handles: &[tokio::runtime::Handle]) {
        self.inner.loop_relays.start(handles);
    }

    pub fn set_config(&self, config: Arc<Config>) {
        *self.inner.config.write() = config;
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The config in force (replaced on reload).
    pub(crate) fn config(&self) -> Arc<Config> {
        self.inner.config.read().clone()
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

    /// Finds a local channel, creating it when absent (bounded by `channels.max_channels`).
    /// With `join`, a subscriber of that transport is counted in under the map lock, so the
    /// channel is not freed meanwhile; the bool says whether it is the channel's first local
    /// subscriber (the engine may have to open it).
    pub(crate) fn get_or_create(
        &self,
        name: &ChannelName,
        join: Option<Transport>,
    ) -> Result<(Arc<Channel>, bool), HubError> {
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(HubError::ShuttingDown);
        }
        if let Some(c) = self.inner.channels.read().get(name.as_str()) {
            let first = join.is_some_and(|t| c.add_subscriber(t) == 0);
            return Ok((c.clone(), first));
        }
        let config = self.inner.config.read().clone();
        let mut map = self.inner.channels.write();
        let len = map.len();
        let c = match map.get(name.as_str()) {
            Some(c) => c.clone(),
            None => {
                if len >= config.channels.max_channels {
                    return Err(HubError::TooManyChannels(config.channels.max_channels));
                }
                let name: Arc<str> = name.as_arc().clone();
                let floor = self
                    .inner
                    .tombstones
                    .lock()
                    .remove(&name)
                    .map_or(self.inner.floor, |t| t.0);
                let c = Channel::new(
                    name.clone(),
                    config.buffer_policy_for(&name),
                    floor,
                    self.inner.expiries.clone(),
                    self.inner.loop_relays.clone(),
                );
                map.insert(name, c.clone());
                self.inner.metrics.channels.set(map.len() as i64);
                c
            }
        };
        let first = join.is_some_and(|t| c.add_subscriber(t) == 0);
        Ok((c, first))
    }

    /// The local channel of that name, if there is one.
    pub fn get(&self, name: &str) -> Option<Arc<Channel>> {
        self.inner.channels.read().get(name).cloned()
    }

    /// Publishes a message through the storage engine: Ok once it is accepted (and, for the
    /// memory engine, appended and its subscribers woken).
    pub async fn publish(
        &self,
        name: &ChannelName,
        msg: NewMessage,
    ) -> Result<PublishReceipt, HubError> {
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(HubError::ShuttingDown);
        }
        self.inner.engine.publish(self, name, msg.unshared()).await
    }

    /// Appends a message to the local tail of a channel (created when new), assigning its id,
    /// and wakes its subscribers. The body is stored once; nothing here depends on the number
    /// of subscribers. The memory engine's publish: on a busy channel it is to wait before
    /// answering (the [`Paced`] given back).
    pub(crate) fn append_local(
        &self,
        name: &ChannelName,
        msg: NewMessage,
    ) -> Result<(PublishReceipt, Option<Paced>), HubError> {
        let now = Instant::now();
        let observers = self.observers();
        loop {
            let (chan, _) = self.get_or_create(name, None)?;
            let Some(out) = chan.append(
                msg.event.clone(),
                msg.content_type.clone(),
                msg.body.clone(),
                now,
                observers.as_ref().map(|obs| {
                    |m: &Arc<Message>| {
                        let p = Published {
                            channel: name.as_str(),
                            message: m,
                            headers: &msg.headers,
                        };
                        obs.iter().for_each(|o| o.message(&p));
                    }
                }),
            ) else {
                continue; // freed while we looked it up: take the new one
            };
            self.inner.metrics.messages_published.inc();
            out.count_fanout(&self.inner.metrics, msg.body.len());
            let receipt = PublishReceipt {
                id: out.id.to_string(),
                channel: name.as_str().to_string(),
                subscribers: chan.subscriber_count(),
                buffered: out.buffered,
            };
            return Ok((receipt, out.paced));
        }
    }

    /// Appends a message a storage engine has already stored (its id assigned by the engine,
    /// above the channel's last) to the local tail of `chan`, or of the channel of that name
    /// made again if `chan` left the hub meanwhile, and wakes its subscribers and observers.
    /// Called in id order per channel (the engine's writer does).
    pub(crate) fn append_stored(
        &self,
        name: &ChannelName,
        mut chan: Arc<Channel>,
        msg: Arc<Message>,
        headers: &http::HeaderMap,
    ) -> PublishReceipt {
        let now = Instant::now();
        let observers = self.observers();
        let (buffered, appended) = loop {
            let told = observers.as_ref().map(|obs| {
                |m: &Arc<Message>| {
                    let p = Published {
                        channel: name.as_str(),
                        message: m,
                        headers,
                    };
                    obs.iter().for_each(|o| o.message(&p));
                }
            });
            match chan.append_assigned(msg.clone(), now, told) {
                Assigned::Appended(out) => break (out.buffered, Some(out)),
                // Not reachable while the engine assigns ids above the tail's; the message
                // is stored either way, so the publish stands.
                Assigned::Stale => break (chan.stats().buffered, None),
                Assigned::Removed => match self.get_or_create(name, None) {
                    Ok((c, _)) => chan = c,
                    Err(e) => {
                        // Stored (it is there after a restart) but not on the local tail now:
                        // the publish stands, as answering an error would make a client repeat it.
                        tracing::warn!(channel = name.as_str(), "stored message not buffered: {e}");
                        break (0, None);
                    }
                },
            }
        };
        self.inner.metrics.messages_published.inc();
        if let Some(out) = &appended {
            out.count_fanout(&self.inner.metrics, msg.body.len());
        }
        PublishReceipt {
            id: msg.id.to_string(),
            channel: name.as_str().to_string(),
            subscribers: chan.subscriber_count(),
            buffered,
        }
    }

    /// Appends a message a fan-out engine received (published on any node, its id assigned
    /// by the engine) to `chan`'s local tail and wakes its subscribers. Observers are not told:
    /// the node that took the publish tells its own ([`Hub::observe_published`]), so a webhook
    /// fires once per message, not once per node.
    pub(crate) fn append_fanout(&self, chan: &Arc<Channel>, msg: Arc<Message>) -> Assigned {
        let len = msg.body.len();
        let r = chan.append_assigned(msg, Instant::now(), None::<fn(&Arc<Message>)>);
        if let Assigned::Appended(out) = &r {
            out.count_fanout(&self.inner.metrics, len);
        }
        r
    }

    /// Tells the observers of a message this node accepted but does not append itself (a
    /// fan-out engine appends what the fan-out brings), and counts it as published here.
    pub(crate) fn observe_published(
        &self,
        name: &str,
        message: &Arc<Message>,
        headers: &http::HeaderMap,
    ) {
        self.inner.metrics.messages_published.inc();
        if let Some(obs) = self.observers() {
            let p = Published {
                channel: name,
                message,
                headers,
            };
            obs.iter().for_each(|o| o.message(&p));
        }
    }

    /// Puts a channel read back from a storage engine at start into the hub, whatever
    /// `max_channels` says now (the limit is for new channels): `floor` is the newest id that
    /// had left its buffer, `messages` its tail in id order. Observers are not told (these
    /// messages were published before).
    pub(crate) fn restore(&self, name: Arc<str>, floor: MessageId, messages: Vec<Arc<Message>>) {
        let config = self.inner.config.read().clone();
        let c = Channel::new(
            name.clone(),
            config.buffer_policy_for(&name),
            floor,
            self.inner.expiries.clone(),
            self.inner.loop_relays.clone(),
        );
        let now = Instant::now();
        for m in messages {
            c.append_assigned(m, now, None::<fn(&Arc<Message>)>);
        }
        let mut map = self.inner.channels.write();
        map.insert(name, c);
        self.inner.metrics.channels.set(map.len() as i64);
    }

    /// Remembers the last id of a channel that has no messages now (a storage engine's
    /// tombstone read back at start), as if it had been freed here.
    pub(crate) fn restore_tombstone(&self, name: Arc<str>, last: MessageId) {
        self.inner
            .tombstones
            .lock()
            .insert(name, (last, Instant::now()));
    }

    /// Resolves once the storage engine has finished what it had in flight and released its
    /// files (after [`Hub::close_all`]).
    pub async fn engine_closed(&self) {
        if let Some(f) = self.inner.engine.closed() {
            f.await;
        }
    }

    /// Starts a subscription. `from` is where it starts; the returned position says whether
    /// messages after the requested id were already gone (`gap`). `remote` is the client's
    /// address, for observers.
    pub async fn subscribe(
        &self,
        name: &ChannelName,
        transport: Transport,
        from: Start,
        remote: Option<SocketAddr>,
    ) -> Result<Subscription, HubError> {
        let (chan, _) = self.get_or_create(name, Some(transport))?;
        {
            if let Some(open) = self.inner.engine.open(self, &chan) {
                // Counted in: an engine error counts the subscriber out again.
                let joined = Joined {
                    hub: self,
                    chan: &chan,
                    transport,
                };
                open.await?;
                std::mem::forget(joined);
            }
        }
        let start = chan.start(from);
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
            transport,
            remote,
            next_seq: start.next_seq,
            joined_seq: start.end_seq,
            start_after: start.after,
            gap: start.gap,
            untold_gap: start.gap,
            channel: chan,
        })
    }

    /// Deletes a channel through the storage engine: its subscribers see `Closed(Deleted)`.
    pub async fn delete(&self, name: &str) -> Result<(), HubError> {
        self.inner.engine.delete(self, name).await
    }

    /// Removes a local channel: its subscribers see `Closed(Deleted)`.
    pub(crate) fn delete_local(&self, name: &str) -> Result<(), HubError> {
        self.remove_deleted(name)?;
        if let Some(obs) = self.observers() {
            obs.iter().for_each(|o| o.channel_deleted(name));
        }
        Ok(())
    }

    /// [`Hub::delete_local`] for a delete another node took (and told its observers of).
    pub(crate) fn remove_deleted(&self, name: &str) -> Result<(), HubError> {
        let chan = {
            let mut map = self.inner.channels.write();
            let c = map.remove(name).ok_or(HubError::NoSuchChannel)?;
            self.inner.metrics.channels.set(map.len() as i64);
            c
        };
        chan.mark_removed();
        chan.close(CloseReason::Deleted);
        self.bury(&chan);
        Ok(())
    }

    /// Tells every subscriber to go (drain). New subscriptions and publishes are refused; the
    /// storage engine finishes what it has in flight.
    pub fn close_all(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        let chans: Vec<_> = self.inner.channels.read().values().cloned().collect();
        for c in chans {
            c.close(CloseReason::ShuttingDown);
        }
        self.inner.engine.close();
    }

    /// A channel's figures, as the storage engine knows them (cluster-wide for Redis).
    pub async fn stats(&self, name: &str) -> Result<Option<ChannelStats>, HubError> {
        self.inner.engine.stats(self, name).await
    }

    /// A local channel's figures.
    pub(crate) fn local_stats(&self, name: &str) -> Option<ChannelStats> {
        self.get(name).map(|c| c.stats())
    }

    /// Channel figures, sorted by name, filtered by prefix, at most `limit`.
    /// The figures of the first `limit` channels (by name) whose name starts with `prefix`,
    /// and how many channels match in all.
    pub fn list(&self, prefix: &str, limit: usize) -> (usize, Vec<ChannelStats>) {
        let mut chans: Vec<_> = self
            .inner
            .channels
            .read()
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, c)| c.clone())
            .collect();
        let matches = chans.len();
        chans.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        chans.truncate(limit);
        (matches, chans.iter().map(|c| c.stats()).collect())
    }

    pub fn channel_count(&self) -> usize {
        self.inner.channels.read().len()
    }

    /// Drops expired messages everywhere and frees channels that are idle and empty.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.sweep_tombstones(now);
        let due = self.inner.expiries.take_due(now);
        let idle: Vec<_> = due
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|c| c.trim(now))
            .collect();
        if idle.is_empty() {
            return;
        }
        let mut map = self.inner.channels.write();
        for c in idle {
            self.remove_if_idle(&mut map, &c);
        }
        self.inner.metrics.channels.set(map.len() as i64);
    }

    /// Frees `c` if it has no subscriber and nothing buffered (a channel an engine made for a
    /// publish that then failed, which nothing else would ever free).
    pub(crate) fn release_if_idle(&self, c: &Arc<Channel>) {
        if c.subscriber_count() == 0 && c.stats().buffered == 0 {
            let mut map = self.inner.channels.write();
            self.remove_if_idle(&mut map, c);
            self.inner.metrics.channels.set(map.len() as i64);
        }
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

/// A subscriber counted into a channel that is not a [`Subscription`] yet: leaves again if
/// dropped (an engine refused to open the channel).
struct Joined<'a> {
    hub: &'a Hub,
    chan: &'a Arc<Channel>,
    transport: Transport,
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let left = self.chan.remove_subscriber(self.transport);
        if left == 0 {
            let mut map = self.hub.inner.channels.write();
            self.hub.remove_if_idle(&mut map, self.chan);
            self.hub.inner.metrics.channels.set(map.len() as i64);
        }
    }
}

/// One subscriber's position in one channel. Dropping it leaves the channel.
///
/// Deliveries are counted at publish for every subscriber connected then (once per publish,
/// not per subscriber); a subscription counts only what it reads from before it joined (a
/// resume), and what it skips when it falls behind.
pub struct Subscription {
    hub: Hub,
    channel: Arc<Channel>,
    transport: Transport,
    remote: Option<SocketAddr>,
    next_seq: u64,
    /// The channel's end when this subscription joined: messages before it were published
    /// before it was counted in.
    joined_seq: u64,
    /// The id the subscription started after (a cursor's position before any delivery).
    start_after: MessageId,
    /// The start position had a gap (the `Crier-Resume` header says so).
    gap: bool,
    /// A gap this subscriber has not been told of in band yet.
    untold_gap: bool,
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

    /// The id this subscription started after: where a resume continues when nothing has
    /// been delivered yet.
    pub fn start_after(&self) -> MessageId {
        self.start_after
    }

    /// The transport this subscription is counted under.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Moves the position to the oldest buffered message after falling behind (the
    /// `on_lag = "skip"` policy); the messages jumped over are counted, and the gap is
    /// pending until the subscriber is told.
    pub fn skip_to_oldest(&mut self) {
        let oldest = self.channel.start(Start::Oldest).next_seq;
        let skipped = oldest.saturating_sub(self.next_seq);
        self.hub.inner.metrics.skipped(self.transport, skipped);
        self.next_seq = oldest;
        self.gap = true;
        self.untold_gap = true;
    }

    /// Whether a gap (at the start, or from falling behind) is still to be told; telling
    /// it is the caller's promise, so this clears it.
    pub fn take_gap(&mut self) -> bool {
        std::mem::take(&mut self.untold_gap)
    }

    /// Appends what is available now (up to `max`) to `out`, without waiting.
    pub fn try_read(&mut self, out: &mut Vec<Arc<Message>>, max: usize) -> Read {
        let from = self.next_seq;
        let r = self.channel.read(&mut self.next_seq, out, max);
        if from < self.joined_seq {
            self.count_backlog(from, out, &r);
        }
        r
    }

    /// Counts the messages of a read that were published before this subscription joined
    /// (the publish did not count them for it). A live subscriber never gets here; nor does a
    /// long-poll, which counts what its response carries.
    fn count_backlog(&self, from: u64, out: &[Arc<Message>], r: &Read) {
        let Read::Messages(n) = *r else { return };
        if self.transport == Transport::LongPoll {
            return;
        }
        let k = ((self.joined_seq - from) as usize).min(n);
        let batch = &out[out.len() - n..][..k];
        let bytes: usize = batch.iter().map(|m| m.body.len()).sum();
        self.hub
            .inner
            .metrics
            .delivered(self.transport, k as u64, bytes as u64);
    }

    /// Resolves once the next message this subscription needs has left the buffer. A
    /// transport stuck writing to a client that stopped reading selects on this, so the slow
    /// client is let go when it falls behind, not only when (if ever) it reads again.
    pub async fn fell_behind(&self) {
        loop {
            let notified = self.channel.notify_here().notified();
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
            let from = self.next_seq;
            let notified = self.channel.notify_here().notified();
            tokio::pin!(notified);
            // Register before looking, so an append between the look and the wait still wakes us.
            notified.as_mut().enable();
            match self.channel.read(&mut self.next_seq, out, max) {
                Read::Empty => notified.await,
                r => {
                    if from < self.joined_seq {
                        self.count_backlog(from, out, &r);
                    }
                    return r;
                }
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
    use super::store::contract::{msg, name};
    use super::*;

    fn hub() -> Hub {
        Hub::new(Arc::new(Config::default()), Arc::new(Metrics::new()))
    }

    /// `n` subscribers of `channel` that read everything as it comes, counting what they read.
    async fn readers(h: &Hub, channel: &str, n: usize) -> Arc<std::sync::atomic::AtomicUsize> {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..n {
            let mut s = h
                .subscribe(&name(channel), Transport::Sse, Start::Newest, None)
                .await
                .expect("test setup");
            let read = read.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                while let Read::Messages(k) = s.next(&mut out, 64).await {
                    read.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
                    out.clear();
                }
            });
        }
        read
    }

    /// Subscribers on event loops wait on their loop's list and are woken by its relay: each
    /// of them reads every message of a fast publisher (a lost wake-up would leave one waiting
    /// for good), and a loop is told at most once per publish, only while someone waits there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_on_event_loops_are_woken_from_their_loop_and_miss_nothing() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        const PER_LOOP: usize = 50;
        const MESSAGES: usize = 400;
        let mut config = Config::default();
        config.server.event_loops = 2;
        config.channels.buffer.buffer_messages = MESSAGES;
        let h = Hub::new(Arc::new(config), Arc::new(Metrics::new()));
        let gauge = prometheus::IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["loop"])
            .expect("gauge");
        let loops = crate::event_loop::EventLoops::start(2, &gauge)
            .await
            .expect("loops");
        h.start_loop_relays(loops.handles());
        let read = Arc::new(AtomicUsize::new(0));
        let (joined_tx, mut joined) = tokio::sync::mpsc::unbounded_channel();
        for (i, handle) in loops.handles().iter().enumerate() {
            for _ in 0..PER_LOOP {
                let (h, read, joined_tx) = (h.clone(), read.clone(), joined_tx.clone());
                handle.spawn(async move {
                    let mut s = h
                        .subscribe(&name("looped"), Transport::Sse, Start::Newest, None)
                        .await
                        .expect("test setup");
                    assert_eq!(crate::event_loop::current(), i + 1);
                    let _ = joined_tx.send(());
                    let mut out = Vec::new();
                    let mut expect = 1;
                    while let Read::Messages(_) = s.next(&mut out, 64).await {
                        for m in out.drain(..) {
                            assert_eq!(m.body, expect.to_string().as_bytes(), "in order");
                            expect += 1;
                            read.fetch_add(1, Relaxed);
                        }
                    }
                });
            }
        }
        for _ in 0..2 * PER_LOOP {
            joined.recv().await.expect("a subscriber joined");
        }
        let relays = h.inner.loop_relays.clone();
        for k in 1..=MESSAGES {
            h.publish(&name("looped"), msg(&k.to_string()))
                .await
                .expect("published");
            if k % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let want = 2 * PER_LOOP * MESSAGES;
        let deadline = Instant::now() + Duration::from_secs(20);
        while read.load(Relaxed) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            read.load(Relaxed),
            want,
            "every subscriber read every message"
        );
        let posted = relays.posted();
        assert!(
            (1..=2 * MESSAGES as u64).contains(&posted),
            "{posted} posts to the loops for {MESSAGES} publishes"
        );
        // A channel nobody on a loop waits for is posted nowhere.
        let before = relays.posted();
        h.publish(&name("unwatched"), msg("x"))
            .await
            .expect("published");
        assert_eq!(
            relays.posted(),
            before,
            "a post with no waiter on the loops"
        );
        // Off the loops, the channel's own list: a subscriber here is woken without a post.
        let mut here = h
            .subscribe(&name("looped"), Transport::Sse, Start::Newest, None)
            .await
            .expect("test setup");
        let before = relays.posted();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = tx.send((here.next(&mut out, 64).await, out.len()));
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        h.publish(&name("looped"), msg("last"))
            .await
            .expect("published");
        let got = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("woken")
            .expect("sent");
        assert_eq!(got, (Read::Messages(1), 1));
        assert!(relays.posted() - before <= 2, "one post per loop at most");
    }

    /// A subscriber woken by a message may take it and leave before the publish has counted
    /// it (on another thread): it is counted all the same. The observer runs in that window
    /// (after the wake-up, before the count) and lets the subscriber go.
    #[tokio::test]
    async fn a_subscriber_that_leaves_right_after_the_wake_up_is_counted() {
        struct LetGo(parking_lot::Mutex<Option<Subscription>>);
        impl HubObserver for LetGo {
            fn message(&self, _m: &Published<'_>) {
                drop(self.0.lock().take());
            }
        }
        let h = hub();
        let sub = h
            .subscribe(&name("lp"), Transport::Sse, Start::Newest, None)
            .await
            .expect("test setup");
        h.set_observer(
            "let-go",
            Some(Arc::new(LetGo(parking_lot::Mutex::new(Some(sub))))),
        );
        h.publish(&name("lp"), msg("m")).await.expect("published");
        assert_eq!(h.metrics().delivered_total(Transport::Sse), 1);
        assert_eq!(h.get("lp").map(|c| c.subscriber_count()), Some(0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_to_a_busy_channel_is_answered_once_its_subscribers_are_close() {
        let h = hub();
        let n = channel::PACE_MIN_SUBSCRIBERS + 200;
        let read = readers(&h, "busy", n).await;
        // A channel with few subscribers is not paced.
        let _few = readers(&h, "quiet", 10).await;
        let (_, paced) = h.append_local(&name("quiet"), msg("q")).expect("published");
        assert!(paced.is_none());
        let behind = channel::PACE_BEHIND as usize;
        for k in 1..=behind + 12 {
            h.publish(&name("busy"), msg(&k.to_string()))
                .await
                .expect("published");
            // 99 % of the subscribers have read the one PACE_BEHIND before, and so every one
            // before that.
            let got = read.load(std::sync::atomic::Ordering::Relaxed);
            let want = k.saturating_sub(behind) * (n * 99 / 100);
            assert!(
                got >= want,
                "after publish {k}: {got} reads by {n} subscribers, {want} expected"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_that_do_not_read_hold_a_paced_publish_up_only_briefly() {
        let h = hub();
        let mut idle = Vec::new();
        for _ in 0..channel::PACE_MIN_SUBSCRIBERS + 10 {
            idle.push(
                h.subscribe(&name("stuck"), Transport::Sse, Start::Newest, None)
                    .await
                    .expect("test setup"),
            );
        }
        let publishes = async {
            for k in 0..10 {
                h.publish(&name("stuck"), msg(&k.to_string()))
                    .await
                    .expect("published");
            }
        };
        tokio::time::timeout(Duration::from_secs(20), publishes)
            .await
            .expect("paced publishes are answered even when nobody reads");
        drop(idle);
    }

    #[tokio::test]
    async fn ids_from_before_this_process_report_a_gap() {
        let h = hub();
        let old = MessageId { ms: 1_000, seq: 0 };
        let s = h
            .subscribe(&name("new"), Transport::LongPoll, Start::After(old), None)
            .await
            .expect("test setup");
        assert!(s.gap(), "what happened before the restart cannot be known");
        let head = s.channel().head_id();
        drop(s);
        let s = h
            .subscribe(&name("new"), Transport::LongPoll, Start::After(head), None)
            .await
            .expect("test setup");
        assert!(!s.gap(), "the idle channel's head is a clean position");
    }

    /// A body cut from a connection's read buffer (as hyper and tungstenite hand them over)
    /// must not keep that whole buffer alive for as long as the message is buffered.
    #[tokio::test]
    async fn a_buffered_message_does_not_pin_the_buffer_it_was_read_from() {
        let h = hub();
        let read_buf = Bytes::from(vec![b'x'; 8192]);
        let head = Bytes::from(b"HTTP/1.1 text/plain\r\n".to_vec());
        let m = NewMessage {
            event: None,
            content_type: http::HeaderValue::from_maybe_shared(head.slice(9..19))
                .expect("test setup"),
            body: read_buf.slice(100..200),
            headers: http::HeaderMap::new(),
        };
        let mut s = h
            .subscribe(&name("p"), Transport::Sse, Start::Newest, None)
            .await
            .expect("test setup");
        h.publish(&name("p"), m).await.expect("test setup");
        let mut out = Vec::new();
        s.next(&mut out, 10).await;
        let stored = &out[0];
        assert_eq!(stored.body, read_buf.slice(100..200));
        let inside = |p: *const u8, b: &Bytes| b.as_ptr_range().contains(&p);
        assert!(!inside(stored.body.as_ptr(), &read_buf), "body copied");
        assert_eq!(stored.content_type, "text/plain");
        assert!(
            !inside(stored.content_type.as_bytes().as_ptr(), &head),
            "content type copied"
        );
    }

    #[tokio::test]
    async fn buffered_messages_keep_a_channel() {
        let h = hub();
        h.publish(&name("b"), msg("x")).await.expect("test setup");
        h.sweep();
        assert_eq!(h.channel_count(), 1, "buffered messages keep it");
    }
}
