//! The publisher: M messages of S bytes, round-robin over the channels, at a set rate or as
//! fast as the server answers, over keep-alive HTTP/1.1 (TCP or a Unix socket), from one or more
//! connections; with several targets (cluster nodes), message k goes to target k % targets.
//! Bodies are [`payload::body`]s. WebSocket publishing is in `wspub.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::hist::Histogram;
use crate::payload;
use crate::subscriber::{now_ns, Transport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PubFormat {
    /// The body is the message (crier, Nchan).
    Raw,
    /// Pushpin's HTTP publish API: a JSON item with the transport's format.
    Pushpin,
}

#[derive(Clone)]
pub enum Endpoint {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

/// Where publishes go: one per node.
#[derive(Clone)]
pub struct Target {
    pub endpoint: Endpoint,
    pub host: String,
    /// Request path with `{channel}`.
    pub path: String,
}

pub struct PubSpec {
    pub targets: Vec<Target>,
    /// Publish by sending WebSocket frames to the targets (the path is a push location
    /// whose client messages are published), not by POSTs to the publish API.
    pub ws: bool,
    pub format: PubFormat,
    pub transport: Transport,
    pub channels: Arc<Vec<String>>,
    pub messages: u64,
    pub size: usize,
    /// Messages per second over all connections; 0 = as fast as possible.
    pub rate: f64,
    pub conns: usize,
    pub deadline: tokio::time::Instant,
    /// Record every message's send and acknowledgement time (the slow reader's causal order).
    pub times: bool,
}

pub struct PubStats {
    pub ok_per_channel: Vec<AtomicU64>,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    /// Request → response, microseconds.
    pub latency: Histogram,
    pub first_send_ns: AtomicU64,
    pub last_done_ns: AtomicU64,
    pub error_kinds: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Per message index k (with `times`): the send time stamped in its body, and when its 2xx
    /// arrived (0: not acknowledged).
    pub sent_ns: Box<[AtomicU64]>,
    pub ack_ns: Box<[AtomicU64]>,
}

impl PubStats {
    pub fn new(channels: usize, times: u64) -> Self {
        let slots = || (0..times).map(|_| AtomicU64::new(0)).collect();
        PubStats {
            sent_ns: slots(),
            ack_ns: slots(),
            ok_per_channel: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Histogram::default(),
            first_send_ns: AtomicU64::new(u64::MAX),
            last_done_ns: AtomicU64::new(0),
            error_kinds: Default::default(),
        }
    }

    /// One message accepted by the server (or, over a WebSocket, written to it).
    pub fn ok(&self, channel: usize) {
        self.ok.fetch_add(1, Relaxed);
        self.ok_per_channel[channel].fetch_add(1, Relaxed);
        self.last_done_ns.fetch_max(now_ns(), Relaxed);
    }

    pub fn error(&self, e: String) {
        self.errors.fetch_add(1, Relaxed);
        let mut k = self.error_kinds.lock().unwrap_or_else(|p| p.into_inner());
        if k.len() < 20 {
            *k.entry(e).or_default() += 1;
        }
    }
}

fn encode(spec: &PubSpec, channel: &str, msg: String) -> Bytes {
    match spec.format {
        PubFormat::Raw => Bytes::from(msg),
        PubFormat::Pushpin => {
            let formats = match spec.transport {
                Transport::Sse => {
                    serde_json::json!({"http-stream": {"content": format!("data: {msg}\n\n")}})
                }
                Transport::Ws => serde_json::json!({"ws-message": {"content": msg}}),
                Transport::Longpoll => serde_json::json!({"http-response": {"body": msg}}),
            };
            let v = serde_json::json!({"items": [{"channel": channel, "formats": formats}]});
            Bytes::from(v.to_string())
        }
    }
}

async fn open(ep: &Endpoint) -> Result<SendRequest<Full<Bytes>>, String> {
    macro_rules! handshake {
        ($io:expr) => {{
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new($io))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(sender)
        }};
    }
    match ep {
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = s.set_nodelay(true);
            handshake!(s)
        }
        Endpoint::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| format!("connect {}: {e}", p.display()))?;
            handshake!(s)
        }
    }
}

/// Publishes every message; returns when all are sent or the deadline passed.
pub async fn run(spec: Arc<PubSpec>) -> Arc<PubStats> {
    if spec.ws {
        return crate::wspub::run(spec).await;
    }
    let times = if spec.times { spec.messages } else { 0 };
    let stats = Arc::new(PubStats::new(spec.channels.len(), times));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..spec.conns.max(1) {
        let (spec, stats, next) = (spec.clone(), stats.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let work = async {
                // One keep-alive connection per target, opened when first needed.
                let mut senders: Vec<Option<SendRequest<Full<Bytes>>>> =
                    spec.targets.iter().map(|_| None).collect();
                loop {
                    let k = next.fetch_add(1, Relaxed);
                    if k >= spec.messages {
                        return;
                    }
                    if spec.rate > 0.0 {
                        let at = start + Duration::from_secs_f64(k as f64 / spec.rate);
                        tokio::time::sleep_until(at.into()).await;
                    }
                    let nch = spec.channels.len() as u64;
                    let (c, seq) = ((k % nch) as usize, k / nch);
                    let channel = &spec.channels[c];
                    let ti = (k % spec.targets.len() as u64) as usize;
                    let (target, sender) = (&spec.targets[ti], &mut senders[ti]);
                    // Up to 3 tries on a broken connection; each try carries a fresh send time.
                    for _attempt in 0..3 {
                        let s = match sender.as_mut() {
                            Some(s) if !s.is_closed() => s,
                            _ => match open(&target.endpoint).await {
                                Ok(s) => sender.insert(s),
                                Err(e) => {
                                    stats.error(e);
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            },
                        };
                        let t0 = Instant::now();
                        stats.first_send_ns.fetch_min(now_ns(), Relaxed);
                        let sent = now_ns();
                        if let Some(t) = stats.sent_ns.get(k as usize) {
                            t.store(sent, Relaxed);
                        }
                        let b = encode(&spec, channel, payload::body_at(seq, c, spec.size, sent));
                        let req = http::Request::post(target.path.replace("{channel}", channel))
                            .header(http::header::HOST, &target.host)
                            .header(http::header::CONTENT_TYPE, "text/plain")
                            .body(Full::new(b))
                            .expect("valid request"); // ok: fixed method, validated path
                        let r = async {
                            s.ready().await?;
                            let resp = s.send_request(req).await?;
                            let st = resp.status();
                            resp.into_body().collect().await?;
                            Ok::<_, hyper::Error>(st)
                        };
                        match r.await {
                            Ok(st) if st.is_success() => {
                                stats.latency.record(t0.elapsed().as_micros() as u64);
                                if let Some(t) = stats.ack_ns.get(k as usize) {
                                    t.store(now_ns(), Relaxed);
                                }
                                stats.ok(c);
                                break;
                            }
                            Ok(st) => {
                                // The server answered; a retry would just repeat the refusal.
                                stats.error(format!("status {}", st.as_u16()));
                                break;
                            }
                            Err(e) => {
                                stats.error(format!("request: {e}"));
                                *sender = None;
                            }
                        }
                    }
                }
            };
            let _ = tokio::time::timeout_at(spec.deadline, work).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    stats
}
