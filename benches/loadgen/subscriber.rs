//! Subscriber clients: SSE and WebSocket over a raw HTTP/1.1 connection (one task, one socket,
//! one small buffer each, so 19,000 of them stay cheap for the generator), long-poll over
//! hyper's client connection. Every message body starts with `<seq> <send-unix-nanos> `;
//! a subscriber records latency, and which sequence numbers it saw, once or more.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use hyper_tungstenite::tungstenite::Message as WsMessage;
use hyper_tungstenite::WebSocketStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::hist::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
    Longpoll,
}

/// Counters every subscriber task adds to.
pub struct Shared {
    /// Connected subscribers per channel (what a publish to the channel must reach).
    pub channel_connected: Box<[AtomicU64]>,
    /// publish → delivery, microseconds.
    pub latency: Histogram,
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    /// Connected, then the stream ended or broke before the run stopped it.
    pub ended: AtomicU64,
    pub deliveries: AtomicU64,
    /// First deliveries of an expected sequence number (what "all delivered" is judged by).
    pub distinct: AtomicU64,
    pub last_delivery_ns: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    pub fn new(channels: usize) -> Self {
        Shared {
            channel_connected: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::default(),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            errors: Mutex::default(),
        }
    }

    pub fn error(&self, what: impl Into<String>) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() < 50 {
            *e.entry(what.into()).or_default() += 1;
        } else {
            *e.entry("(other errors)".into()).or_default() += 1;
        }
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What one subscriber saw, returned when the run stops it.
#[derive(Debug, Default, Clone)]
pub struct SubResult {
    pub channel: u32,
    pub connected: bool,
    pub ended: bool,
    pub distinct: u32,
    pub dups: u32,
    /// Sequence numbers outside the published range, or bodies that did not parse.
    pub unexpected: u32,
}

pub struct SubSpec {
    pub transport: Transport,
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub channel: u32,
    pub src: Option<Ipv4Addr>,
    /// Sequence numbers per channel go 0..seq_cap.
    pub seq_cap: usize,
    pub connect_timeout: Duration,
}

struct Tracker {
    seen: Vec<u64>,
    seq_cap: usize,
    res: SubResult,
    shared: Arc<Shared>,
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    b.iter().try_fold(0u64, |n, &c| {
        c.is_ascii_digit()
            .then(|| n.wrapping_mul(10).wrapping_add(u64::from(c - b'0')))
    })
}

/// `<seq> <send-unix-nanos> ...` → (seq, nanos)
pub fn parse_payload(p: &[u8]) -> Option<(u64, u64)> {
    let mut it = p.splitn(3, |&b| b == b' ');
    let seq = parse_u64(it.next()?)?;
    let ns = parse_u64(it.next()?)?;
    Some((seq, ns))
}

impl Tracker {
    fn new(spec: &SubSpec, shared: Arc<Shared>) -> Self {
        Tracker {
            seen: vec![0; spec.seq_cap.div_ceil(64).max(1)],
            seq_cap: spec.seq_cap,
            res: SubResult {
                channel: spec.channel,
                ..SubResult::default()
            },
            shared,
        }
    }

    fn on_payload(&mut self, p: &[u8]) {
        let now = now_ns();
        let Some((seq, sent)) = parse_payload(p) else {
            self.res.unexpected += 1;
            return;
        };
        self.shared.deliveries.fetch_add(1, Relaxed);
        self.shared.last_delivery_ns.fetch_max(now, Relaxed);
        self.shared.latency.record(now.saturating_sub(sent) / 1000);
        let seq = seq as usize;
        if seq >= self.seq_cap {
            self.res.unexpected += 1;
            return;
        }
        let (w, bit) = (seq / 64, 1u64 << (seq % 64));
        if self.seen[w] & bit != 0 {
            self.res.dups += 1;
        } else {
            self.seen[w] |= bit;
            self.res.distinct += 1;
            self.shared.distinct.fetch_add(1, Relaxed);
        }
    }

    fn on_sse_line(&mut self, line: &[u8]) {
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            self.on_payload(rest);
        }
    }
}

/// Opens a TCP connection, from `src` when given (bind before connect, the port picked at
/// connect time so each source address offers the whole ephemeral range), with SO_LINGER 0 so
/// closing at the end of a run resets instead of leaving tens of thousands of TIME_WAITs.
pub async fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    let fd = sock.as_raw_fd();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: fd is a valid socket owned by `sock`; the option values are plain C structs.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // SAFETY: as above.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::from((ip, 0)))?;
    }
    let s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A raw HTTP/1.1 connection with one read buffer.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    len: usize,
}

struct Head {
    status: u16,
    chunked: bool,
    /// Where the body starts in `buf`.
    body_at: usize,
}

impl Raw {
    async fn read_head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(i) = self.buf[..self.len]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                let head = String::from_utf8_lossy(&self.buf[..i]).to_ascii_lowercase();
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let chunked = head.lines().any(|l| {
                    l.strip_prefix("transfer-encoding:")
                        .is_some_and(|v| v.contains("chunked"))
                });
                return Ok(Head {
                    status,
                    chunked,
                    body_at: i + 4,
                });
            }
            if self.len == self.buf.len() {
                if self.buf.len() >= 64 * 1024 {
                    return Err(io::Error::other("response head too large"));
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.s.read(&mut self.buf[self.len..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the response head",
                ));
            }
            self.len += n;
        }
    }
}

/// Chunked transfer-coding decoder state.
enum Dechunk {
    Identity,
    Size { n: u64, ext: bool },
    SizeLf { n: u64 },
    Data(u64),
    DataCr,
    DataLf,
    Done,
}

impl Dechunk {
    /// Feeds raw body bytes; calls `out` with decoded data. False once the body has ended.
    fn feed(&mut self, mut d: &[u8], out: &mut impl FnMut(&[u8])) -> bool {
        while !d.is_empty() {
            match self {
                Dechunk::Identity => {
                    out(d);
                    return true;
                }
                Dechunk::Data(n) => {
                    let take = (*n).min(d.len() as u64) as usize;
                    out(&d[..take]);
                    d = &d[take..];
                    *n -= take as u64;
                    if *n == 0 {
                        *self = Dechunk::DataCr;
                    }
                }
                Dechunk::Done => return false,
                _ => {
                    let b = d[0];
                    d = &d[1..];
                    *self = match std::mem::replace(self, Dechunk::Done) {
                        Dechunk::Size { n, ext } => match b {
                            b'\r' => Dechunk::SizeLf { n },
                            b'\n' if n == 0 => Dechunk::Done,
                            b'\n' => Dechunk::Data(n),
                            b';' => Dechunk::Size { n, ext: true },
                            _ if ext => Dechunk::Size { n, ext },
                            _ => match (b as char).to_digit(16) {
                                Some(v) => Dechunk::Size {
                                    n: n * 16 + u64::from(v),
                                    ext,
                                },
                                None => Dechunk::Size { n, ext: true },
                            },
                        },
                        Dechunk::SizeLf { n: 0 } => Dechunk::Done,
                        Dechunk::SizeLf { n } => Dechunk::Data(n),
                        Dechunk::DataCr if b == b'\n' => Dechunk::Size { n: 0, ext: false },
                        Dechunk::DataCr => Dechunk::DataLf,
                        Dechunk::DataLf => Dechunk::Size { n: 0, ext: false },
                        other => other,
                    };
                }
            }
        }
        !matches!(self, Dechunk::Done)
    }
}

/// Splits a byte stream into lines (LF, with an optional CR before it).
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, d: &[u8], on_line: &mut impl FnMut(&[u8])) {
        let mut start = 0;
        while let Some(i) = d[start..].iter().position(|&b| b == b'\n') {
            let end = start + i;
            if self.partial.is_empty() {
                on_line(strip_cr(&d[start..end]));
            } else {
                self.partial.extend_from_slice(&d[start..end]);
                let line = std::mem::take(&mut self.partial);
                on_line(strip_cr(&line));
                self.partial = line;
                self.partial.clear();
            }
            start = end + 1;
        }
        self.partial.extend_from_slice(&d[start..]);
    }
}

fn strip_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Runs one subscriber until `stop` fires. `permit` is held until the subscriber is connected
/// (or failed): it bounds how many connection attempts are in flight during the ramp.
pub async fn run(
    spec: SubSpec,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) -> SubResult {
    let mut t = Tracker::new(&spec, shared.clone());
    let stopped = async {
        let _ = stop.wait_for(|s| *s).await;
    };
    let outcome = match spec.transport {
        Transport::Sse | Transport::Ws => {
            tokio::select! {
                r = stream_sub(&spec, &mut t, permit) => r,
                _ = stopped => Ok(()),
            }
        }
        Transport::Longpoll => {
            tokio::select! {
                r = longpoll_sub(&spec, &mut t, permit) => r,
                _ = stopped => Ok(()),
            }
        }
    };
    if let Err(e) = outcome {
        if t.res.connected {
            t.res.ended = true;
            shared.ended.fetch_add(1, Relaxed);
            shared.error(format!("ended: {e}"));
        } else {
            shared.failed.fetch_add(1, Relaxed);
            shared.error(format!("connect: {e}"));
        }
    } else if t.res.connected && !*stop.borrow() {
        // The server ended the stream cleanly while the run was still going.
        t.res.ended = true;
        shared.ended.fetch_add(1, Relaxed);
        shared.error("ended: stream closed by server");
    }
    t.res
}

fn mark_connected(t: &mut Tracker, permit: OwnedSemaphorePermit) {
    t.res.connected = true;
    t.shared.connected.fetch_add(1, Relaxed);
    t.shared.channel_connected[t.res.channel as usize].fetch_add(1, Relaxed);
    drop(permit);
}

async fn stream_sub(
    spec: &SubSpec,
    t: &mut Tracker,
    permit: OwnedSemaphorePermit,
) -> io::Result<()> {
    let ws = spec.transport == Transport::Ws;
    let head_deadline = tokio::time::Instant::now() + spec.connect_timeout;
    let setup = async {
        let s = connect(spec.addr, spec.src).await?;
        let mut raw = Raw {
            s,
            buf: vec![0; 4096],
            len: 0,
        };
        let req = if ws {
            let key = base64::engine::general_purpose::STANDARD.encode(rand_key());
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
                spec.path, spec.host
            )
        } else {
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
                spec.path, spec.host
            )
        };
        raw.s.write_all(req.as_bytes()).await?;
        let head = raw.read_head().await?;
        io::Result::Ok((raw, head))
    };
    let (mut raw, head) = tokio::time::timeout_at(head_deadline, setup)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))??;
    let want = if ws { 101 } else { 200 };
    if head.status != want {
        return Err(io::Error::other(format!("status {}", head.status)));
    }
    mark_connected(t, permit);
    if ws {
        let rest = raw.buf[head.body_at..raw.len].to_vec();
        let cfg = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let mut wss =
            WebSocketStream::from_partially_read(raw.s, rest, Role::Client, Some(cfg)).await;
        while let Some(m) = wss.next().await {
            match m {
                Ok(WsMessage::Text(s)) => t.on_payload(s.as_bytes()),
                Ok(WsMessage::Binary(b)) => t.on_payload(&b),
                Ok(WsMessage::Close(c)) => {
                    return Err(io::Error::other(format!(
                        "websocket close {}",
                        c.map(|c| u16::from(c.code)).unwrap_or(1005)
                    )))
                }
                Ok(_) => {}
                Err(e) => return Err(io::Error::other(format!("websocket: {e}"))),
            }
        }
        return Ok(());
    }
    let mut dec = if head.chunked {
        Dechunk::Size { n: 0, ext: false }
    } else {
        Dechunk::Identity
    };
    let mut lines = Lines::default();
    let mut on_line = |l: &[u8]| t.on_sse_line(l);
    let mut on_data = |d: &[u8]| lines.feed(d, &mut on_line);
    let first = raw.buf[head.body_at..raw.len].to_vec();
    if !dec.feed(&first, &mut on_data) {
        return Ok(());
    }
    loop {
        let n = raw.s.read(&mut raw.buf).await?;
        if n == 0 {
            return Ok(());
        }
        if !dec.feed(&raw.buf[..n], &mut on_data) {
            return Ok(());
        }
    }
}

fn rand_key() -> [u8; 16] {
    let n = now_ns().to_le_bytes();
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&n);
    k[8..].copy_from_slice(&(std::process::id() as u64).to_le_bytes());
    k
}

/// Long-poll: one request at a time on a keep-alive connection, resuming from the previous
/// response's ETag (If-None-Match) and Last-Modified (If-Modified-Since): crier's ids and
/// Nchan's pair both travel that way.
async fn longpoll_sub(
    spec: &SubSpec,
    t: &mut Tracker,
    permit: OwnedSemaphorePermit,
) -> io::Result<()> {
    let s = tokio::time::timeout(spec.connect_timeout, connect(spec.addr, spec.src))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s))
            .await
            .map_err(io::Error::other)?;
    tokio::spawn(conn);
    mark_connected(t, permit);
    let mut etag: Option<http::HeaderValue> = None;
    let mut modified: Option<http::HeaderValue> = None;
    loop {
        let mut req = http::Request::get(&spec.path).header(http::header::HOST, &spec.host);
        if let Some(e) = &etag {
            req = req.header(http::header::IF_NONE_MATCH, e);
        }
        if let Some(m) = &modified {
            req = req.header(http::header::IF_MODIFIED_SINCE, m);
        }
        let req = req.body(Empty::new()).map_err(io::Error::other)?;
        sender.ready().await.map_err(io::Error::other)?;
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        let status = resp.status();
        if let Some(e) = resp.headers().get(http::header::ETAG) {
            etag = Some(e.clone());
        }
        if let Some(m) = resp.headers().get(http::header::LAST_MODIFIED) {
            modified = Some(m.clone());
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        match status.as_u16() {
            // Pushpin's held response times out as an empty 200.
            200 if body.is_empty() => {}
            200 => t.on_payload(&body),
            304 | 408 => {}
            other => {
                t.shared.error(format!("longpoll status {other}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunk_across_splits() {
        let wire = b"5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n";
        for split in 0..wire.len() {
            let mut d = Dechunk::Size { n: 0, ext: false };
            let mut got = Vec::new();
            d.feed(&wire[..split], &mut |b: &[u8]| got.extend_from_slice(b));
            let more = d.feed(&wire[split..], &mut |b: &[u8]| got.extend_from_slice(b));
            assert_eq!(got, b"hello, world", "split at {split}");
            assert!(!more);
        }
    }

    #[test]
    fn lines_and_payload() {
        let mut l = Lines::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        l.feed(b"id: 1-0\r\ndata: 7 12", &mut |x: &[u8]| {
            got.push(x.to_vec())
        });
        l.feed(b"3 xx\n\n", &mut |x: &[u8]| got.push(x.to_vec()));
        assert_eq!(
            got,
            vec![
                b"id: 1-0".to_vec(),
                b"data: 7 123 xx".to_vec(),
                b"".to_vec()
            ]
        );
        assert_eq!(parse_payload(b"7 123 xx"), Some((7, 123)));
        assert_eq!(parse_payload(b"7"), None);
    }
}
