//! Outbound webhooks: a real receiver on loopback that checks every signature with its own
//! HMAC implementation (the `hmac` + `sha2` crates, not crier's aws-lc-rs code).

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::*;
use hmac::{Hmac, Mac};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    id: String,
    timestamp: u64,
    /// The signature checked out with the receiver's own HMAC, and the timestamp is fresh.
    signed: bool,
    json: serde_json::Value,
    at: Instant,
}

/// How the receiver answers one request.
#[derive(Clone)]
struct Reply {
    status: u16,
    delay: Duration,
    retry_after: Option<&'static str>,
}

fn status(s: u16) -> Reply {
    Reply {
        status: s,
        delay: Duration::ZERO,
        retry_after: None,
    }
}

/// Requests being answered at the same time.
#[derive(Debug, Clone, Default)]
struct Concurrency {
    now: usize,
    /// The most at once.
    max: usize,
    per_channel: std::collections::HashMap<String, usize>,
    /// Some channel had two requests in flight at once.
    channel_overlap: bool,
}

#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Answers for the next requests, in order; then 200.
    script: Arc<Mutex<VecDeque<Reply>>>,
    /// How long every answer not scripted waits (a receiver that far away).
    delay: Arc<Mutex<Duration>>,
    /// A message body → how many of its attempts still answer 500.
    fail: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    concurrency: Arc<Mutex<Concurrency>>,
}

/// The Standard Webhooks check, written from the spec with the `hmac` crate.
fn independent_signature(key: &[u8], id: &str, ts: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

fn key() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").expect("prefix"))
        .expect("base64")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

impl Receiver {
    async fn start() -> Receiver {
        Self::start_with(None).await
    }

    /// With `tls`, the receiver speaks HTTPS (HTTP/1.1).
    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let r = Receiver {
            addr: listener.local_addr().expect("addr"),
            hits: Arc::default(),
            script: Arc::default(),
            delay: Arc::default(),
            fail: Arc::default(),
            concurrency: Arc::default(),
        };
        let rr = r.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let rr = rr.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let rr = rr.clone();
                        async move { Ok::<_, Infallible>(rr.handle(req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(s).await {
                                let _ = http.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                    }
                });
            }
        });
        r
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let (id, ts, sig) = (
            h("webhook-id"),
            h("webhook-timestamp").parse::<u64>().unwrap_or(0),
            h("webhook-signature"),
        );
        let content_type = h("content-type");
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let signed = content_type == "application/json"
            && unix_now().abs_diff(ts) <= 300
            && sig == independent_signature(&key(), &id, ts, &body);
        let json: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        let channel = json["data"]["channel"].as_str().unwrap_or("").to_string();
        let text = json["data"]["body"].as_str().unwrap_or("").to_string();
        self.hits.lock().expect("lock").push(Hit {
            id,
            timestamp: ts,
            signed,
            json,
            at: Instant::now(),
        });
        {
            let mut c = self.concurrency.lock().expect("lock");
            c.now += 1;
            c.max = c.max.max(c.now);
            let n = c.per_channel.entry(channel.clone()).or_default();
            *n += 1;
            if *n > 1 {
                c.channel_overlap = true;
            }
        }
        let failing = match self.fail.lock().expect("lock").get_mut(&text) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        let default = Reply {
            status: if failing { 500 } else { 200 },
            delay: *self.delay.lock().expect("lock"),
            retry_after: None,
        };
        let reply = self
            .script
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(default);
        tokio::time::sleep(reply.delay).await;
        {
            let mut c = self.concurrency.lock().expect("lock");
            c.now -= 1;
            if let Some(n) = c.per_channel.get_mut(&channel) {
                *n -= 1;
            }
        }
        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
        *resp.status_mut() = StatusCode::from_u16(reply.status).expect("status");
        if let Some(ra) = reply.retry_after {
            resp.headers_mut()
                .insert("retry-after", ra.parse().expect("header"));
        }
        resp
    }

    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().expect("lock").extend(replies);
    }

    fn delay_every_answer(&self, d: Duration) {
        *self.delay.lock().expect("lock") = d;
    }

    /// The first `n` attempts of the message with this body answer 500.
    fn fail_first(&self, body: &str, n: usize) {
        self.fail.lock().expect("lock").insert(body.to_string(), n);
    }

    fn concurrency(&self) -> Concurrency {
        self.concurrency.lock().expect("lock").clone()
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("lock").clone()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `n` requests arrived; returns them.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Hit> {
        let ok = eventually(within, async || self.hits().len() >= n).await;
        let hits = self.hits();
        assert!(ok, "expected {n} webhook requests, got {}", hits.len());
        hits
    }
}

/// A secret file in `dir` and the `[[webhook]]` TOML for `url` with `extra` keys.
fn webhook_toml(dir: &tempfile::TempDir, url: &str, extra: &str) -> String {
    let p = dir.path().join("webhook.secret");
    std::fs::write(&p, format!("{SECRET}\n")).expect("write secret");
    format!(
        "[[webhook]]\nurl = \"{url}\"\nsecret_file = \"{}\"\n{extra}\n",
        p.display()
    )
}

/// `extra`: keys of the `[[webhook]]`, optionally followed by a `[server]` section.
async fn start(rx: &Receiver, extra: &str) -> (Crier, Upstream, tempfile::TempDir) {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, server) = extra.split_once("[server]\n").unwrap_or((extra, ""));
    // The harness takes lines before the first section as `[server]` keys.
    let toml = format!("{server}\n{}", webhook_toml(&dir, &rx.url("/hook"), hook));
    let c = Crier::start(&up.url(), &toml).await;
    (c, up, dir)
}

async fn webhook_metric(c: &Crier, name: &str, outcome: &str) -> f64 {
    metric(
        c,
        &format!("crier_webhook_deliveries_total{{outcome=\"{outcome}\",webhook=\"{name}\"}}"),
    )
    .await
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_thousand_messages_arrive_signed_and_in_publish_order() {
    let rx = Receiver::start().await;
    let (c, _up, _dir) = start(&rx, "").await;
    let name = format!("{}/hook", rx.addr);
    let mut ids = Vec::new();
    for i in 0..1000 {
        ids.push(c.publish("orders", format!("message {i}")).await);
    }
    let hits = rx.wait_for(1000, Duration::from_secs(30)).await;
    assert_eq!(hits.len(), 1000);
    for (i, h) in hits.iter().enumerate() {
        assert!(h.signed, "request {i} not verified: {h:?}");
        assert_eq!(h.json["type"], "message");
        assert_eq!(h.json["data"]["channel"], "orders");
        assert_eq!(h.json["data"]["id"], ids[i].as_str(), "order at {i}");
        assert_eq!(h.json["data"]["body"], format!("message {i}"));
        assert_eq!(h.json["data"]["content_type"], "text/plain");
        let ts = h.json["timestamp"].as_str().expect("timestamp");
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
    }
    let mut unique: Vec<_> = hits.iter().map(|h| h.id.clone()).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 1000, "every event has its own webhook-id");
    assert!(
        eventually(Duration::from_secs(5), async || {
            webhook_metric(&c, &name, "delivered").await == 1000.0
        })
        .await
    );
    let count = metric(
        &c,
        &format!("crier_webhook_duration_seconds_count{{webhook=\"{name}\"}}"),
    )
    .await;
    assert_eq!(count, Some(1000.0));
    c.shutdown().await;
}

#[tokio::test]
async fn a_websocket_clients_message_is_a_message_event_like_a_publish() {
    let rx = Receiver::start().await;
    let (c, _up, _dir) = start(
        &rx,
        "[[push]]\npath = \"/room/{channel}\"\nclient_messages = \"publish\"\n",
    )
    .await;
    let (mut ws, _) = ws_connect(&c.ws_url("/room/orders"), &[]).await;
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::text("from a websocket"),
    )
    .await
    .expect("send");
    let hits = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(hits.len(), 1);
    assert!(hits[0].signed);
    let data = &hits[0].json["data"];
    assert_eq!(hits[0].json["type"], "message");
    assert_eq!(data["channel"], "orders");
    assert_eq!(data["body"], "from a websocket");
    assert_eq!(data["content_type"], "text/plain");
    assert_eq!(data["id"], channel_info(&c, "orders").await.1["last_id"]);
    c.shutdown().await;
}

#[tokio::test]
async fn binary_bodies_go_as_base64_and_channels_filter() {
    let rx = Receiver::start().await;
    let (c, _up, _dir) = start(&rx, "channels = [\"orders.*\", \"alerts\"]").await;
    let (st, _) = publish_with(&c, "news", &[], "not for the hook").await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = publish_with(&c, "alerts2", &[], "not for the hook").await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = publish_with(
        &c,
        "orders.eu",
        &[
            ("content-type", "application/octet-stream"),
            ("crier-event", "blob"),
        ],
        vec![0u8, 159, 146, 150, 255],
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    c.publish("alerts", "fire").await;
    let hits = rx.wait_for(2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.hits().len(), 2, "only orders.* and alerts: {hits:?}");
    let d = &hits[0].json["data"];
    assert_eq!(d["channel"], "orders.eu");
    assert_eq!(d["event"], "blob");
    assert_eq!(d["content_type"], "application/octet-stream");
    assert_eq!(d["body_b64"], "AJ+Slv8=");
    assert!(d.get("body").is_none());
    assert_eq!(hits[1].json["data"]["body"], "fire");
    c.shutdown().await;
}

#[tokio::test]
async fn retried_after_500_500_with_the_same_webhook_id() {
    let rx = Receiver::start().await;
    rx.script([status(500), status(500)]);
    let (c, _up, _dir) = start(&rx, "retry = [\"100ms\", \"100ms\", \"100ms\"]").await;
    let name = format!("{}/hook", rx.addr);
    c.publish("a", "x").await;
    let hits = rx.wait_for(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits_after = rx.hits();
    assert_eq!(
        hits_after.len(),
        3,
        "delivered on the third attempt, then no more"
    );
    assert!(hits.iter().all(|h| h.signed));
    assert!(
        hits.iter().all(|h| h.id == hits[0].id),
        "same webhook-id: {hits:?}"
    );
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(90));
    assert_eq!(webhook_metric(&c, &name, "retried").await, 2.0);
    assert_eq!(webhook_metric(&c, &name, "delivered").await, 1.0);
    c.shutdown().await;
}

#[tokio::test]
async fn gives_up_when_the_schedule_runs_out_and_honours_retry_after() {
    let rx = Receiver::start().await;
    rx.script([
        Reply {
            status: 503,
            delay: Duration::ZERO,
            retry_after: Some("1"),
        },
        status(500),
        status(500),
    ]);
    let (c, _up, _dir) = start(&rx, "name = \"ops\"\nretry = [\"50ms\", \"50ms\"]").await;
    c.publish("a", "x").await;
    let hits = rx.wait_for(3, Duration::from_secs(10)).await;
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After: 1 honoured, waited {gap:?}"
    );
    assert!(hits[2].at - hits[1].at < Duration::from_millis(900));
    assert!(
        eventually(Duration::from_secs(5), async || {
            webhook_metric(&c, "ops", "failed").await == 1.0
        })
        .await
    );
    let status: serde_json::Value = client()
        .get(c.admin_url("/webhooks"))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    let w = &status["webhooks"][0];
    assert_eq!(w["name"], "ops");
    assert_eq!(w["state"], "active");
    assert_eq!(w["queue_depth"], 0);
    assert_eq!(w["last_error"], "answered 500 Internal Server Error");
    // The next event is delivered normally.
    c.publish("a", "y").await;
    let hits = rx.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(hits[3].json["data"]["body"], "y");
    c.shutdown().await;
}

#[tokio::test]
async fn a_timeout_is_retried() {
    let rx = Receiver::start().await;
    rx.script([Reply {
        status: 200,
        delay: Duration::from_secs(3),
        retry_after: None,
    }]);
    let (c, _up, _dir) = start(&rx, "timeout = \"300ms\"\nretry = [\"100ms\"]").await;
    let name = format!("{}/hook", rx.addr);
    c.publish("a", "x").await;
    let hits = rx.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(hits[0].id, hits[1].id);
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(390));
    assert!(
        hits[1].timestamp >= hits[0].timestamp,
        "a fresh timestamp per attempt"
    );
    assert!(
        eventually(Duration::from_secs(5), async || {
            webhook_metric(&c, &name, "delivered").await == 1.0
        })
        .await
    );
    assert_eq!(webhook_metric(&c, &name, "retried").await, 1.0);
    c.shutdown().await;
}

#[tokio::test]
async fn gone_disables_the_webhook_until_reload() {
    let rx = Receiver::start().await;
    rx.script([status(410)]);
    let (c, up, dir) = start(&rx, "name = \"gone\"").await;
    c.publish("a", "1").await;
    rx.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        eventually(Duration::from_secs(5), async || {
            webhook_metric(&c, "gone", "disabled").await == 1.0
        })
        .await
    );
    c.publish("a", "2").await;
    c.publish("a", "3").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.hits().len(), 1, "nothing more is sent once disabled");
    assert_eq!(webhook_metric(&c, "gone", "dropped").await, 2.0);
    let status: serde_json::Value = client()
        .get(c.admin_url("/webhooks"))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    assert_eq!(status["webhooks"][0]["state"], "disabled");

    // A reload (same config) enables it again.
    let toml = base_config(
        &up.url(),
        &c.publish_unix,
        &webhook_toml(&dir, &rx.url("/hook"), "name = \"gone\""),
    );
    let config = crier::Config::from_toml(&toml, None).expect("config");
    c.handle.reload(config).expect("reload");
    c.publish("a", "4").await;
    let hits = rx.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(hits[1].json["data"]["body"], "4");
    c.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_drops_the_oldest_and_counts_it() {
    let rx = Receiver::start().await;
    // Every answer is 500 and the retry waits long: the first event stays in flight.
    rx.script(std::iter::repeat_n(status(500), 10));
    let (c, _up, _dir) = start(
        &rx,
        "name = \"slow\"\nmax_queue = 5\nretry = [\"30s\"]\n[server]\nshutdown_timeout = \"1s\"",
    )
    .await;
    c.publish("a", "first").await;
    rx.wait_for(1, Duration::from_secs(10)).await;
    let started = Instant::now();
    for i in 0..20 {
        c.publish("a", format!("{i}")).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "publishing never waits on the webhook"
    );
    assert_eq!(webhook_metric(&c, "slow", "dropped").await, 15.0);
    assert_eq!(
        metric(&c, "crier_webhook_queue_depth{webhook=\"slow\"}").await,
        Some(5.0)
    );
    let t = Instant::now();
    c.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the drain has a deadline"
    );
}

/// An SSE subscriber on a raw socket, so the test can reset it.
async fn raw_sse(c: &Crier, channel: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(c.public)
        .await
        .expect("connect");
    s.write_all(
        format!("GET /live/{channel} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.expect("read head");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s
}

/// Closes with a TCP reset (SO_LINGER 0): the way a crashed client or a dropped network goes.
fn reset(s: tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a pointer to a live `linger` of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER");
    drop(s);
}

fn of_type(hits: &[Hit], t: &str) -> Vec<serde_json::Value> {
    hits.iter()
        .filter(|h| h.json["type"] == t)
        .map(|h| h.json["data"].clone())
        .collect()
}

#[tokio::test]
async fn a_hundred_abrupt_disconnects_give_a_hundred_unsubscribe_events() {
    let rx = Receiver::start().await;
    let (c, _up, _dir) = start(&rx, "events = [\"subscribe\", \"unsubscribe\"]").await;
    let mut subs = Vec::new();
    for _ in 0..100 {
        subs.push(raw_sse(&c, "room").await);
    }
    let hits = rx.wait_for(100, Duration::from_secs(20)).await;
    let subscribed = of_type(&hits, "subscribe");
    assert_eq!(subscribed.len(), 100);
    assert_eq!(subscribed[99]["subscribers"], 100);
    assert_eq!(subscribed[0]["transport"], "sse");
    assert!(subscribed[0]["remote"]
        .as_str()
        .is_some_and(|r| r.starts_with("127.0.0.1:")));
    for s in subs {
        reset(s);
    }
    let hits = rx.wait_for(200, Duration::from_secs(20)).await;
    assert!(hits.iter().all(|h| h.signed));
    let left = of_type(&hits, "unsubscribe");
    assert_eq!(left.len(), 100);
    let mut counts: Vec<u64> = left
        .iter()
        .filter_map(|d| d["subscribers"].as_u64())
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        (0..100).collect::<Vec<_>>(),
        "each leave counted once"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.hits().len(), 200, "no extra events");
    c.shutdown().await;
}

#[tokio::test]
async fn channel_delete_and_shutdown_send_their_events_before_exit() {
    let rx = Receiver::start().await;
    let (c, _up, _dir) = start(
        &rx,
        "events = [\"unsubscribe\", \"channel.deleted\"]\n[server]\nshutdown_timeout = \"5s\"",
    )
    .await;
    let mut deleted = SseClient::connect(&c.url("/live/doomed"), None).await;
    wait_subscribers(&c, "doomed", 1).await;
    let r = client()
        .delete(c.pub_url("doomed"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(deleted.next_within(Duration::from_secs(5)).await, Ok(None));
    let hits = rx.wait_for(2, Duration::from_secs(10)).await;
    let mut types: Vec<_> = hits.iter().map(|h| h.json["type"].to_string()).collect();
    types.sort();
    assert_eq!(types, ["\"channel.deleted\"", "\"unsubscribe\""]);
    assert_eq!(of_type(&hits, "channel.deleted")[0]["channel"], "doomed");

    // Shutdown: the subscriber is told to go, and its unsubscribe still goes out.
    let _staying = SseClient::connect(&c.url("/live/stay"), None).await;
    wait_subscribers(&c, "stay", 1).await;
    c.shutdown().await;
    let hits = rx.hits();
    let left = of_type(&hits, "unsubscribe");
    assert_eq!(left.len(), 2, "{hits:?}");
    assert_eq!(left[1]["channel"], "stay");
}

#[tokio::test]
async fn a_webhook_keeping_its_name_keeps_its_queue_across_reload() {
    let rx = Receiver::start().await;
    // Slow answers: events pile up in the queue while the config is reloaded.
    rx.script(std::iter::repeat_n(
        Reply {
            status: 200,
            delay: Duration::from_millis(100),
            retry_after: None,
        },
        20,
    ));
    let (c, up, dir) = start(&rx, "name = \"kept\"\nretry = [\"50ms\"]").await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(c.publish("a", format!("{i}")).await);
    }
    rx.wait_for(1, Duration::from_secs(5)).await;
    let toml = base_config(
        &up.url(),
        &c.publish_unix,
        &webhook_toml(
            &dir,
            &rx.url("/hook"),
            "name = \"kept\"\nretry = [\"50ms\"]",
        ),
    );
    c.handle
        .reload(crier::Config::from_toml(&toml, None).expect("config"))
        .expect("reload");
    ids.push(c.publish("a", "after").await);
    let ok = eventually(Duration::from_secs(15), async || {
        let mut seen: Vec<String> = Vec::new();
        for h in rx.hits() {
            let id = h.json["data"]["id"].as_str().unwrap_or("").to_string();
            if seen.last() != Some(&id) {
                seen.push(id);
            }
        }
        seen == ids
    })
    .await;
    // An attempt cut by the reload is sent again (at least once): consecutive repeats only.
    assert!(
        ok,
        "every event once, in order, across the reload: {:?}",
        rx.hits()
            .iter()
            .map(|h| h.json["data"]["body"].clone())
            .collect::<Vec<_>>()
    );
    c.shutdown().await;
}

#[tokio::test]
async fn https_to_an_endpoint_signed_by_a_private_ca() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der())
                .expect("key"),
        )
        .expect("server config");
    let rx = Receiver::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ck.cert.pem()).expect("write ca");
    let url = format!("https://localhost:{}/hook", rx.addr.port());
    let hooks = format!(
        "{}{}",
        webhook_toml(
            &dir,
            &url,
            &format!("name = \"private\"\nca_file = \"{}\"", ca.display())
        ),
        webhook_toml(&dir, &url, "name = \"untrusting\"\nretry = []"),
    );
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), &hooks).await;
    c.publish("a", "over tls").await;
    let hits = rx.wait_for(1, Duration::from_secs(10)).await;
    assert!(hits[0].signed);
    assert_eq!(hits[0].json["data"]["body"], "over tls");
    // Without the CA the certificate is not trusted: the attempt fails, nothing arrives.
    assert!(
        eventually(Duration::from_secs(10), async || {
            webhook_metric(&c, "untrusting", "failed").await == 1.0
        })
        .await
    );
    assert_eq!(rx.hits().len(), 1);
    let status: serde_json::Value = client()
        .get(c.admin_url("/webhooks"))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    let err = status["webhooks"][1]["last_error"].as_str().unwrap_or("");
    assert!(err.contains("certificate"), "{status}");
    c.shutdown().await;
}

#[test]
fn crier_check_names_key_and_line_of_webhook_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bad.secret"), "s3cret\n").expect("write");
    std::fs::write(
        dir.path().join("crier.toml"),
        "[[webhook]]\nurl = \"https://a.example/h\"\nsecret_file = \"bad.secret\"\nevents = [\"message\", \"published\"]\n\
         [[webhook]]\nurl = \"https://b.example/h\"\nsecret_file = \"missing.secret\"\n",
    )
    .expect("write");
    let out = common::process::run_cli(&["check", "--config", "crier.toml"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("crier.toml:3:15: webhook.secret_file: bad secret format"),
        "{err}"
    );
    assert!(
        err.contains("crier.toml:4:22: webhook.events: unknown event \"published\""),
        "{err}"
    );
    assert!(
        err.contains("crier.toml:7:15: webhook.secret_file:")
            && err.contains("missing.secret: cannot read"),
        "{err}"
    );
}

#[tokio::test]
async fn unsubscribe_on_clean_close_and_long_poll_timeout_per_transport() {
    let rx = Receiver::start().await;
    let (c, _up, _dir) = start(
        &rx,
        "events = [\"subscribe\", \"unsubscribe\"]\n[[push]]\npath = \"/live/{channel}\"\nlongpoll_timeout = \"200ms\"",
    )
    .await;
    // WebSocket: a clean close handshake.
    let (mut ws, _) = ws_connect(&c.ws_url("/live/w"), &[]).await;
    rx.wait_for(1, Duration::from_secs(10)).await;
    futures_util::SinkExt::close(&mut ws).await.expect("close");
    rx.wait_for(2, Duration::from_secs(10)).await;
    // SSE: the client goes away (FIN).
    let sse = SseClient::connect(&c.url("/live/s"), None).await;
    rx.wait_for(3, Duration::from_secs(10)).await;
    drop(sse);
    rx.wait_for(4, Duration::from_secs(10)).await;
    // Long-poll: nothing arrives within longpoll_timeout (304).
    let p = longpoll(&client(), &c.url("/live/l"), None).await;
    assert_eq!(p.status, StatusCode::NOT_MODIFIED);
    let hits = rx.wait_for(6, Duration::from_secs(10)).await;
    let seen: Vec<(String, String, String)> = hits
        .iter()
        .map(|h| {
            (
                h.json["type"].as_str().unwrap_or("").to_string(),
                h.json["data"]["transport"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                h.json["data"]["channel"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = [
        ("subscribe", "websocket", "w"),
        ("unsubscribe", "websocket", "w"),
        ("subscribe", "sse", "s"),
        ("unsubscribe", "sse", "s"),
        ("subscribe", "longpoll", "l"),
        ("unsubscribe", "longpoll", "l"),
    ]
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
    assert_eq!(seen, want);
    c.shutdown().await;
}

#[tokio::test]
async fn reload_without_the_webhook_stops_it() {
    let rx = Receiver::start().await;
    let (c, up, _dir) = start(&rx, "name = \"old\"").await;
    c.publish("a", "1").await;
    rx.wait_for(1, Duration::from_secs(10)).await;
    let toml = base_config(&up.url(), &c.publish_unix, "");
    c.handle
        .reload(crier::Config::from_toml(&toml, None).expect("config"))
        .expect("reload");
    c.publish("a", "2").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.hits().len(), 1, "no webhook after the reload");
    let status: serde_json::Value = client()
        .get(c.admin_url("/webhooks"))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    assert_eq!(status["webhooks"], serde_json::json!([]));
    assert!(
        eventually(Duration::from_secs(5), async || {
            metric(&c, "crier_webhook_queue_depth{webhook=\"old\"}")
                .await
                .is_none()
        })
        .await,
        "the removed webhook's series are gone"
    );
    c.shutdown().await;
}

/// The drain on its own (`Server::run` calls it after the subscribers are gone): what can go out
/// within the deadline goes; the rest is counted.
#[tokio::test]
async fn drain_delivers_within_the_deadline_and_counts_the_rest() {
    let ok = Receiver::start().await;
    let failing = Receiver::start().await;
    failing.script(std::iter::repeat_n(status(500), 100));
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "{}{}",
        webhook_toml(&dir, &ok.url("/hook"), "name = \"ok\""),
        webhook_toml(
            &dir,
            &failing.url("/hook"),
            "name = \"failing\"\nretry = [\"1h\"]"
        ),
    );
    let config = Arc::new(crier::Config::from_toml(&toml, None).expect("config"));
    let metrics = Arc::new(crier::metrics::Metrics::new());
    let hub = crier::hub::Hub::new(config.clone(), metrics.clone());
    let hooks = crier::webhook::Webhooks::new(hub.clone(), metrics);
    let keys = crier::keys::Keys::load(&config).expect("keys");
    hooks.install(hooks.prepare(&config, &keys).expect("prepare"));
    for i in 0..50 {
        hub.publish(
            &crier::model::ChannelName::new("a").expect("name"),
            crier::hub::NewMessage {
                event: None,
                content_type: http::HeaderValue::from_static("text/plain"),
                body: Bytes::from(format!("{i}")),
                headers: http::HeaderMap::new(),
            },
        )
        .await
        .expect("publish");
    }
    let t = Instant::now();
    let left = hooks.drain(Duration::from_millis(500)).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "bounded by the deadline"
    );
    assert_eq!(
        left, 50,
        "the failing endpoint still held all 50 (one was in flight)"
    );
    assert_eq!(ok.hits().len(), 50, "the healthy endpoint got everything");
    let n = failing.hits().len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(failing.hits().len(), n, "nothing is sent after the drain");
}

/// The binary on SIGTERM: the drain gives up at `shutdown_timeout`, logs how many events were
/// left, and exits 0.
#[tokio::test]
async fn sigterm_logs_the_undelivered_count_and_exits_zero() {
    use std::io::BufRead;
    let rx = Receiver::start().await;
    rx.script(std::iter::repeat_n(status(500), 100));
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("publish.sock");
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_timeout = \"300ms\"\n\
         [publish]\nunix = \"{}\"\nlisten = []\n[admin]\nlisten = \"\"\n{}",
        sock.display(),
        webhook_toml(&dir, &rx.url("/hook"), "retry = [\"1h\"]"),
    );
    let config = dir.path().join("crier.toml");
    std::fs::write(&config, toml).expect("write config");
    let mut child = std::process::Command::new(common::process::crier_bin())
        .arg("--config")
        .arg(&config)
        .env("CRIER_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn crier");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains("crier is ready")) {
        log.push(
            lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("crier did not start: {log:?}")),
        );
    }
    for i in 0..3 {
        let req = Request::post("/pub/a")
            .header("host", "localhost")
            .body(Full::new(Bytes::from(format!("{i}"))))
            .expect("request");
        let (st, body) = unix_request(&sock, req).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    rx.wait_for(1, Duration::from_secs(10)).await;
    // SAFETY: signalling our own child by its pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let exit = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join");
    assert_eq!(exit.code(), Some(0));
    // Until the reader thread hits EOF (the channel disconnects).
    while let Ok(l) = lines.recv_timeout(Duration::from_secs(5)) {
        log.push(l);
    }
    assert!(
        log.iter()
            .any(|l| l.contains("3 webhook event(s) left undelivered")),
        "{log:#?}"
    );
}

/// `[[webhook]] max_in_flight`: publishes to `channels` channels, `per` messages each,
/// interleaved (a0 b0 c0 ... a1 b1 ...); returns the ids in publish order per channel.
async fn publish_interleaved(
    c: &Crier,
    channels: &[&str],
    per: usize,
) -> std::collections::HashMap<String, Vec<String>> {
    let mut ids: std::collections::HashMap<String, Vec<String>> = Default::default();
    for i in 0..per {
        for ch in channels {
            let id = c.publish(ch, format!("{ch}-{i}")).await;
            ids.entry(ch.to_string()).or_default().push(id);
        }
    }
    ids
}

/// The ids each channel's requests carried, in arrival order, consecutive repeats (a retry)
/// folded into one.
fn arrived_per_channel(hits: &[Hit]) -> std::collections::HashMap<String, Vec<String>> {
    let mut seen: std::collections::HashMap<String, Vec<String>> = Default::default();
    for h in hits {
        let ch = h.json["data"]["channel"].as_str().unwrap_or("").to_string();
        let id = h.json["data"]["id"].as_str().unwrap_or("").to_string();
        let list = seen.entry(ch).or_default();
        if list.last() != Some(&id) {
            list.push(id);
        }
    }
    seen
}

#[tokio::test]
async fn several_channels_go_out_side_by_side_up_to_max_in_flight_in_order_per_channel() {
    let rx = Receiver::start().await;
    rx.delay_every_answer(Duration::from_millis(50));
    let (c, _up, _dir) = start(&rx, "name = \"wide\"\nmax_in_flight = 4").await;
    let channels = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let ids = publish_interleaved(&c, &channels, 10).await;
    let hits = rx.wait_for(80, Duration::from_secs(30)).await;
    assert!(
        eventually(Duration::from_secs(5), async || {
            webhook_metric(&c, "wide", "delivered").await == 80.0
        })
        .await
    );
    let conc = rx.concurrency();
    assert!(conc.max > 1, "requests overlapped: {conc:?}");
    assert!(conc.max <= 4, "never more than max_in_flight: {conc:?}");
    assert!(
        !conc.channel_overlap,
        "a channel never had two requests in flight"
    );
    assert_eq!(arrived_per_channel(&hits), ids, "publish order per channel");
    assert!(hits.iter().all(|h| h.signed));
    c.shutdown().await;
}

#[tokio::test]
async fn a_retried_event_holds_its_channel_and_only_its_channel() {
    let rx = Receiver::start().await;
    rx.delay_every_answer(Duration::from_millis(50));
    // The first attempt of b-3 fails; its retry comes 3 s later.
    rx.fail_first("b-3", 1);
    let (c, _up, _dir) = start(&rx, "name = \"r\"\nmax_in_flight = 8\nretry = [\"3s\"]").await;
    let mut ids = publish_interleaved(&c, &["a", "b"], 6).await;
    let failed = eventually(Duration::from_secs(10), async || {
        rx.hits().iter().any(|h| h.json["data"]["body"] == "b-3")
    })
    .await;
    assert!(failed, "b-3 was attempted");
    // While b waits for its retry, another channel's events go out.
    for i in 0..5 {
        let id = c.publish("c", format!("c-{i}")).await;
        ids.entry("c".into()).or_default().push(id);
    }
    let hits = rx.wait_for(6 + 7 + 5, Duration::from_secs(30)).await;
    let b3: Vec<usize> = (0..hits.len())
        .filter(|&i| hits[i].json["data"]["body"] == "b-3")
        .collect();
    assert_eq!(b3.len(), 2, "b-3 sent twice (failed, then delivered)");
    assert_eq!(
        hits[b3[0]].id, hits[b3[1]].id,
        "same webhook-id on the retry"
    );
    let between: Vec<_> = hits[b3[0]..b3[1]]
        .iter()
        .map(|h| h.json["data"]["body"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        (0..5).all(|i| between.contains(&format!("c-{i}"))),
        "channel c did not wait for b's retry: {between:?}"
    );
    assert!(
        !between.iter().any(|b| b == "b-4" || b == "b-5"),
        "b's later events waited for b-3: {between:?}"
    );
    assert_eq!(arrived_per_channel(&hits), ids, "publish order per channel");
    assert!(!rx.concurrency().channel_overlap);
    assert!(
        eventually(Duration::from_secs(5), async || {
            webhook_metric(&c, "r", "delivered").await == 17.0
        })
        .await
    );
    assert_eq!(webhook_metric(&c, "r", "retried").await, 1.0);
    c.shutdown().await;
}

#[test]
fn max_in_flight_out_of_range_is_refused_with_key_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (value, want) in [
        ("0", "webhook.max_in_flight: 0 is out of range (1..=1024)"),
        (
            "1025",
            "webhook.max_in_flight: 1025 is out of range (1..=1024)",
        ),
        ("\"8\"", "invalid type"),
    ] {
        let hook = webhook_toml(
            &dir,
            "http://127.0.0.1:9/hook",
            &format!("max_in_flight = {value}"),
        );
        let err = crier::keys::load_str(&hook, Some(std::path::Path::new("c.toml")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(want), "max_in_flight = {value}: {err}");
        assert!(err.contains("c.toml:4:"), "names the line: {err}");
    }
}

#[tokio::test]
async fn per_channel_order_holds_across_a_reload_with_several_in_flight() {
    let rx = Receiver::start().await;
    rx.delay_every_answer(Duration::from_millis(100));
    let keys = "name = \"kept\"\nmax_in_flight = 3\nretry = [\"50ms\"]";
    let (c, up, dir) = start(&rx, keys).await;
    let mut ids = publish_interleaved(&c, &["a", "b", "c", "d"], 5).await;
    rx.wait_for(2, Duration::from_secs(5)).await;
    let toml = base_config(
        &up.url(),
        &c.publish_unix,
        &webhook_toml(&dir, &rx.url("/hook"), keys),
    );
    c.handle
        .reload(crier::Config::from_toml(&toml, None).expect("config"))
        .expect("reload");
    for ch in ["a", "b", "c", "d"] {
        let id = c.publish(ch, format!("{ch}-after")).await;
        ids.entry(ch.to_string()).or_default().push(id);
    }
    // An attempt cut by the reload is sent again (at least once): consecutive repeats only.
    let ok = eventually(Duration::from_secs(20), async || {
        arrived_per_channel(&rx.hits()) == ids
    })
    .await;
    assert!(
        ok,
        "every event, in order per channel, across the reload: {:?}",
        arrived_per_channel(&rx.hits())
    );
    c.shutdown().await;
}
