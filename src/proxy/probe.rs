//! Is the upstream there at all? A connect and a hang-up: what `crier_upstream_up` and the
//! status page report. It says nothing of the app's health beyond accepting connections,
//! which is what a 502 is about.

use std::time::{Duration, Instant};

use crate::config::{Config, UpstreamAddr};
use crate::metrics::Metrics;

/// How often the server probes (the gauge is at most this old).
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Connects to the upstream within `limit` and hangs up; Ok: how long the connect took.
pub async fn connect(addr: &UpstreamAddr, limit: Duration) -> std::io::Result<Duration> {
    let start = Instant::now();
    let r: std::io::Result<()> = match addr {
        UpstreamAddr::Http { authority } => {
            let target = match authority.parse::<http::uri::Authority>() {
                Ok(a) => format!("{}:{}", a.host(), a.port_u16().unwrap_or(80)),
                Err(_) => authority.clone(),
            };
            match tokio::time::timeout(limit, tokio::net::TcpStream::connect(target)).await {
                Ok(r) => r.map(drop),
                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
        UpstreamAddr::Unix(p) => {
            match tokio::time::timeout(limit, tokio::net::UnixStream::connect(p)).await {
                Ok(r) => r.map(drop),
                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
    };
    r.map(|()| start.elapsed())
}

/// Probes every [`PROBE_EVERY`] for as long as the task runs, keeping `crier_upstream_up`
/// current and logging each change (down once, back once: no line per probe).
pub async fn run(config: impl Fn() -> std::sync::Arc<Config>, metrics: &Metrics) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up = None;
    loop {
        tick.tick().await;
        let cfg = config();
        let limit = cfg.upstream.connect_timeout.min(Duration::from_secs(2));
        let result = connect(&cfg.upstream.url, limit).await;
        let up = result.is_ok();
        metrics.upstream_up.set(up as i64);
        match (&result, was_up) {
            (Err(e), Some(true) | None) => {
                tracing::warn!(
                    "upstream {} is not accepting connections: {e}",
                    cfg.upstream.url
                )
            }
            (Ok(_), Some(false)) => tracing::info!("upstream {} is back", cfg.upstream.url),
            _ => {}
        }
        was_up = Some(up);
    }
}
