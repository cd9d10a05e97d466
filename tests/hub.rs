//! The hub seen through every transport at once: fan-out to mixed subscribers, channel
//! lifetime, buffer policy, and the subscriber gauges.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn all_three_transports_on_one_channel_get_every_message() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    const N: usize = 50;
    let bodies: Vec<String> = (0..N)
        .map(|i| match i % 3 {
            0 => format!("plain {i}"),
            1 => format!("multi\nline\r\n{i}"),
            _ => format!("{{\"n\":{i}}}"),
        })
        .collect();

    let mut sse = SseClient::connect(&c.url("/live/all"), None).await;
    let (mut ws, _) = ws_connect(&c.ws_url("/live/all"), &[]).await;
    let (mut wsj, _) = ws_connect(
        &c.ws_url("/live/all"),
        &[("sec-websocket-protocol", "crier.json")],
    )
    .await;
    // The long-poll client starts from "before anything" and loops on its ETag.
    let poll_url = c.url("/live/all");
    let poller = tokio::spawn(async move {
        let cl = client();
        let mut etag = "\"0-0\"".to_string();
        let mut got = Vec::new();
        while got.len() < N {
            let p = longpoll(&cl, &poll_url, Some(&etag)).await;
            if p.status == 200 {
                got.push(String::from_utf8(p.body.to_vec()).unwrap());
                etag = p.etag.unwrap();
            }
        }
        got
    });
    wait_subscribers(&c, "all", 4).await;

    let mut ids = Vec::new();
    for b in &bodies {
        ids.push(c.publish("all", b.clone()).await);
    }

    let within = Duration::from_secs(30);
    let sse_got = tokio::time::timeout(within, async {
        let mut v = Vec::new();
        while v.len() < N {
            let e = sse.next_event().await.expect("sse open");
            v.push((e.id.unwrap(), e.data));
        }
        v
    })
    .await
    .expect("sse got all");
    let ws_got = tokio::time::timeout(within, async {
        let mut v = Vec::new();
        while v.len() < N {
            match ws_next(&mut ws).await {
                Some(Message::Text(t)) => v.push(t.to_string()),
                other => panic!("{other:?}"),
            }
        }
        v
    })
    .await
    .expect("websocket got all");
    let wsj_got = tokio::time::timeout(within, async {
        let mut v = Vec::new();
        while v.len() < N {
            let f = ws_json(&ws_next(&mut wsj).await.unwrap());
            v.push((
                f["id"].as_str().unwrap().to_string(),
                f["data"].as_str().unwrap().to_string(),
            ));
        }
        v
    })
    .await
    .expect("crier.json websocket got all");
    let poll_got = tokio::time::timeout(within, poller)
        .await
        .expect("long-poll got all")
        .unwrap();

    let sse_seen: Vec<String> = bodies.iter().map(|b| b.replace("\r\n", "\n")).collect();
    let with_ids = |want: &[String]| {
        ids.iter()
            .cloned()
            .zip(want.iter().cloned())
            .collect::<Vec<_>>()
    };
    assert_eq!(sse_got, with_ids(&sse_seen));
    assert_eq!(ws_got, bodies);
    assert_eq!(wsj_got, with_ids(&bodies));
    assert_eq!(poll_got, bodies);
    let delivered = |t: &'static str| {
        let c = &c;
        async move {
            metric(
                c,
                &format!("crier_messages_delivered_total{{transport=\"{t}\"}}"),
            )
            .await
            .unwrap_or(0.0)
        }
    };
    assert_eq!(delivered("sse").await, N as f64);
    assert_eq!(delivered("websocket").await, 2.0 * N as f64);
    assert_eq!(delivered("longpoll").await, N as f64);
    assert_eq!(
        metric(&c, "crier_messages_published_total").await,
        Some(N as f64)
    );
    c.shutdown().await;
}

/// `crier_connections{transport}` counts exactly the open subscribers, and a channel with no
/// subscribers and nothing buffered is freed.
#[tokio::test]
async fn connection_gauges_are_exact_and_idle_channels_are_freed() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let gauge = |t: &'static str| {
        let c = &c;
        async move { metric(c, &format!("crier_connections{{transport=\"{t}\"}}")).await }
    };
    assert_eq!(gauge("sse").await, Some(0.0));

    let sse: Vec<_> = futures_util::future::join_all(
        (0..3).map(|i| SseClient::connect_owned(c.url(&format!("/live/g{}", i % 2)))),
    )
    .await;
    let mut ws = Vec::new();
    for _ in 0..2 {
        ws.push(ws_connect(&c.ws_url("/live/g0"), &[]).await.0);
    }
    let poll_url = c.url("/live/g2");
    let poll = tokio::spawn(async move { longpoll(&client(), &poll_url, None).await });
    wait_subscribers(&c, "g2", 1).await;

    let exact = eventually(Duration::from_secs(10), async || {
        gauge("sse").await == Some(3.0)
            && gauge("websocket").await == Some(2.0)
            && gauge("longpoll").await == Some(1.0)
    })
    .await;
    assert!(
        exact,
        "gauges: sse {:?} ws {:?} lp {:?}",
        gauge("sse").await,
        gauge("websocket").await,
        gauge("longpoll").await
    );
    assert_eq!(metric(&c, "crier_channels").await, Some(3.0));
    assert_eq!(channel_info(&c, "g0").await.1["subscribers"], 4);
    assert_eq!(channel_info(&c, "g1").await.1["subscribers"], 1);

    // Everyone leaves: SSE and WebSocket clients go away, the waiting poll is abandoned.
    drop(sse);
    for mut w in ws.drain(..1) {
        let _ = futures_util::SinkExt::close(&mut w).await;
    }
    drop(ws);
    poll.abort();
    let _ = poll.await;
    let zero = eventually(Duration::from_secs(10), async || {
        gauge("sse").await == Some(0.0)
            && gauge("websocket").await == Some(0.0)
            && gauge("longpoll").await == Some(0.0)
    })
    .await;
    assert!(
        zero,
        "gauges: sse {:?} ws {:?} lp {:?}",
        gauge("sse").await,
        gauge("websocket").await,
        gauge("longpoll").await
    );
    for ch in ["g0", "g1", "g2"] {
        let freed = eventually(Duration::from_secs(10), async || {
            channel_info(&c, ch).await.0 == StatusCode::NOT_FOUND
        })
        .await;
        assert!(freed, "channel {ch} is freed once idle and empty");
    }
    assert_eq!(metric(&c, "crier_channels").await, Some(0.0));
    assert_eq!(
        metric(&c, "crier_connections_total{transport=\"sse\"}").await,
        Some(3.0)
    );
    assert_eq!(
        metric(&c, "crier_connections_total{transport=\"websocket\"}").await,
        Some(2.0)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn channel_with_buffer_but_no_subscribers_lives_until_its_buffer_expires() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_ttl = \"500ms\"\n").await;
    c.publish("kept", "x").await;
    assert_eq!(
        channel_info(&c, "kept").await.0,
        StatusCode::OK,
        "buffered messages keep it"
    );
    let freed = eventually(Duration::from_secs(10), async || {
        channel_info(&c, "kept").await.0 == StatusCode::NOT_FOUND
    })
    .await;
    assert!(freed, "freed once its buffer expired");
    c.shutdown().await;
}

#[tokio::test]
async fn push_location_buffer_overrides() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nbuffer_messages = 3\n\
         [[push]]\npath = \"/live/{channel}\"\nbuffer_ttl = \"10m\"\n\
         [[push]]\npath = \"/small/{channel}\"\nchannel_prefix = \"small:\"\nbuffer_messages = 2\n",
    )
    .await;
    for i in 0..5 {
        c.publish("big", format!("{i}")).await;
        c.publish("small:x", format!("{i}")).await;
    }
    let (_, v) = channel_info(&c, "small:x").await;
    assert_eq!(v["buffered"], 2, "the location's buffer_messages");
    let (_, v) = channel_info(&c, "big").await;
    assert_eq!(
        v["buffered"], 3,
        "a location that overrides only buffer_ttl keeps [channels] buffer_messages"
    );
    let p = longpoll(&client(), &c.url("/small/x?last_event_id=earliest"), None).await;
    assert_eq!(&p.body[..], b"3", "the oldest of the last two");
    c.shutdown().await;
}
