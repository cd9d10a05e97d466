//! One push run: connect N subscribers (ramped, spread over loopback source addresses and, for
//! a cluster, over the nodes), settle, publish M messages, wait until every subscriber has every
//! message of each of its channels (or progress stops), then stop everything and report one JSON
//! object. Every phase is bounded in time.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::procstat::{self, Sample};
use crate::publisher::{self, Endpoint, PubFormat, PubSpec, Target};
use crate::subscriber::{self, now_ns, Shared, SubResult, SubSpec, Transport};
use crate::upcount::UpstreamCount;

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// Subscriber transport.
    #[arg(long, value_enum, default_value = "sse")]
    pub transport: Transport,
    /// Subscriber URL template, e.g. http://127.0.0.1:18080/live/{channel}; given several
    /// times (cluster nodes), subscriber i uses the (i % n)-th.
    #[arg(long, required = true)]
    pub sub_url: Vec<String>,
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Subscriber i listens on channel i % channels.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Channels per subscriber (a multiplexed subscription: `{channel}` becomes `a,b,c,d`):
    /// subscriber i listens on (i + k·channels/K) % channels for k < K, so every channel has
    /// the same number of subscribers.
    #[arg(long, default_value_t = 1)]
    pub channels_per_sub: usize,
    /// New connections per second during the ramp.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp_rate: f64,
    /// Connection attempts in flight at once during the ramp.
    #[arg(long, default_value_t = 256)]
    pub ramp_inflight: usize,
    /// Spread subscribers over this many source addresses 127.0.0.2, .3, ...;
    /// 0 = automatic (none below 1,000 subscribers, else one per 5,000).
    #[arg(long, default_value_t = 0)]
    pub source_addrs: usize,
    /// Publish URL template, e.g. http://127.0.0.1:18081/pub/{channel}; with --pub-unix only
    /// its path is used. Given several times (cluster nodes), message k goes to the (k % n)-th.
    #[arg(long)]
    pub pub_url: Vec<String>,
    /// Publish by WebSocket frames to --pub-url (a push location that publishes client
    /// messages), not by POSTs.
    #[arg(long)]
    pub pub_ws: bool,
    /// Publish over this Unix socket (crier's publish socket).
    #[arg(long)]
    pub pub_unix: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "raw")]
    pub pub_format: PubFormat,
    /// Messages to publish in all (0 = capacity run: connect, hold, measure).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Messages per second; 0 = as fast as the server answers.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Keep-alive publish connections.
    #[arg(long, default_value_t = 1)]
    pub pub_conns: usize,
    /// Server process ids (their descendants are included) for RSS and CPU.
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Seconds to wait after the ramp before measuring and publishing.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Seconds a subscriber may take from connect to response head.
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,
    /// After publishing, stop waiting when no delivery arrived for this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain_idle: f64,
    /// After publishing, stop waiting after this many seconds in any case.
    #[arg(long, default_value_t = 30.0)]
    pub drain_max: f64,
    /// Hard limit for the whole run, seconds.
    #[arg(long, default_value_t = 300.0)]
    pub max_seconds: f64,
    /// Channel name prefix (default: unique per run).
    #[arg(long)]
    pub channel_prefix: Option<String>,
    /// The app's request counter (`crier-loadgen upstream`'s /__count): requests the app saw
    /// during the settle period after the ramp are reported as upstream requests/s.
    #[arg(long)]
    pub upstream_count: Option<String>,
    /// A shell command run after the settle, right before the first publish (benches/
    /// callgrind.sh zeroes the server's instruction counters here).
    #[arg(long)]
    pub before_publish: Option<String>,
    /// A shell command run as soon as every subscriber has every message (before the drain's
    /// idle wait; benches/callgrind.sh dumps the counters here).
    #[arg(long)]
    pub after_delivery: Option<String>,
    /// key=value pairs copied into the output (server, workload, rep).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Append the JSON line to this file as well as printing it.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `http://IP:PORT/path` → (address, host header, path)
pub fn split_url(u: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = u
        .strip_prefix("http://")
        .ok_or_else(|| format!("{u}: only http:// URLs"))?;
    let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = auth
        .parse()
        .map_err(|_| format!("{u}: the host must be an IP:port (loopback)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{u}: this generator only targets loopback addresses"
        ));
    }
    let path = if path.is_empty() { "/" } else { path };
    Ok((addr, auth.to_string(), path.to_string()))
}

pub fn tags(list: &[String]) -> serde_json::Map<String, serde_json::Value> {
    list.iter()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

fn sample_json(s: &Sample) -> serde_json::Value {
    json!({"procs": s.procs, "rss_kib": s.rss_kib, "pss_kib": s.pss_kib, "cpu_s": round3(s.cpu_s)})
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub fn emit(v: &serde_json::Value, out: Option<&PathBuf>) {
    let line = v.to_string();
    println!("{line}");
    if let Some(p) = out {
        use std::io::Write;
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            Ok(mut f) => {
                let _ = writeln!(f, "{line}");
            }
            Err(e) => eprintln!("crier-loadgen: cannot append to {}: {e}", p.display()),
        }
    }
}

pub async fn run(a: PushArgs) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.max_seconds);
    let subs_at = a
        .sub_url
        .iter()
        .map(|u| split_url(u))
        .collect::<Result<Vec<_>, _>>()?;
    let channels = a.channels.max(1);
    let kps = a.channels_per_sub.clamp(1, channels);
    let prefix = a
        .channel_prefix
        .clone()
        .unwrap_or_else(|| format!("b{}x{}c", std::process::id(), now_ns() % 100_000));
    let names: Arc<Vec<String>> = Arc::new((0..channels).map(|c| format!("{prefix}{c}")).collect());
    let seq_cap = a.messages.div_ceil(channels as u64) as usize;
    let nsrc = match a.source_addrs {
        0 if a.subscribers < 1000 => 0,
        0 => a.subscribers.div_ceil(5000).max(2),
        n => n,
    };
    let pids = a.server_pid.clone();
    let load_start = procstat::loadavg();
    let gen0 = procstat::self_cpu_s();
    let before = procstat::sample(&pids);

    // Peak memory, sampled in the background.
    let peak_rss = Arc::new(AtomicU64::new(before.rss_kib));
    let peak_pss = Arc::new(AtomicU64::new(before.pss_kib));
    let sampler = {
        let (pids, pr, pp) = (pids.clone(), peak_rss.clone(), peak_pss.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let p = pids.clone();
                if let Ok(s) = tokio::task::spawn_blocking(move || procstat::sample(&p)).await {
                    pr.fetch_max(s.rss_kib, Relaxed);
                    pp.fetch_max(s.pss_kib, Relaxed);
                }
            }
        })
    };

    // Ramp.
    let shared = Arc::new(Shared::new(names.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(a.ramp_inflight.max(1)));
    let mut handles = Vec::with_capacity(a.subscribers);
    let ramp_t0 = Instant::now();
    for i in 0..a.subscribers {
        if a.ramp_rate > 0.0 {
            let at = ramp_t0 + Duration::from_secs_f64(i as f64 / a.ramp_rate);
            tokio::time::sleep_until(at).await;
        }
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.map_err(|e| e.to_string())?,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        let (addr, host, path_t) = &subs_at[i % subs_at.len()];
        let step = channels / kps;
        let mine: Vec<u32> = (0..kps)
            .map(|k| ((i + k * step) % channels) as u32)
            .collect();
        let list: Vec<&str> = mine.iter().map(|&c| names[c as usize].as_str()).collect();
        let spec = SubSpec {
            transport: a.transport,
            addr: *addr,
            host: host.clone(),
            path: path_t.replace("{channel}", &list.join(",")),
            channels: mine,
            src: (nsrc > 0).then(|| Ipv4Addr::new(127, 0, 0, 2 + (i % nsrc) as u8)),
            seq_cap,
            connect_timeout: Duration::from_secs_f64(a.connect_timeout),
        };
        handles.push(tokio::spawn(subscriber::run(
            spec,
            shared.clone(),
            stop_rx.clone(),
            permit,
        )));
    }
    let launched = handles.len() as u64;
    let ramp_limit =
        (Instant::now() + Duration::from_secs_f64(a.connect_timeout + 5.0)).min(deadline);
    while shared.connected.load(Relaxed) + shared.failed.load(Relaxed) < launched
        && Instant::now() < ramp_limit
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp_s = ramp_t0.elapsed().as_secs_f64();
    let up_count = match &a.upstream_count {
        Some(u) => Some(UpstreamCount::start(u).await?),
        None => None,
    };
    tokio::time::sleep_until((Instant::now() + Duration::from_secs_f64(a.settle)).min(deadline))
        .await;
    let connected_sample = procstat::sample(&pids);
    let gen_connected = procstat::self_cpu_s();
    let connected = shared.connected.load(Relaxed);
    let upstream_json = match &up_count {
        Some(u) => u.finish().await,
        None => serde_json::Value::Null,
    };

    // Publish and drain.
    let mut publish_json = serde_json::Value::Null;
    let mut pub_stats = None;
    let mut publish_s = 0.0;
    let mut drain_s = 0.0;
    if a.messages > 0 {
        if a.pub_url.is_empty() {
            return Err("--messages needs --pub-url (and optionally --pub-unix)".into());
        }
        let mut targets = Vec::new();
        for url in &a.pub_url {
            let (paddr, phost, ppath) = split_url(url)?;
            targets.push(match &a.pub_unix {
                Some(p) => Target {
                    endpoint: Endpoint::Unix(p.clone()),
                    host: "localhost".into(),
                    path: ppath,
                },
                None => Target {
                    endpoint: Endpoint::Tcp(paddr),
                    host: phost,
                    path: ppath,
                },
            });
        }
        let spec = Arc::new(PubSpec {
            targets,
            ws: a.pub_ws,
            format: a.pub_format,
            transport: a.transport,
            channels: names.clone(),
            messages: a.messages,
            size: a.size,
            rate: a.rate,
            conns: a.pub_conns,
            deadline,
            times: false,
        });
        if let Some(cmd) = &a.before_publish {
            run_hook(cmd)?;
        }
        let t = Instant::now();
        let st = publisher::run(spec).await;
        publish_s = t.elapsed().as_secs_f64();
        // Each connected subscriber expects every message published to its channel.
        let expected_all: u64 = (0..channels)
            .map(|c| st.ok_per_channel[c].load(Relaxed) * shared.channel_connected[c].load(Relaxed))
            .sum();
        let t = Instant::now();
        let mut last = shared.deliveries.load(Relaxed);
        let mut last_change = Instant::now();
        let idle = Duration::from_secs_f64(a.drain_idle);
        loop {
            if shared.distinct.load(Relaxed) >= expected_all {
                break;
            }
            let d = shared.deliveries.load(Relaxed);
            if d != last {
                last = d;
                last_change = Instant::now();
            } else if last_change.elapsed() >= idle {
                break;
            }
            if Instant::now() >= deadline || t.elapsed().as_secs_f64() >= a.drain_max {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drain_s = t.elapsed().as_secs_f64();
        if let Some(cmd) = &a.after_delivery {
            run_hook(cmd)?;
        }
        let elapsed = (st.last_done_ns.load(Relaxed)).saturating_sub(st.first_send_ns.load(Relaxed))
            as f64
            / 1e9;
        let ok = st.ok.load(Relaxed);
        publish_json = json!({
            "ok": ok,
            "errors": st.errors.load(Relaxed),
            "error_kinds": *st.error_kinds.lock().unwrap_or_else(|p| p.into_inner()),
            "elapsed_s": round3(elapsed),
            "rate_per_s": if elapsed > 0.0 { (ok as f64 / elapsed).round() } else { 0.0 },
            "latency_ms": st.latency.summary_ms(),
        });
        pub_stats = Some(st);
    }
    let end_sample = procstat::sample(&pids);
    let gen_end = procstat::self_cpu_s();
    sampler.abort();

    // Stop every subscriber and collect what each saw.
    let _ = stop_tx.send(true);
    let mut results: Vec<SubResult> = Vec::with_capacity(handles.len());
    let collect_limit = Instant::now() + Duration::from_secs(15);
    for h in handles {
        match tokio::time::timeout_at(collect_limit, h).await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(_)) | Err(_) => shared.error("subscriber task did not stop in time"),
        }
    }

    let mut lost_total = 0u64;
    let mut lost_max = 0u64;
    let mut subs_with_loss = 0u64;
    let mut dup_total = 0u64;
    let mut subs_with_dup = 0u64;
    let mut unexpected = 0u64;
    let mut complete = 0u64;
    let mut expected_total = 0u64;
    for r in results.iter().filter(|r| r.connected) {
        // Per (subscriber, channel): what was published there minus what arrived.
        let mut lost = 0;
        for (slot, &c) in r.channels.iter().enumerate() {
            let expected = pub_stats
                .as_ref()
                .map_or(0, |s| s.ok_per_channel[c as usize].load(Relaxed));
            expected_total += expected;
            lost += expected.saturating_sub(u64::from(r.distinct[slot]));
        }
        lost_total += lost;
        lost_max = lost_max.max(lost);
        subs_with_loss += u64::from(lost > 0);
        if lost == 0 {
            complete += 1;
        }
        dup_total += u64::from(r.dups);
        subs_with_dup += u64::from(r.dups > 0);
        unexpected += u64::from(r.unexpected);
    }
    let deliveries = shared.deliveries.load(Relaxed);
    let first_send = pub_stats
        .as_ref()
        .map_or(0, |s| s.first_send_ns.load(Relaxed));
    let window = shared
        .last_delivery_ns
        .load(Relaxed)
        .saturating_sub(first_send) as f64
        / 1e9;
    let per_sub = |after: u64, before: u64| {
        if connected == 0 {
            0.0
        } else {
            round3(after.saturating_sub(before) as f64 / connected as f64)
        }
    };
    let v = json!({
        "kind": "push",
        "tags": tags(&a.tag),
        "transport": format!("{:?}", a.transport).to_lowercase(),
        "sub_url": a.sub_url,
        "pub": a.pub_unix.as_ref().map_or_else(|| a.pub_url.join(" "), |p| format!("unix:{}", p.display())),
        "pub_ws": a.pub_ws,
        "subscribers": a.subscribers,
        "channels": channels,
        "channels_per_sub": kps,
        "nodes": subs_at.len(),
        "messages": a.messages,
        "size": a.size,
        "rate": a.rate,
        "pub_conns": a.pub_conns,
        "source_addrs": nsrc,
        "subs": {
            "connected": connected,
            "failed": shared.failed.load(Relaxed),
            "ended_early": shared.ended.load(Relaxed),
            "complete": complete,
        },
        "ramp_s": round3(ramp_s),
        "publish_s": round3(publish_s),
        "drain_s": round3(drain_s),
        "publish": publish_json,
        "delivery": {
            "deliveries": deliveries,
            "expected": expected_total,
            "window_s": round3(window),
            "per_s": if window > 0.0 { (deliveries as f64 / window).round() } else { 0.0 },
            "latency_ms": shared.latency.summary_ms(),
            "lost_total": lost_total,
            "lost_max_per_sub": lost_max,
            "subs_with_loss": subs_with_loss,
            "dup_total": dup_total,
            "subs_with_dup": subs_with_dup,
            "unexpected": unexpected,
        },
        "server": {
            "pids": pids,
            "before": sample_json(&before),
            "connected": sample_json(&connected_sample),
            "end": sample_json(&end_sample),
            "peak_rss_kib": peak_rss.load(Relaxed),
            "peak_pss_kib": peak_pss.load(Relaxed),
            "rss_per_sub_kib": per_sub(connected_sample.rss_kib, before.rss_kib),
            "pss_per_sub_kib": per_sub(connected_sample.pss_kib, before.pss_kib),
            "cpu_connect_s": round3(connected_sample.cpu_s - before.cpu_s),
            "cpu_publish_s": round3(end_sample.cpu_s - connected_sample.cpu_s),
        },
        "upstream": upstream_json,
        "generator": {
            "cpu_connect_s": round3(gen_connected - gen0),
            "cpu_publish_s": round3(gen_end - gen_connected),
        },
        "errors": shared.errors(),
        "load_start": load_start,
        "load_end": procstat::loadavg(),
        "wall_s": round3(started.elapsed().as_secs_f64()),
    });
    emit(&v, a.out.as_ref());
    Ok(())
}

/// Runs a `--before-publish` / `--after-delivery` command to its end (blocking this thread
/// on purpose: nothing is measured while it runs).
fn run_hook(cmd: &str) -> Result<(), String> {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map_err(|e| format!("hook `{cmd}`: {e}"))?;
    if !st.success() {
        return Err(format!("hook `{cmd}` failed: {st}"));
    }
    Ok(())
}
