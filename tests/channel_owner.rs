//! Authorization follows the channel, not the path: a channel belongs to the push location
//! with the longest `channel_prefix` it extends, and that location's Origin, JWT and forward
//! auth checks apply however the channel is reached (another location's path, any transport,
//! WebRTC, the Web Push API's checks). `/live/chat:room` is checked as `/chat/{channel}`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const SECRET: &str = "owner-test-secret-for-hs256-0123456789abcdef";

fn token(channels: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "exp": exp, "crier.subscribe": channels }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// `/live/{channel}` checks nothing; `/chat/{channel}` (`chat:`) needs a JWT and a page from
/// https://chat.example; `/team/{channel}` (`team:`) asks the app.
fn config(secret: &std::path::Path) -> String {
    format!(
        "[[push]]\npath = \"/live/{{channel}}\"\nlongpoll_timeout = \"100ms\"\n\
         [[push]]\npath = \"/chat/{{channel}}\"\nchannel_prefix = \"chat:\"\nlongpoll_timeout = \"100ms\"\n\
         allow_origins = [\"https://chat.example\"]\n\
         [push.jwt]\nsecret_file = \"{}\"\n\
         [[push]]\npath = \"/team/{{channel}}\"\nchannel_prefix = \"team:\"\nlongpoll_timeout = \"100ms\"\n\
         auth_request = \"/auth/check\"\n",
        secret.display()
    )
}

struct Site {
    up: Upstream,
    c: Crier,
    _dir: tempfile::TempDir,
}

async fn site() -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret: PathBuf = dir.path().join("jwt.key");
    std::fs::write(&secret, SECRET).expect("secret");
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), &config(&secret)).await;
    Site { up, c, _dir: dir }
}

async fn status(req: reqwest::RequestBuilder) -> u16 {
    tokio::time::timeout(Duration::from_secs(10), req.send())
        .await
        .expect("an answer within 10s")
        .expect("request")
        .status()
        .as_u16()
}

#[tokio::test]
async fn another_locations_path_gets_the_owners_checks_on_every_transport() {
    let s = site().await;
    let c = &s.c;
    c.publish("chat:room", "secret history").await;

    // Long-poll, also asking for the history.
    let cl = client();
    assert_eq!(status(cl.get(c.url("/live/chat:room"))).await, 401);
    assert_eq!(
        status(cl.get(c.url("/live/chat:room?last_event_id=earliest"))).await,
        401,
        "no history without the owner's token"
    );
    // SSE on the fast path (plain HTTP/1.1), and through hyper (HTTP/2).
    let mut raw = raw::RawConn::connect(c.public).await;
    raw.send("GET /live/chat:room?last_event_id=earliest HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n".to_string())
        .await;
    let r = raw.read_response().await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(!r.text().contains("secret history"));
    let h2 = h2_client();
    assert_eq!(
        status(
            h2.get(c.url("/live/chat:room?last_event_id=earliest"))
                .header("accept", "text/event-stream")
        )
        .await,
        401
    );
    // WebSocket.
    let err = ws_try_connect(&c.ws_url("/live/chat:room?last_event_id=earliest"), &[])
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("401"), "{err}");

    // With the owner's token, every way works (and the history is there).
    let t = token(&["chat:room"]);
    let r = cl
        .get(c.url("/live/chat:room?last_event_id=earliest"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("long-poll");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "secret history");
    let (mut ws, _) = ws_connect(
        &c.ws_url(&format!(
            "/live/chat:room?last_event_id=earliest&access_token={t}"
        )),
        &[],
    )
    .await;
    match ws_next(&mut ws).await {
        Some(tokio_tungstenite::tungstenite::Message::Text(m)) => assert_eq!(m, "secret history"),
        other => panic!("{other:?}"),
    }
    // A token for another chat room is not enough.
    let other = token(&["chat:other"]);
    assert_eq!(
        status(cl.get(c.url("/live/chat:room")).bearer_auth(&other)).await,
        403
    );
    // Channels /live owns stay open.
    assert_eq!(status(cl.get(c.url("/live/news"))).await, 304);
    c.handle.shutdown();
}

#[tokio::test]
async fn the_owners_origin_rule_applies() {
    let s = site().await;
    let c = &s.c;
    let t = token(&["chat:room"]);
    let cl = client();
    // /live alone allows no cross-origin page; chat:room's owner allows https://chat.example.
    let r = cl
        .get(c.url("/live/chat:room"))
        .header("origin", "https://chat.example")
        .bearer_auth(&t)
        .send()
        .await
        .expect("long-poll");
    assert_eq!(r.status(), 304);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    assert_eq!(
        status(
            cl.get(c.url("/live/chat:room"))
                .header("origin", "https://evil.example")
                .bearer_auth(&t)
        )
        .await,
        403
    );
    // And /live's own channels keep /live's rule.
    assert_eq!(
        status(
            cl.get(c.url("/live/news"))
                .header("origin", "https://chat.example")
        )
        .await,
        403
    );
    c.handle.shutdown();
}

#[tokio::test]
async fn forward_auth_is_asked_for_the_owners_channels() {
    let s = site().await;
    let c = &s.c;
    let cl = client();
    assert_eq!(status(cl.get(c.url("/live/team:a"))).await, 401);
    let seen = s.up.auth.last().expect("the app was asked");
    assert_eq!(seen.headers["x-crier-channel"], "team:a");
    assert_eq!(
        status(
            cl.get(c.url("/live/team:a"))
                .header("cookie", "session=good")
        )
        .await,
        304
    );
    // SSE on the fast path asks too.
    let mut raw = raw::RawConn::connect(c.public).await;
    raw.send(
        "GET /live/team:a HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n".to_string(),
    )
    .await;
    assert_eq!(raw.read_response().await.status, 401);
    c.handle.shutdown();
}

#[test]
fn same_prefix_with_other_checks_is_a_config_error_and_check_reports_owners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("crier.toml");
    std::fs::write(
        &conf,
        "[[push]]\npath = \"/a/{channel}\"\n\
         [[push]]\npath = \"/b/{channel}\"\nauth_request = \"/auth\"\n",
    )
    .expect("write");
    let out = process::run_cli(
        &["check", "--config", conf.to_str().expect("utf-8")],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("crier.toml:4:8: push.path: serves the same channels as /a/{channel}"),
        "{err}"
    );

    // Same checks under one prefix are fine; a longer prefix's owner is reported.
    std::fs::write(
        &conf,
        "[[push]]\npath = \"/a/{channel}\"\n\
         [[push]]\npath = \"/b/{channel}\"\ntransports = [\"sse\"]\n\
         [[push]]\npath = \"/chat/{channel}\"\nchannel_prefix = \"chat:\"\nauth_request = \"/auth\"\n",
    )
    .expect("write");
    let out = process::run_cli(
        &["check", "--config", conf.to_str().expect("utf-8")],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("channels \"chat:\"… belong to /chat/{channel}")
            && text.contains("/a/{channel} names them too"),
        "{text}"
    );
}

#[tokio::test]
async fn a_webrtc_offer_through_another_path_gets_the_owners_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("jwt.key");
    std::fs::write(&secret, SECRET).expect("secret");
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        &format!("{}[webrtc]\nlisten = \"127.0.0.1:0\"\n", config(&secret)),
    )
    .await;
    // Refused before the offer is even read: nothing is allocated for it.
    let r = client()
        .post(c.url("/live/chat:room"))
        .header("content-type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .await
        .expect("offer");
    assert_eq!(r.status(), 401);
    // With the token the offer is read (and this one refused as malformed SDP).
    let r = client()
        .post(c.url("/live/chat:room"))
        .header("content-type", "application/sdp")
        .bearer_auth(token(&["chat:room"]))
        .body("v=0\r\n")
        .send()
        .await
        .expect("offer");
    assert_eq!(r.status(), 400);
    c.handle.shutdown();
}
