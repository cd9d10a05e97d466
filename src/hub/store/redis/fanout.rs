//! One task per shard: the pub/sub connection, and every local tail it feeds.
//!
//! The task alone appends to the tails of its shard's channels, in the order the fan-out
//! brings entries, so each tail only grows along its channel's chain of ids: an entry whose
//! previous id is the tail's head is appended; one at or below the head is already here; any
//! other is a hole, filled from the stream (XRANGE after the head) or, when the stream has
//! lost it too, told to subscribers as a gap (`Channel::restart_at`).
//!
//! A lost connection (Redis restarted, `CLIENT KILL`, a network cut) or a wedged one (alive
//! on TCP, delivering nothing: a probe published through the command connection did not come
//! back) is replaced, with backoff; then every active topic is subscribed again and every
//! active channel caught up from the stream, so nothing still in the stream is missed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::script::{self, Entry, Fanout, Keys};
use super::{floor_before, message, Op, Shard, TableChange, COMMAND_TIMEOUT};
use crate::hub::{Channel, Hub, HubError};

/// A channel with no local subscriber stays subscribed this long (a long-poll client comes
/// back within it, and finds its tail up to date).
const LINGER: Duration = Duration::from_secs(5);
/// A pub/sub connection that received nothing for this long gets a probe; one that received
/// nothing for this long after the probe is replaced.
const PROBE_EVERY: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Most topics named in one SUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 1000;

/// Why the connection is being replaced.
struct Lost(String);

impl From<HubError> for Lost {
    fn from(e: HubError) -> Lost {
        Lost(e.to_string())
    }
}

impl From<::redis::RedisError> for Lost {
    fn from(e: ::redis::RedisError) -> Lost {
        Lost(e.to_string())
    }
}

pub(super) async fn run(
    shard: Arc<Shard>,
    hub: Hub,
    mut ops: mpsc::UnboundedReceiver<Op>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut sessions = 0u64;
    loop {
        let session = Session::new(&shard, &hub, sessions);
        let started = Instant::now();
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = session.run(&mut ops) => r,
        };
        let Err(Lost(why)) = r;
        if session.connected.load(std::sync::atomic::Ordering::Relaxed) {
            sessions += 1;
            tracing::warn!(
                shard = shard.name,
                "cluster fan-out lost: {why}; reconnecting"
            );
        } else {
            // Once per attempt while Redis stays away: the loss itself was logged.
            tracing::debug!(shard = shard.name, "cluster fan-out: {why}");
        }
        if started.elapsed() > BACKOFF_MAX * 5 {
            backoff = BACKOFF_MIN; // it was up a while: this is a new outage
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One pub/sub connection's life.
struct Session<'a> {
    shard: &'a Arc<Shard>,
    hub: &'a Hub,
    probe: String,
    /// Sessions that connected before this one (0: the first connection, not a reconnect).
    before: u64,
    connected: std::sync::atomic::AtomicBool,
}

impl<'a> Session<'a> {
    fn new(shard: &'a Arc<Shard>, hub: &'a Hub, before: u64) -> Session<'a> {
        Session {
            shard,
            hub,
            before,
            connected: std::sync::atomic::AtomicBool::new(false),
            probe: format!("{}probe:{}", shard.prefix, shard.node),
        }
    }

    async fn run(
        &self,
        ops: &mut mpsc::UnboundedReceiver<Op>,
    ) -> Result<std::convert::Infallible, Lost> {
        let shard = self.shard;
        let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, shard.client.get_async_pubsub())
            .await
            .map_err(|_| Lost("no answer to connect".into()))??;
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed: HashSet<Arc<str>> = HashSet::new();
        timed(sink.subscribe(&self.probe)).await?;
        let mut tables = self.follow_tables(&mut sink, &mut Vec::new()).await?;
        // Every channel active now: subscribe, then catch up (what the fan-out brings
        // meanwhile waits in the stream and is found to be here already).
        let names: Vec<Arc<str>> = shard.active.lock().keys().cloned().collect();
        for batch in names.chunks(SUBSCRIBE_BATCH) {
            let topics: Vec<String> = batch
                .iter()
                .map(|n| script::topic(&shard.prefix, n))
                .collect();
            timed(sink.subscribe(&topics)).await?;
            subscribed.extend(batch.iter().cloned());
        }
        for name in &names {
            let Some((chan, loaded)) = self.lookup(name) else {
                continue;
            };
            if loaded {
                self.catch_up(&chan).await?;
            } else {
                self.load(&chan).await?;
            }
            shard.loaded(&chan);
        }
        shard.set_connected(true);
        self.connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _up = Up(shard);
        if self.before > 0 {
            shard.metrics.cluster_reconnects.inc();
            tracing::info!(
                shard = shard.name,
                "cluster fan-out connected again, {} channels caught up",
                names.len()
            );
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut heard = Instant::now();
        let mut probed: Option<Instant> = None;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Err(Lost("connection closed".into()));
                    };
                    heard = Instant::now();
                    probed = None;
                    let topic = msg.get_channel_name();
                    if topic == self.probe {
                        continue;
                    }
                    if tables.iter().any(|t| t == topic) {
                        self.table_change(topic, msg.get_payload_bytes());
                        continue;
                    }
                    let Some(name) = script::channel_of_topic(&shard.prefix, topic) else {
                        continue;
                    };
                    let payload = bytes::Bytes::copy_from_slice(msg.get_payload_bytes());
                    match script::parse_fanout(payload) {
                        Some(Fanout::Messages(es)) => self.received(name, es).await?,
                        Some(Fanout::Deleted(node)) => self.deleted(name, &node),
                        None => tracing::debug!(topic, "fan-out message not understood"),
                    }
                }
                op = ops.recv() => {
                    let name = match op {
                        Some(Op::Open(name)) => name,
                        Some(Op::Follow) => {
                            tables = self.follow_tables(&mut sink, &mut tables).await?;
                            continue;
                        }
                        // Not reached: the shard (which holds the sender) outlives this task.
                        None => return Err(Lost("engine dropped".into())),
                    };
                    // Channels opened together (a reconnect storm of clients, a multiplexed
                    // subscription) are subscribed with one SUBSCRIBE.
                    let mut names = vec![name];
                    while names.len() < SUBSCRIBE_BATCH {
                        match ops.try_recv() {
                            Ok(Op::Open(n)) => names.push(n),
                            Ok(Op::Follow) => {
                                tables = self.follow_tables(&mut sink, &mut tables).await?;
                            }
                            Err(_) => break,
                        }
                    }
                    names.sort_unstable();
                    names.dedup();
                    let todo: Vec<(Arc<str>, Arc<Channel>)> = names
                        .into_iter()
                        .filter_map(|n| match self.lookup(&n) {
                            Some((chan, false)) => Some((n, chan)),
                            _ => None,
                        })
                        .collect();
                    let topics: Vec<String> = todo
                        .iter()
                        .filter(|(n, _)| !subscribed.contains(n))
                        .map(|(n, _)| script::topic(&shard.prefix, n))
                        .collect();
                    if !topics.is_empty() {
                        timed(sink.subscribe(&topics)).await?;
                    }
                    subscribed.extend(todo.iter().map(|(n, _)| n.clone()));
                    for (_, chan) in &todo {
                        self.load(chan).await?;
                        shard.loaded(chan);
                    }
                }
                _ = tick.tick() => {
                    let idle = self.idle(&mut subscribed);
                    for batch in idle.chunks(SUBSCRIBE_BATCH) {
                        let topics: Vec<String> = batch
                            .iter()
                            .map(|n| script::topic(&shard.prefix, n))
                            .collect();
                        timed(sink.unsubscribe(&topics)).await?;
                    }
                    match probed {
                        Some(at) if at.elapsed() >= PROBE_EVERY => {
                            return Err(Lost(format!(
                                "the pub/sub connection delivered nothing for {}s, not even a probe",
                                (PROBE_EVERY * 2).as_secs()
                            )));
                        }
                        None if heard.elapsed() >= PROBE_EVERY => {
                            shard
                                .query::<i64>(::redis::cmd("PUBLISH").arg(&self.probe).arg("p"))
                                .await?;
                            probed = Some(Instant::now());
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Subscribes to the shared tables' topics not in `have` yet and tells their followers to
    /// read their table again (what changed while nobody listened is in it). Returns every
    /// table topic subscribed now.
    async fn follow_tables(
        &self,
        sink: &mut ::redis::aio::PubSubSink,
        have: &mut Vec<String>,
    ) -> Result<Vec<String>, Lost> {
        let tables: Vec<(String, mpsc::UnboundedSender<TableChange>)> =
            self.shard.tables.lock().clone();
        let mut now = std::mem::take(have);
        for (topic, follower) in tables {
            if !now.contains(&topic) {
                timed(sink.subscribe(&topic)).await?;
                now.push(topic.clone());
            }
            let _ = follower.send(TableChange::Reload);
        }
        Ok(now)
    }

    fn table_change(&self, topic: &str, payload: &[u8]) {
        let Some(change) = super::table::parse_change(payload, &self.shard.node) else {
            return;
        };
        let tables = self.shard.tables.lock();
        if let Some((_, follower)) = tables.iter().find(|(t, _)| t == topic) {
            let _ = follower.send(change);
        }
    }

    /// The active channel of that name, and whether its tail is loaded.
    fn lookup(&self, name: &str) -> Option<(Arc<Channel>, bool)> {
        let active = self.shard.active.lock();
        active
            .get(name)
            .map(|a| (a.chan.clone(), a.waiting.is_none()))
    }

    /// Channels with no local subscriber for [`LINGER`] (or no longer active): let go.
    fn idle(&self, subscribed: &mut HashSet<Arc<str>>) -> Vec<Arc<str>> {
        let mut gone = Vec::new();
        let mut active = self.shard.active.lock();
        for name in subscribed.iter() {
            let keep = match active.get_mut(name) {
                None => false,
                Some(a) if a.waiting.is_some() || a.chan.subscriber_count() > 0 => {
                    a.idle_since = None;
                    true
                }
                Some(a) => match a.idle_since {
                    None => {
                        a.idle_since = Some(Instant::now());
                        true
                    }
                    Some(t) => t.elapsed() < LINGER,
                },
            };
            if !keep {
                active.remove(name);
                gone.push(name.clone());
            }
        }
        for name in &gone {
            subscribed.remove(name);
        }
        gone
    }

    /// The entries of one publish call from the fan-out, in id order.
    async fn received(&self, name: &str, entries: Vec<Entry>) -> Result<(), Lost> {
        let Some((chan, true)) = self.lookup(name) else {
            return Ok(()); // not loaded yet: the load reads them from the stream
        };
        let mut entries = entries.into_iter();
        while let Some(e) = entries.next() {
            let head = chan.head_id();
            if e.id <= head {
                continue;
            }
            if e.prev == head {
                self.hub.append_fanout(&chan, message(e, true));
                continue;
            }
            // A hole: what came between the head and this entry is in the stream, or lost.
            // The read brings the rest of this call's entries too (they were stored with it);
            // they are chained after it, in case the stream has lost them meanwhile.
            self.catch_up(&chan).await?;
            self.chain(&chan, std::iter::once(e).chain(entries).collect(), true);
            return Ok(());
        }
        Ok(())
    }

    /// Another node deleted the channel: close its subscribers here too (this node's own
    /// delete already did).
    fn deleted(&self, name: &str, node: &str) {
        if node == &*self.shard.node {
            return;
        }
        self.shard.active.lock().remove(name);
        let _ = self.hub.remove_deleted(name);
    }

    /// Reads what the stream has after the tail's head, and appends it.
    async fn catch_up(&self, chan: &Arc<Channel>) -> Result<(), Lost> {
        let keys = Keys::of(&self.shard.prefix, &chan.name);
        let v: ::redis::Value = self
            .shard
            .query(
                ::redis::cmd("XRANGE")
                    .arg(&keys.stream)
                    .arg(format!("({}", chan.head_id()))
                    .arg("+"),
            )
            .await?;
        let ::redis::Value::Array(items) = v else {
            return Ok(());
        };
        self.chain(
            chan,
            items.iter().filter_map(script::entry_of).collect(),
            false,
        );
        Ok(())
    }

    /// Appends entries (in id order) along the chain; a break in it is a gap.
    fn chain(&self, chan: &Arc<Channel>, entries: Vec<Entry>, live: bool) {
        for e in entries {
            let head = chan.head_id();
            if e.id <= head {
                continue;
            }
            if e.prev != head {
                tracing::info!(
                    channel = &*chan.name,
                    "messages between {head} and {} are gone from Redis: subscribers are told of the gap",
                    e.id
                );
                self.shard.metrics.cluster_gaps.inc();
                chan.restart_at(floor_before(&e));
            }
            self.hub.append_fanout(chan, message(e, live));
        }
    }

    /// A channel newly active here: its tail is what Redis has (the newest `buffer_messages`
    /// entries), and a resume from before the oldest of them is a gap.
    async fn load(&self, chan: &Arc<Channel>) -> Result<(), Lost> {
        let keys = Keys::of(&self.shard.prefix, &chan.name);
        let policy = chan.policy();
        let meta_ttl = policy.buffer_ttl + super::META_EXTRA;
        let v: ::redis::Value = self
            .shard
            .eval(&script::LOAD, &[&keys.stream, &keys.meta], |c| {
                c.arg(policy.buffer_messages)
                    .arg(meta_ttl.as_millis() as u64);
            })
            .await?;
        let bad = || Lost("unexpected answer to the load script".into());
        let ::redis::Value::Array(parts) = v else {
            return Err(bad());
        };
        let [last, ::redis::Value::Array(newest_first)] = parts.as_slice() else {
            return Err(bad());
        };
        let head = script::bulk(last)
            .and_then(|b| script::parse_id(&b))
            .ok_or_else(bad)?;
        let mut entries: Vec<Entry> = newest_first.iter().filter_map(script::entry_of).collect();
        entries.reverse();
        let floor = entries.first().map_or(head, floor_before);
        chan.restart_at(floor);
        let mut entries = entries.into_iter();
        // The oldest starts the tail (whatever its previous id); the rest must follow it.
        if let Some(first) = entries.next() {
            self.hub.append_fanout(chan, message(first, false));
        }
        self.chain(chan, entries.collect(), false);
        Ok(())
    }
}

/// Resets `crier_cluster_up` when the session ends, however it ends.
struct Up<'a>(&'a Shard);

impl Drop for Up<'_> {
    fn drop(&mut self) {
        self.0.set_connected(false);
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, Lost> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Lost("no answer to SUBSCRIBE".into())),
    }
}
