//! One channel: a bounded, time-limited buffer of messages with strictly increasing ids, and
//! the notification its live subscribers wait on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use tokio::sync::Notify;

use super::expiry::Expiries;
use super::loop_wake::{LoopRelays, LoopWaiters};
use super::message::{Message, MessageId};
use crate::config::BufferPolicy;
use crate::model::Transport;

/// Why a channel stopped serving its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// `DELETE /pub/{channel}`.
    Deleted,
    /// The process is draining (SIGTERM).
    ShuttingDown,
}

/// What a subscriber finds when it reads from its position.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// This many messages were appended to the caller's batch.
    Messages(usize),
    /// Nothing new yet.
    Empty,
    /// Messages after the position already left the buffer: the subscriber fell behind.
    Lagged,
    Closed(CloseReason),
}

pub struct Channel {
    pub name: Arc<str>,
    policy: BufferPolicy,
    /// parking_lot, not a Tokio lock: every critical section is a few pointer moves and no
    /// `.await` ever happens while it is held. Readers (subscribers) share it; only publish,
    /// trim and close take it exclusively.
    state: RwLock<State>,
    /// Woken (all waiters at once) after every append and on close. Notified *after* the
    /// state lock is released, so woken subscribers do not find it still held. Only the
    /// waiters off the event loops are here; those on a loop are in `loop_waiters`.
    notify: Arc<Notify>,
    /// The same for the subscribers on each event loop, woken there (see [`super::loop_wake`]).
    loop_waiters: Box<[LoopWaiters]>,
    loop_relays: Arc<LoopRelays>,
    /// Live subscribers per transport. Changed under the hub's map lock (see `Hub`), so a
    /// channel is never freed while a subscriber is joining it.
    subscribers: [AtomicUsize; Transport::COUNT],
    /// Taken while observers are told of an append, after the state lock: observers hear one
    /// channel's messages in id order without holding readers up (a later append takes this
    /// before it lets the state lock go, so it cannot overtake).
    observing: parking_lot::Mutex<()>,
    /// Where this channel asks to be swept when its oldest message will expire.
    expiries: std::sync::Arc<Expiries>,
    /// Publish pacing on a busy channel (see [`Paced`]).
    pace: Pace,
    /// Put on the sweep's schedule once by [`Channel::free_later`].
    free_scheduled: AtomicBool,
    me: std::sync::Weak<Channel>,
}

/// A publish to a channel with at least this many subscribers is paced (see [`Paced`]).
pub const PACE_MIN_SUBSCRIBERS: usize = 1000;
/// How many messages the subscribers may be behind a paced publish when it is answered:
/// enough that a subscriber still writes several messages per syscall (the fan-out's
/// throughput), few enough that a message waits behind a few others, not a backlog.
/// Delivery latency is one round of writes over the subscribers (a write costs about the
/// same for one message as for eight, most of it the kernel's loopback path), so this window
/// sets the throughput, not the latency: 4 halved deliveries/s at the same p99
/// (benches/issue19-window).
pub const PACE_BEHIND: u64 = 8;
/// The share of the subscribers that must be that close: the rest (stalled or slow
/// clients) do not hold the publisher up.
const PACE_SHARE_PERCENT: usize = 99;
/// The longest a publish is held back.
const PACE_MAX: Duration = Duration::from_millis(25);
/// Paced messages tracked at once: twice the window, so the message a publish waits for is
/// still tracked while as many publishers again append after it.
const PACE_SLOTS: usize = 2 * PACE_BEHIND as usize + 1;

/// How far the readers of the last paced messages are. A slot is set by the append of its
/// message under the state lock and counted by readers under the read lock, so it never
/// changes while a reader looks at it.
#[derive(Default)]
struct PaceSlot {
    /// One past its message's seq (0: none).
    mark: AtomicU64,
    /// Readers that have read past `mark` since it was set, and how many it waits for.
    reached: AtomicUsize,
    target: AtomicUsize,
}

#[derive(Default)]
struct Pace {
    /// Set by the first paced append: until then a read costs one load here, nothing more.
    tracking: std::sync::atomic::AtomicBool,
    slots: [PaceSlot; PACE_SLOTS],
    /// The newest mark whose target was reached.
    done: AtomicU64,
    notify: Notify,
}

/// A publish that waits for its channel's subscribers to come close.
///
/// When a publisher outruns the fan-out, each message queues behind the ones before it in
/// every subscriber, so its delivery latency grows with the backlog. A publish to a busy
/// channel is answered once 99 % of the subscribers have read the message [`PACE_BEHIND`]
/// before it (or after [`PACE_MAX`]): the wait moves to the publisher (its next publish is
/// sent later), publish→delivery stays at a few messages' fan-out, and subscribers still
/// write several messages at a time. The cost: the publisher's rate on such a channel
/// follows the fan-out's, and one atomic add per subscriber per paced message (by the reader
/// that passes it).
pub struct Paced {
    chan: Arc<Channel>,
    /// The mark to wait for.
    mark: u64,
}

impl std::fmt::Debug for Paced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paced")
            .field("channel", &self.chan.name)
            .field("mark", &self.mark)
            .finish()
    }
}

impl Paced {
    /// Resolves once the share of subscribers has read the message it waits for, or after
    /// [`PACE_MAX`].
    pub async fn wait(self) {
        let pace = &self.chan.pace;
        let until = tokio::time::Instant::now() + PACE_MAX;
        loop {
            let notified = pace.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A newer mark reached means this one was passed too.
            if pace.done.load(Ordering::Acquire) >= self.mark {
                return;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return;
            }
        }
    }
}

impl Pace {
    fn slot(&self, mark: u64) -> &PaceSlot {
        &self.slots[(mark % PACE_SLOTS as u64) as usize]
    }

    /// A reader moved from `from` to `to`: counts it for each paced mark it passed (only the
    /// last slots' worth can still be tracked).
    fn passed(&self, from: u64, to: u64) {
        if !self.tracking.load(Ordering::Relaxed) {
            return;
        }
        for mark in (from + 1).max(to.saturating_sub(PACE_SLOTS as u64 - 1))..=to {
            let slot = self.slot(mark);
            if slot.mark.load(Ordering::Acquire) != mark {
                continue;
            }
            let n = slot.reached.fetch_add(1, Ordering::AcqRel) + 1;
            if n == slot.target.load(Ordering::Relaxed) {
                self.done.fetch_max(mark, Ordering::AcqRel);
                self.notify.notify_waiters();
            }
        }
    }

    /// Tracks the message with seq `mark - 1`, read by `subscribers`; returns the mark its
    /// publish waits for, if that one is tracked and not reached yet.
    fn track(&self, mark: u64, subscribers: usize) -> Option<u64> {
        let slot = self.slot(mark);
        slot.reached.store(0, Ordering::Relaxed);
        slot.target.store(
            (subscribers * PACE_SHARE_PERCENT).div_ceil(100),
            Ordering::Relaxed,
        );
        slot.mark.store(mark, Ordering::Release);
        self.tracking.store(true, Ordering::Relaxed);
        let wait = mark.checked_sub(PACE_BEHIND)?;
        (self.slot(wait).mark.load(Ordering::Acquire) == wait
            && self.done.load(Ordering::Acquire) < wait)
            .then_some(wait)
    }
}

struct State {
    messages: VecDeque<Arc<Message>>,
    /// Channel-local sequence number of `messages[0]`; subscribers hold positions in this
    /// numbering, so reading is an index computation, not a search.
    first_seq: u64,
    last_id: Option<MessageId>,
    /// See [`Channel::new`].
    floor: MessageId,
    /// The newest id that has left the buffer: a resume from before it has a gap.
    evicted_through: Option<MessageId>,
    published: u64,
    closed: Option<CloseReason>,
    /// Set under this lock when the hub drops the channel from its map; a publisher that
    /// raced with that retries on a fresh channel instead of appending to a dead one.
    removed: bool,
}

/// A subscriber's starting point, resolved against the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartPosition {
    pub next_seq: u64,
    /// The buffer's end at that moment (what a subscriber joining now is counted from).
    pub end_seq: u64,
    /// The id this position is just after: the last id before the next message it reads
    /// (a resume from it continues here).
    pub after: MessageId,
    /// Some message after the requested id had already left the buffer.
    pub gap: bool,
}

/// Where a new subscriber starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only messages published from now on.
    Newest,
    /// The whole buffer.
    Oldest,
    /// Everything after this id.
    After(MessageId),
}

#[derive(Debug)]
pub struct AppendOutcome {
    pub id: MessageId,
    pub buffered: usize,
    /// The publish is to wait for its subscribers (a busy channel, see [`Paced`]).
    pub paced: Option<Paced>,
    /// Subscribers per transport when the message went in, before any was woken: what
    /// [`AppendOutcome::count_fanout`] counts.
    pub subscribers: [usize; Transport::COUNT],
}

impl AppendOutcome {
    /// Counts the message as handed to every subscriber connected when it was appended, once
    /// per transport (`crier_messages_delivered_total`): the publish pays, not every
    /// subscriber's read. The counts are the ones taken before the wake-up: a subscriber woken
    /// by this message can take it and leave before the publisher gets here. Long-poll is
    /// counted by its responses instead (one message each, see `push/longpoll.rs`): a poll
    /// connected during two publishes answers with one of them.
    pub fn count_fanout(&self, metrics: &crate::metrics::Metrics, body_len: usize) {
        for t in Transport::ALL {
            if t == Transport::LongPoll {
                continue;
            }
            let n = self.subscribers[t.index()] as u64;
            if n > 0 {
                metrics.delivered(t, n, n * body_len as u64);
            }
        }
    }
}

/// What [`Channel::append_assigned`] did.
#[derive(Debug)]
pub enum Assigned {
    Appended(AppendOutcome),
    /// The id is not above the channel's last: the message is already here.
    Stale,
    /// The channel left the hub meanwhile (deleted or freed): append to the new one.
    Removed,
}

/// Figures for the publish API and `/channels`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelStats {
    pub channel: String,
    pub subscribers: usize,
    pub subscribers_by_transport: SubscriberCounts,
    pub buffered: usize,
    pub last_id: Option<String>,
    pub published: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriberCounts {
    pub websocket: usize,
    pub sse: usize,
    pub longpoll: usize,
    pub webrtc: usize,
}

/// The order of appends across every channel of this process (see [`Message::order`]): taken
/// under the channel's lock, so it agrees with each channel's own order.
static APPEND_ORDER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Channel {
    /// `floor`: every id up to it is gone (a previous incarnation's last id, or the moment
    /// this process started): a resume from at or before it cannot be proven complete, so it
    /// reports a gap; new ids are all greater.
    pub(super) fn new(
        name: Arc<str>,
        policy: BufferPolicy,
        floor: MessageId,
        expiries: Arc<Expiries>,
        loop_relays: Arc<LoopRelays>,
    ) -> Arc<Channel> {
        Arc::new_cyclic(|me| Channel {
            name,
            policy,
            state: RwLock::new(State {
                messages: VecDeque::new(),
                first_seq: 0,
                last_id: None,
                floor,
                evicted_through: Some(floor),
                published: 0,
                closed: None,
                removed: false,
            }),
            notify: Arc::new(Notify::new()),
            loop_waiters: loop_relays.waiters(),
            loop_relays,
            subscribers: Default::default(),
            observing: parking_lot::Mutex::new(()),
            expiries,
            pace: Pace::default(),
            free_scheduled: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    /// A channel that holds nothing here (a cluster node publishes to it without listening)
    /// is freed by the sweep one buffer TTL from now if it is still idle and empty then: until
    /// then it counts against `max_channels`, as a channel whose messages are buffered does.
    /// Scheduled once per channel, however often it is published to.
    pub(crate) fn free_later(&self) {
        if !self.free_scheduled.swap(true, Ordering::Relaxed) {
            self.expiries
                .schedule(Instant::now() + self.policy.buffer_ttl, self.me.clone());
        }
    }

    /// The `Notify` a subscriber running on this thread waits on for the next append: its
    /// event loop's (armed, so the append tells that loop), or off the loops the channel's
    /// own. Call it before registering and before looking at the channel.
    pub fn notify_here(&self) -> &Arc<Notify> {
        match crate::event_loop::current()
            .checked_sub(1)
            .and_then(|i| self.loop_waiters.get(i))
        {
            Some(w) => w.arm(),
            None => &self.notify,
        }
    }

    /// Wakes every waiting subscriber: those off the loops now, each loop's through its relay
    /// (one post per loop that has a waiter). After the state lock is let go.
    fn wake(&self) {
        self.notify.notify_waiters();
        for (i, w) in self.loop_waiters.iter().enumerate() {
            if w.take() {
                if let Some(me) = self.me.upgrade() {
                    self.loop_relays.post(i, me);
                }
            }
        }
    }

    /// On event loop `i` (its relay task): wakes the subscribers waiting there.
    pub(super) fn wake_loop(&self, i: usize) {
        if let Some(w) = self.loop_waiters.get(i) {
            w.wake();
        }
    }

    /// The buffer bound and TTL this channel was made with (a storage engine trims its copy
    /// of the tail by the same policy).
    pub fn policy(&self) -> BufferPolicy {
        self.policy
    }

    /// Appends one message, with the next id, and wakes every waiting subscriber. Returns None
    /// when the channel was removed from the hub meanwhile (the caller retries on the new
    /// channel).
    pub(super) fn append(
        &self,
        event: Option<Box<str>>,
        content_type: http::HeaderValue,
        body: bytes::Bytes,
        now: Instant,
        on_append: Option<impl FnOnce(&Arc<Message>)>,
    ) -> Option<AppendOutcome> {
        let st = self.state.write();
        if st.removed {
            return None;
        }
        let id = MessageId::next_after(Some(st.last_id.unwrap_or(st.floor)), unix_millis());
        let msg = Arc::new(Message::new(id, event, content_type, body, now));
        Some(self.push_and_tell(st, msg, now, on_append, true))
    }

    /// Appends under the state lock, lets it go, wakes the subscribers, then tells the
    /// observers (in id order, see `observing`). With `pace`, a busy channel's append sets
    /// the pacing mark (see [`Paced`]).
    fn push_and_tell(
        &self,
        mut st: parking_lot::RwLockWriteGuard<'_, State>,
        msg: Arc<Message>,
        now: Instant,
        on_append: Option<impl FnOnce(&Arc<Message>)>,
        pace: bool,
    ) -> AppendOutcome {
        let was_empty = st.messages.is_empty();
        let told = on_append.map(|f| (f, msg.clone()));
        let mut outcome = st.push(msg, &self.policy, now);
        let subscribers = if pace { self.subscriber_count() } else { 0 };
        if subscribers >= PACE_MIN_SUBSCRIBERS {
            let mark = st.first_seq + st.messages.len() as u64;
            if let Some(wait) = self.pace.track(mark, subscribers) {
                outcome.paced = self.me.upgrade().map(|chan| Paced { chan, mark: wait });
            }
        }
        let expiry = was_empty
            .then(|| {
                st.messages
                    .front()
                    .map(|m| m.published_at + self.policy.buffer_ttl)
            })
            .flatten();
        for t in Transport::ALL {
            outcome.subscribers[t.index()] = self.subscribers[t.index()].load(Ordering::Relaxed);
        }
        let turn = told.as_ref().map(|_| self.observing.lock());
        drop(st);
        self.wake();
        if let Some((f, msg)) = told {
            f(&msg);
        }
        drop(turn);
        if let Some(at) = expiry {
            self.expiries.schedule(at, self.me.clone());
        }
        outcome
    }

    /// Appends a message whose id a storage engine gave it (the file engine's reserved id,
    /// the Redis stream's id) and wakes the subscribers. Ids only rise: a message whose id is
    /// not above the channel's last is already here (a fan-out repeating what a catch-up read
    /// put here) and is left out.
    pub fn append_assigned(
        &self,
        msg: Arc<Message>,
        now: Instant,
        on_append: Option<impl FnOnce(&Arc<Message>)>,
    ) -> Assigned {
        let st = self.state.write();
        if st.removed {
            return Assigned::Removed;
        }
        if st.last_id.unwrap_or(st.floor) >= msg.id {
            return Assigned::Stale;
        }
        Assigned::Appended(self.push_and_tell(st, msg, now, on_append, false))
    }

    /// A storage engine found that messages after this channel's head are lost for good (a
    /// Redis stream trimmed, expired or emptied before this node read them): the tail starts
    /// again above `floor`. Readers at the old end are left behind it, so they read `Lagged`
    /// and their `on_lag` policy tells them of the gap (or lets them go), exactly as when they
    /// fall behind the buffer; a resume from before `floor` reports a gap.
    pub(crate) fn restart_at(&self, floor: MessageId) {
        {
            let mut st = self.state.write();
            let end = st.first_seq + st.messages.len() as u64;
            st.messages.clear();
            // One past the end: a reader at the end is behind now, not merely caught up.
            st.first_seq = end + 1;
            st.last_id = None;
            st.floor = floor;
            st.evicted_through = Some(floor);
        }
        self.wake();
    }

    /// Drops messages older than the TTL. Returns true when the channel is idle and empty
    /// (a candidate to free); otherwise, with messages left, it is put back on the sweep's
    /// schedule for when its (new) oldest expires.
    pub(super) fn trim(&self, now: Instant) -> bool {
        let mut st = self.state.write();
        st.evict_expired(now, self.policy.buffer_ttl);
        if let Some(m) = st.messages.front() {
            self.expiries
                .schedule(m.published_at + self.policy.buffer_ttl, self.me.clone());
            return false;
        }
        self.subscriber_count() == 0
    }

    pub(super) fn close(&self, reason: CloseReason) {
        {
            let mut st = self.state.write();
            if st.closed.is_none() {
                st.closed = Some(reason);
            }
        }
        self.wake();
    }

    /// Marks the channel removed if it is still free to remove (no subscribers, empty buffer).
    pub(super) fn try_mark_removed(&self) -> bool {
        let mut st = self.state.write();
        if self.subscriber_count() == 0 && st.messages.is_empty() {
            st.removed = true;
            true
        } else {
            false
        }
    }

    pub(super) fn mark_removed(&self) {
        self.state.write().removed = true;
    }

    /// Resolves where a new subscriber starts.
    pub fn start(&self, from: Start) -> StartPosition {
        let st = self.state.read();
        let end = st.first_seq + st.messages.len() as u64;
        match from {
            Start::Newest => StartPosition {
                next_seq: end,
                end_seq: end,
                after: st.last_id.unwrap_or(st.floor),
                gap: false,
            },
            Start::Oldest => StartPosition {
                next_seq: st.first_seq,
                end_seq: end,
                after: st.evicted_through.unwrap_or(st.floor),
                gap: false,
            },
            Start::After(last) => {
                let idx = st.messages.partition_point(|m| m.id <= last);
                StartPosition {
                    next_seq: st.first_seq + idx as u64,
                    end_seq: end,
                    after: last,
                    gap: st.evicted_through.is_some_and(|e| last < e),
                }
            }
        }
    }

    /// Appends up to `max` messages from `next_seq` on to `out` and advances `next_seq`.
    pub fn read(&self, next_seq: &mut u64, out: &mut Vec<Arc<Message>>, max: usize) -> Read {
        let st = self.state.read();
        if *next_seq < st.first_seq {
            return Read::Lagged;
        }
        let start = (*next_seq - st.first_seq) as usize;
        if start < st.messages.len() {
            let n = (st.messages.len() - start).min(max);
            out.extend(st.messages.range(start..start + n).cloned());
            let from = *next_seq;
            *next_seq += n as u64;
            self.pace.passed(from, *next_seq);
            return Read::Messages(n);
        }
        match st.closed {
            Some(r) => Read::Closed(r),
            None => Read::Empty,
        }
    }

    /// The message at `next_seq` already left the buffer (a reader there would lag).
    pub fn is_behind(&self, next_seq: u64) -> bool {
        next_seq < self.state.read().first_seq
    }

    /// The id of the newest message ever published here (buffered or not).
    pub fn last_id(&self) -> Option<MessageId> {
        self.state.read().last_id
    }

    /// The position "after everything so far": the last id, or the floor when nothing was
    /// published. Resuming from it reports no gap.
    pub fn head_id(&self) -> MessageId {
        let st = self.state.read();
        st.last_id.unwrap_or(st.floor)
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Returns how many subscribers the channel had before (0: the first one; two joining at
    /// once may both see 0, so what an engine does for the first must be idempotent).
    pub(super) fn add_subscriber(&self, t: Transport) -> usize {
        let before = self.subscriber_count();
        self.subscribers[t.index()].fetch_add(1, Ordering::Relaxed);
        before
    }

    /// Returns the number of subscribers left.
    pub(super) fn remove_subscriber(&self, t: Transport) -> usize {
        self.subscribers[t.index()].fetch_sub(1, Ordering::Relaxed);
        self.subscriber_count()
    }

    pub fn stats(&self) -> ChannelStats {
        let st = self.state.read();
        let by = |t: Transport| self.subscribers[t.index()].load(Ordering::Relaxed);
        ChannelStats {
            channel: self.name.to_string(),
            subscribers: self.subscriber_count(),
            subscribers_by_transport: SubscriberCounts {
                websocket: by(Transport::WebSocket),
                sse: by(Transport::Sse),
                longpoll: by(Transport::LongPoll),
                webrtc: by(Transport::WebRtc),
            },
            buffered: st.messages.len(),
            last_id: st.last_id.map(|id| id.to_string()),
            published: st.published,
        }
    }
}

impl State {
    /// Appends under the lock: the last id moves, then the buffer is bounded by count (the
    /// oldest message leaves; a subscriber still behind it lags) and by age.
    fn push(&mut self, msg: Arc<Message>, policy: &BufferPolicy, now: Instant) -> AppendOutcome {
        let id = msg.id;
        msg.set_order(APPEND_ORDER.fetch_add(1, Ordering::Relaxed));
        self.messages.push_back(msg);
        self.last_id = Some(id);
        self.published += 1;
        while self.messages.len() > policy.buffer_messages.max(1) {
            self.evict_front();
        }
        self.evict_expired(now, policy.buffer_ttl);
        AppendOutcome {
            id,
            buffered: self.messages.len(),
            paced: None,
            subscribers: [0; Transport::COUNT],
        }
    }

    fn evict_front(&mut self) {
        if let Some(m) = self.messages.pop_front() {
            self.evicted_through = Some(m.id);
            self.first_seq += 1;
        }
    }

    fn evict_expired(&mut self, now: Instant, ttl: std::time::Duration) {
        while self
            .messages
            .front()
            .is_some_and(|m| now.saturating_duration_since(m.published_at) > ttl)
        {
            self.evict_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn chan(n: usize, ttl: Duration) -> Arc<Channel> {
        Channel::new(
            "c".into(),
            BufferPolicy {
                buffer_messages: n,
                buffer_ttl: ttl,
            },
            MessageId::ZERO,
            Arc::default(),
            Arc::new(LoopRelays::new(0)),
        )
    }

    fn put(c: &Channel, body: &'static str) -> MessageId {
        c.append(
            None,
            http::HeaderValue::from_static("text/plain"),
            Bytes::from_static(body.as_bytes()),
            Instant::now(),
            None::<fn(&Arc<Message>)>,
        )
        .expect("test setup")
        .id
    }

    #[test]
    fn buffer_is_bounded_and_resume_reports_gaps() {
        let c = chan(3, Duration::from_secs(60));
        let ids: Vec<_> = (0..5).map(|_| put(&c, "x")).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        // ids[0] and ids[1] were evicted.
        let p = c.start(Start::After(ids[0]));
        assert!(p.gap);
        let p = c.start(Start::After(ids[1]));
        assert!(!p.gap, "everything after ids[1] is still buffered");
        let mut seq = p.next_seq;
        let mut out = Vec::new();
        assert_eq!(c.read(&mut seq, &mut out, 10), Read::Messages(3));
        assert_eq!(out.iter().map(|m| m.id).collect::<Vec<_>>(), ids[2..]);
        assert_eq!(c.read(&mut seq, &mut out, 10), Read::Empty);
    }

    #[test]
    fn slow_reader_lags() {
        let c = chan(2, Duration::from_secs(60));
        let mut seq = c.start(Start::Newest).next_seq;
        for _ in 0..3 {
            put(&c, "x");
        }
        assert_eq!(c.read(&mut seq, &mut Vec::new(), 10), Read::Lagged);
    }

    #[test]
    fn ttl_evicts() {
        let c = chan(10, Duration::from_millis(1));
        put(&c, "x");
        put(&c, "y");
        assert_eq!(
            c.expiries.len(),
            1,
            "scheduled once, when the buffer stopped being empty"
        );
        assert!(
            c.expiries.take_due(Instant::now()).is_empty(),
            "not due yet"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.expiries.take_due(Instant::now()).len(), 1);
        put(&c, "z");
        assert_eq!(
            c.expiries.len(),
            0,
            "the buffer was not empty: no new entry"
        );
        assert!(!c.trim(Instant::now()), "z is still young");
        assert_eq!(c.expiries.len(), 1, "back on the schedule for z");
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.trim(Instant::now()), "expired and unsubscribed: free it");
        assert_eq!(c.stats().buffered, 0);
    }

    #[test]
    fn closed_after_drain() {
        let c = chan(10, Duration::from_secs(60));
        let mut seq = c.start(Start::Newest).next_seq;
        put(&c, "x");
        c.close(CloseReason::Deleted);
        let mut out = Vec::new();
        assert_eq!(c.read(&mut seq, &mut out, 10), Read::Messages(1));
        assert_eq!(
            c.read(&mut seq, &mut out, 10),
            Read::Closed(CloseReason::Deleted)
        );
    }
}
