//! How many requests the app behind crier saw in a window: `crier-loadgen upstream` counts
//! every request it answers and tells the count at `/__count`; a run reads it at the start and
//! the end of its measuring window (issue 22: upstream requests/s with a `[[poll]]` channel vs
//! browsers polling through the proxy).

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::push::{round3, split_url};

/// The app's request count, from its `/__count` URL.
pub async fn read(url: &str) -> Result<u64, String> {
    let (addr, host, path) = split_url(url)?;
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    String::from_utf8_lossy(&body)
        .trim()
        .parse()
        .map_err(|_| format!("{url}: not a count"))
}

/// A measuring window over the app's request count.
pub struct UpstreamCount {
    url: String,
    start: u64,
    t0: Instant,
}

impl UpstreamCount {
    pub async fn start(url: &str) -> Result<Self, String> {
        Ok(UpstreamCount {
            url: url.to_string(),
            start: read(url).await?,
            t0: Instant::now(),
        })
    }

    /// `{"requests","window_s","per_s"}` since `start` (the count reads themselves excluded).
    pub async fn finish(&self) -> serde_json::Value {
        let window = self.t0.elapsed().as_secs_f64();
        match read(&self.url).await {
            Ok(end) => {
                let n = end.saturating_sub(self.start);
                json!({"requests": n, "window_s": round3(window),
                       "per_s": if window > 0.0 { round3(n as f64 / window) } else { 0.0 }})
            }
            Err(e) => json!({"error": e}),
        }
    }
}
