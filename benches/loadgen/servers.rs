//! Two tiny servers the benchmark needs: a fast upstream for the proxy workload (200, 13-byte
//! body, keep-alive; it counts the requests it answers, `/__count` tells the count) and the
//! GRIP backend that makes Pushpin hold subscribers on a channel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    /// Runtime threads (1 = a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// `upstream` only: wait this long before each answer (a server that far away).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

async fn serve<F, Fut>(listen: SocketAddr, handler: F) -> std::io::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    // A deep accept queue: Pushpin's zurl opens many backend connections at once during a ramp.
    let sock = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(listen)?;
    let l = sock.listen(4096)?;
    eprintln!("crier-loadgen: listening on {}", l.local_addr()?);
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(move |req| async move { Ok::<_, Infallible>(handler(req).await) });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// Requests the upstream answered, `/__count` excluded.
static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// `--delay-ms` (the handler is a plain `fn`-like closure, so the setting is a static).
static DELAY_MS: AtomicU64 = AtomicU64::new(0);

/// The proxy workload's upstream: every request gets `200 hello, world\n`, except
/// `GET /__count`, which gets the number of the others so far.
pub fn upstream(a: ServeArgs) -> std::io::Result<()> {
    DELAY_MS.store(a.delay_ms, Relaxed);
    runtime(a.threads)?.block_on(serve(a.listen, |req| async move {
        if req.uri().path() == "/__count" {
            let n = REQUESTS.load(Relaxed).to_string();
            return Response::new(Full::new(Bytes::from(n)));
        }
        let delay = DELAY_MS.load(Relaxed);
        if delay > 0 {
            // Read the body first, as a receiver that checks a signature does.
            let _ = req.into_body().collect().await;
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        REQUESTS.fetch_add(1, Relaxed);
        let mut r = Response::new(Full::new(Bytes::from_static(b"hello, world\n")));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    }))
}

/// Pushpin's backend: holds `GET /<anything>/{channel}` on `{channel}` (SSE: `Grip-Hold:
/// stream`; other GETs: `Grip-Hold: response`), and answers WebSocket-over-HTTP (the route's
/// `over_http`) by accepting the connection and subscribing it to `{channel}`.
pub fn grip(a: ServeArgs) -> std::io::Result<()> {
    runtime(a.threads)?.block_on(serve(a.listen, |req| async move { grip_handle(req).await }))
}

async fn grip_handle(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let channel = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    let is_ws = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/websocket-events"));
    let sse = req
        .headers()
        .get(header::ACCEPT)
        .is_some_and(|v| v.to_str().is_ok_and(|s| s.contains("text/event-stream")));
    if is_ws {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut out = Vec::new();
        if body.starts_with(b"OPEN") {
            let c = format!("c:{{\"type\":\"subscribe\",\"channel\":\"{channel}\"}}");
            out.extend_from_slice(b"OPEN\r\n");
            out.extend_from_slice(format!("TEXT {:x}\r\n{c}\r\n", c.len()).as_bytes());
        } else if body.windows(5).any(|w| w == b"CLOSE") {
            out.extend_from_slice(b"CLOSE\r\n");
        }
        let mut r = Response::new(Full::new(Bytes::from(out)));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/websocket-events"),
        );
        h.insert("sec-websocket-extensions", HeaderValue::from_static("grip"));
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::new()));
    let h = r.headers_mut();
    let ch = HeaderValue::from_str(&channel).unwrap_or(HeaderValue::from_static("none"));
    h.insert("grip-channel", ch);
    if sse {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert("grip-hold", HeaderValue::from_static("stream"));
    } else {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("grip-hold", HeaderValue::from_static("response"));
        h.insert("grip-timeout", HeaderValue::from_static("30"));
    }
    r
}
