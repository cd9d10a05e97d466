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
            let down = eventually(Duration::from_secs(10), async || {
                metric(&b, "crier_cluster_up").await == Some(0.0)
            })
            .await;
            assert!(down, "crier_cluster_up says Redis is gone");
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
    let up = eventually(Duration::from_secs(10), async || {
        metric(&b, "crier_cluster_up").await == Some(1.0)
    })
    .await;
    assert!(up, "and crier_cluster_up says so");
    assert!(metric(&a, "crier_cluster_command_duration_seconds_count")
        .await
        .is_some_and(|n| n >= 60.0));
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

/// A webhook endpoint that keeps every event body it is sent.
async fn hook_receiver() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let seen: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if let Ok(v) = serde_json::from_slice(&body) {
                                kept.lock().expect("lock").push(v);
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_webhook_fires_once_per_message_from_the_node_that_took_it() {
    need_redis!();
    let redis = RedisServer::start(false);
    let up = Upstream::start().await;
    let (hook, seen) = hook_receiver().await;
    let dir = tempfile::tempdir().expect("test setup");
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").expect("test setup");
    let extra = format!(
        "{}[[webhook]]\nurl = \"{hook}\"\nsecret_file = \"{}\"\n",
        cluster(&[redis.url()]),
        secret.display()
    );
    let a = Crier::start(&up.url(), &extra).await;
    let b = Crier::start(&up.url(), &extra).await;
    // Both nodes listen to the channel, so both get every message from the fan-out.
    let _sa = SseClient::connect(&a.url("/live/w"), None).await;
    let _sb = SseClient::connect(&b.url("/live/w"), None).await;
    wait_subscribers(&a, "w", 1).await;
    wait_subscribers(&b, "w", 1).await;
    let ids = [
        a.publish("w", "from a").await,
        b.publish("w", "from b").await,
    ];
    let ok = eventually(Duration::from_secs(10), async || {
        seen.lock().expect("lock").len() >= 2
    })
    .await;
    assert!(ok, "both messages reached the webhook");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = seen.lock().expect("lock").clone();
    let mut got_ids: Vec<String> = got
        .iter()
        .map(|v| v["data"]["id"].as_str().unwrap_or_default().to_string())
        .collect();
    got_ids.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(
        got_ids, want,
        "once per message, not once per node: {got:?}"
    );
}

/// A TCP proxy in front of Redis that can wedge the pub/sub connections it carries: they stay
/// open, and what Redis sends them is swallowed (a connection that looks healthy and delivers
/// nothing). Connections made after the wedge pass.
struct WedgingProxy {
    port: u16,
    wedge_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl WedgingProxy {
    async fn start(redis_port: u16) -> WedgingProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let wedge_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(1));
        let (wb, nx) = (wedge_below.clone(), next.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let me = nx.fetch_add(1, Ordering::Relaxed);
                let pubsub = Arc::new(AtomicBool::new(false));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let ps = pubsub.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n]
                            .windows(9)
                            .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
                        {
                            ps.store(true, Ordering::Relaxed);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let wb = wb.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let wedged =
                            pubsub.load(Ordering::Relaxed) && me < wb.load(Ordering::Relaxed);
                        if !wedged && cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        WedgingProxy {
            port,
            wedge_below,
            next,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Wedges the pub/sub connections open now.
    fn wedge(&self) {
        use std::sync::atomic::Ordering;
        self.wedge_below
            .store(self.next.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_wedged_pubsub_connection_is_found_by_the_probe_and_replaced() {
    need_redis!();
    let redis = RedisServer::start(false);
    let proxy = WedgingProxy::start(redis.port).await;
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    // Node B reaches Redis through the proxy (the same server: both nodes share it).
    let b = node(&up, &[proxy.url()]).await;
    let mut sub = SseClient::connect(&b.url("/live/p"), None).await;
    wait_subscribers(&b, "p", 1).await;
    let mut ids = vec![a.publish("p", "0").await];
    assert_eq!(
        sse_n(&mut sub, 1).await[0].id.as_deref(),
        Some(ids[0].as_str())
    );
    proxy.wedge();
    for i in 1..4 {
        ids.push(a.publish("p", format!("{i}")).await);
    }
    // Nothing arrives on the wedged connection; the probe notices, the connection is
    // replaced and the channel caught up from the stream.
    let got = sse_n(&mut sub, 3).await;
    assert_eq!(
        got.iter()
            .map(|e| e.id.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ids[1..]
    );
    assert!(metric(&b, "crier_cluster_reconnects_total")
        .await
        .is_some_and(|v| v >= 1.0));
}

#[tokio::test]
async fn a_third_node_sigkilled_and_restarted_resumes_its_clients_from_redis() {
    need_redis!();
    use common::process::CrierProcess;
    let redis = RedisServer::start(false);
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    let b = node(&up, &[redis.url()]).await;
    let c = CrierProcess::start(&up.url(), &cluster(&[redis.url()]));
    let mut on_c = SseClient::connect(&c.url("/live/r"), None).await;
    let ok = eventually(Duration::from_secs(10), async || {
        // C's subscriber is counted on C only; a publish it receives proves it is listening.
        let id = a.publish("r", "probe").await;
        matches!(on_c.next_within(Duration::from_millis(500)).await,
            Ok(Some(e)) if e.id.as_deref() == Some(id.as_str()))
    })
    .await;
    assert!(ok, "node C delivers node A's publishes");
    let seen = [a.publish("r", "1").await, b.publish("r", "2").await];
    let got = sse_n(&mut on_c, 2).await;
    assert_eq!(got[1].id.as_deref(), Some(seen[1].as_str()));
    drop(on_c);
    drop(c); // SIGKILL
    let missed = [a.publish("r", "3").await, b.publish("r", "4").await];
    let c = CrierProcess::start(&up.url(), &cluster(&[redis.url()]));
    let mut resumed = SseClient::connect(&c.url("/live/r"), Some(&seen[1])).await;
    assert_eq!(resumed.header("crier-resume").as_deref(), Some("ok"));
    let got = sse_n(&mut resumed, 2).await;
    assert_eq!(
        got.iter()
            .map(|e| e.id.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        missed,
        "exactly what it missed, from Redis's history"
    );
}

#[test]
fn crier_check_and_run_name_a_bad_cluster_url() {
    use common::process::run_cli;
    let dir = tempfile::tempdir().expect("test setup");
    let conf = dir.path().join("crier.toml");
    std::fs::write(&conf, "[cluster]\nredis = [\"redis//127.0.0.1\"]\n").expect("test setup");
    let out = run_cli(
        &["check", "--config", conf.to_str().expect("utf-8")],
        dir.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("crier.toml:2:10: cluster.redis: \"redis//127.0.0.1\""),
        "{err}"
    );
}

#[tokio::test]
async fn the_password_file_authenticates_and_a_wrong_one_stops_the_start() {
    need_redis!();
    let redis = RedisServer::start_with(false, &["--requirepass", "s3cret-pw"]);
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("test setup");
    let pw = dir.path().join("redis.pw");
    std::fs::write(&pw, "s3cret-pw\n").expect("test setup");
    let with = |file: &std::path::Path| {
        format!(
            "{}password_file = \"{}\"\n",
            cluster(&[redis.url()]),
            file.display()
        )
    };
    let a = Crier::start(&up.url(), &with(&pw)).await;
    let mut sub = SseClient::connect(&a.url("/live/pw"), None).await;
    wait_subscribers(&a, "pw", 1).await;
    let id = a.publish("pw", "x").await;
    assert_eq!(sse_n(&mut sub, 1).await[0].id.as_deref(), Some(id.as_str()));
    let wrong = dir.path().join("wrong.pw");
    std::fs::write(&wrong, "nope").expect("test setup");
    let e = match Crier::try_start(&up.url(), &with(&wrong)).await {
        Ok(_) => panic!("started with a wrong password"),
        Err(e) => e,
    };
    assert!(
        e.starts_with(&format!("cluster.redis {}: ", redis.url())) && !e.contains('\n'),
        "{e}"
    );
    assert!(!e.contains("nope"), "the password is not shown: {e}");
}

#[tokio::test]
async fn rediss_speaks_tls() {
    need_redis!();
    let certs = tempfile::tempdir().expect("test setup");
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("cert");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("test setup");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("test setup");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let redis = RedisServer::start_with(
        false,
        &[
            "--port",
            "0",
            "--tls-port",
            "{port}",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &cert,
            "--tls-auth-clients",
            "no",
        ],
    );
    let up = Upstream::start().await;
    // The test's certificate is its own CA: `ca_file` names it.
    let extra = format!(
        "{}ca_file = \"{cert}\"\n",
        cluster(&[format!("rediss://127.0.0.1:{}/0", redis.port)])
    );
    let a = Crier::start(&up.url(), &extra).await;
    let b = Crier::start(&up.url(), &extra).await;
    // Without it, the system roots do not know the certificate: a clear start-up error.
    let e = match Crier::try_start(
        &up.url(),
        &cluster(&[format!("rediss://127.0.0.1:{}/0", redis.port)]),
    )
    .await
    {
        Ok(_) => panic!("an unknown certificate was accepted"),
        Err(e) => e,
    };
    assert!(
        e.starts_with("cluster.redis rediss://127.0.0.1:") && !e.contains('\n'),
        "{e}"
    );
    let mut sub = SseClient::connect(&b.url("/live/tls"), None).await;
    wait_subscribers(&b, "tls", 1).await;
    let id = a.publish("tls", "over TLS").await;
    let got = sse_n(&mut sub, 1).await;
    assert_eq!(
        (got[0].id.as_deref(), got[0].data.as_str()),
        (Some(id.as_str()), "over TLS")
    );
}

#[tokio::test]
async fn a_multiplexed_subscription_and_its_cursor_work_across_nodes() {
    need_redis!();
    let redis = RedisServer::start(false);
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    let b = node(&up, &[redis.url()]).await;
    let mut sse = SseClient::connect(&b.url("/live/x,y,z"), None).await;
    wait_subscribers(&b, "z", 1).await;
    let names = ["x", "y", "z"];
    let mut published = Vec::new();
    for i in 0..30 {
        let ch = names[i % 3];
        let on = if i % 2 == 0 { &a } else { &b };
        let id = on.publish(ch, format!("{ch}{i}")).await;
        published.push((ch.to_string(), id, format!("{ch}{i}")));
    }
    let envelope = |e: &SseEvent| -> (String, String, String) {
        let v: serde_json::Value = serde_json::from_str(&e.data).expect("crier.json");
        (
            v["channel"].as_str().unwrap_or_default().to_string(),
            v["id"].as_str().unwrap_or_default().to_string(),
            v["data"].as_str().unwrap_or_default().to_string(),
        )
    };
    let first = sse_n(&mut sse, 15).await;
    let cursor = first.last().and_then(|e| e.id.clone()).expect("a cursor");
    drop(sse);
    // The cursor node B gave resumes every channel exactly on node A.
    let mut resumed = SseClient::connect(&a.url("/live/x,y,z"), Some(&cursor)).await;
    assert_eq!(resumed.header("crier-resume").as_deref(), Some("ok"));
    let rest = sse_n(&mut resumed, 15).await;
    let got: Vec<_> = first.iter().chain(&rest).map(envelope).collect();
    assert_eq!(got, published, "every message once, in publish order");
}

/// How many times Redis ran these commands since its stats were reset (INFO commandstats).
fn redis_calls(redis: &RedisServer, commands: &[&str]) -> u64 {
    let info = redis.command(&["INFO", "commandstats"]);
    commands
        .iter()
        .map(|c| {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{c}:calls=")))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// One publish's answer: status, id, the body sent, how long the answer took.
type Answer = (u16, Option<String>, String, Duration);

/// `publishers` tasks posting to `urls` in turn, each `per` times (or until `stop`): every
/// answer as (status, id, body).
fn publishers(
    urls: Vec<String>,
    publishers: usize,
    per: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<Answer>>> {
    use std::sync::atomic::Ordering;
    (0..publishers)
        .map(|p| {
            let urls = urls.clone();
            let stop = stop.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let cl = client();
                let mut out = Vec::new();
                for i in 0..per {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = format!("w{p}-{i}");
                    let started = Instant::now();
                    let r = cl
                        .post(&urls[(p + i) % urls.len()])
                        .body(body.clone())
                        .timeout(Duration::from_secs(20))
                        .send()
                        .await
                        .expect("the publish API answers");
                    let status = r.status().as_u16();
                    let v: serde_json::Value = r.json().await.unwrap_or_default();
                    if status == 201 {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    let id = v["id"].as_str().map(str::to_string);
                    out.push((status, id, body, started.elapsed()));
                }
                out
            })
        })
        .collect()
}

#[tokio::test]
async fn concurrent_publishes_share_script_calls_and_every_node_delivers_each_once_in_order() {
    need_redis!();
    let redis = RedisServer::start(false);
    let up = Upstream::start().await;
    let conf = format!(
        "{}[channels]\nbuffer_messages = 2000\n",
        cluster(&[redis.url()])
    );
    let a = Crier::start(&up.url(), &conf).await;
    let b = Crier::start(&up.url(), &conf).await;
    let mut subs = Vec::new();
    for n in [&a, &b] {
        subs.push(SseClient::connect(&n.url("/live/burst"), None).await);
        wait_subscribers(n, "burst", 1).await;
    }
    let reset = redis.command(&["CONFIG", "RESETSTAT"]);
    assert!(reset.starts_with("+OK"), "{reset}");
    const PUBLISHERS: usize = 32;
    const PER: usize = 20;
    let tasks = publishers(
        vec![a.pub_url("burst"), b.pub_url("burst")],
        PUBLISHERS,
        PER,
        Default::default(),
        Default::default(),
    );
    let mut sent = std::collections::HashMap::new();
    for t in tasks {
        for (status, id, body, _) in t.await.expect("the publisher ends") {
            assert_eq!(status, 201, "{body}");
            let id = id.expect("an id");
            assert!(sent.insert(id.clone(), body).is_none(), "{id} given twice");
        }
    }
    let total = PUBLISHERS * PER;
    assert_eq!(sent.len(), total);
    let scripts = redis_calls(&redis, &["evalsha", "eval"]);
    assert_eq!(redis_calls(&redis, &["xadd"]), total as u64);
    assert!(
        (scripts as usize) * 2 <= total,
        "{total} publishes took {scripts} script calls: they were not grouped"
    );
    let mut order: Vec<&String> = sent.keys().collect();
    order.sort_by_key(|id| id_key(id));
    for sub in &mut subs {
        let got = sse_n(sub, total).await;
        let ids: Vec<&str> = got.iter().map(|e| e.id.as_deref().unwrap_or("")).collect();
        assert_eq!(
            ids, order,
            "every message once, in id order, with its own id"
        );
        for e in &got {
            assert_eq!(Some(&e.data), sent.get(e.id.as_deref().unwrap_or("")));
        }
        assert!(
            matches!(sub.next_within(Duration::from_millis(300)).await, Err(())),
            "and nothing twice"
        );
    }
}

#[tokio::test]
async fn redis_killed_during_grouped_publishes_loses_no_acknowledged_message() {
    use std::sync::atomic::Ordering;
    need_redis!();
    let mut redis = RedisServer::start(true);
    let up = Upstream::start().await;
    let conf = format!(
        "{}[channels]\nbuffer_messages = 5000\n",
        cluster(&[redis.url()])
    );
    let a = Crier::start(&up.url(), &conf).await;
    let b = Crier::start(&up.url(), &conf).await;
    let mut sub = SseClient::connect(&b.url("/live/kill"), None).await;
    wait_subscribers(&b, "kill", 1).await;
    // The subscriber reads all along (it must not fall a buffer behind), up to "end".
    let reader = tokio::spawn(async move {
        let mut got: Vec<(String, String)> = Vec::new();
        loop {
            match sub.next_within(Duration::from_secs(30)).await {
                Ok(Some(e)) if e.event.is_none() && e.data == "end" => return got,
                Ok(Some(e)) if e.event.is_none() => got.push((e.id.unwrap_or_default(), e.data)),
                Ok(Some(_)) => {}
                other => panic!(
                    "the subscriber stayed connected: {other:?} after {}",
                    got.len()
                ),
            }
        }
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks = publishers(
        vec![a.pub_url("kill")],
        16,
        100_000,
        stop.clone(),
        accepted.clone(),
    );
    let reached = async |n: usize| {
        eventually(Duration::from_secs(20), async || {
            accepted.load(Ordering::Relaxed) >= n
        })
        .await
    };
    assert!(reached(200).await, "publishes are accepted");
    redis.kill();
    let down = eventually(Duration::from_secs(10), async || {
        metric(&b, "crier_cluster_up").await == Some(0.0)
    })
    .await;
    assert!(down, "crier_cluster_up says Redis is gone");
    let at_kill = accepted.load(Ordering::Relaxed);
    redis.restart(false);
    assert!(
        reached(at_kill + 200).await,
        "publishes are accepted again after Redis is back"
    );
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    let mut refused = 0;
    for t in tasks {
        for (status, id, body, took) in t.await.expect("the publisher ends") {
            match (status, id) {
                (201, Some(id)) => sent.push((id, body)),
                (s, _) => {
                    assert!((500..600).contains(&s), "a refusal is a 5xx, got {s}");
                    // Not a timing measurement: far above the 1 s command deadline, it tells
                    // "answered" from "hung".
                    assert!(took < Duration::from_secs(8), "refused, not hung");
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 0, "publishes were refused while Redis was down");
    let end = a.publish("kill", "end").await;
    let got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the subscriber gets to the end")
        .expect("the reader ends");
    sent.sort_by_key(|(id, _)| id_key(id));
    assert!(
        sent.windows(2).all(|w| w[0].0 != w[1].0),
        "every 201 has its own id"
    );
    assert!(id_key(&end) > id_key(&sent[sent.len() - 1].0));
    // Every acknowledged message reached the subscriber on the other node, once, in id order
    // (a publish refused because its answer was lost may be there too: it was stored).
    assert!(
        got.windows(2).all(|w| id_key(&w[0].0) < id_key(&w[1].0)),
        "once each, in id order"
    );
    let have: std::collections::HashSet<&(String, String)> = got.iter().collect();
    let missing: Vec<_> = sent.iter().filter(|m| !have.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "every 201 delivered; {} of {} were not: {:?}",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(5)]
    );
}

/// How many connections Redis has subscribed to `channel`'s fan-out topic.
fn listeners(redis: &RedisServer, channel: &str) -> u64 {
    let topic = format!("test:{{{channel}}}:f");
    let out = redis.command(&["PUBSUB", "NUMSUB", &topic]);
    // *2, the topic, then :<count>
    out.lines()
        .find_map(|l| l.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("PUBSUB NUMSUB answered {out:?}"))
}

#[tokio::test]
async fn a_node_listens_only_to_channels_it_has_subscribers_for() {
    need_redis!();
    let redis = RedisServer::start(false);
    let up = Upstream::start().await;
    let a = node(&up, &[redis.url()]).await;
    let b = node(&up, &[redis.url()]).await;
    // b only publishes: it listens to no fan-out topic.
    let first = b.publish("quiet", "one").await;
    assert_eq!(
        listeners(&redis, "quiet"),
        0,
        "a publish-only node does not listen"
    );
    // And it lets such a channel go a buffer TTL later (until then it counts against
    // max_channels, as a buffered channel does): c has a TTL of 1 s.
    let c = Crier::start(
        &up.url(),
        &format!(
            "{}[channels]\nbuffer_ttl = \"1s\"\n",
            cluster(&[redis.url()])
        ),
    )
    .await;
    c.publish("brief", "x").await;
    assert_eq!(listeners(&redis, "brief"), 0);
    assert_eq!(metric(&c, "crier_channels").await, Some(1.0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&c, "crier_channels").await != Some(0.0) {
        assert!(Instant::now() < deadline, "c let the channel go");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A subscriber on a reads what b published from the stream, then b's next publish live.
    let mut sse = SseClient::connect(&a.url("/live/quiet?last_event_id=earliest"), None).await;
    wait_subscribers(&a, "quiet", 1).await;
    assert_eq!(
        listeners(&redis, "quiet"),
        1,
        "a listens for its subscriber"
    );
    let second = b.publish("quiet", "two").await;
    let got = sse_n(&mut sse, 2).await;
    assert_eq!(
        got.iter()
            .map(|e| (e.id.clone(), e.data.clone()))
            .collect::<Vec<_>>(),
        vec![(Some(first), "one".into()), (Some(second), "two".into())]
    );
    assert_eq!(listeners(&redis, "quiet"), 1, "b still does not listen");
    // A subscriber on b makes b listen too, and it gets what a publishes.
    let mut sse_b = SseClient::connect(&b.url("/live/quiet"), None).await;
    wait_subscribers(&b, "quiet", 1).await;
    assert_eq!(listeners(&redis, "quiet"), 2);
    let third = a.publish("quiet", "three").await;
    for s in [&mut sse, &mut sse_b] {
        let e = sse_n(s, 1).await.remove(0);
        assert_eq!((e.id, e.data), (Some(third.clone()), "three".into()));
    }
}
