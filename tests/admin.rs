//! The admin listener: metric values after known traffic, exact gauges, health, /channels,
//! and that none of it is reachable from the public listener.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;

#[tokio::test]
async fn metrics_count_known_traffic() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let http = client();
    for _ in 0..3 {
        assert_eq!(http.get(c.url("/")).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        http.get(c.url("/status/404"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let mut sse = SseClient::connect(&c.url("/live/m"), None).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(c.ws_url("/live/m"))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || {
            metric(&c, "crier_connections{transport=\"websocket\"}").await == Some(1.0)
        })
        .await
    );
    for i in 0..4 {
        c.publish("m", format!("message {i}")).await;
    }
    for _ in 0..4 {
        sse.next_event().await.unwrap();
    }
    let mut frames = 0;
    while frames < 4 {
        if ws.next().await.unwrap().unwrap().is_text() {
            frames += 1;
        }
    }
    assert_eq!(
        metric(&c, "crier_messages_published_total").await,
        Some(4.0)
    );
    assert!(
        eventually(Duration::from_secs(2), async || {
            metric(&c, "crier_messages_delivered_total{transport=\"sse\"}").await == Some(4.0)
                && metric(
                    &c,
                    "crier_messages_delivered_total{transport=\"websocket\"}",
                )
                .await
                    == Some(4.0)
        })
        .await
    );
    // "message N" is 9 bytes.
    assert_eq!(
        metric(&c, "crier_delivered_bytes_total{transport=\"sse\"}").await,
        Some(36.0)
    );
    assert_eq!(
        metric(&c, "crier_proxy_requests_total{code_class=\"2xx\"}").await,
        Some(3.0)
    );
    assert_eq!(
        metric(&c, "crier_proxy_requests_total{code_class=\"4xx\"}").await,
        Some(1.0)
    );
    assert_eq!(metric(&c, "crier_channels").await, Some(1.0));
    assert_eq!(
        metric(&c, "crier_publish_duration_seconds_count").await,
        Some(4.0)
    );
    assert!(
        metric(&c, "crier_delivery_lag_seconds_count")
            .await
            .unwrap()
            >= 2.0
    );
    assert_eq!(
        metric(&c, "crier_proxy_request_duration_seconds_count").await,
        Some(4.0)
    );
    let text = http
        .get(c.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "crier_connections_total{transport=\"sse\"} 1",
        "crier_subscribers_dropped_total{reason=\"lagged\"} 0",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    // Upstream errors are counted by kind.
    c.handle
        .reload({
            let mut cfg = c.handle.config().as_ref().clone();
            cfg.upstream.url = crier::config::UpstreamAddr::Http {
                authority: dead_addr().await.to_string(),
            };
            cfg
        })
        .unwrap();
    assert_eq!(http.get(c.url("/")).send().await.unwrap().status(), 502);
    assert_eq!(
        metric(&c, "crier_upstream_errors_total{kind=\"connect\"}").await,
        Some(1.0)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn connection_gauges_are_exact() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut subs = Vec::new();
    for _ in 0..500 {
        let r = client()
            .get(c.url("/live/gauge"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        subs.push(r);
    }
    assert!(
        eventually(Duration::from_secs(10), async || {
            metric(&c, "crier_connections{transport=\"sse\"}").await == Some(500.0)
        })
        .await
    );
    subs.truncate(300); // 200 leave
    assert!(
        eventually(Duration::from_secs(10), async || {
            metric(&c, "crier_connections{transport=\"sse\"}").await == Some(300.0)
        })
        .await,
        "gauge reads {:?}",
        metric(&c, "crier_connections{transport=\"sse\"}").await
    );
    assert_eq!(
        metric(&c, "crier_connections_total{transport=\"sse\"}").await,
        Some(500.0)
    );
    let ch: serde_json::Value = client()
        .get(c.admin_url("/channels"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ch["channels"][0]["subscribers_by_transport"]["sse"], 300);
    drop(subs);
    c.shutdown().await;
}

#[tokio::test]
async fn health_readiness_and_channel_listing() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let http = client();
    let r = http.get(c.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(c.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for name in ["orders.1", "orders.2", "orders.3", "alerts"] {
        c.publish(name, "x").await;
    }
    let v: serde_json::Value = http
        .get(c.admin_url("/channels?prefix=orders.&limit=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<_> = v["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["orders.1", "orders.2"]);
    assert_eq!(v["channels"][0]["buffered"], 1);
    assert_eq!(v["channels"][0]["published"], 1);
    assert!(v["channels"][0]["last_id"].as_str().unwrap().contains('-'));
    assert_eq!(
        v["total"], 3,
        "total counts the channels that match the prefix"
    );
    let v: serde_json::Value = http
        .get(c.admin_url("/channels?limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], 4, "no prefix: every channel");
    assert_eq!(v["channels"].as_array().unwrap().len(), 1);
    let r = http
        .get(c.admin_url("/channels?limit=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http.get(c.admin_url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    c.shutdown().await;
}

#[tokio::test]
async fn admin_and_publish_endpoints_are_not_on_the_public_listener() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let http = client();
    for path in ["/metrics", "/healthz", "/readyz", "/channels"] {
        let body = http
            .get(c.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            body, "hello from upstream",
            "{path} goes to the app, not to crier"
        );
    }
    // A publish on the public listener is proxied to the app, never published.
    http.post(c.url("/pub/secret"))
        .body("x")
        .send()
        .await
        .unwrap();
    let r = http.get(c.pub_url("secret")).send().await.unwrap();
    assert_eq!(r.status(), 404, "nothing was published");
    c.shutdown().await;
}

/// The operators' metrics: which version runs, whether the app behind accepts connections,
/// why publishes were refused, and that a drain is under way.
#[tokio::test]
async fn build_upstream_rejections_and_draining() {
    let http = client();
    // The app is not there: crier_upstream_up says so (the first probe runs at start).
    let dead = dead_addr().await;
    let c = Crier::start(
        &format!("http://{dead}"),
        "[channels]\nmax_message_size = \"1KiB\"\n",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), async || metric(
            &c,
            "crier_upstream_up"
        )
        .await
            == Some(0.0))
        .await
    );
    let version = format!(
        "crier_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric(&c, &version).await, Some(1.0));
    assert_eq!(metric(&c, "crier_draining").await, Some(0.0));

    // Each kind of refusal is counted under its reason, and only refusals are.
    c.publish("fine", "ok").await;
    let post = |path: String, body: Vec<u8>| {
        let http = http.clone();
        async move { http.post(path).body(body).send().await.unwrap().status() }
    };
    assert_eq!(post(c.pub_url("big"), vec![b'x'; 2048]).await, 413);
    assert_eq!(post(c.pub_url("bad%20name"), b"x".to_vec()).await, 400);
    assert_eq!(
        post(
            format!("{}?event=no%20spaces", c.pub_url("ok")),
            b"x".to_vec()
        )
        .await,
        400
    );
    let rejected = |reason: &str| format!("crier_publish_rejected_total{{reason=\"{reason}\"}}");
    assert_eq!(metric(&c, &rejected("too_large")).await, Some(1.0));
    assert_eq!(metric(&c, &rejected("bad_request")).await, Some(2.0));
    assert_eq!(metric(&c, &rejected("unauthorized")).await, Some(0.0));
    assert_eq!(metric(&c, &rejected("max_channels")).await, Some(0.0));
    // Reading is not publishing: a GET of a missing channel is no rejection.
    let r = http.get(c.pub_url("missing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(metric(&c, &rejected("bad_request")).await, Some(2.0));
    c.shutdown().await;

    // An app that is up: 1. A request in flight keeps the drain going while we look.
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    assert!(
        eventually(Duration::from_secs(5), async || metric(
            &c,
            "crier_upstream_up"
        )
        .await
            == Some(1.0))
        .await
    );
    let slow = tokio::spawn(http.get(c.url("/delay?ms=1500")).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.handle.shutdown();
    assert!(
        eventually(Duration::from_secs(2), async || metric(
            &c,
            "crier_draining"
        )
        .await
            == Some(1.0))
        .await
    );
    let r = http.get(c.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    c.done.await.unwrap();
}
