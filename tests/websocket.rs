//! WebSocket subscribers (tokio-tungstenite clients), end to end through the public listener.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const JSON: (&str, &str) = ("sec-websocket-protocol", "crier.json");

fn header(r: &WsResponse, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The status of a refused handshake.
async fn refused(url: &str, headers: &[(&str, &str)]) -> u16 {
    match ws_try_connect(url, headers).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the upgrade succeeded"),
    }
}

/// The close frame that ends the stream: (code, reason).
async fn close_frame(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        match ws_next(ws).await {
            Some(Message::Close(Some(f))) => return (f.code, f.reason.to_string()),
            Some(Message::Close(None)) => panic!("close frame without a code"),
            Some(_) => continue,
            None => panic!("stream ended without a close frame"),
        }
    }
}

async fn publish_typed(c: &Crier, channel: &str, ct: &str, body: Vec<u8>) -> String {
    let (s, v) = publish_with(c, channel, &[("content-type", ct)], body).await;
    assert_eq!(s, 201);
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn ws_frame_type_follows_the_content_type() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let (mut ws, resp) = ws_connect(&c.ws_url("/live/w"), &[]).await;
    assert_eq!(resp.status(), 101);
    assert_eq!(header(&resp, "crier-resume").as_deref(), Some("ok"));
    assert_eq!(header(&resp, "sec-websocket-protocol"), None);

    publish_typed(&c, "w", "text/plain", b"hi\r\nthere\rlone cr\n".to_vec()).await;
    publish_typed(&c, "w", "application/json", br#"{"a":[1,2]}"#.to_vec()).await;
    publish_typed(&c, "w", "text/html; charset=utf-8", "<p>ünï</p>".into()).await;
    let bin: Vec<u8> = (0..=255u8).rev().collect();
    publish_typed(&c, "w", "application/octet-stream", bin.clone()).await;
    publish_typed(&c, "w", "text/plain", b"not \xff utf-8".to_vec()).await;
    publish_typed(&c, "w", "image/png", b"\x89PNG\r\n".to_vec()).await;
    c.publish("w", "default content type").await;
    // What `curl -d 'hello'` sends: typed at a shell, it is text.
    publish_typed(
        &c,
        "w",
        "application/x-www-form-urlencoded",
        b"hello=world".to_vec(),
    )
    .await;

    let text = |m: Message| match m {
        Message::Text(t) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    };
    let binary = |m: Message| match m {
        Message::Binary(b) => b.to_vec(),
        other => panic!("expected a binary frame, got {other:?}"),
    };
    assert_eq!(
        text(ws_next(&mut ws).await.unwrap()),
        "hi\r\nthere\rlone cr\n"
    );
    assert_eq!(text(ws_next(&mut ws).await.unwrap()), r#"{"a":[1,2]}"#);
    assert_eq!(text(ws_next(&mut ws).await.unwrap()), "<p>ünï</p>");
    assert_eq!(binary(ws_next(&mut ws).await.unwrap()), bin);
    assert_eq!(binary(ws_next(&mut ws).await.unwrap()), b"not \xff utf-8");
    assert_eq!(binary(ws_next(&mut ws).await.unwrap()), b"\x89PNG\r\n");
    assert_eq!(
        text(ws_next(&mut ws).await.unwrap()),
        "default content type"
    );
    assert_eq!(text(ws_next(&mut ws).await.unwrap()), "hello=world");
    c.shutdown().await;
}

#[tokio::test]
async fn ws_crier_json_frames_carry_id_event_and_data() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let (mut ws, resp) = ws_connect(&c.ws_url("/live/j"), &[JSON]).await;
    assert_eq!(
        header(&resp, "sec-websocket-protocol").as_deref(),
        Some("crier.json")
    );

    let (_, v) = publish_with(&c, "j?event=chat", &[], "line1\nline2\r\n").await;
    let id1 = v["id"].as_str().unwrap().to_string();
    let bin = vec![0u8, 0xff, 0xfe, 10, 13, 0x80];
    let id2 = publish_typed(&c, "j", "application/octet-stream", bin.clone()).await;
    let (_, v) = publish_with(&c, "j", &[("crier-event", "ping.pong")], "x").await;
    let id3 = v["id"].as_str().unwrap().to_string();

    let f = ws_json(&ws_next(&mut ws).await.unwrap());
    assert_eq!(f["id"], id1.as_str());
    assert_eq!(f["event"], "chat");
    assert_eq!(f["data"], "line1\nline2\r\n", "byte-identical text");
    let f = ws_json(&ws_next(&mut ws).await.unwrap());
    assert_eq!(f["id"], id2.as_str());
    assert!(f.get("data").is_none(), "{f}");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(f["data_b64"].as_str().expect("data_b64"))
        .unwrap();
    assert_eq!(decoded, bin);
    let f = ws_json(&ws_next(&mut ws).await.unwrap());
    assert_eq!(f["id"], id3.as_str());
    assert_eq!(f["event"], "ping.pong");
    assert_eq!(f["data"], "x");
    c.shutdown().await;
}

/// A client that drops and reconnects with `last_event_id` again and again while 1,000
/// messages are published sees each exactly once, in order.
#[tokio::test]
async fn ws_resume_is_exact_across_reconnects() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_messages = 2000\n").await;
    const N: usize = 1000;
    let base = c.ws_url("/live/wr");
    let (mut ws, _) = ws_connect(&base, &[JSON]).await;
    let publisher = {
        let pub_url = c.pub_url("wr");
        tokio::spawn(async move {
            let cl = client();
            for i in 0..N {
                let r = cl.post(&pub_url).body(i.to_string()).send().await.unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    let run = async {
        let mut seen: Vec<usize> = Vec::with_capacity(N);
        let mut last = String::new();
        let mut reconnects = 0usize;
        while seen.len() < N {
            let want = 1 + (reconnects * 5) % 29;
            for _ in 0..want {
                if seen.len() == N {
                    break;
                }
                let f = ws_json(&ws_next(&mut ws).await.expect("a frame"));
                seen.push(f["data"].as_str().unwrap().parse().unwrap());
                last = f["id"].as_str().unwrap().to_string();
            }
            reconnects += 1;
            // Half the time a clean close, half the time the socket just goes away.
            if reconnects % 2 == 0 {
                let _ = ws.close(None).await;
            }
            drop(ws);
            let (next, resp) = ws_connect(&format!("{base}?last_event_id={last}"), &[JSON]).await;
            assert_eq!(header(&resp, "crier-resume").as_deref(), Some("ok"));
            ws = next;
        }
        (seen, reconnects, ws)
    };
    let (seen, reconnects, mut ws) = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("1,000 messages within 120s");
    publisher.await.unwrap();
    assert!(reconnects > 50, "reconnected {reconnects} times");
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "every message once, in order"
    );
    let extra = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
    assert!(
        !matches!(extra, Ok(Some(Ok(Message::Text(_) | Message::Binary(_))))),
        "no duplicate after the last message: {extra:?}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn ws_resume_reports_gap() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_messages = 3\n").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(c.publish("g", format!("m{i}")).await);
    }
    let data = |m: Message| ws_json(&m)["data"].as_str().unwrap().to_string();
    for (query, resume, first) in [
        (format!("last_event_id={}", ids[0]), "gap", "m3"),
        (format!("last_event_id={}", ids[2]), "ok", "m3"),
        (format!("last_event_id={}", ids[4]), "ok", "m5"),
        ("last_event_id=earliest".to_string(), "ok", "m3"),
    ] {
        let (mut ws, resp) = ws_connect(&c.ws_url(&format!("/live/g?{query}")), &[JSON]).await;
        assert_eq!(
            header(&resp, "crier-resume").as_deref(),
            Some(resume),
            "{query}"
        );
        assert_eq!(data(ws_next(&mut ws).await.unwrap()), first, "{query}");
    }
    c.shutdown().await;
}

#[tokio::test]
async fn ws_closes_with_1000_when_channel_is_deleted() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let (mut ws, _) = ws_connect(&c.ws_url("/live/d"), &[]).await;
    wait_subscribers(&c, "d", 1).await;
    let r = client().delete(c.pub_url("d")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, CloseCode::Normal);
    assert_eq!(reason, "channel deleted");
    c.shutdown().await;
}

#[tokio::test]
async fn ws_pings_every_keepalive_and_ignores_client_frames() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nkeepalive = \"300ms\"\n",
    )
    .await;
    let (mut ws, _) = ws_connect(&c.ws_url("/live/p"), &[]).await;
    // Frames from a subscriber are ignored, never an error.
    ws.send(Message::text("hello?")).await.unwrap();
    ws.send(Message::binary(vec![1u8; 1000])).await.unwrap();
    // A client that keeps reading answers every ping (tungstenite queues the pong and
    // sends it on the next read), so it stays connected past many intervals.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(m) = ws.next().await {
            let Ok(m) = m else { break };
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    let mut pings = 0;
    let read_pings = async {
        while pings < 5 {
            match rx.recv().await {
                Some(Message::Ping(_)) => pings += 1,
                other => panic!("expected pings only, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_pings)
        .await
        .expect("pings arrive every keepalive");
    c.publish("p", "still here").await;
    let next_data = async {
        loop {
            match rx.recv().await {
                Some(Message::Ping(_)) => continue,
                other => return other,
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), next_data).await {
        Ok(Some(Message::Text(t))) => assert_eq!(t.as_str(), "still here"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        metric(&c, "crier_subscribers_dropped_total{reason=\"timeout\"}").await,
        Some(0.0)
    );
    reader.abort();
    c.shutdown().await;
}

#[tokio::test]
async fn ws_client_that_never_answers_pings_is_closed() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nkeepalive = \"100ms\"\n",
    )
    .await;
    // tokio-tungstenite answers a ping only while it reads; this client does not read.
    let (mut ws, _) = ws_connect(&c.ws_url("/live/np"), &[]).await;
    let counted = eventually(Duration::from_secs(10), async || {
        metric(&c, "crier_subscribers_dropped_total{reason=\"timeout\"}").await == Some(1.0)
    })
    .await;
    assert!(counted, "no pong within two intervals: dropped and counted");
    let (code, _) = close_frame(&mut ws).await;
    assert_eq!(code, CloseCode::Away);
    let gone = eventually(Duration::from_secs(10), async || {
        metric(&c, "crier_connections{transport=\"websocket\"}").await == Some(0.0)
    })
    .await;
    assert!(gone, "the subscriber left");
    c.shutdown().await;
}

#[tokio::test]
async fn ws_oversized_client_frame_closes_with_1009() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let (mut ws, _) = ws_connect(&c.ws_url("/live/big"), &[]).await;
    // 16 KiB is fine (ignored), more is not.
    ws.send(Message::text("a".repeat(16 * 1024))).await.unwrap();
    ws.send(Message::text("b".repeat(20 * 1024))).await.unwrap();
    let (code, _) = close_frame(&mut ws).await;
    assert_eq!(code, CloseCode::Size);
    assert_eq!(
        metric(&c, "crier_subscribers_dropped_total{reason=\"oversized\"}").await,
        Some(1.0)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn ws_request_errors() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nmax_channels = 1\n\
         [[push]]\npath = \"/live/{channel}\"\n\
         [[push]]\npath = \"/nows/{channel}\"\ntransports = [\"sse\", \"longpoll\"]\n",
    )
    .await;
    assert_eq!(
        refused(&c.ws_url("/nows/a"), &[]).await,
        400,
        "websocket not enabled"
    );
    assert_eq!(
        refused(&c.ws_url("/live/a%20b"), &[]).await,
        400,
        "bad channel name"
    );
    assert_eq!(
        refused(&c.ws_url("/live/a?last_event_id=yesterday"), &[]).await,
        400,
        "malformed id"
    );
    assert_eq!(
        refused(&c.ws_url("/live/a"), &[("origin", "https://evil.example")]).await,
        403,
        "cross origin, not allowed"
    );
    // Same origin is fine.
    let same = format!("http://{}", c.public);
    let (_one, _) = ws_connect(&c.ws_url("/live/one"), &[("origin", &same)]).await;
    // max_channels = 1: a second channel cannot be created by subscribing.
    assert_eq!(refused(&c.ws_url("/live/two"), &[]).await, 429);
    c.shutdown().await;
}

#[tokio::test]
async fn ws_allowed_origin_gets_cors_headers() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nallow_origins = [\"https://app.example\"]\n",
    )
    .await;
    let (_ws, resp) = ws_connect(&c.ws_url("/live/o"), &[("origin", "https://app.example")]).await;
    assert_eq!(resp.status(), 101);
    assert_eq!(
        header(&resp, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        refused(&c.ws_url("/live/o"), &[("origin", "https://other.example")]).await,
        403
    );
    c.shutdown().await;
}

/// A handshake that names WebSocket but is not a valid one is a 400, not a long-poll.
#[tokio::test]
async fn ws_broken_handshake_is_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut s = tokio::net::TcpStream::connect(c.public).await.unwrap();
    s.write_all(
        b"GET /live/h HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    c.shutdown().await;
}

/// A subscriber that stops reading falls behind the (small) buffer while another keeps up:
/// the slow one is closed and counted without waiting for it to read again; the fast one gets
/// every message.
#[tokio::test]
async fn ws_slow_subscriber_is_dropped_and_fast_one_gets_everything() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nbuffer_messages = 4\nmax_message_size = \"64KiB\"\n",
    )
    .await;
    let url = c.ws_url("/live/lag");
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(c.public).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(url.as_str(), stream)
        .await
        .unwrap();
    let (mut fast, _) = ws_connect(&url, &[]).await;
    wait_subscribers(&c, "lag", 2).await;

    let lagged = || metric(&c, "crier_subscribers_dropped_total{reason=\"lagged\"}");
    let body = vec![b'x'; 60 * 1024];
    let cl = client();
    let mut sent = 0usize;
    // Publish in step with the fast subscriber until the slow one is dropped.
    while lagged().await != Some(1.0) {
        assert!(sent < 1000, "the slow subscriber was never dropped");
        let mut b = sent.to_be_bytes().to_vec();
        b.extend_from_slice(&body);
        let r = cl
            .post(c.pub_url("lag"))
            .header("content-type", "application/octet-stream")
            .body(b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        match ws_next(&mut fast).await {
            Some(Message::Binary(got)) => {
                assert_eq!(got[..8], sent.to_be_bytes(), "fast subscriber in order")
            }
            other => panic!("fast subscriber: {other:?}"),
        }
        sent += 1;
    }
    wait_subscribers(&c, "lag", 1).await;
    // The slow one gets what was queued for it, then the connection ends.
    let mut got = 0usize;
    let drain = async {
        while let Some(Ok(m)) = slow.next().await {
            match m {
                Message::Binary(_) => got += 1,
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .expect("the slow subscriber's connection ends");
    assert!(got < sent, "slow subscriber got {got} of {sent}");
    // The fast one is still subscribed and gets the next message.
    c.publish("lag", "after").await;
    assert!(matches!(ws_next(&mut fast).await, Some(Message::Text(t)) if t.as_str() == "after"));
    c.shutdown().await;
}
