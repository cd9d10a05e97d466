//! One WebRTC session: a task that owns its connection (ICE-lite checks, DTLS, SCTP and the
//! data channel) and its hub subscription. It sleeps until a datagram arrives, a protocol
//! timer is due, a message is published, or the session is told to stop — never a busy
//! loop — and then pumps the layers until each wants to wait again. The pump is synchronous:
//! datagrams go out with a non-blocking send (a full socket buffer drops one, as the network
//! may; SCTP retransmits it), so no layer's state is held across an `.await`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use super::sctp::{ChannelEvent, Sctp, WriteError};
use super::sdp::Fingerprint;
use super::stun::{self, Credentials};
use super::{Datagram, Queue, Registered, Shared, Slot, MAX_ADDRS_PER_SESSION};
use crate::config::OnLag;
use crate::hub::CloseReason;
use crate::metrics::DropReason;
use crate::push::envelope;
use crate::push::feed::{Feed, Item, Next, BATCH};
use crate::push::record_batch;
/// How long a closing session may take to send its goodbyes (SCTP shutdown, DTLS close).
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The pump's buffer for one outgoing DTLS record (dimpl asks for more when it must).
const RECORD_BUFFER: usize = 2048;

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
    /// The client closed its data channel, the association, or the DTLS connection.
    ClientClosed,
    /// A protocol failure: a DTLS error, or a certificate the offer did not name.
    Failed,
}

impl End {
    /// Whether the peer may still be listening for a goodbye.
    fn peer_listens(self) -> bool {
        !matches!(self, End::IceTimeout | End::Failed | End::ClientClosed)
    }
}

pub(super) struct Session {
    pub(super) shared: Arc<Shared>,
    /// Held for its Drop: the session count goes down when the task ends.
    pub(super) _slot: Slot,
    pub(super) registered: Registered,
    pub(super) id: String,
    /// Boxed: DTLS and SCTP state are a few KB, and inline they would sit in the task's
    /// future twice (an async fn keeps its argument and the moved-in local apart).
    pub(super) conn: Box<Conn>,
    pub(super) feed: Feed,
    pub(super) rx: Queue,
    pub(super) stop: CancellationToken,
    /// When the offer was POSTed: the handshake histogram measures from here.
    pub(super) posted: Instant,
}

/// The protocol stack of one session.
pub(super) struct Conn {
    pub(super) ice: Credentials,
    /// Addresses that passed a check: DTLS is accepted from these only.
    pub(super) verified: Vec<SocketAddr>,
    /// Where we send: the last nominated address, or the first verified one.
    pub(super) peer: Option<SocketAddr>,
    pub(super) nominated: bool,
    pub(super) dtls: dimpl::Dtls,
    /// The certificate the peer must present (from the offer); emptied once it did.
    pub(super) fingerprints: Vec<Fingerprint>,
    pub(super) cert_ok: bool,
    pub(super) dtls_started: bool,
    pub(super) dtls_deadline: Option<Instant>,
    pub(super) sctp: Sctp,
    /// The peer's SCTP port, for the INIT crier sends as the DTLS client.
    pub(super) sctp_port: u16,
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
    /// Envelopes taken from the hub, not yet accepted by the data channel (its send buffer
    /// was full).
    pending: VecDeque<Bytes>,
    last_heard: Instant,
    /// The channel opened in the last pump: what waits for it is written before sleeping.
    just_opened: bool,
}

impl Flow {
    fn new() -> Flow {
        Flow {
            pending: VecDeque::new(),
            last_heard: Instant::now(),
            just_opened: false,
        }
    }
}

impl Session {
    pub(super) async fn run(mut self) {
        let mut flow = Flow::new();
        let end = self.serve(&mut flow).await;
        tracing::debug!("webrtc session {} ended: {end:?}", self.id);
        if end.peer_listens() {
            self.finish().await;
        }
        // `registered`, `slot` and `feed` go with `self`: the registry entry, the gauges, the
        // session count and the hub's subscriber count drop with them.
    }

    async fn serve(&mut self, flow: &mut Flow) -> End {
        let ice_timeout = self.shared.ice_timeout;
        let mut items: Vec<Item> = Vec::new();
        loop {
            if let Err(end) = self.write_pending(flow) {
                return end;
            }
            let deadline = match self.pump(flow) {
                Ok(d) => d,
                Err(end) => return end,
            };
            if std::mem::take(&mut flow.just_opened) {
                continue;
            }
            let want_more = self.conn.sctp.is_open() && flow.pending.is_empty();
            let stuck = !flow.pending.is_empty();
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return End::Stopped,
                d = self.rx.recv() => {
                    if let Err(end) = self.datagram(&d, flow) {
                        return end;
                    }
                }
                _ = sleep_or_never(deadline) => {
                    if let Err(end) = self.timeout() {
                        return end;
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

    /// One datagram from the socket task. What is not for this session's protocols, or does
    /// not come from a verified address, is dropped like a datagram lost on the way, and
    /// does not count as hearing from the peer.
    fn datagram(&mut self, d: &Datagram, flow: &mut Flow) -> Result<(), End> {
        let c = &mut *self.conn;
        if stun::is_stun(&d.data) {
            let mut out = [0u8; stun::MAX_RESPONSE];
            let Some((check, n)) = stun::answer(&d.data, &c.ice, d.source, &mut out) else {
                return Ok(());
            };
            flow.last_heard = d.at;
            self.shared.send(&out[..n], d.source);
            if !c.verified.contains(&d.source) && c.verified.len() < MAX_ADDRS_PER_SESSION {
                c.verified.push(d.source);
            }
            // The controlling agent's choice wins; before it, the first path that works.
            if check.nominated || c.peer.is_none() {
                c.peer = Some(d.source);
                c.nominated |= check.nominated;
            }
            return Ok(());
        }
        // RFC 7983: 20-63 is DTLS; nothing else (RTP, ZRTP, TURN channels) is ours.
        let dtls = d.data.first().is_some_and(|b| (20..=63).contains(b));
        if !dtls || !c.verified.contains(&d.source) {
            return Ok(());
        }
        flow.last_heard = d.at;
        // dimpl's clock: advanced before each input (its timers count from it), and only
        // ever forward, so always the current time rather than the datagram's arrival.
        let now = Instant::now();
        c.dtls_started = true;
        c.dtls.handle_timeout(now).map_err(|_| End::Failed)?;
        // dimpl drops what it cannot parse or authenticate; an error is the connection's end
        // (a fatal alert from the peer, a failed handshake).
        c.dtls.handle_packet(&d.data).map_err(|e| {
            tracing::debug!("webrtc session {}: dtls: {e}", self.id);
            End::Failed
        })
    }

    fn timeout(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let c = &mut *self.conn;
        if c.dtls_deadline.is_some_and(|t| t <= now) {
            c.dtls_deadline = None;
            c.dtls.handle_timeout(now).map_err(|_| End::Failed)?;
        }
        c.sctp.timeout(now);
        Ok(())
    }

    /// Runs the layers until none has more to do: DTLS records out to the peer, DTLS
    /// plaintext into SCTP, SCTP's events handled and its packets into DTLS. Returns when
    /// a timer is next due.
    fn pump(&mut self, flow: &mut Flow) -> Result<Option<Instant>, End> {
        let now = Instant::now();
        // A DTLS client (the offer was passive) says hello once it knows where the peer is.
        let c = &mut *self.conn;
        if !c.dtls_started && c.dtls.is_active() && c.peer.is_some() {
            c.dtls_started = true;
            c.dtls.handle_timeout(now).map_err(|_| End::Failed)?;
        }
        let mut buf = [0u8; RECORD_BUFFER];
        loop {
            let c = &mut *self.conn;
            if c.dtls_started {
                self.drain_dtls(now, &mut buf)?;
            }
            while let Some(e) = self.conn.sctp.poll_event() {
                match e {
                    ChannelEvent::Opened => self.opened(flow),
                    ChannelEvent::Closed => return Err(End::ClientClosed),
                }
            }
            let c = &mut *self.conn;
            let mut sent = false;
            while let Some(packets) = c.sctp.poll_transmit(now) {
                for p in packets {
                    c.dtls.send_application_data(&p).map_err(|_| End::Failed)?;
                    sent = true;
                }
            }
            if !sent {
                break;
            }
        }
        let c = &self.conn;
        let sctp = c.sctp.poll_timeout();
        Ok(match (c.dtls_deadline, sctp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// Takes every output of the DTLS layer up to its next timer.
    fn drain_dtls(&mut self, now: Instant, buf: &mut [u8; RECORD_BUFFER]) -> Result<(), End> {
        let c = &mut *self.conn;
        let mut big: Vec<u8> = Vec::new();
        loop {
            let out = if big.is_empty() {
                c.dtls.poll_output(buf)
            } else {
                c.dtls.poll_output(&mut big)
            };
            match out {
                dimpl::Output::Packet(p) => {
                    if let Some(peer) = c.peer {
                        self.shared.send(p, peer);
                    }
                }
                dimpl::Output::BufferTooSmall { needed } => big = vec![0; needed],
                dimpl::Output::Timeout(t) => {
                    c.dtls_deadline = Some(t);
                    return Ok(());
                }
                dimpl::Output::PeerCert(der) => {
                    c.cert_ok = c.fingerprints.iter().any(|f| f.matches(der));
                    if !c.cert_ok {
                        tracing::debug!(
                            "webrtc session {}: the peer's certificate is not the offer's",
                            self.id
                        );
                        return Err(End::Failed);
                    }
                    c.fingerprints = Vec::new();
                }
                // The handshake is done: only a peer that showed the offer's certificate
                // gets any further.
                dimpl::Output::Connected if !c.cert_ok => return Err(End::Failed),
                // The DTLS client opens the association too.
                dimpl::Output::Connected if c.dtls.is_active() => {
                    c.sctp.connect(&self.shared.sctp, c.sctp_port);
                }
                dimpl::Output::ApplicationData(d) => {
                    c.sctp.input(now, Bytes::copy_from_slice(d));
                }
                dimpl::Output::CloseNotify => return Err(End::ClientClosed),
                // Connected (checked above), the SRTP keys a data-only session never uses.
                _ => {}
            }
        }
    }

    /// The client's data channel is open.
    fn opened(&mut self, flow: &mut Flow) {
        // A multiplexed session first says where each channel starts, as a crier.json
        // WebSocket does: a client that got nothing on a channel still has its part of the
        // cursor to resume with. Nothing was taken from the hub before the channel opened,
        // so these are the start positions and come first.
        if self.feed.is_multiplexed() {
            for i in 0..self.feed.len() {
                flow.pending.push_back(subscribed(&self.feed, i));
            }
        }
        flow.just_opened = true;
        self.shared
            .metrics
            .webrtc_handshake
            .observe(self.posted.elapsed().as_secs_f64());
        self.registered.opened();
    }

    /// Says goodbye: the SCTP shutdown (what is in flight is delivered first) and, once it
    /// is through or `CLOSE_WAIT` passed, DTLS close_notify.
    async fn finish(&mut self) {
        let mut flow = Flow::new();
        let end = Instant::now() + CLOSE_WAIT;
        self.conn.sctp.shutdown();
        while !self.conn.sctp.is_closed() {
            // The association's end (or the peer's) also ends the wait.
            let Ok(deadline) = self.pump(&mut flow) else {
                break;
            };
            tokio::select! {
                d = self.rx.recv() => {
                    if self.datagram(&d, &mut flow).is_err() {
                        break;
                    }
                }
                _ = sleep_or_never(deadline) => {
                    if self.timeout().is_err() {
                        break;
                    }
                }
                _ = sleep_until(end.into()) => break,
            }
        }
        if self.conn.dtls_started && self.conn.dtls.close().is_ok() {
            let _ = self.pump(&mut flow);
        }
    }

    /// Hands pending messages to the data channel, in order, until its send buffer is full.
    fn write_pending(&mut self, flow: &mut Flow) -> Result<(), End> {
        let sctp = &mut self.conn.sctp;
        if !sctp.is_open() {
            return Ok(());
        }
        while let Some(frame) = flow.pending.front() {
            match sctp.write(frame) {
                Ok(true) => {
                    flow.pending.pop_front();
                }
                // Full: the rest waits for the peer's acks (each arrives as input and brings
                // us back here).
                Ok(false) => return Ok(()),
                Err(WriteError::TooLarge) => {
                    self.feed.metrics().dropped(DropReason::Oversized);
                    return Err(End::Oversized);
                }
                Err(WriteError::Closed) => return Err(End::ClientClosed),
            }
        }
        Ok(())
    }
}

/// Sleeps until `t`; forever without one.
async fn sleep_or_never(t: Option<Instant>) {
    match t {
        Some(t) => sleep_until(t.into()).await,
        None => std::future::pending().await,
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
    /// the `Session` (twice), so the protocol state is behind a pointer; and its queue holds
    /// pointers to datagrams, not datagrams.
    #[test]
    fn a_session_and_its_queue_slots_are_small() {
        let session = std::mem::size_of::<Session>();
        assert!(session <= 1024, "a Session is {session} bytes");
        fn slot<T>(_: &Arc<super::super::inbox::Inbox<T>>) -> usize {
            std::mem::size_of::<T>()
        }
        let q: Queue = Arc::new(super::super::inbox::Inbox::new(1));
        assert!(slot(&q) <= 16, "a queue slot is {} bytes", slot(&q));
        // The task's future, which every idle session keeps (the Session twice, the
        // select's timers and waits).
        fn output<F: FnOnce(A) -> Fut, A, Fut>(_: F) -> usize {
            std::mem::size_of::<Fut>()
        }
        let task = output(Session::run);
        assert!(task <= 2048, "a session's task future is {task} bytes");
        // The protocol state behind the pointer (5,568 B: dimpl's 3,360, sctp-proto's
        // endpoint and association 2,064, ICE 32); the heap they hold comes on top.
        let conn = std::mem::size_of::<Conn>();
        assert!(conn <= 6144, "a session's Conn is {conn} bytes");
    }
}
