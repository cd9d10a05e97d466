//! Restart time (issue 16): starts the server command given after `--`, and measures from the
//! moment it is spawned to (a) the public listener accepting a TCP connection and (b) a resume
//! answering: `GET <resume-url>` as SSE (asking for the stored buffer with
//! `last_event_id=earliest`) until the response head, and until its first event when the buffer
//! has one. The server is left running (its pid in `--pid-file`) for run.sh to stop, so that
//! this generator never outlives a measurement it owns nothing of.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::procstat;
use crate::push::{emit, round3, split_url, tags};
use crate::rawhttp::{self, Dechunk, Lines, Raw};

#[derive(clap::Args, Debug)]
pub struct StartupArgs {
    /// The public listener, e.g. 127.0.0.1:18080
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// A resume request on a stored channel, e.g.
    /// http://127.0.0.1:18080/live/rs0?last_event_id=earliest
    #[arg(long)]
    pub resume_url: String,
    /// The store file, whose size is reported.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Where the server's stdout and stderr go.
    #[arg(long)]
    pub log: PathBuf,
    /// Where the server's pid is written.
    #[arg(long)]
    pub pid_file: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub max_seconds: f64,
    #[arg(long)]
    pub tag: Vec<String>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The server command.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    round3(d.as_secs_f64() * 1000.0)
}

/// The resume request: time to the response head (and its Crier-Resume), then to the first event.
/// (status, Crier-Resume, time to the head, time to the first event), times from the request.
type Resumed = (u16, Option<String>, Duration, Option<Duration>);

async fn resume(url: &str, limit: Duration) -> Result<Resumed, String> {
    let (addr, host, path) = split_url(url)?;
    let t0 = Instant::now();
    let s = rawhttp::connect(addr, None)
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Raw::new(s, 16384);
    let head = rawhttp::request(&mut raw, &rawhttp::sse_request(&path, &host, ""))
        .await
        .map_err(|e| e.to_string())?;
    let resume = head.header("crier-resume").map(str::to_string);
    let head_at = t0.elapsed();
    if head.status != 200 {
        return Ok((head.status, resume, head_at, None));
    }
    let mut dec = Dechunk::for_head(&head);
    let mut lines = Lines::default();
    let mut got = false;
    let mut feed = |d: &[u8], got: &mut bool| {
        dec.feed(d, &mut |b: &[u8]| {
            lines.feed(b, &mut |l: &[u8]| *got |= l.starts_with(b"data:"))
        });
    };
    let first = raw.buf[head.body_at..raw.len].to_vec();
    feed(&first, &mut got);
    let wait = async {
        while !got {
            let n = rawhttp::read_some(&mut raw).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            let chunk = raw.buf[..n].to_vec();
            feed(&chunk, &mut got);
        }
    };
    let _ = tokio::time::timeout(limit, wait).await;
    Ok((head.status, resume, head_at, got.then(|| t0.elapsed())))
}

pub async fn run(a: StartupArgs) -> Result<(), String> {
    split_url(&a.resume_url)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.log)
        .map_err(|e| format!("{}: {e}", a.log.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let limit = Duration::from_secs_f64(a.max_seconds);
    let t0 = Instant::now();
    let child = Command::new(&a.cmd[0])
        .args(&a.cmd[1..])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", a.cmd[0]))?;
    let pid = child.id();
    std::fs::write(&a.pid_file, format!("{pid}\n")).map_err(|e| e.to_string())?;
    // Poll the listener every millisecond.
    let listen = loop {
        if tokio::net::TcpStream::connect(a.listen).await.is_ok() {
            break t0.elapsed();
        }
        if t0.elapsed() > limit || !procstat::alive(pid) {
            return Err(format!(
                "{} did not open {} (see {})",
                a.cmd[0],
                a.listen,
                a.log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let asked = t0.elapsed();
    let (status, resume_hdr, head, first) = resume(&a.resume_url, Duration::from_secs(3)).await?;
    let rss = procstat::sample(&[pid]);
    let v = json!({
        "kind": "startup",
        "tags": tags(&a.tag),
        "cmd": a.cmd.join(" "),
        "pid": pid,
        "startup": {
            "listen_ms": ms(listen),
            "resume_status": status,
            "crier_resume": resume_hdr,
            "resume_head_ms": ms(asked + head),
            "first_event_ms": first.map(|d| ms(asked + d)),
        },
        "file_mib": a.file.as_ref().and_then(|f| std::fs::metadata(f).ok()).map(|m| round3(m.len() as f64 / 1048576.0)),
        "server": {"rss_kib": rss.rss_kib},
    });
    emit(&v, a.out.as_ref());
    Ok(())
}
