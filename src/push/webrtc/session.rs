//! One WebRTC session: a task that owns its str0m `Rtc` and its hub subscription. It sleeps
//! until a datagram arrives, the `Rtc`'s next timeout, a message is published, or the session
//! is told to stop — never a busy loop — and then drives the `Rtc` until it wants to wait again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Event, Input, Output, Rtc};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use super::{Queue, Registered, Shared, Slot};
use crate::config::OnLag;
use crate::hub::CloseReason;
use crate::metrics::DropReason;
use crate::push::envelope;
use crate::push::feed::{Feed, Item, Next, BATCH};
use crate::push::record_batch;
/// How long a closing session may take to send its goodbyes (SCTP shutdown, DTLS close).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DELETE on its URL, or shutdown.
    Stopped,
    ChannelDeleted,
    ShuttingDown,
    /// Fell behind the channel's buffer.
    Lagged,
    /// A message that can never fit the data channel (larger than the peer accepts).
    Oversized,
    /// Nothing heard from the peer for `ice_timeout`.
    IceTimeout,
    /// The client closed its data channel or the association.
    ClientClosed,
    /// str0m gave up on the session (a protocol error).
    Failed,
}

pub(super) struct Session {
    pub(super) shared: Arc<Shared>,
    /// Held for its Drop: the session count goes down when the task ends.
    pub(super) _slot: Slot,
    pub(super) registered: Registered,
    pub(super) id: String,
    /// Boxed (see `new_rtc`): the task's future stays a few hundred bytes.
    pub(super) rtc: Box<Rtc>,
    pub(super) feed: Feed,
    pub(super) rx: Queue,
    pub(super) stop: CancellationToken,
    /// When the offer was POSTed: the handshake histogram measures from here.
    pub(super) posted: Instant,
}

/// What the session waits for from the hub: more messages once everything taken was
/// written; while the data channel is full, under `on_lag = "disconnect"`, the news that the
/// client fell behind the buffer (it is let go then, like a slow WebSocket); skipping, it
/// catches up with a gap once the channel drains.
async fn hub_wait(feed: &mut Feed, items: &mut Vec<Item>, want_more: bool, stuck: bool) -> Next {
    if want_more {
        feed.next(items, BATCH).await
    } else if stuck && feed.on_lag() == OnLag::Disconnect {
        feed.fell_behind().await;
        feed.metrics().dropped(DropReason::Lagged);
        Next::Lagged
    } else {
        std::future::pending().await
    }
}

/// What the session loop keeps between wake-ups.
struct Flow {
    /// The client's first data channel, once open: every message goes there.
    channel: Option<ChannelId>,
    /// Envelopes taken from the hub, not yet accepted by the data channel (its send buffer
    /// was full).
    pending: VecDeque<bytes::Bytes>,
    last_heard: Instant,
}

impl Session {
    pub(super) async fn run(mut self) {
        let mut flow = Flow {
            channel: None,
            pending: VecDeque::new(),
            last_heard: Instant::now(),
        };
        let end = self.serve(&mut flow).await;
        tracing::debug!("webrtc session {} ended: {end:?}", self.id);
        // Say goodbye (SCTP shutdown, DTLS close_notify) when the peer may still listen.
        let peer_gone = matches!(end, End::IceTimeout | End::Failed | End::ClientClosed);
        if !peer_gone && self.rtc.close().is_ok() {
            self.finish(&mut flow).await;
        }
        // `registered`, `slot` and `sub` go with `self`: the registry entry, the gauges, the
        // session count and the hub's subscriber count drop with them.
    }

    async fn serve(&mut self, flow: &mut Flow) -> End {
        let ice_timeout = self.shared.ice_timeout;
        let mut items: Vec<Item> = Vec::new();
        loop {
            if let Err(end) = self.write_pending(flow) {
                return end;
            }
            let deadline = match self.drive(flow).await {
                Ok(d) => d,
                Err(end) => return end,
            };
            let want_more = flow.channel.is_some() && flow.pending.is_empty();
            let stuck = !flow.pending.is_empty();
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return End::Stopped,
                d = self.rx.recv() => {
                    let dest = self.shared.destination_for(d.source);
                    // A datagram str0m cannot parse is dropped, like one lost on the way; it
                    // does not count as hearing from the peer either.
                    let Ok(r) = Receive::new(Protocol::Udp, d.source, dest, &d.data) else {
                        continue;
                    };
                    flow.last_heard = d.at;
                    // One bad datagram (corrupt, or spoofed from the peer's address) must not
                    // end the session: it is dropped; a session str0m gave up on is no longer
                    // alive, and `drive` ends it.
                    if let Err(e) = self.rtc.handle_input(Input::Receive(d.at, r)) {
                        tracing::debug!("webrtc session {}: datagram dropped: {e}", self.id);
                    }
                }
                _ = sleep_until(deadline.into()) => {
                    if self.rtc.handle_input(Input::Timeout(Instant::now())).is_err() {
                        return End::Failed;
                    }
                }
                _ = sleep_until((flow.last_heard + ice_timeout).into()) => {
                    self.feed.metrics().dropped(DropReason::Timeout);
                    return End::IceTimeout;
                }
                r = hub_wait(&mut self.feed, &mut items, want_more, stuck) => match r {
                    Next::Items => {
                        record_batch(&self.feed, &items);
                        for item in items.drain(..) {
                            self.feed.delivered(&item);
                            flow.pending.push_back(envelope_of(&self.feed, &item));
                        }
                    }
                    Next::Lagged => return End::Lagged,
                    Next::Closed(CloseReason::Deleted) => return End::ChannelDeleted,
                    Next::Closed(CloseReason::ShuttingDown) => return End::ShuttingDown,
                    Next::Expired => {
                        self.feed.metrics().dropped(DropReason::Expired);
                        return End::Stopped;
                    }
                },
            }
        }
    }

    /// Drives the closing `Rtc` until it has sent its goodbyes (or `CLOSE_WAIT` passed).
    async fn finish(&mut self, flow: &mut Flow) {
        let end = Instant::now() + CLOSE_WAIT;
        while self.rtc.is_alive() {
            let Ok(t) = self.drive(flow).await else {
                return;
            };
            if t >= end {
                return;
            }
            sleep_until(t.into()).await;
            if self
                .rtc
                .handle_input(Input::Timeout(Instant::now()))
                .is_err()
            {
                return;
            }
        }
    }

    /// Hands pending messages to the data channel, in order, until its send buffer is full.
    fn write_pending(&mut self, flow: &mut Flow) -> Result<(), End> {
        let Some(cid) = flow.channel else {
            return Ok(());
        };
        while let Some(frame) = flow.pending.front() {
            let Some(mut ch) = self.rtc.channel(cid) else {
                return Err(End::ClientClosed);
            };
            match ch.write(false, frame) {
                Ok(true) => {
                    flow.pending.pop_front();
                }
                // Full: the rest waits for the peer's acks (each arrives as input and brings
                // us back here).
                Ok(false) if ch.buffered_amount() > 0 => return Ok(()),
                // Nothing in flight and still refused: it can never fit.
                Ok(false) | Err(_) => {
                    self.feed.metrics().dropped(DropReason::Oversized);
                    return Err(End::Oversized);
                }
            }
        }
        Ok(())
    }

    /// Polls the `Rtc` until it wants to wait: sends what it transmits, handles its events.
    /// Returns when to call it again.
    async fn drive(&mut self, flow: &mut Flow) -> Result<Instant, End> {
        loop {
            if !self.rtc.is_alive() {
                return Err(End::ClientClosed);
            }
            let out = match self.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!("webrtc session {}: {e}", self.id);
                    return Err(End::Failed);
                }
            };
            match out {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    // UDP: a failed send is a lost datagram; the protocols above retransmit.
                    if let Err(e) = self.shared.socket.send_to(&t.contents, t.destination).await {
                        tracing::debug!("webrtc: send to {}: {e}", t.destination);
                    }
                }
                Output::Event(e) => self.event(e, flow)?,
            }
        }
    }

    fn event(&mut self, e: Event, flow: &mut Flow) -> Result<(), End> {
        match e {
            Event::ChannelOpen(cid, _label) if flow.channel.is_none() => {
                flow.channel = Some(cid);
                // A multiplexed session first says where each channel starts, as a crier.json
                // WebSocket does: a client that got nothing on a channel still has its part
                // of the cursor to resume with. Nothing was taken from the hub before the
                // channel opened, so these are the start positions and come first.
                if self.feed.is_multiplexed() {
                    for i in 0..self.feed.len() {
                        flow.pending.push_back(subscribed(&self.feed, i));
                    }
                }
                self.shared
                    .metrics
                    .webrtc_handshake
                    .observe(self.posted.elapsed().as_secs_f64());
                self.registered.opened();
            }
            // The client closed its channel, or the peer connection (DTLS close_notify).
            Event::ChannelClose(cid) if flow.channel == Some(cid) => {
                return Err(End::ClientClosed);
            }
            Event::Closed => return Err(End::ClientClosed),
            // Subscribers send nothing; anything they do send is ignored.
            _ => {}
        }
        Ok(())
    }
}

/// The crier.json envelope of an item: shared with WebSocket (built once per message) unless
/// it carries this session's gap notice.
fn envelope_of(feed: &Feed, item: &Item) -> bytes::Bytes {
    match item {
        Item::Message { msg, chan, gap } => {
            let channel = feed
                .is_multiplexed()
                .then(|| (feed.name(*chan), feed.prefix_len()));
            envelope::for_subscriber(msg, channel, *gap)
        }
        Item::Ended(chan) => bytes::Bytes::from(
            serde_json::to_vec(
                &serde_json::json!({ "unsubscribed": feed.name(*chan), "reason": "channel deleted" }),
            )
            .unwrap_or_default(),
        ),
    }
}

/// `{"subscribed":"<name>","id":"<position>"}` of channel `chan`: where it starts.
fn subscribed(feed: &Feed, chan: usize) -> bytes::Bytes {
    let mut pos = Vec::new();
    feed.write_position(chan, &mut pos);
    bytes::Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "subscribed": feed.name(chan),
            "id": String::from_utf8_lossy(&pos),
        }))
        .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every idle session keeps for its whole life stays small: its task's future holds
    /// the `Session` (twice, see `new_rtc`), so the 10 KB `Rtc` is behind a pointer; and its
    /// queue holds pointers to datagrams, not datagrams.
    #[test]
    fn a_session_and_its_queue_slots_are_small() {
        let session = std::mem::size_of::<Session>();
        assert!(session <= 1024, "a Session is {session} bytes");
        fn slot<T>(_: &Arc<super::super::inbox::Inbox<T>>) -> usize {
            std::mem::size_of::<T>()
        }
        let q: Queue = Arc::new(super::super::inbox::Inbox::new(1));
        assert!(slot(&q) <= 16, "a queue slot is {} bytes", slot(&q));
        // The task's future, which every idle session keeps (1,784 B with rustc 1.95: the
        // Session twice, the select's timers and waits, the send of `drive`).
        fn output<F: FnOnce(A) -> Fut, A, Fut>(_: F) -> usize {
            std::mem::size_of::<Fut>()
        }
        let task = output(Session::run);
        assert!(task <= 2048, "a session's task future is {task} bytes");
    }
}
