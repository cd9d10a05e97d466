//! Protocol corners of the proxy (issue 18 part 3), each on both engines where both exist: the
//! HTTP/1.1 fast path (a body-less GET over plain TCP) and hyper's (a POST, or anything the fast
//! path hands over), against a scripted upstream that writes exact bytes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::raw::{read_request, RawConn, ReadEnd};
use common::*;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// One thing the scripted upstream does for a request.
#[derive(Clone)]
enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
}

/// An upstream that answers every request with the steps the script gives for it, and
/// records each request it read (head and Content-Length body).
struct Scripted {
    addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(script: impl Fn(&str) -> Vec<Step> + Send + Sync + 'static) -> Scripted {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let reqs = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (script, reqs) = (script.clone(), reqs.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(req) = read_request(&mut s, &mut buf).await {
                        reqs.lock().push(req.clone());
                        for step in script(&req) {
                            match step {
                                Step::Write(b) => {
                                    if s.write_all(&b).await.is_err() {
                                        return;
                                    }
                                }
                                Step::Sleep(d) => tokio::time::sleep(d).await,
                            }
                        }
                    }
                });
            }
        });
        Scripted { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().clone()
    }
}

fn ok(body: &str) -> Vec<Step> {
    vec![Step::Write(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )]
}

/// The value of a header in a recorded request (the first one), and how many there were.
fn req_header<'a>(req: &'a str, name: &str) -> (Option<&'a str>, usize) {
    let all: Vec<&str> = req
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect();
    (all.first().copied(), all.len())
}

/// A POST on the hyper path: the fast path takes no request with a body.
fn post(path: &str, host: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 2\r\n\r\nhi")
}

#[tokio::test]
async fn connect_is_answered_405_and_never_forwarded() {
    let up = Scripted::start(|_| ok("upstream")).await;
    let c = Crier::start(&up.url(), "").await;
    for target in ["other.example:443", "/"] {
        let mut conn = RawConn::connect(c.public).await;
        conn.send(format!(
            "CONNECT {target} HTTP/1.1\r\nHost: other.example:443\r\n\r\n"
        ))
        .await;
        let r = conn.read_response().await;
        assert_eq!(r.status, 405, "{target}: {}", r.head);
        let allow = r.header("allow").expect("Allow");
        assert!(
            allow.contains("GET") && !allow.contains("CONNECT"),
            "{allow}"
        );
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    // A normal request on the same proxy still goes through.
    let mut conn = RawConn::connect(c.public).await;
    assert_eq!(conn.get("/x").await.text(), "upstream");
    assert_eq!(up.requests().len(), 1);
    c.shutdown().await;
}

#[tokio::test]
async fn connection_host_never_strips_host_on_either_path() {
    let up = Scripted::start(|_| ok("ok")).await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    // The fast path (GET), then hyper's (POST).
    conn.send("GET /fast HTTP/1.1\r\nHost: app.example\r\nConnection: host\r\n\r\n")
        .await;
    assert_eq!(conn.read_response().await.status, 200);
    conn.send(post("/hyper", "app.example", "Connection: host\r\n"))
        .await;
    assert_eq!(conn.read_response().await.status, 200);
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(req_header(r, "host"), (Some("app.example"), 1), "{r}");
    }
    c.shutdown().await;
}

#[tokio::test]
async fn an_absolute_form_target_names_the_upstream_host() {
    let up = Scripted::start(|_| ok("ok")).await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    // A GET the fast path hands to hyper, then a POST hyper takes from the start.
    conn.send("GET http://other.example/path?q=1 HTTP/1.1\r\nHost: wrong.example\r\n\r\n")
        .await;
    assert_eq!(conn.read_response().await.status, 200);
    conn.send(post("http://other.example:8080/up", "wrong.example", ""))
        .await;
    assert_eq!(conn.read_response().await.status, 200);
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs[0].starts_with("GET /path?q=1 HTTP/1.1\r\n"),
        "{}",
        reqs[0]
    );
    assert_eq!(req_header(&reqs[0], "host"), (Some("other.example"), 1));
    assert!(reqs[1].starts_with("POST /up HTTP/1.1\r\n"), "{}", reqs[1]);
    assert_eq!(
        req_header(&reqs[1], "host"),
        (Some("other.example:8080"), 1)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_malformed_chunked_request_body_is_a_client_error() {
    let up = Scripted::start(|_| ok("ok")).await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    conn.send(
        "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    )
    .await;
    let r = conn.read_response().await;
    assert_eq!(r.status, 400, "{}", r.head);
    let errors = [
        "crier_upstream_errors_total{kind=\"connect\"}",
        "crier_upstream_errors_total{kind=\"timeout\"}",
        "crier_upstream_errors_total{kind=\"other\"}",
    ];
    for e in errors {
        assert_eq!(metric(&c, e).await, Some(0.0), "{e}");
    }
    assert_eq!(
        metric(&c, "crier_proxy_requests_total{code_class=\"4xx\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&c, "crier_proxy_requests_total{code_class=\"5xx\"}").await,
        Some(0.0)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_response_with_length_and_chunked_follows_the_chunks_on_both_paths() {
    // Content-Length says 3; the chunked body is longer, and is the one that counts.
    let up = Scripted::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n".to_vec(),
        )]
    })
    .await;
    let c = Crier::start(&up.url(), "").await;
    let mut conn = RawConn::connect(c.public).await;
    for req in [
        "GET /fast HTTP/1.1\r\nHost: a\r\n\r\n".to_string(),
        post("/hyper", "a", ""),
    ] {
        conn.send(&req).await;
        let r = conn.read_response().await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(!r.has_header("content-length"), "{}", r.head);
        assert_eq!(r.text(), "hello, world", "{req}");
    }
    // The connection is still in step: nothing left over from either body.
    assert_eq!(conn.get("/again").await.text(), "hello, world");
    c.shutdown().await;
}

/// Upgrades a raw connection to a WebSocket on crier's own push location.
async fn raw_ws(c: &Crier, path: &str) -> RawConn {
    let mut conn = RawConn::connect(c.public).await;
    conn.send(format!(
        "GET {path} HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ))
    .await;
    let r = conn.read_response().await;
    assert_eq!(r.status, 101, "{}", r.head);
    conn
}

/// A client frame: FIN, the opcode, masked (or not) with a fixed key; payloads < 126 bytes.
fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![
        0x80 | opcode,
        payload.len() as u8 | if masked { 0x80 } else { 0 },
    ];
    if masked {
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Reads one server frame: (opcode, payload).
async fn next_frame(conn: &mut RawConn) -> (u8, Vec<u8>) {
    let head = conn.read_bytes(2).await;
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => {
            let l = conn.read_bytes(2).await;
            u16::from_be_bytes([l[0], l[1]]) as usize
        }
        127 => panic!("no frame this large expected"),
        n => n as usize,
    };
    (head[0] & 0x0f, conn.read_bytes(len).await)
}

/// Reads server frames until a close frame; its status code.
async fn close_code(conn: &mut RawConn) -> u16 {
    loop {
        let (opcode, payload) = next_frame(conn).await;
        if opcode == 0x8 {
            assert!(payload.len() >= 2, "a close frame with a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test]
async fn websocket_protocol_errors_close_with_1002_or_1007() {
    let up = Scripted::start(|_| ok("ok")).await;
    let c = Crier::start(&up.url(), "").await;
    let cases: [(&str, Vec<u8>, u16); 4] = [
        ("reserved control opcode", frame(0xb, b"", true), 1002),
        ("bad utf-8", frame(0x1, b"ok \xff\xfe", true), 1007),
        ("unmasked", frame(0x1, b"hello", false), 1002),
        ("reserved data opcode", frame(0x3, b"", true), 1002),
    ];
    for (what, bytes, want) in cases {
        let mut conn = raw_ws(&c, "/live/corner").await;
        conn.send(&bytes).await;
        assert_eq!(close_code(&mut conn).await, want, "{what}");
    }
    // A valid frame keeps the connection (the location ignores client messages): a message
    // published after it still arrives.
    let mut conn = raw_ws(&c, "/live/fine").await;
    conn.send(frame(0x1, b"hello", true)).await;
    wait_subscribers(&c, "fine", 1).await;
    c.publish("fine", "after").await;
    loop {
        let (opcode, payload) = next_frame(&mut conn).await;
        assert_ne!(opcode, 0x8, "closed: {payload:?}");
        if opcode == 0x1 {
            assert_eq!(payload, b"after");
            break;
        }
    }
    c.shutdown().await;
}

/// A chunked response that sends its head and a first chunk, then what `rest` says.
fn partial_then(rest: Vec<Step>) -> Vec<Step> {
    let mut steps = vec![Step::Write(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n".to_vec(),
    )];
    steps.extend(rest);
    steps
}

/// The request that reaches the stalling or trickling upstream, on each engine.
fn both_paths(path: &str) -> [String; 2] {
    [
        format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n"),
        post(path, "a", ""),
    ]
}

#[tokio::test]
async fn an_upstream_body_idle_past_read_timeout_is_cut_on_both_paths() {
    let up = Scripted::start(|_| partial_then(vec![Step::Sleep(Duration::from_secs(60))])).await;
    let c = Crier::start(&up.url(), "[upstream]\nread_timeout = \"1s\"\n").await;
    for req in both_paths("/stall") {
        let mut conn = RawConn::connect(c.public).await;
        conn.send(&req).await;
        // Cut within the read limit of the harness (15 s), long before the upstream's 60 s.
        match conn.read_until_closed(Duration::from_secs(15)).await {
            ReadEnd::Closed(got) => {
                let got = String::from_utf8_lossy(&got).into_owned();
                assert!(got.starts_with("HTTP/1.1 200"), "{got}");
                assert!(got.contains("first"), "{got}");
                // Cut, not ended: no last chunk.
                assert!(!got.ends_with("0\r\n\r\n"), "{got}");
            }
            ReadEnd::StillOpen(got) => {
                panic!("{req}: not cut: {:?}", String::from_utf8_lossy(&got))
            }
        }
    }
    c.shutdown().await;
}

#[tokio::test]
async fn an_upstream_body_that_keeps_trickling_is_never_cut() {
    // Silences of 2.5 s: longer than response_timeout (2 s in the harness, which the fast path
    // used to apply between reads), shorter than read_timeout.
    let up = Scripted::start(|_| {
        let mut rest = Vec::new();
        for _ in 0..2 {
            rest.push(Step::Sleep(Duration::from_millis(2500)));
            rest.push(Step::Write(b"1\r\n.\r\n".to_vec()));
        }
        rest.push(Step::Write(b"0\r\n\r\n".to_vec()));
        partial_then(rest)
    })
    .await;
    let c = Crier::start(&up.url(), "[upstream]\nread_timeout = \"5s\"\n").await;
    let [fast, hyper] = both_paths("/trickle").map(|req| {
        let addr = c.public;
        tokio::spawn(async move {
            let mut conn = RawConn::connect(addr).await;
            conn.send(&req).await;
            (req, conn.read_response().await)
        })
    });
    for t in [fast, hyper] {
        let (req, r) = t.await.expect("request task");
        assert_eq!(r.status, 200, "{req}");
        assert_eq!(r.text(), "first..", "{req}");
    }
    c.shutdown().await;
}
