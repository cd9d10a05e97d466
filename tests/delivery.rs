//! Delivery under pressure: a subscriber that falls behind the buffer is moved to the oldest
//! buffered message and told in band (`on_lag = "skip"`, the default), so every message it
//! lost lies inside a gap it was told of: SSE `event: crier.gap`, crier.json `"gap": true`.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const N: usize = 300;
const SIZE: usize = 60 * 1024;

/// Publishes `N` numbered messages of `SIZE` bytes in step with a fast SSE subscriber (which
/// therefore never falls behind).
async fn flood(c: &Crier, channel: &str) {
    let mut fast = SseClient::connect(&c.url(&format!("/live/{channel}")), None).await;
    let body = "x".repeat(SIZE);
    let cl = client();
    for i in 0..N {
        let r = cl
            .post(c.pub_url(channel))
            .body(format!("{i}:{body}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let ev = tokio::time::timeout(Duration::from_secs(15), fast.next_event())
            .await
            .expect("the fast subscriber keeps up")
            .expect("open");
        assert!(ev.data.starts_with(&format!("{i}:")));
    }
}

/// The numbers received must rise, and every jump must come right after a gap notice.
fn check_accounting(events: &[(bool, usize)]) -> (usize, usize) {
    let (mut last, mut told_pending, mut lost, mut gaps) = (None::<usize>, false, 0, 0);
    for &(is_gap, n) in events {
        if is_gap {
            told_pending = true;
            gaps += 1;
            continue;
        }
        let expect = last.map_or(0, |l| l + 1);
        assert!(n >= expect, "out of order: {n} after {last:?}");
        if n > expect {
            assert!(told_pending, "messages {expect}..{n} were lost silently");
            lost += n - expect;
        }
        told_pending = false;
        last = Some(n);
    }
    assert_eq!(last, Some(N - 1), "the stream goes on to the last message");
    (lost, gaps)
}

#[tokio::test]
async fn a_slow_sse_reader_skips_ahead_and_is_told_of_every_gap() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nbuffer_messages = 4\nmax_message_size = \"64KiB\"\n",
    )
    .await;
    // The slow subscriber: the SSE fast path, a small receive buffer, not reading.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = sock.connect(c.public).await.unwrap();
    slow.write_all(b"GET /live/s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    wait_subscribers(&c, "s", 1).await;
    flood(&c, "s").await;
    // It reads again: it is still subscribed and gets the rest, with notices.
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read_all = async {
        loop {
            let n = slow.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "the stream must not end");
            raw.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&raw).contains(&format!("data: {}:", N - 1)) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("the rest arrives");
    let text = String::from_utf8_lossy(&raw);
    let mut events = Vec::new();
    for block in text.split("\n\n") {
        if block.contains("event: crier.gap") {
            assert!(block.contains("\"channel\":\"s\""), "{block}");
            events.push((true, 0));
        } else if let Some(d) = block.split("data: ").nth(1) {
            if let Some((n, _)) = d.split_once(':') {
                if let Ok(n) = n.trim_start_matches(|c: char| !c.is_ascii_digit()).parse() {
                    events.push((false, n));
                }
            }
        }
    }
    let (lost, gaps) = check_accounting(&events);
    assert!(
        lost > 0 && gaps > 0,
        "the reader did fall behind ({lost} lost)"
    );
    assert_eq!(
        metric(&c, "crier_subscribers_dropped_total{reason=\"lagged\"}").await,
        Some(0.0),
        "nobody was dropped"
    );
    assert_eq!(
        metric(&c, "crier_lag_skips_total{transport=\"sse\"}").await,
        Some(gaps as f64)
    );
    assert_eq!(
        metric(&c, "crier_messages_skipped_total{transport=\"sse\"}").await,
        Some(lost as f64)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_slow_crier_json_websocket_gets_gap_true() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nbuffer_messages = 4\nmax_message_size = \"64KiB\"\n",
    )
    .await;
    let (mut ws, _) = ws_connect(
        &c.ws_url("/live/w"),
        &[("sec-websocket-protocol", "crier.json")],
    )
    .await;
    wait_subscribers(&c, "w", 1).await;
    // The client does not read while the flood runs: the socket buffers fill up.
    flood(&c, "w").await;
    let mut events = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws_next(&mut ws))
            .await
            .expect("frames keep coming");
        let Some(m @ Message::Text(_)) = m else {
            panic!("{m:?}")
        };
        let v = ws_json(&m);
        if v["gap"] == true {
            events.push((true, 0));
        }
        let n: usize = v["data"]
            .as_str()
            .unwrap()
            .split_once(':')
            .unwrap()
            .0
            .parse()
            .unwrap();
        events.push((false, n));
        if n == N - 1 {
            break;
        }
    }
    let (lost, gaps) = check_accounting(&events);
    assert!(lost > 0 && gaps > 0, "it did fall behind ({lost} lost)");
    c.shutdown().await;
}

/// The same rule on every path: an SSE reader over HTTP/2 (served through hyper, not the fast
/// path) that stops reading is let go after two keepalive intervals, like one on plain TCP.
#[tokio::test]
async fn a_stalled_sse_reader_over_http2_is_dropped_too() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nmax_message_size = \"64KiB\"\n[[push]]\npath = \"/live/{channel}\"\nkeepalive = \"1s\"\n",
    )
    .await;
    let resp = h2_client()
        .get(c.url("/live/h2stall"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_subscribers(&c, "h2stall", 1).await;
    // Never read: the stream's flow-control window (2 MiB in the client) fills, and hyper
    // stops taking frames.
    let body = "x".repeat(60 * 1024);
    for _ in 0..80 {
        c.publish("h2stall", body.clone()).await;
    }
    let dropped = eventually(Duration::from_secs(20), async || {
        metric(&c, "crier_subscribers_dropped_total{reason=\"timeout\"}").await == Some(1.0)
    })
    .await;
    assert!(dropped, "the stalled reader was not dropped");
    wait_subscribers(&c, "h2stall", 0).await;
    drop(resp);
    c.shutdown().await;
}

/// A stream opened with a JWT ends when the token does (its `exp` plus the leeway), with the
/// transport's reconnect hint: SSE `retry:` then the end; WebSocket close 1008.
#[tokio::test]
async fn an_open_stream_ends_when_its_token_expires() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("k");
    let key = "expiry-test-secret-hs256-0123456789abcdefgh";
    std::fs::write(&secret, key).unwrap();
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        &format!(
            "[[push]]\npath = \"/live/{{channel}}\"\n[push.jwt]\nsecret_file = \"{}\"\nleeway = \"0s\"\n",
            secret.display()
        ),
    )
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "exp": exp, "crier.subscribe": ["t"] }),
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap();
    let mut sse = SseClient::connect(&c.url(&format!("/live/t?access_token={token}")), None).await;
    let (mut ws, _) = ws_connect(&c.ws_url(&format!("/live/t?access_token={token}")), &[]).await;
    let sse_end = tokio::time::timeout(Duration::from_secs(10), async {
        while sse.next_event().await.is_some() {}
    });
    sse_end.await.expect("the SSE stream ends at exp");
    assert!(sse.retries >= 2, "a retry hint before the end");
    match tokio::time::timeout(Duration::from_secs(10), ws_next(&mut ws)).await {
        Ok(Some(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1008, "{f:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        metric(&c, "crier_subscribers_dropped_total{reason=\"expired\"}").await,
        Some(2.0)
    );
    c.shutdown().await;
}
