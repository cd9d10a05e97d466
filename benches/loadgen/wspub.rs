//! Publishing by WebSocket frames (issue 21): each publish connection is a WebSocket client of
//! a push location that publishes what its clients send (crier `client_messages = "publish"`,
//! Nchan `nchan_pubsub`). Every frame is one [`payload::body`]; frames go out as fast as the
//! socket takes them, or at the set rate. There is no acknowledgement on a plain WebSocket, so
//! "ok" means "written": what reached the channel is judged by the subscribers. Whatever the
//! server sends back (its own messages echoed, since a pubsub client is also a subscriber) is
//! read and dropped, so the server never stalls on a full socket towards the publisher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use hyper_tungstenite::tungstenite::Message as WsMessage;
use hyper_tungstenite::WebSocketStream;
use tokio::net::TcpStream;

use crate::payload;
use crate::publisher::{Endpoint, PubSpec, PubStats, Target};
use crate::rawhttp::{self, Raw};
use crate::subscriber::now_ns;

type Sink = SplitSink<WebSocketStream<TcpStream>, WsMessage>;

async fn open(t: &Target, channel: &str) -> Result<Sink, String> {
    let Endpoint::Tcp(addr) = &t.endpoint else {
        return Err("WebSocket publishing needs a TCP URL".into());
    };
    let s = rawhttp::connect(*addr, None)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut raw = Raw::new(s, 4096);
    let path = t.path.replace("{channel}", channel);
    let head = rawhttp::request(&mut raw, &rawhttp::ws_request(&path, &t.host))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    if head.status != 101 {
        return Err(format!("handshake: status {}", head.status));
    }
    let (sink, mut stream) = rawhttp::into_ws(raw, &head).await.split();
    // Drain what comes back; the task ends when the connection does.
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    Ok(sink)
}

/// Sends every message as a frame; returns when all are sent or the deadline passed.
pub async fn run(spec: Arc<PubSpec>) -> Arc<PubStats> {
    // No acknowledgement on a plain WebSocket: no per-message times either.
    let stats = Arc::new(PubStats::new(spec.channels.len(), 0));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for conn in 0..spec.conns.max(1) {
        let (spec, stats, next) = (spec.clone(), stats.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let target = &spec.targets[conn % spec.targets.len()];
            let work = async {
                // One WebSocket per channel this connection publishes to, opened when first needed.
                let mut sinks: HashMap<usize, Sink> = HashMap::new();
                loop {
                    let k = next.fetch_add(1, Relaxed);
                    if k >= spec.messages {
                        break;
                    }
                    if spec.rate > 0.0 {
                        let at = start + Duration::from_secs_f64(k as f64 / spec.rate);
                        tokio::time::sleep_until(at.into()).await;
                    }
                    let nch = spec.channels.len() as u64;
                    let (c, seq) = ((k % nch) as usize, k / nch);
                    for _attempt in 0..3 {
                        let sink = match sinks.get_mut(&c) {
                            Some(s) => s,
                            None => match open(target, &spec.channels[c]).await {
                                Ok(s) => sinks.entry(c).or_insert(s),
                                Err(e) => {
                                    stats.error(e);
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            },
                        };
                        stats.first_send_ns.fetch_min(now_ns(), Relaxed);
                        let frame = WsMessage::text(payload::body(seq, c, spec.size));
                        match sink.send(frame).await {
                            Ok(()) => {
                                stats.ok(c);
                                break;
                            }
                            Err(e) => {
                                stats.error(format!("websocket send: {e}"));
                                sinks.remove(&c);
                            }
                        }
                    }
                }
                // A clean close, so the server reads every frame before the connection goes.
                for (_, mut s) in sinks {
                    let _ = s.close().await;
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
