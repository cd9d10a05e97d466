//! What a subscriber connection reads, whatever its transport: the messages of one channel,
//! or of several (a multiplexed subscription, `/live/a,b,c`) in the order the hub appended
//! them; each marked with its channel and with whether a gap precedes it, the location's
//! `on_lag` policy applied.
//!
//! A single-channel feed keeps its one subscription inline (an idle subscriber costs what it
//! did before multiplexing); a multiplexed one waits on every channel's notification at once,
//! each armed once per wake-up, so a channel it is not subscribed to costs it nothing.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::futures::OwnedNotified;

use crate::config::OnLag;
use crate::hub::{CloseReason, Message, MessageId, Read, Subscription};
use crate::metrics::{DropReason, Metrics};
use crate::model::Transport;

/// Messages taken from one channel per wake-up at most: a subscriber that is behind gets
/// this many in one write.
pub const BATCH: usize = 256;

/// Slots a connection's batch buffers keep between wake-ups. A subscriber that once caught
/// up with a large batch must not hold that batch's peak for the rest of its life: 10,000
/// subscribers × 256 slots of frames and items is over 100 MiB (measured in fanout-ws-max).
const KEPT_SLOTS: usize = 16;

/// Empties a batch buffer, giving back what a large batch made it grow to.
pub fn release<T>(v: &mut Vec<T>) {
    v.clear();
    if v.capacity() > KEPT_SLOTS {
        v.shrink_to(KEPT_SLOTS);
    }
}

/// One thing to send.
#[derive(Debug)]
pub enum Item {
    Message {
        msg: Arc<Message>,
        /// Which of the feed's channels (the order the client named them).
        chan: usize,
        /// Messages before this one are gone for this subscriber (it fell behind, or resumed
        /// from before the buffer): tell it, in band, before this message.
        gap: bool,
    },
    /// Channel `chan` was deleted; the others go on (a multiplexed feed only).
    Ended(usize),
}

/// Reads what there is (waiting for it): the feed's [`Feed::next`] without its expiry.
async fn read_next(
    kind: &mut Kind,
    scratch: &mut Vec<Arc<Message>>,
    out: &mut Vec<Item>,
    max: usize,
    on_lag: OnLag,
    metrics: &Metrics,
) -> Next {
    match kind {
        Kind::One(sub) => loop {
            match sub.next(scratch, max).await {
                Read::Messages(_) => {
                    let mut gap = sub.take_gap();
                    for msg in scratch.drain(..) {
                        out.push(Item::Message {
                            msg,
                            chan: 0,
                            gap: std::mem::take(&mut gap),
                        });
                    }
                    return Next::Items;
                }
                Read::Lagged => match on_lag {
                    OnLag::Skip => sub.skip_to_oldest(),
                    OnLag::Disconnect => {
                        metrics.dropped(DropReason::Lagged);
                        return Next::Lagged;
                    }
                },
                Read::Closed(r) => return Next::Closed(r),
                // `next` waits instead of answering Empty.
                Read::Empty => {}
            }
        },
        Kind::Many(m) => loop {
            m.arm();
            match m.read(scratch, out, on_lag, max) {
                Some(r) => {
                    if r == Next::Lagged {
                        metrics.dropped(DropReason::Lagged);
                    }
                    return r;
                }
                None => m.wait().await,
            }
        },
    }
}

/// What [`Feed::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Items were appended.
    Items,
    /// A channel fell behind and the location says `on_lag = "disconnect"`: end the stream
    /// (counted; the client reconnects with its position and learns of the gap).
    Lagged,
    /// Every channel is over.
    Closed(CloseReason),
    /// The permission it was opened with ended (a JWT's `exp`): end the stream with the
    /// transport's reconnect hint; the client comes back with a fresh token.
    Expired,
}

pub struct Feed {
    kind: Kind,
    on_lag: OnLag,
    /// The location's `channel_prefix`: names are shown to the client without it.
    prefix_len: usize,
    /// `crier_connections{transport}` counts this connection once, however many channels.
    metrics: Arc<Metrics>,
    transport: Transport,
    /// Read buffer, reused across wake-ups.
    scratch: Vec<Arc<Message>>,
    /// When the permission ends (boxed: most feeds have none).
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Who to name in the access log's disconnect line (boxed; None with the log off).
    access: Option<Box<Accessed>>,
}

/// A subscriber connection as the access log names it.
struct Accessed {
    peer: std::net::SocketAddr,
    channels: Box<str>,
    since: std::time::Instant,
}

enum Kind {
    One(Subscription),
    Many(Box<Many>),
}

struct Many {
    chans: Vec<Entry>,
}

struct Entry {
    /// None once the channel was deleted (its place in a cursor stays).
    sub: Option<Subscription>,
    /// The client's name for it (without the location's prefix).
    name: Box<str>,
    /// The id of the last message handed over, or where the subscription started: its part
    /// of the cursor.
    pos: MessageId,
    /// The channel's notification, armed (registered before looking) between wake-ups.
    wait: Option<Pin<Box<OwnedNotified>>>,
}

impl Feed {
    /// A feed over `subs` (at least one), counted as one connection of `transport`.
    pub fn new(
        mut subs: Vec<Subscription>,
        transport: Transport,
        prefix_len: usize,
        on_lag: OnLag,
        metrics: Arc<Metrics>,
    ) -> Feed {
        metrics.subscriber_connected(transport);
        let kind = if subs.len() == 1 {
            Kind::One(subs.remove(0))
        } else {
            Kind::Many(Box::new(Many {
                chans: subs
                    .into_iter()
                    .map(|s| Entry::new(s, prefix_len))
                    .collect(),
            }))
        };
        Feed {
            kind,
            on_lag,
            prefix_len,
            metrics,
            transport,
            scratch: Vec::new(),
            expiry: None,
            access: None,
        }
    }

    /// Logs the connect in the access log (when it is on), and the disconnect when the feed
    /// is dropped.
    pub fn log_access(&mut self, peer: std::net::SocketAddr, channels: &str) {
        if crate::access_log::on() {
            crate::access_log::subscriber(peer, self.transport, channels, None);
            self.access = Some(Box::new(Accessed {
                peer,
                channels: channels.into(),
                since: std::time::Instant::now(),
            }));
        }
    }

    /// True for a multiplexed feed (its messages go out as crier.json envelopes that name
    /// their channel), including one that started with one channel and was given more.
    pub fn is_multiplexed(&self) -> bool {
        matches!(self.kind, Kind::Many(_))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The length of the location's `channel_prefix` (the key of shared encodings).
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }

    /// The client's name of channel `chan`.
    pub fn name(&self, chan: usize) -> &str {
        match &self.kind {
            Kind::One(s) => &s.channel().name[self.prefix_len.min(s.channel().name.len())..],
            Kind::Many(m) => m.chans.get(chan).map_or("", |e| &e.name),
        }
    }

    /// How many channels (a multiplexed feed keeps deleted ones' places).
    pub fn len(&self) -> usize {
        match &self.kind {
            Kind::One(_) => 1,
            Kind::Many(m) => m.chans.len(),
        }
    }

    /// The single subscription of a one-channel feed.
    pub fn single(&self) -> Option<&Subscription> {
        match &self.kind {
            Kind::One(s) => Some(s),
            Kind::Many(_) => None,
        }
    }

    /// Whether the start position of any channel had a gap (`Crier-Resume: gap`).
    pub fn started_with_gap(&self) -> bool {
        match &self.kind {
            Kind::One(s) => s.gap(),
            Kind::Many(m) => m
                .chans
                .iter()
                .any(|e| e.sub.as_ref().is_some_and(Subscription::gap)),
        }
    }

    /// Records that `item` reached the connection: its channel's cursor position moves.
    pub fn delivered(&mut self, item: &Item) {
        if let (Kind::Many(m), Item::Message { msg, chan, .. }) = (&mut self.kind, item) {
            if let Some(e) = m.chans.get_mut(*chan) {
                e.pos = msg.id;
            }
        }
    }

    /// Channel `chan`'s position (the id of its last message handed over, or where it
    /// started).
    pub fn write_position(&self, chan: usize, out: &mut Vec<u8>) {
        use std::io::Write;
        let pos = match &self.kind {
            Kind::One(s) => Some(s.start_after()),
            Kind::Many(m) => m.chans.get(chan).map(|e| e.pos),
        };
        if let Some(p) = pos {
            let _ = write!(out, "{p}");
        }
    }

    /// The compound cursor (a multiplexed feed): every channel's position, in the order the
    /// client named them, joined by `,`.
    pub fn write_cursor(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        if let Kind::Many(m) = &self.kind {
            for (i, e) in m.chans.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = write!(out, "{}", e.pos);
            }
        }
    }

    /// Adds a channel (a crier.json WebSocket's `subscribe`): a one-channel feed becomes a
    /// multiplexed one. Returns its index.
    pub fn add(&mut self, sub: Subscription) -> usize {
        let prefix_len = self.prefix_len;
        let empty = Kind::Many(Box::new(Many { chans: Vec::new() }));
        let mut many = match std::mem::replace(&mut self.kind, empty) {
            Kind::One(first) => Box::new(Many {
                chans: vec![Entry::new(first, prefix_len)],
            }),
            Kind::Many(m) => m,
        };
        many.chans.push(Entry::new(sub, prefix_len));
        let i = many.chans.len() - 1;
        self.kind = Kind::Many(many);
        i
    }

    /// Drops the channel the client calls `name` (a WebSocket's `unsubscribe`); false when
    /// the feed has no such channel. A feed left with none waits for the next `add`.
    pub fn remove(&mut self, name: &str) -> bool {
        if !self.has(name) {
            return false;
        }
        if let Kind::One(_) = self.kind {
            let Kind::One(only) = std::mem::replace(
                &mut self.kind,
                Kind::Many(Box::new(Many { chans: Vec::new() })),
            ) else {
                return false;
            };
            drop(only);
            return true;
        }
        match &mut self.kind {
            Kind::One(_) => false,
            Kind::Many(m) => match m.chans.iter().position(|e| &*e.name == name) {
                Some(i) => {
                    m.chans.remove(i);
                    true
                }
                None => false,
            },
        }
    }

    /// Whether the feed reads the channel the client calls `name`.
    pub fn has(&self, name: &str) -> bool {
        match &self.kind {
            Kind::One(_) => self.name(0) == name,
            Kind::Many(m) => m.chans.iter().any(|e| e.sub.is_some() && &*e.name == name),
        }
    }

    /// Waits for what to send next and appends it to `out`: up to `max` messages of each
    /// channel. Cancel-safe: positions move only in the poll that returns.
    pub async fn next(&mut self, out: &mut Vec<Item>, max: usize) -> Next {
        let Feed {
            kind,
            on_lag,
            metrics,
            scratch,
            expiry,
            ..
        } = self;
        let read = read_next(kind, scratch, out, max, *on_lag, metrics);
        match expiry {
            None => read.await,
            Some(at) => tokio::select! {
                biased;
                _ = at.as_mut() => Next::Expired,
                r = read => r,
            },
        }
    }

    /// Ends the feed at `until` (a JWT's expiry): `next` then answers [`Next::Expired`].
    pub fn expire_at(&mut self, until: Option<std::time::SystemTime>) {
        if let Some(t) = until {
            let left = t
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            self.expiry = Some(Box::pin(tokio::time::sleep(left)));
        }
    }

    /// Resolves once some channel's next message left the buffer: a transport stuck writing
    /// to a client that stopped reading selects on this under `on_lag = "disconnect"`.
    pub async fn fell_behind(&self) {
        match &self.kind {
            Kind::One(s) => s.fell_behind().await,
            Kind::Many(m) => {
                let futs: Vec<_> = m
                    .chans
                    .iter()
                    .filter_map(|e| e.sub.as_ref())
                    .map(|s| Box::pin(s.fell_behind()))
                    .collect();
                if futs.is_empty() {
                    return std::future::pending().await;
                }
                futures_util::future::select_all(futs).await;
            }
        }
    }

    pub fn on_lag(&self) -> OnLag {
        self.on_lag
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.metrics.subscriber_disconnected(self.transport);
        if let Some(a) = self.access.take() {
            let d = a.since.elapsed();
            crate::access_log::subscriber(a.peer, self.transport, &a.channels, Some(d));
        }
    }
}

impl Entry {
    fn new(sub: Subscription, prefix_len: usize) -> Entry {
        let full = &sub.channel().name;
        Entry {
            name: full[prefix_len.min(full.len())..].into(),
            pos: sub.start_after(),
            sub: Some(sub),
            wait: None,
        }
    }
}

impl Many {
    /// Registers for every live channel's next append that is not registered yet, before
    /// looking (an append between the look and the wait still wakes).
    fn arm(&mut self) {
        for e in &mut self.chans {
            let Some(sub) = &e.sub else { continue };
            if e.wait.is_none() {
                let mut n = Box::pin(sub.channel().notify_here().clone().notified_owned());
                n.as_mut().enable();
                e.wait = Some(n);
            }
        }
    }

    /// Reads every channel; None when there is nothing to report yet.
    fn read(
        &mut self,
        scratch: &mut Vec<Arc<Message>>,
        out: &mut Vec<Item>,
        on_lag: OnLag,
        max: usize,
    ) -> Option<Next> {
        let start = out.len();
        let mut live = 0;
        for (i, e) in self.chans.iter_mut().enumerate() {
            let Some(sub) = &mut e.sub else { continue };
            loop {
                match sub.try_read(scratch, max) {
                    Read::Messages(_) => {
                        let mut gap = sub.take_gap();
                        for msg in scratch.drain(..) {
                            out.push(Item::Message {
                                msg,
                                chan: i,
                                gap: std::mem::take(&mut gap),
                            });
                        }
                    }
                    Read::Empty => {}
                    Read::Lagged => match on_lag {
                        OnLag::Skip => {
                            sub.skip_to_oldest();
                            continue;
                        }
                        OnLag::Disconnect => return Some(Next::Lagged),
                    },
                    Read::Closed(CloseReason::ShuttingDown) => {
                        return Some(Next::Closed(CloseReason::ShuttingDown))
                    }
                    Read::Closed(CloseReason::Deleted) => {
                        e.sub = None;
                        e.wait = None;
                        out.push(Item::Ended(i));
                    }
                }
                break;
            }
            live += usize::from(e.sub.is_some());
        }
        if out.len() > start {
            // One order across channels: by the millisecond of the id (the clock of whoever
            // assigned it: this node, or the channels' Redis), then by the hub's order of
            // appends. Append order alone is not enough: a node that opens a channel after
            // others loads its whole tail from the engine at once (a cluster node resuming
            // channels it did not listen to), appending it after newer messages of the others.
            out[start..].sort_by_key(|item| match item {
                Item::Message { msg, .. } => (msg.id.ms, msg.order()),
                Item::Ended(_) => (u64::MAX, u64::MAX),
            });
            return Some(Next::Items);
        }
        // Every channel deleted (one unsubscribed from all waits for its next subscribe).
        (live == 0 && !self.chans.is_empty()).then_some(Next::Closed(CloseReason::Deleted))
    }

    /// Waits until some armed channel is notified; those that fired are re-armed next time.
    async fn wait(&mut self) {
        poll_fn(|cx| {
            let mut fired = false;
            for e in &mut self.chans {
                if let Some(w) = &mut e.wait {
                    if std::future::Future::poll(w.as_mut(), cx).is_ready() {
                        e.wait = None;
                        fired = true;
                    }
                }
            }
            if fired {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::hub::store::contract::{msg, name};
    use crate::hub::{Hub, Start};

    fn hub(buffer: usize) -> Hub {
        let mut c = Config::default();
        c.channels.buffer.buffer_messages = buffer;
        Hub::new(Arc::new(c), Arc::new(Metrics::new()))
    }

    async fn feed(h: &Hub, chans: &[&str], on_lag: OnLag) -> Feed {
        let mut subs = Vec::new();
        for c in chans {
            subs.push(
                h.subscribe(&name(c), Transport::Sse, Start::Newest, None)
                    .await
                    .expect("test setup"),
            );
        }
        Feed::new(subs, Transport::Sse, 0, on_lag, h.metrics().clone())
    }

    fn bodies(items: &[Item], f: &Feed) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Item::Message { msg, chan, gap } => format!(
                    "{}:{}{}",
                    f.name(*chan),
                    String::from_utf8_lossy(&msg.body),
                    if *gap { "!" } else { "" }
                ),
                Item::Ended(c) => format!("{} ended", f.name(*c)),
            })
            .collect()
    }

    #[tokio::test]
    async fn several_channels_come_in_append_order_with_one_cursor() {
        let h = hub(100);
        let mut f = feed(&h, &["a", "b", "c"], OnLag::Skip).await;
        for (c, b) in [("b", "1"), ("a", "2"), ("c", "3"), ("b", "4")] {
            h.publish(&name(c), msg(b)).await.expect("test setup");
        }
        let mut out = Vec::new();
        assert_eq!(f.next(&mut out, BATCH).await, Next::Items);
        assert_eq!(bodies(&out, &f), ["b:1", "a:2", "c:3", "b:4"]);
        for i in &out {
            f.delivered(i);
        }
        let mut cursor = Vec::new();
        f.write_cursor(&mut cursor);
        let cursor = String::from_utf8(cursor).expect("ascii");
        assert_eq!(cursor.split(',').count(), 3, "{cursor}");
        let Item::Message { msg: last_b, .. } = &out[3] else {
            panic!()
        };
        assert_eq!(
            cursor.split(',').nth(1),
            Some(last_b.id.to_string().as_str())
        );
    }

    #[tokio::test]
    async fn a_lagging_subscriber_skips_to_the_oldest_and_is_told() {
        let h = hub(3);
        let mut one = feed(&h, &["x"], OnLag::Skip).await;
        let mut many = feed(&h, &["x", "y"], OnLag::Skip).await;
        let mut strict = feed(&h, &["x"], OnLag::Disconnect).await;
        for i in 0..5 {
            h.publish(&name("x"), msg(&i.to_string()))
                .await
                .expect("test setup");
        }
        let mut out = Vec::new();
        assert_eq!(one.next(&mut out, BATCH).await, Next::Items);
        assert_eq!(bodies(&out, &one), ["x:2!", "x:3", "x:4"]);
        out.clear();
        assert_eq!(many.next(&mut out, BATCH).await, Next::Items);
        assert_eq!(bodies(&out, &many), ["x:2!", "x:3", "x:4"]);
        assert_eq!(strict.next(&mut Vec::new(), BATCH).await, Next::Lagged);
    }

    #[tokio::test]
    async fn a_deleted_channel_ends_alone() {
        let h = hub(100);
        let mut f = feed(&h, &["p", "q"], OnLag::Skip).await;
        h.delete("p").await.expect("test setup");
        let mut out = Vec::new();
        assert_eq!(f.next(&mut out, BATCH).await, Next::Items);
        assert_eq!(bodies(&out, &f), ["p ended"]);
        h.publish(&name("q"), msg("still"))
            .await
            .expect("test setup");
        out.clear();
        assert_eq!(f.next(&mut out, BATCH).await, Next::Items);
        assert_eq!(bodies(&out, &f), ["q:still"]);
        h.delete("q").await.expect("test setup");
        out.clear();
        assert_eq!(f.next(&mut out, BATCH).await, Next::Items);
        out.clear();
        assert_eq!(
            f.next(&mut out, BATCH).await,
            Next::Closed(CloseReason::Deleted)
        );
    }

    #[tokio::test]
    async fn connections_are_counted_once() {
        let h = hub(100);
        let f = feed(&h, &["m1", "m2", "m3"], OnLag::Skip).await;
        assert_eq!(h.metrics().subscribers(Transport::Sse), 1);
        assert_eq!(
            h.stats("m2")
                .await
                .expect("ok")
                .expect("exists")
                .subscribers,
            1
        );
        drop(f);
        assert_eq!(h.metrics().subscribers(Transport::Sse), 0);
    }
}
