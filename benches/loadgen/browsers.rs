//! Simulated browsers that poll a URL through the proxy (issue 22's baseline for `[[poll]]`):
//! N clients, each on its own keep-alive connection, GET the URL every `interval`, their first
//! requests spread evenly over one interval (as real pages would be). After the ramp, requests,
//! latency and the app's own request count are measured over `duration` seconds.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::time::Instant;

use crate::hist::Histogram;
use crate::procstat;
use crate::push::{emit, round3, split_url, tags};
use crate::rawhttp::connect;
use crate::subscriber::Shared;
use crate::upcount::UpstreamCount;

#[derive(clap::Args, Debug)]
pub struct BrowsersArgs {
    /// The URL every client polls (through the proxy), e.g. http://127.0.0.1:18080/api/scoreboard
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Seconds between two polls of one client.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
    /// Seconds measured after the ramp.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// New connections per second during the ramp.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp_rate: f64,
    /// The app's request counter (`crier-loadgen upstream`'s /__count).
    #[arg(long)]
    pub upstream_count: Option<String>,
    #[arg(long)]
    pub server_pid: Vec<u32>,
    #[arg(long)]
    pub tag: Vec<String>,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    failed: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Request → response, microseconds, inside the measuring window only.
    latency: Histogram,
}

async fn client(
    i: usize,
    a: Arc<BrowsersArgs>,
    c: Arc<Counts>,
    src: Option<Ipv4Addr>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
    errs: Arc<Shared>,
) {
    let Ok((addr, host, path)) = split_url(&a.url) else {
        return;
    };
    let s = match connect(addr, src).await {
        Ok(s) => s,
        Err(e) => {
            c.failed.fetch_add(1, Relaxed);
            errs.error(format!("connect: {e}"));
            return;
        }
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s)).await
    else {
        c.failed.fetch_add(1, Relaxed);
        return;
    };
    tokio::spawn(conn);
    c.connected.fetch_add(1, Relaxed);
    let every = Duration::from_secs_f64(a.interval);
    // Spread the first polls over one interval.
    let mut next = Instant::now() + every.mul_f64((i % a.clients.max(1)) as f64 / a.clients as f64);
    loop {
        tokio::time::sleep_until(next).await;
        next += every;
        let req = http::Request::get(&path)
            .header(http::header::HOST, &host)
            .body(Empty::new())
            .expect("valid request"); // ok: fixed method, validated path
        let t0 = Instant::now();
        let r = async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let st = resp.status();
            resp.into_body().collect().await?;
            Ok::<_, hyper::Error>(st)
        };
        match r.await {
            Ok(st) if st.is_success() || st.as_u16() == 304 => {
                if measuring.load(Relaxed) {
                    c.requests.fetch_add(1, Relaxed);
                    c.latency.record(t0.elapsed().as_micros() as u64);
                }
            }
            Ok(st) => {
                c.errors.fetch_add(1, Relaxed);
                errs.error(format!("status {}", st.as_u16()));
            }
            Err(e) => {
                c.errors.fetch_add(1, Relaxed);
                errs.error(format!("request: {e}"));
                return;
            }
        }
    }
}

pub async fn run(a: BrowsersArgs) -> Result<(), String> {
    split_url(&a.url)?;
    let a = Arc::new(a);
    let counts = Arc::new(Counts::default());
    let errs = Arc::new(Shared::new(Vec::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let nsrc = if a.clients < 1000 {
        0
    } else {
        a.clients.div_ceil(5000).max(2)
    };
    let load_start = procstat::loadavg();
    let before = procstat::sample(&a.server_pid);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        if a.ramp_rate > 0.0 {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / a.ramp_rate)).await;
        }
        let src = (nsrc > 0).then(|| Ipv4Addr::new(127, 0, 0, 2 + (i % nsrc) as u8));
        tasks.push(tokio::spawn(client(
            i,
            a.clone(),
            counts.clone(),
            src,
            measuring.clone(),
            errs.clone(),
        )));
    }
    // Every client has made its first poll after one more interval.
    tokio::time::sleep(Duration::from_secs_f64(a.interval)).await;
    let ramp_s = t0.elapsed().as_secs_f64();
    let up = match &a.upstream_count {
        Some(u) => Some(UpstreamCount::start(u).await?),
        None => None,
    };
    let start = procstat::sample(&a.server_pid);
    measuring.store(true, Relaxed);
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    measuring.store(false, Relaxed);
    let window = w0.elapsed().as_secs_f64();
    let end = procstat::sample(&a.server_pid);
    let upstream = match &up {
        Some(u) => u.finish().await,
        None => serde_json::Value::Null,
    };
    for t in tasks {
        t.abort();
    }
    let n = counts.requests.load(Relaxed);
    let v = json!({
        "kind": "browsers",
        "tags": tags(&a.tag),
        "url": a.url,
        "clients": a.clients,
        "interval_s": a.interval,
        "subs": {"connected": counts.connected.load(Relaxed), "failed": counts.failed.load(Relaxed)},
        "ramp_s": round3(ramp_s),
        "requests": {
            "count": n,
            "window_s": round3(window),
            "per_s": round3(n as f64 / window),
            "errors": counts.errors.load(Relaxed),
            "latency_ms": counts.latency.summary_ms(),
        },
        "upstream": upstream,
        "server": {
            "pids": a.server_pid,
            "rss_kib": end.rss_kib,
            "rss_per_sub_kib": round3(start.rss_kib.saturating_sub(before.rss_kib) as f64 / a.clients.max(1) as f64),
            "cpu_window_s": round3(end.cpu_s - start.cpu_s),
        },
        "errors": errs.errors(),
        "load_start": load_start,
        "load_end": procstat::loadavg(),
    });
    emit(&v, a.out.as_ref());
    Ok(())
}
