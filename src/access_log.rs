//! The access log (`server.access_log`, off by default): one line per proxied request and per
//! subscriber connect and disconnect, on stdout, so the journal keeps it apart from crier's
//! own log on stderr.
//!
//! Lines are handed to one writer thread through a bounded queue: a slow stdout (a journal
//! under pressure, a full pipe) delays that thread, never a connection. When the queue is full
//! the line is dropped and counted; the next line that gets through says how many were lost.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::config::AccessLogFormat;
use crate::model::Transport;

/// Lines waiting for the writer at most; past it lines are dropped (and counted).
const QUEUE: usize = 16 * 1024;

/// The format in force (0: off), set at start and on reload; read per request with one load.
static MODE: AtomicU8 = AtomicU8::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);
static WRITER: OnceLock<SyncSender<Msg>> = OnceLock::new();

enum Msg {
    Line(String),
    /// Write out what is queued, then say so (shutdown: nothing logged is lost at exit).
    Flush(std::sync::mpsc::Sender<()>),
}

fn code(f: AccessLogFormat) -> u8 {
    match f {
        AccessLogFormat::Off => 0,
        AccessLogFormat::Combined => 1,
        AccessLogFormat::Json => 2,
    }
}

/// Applies `server.access_log` (start and reload). The writer thread starts on first use.
pub fn configure(f: AccessLogFormat) {
    if f != AccessLogFormat::Off {
        WRITER.get_or_init(|| {
            let (tx, rx) = sync_channel::<Msg>(QUEUE);
            let spawned = std::thread::Builder::new()
                .name("crier-access-log".into())
                .spawn(move || {
                    let out = std::io::stdout();
                    let mut w = std::io::BufWriter::new(out.lock());
                    let mut next = rx.recv();
                    while let Ok(msg) = next {
                        match msg {
                            Msg::Line(line) => {
                                let _ = w.write_all(line.as_bytes());
                            }
                            Msg::Flush(done) => {
                                let _ = w.flush();
                                let _ = done.send(());
                            }
                        }
                        // Flush when the queue is empty: batches under load, prompt when quiet.
                        next = match rx.try_recv() {
                            Ok(m) => Ok(m),
                            Err(_) => {
                                let _ = w.flush();
                                rx.recv()
                            }
                        };
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("access log: cannot start its writer thread: {e}");
            }
            tx
        });
    }
    MODE.store(code(f), Ordering::Relaxed);
}

fn mode() -> u8 {
    MODE.load(Ordering::Relaxed)
}

/// Whether lines are wanted at all (a request skips all the work when not).
pub fn on() -> bool {
    mode() != 0
}

fn emit(mut line: String) {
    let Some(tx) = WRITER.get() else { return };
    let lost = LOST.swap(0, Ordering::Relaxed);
    if lost > 0 {
        // Said in the line's own format so a parser of the log is not surprised.
        let _ = if mode() == 2 {
            writeln!(line, "{{\"kind\":\"lost\",\"lines\":{lost}}}")
        } else {
            writeln!(line, "# access log: {lost} lines lost (stdout too slow)")
        };
    }
    match tx.try_send(Msg::Line(line)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            LOST.fetch_add(1 + lost, Ordering::Relaxed);
        }
    }
}

/// Waits (up to `within`) until every line logged so far is written: at shutdown.
pub fn flush(within: Duration) {
    let Some(tx) = WRITER.get() else { return };
    let (done_tx, done) = std::sync::mpsc::channel();
    if tx.send(Msg::Flush(done_tx)).is_ok() {
        let _ = done.recv_timeout(within);
    }
}

/// One proxied request, as its response ended (`complete` false: cut short).
pub struct Proxied<'a> {
    pub peer: SocketAddr,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub referer: &'a str,
    pub user_agent: &'a str,
    pub duration: Duration,
    pub complete: bool,
}

pub fn proxied(r: &Proxied<'_>) {
    let mut line = String::with_capacity(160);
    let _ = match mode() {
        0 => return,
        1 => writeln!(
            line,
            "{} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\"",
            r.peer.ip(),
            clf_time(SystemTime::now()),
            r.method,
            clf_escape(r.target),
            r.version,
            r.status,
            r.bytes,
            clf_escape(or_dash(r.referer)),
            clf_escape(or_dash(r.user_agent)),
        ),
        _ => writeln!(
            line,
            "{}",
            serde_json::json!({
                "kind": "proxy",
                "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                "peer": r.peer.to_string(),
                "method": r.method,
                "target": r.target,
                "version": r.version,
                "status": r.status,
                "bytes": r.bytes,
                "referer": r.referer,
                "user_agent": r.user_agent,
                "duration_ms": r.duration.as_secs_f64() * 1000.0,
                "complete": r.complete,
            })
        ),
    };
    emit(line);
}

/// A subscriber connection opening (`duration` None) or closing.
pub fn subscriber(
    peer: SocketAddr,
    transport: Transport,
    channels: &str,
    duration: Option<Duration>,
) {
    let mut line = String::with_capacity(120);
    let event = if duration.is_some() {
        "disconnect"
    } else {
        "connect"
    };
    let _ = match mode() {
        0 => return,
        // Not an HTTP request line: key=value pairs after the same address and time.
        1 => {
            let _ = write!(
                line,
                "{} - - [{}] subscriber {event} transport={} channels={}",
                peer.ip(),
                clf_time(SystemTime::now()),
                transport.as_str(),
                channels,
            );
            match duration {
                Some(d) => writeln!(line, " duration={:.3}s", d.as_secs_f64()),
                None => writeln!(line),
            }
        }
        _ => writeln!(
            line,
            "{}",
            serde_json::json!({
                "kind": "subscriber",
                "event": event,
                "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                "peer": peer.to_string(),
                "transport": transport.as_str(),
                "channels": channels,
                "duration_ms": duration.map(|d| d.as_secs_f64() * 1000.0),
            })
        ),
    };
    emit(line);
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Quotes and backslashes escaped, control bytes as \xHH: a client cannot forge a line.
fn clf_escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f)
    {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.into()
}

/// `02/Dec/2026:03:04:05 +0000`, the Common Log Format's time (UTC).
fn clf_time(t: SystemTime) -> String {
    // RFC 3339 from humantime, rearranged: 2026-12-02T03:04:05Z.
    let s = humantime::format_rfc3339_seconds(t).to_string();
    let (date, time) = (&s[..10], &s[11..19]);
    let month = match &date[5..7] {
        "01" => "Jan",
        "02" => "Feb",
        "03" => "Mar",
        "04" => "Apr",
        "05" => "May",
        "06" => "Jun",
        "07" => "Jul",
        "08" => "Aug",
        "09" => "Sep",
        "10" => "Oct",
        "11" => "Nov",
        _ => "Dec",
    };
    format!("{}/{month}/{}:{time} +0000", &date[8..10], &date[..4])
}

/// A proxied request on the hyper path, remembered until its response body ends.
pub struct Request {
    peer: SocketAddr,
    method: String,
    target: String,
    version: &'static str,
    referer: String,
    user_agent: String,
    started: std::time::Instant,
}

impl Request {
    /// None when the log is off (nothing is copied then).
    pub fn of<B>(req: &http::Request<B>, peer: SocketAddr) -> Option<Request> {
        if !on() {
            return None;
        }
        let header = |name: http::header::HeaderName| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default()
        };
        Some(Request {
            peer,
            method: req.method().to_string(),
            target: req
                .uri()
                .path_and_query()
                .map_or("/".into(), |p| p.as_str().to_string()),
            version: match req.version() {
                http::Version::HTTP_2 => "HTTP/2.0",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            referer: header(http::header::REFERER),
            user_agent: header(http::header::USER_AGENT),
            started: std::time::Instant::now(),
        })
    }

    /// The response, its body counted; the line is written when the body ends or is dropped.
    pub fn watch(
        self,
        resp: http::Response<crate::response::Body>,
    ) -> http::Response<crate::response::Body> {
        use http_body_util::BodyExt;
        let status = resp.status().as_u16();
        resp.map(|body| {
            Counted {
                inner: body,
                bytes: 0,
                line: Some((self, status)),
            }
            .boxed_unsync()
        })
    }

    fn log(&self, status: u16, bytes: u64, complete: bool) {
        proxied(&Proxied {
            peer: self.peer,
            method: &self.method,
            target: &self.target,
            version: self.version,
            status,
            bytes,
            referer: &self.referer,
            user_agent: &self.user_agent,
            duration: self.started.elapsed(),
            complete,
        });
    }
}

/// A response body that counts what it hands on and logs once at its end.
struct Counted {
    inner: crate::response::Body,
    bytes: u64,
    line: Option<(Request, u16)>,
}

impl Counted {
    fn end(&mut self, complete: bool) {
        if let Some((r, status)) = self.line.take() {
            r.log(status, self.bytes, complete);
        }
    }
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = crate::response::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.end(true);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(false),
            Poll::Ready(None) => self.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // Dropped before its end: cut short, unless it had nothing to send.
        let empty = http_body::Body::is_end_stream(&self.inner);
        self.end(empty);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_log_format_time_and_escapes() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_180_645);
        assert_eq!(clf_time(t), "02/Dec/2026:03:04:05 +0000");
        assert_eq!(clf_escape("/a?b=c"), "/a?b=c");
        assert_eq!(clf_escape("x\" 200 \"\n"), "x\\\" 200 \\\"\\x0a");
    }
}
