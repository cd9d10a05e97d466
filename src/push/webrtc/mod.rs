//! WebRTC DataChannel subscribers: the same channels, ids, resume and auth as the other
//! transports, over one UDP socket (ICE-lite, so crier never sends checks and needs no TURN).
//!
//! Signalling is one HTTP exchange on the push location's URL, WHIP-style:
//! `POST /live/{channel}` with the browser's SDP offer → `201 Created`, the answer, and
//! `Location: /live/{channel}?webrtc_session=<id>`; `DELETE` on that URL ends the session.
//! The position is fixed at the POST (the hub subscription starts then), so messages published
//! while ICE, DTLS and SCTP come up are delivered once the client's first data channel opens.
//!
//! The parts: this file (signalling and the session registry), `udp.rs` (the one task that
//! owns the socket and hands each datagram to its session's `inbox.rs`), `session.rs` (one task
//! per session pumping its protocol stack), and that stack, sans-IO: `sdp.rs` (offer and
//! answer), `stun.rs` (ICE-lite checks), `dtls.rs` (dimpl, set up once for all sessions) and
//! `sctp.rs` (sctp-proto and the data channel's DCEP). A general WebRTC stack keeps state for
//! media, bandwidth estimation and full ICE in every session; a subscriber needs none of it.

mod dtls;
mod inbox;
mod sctp;
mod sdp;
mod session;
mod stun;
mod udp;

pub use dtls::DtlsSetupError;

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
    #[error(transparent)]
    Dtls(#[from] DtlsSetupError),
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
    /// One certificate and DTLS config for every session: making them is the costliest part
    /// of a session, and the fingerprint in each answer authenticates it just the same.
    dtls: dtls::Setup,
    sctp: sctp::Configs,
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
        let dtls = dtls::Setup::new()?;
        Ok(WebRtc {
            shared: Arc::new(Shared {
                socket: Arc::new(socket),
                candidates,
                max_sessions: cfg.max_sessions,
                ice_timeout: cfg.ice_timeout,
                dtls,
                sctp: sctp::Configs::new(dtls::MTU),
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
    let offer = match sdp::parse_offer(&text) {
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
    let (Some(ufrag), Some(pwd), Some(id)) = (random_token(8), random_token(24), session_id())
    else {
        return response::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness for the session's credentials",
        );
    };
    let answer = sdp::answer(
        &offer,
        &sdp::Local {
            ufrag: &ufrag,
            pwd: &pwd,
            fingerprint: &sh.dtls.fingerprint,
            candidates: &sh.candidates,
        },
        u64::from_str_radix(&id[..15], 16).unwrap_or(1),
    );
    let feed = open_feed(hub, loc, admitted, Transport::WebRtc, loc.on_lag, remote);
    let feed = match feed.await {
        Ok(f) => f,
        Err(e) => return hub_error(e),
    };
    let resume = resume_value(feed.started_with_gap());
    let tx: Queue = Arc::new(inbox::Inbox::new(SESSION_QUEUE));
    let rx = tx.clone();
    let stop = sh.stop.child_token();
    {
        let mut reg = sh.registry.lock();
        reg.by_ufrag.insert(ufrag.clone(), (id.clone(), tx));
        reg.by_id.insert(
            id.clone(),
            Entry {
                channels: admitted.channels.clone(),
                ufrag: ufrag.clone(),
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
        conn: Box::new(session::Conn {
            ice: stun::Credentials::new(&ufrag, &offer.ice_ufrag, &pwd),
            verified: Vec::new(),
            peer: None,
            nominated: false,
            dtls: sh.dtls.session(offer.dtls_active, posted),
            fingerprints: offer.fingerprints,
            cert_ok: false,
            dtls_started: false,
            dtls_deadline: None,
            sctp: sctp::Sctp::new(&sh.sctp, offer.max_message_size),
            sctp_port: offer.sctp_port,
        }),
        feed,
        rx,
        stop,
        posted,
    };
    sh.tasks.spawn(task.run());

    let mut r = Response::new(response::full(answer));
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

/// The answer crier gives `offer`, or why it cannot (for the fuzz target, which checks that
/// any answer parses again).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn answer_for_fuzzing(offer: &str, candidates: &[SocketAddr]) -> Result<String, String> {
    let offer = sdp::parse_offer(offer)?;
    Ok(sdp::answer(
        &offer,
        &sdp::Local {
            ufrag: "fuzz",
            pwd: FUZZ_PWD,
            fingerprint: "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF",
            candidates,
        },
        1,
    ))
}

/// The ICE-lite check path on one datagram, for the fuzz target: `req` answered for a
/// session whose ufrag is `fuzz` (the peer's `peer`), password `FUZZ_PWD`; the response.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn stun_answer_for_fuzzing(req: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
    let creds = stun::Credentials::new("fuzz", "peer", FUZZ_PWD);
    let mut out = [0u8; stun::MAX_RESPONSE];
    // The socket task's routing parse, which every datagram meets first.
    let _ = stun::local_ufrag(req);
    let (_, n) = stun::answer(req, &creds, source, &mut out)?;
    Some(out[..n].to_vec())
}

/// A binding request for the fuzz target's session with `attrs` (type, value) after its
/// USERNAME, signed with `FUZZ_PWD`, with or without FINGERPRINT.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn stun_request_for_fuzzing(attrs: &[(u16, &[u8])], fingerprint: bool) -> Vec<u8> {
    let mut all: Vec<(u16, &[u8])> = vec![(0x0006, b"fuzz:peer")];
    all.extend_from_slice(attrs);
    stun::request(&all, Some(FUZZ_PWD), fingerprint)
}

#[cfg(any(test, feature = "fuzzing"))]
const FUZZ_PWD: &str = "fuzzfuzzfuzzfuzzfuzzfuzz";

/// 128 random bits, hex: the session's URL is its capability.
fn session_id() -> Option<String> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `n` random ice-chars (RFC 8839: ALPHA / DIGIT / "+" / "/"), 6 bits each: an ICE ufrag or
/// password.
fn random_token(n: usize) -> Option<String> {
    const ICE_CHARS: &[u8; 64] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).ok()?;
    Some(
        b.iter()
            .map(|x| ICE_CHARS[usize::from(x & 63)] as char)
            .collect(),
    )
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

    /// Sends one datagram without waiting: a full socket buffer drops it, as the network
    /// may, and the protocols above retransmit what mattered.
    fn send(&self, data: &[u8], to: SocketAddr) {
        if let Err(e) = self.socket.try_send_to(data, to) {
            tracing::debug!("webrtc: send to {to}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_128_bit_hex_and_credentials_ice_chars() {
        let a = session_id().expect("random");
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(Some(a), session_id());
        let pwd = random_token(24).expect("random");
        assert_eq!(pwd.len(), 24);
        assert!(pwd
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
        assert_ne!(Some(pwd), random_token(24));
    }
}
