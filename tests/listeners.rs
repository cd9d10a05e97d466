//! The public listener's limits over real sockets: request head size and header count (431),
//! the header-read timeout against slow and silent clients, `server.max_connections`, and a
//! port already in use at startup.

mod common;

use std::time::Duration;

use common::process::{crier_bin, run_cli};
use common::raw::{RawConn, ReadEnd};
use common::*;

/// A request head with `n` extra headers of `value_len` bytes each.
fn request_with_headers(n: usize, value_len: usize) -> String {
    let mut req = String::from("GET /echo HTTP/1.1\r\nHost: test\r\n");
    let value = "v".repeat(value_len);
    for i in 0..n {
        req.push_str(&format!("X-Extra-{i}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "max_header_size = \"16KiB\"\n").await;

    // Under the limit: served.
    let mut ok = RawConn::connect(c.public).await;
    ok.send(request_with_headers(1, 12 * 1024)).await;
    assert_eq!(ok.read_response().await.status, 200);

    // Over it: 431.
    let mut big = RawConn::connect(c.public).await;
    big.send(request_with_headers(1, 20 * 1024)).await;
    let r = big.read_response().await;
    assert_eq!(r.status, 431, "{}", r.head);
    c.shutdown().await;
}

#[tokio::test]
async fn too_many_request_headers_is_431() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "max_headers = 50\n").await;

    let mut ok = RawConn::connect(c.public).await;
    ok.send(request_with_headers(40, 8)).await;
    assert_eq!(ok.read_response().await.status, 200);

    let mut many = RawConn::connect(c.public).await;
    many.send(request_with_headers(80, 8)).await;
    let r = many.read_response().await;
    assert_eq!(r.status, 431, "{}", r.head);
    c.shutdown().await;
}

/// An h2 client whose header block is over the limit gets 431 as well.
#[tokio::test]
async fn oversized_h2_headers_are_refused() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "max_header_size = \"16KiB\"\n").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(c.url("/echo"))
        .header("x-small", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = h2
        .get(c.url("/echo"))
        .header("x-big", "v".repeat(32 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    // The connection (and the client's pool) still serves normal requests.
    let r = h2.get(c.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    c.shutdown().await;
}

const HEADER_TIMEOUT: &str = "header_timeout = \"1s\"\n";

/// Still open a little while in, closed soon after `header_timeout` (1 s).
async fn closed_by_header_timeout(conn: &mut RawConn) {
    assert!(
        matches!(
            conn.read_until_closed(Duration::from_millis(300)).await,
            ReadEnd::StillOpen(_)
        ),
        "closed before the header timeout"
    );
    match conn.read_until_closed(Duration::from_secs(10)).await {
        ReadEnd::Closed(_) => {}
        ReadEnd::StillOpen(got) => panic!(
            "still open 10 s after a 1 s header timeout (got {:?})",
            String::from_utf8_lossy(&got)
        ),
    }
}

/// Slow-loris: a client that sends part of a request head and then nothing is disconnected.
#[tokio::test]
async fn partial_request_head_is_cut_by_header_timeout() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), HEADER_TIMEOUT).await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send("GET /echo HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .await;
    closed_by_header_timeout(&mut conn).await;
    c.shutdown().await;
}

/// Slow-loris that trickles: one byte every 200 ms never completes the head. The timeout
/// bounds the whole head, so the trickle does not keep the connection alive.
#[tokio::test]
async fn trickled_request_head_is_cut_by_header_timeout() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), HEADER_TIMEOUT).await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send("GET /echo HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .await;
    let mut closed = false;
    // 50 × 200 ms = 10 s, ten times the header timeout.
    for _ in 0..50 {
        if !conn.try_send("a").await {
            closed = true;
            break;
        }
        if let ReadEnd::Closed(_) = conn.read_until_closed(Duration::from_millis(200)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickling client kept its connection for 10 s");
    c.shutdown().await;
}

/// A client that connects and never sends a byte holds no connection slot for long.
#[tokio::test]
async fn silent_connection_is_cut_by_header_timeout() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), HEADER_TIMEOUT).await;
    let mut conn = RawConn::connect(c.public).await;
    closed_by_header_timeout(&mut conn).await;
    c.shutdown().await;
}

/// The start of the h2 preface, then nothing: the protocol is still undecided, and the
/// header timeout must apply all the same.
#[tokio::test]
async fn partial_h2_preface_is_cut_by_header_timeout() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), HEADER_TIMEOUT).await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send("PRI * HTTP/2.0\r\n").await;
    closed_by_header_timeout(&mut conn).await;
    c.shutdown().await;
}

/// h2 slow-loris: the whole preface and SETTINGS, then no request at all.
#[tokio::test]
async fn h2_connection_without_a_request_is_cut_by_header_timeout() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), HEADER_TIMEOUT).await;
    let mut conn = RawConn::connect(c.public).await;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    conn.send(hello).await;
    closed_by_header_timeout(&mut conn).await;
    c.shutdown().await;
}

/// An HTTP/1.1 keep-alive connection left idle after a request is closed by the same timeout.
#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), HEADER_TIMEOUT).await;
    let mut conn = RawConn::connect(c.public).await;
    assert_eq!(conn.get("/").await.status, 200);
    closed_by_header_timeout(&mut conn).await;
    c.shutdown().await;
}

/// Past `server.max_connections`, a new connection is answered 503 and closed, and counted;
/// once a slot frees, connections are served again.
#[tokio::test]
async fn connections_past_the_limit_get_503() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "max_connections = 2\n").await;
    let mut a = RawConn::connect(c.public).await;
    let mut b = RawConn::connect(c.public).await;
    // Both are served (and so certainly counted) before the third arrives.
    assert_eq!(a.get("/").await.status, 200);
    assert_eq!(b.get("/").await.status, 200);
    assert_eq!(metric(&c, "crier_client_connections").await, Some(2.0));

    // The third client sends its request at once, as a real client does.
    let mut third = RawConn::connect(c.public).await;
    third.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let r = third.read_response().await;
    assert_eq!(r.status, 503, "{}", r.head);
    assert!(r.text().contains("too many connections"), "{:?}", r.text());
    assert!(
        matches!(
            third.read_until_closed(Duration::from_secs(5)).await,
            ReadEnd::Closed(_)
        ),
        "a refused connection stays open"
    );
    assert_eq!(
        metric(&c, "crier_client_connections_refused_total").await,
        Some(1.0)
    );

    // The held connections still work.
    assert_eq!(a.get("/").await.status, 200);

    drop(b);
    let freed = eventually(Duration::from_secs(10), async || {
        metric(&c, "crier_client_connections").await == Some(1.0)
    })
    .await;
    assert!(freed, "a closed connection was not uncounted");
    let mut d = RawConn::connect(c.public).await;
    assert_eq!(d.get("/").await.status, 200);
    assert_eq!(
        metric(&c, "crier_client_connections_refused_total").await,
        Some(1.0)
    );
    c.shutdown().await;
}

/// A WebSocket stays counted against `server.max_connections` for as long as it is open (the
/// upgrade outlives hyper's connection): past the limit the next connection gets 503.
#[tokio::test]
async fn upgraded_websockets_count_against_the_limit() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "max_connections = 2\n").await;
    let (a, _) = ws_connect(&c.ws_url("/live/limit"), &[]).await;
    let (_b, _) = ws_connect(&c.ws_url("/live/limit"), &[]).await;
    wait_subscribers(&c, "limit", 2).await;
    assert_eq!(metric(&c, "crier_client_connections").await, Some(2.0));

    let mut third = RawConn::connect(c.public).await;
    third.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let r = third.read_response().await;
    assert_eq!(
        r.status, 503,
        "two open WebSockets fill max_connections = 2"
    );

    drop(a);
    let freed = eventually(Duration::from_secs(10), async || {
        metric(&c, "crier_client_connections").await == Some(1.0)
    })
    .await;
    assert!(freed, "a closed WebSocket was not uncounted");
    let mut d = RawConn::connect(c.public).await;
    assert_eq!(d.get("/").await.status, 200);
    c.shutdown().await;
}

/// A port already taken is a startup error that names the address and the key, not a panic.
#[tokio::test]
async fn port_in_use_is_a_clear_startup_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("crier.toml");
    let toml = base_config("http://127.0.0.1:9", &dir.path().join("publish.sock"), "").replace(
        "listen = [\"127.0.0.1:0\"]\n\n[upstream]",
        &format!("listen = [\"{addr}\"]\n\n[upstream]"),
    );
    assert!(toml.contains(&addr.to_string()), "{toml}");
    std::fs::write(&config, toml).unwrap();

    let out = run_cli(&["--config", config.to_str().unwrap()], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "crier started on a taken port");
    assert!(
        out.status.code().is_some(),
        "crier died by a signal: {stderr}"
    );
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    drop(taken);
    let _ = crier_bin();
}
