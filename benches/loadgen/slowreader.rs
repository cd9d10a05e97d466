//! The slow-reader workload (issue 19): one SSE subscriber on one channel while M messages are
//! published as fast as P keep-alive connections can. The reader reads as fast as it can, or at
//! most `--read-bytes-per-sec`, and reconnects with `Last-Event-ID` whenever its stream ends —
//! as EventSource does. Every message, `event: crier.gap` notice and `Crier-Resume: gap` resume
//! is logged in arrival order; [`gaps::account`] turns the log into received / lost /
//! duplicates / out-of-order / lost-told / lost-silent.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::gaps::{self, Entry};
use crate::hist::Histogram;
use crate::payload;
use crate::procstat;
use crate::publisher::{self, Endpoint, PubFormat, PubSpec, Target};
use crate::push::{emit, round3, split_url, tags};
use crate::rawhttp::{self, Dechunk, Lines, Raw};
use crate::sse;
use crate::subscriber::{now_ns, Transport};

#[derive(clap::Args, Debug)]
pub struct SlowArgs {
    /// Subscriber URL template, e.g. http://127.0.0.1:18080/live/{channel}
    #[arg(long)]
    pub sub_url: String,
    /// Publish URL template, e.g. http://127.0.0.1:18081/pub/{channel}
    #[arg(long)]
    pub pub_url: String,
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Keep-alive publish connections, publishing as fast as the server answers.
    #[arg(long, default_value_t = 8)]
    pub pub_conns: usize,
    /// The reader's pace in bytes per second; 0 = as fast as it can.
    #[arg(long, default_value_t = 0)]
    pub read_bytes_per_sec: u64,
    /// Bytes per read call.
    #[arg(long, default_value_t = 65536)]
    pub read_buffer: usize,
    /// Wait this long before reconnecting (EventSource's retry; 0 = at once).
    #[arg(long, default_value_t = 0)]
    pub reconnect_delay_ms: u64,
    /// After publishing, stop when nothing arrived for this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain_idle: f64,
    /// After publishing, stop after this many seconds in any case.
    #[arg(long, default_value_t = 60.0)]
    pub drain_max: f64,
    #[arg(long, default_value_t = 300.0)]
    pub max_seconds: f64,
    #[arg(long)]
    pub server_pid: Vec<u32>,
    #[arg(long)]
    pub channel_prefix: Option<String>,
    #[arg(long)]
    pub tag: Vec<String>,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What the reader saw, shared with the run loop.
#[derive(Default)]
struct Seen {
    log: Vec<Entry>,
    received: u64,
    bytes: u64,
    connects: u64,
    gap_events: u64,
    gap_headers: u64,
    resume_ok_headers: u64,
    bad_gap_events: u64,
    unparsed: u64,
    errors: std::collections::BTreeMap<String, u64>,
    last_ns: u64,
}

struct Reader {
    seen: Arc<Mutex<Seen>>,
    latency: Arc<Histogram>,
    parser: sse::Parser,
}

impl Reader {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_event(&mut self, e: sse::Event) {
        let now = now_ns();
        let mut s = self.lock();
        if e.kind == "crier.gap" {
            // {"channel":"...","next":"<id>"}: the first id the client will now get.
            let ok = serde_json::from_slice::<serde_json::Value>(&e.data)
                .is_ok_and(|v| v["next"].is_string() && v["channel"].is_string());
            s.gap_events += 1;
            s.bad_gap_events += u64::from(!ok);
            s.log.push(Entry::Told);
            return;
        }
        match payload::parse(&e.data) {
            Some(p) => {
                s.log.push(Entry::Msg(p.seq));
                s.received += 1;
                s.last_ns = now;
                self.latency.record(now.saturating_sub(p.sent_ns) / 1000);
            }
            None => s.unparsed += 1,
        }
    }
}

/// One connection: request (resuming from the last id), then read events until the stream ends.
async fn stream_once(
    a: &SlowArgs,
    path: &str,
    r: &mut Reader,
    connected: &watch::Sender<bool>,
) -> io::Result<()> {
    let (addr, host, _) = split_url(&a.sub_url).map_err(io::Error::other)?;
    let s = rawhttp::connect(addr, None).await?;
    let mut raw = Raw::new(s, a.read_buffer.max(512));
    let extra = r
        .parser
        .last_id
        .as_ref()
        .map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    let head = rawhttp::request(&mut raw, &rawhttp::sse_request(path, &host, &extra)).await?;
    if head.status != 200 {
        return Err(io::Error::other(format!("status {}", head.status)));
    }
    {
        let mut s = r.lock();
        s.connects += 1;
        match head.header("crier-resume") {
            Some("gap") => {
                s.gap_headers += 1;
                s.log.push(Entry::Told);
            }
            Some("ok") => s.resume_ok_headers += 1,
            _ => {}
        }
    }
    let _ = connected.send(true);
    let mut dec = Dechunk::for_head(&head);
    let mut lines = Lines::default();
    let first = raw.buf[head.body_at..raw.len].to_vec();
    let mut feed = |d: &[u8], r: &mut Reader| {
        dec.feed(d, &mut |b: &[u8]| {
            lines.feed(b, &mut |l: &[u8]| {
                if let Some(e) = r.parser.line(l) {
                    r.on_event(e);
                }
            })
        })
    };
    if !feed(&first, r) {
        return Ok(());
    }
    let pace = a.read_bytes_per_sec;
    // Throttled: read about 10 ms worth at a time, and sleep to keep the average pace.
    let chunk = if pace > 0 {
        ((pace / 100) as usize).clamp(256, raw.buf.len())
    } else {
        raw.buf.len()
    };
    let t0 = Instant::now();
    let mut total = 0u64;
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut raw.s, &mut raw.buf[..chunk]).await?;
        if n == 0 {
            return Ok(());
        }
        total += n as u64;
        r.lock().bytes += n as u64;
        let more = feed(&raw.buf[..n], r);
        if !more {
            return Ok(());
        }
        if pace > 0 {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(total as f64 / pace as f64))
                .await;
        }
    }
}

/// Reads until stopped, reconnecting like EventSource when a stream ends or breaks.
async fn reader(a: Arc<SlowArgs>, path: String, mut r: Reader, connected: watch::Sender<bool>) {
    loop {
        let res = stream_once(&a, &path, &mut r, &connected).await;
        let what = match res {
            Ok(()) => "stream ended".to_string(),
            Err(e) => format!("{e}"),
        };
        *r.lock().errors.entry(what).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(a.reconnect_delay_ms.max(1))).await;
    }
}

pub async fn run(a: SlowArgs) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.max_seconds);
    let (paddr, phost, ppath) = split_url(&a.pub_url)?;
    let (_, _, spath) = split_url(&a.sub_url)?;
    let prefix = a
        .channel_prefix
        .clone()
        .unwrap_or_else(|| format!("s{}x{}c", std::process::id(), now_ns() % 100_000));
    let names = Arc::new(vec![format!("{prefix}0")]);
    let path = spath.replace("{channel}", &names[0]);
    let a = Arc::new(a);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let latency = Arc::new(Histogram::default());
    let load_start = procstat::loadavg();
    let before = procstat::sample(&a.server_pid);

    let (ctx, mut crx) = watch::channel(false);
    let rd = Reader {
        seen: seen.clone(),
        latency: latency.clone(),
        parser: sse::Parser::default(),
    };
    let task = tokio::spawn(reader(a.clone(), path, rd, ctx));
    tokio::time::timeout(Duration::from_secs(10), crx.wait_for(|c| *c))
        .await
        .map_err(|_| "the subscriber did not connect within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let spec = Arc::new(PubSpec {
        targets: vec![Target {
            endpoint: Endpoint::Tcp(paddr),
            host: phost,
            path: ppath,
        }],
        ws: false,
        format: PubFormat::Raw,
        transport: Transport::Sse,
        channels: names.clone(),
        messages: a.messages,
        size: a.size,
        rate: 0.0,
        conns: a.pub_conns,
        deadline,
        times: true,
    });
    let t = Instant::now();
    let st = publisher::run(spec).await;
    let publish_s = t.elapsed().as_secs_f64();
    let ok = st.ok.load(std::sync::atomic::Ordering::Relaxed);

    // Drain: until everything arrived, or nothing arrived for drain_idle, or drain_max.
    let t = Instant::now();
    let mut last = (0u64, Instant::now());
    loop {
        let (received, bytes) = {
            let s = seen.lock().unwrap_or_else(|p| p.into_inner());
            (s.received, s.bytes)
        };
        if received >= ok {
            break;
        }
        if bytes != last.0 {
            last = (bytes, Instant::now());
        } else if last.1.elapsed().as_secs_f64() >= a.drain_idle {
            break;
        }
        if Instant::now() >= deadline || t.elapsed().as_secs_f64() >= a.drain_max {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_s = t.elapsed().as_secs_f64();
    task.abort();
    let _ = task.await;
    let end = procstat::sample(&a.server_pid);
    let s = seen.lock().unwrap_or_else(|p| p.into_inner());
    let load = |v: &[std::sync::atomic::AtomicU64]| {
        v.iter()
            .map(|x| x.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    };
    let times = gaps::Times {
        sent: load(&st.sent_ns),
        ack: load(&st.ack_ns),
    };
    let counts = gaps::account(&s.log, &times);
    let elapsed = st
        .last_done_ns
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(st.first_send_ns.load(std::sync::atomic::Ordering::Relaxed))
        as f64
        / 1e9;
    let first = st.first_send_ns.load(std::sync::atomic::Ordering::Relaxed);
    let window = s.last_ns.saturating_sub(first) as f64 / 1e9;
    let mut reader = counts.json();
    let o = reader.as_object_mut().expect("an object");
    o.insert("reconnects".into(), json!(s.connects.saturating_sub(1)));
    o.insert("gap_events".into(), json!(s.gap_events));
    o.insert("gap_events_malformed".into(), json!(s.bad_gap_events));
    o.insert("gap_headers".into(), json!(s.gap_headers));
    o.insert("told_signals".into(), json!(s.gap_events + s.gap_headers));
    o.insert("resume_ok_headers".into(), json!(s.resume_ok_headers));
    o.insert("unparsed".into(), json!(s.unparsed));
    o.insert("bytes".into(), json!(s.bytes));
    o.insert(
        "lost_pct".into(),
        json!(if ok > 0 {
            round3(100.0 * counts.lost as f64 / ok as f64)
        } else {
            0.0
        }),
    );
    o.insert(
        "per_s".into(),
        json!(if window > 0.0 {
            (counts.received as f64 / window).round()
        } else {
            0.0
        }),
    );
    o.insert("latency_ms".into(), latency.summary_ms());
    let v = json!({
        "kind": "slowreader",
        "tags": tags(&a.tag),
        "sub_url": a.sub_url,
        "pub": a.pub_url,
        "messages": a.messages,
        "size": a.size,
        "pub_conns": a.pub_conns,
        "read_bytes_per_sec": a.read_bytes_per_sec,
        "publish_s": round3(publish_s),
        "drain_s": round3(drain_s),
        "publish": {
            "ok": ok,
            "errors": st.errors.load(std::sync::atomic::Ordering::Relaxed),
            "error_kinds": *st.error_kinds.lock().unwrap_or_else(|p| p.into_inner()),
            "elapsed_s": round3(elapsed),
            "rate_per_s": if elapsed > 0.0 { (ok as f64 / elapsed).round() } else { 0.0 },
            "latency_ms": st.latency.summary_ms(),
        },
        "reader": reader,
        "server": {
            "pids": a.server_pid,
            "before": {"rss_kib": before.rss_kib},
            "end": {"rss_kib": end.rss_kib},
            "cpu_s": round3(end.cpu_s - before.cpu_s),
        },
        "errors": s.errors,
        "load_start": load_start,
        "load_end": procstat::loadavg(),
        "wall_s": round3(started.elapsed().as_secs_f64()),
    });
    emit(&v, a.out.as_ref());
    Ok(())
}
