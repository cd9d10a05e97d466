//! The publisher: M messages of S bytes, round-robin over the channels, at a set rate or as
//! fast as the server answers, over keep-alive HTTP/1.1 (TCP or a Unix socket), from one or more
//! connections. Each body starts with `<seq-in-channel> <send-unix-nanos> ` and is padded with
//! `x` to S bytes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::hist::Histogram;
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

pub struct PubSpec {
    pub endpoint: Endpoint,
    pub host: String,
    /// Request path with `{channel}`.
    pub path: String,
    pub format: PubFormat,
    pub transport: Transport,
    pub channels: Arc<Vec<String>>,
    pub messages: u64,
    pub size: usize,
    /// Messages per second over all connections; 0 = as fast as possible.
    pub rate: f64,
    pub conns: usize,
    pub deadline: tokio::time::Instant,
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
}

impl PubStats {
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Relaxed);
        let mut k = self.error_kinds.lock().unwrap_or_else(|p| p.into_inner());
        if k.len() < 20 {
            *k.entry(e).or_default() += 1;
        }
    }
}

pub fn body(seq: u64, size: usize) -> String {
    let mut b = format!("{seq} {} ", now_ns());
    if b.len() < size {
        b.extend(std::iter::repeat_n('x', size - b.len()));
    }
    b
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
    let stats = Arc::new(PubStats {
        ok_per_channel: (0..spec.channels.len())
            .map(|_| AtomicU64::new(0))
            .collect(),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        latency: Histogram::default(),
        first_send_ns: AtomicU64::new(u64::MAX),
        last_done_ns: AtomicU64::new(0),
        error_kinds: Default::default(),
    });
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..spec.conns.max(1) {
        let (spec, stats, next) = (spec.clone(), stats.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let work = async {
                let mut sender: Option<SendRequest<Full<Bytes>>> = None;
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
                    // Up to 3 tries on a broken connection; each try carries a fresh send time.
                    for _attempt in 0..3 {
                        let s = match sender.as_mut() {
                            Some(s) if !s.is_closed() => s,
                            _ => match open(&spec.endpoint).await {
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
                        let b = encode(&spec, channel, body(seq, spec.size));
                        let req = http::Request::post(spec.path.replace("{channel}", channel))
                            .header(http::header::HOST, &spec.host)
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
                                stats.ok.fetch_add(1, Relaxed);
                                stats.ok_per_channel[c].fetch_add(1, Relaxed);
                                stats.last_done_ns.fetch_max(now_ns(), Relaxed);
                                break;
                            }
                            Ok(st) => {
                                // The server answered; a retry would just repeat the refusal.
                                stats.error(format!("status {}", st.as_u16()));
                                break;
                            }
                            Err(e) => {
                                stats.error(format!("request: {e}"));
                                sender = None;
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
