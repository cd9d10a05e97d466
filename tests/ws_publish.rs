//! Two-way WebSocket (`client_messages`): a client's frames published to the channel (one id,
//! every transport, `echo`), or forwarded to the app (`forward_to`: headers, order, answers,
//! failures); who may publish (JWT `crier.publish`, forward auth `X-Crier-Action: publish`);
//! the limits (`max_client_message` → 1009, `client_rate` → 1008); the default, `refuse`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const JSON: (&str, &str) = ("sec-websocket-protocol", "crier.json");

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

async fn next_json(ws: &mut Ws) -> Value {
    let m = ws_next(ws).await.expect("a frame");
    ws_json(&m)
}

async fn next_text(ws: &mut Ws) -> String {
    match ws_next(ws).await {
        Some(Message::Text(t)) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn send(ws: &mut Ws, m: Message) {
    ws.send(m).await.expect("send a frame");
}

async fn send_json(ws: &mut Ws, v: Value) {
    send(ws, Message::text(v.to_string())).await;
}

async fn client_messages(c: &Crier, kind: &str, result: &str) -> f64 {
    metric(
        c,
        &format!("crier_client_messages_total{{location_kind=\"{kind}\",result=\"{result}\"}}"),
    )
    .await
    .unwrap_or(0.0)
}

const ROOM: &str = "[[push]]\npath = \"/room/{channel}\"\nclient_messages = \"publish\"\n";

#[tokio::test]
async fn a_client_message_reaches_every_subscriber_once_with_one_id() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), ROOM).await;
    let (mut a, _) = ws_connect(&c.ws_url("/room/r1"), &[JSON]).await;
    let (mut b, _) = ws_connect(&c.ws_url("/room/r1"), &[]).await;
    let mut sse = SseClient::connect(&c.url("/room/r1"), None).await;
    wait_subscribers(&c, "r1", 3).await;

    // crier.json: acked with the id, and delivered like any message (to the sender too).
    send_json(
        &mut a,
        json!({"publish": "r1", "data": "hi", "event": "chat"}),
    )
    .await;
    let ack = next_json(&mut a).await;
    assert_eq!(ack["published"], "r1", "{ack}");
    let id = ack["id"].as_str().expect("id").to_string();
    assert_eq!(
        next_json(&mut a).await,
        json!({"id": id, "event": "chat", "data": "hi"})
    );
    assert_eq!(next_text(&mut b).await, "hi");
    let ev = sse.next_event().await.expect("sse event");
    assert_eq!(
        (ev.id.as_deref(), ev.event.as_deref(), ev.data.as_str()),
        (Some(id.as_str()), Some("chat"), "hi")
    );

    // A plain frame is the body: text → text/plain, binary → application/octet-stream.
    send(&mut b, Message::text("yo")).await;
    assert_eq!(next_text(&mut b).await, "yo", "echo is on by default");
    let m = next_json(&mut a).await;
    assert_eq!(m["data"], "yo");
    let ev = sse.next_event().await.expect("sse event");
    assert_eq!(
        (ev.id, ev.data.as_str()),
        (m["id"].as_str().map(String::from), "yo")
    );
    send(&mut b, Message::binary(vec![0xff, 0x00])).await;
    assert!(matches!(ws_next(&mut b).await, Some(Message::Binary(d)) if d[..] == [0xff, 0x00]));
    let m = next_json(&mut a).await;
    assert_eq!(m["data_b64"], "/wA=");
    assert_eq!(
        sse.next_event().await.expect("sse event").id.as_deref(),
        m["id"].as_str()
    );

    // Each message came once: the next thing everyone gets is the API's marker.
    c.publish("r1", "end").await;
    assert_eq!(next_json(&mut a).await["data"], "end");
    assert_eq!(next_text(&mut b).await, "end");
    assert_eq!(sse.next_event().await.expect("sse event").data, "end");
    let (_, info) = channel_info(&c, "r1").await;
    assert_eq!(info["published"], 4, "{info}");
    assert_eq!(client_messages(&c, "publish", "published").await, 3.0);
    c.shutdown().await;
}

#[tokio::test]
async fn echo_false_keeps_the_senders_own_message_from_it_only() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), &format!("{ROOM}echo = false\n")).await;
    let (mut a, _) = ws_connect(&c.ws_url("/room/r2"), &[JSON]).await;
    let (mut b, _) = ws_connect(&c.ws_url("/room/r2"), &[]).await;
    let mut sse = SseClient::connect(&c.url("/room/r2"), None).await;
    wait_subscribers(&c, "r2", 3).await;

    send_json(&mut a, json!({"publish": "r2", "data": "from a"})).await;
    let ack = next_json(&mut a).await;
    assert_eq!(ack["published"], "r2");
    assert_eq!(next_text(&mut b).await, "from a");
    let ev = sse.next_event().await.expect("sse event");
    assert_eq!(ev.id.as_deref(), ack["id"].as_str());

    send(&mut b, Message::text("from b")).await;
    assert_eq!(next_json(&mut a).await["data"], "from b");
    assert_eq!(sse.next_event().await.expect("sse event").data, "from b");

    // Neither sender got its own message: the next frame each sees is the marker.
    c.publish("r2", "end").await;
    assert_eq!(next_json(&mut a).await["data"], "end");
    assert_eq!(next_text(&mut b).await, "end");
    assert_eq!(sse.next_event().await.expect("sse event").data, "end");
    c.shutdown().await;
}

#[tokio::test]
async fn crier_json_publishes_to_any_channel_it_may_and_says_why_not() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        &format!("{ROOM}[[push]]\npath = \"/ro/{{channel}}\"\nchannel_prefix = \"ro:\"\n"),
    )
    .await;
    let (mut a, _) = ws_connect(&c.ws_url("/room/home"), &[JSON]).await;
    let (mut other, _) = ws_connect(&c.ws_url("/room/other"), &[]).await;
    wait_subscribers(&c, "other", 1).await;

    // A channel this connection does not read.
    send_json(&mut a, json!({"publish": "other", "data_b64": "AAE="})).await;
    let ack = next_json(&mut a).await;
    assert_eq!(ack["published"], "other");
    assert!(matches!(ws_next(&mut other).await, Some(Message::Binary(d)) if d[..] == [0, 1]));
    assert_eq!(channel_info(&c, "other").await.1["last_id"], ack["id"]);

    for (cmd, why) in [
        (json!({"publish": "x"}), "one of data or data_b64"),
        (
            json!({"publish": "x", "data": "a", "data_b64": "AA=="}),
            "one of data or data_b64",
        ),
        (json!({"publish": "x", "data_b64": "%%%"}), "not base64"),
        (
            json!({"publish": "x", "data": "a", "event": "no spaces"}),
            "event name",
        ),
        (json!({"publish": "a b", "data": "a"}), "channel"),
        (
            json!({"publish": "x", "subscribe": "y", "data": "a"}),
            "one of subscribe",
        ),
        // `ro:` belongs to a location that refuses client messages.
        (
            json!({"publish": "ro:x", "data": "a"}),
            "takes no client messages",
        ),
    ] {
        let e = next_json_after(&mut a, cmd.clone()).await;
        let text = e["error"].as_str().unwrap_or_default();
        assert!(text.contains(why), "{cmd} → {e}");
    }
    assert_eq!(channel_info(&c, "x").await.0, 404, "nothing was published");
    assert_eq!(channel_info(&c, "ro:x").await.0, 404);
    // The connection is still there.
    c.publish("home", "still here").await;
    assert_eq!(next_json(&mut a).await["data"], "still here");
    assert_eq!(client_messages(&c, "publish", "invalid").await, 5.0);
    assert_eq!(client_messages(&c, "refuse", "denied").await, 1.0);
    c.shutdown().await;
}

async fn next_json_after(ws: &mut Ws, cmd: Value) -> Value {
    send_json(ws, cmd).await;
    next_json(ws).await
}

#[tokio::test]
async fn refuse_is_the_default_plain_frames_are_ignored_and_publish_is_an_error() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let (mut plain, _) = ws_connect(&c.ws_url("/live/quiet"), &[]).await;
    let (mut js, _) = ws_connect(&c.ws_url("/live/quiet"), &[JSON]).await;
    wait_subscribers(&c, "quiet", 2).await;
    send(&mut plain, Message::text("ignored")).await;
    let e = next_json_after(&mut js, json!({"publish": "quiet", "data": "no"})).await;
    assert_eq!(e["channel"], "quiet");
    assert!(
        e["error"].as_str().unwrap().contains("client_messages"),
        "{e}"
    );
    let id = c.publish("quiet", "from the app").await;
    assert_eq!(next_text(&mut plain).await, "from the app");
    assert_eq!(next_json(&mut js).await["id"], id.as_str());
    assert_eq!(channel_info(&c, "quiet").await.1["published"], 1);
    assert_eq!(client_messages(&c, "refuse", "ignored").await, 1.0);
    assert_eq!(client_messages(&c, "refuse", "denied").await, 1.0);
    c.shutdown().await;
}

#[tokio::test]
async fn a_publishing_location_beside_a_reading_one_each_takes_its_own_clients_messages() {
    let up = Upstream::start().await;
    // Same channels (no prefix): /live only reads, /room publishes what its clients send.
    let c = Crier::start(
        &up.url(),
        &format!("[[push]]\npath = \"/live/{{channel}}\"\n{ROOM}"),
    )
    .await;
    let mut sse = SseClient::connect(&c.url("/live/both"), None).await;
    let (mut live, _) = ws_connect(&c.ws_url("/live/both"), &[JSON]).await;
    let (mut room, _) = ws_connect(&c.ws_url("/room/both"), &[]).await;
    wait_subscribers(&c, "both", 3).await;
    let e = next_json_after(&mut live, json!({"publish": "both", "data": "no"})).await;
    assert!(
        e["error"].as_str().unwrap().contains("client_messages"),
        "{e}"
    );
    send(&mut room, Message::text("yes")).await;
    assert_eq!(sse.next_event().await.expect("sse").data, "yes");
    assert_eq!(next_json(&mut live).await["data"], "yes");
    assert_eq!(next_text(&mut room).await, "yes");
    assert_eq!(channel_info(&c, "both").await.1["published"], 1);
    c.shutdown().await;

    // A channel of a location with a longer prefix follows that location's rules, whichever
    // path reached it: /live/chat:r publishes like /chat/r does.
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\n[[push]]\npath = \"/chat/{channel}\"\n\
         channel_prefix = \"chat:\"\nclient_messages = \"publish\"\n",
    )
    .await;
    let mut sse = SseClient::connect(&c.url("/chat/r"), None).await;
    let (mut via_live, _) = ws_connect(&c.ws_url("/live/chat:r"), &[]).await;
    wait_subscribers(&c, "chat:r", 2).await;
    send(&mut via_live, Message::text("through /live")).await;
    assert_eq!(sse.next_event().await.expect("sse").data, "through /live");
    c.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Who may publish.

const SECRET: &str = "test-secret-for-hs256-0123456789abcdef";

fn token(claims: Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut claims = claims;
    claims["exp"] = exp.into();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_jwt_must_carry_crier_publish_for_the_channel() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, SECRET).unwrap();
    let c = Crier::start(
        &up.url(),
        &format!("{ROOM}[push.jwt]\nsecret_file = \"{}\"\n", key.display()),
    )
    .await;
    let reader = token(json!({"crier.subscribe": ["*"]}));
    let writer = token(json!({"crier.subscribe": ["*"], "crier": {"publish": ["talk*"]}}));

    // Read-only token, crier.json: an error frame, nothing published, the connection stays.
    let (mut js, _) = ws_connect(
        &c.ws_url(&format!("/room/talk1?access_token={reader}")),
        &[JSON],
    )
    .await;
    let e = next_json_after(&mut js, json!({"publish": "talk1", "data": "x"})).await;
    assert!(e["error"].as_str().unwrap().contains("403"), "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("crier.publish"),
        "{e}"
    );
    // Read-only token, plain: closed with 1008.
    let (mut plain, _) = ws_connect(
        &c.ws_url(&format!("/room/talk1?access_token={reader}")),
        &[],
    )
    .await;
    send(&mut plain, Message::text("x")).await;
    assert_eq!(close_frame(&mut plain).await.0, CloseCode::Policy);
    assert_eq!(channel_info(&c, "talk1").await.1["published"], 0);

    // A token with crier.publish: for the channels it names.
    let (mut w, _) = ws_connect(
        &c.ws_url(&format!("/room/talk1?access_token={writer}")),
        &[JSON],
    )
    .await;
    let ack = next_json_after(&mut w, json!({"publish": "talk1", "data": "hello"})).await;
    assert_eq!(ack["published"], "talk1", "{ack}");
    assert_eq!(next_json(&mut js).await["data"], "hello");
    assert_eq!(next_json(&mut w).await["data"], "hello", "its own, echoed");
    let e = next_json_after(&mut w, json!({"publish": "news", "data": "x"})).await;
    assert!(
        e["error"].as_str().unwrap().contains("crier.publish"),
        "{e}"
    );
    assert_eq!(client_messages(&c, "publish", "denied").await, 3.0);
    c.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The app (forward auth and forwarded messages).

/// One request the app received.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    method: String,
    headers: http::HeaderMap,
    body: Bytes,
}

/// A small app: `/auth` allows subscribing to anyone and publishing only with the cookie
/// `writer=1` (403 "read only" otherwise); `/ws-in/...` takes forwarded messages: a path
/// with `fail` answers 500 "app broke", one with `quiet` 204, others 200 `got:<body>`
/// (text/plain); a body that is an even number waits 3 ms first (a reordering would show).
struct App {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl App {
    async fn start() -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(app(req, &log).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        App { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self, prefix: &str) -> Vec<Seen> {
        let all = self.seen.lock().unwrap();
        all.iter()
            .filter(|s| s.path.starts_with(prefix))
            .cloned()
            .collect()
    }
}

async fn app(req: Request<Incoming>, log: &Mutex<Vec<Seen>>) -> Response<Full<Bytes>> {
    let path = req.uri().to_string();
    let method = req.method().to_string();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        method,
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let answer = |code: u16, b: Bytes| {
        Response::builder()
            .status(code)
            .header("content-type", "text/plain")
            .body(Full::new(b))
            .unwrap()
    };
    if path.starts_with("/auth") {
        let action = parts
            .headers
            .get("x-crier-action")
            .and_then(|v| v.to_str().ok());
        let writer = parts
            .headers
            .get("cookie")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.split(';').any(|p| p.trim() == "writer=1"));
        return match action {
            Some("subscribe") => answer(200, Bytes::new()),
            Some("publish") if writer => answer(200, Bytes::new()),
            _ => answer(403, Bytes::from_static(b"read only\n")),
        };
    }
    if path.contains("fail") {
        return answer(500, Bytes::from_static(b"app broke\nmore"));
    }
    if path.contains("quiet") {
        return answer(204, Bytes::new());
    }
    if std::str::from_utf8(&body)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .is_some_and(|n| n % 2 == 0)
    {
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut reply = b"got:".to_vec();
    reply.extend_from_slice(&body);
    answer(200, Bytes::from(reply))
}

#[tokio::test]
async fn forward_auth_is_asked_with_x_crier_action_publish() {
    let app = App::start().await;
    let c = Crier::start(
        &app.url(),
        &format!("{ROOM}auth_request = \"/auth\"\nauth_cache_ttl = \"60s\"\n"),
    )
    .await;
    let mut sse = SseClient::connect_with(&client(), &c.url("/room/fa"), None).await;
    let (mut reader, _) = ws_connect(&c.ws_url("/room/fa"), &[("cookie", "session=1")]).await;
    let asked = app.seen("/auth");
    assert_eq!(asked.len(), 2);
    assert!(
        asked
            .iter()
            .all(|s| s.headers["x-crier-action"] == "subscribe"),
        "{asked:?}"
    );

    // Subscribing was allowed (and cached) for these credentials; publishing is asked anew.
    send(&mut reader, Message::text("x")).await;
    let (code, reason) = close_frame(&mut reader).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("403"), "{reason}");
    let asked = app.seen("/auth");
    assert_eq!(asked.len(), 3);
    assert_eq!(asked[2].headers["x-crier-action"], "publish");
    assert_eq!(asked[2].headers["x-crier-channel"], "fa");

    let (mut writer, _) = ws_connect(&c.ws_url("/room/fa"), &[("cookie", "writer=1")]).await;
    send(&mut writer, Message::text("one")).await;
    send(&mut writer, Message::text("two")).await;
    assert_eq!(sse.next_event().await.expect("sse").data, "one");
    assert_eq!(sse.next_event().await.expect("sse").data, "two");
    // One publish check for the connection, not one per message.
    let asked = app.seen("/auth");
    assert_eq!(asked.len(), 5, "{asked:?}");
    assert_eq!(asked[4].headers["x-crier-action"], "publish");
    c.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Limits.

#[tokio::test]
async fn oversized_frames_close_with_1009_and_a_flood_with_1008() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        &format!("{ROOM}max_client_message = \"1KiB\"\nclient_rate = 1\n"),
    )
    .await;
    let (mut big, _) = ws_connect(&c.ws_url("/room/lim"), &[]).await;
    send(&mut big, Message::text("a".repeat(2000))).await;
    assert_eq!(close_frame(&mut big).await.0, CloseCode::Size);
    assert_eq!(client_messages(&c, "publish", "too_big").await, 1.0);

    // 1 a second with a burst of 2: a flood is closed, on a plain WebSocket at once…
    let (mut flood, _) = ws_connect(&c.ws_url("/room/lim"), &[]).await;
    for i in 0..50 {
        if flood.send(Message::text(i.to_string())).await.is_err() {
            break;
        }
    }
    let (code, reason) = close_frame(&mut flood).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("client_rate"), "{reason}");
    // …on crier.json after an error frame that says why.
    let (mut js, _) = ws_connect(&c.ws_url("/room/lim2"), &[JSON]).await;
    for i in 0..50 {
        let cmd = json!({"publish": "lim2", "data": i.to_string()});
        if js.send(Message::text(cmd.to_string())).await.is_err() {
            break;
        }
    }
    let mut acks = 0;
    loop {
        match ws_next(&mut js).await {
            Some(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v.get("published").is_some() {
                    acks += 1;
                } else if v.get("error").is_some() {
                    assert!(v["error"].as_str().unwrap().contains("client_rate"), "{v}");
                    break;
                }
            }
            other => panic!("expected an error frame first, got {other:?}"),
        }
    }
    assert!(acks <= 3, "{acks} acks");
    assert_eq!(close_frame(&mut js).await.0, CloseCode::Policy);
    assert_eq!(client_messages(&c, "publish", "rate_limited").await, 2.0);
    c.shutdown().await;
}

#[tokio::test]
async fn a_client_that_only_sends_and_never_reads_is_let_go() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        &format!("{ROOM}client_rate = 100000\nkeepalive = \"1s\"\n"),
    )
    .await;
    for json in [false, true] {
        let headers: &[(&str, &str)] = if json { &[JSON] } else { &[] };
        let (ws, _) = ws_connect(&c.ws_url("/room/flood"), headers).await;
        // Every frame comes back (echo; on crier.json an ack too), and this client never
        // reads: crier's writes to it stall, and it is dropped like any reader that stopped.
        let (mut sink, stream) = futures_util::StreamExt::split(ws);
        let flood = tokio::spawn(async move {
            let data = "x".repeat(15 * 1024);
            let frame = if json {
                json!({"publish": "flood", "data": data}).to_string()
            } else {
                data
            };
            for _ in 0..20_000 {
                if sink.send(Message::text(frame.clone())).await.is_err() {
                    return;
                }
            }
        });
        let dropped = eventually(Duration::from_secs(60), async || {
            metric(&c, "crier_connections{transport=\"websocket\"}").await == Some(0.0)
        })
        .await;
        assert!(
            dropped,
            "the connection (crier.json: {json}) was never let go"
        );
        flood.abort();
        drop(stream);
    }
    c.shutdown().await;
}

#[tokio::test]
async fn a_crier_json_client_that_never_reads_its_acks_is_let_go() {
    let up = Upstream::start().await;
    // echo = false: only the acks go back; they alone must not hold the connection.
    let c = Crier::start(
        &up.url(),
        &format!("{ROOM}echo = false\nclient_rate = 1000000\nkeepalive = \"1s\"\n"),
    )
    .await;
    let (ws, _) = ws_connect(&c.ws_url("/room/acks"), &[JSON]).await;
    let (mut sink, stream) = futures_util::StreamExt::split(ws);
    let flood = tokio::spawn(async move {
        let frame = json!({"publish": "acks", "data": "x"}).to_string();
        for _ in 0..2_000_000 {
            if sink.send(Message::text(frame.clone())).await.is_err() {
                return;
            }
        }
    });
    let dropped = eventually(Duration::from_secs(120), async || {
        metric(&c, "crier_connections{transport=\"websocket\"}").await == Some(0.0)
    })
    .await;
    assert!(dropped, "the connection was never let go");
    flood.abort();
    drop(stream);
    c.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Forward.

const DOC: &str = "[[push]]\npath = \"/doc/{channel}\"\nchannel_prefix = \"doc:\"\n\
                   client_messages = \"forward\"\nforward_to = \"/ws-in/{channel}?from=crier\"\n\
                   client_rate = 1000\n";

#[tokio::test]
async fn forward_posts_each_frame_in_order_with_the_clients_headers() {
    let app = App::start().await;
    let c = Crier::start(&app.url(), DOC).await;
    let (mut ws, _) = ws_connect(
        &c.ws_url("/doc/d1"),
        &[
            ("cookie", "session=abc"),
            ("authorization", "Bearer t0k"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-evil", "smuggled"),
        ],
    )
    .await;
    send(&mut ws, Message::text("hello")).await;
    assert_eq!(
        next_text(&mut ws).await,
        "got:hello",
        "the app's answer comes back"
    );
    let seen = app.seen("/ws-in/");
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("POST", "/ws-in/doc:d1?from=crier")
    );
    assert_eq!(&s.body[..], b"hello");
    let h = |n: &str| s.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(h("cookie").as_deref(), Some("session=abc"));
    assert_eq!(h("authorization").as_deref(), Some("Bearer t0k"));
    assert_eq!(
        h("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(h("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(h("x-forwarded-host"), Some(c.public.to_string()));
    assert_eq!(h("x-crier-channel").as_deref(), Some("doc:d1"));
    assert_eq!(h("content-type").as_deref(), Some("text/plain"));
    assert!(h("x-evil").is_none(), "no other client header");
    let conn_id = h("x-crier-connection").expect("a connection id");

    // 100 frames at once: the app gets them in order, the client its answers in order.
    for i in 0..100 {
        send(&mut ws, Message::text(i.to_string())).await;
    }
    for i in 0..100 {
        assert_eq!(next_text(&mut ws).await, format!("got:{i}"));
    }
    let seen = app.seen("/ws-in/");
    let bodies: Vec<String> = seen[1..]
        .iter()
        .map(|s| String::from_utf8_lossy(&s.body).into())
        .collect();
    assert_eq!(bodies, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(seen
        .iter()
        .all(|s| s.headers["x-crier-connection"] == conn_id.as_str()));
    // Binary frames keep their type.
    send(&mut ws, Message::binary(vec![1, 2])).await;
    assert!(
        matches!(ws_next(&mut ws).await, Some(Message::Text(t)) if t.as_bytes() == b"got:\x01\x02")
    );
    assert_eq!(
        app.seen("/ws-in/").last().unwrap().headers["content-type"],
        "application/octet-stream"
    );

    // crier.json: {"forwarded"} with the answer; the event name goes along as Crier-Event.
    let (mut js, _) = ws_connect(&c.ws_url("/doc/d2"), &[JSON]).await;
    let r = next_json_after(
        &mut js,
        json!({"publish": "d2", "data": "x", "event": "typing"}),
    )
    .await;
    assert_eq!(r, json!({"forwarded": "d2", "data": "got:x"}));
    let last = app.seen("/ws-in/").last().cloned().unwrap();
    assert_eq!(last.headers["crier-event"], "typing");
    assert_ne!(
        last.headers["x-crier-connection"],
        conn_id.as_str(),
        "another connection"
    );
    let r = next_json_after(&mut js, json!({"publish": "quiet", "data": "x"})).await;
    assert_eq!(r, json!({"forwarded": "quiet"}), "an empty answer");
    // Nothing was published: the app publishes through the publish API if it wants to.
    assert_eq!(channel_info(&c, "doc:d1").await.1["published"], 0);
    assert_eq!(client_messages(&c, "forward", "forwarded").await, 104.0);
    c.shutdown().await;
}

#[tokio::test]
async fn forward_failures_are_an_error_frame_or_1011() {
    let app = App::start().await;
    let c = Crier::start(&app.url(), DOC).await;
    let (mut js, _) = ws_connect(&c.ws_url("/doc/ok"), &[JSON]).await;
    let e = next_json_after(&mut js, json!({"publish": "fail", "data": "x"})).await;
    assert_eq!(e["channel"], "fail");
    assert!(
        e["error"].as_str().unwrap().contains("500: app broke"),
        "{e}"
    );
    // The connection goes on.
    let r = next_json_after(&mut js, json!({"publish": "ok", "data": "y"})).await;
    assert_eq!(r["data"], "got:y");
    let (mut plain, _) = ws_connect(&c.ws_url("/doc/fail"), &[]).await;
    send(&mut plain, Message::text("x")).await;
    let (code, reason) = close_frame(&mut plain).await;
    assert_eq!(code, CloseCode::Error);
    assert!(reason.contains("500"), "{reason}");
    assert_eq!(client_messages(&c, "forward", "upstream_error").await, 2.0);
    c.shutdown().await;

    // The app down: the same.
    let dead = dead_addr().await;
    let c = Crier::start(&format!("http://{dead}"), DOC).await;
    let (mut js, _) = ws_connect(&c.ws_url("/doc/a"), &[JSON]).await;
    let e = next_json_after(&mut js, json!({"publish": "a", "data": "x"})).await;
    assert!(e["error"].as_str().unwrap().contains("unreachable"), "{e}");
    let (mut plain, _) = ws_connect(&c.ws_url("/doc/a"), &[]).await;
    send(&mut plain, Message::text("x")).await;
    assert_eq!(close_frame(&mut plain).await.0, CloseCode::Error);
    c.shutdown().await;
}
