//! Server-Sent Events subscribers, end to end through the public listener.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads exactly `n` events (each within 10s).
async fn take(sse: &mut SseClient, n: usize) -> Vec<SseEvent> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        match sse.next_within(Duration::from_secs(10)).await {
            Ok(Some(ev)) => out.push(ev),
            Ok(None) => panic!("stream ended after {i} of {n} events"),
            Err(()) => panic!("no event {i} of {n} within 10s"),
        }
    }
    out
}

/// Nothing more arrives within a short while (no extra or duplicate event).
async fn assert_quiet(sse: &mut SseClient) {
    if let Ok(ev) = sse.next_within(Duration::from_millis(300)).await {
        panic!("expected no further event, got {ev:?}");
    }
}

#[tokio::test]
async fn sse_delivers_bodies_line_endings_and_event_names() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut sse = SseClient::connect(&c.url("/live/news"), None).await;
    assert_eq!(
        sse.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(sse.header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(sse.header("x-accel-buffering").as_deref(), Some("no"));
    assert_eq!(sse.header("crier-resume").as_deref(), Some("ok"));

    // (body published, body an EventSource sees): each CR and CRLF reads as LF, nothing is cut.
    let cases: &[(&str, &str)] = &[
        ("plain", "plain"),
        ("two\nlines", "two\nlines"),
        ("crlf\r\nlines\r\n", "crlf\nlines\n"),
        ("lone\rcr\rin the middle", "lone\ncr\nin the middle"),
        ("mixed\r\n\r\rend", "mixed\n\n\nend"),
        ("\ntrailing\n", "\ntrailing\n"),
        ("", ""),
        ("ünïcødé ✓", "ünïcødé ✓"),
    ];
    let mut ids = Vec::new();
    for (body, _) in cases {
        ids.push(c.publish("news", body.to_string()).await);
    }
    let (s, v) = publish_with(&c, "news", &[("crier-event", "update")], "with header").await;
    assert_eq!(s, 201);
    ids.push(v["id"].as_str().unwrap().to_string());
    let (s, v) = publish_with(&c, "news?event=price.tick", &[], "with query").await;
    assert_eq!(s, 201);
    ids.push(v["id"].as_str().unwrap().to_string());

    let evs = take(&mut sse, cases.len() + 2).await;
    for (i, (body, seen)) in cases.iter().enumerate() {
        assert_eq!(evs[i].data, *seen, "body {body:?}");
        assert_eq!(evs[i].event, None);
        assert_eq!(evs[i].id.as_deref(), Some(ids[i].as_str()));
    }
    let n = cases.len();
    assert_eq!(evs[n].event.as_deref(), Some("update"));
    assert_eq!(evs[n].data, "with header");
    assert_eq!(evs[n + 1].event.as_deref(), Some("price.tick"));
    assert_eq!(evs[n + 1].data, "with query");
    assert_eq!(sse.retry, Some(2000), "a retry: hint comes first");
    // Ids look like `<unix-millis>-<seq>` and strictly increase.
    let parsed: Vec<(u64, u64)> = ids
        .iter()
        .map(|id| {
            let (ms, seq) = id.split_once('-').expect("id has a dash");
            (ms.parse().expect("millis"), seq.parse().expect("seq"))
        })
        .collect();
    assert!(parsed.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(
        parsed[0].0 > 1_600_000_000_000,
        "ids start with unix millis"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn sse_works_over_http2() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let resp = h2_client()
        .get(c.url("/live/h2"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let mut sse = SseClient::from_response(resp);
    let id = c.publish("h2", "over\r\nh2").await;
    let ev = take(&mut sse, 1).await.remove(0);
    assert_eq!(ev.data, "over\nh2");
    assert_eq!(ev.id, Some(id));
    c.shutdown().await;
}

#[tokio::test]
async fn sse_keepalive_comments_while_idle() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nkeepalive = \"100ms\"\n",
    )
    .await;
    let mut sse = SseClient::connect(&c.url("/live/idle"), None).await;
    let ok = eventually(Duration::from_secs(10), async || {
        let _ = sse.next_within(Duration::from_millis(50)).await;
        sse.comments >= 3
    })
    .await;
    assert!(ok, "keepalive comments arrive on an idle stream");
    // The stream still delivers after the comments.
    c.publish("idle", "after").await;
    assert_eq!(take(&mut sse, 1).await[0].data, "after");
    c.shutdown().await;
}

/// A client that drops and reconnects (Last-Event-ID or `last_event_id=`) again and again
/// while 1,000 messages are published sees each exactly once, in order.
#[tokio::test]
async fn sse_resume_is_exact_across_reconnects() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_messages = 2000\n").await;
    const N: usize = 1000;
    let url = c.url("/live/resume");
    let mut sse = SseClient::connect(&url, None).await;
    let publisher = {
        let pub_url = c.pub_url("resume");
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
        let mut last: Option<String> = None;
        let mut reconnects = 0usize;
        while seen.len() < N {
            // Read a varying number of events, then drop the connection.
            let want = 1 + (reconnects * 7) % 23;
            for _ in 0..want {
                if seen.len() == N {
                    break;
                }
                let ev = take(&mut sse, 1).await.remove(0);
                seen.push(ev.data.parse().expect("numeric body"));
                last = ev.id;
            }
            reconnects += 1;
            let id = last.clone().expect("saw an id");
            sse = if reconnects % 2 == 0 {
                SseClient::connect(&url, Some(&id)).await
            } else {
                SseClient::connect(&format!("{url}?last_event_id={id}"), None).await
            };
            assert_eq!(sse.header("crier-resume").as_deref(), Some("ok"));
        }
        (seen, reconnects)
    };
    let (seen, reconnects) = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("1,000 messages within 120s");
    publisher.await.unwrap();
    assert!(reconnects > 50, "reconnected {reconnects} times");
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert_quiet(&mut sse).await;
    c.shutdown().await;
}

#[tokio::test]
async fn sse_resume_reports_gap_and_earliest() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_messages = 3\n").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(c.publish("g", format!("m{i}")).await);
    }
    let url = c.url("/live/g");
    // ids[0..3] left the buffer: resuming after ids[0] misses ids[1] and ids[2].
    let mut sse = SseClient::connect(&url, Some(&ids[0])).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("gap"));
    // Told in band too (EventSource cannot read headers): the first id it gets now.
    let notice = take(&mut sse, 1).await.remove(0);
    assert_eq!(notice.event.as_deref(), Some("crier.gap"));
    let v: serde_json::Value = serde_json::from_str(&notice.data).unwrap();
    assert_eq!(v, serde_json::json!({"channel": "g", "next": ids[3]}));
    assert_eq!(notice.id, None, "a notice does not move Last-Event-ID");
    let got: Vec<_> = take(&mut sse, 3)
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["m3", "m4", "m5"], "the whole buffer");
    assert_quiet(&mut sse).await;
    // After ids[2] nothing is missing.
    let mut sse = SseClient::connect(&url, Some(&ids[2])).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("ok"));
    let got: Vec<_> = take(&mut sse, 3)
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["m3", "m4", "m5"]);
    // After ids[4]: only the newest.
    let mut sse = SseClient::connect(&url, Some(&ids[4])).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("ok"));
    assert_eq!(take(&mut sse, 1).await[0].data, "m5");
    assert_quiet(&mut sse).await;
    // `last_event_id=earliest`: the whole buffer; the query wins over the header.
    let mut sse = SseClient::connect(&format!("{url}?last_event_id=earliest"), Some(&ids[4])).await;
    let got: Vec<_> = take(&mut sse, 3)
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["m3", "m4", "m5"]);
    // Without a position (first_message = "newest"): only what comes next.
    let mut sse = SseClient::connect(&url, None).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("ok"));
    assert_quiet(&mut sse).await;
    c.publish("g", "m6").await;
    assert_eq!(take(&mut sse, 1).await[0].data, "m6");
    c.shutdown().await;
}

#[tokio::test]
async fn sse_first_message_newest_and_oldest() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\n\
         [[push]]\npath = \"/history/{channel}\"\nfirst_message = \"oldest\"\n",
    )
    .await;
    c.publish("f", "old1").await;
    c.publish("f", "old2").await;
    let mut newest = SseClient::connect(&c.url("/live/f"), None).await;
    let mut oldest = SseClient::connect(&c.url("/history/f"), None).await;
    c.publish("f", "new").await;
    assert_eq!(take(&mut newest, 1).await[0].data, "new");
    let got: Vec<_> = take(&mut oldest, 3)
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["old1", "old2", "new"]);
    assert_quiet(&mut newest).await;
    c.shutdown().await;
}

#[tokio::test]
async fn sse_buffer_ttl_evicts_old_messages() {
    let up = Upstream::start().await;
    // Long enough that "fresh" outlives the checks below on a loaded machine.
    let c = Crier::start(&up.url(), "[channels]\nbuffer_ttl = \"2s\"\n").await;
    // A subscriber keeps the channel alive while its buffer expires.
    let _keep = SseClient::connect(&c.url("/live/ttl"), None).await;
    let old = c.publish("ttl", "old").await;
    let ok = eventually(Duration::from_secs(15), async || {
        channel_info(&c, "ttl").await.1["buffered"].as_u64() == Some(0)
    })
    .await;
    assert!(ok, "the expired message leaves the buffer");
    c.publish("ttl", "fresh").await;
    // Resuming from the expired message: nothing lost; from before it: a gap.
    let mut sse = SseClient::connect(&c.url("/live/ttl"), Some(&old)).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("ok"));
    assert_eq!(take(&mut sse, 1).await[0].data, "fresh");
    let mut sse = SseClient::connect(&c.url("/live/ttl?last_event_id=earliest"), None).await;
    assert_eq!(take(&mut sse, 1).await[0].data, "fresh");
    assert_quiet(&mut sse).await;
    let sse = SseClient::connect(&c.url("/live/ttl"), Some("1-0")).await;
    assert_eq!(sse.header("crier-resume").as_deref(), Some("gap"));
    c.shutdown().await;
}

#[tokio::test]
async fn sse_stream_ends_when_channel_is_deleted() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut sse = SseClient::connect(&c.url("/live/doomed"), None).await;
    c.publish("doomed", "last words").await;
    let r = client().delete(c.pub_url("doomed")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(take(&mut sse, 1).await[0].data, "last words");
    let end = sse.next_within(Duration::from_secs(10)).await;
    assert_eq!(end, Ok(None), "the stream ends after the deletion");
    c.shutdown().await;
}

#[tokio::test]
async fn sse_request_errors() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nmax_channels = 2\n\
         [[push]]\npath = \"/live/{channel}\"\n\
         [[push]]\npath = \"/ws-only/{channel}\"\ntransports = [\"websocket\"]\n",
    )
    .await;
    let cl = client();
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut r = cl.get(c.url(path)).header("accept", "text/event-stream");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let long = format!("/live/{}", "x".repeat(129));
    for bad in ["/live/a%20b", "/live/a!b", "/live/%C3%A9", long.as_str()] {
        let r = get(bad, &[]).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert!(
            !r.text().await.unwrap().is_empty(),
            "a reason comes with the 400"
        );
    }
    let longest = get(&format!("/live/{}", "x".repeat(128)), &[])
        .await
        .unwrap();
    assert_eq!(longest.status(), 200, "128 characters is a valid name");
    for id in ["abc", "1-", "-1", "1-2-3", "12345"] {
        let r = get("/live/ok", &[("last-event-id", id)]).await.unwrap();
        assert_eq!(r.status(), 400, "Last-Event-ID {id}");
        let r = get(&format!("/live/ok?last_event_id={id}"), &[])
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "last_event_id={id}");
    }
    let r = get("/ws-only/x", &[]).await.unwrap();
    assert_eq!(r.status(), 406, "SSE not enabled at this location");
    let r = cl.post(c.url("/live/x")).body("nope").send().await.unwrap();
    assert_eq!(r.status(), 405);
    let allow = r
        .headers()
        .get("allow")
        .expect("405 names Allow")
        .to_str()
        .unwrap();
    assert!(allow.contains("GET"), "{allow}");
    // max_channels = 2: the 128-character channel is one; a second one fills the hub.
    let _b = SseClient::connect(&c.url("/live/b"), None).await;
    let r = get("/live/third", &[]).await.unwrap();
    assert_eq!(
        r.status(),
        429,
        "a subscription may not create a channel past max_channels"
    );
    drop(longest);
    c.shutdown().await;
}

#[tokio::test]
async fn sse_origin_policy_and_cors() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\n\
         [[push]]\npath = \"/open/{channel}\"\nchannel_prefix = \"open:\"\n\
         allow_origins = [\"https://app.example\"]\n",
    )
    .await;
    let cl = client();
    let get = |path: &str, origin: &str| {
        cl.get(c.url(path))
            .header("accept", "text/event-stream")
            .header("origin", origin)
            .send()
    };
    // Default: same origin only.
    let r = get("/live/o", "https://evil.example").await.unwrap();
    assert_eq!(r.status(), 403);
    let same = format!("http://{}", c.public);
    let r = get("/live/o", &same).await.unwrap();
    assert_eq!(r.status(), 200, "same origin is allowed");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    drop(r);
    // An allow-list: the listed origin gets CORS headers, others 403.
    let r = get("/open/o", "https://app.example").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers().get("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    let expose = r
        .headers()
        .get("access-control-expose-headers")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(expose.contains("Crier-Resume"), "{expose}");
    drop(r);
    let r = get("/open/o", "https://other.example").await.unwrap();
    assert_eq!(r.status(), 403);
    // Preflight.
    let r = cl
        .request(reqwest::Method::OPTIONS, c.url("/open/o"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers().get("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    let allowed = r
        .headers()
        .get("access-control-allow-headers")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        allowed.to_ascii_lowercase().contains("last-event-id"),
        "{allowed}"
    );
    c.shutdown().await;
}

/// Same origin over HTTP/2: there is no Host header, only the `:authority`.
#[tokio::test]
async fn sse_same_origin_over_http2() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let r = h2_client()
        .get(c.url("/live/o"))
        .header("accept", "text/event-stream")
        .header("origin", format!("http://{}", c.public))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200, "same origin over HTTP/2");
    c.shutdown().await;
}

/// With `on_lag = "disconnect"`, a subscriber that stops reading falls behind the (small)
/// buffer while another keeps up: the slow one is cut off and counted, the fast one gets
/// every message.
#[tokio::test]
async fn sse_slow_subscriber_is_dropped_and_fast_one_gets_everything() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nbuffer_messages = 4\nmax_message_size = \"64KiB\"\n\
         [[push]]\npath = \"/live/{channel}\"\non_lag = \"disconnect\"\n",
    )
    .await;
    // The slow subscriber: a raw socket with a small receive buffer that stops reading.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = sock.connect(c.public).await.unwrap();
    slow.write_all(b"GET /live/lag HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut fast = SseClient::connect(&c.url("/live/lag"), None).await;
    wait_subscribers(&c, "lag", 2).await;

    // Publish in step with the fast subscriber: it never falls behind; the slow one must.
    const N: usize = 400;
    let body = "x".repeat(60 * 1024);
    let cl = client();
    for i in 0..N {
        let r = cl
            .post(c.pub_url("lag"))
            .body(format!("{i}:{body}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let ev = take(&mut fast, 1).await.remove(0);
        assert!(
            ev.data.starts_with(&format!("{i}:")),
            "fast subscriber got message {i}"
        );
    }
    // The slow one reads again: whatever was queued, then the end of the stream.
    let mut raw = Vec::new();
    let read = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = slow.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if raw.ends_with(b"\r\n0\r\n\r\n") {
                break; // the last chunk of the SSE body
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the slow subscriber's stream ends");
    let text = String::from_utf8_lossy(&raw);
    let got = text.matches("data: ").count();
    assert!(
        got < N,
        "the slow subscriber did not get all {N} messages ({got})"
    );
    let lagged = metric(&c, "crier_subscribers_dropped_total{reason=\"lagged\"}").await;
    assert_eq!(lagged, Some(1.0), "the slow subscriber is counted");
    assert_quiet(&mut fast).await;
    c.shutdown().await;
}

/// 1,000 concurrent SSE subscribers on one channel (most multiplexed over a few HTTP/2
/// connections, some on their own HTTP/1.1 connection) each receive all 100 messages in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sse_subscribers_receive_100_messages() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    const H2_CLIENTS: usize = 5;
    const PER_H2: usize = 180;
    const H1: usize = 100;
    const SUBS: usize = H2_CLIENTS * PER_H2 + H1;
    const MSGS: usize = 100;
    let url = c.url("/live/fan");
    let h1 = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut clients: Vec<reqwest::Client> = (0..H2_CLIENTS).map(|_| h2_client()).collect();
    let mut tasks = Vec::with_capacity(SUBS);
    for i in 0..SUBS {
        let cl = if i < H2_CLIENTS * PER_H2 {
            clients[i % H2_CLIENTS].clone()
        } else {
            h1.clone()
        };
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut sse = SseClient::connect_with(&cl, &url, None).await;
            let mut got = Vec::with_capacity(MSGS);
            while got.len() < MSGS {
                match sse.next_event().await {
                    Some(ev) => got.push(ev.data),
                    None => break,
                }
            }
            got
        }));
    }
    let connected = eventually(Duration::from_secs(60), async || {
        channel_info(&c, "fan").await.1["subscribers"].as_u64() == Some(SUBS as u64)
    })
    .await;
    assert!(connected, "all {SUBS} subscribers connected");
    assert_eq!(
        metric(&c, "crier_connections{transport=\"sse\"}").await,
        Some(SUBS as f64)
    );
    let started = std::time::Instant::now();
    for i in 0..MSGS {
        c.publish("fan", format!("message {i}")).await;
    }
    let want: Vec<String> = (0..MSGS).map(|i| format!("message {i}")).collect();
    let all = async {
        for t in tasks {
            assert_eq!(t.await.unwrap(), want);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every subscriber got every message within 120s");
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "fan-out: {SUBS} subscribers x {MSGS} messages in {secs:.2}s ({:.0} deliveries/s, debug build)",
        (SUBS * MSGS) as f64 / secs
    );
    clients.clear();
    drop(h1);
    c.shutdown().await;
}
