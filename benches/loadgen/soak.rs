//! `soak`: a bounded soak with faults (issue 18, part 5). Subscribers on every transport (SSE,
//! crier.json WebSocket, long-poll), some reading slowly, some reconnecting every second with
//! their last id, a steady publish rate over many channels, proxied requests to an upstream
//! that resets and stalls (run here), and a SIGHUP to the server every few seconds. At the end
//! it checks, exactly, per subscriber: nothing lost silently, nothing twice, every one that kept
//! up got everything; and of the server: RSS flat after the warm-up, file descriptors back to
//! their baseline, no subscriber connection lost (to a reload or anything else), every proxied
//! request to a healthy path answered 200. Bounded in count and time; loopback only.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper_tungstenite::tungstenite::Message as WsMessage;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};

use crate::publisher::{self, Endpoint, PubFormat, PubSpec, Target};
use crate::push::split_url;
use crate::rawhttp::{self, Dechunk, Lines, Raw};
use crate::subscriber::Transport;
use crate::{payload, procstat, sse};

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Subscribe URL with `{channel}` (crier's push location).
    #[arg(long, default_value = "http://127.0.0.1:18080/live/{channel}")]
    pub sub_url: String,
    /// Publish URL with `{channel}`.
    #[arg(long, default_value = "http://127.0.0.1:18081/pub/{channel}")]
    pub pub_url: String,
    /// Publish over this Unix socket instead of TCP (the URL then gives only the path; its
    /// address is not dialled).
    #[arg(long)]
    pub pub_unix: Option<std::path::PathBuf>,
    /// The proxy (crier's public listener): `/soak/ok`, `/soak/reset` and `/soak/stall` are
    /// asked through it.
    #[arg(long, default_value = "http://127.0.0.1:18080")]
    pub proxy_url: String,
    /// Where this command runs the app behind the proxy (it resets and stalls on purpose).
    #[arg(long, default_value = "127.0.0.1:18090")]
    pub upstream_listen: SocketAddr,
    /// The server's process id (RSS, file descriptors, SIGHUP).
    #[arg(long)]
    pub pid: u32,
    #[arg(long, default_value_t = 19_000)]
    pub conns: usize,
    #[arg(long, default_value_t = 1_000)]
    pub channels: usize,
    /// Publishes per second over all channels.
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Message size: 1 KB, so a slow reader (128 B/s) falls behind the buffer within minutes
    /// even with the kernel's socket buffers in between.
    #[arg(long, default_value_t = 1000)]
    pub size: usize,
    /// How long publishing goes on.
    #[arg(long, default_value_t = 600.0)]
    pub seconds: f64,
    /// The part of the run RSS may grow in (the rest must stay within `rss_slack`).
    #[arg(long, default_value_t = 0.2)]
    pub warmup_frac: f64,
    #[arg(long, default_value_t = 0.10)]
    pub rss_slack: f64,
    /// Subscribers that read slowly (128 B/s): they are all on one more channel, the hot
    /// one, published to at `hot_rate`, so they fall behind its buffer (past the kernel's
    /// socket buffers) and must be told.
    #[arg(long, default_value_t = 0.10)]
    pub slow_frac: f64,
    /// Publishes per second to the slow readers' channel.
    #[arg(long, default_value_t = 30.0)]
    pub hot_rate: f64,
    #[arg(long, default_value_t = 0.01)]
    pub reconnect_frac: f64,
    /// SIGHUP every this many seconds (0: never).
    #[arg(long, default_value_t = 10.0)]
    pub reload_every: f64,
    /// Concurrent clients of the proxy.
    #[arg(long, default_value_t = 4)]
    pub proxy_clients: usize,
    /// Loopback source addresses 127.0.0.2, 127.0.0.3, … the subscribers spread over.
    #[arg(long, default_value_t = 4)]
    pub sources: u8,
    #[arg(long, default_value_t = 2_000.0)]
    pub ramp_rate: f64,
    /// After publishing: how long the subscribers may take to have everything.
    #[arg(long, default_value_t = 60.0)]
    pub drain_max: f64,
}

/// What one subscriber saw, across all its connections.
#[derive(Default, Debug)]
struct Acct {
    last: Option<u64>,
    /// A gap notice came since the last message.
    told: bool,
    received: u64,
    lost_told: u64,
    lost_silent: u64,
    dups: u64,
    gaps: u64,
    /// The stream ended or broke without this client closing it.
    unexpected_ends: u64,
    reconnects: u64,
    connect_failures: u64,
    /// Where a reconnect resumes (SSE id / crier.json id / long-poll ETag).
    resume: Option<String>,
}

impl Acct {
    fn gap(&mut self) {
        self.told = true;
        self.gaps += 1;
    }

    fn message(&mut self, seq: u64) {
        match self.last {
            Some(l) if seq <= l => {
                self.dups += 1;
                return;
            }
            Some(l) if seq > l + 1 => {
                let lost = seq - l - 1;
                if self.told {
                    self.lost_told += lost;
                } else {
                    self.lost_silent += lost;
                }
            }
            _ => {}
        }
        self.told = false;
        self.last = Some(seq);
        self.received += 1;
    }
}

struct Sub {
    channel: usize,
    transport: Transport,
    slow: bool,
    reconnecting: bool,
    acct: Mutex<Acct>,
}

struct Run {
    stop: AtomicBool,
    /// Publishing is over: slow readers read at full speed to catch up.
    draining: AtomicBool,
    addr: SocketAddr,
    host: String,
    sub_path: String,
    channels: Vec<String>,
}

fn lock(s: &Sub) -> std::sync::MutexGuard<'_, Acct> {
    s.acct.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn run(a: SoakArgs) -> Result<(), String> {
    let (addr, host, sub_path) = split_url(&a.sub_url)?;
    let (paddr, phost, ppath) = split_url(&a.pub_url)?;
    let (proxy_addr, proxy_host, _) = split_url(&format!("{}/", a.proxy_url))?;
    let prefix = format!("soak{}x", std::process::id());
    // The channels, then one more: the hot channel the slow readers are on (see `hot_rate`).
    let mut channels: Vec<String> = (0..a.channels).map(|c| format!("{prefix}{c}")).collect();
    channels.push(format!("{prefix}hot"));
    let hot = a.channels;
    let run = Arc::new(Run {
        stop: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        addr,
        host,
        sub_path,
        channels: channels.clone(),
    });

    // The app behind the proxy, then a few requests so its keep-alive pool is warm before the
    // file-descriptor baseline is taken.
    let upstream = TcpListener::bind(a.upstream_listen)
        .await
        .map_err(|e| format!("upstream {}: {e}", a.upstream_listen))?;
    tokio::spawn(serve_upstream(upstream));
    let proxy = Arc::new(ProxyStats::default());
    for _ in 0..a.proxy_clients.max(1) {
        proxy_request(proxy_addr, &proxy_host, "/soak/ok", &proxy).await;
    }
    sleep(Duration::from_millis(500)).await;
    let fds_baseline = fds(a.pid);
    let start_sample = procstat::sample(&[a.pid]);

    // Subscribers: per ten, five SSE, four crier.json WebSocket, one long-poll; slow and
    // reconnecting ones spread evenly (long-pollers are never slow: each poll is a request).
    let slow_every = (1.0 / a.slow_frac.max(1e-9)).round() as usize;
    let reconnect_every = (1.0 / a.reconnect_frac.max(1e-9)).round() as usize;
    let subs: Vec<Arc<Sub>> = (0..a.conns)
        .map(|i| {
            let transport = match i % 10 {
                0..=4 => Transport::Sse,
                5..=8 => Transport::Ws,
                _ => Transport::Longpoll,
            };
            let slow = transport != Transport::Longpoll && i % slow_every == 3;
            Arc::new(Sub {
                channel: if slow { hot } else { i % a.channels.max(1) },
                transport,
                slow,
                reconnecting: i % reconnect_every == 7,
                acct: Mutex::default(),
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(subs.len());
    for (i, s) in subs.iter().enumerate() {
        if a.ramp_rate > 0.0 {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / a.ramp_rate)).await;
        }
        let src = Ipv4Addr::new(127, 0, 0, 2 + (i % a.sources.max(1) as usize) as u8);
        let (run, s) = (run.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            match s.transport {
                Transport::Sse => sse_sub(&run, &s, src).await,
                Transport::Ws => ws_sub(&run, &s, src).await,
                Transport::Longpoll => longpoll_sub(&run, &s, src).await,
            }
        }));
    }
    sleep(Duration::from_secs(2)).await;

    // Faults beside the load: proxied requests, reloads, and the server's figures.
    let fault_stop = Arc::new(AtomicBool::new(false));
    let mut side = Vec::new();
    for k in 0..a.proxy_clients {
        let (proxy, stop, host) = (proxy.clone(), fault_stop.clone(), proxy_host.clone());
        side.push(tokio::spawn(async move {
            let paths = [
                "/soak/ok",
                "/soak/ok",
                "/soak/reset",
                "/soak/ok",
                "/soak/stall",
            ];
            let mut n = k;
            while !stop.load(Relaxed) {
                proxy_request(proxy_addr, &host, paths[n % paths.len()], &proxy).await;
                n += 1;
                sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    let reloads = Arc::new(AtomicU64::new(0));
    if a.reload_every > 0.0 {
        let (stop, reloads, pid, every) =
            (fault_stop.clone(), reloads.clone(), a.pid, a.reload_every);
        side.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                sleep(Duration::from_secs_f64(every)).await;
                // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
                if unsafe { libc::kill(pid as i32, libc::SIGHUP) } == 0 {
                    reloads.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    let samples = Arc::new(Mutex::new(Vec::<(f64, u64, usize)>::new()));
    {
        let (stop, samples, pid) = (fault_stop.clone(), samples.clone(), a.pid);
        let began = Instant::now();
        side.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let s = procstat::sample(&[pid]);
                samples.lock().unwrap_or_else(|p| p.into_inner()).push((
                    began.elapsed().as_secs_f64(),
                    s.rss_kib,
                    fds(pid),
                ));
                sleep(Duration::from_secs(2)).await;
            }
        }));
    }

    // Publish: the steady rate over the channels, and the hot channel beside it.
    let target = Target {
        endpoint: match &a.pub_unix {
            Some(p) => Endpoint::Unix(p.clone()),
            None => Endpoint::Tcp(paddr),
        },
        host: phost,
        path: ppath,
    };
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds * 2.0 + 30.0);
    let spec = |names: Vec<String>, rate: f64, conns: usize| {
        Arc::new(PubSpec {
            targets: vec![target.clone()],
            ws: false,
            format: PubFormat::Raw,
            transport: Transport::Sse,
            channels: Arc::new(names),
            messages: (rate * a.seconds).round() as u64,
            size: a.size,
            rate,
            conns,
            deadline,
            times: false,
        })
    };
    let steady = tokio::spawn(publisher::run(spec(channels[..hot].to_vec(), a.rate, 8)));
    let hot_pub = publisher::run(spec(vec![channels[hot].clone()], a.hot_rate, 1)).await;
    let published = steady.await.map_err(|e| format!("publisher: {e}"))?;
    let publish_errors = published.errors.load(Relaxed) + hot_pub.errors.load(Relaxed);
    let mut last_seq: Vec<Option<u64>> = published
        .ok_per_channel
        .iter()
        .map(|n| n.load(Relaxed).checked_sub(1))
        .collect();
    last_seq.push(hot_pub.ok.load(Relaxed).checked_sub(1));

    // Drain: every subscriber has its channel's last message (slow readers at full speed now).
    run.draining.store(true, Relaxed);
    let drain_t = Instant::now();
    let caught_up = |s: &Sub| lock(s).last == last_seq[s.channel];
    while drain_t.elapsed().as_secs_f64() < a.drain_max && !subs.iter().all(|s| caught_up(s)) {
        sleep(Duration::from_millis(200)).await;
    }
    let drain_s = drain_t.elapsed().as_secs_f64();
    fault_stop.store(true, Relaxed);
    run.stop.store(true, Relaxed);
    for t in side {
        t.abort();
    }
    for t in tasks {
        let _ = timeout(Duration::from_secs(5), t).await;
    }
    // The server lets go of what the clients closed; then the descriptors are counted again.
    let mut fds_end = fds(a.pid);
    for _ in 0..20 {
        if fds_end <= fds_baseline + a.proxy_clients + 2 {
            break;
        }
        sleep(Duration::from_millis(500)).await;
        fds_end = fds(a.pid);
    }

    // The verdict.
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let run_s = samples.last().map_or(0.0, |s| s.0);
    let warm_end = run_s * a.warmup_frac;
    let rss_at_warmup = samples.iter().find(|s| s.0 >= warm_end).map_or(0, |s| s.1);
    let rss_max_after = samples
        .iter()
        .filter(|s| s.0 >= warm_end)
        .map(|s| s.1)
        .max()
        .unwrap_or(0);
    let rss_growth = if rss_at_warmup > 0 {
        rss_max_after as f64 / rss_at_warmup as f64 - 1.0
    } else {
        0.0
    };
    let mut t = Totals::default();
    for s in &subs {
        let acct = lock(s);
        let complete = acct.last == last_seq[s.channel];
        t.add(&acct, complete, s.slow, s.reconnecting);
    }
    let proxy_ok_failed = proxy.ok_failed.load(Relaxed);
    let proxy_hung = proxy.hung.load(Relaxed);
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    check(
        rss_growth <= a.rss_slack,
        format!("RSS grew {:.1}% after the warm-up", rss_growth * 100.0),
    );
    check(
        fds_end <= fds_baseline + a.proxy_clients + 2,
        format!("file descriptors {fds_end} at the end, {fds_baseline} at the start"),
    );
    check(
        t.lost_silent == 0,
        format!("{} messages lost silently", t.lost_silent),
    );
    check(t.dups == 0, format!("{} duplicates", t.dups));
    check(
        t.incomplete == 0,
        format!(
            "{} subscribers without their channel's last message",
            t.incomplete
        ),
    );
    check(
        t.kept_up_incomplete == 0,
        format!(
            "{} subscribers told of no gap lost messages",
            t.kept_up_incomplete
        ),
    );
    check(
        t.unexpected_ends == 0,
        format!(
            "{} connections of readers that kept up lost",
            t.unexpected_ends
        ),
    );
    check(
        t.connect_failures == 0,
        format!("{} subscriber connects failed", t.connect_failures),
    );
    check(
        publish_errors == 0,
        format!("{publish_errors} publishes failed"),
    );
    let slow = subs.iter().filter(|s| s.slow).count();
    check(
        slow == 0 || t.slow_told > 0,
        format!("none of the {slow} slow readers fell behind: the run did not test lag"),
    );
    check(
        proxy_ok_failed == 0,
        format!("{proxy_ok_failed} proxied requests to a healthy path failed"),
    );
    check(
        proxy_hung == 0,
        format!("{proxy_hung} proxied requests hung"),
    );
    let report = json!({
        "kind": "soak",
        "pass": failures.is_empty(),
        "failures": failures,
        "conns": a.conns,
        "channels": a.channels,
        "rate": a.rate,
        "seconds": a.seconds,
        "published": published.ok.load(Relaxed) + hot_pub.ok.load(Relaxed),
        "hot_published": hot_pub.ok.load(Relaxed),
        "publish_errors": publish_errors,
        "reloads": reloads.load(Relaxed),
        "drain_s": (drain_s * 1000.0).round() / 1000.0,
        "subscribers": t.json(),
        "proxy": {
            "ok": proxy.ok.load(Relaxed),
            "ok_failed": proxy_ok_failed,
            "reset_answers": proxy.reset_answers.load(Relaxed),
            "stall_answers": proxy.stall_answers.load(Relaxed),
            "hung": proxy_hung,
        },
        "server": {
            "rss_kib_start": start_sample.rss_kib,
            "rss_kib_at_warmup": rss_at_warmup,
            "rss_kib_max_after_warmup": rss_max_after,
            "rss_growth_after_warmup": (rss_growth * 1000.0).round() / 1000.0,
            "fds_baseline": fds_baseline,
            "fds_peak": samples.iter().map(|s| s.2).max().unwrap_or(0),
            "fds_end": fds_end,
            "samples": samples.iter().map(|s| json!([(s.0 * 10.0).round() / 10.0, s.1, s.2])).collect::<Vec<_>>(),
        },
        "load_average": procstat::loadavg(),
    });
    println!("{report}");
    if report["pass"] == true {
        Ok(())
    } else {
        Err(format!("soak failed: {}", report["failures"]))
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[derive(Default)]
struct Totals {
    subscribers: u64,
    received: u64,
    lost_told: u64,
    lost_silent: u64,
    dups: u64,
    gaps: u64,
    unexpected_ends: u64,
    reconnects: u64,
    connect_failures: u64,
    incomplete: u64,
    kept_up: u64,
    kept_up_incomplete: u64,
    slow_told: u64,
    reconnecting: u64,
    slow_dropped: u64,
}

impl Totals {
    fn add(&mut self, a: &Acct, complete: bool, slow: bool, reconnecting: bool) {
        self.subscribers += 1;
        self.received += a.received;
        self.lost_told += a.lost_told;
        self.lost_silent += a.lost_silent;
        self.dups += a.dups;
        self.gaps += a.gaps;
        // A slow reader may be let go by the stall rule (its socket took nothing the server
        // could see for two keepalive intervals: the kernel reports room only once a third of
        // the send buffer is free); it resumes with its last id and is told of the gap. Any
        // other lost connection is a failure.
        if slow {
            self.slow_dropped += a.unexpected_ends;
        } else {
            self.unexpected_ends += a.unexpected_ends;
        }
        self.reconnects += a.reconnects;
        self.connect_failures += a.connect_failures;
        self.incomplete += u64::from(!complete);
        if a.gaps == 0 {
            self.kept_up += 1;
            // Kept up: it must have every message from its first on (nothing lost at all).
            self.kept_up_incomplete += u64::from(!complete || a.lost_told + a.lost_silent > 0);
        } else if slow {
            self.slow_told += 1;
        }
        self.reconnecting += u64::from(reconnecting);
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "subscribers": self.subscribers,
            "received": self.received,
            "kept_up": self.kept_up,
            "kept_up_incomplete": self.kept_up_incomplete,
            "told_of_gaps": self.subscribers - self.kept_up,
            "slow_told_of_gaps": self.slow_told,
            "lost_told": self.lost_told,
            "lost_silent": self.lost_silent,
            "duplicates": self.dups,
            "gap_notices": self.gaps,
            "reconnecting_subscribers": self.reconnecting,
            "reconnects": self.reconnects,
            "unexpected_ends": self.unexpected_ends,
            "slow_readers_dropped": self.slow_dropped,
            "connect_failures": self.connect_failures,
            "incomplete": self.incomplete,
        })
    }
}

/// How a connection of a subscriber ended.
enum End {
    /// The run is over.
    Stop,
    /// This client closed it to reconnect (the 1 % that reconnect every second).
    Reconnect,
    /// The server ended it or it broke.
    Lost,
}

/// When a reconnecting subscriber drops its connection next (a second, give or take, so the
/// reconnects do not all land at once).
fn reconnect_deadline(s: &Sub) -> Option<Instant> {
    s.reconnecting.then(|| {
        let jitter = (s as *const Sub as usize >> 4) % 500;
        Instant::now() + Duration::from_millis(750 + jitter as u64)
    })
}

async fn open(run: &Run, s: &Sub, src: Ipv4Addr) -> Option<Raw> {
    // A slow reader's small receive buffer makes its slowness reach the server soon.
    let rcvbuf = s.slow.then_some(4096);
    match timeout(
        Duration::from_secs(30),
        rawhttp::connect_with(run.addr, Some(src), rcvbuf),
    )
    .await
    {
        Ok(Ok(tcp)) => Some(Raw::new(tcp, 4096)),
        _ => {
            lock(s).connect_failures += 1;
            sleep(Duration::from_millis(200)).await;
            None
        }
    }
}

/// Reads at the slow reader's pace: 64 bytes every 250 ms until the run drains.
async fn paced_read(run: &Run, s: &Sub, raw: &mut Raw) -> std::io::Result<usize> {
    if s.slow && !run.draining.load(Relaxed) {
        sleep(Duration::from_millis(250)).await;
        return raw.s.read(&mut raw.buf[..64]).await;
    }
    rawhttp::read_some(raw).await
}

async fn sse_sub(run: &Run, s: &Sub, src: Ipv4Addr) {
    let path = run.sub_path.replace("{channel}", &run.channels[s.channel]);
    while !run.stop.load(Relaxed) {
        let Some(mut raw) = open(run, s, src).await else {
            continue;
        };
        let resume = lock(s).resume.clone();
        let extra = resume.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        let head = match timeout(
            Duration::from_secs(30),
            rawhttp::request(&mut raw, &rawhttp::sse_request(&path, &run.host, &extra)),
        )
        .await
        {
            Ok(Ok(h)) if h.status == 200 => h,
            _ => {
                lock(s).connect_failures += 1;
                sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if head.header("crier-resume") == Some("gap") {
            lock(s).gap();
        }
        let mut dechunk = Dechunk::for_head(&head);
        let mut lines = Lines::default();
        let mut parser = sse::Parser::default();
        let mut on_bytes = |d: &[u8], acct: &mut Acct| {
            // False once the body is over.
            dechunk.feed(d, &mut |body: &[u8]| {
                lines.feed(body, &mut |l: &[u8]| {
                    if let Some(ev) = parser.line(l) {
                        if ev.kind == "crier.gap" {
                            acct.gap();
                        } else if let Some(p) = payload::parse(&ev.data) {
                            acct.message(p.seq);
                            acct.resume = parser.last_id.clone();
                        }
                    }
                })
            })
        };
        let first = raw.buf[head.body_at..raw.len].to_vec();
        on_bytes(&first, &mut lock(s));
        let end = stream(run, s, &mut raw, |d, acct| on_bytes(d, acct)).await;
        if matches!(end, End::Stop) {
            return;
        }
        note_end(s, end);
    }
}

/// Reads a subscriber's stream until the run stops, its reconnect time comes, or the stream
/// ends; `on_bytes` returns false when the body is over.
async fn stream(
    run: &Run,
    s: &Sub,
    raw: &mut Raw,
    mut on_bytes: impl FnMut(&[u8], &mut Acct) -> bool,
) -> End {
    let reconnect_at = reconnect_deadline(s);
    loop {
        if run.stop.load(Relaxed) {
            return End::Stop;
        }
        let wait = reconnect_at.map_or(Duration::from_millis(500), |t| {
            t.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500))
        });
        match timeout(wait, paced_read(run, s, raw)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return End::Lost,
            Ok(Ok(n)) => {
                let data = raw.buf[..n].to_vec();
                if !on_bytes(&data, &mut lock(s)) {
                    return End::Lost;
                }
            }
            Err(_) => {}
        }
        if reconnect_at.is_some_and(|t| Instant::now() >= t) {
            return End::Reconnect;
        }
    }
}

fn note_end(s: &Sub, end: End) {
    let mut a = lock(s);
    match end {
        End::Reconnect => a.reconnects += 1,
        End::Lost => a.unexpected_ends += 1,
        End::Stop => {}
    }
}

async fn ws_sub(run: &Run, s: &Sub, src: Ipv4Addr) {
    let base = run.sub_path.replace("{channel}", &run.channels[s.channel]);
    while !run.stop.load(Relaxed) {
        let Some(mut raw) = open(run, s, src).await else {
            continue;
        };
        let resume = lock(s).resume.clone();
        let path = match resume {
            Some(id) => format!("{base}?last_event_id={id}"),
            None => base.clone(),
        };
        let req = rawhttp::ws_request(&path, &run.host).replacen(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Protocol: crier.json\r\n\r\n",
            1,
        );
        let head = match timeout(Duration::from_secs(30), rawhttp::request(&mut raw, &req)).await {
            Ok(Ok(h)) if h.status == 101 => h,
            _ => {
                lock(s).connect_failures += 1;
                sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut ws = rawhttp::into_ws(raw, &head).await;
        let reconnect_at = reconnect_deadline(s);
        let end = loop {
            if run.stop.load(Relaxed) {
                let _ = ws.close(None).await;
                break End::Stop;
            }
            if s.slow && !run.draining.load(Relaxed) {
                sleep(Duration::from_millis(400)).await;
            }
            match timeout(Duration::from_millis(500), ws.next()).await {
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str()) else {
                        continue;
                    };
                    let mut a = lock(s);
                    if v["gap"] == true {
                        a.gap();
                    }
                    if let Some(p) = v["data"]
                        .as_str()
                        .and_then(|d| payload::parse(d.as_bytes()))
                    {
                        a.message(p.seq);
                        a.resume = v["id"].as_str().map(str::to_owned);
                    }
                }
                Ok(Some(Ok(WsMessage::Ping(p)))) => {
                    let _ = ws.send(WsMessage::Pong(p)).await;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => break End::Lost,
                Err(_) => {}
            }
            if reconnect_at.is_some_and(|t| Instant::now() >= t) {
                let _ = ws.close(None).await;
                break End::Reconnect;
            }
        };
        if matches!(end, End::Stop) {
            return;
        }
        note_end(s, end);
    }
}

async fn longpoll_sub(run: &Run, s: &Sub, src: Ipv4Addr) {
    let path = run.sub_path.replace("{channel}", &run.channels[s.channel]);
    while !run.stop.load(Relaxed) {
        let Some(mut raw) = open(run, s, src).await else {
            continue;
        };
        // Polls on one keep-alive connection until it breaks.
        loop {
            if run.stop.load(Relaxed) {
                return;
            }
            let etag = lock(s).resume.clone();
            let extra = etag.map_or(String::new(), |e| format!("If-None-Match: {e}\r\n"));
            let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n", run.host);
            raw.len = 0;
            let head =
                match timeout(Duration::from_secs(60), rawhttp::request(&mut raw, &req)).await {
                    Ok(Ok(h)) => h,
                    _ => {
                        if !run.stop.load(Relaxed) {
                            lock(s).unexpected_ends += 1;
                        }
                        break;
                    }
                };
            let len: usize = head
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = raw.buf[head.body_at..raw.len].to_vec();
            while body.len() < len {
                match timeout(Duration::from_secs(10), rawhttp::read_some(&mut raw)).await {
                    Ok(Ok(n)) if n > 0 => body.extend_from_slice(&raw.buf[..n]),
                    _ => break,
                }
            }
            let answered = {
                let mut a = lock(s);
                if let Some(e) = head.header("etag") {
                    a.resume = Some(e.to_owned());
                }
                match head.status {
                    200 => {
                        if head.header("crier-resume") == Some("gap") {
                            a.gap();
                        }
                        if let Some(p) = payload::parse(&body[..len.min(body.len())]) {
                            a.message(p.seq);
                        }
                        true
                    }
                    304 => true,
                    _ => {
                        a.unexpected_ends += 1;
                        false
                    }
                }
            };
            if !answered {
                sleep(Duration::from_millis(200)).await;
                break;
            }
        }
    }
}

#[derive(Default)]
struct ProxyStats {
    ok: AtomicU64,
    ok_failed: AtomicU64,
    reset_answers: AtomicU64,
    stall_answers: AtomicU64,
    hung: AtomicU64,
}

/// One proxied request on a fresh connection, read to its end.
async fn proxy_request(addr: SocketAddr, host: &str, path: &str, st: &ProxyStats) {
    let work = async {
        let mut c = TcpStream::connect(addr).await.ok()?;
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        Some(out)
    };
    match timeout(Duration::from_secs(15), work).await {
        Err(_) => {
            st.hung.fetch_add(1, Relaxed);
        }
        Ok(resp) => {
            let resp = resp.unwrap_or_default();
            let ok = resp.starts_with(b"HTTP/1.1 200") && resp.ends_with(b"\r\n\r\nok\n");
            match path {
                "/soak/ok" if ok => {
                    st.ok.fetch_add(1, Relaxed);
                }
                "/soak/ok" => {
                    st.ok_failed.fetch_add(1, Relaxed);
                }
                "/soak/reset" => {
                    st.reset_answers.fetch_add(1, Relaxed);
                }
                _ => {
                    st.stall_answers.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// The app: `/soak/ok` answers "ok" (keep-alive), `/soak/reset` starts an answer and resets
/// the connection, `/soak/stall` sends its head and part of the body, then nothing for 30 s.
async fn serve_upstream(l: TcpListener) {
    loop {
        let Ok((mut c, _)) = l.accept().await else {
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut have = 0;
            loop {
                let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else {
                    if have == buf.len() {
                        return;
                    }
                    match c.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.copy_within(end + 4..have, 0);
                have -= end + 4;
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                if path.starts_with("/soak/reset") {
                    let _ = c
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                        .await;
                    reset_on_close(&c);
                    return;
                }
                if path.starts_with("/soak/stall") {
                    let _ = c
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nslow")
                        .await;
                    sleep(Duration::from_secs(30)).await;
                    return;
                }
                if c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// SO_LINGER 0: closing the socket sends a reset, not a FIN (a crashed app, as the proxy sees it).
fn reset_on_close(c: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd owned by `c`; the option value is a plain C struct.
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
