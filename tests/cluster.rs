//! `[cluster]`: several crier nodes (in-process servers) sharing channels through real
//! `redis-server` processes that the tests start, kill and restart themselves.

mod common;

use std::time::{Duration, Instant};

use common::redis::{absent, RedisServer};
use common::*;

macro_rules! need_redis {
    () => {
        if let Some(why) = absent() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

fn cluster(urls: &[String]) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[cluster]\nredis = [{}]\nkey_prefix = \"test:\"\n",
        list.join(", ")
    )
}

async fn node(up: &Upstream, urls: &[String]) -> Crier {
    Crier::start(&up.url(), &cluster(urls)).await
}

async fn sse_n(c: &mut SseClient, n: usize) -> Vec<SseEvent> {
    let mut got = Vec::new();
    while got.len() < n {
        match c.next_within(Duration::from_secs(10)).await {
            Ok(Some(e)) if e.event.as_deref() == Some("crier.gap") => continue,
            Ok(Some(e)) => got.push(e),
            other => panic!("after {} events: {other:?}", got.len()),
        }
    }
    got
}

/// Publishes with a status and the id (None when refused).
async fn try_publish(c: &Crier, channel: &str, body: String) -> (u16, Option<String>) {
    let r = client()
        .post(c.pub_url(channel))
        .body(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the publish API answers");
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    (status, v["id"].as_str().map(str::to_string))
}

#[tokio::test]
async fn two_nodes_deliver_every_publish_once_in_one_order_on_every_transport() {
    need_redis!();
    let redis = RedisServer::start(false);
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    let b = node(&up, &[redis.url()]).await;
    let mut sse_a = SseClient::connect(&a.url("/live/room"), None).await;
    let mut sse_b = SseClient::connect(&b.url("/live/room"), None).await;
    let (mut ws_a, _) = ws_connect(&a.ws_url("/live/room"), &[]).await;
    let (mut ws_b, _) = ws_connect(&b.ws_url("/live/room"), &[]).await;
    wait_subscribers(&a, "room", 2).await;
    wait_subscribers(&b, "room", 2).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let on = if i % 2 == 0 { &a } else { &b };
        ids.push(on.publish("room", format!("m{i}")).await);
    }
    let bodies: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for sse in [&mut sse_a, &mut sse_b] {
        let got = sse_n(sse, 20).await;
        assert_eq!(
            got.iter()
                .map(|e| e.id.clone().unwrap_or_default())
                .collect::<Vec<_>>(),
            ids,
            "one order, identical ids, on both nodes"
        );
        assert_eq!(
            got.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
            bodies
        );
        assert!(
            matches!(sse.next_within(Duration::from_millis(300)).await, Err(())),
            "and nothing twice"
        );
    }
    for ws in [&mut ws_a, &mut ws_b] {
        for want in &bodies {
            let m = ws_next(ws).await.expect("a frame");
            assert_eq!(m.to_text().expect("text"), want);
        }
    }
    // Long-poll on node B from the start of the buffer, one message per response.
    let cl = client();
    let url = b.url("/live/room");
    let mut p = longpoll(&cl, &format!("{url}?last_event_id=earliest"), None).await;
    let mut polled = Vec::new();
    for _ in 0..20 {
        assert_eq!(p.status, 200);
        polled.push(String::from_utf8_lossy(&p.body).into_owned());
        let etag = p.etag.clone();
        if polled.len() < 20 {
            p = longpoll(&cl, &url, etag.as_deref()).await;
        }
    }
    assert_eq!(polled, bodies);
    assert_eq!(p.etag, Some(format!("\"{}\"", ids[19])));

    // Resume on node B from an id node A delivered.
    let mut resumed = SseClient::connect(&b.url("/live/room"), Some(&ids[9])).await;
    assert_eq!(resumed.header("crier-resume").as_deref(), Some("ok"));
    let got = sse_n(&mut resumed, 10).await;
    assert_eq!(
        got.iter()
            .map(|e| e.id.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ids[10..]
    );
    // Either node's publish API shows the cluster's figures.
    for n in [&a, &b] {
        let v: serde_json::Value = cl
            .get(n.pub_url("room"))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json");
        assert_eq!(v["published"], 20, "{v}");
        assert_eq!(v["last_id"], ids[19].as_str(), "{v}");
    }
    // A delete on node A closes node B's subscribers too, and ids keep rising after it.
    let r = cl.delete(a.pub_url("room")).send().await.expect("delete");
    assert!(r.status().is_success(), "{}", r.status());
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = sse_b.next_event().await {
            if e.event.is_none() {
                panic!("no message after the delete: {e:?}");
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "node B's SSE subscriber was closed");
    let again = a.publish("room", "after").await;
    assert!(
        id_key(&again) > id_key(&ids[19]),
        "{again} after {}",
        ids[19]
    );
}

fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("an id");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

#[tokio::test]
async fn redis_killed_during_publishes_loses_no_acknowledged_message() {
    need_redis!();
    let mut redis = RedisServer::start(true);
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    let b = node(&up, &[redis.url()]).await;
    let mut sub = SseClient::connect(&b.url("/live/loop"), None).await;
    wait_subscribers(&b, "loop", 1).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        if i == 20 {
            redis.kill();
        }
        if i == 40 {
            redis.restart(false);
        }
        let started = Instant::now();
        let (status, id) = try_publish(&a, "loop", format!("n{i}")).await;
        match (status, id) {
            (201, Some(id)) => accepted.push((id, format!("n{i}"))),
            (s, _) => {
                assert!((500..600).contains(&s), "a refusal is a 5xx, got {s}");
                // Not a timing measurement: a bound far above the 1 s command deadline
                // that tells "answered" from "hung".
                assert!(
                    started.elapsed() < Duration::from_secs(8),
                    "refused, not hung"
                );
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "publishes were refused while Redis was down");
    // After Redis is back the cluster takes publishes again.
    let ok = eventually(Duration::from_secs(15), async || {
        try_publish(&a, "loop", "last".into()).await.0 == 201
    })
    .await;
    assert!(ok, "publishes are accepted again after Redis is back");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < accepted.len() && Instant::now() < deadline {
        match sub.next_within(Duration::from_secs(5)).await {
            Ok(Some(e)) if e.event.is_none() => got.push((e.id.unwrap_or_default(), e.data)),
            Ok(Some(_)) => {}
            other => panic!("the subscriber stayed connected: {other:?} after {got:?}"),
        }
    }
    let got: Vec<_> = got.into_iter().filter(|(_, d)| d != "last").collect();
    assert_eq!(got, accepted, "every 201 delivered once, in order");
}

#[tokio::test]
async fn redis_restarted_empty_makes_resumes_report_the_gap() {
    need_redis!();
    let mut redis = RedisServer::start(false);
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    let ids = [
        a.publish("g", "1").await,
        a.publish("g", "2").await,
        a.publish("g", "3").await,
    ];
    redis.restart(true);
    let b = node(&up, &[redis.url()]).await;
    let resumed = SseClient::connect(&b.url("/live/g"), Some(&ids[1])).await;
    assert_eq!(
        resumed.header("crier-resume").as_deref(),
        Some("gap"),
        "message 3 is gone with Redis: never silence"
    );
}

#[tokio::test]
async fn a_redis_with_aof_restarted_resumes_exactly() {
    need_redis!();
    let mut redis = RedisServer::start(true);
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    let ids = [a.publish("d", "1").await, a.publish("d", "2").await];
    redis.restart(false);
    let b = node(&up, &[redis.url()]).await;
    let mut resumed = SseClient::connect(&b.url("/live/d"), Some(&ids[0])).await;
    assert_eq!(resumed.header("crier-resume").as_deref(), Some("ok"));
    let got = sse_n(&mut resumed, 1).await;
    assert_eq!(got[0].id.as_deref(), Some(ids[1].as_str()));
}

#[tokio::test]
async fn a_killed_pubsub_connection_catches_up_with_no_loss() {
    need_redis!();
    let redis = RedisServer::start(false);
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    let b = node(&up, &[redis.url()]).await;
    let mut sub = SseClient::connect(&b.url("/live/k"), None).await;
    wait_subscribers(&b, "k", 1).await;
    let mut ids = vec![a.publish("k", "0").await];
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed.starts_with(':'), "{killed}");
    for i in 1..10 {
        ids.push(a.publish("k", format!("{i}")).await);
    }
    let got = sse_n(&mut sub, 10).await;
    assert_eq!(
        got.iter()
            .map(|e| e.id.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ids
    );
    let ok = eventually(Duration::from_secs(10), async || {
        metric(&b, "crier_cluster_reconnects_total")
            .await
            .is_some_and(|v| v >= 1.0)
    })
    .await;
    assert!(ok, "the reconnect is counted");
}

#[tokio::test]
async fn two_shards_hold_channels_and_every_node_reads_every_channel() {
    need_redis!();
    let r1 = RedisServer::start(false);
    let r2 = RedisServer::start(false);
    let urls = [r1.url(), r2.url()];
    let up = Upstream::start().await;
    let a = node(&up, &urls).await;
    let b = node(&up, &urls).await;
    let mut ids = Vec::new();
    for i in 0..16 {
        ids.push(a.publish(&format!("s{i}"), format!("on {i}")).await);
    }
    for r in [&r1, &r2] {
        let n = r.command(&["DBSIZE"]);
        let n: u64 = n.trim().trim_start_matches(':').parse().expect("DBSIZE");
        assert!(n > 0, "every shard holds some of the channels");
    }
    let cl = client();
    for (i, id) in ids.iter().enumerate() {
        let p = longpoll(
            &cl,
            &format!("{}?last_event_id=earliest", b.url(&format!("/live/s{i}"))),
            None,
        )
        .await;
        assert_eq!(p.status, 200);
        assert_eq!(&p.body[..], format!("on {i}").as_bytes());
        assert_eq!(p.etag, Some(format!("\"{id}\"")));
    }
}

#[tokio::test]
async fn an_unreachable_redis_stops_the_start_with_one_line() {
    let up = Upstream::start().await;
    let dead = dead_addr().await;
    let e = match Crier::try_start(&up.url(), &cluster(&[format!("redis://{dead}/0")])).await {
        Ok(_) => panic!("started without Redis"),
        Err(e) => e,
    };
    assert!(
        e.starts_with(&format!("cluster.redis redis://{dead}/0: ")) && !e.contains('\n'),
        "{e}"
    );
}
