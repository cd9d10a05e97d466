//! WebRTC DataChannel subscribers: the same channels, ids, resume and auth as the other
//! transports, over one UDP socket (ICE-lite, so crier never sends checks and needs no TURN).
//!
//! Signalling is one HTTP exchange on the push location's URL, WHIP-style:
//! `POST /live/{channel}` with the browser's SDP offer → `201 Created`, the answer, and
//! `Location: /live/{channel}?webrtc_session=<id>`; `DELETE` on that URL ends the session.
//! The position is fixed at the POST (the hub subscription starts then), so messages published
//! while ICE, DTLS and SCTP come up are delivered once the client's first data channel opens.
//!
//! Five parts: this file (signalling and the session registry), `udp.rs` (the one task that
//! owns the socket and hands each datagram to its session's `inbox.rs`), `session.rs` (one task
//! per session driving its str0m `Rtc` from `poll_output` timeouts) and `dtls.rs` (the
//! sessions' DTLS: set up once for all of them, without the SRTP keys a data-only session
//! never uses).

mod dtls;
mod inbox;
mod session;
mod udp;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use parking_lot::Mutex;
use str0m::change::SdpOffer;
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::{Candidate, IceCreds, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admission::hub_error;
use super::{open_feed, resume_value, Admitted, RESUME_HEADER};
use crate::config::{PushLocation, WebRtcConfig};
use crate::hub::Hub;
use crate::metrics::{Metrics, WebRtcState};
use crate::model::{ChannelName, Transport};
use crate::response::{self, Body};

/// The query parameter of a session's URL (the `Location` of the answer).
pub const SESSION_PARAM: &str = "webrtc_session";
/// An SDP offer is a few KiB; anything past this is not one.
const MAX_OFFER: usize = 64 * 1024;
/// How long the client may take to send the offer's body.
const OFFER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams queued for one session between the socket task and the session task. UDP
/// semantics when full: dropped, and SCTP retransmits what mattered.
const SESSION_QUEUE: usize = 64;
/// A session's inbox, shared by the registry (the socket task pushes) and the session task.
/// The datagrams go boxed: a queued pointer is 8 bytes, a datagram 72.
type Queue = Arc<inbox::Inbox<Box<Datagram>>>;
/// Remote addresses one session may be reached from (a host and a reflexive candidate, a
/// NAT rebinding or two); bounds what a peer can make crier remember.
const MAX_ADDRS_PER_SESSION: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum WebRtcError {
    #[error("cannot listen on {addr} (webrtc.listen): {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("webrtc: the crypto provider cannot make a DTLS certificate")]
    NoCertificate,
}

/// One datagram for one session.
struct Datagram {
    at: Instant,
    source: SocketAddr,
    data: Vec<u8>,
}

/// The WebRTC side of the server: the socket, the sessions, their limits. A cheap handle.
#[derive(Clone)]
pub struct WebRtc {
    shared: Arc<Shared>,
}

struct Shared {
    socket: Arc<UdpSocket>,
    /// Announced in answers (the `[webrtc] candidates`, or the bound address).
    candidates: Vec<SocketAddr>,
    max_sessions: usize,
    ice_timeout: Duration,
    /// One certificate for every session: making one is the costliest part of a new `Rtc`,
    /// and the fingerprint in each answer authenticates it just the same.
    cert: DtlsCert,
    crypto: Arc<CryptoProvider>,
    /// Reserved at the POST (before anything is allocated), released when the session ends.
    count: AtomicUsize,
    /// parking_lot: held for map lookups and inserts only (once per datagram by the socket
    /// task), never across `.await`.
    registry: Mutex<Registry>,
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
    /// Cancelled on shutdown: sessions close (SCTP shutdown, DTLS close_notify) and end.
    stop: CancellationToken,
}

#[derive(Default)]
struct Registry {
    by_id: HashMap<String, Entry>,
    /// Our ICE username fragment → the session: how a STUN request finds its session.
    /// Value: (session id, queue).
    by_ufrag: HashMap<String, (String, Queue)>,
    /// A peer address seen in a STUN request for a session → the session: how DTLS and
    /// SCTP datagrams (which carry no username) find it. Value: (ufrag, queue).
    by_addr: HashMap<SocketAddr, (String, Queue)>,
}

struct Entry {
    /// The channels of the URL the session was made at (its DELETE must name the same).
    channels: Vec<ChannelName>,
    ufrag: String,
    addrs: Vec<SocketAddr>,
    stop: CancellationToken,
}

impl WebRtc {
    /// Binds the UDP socket and makes the DTLS certificate. Nothing is served until
    /// [`WebRtc::serve`].
    pub fn bind(cfg: &WebRtcConfig, metrics: Arc<Metrics>) -> Result<WebRtc, WebRtcError> {
        let err = |source| WebRtcError::Bind {
            addr: cfg.listen,
            source,
        };
        let std_socket = std::net::UdpSocket::bind(cfg.listen).map_err(err)?;
        std_socket.set_nonblocking(true).map_err(err)?;
        let socket = UdpSocket::from_std(std_socket).map_err(err)?;
        let local = socket.local_addr().map_err(err)?;
        let mut candidates: Vec<SocketAddr> = if cfg.candidates.is_empty() {
            vec![local]
        } else {
            cfg.candidates.clone()
        };
        for c in &mut candidates {
            if c.port() == 0 {
                c.set_port(local.port());
            }
        }
        let crypto = dtls::provider();
        let cert = crypto
            .dtls_provider
            .generate_certificate()
            .ok_or(WebRtcError::NoCertificate)?;
        Ok(WebRtc {
            shared: Arc::new(Shared {
                socket: Arc::new(socket),
                candidates,
                max_sessions: cfg.max_sessions,
                ice_timeout: cfg.ice_timeout,
                cert,
                crypto: Arc::new(crypto),
                count: AtomicUsize::new(0),
                registry: Mutex::new(Registry::default()),
                metrics,
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
            }),
        })
    }

    /// The address the UDP socket is bound to (port 0 resolved).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.socket.local_addr().ok()
    }

    /// The socket task: reads datagrams until shutdown. Spawn it once.
    pub async fn serve(self) {
        udp::run(self.shared).await
    }

    /// Closes every session (SCTP shutdown, DTLS close_notify) and waits, up to `deadline`,
    /// for them to end.
    pub async fn shutdown(&self, deadline: Duration) {
        self.shared.stop.cancel();
        self.shared.tasks.close();
        let _ = tokio::time::timeout(deadline, self.shared.tasks.wait()).await;
    }
}

/// `POST` of an offer at a push location (auth already passed): reads and checks the offer,
/// reserves a session, subscribes at `start` and answers. Nothing is allocated for an offer
/// that is refused.
pub async fn offer(
    w: &WebRtc,
    hub: &Hub,
    req: Request<Incoming>,
    loc: &PushLocation,
    admitted: &Admitted,
    remote: SocketAddr,
) -> Response<Body> {
    let posted = Instant::now();
    let sh = &w.shared;
    let is_sdp = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/sdp"));
    if !is_sdp {
        return response::text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a WebRTC offer is Content-Type: application/sdp",
        );
    }
    let path = req.uri().path().to_string();
    let text = match read_offer(req).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let offer = match check_offer(&text) {
        Ok(o) => o,
        Err(reason) => return response::text(StatusCode::BAD_REQUEST, &reason),
    };
    // Reserve a slot before building anything: over the limit, nothing is allocated.
    if sh.count.fetch_add(1, Ordering::AcqRel) >= sh.max_sessions {
        sh.count.fetch_sub(1, Ordering::AcqRel);
        let mut r = response::text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "too many WebRTC sessions (webrtc.max_sessions = {})",
                sh.max_sessions
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let slot = Slot(sh.clone());
    let creds = IceCreds::new();
    let mut rtc = new_rtc(&sh.crypto, &sh.cert, &sh.candidates, creds.clone());
    let answer = match rtc.sdp_api().accept_offer(offer) {
        Ok(a) => a,
        Err(e) => {
            return response::text(
                StatusCode::BAD_REQUEST,
                &one_line(&format!("the offer cannot be answered: {e}")),
            )
        }
    };
    let feed = open_feed(hub, loc, admitted, Transport::WebRtc, loc.on_lag, remote);
    let feed = match feed.await {
        Ok(f) => f,
        Err(e) => return hub_error(e),
    };
    let resume = resume_value(feed.started_with_gap());
    let id = session_id();
    let tx: Queue = Arc::new(inbox::Inbox::new(SESSION_QUEUE));
    let rx = tx.clone();
    let stop = sh.stop.child_token();
    {
        let mut reg = sh.registry.lock();
        reg.by_ufrag.insert(creds.ufrag.clone(), (id.clone(), tx));
        reg.by_id.insert(
            id.clone(),
            Entry {
                channels: admitted.channels.clone(),
                ufrag: creds.ufrag.clone(),
                addrs: Vec::new(),
                stop: stop.clone(),
            },
        );
    }
    sh.metrics.webrtc_session(WebRtcState::Connecting, 1);
    let task = session::Session {
        shared: sh.clone(),
        _slot: slot,
        registered: Registered {
            shared: sh.clone(),
            id: id.clone(),
            open: false,
        },
        id: id.clone(),
        rtc,
        feed,
        rx,
        stop,
        posted,
    };
    sh.tasks.spawn(task.run());

    let mut r = Response::new(response::full(answer.to_sdp_string()));
    *r.status_mut() = StatusCode::CREATED;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{path}?{SESSION_PARAM}={id}")) {
        h.insert(header::LOCATION, v);
    }
    h.insert(RESUME_HEADER, resume);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `DELETE` on a session's URL: 204 when it existed (it ends now), 404 otherwise.
pub fn delete(w: &WebRtc, query: Option<&str>, channels: &[ChannelName]) -> Response<Body> {
    let id = crate::query::param(query, SESSION_PARAM);
    let Some(id) = id else {
        return response::text(
            StatusCode::BAD_REQUEST,
            "DELETE needs ?webrtc_session=<id> (the Location of the answer)",
        );
    };
    let reg = w.shared.registry.lock();
    match reg.by_id.get(id.as_ref()) {
        // A session belongs to its channel's URL: the id alone does not end another's.
        Some(e) if e.channels == channels => {
            e.stop.cancel();
            let mut r = Response::new(response::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        _ => response::text(StatusCode::NOT_FOUND, "no such WebRTC session"),
    }
}

async fn read_offer(req: Request<Incoming>) -> Result<String, Response<Body>> {
    let too_big = || {
        response::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the SDP offer is larger than 64 KiB",
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_OFFER as u64) {
        return Err(too_big());
    }
    let read = Limited::new(req.into_body(), MAX_OFFER).collect();
    let body: Bytes = match tokio::time::timeout(OFFER_READ_TIMEOUT, read).await {
        Err(_) => {
            return Err(response::text(
                StatusCode::REQUEST_TIMEOUT,
                "the SDP offer took too long to arrive",
            ))
        }
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_big()),
        Ok(Err(e)) => {
            return Err(response::text(
                StatusCode::BAD_REQUEST,
                &one_line(&format!("reading the offer failed: {e}")),
            ))
        }
    };
    String::from_utf8(body.to_vec())
        .map_err(|_| response::text(StatusCode::BAD_REQUEST, "malformed SDP offer: not UTF-8"))
}

/// Parses the offer and checks that it has a data channel section; the reason is one line.
pub(crate) fn check_offer(text: &str) -> Result<SdpOffer, String> {
    let offer = SdpOffer::from_sdp_string(text).map_err(|e| {
        // The parser's message carries a memory address ("at PointerOffset(0x…)"): noise.
        let e = e.to_string();
        let e = match e.find(" at PointerOffset(") {
            Some(a) => match e[a..].find(')') {
                Some(b) => format!("{}{}", &e[..a], &e[a + b + 1..]),
                None => e,
            },
            None => e,
        };
        one_line(&format!("malformed SDP offer: {e}"))
    })?;
    let has_data = text.lines().any(|l| {
        let l = l.trim_end();
        l.starts_with("m=application ") && l.contains("webrtc-datachannel")
    });
    if !has_data {
        return Err(
            "the offer has no data channel section (m=application ... webrtc-datachannel)".into(),
        );
    }
    Ok(offer)
}

/// A session's `Rtc`: ICE lite, data only, the shared certificate, `candidates` announced.
/// Boxed: an `Rtc` is 10 KB, and inline it would sit in every future that holds one — twice
/// in the session task's (an async fn keeps its argument and the moved-in local apart).
pub(crate) fn new_rtc(
    crypto: &Arc<CryptoProvider>,
    cert: &DtlsCert,
    candidates: &[SocketAddr],
    creds: IceCreds,
) -> Box<Rtc> {
    let now = Instant::now();
    let mut rtc = Box::new(
        RtcConfig::new()
            .set_ice_lite(true)
            .set_crypto_provider(crypto.clone())
            .set_dtls_cert(cert.clone())
            .set_local_ice_credentials(creds)
            // Data only: no codec is offered back, no RTCP stats are kept.
            .clear_codecs()
            .set_stats_interval(None)
            .build(now),
    );
    for c in candidates {
        match Candidate::host(*c, "udp") {
            Ok(c) => {
                rtc.add_local_candidate(c);
            }
            Err(e) => tracing::warn!("webrtc: candidate {c} not usable: {e}"),
        }
    }
    rtc
}

/// 128 random bits, hex: the session's URL is its capability.
fn session_id() -> String {
    let mut b = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        // aws-lc's RNG does not fail in practice; fall back to str0m's random ufrag.
        return IceCreds::new().pass;
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn one_line(s: &str) -> String {
    s.split(['\r', '\n'])
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A reserved session slot; dropping it releases the slot (and, once registered, the
/// session's registry entries).
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A session in the registry and the `crier_webrtc_sessions` gauge; dropping it (however the
/// session task ends, a panic included) takes it out of both.
struct Registered {
    shared: Arc<Shared>,
    id: String,
    /// Counted as open (else connecting).
    open: bool,
}

impl Registered {
    fn opened(&mut self) {
        if !self.open {
            self.open = true;
            let m = &self.shared.metrics;
            m.webrtc_session(WebRtcState::Connecting, -1);
            m.webrtc_session(WebRtcState::Open, 1);
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let state = if self.open {
            WebRtcState::Open
        } else {
            WebRtcState::Connecting
        };
        self.shared.metrics.webrtc_session(state, -1);
        self.shared.unregister(&self.id);
    }
}

impl Shared {
    /// Forgets a session: its id, ufrag and addresses.
    fn unregister(&self, id: &str) {
        let mut reg = self.registry.lock();
        if let Some(e) = reg.by_id.remove(id) {
            reg.by_ufrag.remove(&e.ufrag);
            for a in e.addrs {
                if reg.by_addr.get(&a).is_some_and(|(u, _)| *u == e.ufrag) {
                    reg.by_addr.remove(&a);
                }
            }
        }
    }

    /// The `Receive` destination for a datagram from `source`: the announced candidate
    /// the peer sent to (ICE matches it against our local candidates). With one socket the
    /// kernel does not say which; the first candidate of the source's family is it in the
    /// usual one-candidate setup.
    fn destination_for(&self, source: SocketAddr) -> SocketAddr {
        self.candidates
            .iter()
            .find(|c| c.is_ipv4() == source.is_ipv4())
            .or(self.candidates.first())
            .copied()
            .unwrap_or(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\na=setup:actpass\r\na=mid:0\r\na=sctp-port:5000\r\n";

    #[test]
    fn offer_needs_a_data_section() {
        assert!(check_offer(OFFER).is_ok(), "{:?}", check_offer(OFFER).err());
        let no_data = OFFER.replace("webrtc-datachannel", "bfcp");
        let e = check_offer(&no_data).err().unwrap_or_default();
        assert!(e.contains("no data channel section"), "{e}");
        let e = check_offer("hello").err().unwrap_or_default();
        assert!(e.starts_with("malformed SDP offer"), "{e}");
        assert!(!e.contains('\n') && !e.contains("PointerOffset"), "{e}");
    }

    #[test]
    fn session_ids_are_128_bit_hex() {
        let a = session_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, session_id());
    }
}
