//! Subscriber clients: SSE and WebSocket over a raw HTTP/1.1 connection (one task, one socket,
//! one small buffer each, so 19,000 of them stay cheap for the generator), long-poll over
//! hyper's client connection. One subscriber may listen on several channels at once (a
//! multiplexed subscription: `{channel}` in the URL becomes `a,b,c,d`); [`Tracker`] keeps
//! exact per-channel accounting of what it saw.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_tungstenite::tungstenite::Message as WsMessage;
use hyper_util::rt::TokioIo;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::hist::Histogram;
use crate::rawhttp::{self, connect, Dechunk, Lines, Raw};
pub use crate::tracker::SubResult;
use crate::tracker::Tracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
    Longpoll,
}

/// Counters every subscriber task adds to.
pub struct Shared {
    /// The run's channel names (a body's channel index points here).
    pub names: Arc<Vec<String>>,
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
    pub fn new(names: impl Into<Arc<Vec<String>>>) -> Self {
        let names = names.into();
        Shared {
            channel_connected: (0..names.len()).map(|_| AtomicU64::new(0)).collect(),
            names,
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

pub struct SubSpec {
    pub transport: Transport,
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// Indices into the run's channel list; more than one = a multiplexed subscription.
    pub channels: Vec<u32>,
    pub src: Option<Ipv4Addr>,
    /// Sequence numbers per channel go 0..seq_cap.
    pub seq_cap: usize,
    pub connect_timeout: Duration,
}

/// Runs one subscriber until `stop` fires. `permit` is held until the subscriber is connected
/// (or failed): it bounds how many connection attempts are in flight during the ramp.
pub async fn run(
    spec: SubSpec,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) -> SubResult {
    let mut t = Tracker::new(spec.channels.clone(), spec.seq_cap, shared.clone());
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
    for &c in &t.res.channels {
        t.shared.channel_connected[c as usize].fetch_add(1, Relaxed);
    }
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
        let mut raw = Raw::new(s, 4096);
        let req = if ws {
            rawhttp::ws_request(&spec.path, &spec.host)
        } else {
            rawhttp::sse_request(&spec.path, &spec.host, "")
        };
        let head = rawhttp::request(&mut raw, &req).await?;
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
        let mut wss = rawhttp::into_ws(raw, &head).await;
        while let Some(m) = wss.next().await {
            match m {
                Ok(WsMessage::Text(s)) => t.on_message(s.as_bytes()),
                Ok(WsMessage::Binary(b)) => t.on_message(&b),
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
    let mut dec = Dechunk::for_head(&head);
    let mut lines = Lines::default();
    let mut on_line = |l: &[u8]| t.on_sse_line(l);
    let mut on_data = |d: &[u8]| lines.feed(d, &mut on_line);
    let first = raw.buf[head.body_at..raw.len].to_vec();
    if !dec.feed(&first, &mut on_data) {
        return Ok(());
    }
    loop {
        let n = rawhttp::read_some(&mut raw).await?;
        if n == 0 {
            return Ok(());
        }
        if !dec.feed(&raw.buf[..n], &mut on_data) {
            return Ok(());
        }
    }
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
            200 => t.on_message(&body),
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
    }
}
