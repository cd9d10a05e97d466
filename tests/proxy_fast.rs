//! The proxy's HTTP/1.1 fast path (src/proxy/h1.rs) against a scripted upstream that writes
//! exact bytes: response framings (chunked with trailers, close-delimited, HEAD, 1xx), the
//! raw connection pool (reuse, a connection the upstream closed while idle), pipelining,
//! the hand-over to hyper in the middle of a connection, and upstream misbehaviour.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::{read_request, RawConn, ReadEnd};
use common::*;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// What the scripted upstream does after writing a reply.
#[derive(Clone, PartialEq, Eq)]
enum After {
    KeepOpen,
    Close,
    /// Wait, write these bytes unasked, then close (a server timing out an idle connection).
    LaterWriteAndClose(Duration, &'static [u8]),
}

type Script = dyn Fn(usize, &str) -> (Vec<u8>, After) + Send + Sync;

/// An upstream that answers request number n (counted over all its connections) with the
/// bytes the script gives, and records every request (head and body) it read.
struct Scripted {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(
        script: impl Fn(usize, &str) -> (Vec<u8>, After) + Send + Sync + 'static,
    ) -> Scripted {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = l.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let (conns, reqs) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let (script, reqs, conns) = (script.clone(), reqs.clone(), conns.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut first = true;
                    loop {
                        let Some(req) = read_request(&mut s, &mut buf).await else {
                            return;
                        };
                        // Connections that carried a request: crier's upstream probe
                        // (crier_upstream_up) connects and hangs up without one.
                        if std::mem::take(&mut first) {
                            conns.fetch_add(1, Ordering::SeqCst);
                        }
                        let n = {
                            let mut r = reqs.lock();
                            r.push(req.clone());
                            r.len() - 1
                        };
                        let (reply, after) = script(n, &req);
                        if s.write_all(&reply).await.is_err() || after == After::Close {
                            return;
                        }
                        if let After::LaterWriteAndClose(wait, bytes) = after {
                            tokio::time::sleep(wait).await;
                            let _ = s.write_all(bytes).await;
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            connections,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn request(&self, n: usize) -> String {
        self.requests.lock()[n].clone()
    }
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The request target of a recorded request.
fn target(req: &str) -> &str {
    req.split(' ').nth(1).unwrap_or_default()
}

#[tokio::test]
async fn chunked_responses_pass_through_framed_and_the_connections_are_reused() {
    let up = Scripted::start(|_, req| {
        let path = target(req).to_string();
        let body = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: x-hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\n5;ext=1\r\nhello\r\n{:x}\r\n{path}\r\n0\r\nX-Trailer: t\r\n\r\n",
            path.len()
        );
        (body.into_bytes(), After::KeepOpen)
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    for path in ["/one", "/two/longer?q=1", "/three"] {
        let r = conn.get(path).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.text(), format!("hello{path}"));
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.header("x-kept"), Some("yes"));
        // Relayed as written, name case included (as nginx does; hyper would lowercase it):
        // the fast path, not hyper, served this.
        assert!(r.head.contains("\r\nX-Kept: yes\r\n"), "{}", r.head);
        assert!(
            !r.has_header("x-hop") && !r.has_header("keep-alive"),
            "{}",
            r.head
        );
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "one pooled upstream connection"
    );
    // reqwest (hyper's client) reads the same bytes as a valid chunked response.
    let body = client()
        .get(c.url("/four"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "hello/four");
    c.shutdown().await;
}

#[tokio::test]
async fn a_close_delimited_response_is_relayed_and_closes_the_client_connection() {
    let up = Scripted::start(|_, _| {
        (
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".to_vec(),
            After::Close,
        )
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    let r = conn.get("/old").await; // no length: read to EOF
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "until the end");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    c.shutdown().await;
}

#[tokio::test]
async fn head_and_no_body_statuses_carry_no_body() {
    let up = Scripted::start(|_, req| {
        let reply = match target(req) {
            "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec(),
            "/204" => b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec(),
            "/304" => b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n".to_vec(),
            _ => ok("after"),
        };
        (reply, After::KeepOpen)
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send("HEAD /head HTTP/1.1\r\nHost: test\r\n\r\n").await;
    // The HEAD answer keeps its Content-Length and has no body: the next response follows
    // right after its head.
    conn.send("GET /next HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let mut raw = Vec::new();
    for _ in 0..100 {
        match conn.read_until_closed(Duration::from_millis(50)).await {
            ReadEnd::Closed(got) => {
                raw.extend(got);
                break;
            }
            ReadEnd::StillOpen(got) => raw.extend(got),
        }
        if raw.ends_with(b"after") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("Content-Length: 1000\r\n"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    for path in ["/204", "/304"] {
        let r = conn.get(path).await;
        assert!(r.body.is_empty());
    }
    assert_eq!(
        conn.get("/x").await.text(),
        "after",
        "connection still in step"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_while_idle_is_not_used() {
    // Every connection answers one request and closes without saying so, as an upstream
    // with a short keep-alive timeout does while the connection sits in the pool.
    let up = Scripted::start(|n, _| (ok(&format!("reply {n}")), After::Close)).await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    for i in 0..5 {
        let r = conn.get("/again").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        tokio::time::sleep(Duration::from_millis(30)).await; // let the close land
    }
    assert!(up.connections.load(Ordering::SeqCst) >= 5);
    c.shutdown().await;
}

#[tokio::test]
async fn a_pooled_connection_closed_under_the_next_request_is_retried_on_a_fresh_one() {
    // Request 1 reaches the pooled connection, which the upstream closes without answering
    // (the close raced the request): GET is safe to send again, on a new connection.
    let up = Scripted::start(|n, _| match n {
        1 => (Vec::new(), After::Close),
        _ => (ok(&format!("reply {n}")), After::KeepOpen),
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    assert_eq!(conn.get("/first").await.text(), "reply 0");
    let r = conn.get("/second").await;
    assert_eq!((r.status, r.text().as_str()), (200, "reply 2"));
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    assert_eq!(target(&up.request(2)), "/second");
    c.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = Scripted::start(|_, req| (ok(target(req)), After::KeepOpen)).await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    let mut burst = String::new();
    for i in 0..10 {
        burst.push_str(&format!("GET /p{i} HTTP/1.1\r\nHost: test\r\n\r\n"));
    }
    conn.send(burst).await;
    for i in 0..10 {
        assert_eq!(conn.read_response().await.text(), format!("/p{i}"));
    }
    c.shutdown().await;
}

#[tokio::test]
async fn a_request_with_a_body_mid_connection_is_served_by_hyper() {
    let up = Scripted::start(|_, req| {
        let body = req.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (ok(&format!("{} {body}", target(req))), After::KeepOpen)
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    assert_eq!(conn.get("/first").await.text(), "/first ");
    conn.send("POST /form HTTP/1.1\r\nHost: test\r\nContent-Length: 9\r\n\r\nname=test")
        .await;
    assert_eq!(conn.read_response().await.text(), "/form name=test");
    assert_eq!(conn.get("/last").await.text(), "/last ");
    c.shutdown().await;
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let up = Scripted::start(|_, _| {
        let mut r = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n".to_vec();
        r.extend(ok("final"));
        (r, After::KeepOpen)
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    let r = conn.get("/hints").await;
    assert_eq!((r.status, r.text().as_str()), (200, "final"));
    assert_eq!(conn.get("/again").await.text(), "final");
    c.shutdown().await;
}

#[tokio::test]
async fn a_malformed_upstream_answer_is_502_on_a_connection_that_stays_usable() {
    let up = Scripted::start(|n, _| match n {
        0 => (b"NOT HTTP AT ALL\r\n\r\n".to_vec(), After::Close),
        1 => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
            After::Close,
        ),
        _ => (ok("fine"), After::KeepOpen),
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    let bad = conn.get("/bad").await;
    assert_eq!(bad.status, 502);
    assert!(
        bad.text().starts_with("upstream failed: "),
        "{}",
        bad.text()
    );
    assert_eq!(conn.get("/conflict").await.status, 502);
    let good = conn.get("/good").await;
    assert_eq!((good.status, good.text().as_str()), (200, "fine"));
    assert_eq!(
        metric(&c, "crier_upstream_errors_total{kind=\"other\"}").await,
        Some(2.0)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_body_cut_short_by_the_upstream_closes_the_client_connection() {
    let up = Scripted::start(|_, _| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b".to_vec(),
            After::Close,
        )
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send("GET /cut HTTP/1.1\r\nHost: test\r\n\r\n").await;
    match conn.read_until_closed(Duration::from_secs(5)).await {
        ReadEnd::Closed(got) => {
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
            assert!(text.ends_with("only ten b"), "{text}");
        }
        ReadEnd::StillOpen(got) => panic!(
            "the client was left waiting for 90 bytes that never come: {}",
            String::from_utf8_lossy(&got)
        ),
    }
    c.shutdown().await;
}

#[tokio::test]
async fn connection_close_from_the_client_is_honoured() {
    let up = Scripted::start(|_, _| (ok("bye"), After::KeepOpen)).await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send("GET /bye HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await;
    let r = conn.read_response().await;
    assert_eq!(r.text(), "bye");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(matches!(
        conn.read_until_closed(Duration::from_secs(5)).await,
        ReadEnd::Closed(_)
    ));
    // What the upstream saw: hop-by-hop gone, forwarding headers there.
    let seen = up.request(0).to_ascii_lowercase();
    assert!(!seen.contains("connection:"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\r\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: test\r\n"), "{seen}");
    c.shutdown().await;
}

#[tokio::test]
async fn a_silent_upstream_is_504_and_the_client_connection_stays_usable() {
    let up = Scripted::start(|n, _| match n {
        0 => (Vec::new(), After::KeepOpen), // reads the request, never answers
        _ => (ok("late but fine"), After::KeepOpen),
    })
    .await;
    let c = Crier::start(&up.url(), "").await; // response_timeout = 2s
    let mut conn = RawConn::connect(c.public).await;
    let r = conn.get("/slow").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream did not answer within 2s\n");
    assert_eq!(conn.get("/next").await.text(), "late but fine");
    c.shutdown().await;
}

#[tokio::test]
async fn a_reload_applies_to_the_next_request_on_an_open_connection() {
    let old = Scripted::start(|_, _| (ok("old"), After::KeepOpen)).await;
    let new = Scripted::start(|_, _| (ok("new"), After::KeepOpen)).await;
    let c = Crier::start(&old.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    assert_eq!(conn.get("/").await.text(), "old");
    let mut cfg = c.handle.config().as_ref().clone();
    cfg.upstream.url = crier::config::UpstreamAddr::Http {
        authority: new.addr.to_string(),
    };
    c.handle.reload(cfg).expect("reload");
    // The connection sat idle through the reload: its next request goes to the new upstream.
    assert_eq!(conn.get("/").await.text(), "new");
    c.shutdown().await;
}

#[tokio::test]
async fn bytes_an_idle_pooled_connection_received_are_not_taken_for_the_next_answer() {
    // Some servers write a 408 before closing a keep-alive connection that idled too long.
    let up = Scripted::start(|n, _| {
        (
            ok(&format!("reply {n}")),
            After::LaterWriteAndClose(
                Duration::from_millis(50),
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            ),
        )
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    assert_eq!(conn.get("/a").await.text(), "reply 0");
    tokio::time::sleep(Duration::from_millis(300)).await; // the 408 and the close land
    let r = conn.get("/b").await;
    assert_eq!((r.status, r.text().as_str()), (200, "reply 1"));
    c.shutdown().await;
}

/// Found by the `http1_response` fuzz target: `Connection: content-length` used to drop the
/// length from the client's head while crier relayed exactly that many bytes and kept the
/// connection, so the client read the next response as this body.
#[tokio::test]
async fn connection_naming_content_length_keeps_the_framing() {
    let up = Scripted::start(|_, _| {
        (
            b"HTTP/1.1 200 OK\r\nConnection: content-length, x-hop\r\nX-Hop: 1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            After::KeepOpen,
        )
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    for path in ["/one", "/two"] {
        let r = conn.get(path).await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{}", r.head);
        assert_eq!(r.header("content-length"), Some("5"), "{}", r.head);
        assert!(
            !r.has_header("x-hop") && !r.has_header("connection"),
            "{}",
            r.head
        );
    }
    c.shutdown().await;
}

/// Found by the `chunked` fuzz target: a bare LF in the trailer section ends a line for a
/// lenient client but did not for the chunk scanner, so the two disagreed on where the body
/// ends. Now it is a malformed body: the client connection closes, and nothing the upstream
/// wrote after it reaches the client as a response.
#[tokio::test]
async fn a_bare_lf_in_chunked_trailers_closes_the_client_connection() {
    let up = Scripted::start(|_, _| {
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
            After::KeepOpen,
        )
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send("GET /t HTTP/1.1\r\nHost: test\r\n\r\n").await;
    match conn.read_until_closed(Duration::from_secs(5)).await {
        ReadEnd::Closed(got) => {
            let text = String::from_utf8_lossy(&got);
            assert!(!text.contains("Content-Length: 0"), "{text}");
        }
        ReadEnd::StillOpen(got) => panic!(
            "the connection stayed open after a malformed body: {}",
            String::from_utf8_lossy(&got)
        ),
    }
    c.shutdown().await;
}

/// Found by the `http1_response` fuzz target: a status below 100 (httparse reads any three
/// digits) was written back as `HTTP/1.1 2 OK`, which no client parses. It is a bad answer.
#[tokio::test]
async fn a_status_below_100_is_502() {
    let up = Scripted::start(|n, _| match n {
        0 => (
            b"HTTP/1.1 002 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
            After::Close,
        ),
        _ => (ok("fine"), After::KeepOpen),
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    assert_eq!(conn.get("/odd").await.status, 502);
    let good = conn.get("/good").await;
    assert_eq!((good.status, good.text().as_str()), (200, "fine"));
    c.shutdown().await;
}
