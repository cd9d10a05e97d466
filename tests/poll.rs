//! `[[poll]]`: crier polls an upstream URL and publishes when the answer changes. A real app
//! whose answer the test changes, real SSE subscribers: change detection by ETag (with 304s)
//! and by hash, the headers a poll carries, upstream errors and an upstream down then up,
//! subscriber-driven start and stop, two subscribers seeing one change once each, reload and
//! shutdown.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// The app: `/score` answers the current value with an ETag (and 304 to a matching
/// `If-None-Match`); `/dated` with a Last-Modified (and 304 to a matching
/// `If-Modified-Since`); `/plain` answers it with no validator. `status` set: every answer is
/// that status.
#[derive(Clone, Default)]
struct App {
    value: Arc<Mutex<(u64, String)>>,
    hits: Arc<AtomicUsize>,
    last: Arc<Mutex<HeaderMap>>,
    status: Arc<AtomicU16>,
    /// Set: every answer waits this long (ms).
    delay_ms: Arc<AtomicU64>,
    /// Requests being answered now, and the most ever at once.
    inflight: Arc<AtomicUsize>,
    max_inflight: Arc<AtomicUsize>,
}

impl App {
    fn set(&self, v: &str) {
        let mut g = self.value.lock().expect("app state");
        g.0 += 1;
        g.1 = v.to_string();
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn last(&self, name: &str) -> Option<String> {
        self.last
            .lock()
            .expect("app state")
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    async fn start(&self) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind app");
        let addr = l.local_addr().expect("addr");
        self.serve(l);
        addr
    }

    fn serve(&self, l: tokio::net::TcpListener) {
        let app = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let app = app.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let app = app.clone();
                        async move {
                            let now = app.inflight.fetch_add(1, Ordering::SeqCst) + 1;
                            app.max_inflight.fetch_max(now, Ordering::SeqCst);
                            let delay = app.delay_ms.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            app.inflight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(app.answer(req))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    }

    fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        *self.last.lock().expect("app state") = req.headers().clone();
        let status = self.status.load(Ordering::SeqCst);
        if status != 0 {
            return Response::builder()
                .status(status)
                .body(Full::new(Bytes::from("broken")))
                .expect("response");
        }
        let (version, value) = self.value.lock().expect("app state").clone();
        let etag = format!("\"v{version}\"");
        let b = Response::builder().header("content-type", "application/json");
        if req.uri().path() == "/score" {
            if req
                .headers()
                .get("if-none-match")
                .and_then(|v| v.to_str().ok())
                == Some(&etag)
            {
                return b
                    .status(304)
                    .body(Full::new(Bytes::new()))
                    .expect("response");
            }
            return b
                .header("etag", etag)
                .body(Full::new(Bytes::from(value)))
                .expect("response");
        }
        if req.uri().path() == "/dated" {
            // Last-Modified only: one version per second of a fixed day.
            let date = format!("Tue, 01 Dec 2026 10:00:{:02} GMT", version % 60);
            if req
                .headers()
                .get("if-modified-since")
                .and_then(|v| v.to_str().ok())
                == Some(&date)
            {
                return b
                    .status(304)
                    .body(Full::new(Bytes::new()))
                    .expect("response");
            }
            return b
                .header("last-modified", date)
                .body(Full::new(Bytes::from(value)))
                .expect("response");
        }
        b.body(Full::new(Bytes::from(value))).expect("response")
    }
}

fn sample(poll: &str, result: &str) -> String {
    format!("crier_poll_total{{poll=\"{poll}\",result=\"{result}\"}}")
}

async fn count(c: &Crier, poll: &str, result: &str) -> f64 {
    metric(c, &sample(poll, result)).await.unwrap_or(0.0)
}

async fn wait_count_at_least(c: &Crier, poll: &str, result: &str, n: f64) {
    let ok = eventually(Duration::from_secs(10), async || {
        count(c, poll, result).await >= n
    })
    .await;
    assert!(ok, "{} never reached {n}", sample(poll, result));
}

async fn next(sse: &mut SseClient) -> SseEvent {
    sse.next_within(Duration::from_secs(10))
        .await
        .expect("an event in time")
        .expect("the stream is open")
}

fn poll(url: &str, channel: &str, extra: &str) -> String {
    format!("[[poll]]\nurl = \"{url}\"\nchannel = \"{channel}\"\ninterval = \"50ms\"\n{extra}\n")
}

#[tokio::test]
async fn an_etag_change_is_published_once_and_304s_publish_nothing() {
    let app = App::default();
    app.set("{\"home\":0}");
    let addr = app.start().await;
    let extra =
        "only_while_subscribed = false\nheaders = { Authorization = \"Bearer poll-token\" }";
    // With no subscriber needed, the first answer may be published before the subscriber
    // comes: it gets the buffer first.
    let push = "[[push]]\npath = \"/live/{channel}\"\nfirst_message = \"oldest\"\n";
    let c = Crier::start(
        &format!("http://{addr}"),
        &format!("{push}{}", poll("/score", "score", extra)),
    )
    .await;
    let mut sse = SseClient::connect(&c.url("/live/score"), None).await;
    let first = next(&mut sse).await;
    assert_eq!(first.data, "{\"home\":0}");
    wait_count_at_least(&c, "score", "not_modified", 3.0).await;
    assert_eq!(app.last("if-none-match").as_deref(), Some("\"v1\""));
    assert_eq!(count(&c, "score", "changed").await, 1.0);
    // The poll carries the proxy's headers and the configured ones.
    assert_eq!(app.last("host"), Some(addr.to_string()));
    assert_eq!(app.last("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(app.last("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(app.last("x-forwarded-host"), Some(addr.to_string()));
    assert_eq!(
        app.last("authorization").as_deref(),
        Some("Bearer poll-token")
    );

    app.set("{\"home\":1}");
    assert_eq!(next(&mut sse).await.data, "{\"home\":1}");
    let seen = count(&c, "score", "not_modified").await;
    wait_count_at_least(&c, "score", "not_modified", seen + 3.0).await;
    c.publish("score", "marker").await;
    assert_eq!(
        next(&mut sse).await.data,
        "marker",
        "the change was published once"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn last_modified_is_sent_back_and_a_304_is_no_change() {
    let app = App::default();
    app.set("one");
    let addr = app.start().await;
    let c = Crier::start(&format!("http://{addr}"), &poll("/dated", "dated", "")).await;
    let mut sse = SseClient::connect(&c.url("/live/dated"), None).await;
    assert_eq!(next(&mut sse).await.data, "one");
    wait_count_at_least(&c, "dated", "not_modified", 3.0).await;
    assert_eq!(
        app.last("if-modified-since").as_deref(),
        Some("Tue, 01 Dec 2026 10:00:01 GMT")
    );
    app.set("two");
    assert_eq!(next(&mut sse).await.data, "two");
    c.shutdown().await;
}

#[tokio::test]
async fn without_validators_a_change_is_found_by_the_body() {
    let app = App::default();
    app.set("a");
    let addr = app.start().await;
    let c = Crier::start(&format!("http://{addr}"), &poll("/plain", "plain", "")).await;
    let mut sse = SseClient::connect(&c.url("/live/plain"), None).await;
    assert_eq!(
        next(&mut sse).await.data,
        "a",
        "the first answer, once subscribed"
    );
    wait_count_at_least(&c, "plain", "unchanged", 3.0).await;
    assert_eq!(app.last("if-none-match"), None);
    app.set("b");
    assert_eq!(next(&mut sse).await.data, "b");
    // A new version with the same body is no change.
    app.set("b");
    let seen = count(&c, "plain", "unchanged").await;
    wait_count_at_least(&c, "plain", "unchanged", seen + 3.0).await;
    c.publish("plain", "marker").await;
    assert_eq!(next(&mut sse).await.data, "marker");
    assert_eq!(count(&c, "plain", "changed").await, 2.0);
    c.shutdown().await;
}

#[tokio::test]
async fn two_subscribers_get_one_polls_change_once_each() {
    let app = App::default();
    app.set("1");
    let addr = app.start().await;
    let c = Crier::start(&format!("http://{addr}"), &poll("/score", "s", "")).await;
    let mut a = SseClient::connect(&c.url("/live/s"), None).await;
    assert_eq!(next(&mut a).await.data, "1");
    let mut b = SseClient::connect(&c.url("/live/s"), None).await;
    wait_subscribers(&c, "s", 2).await;
    app.set("2");
    assert_eq!(next(&mut a).await.data, "2");
    assert_eq!(next(&mut b).await.data, "2");
    c.publish("s", "marker").await;
    assert_eq!(next(&mut a).await.data, "marker");
    assert_eq!(next(&mut b).await.data, "marker");
    c.shutdown().await;
}

#[tokio::test]
async fn errors_publish_nothing_and_the_poll_recovers() {
    let app = App::default();
    app.set("ok");
    let addr = app.start().await;
    app.status.store(500, Ordering::SeqCst);
    let c = Crier::start(
        &format!("http://{addr}"),
        &poll("/plain", "e", "only_while_subscribed = false"),
    )
    .await;
    wait_count_at_least(&c, "e", "status", 2.0).await;
    assert_eq!(
        channel_info(&c, "e").await.1["published"]
            .as_u64()
            .unwrap_or(0),
        0
    );
    let mut sse = SseClient::connect(&c.url("/live/e"), None).await;
    app.status.store(0, Ordering::SeqCst);
    assert_eq!(next(&mut sse).await.data, "ok");
    c.shutdown().await;
}

#[tokio::test]
async fn a_slow_answer_times_out_and_publishes_nothing() {
    let app = App::default();
    app.set("late");
    app.delay_ms.store(2000, Ordering::SeqCst);
    let addr = app.start().await;
    let c = Crier::start(
        &format!("http://{addr}"),
        &poll(
            "/plain",
            "t",
            "only_while_subscribed = false\ntimeout = \"100ms\"",
        ),
    )
    .await;
    wait_count_at_least(&c, "t", "timeout", 2.0).await;
    assert_eq!(
        channel_info(&c, "t").await.1["published"]
            .as_u64()
            .unwrap_or(0),
        0
    );
    let mut sse = SseClient::connect(&c.url("/live/t"), None).await;
    app.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(next(&mut sse).await.data, "late", "it recovers");
    c.shutdown().await;
}

#[tokio::test]
async fn a_slow_upstream_never_has_two_polls_in_flight() {
    let app = App::default();
    app.set("s");
    app.delay_ms.store(200, Ordering::SeqCst);
    let addr = app.start().await;
    let c = Crier::start(
        &format!("http://{addr}"),
        &poll(
            "/plain",
            "slow",
            "only_while_subscribed = false\ntimeout = \"5s\"",
        ),
    )
    .await;
    assert!(eventually(Duration::from_secs(10), async || app.hits() >= 4).await);
    assert_eq!(app.max_inflight.load(Ordering::SeqCst), 1);
    c.shutdown().await;
}

#[tokio::test]
async fn an_answer_over_max_message_size_publishes_nothing() {
    let app = App::default();
    app.set(&"x".repeat(2048));
    let addr = app.start().await;
    let c = Crier::start(
        &format!("http://{addr}"),
        &format!(
            "[channels]\nmax_message_size = \"1KiB\"\n{}",
            poll("/plain", "big", "only_while_subscribed = false")
        ),
    )
    .await;
    wait_count_at_least(&c, "big", "too_large", 2.0).await;
    assert_eq!(
        channel_info(&c, "big").await.1["published"]
            .as_u64()
            .unwrap_or(0),
        0
    );
    c.shutdown().await;
}

#[tokio::test]
async fn an_upstream_down_then_up_is_counted_then_published() {
    let addr = dead_addr().await;
    let c = Crier::start(
        &format!("http://{addr}"),
        &poll("/plain", "d", "only_while_subscribed = false"),
    )
    .await;
    wait_count_at_least(&c, "d", "error", 2.0).await;
    let mut sse = SseClient::connect(&c.url("/live/d"), None).await;
    let app = App::default();
    app.set("back");
    app.serve(tokio::net::TcpListener::bind(addr).await.expect("rebind"));
    assert_eq!(next(&mut sse).await.data, "back");
    c.shutdown().await;
}

#[tokio::test]
async fn a_poll_runs_only_while_its_channel_has_subscribers() {
    let app = App::default();
    app.set("x");
    let addr = app.start().await;
    let c = Crier::start(
        &format!("http://{addr}"),
        &poll("/plain", "w", "linger = \"100ms\""),
    )
    .await;
    // Nobody subscribed: a few intervals pass without a poll.
    c.publish("other", "tick").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.hits(), 0, "no subscriber, no poll");

    let mut sse = SseClient::connect(&c.url("/live/w"), None).await;
    assert_eq!(
        next(&mut sse).await.data,
        "x",
        "the first subscriber starts it"
    );
    let before = app.hits();
    assert!(eventually(Duration::from_secs(10), async || app.hits() > before + 2).await);
    drop(sse);
    // After the last one left (and the linger), the polls stop.
    let stopped = eventually(Duration::from_secs(10), async || {
        let h = app.hits();
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.hits() == h
    })
    .await;
    assert!(stopped, "the poll stopped");
    let paused = app.hits();
    let mut sse = SseClient::connect(&c.url("/live/w"), None).await;
    assert!(
        eventually(Duration::from_secs(10), async || app.hits() > paused).await,
        "a new subscriber starts it again"
    );
    app.set("y");
    assert_eq!(
        next(&mut sse).await.data,
        "y",
        "what it knew survived the pause"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn reload_removes_and_adds_polls_and_shutdown_stops_them() {
    let app = App::default();
    app.set("r");
    let addr = app.start().await;
    let c = Crier::start(
        &format!("http://{addr}"),
        &poll("/plain", "r", "only_while_subscribed = false"),
    )
    .await;
    assert!(eventually(Duration::from_secs(10), async || app.hits() > 2).await);
    let with_polls = |toml: &str| {
        let mut cfg = c.handle.config().as_ref().clone();
        cfg.polls = crier::Config::from_toml(toml, None).expect("valid").polls;
        cfg
    };
    c.handle.reload(with_polls("")).expect("reload");
    let stopped = eventually(Duration::from_secs(10), async || {
        let h = app.hits();
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.hits() == h
    })
    .await;
    assert!(stopped, "the removed poll stopped");
    let mut sse = SseClient::connect(&c.url("/live/r2"), None).await;
    c.handle
        .reload(with_polls(&poll(
            "/score",
            "r2",
            "only_while_subscribed = false",
        )))
        .expect("reload");
    assert_eq!(next(&mut sse).await.data, "r", "the added poll runs");
    drop(sse);
    c.shutdown().await;
    let h = app.hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.hits(), h, "no poll after shutdown");
}
