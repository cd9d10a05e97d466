//! The publish API (loopback TCP and the Unix socket) and the `crier publish` command.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

fn unix_req(method: Method, path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

/// An SSE event within 10s.
async fn event(sse: &mut SseClient) -> SseEvent {
    sse.next_within(Duration::from_secs(10))
        .await
        .expect("an event within 10s")
        .expect("the stream is open")
}

#[tokio::test]
async fn publish_over_tcp_and_unix_socket() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut sse = SseClient::connect(&c.url("/live/both"), None).await;

    let (status, v) = publish_with(&c, "both", &[], "over tcp").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(v["channel"], "both");
    assert_eq!(v["subscribers"], 1);
    assert_eq!(v["buffered"], 1);
    let tcp_id = v["id"].as_str().expect("id").to_string();

    let (status, body) = unix_request(
        &c.publish_unix,
        unix_req(Method::POST, "/pub/both", "over unix"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let v = json(&body);
    assert_eq!(v["channel"], "both");
    assert_eq!(v["subscribers"], 1);
    assert_eq!(v["buffered"], 2);
    let unix_id = v["id"].as_str().unwrap().to_string();

    let e = event(&mut sse).await;
    assert_eq!(
        (e.id.as_deref(), e.data.as_str()),
        (Some(tcp_id.as_str()), "over tcp")
    );
    let e = event(&mut sse).await;
    assert_eq!(
        (e.id.as_deref(), e.data.as_str()),
        (Some(unix_id.as_str()), "over unix")
    );

    // GET, then DELETE over the Unix socket as well.
    let (status, body) =
        unix_request(&c.publish_unix, unix_req(Method::GET, "/pub/both", "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["last_id"], unix_id.as_str());
    let (status, _) =
        unix_request(&c.publish_unix, unix_req(Method::DELETE, "/pub/both", "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sse.next_within(Duration::from_secs(10)).await, Ok(None));
    c.shutdown().await;
}

#[tokio::test]
async fn get_channel_reports_subscribers_buffered_and_last_id() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_messages = 2\n").await;
    let (status, v) = channel_info(&c, "info").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string(), "{v}");

    let _a = SseClient::connect(&c.url("/live/info"), None).await;
    let _b = SseClient::connect(&c.url("/live/info"), None).await;
    let (status, v) = channel_info(&c, "info").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["channel"], "info");
    assert_eq!(v["subscribers"], 2);
    assert_eq!(v["buffered"], 0);
    assert!(v["last_id"].is_null(), "{v}");

    let mut last = String::new();
    for i in 0..3 {
        last = c.publish("info", format!("m{i}")).await;
    }
    let (_, v) = channel_info(&c, "info").await;
    assert_eq!(v["buffered"], 2, "bounded by buffer_messages");
    assert_eq!(v["last_id"], last.as_str());
    assert_eq!(v["subscribers"], 2);
    c.shutdown().await;
}

#[tokio::test]
async fn delete_unknown_channel_is_404() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let r = client().delete(c.pub_url("nobody")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"].is_string(), "{v}");
    c.publish("somebody", "x").await;
    let r = client().delete(c.pub_url("somebody")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(channel_info(&c, "somebody").await.0, StatusCode::NOT_FOUND);
    let r = client().delete(c.pub_url("somebody")).send().await.unwrap();
    assert_eq!(r.status(), 404, "deleted once");
    c.shutdown().await;
}

#[tokio::test]
async fn publish_errors_are_json_with_the_right_status() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nmax_message_size = \"1KiB\"\nmax_channels = 2\n",
    )
    .await;
    let cl = client();
    let err = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let ct = r.headers().get("content-type").cloned();
        let v: serde_json::Value = r.json().await.expect("a JSON error body");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert_eq!(ct.unwrap(), "application/json");
        status
    };
    // Bad channel names.
    let long = "x".repeat(129);
    for bad in ["a%20b", "a!", long.as_str(), "", "a/b"] {
        let r = cl.post(c.pub_url(bad)).body("x").send().await.unwrap();
        assert_eq!(err(r).await, 400, "channel {bad:?}");
    }
    let (s, _) = publish_with(&c, &"y".repeat(128), &[], "x").await;
    assert_eq!(s, 201, "128 characters is fine");
    // Wrong method: 405 with Allow.
    let r = cl.patch(c.pub_url("m")).body("x").send().await.unwrap();
    let allow = r
        .headers()
        .get("allow")
        .expect("Allow")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(err(r).await, 405);
    for m in ["GET", "POST", "DELETE"] {
        assert!(allow.contains(m), "{allow}");
    }
    // Size: exactly max_message_size is fine, one byte more is 413 (declared or chunked).
    let (s, _) = publish_with(&c, "m", &[], vec![b'a'; 1024]).await;
    assert_eq!(s, 201);
    let r = cl
        .post(c.pub_url("m"))
        .body(vec![b'a'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "the unread body ends the connection, and the 413 says so"
    );
    assert_eq!(err(r).await, 413);
    let chunks = futures_util::stream::iter(
        (0..5).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'b'; 300]))),
    );
    let r = cl
        .post(c.pub_url("m"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(err(r).await, 413, "a chunked body over the limit");
    // Event names.
    let r = cl
        .post(c.pub_url("m"))
        .header("crier-event", "two words")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(err(r).await, 400);
    // max_channels = 2 ("yyy…" and "m" exist): a third channel is 429, old ones still work.
    let r = cl.post(c.pub_url("third")).body("x").send().await.unwrap();
    assert_eq!(err(r).await, 429);
    let (s, _) = publish_with(&c, "m", &[], "still fine").await;
    assert_eq!(s, 201);
    // Not the publish API at all.
    let r = cl
        .post(format!("http://{}/elsewhere", c.publish))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(err(r).await, 404);
    c.shutdown().await;
}

#[tokio::test]
async fn publish_api_is_not_served_on_the_public_listener() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let r = client()
        .post(c.url("/pub/sneaky"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        "hello from upstream",
        "proxied, not published"
    );
    assert_eq!(channel_info(&c, "sneaky").await.0, StatusCode::NOT_FOUND);
    c.shutdown().await;
}

/// Runs the built `crier` binary (off the runtime: the server under test runs on it).
async fn crier_cli(args: Vec<String>, stdin: Option<&'static str>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
        cmd.args(&args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run crier");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut w = child.stdin.take().unwrap();
            w.write_all(input.as_bytes()).unwrap();
        }
        child.wait_with_output().expect("crier output")
    })
    .await
    .unwrap()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn crier_publish_command() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let mut sse = SseClient::connect(&c.url("/live/cli"), None).await;
    let sock = c.publish_unix.display().to_string();
    let url = format!("http://{}", c.publish);

    // --socket, message argument, --event.
    let out = crier_cli(
        args(&[
            "publish",
            "--socket",
            &sock,
            "--event",
            "note",
            "cli",
            "from the socket",
        ]),
        None,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let v = json(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(v["channel"], "cli");
    assert_eq!(v["subscribers"], 1);
    let e = event(&mut sse).await;
    assert_eq!(e.data, "from the socket");
    assert_eq!(e.event.as_deref(), Some("note"));
    assert_eq!(e.id.as_deref(), v["id"].as_str());

    // --url, message from stdin.
    let out = crier_cli(
        args(&["publish", "--url", &url, "cli"]),
        Some("from\nstdin"),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let v = json(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(v["buffered"], 2);
    let e = event(&mut sse).await;
    assert_eq!(e.data, "from\nstdin");
    assert_eq!(e.event, None);

    // Errors exit 1: a refused publish (its JSON error is printed), a bad target.
    let out = crier_cli(args(&["publish", "--url", &url, "bad!name", "x"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(json(String::from_utf8_lossy(&out.stdout).trim())["error"].is_string());
    let out = crier_cli(args(&["publish", "--url", &url, "no spaces", "x"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let missing = format!("{sock}.missing");
    let out = crier_cli(args(&["publish", "--socket", &missing, "cli", "x"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!out.stderr.is_empty(), "says why");
    let dead = format!("http://{}", dead_addr().await);
    let out = crier_cli(args(&["publish", "--url", &dead, "cli", "x"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = crier_cli(args(&["publish", "--url", "ftp://nope", "cli", "x"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_quiet(&mut sse).await;
    c.shutdown().await;
}

async fn assert_quiet(sse: &mut SseClient) {
    if let Ok(ev) = sse.next_within(Duration::from_millis(300)).await {
        panic!("expected no further event, got {ev:?}");
    }
}

#[tokio::test]
async fn stale_socket_is_replaced_and_live_one_refuses_start() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("publish.sock");
    // A stale socket file: bound once, nobody listening any more.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let c = Crier::try_start_at(&path, &up.url(), "")
        .await
        .expect("starts over a stale socket");
    let (status, _) = unix_request(&path, unix_req(Method::POST, "/pub/s", "hi")).await;
    assert_eq!(status, StatusCode::CREATED);

    // A second crier on the same, live socket refuses to start...
    let err = match Crier::try_start_at(&path, &up.url(), "").await {
        Err(e) => e,
        Ok(_) => panic!("a second crier started on a live publish socket"),
    };
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("another process"), "{err}");
    // ...and leaves the first one's socket alone.
    let (status, _) = unix_request(&path, unix_req(Method::POST, "/pub/s", "still")).await;
    assert_eq!(status, StatusCode::CREATED);
    c.shutdown().await;
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_not_removed() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("publish.sock");
    std::fs::write(&path, "precious").unwrap();
    let err = Crier::try_start_at(&path, &up.url(), "")
        .await
        .err()
        .expect("refuses to start");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}
