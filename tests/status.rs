//! The admin listener's live status page: `/` is one self-contained page, and `/stats/stream`
//! pushes snapshots that follow the server's real state (listeners, upstream, subscribers,
//! messages, channels). The browser suite (tests/e2e) checks the page itself in Chromium.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The next snapshot on a status stream.
async fn snapshot(s: &mut SseClient) -> Value {
    let ev = s
        .next_within(Duration::from_secs(5))
        .await
        .expect("a snapshot within 5 s (they come every second)")
        .expect("the stream is open");
    serde_json::from_str(&ev.data).expect("a snapshot is JSON")
}

/// Reads snapshots until one satisfies `want` (at most 10 s).
async fn snapshot_where(s: &mut SseClient, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = Value::Null;
    while tokio::time::Instant::now() < end {
        last = snapshot(s).await;
        if want(&last) {
            return last;
        }
    }
    panic!("no snapshot with {what} within 10 s; the last:\n{last:#}");
}

fn channel<'a>(snap: &'a Value, name: &str) -> Option<&'a Value> {
    snap["channels"]["busiest"]
        .as_array()?
        .iter()
        .find(|c| c["channel"] == name)
}

#[tokio::test]
async fn the_page_is_self_contained_and_admin_only() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let r = client().get(c.admin_url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let page = r.text().await.unwrap();
    assert!(
        page.contains("new EventSource('stats/stream')"),
        "live over SSE"
    );
    for external in [
        "http://",
        "https://",
        "src=",
        "href=",
        "@import",
        "url(",
        "fetch(",
        "setInterval",
    ] {
        assert!(
            !page.contains(external),
            "the page has {external:?}: no external assets, no polling"
        );
    }
    // The public listener proxies `/` to the app, as before.
    let body = client()
        .get(c.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "hello from upstream");
    let r = client().get(c.url("/stats/stream")).send().await.unwrap();
    assert_ne!(
        r.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..]),
        "no stats stream on the public listener"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn the_stream_follows_subscribers_and_messages() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut stats = SseClient::connect(&c.admin_url("/stats/stream"), None).await;
    assert_eq!(
        stats.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    let first = snapshot(&mut stats).await;
    assert_eq!(stats.retry, Some(1000), "EventSource reconnects after 1 s");
    assert_eq!(first["ready"], true);
    let l = &first["listeners"];
    assert_eq!(
        l["public"],
        serde_json::json!([format!("http://{}", c.public)])
    );
    assert_eq!(
        l["publish"],
        serde_json::json!([format!("http://{}", c.publish)])
    );
    assert_eq!(l["admin"], format!("http://{}", c.admin));
    assert_eq!(l["publish_unix"], c.publish_unix.display().to_string());
    assert_eq!(l["push"], serde_json::json!(["/live/{channel}"]));
    assert_eq!(first["upstream"]["url"], up.url());
    assert_eq!(first["upstream"]["health"], "ok", "{first:#}");
    assert_eq!(first["upstream"]["check"]["reachable"], true);
    for t in ["websocket", "sse", "longpoll"] {
        assert_eq!(first["connections"][t], 0);
    }
    assert_eq!(first["channels"]["total"], 0);

    assert_eq!(client().get(c.url("/")).send().await.unwrap().status(), 200);
    let s1 = SseClient::connect(&c.url("/live/room"), None).await;
    let s2 = SseClient::connect(&c.url("/live/room"), None).await;
    let (ws, _) = ws_connect(&c.ws_url("/live/room"), &[]).await;
    let snap = snapshot_where(&mut stats, "2 SSE and 1 WebSocket subscriber", |s| {
        s["connections"]["sse"] == 2 && s["connections"]["websocket"] == 1
    })
    .await;
    let room = channel(&snap, "room").expect("the channel is listed");
    assert_eq!(room["subscribers"], 3);
    assert_eq!(room["subscribers_by_transport"]["sse"], 2);

    for i in 0..10 {
        c.publish("room", format!("m{i}")).await;
    }
    let snap = snapshot_where(&mut stats, "10 messages published", |s| {
        s["messages"]["published"] == 10
    })
    .await;
    assert!(
        snap["messages"]["published_per_s"].as_f64().unwrap() > 0.0,
        "{snap:#}"
    );
    let room = channel(&snap, "room").unwrap();
    assert_eq!(room["published"], 10);
    assert!(room["rate"].as_f64().unwrap() > 0.0, "{room:#}");
    let snap = snapshot_where(&mut stats, "30 deliveries", |s| {
        s["messages"]["delivered"] == 30
    })
    .await;
    assert_eq!(snap["upstream"]["responses"]["2xx"], 1);

    drop((s1, s2, ws));
    snapshot_where(&mut stats, "no subscribers", |s| {
        s["connections"]["sse"] == 0 && s["connections"]["websocket"] == 0
    })
    .await;

    // The stream ends with the server (the admin listener closes after the drain).
    c.handle.shutdown();
    let ended = eventually(Duration::from_secs(10), async || {
        matches!(stats.next_within(Duration::from_secs(2)).await, Ok(None))
    })
    .await;
    assert!(ended, "the status stream ends when the server stops");
}

#[tokio::test]
async fn an_unreachable_upstream_shows_as_down() {
    let dead = dead_addr().await;
    let c = Crier::start(&format!("http://{dead}"), "").await;
    let mut stats = SseClient::connect(&c.admin_url("/stats/stream"), None).await;
    let first = snapshot(&mut stats).await;
    assert_eq!(first["upstream"]["health"], "down", "{first:#}");
    assert_eq!(first["upstream"]["check"]["reachable"], false);
    assert!(first["upstream"]["check"]["error"].is_string());
    assert_eq!(
        client().get(c.url("/x")).send().await.unwrap().status(),
        502
    );
    snapshot_where(&mut stats, "the connect error counted", |s| {
        s["upstream"]["errors"]["connect"] == 1 && s["upstream"]["responses"]["5xx"] == 1
    })
    .await;
    c.shutdown().await;
}
