//! The HTTP/1.1 fast path of the reverse proxy, for the common case: a body-less `GET`,
//! `HEAD` or `OPTIONS` on a plain-TCP keep-alive connection. The request head is parsed once
//! (httparse) and rewritten straight into the bytes sent upstream; the response head is
//! rewritten the same way and its body is copied through as it arrives, still framed
//! (Content-Length or chunked), over raw pooled upstream sockets. No header maps, no
//! per-request tasks or channels: one task, one buffer each way.
//!
//! Why: through hyper's server and client a proxied request cost ~6.5 µs of user-space CPU
//! here against nginx's ~2.6 µs (the kernel's share, ~12 µs, is the same for both); the
//! profile is flat (header maps, the client's pool and dispatch channel, per-request tasks
//! and timers), so only doing less helps.
//!
//! Everything else (bodies, upgrades, `Expect`, HTTP/1.0, push locations, requests a
//! `[[publish_on]]` rule takes, odd heads) is left to hyper: the caller gets the bytes read so
//! far back and hyper serves the connection from there. The semantics are the hyper path's: hop-by-hop headers stripped both ways,
//! `X-Forwarded-*` set, `response_timeout` → 504, `read_timeout` between body reads,
//! upstream failures → 502 on a connection that stays usable.
//!
//! The files: `request.rs` (the request head), `response.rs` (the response head and its
//! framing), `chunked.rs` (where a chunked body ends), `pool.rs` (raw upstream connections);
//! here the connection loop and one exchange.

pub(crate) mod chunked;
mod pool;
pub(crate) mod request;
pub(crate) mod response;

use std::io;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Proxy, UpstreamFailure};
use crate::model::ConnInfo;
use chunked::ChunkScanner;
pub use pool::Pool;
use pool::Upstream;
use request::{prepare, Prepared};
use response::{read_head, Framing, ResponseHead};

/// The client read buffer's starting size (request heads).
const CLIENT_BUF: usize = 4 * 1024;

/// What the fast path did with a connection.
pub enum Served {
    /// The connection is over (closed by either side, timed out or drained).
    Closed,
    /// A request the fast path does not take: hyper serves the connection from here,
    /// starting with these bytes, already read from the socket.
    Handoff(Vec<u8>),
}

/// What the fast path needs from the live config; read again for every request, so a
/// reload applies to open connections as it does on the hyper path.
pub trait Site {
    fn proxy(&self) -> &Proxy;
    /// True when the fast path may relay this request (the path without query): it goes to
    /// the upstream, and nothing (a `[[publish_on]]` rule) needs hyper's path for it.
    fn proxies(&self, method: &str, path: &str) -> bool;
    fn header_timeout(&self) -> Duration;
    fn max_header_bytes(&self) -> usize;
    fn max_headers(&self) -> usize;
}

/// Serves requests on a plain-TCP HTTP/1.1 connection until it ends or a request needs hyper.
pub async fn serve<S: Site, F: Fn() -> S>(
    stream: &mut TcpStream,
    site: F,
    conn: &ConnInfo,
    drain: &CancellationToken,
) -> Served {
    let mut buf: Vec<u8> = Vec::with_capacity(CLIENT_BUF);
    let mut upstream_head: Vec<u8> = Vec::new();
    let mut client_head: Vec<u8> = Vec::new();
    loop {
        let mut live = site();
        // The timeout bounds the whole head (and the idle wait before it), not each read: a
        // client trickling a byte at a time is cut like a silent one.
        let deadline = tokio::time::Instant::now() + live.header_timeout();
        let req = loop {
            if !buf.is_empty() {
                // The config as it is when the request arrives (a reload may have come
                // while the connection sat idle), as on the hyper path.
                live = site();
            }
            let limits = (live.max_header_bytes(), live.max_headers());
            match prepare(&buf, conn, &mut upstream_head, limits, |m, p| {
                live.proxies(m, p)
            }) {
                Prepared::Ready(r) => break r,
                Prepared::NotOurs => return Served::Handoff(buf),
                Prepared::Partial if buf.len() >= live.max_header_bytes() => {
                    return Served::Handoff(buf); // hyper answers 431
                }
                Prepared::Partial => {}
            }
            let idle = buf.is_empty();
            if idle && drain.is_cancelled() {
                return Served::Closed;
            }
            if buf.capacity() == buf.len() {
                buf.reserve(CLIENT_BUF);
            }
            let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf));
            let n = tokio::select! {
                r = read => r,
                // An idle keep-alive connection closes at once when the drain begins.
                _ = drain.cancelled(), if idle => return Served::Closed,
            };
            match n {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Served::Closed,
                Ok(Ok(_)) => {}
            }
        };
        let logged = crate::access_log::on()
            .then(|| AccessHead::parse(&buf[..req.head_len], conn.peer))
            .flatten();
        buf.drain(..req.head_len);
        let ex = live
            .proxy()
            .exchange(&upstream_head, &mut client_head, stream, &req)
            .await;
        if let Some(l) = logged {
            l.log(&ex);
        }
        let keep = ex.keep;
        if !keep || req.close || drain.is_cancelled() {
            let _ = stream.shutdown().await;
            return Served::Closed;
        }
        if buf.is_empty() && buf.capacity() > CLIENT_BUF {
            buf = Vec::with_capacity(CLIENT_BUF);
        }
    }
}

/// A request the fast path takes, its upstream head already written.
pub(crate) struct Request {
    pub(crate) head_len: usize,
    /// `HEAD`: the response has no body whatever its headers say.
    pub(crate) head_only: bool,
    /// The client asked to close after this response.
    pub(crate) close: bool,
}

/// How one exchange went: for the connection (keep) and the access log.
struct Exchanged {
    /// The client connection can carry another request.
    keep: bool,
    status: u16,
    /// Body bytes written to the client.
    bytes: u64,
    /// The whole response went out.
    complete: bool,
}

/// The request line and the headers the access log names, read again from the head only
/// when the log is on.
struct AccessHead {
    peer: std::net::SocketAddr,
    method: String,
    target: String,
    version: &'static str,
    referer: String,
    user_agent: String,
    started: Instant,
}

impl AccessHead {
    fn parse(head: &[u8], peer: std::net::SocketAddr) -> Option<AccessHead> {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(head).ok()?;
        let find = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default()
        };
        Some(AccessHead {
            peer,
            method: req.method?.to_string(),
            target: req.path?.to_string(),
            version: if req.version == Some(0) {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            },
            referer: find("referer"),
            user_agent: find("user-agent"),
            started: Instant::now(),
        })
    }

    fn log(&self, ex: &Exchanged) {
        crate::access_log::proxied(&crate::access_log::Proxied {
            peer: self.peer,
            method: &self.method,
            target: &self.target,
            version: self.version,
            status: ex.status,
            bytes: ex.bytes,
            referer: &self.referer,
            user_agent: &self.user_agent,
            duration: self.started.elapsed(),
            complete: ex.complete,
        });
    }
}

impl Proxy {
    /// One request over the fast path: send, relay the response.
    async fn exchange(
        &self,
        upstream_head: &[u8],
        client_head: &mut Vec<u8>,
        client: &mut TcpStream,
        req: &Request,
    ) -> Exchanged {
        let started = Instant::now();
        let (mut up, head) = match self.send_h1(upstream_head, req, client_head).await {
            Ok(pair) => pair,
            Err(f) => {
                self.metrics
                    .proxy_duration
                    .observe(started.elapsed().as_secs_f64());
                f.count(&self.metrics);
                self.metrics.proxy_response(f.status().as_u16());
                let reason = f.reason();
                let sent = write_error(client, f.status(), &reason).await.is_ok();
                return Exchanged {
                    keep: sent,
                    status: f.status().as_u16(),
                    bytes: reason.len() as u64,
                    complete: sent,
                };
            }
        };
        self.metrics
            .proxy_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.proxy_response(head.status);
        up.pos += head.head_len;
        let mut bytes = 0;
        let relayed = self
            .relay_body(&mut up, head.framing, client_head, client, &mut bytes)
            .await;
        let (keep, complete) = match relayed {
            Ok(rest_ok) => {
                if rest_ok && head.reusable {
                    self.fast.checkin(up);
                }
                (!matches!(head.framing, Framing::UntilClose), true)
            }
            Err(e) => {
                tracing::debug!("proxied response cut short: {e}");
                (false, false)
            }
        };
        Exchanged {
            keep,
            status: head.status,
            bytes,
            complete,
        }
    }

    /// Sends the request and reads the response head, writing the client's head into
    /// `client_head`. A pooled connection the upstream had closed is retried once on a new one.
    async fn send_h1(
        &self,
        upstream_head: &[u8],
        req: &Request,
        client_head: &mut Vec<u8>,
    ) -> Result<(Upstream, ResponseHead), UpstreamFailure> {
        let mut pooled = self.fast.checkout();
        loop {
            let reused = pooled.is_some();
            let mut up = match pooled.take() {
                Some(u) => u,
                None => self
                    .fast
                    .connect()
                    .await
                    .map_err(|e| UpstreamFailure::connect(&e))?,
            };
            let sent = async {
                up.io.write_all(upstream_head).await?;
                read_head(&mut up, req, client_head).await
            };
            match tokio::time::timeout(self.response_timeout, sent).await {
                Err(_) => return Err(UpstreamFailure::NoAnswer(self.response_timeout)),
                Ok(Ok(Ok(head))) => return Ok((up, head)),
                Ok(Ok(Err(bad))) => return Err(UpstreamFailure::Failed(bad.to_string())),
                // Only GET/HEAD/OPTIONS come here, so sending again is safe.
                Ok(Err(_)) if reused => continue,
                Ok(Err(e)) => return Err(UpstreamFailure::Failed(e.to_string())),
            }
        }
    }

    /// Writes the client's head and the body as framed; Ok(true) when the upstream
    /// connection ended cleanly at the end of the body (it may be reused).
    async fn relay_body(
        &self,
        up: &mut Upstream,
        framing: Framing,
        client_head: &mut Vec<u8>,
        client: &mut TcpStream,
        sent: &mut u64,
    ) -> io::Result<bool> {
        // The head goes out with whatever part of the body came with it: one write.
        let mut scanner = ChunkScanner::default();
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut first = true;
        loop {
            let unread = up.unread();
            let (take, done) = match framing {
                Framing::Empty => (0, true),
                Framing::Length(_) => {
                    let take = (left as usize).min(unread.len());
                    left -= take as u64;
                    (take, left == 0)
                }
                Framing::Chunked => {
                    let (n, done) = scanner.scan(unread).map_err(io::Error::other)?;
                    (n, done)
                }
                Framing::UntilClose => (unread.len(), false),
            };
            if first {
                client_head.extend_from_slice(&unread[..take]);
                client.write_all(client_head).await?;
                first = false;
            } else if take > 0 {
                client.write_all(&unread[..take]).await?;
            }
            up.pos += take;
            *sent += take as u64;
            if done {
                // Bytes past the end of the response: the upstream is out of step.
                return Ok(up.unread().is_empty());
            }
            let n = tokio::time::timeout(self.read_timeout, up.fill(usize::MAX))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream stalled"))??;
            if n == 0 {
                return match framing {
                    Framing::UntilClose => Ok(false),
                    _ => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed mid-body",
                    )),
                };
            }
        }
    }
}

/// A complete error answer on a connection that stays open.
async fn write_error(client: &mut TcpStream, status: StatusCode, reason: &str) -> io::Result<()> {
    let out = crate::response::h1_text(status, reason, &http::HeaderMap::new(), false);
    client.write_all(&out).await
}
