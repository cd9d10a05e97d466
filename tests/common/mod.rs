//! Shared test harness: crier in-process on port 0 with a real upstream app behind it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use crier::{Config, Server, ServerHandle};
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub mod process;
pub mod raw;
pub mod redis;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running crier: its real addresses and a handle to stop or reload it.
pub struct Crier {
    pub public: SocketAddr,
    pub publish: SocketAddr,
    pub publish_unix: PathBuf,
    pub admin: SocketAddr,
    pub handle: ServerHandle,
    pub done: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Crier {
    /// Starts crier in front of `upstream` with extra TOML appended to a base config that
    /// puts every listener on port 0 and the publish socket in a temp dir.
    pub async fn start(upstream: &str, extra: &str) -> Crier {
        Self::try_start(upstream, extra)
            .await
            .expect("crier starts")
    }

    pub async fn try_start(upstream: &str, extra: &str) -> Result<Crier, String> {
        raise_fd_limit();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let sock = dir.path().join("publish.sock");
        Self::try_start_in(dir, &sock, upstream, extra).await
    }

    /// Like `try_start`, with the publish Unix socket at `sock` (publish socket tests).
    pub async fn try_start_at(
        sock: &std::path::Path,
        upstream: &str,
        extra: &str,
    ) -> Result<Crier, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        Self::try_start_in(dir, sock, upstream, extra).await
    }

    async fn try_start_in(
        dir: tempfile::TempDir,
        sock: &std::path::Path,
        upstream: &str,
        extra: &str,
    ) -> Result<Crier, String> {
        let toml = base_config(upstream, sock, extra);
        let config = Config::from_toml(&toml, None).map_err(|e| e.to_string())?;
        let server = Server::bind(config).await.map_err(|e| e.to_string())?;
        let a = server.addrs().clone();
        let handle = server.handle();
        let done = tokio::spawn(server.run());
        Ok(Crier {
            public: a.public[0],
            publish: a.publish[0],
            publish_unix: a.publish_unix.clone().unwrap_or_default(),
            admin: a.admin.expect("admin listener"),
            handle,
            done,
            _dir: dir,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    pub fn pub_url(&self, channel: &str) -> String {
        format!("http://{}/pub/{}", self.publish, channel)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.public, path)
    }

    /// Publishes over loopback TCP; returns the message id.
    pub async fn publish(&self, channel: &str, body: impl Into<reqwest::Body>) -> String {
        let r = client()
            .post(self.pub_url(channel))
            .body(body)
            .send()
            .await
            .expect("publish");
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "publish answered {}",
            r.status()
        );
        let v: serde_json::Value = r.json().await.expect("publish json");
        v["id"].as_str().expect("id").to_string()
    }

    pub async fn shutdown(self) {
        self.handle.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(40), self.done).await;
    }
}

pub fn base_config(upstream: &str, sock: &std::path::Path, extra: &str) -> String {
    let (server_extra, rest) = split_server_section(extra);
    let (publish_extra, rest) = take_section(&rest, "[publish]");
    let (upstream_extra, rest) = take_section(&rest, "[upstream]");
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{server_extra}\n\
         [upstream]\nurl = \"{upstream}\"\nconnect_timeout = \"1s\"\nresponse_timeout = \"2s\"\n{upstream_extra}\n\
         [publish]\nunix = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n{publish_extra}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n{rest}",
        sock.display()
    )
}

/// Takes the lines of a `header` section (e.g. `[publish]`) out of `extra`, so they join the
/// base config's section of that name: (its lines, the rest).
fn take_section(extra: &str, header: &str) -> (String, String) {
    let mut taken = String::new();
    let mut rest = String::new();
    let mut inside = false;
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == header;
            if inside {
                continue;
            }
        }
        let out = if inside { &mut taken } else { &mut rest };
        out.push_str(line);
        out.push('\n');
    }
    (taken, rest)
}

/// Lines before the first `[section]` of `extra` belong to `[server]`.
fn split_server_section(extra: &str) -> (String, String) {
    let first = if extra.starts_with('[') {
        Some(0)
    } else {
        extra.find("\n[")
    };
    match first {
        Some(i) => (extra[..i].to_string(), extra[i..].to_string()),
        None => (extra.to_string(), String::new()),
    }
}

/// Tests hold both ends of many connections in one process: lift the soft fd limit.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only touch the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

// ---------------------------------------------------------------------------------------
// The upstream app.

type UpBody = UnsyncBoxBody<Bytes, BoxError>;

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// A small HTTP/1.1 app on port 0:
/// - `/echo`: JSON with method, path, headers and body length + body (as text);
/// - `/slow`: a chunk, then a pause of 1s, then a second chunk;
/// - `/delay?ms=N`: answers after N ms;
/// - `/big?bytes=N`: streams N bytes in 64 KiB chunks;
/// - `/upload`: counts the request body and answers the byte count;
/// - `/ws`: a WebSocket echo;
/// - `/status/N`: answers status N;
/// - `/auth/check` (and `/auth/check?...`): a forward-auth endpoint, see [`auth_check`];
/// - anything else: 200 "hello from upstream".
pub struct Upstream {
    pub addr: SocketAddr,
    /// What the auth endpoint saw.
    pub auth: AuthLog,
}

/// The requests the upstream's `/auth/check` endpoint received.
#[derive(Clone, Default)]
pub struct AuthLog(Arc<Mutex<Vec<AuthSeen>>>);

/// One request to `/auth/check`.
#[derive(Debug, Clone)]
pub struct AuthSeen {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
}

impl AuthLog {
    pub fn calls(&self) -> usize {
        self.0.lock().expect("auth log").len()
    }

    pub fn all(&self) -> Vec<AuthSeen> {
        self.0.lock().expect("auth log").clone()
    }

    pub fn last(&self) -> Option<AuthSeen> {
        self.0.lock().expect("auth log").last().cloned()
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let auth = AuthLog::default();
        let log = auth.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            if req.uri().path().starts_with("/auth/") {
                                return Ok::<_, Infallible>(auth_check(req, &log).await);
                            }
                            upstream_handle(req).await
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream { addr, auth }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn upstream_handle(mut req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let num = |k: &str| -> u64 {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(key, _)| *key == k)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    let resp = match path.as_str() {
        "/echo" => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
                    )
                })
                .collect();
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let version = format!("{:?}", req.version());
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v = serde_json::json!({
                "method": method,
                "uri": uri,
                "version": version,
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
                "body_len": body.len(),
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("connection", "x-upstream-hop")
                .header("x-upstream-hop", "secret")
                .header("keep-alive", "timeout=5")
                .body(full(v.to_string()))
                .expect("response")
        }
        "/slow" => {
            let s = futures_util::stream::unfold(0u8, |n| async move {
                match n {
                    0 => Some((
                        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"first\n"))),
                        1,
                    )),
                    1 => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"second\n"))), 2))
                    }
                    _ => None,
                }
            });
            Response::new(StreamBody::new(s).boxed_unsync())
        }
        "/delay" => {
            tokio::time::sleep(Duration::from_millis(num("ms"))).await;
            Response::new(full("late"))
        }
        "/big" => {
            let total = num("bytes");
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let s = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let n = left.min(chunk.len() as u64);
                    Some((
                        Ok::<_, BoxError>(Frame::data(chunk.slice(..n as usize))),
                        left - n,
                    ))
                }
            });
            Response::new(StreamBody::new(s).boxed_unsync())
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Response::new(full(n.to_string()))
        }
        "/ws" if hyper_tungstenite::is_upgrade_request(&req) => {
            match hyper_tungstenite::upgrade(&mut req, None) {
                Ok((resp, ws)) => {
                    tokio::spawn(async move {
                        let Ok(mut ws) = ws.await else { return };
                        while let Some(Ok(m)) = ws.next().await {
                            if m.is_text() || m.is_binary() {
                                use futures_util::SinkExt;
                                if ws.send(m).await.is_err() {
                                    break;
                                }
                            }
                        }
                    });
                    let (parts, body) = resp.into_parts();
                    Response::from_parts(parts, body.map_err(|e| match e {}).boxed_unsync())
                }
                Err(_) => Response::builder()
                    .status(400)
                    .body(full("bad upgrade"))
                    .expect("response"),
            }
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            Response::builder()
                .status(code)
                .body(full(format!("status {code}")))
                .expect("response")
        }
        _ => Response::new(full("hello from upstream")),
    };
    Ok(resp)
}

/// The upstream's forward-auth endpoint (`/auth/...`). It logs the request, then decides by
/// `X-Crier-Channel` and the credentials:
/// - channel `slow*`: waits 3 s, then 200; `boom*`: 500; `moved*`: 302; `huge*`: 401 with a
///   100 KiB body;
/// - `Cookie: session=good` or `Authorization: Bearer good-token`: 200 (with a small body),
///   except channel `secret*`: 403 "not your channel";
/// - otherwise 401 "log in first" with `WWW-Authenticate: Cookie realm="app"` (and an
///   `x-app-internal` header that must not reach the subscriber).
async fn auth_check(req: Request<Incoming>, log: &AuthLog) -> Response<UpBody> {
    log.0.lock().expect("auth log").push(AuthSeen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    let h = req.headers();
    let channel = h
        .get("x-crier-channel")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let good = h
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|c| c.split(';').any(|p| p.trim() == "session=good"))
        || h.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer good-token");
    let status = |code: u16, body: &str| {
        Response::builder()
            .status(code)
            .header("content-type", "text/plain")
            .body(full(body.to_string()))
            .expect("response")
    };
    if channel.starts_with("slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
        return status(200, "ok");
    }
    if channel.starts_with("boom") {
        return status(500, "auth backend exploded");
    }
    if channel.starts_with("moved") {
        return Response::builder()
            .status(302)
            .header("location", "/login")
            .body(full("go log in"))
            .expect("response");
    }
    if channel.starts_with("huge") {
        return status(401, &"x".repeat(100 * 1024));
    }
    if !good {
        return Response::builder()
            .status(401)
            .header("content-type", "text/plain")
            .header("www-authenticate", "Cookie realm=\"app\"")
            .header("x-app-internal", "do-not-leak")
            .body(full("log in first\n"))
            .expect("response");
    }
    if channel.starts_with("secret") {
        return status(403, "not your channel\n");
    }
    status(200, "welcome")
}

/// An address where nothing listens (bound, then closed).
pub async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr")
}

// ---------------------------------------------------------------------------------------
// Subscriber clients.

/// One SSE event as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// A minimal EventSource parser over a reqwest byte stream (the WHATWG algorithm).
/// `next_event` is cancel-safe: a half-read event stays in the client, so it may be wrapped
/// in a timeout.
pub struct SseClient {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: Vec<u8>,
    pub response_headers: reqwest::header::HeaderMap,
    pub retry: Option<u64>,
    /// How many `retry:` fields arrived.
    pub retries: usize,
    pub comments: usize,
    pub last_id: Option<String>,
    /// The event being read (fields seen so far) and its data buffer.
    pending: SseEvent,
    pending_data: Option<String>,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> SseClient {
        Self::connect_with(&client(), url, last_event_id).await
    }

    /// `connect` without a position, for futures that must own their URL.
    pub async fn connect_owned(url: String) -> SseClient {
        Self::connect(&url, None).await
    }

    /// Connects with a shared client (many subscribers, HTTP/2).
    pub async fn connect_with(
        client: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        let mut req = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.expect("sse connect");
        assert_eq!(resp.status(), 200, "sse status");
        Self::from_response(resp)
    }

    /// Parses the body of a response already received.
    pub fn from_response(resp: reqwest::Response) -> SseClient {
        let response_headers = resp.headers().clone();
        SseClient {
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            response_headers,
            retry: None,
            retries: 0,
            comments: 0,
            last_id: None,
            pending: SseEvent::default(),
            pending_data: None,
        }
    }

    /// The next event, or None when the stream ended.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(line) = self.take_line() {
                if line.is_empty() {
                    let ev = std::mem::take(&mut self.pending);
                    if let Some(mut d) = self.pending_data.take() {
                        if d.ends_with('\n') {
                            d.pop();
                        }
                        return Some(SseEvent {
                            id: self.last_id.clone(),
                            event: ev.event,
                            data: d,
                        });
                    }
                    continue;
                }
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                    None => (line.clone(), String::new()),
                };
                match field.as_str() {
                    "data" => {
                        let d = self.pending_data.get_or_insert_with(String::new);
                        d.push_str(&value);
                        d.push('\n');
                    }
                    "id" => self.last_id = Some(value),
                    "event" => self.pending.event = Some(value),
                    "retry" => {
                        self.retry = value.parse().ok();
                        self.retries += 1;
                    }
                    _ => {}
                }
            }
            match self.stream.next().await {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                _ => return None,
            }
        }
    }

    /// The next event within `d`: Ok(None) when the stream ended, Err when nothing came.
    pub async fn next_within(&mut self, d: Duration) -> Result<Option<SseEvent>, ()> {
        tokio::time::timeout(d, self.next_event())
            .await
            .map_err(|_| ())
    }

    /// Splits at CRLF, LF or CR, as EventSource does.
    fn take_line(&mut self) -> Option<String> {
        let i = self.buf.iter().position(|b| *b == b'\n' || *b == b'\r')?;
        if self.buf[i] == b'\r' && i + 1 == self.buf.len() {
            return None; // maybe CRLF split across reads
        }
        let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
        let skip = if self.buf[i] == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        self.buf.drain(..i + skip);
        Some(line)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.response_headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// Polls `check` until it is true or `within` passes.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads one metric sample (exact name with labels) from `/metrics`.
pub async fn metric(c: &Crier, sample: &str) -> Option<f64> {
    metric_at(c.admin, sample).await
}

/// Reads one metric sample from the `/metrics` of the admin listener at `admin`.
pub async fn metric_at(admin: SocketAddr, sample: &str) -> Option<f64> {
    let text = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Connects a raw HTTP client over a Unix socket (for publish tests).
pub async fn unix_request(
    path: &std::path::Path,
    req: Request<Full<Bytes>>,
) -> (StatusCode, String) {
    let s = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect unix");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let r = tx.send_request(req).await.expect("send");
    let status = r.status();
    let b = r.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}

pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}

/// A reqwest client that speaks HTTP/2 without TLS (h2c prior knowledge).
pub fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("reqwest h2 client")
}

// ---------------------------------------------------------------------------------------
// WebSocket subscribers (tokio-tungstenite).

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
pub type WsResponse = tokio_tungstenite::tungstenite::handshake::client::Response;

/// Opens a WebSocket to `url` with extra request headers (`Origin`, `Sec-WebSocket-Protocol`).
pub async fn ws_try_connect(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, WsResponse), tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            http::HeaderValue::from_str(v).expect("header value"),
        );
    }
    tokio_tungstenite::connect_async(req).await
}

pub async fn ws_connect(url: &str, headers: &[(&str, &str)]) -> (Ws, WsResponse) {
    ws_try_connect(url, headers)
        .await
        .expect("websocket connect")
}

/// The next data or close frame (pings are answered by tungstenite and skipped), within 10s.
/// None when the stream ended without a close frame.
pub async fn ws_next(ws: &mut Ws) -> Option<tokio_tungstenite::tungstenite::Message> {
    use tokio_tungstenite::tungstenite::Message;
    let read = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(m) => return Some(m),
                Err(_) => return None,
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a websocket frame within 10s")
}

/// One `crier.json` frame: `{"id","event","data"|"data_b64"}`.
pub fn ws_json(m: &tokio_tungstenite::tungstenite::Message) -> serde_json::Value {
    match m {
        tokio_tungstenite::tungstenite::Message::Text(t) => {
            serde_json::from_str(t.as_str()).expect("crier.json frame is JSON")
        }
        other => panic!("expected a crier.json text frame, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Long-poll.

/// One long-poll answer.
#[derive(Debug)]
pub struct Polled {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub content_type: Option<String>,
    pub resume: Option<String>,
    pub headers: reqwest::header::HeaderMap,
    pub body: Bytes,
}

/// One long-poll request; `etag` goes in `If-None-Match` as is (e.g. `"1732400000123-0"`).
pub async fn longpoll(client: &reqwest::Client, url: &str, etag: Option<&str>) -> Polled {
    let mut req = client.get(url);
    if let Some(e) = etag {
        req = req.header("if-none-match", e);
    }
    let r = req.send().await.expect("long-poll request");
    let h = r.headers().clone();
    let s = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Polled {
        status: r.status(),
        etag: s("etag"),
        content_type: s("content-type"),
        resume: s("crier-resume"),
        body: r.bytes().await.expect("long-poll body"),
        headers: h,
    }
}

// ---------------------------------------------------------------------------------------
// Publish API.

/// GET /pub/{channel}: the status and the JSON (Null when not JSON).
pub async fn channel_info(c: &Crier, channel: &str) -> (StatusCode, serde_json::Value) {
    let r = client()
        .get(c.pub_url(channel))
        .send()
        .await
        .expect("channel info");
    let status = r.status();
    let v = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// Waits until the channel has `n` subscribers (per `GET /pub/{channel}`).
pub async fn wait_subscribers(c: &Crier, channel: &str, n: u64) {
    let ok = eventually(Duration::from_secs(10), async || {
        channel_info(c, channel).await.1["subscribers"].as_u64() == Some(n)
    })
    .await;
    assert!(ok, "channel {channel} never had {n} subscribers");
}

/// `POST http://<publish>/pub/<target>` (target may carry a query) with extra headers.
pub async fn publish_with(
    c: &Crier,
    target: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (StatusCode, serde_json::Value) {
    let mut req = client().post(c.pub_url(target)).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("publish");
    let status = r.status();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}
