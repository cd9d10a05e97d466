//! WebRTC DataChannel subscribers: signalling (POST offer → 201 answer, DELETE), auth before
//! any UDP state, limits, delivery and resume, against a real peer: str0m as the *client*
//! (a full, non-lite ICE agent on its own UDP socket), independent of crier's session code.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

const WEBRTC: &str = "[webrtc]\nlisten = \"127.0.0.1:0\"\n";

async fn start(extra: &str) -> (Upstream, Crier) {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), &format!("{WEBRTC}{extra}")).await;
    (up, c)
}

fn webrtc_addr(c: &Crier) -> SocketAddr {
    c.handle.addrs().webrtc.expect("the webrtc socket is bound")
}

/// A WebRTC client: one str0m `Rtc` (not ICE-lite) on its own UDP socket.
struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    channel: ChannelId,
    open: bool,
    opened_at: Option<Instant>,
    /// Text messages received on the data channel, parsed as JSON.
    received: Vec<serde_json::Value>,
    closed: bool,
    /// The offer made, until the answer comes.
    pending: Option<SdpPendingOffer>,
    /// crier's ICE username fragment, from the answer.
    server_ufrag: Option<String>,
}

/// The offer a fresh client makes (a data channel named "crier"), and the client.
async fn new_peer() -> (Peer, String) {
    new_peer_at("127.0.0.1:0".parse().expect("an address")).await
}

/// Like `new_peer`, on a given local address.
async fn new_peer_at(bind: SocketAddr) -> (Peer, String) {
    let socket = UdpSocket::bind(bind).await.expect("udp bind");
    let local = socket.local_addr().expect("udp addr");
    let mut rtc = Rtc::builder().build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").expect("candidate"));
    let mut change = rtc.sdp_api();
    let channel = change.add_channel("crier".into());
    let (offer, pending) = change.apply().expect("an offer");
    let sdp = offer.to_sdp_string();
    let peer = Peer {
        rtc,
        socket,
        local,
        channel,
        open: false,
        opened_at: None,
        received: Vec::new(),
        closed: false,
        pending: Some(pending),
        server_ufrag: None,
    };
    (peer, sdp)
}

/// POSTs an offer; the response.
async fn post_offer(url: &str, sdp: String, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(url)
        .header("content-type", "application/sdp")
        .body(sdp);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("POST offer")
}

impl Peer {
    /// Offers to `url`, takes the answer; returns the client and the session's Location.
    async fn connect(url: &str) -> (Peer, String) {
        let (p, sdp) = new_peer().await;
        p.offer_to(url, sdp).await
    }

    async fn offer_to(self, url: &str, sdp: String) -> (Peer, String) {
        let mut p = self;
        let r = post_offer(url, sdp, &[]).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
        assert_eq!(r.headers()["content-type"], "application/sdp");
        let location = r.headers()["location"]
            .to_str()
            .expect("ascii location")
            .to_string();
        let answer = r.text().await.expect("answer body");
        p.accept(&answer);
        (p, location)
    }

    fn accept(&mut self, answer: &str) {
        self.server_ufrag = answer
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
            .map(str::to_string);
        let answer = SdpAnswer::from_sdp_string(answer).expect("a valid SDP answer");
        let pending = self.pending.take().expect("a pending offer");
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("answer accepted");
    }

    /// Drives the client until `done` holds or `within` passes; true when `done` held.
    async fn run_until(&mut self, within: Duration, done: impl Fn(&Peer) -> bool) -> bool {
        let end = Instant::now() + within;
        let mut buf = vec![0u8; 2048];
        loop {
            if done(self) {
                return true;
            }
            let timeout = loop {
                match self.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => break t,
                    Ok(Output::Transmit(t)) => {
                        let _ = self.socket.send_to(&t.contents, t.destination).await;
                    }
                    Ok(Output::Event(e)) => self.event(e),
                    Err(_) => {
                        self.closed = true;
                        return done(self);
                    }
                }
            };
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            let wait = timeout.min(end).saturating_duration_since(now);
            match tokio::time::timeout(wait, self.socket.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) => {
                    if let Ok(r) = Receive::new(Protocol::Udp, from, self.local, &buf[..n]) {
                        let _ = self.rtc.handle_input(Input::Receive(Instant::now(), r));
                    }
                }
                _ => {
                    let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
                }
            }
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::ChannelOpen(id, _) if id == self.channel => {
                self.open = true;
                self.opened_at = Some(Instant::now());
            }
            Event::ChannelData(d) if d.id == self.channel => {
                assert!(!d.binary, "crier sends text messages");
                let v: serde_json::Value =
                    serde_json::from_slice(&d.data).expect("a crier.json envelope");
                self.received.push(v);
            }
            Event::ChannelClose(id) if id == self.channel => self.closed = true,
            // DTLS close_notify from crier.
            Event::Closed => self.closed = true,
            _ => {}
        }
    }

    async fn open(&mut self) {
        let ok = self.run_until(Duration::from_secs(10), |p| p.open).await;
        assert!(ok, "the data channel did not open");
    }

    async fn receive(&mut self, n: usize) -> Vec<serde_json::Value> {
        let ok = self
            .run_until(Duration::from_secs(15), |p| p.received.len() >= n)
            .await;
        assert!(
            ok,
            "received {} of {n} messages: {:?}",
            self.received.len(),
            self.received
        );
        std::mem::take(&mut self.received)
    }
}

#[tokio::test]
async fn delivers_in_order_including_messages_published_before_the_channel_opens() {
    let (_up, c) = start("").await;
    let (mut p, location) = Peer::connect(&c.url("/live/rtc")).await;
    assert!(
        location.starts_with("/live/rtc?webrtc_session="),
        "{location}"
    );
    // The position is fixed at the POST: this one is published before ICE even starts.
    let early = c.publish("rtc", "early").await;
    p.open().await;
    let mut ids = vec![early];
    for body in ["two\nlines", "ünïcödé ✓"] {
        ids.push(c.publish("rtc", body).await);
    }
    let bin = client()
        .post(c.pub_url("rtc"))
        .header("content-type", "application/octet-stream")
        .body(vec![0xffu8, 0x00, 0x01])
        .send()
        .await
        .expect("publish binary");
    assert_eq!(bin.status(), StatusCode::CREATED);
    let got = p.receive(4).await;
    let got_ids: Vec<&str> = got.iter().map(|v| v["id"].as_str().expect("id")).collect();
    assert_eq!(
        &got_ids[..3],
        &ids.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    assert_eq!(got[0]["data"], "early");
    assert_eq!(got[1]["data"], "two\nlines");
    assert_eq!(got[2]["data"], "ünïcödé ✓");
    assert_eq!(got[3]["data_b64"], "/wAB");
    assert_eq!(
        metric(&c, "crier_connections{transport=\"webrtc\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&c, "crier_webrtc_sessions{state=\"open\"}").await,
        Some(1.0)
    );
    assert!(metric(&c, "crier_messages_delivered_total{transport=\"webrtc\"}").await >= Some(4.0));
    assert_eq!(
        metric(&c, "crier_webrtc_handshake_seconds_count").await,
        Some(1.0)
    );
    // The hub's view (`/channels`) and the status page count it as a WebRTC subscriber.
    let info: serde_json::Value = client()
        .get(c.admin_url("/channels?prefix=rtc"))
        .send()
        .await
        .expect("/channels")
        .json()
        .await
        .expect("json");
    assert_eq!(
        info["channels"][0]["subscribers_by_transport"]["webrtc"], 1,
        "{info}"
    );
    let mut stats = SseClient::connect(&c.admin_url("/stats/stream"), None).await;
    let ev = stats
        .next_within(Duration::from_secs(5))
        .await
        .expect("a snapshot")
        .expect("the stream is open");
    let snap: serde_json::Value = serde_json::from_str(&ev.data).expect("json snapshot");
    assert_eq!(snap["connections"]["webrtc"], 1, "{snap}");
}

/// An offer whose DTLS role is `passive` (the client waits for crier's hello): crier is the
/// DTLS client, says hello once ICE found the peer, and the channel carries messages.
#[tokio::test]
async fn an_offer_that_waits_for_our_hello_gets_crier_as_the_dtls_client() {
    let (_up, c) = start("").await;
    let (p, sdp) = new_peer().await;
    assert!(sdp.contains("a=setup:actpass"), "{sdp}");
    // str0m offered actpass; told it is passive, crier answers active, and str0m (which
    // takes the role the answer leaves it) is the DTLS server.
    let (mut p, _) = p
        .offer_to(
            &c.url("/live/role"),
            sdp.replace("a=setup:actpass", "a=setup:passive"),
        )
        .await;
    p.open().await;
    let id = c.publish("role", "crier said hello first").await;
    let got = p.receive(1).await;
    assert_eq!(got[0]["id"], id.as_str());
}

/// The offer names the certificate its DTLS will show; a peer that shows another (a
/// man in the middle of the signalling's trust) completes no handshake that counts: the
/// session ends without a channel and its state is freed.
#[tokio::test]
async fn a_peer_whose_certificate_is_not_the_offers_gets_no_channel() {
    let (_up, c) = start("").await;
    let (p, sdp) = new_peer().await;
    let line = sdp
        .lines()
        .find(|l| l.starts_with("a=fingerprint:sha-256 "))
        .expect("a sha-256 fingerprint")
        .to_string();
    // Another certificate's fingerprint: the first byte changed.
    let value = &line["a=fingerprint:sha-256 ".len()..];
    let flipped = if value.starts_with("00") { "11" } else { "00" };
    let forged = format!("a=fingerprint:sha-256 {flipped}{}", &value[2..]);
    let (mut p, _) = p
        .offer_to(&c.url("/live/mitm"), sdp.replace(&line, &forged))
        .await;
    assert!(
        !p.run_until(Duration::from_secs(4), |p| p.open).await,
        "a channel opened for a peer with another certificate"
    );
    assert!(all_gone(&c).await, "the session was not freed");
    assert_eq!(
        metric(&c, "crier_webrtc_handshake_seconds_count").await,
        Some(0.0)
    );
}

/// An offer refused: its status and one-line reason.
async fn refused(url: &str, sdp: String, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let r = post_offer(url, sdp, headers).await;
    let status = r.status();
    let body = r.text().await.expect("body");
    assert_eq!(
        body.trim_end().lines().count(),
        1,
        "one-line reason: {body:?}"
    );
    (status, body.trim_end().to_string())
}

async fn sessions(c: &Crier, state: &str) -> Option<f64> {
    metric(c, &format!("crier_webrtc_sessions{{state=\"{state}\"}}")).await
}

/// Waits until no WebRTC session or subscriber is left.
async fn all_gone(c: &Crier) -> bool {
    eventually(Duration::from_secs(10), async || {
        sessions(c, "open").await == Some(0.0)
            && sessions(c, "connecting").await == Some(0.0)
            && metric(c, "crier_connections{transport=\"webrtc\"}").await == Some(0.0)
    })
    .await
}

#[tokio::test]
async fn bad_offers_are_refused_with_one_line_and_nothing_allocated() {
    let (_up, c) = start("").await;
    let url = c.url("/live/bad");
    let (_, good) = new_peer().await;

    let r = client()
        .post(&url)
        .header("content-type", "text/plain")
        .body(good.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let (s, why) = refused(&url, "this is not SDP".into(), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.starts_with("malformed SDP offer"), "{why}");

    let audio_only = {
        let mut rtc = Rtc::new(Instant::now());
        let mut change = rtc.sdp_api();
        change.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        change.apply().expect("an audio offer").0.to_sdp_string()
    };
    let (s, why) = refused(&url, audio_only, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("no data channel section"), "{why}");

    let (s, _) = refused(&url, "v=0\r\n".repeat(20_000), &[]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);

    // Nothing was allocated: no session, no subscriber, not even the channel.
    assert_eq!(sessions(&c, "connecting").await, Some(0.0));
    assert_eq!(
        metric(&c, "crier_connections_total{transport=\"webrtc\"}").await,
        Some(0.0)
    );
    assert_eq!(channel_info(&c, "bad").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_location_without_webrtc_refuses_post_and_delete() {
    let (_up, c) = start(
        "[[push]]\npath = \"/live/{channel}\"\ntransports = [\"sse\"]\n\
         [[push]]\npath = \"/rtc/{channel}\"\ntransports = [\"webrtc\"]\n",
    )
    .await;
    let (_, sdp) = new_peer().await;
    let r = post_offer(&c.url("/live/x"), sdp, &[]).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET, OPTIONS");
    let r = client()
        .delete(c.url("/live/x?webrtc_session=00"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    // The other location serves WebRTC only.
    let (mut p, _) = Peer::connect(&c.url("/rtc/x")).await;
    p.open().await;
    let r = client()
        .get(c.url("/rtc/x"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_ACCEPTABLE);
}

#[tokio::test]
async fn auth_and_origin_are_checked_before_any_udp_state() {
    let (up, c) = start(
        "[[push]]\npath = \"/live/{channel}\"\nauth_request = \"/auth/check\"\n\
         allow_origins = [\"https://app.example\"]\n",
    )
    .await;
    let url = c.url("/live/room");
    // Garbage SDP: auth answers first, so the body is never even read.
    let (s, _) = refused(&url, "not sdp".into(), &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(up.auth.calls(), 1);
    let (_, sdp) = new_peer().await;
    let (s, _) = refused(
        &url,
        sdp.clone(),
        &[
            ("cookie", "session=good"),
            ("origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(up.auth.calls(), 1, "a refused origin never reaches the app");
    let (s, _) = refused(
        &c.url("/live/secret-room"),
        sdp,
        &[("cookie", "session=good")],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(sessions(&c, "connecting").await, Some(0.0));
    assert_eq!(
        metric(&c, "crier_connections_total{transport=\"webrtc\"}").await,
        Some(0.0)
    );

    // With the cookie (and an allowed cross-origin page), the session starts.
    let (mut p, sdp) = new_peer().await;
    let r = post_offer(
        &url,
        sdp,
        &[
            ("cookie", "session=good"),
            ("origin", "https://app.example"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let expose = r.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii");
    assert!(expose.contains("Location"), "{expose}");
    p.accept(&r.text().await.expect("answer"));
    p.open().await;
    let id = c.publish("room", "hello").await;
    assert_eq!(p.receive(1).await[0]["id"], id.as_str());

    // The preflight of a cross-origin POST allows it.
    let r = client()
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let methods = r.headers()["access-control-allow-methods"]
        .to_str()
        .expect("ascii");
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
}

#[tokio::test]
async fn max_sessions_is_503_and_a_slot_frees_when_a_session_ends() {
    let (_up, c) = start("max_sessions = 1\n").await;
    let url = c.url("/live/full");
    let (mut p, location) = Peer::connect(&url).await;
    p.open().await;
    let (_, sdp) = new_peer().await;
    let r = post_offer(&url, sdp.clone(), &[]).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let why = r.text().await.expect("body");
    assert!(why.contains("webrtc.max_sessions = 1"), "{why}");
    assert_eq!(
        metric(&c, "crier_connections{transport=\"webrtc\"}").await,
        Some(1.0)
    );

    let r = client()
        .delete(c.url(&location))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(all_gone(&c).await, "the session did not end");
    let (mut p2, _) = Peer::connect(&url).await;
    p2.open().await;
}

#[tokio::test]
async fn delete_ends_the_session_and_frees_its_state() {
    let (_up, c) = start("").await;
    let (mut p, location) = Peer::connect(&c.url("/live/del")).await;
    p.open().await;
    assert_eq!(sessions(&c, "open").await, Some(1.0));
    // The id belongs to its channel's URL.
    let other = location.replace("/live/del?", "/live/other?");
    let r = client().delete(c.url(&other)).send().await.expect("delete");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client()
        .delete(c.url(&location))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(all_gone(&c).await, "the session did not end");
    // crier said goodbye: the client sees its channel close.
    let closed = p.run_until(Duration::from_secs(5), |p| p.closed).await;
    assert!(closed, "the client was not told");
    let r = client()
        .delete(c.url(&location))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client()
        .delete(c.url("/live/del?webrtc_session=0123456789abcdef0123456789abcdef"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client()
        .delete(c.url("/live/del"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn garbage_datagrams_do_not_disturb_a_live_session() {
    let (_up, c) = start("").await;
    let (mut p, _) = Peer::connect(&c.url("/live/noise")).await;
    p.open().await;
    let target = webrtc_addr(&c);
    let stranger = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xA4, 0x42];
    stun.extend_from_slice(&[9; 12]);
    stun.extend_from_slice(&[0x00, 0x06, 0x00, 0x08]);
    stun.extend_from_slice(b"nope:who");
    // A binding request naming the session's real ufrag, with a bogus MESSAGE-INTEGRITY:
    // it reaches the session (and its address is remembered), and str0m refuses it.
    let ufrag = p.server_ufrag.clone().expect("the answer has a=ice-ufrag");
    let username = format!("{ufrag}:evil");
    let mut forged = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
    forged.extend_from_slice(&[3; 12]);
    forged.extend_from_slice(&[0x00, 0x06]);
    forged.extend_from_slice(&(username.len() as u16).to_be_bytes());
    forged.extend_from_slice(username.as_bytes());
    forged.resize(forged.len().div_ceil(4) * 4, 0);
    forged.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    forged.extend_from_slice(&[0xAB; 20]);
    let len = (forged.len() - 20) as u16;
    forged[2..4].copy_from_slice(&len.to_be_bytes());
    let mut dtls_like = vec![0x17, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 32];
    dtls_like.extend_from_slice(&[0x55; 32]);
    let mut garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x16; 100],
        vec![0xff; 1500],
        stun,
        forged,
        dtls_like,
        vec![0x80; 200], // an RTP-looking header
    ];
    for i in 0..200u32 {
        garbage.push((0..(i % 97) * 13).map(|b| (b * 31 + i) as u8).collect());
    }
    for g in &garbage {
        let _ = stranger.send_to(g, target).await;
        // And from the client's own address: str0m must drop what it cannot parse.
        let _ = p.socket.send_to(g, target).await;
    }
    let id = c.publish("noise", "still here").await;
    let got = p.receive(1).await;
    assert_eq!(got[0]["id"], id.as_str());
    assert_eq!(got[0]["data"], "still here");
    assert_eq!(sessions(&c, "open").await, Some(1.0));
}

#[tokio::test]
async fn a_new_session_from_the_port_of_a_dead_one_connects() {
    let (_up, c) = start("").await;
    let url = c.url("/live/port");
    let (mut a, _) = Peer::connect(&url).await;
    a.open().await;
    let port = a.local;
    drop(a); // crier's session lives on until ice_timeout (30 s), holding the address
    let (b, sdp) = new_peer_at(port).await;
    let (mut b, _) = b.offer_to(&url, sdp).await;
    b.open().await;
    let id = c.publish("port", "to the new one").await;
    assert_eq!(b.receive(1).await[0]["id"], id.as_str());
}

#[tokio::test]
async fn resume_after_teardown_gets_exactly_the_rest() {
    let (_up, c) = start("").await;
    let url = c.url("/live/resume");
    let (mut p, _) = Peer::connect(&url).await;
    p.open().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(c.publish("resume", format!("m{i}")).await);
    }
    let got = p.receive(3).await;
    let last_seen = got[2]["id"].as_str().expect("id").to_string();
    assert_eq!(last_seen, ids[2]);
    drop(p); // torn down without a word: no DELETE, no close
    for i in 3..6 {
        ids.push(c.publish("resume", format!("m{i}")).await);
    }
    let (mut q, _) = Peer::connect(&format!("{url}?last_event_id={last_seen}")).await;
    q.open().await;
    let got = q.receive(3).await;
    let got_ids: Vec<&str> = got.iter().map(|v| v["id"].as_str().expect("id")).collect();
    assert_eq!(
        got_ids,
        ids[3..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    // Nothing more (no duplicate) arrives.
    q.run_until(Duration::from_millis(500), |_| false).await;
    assert!(q.received.is_empty(), "{:?}", q.received);
    let (s, _) = refused(
        &format!("{url}?last_event_id=nonsense"),
        new_peer().await.1,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// In a cluster (issue 17), a WebRTC subscriber on one node resumes from an id another node
/// gave, from Redis's history, and then gets what any node publishes, once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_session_resumes_from_another_nodes_id_and_gets_every_nodes_publishes() {
    if let Some(why) = common::redis::absent() {
        eprintln!("skipped: {why}");
        return;
    }
    let redis = common::redis::RedisServer::start(false);
    let cluster = format!(
        "[cluster]\nredis = [{:?}]\nkey_prefix = \"rtc:\"\n",
        redis.url()
    );
    let up = Upstream::start().await;
    let a = Crier::start(&up.url(), &format!("{WEBRTC}{cluster}")).await;
    let b = Crier::start(&up.url(), &format!("{WEBRTC}{cluster}")).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(a.publish("rtc", format!("m{i}")).await);
    }
    // Node B never saw the channel: the resume comes from Redis.
    let url = b.url("/live/rtc");
    let (mut p, _) = Peer::connect(&format!("{url}?last_event_id={}", ids[1])).await;
    p.open().await;
    let got = p.receive(2).await;
    let got_ids: Vec<&str> = got.iter().map(|v| v["id"].as_str().expect("id")).collect();
    assert_eq!(got_ids, [ids[2].as_str(), ids[3].as_str()]);
    // Live: publishes alternating over both nodes reach the session once each, in order.
    for i in 4..8 {
        let on = if i % 2 == 0 { &a } else { &b };
        ids.push(on.publish("rtc", format!("m{i}")).await);
    }
    let got = p.receive(4).await;
    let got: Vec<(&str, &str)> = got
        .iter()
        .map(|v| {
            (
                v["id"].as_str().expect("id"),
                v["data"].as_str().expect("data"),
            )
        })
        .collect();
    let want: Vec<(&str, String)> = (4..8).map(|i| (ids[i].as_str(), format!("m{i}"))).collect();
    assert_eq!(
        got,
        want.iter()
            .map(|(i, d)| (*i, d.as_str()))
            .collect::<Vec<_>>()
    );
    p.run_until(Duration::from_millis(500), |_| false).await;
    assert!(p.received.is_empty(), "a duplicate: {:?}", p.received);
}

/// The `{"subscribed","id"}` lines a multiplexed session starts with: (name, position).
fn starts(got: &[serde_json::Value]) -> Vec<(String, String)> {
    got.iter()
        .map(|v| {
            let name = v["subscribed"].as_str().expect("a subscribed line first");
            let id = v["id"].as_str().expect("its position");
            (name.to_string(), id.to_string())
        })
        .collect()
}

/// (channel, id, data) of each envelope.
fn envelopes(got: &[serde_json::Value]) -> Vec<(String, String, String)> {
    got.iter()
        .map(|v| {
            let s = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("{k} in {v}"))
                    .to_string()
            };
            (s("channel"), s("id"), s("data"))
        })
        .collect()
}

#[tokio::test]
async fn one_session_carries_several_channels_and_their_cursor_resumes_them_all() {
    let (_up, c) = start("[channels]\nbuffer_messages = 1000\n").await;
    let url = c.url("/live/a,b,c");
    let (mut p, location) = Peer::connect(&url).await;
    assert!(
        location.starts_with("/live/a,b,c?webrtc_session="),
        "{location}"
    );
    // Published before ICE: the position is fixed at the POST.
    let early = c.publish("b", "early").await;
    p.open().await;
    let head = p.receive(4).await;
    let first = starts(&head[..3]);
    let names: Vec<&str> = first.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "{head:?}");
    assert_eq!(
        envelopes(&head[3..]),
        [("b".to_string(), early.clone(), "early".to_string())]
    );
    // One session, counted once; each channel counts it.
    assert_eq!(
        metric(&c, "crier_connections{transport=\"webrtc\"}").await,
        Some(1.0)
    );
    for ch in ["a", "b", "c"] {
        assert_eq!(channel_info(&c, ch).await.1["subscribers"], 1);
    }

    // Channel `c` gets nothing before the drop: its part of the cursor is where it started.
    let mut published = vec![("b".to_string(), early, "early".to_string())];
    let publish = |ch: &'static str, i: usize| {
        let c = &c;
        async move {
            (
                ch.to_string(),
                c.publish(ch, format!("{ch}{i}")).await,
                format!("{ch}{i}"),
            )
        }
    };
    for i in 0..40 {
        published.push(publish(["a", "b"][i % 3 % 2], i).await);
    }
    let got = envelopes(&p.receive(40).await);
    assert_eq!(
        got,
        published[1..],
        "the order crier appended them, each named"
    );
    let mut last: std::collections::HashMap<String, String> = first.into_iter().collect();
    for (ch, id, _) in &got {
        last.insert(ch.clone(), id.clone());
    }
    drop(p); // torn down without a word
    let mut rest = Vec::new();
    for i in 40..100 {
        rest.push(publish(["a", "b", "c"][(i * 7 + i / 3) % 3], i).await);
    }
    let cursor = format!("{},{},{}", last["a"], last["b"], last["c"]);
    let (mut q, _) = Peer::connect(&format!("{url}?last_event_id={cursor}")).await;
    q.open().await;
    let again = q.receive(3 + rest.len()).await;
    let resumed: Vec<(String, String)> = ["a", "b", "c"]
        .iter()
        .map(|n| (n.to_string(), last[*n].clone()))
        .collect();
    assert_eq!(
        starts(&again[..3]),
        resumed,
        "it starts where the cursor says"
    );
    assert_eq!(envelopes(&again[3..]), rest, "exactly the rest, in order");
    // Nothing more (no duplicate) arrives.
    q.run_until(Duration::from_millis(500), |_| false).await;
    assert!(q.received.is_empty(), "{:?}", q.received);

    // A cursor of the wrong length, or one id for several channels, is refused.
    for bad in [format!("{},{}", last["a"], last["b"]), last["a"].clone()] {
        let (s, reason) = refused(
            &format!("{url}?last_event_id={bad}"),
            new_peer().await.1,
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{reason}");
    }
    c.shutdown().await;
}

#[tokio::test]
async fn ice_timeout_ends_a_silent_session() {
    let (_up, c) = start("ice_timeout = \"1s\"\n").await;
    let (mut p, _) = Peer::connect(&c.url("/live/quiet")).await;
    p.open().await;
    drop(p); // no more consent checks
    assert!(all_gone(&c).await, "the silent session was not ended");
    assert_eq!(
        metric(&c, "crier_subscribers_dropped_total{reason=\"timeout\"}").await,
        Some(1.0)
    );
    // A client that never even starts ICE is ended too.
    let (_p, sdp) = new_peer().await;
    assert_eq!(
        post_offer(&c.url("/live/quiet"), sdp, &[]).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(sessions(&c, "connecting").await, Some(1.0));
    assert!(
        all_gone(&c).await,
        "the never-connected session was not ended"
    );
}

#[tokio::test]
async fn channel_delete_and_shutdown_close_sessions() {
    let (_up, c) = start("").await;
    let (mut p, _) = Peer::connect(&c.url("/live/gone")).await;
    p.open().await;
    let r = client()
        .delete(c.pub_url("gone"))
        .send()
        .await
        .expect("delete channel");
    assert!(r.status().is_success(), "{}", r.status());
    assert!(
        p.run_until(Duration::from_secs(5), |p| p.closed).await,
        "not closed on delete"
    );
    assert!(all_gone(&c).await);

    let (mut p, _) = Peer::connect(&c.url("/live/stay")).await;
    p.open().await;
    let metrics = c.handle.metrics().clone();
    let shut = tokio::spawn(c.shutdown());
    assert!(
        p.run_until(Duration::from_secs(5), |p| p.closed).await,
        "not closed on shutdown"
    );
    shut.await.expect("shutdown");
    assert_eq!(metrics.subscribers(crier::model::Transport::WebRtc), 0);
    assert_eq!(
        metrics.webrtc_sessions(crier::metrics::WebRtcState::Open),
        0
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_when_it_falls_behind() {
    let (_up, c) = start(
        "[channels]\nbuffer_messages = 4\n[[push]]\npath = \"/live/{channel}\"\non_lag = \"disconnect\"\n",
    )
    .await;
    let (mut p, _) = Peer::connect(&c.url("/live/slow")).await;
    p.open().await;
    // The client stops driving its side (no acks), but its ICE consent is not the point
    // here: 30 s of ice_timeout is far away. 60 KiB messages fill the data channel's send
    // buffer after two; then the hub's buffer of 4 moves past the session.
    let body = "x".repeat(60 * 1024);
    for _ in 0..12 {
        c.publish("slow", body.clone()).await;
    }
    let ok = eventually(Duration::from_secs(10), async || {
        metric(&c, "crier_subscribers_dropped_total{reason=\"lagged\"}").await == Some(1.0)
    })
    .await;
    assert!(ok, "the stalled client was not dropped");
    assert!(all_gone(&c).await);
    drop(p);
}

/// The built binary as a child process (so its RSS is crier's alone), with the addresses it
/// logs. Killed on drop.
struct Child {
    child: std::process::Child,
    public: SocketAddr,
    publish: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Child {
    fn start(upstream: &str, extra: &str) -> Child {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = base_config(upstream, &dir.path().join("publish.sock"), extra);
        let path = dir.path().join("crier.toml");
        std::fs::write(&path, toml).expect("write config");
        let mut child = std::process::Command::new(common::process::crier_bin())
            .arg("--config")
            .arg(&path)
            .args(["--log-format", "json"])
            .env("CRIER_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn crier");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut found = std::collections::HashMap::new();
        while found.len() < 3 {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("crier logs its addresses");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let msg = v["fields"]["message"].as_str().unwrap_or("").to_string();
            for (key, prefix) in [
                ("public", "listening on http://"),
                ("publish", "publish API on http://"),
                ("admin", "admin on http://"),
            ] {
                if let Some(rest) = msg.strip_prefix(prefix) {
                    let addr = rest.split(' ').next().unwrap_or("");
                    found.insert(key, addr.parse::<SocketAddr>().expect("an address"));
                }
            }
        }
        std::thread::spawn(move || for _ in rx {});
        Child {
            child,
            public: found["public"],
            publish: found["publish"],
            admin: found["admin"],
            _dir: dir,
        }
    }

    /// utime + stime of the process, in clock ticks (1/100 s).
    fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("proc stat");
        // The fields after the command name (which is in parentheses and may hold spaces).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        n(11) + n(12)
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The anonymous part of the RSS (heap, stacks): what sessions allocate, without the pages
    /// of crier's own binary that the first handshakes fault in once (DTLS, SCTP, ICE code).
    fn anon_kib(&self) -> u64 {
        self.status_kib("RssAnon:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 1,000 sessions (the number: CRIER_WEBRTC_SESSIONS) on one channel all receive one publish.
/// Prints the handshake time (client side: POST sent → data channel open, at most
/// CRIER_WEBRTC_AT_ONCE = 50 handshakes at once) and crier's RSS per session, with its
/// anonymous part: the rest of the growth is file-backed, crier's own code for DTLS, SCTP and
/// ICE that the first handshakes page in once (3.7 MB), which a 1,000-session run spreads as
/// 3.7 KiB over every session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sessions_on_one_channel_all_receive_a_publish() {
    raise_fd_limit();
    let n: usize = std::env::var("CRIER_WEBRTC_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let up = Upstream::start().await;
    let c = tokio::task::spawn_blocking({
        let url = up.url();
        move || Child::start(&url, &format!("{WEBRTC}ice_timeout = \"60s\"\n"))
    })
    .await
    .expect("start crier");
    let rss_before = c.rss_kib();
    let anon_before = c.anon_kib();
    let url = format!("http://{}/live/many", c.public);
    let at_once: usize = std::env::var("CRIER_WEBRTC_AT_ONCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let gate = Arc::new(tokio::sync::Semaphore::new(at_once));
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let go = Arc::new(tokio::sync::Notify::new());
    let published = Arc::new(std::sync::OnceLock::<String>::new());
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (url, gate, opened, go, published) = (
            url.clone(),
            gate.clone(),
            opened.clone(),
            go.clone(),
            published.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore");
            let t0 = Instant::now();
            let (mut p, _) = Peer::connect(&url).await;
            let ok = p.run_until(Duration::from_secs(60), |p| p.open).await;
            assert!(ok, "a data channel did not open");
            let handshake = t0.elapsed();
            drop(permit);
            opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Keep the session alive (consent, acks) until the message arrives.
            let notified = go.notified();
            tokio::pin!(notified);
            let end = Instant::now() + Duration::from_secs(120);
            while published.get().is_none() && Instant::now() < end {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = p.run_until(Duration::from_millis(200), |_| false) => {}
                }
            }
            let ok = p
                .run_until(Duration::from_secs(30), |p| !p.received.is_empty())
                .await;
            assert!(ok, "a session did not receive the publish");
            assert_eq!(
                p.received[0]["id"].as_str(),
                published.get().map(String::as_str)
            );
            (handshake, Instant::now())
        }));
    }
    let all_open = eventually(Duration::from_secs(300), async || {
        opened.load(std::sync::atomic::Ordering::SeqCst) == n
    })
    .await;
    assert!(
        all_open,
        "only {} of {n} sessions opened",
        opened.load(std::sync::atomic::Ordering::SeqCst)
    );
    let rss_open = c.rss_kib();
    let anon_open = c.anon_kib();
    // CPU crier spends on idle open sessions (timers, consent checks): over 3 s.
    let cpu0 = c.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_cpu = (c.cpu_ticks() - cpu0) as f64 / 100.0 / 3.0;
    let sessions = metric_at(c.admin, "crier_webrtc_sessions{state=\"open\"}").await;
    assert_eq!(sessions, Some(n as f64));
    let published_at = Instant::now();
    let r = client()
        .post(format!("http://{}/pub/many", c.publish))
        .body("to everyone")
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["subscribers"], n);
    let _ = published.set(v["id"].as_str().expect("id").to_string());
    go.notify_waiters();
    let mut times = Vec::new();
    let mut last_received = published_at;
    for t in tasks {
        let (handshake, received) = t.await.expect("a session task");
        times.push(handshake);
        last_received = last_received.max(received);
    }
    times.sort();
    let pct = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let delivered = metric_at(
        c.admin,
        "crier_messages_delivered_total{transport=\"webrtc\"}",
    )
    .await;
    assert_eq!(delivered, Some(n as f64));
    eprintln!(
        "webrtc: {n} sessions; handshake p50 {:?} p99 {:?} max {:?}; crier RSS {} KiB before, {} KiB with {n} open: {:.1} KiB per session ({:.1} KiB of it anonymous memory; the rest is crier's code, paged in once); crier CPU with them idle: {:.1}% of a core; one publish reached all {n} in {:?}",
        pct(0.5),
        pct(0.99),
        times[times.len() - 1],
        rss_before,
        rss_open,
        (rss_open.saturating_sub(rss_before)) as f64 / n as f64,
        (anon_open.saturating_sub(anon_before)) as f64 / n as f64,
        idle_cpu * 100.0,
        last_received - published_at
    );
}

#[tokio::test]
async fn a_jwt_location_needs_a_token_naming_the_channel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "webrtc-test-secret-0123456789abcdef-0123";
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, secret).expect("write key");
    let (_up, c) = start(&format!(
        "[[push]]\npath = \"/live/{{channel}}\"\n[push.jwt]\nsecret_file = \"{}\"\n",
        key.display()
    ))
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = |channels: &[&str]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": "u", "exp": exp, "crier.subscribe": channels}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    };
    let url = c.url("/live/orders");
    let (_, sdp) = new_peer().await;
    let (s, _) = refused(&url, sdp.clone(), &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let other = format!("Bearer {}", token(&["news"]));
    let (s, _) = refused(&url, sdp, &[("authorization", &other)]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(sessions(&c, "connecting").await, Some(0.0));
    let (mut p, sdp) = new_peer().await;
    let good = format!("Bearer {}", token(&["orders"]));
    let r = post_offer(&url, sdp, &[("authorization", &good)]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    p.accept(&r.text().await.expect("answer"));
    p.open().await;
}

#[tokio::test]
async fn webrtc_added_by_a_reload_says_it_needs_a_restart() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let (_, sdp) = new_peer().await;
    let r = post_offer(&c.url("/live/r"), sdp.clone(), &[]).await;
    assert_eq!(
        r.status(),
        StatusCode::METHOD_NOT_ALLOWED,
        "no [webrtc] yet"
    );
    let toml = base_config(&up.url(), &c.publish_unix, WEBRTC);
    let config = crier::Config::from_toml(&toml, None).expect("a valid config");
    c.handle.reload(config).expect("reload");
    let (s, why) = refused(&c.url("/live/r"), sdp, &[]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(why.contains("restart"), "{why}");
}
