//! `[[publish_on]]`: proxied writes that the upstream accepted publish a message, with no
//! publish call. A real app behind crier, real SSE subscribers, both proxy paths (hyper, and
//! a connection the HTTP/1.1 fast path serves), aborted responses, non-matching statuses and
//! methods, the three body modes, a body over `max_message_size`, and reload.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::raw::RawConn;
use common::*;
use http::{Request, Response};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type UpBody = UnsyncBoxBody<Bytes, BoxError>;

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// The app: a JSON order API that knows nothing of crier.
/// - `/api/orders/{id}`: reads the body, answers 201 `{"order": id, "got": body}`;
/// - `/api/events/{id}`: like orders, with `Crier-Event: order.saved` on the response;
/// - `/api/fail/{id}`: 500;
/// - `/api/abort/{id}`: 200 that promises 100 bytes and dies after 7;
/// - `/api/stall/{id}`: 200, a first chunk, then nothing for 30 s;
/// - `/api/big/{id}`: 200 with 4 KiB;
/// - anything else: 200 "item <path>".
async fn app() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), service_fn(handle))
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

async fn handle(req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_string();
    let mut segs = path.trim_start_matches('/').split('/');
    let (_, kind, id) = (
        segs.next(),
        segs.next().unwrap_or(""),
        segs.next().unwrap_or(""),
    );
    let id = id.to_string();
    let json = |status: u16, v: serde_json::Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(v.to_string()))
            .expect("response")
    };
    let resp = match kind {
        "orders" | "events" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut r = json(
                201,
                serde_json::json!({"order": id, "got": String::from_utf8_lossy(&body)}),
            );
            if kind == "events" {
                r.headers_mut()
                    .insert("crier-event", "order.saved".parse().expect("value"));
            }
            r
        }
        "fail" => json(500, serde_json::json!({"error": "db down"})),
        "abort" => {
            // The head and the first bytes go out before the crash.
            let s = futures_util::stream::unfold(0u8, |n| async move {
                if n == 0 {
                    return Some((
                        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"partial"))),
                        1,
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Err(BoxError::from("app crashed")), 2))
            });
            Response::builder()
                .header("content-length", "100")
                .body(StreamBody::new(s).boxed_unsync())
                .expect("response")
        }
        "stall" => {
            let s = futures_util::stream::unfold(0u8, |n| async move {
                if n == 0 {
                    return Some((
                        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"first"))),
                        1,
                    ));
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
                None
            });
            Response::new(StreamBody::new(s).boxed_unsync())
        }
        "big" => Response::new(full(vec![b'x'; 4096])),
        _ => Response::new(full(format!("item {path}"))),
    };
    Ok(resp)
}

const ORDERS: &str =
    "[[publish_on]]\nname = \"orders\"\npath = \"/api/orders/{id}\"\nchannel = \"orders.{id}\"\n";

fn sample(rule: &str, result: &str) -> String {
    format!("crier_publish_on_total{{result=\"{result}\",rule=\"{rule}\"}}")
}

async fn count(c: &Crier, rule: &str, result: &str) -> f64 {
    metric(c, &sample(rule, result)).await.unwrap_or(0.0)
}

async fn wait_count(c: &Crier, rule: &str, result: &str, n: f64) {
    let ok = eventually(Duration::from_secs(10), async || {
        count(c, rule, result).await == n
    })
    .await;
    assert!(
        ok,
        "{} never reached {n} (is {})",
        sample(rule, result),
        count(c, rule, result).await
    );
}

async fn published(c: &Crier, channel: &str) -> u64 {
    channel_info(c, channel).await.1["published"]
        .as_u64()
        .unwrap_or(0)
}

async fn next(sse: &mut SseClient) -> SseEvent {
    sse.next_within(Duration::from_secs(10))
        .await
        .expect("an event in time")
        .expect("the stream is open")
}

#[tokio::test]
async fn a_successful_write_publishes_the_response_to_the_channel_its_path_names() {
    let c = Crier::start(&app().await, ORDERS).await;
    let mut sse = SseClient::connect(&c.url("/live/orders.7"), None).await;
    let r = client()
        .post(c.url("/api/orders/7"))
        .body("qty=2")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    let body = r.text().await.expect("body");
    assert_eq!(
        body, r#"{"got":"qty=2","order":"7"}"#,
        "the client gets the app's answer"
    );
    let ev = next(&mut sse).await;
    assert_eq!(ev.data, body, "the message is the response body");
    assert!(ev.id.is_some(), "a hub id");
    assert_eq!(ev.event, None);
    wait_count(&c, "orders", "published", 1.0).await;

    // PUT and DELETE are in the default method list; GET is not.
    let r = client()
        .get(c.url("/api/orders/7"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 201);
    for m in [reqwest::Method::PUT, reqwest::Method::DELETE] {
        let r = client()
            .request(m, c.url("/api/orders/7"))
            .send()
            .await
            .expect("write");
        assert_eq!(r.status(), 201);
        assert!(next(&mut sse).await.data.contains("\"order\":\"7\""));
    }
    wait_count(&c, "orders", "published", 3.0).await;
    assert_eq!(
        published(&c, "orders.7").await,
        3,
        "the GET published nothing"
    );
    // Paths the template does not match publish nothing.
    for p in ["/api/orders/7/items", "/api/orders/", "/api/order/7"] {
        client().post(c.url(p)).send().await.expect("post");
    }
    assert_eq!(count(&c, "orders", "published").await, 3.0);
    c.shutdown().await;
}

#[tokio::test]
async fn statuses_and_methods_that_do_not_match_publish_nothing() {
    let rules = "[[publish_on]]\nname = \"fail\"\npath = \"/api/fail/{id}\"\nchannel = \"f.{id}\"\n\
                 [[publish_on]]\nname = \"listed\"\npath = \"/api/fail/{id}/x\"\nchannel = \"g.{id}\"\nstatus = [500]\n\
                 [[publish_on]]\nname = \"patch\"\npath = \"/api/orders/{id}\"\nchannel = \"p.{id}\"\nmethod = [\"PATCH\"]\n";
    let c = Crier::start(&app().await, rules).await;
    let r = client()
        .post(c.url("/api/fail/1"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 500);
    wait_count(&c, "fail", "status", 1.0).await;
    assert_eq!(count(&c, "fail", "published").await, 0.0);
    assert_eq!(published(&c, "f.1").await, 0);

    let r = client()
        .post(c.url("/api/orders/1"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    let r = client()
        .patch(c.url("/api/orders/1"))
        .body("p")
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 201);
    wait_count(&c, "patch", "published", 1.0).await;
    assert_eq!(published(&c, "p.1").await, 1, "only the PATCH");
    c.shutdown().await;
}

#[tokio::test]
async fn a_status_list_rule_publishes_the_listed_codes() {
    let rules = "[[publish_on]]\nname = \"errors\"\npath = \"/api/fail/{id}\"\nchannel = \"errors\"\nstatus = [500, 503]\nbody = \"none\"\n";
    let c = Crier::start(&app().await, rules).await;
    let mut sse = SseClient::connect(&c.url("/live/errors"), None).await;
    client()
        .delete(c.url("/api/fail/9"))
        .send()
        .await
        .expect("delete");
    let v: serde_json::Value = serde_json::from_str(&next(&mut sse).await.data).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"method": "DELETE", "path": "/api/fail/9", "status": 500})
    );
    c.shutdown().await;
}

#[tokio::test]
async fn the_three_body_modes_and_the_content_type_and_event_they_carry() {
    let rules = "[[publish_on]]\nname = \"req\"\npath = \"/api/orders/{id}\"\nchannel = \"req.{id}\"\nbody = \"request\"\n\
                 [[publish_on]]\nname = \"none\"\npath = \"/api/events/{id}\"\nchannel = \"none.{id}\"\nbody = \"none\"\n\
                 [[publish_on]]\nname = \"forced\"\npath = \"/api/big/{id}\"\nchannel = \"forced.{id}\"\nevent = \"big.one\"\ncontent_type = \"text/x-big\"\n";
    let c = Crier::start(
        &app().await,
        &format!("[channels]\nmax_message_size = \"8KiB\"\n{rules}"),
    )
    .await;

    // body = "request": the client's body, its content type and its Crier-Event.
    let mut sse = SseClient::connect(&c.url("/live/req.1"), None).await;
    let r = client()
        .post(c.url("/api/orders/1"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("crier-event", "form.sent")
        .body("name=ada")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    assert!(
        r.text().await.expect("body").contains("name=ada"),
        "the app got the body"
    );
    let ev = next(&mut sse).await;
    assert_eq!(
        (ev.data.as_str(), ev.event.as_deref()),
        ("name=ada", Some("form.sent"))
    );

    // body = "none": the small JSON; the event follows the response's Crier-Event.
    let mut sse = SseClient::connect(&c.url("/live/none.2"), None).await;
    client()
        .put(c.url("/api/events/2?x=1"))
        .body("zzz")
        .send()
        .await
        .expect("put");
    let ev = next(&mut sse).await;
    assert_eq!(ev.event.as_deref(), Some("order.saved"));
    let v: serde_json::Value = serde_json::from_str(&ev.data).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"method": "PUT", "path": "/api/events/2", "status": 201})
    );

    // The config overrides both.
    let mut sse = SseClient::connect(&c.url("/live/forced.3"), None).await;
    client()
        .post(c.url("/api/big/3"))
        .send()
        .await
        .expect("post");
    let ev = next(&mut sse).await;
    assert_eq!(ev.event.as_deref(), Some("big.one"));
    assert_eq!(ev.data.len(), 4096);
    // The long-poll transport shows the content type.
    let r = client()
        .get(c.url("/live/forced.3?last_event_id=0-0"))
        .send()
        .await
        .expect("long-poll");
    assert_eq!(r.headers()["content-type"], "text/x-big");
    c.shutdown().await;
}

#[tokio::test]
async fn a_body_over_max_message_size_is_sent_whole_and_published_as_a_truncated_summary() {
    let rules = "[channels]\nmax_message_size = \"1KiB\"\n[[publish_on]]\nname = \"big\"\npath = \"/api/big/{id}\"\nchannel = \"big.{id}\"\n";
    let c = Crier::start(&app().await, rules).await;
    let mut sse = SseClient::connect(&c.url("/live/big.1"), None).await;
    let r = client()
        .post(c.url("/api/big/1"))
        .send()
        .await
        .expect("post");
    assert_eq!(
        r.bytes().await.expect("body").len(),
        4096,
        "the client is not cut"
    );
    let v: serde_json::Value = serde_json::from_str(&next(&mut sse).await.data).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"method": "POST", "path": "/api/big/1", "status": 200, "truncated": true})
    );
    wait_count(&c, "big", "truncated", 1.0).await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_response_the_upstream_cuts_or_the_client_leaves_publishes_nothing() {
    let rules = "[[publish_on]]\nname = \"abort\"\npath = \"/api/abort/{id}\"\nchannel = \"a.{id}\"\n\
                 [[publish_on]]\nname = \"stall\"\npath = \"/api/stall/{id}\"\nchannel = \"s.{id}\"\n";
    let c = Crier::start(&app().await, rules).await;
    let r = client()
        .post(c.url("/api/abort/1"))
        .send()
        .await
        .expect("headers");
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the client sees the cut");
    wait_count(&c, "abort", "aborted", 1.0).await;

    // The client reads the head and the first chunk, then goes away.
    let mut conn = tokio::net::TcpStream::connect(c.public)
        .await
        .expect("connect");
    conn.write_all(b"POST /api/stall/1 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("send");
    let mut buf = vec![0u8; 256];
    let n = conn.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(conn);
    wait_count(&c, "stall", "aborted", 1.0).await;
    for ch in ["a.1", "s.1"] {
        assert_eq!(published(&c, ch).await, 0, "{ch}");
    }
    assert_eq!(
        count(&c, "abort", "published").await + count(&c, "stall", "published").await,
        0.0
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_capture_that_is_no_channel_name_proxies_and_publishes_nothing() {
    let c = Crier::start(&app().await, ORDERS).await;
    let r = client()
        .post(c.url("/api/orders/a%20b"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201, "the write still reaches the app");
    wait_count(&c, "orders", "bad_channel", 1.0).await;
    c.shutdown().await;
}

/// A GET rule on a keep-alive HTTP/1.1 connection, which the fast path serves: the matching
/// request goes to hyper's path and publishes; the others around it stay on the fast path.
#[tokio::test]
async fn on_a_fast_path_connection_a_matching_request_publishes() {
    let rules = "[[publish_on]]\nname = \"views\"\nmethod = [\"GET\"]\npath = \"/api/items/{id}\"\nchannel = \"views.{id}\"\n";
    let c = Crier::start(&app().await, &format!("{rules}{ORDERS}")).await;
    let mut sse = SseClient::connect(&c.url("/live/views.5"), None).await;
    let mut orders = SseClient::connect(&c.url("/live/orders.6"), None).await;
    let mut conn = RawConn::connect(c.public).await;
    assert_eq!(conn.get("/api/other").await.text(), "item /api/other");
    assert_eq!(conn.get("/api/items/5").await.text(), "item /api/items/5");
    assert_eq!(next(&mut sse).await.data, "item /api/items/5");
    conn.send("POST /api/orders/6 HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n\r\nabc")
        .await;
    let r = conn.read_response().await;
    assert_eq!(r.status, 201);
    assert!(next(&mut orders).await.data.contains("\"got\":\"abc\""));
    assert_eq!(
        conn.get("/api/items/5?again").await.text(),
        "item /api/items/5"
    );
    assert_eq!(next(&mut sse).await.data, "item /api/items/5");
    wait_count(&c, "views", "published", 2.0).await;
    c.shutdown().await;
}

#[tokio::test]
async fn over_http2_a_write_publishes_too() {
    let c = Crier::start(&app().await, ORDERS).await;
    let mut sse = SseClient::connect(&c.url("/live/orders.8"), None).await;
    let r = h2_client()
        .post(c.url("/api/orders/8"))
        .body("h2")
        .send()
        .await
        .expect("post");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 201);
    assert!(next(&mut sse).await.data.contains("\"got\":\"h2\""));
    c.shutdown().await;
}

#[tokio::test]
async fn reload_adds_and_removes_rules() {
    let c = Crier::start(&app().await, "").await;
    let with_rule = |toml: &str| {
        let mut cfg = c.handle.config().as_ref().clone();
        cfg.publish_on = crier::Config::from_toml(toml, None)
            .expect("valid")
            .publish_on;
        cfg
    };
    client()
        .post(c.url("/api/orders/1"))
        .send()
        .await
        .expect("post");
    assert_eq!(published(&c, "orders.1").await, 0);

    c.handle.reload(with_rule(ORDERS)).expect("reload");
    let mut sse = SseClient::connect(&c.url("/live/orders.1"), None).await;
    // A keep-alive connection opened before a later reload sees each reload at once.
    let mut conn = RawConn::connect(c.public).await;
    conn.send("POST /api/orders/1 HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\n\r\nA")
        .await;
    assert_eq!(conn.read_response().await.status, 201);
    assert!(next(&mut sse).await.data.contains("\"got\":\"A\""));

    c.handle.reload(with_rule("")).expect("reload");
    conn.send("POST /api/orders/1 HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\n\r\nB")
        .await;
    assert_eq!(conn.read_response().await.status, 201);
    // A publish after it arrives next: the removed rule published nothing in between.
    c.publish("orders.1", "marker").await;
    assert_eq!(next(&mut sse).await.data, "marker");
    c.shutdown().await;
}

/// What SIGHUP runs, on the binary: the file gains a rule, and writes start publishing.
#[tokio::test]
async fn sighup_loads_new_rules_into_the_running_binary() {
    let p = common::process::CrierProcess::start(&app().await, "");
    let mut sse = SseClient::connect(&p.url("/live/orders.1"), None).await;
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    std::fs::write(&p.config_path, format!("{text}\n{ORDERS}")).expect("write config");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(p.pid() as i32, libc::SIGHUP) };
    let published = eventually(Duration::from_secs(10), async || {
        let r = client().post(p.url("/api/orders/1")).body("hup").send().await;
        assert_eq!(r.expect("post").status(), 201);
        matches!(sse.next_within(Duration::from_millis(200)).await, Ok(Some(e)) if e.data.contains("\"got\":\"hup\""))
    })
    .await;
    assert!(published, "a write after SIGHUP publishes");
}

#[tokio::test]
async fn a_publish_the_hub_refuses_is_counted_and_the_client_still_gets_its_answer() {
    let c = Crier::start(
        &app().await,
        &format!("[channels]\nmax_channels = 1\n{ORDERS}"),
    )
    .await;
    let _full = SseClient::connect(&c.url("/live/taken"), None).await;
    for _ in 0..2 {
        let r = client()
            .post(c.url("/api/orders/1"))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 201);
        assert!(r.text().await.expect("body").contains("\"order\":\"1\""));
    }
    wait_count(&c, "orders", "failed", 2.0).await;
    assert_eq!(count(&c, "orders", "published").await, 0.0);
    c.shutdown().await;
}
