//! The reverse proxy over real sockets: bodies and methods, headers in and out, streaming,
//! framing, bounded memory for 1 GiB each way, WebSocket tunnelling, h2 clients, and the
//! 502/504 answers.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::process::CrierProcess;
use common::raw::RawConn;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

async fn echo_json(resp: reqwest::Response) -> Value {
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("echo json")
}

fn header<'a>(echo: &'a Value, name: &str) -> Option<&'a str> {
    echo["headers"][name].as_str()
}

#[tokio::test]
async fn methods_and_bodies_pass_through() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let http = client();

    let get = echo_json(http.get(c.url("/echo?a=1&b=two")).send().await.unwrap()).await;
    assert_eq!(get["method"], "GET");
    assert_eq!(get["uri"], "/echo?a=1&b=two");
    assert_eq!(get["body_len"], 0);

    let body = "field=value&other=".to_string() + &"x".repeat(100_000);
    let post = echo_json(
        http.post(c.url("/echo"))
            .body(body.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(post["method"], "POST");
    assert_eq!(post["body_len"], body.len());
    assert_eq!(post["body"], body.as_str());
    assert_eq!(header(&post, "content-length"), Some("100018"));

    let put = echo_json(
        http.put(c.url("/echo"))
            .body("replace me")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(put["method"], "PUT");
    assert_eq!(put["body"], "replace me");

    // Status codes and bodies other than 200 pass through unchanged.
    let r = http.get(c.url("/status/418")).send().await.unwrap();
    assert_eq!(r.status(), 418);
    assert_eq!(r.text().await.unwrap(), "status 418");
    c.shutdown().await;
}

/// Hop-by-hop request headers go, the client's Host stays, X-Forwarded-* are right.
/// A raw client, because an HTTP library would rewrite or refuse some of these headers.
#[tokio::test]
async fn request_headers_are_rewritten_for_the_upstream() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send(
        "POST /echo HTTP/1.1\r\n\
         Host: app.example:8080\r\n\
         Connection: keep-alive, X-Named-Hop\r\n\
         X-Named-Hop: drop me\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Trailer: X-Checksum\r\n\
         Upgrade: h2c\r\n\
         X-Forwarded-For: 203.0.113.9\r\n\
         X-End-To-End: kept\r\n\
         Content-Length: 5\r\n\
         \r\n\
         hello",
    )
    .await;
    let r = conn.read_response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo: Value = serde_json::from_slice(&r.body).unwrap();
    for gone in [
        "connection",
        "x-named-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ] {
        assert_eq!(
            header(&echo, gone),
            None,
            "{gone} reached the upstream: {echo}"
        );
    }
    assert_eq!(header(&echo, "host"), Some("app.example:8080"));
    assert_eq!(header(&echo, "x-forwarded-host"), Some("app.example:8080"));
    assert_eq!(header(&echo, "x-forwarded-proto"), Some("http"));
    assert_eq!(
        header(&echo, "x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(header(&echo, "x-end-to-end"), Some("kept"));
    assert_eq!(echo["body"], "hello");

    // Without a prior X-Forwarded-For, crier starts one; a chunked request body arrives whole.
    conn.send(
        "POST /echo HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let r = conn.read_response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(header(&echo, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(echo["body"], "hello world");
    c.shutdown().await;
}

/// The upstream's /echo answers with `Connection: x-upstream-hop`, `X-Upstream-Hop` and
/// `Keep-Alive`; none of them may reach the client.
#[tokio::test]
async fn hop_by_hop_response_headers_are_stripped() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;

    // The premise: the upstream really sends them.
    let mut direct = RawConn::connect(up.addr).await;
    let r = direct.get("/echo").await;
    assert_eq!(r.header("x-upstream-hop"), Some("secret"), "{}", r.head);
    assert!(r.has_header("keep-alive"), "{}", r.head);

    let mut conn = RawConn::connect(c.public).await;
    let r = conn.get("/echo").await;
    assert_eq!(r.status, 200);
    assert!(!r.has_header("x-upstream-hop"), "{}", r.head);
    assert!(!r.has_header("keep-alive"), "{}", r.head);
    if let Some(v) = r.header("connection") {
        assert!(
            !v.to_ascii_lowercase().contains("x-upstream-hop"),
            "{}",
            r.head
        );
    }
    assert_eq!(r.header("content-type"), Some("application/json"));
    c.shutdown().await;
}

/// `/slow` sends "first\n", waits 1 s, then "second\n". Through crier the first chunk must
/// arrive on its own, a clear interval before the second (a buffering proxy delivers both
/// together when the upstream finishes).
#[tokio::test]
async fn response_body_streams_chunk_by_chunk() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let resp = client().get(c.url("/slow")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    let mut first_at = None;
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
        if first_at.is_none() {
            first_at = Some(Instant::now());
            assert_eq!(
                got, b"first\n",
                "the first read held more than the first chunk"
            );
        }
    }
    let finished_at = Instant::now();
    assert_eq!(got, b"first\nsecond\n");
    let gap = finished_at - first_at.unwrap();
    // The upstream waits 1 s between the chunks; half of that proves the first was not held.
    assert!(
        gap >= Duration::from_millis(500),
        "first chunk arrived only {gap:?} before the end: it was buffered"
    );
    c.shutdown().await;
}

/// A response without a length stays chunked on the client side; one with a length keeps it.
#[tokio::test]
async fn chunked_responses_stay_chunked() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;

    let r = conn.get("/big?bytes=200000").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{}", r.head);
    assert!(!r.has_header("content-length"), "{}", r.head);
    assert_eq!(r.body.len(), 200_000);

    let r = conn.get("/slow").await;
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{}", r.head);
    assert_eq!(r.body, b"first\nsecond\n");

    let r = conn.get("/").await;
    assert_eq!(r.header("content-length"), Some("19"), "{}", r.head);
    assert!(!r.has_header("transfer-encoding"), "{}", r.head);
    assert_eq!(r.text(), "hello from upstream");
    c.shutdown().await;
}

/// A chunked upload arrives at the upstream chunked (no length invented by buffering).
#[tokio::test]
async fn chunked_requests_stay_chunked() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let chunks = futures_util::stream::iter(
        ["one,", "two,", "three"].map(|s| Ok::<_, std::io::Error>(Bytes::from(s))),
    );
    let r = client()
        .post(c.url("/echo"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let echo = echo_json(r).await;
    assert_eq!(echo["body"], "one,two,three");
    assert_eq!(
        header(&echo, "transfer-encoding"),
        Some("chunked"),
        "{echo}"
    );
    assert_eq!(header(&echo, "content-length"), None, "{echo}");
    c.shutdown().await;
}

const GIB: u64 = 1 << 30;
/// crier's peak resident memory while 1 GiB passes through must stay below this.
const RSS_LIMIT_KIB: u64 = 200 * 1024;

/// 1 GiB down and 1 GiB up through the crier binary; its own peak RSS (VmHWM) stays far
/// below the bytes moved. The client discards bytes as it counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_bounded_memory() {
    let up = Upstream::start().await;
    let crier = CrierProcess::start(&up.url(), "");
    let http = client();
    let started = Instant::now();

    let resp = http
        .get(crier.url(&format!("/big?bytes={GIB}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut down = 0u64;
    while let Some(chunk) = body.next().await {
        down += chunk.unwrap().len() as u64;
    }
    assert_eq!(down, GIB, "download lost bytes");
    let after_download = crier.status_kib("VmHWM");
    assert!(
        after_download < RSS_LIMIT_KIB,
        "crier peaked at {after_download} KiB while streaming 1 GiB down"
    );

    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = GIB / chunk.len() as u64;
    let upload =
        futures_util::stream::iter(0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
    let resp = http
        .post(crier.url("/upload"))
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let counted: u64 = resp.text().await.unwrap().parse().unwrap();
    assert_eq!(
        counted, GIB,
        "the upstream did not receive the whole upload"
    );
    let peak = crier.status_kib("VmHWM");
    let now = crier.status_kib("VmRSS");
    assert!(
        peak < RSS_LIMIT_KIB,
        "crier peaked at {peak} KiB while streaming 1 GiB up (now {now} KiB)"
    );
    eprintln!(
        "1 GiB each way in {:?}; crier VmHWM {peak} KiB, VmRSS {now} KiB",
        started.elapsed()
    );
}

/// A WebSocket upgrade on a path no push location claims reaches the upstream's own
/// WebSocket; frames echo both ways and a close handshake completes through the tunnel.
#[tokio::test]
async fn websocket_upgrade_is_tunnelled_to_the_upstream() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(c.ws_url("/ws"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);

    ws.send(Message::text("hello through crier")).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    assert_eq!(m.unwrap().unwrap(), Message::text("hello through crier"));

    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    assert_eq!(m.unwrap().unwrap(), Message::binary(big));

    for i in 0..20 {
        ws.send(Message::text(format!("n{i}"))).await.unwrap();
    }
    for i in 0..20 {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap();
        assert_eq!(m.unwrap().unwrap(), Message::text(format!("n{i}")));
    }

    ws.close(None).await.unwrap();
    // The upstream answers the close; then the stream ends.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => {}
                Some(Ok(other)) => panic!("unexpected frame after close: {other:?}"),
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the tunnel did not close");
    drop(ws);

    // The tunnel task has ended with the socket: shutdown does not wait on it (it would
    // wait for server.shutdown_timeout, 30 s, on a tunnel still open).
    c.handle.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(10), c.done).await;
    assert!(
        stopped.is_ok(),
        "a closed tunnel still held the server open"
    );
}

/// An h2 (prior knowledge) client through crier to the HTTP/1.1 upstream: the upstream sees
/// HTTP/1.1 with `Host` set to the client's `:authority`.
#[tokio::test]
async fn h2_client_reaches_http1_upstream() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();

    let r = h2.get(c.url("/echo?x=1")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let echo = echo_json(r).await;
    let authority = c.public.to_string();
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["uri"], "/echo?x=1");
    assert_eq!(header(&echo, "host"), Some(authority.as_str()));
    assert_eq!(header(&echo, "x-forwarded-host"), Some(authority.as_str()));
    assert_eq!(header(&echo, "x-forwarded-proto"), Some("http"));

    let r = h2
        .post(c.url("/echo"))
        .body("over h2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let echo = echo_json(r).await;
    assert_eq!(echo["body"], "over h2");

    // Streamed responses work over h2 as well.
    let r = h2.get(c.url("/big?bytes=300000")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    c.shutdown().await;
}

fn assert_plain_reason(r: &common::raw::RawResponse, needle: &str) {
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{}",
        r.head
    );
    let text = r.text();
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "not a one-line reason: {text:?}"
    );
    assert!(
        text.contains(needle),
        "reason {text:?} does not mention {needle:?}"
    );
}

/// Upstream refuses the connection → 502 with a one-line reason; the client's connection
/// stays open for the next request.
#[tokio::test]
async fn refused_upstream_is_502_and_connection_stays_usable() {
    let dead = dead_addr().await;
    let c = Crier::start(&format!("http://{dead}"), "").await;
    let mut conn = RawConn::connect(c.public).await;
    let r = conn.get("/anything").await;
    assert_eq!(r.status, 502, "{}", r.head);
    assert_plain_reason(&r, "upstream");
    assert_ne!(r.header("connection"), Some("close"), "{}", r.head);

    // Same socket again, this time with a small body the upstream never read.
    conn.send("POST /form HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n\r\nabc")
        .await;
    let r = conn.read_response().await;
    assert_eq!(r.status, 502, "{}", r.head);
    let r = conn.get("/third").await;
    assert_eq!(r.status, 502, "{}", r.head);

    assert!(metric(&c, "crier_upstream_errors_total{kind=\"connect\"}").await >= Some(3.0));
    assert!(metric(&c, "crier_proxy_requests_total{code_class=\"5xx\"}").await >= Some(3.0));
    c.shutdown().await;
}

/// No response headers within `upstream.response_timeout` (2 s in the harness) → 504 with a
/// one-line reason; the same connection then serves a normal request.
#[tokio::test]
async fn slow_upstream_is_504_and_connection_stays_usable() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    let r = conn.get("/delay?ms=5000").await;
    assert_eq!(r.status, 504, "{}", r.head);
    assert_plain_reason(&r, "2s");

    let r = conn.get("/echo").await;
    assert_eq!(r.status, 200, "{}", r.head);

    // A response inside the limit is not cut.
    let r = conn.get("/delay?ms=100").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "late");
    assert_eq!(
        metric(&c, "crier_upstream_errors_total{kind=\"timeout\"}").await,
        Some(1.0)
    );
    c.shutdown().await;
}

/// `response_timeout` (2 s here) is the wait for response headers once the request is sent:
/// an upload that keeps moving for longer than that is not cut.
#[tokio::test]
async fn upload_outlasting_response_timeout_still_succeeds() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    // 12 chunks, 250 ms apart: about 3 s of upload.
    let chunks = futures_util::stream::iter(0..12u32).then(|_| async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        Ok::<_, std::io::Error>(Bytes::from(vec![b'z'; 1000]))
    });
    let resp = client()
        .post(c.url("/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    assert_eq!(resp.text().await.unwrap(), "12000");
    c.shutdown().await;
}

/// An upstream that neither reads the request body nor answers (for 5 s) still gets a 504
/// after 2 s, while the client has more body to send: the upload clock above must not turn a
/// stalled upload into a hang.
#[tokio::test]
async fn upstream_that_stops_reading_is_504() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    // /delay ignores the body: 64 MiB cannot fit in the socket buffers between us.
    let chunk = Bytes::from(vec![b's'; 1 << 20]);
    let chunks =
        futures_util::stream::iter(0..64).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
    let resp = client()
        .post(c.url("/delay?ms=5000"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    match resp {
        Ok(r) => assert_eq!(r.status(), 504),
        // crier may answer and close while the client is still writing the body.
        Err(e) => assert!(!e.is_timeout(), "{e:?}"),
    }
    assert_eq!(
        metric(&c, "crier_upstream_errors_total{kind=\"timeout\"}").await,
        Some(1.0)
    );
    c.shutdown().await;
}

/// Lines of the access log (stdout) until `n` arrived or `within` passed.
fn access_lines(p: &CrierProcess, n: usize, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        match p
            .stdout
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            Ok(l) => got.push(l),
            Err(_) => break,
        }
    }
    got
}

/// `server.access_log`: one Combined Log Format line per proxied request on both proxy paths
/// (with the body bytes sent), and a line per subscriber connect and disconnect; on stdout,
/// apart from crier's own log; off by default.
#[tokio::test]
async fn the_access_log_names_proxied_requests_and_subscribers() {
    let up = Upstream::start().await;
    let p = CrierProcess::start(&up.url(), "access_log = \"combined\"\n");

    // The fast path (a plain GET on HTTP/1.1).
    let mut raw = RawConn::connect(p.public).await;
    raw.send(
        "GET /echo?q=%22x HTTP/1.1\r\nHost: app\r\nUser-Agent: probe/1\r\n\
         Referer: https://ref.example/\r\n\r\n",
    )
    .await;
    let fast = raw.read_response().await;
    assert_eq!(fast.status, 200, "{}", fast.head);
    // The hyper path (a POST).
    let r = client()
        .post(p.url("/echo"))
        .header("user-agent", "probe/2")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let posted = r.bytes().await.unwrap().len();
    // A multiplexed SSE subscriber that connects and goes.
    let sse = client()
        .get(p.url("/live/acc,other"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SIGTERM ends the stream: the disconnect line is written before crier exits.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    let _ = sse.bytes().await;

    let lines = access_lines(&p, 4, Duration::from_secs(10));
    let find = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in {lines:#?}"))
            .clone()
    };
    let line = find("\"GET /echo");
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains(&format!(
            "\"GET /echo?q=%22x HTTP/1.1\" 200 {} \"https://ref.example/\" \"probe/1\"",
            fast.body.len()
        )),
        "{line}"
    );
    let line = find("\"POST /echo");
    assert!(
        line.ends_with(&format!(
            "\"POST /echo HTTP/1.1\" 200 {posted} \"-\" \"probe/2\""
        )),
        "{line}"
    );
    let line = find("subscriber connect");
    assert!(
        line.ends_with("subscriber connect transport=sse channels=acc,other"),
        "{line}"
    );
    let line = find("subscriber disconnect");
    assert!(
        line.contains("transport=sse channels=acc,other duration="),
        "{line}"
    );
    drop(p);

    // JSON, one object per line; and off by default: nothing on stdout.
    let p = CrierProcess::start(&up.url(), "access_log = \"json\"\n");
    let mut raw = RawConn::connect(p.public).await;
    assert_eq!(raw.get("/echo").await.status, 200);
    let lines = access_lines(&p, 1, Duration::from_secs(10));
    let v: Value = serde_json::from_str(&lines[0]).expect("a JSON line");
    assert_eq!(v["kind"], "proxy");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["target"], "/echo");
    assert_eq!(v["status"], 200);
    assert_eq!(v["complete"], true);
    assert!(v["duration_ms"].as_f64().is_some(), "{v}");
    drop(p);
    let p = CrierProcess::start(&up.url(), "");
    let mut raw = RawConn::connect(p.public).await;
    assert_eq!(raw.get("/echo").await.status, 200);
    // The request's line would be out well within a second (flushed when the queue empties).
    assert!(
        access_lines(&p, 1, Duration::from_secs(1)).is_empty(),
        "the access log is off by default"
    );
}
