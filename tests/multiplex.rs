//! One connection, many channels (`/live/a,b,c`): crier.json envelopes that name their
//! channel, one order (the hub's), one compound cursor that resumes every channel exactly, a
//! gap told for the channel that had it, per-channel auth, bad lists refused, and a crier.json
//! WebSocket's subscribe/unsubscribe.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn take(sse: &mut SseClient, n: usize) -> Vec<SseEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = tokio::time::timeout(Duration::from_secs(15), sse.next_event())
            .await
            .expect("an event within 15s")
            .expect("stream open");
        out.push(e);
    }
    out
}

fn envelope(e: &SseEvent) -> Value {
    serde_json::from_str(&e.data).expect("a crier.json envelope")
}

async fn ws_text(ws: &mut Ws) -> Value {
    match tokio::time::timeout(Duration::from_secs(15), ws_next(ws)).await {
        Ok(Some(m @ Message::Text(_))) => ws_json(&m),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn sse_carries_three_channels_in_order_and_one_cursor_resumes_them_all() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_messages = 1000\n").await;
    let url = c.url("/live/a,b,c");
    let mut sse = SseClient::connect(&url, None).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("ok"));
    wait_subscribers(&c, "c", 1).await;
    // One connection, counted once; each channel counts it.
    assert_eq!(
        metric(&c, "crier_connections{transport=\"sse\"}").await,
        Some(1.0)
    );
    for ch in ["a", "b", "c"] {
        assert_eq!(channel_info(&c, ch).await.1["subscribers"], 1);
    }

    const N: usize = 1000;
    let names = ["a", "b", "c"];
    let mut published = Vec::new();
    for i in 0..N {
        let ch = names[(i * 7 + i / 3) % 3];
        let id = c.publish(ch, format!("{ch}{i}")).await;
        published.push((ch.to_string(), id, format!("{ch}{i}")));
    }
    // The first half, then the connection is cut.
    let first = take(&mut sse, N / 2).await;
    drop(sse);
    let cursor = first
        .last()
        .unwrap()
        .id
        .clone()
        .expect("every event has the cursor");
    assert_eq!(cursor.split(',').count(), 3, "{cursor}");
    let mut sse = SseClient::connect(&url, Some(&cursor)).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("ok"));
    let rest = take(&mut sse, N - N / 2).await;
    let got: Vec<(String, String, String)> = first
        .iter()
        .chain(&rest)
        .map(|e| {
            let v = envelope(e);
            (
                v["channel"].as_str().unwrap().to_string(),
                v["id"].as_str().unwrap().to_string(),
                v["data"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, published, "every message once, in publish order");
    // Each cursor holds every channel's last delivered id.
    let mut last: HashMap<&str, &str> = HashMap::new();
    for (e, (ch, id, _)) in first.iter().zip(&published) {
        last.insert(ch, id);
        let parts: Vec<&str> = e.id.as_deref().unwrap().split(',').collect();
        for (i, name) in names.iter().enumerate() {
            if let Some(id) = last.get(name) {
                assert_eq!(parts[i], *id);
            }
        }
    }
    c.shutdown().await;
}

#[tokio::test]
async fn a_gap_in_one_channel_is_told_for_that_channel() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_messages = 3\n").await;
    let a0 = c.publish("a", "a0").await;
    let b0 = c.publish("b", "b0").await;
    let cursor = format!("{a0},{b0}");
    for i in 1..=5 {
        c.publish("a", format!("a{i}")).await;
    }
    c.publish("b", "b1").await;
    // SSE: the header, and a crier.gap event for `a` only.
    let mut sse = SseClient::connect(&c.url("/live/a,b"), Some(&cursor)).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("gap"));
    let evs = take(&mut sse, 5).await;
    let gaps: Vec<Value> = evs
        .iter()
        .filter(|e| e.event.as_deref() == Some("crier.gap"))
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(gaps.len(), 1, "{evs:?}");
    assert_eq!(gaps[0]["channel"], "a");
    let data: Vec<String> = evs
        .iter()
        .filter(|e| e.event.is_none())
        .map(|e| envelope(e)["data"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(data, ["a3", "a4", "a5", "b1"]);
    // WebSocket: the envelope of a's first message after the gap says so; b's does not.
    let (mut ws, resp) =
        ws_connect(&c.ws_url(&format!("/live/a,b?last_event_id={cursor}")), &[]).await;
    assert_eq!(
        resp.headers()
            .get("crier-resume")
            .unwrap()
            .to_str()
            .unwrap(),
        "gap"
    );
    let opened = [ws_text(&mut ws).await, ws_text(&mut ws).await];
    assert_eq!(opened[0]["subscribed"], "a");
    assert_eq!(opened[0]["id"], a0.as_str());
    assert_eq!(opened[1]["subscribed"], "b");
    let mut frames = Vec::new();
    for _ in 0..4 {
        frames.push(ws_text(&mut ws).await);
    }
    assert_eq!(frames[0]["channel"], "a");
    assert_eq!(frames[0]["gap"], true);
    assert!(frames[1].get("gap").is_none());
    let b = frames.iter().find(|f| f["channel"] == "b").unwrap();
    assert!(b.get("gap").is_none(), "b lost nothing");
    c.shutdown().await;
}

#[tokio::test]
async fn bad_lists_are_400_with_the_reason() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nmax_channels_per_subscription = 3\n",
    )
    .await;
    let cl = client();
    for (path, why) in [
        ("/live/a,,b", "empty channel name"),
        ("/live/a,", "empty channel name"),
        ("/live/a,b%20c", "may hold only"),
        ("/live/a,b,a", "named twice"),
        ("/live/a,b,c,d", "at most 3"),
    ] {
        let r = cl.get(c.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains(why), "{path}: {text}");
    }
    // A cursor that does not fit the list.
    let r = cl
        .get(c.url("/live/a,b?last_event_id=1-0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = cl
        .get(c.url("/live/a,b?last_event_id=1-0,2-0,3-0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    c.shutdown().await;
}

const SECRET: &str = "multiplex-test-secret-hs256-0123456789abcdef";

fn token(channels: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "exp": exp, "crier.subscribe": channels }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_must_allow_every_channel_and_forward_auth_is_asked_per_channel() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("k");
    std::fs::write(&secret, SECRET).unwrap();
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        &format!(
            "[[push]]\npath = \"/live/{{channel}}\"\nlongpoll_timeout = \"100ms\"\n\
             [push.jwt]\nsecret_file = \"{}\"\n\
             [[push]]\npath = \"/team/{{channel}}\"\nchannel_prefix = \"team:\"\nlongpoll_timeout = \"100ms\"\n\
             auth_request = \"/auth/check\"\n",
            secret.display()
        ),
    )
    .await;
    let cl = client();
    let r = cl
        .get(c.url("/live/a,b"))
        .bearer_auth(token(&["a"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "b is not allowed");
    let r = cl
        .get(c.url("/live/a,b"))
        .bearer_auth(token(&["a", "b"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    let before = up.auth.calls();
    let r = cl
        .get(c.url("/team/x,y,z"))
        .header("cookie", "session=good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(up.auth.calls() - before, 3, "asked once per channel");
    let asked: Vec<String> = up
        .auth
        .all()
        .iter()
        .skip(before)
        .map(|s| s.headers["x-crier-channel"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(asked, ["team:x", "team:y", "team:z"]);
    let r = cl.get(c.url("/team/x,boom-1")).send().await.unwrap();
    assert!(r.status() == 401 || r.status() == 503, "{}", r.status());
    c.shutdown().await;
}

#[tokio::test]
async fn long_poll_loops_over_several_channels_with_the_cursor_as_etag() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nlongpoll_timeout = \"300ms\"\n",
    )
    .await;
    let cl = client();
    let url = c.url("/live/p,q");
    let first = longpoll(&cl, &url, None).await;
    assert_eq!(first.status, 304);
    let mut etag = first.etag.unwrap();
    assert_eq!(etag.matches(',').count(), 1, "{etag}");
    let mut sent = Vec::new();
    for i in 0..30 {
        let ch = if i % 3 == 0 { "q" } else { "p" };
        c.publish(ch, format!("{ch}{i}")).await;
        sent.push((ch.to_string(), format!("{ch}{i}")));
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let p = longpoll(&cl, &url, Some(&etag)).await;
        assert_eq!(p.status, 200);
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        got.push((
            v["channel"].as_str().unwrap().to_string(),
            v["data"].as_str().unwrap().to_string(),
        ));
        etag = p.etag.unwrap();
    }
    assert_eq!(got, sent);
    assert_eq!(longpoll(&cl, &url, Some(&etag)).await.status, 304);
    c.shutdown().await;
}

#[tokio::test]
async fn a_crier_json_websocket_subscribes_and_unsubscribes() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("k");
    std::fs::write(&secret, SECRET).unwrap();
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        &format!(
            "[[push]]\npath = \"/live/{{channel}}\"\nmax_channels_per_subscription = 3\n\
             [[push]]\npath = \"/vip/{{channel}}\"\nchannel_prefix = \"vip:\"\n\
             [push.jwt]\nsecret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .await;
    let t = token(&["vip:room"]);
    let (mut ws, _) = ws_connect(
        &c.ws_url(&format!("/live/one?access_token={t}")),
        &[("sec-websocket-protocol", "crier.json")],
    )
    .await;
    let send = |v: Value| Message::Text(v.to_string().into());
    use futures_util::SinkExt;
    ws.send(send(json!({"subscribe": "two"}))).await.unwrap();
    let a = ws_text(&mut ws).await;
    assert_eq!(a["subscribed"], "two");
    assert!(a["id"].as_str().unwrap().contains('-'));
    // Checked like a new connection: `vip:secret` is not in the token, `vip:room` is.
    ws.send(send(json!({"subscribe": "vip:secret"})))
        .await
        .unwrap();
    let e = ws_text(&mut ws).await;
    assert_eq!(e["channel"], "vip:secret");
    assert!(e["error"].as_str().unwrap().starts_with("403"), "{e}");
    ws.send(send(json!({"subscribe": "vip:room"})))
        .await
        .unwrap();
    assert_eq!(ws_text(&mut ws).await["subscribed"], "vip:room");
    ws.send(send(json!({"subscribe": "four"}))).await.unwrap();
    assert!(ws_text(&mut ws).await["error"]
        .as_str()
        .unwrap()
        .contains("at most 3"));
    ws.send(send(json!({"subscribe": "two"}))).await.unwrap();
    assert_eq!(ws_text(&mut ws).await["error"], "already subscribed");
    ws.send(send(json!({"hello": 1}))).await.unwrap();
    assert!(ws_text(&mut ws).await.get("error").is_some());

    c.publish("one", "1").await;
    c.publish("two", "2").await;
    c.publish("vip:room", "3").await;
    let got: Vec<Value> = vec![
        ws_text(&mut ws).await,
        ws_text(&mut ws).await,
        ws_text(&mut ws).await,
    ];
    let pairs: Vec<(&str, &str)> = got
        .iter()
        .map(|v| (v["channel"].as_str().unwrap(), v["data"].as_str().unwrap()))
        .collect();
    assert_eq!(pairs, [("one", "1"), ("two", "2"), ("vip:room", "3")]);

    ws.send(send(json!({"unsubscribe": "one"}))).await.unwrap();
    assert_eq!(ws_text(&mut ws).await["unsubscribed"], "one");
    ws.send(send(json!({"unsubscribe": "one"}))).await.unwrap();
    assert_eq!(ws_text(&mut ws).await["error"], "not subscribed");
    c.publish("one", "gone").await;
    c.publish("two", "still").await;
    let v = ws_text(&mut ws).await;
    assert_eq!(
        (v["channel"].as_str(), v["data"].as_str()),
        (Some("two"), Some("still"))
    );
    // A deleted channel ends alone.
    assert_eq!(
        client()
            .delete(c.pub_url("two"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let v = ws_text(&mut ws).await;
    assert_eq!(v["unsubscribed"], "two");
    c.publish("vip:room", "last").await;
    assert_eq!(ws_text(&mut ws).await["data"], "last");
    c.shutdown().await;
}

/// A location that refuses client messages reads with a small buffer (idle memory): a command
/// several times its size still arrives whole.
#[tokio::test]
async fn a_command_larger_than_the_read_buffer_arrives_whole() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let (mut ws, _) = ws_connect(
        &c.ws_url("/live/one"),
        &[("sec-websocket-protocol", "crier.json")],
    )
    .await;
    let long = "l".repeat(120);
    use futures_util::SinkExt;
    let cmd = json!({"subscribe": long, "last_event_id": "earliest"}).to_string();
    assert!(cmd.len() > 128);
    ws.send(Message::Text(cmd.into())).await.unwrap();
    let a = ws_text(&mut ws).await;
    assert_eq!(a["subscribed"], long.as_str(), "{a}");
    c.publish(&long, "to the long one").await;
    let m = ws_text(&mut ws).await;
    assert_eq!(m["channel"], long.as_str(), "{m}");
    assert_eq!(m["data"], "to the long one");
    c.shutdown().await;
}
